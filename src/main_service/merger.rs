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

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use tokio::sync::watch;

use super::{Decision, Main};
use crate::error::ServiceError;
use crate::model::{self, Fields, Kind, Value};
use crate::routing::{RoutingConfig, SetSpec, TargetDef};
use crate::store::{LogEntry, Stored};
use crate::transport;
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

/// Uploads taken off the queue at most at once.
const MERGE_BATCH: usize = 256;

async fn merge_loop(main: &Main, shutdown: &mut watch::Receiver<bool>) -> anyhow::Result<()> {
    let consumer = main.inner.nats.merger_consumer().await?;
    let mut messages = consumer
        .stream()
        .max_messages_per_batch(MERGE_BATCH)
        .heartbeat(Duration::from_secs(5))
        .expires(Duration::from_secs(30))
        .messages()
        .await?;
    let mut connections = main.inner.nats.connections.clone();
    connections.mark_unchanged();
    loop {
        let batch = tokio::select! {
            _ = shutdown.changed() => return Ok(()),
            _ = connections.changed() => anyhow::bail!("reconnected to NATS"),
            b = transport::next_batch(&mut messages, MERGE_BATCH) => b,
        };
        let batch = match batch {
            None => anyhow::bail!("the upload consumer ended"),
            Some(Err(e)) => anyhow::bail!("reading CRM_UP: {e}"),
            Some(Ok(batch)) => batch,
        };
        let mut start = 0;
        while start < batch.len() {
            let end = start + wave_len(&batch[start..]);
            merge_wave(main, &batch[start..end], &batch[end..]).await?;
            start = end;
        }
    }
}

/// How many uploads from the head of `batch` can be merged at once: uploads of different
/// records, and never a contact together with a note, history, activity or membership (which
/// may belong to it), so the order in which a remote made them still holds where it matters.
fn wave_len(batch: &[async_nats::jetstream::Message]) -> usize {
    let mut records = BTreeSet::new();
    let (mut contacts, mut children) = (false, false);
    for (n, msg) in batch.iter().enumerate() {
        let Some((kind, id)) = wire::subject_record(&msg.subject) else { return n.max(1) };
        let child = kind.parent_field().is_some();
        contacts |= kind == Kind::Contact;
        children |= child;
        if !records.insert((kind, id)) || (contacts && children) {
            return n.max(1);
        }
    }
    batch.len()
}

/// Merges a wave of uploads concurrently, adds the contacts created in it to their remotes'
/// lists, then acknowledges each. If one could not be decided, it and everything after it
/// (`rest`) go back to the queue, in order.
async fn merge_wave(
    main: &Main,
    wave: &[async_nats::jetstream::Message],
    rest: &[async_nats::jetstream::Message],
) -> anyhow::Result<()> {
    let results = futures::future::join_all(wave.iter().map(|m| main.merge_upload(&m.subject, &m.payload))).await;
    let mut created: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (remote, contact) in results.iter().filter_map(|r| r.as_ref().ok().cloned().flatten()) {
        created.entry(remote).or_default().push(contact);
    }
    for (remote, contacts) in created {
        // Contacts made at a remote join its subscription list, so they never vanish from the
        // place they were made.
        if let Err(e) = main.add_subscriptions(&remote, contacts).await {
            tracing::warn!(remote, "contacts made at the remote could not join its list: {e}");
        }
    }
    let mut failed = None;
    for (msg, result) in wave.iter().zip(results) {
        match (result, &failed) {
            (Ok(_), None) => {
                if let Err(e) = msg.ack().await {
                    // Merged; if the ack is lost the upload comes again and changes nothing.
                    tracing::warn!("acknowledging an upload failed: {e}");
                }
            }
            (Err(e), None) => failed = Some(format!("merging an upload from {}: {e}", msg.subject)),
            _ => {}
        }
    }
    if let Some(why) = failed {
        // NATS or the store failed: leave the uploads in the queue and try again, in order.
        for msg in wave.iter().chain(rest) {
            let _ = msg.ack_with(async_nats::jetstream::AckKind::Nak(Some(Duration::from_secs(1)))).await;
        }
        anyhow::bail!(why);
    }
    Ok(())
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
    /// Merges one upload. `Err` only when it could not be decided now and must come again;
    /// `Ok(Some((remote, contact)))` when it created a contact, which joins the remote's list.
    pub(super) async fn merge_upload(
        &self,
        subject: &str,
        payload: &[u8],
    ) -> Result<Option<(String, String)>, ServiceError> {
        let remote = wire::up_remote(subject).unwrap_or_default().to_owned();
        let env = match wire::decode_checked(payload, &self.inner.database_id) {
            Decoded::Ok(env) => env,
            Decoded::Foreign(f) => return self.log_refusal(&remote, None, f.to_string()).map(|_| None),
            Decoded::Malformed(e) => {
                let why = format!("the upload on {subject} does not decode: {e}");
                return self.log_refusal(&remote, None, why).map(|_| None);
            }
        };
        match self.merge_edit(&remote, &env).await {
            Ok(created) => Ok(created.then(|| (remote, env.id.clone()))),
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
                Ok(None)
            }
        }
    }

    /// Merges one edit; `Ok(true)` when it created a contact the remote's list does not hold.
    async fn merge_edit(&self, remote: &str, env: &Envelope) -> Result<bool, Outcome> {
        let (kind, id) = (env.kind, env.id.as_str());
        if env.origin != remote {
            return Err(Outcome::Refused(format!(
                "the edit says it comes from remote {:?} but was uploaded on remote {remote:?}'s subject",
                env.origin
            )));
        }
        if !kind.is_editable_at_remotes() {
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
                    return Ok(false); // already gone: nothing to do
                }
                if !held {
                    return Err(not_held(remote, kind, id));
                }
                match self.delete_from(remote, kind, id).await {
                    Err(ServiceError::NotFound { .. }) => Ok(false),
                    other => Ok(other.map(|_| false)?),
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
                let listed = model::names(&remote_record.fields, "subscriptions").contains(&id.to_owned());
                Ok(kind == Kind::Contact && !existed && !listed)
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

    async fn add_subscriptions(&self, remote: &str, contacts: Vec<String>) -> Result<Vec<String>, ServiceError> {
        self.change_subscriptions(remote, move |list| {
            for contact in &contacts {
                if !list.contains(contact) {
                    list.push(contact.clone());
                }
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
