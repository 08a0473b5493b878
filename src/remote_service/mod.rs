//! A remote: pulls its sync set from `CRM_SYNC` through the durable consumer the main created
//! for it, and keeps a redb projection that its own API reads while it syncs.
//!
//! Each batch is applied with its stream position in one durable transaction and only then
//! acknowledged (the consumer acknowledges all messages up to the one acked), so a crash at any
//! point redelivers at most what was not committed, and redelivery is harmless: an envelope
//! whose version is not newer than the one held is skipped.

mod edit;
mod once;
mod projector;
mod session;
pub use once::{SessionLimits, SyncSummary};
pub use session::{Expired, HEARTBEAT, Mode};

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use futures::FutureExt;

use tokio::sync::{Notify, mpsc, oneshot, watch};

use crate::apply::{HELD_BY_SET, HELD_BY_SUBSCRIPTION};
use crate::bundle::Bundle;
use crate::error::ServiceError;
use crate::hlc::Clock;
use crate::store::{APPLIED, DATABASE_ID, Store};
use crate::supervise::{Stop, shut_down, supervise};
use crate::transport::{Incoming, Nats, TransportError};
use crate::wall_clock::WallClock;
use crate::wire::{self, Decoded, Op, PRODUCT, SCHEMA_MAJOR, Target};

pub const SYNC_BATCH: usize = 4000;
/// How long a rebuild asked for waits for NATS before it is refused (a remote just started
/// connects within milliseconds; one cut off answers at once that it cannot rebuild).
const REBUILD_NATS_WAIT: std::time::Duration = std::time::Duration::from_secs(2);
const BUNDLE_FILE: &str = "remote.json";
const STORE_FILE: &str = "remote.redb";

/// Why a bundle file could not be read.
enum BundleFileError {
    Unreadable(std::io::Error),
    Malformed(serde_json::Error),
}

/// Reads a bundle file: the one place a remote reads a bundle, whether the file `remote create`
/// wrote or the copy `init` keeps in the data directory.
fn read_bundle_file(path: &Path) -> Result<Bundle, BundleFileError> {
    let text = std::fs::read_to_string(path).map_err(BundleFileError::Unreadable)?;
    Bundle::from_json(&text).map_err(BundleFileError::Malformed)
}

/// Sets up a remote's data directory from a bundle file.
pub fn init(bundle_file: &Path, data_dir: &Path) -> anyhow::Result<Bundle> {
    let bundle = read_bundle_file(bundle_file).map_err(|e| match e {
        BundleFileError::Unreadable(e) => anyhow::anyhow!("cannot read the bundle {}: {e}", bundle_file.display()),
        BundleFileError::Malformed(e) => anyhow::anyhow!(
            "{} is not a crmsync bundle ({e}); use the file `crmsync remote create` wrote",
            bundle_file.display()
        ),
    })?;
    bundle.check_version()?;
    let existing = data_dir.join(BUNDLE_FILE);
    if existing.exists() {
        match read_bundle_file(&existing) {
            Ok(old) if old.remote == bundle.remote && old.database_id == bundle.database_id => return Ok(old),
            _ => anyhow::bail!(
                "{} already holds a remote database; choose an empty directory for remote {}",
                data_dir.display(),
                bundle.remote
            ),
        }
    }
    crate::files::private_dir(data_dir)?;
    let store = Store::open(&data_dir.join(STORE_FILE))?;
    store.write(true, |t| {
        t.set_meta_str(DATABASE_ID, &bundle.database_id)?;
        seed_users(t, &bundle)?;
        t.set_meta_str("role", "remote")
    })?;
    crate::files::write_private(&existing, &serde_json::to_vec_pretty(&bundle)?)?;
    Ok(bundle)
}

/// The users of the bundle, where the store holds none of that id: so people can sign in before
/// the first sync, and during a rebuild. The stream brings their newest state (version 0 gives
/// way to any).
fn seed_users(t: &mut crate::store::Tables<'_>, bundle: &Bundle) -> Result<(), crate::store::StoreError> {
    for (id, fields) in &bundle.users {
        if t.get(crate::model::Kind::User, id)?.is_none() {
            let user = crate::model::Record { version: 0, holders: HELD_BY_SET, fields: fields.clone() };
            t.put(crate::model::Kind::User, id, &user)?;
        }
    }
    Ok(())
}

