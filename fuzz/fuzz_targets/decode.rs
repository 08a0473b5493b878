#![no_main]
//! Bytes off the streams: every message is read by `decode_checked`, and a remote's report of
//! a sync session by `SessionReport::decode_checked`. Neither may panic on any bytes, nor may
//! what the services do next with what they decoded (check an uploaded record, tell an empty
//! report, encode an envelope again to route it).

use crmsync_core::model::check_fields;
use crmsync_core::wire::{Decoded, SessionReport, decode_checked};
use libfuzzer_sys::fuzz_target;

/// The database the seeds of `fuzz/corpus/decode` belong to, and the remote of their reports.
const DB: &str = "db1";
const REMOTE: &str = "r1";

fuzz_target!(|data: &[u8]| {
    match decode_checked(data, DB) {
        Decoded::Ok(env) => {
            if let Some(record) = &env.record {
                let _ = check_fields(env.kind, record);
            }
            // A decoded envelope is what the main routes on: it encodes and decodes back to itself.
            let again = decode_checked(&env.encode(), DB);
            assert!(matches!(&again, Decoded::Ok(back) if *back == env), "{env:?} came back as {again:?}");
        }
        Decoded::Foreign(foreign) => {
            let _ = foreign.to_string();
        }
        Decoded::Malformed(_) => {}
    }
    if let Ok(report) = SessionReport::decode_checked(data, DB, REMOTE) {
        let _ = report.is_empty();
        assert_eq!(SessionReport::decode_checked(&report.encode(), DB, REMOTE), Ok(report));
    }
});
