//! Each remote's own NATS identity, enforced by the server: with a remote's credentials a raw
//! client can read its own consumer and upload on its own subjects, and nothing else; a remote
//! deleted or re-created at the main is cut off within seconds, the server not restarted.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crmsync::main_service::RemoteRequest;
use crmsync::model::Kind;
use crmsync::transport::{Login, Nats};
use serde_json::json;

use crate::harness::{Env, seed_contacts, wait_converged, wait_for, wait_for_status};

/// A raw client logged in with a remote's credentials, and what the server refused it.
struct Raw {
    client: async_nats::Client,
    refused: Arc<Mutex<Vec<String>>>,
}

impl Raw {
    async fn of(env: &Env, dir: &std::path::Path) -> Raw {
        let bundle = crmsync::remote_service::read_bundle(dir).unwrap();
        let refused = Arc::new(Mutex::new(Vec::new()));
        let said = refused.clone();
        let client = async_nats::ConnectOptions::with_credentials(bundle.creds.as_deref().unwrap())
            .unwrap()
            .custom_inbox_prefix(crmsync::identity::inbox_prefix(&bundle.remote).unwrap())
            .request_timeout(Some(Duration::from_millis(700)))
            .event_callback(move |event| {
                let said = said.clone();
                async move {
                    if let async_nats::Event::ServerError(e) = event {
                        said.lock().unwrap().push(e.to_string());
                    }
                }
            })
            .connect(env.nats.url())
            .await
            .unwrap();
        Raw { client, refused }
    }

