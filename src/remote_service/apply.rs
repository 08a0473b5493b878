//! Applying a batch of `CRM_SYNC` messages to a remote's projection. Pure of IO beyond the
//! transaction it is given: no NATS, no clock.

use std::collections::BTreeMap;

use crate::store::{
    APPLIED, HELD_BY_SET, HELD_BY_SUBSCRIPTION, HELD_LOCALLY, LogEntry, Quarantined, StoreError, Stored, Tables,
};
use crate::transport::Incoming;
use crate::wire::{self, Decoded, Envelope, Foreign, Op};

/// The main's current state of a record, read from the remote's targets in `CRM_SYNC` when the
/// main refused an edit of it: what the remote takes back.
#[derive(Debug, Clone, PartialEq)]
pub struct Refreshed {
    /// The record as the remote's targets hold it, with their holder bits; `None` if none does.
    pub state: Option<Stored>,
    /// The newest version seen, also of a delete or leave.
    pub version: u64,
    /// Whether the newest message seen is a delete.
    pub deleted: bool,
}

impl Refreshed {
    /// Combines the last message of each target (`None`: the target never held the record).
    pub fn from_targets(messages: &[(u8, Option<Envelope>)]) -> Refreshed {
        let mut out = Refreshed { state: None, version: 0, deleted: false };
        for (bit, env) in messages {
            let Some(env) = env else { continue };
            if env.version >= out.version {
                out.deleted = env.op == Op::Delete;
            }
            out.version = out.version.max(env.version);
            if env.op != Op::Upsert {
                continue;
            }
            match &mut out.state {
                Some(held) if held.version >= env.version => held.holders |= bit,
                state => {
                    let holders = state.as_ref().map_or(0, |s| s.holders) | bit;
                    *state =
                        Some(Stored { version: env.version, holders, fields: env.record.clone().unwrap_or_default() });
                }
            }
        }
        out
    }
}

/// What one batch did.
#[derive(Debug, Default)]
pub struct Applied {
    /// How many messages of the batch were applied (or quarantined): a prefix of it.
    pub taken: usize,
    /// Records written or removed (older versions and duplicates are skipped).
    pub changed: usize,
    pub quarantined: usize,
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
                if apply_one(t, target_bit(&msg.subject), env)? {
                    out.changed += 1;
                }
            }
            Decoded::Ok(env) => {
                let why = format!("a {} record does not belong on CRM_SYNC", env.kind);
                quarantine(t, msg, why)?;
                out.quarantined += 1;
            }
            Decoded::Foreign(f) => {
                out.foreign = Some(f);
                break;
            }
            Decoded::Malformed(e) => {
                quarantine(t, msg, format!("does not decode: {e}"))?;
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

/// Which of the remote's targets a message comes from, by its subject.
fn target_bit(subject: &str) -> u8 {
    match subject.strip_prefix("crm.sync.") {
        Some(rest) if rest.starts_with('~') => HELD_BY_SUBSCRIPTION,
        _ => HELD_BY_SET,
    }
}

/// Applies one message from one target. The remote holds a record while at least one of its
/// targets holds it: an upsert adds the target, a leave takes it away, and the record goes
/// when no target is left (or at once, when the main deleted it). Versions only move forward:
/// a message older than what is known is skipped, and one of the same version only changes
/// which targets hold the record (one change may enter one target and leave another).
fn apply_one(t: &mut Tables<'_>, bit: u8, env: Envelope) -> Result<bool, StoreError> {
    let (kind, v) = (env.kind, env.version);
    if env.op == Op::Upsert && t.deleted_here(kind, &env.id)? {
        // Deleted here, on its way to the main: a version from before the main merged the
        // delete must not bring it back. The main's delete, or its refusal, comes next.
        return Ok(false);
    }
    let (held, gone) = t.known(kind, &env.id)?;
    let known = held.map(|(version, _)| version).unwrap_or(0).max(gone);
    match (env.op, held) {
        (Op::Upsert, _) if v > known => {
            let mut fields = env.record.unwrap_or_default();
            let mut holders = bit;
            if let Some((_, h)) = held {
                // The main's copy replaces a record created here; edits made here since the
                // main's last version (newer stamps) stay until the main merges them.
                holders |= h & !HELD_LOCALLY;
                if let Some(local) = t.get(kind, &env.id)?
                    && let Some(merged) = crate::merge::merge(kind, &fields, &local.fields)
                {
                    fields = merged;
                }
            }
            t.put(kind, &env.id, &Stored { version: v, holders, fields })?;
        }
        (Op::Upsert, Some((version, holders))) if v == version && holders & bit == 0 => {
            t.set_holders(kind, &env.id, version, holders | bit)?;
        }
        (Op::Leave, Some((version, holders))) if v >= version => {
            let left = holders & !bit;
            if left == 0 {
                t.remove(kind, &env.id, v)?;
            } else {
                t.set_holders(kind, &env.id, v, left)?;
            }
        }
        (Op::Leave, None) if v > gone => t.mark_gone(kind, &env.id, v)?,
        (Op::Delete, _) if v >= known => {
            t.delete(kind, &env.id, v)?;
        }
        _ => return Ok(false),
    }
    Ok(true)
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

fn quarantine(t: &mut Tables<'_>, msg: &Incoming, error: String) -> Result<(), StoreError> {
    tracing::warn!(seq = msg.seq, subject = %msg.subject, "quarantined a message: {error}");
    t.quarantine(msg.seq, &Quarantined { subject: msg.subject.clone(), error, payload: msg.payload.to_vec() })
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
            subject: "crm.sync.all.contact.x".into(),
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
