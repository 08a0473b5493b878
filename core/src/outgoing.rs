//! Outgoing messages: what waits on disk to be published, so a crash between deciding to
//! send and the server's acknowledgement loses nothing. At the main, routed messages in the
//! outbox; at a remote, edits in the upload queue. Each carries its `Nats-Msg-Id`, so a
//! publish repeated after a crash is dropped by the server's deduplication.

use serde::{Deserialize, Serialize};

/// One routed message waiting for its publish acknowledgements: the same payload goes to
/// every subject listed (a record's state is the same in every target that holds it).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OutboxEntry {
    /// The `CRM_EVENTS` sequence of the change that caused it.
    pub seq: u64,
    pub subjects: Vec<String>,
    #[serde(with = "payload_bytes")]
    pub payload: Vec<u8>,
    /// A delete or leave: expires from `CRM_SYNC` after the longest remote expiry.
    pub tombstone: bool,
}

/// An edit made at a remote, waiting to be published to `CRM_UP`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Upload {
    /// The edit's event id: its `Nats-Msg-Id`.
    pub event: String,
    pub subject: String,
    #[serde(with = "payload_bytes")]
    pub payload: Vec<u8>,
}

/// Payload bytes as MessagePack binary; also reads the array of numbers an earlier version
/// wrote.
pub mod payload_bytes {
    use serde::{Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(v)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Vec<u8>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("bytes")
            }
            fn visit_bytes<E>(self, v: &[u8]) -> Result<Vec<u8>, E> {
                Ok(v.to_vec())
            }
            fn visit_byte_buf<E>(self, v: Vec<u8>) -> Result<Vec<u8>, E> {
                Ok(v)
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<u8>, A::Error> {
                let mut out = Vec::new();
                while let Some(b) = seq.next_element::<u8>()? {
                    out.push(b);
                }
                Ok(out)
            }
        }
        d.deserialize_byte_buf(V)
    }
}
