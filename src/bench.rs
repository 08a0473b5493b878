//! `crmsync bench`: how fast a remote is ready and how soon a change arrives, each figure
//! beside the raw limit of NATS and redb measured in the same run on the same machine.
//!
//! Everything runs for real: a nats-server of its own, the main and the remote as separate
//! `crmsync` processes (so their memory can be read), driven through their HTTP APIs. The
//! figures are medians of `--runs` runs. Nothing here asserts a timing; the output says where
//! a target is met or missed.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::Context;
use futures::StreamExt;
use serde_json::{Value as J, json};

use crate::demo::{DemoSize, generate};
use crate::main_service::{Main, MainConfig, SetRequest};
use crate::model::Kind;
use crate::natsd::{NatsServer, NatsdOptions, free_port};
use crate::transport::Nats;
use crate::wire::{Envelope, ORIGIN_MAIN, Op, PRODUCT, SCHEMA_MAJOR, SYNC_STREAM};

#[derive(Debug, Clone, clap::Args)]
pub struct BenchArgs {
    /// Contacts at the main, one data set each (companies, groups, notes and memberships come with them).
    #[arg(long, value_delimiter = ',', default_value = "10000,100000")]
    pub contacts: Vec<usize>,
    /// Runs per figure; the median is reported.
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// Seed of the generated data.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Changes committed per commit figure.
    #[arg(long, default_value_t = 4000)]
    pub commit_changes: usize,
    /// Changes timed from the main's API to the remote's.
    #[arg(long, default_value_t = 1000)]
    pub latency_changes: usize,
    /// Concurrent HTTP clients writing to the main.
    #[arg(long, default_value_t = 64)]
    pub clients: usize,
    /// A tiny run that only shows the benchmark works (for CI).
    #[arg(long)]
    pub smoke: bool,
}

impl BenchArgs {
    fn effective(mut self) -> BenchArgs {
        if self.smoke {
            self.contacts = vec![1000];
            self.runs = 1;
            self.commit_changes = 200;
            self.latency_changes = 50;
            self.clients = 8;
        }
        self.runs = self.runs.max(1);
        self
    }
}

/// A directory removed when dropped.
struct Scratch(PathBuf);

