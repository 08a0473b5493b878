//! The HTTP JSON APIs of the main and of a remote. Handlers are glue: they parse, call the
//! service, and turn its result or error into JSON with the right status. Every error is
//! `{"error": "..."}`: the extractors' own rejections (a path or query that is not UTF-8, a
//! body of the wrong type) are turned into it here, and [`json_errors`] turns whatever other
//! error answer the router makes (405 Method Not Allowed) into it as well.
//!
//! [`server`] is the HTTP server under both: timeouts and a connection limit.

mod server;

use std::collections::BTreeMap;
use std::future::Future;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, FromRequestParts, Path, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, Method, StatusCode, Uri, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{Value as J, json};

use crate::error::ServiceError;
use crate::main_service::{Main, RemoteRequest, SetRequest};
use crate::model::{self, Kind, Value};
use crate::remote_service::Remote;
use crate::store::{Store, Stored};

pub use server::{BODY_TIMEOUT, BodyTimeout, HEADER_TIMEOUT, Limits, MAX_CONNECTIONS, SHUTDOWN_GRACE};

/// Largest request body accepted.
pub const MAX_BODY: usize = 1024 * 1024;
pub const DEFAULT_LIMIT: usize = 100;
pub const MAX_LIMIT: usize = 10_000;

/// An error as the API returns it: a status and `{"error": "..."}`.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> ApiError {
        ApiError { status, message: message.into() }
    }
}

impl From<ServiceError> for ApiError {
    fn from(e: ServiceError) -> ApiError {
        let status = StatusCode::from_u16(e.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        if status.is_server_error() {
            tracing::error!("{e}");
        }
        ApiError::new(status, e.to_string())
    }
}

impl From<crate::store::StoreError> for ApiError {
    fn from(e: crate::store::StoreError) -> ApiError {
        ServiceError::from(e).into()
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(json!({ "error": self.message }))).into_response()
    }
}

type ApiResult = Result<Response, ApiError>;

fn ok(status: StatusCode, body: J) -> ApiResult {
    Ok((status, Json(body)).into_response())
}

/// Parses a request body as JSON, saying where it is wrong.
fn parse_body(body: Result<Bytes, BytesRejection>) -> Result<J, ApiError> {
    let body = body.map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(e.status(), format!("the request body is larger than {MAX_BODY} bytes; send less at once"))
        } else if let Some(timeout) = find_source::<BodyTimeout>(&e) {
            ApiError::new(StatusCode::REQUEST_TIMEOUT, timeout.to_string())
        } else {
            ApiError::new(e.status(), format!("cannot read the request body: {e}"))
        }
    })?;
    serde_json::from_slice(&body).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("the body is not valid JSON: {e} (line {}, column {})", e.line(), e.column()),
        )
    })
}

/// The first error of type `T` in `e`'s chain of sources.
fn find_source<'a, T: std::error::Error + 'static>(e: &'a (dyn std::error::Error + 'static)) -> Option<&'a T> {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if let Some(found) = err.downcast_ref::<T>() {
            return Some(found);
        }
        cur = err.source();
    }
    None
}

fn parse_typed<T: serde::de::DeserializeOwned>(body: Result<Bytes, BytesRejection>) -> Result<T, ApiError> {
    let value = parse_body(body)?;
    serde_json::from_value(value).map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, format!("invalid request: {e}")))
}

/// Path parameters, refused with a JSON error when they do not decode (percent-encoded bytes
/// that are not UTF-8).
struct ApiPath<T>(T);

impl<T, S> FromRequestParts<S> for ApiPath<T>
where
    T: serde::de::DeserializeOwned + Send,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<ApiPath<T>, ApiError> {
        use axum::extract::path::ErrorKind;
        use axum::extract::rejection::PathRejection;
        match Path::<T>::from_request_parts(parts, state).await {
            Ok(Path(value)) => Ok(ApiPath(value)),
            Err(PathRejection::FailedToDeserializePathParams(e))
                if matches!(e.kind(), ErrorKind::InvalidUtf8InPathParam { .. }) =>
            {
                Err(ApiError::new(
                    StatusCode::BAD_REQUEST,
                    format!(
                        "the path {} is not UTF-8 once percent-decoded; ids and names are 1 to 64 of A-Z a-z 0-9 _ -",
                        parts.uri.path()
                    ),
                ))
            }
            Err(e) => Err(ApiError::new(
                e.status(),
                format!("the path {} cannot be read: {}", parts.uri.path(), e.body_text()),
            )),
        }
    }
}

