//! The HTTP JSON APIs of the main and of a remote. Handlers are glue: they parse, call the
//! service, and turn its result or error into JSON with the right status. Every error is
//! `{"error": "..."}`: the extractors' own rejections (a path or query that is not UTF-8, a
//! body of the wrong type) are turned into it here, and [`json_errors`](error::json_errors)
//! turns whatever other error answer the router makes (405 Method Not Allowed) into it as well.
//!
//! - [`records`]: the record endpoints both APIs share (`/v1/status`, list, show, create,
//!   change, delete), written once over the [`Records`] a service implements;
//! - [`main_api`] and [`remote_api`]: each service's own endpoints beside them;
//! - [`extract`]: reading requests (body, path, query string, `Idempotency-Key`);
//! - [`error`]: the JSON error answer;
//! - [`server`]: the HTTP server under both, with timeouts and a connection limit;
//! - [`tls`]: HTTPS for both, and the command line's trust.

mod auth;
mod error;
mod extract;
mod main_api;
mod records;
mod remote_api;
mod server;
pub mod tls;

use std::future::Future;

use axum::Router;
use axum::extract::DefaultBodyLimit;

/// A service's HTTP API, ready to [`serve`].
pub type Api = axum::Router;

pub use error::ApiError;
pub use extract::MAX_IDEMPOTENCY_KEY;
pub use main_api::main_api;
pub use records::{DEFAULT_LIMIT, MAX_LIMIT, Records};
pub use remote_api::remote_api;
pub use server::{BODY_TIMEOUT, BodyTimeout, HEADER_TIMEOUT, Limits, MAX_CONNECTIONS, SHUTDOWN_GRACE};

/// Largest request body accepted.
pub const MAX_BODY: usize = 1024 * 1024;

/// A service's whole API: its own endpoints (`own`) beside the record endpoints every service
/// has, with the body limit, the fallback and JSON errors around all of them.
fn api<S: Records>(service: S, own: Router<S>) -> Router {
    let routes =
        records::routes(own).fallback(error::fallback).layer(DefaultBodyLimit::max(MAX_BODY)).with_state(service);
    error::with_json_errors(routes)
}

/// Serves `router` on `listener` with the default [`Limits`] until `shutdown` completes;
/// HTTPS with `tls`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
    tls: Option<tls::ServerTls>,
) -> std::io::Result<()> {
    server::serve(listener, router, shutdown, Limits::default(), tls).await
}

/// [`serve`] with other limits (tests use short timeouts), without TLS.
pub async fn serve_with(
    listener: tokio::net::TcpListener,
    router: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
    limits: Limits,
) -> std::io::Result<()> {
    server::serve(listener, router, shutdown, limits, None).await
}
