//! The redb projection: the only module that knows redb.
//!
//! One file per service (main or remote), owned by that service alone. Tables:
//!
//! | table | key | value |
//! | --- | --- | --- |
//! | one per [`Kind`] (`contact`, …) | record id | [`Record`]: version and fields |
//! | `children` | (contact id, kind code, child id) | () |
//! | `gone` | (kind code, id) | version of the delete or leave; [`DELETED`] set for a delete, [`DELETED_HERE`] for one made at this remote and not yet answered |
//! | `outbox` | sequence | [`OutboxEntry`]: a routed message not yet acknowledged by NATS |
//! | `quarantine` | stream sequence | [`Quarantined`]: a message that did not decode |
//! | `uploads` | sequence | [`Upload`]: a remote's edit not yet acknowledged by `CRM_UP` |
//! | `sync_log` | sequence | [`LogEntry`]: an edit the main refused, as each side recorded it |
//! | `idempotency` | a client's `Idempotency-Key` | [`KeyEntry`]: the change committed with it |
//! | `parked` | (remote's upload queue, number) | [`Parked`]: an upload that reached the main before an earlier one of its queue |
//! | `meta` | name | u64 (stream positions, counters) |
//! | `meta_str` | name | string (database id, role) |
//!
//! Architecture invariant: a stream position is only ever written in the same transaction as
//! the changes it stands for, so a crash at any point leaves a projection that is exactly the
//! stream up to the stored position.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use redb::{
    Database, Durability, ReadTransaction, ReadableDatabase, ReadableTable, ReadableTableMetadata, Table,
    TableDefinition, WriteTransaction,
};
use serde::{Deserialize, Serialize};

use crate::apply::Held;
use crate::model::{Fields, Kind, Record};
use crate::outgoing::{OutboxEntry, Upload};

const CHILDREN: TableDefinition<ChildKey, ()> = TableDefinition::new("children");
const GONE: TableDefinition<(u8, &str), u64> = TableDefinition::new("gone");
/// The top bit of a `gone` value: the record was deleted, not only gone from this remote's
/// targets (a leave). Versions are stream sequences, far below it. A file written before it
/// existed reads the same, with no delete marked.
pub const DELETED: u64 = 1 << 63;
/// Also set in a `gone` version, at a remote, for a delete made there that the main has not
/// sent back yet: a newer version of the record arriving meanwhile (an edit at the main made
/// before it merged the delete) must not bring the record back for a moment.
pub const DELETED_HERE: u64 = 1 << 62;
/// The flag bits of a `gone` value.
const GONE_FLAGS: u64 = DELETED | DELETED_HERE;
const OUTBOX: TableDefinition<u64, &[u8]> = TableDefinition::new("outbox");
const QUARANTINE: TableDefinition<u64, &[u8]> = TableDefinition::new("quarantine");
const UPLOADS: TableDefinition<u64, &[u8]> = TableDefinition::new("uploads");
const SYNC_LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("sync_log");
const PARKED: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("parked");
const IDEMPOTENCY: TableDefinition<&str, &[u8]> = TableDefinition::new("idempotency");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const META_STR: TableDefinition<&str, &str> = TableDefinition::new("meta_str");

/// The table of a kind's records, by the kind's fixed table name.
fn records_table(kind: Kind) -> TableDefinition<'static, &'static str, &'static [u8]> {
    TableDefinition::new(kind.table())
}

/// Where a kind's table sits among the tables a transaction opens (in memory only; on disk
/// tables are found by name and keys carry [`Kind::code`]).
fn slot(kind: Kind) -> usize {
    Kind::ALL.iter().position(|k| *k == kind).expect("every kind is in Kind::ALL")
}

/// The layout of what this module stores. A file of another layout is refused until it is
/// rebuilt from the stream (its projection is only ever a copy of the stream).
pub const FORMAT: u64 = 2;
const FORMAT_KEY: &str = "format";

/// Meta keys.
pub const APPLIED: &str = "applied";
pub const DATABASE_ID: &str = "database_id";
/// The meta key of the next upload number the main expects from a remote's upload queue.
pub fn next_upload_key(queue: &str) -> String {
    format!("upload_next:{queue}")
}

/// Set (as JSON) when a damaged file was set aside and rebuilt at start: shown by `status`.
pub const RECOVERED: &str = "recovered";
/// The number the next queued upload gets.
pub const UPLOADS_NEXT: &str = "uploads_next";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(
        "the database file {} is in use by another crmsync process; stop it first, or ask it through its API",
        .0.display()
    )]
    InUse(PathBuf),
    #[error("cannot open the database file {}: {source}", path.display())]
    Open { path: PathBuf, source: redb::DatabaseError },
    #[error("database error: {0}")]
    Redb(redb::Error),
    #[error(
        "the database file {} is damaged ({detail}). Restart the service: at start it checks the file, sets a \
         damaged one aside and rebuilds it from the stream, keeping the edits that wait for upload (see the \
         README's Safety section)",
        path.display()
    )]
    Damaged { path: PathBuf, detail: String },
    #[error(
        "cannot write to the database file {} ({detail}); nothing was changed. If its disk is full, free some \
         space: crmsync goes on by itself once it can write again",
        path.display()
    )]
    Unwritable { path: PathBuf, detail: String },
    #[error("a stored {what} does not decode ({detail}); rebuild the projection")]
    Corrupt { what: &'static str, detail: String },
    #[error(
        "the database file {} was written by another version of crmsync (storage format {found}, this one uses {FORMAT}); \
         rebuild it from the stream: `crmsync main rebuild` for a main, `crmsync remote rebuild` for a remote",
        path.display()
    )]
    Format { path: PathBuf, found: u64 },
}

macro_rules! redb_errors {
    ($($t:ty),*) => {$(
        impl From<$t> for StoreError {
            fn from(e: $t) -> StoreError {
                StoreError::from(redb::Error::from(e))
            }
        }
    )*};
}
redb_errors!(redb::TransactionError, redb::TableError, redb::StorageError, redb::CommitError, redb::SetDurabilityError);

impl From<redb::Error> for StoreError {
    /// Tells damage and failed writes (a full disk) from other errors; the path is filled in
    /// by [`StoreError::at`] where the file is known.
    fn from(e: redb::Error) -> StoreError {
        match e {
            redb::Error::Corrupted(detail) => StoreError::Damaged { path: PathBuf::new(), detail },
            redb::Error::Io(io) => StoreError::Unwritable { path: PathBuf::new(), detail: io.to_string() },
            redb::Error::PreviousIo => {
                StoreError::Unwritable { path: PathBuf::new(), detail: "an earlier write to it failed".into() }
            }
            other => StoreError::Redb(other),
        }
    }
}

