//! Merging: how a change is stamped, how two versions of a record merge (newest stamp wins),
//! and whether the main accepts an edit a remote uploaded ([`judge`]).
//!
//! The rules:
//! - **Stamps.** A patch stamps each field it changes with the change's hybrid-clock time, or
//!   just above the field's own stamp if that is newer ([`apply_patch`]).
//! - **Newest stamp wins**, field by field for contacts, companies and groups (two people
//!   changing different fields both keep their change), as a whole record for every other
//!   kind; at equal stamps what is held stays ([`merge`]).
//! - **What the main accepts from a remote** ([`judge`]): an edit of a kind remotes edit, from
//!   the remote whose subject it came on, which exists and is enabled; a valid record whose
//!   references the main holds; of a record the remote holds, or a new one its users may
//!   access; never of a record the main deleted (a delete at the main wins over a later edit
//!   elsewhere). A delete of a record the main no longer holds changes nothing.

use crate::model::{self, Field, Fields, Kind, Patch, Value, is_custom};
use crate::routing::{Basis, TargetDef, held_by};
use crate::wire::{Envelope, Op};

/// Applies a checked patch: each field whose value changes gets `stamp`, or a stamp just
/// above the field's own if that is newer (a clock behind another machine's must not make a
/// later change look older than the one it replaces). Returns whether anything changed, so a
/// no-op update commits nothing.
pub fn apply_patch(fields: &mut Fields, patch: &Patch, stamp: u64) -> bool {
    let mut changed = false;
    for (name, value) in patch {
        if name == "custom" {
            // `"custom": null` clears every custom field, each with its own stamp.
            let set: Vec<String> =
                fields.iter().filter(|(n, f)| is_custom(n) && f.value != Value::Null).map(|(n, _)| n.clone()).collect();
            let clear: Patch = set.into_iter().map(|n| (n, Value::Null)).collect();
            changed |= apply_patch(fields, &clear, stamp);
            continue;
        }
        let old = fields.get(name);
        let same = old.is_some_and(|f| f.value == *value) || (value == &Value::Null && old.is_none());
        if !same {
            let stamp = old.map_or(stamp, |f| stamp.max(f.stamp + 1));
            fields.insert(name.clone(), Field { value: value.clone(), stamp });
            changed = true;
        }
    }
    changed
}

/// How edits of a kind merge: contacts, companies and groups field by field (two people
/// changing different fields both keep their change); every other kind as a whole record.
pub fn merges_by_field(kind: Kind) -> bool {
    matches!(kind, Kind::Contact | Kind::Company | Kind::Group)
}

/// The newest stamp of a record's fields.
pub fn newest_stamp(fields: &Fields) -> u64 {
    fields.values().map(|f| f.stamp).max().unwrap_or(0)
}

/// Merges `incoming` into `current`, newest stamp wins: field by field, or for kinds that do
/// not merge by field, the whole record by its newest stamp. At equal stamps what is held
/// stays. Returns the merged fields, or `None` when `incoming` changes nothing.
pub fn merge(kind: Kind, current: &Fields, incoming: &Fields) -> Option<Fields> {
    if !merges_by_field(kind) {
        return (newest_stamp(incoming) > newest_stamp(current) && incoming != current).then(|| incoming.clone());
    }
    let mut merged = current.clone();
    let mut changed = false;
    for (name, field) in incoming {
        let newer = current.get(name).is_none_or(|held| field.stamp > held.stamp);
        if newer && current.get(name) != Some(field) {
            merged.insert(name.clone(), field.clone());
            changed = true;
        }
    }
    changed.then_some(merged)
}

