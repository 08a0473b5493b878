//! Starts what a test needs: a nats-server, a main, remotes; and reads what a user would read.

use std::collections::BTreeMap;
use std::future::Future;
use std::time::{Duration, Instant};

use crmsync::main_service::{Main, MainConfig, RemoteRequest, SetRequest};
use crmsync::model::{Fields, Kind};
use crmsync::natsd::{NatsServer, NatsdOptions};
use crmsync::remote_service::{self, Remote, RemoteConfig};
use serde_json::{Value as J, json};
use tempfile::TempDir;

/// Everything a record holds, by kind and id: what "the same records" means in assertions.
pub type Snapshot = BTreeMap<(Kind, String), Fields>;

pub struct Env {
    pub dir: TempDir,
    pub nats: NatsServer,
    main: Option<Main>,
    pub api: Api,
    stop_api: Option<tokio::sync::oneshot::Sender<()>>,
    /// NATS requires credentials ([`Env::start_secure`]).
    secure: bool,
    /// The administrator's API token, which works at the main and at every remote.
    pub token: String,
}

/// A service's HTTP API, as a client sees it.
#[derive(Clone)]
pub struct Api {
    pub base: String,
    http: reqwest::Client,
    /// The API token it signs in with.
    pub token: Option<String>,
}

impl Api {
    /// An API client that signs in with no token.
    pub fn new(base: String) -> Api {
        Api { base, http: http_client(), token: None }
    }

    /// The same client, signing in with `token`.
    pub fn with_token(self, token: &str) -> Api {
        Api { token: Some(token.to_owned()), ..self }
    }

    async fn send(&self, req: reqwest::RequestBuilder) -> (u16, J) {
        let req = match &self.token {
            Some(token) => req.bearer_auth(token),
            None => req,
        };
        let resp = req.send().await.expect("the API answers");
        let status = resp.status().as_u16();
        let text = resp.text().await.expect("a body");
        (status, serde_json::from_str(&text).unwrap_or(J::String(text)))
    }

    pub async fn get(&self, path: &str) -> (u16, J) {
        self.send(self.http.get(format!("{}{path}", self.base))).await
    }

    pub async fn post(&self, path: &str, body: &J) -> (u16, J) {
        self.send(self.http.post(format!("{}{path}", self.base)).json(body)).await
    }

    pub async fn post_raw(&self, path: &str, body: Vec<u8>) -> (u16, J) {
        self.send(self.http.post(format!("{}{path}", self.base)).header("content-type", "application/json").body(body))
            .await
    }

    pub async fn patch(&self, path: &str, body: &J) -> (u16, J) {
        self.send(self.http.patch(format!("{}{path}", self.base)).json(body)).await
    }

    pub async fn delete(&self, path: &str) -> (u16, J) {
        self.send(self.http.delete(format!("{}{path}", self.base))).await
    }

    /// Creates a record and returns its id, failing the test on anything but 201.
    pub async fn create(&self, kind: Kind, body: J) -> String {
        let (status, resp) = self.post(&format!("/v1/{}", kind.plural()), &body).await;
        assert_eq!(status, 201, "creating a {kind} from {body}: {resp}");
        resp["id"].as_str().expect("an id").to_owned()
    }

    pub async fn status(&self) -> J {
        let (status, body) = self.get("/v1/status").await;
        assert_eq!(status, 200, "{body}");
        body
    }
}

/// Serves a router on a free loopback port; returns its base URL and a stop handle.
pub async fn serve(router: axum::Router) -> (String, tokio::sync::oneshot::Sender<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let stop = async move {
        let _ = rx.await;
    };
    tokio::spawn(crmsync::http::serve(listener, router, stop, None));
    (format!("http://{addr}"), tx)
}

pub struct RemoteHandle {
    pub remote: Remote,
    pub api: Api,
    pub data_dir: std::path::PathBuf,
    stop_api: Option<tokio::sync::oneshot::Sender<()>>,
}

impl RemoteHandle {
    pub async fn stop(mut self) {
        if let Some(tx) = self.stop_api.take() {
            let _ = tx.send(());
        }
        self.remote.stop().await;
    }
}

impl Env {
    /// A nats-server on a free port and a main with its API, all under one temporary directory.
    pub async fn start() -> Env {
        Env::start_with(false).await
    }

    /// [`Env::start`] with NATS requiring credentials: the main logs in with the authority's
    /// and issues each remote's (as `crmsync up` runs it).
    pub async fn start_secure() -> Env {
        Env::start_with(true).await
    }

