//! What a remote does with a message from the main: the decision, given what the remote holds
//! of the record. The remote service reads what it holds, calls [`decide`], and carries out
//! the [`Action`] in the transaction that records its position.
//!
//! The rules:
//! - A remote holds a record while at least one of its targets (its set, its subscription
//!   list) holds it: an upsert adds the target, a leave takes it away, and the record goes when
//!   no target is left — or at once, when the main deleted it.
//! - A record made here is held locally until the main answers for it: its state, or its
//!   leave (the main routed it; the stream may hold only the leave by the time the remote reads).
//! - **Versions never go back.** A message older than what is known of the record (held, or
//!   gone) changes nothing; one of the same version only changes which targets hold it (one
//!   change may enter one target and leave another).
//! - **Edits made here stay** until the main merges them: the main's state replaces a record
//!   held here, merged with the local fields of newer stamps.
//! - **A delete made here holds** until the main answers: a version the main sent before it
//!   merged the delete does not bring the record back.

use crate::model::Record;
use crate::wire::{Envelope, Op};

/// The record is in the remote's sync set.
pub const HELD_BY_SET: u8 = 1;
/// The record is in the remote's subscription list.
pub const HELD_BY_SUBSCRIPTION: u8 = 2;
/// The record was created at this remote and the main has not sent it back yet.
pub const HELD_LOCALLY: u8 = 4;

/// Which of a remote's targets a `CRM_SYNC` message comes from, by its subject.
pub fn target_bit(subject: &str) -> u8 {
    if crate::wire::is_subscription_subject(subject) { HELD_BY_SUBSCRIPTION } else { HELD_BY_SET }
}

/// What a remote knows of a record when a message about it arrives.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Held {
    /// The version and holder bits of the record, if the remote holds it.
    pub record: Option<(u64, u8)>,
    /// The newest version at which it left or was deleted (0: never).
    pub gone: u64,
    /// It was deleted here, and the main has not answered about it yet.
    pub deleted_here: bool,
}

/// What to do with a message about a record at version `v`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Nothing: an older message, a repeat, or a state from before the main merged a delete
    /// made here.
    Skip,
    /// Write the main's state, held by `holders`. `merge_local`: the remote holds the record,
    /// and its fields of newer stamps (edits made here, not merged yet) stay.
    Put { holders: u8, merge_local: bool },
    /// Only which targets hold the record changes.
    SetHolders { holders: u8 },
    /// No target holds it any more: it goes, and its version is remembered.
    Remove,
    /// It left a target while the remote did not hold it: remember the version, so an older
    /// state arriving later does not bring it.
    MarkGone,
    /// The main deleted it.
    Delete,
}

/// Decides what a remote does with a message `op` at version `v` from the target `bit`.
pub fn decide(held: Held, bit: u8, op: Op, v: u64) -> Action {
    if op == Op::Upsert && held.deleted_here {
        return Action::Skip;
    }
    let known = held.record.map_or(0, |(version, _)| version).max(held.gone);
    match (op, held.record) {
        (Op::Upsert, None) if v > known => Action::Put { holders: bit, merge_local: false },
        // The main's copy replaces a record created here (no longer only local).
        (Op::Upsert, Some((_, holders))) if v > known => {
            Action::Put { holders: bit | (holders & !HELD_LOCALLY), merge_local: true }
        }
        (Op::Upsert, Some((version, holders))) if v == version && holders & bit == 0 => {
            Action::SetHolders { holders: holders | bit }
        }
        // A leave also answers for a record made here: the main holds a version of it (it
        // routed it), and the remote may never have seen that version (the stream keeps only
        // the latest message of a subject, the leave), so it is no longer only local.
        (Op::Leave, Some((version, holders))) if v >= version => match holders & !bit & !HELD_LOCALLY {
            0 => Action::Remove,
            left => Action::SetHolders { holders: left },
        },
        (Op::Leave, None) if v > held.gone => Action::MarkGone,
        (Op::Delete, _) if v >= known => Action::Delete,
        _ => Action::Skip,
    }
}