/// What the main knows when it judges an upload: read by the merger before it calls [`judge`].
#[derive(Debug, Clone, Default)]
pub struct Facts {
    /// The uploading remote's record at the main; `None`: the main has no such remote.
    pub remote: Option<Fields>,
    /// The remote's targets: its set and its subscription list.
    pub targets: Vec<TargetDef>,
    /// Whether the main holds the record now.
    pub exists: bool,
    /// Whether the main deleted it: it knows a version of it but holds none.
    pub deleted: bool,
    /// What routing decides the main's record by (its contact, for a child), if it holds it.
    pub held_basis: Option<Basis>,
    /// What routing would decide the uploaded record by, for one the main does not hold.
    pub new_basis: Option<Basis>,
    /// A reference of the upload to a record the main does not hold, in words.
    pub missing_ref: Option<String>,
    /// The `created_ms` of the bundle the uploading copy was set up from (its
    /// [`crate::wire::UPLOAD_BUNDLE`] header), when it says.
    pub bundle_created_ms: Option<u64>,
}

/// What the main does with an upload it accepts.
#[derive(Debug, Clone, PartialEq)]
pub enum Plan {
    /// Nothing: a delete of a record the main no longer holds.
    Nothing,
    /// Delete the record at the main.
    Delete,
    /// Not merged, and not answered either: the upload comes from a copy that is no longer
    /// the remote (set up from a bundle it was re-created since), whose answer would reach the
    /// new copy instead. Kept in the main's sync log with why.
    Ignore(String),
    /// Merge the uploaded fields into the main's record with [`merge_into`] (create it, when
    /// the main did not hold it).
    Merge {
        fields: Fields,
        existed: bool,
        /// A contact made at the remote that its subscription list does not hold yet: it joins
        /// the list, so it never vanishes from the place it was made.
        join_list: bool,
    },
}

/// Why an upload from a copy set up from a bundle its remote was re-created since is ignored.
pub fn stale_bundle(remote: &str) -> String {
    format!(
        "remote {remote} was re-created at the main: the copy set up from its old bundle no longer syncs; \
         set it up again from the new bundle (`crmsync remote init`)"
    )
}

/// Why the main refused an upload, in words for the remote's sync log. Refused for good: the
/// remote is told and takes the main's state back.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Refusal(pub String);

/// Decides whether the main accepts an edit `remote` uploaded, and what it does with it.
pub fn judge(remote: &str, env: &Envelope, facts: &Facts) -> Result<Plan, Refusal> {
    let remote_fields = match uploader(remote, env, facts)? {
        Uploader::Ignore(plan) => return Ok(plan),
        Uploader::May(fields) => fields,
    };
    let held = facts.exists && held_by(&facts.targets, facts.held_basis.as_ref());
    match env.op {
        Op::Delete if !facts.exists => Ok(Plan::Nothing),
        Op::Delete if !held => Err(not_held(remote, env)),
        Op::Delete => Ok(Plan::Delete),
        Op::Upsert => judge_upsert(remote, remote_fields, env, facts, held),
        Op::Leave | Op::Reject => Err(Refusal(format!("a remote cannot upload a {:?}", env.op))),
    }
}

/// What the rules about the uploader alone say: it may upload, or its upload is ignored.
enum Uploader<'a> {
    May(&'a Fields),
    Ignore(Plan),
}

/// The rules about who uploaded: the right subject, a kind remotes may edit, a valid id, a
/// remote this main knows, of the current bundle, neither expired nor halted.
fn uploader<'a>(remote: &str, env: &Envelope, facts: &'a Facts) -> Result<Uploader<'a>, Refusal> {
    let refuse = |why: String| Err(Refusal(why));
    if env.origin != remote {
        return refuse(format!(
            "the edit says it comes from remote {:?} but was uploaded on remote {remote:?}'s subject",
            env.origin
        ));
    }
    if !env.kind.is_editable_at_remotes() {
        return refuse(format!("{} are managed at the main, not at remotes", env.kind.plural()));
    }
    crate::names::check("id", &env.id).map_err(|e| Refusal(e.to_string()))?;
    let Some(remote_fields) = &facts.remote else {
        return refuse(format!("there is no remote {remote:?} at this main"));
    };
    let created_ms = model::int(remote_fields, "created_ms").map(|ms| ms as u64);
    if facts.bundle_created_ms.is_some_and(|theirs| Some(theirs) != created_ms) {
        return Ok(Uploader::Ignore(Plan::Ignore(stale_bundle(remote))));
    }
    if let Some(on) = model::remote_expired(remote_fields) {
        return refuse(format!(
            "remote {remote} expired on {} (UTC) and may no longer upload; its edit is kept in this log \
             and in the remote's export file",
            crate::date::utc_day(on)
        ));
    }
    if model::remote_halted(remote_fields) {
        // The merger keeps a halted remote's numbered uploads until it is resumed; only one
        // that carries no place in its queue comes here.
        return refuse(format!("remote {remote} is halted at the main"));
    }
    Ok(Uploader::May(remote_fields))
}

