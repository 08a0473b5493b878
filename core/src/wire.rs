//! The wire format: the envelope every message carries, as MessagePack, and the subjects.
//!
//! The JSON Schema documents in `schemas/` describe exactly what is encoded here; a test
//! checks real messages against them. Change this module only together with them, and bump
//! [`SCHEMA_MAJOR`] for any change an older reader could not decode.

use serde::{Deserialize, Serialize};

use crate::model::{Fields, Kind};

pub const PRODUCT: &str = "crmsync";
/// Schema major version. Main and remotes must agree on it.
pub const SCHEMA_MAJOR: u32 = 1;

pub const EVENTS_STREAM: &str = "CRM_EVENTS";
pub const SYNC_STREAM: &str = "CRM_SYNC";
pub const UP_STREAM: &str = "CRM_UP";
/// The main's durable consumer on `CRM_UP`, which merges what remotes upload.
pub const MERGER: &str = "merger";

/// The origin of changes made through the main's API.
pub const ORIGIN_MAIN: &str = "main";

/// Header of every upload on `CRM_UP`: `<queue>:<n>`, the id of the remote's upload queue and
/// the upload's place in it (0, 1, 2, … with no gap). The main merges each queue's uploads in
/// exactly this order, whatever order they reach the stream in: a publish lost in a
/// reconnect and sent again lands after later ones.
pub const UPLOAD_ORDER: &str = "Crmsync-Upload";

/// Header of every upload on `CRM_UP`: the `created_ms` of the bundle the remote was set up
/// from. A remote re-created at the main gets a new one, so uploads from a copy set up from
/// the old bundle are told apart (and not merged).
pub const UPLOAD_BUNDLE: &str = "Crmsync-Bundle";

/// Reads an [`UPLOAD_ORDER`] header value: the queue id and the upload's number.
pub fn parse_upload_order(value: &str) -> Option<(&str, u64)> {
    let (queue, n) = value.rsplit_once(':')?;
    crate::names::check("upload queue", queue).ok()?;
    Some((queue, n.parse().ok()?))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Op {
    /// The record's full state.
    Upsert,
    /// The record was deleted at the main.
    Delete,
    /// The record left this target; it still exists at the main.
    Leave,
    /// The main refused an edit a remote uploaded: sent to that remote alone, with the edit it
    /// refused in `record` and why in `reason`. The remote takes the main's state back.
    Reject,
}

/// Every message on every stream is one envelope.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Envelope {
    pub product: String,
    pub schema: u32,
    /// The database id of the main this message belongs to.
    pub db: String,
    /// Unique id of the change (a ULID).
    pub event: String,
    pub kind: Kind,
    pub id: String,
    pub op: Op,
    /// On `CRM_SYNC`: the record's version at the main, i.e. the `CRM_EVENTS` sequence of the
    /// change. On `CRM_EVENTS`: the version the change was made against (0 for a new record).
    pub version: u64,
    /// `main`, or the name of the remote where the change was made.
    pub origin: String,
    /// The record's fields, for `upsert` (for `reject`: the refused edit); absent for
    /// `delete` and `leave`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub record: Option<Fields>,
    /// Why the main refused an edit, for `reject`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// The part of an envelope that says whose it is. Decoded on its own when a whole envelope
/// does not decode, to tell a message of another product or schema from a corrupt one.
#[derive(Debug, Clone, Deserialize)]
pub struct Header {
    pub product: String,
    pub schema: u32,
    pub db: String,
}

impl Envelope {
    pub fn encode(&self) -> Vec<u8> {
        // Encoding a plain struct of strings, integers and maps into a Vec cannot fail.
        rmp_serde::to_vec_named(self).expect("envelope encodes")
    }

    pub fn decode(bytes: &[u8]) -> Result<Envelope, rmp_serde::decode::Error> {
        let mut env: Envelope = rmp_serde::from_slice(bytes)?;
        if let Some(record) = &mut env.record {
            crate::model::normalize(record);
        }
        Ok(env)
    }

    /// A new change, with a new event id: made at `origin` (`main`, or a remote's name) to
    /// `kind` `id`, against `version` (0 for a new record), in the database `db`.
    pub fn change(
        db: &str,
        origin: &str,
        kind: Kind,
        id: &str,
        op: Op,
        version: u64,
        record: Option<Fields>,
    ) -> Envelope {
        Envelope {
            product: PRODUCT.into(),
            schema: SCHEMA_MAJOR,
            db: db.to_owned(),
            event: crate::names::new_id(),
            kind,
            id: id.to_owned(),
            op,
            version,
            origin: origin.to_owned(),
            record,
            reason: None,
        }
    }

    /// The message the main routes to targets for a change this envelope made: the same
    /// database, change id and origin, about `kind` `id` at `version`.
    pub fn routed(&self, kind: Kind, id: &str, op: Op, version: u64, record: Option<Fields>) -> Envelope {
        Envelope {
            kind,
            id: id.to_owned(),
            op,
            version,
            record,
            reason: None,
            product: self.product.clone(),
            schema: self.schema,
            db: self.db.clone(),
            event: self.event.clone(),
            origin: self.origin.clone(),
        }
    }

    pub fn header(&self) -> Header {
        Header { product: self.product.clone(), schema: self.schema, db: self.db.clone() }
    }
}

/// What a message's header says about whether this reader may apply it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "refusing a message of {their_product} schema {their_schema} for database {their_db}: \
     this side runs {PRODUCT} schema {SCHEMA_MAJOR} for database {our_db}. \
     {advice}"
)]
pub struct Foreign {
    pub their_product: String,
    pub their_schema: u32,
    pub their_db: String,
    pub our_db: String,
    pub advice: &'static str,
}

