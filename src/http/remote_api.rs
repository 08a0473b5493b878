//! A remote's own endpoint: an online rebuild.

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::post;
use serde_json::json;

use super::error::{ApiResult, ok};
use crate::remote_service::Remote;

/// A remote's API: its record endpoints (data kinds only) and a rebuild.
pub fn remote_api(remote: Remote) -> Router {
    super::api(remote, Router::new().route("/v1/rebuild", post(remote_rebuild)))
}

async fn remote_rebuild(State(remote): State<Remote>) -> ApiResult {
    let total = remote.rebuild().await?;
    ok(StatusCode::ACCEPTED, json!({ "rebuilding": { "done": 0, "total": total } }))
}
