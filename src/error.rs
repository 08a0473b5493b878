//! The error of a service operation: what went wrong, in words a user can act on, and which
//! class it belongs to (the HTTP status follows from the class).

use crate::model::{InputError, Kind};
use crate::names::NameError;
use crate::store::StoreError;
use crate::transport::TransportError;

#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error("{0}")]
    Input(#[from] InputError),
    #[error("{0}")]
    Name(#[from] NameError),
    #[error("{0}")]
    Invalid(String),
    #[error("there is no {kind} with id {id:?}")]
    NotFound { kind: Kind, id: String },
    /// Something other than a record is not there (a token of a user); the message says what.
    #[error("{0}")]
    Missing(String),
    #[error("{} with id {id:?} already exists", .kind.a())]
    Exists { kind: Kind, id: String },
    #[error("field `{field}`: there is no {kind} with id {id:?}")]
    MissingRef { field: String, kind: Kind, id: String },
    #[error("{0}")]
    Conflict(String),
    /// Lost a race with another writer many times in a row: nothing was changed, and trying
    /// again will succeed. Never a refusal of the change itself.
    #[error("{0}")]
    Busy(String),
    #[error("{0}")]
    Unavailable(#[from] TransportError),
    /// The change is committed to the stream, but could not be read back in time: the client
    /// must not make it again (or repeat it with the same idempotency key).
    #[error("{0}")]
    Committed(String),
    #[error("{0}")]
    Store(#[from] StoreError),
    #[error("{0}")]
    Internal(String),
}

impl ServiceError {
    /// An idempotency key sent again with a request for another record than its first.
    pub fn key_reused(key: &str, kind: Kind, id: &str) -> ServiceError {
        ServiceError::Invalid(format!(
            "the Idempotency-Key {key:?} was used for a change of the {kind} {id}; use a new key for each change"
        ))
    }

    /// The HTTP status that tells a client which class of failure this is.
    pub fn status(&self) -> u16 {
        match self {
            ServiceError::Input(_) | ServiceError::Name(_) | ServiceError::Invalid(_) => 400,
            ServiceError::NotFound { .. } | ServiceError::Missing(_) => 404,
            ServiceError::Exists { .. } | ServiceError::Conflict(_) => 409,
            ServiceError::MissingRef { .. } => 422,
            ServiceError::Busy(_) | ServiceError::Unavailable(_) | ServiceError::Committed(_) => 503,
            ServiceError::Store(e) if e.is_unwritable() => 507,
            ServiceError::Store(_) | ServiceError::Internal(_) => 500,
        }
    }
}