    /// Waits for the server to refuse something on `subject`.
    async fn refused_on(&self, subject: &str) {
        let start = Instant::now();
        loop {
            if self.refused.lock().unwrap().iter().any(|e| e.contains("Permissions Violation") && e.contains(subject)) {
                return;
            }
            assert!(
                start.elapsed() < Duration::from_secs(5),
                "no refusal on {subject}: {:?}",
                self.refused.lock().unwrap()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// A JetStream API request the server must refuse: no answer comes, and it says why.
    async fn request_refused(&self, subject: &str, body: &str) {
        let answer = self.client.request(subject.to_owned(), body.to_owned().into()).await;
        assert!(answer.is_err(), "{subject} was answered: {:?}", answer.map(|m| m.payload));
        self.refused_on(subject).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_remote_syncs_with_its_own_credentials_and_the_server_refuses_it_everything_else() {
    let env = Env::start_secure().await;
    env.create_all_set("everyone").await;
    env.create_all_set("others").await;
    let laptop = env.remote("laptop", "everyone").await;
    let branch_dir = env.init_remote("branch", "others").await;
    seed_contacts(env.main(), 5, "c").await;
    // What it may do, it does: pull, acknowledge, upload, report its sessions.
    wait_converged(env.main(), laptop.remote.store()).await;
    let (status, body) = laptop.api.patch("/v1/contacts/c1", &json!({ "city": "Ithaca" })).await;
    assert_eq!(status, 200, "{body}");
    wait_for("the edit is merged", Duration::from_secs(20), || async {
        env.api.get("/v1/contacts/c1").await.1["city"] == "Ithaca"
    })
    .await;
    wait_for("the session reaches the main", Duration::from_secs(20), || async {
        !env.main().sessions(Some("laptop"), 1).unwrap().is_empty()
    })
    .await;

    let nats = env.main_nats().await;
    let events_before = nats.last_sequence(crmsync::wire::EVENTS_STREAM).await.unwrap();
    let raw = Raw::of(&env, &laptop.data_dir).await;
    // Reading beyond its own consumer.
    for subject in ["crm.sync.>", "crm.sync.others.>", "crm.sync.everyone.>", "_INBOX.>", "crm.up.>", ">"] {
        let _sub = raw.client.subscribe(subject.to_owned()).await.unwrap();
        raw.refused_on(subject).await;
    }
    let branch = crmsync::remote_service::read_bundle(&branch_dir).unwrap().consumer;
    for (subject, body) in [
        (format!("$JS.API.CONSUMER.MSG.NEXT.CRM_SYNC.{branch}"), r#"{"batch":1}"#.to_owned()),
        (format!("$JS.API.CONSUMER.INFO.CRM_SYNC.{branch}"), String::new()),
        (
            "$JS.API.CONSUMER.CREATE.CRM_SYNC.mine".to_owned(),
            r#"{"stream_name":"CRM_SYNC","config":{"name":"mine","filter_subject":"crm.sync.>"}}"#.to_owned(),
        ),
        (format!("$JS.API.CONSUMER.DELETE.CRM_SYNC.{branch}"), String::new()),
        (format!("$JS.API.CONSUMER.PAUSE.CRM_SYNC.{}", laptop.remote.bundle().consumer), "{}".to_owned()),
        ("$JS.API.STREAM.DELETE.CRM_SYNC".to_owned(), String::new()),
        ("$JS.API.STREAM.PURGE.CRM_UP".to_owned(), String::new()),
        ("$JS.API.STREAM.LIST".to_owned(), "{}".to_owned()),
        ("$JS.API.DIRECT.GET.CRM_SYNC.crm.sync.others.contact.c1".to_owned(), String::new()),
        ("$JS.API.DIRECT.GET.CRM_SYNC.crm.sync.~branch.contact.c1".to_owned(), String::new()),
    ] {
        raw.request_refused(&subject, &body).await;
    }
    // Writing where it may not.
    for subject in ["crm.up.branch.contact.c1", "crm.evt.contact.c1", "crm.sync.everyone.contact.c1"] {
        raw.client.publish(subject.to_owned(), "forged".into()).await.unwrap();
        raw.refused_on(subject).await;
    }
    // Nothing it tried changed anything.
    assert_eq!(nats.last_sequence(crmsync::wire::EVENTS_STREAM).await.unwrap(), events_before);
    assert_eq!(nats.uploads_waiting_from("branch").await.unwrap(), 0);
    assert!(nats.remote_backlog(&branch).await.is_ok(), "the other remote's consumer is still there");
    // Its own consumer answers it.
    let own = format!("$JS.API.CONSUMER.INFO.CRM_SYNC.{}", laptop.remote.bundle().consumer);
    assert!(raw.client.request(own, "".into()).await.is_ok());
    laptop.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_remote_deleted_or_recreated_at_the_main_is_cut_off_within_seconds() {
    let env = Env::start_secure().await;
    env.create_all_set("everyone").await;
    let laptop = env.remote("laptop", "everyone").await;
    let branch = env.remote("branch", "everyone").await;
    seed_contacts(env.main(), 3, "c").await;
    wait_converged(env.main(), laptop.remote.store()).await;
    wait_converged(env.main(), branch.remote.store()).await;
    let old_laptop = crmsync::remote_service::read_bundle(&laptop.data_dir).unwrap();

    // Re-created: the old copy's connection is closed and its credentials refused.
    let bundle = env.main().recreate_remote("laptop").await.unwrap();
    let status = wait_for_status(&laptop.api, |s| s["nats"]["connected"] == false).await;
    assert!(status["nats"]["error"].as_str().is_some_and(|e| e.to_lowercase().contains("revoked")), "{status}");
    let login = Login { creds: old_laptop.creds.clone(), inbox_prefix: Some("_INBOX_laptop".into()), ca: None };
    assert!(Nats::connect_as(&env.nats.url(), "old", &login).await.is_err(), "the old credentials still work");
    // The new bundle syncs.
    let file = env.dir.path().join("new.bundle.json");
    std::fs::write(&file, serde_json::to_vec(&bundle).unwrap()).unwrap();
    let dir = env.dir.path().join("new-laptop");
    crmsync::remote_service::init(&file, &dir).unwrap();
    let new = env.start_remote(&dir).await;
    wait_converged(env.main(), new.remote.store()).await;

    // Deleted: the same, and the other remotes go on.
    env.main().delete_remote("branch").await.unwrap();
    wait_for_status(&branch.api, |s| s["nats"]["connected"] == false).await;
    env.main().create(Kind::Contact, &json!({ "id": "after" })).await.unwrap();
    wait_converged(env.main(), new.remote.store()).await;
    assert!(
        env.main()
            .create_remote(&RemoteRequest { name: "branch".into(), set: "everyone".into(), ..Default::default() })
            .await
            .is_ok()
    );
    laptop.stop().await;
    branch.stop().await;
    new.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_halted_or_expired_remote_is_cut_off_and_a_resumed_one_syncs_again_with_its_bundle() {
    let mut env = Env::start_secure().await;
    env.create_all_set("everyone").await;
    let laptop = env.remote("laptop", "everyone").await;
    seed_contacts(env.main(), 2, "c").await;
    wait_converged(env.main(), laptop.remote.store()).await;
    let bundle = crmsync::remote_service::read_bundle(&laptop.data_dir).unwrap();
    let login = Login { creds: bundle.creds.clone(), inbox_prefix: Some("_INBOX_laptop".into()), ca: None };

    // Halted: the connection closes, the credentials are refused, and the remote says why.
    env.main().halt_remote("laptop").await.unwrap();
    let refused = "refuses this remote's credentials";
    wait_for_status(&laptop.api, |s| {
        s["nats"]["connected"] == false && s["notice"].as_str().is_some_and(|n| n.contains(refused))
    })
    .await;
    assert!(Nats::connect_as(&env.nats.url(), "halted", &login).await.is_err(), "a halted remote's credentials work");
    // People go on working at both ends; nothing crosses.
    let (code, body) =
        laptop.api.post("/v1/contacts", &json!({ "id": "made-while-halted", "last_name": "Laptop" })).await;
    assert_eq!(code, 201, "{body}");
    env.main().create(Kind::Contact, &json!({ "id": "sent-while-halted" })).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(env.main().store().get(Kind::Contact, "made-while-halted").unwrap().is_none());
    assert!(laptop.remote.store().get(Kind::Contact, "sent-while-halted").unwrap().is_none());
    assert_eq!(laptop.api.get("/v1/status").await.1["uploads"]["waiting"], 1, "the edit waits at the remote");

    // Resumed: the same bundle logs in again, and what waited flows both ways.
    env.main().resume_remote("laptop").await.unwrap();
    wait_for("the remote's edit reaches the main", Duration::from_secs(15), || async {
        env.main().store().get(Kind::Contact, "made-while-halted").unwrap().is_some()
    })
    .await;
    wait_converged(env.main(), laptop.remote.store()).await;
    let status = wait_for_status(&laptop.api, |s| s["nats"]["connected"] == true).await;
    assert!(status["notice"].is_null(), "{status}");

    // Expired (the main's clock runs past the remote's 30 days, while the laptop is off): cut
    // off the same way, across a restart of the main.
    let data_dir = laptop.data_dir.clone();
    laptop.stop().await;
    env.stop_main().await;
    let clock = crmsync::wall_clock::WallClock::shifted(31 * 86_400_000);
    let expiry_check = Duration::from_millis(300);
    env.restart_main_with(crmsync::main_service::MainConfig { clock, expiry_check, ..env.main_config() }).await;
    wait_for("the main expires laptop", Duration::from_secs(20), || async {
        env.api.get("/v1/remotes/laptop").await.1["state"] == "expired"
    })
    .await;
    assert!(
        Nats::connect_as(&env.nats.url(), "expired", &login).await.is_err(),
        "an expired remote's credentials work"
    );
    let laptop = env.start_remote(&data_dir).await;
    wait_for_status(&laptop.api, |s| {
        s["nats"]["connected"] == false && s["notice"].as_str().is_some_and(|n| n.contains(refused))
    })
    .await;
    laptop.stop().await;
}

/// The deployment the README describes: `crmsync nats-auth` makes the authority and the
/// server's settings, nats-server runs with them, the main logs in with `--authority`, and a
/// remote set up from its bundle syncs with the credentials inside it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_auth_sets_up_a_server_that_the_main_and_its_remotes_log_in_to() {
    use crate::harness::{Api, Stop, cli, crmsync_process, stop};
    let dir = tempfile::tempdir().unwrap();
    let (authority, settings) = (dir.path().join("main-data/nats-authority.json"), dir.path().join("nats-auth.conf"));
    let resolver = dir.path().join("resolver");
    let offline = Api::new("http://127.0.0.1:9".into());
    let (code, out, err) = cli(
        &offline,
        &[
            "nats-auth",
            "--authority",
            authority.to_str().unwrap(),
            "--resolver-dir",
            resolver.to_str().unwrap(),
            "--out",
            settings.to_str().unwrap(),
        ],
    )
    .await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("nats-auth.conf") && err.contains("created the NATS authority"), "{out} {err}");
    let auth = std::fs::read_to_string(&settings).unwrap();
    assert!(auth.contains("operator:") && auth.contains("resolver"), "{auth}");
    let opts = crmsync::natsd::NatsdOptions { auth: Some(auth), ..Default::default() };
    let nats = nats_with(dir.path(), opts).await;
    assert!(Nats::connect(&nats.url(), "anonymous").await.is_err(), "the server takes anonymous clients");

    let port = crmsync::natsd::free_port();
    let listen = format!("127.0.0.1:{port}");
    let main_data = dir.path().join("main-data");
    let args = [
        "main",
        "serve",
        "--nats",
        &nats.url(),
        "--listen",
        &listen,
        "--authority",
        authority.to_str().unwrap(),
        "--data",
    ];
    let mut main = crmsync_process(&args, &main_data);
    let token = crate::harness::admin_token(&main_data).await;
    let api = Api::new(format!("http://{listen}")).with_token(&token);
    wait_for_status(&api, |s| s["role"] == "main").await;
    let bundle = dir.path().join("laptop.bundle.json");
    for command in [
        vec!["set", "create", "everyone", "--all"],
        vec!["remote", "create", "laptop", "--set", "everyone", "--out", bundle.to_str().unwrap()],
        vec!["contact", "add", "id=c1", "city=Albany"],
    ] {
        let (code, _, err) = cli(&api, &command).await;
        assert_eq!(code, 0, "{command:?}: {err}");
    }
    let text = std::fs::read_to_string(&bundle).unwrap();
    assert!(text.contains("BEGIN NATS USER JWT"), "the bundle carries the remote's credentials");
    let laptop = dir.path().join("laptop-data");
    let (code, _, err) =
        cli(&api, &["remote", "init", "--bundle", bundle.to_str().unwrap(), "--data", laptop.to_str().unwrap()]).await;
    assert_eq!(code, 0, "{err}");
    let remote_port = crmsync::natsd::free_port();
    let mut remote = crate::harness::remote_process(&laptop, remote_port, 100);
    let remote_api = Api::new(format!("http://127.0.0.1:{remote_port}")).with_token(&token);
    wait_for_status(&remote_api, |s| s["counts"]["contact"] == 1).await;
    assert_eq!(remote_api.get("/v1/contacts/c1").await.1["city"], "Albany");
    stop(&mut remote, Stop::Term).await;
    stop(&mut main, Stop::Term).await;
}

/// The APIs answer only a user with a token, their role decides what they may do (403 with
/// the rule), and they see only the records they may access, at the main and at a remote.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_apis_require_a_token_and_roles_and_access_decide_what_each_user_gets() {
    use crate::harness::{Api, cli};
    let env = Env::start().await;
    env.create_all_set("everyone").await;
    let mut tokens = std::collections::BTreeMap::new();
    for (id, role) in [("sam", "standard"), ("rita", "restricted"), ("bo", "browse"), ("meg", "manager")] {
        env.api.create(Kind::User, json!({ "id": id, "name": id, "role": role })).await;
        let (status, body) = env.api.post(&format!("/v1/users/{id}/tokens"), &json!({})).await;
        assert_eq!(status, 201, "{body}");
        tokens.insert(id, body["token"].as_str().unwrap().to_owned());
    }
    let as_user = |id: &str| Api::new(env.api.base.clone()).with_token(&tokens[id]);
    let (_, user) = env.api.get("/v1/users/sam").await;
    assert!(user.get("tokens").is_none(), "token hashes are never shown: {user}");

    // No token, or a wrong one: 401, saying how to sign in.
    let (status, body) = Api::new(env.api.base.clone()).get("/v1/contacts").await;
    assert_eq!(status, 401, "{body}");
    assert!(body["error"].as_str().unwrap().contains("Authorization: Bearer"), "{body}");
    let (status, _) = Api::new(env.api.base.clone()).with_token("crm_nope").get("/v1/status").await;
    assert_eq!(status, 401);

    // Roles: 403 with the rule.
    let refused = |body: &serde_json::Value, rule: &str| {
        assert!(body["error"].as_str().unwrap().contains(rule), "{body}");
    };
    let (status, body) = as_user("sam").post("/v1/sets", &json!({ "name": "mine", "all": true })).await;
    assert_eq!(status, 403);
    refused(&body, "only administrators and managers manage sets; sam is a standard user");
    let (status, _) = as_user("meg").post("/v1/sets", &json!({ "name": "mine", "all": true })).await;
    assert_eq!(status, 201);
    let (status, body) = as_user("bo").post("/v1/contacts", &json!({ "id": "b1" })).await;
    assert_eq!(status, 403);
    refused(&body, "browse users only read");
    let (status, body) = as_user("sam").post("/v1/users", &json!({ "name": "Eve" })).await;
    assert_eq!(status, 403);
    refused(&body, "only administrators and managers manage users");
    let (status, body) = as_user("sam").post("/v1/users/sam", &json!({ "tokens": ["x"] })).await;
    assert!(status == 400 || status == 405, "{status} {body}");
    as_user("sam").create(Kind::Contact, json!({ "id": "sams", "manager": "sam" })).await;
    let (status, body) = as_user("rita").patch("/v1/contacts/sams", &json!({ "city": "Troy" })).await;
    assert_eq!(status, 403);
    refused(&body, "restricted users change only the records they manage");
    let (status, made) = as_user("rita").post("/v1/contacts", &json!({ "id": "ritas" })).await;
    assert_eq!((status, made["manager"].as_str()), (201, Some("rita")), "{made}");
    assert_eq!(as_user("rita").patch("/v1/contacts/ritas", &json!({ "city": "Troy" })).await.0, 200);

    // Access: a private record is its manager's alone, and cannot be told from a missing one.
    as_user("sam")
        .create(Kind::Contact, json!({ "id": "secret", "last_name": "Secret", "manager": "sam", "access": "private" }))
        .await;
    as_user("sam").create(Kind::Note, json!({ "id": "n1", "contact_id": "secret", "text": "x" })).await;
    let (status, hidden) = as_user("bo").get("/v1/contacts/secret").await;
    let (_, missing) = as_user("bo").get("/v1/contacts/nothing").await;
    assert_eq!(status, 404);
    assert_eq!(hidden["error"].as_str().unwrap().replace("secret", "nothing"), missing["error"].as_str().unwrap());
    assert_eq!(as_user("bo").get("/v1/notes/n1").await.0, 404);
    for path in ["/v1/contacts", "/v1/contacts?last_name=Secret", "/v1/notes", "/v1/notes?contact_id=secret"] {
        let (status, page) = as_user("bo").get(path).await;
        assert_eq!(status, 200, "{page}");
        assert!(!page.to_string().contains("secret") || path.contains("contact_id"), "{path}: {page}");
        assert!(!page["items"].to_string().contains("\"secret\""), "{path}: {page}");
    }
    assert_eq!(as_user("sam").get("/v1/contacts/secret").await.0, 200);
    let (status, _) = as_user("bo").patch("/v1/contacts/secret", &json!({ "city": "X" })).await;
    assert_eq!(status, 404, "a write to a record one may not see is a write to a missing one");
    // Nor does `status` count it: only the administrator's counts every record.
    let counts = |id: &str| {
        let api = as_user(id);
        async move { api.get("/v1/status").await.1["counts"].clone() }
    };
    let (all, sams, bos) =
        (env.api.get("/v1/status").await.1["counts"].clone(), counts("sam").await, counts("bo").await);
    assert_eq!(sams, all, "sam sees every record");
    let one_less = |kind: &str| all[kind].as_u64().unwrap() - 1;
    assert_eq!(
        (bos["contact"].as_u64(), bos["note"].as_u64()),
        (Some(one_less("contact")), Some(one_less("note"))),
        "{bos}"
    );

    // At a remote: the same tokens, the same rules.
    let laptop = env.remote("laptop", "everyone").await;
    wait_converged(env.main(), laptop.remote.store()).await;
    let at_laptop = |id: &str| Api::new(laptop.api.base.clone()).with_token(&tokens[id]);
    assert_eq!(at_laptop("sam").get("/v1/contacts/secret").await.0, 200);
    assert_eq!(at_laptop("bo").get("/v1/contacts/secret").await.0, 404);
    assert_eq!(at_laptop("bo").post("/v1/contacts", &json!({ "id": "b2" })).await.0, 403);
    assert_eq!(Api::new(laptop.api.base.clone()).get("/v1/status").await.0, 401);

    // One token revoked alone: the lost laptop's stops working, the user's other goes on.
    let (code, out, err) = cli(&env.api, &["user", "token", "sam"]).await;
    assert_eq!(code, 0, "{err}");
    let (spare, spare_id) =
        (out.trim().to_owned(), crmsync::identity::token_id(&crmsync::identity::token_hash(out.trim())).to_owned());
    assert!(err.contains(&spare_id), "the id is shown with the token: {err}");
    let first_id = crmsync::identity::token_id(&crmsync::identity::token_hash(&tokens["sam"])).to_owned();
    let (code, out, err) = cli(&env.api, &["user", "tokens", "sam"]).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains(&first_id) && out.contains(&spare_id), "{out}");
    let (code, out, err) = cli(&env.api, &["user", "revoke-token", "sam", &first_id]).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("revoked"), "{out}");
    assert_eq!(as_user("sam").get("/v1/status").await.0, 401);
    let spare_api = Api::new(env.api.base.clone()).with_token(&spare);
    assert_eq!(spare_api.get("/v1/status").await.0, 200);
    let (status, body) = env.api.get("/v1/users/sam/tokens").await;
    assert_eq!((status, body["token_ids"].clone()), (200, json!([spare_id])), "{body}");
    let (status, body) = env.api.delete(&format!("/v1/users/sam/tokens/{first_id}")).await;
    assert_eq!(status, 404, "an unknown id: {body}");
    assert!(body["error"].as_str().unwrap().contains("user tokens sam"), "{body}");
    assert_eq!(as_user("bo").get("/v1/users/sam/tokens").await.0, 403);
    let tokens = {
        let mut t = tokens.clone();
        t.insert("sam", spare);
        t
    };
    let at_laptop = |id: &str| Api::new(laptop.api.base.clone()).with_token(&tokens[id]);

    // Revoked, a user's tokens stop working at the main at once, and at the remote once synced.
    wait_for("sam's spare token reaches the laptop", Duration::from_secs(20), || async {
        at_laptop("sam").get("/v1/status").await.0 == 200
    })
    .await;
    let (code, out, err) = cli(&env.api, &["user", "revoke-tokens", "sam"]).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("revoked"), "{out}");
    assert_eq!(as_user("sam").get("/v1/status").await.0, 401);
    wait_for("the revocation reaches the laptop", Duration::from_secs(20), || async {
        at_laptop("sam").get("/v1/status").await.0 == 401
    })
    .await;
    assert_eq!(at_laptop("bo").get("/v1/status").await.0, 200, "other users keep theirs");

    // The command line: a token from --token, CRMSYNC_TOKEN or CRMSYNC_TOKEN_FILE.
    let (code, _, err) = cli(&as_user("rita"), &["user", "token", "bo"]).await;
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("only administrators and managers"), "{err}");
    let (code, out, err) = cli(&env.api, &["user", "token", "bo"]).await;
    assert_eq!(code, 0, "{err}");
    let new_token = out.trim().to_owned();
    assert_eq!(Api::new(env.api.base.clone()).with_token(&new_token).get("/v1/contacts/b1").await.0, 404);
    let file = env.dir.path().join("bo.token");
    std::fs::write(&file, format!("{new_token}\n")).unwrap();
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_crmsync"))
        .args(["--api", &env.api.base, "contact", "show", "sams"])
        .env("CRMSYNC_TOKEN_FILE", &file)
        .output()
        .await
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_crmsync"))
        .args(["--api", &env.api.base, "status"])
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no token"));
    laptop.stop().await;
}

/// A certificate authority and a server certificate for 127.0.0.1 signed by it, as PEM files
/// in `dir`: (authority, certificate, key).
fn certificates(dir: &std::path::Path) -> (std::path::PathBuf, std::path::PathBuf, std::path::PathBuf) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = ca.self_signed(&ca_key).unwrap();
    let key = KeyPair::generate().unwrap();
    let server = CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()]).unwrap();
    let cert = server.signed_by(&key, &ca, &ca_key).unwrap();
    let files = (dir.join("ca.pem"), dir.join("server.pem"), dir.join("server-key.pem"));
    std::fs::write(&files.0, ca.pem()).unwrap();
    std::fs::write(&files.1, cert.pem()).unwrap();
    std::fs::write(&files.2, key.serialize_pem()).unwrap();
    files
}

