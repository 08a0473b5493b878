//! Routing: which targets hold a record. Pure: no IO, no NATS, no redb.
//!
//! A target is a sync set or one remote's subscription list ([`crate::wire::Target`]). The
//! main's projector asks [`targets`] for a record's targets before and after each change, and
//! publishes full states, leaves and tombstones from the difference (see
//! `main_service::projector`). When the configuration changes (a set, a user's teams, a
//! remote's subscriptions), it compares the [`TargetDef`]s before and after and re-routes every
//! record a changed target gains or loses.
//!
//! The rules:
//! - **Access.** A record is public (also when it says nothing), private (its record manager
//!   only) or limited (its record manager, the users in `access_users`, and the members of the
//!   teams in `access_teams`). Roles do not widen access: a private record is its manager's.
//! - **A sync set** holds everything when it is `all`; otherwise the contacts at least one of
//!   its users can access and that match its query (if any), the companies and groups one of
//!   its users can access (the query does not apply to them), and every user and team.
//! - **A subscription list** holds the contacts it lists that one of its remote's users (the
//!   users of the remote's set) can access.
//! - **Children** (notes, histories, activities, memberships) follow their contact: routing
//!   decides them by their contact's [`Basis`].
//!
//! Decisions come back as data for the projector to carry out: [`moves`] for a changed record,
//! [`TargetChange`] for a changed target.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use crate::model::{Fields, Kind, Patch, Value, names, text};
use crate::query::Query;
use crate::wire::{Op, Target};

/// A user as access checks see them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserView {
    pub id: String,
    pub teams: Vec<String>,
}

/// Whether `user` may access a contact, company or group with these fields.
pub fn can_access(user: &UserView, fields: &Fields) -> bool {
    let manager = text(fields, "manager") == Some(user.id.as_str());
    match text(fields, "access") {
        Some("private") => manager,
        Some("limited") => {
            manager
                || names(fields, "access_users").contains(&user.id)
                || names(fields, "access_teams").iter().any(|t| user.teams.contains(t))
        }
        _ => true,
    }
}

/// Whose records a target may hold.
#[derive(Debug, Clone)]
pub enum Scope {
    /// Everything: no access rule, no query.
    All,
    /// What at least one of these users can access, narrowed (for contacts) by the query.
    Users { users: Vec<UserView>, query: Option<Arc<Query>> },
}

impl PartialEq for Scope {
    fn eq(&self, other: &Scope) -> bool {
        match (self, other) {
            (Scope::All, Scope::All) => true,
            (Scope::Users { users: a, query: qa }, Scope::Users { users: b, query: qb }) => {
                a == b && qa.as_ref().map(|q| q.text()) == qb.as_ref().map(|q| q.text())
            }
            _ => false,
        }
    }
}

impl Scope {
    fn accessible(&self, fields: &Fields) -> bool {
        match self {
            Scope::All => true,
            Scope::Users { users, .. } => users.iter().any(|u| can_access(u, fields)),
        }
    }

    fn matches_query(&self, fields: &Fields) -> bool {
        match self {
            Scope::All => true,
            Scope::Users { query, .. } => query.as_ref().is_none_or(|q| q.matches(fields)),
        }
    }
}

/// One target as the router sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct TargetDef {
    pub target: Target,
    pub scope: Scope,
    /// For a subscription list, the contacts it lists; `None` for a set.
    pub listed: Option<BTreeSet<String>>,
}

impl TargetDef {
    /// Whether the target holds a record of `kind`. Children are decided by their contact: the
    /// caller passes the contact's id and fields for them, with `Kind::Contact`.
    pub fn holds(&self, kind: Kind, id: &str, fields: &Fields) -> bool {
        if !kind.is_routed() {
            return false;
        }
        if let Some(listed) = &self.listed {
            return kind == Kind::Contact && listed.contains(id) && self.scope.accessible(fields);
        }
        match kind {
            Kind::Contact => self.scope.accessible(fields) && self.scope.matches_query(fields),
            Kind::Company | Kind::Group => self.scope.accessible(fields),
            _ => true,
        }
    }
}

