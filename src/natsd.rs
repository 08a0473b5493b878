//! Running a local nats-server: for `crmsync up`, the benchmarks and the tests.
//!
//! The binary is looked up in this order: `$CRMSYNC_NATS_SERVER`; `.tools/bin/nats-server` in
//! the checkout the crmsync binary was built from (where `ops/install-nats-server` puts it);
//! then `nats-server` on `PATH`.

use std::io::Read;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum NatsdError {
    #[error(
        "nats-server was not found (looked at $CRMSYNC_NATS_SERVER, {} and on PATH). \
         Install the pinned version with `ops/install-nats-server` from the crmsync checkout, \
         or set CRMSYNC_NATS_SERVER to its path",
        .0.display()
    )]
    NotFound(PathBuf),
    #[error("cannot start {}: {source}", binary.display())]
    Spawn { binary: PathBuf, source: std::io::Error },
    #[error("nats-server exited at start ({status}); its output:\n{output}")]
    Exited { status: String, output: String },
    #[error("nats-server did not accept connections on port {port} within {secs} s; its log is {}", log.display())]
    Timeout { port: u16, secs: u64, log: PathBuf },
    #[error("cannot prepare {}: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },
}

/// The checkout-local install location, relative to the source tree this binary came from.
fn checkout_binary() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(".tools/bin/nats-server")
}

pub fn find_binary() -> Result<PathBuf, NatsdError> {
    if let Some(p) = std::env::var_os("CRMSYNC_NATS_SERVER") {
        return Ok(PathBuf::from(p));
    }
    let local = checkout_binary();
    if local.is_file() {
        return Ok(local);
    }
    if let Some(paths) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&paths) {
            let candidate = dir.join("nats-server");
            if candidate.is_file() {
                return Ok(candidate);
            }
        }
    }
    Err(NatsdError::NotFound(local))
}

/// A free TCP port on the loopback interface.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).unwrap_or(4222)
}

#[derive(Debug, Clone, Default)]
pub struct NatsdOptions {
    /// 0 picks a free port.
    pub port: u16,
    /// JetStream store directory; its parent also receives `nats-server.log`.
    pub store_dir: PathBuf,
    /// Configuration for authentication (`crate::identity::Authority::server_config`): every
    /// client must then log in. `None`: anyone on the loopback interface may connect.
    pub auth: Option<String>,
    /// The server's TLS certificate and key (PEM files): clients must then speak TLS.
    pub tls: Option<(PathBuf, PathBuf)>,
    /// A WebSocket listener on this port (plain; TLS in front of it is the proxy's), for remotes
    /// behind firewalls that only let HTTP(S) through.
    pub websocket_port: Option<u16>,
    /// Membership of a JetStream cluster on this host.
    pub cluster: Option<ClusterNode>,
    /// JetStream writes every message to disk before acknowledging it (`sync_interval:
    /// always`), instead of within seconds: no acknowledged write lost to a power loss, at a cost.
    pub sync_always: bool,
}

/// One node of a local JetStream cluster: its name, its route port, and every node's route
/// port (its own included).
#[derive(Debug, Clone, Default)]
pub struct ClusterNode {
    pub server_name: String,
    pub route_port: u16,
    pub routes: Vec<u16>,
}

impl ClusterNode {
    /// The configuration lines of this node.
    fn config(&self) -> String {
        let routes: Vec<String> = self.routes.iter().map(|p| format!("nats-route://127.0.0.1:{p}")).collect();
        format!(
            "server_name: \"{}\"\ncluster {{ name: \"crmsync\", listen: \"127.0.0.1:{}\", routes: [{}] }}\n",
            self.server_name,
            self.route_port,
            routes.join(", ")
        )
    }
}

/// A nats-server child process, stopped when dropped.
pub struct NatsServer {
    child: Option<Child>,
    pub port: u16,
    pub store_dir: PathBuf,
    pub log: PathBuf,
    /// What it was started with (the port filled in), to start it again.
    opts: NatsdOptions,
}

