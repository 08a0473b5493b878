//! Bad input at the API: a 4xx that says what is wrong, and nothing written.

use crmsync::model::Kind;
use serde_json::json;

use crate::harness::Env;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_refused_with_a_reason_and_nothing_is_written() {
    let env = Env::start().await;
    env.create_all_set("everyone").await;
    let contact = env.api.create(Kind::Contact, json!({ "first_name": "Ann" })).await;
    let before = env.api.status().await;

    let long = "x".repeat(300);
    let contact_path = format!("/v1/contacts/{contact}");
    let cases: Vec<(&str, &str, serde_json::Value, u16, &str)> = vec![
        ("POST", "/v1/contacts", json!({ "nickname": "A" }), 400, "unknown field `nickname`"),
        ("POST", "/v1/contacts", json!({ "first_name": 5 }), 400, "must be a string"),
        ("POST", "/v1/contacts", json!({ "city": long }), 400, "at most 256 bytes"),
        ("POST", "/v1/contacts", json!({ "custom": { "a": 1 } }), 400, "custom fields"),
        ("POST", "/v1/contacts", json!({ "access": "secret" }), 400, "one of public, private, limited"),
        ("POST", "/v1/contacts", json!(["a"]), 400, "must be a JSON object"),
        ("POST", "/v1/contacts", json!({ "id": "a.b" }), 400, "contains '.'"),
        ("POST", "/v1/contacts", json!({ "id": "a*" }), 400, "contains '*'"),
        ("POST", "/v1/contacts", json!({ "id": "a>" }), 400, "contains '>'"),
        ("POST", "/v1/contacts", json!({ "id": "a b" }), 400, "contains ' '"),
        ("POST", "/v1/contacts", json!({ "id": "a".repeat(65) }), 400, "the limit is 64"),
        ("POST", "/v1/contacts", json!({ "id": contact }), 409, "already exists"),
        ("POST", "/v1/notes", json!({ "text": "orphan" }), 400, "`contact_id` of a note is required"),
        ("POST", "/v1/notes", json!({ "contact_id": "nobody", "text": "t" }), 422, "no contact with id \"nobody\""),
        ("POST", "/v1/widgets", json!({}), 404, "unknown collection `widgets`"),
        ("PATCH", &contact_path, json!({ "id": "other" }), 400, "cannot be changed"),
        ("PATCH", "/v1/contacts/nobody", json!({ "city": "X" }), 404, "no contact with id"),
        ("POST", "/v1/sets", json!({ "name": "a.b", "all": true }), 400, "contains '.'"),
        ("POST", "/v1/sets", json!({ "name": "s", "all": true, "colour": 1 }), 400, "unknown field `colour`"),
        ("POST", "/v1/remotes", json!({ "name": "r>", "set": "everyone" }), 400, "contains '>'"),
        ("POST", "/v1/remotes", json!({ "name": "r", "set": "nope" }), 422, "no set with id \"nope\""),
        ("POST", "/v1/remotes", json!({ "name": "r", "set": "everyone", "expires_days": 365 }), 400, "2 to 90 days"),
    ];
    for (method, path, body, want_status, want_text) in cases {
        let (status, resp) = match method {
            "POST" => env.api.post(path, &body).await,
            _ => env.api.patch(path, &body).await,
        };
        let message = resp["error"].as_str().unwrap_or_default();
        assert_eq!(status, want_status, "{method} {path} {body}: {resp}");
        assert!(message.contains(want_text), "{method} {path} {body}: {message:?} should say {want_text:?}");
    }

    // Invalid JSON and an oversized body.
    let (status, resp) = env.api.post_raw("/v1/contacts", b"{\"first_name\": \"A\",".to_vec()).await;
    assert_eq!(status, 400);
    assert!(resp["error"].as_str().unwrap().contains("not valid JSON"), "{resp}");
    // Just over the limit: a body far larger could still be in flight when the server answers
    // and closes, and the client would see a reset instead of the answer.
    let huge = format!("{{\"first_name\": \"{}\"}}", "x".repeat(crmsync::http::MAX_BODY + 4096));
    let (status, resp) = env.api.post_raw("/v1/contacts", huge.into_bytes()).await;
    assert_eq!(status, 413);
    assert!(resp["error"].as_str().unwrap().contains("larger than"), "{resp}");
    let (status, resp) = env.api.get("/v1/contacts?colour=red").await;
    assert_eq!(status, 400);
    assert!(resp["error"].as_str().unwrap().contains("not a field"), "{resp}");

    // Nothing was written: the stream and the projection are where they were.
    let after = env.api.status().await;
    assert_eq!(before["stream_last"], after["stream_last"]);
    assert_eq!(before["counts"], after["counts"]);
    let (_, page) = env.api.get("/v1/contacts").await;
    assert_eq!(page["items"].as_array().unwrap().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lists_filter_and_page() {
    let env = Env::start().await;
    for i in 0..25 {
        let state = if i % 5 == 0 { "NY" } else { "CT" };
        env.api.create(Kind::Contact, json!({ "id": format!("c{i:02}"), "state": state })).await;
    }
    let (status, page) = env.api.get("/v1/contacts?state=ny").await;
    assert_eq!(status, 200);
    let ids: Vec<_> = page["items"].as_array().unwrap().iter().map(|c| c["id"].as_str().unwrap().to_owned()).collect();
    assert_eq!(ids, ["c00", "c05", "c10", "c15", "c20"]);
    let (_, first) = env.api.get("/v1/contacts?limit=10").await;
    assert_eq!(first["items"].as_array().unwrap().len(), 10);
    assert_eq!(first["next"], "c09");
    let (_, second) = env.api.get("/v1/contacts?limit=10&after=c09").await;
    assert_eq!(second["items"][0]["id"], "c10");
    let (_, last) = env.api.get("/v1/contacts?limit=10&after=c19").await;
    assert_eq!(last["items"].as_array().unwrap().len(), 5);
    assert!(last["next"].is_null());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_command_line_prints_one_clear_line_and_exits_non_zero_on_errors() {
    let env = Env::start().await;
    let bin = env!("CARGO_BIN_EXE_crmsync");
    let run_at = |api: &str, args: &[&str]| {
        let out = std::process::Command::new(bin)
            .arg("--api")
            .arg(api)
            .args(args)
            .env("CRMSYNC_TOKEN", &env.token)
            .output()
            .unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let run = |args: &[&str]| run_at(&env.api.base, args);
    let (code, out, err) = run(&["contact", "add", "id=c1", "first_name=Ann", "custom.source=fair", "--json"]);
    assert_eq!(code, 0, "{err}");
    let c: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!((c["id"].as_str(), c["custom"]["source"].as_str()), (Some("c1"), Some("fair")));
    let (code, out, _) = run(&["contact", "edit", "c1", "city=Albany", "first_name="]);
    assert_eq!(code, 0);
    assert!(out.contains("Albany") && !out.contains("Ann"), "{out}");
    let (code, _, err) = run(&["contact", "add", "bogus=1"]);
    assert_eq!(code, 1);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.starts_with("error: unknown field `bogus`"), "{err}");
    let (code, out, _) = run(&["status", "--json"]);
    assert_eq!(code, 0);
    let status: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(status["role"], "main");
    assert_eq!(status["counts"]["contact"], 1);
    assert_eq!(status["database_id"], env.main().database_id());
    let (code, _, err) = run_at("http://127.0.0.1:1", &["status"]);
    assert_eq!(code, 3);
    assert!(err.contains("cannot reach the crmsync API"), "{err}");
}

/// `crmsync up`, the README's first command: a nats-server, a main and two demo remotes on one
/// machine, seeded on first start, stopped by SIGTERM, resumed from the same data.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crmsync_up_runs_everything_on_one_machine_and_resumes_from_its_data() {
    use crate::harness::{Api, Stop, crmsync_process, stop, wait_for_status};
    let dir = tempfile::tempdir().unwrap();
    let port = crmsync::natsd::free_port;
    let (nats, main, laptop, branch) = (port(), port(), port(), port());
    let (main_listen, remotes) = (format!("127.0.0.1:{main}"), format!("127.0.0.1:{laptop},127.0.0.1:{branch}"));
    let nats_port = nats.to_string();
    let args = [
        "up",
        "--nats-port",
        &nats_port,
        "--main-listen",
        &main_listen,
        "--remote-listen",
        &remotes,
        "--contacts",
        "50",
        "--data",
    ];
    let data = dir.path().join("crmsync-data");
    let mut up = crmsync_process(&args, &data);
    // `up` writes the administrator's token on first start; it works at the main and the remotes.
    let token = crate::harness::admin_token(&data.join("main")).await;
    let apis = [main, laptop, branch].map(|p| Api::new(format!("http://127.0.0.1:{p}")).with_token(&token));
    for api in &apis {
        wait_for_status(api, |s| s["counts"]["contact"] == 50).await;
    }
    // An edit at a demo remote reaches the main.
    let (status, body) = apis[1].patch("/v1/contacts/contact-7", &json!({ "city": "Ithaca" })).await;
    assert_eq!(status, 200, "{body}");
    crate::harness::wait_for("the edit reaches the main", std::time::Duration::from_secs(30), || async {
        apis[0].get("/v1/contacts/contact-7").await.1["city"] == "Ithaca"
    })
    .await;
    // Secure by default: NATS refuses a client without credentials, and the authority is the
    // owner's alone.
    let anonymous = crmsync::transport::Nats::connect(&format!("nats://127.0.0.1:{nats}"), "anonymous").await;
    assert!(anonymous.is_err(), "an anonymous client connected");
    let authority = data.join("nats-authority.json");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(&authority).unwrap().permissions().mode() & 0o777, 0o600);
    // Its one server writes every message to disk before acknowledging it.
    let config = std::fs::read_to_string(data.join("nats.conf")).unwrap();
    assert!(config.contains("sync_interval: always"), "{config}");
    stop(&mut up, Stop::Term).await;

    // Started again on the same data: nothing seeded twice, nothing lost.
    let mut up = crmsync_process(&args, &data);
    let status = wait_for_status(&apis[0], |s| s["counts"]["contact"].is_number()).await;
    assert_eq!(status["counts"]["contact"], 50, "{status}");
    assert_eq!(apis[0].get("/v1/contacts/contact-7").await.1["city"], "Ithaca");
    wait_for_status(&apis[2], |s| s["counts"]["contact"] == 50).await;
    stop(&mut up, Stop::Term).await;
}

/// `crmsync up --cluster`: three nats-servers in a JetStream cluster, every stream on three
/// replicas, the main and the demo remotes connected to all three nodes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crmsync_up_cluster_runs_three_nodes_with_three_replicas() {
    use crate::harness::{Api, Stop, crmsync_process, stop, wait_for_status};
    let dir = tempfile::tempdir().unwrap();
    let port = crmsync::natsd::free_port;
    // Three client ports in a row from --nats-port: find a free run of them.
    let nats = (0..50)
        .map(|_| port())
        .find(|p| *p < 65000 && (1..3).all(|i| std::net::TcpListener::bind(("127.0.0.1", p + i)).is_ok()))
        .unwrap();
    let (main, laptop, branch) = (port(), port(), port());
    let (main_listen, remotes) = (format!("127.0.0.1:{main}"), format!("127.0.0.1:{laptop},127.0.0.1:{branch}"));
    let nats_port = nats.to_string();
    let args = [
        "up",
        "--cluster",
        "--nats-port",
        &nats_port,
        "--main-listen",
        &main_listen,
        "--remote-listen",
        &remotes,
        "--contacts",
        "20",
        "--data",
    ];
    let data = dir.path().join("crmsync-data");
    let mut up = crmsync_process(&args, &data);
    let token = crate::harness::admin_token(&data.join("main")).await;
    let main_api = Api::new(format!("http://127.0.0.1:{main}")).with_token(&token);
    let status = wait_for_status(&main_api, |s| s["counts"]["contact"] == 20).await;
    assert_eq!(status["nats"]["replicas"], 3, "{status}");
    let urls = status["nats"]["url"].as_str().unwrap().to_owned();
    assert_eq!(urls.split(',').count(), 3, "{urls}");
    let laptop_api = Api::new(format!("http://127.0.0.1:{laptop}")).with_token(&token);
    let status = wait_for_status(&laptop_api, |s| s["counts"]["contact"] == 20).await;
    assert_eq!(status["nats"]["url"], urls.as_str(), "the bundle names every node");
    stop(&mut up, Stop::Term).await;
}
