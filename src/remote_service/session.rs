//! Sync sessions at a remote: when it syncs (its mode), what each session did (its sessions
//! log, and a report to the main), and when it may no longer sync (expiry).
//!
//! A session starts when the remote begins to sync (at start, at a scheduled time, or when a
//! change moves after a quiet spell) and ends once the remote has caught up: nothing left to
//! pull, nothing waiting for upload. Its report goes to the main, which counts it as the
//! remote's last sync; an idle remote in continuous mode reports an empty session at least every
//! [`HEARTBEAT`], so the main knows it is alive. In a scheduled mode the remote pulls and uploads
//! only during a session: the gate ([`Inner::gate`]) opens at the scheduled time and closes
//! when the session ends.
//!
//! A remote expires when it goes its `expires_days` without a session, by its own clock (it
//! knows offline) or because the main says so (its consumer carries the date). It then neither
//! pulls nor uploads nor takes edits; it writes the edits it could not upload to a JSON Lines
//! file beside its store, and says so in plain words.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use super::Inner;
use crate::lifecycle::{expired_notice, expires_ms, is_expired};
use crate::schedule::Schedule;
use crate::store::{LAST_SYNC, StoreError};
use crate::wire::{Envelope, PRODUCT, SCHEMA_MAJOR, SessionReport};

/// How often the remote looks at where its session stands.
const TICK: Duration = Duration::from_millis(200);
/// The shortest session in continuous mode, after the first: changes that trickle in make one
/// line of the log a minute at most, not one each.
const CONTINUOUS_SESSION: Duration = Duration::from_secs(60);
/// An idle remote reports a session at least this often, so the main knows it syncs.
pub const HEARTBEAT: Duration = Duration::from_secs(3600);
/// Meta keys: when the main expired this remote, and the file its unsent edits went to.
const EXPIRED: &str = "expired_ms";
const EXPORT: &str = "expired_export";

/// How a remote syncs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Mode {
    /// All the time, or at the times of a schedule.
    #[default]
    Continuous,
    Scheduled(Schedule),
    /// One session, for `remote sync --once`: it ends when the command says.
    Once,
}

impl Mode {
    pub fn of(schedule: Schedule) -> Mode {
        if schedule.is_continuous() { Mode::Continuous } else { Mode::Scheduled(schedule) }
    }

    pub fn name(&self) -> String {
        match self {
            Mode::Continuous => "continuous".into(),
            Mode::Scheduled(schedule) => schedule.to_string(),
            Mode::Once => "once".into(),
        }
    }
}

/// The counters a session's report is the difference of.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct Counters {
    pub received: u64,
    pub sent: u64,
    pub refused: u64,
    pub conflicts: u64,
}

/// Why a remote no longer syncs.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Expired {
    pub on_ms: u64,
    pub notice: String,
    /// The JSON Lines file its unsent edits were written to, if there were any.
    pub export: Option<PathBuf>,
}

/// Where the remote's sessions stand.
#[derive(Debug, Default)]
pub(super) struct Sessions {
    /// The session in progress: when it started and the counters then.
    open: Option<(u64, Counters)>,
    /// The counters when the last session ended.
    closed: Counters,
    /// When the last report was made (0: none since start, so the first session is logged).
    last_report_ms: u64,
    /// When the main was last asked about this remote's consumer.
    last_check_ms: u64,
    /// Reports not yet accepted by `CRM_UP`.
    unsent: Vec<SessionReport>,
    /// The next scheduled session, in a scheduled mode.
    pub next_ms: Option<u64>,
}

impl Sessions {
    /// Sessions of a remote whose sync log holds `refused` refusals so far.
    pub(super) fn new(refused: u64) -> Sessions {
        Sessions { closed: Counters { refused, ..Counters::default() }, ..Sessions::default() }
    }
}

impl Inner {
    fn counters(&self) -> Result<Counters, StoreError> {
        let state = self.state.lock().unwrap();
        let (received, sent, conflicts) = (state.received, state.sent, state.conflicts);
        drop(state);
        Ok(Counters { received, sent, conflicts, refused: self.store.sync_log(0)?.0 })
    }

