//! Chaos convergence: three remotes on overlapping sets (users, a query, subscription lists),
//! random edits at the main and at the remotes, access changes and set edits, while the main,
//! the remotes and nats-server are killed (SIGKILL) and started again and one remote's
//! connection to NATS (through a proxy) is cut. Once everyone is connected and quiet, each
//! remote holds exactly what the main's own evaluation of its set and subscription list says,
//! field for field, and a remote rebuilt from the stream holds the same.
//!
//! `CRMSYNC_SEED` replays a run; `CRMSYNC_CHAOS_STEPS` makes it longer (`ops/chaos` runs a
//! long one). Every step is printed.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crmsync::natsd::{NatsServer, NatsdOptions, free_port};
use crmsync::store::Store;
use serde_json::{Value as J, json};
use tokio::net::{TcpListener, TcpStream};
use tokio::process::Child;
use tokio::sync::watch;

use crate::harness::{Rng, Snapshot, Stop, admin_token, crmsync_process, http_client, snapshot, stop, wait_for};

/// A process killed by a step, to start again at a later one.
#[derive(Debug, Clone, Copy)]
enum Down {
    Main,
    Remote(usize),
    Nats,
}
use crate::sets::expected_for;

/// A TCP proxy in front of nats-server whose connections can be cut: while cut, it closes
/// every connection it carries and every new one.
struct Proxy {
    port: u16,
    cut: watch::Sender<bool>,
}

impl Proxy {
    async fn start(upstream: u16) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (cut, cuts) = watch::channel(false);
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                if *cuts.borrow() {
                    continue; // dropped: closed at once
                }
                let mut cuts = cuts.clone();
                tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)).await else { return };
                    let (mut client, mut server) = (client, server);
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                        _ = cuts.wait_for(|cut| *cut) => {}
                    }
                });
            }
        });
        Proxy { port, cut }
    }

    fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }
}

/// A service process and how to start it again.
struct Service {
    name: String,
    args: Vec<String>,
    dir: PathBuf,
    port: u16,
    child: Child,
}

impl Service {
    fn start(name: &str, args: Vec<String>, dir: &Path, port: u16) -> Service {
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        let child = crmsync_process(&refs, dir);
        Service { name: name.to_owned(), args, dir: dir.to_owned(), port, child }
    }

    fn base(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Kills the process (SIGKILL) `after` from now, while the steps go on: in the middle of
    /// whatever it is doing.
    fn kill_after(&self, after: Duration) {
        let pid = self.child.id();
        tokio::spawn(async move {
            tokio::time::sleep(after).await;
            if let Some(pid) = pid {
                // SAFETY: a signal to a child process of this test (reaped only by restart).
                unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
            }
        });
    }

    /// Starts it again once it is dead (killed for good if it was not).
    async fn restart(&mut self) {
        let _ = self.child.start_kill();
        let _ = self.child.wait().await;
        *self = Service::start(&self.name.clone(), self.args.clone(), &self.dir.clone(), self.port);
    }

    async fn terminate(&mut self) {
        stop(&mut self.child, Stop::Term).await;
        let _ = tokio::time::timeout(Duration::from_secs(20), self.child.wait()).await;
    }
}

/// Sends a request and returns its status and body; a service that is down is status 0 (the
/// chaos expects refusals and outages, and checks only the end state).
async fn send(token: &str, method: &str, url: String, body: Option<J>) -> (u16, J) {
    let mut request = http_client().request(method.parse().unwrap(), url).bearer_auth(token);
    if let Some(body) = body {
        request = request.json(&body);
    }
    match request.timeout(Duration::from_secs(30)).send().await {
        Ok(resp) => {
            let status = resp.status().as_u16();
            (status, resp.json().await.unwrap_or(J::Null))
        }
        Err(_) => (0, J::Null),
    }
}

const STATES: &[&str] = &["NY", "CT", "PA"];
const CITIES: &[&str] = &["Albany", "Buffalo", "Troy"];
const MANAGERS: &[&str] = &["rep", "boss", "ann"];
const ACCESS: &[&str] = &["public", "public", "private", "limited"];
const QUERIES: &[Option<&str>] = &[Some("state = NY"), Some("state in (NY, CT)"), Some("city = Albany"), None];
const REMOTES: &[&str] = &["laptop", "tablet", "branch"];

struct Chaos {
    rng: Rng,
    token: String,
    nats: NatsServer,
    proxy: Proxy,
    main: Service,
    remotes: Vec<Service>,
    /// Contact ids made so far (some since deleted).
    contacts: Vec<String>,
    /// What is down, and at which step it comes back.
    down: Vec<(usize, Down)>,
}

impl Chaos {
    fn contact(&mut self) -> String {
        let i = self.rng.below(self.contacts.len());
        self.contacts[i].clone()
    }

