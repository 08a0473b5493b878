//! Applying a batch of `CRM_SYNC` messages to a remote's projection. Pure of IO beyond the
//! transaction it is given: no NATS, no clock.

use crate::store::{APPLIED, HELD_BY_SET, HELD_BY_SUBSCRIPTION, Quarantined, StoreError, Stored, Tables};
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
    /// A message of another product, schema or database: the batch stops before it.
    pub foreign: Option<Foreign>,
}

pub fn apply_batch(t: &mut Tables<'_>, db_id: &str, batch: &[Incoming]) -> Result<Applied, StoreError> {
    let mut out = Applied::default();
    let mut position = t.meta(APPLIED)?;
    for msg in batch {
        match wire::decode_checked(&msg.payload, db_id) {
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
    let (held, gone) = t.known(kind, &env.id)?;
    let known = held.map(|(version, _)| version).unwrap_or(0).max(gone);
    match (env.op, held) {
        (Op::Upsert, _) if v > known => {
            let holders = held.map(|(_, h)| h).unwrap_or(0) | bit;
            let stored = Stored { version: v, holders, fields: env.record.unwrap_or_default() };
            t.put(kind, &env.id, &stored)?;
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
            t.remove(kind, &env.id, v)?;
        }
        _ => return Ok(false),
    }
    Ok(true)
}

fn quarantine(t: &mut Tables<'_>, msg: &Incoming, error: String) -> Result<(), StoreError> {
    tracing::warn!(seq = msg.seq, subject = %msg.subject, "quarantined a message: {error}");
    t.quarantine(msg.seq, &Quarantined { subject: msg.subject.clone(), error, payload: msg.payload.to_vec() })
}
