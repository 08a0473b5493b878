//! The HTTP server under both APIs: an accept loop over hyper with the limits a service on
//! the open network needs. A client that opens connections and sends half a request (or
//! nothing) must not hold them open for ever: every open connection costs a file descriptor,
//! and a remote with a few hundred of them stops.
//!
//! - A request's head (request line and headers) must arrive within [`HEADER_TIMEOUT`]; the
//!   same limit closes a kept-alive connection that sends no next request.
//! - A request's body must arrive within [`BODY_TIMEOUT`] of its head; a late one is answered
//!   408 (see `parse_body` in `http.rs`).
//! - At most [`MAX_CONNECTIONS`] connections are open at once (fewer when the process may
//!   open fewer files: half its open-file limit). Beyond that, new connections wait in the
//!   listen queue until others close.
//! - With TLS, the handshake must end within [`HEADER_TIMEOUT`] too.
//! - On shutdown the listener closes at once; connections without a request in progress are
//!   closed, requests in progress get up to [`SHUTDOWN_GRACE`] to be answered.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::http::{Request, Response};
use http_body::{Frame, SizeHint};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tokio::time::{Instant, Sleep};

use super::tls::ServerTls;

/// How long a client may take to send a request's head, and how long a kept-alive connection
/// may stay idle.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a client may take to send a request's body (at most [`super::MAX_BODY`] bytes).
pub const BODY_TIMEOUT: Duration = Duration::from_secs(30);
/// Most connections open at once.
pub const MAX_CONNECTIONS: usize = 1024;
/// How long requests in progress may take to be answered once the service stops.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The limits of one server. [`Limits::default`] is what the services use; tests choose
/// short timeouts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub header_timeout: Duration,
    pub body_timeout: Duration,
    pub max_connections: usize,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            header_timeout: HEADER_TIMEOUT,
            body_timeout: BODY_TIMEOUT,
            max_connections: connection_limit(open_file_limit()),
        }
    }
}

/// [`MAX_CONNECTIONS`], or half the files this process may open if that is fewer: the other
/// half stays for the database, NATS and the logs.
fn connection_limit(open_files: u64) -> usize {
    let half = usize::try_from(open_files / 2).unwrap_or(usize::MAX);
    MAX_CONNECTIONS.min(half).max(1)
}

/// The soft limit on open files (`ulimit -n`), or unlimited if it cannot be read.
fn open_file_limit() -> u64 {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit only writes the struct it is given.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } == 0 { limit.rlim_cur } else { u64::MAX }
}

/// Serves `router` on `listener` with `limits` until `shutdown` completes, then stops as the
/// module documentation says.
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
    limits: Limits,
    tls: Option<ServerTls>,
) -> std::io::Result<()> {
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    let (stop, stopping) = watch::channel(false);
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new()).header_read_timeout(limits.header_timeout);
    tokio::pin!(shutdown);
    loop {
        // A connection slot first, then the connection: beyond the limit, new connections
        // wait in the listen queue instead of being accepted and left unanswered.
        let permit = tokio::select! {
            permit = permits.clone().acquire_owned() => permit.expect("the semaphore is never closed"),
            _ = &mut shutdown => break,
        };
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    accept_failed(e).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let in_flight = Arc::new(AtomicUsize::new(0));
        let service = connection_service(router.clone(), limits.body_timeout, in_flight.clone());
        let (http, stopping) = (http.clone(), stopping.clone());
        match tls.clone() {
            None => {
                let connection = http.serve_connection(TokioIo::new(stream), service);
                tokio::spawn(run_connection(connection, in_flight, stopping, permit));
            }
            Some(ServerTls(acceptor)) => {
                tokio::spawn(async move {
                    // The handshake is part of the request's head: a client that starts one
                    // and stalls must not hold its slot.
                    match tokio::time::timeout(limits.header_timeout, acceptor.accept(stream)).await {
                        Ok(Ok(stream)) => {
                            let connection = http.serve_connection(TokioIo::new(stream), service);
                            run_connection(connection, in_flight, stopping, permit).await;
                        }
                        Ok(Err(e)) => tracing::debug!("TLS handshake failed: {e}"),
                        Err(_) => tracing::debug!("TLS handshake did not end in time"),
                    }
                });
            }
        }
    }
    drop(listener);
    let _ = stop.send(true);
    // Every connection holds a permit until it ends: having them all means all have ended.
    let all = u32::try_from(limits.max_connections).unwrap_or(u32::MAX);
    let _ = permits.acquire_many(all).await;
    Ok(())
}