/// The NATS server's certificate authority the bundle carries, as a file beside the store (the
/// TLS client reads a file); `None` when NATS does not speak TLS.
fn nats_ca_file(data_dir: &Path, bundle: &Bundle) -> anyhow::Result<Option<PathBuf>> {
    let Some(pem) = &bundle.nats_ca else { return Ok(None) };
    let file = data_dir.join("nats-ca.pem");
    if std::fs::read_to_string(&file).ok().as_deref() != Some(pem.as_str()) {
        crate::files::write_private(&file, pem.as_bytes())?;
    }
    Ok(Some(file))
}

/// The bundle `init` kept in a remote's data directory.
pub fn read_bundle(data_dir: &Path) -> anyhow::Result<Bundle> {
    let path = data_dir.join(BUNDLE_FILE);
    read_bundle_file(&path).map_err(|e| match e {
        BundleFileError::Unreadable(e) => anyhow::anyhow!(
            "{} is not a remote's data directory ({}: {e}); set it up with `crmsync remote init --bundle FILE --data DIR`",
            data_dir.display(),
            path.display()
        ),
        BundleFileError::Malformed(e) => anyhow::anyhow!(
            "{} is not a readable remote bundle ({e}); set the directory up again with \
             `crmsync remote init --bundle FILE --data DIR` from the bundle `remote create` wrote",
            path.display()
        ),
    })
}

#[derive(Debug, Clone)]
pub struct RemoteConfig {
    pub data_dir: PathBuf,
    /// Overrides the NATS address in the bundle.
    pub nats_url: Option<String>,
    /// Most messages applied in one transaction ([`SYNC_BATCH`] unless tuned).
    pub batch: usize,
    /// When it syncs: continuously (the default), on a schedule, or once.
    pub mode: Mode,
    /// The clock of its schedule and its expiry.
    pub wall: WallClock,
    /// How often an idle remote asks whether the main expired it.
    pub check_every: std::time::Duration,
}

impl RemoteConfig {
    pub fn new(data_dir: PathBuf) -> RemoteConfig {
        RemoteConfig {
            data_dir,
            nats_url: None,
            batch: SYNC_BATCH,
            mode: Mode::Continuous,
            wall: WallClock::system(),
            check_every: EXPIRY_CHECK,
        }
    }
}

/// How often an idle remote asks the main's consumer whether it expired, unless configured.
pub const EXPIRY_CHECK: std::time::Duration = std::time::Duration::from_secs(10);

#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct SyncState {
    /// Why sync stopped, if it did.
    pub error: Option<String>,
    pub rebuilding: Option<Progress>,
    pub last_rebuild: Option<RebuildSummary>,
    /// Messages left in the consumer, as of the last message delivered.
    pub pending: Option<u64>,
    /// Why the last upload of local edits failed, until one succeeds.
    pub upload_error: Option<String>,
    /// Records written or removed from what the main sent, since the service started.
    pub received: u64,
    /// Edits made here that reached `CRM_UP`, since the service started.
    pub sent: u64,
    /// Changes from the main that met an edit made here not merged yet, since the service
    /// started.
    pub conflicts: u64,
    /// Why this remote no longer syncs, once it expired.
    pub expired: Option<Expired>,
}

#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct Progress {
    pub done: u64,
    pub total: u64,
}

#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct RebuildSummary {
    pub records: u64,
    pub seconds: f64,
}

#[derive(Clone)]
pub struct Remote {
    inner: Arc<Inner>,
}