impl StoreError {
    /// The same error, naming the file.
    fn at(self, file: &Path) -> StoreError {
        match self {
            StoreError::Damaged { path, detail } if path.as_os_str().is_empty() => {
                StoreError::Damaged { path: file.to_owned(), detail }
            }
            StoreError::Unwritable { path, detail } if path.as_os_str().is_empty() => {
                StoreError::Unwritable { path: file.to_owned(), detail }
            }
            other => other,
        }
    }

    /// The same error, for a second caller (errors of redb itself cannot be cloned: they are
    /// kept as their message).
    pub fn duplicate(&self) -> StoreError {
        match self {
            StoreError::Damaged { path, detail } => StoreError::Damaged { path: path.clone(), detail: detail.clone() },
            StoreError::Unwritable { path, detail } => {
                StoreError::Unwritable { path: path.clone(), detail: detail.clone() }
            }
            other => StoreError::Corrupt { what: "write", detail: other.to_string() },
        }
    }

    /// A write that failed because the file cannot be written now (a full disk): worth trying
    /// again later, unlike a damaged file.
    pub fn is_unwritable(&self) -> bool {
        matches!(self, StoreError::Unwritable { .. })
    }
}

/// Runs `f`, turning a panic inside redb (some damage makes it panic instead of erring) into
/// an error that says the file is damaged.
fn guard<R>(path: &Path, f: impl FnOnce() -> Result<R, StoreError>) -> Result<R, StoreError> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(result) => result.map_err(|e| e.at(path)),
        Err(panic) => {
            let detail = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "reading it failed".into());
            Err(StoreError::Damaged { path: path.to_owned(), detail })
        }
    }
}

/// Opens a redb file; `check` verifies every page first (a whole read of the file), so
/// damage is found at start rather than by the read that hits it.
fn open_db(path: &Path, check: bool) -> Result<Database, StoreError> {
    let mut db = match Database::builder().set_cache_size(CACHE_BYTES).create(path) {
        Ok(db) => db,
        Err(redb::DatabaseError::DatabaseAlreadyOpen) => return Err(StoreError::InUse(path.to_owned())),
        Err(redb::DatabaseError::Storage(e)) => return Err(StoreError::from(redb::Error::from(e)).at(path)),
        Err(source) => return Err(StoreError::Damaged { path: path.to_owned(), detail: source.to_string() }),
    };
    if check {
        let started = std::time::Instant::now();
        let checked = db.check_integrity();
        let size = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
        tracing::info!(
            "checked every page of {} ({} MB) in {} ms",
            path.display(),
            size / 1_000_000,
            started.elapsed().as_millis()
        );
        match checked {
            Ok(true) => {}
            // A commit whose pages were not all on disk (a crash, a power loss) was rolled
            // back: what remains is whole, and the stream holds the rest.
            Ok(false) => tracing::warn!("{} was repaired: its last commit was incomplete", path.display()),
            Err(e) => return Err(StoreError::Damaged { path: path.to_owned(), detail: e.to_string() }),
        }
    }
    Ok(db)
}

/// Moves a damaged file aside (`NAME.damaged-<ms>`), keeping it for inspection, and reads what
/// it can of it; returns where it went and what was read. `rebuilt_from` names the stream the
/// caller rebuilds the file from, for the log.
pub fn set_aside(path: &Path, reason: &str, rebuilt_from: &str) -> Result<(PathBuf, Salvage), String> {
    let mut name = path.file_name().unwrap_or_default().to_owned();
    name.push(format!(".damaged-{}", crate::hlc::wall_ms()));
    let aside = path.with_file_name(name);
    std::fs::rename(path, &aside)
        .map_err(|e| format!("{} is damaged ({reason}) and cannot be set aside: {e}", path.display()))?;
    tracing::error!(
        "{} is damaged ({reason}); it is kept as {} and rebuilt from {rebuilt_from}",
        path.display(),
        aside.display()
    );
    let salvage = Salvage::read(&aside);
    Ok((aside, salvage))
}

/// What a start found and did about a damaged file, as `status` shows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Recovery {
    pub at_ms: u64,
    /// Why the file was judged damaged.
    pub reason: String,
    /// Where the damaged file was moved.
    pub damaged_file: PathBuf,
    /// Edits waiting for upload that were kept (a remote).
    pub uploads_kept: usize,
    /// Where the kept edits were also written, readable by people.
    pub uploads_file: Option<PathBuf>,
    /// The queue's table did not read, and the edits were found in the file's bytes instead.
    pub uploads_scanned: bool,
    /// Tables that could not be read whole: what they held beyond the damage is lost.
    pub unreadable: Vec<String>,
}

/// What could be read out of a damaged file: the state that is not a copy of a stream (a
/// remote's queued edits, the main's merge positions and parked uploads, the sync log), each
/// table as far as it reads.
#[derive(Debug, Default)]
pub struct Salvage {
    pub meta: BTreeMap<String, u64>,
    pub meta_str: BTreeMap<String, String>,
    pub uploads: Vec<(u64, Upload)>,
    pub parked: Vec<((String, u64), Parked)>,
    pub sync_log: Vec<LogEntry>,
    /// The first routed message not yet published, if the outbox read.
    pub outbox_first: Option<u64>,
    /// The tables that could not be read to their end.
    pub unreadable: Vec<&'static str>,
}

impl Salvage {
    /// Reads what it can of a damaged file, table by table, entry by entry; never fails.
    pub fn read(path: &Path) -> Salvage {
        let mut out = Salvage::default();
        let db = match guard(path, || open_db(path, false)) {
            Ok(db) => db,
            Err(e) => {
                tracing::error!("nothing can be read from {}: {e}", path.display());
                out.unreadable = vec!["meta", "uploads", "parked", "sync_log", "outbox"];
                return out;
            }
        };
        let read = |name: &'static str,
                    out: &mut Salvage,
                    f: &mut dyn FnMut(&ReadTransaction, &mut Salvage) -> Result<(), StoreError>| {
            let whole = guard(path, || f(&db.begin_read()?, out));
            if let Err(e) = whole {
                tracing::error!("{name} of {} reads only in part: {e}", path.display());
                out.unreadable.push(name);
            }
        };
        read("meta", &mut out, &mut Salvage::read_meta);
        read("uploads", &mut out, &mut |txn, out| {
            for item in txn.open_table(UPLOADS)?.iter()? {
                out.uploads.push(decode_entry(item?, "upload")?);
            }
            Ok(())
        });
        read("parked", &mut out, &mut |txn, out| {
            for item in txn.open_table(PARKED)?.iter()? {
                let (k, v) = item?;
                let parked = rmp_serde::from_slice(v.value())
                    .map_err(|e| StoreError::Corrupt { what: "parked upload", detail: e.to_string() })?;
                let (queue, n) = k.value();
                out.parked.push(((queue.to_owned(), n), parked));
            }
            Ok(())
        });
        read("sync_log", &mut out, &mut |txn, out| {
            for item in txn.open_table(SYNC_LOG)?.iter()? {
                out.sync_log.push(decode_entry::<LogEntry>(item?, "sync log entry")?.1);
            }
            Ok(())
        });
        read("outbox", &mut out, &mut |txn, out| {
            if let Some(item) = txn.open_table(OUTBOX)?.iter()?.next() {
                let entry: OutboxEntry = decode_entry(item?, "outbox entry")?.1;
                out.outbox_first = Some(entry.seq);
            }
            Ok(())
        });
        out
    }

