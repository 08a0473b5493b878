//! Hostile and careless clients: requests the API must refuse with a JSON error that says what
//! was wrong, and connections that send half a request and must not stop the service.

use std::time::{Duration, Instant};

use crmsync::http::Limits;
use crmsync::main_service::RemoteRequest;
use crmsync::model::Kind;
use serde_json::{Value as J, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::harness::{Api, Draw, Env, wait_for};

/// Sends one request and returns its status, its `Allow` header and its body as JSON (a body
/// that is not JSON fails the test: every answer of the API is JSON).
async fn request(token: &str, method: &str, url: &str, content_type: Option<&str>, body: &str) -> (u16, String, J) {
    let client = crate::harness::http_client();
    let mut req = client.request(method.parse().unwrap(), url).bearer_auth(token).body(body.to_owned());
    if let Some(content_type) = content_type {
        req = req.header("content-type", content_type);
    }
    let resp = req.send().await.expect("the API answers");
    let status = resp.status().as_u16();
    let allow = resp.headers().get("allow").map(|v| v.to_str().unwrap().to_owned()).unwrap_or_default();
    let text = resp.text().await.unwrap();
    let body = serde_json::from_str(&text).unwrap_or_else(|_| panic!("{method} {url}: {status} {text:?} is not JSON"));
    (status, allow, body)
}

fn error_of(body: &J) -> &str {
    body["error"].as_str().unwrap_or_else(|| panic!("no error message in {body}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_requests_get_json_errors_that_say_what_was_wrong_at_the_main_and_at_a_remote() {
    let env = Env::start().await;
    env.create_all_set("everyone").await;
    let remote = env.remote("laptop", "everyone").await;
    for (side, base) in [("main", &env.api.base), ("remote", &remote.api.base)] {
        let url = |path: &str| format!("{base}{path}");
        // A path that exists, with a method it does not take.
        let (status, allow, body) = request(&env.token, "PUT", &url("/v1/contacts/x"), None, "").await;
        assert_eq!(status, 405, "{side}: {body}");
        let message = error_of(&body);
        assert!(message.contains("/v1/contacts/x does not take PUT"), "{side}: {message}");
        assert!(
            message.contains("GET") && message.contains("PATCH") && message.contains("DELETE"),
            "{side}: {message}"
        );
        assert!(allow.contains("PATCH"), "{side}: the Allow header stays: {allow:?}");
        let (status, _, body) = request(&env.token, "GET", &url("/v1/rebuild"), None, "").await;
        assert_eq!(status, 405, "{side}: {body}");
        assert!(error_of(&body).contains("it takes POST"), "{side}: {body}");

        // Percent-encoded bytes that are not UTF-8, in an id and in a filter.
        let (status, _, body) = request(&env.token, "GET", &url("/v1/contacts/%FF"), None, "").await;
        assert_eq!(status, 400, "{side}: {body}");
        assert!(error_of(&body).contains("/v1/contacts/%FF is not UTF-8"), "{side}: {body}");
        let (status, _, body) = request(&env.token, "DELETE", &url("/v1/contacts/a%C3"), None, "").await;
        assert_eq!(status, 400, "{side}: {body}");
        assert!(error_of(&body).contains("not UTF-8"), "{side}: {body}");
        let (status, _, body) = request(&env.token, "GET", &url("/v1/contacts?state=%FF%FE"), None, "").await;
        assert_eq!(status, 400, "{side}: {body}");
        assert!(
            error_of(&body).contains("the value \"%FF%FE\" of `state` in the query string is not UTF-8"),
            "{side}: {body}"
        );
        // Well-formed percent-encoding still filters: `N%59` is `NY`.
        let (status, _, body) = request(&env.token, "GET", &url("/v1/contacts?state=N%59&limit=5"), None, "").await;
        assert_eq!(status, 200, "{side}: {body}");

        // A body that is not JSON, whatever its content type says.
        let (status, _, body) =
            request(&env.token, "POST", &url("/v1/contacts"), Some("text/plain"), "first_name=Ann").await;
        assert_eq!(status, 400, "{side}: {body}");
        assert!(error_of(&body).contains("not valid JSON"), "{side}: {body}");
        // No endpoint at all.
        let (status, _, body) = request(&env.token, "GET", &url("/v2/contacts"), None, "").await;
        assert_eq!(status, 404, "{side}: {body}");
        assert!(error_of(&body).contains("no endpoint GET /v2/contacts"), "{side}: {body}");
    }
    let (status, _, body) =
        request(&env.token, "GET", &format!("{}/v1/sets/%FF/preview", env.api.base), None, "").await;
    assert_eq!(status, 400, "{body}");
    assert!(error_of(&body).contains("not UTF-8"), "{body}");
    remote.stop().await;
}

/// Runs the command line against `api`: (exit code, stdout, stderr).
fn cli(api: &Api, args: &[&str]) -> (i32, String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_crmsync"))
        .arg("--api")
        .arg(&api.base)
        .args(api.token.iter().flat_map(|t| ["--token", t.as_str()]))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_sets_and_remotes_list_in_pages_through_the_api_and_the_command_line() {
    let env = Env::start().await;
    env.api.create(Kind::User, json!({ "id": "ann", "name": "Ann" })).await;
    for name in ["everyone", "mine", "theirs"] {
        let body = if name == "everyone" {
            json!({ "name": name, "all": true })
        } else {
            json!({ "name": name, "users": ["ann"] })
        };
        let (status, resp) = env.api.post("/v1/sets", &body).await;
        assert_eq!(status, 201, "{resp}");
    }
    for (remote, set) in [("branch", "mine"), ("laptop", "everyone")] {
        let req = RemoteRequest { name: remote.into(), set: set.into(), ..Default::default() };
        env.main().create_remote(&req).await.unwrap();
    }

    let (status, page) = env.api.get("/v1/sets?limit=2").await;
    assert_eq!(status, 200, "{page}");
    let names: Vec<&str> = page["items"].as_array().unwrap().iter().map(|s| s["id"].as_str().unwrap()).collect();
    assert_eq!(names, ["everyone", "mine"]);
    assert_eq!(page["next"], "mine");
    assert_eq!(page["items"][0]["all"], true);
    assert_eq!(page["items"][1]["users"], json!(["ann"]));
    let (_, page) = env.api.get("/v1/sets?limit=2&after=mine").await;
    assert_eq!(page["items"].as_array().unwrap().len(), 1);
    assert_eq!((page["items"][0]["id"].as_str(), &page["next"]), (Some("theirs"), &J::Null));

    let (status, page) = env.api.get("/v1/remotes").await;
    assert_eq!(status, 200, "{page}");
    let remotes = page["items"].as_array().unwrap();
    assert_eq!(remotes.len(), 2, "{page}");
    assert_eq!((remotes[0]["id"].as_str(), remotes[0]["set"].as_str()), (Some("branch"), Some("mine")));
    assert_eq!((remotes[1]["id"].as_str(), remotes[1]["set"].as_str()), (Some("laptop"), Some("everyone")));
    assert_eq!(remotes[1]["enabled"], true);
    assert!(remotes[1]["backlog"].is_u64(), "each remote shows its backlog: {page}");
    let (status, page) = env.api.get("/v1/remotes?set=mine").await;
    assert_eq!((status, page["items"].as_array().unwrap().len()), (200, 1), "{page}");

    let base = env.api.clone();
    let (code, out, err) = tokio::task::spawn_blocking(move || cli(&base, &["set", "list"])).await.unwrap();
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("everyone") && out.contains("all records"), "{out}");
    assert!(out.contains("theirs") && out.contains("ann"), "{out}");
    let base = env.api.clone();
    let (code, out, err) =
        tokio::task::spawn_blocking(move || cli(&base, &["set", "list", "--limit", "1"])).await.unwrap();
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("everyone") && !out.contains("theirs") && out.contains("(more: --after everyone)"), "{out}");
    let base = env.api.clone();
    let (code, out, err) = tokio::task::spawn_blocking(move || cli(&base, &["remote", "list"])).await.unwrap();
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("branch") && out.contains("set mine, active, last sync"), "{out}");
    assert!(out.contains("laptop") && out.contains("set everyone, active, last sync"), "{out}");
    let base = env.api.clone();
    let (code, out, err) =
        tokio::task::spawn_blocking(move || cli(&base, &["remote", "list", "--json"])).await.unwrap();
    assert_eq!(code, 0, "{err}");
    let page: J = serde_json::from_str(&out).unwrap();
    assert_eq!(page["items"][1]["id"], "laptop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_the_command_line_says_what_came_back_when_an_error_answer_is_not_json() {
    // Something that is not crmsync (a proxy, say) answers in front of it.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = Api::new(format!("http://{}", listener.local_addr().unwrap()));
    tokio::spawn(async move {
        let answers = [
            "HTTP/1.1 502 Bad Gateway\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
            "HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain\r\ncontent-length: 14\r\nconnection: close\r\n\r\nupstream down\n",
        ];
        for answer in answers {
            let (mut stream, _) = listener.accept().await.unwrap();
            let mut buf = [0u8; 4096];
            let _ = stream.read(&mut buf).await;
            stream.write_all(answer.as_bytes()).await.unwrap();
            let _ = stream.shutdown().await;
        }
    });
    let base2 = base.clone();
    let (code, _, err) = tokio::task::spawn_blocking(move || cli(&base2, &["status"])).await.unwrap();
    assert_eq!(code, 1, "{err}");
    assert_eq!(err.trim(), "error: the service answered 502 Bad Gateway with no message");
    let (code, _, err) = tokio::task::spawn_blocking(move || cli(&base, &["status"])).await.unwrap();
    assert_eq!(code, 1, "{err}");
    assert_eq!(err.trim(), "error: the service answered 503 Service Unavailable: upstream down");
}

/// Serves the main's API with `limits` on a new port; returns its base URL, a stop handle and
/// the server's task.
async fn serve_main_with(
    env: &Env,
    limits: Limits,
) -> (String, tokio::sync::oneshot::Sender<()>, tokio::task::JoinHandle<std::io::Result<()>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let router = crmsync::http::main_api(env.main().clone());
    let task = tokio::spawn(crmsync::http::serve_with(
        listener,
        router,
        async move {
            let _ = rx.await;
        },
        limits,
    ));
    (format!("http://{addr}"), tx, task)
}

/// Opens `n` connections that each send the start of a request and nothing more.
async fn half_open(base: &str, n: usize) -> Vec<TcpStream> {
    let addr = base.trim_start_matches("http://");
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        stream.write_all(b"GET /v1/status HTTP/1.1\r\nHost: crm").await.unwrap();
        out.push(stream);
    }
    out
}

/// Reads until the server closes the connection; true if it did within `limit`.
async fn closed_within(stream: &mut TcpStream, limit: Duration) -> bool {
    let mut buf = [0u8; 1024];
    tokio::time::timeout(limit, async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await
    .is_ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_half_open_connections_neither_stop_the_api_nor_stay_open() {
    let env = Env::start().await;
    let header_timeout = Duration::from_secs(2);
    let limits = Limits { header_timeout, body_timeout: Duration::from_secs(1), max_connections: 1024 };
    let (base, stop, server) = serve_main_with(&env, limits).await;
    let opened = Instant::now();
    let mut slow = half_open(&base, 300).await;

    // The API answers at once while the 300 wait for their timeout.
    let started = Instant::now();
    let status = tokio::time::timeout(header_timeout, env.api_at(base.clone()).status()).await;
    assert!(status.is_ok(), "the API did not answer within {header_timeout:?} with 300 half-open connections");
    assert!(started.elapsed() < header_timeout, "answered only after {:?}", started.elapsed());

    // The server closes each of them once its head is late, not before.
    let mut early = 0;
    for stream in &mut slow {
        if opened.elapsed() < header_timeout - Duration::from_millis(500) {
            let mut buf = [0u8; 1];
            early += usize::from(matches!(stream.try_read(&mut buf), Ok(0)));
        }
    }
    assert_eq!(early, 0, "connections were closed before their header timeout");
    for (i, stream) in slow.iter_mut().enumerate() {
        assert!(closed_within(stream, Duration::from_secs(10)).await, "half-open connection {i} is still open");
    }
    assert!(opened.elapsed() >= header_timeout, "closed after {:?}", opened.elapsed());

    // A body that stops half-way is answered 408 once the body timeout passes.
    let mut stream = TcpStream::connect(base.trim_start_matches("http://")).await.unwrap();
    let head = format!(
        "POST /v1/contacts HTTP/1.1\r\nHost: crm\r\nauthorization: Bearer {}\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n",
        env.token
    );
    stream.write_all(format!("{head}{{\"first_name\": ").as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut answer)).await;
    assert!(read.is_ok(), "no answer to a request whose body never ends");
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("the request body did not arrive within 1 s"), "{answer}");

    // Stopping does not wait for connections that never sent a whole request.
    let _slow = half_open(&base, 50).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let stopping = Instant::now();
    let _ = stop.send(());
    let stopped = tokio::time::timeout(Duration::from_secs(1), server).await;
    assert!(stopped.is_ok(), "the server did not stop within 1 s with 50 half-open connections");
    assert!(stopping.elapsed() < Duration::from_secs(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_connections_beyond_the_limit_wait_and_are_answered_once_others_end() {
    let env = Env::start().await;
    let header_timeout = Duration::from_secs(1);
    let limits = Limits { header_timeout, body_timeout: Duration::from_secs(1), max_connections: 4 };
    let (base, _stop, _server) = serve_main_with(&env, limits).await;
    // Ten connections hold the four slots and queue behind them.
    let _slow = half_open(&base, 10).await;
    let started = Instant::now();
    let status = tokio::time::timeout(Duration::from_secs(15), env.api_at(base.clone()).status()).await;
    assert!(status.is_ok(), "the API did not answer once the half-open connections timed out");
    let waited = started.elapsed();
    assert!(waited >= header_timeout, "answered after {waited:?}: the limit of 4 connections was not applied");
}

/// Whether a remote's API shows a record.
async fn holds(api: &Api, kind: Kind, id: &str) -> bool {
    api.get(&format!("/v1/{}/{id}", kind.plural())).await.0 == 200
}

async fn wait_holds(api: &Api, kind: Kind, id: &str, want: bool) {
    let what = format!("the remote {} {kind} {id}", if want { "to hold" } else { "to drop" });
    wait_for(&what, Duration::from_secs(15), || async { holds(api, kind, id).await == want }).await;
}

/// POSTs `body` to a collection and checks the refusal: its status and that its message says
/// `want`.
async fn refused(api: &Api, kind: Kind, body: J, status: u16, want: &str) {
    let (got, resp) = api.post(&format!("/v1/{}", kind.plural()), &body).await;
    assert_eq!(got, status, "creating a {kind} from {body}: {resp}");
    let message = error_of(&resp);
    assert!(message.contains(want), "creating a {kind} from {body}: {message:?} should say {want:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_users_and_teams_named_in_access_lists_and_teams_must_exist_at_the_main_and_at_a_remote() {
    let env = Env::start().await;
    env.create_all_set("everyone").await;
    let remote = env.remote("laptop", "everyone").await;
    let api = &env.api;
    api.create(Kind::Team, json!({ "id": "east", "name": "East" })).await;
    api.create(Kind::User, json!({ "id": "ann", "name": "Ann", "teams": ["east"] })).await;

    let no_user = "field `access_users`: there is no user with id \"ghost\"";
    let no_team = "field `access_teams`: there is no team with id \"nowhere\"";
    let limited = |field: &str, id: &str| json!({ "name": "N", "access": "limited", field: [id] });
    refused(api, Kind::Contact, json!({ "access": "limited", "access_users": ["ann", "ghost"] }), 422, no_user).await;
    refused(api, Kind::Contact, json!({ "access": "limited", "access_teams": ["nowhere"] }), 422, no_team).await;
    refused(api, Kind::Company, limited("access_users", "ghost"), 422, no_user).await;
    refused(api, Kind::Group, limited("access_teams", "nowhere"), 422, no_team).await;
    refused(
        api,
        Kind::User,
        json!({ "name": "Bob", "teams": ["east", "nowhere"] }),
        422,
        "field `teams`: there is no team with id \"nowhere\"",
    )
    .await;
    let (status, resp) = api.patch("/v1/users/ann", &json!({ "teams": ["nowhere"] })).await;
    assert_eq!(status, 422, "{resp}");
    assert!(error_of(&resp).contains("there is no team with id \"nowhere\""), "{resp}");
    let contact = api
        .create(Kind::Contact, json!({ "access": "limited", "access_users": ["ann"], "access_teams": ["east"] }))
        .await;
    let (status, resp) = api.patch(&format!("/v1/contacts/{contact}"), &json!({ "access_users": ["ghost"] })).await;
    assert_eq!(status, 422, "{resp}");
    assert!(error_of(&resp).contains(no_user), "{resp}");

    // A remote checks against the users and teams it holds (all of them).
    wait_holds(&remote.api, Kind::User, "ann", true).await;
    wait_holds(&remote.api, Kind::Team, "east", true).await;
    let at_remote = &remote.api;
    refused(at_remote, Kind::Contact, json!({ "access": "limited", "access_users": ["ghost"] }), 422, no_user).await;
    refused(at_remote, Kind::Group, limited("access_teams", "nowhere"), 422, no_team).await;
    at_remote
        .create(Kind::Contact, json!({ "access": "limited", "access_users": ["ann"], "access_teams": ["east"] }))
        .await;
    remote.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_nul_characters_impossible_dates_and_negative_durations_are_refused() {
    let env = Env::start().await;
    env.create_all_set("everyone").await;
    let remote = env.remote("laptop", "everyone").await;
    let contact = env.api.create(Kind::Contact, json!({ "first_name": "Ann" })).await;
    wait_holds(&remote.api, Kind::Contact, &contact, true).await;
    let nul = "must be text without NUL characters (\\u0000)";
    let date = "must be a date YYYY-MM-DD, or a date and time YYYY-MM-DDTHH:MM[:SS[.fff]] with an optional Z or ±HH:MM";
    for (side, api) in [("main", &env.api), ("remote", &remote.api)] {
        let note = |date: &str| json!({ "contact_id": contact, "text": "t", "date": date });
        refused(api, Kind::Contact, json!({ "city": "Al\u{0}bany" }), 400, &format!("field `city` of a contact {nul}"))
            .await;
        refused(api, Kind::Contact, json!({ "custom": { "source": "\u{0}" } }), 400, "field `custom.source`").await;
        refused(api, Kind::Note, json!({ "contact_id": contact, "text": "a\u{0}" }), 400, nul).await;
        refused(api, Kind::Note, note("2025-02-29"), 400, &format!("field `date` of a note {date}")).await;
        refused(api, Kind::Note, note("27.11.2026"), 400, "got the string \"27.11.2026\"").await;
        refused(api, Kind::Note, note("2026-11-27T25:00"), 400, date).await;
        refused(api, Kind::Activity, json!({ "contact_id": contact, "due": "tomorrow" }), 400, "field `due`").await;
        let negative = json!({ "contact_id": contact, "duration_minutes": -5 });
        refused(
            api,
            Kind::History,
            negative,
            400,
            "`duration_minutes` of a history must be a whole number, 0 or more, got the number -5",
        )
        .await;
        for good in ["2024-02-29", "2026-11-27T09:30", "2026-11-27T09:30:15.250Z", "2026-11-27T09:30:00-05:00"] {
            let (status, resp) = api.post("/v1/notes", &note(good)).await;
            assert_eq!(status, 201, "{side}: {good}: {resp}");
        }
        let (status, resp) = api.post("/v1/histories", &json!({ "contact_id": contact, "duration_minutes": 0 })).await;
        assert_eq!(status, 201, "{side}: {resp}");
        let (status, resp) = api.patch(&format!("/v1/contacts/{contact}"), &json!({ "title": "\u{0}" })).await;
        assert_eq!(status, 400, "{side}: {resp}");
        assert!(error_of(&resp).contains(nul), "{side}: {resp}");
    }
    // The wire schema describes the same forms (it cannot check the calendar).
    let schema: J = serde_json::from_slice(&std::fs::read("schemas/records/note.schema.json").unwrap()).unwrap();
    let validator = jsonschema::validator_for(&schema).unwrap();
    let record = |date: &str| json!({ "contact_id": ["c", 1], "text": ["t", 1], "date": [date, 1] });
    assert!(validator.is_valid(&record("2026-11-27T09:30:15.250+01:00")));
    assert!(!validator.is_valid(&record("27.11.2026")));
    assert!(!validator.is_valid(&record("2026-11-27T09:30+0100")));
    remote.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_a_blank_set_query_is_refused_with_what_to_do_instead() {
    let env = Env::start().await;
    env.api.create(Kind::User, json!({ "id": "ann", "name": "Ann" })).await;
    let leave_out = "leave `query` out (`--no-query` with `set edit`, `\"query\": null` in a PATCH)";
    for query in ["", "   "] {
        let (status, resp) = env.api.post("/v1/sets", &json!({ "name": "s", "users": ["ann"], "query": query })).await;
        assert_eq!(status, 400, "{query:?}: {resp}");
        assert!(error_of(&resp).starts_with("the query is empty"), "{resp}");
        assert!(error_of(&resp).contains(leave_out), "{resp}");
    }
    let (status, resp) =
        env.api.post("/v1/sets", &json!({ "name": "s", "users": ["ann"], "query": "state = NY" })).await;
    assert_eq!(status, 201, "{resp}");
    let (status, resp) = env.api.patch("/v1/sets/s", &json!({ "query": " " })).await;
    assert_eq!(status, 400, "{resp}");
    assert!(error_of(&resp).contains(leave_out), "{resp}");
    let (_, set) = env.api.get("/v1/sets/s").await;
    assert_eq!(set["query"], "state = NY", "the refused edit changed nothing");
    let (status, resp) = env.api.patch("/v1/sets/s", &json!({ "query": null })).await;
    assert_eq!((status, resp.get("query")), (200, None), "{resp}");

    let base = env.api.clone();
    let (code, _, err) =
        tokio::task::spawn_blocking(move || cli(&base, &["set", "create", "t", "--users", "ann", "--query", ""]))
            .await
            .unwrap();
    assert_eq!(code, 1, "{err}");
    assert!(err.starts_with("error: the query is empty") && err.contains("--no-query"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_a_remote_refuses_at_once_to_create_again_what_was_deleted_but_not_what_left_its_set() {
    let env = Env::start().await;
    env.api.create(Kind::User, json!({ "id": "ann", "name": "Ann" })).await;
    let (status, resp) =
        env.api.post("/v1/sets", &json!({ "name": "ny", "users": ["ann"], "query": "state = NY" })).await;
    assert_eq!(status, 201, "{resp}");
    let remote = env.remote("laptop", "ny").await;
    let at_remote = &remote.api;

    // Deleted at the main.
    env.api.create(Kind::Contact, json!({ "id": "gone", "state": "NY" })).await;
    wait_holds(at_remote, Kind::Contact, "gone", true).await;
    let (status, _) = env.api.delete("/v1/contacts/gone").await;
    assert_eq!(status, 200);
    wait_holds(at_remote, Kind::Contact, "gone", false).await;
    let again = "the contact gone was deleted, and the main refuses to bring a deleted record back from a remote";
    refused(at_remote, Kind::Contact, json!({ "id": "gone", "state": "NY" }), 409, again).await;

    // Deleted here, with its note, once the main has merged the delete.
    let mine = at_remote.create(Kind::Contact, json!({ "id": "mine", "state": "NY" })).await;
    let note = at_remote.create(Kind::Note, json!({ "contact_id": mine, "text": "t" })).await;
    wait_for("the main to merge the new contact", Duration::from_secs(15), || async {
        env.api.get("/v1/contacts/mine").await.0 == 200
    })
    .await;
    let (status, _) = at_remote.delete("/v1/contacts/mine").await;
    assert_eq!(status, 200);
    wait_for("the main to merge the delete", Duration::from_secs(15), || async {
        env.api.get("/v1/contacts/mine").await.0 == 404
    })
    .await;
    wait_holds(at_remote, Kind::Contact, "mine", false).await;
    refused(at_remote, Kind::Contact, json!({ "id": "mine" }), 409, "the contact mine was deleted").await;
    refused(at_remote, Kind::Note, json!({ "id": note, "contact_id": "gone", "text": "t" }), 409, "was deleted").await;

    // Left the set (the main moved it to CT): not a delete, so the remote does not refuse it
    // itself; the main decides.
    env.api.create(Kind::Contact, json!({ "id": "moved", "state": "NY" })).await;
    wait_holds(at_remote, Kind::Contact, "moved", true).await;
    let (status, _) = env.api.patch("/v1/contacts/moved", &json!({ "state": "CT" })).await;
    assert_eq!(status, 200);
    wait_holds(at_remote, Kind::Contact, "moved", false).await;
    let (status, resp) = at_remote.post("/v1/contacts", &json!({ "id": "moved", "state": "NY" })).await;
    assert_eq!(status, 201, "{resp}");
    remote.stop().await;
}

/// One request that is wrong in some way: a method, a path, a query and a body. Every one must
/// be refused (4xx) with a message and change nothing.
fn bad_request(rng: &mut crate::harness::Rng) -> (&'static str, String, Vec<u8>) {
    const COLLECTIONS: &[&str] = &["contacts", "companies", "groups", "notes", "memberships", "users", "teams"];
    let collection = *rng.pick(COLLECTIONS);
    let odd_id = match rng.below(6) {
        0 => "%FF%FE".to_owned(),
        1 => "a".repeat(65 + rng.below(5000)),
        2 => "no%20such%20id".to_owned(),
        3 => "%00".to_owned(),
        4 => format!("missing-{}", rng.next_u64()),
        _ => "..%2F..%2Fetc".to_owned(),
    };
    let json = |v: J| serde_json::to_vec(&v).unwrap();
    match rng.below(12) {
        // A field of the wrong type, or one that does not exist.
        0 => {
            let field = *rng.pick(&["last_name", "access", "manager", "users", "custom", "contact_id", "done", "due"]);
            (
                "POST",
                format!("/v1/{collection}"),
                json(json!({ "id": format!("bad-{}", rng.next_u64()), field: rng.wrong_value() })),
            )
        }
        1 => {
            let field = format!("no_such_{}", rng.text(4).replace(['"', '\\'], ""));
            ("POST", format!("/v1/{collection}"), json(json!({ field: 1 })))
        }
        // A body that is not a JSON object: nested beyond reason, bytes, an array, too large.
        2 => {
            let depth = 200 + rng.below(100_000);
            ("POST", format!("/v1/{collection}"), format!("{}{}", "[".repeat(depth), "]".repeat(depth)).into_bytes())
        }
        3 => {
            let n = rng.below(2000);
            ("POST", format!("/v1/{collection}"), rng.bytes(n))
        }
        4 => ("POST", format!("/v1/{collection}"), json(json!([1, 2, 3]))),
        5 => ("POST", format!("/v1/{collection}"), vec![b' '; 1024 * 1024 + 1 + rng.below(1000)]),
        // A bad id to create, change or delete.
        6 => {
            let n = 1 + rng.below(80);
            ("POST", format!("/v1/{collection}"), json(json!({ "id": rng.text(n) + " " })))
        }
        7 => ("PATCH", format!("/v1/{collection}/{odd_id}"), json(json!({ "last_name": "x" }))),
        8 => ("DELETE", format!("/v1/{collection}/{odd_id}"), Vec::new()),
        // Odd query parameters.
        9 => {
            let query = match rng.below(6) {
                0 => "limit=-1".to_owned(),
                1 => "limit=abc".to_owned(),
                2 => "limit=99999999999999999999".to_owned(),
                3 => "no_such_field=1".to_owned(),
                4 => format!("last_name=%FF{}", rng.below(10)),
                _ => "limit=1&limit=2&after=%C3".to_owned(),
            };
            ("GET", format!("/v1/{collection}?{query}"), Vec::new())
        }
        // A method a path does not take, or no such path.
        10 => (*rng.pick(&["PUT", "PATCH", "DELETE"]), format!("/v1/{collection}"), Vec::new()),
        _ => (
            "GET",
            format!(
                "/v1/{}/{}/{}",
                rng.text(3).replace(['/', '%', '?', '#', ' ', '\n', '\t', '"', '\\'], "q"),
                odd_id,
                rng.below(9)
            ),
            Vec::new(),
        ),
    }
}

/// Every record of every kind.
fn everything(store: &crmsync::store::Store) -> crate::harness::Snapshot {
    let mut out = crate::harness::Snapshot::new();
    for kind in Kind::ALL {
        store.for_each(kind, |id, r| drop(out.insert((kind, id.to_owned()), r.fields))).unwrap();
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_thousands_of_random_bad_requests_are_refused_with_a_message_and_change_nothing() {
    let seed = crate::harness::seed();
    println!("random bad requests, seed {seed} (CRMSYNC_SEED={seed} replays them)");
    let env = Env::start().await;
    env.create_all_set("everyone").await;
    crate::harness::seed_contacts(env.main(), 20, "c").await;
    let remote = env.remote("laptop", "everyone").await;
    crate::harness::wait_converged(env.main(), remote.remote.store()).await;
    let (main_before, remote_before) = (everything(env.main().store()), everything(remote.remote.store()));
    let client = crate::harness::http_client();
    let mut rng = crate::harness::Rng::new(seed);
    let mut outcomes: std::collections::BTreeMap<(&str, u16), usize> = Default::default();
    for n in 0..3000 {
        let (side, base) = if n % 2 == 0 { ("main", &env.api.base) } else { ("remote", &remote.api.base) };
        let (method, path, body) = bad_request(&mut rng);
        let what = format!("{side}: {method} {} ({} bytes of body)", &path[..path.len().min(120)], body.len());
        let request = client
            .request(method.parse().unwrap(), format!("{base}{path}"))
            .bearer_auth(&env.token)
            .header("content-type", "application/json")
            .body(body);
        let resp = request.send().await.unwrap_or_else(|e| panic!("{what}: no answer: {e}"));
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap_or_default();
        *outcomes.entry((side, status)).or_default() += 1;
        assert!((400..500).contains(&status), "{what}: answered {status}: {text}");
        let body: J = serde_json::from_str(&text).unwrap_or_else(|_| panic!("{what}: {status} {text:?} is not JSON"));
        assert!(body["error"].as_str().is_some_and(|e| e.len() > 10), "{what}: no clear message: {body}");
    }
    println!("outcomes (side, status): {outcomes:?}");
    // Nothing changed, and both still answer.
    assert_eq!(env.api.get("/v1/status").await.0, 200);
    assert_eq!(remote.api.get("/v1/status").await.0, 200);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(everything(env.main().store()) == main_before, "a refused request changed the main");
    assert!(everything(remote.remote.store()) == remote_before, "a refused request changed the remote");
    assert_eq!(remote.remote.store().uploads_len().unwrap(), 0, "a refused request queued an upload");
    remote.stop().await;
}