struct Inner {
    store: Store,
    data_dir: PathBuf,
    bundle: Bundle,
    mode: Mode,
    wall: WallClock,
    check_every: std::time::Duration,
    /// Open while the remote may pull and upload: always in continuous mode, during a
    /// session in a scheduled one, never once expired.
    gate: watch::Sender<bool>,
    sessions: Mutex<session::Sessions>,
    nats: Nats,
    nats_url: String,
    batch: usize,
    state: Mutex<SyncState>,
    clock: Clock,
    /// This store's upload queue, as the main knows it: its id, and the number of the queue
    /// entry that is its upload 0.
    upload_queue: (String, u64),
    /// Why the last group of local edits could not be saved, for the callers waiting on it.
    write_error: Mutex<Option<crate::store::StoreError>>,
    /// Wakes the uploader when an edit is queued.
    upload_ready: Notify,
    /// Local edits on their way to the local writer.
    edits: mpsc::UnboundedSender<edit::Job>,
    rebuild_tx: mpsc::Sender<RebuildRequest>,
    shutdown: watch::Sender<bool>,
    /// Ends when sync stops, with the reason if it was an error.
    done: Mutex<Option<tokio::task::JoinHandle<Result<(), String>>>>,
    /// Makes the projection durable every [`crate::store::FLUSH_INTERVAL`], and at shutdown;
    /// and the uploader.
    helpers: Mutex<Vec<tokio::task::JoinHandle<()>>>,
}

/// Opens the remote's projection: a file of another layout is emptied and replayed, a
/// damaged one recovered.
fn open_projection(data_dir: &Path, bundle: &Bundle) -> anyhow::Result<Store> {
    let path = data_dir.join(STORE_FILE);
    Ok(match Store::open(&path) {
        Err(crate::store::StoreError::Format { found, .. }) => {
            // The projection is a copy of the stream: the pull loop starts from the emptied
            // position.
            tracing::warn!("{} has storage format {found}; rebuilding it from CRM_SYNC", path.display());
            let store = Store::open_any_format(&path)?;
            store.clear_projection(|t| seed_users(t, bundle))?;
            store
        }
        Err(crate::store::StoreError::Damaged { detail, .. }) => recover(data_dir, bundle, &detail)?,
        other => other?,
    })
}

/// How the remote signs in to NATS: the bundle's credentials and CA, and its own inbox prefix.
fn login(data_dir: &Path, bundle: &Bundle) -> anyhow::Result<crate::transport::Login> {
    Ok(crate::transport::Login {
        inbox_prefix: bundle.creds.as_ref().map(|_| crate::identity::inbox_prefix(&bundle.remote)).transpose()?,
        creds: bundle.creds.clone(),
        ca: nats_ca_file(data_dir, bundle)?,
    })
}

impl Remote {
    pub async fn start(config: RemoteConfig) -> anyhow::Result<Remote> {
        let bundle = read_bundle(&config.data_dir)?;
        let store = open_projection(&config.data_dir, &bundle)?;
        let upload_queue = upload_queue(&store)?;
        let nats_url = config.nats_url.clone().unwrap_or_else(|| bundle.nats_url.clone());
        // A remote works without NATS: it serves its copy and takes edits at once, and syncs
        // whenever NATS is reachable.
        let login = login(&config.data_dir, &bundle)?;
        let nats = Nats::connect_in_background(&nats_url, &format!("crmsync-remote-{}", bundle.remote), &login).await?;
        let (rebuild_tx, rebuild_rx) = mpsc::channel(4);
        let (edits, edit_rx) = mpsc::unbounded_channel();
        let (shutdown, shutdown_rx) = watch::channel(false);
        let refused = store.sync_log(0)?.0;
        let inner = Arc::new(Inner {
            store,
            data_dir: config.data_dir.clone(),
            bundle,
            mode: config.mode,
            wall: config.wall.clone(),
            check_every: config.check_every,
            gate: watch::channel(!matches!(config.mode, Mode::Scheduled(_))).0,
            sessions: Mutex::new(session::Sessions::new(refused)),
            nats,
            nats_url,
            batch: config.batch.max(1),
            state: Mutex::new(SyncState::default()),
            clock: Clock::new(),
            upload_queue,
            write_error: Mutex::new(None),
            upload_ready: Notify::new(),
            edits,
            rebuild_tx,
            shutdown,
            done: Mutex::new(None),
            helpers: Mutex::new(Vec::new()),
        });
        inner.load_expiry()?;
        let task = tokio::spawn(run_sync(inner.clone(), rebuild_rx, shutdown_rx.clone()));
        *inner.done.lock().unwrap() = Some(task);
        let flusher = tokio::spawn(inner.store.clone().flush_periodically(shutdown_rx.clone()));
        let uploader = tokio::spawn(edit::run_uploader(inner.clone(), shutdown_rx.clone()));
        let sessions = tokio::spawn(session::run_sessions(inner.clone(), shutdown_rx.clone()));
        let writer = tokio::spawn(edit::run_writer(inner.clone(), edit_rx, shutdown_rx));
        inner.helpers.lock().unwrap().extend([flusher, uploader, sessions, writer]);
        Ok(Remote { inner })
    }

