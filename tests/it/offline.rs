//! Offline first: a remote starts, serves reads and takes edits without NATS, answers `status`
//! while cut off, stops at once on SIGTERM whatever NATS does, and syncs when NATS is back.

use std::time::{Duration, Instant};

use crmsync::model::Kind;
use crmsync::store::Store;
use serde_json::{Value as J, json};

use crate::harness::{Api, Env, Stop, remote_process, seed_contacts, stop, wait_converged, wait_for, wait_for_status};

/// A client whose every request gives up after a few seconds: a status that makes it wait
/// longer fails the test.
fn impatient() -> reqwest::Client {
    crate::harness::http_client_builder().timeout(Duration::from_secs(5)).build().unwrap()
}

/// The remote's status, asked with [`impatient`]; prints how long it took to answer.
async fn status_while_offline(api: &Api) -> J {
    let started = Instant::now();
    let resp = impatient()
        .get(format!("{}/v1/status", api.base))
        .bearer_auth(api.token.as_deref().unwrap_or_default())
        .send()
        .await;
    let status: J = resp.expect("status answers while NATS is down").json().await.unwrap();
    println!("status answered in {:.1} ms with NATS down", started.elapsed().as_secs_f64() * 1000.0);
    status
}

/// Asserts that a status says the remote is cut off, since a moment in the past, with its last
/// position and the uploads waiting.
fn assert_offline(status: &J, applied: u64, uploads_waiting: u64) {
    assert_eq!(status["nats"]["connected"], false, "{status}");
    let since = status["nats"]["offline_since_ms"].as_u64().unwrap_or_else(|| panic!("offline since: {status}"));
    assert!(since > 0 && since <= crmsync::hlc::wall_ms(), "{status}");
    assert_eq!(status["applied"], applied, "the last position applied, kept on disk: {status}");
    assert_eq!(status["uploads"]["waiting"], uploads_waiting, "{status}");
    assert!(status["backlog"].is_null(), "a figure only NATS knows is unknown: {status}");
}

fn contact_ids(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}{i}")).collect()
}

