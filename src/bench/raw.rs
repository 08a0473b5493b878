//! The raw baselines, measured in the same run as crmsync's figures: a bare ordered consumer,
//! bare redb inserts, a bare pipelined publish. They go to async-nats and redb directly, not
//! through crmsync's code, or they would not be baselines.

use std::path::Path;
use std::time::Instant;

use crmsync::model::Kind;
use crmsync::natsd::NatsServer;
use crmsync::transport::Nats;
use crmsync::wire::{Envelope, ORIGIN_MAIN, Op, PRODUCT, SCHEMA_MAJOR, SYNC_STREAM};
use futures::StreamExt;

/// A bare ordered consumer reading `filter` from the start until nothing is pending.
pub(super) async fn raw_consume(nats: &Nats, filter: &str) -> anyhow::Result<(f64, Vec<(String, bytes::Bytes)>)> {
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
pub(super) fn raw_redb_insert(dir: &Path, messages: &[(String, bytes::Bytes)]) -> anyhow::Result<f64> {
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

/// The same messages crmsync publishes for `changes` new contacts routed to `sets` sets, as a
/// bare pipelined async publish with the same headers, into streams shaped like crmsync's.
pub(super) async fn raw_publish(nats_server: &NatsServer, sets: usize, changes: usize) -> anyhow::Result<f64> {
    use async_nats::jetstream::{self, stream};
    let nats = Nats::connect(&nats_server.url(), "crmsync-bench-raw").await?;
    for (name, subject, per_subject) in [("RAW_EVENTS", "raw.evt.>", -1), ("RAW_SYNC", "raw.sync.>", 1)] {
        let _ = nats.js.delete_stream(name).await;
        nats.js
            .create_stream(stream::Config {
                name: name.into(),
                subjects: vec![subject.into()],
                max_messages_per_subject: per_subject,
                duplicate_window: crmsync::transport::DEDUP_WINDOW,
                ..Default::default()
            })
            .await?;
    }
    // Payloads are encoded before the clock starts: the baseline is the publish alone.
    let body = crmsync::model::parse_input(Kind::Contact, &commit_bodies(1)[0], true)?.patch;
    let mut fields = crmsync::model::Fields::new();
    crmsync::merge::apply_patch(&mut fields, &body, 1);
    let payloads: Vec<bytes::Bytes> = (0..changes)
        .map(|i| {
            Envelope {
                product: PRODUCT.into(),
                schema: SCHEMA_MAJOR,
                db: "bench".into(),
                event: crmsync::names::new_id(),
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

/// The bodies of `changes` new contacts, as the commit figures write them.
pub(super) fn commit_bodies(changes: usize) -> Vec<serde_json::Value> {
    (0..changes).map(|i| serde_json::json!({ "id": format!("c{i}"), "first_name": "Bench", "last_name": format!("L{i}"), "city": "Albany", "state": "NY" })).collect()
}
