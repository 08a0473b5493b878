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

use super::auth::Authenticated;
use super::error::{ApiError, ApiResult, ok};
use super::extract::{ApiPath, ApiQuery, idempotency_key, parse_body};
use crate::access::{Caller, Request, Role, manager_of, may_see};
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

async fn status<S: Records>(State(service): State<S>, caller: Authenticated) -> ApiResult {
    let mut status = service.status().await?;
    if caller.0.role != Role::Administrator {
        // Counting what one may not see would tell that it exists.
        status["counts"] = model::counts_json(&visible_counts(service.store(), &caller.0)?);
    }
    if !caller.0.role.manages() {
        // What a user may not see stays out of the logs too.
        let store = service.store();
        if let Some(log) = status.get_mut("sync_log").and_then(J::as_array_mut) {
            let mut kept = Vec::new();
            for entry in log.drain(..) {
                let kind = entry["kind"].as_str().and_then(Kind::parse);
                let id = entry["id"].as_str().unwrap_or_default();
                if let Some(kind) = kind
                    && let Some(record) = store.get(kind, id)?
                    && visible(store, &caller.0, kind, &record.fields)?
                {
                    kept.push(entry);
                }
            }
            *log = kept;
        }
        if let Some(quarantine) = status.get_mut("quarantine") {
            *quarantine = json!([]);
        }
    }
    ok(StatusCode::OK, status)
}

async fn list<S: Records>(
    State(service): State<S>,
    caller: Authenticated,
    ApiPath(c): ApiPath<String>,
    ApiQuery(q): ApiQuery,
) -> ApiResult {
    let kind = collection(&c, S::READABLE)?;
    ok(StatusCode::OK, list_records(service.store().clone(), kind, q, caller.0).await?)
}

async fn show<S: Records>(
    State(service): State<S>,
    caller: Authenticated,
    ApiPath((c, id)): ApiPath<(String, String)>,
) -> ApiResult {
    let kind = collection(&c, S::READABLE)?;
    get_record(service.store(), &caller.0, kind, &id)
}

async fn create<S: Records>(
    State(service): State<S>,
    caller: Authenticated,
    ApiPath(c): ApiPath<String>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult {
    let kind = collection(&c, &Kind::DATA)?;
    let key = idempotency_key(&headers)?;
    let mut body = parse_body(body)?;
    no_tokens(kind, &body)?;
    let store = service.store();
    let contact = body_contact(store, &caller.0, kind, &body, None)?;
    if caller.0.role == Role::Restricted
        && kind.fields().iter().any(|f| f.name == "manager")
        && body.get("manager").is_none()
    {
        // What a restricted user creates is theirs to manage.
        body["manager"] = json!(caller.0.user.id);
    }
    let after = body_manager(kind, &body, contact.as_ref(), None);
    caller.permit(&Request::Write { kind, new: true, before: None, after: after.as_deref() })?;
    let (id, stored) = service.create(kind, &body, key.as_deref()).await?;
    ok(StatusCode::CREATED, record_json(&id, &stored))
}

async fn update<S: Records>(
    State(service): State<S>,
    caller: Authenticated,
    ApiPath((c, id)): ApiPath<(String, String)>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult {
    let kind = collection(&c, &Kind::DATA)?;
    let key = idempotency_key(&headers)?;
    let body = parse_body(body)?;
    no_tokens(kind, &body)?;
    let store = service.store();
    // A record not held is the service's to answer (missing, or a request repeated with its key).
    if let Some((current, contact)) = seen(store, &caller.0, kind, &id)? {
        let before = manager_of(kind, &current.fields, contact.as_ref()).map(str::to_owned);
        let new_contact = body_contact(store, &caller.0, kind, &body, contact)?;
        let after = body_manager(kind, &body, new_contact.as_ref(), before.as_deref());
        caller.permit(&Request::Write { kind, new: false, before: before.as_deref(), after: after.as_deref() })?;
    } else {
        permit_unheld(&caller, kind, &id)?;
    }
    let stored = service.update(kind, &id, &body, key.as_deref()).await?;
    ok(StatusCode::OK, record_json(&id, &stored))
}

async fn delete<S: Records>(
    State(service): State<S>,
    caller: Authenticated,
    ApiPath((c, id)): ApiPath<(String, String)>,
    headers: HeaderMap,
) -> ApiResult {
    let kind = collection(&c, &Kind::DATA)?;
    let key = idempotency_key(&headers)?;
    match seen(service.store(), &caller.0, kind, &id)? {
        Some((current, contact)) => {
            let before = manager_of(kind, &current.fields, contact.as_ref());
            caller.permit(&Request::Write { kind, new: false, before, after: before })?;
        }
        // Not held: the service answers (missing, or a delete repeated with its key).
        None => permit_unheld(&caller, kind, &id)?,
    }
    service.delete(kind, &id, key.as_deref()).await?;
    ok(StatusCode::OK, json!({ "deleted": { "kind": kind, "id": id } }))
}

/// A user's tokens are made by `POST /v1/users/{id}/tokens`, never written directly.
fn no_tokens(kind: Kind, body: &J) -> Result<(), ApiError> {
    if kind == Kind::User && body.get(model::TOKENS).is_some() {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "a user's tokens are made with `POST /v1/users/{id}/tokens` (`crmsync user token USER`), not written",
        ));
    }
    Ok(())
}

/// The contact of a child record, if it is held.
fn contact_of(store: &Store, kind: Kind, fields: &model::Fields) -> Result<Option<model::Fields>, ServiceError> {
    let Some(field) = kind.parent_field() else { return Ok(None) };
    let Some(contact) = model::text(fields, field) else { return Ok(None) };
    Ok(store.get(Kind::Contact, contact)?.map(|r| r.fields))
}