    fn read_meta(txn: &ReadTransaction, out: &mut Salvage) -> Result<(), StoreError> {
        for item in txn.open_table(META)?.iter()? {
            let (k, v) = item?;
            out.meta.insert(k.value().to_owned(), v.value());
        }
        for item in txn.open_table(META_STR)?.iter()? {
            let (k, v) = item?;
            out.meta_str.insert(k.value().to_owned(), v.value().to_owned());
        }
        Ok(())
    }

    /// Looks for queued uploads in the raw bytes of a file redb cannot read: each is stored as
    /// a MessagePack array of its event id (a ULID), its subject and its payload, so they can be
    /// found without the file's structure. `accept` says which are this store's. Their queue
    /// numbers are not found this way: they come back in the order of their event ids (the
    /// order they were made in), and copies left in freed pages (edits already uploaded) may
    /// come back too, which the main merges again without effect.
    pub fn scan_uploads(path: &Path, accept: impl Fn(&Upload) -> bool) -> Vec<Upload> {
        let Ok(bytes) = std::fs::read(path) else { return Vec::new() };
        let mut found: BTreeMap<String, Upload> = BTreeMap::new();
        for at in 0..bytes.len().saturating_sub(2) {
            // fixarray of 3, then a fixstr of 26 bytes: the event id.
            if bytes[at] != 0x93 || bytes[at + 1] != 0xba {
                continue;
            }
            let mut de = rmp_serde::Deserializer::new(&bytes[at..]);
            if let Ok(upload) = Upload::deserialize(&mut de)
                && accept(&upload)
            {
                found.entry(upload.event.clone()).or_insert(upload);
            }
        }
        found.into_values().collect()
    }

    /// Writes back into a new file what it keeps of the salvage: the meta values and strings
    /// `keep` accepts, the upload queue, the parked uploads and the sync log.
    pub fn restore(&self, t: &mut Tables<'_>, keep: impl Fn(&str) -> bool) -> Result<(), StoreError> {
        for (k, v) in self.meta.iter().filter(|(k, _)| keep(k)) {
            t.set_meta(k, *v)?;
        }
        for (k, v) in self.meta_str.iter().filter(|(k, _)| keep(k)) {
            t.set_meta_str(k, v)?;
        }
        for (n, upload) in &self.uploads {
            t.uploads.insert(*n, rmp_serde::to_vec(upload).expect("an upload encodes").as_slice())?;
        }
        for ((queue, n), parked) in &self.parked {
            t.park(queue, *n, parked)?;
        }
        for entry in &self.sync_log {
            t.log(entry)?;
        }
        Ok(())
    }
}

// A record is stored as the core's [`Record`]: the version as 8 big-endian bytes, the holders
// as one byte, then the fields as MessagePack, so the apply path reads the first two without
// decoding the record.

fn encode_record(record: &Record) -> Vec<u8> {
    let mut out = Vec::with_capacity(256);
    out.extend_from_slice(&record.version.to_be_bytes());
    out.push(record.holders);
    rmp_serde::encode::write(&mut out, &record.fields).expect("record encodes");
    out
}

fn decode_record(bytes: &[u8]) -> Result<Record, StoreError> {
    let corrupt = |detail: String| StoreError::Corrupt { what: "record", detail };
    let (version, holders) = record_head(bytes).ok_or_else(|| corrupt(format!("{} bytes", bytes.len())))?;
    let mut fields = rmp_serde::from_slice(&bytes[9..]).map_err(|e| corrupt(e.to_string()))?;
    crate::model::normalize(&mut fields);
    Ok(Record { version, holders, fields })
}

/// The version and the holders, without decoding the fields.
fn record_head(bytes: &[u8]) -> Option<(u64, u8)> {
    Some((u64::from_be_bytes(bytes.get(..8)?.try_into().ok()?), *bytes.get(8)?))
}

/// The change a client's `Idempotency-Key` committed: a repeated request answers with it
/// instead of changing anything again.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KeyEntry {
    /// The `CRM_EVENTS` sequence of the change.
    pub seq: u64,
    pub kind: Kind,
    pub id: String,
    /// When the main applied it; entries older than a day are forgotten.
    pub at_ms: u64,
}

impl KeyEntry {
    fn decode(bytes: &[u8]) -> Result<KeyEntry, StoreError> {
        rmp_serde::from_slice(bytes).map_err(|e| StoreError::Corrupt { what: "idempotency key", detail: e.to_string() })
    }
}

/// An upload the main took off `CRM_UP` before an earlier upload of the same remote queue had
/// arrived: kept until that one is merged, then merged in its turn.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Parked {
    pub subject: String,
    #[serde(with = "crate::outgoing::payload_bytes")]
    pub payload: Vec<u8>,
    /// The upload's [`crate::wire::UPLOAD_BUNDLE`] header (entries parked before it existed
    /// read as none).
    #[serde(default)]
    pub bundle_created_ms: Option<u64>,
}

/// An edit the main refused: kept in the sync log of the main and of the remote that made it,
/// with the edit itself, so no edit disappears without a trace.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LogEntry {
    pub at_ms: u64,
    pub remote: String,
    pub kind: Kind,
    pub id: String,
    pub event: String,
    pub reason: String,
    /// The refused edit's fields (none for a refused delete).
    pub edit: Option<Fields>,
}

impl LogEntry {
    /// The entry as the APIs show it.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "at_ms": self.at_ms, "remote": self.remote, "kind": self.kind, "id": self.id, "event": self.event,
            "reason": self.reason, "edit": self.edit.as_ref().map(|f| crate::model::to_json(&self.id, 0, f)),
        })
    }
}

/// A message that could not be decoded, kept as it came.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Quarantined {
    pub subject: String,
    pub error: String,
    #[serde(with = "crate::outgoing::payload_bytes")]
    pub payload: Vec<u8>,
}

/// redb's page cache. Its default (1 GiB) would let a remote of a million contacts grow far
/// beyond what a laptop should give a background sync; measured with `crmsync bench`, 16 MiB
/// applies as fast as 64 MiB (the operating system caches the file too) at a third of the
/// memory.
pub const CACHE_BYTES: usize = 16 * 1024 * 1024;