    /// When this remote last completed a session (its creation, before any).
    pub(super) fn last_sync_ms(&self) -> Result<u64, StoreError> {
        Ok(self.store.meta_opt(LAST_SYNC)?.unwrap_or(0).max(self.bundle.created_ms))
    }

    /// Why this remote no longer syncs, if it expired.
    pub(super) fn expired(&self) -> Option<Expired> {
        self.state.lock().unwrap().expired.clone()
    }

    /// Reads, at start, whether the main expired this remote before.
    pub(super) fn load_expiry(&self) -> Result<(), StoreError> {
        if let Some(on_ms) = self.store.meta_opt(EXPIRED)? {
            let export = self.store.meta_str(EXPORT)?.map(PathBuf::from);
            self.state.lock().unwrap().expired = Some(Expired { on_ms, notice: expired_notice(on_ms), export });
            self.gate.send_replace(false);
        }
        Ok(())
    }

    /// Stops syncing for good: the remote expired on `on_ms`. Its unsent edits go to a file.
    fn expire(&self, on_ms: u64) -> Result<(), String> {
        if self.expired().is_some() {
            return Ok(());
        }
        self.gate.send_replace(false);
        let export = self.export_unsent(on_ms).map_err(|e| format!("writing the unsent edits: {e}"))?;
        self.store
            .write(true, |t| {
                t.set_meta(EXPIRED, on_ms)?;
                match &export {
                    Some(path) => t.set_meta_str(EXPORT, &path.display().to_string()),
                    None => Ok(()),
                }
            })
            .map_err(|e| e.to_string())?;
        let notice = expired_notice(on_ms);
        match &export {
            Some(path) => tracing::error!("{notice}; the edits made here and not uploaded are in {}", path.display()),
            None => tracing::error!("{notice}; every edit made here had been uploaded"),
        }
        self.state.lock().unwrap().expired = Some(Expired { on_ms, notice, export });
        Ok(())
    }

    /// Writes the edits waiting for upload to `unsent-edits-<on_ms>.jsonl` beside the store, one
    /// per line, oldest first; `None` when none wait. They also stay in the queue.
    fn export_unsent(&self, on_ms: u64) -> anyhow::Result<Option<PathBuf>> {
        let uploads = self.store.uploads_head(usize::MAX)?;
        if uploads.is_empty() {
            return Ok(None);
        }
        let mut lines = Vec::new();
        for (n, upload) in &uploads {
            let line = match Envelope::decode(&upload.payload) {
                Ok(env) => serde_json::json!({
                    "queue_entry": n,
                    "event": env.event,
                    "kind": env.kind,
                    "id": env.id,
                    "op": env.op,
                    "made_against_version": env.version,
                    "record": env.record.as_ref().map(|f| crate::model::to_json(&env.id, env.version, f)),
                }),
                Err(e) => {
                    serde_json::json!({ "queue_entry": n, "subject": upload.subject, "unreadable": e.to_string() })
                }
            };
            serde_json::to_writer(&mut lines, &line)?;
            lines.push(b'\n');
        }
        let path = self.data_dir.join(format!("unsent-edits-{on_ms}.jsonl"));
        crate::files::write_private(&path, &lines)?;
        Ok(Some(path))
    }