    pub fn store(&self) -> &Store {
        &self.inner.store
    }

    pub fn bundle(&self) -> &Bundle {
        &self.inner.bundle
    }

    /// The NATS address this remote syncs through (its bundle's, unless overridden).
    pub fn nats_url(&self) -> &str {
        &self.inner.nats_url
    }

    pub fn state(&self) -> SyncState {
        self.inner.state.lock().unwrap().clone()
    }

    /// Waits until sync stops: `Err` carries the reason when it stopped on an error.
    pub async fn stopped(&self) -> Result<(), String> {
        let task = self.inner.done.lock().unwrap().take();
        match task {
            Some(task) => task.await.unwrap_or_else(|e| Err(e.to_string())),
            None => Ok(()),
        }
    }

    pub async fn stop(&self) {
        let _ = self.inner.shutdown.send(true);
        let _ = self.stopped().await;
        let helpers: Vec<_> = std::mem::take(&mut *self.inner.helpers.lock().unwrap());
        for task in helpers {
            let _ = task.await;
        }
    }

    /// Waits at most `limit` for NATS, for a command that cannot do its work without it.
    pub async fn wait_for_nats(&self, limit: std::time::Duration) -> Result<(), ServiceError> {
        let nats = &self.inner.nats;
        tokio::time::timeout(limit, nats.connected())
            .await
            .map_err(|_| ServiceError::Unavailable(TransportError::NotConnected { url: nats.url.clone() }))
    }

    /// Throws the projection away and replays the set from the start of `CRM_SYNC`. Returns
    /// the number of messages to replay; progress shows in [`Remote::state`]. Refused when NATS
    /// is not reachable within [`REBUILD_NATS_WAIT`]: the copy held here stays readable until
    /// the stream can replace it.
    pub async fn rebuild(&self) -> Result<u64, ServiceError> {
        if let Some(expired) = self.inner.expired() {
            return Err(ServiceError::Conflict(expired.notice));
        }
        self.wait_for_nats(REBUILD_NATS_WAIT).await?;
        // A rebuild is a sync session, whatever the schedule says.
        self.inner.start_session_now();
        let (tx, rx) = oneshot::channel();
        self.inner
            .rebuild_tx
            .send(tx)
            .await
            .map_err(|_| ServiceError::Invalid("sync has stopped; see `crmsync status` for why".into()))?;
        rx.await
            .map_err(|_| ServiceError::Internal("sync stopped during the rebuild".into()))?
            .map_err(ServiceError::Internal)
    }

