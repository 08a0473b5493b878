//! Commands that run services in this process: `up`, `main serve|rebuild`,
//! `remote init|serve|rebuild`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use futures::StreamExt;

use super::{MainCommand, UpArgs};
use crmsync::http;
use crmsync::main_service::{Main, MainConfig, RemoteRequest, SetRequest};
use crmsync::model::Kind;
use crmsync::natsd::{NatsServer, NatsdOptions};
use crmsync::remote_service::{self, Remote, RemoteConfig, SessionLimits};
use crmsync::wall_clock::WallClock;

/// Completes on Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
    tokio::select! {
        _ = ctrl_c => {}
        _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => {}
    }
}

async fn bind(addr: SocketAddr) -> anyhow::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr).await.with_context(|| {
        format!("cannot listen on {addr}: is another service using it? pick another address with the listen flag")
    })
}

/// Serves an API in the background until `stop` is sent.
fn spawn_api(
    listener: tokio::net::TcpListener,
    router: http::Api,
    tls: Option<http::tls::ServerTls>,
) -> (tokio::sync::oneshot::Sender<()>, tokio::task::JoinHandle<()>) {
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        if let Err(e) = http::serve(
            listener,
            router,
            async move {
                let _ = rx.await;
            },
            tls,
        )
        .await
        {
            tracing::error!("API server failed: {e}");
        }
    });
    (tx, task)
}

pub async fn main(cmd: MainCommand) -> anyhow::Result<()> {
    match cmd {
        MainCommand::Serve { nats, data, listen, tls, replicas } => {
            let server_tls = tls.load()?;
            let listener = bind(listen).await?;
            let clock = WallClock::from_env()?;
            let config = MainConfig {
                clock,
                authority: nats.authority,
                nats_ca: nats.nats_ca,
                replicas: usize::from(replicas),
                ..MainConfig::new(nats.url, data)
            };
            let main = Main::start(config).await?;
            tracing::info!("main of database {} serving on {}://{listen}", main.database_id(), tls.scheme());
            http::serve(listener, http::main_api(main.clone()), shutdown_signal(), server_tls).await?;
            main.stop().await;
            Ok(())
        }
        MainCommand::Rebuild { nats, data } => {
            let bar = progress_bar(0);
            let started = std::time::Instant::now();
            let config =
                MainConfig { authority: nats.authority, nats_ca: nats.nats_ca, ..MainConfig::new(nats.url, data) };
            let events = crmsync::main_service::rebuild(&config, |done, total| {
                bar.set_length(total);
                bar.set_position(done);
            })
            .await?;
            bar.finish_and_clear();
            println!("rebuilt the main's projection from {events} events in {:.2} s", started.elapsed().as_secs_f64());
            Ok(())
        }
        MainCommand::AcceptSyncs { .. } => unreachable!("accept-syncs is a client of the main's API"),
    }
}

fn progress_bar(total: u64) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(total);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len}  {per_sec}  eta {eta}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar
}

pub fn remote_init(bundle: &Path, data: &Path, as_json: bool) -> anyhow::Result<()> {
    let b = remote_service::init(bundle, data)?;
    if as_json {
        println!("{}", serde_json::to_string(&b)?);
    } else {
        println!("remote {} of database {} (set {}) set up in {}", b.remote, b.database_id, b.set, data.display());
        println!("start it with: crmsync remote serve --data {}", data.display());
    }
    Ok(())
}

pub async fn remote_serve(config: RemoteConfig, listen: SocketAddr, tls: &super::TlsArg) -> anyhow::Result<()> {
    let server_tls = tls.load()?;
    let listener = bind(listen).await?;
    let remote = Remote::start(RemoteConfig { wall: WallClock::from_env()?, ..config }).await?;
    tracing::info!("remote {} serving on {}://{listen}", remote.bundle().remote, tls.scheme());
    let (stop_api, api) = spawn_api(listener, http::remote_api(remote.clone()), server_tls);
    let outcome = tokio::select! {
        _ = shutdown_signal() => Ok(()),
        r = remote.stopped() => r,
    };
    let _ = stop_api.send(());
    let _ = api.await;
    remote.stop().await;
    outcome.map_err(|e| anyhow::anyhow!("sync stopped: {e}"))
}

/// `remote sync --once`: one sync session, then a summary.
pub async fn remote_sync_once(config: RemoteConfig, limits: SessionLimits, as_json: bool) -> anyhow::Result<()> {
    let remote = Remote::start(RemoteConfig { wall: WallClock::from_env()?, ..config }).await?;
    let summary = remote.sync_once(limits).await.map_err(anyhow::Error::msg)?;
    if as_json {
        println!("{}", serde_json::to_value(&summary).unwrap_or_default());
    } else {
        println!(
            "synced in {:.2} s: received {} changes, sent {} edits ({} refused, {} not yet answered by the main)",
            summary.seconds, summary.received, summary.sent, summary.refused, summary.unanswered
        );
    }
    Ok(())
}

