#![no_main]
//! The command line's `FIELD=VALUE` pairs (`crmsync contact add city=Albany …`), and the same
//! pairs as a list's filters (`crmsync contact list state=NY`, `?state=NY`). The first byte
//! picks the kind and whether the first line is a `--from-json` base; every other line is a
//! pair. Neither parser may panic, and a body they make is a JSON object that the API's own
//! parser reads without panicking either.

use crmsync_core::assign::parse_assignments;
use crmsync_core::model::{Fields, Kind, parse_input};
use crmsync_core::query::Query;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&first, rest)) = data.split_first() else { return };
    let kind = Kind::ALL[usize::from(first & 0x7f) % Kind::ALL.len()];
    let Ok(text) = std::str::from_utf8(rest) else { return };
    let mut lines = text.split('\n');
    let base = if first & 0x80 != 0 { lines.next() } else { None };
    let pairs: Vec<String> = lines.map(str::to_owned).collect();

    if let Ok(body) = parse_assignments(kind, &pairs, base) {
        let object = body.as_object().expect("a body is a JSON object");
        // Every field a pair names is in the body (a custom field is in its `custom` map).
        for (name, _) in pairs.iter().filter_map(|pair| pair.split_once('=')) {
            assert!(name.starts_with("custom.") || object.contains_key(name), "{name:?} is not in {body}");
        }
        for creating in [true, false] {
            let _ = parse_input(kind, &body, creating);
        }
    }

    let filters: Vec<(String, String)> = pairs
        .iter()
        .filter_map(|pair| pair.split_once('='))
        .map(|(name, value)| (name.to_owned(), value.to_owned()))
        .collect();
    if let Ok(Some(query)) = Query::equals_all(kind, &filters) {
        let _ = query.matches(&Fields::new());
    }
});