/// Both APIs answer HTTPS when given a certificate; the command line trusts the authority
/// it is given (`--ca`, `CRMSYNC_CA`) and refuses a certificate it cannot check.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_apis_answer_https_when_given_a_certificate_and_the_cli_checks_it() {
    let mut env = Env::start_secure().await;
    env.create_all_set("everyone").await;
    let laptop_dir = env.init_remote("laptop", "everyone").await;
    env.main().create(Kind::Contact, &json!({ "id": "c1", "city": "Albany" })).await.unwrap();
    let config = env.main_config();
    env.stop_main().await;
    let (ca, cert, key) = certificates(env.dir.path());
    let (ca, cert, key) = (ca.to_str().unwrap(), cert.to_str().unwrap(), key.to_str().unwrap());
    let listen = format!("127.0.0.1:{}", crmsync::natsd::free_port());
    let authority = config.authority.as_ref().unwrap().to_str().unwrap().to_owned();
    let nats_url = env.nats.url();
    let args = ["main", "serve", "--nats", &nats_url, "--authority", &authority, "--listen", &listen];
    let args = [&args[..], &["--tls-cert", cert, "--tls-key", key, "--data"]].concat();
    let mut main = crate::harness::crmsync_process_with(&args, &config.data_dir, &[]);
    let client = |api: String, vars: Vec<(&'static str, String)>, args: Vec<&str>| {
        let token = env.token.clone();
        let args: Vec<String> = args.into_iter().map(str::to_owned).collect();
        async move {
            let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_crmsync"))
                .args(["--api", &api, "--token", &token])
                .args(&args)
                .envs(vars)
                .output()
                .await
                .unwrap();
            (
                out.status.code().unwrap_or(-1),
                String::from_utf8_lossy(&out.stdout).into_owned(),
                String::from_utf8_lossy(&out.stderr).into_owned(),
            )
        }
    };
    let https = format!("https://{listen}");
    wait_for("the main answers HTTPS", Duration::from_secs(20), || async {
        client(https.clone(), vec![], vec!["--ca", ca, "status"]).await.0 == 0
    })
    .await;
    let (code, out, err) = client(https.clone(), vec![], vec!["--ca", ca, "contact", "show", "c1"]).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("Albany"), "{out}");
    // A certificate the client cannot check is refused, saying so.
    let (code, _, err) = client(https.clone(), vec![], vec!["status"]).await;
    assert_eq!(code, 3, "{err}");
    assert!(err.to_lowercase().contains("certificate"), "{err}");
    // Plain HTTP gets no answer from an HTTPS API.
    let (code, _, err) = client(format!("http://{listen}"), vec![], vec!["status"]).await;
    assert_ne!(code, 0, "{err}");

    // A remote's API the same way, the authority from CRMSYNC_CA.
    let remote_listen = format!("127.0.0.1:{}", crmsync::natsd::free_port());
    let args = ["remote", "serve", "--listen", &remote_listen, "--tls-cert", cert, "--tls-key", key, "--data"];
    let mut remote = crate::harness::crmsync_process_with(&args, &laptop_dir, &[]);
    let remote_https = format!("https://{remote_listen}");
    let with_ca = vec![("CRMSYNC_CA", ca.to_owned())];
    wait_for("the remote holds c1 and answers HTTPS", Duration::from_secs(20), || async {
        client(remote_https.clone(), with_ca.clone(), vec!["contact", "show", "c1"]).await.0 == 0
    })
    .await;
    // Files that do not make a server identity stop the service with a clear error.
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_crmsync"))
        .args(["remote", "serve", "--listen", "127.0.0.1:0", "--tls-cert", ca, "--tls-key", cert, "--data"])
        .arg(&laptop_dir)
        .output()
        .await
        .unwrap();
    assert_ne!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stderr).contains("private key"), "{}", String::from_utf8_lossy(&out.stderr));
    crate::harness::stop(&mut remote, crate::harness::Stop::Term).await;
    crate::harness::stop(&mut main, crate::harness::Stop::Term).await;
}