/// A handle on a service's redb file. Cheap to clone.
///
/// Commits on the hot paths are not durable on their own: [`Store::flush`] (run every
/// [`FLUSH_INTERVAL`] by the services, and when they stop) makes them durable together. A
/// crash loses at most the last interval of projection, which the services replay from the
/// stream, because the stream position is committed with the changes it stands for.
#[derive(Clone)]
pub struct Store {
    /// The open database; empty while it is being opened again after a failed write (redb
    /// refuses every write after one failed, until it is reopened).
    db: Arc<std::sync::RwLock<Option<Arc<Database>>>>,
    path: PathBuf,
    dirty: Arc<std::sync::atomic::AtomicBool>,
    /// Why the last write failed for want of space, until one succeeds.
    unwritable: Arc<std::sync::Mutex<Option<String>>>,
}

/// Batches at least this large commit durably at once; smaller ones (single changes as they
/// happen) commit without waiting for the disk and are made durable by [`Store::flush`].
pub const DURABLE_BATCH: usize = 64;

/// How often non-durable commits are made durable.
pub const FLUSH_INTERVAL: std::time::Duration = std::time::Duration::from_millis(200);

impl Store {
    /// Opens (or creates) the file, refusing clearly if another process holds it or if it
    /// holds another storage format.
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        let store = Store::open_any_format(path)?;
        let (found, empty) = guard(path, || {
            let txn = store.read_txn()?;
            let found = txn.open_table(META)?.get(FORMAT_KEY)?.map(|v| v.value()).unwrap_or(0);
            let mut empty = true;
            for def in Kind::ALL.map(records_table) {
                empty &= txn.open_table(def)?.is_empty()?;
            }
            Ok((found, empty))
        })?;
        match found {
            FORMAT => {}
            0 if empty => store.write(true, |t| t.set_meta(FORMAT_KEY, FORMAT))?,
            _ => return Err(StoreError::Format { path: path.to_owned(), found: found.max(1) }),
        }
        Ok(store)
    }

    /// Opens the file whatever its storage format, for a rebuild (which empties it). Every page
    /// of it is checked first: a damaged file (truncated, overwritten) is refused with
    /// [`StoreError::Damaged`], never served.
    pub fn open_any_format(path: &Path) -> Result<Store, StoreError> {
        // Created (or narrowed) to its owner alone before redb writes a byte of it.
        crate::files::private_file(path).map_err(|e| StoreError::Open { path: path.to_owned(), source: e.into() })?;
        let db = guard(path, || open_db(path, true))?;
        let store = Store {
            db: Arc::new(std::sync::RwLock::new(Some(Arc::new(db)))),
            path: path.to_owned(),
            dirty: Default::default(),
            unwritable: Default::default(),
        };
        store.write(true, |_| Ok(()))?;
        Ok(store)
    }

    /// The open database, opening it again if a failed write closed it.
    fn db(&self) -> Result<Arc<Database>, StoreError> {
        if let Some(db) = self.db.read().unwrap_or_else(|e| e.into_inner()).as_ref() {
            return Ok(db.clone());
        }
        let mut slot = self.db.write().unwrap_or_else(|e| e.into_inner());
        if slot.is_none() {
            *slot = Some(Arc::new(guard(&self.path, || open_db(&self.path, false))?));
            tracing::info!("{} is open again", self.path.display());
        }
        Ok(slot.as_ref().expect("just opened").clone())
    }

    /// After a failed write redb refuses every other one until the file is opened again: close
    /// it (once the calls using it now are done), so the next call opens it afresh.
    fn close_after_failed_write(&self) {
        let mut slot = self.db.write().unwrap_or_else(|e| e.into_inner());
        let Some(mut db) = slot.take() else { return };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
        loop {
            match Arc::try_unwrap(db) {
                Ok(db) => {
                    drop(db);
                    return;
                }
                Err(shared) if std::time::Instant::now() < deadline => {
                    db = shared;
                    std::thread::sleep(std::time::Duration::from_millis(5));
                }
                Err(shared) => {
                    // Still in use: keep it, and try again after the next failed write.
                    *slot = Some(shared);
                    return;
                }
            }
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `f` in one write transaction and commits it. `durable` makes the commit wait for
    /// the disk; a non-durable commit becomes durable with the next durable one.
    pub fn write<R>(
        &self,
        durable: bool,
        f: impl FnOnce(&mut Tables<'_>) -> Result<R, StoreError>,
    ) -> Result<R, StoreError> {
        let result = guard(&self.path, || {
            let db = self.db()?;
            let mut txn = db.begin_write()?;
            if !durable {
                txn.set_durability(Durability::None)?;
            }
            let result = {
                let mut tables = Tables::open(&txn)?;
                f(&mut tables)?
            };
            txn.commit()?;
            Ok(result)
        });
        match &result {
            Ok(_) => {
                if !durable {
                    self.dirty.store(true, std::sync::atomic::Ordering::Release);
                }
                if self.unwritable.lock().unwrap_or_else(|e| e.into_inner()).take().is_some() {
                    tracing::info!("{} can be written again", self.path.display());
                }
            }
            Err(StoreError::Unwritable { detail, .. }) => {
                tracing::error!("{}", result.as_ref().err().map(|e| e.to_string()).unwrap_or_default());
                *self.unwritable.lock().unwrap_or_else(|e| e.into_inner()) = Some(detail.clone());
                self.close_after_failed_write();
            }
            _ => {}
        }
        result
    }

    /// The error of the last write, if it failed for want of space and none succeeded since:
    /// a service refuses new changes with it at once instead of taking them on.
    pub fn unwritable(&self) -> Option<StoreError> {
        let detail = self.unwritable.lock().unwrap_or_else(|e| e.into_inner()).clone()?;
        Some(StoreError::Unwritable { path: self.path.clone(), detail })
    }

    /// Empties the projection (records, children, tombstones, the applied position) for a
    /// rebuild, and runs `then` in the same transaction. The outbox and the quarantine are
    /// history, not projection: they stay. Whole tables are dropped, which frees their pages
    /// at once instead of deleting a million entries one by one.
    pub fn clear_projection<R>(
        &self,
        then: impl FnOnce(&mut Tables<'_>) -> Result<R, StoreError>,
    ) -> Result<R, StoreError> {
        let db = self.db()?;
        let txn = db.begin_write()?;
        for def in Kind::ALL.map(records_table) {
            txn.delete_table(def)?;
        }
        txn.delete_table(CHILDREN)?;
        txn.delete_table(GONE)?;
        let result = {
            let mut tables = Tables::open(&txn)?;
            tables.set_meta(APPLIED, 0)?;
            tables.set_meta(FORMAT_KEY, FORMAT)?;
            then(&mut tables)?
        };
        txn.commit()?;
        Ok(result)
    }

    /// Makes every commit so far durable, if any was not.
    pub fn flush(&self) -> Result<(), StoreError> {
        if self.dirty.swap(false, std::sync::atomic::Ordering::AcqRel) {
            let result = guard(&self.path, || {
                let mut txn = self.db()?.begin_write()?;
                txn.set_durability(Durability::Immediate)?;
                Ok(txn.commit()?)
            });
            if let Err(e) = result {
                // Still to be made durable.
                self.dirty.store(true, std::sync::atomic::Ordering::Release);
                if e.is_unwritable() {
                    self.close_after_failed_write();
                }
                return Err(e);
            }
        }
        Ok(())
    }

    /// Flushes every [`FLUSH_INTERVAL`] until `stop` changes.
    pub async fn flush_periodically(self, mut stop: tokio::sync::watch::Receiver<bool>) {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(FLUSH_INTERVAL) => {}
                _ = stop.changed() => break,
            }
            let store = self.clone();
            if let Ok(Err(e)) = tokio::task::spawn_blocking(move || store.flush()).await {
                tracing::error!("cannot make the projection durable: {e}");
            }
        }
        if let Err(e) = self.flush() {
            tracing::error!("cannot make the projection durable: {e}");
        }
    }

    fn read_txn(&self) -> Result<ReadTransaction, StoreError> {
        Ok(self.db()?.begin_read()?)
    }

    pub fn get(&self, kind: Kind, id: &str) -> Result<Option<Record>, StoreError> {
        guard(&self.path, || {
            let txn = self.read_txn()?;
            let table = txn.open_table(records_table(kind))?;
            table.get(id)?.map(|v| decode_record(v.value())).transpose()
        })
    }

    /// A record and the version it is known at (held, or deleted at).
    pub fn get_known(&self, kind: Kind, id: &str) -> Result<(Option<Record>, u64), StoreError> {
        guard(&self.path, || {
            let txn = self.read_txn()?;
            let held = txn.open_table(records_table(kind))?.get(id)?.map(|v| decode_record(v.value())).transpose()?;
            let gone = txn.open_table(GONE)?.get((kind.code(), id))?.map(|v| v.value() & !GONE_FLAGS).unwrap_or(0);
            let known = held.as_ref().map(|s| s.version).unwrap_or(0).max(gone);
            Ok((held, known))
        })
    }

    /// Whether a delete made here of this record still waits for the main's answer.
    pub fn deleted_here(&self, kind: Kind, id: &str) -> Result<bool, StoreError> {
        guard(&self.path, || {
            let txn = self.read_txn()?;
            Ok(txn.open_table(GONE)?.get((kind.code(), id))?.is_some_and(|v| v.value() & DELETED_HERE != 0))
        })
    }

    /// Records of `kind` in id order, after `after`, that pass `keep`, at most `limit`.
    pub fn list(
        &self,
        kind: Kind,
        after: Option<&str>,
        limit: usize,
        mut keep: impl FnMut(&str, &Record) -> bool,
    ) -> Result<Vec<(String, Record)>, StoreError> {
        let txn = self.read_txn()?;
        let table = txn.open_table(records_table(kind))?;
        let range = match after {
            Some(after) => table.range::<&str>((std::ops::Bound::Excluded(after), std::ops::Bound::Unbounded))?,
            None => table.range::<&str>(..)?,
        };
        let mut out = Vec::new();
        for item in range {
            if out.len() >= limit {
                break;
            }
            let (k, v) = item?;
            let stored = decode_record(v.value())?;
            if keep(k.value(), &stored) {
                out.push((k.value().to_owned(), stored));
            }
        }
        Ok(out)
    }

    /// Every record of `kind`, for scans that must see all of them (routing a new set).
    pub fn for_each(&self, kind: Kind, mut f: impl FnMut(&str, Record)) -> Result<(), StoreError> {
        guard(&self.path, || {
            let txn = self.read_txn()?;
            let table = txn.open_table(records_table(kind))?;
            for item in table.iter()? {
                let (k, v) = item?;
                f(k.value(), decode_record(v.value())?);
            }
            Ok(())
        })
    }

    pub fn counts(&self) -> Result<BTreeMap<Kind, u64>, StoreError> {
        guard(&self.path, || {
            let txn = self.read_txn()?;
            let mut out = BTreeMap::new();
            for kind in Kind::ALL {
                out.insert(kind, txn.open_table(records_table(kind))?.len()?);
            }
            Ok(out)
        })
    }

    /// A meta value, `None` if it was never set.
    pub fn meta_opt(&self, key: &str) -> Result<Option<u64>, StoreError> {
        guard(&self.path, || {
            let txn = self.read_txn()?;
            Ok(txn.open_table(META)?.get(key)?.map(|v| v.value()))
        })
    }

    pub fn meta(&self, key: &str) -> Result<u64, StoreError> {
        guard(&self.path, || {
            let txn = self.read_txn()?;
            Ok(txn.open_table(META)?.get(key)?.map(|v| v.value()).unwrap_or(0))
        })
    }

    pub fn meta_str(&self, key: &str) -> Result<Option<String>, StoreError> {
        guard(&self.path, || {
            let txn = self.read_txn()?;
            Ok(txn.open_table(META_STR)?.get(key)?.map(|v| v.value().to_owned()))
        })
    }

    /// The oldest outbox entries, in order, up to about `messages` messages.
    pub fn outbox_head(&self, messages: usize) -> Result<Vec<(u64, OutboxEntry)>, StoreError> {
        guard(&self.path, || {
            let txn = self.read_txn()?;
            let table = txn.open_table(OUTBOX)?;
            let mut out = Vec::new();
            let mut count = 0;
            for item in table.iter()? {
                if count >= messages {
                    break;
                }
                let (k, v) = item?;
                let entry: OutboxEntry = rmp_serde::from_slice(v.value())
                    .map_err(|e| StoreError::Corrupt { what: "outbox entry", detail: e.to_string() })?;
                count += entry.subjects.len();
                out.push((k.value(), entry));
            }
            Ok(out)
        })
    }

    pub fn outbox_len(&self) -> Result<u64, StoreError> {
        guard(&self.path, || Ok(self.read_txn()?.open_table(OUTBOX)?.len()?))
    }

    /// Quarantined messages, newest last, at most `limit`, and how many there are.
    pub fn quarantine(&self, limit: usize) -> Result<(u64, Vec<(u64, Quarantined)>), StoreError> {
        self.newest(QUARANTINE, "quarantined message", limit)
    }

    /// The oldest uploads waiting for `CRM_UP`, in order, at most `limit`.
    pub fn uploads_head(&self, limit: usize) -> Result<Vec<(u64, Upload)>, StoreError> {
        guard(&self.path, || {
            let txn = self.read_txn()?;
            let table = txn.open_table(UPLOADS)?;
            table.iter()?.take(limit).map(|item| decode_entry(item?, "upload")).collect()
        })
    }

    pub fn uploads_len(&self) -> Result<u64, StoreError> {
        guard(&self.path, || Ok(self.read_txn()?.open_table(UPLOADS)?.len()?))
    }

    /// The sync log: refused edits, newest last, at most `limit`, and how many there are.
    pub fn sync_log(&self, limit: usize) -> Result<(u64, Vec<(u64, LogEntry)>), StoreError> {
        self.newest(SYNC_LOG, "sync log entry", limit)
    }

    fn newest<T: serde::de::DeserializeOwned>(
        &self,
        def: TableDefinition<u64, &[u8]>,
        what: &'static str,
        limit: usize,
    ) -> Result<(u64, Vec<(u64, T)>), StoreError> {
        let txn = self.read_txn()?;
        let table = txn.open_table(def)?;
        let total = table.len()?;
        let mut out =
            table.iter()?.rev().take(limit).map(|item| decode_entry(item?, what)).collect::<Result<Vec<_>, _>>()?;
        out.reverse();
        Ok((total, out))
    }

    /// The ids of a contact's children, by kind.
    pub fn children(&self, parent: &str) -> Result<Vec<(Kind, String)>, StoreError> {
        guard(&self.path, || {
            let txn = self.read_txn()?;
            children_of(&txn.open_table(CHILDREN)?, parent)
        })
    }

    /// The parked uploads of one upload queue from number `from` on, in order, at most `limit`.
    pub fn parked(&self, queue: &str, from: u64, limit: usize) -> Result<Vec<(u64, Parked)>, StoreError> {
        guard(&self.path, || {
            let txn = self.read_txn()?;
            let table = txn.open_table(PARKED)?;
            let mut out = Vec::new();
            for item in table.range((queue, from)..=(queue, u64::MAX))?.take(limit) {
                let (k, v) = item?;
                let parked = rmp_serde::from_slice(v.value())
                    .map_err(|e| StoreError::Corrupt { what: "parked upload", detail: e.to_string() })?;
                out.push((k.value().1, parked));
            }
            Ok(out)
        })
    }

    /// The change committed with a client's idempotency key, if the main has applied one.
    pub fn key_entry(&self, key: &str) -> Result<Option<KeyEntry>, StoreError> {
        guard(&self.path, || {
            let txn = self.read_txn()?;
            txn.open_table(IDEMPOTENCY)?.get(key)?.map(|v| KeyEntry::decode(v.value())).transpose()
        })
    }

    /// The upload queues that have parked uploads.
    pub fn parked_queues(&self) -> Result<std::collections::BTreeSet<String>, StoreError> {
        guard(&self.path, || {
            let txn = self.read_txn()?;
            let mut out = std::collections::BTreeSet::new();
            for item in txn.open_table(PARKED)?.iter()? {
                out.insert(item?.0.value().0.to_owned());
            }
            Ok(out)
        })
    }

    /// How many uploads are parked, waiting for an earlier upload of their queue.
    pub fn parked_len(&self) -> Result<u64, StoreError> {
        guard(&self.path, || Ok(self.read_txn()?.open_table(PARKED)?.len()?))
    }
}

/// Appends an entry to a queue table under the next number of the `counter` kept in `meta`.
fn append(
    table: &mut Table<'_, u64, &'static [u8]>,
    meta: &mut Table<'_, &'static str, u64>,
    counter: &str,
    entry: &impl Serialize,
) -> Result<(), StoreError> {
    let next = meta.get(counter)?.map(|v| v.value()).unwrap_or(0);
    table.insert(next, rmp_serde::to_vec(entry).expect("a queue entry encodes").as_slice())?;
    meta.insert(counter, next + 1)?;
    Ok(())
}

fn decode_entry<T: serde::de::DeserializeOwned>(
    (k, v): (redb::AccessGuard<'_, u64>, redb::AccessGuard<'_, &[u8]>),
    what: &'static str,
) -> Result<(u64, T), StoreError> {
    let value = rmp_serde::from_slice(v.value()).map_err(|e| StoreError::Corrupt { what, detail: e.to_string() })?;
    Ok((k.value(), value))
}

type ChildKey = (&'static str, u8, &'static str);

fn children_of(table: &impl ReadableTable<ChildKey, ()>, parent: &str) -> Result<Vec<(Kind, String)>, StoreError> {
    let mut out = Vec::new();
    for item in table.range((parent, 0u8, "")..)? {
        let (k, _) = item?;
        let (p, code, id) = k.value();
        if p != parent {
            break;
        }
        out.push((Kind::ALL[code as usize], id.to_owned()));
    }
    Ok(out)
}

/// The tables of one write transaction, opened once for the whole batch.
pub struct Tables<'txn> {
    records: Vec<Table<'txn, &'static str, &'static [u8]>>,
    children: Table<'txn, ChildKey, ()>,
    gone: Table<'txn, (u8, &'static str), u64>,
    outbox: Table<'txn, u64, &'static [u8]>,
    quarantine: Table<'txn, u64, &'static [u8]>,
    uploads: Table<'txn, u64, &'static [u8]>,
    sync_log: Table<'txn, u64, &'static [u8]>,
    parked: Table<'txn, (&'static str, u64), &'static [u8]>,
    idempotency: Table<'txn, &'static str, &'static [u8]>,
    meta: Table<'txn, &'static str, u64>,
    meta_str: Table<'txn, &'static str, &'static str>,
}

