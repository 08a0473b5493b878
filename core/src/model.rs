//! The records of the CRM: kinds, fields, values, and the checks a change must pass.
//!
//! A record is a map of field name to [`Field`]: a value and the hybrid-logical-clock stamp of
//! the change that set it. One generic shape for every kind keeps the field-by-field merge, the
//! wire format and the API uniform; what differs between kinds is only the table of
//! [`FieldSpec`]s below, which drives validation and documentation alike.
//!
//! Architecture invariant: this module does no IO.

use std::collections::BTreeMap;
use std::fmt;

use serde::de::{self, MapAccess, SeqAccess, Visitor};
use serde::ser::{SerializeMap, SerializeSeq, SerializeTuple};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::names;

/// Every kind of record the events stream carries.
///
/// `Set` and `Remote` are the main's own configuration: they are events like any other (so the
/// main's projection can be rebuilt from the stream alone) but are never routed to remotes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Contact,
    Company,
    Group,
    Membership,
    Note,
    History,
    Activity,
    User,
    Team,
    Set,
    Remote,
}

impl Kind {
    /// The kinds a user edits as CRM data, in the order the command line lists them.
    pub const DATA: [Kind; 9] = [
        Kind::Contact,
        Kind::Company,
        Kind::Group,
        Kind::Membership,
        Kind::Note,
        Kind::History,
        Kind::Activity,
        Kind::User,
        Kind::Team,
    ];

    /// Every kind, data and configuration.
    pub const ALL: [Kind; 11] = [
        Kind::Contact,
        Kind::Company,
        Kind::Group,
        Kind::Membership,
        Kind::Note,
        Kind::History,
        Kind::Activity,
        Kind::User,
        Kind::Team,
        Kind::Set,
        Kind::Remote,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Contact => "contact",
            Kind::Company => "company",
            Kind::Group => "group",
            Kind::Membership => "membership",
            Kind::Note => "note",
            Kind::History => "history",
            Kind::Activity => "activity",
            Kind::User => "user",
            Kind::Team => "team",
            Kind::Set => "set",
            Kind::Remote => "remote",
        }
    }

    /// The kind with its indefinite article, for messages: "a contact", "an activity".
    pub fn a(self) -> &'static str {
        match self {
            Kind::Contact => "a contact",
            Kind::Company => "a company",
            Kind::Group => "a group",
            Kind::Membership => "a membership",
            Kind::Note => "a note",
            Kind::History => "a history",
            Kind::Activity => "an activity",
            Kind::User => "a user",
            Kind::Team => "a team",
            Kind::Set => "a set",
            Kind::Remote => "a remote",
        }
    }

    /// The collection name used in API paths (`/v1/contacts`).
    pub fn plural(self) -> &'static str {
        match self {
            Kind::Contact => "contacts",
            Kind::Company => "companies",
            Kind::Group => "groups",
            Kind::Membership => "memberships",
            Kind::Note => "notes",
            Kind::History => "histories",
            Kind::Activity => "activities",
            Kind::User => "users",
            Kind::Team => "teams",
            Kind::Set => "sets",
            Kind::Remote => "remotes",
        }
    }

    pub fn parse(s: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.as_str() == s)
    }

    pub fn from_plural(s: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.plural() == s)
    }

    /// How the kind is stored: its number in storage keys and the name of the table that
    /// holds its records. Fixed forever, whatever order the kinds are listed in, and apart
    /// from the API's name of the kind: a new kind takes a new number and table, renaming a
    /// kind never moves stored data, and a test pins the existing ones.
    fn storage(self) -> (u8, &'static str) {
        match self {
            Kind::Contact => (0, "contact"),
            Kind::Company => (1, "company"),
            Kind::Group => (2, "group"),
            Kind::Membership => (3, "membership"),
            Kind::Note => (4, "note"),
            Kind::History => (5, "history"),
            Kind::Activity => (6, "activity"),
            Kind::User => (7, "user"),
            Kind::Team => (8, "team"),
            Kind::Set => (9, "set"),
            Kind::Remote => (10, "remote"),
        }
    }

    /// The kind's number in storage keys (see [`Kind::storage`]).
    pub fn code(self) -> u8 {
        self.storage().0
    }

    /// The name of the table of the kind's records (see [`Kind::storage`]).
    pub fn table(self) -> &'static str {
        self.storage().1
    }

    /// Whether records of this kind travel to remotes.
    pub fn is_routed(self) -> bool {
        !matches!(self, Kind::Set | Kind::Remote)
    }

    /// The field naming the contact a child record belongs to. Children follow their contact
    /// in routing and go with it when it is deleted.
    pub fn parent_field(self) -> Option<&'static str> {
        match self {
            Kind::Membership | Kind::Note | Kind::History | Kind::Activity => Some("contact_id"),
            _ => None,
        }
    }

    /// Whether a remote may create, change and delete records of this kind: CRM data, but not
    /// users and teams, which decide who sees what and are managed at the main.
    pub fn is_editable_at_remotes(self) -> bool {
        Kind::DATA.contains(&self) && !matches!(self, Kind::User | Kind::Team)
    }

    pub fn fields(self) -> &'static [FieldSpec] {
        match self {
            Kind::Contact => CONTACT,
            Kind::Company => COMPANY,
            Kind::Group => GROUP,
            Kind::Membership => MEMBERSHIP,
            Kind::Note => NOTE,
            Kind::History => HISTORY,
            Kind::Activity => ACTIVITY,
            Kind::User => USER,
            Kind::Team => TEAM,
            Kind::Set => SET,
            Kind::Remote => REMOTE,
        }
    }

    pub fn field(self, name: &str) -> Option<&'static FieldSpec> {
        self.fields().iter().find(|f| f.name == name)
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a field may hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FieldType {
    /// A string of at most this many bytes.
    Text(usize),
    /// One of the listed strings.
    Choice(&'static [&'static str]),
    /// The id of a record of this kind.
    Ref(Kind),
    /// A list of ids or names, each a subject token.
    Names,
    /// A list of ids of records of this kind (users, teams), each of which must exist.
    Refs(Kind),
    Bool,
    Int,
    /// An integer, 0 or more (a duration).
    Count,
    /// A date or a date-time, ISO 8601 (see [`crate::date`]).
    Date,
    /// Custom fields: on input and output a map of name to string value; stored, merged and
    /// sent as one field per name (`custom.NAME`), each with its own stamp, so two people
    /// changing different custom fields of one record both keep their change.
    Custom,
}

