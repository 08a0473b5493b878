//! Sync sets, access rights and subscription lists: each remote holds exactly what it should.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use crmsync::main_service::SetRequest;
use crmsync::model::Kind;
use crmsync::routing::RoutingConfig;
use crmsync::wire::Target;
use serde_json::json;

use crate::harness::{Env, Snapshot, snapshot};

/// What the main's own evaluation says a remote should hold: every record its set or its
/// subscription list holds (children by their contact).
pub fn expected_for(store: &crmsync::store::Store, remote: &str) -> Snapshot {
    let mut config = RoutingConfig::default();
    for kind in [Kind::Set, Kind::User, Kind::Remote] {
        store
            .for_each(kind, |id, s| {
                config.apply(kind, id, Some(&s.fields));
            })
            .unwrap();
    }
    let set = config.remotes[remote].set.clone();
    let defs: Vec<_> = config
        .target_defs()
        .into_iter()
        .filter(|d| d.target == Target::Set(set.clone()) || d.target == Target::Subscriptions(remote.to_owned()))
        .collect();
    let all = snapshot(store);
    all.iter()
        .filter(|((kind, id), fields)| {
            let (basis_kind, basis_id, basis) = match kind.parent_field() {
                Some(f) => {
                    let parent = crmsync::model::text(fields, f).unwrap_or_default().to_owned();
                    match all.get(&(Kind::Contact, parent.clone())) {
                        Some(p) => (Kind::Contact, parent, p.clone()),
                        None => return false,
                    }
                }
                None => (*kind, id.clone(), (*fields).clone()),
            };
            defs.iter().any(|d| d.holds(basis_kind, &basis_id, &basis))
        })
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// Waits until a remote holds exactly what the main says it should.
pub async fn wait_exact(env: &Env, remote: &crate::harness::RemoteHandle, name: &str) -> usize {
    let start = Instant::now();
    loop {
        let want = expected_for(env.main().store(), name);
        let have = snapshot(remote.remote.store());
        if want == have {
            return want.keys().filter(|(k, _)| *k == Kind::Contact).count();
        }
        if start.elapsed() > Duration::from_secs(30) {
            let missing: Vec<_> = want.keys().filter(|k| !have.contains_key(*k)).take(5).collect();
            let extra: Vec<_> = have.keys().filter(|k| !want.contains_key(*k)).take(5).collect();
            panic!(
                "remote {name} holds {} records, the main says {}; missing {missing:?}, extra {extra:?}",
                have.len(),
                want.len()
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn contacts_at(remote: &crate::harness::RemoteHandle) -> u64 {
    remote.remote.store().counts().unwrap()[&Kind::Contact]
}

/// 1,000 contacts; `rep` may access the even ones (the odd ones are `boss`'s, private). Of the
/// even ones, i % 10 == 0 are in New York (100), and of those i % 100 == 0 are in Albany (10).
async fn scenario_data(env: &Env) {
    use futures::StreamExt;
    env.api.create(Kind::Team, json!({ "id": "east", "name": "East" })).await;
    env.api.create(Kind::User, json!({ "id": "rep", "name": "Rep", "role": "standard" })).await;
    env.api.create(Kind::User, json!({ "id": "boss", "name": "Boss", "role": "manager", "teams": ["east"] })).await;
    let states = ["NY", "NY", "CT", "CT", "PA", "PA", "NJ", "NJ", "MA", "MA"];
    let bodies: Vec<_> = (0..1000)
        .map(|i| {
            json!({
                "id": format!("c{i}"),
                "last_name": format!("L{i}"),
                "state": states[i % 10],
                "city": if i % 100 == 0 { "Albany" } else { "Buffalo" },
                "manager": "boss",
                "access": if i % 2 == 0 { "public" } else { "private" },
            })
        })
        .collect();
    let main = env.main();
    let mut writes = futures::stream::iter(bodies.iter()).map(|b| main.create(Kind::Contact, b)).buffer_unordered(32);
    while let Some(r) = writes.next().await {
        r.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_documented_scenario_holds_exactly_the_right_contacts() {
    let env = Env::start().await;
    scenario_data(&env).await;
    let (status, set) =
        env.api.post("/v1/sets", &json!({ "name": "ny", "users": ["rep"], "query": "state = NY" })).await;
    assert_eq!(status, 201, "{set}");
    let (_, preview) = env.api.get("/v1/sets/ny/preview?limit=3").await;
    assert_eq!(preview["contacts"], 100, "{preview}");
    let remote = env.remote("laptop", "ny").await;
    assert_eq!(wait_exact(&env, &remote, "laptop").await, 100);
    assert_eq!(contacts_at(&remote), 100);

    // Two in Connecticut, two in Pennsylvania: 104.
    let (status, body) =
        env.api.post("/v1/remotes/laptop/subscriptions", &json!({ "add": ["c2", "c12", "c4", "c14"] })).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(wait_exact(&env, &remote, "laptop").await, 104);
    // X, in New York, already in the set: still 104.
    env.api.post("/v1/remotes/laptop/subscriptions", &json!({ "add": ["c10"] })).await;
    assert_eq!(wait_exact(&env, &remote, "laptop").await, 104);

    // The set narrows to Albany: its 10, X and the four others.
    let (status, body) = env.api.patch("/v1/sets/ny", &json!({ "query": "state = NY and city = Albany" })).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(wait_exact(&env, &remote, "laptop").await, 15);
    assert!(remote.remote.store().get(Kind::Contact, "c10").unwrap().is_some(), "X stays: it is subscribed");
    assert!(remote.remote.store().get(Kind::Contact, "c20").unwrap().is_none(), "a Buffalo contact left");

    // The record manager makes one subscribed Connecticut contact private: 14.
    let (status, _) = env.api.patch("/v1/contacts/c2", &json!({ "access": "private" })).await;
    assert_eq!(status, 200);
    assert_eq!(wait_exact(&env, &remote, "laptop").await, 14);

    // What cannot be subscribed, and what cannot be removed, say why.
    let (status, body) = env.api.post("/v1/remotes/laptop/subscriptions", &json!({ "add": ["c1"] })).await;
    assert_eq!(status, 400);
    assert!(body["error"].as_str().unwrap().contains("not accessible"), "{body}");
    let (status, body) = env.api.post("/v1/remotes/laptop/subscriptions", &json!({ "remove": ["c100"] })).await;
    assert_eq!(status, 400);
    assert!(body["error"].as_str().unwrap().contains("only contacts added through the list"), "{body}");
    // Removing X from the list: it is not in Albany, so it leaves.
    env.api.post("/v1/remotes/laptop/subscriptions", &json!({ "remove": ["c10"] })).await;
    assert_eq!(wait_exact(&env, &remote, "laptop").await, 13);

    // A rebuilt remote holds the same.
    let before = snapshot(remote.remote.store());
    remote.remote.rebuild().await.unwrap();
    crate::harness::wait_for("the rebuild", Duration::from_secs(30), || async {
        remote.remote.state().rebuilding.is_none() && snapshot(remote.remote.store()) == before
    })
    .await;
    remote.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_contact_moving_in_and_out_brings_and_takes_its_children() {
    let env = Env::start().await;
    env.api.create(Kind::User, json!({ "id": "rep", "name": "Rep" })).await;
    env.api.create(Kind::Group, json!({ "id": "g1", "name": "VIP" })).await;
    env.main()
        .create_set(&SetRequest {
            name: "ny".into(),
            users: vec!["rep".into()],
            query: Some("state = NY".into()),
            ..Default::default()
        })
        .await
        .unwrap();
    let remote = env.remote("laptop", "ny").await;
    env.api.create(Kind::Contact, json!({ "id": "c1", "state": "CT" })).await;
    for (kind, body) in [
        (Kind::Note, json!({ "id": "n1", "contact_id": "c1", "text": "one" })),
        (Kind::Note, json!({ "id": "n2", "contact_id": "c1", "text": "two" })),
        (Kind::History, json!({ "id": "h1", "contact_id": "c1", "type": "call" })),
        (Kind::Activity, json!({ "id": "a1", "contact_id": "c1", "type": "meeting" })),
        (Kind::Membership, json!({ "id": "m1", "contact_id": "c1", "group_id": "g1" })),
    ] {
        env.api.create(kind, body).await;
    }
    wait_exact(&env, &remote, "laptop").await;
    assert!(remote.remote.store().get(Kind::Note, "n1").unwrap().is_none());

    env.api.patch("/v1/contacts/c1", &json!({ "state": "NY" })).await;
    wait_exact(&env, &remote, "laptop").await;
    for (kind, id) in [
        (Kind::Contact, "c1"),
        (Kind::Note, "n1"),
        (Kind::Note, "n2"),
        (Kind::History, "h1"),
        (Kind::Activity, "a1"),
        (Kind::Membership, "m1"),
    ] {
        assert!(remote.remote.store().get(kind, id).unwrap().is_some(), "{kind} {id} came with its contact");
    }
    env.api.patch("/v1/contacts/c1", &json!({ "state": "PA" })).await;
    wait_exact(&env, &remote, "laptop").await;
    let held = snapshot(remote.remote.store());
    assert!(held.keys().all(|(k, _)| matches!(k, Kind::User | Kind::Group)), "no orphan is left: {:?}", held.keys());
    // And back again, then deleted: everything goes.
    env.api.patch("/v1/contacts/c1", &json!({ "state": "NY" })).await;
    wait_exact(&env, &remote, "laptop").await;
    env.api.delete("/v1/contacts/c1").await;
    wait_exact(&env, &remote, "laptop").await;
    assert_eq!(contacts_at(&remote), 0);
    assert_eq!(remote.remote.store().counts().unwrap()[&Kind::Note], 0);
    remote.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_remote_of_another_set_never_receives_a_record_outside_it() {
    let env = Env::start().await;
    scenario_data(&env).await;
    for (name, query) in [("ny", "state = NY"), ("ct", "state = CT")] {
        env.main()
            .create_set(&SetRequest {
                name: name.into(),
                users: vec!["rep".into()],
                query: Some(query.into()),
                ..Default::default()
            })
            .await
            .unwrap();
    }
    let ny = env.remote("ny-laptop", "ny").await;
    let ct = env.remote("ct-laptop", "ct").await;
    // Moves in and out of New York while the CT remote watches.
    for i in (0..200).step_by(10) {
        env.api.patch(&format!("/v1/contacts/c{i}"), &json!({ "city": "Troy" })).await;
    }
    env.api.patch("/v1/contacts/c20", &json!({ "state": "CT" })).await;
    wait_exact(&env, &ny, "ny-laptop").await;
    wait_exact(&env, &ct, "ct-laptop").await;
    // Everything the CT remote's consumer could ever read is on its own subjects, and every
    // contact among it is (or was, in a leave) a Connecticut contact.
    let nats = env.main_nats().await;
    let stream = nats.js.get_stream(crmsync::wire::SYNC_STREAM).await.unwrap();
    let last = nats.last_sequence(crmsync::wire::SYNC_STREAM).await.unwrap();
    let mut seen = BTreeSet::new();
    for seq in 1..=last {
        let Ok(m) = stream.get_raw_message(seq).await else { continue };
        if !m.subject.starts_with("crm.sync.ct.") {
            continue;
        }
        let env_msg = crmsync::wire::Envelope::decode(&m.payload).unwrap();
        if env_msg.kind == Kind::Contact && env_msg.op == crmsync::wire::Op::Upsert {
            let state = crmsync::model::text(env_msg.record.as_ref().unwrap(), "state").unwrap().to_owned();
            assert_eq!(state, "CT", "{} reached the CT set", env_msg.id);
            seen.insert(env_msg.id);
        }
    }
    assert!(seen.contains("c20"), "the contact that moved to CT reached the CT set");
    for (kind, id) in snapshot(ct.remote.store()).keys() {
        if *kind == Kind::Contact {
            let c = ct.remote.store().get(Kind::Contact, id).unwrap().unwrap();
            assert_eq!(crmsync::model::text(&c.fields, "state"), Some("CT"));
        }
    }
    ny.stop().await;
    ct.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sets_are_checked_and_a_set_in_use_cannot_be_deleted() {
    let env = Env::start().await;
    env.api.create(Kind::User, json!({ "id": "rep", "name": "Rep" })).await;
    let cases = [
        (json!({ "name": "s1" }), "give one of them"),
        (json!({ "name": "s1", "users": ["nobody"] }), "no user with id \"nobody\""),
        (json!({ "name": "s1", "users": ["rep"], "query": "state = " }), "the query does not parse: at 9"),
        (json!({ "name": "s1", "all": true, "users": ["rep"] }), "takes no users"),
    ];
    for (body, want) in cases {
        let (status, resp) = env.api.post("/v1/sets", &body).await;
        assert!((400..500).contains(&status), "{body}: {resp}");
        assert!(resp["error"].as_str().unwrap().contains(want), "{body}: {resp}");
    }
    let (status, _) = env.api.post("/v1/sets", &json!({ "name": "s1", "users": ["rep"], "query": "state = NY" })).await;
    assert_eq!(status, 201);
    let (status, copy) = env.api.post("/v1/sets/s1/copy", &json!({ "name": "s2" })).await;
    assert_eq!(status, 201);
    assert_eq!(copy["query"], "state = NY");
    let _remote = env.init_remote("laptop", "s1").await;
    let (status, body) = env.api.delete("/v1/sets/s1").await;
    assert_eq!(status, 409);
    assert!(body["error"].as_str().unwrap().contains("used by remote laptop"), "{body}");
    let (status, _) = env.api.delete("/v1/sets/s2").await;
    assert_eq!(status, 200);
    let (status, _) = env.api.get("/v1/sets/s2").await;
    assert_eq!(status, 404);
}

/// One random change in the property test.
#[derive(Debug, Clone)]
enum Change {
    Contact { i: usize, state: &'static str, city: &'static str },
    Access { i: usize, access: &'static str },
    Manager { i: usize, manager: &'static str },
    RepTeams { east: bool },
    Query(Option<&'static str>),
    Users { boss_too: bool },
    Subscribe(usize),
    Unsubscribe(usize),
    Note(usize),
    Delete(usize),
}

fn change() -> impl proptest::strategy::Strategy<Value = Change> {
    use proptest::prelude::*;
    let i = 0..12usize;
    prop_oneof![
        (i.clone(), prop::sample::select(vec!["NY", "CT", "PA"]), prop::sample::select(vec!["Albany", "Buffalo"]))
            .prop_map(|(i, state, city)| Change::Contact { i, state, city }),
        (i.clone(), prop::sample::select(vec!["public", "private", "limited"]))
            .prop_map(|(i, access)| Change::Access { i, access }),
        (i.clone(), prop::sample::select(vec!["rep", "boss"])).prop_map(|(i, manager)| Change::Manager { i, manager }),
        any::<bool>().prop_map(|east| Change::RepTeams { east }),
        prop::sample::select(vec![
            None,
            Some("state = NY"),
            Some("state = NY and city = Albany"),
            Some("state in (NY, CT)")
        ])
        .prop_map(Change::Query),
        any::<bool>().prop_map(|boss_too| Change::Users { boss_too }),
        i.clone().prop_map(Change::Subscribe),
        i.clone().prop_map(Change::Unsubscribe),
        i.clone().prop_map(Change::Note),
        i.prop_map(Change::Delete),
    ]
}

async fn apply_change(env: &Env, c: &Change) {
    let api = &env.api;
    // Refusals (a contact already deleted, not accessible, not listed) are part of the game.
    match c {
        Change::Contact { i, state, city } => {
            api.patch(&format!("/v1/contacts/c{i}"), &json!({ "state": state, "city": city })).await;
        }
        Change::Access { i, access } => {
            api.patch(&format!("/v1/contacts/c{i}"), &json!({ "access": access, "access_teams": ["east"] })).await;
        }
        Change::Manager { i, manager } => {
            api.patch(&format!("/v1/contacts/c{i}"), &json!({ "manager": manager })).await;
        }
        Change::RepTeams { east } => {
            let teams: Vec<&str> = if *east { vec!["east"] } else { vec![] };
            api.patch("/v1/users/rep", &json!({ "teams": teams })).await;
        }
        Change::Query(q) => {
            api.patch("/v1/sets/ny", &json!({ "query": q })).await;
        }
        Change::Users { boss_too } => {
            let users: Vec<&str> = if *boss_too { vec!["rep", "boss"] } else { vec!["rep"] };
            api.patch("/v1/sets/ny", &json!({ "users": users })).await;
        }
        Change::Subscribe(i) => {
            api.post("/v1/remotes/laptop/subscriptions", &json!({ "add": [format!("c{i}")] })).await;
        }
        Change::Unsubscribe(i) => {
            api.post("/v1/remotes/laptop/subscriptions", &json!({ "remove": [format!("c{i}")] })).await;
        }
        Change::Note(i) => {
            api.post("/v1/notes", &json!({ "contact_id": format!("c{i}"), "text": "note" })).await;
        }
        Change::Delete(i) => {
            api.delete(&format!("/v1/contacts/c{i}")).await;
        }
    }
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig { cases: 12, failure_persistence: None, ..Default::default() })]

    /// Random edits, access changes, set edits and subscription changes: the remote holds
    /// exactly what the main's evaluation says, and a remote rebuilt from scratch the same.
    #[test]
    fn a_remote_holds_exactly_what_the_main_says_after_any_changes(changes in proptest::collection::vec(change(), 1..30)) {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        rt.block_on(async {
            let env = Env::start().await;
            env.api.create(Kind::Team, json!({ "id": "east", "name": "East" })).await;
            env.api.create(Kind::User, json!({ "id": "rep", "name": "Rep" })).await;
            env.api.create(Kind::User, json!({ "id": "boss", "name": "Boss", "teams": ["east"] })).await;
            for i in 0..12 {
                let state = ["NY", "CT", "PA"][i % 3];
                env.api.create(Kind::Contact, json!({ "id": format!("c{i}"), "state": state, "manager": "boss" })).await;
            }
            env.main()
                .create_set(&SetRequest { name: "ny".into(), users: vec!["rep".into()], query: Some("state = NY".into()), ..Default::default() })
                .await
                .unwrap();
            let remote = env.remote("laptop", "ny").await;
            for c in &changes {
                apply_change(&env, c).await;
            }
            wait_exact(&env, &remote, "laptop").await;
            let before = snapshot(remote.remote.store());
            remote.remote.rebuild().await.unwrap();
            crate::harness::wait_for("the rebuild", Duration::from_secs(30), || async {
                remote.remote.state().rebuilding.is_none()
            })
            .await;
            wait_exact(&env, &remote, "laptop").await;
            assert_eq!(snapshot(remote.remote.store()), before);
            remote.stop().await;
        });
    }
}

/// The set, subscription and record commands of the command line, as an administrator runs
/// them against the main.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_command_line_manages_sets_subscriptions_and_records() {
    use crate::harness::cli;
    let env = Env::start().await;
    let api = &env.api;
    let ok = |(code, out, err): (i32, String, String)| {
        assert_eq!(code, 0, "{err}");
        out
    };
    ok(cli(api, &["user", "add", "id=ann", "name=Ann"]).await);
    for (id, state) in [("c1", "NY"), ("c2", "CT"), ("c3", "NY")] {
        ok(cli(api, &["contact", "add", &format!("id={id}"), "last_name=Tester", &format!("state={state}")]).await);
    }
    ok(cli(api, &["set", "create", "ny", "--users", "ann", "--query", "state = NY"]).await);
    let preview: serde_json::Value =
        serde_json::from_str(&ok(cli(api, &["--json", "set", "preview", "ny"]).await)).unwrap();
    assert_eq!(preview["contacts"], 2, "{preview}");
    ok(cli(api, &["set", "edit", "ny", "--no-query"]).await);
    let shown = ok(cli(api, &["--json", "set", "show", "ny"]).await);
    assert!(!shown.contains("state = NY"), "the query is gone: {shown}");
    ok(cli(api, &["set", "copy", "ny", "ny2"]).await);
    ok(cli(api, &["set", "delete", "ny2"]).await);
    assert_eq!(api.get("/v1/sets/ny2").await.0, 404);

    // A remote on the set, its subscription list, its page.
    ok(cli(api, &["set", "edit", "ny", "--query", "state = NY"]).await);
    let bundle = env.dir.path().join("laptop.bundle.json");
    ok(cli(api, &["remote", "create", "laptop", "--set", "ny", "--out", bundle.to_str().unwrap()]).await);
    ok(cli(api, &["subscription", "add", "--remote", "laptop", "c2"]).await);
    assert!(ok(cli(api, &["subscription", "list", "--remote", "laptop"]).await).contains("c2"));
    ok(cli(api, &["subscription", "remove", "--remote", "laptop", "c2"]).await);
    assert!(!ok(cli(api, &["subscription", "list", "--remote", "laptop"]).await).contains("c2"));
    let remote: serde_json::Value =
        serde_json::from_str(&ok(cli(api, &["--json", "remote", "show", "laptop"]).await)).unwrap();
    assert_eq!((remote["set"].as_str(), remote["state"].as_str()), (Some("ny"), Some("active")), "{remote}");

    // Records: list with a filter, delete.
    let listed = ok(cli(api, &["--json", "contact", "list", "state=NY"]).await);
    let listed: serde_json::Value = serde_json::from_str(&listed).unwrap();
    assert_eq!(listed["items"].as_array().map(Vec::len), Some(2), "{listed}");
    ok(cli(api, &["contact", "delete", "c3"]).await);
    assert_eq!(api.get("/v1/contacts/c3").await.0, 404);
}

/// `crmsync main rebuild`: the main's projection, rebuilt from CRM_EVENTS with the service
/// stopped, holds what it held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn main_rebuild_restores_the_projection_from_the_stream() {
    let mut env = Env::start().await;
    env.create_all_set("everyone").await;
    crate::harness::seed_contacts(env.main(), 40, "c").await;
    let before = snapshot(env.main().store());
    env.stop_main().await;
    let config = env.main_config();
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_crmsync"))
        .args(["main", "rebuild", "--nats", &config.nats_url, "--data", config.data_dir.to_str().unwrap()])
        .output()
        .await
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("rebuilt the main's projection"));
    env.restart_main().await;
    assert_eq!(snapshot(env.main().store()), before);
}
