//! The decoders and parsers that read what comes from outside, in the ordinary test suite: the
//! wire decoders (bytes off the streams), the set query parser, the command line's
//! `FIELD=VALUE` pairs and the APIs' JSON bodies. Property tests feed them arbitrary input,
//! which they must read or refuse without panicking; the fuzz targets in `fuzz/` (run by
//! `ops/fuzz`) do the same for minutes on end, from the seeds written here.
//!
//! The seeds of `fuzz/corpus/` are the ones [`seeds`] makes: `CRMSYNC_BLESS=1` rewrites them
//! after a deliberate change (of the wire format, say), as it does `schemas/`.

use std::collections::BTreeMap;

use proptest::prelude::*;
use serde_json::{Value as J, json};

use crate::assign::parse_assignments;
use crate::merge::apply_patch;
use crate::model::{Field, Fields, InputError, Kind, Value, check_fields, parse_input};
use crate::query::{MAX_QUERY_LEN, Query};
use crate::wire::{Decoded, Envelope, ORIGIN_MAIN, Op, PRODUCT, SCHEMA_MAJOR, SessionReport, decode_checked};

/// The database of the decode seeds, and the remote of their reports (as in the fuzz target).
const DB: &str = "db1";
const REMOTE: &str = "r1";

// ---------------------------------------------------------------------------------------------
// What each fuzz target checks, shared with the property tests
// ---------------------------------------------------------------------------------------------

/// Decodes bytes as a message and as a session report, and does what the services do next.
fn decode_anything(bytes: &[u8]) -> Result<(), TestCaseError> {
    if let Decoded::Ok(env) = decode_checked(bytes, DB) {
        if let Some(record) = &env.record {
            let _ = check_fields(env.kind, record);
        }
        let again = decode_checked(&env.encode(), DB);
        prop_assert!(matches!(&again, Decoded::Ok(back) if *back == env), "{:?} came back as {:?}", env, again);
    }
    if let Ok(report) = SessionReport::decode_checked(bytes, DB, REMOTE) {
        let _ = report.is_empty();
        prop_assert_eq!(SessionReport::decode_checked(&report.encode(), DB, REMOTE), Ok(report));
    }
    Ok(())
}

/// Parses a query; one that parses prints a canonical form that parses back to the same.
fn parse_query(text: &str) -> Result<(), TestCaseError> {
    match Query::parse(text) {
        Ok(query) => {
            let printed = query.to_string();
            if printed.len() <= MAX_QUERY_LEN {
                let again = Query::parse(&printed).map_err(|e| TestCaseError::fail(format!("{printed:?}: {e}")))?;
                prop_assert_eq!(again.to_string(), printed);
            }
        }
        Err(error) => prop_assert!(error.position >= 1 && error.position <= text.chars().count() + 1, "{}", error),
    }
    Ok(())
}

/// Turns pairs into a body, which the API's parser reads, and into a list's filters.
fn assign(kind: Kind, pairs: &[String], base: Option<&str>) -> Result<(), TestCaseError> {
    if let Ok(body) = parse_assignments(kind, pairs, base) {
        let object = body.as_object().ok_or_else(|| TestCaseError::fail(format!("{body} is not an object")))?;
        for (name, _) in pairs.iter().filter_map(|pair| pair.split_once('=')) {
            prop_assert!(name.starts_with("custom.") || object.contains_key(name), "{:?} is not in {}", name, body);
        }
        for creating in [true, false] {
            let _ = parse_input(kind, &body, creating);
        }
    }
    let filters: Vec<(String, String)> =
        pairs.iter().filter_map(|pair| pair.split_once('=')).map(|(n, v)| (n.to_owned(), v.to_owned())).collect();
    if let Ok(Some(query)) = Query::equals_all(kind, &filters) {
        let _ = query.matches(&Fields::new());
    }
    Ok(())
}

