//! The query language of sync sets: a set with a query holds only the contacts that match it.
//!
//! The router evaluates every set's query for every changed contact, up to a hundred sets per
//! change, so a query is compiled once by [`Query::parse`] and then [`Query::matches`] only reads:
//! constants are lower-cased and numbers recognised at parse time, field names are resolved to the
//! contact field table, and an evaluation allocates nothing.
//!
//! Architecture invariant: this module does no IO.
//!
//! # Examples
//!
//! ```text
//! state = NY
//! state in (NY, NJ, CT) and not city = 'New York'
//! custom.source = web or custom.source = "trade fair"
//! last_name starts with 'O''Br' and email is not empty
//! access_users contains jdoe
//! STATE = ny AND (City STARTS WITH al OR custom.source IN (web, fair))
//! custom.score >= 10
//! ```
//!
//! ```
//! use crmsync_core::model::{Field, Fields, Value};
//! use crmsync_core::query::Query;
//!
//! let query = Query::parse("state = NY and (city starts with 'Al' or custom.source in (web, fair))").unwrap();
//! let mut contact = Fields::new();
//! contact.insert("state".into(), Field { value: Value::Str("NY".into()), stamp: 1 });
//! contact.insert("city".into(), Field { value: Value::Str("Albany".into()), stamp: 1 });
//! assert!(query.matches(&contact));
//! assert_eq!(
//!     query.to_string(),
//!     "state = 'ny' and (city starts with 'al' or custom.source in ('web', 'fair'))"
//! );
//! ```
//!
//! # Grammar
//!
//! ```text
//! query      = any-of END
//! any-of     = all-of { "or" all-of }
//! all-of     = factor { "and" factor }
//! factor     = "not" factor | "(" any-of ")" | condition
//! condition  = field comparison
//! field      = CONTACT-FIELD | "custom" "." CUSTOM-NAME
//! comparison = ( "=" | "!=" | "<" | "<=" | ">" | ">=" ) value
//!            | ( "contains" | "starts" "with" | "ends" "with" ) value
//!            | "in" "(" value { "," value } ")"
//!            | "is" "empty" | "is" "not" "empty"
//! value      = 'single-quoted' | "double-quoted" | BARE
//! ```
//!
//! - `not` binds tighter than `and`, which binds tighter than `or`: `not a and b or c` is
//!   `((not a) and b) or c`. Parentheses group as usual.
//! - Keywords (`and`, `or`, `not`, `contains`, `starts with`, `ends with`, `in`, `is empty`,
//!   `is not empty`) and contact field names are case-insensitive. Custom field names are not:
//!   they are the names of the contact's custom fields, compared exactly.
//! - `CONTACT-FIELD` is any field of [`Kind::Contact`] except `custom` itself; `custom.NAME`
//!   reads one custom field (NAME of `A-Z a-z 0-9 _ -`). Any other name is refused with the list
//!   of the known fields.
//! - A quoted value holds any text; its quote character is written twice to include it
//!   (`'O''Brien'`, `"say ""hi"""`). A `BARE` value is a run of letters (any alphabet), digits,
//!   and `_ - . + @`, which covers words such as `NY`, ids, dates such as `2024-05-01`, numbers
//!   such as `-3.5`, e-mail addresses and phone numbers. Quote anything else, spaces included.
//! - Whitespace between tokens is free; a query holds at most [`MAX_QUERY_LEN`] bytes and nests
//!   parentheses and `not` at most [`MAX_NESTING`] deep. An empty query is refused: whether a
//!   set without a query holds everything is the set's business, not the language's.
//!
//! # Meaning
//!
//! A condition reads one field of the contact and compares it with the value(s) of the query:
//!
//! - **Case.** Text compares without regard to ASCII letter case: `state = ny` matches `NY`.
//!   Letters outside ASCII compare exactly (`É` is not `é`).
//! - **Missing fields.** A field that is absent, null or an empty string counts as the empty
//!   string `''`, for every comparison. So `city = ''` is the same as `city is empty`,
//!   `city != 'x'` holds for a contact without a city, and `city < 'b'` holds for it too (the
//!   empty string sorts first): write `city is not empty and city < 'b'` to leave such contacts
//!   out. A custom field is missing when the contact has no custom field of that name.
//! - **`=`, `!=`, `in`** compare text: `zip = 01234` does not match `1234`. `a != v` is exactly
//!   `not a = v`; `a in (v1, v2)` is `a = v1 or a = v2`.
//! - **`contains`, `starts with`, `ends with`** test substrings, ASCII case-insensitively. Every
//!   text contains, starts and ends with `''`.
//! - **`<`, `<=`, `>`, `>=`** compare as numbers when both sides are numbers, and as text
//!   otherwise (byte order after ASCII lower-casing, which is Unicode code point order). A number
//!   is an optional sign, digits, and optionally `.` and more digits (`7`, `-3.5`, `+0.25`, `007`);
//!   no exponents or thousands separators. Numbers compare exactly, however many digits they
//!   have. So a zip of `02108` does not match `zip = 2108` (text) but matches both
//!   `zip >= 2108` and `zip <= 2108` (numbers). Quoting does not make a number text:
//!   `custom.score > '9'` compares numbers just as `custom.score > 9` does.
//! - **Lists** (`access_users`, `access_teams`): a comparison holds when it holds for any element,
//!   so `access_users = jdoe` tests membership and `access_users starts with j` tests whether
//!   some element starts with `j`. `contains` on a list tests membership too, like `=`: it does
//!   not look inside the elements (`access_users contains jd` does not match `jdoe`). An empty
//!   list counts as a single empty string, like a missing field, so `access_users is empty` holds
//!   for it, and `access_users != jdoe` holds exactly when `jdoe` is not a member.
//! - **Booleans and integers** compare as their text, `true`/`false` and decimal digits, so
//!   `= true` and `> 3` work as they read. No contact field holds one today; the rule is there so
//!   that every value a record can hold has a meaning.
//!
//! # Errors
//!
//! A query that does not parse is refused with a [`QueryError`]: the 1-based character position
//! of the problem, what was expected there and what was found, for instance
//! `at 7: expected a comparison (=, !=, <, <=, >, >=, contains, starts with, ends with, in, is
//! empty, is not empty) after "state", found "NY"`.

use std::cmp::Ordering;
use std::fmt;
use std::str::FromStr;

use winnow::ascii::{Caseless, multispace0};
use winnow::combinator::{alt, cut_err, eof, not, opt, preceded, repeat, separated, terminated};
use winnow::error::{AddContext, ErrMode, ParserError};
use winnow::prelude::*;
use winnow::stream::Stream;
use winnow::token::{one_of, take_till, take_while};

use crate::model::{FieldType, Fields, Kind, Value};

/// Longest query accepted, in bytes: the limit of a set's `query` field (see `model.rs`).
pub const MAX_QUERY_LEN: usize = 4096;

/// Deepest nesting of parentheses and `not` accepted. Parsing, printing and evaluating recurse
/// once per level, so the limit keeps a hostile query from exhausting the stack; real queries
/// nest a handful of levels.
pub const MAX_NESTING: usize = 64;

/// A compiled query over contact fields. Parse once, then call [`Query::matches`] per contact.
///
/// Its [`Display`](fmt::Display) is a canonical form: lower-case keywords, field names and
/// constants (matching ignores ASCII case, so nothing is lost), every value single-quoted,
/// single spaces, and parentheses only where precedence needs them or where the query grouped an
/// `and` inside an `and` (or an `or` inside an `or`). It parses back to the same compiled query,
/// which matches the same contacts and prints the same again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Query {
    text: String,
    root: Node,
}

impl Query {
    /// Compiles a query, or says where and why it does not parse.
    pub fn parse(text: &str) -> Result<Query, QueryError> {
        if text.len() > MAX_QUERY_LEN {
            return Err(QueryError::too_long(text));
        }
        let mut input = text;
        match query.parse_next(&mut input) {
            Ok(root) => Ok(Query { text: text.to_owned(), root }),
            Err(ErrMode::Backtrack(error) | ErrMode::Cut(error)) => Err(error.into_query_error(text)),
            // Only partial streams report incomplete input; a whole `&str` never does.
            Err(ErrMode::Incomplete(_)) => Err(SyntaxError { remaining: 0, expected: None }.into_query_error(text)),
        }
    }

    /// The query as it was written.
    pub fn text(&self) -> &str {
        &self.text
    }

    /// Whether a contact with these fields matches. Allocates nothing.
    pub fn matches(&self, fields: &Fields) -> bool {
        self.root.matches(fields)
    }
}