impl TargetDef {
    /// Whether this subscription list would hold the contact once it lists it: whether its
    /// remote's users may access it. Never for a set.
    pub fn could_list(&self, contact: &Fields) -> bool {
        self.listed.is_some() && self.scope.accessible(contact)
    }
}

/// The targets that hold a record. For a child (note, history, activity, membership) pass its
/// contact's id and fields with `Kind::Contact`.
pub fn targets(defs: &[TargetDef], kind: Kind, id: &str, fields: &Fields) -> BTreeSet<Target> {
    defs.iter().filter(|d| d.holds(kind, id, fields)).map(|d| d.target.clone()).collect()
}

/// What routing decides a record by: for a child (note, history, activity, membership), its
/// contact; for any other record, the record itself.
#[derive(Debug, Clone, PartialEq)]
pub struct Basis {
    pub kind: Kind,
    pub id: String,
    pub fields: Fields,
}

impl Basis {
    /// The basis of a record. For a child, `contact` looks up its contact's fields; a child
    /// whose contact is named nowhere or not there has none (no target holds it).
    pub fn of<E>(
        kind: Kind,
        id: &str,
        fields: &Fields,
        contact: impl FnOnce(&str) -> Result<Option<Fields>, E>,
    ) -> Result<Option<Basis>, E> {
        let Some(field) = kind.parent_field() else {
            return Ok(Some(Basis { kind, id: id.to_owned(), fields: fields.clone() }));
        };
        let Some(parent) = text(fields, field) else { return Ok(None) };
        Ok(contact(parent)?.map(|fields| Basis { kind: Kind::Contact, id: parent.to_owned(), fields }))
    }
}

/// The targets among `defs` that hold a record with this basis (none without one).
pub fn targets_of(defs: &[TargetDef], basis: Option<&Basis>) -> BTreeSet<Target> {
    basis.map_or_else(BTreeSet::new, |b| targets(defs, b.kind, &b.id, &b.fields))
}

/// Whether any of `defs` holds a record with this basis.
pub fn held_by(defs: &[TargetDef], basis: Option<&Basis>) -> bool {
    basis.is_some_and(|b| defs.iter().any(|d| d.holds(b.kind, &b.id, &b.fields)))
}

/// What one change of a record sends to the targets, as the projector must carry it out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Moves {
    /// The targets that get the record's new state: every target that holds it now.
    pub state: Vec<Target>,
    /// The targets the record is gone from, told with [`Moves::gone_op`].
    pub gone: Vec<Target>,
    /// `delete` when the record was deleted, `leave` when it only left those targets.
    pub gone_op: Op,
    /// The targets a contact entered: its children's states go there too.
    pub children_enter: Vec<Target>,
    /// The targets a contact is gone from: its children go with it, with the same op.
    pub children_gone: Vec<Target>,
}

/// Routes a change of a record held by the targets `before` and by `after` since: the new
/// state goes to every target that holds it, a `leave` (or the `delete`) to those it left.
/// A contact that enters a target brings its children and one that leaves takes them along;
/// a record created just now has no children to bring.
pub fn moves(kind: Kind, op: Op, existed: bool, before: &BTreeSet<Target>, after: &BTreeSet<Target>) -> Moves {
    let gone: Vec<Target> = before.difference(after).cloned().collect();
    let has_children = kind == Kind::Contact;
    Moves {
        state: after.iter().cloned().collect(),
        children_enter: if has_children && existed { after.difference(before).cloned().collect() } else { Vec::new() },
        children_gone: if has_children { gone.clone() } else { Vec::new() },
        gone,
        gone_op: if op == Op::Delete { Op::Delete } else { Op::Leave },
    }
}

/// One target whose definition changed, before and after.
#[derive(Debug, Clone, Copy)]
pub struct TargetChange<'a> {
    pub before: Option<&'a TargetDef>,
    pub after: &'a TargetDef,
}

