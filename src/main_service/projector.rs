//! The main's projector: applies `CRM_EVENTS` to the main's redb in stream order and, in the
//! same transaction, writes what routing must publish into the outbox.
//!
//! Architecture invariant: the projection, the applied position and the outbox change in one
//! transaction. A crash anywhere leaves them consistent; the outbox publisher (router.rs)
//! delivers what is in the outbox with deterministic message ids, so nothing is lost or
//! doubled.

use std::collections::BTreeSet;

use crate::model::{Fields, Kind};
use crate::routing::{self, SetDef};
use crate::store::{APPLIED, OutboxEntry, Quarantined, StoreError, Stored, Tables};
use crate::transport::Incoming;
use crate::wire::{self, Decoded, Envelope, Op, Target};

/// Events below this position were routed before a rebuild and are not routed again.
pub const ROUTE_FROM: &str = "route_from";

/// Applies a batch of events. `sets` is the router's view of the sync sets, kept in step with
/// the set records as they are applied.
pub fn apply_batch(
    t: &mut Tables<'_>,
    sets: &mut Vec<SetDef>,
    db_id: &str,
    batch: &[Incoming],
) -> Result<u64, StoreError> {
    let route_from = t.meta(ROUTE_FROM)?;
    let mut last = t.meta(APPLIED)?;
    for msg in batch {
        if msg.seq <= last {
            continue;
        }
        match wire::decode_checked(&msg.payload, db_id) {
            Decoded::Ok(env) => apply_event(t, sets, msg.seq, env, msg.seq >= route_from)?,
            Decoded::Foreign(f) => {
                tracing::error!(seq = msg.seq, subject = %msg.subject, "{f}");
                quarantine(t, msg, f.to_string())?;
            }
            Decoded::Malformed(e) => {
                tracing::error!(seq = msg.seq, subject = %msg.subject, "an event does not decode: {e}");
                quarantine(t, msg, e)?;
            }
        }
        last = msg.seq;
    }
    t.set_meta(APPLIED, last)?;
    Ok(last)
}

pub fn quarantine(t: &mut Tables<'_>, msg: &Incoming, error: String) -> Result<(), StoreError> {
    t.quarantine(msg.seq, &Quarantined { subject: msg.subject.clone(), error, payload: msg.payload.to_vec() })
}

fn apply_event(
    t: &mut Tables<'_>,
    sets: &mut Vec<SetDef>,
    seq: u64,
    env: Envelope,
    route: bool,
) -> Result<(), StoreError> {
    let (kind, id) = (env.kind, env.id.as_str());
    let old = t.get(kind, id)?;
    let new = match env.op {
        Op::Upsert => Some(Stored { version: seq, fields: env.record.clone().unwrap_or_default() }),
        Op::Delete | Op::Leave => None,
    };
    match &new {
        Some(stored) => t.put(kind, id, stored)?,
        None => {
            t.remove(kind, id, seq)?;
        }
    }
    if kind == Kind::Set {
        let before = sets.iter().position(|s| s.name == id).map(|i| sets.remove(i));
        let after = new.as_ref().map(|s| SetDef::from_stored(id, s));
        if let Some(after) = &after {
            sets.push(after.clone());
            sets.sort_by(|a, b| a.name.cmp(&b.name));
        }
        if route {
            route_set_change(t, seq, &env, before.as_ref(), after.as_ref())?;
        }
    } else if route && kind.is_routed() {
        route_record(t, sets, seq, &env, old.as_ref(), new.as_ref())?;
    }
    Ok(())
}

/// The fields routing decides on: a child's contact's, or the record's own.
fn routing_basis(t: &Tables<'_>, kind: Kind, fields: &Fields) -> Result<(Kind, Option<Fields>), StoreError> {
    match kind.parent_field() {
        Some(field) => {
            let parent = crate::model::text(fields, field).map(str::to_owned);
            let parent = match parent {
                Some(p) => t.get(Kind::Contact, &p)?.map(|s| s.fields),
                None => None,
            };
            Ok((Kind::Contact, parent))
        }
        None => Ok((kind, Some(fields.clone()))),
    }
}

