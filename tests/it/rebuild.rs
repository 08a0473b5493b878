//! Rebuilds: a remote's from CRM_SYNC, the main's from CRM_EVENTS.

use std::time::Duration;

use crmsync::model::Kind;
use crmsync::store::Store;
use crmsync::wire::SYNC_STREAM;
use serde_json::json;

use crate::harness::{Env, seed_contacts, snapshot, wait_converged, wait_for};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebuilt_remote_equals_the_remote_before_the_rebuild() {
    let env = Env::start().await;
    env.create_all_set("everyone").await;
    let remote = env.remote("laptop", "everyone").await;
    seed_contacts(env.main(), 300, "c").await;
    // Some history: edits and deletes, so the stream holds superseded versions and tombstones.
    for i in 0..50 {
        env.main().update(Kind::Contact, &format!("c{i}"), &json!({ "city": "Troy" })).await.unwrap();
    }
    for i in 50..70 {
        env.main().delete(Kind::Contact, &format!("c{i}")).await.unwrap();
    }
    wait_converged(env.main(), remote.remote.store()).await;
    let before = snapshot(remote.remote.store());

    let (status, body) = remote.api.post("/v1/rebuild", &json!({})).await;
    assert_eq!(status, 202, "{body}");
    assert!(body["rebuilding"]["total"].as_u64().unwrap() >= 280, "{body}");
    wait_for("the rebuild to finish", Duration::from_secs(30), || async {
        let s = remote.api.status().await;
        s["rebuilding"].is_null() && !s["last_rebuild"].is_null()
    })
    .await;
    let status = remote.api.status().await;
    assert!(status["last_rebuild"]["records"].as_u64().unwrap() >= 280, "{status}");
    assert_eq!(snapshot(remote.remote.store()), before);

    // Sync goes on after a rebuild.
    env.main().update(Kind::Contact, "c1", &json!({ "city": "Utica" })).await.unwrap();
    wait_converged(env.main(), remote.remote.store()).await;
    remote.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_command_line_rebuilds_a_stopped_remote_with_a_summary() {
    let env = Env::start().await;
    env.create_all_set("everyone").await;
    let remote = env.remote("laptop", "everyone").await;
    seed_contacts(env.main(), 120, "c").await;
    wait_converged(env.main(), remote.remote.store()).await;
    let before = snapshot(remote.remote.store());
    let dir = remote.data_dir.clone();
    remote.stop().await;
    tokio::time::sleep(Duration::from_millis(200)).await;

    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_crmsync"))
        .args(["--json", "remote", "rebuild", "--data"])
        .arg(&dir)
        .output()
        .await
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(summary["records"], before.len(), "{summary}");
    assert!(summary["seconds"].as_f64().is_some());
    let store = Store::open(&dir.join("remote.redb")).unwrap();
    assert_eq!(snapshot(&store), before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_mains_projection_rebuilt_from_the_events_equals_the_one_it_replaces() {
    let mut env = Env::start().await;
    env.create_all_set("everyone").await;
    seed_contacts(env.main(), 200, "c").await;
    for i in 0..40 {
        env.main().update(Kind::Contact, &format!("c{i}"), &json!({ "state": "NJ", "zip": null })).await.unwrap();
    }
    env.main().create(Kind::Note, &json!({ "id": "n1", "contact_id": "c1", "text": "hello" })).await.unwrap();
    env.main().delete(Kind::Contact, "c2").await.unwrap();
    let before = snapshot(env.main().store());
    let sets_before = env.main().store().get(Kind::Set, "everyone").unwrap();
    wait_for("routing to finish", Duration::from_secs(20), || async { env.main().store().outbox_len().unwrap() == 0 })
        .await;
    let routed = env.main_nats().await.last_sequence(SYNC_STREAM).await.unwrap();
    env.stop_main().await;

    let events = crmsync::main_service::rebuild(&env.main_config(), |_, _| {}).await.unwrap();
    assert!(events >= 243, "replayed {events} events");

    env.restart_main().await;
    assert_eq!(snapshot(env.main().store()), before);
    assert_eq!(env.main().store().get(Kind::Set, "everyone").unwrap(), sets_before);
    // Already-routed changes are not routed again, and new ones are.
    assert_eq!(env.main().store().outbox_len().unwrap(), 0);
    assert_eq!(env.main_nats().await.last_sequence(SYNC_STREAM).await.unwrap(), routed);
    env.main().update(Kind::Contact, "c3", &json!({ "city": "Troy" })).await.unwrap();
    wait_for("the new change to be routed", Duration::from_secs(20), || async {
        env.main_nats().await.last_sequence(SYNC_STREAM).await.unwrap() == routed + 1
    })
    .await;
}