    async fn start_with(secure: bool) -> Env {
        // CRMSYNC_LOG=crmsync=debug shows the services' logs with a failing test's output.
        let filter = tracing_subscriber::EnvFilter::try_from_env("CRMSYNC_LOG")
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("crmsync=warn"));
        let _ = tracing_subscriber::fmt().with_env_filter(filter).with_test_writer().try_init();
        let dir = tempfile::tempdir().unwrap();
        let store_dir = dir.path().join("nats");
        let authority = dir.path().join("nats-authority.json");
        let auth = secure.then(|| {
            crmsync::identity::Authority::generate().save(&authority).unwrap();
            let resolver = dir.path().join("nats-resolver");
            std::fs::create_dir_all(&resolver).unwrap();
            crmsync::identity::Authority::load(&authority).unwrap().server_config(&resolver)
        });
        let nats = tokio::task::spawn_blocking(move || {
            NatsServer::start(&NatsdOptions { port: 0, store_dir, auth, ..Default::default() })
        })
        .await
        .unwrap()
        .expect("nats-server starts (run ops/install-nats-server)");
        let authority = secure.then_some(authority);
        let main = Main::start(MainConfig { authority, ..MainConfig::new(nats.url(), dir.path().join("main")) })
            .await
            .unwrap();
        let (base, stop_api) = serve(crmsync::http::main_api(main.clone())).await;
        let token = std::fs::read_to_string(dir.path().join("main").join(crmsync::main_service::ADMIN_TOKEN_FILE))
            .expect("the main wrote its administrator's token")
            .trim()
            .to_owned();
        let api = Api::new(base).with_token(&token);
        Env { dir, nats, main: Some(main), api, stop_api: Some(stop_api), secure, token }
    }

    /// The API at `base`, signed in as the administrator.
    pub fn api_at(&self, base: String) -> Api {
        Api::new(base).with_token(&self.token)
    }

    pub fn main(&self) -> &Main {
        self.main.as_ref().expect("the main is running")
    }

    pub fn main_config(&self) -> MainConfig {
        let authority = self.secure.then(|| self.dir.path().join("nats-authority.json"));
        MainConfig { authority, ..MainConfig::new(self.nats.url(), self.dir.path().join("main")) }
    }

    /// Stops the main (API, projector, outbox publisher) so its redb file is free.
    pub async fn stop_main(&mut self) {
        if let Some(tx) = self.stop_api.take() {
            let _ = tx.send(());
        }
        if let Some(main) = self.main.take() {
            main.stop().await;
        }
        // The API server drops its handle on the main once its connections close.
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    /// Starts the main again on the same data, with a new API address.
    pub async fn restart_main(&mut self) {
        self.restart_main_with(self.main_config()).await;
    }

    /// Starts the main again with `config` (its clock, its checks).
    pub async fn restart_main_with(&mut self, config: MainConfig) {
        let main = Main::start(config).await.unwrap();
        let (base, stop_api) = serve(crmsync::http::main_api(main.clone())).await;
        self.main = Some(main);
        self.api = Api::new(base).with_token(&self.token);
        self.stop_api = Some(stop_api);
    }

    pub async fn create_all_set(&self, name: &str) {
        self.main().create_set(&SetRequest { name: name.into(), all: true, ..Default::default() }).await.unwrap();
    }

    /// Registers a remote at the main and sets up its data directory from the bundle file,
    /// as `remote create` and `remote init` do.
    pub async fn init_remote(&self, name: &str, set: &str) -> std::path::PathBuf {
        self.init_remote_as(&RemoteRequest { name: name.into(), set: set.into(), ..Default::default() }).await
    }

    /// [`Env::init_remote`] of a remote as `request` says (its expiry, its NATS address).
    pub async fn init_remote_as(&self, request: &RemoteRequest) -> std::path::PathBuf {
        let name = &request.name;
        let bundle = self.main().create_remote(request).await.unwrap();
        let bundle_file = self.dir.path().join(format!("{name}.bundle.json"));
        std::fs::write(&bundle_file, serde_json::to_vec(&bundle).unwrap()).unwrap();
        let data_dir = self.dir.path().join("remotes").join(name);
        remote_service::init(&bundle_file, &data_dir).unwrap();
        data_dir
    }

    pub async fn start_remote(&self, data_dir: &std::path::Path) -> RemoteHandle {
        self.start_remote_with(RemoteConfig::new(data_dir.to_owned())).await
    }

    /// Starts a remote as `config` says (its mode, its clock).
    pub async fn start_remote_with(&self, config: RemoteConfig) -> RemoteHandle {
        let data_dir = config.data_dir.clone();
        let remote = Remote::start(config).await.unwrap();
        let (base, stop_api) = serve(crmsync::http::remote_api(remote.clone())).await;
        RemoteHandle { remote, api: Api::new(base).with_token(&self.token), data_dir, stop_api: Some(stop_api) }
    }

    pub async fn remote(&self, name: &str, set: &str) -> RemoteHandle {
        let dir = self.init_remote(name, set).await;
        self.start_remote(&dir).await
    }
}

