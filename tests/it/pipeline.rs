//! Changes made at the main reach the remote: create, update and delete of every kind.

use std::time::Duration;

use crmsync::model::Kind;
use serde_json::json;

use crate::harness::{Env, snapshot, wait_converged, wait_for};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_update_and_delete_of_every_kind_reach_the_remote() {
    let env = Env::start().await;
    env.create_all_set("everyone").await;
    let remote = env.remote("laptop", "everyone").await;
    let api = &env.api;

    let team = api.create(Kind::Team, json!({ "name": "Sales" })).await;
    let user = api.create(Kind::User, json!({ "name": "Ann Admin", "role": "administrator", "teams": [team] })).await;
    let company = api.create(Kind::Company, json!({ "name": "Acme Inc", "city": "Albany", "manager": user })).await;
    let group = api.create(Kind::Group, json!({ "name": "Customers", "access": "public" })).await;
    let contact = api
        .create(
            Kind::Contact,
            json!({
                "first_name": "Grace", "last_name": "Hopper", "company": "Acme Inc", "company_id": company,
                "title": "Admiral", "phone": "+1 518 555 0100", "mobile": "+1 518 555 0101",
                "email": "grace@example.com", "address1": "1 Navy Way", "address2": "Suite 2",
                "city": "Albany", "state": "NY", "zip": "12207", "country": "US",
                "website": "https://example.com", "custom": { "rank": "admiral" },
                "manager": user, "access": "limited", "access_users": [user], "access_teams": [team],
            }),
        )
        .await;
    let membership = api.create(Kind::Membership, json!({ "contact_id": contact, "group_id": group })).await;
    let note = api.create(Kind::Note, json!({ "contact_id": contact, "text": "Met at the fair." })).await;
    let history =
        api.create(Kind::History, json!({ "contact_id": contact, "type": "call", "duration_minutes": 12 })).await;
    let activity = api
        .create(Kind::Activity, json!({ "contact_id": contact, "type": "meeting", "due": "2026-12-01", "done": false }))
        .await;
    let created = [
        (Kind::Team, &team),
        (Kind::User, &user),
        (Kind::Company, &company),
        (Kind::Group, &group),
        (Kind::Contact, &contact),
        (Kind::Membership, &membership),
        (Kind::Note, &note),
        (Kind::History, &history),
        (Kind::Activity, &activity),
    ];
    wait_converged(env.main(), remote.remote.store()).await;
    // What a user reads at the remote's API is what the main's API shows, field for field.
    for (kind, id) in created {
        let path = format!("/v1/{}/{id}", kind.plural());
        let (status, at_main) = env.api.get(&path).await;
        assert_eq!(status, 200);
        let (status, at_remote) = remote.api.get(&path).await;
        assert_eq!(status, 200, "{kind} {id} at the remote: {at_remote}");
        let strip = |mut v: serde_json::Value| {
            v.as_object_mut().unwrap().remove("version");
            v
        };
        assert_eq!(strip(at_main), strip(at_remote), "{kind} {id}");
    }

    // Updates: one field each, the others stay.
    let updates = [
        (Kind::Team, &team, json!({ "description": "East coast" })),
        (Kind::User, &user, json!({ "email": "ann@example.com" })),
        (Kind::Company, &company, json!({ "city": "Troy" })),
        (Kind::Group, &group, json!({ "description": "Paying" })),
        (Kind::Contact, &contact, json!({ "city": "Buffalo", "website": null })),
        (Kind::Note, &note, json!({ "text": "Met at the fair, twice." })),
        (Kind::History, &history, json!({ "regarding": "renewal" })),
        (Kind::Activity, &activity, json!({ "done": true })),
    ];
    for (kind, id, body) in &updates {
        let (status, resp) = env.api.patch(&format!("/v1/{}/{id}", kind.plural()), body).await;
        assert_eq!(status, 200, "{resp}");
    }
    wait_converged(env.main(), remote.remote.store()).await;
    let (_, c) = remote.api.get(&format!("/v1/contacts/{contact}")).await;
    assert_eq!(c["city"], "Buffalo");
    assert_eq!(c["first_name"], "Grace");
    assert!(c.get("website").is_none(), "a cleared field is gone: {c}");
    let (_, a) = remote.api.get(&format!("/v1/activities/{activity}")).await;
    assert_eq!(a["done"], true);

    // Deleting the contact takes its notes, histories, activities and memberships with it.
    let (status, _) = env.api.delete(&format!("/v1/contacts/{contact}")).await;
    assert_eq!(status, 200);
    for (kind, id) in [(Kind::Team, &team), (Kind::Group, &group), (Kind::Company, &company)] {
        let (status, _) = env.api.delete(&format!("/v1/{}/{id}", kind.plural())).await;
        assert_eq!(status, 200);
    }
    wait_converged(env.main(), remote.remote.store()).await;
    let left = snapshot(remote.remote.store());
    assert!(left.keys().all(|(k, _)| *k == Kind::User), "only the users are left: {left:?}");
    for (kind, id) in created.iter().filter(|(k, _)| *k != Kind::User) {
        let (status, _) = remote.api.get(&format!("/v1/{}/{id}", kind.plural())).await;
        assert_eq!(status, 404, "{kind} {id} is gone from the remote");
    }
    remote.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_edits_of_one_record_both_land() {
    let env = Env::start().await;
    let id = env.api.create(Kind::Contact, json!({ "first_name": "Ada" })).await;
    // Many writers, each changing its own field of the same contact at the same time: every
    // write is retried against the newer state, so none overwrites another blindly.
    let fields = ["title", "phone", "mobile", "email", "city", "state", "zip", "country"];
    let writes = fields.iter().map(|f| {
        let api = env.api.clone();
        let path = format!("/v1/contacts/{id}");
        async move { api.patch(&path, &json!({ *f: format!("{f}-value") })).await }
    });
    for (status, body) in futures::future::join_all(writes).await {
        assert_eq!(status, 200, "{body}");
    }
    let (_, c) = env.api.get(&format!("/v1/contacts/{id}")).await;
    for f in fields {
        assert_eq!(c[f], format!("{f}-value"), "{c}");
    }
    assert_eq!(c["first_name"], "Ada");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_is_readable_at_the_main_as_soon_as_it_returns() {
    let env = Env::start().await;
    for i in 0..20 {
        let id = env.api.create(Kind::Contact, json!({ "last_name": format!("L{i}") })).await;
        let (status, body) = env.api.patch(&format!("/v1/contacts/{id}"), &json!({ "city": "Albany" })).await;
        assert_eq!(status, 200);
        assert_eq!(body["city"], "Albany");
        let (status, body) = env.api.get(&format!("/v1/contacts/{id}")).await;
        assert_eq!((status, body["city"].as_str()), (200, Some("Albany")));
    }
    let status = env.api.status().await;
    assert_eq!(status["counts"]["contact"], 20);
    assert_eq!(status["applied"], status["stream_last"]);
    // The routed copies reach CRM_SYNC (an all-records set created afterwards gets them all).
    env.create_all_set("late").await;
    let remote = env.remote("late-remote", "late").await;
    wait_for("the late set's remote to hold 20 contacts", Duration::from_secs(20), || async {
        remote.remote.store().counts().unwrap()[&Kind::Contact] == 20
    })
    .await;
    remote.stop().await;
}

/// A main killed before its projection was durable replays the stream and routes the same
/// changes again: the states it publishes again must leave each subject of `CRM_SYNC` with the
/// newest one, also after a restart of nats-server (which forgets the ids of messages that
/// newer ones replaced). Found by the chaos test: a replayed older state became the subject's
/// last, so a rebuilt remote or one that had not read the newer state got the older one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routing_replayed_after_a_crash_leaves_the_newest_state_on_each_subject() {
    use crmsync::outgoing::OutboxEntry;
    use crmsync::wire::{Target, sync_subject};
    let mut env = Env::start().await;
    let subject = sync_subject(&Target::Set("everyone".into()), Kind::Contact, "c1");
    let entry = |seq: u64| OutboxEntry {
        seq,
        subjects: vec![subject.clone()],
        payload: format!("state {seq}").into_bytes(),
        tombstone: false,
    };
    let nats = crmsync::transport::Nats::connect(&env.nats.url(), "test").await.unwrap();
    // The first life: states 5 and 7 routed; the stream keeps the last of the subject.
    nats.publish_routed(&[entry(5)]).await.unwrap();
    nats.publish_routed(&[entry(7)]).await.unwrap();
    let server = &mut env.nats;
    tokio::task::block_in_place(|| server.restart()).unwrap();
    let nats = crmsync::transport::Nats::connect(&env.nats.url(), "test").await.unwrap();
    // The replay after a crash routes both again, in order.
    nats.publish_routed(&[entry(5)]).await.unwrap();
    nats.publish_routed(&[entry(7)]).await.unwrap();
    let last = nats.last_on(&subject).await.unwrap().unwrap();
    assert_eq!(String::from_utf8_lossy(&last), "state 7");
}