impl<'a> TargetChange<'a> {
    /// The targets whose definition differs between two configurations. A target that is gone
    /// entirely is not among them: no remote uses it (deleting a set in use is refused), and
    /// its subjects are purged.
    pub fn between(before: &'a [TargetDef], after: &'a [TargetDef]) -> Vec<TargetChange<'a>> {
        // By target, not by searching the list for each: a main with ten thousand remotes has
        // as many targets, and every remote registered compares them all.
        let before: BTreeMap<&Target, &TargetDef> = before.iter().map(|b| (&b.target, b)).collect();
        after
            .iter()
            .filter_map(|def| {
                let old = before.get(&def.target).copied();
                (old != Some(def)).then_some(TargetChange { before: old, after: def })
            })
            .collect()
    }

    /// The contacts that can move in or out (their children with them): a subscription list
    /// only ever holds the contacts it lists, so only those can, and if its users did not
    /// change, only those added or removed. `None`: any record can (a set changed).
    pub fn candidates(&self) -> Option<BTreeSet<String>> {
        let listed = self.after.listed.as_ref()?;
        let old = self.before.and_then(|b| b.listed.clone()).unwrap_or_default();
        Some(if self.before.is_some_and(|b| b.scope == self.after.scope) {
            old.symmetric_difference(listed).cloned().collect()
        } else {
            old.union(listed).cloned().collect()
        })
    }

    /// What a record with this basis does in this target: enters (`upsert`, with its state),
    /// leaves (`leave`), or nothing.
    pub fn decide(&self, basis: Option<&Basis>) -> Option<Op> {
        let was = self.before.is_some_and(|def| held_by(std::slice::from_ref(def), basis));
        let is = held_by(std::slice::from_ref(self.after), basis);
        match (was, is) {
            (false, true) => Some(Op::Upsert),
            (true, false) => Some(Op::Leave),
            _ => None,
        }
    }
}

/// A sync set's definition as stored.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SetSpec {
    pub all: bool,
    pub users: Vec<String>,
    pub query: Option<String>,
}

impl SetSpec {
    pub fn from_fields(fields: &Fields) -> SetSpec {
        SetSpec {
            all: matches!(fields.get("all").map(|f| &f.value), Some(Value::Bool(true))),
            users: names(fields, "users").to_vec(),
            query: text(fields, "query").filter(|q| !q.trim().is_empty()).map(str::to_owned),
        }
    }
}

/// Why a set's definition is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SetError {
    #[error("a set with `all` holds every record: it takes no users and no query")]
    AllWithUsers,
    #[error(
        "a set holds either every record (`--all`) or what its users can access \
         (`--users U1,U2`, narrowed by an optional `--query`): give one of them"
    )]
    NoUsers,
    #[error(
        "the query is empty: a set without a query holds every contact its users may access; for that, \
         leave `query` out (`--no-query` with `set edit`, `\"query\": null` in a PATCH)"
    )]
    BlankQuery,
    #[error("the query does not parse: {0}")]
    Query(String),
}

impl SetSpec {
    /// Checks a set's fields as a whole: either every record, or some users and an optional
    /// query that parses. (That the users exist is the caller's to check: see
    /// [`SetSpec::users`].)
    pub fn check(fields: &Fields) -> Result<SetSpec, SetError> {
        let spec = SetSpec::from_fields(fields);
        if spec.all && (spec.query.is_some() || !spec.users.is_empty()) {
            return Err(SetError::AllWithUsers);
        }
        if !spec.all && spec.users.is_empty() {
            return Err(SetError::NoUsers);
        }
        // A blank query would be read as none (`from_fields` drops it): say so instead.
        if text(fields, "query").is_some_and(|q| q.trim().is_empty()) {
            return Err(SetError::BlankQuery);
        }
        if let Some(query) = &spec.query {
            Query::parse(query).map_err(|e| SetError::Query(e.to_string()))?;
        }
        Ok(spec)
    }