#[derive(Debug, Clone, Copy)]
pub struct FieldSpec {
    pub name: &'static str,
    pub ty: FieldType,
    /// Must be present on create and cannot be cleared.
    pub required: bool,
}

const fn f(name: &'static str, ty: FieldType) -> FieldSpec {
    FieldSpec { name, ty, required: false }
}

const fn req(name: &'static str, ty: FieldType) -> FieldSpec {
    FieldSpec { name, ty, required: true }
}

/// Short text: names, phone numbers, cities.
const SHORT: FieldType = FieldType::Text(256);
/// Long text: a note's body, a history's details.
const LONG: FieldType = FieldType::Text(64 * 1024);
pub const ACCESS_LEVELS: &[&str] = &["public", "private", "limited"];
pub const ROLES: &[&str] = &["administrator", "manager", "standard", "restricted", "browse"];
/// Most custom fields on one record, and the longest custom value.
pub const MAX_CUSTOM_FIELDS: usize = 100;
pub const MAX_CUSTOM_VALUE: usize = 1024;
/// Most entries in a list of names (users, teams).
pub const MAX_NAMES: usize = 1000;

const ACCESS: [FieldSpec; 4] = [
    f("manager", FieldType::Ref(Kind::User)),
    f("access", FieldType::Choice(ACCESS_LEVELS)),
    f("access_users", FieldType::Refs(Kind::User)),
    f("access_teams", FieldType::Refs(Kind::Team)),
];

const CONTACT: &[FieldSpec] = &[
    f("first_name", SHORT),
    f("last_name", SHORT),
    f("company", SHORT),
    f("company_id", FieldType::Ref(Kind::Company)),
    f("title", SHORT),
    f("phone", SHORT),
    f("mobile", SHORT),
    f("email", SHORT),
    f("address1", SHORT),
    f("address2", SHORT),
    f("city", SHORT),
    f("state", SHORT),
    f("zip", SHORT),
    f("country", SHORT),
    f("website", SHORT),
    f("custom", FieldType::Custom),
    ACCESS[0],
    ACCESS[1],
    ACCESS[2],
    ACCESS[3],
];

const COMPANY: &[FieldSpec] = &[
    req("name", SHORT),
    f("industry", SHORT),
    f("phone", SHORT),
    f("email", SHORT),
    f("website", SHORT),
    f("address1", SHORT),
    f("address2", SHORT),
    f("city", SHORT),
    f("state", SHORT),
    f("zip", SHORT),
    f("country", SHORT),
    f("custom", FieldType::Custom),
    ACCESS[0],
    ACCESS[1],
    ACCESS[2],
    ACCESS[3],
];

const GROUP: &[FieldSpec] =
    &[req("name", SHORT), f("description", FieldType::Text(4096)), ACCESS[0], ACCESS[1], ACCESS[2], ACCESS[3]];

const MEMBERSHIP: &[FieldSpec] =
    &[req("contact_id", FieldType::Ref(Kind::Contact)), req("group_id", FieldType::Ref(Kind::Group))];

const NOTE: &[FieldSpec] = &[
    req("contact_id", FieldType::Ref(Kind::Contact)),
    req("text", LONG),
    f("date", FieldType::Date),
    f("author", FieldType::Ref(Kind::User)),
];

const HISTORY: &[FieldSpec] = &[
    req("contact_id", FieldType::Ref(Kind::Contact)),
    f("type", SHORT),
    f("regarding", SHORT),
    f("details", LONG),
    f("date", FieldType::Date),
    f("duration_minutes", FieldType::Count),
    f("user", FieldType::Ref(Kind::User)),
];

const ACTIVITY: &[FieldSpec] = &[
    req("contact_id", FieldType::Ref(Kind::Contact)),
    f("type", SHORT),
    f("regarding", SHORT),
    f("details", LONG),
    f("due", FieldType::Date),
    f("done", FieldType::Bool),
    f("user", FieldType::Ref(Kind::User)),
];

const USER: &[FieldSpec] = &[
    req("name", SHORT),
    f("email", SHORT),
    f("role", FieldType::Choice(ROLES)),
    f("teams", FieldType::Refs(Kind::Team)),
    // The SHA-256 (hex) of each of the user's API tokens. Set only through the token endpoint,
    // never shown by the APIs; routed with the user, so a token works at every remote.
    f(TOKENS, FieldType::Names),
];

/// The field of a user that holds the hashes of their API tokens.
pub const TOKENS: &str = "tokens";

const TEAM: &[FieldSpec] = &[req("name", SHORT), f("description", FieldType::Text(4096))];

const SET: &[FieldSpec] = &[
    f("description", FieldType::Text(4096)),
    f("users", FieldType::Refs(Kind::User)),
    f("all", FieldType::Bool),
    f("query", FieldType::Text(4096)),
];

const REMOTE: &[FieldSpec] = &[
    req("set", FieldType::Ref(Kind::Set)),
    f("expires_days", FieldType::Int),
    f("created_ms", FieldType::Int),
    f("enabled", FieldType::Bool),
    f("subscriptions", FieldType::Names),
    // The remote's durable consumer on CRM_SYNC, once re-created (before: `remote-NAME`).
    f("consumer", SHORT),
];