/// Reads a body; one accepted for a new record makes a record that passes `check_fields`.
fn read_body(kind: Kind, body: &J) -> Result<(), TestCaseError> {
    let _ = parse_input(kind, body, false);
    if let Ok(input) = parse_input(kind, body, true) {
        let mut fields = Fields::new();
        apply_patch(&mut fields, &input.patch, 1);
        let checked = check_fields(kind, &fields);
        prop_assert!(matches!(checked, Ok(()) | Err(InputError::TooManyCustom { .. })), "{}: {:?}", body, checked);
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Strategies
// ---------------------------------------------------------------------------------------------

fn kinds() -> impl Strategy<Value = Kind> {
    prop::sample::select(Kind::ALL.to_vec())
}

/// Every field name of every kind, and a few that are none.
fn field_names() -> impl Strategy<Value = String> {
    let mut known: Vec<&str> = Kind::ALL.iter().flat_map(|k| k.fields().iter().map(|f| f.name)).collect();
    known.sort_unstable();
    known.dedup();
    known.extend(["id", "version", "custom.source", "custom.", "custom.a b"]);
    prop_oneof![3 => prop::sample::select(known).prop_map(str::to_owned), 1 => "\\PC{0,8}"]
}

fn texts() -> impl Strategy<Value = String> {
    prop_oneof![
        prop::sample::select(vec!["", "NY", "c1", "true", "-5", "2024-02-29", "2025-02-29T10:00Z", "a,b, c", "a\0b"])
            .prop_map(str::to_owned),
        "\\PC{0,12}",
        "[a-z]{300}",
    ]
}

fn values() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::Int),
        texts().prop_map(Value::Str),
        prop::collection::vec(texts(), 0..3).prop_map(Value::List),
        prop::collection::btree_map(texts(), texts(), 0..3).prop_map(Value::Map),
    ]
}

fn records() -> impl Strategy<Value = Fields> {
    prop::collection::btree_map(field_names(), (values(), any::<u64>()), 0..5)
        .prop_map(|fields| fields.into_iter().map(|(name, (value, stamp))| (name, Field { value, stamp })).collect())
}

fn envelopes() -> impl Strategy<Value = Envelope> {
    let ops = prop::sample::select(vec![Op::Upsert, Op::Delete, Op::Leave, Op::Reject]);
    let dbs = prop::sample::select(vec![DB, "db2"]);
    (kinds(), ops, prop::option::of(records()), any::<u64>(), dbs, "[a-z0-9]{0,8}", prop::option::of(texts())).prop_map(
        |(kind, op, record, version, db, id, reason)| Envelope {
            product: PRODUCT.into(),
            schema: SCHEMA_MAJOR,
            db: db.into(),
            event: "01J".into(),
            kind,
            id,
            op,
            version,
            origin: REMOTE.into(),
            record,
            reason,
        },
    )
}

/// A counter of a session report: small, or anything up to `u64::MAX`.
fn counts() -> impl Strategy<Value = u64> {
    prop_oneof![0..3u64, any::<u64>()]
}

fn reports() -> impl Strategy<Value = SessionReport> {
    (counts(), counts(), counts(), counts(), any::<u64>()).prop_map(|(received, sent, refused, conflicts, ms)| {
        SessionReport { received, sent, refused, conflicts, started_ms: ms, ended_ms: ms, ..seed_report() }
    })
}

/// Encoded bytes, some replaced and the end maybe cut off.
fn damage(bytes: &[u8], changes: &[(prop::sample::Index, u8)], cut: Option<prop::sample::Index>) -> Vec<u8> {
    let mut bytes = bytes.to_vec();
    for (at, byte) in changes {
        let at = at.index(bytes.len());
        bytes[at] = *byte;
    }
    if let Some(cut) = cut {
        bytes.truncate(cut.index(bytes.len()));
    }
    bytes
}

