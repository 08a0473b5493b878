//! The record endpoints every service's API has, written once: `/v1/status`, and list, show,
//! create, change and delete at `/v1/{collection}[/{id}]`. A service takes part by
//! implementing [`Records`].

use std::collections::BTreeMap;
use std::future::Future;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::get;
use serde_json::{Value as J, json};

use super::error::{ApiError, ApiResult, ok};
use super::extract::{ApiPath, ApiQuery, idempotency_key, parse_body};
use crate::error::ServiceError;
use crate::main_service::Main;
use crate::model::Record;
use crate::model::{self, Kind};
use crate::query::{Query, UnknownField};
use crate::remote_service::Remote;
use crate::store::Store;

pub const DEFAULT_LIMIT: usize = 100;
pub const MAX_LIMIT: usize = 10_000;

/// What a service offers the record endpoints: its store to read, its status, and its writes,
/// each with the client's `Idempotency-Key` if it sent one.
pub trait Records: Clone + Send + Sync + 'static {
    /// The kinds listed and shown at `/v1/{collection}`; every service writes the data kinds
    /// ([`Kind::DATA`]) there.
    const READABLE: &'static [Kind];

    fn store(&self) -> &Store;

    fn status(&self) -> impl Future<Output = Result<J, ServiceError>> + Send;

    fn create(
        &self,
        kind: Kind,
        body: &J,
        key: Option<&str>,
    ) -> impl Future<Output = Result<(String, Record), ServiceError>> + Send;

    fn update(
        &self,
        kind: Kind,
        id: &str,
        body: &J,
        key: Option<&str>,
    ) -> impl Future<Output = Result<Record, ServiceError>> + Send;

    fn delete(&self, kind: Kind, id: &str, key: Option<&str>) -> impl Future<Output = Result<(), ServiceError>> + Send;
}

impl Records for Main {
    const READABLE: &'static [Kind] = &Kind::ALL;

    fn store(&self) -> &Store {
        Main::store(self)
    }

    async fn status(&self) -> Result<J, ServiceError> {
        Main::status(self).await
    }

    async fn create(&self, kind: Kind, body: &J, key: Option<&str>) -> Result<(String, Record), ServiceError> {
        self.create_keyed(kind, body, key).await
    }

    async fn update(&self, kind: Kind, id: &str, body: &J, key: Option<&str>) -> Result<Record, ServiceError> {
        self.update_keyed(kind, id, body, key).await
    }

    async fn delete(&self, kind: Kind, id: &str, key: Option<&str>) -> Result<(), ServiceError> {
        self.delete_keyed(kind, id, key).await
    }
}

/// A remote keeps its clients' keys with the local edit, so it takes them owned.
impl Records for Remote {
    const READABLE: &'static [Kind] = &Kind::DATA;

    fn store(&self) -> &Store {
        Remote::store(self)
    }

    async fn status(&self) -> Result<J, ServiceError> {
        Remote::status(self).await
    }

    async fn create(&self, kind: Kind, body: &J, key: Option<&str>) -> Result<(String, Record), ServiceError> {
        self.create_keyed(kind, body, key.map(str::to_owned)).await
    }

    async fn update(&self, kind: Kind, id: &str, body: &J, key: Option<&str>) -> Result<Record, ServiceError> {
        self.update_keyed(kind, id, body, key.map(str::to_owned)).await
    }

    async fn delete(&self, kind: Kind, id: &str, key: Option<&str>) -> Result<(), ServiceError> {
        self.delete_keyed(kind, id, key.map(str::to_owned)).await
    }
}

/// `own` with the record endpoints added.
pub(super) fn routes<S: Records>(own: Router<S>) -> Router<S> {
    own.route("/v1/status", get(status::<S>))
        .route("/v1/{collection}", get(list::<S>).post(create::<S>))
        .route("/v1/{collection}/{id}", get(show::<S>).patch(update::<S>).delete(delete::<S>))
}

async fn status<S: Records>(State(service): State<S>) -> ApiResult {
    ok(StatusCode::OK, service.status().await?)
}

async fn list<S: Records>(State(service): State<S>, ApiPath(c): ApiPath<String>, ApiQuery(q): ApiQuery) -> ApiResult {
    let kind = collection(&c, S::READABLE)?;
    ok(StatusCode::OK, list_records(service.store().clone(), kind, q).await?)
}

async fn show<S: Records>(State(service): State<S>, ApiPath((c, id)): ApiPath<(String, String)>) -> ApiResult {
    let kind = collection(&c, S::READABLE)?;
    get_record(service.store(), kind, &id)
}

async fn create<S: Records>(
    State(service): State<S>,
    ApiPath(c): ApiPath<String>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult {
    let kind = collection(&c, &Kind::DATA)?;
    let key = idempotency_key(&headers)?;
    let body = parse_body(body)?;
    let (id, stored) = service.create(kind, &body, key.as_deref()).await?;
    ok(StatusCode::CREATED, record_json(&id, &stored))
}

async fn update<S: Records>(
    State(service): State<S>,
    ApiPath((c, id)): ApiPath<(String, String)>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult {
    let kind = collection(&c, &Kind::DATA)?;
    let key = idempotency_key(&headers)?;
    let body = parse_body(body)?;
    let stored = service.update(kind, &id, &body, key.as_deref()).await?;
    ok(StatusCode::OK, record_json(&id, &stored))
}

async fn delete<S: Records>(
    State(service): State<S>,
    ApiPath((c, id)): ApiPath<(String, String)>,
    headers: HeaderMap,
) -> ApiResult {
    let kind = collection(&c, &Kind::DATA)?;
    let key = idempotency_key(&headers)?;
    service.delete(kind, &id, key.as_deref()).await?;
    ok(StatusCode::OK, json!({ "deleted": { "kind": kind, "id": id } }))
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

pub(super) fn record_json(id: &str, stored: &Record) -> J {
    model::to_json(id, stored.version, &stored.fields)
}

/// A page of records as `{"items": [...], "next": ID}`, filtered by `FIELD=VALUE` parameters:
/// each an equality of the set query language ([`Query::equals_all`]), so a list filter and a
/// set's query agree on what matches.
pub(super) async fn list_records(store: Store, kind: Kind, params: BTreeMap<String, String>) -> Result<J, ApiError> {
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
            _ => filters.push((k, v)),
        }
    }
    let query = Query::equals_all(kind, &filters).map_err(|UnknownField { kind, field }| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            format!(
                "cannot filter {} by `{field}`: not a field. Use limit, after, or one of: {}",
                kind.plural(),
                kind.fields().iter().map(|f| f.name).collect::<Vec<_>>().join(", ")
            ),
        )
    })?;
    let page = tokio::task::spawn_blocking(move || {
        store.list(kind, after.as_deref(), limit + 1, |_, s| query.as_ref().is_none_or(|q| q.matches(&s.fields)))
    })
    .await
    .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))??;
    let next = if page.len() > limit { page.get(limit - 1).map(|(id, _)| id.clone()) } else { None };
    let items: Vec<J> = page.iter().take(limit).map(|(id, s)| record_json(id, s)).collect();
    Ok(json!({ "items": items, "next": next }))
}

pub(super) fn get_record(store: &Store, kind: Kind, id: &str) -> ApiResult {
    match store.get(kind, id)? {
        Some(stored) => ok(StatusCode::OK, record_json(id, &stored)),
        None => Err(ServiceError::NotFound { kind, id: id.to_owned() }.into()),
    }
}