impl FromStr for Query {
    type Err = QueryError;

    fn from_str(text: &str) -> Result<Query, QueryError> {
        Query::parse(text)
    }
}

impl fmt::Display for Query {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.root.fmt(f)
    }
}

/// Why a query was refused: where, what the parser expected there, and what it found.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("at {position}: expected {expected}, found {found}")]
pub struct QueryError {
    /// 1-based position, in characters, of the problem in the query text.
    pub position: usize,
    /// What would have been accepted at that position, in words.
    pub expected: String,
    /// What is there instead: a quoted token, or "the end of the query".
    pub found: String,
}

impl QueryError {
    fn too_long(text: &str) -> QueryError {
        let offset =
            text.char_indices().map(|(at, c)| at + c.len_utf8()).take_while(|end| *end <= MAX_QUERY_LEN).last();
        let offset = offset.unwrap_or(0);
        QueryError {
            position: char_position(text, offset),
            expected: format!(
                "the end of the query: a query may be at most {MAX_QUERY_LEN} bytes long and this one has {} bytes; \
                 shorten it or split the set",
                text.len()
            ),
            found: found_at(text, offset),
        }
    }
}

/// The expression tree of a compiled query.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Node {
    /// `a and b and …`: holds when every part does. Has at least two parts.
    All(Vec<Node>),
    /// `a or b or …`: holds when any part does. Has at least two parts.
    Any(Vec<Node>),
    Not(Box<Node>),
    Condition(Condition),
}

impl Node {
    fn matches(&self, fields: &Fields) -> bool {
        match self {
            Node::All(parts) => parts.iter().all(|part| part.matches(fields)),
            Node::Any(parts) => parts.iter().any(|part| part.matches(fields)),
            Node::Not(part) => !part.matches(fields),
            Node::Condition(condition) => condition.matches(fields),
        }
    }

    /// How tightly the node binds when printed: a part that binds no tighter than its parent
    /// needs parentheses.
    fn binding(&self) -> u8 {
        match self {
            Node::Any(_) => 1,
            Node::All(_) => 2,
            Node::Not(_) => 3,
            Node::Condition(_) => 4,
        }
    }

    fn fmt_part(&self, part: &Node, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let grouped = matches!(part, Node::Any(_) | Node::All(_)) && part.binding() <= self.binding();
        if grouped { write!(f, "({part})") } else { write!(f, "{part}") }
    }

    fn fmt_parts(&self, parts: &[Node], joiner: &str, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (index, part) in parts.iter().enumerate() {
            if index > 0 {
                f.write_str(joiner)?;
            }
            self.fmt_part(part, f)?;
        }
        Ok(())
    }
}

impl fmt::Display for Node {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Node::All(parts) => self.fmt_parts(parts, " and ", f),
            Node::Any(parts) => self.fmt_parts(parts, " or ", f),
            Node::Not(part) => {
                f.write_str("not ")?;
                self.fmt_part(part, f)
            }
            Node::Condition(condition) => condition.fmt(f),
        }
    }
}

/// One field compared with the query's value(s).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Condition {
    field: FieldRef,
    operator: Operator,
}

/// A field, resolved at parse time so evaluation is one or two map look-ups.
#[derive(Debug, Clone, PartialEq, Eq)]
enum FieldRef {
    /// A field of the record (a contact, for a set's query), by its name in the field table.
    Named(&'static str),
    /// A custom field of the record, by its field name (`custom.NAME`).
    Custom(Box<str>),
}

impl fmt::Display for FieldRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FieldRef::Named(name) => f.write_str(name),
            FieldRef::Custom(name) => f.write_str(name),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Operator {
    Equal(Constant),
    NotEqual(Constant),
    Less(Constant),
    LessOrEqual(Constant),
    Greater(Constant),
    GreaterOrEqual(Constant),
    Contains(Constant),
    StartsWith(Constant),
    EndsWith(Constant),
    In(Vec<Constant>),
    IsEmpty,
    IsNotEmpty,
}

/// A value of the query, prepared for comparison.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Constant {
    /// The value with ASCII letters lower-cased, so a comparison folds only the contact's side.
    folded: Box<str>,
    /// The value as a number, when it is one, for `<`, `<=`, `>` and `>=`.
    number: Option<Number>,
}

impl Constant {
    fn new(raw: &str) -> Constant {
        let folded: Box<str> = raw.to_ascii_lowercase().into();
        let number = Decimal::parse(&folded).map(|decimal| Number {
            negative: decimal.negative,
            integer: decimal.integer.into(),
            fraction: decimal.fraction.into(),
        });
        Constant { folded, number }
    }
}

impl fmt::Display for Constant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "'{}'", self.folded.replace('\'', "''"))
    }
}

/// An owned [`Decimal`], kept by a constant so evaluation does not parse it again.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Number {
    negative: bool,
    integer: Box<str>,
    fraction: Box<str>,
}

impl Number {
    fn as_decimal(&self) -> Decimal<'_> {
        Decimal { negative: self.negative, integer: &self.integer, fraction: &self.fraction }
    }
}

impl fmt::Display for Condition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let field = &self.field;
        match &self.operator {
            Operator::Equal(value) => write!(f, "{field} = {value}"),
            Operator::NotEqual(value) => write!(f, "{field} != {value}"),
            Operator::Less(value) => write!(f, "{field} < {value}"),
            Operator::LessOrEqual(value) => write!(f, "{field} <= {value}"),
            Operator::Greater(value) => write!(f, "{field} > {value}"),
            Operator::GreaterOrEqual(value) => write!(f, "{field} >= {value}"),
            Operator::Contains(value) => write!(f, "{field} contains {value}"),
            Operator::StartsWith(value) => write!(f, "{field} starts with {value}"),
            Operator::EndsWith(value) => write!(f, "{field} ends with {value}"),
            Operator::In(values) => {
                write!(f, "{field} in (")?;
                for (index, value) in values.iter().enumerate() {
                    if index > 0 {
                        f.write_str(", ")?;
                    }
                    write!(f, "{value}")?;
                }
                f.write_str(")")
            }
            Operator::IsEmpty => write!(f, "{field} is empty"),
            Operator::IsNotEmpty => write!(f, "{field} is not empty"),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Evaluation
// ---------------------------------------------------------------------------------------------

/// What a condition compares: a field's text, or the elements of a list field.
#[derive(Clone, Copy)]
enum Subject<'a> {
    Text(&'a str),
    List(&'a [String]),
}

impl Subject<'_> {
    /// Whether `test` holds for the text, or for any element of the list. An empty list counts
    /// as one empty string, the same as a missing field.
    fn any(self, test: impl Fn(&str) -> bool) -> bool {
        match self {
            Subject::Text(text) => test(text),
            Subject::List([]) => test(""),
            Subject::List(elements) => elements.iter().any(|element| test(element)),
        }
    }
}

impl Condition {
    fn matches(&self, fields: &Fields) -> bool {
        let value = match &self.field {
            FieldRef::Named(name) => fields.get(*name).map(|field| &field.value),
            FieldRef::Custom(name) => {
                let text = fields.get(&**name).and_then(|field| field.value.as_str()).unwrap_or("");
                return self.operator.holds(Subject::Text(text));
            }
        };
        // An integer is compared as its decimal text, written into this buffer on the stack.
        let mut digits = [0u8; 20];
        let subject = match value {
            Some(Value::Str(text)) => Subject::Text(text),
            Some(Value::List(elements)) => Subject::List(elements),
            Some(Value::Bool(true)) => Subject::Text("true"),
            Some(Value::Bool(false)) => Subject::Text("false"),
            Some(Value::Int(number)) => Subject::Text(int_text(*number, &mut digits)),
            // A map is only ever the `custom` field, which a query reads key by key.
            None | Some(Value::Null) | Some(Value::Map(_)) => Subject::Text(""),
        };
        self.operator.holds(subject)
    }
}

impl Operator {
    fn holds(&self, subject: Subject<'_>) -> bool {
        match self {
            Operator::Equal(value) => subject.any(|text| equal(text, value)),
            Operator::NotEqual(value) => !subject.any(|text| equal(text, value)),
            Operator::Less(value) => subject.any(|text| order(text, value).is_lt()),
            Operator::LessOrEqual(value) => subject.any(|text| order(text, value).is_le()),
            Operator::Greater(value) => subject.any(|text| order(text, value).is_gt()),
            Operator::GreaterOrEqual(value) => subject.any(|text| order(text, value).is_ge()),
            // A list contains its elements, not their substrings: `access_users contains jd` must
            // not match a contact shared with user `jdoe`.
            Operator::Contains(value) => match subject {
                Subject::Text(text) => contains(text, value),
                Subject::List(_) => subject.any(|element| equal(element, value)),
            },
            Operator::StartsWith(value) => subject.any(|text| starts_with(text, value)),
            Operator::EndsWith(value) => subject.any(|text| ends_with(text, value)),
            Operator::In(values) => subject.any(|text| values.iter().any(|value| equal(text, value))),
            Operator::IsEmpty => subject.any(str::is_empty),
            Operator::IsNotEmpty => !subject.any(str::is_empty),
        }
    }
}

fn equal(text: &str, value: &Constant) -> bool {
    text.eq_ignore_ascii_case(&value.folded)
}

fn starts_with(text: &str, value: &Constant) -> bool {
    let (text, value) = (text.as_bytes(), value.folded.as_bytes());
    text.len() >= value.len() && text[..value.len()].eq_ignore_ascii_case(value)
}

fn ends_with(text: &str, value: &Constant) -> bool {
    let (text, value) = (text.as_bytes(), value.folded.as_bytes());
    text.len() >= value.len() && text[text.len() - value.len()..].eq_ignore_ascii_case(value)
}

/// Case-insensitive substring search. Field values are short (a few hundred bytes at most), so
/// the plain scan beats building a searcher. Matching bytes of valid UTF-8 cannot straddle a
/// character boundary, so this is correct for any text.
fn contains(text: &str, value: &Constant) -> bool {
    let (text, value) = (text.as_bytes(), value.folded.as_bytes());
    let Some((&first, _)) = value.split_first() else { return true };
    if text.len() < value.len() {
        return false;
    }
    (0..=text.len() - value.len())
        .any(|at| text[at].to_ascii_lowercase() == first && text[at..at + value.len()].eq_ignore_ascii_case(value))
}

/// How a field's text sorts against a constant: as numbers when both are, else as folded text.
fn order(text: &str, value: &Constant) -> Ordering {
    if let Some(number) = &value.number
        && let Some(decimal) = Decimal::parse(text)
    {
        return decimal.compare(&number.as_decimal());
    }
    text.bytes().map(|byte| byte.to_ascii_lowercase()).cmp(value.folded.bytes())
}

/// Writes an integer's decimal text into `buffer` (20 bytes hold any `i64`) and returns it.
fn int_text(number: i64, buffer: &mut [u8; 20]) -> &str {
    let mut rest = number.unsigned_abs();
    let mut start = buffer.len();
    loop {
        start -= 1;
        buffer[start] = b'0' + (rest % 10) as u8;
        rest /= 10;
        if rest == 0 {
            break;
        }
    }
    if number < 0 {
        start -= 1;
        buffer[start] = b'-';
    }
    // Only ASCII digits and a sign were written, so this never falls back.
    std::str::from_utf8(&buffer[start..]).unwrap_or("")
}

/// A decimal number read from text, normalised so that equal numbers have equal parts: the
/// integer digits without leading zeros, the fraction digits without trailing zeros, and no
/// negative zero. Comparing the parts compares the numbers exactly, with no floating point.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Decimal<'a> {
    negative: bool,
    integer: &'a str,
    fraction: &'a str,
}