/// Any JSON: a small tree of every kind of value.
fn json_values() -> impl Strategy<Value = J> {
    let leaf = prop_oneof![
        Just(J::Null),
        any::<bool>().prop_map(J::Bool),
        any::<i64>().prop_map(J::from),
        any::<u64>().prop_map(J::from),
        any::<f64>().prop_map(|f| serde_json::Number::from_f64(f).map_or(J::Null, J::Number)),
        texts().prop_map(J::String),
    ];
    leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(J::Array),
            prop::collection::btree_map(field_names(), inner, 0..4).prop_map(|m| J::Object(m.into_iter().collect())),
        ]
    })
}

/// A body: mostly an object of field names, else any JSON.
fn bodies() -> impl Strategy<Value = J> {
    let objects = prop::collection::btree_map(field_names(), json_values(), 0..6)
        .prop_map(|m| J::Object(m.into_iter().collect()));
    prop_oneof![3 => objects, 1 => json_values()]
}

fn pairs() -> impl Strategy<Value = Vec<String>> {
    let pair = prop_oneof![
        4 => (field_names(), texts()).prop_map(|(name, value)| format!("{name}={value}")),
        1 => "\\PC{0,10}",
    ];
    prop::collection::vec(pair, 0..6)
}

fn bases() -> impl Strategy<Value = Option<String>> {
    prop::option::of(prop_oneof![bodies().prop_map(|body| body.to_string()), "\\PC{0,20}"])
}

proptest! {
    #[test]
    fn any_bytes_decode_or_are_refused(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        decode_anything(&bytes)?;
    }

    #[test]
    fn damaged_envelopes_decode_or_are_refused(
        env in envelopes(),
        changes in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..4),
        cut in prop::option::of(any::<prop::sample::Index>()),
    ) {
        decode_anything(&env.encode())?;
        decode_anything(&damage(&env.encode(), &changes, cut))?;
    }

    #[test]
    fn any_report_decodes_and_says_whether_it_moved_anything(
        report in reports(),
        changes in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..3),
    ) {
        let decoded = SessionReport::decode_checked(&report.encode(), DB, REMOTE);
        prop_assert_eq!(decoded.as_ref(), Ok(&report));
        let moved = [report.received, report.sent, report.refused, report.conflicts].iter().any(|n| *n > 0);
        prop_assert_eq!(report.is_empty(), !moved);
        decode_anything(&damage(&report.encode(), &changes, None))?;
    }

    #[test]
    fn any_text_parses_as_a_query_or_is_refused(text in prop_oneof!["\\PC{0,60}", "[a-z =()'\",.!<>-]{0,60}"]) {
        parse_query(&text)?;
    }

    #[test]
    fn any_pairs_make_a_body_or_a_usage_error(kind in kinds(), pairs in pairs(), base in bases()) {
        assign(kind, &pairs, base.as_deref())?;
    }

    #[test]
    fn any_json_body_is_read_or_refused(kind in kinds(), body in bodies()) {
        read_body(kind, &body)?;
    }
}

// ---------------------------------------------------------------------------------------------
// The seeds of the fuzz targets
// ---------------------------------------------------------------------------------------------

fn seed_report() -> SessionReport {
    SessionReport {
        product: PRODUCT.into(),
        schema: SCHEMA_MAJOR,
        db: DB.into(),
        remote: REMOTE.into(),
        id: "01JD6Z3V9Q8K4N2M7P5R1T0W3X".into(),
        started_ms: 1_767_225_600_000,
        ended_ms: 1_767_225_603_250,
        received: 12,
        sent: 3,
        refused: 1,
        conflicts: 1,
        mode: "continuous".into(),
    }
}

fn seed_envelope(kind: Kind, id: &str, op: Op, record: Option<Fields>) -> Envelope {
    Envelope {
        product: PRODUCT.into(),
        schema: SCHEMA_MAJOR,
        db: DB.into(),
        event: "01JD6Z3V9Q8K4N2M7P5R1T0W3Y".into(),
        kind,
        id: id.into(),
        op,
        version: 42,
        origin: ORIGIN_MAIN.into(),
        record,
        reason: None,
    }
}