/// A record as a site holds it: its version (the `CRM_EVENTS` sequence of the main's change
/// that made it; 0 for one created at a remote and not merged yet), which of a remote's
/// targets hold it ([`crate::apply`]'s holder bits; 0 at the main), and its fields.
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    pub version: u64,
    pub holders: u8,
    pub fields: Fields,
}

impl Record {
    pub fn new(version: u64, fields: Fields) -> Record {
        Record { version, holders: 0, fields }
    }
}

/// A field value. The shapes are few on purpose: each maps onto MessagePack and JSON one to
/// one, so the wire contract in `schemas/` can describe it exactly.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Default)]
pub enum Value {
    /// A cleared field. Kept with its stamp so a later merge knows when it was cleared.
    #[default]
    Null,
    Bool(bool),
    Int(i64),
    Str(String),
    List(Vec<String>),
    Map(BTreeMap<String, String>),
}

impl Value {
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }

    pub fn to_json(&self) -> serde_json::Value {
        match self {
            Value::Null => serde_json::Value::Null,
            Value::Bool(b) => (*b).into(),
            Value::Int(i) => (*i).into(),
            Value::Str(s) => s.clone().into(),
            Value::List(l) => l.clone().into(),
            Value::Map(m) => serde_json::Value::Object(m.iter().map(|(k, v)| (k.clone(), v.clone().into())).collect()),
        }
    }
}

impl Serialize for Value {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Value::Null => s.serialize_unit(),
            Value::Bool(b) => s.serialize_bool(*b),
            Value::Int(i) => s.serialize_i64(*i),
            Value::Str(v) => s.serialize_str(v),
            Value::List(l) => {
                let mut seq = s.serialize_seq(Some(l.len()))?;
                for item in l {
                    seq.serialize_element(item)?;
                }
                seq.end()
            }
            Value::Map(m) => {
                let mut map = s.serialize_map(Some(m.len()))?;
                for (k, v) in m {
                    map.serialize_entry(k, v)?;
                }
                map.end()
            }
        }
    }
}

impl<'de> Deserialize<'de> for Value {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Value, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Value;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("nil, a boolean, an integer, a string, a list of strings or a map of strings")
            }
            fn visit_unit<E>(self) -> Result<Value, E> {
                Ok(Value::Null)
            }
            fn visit_none<E>(self) -> Result<Value, E> {
                Ok(Value::Null)
            }
            fn visit_bool<E>(self, b: bool) -> Result<Value, E> {
                Ok(Value::Bool(b))
            }
            fn visit_i64<E>(self, i: i64) -> Result<Value, E> {
                Ok(Value::Int(i))
            }
            fn visit_u64<E: de::Error>(self, u: u64) -> Result<Value, E> {
                i64::try_from(u).map(Value::Int).map_err(|_| E::custom("integer out of range"))
            }
            fn visit_str<E>(self, s: &str) -> Result<Value, E> {
                Ok(Value::Str(s.to_owned()))
            }
            fn visit_string<E>(self, s: String) -> Result<Value, E> {
                Ok(Value::Str(s))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
                let mut l = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(1024));
                while let Some(item) = seq.next_element::<String>()? {
                    l.push(item);
                }
                Ok(Value::List(l))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
                let mut m = BTreeMap::new();
                while let Some((k, v)) = map.next_entry::<String, String>()? {
                    m.insert(k, v);
                }
                Ok(Value::Map(m))
            }
        }
        d.deserialize_any(V)
    }
}

/// A field's value and the HLC stamp of the change that set it. On the wire: `[value, stamp]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Field {
    pub value: Value,
    pub stamp: u64,
}

impl Serialize for Field {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut t = s.serialize_tuple(2)?;
        t.serialize_element(&self.value)?;
        t.serialize_element(&self.stamp)?;
        t.end()
    }
}

impl<'de> Deserialize<'de> for Field {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Field, D::Error> {
        let (value, stamp) = <(Value, u64)>::deserialize(d)?;
        Ok(Field { value, stamp })
    }
}

/// The fields of one record.
pub type Fields = BTreeMap<String, Field>;

/// Reads a string field, if set.
pub fn text<'a>(fields: &'a Fields, name: &str) -> Option<&'a str> {
    fields.get(name).and_then(|f| f.value.as_str())
}

/// Reads an integer field, if set.
pub fn int(fields: &Fields, name: &str) -> Option<i64> {
    match fields.get(name).map(|f| &f.value) {
        Some(Value::Int(i)) => Some(*i),
        _ => None,
    }
}

/// Reads a list field (ids or names), empty if unset.
pub fn names<'a>(fields: &'a Fields, name: &str) -> &'a [String] {
    match fields.get(name).map(|f| &f.value) {
        Some(Value::List(l)) => l,
        _ => &[],
    }
}

/// A change to some fields of a record, as checked input: `Value::Null` clears a field.
pub type Patch = Vec<(String, Value)>;

/// Why an input record was refused. Each message names the field and what it accepts.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InputError {
    #[error("the body must be a JSON object of field names to values, got {0}")]
    NotAnObject(&'static str),
    #[error("unknown field `{field}` for {}; its fields are: {known}", .kind.a())]
    UnknownField { kind: Kind, field: String, known: String },
    #[error("field `{field}` of {} must be {expected}, got {got}", .kind.a())]
    WrongType { kind: Kind, field: String, expected: String, got: String },
    #[error("field `{field}` of {} is required", .kind.a())]
    Missing { kind: Kind, field: &'static str },
    #[error("field `{field}`: {source}")]
    BadName { field: String, source: names::NameError },
    #[error("`{0}` cannot be changed: it is set by the server")]
    ReadOnly(&'static str),
    #[error(
        "{} holds at most {MAX_CUSTOM_FIELDS} custom fields; this change would leave {count}. \
         Clear some (`\"custom\": {{\"NAME\": null}}`) first",
        .kind.a()
    )]
    TooManyCustom { kind: Kind, count: usize },
}