impl Header {
    /// Checks that a message belongs to this product, schema and database.
    pub fn check(&self, our_db: &str) -> Result<(), Foreign> {
        let advice = if self.product != PRODUCT {
            "Another application is publishing on crmsync's subjects; give it other subjects."
        } else if self.schema != SCHEMA_MAJOR {
            "Main and remotes must run the same schema version: upgrade the older side, then re-create the remote."
        } else if self.db != our_db {
            "This remote was created for another main database: re-create it with `crmsync remote create` at the right main."
        } else {
            return Ok(());
        };
        Err(Foreign {
            their_product: self.product.clone(),
            their_schema: self.schema,
            their_db: self.db.clone(),
            our_db: our_db.to_owned(),
            advice,
        })
    }
}

/// What decoding a message found.
#[derive(Debug)]
pub enum Decoded {
    Ok(Envelope),
    /// A well-formed message that belongs elsewhere: stop, acknowledge nothing.
    Foreign(Foreign),
    /// Bytes that are not an envelope: quarantine and go on.
    Malformed(String),
}

/// Decodes a message and checks that it belongs to `our_db`.
pub fn decode_checked(bytes: &[u8], our_db: &str) -> Decoded {
    match Envelope::decode(bytes) {
        Ok(env) => match env.header().check(our_db) {
            Ok(()) => Decoded::Ok(env),
            Err(f) => Decoded::Foreign(f),
        },
        Err(err) => match rmp_serde::from_slice::<Header>(bytes) {
            Ok(h) if h.check(our_db).is_err() => Decoded::Foreign(h.check(our_db).unwrap_err()),
            _ => Decoded::Malformed(err.to_string()),
        },
    }
}

pub fn event_subject(kind: Kind, id: &str) -> String {
    format!("crm.evt.{kind}.{id}")
}

/// The subject token of a target: a set's name, or `~` and a remote's name for its
/// subscription list.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Target {
    Set(String),
    Subscriptions(String),
}

impl Target {
    pub fn token(&self) -> String {
        match self {
            Target::Set(name) => name.clone(),
            Target::Subscriptions(remote) => format!("~{remote}"),
        }
    }
}

pub fn sync_subject(target: &Target, kind: Kind, id: &str) -> String {
    format!("crm.sync.{}.{kind}.{id}", target.token())
}

/// The subject of an edit uploaded by `remote`.
pub fn up_subject(remote: &str, kind: Kind, id: &str) -> String {
    format!("crm.up.{remote}.{kind}.{id}")
}

/// What every upload subject of `remote` starts with.
pub fn up_prefix(remote: &str) -> String {
    format!("crm.up.{remote}.")
}

/// The filter of every upload subject of `remote`.
pub fn up_filter(remote: &str) -> String {
    format!("{}>", up_prefix(remote))
}

/// The subject on which the main tells `remote` it refused its edit of a record: in the
/// remote's own subscription namespace (so its consumer receives it), one per record.
pub fn reject_subject(remote: &str, kind: Kind, id: &str) -> String {
    format!("crm.sync.{}.{kind}.{id}.rejected", Target::Subscriptions(remote.to_owned()).token())
}

/// The remote a `crm.up.<remote>.<kind>.<id>` subject comes from.
pub fn up_remote(subject: &str) -> Option<&str> {
    subject.strip_prefix("crm.up.")?.split('.').next()
}

/// The filter subjects of a remote's consumer: its set and its own subscription list.
pub fn remote_filters(set: &str, remote: &str) -> Vec<String> {
    vec![
        format!("crm.sync.{}.>", Target::Set(set.to_owned()).token()),
        format!("crm.sync.{}.>", Target::Subscriptions(remote.to_owned()).token()),
    ]
}

