//! Administering remotes at the main: halt, resume, delete. Each is a change to the remote's
//! record (an event, so a rebuilt main knows it) and an action on the remote's consumer.
//!
//! - **Halt**: the remote's consumer is paused (NATS delivers nothing to it, at once, without a
//!   server restart), its NATS credentials (if this main issues them) are revoked, so its
//!   connection closes and its edits wait at the remote, and the merger keeps the uploads that
//!   reached `CRM_UP`, durably and in order, instead of merging them.
//! - **Resume**: the credentials are accepted again, the consumer delivers again from where
//!   the remote stands, and the merger merges the uploads it kept, in order, before any that
//!   come after.
//! - **Accept syncs off/on**: the merger's consumer is paused or resumed; uploads wait in
//!   `CRM_UP` meanwhile.
//! - **Re-create**: a new bundle and a new consumer for the same name and set; the copy set up
//!   from the old bundle can no longer pull, and its uploads are refused.
//! - **Delete**: the consumer, the subjects of the remote's subscription list and its record
//!   go; its bundle no longer syncs, and uploads still coming from it are refused.

use super::{Decision, Main};
use crate::bundle::{Bundle, consumer_of, recreated_consumer_name};
use crate::error::ServiceError;
use crate::model::{self, Kind, Record, Value};
use crate::wire::Target;

impl Main {
    /// Halts a remote: it receives nothing, and its uploads wait at the main.
    pub async fn halt_remote(&self, name: &str) -> Result<Record, ServiceError> {
        let record = self.set_halted(name, true).await?;
        self.inner.nats.pause_remote_consumer(&consumer_of(name, &record.fields)).await?;
        self.revise_creds(&record.fields, true).await?;
        tracing::info!(remote = name, "halted");
        Ok(record)
    }

    /// Resumes a halted remote: what waited for it, both ways, flows again.
    pub async fn resume_remote(&self, name: &str) -> Result<Record, ServiceError> {
        if let Some(record) = self.inner.store.get(Kind::Remote, name)?
            && let Some(on) = model::remote_expired(&record.fields)
        {
            return Err(ServiceError::Conflict(format!(
                "remote {name} expired on {} (UTC) and cannot be resumed; re-create it with `crmsync remote recreate {name}`",
                crate::date::utc_day(on)
            )));
        }
        let record = self.set_halted(name, false).await?;
        self.inner.nats.resume_remote_consumer(&consumer_of(name, &record.fields)).await?;
        self.revise_creds(&record.fields, false).await?;
        self.inner.resumed.send_modify(|n| *n += 1);
        tracing::info!(remote = name, "resumed");
        Ok(record)
    }

    /// Deletes a remote: its consumer, its subscription list's subjects and its record.
    pub async fn delete_remote(&self, name: &str) -> Result<(), ServiceError> {
        crate::names::check("remote name", name)?;
        let consumer = self.consumer_of(name)?;
        // The consumer first: from here on the remote receives nothing, whatever follows.
        self.inner.nats.delete_remote_consumer(&consumer).await?;
        if let Some(record) = self.inner.store.get(Kind::Remote, name)? {
            self.revoke_creds(&record.fields).await?;
        }
        self.commit(Kind::Remote, name, |current| match current {
            Some(_) => Ok(Decision::Delete),
            None => Err(ServiceError::NotFound { kind: Kind::Remote, id: name.to_owned() }),
        })
        .await?;
        self.inner.nats.purge_target(&Target::Subscriptions(name.to_owned())).await?;
        tracing::info!(remote = name, "deleted");
        Ok(())
    }

    /// Starts (`true`) or stops (`false`) merging what remotes upload; while stopped, uploads
    /// wait in `CRM_UP`. The server keeps the setting, across restarts of the main.
    pub async fn accept_syncs(&self, accept: bool) -> Result<bool, ServiceError> {
        self.inner.nats.accept_uploads(accept).await?;
        tracing::info!("{} synchronizations", if accept { "accepting" } else { "no longer accepting" });
        Ok(self.inner.nats.accepting_uploads().await?)
    }

    /// Re-creates a remote: a new bundle for the same name, set and subscription list, with a
    /// new consumer that starts from the beginning of its set. The copy set up from the old
    /// bundle can no longer pull (its consumer is gone), and its uploads are refused.
    pub async fn recreate_remote(&self, name: &str) -> Result<Bundle, ServiceError> {
        let old = self.consumer_of(name)?;
        let record = self.inner.store.get(Kind::Remote, name)?.expect("consumer_of found the record");
        let set = model::text(&record.fields, "set").unwrap_or_default().to_owned();
        // A new generation: its own creation time (never the old one's, even within a
        // millisecond), and a consumer named after it.
        let old_ms = model::int(&record.fields, "created_ms").unwrap_or(0) as u64;
        let created_ms = self.inner.config.clock.now_ms().max(old_ms + 1);
        let consumer = recreated_consumer_name(name, created_ms);
        self.inner.nats.create_remote_consumer(&consumer, crate::wire::remote_filters(&set, name)).await?;
        self.inner.nats.delete_remote_consumer(&old).await?;
        self.revoke_creds(&record.fields).await?;
        let creds = self.issue_creds(name, &consumer, &set)?;
        let stamp = self.inner.clock.now();
        self.commit(Kind::Remote, name, |current| {
            let current = current.ok_or_else(|| ServiceError::NotFound { kind: Kind::Remote, id: name.to_owned() })?;
            let mut fields = current.fields.clone();
            let patch = vec![
                ("created_ms".to_owned(), Value::Int(created_ms as i64)),
                ("consumer".to_owned(), Value::Str(consumer.clone())),
                ("enabled".to_owned(), Value::Bool(true)),
                ("expired_ms".to_owned(), Value::Null),
                (
                    super::credentials::NATS_USER.to_owned(),
                    creds.as_ref().map_or(Value::Null, |(_, u)| Value::Str(u.clone())),
                ),
            ];
            crate::merge::apply_patch(&mut fields, &patch, stamp);
            Ok(Decision::Upsert(fields))
        })
        .await?;
        tracing::info!(remote = name, consumer, "re-created");
        let (users, nats_ca) = (self.users()?, self.nats_ca()?);
        Ok(Bundle { creds: creds.map(|(creds, _)| creds), users, nats_ca, ..self.bundle(name)? })
    }

    /// The consumer of a remote, as its record names it.
    pub(super) fn consumer_of(&self, name: &str) -> Result<String, ServiceError> {
        crate::names::check("remote name", name)?;
        let record = self
            .inner
            .store
            .get(Kind::Remote, name)?
            .ok_or_else(|| ServiceError::NotFound { kind: Kind::Remote, id: name.to_owned() })?;
        Ok(consumer_of(name, &record.fields))
    }

    async fn set_halted(&self, name: &str, halted: bool) -> Result<Record, ServiceError> {
        crate::names::check("remote name", name)?;
        let stamp = self.inner.clock.now();
        let record = self
            .commit(Kind::Remote, name, |current| {
                let current =
                    current.ok_or_else(|| ServiceError::NotFound { kind: Kind::Remote, id: name.to_owned() })?;
                if model::remote_halted(&current.fields) == halted {
                    return Ok(Decision::Unchanged);
                }
                let mut fields = current.fields.clone();
                crate::merge::apply_patch(&mut fields, &vec![("enabled".into(), Value::Bool(!halted))], stamp);
                Ok(Decision::Upsert(fields))
            })
            .await?;
        record.ok_or_else(|| ServiceError::NotFound { kind: Kind::Remote, id: name.to_owned() })
    }
}
