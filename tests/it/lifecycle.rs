//! The remote lifecycle an administrator runs at the main: halt, resume, delete.

use std::time::Duration;

use crmsync::main_service::RemoteRequest;
use crmsync::model::Kind;
use serde_json::{Value as J, json};

use crate::harness::{Env, cli, seed_contacts, wait_converged, wait_for};

fn city(store: &crmsync::store::Store, id: &str) -> Option<String> {
    let record = store.get(Kind::Contact, id).unwrap()?;
    crmsync::model::text(&record.fields, "city").map(str::to_owned)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_halted_remote_receives_nothing_and_its_uploads_wait_until_it_is_resumed() {
    let env = Env::start().await;
    env.create_all_set("everyone").await;
    let laptop = env.remote("laptop", "everyone").await;
    let branch = env.remote("branch", "everyone").await;
    seed_contacts(env.main(), 6, "c").await;
    wait_converged(env.main(), laptop.remote.store()).await;

    let (code, out, err) = cli(&env.api, &["--json", "remote", "halt", "laptop"]).await;
    assert_eq!(code, 0, "{err}");
    let shown: J = serde_json::from_str(&out).unwrap();
    assert_eq!(shown["state"], "halted", "{shown}");

    // A change at the main reaches the other remote, not the halted one.
    env.main().update(Kind::Contact, "c0", &json!({ "city": "Troy" })).await.unwrap();
    wait_for("the other remote gets the main's change", Duration::from_secs(30), || async {
        city(branch.remote.store(), "c0").as_deref() == Some("Troy")
    })
    .await;
    // An edit at the halted remote leaves it (CRM_UP has it) and waits at the main.
    let (status, body) = laptop.api.patch("/v1/contacts/c1", &json!({ "city": "Utica" })).await;
    assert_eq!(status, 200, "{body}");
    wait_for("the main keeps the halted remote's upload", Duration::from_secs(30), || async {
        env.api.status().await["uploads_parked"] == 1 && laptop.api.status().await["uploads"]["waiting"] == 0
    })
    .await;
    let (_, shown) = env.api.get("/v1/remotes/laptop").await;
    assert_eq!((shown["state"].as_str(), shown["backlog"].as_u64()), (Some("halted"), Some(1)), "{shown}");
    assert_eq!(shown["uploads_waiting"], 1, "kept at the main: {shown}");
    let status = laptop.api.status().await;
    assert_eq!(status["halted"], true, "{status}");
    assert!(status["notice"].as_str().unwrap().contains("halted at the main"), "{status}");
    assert_eq!(city(laptop.remote.store(), "c0").as_deref(), Some("Albany"), "the halted remote received nothing");
    assert_eq!(city(env.main().store(), "c1").as_deref(), Some("Albany"), "its upload was not merged");
    let (_, list) = env.api.get("/v1/remotes").await;
    let states: Vec<(&str, &str)> = list["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["id"].as_str().unwrap(), r["state"].as_str().unwrap()))
        .collect();
    assert_eq!(states, [("branch", "active"), ("laptop", "halted")]);

    // Resumed: both ways flow, nothing lost.
    let (code, out, err) = cli(&env.api, &["remote", "resume", "laptop"]).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("active"), "{out}");
    for (what, store) in [("the main", env.main().store()), ("the other remote", branch.remote.store())] {
        wait_for(&format!("{what} gets the resumed remote's edit"), Duration::from_secs(30), || async {
            city(store, "c1").as_deref() == Some("Utica")
        })
        .await;
    }
    wait_converged(env.main(), laptop.remote.store()).await;
    assert_eq!(env.api.status().await["uploads_parked"], 0);
    let status = laptop.api.status().await;
    assert_eq!((status["halted"].as_bool(), status["notice"].is_null()), (Some(false), true), "{status}");
    laptop.stop().await;
    branch.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_remote_loses_its_consumer_and_its_name_can_be_used_again() {
    let env = Env::start().await;
    env.create_all_set("everyone").await;
    let laptop = env.remote("laptop", "everyone").await;
    seed_contacts(env.main(), 3, "c").await;
    wait_converged(env.main(), laptop.remote.store()).await;

    let (code, out, err) = cli(&env.api, &["remote", "delete", "laptop"]).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("deleted remote laptop"), "{out}");
    // The copy still running stops syncing, saying why (`remote serve` exits with it).
    let stopped = tokio::time::timeout(Duration::from_secs(30), laptop.remote.stopped()).await.unwrap();
    assert!(stopped.unwrap_err().contains("deleted or re-created at the main"));
    laptop.stop().await;
    // The server no longer has its consumer; the main no longer knows it.
    let nats = env.main_nats().await;
    let stream = nats.js.get_stream("CRM_SYNC").await.unwrap();
    assert!(
        stream
            .get_consumer::<async_nats::jetstream::consumer::pull::Config>(&crmsync::bundle::consumer_name("laptop"))
            .await
            .is_err()
    );
    assert_eq!(env.api.get("/v1/remotes/laptop").await.0, 404);
    let (code, _, err) = cli(&env.api, &["remote", "delete", "laptop"]).await;
    assert_ne!(code, 0);
    assert!(err.contains("no remote"), "{err}");

    // The name is free again: a new remote of that name syncs from scratch.
    let request = RemoteRequest { name: "laptop".into(), set: "everyone".into(), ..Default::default() };
    let bundle = env.main().create_remote(&request).await.unwrap();
    let bundle_file = env.dir.path().join("again.bundle.json");
    std::fs::write(&bundle_file, serde_json::to_vec(&bundle).unwrap()).unwrap();
    let again = env.dir.path().join("again");
    crmsync::remote_service::init(&bundle_file, &again).unwrap();
    let laptop = env.start_remote(&again).await;
    wait_converged(env.main(), laptop.remote.store()).await;
    laptop.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn while_the_main_does_not_accept_syncs_uploads_wait_in_crm_up_also_across_a_restart() {
    let mut env = Env::start().await;
    env.create_all_set("everyone").await;
    let laptop = env.remote("laptop", "everyone").await;
    seed_contacts(env.main(), 3, "c").await;
    wait_converged(env.main(), laptop.remote.store()).await;
    assert_eq!(env.api.status().await["accepting_syncs"], true);

    let (code, out, err) = cli(&env.api, &["main", "accept-syncs", "off"]).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("does not accept"), "{out}");
    let (status, body) = laptop.api.patch("/v1/contacts/c1", &json!({ "city": "Utica" })).await;
    assert_eq!(status, 200, "{body}");
    wait_for("the upload waits in CRM_UP", Duration::from_secs(30), || async {
        let status = env.api.status().await;
        status["uploads_waiting"] == 1 && status["accepting_syncs"] == false
    })
    .await;
    let status = laptop.api.status().await;
    assert_eq!(status["main_accepting_syncs"], false, "{status}");
    assert!(status["notice"].as_str().unwrap().contains("not accepting synchronizations"), "{status}");
    // Remotes still receive the main's changes meanwhile.
    env.main().update(Kind::Contact, "c2", &json!({ "city": "Troy" })).await.unwrap();
    wait_for("the main's change reaches the remote", Duration::from_secs(30), || async {
        city(laptop.remote.store(), "c2").as_deref() == Some("Troy")
    })
    .await;
    let (_, list) = env.api.get("/v1/remotes").await;
    assert_eq!(list["items"][0]["uploads_waiting"], 1, "waiting in CRM_UP: {list}");
    // The setting is the server's: a restarted main still does not merge.
    env.stop_main().await;
    env.restart_main().await;
    assert_eq!(env.api.status().await["accepting_syncs"], false);
    assert_eq!(city(env.main().store(), "c1").as_deref(), Some("Albany"), "nothing was merged");

    let (code, out, err) = cli(&env.api, &["--json", "main", "accept-syncs", "on"]).await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(serde_json::from_str::<J>(&out).unwrap()["accepting_syncs"], true, "{out}");
    wait_for("the upload is merged", Duration::from_secs(30), || async {
        city(env.main().store(), "c1").as_deref() == Some("Utica")
    })
    .await;
    assert_eq!(env.api.status().await["uploads_waiting"], 0);
    laptop.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_once_uploads_what_waits_catches_up_to_the_head_and_exits_with_a_summary() {
    let env = Env::start().await;
    env.create_all_set("everyone").await;
    let dir = env.init_remote("laptop", "everyone").await;
    // The laptop works cut off from NATS (an address where nothing listens) and makes edits.
    let port = crmsync::natsd::free_port();
    let nowhere = format!("nats://127.0.0.1:{}", crmsync::natsd::free_port());
    let listen = format!("127.0.0.1:{port}");
    let mut offline =
        crate::harness::crmsync_process(&["remote", "serve", "--listen", &listen, "--nats", &nowhere, "--data"], &dir);
    let api = env.api_at(format!("http://{listen}"));
    crate::harness::wait_for_status(&api, |s| s["nats"]["connected"] == false).await;
    for i in 0..20 {
        let (status, body) = api.post("/v1/contacts", &json!({ "id": format!("made{i}"), "last_name": "Here" })).await;
        assert_eq!(status, 201, "{body}");
    }
    crate::harness::stop(&mut offline, crate::harness::Stop::Term).await;
    // Meanwhile the main has a backlog of 10,000 changes for it.
    seed_contacts(env.main(), 10_000, "c").await;

    let (code, out, err) =
        cli(&env.api, &["--json", "remote", "sync", "--once", "--data", dir.to_str().unwrap()]).await;
    assert_eq!(code, 0, "{err}");
    let summary: J = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert_eq!((summary["sent"].as_u64(), summary["refused"].as_u64()), (Some(20), Some(0)), "{summary}");
    assert_eq!(summary["unanswered"], 0, "{summary}");
    assert!(summary["received"].as_u64().unwrap() >= 10_020, "{summary}");
    // Once it exits, the remote holds what the main holds, its own edits merged there.
    let store = crmsync::store::Store::open(&dir.join("remote.redb")).unwrap();
    assert_eq!(crate::harness::snapshot(&store), crate::harness::snapshot(env.main().store()));
    assert!(env.main().store().get(Kind::Contact, "made19").unwrap().is_some());
    assert_eq!(store.uploads_len().unwrap(), 0);
    // The session is a line of the remote's log, and reached the main's.
    let sessions = store.sessions(None, 10).unwrap();
    let session = sessions.last().unwrap();
    assert_eq!((session.mode.as_str(), session.sent, session.refused), ("once", 20, 0), "{sessions:?}");
    assert!(session.received >= 10_020, "{session:?}");
    wait_for("the main logs the session", Duration::from_secs(20), || async {
        env.main().sessions(Some("laptop"), 10).unwrap().iter().any(|s| s.id == session.id)
    })
    .await;

    // Without NATS it says so and fails, keeping what waits.
    drop(store);
    let (code, _, err) = cli(
        &env.api,
        &["remote", "sync", "--once", "--timeout", "2", "--nats", &nowhere, "--data", dir.to_str().unwrap()],
    )
    .await;
    assert_eq!(code, 1);
    assert!(err.contains("could not be reached"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remote_init_refuses_a_bundle_of_another_version_naming_both() {
    let env = Env::start().await;
    env.create_all_set("everyone").await;
    let request = RemoteRequest { name: "laptop".into(), set: "everyone".into(), ..Default::default() };
    let mut bundle = serde_json::to_value(env.main().create_remote(&request).await.unwrap()).unwrap();
    bundle["schema"] = json!(crmsync::wire::SCHEMA_MAJOR + 1);
    let file = env.dir.path().join("future.bundle.json");
    std::fs::write(&file, bundle.to_string()).unwrap();
    let data = env.dir.path().join("laptop");
    let (code, _, err) =
        cli(&env.api, &["remote", "init", "--bundle", file.to_str().unwrap(), "--data", data.to_str().unwrap()]).await;
    assert_eq!(code, 1, "{err}");
    let (theirs, ours) = (crmsync::wire::SCHEMA_MAJOR + 1, crmsync::wire::SCHEMA_MAJOR);
    assert!(err.contains(&format!("schema {theirs}")) && err.contains(&format!("schema {ours}")), "{err}");
    assert!(!data.join("remote.redb").exists(), "nothing was set up");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recreated_remote_gets_a_new_bundle_and_the_old_copy_stops_syncing() {
    let env = Env::start().await;
    env.create_all_set("everyone").await;
    let old = env.remote("laptop", "everyone").await;
    seed_contacts(env.main(), 3, "c").await;
    wait_converged(env.main(), old.remote.store()).await;

    let file = env.dir.path().join("new.bundle.json");
    let (code, out, err) = cli(&env.api, &["remote", "recreate", "laptop", "--out", file.to_str().unwrap()]).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("re-created"), "{out}");
    let bundle: J = serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();
    assert_ne!(bundle["consumer"], json!(old.remote.bundle().consumer), "{bundle}");

    // The old copy's edit is not merged, and the main keeps why.
    let (status, body) = old.api.patch("/v1/contacts/c1", &json!({ "city": "Stale" })).await;
    assert_eq!(status, 200, "{body}");
    wait_for("the main logs the old copy's upload", Duration::from_secs(30), || async {
        let log = env.api.status().await["sync_log"].to_string();
        log.contains("re-created")
    })
    .await;
    assert_eq!(city(env.main().store(), "c1").as_deref(), Some("Albany"));

    // A copy set up from the new bundle syncs; the old one receives nothing more.
    let dir = env.dir.path().join("new-laptop");
    crmsync::remote_service::init(&file, &dir).unwrap();
    let new = env.start_remote(&dir).await;
    env.main().update(Kind::Contact, "c2", &json!({ "city": "Troy" })).await.unwrap();
    wait_converged(env.main(), new.remote.store()).await;
    assert_eq!(city(new.remote.store(), "c2").as_deref(), Some("Troy"));
    assert_eq!(new.api.status().await["refused"], 0, "the old copy's refusal does not reach the new one");
    assert_eq!(city(old.remote.store(), "c2").as_deref(), Some("Albany"), "the old copy can no longer pull");
    wait_for("the old copy says it no longer syncs", Duration::from_secs(30), || async {
        old.api.status().await["error"].as_str().is_some_and(|e| e.contains("deleted or re-created at the main"))
    })
    .await;
    old.stop().await;
    new.stop().await;
}
