//! A three-node JetStream cluster on this host: streams on three replicas, the main and three
//! remotes connected to every node, and a node killed (SIGKILL) in the middle of a burst of
//! writes at the main and at two remotes: every change answered 2xx reaches the main and every
//! remote, none twice.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crmsync::main_service::{Main, MainConfig, RemoteRequest, SetRequest};
use crmsync::model::Kind;
use crmsync::natsd::{NatsServer, cluster_urls, start_cluster};
use crmsync::remote_service::{Remote, RemoteConfig};
use futures::StreamExt;
use serde_json::json;

use crate::harness::{Api, admin_token, serve, wait_converged, wait_for};

async fn cluster(dir: &std::path::Path) -> Vec<NatsServer> {
    let dir = dir.to_owned();
    tokio::task::spawn_blocking(move || start_cluster(&dir, &[0, 0, 0], |_| Ok(None)))
        .await
        .unwrap()
        .expect("three nats-servers start (run ops/install-nats-server)")
}

/// A raw JetStream client of the cluster.
async fn jetstream(urls: &str) -> async_nats::jetstream::Context {
    let addrs = crmsync::transport::server_addrs(urls).unwrap();
    async_nats::jetstream::new(async_nats::connect(addrs).await.unwrap())
}

/// The server name of the node that leads `stream`'s replicas.
async fn leader(js: &async_nats::jetstream::Context, stream: &str) -> String {
    let mut s = js.get_stream(stream).await.unwrap();
    let info = s.info().await.unwrap();
    info.cluster.as_ref().and_then(|c| c.leader.clone()).expect("a replicated stream has a leader")
}