    pub async fn status(&self) -> Result<serde_json::Value, ServiceError> {
        let store = &self.inner.store;
        let counts = store.counts()?;
        let (quarantined, recent) = store.quarantine(10)?;
        let nats = &self.inner.nats;
        // Asked together: each gives up after the same short wait.
        let (delivery, accepting) = tokio::join!(
            nats.for_status(nats.remote_delivery(&self.inner.bundle.consumer)),
            nats.for_status(nats.accepting_uploads())
        );
        let state = self.state();
        let (refused, log) = store.sync_log(10)?;
        let last_sync = self.inner.last_sync_ms()?;
        Ok(serde_json::json!({
            "role": "remote",
            "product": PRODUCT,
            "schema": SCHEMA_MAJOR,
            "database_id": self.inner.bundle.database_id,
            "remote": self.inner.bundle.remote,
            "set": self.inner.bundle.set,
            "nats": {
                "url": self.inner.nats_url,
                "connected": nats.is_connected(),
                "offline_since_ms": nats.offline_since_ms(),
                // What the server refused, in its words (credentials revoked: the remote was
                // deleted or re-created at the main).
                "error": nats.server_error(),
            },
            "counts": crate::model::counts_json(&counts),
            "applied": store.meta(APPLIED)?,
            "backlog": delivery.map(|d| d.backlog),
            // What the main decided, as the server says (null while NATS cannot be asked).
            "halted": delivery.map(|d| d.halted),
            "main_accepting_syncs": accepting,
            "notice": state.expired.as_ref().map(|e| e.notice.clone())
                .or(notice(delivery, accepting, nats.server_error().as_deref()).map(String::from)),
            "sync": self.inner.sync_json(),
            "last_sync_ms": last_sync,
            "expires_days": self.inner.bundle.expires_days,
            "expires_ms": state.expired.as_ref().map_or_else(
                || crate::lifecycle::expires_ms(last_sync, self.inner.bundle.expires_days),
                |e| e.on_ms,
            ),
            "expired": state.expired,
            "sessions": store.sessions(None, 10)?,
            "quarantined": quarantined,
            "quarantine": recent.iter().map(|(seq, q)| serde_json::json!({
                "seq": seq, "subject": q.subject, "error": q.error, "bytes": q.payload.len(),
            })).collect::<Vec<_>>(),
            "uploads": { "waiting": store.uploads_len()?, "error": state.upload_error },
            "refused": refused,
            "sync_log": log.iter().map(|(_, e)| e.to_json()).collect::<Vec<_>>(),
            "error": state.error,
            "rebuilding": state.rebuilding,
            "last_rebuild": state.last_rebuild,
            "recovered": store.meta_str(crate::store::RECOVERED)?
                .and_then(|r| serde_json::from_str::<serde_json::Value>(&r).ok()),
        }))
    }
}

/// Sets a damaged `remote.redb` aside and starts a new one that the pull loop fills from the
/// stream, as for a missing file. The edits waiting for upload are kept when the queue reads
/// (and also written to a JSON file beside it, for people to read); the recovery is recorded
/// for `status`.
fn recover(data_dir: &Path, bundle: &Bundle, reason: &str) -> anyhow::Result<Store> {
    use crate::store::{LAST_SYNC, RECOVERED, Recovery, SESSIONS_NEXT, Salvage, UPLOADS_NEXT};
    let path = data_dir.join(STORE_FILE);
    let (aside, mut salvage) = crate::store::set_aside(&path, reason, wire::SYNC_STREAM).map_err(anyhow::Error::msg)?;
    let mut scanned = false;
    if salvage.unreadable.contains(&"uploads") {
        // The queue's table does not read: look for its entries in the file's bytes.
        let prefix = wire::up_prefix(&bundle.remote);
        let found = Salvage::scan_uploads(&aside, |u| {
            u.subject.starts_with(&prefix)
                && matches!(wire::decode_checked(&u.payload, &bundle.database_id), wire::Decoded::Ok(e) if e.origin == bundle.remote)
        });
        tracing::warn!("found {} queued edits in the damaged file's bytes", found.len());
        // New numbers, so a new queue for the main.
        salvage.uploads = found.into_iter().enumerate().map(|(n, u)| (n as u64, u)).collect();
        salvage.meta.retain(|k, _| k != BASE && k != UPLOADS_NEXT);
        salvage.meta_str.remove(QUEUE);
        salvage.meta.insert(UPLOADS_NEXT.to_owned(), salvage.uploads.len() as u64);
        scanned = true;
    }
    let at_ms = crate::hlc::wall_ms();
    let uploads_file = write_salvaged(data_dir, &salvage, at_ms)?;
    let recovery = Recovery {
        at_ms,
        reason: reason.to_owned(),
        damaged_file: aside,
        uploads_kept: salvage.uploads.len(),
        uploads_file,
        uploads_scanned: scanned,
        unreadable: salvage.unreadable.iter().map(|t| t.to_string()).collect(),
    };
    if !salvage.unreadable.is_empty() {
        tracing::error!(
            "parts of the damaged file could not be read ({}): edits queued there beyond the damage are lost",
            salvage.unreadable.join(", ")
        );
    }
    let store = Store::open(&path)?;
    store.write(true, |t| {
        // The queue goes on with its own id and numbers, so the main merges what follows in order.
        salvage.restore(t, |k| [QUEUE, BASE, UPLOADS_NEXT, "sync_log_next", SESSIONS_NEXT, LAST_SYNC].contains(&k))?;
        seed_users(t, bundle)?;
        t.set_meta_str(DATABASE_ID, &bundle.database_id)?;
        t.set_meta_str("role", "remote")?;
        t.set_meta_str(RECOVERED, &serde_json::to_string(&recovery).unwrap_or_default())
    })?;
    Ok(store)
}

