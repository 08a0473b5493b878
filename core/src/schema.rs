//! The wire contract as JSON Schema, generated from the same field tables the code validates
//! with, so the documents in `schemas/` cannot drift from what is sent (a test compares them
//! and checks real messages against them).
//!
//! MessagePack maps are described as JSON objects: a client decodes a message with any
//! MessagePack library and validates the result as JSON.

use serde_json::{Value as J, json};

use crate::model::{FieldType, Kind, MAX_CUSTOM_FIELDS, MAX_CUSTOM_VALUE, MAX_NAMES};
use crate::names::MAX_NAME_LEN;
use crate::wire::{PRODUCT, SCHEMA_MAJOR};

const DRAFT: &str = "https://json-schema.org/draft/2020-12/schema";

fn token() -> J {
    json!({ "type": "string", "pattern": format!("^[A-Za-z0-9_-]{{1,{MAX_NAME_LEN}}}$") })
}

fn value_schema(ty: FieldType) -> J {
    match ty {
        FieldType::Text(max) => json!({ "type": "string", "maxLength": max }),
        FieldType::Choice(options) => json!({ "enum": options }),
        FieldType::Ref(kind) => {
            let mut t = token();
            t["description"] = format!("the id of {}", kind.a()).into();
            t
        }
        FieldType::Names => json!({ "type": "array", "items": token(), "maxItems": MAX_NAMES }),
        FieldType::Refs(kind) => json!({
            "type": "array",
            "items": token(),
            "maxItems": MAX_NAMES,
            "description": format!("ids of {kind}s"),
        }),
        FieldType::Bool => json!({ "type": "boolean" }),
        FieldType::Int => json!({ "type": "integer" }),
        FieldType::Count => json!({ "type": "integer", "minimum": 0 }),
        FieldType::Date => json!({
            "type": "string",
            "pattern": crate::date::PATTERN,
            "description": format!("{}; on a real calendar day", crate::date::FORMS),
        }),
        FieldType::Custom => json!({
            "type": "object",
            "maxProperties": MAX_CUSTOM_FIELDS,
            "propertyNames": token(),
            "additionalProperties": { "type": "string", "maxLength": MAX_CUSTOM_VALUE },
        }),
    }
}

/// A record's fields as they travel: each field `[value, stamp]`, the value `null` when the
/// field was cleared, the stamp a hybrid logical clock (milliseconds << 16 | counter).
pub fn record_schema(kind: Kind) -> J {
    let field = |value: J| {
        json!({
            "type": "array",
            "prefixItems": [
                { "anyOf": [{ "type": "null" }, value] },
                { "type": "integer", "minimum": 0, "description": "HLC stamp of the change that set the field" },
            ],
            "minItems": 2,
            "maxItems": 2,
        })
    };
    let properties: serde_json::Map<String, J> =
        kind.fields().iter().map(|f| (f.name.to_owned(), field(value_schema(f.ty)))).collect();
    let required: Vec<&str> = kind.fields().iter().filter(|f| f.required).map(|f| f.name).collect();
    let mut pattern = serde_json::Map::new();
    if kind.field("custom").is_some() {
        let mut custom = field(json!({ "type": "string", "maxLength": MAX_CUSTOM_VALUE }));
        custom["description"] = format!(
            "one custom field, with its own stamp; at most {MAX_CUSTOM_FIELDS} hold a value. (`custom`, one map of them \
             all with one stamp, is how earlier versions wrote them; readers take each of its keys as `custom.NAME`.)"
        )
        .into();
        pattern.insert(format!("^custom\\.[A-Za-z0-9_-]{{1,{MAX_NAME_LEN}}}$"), custom);
    }
    json!({
        "$schema": DRAFT,
        "$id": format!("urn:crmsync:schema:{SCHEMA_MAJOR}:{kind}"),
        "title": format!("crmsync {kind} record"),
        "description": format!(
            "The fields of {} in the `record` of an envelope. Each field is [value, stamp]; a value of null is a cleared field.",
            kind.a()
        ),
        "type": "object",
        "properties": properties,
        "patternProperties": pattern,
        "required": required,
        "additionalProperties": false,
    })
}

