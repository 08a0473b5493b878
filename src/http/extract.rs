//! Reading a request: its JSON body, path parameters and query string, each refused with a
//! JSON error that says what is wrong, and the client's `Idempotency-Key`.

use std::collections::BTreeMap;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{FromRequestParts, Path};
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode};
use serde_json::Value as J;

use super::error::ApiError;
use super::{BodyTimeout, MAX_BODY};

/// Parses a request body as JSON, saying where it is wrong.
pub(super) fn parse_body(body: Result<Bytes, BytesRejection>) -> Result<J, ApiError> {
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

pub(super) fn parse_typed<T: serde::de::DeserializeOwned>(body: Result<Bytes, BytesRejection>) -> Result<T, ApiError> {
    let value = parse_body(body)?;
    serde_json::from_value(value).map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, format!("invalid request: {e}")))
}

/// Path parameters, refused with a JSON error when they do not decode (percent-encoded bytes
/// that are not UTF-8).
pub(super) struct ApiPath<T>(pub(super) T);

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
pub(super) struct ApiQuery(pub(super) BTreeMap<String, String>);

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

/// Most characters of an `Idempotency-Key`.
pub const MAX_IDEMPOTENCY_KEY: usize = 128;

/// The client's `Idempotency-Key`, if it sent one: repeating a write with the same key never
/// applies it twice (the main answers with what the first one did).
pub(super) fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
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

/// The parameters of a sessions log: `limit` (100 unless given) and `remote` (every remote's
/// unless given).
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SessionsQuery {
    limit: Option<usize>,
    pub remote: Option<String>,
}

impl SessionsQuery {
    pub fn read(
        q: Result<axum::extract::Query<SessionsQuery>, axum::extract::rejection::QueryRejection>,
    ) -> Result<SessionsQuery, ApiError> {
        q.map(|q| q.0).map_err(|e| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                format!("{}; the parameters are limit (a number) and remote", e.body_text()),
            )
        })
    }

    pub fn limit(&self) -> usize {
        self.limit.unwrap_or(100)
    }
}