/// Whether a `CRM_SYNC` subject is a remote's subscription list's (not a set's).
pub fn is_subscription_subject(subject: &str) -> bool {
    subject.strip_prefix("crm.sync.").is_some_and(|rest| rest.starts_with('~'))
}

/// Parses `crm.evt.<kind>.<id>` or `crm.sync.<target>.<kind>.<id>` into kind and id.
pub fn subject_record(subject: &str) -> Option<(Kind, &str)> {
    let mut parts = subject.rsplitn(3, '.');
    let id = parts.next()?;
    let kind = Kind::parse(parts.next()?)?;
    Some((kind, id))
}

/// The subject of a remote's reports of its sync sessions (each report's id is its message id,
/// so the stream drops a report sent twice). Its kind token (`session`) is no record kind, so a
/// report never reads as an edit.
pub fn session_subject(remote: &str) -> String {
    format!("{}session.report", up_prefix(remote))
}

/// The filter of every remote's session reports on `CRM_UP`.
pub const SESSIONS_ALL: &str = "crm.up.*.session.report";

/// Whether an upload subject is a session report's (`crm.up.<remote>.session.report`).
pub fn is_session_subject(subject: &str) -> bool {
    subject.strip_prefix("crm.up.").is_some_and(|rest| {
        let parts: Vec<&str> = rest.split('.').collect();
        parts.len() == 3 && parts[1] == "session" && parts[2] == "report"
    })
}

/// What one sync session at a remote did: a line of the remote's sync log, sent to the main
/// (on [`session_subject`]) when the session ends, where it is a line of that remote's log and
/// counts as its last sync.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SessionReport {
    pub product: String,
    pub schema: u32,
    pub db: String,
    pub remote: String,
    /// Unique id of the report (a ULID).
    pub id: String,
    pub started_ms: u64,
    pub ended_ms: u64,
    /// Records written or removed at the remote from what the main sent.
    pub received: u64,
    /// Edits made at the remote that reached `CRM_UP`.
    pub sent: u64,
    /// Edits of the remote the main refused (each is in both sync logs, with why).
    pub refused: u64,
    /// Changes from the main that met an edit made at the remote not merged yet: merged field
    /// by field, the newer change of each field winning.
    pub conflicts: u64,
    /// The remote's sync mode (`continuous`, `once`, or its schedule).
    pub mode: String,
}

impl SessionReport {
    /// Whether the session moved anything: one that did not is no line of a sync log, only a
    /// sign of life (it still counts as a sync at the main).
    pub fn is_empty(&self) -> bool {
        // Each counter on its own: a report comes from a remote, and a sum of its counters
        // could overflow (a panic, or a wrap to 0 that would drop a session from the log).
        [self.received, self.sent, self.refused, self.conflicts] == [0; 4]
    }

    pub fn encode(&self) -> Vec<u8> {
        rmp_serde::to_vec_named(self).expect("a report encodes")
    }

    /// Decodes a report and checks it is of this product, schema and database, and of the
    /// remote whose subject it came on.
    pub fn decode_checked(bytes: &[u8], our_db: &str, remote: &str) -> Result<SessionReport, String> {
        let report: SessionReport = rmp_serde::from_slice(bytes).map_err(|e| format!("not a session report: {e}"))?;
        Header { product: report.product.clone(), schema: report.schema, db: report.db.clone() }
            .check(our_db)
            .map_err(|e| e.to_string())?;
        if report.remote != remote {
            return Err(format!("a report of remote {:?} came on remote {remote:?}'s subject", report.remote));
        }
        Ok(report)
    }
}

/// Every subject of `CRM_EVENTS`: the stream's subjects and the projector's filter.
pub const EVENTS_ALL: &str = "crm.evt.>";
/// Every subject of `CRM_SYNC`.
pub const SYNC_ALL: &str = "crm.sync.>";
/// Every subject of `CRM_UP`: the stream's subjects and the merger's filter.
pub const UP_ALL: &str = "crm.up.>";

