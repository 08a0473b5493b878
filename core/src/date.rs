//! Dates and date-times as the date fields take them (a note's or a history's `date`, an
//! activity's `due`): ISO 8601 in its common forms, checked against the calendar. They stay
//! text: what is checked is only that they mean a real day and time, so that every copy can
//! compare and sort them.
//!
//! Accepted:
//! - `YYYY-MM-DD`
//! - `YYYY-MM-DDTHH:MM`, `…THH:MM:SS`, `…THH:MM:SS.fff` (1 to 9 digits of fraction)
//! - each date-time with a zone, `Z` or `+HH:MM` / `-HH:MM`, or without one (local time)
//!
//! Months are 01-12, days within their month (29 February only in leap years), hours 00-23,
//! minutes and seconds 00-59.
//!
//! Architecture invariant: no IO.

/// The accepted forms, as error messages and documentation name them.
pub const FORMS: &str =
    "a date YYYY-MM-DD, or a date and time YYYY-MM-DDTHH:MM[:SS[.fff]] with an optional Z or ±HH:MM";

/// A regular expression of the same forms, for JSON Schema (it cannot check the calendar:
/// 2025-02-30 passes it, but not [`is_valid`]).
pub const PATTERN: &str = concat!(
    r"^[0-9]{4}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])",
    r"(T([01][0-9]|2[0-3]):[0-5][0-9](:[0-5][0-9](\.[0-9]{1,9})?)?(Z|[+-]([01][0-9]|2[0-3]):[0-5][0-9])?)?$"
);

/// Whether `text` is a date or a date-time of the accepted forms, on a real calendar day.
pub fn is_valid(text: &str) -> bool {
    let mut r = Reader(text.as_bytes());
    let date_ok = (|| {
        let year = r.number(4)?;
        r.byte(b'-')?;
        let month = r.number(2)?;
        r.byte(b'-')?;
        let day = r.number(2)?;
        ((1..=12).contains(&month) && (1..=days_in_month(year, month)).contains(&day)).then_some(())
    })();
    if date_ok.is_none() {
        return false;
    }
    if r.0.is_empty() {
        return true;
    }
    let time_ok = (|| {
        r.byte(b'T')?;
        r.hours_minutes()?;
        if r.byte(b':').is_some() {
            (r.number(2)? < 60).then_some(())?;
            if r.byte(b'.').is_some() {
                let digits = r.0.iter().take_while(|b| b.is_ascii_digit()).count();
                (1..=9).contains(&digits).then_some(())?;
                r.0 = &r.0[digits..];
            }
        }
        match r.0.first() {
            None => Some(()),
            Some(b'Z') => {
                r.0 = &r.0[1..];
                Some(())
            }
            Some(b'+' | b'-') => {
                r.0 = &r.0[1..];
                r.hours_minutes()
            }
            Some(_) => None,
        }
    })();
    time_ok.is_some() && r.0.is_empty()
}

/// The UTC calendar day of `ms` milliseconds since the Unix epoch, as `YYYY-MM-DD`: how the
/// services name a day in messages (an expiry date).
pub fn utc_day(ms: u64) -> String {
    // Days since 1970-01-01, counted from 0000-03-01 so a leap day ends each 4-year cycle.
    let days = (ms / 86_400_000) as i64 + 719_468;
    let era = days.div_euclid(146_097);
    let doe = days - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}")
}

/// The UTC minute of `ms`, as `YYYY-MM-DD HH:MM`: how the command line shows a time.
pub fn utc_minute(ms: u64) -> String {
    let minutes = ms / 60_000 % 1440;
    format!("{} {:02}:{:02}", utc_day(ms), minutes / 60, minutes % 60)
}

fn is_leap(year: u32) -> bool {
    year.is_multiple_of(4) && (!year.is_multiple_of(100) || year.is_multiple_of(400))
}

