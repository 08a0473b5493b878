//! A remote's own endpoints: an online rebuild, and its sessions log.

use axum::Router;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use serde_json::json;

use super::auth::Authenticated;
use super::error::{ApiResult, ok};
use super::extract::SessionsQuery;
use crate::access::Request;
use crate::remote_service::Remote;

/// A remote's API: its record endpoints (data kinds only), a rebuild and its sessions.
pub fn remote_api(remote: Remote) -> Router {
    super::api(
        remote,
        Router::new().route("/v1/rebuild", post(remote_rebuild)).route("/v1/sessions", get(remote_sessions)),
    )
}

async fn remote_rebuild(State(remote): State<Remote>, caller: Authenticated) -> ApiResult {
    caller.permit(&Request::Configure("rebuilds"))?;
    let total = remote.rebuild().await?;
    ok(StatusCode::ACCEPTED, json!({ "rebuilding": { "done": 0, "total": total } }))
}

/// This remote's newest sync sessions.
async fn remote_sessions(
    State(remote): State<Remote>,
    _caller: Authenticated,
    q: Result<Query<SessionsQuery>, QueryRejection>,
) -> ApiResult {
    let q = SessionsQuery::read(q)?;
    let sessions = remote.store().sessions(q.remote.as_deref(), q.limit())?;
    ok(StatusCode::OK, json!({ "sessions": sessions }))
}