/// Writes the salvaged edits waiting for upload to `uploads-salvaged-<ms>.json` beside the
/// store, for people to read; `None` when there are none.
fn write_salvaged(data_dir: &Path, salvage: &crate::store::Salvage, at_ms: u64) -> anyhow::Result<Option<PathBuf>> {
    if salvage.uploads.is_empty() {
        return Ok(None);
    }
    let file = data_dir.join(format!("uploads-salvaged-{at_ms}.json"));
    let edits: Vec<serde_json::Value> = salvage
        .uploads
        .iter()
        .map(|(n, u)| {
            let edit = wire::Envelope::decode(&u.payload).map(|e| serde_json::to_value(e).unwrap_or_default());
            serde_json::json!({ "queue_entry": n, "subject": u.subject, "event": u.event, "edit": edit.ok() })
        })
        .collect();
    crate::files::write_private(&file, &serde_json::to_vec_pretty(&edits)?)?;
    Ok(Some(file))
}

/// What the main decided that stops this remote's synchronization, in plain words.
fn notice(
    delivery: Option<crate::transport::Delivery>,
    accepting: Option<bool>,
    server_error: Option<&str>,
) -> Option<&'static str> {
    let refused = server_error.map(str::to_lowercase);
    if refused.is_some_and(|e| e.contains("revoked") || e.contains("authorization violation")) {
        Some(
            "the NATS server refuses this remote's credentials: the main halted, expired, deleted or re-created it. \
             Its edits wait here; ask an administrator to resume it (`crmsync remote resume NAME`), or to \
             re-create it and set this computer up again from the new bundle",
        )
    } else if delivery.is_some_and(|d| d.halted) {
        Some(
            "this remote is halted at the main: it receives nothing, and its edits wait at the main until it is resumed",
        )
    } else if accepting == Some(false) {
        Some("the main is not accepting synchronizations: edits made here wait in CRM_UP until it does")
    } else {
        None
    }
}

/// Meta keys of a remote's upload queue: its id (a string) and the queue entry that is its
/// upload 0.
const QUEUE: &str = "upload_queue";
const BASE: &str = "upload_queue_base";

/// The id of this store's upload queue and the queue entry it counts from, made on first use:
/// the main merges a queue's uploads strictly in their order from 0, so a file whose queue
/// already moved on (made by an earlier version) starts a new queue at its first waiting entry.
fn upload_queue(store: &Store) -> anyhow::Result<(String, u64)> {
    if let Some(id) = store.meta_str(QUEUE)? {
        return Ok((id, store.meta(BASE)?));
    }
    let id = crate::names::new_id();
    let base = match store.uploads_head(1)?.first() {
        Some((first, _)) => *first,
        None => store.meta(crate::store::UPLOADS_NEXT)?,
    };
    store.write(true, |t| {
        t.set_meta_str(QUEUE, &id)?;
        t.set_meta(BASE, base)
    })?;
    Ok((id, base))
}

/// A request to rebuild: answered with the number of messages to replay, or why it failed.
type RebuildRequest = oneshot::Sender<Result<u64, String>>;

struct Rebuild {
    started: Instant,
    done: u64,
    total: u64,
    /// Told the number of messages to replay once the consumer has been reset.
    reply: Option<RebuildRequest>,
}