impl<'a> Decimal<'a> {
    /// Reads `[+-]digits[.digits]`, the whole text, or nothing.
    fn parse(text: &'a str) -> Option<Decimal<'a>> {
        let (negative, unsigned) = match text.as_bytes().first() {
            Some(b'-') => (true, &text[1..]),
            Some(b'+') => (false, &text[1..]),
            _ => (false, text),
        };
        let (integer, fraction) = unsigned.split_once('.').unwrap_or((unsigned, ""));
        let all_digits = |digits: &str| digits.bytes().all(|byte| byte.is_ascii_digit());
        if integer.is_empty() || !all_digits(integer) || !all_digits(fraction) {
            return None;
        }
        if unsigned.ends_with('.') {
            return None;
        }
        let integer = integer.trim_start_matches('0');
        let fraction = fraction.trim_end_matches('0');
        let negative = negative && !(integer.is_empty() && fraction.is_empty());
        Some(Decimal { negative, integer, fraction })
    }

    fn compare_magnitude(&self, other: &Decimal<'_>) -> Ordering {
        self.integer
            .len()
            .cmp(&other.integer.len())
            .then_with(|| self.integer.cmp(other.integer))
            .then_with(|| self.fraction.cmp(other.fraction))
    }

    fn compare(&self, other: &Decimal<'_>) -> Ordering {
        match (self.negative, other.negative) {
            (false, false) => self.compare_magnitude(other),
            (true, true) => other.compare_magnitude(self),
            (true, false) => Ordering::Less,
            (false, true) => Ordering::Greater,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Parsing
// ---------------------------------------------------------------------------------------------
//
// The grammar is LL(1): one token always decides the branch, so once a branch is chosen its
// failures are cut (final) and carry what was expected at the failing token. Every token parser
// eats the whitespace after it, so a failure is always reported at the start of a real token.

type Input<'a> = &'a str;
type ParseResult<'a, T> = ModalResult<T, SyntaxError<'a>>;

/// What the parser expected where it stopped; turned into words by [`SyntaxError::into_query_error`].
#[derive(Debug, Clone)]
enum Expected<'a> {
    /// The start of a condition: a field, `not` or `(`.
    Condition,
    /// A name that is not a contact field.
    Field,
    /// `custom` must be followed by `.NAME`.
    CustomDot,
    /// The NAME of `custom.NAME`.
    CustomKey,
    /// A comparison after the field written as `field`.
    Comparison { field: &'a str },
    /// `with` after `starts` or `ends`.
    With { after: &'static str },
    /// `empty` or `not empty` after `is`.
    EmptyAfterIs,
    /// `empty` after `is not`.
    EmptyAfterIsNot,
    /// A value after the comparison spelled `after`.
    Value { after: &'static str },
    /// The `(` that opens the values of `in`.
    ListStart,
    /// A value inside the list of `in`.
    ListValue,
    /// `,` or `)` after a value of `in`.
    ListNext,
    /// The closing quote of a string opened where `remaining` bytes of input were left.
    ClosingQuote { quote: char, remaining: usize },
    /// The `)` of a parenthesis opened where `remaining` bytes of input were left.
    ClosingParenthesis { remaining: usize },
    /// `and`, `or` or the end of the query.
    End,
    /// Nesting past [`MAX_NESTING`].
    Shallower,
}

/// The parser's error: where it stopped, as the length of the input left there (so no offset
/// arithmetic happens while parsing), and what it expected.
#[derive(Debug)]
struct SyntaxError<'a> {
    remaining: usize,
    expected: Option<Expected<'a>>,
}

impl<'a> SyntaxError<'a> {
    fn cut_at(input: Input<'a>, expected: Expected<'a>) -> ErrMode<SyntaxError<'a>> {
        ErrMode::Cut(SyntaxError { remaining: input.len(), expected: Some(expected) })
    }

    fn into_query_error(self, text: &str) -> QueryError {
        let offset = text.len() - self.remaining.min(text.len());
        let opened_at = |remaining: usize| char_position(text, text.len() - remaining.min(text.len()));
        let expected = match self.expected {
            None => "a query such as state = NY".to_owned(),
            Some(Expected::Condition) => {
                "a condition (a contact field such as state followed by a comparison, \"not\", or \"(\")".to_owned()
            }
            Some(Expected::Field) => format!("a contact field ({}) or custom.NAME for a custom field", field_names()),
            Some(Expected::CustomDot) => {
                "\".\" and a custom field name after \"custom\", as in custom.source".to_owned()
            }
            Some(Expected::CustomKey) => {
                "a custom field name (A-Z, a-z, 0-9, _ and -) after \"custom.\", as in custom.source".to_owned()
            }
            Some(Expected::Comparison { field }) => {
                let mut expected = format!(
                    "a comparison (=, !=, <, <=, >, >=, contains, starts with, ends with, in, is empty, \
                     is not empty) after {field:?}"
                );
                // `city not in (…)` is a natural thing to write; say where `not` goes instead.
                if word_at(text, offset).eq_ignore_ascii_case("not") {
                    expected.push_str(&format!("; to negate a condition, put \"not\" before it: not {field} …"));
                }
                expected
            }
            Some(Expected::With { after }) => format!("\"with\" after {after:?}"),
            Some(Expected::EmptyAfterIs) => "\"empty\" or \"not empty\" after \"is\"".to_owned(),
            Some(Expected::EmptyAfterIsNot) => "\"empty\" after \"is not\"".to_owned(),
            Some(Expected::Value { after }) => {
                format!("a value after {after:?} (a word such as NY, a number, or a quoted string such as 'New York')")
            }
            Some(Expected::ListStart) => "\"(\" and a list of values after \"in\", as in state in (NY, NJ)".to_owned(),
            Some(Expected::ListValue) => {
                "a value in the list (a word such as NY, a number, or a quoted string such as 'New York')".to_owned()
            }
            Some(Expected::ListNext) => "\",\" or \")\" after a value in the list".to_owned(),
            Some(Expected::ClosingQuote { quote, remaining }) => format!(
                "the closing {quote} of the string that starts at {} (write {quote}{quote} for a {quote} inside it)",
                opened_at(remaining)
            ),
            Some(Expected::ClosingParenthesis { remaining }) => format!(
                "\"and\", \"or\" or the \")\" that closes the \"(\" at {}{}",
                opened_at(remaining),
                quoting_hint(text, offset)
            ),
            Some(Expected::End) => format!("\"and\", \"or\" or the end of the query{}", quoting_hint(text, offset)),
            Some(Expected::Shallower) => format!(
                "a condition nested at most {MAX_NESTING} deep (each \"(\" and \"not\" is a level); simplify the query"
            ),
        };
        QueryError { position: char_position(text, offset), expected, found: found_at(text, offset) }
    }
}

impl<'a> ParserError<Input<'a>> for SyntaxError<'a> {
    type Inner = Self;

    fn from_input(input: &Input<'a>) -> Self {
        SyntaxError { remaining: input.len(), expected: None }
    }

    fn into_inner(self) -> Result<Self::Inner, Self> {
        Ok(self)
    }

    /// Of two failed alternatives, keep the one that says what it expected, else the one that
    /// got further.
    fn or(self, other: Self) -> Self {
        match (&self.expected, &other.expected) {
            (Some(_), None) => self,
            (None, Some(_)) => other,
            _ if self.remaining < other.remaining => self,
            _ => other,
        }
    }
}

impl<'a> AddContext<Input<'a>, Expected<'a>> for SyntaxError<'a> {
    /// Names what was expected at the start of the token that failed, unless a more precise
    /// parser inside already did.
    fn add_context(
        mut self,
        input: &Input<'a>,
        token_start: &<Input<'a> as Stream>::Checkpoint,
        context: Expected<'a>,
    ) -> Self {
        if self.expected.is_none() {
            let mut start = *input;
            start.reset(token_start);
            self.remaining = start.len();
            self.expected = Some(context);
        }
        self
    }
}

/// The contact fields a query may name, for error messages.
fn field_names() -> String {
    let names: Vec<&str> = queryable_fields().map(|spec| spec.name).collect();
    names.join(", ")
}

fn queryable_fields() -> impl Iterator<Item = &'static crate::model::FieldSpec> {
    Kind::Contact.fields().iter().filter(|spec| spec.ty != FieldType::Custom)
}

/// 1-based character position of a byte offset (always on a character boundary here).
fn char_position(text: &str, offset: usize) -> usize {
    text.get(..offset).map_or(0, |before| before.chars().count()) + 1
}

/// The token at a byte offset, quoted, for "found …" in error messages.
fn found_at(text: &str, offset: usize) -> String {
    let rest = text.get(offset..).unwrap_or("");
    match rest.chars().next() {
        None => "the end of the query".to_owned(),
        Some(first) if is_word_char(first) => {
            let mut word: String = rest.chars().take_while(|c| is_word_char(*c)).take(40).collect();
            if word.len() < rest.len() && rest[word.len()..].starts_with(is_word_char) {
                word.push('…');
            }
            format!("{word:?}")
        }
        Some(other) => format!("{:?}", other.to_string()),
    }
}

/// The word at a byte offset, or "" when none starts there.
fn word_at(text: &str, offset: usize) -> &str {
    let rest = text.get(offset..).unwrap_or("");
    let end = rest.find(|c: char| !is_word_char(c)).unwrap_or(rest.len());
    &rest[..end]
}

/// When a condition is followed by more text where it should have ended, the usual cause is a
/// value with a space or a quote in it: `city = New York`, `last_name = 'O'Brien'`. Say so,
/// unless what came before was a closing parenthesis, or what follows is a field (a forgotten
/// `and`), where a value cannot be the cause.
fn quoting_hint(text: &str, offset: usize) -> &'static str {
    let before = text.get(..offset).unwrap_or("").trim_end();
    let word = word_at(text, offset);
    let names_a_field = queryable_fields().any(|spec| spec.name.eq_ignore_ascii_case(word))
        || word.get(..7).is_some_and(|prefix| prefix.eq_ignore_ascii_case("custom."));
    if before.is_empty() || before.ends_with(')') || offset == text.len() || names_a_field {
        ""
    } else {
        " (a value with spaces or quotes must be quoted, as in 'New York' or 'O''Brien')"
    }
}

/// Characters of a bare value, and of a word for keyword boundaries and error messages. Beyond
/// letters and digits they are those of ids, dates, numbers, e-mail addresses and phone numbers.
fn is_word_char(c: char) -> bool {
    c.is_alphanumeric() || matches!(c, '_' | '-' | '.' | '+' | '@')
}

/// Characters of a field name and a custom field name (the characters `names::check` allows).
fn is_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_' || c == '-'
}

