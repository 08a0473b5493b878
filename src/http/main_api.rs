//! The main's own endpoints: sets, remotes and their subscription lists, and the answer to
//! an online rebuild (the main rebuilds offline).

use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::routing::{delete, get, post};
use serde_json::json;

use super::auth::Authenticated;
use super::error::{ApiError, ApiResult, ok};
use super::extract::{ApiPath, ApiQuery, SessionsQuery, parse_body, parse_typed};
use super::records::{MAX_LIMIT, get_record, list_records, record_json};
use crate::access::Request;
use crate::error::ServiceError;
use crate::main_service::{Main, RemoteRequest, SetRequest};
use crate::model::{Kind, Record};

/// The main's API: its record endpoints (every kind reads, data kinds write) and these.
pub fn main_api(main: Main) -> Router {
    let own = Router::new()
        .route("/v1/sets", get(list_sets).post(create_set))
        .route("/v1/sets/{name}", get(show_set).patch(edit_set).delete(delete_set))
        .route("/v1/sets/{name}/copy", post(copy_set))
        .route("/v1/sets/{name}/preview", get(preview_set))
        .route("/v1/remotes/{name}/subscriptions", get(list_subscriptions).post(change_subscriptions))
        .route("/v1/remotes", get(list_remotes).post(create_remote))
        .route("/v1/remotes/{name}", get(show_remote).delete(delete_remote))
        .route("/v1/remotes/{name}/halt", post(halt_remote))
        .route("/v1/remotes/{name}/resume", post(resume_remote))
        .route("/v1/remotes/{name}/recreate", post(recreate_remote))
        .route("/v1/remotes/{name}/sessions", get(remote_sessions))
        .route("/v1/sessions", get(list_sessions))
        .route("/v1/accept-syncs", post(accept_syncs))
        .route("/v1/users/{id}/tokens", get(list_tokens).post(new_token).delete(revoke_tokens))
        .route("/v1/users/{id}/tokens/{token_id}", delete(revoke_token))
        .route("/v1/rebuild", post(main_rebuild));
    super::api(main, own)
}

async fn create_set(State(main): State<Main>, caller: Authenticated, body: Result<Bytes, BytesRejection>) -> ApiResult {
    caller.permit(&Request::Configure("sets"))?;
    let req: SetRequest = parse_typed(body)?;
    let stored = main.create_set(&req).await?;
    ok(StatusCode::CREATED, record_json(&req.name, &stored))
}

async fn list_sets(State(main): State<Main>, caller: Authenticated, ApiQuery(q): ApiQuery) -> ApiResult {
    caller.permit(&Request::Configure("sets"))?;
    ok(StatusCode::OK, list_records(main.store().clone(), Kind::Set, q, caller.0).await?)
}

async fn show_set(State(main): State<Main>, caller: Authenticated, ApiPath(name): ApiPath<String>) -> ApiResult {
    caller.permit(&Request::Configure("sets"))?;
    get_record(main.store(), &caller.0, Kind::Set, &name)
}