pub async fn remote_rebuild(data: PathBuf, nats: Option<String>, as_json: bool) -> anyhow::Result<()> {
    let remote = Remote::start(RemoteConfig { nats_url: nats, ..RemoteConfig::new(data) }).await?;
    // A rebuild replays the set from the stream: without NATS there is nothing to replay.
    if remote.wait_for_nats(Duration::from_secs(10)).await.is_err() {
        let url = remote.nats_url().to_owned();
        remote.stop().await;
        anyhow::bail!(
            "cannot reach NATS at {url}: a rebuild replays the remote's set from it. Is nats-server running \
             there? (the projection was left as it was)"
        );
    }
    let total = remote.rebuild().await?;
    let bar = if as_json { indicatif::ProgressBar::hidden() } else { progress_bar(total) };
    let summary = loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let state = remote.state();
        if let Some(err) = state.error {
            bar.abandon();
            anyhow::bail!("the rebuild stopped: {err}");
        }
        match state.rebuilding {
            Some(p) => bar.set_position(p.done),
            None => break state.last_rebuild,
        }
    };
    bar.finish_and_clear();
    remote.stop().await;
    let (records, seconds) = summary.map(|s| (s.records, s.seconds)).unwrap_or_default();
    if as_json {
        println!("{}", serde_json::json!({ "records": records, "seconds": seconds }));
    } else {
        println!("rebuilt {records} records in {seconds:.2} s");
    }
    Ok(())
}

const DEMO_REMOTES: [&str; 2] = ["laptop", "branch"];
/// The NATS authority of `crmsync up`, in its data directory.
const AUTHORITY_FILE: &str = "nats-authority.json";

/// The NATS server's authentication settings from the authority file, made (0600) if it does
/// not exist yet; the server keeps account updates in `resolver_dir`.
/// `crmsync nats-auth`: makes the authority on first use and writes (or prints) the server's
/// settings.
pub fn nats_auth(authority: &Path, resolver_dir: &Path, out: Option<&Path>) -> anyhow::Result<()> {
    let settings = server_settings(authority, resolver_dir)?;
    match out {
        Some(file) => {
            crmsync::files::write_private(file, settings.as_bytes())?;
            println!("wrote {}: include it in nats-server's configuration", file.display());
        }
        None => print!("{settings}"),
    }
    Ok(())
}

fn server_settings(authority: &Path, resolver_dir: &Path) -> anyhow::Result<String> {
    if !authority.exists() {
        if let Some(dir) = authority.parent().filter(|d| !d.as_os_str().is_empty()) {
            crmsync::files::private_dir(dir)?;
        }
        crmsync::identity::Authority::generate().save(authority)?;
        eprintln!("created the NATS authority {} (keep it secret: it signs every credential)", authority.display());
    }
    let authority = crmsync::identity::Authority::load(authority)?;
    crmsync::files::private_dir(resolver_dir)?;
    Ok(authority.server_config(resolver_dir))
}

const DEMO_SET: &str = "all";

pub async fn up(args: UpArgs) -> anyhow::Result<()> {
    if args.remote_listen.len() != DEMO_REMOTES.len() {
        anyhow::bail!("--remote-listen takes {} addresses, one per demo remote", DEMO_REMOTES.len());
    }
    crmsync::files::private_dir(&args.data).with_context(|| format!("cannot create {}", args.data.display()))?;
    let main_listener = bind(args.main_listen).await?;
    let mut remote_listeners = Vec::new();
    for addr in &args.remote_listen {
        remote_listeners.push(bind(*addr).await?);
    }
    // Secure by default: the server requires credentials, the main issues each remote's.
    let authority = args.data.join(AUTHORITY_FILE);
    let nats = start_nats(&args, &authority).await?;
    let nats_url = crmsync::natsd::cluster_urls(&nats);
    let clock = WallClock::from_env()?;
    let replicas = nats.len();
    let config = MainConfig {
        clock,
        authority: Some(authority),
        replicas,
        ..MainConfig::new(nats_url.clone(), args.data.join("main"))
    };
    let main = Main::start(config).await?;
    let (stop_main_api, main_api) = spawn_api(main_listener, http::main_api(main.clone()), None);

    if main.store().get(Kind::Set, DEMO_SET)?.is_none() {
        main.create_set(&SetRequest {
            name: DEMO_SET.into(),
            all: true,
            description: Some("every record of the main".into()),
            ..Default::default()
        })
        .await?;
    }
    let mut remotes = Vec::new();
    for (name, listener) in DEMO_REMOTES.iter().zip(remote_listeners) {
        let remote = demo_remote(&main, &args.data, name).await?;
        let api = spawn_api(listener, http::remote_api(remote.clone()), None);
        remotes.push((remote, api));
    }

    if main.store().counts()?.get(&Kind::Contact).copied().unwrap_or(0) == 0 && args.contacts > 0 {
        seed(&main, args.contacts).await?;
    }
    print_welcome(&args, &main, &nats_url);

    shutdown_signal().await;
    println!("stopping…");
    for (remote, (stop_api, api)) in remotes {
        let _ = stop_api.send(());
        let _ = api.await;
        remote.stop().await;
    }
    let _ = stop_main_api.send(());
    let _ = main_api.await;
    main.stop().await;
    drop(nats);
    Ok(())
}

