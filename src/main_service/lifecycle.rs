//! Each remote's sync sessions and expiry, at the main.
//!
//! A remote reports each sync session it completes on `CRM_UP` (see
//! [`crate::wire::SessionReport`]); the merger hands the report here. A session that moved
//! something is a line of the main's sessions log, and every report (an idle remote sends one
//! at least hourly) is the remote's last sync. A remote that goes its `expires_days` without
//! one expires: its consumer is paused and marked expired (it receives nothing, and reads why),
//! its record says when (its uploads are refused from then on, each kept in the sync log), and
//! only `remote recreate` brings it back, as a new copy.

use std::time::Duration;

use tokio::sync::watch;

use super::{Decision, Main};
use crate::error::ServiceError;
use crate::lifecycle::{expires_ms, is_expired};
use crate::model::{self, Fields, Kind, Value};
use crate::store::last_sync_key;
use crate::transport::Uploaded;
use crate::wire::{self, SessionReport};

impl Main {
    /// Takes in a remote's report of a sync session.
    pub(super) fn record_session(&self, upload: &Uploaded) -> Result<(), ServiceError> {
        let remote = wire::up_remote(&upload.subject).unwrap_or_default();
        let report = match SessionReport::decode_checked(&upload.payload, &self.inner.database_id, remote) {
            Ok(report) => report,
            Err(why) => {
                tracing::warn!(remote, "ignored a session report: {why}");
                return Ok(());
            }
        };
        let Some(record) = self.inner.store.get(Kind::Remote, remote)? else {
            tracing::warn!(remote, "ignored a session report of a remote this main does not have");
            return Ok(());
        };
        let created_ms = model::int(&record.fields, "created_ms").map(|ms| ms as u64);
        if upload.bundle_created_ms.is_some_and(|theirs| Some(theirs) != created_ms) {
            tracing::warn!(remote, "ignored a session report of a copy set up from a bundle re-created since");
            return Ok(());
        }
        if model::remote_expired(&record.fields).is_some() {
            tracing::warn!(remote, "ignored a session report of an expired remote");
            return Ok(());
        }
        let now = self.inner.config.clock.now_ms();
        self.inner.store.write(true, |t| {
            if !report.is_empty() {
                t.log_session(&report)?;
            }
            t.set_meta(&last_sync_key(remote), now)
        })?;
        Ok(())
    }

    /// When a remote last synced, as far as the main heard: its last session report, or its
    /// creation (a re-created remote counts from its new creation).
    pub fn last_sync_ms(&self, name: &str, fields: &Fields) -> Result<u64, ServiceError> {
        let created_ms = model::int(fields, "created_ms").unwrap_or(0).max(0) as u64;
        let reported = self.inner.store.meta_opt(&last_sync_key(name))?.unwrap_or(0);
        Ok(reported.max(created_ms))
    }

    /// When a remote expires (or expired) if it does not sync before.
    pub fn expires_ms(&self, name: &str, fields: &Fields) -> Result<u64, ServiceError> {
        let days = model::int(fields, "expires_days").unwrap_or(i64::from(crate::lifecycle::DEFAULT_EXPIRES_DAYS));
        Ok(expires_ms(self.last_sync_ms(name, fields)?, days.clamp(0, i64::from(u32::MAX)) as u32))
    }

    /// The newest `limit` sync sessions of `remote` (of every remote if `None`), oldest first.
    pub fn sessions(&self, remote: Option<&str>, limit: usize) -> Result<Vec<SessionReport>, ServiceError> {
        if let Some(name) = remote {
            self.consumer_of(name)?;
        }
        Ok(self.inner.store.sessions(remote, limit)?)
    }

    /// Expires every remote whose time is up; returns their names.
    pub async fn expire_due(&self) -> Result<Vec<String>, ServiceError> {
        let mut due = Vec::new();
        let now = self.inner.config.clock.now_ms();
        let mut failed = None;
        self.inner.store.for_each(Kind::Remote, |name, record| {
            if model::remote_expired(&record.fields).is_some() {
                return;
            }
            let days = model::int(&record.fields, "expires_days").unwrap_or(30).clamp(0, 90) as u32;
            match self.last_sync_ms(name, &record.fields) {
                Ok(last) if is_expired(last, days, now) => due.push((name.to_owned(), expires_ms(last, days))),
                Ok(_) => {}
                Err(e) => failed = Some(e),
            }
        })?;
        if let Some(e) = failed {
            return Err(e);
        }
        if due.is_empty() {
            return Ok(Vec::new());
        }
        // Reports waiting in CRM_UP are syncs the main has not taken in yet (it is not
        // accepting syncs, or has just started): nobody expires for want of them.
        if !self.inner.nats.accepting_uploads().await? {
            tracing::info!("not expiring remotes while synchronizations are not accepted");
            return Ok(Vec::new());
        }
        let mut expired = Vec::new();
        for (name, on_ms) in due {
            if self.inner.nats.reports_waiting_from(&name).await? > 0 {
                continue;
            }
            self.expire(&name, on_ms).await?;
            expired.push(name);
        }
        Ok(expired)
    }

    /// Expires a remote: its consumer first (from then on it receives nothing, and reads why),
    /// then its record (from then on its uploads are refused).
    async fn expire(&self, name: &str, on_ms: u64) -> Result<(), ServiceError> {
        self.inner.nats.expire_remote_consumer(&self.consumer_of(name)?, on_ms).await?;
        let stamp = self.inner.clock.now();
        let record = self
            .commit(Kind::Remote, name, |current| {
                let Some(current) = current else { return Ok(Decision::Unchanged) };
                let mut fields = current.fields.clone();
                crate::merge::apply_patch(&mut fields, &vec![("expired_ms".into(), Value::Int(on_ms as i64))], stamp);
                Ok(Decision::Upsert(fields))
            })
            .await?;
        if let Some(record) = record {
            self.revoke_creds(&record.fields).await?;
        }
        tracing::warn!(remote = name, "expired: it did not sync before {}", crate::date::utc_day(on_ms));
        Ok(())
    }
}

/// Looks for expired remotes every `every`, until shutdown.
pub(super) async fn run_expiry(main: Main, every: Duration, mut shutdown: watch::Receiver<bool>) {
    loop {
        if let Err(e) = main.expire_due().await {
            tracing::error!("cannot expire remotes now: {e}");
        }
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = crate::supervise::shut_down(&mut shutdown) => return,
        }
    }
}
