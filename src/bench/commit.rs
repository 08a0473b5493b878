//! Commit figures (the write path in this process, and HTTP to a main process) and the
//! routing cost per change.

use std::time::{Duration, Instant};

use crmsync::main_service::{Main, MainConfig, SetRequest};
use crmsync::model::Kind;
use crmsync::natsd::free_port;
use crmsync::wire::{Envelope, ORIGIN_MAIN, Op, PRODUCT, SCHEMA_MAJOR};
use futures::StreamExt;
use serde_json::{Value as J, json};

use super::BenchArgs;
use super::raw::{commit_bodies, raw_publish};
use super::report::{Figures, fmt_rate, median, pct, rate};
use super::services::{Scratch, Service, fresh_nats, get, load, post};
use crate::demo::{DemoSize, generate};

/// Commits through the write path (in this process) and through HTTP (a main process), routed
/// to 10 and to 100 sets, beside a bare async publish of the same messages.
pub(super) async fn commit_figures(args: &BenchArgs, figures: &mut Figures) -> anyhow::Result<()> {
    for sets in [10usize, 100] {
        let changes = if sets == 100 { (args.commit_changes / 4).max(50) } else { args.commit_changes };
        let mut path_secs = Vec::new();
        let mut http_secs = Vec::new();
        let mut raw_secs = Vec::new();
        for _ in 0..args.runs {
            let (path, raw) = commit_write_path(sets, changes, args).await?;
            path_secs.push(path);
            raw_secs.push(raw);
            http_secs.push(commit_http(sets, changes, args).await?);
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

/// Seconds for the main's write path (in this process) to commit `changes` new contacts, and
/// for a bare async publish of the same messages in the same server.
async fn commit_write_path(sets: usize, changes: usize, args: &BenchArgs) -> anyhow::Result<(f64, f64)> {
    let clients = args.clients;
    let scratch = Scratch::new("commit")?;
    let nats = fresh_nats(&scratch, args.nats_sync_always).await?;
    let main = Main::start(MainConfig::new(nats.url(), scratch.0.join("main"))).await?;
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

async fn commit_http(sets: usize, changes: usize, args: &BenchArgs) -> anyhow::Result<f64> {
    let clients = args.clients;
    let scratch = Scratch::new("commit-http")?;
    let nats = fresh_nats(&scratch, args.nats_sync_always).await?;
    let port = free_port();
    let dir = scratch.0.join("main").to_string_lossy().into_owned();
    let main = Service::spawn(
        &["main", "serve", "--nats", &nats.url(), "--data", &dir, "--listen", &format!("127.0.0.1:{port}")],
        port,
    )
    .await?;
    let http = super::services::signed_in(std::path::Path::new(&dir), clients)?;
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

/// The router's cost per change with 100 sets, each of two users and a query on the state:
/// deciding the targets, and encoding the one message that goes to all of them. No IO.
pub(super) fn routing_figures(figures: &mut Figures, sets: usize) {
    use crmsync::routing::{RoutingConfig, SetSpec, targets};
    let mut config = RoutingConfig::default();
    for u in 0..20 {
        config.user_teams.insert(format!("user-{u}"), vec![format!("team-{}", u % 3)]);
    }
    for s in 0..sets {
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
    let contacts: Vec<(String, crmsync::model::Fields)> = records
        .iter()
        .filter(|(k, _)| *k == Kind::Contact)
        .map(|(_, b)| {
            let mut f = crmsync::model::Fields::new();
            let patch = crmsync::model::parse_input(Kind::Contact, b, true).map(|i| i.patch).unwrap_or_default();
            crmsync::merge::apply_patch(&mut f, &patch, 1);
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
            std::hint::black_box(crmsync::wire::sync_subject(target, Kind::Contact, id));
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
        &format!("routing cost per change, {sets} sets"),
        format!("{per_change_us:.1} µs ({deciding_us:.1} µs deciding)"),
        String::new(),
        String::new(),
    );
    figures.set(
        &format!("routing_us_per_change_{sets}_sets"),
        json!({ "total": per_change_us, "deciding": deciding_us, "targets_per_change": routed as f64 / contacts.len() as f64 }),
    );
}