fn fields(pairs: &[(&str, Value)]) -> Fields {
    pairs
        .iter()
        .enumerate()
        .map(|(i, (name, value))| (name.to_string(), Field { value: value.clone(), stamp: 7 + i as u64 }))
        .collect()
}

fn s(text: &str) -> Value {
    Value::Str(text.into())
}

/// Every seed: the fuzz target, the file name, and its bytes.
fn seeds() -> Vec<(&'static str, &'static str, Vec<u8>)> {
    let contact = fields(&[
        ("first_name", s("Jane")),
        ("last_name", s("O'Brien")),
        ("state", s("NY")),
        ("city", s("Albany")),
        ("access", s("limited")),
        ("access_users", Value::List(vec!["jdoe".into(), "ann".into()])),
        ("custom.source", s("trade fair")),
        ("phone", Value::Null),
    ]);
    let note = fields(&[("contact_id", s("c1")), ("text", s("Called about the renewal.")), ("date", s("2026-11-27"))]);
    let activity = fields(&[("contact_id", s("c1")), ("due", s("2026-12-01T09:30Z")), ("done", Value::Bool(false))]);
    let history = fields(&[("contact_id", s("c1")), ("type", s("call")), ("duration_minutes", Value::Int(15))]);
    let legacy = fields(&[
        ("last_name", s("Doe")),
        ("custom", Value::Map(BTreeMap::from([("source".into(), "web".into()), ("tier".into(), "gold".into())]))),
    ]);
    let reject = Envelope {
        origin: REMOTE.into(),
        reason: Some("field `access` of a contact must be one of public, private, limited".into()),
        ..seed_envelope(Kind::Contact, "c1", Op::Reject, Some(fields(&[("access", s("secret"))])))
    };
    #[derive(serde::Serialize)]
    struct Future {
        product: &'static str,
        schema: u32,
        db: &'static str,
        body: Vec<u8>,
    }
    let future = rmp_serde::to_vec_named(&Future { product: PRODUCT, schema: 9, db: DB, body: vec![1, 2] }).unwrap();
    let other =
        rmp_serde::to_vec_named(&Future { product: "other", schema: SCHEMA_MAJOR, db: DB, body: vec![] }).unwrap();
    let decode: Vec<(&str, Vec<u8>)> = vec![
        ("envelope-upsert-contact.msgpack", seed_envelope(Kind::Contact, "c1", Op::Upsert, Some(contact)).encode()),
        ("envelope-upsert-note.msgpack", seed_envelope(Kind::Note, "n1", Op::Upsert, Some(note)).encode()),
        ("envelope-upsert-activity.msgpack", seed_envelope(Kind::Activity, "a1", Op::Upsert, Some(activity)).encode()),
        ("envelope-upsert-history.msgpack", seed_envelope(Kind::History, "h1", Op::Upsert, Some(history)).encode()),
        ("envelope-legacy-custom-map.msgpack", seed_envelope(Kind::Contact, "c2", Op::Upsert, Some(legacy)).encode()),
        ("envelope-delete.msgpack", seed_envelope(Kind::Contact, "c1", Op::Delete, None).encode()),
        ("envelope-leave.msgpack", seed_envelope(Kind::Note, "n1", Op::Leave, None).encode()),
        ("envelope-reject.msgpack", reject.encode()),
        (
            "foreign-database.msgpack",
            Envelope { db: "db2".into(), ..seed_envelope(Kind::Team, "t1", Op::Delete, None) }.encode(),
        ),
        ("foreign-schema.msgpack", future),
        ("foreign-product.msgpack", other),
        ("report.msgpack", seed_report().encode()),
        // Counters that sum past `u64::MAX`: `is_empty` overflowed on them (see wire.rs).
        ("report-overflowing.msgpack", SessionReport { received: u64::MAX, ..seed_report() }.encode()),
        // Counters past 2^32, encoded as 64-bit integers: a remote that synced a lot at once.
        (
            "report-busy.msgpack",
            SessionReport {
                received: 1 << 40,
                sent: 1 << 33,
                refused: 1 << 32,
                conflicts: 5_000_000_000,
                ..seed_report()
            }
            .encode(),
        ),
        (
            "report-empty.msgpack",
            SessionReport {
                received: 0,
                sent: 0,
                refused: 0,
                conflicts: 0,
                mode: "daily@02:00".into(),
                ..seed_report()
            }
            .encode(),
        ),
        ("garbage.bin", b"\xc1garbage".to_vec()),
    ];
    let query = [
        ("readme-1.txt", "state = NY"),
        ("readme-2.txt", "state = NY and city = Albany"),
        ("readme-3.txt", "state in (NY, NJ, CT) and not city = 'New York'"),
        ("readme-4.txt", "last_name starts with 'O''Br' and email is not empty"),
        ("readme-5.txt", "custom.source = web or custom.source = \"trade fair\""),
        ("doc-1.txt", "access_users contains jdoe"),
        ("doc-2.txt", "STATE = ny AND (City STARTS WITH al OR custom.source IN (web, fair))"),
        ("doc-3.txt", "custom.score >= 10"),
        ("numbers.txt", "zip >= 02108 and zip <= +2108.50 or custom.score < -3.5"),
        ("nested.txt", "not (state = NY or (city ends with 'any' and not zip != 1)) or company is empty"),
        ("quotes.txt", "title = \"say \"\"hi\"\"\" or first_name = 'zürich' or email = jane@example.com"),
        ("refused.txt", "state = NY and city not in (Troy)"),
    ];
    // The first byte of an assignments seed is the kind's place in `Kind::ALL`, with the high
    // bit set when the first line is a `--from-json` base.
    let place = |kind: Kind| Kind::ALL.iter().position(|k| *k == kind).unwrap() as u8;
    let assignments = [
        ("contact-add", place(Kind::Contact), "last_name=Doe\nstate=NY\naccess_users=ann, bob\ncustom.source=web"),
        (
            "contact-edit-from-json",
            place(Kind::Contact) | 0x80,
            "{\"last_name\": \"Doe\", \"custom\": {\"a\": \"1\", \"b\": \"1\"}}\ncity=Albany\ncustom.b=\nphone=",
        ),
        ("activity-add", place(Kind::Activity), "contact_id=c1\ndue=2026-12-01T09:30Z\ndone=true"),
        ("history-add", place(Kind::History), "contact_id=c1\ntype=call\nduration_minutes=15"),
        ("user-add", place(Kind::User), "name=Ann\nrole=manager\nteams=east,west"),
        ("remote-edit", place(Kind::Remote), "enabled=false\nexpires_days=30\nsubscriptions=c1,c2"),
        ("note-not-a-pair", place(Kind::Note), "contact_id=c1\ntext=a=b\nNOTE"),
    ];
    let body = [
        (
            "contact.json",
            json!({"first_name": "Jane", "last_name": "Doe", "state": "NY", "access": "private",
            "access_users": ["ann", "bob"], "custom": {"source": "web", "tier": null}}),
        ),
        ("company.json", json!({"id": "acme", "name": "ACME", "website": "https://acme.example", "manager": "ann"})),
        ("group.json", json!({"name": "Prospects", "description": "Met at the fair", "access_teams": ["east"]})),
        ("membership.json", json!({"contact_id": "c1", "group_id": "g1"})),
        (
            "note.json",
            json!({"contact_id": "c1", "text": "Called.", "date": "2024-02-29T10:00:00.250+05:30", "author": "ann"}),
        ),
        ("history.json", json!({"contact_id": "c1", "type": "call", "duration_minutes": 0, "date": "2026-11-27"})),
        ("activity.json", json!({"contact_id": "c1", "due": "2026-12-01", "done": false, "user": "ann"})),
        ("user.json", json!({"name": "Ann", "email": "ann@example.com", "role": "standard", "teams": ["east"]})),
        ("team.json", json!({"name": "East", "description": null})),
        ("set.json", json!({"description": "New York", "users": ["ann"], "all": false, "query": "state = NY"})),
        ("remote.json", json!({"set": "ny", "expires_days": 30, "enabled": true, "subscriptions": ["c1"]})),
        ("custom-fields.json", json!({"custom.source": "web", "custom": {"a": "1"}})),
    ];
    let mut out = Vec::new();
    out.extend(decode.into_iter().map(|(name, bytes)| ("decode", name, bytes)));
    out.extend(query.into_iter().map(|(name, text)| ("query", name, text.as_bytes().to_vec())));
    out.extend(assignments.into_iter().map(|(name, first, lines)| {
        let mut bytes = vec![first];
        bytes.extend_from_slice(lines.as_bytes());
        ("assignments", name, bytes)
    }));
    out.extend(body.into_iter().map(|(name, body)| ("body", name, serde_json::to_vec_pretty(&body).unwrap())));
    out
}

