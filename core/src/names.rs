//! Names and ids: every one of them becomes a NATS subject token, so they are checked here,
//! once, before anything is written or published.

use std::fmt;

/// Longest id or name accepted: long enough for a ULID, a UUID or a readable name.
pub const MAX_NAME_LEN: usize = 64;

/// Why a name was refused. The message says what is allowed, so a user can fix it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("{what} is empty; use 1 to {MAX_NAME_LEN} characters from A-Z, a-z, 0-9, '_' and '-'")]
    Empty { what: &'static str },
    #[error("{what} {shown} is {len} characters long; the limit is {MAX_NAME_LEN}")]
    TooLong { what: &'static str, shown: String, len: usize },
    #[error(
        "{what} {shown} contains {found:?}; use only A-Z, a-z, 0-9, '_' and '-' \
         (names become NATS subject tokens, where '.', '*', '>' and spaces would misroute data)"
    )]
    BadChar { what: &'static str, shown: String, found: char },
}

/// Checks that `name` is a subject-token-safe id or name: `[A-Za-z0-9_-]{1,64}`.
pub fn check(what: &'static str, name: &str) -> Result<(), NameError> {
    if name.is_empty() {
        return Err(NameError::Empty { what });
    }
    let shown = || {
        let mut s: String = name.chars().take(MAX_NAME_LEN).collect();
        if s.len() < name.len() {
            s.push('…');
        }
        format!("{s:?}")
    };
    if let Some(found) = name.chars().find(|c| !is_token_char(*c)) {
        return Err(NameError::BadChar { what, shown: shown(), found });
    }
    if name.len() > MAX_NAME_LEN {
        return Err(NameError::TooLong { what, shown: shown(), len: name.len() });
    }
    Ok(())
}

fn is_token_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_' || c == '-'
}

/// A new time-ordered id (a ULID), for records whose client did not bring one.
pub fn new_id() -> String {
    ulid::Ulid::generate().to_string()
}

/// A name that has passed [`check`].
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Name(String);

impl Name {
    pub fn parse(what: &'static str, s: &str) -> Result<Name, NameError> {
        check(what, s)?;
        Ok(Name(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_tokens_and_ulids() {
        assert!(check("id", "abc_DEF-123").is_ok());
        assert!(check("id", &new_id()).is_ok());
        assert!(check("id", &"a".repeat(64)).is_ok());
    }

    #[test]
    fn refuses_what_would_misroute() {
        for bad in ["a.b", "a*", ">", "a b", "é", "a\n"] {
            let err = check("set name", bad).unwrap_err().to_string();
            assert!(err.contains("set name"), "{err}");
            assert!(err.contains("use only"), "{err}");
        }
        assert!(matches!(check("id", ""), Err(NameError::Empty { .. })));
        assert!(matches!(check("id", &"a".repeat(65)), Err(NameError::TooLong { len: 65, .. })));
    }
}