/// The query string as `name=value` pairs (the last of a repeated name wins), refused with a
/// JSON error when a part is not UTF-8 once percent-decoded: decoding it lossily would filter
/// by something else than what was asked.
struct ApiQuery(BTreeMap<String, String>);

impl<S: Send + Sync> FromRequestParts<S> for ApiQuery {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<ApiQuery, ApiError> {
        parse_query(parts.uri.query().unwrap_or_default()).map(ApiQuery)
    }
}

fn parse_query(query: &str) -> Result<BTreeMap<String, String>, ApiError> {
    let not_utf8 = |what: String| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            format!(
                "{what} in the query string is not UTF-8 once percent-decoded; send names and values as percent-encoded UTF-8"
            ),
        )
    };
    let mut out = BTreeMap::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        let name = percent_decode(name).ok_or_else(|| not_utf8(format!("the name {name:?}")))?;
        let value = percent_decode(value).ok_or_else(|| not_utf8(format!("the value {value:?} of `{name}`")))?;
        out.insert(name, value);
    }
    Ok(out)
}

/// Decodes one part of a query string (`+` is a space, `%XX` a byte); `None` if the result is
/// not UTF-8.
fn percent_decode(part: &str) -> Option<String> {
    let hex = |b: Option<&u8>| b.and_then(|b| (*b as char).to_digit(16));
    let bytes = part.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match (bytes[i], hex(bytes.get(i + 1)), hex(bytes.get(i + 2))) {
            (b'%', Some(high), Some(low)) => {
                out.push((high * 16 + low) as u8);
                i += 3;
            }
            (b'+', _, _) => {
                out.push(b' ');
                i += 1;
            }
            (b, _, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

/// Makes every error answer JSON, also those the handlers do not make: the router's 405
/// (empty, with an `Allow` header) and any rejection that slipped through as plain text.
async fn json_errors(req: Request, next: Next) -> Response {
    let (method, path) = (req.method().clone(), req.uri().path().to_owned());
    let response = next.run(req).await;
    let status = response.status();
    let is_json =
        response.headers().get(header::CONTENT_TYPE).is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if is_json || !(status.is_client_error() || status.is_server_error()) {
        return response;
    }
    let (parts, body) = response.into_parts();
    let allow = parts.headers.get(header::ALLOW).cloned();
    let text = axum::body::to_bytes(body, 64 * 1024).await.unwrap_or_default();
    let text = String::from_utf8_lossy(&text).trim().to_owned();
    let message = match (&allow, text.is_empty()) {
        (Some(allow), _) if status == StatusCode::METHOD_NOT_ALLOWED => format!(
            "{path} does not take {method}; it takes {} (see the README's API section)",
            allow.to_str().unwrap_or_default().replace(',', ", ")
        ),
        (_, true) => format!("{status} answering {method} {path}"),
        (_, false) => text,
    };
    let mut response = ApiError::new(status, message).into_response();
    if let Some(allow) = allow {
        response.headers_mut().insert(header::ALLOW, allow);
    }
    response
}

/// Wraps a router in [`json_errors`]. Around the whole router, not as its layer: a layer
/// runs inside each route, before the router adds the `Allow` header of a 405.
fn with_json_errors(routes: Router) -> Router {
    Router::new().fallback_service(routes).layer(middleware::from_fn(json_errors))
}

fn collection(name: &str, allowed: &[Kind]) -> Result<Kind, ApiError> {
    Kind::from_plural(name).filter(|k| allowed.contains(k)).ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            format!(
                "unknown collection `{name}`; the collections are {}",
                allowed.iter().map(|k| k.plural()).collect::<Vec<_>>().join(", ")
            ),
        )
    })
}

fn record_json(id: &str, stored: &Stored) -> J {
    model::to_json(id, stored.version, &stored.fields)
}

/// Whether a record matches every `field=value` filter (strings compare case-insensitively).
fn matches(stored: &Stored, filters: &[(String, String)]) -> bool {
    filters.iter().all(|(name, want)| match stored.fields.get(name).map(|f| &f.value) {
        Some(Value::Str(s)) => s.eq_ignore_ascii_case(want),
        Some(Value::Bool(b)) => b.to_string() == *want,
        Some(Value::Int(i)) => i.to_string() == *want,
        Some(Value::List(l)) => l.iter().any(|x| x == want),
        Some(Value::Null) | None => want.is_empty(),
        Some(Value::Map(_)) => false,
    })
}