/// The seeds reach past the parsers' first refusal: the envelopes decode (or are foreign), the
/// reports decode, the queries parse (one is refused), the pairs make bodies the API accepts.
#[test]
fn the_seeds_are_what_they_are_named() {
    for (target, name, bytes) in seeds() {
        match target {
            "decode" if name.starts_with("envelope-") => {
                assert!(matches!(decode_checked(&bytes, DB), Decoded::Ok(_)), "{name}");
            }
            "decode" if name.starts_with("foreign-") => {
                assert!(matches!(decode_checked(&bytes, DB), Decoded::Foreign(_)), "{name}");
            }
            "decode" if name.starts_with("report") => {
                assert!(SessionReport::decode_checked(&bytes, DB, REMOTE).is_ok(), "{name}");
            }
            "decode" => assert!(matches!(decode_checked(&bytes, DB), Decoded::Malformed(_)), "{name}"),
            "query" => {
                let text = std::str::from_utf8(&bytes).unwrap();
                assert_eq!(Query::parse(text).is_ok(), !name.starts_with("refused"), "{name}: {text}");
            }
            "assignments" => {
                let kind = Kind::ALL[usize::from(bytes[0] & 0x7f)];
                let text = std::str::from_utf8(&bytes[1..]).unwrap();
                let mut lines = text.split('\n');
                let base = if bytes[0] & 0x80 != 0 { lines.next() } else { None };
                let pairs: Vec<String> = lines.map(str::to_owned).collect();
                match parse_assignments(kind, &pairs, base) {
                    Ok(body) => assert!(parse_input(kind, &body, false).is_ok(), "{name}: {body}"),
                    Err(e) => assert!(name.contains("not-a-pair"), "{name}: {e}"),
                }
            }
            _ => {
                let body: J = serde_json::from_slice(&bytes).unwrap();
                let kind = Kind::ALL.into_iter().find(|k| name.starts_with(k.as_str())).unwrap_or(Kind::Contact);
                assert!(parse_input(kind, &body, true).is_ok(), "{name}: {body}");
            }
        }
    }
}

/// `fuzz/corpus/` holds the seeds made here; `CRMSYNC_BLESS=1` writes them.
#[test]
fn the_kept_corpus_is_the_seeds() {
    let corpus = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus");
    for (target, name, bytes) in seeds() {
        let path = corpus.join(target).join(name);
        if std::env::var_os("CRMSYNC_BLESS").is_some() {
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(&path, &bytes).unwrap();
            continue;
        }
        let kept = std::fs::read(&path).unwrap_or_default();
        assert!(
            kept == bytes,
            "fuzz/corpus/{target}/{name} differs from the seed the tests make; \
             if the change is deliberate, run the tests with CRMSYNC_BLESS=1"
        );
    }
}
