//! The wire contract: schemas/ describes what is sent; a remote refuses what is not its own and
//! quarantines what does not decode.

use std::time::Duration;

use crmsync::model::Kind;
use crmsync::wire::{EVENTS_STREAM, Envelope, Op, PRODUCT, SCHEMA_MAJOR, SYNC_STREAM};
use serde_json::{Value as J, json};

use crate::harness::{Env, wait_for};

fn schemas_dir() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("schemas")
}

/// The documents in schemas/ are the ones the code generates. `CRMSYNC_BLESS=1` rewrites them
/// after a deliberate change of the wire format.
#[test]
fn the_schema_documents_match_the_code() {
    for (name, doc) in crmsync::schema::documents() {
        let path = schemas_dir().join(&name);
        let text = serde_json::to_string_pretty(&doc).unwrap() + "\n";
        if std::env::var_os("CRMSYNC_BLESS").is_some() {
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(&path, &text).unwrap();
        }
        let on_disk = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            on_disk == text,
            "schemas/{name} differs from the code; if the change is deliberate, run the tests with CRMSYNC_BLESS=1"
        );
    }
}

/// What is wrong with a message, by the envelope schema (nothing: an empty list).
pub fn schema_errors(payload: &[u8]) -> Vec<String> {
    errors_against("envelope.schema.json", payload)
}

/// What the schema document `file` finds wrong with a MessagePack message.
fn errors_against(file: &str, payload: &[u8]) -> Vec<String> {
    let schema: J = serde_json::from_str(&std::fs::read_to_string(schemas_dir().join(file)).unwrap()).unwrap();
    let validator = jsonschema::validator_for(&schema).unwrap();
    let as_json: J = rmp_serde::from_slice(payload).unwrap();
    validator.iter_errors(&as_json).map(|e| format!("{as_json}: {e}")).collect()
}