fn not_held(remote: &str, env: &Envelope) -> Refusal {
    Refusal(format!(
        "the {} {} is not in remote {remote}'s set or subscription list (its users cannot access it, or it left the set)",
        env.kind, env.id
    ))
}

/// The fields of an upsert must make a valid record whose references exist.
fn check_upsert(env: &Envelope, facts: &Facts) -> Result<Fields, Refusal> {
    let fields = env.record.clone().unwrap_or_default();
    model::check_fields(env.kind, &fields)
        .map_err(|e| Refusal(format!("the edit is not a valid {}: {e}", env.kind)))?;
    match &facts.missing_ref {
        Some(missing) => Err(Refusal(missing.clone())),
        None => Ok(fields),
    }
}

/// An upsert of a record the remote holds, or of a new one: merged, unless the main deleted
/// it or the remote's users could not access it.
fn judge_upsert(
    remote: &str,
    remote_fields: &Fields,
    env: &Envelope,
    facts: &Facts,
    held: bool,
) -> Result<Plan, Refusal> {
    let (kind, id) = (env.kind, env.id.as_str());
    let fields = check_upsert(env, facts)?;
    if facts.exists && !held {
        return Err(not_held(remote, env));
    }
    if !facts.exists && facts.deleted {
        return Err(Refusal(format!(
            "the {kind} {id} was deleted at the main; a delete at the main wins over a later edit elsewhere"
        )));
    }
    if !facts.exists && !may_create(&facts.targets, kind, facts.new_basis.as_ref()) {
        return Err(Refusal(format!(
            "remote {remote}'s users could not access the new {kind} {id}, so it cannot be created there"
        )));
    }
    // Made at the remote: it never held a version of the main's. (Not "the main did not
    // hold it": an upload merged again after a crash must still find its contact a
    // place on the list.)
    let listed = model::names(remote_fields, "subscriptions").iter().any(|c| c == id);
    let join_list = kind == Kind::Contact && env.version == 0 && !listed;
    Ok(Plan::Merge { fields, existed: facts.exists, join_list })
}

/// Whether a remote's users may see a record it created: a new contact joins the remote's
/// subscription list, so one of its users must be able to access it; anything else must be
/// held by its targets (a child, through its contact).
fn may_create(targets: &[TargetDef], kind: Kind, basis: Option<&Basis>) -> bool {
    match (kind, basis) {
        (Kind::Contact, Some(b)) => targets.iter().any(|t| t.could_list(&b.fields)),
        _ => held_by(targets, basis),
    }
}

