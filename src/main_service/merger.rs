//! The merger: takes the edits remotes upload off the `CRM_UP` work queue, one at a time and
//! in order, and merges each into the main. An edit is checked (it belongs to this database,
//! its remote exists and is enabled, the record is one the remote holds or a new one its users
//! may access, its fields are valid), then merged with the main's record, newest stamp winning
//! (field by field for contacts, companies and groups), and committed to `CRM_EVENTS` like any
//! change: the router sends the result back to every target that holds the record. An edit
//! that fails a check is refused: the main's sync log records it with the edit, and the remote
//! is told on its own reject subject, so no edit is dropped without a trace.
//!
//! Only after that is the upload acknowledged. A crash in between merges it again, which
//! changes nothing (the same stamps are already held).

use std::time::Duration;

use futures::StreamExt;
use tokio::sync::watch;

use super::{Decision, Main};
use crate::error::ServiceError;
use crate::model::{self, Fields, Kind, Value};
use crate::routing::{RoutingConfig, SetSpec, TargetDef};
use crate::store::{LogEntry, Stored};
use crate::wire::{self, Decoded, Envelope, Op, Target};

pub(super) async fn run(main: Main, mut shutdown: watch::Receiver<bool>) {
    loop {
        let result = merge_loop(&main, &mut shutdown).await;
        if *shutdown.borrow() {
            return;
        }
        if let Err(e) = result {
            tracing::warn!("merger restarting: {e:#}");
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            _ = shutdown.changed() => return,
        }
    }
}

async fn merge_loop(main: &Main, shutdown: &mut watch::Receiver<bool>) -> anyhow::Result<()> {
    let consumer = main.inner.nats.merger_consumer().await?;
    let mut messages = consumer
        .stream()
        .max_messages_per_batch(64)
        .heartbeat(Duration::from_secs(5))
        .expires(Duration::from_secs(30))
        .messages()
        .await?;
    let mut connections = main.inner.nats.connections.clone();
    connections.mark_unchanged();
    loop {
        let msg = tokio::select! {
            _ = shutdown.changed() => return Ok(()),
            _ = connections.changed() => anyhow::bail!("reconnected to NATS"),
            m = messages.next() => m,
        };
        let msg = match msg {
            None => anyhow::bail!("the upload consumer ended"),
            Some(Err(e)) => anyhow::bail!("reading CRM_UP: {e}"),
            Some(Ok(msg)) => msg,
        };
        match main.merge_upload(&msg.subject, &msg.payload).await {
            Ok(()) => {
                if let Err(e) = msg.ack().await {
                    // Merged; if the ack is lost the upload comes again and changes nothing.
                    tracing::warn!("acknowledging an upload failed: {e}");
                }
            }
            Err(e) => {
                // NATS or the store failed: leave the upload in the queue and try again.
                let _ = msg.ack_with(async_nats::jetstream::AckKind::Nak(Some(Duration::from_secs(1)))).await;
                anyhow::bail!("merging an upload from {}: {e}", msg.subject);
            }
        }
    }
}

/// Why an edit was not merged.
enum Outcome {
    /// Refused for good: told to the remote, kept in the sync log.
    Refused(String),
    /// Could not be decided now (NATS, the store): try again.
    Retry(ServiceError),
}

impl From<ServiceError> for Outcome {
    fn from(e: ServiceError) -> Outcome {
        match e {
            ServiceError::Unavailable(_) | ServiceError::Store(_) | ServiceError::Internal(_) => Outcome::Retry(e),
            other => Outcome::Refused(other.to_string()),
        }
    }
}

impl From<crate::store::StoreError> for Outcome {
    fn from(e: crate::store::StoreError) -> Outcome {
        Outcome::Retry(e.into())
    }
}