/// A case-insensitive keyword that is a whole word (`and` but not the start of `andrew`).
fn keyword<'a>(word: &'static str) -> impl Parser<Input<'a>, Input<'a>, ErrMode<SyntaxError<'a>>> {
    terminated((Caseless(word), not(one_of(is_word_char))).take(), multispace0)
}

/// Punctuation or an operator.
fn symbol<'a>(symbol: &'static str) -> impl Parser<Input<'a>, Input<'a>, ErrMode<SyntaxError<'a>>> {
    terminated(symbol, multispace0)
}

fn query<'a>(input: &mut Input<'a>) -> ParseResult<'a, Node> {
    multispace0.parse_next(input)?;
    let root = any_of(input, 0)?;
    cut_err(eof.context(Expected::End)).parse_next(input)?;
    Ok(root)
}

fn any_of<'a>(input: &mut Input<'a>, depth: usize) -> ParseResult<'a, Node> {
    let mut parts: Vec<Node> =
        separated(1.., |input: &mut Input<'a>| all_of(input, depth), keyword("or")).parse_next(input)?;
    Ok(if parts.len() == 1 { parts.swap_remove(0) } else { Node::Any(parts) })
}

fn all_of<'a>(input: &mut Input<'a>, depth: usize) -> ParseResult<'a, Node> {
    let mut parts: Vec<Node> =
        separated(1.., |input: &mut Input<'a>| factor(input, depth), keyword("and")).parse_next(input)?;
    Ok(if parts.len() == 1 { parts.swap_remove(0) } else { Node::All(parts) })
}

fn factor<'a>(input: &mut Input<'a>, depth: usize) -> ParseResult<'a, Node> {
    let start = *input;
    if opt(keyword("not")).parse_next(input)?.is_some() {
        let depth = deeper(start, depth)?;
        return Ok(Node::Not(Box::new(factor(input, depth)?)));
    }
    if opt(symbol("(")).parse_next(input)?.is_some() {
        let depth = deeper(start, depth)?;
        let inner = any_of(input, depth)?;
        cut_err(symbol(")").context(Expected::ClosingParenthesis { remaining: start.len() })).parse_next(input)?;
        return Ok(inner);
    }
    condition(input).map(Node::Condition)
}

fn deeper<'a>(at: Input<'a>, depth: usize) -> ParseResult<'a, usize> {
    if depth >= MAX_NESTING { Err(SyntaxError::cut_at(at, Expected::Shallower)) } else { Ok(depth + 1) }
}

fn condition<'a>(input: &mut Input<'a>) -> ParseResult<'a, Condition> {
    let (field, written) = field(input)?;
    let comparison = cut_err(comparison.context(Expected::Comparison { field: written })).parse_next(input)?;
    let operator = match comparison {
        Comparison::WithValue { operator, spelling } => {
            operator(cut_err(value.context(Expected::Value { after: spelling })).parse_next(input)?)
        }
        Comparison::In => Operator::In(list(input)?),
        Comparison::IsEmpty => Operator::IsEmpty,
        Comparison::IsNotEmpty => Operator::IsNotEmpty,
    };
    Ok(Condition { field, operator })
}

