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
//! - **Children** (notes, histories, activities, memberships) follow their contact.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use crate::model::{Fields, Kind, Value, names, text};
use crate::query::Query;
use crate::wire::Target;

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

/// The targets that hold a record. For a child (note, history, activity, membership) pass its
/// contact's id and fields with `Kind::Contact`.
pub fn targets(defs: &[TargetDef], kind: Kind, id: &str, fields: &Fields) -> BTreeSet<Target> {
    defs.iter().filter(|d| d.holds(kind, id, fields)).map(|d| d.target.clone()).collect()
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
