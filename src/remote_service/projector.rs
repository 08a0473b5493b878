//! The remote's projector: applies a batch of `CRM_SYNC` messages to the remote's projection,
//! carrying out the core's [`crate::apply::decide`] in the transaction it is given.

use std::collections::BTreeMap;

use crate::apply::{self, Action, Refreshed};
use crate::model::Record;
use crate::store::{APPLIED, LogEntry, StoreError, Tables};
use crate::transport::Incoming;
use crate::wire::{self, Decoded, Envelope, Foreign, Op};

/// What one batch did.
#[derive(Debug, Default)]
pub struct Applied {
    /// How many messages of the batch were applied (or quarantined): a prefix of it.
    pub taken: usize,
    /// Records written or removed (older versions and duplicates are skipped).
    pub changed: usize,
    pub quarantined: usize,
    /// Changes from the main that met an edit made here not merged yet (merged field by field).
    pub conflicts: usize,
    /// A message of another product, schema or database: the batch stops before it.
    pub foreign: Option<Foreign>,
}

/// Applies a batch. `refreshed` holds, by stream sequence, the main's state of each record whose
/// edit a message of the batch says was refused.
pub fn apply_batch(
    t: &mut Tables<'_>,
    db_id: &str,
    batch: &[Incoming],
    refreshed: &BTreeMap<u64, Refreshed>,
) -> Result<Applied, StoreError> {
    let mut out = Applied::default();
    let mut position = t.meta(APPLIED)?;
    for msg in batch {
        match wire::decode_checked(&msg.payload, db_id) {
            Decoded::Ok(env) if env.op == Op::Reject => {
                take_back(t, env, refreshed.get(&msg.seq))?;
                out.changed += 1;
            }
            Decoded::Ok(env) if env.kind.is_routed() => {
                apply_one(t, apply::target_bit(&msg.subject), env, &mut out)?;
            }
            Decoded::Ok(env) => {
                let why = format!("a {} record does not belong on CRM_SYNC", env.kind);
                t.quarantine(msg.seq, &msg.subject, &msg.payload, why)?;
                out.quarantined += 1;
            }
            Decoded::Foreign(f) => {
                out.foreign = Some(f);
                break;
            }
            Decoded::Malformed(e) => {
                t.quarantine(msg.seq, &msg.subject, &msg.payload, format!("does not decode: {e}"))?;
                out.quarantined += 1;
            }
        }
        // A redelivered older message must not move the position back.
        position = position.max(msg.seq);
        out.taken += 1;
    }
    t.set_meta(APPLIED, position)?;
    Ok(out)
}

/// Carries out the core's [`apply::decide`] for one message from one target, counting what it
/// did in `out`.
fn apply_one(t: &mut Tables<'_>, bit: u8, env: Envelope, out: &mut Applied) -> Result<(), StoreError> {
    let (kind, v) = (env.kind, env.version);
    match apply::decide(t.known(kind, &env.id)?, bit, env.op, v) {
        Action::Skip => return Ok(()),
        Action::Put { holders, merge_local } => {
            let mut fields = env.record.unwrap_or_default();
            if merge_local
                && let Some(local) = t.get(kind, &env.id)?
                && let Some(merged) = crate::merge::merge(kind, &fields, &local.fields)
            {
                fields = merged;
                out.conflicts += 1;
            }
            t.put(kind, &env.id, &Record { version: v, holders, fields })?;
        }
        Action::SetHolders { holders } => t.set_holders(kind, &env.id, v, holders)?,
        Action::Remove => {
            t.remove(kind, &env.id, v)?;
        }
        Action::MarkGone => t.mark_gone(kind, &env.id, v)?,
        Action::Delete => {
            t.delete(kind, &env.id, v)?;
        }
    }
    out.changed += 1;
    Ok(())
}

/// The main refused an edit made here: the refusal goes into the sync log with the edit, and
/// the record becomes the main's again (or goes, if none of this remote's targets holds it).
fn take_back(t: &mut Tables<'_>, env: Envelope, refreshed: Option<&Refreshed>) -> Result<(), StoreError> {
    let reason = env.reason.clone().unwrap_or_else(|| "the main refused the edit".into());
    tracing::warn!(kind = %env.kind, id = %env.id, "the main refused an edit: {reason}");
    t.log(&LogEntry {
        at_ms: crate::hlc::wall_ms(),
        remote: env.origin.clone(),
        kind: env.kind,
        id: env.id.clone(),
        event: env.event.clone(),
        reason,
        edit: env.record,
    })?;
    // The main has answered about this record: a delete made here is settled.
    t.settle_delete_here(env.kind, &env.id)?;
    let Some(refreshed) = refreshed else { return Ok(()) };
    match &refreshed.state {
        Some(stored) => t.put(env.kind, &env.id, stored),
        None if refreshed.deleted => t.delete(env.kind, &env.id, refreshed.version).map(|_| ()),
        None => t.remove(env.kind, &env.id, refreshed.version).map(|_| ()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Field, Kind, Value};
    use crate::store::Store;
    use crate::wire::{PRODUCT, SCHEMA_MAJOR};

    fn msg(seq: u64, op: Op, version: u64) -> Incoming {
        let record = (op == Op::Upsert)
            .then(|| [("city".to_string(), Field { value: Value::Str(format!("v{version}")), stamp: version })].into());
        let env = Envelope {
            product: PRODUCT.into(),
            schema: SCHEMA_MAJOR,
            db: "db".into(),
            event: format!("e{seq}"),
            kind: Kind::Contact,
            id: "x".into(),
            op,
            version,
            origin: "main".into(),
            record,
            reason: None,
        };
        Incoming {
            seq,
            pending: 0,
            subject: wire::sync_subject(&wire::Target::Set("all".into()), Kind::Contact, "x"),
            payload: env.encode().into(),
            idempotency_key: None,
            upload_order: None,
        }
    }

    #[test]
    fn a_record_deleted_here_does_not_come_back_before_the_main_sends_the_delete() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("r.redb")).unwrap();
        let apply = |m: Incoming| store.write(true, |t| apply_batch(t, "db", &[m], &BTreeMap::new())).unwrap();
        apply(msg(1, Op::Upsert, 5));
        store.write(true, |t| t.delete_here(Kind::Contact, "x", 5)).unwrap();
        // An edit the main made before it merged the delete arrives: the record stays deleted.
        apply(msg(2, Op::Upsert, 7));
        assert_eq!(store.get(Kind::Contact, "x").unwrap(), None);
        // The main's delete settles it; a record made again at the main later shows.
        apply(msg(3, Op::Delete, 8));
        apply(msg(4, Op::Upsert, 9));
        assert_eq!(store.get(Kind::Contact, "x").unwrap().map(|s| s.version), Some(9));
    }
}
