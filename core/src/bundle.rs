//! A remote's bundle: the JSON file `remote create` writes at the main and `remote init` reads
//! at the remote's site, with everything the remote needs to set itself up. It crosses from one
//! machine (and possibly one version of crmsync) to another, so it is part of the wire format:
//! its fields change only on purpose.

use serde::{Deserialize, Serialize};

use crate::model::{self, Fields};
use crate::wire::{PRODUCT, SCHEMA_MAJOR};

/// A remote's bundle: everything a remote site needs to set itself up.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Bundle {
    pub product: String,
    pub schema: u32,
    pub database_id: String,
    pub remote: String,
    pub set: String,
    pub nats_url: String,
    pub consumer: String,
    pub expires_days: u32,
    pub created_ms: u64,
    /// The remote's own NATS credentials (a `.creds` text), when the main issues them: with
    /// them the server lets it read its own consumer and upload on its own subjects, nothing
    /// else. A secret: the file is its owner's alone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub creds: Option<String>,
    /// The users as the main held them when the bundle was made (their roles, teams and token
    /// hashes), so people can sign in at the remote before its first sync.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub users: Vec<(String, Fields)>,
    /// The certificate authority (PEM) of the NATS server's TLS certificate, when it speaks
    /// TLS: the remote then requires TLS and trusts it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nats_ca: Option<String>,
}

/// The name of a remote's durable consumer on `CRM_SYNC`, until it is re-created.
pub fn consumer_name(remote: &str) -> String {
    format!("remote-{remote}")
}

/// The consumer of a remote re-created at `created_ms`: a new one, so the old bundle's copy
/// can no longer pull.
pub fn recreated_consumer_name(remote: &str, created_ms: u64) -> String {
    format!("remote-{remote}-{created_ms}")
}

/// The consumer a remote's record names (see [`recreated_consumer_name`]).
pub fn consumer_of(remote: &str, record: &Fields) -> String {
    model::text(record, "consumer").map_or_else(|| consumer_name(remote), str::to_owned)
}

impl Bundle {
    /// The bundle of remote `remote` of database `database_id`, from the remote's record (its
    /// `set`, `expires_days` and `created_ms`), telling the remote to reach NATS at `nats_url`.
    pub fn of_remote(database_id: &str, remote: &str, record: &Fields, nats_url: String) -> Bundle {
        let int = |name: &str| model::int(record, name).unwrap_or(0);
        Bundle {
            product: PRODUCT.into(),
            schema: SCHEMA_MAJOR,
            database_id: database_id.to_owned(),
            remote: remote.to_owned(),
            set: model::text(record, "set").unwrap_or_default().to_owned(),
            nats_url,
            consumer: consumer_of(remote, record),
            expires_days: int("expires_days") as u32,
            created_ms: int("created_ms") as u64,
            creds: None,
            users: Vec::new(),
            nats_ca: None,
        }
    }

    /// Reads a bundle from its JSON text.
    pub fn from_json(text: &str) -> Result<Bundle, serde_json::Error> {
        serde_json::from_str(text)
    }

    /// Refuses a bundle made by another product or another schema major: a main and its
    /// remotes must run the same version.
    pub fn check_version(&self) -> Result<(), ForeignBundle> {
        if self.product == PRODUCT && self.schema == SCHEMA_MAJOR {
            Ok(())
        } else {
            Err(ForeignBundle { product: self.product.clone(), schema: self.schema })
        }
    }
}

/// A bundle of another product or schema major.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "the bundle is for {product} schema {schema}, and this is {PRODUCT} schema {SCHEMA_MAJOR}: main and remotes must run the same version"
)]
pub struct ForeignBundle {
    pub product: String,
    pub schema: u32,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Field, Value};

    #[test]
    fn a_bundle_is_made_from_the_remote_record_and_reads_back_from_its_json() {
        let record: Fields = [
            ("set", Value::Str("ny".into())),
            ("expires_days", Value::Int(30)),
            ("created_ms", Value::Int(1_700_000_000_000)),
            ("enabled", Value::Bool(true)),
        ]
        .into_iter()
        .map(|(name, value)| (name.to_owned(), Field { value, stamp: 1 }))
        .collect();
        let bundle = Bundle::of_remote("db1", "laptop", &record, "nats://main:4222".into());
        assert_eq!(
            bundle,
            Bundle {
                product: PRODUCT.into(),
                schema: SCHEMA_MAJOR,
                database_id: "db1".into(),
                remote: "laptop".into(),
                set: "ny".into(),
                nats_url: "nats://main:4222".into(),
                consumer: "remote-laptop".into(),
                expires_days: 30,
                created_ms: 1_700_000_000_000,
                creds: None,
                users: Vec::new(),
                nats_ca: None,
            }
        );
        let json = serde_json::to_string(&bundle).unwrap();
        assert_eq!(Bundle::from_json(&json).unwrap(), bundle);
        assert_eq!(bundle.check_version(), Ok(()));
        let other = Bundle { schema: SCHEMA_MAJOR + 1, ..bundle };
        assert!(other.check_version().unwrap_err().to_string().contains("must run the same version"));
    }
}