fn json_type(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::Null => "null".into(),
        serde_json::Value::Bool(_) => "a boolean".into(),
        serde_json::Value::Number(n) => format!("the number {n}"),
        serde_json::Value::String(s) if s.len() > 40 => format!("a string of {} bytes", s.len()),
        serde_json::Value::String(s) => format!("the string {s:?}"),
        serde_json::Value::Array(a) => format!("a list of {} items", a.len()),
        serde_json::Value::Object(_) => "an object".into(),
    }
}

impl FieldType {
    fn describe(self) -> String {
        match self {
            FieldType::Text(max) => format!("a string of at most {max} bytes"),
            FieldType::Choice(c) => format!("one of {}", c.join(", ")),
            FieldType::Ref(kind) => format!("the id of {} (1-64 of A-Z a-z 0-9 _ -)", kind.a()),
            FieldType::Names => format!("a list of at most {MAX_NAMES} ids (1-64 of A-Z a-z 0-9 _ -)"),
            FieldType::Refs(kind) => {
                format!("a list of at most {MAX_NAMES} ids of {}s (1-64 of A-Z a-z 0-9 _ -)", kind.as_str())
            }
            FieldType::Bool => "true or false".into(),
            FieldType::Int => "an integer".into(),
            FieldType::Count => "a whole number, 0 or more".into(),
            FieldType::Date => crate::date::FORMS.into(),
            FieldType::Custom => format!(
                "an object of at most {MAX_CUSTOM_FIELDS} custom fields, each a string of at most {MAX_CUSTOM_VALUE} bytes"
            ),
        }
    }

    /// Converts a JSON value of the right shape for this type; `None` for a wrong shape.
    fn read_json(self, v: &serde_json::Value) -> Option<Value> {
        use serde_json::Value as J;
        Some(match (self, v) {
            (FieldType::Names | FieldType::Refs(_), J::Array(items)) => {
                Value::List(items.iter().map(|i| i.as_str().map(str::to_owned)).collect::<Option<_>>()?)
            }
            (FieldType::Bool, J::Bool(b)) => Value::Bool(*b),
            (FieldType::Int | FieldType::Count, J::Number(n)) => Value::Int(n.as_i64()?),
            (FieldType::Text(_) | FieldType::Choice(_) | FieldType::Ref(_) | FieldType::Date, J::String(s)) => {
                Value::Str(s.clone())
            }
            _ => return None,
        })
    }

    /// Whether a value fits this type: `None` if it does not, an error for a malformed id or
    /// name. The one rule for input from the API and for fields uploaded by remotes.
    fn admits(self, v: &Value) -> Option<Result<(), names::NameError>> {
        let ok = Some(Ok(()));
        match (self, v) {
            (FieldType::Text(max), Value::Str(s)) if s.len() <= max => ok,
            (FieldType::Choice(c), Value::Str(s)) if c.contains(&s.as_str()) => ok,
            (FieldType::Ref(_), Value::Str(s)) => Some(names::check("id", s).map(|_| ())),
            (FieldType::Names | FieldType::Refs(_), Value::List(items)) if items.len() <= MAX_NAMES => {
                Some(items.iter().try_for_each(|s| names::check("name", s).map(|_| ())))
            }
            (FieldType::Bool, Value::Bool(_)) | (FieldType::Int, Value::Int(_)) => ok,
            (FieldType::Count, Value::Int(n)) if *n >= 0 => ok,
            (FieldType::Date, Value::Str(s)) if crate::date::is_valid(s) => ok,
            _ => None,
        }
    }

    /// Checks one JSON value against this type and converts it.
    fn check(self, v: &serde_json::Value) -> Option<Result<Value, names::NameError>> {
        let value = self.read_json(v)?;
        Some(self.admits(&value)?.map(|()| value))
    }
}

/// What an input body carried besides its fields.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Input {
    /// A client-chosen id (create only).
    pub id: Option<String>,
    pub patch: Patch,
}

/// Checks a JSON body for a record of `kind`. `creating` allows an `id` and enforces required
/// fields; an update may name any subset of fields, and `null` clears one.
pub fn parse_input(kind: Kind, body: &serde_json::Value, creating: bool) -> Result<Input, InputError> {
    let serde_json::Value::Object(map) = body else {
        return Err(InputError::NotAnObject(match body {
            serde_json::Value::Array(_) => "a list",
            serde_json::Value::String(_) => "a string",
            serde_json::Value::Number(_) => "a number",
            serde_json::Value::Bool(_) => "a boolean",
            _ => "null",
        }));
    };
    refuse_nul(kind, map)?;
    let mut input = Input::default();
    for (name, v) in map {
        match name.as_str() {
            "id" if creating => input.id = Some(parse_id(kind, v)?),
            "id" => return Err(InputError::ReadOnly("id")),
            "version" => return Err(InputError::ReadOnly("version")),
            _ => parse_field(kind, name, v, &mut input.patch)?,
        }
    }
    if creating {
        for spec in kind.fields().iter().filter(|s| s.required) {
            if !input.patch.iter().any(|(n, _)| n == spec.name) {
                return Err(InputError::Missing { kind, field: spec.name });
            }
        }
    }
    Ok(input)
}

/// A client-chosen id of a new record.
fn parse_id(kind: Kind, v: &serde_json::Value) -> Result<String, InputError> {
    let serde_json::Value::String(id) = v else {
        return Err(InputError::WrongType { kind, field: "id".into(), expected: "a string".into(), got: json_type(v) });
    };
    names::check("id", id).map_err(|source| InputError::BadName { field: "id".into(), source })?;
    Ok(id.clone())
}