impl<'txn> Tables<'txn> {
    fn open(txn: &'txn WriteTransaction) -> Result<Tables<'txn>, StoreError> {
        let mut records = Vec::with_capacity(Kind::ALL.len());
        for def in Kind::ALL.map(records_table) {
            records.push(txn.open_table(def)?);
        }
        Ok(Tables {
            records,
            children: txn.open_table(CHILDREN)?,
            gone: txn.open_table(GONE)?,
            outbox: txn.open_table(OUTBOX)?,
            quarantine: txn.open_table(QUARANTINE)?,
            uploads: txn.open_table(UPLOADS)?,
            sync_log: txn.open_table(SYNC_LOG)?,
            parked: txn.open_table(PARKED)?,
            idempotency: txn.open_table(IDEMPOTENCY)?,
            meta: txn.open_table(META)?,
            meta_str: txn.open_table(META_STR)?,
        })
    }

    pub fn get(&self, kind: Kind, id: &str) -> Result<Option<Record>, StoreError> {
        self.records[slot(kind)].get(id)?.map(|v| decode_record(v.value())).transpose()
    }

    /// What is known of a record without decoding it: the version and holders it is held at
    /// (if held), the version it was last deleted or left at (0 if never), and whether it was
    /// deleted here without an answer from the main yet.
    pub fn known(&self, kind: Kind, id: &str) -> Result<Held, StoreError> {
        let record = match self.records[slot(kind)].get(id)? {
            Some(v) => Some(
                record_head(v.value())
                    .ok_or_else(|| StoreError::Corrupt { what: "record", detail: "no version".into() })?,
            ),
            None => None,
        };
        let gone = self.gone.get((kind.code(), id))?.map_or(0, |v| v.value());
        Ok(Held { record, gone: gone & !GONE_FLAGS, deleted_here: gone & DELETED_HERE != 0 })
    }

    /// Whether the last thing known of a record not held here is that it was deleted (here, or
    /// at the main), rather than that it left this remote's targets.
    pub fn was_deleted(&self, kind: Kind, id: &str) -> Result<bool, StoreError> {
        Ok(self.gone.get((kind.code(), id))?.is_some_and(|v| v.value() & DELETED != 0))
    }

    /// Changes the holders (and version) of a held record, keeping its fields.
    pub fn set_holders(&mut self, kind: Kind, id: &str, version: u64, holders: u8) -> Result<(), StoreError> {
        let table = &mut self.records[slot(kind)];
        let mut bytes = match table.get(id)? {
            Some(v) => v.value().to_vec(),
            None => return Ok(()),
        };
        bytes[..8].copy_from_slice(&version.to_be_bytes());
        bytes[8] = holders;
        table.insert(id, bytes.as_slice())?;
        Ok(())
    }

    /// Remembers that a record not held here went at `version`, so an older copy is not applied.
    pub fn mark_gone(&mut self, kind: Kind, id: &str, version: u64) -> Result<(), StoreError> {
        // A delete made here and not yet confirmed stays one.
        let here = self.gone.get((kind.code(), id))?.map_or(0, |v| v.value() & (DELETED | DELETED_HERE));
        let here = if here & DELETED_HERE != 0 { here } else { 0 };
        self.gone.insert((kind.code(), id), version | here)?;
        Ok(())
    }

    /// Whether the record was deleted here and the main has not sent the delete back yet.
    pub fn deleted_here(&self, kind: Kind, id: &str) -> Result<bool, StoreError> {
        Ok(self.gone.get((kind.code(), id))?.is_some_and(|v| v.value() & DELETED_HERE != 0))
    }

    /// Clears [`DELETED_HERE`], once the main has answered about the record.
    pub fn settle_delete_here(&mut self, kind: Kind, id: &str) -> Result<(), StoreError> {
        let Some(gone) = self.gone.get((kind.code(), id))?.map(|v| v.value()) else { return Ok(()) };
        if gone & DELETED_HERE != 0 {
            self.gone.insert((kind.code(), id), gone & !DELETED_HERE)?;
        }
        Ok(())
    }

    /// Deletes a record at a remote, by a local edit: like [`Tables::delete`], and marked as
    /// [`DELETED_HERE`] until the main's delete (or its refusal of it) comes back.
    pub fn delete_here(&mut self, kind: Kind, id: &str, version: u64) -> Result<(), StoreError> {
        self.remove(kind, id, version)?;
        self.gone.insert((kind.code(), id), version | DELETED | DELETED_HERE)?;
        Ok(())
    }

    pub fn put(&mut self, kind: Kind, id: &str, stored: &Record) -> Result<(), StoreError> {
        if let Some(field) = kind.parent_field() {
            let new_parent = crate::model::text(&stored.fields, field);
            let old = self.get(kind, id)?;
            let old_parent = old.as_ref().and_then(|o| crate::model::text(&o.fields, field));
            if let Some(old_parent) = old_parent.filter(|p| Some(*p) != new_parent) {
                self.children.remove((old_parent, kind.code(), id))?;
            }
            if let Some(parent) = new_parent {
                self.children.insert((parent, kind.code(), id), ())?;
            }
        }
        self.records[slot(kind)].insert(id, encode_record(stored).as_slice())?;
        self.gone.remove((kind.code(), id))?;
        Ok(())
    }

    /// Removes a record, remembering the version it went at so an older copy arriving later
    /// is not applied. Returns the record that was held.
    pub fn remove(&mut self, kind: Kind, id: &str, version: u64) -> Result<Option<Record>, StoreError> {
        let old = self.records[slot(kind)].remove(id)?.map(|v| decode_record(v.value())).transpose()?;
        if let Some(parent) =
            old.as_ref().and_then(|o| kind.parent_field().and_then(|f| crate::model::text(&o.fields, f)))
        {
            self.children.remove((parent, kind.code(), id))?;
        }
        if version > 0 {
            self.gone.insert((kind.code(), id), version)?;
        }
        Ok(old)
    }

    /// Removes a record that was deleted (not only left): like [`Tables::remove`], and marked
    /// so that [`Tables::was_deleted`] says so, also when it never had a version here.
    pub fn delete(&mut self, kind: Kind, id: &str, version: u64) -> Result<Option<Record>, StoreError> {
        let old = self.remove(kind, id, version)?;
        self.gone.insert((kind.code(), id), version | DELETED)?;
        Ok(old)
    }

    /// Up to `limit` records of `kind` after `after`, in id order: for scans that change other
    /// tables between pages, with memory bounded by the page.
    fn page(&self, kind: Kind, after: Option<&str>, limit: usize) -> Result<Vec<(String, Record)>, StoreError> {
        let table = &self.records[slot(kind)];
        let range = match after {
            Some(after) => table.range::<&str>((std::ops::Bound::Excluded(after), std::ops::Bound::Unbounded))?,
            None => table.range::<&str>(..)?,
        };
        let mut out = Vec::with_capacity(limit.min(1024));
        for item in range.take(limit) {
            let (k, v) = item?;
            out.push((k.value().to_owned(), decode_record(v.value())?));
        }
        Ok(out)
    }

    /// Calls `f` with every record of `kind`, in id order, reading `page` records at a time so
    /// a scan of millions holds one page in memory; `f` may write through the tables.
    pub fn scan(
        &mut self,
        kind: Kind,
        page: usize,
        mut f: impl FnMut(&mut Tables<'txn>, &str, &Record) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        let mut after: Option<String> = None;
        loop {
            let records = self.page(kind, after.as_deref(), page)?;
            for (id, stored) in &records {
                f(self, id, stored)?;
            }
            match records.last() {
                Some((id, _)) if records.len() == page => after = Some(id.clone()),
                _ => return Ok(()),
            }
        }
    }

    /// Every record of `kind`, in id order.
    pub fn for_each(&self, kind: Kind, mut f: impl FnMut(&str, Record)) -> Result<(), StoreError> {
        for item in self.records[slot(kind)].iter()? {
            let (k, v) = item?;
            f(k.value(), decode_record(v.value())?);
        }
        Ok(())
    }

    pub fn children(&self, parent: &str) -> Result<Vec<(Kind, String)>, StoreError> {
        children_of(&self.children, parent)
    }

    pub fn push_outbox(&mut self, entry: &OutboxEntry) -> Result<(), StoreError> {
        append(&mut self.outbox, &mut self.meta, "outbox_next", entry)
    }

    /// Drops outbox entries up to and including `last`, once NATS acknowledged them.
    pub fn pop_outbox(&mut self, last: u64) -> Result<(), StoreError> {
        self.outbox.retain_in(..=last, |_, _| false)?;
        Ok(())
    }

    /// Queues a remote's edit for `CRM_UP`.
    pub fn push_upload(&mut self, upload: &Upload) -> Result<(), StoreError> {
        append(&mut self.uploads, &mut self.meta, UPLOADS_NEXT, upload)
    }

    /// Drops uploads up to and including `last`, once `CRM_UP` acknowledged them.
    pub fn pop_uploads(&mut self, last: u64) -> Result<(), StoreError> {
        self.uploads.retain_in(..=last, |_, _| false)?;
        Ok(())
    }

    pub fn log(&mut self, entry: &LogEntry) -> Result<(), StoreError> {
        append(&mut self.sync_log, &mut self.meta, "sync_log_next", entry)
    }

    /// The change committed with a client's idempotency key, if any.
    pub fn key_entry(&self, key: &str) -> Result<Option<KeyEntry>, StoreError> {
        self.idempotency.get(key)?.map(|v| KeyEntry::decode(v.value())).transpose()
    }

    pub fn remember_key(&mut self, key: &str, entry: &KeyEntry) -> Result<(), StoreError> {
        self.idempotency.insert(key, rmp_serde::to_vec(entry).expect("a key entry encodes").as_slice())?;
        Ok(())
    }

    /// Forgets idempotency keys applied before `before_ms`.
    pub fn forget_keys(&mut self, before_ms: u64) -> Result<(), StoreError> {
        self.idempotency.retain(|_, v| KeyEntry::decode(v).is_ok_and(|e| e.at_ms >= before_ms))?;
        Ok(())
    }

    pub fn park(&mut self, queue: &str, n: u64, parked: &Parked) -> Result<(), StoreError> {
        self.parked.insert((queue, n), rmp_serde::to_vec(parked).expect("a parked upload encodes").as_slice())?;
        Ok(())
    }

    /// Records that a remote's upload queue is merged up to `next` (never moving back), and
    /// drops its parked uploads below it.
    pub fn advance_upload(&mut self, queue: &str, next: u64) -> Result<(), StoreError> {
        let key = next_upload_key(queue);
        if self.meta(&key)? < next {
            self.set_meta(&key, next)?;
        }
        self.unpark_below(queue, next)
    }

    /// Drops the parked uploads of a queue numbered below `next` (merged, or duplicates).
    pub fn unpark_below(&mut self, queue: &str, next: u64) -> Result<(), StoreError> {
        self.parked.retain_in((queue, 0)..(queue, next), |_, _| false)?;
        Ok(())
    }

    /// Keeps the message at stream position `seq`, which cannot be applied, with why: the
    /// projection goes on past it, and `status` shows it.
    pub fn quarantine(&mut self, seq: u64, subject: &str, payload: &[u8], error: String) -> Result<(), StoreError> {
        tracing::warn!(seq, subject, "quarantined a message: {error}");
        let entry = Quarantined { subject: subject.to_owned(), error, payload: payload.to_vec() };
        self.quarantine.insert(seq, rmp_serde::to_vec(&entry).expect("quarantine entry encodes").as_slice())?;
        Ok(())
    }

    pub fn meta(&self, key: &str) -> Result<u64, StoreError> {
        Ok(self.meta.get(key)?.map(|v| v.value()).unwrap_or(0))
    }

    pub fn set_meta(&mut self, key: &str, value: u64) -> Result<(), StoreError> {
        self.meta.insert(key, value)?;
        Ok(())
    }

    pub fn meta_str(&self, key: &str) -> Result<Option<String>, StoreError> {
        Ok(self.meta_str.get(key)?.map(|v| v.value().to_owned()))
    }

    pub fn set_meta_str(&mut self, key: &str, value: &str) -> Result<(), StoreError> {
        self.meta_str.insert(key, value)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::apply::HELD_BY_SUBSCRIPTION;
    use crate::model::{Field, Value};

    #[test]
    fn records_round_trip_and_their_version_reads_without_decoding() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("t.redb")).unwrap();
        let fields: Fields = [("city".to_string(), Field { value: Value::Str("Albany".into()), stamp: 3 })].into();
        let stored = Record { version: 42, holders: HELD_BY_SUBSCRIPTION, fields };
        store.write(true, |t| t.put(Kind::Contact, "c1", &stored)).unwrap();
        assert_eq!(store.get(Kind::Contact, "c1").unwrap(), Some(stored));
        let known = store.write(false, |t| t.known(Kind::Contact, "c1")).unwrap();
        assert_eq!(known, Held { record: Some((42, HELD_BY_SUBSCRIPTION)), gone: 0, deleted_here: false });
    }

    #[test]
    fn a_delete_is_told_from_a_leave_and_both_keep_their_version() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("t.redb")).unwrap();
        let (deleted, left, local) = store
            .write(true, |t| {
                for id in ["deleted", "left", "local"] {
                    t.put(Kind::Contact, id, &Record::new(5, Fields::new()))?;
                }
                t.delete(Kind::Contact, "deleted", 7)?;
                t.remove(Kind::Contact, "left", 8)?;
                t.delete(Kind::Contact, "local", 0)?; // created here, never merged
                Ok((
                    t.known(Kind::Contact, "deleted")?,
                    t.known(Kind::Contact, "left")?,
                    t.known(Kind::Contact, "local")?,
                ))
            })
            .unwrap();
        let gone = |v| Held { record: None, gone: v, deleted_here: false };
        assert_eq!((deleted, left, local), (gone(7), gone(8), gone(0)));
        assert_eq!(store.get_known(Kind::Contact, "deleted").unwrap(), (None, 7));
        let flags = store
            .write(true, |t| {
                let flags = [t.was_deleted(Kind::Contact, "deleted")?, t.was_deleted(Kind::Contact, "left")?];
                let local = t.was_deleted(Kind::Contact, "local")?;
                // The main creating the id again clears the mark.
                t.put(Kind::Contact, "deleted", &Record::new(9, Fields::new()))?;
                Ok((flags, local, t.was_deleted(Kind::Contact, "deleted")?))
            })
            .unwrap();
        assert_eq!(flags, ([true, false], true, false));
    }

    #[test]
    fn a_file_of_another_storage_format_is_refused_until_rebuilt() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.redb");
        let store = Store::open(&path).unwrap();
        store
            .write(true, |t| {
                t.put(Kind::Contact, "c1", &Record::new(1, Fields::new()))?;
                t.set_meta(FORMAT_KEY, FORMAT + 1)
            })
            .unwrap();
        drop(store);
        let err = Store::open(&path).err().unwrap().to_string();
        assert!(err.contains("another version of crmsync") && err.contains("rebuild"), "{err}");
        let store = Store::open_any_format(&path).unwrap();
        store.clear_projection(|_| Ok(())).unwrap();
        drop(store);
        let store = Store::open(&path).unwrap();
        assert_eq!(store.get(Kind::Contact, "c1").unwrap(), None);
    }
}