    /// Ends the session in progress (or one just begun, if none is), logs it if it moved
    /// anything (or is the first since start) and queues its report for the main.
    pub(super) fn close_session(&self, sessions: &mut Sessions) -> Result<SessionReport, StoreError> {
        let now = self.wall.now_ms();
        let counters = self.counters()?;
        let (started_ms, before) = sessions.open.take().unwrap_or((now, sessions.closed));
        let report = SessionReport {
            product: PRODUCT.into(),
            schema: SCHEMA_MAJOR,
            db: self.bundle.database_id.clone(),
            remote: self.bundle.remote.clone(),
            id: crate::names::new_id(),
            started_ms,
            ended_ms: now,
            // Saturating: the refusals are counted in the store, where a full disk can roll
            // back the last moments of the projection.
            received: counters.received.saturating_sub(before.received),
            sent: counters.sent.saturating_sub(before.sent),
            refused: counters.refused.saturating_sub(before.refused),
            conflicts: counters.conflicts.saturating_sub(before.conflicts),
            mode: self.mode.name(),
        };
        let first = sessions.last_report_ms == 0;
        self.store.write(true, |t| {
            if first || !report.is_empty() {
                t.log_session(&report)?;
            }
            t.set_meta(LAST_SYNC, now)
        })?;
        sessions.closed = counters;
        sessions.last_report_ms = now;
        sessions.unsent.push(report.clone());
        Ok(report)
    }

    /// Starts a session now, whatever the mode (a rebuild asked for, `sync --once`).
    pub(super) fn start_session_now(&self) {
        let now = self.wall.now_ms();
        let mut sessions = self.sessions.lock().unwrap();
        if sessions.open.is_none() {
            sessions.open = Some((now, sessions.closed));
        }
        drop(sessions);
        if self.expired().is_none() {
            self.gate.send_replace(true);
        }
    }

    /// Ends the session `sync --once` ran, and reports it to the main (waiting at most
    /// `limit`: a report not sent is not needed for the next session).
    pub(super) async fn finish_once(&self, limit: Duration) -> Result<SessionReport, StoreError> {
        let report = self.close_session(&mut self.sessions.lock().unwrap())?;
        let _ = tokio::time::timeout(limit, self.send_reports()).await;
        Ok(report)
    }

    /// The sync mode and session as `status` shows them.
    pub(super) fn sync_json(&self) -> serde_json::Value {
        let sessions = self.sessions.lock().unwrap();
        serde_json::json!({
            "mode": self.mode.name(),
            "in_session": sessions.open.is_some(),
            "session_started_ms": sessions.open.map(|(started, _)| started),
            "next_ms": sessions.next_ms,
            "reports_waiting": sessions.unsent.len(),
        })
    }

    /// Sends the reports not yet sent; those that fail wait for the next try.
    pub(super) async fn send_reports(&self) {
        let unsent = std::mem::take(&mut self.sessions.lock().unwrap().unsent);
        let mut left = Vec::new();
        for report in unsent {
            if !left.is_empty() || self.nats.publish_report(&report, self.bundle.created_ms).await.is_err() {
                left.push(report);
            }
        }
        let mut sessions = self.sessions.lock().unwrap();
        left.append(&mut sessions.unsent);
        sessions.unsent = left;
    }

    /// Whether the remote has caught up: connected, nothing waiting for upload, nothing left
    /// to pull. Asks the main's consumer, which also says whether the main expired it.
    async fn caught_up(&self) -> Result<bool, String> {
        if !self.nats.is_connected() {
            return Ok(false);
        }
        let delivery = self.nats.remote_delivery(&self.bundle.consumer).await.map_err(|e| e.to_string())?;
        self.sessions.lock().unwrap().last_check_ms = self.wall.now_ms();
        if let Some(on_ms) = delivery.expired_ms {
            self.expire(on_ms)?;
            return Ok(false);
        }
        Ok(delivery.backlog == 0 && !delivery.halted && self.store.uploads_len().map_err(|e| e.to_string())? == 0)
    }

    /// One look at where the session stands: expire, open, close or report as due.
    async fn tick(&self) -> Result<(), String> {
        if self.expired().is_some() {
            return Ok(());
        }
        let now = self.wall.now_ms();
        let last_sync = self.last_sync_ms().map_err(|e| e.to_string())?;
        if is_expired(last_sync, self.bundle.expires_days, now) {
            return self.expire(expires_ms(last_sync, self.bundle.expires_days));
        }
        let counters = self.counters().map_err(|e| e.to_string())?;
        let (open, check) = self.open_if_due(now, last_sync, counters);
        if let Some((started_ms, _)) = open {
            self.tend_session(started_ms, now, check).await?;
        } else if check && self.nats.is_connected() {
            // Idle: the main may have expired this remote meanwhile.
            self.caught_up().await?;
        }
        self.send_reports().await;
        Ok(())
    }