/// The sync task: pulls, applies and acknowledges batches until shutdown, starting again from
/// the stored position after a failure, a reconnect or a rebuild request. Returns the reason
/// when it stops for good.
async fn run_sync(
    inner: Arc<Inner>,
    rebuild_rx: mpsc::Receiver<RebuildRequest>,
    shutdown: watch::Receiver<bool>,
) -> Result<(), String> {
    let mut sync = SyncLoop { inner, rebuild_rx, rebuild: None };
    let result = supervise("sync", shutdown, &mut sync, |sync, shutdown| sync.run(shutdown).boxed()).await;
    if let Err(why) = &result {
        sync.inner.state.lock().unwrap().error = Some(why.clone());
        if let Some(reply) = sync.rebuild.take().and_then(|r| r.reply) {
            let _ = reply.send(Err(why.clone()));
        }
    }
    result
}

/// What the pull loop keeps across its runs: the rebuild requests, and the rebuild in progress.
struct SyncLoop {
    inner: Arc<Inner>,
    rebuild_rx: mpsc::Receiver<RebuildRequest>,
    rebuild: Option<Rebuild>,
}

/// A store error stops sync, unless it passes by itself (a full disk, a file being opened
/// again after a failed write).
fn store_stop(e: crate::store::StoreError) -> Stop {
    if e.is_transient() { Stop::Retry(e.to_string()) } else { Stop::Fatal(e.to_string()) }
}

impl SyncLoop {
    /// One run of the pull loop, from the stored position until an error, a rebuild or
    /// shutdown.
    ///
    /// Every run starts by resetting the consumer to just after the last message this remote
    /// has committed (durably or not: a crash loses both the commit and the process, and the
    /// next process starts from the durable position). The consumer acknowledges all messages
    /// up to the one acked, so a message that was delivered but never applied (to a process
    /// that was killed, or to a pull loop that was dropped) must not be left pending behind
    /// newer ones: a later ack would cover it. The reset clears those deliveries and replays
    /// exactly from the stored position.
    ///
    /// It waits for NATS first, and ends at shutdown whatever it waits for (a JetStream
    /// request to a server that does not answer takes seconds to time out): what it committed
    /// is committed, and what it did not is pulled again next time.
    async fn run(&mut self, shutdown: watch::Receiver<bool>) -> Result<(), Stop> {
        let mut stop = shutdown.clone();
        let inner = self.inner.clone();
        tokio::select! {
            result = async {
                // Between scheduled sessions, and once expired, nothing is pulled.
                let _ = inner.gate.subscribe().wait_for(|open| *open).await;
                inner.nats.connected().await;
                self.pull(shutdown).await
            } => result,
            () = shut_down(&mut stop) => Ok(()),
        }
    }

    /// Pulls from the stored position until an error, a rebuild or shutdown.
    async fn pull(&mut self, shutdown: watch::Receiver<bool>) -> Result<(), Stop> {
        let inner = self.inner.clone();
        let (nats, consumer) = (&inner.nats, &inner.bundle.consumer);
        let applied = inner.store.meta(APPLIED).map_err(store_stop)?;
        let pending = nats.reset_remote_consumer(consumer, applied + 1).await?;
        self.rebuild_reset(pending);
        let mut batches = nats.sync_messages(consumer, inner.batch, shutdown).await?;
        let mut gate = inner.gate.subscribe();
        loop {
            let incoming = tokio::select! {
                request = self.rebuild_rx.recv() => return self.start_rebuild(request),
                _ = gate.wait_for(|open| !*open) => {
                    return Err(Stop::Restart("the sync session ended".into()));
                }
                next = batches.next() => match next? {
                    Some(incoming) => incoming,
                    None => return Ok(()),
                },
            };
            let pending = incoming.last().map(|m| m.pending);
            let applied = self.apply(incoming).await?;
            // The batch is committed; an unacknowledged batch is replayed from the stored
            // position on the next run and skipped by version.
            batches.ack_first(applied.taken).await;
            if let Some(foreign) = applied.foreign {
                return Err(Stop::Fatal(foreign.to_string()));
            }
            let mut state = inner.state.lock().unwrap();
            state.pending = pending;
            state.received += applied.changed as u64;
            state.conflicts += applied.conflicts as u64;
            progress(&mut self.rebuild, &mut state, applied.taken as u64, pending);
        }
    }

