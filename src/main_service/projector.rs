//! The main's projector: applies `CRM_EVENTS` to the main's redb in stream order and, in the
//! same transaction, writes what routing must publish into the outbox.
//!
//! Architecture invariant: the projection, the applied position and the outbox change in one
//! transaction. A crash anywhere leaves them consistent; the outbox publisher (publisher.rs)
//! delivers what is in the outbox with deterministic message ids, so nothing is lost or
//! doubled.

use std::collections::BTreeSet;

use crate::model::{Fields, Kind};
use crate::routing::{self, RoutingConfig, TargetDef};
use crate::store::{APPLIED, KeyEntry, OutboxEntry, Quarantined, Store, StoreError, Stored, Tables};
use crate::transport::Incoming;
use crate::wire::{self, Decoded, Envelope, Op, Target};

/// The router's view of the configuration, kept in step with the set, user and remote records
/// as the projector applies them.
#[derive(Debug, Clone, Default)]
pub struct RouterState {
    pub config: RoutingConfig,
    pub defs: Vec<TargetDef>,
}

impl RouterState {
    pub fn load(store: &Store) -> Result<RouterState, StoreError> {
        let mut config = RoutingConfig::default();
        for kind in [Kind::Set, Kind::User, Kind::Remote] {
            store.for_each(kind, |id, stored| {
                config.apply(kind, id, Some(&stored.fields));
            })?;
        }
        let defs = config.target_defs();
        Ok(RouterState { config, defs })
    }
}

/// Events below this position were routed before a rebuild and are not routed again.
pub const ROUTE_FROM: &str = "route_from";

/// Applies a batch of events.
pub fn apply_batch(
    t: &mut Tables<'_>,
    state: &mut RouterState,
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
            Decoded::Ok(env) => {
                if let Some((queue, n)) = &msg.upload_order {
                    // The upload is merged with this change: its place is recorded with it, so
                    // a replay of the stream records it again.
                    t.advance_upload(queue, n + 1)?;
                }
                if let Some(key) = &msg.idempotency_key {
                    let entry =
                        KeyEntry { seq: msg.seq, kind: env.kind, id: env.id.clone(), at_ms: crate::hlc::wall_ms() };
                    t.remember_key(key, &entry)?;
                }
                apply_event(t, state, msg.seq, env, msg.seq >= route_from)?
            }
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
    state: &mut RouterState,
    seq: u64,
    env: Envelope,
    route: bool,
) -> Result<(), StoreError> {
    let (kind, id) = (env.kind, env.id.as_str());
    let old = t.get(kind, id)?;
    let new = match env.op {
        Op::Upsert => Some(Stored::new(seq, env.record.clone().unwrap_or_default())),
        Op::Delete | Op::Leave => None,
        // Only ever sent on CRM_SYNC, to one remote: nothing to apply here.
        Op::Reject => return Ok(()),
    };
    match &new {
        Some(stored) => t.put(kind, id, stored)?,
        None => {
            t.remove(kind, id, seq)?;
        }
    }
    if state.config.apply(kind, id, new.as_ref().map(|s| &s.fields)) {
        let after = state.config.target_defs();
        let before = std::mem::replace(&mut state.defs, after);
        if route {
            route_config_change(t, seq, &env, &before, &state.defs)?;
        }
    }
    if route && kind.is_routed() {
        route_record(t, &state.defs, seq, &env, old.as_ref(), new.as_ref())?;
    }
    Ok(())
}

/// What routing decides a record by: a child's contact (kind, id, fields), or the record.
fn routing_basis(
    t: &Tables<'_>,
    kind: Kind,
    id: &str,
    fields: &Fields,
) -> Result<Option<(Kind, String, Fields)>, StoreError> {
    match kind.parent_field() {
        Some(field) => {
            let Some(parent) = crate::model::text(fields, field) else { return Ok(None) };
            Ok(t.get(Kind::Contact, parent)?.map(|s| (Kind::Contact, parent.to_owned(), s.fields)))
        }
        None => Ok(Some((kind, id.to_owned(), fields.clone()))),
    }
}

