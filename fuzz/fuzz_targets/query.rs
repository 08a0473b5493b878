#![no_main]
//! Set queries, as a user types them: `Query::parse` compiles any text or refuses it with a
//! position inside it. A compiled query prints in a canonical form that parses back to a
//! query that prints the same and matches the same contacts (`query.rs` promises it).

use std::sync::LazyLock;

use crmsync_core::model::{Field, Fields, Value};
use crmsync_core::query::{MAX_QUERY_LEN, Query};
use libfuzzer_sys::fuzz_target;

/// A few contacts to compare what two queries match.
static CONTACTS: LazyLock<Vec<Fields>> = LazyLock::new(|| {
    let contact = |pairs: &[(&str, Value)]| -> Fields {
        pairs.iter().map(|(name, value)| (name.to_string(), Field { value: value.clone(), stamp: 1 })).collect()
    };
    let s = |text: &str| Value::Str(text.into());
    vec![
        Fields::new(),
        contact(&[
            ("first_name", s("Jane")),
            ("last_name", s("O'Brien")),
            ("state", s("NY")),
            ("city", s("Albany")),
            ("zip", s("02108")),
            ("email", s("jane@example.com")),
            ("access_users", Value::List(vec!["jdoe".into(), "ann".into()])),
            ("custom.source", s("trade fair")),
            ("custom.score", s("12")),
        ]),
        contact(&[
            ("state", s("nj")),
            ("city", s("New York")),
            ("zip", s("-3.5")),
            ("access_users", Value::List(vec![])),
            ("custom.score", s("zürich")),
        ]),
    ]
});

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    match Query::parse(text) {
        Ok(query) => {
            assert_eq!(query.text(), text);
            let printed = query.to_string();
            // Quotes and spaces make the canonical form longer than the text it came from: past
            // the length limit it is refused like any other query that long.
            if printed.len() > MAX_QUERY_LEN {
                return;
            }
            let again = Query::parse(&printed).unwrap_or_else(|e| panic!("{printed:?} of {text:?}: {e}"));
            assert_eq!(again.to_string(), printed, "of {text:?}");
            for contact in CONTACTS.iter() {
                assert_eq!(again.matches(contact), query.matches(contact), "{printed:?} of {text:?} on {contact:?}");
            }
        }
        Err(error) => {
            let chars = text.chars().count();
            assert!(error.position >= 1 && error.position <= chars + 1, "{error} in {chars} characters");
            assert!(!error.expected.is_empty() && !error.found.is_empty(), "{error:?}");
        }
    }
});