/// Starts `up`'s nats-server, or with `--cluster` three nodes on the ports from `--nats-port`
/// on, each requiring credentials of the authority.
async fn start_nats(args: &UpArgs, authority: &Path) -> anyhow::Result<Vec<NatsServer>> {
    let data = args.data.clone();
    let authority = authority.to_owned();
    let single = !args.cluster;
    let base = args.nats_port;
    let settings = move |dir: &str| {
        server_settings(&authority, &data.join(dir)).map_err(|e| crmsync::natsd::NatsdError::Io {
            path: data.join(dir),
            source: std::io::Error::other(e.to_string()),
        })
    };
    let data = args.data.clone();
    Ok(tokio::task::spawn_blocking(move || {
        if single {
            // One server holds the only copy: every message on disk before it is acknowledged,
            // so a crash of nats-server loses no change anyone was told is saved.
            let opts = NatsdOptions {
                port: base,
                store_dir: data.join("nats"),
                auth: Some(settings("nats-resolver")?),
                sync_always: true,
                ..Default::default()
            };
            return NatsServer::start(&opts).map(|s| vec![s]);
        }
        let ports = [base, base.saturating_add(1), base.saturating_add(2)];
        crmsync::natsd::start_cluster(&data, &ports, |n| settings(&format!("nats-resolver-n{n}")).map(Some))
    })
    .await??)
}

/// Starts the demo remote `name`, set up first (registered at the main if it is not yet) when
/// its data directory is new.
async fn demo_remote(main: &Main, data: &Path, name: &str) -> anyhow::Result<Remote> {
    let dir = data.join("remotes").join(name);
    if !dir.join("remote.json").exists() {
        let bundle = match main.bundle(name) {
            Ok(b) => b,
            Err(_) => {
                main.create_remote(&RemoteRequest { name: name.into(), set: DEMO_SET.into(), ..Default::default() })
                    .await?
            }
        };
        let file = data.join("remotes").join(format!("{name}.bundle.json"));
        crmsync::files::private_dir(&data.join("remotes"))?;
        crmsync::files::write_private(&file, &serde_json::to_vec_pretty(&bundle)?)?;
        remote_service::init(&file, &dir)?;
    }
    Remote::start(RemoteConfig::new(dir)).await
}

/// What runs where, and what to try.
fn print_welcome(args: &UpArgs, main: &Main, nats_url: &str) {
    println!();
    println!("crmsync is running (database {})", main.database_id());
    println!("  main    http://{}", args.main_listen);
    for (name, addr) in DEMO_REMOTES.iter().zip(&args.remote_listen) {
        println!("  {name:7} http://{addr}   remote on set {DEMO_SET}");
    }
    println!("  nats    {nats_url}   data in {}", args.data.display());
    let token = args.data.join("main").join(crmsync::main_service::ADMIN_TOKEN_FILE);
    println!("  token   {}   (the administrator's API token)", token.display());
    println!();
    println!("Try, in another terminal:");
    println!("  export CRMSYNC_TOKEN_FILE={}", token.display());
    println!("  crmsync status");
    println!("  crmsync contact list state=NY --limit 5");
    println!("  crmsync contact edit contact-1 city=Albany phone='+1 518 555 0100'");
    println!("  crmsync --api http://{} contact show contact-1", args.remote_listen[0]);
    println!("  crmsync --api http://{} status", args.remote_listen[1]);
    println!();
    println!("Ctrl-C stops everything; run `crmsync up` again to resume from the same data.");
}

/// Creates the demo data at the main, parents before children, a few writes at a time.
async fn seed(main: &Main, contacts: usize) -> anyhow::Result<()> {
    let records = crate::demo::generate(crate::demo::DemoSize::for_contacts(contacts), 42);
    let bar = progress_bar(records.len() as u64);
    bar.set_message("seeding");
    for phase in crate::demo::PHASES {
        let batch: Vec<_> = records.iter().filter(|(k, _)| phase.contains(k)).collect();
        let mut writes = futures::stream::iter(batch).map(|(kind, body)| main.create(*kind, body)).buffer_unordered(16);
        while let Some(result) = writes.next().await {
            result?;
            bar.inc(1);
        }
    }
    bar.finish_and_clear();
    println!("seeded {} demo records ({contacts} contacts)", records.len());
    Ok(())
}