/// A field name, resolved; also returns it as written, for error messages.
fn field<'a>(input: &mut Input<'a>) -> ParseResult<'a, (FieldRef, &'a str)> {
    let start = *input;
    let written = cut_err(take_while(1.., is_word_char).context(Expected::Condition)).parse_next(input)?;
    let field = match written.split_once('.') {
        Some((prefix, key)) if prefix.eq_ignore_ascii_case("custom") => {
            if key.is_empty() || !key.chars().all(is_name_char) {
                // Point at the key, just after the dot.
                return Err(SyntaxError::cut_at(&start[prefix.len() + 1..], Expected::CustomKey));
            }
            FieldRef::Custom(format!("{}{key}", crate::model::CUSTOM_PREFIX).into())
        }
        _ if written.eq_ignore_ascii_case("custom") => {
            multispace0.parse_next(input)?;
            return Err(SyntaxError::cut_at(input, Expected::CustomDot));
        }
        _ => match queryable_fields().find(|spec| spec.name.eq_ignore_ascii_case(written)) {
            Some(spec) => FieldRef::Named(spec.name),
            None => return Err(SyntaxError::cut_at(start, Expected::Field)),
        },
    };
    multispace0.parse_next(input)?;
    Ok((field, written))
}

/// A comparison as read, before its value.
#[derive(Clone)]
enum Comparison {
    WithValue { operator: fn(Constant) -> Operator, spelling: &'static str },
    In,
    IsEmpty,
    IsNotEmpty,
}

fn with_value(operator: fn(Constant) -> Operator, spelling: &'static str) -> Comparison {
    Comparison::WithValue { operator, spelling }
}

fn comparison<'a>(input: &mut Input<'a>) -> ParseResult<'a, Comparison> {
    let is = preceded(
        keyword("is"),
        cut_err(
            alt((
                keyword("empty").value(Comparison::IsEmpty),
                preceded(keyword("not"), cut_err(keyword("empty").context(Expected::EmptyAfterIsNot)))
                    .value(Comparison::IsNotEmpty),
            ))
            .context(Expected::EmptyAfterIs),
        ),
    );
    // Two groups, because `alt` takes at most nine alternatives.
    let symbols = alt((
        symbol("!=").value(with_value(Operator::NotEqual, "!=")),
        symbol("<=").value(with_value(Operator::LessOrEqual, "<=")),
        symbol(">=").value(with_value(Operator::GreaterOrEqual, ">=")),
        symbol("<").value(with_value(Operator::Less, "<")),
        symbol(">").value(with_value(Operator::Greater, ">")),
        symbol("=").value(with_value(Operator::Equal, "=")),
    ));
    let words = alt((
        keyword("contains").value(with_value(Operator::Contains, "contains")),
        preceded(keyword("starts"), cut_err(keyword("with").context(Expected::With { after: "starts" })))
            .value(with_value(Operator::StartsWith, "starts with")),
        preceded(keyword("ends"), cut_err(keyword("with").context(Expected::With { after: "ends" })))
            .value(with_value(Operator::EndsWith, "ends with")),
        keyword("in").value(Comparison::In),
        is,
    ));
    alt((symbols, words)).parse_next(input)
}

/// The parenthesised values of `in`.
fn list<'a>(input: &mut Input<'a>) -> ParseResult<'a, Vec<Constant>> {
    cut_err(symbol("(").context(Expected::ListStart)).parse_next(input)?;
    let values = separated(1.., cut_err(value.context(Expected::ListValue)), symbol(",")).parse_next(input)?;
    cut_err(symbol(")").context(Expected::ListNext)).parse_next(input)?;
    Ok(values)
}

fn value<'a>(input: &mut Input<'a>) -> ParseResult<'a, Constant> {
    terminated(
        alt((quoted.map(|text| Constant::new(&text)), take_while(1.., is_word_char).map(Constant::new))),
        multispace0,
    )
    .parse_next(input)
}

/// A string in single or double quotes; the quote character doubled stands for itself.
fn quoted<'a>(input: &mut Input<'a>) -> ParseResult<'a, String> {
    let opened = input.len();
    let quote = one_of(['\'', '"']).parse_next(input)?;
    let text = repeat(0.., alt((take_till(1.., quote), terminated(quote.take(), quote))))
        .fold(String::new, |mut text, piece: &str| {
            text.push_str(piece);
            text
        })
        .parse_next(input)?;
    cut_err(quote.context(Expected::ClosingQuote { quote, remaining: opened })).parse_next(input)?;
    Ok(text)
}

// ---------------------------------------------------------------------------------------------
// Filters of record lists
// ---------------------------------------------------------------------------------------------

/// A `FIELD=VALUE` filter named a field that records of its kind do not have.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{} have no field `{field}`", kind.plural())]
pub struct UnknownField {
    pub kind: Kind,
    pub field: String,
}

