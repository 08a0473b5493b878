//! Who may do what through the APIs: a user's role decides which requests they may make, and
//! the access rules of routing ([`crate::routing::can_access`]) decide which records they see.
//!
//! - **Roles.** Administrators and managers manage sets, remotes, users and teams, and every
//!   record; standard users manage records and subscription lists; restricted users read, and
//!   change only the records they manage (a note, history, activity or membership is managed
//!   by its contact's record manager); browse users only read.
//! - **Seeing.** A contact, company or group is seen by whoever may access it (public, its
//!   record manager, and for a limited one its users and teams), by managers also when it is
//!   limited, and by administrators always (they administer the database, whose files they
//!   can read anyway); a child through its contact; users and teams by everyone; sets and
//!   remotes by administrators and managers. A private record is otherwise its record
//!   manager's alone, as in routing. A record a user may not see is answered like a missing
//!   one, so its existence cannot be inferred.

use crate::model::{Fields, Kind, text};
use crate::routing::{UserView, can_access};

/// A user's role (the user record's `role`; standard when it says nothing).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Administrator,
    Manager,
    Standard,
    Restricted,
    Browse,
}

impl Role {
    pub fn of(user: &Fields) -> Role {
        match text(user, "role") {
            Some("administrator") => Role::Administrator,
            Some("manager") => Role::Manager,
            Some("restricted") => Role::Restricted,
            Some("browse") => Role::Browse,
            _ => Role::Standard,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Role::Administrator => "administrator",
            Role::Manager => "manager",
            Role::Standard => "standard",
            Role::Restricted => "restricted",
            Role::Browse => "browse",
        }
    }

    /// Administrators and managers: they manage the configuration and see it.
    pub fn manages(self) -> bool {
        matches!(self, Role::Administrator | Role::Manager)
    }
}

/// The user a request is made by.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub user: UserView,
    pub role: Role,
}

impl Caller {
    /// The caller a user record describes.
    pub fn of(id: &str, user: &Fields) -> Caller {
        Caller {
            user: UserView { id: id.to_owned(), teams: crate::model::names(user, "teams").to_vec() },
            role: Role::of(user),
        }
    }
}

/// What a request does, as far as roles decide.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request<'a> {
    /// Reads (records, status, sessions).
    Read,
    /// Changes the configuration: `what` names it in the refusal ("sets", "remotes", …).
    Configure(&'static str),
    /// Changes a remote's subscription list.
    Subscriptions,
    /// Creates (`new`), changes or deletes a record of `kind` whose record manager (its
    /// contact's, for a child) is `before` the change and `after` it.
    Write { kind: Kind, new: bool, before: Option<&'a str>, after: Option<&'a str> },
}

/// Why a request was refused: the rule, in words (the API answers 403 with it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Forbidden(pub String);

/// Whether `caller` may make `request`.
pub fn permit(caller: &Caller, request: &Request<'_>) -> Result<(), Forbidden> {
    let role = caller.role;
    let refuse = |rule: String| Err(Forbidden(format!("{rule}; {} is a {} user", caller.user.id, role.name())));
    match request {
        Request::Read => Ok(()),
        Request::Configure(what) if !role.manages() => {
            refuse(format!("only administrators and managers manage {what}"))
        }
        Request::Configure(_) => Ok(()),
        Request::Subscriptions if matches!(role, Role::Restricted | Role::Browse) => {
            refuse("only administrators, managers and standard users change subscription lists".into())
        }
        Request::Subscriptions => Ok(()),
        Request::Write { .. } if role == Role::Browse => refuse("browse users only read".into()),
        Request::Write { kind, .. } if matches!(kind, Kind::User | Kind::Team) && !role.manages() => {
            refuse(format!("only administrators and managers manage {}", kind.plural()))
        }
        Request::Write { new, before, after, .. } if role == Role::Restricted => {
            let me = Some(caller.user.id.as_str());
            // A record they create is theirs (the service makes them its manager if it names
            // none); one that exists must be theirs already.
            let theirs = if *new { after.is_none() || *after == me } else { *before == me };
            if theirs { Ok(()) } else { refuse("restricted users change only the records they manage".into()) }
        }
        Request::Write { .. } => Ok(()),
    }
}

/// Whether `caller` may see a record of `kind` with `fields`; for a child, `contact` is its
/// contact's fields (`None`: the contact is not held, and neither is the child seen).
pub fn may_see(caller: &Caller, kind: Kind, fields: &Fields, contact: Option<&Fields>) -> bool {
    let sees = |record: &Fields| match caller.role {
        Role::Administrator => true,
        Role::Manager => text(record, "access") != Some("private") || can_access(&caller.user, record),
        _ => can_access(&caller.user, record),
    };
    match kind {
        Kind::Contact | Kind::Company | Kind::Group => sees(fields),
        Kind::Membership | Kind::Note | Kind::History | Kind::Activity => contact.is_some_and(sees),
        Kind::User | Kind::Team => true,
        Kind::Set | Kind::Remote => caller.role.manages(),
    }
}