/// The main's current state of a record, read from the remote's targets in `CRM_SYNC` when the
/// main refused an edit of it: what the remote takes back.
#[derive(Debug, Clone, PartialEq)]
pub struct Refreshed {
    /// The record as the remote's targets hold it, with their holder bits; `None` if none does.
    pub state: Option<Record>,
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
                    let fields = env.record.clone().unwrap_or_default();
                    *state = Some(Record { version: env.version, holders, fields });
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SET: u8 = HELD_BY_SET;
    const SUB: u8 = HELD_BY_SUBSCRIPTION;

    fn held(version: u64, holders: u8) -> Held {
        Held { record: Some((version, holders)), ..Held::default() }
    }

    #[test]
    fn every_apply_rule_in_one_table() {
        let nothing = Held::default();
        let gone = |v| Held { gone: v, ..Held::default() };
        let cases = [
            ("a new record arrives", nothing, SET, Op::Upsert, 5, Action::Put { holders: SET, merge_local: false }),
            (
                "a newer version replaces, keeping local edits",
                held(5, SET),
                SET,
                Op::Upsert,
                7,
                Action::Put { holders: SET, merge_local: true },
            ),
            ("an older version changes nothing", held(7, SET), SET, Op::Upsert, 5, Action::Skip),
            ("the same version again changes nothing", held(7, SET), SET, Op::Upsert, 7, Action::Skip),
            (
                "the same version from another target adds it",
                held(7, SET),
                SUB,
                Op::Upsert,
                7,
                Action::SetHolders { holders: SET | SUB },
            ),
            (
                "a record made here becomes the main's",
                held(0, HELD_LOCALLY),
                SET,
                Op::Upsert,
                7,
                Action::Put { holders: SET, merge_local: true },
            ),
            (
                "leaving one target of two keeps it",
                held(7, SET | SUB),
                SET,
                Op::Leave,
                8,
                Action::SetHolders { holders: SUB },
            ),
            ("leaving the last target removes it", held(7, SET), SET, Op::Leave, 8, Action::Remove),
            (
                "a record made here whose main version was replaced by its leave goes",
                held(0, HELD_LOCALLY),
                SET,
                Op::Leave,
                8,
                Action::Remove,
            ),
            (
                "a record made here leaving one target of two stays, no longer only local",
                held(0, HELD_LOCALLY | SUB),
                SET,
                Op::Leave,
                8,
                Action::SetHolders { holders: SUB },
            ),
            ("a leave older than the record changes nothing", held(7, SET), SET, Op::Leave, 5, Action::Skip),
            ("a leave of a record not held is remembered", gone(3), SET, Op::Leave, 8, Action::MarkGone),
            ("a state older than a leave does not bring it back", gone(8), SET, Op::Upsert, 7, Action::Skip),
            ("a delete at the main removes it", held(7, SET | SUB), SUB, Op::Delete, 9, Action::Delete),
            ("an older delete changes nothing", held(9, SET), SET, Op::Delete, 7, Action::Skip),
            (
                "a delete made here holds until the main answers",
                Held { deleted_here: true, gone: 5, record: None },
                SET,
                Op::Upsert,
                7,
                Action::Skip,
            ),
            (
                "the main's delete settles a delete made here",
                Held { deleted_here: true, gone: 5, record: None },
                SET,
                Op::Delete,
                8,
                Action::Delete,
            ),
        ];
        for (rule, held, bit, op, v, want) in cases {
            assert_eq!(decide(held, bit, op, v), want, "{rule}");
        }
    }

    #[test]
    fn the_subject_says_which_target_a_message_is_from() {
        assert_eq!(target_bit("crm.sync.ny.contact.c1"), SET);
        assert_eq!(target_bit("crm.sync.~laptop.contact.c1"), SUB);
        assert_eq!(target_bit("crm.sync.~laptop.contact.c1.rejected"), SUB);
    }
}