/// How many records of each kind `caller` may see, read record by record (an administrator's
/// are the store's counts).
fn visible_counts(store: &Store, caller: &Caller) -> Result<std::collections::BTreeMap<Kind, u64>, ServiceError> {
    let mut contacts = std::collections::HashSet::new();
    store.for_each(Kind::Contact, |id, r| {
        if may_see(caller, Kind::Contact, &r.fields, None) {
            contacts.insert(id.to_owned());
        }
    })?;
    let mut counts = std::collections::BTreeMap::new();
    for kind in Kind::ALL.into_iter().filter(|k| k.is_routed()) {
        let mut n = 0u64;
        match kind.parent_field() {
            _ if kind == Kind::Contact => n = contacts.len() as u64,
            // A child is seen through its contact.
            Some(field) => store.for_each(kind, |_, r| {
                n += u64::from(model::text(&r.fields, field).is_some_and(|c| contacts.contains(c)));
            })?,
            None => store.for_each(kind, |_, r| n += u64::from(may_see(caller, kind, &r.fields, None)))?,
        }
        counts.insert(kind, n);
    }
    Ok(counts)
}

/// Whether `caller` may see this record (a child through its contact).
pub(super) fn visible(
    store: &Store,
    caller: &Caller,
    kind: Kind,
    fields: &model::Fields,
) -> Result<bool, ServiceError> {
    let contact = contact_of(store, kind, fields)?;
    Ok(may_see(caller, kind, fields, contact.as_ref()))
}

/// A change of a record not held: the service answers it (missing, or a request repeated with
/// its key), if the caller may change records at all; one who may not is told it is missing.
fn permit_unheld(caller: &Authenticated, kind: Kind, id: &str) -> Result<(), ApiError> {
    caller.permit(&Request::Write { kind, new: false, before: None, after: None }).map_err(|_| missing(kind, id))
}

fn missing(kind: Kind, id: &str) -> ApiError {
    ServiceError::NotFound { kind, id: id.to_owned() }.into()
}

/// The record `caller` may see, with its contact (for a child); `None` when it is not held. A
/// record they may not see is missing, as far as they can tell (404).
fn seen(
    store: &Store,
    caller: &Caller,
    kind: Kind,
    id: &str,
) -> Result<Option<(Record, Option<model::Fields>)>, ApiError> {
    let Some(current) = store.get(kind, id)? else { return Ok(None) };
    let contact = contact_of(store, kind, &current.fields)?;
    if !may_see(caller, kind, &current.fields, contact.as_ref()) {
        return Err(missing(kind, id));
    }
    Ok(Some((current, contact)))
}

/// The contact a child's body names (else `current`), which `caller` must be able to see: one
/// they cannot is answered as missing.
fn body_contact(
    store: &Store,
    caller: &Caller,
    kind: Kind,
    body: &J,
    current: Option<model::Fields>,
) -> Result<Option<model::Fields>, ServiceError> {
    let Some(field) = kind.parent_field() else { return Ok(None) };
    let Some(id) = body.get(field).and_then(J::as_str) else { return Ok(current) };
    match store.get(Kind::Contact, id)? {
        Some(contact) if may_see(caller, Kind::Contact, &contact.fields, None) => Ok(Some(contact.fields)),
        Some(_) => Err(ServiceError::MissingRef { field: field.into(), kind: Kind::Contact, id: id.to_owned() }),
        // Not held: the service says why (missing, or deleted here).
        None => Ok(None),
    }
}

/// The record manager after a change: the body's (its contact's, for a child), else `before`.
fn body_manager(kind: Kind, body: &J, contact: Option<&model::Fields>, before: Option<&str>) -> Option<String> {
    match kind.parent_field() {
        Some(_) => contact.and_then(|c| model::text(c, "manager")).map(str::to_owned),
        None => match body.get("manager") {
            Some(J::String(m)) => Some(m.clone()),
            Some(_) => None,
            None => before.map(str::to_owned),
        },
    }
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

/// A record as the APIs show it: never a user's token hashes.
pub(super) fn record_json(id: &str, stored: &Record) -> J {
    let mut json = model::to_json(id, stored.version, &stored.fields);
    if let Some(obj) = json.as_object_mut() {
        obj.remove(model::TOKENS);
    }
    json
}

/// A page of records as `{"items": [...], "next": ID}`, filtered by `FIELD=VALUE` parameters:
/// each an equality of the set query language ([`Query::equals_all`]), so a list filter and a
/// set's query agree on what matches.
pub(super) async fn list_records(
    store: Store,
    kind: Kind,
    params: BTreeMap<String, String>,
    caller: Caller,
) -> Result<J, ApiError> {
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
        // Only what the caller may see: a filter never tells of a record they may not.
        store.list(kind, after.as_deref(), limit + 1, |_, s| {
            query.as_ref().is_none_or(|q| q.matches(&s.fields))
                && visible(&store, &caller, kind, &s.fields).unwrap_or(false)
        })
    })
    .await
    .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))??;
    let next = if page.len() > limit { page.get(limit - 1).map(|(id, _)| id.clone()) } else { None };
    let items: Vec<J> = page.iter().take(limit).map(|(id, s)| record_json(id, s)).collect();
    Ok(json!({ "items": items, "next": next }))
}

pub(super) fn get_record(store: &Store, caller: &Caller, kind: Kind, id: &str) -> ApiResult {
    let (stored, _) = seen(store, caller, kind, id)?.ok_or_else(|| missing(kind, id))?;
    ok(StatusCode::OK, record_json(id, &stored))
}
