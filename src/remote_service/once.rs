//! One sync session, for `crmsync remote sync --once`: upload what waits, wait for the main's
//! answer to it, catch up to the head of the remote's set, and stop.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use super::Remote;
use crate::model::Kind;
use crate::wire::Envelope;

/// What one sync session did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SyncSummary {
    /// Records written or removed here from what the main sent.
    pub received: u64,
    /// Edits made here that reached `CRM_UP`.
    pub sent: u64,
    /// Of them, those the main refused (each is in the sync log, with why).
    pub refused: u64,
    /// Sent edits whose merged state had not come back when the session ended: they are in
    /// `CRM_UP`, and the next sync brings them.
    pub unanswered: u64,
    pub seconds: f64,
}

/// Limits of a sync session.
#[derive(Debug, Clone, Copy)]
pub struct SessionLimits {
    /// The whole session, NATS unreachable included; past it the session fails.
    pub timeout: Duration,
    /// How long to wait for the main's answer to the edits sent, once they are sent.
    pub answers: Duration,
}

/// An edit sent in this session, and how to tell it was answered.
struct Sent {
    kind: Kind,
    id: String,
    /// The version of the record the edit was made against.
    version: u64,
    event: String,
}

impl Remote {
    /// Runs one sync session on a started remote, then stops it. `Err` says why the session
    /// could not complete (nothing is lost: edits stay queued, and what was applied stays).
    pub async fn sync_once(&self, limits: SessionLimits) -> Result<SyncSummary, String> {
        self.inner.start_session_now();
        let mut result = self.session(limits).await;
        if result.is_ok()
            && let Err(e) = self.inner.finish_once(Duration::from_secs(5)).await
        {
            result = Err(format!("the session completed but could not be logged: {e}"));
        }
        self.stop().await;
        result
    }

    async fn session(&self, limits: SessionLimits) -> Result<SyncSummary, String> {
        let started = Instant::now();
        let store = &self.inner.store;
        let fail = |e: &dyn std::fmt::Display| e.to_string();
        let sent = self.waiting_edits()?;
        let refused_before = store.sync_log(0).map_err(|e| fail(&e))?.0;
        let received_before = self.state().received;
        let mut uploaded_at: Option<Instant> = None;
        loop {
            if let Some(why) = self.state().error {
                return Err(format!("sync stopped: {why}"));
            }
            if let Some(expired) = self.inner.expired() {
                return Err(match expired.export {
                    Some(file) => {
                        format!("{}; the edits made here and not uploaded are in {}", expired.notice, file.display())
                    }
                    None => expired.notice,
                });
            }
            if started.elapsed() > limits.timeout {
                return Err(self.timed_out(limits.timeout));
            }
            let uploaded = store.uploads_len().map_err(|e| fail(&e))? == 0;
            if uploaded && uploaded_at.is_none() {
                uploaded_at = Some(Instant::now());
            }
            let unanswered = self.unanswered(&sent, refused_before)?;
            let answers_done = unanswered == 0 || uploaded_at.is_some_and(|at| at.elapsed() > limits.answers);
            let caught_up = self.inner.nats.is_connected()
                && self.inner.nats.remote_backlog(&self.inner.bundle.consumer).await.ok() == Some(0);
            if uploaded && answers_done && caught_up {
                let refused = store.sync_log(0).map_err(|e| fail(&e))?.0.saturating_sub(refused_before);
                return Ok(SyncSummary {
                    received: self.state().received.saturating_sub(received_before),
                    sent: sent.len() as u64,
                    refused,
                    unanswered,
                    seconds: started.elapsed().as_secs_f64(),
                });
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The edits waiting for upload now: what this session sends.
    fn waiting_edits(&self) -> Result<Vec<Sent>, String> {
        let uploads = self.inner.store.uploads_head(usize::MAX).map_err(|e| e.to_string())?;
        Ok(uploads
            .into_iter()
            .filter_map(|(_, upload)| Envelope::decode(&upload.payload).ok())
            .map(|env| Sent { kind: env.kind, id: env.id, version: env.version, event: env.event })
            .collect())
    }

    /// How many sent edits the main has not answered yet: answered is a newer version of the
    /// record from the main (its merge), the record gone (a delete merged), or a refusal.
    fn unanswered(&self, sent: &[Sent], refused_before: u64) -> Result<u64, String> {
        let store = &self.inner.store;
        let (total, log) = store.sync_log(usize::MAX).map_err(|e| e.to_string())?;
        let refused: BTreeSet<&str> = log
            .iter()
            .rev()
            .take(total.saturating_sub(refused_before) as usize)
            .map(|(_, e)| e.event.as_str())
            .collect();
        let mut left = 0;
        for edit in sent {
            let answered = refused.contains(edit.event.as_str())
                || match store.get(edit.kind, &edit.id).map_err(|e| e.to_string())? {
                    Some(record) => record.version > edit.version,
                    // Gone: deleted here, answered once the main's delete (or refusal) came.
                    None => !store.deleted_here(edit.kind, &edit.id).map_err(|e| e.to_string())?,
                };
            left += u64::from(!answered);
        }
        Ok(left)
    }

    fn timed_out(&self, timeout: Duration) -> String {
        if self.inner.nats.is_connected() {
            format!("the session did not complete within {} s; run it again to go on", timeout.as_secs())
        } else {
            format!(
                "NATS at {} could not be reached within {} s; the edits made here stay queued for the next sync",
                self.inner.nats_url,
                timeout.as_secs()
            )
        }
    }
}