async fn all_messages(env: &Env, stream: &str) -> Vec<(String, Vec<u8>)> {
    let nats = env.main_nats().await;
    let s = nats.js.get_stream(stream).await.unwrap();
    let last = nats.last_sequence(stream).await.unwrap();
    let mut out = Vec::new();
    for seq in 1..=last {
        // Compacted streams have holes where superseded messages were.
        if let Ok(m) = s.get_raw_message(seq).await {
            out.push((m.subject.to_string(), m.payload.to_vec()));
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_message_sent_validates_against_the_schemas() {
    let env = Env::start().await;
    env.create_all_set("everyone").await;
    let _remote = env.init_remote("laptop", "everyone").await;
    let api = &env.api;
    let team = api.create(Kind::Team, json!({ "name": "Sales" })).await;
    let user = api.create(Kind::User, json!({ "name": "Ann", "role": "manager", "teams": [team] })).await;
    let company = api.create(Kind::Company, json!({ "name": "Acme", "custom": { "tier": "gold" } })).await;
    let group = api.create(Kind::Group, json!({ "name": "VIP" })).await;
    let c = api
        .create(
            Kind::Contact,
            json!({ "first_name": "Ann", "company_id": company, "manager": user, "access": "limited", "access_teams": [team] }),
        )
        .await;
    api.create(Kind::Membership, json!({ "contact_id": c, "group_id": group })).await;
    api.create(Kind::Note, json!({ "contact_id": c, "text": "hello" })).await;
    api.create(Kind::History, json!({ "contact_id": c, "duration_minutes": 5 })).await;
    api.create(Kind::Activity, json!({ "contact_id": c, "done": true })).await;
    api.patch(&format!("/v1/contacts/{c}"), &json!({ "title": null, "city": "Albany" })).await;
    api.delete(&format!("/v1/contacts/{c}")).await;
    wait_for("routing to finish", Duration::from_secs(20), || async { env.main().store().outbox_len().unwrap() == 0 })
        .await;
    // Edits at a remote, kept in CRM_UP while the main is down.
    let mut env = env;
    env.stop_main().await;
    let laptop = env.start_remote(&_remote).await;
    laptop.api.create(Kind::Contact, json!({ "id": "up1", "first_name": "Up" })).await;
    laptop.api.patch("/v1/contacts/up1", &json!({ "city": "Albany" })).await;
    laptop.api.delete("/v1/contacts/up1").await;
    // And the report of its session, once it has caught up.
    wait_for("the uploads and the session report in CRM_UP", Duration::from_secs(20), || async {
        let status = laptop.api.status().await;
        status["uploads"]["waiting"] == 0
            && status["sync"]["reports_waiting"] == 0
            && status["sessions"].as_array().is_some_and(|s| !s.is_empty())
    })
    .await;
    let uploads = all_messages(&env, crmsync::wire::UP_STREAM).await;
    let (reports, edits): (Vec<_>, Vec<_>) = uploads.iter().partition(|(s, _)| crmsync::wire::is_session_subject(s));
    assert_eq!((edits.len(), reports.len()), (3, 1), "{uploads:?}");
    for (subject, payload) in &edits {
        assert!(subject.starts_with("crm.up.laptop.contact.up1"), "{subject}");
        assert_eq!(schema_errors(payload), Vec::<String>::new(), "{subject}");
    }
    let (subject, report) = &reports[0];
    assert_eq!(subject, "crm.up.laptop.session.report");
    assert_eq!(errors_against("session.schema.json", report), Vec::<String>::new());
    laptop.stop().await;

    let schema: J =
        serde_json::from_str(&std::fs::read_to_string(schemas_dir().join("envelope.schema.json")).unwrap()).unwrap();
    let validator = jsonschema::validator_for(&schema).unwrap();
    let mut kinds_seen = std::collections::BTreeSet::new();
    let mut ops_seen = std::collections::BTreeSet::new();
    for stream in [EVENTS_STREAM, SYNC_STREAM] {
        let messages = all_messages(&env, stream).await;
        assert!(!messages.is_empty());
        for (subject, payload) in messages {
            let as_json: J = rmp_serde::from_slice(&payload).unwrap();
            let errors: Vec<String> = validator.iter_errors(&as_json).map(|e| e.to_string()).collect();
            assert!(errors.is_empty(), "{stream} {subject}: {as_json} does not match the schema: {errors:?}");
            kinds_seen.insert(as_json["kind"].as_str().unwrap().to_owned());
            ops_seen.insert(as_json["op"].as_str().unwrap().to_owned());
        }
    }
    assert_eq!(kinds_seen.len(), Kind::ALL.len(), "{kinds_seen:?}");
    // Deletes and leaves expire from CRM_SYNC after the longest remote expiry (90 days).
    let nats = env.main_nats().await;
    let sync = nats.js.get_stream(SYNC_STREAM).await.unwrap();
    let tombstone = sync.get_last_raw_message_by_subject(&format!("crm.sync.everyone.contact.{c}")).await.unwrap();
    let ttl = tombstone.headers.get("Nats-TTL").map(|v| v.as_str().to_owned());
    assert_eq!(ttl.as_deref(), Some("7776000s"), "the delete of {c} carries a TTL");
    assert!(ops_seen.contains("upsert") && ops_seen.contains("delete"), "{ops_seen:?}");

    // The schemas are strict enough to catch a wrong message.
    let env_json = json!({
        "product": PRODUCT, "schema": SCHEMA_MAJOR, "db": "x", "event": "e", "kind": "contact", "id": "c1",
        "op": "upsert", "version": 1, "origin": "main", "record": { "city": ["Albany", 1] },
    });
    assert!(validator.is_valid(&env_json));
    for bad in [
        json!({ "record": { "city": ["Albany"] } }),
        json!({ "record": { "nickname": ["A", 1] } }),
        json!({ "record": { "access": ["secret", 1] } }),
        json!({ "id": "a.b" }),
        json!({ "op": "merge" }),
    ] {
        let mut m = env_json.clone();
        for (k, v) in bad.as_object().unwrap() {
            m[k] = v.clone();
        }
        assert!(!validator.is_valid(&m), "{m} should not validate");
    }
}

async fn publish_raw(env: &Env, subject: &str, payload: Vec<u8>) -> u64 {
    let nats = env.main_nats().await;
    nats.js.publish(subject.to_owned(), payload.into()).await.unwrap().await.unwrap().sequence
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_from_another_database_stops_the_remote_with_both_ids() {
    let env = Env::start().await;
    env.create_all_set("everyone").await;
    let remote = env.remote("laptop", "everyone").await;
    env.api.create(Kind::Contact, json!({ "id": "c1" })).await;
    wait_for("c1 at the remote", Duration::from_secs(10), || async {
        remote.remote.store().get(Kind::Contact, "c1").unwrap().is_some()
    })
    .await;

    let foreign = Envelope {
        product: PRODUCT.into(),
        schema: SCHEMA_MAJOR,
        db: "01OTHERDATABASE".into(),
        event: "e".into(),
        kind: Kind::Contact,
        id: "intruder".into(),
        op: Op::Upsert,
        version: 999,
        origin: "main".into(),
        record: Some(Default::default()),
        reason: None,
    };
    let seq = publish_raw(&env, "crm.sync.everyone.contact.intruder", foreign.encode()).await;
    let stopped = tokio::time::timeout(Duration::from_secs(10), remote.remote.stopped()).await.expect("sync stops");
    let err = stopped.expect_err("sync stops with an error");
    assert!(err.contains("01OTHERDATABASE") && err.contains(env.main().database_id()), "{err}");
    let status = remote.api.status().await;
    assert_eq!(status["error"].as_str(), Some(err.as_str()));
    assert!(remote.remote.store().get(Kind::Contact, "intruder").unwrap().is_none());
    // Nothing was acknowledged from the foreign message on.
    let nats = env.main_nats().await;
    let mut consumer = nats.remote_consumer("remote-laptop").await.unwrap();
    let info = consumer.info().await.unwrap();
    assert!(info.ack_floor.stream_sequence < seq, "ack floor {} reached {seq}", info.ack_floor.stream_sequence);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_message_is_quarantined_and_sync_goes_on() {
    let env = Env::start().await;
    env.create_all_set("everyone").await;
    let remote = env.remote("laptop", "everyone").await;
    let seq = publish_raw(&env, "crm.sync.everyone.contact.broken", b"\xc1 not messagepack".to_vec()).await;
    env.api.create(Kind::Contact, json!({ "id": "after" })).await;
    wait_for("the contact after the bad message", Duration::from_secs(10), || async {
        remote.remote.store().get(Kind::Contact, "after").unwrap().is_some()
    })
    .await;
    let status = remote.api.status().await;
    assert_eq!(status["quarantined"], 1, "{status}");
    assert_eq!(status["quarantine"][0]["seq"], seq);
    assert_eq!(status["quarantine"][0]["subject"], "crm.sync.everyone.contact.broken");
    assert!(status["error"].is_null());
    let (total, kept) = remote.remote.store().quarantine(10).unwrap();
    assert_eq!(total, 1);
    assert_eq!(kept[0].1.payload, b"\xc1 not messagepack", "the message is kept as it came");
    remote.stop().await;
}