    async fn at_main(&self, method: &str, path: &str, body: Option<J>) -> u16 {
        send(&self.token, method, format!("{}{path}", self.main.base()), body).await.0
    }

    async fn at_remote(&self, r: usize, method: &str, path: &str, body: Option<J>) -> u16 {
        send(&self.token, method, format!("{}{path}", self.remotes[r].base()), body).await.0
    }

    fn contact_body(&mut self, id: Option<String>) -> J {
        let mut body = json!({
            "state": *self.rng.pick(STATES),
            "city": *self.rng.pick(CITIES),
            "manager": *self.rng.pick(MANAGERS),
            "access": *self.rng.pick(ACCESS),
            "access_teams": ["east"],
        });
        if let Some(id) = id {
            body["id"] = J::String(id);
        }
        body
    }

    /// One random step; returns what it did, for the log.
    async fn step(&mut self, n: usize) -> String {
        let roll = self.rng.below(100);
        match roll {
            0..30 => {
                let (id, body) = (self.contact(), self.contact_body(None));
                let status = self.at_main("PATCH", &format!("/v1/contacts/{id}"), Some(body.clone())).await;
                format!("main: edit {id} {body} -> {status}")
            }
            30..38 => {
                let id = format!("m{n}");
                let body = self.contact_body(Some(id.clone()));
                let status = self.at_main("POST", "/v1/contacts", Some(body)).await;
                self.contacts.push(id.clone());
                format!("main: create {id} -> {status}")
            }
            38..41 => {
                let id = self.contact();
                format!("main: delete {id} -> {}", self.at_main("DELETE", &format!("/v1/contacts/{id}"), None).await)
            }
            41..46 => {
                let id = self.contact();
                let body = json!({ "id": format!("n{n}"), "contact_id": id, "text": format!("note {n}") });
                format!("main: note on {id} -> {}", self.at_main("POST", "/v1/notes", Some(body)).await)
            }
            46..62 => {
                let (r, id) = (self.rng.below(REMOTES.len()), self.contact());
                let body = json!({ "last_name": format!("L{n}"), "city": *self.rng.pick(CITIES) });
                let status = self.at_remote(r, "PATCH", &format!("/v1/contacts/{id}"), Some(body)).await;
                format!("{}: edit {id} -> {status}", REMOTES[r])
            }
            62..68 => {
                let r = self.rng.below(REMOTES.len());
                let id = format!("r{n}");
                let body = self.contact_body(Some(id.clone()));
                let status = self.at_remote(r, "POST", "/v1/contacts", Some(body)).await;
                self.contacts.push(id.clone());
                format!("{}: create {id} -> {status}", REMOTES[r])
            }
            68..71 => {
                let (r, id) = (self.rng.below(REMOTES.len()), self.contact());
                let body = json!({ "id": format!("rn{n}"), "contact_id": id, "text": "from a remote" });
                format!("{}: note on {id} -> {}", REMOTES[r], self.at_remote(r, "POST", "/v1/notes", Some(body)).await)
            }
            71..75 => {
                let query = *self.rng.pick(QUERIES);
                let users = if self.rng.below(2) == 0 { json!(["rep"]) } else { json!(["rep", "ann"]) };
                let body = json!({ "query": query, "users": users });
                format!("set ny: {body} -> {}", self.at_main("PATCH", "/v1/sets/ny", Some(body.clone())).await)
            }
            75..78 => {
                let teams = if self.rng.below(2) == 0 { json!(["east"]) } else { json!([]) };
                format!(
                    "user rep: teams {teams} -> {}",
                    self.at_main("PATCH", "/v1/users/rep", Some(json!({ "teams": teams }))).await
                )
            }
            78..84 => {
                let (r, id) = (self.rng.below(REMOTES.len()), self.contact());
                let how = if self.rng.below(3) == 0 { "remove" } else { "add" };
                let path = format!("/v1/remotes/{}/subscriptions", REMOTES[r]);
                format!(
                    "{}: subscriptions {how} {id} -> {}",
                    REMOTES[r],
                    self.at_main("POST", &path, Some(json!({ how: [id] }))).await
                )
            }
            84..88 if !self.is_down(|d| matches!(d, Down::Main)) => {
                let (after, back) = (self.rng.below(40), n + 1 + self.rng.below(3));
                self.main.kill_after(Duration::from_millis(after as u64));
                self.down.push((back, Down::Main));
                format!("kill -9 the main in {after} ms, start it again at step {back}")
            }
            88..93 => {
                let r = self.rng.below(REMOTES.len());
                if self.is_down(|d| matches!(d, Down::Remote(x) if x == r)) {
                    return format!("{} is down already", REMOTES[r]);
                }
                let (after, back) = (self.rng.below(40), n + 1 + self.rng.below(4));
                self.remotes[r].kill_after(Duration::from_millis(after as u64));
                self.down.push((back, Down::Remote(r)));
                format!("kill -9 remote {} in {after} ms, start it again at step {back}", REMOTES[r])
            }
            93..96 if !self.is_down(|d| matches!(d, Down::Nats)) => {
                let (after, back) = (self.rng.below(40), n + 1 + self.rng.below(3));
                let pid = self.nats.pid();
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_millis(after as u64)).await;
                    if let Some(pid) = pid {
                        // SAFETY: a signal to a child process of this test.
                        unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
                    }
                });
                self.down.push((back, Down::Nats));
                format!("kill -9 nats-server in {after} ms, start it again at step {back}")
            }
            84..96 => "(already down)".to_owned(),
            _ => {
                let down = Duration::from_millis(200 + self.rng.below(2500) as u64);
                self.proxy.cut.send_replace(true);
                let cut = self.proxy.cut.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(down).await;
                    cut.send_replace(false);
                });
                format!("cut laptop's connection to NATS for {} ms", down.as_millis())
            }
        }
    }

    fn is_down(&self, what: impl Fn(Down) -> bool) -> bool {
        self.down.iter().any(|(_, d)| what(*d))
    }

    /// Starts again what is due back at step `n` (everything, with `None`); returns what.
    async fn bring_back(&mut self, n: Option<usize>) -> Vec<String> {
        // The main does not start without NATS: it waits while nats-server is down.
        let nats_stays_down = self.down.iter().any(|(at, d)| matches!(d, Down::Nats) && n.is_some_and(|n| *at > n));
        let (due, later): (Vec<_>, Vec<_>) = self
            .down
            .iter()
            .partition(|(at, d)| n.is_none_or(|n| *at <= n) && !(nats_stays_down && matches!(d, Down::Main)));
        self.down = later;
        let mut back = Vec::new();
        // NATS first: the main does not start without it.
        let mut due: Vec<Down> = due.into_iter().map(|(_, d)| d).collect();
        due.sort_by_key(|d| !matches!(d, Down::Nats));
        for d in due {
            match d {
                Down::Nats => {
                    let nats = &mut self.nats;
                    tokio::task::block_in_place(|| nats.restart()).unwrap();
                    back.push("nats-server".to_owned());
                }
                Down::Main => {
                    self.main.restart().await;
                    back.push("the main".to_owned());
                }
                Down::Remote(r) => {
                    self.remotes[r].restart().await;
                    back.push(REMOTES[r].to_owned());
                }
            }
        }
        back
    }

    /// Waits until every service is up, connected, and has nothing left to send or apply.
    async fn wait_quiet(&self) {
        let started = std::time::Instant::now();
        let mut quiet_once = false;
        loop {
            let mut statuses = Vec::new();
            let (_, main) = send(&self.token, "GET", format!("{}/v1/status", self.main.base()), None).await;
            let mut idle = main["nats"]["connected"] == true
                && main["outbox"] == 0
                && main["backlog"] == 0
                && main["uploads_waiting"] == 0
                && main["uploads_parked"] == 0;
            statuses.push(main);
            for r in &self.remotes {
                let (_, s) = send(&self.token, "GET", format!("{}/v1/status", r.base()), None).await;
                idle &= s["nats"]["connected"] == true && s["backlog"] == 0 && s["uploads"]["waiting"] == 0;
                statuses.push(s);
            }
            // Quiet twice, a moment apart: a message in flight shows in between.
            if idle && quiet_once {
                return;
            }
            quiet_once = idle;
            if started.elapsed() > Duration::from_secs(120) {
                let shown: Vec<String> = statuses.iter().map(J::to_string).collect();
                panic!("not quiet after 120 s; the statuses of the main and the remotes:\n{}", shown.join("\n"));
            }
            tokio::time::sleep(Duration::from_millis(700)).await;
        }
    }
}

