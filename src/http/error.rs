//! The API's error answer, `{"error": "..."}`, for every error status.

use axum::Json;
use axum::Router;
use axum::extract::Request;
use axum::http::{Method, StatusCode, Uri, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use serde_json::{Value as J, json};

use crate::error::ServiceError;

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

pub(super) type ApiResult = Result<Response, ApiError>;

pub(super) fn ok(status: StatusCode, body: J) -> ApiResult {
    Ok((status, Json(body)).into_response())
}

/// Makes every error answer JSON, also those the handlers do not make: the router's 405
/// (empty, with an `Allow` header) and any rejection that slipped through as plain text.
pub(super) async fn json_errors(req: Request, next: Next) -> Response {
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
pub(super) fn with_json_errors(routes: Router) -> Router {
    Router::new().fallback_service(routes).layer(middleware::from_fn(json_errors))
}

pub(super) async fn fallback(method: Method, uri: Uri) -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, format!("no endpoint {method} {}; see the README's API section", uri.path()))
}