/// Writes contacts `<prefix>0`, `<prefix>1`… one after another through `api` until `stop`;
/// returns those answered 2xx, how many were sent, and the longest answer's time.
async fn write_until(
    api: Api,
    prefix: &'static str,
    stop: tokio::sync::watch::Receiver<bool>,
    done: Arc<AtomicUsize>,
) -> (Vec<String>, usize, Duration) {
    let mut acknowledged = Vec::new();
    let (mut sent, mut slowest) = (0, Duration::ZERO);
    while !*stop.borrow() {
        let id = format!("{prefix}{sent}");
        sent += 1;
        let started = Instant::now();
        let (status, body) = api.post("/v1/contacts", &json!({ "id": id, "city": "Albany" })).await;
        slowest = slowest.max(started.elapsed());
        if (200..300).contains(&status) {
            acknowledged.push(id);
            done.fetch_add(1, Ordering::SeqCst);
        } else {
            eprintln!("{id}: {status} after {:.1} s: {body}", started.elapsed().as_secs_f64());
        }
        // People type: a write every few milliseconds, not as fast as the loop goes.
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    (acknowledged, sent, slowest)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_node_killed_in_a_burst_of_writes_loses_nothing_acknowledged_and_doubles_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mut nodes = cluster(dir.path()).await;
    let urls = cluster_urls(&nodes);
    let main_dir = dir.path().join("main");
    let main =
        Main::start(MainConfig { replicas: 3, ..MainConfig::new(urls.clone(), main_dir.clone()) }).await.unwrap();
    let (base, _stop_main) = serve(crmsync::http::main_api(main.clone())).await;
    let token = admin_token(&main_dir).await;
    let api = Api::new(base).with_token(&token);
    main.create_set(&SetRequest { name: "everyone".into(), all: true, ..Default::default() }).await.unwrap();
    // Three remotes on every node: two people editing, one only receiving.
    let mut remotes = Vec::new();
    for name in ["laptop", "tablet", "branch"] {
        let request = RemoteRequest { name: name.into(), set: "everyone".into(), ..Default::default() };
        let bundle = main.create_remote(&request).await.unwrap();
        assert_eq!(bundle.nats_url, urls, "the bundle names every node");
        let file = dir.path().join(format!("{name}.bundle.json"));
        std::fs::write(&file, serde_json::to_vec(&bundle).unwrap()).unwrap();
        let data = dir.path().join(name);
        crmsync::remote_service::init(&file, &data).unwrap();
        let remote = Remote::start(RemoteConfig::new(data)).await.unwrap();
        let (base, stop_api) = serve(crmsync::http::remote_api(remote.clone())).await;
        remotes.push((remote, Api::new(base).with_token(&token), stop_api));
    }

    let js = jetstream(&urls).await;
    for stream in ["CRM_EVENTS", "CRM_SYNC", "CRM_UP"] {
        let info = js.get_stream(stream).await.unwrap().info().await.unwrap().clone();
        assert_eq!(info.config.num_replicas, 3, "{stream}");
    }

    // A burst at the main and at two remotes; the leader of CRM_EVENTS is killed in its
    // middle, and comes back.
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let writers: Vec<_> = [(api.clone(), "m"), (remotes[0].1.clone(), "r"), (remotes[1].1.clone(), "t")]
        .into_iter()
        .map(|(api, prefix)| {
            let done = Arc::new(AtomicUsize::new(0));
            (prefix, done.clone(), tokio::spawn(write_until(api, prefix, stopped.clone(), done)))
        })
        .collect();
    wait_for("the burst is under way", Duration::from_secs(30), || async {
        main.store().counts().unwrap()[&Kind::Contact] >= 30
    })
    .await;
    let victim = leader(&js, "CRM_EVENTS").await;
    let n = nodes.iter().position(|s| s.log.to_string_lossy().contains(&format!("{victim}.log"))).unwrap_or(0);
    tokio::task::block_in_place(|| nodes[n].kill());
    tokio::time::sleep(Duration::from_secs(3)).await;
    tokio::task::block_in_place(|| nodes[n].restart()).unwrap();
    // The burst goes on after the node is back: 50 more writes acknowledged at each writer.
    let then: Vec<usize> = writers.iter().map(|(_, done, _)| done.load(Ordering::SeqCst)).collect();
    wait_for("writes go on everywhere", Duration::from_secs(60), || async {
        writers.iter().zip(&then).all(|((_, done, _), then)| done.load(Ordering::SeqCst) >= then + 50)
    })
    .await;
    stop.send_replace(true);
    let mut acknowledged = Vec::new();
    for (prefix, _, writer) in writers {
        let (ids, sent, slowest) = writer.await.unwrap();
        eprintln!(
            "killed {victim} for 3 s: {} of {sent} writes by {prefix} answered 2xx (slowest {:.2} s)",
            ids.len(),
            slowest.as_secs_f64()
        );
        acknowledged.extend(ids);
    }

    // Everything acknowledged is at the main and at every remote.
    wait_for("the remotes' edits reach the main", Duration::from_secs(60), || async {
        acknowledged.iter().all(|id| main.store().get(Kind::Contact, id).unwrap().is_some())
    })
    .await;
    for (remote, _, _) in &remotes {
        wait_converged(&main, remote.store()).await;
    }

    // None twice: each contact is one event of CRM_EVENTS.
    let mut events = BTreeMap::new();
    let stream = js.get_stream("CRM_EVENTS").await.unwrap();
    let mut subjects = stream.info_with_subjects("crm.evt.contact.>").await.unwrap();
    while let Some(entry) = subjects.next().await {
        let (subject, count) = entry.unwrap();
        events.insert(subject, count);
    }
    let doubled: Vec<_> = events.iter().filter(|(_, n)| **n > 1).collect();
    assert!(doubled.is_empty(), "changes committed twice: {doubled:?}");
    assert_eq!(events.len(), main.store().counts().unwrap()[&Kind::Contact] as usize);
    for (remote, _, _) in remotes {
        remote.stop().await;
    }
    main.stop().await;
}

/// `main serve --replicas`: the streams take the count given, and a main started again with
/// another count changes the existing streams in place.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn main_serve_puts_its_streams_on_the_replicas_it_is_given_and_changes_existing_ones() {
    use crate::harness::{Stop, crmsync_process, stop, wait_for_status};
    let dir = tempfile::tempdir().unwrap();
    let nodes = cluster(dir.path()).await;
    let urls = cluster_urls(&nodes);
    let js = jetstream(&urls).await;
    let main_dir = dir.path().join("main");
    let port = crmsync::natsd::free_port();
    let listen = format!("127.0.0.1:{port}");
    for replicas in ["1", "3"] {
        let args = ["main", "serve", "--nats", &urls, "--listen", &listen, "--replicas", replicas, "--data"];
        let mut main = crmsync_process(&args, &main_dir);
        let token = admin_token(&main_dir).await;
        let api = Api::new(format!("http://{listen}")).with_token(&token);
        let status = wait_for_status(&api, |s| s["role"] == "main").await;
        assert_eq!(status["nats"]["replicas"].to_string(), replicas, "{status}");
        for stream in ["CRM_EVENTS", "CRM_SYNC", "CRM_UP"] {
            let info = js.get_stream(stream).await.unwrap().info().await.unwrap().clone();
            assert_eq!(info.config.num_replicas.to_string(), replicas, "{stream}");
        }
        stop(&mut main, Stop::Term).await;
        let _ = main.wait().await;
    }
}