async fn edit_set(
    State(main): State<Main>,
    caller: Authenticated,
    ApiPath(name): ApiPath<String>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult {
    caller.permit(&Request::Configure("sets"))?;
    let body = parse_body(body)?;
    let stored = main.edit_set(&name, &body).await?;
    ok(StatusCode::OK, record_json(&name, &stored))
}

async fn delete_set(State(main): State<Main>, caller: Authenticated, ApiPath(name): ApiPath<String>) -> ApiResult {
    caller.permit(&Request::Configure("sets"))?;
    main.delete_set(&name).await?;
    ok(StatusCode::OK, json!({ "deleted": { "kind": Kind::Set, "id": name } }))
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct CopyRequest {
    name: String,
}

async fn copy_set(
    State(main): State<Main>,
    caller: Authenticated,
    ApiPath(name): ApiPath<String>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult {
    caller.permit(&Request::Configure("sets"))?;
    let req: CopyRequest = parse_typed(body)?;
    let stored = main.copy_set(&name, &req.name).await?;
    ok(StatusCode::CREATED, record_json(&req.name, &stored))
}

async fn preview_set(
    State(main): State<Main>,
    caller: Authenticated,
    ApiPath(name): ApiPath<String>,
    ApiQuery(q): ApiQuery,
) -> ApiResult {
    caller.permit(&Request::Configure("sets"))?;
    let limit = match q.get("limit") {
        Some(v) => v.parse().ok().filter(|n| *n <= MAX_LIMIT).ok_or_else(|| {
            ApiError::new(StatusCode::BAD_REQUEST, format!("limit must be a number from 0 to {MAX_LIMIT}, got {v:?}"))
        })?,
        None => 20,
    };
    let preview = tokio::task::spawn_blocking(move || main.preview_set(&name, limit))
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))??;
    ok(StatusCode::OK, preview)
}

async fn list_subscriptions(
    State(main): State<Main>,
    caller: Authenticated,
    ApiPath(name): ApiPath<String>,
) -> ApiResult {
    caller.permit(&Request::Subscriptions)?;
    let contacts = seen_contacts(&main, &caller, main.subscriptions(&name)?)?;
    ok(StatusCode::OK, json!({ "remote": name, "contacts": contacts }))
}

/// The contacts of a list `caller` may see: the others are not theirs to know of.
fn seen_contacts(main: &Main, caller: &Authenticated, ids: Vec<String>) -> Result<Vec<String>, ServiceError> {
    let mut seen = Vec::with_capacity(ids.len());
    for id in ids {
        if sees_contact(main, caller, &id)? {
            seen.push(id);
        }
    }
    Ok(seen)
}

/// Whether the main holds contact `id` and `caller` may see it.
fn sees_contact(main: &Main, caller: &Authenticated, id: &str) -> Result<bool, ServiceError> {
    let contact = main.store().get(Kind::Contact, id)?;
    Ok(contact.is_some_and(|c| crate::access::may_see(&caller.0, Kind::Contact, &c.fields, None)))
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct SubscriptionChange {
    #[serde(default)]
    add: Vec<String>,
    #[serde(default)]
    remove: Vec<String>,
}

async fn change_subscriptions(
    State(main): State<Main>,
    caller: Authenticated,
    ApiPath(name): ApiPath<String>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult {
    caller.permit(&Request::Subscriptions)?;
    let req: SubscriptionChange = parse_typed(body)?;
    // A contact the caller may not see is, to them, one that does not exist.
    for id in req.add.iter().chain(&req.remove) {
        if !sees_contact(&main, &caller, id)? {
            return Err(
                ServiceError::MissingRef { field: "contacts".into(), kind: Kind::Contact, id: id.clone() }.into()
            );
        }
    }
    let mut contacts = main.subscriptions(&name)?;
    if !req.add.is_empty() {
        contacts = main.subscribe(&name, &req.add).await?;
    }
    if !req.remove.is_empty() {
        contacts = main.unsubscribe(&name, &req.remove).await?;
    }
    ok(StatusCode::OK, json!({ "remote": name, "contacts": seen_contacts(&main, &caller, contacts)? }))
}

async fn create_remote(
    State(main): State<Main>,
    caller: Authenticated,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult {
    caller.permit(&Request::Configure("remotes"))?;
    let req: RemoteRequest = parse_typed(body)?;
    let bundle = main.create_remote(&req).await?;
    ok(StatusCode::CREATED, serde_json::to_value(bundle).unwrap_or_default())
}

/// The remotes, each as `show_remote` shows it.
async fn list_remotes(State(main): State<Main>, caller: Authenticated, ApiQuery(q): ApiQuery) -> ApiResult {
    caller.permit(&Request::Configure("remotes"))?;
    let mut page = list_records(main.store().clone(), Kind::Remote, q, caller.0).await?;
    if let Some(items) = page["items"].as_array_mut() {
        let backlogs = futures::future::join_all(
            items.iter().map(|item| main.remote_backlog(item["id"].as_str().unwrap_or_default())),
        )
        .await;
        let names: Vec<&str> = items.iter().map(|item| item["id"].as_str().unwrap_or_default()).collect();
        let waiting = main.remote_uploads_waiting(&names).await;
        for ((item, backlog), waiting) in items.iter_mut().zip(backlogs).zip(waiting) {
            let name = item["id"].as_str().unwrap_or_default().to_owned();
            if let Some(stored) = main.store().get(Kind::Remote, &name)? {
                lifecycle_json(&main, &name, &stored, item)?;
            }
            item["backlog"] = backlog.into();
            item["uploads_waiting"] = waiting.into();
        }
    }
    ok(StatusCode::OK, page)
}

async fn show_remote(State(main): State<Main>, caller: Authenticated, ApiPath(name): ApiPath<String>) -> ApiResult {
    caller.permit(&Request::Configure("remotes"))?;
    let Some(stored) = main.store().get(Kind::Remote, &name)? else {
        return Err(ServiceError::NotFound { kind: Kind::Remote, id: name }.into());
    };
    ok(StatusCode::OK, remote_json(&main, &name, &stored).await?)
}

async fn halt_remote(State(main): State<Main>, caller: Authenticated, ApiPath(name): ApiPath<String>) -> ApiResult {
    caller.permit(&Request::Configure("remotes"))?;
    let stored = main.halt_remote(&name).await?;
    ok(StatusCode::OK, remote_json(&main, &name, &stored).await?)
}

async fn resume_remote(State(main): State<Main>, caller: Authenticated, ApiPath(name): ApiPath<String>) -> ApiResult {
    caller.permit(&Request::Configure("remotes"))?;
    let stored = main.resume_remote(&name).await?;
    ok(StatusCode::OK, remote_json(&main, &name, &stored).await?)
}

async fn recreate_remote(State(main): State<Main>, caller: Authenticated, ApiPath(name): ApiPath<String>) -> ApiResult {
    caller.permit(&Request::Configure("remotes"))?;
    let bundle = main.recreate_remote(&name).await?;
    ok(StatusCode::OK, serde_json::to_value(bundle).unwrap_or_default())
}

async fn delete_remote(State(main): State<Main>, caller: Authenticated, ApiPath(name): ApiPath<String>) -> ApiResult {
    caller.permit(&Request::Configure("remotes"))?;
    main.delete_remote(&name).await?;
    ok(StatusCode::OK, json!({ "deleted": name }))
}

/// A remote as the API shows it: its fields, its state (`active` or `halted`), the messages
/// waiting for it (its backlog) and its edits waiting for the main.
async fn remote_json(main: &Main, name: &str, stored: &Record) -> Result<serde_json::Value, ServiceError> {
    let mut body = record_json(name, stored);
    lifecycle_json(main, name, stored, &mut body)?;
    body["backlog"] = main.remote_backlog(name).await.into();
    body["uploads_waiting"] = main.remote_uploads_waiting(&[name]).await[0].into();
    body["sessions"] = serde_json::to_value(main.sessions(Some(name), 10)?).unwrap_or_default();
    Ok(body)
}

/// A remote's state (`active`, `halted` or `expired`), when it last synced and when it expires
/// (or expired).
fn lifecycle_json(main: &Main, name: &str, stored: &Record, body: &mut serde_json::Value) -> Result<(), ServiceError> {
    let expired = crate::model::remote_expired(&stored.fields);
    body["state"] = match (expired, crate::model::remote_halted(&stored.fields)) {
        (Some(_), _) => "expired",
        (None, true) => "halted",
        (None, false) => "active",
    }
    .into();
    body["last_sync_ms"] = main.last_sync_ms(name, &stored.fields)?.into();
    body["expires_ms"] = expired.map_or_else(|| main.expires_ms(name, &stored.fields), Ok)?.into();
    Ok(())
}

/// The newest sync sessions, of every remote or of one (see [`SessionsQuery`]).
async fn list_sessions(
    State(main): State<Main>,
    caller: Authenticated,
    q: Result<Query<SessionsQuery>, QueryRejection>,
) -> ApiResult {
    caller.permit(&Request::Configure("remotes"))?;
    let q = SessionsQuery::read(q)?;
    let sessions = main.sessions(q.remote.as_deref(), q.limit())?;
    ok(StatusCode::OK, json!({ "sessions": sessions }))
}

async fn remote_sessions(State(main): State<Main>, caller: Authenticated, ApiPath(name): ApiPath<String>) -> ApiResult {
    caller.permit(&Request::Configure("remotes"))?;
    ok(StatusCode::OK, json!({ "remote": name, "sessions": main.sessions(Some(&name), 100)? }))
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct AcceptSyncs {
    accept: bool,
}

async fn accept_syncs(
    State(main): State<Main>,
    caller: Authenticated,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult {
    caller.permit(&Request::Configure("synchronizations"))?;
    let req: AcceptSyncs = parse_typed(body)?;
    ok(StatusCode::OK, json!({ "accepting_syncs": main.accept_syncs(req.accept).await? }))
}

/// A new API token for a user, shown once.
async fn new_token(State(main): State<Main>, caller: Authenticated, ApiPath(id): ApiPath<String>) -> ApiResult {
    caller.permit(&Request::Configure("users' tokens"))?;
    let token = main.new_token(&id).await?;
    let token_id = crate::identity::token_id(&crate::identity::token_hash(&token)).to_owned();
    ok(StatusCode::CREATED, json!({ "user": id, "token": token, "token_id": token_id }))
}

/// The ids of a user's tokens (not the tokens: those are shown once, when made).
async fn list_tokens(State(main): State<Main>, caller: Authenticated, ApiPath(id): ApiPath<String>) -> ApiResult {
    caller.permit(&Request::Configure("users' tokens"))?;
    ok(StatusCode::OK, json!({ "user": id, "token_ids": main.token_ids(&id)? }))
}

/// Revokes one token of a user, by its id.
async fn revoke_token(
    State(main): State<Main>,
    caller: Authenticated,
    ApiPath((id, token_id)): ApiPath<(String, String)>,
) -> ApiResult {
    caller.permit(&Request::Configure("users' tokens"))?;
    main.revoke_token(&id, &token_id).await?;
    ok(StatusCode::OK, json!({ "user": id, "revoked": token_id, "token_ids": main.token_ids(&id)? }))
}

/// Revokes every token of a user.
async fn revoke_tokens(State(main): State<Main>, caller: Authenticated, ApiPath(id): ApiPath<String>) -> ApiResult {
    caller.permit(&Request::Configure("users' tokens"))?;
    main.revoke_tokens(&id).await?;
    ok(StatusCode::OK, json!({ "user": id, "tokens": 0 }))
}

async fn main_rebuild(caller: Authenticated) -> ApiResult {
    caller.permit(&Request::Configure("the main"))?;
    Err(ApiError::new(
        StatusCode::CONFLICT,
        "the main rebuilds offline: stop `crmsync main serve`, run `crmsync main rebuild --data DIR`, then start it again",
    ))
}