/// Every routed record of a store.
pub fn snapshot(store: &crmsync::store::Store) -> Snapshot {
    let mut out = Snapshot::new();
    for kind in Kind::DATA {
        store
            .for_each(kind, |id, stored| {
                out.insert((kind, id.to_owned()), stored.fields);
            })
            .unwrap();
    }
    out
}

/// Polls `check` until it returns true, or fails the test with `what` after `limit`.
pub async fn wait_for<F, Fut>(what: &str, limit: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let start = Instant::now();
    loop {
        if check().await {
            return;
        }
        assert!(start.elapsed() < limit, "timed out after {limit:?} waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until a remote holds exactly what the main holds.
pub async fn wait_converged(main: &Main, remote: &crmsync::store::Store) {
    let start = Instant::now();
    loop {
        let (m, r) = (snapshot(main.store()), snapshot(remote));
        if m == r {
            return;
        }
        if start.elapsed() > Duration::from_secs(30) {
            let missing: Vec<_> = m.keys().filter(|k| !r.contains_key(*k)).take(5).collect();
            let extra: Vec<_> = r.keys().filter(|k| !m.contains_key(*k)).take(5).collect();
            let differ: Vec<_> =
                m.iter().filter(|(k, v)| r.get(*k).is_some_and(|rv| rv != *v)).map(|(k, _)| k).take(5).collect();
            panic!(
                "the remote did not converge on the main: main {} records, remote {}; missing {missing:?}, extra {extra:?}, different {differ:?}",
                m.len(),
                r.len()
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Creates `n` contacts (with a note each second one) at the main, a few at a time.
pub async fn seed_contacts(main: &Main, n: usize, prefix: &str) {
    use futures::StreamExt;
    let bodies: Vec<J> = (0..n)
        .map(|i| {
            serde_json::json!({
                "id": format!("{prefix}{i}"),
                "first_name": format!("First{i}"),
                "last_name": "Tester",
                "city": "Albany",
                "state": (["NY", "CT", "PA"][i % 3]),
                "custom": { "n": i.to_string() },
            })
        })
        .collect();
    let mut writes = futures::stream::iter(bodies.iter()).map(|b| main.create(Kind::Contact, b)).buffer_unordered(32);
    while let Some(r) = writes.next().await {
        r.unwrap();
    }
}

impl Env {
    /// A separate NATS connection, for looking at the streams as an operator would.
    pub async fn main_nats(&self) -> crmsync::transport::Nats {
        let creds = self.secure.then(|| {
            crmsync::identity::Authority::load(&self.dir.path().join("nats-authority.json")).unwrap().main_creds()
        });
        let login = crmsync::transport::Login { creds, ..Default::default() };
        crmsync::transport::Nats::connect_as(&self.nats.url(), "test", &login).await.unwrap()
    }
}

/// Runs `crmsync ARGS… DIR` as a child process, killed when dropped; CRMSYNC_TEST_LOGS=1 shows
/// its log.
pub fn crmsync_process(args: &[&str], dir: &std::path::Path) -> tokio::process::Child {
    crmsync_process_with(args, dir, &[])
}

/// [`crmsync_process`] with these environment variables.
pub fn crmsync_process_with(args: &[&str], dir: &std::path::Path, vars: &[(&str, &str)]) -> tokio::process::Child {
    use std::process::Stdio;
    tokio::process::Command::new(env!("CARGO_BIN_EXE_crmsync"))
        .args(args)
        .arg(dir)
        .envs(vars.iter().copied())
        .stdout(Stdio::null())
        .stderr(if std::env::var_os("CRMSYNC_TEST_LOGS").is_some() { Stdio::inherit() } else { Stdio::null() })
        .kill_on_drop(true)
        .spawn()
        .unwrap()
}

pub fn remote_process(dir: &std::path::Path, port: u16, batch: usize) -> tokio::process::Child {
    let (listen, batch) = (format!("127.0.0.1:{port}"), batch.to_string());
    crmsync_process(&["remote", "serve", "--listen", &listen, "--batch", &batch, "--data"], dir)
}

pub fn main_process(nats_url: &str, dir: &std::path::Path, port: u16) -> tokio::process::Child {
    let listen = format!("127.0.0.1:{port}");
    crmsync_process(&["main", "serve", "--nats", nats_url, "--listen", &listen, "--data"], dir)
}

/// Polls a service's status until `done` holds for it (at most 60 s).
pub async fn wait_for_status(api: &Api, done: impl Fn(&J) -> bool) -> J {
    let start = Instant::now();
    let mut last = J::Null;
    loop {
        let request = http_client().get(format!("{}/v1/status", api.base));
        let request = match &api.token {
            Some(token) => request.bearer_auth(token),
            None => request,
        };
        if let Ok(resp) = request.send().await
            && let Ok(s) = resp.json::<J>().await
        {
            if done(&s) {
                return s;
            }
            last = s;
        }
        assert!(start.elapsed() < Duration::from_secs(60), "the service did not settle; its status: {last}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// How a child process is stopped.
#[derive(Clone, Copy, Debug)]
pub enum Stop {
    /// SIGKILL: no chance to flush anything.
    Kill,
    /// SIGTERM: a graceful stop.
    Term,
}

pub async fn stop(child: &mut tokio::process::Child, how: Stop) {
    match how {
        Stop::Kill => child.start_kill().unwrap(),
        Stop::Term => {
            let pid = child.id().expect("the process runs") as i32;
            // SAFETY: sending a signal to a child process of this test.
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
    }
    child.wait().await.unwrap();
}

/// Runs the command line against a service's API: (exit code, stdout, stderr).
pub async fn cli(api: &Api, args: &[&str]) -> (i32, String, String) {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_crmsync"))
        .args(["--api", &api.base])
        .args(api.token.iter().flat_map(|t| ["--token", t.as_str()]))
        .args(args)
        .output()
        .await
        .unwrap();
    let text = |b: Vec<u8>| String::from_utf8_lossy(&b).into_owned();
    (out.status.code().unwrap_or(-1), text(out.stdout), text(out.stderr))
}

/// The administrator's token a main started on `data_dir` writes on its first start (waiting
/// for it to appear).
pub async fn admin_token(data_dir: &std::path::Path) -> String {
    let file = data_dir.join(crmsync::main_service::ADMIN_TOKEN_FILE);
    wait_for("the main writes its administrator's token", Duration::from_secs(60), || async { file.exists() }).await;
    std::fs::read_to_string(&file).unwrap().trim().to_owned()
}

/// An HTTP client for the tests (the TLS provider installed first, as the binary does).
pub fn http_client() -> reqwest::Client {
    http_client_builder().build().unwrap()
}

/// [`http_client`] with settings of a test's own.
pub fn http_client_builder() -> reqwest::ClientBuilder {
    crmsync::http::tls::install_default_provider();
    reqwest::Client::builder()
}

/// The seeded generator of the randomized tests (a failing run replays with its seed), and
/// what they draw from it beyond numbers.
pub use crmsync::rng::Rng;

pub trait Draw {
    fn bytes(&mut self, n: usize) -> Vec<u8>;
    fn text(&mut self, n: usize) -> String;
    fn wrong_value(&mut self) -> J;
}

impl Draw for Rng {
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next_u64() as u8).collect()
    }

    /// A string of `n` characters, from ASCII letters to control characters and emoji.
    fn text(&mut self, n: usize) -> String {
        const CHARS: &[char] =
            &['a', 'Z', '0', ' ', '.', '*', '>', '/', '%', '"', '\\', '\n', '\t', 'é', '💥', '\u{7f}'];
        (0..n).map(|_| *self.pick(CHARS)).collect()
    }

    /// A JSON value of no use as a field's value: the wrong type, or absurdly nested.
    fn wrong_value(&mut self) -> J {
        match self.below(7) {
            0 => json!(self.next_u64() as i64),
            1 => json!([self.text(3), 1, null]),
            2 => json!({ "nested": { "deeper": self.text(4) } }),
            3 => json!(true),
            4 => json!(-1.5e300),
            5 => json!("x".repeat(70_000)),
            // A NUL character is refused wherever it is.
            _ => json!(format!("{}\u{0}", self.text(5))),
        }
    }
}

/// The seed of a randomized test: `CRMSYNC_SEED` to replay a run, else the clock.
pub fn seed() -> u64 {
    std::env::var("CRMSYNC_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(crmsync::hlc::wall_ms)
}
