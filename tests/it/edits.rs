//! Edits made at remotes: written locally at once, uploaded to `CRM_UP`, merged at the main
//! field by field (newest change wins), and routed to everyone who should see them; what the
//! main refuses comes back to the remote with the reason.

use std::time::Duration;

use crmsync::model::{Field, Fields, Kind, Value};
use crmsync::wire::{self, Envelope, Op, PRODUCT, SCHEMA_MAJOR};
use serde_json::{Value as J, json};

use crate::harness::{Api, Env, wait_converged, wait_for};

const WAIT: Duration = Duration::from_secs(20);

/// Waits until `api` shows `field` of a record as `want` (`Null`: the record is not there).
async fn wait_field(api: &Api, what: &str, path: &str, field: &str, want: J) {
    wait_for(what, WAIT, || async {
        let (status, body) = api.get(path).await;
        match want {
            J::Null => status == 404,
            _ => status == 200 && body[field] == want,
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edits_at_a_remote_reach_the_main_and_every_other_remote() {
    let env = Env::start().await;
    env.create_all_set("everyone").await;
    let a = env.remote("laptop", "everyone").await;
    let b = env.remote("branch", "everyone").await;
    env.api.create(Kind::Contact, json!({ "id": "c1", "first_name": "Ann", "city": "Boston" })).await;
    env.api.create(Kind::Contact, json!({ "id": "c2", "first_name": "Bob" })).await;
    wait_field(&a.api, "c1 at the laptop", "/v1/contacts/c1", "city", json!("Boston")).await;

    // An update: the laptop's own API shows it at once, the main and the branch soon after.
    let (status, body) = a.api.patch("/v1/contacts/c1", &json!({ "city": "Albany" })).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["city"], "Albany");
    wait_field(&env.api, "the laptop's edit at the main", "/v1/contacts/c1", "city", json!("Albany")).await;
    wait_field(&b.api, "the laptop's edit at the branch", "/v1/contacts/c1", "city", json!("Albany")).await;

    // A new contact with a note, made at the laptop.
    let (status, body) = a.api.post("/v1/contacts", &json!({ "id": "r1", "first_name": "Rita" })).await;
    assert_eq!(status, 201, "{body}");
    let (status, body) = a.api.post("/v1/notes", &json!({ "id": "n1", "contact_id": "r1", "text": "hello" })).await;
    assert_eq!(status, 201, "{body}");
    wait_field(&b.api, "the laptop's note at the branch", "/v1/notes/n1", "text", json!("hello")).await;
    let (status, body) = env.api.get("/v1/contacts/r1").await;
    assert_eq!((status, &body["first_name"]), (200, &json!("Rita")), "{body}");
    let (_, list) = env.api.get("/v1/remotes/laptop/subscriptions").await;
    assert_eq!(list["contacts"], json!(["r1"]), "a contact made at a remote joins its list: {list}");

    // A delete, with the contact's note.
    let (status, body) = a.api.delete("/v1/contacts/c2").await;
    assert_eq!(status, 200, "{body}");
    let (status, _) = a.api.get("/v1/contacts/c2").await;
    assert_eq!(status, 404, "gone at the laptop at once");
    wait_field(&env.api, "the delete at the main", "/v1/contacts/c2", "id", J::Null).await;
    wait_field(&b.api, "the delete at the branch", "/v1/contacts/c2", "id", J::Null).await;

    wait_converged(env.main(), a.remote.store()).await;
    wait_converged(env.main(), b.remote.store()).await;
    wait_for("the laptop's upload queue to empty", WAIT, || async { a.api.status().await["uploads"]["waiting"] == 0 })
        .await;
    let status = a.api.status().await;
    assert_eq!(status["refused"], 0, "{status}");
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_people_changing_one_contact_both_keep_their_change() {
    let env = Env::start().await;
    env.create_all_set("everyone").await;
    let a = env.remote("laptop", "everyone").await;
    let b = env.remote("branch", "everyone").await;
    env.api.create(Kind::Contact, json!({ "id": "c1", "first_name": "Ann", "city": "Boston", "phone": "1" })).await;
    wait_field(&a.api, "c1 at the laptop", "/v1/contacts/c1", "phone", json!("1")).await;
    wait_field(&b.api, "c1 at the branch", "/v1/contacts/c1", "phone", json!("1")).await;

    // Different fields, at the same moment: the laptop and the branch edit before either has
    // seen the other's change, and the main edits a third field.
    let (sa, _) = a.api.patch("/v1/contacts/c1", &json!({ "first_name": "Anne" })).await;
    let (sb, _) = b.api.patch("/v1/contacts/c1", &json!({ "city": "Albany" })).await;
    let (sm, _) = env.api.patch("/v1/contacts/c1", &json!({ "title": "CEO" })).await;
    assert_eq!((sa, sb, sm), (200, 200, 200));
    // One field, changed at the main and then at the branch: the newest change wins.
    env.api.patch("/v1/contacts/c1", &json!({ "phone": "2" })).await;
    tokio::time::sleep(Duration::from_millis(5)).await;
    b.api.patch("/v1/contacts/c1", &json!({ "phone": "3" })).await;

    let want = json!({ "first_name": "Anne", "city": "Albany", "title": "CEO", "phone": "3" });
    for (api, place) in [(&env.api, "main"), (&a.api, "laptop"), (&b.api, "branch")] {
        wait_for(&format!("every change at the {place}"), WAIT, || async {
            let (_, c) = api.get("/v1/contacts/c1").await;
            ["first_name", "city", "title", "phone"].iter().all(|f| c[*f] == want[*f])
        })
        .await;
    }
    wait_converged(env.main(), a.remote.store()).await;
    wait_converged(env.main(), b.remote.store()).await;
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edits_made_while_the_main_is_down_are_merged_when_it_returns() {
    let mut env = Env::start().await;
    env.create_all_set("everyone").await;
    let a = env.remote("laptop", "everyone").await;
    env.api.create(Kind::Contact, json!({ "id": "c1", "first_name": "Ann" })).await;
    wait_field(&a.api, "c1 at the laptop", "/v1/contacts/c1", "first_name", json!("Ann")).await;

    env.stop_main().await;
    // Twenty people at once: each edit is on the laptop's disk when its API answers.
    let creates = (0..20).map(|i| {
        let api = a.api.clone();
        async move { api.post("/v1/contacts", &json!({ "id": format!("r{i}"), "last_name": "Offline" })).await }
    });
    for (status, body) in futures::future::join_all(creates).await {
        assert_eq!(status, 201, "{body}");
    }
    a.api.patch("/v1/contacts/c1", &json!({ "first_name": "Anna" })).await;
    // The laptop keeps working; its edits wait in CRM_UP.
    wait_for("the uploads in CRM_UP", WAIT, || async { a.api.status().await["uploads"]["waiting"] == 0 }).await;
    let nats = env.main_nats().await;
    assert_eq!(nats.uploads_waiting().await.unwrap(), 21);

    env.restart_main().await;
    wait_field(&env.api, "the offline edit at the main", "/v1/contacts/c1", "first_name", json!("Anna")).await;
    wait_for("the 20 offline contacts at the main", WAIT, || async {
        env.main().store().counts().unwrap()[&Kind::Contact] == 21
    })
    .await;
    wait_converged(env.main(), a.remote.store()).await;
    // An upload is acknowledged after its wave is merged and its contacts listed, so it can
    // leave the work queue a moment after the records converge.
    wait_for("merged uploads to leave the work queue", WAIT, || async { nats.uploads_waiting().await.unwrap() == 0 })
        .await;
    a.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_contact_made_at_a_remote_stays_there_when_it_leaves_the_set() {
    let env = Env::start().await;
    env.api.create(Kind::User, json!({ "id": "rep", "name": "Rep", "role": "standard" })).await;
    let (status, body) =
        env.api.post("/v1/sets", &json!({ "name": "ny", "users": ["rep"], "query": "state = NY" })).await;
    assert_eq!(status, 201, "{body}");
    let a = env.remote("laptop", "ny").await;
    let (status, body) = a.api.post("/v1/contacts", &json!({ "id": "r1", "last_name": "Local", "state": "NY" })).await;
    assert_eq!(status, 201, "{body}");
    wait_field(&env.api, "r1 at the main", "/v1/contacts/r1", "state", json!("NY")).await;

    // Moved to Connecticut at the main: out of the set's query, but it was made at the laptop.
    env.api.patch("/v1/contacts/r1", &json!({ "state": "CT" })).await;
    wait_field(&a.api, "the move at the laptop", "/v1/contacts/r1", "state", json!("CT")).await;
    crate::sets::wait_exact(&env, &a, "laptop").await;
    assert!(a.remote.store().get(Kind::Contact, "r1").unwrap().is_some());
    a.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edit_the_main_refuses_comes_back_with_the_reason() {
    let env = Env::start().await;
    env.api.create(Kind::User, json!({ "id": "rep", "name": "Rep", "role": "standard" })).await;
    env.api.create(Kind::User, json!({ "id": "boss", "name": "Boss", "role": "manager" })).await;
    env.api.post("/v1/sets", &json!({ "name": "reps", "users": ["rep"] })).await;
    let a = env.remote("laptop", "reps").await;
    env.api.create(Kind::Contact, json!({ "id": "c1", "last_name": "Kept" })).await;
    env.api.create(Kind::Contact, json!({ "id": "c2", "last_name": "Gone" })).await;
    wait_field(&a.api, "c2 at the laptop", "/v1/contacts/c2", "last_name", json!("Gone")).await;

    // A contact the laptop's users could not see: refused, taken away, and logged with the edit.
    let (status, body) = a
        .api
        .post("/v1/contacts", &json!({ "id": "secret", "last_name": "Hidden", "manager": "boss", "access": "private" }))
        .await;
    assert_eq!(status, 201, "the laptop takes the edit at once: {body}");
    wait_field(&a.api, "the refused contact taken away", "/v1/contacts/secret", "id", J::Null).await;
    let status = a.api.status().await;
    assert_eq!(status["refused"], 1, "{status}");
    let entry = &status["sync_log"][0];
    assert_eq!(entry["id"], "secret");
    assert!(entry["reason"].as_str().unwrap().contains("could not access"), "{entry}");
    assert_eq!(entry["edit"]["last_name"], "Hidden", "the refused edit is kept: {entry}");
    let nats = env.main_nats().await;
    let reject = nats.last_on(&wire::reject_subject("laptop", Kind::Contact, "secret")).await.unwrap().unwrap();
    assert_eq!(crate::wire::schema_errors(&reject), Vec::<String>::new());
    let (_, main_status) = env.api.get("/v1/status").await;
    assert_eq!(main_status["refused"], 1, "{main_status}");
    let (status, _) = env.api.get("/v1/contacts/secret").await;
    assert_eq!(status, 404);

    // An edit made at the laptop before the main's delete of c2 reached it: the delete wins.
    env.api.delete("/v1/contacts/c2").await;
    wait_field(&a.api, "the delete at the laptop", "/v1/contacts/c2", "id", J::Null).await;
    let stale = Envelope {
        product: PRODUCT.into(),
        schema: SCHEMA_MAJOR,
        db: env.main().database_id().into(),
        event: crmsync::names::new_id(),
        kind: Kind::Contact,
        id: "c2".into(),
        op: Op::Upsert,
        version: 1,
        origin: "laptop".into(),
        record: Some(Fields::from([(
            "last_name".to_owned(),
            Field { value: Value::Str("Edited".into()), stamp: crmsync::hlc::Clock::new().now() },
        )])),
        reason: None,
    };
    let subject = wire::up_subject("laptop", Kind::Contact, "c2");
    nats.js.publish(subject, stale.encode().into()).await.unwrap().await.unwrap();
    wait_for("the conflict in the laptop's sync log", WAIT, || async { a.api.status().await["refused"] == 2 }).await;
    let status = a.api.status().await;
    assert!(status["sync_log"][1]["reason"].as_str().unwrap().contains("deleted at the main"), "{status}");
    let (status, _) = env.api.get("/v1/contacts/c2").await;
    assert_eq!(status, 404, "the delete at the main wins");
    let (status, _) = a.api.get("/v1/contacts/c2").await;
    assert_eq!(status, 404);
    crate::sets::wait_exact(&env, &a, "laptop").await;

    // What a remote may not change at all is refused at its API.
    let (status, body) = a.api.post("/v1/users", &json!({ "name": "Mallory", "role": "administrator" })).await;
    assert_eq!(status, 400);
    assert!(body["error"].as_str().unwrap().contains("managed at the main"), "{body}");
    let (status, body) = a.api.patch("/v1/contacts/c1", &json!({ "nickname": "x" })).await;
    assert_eq!(status, 400);
    assert!(body["error"].as_str().unwrap().contains("unknown field"), "{body}");
    a.stop().await;
}