/// One field of an input body, added to `patch` (a custom map adds one entry per key).
fn parse_field(kind: Kind, name: &str, v: &serde_json::Value, patch: &mut Patch) -> Result<(), InputError> {
    if let Some(key) = name.strip_prefix(CUSTOM_PREFIX)
        && kind.field("custom").is_some()
    {
        patch.push(custom_entry(kind, key, v)?);
        return Ok(());
    }
    let Some(spec) = kind.field(name) else {
        return Err(InputError::UnknownField {
            kind,
            field: name.to_owned(),
            known: kind.fields().iter().map(|f| f.name).collect::<Vec<_>>().join(", "),
        });
    };
    let wrong =
        || InputError::WrongType { kind, field: name.to_owned(), expected: spec.ty.describe(), got: json_type(v) };
    match (v, spec.ty) {
        (serde_json::Value::Null, _) if spec.required => Err(InputError::Missing { kind, field: spec.name }),
        (serde_json::Value::Null, _) => {
            patch.push((name.to_owned(), Value::Null));
            Ok(())
        }
        (serde_json::Value::Object(m), FieldType::Custom) if m.len() <= MAX_CUSTOM_FIELDS => {
            for (key, value) in m {
                patch.push(custom_entry(kind, key, value)?);
            }
            Ok(())
        }
        (_, FieldType::Custom) => Err(wrong()),
        _ => match spec.ty.check(v) {
            Some(Ok(value)) => {
                patch.push((name.to_owned(), value));
                Ok(())
            }
            Some(Err(source)) => Err(InputError::BadName { field: name.to_owned(), source }),
            None => Err(wrong()),
        },
    }
}

/// Field names of custom fields start with this: `custom.source`.
pub const CUSTOM_PREFIX: &str = "custom.";

/// One custom field of an input, as a patch entry: `custom.NAME` set to a string, or cleared.
fn custom_entry(kind: Kind, key: &str, v: &serde_json::Value) -> Result<(String, Value), InputError> {
    let field = format!("{CUSTOM_PREFIX}{key}");
    names::check("custom field name", key).map_err(|source| InputError::BadName { field: field.clone(), source })?;
    match v {
        serde_json::Value::Null => Ok((field, Value::Null)),
        serde_json::Value::String(s) if s.len() <= MAX_CUSTOM_VALUE => Ok((field, Value::Str(s.clone()))),
        other => Err(InputError::WrongType {
            kind,
            field,
            expected: format!(
                "a string of at most {MAX_CUSTOM_VALUE} bytes (custom fields hold text), or null to clear it"
            ),
            got: json_type(other),
        }),
    }
}

/// Whether a field name is a custom field's.
pub fn is_custom(name: &str) -> bool {
    name.starts_with(CUSTOM_PREFIX)
}

/// Checks what a patch may leave valid on its own but not together with the record it
/// changes: at most [`MAX_CUSTOM_FIELDS`] custom fields hold a value.
pub fn check_record(kind: Kind, fields: &Fields) -> Result<(), InputError> {
    let custom = fields.iter().filter(|(n, f)| is_custom(n) && f.value != Value::Null).count();
    if custom > MAX_CUSTOM_FIELDS {
        return Err(InputError::TooManyCustom { kind, count: custom });
    }
    Ok(())
}

/// Checks a whole record as stored or uploaded (not a JSON body): every field known to its
/// kind and of the right type, custom values text, required fields present and not cleared,
/// no NUL character, and at most [`MAX_CUSTOM_FIELDS`] custom fields. The same rules as
/// [`parse_input`] for a new record.
pub fn check_fields(kind: Kind, fields: &Fields) -> Result<(), InputError> {
    for (name, field) in fields {
        check_field(kind, name, &field.value)?;
    }
    for spec in kind.fields().iter().filter(|s| s.required) {
        if fields.get(spec.name).is_none_or(|f| f.value == Value::Null) {
            return Err(InputError::Missing { kind, field: spec.name });
        }
    }
    check_record(kind, fields)
}

fn check_field(kind: Kind, name: &str, value: &Value) -> Result<(), InputError> {
    let wrong = |expected: String| InputError::WrongType {
        kind,
        field: name.to_owned(),
        expected,
        got: json_type(&value.to_json()),
    };
    let nul = match value {
        Value::Str(s) => s.find('\0'),
        Value::List(items) => items.iter().find_map(|s| s.find('\0')),
        _ => None,
    };
    if let Some(at) = nul {
        return Err(InputError::WrongType {
            kind,
            field: name.to_owned(),
            expected: "text without NUL characters (\\u0000)".into(),
            got: format!("a string with one at byte {at}; remove it"),
        });
    }
    if let Some(key) = name.strip_prefix(CUSTOM_PREFIX)
        && kind.field("custom").is_some()
    {
        names::check("custom field name", key)
            .map_err(|source| InputError::BadName { field: name.to_owned(), source })?;
        return match value {
            Value::Null => Ok(()),
            Value::Str(s) if s.len() <= MAX_CUSTOM_VALUE => Ok(()),
            _ => Err(wrong(format!("a string of at most {MAX_CUSTOM_VALUE} bytes (custom fields hold text)"))),
        };
    }
    let Some(spec) = kind.field(name).filter(|spec| spec.ty != FieldType::Custom) else {
        return Err(InputError::UnknownField {
            kind,
            field: name.to_owned(),
            known: kind.fields().iter().map(|f| f.name).collect::<Vec<_>>().join(", "),
        });
    };
    if *value == Value::Null {
        return Ok(());
    }
    match spec.ty.admits(value) {
        Some(Ok(())) => Ok(()),
        Some(Err(source)) => Err(InputError::BadName { field: name.to_owned(), source }),
        None => Err(wrong(spec.ty.describe())),
    }
}

/// A record's fields as a patch that sets each of them.
pub fn as_patch(fields: &Fields) -> Patch {
    fields.iter().map(|(name, f)| (name.clone(), f.value.clone())).collect()
}

