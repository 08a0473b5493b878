//! Crashes and outages: a remote killed mid catch-up, nats-server restarted under load.

use std::time::{Duration, Instant};

use crmsync::model::Kind;
use crmsync::store::Store;
use serde_json::json;

use crate::harness::{
    Api, Env, Stop, main_process, remote_process, seed_contacts, snapshot, stop, wait_converged, wait_for_status,
};

async fn contacts_at(api: &Api) -> Option<u64> {
    let resp = crate::harness::http_client()
        .get(format!("{}/v1/status", api.base))
        .bearer_auth(api.token.as_deref().unwrap_or_default())
        .send()
        .await
        .ok()?;
    let body: serde_json::Value = resp.json().await.ok()?;
    body["counts"]["contact"].as_u64()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_remote_killed_in_the_middle_of_a_catch_up_resumes_with_exactly_the_mains_records() {
    let env = Env::start().await;
    env.create_all_set("everyone").await;
    let dir = env.init_remote("laptop", "everyone").await;
    const N: u64 = 3000;
    seed_contacts(env.main(), N as usize, "c").await;
    for i in 0..200 {
        env.main().update(Kind::Contact, &format!("c{i}"), &json!({ "city": "Troy" })).await.unwrap();
    }

    // Small batches, so the catch-up takes many transactions and the kill lands inside it.
    let port = crmsync::natsd::free_port();
    let api = env.api_at(format!("http://127.0.0.1:{port}"));
    let mut child = remote_process(&dir, port, 20);
    let start = Instant::now();
    let seen = loop {
        if let Some(n) = contacts_at(&api).await
            && n > 0
        {
            break n;
        }
        assert!(start.elapsed() < Duration::from_secs(30), "the remote never started applying");
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    child.start_kill().unwrap(); // SIGKILL
    child.wait().await.unwrap();
    let held = Store::open(&dir.join("remote.redb")).unwrap().counts().unwrap()[&Kind::Contact];
    assert!(held < N, "the kill came after the catch-up ended ({held} of {N} held, {seen} seen)");

    let mut child = remote_process(&dir, port, 200);
    let start = Instant::now();
    loop {
        let n = contacts_at(&api).await;
        if n == Some(N) {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(60), "the restarted remote holds {n:?} of {N} contacts");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Stopped gently: after a kill the file may hold a little less, which the next start
    // replays from the stream (the kill that matters came during the catch-up).
    stop(&mut child, Stop::Term).await;
    // Exactly the main's records: none missing, none doubled, every field the main's.
    let store = Store::open(&dir.join("remote.redb")).unwrap();
    assert_eq!(snapshot(&store), snapshot(env.main().store()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_restarted_under_main_and_remote_loses_no_acknowledged_write() {
    let mut env = Env::start().await;
    env.create_all_set("everyone").await;
    let remote = env.remote("laptop", "everyone").await;
    let mut acknowledged = Vec::new();
    for i in 0..30 {
        acknowledged.push(env.api.create(Kind::Contact, json!({ "id": format!("before{i}") })).await);
    }

    let nats = &mut env.nats;
    tokio::task::block_in_place(|| nats.stop());
    // While NATS is down the main refuses writes with a clear error rather than losing them.
    let (status, body) = env.api.post("/v1/contacts", &json!({ "id": "during" })).await;
    assert_eq!(status, 503, "{body}");
    assert!(body["error"].as_str().unwrap().contains("NATS"), "{body}");
    let nats = &mut env.nats;
    tokio::task::block_in_place(|| nats.restart()).unwrap();

    // Both reconnect by themselves: writes go through again and reach the remote.
    let start = Instant::now();
    let mut i = 0;
    while i < 30 {
        let (status, body) = env.api.post("/v1/contacts", &json!({ "id": format!("after{i}") })).await;
        match status {
            201 => {
                acknowledged.push(body["id"].as_str().unwrap().to_owned());
                i += 1;
            }
            // A write refused during the reconnect was not acknowledged; try again.
            409 | 503 => tokio::time::sleep(Duration::from_millis(100)).await,
            other => panic!("unexpected {other}: {body}"),
        }
        assert!(start.elapsed() < Duration::from_secs(60), "the main did not recover: {body}");
    }
    wait_converged(env.main(), remote.remote.store()).await;
    for id in &acknowledged {
        assert!(env.main().store().get(Kind::Contact, id).unwrap().is_some(), "{id} lost at the main");
        assert!(remote.remote.store().get(Kind::Contact, id).unwrap().is_some(), "{id} lost at the remote");
    }
    let status = remote.api.status().await;
    assert_eq!(status["nats"]["connected"], true);
    assert!(status["error"].is_null(), "{status}");
    remote.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routing_survives_a_main_killed_between_commit_and_publish() {
    use crmsync::wire::{EVENTS_STREAM, SYNC_STREAM};
    let mut env = Env::start().await;
    env.create_all_set("everyone").await;
    let remote_dir = env.init_remote("laptop", "everyone").await;
    env.stop_main().await;
    let data = env.main_config().data_dir;
    let port = crmsync::natsd::free_port();
    let api = env.api_at(format!("http://127.0.0.1:{port}"));
    let mut main = main_process(&env.nats.url(), &data, port);
    let start = Instant::now();
    while reqwest::get(format!("{}/v1/status", api.base)).await.is_err() {
        assert!(start.elapsed() < Duration::from_secs(20), "the main did not start");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Writers keep going while the main is killed under them.
    let writers: Vec<_> = (0..8)
        .map(|w| {
            let api = api.clone();
            tokio::spawn(async move {
                let mut acknowledged = Vec::new();
                for i in 0.. {
                    let id = format!("w{w}-{i}");
                    let resp = crate::harness::http_client()
                        .post(format!("{}/v1/contacts", api.base))
                        .bearer_auth(api.token.as_deref().unwrap_or_default())
                        .json(&json!({ "id": id, "city": "Albany" }))
                        .send()
                        .await;
                    match resp {
                        Ok(r) if r.status().as_u16() == 201 => acknowledged.push(id),
                        _ => break,
                    }
                }
                acknowledged
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    main.start_kill().unwrap(); // SIGKILL, wherever it is: mid-commit, mid-projection, mid-routing
    main.wait().await.unwrap();
    let mut acknowledged = Vec::new();
    for w in writers {
        acknowledged.extend(w.await.unwrap());
    }
    assert!(acknowledged.len() > 50, "only {} writes before the kill", acknowledged.len());

    let mut main = main_process(&env.nats.url(), &data, port);
    let nats = env.main_nats().await;
    wait_for_status(&api, |s| s["outbox"] == 0 && s["backlog"] == 0).await;
    // A graceful stop, so its file holds all it applied (after a SIGKILL it holds a prefix,
    // which the next start replays from the stream).
    stop(&mut main, Stop::Term).await;

    // Every committed contact event was routed, none lost. A main killed before its
    // projection was durable routes the changes it replays again (in order, so each subject
    // ends with the newest state: the remote started below from the stream proves that).
    let events = nats.last_sequence(EVENTS_STREAM).await.unwrap();
    let routed = nats.last_sequence(SYNC_STREAM).await.unwrap();
    // Not routed: the administrator made at the first start and its token (no set held them
    // yet), the set and the remote; the set's creation routed the administrator once.
    assert!(
        routed >= events - 3,
        "{events} events (the administrator, a set, a remote, the contacts), only {routed} routed"
    );
    println!("{events} events, {routed} routed messages ({} routed again after the kill)", routed - (events - 3));
    let store = Store::open(&data.join("main.redb")).unwrap();
    for id in &acknowledged {
        assert!(store.get(Kind::Contact, id).unwrap().is_some(), "acknowledged {id} is missing");
    }
    drop(store);
    env.restart_main().await;
    let remote = env.start_remote(&remote_dir).await;
    wait_converged(env.main(), remote.remote.store()).await;
    remote.stop().await;
}