impl Main {
    /// Merges one upload. `Err` only when it could not be decided now and must come again.
    pub(super) async fn merge_upload(&self, subject: &str, payload: &[u8]) -> Result<(), ServiceError> {
        let remote = wire::up_remote(subject).unwrap_or_default().to_owned();
        let env = match wire::decode_checked(payload, &self.inner.database_id) {
            Decoded::Ok(env) => env,
            Decoded::Foreign(f) => return self.log_refusal(&remote, None, f.to_string()),
            Decoded::Malformed(e) => {
                return self.log_refusal(&remote, None, format!("the upload on {subject} does not decode: {e}"));
            }
        };
        match self.merge_edit(&remote, &env).await {
            Ok(()) => Ok(()),
            Err(Outcome::Retry(e)) => Err(e),
            Err(Outcome::Refused(reason)) => {
                tracing::warn!(remote, kind = %env.kind, id = %env.id, "refused an edit: {reason}");
                self.log_refusal(&remote, Some(&env), reason.clone())?;
                let reject = Envelope { op: Op::Reject, reason: Some(reason), ..env.clone() };
                self.inner
                    .nats
                    .publish_reject(
                        wire::reject_subject(&remote, env.kind, &env.id),
                        &format!("{}:rejected", env.event),
                        reject.encode(),
                    )
                    .await?;
                Ok(())
            }
        }
    }

    async fn merge_edit(&self, remote: &str, env: &Envelope) -> Result<(), Outcome> {
        let (kind, id) = (env.kind, env.id.as_str());
        if env.origin != remote {
            return Err(Outcome::Refused(format!(
                "the edit says it comes from remote {:?} but was uploaded on remote {remote:?}'s subject",
                env.origin
            )));
        }
        if !Kind::DATA.contains(&kind) || matches!(kind, Kind::User | Kind::Team) {
            return Err(Outcome::Refused(format!("{} are managed at the main, not at remotes", kind.plural())));
        }
        crate::names::check("id", id).map_err(ServiceError::from)?;
        let Some((remote_record, defs)) = self.remote_defs(remote)? else {
            return Err(Outcome::Refused(format!("there is no remote {remote:?} at this main")));
        };
        if matches!(remote_record.fields.get("enabled").map(|f| &f.value), Some(Value::Bool(false))) {
            return Err(Outcome::Refused(format!("remote {remote} is disabled at the main")));
        }
        let (current, known) = self.inner.store.get_known(kind, id)?;
        let held = match &current {
            Some(stored) => self.held_by(&defs, kind, id, &stored.fields)?,
            None => false,
        };
        match env.op {
            Op::Delete => {
                if current.is_none() {
                    return Ok(()); // already gone: nothing to do
                }
                if !held {
                    return Err(not_held(remote, kind, id));
                }
                match self.delete_from(remote, kind, id).await {
                    Err(ServiceError::NotFound { .. }) => Ok(()),
                    other => Ok(other?),
                }
            }
            Op::Upsert => {
                let incoming = env.record.clone().unwrap_or_default();
                self.check_fields(kind, &incoming)?;
                match &current {
                    None if known > 0 => {
                        return Err(Outcome::Refused(format!(
                            "the {kind} {id} was deleted at the main; a delete at the main wins over a later edit elsewhere"
                        )));
                    }
                    None => {
                        // A new record: this remote's users must be able to see it.
                        let probe = if kind == Kind::Contact { subscription_probe(&defs, id) } else { defs.clone() };
                        if !self.held_by(&probe, kind, id, &incoming)? {
                            return Err(Outcome::Refused(format!(
                                "remote {remote}'s users could not access the new {kind} {id}, so it cannot be created there"
                            )));
                        }
                    }
                    Some(_) if !held => return Err(not_held(remote, kind, id)),
                    Some(_) => {}
                }
                let existed = current.is_some();
                self.commit_from(remote, kind, id, |cur| match cur {
                    None if existed => Err(ServiceError::Conflict(format!(
                        "the {kind} {id} was deleted at the main while the edit was merged; the delete wins"
                    ))),
                    None => Ok(Decision::Upsert(incoming.clone())),
                    Some(cur) => {
                        Ok(model::merge(kind, &cur.fields, &incoming).map_or(Decision::Unchanged, Decision::Upsert))
                    }
                })
                .await?;
                if kind == Kind::Contact && !existed {
                    // Contacts made at a remote join its subscription list, so they never
                    // vanish from the place they were made.
                    let listed = model::names(&remote_record.fields, "subscriptions").contains(&id.to_owned());
                    if !listed && let Err(e) = self.add_subscription(remote, id).await {
                        tracing::warn!(remote, id, "a contact made at the remote could not join its list: {e}");
                    }
                }
                Ok(())
            }
            Op::Leave | Op::Reject => Err(Outcome::Refused(format!("a remote cannot upload a {:?}", env.op))),
        }
    }