/// NATS over TLS: the main requires it with the authority it is given, a remote's bundle
/// carries the authority, and a client that does not speak TLS (or does not trust the
/// certificate) is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_main_and_its_remotes_speak_tls_to_nats_when_it_requires_it() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, cert, key) = certificates(dir.path());
    let tls = Some((cert, key));
    let opts = crmsync::natsd::NatsdOptions { tls, ..Default::default() };
    let nats = nats_with(dir.path(), opts).await;
    assert!(Nats::connect(&nats.url(), "plain").await.is_err(), "a client without TLS connected");
    let main_dir = dir.path().join("main");
    let config = crmsync::main_service::MainConfig {
        nats_ca: Some(ca.clone()),
        ..crmsync::main_service::MainConfig::new(nats.url(), main_dir)
    };
    let main = crmsync::main_service::Main::start(config).await.unwrap();
    main.create_set(&crmsync::main_service::SetRequest { name: "everyone".into(), all: true, ..Default::default() })
        .await
        .unwrap();
    main.create(Kind::Contact, &json!({ "id": "c1", "city": "Albany" })).await.unwrap();
    let bundle = main
        .create_remote(&RemoteRequest { name: "laptop".into(), set: "everyone".into(), ..Default::default() })
        .await
        .unwrap();
    assert!(bundle.nats_ca.as_deref().is_some_and(|pem| pem.contains("BEGIN CERTIFICATE")));
    let remote = remote_from(dir.path(), &bundle).await;
    wait_converged(&main, remote.store()).await;
    assert!(remote.store().get(Kind::Contact, "c1").unwrap().is_some());
    remote.stop().await;
    main.stop().await;
}

