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
//! | `sessions` | sequence | [`SessionReport`]: a sync session that moved something (a remote's own, or at the main each remote's) |
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
use crate::wire::SessionReport;

mod entries;
mod salvage;
mod tables;

pub use entries::{KeyEntry, LogEntry, Parked, Quarantined};
pub use salvage::{Recovery, Salvage, set_aside};
pub use tables::Tables;

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
const SESSIONS: TableDefinition<u64, &[u8]> = TableDefinition::new("sessions");
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
/// The number the next sync session logged gets.
pub const SESSIONS_NEXT: &str = "sessions_next";
/// When a remote last completed a sync session: at the remote, under this name; at the main,
/// one per remote under [`last_sync_key`].
pub const LAST_SYNC: &str = "last_sync";

/// Where the main keeps when `remote` last synced.
pub fn last_sync_key(remote: &str) -> String {
    format!("{LAST_SYNC}:{remote}")
}

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

    /// An error that passes by itself: the file cannot be written now, or is being opened
    /// again after a failed write (the old handle still in use, or just closed).
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            StoreError::Unwritable { .. } | StoreError::InUse(_) | StoreError::Redb(redb::Error::DatabaseClosed)
        )
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
        let (found, empty) = store.reading(|txn| {
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
            // The handle is let go at once: one held through `f` would keep a failed file from
            // closing if `f` reads.
            let mut txn = self.db()?.begin_write()?;
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
        let txn = self.db()?.begin_write()?;
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

    /// Runs a read. After a failed write redb refuses every other call on the file until it is
    /// opened again: a read caught by that opens it again (once the calls using it end) and
    /// reads again, so reads go on through a full disk.
    ///
    /// It is the only way to begin a read transaction, so no read can miss the retry.
    fn reading<R>(&self, mut f: impl FnMut(&ReadTransaction) -> Result<R, StoreError>) -> Result<R, StoreError> {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
        loop {
            match guard(&self.path, || f(&self.db()?.begin_read()?)) {
                // The file this read used was closed, or refuses every call after a failed
                // write: open it again (once the calls using it end) and read again.
                Err(StoreError::Redb(redb::Error::DatabaseClosed) | StoreError::Unwritable { .. })
                    if std::time::Instant::now() < deadline =>
                {
                    self.close_after_failed_write();
                }
                // Opened again while the old handle was still in use: wait for it to go.
                Err(StoreError::InUse(_)) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
                other => return other,
            }
        }
    }

    pub fn get(&self, kind: Kind, id: &str) -> Result<Option<Record>, StoreError> {
        self.reading(|txn| {
            let table = txn.open_table(records_table(kind))?;
            table.get(id)?.map(|v| decode_record(v.value())).transpose()
        })
    }

    /// A record and the version it is known at (held, or deleted at).
    pub fn get_known(&self, kind: Kind, id: &str) -> Result<(Option<Record>, u64), StoreError> {
        self.reading(|txn| {
            let held = txn.open_table(records_table(kind))?.get(id)?.map(|v| decode_record(v.value())).transpose()?;
            let gone = txn.open_table(GONE)?.get((kind.code(), id))?.map(|v| v.value() & !GONE_FLAGS).unwrap_or(0);
            let known = held.as_ref().map(|s| s.version).unwrap_or(0).max(gone);
            Ok((held, known))
        })
    }

    /// Whether a delete made here of this record still waits for the main's answer.
    pub fn deleted_here(&self, kind: Kind, id: &str) -> Result<bool, StoreError> {
        self.reading(|txn| {
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
        self.reading(|txn| {
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
        })
    }

    /// Every record of `kind`, for scans that must see all of them (routing a new set).
    pub fn for_each(&self, kind: Kind, mut f: impl FnMut(&str, Record)) -> Result<(), StoreError> {
        self.reading(|txn| {
            let table = txn.open_table(records_table(kind))?;
            for item in table.iter()? {
                let (k, v) = item?;
                f(k.value(), decode_record(v.value())?);
            }
            Ok(())
        })
    }

    pub fn counts(&self) -> Result<BTreeMap<Kind, u64>, StoreError> {
        self.reading(|txn| {
            let mut out = BTreeMap::new();
            for kind in Kind::ALL {
                out.insert(kind, txn.open_table(records_table(kind))?.len()?);
            }
            Ok(out)
        })
    }

    /// A meta value, `None` if it was never set.
    pub fn meta_opt(&self, key: &str) -> Result<Option<u64>, StoreError> {
        self.reading(|txn| Ok(txn.open_table(META)?.get(key)?.map(|v| v.value())))
    }

    pub fn meta(&self, key: &str) -> Result<u64, StoreError> {
        self.reading(|txn| Ok(txn.open_table(META)?.get(key)?.map(|v| v.value()).unwrap_or(0)))
    }

    pub fn meta_str(&self, key: &str) -> Result<Option<String>, StoreError> {
        self.reading(|txn| Ok(txn.open_table(META_STR)?.get(key)?.map(|v| v.value().to_owned())))
    }

    /// The oldest outbox entries, in order, up to about `messages` messages.
    pub fn outbox_head(&self, messages: usize) -> Result<Vec<(u64, OutboxEntry)>, StoreError> {
        self.reading(|txn| {
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
        self.reading(|txn| Ok(txn.open_table(OUTBOX)?.len()?))
    }

    /// Quarantined messages, newest last, at most `limit`, and how many there are.
    pub fn quarantine(&self, limit: usize) -> Result<(u64, Vec<(u64, Quarantined)>), StoreError> {
        self.newest(QUARANTINE, "quarantined message", limit)
    }

    /// The oldest uploads waiting for `CRM_UP`, in order, at most `limit`.
    pub fn uploads_head(&self, limit: usize) -> Result<Vec<(u64, Upload)>, StoreError> {
        self.reading(|txn| {
            let table = txn.open_table(UPLOADS)?;
            table.iter()?.take(limit).map(|item| decode_entry(item?, "upload")).collect()
        })
    }

    pub fn uploads_len(&self) -> Result<u64, StoreError> {
        self.reading(|txn| Ok(txn.open_table(UPLOADS)?.len()?))
    }

    /// The sync log: refused edits, newest last, at most `limit`, and how many there are.
    pub fn sync_log(&self, limit: usize) -> Result<(u64, Vec<(u64, LogEntry)>), StoreError> {
        self.newest(SYNC_LOG, "sync log entry", limit)
    }

    /// The newest `limit` sync sessions, of `remote` only if given, oldest first.
    pub fn sessions(&self, remote: Option<&str>, limit: usize) -> Result<Vec<SessionReport>, StoreError> {
        self.reading(|txn| {
            let table = txn.open_table(SESSIONS)?;
            let mut out = Vec::new();
            for item in table.iter()?.rev() {
                if out.len() >= limit {
                    break;
                }
                let (_, report): (u64, SessionReport) = decode_entry(item?, "sync session")?;
                if remote.is_none_or(|r| r == report.remote) {
                    out.push(report);
                }
            }
            out.reverse();
            Ok(out)
        })
    }

    fn newest<T: serde::de::DeserializeOwned>(
        &self,
        def: TableDefinition<u64, &[u8]>,
        what: &'static str,
        limit: usize,
    ) -> Result<(u64, Vec<(u64, T)>), StoreError> {
        self.reading(|txn| {
            let table = txn.open_table(def)?;
            let total = table.len()?;
            let mut out =
                table.iter()?.rev().take(limit).map(|item| decode_entry(item?, what)).collect::<Result<Vec<_>, _>>()?;
            out.reverse();
            Ok((total, out))
        })
    }

    /// The ids of a contact's children, by kind.
    pub fn children(&self, parent: &str) -> Result<Vec<(Kind, String)>, StoreError> {
        self.reading(|txn| children_of(&txn.open_table(CHILDREN)?, parent))
    }

    /// The parked uploads of one upload queue from number `from` on, in order, at most `limit`.
    pub fn parked(&self, queue: &str, from: u64, limit: usize) -> Result<Vec<(u64, Parked)>, StoreError> {
        self.reading(|txn| {
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
        self.reading(|txn| txn.open_table(IDEMPOTENCY)?.get(key)?.map(|v| KeyEntry::decode(v.value())).transpose())
    }

    /// The upload queues that have parked uploads.
    pub fn parked_queues(&self) -> Result<std::collections::BTreeSet<String>, StoreError> {
        self.reading(|txn| {
            let mut out = std::collections::BTreeSet::new();
            for item in txn.open_table(PARKED)?.iter()? {
                out.insert(item?.0.value().0.to_owned());
            }
            Ok(out)
        })
    }

    /// How many uploads are parked, waiting for an earlier upload of their queue.
    /// Uploads kept at the main (parked), by the remote they come from: one read of the table
    /// for any number of remotes.
    pub fn parked_by_remote(&self) -> Result<BTreeMap<String, u64>, StoreError> {
        self.reading(|txn| {
            let mut out = BTreeMap::new();
            for item in txn.open_table(PARKED)?.iter()? {
                let (_, v) = item?;
                let parked: Parked = rmp_serde::from_slice(v.value())
                    .map_err(|e| StoreError::Corrupt { what: "parked upload", detail: e.to_string() })?;
                if let Some(remote) = crate::wire::up_remote(&parked.subject) {
                    *out.entry(remote.to_owned()).or_default() += 1;
                }
            }
            Ok(out)
        })
    }

    pub fn parked_len(&self) -> Result<u64, StoreError> {
        self.reading(|txn| Ok(txn.open_table(PARKED)?.len()?))
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
