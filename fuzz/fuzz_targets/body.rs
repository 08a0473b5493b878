#![no_main]
//! The JSON body of a record, as the APIs receive it: `parse_input` reads any JSON, for every
//! kind, creating or changing, without panicking. A body accepted for a new record makes a
//! record that passes `check_fields`, the same rules for whole records (what a remote
//! uploads), except for the count of custom fields, which `check_record` judges with the
//! record a patch changes.

use crmsync_core::merge::apply_patch;
use crmsync_core::model::{Fields, InputError, Kind, check_fields, parse_input};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(body) = serde_json::from_slice::<serde_json::Value>(data) else { return };
    for kind in Kind::ALL {
        let _ = parse_input(kind, &body, false);
        if let Ok(input) = parse_input(kind, &body, true) {
            let mut fields = Fields::new();
            apply_patch(&mut fields, &input.patch, 1);
            match check_fields(kind, &fields) {
                Ok(()) | Err(InputError::TooManyCustom { .. }) => {}
                Err(e) => panic!("{kind}: {body} was accepted, but the record it makes is not: {e}"),
            }
        }
    }
});
