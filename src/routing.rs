//! Routing: which targets hold a record. Pure: no IO, no NATS, no redb.
//!
//! A target is a sync set or one remote's subscription list ([`crate::wire::Target`]). The
//! main's projector asks [`targets`] for a record's targets before and after each change, and
//! publishes full states, leaves and tombstones from the difference (see
//! `main_service::projector`).

use std::collections::BTreeSet;

use crate::model::{Fields, Kind, Value};
use crate::store::Stored;
use crate::wire::Target;

/// A sync set as the router sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SetDef {
    pub name: String,
    /// Holds every record of the main.
    pub all: bool,
    /// The users whose accessible records the set holds (when not `all`).
    pub users: Vec<String>,
}

impl SetDef {
    /// Reads a set from its stored record (sets are events like any record).
    pub fn from_stored(name: &str, stored: &Stored) -> SetDef {
        let all = matches!(stored.fields.get("all").map(|f| &f.value), Some(Value::Bool(true)));
        let users = match stored.fields.get("users").map(|f| &f.value) {
            Some(Value::List(l)) => l.clone(),
            _ => Vec::new(),
        };
        SetDef { name: name.to_owned(), all, users }
    }

    /// Whether the set holds a record of `kind` with these fields. Children are decided by
    /// their contact: the caller passes the contact's fields for them.
    pub fn holds(&self, kind: Kind, _fields: &Fields) -> bool {
        kind.is_routed() && self.all
    }
}

/// The targets that hold a record. For a child (note, history, activity, membership) pass the
/// fields of its contact as `routing_fields` and `Kind::Contact` as `routing_kind`.
pub fn targets(sets: &[SetDef], routing_kind: Kind, routing_fields: &Fields) -> BTreeSet<Target> {
    sets.iter().filter(|s| s.holds(routing_kind, routing_fields)).map(|s| Target::Set(s.name.clone())).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_all_set_holds_every_routed_record_and_no_configuration() {
        let sets = vec![
            SetDef { name: "everyone".into(), all: true, users: vec![] },
            SetDef { name: "nobody".into(), all: false, users: vec![] },
        ];
        let t = targets(&sets, Kind::Contact, &Fields::new());
        assert_eq!(t.into_iter().collect::<Vec<_>>(), vec![Target::Set("everyone".into())]);
        assert!(targets(&sets, Kind::Remote, &Fields::new()).is_empty());
    }
}