/// A remote behind a firewall that only lets HTTP(S) through reaches NATS over its WebSocket
/// listener (`ws://`, or `wss://` with TLS), with the same credentials and rights.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_remote_syncs_over_websocket() {
    let dir = tempfile::tempdir().unwrap();
    let ws = crmsync::natsd::free_port();
    let opts = crmsync::natsd::NatsdOptions { websocket_port: Some(ws), ..Default::default() };
    let nats = nats_with(dir.path(), opts).await;
    let main =
        crmsync::main_service::Main::start(crmsync::main_service::MainConfig::new(nats.url(), dir.path().join("main")))
            .await
            .unwrap();
    main.create_set(&crmsync::main_service::SetRequest { name: "everyone".into(), all: true, ..Default::default() })
        .await
        .unwrap();
    main.create(Kind::Contact, &json!({ "id": "c1" })).await.unwrap();
    let request = RemoteRequest {
        name: "laptop".into(),
        set: "everyone".into(),
        nats_url: Some(format!("ws://127.0.0.1:{ws}")),
        ..Default::default()
    };
    let bundle = main.create_remote(&request).await.unwrap();
    let remote = remote_from(dir.path(), &bundle).await;
    assert!(remote.nats_url().starts_with("ws://"));
    wait_converged(&main, remote.store()).await;
    let edit = remote.create(Kind::Contact, &json!({ "id": "from-laptop" })).await.unwrap();
    wait_for("the edit made over WebSocket reaches the main", Duration::from_secs(20), || async {
        main.store().get(Kind::Contact, &edit.0).unwrap().is_some()
    })
    .await;
    remote.stop().await;
    main.stop().await;
}

