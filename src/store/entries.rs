//! The entries of the tables that are not records: idempotency keys, parked uploads, the sync
//! log, quarantined messages.

use super::*;

/// The change a client's `Idempotency-Key` committed: a repeated request answers with it
/// instead of changing anything again.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KeyEntry {
    /// The `CRM_EVENTS` sequence of the change.
    pub seq: u64,
    pub kind: Kind,
    pub id: String,
    /// When the main applied it; entries older than a day are forgotten.
    pub at_ms: u64,
}

impl KeyEntry {
    pub(super) fn decode(bytes: &[u8]) -> Result<KeyEntry, StoreError> {
        rmp_serde::from_slice(bytes).map_err(|e| StoreError::Corrupt { what: "idempotency key", detail: e.to_string() })
    }
}

/// An upload the main took off `CRM_UP` before an earlier upload of the same remote queue had
/// arrived: kept until that one is merged, then merged in its turn.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Parked {
    pub subject: String,
    #[serde(with = "crate::outgoing::payload_bytes")]
    pub payload: Vec<u8>,
    /// The upload's [`crate::wire::UPLOAD_BUNDLE`] header (entries parked before it existed
    /// read as none).
    #[serde(default)]
    pub bundle_created_ms: Option<u64>,
}

/// An edit the main refused: kept in the sync log of the main and of the remote that made it,
/// with the edit itself, so no edit disappears without a trace.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LogEntry {
    pub at_ms: u64,
    pub remote: String,
    pub kind: Kind,
    pub id: String,
    pub event: String,
    pub reason: String,
    /// The refused edit's fields (none for a refused delete).
    pub edit: Option<Fields>,
}

impl LogEntry {
    /// The entry as the APIs show it.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "at_ms": self.at_ms, "remote": self.remote, "kind": self.kind, "id": self.id, "event": self.event,
            "reason": self.reason, "edit": self.edit.as_ref().map(|f| crate::model::to_json(&self.id, 0, f)),
        })
    }
}

/// A message that could not be decoded, kept as it came.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Quarantined {
    pub subject: String,
    pub error: String,
    #[serde(with = "crate::outgoing::payload_bytes")]
    pub payload: Vec<u8>,
}
