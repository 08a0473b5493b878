//! The main's projector: applies `CRM_EVENTS` to the main's redb in stream order and, in the
//! same transaction, writes what routing must publish into the outbox.
//!
//! Architecture invariant: the projection, the applied position and the outbox change in one
//! transaction. A crash anywhere leaves them consistent; the outbox publisher (publisher.rs)
//! delivers what is in the outbox, in order, so nothing is lost, and what a replay routes again
//! ends each subject with the newest state (a remote applies a state once).

use crate::model::Record;
use crate::model::{Fields, Kind};
use crate::outgoing::OutboxEntry;
use crate::routing::{self, Basis, RoutingConfig, TargetChange, TargetDef};
use crate::store::{APPLIED, KeyEntry, Store, StoreError, Tables};
use crate::transport::Incoming;
use crate::wire::{self, Decoded, Envelope, Op, Target};

/// The router's view of the configuration, kept in step with the set, user and remote records
/// as the projector applies them.
#[derive(Debug, Clone, Default)]
pub struct RoutingState {
    pub config: RoutingConfig,
    pub defs: Vec<TargetDef>,
}

impl RoutingState {
    pub fn load(store: &Store) -> Result<RoutingState, StoreError> {
        let mut config = RoutingConfig::default();
        for kind in [Kind::Set, Kind::User, Kind::Remote] {
            store.for_each(kind, |id, stored| {
                config.apply(kind, id, Some(&stored.fields));
            })?;
        }
        let defs = config.target_defs();
        Ok(RoutingState { config, defs })
    }
}

/// Events below this position were routed before a rebuild and are not routed again.
pub const ROUTE_FROM: &str = "route_from";

/// Applies a batch of events.
pub fn apply_batch(
    t: &mut Tables<'_>,
    state: &mut RoutingState,
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
                t.quarantine(msg.seq, &msg.subject, &msg.payload, f.to_string())?;
            }
            Decoded::Malformed(e) => {
                tracing::error!(seq = msg.seq, subject = %msg.subject, "an event does not decode: {e}");
                t.quarantine(msg.seq, &msg.subject, &msg.payload, e)?;
            }
        }
        last = msg.seq;
    }
    t.set_meta(APPLIED, last)?;
    Ok(last)
}

fn apply_event(
    t: &mut Tables<'_>,
    state: &mut RoutingState,
    seq: u64,
    env: Envelope,
    route: bool,
) -> Result<(), StoreError> {
    let (kind, id) = (env.kind, env.id.as_str());
    let old = t.get(kind, id)?;
    let new = match env.op {
        Op::Upsert => Some(Record::new(seq, env.record.clone().unwrap_or_default())),
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

/// The basis routing decides a record by, its contact read from the projection for a child.
fn basis(t: &Tables<'_>, kind: Kind, id: &str, stored: Option<&Record>) -> Result<Option<Basis>, StoreError> {
    let Some(stored) = stored else { return Ok(None) };
    Basis::of(kind, id, &stored.fields, |contact| Ok(t.get(Kind::Contact, contact)?.map(|c| c.fields)))
}

/// Carries out the [`routing::moves`] of one changed record.
fn route_record(
    t: &mut Tables<'_>,
    defs: &[TargetDef],
    seq: u64,
    env: &Envelope,
    old: Option<&Record>,
    new: Option<&Record>,
) -> Result<(), StoreError> {
    let before = routing::targets_of(defs, basis(t, env.kind, &env.id, old)?.as_ref());
    let after = routing::targets_of(defs, basis(t, env.kind, &env.id, new)?.as_ref());
    let moves = routing::moves(env.kind, env.op, old.is_some(), &before, &after);
    let out = Outbox { cause: env, seq };
    out.push(t, &moves.state, env.kind, &env.id, Op::Upsert, new.map(|n| &n.fields))?;
    out.push(t, &moves.gone, env.kind, &env.id, moves.gone_op, None)?;
    if moves.children_enter.is_empty() && moves.children_gone.is_empty() {
        return Ok(());
    }
    for (kind, id) in t.children(&env.id)? {
        if !moves.children_enter.is_empty() {
            let child = t.get(kind, &id)?;
            out.push(t, &moves.children_enter, kind, &id, Op::Upsert, child.as_ref().map(|c| &c.fields))?;
        }
        out.push(t, &moves.children_gone, kind, &id, moves.gone_op, None)?;
    }
    Ok(())
}

/// The configuration changed: every target whose definition changed gets the records it
/// gains and leaves for the records it loses.
fn route_config_change(
    t: &mut Tables<'_>,
    seq: u64,
    env: &Envelope,
    before: &[TargetDef],
    after: &[TargetDef],
) -> Result<(), StoreError> {
    let out = Outbox { cause: env, seq };
    for change in TargetChange::between(before, after) {
        let route = |t: &mut Tables<'_>, kind: Kind, id: &str, stored: &Record| -> Result<(), StoreError> {
            let op = change.decide(basis(t, kind, id, Some(stored))?.as_ref());
            match op {
                Some(op) => out.push(t, std::slice::from_ref(&change.after.target), kind, id, op, Some(&stored.fields)),
                None => Ok(()),
            }
        };
        match change.candidates() {
            Some(contacts) => {
                for contact in &contacts {
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
            // Page by page, so a set change on a main of millions of records holds one page
            // in memory, not all of them.
            None => {
                for kind in Kind::DATA {
                    t.scan(kind, SCAN_PAGE, |t, id, stored| route(t, kind, id, stored))?;
                }
            }
        }
    }
    Ok(())
}

/// Records read at once when a target change scans every record.
const SCAN_PAGE: usize = 1024;

/// Where routed messages go: the outbox, each carrying the change that caused it.
struct Outbox<'a> {
    cause: &'a Envelope,
    seq: u64,
}

impl Outbox<'_> {
    /// Adds one routed message to the outbox, for every target given (none: nothing to do).
    fn push(
        &self,
        t: &mut Tables<'_>,
        targets: &[Target],
        kind: Kind,
        id: &str,
        op: Op,
        fields: Option<&Fields>,
    ) -> Result<(), StoreError> {
        if targets.is_empty() {
            return Ok(());
        }
        let record = (op == Op::Upsert).then(|| fields.cloned().unwrap_or_default());
        let envelope = self.cause.routed(kind, id, op, self.seq, record);
        t.push_outbox(&OutboxEntry {
            seq: self.seq,
            subjects: targets.iter().map(|target| wire::sync_subject(target, kind, id)).collect(),
            payload: envelope.encode(),
            tombstone: op != Op::Upsert,
        })
    }
}