    /// An edit of a set as it applies: choosing users or a query ends `all`, and `all` ends
    /// users and query.
    pub fn edit(mut patch: Patch) -> Patch {
        let sets = |patch: &Patch, n: &str| patch.iter().any(|(f, v)| f == n && *v != Value::Null);
        if sets(&patch, "users") || sets(&patch, "query") {
            if !patch.iter().any(|(f, _)| f == "all") {
                patch.push(("all".into(), Value::Null));
            }
        } else if patch.iter().any(|(f, v)| f == "all" && *v == Value::Bool(true)) {
            patch.push(("users".into(), Value::Null));
            patch.push(("query".into(), Value::Null));
        }
        patch
    }
}

/// A remote as routing needs it: its set and its subscription list.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RemoteSpec {
    pub set: String,
    pub subscriptions: BTreeSet<String>,
}

impl RemoteSpec {
    pub fn from_fields(fields: &Fields) -> RemoteSpec {
        RemoteSpec {
            set: text(fields, "set").unwrap_or_default().to_owned(),
            subscriptions: names(fields, "subscriptions").iter().cloned().collect(),
        }
    }
}

/// Everything routing depends on besides the record itself: sets, users' teams, remotes.
#[derive(Debug, Clone, Default)]
pub struct RoutingConfig {
    pub sets: BTreeMap<String, SetSpec>,
    pub user_teams: BTreeMap<String, Vec<String>>,
    pub remotes: BTreeMap<String, RemoteSpec>,
}

impl RoutingConfig {
    /// Takes in a changed configuration record (a set, a user or a remote); `None` when it was
    /// deleted. Returns whether anything routing depends on changed.
    pub fn apply(&mut self, kind: Kind, id: &str, fields: Option<&Fields>) -> bool {
        match kind {
            Kind::Set => replace(&mut self.sets, id, fields.map(SetSpec::from_fields)),
            Kind::User => replace(&mut self.user_teams, id, fields.map(|f| names(f, "teams").to_vec())),
            Kind::Remote => replace(&mut self.remotes, id, fields.map(RemoteSpec::from_fields)),
            _ => false,
        }
    }

    fn user(&self, id: &str) -> UserView {
        UserView { id: id.to_owned(), teams: self.user_teams.get(id).cloned().unwrap_or_default() }
    }

    /// The scope of a set. A query that does not parse (it was checked when it was saved, so
    /// only a hand-made event could hold one) matches nothing rather than everything.
    pub fn set_scope(&self, spec: &SetSpec) -> Scope {
        if spec.all {
            return Scope::All;
        }
        let query = spec.query.as_deref().map(|q| match Query::parse(q) {
            Ok(q) => Some(Arc::new(q)),
            Err(e) => {
                tracing::error!("a stored set query does not parse ({e}); the set holds no contacts");
                None
            }
        });
        let users = match query {
            Some(None) => Vec::new(),
            _ => spec.users.iter().map(|u| self.user(u)).collect(),
        };
        Scope::Users { users, query: query.flatten() }
    }

    /// Every target: each set, and each remote's subscription list.
    pub fn target_defs(&self) -> Vec<TargetDef> {
        let mut defs: Vec<TargetDef> = self
            .sets
            .iter()
            .map(|(name, spec)| TargetDef {
                target: Target::Set(name.clone()),
                scope: self.set_scope(spec),
                listed: None,
            })
            .collect();
        for (name, remote) in &self.remotes {
            let scope = match self.sets.get(&remote.set) {
                Some(spec) if spec.all => Scope::All,
                Some(spec) => Scope::Users { users: spec.users.iter().map(|u| self.user(u)).collect(), query: None },
                None => Scope::Users { users: Vec::new(), query: None },
            };
            defs.push(TargetDef {
                target: Target::Subscriptions(name.clone()),
                scope,
                listed: Some(remote.subscriptions.clone()),
            });
        }
        defs
    }
}