/// An accept that failed: a connection reset before it was accepted is nothing; running out
/// of file descriptors (or another error of the listener) is logged and waited out, so the
/// loop does not spin while connections close.
async fn accept_failed(e: std::io::Error) {
    use std::io::ErrorKind::{ConnectionAborted, ConnectionRefused, ConnectionReset};
    if matches!(e.kind(), ConnectionAborted | ConnectionRefused | ConnectionReset) {
        return;
    }
    tracing::warn!("accepting a connection failed: {e}; trying again in 100 ms");
    tokio::time::sleep(Duration::from_millis(100)).await;
}

/// Runs one connection until it ends or the server stops.
async fn run_connection<S, I>(
    connection: hyper::server::conn::http1::Connection<TokioIo<I>, S>,
    in_flight: Arc<AtomicUsize>,
    mut stopping: watch::Receiver<bool>,
    _permit: OwnedSemaphorePermit,
) where
    S: hyper::service::HttpService<Incoming, ResBody = Body>,
    S::Error: Into<BoxError>,
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    tokio::pin!(connection);
    tokio::select! {
        ended = connection.as_mut() => {
            if let Err(e) = ended {
                tracing::debug!("connection closed: {e}");
            }
            return;
        }
        _ = stopping.wait_for(|stop| *stop) => {}
    }
    connection.as_mut().graceful_shutdown();
    if in_flight.load(Ordering::Acquire) == 0 {
        return; // nothing to answer: dropping the connection closes it
    }
    if tokio::time::timeout(SHUTDOWN_GRACE, connection).await.is_err() {
        tracing::warn!("a request was still in progress {} s after the service stopped", SHUTDOWN_GRACE.as_secs());
    }
}

/// The service of one connection: the router, with the request body under a deadline and the
/// answer counted as in progress until its body is written.
fn connection_service(
    router: Router,
    body_timeout: Duration,
    in_flight: Arc<AtomicUsize>,
) -> impl hyper::service::Service<
    Request<Incoming>,
    Response = Response<Body>,
    Error = Infallible,
    Future = impl Future<Output = Result<Response<Body>, Infallible>> + Send,
> + Clone {
    hyper::service::service_fn(move |req: Request<Incoming>| {
        let mut router = router.clone();
        let answering = Answering::start(&in_flight);
        let deadline = Instant::now() + body_timeout;
        let req = req.map(|body| Body::new(TimedBody { inner: body, deadline, limit: body_timeout, timer: None }));
        async move {
            let response = tower_service::Service::call(&mut router, req).await?;
            Ok(response.map(|body| Body::new(CountedBody { inner: body, _answering: answering })))
        }
    })
}

/// A request body that fails with [`BodyTimeout`] if it has not arrived by its deadline.
struct TimedBody {
    inner: Incoming,
    deadline: Instant,
    limit: Duration,
    /// Made the first time the body is not there yet: a request without a body needs none.
    timer: Option<Pin<Box<Sleep>>>,
}

/// The request body did not arrive in time.
#[derive(Debug, thiserror::Error)]
#[error("the request body did not arrive within {} s of its headers; send the whole request at once", .0.as_secs())]
pub struct BodyTimeout(pub Duration);

impl http_body::Body for TimedBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        if let Poll::Ready(frame) = Pin::new(&mut this.inner).poll_frame(cx) {
            return Poll::Ready(frame.map(|f| f.map_err(BoxError::from)));
        }
        let deadline = this.deadline;
        let timer = this.timer.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        match timer.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Some(Err(Box::new(BodyTimeout(this.limit))))),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        http_body::Body::is_end_stream(&self.inner)
    }

    fn size_hint(&self) -> SizeHint {
        http_body::Body::size_hint(&self.inner)
    }
}

/// Counts a request as in progress from its head until its answer is written.
struct Answering(Arc<AtomicUsize>);

impl Answering {
    fn start(in_flight: &Arc<AtomicUsize>) -> Answering {
        in_flight.fetch_add(1, Ordering::AcqRel);
        Answering(in_flight.clone())
    }
}

impl Drop for Answering {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A response body that keeps its request counted as in progress until hyper drops it.
struct CountedBody {
    inner: Body,
    _answering: Answering,
}

impl http_body::Body for CountedBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_connection_limit_leaves_half_the_open_files_to_the_rest_of_the_service() {
        assert_eq!(connection_limit(256), 128);
        assert_eq!(connection_limit(1 << 20), MAX_CONNECTIONS);
        assert_eq!(connection_limit(u64::MAX), MAX_CONNECTIONS);
        assert_eq!(connection_limit(1), 1);
    }
}