/// The record manager that decides who may change a record: its own, or its contact's for a
/// child.
pub fn manager_of<'a>(kind: Kind, fields: &'a Fields, contact: Option<&'a Fields>) -> Option<&'a str> {
    match kind.parent_field() {
        Some(_) => contact.and_then(|c| text(c, "manager")),
        None => text(fields, "manager"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Field, Value};

    fn fields(pairs: &[(&str, &str)]) -> Fields {
        pairs.iter().map(|(k, v)| (k.to_string(), Field { value: Value::Str(v.to_string()), stamp: 1 })).collect()
    }

    fn caller(id: &str, role: &str) -> Caller {
        Caller::of(id, &fields(&[("role", role)]))
    }

    #[test]
    fn roles_decide_what_a_user_may_ask() {
        let write =
            |kind, before: Option<&'static str>, after| Request::Write { kind, new: before.is_none(), before, after };
        let contact = |b: Option<&'static str>, a: Option<&'static str>| write(Kind::Contact, b, a);
        #[rustfmt::skip]
        let table: Vec<(&str, Request<'_>, bool, &str)> = vec![
            ("administrator", Request::Configure("sets"), true, ""),
            ("manager", Request::Configure("remotes"), true, ""),
            ("standard", Request::Configure("sets"), false, "only administrators and managers manage sets"),
            ("restricted", Request::Configure("users"), false, "only administrators and managers"),
            ("browse", Request::Read, true, ""),
            ("browse", contact(None, None), false, "browse users only read"),
            ("standard", contact(Some("bob"), Some("bob")), true, ""),
            ("standard", Request::Subscriptions, true, ""),
            ("restricted", Request::Subscriptions, false, "subscription lists"),
            ("standard", write(Kind::User, None, None), false, "only administrators and managers manage users"),
            ("manager", write(Kind::Team, None, None), true, ""),
            ("restricted", contact(Some("ann"), Some("ann")), true, ""),
            ("restricted", contact(Some("ann"), Some("bob")), true, ""),
            ("restricted", contact(Some("bob"), Some("ann")), false, "restricted users change only the records they manage"),
            ("restricted", contact(None, Some("ann")), true, ""),
            ("restricted", contact(None, None), true, ""),
            ("restricted", contact(None, Some("bob")), false, "restricted users"),
            ("restricted", write(Kind::Note, Some("bob"), Some("bob")), false, "restricted users"),
            (
                "restricted",
                Request::Write { kind: Kind::Contact, new: false, before: None, after: None },
                false,
                "restricted users change only the records they manage",
            ),
        ];
        for (role, request, allowed, rule) in table {
            let result = permit(&caller("ann", role), &request);
            assert_eq!(result.is_ok(), allowed, "{role} {request:?}: {result:?}");
            if let Err(Forbidden(why)) = result {
                assert!(why.contains(rule) && why.contains(&format!("ann is a {role} user")), "{why}");
            }
        }
    }

    #[test]
    fn a_user_sees_what_they_may_access_and_children_through_their_contact() {
        let private = fields(&[("access", "private"), ("manager", "bob")]);
        let public = fields(&[]);
        let limited = fields(&[("access", "limited"), ("manager", "bob")]);
        let (ann, bob, admin) = (caller("ann", "standard"), caller("bob", "browse"), caller("root", "administrator"));
        let meg = caller("meg", "manager");
        assert!(!may_see(&ann, Kind::Contact, &private, None));
        assert!(may_see(&bob, Kind::Contact, &private, None));
        assert!(may_see(&admin, Kind::Contact, &private, None), "administrators see the whole database");
        assert!(!may_see(&meg, Kind::Contact, &private, None), "a private record is not a manager's");
        assert!(may_see(&meg, Kind::Contact, &limited, None), "a limited one is");
        assert!(!may_see(&ann, Kind::Contact, &limited, None));
        assert!(!may_see(&ann, Kind::Note, &public, Some(&private)));
        assert!(may_see(&ann, Kind::Note, &public, Some(&public)));
        assert!(!may_see(&ann, Kind::Note, &public, None));
        assert!(may_see(&ann, Kind::User, &public, None));
        assert!(!may_see(&ann, Kind::Set, &public, None));
        assert!(may_see(&admin, Kind::Remote, &public, None));
        assert_eq!(manager_of(Kind::Note, &public, Some(&private)), Some("bob"));
        assert_eq!(manager_of(Kind::Contact, &private, None), Some("bob"));
    }
}