fn replace<V: PartialEq + Clone>(map: &mut BTreeMap<String, V>, id: &str, value: Option<V>) -> bool {
    match value {
        Some(v) => map.insert(id.to_owned(), v.clone()).as_ref() != Some(&v),
        None => map.remove(id).is_some(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Field;

    fn fields(pairs: &[(&str, Value)]) -> Fields {
        pairs.iter().map(|(k, v)| (k.to_string(), Field { value: v.clone(), stamp: 1 })).collect()
    }

    fn s(v: &str) -> Value {
        Value::Str(v.into())
    }

    #[test]
    fn access_levels() {
        let ann = UserView { id: "ann".into(), teams: vec!["east".into()] };
        let public = fields(&[("manager", s("bob"))]);
        let private = fields(&[("manager", s("bob")), ("access", s("private"))]);
        let by_team = fields(&[
            ("manager", s("bob")),
            ("access", s("limited")),
            ("access_teams", Value::List(vec!["east".into()])),
        ]);
        let by_user = fields(&[
            ("manager", s("bob")),
            ("access", s("limited")),
            ("access_users", Value::List(vec!["cy".into()])),
        ]);
        assert!(can_access(&ann, &public));
        assert!(!can_access(&ann, &private));
        assert!(can_access(&UserView { id: "bob".into(), teams: vec![] }, &private));
        assert!(can_access(&ann, &by_team));
        assert!(!can_access(&ann, &by_user));
    }

    #[test]
    fn a_set_of_users_and_a_query_holds_what_they_can_access_and_matches() {
        let mut config = RoutingConfig::default();
        config.user_teams.insert("ann".into(), vec![]);
        config
            .sets
            .insert("ny".into(), SetSpec { all: false, users: vec!["ann".into()], query: Some("state = NY".into()) });
        config.sets.insert("all".into(), SetSpec { all: true, ..Default::default() });
        let defs = config.target_defs();
        let ny_public = fields(&[("state", s("NY"))]);
        let ny_private = fields(&[("state", s("NY")), ("access", s("private")), ("manager", s("bob"))]);
        let ct = fields(&[("state", s("CT"))]);
        let names = |t: BTreeSet<Target>| t.into_iter().map(|t| t.token()).collect::<Vec<_>>();
        assert_eq!(names(targets(&defs, Kind::Contact, "c1", &ny_public)), ["all", "ny"]);
        assert_eq!(names(targets(&defs, Kind::Contact, "c2", &ny_private)), ["all"]);
        assert_eq!(names(targets(&defs, Kind::Contact, "c3", &ct)), ["all"]);
        // Companies follow access but not the query; users go everywhere.
        assert_eq!(names(targets(&defs, Kind::Company, "co", &ct)), ["all", "ny"]);
        assert_eq!(names(targets(&defs, Kind::User, "u", &Fields::new())), ["all", "ny"]);
        assert!(targets(&defs, Kind::Set, "ny", &Fields::new()).is_empty());
    }

    #[test]
    fn a_subscription_list_holds_listed_contacts_its_users_can_access() {
        let mut config = RoutingConfig::default();
        config.sets.insert("ny".into(), SetSpec { all: false, users: vec!["ann".into()], query: None });
        config.remotes.insert("laptop".into(), RemoteSpec { set: "ny".into(), subscriptions: ["c1".into()].into() });
        let defs = config.target_defs();
        let sub = defs.iter().find(|d| d.target == Target::Subscriptions("laptop".into())).unwrap();
        assert!(sub.holds(Kind::Contact, "c1", &Fields::new()));
        assert!(!sub.holds(Kind::Contact, "c2", &Fields::new()));
        assert!(!sub.holds(Kind::Contact, "c1", &fields(&[("access", s("private")), ("manager", s("bob"))])));
        assert!(!sub.holds(Kind::Company, "c1", &Fields::new()));
    }

    fn set(names: &[&str]) -> BTreeSet<Target> {
        names.iter().map(|n| Target::Set(n.to_string())).collect()
    }

    fn list(names: &[&str]) -> Vec<Target> {
        names.iter().map(|n| Target::Set(n.to_string())).collect()
    }

    #[test]
    fn a_change_sends_the_state_where_the_record_is_and_a_leave_or_delete_where_it_was() {
        // (rule, kind, op, existed, before, after) -> (state, gone, gone op, children enter, children gone)
        type Case<'a> = (&'a str, Kind, Op, bool, &'a [&'a str], &'a [&'a str]);
        type Want<'a> = (&'a [&'a str], &'a [&'a str], Op, &'a [&'a str], &'a [&'a str]);
        let cases: [(Case, Want); 6] = [
            (
                ("an edit inside the same targets", Kind::Contact, Op::Upsert, true, &["all", "ny"], &["all", "ny"]),
                (&["all", "ny"], &[], Op::Leave, &[], &[]),
            ),
            (
                ("move-in brings the contact's children", Kind::Contact, Op::Upsert, true, &["all"], &["all", "ny"]),
                (&["all", "ny"], &[], Op::Leave, &["ny"], &[]),
            ),
            (
                ("a new contact has no children to bring", Kind::Contact, Op::Upsert, false, &[], &["ny"]),
                (&["ny"], &[], Op::Leave, &[], &[]),
            ),
            (
                ("move-out takes the children along", Kind::Contact, Op::Upsert, true, &["all", "ny"], &["all"]),
                (&["all"], &["ny"], Op::Leave, &[], &["ny"]),
            ),
            (
                ("a delete at the main is a delete everywhere", Kind::Contact, Op::Delete, true, &["all", "ny"], &[]),
                (&[], &["all", "ny"], Op::Delete, &[], &["all", "ny"]),
            ),
            (
                ("only contacts have children", Kind::Company, Op::Upsert, true, &["ny"], &["all"]),
                (&["all"], &["ny"], Op::Leave, &[], &[]),
            ),
        ];
        for ((rule, kind, op, existed, before, after), (state, gone, gone_op, enter, children_gone)) in cases {
            let got = moves(kind, op, existed, &set(before), &set(after));
            let want = Moves {
                state: list(state),
                gone: list(gone),
                gone_op,
                children_enter: list(enter),
                children_gone: list(children_gone),
            };
            assert_eq!(got, want, "{rule}");
        }
    }

    #[test]
    fn a_child_is_routed_by_its_contact() {
        let note = fields(&[("contact_id", s("c1")), ("text", s("hi"))]);
        let contact = fields(&[("state", s("NY"))]);
        let found = Basis::of(Kind::Note, "n1", &note, |id| Ok::<_, ()>((id == "c1").then(|| contact.clone())));
        assert_eq!(found, Ok(Some(Basis { kind: Kind::Contact, id: "c1".into(), fields: contact.clone() })));
        let orphan = Basis::of(Kind::Note, "n1", &note, |_| Ok::<_, ()>(None));
        assert_eq!(orphan, Ok(None), "a child whose contact is not there is held nowhere");
        let own = Basis::of(Kind::Company, "co", &contact, |_| Err("a company looks up no contact"));
        assert_eq!(own.map(|b| b.map(|b| b.kind)), Ok(Some(Kind::Company)));
        assert!(targets_of(&[], None).is_empty());
    }

    fn ny_config() -> RoutingConfig {
        let mut config = RoutingConfig::default();
        config
            .sets
            .insert("ny".into(), SetSpec { all: false, users: vec!["ann".into()], query: Some("state = NY".into()) });
        config.remotes.insert("laptop".into(), RemoteSpec { set: "ny".into(), subscriptions: ["c1".into()].into() });
        config
    }

    fn contact(id: &str, state: &str) -> Option<Basis> {
        Some(Basis { kind: Kind::Contact, id: id.into(), fields: fields(&[("state", s(state))]) })
    }

    #[test]
    fn a_subscribed_contact_stays_at_its_remote_when_it_leaves_the_set() {
        let defs = ny_config().target_defs();
        let laptop = Target::Subscriptions("laptop".into());
        assert_eq!(targets_of(&defs, contact("c1", "NY").as_ref()), [Target::Set("ny".into()), laptop.clone()].into());
        assert_eq!(targets_of(&defs, contact("c1", "CT").as_ref()), [laptop].into(), "held by the list alone");
        assert!(targets_of(&defs, contact("c2", "CT").as_ref()).is_empty());
    }

    #[test]
    fn a_changed_target_says_which_records_enter_and_which_leave() {
        let before = ny_config();
        // The query narrows: NY contacts stay, a CT contact that was held... never was.
        let mut narrowed = before.clone();
        narrowed.sets.get_mut("ny").unwrap().query = Some("state = NY and city = Albany".into());
        let (b, a) = (before.target_defs(), narrowed.target_defs());
        let changes = TargetChange::between(&b, &a);
        assert_eq!(changes.len(), 1, "only the set changed; the list's users are the same");
        let change = changes[0];
        assert_eq!(change.candidates(), None, "a set change may move any record");
        assert_eq!(change.decide(contact("c3", "NY").as_ref()), Some(Op::Leave));
        assert_eq!(change.decide(contact("c4", "CT").as_ref()), None);
        // The list gains c2: only c1 and c2 can move, and only c2 does.
        let mut listed = before.clone();
        listed.remotes.get_mut("laptop").unwrap().subscriptions.insert("c2".into());
        let a = listed.target_defs();
        let changes = TargetChange::between(&b, &a);
        assert_eq!(changes.len(), 1);
        assert_eq!(changes[0].candidates(), Some(["c2".to_string()].into()), "the same users: only what was added");
        assert_eq!(changes[0].decide(contact("c2", "CT").as_ref()), Some(Op::Upsert));
        // The set's users change: the list's scope changes too, so every listed contact is looked at.
        let mut users = before.clone();
        users.sets.get_mut("ny").unwrap().users.push("bob".into());
        let a = users.target_defs();
        let list_change = TargetChange::between(&b, &a).into_iter().find(|c| c.after.listed.is_some()).unwrap();
        assert_eq!(list_change.candidates(), Some(["c1".to_string()].into()));
        // A target that did not exist before: everything it holds enters.
        let fresh = TargetChange { before: None, after: &a[0] };
        assert_eq!(fresh.decide(contact("c5", "NY").as_ref()), Some(Op::Upsert));
    }

    #[test]
    fn the_rules_for_a_sets_definition() {
        let list = |v: &[&str]| Value::List(v.iter().map(|s| s.to_string()).collect());
        let cases: [(&str, Fields, Result<(), SetError>); 6] = [
            ("users and a query", fields(&[("users", list(&["ann"])), ("query", s("state = NY"))]), Ok(())),
            ("everything", fields(&[("all", Value::Bool(true))]), Ok(())),
            (
                "all and users",
                fields(&[("all", Value::Bool(true)), ("users", list(&["ann"]))]),
                Err(SetError::AllWithUsers),
            ),
            ("neither", fields(&[("description", s("x"))]), Err(SetError::NoUsers)),
            ("a blank query", fields(&[("users", list(&["ann"])), ("query", s("  "))]), Err(SetError::BlankQuery)),
            (
                "a query that does not parse",
                fields(&[("users", list(&["ann"])), ("query", s("state ="))]),
                Err(SetError::Query(String::new())),
            ),
        ];
        for (rule, set, want) in cases {
            match (SetSpec::check(&set), want) {
                (Err(SetError::Query(why)), Err(SetError::Query(_))) => {
                    assert!(why.contains("expected"), "{rule}: {why}")
                }
                (got, want) => assert_eq!(got.map(|_| ()), want, "{rule}"),
            }
        }
        // Choosing users ends `all`; choosing `all` ends users and query.
        let users = SetSpec::edit(vec![("users".into(), list(&["ann"]))]);
        assert!(users.contains(&("all".into(), Value::Null)));
        let all = SetSpec::edit(vec![("all".into(), Value::Bool(true))]);
        assert!(all.contains(&("users".into(), Value::Null)) && all.contains(&("query".into(), Value::Null)));
    }

    #[test]
    fn a_users_teams_change_the_scope() {
        let mut config = RoutingConfig::default();
        config.sets.insert("s".into(), SetSpec { all: false, users: vec!["ann".into()], query: None });
        let before = config.target_defs();
        let user = fields(&[("name", s("Ann")), ("teams", Value::List(vec!["east".into()]))]);
        assert!(config.apply(Kind::User, "ann", Some(&user)));
        assert_ne!(before, config.target_defs());
        assert!(!config.apply(Kind::User, "ann", Some(&user)), "the same teams again change nothing");
    }
}