fn days_in_month(year: u32, month: u32) -> u32 {
    match month {
        2 if is_leap(year) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// What is left of the text being read.
struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn byte(&mut self, want: u8) -> Option<()> {
        let (first, rest) = self.0.split_first()?;
        (*first == want).then(|| self.0 = rest)
    }

    /// Exactly `digits` ASCII digits.
    fn number(&mut self, digits: usize) -> Option<u32> {
        let head = self.0.get(..digits)?;
        if !head.iter().all(u8::is_ascii_digit) {
            return None;
        }
        self.0 = &self.0[digits..];
        Some(head.iter().fold(0, |n, d| n * 10 + u32::from(d - b'0')))
    }

    /// `HH:MM` of a time or a zone offset.
    fn hours_minutes(&mut self) -> Option<()> {
        let hours = self.number(2)?;
        self.byte(b':')?;
        let minutes = self.number(2)?;
        (hours < 24 && minutes < 60).then_some(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_day_names_the_calendar_day() {
        for (ms, day) in [
            (0, "1970-01-01"),
            (86_399_999, "1970-01-01"),
            (86_400_000, "1970-01-02"),
            (951_782_400_000, "2000-02-29"),
            (1_795_737_600_000, "2026-11-27"),
            (1_798_761_599_999, "2026-12-31"),
            (1_798_761_600_000, "2027-01-01"),
            (1_835_395_200_000, "2028-02-29"),
        ] {
            assert_eq!(utc_day(ms), day, "{ms}");
            assert!(is_valid(&utc_day(ms)));
        }
        assert_eq!(utc_minute(1_795_737_600_000 + 13 * 3_600_000 + 5 * 60_000 + 59_999), "2026-11-27 13:05");
        assert_eq!(utc_minute(0), "1970-01-01 00:00");
    }

    #[test]
    fn the_accepted_forms_pass() {
        for ok in [
            "2026-11-27",
            "2026-11-27T09:30",
            "2026-11-27T09:30:15",
            "2026-11-27T09:30:15.5",
            "2026-11-27T09:30:15.123456789",
            "2026-11-27T23:59:59Z",
            "2026-11-27T00:00+01:00",
            "2026-11-27T00:00:00-05:30",
            "0001-01-01",
            "9999-12-31T23:59:59.999Z",
        ] {
            assert!(is_valid(ok), "{ok} should pass");
        }
    }

    #[test]
    fn the_calendar_is_checked() {
        assert!(is_valid("2024-02-29"), "2024 is a leap year");
        assert!(is_valid("2000-02-29"), "2000 is a leap year (divisible by 400)");
        assert!(!is_valid("2025-02-29"), "2025 is not a leap year");
        assert!(!is_valid("1900-02-29"), "1900 is not a leap year (divisible by 100)");
        assert!(!is_valid("2026-04-31"), "April has 30 days");
        assert!(is_valid("2026-01-31") && is_valid("2026-12-31"));
        for bad in ["2026-00-10", "2026-13-01", "2026-01-00", "2026-01-32"] {
            assert!(!is_valid(bad), "{bad} should fail");
        }
        for bad in ["2026-01-01T24:00", "2026-01-01T12:60", "2026-01-01T12:00:60", "2026-01-01T12:00+24:00"] {
            assert!(!is_valid(bad), "{bad} should fail");
        }
    }

    #[test]
    fn anything_else_fails() {
        for bad in [
            "",
            "tomorrow",
            "27.11.2026",
            "11/27/2026",
            "2026-1-5",
            "26-11-27",
            "2026-11-27 09:30",
            "2026-11-27T",
            "2026-11-27T9:30",
            "2026-11-27T09",
            "2026-11-27T09:30:1",
            "2026-11-27T09:30:15.",
            "2026-11-27T09:30:15.1234567890",
            "2026-11-27T09:30Zjunk",
            "2026-11-27T09:30+0100",
            "2026-11-27T09:30+01",
            "2026-11-27x",
            "２０２６-11-27",
            "+2026-11-27",
        ] {
            assert!(!is_valid(bad), "{bad:?} should fail");
        }
    }
}