impl NatsServer {
    pub fn start(opts: &NatsdOptions) -> Result<NatsServer, NatsdError> {
        let binary = find_binary()?;
        let port = if opts.port == 0 { free_port() } else { opts.port };
        std::fs::create_dir_all(&opts.store_dir)
            .map_err(|source| NatsdError::Io { path: opts.store_dir.clone(), source })?;
        let log = opts
            .store_dir
            .with_file_name(format!("{}.log", opts.store_dir.file_name().and_then(|n| n.to_str()).unwrap_or("nats")));
        // One configuration file beside the store: the listen address, JetStream and, if asked
        // for, authentication.
        let config = opts.store_dir.with_extension("conf");
        let quote = |p: &Path| serde_json::to_string(&p.display().to_string()).unwrap_or_default();
        let tls = match &opts.tls {
            Some((cert, key)) => format!("tls {{ cert_file: {}, key_file: {} }}\n", quote(cert), quote(key)),
            None => String::new(),
        };
        let websocket = match opts.websocket_port {
            Some(port) => format!("websocket {{ listen: \"127.0.0.1:{port}\", no_tls: true }}\n"),
            None => String::new(),
        };
        let cluster = opts.cluster.as_ref().map(ClusterNode::config).unwrap_or_default();
        let sync = if opts.sync_always { ", sync_interval: always" } else { "" };
        let text = format!(
            "listen: \"127.0.0.1:{port}\"\njetstream {{ store_dir: {}{sync} }}\n{tls}{websocket}{cluster}{}",
            quote(&opts.store_dir),
            opts.auth.as_deref().unwrap_or_default()
        );
        crate::files::write_private(&config, text.as_bytes())
            .map_err(|source| NatsdError::Io { path: config.clone(), source })?;
        let child = Command::new(&binary)
            .arg("-c")
            .arg(&config)
            .arg("-l")
            .arg(&log)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|source| NatsdError::Spawn { binary: binary.clone(), source })?;
        let mut server = NatsServer {
            child: Some(child),
            port,
            store_dir: opts.store_dir.clone(),
            log,
            opts: NatsdOptions { port, ..opts.clone() },
        };
        server.wait_ready(Duration::from_secs(15))?;
        Ok(server)
    }

    /// The server's process id while it runs (to pause it, as a test of a server that hangs).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    fn wait_ready(&mut self, limit: Duration) -> Result<(), NatsdError> {
        let start = Instant::now();
        let addr = SocketAddr::from(([127, 0, 0, 1], self.port));
        loop {
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                let mut output = String::new();
                if let Some(mut err) = child.stderr.take() {
                    let _ = err.read_to_string(&mut output);
                }
                if let Ok(log) = std::fs::read_to_string(&self.log) {
                    output.push_str(
                        &log.lines()
                            .rev()
                            .take(20)
                            .collect::<Vec<_>>()
                            .into_iter()
                            .rev()
                            .collect::<Vec<_>>()
                            .join("\n"),
                    );
                }
                self.child = None;
                return Err(NatsdError::Exited { status: status.to_string(), output });
            }
            if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                return Ok(());
            }
            if start.elapsed() > limit {
                return Err(NatsdError::Timeout { port: self.port, secs: limit.as_secs(), log: self.log.clone() });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops the server cleanly (SIGTERM), waiting for it to exit.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SAFETY: kill(2) with a pid we own; the worst case is ESRCH if it already exited.
            unsafe {
                libc::kill(child.id() as libc::pid_t, libc::SIGTERM);
            }
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                match child.try_wait() {
                    Ok(Some(_)) | Err(_) => break,
                    Ok(None) if Instant::now() > deadline => {
                        let _ = child.kill();
                        let _ = child.wait();
                        break;
                    }
                    Ok(None) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        }
    }

    /// Kills the server (SIGKILL: no chance to write anything more), waiting for it to exit.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same port and store, after [`NatsServer::stop`] or
    /// [`NatsServer::kill`].
    pub fn restart(&mut self) -> Result<(), NatsdError> {
        self.stop();
        let again = NatsServer::start(&self.opts)?;
        *self = again;
        Ok(())
    }
}

/// Starts a JetStream cluster on this host, a node for each of `client_ports` (0: a free
/// one), each with its store in `dir/nats-nN` and `auth(n)` (with its own resolver directory,
/// when authentication is on). Clients connect to [`cluster_urls`].
pub fn start_cluster(
    dir: &Path,
    client_ports: &[u16],
    auth: impl Fn(usize) -> Result<Option<String>, NatsdError>,
) -> Result<Vec<NatsServer>, NatsdError> {
    let nodes = client_ports.len();
    let routes: Vec<u16> = (0..nodes).map(|_| free_port()).collect();
    let mut servers = Vec::with_capacity(nodes);
    for n in 1..=nodes {
        let cluster =
            ClusterNode { server_name: format!("crmsync-n{n}"), route_port: routes[n - 1], routes: routes.clone() };
        let opts = NatsdOptions {
            port: client_ports[n - 1],
            store_dir: dir.join(format!("nats-n{n}")),
            auth: auth(n)?,
            cluster: Some(cluster),
            ..Default::default()
        };
        servers.push(NatsServer::start(&opts)?);
    }
    Ok(servers)
}

/// The client URLs of a cluster's nodes, comma-separated, as `--nats` takes them.
pub fn cluster_urls(servers: &[NatsServer]) -> String {
    servers.iter().map(NatsServer::url).collect::<Vec<_>>().join(",")
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.stop();
    }
}