/// The contact ids made at setup.
fn seed_ids() -> Vec<String> {
    (0..16).map(|i| format!("c{i}")).collect()
}

async fn setup(dir: &Path, seed: u64) -> Chaos {
    let nats = tokio::task::block_in_place(|| {
        // As `crmsync up` runs it: every message on disk before its acknowledgement, so a kill -9
        // of nats-server loses nothing acknowledged (at its default it can lose its last
        // milliseconds, an upload among them; see the README's Operations).
        NatsServer::start(&NatsdOptions { store_dir: dir.join("nats"), sync_always: true, ..Default::default() })
    })
    .expect("nats-server starts (run ops/install-nats-server)");
    let proxy = Proxy::start(nats.port).await;
    let main_dir = dir.join("main");
    let port = free_port();
    let main_args = ["main", "serve", "--nats", &nats.url(), "--listen", &format!("127.0.0.1:{port}"), "--data"];
    let main = Service::start("main", main_args.iter().map(|s| s.to_string()).collect(), &main_dir, port);
    let token = admin_token(&main_dir).await;
    let mut chaos = Chaos {
        rng: Rng::new(seed),
        token,
        nats,
        proxy,
        main,
        remotes: Vec::new(),
        contacts: seed_ids(),
        down: Vec::new(),
    };
    wait_for("the main answers", Duration::from_secs(30), || async {
        chaos.at_main("GET", "/v1/status", None).await == 200
    })
    .await;
    assert_eq!(chaos.at_main("POST", "/v1/teams", Some(json!({ "id": "east", "name": "East" }))).await, 201);
    for (id, teams) in [("rep", json!([])), ("boss", json!(["east"])), ("ann", json!(["east"]))] {
        assert_eq!(
            chaos.at_main("POST", "/v1/users", Some(json!({ "id": id, "name": id, "teams": teams }))).await,
            201
        );
    }
    for id in seed_ids() {
        let body = chaos.contact_body(Some(id));
        assert_eq!(chaos.at_main("POST", "/v1/contacts", Some(body)).await, 201);
    }
    let sets = [
        json!({ "name": "ny", "users": ["rep"], "query": "state = NY" }),
        json!({ "name": "east", "users": ["boss", "ann"] }),
    ];
    for body in sets {
        assert_eq!(chaos.at_main("POST", "/v1/sets", Some(body)).await, 201);
    }
    for (name, set) in [("laptop", "ny"), ("tablet", "ny"), ("branch", "east")] {
        let (status, bundle) = send(
            &chaos.token,
            "POST",
            format!("{}/v1/remotes", chaos.main.base()),
            Some(json!({ "name": name, "set": set })),
        )
        .await;
        assert_eq!(status, 201, "{bundle}");
        let file = dir.join(format!("{name}.bundle.json"));
        std::fs::write(&file, serde_json::to_vec(&bundle).unwrap()).unwrap();
        let data = dir.join(name);
        crmsync::remote_service::init(&file, &data).unwrap();
        let port = free_port();
        let mut args: Vec<String> =
            vec!["remote".into(), "serve".into(), "--listen".into(), format!("127.0.0.1:{port}")];
        if name == "laptop" {
            args.extend(["--nats".to_owned(), chaos.proxy.url()]);
        }
        args.push("--data".to_owned());
        chaos.remotes.push(Service::start(name, args, &data, port));
    }
    chaos
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_every_remote_converges_on_the_mains_evaluation_through_kills_and_cuts() {
    let seed = crate::harness::seed();
    let steps: usize = std::env::var("CRMSYNC_CHAOS_STEPS").ok().and_then(|s| s.parse().ok()).unwrap_or(80);
    println!("chaos: {steps} steps, seed {seed} (CRMSYNC_SEED={seed} replays them)");
    let dir = tempfile::tempdir().unwrap();
    let mut chaos = setup(dir.path(), seed).await;
    for n in 0..steps {
        let back = chaos.bring_back(Some(n)).await;
        if !back.is_empty() {
            println!("step {n}: started again: {}", back.join(", "));
        }
        let did = chaos.step(n).await;
        println!("step {n}: {did}");
        let pause = chaos.rng.below(40) as u64;
        tokio::time::sleep(Duration::from_millis(pause)).await;
    }
    let back = chaos.bring_back(None).await;
    println!("end: started again: {back:?}; the laptop's connection restored");
    // A main started again just as nats-server died exits (it owns the streams and cannot
    // start without them): start it once more, now that NATS is up.
    if chaos.main.child.try_wait().is_ok_and(|exited| exited.is_some()) {
        println!("end: the main had exited (started while NATS was down); starting it again");
        chaos.main.restart().await;
    }
    chaos.proxy.cut.send_replace(false);
    chaos.wait_quiet().await;

    // Everyone stops; the files are read as they were left.
    for r in &mut chaos.remotes {
        r.terminate().await;
    }
    chaos.main.terminate().await;
    let main_store = Store::open(&dir.path().join("main").join("main.redb")).unwrap();
    let mut held = Vec::new();
    for name in REMOTES {
        let want = expected_for(&main_store, name);
        let store = Store::open(&dir.path().join(name).join("remote.redb")).unwrap();
        let have = snapshot(&store);
        drop(store);
        compare(name, &want, &have);
        held.push(have);
        println!("{name} holds exactly the {} records the main says it should", want.len());
    }
    drop(main_store);

    // A remote rebuilt from the stream holds the same as the one synced step by step.
    let laptop = dir.path().join("laptop");
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_crmsync"))
        .args(["remote", "rebuild", "--nats", &chaos.nats.url(), "--data"])
        .arg(&laptop)
        .output()
        .await
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let store = Store::open(&laptop.join("remote.redb")).unwrap();
    compare("laptop rebuilt", &held[0], &snapshot(&store));
}

fn compare(name: &str, want: &Snapshot, have: &Snapshot) {
    if want == have {
        return;
    }
    let missing: Vec<_> = want.keys().filter(|k| !have.contains_key(*k)).take(8).collect();
    let extra: Vec<_> = have.keys().filter(|k| !want.contains_key(*k)).take(8).collect();
    let differ: Vec<_> = want
        .iter()
        .filter_map(|(k, v)| have.get(k).filter(|h| *h != v).map(|h| format!("{k:?}: main {v:?} / remote {h:?}")))
        .take(4)
        .collect();
    panic!(
        "{name} holds {} records, the main says {}; missing {missing:?}, extra {extra:?}, different {differ:?}",
        have.len(),
        want.len()
    );
}