    /// Opens a session when one is due; returns the open session (its start and the counters
    /// then) and whether it is time to ask NATS whatever.
    fn open_if_due(&self, now: u64, last_sync: u64, counters: Counters) -> (Option<(u64, Counters)>, bool) {
        let mut sessions = self.sessions.lock().unwrap();
        let since_report = now.saturating_sub(sessions.last_report_ms);
        let check = now.saturating_sub(sessions.last_check_ms) >= self.check_every.as_millis() as u64;
        let due = match self.mode {
            Mode::Scheduled(schedule) => {
                // Counted from the last sync: a time missed while the remote was off (a laptop
                // closed at 03:00) is a session due at once.
                let next = *sessions.next_ms.get_or_insert_with(|| schedule.next_after(last_sync).unwrap_or(u64::MAX));
                now >= next
            }
            Mode::Continuous => counters != sessions.closed || since_report >= HEARTBEAT.as_millis() as u64,
            Mode::Once => true,
        };
        if sessions.open.is_none() && due {
            sessions.open = Some((now, sessions.closed));
            if let Mode::Scheduled(schedule) = self.mode {
                sessions.next_ms = schedule.next_after(now);
            }
        }
        (sessions.open, check)
    }

    /// An open session: the gate opens, and the session closes once the remote has caught up
    /// (and, in continuous mode, has lasted long enough).
    async fn tend_session(&self, started_ms: u64, now: u64, check: bool) -> Result<(), String> {
        self.gate.send_replace(true);
        // In continuous mode changes trickle in: a session spans at least a minute of them
        // (the first, at start, ends as soon as the remote has caught up).
        let first = self.sessions.lock().unwrap().last_report_ms == 0;
        let long_enough = first || now.saturating_sub(started_ms) >= CONTINUOUS_SESSION.as_millis() as u64;
        let may_end = match self.mode {
            Mode::Continuous => long_enough,
            Mode::Scheduled(_) => true,
            // `sync --once` ends its session itself.
            Mode::Once => false,
        };
        // NATS is asked while the session may end and nothing here says it is still busy
        // (messages known to be pending, edits waiting), and now and then whatever (the main
        // may have expired this remote meanwhile): a busy remote asks every `check_every`, not
        // every tick.
        let busy = self.state.lock().unwrap().pending.is_some_and(|p| p > 0)
            || self.store.uploads_len().map_err(|e| e.to_string())? > 0;
        let caught_up = if (may_end && !busy) || check { self.caught_up().await? } else { false };
        if may_end && caught_up {
            let mut sessions = self.sessions.lock().unwrap();
            if sessions.open.is_some() {
                self.close_session(&mut sessions).map_err(|e| e.to_string())?;
                if matches!(self.mode, Mode::Scheduled(_)) {
                    self.gate.send_replace(false);
                }
            }
        }
        Ok(())
    }
}

/// Runs the sessions of a remote until shutdown.
pub(super) async fn run_sessions(inner: Arc<Inner>, mut shutdown: watch::Receiver<bool>) {
    loop {
        let tick = async {
            if let Err(e) = inner.tick().await {
                tracing::warn!("sync session: {e}");
            }
        };
        tokio::select! {
            () = tick => {}
            () = crate::supervise::shut_down(&mut shutdown) => return,
        }
        let next = inner.sessions.lock().unwrap().next_ms;
        tokio::select! {
            _ = tokio::time::sleep(TICK) => {}
            // A hand-set clock moved to the scheduled time wakes the session at once.
            () = inner.wall.sleep_until(next.unwrap_or(u64::MAX)), if next.is_some() => {}
            () = crate::supervise::shut_down(&mut shutdown) => return,
        }
    }
}