    /// Checks an uploaded record as the API checks a new one: known fields of the right types,
    /// required fields present, references to records the main holds.
    fn check_fields(&self, kind: Kind, fields: &Fields) -> Result<(), Outcome> {
        let body: serde_json::Map<String, serde_json::Value> =
            fields.iter().map(|(name, f)| (name.clone(), f.value.to_json())).collect();
        let input = model::parse_input(kind, &serde_json::Value::Object(body), true)
            .map_err(|e| Outcome::Refused(format!("the edit is not a valid {kind}: {e}")))?;
        self.check_refs(kind, &input.patch)?;
        Ok(())
    }

    /// A remote's record and its two targets (its set and its subscription list), built from
    /// what they depend on alone.
    fn remote_defs(&self, remote: &str) -> Result<Option<(Stored, Vec<TargetDef>)>, ServiceError> {
        let store = &self.inner.store;
        let Some(record) = store.get(Kind::Remote, remote)? else { return Ok(None) };
        let mut config = RoutingConfig::default();
        config.apply(Kind::Remote, remote, Some(&record));
        let set = model::text(&record.fields, "set").unwrap_or_default();
        if let Some(set_record) = store.get(Kind::Set, set)? {
            for user in SetSpec::from_stored(&set_record).users {
                if let Some(u) = store.get(Kind::User, &user)? {
                    config.apply(Kind::User, &user, Some(&u));
                }
            }
            config.apply(Kind::Set, set, Some(&set_record));
        }
        Ok(Some((record, config.target_defs())))
    }

    /// Whether any of `defs` holds the record; a child is held with its contact.
    fn held_by(&self, defs: &[TargetDef], kind: Kind, id: &str, fields: &Fields) -> Result<bool, ServiceError> {
        let basis = match kind.parent_field() {
            Some(field) => {
                let Some(parent) = model::text(fields, field) else { return Ok(false) };
                match self.inner.store.get(Kind::Contact, parent)? {
                    Some(p) => (Kind::Contact, parent.to_owned(), p.fields),
                    None => return Ok(false),
                }
            }
            None => (kind, id.to_owned(), fields.clone()),
        };
        Ok(defs.iter().any(|d| d.holds(basis.0, &basis.1, &basis.2)))
    }

    async fn add_subscription(&self, remote: &str, contact: &str) -> Result<Vec<String>, ServiceError> {
        let contact = contact.to_owned();
        self.change_subscriptions(remote, move |list| {
            if !list.contains(&contact) {
                list.push(contact.clone());
            }
            Ok(())
        })
        .await
    }

    fn log_refusal(&self, remote: &str, env: Option<&Envelope>, reason: String) -> Result<(), ServiceError> {
        if env.is_none() {
            tracing::error!(remote, "refused an upload: {reason}");
        }
        let entry = LogEntry {
            at_ms: crate::hlc::wall_ms(),
            remote: remote.to_owned(),
            kind: env.map_or(Kind::Contact, |e| e.kind),
            id: env.map(|e| e.id.clone()).unwrap_or_default(),
            event: env.map(|e| e.event.clone()).unwrap_or_default(),
            reason,
            edit: env.and_then(|e| e.record.clone()),
        };
        self.inner.store.write(true, |t| t.log(&entry))?;
        Ok(())
    }
}

/// The remote's subscription list as it will be once a new contact joins it.
fn subscription_probe(defs: &[TargetDef], id: &str) -> Vec<TargetDef> {
    let mut probe: Vec<TargetDef> =
        defs.iter().filter(|d| matches!(d.target, Target::Subscriptions(_))).cloned().collect();
    for def in &mut probe {
        def.listed = Some([id.to_owned()].into());
    }
    probe
}

fn not_held(remote: &str, kind: Kind, id: &str) -> Outcome {
    Outcome::Refused(format!(
        "the {kind} {id} is not in remote {remote}'s set or subscription list (its users cannot access it, or it left the set)"
    ))
}