impl Scratch {
    fn new(label: &str) -> anyhow::Result<Scratch> {
        let dir = std::env::temp_dir().join(format!(
            "crmsync-bench-{}-{label}-{}",
            std::process::id(),
            crate::names::new_id()
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
struct Service {
    child: tokio::process::Child,
    base: String,
    port: u16,
}

impl Service {
    async fn spawn(args: &[&str], port: u16) -> anyhow::Result<Service> {
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

    fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// Peak resident memory of the process so far, in bytes.
    fn peak_memory(&self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()?)).ok()?;
        let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
        let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kb * 1024)
    }

    async fn stop(mut self) {
        if let Some(pid) = self.child.id() {
            // SAFETY: kill(2) on our own child.
            unsafe {
                libc::kill(pid as libc::pid_t, libc::SIGTERM);
            }
        }
        let _ = tokio::time::timeout(Duration::from_secs(10), self.child.wait()).await;
    }
}

async fn get(http: &reqwest::Client, url: String) -> anyhow::Result<J> {
    let resp = http.get(&url).send().await?;
    anyhow::ensure!(resp.status().is_success(), "GET {url}: {}", resp.status());
    Ok(resp.json().await?)
}

async fn post(http: &reqwest::Client, url: String, body: &J) -> anyhow::Result<J> {
    let resp = http.post(&url).json(body).send().await?;
    let status = resp.status();
    let body: J = resp.json().await.unwrap_or(J::Null);
    anyhow::ensure!(status.is_success(), "POST {url}: {status} {body}");
    Ok(body)
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(|a, b| a.total_cmp(b));
    if xs.is_empty() { 0.0 } else { xs[xs.len() / 2] }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// Writes records to an API with `clients` requests in flight, parents before children.
/// Returns the seconds it took.
async fn load(http: &reqwest::Client, base: &str, records: &[(Kind, J)], clients: usize) -> anyhow::Result<f64> {
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

struct Figures {
    json: serde_json::Map<String, J>,
    lines: Vec<(String, String, String, String)>,
}

impl Figures {
    fn new() -> Figures {
        Figures { json: serde_json::Map::new(), lines: Vec::new() }
    }

    fn line(&mut self, figure: &str, crmsync: String, raw: String, ratio: String) {
        self.lines.push((figure.to_owned(), crmsync, raw, ratio));
    }

    fn set(&mut self, key: &str, value: J) {
        self.json.insert(key.to_owned(), value);
    }
}

fn rate(n: f64, secs: f64) -> f64 {
    if secs > 0.0 { n / secs } else { 0.0 }
}

fn fmt_rate(r: f64) -> String {
    let r = r.round() as u64;
    let s = r.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn pct(x: f64) -> String {
    format!("{:.0}%", x * 100.0)
}

pub async fn run(args: BenchArgs, as_json: bool) -> anyhow::Result<()> {
    let args = args.effective();
    let mut report = serde_json::Map::new();
    report.insert("machine".into(), machine());
    report.insert("runs".into(), args.runs.into());
    report.insert("seed".into(), args.seed.into());
    let mut sizes = Vec::new();
    for &n in &args.contacts {
        eprintln!("bench: {n} contacts …");
        let mut figures = Figures::new();
        data_set_figures(&args, n, &mut figures).await.with_context(|| format!("benchmarking {n} contacts"))?;
        if !as_json {
            print_table(&format!("{n} contacts"), &figures);
        }
        figures.json.insert("contacts".into(), n.into());
        sizes.push(J::Object(figures.json));
    }
    report.insert("sizes".into(), sizes.into());
    eprintln!("bench: commit …");
    let mut figures = Figures::new();
    commit_figures(&args, &mut figures).await.context("benchmarking commits")?;
    routing_figures(&mut figures);
    if !as_json {
        print_table("commit and routing", &figures);
    }
    report.insert("commit".into(), J::Object(figures.json));
    let verdicts = targets(&report);
    if as_json {
        report.insert(
            "targets".into(),
            verdicts.iter().map(|v| json!({ "target": v.0, "value": v.1, "met": v.2 })).collect(),
        );
        println!("{}", J::Object(report));
    } else {
        println!();
        println!("targets (2 cores, nats-server on the same machine)");
        for (target, value, met) in &verdicts {
            println!("  {:<7} {target:<68} {value}", if *met { "met" } else { "MISSED" });
        }
    }
    Ok(())
}

/// Each target of the benchmark beside what this run measured: (target, measured, met).
fn targets(report: &serde_json::Map<String, J>) -> Vec<(String, String, bool)> {
    let mut out = Vec::new();
    let f = |v: &J, path: &str| v.pointer(path).and_then(J::as_f64).unwrap_or(0.0);
    for size in report.get("sizes").and_then(J::as_array).cloned().unwrap_or_default() {
        let n = size["contacts"].as_u64().unwrap_or(0);
        for (key, label) in [("rebuild_100", "100 %"), ("rebuild_10", "10 %")] {
            let ratio = f(&size, &format!("/{key}/ratio"));
            let gap = if ratio < 0.8 { format!(" ({:.0} points short)", (0.8 - ratio) * 100.0) } else { String::new() };
            out.push((
                format!("rebuild of a {label} set at {n} contacts >= 80 % of raw"),
                format!("{}{gap}", pct(ratio)),
                ratio >= 0.8,
            ));
        }
        if n >= 1_000_000 {
            let secs = f(&size, "/rebuild_100/seconds");
            let raw = f(&size, "/rebuild_100/raw_seconds");
            out.push((
                format!("rebuild of {n} contacts < 10 s"),
                format!("{secs:.1} s (the raw baseline alone: {raw:.1} s)"),
                secs < 10.0,
            ));
            let mem = f(&size, "/memory_bytes/remote_peak") / 1e6;
            out.push((
                "remote memory while rebuilding 1,000,000 contacts < 100 MB".into(),
                format!("{mem:.0} MB"),
                mem < 100.0,
            ));
            let p99 = f(&size, "/rebuild_100/read_p99_ms");
            out.push((
                "remote API p99 while rebuilding 1,000,000 contacts < 50 ms".into(),
                format!("{p99:.1} ms"),
                p99 < 50.0,
            ));
        }
        let (p50, p99) = (f(&size, "/latency_ms/p50"), f(&size, "/latency_ms/p99"));
        out.push((
            format!("change-to-remote latency at {n} contacts, 1,000/s: p50 < 3 ms, p99 < 15 ms"),
            format!("{p50:.2} / {p99:.2} ms"),
            p50 < 3.0 && p99 < 15.0,
        ));
    }
    if let Some(commit) = report.get("commit") {
        let path = f(commit, "/sets_10/write_path_per_second") / f(commit, "/sets_10/raw_publish_per_second").max(1.0);
        let http = f(commit, "/sets_10/http_per_second") / f(commit, "/sets_10/raw_publish_per_second").max(1.0);
        out.push(("commit with 10 sets >= 50 % of bare publish (write path)".into(), pct(path), path >= 0.5));
        out.push(("commit with 10 sets >= 50 % of bare publish (HTTP)".into(), pct(http), http >= 0.5));
    }
    out
}

fn machine() -> J {
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines().find(|l| l.starts_with("model name")).map(|l| l.split(':').nth(1).unwrap_or("").trim().to_owned())
        })
        .unwrap_or_default();
    json!({ "cores": cores, "cpu": cpu })
}

fn print_table(title: &str, figures: &Figures) {
    println!();
    println!("{title}");
    println!("{:<44} {:>22} {:>26} {:>8}", "figure", "crmsync", "raw baseline (same run)", "ratio");
    for (figure, crmsync, raw, ratio) in &figures.lines {
        println!("{figure:<44} {crmsync:>22} {raw:>26} {ratio:>8}");
    }
}

/// Rebuild, catch-up, latency, memory and disk for one data set.
async fn data_set_figures(args: &BenchArgs, contacts: usize, figures: &mut Figures) -> anyhow::Result<()> {
    let scratch = Scratch::new("data")?;
    let store_dir = scratch.0.join("nats");
    let nats = tokio::task::spawn_blocking(move || NatsServer::start(&NatsdOptions { port: 0, store_dir })).await??;
    let http = reqwest::Client::builder().pool_max_idle_per_host(args.clients).build()?;
    let main_port = free_port();
    let main_dir = scratch.0.join("main");
    let main_dir_s = main_dir.to_string_lossy().into_owned();
    let main = Service::spawn(
        &["main", "serve", "--nats", &nats.url(), "--data", &main_dir_s, "--listen", &format!("127.0.0.1:{main_port}")],
        main_port,
    )
    .await?;
    post(&http, format!("{}/v1/sets", main.base), &json!({ "name": "all", "all": true })).await?;

    // Load the data set through the API, as clients would.
    let records = generate(DemoSize::for_contacts(contacts), args.seed);
    let secs = load(&http, &main.base, &records, args.clients).await?;
    let n = records.len() as f64;
    figures.line(
        &format!("load through HTTP, {} clients (records/s)", args.clients),
        format!("{} ({secs:.1} s)", fmt_rate(rate(n, secs))),
        String::new(),
        String::new(),
    );
    figures.set("load", json!({ "records": records.len(), "seconds": secs, "per_second": rate(n, secs) }));
    wait_outbox_empty(&http, &main.base).await?;

    // A set of a tenth: the New York contacts of any user (all are public), with every
    // company, group and user.
    let users: Vec<String> = (0..20).map(|u| format!("user-{u}")).collect();
    post(&http, format!("{}/v1/sets", main.base), &json!({ "name": "ten", "users": users, "query": "state = NY" }))
        .await?;
    // The new set is filled by the router: wait until all of it is in CRM_SYNC.
    wait_outbox_empty(&http, &main.base).await?;
    let nats_client = Nats::connect(&nats.url(), "crmsync-bench").await?;
    let mut remote = None;
    for (set, label, key) in
        [("ten", "rebuild, set 10% (records/s)", "rebuild_10"), ("all", "rebuild, set 100% (records/s)", "rebuild_100")]
    {
        let r = measure_rebuild(args, &http, &main.base, &scratch.0, &nats_client, set, contacts).await?;
        let ratio = rate(r.records, r.secs) / rate(r.records, r.raw_consume + r.raw_insert);
        let raw_secs = r.raw_consume + r.raw_insert;
        figures.line(
            label,
            format!("{} ({:.2} s)", fmt_rate(rate(r.records, r.secs)), r.secs),
            format!("{} ({raw_secs:.2} s)", fmt_rate(rate(r.records, raw_secs))),
            pct(ratio),
        );
        figures.line(
            "  raw parts: ordered consumer / redb inserts",
            String::new(),
            format!("{} / {} per s", fmt_rate(rate(r.records, r.raw_consume)), fmt_rate(rate(r.records, r.raw_insert))),
            String::new(),
        );
        figures.line("  remote API read p99 meanwhile", format!("{:.2} ms", r.read_p99), String::new(), String::new());
        figures.set(
            key,
            json!({
                "records": r.records as u64, "seconds": r.secs, "per_second": rate(r.records, r.secs),
                "raw_seconds": raw_secs, "raw_consume_seconds": r.raw_consume, "raw_insert_seconds": r.raw_insert,
                "raw_per_second": rate(r.records, raw_secs), "ratio": ratio, "read_p99_ms": r.read_p99,
                "remote_peak_memory_bytes": r.service.peak_memory(),
            }),
        );
        if let Some(old) = remote.replace(r.service) {
            old.stop().await;
        }
    }
    let mut remote = remote.expect("a remote was measured");
    let remote_dir = scratch.0.join("all");
    let remote_port = remote.port;
    let remote_dir_s = remote_dir.to_string_lossy().into_owned();
    let remote_args = ["remote", "serve", "--data", &remote_dir_s, "--listen", &format!("127.0.0.1:{remote_port}")];
    let live = records.len() as f64;

    // Catch-up: the remote is offline while the main commits a backlog.
    let backlog = (contacts / 10).max(100);
    let mut catch_up = Vec::new();
    for run in 0..args.runs {
        remote.stop().await;
        let changes: Vec<(Kind, J)> = (0..backlog)
            .map(|i| {
                (Kind::Contact, json!({ "id": format!("contact-{}", i % contacts), "title": format!("Run {run} {i}") }))
            })
            .collect();
        patch_all(&http, &main.base, &changes, args.clients).await?;
        let start = Instant::now();
        remote = Service::spawn(&remote_args, remote_port).await?;
        wait_backlog_zero(&http, &remote.base).await?;
        catch_up.push(start.elapsed().as_secs_f64());
    }
    let secs = median(catch_up);
    figures.line(
        &format!("catch-up of {backlog} changes (changes/s)"),
        format!("{} ({secs:.2} s)", fmt_rate(rate(backlog as f64, secs))),
        String::new(),
        String::new(),
    );
    figures.set("catch_up", json!({ "changes": backlog, "seconds": secs, "per_second": rate(backlog as f64, secs) }));

    // Latency: one change at a time at the main's API until the remote's API shows it.
    let ids: Vec<String> = (0..contacts.max(1)).map(|i| format!("contact-{i}")).collect();
    let n = args.latency_changes;
    let lat = latency(&http, &main.base, &remote.base, &ids, n, Some(LATENCY_RATE)).await?;
    latency_line(figures, &format!("latency main → remote, {n} changes at {LATENCY_RATE}/s"), "latency_ms", &lat, n);
    let lat = latency(&http, &main.base, &remote.base, &ids, n, None).await?;
    latency_line(figures, "  the same, one change at a time", "latency_one_at_a_time_ms", &lat, n);
    // And from one remote through the main to another: the 100 % remote edits New York
    // contacts, which the 10 % remote (restarted, caught up) holds too.
    let ten_port = free_port();
    let ten_dir = scratch.0.join("ten").to_string_lossy().into_owned();
    let ten = Service::spawn(
        &["remote", "serve", "--data", &ten_dir, "--listen", &format!("127.0.0.1:{ten_port}")],
        ten_port,
    )
    .await?;
    wait_backlog_zero(&http, &ten.base).await?;
    let ny: Vec<String> = records
        .iter()
        .filter(|(k, r)| *k == Kind::Contact && r["state"] == "NY")
        .filter_map(|(_, r)| r["id"].as_str().map(str::to_owned))
        .collect();
    let hop = latency(&http, &remote.base, &ten.base, &ny, n, Some(LATENCY_RATE)).await?;
    let label = format!("latency remote → main → remote, {n} changes at {LATENCY_RATE}/s");
    latency_line(figures, &label, "remote_to_remote_latency_ms", &hop, n);
    let hop = latency(&http, &remote.base, &ten.base, &ny, n, None).await?;
    latency_line(figures, "  the same, one change at a time", "remote_to_remote_one_at_a_time_ms", &hop, n);
    ten.stop().await;

    // Memory and disk.
    let (main_mem, remote_mem) = (main.peak_memory(), remote.peak_memory());
    let mb = |b: Option<u64>| b.map(|b| format!("{:.0} MB", b as f64 / 1e6)).unwrap_or_else(|| "?".into());
    figures.line(
        "peak memory main / remote",
        format!("{} / {}", mb(main_mem), mb(remote_mem)),
        String::new(),
        String::new(),
    );
    let sync_info = nats_client.js.get_stream(SYNC_STREAM).await?.info().await?.clone();
    let remote_file = std::fs::metadata(remote_dir.join("remote.redb"))?.len();
    let per_record_redb = remote_file as f64 / live;
    let per_msg_sync = sync_info.state.bytes as f64 / sync_info.state.messages.max(1) as f64;
    figures.line(
        "disk per record: remote redb / CRM_SYNC",
        format!("{per_record_redb:.0} B / {per_msg_sync:.0} B"),
        String::new(),
        String::new(),
    );
    figures.set("memory_bytes", json!({ "main_peak": main_mem, "remote_peak": remote_mem }));
    figures.set("disk_bytes_per_record", json!({ "remote_redb": per_record_redb, "crm_sync": per_msg_sync }));
    remote.stop().await;
    main.stop().await;
    drop(nats);
    Ok(())
}

struct Rebuilt {
    records: f64,
    secs: f64,
    raw_consume: f64,
    raw_insert: f64,
    read_p99: f64,
    service: Service,
}

/// A remote on `set`, synced, then rebuilt `runs` times with a reader at its API; and the raw
/// baseline over the same filter.
async fn measure_rebuild(
    args: &BenchArgs,
    http: &reqwest::Client,
    main: &str,
    scratch: &Path,
    nats: &Nats,
    set: &str,
    contacts: usize,
) -> anyhow::Result<Rebuilt> {
    let bundle = post(http, format!("{main}/v1/remotes"), &json!({ "name": set, "set": set })).await?;
    let bundle_file = scratch.join(format!("{set}.bundle.json"));
    std::fs::write(&bundle_file, serde_json::to_vec(&bundle)?)?;
    let dir = scratch.join(set);
    crate::remote_service::init(&bundle_file, &dir)?;
    let dir_s = dir.to_string_lossy().into_owned();
    let port = free_port();
    let service =
        Service::spawn(&["remote", "serve", "--data", &dir_s, "--listen", &format!("127.0.0.1:{port}")], port).await?;
    wait_backlog_zero(http, &service.base).await?;
    let status = get(http, format!("{}/v1/status", service.base)).await?;
    let records: u64 = status["counts"].as_object().map(|c| c.values().filter_map(J::as_u64).sum()).unwrap_or(0);
    let (mut secs, mut p99, mut consume, mut insert) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for _ in 0..args.runs {
        let (s, p) = timed_rebuild(http, &service.base, contacts).await?;
        secs.push(s);
        p99.push(p);
        let (c, messages) =
            raw_consume(nats, &crate::wire::target_filter(&crate::wire::Target::Set(set.to_owned()))).await?;
        consume.push(c);
        insert.push(raw_redb_insert(scratch, &messages)?);
    }
    Ok(Rebuilt {
        records: records as f64,
        secs: median(secs),
        raw_consume: median(consume),
        raw_insert: median(insert),
        read_p99: median(p99),
        service,
    })
}

async fn wait_outbox_empty(http: &reqwest::Client, base: &str) -> anyhow::Result<()> {
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

async fn wait_backlog_zero(http: &reqwest::Client, base: &str) -> anyhow::Result<()> {
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

/// One rebuild through the remote's API, with a reader at its API meanwhile. Returns the
/// rebuild's seconds (as the remote measured them) and the reader's p99 in milliseconds.
async fn timed_rebuild(http: &reqwest::Client, base: &str, contacts: usize) -> anyhow::Result<(f64, f64)> {
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reader = {
        let (http, base, done) = (http.clone(), base.to_owned(), done.clone());
        tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut rng = crate::demo::Rng::new(7);
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                let t = Instant::now();
                let _ = http.get(format!("{base}/v1/contacts/contact-{}", rng.below(contacts.max(1)))).send().await;
                lat.push(t.elapsed().as_secs_f64() * 1000.0);
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            lat
        })
    };
    let before = get(http, format!("{base}/v1/status")).await?["last_rebuild"].clone();
    post(http, format!("{base}/v1/rebuild"), &json!({})).await?;
    let start = Instant::now();
    let summary = loop {
        let s = get(http, format!("{base}/v1/status")).await?;
        if s["rebuilding"].is_null() && !s["last_rebuild"].is_null() && s["last_rebuild"] != before {
            break s["last_rebuild"].clone();
        }
        anyhow::ensure!(start.elapsed() < Duration::from_secs(1800), "the rebuild did not finish");
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut lat = reader.await?;
    lat.sort_by(|a, b| a.total_cmp(b));
    Ok((summary["seconds"].as_f64().unwrap_or(0.0), percentile(&lat, 0.99)))
}

/// A bare ordered consumer reading `filter` from the start until nothing is pending.
async fn raw_consume(nats: &Nats, filter: &str) -> anyhow::Result<(f64, Vec<(String, bytes::Bytes)>)> {
    use async_nats::jetstream::consumer;
    let stream = nats.js.get_stream(SYNC_STREAM).await?;
    let start = Instant::now();
    let c = stream
        .create_consumer(consumer::pull::OrderedConfig { filter_subject: filter.to_owned(), ..Default::default() })
        .await?;
    let mut messages = c.messages().await?;
    let mut out = Vec::new();
    while let Some(m) = messages.next().await {
        let m = m?;
        let pending = m.info().map(|i| i.pending).unwrap_or(0);
        out.push((m.subject.to_string(), m.payload.clone()));
        if pending == 0 {
            break;
        }
    }
    Ok((start.elapsed().as_secs_f64(), out))
}

/// Bare redb: the same messages inserted by id, 1,000 per durable transaction.
fn raw_redb_insert(dir: &Path, messages: &[(String, bytes::Bytes)]) -> anyhow::Result<f64> {
    const TABLE: redb::TableDefinition<&str, &[u8]> = redb::TableDefinition::new("raw");
    let path = dir.join("raw.redb");
    let _ = std::fs::remove_file(&path);
    let db = redb::Database::create(&path)?;
    let start = Instant::now();
    for chunk in messages.chunks(1000) {
        let txn = db.begin_write()?;
        {
            let mut table = txn.open_table(TABLE)?;
            for (subject, payload) in chunk {
                let id = subject.rsplit('.').next().unwrap_or(subject);
                table.insert(id, payload.as_ref())?;
            }
        }
        txn.commit()?;
    }
    let secs = start.elapsed().as_secs_f64();
    drop(db);
    let _ = std::fs::remove_file(&path);
    Ok(secs)
}

async fn patch_all(http: &reqwest::Client, base: &str, changes: &[(Kind, J)], clients: usize) -> anyhow::Result<()> {
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

/// p50, p99 and max milliseconds from a change at one API (`writer`) until another (`reader`)
/// shows it, each change on the next of `ids`. With a `rate`, the changes start at that steady
/// rate whether or not earlier ones have arrived (an open loop, as users make them); without,
/// one after another. Each change's reader asks again every [`POLL_EVERY`] (a thread ticks
/// finer than tokio's 1 ms timer): asking nonstop would load the two cores more than the
/// changes themselves do.
async fn latency(
    http: &reqwest::Client,
    writer: &str,
    reader: &str,
    ids: &[String],
    changes: usize,
    rate: Option<f64>,
) -> anyhow::Result<[f64; 3]> {
    anyhow::ensure!(!ids.is_empty(), "no contacts to change for the latency figure");
    let ticker = Ticker::start(POLL_EVERY);
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    let mut lat = Vec::with_capacity(changes);
    for i in 0..changes {
        let (writer, reader, id) = (writer.to_owned(), reader.to_owned(), ids[i % ids.len()].clone());
        let change = one_change(http.clone(), writer, reader, id, i, ticker.tick.clone());
        match rate {
            Some(rate) => {
                if let Some(wait) = Duration::from_secs_f64(i as f64 / rate).checked_sub(start.elapsed()) {
                    tokio::time::sleep(wait).await;
                }
                tasks.spawn(change);
            }
            None => lat.push(change.await?),
        }
    }
    while let Some(done) = tasks.join_next().await {
        lat.push(done??);
    }
    lat.sort_by(|a, b| a.total_cmp(b));
    Ok([percentile(&lat, 0.5), percentile(&lat, 0.99), lat.last().copied().unwrap_or(0.0)])
}

fn latency_line(figures: &mut Figures, label: &str, key: &str, lat: &[f64; 3], changes: usize) {
    let text = format!("p50 {:.2} / p99 {:.2} / max {:.2} ms", lat[0], lat[1], lat[2]);
    figures.line(label, text, String::new(), String::new());
    figures.set(key, json!({ "p50": lat[0], "p99": lat[1], "max": lat[2], "changes": changes }));
}

/// A thread that wakes every waiter of `tick` at a fixed interval, until dropped.
struct Ticker {
    tick: std::sync::Arc<tokio::sync::Notify>,
    running: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Ticker {
    fn start(every: Duration) -> Ticker {
        let tick = std::sync::Arc::new(tokio::sync::Notify::new());
        let running = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
        let (t, r) = (tick.clone(), running.clone());
        std::thread::spawn(move || {
            while r.load(std::sync::atomic::Ordering::Relaxed) {
                std::thread::sleep(every);
                t.notify_waiters();
            }
        });
        Ticker { tick, running }
    }
}

impl Drop for Ticker {
    fn drop(&mut self) {
        self.running.store(false, std::sync::atomic::Ordering::Relaxed);
    }
}

/// One change at `writer` and the milliseconds until `reader` shows it.
async fn one_change(
    http: reqwest::Client,
    writer: String,
    reader: String,
    id: String,
    i: usize,
    poll: std::sync::Arc<tokio::sync::Notify>,
) -> anyhow::Result<f64> {
    // Unique to this run, so no change is a no-op repeat of an earlier run's.
    let city = format!("City {i} {}", crate::names::new_id());
    let tick = Instant::now();
    let resp = http.patch(format!("{writer}/v1/contacts/{id}")).json(&json!({ "city": city })).send().await?;
    anyhow::ensure!(resp.status().is_success(), "PATCH: {}", resp.status());
    loop {
        let c = get(&http, format!("{reader}/v1/contacts/{id}")).await;
        if c.as_ref().is_ok_and(|c| c["city"] == city.as_str()) {
            return Ok(tick.elapsed().as_secs_f64() * 1000.0);
        }
        anyhow::ensure!(tick.elapsed() < Duration::from_secs(30), "change {i} never reached {reader}");
        poll.notified().await;
    }
}

/// Changes per second in the latency figures.
const LATENCY_RATE: f64 = 1000.0;
/// How often a latency reader asks the reading API again.
const POLL_EVERY: Duration = Duration::from_micros(250);

/// Commits through the write path (in this process) and through HTTP (a main process), routed
/// to 10 and to 100 sets, beside a bare async publish of the same messages.
async fn commit_figures(args: &BenchArgs, figures: &mut Figures) -> anyhow::Result<()> {
    for sets in [10usize, 100] {
        let changes = if sets == 100 { (args.commit_changes / 4).max(50) } else { args.commit_changes };
        let mut path_secs = Vec::new();
        let mut http_secs = Vec::new();
        let mut raw_secs = Vec::new();
        for _ in 0..args.runs {
            let (path, raw) = commit_write_path(sets, changes, args.clients).await?;
            path_secs.push(path);
            raw_secs.push(raw);
            http_secs.push(commit_http(sets, changes, args.clients).await?);
        }
        let (path, http, raw) = (median(path_secs), median(http_secs), median(raw_secs));
        let n = changes as f64;
        figures.line(
            &format!("commit, write path, {sets} sets (changes/s)"),
            fmt_rate(rate(n, path)),
            format!("{} publish", fmt_rate(rate(n, raw))),
            pct(rate(n, path) / rate(n, raw)),
        );
        figures.line(
            &format!("commit, HTTP {} clients, {sets} sets", args.clients),
            fmt_rate(rate(n, http)),
            format!("{} publish", fmt_rate(rate(n, raw))),
            pct(rate(n, http) / rate(n, raw)),
        );
        figures.set(
            &format!("sets_{sets}"),
            json!({
                "changes": changes, "write_path_per_second": rate(n, path), "http_per_second": rate(n, http),
                "raw_publish_per_second": rate(n, raw), "messages_per_change": 1 + sets,
            }),
        );
    }
    Ok(())
}

async fn fresh_nats(scratch: &Scratch) -> anyhow::Result<NatsServer> {
    let store_dir = scratch.0.join("nats");
    Ok(tokio::task::spawn_blocking(move || NatsServer::start(&NatsdOptions { port: 0, store_dir })).await??)
}

fn commit_bodies(changes: usize) -> Vec<J> {
    (0..changes).map(|i| json!({ "id": format!("c{i}"), "first_name": "Bench", "last_name": format!("L{i}"), "city": "Albany", "state": "NY" })).collect()
}

/// Seconds for the main's write path (in this process) to commit `changes` new contacts, and
/// for a bare async publish of the same messages in the same server.
async fn commit_write_path(sets: usize, changes: usize, clients: usize) -> anyhow::Result<(f64, f64)> {
    let scratch = Scratch::new("commit")?;
    let nats = fresh_nats(&scratch).await?;
    let main = Main::start(MainConfig { nats_url: nats.url(), data_dir: scratch.0.join("main") }).await?;
    for s in 0..sets {
        main.create_set(&SetRequest { name: format!("set{s}"), all: true, ..Default::default() }).await?;
    }
    let bodies = commit_bodies(changes);
    let start = Instant::now();
    let mut writes =
        futures::stream::iter(bodies.iter()).map(|b| main.create(Kind::Contact, b)).buffer_unordered(clients);
    while let Some(r) = writes.next().await {
        r?;
    }
    // Committed means routed too: wait for the outbox to drain.
    while main.store().outbox_len()? > 0 {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let secs = start.elapsed().as_secs_f64();
    let raw = raw_publish(&nats, sets, changes).await?;
    main.stop().await;
    Ok((secs, raw))
}

async fn commit_http(sets: usize, changes: usize, clients: usize) -> anyhow::Result<f64> {
    let scratch = Scratch::new("commit-http")?;
    let nats = fresh_nats(&scratch).await?;
    let port = free_port();
    let dir = scratch.0.join("main").to_string_lossy().into_owned();
    let main = Service::spawn(
        &["main", "serve", "--nats", &nats.url(), "--data", &dir, "--listen", &format!("127.0.0.1:{port}")],
        port,
    )
    .await?;
    let http = reqwest::Client::builder().pool_max_idle_per_host(clients).build()?;
    for s in 0..sets {
        post(&http, format!("{}/v1/sets", main.base), &json!({ "name": format!("set{s}"), "all": true })).await?;
    }
    let records: Vec<(Kind, J)> = commit_bodies(changes).into_iter().map(|b| (Kind::Contact, b)).collect();
    let start = Instant::now();
    load(&http, &main.base, &records, clients).await?;
    loop {
        let s = get(&http, format!("{}/v1/status", main.base)).await?;
        if s["outbox"] == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let secs = start.elapsed().as_secs_f64();
    main.stop().await;
    Ok(secs)
}

/// The same messages crmsync publishes for `changes` new contacts routed to `sets` sets, as a
/// bare pipelined async publish with the same headers, into streams shaped like crmsync's.
async fn raw_publish(nats_server: &NatsServer, sets: usize, changes: usize) -> anyhow::Result<f64> {
    use async_nats::jetstream::{self, stream};
    let nats = Nats::connect(&nats_server.url(), "crmsync-bench-raw").await?;
    for (name, subject, per_subject) in [("RAW_EVENTS", "raw.evt.>", -1), ("RAW_SYNC", "raw.sync.>", 1)] {
        let _ = nats.js.delete_stream(name).await;
        nats.js
            .create_stream(stream::Config {
                name: name.into(),
                subjects: vec![subject.into()],
                max_messages_per_subject: per_subject,
                duplicate_window: crate::transport::DEDUP_WINDOW,
                ..Default::default()
            })
            .await?;
    }
    // Payloads are encoded before the clock starts: the baseline is the publish alone.
    let body = crate::model::parse_input(Kind::Contact, &commit_bodies(1)[0], true)?.patch;
    let mut fields = crate::model::Fields::new();
    crate::model::apply_patch(&mut fields, &body, 1);
    let payloads: Vec<bytes::Bytes> = (0..changes)
        .map(|i| {
            Envelope {
                product: PRODUCT.into(),
                schema: SCHEMA_MAJOR,
                db: "bench".into(),
                event: crate::names::new_id(),
                kind: Kind::Contact,
                id: format!("c{i}"),
                op: Op::Upsert,
                version: i as u64,
                origin: ORIGIN_MAIN.into(),
                record: Some(fields.clone()),
                reason: None,
            }
            .encode()
            .into()
        })
        .collect();
    let messages = payloads.iter().enumerate().flat_map(|(i, p)| {
        let event = jetstream::message::PublishMessage::build()
            .payload(p.clone())
            .message_id(format!("e{i}"))
            .expected_last_subject_sequence(0);
        std::iter::once((format!("raw.evt.contact.c{i}"), event)).chain((0..sets).map(move |s| {
            let routed = jetstream::message::PublishMessage::build().payload(p.clone()).message_id(format!("{i}:{s}"));
            (format!("raw.sync.set{s}.contact.c{i}"), routed)
        }))
    });
    let start = Instant::now();
    nats.publish_pipelined(messages).await.map_err(|e| anyhow::anyhow!("raw publish: {e}"))?;
    Ok(start.elapsed().as_secs_f64())
}

/// The router's cost per change with 100 sets, each of two users and a query on the state:
/// deciding the targets, and encoding the one message that goes to all of them. No IO.
fn routing_figures(figures: &mut Figures) {
    use crate::routing::{RoutingConfig, SetSpec, targets};
    let mut config = RoutingConfig::default();
    for u in 0..20 {
        config.user_teams.insert(format!("user-{u}"), vec![format!("team-{}", u % 3)]);
    }
    for s in 0..100 {
        let state = crate::demo::STATES[s % crate::demo::STATES.len()].0;
        config.sets.insert(
            format!("set{s}"),
            SetSpec {
                all: false,
                users: vec![format!("user-{}", s % 20), format!("user-{}", (s + 7) % 20)],
                query: Some(format!("state = {state} and custom.source in (web, fair)")),
            },
        );
    }
    let defs = config.target_defs();
    let records = generate(DemoSize::for_contacts(2000), 1);
    let contacts: Vec<(String, crate::model::Fields)> = records
        .iter()
        .filter(|(k, _)| *k == Kind::Contact)
        .map(|(_, b)| {
            let mut f = crate::model::Fields::new();
            let patch = crate::model::parse_input(Kind::Contact, b, true).map(|i| i.patch).unwrap_or_default();
            crate::model::apply_patch(&mut f, &patch, 1);
            (b["id"].as_str().unwrap_or_default().to_owned(), f)
        })
        .collect();
    let start = Instant::now();
    let mut routed = 0usize;
    for (id, fields) in &contacts {
        let to = targets(&defs, Kind::Contact, id, fields);
        routed += to.len();
        let env = Envelope {
            product: PRODUCT.into(),
            schema: SCHEMA_MAJOR,
            db: "bench".into(),
            event: "e".into(),
            kind: Kind::Contact,
            id: id.clone(),
            op: Op::Upsert,
            version: 1,
            origin: ORIGIN_MAIN.into(),
            record: Some(fields.clone()),
            reason: None,
        };
        std::hint::black_box(env.encode());
        for target in &to {
            std::hint::black_box(crate::wire::sync_subject(target, Kind::Contact, id));
        }
    }
    let per_change_us = start.elapsed().as_secs_f64() * 1e6 / contacts.len() as f64;
    let deciding_us = {
        let start = Instant::now();
        let mut n = 0;
        for (id, fields) in &contacts {
            n += targets(&defs, Kind::Contact, id, fields).len();
        }
        std::hint::black_box(n);
        start.elapsed().as_secs_f64() * 1e6 / contacts.len() as f64
    };
    figures.line(
        "routing cost per change, 100 sets",
        format!("{per_change_us:.1} µs ({deciding_us:.1} µs deciding)"),
        String::new(),
        String::new(),
    );
    figures.set(
        "routing_us_per_change_100_sets",
        json!({ "total": per_change_us, "deciding": deciding_us, "targets_per_change": routed as f64 / contacts.len() as f64 }),
    );
}