fn targets_of(
    t: &Tables<'_>,
    defs: &[TargetDef],
    kind: Kind,
    id: &str,
    stored: Option<&Stored>,
) -> Result<BTreeSet<Target>, StoreError> {
    let Some(stored) = stored else { return Ok(BTreeSet::new()) };
    Ok(match routing_basis(t, kind, id, &stored.fields)? {
        Some((basis_kind, basis_id, fields)) => routing::targets(defs, basis_kind, &basis_id, &fields),
        None => BTreeSet::new(),
    })
}

fn route_record(
    t: &mut Tables<'_>,
    defs: &[TargetDef],
    seq: u64,
    env: &Envelope,
    old: Option<&Stored>,
    new: Option<&Stored>,
) -> Result<(), StoreError> {
    let before = targets_of(t, defs, env.kind, &env.id, old)?;
    let after = targets_of(t, defs, env.kind, &env.id, new)?;
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

/// The configuration changed: every target whose definition changed gets the records it
/// gains and leaves for the records it loses. A set that is gone entirely sends nothing: no
/// remote uses it (deleting a set in use is refused), and its subjects are purged.
fn route_config_change(
    t: &mut Tables<'_>,
    seq: u64,
    env: &Envelope,
    before: &[TargetDef],
    after: &[TargetDef],
) -> Result<(), StoreError> {
    for def in after {
        let old = before.iter().find(|b| b.target == def.target);
        if old != Some(def) {
            route_target_change(t, seq, env, old, def)?;
        }
    }
    Ok(())
}

/// Routes what one target gains and loses between two definitions.
fn route_target_change(
    t: &mut Tables<'_>,
    seq: u64,
    env: &Envelope,
    before: Option<&TargetDef>,
    after: &TargetDef,
) -> Result<(), StoreError> {
    let held = |def: Option<&TargetDef>, basis: &Option<(Kind, String, Fields)>| match (def, basis) {
        (Some(def), Some((kind, id, fields))) => def.holds(*kind, id, fields),
        _ => false,
    };
    // A subscription list only ever holds the contacts it lists: only those (and their
    // children) can move, and if its users did not change, only those added or removed.
    let only = after.listed.as_ref().map(|listed| {
        let old = before.and_then(|b| b.listed.clone()).unwrap_or_default();
        if before.is_some_and(|b| b.scope == after.scope) {
            old.symmetric_difference(listed).cloned().collect::<BTreeSet<String>>()
        } else {
            old.union(listed).cloned().collect()
        }
    });
    let target = [&after.target];
    let route = |t: &mut Tables<'_>, kind: Kind, id: &str, stored: &Stored| -> Result<(), StoreError> {
        let basis = routing_basis(t, kind, id, &stored.fields)?;
        let (was, is) = (held(before, &basis), held(Some(after), &basis));
        if is && !was {
            push(t, env, seq, &target, kind, id, Op::Upsert, Some(&stored.fields))?;
        } else if was && !is {
            push(t, env, seq, &target, kind, id, Op::Leave, None)?;
        }
        Ok(())
    };
    match &only {
        Some(contacts) => {
            for contact in contacts {
                if let Some(stored) = t.get(Kind::Contact, contact)? {
                    route(t, Kind::Contact, contact, &stored)?;
                }
                for (kind, id) in t.children(contact)? {
                    if let Some(stored) = t.get(kind, &id)? {
                        route(t, kind, &id, &stored)?;
                    }
                }
            }
        }
        None => {
            // Page by page, so a set change on a main of millions of records holds one page
            // in memory, not all of them.
            for kind in Kind::DATA {
                let mut after_id: Option<String> = None;
                loop {
                    let page = t.page(kind, after_id.as_deref(), SCAN_PAGE)?;
                    for (id, stored) in &page {
                        route(t, kind, id, stored)?;
                    }
                    match page.last() {
                        Some((id, _)) if page.len() == SCAN_PAGE => after_id = Some(id.clone()),
                        _ => break,
                    }
                }
            }
        }
    }
    Ok(())
}

/// Records read at once when a target change scans every record.
const SCAN_PAGE: usize = 1024;

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
        reason: None,
    };
    t.push_outbox(&OutboxEntry {
        seq,
        subjects: targets.iter().map(|target| wire::sync_subject(target, kind, id)).collect(),
        payload: envelope.encode(),
        tombstone: op != Op::Upsert,
    })
}
