//! The processes a run drives, and the requests it makes of their APIs.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::Context;
use crmsync::model::Kind;
use crmsync::natsd::{NatsServer, NatsdOptions};
use futures::StreamExt;
use serde_json::Value as J;

/// A directory removed when dropped.
pub(super) struct Scratch(pub(super) PathBuf);

impl Scratch {
    pub(super) fn new(label: &str) -> anyhow::Result<Scratch> {
        let dir = std::env::temp_dir().join(format!(
            "crmsync-bench-{}-{label}-{}",
            std::process::id(),
            crmsync::names::new_id()
        ));
        std::fs::create_dir_all(&dir)?;
        Ok(Scratch(dir))
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A `crmsync` child process with an API, killed when dropped.
pub(super) struct Service {
    child: tokio::process::Child,
    pub(super) base: String,
    pub(super) port: u16,
}

impl Service {
    pub(super) async fn spawn(args: &[&str], port: u16) -> anyhow::Result<Service> {
        let exe = std::env::current_exe().context("finding the crmsync binary")?;
        let child = tokio::process::Command::new(exe)
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .context("starting a crmsync service")?;
        let service = Service { child, base: format!("http://127.0.0.1:{port}"), port };
        let http = reqwest::Client::new();
        let start = Instant::now();
        while http.get(format!("{}/v1/status", service.base)).send().await.is_err() {
            anyhow::ensure!(start.elapsed() < Duration::from_secs(30), "a crmsync service did not start: {args:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(service)
    }

    pub(super) fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// Peak resident memory of the process so far, in bytes.
    pub(super) fn peak_memory(&self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()?)).ok()?;
        let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
        let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kb * 1024)
    }

    pub(super) async fn stop(mut self) {
        if let Some(pid) = self.child.id() {
            // SAFETY: kill(2) on our own child.
            unsafe {
                libc::kill(pid as libc::pid_t, libc::SIGTERM);
            }
        }
        let _ = tokio::time::timeout(Duration::from_secs(10), self.child.wait()).await;
    }
}

pub(super) async fn get(http: &reqwest::Client, url: String) -> anyhow::Result<J> {
    let resp = http.get(&url).send().await?;
    anyhow::ensure!(resp.status().is_success(), "GET {url}: {}", resp.status());
    Ok(resp.json().await?)
}

pub(super) async fn post(http: &reqwest::Client, url: String, body: &J) -> anyhow::Result<J> {
    let resp = http.post(&url).json(body).send().await?;
    let status = resp.status();
    let body: J = resp.json().await.unwrap_or(J::Null);
    anyhow::ensure!(status.is_success(), "POST {url}: {status} {body}");
    Ok(body)
}

/// Writes records to an API with `clients` requests in flight, parents before children.
/// Returns the seconds it took.
pub(super) async fn load(
    http: &reqwest::Client,
    base: &str,
    records: &[(Kind, J)],
    clients: usize,
) -> anyhow::Result<f64> {
    let start = Instant::now();
    for phase in crate::demo::PHASES {
        let batch: Vec<_> = records.iter().filter(|(k, _)| phase.contains(k)).collect();
        let mut writes = futures::stream::iter(batch)
            .map(|(kind, body)| post(http, format!("{base}/v1/{}", kind.plural()), body))
            .buffer_unordered(clients);
        while let Some(r) = writes.next().await {
            r?;
        }
    }
    Ok(start.elapsed().as_secs_f64())
}

pub(super) async fn patch_all(
    http: &reqwest::Client,
    base: &str,
    changes: &[(Kind, J)],
    clients: usize,
) -> anyhow::Result<()> {
    let mut writes = futures::stream::iter(changes)
        .map(|(kind, body)| {
            let id = body["id"].as_str().unwrap_or_default().to_owned();
            let mut body = body.clone();
            body.as_object_mut().map(|o| o.remove("id"));
            let url = format!("{base}/v1/{}/{id}", kind.plural());
            async move {
                let resp = http.patch(&url).json(&body).send().await?;
                anyhow::ensure!(resp.status().is_success(), "PATCH {url}: {}", resp.status());
                Ok(())
            }
        })
        .buffer_unordered(clients);
    while let Some(r) = writes.next().await {
        r?;
    }
    Ok(())
}

pub(super) async fn wait_outbox_empty(http: &reqwest::Client, base: &str) -> anyhow::Result<()> {
    let start = Instant::now();
    loop {
        let s = get(http, format!("{base}/v1/status")).await?;
        if s["outbox"] == 0 && s["backlog"] == 0 {
            return Ok(());
        }
        anyhow::ensure!(start.elapsed() < Duration::from_secs(1800), "the main did not finish routing: {s}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub(super) async fn wait_backlog_zero(http: &reqwest::Client, base: &str) -> anyhow::Result<()> {
    let start = Instant::now();
    loop {
        if let Ok(s) = get(http, format!("{base}/v1/status")).await
            && s["backlog"] == 0
            && s["rebuilding"].is_null()
        {
            return Ok(());
        }
        anyhow::ensure!(start.elapsed() < Duration::from_secs(1800), "the remote did not catch up");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// A nats-server of its own for one figure, in `scratch`; with `sync_always`, every message on
/// disk before its acknowledgement.
pub(super) async fn fresh_nats(scratch: &Scratch, sync_always: bool) -> anyhow::Result<NatsServer> {
    let store_dir = scratch.0.join("nats");
    Ok(tokio::task::spawn_blocking(move || {
        NatsServer::start(&NatsdOptions { port: 0, store_dir, sync_always, ..Default::default() })
    })
    .await??)
}

/// An HTTP client signed in as the administrator of the main in `main_dir` (its token is
/// there once it has started), keeping `clients` connections.
pub(super) fn signed_in(main_dir: &std::path::Path, clients: usize) -> anyhow::Result<reqwest::Client> {
    let token = std::fs::read_to_string(main_dir.join(crmsync::main_service::ADMIN_TOKEN_FILE))?;
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert(reqwest::header::AUTHORIZATION, format!("Bearer {}", token.trim()).parse()?);
    Ok(reqwest::Client::builder().pool_max_idle_per_host(clients).default_headers(headers).build()?)
}