/// A page of records as `{"items": [...], "next": ID}`, filtered by `FIELD=VALUE` parameters.
async fn list_records(store: Store, kind: Kind, params: BTreeMap<String, String>) -> Result<J, ApiError> {
    let mut limit = DEFAULT_LIMIT;
    let mut after = None;
    let mut filters = Vec::new();
    for (k, v) in params {
        match k.as_str() {
            "limit" => {
                limit = v.parse().ok().filter(|n| (1..=MAX_LIMIT).contains(n)).ok_or_else(|| {
                    ApiError::new(
                        StatusCode::BAD_REQUEST,
                        format!("limit must be a number from 1 to {MAX_LIMIT}, got {v:?}"),
                    )
                })?
            }
            "after" => after = Some(v),
            _ if kind.field(&k).is_some() || (model::is_custom(&k) && kind.field("custom").is_some()) => {
                filters.push((k, v))
            }
            _ => {
                return Err(ApiError::new(
                    StatusCode::BAD_REQUEST,
                    format!(
                        "cannot filter {} by `{k}`: not a field. Use limit, after, or one of: {}",
                        kind.plural(),
                        kind.fields().iter().map(|f| f.name).collect::<Vec<_>>().join(", ")
                    ),
                ));
            }
        }
    }
    let page =
        tokio::task::spawn_blocking(move || store.list(kind, after.as_deref(), limit + 1, |_, s| matches(s, &filters)))
            .await
            .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))??;
    let next = if page.len() > limit { page.get(limit - 1).map(|(id, _)| id.clone()) } else { None };
    let items: Vec<J> = page.iter().take(limit).map(|(id, s)| record_json(id, s)).collect();
    Ok(json!({ "items": items, "next": next }))
}

fn get_record(store: &Store, kind: Kind, id: &str) -> ApiResult {
    match store.get(kind, id)? {
        Some(stored) => ok(StatusCode::OK, record_json(id, &stored)),
        None => Err(ServiceError::NotFound { kind, id: id.to_owned() }.into()),
    }
}

async fn fallback(method: Method, uri: Uri) -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, format!("no endpoint {method} {}; see the README's API section", uri.path()))
}

// ---------------------------------------------------------------------------------------------
// The main's API

pub fn main_router(main: Main) -> Router {
    let routes = Router::new()
        .route("/v1/status", get(main_status))
        .route("/v1/sets", get(list_sets).post(create_set))
        .route("/v1/sets/{name}", get(show_set).patch(edit_set).delete(delete_set))
        .route("/v1/sets/{name}/copy", post(copy_set))
        .route("/v1/sets/{name}/preview", get(preview_set))
        .route("/v1/remotes/{name}/subscriptions", get(list_subscriptions).post(change_subscriptions))
        .route("/v1/remotes", get(list_remotes).post(create_remote))
        .route("/v1/remotes/{name}", get(show_remote))
        .route("/v1/rebuild", post(main_rebuild))
        .route("/v1/{collection}", get(main_list).post(main_create))
        .route("/v1/{collection}/{id}", get(main_get).patch(main_update).delete(main_delete))
        .fallback(fallback)
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(main);
    with_json_errors(routes)
}

async fn main_status(State(main): State<Main>) -> ApiResult {
    ok(StatusCode::OK, main.status().await?)
}

async fn main_list(State(main): State<Main>, ApiPath(c): ApiPath<String>, ApiQuery(q): ApiQuery) -> ApiResult {
    let kind = collection(&c, &Kind::ALL)?;
    ok(StatusCode::OK, list_records(main.store().clone(), kind, q).await?)
}

async fn main_get(State(main): State<Main>, ApiPath((c, id)): ApiPath<(String, String)>) -> ApiResult {
    let kind = collection(&c, &Kind::ALL)?;
    get_record(main.store(), kind, &id)
}

/// Most characters of an `Idempotency-Key`.
pub const MAX_IDEMPOTENCY_KEY: usize = 128;

/// The client's `Idempotency-Key`, if it sent one: repeating a write with the same key never
/// applies it twice (the main answers with what the first one did).
fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let Some(value) = headers.get("idempotency-key") else { return Ok(None) };
    let key = value.to_str().ok().filter(|k| {
        (1..=MAX_IDEMPOTENCY_KEY).contains(&k.len())
            && k.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'))
    });
    match key {
        Some(key) => Ok(Some(key.to_owned())),
        None => Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            format!(
                "the Idempotency-Key header must be 1 to {MAX_IDEMPOTENCY_KEY} characters of A-Z a-z 0-9 - _ . : \
                 (a UUID or ULID will do)"
            ),
        )),
    }
}