    /// Applies a batch with its position in one transaction.
    async fn apply(&self, incoming: Vec<Incoming>) -> Result<projector::Applied, Stop> {
        tracing::debug!(
            messages = incoming.len(),
            first = incoming.first().map(|m| m.seq),
            last = incoming.last().map(|m| m.seq),
            pending = incoming.last().map(|m| m.pending),
            "applying a batch"
        );
        let refreshed = refresh_refused(&self.inner, &incoming).await?;
        let db = self.inner.bundle.database_id.clone();
        let store = self.inner.store.clone();
        // Large batches (a rebuild, a catch-up) commit durably: many non-durable commits in a
        // row make redb's file grow, because pages are only freed by a durable commit.
        let durable = incoming.len() >= crate::store::DURABLE_BATCH;
        tokio::task::spawn_blocking(move || {
            store.write(durable, |t| projector::apply_batch(t, &db, &incoming, &refreshed))
        })
        .await
        .map_err(|e| Stop::Fatal(e.to_string()))?
        .map_err(store_stop)
    }

    /// Empties the projection for a rebuild, and restarts the loop to replay from the start.
    /// (`None`: the service is going away.)
    fn start_rebuild(&mut self, request: Option<RebuildRequest>) -> Result<(), Stop> {
        let Some(reply) = request else { return Ok(()) };
        let started = Instant::now();
        if let Err(e) = self.inner.store.clear_projection(|t| seed_users(t, &self.inner.bundle)) {
            let _ = reply.send(Err(e.to_string()));
            return Err(store_stop(e));
        }
        self.rebuild = Some(Rebuild { started, done: 0, total: 0, reply: Some(reply) });
        Err(Stop::Restart("rebuilding from the start of CRM_SYNC".into()))
    }

    /// Once the consumer is reset for a rebuild just asked for: tells the caller how many
    /// messages it replays.
    fn rebuild_reset(&mut self, pending: u64) {
        let Some(r) = self.rebuild.as_mut() else { return };
        let Some(reply) = r.reply.take() else { return };
        r.total = pending;
        let _ = reply.send(Ok(pending));
        progress(&mut self.rebuild, &mut self.inner.state.lock().unwrap(), 0, Some(pending));
    }
}

/// Counts `taken` more messages of the rebuild in progress, if any, and ends it once nothing
/// is pending.
fn progress(rebuild: &mut Option<Rebuild>, state: &mut SyncState, taken: u64, pending: Option<u64>) {
    let Some(r) = rebuild.as_mut() else { return };
    r.done += taken;
    state.rebuilding = Some(Progress { done: r.done.min(r.total), total: r.total });
    if pending == Some(0) || r.done >= r.total {
        state.rebuilding = None;
        state.last_rebuild = Some(RebuildSummary { records: r.done, seconds: r.started.elapsed().as_secs_f64() });
        *rebuild = None;
    }
}

/// For each refusal in a batch, the main's state of the refused record, read from the last
/// message of each of this remote's targets. Read before the batch is applied, so a crash
/// never leaves a refused edit in place: the refusal and the record taken back commit together.
async fn refresh_refused(
    inner: &Inner,
    batch: &[Incoming],
) -> Result<std::collections::BTreeMap<u64, crate::apply::Refreshed>, Stop> {
    let mut out = std::collections::BTreeMap::new();
    for msg in batch.iter().filter(|m| m.subject.ends_with(".rejected")) {
        let Decoded::Ok(env) = wire::decode_checked(&msg.payload, &inner.bundle.database_id) else { continue };
        if env.op != Op::Reject {
            continue;
        }
        let mut messages = Vec::new();
        for (bit, target) in [
            (HELD_BY_SET, Target::Set(inner.bundle.set.clone())),
            (HELD_BY_SUBSCRIPTION, Target::Subscriptions(inner.bundle.remote.clone())),
        ] {
            let last = inner.nats.last_on(&wire::sync_subject(&target, env.kind, &env.id)).await?;
            let env = last.and_then(|bytes| match wire::decode_checked(&bytes, &inner.bundle.database_id) {
                Decoded::Ok(env) => Some(env),
                _ => None,
            });
            messages.push((bit, env));
        }
        out.insert(msg.seq, crate::apply::Refreshed::from_targets(&messages));
    }
    Ok(out)
}