/// Reads fields written by an earlier version, which kept all custom fields of a record in one
/// `custom` map with one stamp: each becomes its own `custom.NAME` field with that stamp.
pub fn normalize(fields: &mut Fields) {
    if !fields.contains_key("custom") {
        return;
    }
    if let Some(Field { value, stamp }) = fields.remove("custom")
        && let Value::Map(map) = value
    {
        for (key, text) in map {
            let name = format!("{CUSTOM_PREFIX}{key}");
            if fields.get(&name).is_none_or(|f| f.stamp < stamp) {
                fields.insert(name, Field { value: Value::Str(text), stamp });
            }
        }
    }
}

/// Refuses NUL characters (`\u0000`) in any string of an input: C strings, terminals and
/// many tools end text at the first one, so a value would show and compare as another.
fn refuse_nul(kind: Kind, map: &serde_json::Map<String, serde_json::Value>) -> Result<(), InputError> {
    use serde_json::Value as J;
    let nul_at = |v: &J| match v {
        J::String(s) => s.find('\0'),
        _ => None,
    };
    for (name, v) in map {
        let found = match v {
            J::Array(items) => items.iter().find_map(nul_at).map(|at| (name.clone(), at)),
            J::Object(fields) => fields.iter().find_map(|(k, v)| nul_at(v).map(|at| (format!("{name}.{k}"), at))),
            v => nul_at(v).map(|at| (name.clone(), at)),
        };
        if let Some((field, at)) = found {
            return Err(InputError::WrongType {
                kind,
                field,
                expected: "text without NUL characters (\\u0000)".into(),
                got: format!("a string with one at byte {at}; remove it"),
            });
        }
    }
    Ok(())
}

/// The references a patch sets: (field, kind referred to, id), one for each id of a list.
pub fn refs(kind: Kind, patch: &Patch) -> impl Iterator<Item = (&str, Kind, &str)> {
    patch.iter().flat_map(move |(name, value)| {
        let (to, ids): (Kind, &[String]) = match (kind.field(name).map(|f| f.ty), value) {
            (Some(FieldType::Ref(to)), Value::Str(id)) => (to, std::slice::from_ref(id)),
            (Some(FieldType::Refs(to)), Value::List(ids)) => (to, ids),
            _ => (kind, &[]),
        };
        ids.iter().map(move |id| (name.as_str(), to, id.as_str()))
    })
}

/// Whether a remote's record says it is halted at the main (`enabled` false): it receives
/// nothing, and its uploads wait at the main until it is resumed.
pub fn remote_halted(fields: &Fields) -> bool {
    matches!(fields.get("enabled").map(|f| &f.value), Some(Value::Bool(false)))
}

/// When a remote expired, if the main expired it (its record's `expired_ms`).
pub fn remote_expired(fields: &Fields) -> Option<u64> {
    int(fields, "expired_ms").map(|ms| ms.max(0) as u64)
}

/// How many records of each kind a site holds, as `status` shows them (routed kinds only).
pub fn counts_json(counts: &BTreeMap<Kind, u64>) -> serde_json::Value {
    serde_json::Value::Object(
        counts.iter().filter(|(k, _)| k.is_routed()).map(|(k, n)| (k.as_str().to_owned(), (*n).into())).collect(),
    )
}

