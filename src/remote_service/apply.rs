//! Applying a batch of `CRM_SYNC` messages to a remote's projection. Pure of IO beyond the
//! transaction it is given: no NATS, no clock.

use crate::store::{APPLIED, Quarantined, StoreError, Stored, Tables};
use crate::transport::Incoming;
use crate::wire::{self, Decoded, Foreign, Op};

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
                let known = t.known_version(env.kind, &env.id)?;
                if env.version > known {
                    match env.op {
                        Op::Upsert => {
                            let stored = Stored { version: env.version, fields: env.record.unwrap_or_default() };
                            t.put(env.kind, &env.id, &stored)?;
                        }
                        Op::Delete | Op::Leave => {
                            t.remove(env.kind, &env.id, env.version)?;
                        }
                    }
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

fn quarantine(t: &mut Tables<'_>, msg: &Incoming, error: String) -> Result<(), StoreError> {
    tracing::warn!(seq = msg.seq, subject = %msg.subject, "quarantined a message: {error}");
    t.quarantine(msg.seq, &Quarantined { subject: msg.subject.clone(), error, payload: msg.payload.to_vec() })
}
