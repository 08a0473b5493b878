//! The tables of one write transaction.

use super::*;

/// The tables of one write transaction, opened once for the whole batch.
pub struct Tables<'txn> {
    pub(super) records: Vec<Table<'txn, &'static str, &'static [u8]>>,
    pub(super) children: Table<'txn, ChildKey, ()>,
    pub(super) gone: Table<'txn, (u8, &'static str), u64>,
    pub(super) outbox: Table<'txn, u64, &'static [u8]>,
    pub(super) quarantine: Table<'txn, u64, &'static [u8]>,
    pub(super) uploads: Table<'txn, u64, &'static [u8]>,
    pub(super) sync_log: Table<'txn, u64, &'static [u8]>,
    sessions: Table<'txn, u64, &'static [u8]>,
    pub(super) parked: Table<'txn, (&'static str, u64), &'static [u8]>,
    pub(super) idempotency: Table<'txn, &'static str, &'static [u8]>,
    pub(super) meta: Table<'txn, &'static str, u64>,
    pub(super) meta_str: Table<'txn, &'static str, &'static str>,
}

impl<'txn> Tables<'txn> {
    pub(super) fn open(txn: &'txn WriteTransaction) -> Result<Tables<'txn>, StoreError> {
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
            sessions: txn.open_table(SESSIONS)?,
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
    pub(super) fn page(
        &self,
        kind: Kind,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<(String, Record)>, StoreError> {
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

    /// Adds a sync session to the sessions log.
    pub fn log_session(&mut self, report: &SessionReport) -> Result<(), StoreError> {
        append(&mut self.sessions, &mut self.meta, SESSIONS_NEXT, report)
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
