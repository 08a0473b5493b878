//! The command line's `FIELD=VALUE` assignments, turned into the JSON body of a record.
//!
//! `crmsync contact add last_name=Doe state=NY access_users=ann,bob custom.source=web` writes
//! what the API takes as `{"last_name": "Doe", "state": "NY", "access_users": ["ann", "bob"],
//! "custom": {"source": "web"}}`. The value of each field is typed by the kind's field table:
//! lists are split at commas, booleans and integers are read as such when they are one (and
//! left as text otherwise, for the API to refuse with the field's rule). `FIELD=` clears a
//! field and `custom.NAME=` one custom field. The body is not checked here: the API checks it
//! ([`crate::model::parse_input`]), the one place that knows every rule.
//!
//! Architecture invariant: this module does no IO.

use serde_json::{Map, Value as J};

use crate::model::{CUSTOM_PREFIX, FieldType, Kind};

/// Turns `FIELD=VALUE` pairs into a JSON body for a record of `kind`, on top of `base` (the
/// text of a JSON object, `--from-json`) when given: a pair replaces the base's field, and a
/// `custom.NAME` pair the base's custom field of that name (when the base's `custom` is not an
/// object, `"custom": null` say, it stays as it is and `custom.NAME` pairs are dropped). The
/// error is a usage message.
pub fn parse_assignments(kind: Kind, pairs: &[String], base: Option<&str>) -> Result<J, String> {
    let mut body = match base {
        Some(text) => match serde_json::from_str::<J>(text) {
            Ok(J::Object(m)) => m,
            Ok(_) => return Err("--from-json must be a JSON object".into()),
            Err(e) => return Err(format!("--from-json is not valid JSON: {e}")),
        },
        None => Map::new(),
    };
    for pair in pairs {
        let Some((name, value)) = pair.split_once('=') else {
            return Err(format!("{pair:?} is not FIELD=VALUE; the fields of {} are {}", kind.a(), field_names(kind)));
        };
        if let Some(custom) = name.strip_prefix(CUSTOM_PREFIX) {
            let map = body.entry("custom").or_insert_with(|| J::Object(Map::new()));
            if let J::Object(m) = map {
                // `custom.NAME=` clears that custom field alone.
                let value = if value.is_empty() { J::Null } else { J::String(value.to_owned()) };
                m.insert(custom.to_owned(), value);
            }
            continue;
        }
        body.insert(name.to_owned(), typed(kind, name, value));
    }
    Ok(J::Object(body))
}

/// The JSON value of `name=value`, by the type of the kind's field: `null` for an empty value.
fn typed(kind: Kind, name: &str, value: &str) -> J {
    if value.is_empty() {
        return J::Null;
    }
    match kind.field(name).map(|f| f.ty) {
        Some(FieldType::Names | FieldType::Refs(_)) => {
            J::Array(value.split(',').map(|s| J::String(s.trim().to_owned())).collect())
        }
        Some(FieldType::Bool) => value.parse::<bool>().map(J::Bool).unwrap_or_else(|_| J::String(value.to_owned())),
        Some(FieldType::Int | FieldType::Count) => {
            value.parse::<i64>().map(J::from).unwrap_or_else(|_| J::String(value.to_owned()))
        }
        _ => J::String(value.to_owned()),
    }
}

fn field_names(kind: Kind) -> String {
    kind.fields().iter().map(|f| f.name).collect::<Vec<_>>().join(", ")
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::model::parse_input;

    fn parse(kind: Kind, pairs: &[&str], base: Option<&str>) -> Result<J, String> {
        let pairs: Vec<String> = pairs.iter().map(|p| p.to_string()).collect();
        parse_assignments(kind, &pairs, base)
    }

    #[test]
    fn values_are_typed_by_the_kinds_fields() {
        let body = parse(
            Kind::Contact,
            &["last_name=Doe", "state=NY", "access_users=ann, bob", "custom.source=web", "zip=01234"],
            None,
        )
        .unwrap();
        assert_eq!(
            body,
            json!({
                "last_name": "Doe",
                "state": "NY",
                "access_users": ["ann", "bob"],
                "custom": {"source": "web"},
                "zip": "01234",
            })
        );
        assert!(parse_input(Kind::Contact, &body, true).is_ok());
        let body = parse(Kind::Activity, &["contact_id=c1", "done=true"], None).unwrap();
        assert_eq!(body, json!({"contact_id": "c1", "done": true}));
        let body = parse(Kind::History, &["duration_minutes=-5", "type=call"], None).unwrap();
        assert_eq!(body, json!({"duration_minutes": -5, "type": "call"}));
        // Only the value's first `=` separates: the rest is the value's.
        assert_eq!(parse(Kind::Note, &["text=a=b"], None).unwrap(), json!({"text": "a=b"}));
    }

    #[test]
    fn what_is_not_of_the_fields_type_is_left_as_text_for_the_api_to_refuse() {
        let body = parse(Kind::Activity, &["done=yes"], None).unwrap();
        assert_eq!(body, json!({"done": "yes"}));
        let err = parse_input(Kind::Activity, &body, false).unwrap_err().to_string();
        assert!(err.starts_with("field `done` of an activity must be true or false"), "{err}");
        let body = parse(Kind::History, &["duration_minutes=99999999999999999999"], None).unwrap();
        assert_eq!(body, json!({"duration_minutes": "99999999999999999999"}));
        // An unknown field is passed on as text too: the API names the known ones.
        assert_eq!(parse(Kind::Team, &["colour=red"], None).unwrap(), json!({"colour": "red"}));
    }

    #[test]
    fn an_empty_value_clears_a_field_and_a_custom_field_alone() {
        let body = parse(Kind::Contact, &["city=", "custom.a=", "custom.b=2"], None).unwrap();
        assert_eq!(body, json!({"city": null, "custom": {"a": null, "b": "2"}}));
    }

    #[test]
    fn pairs_go_on_top_of_the_base() {
        let base = r#"{"last_name": "Doe", "city": "Troy", "custom": {"a": "1", "b": "1"}}"#;
        let body = parse(Kind::Contact, &["city=Albany", "custom.b=2"], Some(base)).unwrap();
        assert_eq!(body, json!({"last_name": "Doe", "city": "Albany", "custom": {"a": "1", "b": "2"}}));
        assert_eq!(parse(Kind::Contact, &[], Some("{}")).unwrap(), json!({}));
        assert_eq!(parse(Kind::Contact, &[], None).unwrap(), json!({}));
    }

    #[test]
    fn errors_say_what_is_wrong() {
        assert_eq!(parse(Kind::Contact, &[], Some("[1]")).unwrap_err(), "--from-json must be a JSON object");
        let err = parse(Kind::Contact, &[], Some("{")).unwrap_err();
        assert!(err.starts_with("--from-json is not valid JSON: EOF while parsing"), "{err}");
        assert_eq!(
            parse(Kind::Team, &["name=East", "East"], None).unwrap_err(),
            "\"East\" is not FIELD=VALUE; the fields of a team are name, description"
        );
    }
}
