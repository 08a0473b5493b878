//! Administering remotes at the main: halt, resume, delete. Each is a change to the remote's
//! record (an event, so a rebuilt main knows it) and an action on the remote's consumer.
//!
//! - **Halt**: the remote's consumer is paused (NATS delivers nothing to it, at once, without a
//!   server restart), and the merger keeps its uploads, durably and in order, instead of
//!   merging them.
//! - **Resume**: the consumer delivers again from where the remote stands, and the merger
//!   merges the uploads it kept, in order, before any that come after.
//! - **Accept syncs off/on**: the merger's consumer is paused or resumed; uploads wait in
//!   `CRM_UP` meanwhile.
//! - **Delete**: the consumer, the subjects of the remote's subscription list and its record
//!   go; its bundle no longer syncs, and uploads still coming from it are refused.

use super::{Decision, Main, consumer_name};
use crate::error::ServiceError;
use crate::model::{self, Kind, Record, Value};
use crate::wire::Target;

impl Main {
    /// Halts a remote: it receives nothing, and its uploads wait at the main.
    pub async fn halt_remote(&self, name: &str) -> Result<Record, ServiceError> {
        let record = self.set_halted(name, true).await?;
        self.inner.nats.pause_remote_consumer(&consumer_name(name)).await?;
        tracing::info!(remote = name, "halted");
        Ok(record)
    }

    /// Resumes a halted remote: what waited for it, both ways, flows again.
    pub async fn resume_remote(&self, name: &str) -> Result<Record, ServiceError> {
        let record = self.set_halted(name, false).await?;
        self.inner.nats.resume_remote_consumer(&consumer_name(name)).await?;
        self.inner.resumed.send_modify(|n| *n += 1);
        tracing::info!(remote = name, "resumed");
        Ok(record)
    }

    /// Deletes a remote: its consumer, its subscription list's subjects and its record.
    pub async fn delete_remote(&self, name: &str) -> Result<(), ServiceError> {
        crate::names::check("remote name", name)?;
        if self.inner.store.get(Kind::Remote, name)?.is_none() {
            return Err(ServiceError::NotFound { kind: Kind::Remote, id: name.to_owned() });
        }
        // The consumer first: from here on the remote receives nothing, whatever follows.
        self.inner.nats.delete_remote_consumer(&consumer_name(name)).await?;
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