/// The envelope every message on `CRM_EVENTS`, `CRM_SYNC` and `CRM_UP` carries. On `CRM_UP` the
/// record is the remote's whole copy of it, each field with its stamp: the main keeps, field by
/// field, whichever stamp is newer.
pub fn envelope_schema() -> J {
    let kinds: Vec<&str> = Kind::ALL.iter().map(|k| k.as_str()).collect();
    let mut defs = serde_json::Map::new();
    let mut rules = Vec::new();
    for kind in Kind::ALL {
        let mut schema = record_schema(kind);
        let obj = schema.as_object_mut().expect("an object");
        obj.remove("$schema");
        obj.remove("$id");
        defs.insert(kind.as_str().to_owned(), schema);
        rules.push(json!({
            "if": { "properties": { "kind": { "const": kind.as_str() } } },
            "then": { "properties": { "record": { "$ref": format!("#/$defs/{kind}") } } },
        }));
    }
    json!({
        "$schema": DRAFT,
        "$id": format!("urn:crmsync:schema:{SCHEMA_MAJOR}:envelope"),
        "title": "crmsync message envelope",
        "description": "Every message is one MessagePack map of this shape. A reader refuses a message whose product, schema or db is not its own.",
        "type": "object",
        "properties": with_header(json!({
            "event": { "type": "string", "description": "unique id of the change (a ULID)" },
            "kind": { "enum": kinds },
            "id": token(),
            "op": { "enum": ["upsert", "delete", "leave", "reject"] },
            "version": {
                "type": "integer",
                "minimum": 0,
                "description": "CRM_SYNC: the CRM_EVENTS sequence of the change that caused the message (newer wins). CRM_EVENTS: the record's version the change was made against (0 for a new record)."
            },
            "origin": { "type": "string", "description": "`main`, or the name of the remote where the change was made" },
            "record": { "type": "object", "description": "the record's fields; present for upsert (for reject: the refused edit), absent for delete and leave" },
            "reason": { "type": "string", "description": "reject: why the main refused the edit" },
        })),
        "required": ["product", "schema", "db", "event", "kind", "id", "op", "version", "origin"],
        "additionalProperties": false,
        "allOf": rules,
        "$defs": defs,
    })
}

/// `properties` with the header every message carries: whose it is (a reader refuses a message
/// whose product, schema or db is not its own).
fn with_header(mut properties: J) -> J {
    let header = json!({
        "product": { "const": PRODUCT },
        "schema": { "const": SCHEMA_MAJOR, "description": "schema major version" },
        "db": { "type": "string", "description": "database id of the main (a ULID)" },
    });
    if let (Some(out), J::Object(header)) = (properties.as_object_mut(), header) {
        out.extend(header);
    }
    properties
}

/// A remote's report of one sync session, on `crm.up.<remote>.session.report`.
pub fn session_schema() -> J {
    let count = |what: &str| json!({ "type": "integer", "minimum": 0, "description": what });
    json!({
        "$schema": DRAFT,
        "$id": format!("urn:crmsync:schema:{SCHEMA_MAJOR}:session"),
        "title": "crmsync sync session report",
        "description": "One MessagePack map per sync session a remote completed. The main logs it under the remote (if it moved anything) and counts it as the remote's last sync. Its id is the message's Nats-Msg-Id.",
        "type": "object",
        "properties": with_header(json!({
            "remote": token(),
            "id": { "type": "string", "description": "unique id of the report (a ULID)" },
            "started_ms": count("when the session started, in milliseconds since the Unix epoch (the remote's clock)"),
            "ended_ms": count("when it ended: the remote had nothing left to pull or to upload"),
            "received": count("records written or removed at the remote from what the main sent"),
            "sent": count("edits made at the remote that reached CRM_UP"),
            "refused": count("edits of the remote the main refused"),
            "conflicts": count("changes from the main that met an edit made at the remote not merged yet"),
            "mode": { "type": "string", "description": "continuous, once, or the remote's schedule (hourly, daily@HH:MM, weekly@DAY@HH:MM)" },
        })),
        "required": ["product", "schema", "db", "remote", "id", "started_ms", "ended_ms", "received", "sent", "refused", "conflicts", "mode"],
        "additionalProperties": false,
    })
}

/// Every schema document, by file name under `schemas/`.
pub fn documents() -> Vec<(String, J)> {
    let mut out = vec![
        ("envelope.schema.json".to_owned(), envelope_schema()),
        ("session.schema.json".to_owned(), session_schema()),
    ];
    for kind in Kind::ALL {
        out.push((format!("records/{kind}.schema.json"), record_schema(kind)));
    }
    out
}
