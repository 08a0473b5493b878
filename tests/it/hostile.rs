//! Hostile and careless clients: requests the API must refuse with a JSON error that says what
//! was wrong, and connections that send half a request and must not stop the service.

use std::time::{Duration, Instant};

use crmsync::http::Limits;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::harness::{Api, Env};

/// Serves the main's API with `limits` on a new port; returns its base URL, a stop handle and
/// the server's task.
async fn serve_main_with(
    env: &Env,
    limits: Limits,
) -> (String, tokio::sync::oneshot::Sender<()>, tokio::task::JoinHandle<std::io::Result<()>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let router = crmsync::http::main_router(env.main().clone());
    let task = tokio::spawn(crmsync::http::serve_with(
        listener,
        router,
        async move {
            let _ = rx.await;
        },
        limits,
    ));
    (format!("http://{addr}"), tx, task)
}

/// Opens `n` connections that each send the start of a request and nothing more.
async fn half_open(base: &str, n: usize) -> Vec<TcpStream> {
    let addr = base.trim_start_matches("http://");
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        stream.write_all(b"GET /v1/status HTTP/1.1\r\nHost: crm").await.unwrap();
        out.push(stream);
    }
    out
}

/// Reads until the server closes the connection; true if it did within `limit`.
async fn closed_within(stream: &mut TcpStream, limit: Duration) -> bool {
    let mut buf = [0u8; 1024];
    tokio::time::timeout(limit, async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await
    .is_ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_half_open_connections_neither_stop_the_api_nor_stay_open() {
    let env = Env::start().await;
    let header_timeout = Duration::from_secs(2);
    let limits = Limits { header_timeout, body_timeout: Duration::from_secs(1), max_connections: 1024 };
    let (base, stop, server) = serve_main_with(&env, limits).await;
    let opened = Instant::now();
    let mut slow = half_open(&base, 300).await;

    // The API answers at once while the 300 wait for their timeout.
    let started = Instant::now();
    let status = tokio::time::timeout(header_timeout, Api::new(base.clone()).status()).await;
    assert!(status.is_ok(), "the API did not answer within {header_timeout:?} with 300 half-open connections");
    assert!(started.elapsed() < header_timeout, "answered only after {:?}", started.elapsed());

    // The server closes each of them once its head is late, not before.
    let mut early = 0;
    for stream in &mut slow {
        if opened.elapsed() < header_timeout - Duration::from_millis(500) {
            let mut buf = [0u8; 1];
            early += usize::from(matches!(stream.try_read(&mut buf), Ok(0)));
        }
    }
    assert_eq!(early, 0, "connections were closed before their header timeout");
    for (i, stream) in slow.iter_mut().enumerate() {
        assert!(closed_within(stream, Duration::from_secs(10)).await, "half-open connection {i} is still open");
    }
    assert!(opened.elapsed() >= header_timeout, "closed after {:?}", opened.elapsed());

    // A body that stops half-way is answered 408 once the body timeout passes.
    let mut stream = TcpStream::connect(base.trim_start_matches("http://")).await.unwrap();
    let head =
        "POST /v1/contacts HTTP/1.1\r\nHost: crm\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n";
    stream.write_all(format!("{head}{{\"first_name\": ").as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut answer)).await;
    assert!(read.is_ok(), "no answer to a request whose body never ends");
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("the request body did not arrive within 1 s"), "{answer}");

    // Stopping does not wait for connections that never sent a whole request.
    let _slow = half_open(&base, 50).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let stopping = Instant::now();
    let _ = stop.send(());
    let stopped = tokio::time::timeout(Duration::from_secs(1), server).await;
    assert!(stopped.is_ok(), "the server did not stop within 1 s with 50 half-open connections");
    assert!(stopping.elapsed() < Duration::from_secs(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_connections_beyond_the_limit_wait_and_are_answered_once_others_end() {
    let env = Env::start().await;
    let header_timeout = Duration::from_secs(1);
    let limits = Limits { header_timeout, body_timeout: Duration::from_secs(1), max_connections: 4 };
    let (base, _stop, _server) = serve_main_with(&env, limits).await;
    // Ten connections hold the four slots and queue behind them.
    let _slow = half_open(&base, 10).await;
    let started = Instant::now();
    let status = tokio::time::timeout(Duration::from_secs(15), Api::new(base.clone()).status()).await;
    assert!(status.is_ok(), "the API did not answer once the half-open connections timed out");
    let waited = started.elapsed();
    assert!(waited >= header_timeout, "answered after {waited:?}: the limit of 4 connections was not applied");
}