/// Carries out a [`Plan::Merge`] against the main's record as it is now (read under the
/// record's lock): the merged fields, `Ok(None)` when the upload changes nothing, or a refusal
/// when the record was deleted at the main meanwhile.
pub fn merge_into(
    kind: Kind,
    id: &str,
    now: Option<&Fields>,
    fields: &Fields,
    existed: bool,
) -> Result<Option<Fields>, Refusal> {
    match now {
        None if existed => {
            Err(Refusal(format!("the {kind} {id} was deleted at the main while the edit was merged; the delete wins")))
        }
        None => Ok(Some(fields.clone())),
        Some(now) => Ok(merge(kind, now, fields)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::to_json;
    use serde_json::json;

    fn rec(pairs: &[(&str, &str, u64)]) -> Fields {
        pairs.iter().map(|(k, v, st)| (k.to_string(), Field { value: Value::Str(v.to_string()), stamp: *st })).collect()
    }

    #[test]
    fn contacts_merge_field_by_field_newest_stamp_wins() {
        let main = rec(&[("first_name", "Ann", 10), ("city", "Boston", 20)]);
        let remote = rec(&[("first_name", "Anne", 30), ("city", "Albany", 5)]);
        let merged = merge(Kind::Contact, &main, &remote).unwrap();
        assert_eq!(merged, rec(&[("first_name", "Anne", 30), ("city", "Boston", 20)]));
        // Merging the same edit again changes nothing.
        assert_eq!(merge(Kind::Contact, &merged, &remote), None);
        // At equal stamps what is held stays.
        assert_eq!(merge(Kind::Contact, &main, &rec(&[("first_name", "Other", 10)])), None);
    }

    #[test]
    fn notes_merge_as_a_whole_record() {
        let main = rec(&[("text", "a", 10), ("contact_id", "c1", 1)]);
        let newer = rec(&[("text", "b", 11), ("contact_id", "c1", 1)]);
        assert_eq!(merge(Kind::Note, &main, &newer), Some(newer.clone()));
        assert_eq!(merge(Kind::Note, &newer, &main), None);
    }

    #[test]
    fn a_patch_never_stamps_a_field_older_than_it_was() {
        let mut fields = rec(&[("city", "Boston", 100)]);
        assert!(apply_patch(&mut fields, &vec![("city".into(), Value::Str("Albany".into()))], 50));
        assert_eq!(fields["city"].stamp, 101);
    }

    #[test]
    fn edits_of_different_custom_fields_at_two_places_both_survive_a_merge() {
        let base = rec(&[("custom.a", "1", 10), ("custom.b", "1", 10)]);
        let mut here = base.clone();
        here.insert("custom.a".into(), Field { value: Value::Str("main".into()), stamp: 20 });
        let mut there = base;
        there.insert("custom.b".into(), Field { value: Value::Str("remote".into()), stamp: 21 });
        let merged = merge(Kind::Contact, &here, &there).unwrap();
        assert_eq!(to_json("c", 1, &merged)["custom"], json!({"a": "main", "b": "remote"}));
    }

    mod judging {
        use super::*;
        use crate::routing::{RemoteSpec, RoutingConfig, SetSpec};
        use crate::wire::{PRODUCT, SCHEMA_MAJOR};

        fn f(pairs: &[(&str, &str)]) -> Fields {
            pairs.iter().map(|(k, v)| (k.to_string(), Field { value: Value::Str(v.to_string()), stamp: 5 })).collect()
        }

        /// Remote `laptop` on set `ny` (user ann, contacts in NY), listing contact `listed`.
        fn laptop() -> Facts {
            let mut config = RoutingConfig::default();
            config.sets.insert(
                "ny".into(),
                SetSpec { all: false, users: vec!["ann".into()], query: Some("state = NY".into()) },
            );
            config
                .remotes
                .insert("laptop".into(), RemoteSpec { set: "ny".into(), subscriptions: ["listed".into()].into() });
            let mut remote = f(&[("set", "ny")]);
            remote.insert("created_ms".into(), Field { value: Value::Int(7), stamp: 1 });
            remote.insert("subscriptions".into(), Field { value: Value::List(vec!["listed".into()]), stamp: 1 });
            Facts { remote: Some(remote), targets: config.target_defs(), ..Facts::default() }
        }

        fn held(kind: Kind, id: &str, fields: Fields) -> Facts {
            Facts { exists: true, held_basis: Some(Basis { kind, id: id.into(), fields }), ..laptop() }
        }

        fn new(kind: Kind, id: &str, fields: Fields) -> Facts {
            Facts { new_basis: Some(Basis { kind, id: id.into(), fields }), ..laptop() }
        }

        fn upload(kind: Kind, id: &str, op: Op, version: u64, record: Option<Fields>) -> Envelope {
            Envelope {
                product: PRODUCT.into(),
                schema: SCHEMA_MAJOR,
                db: "db".into(),
                event: "e1".into(),
                kind,
                id: id.into(),
                op,
                version,
                origin: "laptop".into(),
                record,
                reason: None,
            }
        }

        #[test]
        fn every_acceptance_rule_in_one_table() {
            let ny = f(&[("last_name", "Ng"), ("state", "NY")]);
            let ct = f(&[("last_name", "Ng"), ("state", "CT")]);
            let private = f(&[("last_name", "Ng"), ("access", "private"), ("manager", "bob")]);
            let note = f(&[("contact_id", "c1"), ("text", "called")]);
            let edit = |id: &str, v: u64, r: &Fields| upload(Kind::Contact, id, Op::Upsert, v, Some(r.clone()));
            let merge_of = |r: &Fields, existed, join_list| Ok(Plan::Merge { fields: r.clone(), existed, join_list });
            let refused = |why: &str| Err(why.to_string());
            let cases: Vec<(&str, Envelope, Facts, Result<Plan, String>)> = vec![
                (
                    "an edit of a contact in the set",
                    edit("c1", 3, &ny),
                    held(Kind::Contact, "c1", ny.clone()),
                    merge_of(&ny, true, false),
                ),
                (
                    "a contact that left the set is not the remote's to edit",
                    edit("c1", 3, &ny),
                    held(Kind::Contact, "c1", ct.clone()),
                    refused("the contact c1 is not in remote laptop's set or subscription list"),
                ),
                (
                    "a listed contact outside the query is the remote's",
                    edit("listed", 3, &ct),
                    held(Kind::Contact, "listed", ct.clone()),
                    merge_of(&ct, true, false),
                ),
                (
                    "a new contact its users may access joins its list",
                    edit("c9", 0, &ct),
                    new(Kind::Contact, "c9", ct.clone()),
                    merge_of(&ct, false, true),
                ),
                (
                    "a new contact its users may not access",
                    edit("c9", 0, &private),
                    new(Kind::Contact, "c9", private.clone()),
                    refused("remote laptop's users could not access the new contact c9"),
                ),
                (
                    "a delete at the main wins over a later edit",
                    edit("c1", 3, &ny),
                    Facts { deleted: true, ..new(Kind::Contact, "c1", ny.clone()) },
                    refused("the contact c1 was deleted at the main; a delete at the main wins"),
                ),
                (
                    "a new note follows its contact",
                    upload(Kind::Note, "n1", Op::Upsert, 0, Some(note.clone())),
                    new(Kind::Contact, "c1", ny.clone()),
                    merge_of(&note, false, false),
                ),
                (
                    "a new note of a contact outside the set",
                    upload(Kind::Note, "n1", Op::Upsert, 0, Some(note.clone())),
                    new(Kind::Contact, "c1", ct.clone()),
                    refused("remote laptop's users could not access the new note n1"),
                ),
                (
                    "a delete of a held record",
                    upload(Kind::Contact, "c1", Op::Delete, 3, None),
                    held(Kind::Contact, "c1", ny.clone()),
                    Ok(Plan::Delete),
                ),
                (
                    "a delete of a record already gone",
                    upload(Kind::Contact, "c1", Op::Delete, 3, None),
                    laptop(),
                    Ok(Plan::Nothing),
                ),
                (
                    "a delete of a record the remote does not hold",
                    upload(Kind::Contact, "c1", Op::Delete, 3, None),
                    held(Kind::Contact, "c1", ct.clone()),
                    refused("the contact c1 is not in remote laptop's set"),
                ),
                (
                    "an edit that says it comes from elsewhere",
                    Envelope { origin: "branch".into(), ..edit("c1", 3, &ny) },
                    held(Kind::Contact, "c1", ny.clone()),
                    refused("the edit says it comes from remote \"branch\""),
                ),
                (
                    "users are managed at the main",
                    upload(Kind::User, "ann", Op::Upsert, 3, Some(f(&[("name", "Ann")]))),
                    laptop(),
                    refused("users are managed at the main"),
                ),
                ("an id that is no token", edit("a.b", 0, &ny), laptop(), refused("")),
                (
                    "an unknown remote",
                    edit("c1", 3, &ny),
                    Facts { remote: None, ..laptop() },
                    refused("there is no remote \"laptop\""),
                ),
                (
                    "a copy set up from a bundle the remote was re-created since",
                    edit("c1", 3, &ny),
                    Facts { bundle_created_ms: Some(1), ..held(Kind::Contact, "c1", ny.clone()) },
                    Ok(Plan::Ignore(stale_bundle("laptop"))),
                ),
                (
                    "a copy set up from the current bundle",
                    edit("c1", 3, &ny),
                    Facts { bundle_created_ms: Some(7), ..held(Kind::Contact, "c1", ny.clone()) },
                    merge_of(&ny, true, false),
                ),
                (
                    "a halted remote",
                    edit("c1", 3, &ny),
                    {
                        let mut facts = held(Kind::Contact, "c1", ny.clone());
                        let remote = facts.remote.as_mut().unwrap();
                        remote.insert("enabled".into(), Field { value: Value::Bool(false), stamp: 9 });
                        facts
                    },
                    refused("remote laptop is halted at the main"),
                ),
                (
                    "an expired remote, even halted",
                    edit("c1", 3, &ny),
                    {
                        let mut facts = held(Kind::Contact, "c1", ny.clone());
                        let remote = facts.remote.as_mut().unwrap();
                        remote.insert("enabled".into(), Field { value: Value::Bool(false), stamp: 9 });
                        remote.insert("expired_ms".into(), Field { value: Value::Int(1_795_996_800_000), stamp: 9 });
                        facts
                    },
                    refused("remote laptop expired on 2026-11-30 (UTC)"),
                ),
                (
                    "fields the kind does not have",
                    edit("c1", 3, &f(&[("nickname", "x")])),
                    held(Kind::Contact, "c1", ny.clone()),
                    refused("the edit is not a valid contact: unknown field `nickname`"),
                ),
                (
                    "a reference to a record the main does not hold",
                    edit("c1", 3, &ny),
                    Facts {
                        missing_ref: Some("field `company_id`: there is no company".into()),
                        ..held(Kind::Contact, "c1", ny.clone())
                    },
                    refused("field `company_id`"),
                ),
                (
                    "a leave is the main's to send",
                    upload(Kind::Contact, "c1", Op::Leave, 3, None),
                    held(Kind::Contact, "c1", ny.clone()),
                    refused("a remote cannot upload a Leave"),
                ),
            ];
            for (rule, env, facts, want) in cases {
                let got = judge("laptop", &env, &facts).map_err(|r| r.0);
                match (&got, &want) {
                    (Err(got), Err(start)) => assert!(got.starts_with(start.as_str()), "{rule}: {got}"),
                    _ => assert_eq!(got, want, "{rule}"),
                }
            }
        }

        #[test]
        fn a_merge_under_the_lock_sees_a_delete_made_meanwhile() {
            let edit = f(&[("city", "Albany")]);
            assert_eq!(merge_into(Kind::Contact, "c1", None, &edit, false), Ok(Some(edit.clone())), "a new record");
            let refusal = merge_into(Kind::Contact, "c1", None, &edit, true).unwrap_err();
            assert!(refusal.0.contains("deleted at the main while the edit was merged"), "{refusal}");
            assert_eq!(merge_into(Kind::Contact, "c1", Some(&edit), &edit, true), Ok(None), "merged before");
        }
    }
}