/// Waits until a store holds each of these contacts.
async fn wait_for_contacts(what: &str, store: &Store, ids: &[String]) {
    wait_for(what, Duration::from_secs(60), || async {
        ids.iter().all(|id| store.get(Kind::Contact, id).unwrap().is_some())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_remote_started_with_nats_down_serves_reads_takes_edits_and_syncs_when_nats_returns() {
    let mut env = Env::start().await;
    env.create_all_set("everyone").await;
    seed_contacts(env.main(), 20, "c").await;
    let branch = env.remote("branch", "everyone").await;
    // The laptop syncs once, and is stopped.
    let dir = env.init_remote("laptop", "everyone").await;
    let laptop = env.start_remote(&dir).await;
    wait_converged(env.main(), laptop.remote.store()).await;
    let applied = laptop.remote.store().meta(crmsync::store::APPLIED).unwrap();
    laptop.stop().await;

    let nats = &mut env.nats;
    tokio::task::block_in_place(|| nats.stop());
    // Started as a user would, with NATS down.
    let port = crmsync::natsd::free_port();
    let api = env.api_at(format!("http://127.0.0.1:{port}"));
    let mut child = remote_process(&dir, port, 4000);
    let status = wait_for_status(&api, |s| s["role"] == "remote").await;
    assert_offline(&status, applied, 0);
    assert_eq!(status["counts"]["contact"], 20, "{status}");

    // Reads.
    let (code, c0) = api.get("/v1/contacts/c0").await;
    assert_eq!((code, &c0["first_name"]), (200, &json!("First0")), "{c0}");
    let (code, page) = api.get("/v1/contacts?state=NY&limit=100").await;
    assert_eq!((code, page["items"].as_array().map(Vec::len)), (200, Some(7)), "{page}");

    // 100 edits: 90 new contacts, 10 changed ones.
    let created = contact_ids("offline", 90);
    for id in &created {
        api.create(Kind::Contact, json!({ "id": id, "last_name": "Offline" })).await;
    }
    for i in 0..10 {
        let (code, body) = api.patch(&format!("/v1/contacts/c{i}"), &json!({ "city": "Troy" })).await;
        assert_eq!(code, 200, "{body}");
    }
    assert_offline(&status_while_offline(&api).await, applied, 100);

    let nats = &mut env.nats;
    tokio::task::block_in_place(|| nats.restart()).unwrap();
    let status = wait_for_status(&api, |s| s["uploads"]["waiting"] == 0 && s["nats"]["connected"] == true).await;
    assert!(status["nats"]["offline_since_ms"].is_null(), "{status}");
    let main = env.main().store();
    wait_for_contacts("the remote's new contacts at the main", main, &created).await;
    wait_for_contacts("the remote's new contacts at another remote", branch.remote.store(), &created).await;
    wait_for("the remote's changes at the main", Duration::from_secs(60), || async {
        (0..10).all(|i| {
            let c = main.get(Kind::Contact, &format!("c{i}")).unwrap().unwrap();
            crmsync::model::text(&c.fields, "city") == Some("Troy")
        })
    })
    .await;
    wait_converged(env.main(), branch.remote.store()).await;
    wait_for_status(&api, |s| s["counts"]["contact"] == 110 && s["backlog"] == 0).await;
    stop(&mut child, Stop::Term).await;
    branch.stop().await;
}

/// How a remote is cut off from NATS.
#[derive(Clone, Copy, Debug)]
enum Cut {
    /// nats-server stopped: the connection closes.
    Stopped,
    /// nats-server paused (SIGSTOP): the connection stays open and nothing answers.
    Frozen,
}

fn signal(pid: u32, signal: libc::c_int) {
    // SAFETY: kill(2) on a child process of this test.
    unsafe { libc::kill(pid as libc::pid_t, signal) };
}

async fn a_remote_cut_off_from_nats_stops_on_sigterm_and_keeps_its_edits(cut: Cut) {
    let mut env = Env::start().await;
    env.create_all_set("everyone").await;
    seed_contacts(env.main(), 5, "c").await;
    let dir = env.init_remote("laptop", "everyone").await;
    let port = crmsync::natsd::free_port();
    let api = env.api_at(format!("http://127.0.0.1:{port}"));
    let mut child = remote_process(&dir, port, 4000);
    let synced = wait_for_status(&api, |s| s["nats"]["connected"] == true && s["counts"]["contact"] == 5).await;

    let nats_pid = env.nats.pid().expect("nats-server runs");
    match cut {
        Cut::Stopped => {
            let nats = &mut env.nats;
            tokio::task::block_in_place(|| nats.stop());
        }
        Cut::Frozen => signal(nats_pid, libc::SIGSTOP),
    }
    let edits = contact_ids("cut", 20);
    for id in &edits {
        api.create(Kind::Contact, json!({ "id": id, "last_name": "Cut" })).await;
    }
    let status = status_while_offline(&api).await;
    assert_eq!(status["uploads"]["waiting"], 20, "{status}");
    if let Cut::Stopped = cut {
        assert_offline(&status, synced["applied"].as_u64().unwrap(), 20);
    }

    let started = Instant::now();
    signal(child.id().expect("the remote runs"), libc::SIGTERM);
    let exit = tokio::time::timeout(Duration::from_secs(10), child.wait())
        .await
        .expect("the remote exits on SIGTERM while cut off from NATS")
        .unwrap();
    println!("{cut:?}: the remote stopped {:.0} ms after SIGTERM", started.elapsed().as_secs_f64() * 1000.0);
    assert!(exit.success(), "{exit}");
    // Every edit it acknowledged is on its disk, waiting for upload.
    let store = Store::open(&dir.join("remote.redb")).unwrap();
    assert!(edits.iter().all(|id| store.get(Kind::Contact, id).unwrap().is_some()), "an acknowledged edit is lost");
    assert_eq!(store.uploads_len().unwrap(), 20);
    drop(store);

    match cut {
        Cut::Stopped => {
            let nats = &mut env.nats;
            tokio::task::block_in_place(|| nats.restart()).unwrap();
        }
        Cut::Frozen => signal(nats_pid, libc::SIGCONT),
    }
    let mut child = remote_process(&dir, port, 4000);
    wait_for_contacts("the edits of the stopped remote at the main", env.main().store(), &edits).await;
    wait_for_status(&api, |s| s["uploads"]["waiting"] == 0 && s["counts"]["contact"] == 25).await;
    stop(&mut child, Stop::Term).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_a_remote_whose_nats_server_is_gone_and_keeps_its_edits() {
    a_remote_cut_off_from_nats_stops_on_sigterm_and_keeps_its_edits(Cut::Stopped).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_a_remote_whose_nats_server_hangs_and_keeps_its_edits() {
    a_remote_cut_off_from_nats_stops_on_sigterm_and_keeps_its_edits(Cut::Frozen).await;
}
