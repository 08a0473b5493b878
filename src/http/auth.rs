//! Who is asking: every request carries `Authorization: Bearer <token>`, the token of a user of
//! the main. A token is 32 random bytes (`crm_` and 52 base32 characters); a user record keeps
//! only the SHA-256 of each of its tokens (`tokens`), and is routed to every remote like any
//! user, so a token made at the main works at the remotes too, once the user has reached them
//! (a remote's bundle carries the users of its creation, so it works offline from the start).
//! Tokens are made and hashed in [`crate::identity`].

use axum::extract::FromRequestParts;
use axum::http::StatusCode;
use axum::http::request::Parts;

use super::error::ApiError;
use super::records::Records;
use crate::access::{Caller, Forbidden, Request, permit};
use crate::identity::token_hash;
use crate::model::{self, Kind};

/// The user whose token a request carries.
pub struct Authenticated(pub Caller);

impl Authenticated {
    /// Refuses with 403 and the rule, unless the caller may make `request`.
    pub fn permit(&self, request: &Request<'_>) -> Result<(), ApiError> {
        permit(&self.0, request).map_err(|Forbidden(rule)| ApiError::new(StatusCode::FORBIDDEN, rule))
    }
}

const HOW: &str = "send `Authorization: Bearer <token>` (the command line reads --token, CRMSYNC_TOKEN or the file \
                   CRMSYNC_TOKEN_FILE names; an administrator makes tokens with `crmsync user token USER`)";

impl<S: Records> FromRequestParts<S> for Authenticated {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, service: &S) -> Result<Self, Self::Rejection> {
        let unauthorized = |what: &str| ApiError::new(StatusCode::UNAUTHORIZED, format!("{what}: {HOW}"));
        let header = parts.headers.get(axum::http::header::AUTHORIZATION).ok_or_else(|| unauthorized("no token"))?;
        let token = header
            .to_str()
            .ok()
            .and_then(|h| h.strip_prefix("Bearer "))
            .filter(|t| !t.trim().is_empty())
            .ok_or_else(|| unauthorized("the Authorization header is not `Bearer <token>`"))?;
        let hash = token_hash(token);
        let store = service.store().clone();
        let found = tokio::task::spawn_blocking(move || {
            let mut found = None;
            store.for_each(Kind::User, |id, user| {
                if found.is_none() && model::names(&user.fields, model::TOKENS).contains(&hash) {
                    found = Some(Caller::of(id, &user.fields));
                }
            })?;
            Ok::<_, crate::store::StoreError>(found)
        })
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))??;
        found.map(Authenticated).ok_or_else(|| unauthorized("the token is not valid (revoked, or of another database)"))
    }
}
