//! The scale simulation: many sets and many remotes on one nats-server and one main. The
//! remotes are registered at the main (each with its durable consumer on `CRM_SYNC`, as in
//! production); the ones that should receive the measured changes (every remote of one set)
//! run for real, in this process, and the time for a change to reach all of them is measured.
//!
//! Each set holds the records its user manages (private contacts, two a set), so a change
//! routes to exactly one set and reaches the remotes of that set alone.

use std::time::{Duration, Instant};

use crmsync::model::Kind;
use crmsync::natsd::free_port;
use crmsync::remote_service::{Remote, RemoteConfig};
use futures::StreamExt;
use serde_json::json;

use super::BenchArgs;
use super::report::{Figures, percentile};
use super::services::{Scratch, Service, fresh_nats, post};

/// Resident memory of a process now and at its peak, in bytes.
fn memory(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|kb| kb.parse::<u64>().ok())
            .map_or(0, |kb| kb * 1024)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

pub(super) async fn scale_figures(args: &BenchArgs, figures: &mut Figures) -> anyhow::Result<()> {
    let (sets, remotes) = (args.scale_sets.max(1), args.scale_remotes.max(1));
    let scratch = Scratch::new("scale")?;
    let nats = fresh_nats(&scratch, args.nats_sync_always).await?;
    let port = free_port();
    let main_dir = scratch.0.join("main");
    let dir = main_dir.to_string_lossy().into_owned();
    let main = Service::spawn(
        &["main", "serve", "--nats", &nats.url(), "--data", &dir, "--listen", &format!("127.0.0.1:{port}")],
        port,
    )
    .await?;
    let http = super::services::signed_in(&main_dir, args.clients)?;
    let base = main.base.clone();
    let in_parallel = |bodies: Vec<(String, serde_json::Value)>| {
        let (http, base) = (&http, &base);
        async move {
            let mut writes = futures::stream::iter(bodies)
                .map(|(path, body)| async move { post(http, format!("{base}{path}"), &body).await })
                .buffer_unordered(16);
            let mut answers = Vec::new();
            while let Some(r) = writes.next().await {
                answers.push(r?);
            }
            anyhow::Ok(answers)
        }
    };
    eprintln!("bench: scale: {sets} users, sets and {} contacts …", sets * 2);
    in_parallel(
        (0..sets)
            .map(|s| ("/v1/users".into(), json!({ "id": format!("u{s}"), "name": format!("User {s}") })))
            .collect(),
    )
    .await?;
    in_parallel(
        (0..sets * 2)
            .map(|i| {
                let body = json!({ "id": format!("c{i}"), "manager": format!("u{}", i % sets), "access": "private" });
                ("/v1/contacts".into(), body)
            })
            .collect(),
    )
    .await?;
    in_parallel(
        (0..sets)
            .map(|s| ("/v1/sets".into(), json!({ "name": format!("set{s}"), "users": [format!("u{s}")] })))
            .collect(),
    )
    .await?;

    eprintln!("bench: scale: {remotes} remotes …");
    let started = Instant::now();
    let bundles = in_parallel(
        (0..remotes)
            .map(|r| ("/v1/remotes".into(), json!({ "name": format!("r{r}"), "set": format!("set{}", r % sets) })))
            .collect(),
    )
    .await?;
    let consumers_secs = started.elapsed().as_secs_f64();
    super::services::wait_outbox_empty(&http, &base).await?;
    let (nats_rss, nats_peak) = nats.pid().map(memory).unwrap_or_default();
    let (main_rss, main_peak) = main.pid().map(memory).unwrap_or_default();

    // Every remote of set0 runs, in this process, and catches up.
    let mut live = Vec::new();
    for bundle in bundles.iter().filter(|b| b["set"] == "set0") {
        let name = bundle["remote"].as_str().unwrap_or_default().to_owned();
        let file = scratch.0.join(format!("{name}.bundle.json"));
        std::fs::write(&file, serde_json::to_vec(bundle)?)?;
        let data = scratch.0.join("remotes").join(&name);
        crmsync::remote_service::init(&file, &data)?;
        live.push(Remote::start(RemoteConfig::new(data)).await?);
    }
    let version_at = |remote: &Remote| remote.store().get(Kind::Contact, "c0").ok().flatten().map_or(0, |r| r.version);
    let wait_all = |version: u64| {
        let live = &live;
        async move {
            let start = Instant::now();
            while !live.iter().all(|r| version_at(r) >= version) {
                anyhow::ensure!(start.elapsed() < Duration::from_secs(120), "a remote of set0 did not receive c0");
                tokio::time::sleep(Duration::from_micros(250)).await;
            }
            anyhow::Ok(start.elapsed())
        }
    };
    wait_all(1).await?;

    // Changes to a contact of set0, one at a time: from the main's answer until every remote
    // of the set holds the new version.
    let changes = if args.smoke { 10 } else { 100 };
    let mut latencies = Vec::new();
    let mut commit_ms = Vec::new();
    for n in 0..changes {
        let start = Instant::now();
        let resp =
            http.patch(format!("{base}/v1/contacts/c0")).json(&json!({ "city": format!("City {n}") })).send().await?;
        anyhow::ensure!(resp.status().is_success(), "PATCH c0: {}", resp.status());
        let version = resp.json::<serde_json::Value>().await?["version"].as_u64().unwrap_or(0);
        commit_ms.push(start.elapsed().as_secs_f64() * 1000.0);
        latencies.push(wait_all(version).await?.as_secs_f64() * 1000.0 + commit_ms[n]);
    }
    latencies.sort_by(f64::total_cmp);
    commit_ms.sort_by(f64::total_cmp);
    for remote in live.drain(..) {
        remote.stop().await;
    }
    main.stop().await;

    let mb = |b: u64| format!("{:.0} MB", b as f64 / 1e6);
    figures.line(
        &format!("registering {remotes} remotes (consumers)"),
        format!("{consumers_secs:.1} s"),
        format!("{:.0}/s", remotes as f64 / consumers_secs.max(1e-9)),
        String::new(),
    );
    figures.line(
        &format!("nats-server memory, {sets} sets, {remotes} consumers"),
        mb(nats_rss),
        format!("peak {}", mb(nats_peak)),
        String::new(),
    );
    figures.line(
        &format!("main memory, {sets} sets, {remotes} remotes"),
        mb(main_rss),
        format!("peak {}", mb(main_peak)),
        String::new(),
    );
    figures.line(
        &format!("a change to all {} remotes of its set, p50/p99", remotes.div_ceil(sets)),
        format!("{:.1} / {:.1} ms", percentile(&latencies, 0.5), percentile(&latencies, 0.99)),
        format!("commit {:.1} ms", percentile(&commit_ms, 0.5)),
        String::new(),
    );
    figures.set(
        "scale",
        json!({
            "sets": sets, "remotes": remotes, "remotes_per_set": remotes.div_ceil(sets),
            "register_seconds": consumers_secs,
            "nats_memory_bytes": nats_rss, "nats_peak_memory_bytes": nats_peak,
            "main_memory_bytes": main_rss, "main_peak_memory_bytes": main_peak,
            "latency_ms": { "p50": percentile(&latencies, 0.5), "p99": percentile(&latencies, 0.99) },
            "commit_ms": { "p50": percentile(&commit_ms, 0.5), "p99": percentile(&commit_ms, 0.99) },
        }),
    );
    Ok(())
}
