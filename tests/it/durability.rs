//! No confirmed edit is ever lost: an edit a remote answered 2xx for reaches the main and every
//! remote that should hold it, in its last value, whatever restarts, races and reorderings
//! happen on the way. Processes are killed for real (SIGKILL) where it matters.

use std::time::{Duration, Instant};

use crmsync::model::{Field, Fields, Kind, Value};
use crmsync::store::Store;
use crmsync::wire::{self, Envelope, Op};
use futures::StreamExt;
use serde_json::{Value as J, json};

use crate::harness::{Api, Env, Stop, cli, main_process, snapshot, stop, wait_converged, wait_for_status};

/// A remote makes 600 contacts, then a note on each even one and deletes each odd one, all
/// while the main is down; the main then starts and is stopped `stops.len()` times, each time
/// once it has merged the given number of uploads. In the end the main and the remote hold
/// every note and no odd contact, and no edit was refused anywhere.
async fn merge_order_survives_main_stops(stops: &[(u64, Stop)]) {
    const N: usize = 600;
    let mut env = Env::start().await;
    env.create_all_set("everyone").await;
    let dir = env.init_remote("laptop", "everyone").await;
    env.stop_main().await;
    let remote = env.start_remote(&dir).await;
    let api = remote.api.clone();
    let creates =
        futures::stream::iter(0..N)
            .map(|i| {
                let api = api.clone();
                async move {
                    api.create(Kind::Contact, json!({ "id": format!("c{i}"), "first_name": format!("F{i}") })).await
                }
            })
            .buffer_unordered(16)
            .collect::<Vec<_>>();
    creates.await;
    let follow_ups = futures::stream::iter(0..N)
        .map(|i| {
            let api = api.clone();
            async move {
                if i % 2 == 0 {
                    api.create(
                        Kind::Note,
                        json!({ "id": format!("n{i}"), "contact_id": format!("c{i}"), "text": "hi" }),
                    )
                    .await;
                } else {
                    let (status, body) = api.delete(&format!("/v1/contacts/c{i}")).await;
                    assert_eq!(status, 200, "{body}");
                }
            }
        })
        .buffer_unordered(16)
        .collect::<Vec<_>>();
    follow_ups.await;
    wait_for_status(&api, |s| s["uploads"]["waiting"] == 0).await;
    let nats = env.main_nats().await;
    let total = nats.uploads_waiting().await.unwrap();
    assert_eq!(total, (2 * N) as u64, "every edit is in CRM_UP");

    let data = env.main_config().data_dir;
    let port = crmsync::natsd::free_port();
    let main_api = env.api_at(format!("http://127.0.0.1:{port}"));
    for &(merged, how) in stops {
        let mut main = main_process(&env.nats.url(), &data, port);
        let start = Instant::now();
        while total - nats.uploads_waiting().await.unwrap() < merged {
            assert!(start.elapsed() < Duration::from_secs(60), "the main never merged {merged} uploads");
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        stop(&mut main, how).await;
    }
    let mut main = main_process(&env.nats.url(), &data, port);
    let half = (N / 2) as u64;
    let status = wait_for_status(&main_api, |s| {
        s["uploads_waiting"] == 0
            && s["uploads_parked"] == 0
            && s["counts"]["contact"] == half
            && s["counts"]["note"] == half
            && s["outbox"] == 0
    })
    .await;
    assert_eq!(status["refused"], 0, "the main refused edits: {}", status["sync_log"]);
    assert!(status["recovered"].is_null(), "a file left by a kill was taken for a damaged one: {status}");
    let at_remote =
        wait_for_status(&api, |s| s["counts"]["contact"] == half && s["counts"]["note"] == half && s["backlog"] == 0)
            .await;
    assert_eq!(at_remote["refused"], 0, "the remote was told of refusals: {}", at_remote["sync_log"]);
    stop(&mut main, Stop::Term).await;

    let store = Store::open(&data.join("main.redb")).unwrap();
    for i in 0..N {
        let contact = store.get(Kind::Contact, &format!("c{i}")).unwrap();
        let note = store.get(Kind::Note, &format!("n{i}")).unwrap();
        if i % 2 == 0 {
            assert!(contact.is_some() && note.is_some(), "contact c{i} or its note is missing at the main");
        } else {
            assert!(contact.is_none(), "c{i} was deleted at the remote but lives at the main");
        }
    }
    assert_eq!(snapshot(&store), snapshot(remote.remote.store()), "the remote and the main differ");
    remote.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn merge_order_survives_a_main_killed_early_and_late() {
    merge_order_survives_main_stops(&[(1, Stop::Kill), (700, Stop::Kill)]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn merge_order_survives_a_main_killed_three_times() {
    merge_order_survives_main_stops(&[(150, Stop::Kill), (600, Stop::Kill), (1000, Stop::Kill)]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn merge_order_survives_a_main_stopped_while_merging() {
    merge_order_survives_main_stops(&[(50, Stop::Term), (620, Stop::Term)]).await;
}

/// An upload as a remote sends it, published by hand so the test decides the order in which
/// they reach `CRM_UP`, as a reconnect in the middle of a burst can.
async fn publish_upload(env: &Env, n: u64, kind: Kind, id: &str, op: Op, record: Option<Fields>) {
    let envelope = Envelope {
        product: wire::PRODUCT.into(),
        schema: wire::SCHEMA_MAJOR,
        db: env.main().database_id().to_owned(),
        event: crmsync::names::new_id(),
        kind,
        id: id.to_owned(),
        op,
        version: 0,
        origin: "laptop".into(),
        record,
        reason: None,
    };
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Nats-Msg-Id", envelope.event.as_str());
    headers.insert(wire::UPLOAD_ORDER, format!("queue1:{n}").as_str());
    let nats = env.main_nats().await;
    nats.js
        .publish_with_headers(wire::up_subject("laptop", kind, id), headers, envelope.encode().into())
        .await
        .unwrap()
        .await
        .unwrap();
}

fn fields(pairs: &[(&str, &str)]) -> Fields {
    let stamp = crmsync::hlc::wall_ms() << 16;
    pairs.iter().map(|(k, v)| (k.to_string(), Field { value: Value::Str(v.to_string()), stamp })).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploads_reaching_the_main_out_of_order_are_merged_in_the_order_they_were_made() {
    let env = Env::start().await;
    env.create_all_set("everyone").await;
    env.init_remote("laptop", "everyone").await;

    // Upload 1 (a note on a new contact) arrives before upload 0 (the contact).
    publish_upload(&env, 1, Kind::Note, "n1", Op::Upsert, Some(fields(&[("contact_id", "x"), ("text", "hi")]))).await;
    let status = wait_for_status(&env.api, |s| s["uploads_parked"] == 1).await;
    assert_eq!(status["refused"], 0, "{status}");
    assert_eq!(env.api.get("/v1/notes/n1").await.0, 404, "the note was merged before its contact");

    publish_upload(&env, 0, Kind::Contact, "x", Op::Upsert, Some(fields(&[("first_name", "Xavier")]))).await;
    wait_for_status(&env.api, |s| s["uploads_parked"] == 0 && s["counts"]["note"] == 1).await;
    let (status, note) = env.api.get("/v1/notes/n1").await;
    assert_eq!((status, note["contact_id"].clone()), (200, json!("x")), "{note}");

    // Upload 2 deletes the contact; then upload 0 comes again with a new message id, as a
    // remote sends it after NATS' deduplication window: it was merged, so it changes nothing
    // (without its number it would be refused, the contact being deleted at the main).
    publish_upload(&env, 2, Kind::Contact, "x", Op::Delete, None).await;
    wait_for_status(&env.api, |s| s["counts"]["contact"] == 0 && s["counts"]["note"] == 0).await;
    publish_upload(&env, 0, Kind::Contact, "x", Op::Upsert, Some(fields(&[("first_name", "Xavier")]))).await;
    let status = wait_for_status(&env.api, |s| s["uploads_waiting"] == 0).await;
    assert_eq!(status["refused"], 0, "a repeated upload was merged again: {}", status["sync_log"]);
    assert_eq!(status["counts"]["contact"], 0, "{status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writers_racing_on_one_contact_never_lose_a_change_nor_get_a_409() {
    const WRITERS: [&str; 12] = [
        "first_name",
        "last_name",
        "company",
        "title",
        "phone",
        "mobile",
        "email",
        "address1",
        "address2",
        "zip",
        "country",
        "website",
    ];
    const ROUNDS: usize = 12;
    let env = Env::start().await;
    env.create_all_set("everyone").await;
    let remote = env.remote("laptop", "everyone").await;
    env.api.create(Kind::Contact, json!({ "id": "hot", "city": "start" })).await;
    wait_for_status(&remote.api, |s| s["counts"]["contact"] == 1).await;

    let main_writers = WRITERS.map(|field| {
        let api = env.api.clone();
        tokio::spawn(async move {
            for round in 0..ROUNDS {
                let (status, body) = api.patch("/v1/contacts/hot", &json!({ field: format!("{field}-{round}") })).await;
                assert_eq!(status, 200, "PATCH of {field} at the main: {body}");
            }
        })
    });
    let remote_api = remote.api.clone();
    let remote_writer = tokio::spawn(async move {
        for round in 0..ROUNDS {
            let (status, body) =
                remote_api.patch("/v1/contacts/hot", &json!({ "city": format!("city-{round}") })).await;
            assert_eq!(status, 200, "PATCH of city at the remote: {body}");
            tokio::time::sleep(Duration::from_millis(30)).await;
        }
    });
    for w in main_writers {
        w.await.unwrap();
    }
    remote_writer.await.unwrap();

    wait_for_status(&remote.api, |s| s["uploads"]["waiting"] == 0).await;
    let status = wait_for_status(&env.api, |s| s["uploads_waiting"] == 0).await;
    wait_converged(env.main(), remote.remote.store()).await;
    assert_eq!(status["refused"], 0, "a lost race became a refusal: {}", status["sync_log"]);
    assert_eq!(remote.api.status().await["refused"], 0);
    let (_, hot) = env.api.get("/v1/contacts/hot").await;
    for field in WRITERS {
        assert_eq!(hot[field], json!(format!("{field}-{}", ROUNDS - 1)), "{hot}");
    }
    assert_eq!(hot["city"], json!(format!("city-{}", ROUNDS - 1)), "{hot}");
    remote.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_custom_field_is_edited_and_merged_on_its_own() {
    let env = Env::start().await;
    env.create_all_set("everyone").await;
    let remote = env.remote("laptop", "everyone").await;
    env.api.create(Kind::Contact, json!({ "id": "c", "custom": { "a": "1", "b": "1", "c": "1" } })).await;
    wait_for_status(&remote.api, |s| s["counts"]["contact"] == 1).await;

    // Two places change two custom fields of one contact at the same moment: both stay.
    let (at_main, at_remote) = (json!({ "custom": { "a": "main" } }), json!({ "custom": { "b": "remote" } }));
    let (main_edit, remote_edit) =
        tokio::join!(env.api.patch("/v1/contacts/c", &at_main), remote.api.patch("/v1/contacts/c", &at_remote),);
    assert_eq!(main_edit.0, 200, "{}", main_edit.1);
    assert_eq!(remote_edit.0, 200, "{}", remote_edit.1);
    assert_eq!(main_edit.1["custom"], json!({ "a": "main", "b": "1", "c": "1" }), "one key changed, the others kept");
    wait_for_status(&remote.api, |s| s["uploads"]["waiting"] == 0).await;
    wait_for_status(&env.api, |s| s["uploads_waiting"] == 0).await;
    wait_converged(env.main(), remote.remote.store()).await;
    let want = json!({ "a": "main", "b": "remote", "c": "1" });
    assert_eq!(env.api.get("/v1/contacts/c").await.1["custom"], want);
    assert_eq!(remote.api.get("/v1/contacts/c").await.1["custom"], want);

    // The command line: `custom.c=3` changes c alone, `custom.a=` clears a alone.
    assert_eq!(cli(&env.api, &["contact", "edit", "c", "custom.c=3"]).await.0, 0);
    assert_eq!(cli(&env.api, &["contact", "edit", "c", "custom.a="]).await.0, 0);
    let (code, out, _) = cli(&env.api, &["--json", "contact", "show", "c"]).await;
    assert_eq!(code, 0, "{out}");
    let shown: J = serde_json::from_str(&out).unwrap();
    assert_eq!(shown["custom"], json!({ "b": "remote", "c": "3" }), "{shown}");
    // Lists filter by a custom field.
    let (status, list) = env.api.get("/v1/contacts?custom.c=3").await;
    assert_eq!((status, list["items"].as_array().map(Vec::len)), (200, Some(1)), "{list}");
    remote.stop().await;
}

/// A client whose every request gives up after `limit`: a service that makes it wait longer
/// fails the test.
fn impatient(limit: Duration) -> reqwest::Client {
    crate::harness::http_client_builder().timeout(limit).build().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_nats_down_status_answers_at_once_and_a_write_is_refused_within_seconds() {
    let mut env = Env::start().await;
    env.create_all_set("everyone").await;
    let remote = env.remote("laptop", "everyone").await;
    env.api.create(Kind::Contact, json!({ "id": "before" })).await;
    let nats = &mut env.nats;
    tokio::task::block_in_place(|| nats.stop());

    let client = impatient(Duration::from_secs(5));
    for api in [&env.api, &remote.api] {
        let status: J = client
            .get(format!("{}/v1/status", api.base))
            .bearer_auth(&env.token)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(status["nats"]["connected"], false, "{status}");
    }
    let resp = client
        .post(format!("{}/v1/contacts", env.api.base))
        .bearer_auth(&env.token)
        .json(&json!({ "id": "during" }))
        .send()
        .await;
    let resp = resp.expect("the write is answered within seconds");
    assert_eq!(resp.status().as_u16(), 503);
    let body: J = resp.json().await.unwrap();
    let message = body["error"].as_str().unwrap();
    assert!(message.contains("unreachable") && message.contains("nothing was changed"), "{message}");
    // The remote keeps taking edits: they wait on its disk for NATS.
    let (status, body) = remote.api.post("/v1/contacts", &json!({ "id": "offline" })).await;
    assert_eq!(status, 201, "{body}");

    let nats = &mut env.nats;
    tokio::task::block_in_place(|| nats.restart()).unwrap();
    wait_for_status(&env.api, |s| s["nats"]["connected"] == true).await;
    wait_for_status(&env.api, |s| s["counts"]["contact"] == 2).await;
    assert_eq!(env.api.get("/v1/contacts/during").await.0, 404, "a refused write was committed after all");
    remote.stop().await;
}

/// Sends a write with an `Idempotency-Key` header.
async fn keyed(method: reqwest::Method, api: &Api, path: &str, key: &str, body: Option<J>) -> (u16, J) {
    let mut req = crate::harness::http_client()
        .request(method, format!("{}{path}", api.base))
        .header("Idempotency-Key", key)
        .bearer_auth(api.token.as_deref().unwrap_or_default());
    if let Some(body) = body {
        req = req.json(&body);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(J::Null))
}

/// Repeats writes with their `Idempotency-Key` at one API (a main's or a remote's), which
/// holds `before` contacts at the start.
async fn writes_repeated_with_their_key_apply_once(api: &Api, before: u64) {
    use reqwest::Method;
    // A create without an id, sent twice: one contact, the same id both times.
    let (s1, first) = keyed(Method::POST, api, "/v1/contacts", "k-create", Some(json!({ "city": "Troy" }))).await;
    let (s2, again) = keyed(Method::POST, api, "/v1/contacts", "k-create", Some(json!({ "city": "Troy" }))).await;
    assert_eq!((s1, s2), (201, 201), "{first} {again}");
    assert_eq!(first["id"], again["id"]);
    assert_eq!(api.status().await["counts"]["contact"], before + 1);
    let id = first["id"].as_str().unwrap().to_owned();

    // An update repeated after a later change does not undo the later change.
    let path = format!("/v1/contacts/{id}");
    assert_eq!(keyed(Method::PATCH, api, &path, "k-city", Some(json!({ "city": "Albany" }))).await.0, 200);
    assert_eq!(api.patch(&path, &json!({ "city": "Utica" })).await.0, 200);
    let (status, body) = keyed(Method::PATCH, api, &path, "k-city", Some(json!({ "city": "Albany" }))).await;
    assert_eq!((status, body["city"].clone()), (200, json!("Utica")), "{body}");

    // A delete repeated is still a success, not a 404.
    assert_eq!(keyed(Method::DELETE, api, &path, "k-delete", None).await.0, 200);
    assert_eq!(keyed(Method::DELETE, api, &path, "k-delete", None).await.0, 200);
    // A key used for another record is refused, and a malformed key too.
    let (status, body) = keyed(Method::DELETE, api, "/v1/contacts/other", "k-create", None).await;
    assert_eq!(status, 400, "{body}");
    assert!(body["error"].as_str().unwrap().contains("use a new key"), "{body}");
    let (status, body) = keyed(Method::POST, api, "/v1/contacts", "bad key!", Some(json!({}))).await;
    assert_eq!(status, 400, "{body}");
    assert!(body["error"].as_str().unwrap().contains("Idempotency-Key"), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_repeated_with_its_idempotency_key_is_applied_once() {
    let env = Env::start().await;
    env.create_all_set("everyone").await;
    let remote = env.remote("laptop", "everyone").await;
    writes_repeated_with_their_key_apply_once(&env.api, 0).await;
    // The same at a remote, with the keys of the main's requests used again: each service
    // keeps its own.
    wait_for_status(&remote.api, |s| s["backlog"] == 0 && s["counts"]["contact"] == 0).await;
    writes_repeated_with_their_key_apply_once(&remote.api, 0).await;
    remote.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_files_are_readable_by_their_owner_alone() {
    use std::os::unix::fs::PermissionsExt;
    let env = Env::start().await;
    env.create_all_set("everyone").await;
    let remote = env.remote("laptop", "everyone").await;
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    let main_dir = env.main_config().data_dir;
    assert_eq!(mode(&main_dir), 0o700, "{}", main_dir.display());
    assert_eq!(mode(&main_dir.join("main.redb")), 0o600);
    assert_eq!(mode(&remote.data_dir), 0o700, "{}", remote.data_dir.display());
    assert_eq!(mode(&remote.data_dir.join("remote.redb")), 0o600);
    assert_eq!(mode(&remote.data_dir.join("remote.json")), 0o600);
    // The bundle the command line writes holds the remote's identity: its owner's alone too.
    let bundle = env.dir.path().join("branch.bundle.json");
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_crmsync"))
        .args(["--api", &env.api.base, "remote", "create", "branch", "--set", "everyone", "--out"])
        .env("CRMSYNC_TOKEN", &env.token)
        .arg(&bundle)
        .output()
        .await
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(mode(&bundle), 0o600);
    remote.stop().await;
}

/// Damages a file, sparing the bytes around the queued uploads (found by their subjects), so
/// that whether they survive is up to crmsync: `Truncate` cuts off all that follows the last of
/// them; `Overwrite` writes garbage over every other byte after the first page.
#[derive(Clone, Copy, Debug)]
enum Damage {
    Truncate,
    Overwrite,
}

fn damage(path: &std::path::Path, how: Damage) {
    const SPARE: usize = 1024;
    let mut bytes = std::fs::read(path).unwrap();
    let needle = b"crm.up.";
    let uploads: Vec<usize> =
        bytes.windows(needle.len()).enumerate().filter(|(_, w)| w == needle).map(|(i, _)| i).collect();
    assert!(!uploads.is_empty(), "no queued upload in the file");
    let spared = |i: usize| uploads.iter().any(|u| i + SPARE >= *u && i <= u + SPARE);
    match how {
        Damage::Truncate => {
            let end = (uploads.last().unwrap() + SPARE).min(bytes.len() - 4096);
            bytes.truncate(end);
        }
        Damage::Overwrite => {
            for (i, b) in bytes.iter_mut().enumerate().skip(4096) {
                if !spared(i) {
                    *b = (i.wrapping_mul(2654435761) >> 13) as u8;
                }
            }
        }
    }
    std::fs::write(path, bytes).unwrap();
}

/// A remote whose file is damaged while it is stopped, with edits still waiting for upload:
/// it starts, says what happened, rebuilds from the stream, and its edits reach the main.
async fn a_damaged_remote_recovers(how: Damage) {
    let mut env = Env::start().await;
    env.create_all_set("everyone").await;
    let remote = env.remote("laptop", "everyone").await;
    crate::harness::seed_contacts(env.main(), 50, "c").await;
    wait_converged(env.main(), remote.remote.store()).await;
    let nats = &mut env.nats;
    tokio::task::block_in_place(|| nats.stop());
    for i in 0..5 {
        let (status, body) = remote.api.patch(&format!("/v1/contacts/c{i}"), &json!({ "city": "Offline" })).await;
        assert_eq!(status, 200, "{body}");
    }
    let dir = remote.data_dir.clone();
    remote.stop().await;
    damage(&dir.join("remote.redb"), how);
    let nats = &mut env.nats;
    tokio::task::block_in_place(|| nats.restart()).unwrap();

    let remote = env.start_remote(&dir).await;
    let status = remote.api.status().await;
    let recovered = &status["recovered"];
    assert!(recovered.is_object(), "the damage went unnoticed: {status}");
    let set_aside = recovered["damaged_file"].as_str().unwrap();
    assert!(std::path::Path::new(set_aside).exists(), "the damaged file was not kept: {recovered}");
    assert!(recovered["uploads_kept"].as_u64().unwrap() >= 5, "edits waiting for upload were lost: {recovered}");
    {
        let file = recovered["uploads_file"].as_str().unwrap();
        let kept: J = serde_json::from_slice(&std::fs::read(file).unwrap()).unwrap();
        assert_eq!(kept.as_array().unwrap().len() as u64, recovered["uploads_kept"].as_u64().unwrap(), "{kept}");
    }
    wait_for_status(&remote.api, |s| s["uploads"]["waiting"] == 0).await;
    wait_for_status(&env.api, |s| s["uploads_waiting"] == 0).await;
    wait_converged(env.main(), remote.remote.store()).await;
    for i in 0..5 {
        assert_eq!(env.api.get(&format!("/v1/contacts/c{i}")).await.1["city"], "Offline", "edit {i} lost");
    }
    remote.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_truncated_remote_file_is_set_aside_and_rebuilt() {
    a_damaged_remote_recovers(Damage::Truncate).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_overwritten_remote_file_is_set_aside_and_rebuilt() {
    a_damaged_remote_recovers(Damage::Overwrite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_main_file_is_set_aside_and_rebuilt_from_the_events() {
    let mut env = Env::start().await;
    env.create_all_set("everyone").await;
    let remote = env.remote("laptop", "everyone").await;
    crate::harness::seed_contacts(env.main(), 50, "c").await;
    let (status, body) = remote.api.patch("/v1/contacts/c1", &json!({ "city": "Edited" })).await;
    assert_eq!(status, 200, "{body}");
    wait_for_status(&env.api, |s| s["uploads_waiting"] == 0).await;
    wait_converged(env.main(), remote.remote.store()).await;
    let before = snapshot(env.main().store());
    env.stop_main().await;
    let file = env.main_config().data_dir.join("main.redb");
    let len = std::fs::metadata(&file).unwrap().len();
    std::fs::OpenOptions::new().write(true).open(&file).unwrap().set_len(len / 2).unwrap();

    env.restart_main().await;
    let status = env.api.status().await;
    assert!(status["recovered"].is_object(), "the damage went unnoticed: {status}");
    assert_eq!(snapshot(env.main().store()), before, "the rebuilt main differs");
    // Edits from the remote go on being merged, in order.
    let (s1, b1) = remote.api.patch("/v1/contacts/c2", &json!({ "city": "After" })).await;
    let (s2, b2) = remote.api.post("/v1/notes", &json!({ "contact_id": "c2", "text": "after the repair" })).await;
    assert_eq!((s1, s2), (200, 201), "{b1} {b2}");
    wait_for_status(&remote.api, |s| s["uploads"]["waiting"] == 0).await;
    let status = wait_for_status(&env.api, |s| s["uploads_waiting"] == 0 && s["uploads_parked"] == 0).await;
    assert_eq!(status["refused"], 0, "{status}");
    wait_converged(env.main(), remote.remote.store()).await;
    assert_eq!(env.api.get("/v1/contacts/c2").await.1["city"], "After");
    remote.stop().await;
}

/// Sets the largest file a running process may write (`None`: no limit), as a full disk would
/// stop it: a write that would grow a file beyond it fails.
fn limit_file_size(pid: u32, bytes: Option<u64>) {
    let limit = libc::rlimit { rlim_cur: bytes.unwrap_or(libc::RLIM_INFINITY), rlim_max: libc::RLIM_INFINITY };
    // SAFETY: prlimit on a child process of this test, with a valid limit and no old-limit out.
    let rc = unsafe { libc::prlimit(pid as i32, libc::RLIMIT_FSIZE, &limit, std::ptr::null_mut()) };
    assert_eq!(rc, 0, "prlimit: {}", std::io::Error::last_os_error());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_refuses_writes_with_507_keeps_reads_and_resumes_by_itself() {
    let env = Env::start().await;
    env.create_all_set("everyone").await;
    let dir = env.init_remote("laptop", "everyone").await;
    crate::harness::seed_contacts(env.main(), 20, "c").await;
    let port = crmsync::natsd::free_port();
    let api = env.api_at(format!("http://127.0.0.1:{port}"));
    let mut child = crate::harness::remote_process(&dir, port, 200);
    wait_for_status(&api, |s| s["counts"]["contact"] == 20).await;

    // The disk is full: the remote's file may not grow any more.
    let size = std::fs::metadata(dir.join("remote.redb")).unwrap().len();
    limit_file_size(child.id().unwrap(), Some(size));
    let big: serde_json::Map<String, J> = (0..90).map(|i| (format!("k{i}"), json!("x".repeat(1000)))).collect();
    let mut saved = Vec::new();
    let refusal = loop {
        let id = format!("big{}", saved.len());
        let (status, body) = api.post("/v1/contacts", &json!({ "id": id, "custom": big })).await;
        match status {
            201 => saved.push(id),
            507 => break body,
            other => panic!("unexpected {other}: {body}"),
        }
        assert!(saved.len() < 2000, "the file never hit its limit");
    };
    let message = refusal["error"].as_str().unwrap();
    assert!(message.contains("free some space") && message.contains("nothing was changed"), "{message}");
    // Reads go on.
    let (status, list) = api.get("/v1/contacts?limit=5").await;
    assert_eq!((status, list["items"].as_array().map(Vec::len)), (200, Some(5)), "{list}");
    assert_eq!(api.get("/v1/contacts/c1").await.0, 200);

    // Space again: writes resume by themselves, and every edit answered 201 reaches the main.
    limit_file_size(child.id().unwrap(), None);
    let start = Instant::now();
    loop {
        let (status, body) = api.post("/v1/contacts", &json!({ "id": "after" })).await;
        if status == 201 {
            break;
        }
        assert_eq!(status, 507, "{body}");
        assert!(start.elapsed() < Duration::from_secs(30), "writes did not resume: {body}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    saved.push("after".into());
    wait_for_status(&api, |s| s["uploads"]["waiting"] == 0).await;
    wait_for_status(&env.api, |s| s["uploads_waiting"] == 0).await;
    for id in &saved {
        assert_eq!(env.api.get(&format!("/v1/contacts/{id}")).await.0, 200, "{id} answered 201 but is lost");
    }
    stop(&mut child, Stop::Term).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn merge_order_survives_a_nats_server_restart_under_uploads() {
    let mut env = Env::start().await;
    env.create_all_set("everyone").await;
    let remote = env.remote("laptop", "everyone").await;
    // A remote user keeps working: a contact, then a note on it, again and again.
    let api = remote.api.clone();
    let writer = tokio::spawn(async move {
        let mut made = 0;
        let start = Instant::now();
        while start.elapsed() < Duration::from_millis(2500) {
            api.create(Kind::Contact, json!({ "id": format!("c{made}") })).await;
            api.create(Kind::Note, json!({ "id": format!("n{made}"), "contact_id": format!("c{made}"), "text": "x" }))
                .await;
            made += 1;
        }
        made
    });
    tokio::time::sleep(Duration::from_millis(700)).await;
    let nats = &mut env.nats;
    tokio::task::block_in_place(|| nats.stop());
    tokio::time::sleep(Duration::from_millis(300)).await;
    let nats = &mut env.nats;
    tokio::task::block_in_place(|| nats.restart()).unwrap();
    let made = writer.await.unwrap();

    wait_for_status(&remote.api, |s| s["uploads"]["waiting"] == 0).await;
    let status = wait_for_status(&env.api, |s| {
        s["uploads_waiting"] == 0 && s["uploads_parked"] == 0 && s["counts"]["note"] == made
    })
    .await;
    assert_eq!(status["refused"], 0, "edits were refused: {}", status["sync_log"]);
    assert_eq!(status["counts"]["contact"], made, "{status}");
    wait_converged(env.main(), remote.remote.store()).await;
    remote.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_at_the_main_refuses_new_changes_and_loses_none_it_took() {
    let mut env = Env::start().await;
    env.stop_main().await;
    let data = env.main_config().data_dir;
    let port = crmsync::natsd::free_port();
    let api = env.api_at(format!("http://127.0.0.1:{port}"));
    let mut main = main_process(&env.nats.url(), &data, port);
    wait_for_status(&api, |s| s["nats"]["connected"] == true).await;
    let size = std::fs::metadata(data.join("main.redb")).unwrap().len();
    limit_file_size(main.id().unwrap(), Some(size));

    // Writes go on until the main cannot apply them: every answer says what became of it.
    let big: serde_json::Map<String, J> = (0..90).map(|i| (format!("k{i}"), json!("x".repeat(1000)))).collect();
    let (mut taken, mut refused) = (Vec::new(), Vec::new());
    for i in 0..400 {
        let id = format!("big{i}");
        let (status, body) = api.post("/v1/contacts", &json!({ "id": id, "custom": big })).await;
        let message = body["error"].as_str().unwrap_or_default().to_owned();
        match status {
            201 => taken.push(id),
            // Committed to the stream, not yet applied: it must show once there is room.
            503 if message.contains("is committed") => taken.push(id),
            507 => {
                assert!(message.contains("free some space"), "{message}");
                refused.push(id);
                if refused.len() == 3 {
                    break;
                }
            }
            other => panic!("unexpected {other}: {body}"),
        }
    }
    assert_eq!(refused.len(), 3, "the main never ran out of room ({} writes taken)", taken.len());
    assert_eq!(api.get("/v1/status").await.0, 200, "status must answer while the disk is full");

    limit_file_size(main.id().unwrap(), None);
    let start = Instant::now();
    loop {
        let (status, body) = api.post("/v1/contacts", &json!({ "id": "after" })).await;
        if status == 201 {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(30), "the main did not resume: {status} {body}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for id in &taken {
        assert_eq!(api.get(&format!("/v1/contacts/{id}")).await.0, 200, "{id} was taken but is lost");
    }
    for id in &refused {
        assert_eq!(api.get(&format!("/v1/contacts/{id}")).await.0, 404, "{id} was refused but is there");
    }
    stop(&mut main, Stop::Term).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remote_rebuild_on_a_truncated_file_recovers_and_a_broken_bundle_is_named() {
    let env = Env::start().await;
    env.create_all_set("everyone").await;
    let remote = env.remote("laptop", "everyone").await;
    crate::harness::seed_contacts(env.main(), 30, "c").await;
    wait_converged(env.main(), remote.remote.store()).await;
    let dir = remote.data_dir.clone();
    remote.stop().await;
    let file = dir.join("remote.redb");
    let len = std::fs::metadata(&file).unwrap().len();
    std::fs::OpenOptions::new().write(true).open(&file).unwrap().set_len(len / 2).unwrap();

    let rebuild = tokio::process::Command::new(env!("CARGO_BIN_EXE_crmsync"))
        .args(["remote", "rebuild", "--data"])
        .arg(&dir)
        .args(["--nats", &env.nats.url()])
        .output()
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&rebuild.stderr);
    assert!(rebuild.status.success(), "remote rebuild failed on a truncated file: {stderr}");
    assert!(stderr.contains("is damaged"), "the log does not say what happened: {stderr}");
    assert_eq!(snapshot(&Store::open(&file).unwrap()), snapshot(env.main().store()));

    std::fs::write(dir.join("remote.json"), b"{ not json").unwrap();
    let serve = tokio::process::Command::new(env!("CARGO_BIN_EXE_crmsync"))
        .args(["remote", "serve", "--listen", "127.0.0.1:0", "--data"])
        .arg(&dir)
        .output()
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&serve.stderr);
    assert!(!serve.status.success());
    assert!(stderr.contains("remote.json") && stderr.contains("remote init"), "{stderr}");
}

/// A remote process answers 201 for a contact and a note on it, again and again, and is killed
/// (SIGKILL) the moment the last answer arrives: started again, it uploads what it had not,
/// and the main holds every edit it answered for, notes after their contacts, none refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn merge_order_survives_a_remote_killed_right_after_its_answers() {
    let env = Env::start().await;
    env.create_all_set("everyone").await;
    let dir = env.init_remote("laptop", "everyone").await;
    let port = crmsync::natsd::free_port();
    let api = env.api_at(format!("http://127.0.0.1:{port}"));
    let mut child = crate::harness::remote_process(&dir, port, 200);
    wait_for_status(&api, |s| s["nats"]["connected"] == true).await;
    const N: usize = 150;
    for i in 0..N {
        api.create(Kind::Contact, json!({ "id": format!("c{i}") })).await;
        api.create(Kind::Note, json!({ "id": format!("n{i}"), "contact_id": format!("c{i}"), "text": "x" })).await;
    }
    stop(&mut child, Stop::Kill).await;

    let mut child = crate::harness::remote_process(&dir, port, 200);
    wait_for_status(&api, |s| s["uploads"]["waiting"] == 0).await;
    let status = wait_for_status(&env.api, |s| {
        s["uploads_waiting"] == 0 && s["uploads_parked"] == 0 && s["counts"]["note"] == N as u64
    })
    .await;
    assert_eq!(status["refused"], 0, "edits were refused: {}", status["sync_log"]);
    assert_eq!(status["counts"]["contact"], N as u64, "{status}");
    stop(&mut child, Stop::Term).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_command_line_sends_a_write_answered_503_again_with_the_same_idempotency_key() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // A service that answers 503 twice, then 201, and notes the key of each request.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let server = tokio::spawn(async move {
        let mut keys = Vec::new();
        let answer = |status: &str, body: &str| {
            format!(
                "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            )
        };
        let busy = answer("503 Service Unavailable", r#"{"error":"try again"}"#);
        for answer in [busy.clone(), busy, answer("201 Created", r#"{"id":"c1","version":1}"#)] {
            let (mut stream, _) = listener.accept().await.unwrap();
            let mut request = Vec::new();
            let mut buf = [0u8; 4096];
            while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                let n = stream.read(&mut buf).await.unwrap();
                request.extend_from_slice(&buf[..n]);
            }
            let text = String::from_utf8_lossy(&request).to_lowercase();
            keys.push(text.lines().find_map(|l| l.strip_prefix("idempotency-key: ").map(str::to_owned)));
            stream.write_all(answer.as_bytes()).await.unwrap();
            let _ = stream.shutdown().await;
        }
        keys
    });
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_crmsync"))
        .args(["--api", &base, "contact", "add", "id=c1"])
        .output()
        .await
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let keys = server.await.unwrap();
    assert!(keys[0].is_some(), "the write carried no Idempotency-Key");
    assert!(keys.iter().all(|k| k == &keys[0]), "the repeats carried other keys: {keys:?}");
}
