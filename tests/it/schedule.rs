//! When remotes sync (continuously, on a schedule, once), what each session logs at the remote
//! and at the main, and how a remote expires.

use std::time::Duration;

use crmsync::main_service::RemoteRequest;
use crmsync::model::Kind;
use crmsync::remote_service::{Mode, RemoteConfig};
use crmsync::schedule::Schedule;
use crmsync::wall_clock::WallClock;
use serde_json::{Value as J, json};

use crate::harness::{Env, cli, wait_converged, wait_for, wait_for_status};

const HOUR: u64 = 3_600_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_remote_on_an_hourly_schedule_syncs_at_the_hour_and_not_between() {
    let env = Env::start().await;
    env.create_all_set("everyone").await;
    crate::harness::seed_contacts(env.main(), 3, "c").await;
    let dir = env.init_remote("laptop", "everyone").await;
    let created = crmsync::remote_service::read_bundle(&dir).unwrap().created_ms;
    // Its clock reads half past the hour after its creation: the hour it missed is a session
    // due at once.
    let half_past = created - created % HOUR + HOUR + HOUR / 2;
    let clock = WallClock::manual(half_past);
    let config = RemoteConfig {
        mode: Mode::Scheduled("hourly".parse::<Schedule>().unwrap()),
        wall: clock.clone(),
        ..RemoteConfig::new(dir)
    };
    let remote = env.start_remote_with(config).await;
    wait_converged(env.main(), remote.remote.store()).await;
    let status =
        wait_for_status(&remote.api, |s| s["sync"]["in_session"] == false && s["sessions"][0].is_object()).await;
    assert_eq!(status["sync"]["mode"], "hourly", "{status}");
    assert_eq!(status["sync"]["next_ms"], half_past + HOUR / 2, "the next sync is at the hour: {status}");
    assert_eq!(status["sessions"][0]["started_ms"], half_past, "{status}");

    // Between sessions: the main's change does not arrive, the edit made here waits.
    env.main().create(Kind::Contact, &json!({ "id": "from-main" })).await.unwrap();
    let (status, body) = remote.api.post("/v1/contacts", &json!({ "id": "from-laptop" })).await;
    assert_eq!(status, 201, "{body}");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(remote.remote.store().get(Kind::Contact, "from-main").unwrap().is_none(), "synced between sessions");
    assert_eq!(remote.api.status().await["uploads"]["waiting"], 1);
    assert!(env.main().store().get(Kind::Contact, "from-laptop").unwrap().is_none());

    // At the hour, one session brings both, and is logged.
    clock.advance(Duration::from_secs(30 * 60));
    wait_converged(env.main(), remote.remote.store()).await;
    assert!(env.main().store().get(Kind::Contact, "from-laptop").unwrap().is_some());
    let status = wait_for_status(&remote.api, |s| {
        s["sync"]["in_session"] == false && s["sessions"].as_array().is_some_and(|l| l.len() == 2)
    })
    .await;
    assert_eq!(status["sync"]["next_ms"], half_past + 3 * HOUR / 2, "then the hour after: {status}");
    let last = &status["sessions"][1];
    assert_eq!((last["sent"].as_u64(), last["mode"].as_str()), (Some(1), Some("hourly")), "{status}");
    assert!(last["received"].as_u64().unwrap() >= 1, "{last}");
    assert_eq!(last["started_ms"], half_past + HOUR / 2, "{last}");

    // After the session, nothing flows again until the next hour.
    env.main().create(Kind::Contact, &json!({ "id": "later" })).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(remote.remote.store().get(Kind::Contact, "later").unwrap().is_none(), "synced after the session");
    clock.advance(Duration::from_secs(60 * 60));
    wait_converged(env.main(), remote.remote.store()).await;
    remote.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_session_is_a_line_of_the_sync_log_at_the_remote_and_at_the_main() {
    let env = Env::start().await;
    env.create_all_set("everyone").await;
    crate::harness::seed_contacts(env.main(), 5, "c").await;
    let remote = env.remote("laptop", "everyone").await;
    // The first session, at start, catches up and is logged on both sides.
    let status = wait_for_status(&remote.api, |s| s["sessions"].as_array().is_some_and(|l| !l.is_empty())).await;
    let first = &status["sessions"][0];
    assert_eq!((first["remote"].as_str(), first["mode"].as_str()), (Some("laptop"), Some("continuous")), "{first}");
    assert!(first["received"].as_u64().unwrap() >= 5, "{first}");
    let at_main = wait_for_status(&env.api, |_| true).await;
    assert!(at_main["role"] == "main");
    wait_for("the main logs the session", Duration::from_secs(20), || async {
        env.api.get("/v1/remotes/laptop/sessions").await.1["sessions"].as_array().is_some_and(|l| !l.is_empty())
    })
    .await;
    let (_, shown) = env.api.get("/v1/remotes/laptop").await;
    assert_eq!(shown["sessions"][0]["id"], first["id"], "{shown}");
    assert!(shown["last_sync_ms"].as_u64().unwrap() >= first["ended_ms"].as_u64().unwrap() - 5000, "{shown}");
    let (status, all) = env.api.get("/v1/sessions?limit=5").await;
    assert_eq!((status, all["sessions"][0]["id"].clone()), (200, first["id"].clone()), "{all}");
    let (status, body) = env.api.get("/v1/sessions?limit=many").await;
    assert_eq!(status, 400, "{body}");
    assert!(body["error"].as_str().unwrap().contains("limit"), "{body}");
    assert_eq!(env.api.get("/v1/remotes/nobody/sessions").await.0, 404);

    // The command line shows them, at the main and at the remote.
    let (code, out, err) = cli(&env.api, &["sessions", "--remote", "laptop"]).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("laptop") && out.contains("continuous") && out.contains("received"), "{out}");
    let (code, out, err) = cli(&remote.api, &["--json", "sessions"]).await;
    assert_eq!(code, 0, "{err}");
    let listed: J = serde_json::from_str(&out).unwrap();
    assert_eq!(listed["sessions"][0]["id"], first["id"], "{listed}");
    let (code, out, _) = cli(&env.api, &["remote", "list"]).await;
    assert_eq!(code, 0);
    assert!(out.contains("last sync 20") && out.contains("active"), "{out}");
    remote.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_remote_the_main_expires_stops_says_why_keeps_its_unsent_edits_and_recreate_brings_it_back() {
    let mut env = Env::start().await;
    env.create_all_set("everyone").await;
    crate::harness::seed_contacts(env.main(), 3, "c").await;
    let request =
        RemoteRequest { name: "laptop".into(), set: "everyone".into(), expires_days: Some(2), nats_url: None };
    let dir = env.init_remote_as(&request).await;
    // A remote that syncs daily: its edits wait for the next session.
    let config = RemoteConfig {
        mode: Mode::Scheduled("daily@03:00".parse::<Schedule>().unwrap()),
        check_every: Duration::from_millis(200),
        ..RemoteConfig::new(dir.clone())
    };
    let remote = env.start_remote_with(config).await;
    for i in 0..3 {
        let (status, body) =
            remote.api.post("/v1/contacts", &json!({ "id": format!("unsent{i}"), "city": "Here" })).await;
        assert_eq!(status, 201, "{body}");
    }

    // The main's clock moves three days on: the remote did not sync for two.
    env.stop_main().await;
    let config = crmsync::main_service::MainConfig {
        clock: WallClock::shifted(3 * 86_400_000),
        expiry_check: Duration::from_millis(200),
        ..env.main_config()
    };
    env.restart_main_with(config).await;
    let (_, shown) = env.api.get("/v1/remotes/laptop").await;
    wait_for("the main expires the remote", Duration::from_secs(20), || async {
        env.api.get("/v1/remotes/laptop").await.1["state"] == "expired"
    })
    .await;
    assert!(shown["expires_ms"].as_u64().is_some(), "{shown}");

    // The remote reads it from its consumer and says so in plain words.
    let status = wait_for_status(&remote.api, |s| s["expired"].is_object()).await;
    let notice = status["notice"].as_str().unwrap();
    assert!(
        notice.starts_with("this remote expired on ") && notice.contains("ask an administrator to re-create it"),
        "{notice}"
    );
    let export = std::path::PathBuf::from(status["expired"]["export"].as_str().unwrap());
    let lines: Vec<J> =
        std::fs::read_to_string(&export).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let ids: Vec<&str> = lines.iter().map(|l| l["id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["unsent0", "unsent1", "unsent2"], "{lines:?}");
    assert_eq!(lines[0]["record"]["city"], "Here", "{:?}", lines[0]);
    assert_eq!(lines[0]["op"], "upsert");
    // It takes no more edits, and still serves reads.
    let (status, body) = remote.api.post("/v1/contacts", &json!({ "id": "more" })).await;
    assert_eq!(status, 409, "{body}");
    assert!(body["error"].as_str().unwrap().contains("expired"), "{body}");
    assert_eq!(remote.api.get("/v1/contacts/unsent0").await.0, 200);
    // Resume cannot revive it; the server holds its consumer paused.
    let (status, body) = env.api.post("/v1/remotes/laptop/resume", &json!({})).await;
    assert_eq!(status, 409, "{body}");
    assert!(body["error"].as_str().unwrap().contains("recreate"), "{body}");
    let nats = env.main_nats().await;
    let delivery = nats.remote_delivery(&remote.remote.bundle().consumer).await.unwrap();
    assert!(delivery.halted && delivery.expired_ms.is_some(), "{delivery:?}");
    remote.stop().await;

    // Re-created, it syncs and rebuilds.
    let file = env.dir.path().join("new.bundle.json");
    let (code, _, err) = cli(&env.api, &["remote", "recreate", "laptop", "--out", file.to_str().unwrap()]).await;
    assert_eq!(code, 0, "{err}");
    let new_dir = env.dir.path().join("new-laptop");
    crmsync::remote_service::init(&file, &new_dir).unwrap();
    let new = env.start_remote(&new_dir).await;
    wait_converged(env.main(), new.remote.store()).await;
    assert!(new.remote.store().get(Kind::Contact, "c1").unwrap().is_some());
    let (_, shown) = env.api.get("/v1/remotes/laptop").await;
    assert_eq!(shown["state"], "active", "{shown}");
    new.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_remote_offline_past_its_expiry_knows_it_by_its_own_clock() {
    let env = Env::start().await;
    env.create_all_set("everyone").await;
    let request =
        RemoteRequest { name: "laptop".into(), set: "everyone".into(), expires_days: Some(2), nats_url: None };
    let dir = env.init_remote_as(&request).await;
    let nowhere = format!("nats://127.0.0.1:{}", crmsync::natsd::free_port());
    // Offline, it takes an edit.
    let port = crmsync::natsd::free_port();
    let listen = format!("127.0.0.1:{port}");
    let api = env.api_at(format!("http://{listen}"));
    let serve = ["remote", "serve", "--listen", &listen, "--nats", &nowhere, "--data"];
    let mut child = crate::harness::crmsync_process(&serve, &dir);
    wait_for_status(&api, |s| s["nats"]["connected"] == false).await;
    assert_eq!(api.post("/v1/contacts", &json!({ "id": "kept" })).await.0, 201);
    crate::harness::stop(&mut child, crate::harness::Stop::Term).await;

    // Three days later by its own clock, still offline: it expired, and says so.
    let mut child = crate::harness::crmsync_process_with(&serve, &dir, &[("CRMSYNC_CLOCK_SHIFT", "3d")]);
    let status = wait_for_status(&api, |s| s["expired"].is_object()).await;
    assert!(status["notice"].as_str().unwrap().contains("ask an administrator to re-create it"), "{status}");
    let export = status["expired"]["export"].as_str().unwrap();
    assert!(std::fs::read_to_string(export).unwrap().contains("\"kept\""));
    let (code, out, _) = cli(&api, &["status"]).await;
    assert_eq!(code, 0);
    assert!(out.contains("expired on") && out.contains(export), "{out}");
    crate::harness::stop(&mut child, crate::harness::Stop::Term).await;
    // `sync --once` refuses with the same words and the file.
    let (code, _, err) = tokio::task::spawn_blocking({
        let dir = dir.clone();
        move || {
            let out = std::process::Command::new(env!("CARGO_BIN_EXE_crmsync"))
                .args(["remote", "sync", "--once", "--timeout", "5", "--data"])
                .arg(&dir)
                .env("CRMSYNC_CLOCK_SHIFT", "3d")
                .output()
                .unwrap();
            (
                out.status.code(),
                String::from_utf8_lossy(&out.stdout).into_owned(),
                String::from_utf8_lossy(&out.stderr).into_owned(),
            )
        }
    })
    .await
    .unwrap();
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("expired on") && err.contains("unsent-edits-"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remote_serve_takes_its_schedule_from_the_command_line_and_refuses_a_bad_one() {
    let env = Env::start().await;
    env.create_all_set("everyone").await;
    let dir = env.init_remote("laptop", "everyone").await;
    let port = crmsync::natsd::free_port();
    let listen = format!("127.0.0.1:{port}");
    let api = env.api_at(format!("http://{listen}"));
    let args = ["remote", "serve", "--listen", &listen, "--sync", "weekly@Friday@17:00", "--data"];
    let mut child = crate::harness::crmsync_process(&args, &dir);
    let status = wait_for_status(&api, |s| s["sync"]["next_ms"].is_u64()).await;
    assert_eq!(status["sync"]["mode"], "weekly@fri@17:00", "{status}");
    let next = status["sync"]["next_ms"].as_u64().unwrap();
    // 1970-01-01 was a Thursday: Fridays are day 1 of each week counted from it.
    let (day, minute) = (next / 86_400_000, next % 86_400_000 / 60_000);
    assert_eq!((day % 7, minute), (1, 17 * 60), "{status}");
    let now = crmsync::hlc::wall_ms();
    assert!(next > now && next <= now + 7 * 86_400_000, "{status}");
    crate::harness::stop(&mut child, crate::harness::Stop::Term).await;

    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_crmsync"))
            .args(["remote", "serve", "--sync", "daily@25:00", "--data"])
            .arg(&dir)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("the hour must be 00 to 23") && err.contains("weekly@DAY@HH:MM"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_main_whose_clock_runs_past_a_remotes_expiry_expires_it_at_start() {
    let mut env = Env::start().await;
    env.create_all_set("everyone").await;
    let request =
        RemoteRequest { name: "laptop".into(), set: "everyone".into(), expires_days: Some(2), nats_url: None };
    env.init_remote_as(&request).await;
    env.create_all_set("others").await;
    let fresh = RemoteRequest { name: "branch".into(), set: "others".into(), expires_days: Some(5), nats_url: None };
    env.init_remote_as(&fresh).await;
    env.stop_main().await;

    let port = crmsync::natsd::free_port();
    let listen = format!("127.0.0.1:{port}");
    let data = env.main_config().data_dir;
    let args = ["main", "serve", "--nats", &env.nats.url(), "--listen", &listen, "--data"];
    let mut main = crate::harness::crmsync_process_with(&args, &data, &[("CRMSYNC_CLOCK_SHIFT", "3d")]);
    let api = env.api_at(format!("http://{listen}"));
    wait_for_status(&api, |s| s["role"] == "main").await;
    wait_for("the main expires laptop", Duration::from_secs(20), || async {
        api.get("/v1/remotes/laptop").await.1["state"] == "expired"
    })
    .await;
    let (code, out, err) = cli(&api, &["remote", "list"]).await;
    assert_eq!(code, 0, "{err}");
    let line = |name: &str| out.lines().find(|l| l.starts_with(name)).unwrap_or_default().to_owned();
    assert!(line("laptop").contains("expired"), "{out}");
    assert!(line("branch").contains("active"), "a remote with days left stays: {out}");
    crate::harness::stop(&mut main, crate::harness::Stop::Term).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_remote_expires_for_want_of_reports_the_main_has_not_taken_in() {
    let mut env = Env::start().await;
    env.create_all_set("everyone").await;
    let request =
        RemoteRequest { name: "laptop".into(), set: "everyone".into(), expires_days: Some(2), nats_url: None };
    let dir = env.init_remote_as(&request).await;
    env.main().accept_syncs(false).await.unwrap();
    // The remote syncs: its session report waits in CRM_UP.
    let remote = env.start_remote(&dir).await;
    wait_for_status(&remote.api, |s| s["sessions"][0].is_object() && s["sync"]["reports_waiting"] == 0).await;

    // The main's clock moves three days on while it does not accept syncs: nobody expires.
    env.stop_main().await;
    let shifted = WallClock::shifted(3 * 86_400_000);
    let config = crmsync::main_service::MainConfig {
        clock: shifted.clone(),
        expiry_check: Duration::from_millis(200),
        ..env.main_config()
    };
    env.restart_main_with(config).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(env.api.get("/v1/remotes/laptop").await.1["state"], "active");

    // Accepting again, the main takes the report in: the remote synced, as of now.
    let before = shifted.now_ms();
    env.main().accept_syncs(true).await.unwrap();
    wait_for("the main takes the report in", Duration::from_secs(20), || async {
        env.api.get("/v1/remotes/laptop").await.1["last_sync_ms"].as_u64().is_some_and(|ms| ms >= before)
    })
    .await;
    assert_eq!(env.api.get("/v1/remotes/laptop").await.1["state"], "active");
    remote.stop().await;
}