/// Every subject of one target on `CRM_SYNC` (to purge a deleted set, or to read one set).
pub fn target_filter(target: &Target) -> String {
    format!("crm.sync.{}.>", target.token())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Field, Value};

    fn sample(db: &str) -> Envelope {
        let mut record = Fields::new();
        record.insert("city".into(), Field { value: Value::Str("Albany".into()), stamp: 7 });
        Envelope {
            product: PRODUCT.into(),
            schema: SCHEMA_MAJOR,
            db: db.into(),
            event: "01J".into(),
            kind: Kind::Contact,
            id: "c1".into(),
            op: Op::Upsert,
            version: 3,
            origin: ORIGIN_MAIN.into(),
            record: Some(record),
            reason: None,
        }
    }

    #[test]
    fn envelope_round_trips() {
        let env = sample("db1");
        assert!(matches!(decode_checked(&env.encode(), "db1"), Decoded::Ok(e) if e == env));
    }

    #[test]
    fn another_database_is_refused_with_both_ids() {
        let Decoded::Foreign(f) = decode_checked(&sample("db1").encode(), "db2") else { panic!() };
        let msg = f.to_string();
        assert!(msg.contains("db1") && msg.contains("db2"), "{msg}");
    }

    #[test]
    fn another_schema_is_refused_even_if_the_body_differs() {
        #[derive(Serialize)]
        struct Future {
            product: &'static str,
            schema: u32,
            db: &'static str,
            body: Vec<u8>,
        }
        let bytes = rmp_serde::to_vec_named(&Future { product: PRODUCT, schema: 9, db: "db1", body: vec![1] }).unwrap();
        let Decoded::Foreign(f) = decode_checked(&bytes, "db1") else { panic!() };
        assert!(f.to_string().contains("schema 9"));
    }

    #[test]
    fn garbage_is_malformed() {
        assert!(matches!(decode_checked(b"\xc1garbage", "db1"), Decoded::Malformed(_)));
    }

    #[test]
    fn subjects_parse_back() {
        assert_eq!(subject_record("crm.evt.contact.c1"), Some((Kind::Contact, "c1")));
        let s = sync_subject(&Target::Subscriptions("r1".into()), Kind::Note, "n1");
        assert_eq!(s, "crm.sync.~r1.note.n1");
        assert_eq!(subject_record(&s), Some((Kind::Note, "n1")));
        assert_eq!(up_remote(&up_subject("r1", Kind::Note, "n1")), Some("r1"));
        assert!(reject_subject("r1", Kind::Note, "n1").starts_with("crm.sync.~r1."));
        assert_eq!(target_filter(&Target::Subscriptions("r1".into())), "crm.sync.~r1.>");
    }

    #[test]
    fn a_session_report_is_told_from_every_edit() {
        let subject = session_subject("contact");
        assert_eq!(subject, "crm.up.contact.session.report");
        assert!(is_session_subject(&subject));
        assert_eq!(up_remote(&subject), Some("contact"));
        assert_eq!(subject_record(&subject), None, "a report must never read as an edit");
        for edit in [up_subject("r1", Kind::Contact, "session"), up_subject("session", Kind::Note, "n1")] {
            assert!(!is_session_subject(&edit), "{edit}");
        }
    }

    /// A session of remote `r1` of database `db1` that received 3 changes.
    fn report() -> SessionReport {
        SessionReport {
            product: PRODUCT.into(),
            schema: SCHEMA_MAJOR,
            db: "db1".into(),
            remote: "r1".into(),
            id: "01J".into(),
            started_ms: 1,
            ended_ms: 2,
            received: 3,
            sent: 0,
            refused: 0,
            conflicts: 0,
            mode: "continuous".into(),
        }
    }

    #[test]
    fn a_session_report_is_checked_like_a_message() {
        let report = report();
        assert_eq!(SessionReport::decode_checked(&report.encode(), "db1", "r1"), Ok(report.clone()));
        let other_db = SessionReport::decode_checked(&report.encode(), "db2", "r1").unwrap_err();
        assert!(other_db.contains("db1") && other_db.contains("db2"), "{other_db}");
        let other_remote = SessionReport::decode_checked(&report.encode(), "db1", "r2").unwrap_err();
        assert!(other_remote.contains("r2"), "{other_remote}");
        assert!(SessionReport::decode_checked(b"\xc1", "db1", "r1").is_err());
        assert!(!report.is_empty());
        assert!(SessionReport { received: 0, ..report }.is_empty());
    }

    /// Found by the property tests of `fuzzing.rs`: counters that sum past `u64::MAX` made
    /// `is_empty` panic (overflow checks) or, wrapping to 0, call a busy session empty.
    #[test]
    fn a_report_with_huge_counters_is_not_empty() {
        let report = SessionReport { received: u64::MAX, sent: 1, ..report() };
        let decoded = SessionReport::decode_checked(&report.encode(), "db1", "r1").unwrap();
        assert!(!decoded.is_empty());
        let all = SessionReport { sent: u64::MAX, refused: u64::MAX, conflicts: u64::MAX, ..decoded };
        assert!(!all.is_empty());
    }
}
