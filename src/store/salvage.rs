//! Reading what can be read of a damaged file, for the services to set it aside and rebuild.

use super::*;

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
    pub sessions: Vec<SessionReport>,
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
                out.unreadable = vec!["meta", "uploads", "parked", "sync_log", "sessions", "outbox"];
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
        read("sessions", &mut out, &mut |txn, out| {
            for item in txn.open_table(SESSIONS)?.iter()? {
                out.sessions.push(decode_entry::<SessionReport>(item?, "sync session")?.1);
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
        for report in &self.sessions {
            t.log_session(report)?;
        }
        Ok(())
    }
}