/// A nats-server started with `opts` (its store under `dir`).
async fn nats_with(dir: &std::path::Path, opts: crmsync::natsd::NatsdOptions) -> crmsync::natsd::NatsServer {
    let opts = crmsync::natsd::NatsdOptions { store_dir: dir.join("nats"), ..opts };
    tokio::task::spawn_blocking(move || crmsync::natsd::NatsServer::start(&opts)).await.unwrap().unwrap()
}

/// The sync log shows a user only the entries of records they may see: a refused edit of a
/// private record is in the administrator's `status`, not in a standard user's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sync_log_shows_a_user_only_what_they_may_see() {
    use crate::harness::Api;
    let env = Env::start().await;
    env.create_all_set("everyone").await;
    for id in ["sam", "bo"] {
        env.api.create(Kind::User, json!({ "id": id, "name": id, "role": "standard" })).await;
    }
    let (_, made) = env.api.post("/v1/users/sam/tokens", &json!({})).await;
    let sam = Api::new(env.api.base.clone()).with_token(made["token"].as_str().unwrap());
    env.api.create(Kind::Contact, json!({ "id": "secret", "manager": "bo", "access": "private" })).await;
    env.api.create(Kind::Contact, json!({ "id": "open" })).await;
    let laptop = env.remote("laptop", "everyone").await;
    wait_converged(env.main(), laptop.remote.store()).await;

    // Edits of both wait while the main does not accept syncs; the private one is deleted at
    // the main meanwhile, so its edit is refused.
    env.main().accept_syncs(false).await.unwrap();
    for id in ["secret", "open"] {
        let (status, body) = laptop.api.patch(&format!("/v1/contacts/{id}"), &json!({ "city": "Troy" })).await;
        assert_eq!(status, 200, "{body}");
    }
    wait_for_status(&laptop.api, |s| s["uploads"]["waiting"] == 0).await;
    env.main().delete(Kind::Contact, "secret").await.unwrap();
    env.main().accept_syncs(true).await.unwrap();
    let status = wait_for_status(&env.api, |s| s["refused"] == 1).await;
    assert!(status["sync_log"].to_string().contains("secret"), "{status}");
    let (code, seen) = sam.get("/v1/status").await;
    assert_eq!(code, 200);
    assert!(
        !seen["sync_log"].to_string().contains("secret"),
        "a standard user sees a private record's refusal: {seen}"
    );
    laptop.stop().await;
}

/// A remote set up in `dir` from `bundle` (as `remote init` does with its file), started.
async fn remote_from(dir: &std::path::Path, bundle: &crmsync::bundle::Bundle) -> crmsync::remote_service::Remote {
    let file = dir.join("laptop.bundle.json");
    std::fs::write(&file, serde_json::to_vec(bundle).unwrap()).unwrap();
    let data = dir.join("laptop");
    crmsync::remote_service::init(&file, &data).unwrap();
    crmsync::remote_service::Remote::start(crmsync::remote_service::RemoteConfig::new(data)).await.unwrap()
}