/// A record as the API shows it: `id`, `version`, then every field that holds a value.
pub fn to_json(id: &str, version: u64, fields: &Fields) -> serde_json::Value {
    let mut obj = serde_json::Map::with_capacity(fields.len() + 2);
    obj.insert("id".into(), id.into());
    obj.insert("version".into(), version.into());
    let mut custom = serde_json::Map::new();
    for (name, field) in fields {
        if field.value == Value::Null {
            continue;
        }
        match name.strip_prefix(CUSTOM_PREFIX) {
            Some(key) => {
                custom.insert(key.to_owned(), field.value.to_json());
            }
            None => {
                obj.insert(name.clone(), field.value.to_json());
            }
        }
    }
    if !custom.is_empty() {
        obj.insert("custom".into(), serde_json::Value::Object(custom));
    }
    serde_json::Value::Object(obj)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::merge::apply_patch;
    use serde_json::json;

    #[test]
    fn the_storage_identity_of_every_existing_kind_never_changes() {
        // Stored files key records by these codes and tables: changing one silently moves
        // existing data. A new kind gets a new code and table; these lines never change.
        let pinned = [
            (Kind::Contact, 0, "contact"),
            (Kind::Company, 1, "company"),
            (Kind::Group, 2, "group"),
            (Kind::Membership, 3, "membership"),
            (Kind::Note, 4, "note"),
            (Kind::History, 5, "history"),
            (Kind::Activity, 6, "activity"),
            (Kind::User, 7, "user"),
            (Kind::Team, 8, "team"),
            (Kind::Set, 9, "set"),
            (Kind::Remote, 10, "remote"),
        ];
        for (kind, code, table) in pinned {
            assert_eq!((kind.code(), kind.table()), (code, table), "{kind}");
        }
        let codes: std::collections::BTreeSet<u8> = Kind::ALL.iter().map(|k| k.code()).collect();
        let tables: std::collections::BTreeSet<&str> = Kind::ALL.iter().map(|k| k.table()).collect();
        assert_eq!((codes.len(), tables.len()), (Kind::ALL.len(), Kind::ALL.len()), "codes and tables are unique");
    }

    fn record(pairs: &[(&str, Value)]) -> Fields {
        pairs.iter().map(|(n, v)| (n.to_string(), Field { value: v.clone(), stamp: 1 })).collect()
    }

    #[test]
    fn an_uploaded_record_is_checked_by_the_rules_of_a_new_one() {
        let s = |v: &str| Value::Str(v.into());
        let note = |extra: (&str, Value)| record(&[("contact_id", s("c1")), ("text", s("hi")), extra]);
        // (what, fields, the error's start or None when accepted)
        let cases: Vec<(&str, Kind, Fields, Option<&str>)> = vec![
            ("valid", Kind::Note, note(("date", s("2026-11-27"))), None),
            (
                "a required field missing",
                Kind::Note,
                record(&[("text", s("hi"))]),
                Some("field `contact_id` of a note is required"),
            ),
            (
                "a required field cleared",
                Kind::Note,
                note(("contact_id", Value::Null)),
                Some("field `contact_id` of a note is required"),
            ),
            (
                "an unknown field",
                Kind::Contact,
                record(&[("last_name", s("x")), ("nickname", s("x"))]),
                Some("unknown field `nickname`"),
            ),
            (
                "a wrong type",
                Kind::Contact,
                record(&[("last_name", s("x")), ("phone", Value::Int(5))]),
                Some("field `phone` of a contact must be a string"),
            ),
            (
                "a choice outside the list",
                Kind::Contact,
                record(&[("last_name", s("x")), ("access", s("secret"))]),
                Some("field `access`"),
            ),
            ("a malformed reference", Kind::Note, note(("contact_id", s("a.b"))), Some("field `contact_id`")),
            (
                "a NUL character",
                Kind::Contact,
                record(&[("last_name", s("a\0b"))]),
                Some("field `last_name` of a contact must be text without NUL"),
            ),
            ("a custom value", Kind::Contact, record(&[("last_name", s("x")), ("custom.source", s("fair"))]), None),
            (
                "a custom value that is not text",
                Kind::Contact,
                record(&[("last_name", s("x")), ("custom.n", Value::Int(1))]),
                Some("field `custom.n`"),
            ),
            (
                "a bad custom name",
                Kind::Contact,
                record(&[("last_name", s("x")), ("custom.a b", s("v"))]),
                Some("field `custom.a b`"),
            ),
            (
                "the custom map as a field",
                Kind::Contact,
                record(&[("last_name", s("x")), ("custom", Value::Null)]),
                Some("unknown field `custom`"),
            ),
            ("a cleared optional field", Kind::Contact, record(&[("last_name", s("x")), ("city", Value::Null)]), None),
        ];
        for (what, kind, fields, expected) in cases {
            let got = check_fields(kind, &fields).map_err(|e| e.to_string());
            match expected {
                None => assert_eq!(got, Ok(()), "{what}"),
                Some(start) => {
                    let err = got.expect_err(what);
                    assert!(err.starts_with(start), "{what}: {err}");
                }
            }
        }
    }

    #[test]
    fn create_needs_required_fields() {
        let err = parse_input(Kind::Note, &json!({"text": "hi"}), true).unwrap_err();
        assert_eq!(err.to_string(), "field `contact_id` of a note is required");
    }

    #[test]
    fn unknown_and_wrong_typed_fields_are_named() {
        let err = parse_input(Kind::Contact, &json!({"nickname": "x"}), true).unwrap_err();
        assert!(err.to_string().starts_with("unknown field `nickname` for a contact; its fields are: first_name"));
        let err = parse_input(Kind::Contact, &json!({"phone": 5}), true).unwrap_err();
        assert_eq!(
            err.to_string(),
            "field `phone` of a contact must be a string of at most 256 bytes, got the number 5"
        );
        let err = parse_input(Kind::Contact, &json!({"access": "secret"}), true).unwrap_err();
        assert!(err.to_string().contains("one of public, private, limited"));
    }

    #[test]
    fn oversized_values_are_refused() {
        let long = "x".repeat(257);
        let err = parse_input(Kind::Contact, &json!({"city": long}), true).unwrap_err();
        assert!(err.to_string().contains("got a string of 257 bytes"), "{err}");
    }

    #[test]
    fn ids_must_be_tokens() {
        let err = parse_input(Kind::Contact, &json!({"id": "a.b"}), true).unwrap_err();
        assert!(err.to_string().contains("use only"), "{err}");
        let err = parse_input(Kind::Note, &json!({"contact_id": "x>", "text": "t"}), true).unwrap_err();
        assert!(err.to_string().starts_with("field `contact_id`"), "{err}");
    }

    #[test]
    fn nul_characters_are_refused_wherever_they_are() {
        for (body, field) in [
            (json!({"city": "Al\u{0}bany"}), "city"),
            (json!({"custom": {"source": "fa\u{0}ir"}}), "custom.source"),
            (json!({"access_users": ["ann", "bo\u{0}b"]}), "access_users"),
        ] {
            let err = parse_input(Kind::Contact, &body, true).unwrap_err().to_string();
            assert!(err.starts_with(&format!("field `{field}` of a contact must be text without NUL")), "{err}");
            assert!(err.contains("at byte 2; remove it"), "{err}");
        }
        let err = parse_input(Kind::Team, &json!({"name": "\u{0}"}), true).unwrap_err().to_string();
        assert!(err.contains("(\\u0000)"), "{err}");
        assert!(parse_input(Kind::Contact, &json!({"city": "Albany \u{1}"}), true).is_ok(), "only NUL is refused");
    }

    #[test]
    fn dates_and_durations_are_checked() {
        let ok = parse_input(Kind::Note, &json!({"contact_id": "c", "text": "t", "date": "2024-02-29T10:00Z"}), true);
        assert!(ok.is_ok(), "{ok:?}");
        let err = parse_input(Kind::History, &json!({"date": "2025-02-29"}), false).unwrap_err().to_string();
        assert_eq!(
            err,
            "field `date` of a history must be a date YYYY-MM-DD, or a date and time YYYY-MM-DDTHH:MM[:SS[.fff]] \
             with an optional Z or ±HH:MM, got the string \"2025-02-29\""
        );
        let err = parse_input(Kind::Activity, &json!({"due": "next week"}), false).unwrap_err().to_string();
        assert!(err.starts_with("field `due` of a"), "{err}");
        assert!(err.contains("must be a date YYYY-MM-DD"), "{err}");
        let err = parse_input(Kind::History, &json!({"duration_minutes": -5}), false).unwrap_err().to_string();
        assert_eq!(err, "field `duration_minutes` of a history must be a whole number, 0 or more, got the number -5");
        assert!(parse_input(Kind::History, &json!({"duration_minutes": 0}), false).is_ok());
    }

    #[test]
    fn lists_of_users_and_teams_are_references() {
        let body = json!({"manager": "boss", "access_users": ["ann", "bob"], "access_teams": ["east"]});
        let input = parse_input(Kind::Contact, &body, true).unwrap();
        let found: Vec<_> = refs(Kind::Contact, &input.patch).collect();
        assert_eq!(
            found,
            [
                ("access_teams", Kind::Team, "east"),
                ("access_users", Kind::User, "ann"),
                ("access_users", Kind::User, "bob"),
                ("manager", Kind::User, "boss"),
            ]
        );
        let input = parse_input(Kind::User, &json!({"name": "Ann", "teams": ["east"]}), true).unwrap();
        assert_eq!(refs(Kind::User, &input.patch).collect::<Vec<_>>(), [("teams", Kind::Team, "east")]);
    }

    #[test]
    fn patch_stamps_only_changed_fields() {
        let mut fields = Fields::new();
        let input = parse_input(Kind::Contact, &json!({"city": "Albany", "state": "NY"}), true).unwrap();
        assert!(apply_patch(&mut fields, &input.patch, 10));
        let input = parse_input(Kind::Contact, &json!({"city": "Albany", "state": "CT"}), false).unwrap();
        assert!(apply_patch(&mut fields, &input.patch, 20));
        assert_eq!(fields["city"].stamp, 10);
        assert_eq!(fields["state"].stamp, 20);
        assert!(!apply_patch(&mut fields, &input.patch, 30));
    }

    #[test]
    fn values_round_trip_through_messagepack() {
        let mut fields = Fields::new();
        for (i, v) in [
            Value::Null,
            Value::Bool(true),
            Value::Int(-5),
            Value::Str("x".into()),
            Value::List(vec!["a".into()]),
            Value::Map([("k".to_string(), "v".to_string())].into()),
        ]
        .into_iter()
        .enumerate()
        {
            fields.insert(format!("f{i}"), Field { value: v, stamp: i as u64 });
        }
        let bytes = rmp_serde::to_vec_named(&fields).unwrap();
        let back: Fields = rmp_serde::from_slice(&bytes).unwrap();
        assert_eq!(back, fields);
    }

    #[test]
    fn each_custom_field_is_a_field_of_its_own() {
        let mut fields = Fields::new();
        let input = parse_input(Kind::Contact, &json!({"custom": {"a": "1", "b": "1"}}), true).unwrap();
        assert!(apply_patch(&mut fields, &input.patch, 10));
        // Changing one custom field leaves the others, and stamps only the one changed.
        let input = parse_input(Kind::Contact, &json!({"custom": {"a": "2"}}), false).unwrap();
        assert!(apply_patch(&mut fields, &input.patch, 20));
        assert_eq!(to_json("c", 1, &fields)["custom"], json!({"a": "2", "b": "1"}));
        assert_eq!((fields["custom.a"].stamp, fields["custom.b"].stamp), (20, 10));
        // null clears one; "custom": null clears them all.
        let input = parse_input(Kind::Contact, &json!({"custom": {"b": null}}), false).unwrap();
        assert!(apply_patch(&mut fields, &input.patch, 30));
        assert_eq!(to_json("c", 1, &fields)["custom"], json!({"a": "2"}));
        let input = parse_input(Kind::Contact, &json!({"custom": null}), false).unwrap();
        assert!(apply_patch(&mut fields, &input.patch, 40));
        assert_eq!(to_json("c", 1, &fields).get("custom"), None);
        assert_eq!(fields["custom.a"], Field { value: Value::Null, stamp: 40 });
    }

    #[test]
    fn custom_fields_are_checked_one_by_one_and_counted() {
        let err = parse_input(Kind::Contact, &json!({"custom": {"a.b": "x"}}), false).unwrap_err();
        assert!(err.to_string().starts_with("field `custom.a.b`"), "{err}");
        let err = parse_input(Kind::Contact, &json!({"custom": {"a": 5}}), false).unwrap_err();
        assert!(err.to_string().contains("a string of at most 1024 bytes (custom fields hold text), or null"), "{err}");
        let many: serde_json::Map<String, serde_json::Value> =
            (0..MAX_CUSTOM_FIELDS).map(|i| (format!("k{i}"), json!("v"))).collect();
        let mut fields = Fields::new();
        let input = parse_input(Kind::Contact, &json!({ "custom": many }), true).unwrap();
        apply_patch(&mut fields, &input.patch, 1);
        assert!(check_record(Kind::Contact, &fields).is_ok());
        let input = parse_input(Kind::Contact, &json!({"custom": {"one_more": "v"}}), false).unwrap();
        apply_patch(&mut fields, &input.patch, 2);
        let err = check_record(Kind::Contact, &fields).unwrap_err();
        assert!(err.to_string().contains("at most 100 custom fields; this change would leave 101"), "{err}");
        // Notes have no custom fields.
        assert!(parse_input(Kind::Note, &json!({"custom.a": "x"}), false).is_err());
    }

    fn rec(pairs: &[(&str, &str, u64)]) -> Fields {
        pairs.iter().map(|(k, v, st)| (k.to_string(), Field { value: Value::Str(v.to_string()), stamp: *st })).collect()
    }

    #[test]
    fn a_custom_map_written_by_an_earlier_version_reads_as_fields() {
        let mut fields: Fields = [
            ("custom".to_string(), Field { value: Value::Map([("a".into(), "1".into())].into()), stamp: 5 }),
            ("city".to_string(), Field { value: Value::Str("Troy".into()), stamp: 5 }),
        ]
        .into();
        normalize(&mut fields);
        assert_eq!(fields, rec(&[("custom.a", "1", 5), ("city", "Troy", 5)]));
    }
}