impl Query {
    /// The query `FIELD = 'VALUE' and …` over records of `kind`: what the APIs' list filters
    /// (`?FIELD=VALUE&…`) mean, so a filter and a set's query agree on what matches. A field is
    /// named exactly as in `kind`'s field table, or `custom.NAME` for a kind with custom fields;
    /// a value is taken whole, never parsed. `None` when there is no filter: every record
    /// matches.
    pub fn equals_all(kind: Kind, filters: &[(String, String)]) -> Result<Option<Query>, UnknownField> {
        let mut conditions = Vec::with_capacity(filters.len());
        for (name, value) in filters {
            let field = match kind.field(name) {
                Some(spec) => FieldRef::Named(spec.name),
                None if crate::model::is_custom(name) && kind.field("custom").is_some() => {
                    FieldRef::Custom(name.as_str().into())
                }
                None => return Err(UnknownField { kind, field: name.clone() }),
            };
            conditions.push(Node::Condition(Condition { field, operator: Operator::Equal(Constant::new(value)) }));
        }
        let root = match conditions.len() {
            0 => return Ok(None),
            1 => conditions.remove(0),
            _ => Node::All(conditions),
        };
        Ok(Some(Query { text: root.to_string(), root }))
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use proptest::prelude::*;

    use super::*;
    use crate::model::Field;

    fn text(value: &str) -> Value {
        Value::Str(value.to_owned())
    }

    fn list(elements: &[&str]) -> Value {
        Value::List(elements.iter().map(|element| element.to_string()).collect())
    }

    fn contact(pairs: Vec<(&str, Value)>) -> Fields {
        pairs.into_iter().map(|(name, value)| (name.to_owned(), Field { value, stamp: 1 })).collect()
    }

    /// A contact with most fields set, lists and custom fields included.
    fn jane() -> Fields {
        contact(vec![
            ("first_name", text("Jane")),
            ("last_name", text("O'Brien")),
            ("company", text("Hudson Valley Farms")),
            ("city", text("Albany")),
            ("state", text("NY")),
            ("zip", text("12207")),
            ("email", text("jane@hudson.example")),
            ("access", text("limited")),
            ("access_users", list(&["jdoe", "asmith"])),
            ("access_teams", list(&["sales"])),
            ("custom.source", text("Web")),
            ("custom.score", text("42")),
        ])
    }

    /// A sparser contact: empty lists, a cleared city, no custom fields.
    fn bob() -> Fields {
        contact(vec![
            ("first_name", text("Bob")),
            ("city", Value::Null),
            ("state", text("MA")),
            ("zip", text("02108")),
            ("access_users", list(&[])),
        ])
    }

    fn parse(query: &str) -> Query {
        Query::parse(query).unwrap_or_else(|error| panic!("{query:?} should parse: {error}"))
    }

    fn holds(query: &str, fields: &Fields) -> bool {
        parse(query).matches(fields)
    }

    fn refused(query: &str) -> QueryError {
        match Query::parse(query) {
            Ok(parsed) => panic!("{query:?} should be refused, parsed as {parsed}"),
            Err(error) => error,
        }
    }

    #[test]
    fn equality_ignores_ascii_case_and_accepts_every_way_of_writing_a_value() {
        let jane = jane();
        for query in ["state = NY", "state = ny", "STATE = 'Ny'", "state = \"nY\"", "State=NY", "  state\t=\nNY  "] {
            assert!(holds(query, &jane), "{query}");
        }
        assert!(!holds("state = NJ", &jane));
        assert!(!holds("state = 'NY '", &jane), "spaces inside quotes are part of the value");
        assert!(holds("last_name = 'o''brien'", &jane), "a doubled quote stands for itself");
        assert!(holds("last_name = \"O'Brien\"", &jane));
        assert!(holds("company = 'hudson valley farms'", &jane));
        assert!(holds("email = jane@hudson.example", &jane), "e-mail addresses need no quotes");
        assert!(holds("email ends with @HUDSON.example", &jane));
        assert!(holds("email = 'JANE@HUDSON.EXAMPLE'", &jane));
    }

    #[test]
    fn every_text_comparison_on_a_realistic_contact() {
        let jane = jane();
        let cases = [
            ("city != Boston", true),
            ("city != albany", false),
            ("city contains LBA", true),
            ("city contains bany", true),
            ("city contains boston", false),
            ("city starts with 'Al'", true),
            ("city starts with bany", false),
            ("city ends with ANY", true),
            ("city ends with 'Al'", false),
            ("city in (Boston, ALBANY, Troy)", true),
            ("city in (Boston)", false),
            ("city is empty", false),
            ("city is not empty", true),
            ("city < boston", true),
            ("city <= albany", true),
            ("city > albany", false),
            ("city >= ALBANY", true),
            ("company contains 'valley f'", true),
        ];
        for (query, expected) in cases {
            assert_eq!(holds(query, &jane), expected, "{query}");
        }
    }

    #[test]
    fn ordering_is_numeric_when_both_sides_are_numbers_and_textual_otherwise() {
        let jane = jane();
        let bob = bob();
        // "42" > "9" only as numbers; as text "4" sorts before "9".
        assert!(holds("custom.score > 9", &jane));
        assert!(holds("custom.score > '9'", &jane), "quoting a number does not make it text");
        assert!(holds("custom.score < 100", &jane));
        assert!(holds("custom.score >= 42.0 and custom.score <= +42", &jane));
        // `=` compares text, so leading zeros matter there but not in an ordering.
        assert!(!holds("zip = 2108", &bob));
        assert!(holds("zip >= 2108 and zip <= 2108", &bob));
        assert!(holds("zip < 12207", &bob));
        // Against a word, a number compares as text.
        assert!(holds("zip < a", &bob));
        assert!(holds("city > 9", &jane));
        let numbers = contact(vec![
            ("title", text("-3.5")),
            ("phone", text("12345678901234567890123")),
            ("mobile", text("0.50")),
        ]);
        assert!(holds("title < -3", &numbers));
        assert!(holds("title > -3.50001", &numbers));
        assert!(holds("title <= -3.50 and title >= -3.5", &numbers));
        assert!(holds("phone > 12345678901234567890122", &numbers), "exact beyond 64-bit and f64 precision");
        assert!(holds("phone < 12345678901234567890124", &numbers));
        assert!(holds("mobile >= .5 or mobile >= 0.5", &numbers));
        assert!(holds("mobile > 0.499 and mobile < 0.5001", &numbers));
    }

    #[test]
    fn missing_null_and_empty_fields_count_as_the_empty_string() {
        let bob = bob();
        let nobody = Fields::new();
        let blank = contact(vec![("city", text("")), ("custom", Value::Null)]);
        for fields in [&bob, &nobody, &blank] {
            let cases = [
                ("city is empty", true),
                ("city = ''", true),
                ("city = \"\"", true),
                ("city is not empty", false),
                ("city != ''", false),
                ("city != Albany", true),
                ("city = Albany", false),
                ("city < b", true),
                ("city > b", false),
                ("city contains ''", true),
                ("city contains a", false),
                ("city in (Albany, '')", true),
                ("custom.source is empty", true),
                ("custom.source != web", true),
                ("title is empty", true),
            ];
            for (query, expected) in cases {
                assert_eq!(holds(query, fields), expected, "{query} on {fields:?}");
            }
        }
        assert!(holds("custom.missing is empty", &jane()), "a key absent from the custom map is empty");
    }

    #[test]
    fn list_fields_compare_by_membership() {
        let jane = jane();
        let bob = bob();
        let cases = [
            ("access_users = JDOE", true, false),
            ("access_users contains jdoe", true, false),
            ("access_users contains jd", false, false),
            ("access_users != jdoe", false, true),
            ("access_users != nobody", true, true),
            ("access_users in (nobody, asmith)", true, false),
            ("access_users starts with 'as'", true, false),
            ("access_users ends with doe", true, false),
            ("access_users is empty", false, true),
            ("access_users = ''", false, true),
            ("access_users is not empty", true, false),
            ("access_teams = sales and access_users = asmith", true, false),
            ("access_teams is empty", false, true),
        ];
        for (query, on_jane, on_bob) in cases {
            assert_eq!(holds(query, &jane), on_jane, "{query} on jane");
            assert_eq!(holds(query, &bob), on_bob, "{query} on bob");
        }
    }

    #[test]
    fn booleans_and_integers_compare_as_their_text() {
        // No contact field holds these shapes today; a query must still read them sensibly.
        let fields = contact(vec![("title", Value::Bool(true)), ("zip", Value::Int(-12207)), ("phone", Value::Int(0))]);
        assert!(holds("title = TRUE", &fields));
        assert!(holds("title != false", &fields));
        assert!(!holds("title is empty", &fields));
        assert!(holds("zip = -12207", &fields));
        assert!(holds("zip < -12206 and zip > -12208", &fields));
        assert!(holds("zip starts with '-12'", &fields));
        assert!(holds("phone = 0 and phone is not empty", &fields));
        let minimum = contact(vec![("zip", Value::Int(i64::MIN))]);
        assert!(holds("zip = -9223372036854775808", &minimum));
    }

    #[test]
    fn custom_fields_read_the_custom_map_with_exact_keys() {
        let jane = jane();
        assert!(holds("custom.source = web", &jane));
        assert!(holds("CUSTOM.source = WEB", &jane), "the `custom` prefix is a field name, so case-insensitive");
        assert!(holds("custom.Source is empty", &jane), "custom keys are compared exactly");
        assert!(holds("custom.source in (web, fair)", &jane));
        assert!(!holds("custom.source in (fair, 'trade show')", &jane));
        assert!(holds("custom.score-2 is empty and custom.x_y is empty", &jane));
    }

    #[test]
    fn not_binds_tighter_than_and_which_binds_tighter_than_or() {
        let same = |a: &str, b: &str| assert_eq!(parse(a).root, parse(b).root, "{a} should read as {b}");
        let different = |a: &str, b: &str| assert_ne!(parse(a).root, parse(b).root, "{a} should not read as {b}");
        same("state = NY or city = Albany and zip = 1", "state = NY or (city = Albany and zip = 1)");
        different("state = NY or city = Albany and zip = 1", "(state = NY or city = Albany) and zip = 1");
        same("not state = NY and city = Albany", "(not state = NY) and city = Albany");
        same("not state = NY or city = Albany", "(not state = NY) or city = Albany");
        same("not not state = NY", "not (not (state = NY))");
        same("((state = NY))", "state = NY");

        // And the evaluation agrees: Jane is in NY and Albany, not in zip 1.
        let jane = jane();
        assert!(holds("state = NY or city = Boston and zip = 1", &jane));
        assert!(!holds("(state = NY or city = Boston) and zip = 1", &jane));
        assert!(!holds("not state = NY or city = Boston", &jane));
        assert!(holds("not (state = MA or city = Boston)", &jane));
        assert!(!holds("not state = MA and not city = Albany", &jane));
        assert!(holds("not not state = ny", &jane));
    }

    #[test]
    fn keywords_are_case_insensitive_and_whole_words() {
        let jane = jane();
        assert!(holds(
            "STATE = ny AND (City STARTS WITH al OR Custom.source IN (web, fair)) AND NOT zip IS EMPTY",
            &jane
        ));
        assert!(holds("zip Is Not Empty and city CONTAINS ban and city Ends With ANY", &jane));
        // `andrew` is a value, not `and` followed by `rew`.
        assert!(!holds("first_name = andrew", &jane));
        let error = refused("state = NY andcity = Albany");
        assert_eq!((error.position, error.found.as_str()), (12, "\"andcity\""));
        // Keywords are fine as values where a value is expected.
        assert!(holds("city != and", &jane));
    }

    #[test]
    fn display_is_canonical_and_parses_back() {
        let cases = [
            ("state = NY", "state = 'ny'"),
            (
                "STATE = ny AND (City STARTS WITH Al OR custom.source IN (web, \"trade fair\"))",
                "state = 'ny' and (city starts with 'al' or custom.source in ('web', 'trade fair'))",
            ),
            ("last_name = \"O'Brien\"", "last_name = 'o''brien'"),
            ("not (zip = 1)", "not zip = '1'"),
            ("NOT NOT (city Is Empty)", "not not city is empty"),
            ("Custom.Source In (A)", "custom.Source in ('a')"),
            ("(state = a or state = b) or state = c", "(state = 'a' or state = 'b') or state = 'c'"),
            ("not (state = a and zip is empty)", "not (state = 'a' and zip is empty)"),
            ("zip is not empty and zip != 5 and zip <= -1.5", "zip is not empty and zip != '5' and zip <= '-1.5'"),
        ];
        for (query, canonical) in cases {
            let query = parse(query);
            assert_eq!(query.to_string(), canonical);
            assert_eq!(parse(canonical).root, query.root, "{canonical} reads back the same");
            assert_eq!(parse(canonical).to_string(), canonical);
        }
        let query = parse("  State = NY ");
        assert_eq!(query.text(), "  State = NY ", "the text is kept as written");
        assert_eq!("state = ny".parse::<Query>().map(|query| query.root), Ok(query.root));
    }

    #[test]
    fn errors_give_the_position_what_was_expected_and_what_was_found() {
        let error = refused("state NY");
        assert_eq!(
            error.to_string(),
            "at 7: expected a comparison (=, !=, <, <=, >, >=, contains, starts with, ends with, in, is empty, \
             is not empty) after \"state\", found \"NY\""
        );

        let error = refused("state = NY and nickname = Bo");
        assert_eq!(error.position, 16);
        assert_eq!(error.found, "\"nickname\"");
        assert!(error.expected.starts_with("a contact field (first_name, last_name, company,"), "{error}");
        assert!(error.expected.contains("access_teams) or custom.NAME"), "{error}");
        assert!(!error.expected.contains("custom,"), "`custom` alone is not a field: {error}");

        let error = refused("state =");
        assert_eq!((error.position, error.found.as_str()), (8, "the end of the query"));
        assert!(error.expected.starts_with("a value after \"=\""), "{error}");

        let error = refused("(state = NY or city = Albany");
        assert_eq!(error.position, 29);
        assert_eq!(error.expected, "\"and\", \"or\" or the \")\" that closes the \"(\" at 1");

        let error = refused("state = NY city = Albany");
        assert_eq!(error.to_string(), "at 12: expected \"and\", \"or\" or the end of the query, found \"city\"");

        let error = refused("city = New York");
        assert_eq!(
            error.to_string(),
            "at 12: expected \"and\", \"or\" or the end of the query (a value with spaces or quotes must be \
             quoted, as in 'New York' or 'O''Brien'), found \"York\""
        );
        let error = refused("(city = 'O'Brien')");
        assert_eq!(error.position, 12);
        assert!(
            error.expected.ends_with(
                "closes the \"(\" at 1 (a value with spaces or quotes must be quoted, as in 'New York' or 'O''Brien')"
            ),
            "{error}"
        );

        let error = refused("city not in (Albany, Troy)");
        assert_eq!(error.position, 6);
        assert!(error.expected.ends_with("; to negate a condition, put \"not\" before it: not city …"), "{error}");

        let error = refused("state = NY)");
        assert_eq!((error.position, error.found.as_str()), (11, "\")\""));

        let error = refused("state == NY");
        assert_eq!((error.position, error.found.as_str()), (8, "\"=\""));
        assert!(error.expected.starts_with("a value after \"=\""), "{error}");

        let error = refused("state ~ NY");
        assert_eq!((error.position, error.found.as_str()), (7, "\"~\""));
        assert!(error.expected.starts_with("a comparison"), "{error}");

        let error = refused("city starts 'Al'");
        assert_eq!(error.to_string(), "at 13: expected \"with\" after \"starts\", found \"'\"");

        let error = refused("city is full");
        assert_eq!(error.to_string(), "at 9: expected \"empty\" or \"not empty\" after \"is\", found \"full\"");

        let error = refused("city is not there");
        assert_eq!(error.to_string(), "at 13: expected \"empty\" after \"is not\", found \"there\"");

        let error = refused("city in Albany");
        assert_eq!(error.position, 9);
        assert!(error.expected.starts_with("\"(\" and a list of values after \"in\""), "{error}");

        let error = refused("city in (Albany, Troy");
        assert_eq!(
            error.to_string(),
            "at 22: expected \",\" or \")\" after a value in the list, found the end of the query"
        );

        let error = refused("city in ()");
        assert_eq!((error.position, error.found.as_str()), (10, "\")\""));

        let error = refused("city = 'Albany");
        assert_eq!(error.position, 15);
        assert_eq!(error.expected, "the closing ' of the string that starts at 8 (write '' for a ' inside it)");

        let error = refused("custom = web");
        assert_eq!((error.position, error.found.as_str()), (8, "\"=\""));
        assert!(error.expected.contains("custom.source"), "{error}");
        let error = refused("custom. = web");
        assert_eq!(error.position, 8);
        assert!(error.expected.starts_with("a custom field name (A-Z, a-z, 0-9, _ and -) after \"custom.\""));
        let error = refused("custom.a.b = web");
        assert_eq!((error.position, error.found.as_str()), (8, "\"a.b\""));

        let error = refused("");
        assert_eq!((error.position, error.found.as_str()), (1, "the end of the query"));
        assert!(error.expected.starts_with("a condition"), "{error}");
        let error = refused("state = NY and ");
        assert_eq!((error.position, error.found.as_str()), (16, "the end of the query"));
        let error = refused("= NY");
        assert_eq!((error.position, error.found.as_str()), (1, "\"=\""));
    }

    #[test]
    fn positions_count_characters_not_bytes() {
        let error = refused("city = 'Zürich' and stat = x");
        assert_eq!(error.position, 21);
        assert_eq!(error.found, "\"stat\"");
        // Bare values take letters of any alphabet.
        assert!(holds("city = Zürich", &contact(vec![("city", text("zürich"))])));
        assert!(!holds("city = Zürich", &contact(vec![("city", text("ZÜRICH"))])), "only ASCII case is folded");
    }

    #[test]
    fn length_and_nesting_are_limited() {
        assert_eq!(Kind::Set.field("query").map(|spec| spec.ty), Some(FieldType::Text(MAX_QUERY_LEN)));

        let padding = " ".repeat(MAX_QUERY_LEN - "state = NY".len());
        assert!(Query::parse(&format!("state = NY{padding}")).is_ok());
        let error = refused(&format!("state = NY{padding}x"));
        assert_eq!(error.position, MAX_QUERY_LEN + 1);
        assert!(error.expected.contains("at most 4096 bytes long and this one has 4097 bytes"), "{error}");

        let nested = |depth: usize| format!("{}state = NY{}", "(".repeat(depth), ")".repeat(depth));
        assert!(holds(&nested(MAX_NESTING), &jane()));
        let error = refused(&nested(MAX_NESTING + 1));
        assert_eq!((error.position, error.found.as_str()), (MAX_NESTING + 1, "\"(\""));
        assert!(error.expected.contains("nested at most 64 deep"), "{error}");

        let negated = |depth: usize| format!("{}state = NY", "not ".repeat(depth));
        assert!(holds(&negated(MAX_NESTING), &jane()), "64 is even, so the negations cancel");
        let error = refused(&negated(MAX_NESTING + 1));
        assert_eq!(error.position, 4 * MAX_NESTING + 1);

        // Long chains of `and` and `or` are flat, not nested, so they are not limited by depth.
        let chain = vec!["city != x"; 200].join(" and ");
        assert!(holds(&chain, &jane()));
    }

    #[test]
    fn decimals_are_normalised_and_compared_exactly() {
        fn parts(text: &str) -> Option<(bool, &str, &str)> {
            Decimal::parse(text).map(|decimal| (decimal.negative, decimal.integer, decimal.fraction))
        }
        assert_eq!(parts("007.500"), Some((false, "7", "5")));
        assert_eq!(parts("-0.0"), Some((false, "", "")));
        assert_eq!(parts("+12"), Some((false, "12", "")));
        for not_a_number in ["", "-", ".5", "5.", "1e3", "1,000", "0x10", " 1", "1.2.3", "NaN", "inf", "--1"] {
            assert_eq!(parts(not_a_number), None, "{not_a_number:?}");
        }
        let order = |a: &str, b: &str| Decimal::parse(a).unwrap().compare(&Decimal::parse(b).unwrap());
        assert_eq!(order("0", "-0"), Ordering::Equal);
        assert_eq!(order("-2", "-10"), Ordering::Greater);
        assert_eq!(order("0.45", "0.5"), Ordering::Less);
        assert_eq!(order("10", "9.99"), Ordering::Greater);
        assert_eq!(order("-1", "0"), Ordering::Less);
        let mut buffer = [0u8; 20];
        assert_eq!(int_text(i64::MIN, &mut buffer), "-9223372036854775808");
        assert_eq!(int_text(0, &mut buffer), "0");
        assert_eq!(int_text(907, &mut buffer), "907");
    }

    /// Not a benchmark, but a guard on the order of magnitude, with the cost printed for
    /// `cargo test --release --lib query::tests::evaluation_cost -- --nocapture`.
    #[test]
    fn evaluation_cost() {
        let query = parse("state = NY and (city starts with 'Al' or custom.source in (web, fair))");
        let buffalo = contact(vec![("city", text("Buffalo")), ("state", text("NY")), ("custom.source", text("fair"))]);
        let contacts = [jane(), bob(), buffalo, Fields::new()];
        let rounds = 100_000;
        let started = Instant::now();
        let mut matched = 0;
        for _ in 0..rounds {
            for fields in &contacts {
                if query.matches(std::hint::black_box(fields)) {
                    matched += 1;
                }
            }
        }
        let elapsed = started.elapsed();
        let evaluations = rounds * contacts.len();
        println!(
            "{evaluations} evaluations in {elapsed:?}: {:.0} ns per evaluation",
            elapsed.as_nanos() as f64 / evaluations as f64
        );
        assert_eq!(matched, 2 * rounds, "jane and buffalo match, bob and the empty contact do not");
    }

    // Property tests: random query trees and random contacts.

    fn words() -> impl Strategy<Value = String> {
        prop_oneof![
            prop::sample::select(vec![
                "NY",
                "ny",
                "Albany",
                "al",
                "",
                "12",
                "012",
                "-3.5",
                "web",
                "fair",
                "O'Brien",
                "say \"hi\"",
                "jdoe",
                "true",
                "New York",
                "zürich",
                "and",
                "(",
            ])
            .prop_map(str::to_owned),
            "[a-zA-Z0-9 '\"._()-]{0,5}",
        ]
    }

    fn constants() -> impl Strategy<Value = Constant> {
        words().prop_map(|word| Constant::new(&word))
    }

    fn fields_refs() -> impl Strategy<Value = FieldRef> {
        prop::sample::select(vec![
            FieldRef::Named("city"),
            FieldRef::Named("state"),
            FieldRef::Named("zip"),
            FieldRef::Named("access_users"),
            FieldRef::Custom("custom.source".into()),
            FieldRef::Custom("custom.score".into()),
        ])
    }

    fn operators() -> impl Strategy<Value = Operator> {
        prop_oneof![
            constants().prop_map(Operator::Equal),
            constants().prop_map(Operator::NotEqual),
            constants().prop_map(Operator::Less),
            constants().prop_map(Operator::LessOrEqual),
            constants().prop_map(Operator::Greater),
            constants().prop_map(Operator::GreaterOrEqual),
            constants().prop_map(Operator::Contains),
            constants().prop_map(Operator::StartsWith),
            constants().prop_map(Operator::EndsWith),
            prop::collection::vec(constants(), 1..4).prop_map(Operator::In),
            Just(Operator::IsEmpty),
            Just(Operator::IsNotEmpty),
        ]
    }

    fn trees() -> impl Strategy<Value = Node> {
        let condition =
            (fields_refs(), operators()).prop_map(|(field, operator)| Node::Condition(Condition { field, operator }));
        condition.prop_recursive(4, 32, 4, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 2..4).prop_map(Node::All),
                prop::collection::vec(inner.clone(), 2..4).prop_map(Node::Any),
                inner.prop_map(|node| Node::Not(Box::new(node))),
            ]
        })
    }

    fn values() -> impl Strategy<Value = Value> {
        prop_oneof![
            Just(Value::Null),
            words().prop_map(Value::Str),
            any::<bool>().prop_map(Value::Bool),
            (-20i64..20).prop_map(Value::Int),
            prop::collection::vec(words(), 0..3).prop_map(Value::List),
        ]
    }

    fn contacts() -> impl Strategy<Value = Fields> {
        let names = prop::sample::select(vec!["city", "state", "zip", "access_users"]);
        let custom = prop::collection::btree_map(prop::sample::select(vec!["source", "score"]), words(), 0..3);
        (prop::collection::vec((names, values()), 0..5), prop::option::of(custom)).prop_map(|(pairs, custom)| {
            let mut fields: Fields =
                pairs.into_iter().map(|(name, value)| (name.to_owned(), Field { value, stamp: 1 })).collect();
            for (key, text) in custom.into_iter().flatten() {
                fields.insert(format!("custom.{key}"), Field { value: Value::Str(text), stamp: 1 });
            }
            fields
        })
    }

    /// Fragments that, strung together, make mostly-wrong queries that reach deep into the parser.
    fn token_soup() -> impl Strategy<Value = String> {
        let token = prop::sample::select(vec![
            "state",
            "city",
            "custom.source",
            "custom",
            "=",
            "!=",
            "<",
            ">=",
            "in",
            "(",
            ")",
            ",",
            "and",
            "or",
            "not",
            "is",
            "empty",
            "starts",
            "with",
            "contains",
            "'x'",
            "\"y\"",
            "NY",
            "'",
            "\"",
            "12",
            "-3.5",
            "é",
            " ",
        ]);
        prop::collection::vec(token, 0..16).prop_map(|tokens| tokens.join(" "))
    }

    #[test]
    fn list_filters_are_equalities_of_the_query_language() {
        let filters = |pairs: &[(&str, &str)]| -> Vec<(String, String)> {
            pairs.iter().map(|(name, value)| (name.to_string(), value.to_string())).collect()
        };
        let query = Query::equals_all(Kind::Contact, &filters(&[("state", "NY"), ("city", "New York")])).unwrap();
        let query = query.unwrap();
        assert_eq!(query.root, Query::parse("state = NY and city = 'New York'").unwrap().root);
        assert_eq!(query.text(), "state = 'ny' and city = 'new york'");
        let custom = Query::equals_all(Kind::Contact, &filters(&[("custom.source", "Web")])).unwrap().unwrap();
        assert_eq!(custom.root, Query::parse("custom.source = web").unwrap().root);
        assert_eq!(Query::equals_all(Kind::Contact, &[]), Ok(None));

        // Any kind's fields, not only a contact's; strings compare without regard to case.
        let company = Query::equals_all(Kind::Company, &filters(&[("name", "acme")])).unwrap().unwrap();
        assert!(company.matches(&contact(vec![("name", text("ACME"))])));
        assert!(!company.matches(&contact(vec![("name", text("Acme Two"))])));
        // An empty value matches a missing field.
        let unset = Query::equals_all(Kind::Company, &filters(&[("industry", "")])).unwrap().unwrap();
        assert!(unset.matches(&contact(vec![("name", text("ACME"))])));

        let error = Query::equals_all(Kind::Company, &filters(&[("colour", "red")])).unwrap_err();
        assert_eq!(error, UnknownField { kind: Kind::Company, field: "colour".into() });
        assert_eq!(error.to_string(), "companies have no field `colour`");
        // A kind without custom fields has no `custom.NAME` either.
        assert!(Query::equals_all(Kind::Team, &filters(&[("custom.source", "web")])).is_err());
    }

    proptest! {
        #[test]
        fn printed_trees_parse_back_to_queries_that_answer_the_same(
            tree in trees(),
            contacts in prop::collection::vec(contacts(), 1..8),
        ) {
            let printed = tree.to_string();
            let query = Query::parse(&printed).map_err(|error| TestCaseError::fail(format!("{printed}: {error}")))?;
            prop_assert_eq!(&query.root, &tree, "{}", printed);
            prop_assert_eq!(query.to_string(), printed.clone());
            for fields in &contacts {
                prop_assert_eq!(query.matches(fields), tree.matches(fields), "{} on {:?}", printed, fields);
            }
        }

        #[test]
        fn any_text_parses_or_is_refused_at_a_position_inside_it(text in prop_oneof!["\\PC{0,40}", token_soup()]) {
            match Query::parse(&text) {
                Ok(query) => {
                    let again = Query::parse(&query.to_string());
                    prop_assert_eq!(again.map(|again| again.root), Ok(query.root));
                }
                Err(error) => {
                    prop_assert!(error.position >= 1 && error.position <= text.chars().count() + 1, "{}", error);
                    prop_assert!(!error.expected.is_empty() && !error.found.is_empty());
                }
            }
        }
    }
}