fn targets_of(
    t: &Tables<'_>,
    sets: &[SetDef],
    kind: Kind,
    stored: Option<&Stored>,
) -> Result<BTreeSet<Target>, StoreError> {
    let Some(stored) = stored else { return Ok(BTreeSet::new()) };
    let (basis_kind, basis) = routing_basis(t, kind, &stored.fields)?;
    Ok(match basis {
        Some(fields) => routing::targets(sets, basis_kind, &fields),
        None => BTreeSet::new(),
    })
}

fn route_record(
    t: &mut Tables<'_>,
    sets: &[SetDef],
    seq: u64,
    env: &Envelope,
    old: Option<&Stored>,
    new: Option<&Stored>,
) -> Result<(), StoreError> {
    let before = targets_of(t, sets, env.kind, old)?;
    let after = targets_of(t, sets, env.kind, new)?;
    let gone_op = if env.op == Op::Delete { Op::Delete } else { Op::Leave };
    let children = if env.kind == Kind::Contact { t.children(&env.id)? } else { Vec::new() };
    let all_after: Vec<&Target> = after.iter().collect();
    push(t, env, seq, &all_after, env.kind, &env.id, Op::Upsert, new.map(|n| &n.fields))?;
    // Move-in: a contact that enters a target brings its children.
    let entered: Vec<&Target> = if old.is_some() { after.difference(&before).collect() } else { Vec::new() };
    if !entered.is_empty() {
        for (kind, id) in &children {
            let child = t.get(*kind, id)?;
            push(t, env, seq, &entered, *kind, id, Op::Upsert, child.as_ref().map(|c| &c.fields))?;
        }
    }
    // Move-out: a record that leaves a target takes its children with it.
    let left: Vec<&Target> = before.difference(&after).collect();
    push(t, env, seq, &left, env.kind, &env.id, gone_op, None)?;
    if !left.is_empty() {
        for (kind, id) in &children {
            push(t, env, seq, &left, *kind, id, gone_op, None)?;
        }
    }
    Ok(())
}

/// A set was created, changed or deleted: every record it gains or loses is routed.
fn route_set_change(
    t: &mut Tables<'_>,
    seq: u64,
    env: &Envelope,
    before: Option<&SetDef>,
    after: Option<&SetDef>,
) -> Result<(), StoreError> {
    let name = before.or(after).map(|s| s.name.clone()).unwrap_or_default();
    let target = Target::Set(name);
    let held = |def: Option<&SetDef>, kind: Kind, fields: &Option<Fields>| match (def, fields) {
        (Some(def), Some(fields)) => def.holds(kind, fields),
        _ => false,
    };
    let mut moves = Vec::new();
    for kind in Kind::DATA {
        let mut records = Vec::new();
        t.for_each(kind, |id, stored| records.push((id.to_owned(), stored)))?;
        for (id, stored) in records {
            let (basis_kind, basis) = routing_basis(t, kind, &stored.fields)?;
            let (was, is) = (held(before, basis_kind, &basis), held(after, basis_kind, &basis));
            if is && !was {
                moves.push((kind, id, Op::Upsert, Some(stored.fields)));
            } else if was && !is {
                moves.push((kind, id, Op::Leave, None));
            }
        }
    }
    for (kind, id, op, fields) in moves {
        push(t, env, seq, &[&target], kind, &id, op, fields.as_ref())?;
    }
    Ok(())
}

/// Adds one routed message to the outbox, for every target given (none: nothing to do).
#[allow(clippy::too_many_arguments)]
fn push(
    t: &mut Tables<'_>,
    cause: &Envelope,
    seq: u64,
    targets: &[&Target],
    kind: Kind,
    id: &str,
    op: Op,
    fields: Option<&Fields>,
) -> Result<(), StoreError> {
    if targets.is_empty() {
        return Ok(());
    }
    let envelope = Envelope {
        product: cause.product.clone(),
        schema: cause.schema,
        db: cause.db.clone(),
        event: cause.event.clone(),
        kind,
        id: id.to_owned(),
        op,
        version: seq,
        origin: cause.origin.clone(),
        record: if op == Op::Upsert { Some(fields.cloned().unwrap_or_default()) } else { None },
    };
    t.push_outbox(&OutboxEntry {
        seq,
        subjects: targets.iter().map(|target| wire::sync_subject(target, kind, id)).collect(),
        payload: envelope.encode(),
        tombstone: op != Op::Upsert,
    })
}
