//! Figures of one data set: load, rebuild, catch-up, latency, memory and disk.

use std::path::Path;
use std::time::{Duration, Instant};

use crmsync::model::Kind;
use crmsync::natsd::free_port;
use crmsync::transport::Nats;
use crmsync::wire::SYNC_STREAM;
use serde_json::{Value as J, json};

use super::BenchArgs;
use super::raw::{raw_consume, raw_redb_insert};
use super::report::{Figures, fmt_rate, median, pct, percentile, rate};
use super::services::{Scratch, Service, get, load, patch_all, post, wait_backlog_zero, wait_outbox_empty};
use crate::demo::{DemoSize, generate};

/// Rebuild, catch-up, latency, memory and disk for one data set.
pub(super) async fn data_set_figures(args: &BenchArgs, contacts: usize, figures: &mut Figures) -> anyhow::Result<()> {
    let scratch = Scratch::new("data")?;
    let nats = super::services::fresh_nats(&scratch, args.nats_sync_always).await?;
    let main_port = free_port();
    let main_dir = scratch.0.join("main");
    let main_dir_s = main_dir.to_string_lossy().into_owned();
    let main = Service::spawn(
        &["main", "serve", "--nats", &nats.url(), "--data", &main_dir_s, "--listen", &format!("127.0.0.1:{main_port}")],
        main_port,
    )
    .await?;
    let http = super::services::signed_in(&main_dir, args.clients)?;
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
    crmsync::remote_service::init(&bundle_file, &dir)?;
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
            raw_consume(nats, &crmsync::wire::target_filter(&crmsync::wire::Target::Set(set.to_owned()))).await?;
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
    let city = format!("City {i} {}", crmsync::names::new_id());
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