async fn main_create(
    State(main): State<Main>,
    ApiPath(c): ApiPath<String>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult {
    let kind = collection(&c, &Kind::DATA)?;
    let key = idempotency_key(&headers)?;
    let body = parse_body(body)?;
    let (id, stored) = main.create_keyed(kind, &body, key.as_deref()).await?;
    ok(StatusCode::CREATED, record_json(&id, &stored))
}

async fn main_update(
    State(main): State<Main>,
    ApiPath((c, id)): ApiPath<(String, String)>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult {
    let kind = collection(&c, &Kind::DATA)?;
    let key = idempotency_key(&headers)?;
    let body = parse_body(body)?;
    let stored = main.update_keyed(kind, &id, &body, key.as_deref()).await?;
    ok(StatusCode::OK, record_json(&id, &stored))
}

async fn main_delete(
    State(main): State<Main>,
    ApiPath((c, id)): ApiPath<(String, String)>,
    headers: HeaderMap,
) -> ApiResult {
    let kind = collection(&c, &Kind::DATA)?;
    let key = idempotency_key(&headers)?;
    main.delete_keyed(kind, &id, key.as_deref()).await?;
    ok(StatusCode::OK, json!({ "deleted": { "kind": kind, "id": id } }))
}

async fn create_set(State(main): State<Main>, body: Result<Bytes, BytesRejection>) -> ApiResult {
    let req: SetRequest = parse_typed(body)?;
    let stored = main.create_set(&req).await?;
    ok(StatusCode::CREATED, record_json(&req.name, &stored))
}

async fn list_sets(State(main): State<Main>, ApiQuery(q): ApiQuery) -> ApiResult {
    ok(StatusCode::OK, list_records(main.store().clone(), Kind::Set, q).await?)
}

async fn show_set(State(main): State<Main>, ApiPath(name): ApiPath<String>) -> ApiResult {
    get_record(main.store(), Kind::Set, &name)
}

async fn edit_set(
    State(main): State<Main>,
    ApiPath(name): ApiPath<String>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult {
    let body = parse_body(body)?;
    let stored = main.edit_set(&name, &body).await?;
    ok(StatusCode::OK, record_json(&name, &stored))
}

async fn delete_set(State(main): State<Main>, ApiPath(name): ApiPath<String>) -> ApiResult {
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
    ApiPath(name): ApiPath<String>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult {
    let req: CopyRequest = parse_typed(body)?;
    let stored = main.copy_set(&name, &req.name).await?;
    ok(StatusCode::CREATED, record_json(&req.name, &stored))
}

async fn preview_set(State(main): State<Main>, ApiPath(name): ApiPath<String>, ApiQuery(q): ApiQuery) -> ApiResult {
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

async fn list_subscriptions(State(main): State<Main>, ApiPath(name): ApiPath<String>) -> ApiResult {
    ok(StatusCode::OK, json!({ "remote": name, "contacts": main.subscriptions(&name)? }))
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
    ApiPath(name): ApiPath<String>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult {
    let req: SubscriptionChange = parse_typed(body)?;
    let mut contacts = main.subscriptions(&name)?;
    if !req.add.is_empty() {
        contacts = main.subscribe(&name, &req.add).await?;
    }
    if !req.remove.is_empty() {
        contacts = main.unsubscribe(&name, &req.remove).await?;
    }
    ok(StatusCode::OK, json!({ "remote": name, "contacts": contacts }))
}

async fn create_remote(State(main): State<Main>, body: Result<Bytes, BytesRejection>) -> ApiResult {
    let req: RemoteRequest = parse_typed(body)?;
    let bundle = main.create_remote(&req).await?;
    ok(StatusCode::CREATED, serde_json::to_value(bundle).unwrap_or_default())
}

/// The remotes, each as `show_remote` shows it: its fields and the messages waiting for it.
async fn list_remotes(State(main): State<Main>, ApiQuery(q): ApiQuery) -> ApiResult {
    let mut page = list_records(main.store().clone(), Kind::Remote, q).await?;
    if let Some(items) = page["items"].as_array_mut() {
        let backlogs = futures::future::join_all(
            items.iter().map(|item| main.remote_backlog(item["id"].as_str().unwrap_or_default())),
        )
        .await;
        for (item, backlog) in items.iter_mut().zip(backlogs) {
            item["backlog"] = backlog.into();
        }
    }
    ok(StatusCode::OK, page)
}

async fn show_remote(State(main): State<Main>, ApiPath(name): ApiPath<String>) -> ApiResult {
    let Some(stored) = main.store().get(Kind::Remote, &name)? else {
        return Err(ServiceError::NotFound { kind: Kind::Remote, id: name }.into());
    };
    let mut body = record_json(&name, &stored);
    body["backlog"] = main.remote_backlog(&name).await.into();
    ok(StatusCode::OK, body)
}

async fn main_rebuild() -> ApiError {
    ApiError::new(
        StatusCode::CONFLICT,
        "the main rebuilds offline: stop `crmsync main serve`, run `crmsync main rebuild --data DIR`, then start it again",
    )
}

// ---------------------------------------------------------------------------------------------
// A remote's API

pub fn remote_router(remote: Remote) -> Router {
    let routes = Router::new()
        .route("/v1/status", get(remote_status))
        .route("/v1/rebuild", post(remote_rebuild))
        .route("/v1/{collection}", get(remote_list).post(remote_create))
        .route("/v1/{collection}/{id}", get(remote_get).patch(remote_update).delete(remote_delete))
        .fallback(fallback)
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(remote);
    with_json_errors(routes)
}

async fn remote_status(State(remote): State<Remote>) -> ApiResult {
    ok(StatusCode::OK, remote.status().await?)
}

async fn remote_list(State(remote): State<Remote>, ApiPath(c): ApiPath<String>, ApiQuery(q): ApiQuery) -> ApiResult {
    let kind = collection(&c, &Kind::DATA)?;
    ok(StatusCode::OK, list_records(remote.store().clone(), kind, q).await?)
}

async fn remote_get(State(remote): State<Remote>, ApiPath((c, id)): ApiPath<(String, String)>) -> ApiResult {
    let kind = collection(&c, &Kind::DATA)?;
    get_record(remote.store(), kind, &id)
}

async fn remote_create(
    State(remote): State<Remote>,
    ApiPath(c): ApiPath<String>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult {
    let kind = collection(&c, &Kind::DATA)?;
    let key = idempotency_key(&headers)?;
    let body = parse_body(body)?;
    let (id, stored) = remote.create_keyed(kind, &body, key).await?;
    ok(StatusCode::CREATED, record_json(&id, &stored))
}

async fn remote_update(
    State(remote): State<Remote>,
    ApiPath((c, id)): ApiPath<(String, String)>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult {
    let kind = collection(&c, &Kind::DATA)?;
    let key = idempotency_key(&headers)?;
    let body = parse_body(body)?;
    let stored = remote.update_keyed(kind, &id, &body, key).await?;
    ok(StatusCode::OK, record_json(&id, &stored))
}

async fn remote_delete(
    State(remote): State<Remote>,
    ApiPath((c, id)): ApiPath<(String, String)>,
    headers: HeaderMap,
) -> ApiResult {
    let kind = collection(&c, &Kind::DATA)?;
    let key = idempotency_key(&headers)?;
    remote.delete_keyed(kind, &id, key).await?;
    ok(StatusCode::OK, json!({ "deleted": { "kind": kind, "id": id } }))
}

async fn remote_rebuild(State(remote): State<Remote>) -> ApiResult {
    let total = remote.rebuild().await?;
    ok(StatusCode::ACCEPTED, json!({ "rebuilding": { "done": 0, "total": total } }))
}

/// Serves `router` on `listener` with the default [`Limits`] until `shutdown` completes.
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    server::serve(listener, router, shutdown, Limits::default()).await
}

/// [`serve`] with other limits (tests use short timeouts).
pub async fn serve_with(
    listener: tokio::net::TcpListener,
    router: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
    limits: Limits,
) -> std::io::Result<()> {
    server::serve(listener, router, shutdown, limits).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_strings_decode_percent_escapes_and_refuse_what_is_not_utf8() {
        let q = parse_query("state=N%59&city=New+York&name=%C3%A9&flag&&limit=5").unwrap();
        let pairs: Vec<(&str, &str)> = q.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        assert_eq!(pairs, [("city", "New York"), ("flag", ""), ("limit", "5"), ("name", "é"), ("state", "NY")]);
        // A `%` not followed by two hex digits is kept as it is.
        assert_eq!(parse_query("q=100%&r=%zz").unwrap()["q"], "100%");
        let err = parse_query("state=%FF").unwrap_err();
        assert_eq!(err.status, StatusCode::BAD_REQUEST);
        assert!(
            err.message.starts_with("the value \"%FF\" of `state` in the query string is not UTF-8"),
            "{}",
            err.message
        );
        let err = parse_query("%C3=1").unwrap_err();
        assert!(err.message.starts_with("the name \"%C3\" in the query string"), "{}", err.message);
    }
}
