//! A remote's synchronization schedule, as classic desktop CRMs offered it for their remote
//! copies: all the time (the default), or once an hour, a day or a week at a set time, for a
//! copy that should not sync during working hours or pays for its link by the minute.
//!
//! The schedule is a decision like the others here: given the time now, [`Schedule::next_after`]
//! says when to sync next, and the services do the waiting. Times are UTC: the core has no
//! time-zone data (it does no IO, so it cannot read the system's). A user who means 09:30 local
//! time writes it in UTC, and a schedule does not move with daylight-saving time.
//!
//! Text forms, read case-insensitively (surrounding spaces ignored) and written in lower case:
//! - `continuous`
//! - `hourly` (at minute 00) and `hourly:MM`, e.g. `hourly:15`
//! - `daily@HH:MM`, e.g. `daily@09:30`
//! - `weekly@DAY@HH:MM`, DAY one of `mon` … `sun` (or `monday` … `sunday`), e.g.
//!   `weekly@fri@17:00`
//!
//! The hour may be written with one digit (`daily@9:30`), the minute always takes two, so that
//! `9:5` is not silently read as 09:05 or 09:50.
//!
//! Architecture invariant: no IO.

use std::fmt;
use std::str::FromStr;

/// The accepted forms, as error messages and `--help` name them.
pub const FORMS: &str = "continuous, hourly, hourly:MM, daily@HH:MM, weekly@DAY@HH:MM (DAY mon…sun; \
     HH one or two digits, MM two), times in UTC";

/// When a remote syncs.
///
/// Deserializing checks the ranges as parsing does (a stored or received schedule with hour 24
/// is refused, not wrapped); a schedule built by hand with fields out of range still never
/// panics, its times simply wrap around.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "Unchecked")]
pub enum Schedule {
    /// Syncs all the time, as changes happen.
    #[default]
    Continuous,
    /// Once an hour, at `minute` past the hour (UTC).
    Hourly { minute: u8 },
    /// Once a day at `hour:minute` UTC.
    Daily { hour: u8, minute: u8 },
    /// Once a week on `weekday` (0 = Monday … 6 = Sunday) at `hour:minute` UTC.
    Weekly { weekday: u8, hour: u8, minute: u8 },
}

/// Why a schedule was refused: the text, what was wrong with it, and the accepted [`FORMS`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ScheduleError(pub String);

const MINUTE: u64 = 60_000;
const HOUR: u64 = 60 * MINUTE;
const DAY: u64 = 24 * HOUR;
const WEEK: u64 = 7 * DAY;

/// The weekday of 1970-01-01, the epoch's first day: a Thursday (Monday = 0).
const EPOCH_WEEKDAY: u64 = 3;

/// The day names as written, Monday first (the index is the weekday).
const DAYS: [&str; 7] = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"];
const LONG_DAYS: [&str; 7] = ["monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday"];

impl Schedule {
    /// The first scheduled time strictly after `now_ms` (milliseconds since the Unix epoch, UTC),
    /// or None for Continuous. Strictly: a sync that ran at its scheduled minute asks again and
    /// gets the next one, not the same. The result is a whole minute. None also past the end of
    /// `u64` time, some 584 million years away.
    pub fn next_after(&self, now_ms: u64) -> Option<u64> {
        let (period, offset) = self.period_and_offset()?;
        // The scheduled times are `offset + k·period` for every k ≥ 0: the epoch begins a
        // period (an hour, a day, or the week from Monday 1969-12-29, with offset counted so).
        if now_ms < offset {
            return Some(offset);
        }
        let periods = (now_ms - offset) / period + 1;
        periods.checked_mul(period)?.checked_add(offset)
    }

    /// Whether it syncs as changes happen, so that there is no next time to wait for.
    pub fn is_continuous(&self) -> bool {
        matches!(self, Schedule::Continuous)
    }

    /// How often it syncs, and when within the first period after the epoch (always below the
    /// period, so that fields out of range wrap rather than overflow); None for Continuous.
    fn period_and_offset(&self) -> Option<(u64, u64)> {
        let ms = |count: u8, unit: u64| u64::from(count) * unit;
        let (period, offset) = match *self {
            Schedule::Continuous => return None,
            Schedule::Hourly { minute } => (HOUR, ms(minute, MINUTE)),
            Schedule::Daily { hour, minute } => (DAY, ms(hour, HOUR) + ms(minute, MINUTE)),
            Schedule::Weekly { weekday, hour, minute } => {
                // Days from Thursday 1970-01-01 to the first `weekday` on or after it.
                let days = (u64::from(weekday) + 7 - EPOCH_WEEKDAY) % 7;
                (WEEK, days * DAY + ms(hour, HOUR) + ms(minute, MINUTE))
            }
        };
        Some((period, offset % period))
    }

    /// What is out of range, if anything: parsing and deserializing refuse the same values.
    fn out_of_range(&self) -> Option<&'static str> {
        let (weekday, hour, minute) = match *self {
            Schedule::Continuous => return None,
            Schedule::Hourly { minute } => (0, 0, minute),
            Schedule::Daily { hour, minute } => (0, hour, minute),
            Schedule::Weekly { weekday, hour, minute } => (weekday, hour, minute),
        };
        if weekday > 6 {
            Some("the weekday must be 0 (Monday) to 6 (Sunday)")
        } else if hour > 23 {
            Some("the hour must be 00 to 23")
        } else if minute > 59 {
            Some("the minute must be 00 to 59")
        } else {
            None
        }
    }
}

/// The refusal of `text`, saying what was wrong and what would have been right.
fn refusal(text: &str, problem: &str) -> ScheduleError {
    ScheduleError(format!("{text:?}: {problem}; a schedule is one of: {FORMS}"))
}

impl FromStr for Schedule {
    type Err = ScheduleError;

    fn from_str(text: &str) -> Result<Schedule, ScheduleError> {
        let schedule = parse(&text.trim().to_ascii_lowercase()).map_err(|problem| refusal(text, &problem))?;
        match schedule.out_of_range() {
            Some(problem) => Err(refusal(text, problem)),
            None => Ok(schedule),
        }
    }
}

/// The schedule `text` (trimmed, lower case) writes, its numbers not yet checked against their
/// ranges; or what is wrong with its shape.
fn parse(text: &str) -> Result<Schedule, String> {
    if text.is_empty() {
        return Err("the schedule is empty".into());
    }
    let mut parts = text.split('@');
    let head = parts.next().unwrap_or_default();
    let rest: Vec<&str> = parts.collect();
    let (kind, minute) = match head.split_once(':') {
        Some((kind, minute)) => (kind, Some(minute)),
        None => (head, None),
    };
    let schedule = match (kind, minute, rest.as_slice()) {
        ("continuous", None, []) => Schedule::Continuous,
        ("hourly", None, []) => Schedule::Hourly { minute: 0 },
        ("hourly", Some(minute), []) => Schedule::Hourly { minute: minute_of(minute)? },
        ("daily", None, [time]) => {
            let (hour, minute) = time_of(time)?;
            Schedule::Daily { hour, minute }
        }
        ("weekly", None, [day, time]) => {
            let weekday = weekday_of(day)?;
            let (hour, minute) = time_of(time)?;
            Schedule::Weekly { weekday, hour, minute }
        }
        ("continuous" | "daily" | "weekly", Some(_), _) => {
            return Err(format!("{kind} takes no `:` after its name (only hourly:MM does)"));
        }
        ("continuous", None, _) => return Err("continuous takes no extra parts after @".into()),
        ("hourly", _, _) => return Err("hourly takes no extra parts after @ (its minute is hourly:MM)".into()),
        ("daily", None, []) => return Err("daily needs a time, as daily@HH:MM".into()),
        ("daily", None, _) => return Err("daily takes one time and no extra parts, as daily@HH:MM".into()),
        ("weekly", None, [] | [_]) => return Err("weekly needs a day and a time, as weekly@DAY@HH:MM".into()),
        ("weekly", None, _) => {
            return Err("weekly takes a day and a time and no extra parts, as weekly@DAY@HH:MM".into());
        }
        _ => return Err(format!("unknown kind of schedule {kind:?}")),
    };
    Ok(schedule)
}

/// `HH:MM` or `H:MM`.
fn time_of(text: &str) -> Result<(u8, u8), String> {
    let Some((hour, minute)) = text.split_once(':') else {
        return Err(format!("the time must be HH:MM, got {text:?}"));
    };
    let hour = digits(hour, 1..=2).ok_or_else(|| format!("the hour must be one or two digits, got {hour:?}"))?;
    Ok((hour, minute_of(minute)?))
}

/// `MM`: exactly two digits.
fn minute_of(text: &str) -> Result<u8, String> {
    digits(text, 2..=2).ok_or_else(|| format!("the minute must be two digits, got {text:?}"))
}

/// The number `text` writes in ASCII digits, if it has as many as `count` allows (at most
/// two, so it fits a `u8`). Not `str::parse`, which would also take a sign.
fn digits(text: &str, count: std::ops::RangeInclusive<usize>) -> Option<u8> {
    let bytes = text.as_bytes();
    (count.contains(&bytes.len()) && bytes.len() <= 2 && bytes.iter().all(u8::is_ascii_digit))
        .then(|| bytes.iter().fold(0, |n, d| n * 10 + (d - b'0')))
}

fn weekday_of(text: &str) -> Result<u8, String> {
    (0..7u8)
        .find(|&i| DAYS[usize::from(i)] == text || LONG_DAYS[usize::from(i)] == text)
        .ok_or_else(|| format!("unknown day {text:?}: the day must be mon, tue, wed, thu, fri, sat or sun"))
}

impl fmt::Display for Schedule {
    /// The canonical form, which [`FromStr`] reads back (for a schedule in range).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Schedule::Continuous => f.write_str("continuous"),
            Schedule::Hourly { minute: 0 } => f.write_str("hourly"),
            Schedule::Hourly { minute } => write!(f, "hourly:{minute:02}"),
            Schedule::Daily { hour, minute } => write!(f, "daily@{hour:02}:{minute:02}"),
            Schedule::Weekly { weekday, hour, minute } => match DAYS.get(usize::from(weekday)) {
                Some(day) => write!(f, "weekly@{day}@{hour:02}:{minute:02}"),
                None => write!(f, "weekly@{weekday}@{hour:02}:{minute:02}"),
            },
        }
    }
}

/// A schedule as stored or sent, before its ranges are checked: the same shape as [`Schedule`],
/// so the serialized form is the derived one.
#[derive(serde::Deserialize)]
#[serde(rename = "Schedule")]
enum Unchecked {
    Continuous,
    Hourly { minute: u8 },
    Daily { hour: u8, minute: u8 },
    Weekly { weekday: u8, hour: u8, minute: u8 },
}

impl TryFrom<Unchecked> for Schedule {
    type Error = ScheduleError;

    fn try_from(unchecked: Unchecked) -> Result<Schedule, ScheduleError> {
        let schedule = match unchecked {
            Unchecked::Continuous => Schedule::Continuous,
            Unchecked::Hourly { minute } => Schedule::Hourly { minute },
            Unchecked::Daily { hour, minute } => Schedule::Daily { hour, minute },
            Unchecked::Weekly { weekday, hour, minute } => Schedule::Weekly { weekday, hour, minute },
        };
        match schedule.out_of_range() {
            Some(problem) => Err(refusal(&schedule.to_string(), problem)),
            None => Ok(schedule),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Epoch milliseconds of a UTC date-time `YYYY-MM-DDTHH:MM[:SS[.mmm]]` (1970 or later),
    /// counted day by day so that it shares nothing with the arithmetic it checks.
    fn utc(text: &str) -> u64 {
        let num = |range: std::ops::Range<usize>| -> u64 {
            text.get(range).and_then(|s| s.parse().ok()).unwrap_or_else(|| panic!("bad test time {text:?}"))
        };
        let (year, month, day, hour, minute) = (num(0..4), num(5..7), num(8..10), num(11..13), num(14..16));
        let second = if text.len() > 16 { num(17..19) } else { 0 };
        let milli = if text.len() > 19 { num(20..23) } else { 0 };
        let leap = |y: u64| y.is_multiple_of(4) && (!y.is_multiple_of(100) || y.is_multiple_of(400));
        let month_days = |y: u64, m: u64| match m {
            2 if leap(y) => 29,
            2 => 28,
            4 | 6 | 9 | 11 => 30,
            _ => 31,
        };
        let days = (1970..year).map(|y| if leap(y) { 366 } else { 365 }).sum::<u64>()
            + (1..month).map(|m| month_days(year, m)).sum::<u64>()
            + (day - 1);
        ((days * 24 + hour) * 60 + minute) * 60_000 + second * 1000 + milli
    }

    fn weekday(ms: u64) -> u64 {
        (ms / DAY + EPOCH_WEEKDAY) % 7
    }

    fn parsed(text: &str) -> Schedule {
        text.parse().unwrap_or_else(|e| panic!("{text:?} should parse: {e}"))
    }

    #[test]
    fn the_test_clock_is_right() {
        for (text, ms) in [
            ("1970-01-01T00:00", 0),
            ("1970-01-01T00:01:02.003", 62_003),
            ("2000-03-01T00:00", 951_868_800_000),
            ("2026-11-27T00:00", 1_795_737_600_000),
            ("2027-01-01T00:00", 1_798_761_600_000),
            ("2028-02-29T00:00", 1_835_395_200_000),
        ] {
            assert_eq!(utc(text), ms, "{text}");
        }
        // Weekdays from a calendar, which checks EPOCH_WEEKDAY too (Monday = 0).
        for (text, day) in [
            ("1970-01-01T00:00", 3),
            ("1970-01-05T00:00", 0),
            ("2026-11-27T00:00", 4),
            ("2026-11-29T00:00", 6),
            ("2026-11-30T00:00", 0),
            ("2027-01-01T00:00", 4),
            ("2028-02-29T00:00", 1),
        ] {
            assert_eq!(weekday(utc(text)), day, "{text}");
        }
    }

    #[test]
    fn every_form_parses_and_prints_back() {
        use Schedule::*;
        for (text, schedule, canonical) in [
            ("continuous", Continuous, "continuous"),
            ("Continuous", Continuous, "continuous"),
            ("  continuous \n", Continuous, "continuous"),
            ("hourly", Hourly { minute: 0 }, "hourly"),
            ("hourly:00", Hourly { minute: 0 }, "hourly"),
            ("hourly:15", Hourly { minute: 15 }, "hourly:15"),
            ("HOURLY:59", Hourly { minute: 59 }, "hourly:59"),
            ("daily@09:30", Daily { hour: 9, minute: 30 }, "daily@09:30"),
            ("daily@9:30", Daily { hour: 9, minute: 30 }, "daily@09:30"),
            ("daily@00:00", Daily { hour: 0, minute: 0 }, "daily@00:00"),
            ("Daily@23:59", Daily { hour: 23, minute: 59 }, "daily@23:59"),
            ("weekly@fri@17:00", Weekly { weekday: 4, hour: 17, minute: 0 }, "weekly@fri@17:00"),
            ("weekly@Friday@17:00", Weekly { weekday: 4, hour: 17, minute: 0 }, "weekly@fri@17:00"),
            ("WEEKLY@MON@8:00", Weekly { weekday: 0, hour: 8, minute: 0 }, "weekly@mon@08:00"),
            ("weekly@tue@00:00", Weekly { weekday: 1, hour: 0, minute: 0 }, "weekly@tue@00:00"),
            ("weekly@wednesday@12:34", Weekly { weekday: 2, hour: 12, minute: 34 }, "weekly@wed@12:34"),
            ("weekly@thursday@01:02", Weekly { weekday: 3, hour: 1, minute: 2 }, "weekly@thu@01:02"),
            ("weekly@sat@06:07", Weekly { weekday: 5, hour: 6, minute: 7 }, "weekly@sat@06:07"),
            ("weekly@sunday@23:59", Weekly { weekday: 6, hour: 23, minute: 59 }, "weekly@sun@23:59"),
        ] {
            assert_eq!(parsed(text), schedule, "{text:?}");
            assert_eq!(schedule.to_string(), canonical, "{text:?}");
            assert_eq!(parsed(canonical), schedule, "{canonical:?} reads back");
        }
        for (i, (short, long)) in DAYS.iter().zip(LONG_DAYS).enumerate() {
            let weekday = u8::try_from(i).expect("seven days");
            let schedule = Weekly { weekday, hour: 10, minute: 0 };
            assert_eq!(parsed(&format!("weekly@{short}@10:00")), schedule);
            assert_eq!(parsed(&format!("weekly@{long}@10:00")), schedule);
            assert_eq!(schedule.to_string(), format!("weekly@{short}@10:00"));
        }
    }

    #[test]
    fn refusals_say_what_was_wrong_and_list_the_forms() {
        for (text, problem) in [
            ("", "empty"),
            ("   ", "empty"),
            ("monthly", "unknown kind of schedule \"monthly\""),
            ("sometimes@09:30", "unknown kind"),
            ("@09:30", "unknown kind of schedule \"\""),
            ("continuous@09:30", "continuous takes no extra parts"),
            ("continuous:00", "continuous takes no `:`"),
            ("hourly@15", "hourly takes no extra parts"),
            ("hourly:15@x", "hourly takes no extra parts"),
            ("hourly:", "the minute must be two digits, got \"\""),
            ("hourly:5", "the minute must be two digits, got \"5\""),
            ("hourly:015", "the minute must be two digits"),
            ("hourly:1a", "the minute must be two digits"),
            ("hourly:15:00", "the minute must be two digits, got \"15:00\""),
            ("hourly:60", "the minute must be 00 to 59"),
            ("daily", "daily needs a time"),
            ("daily@", "the time must be HH:MM, got \"\""),
            ("daily:09:30", "daily takes no `:`"),
            ("daily@0930", "the time must be HH:MM"),
            ("daily@09:30@10:30", "daily takes one time and no extra parts"),
            ("daily@25:00", "the hour must be 00 to 23"),
            ("daily@24:00", "the hour must be 00 to 23"),
            ("daily@09:60", "the minute must be 00 to 59"),
            ("daily@9:5", "the minute must be two digits"),
            ("daily@009:30", "the hour must be one or two digits"),
            ("daily@:30", "the hour must be one or two digits"),
            ("daily@+9:30", "the hour must be one or two digits"),
            ("daily@ 9:30", "the hour must be one or two digits"),
            ("daily@ab:cd", "the hour must be one or two digits"),
            ("daily@09:3x", "the minute must be two digits"),
            ("daily@０9:30", "the hour must be one or two digits"),
            ("weekly", "weekly needs a day and a time"),
            ("weekly@fri", "weekly needs a day and a time"),
            ("weekly@17:00", "weekly needs a day and a time"),
            ("weekly@fri@17:00@x", "weekly takes a day and a time and no extra parts"),
            ("weekly@fry@17:00", "unknown day \"fry\""),
            ("weekly@5@17:00", "unknown day \"5\""),
            ("weekly@@17:00", "unknown day \"\""),
            ("weekly@fri@24:00", "the hour must be 00 to 23"),
            ("weekly@fri@17:0", "the minute must be two digits"),
        ] {
            let error = text.parse::<Schedule>().expect_err(text).to_string();
            assert!(error.starts_with(&format!("{text:?}: ")), "{text:?} is named: {error}");
            assert!(error.contains(problem), "{text:?} should say {problem:?}: {error}");
            assert!(error.ends_with(FORMS), "{text:?} should list the forms: {error}");
        }
        assert_eq!(
            "daily@25:00".parse::<Schedule>().expect_err("hour 25").to_string(),
            format!("\"daily@25:00\": the hour must be 00 to 23; a schedule is one of: {FORMS}")
        );
    }

    #[test]
    fn continuous_is_the_default_and_has_no_next_time() {
        assert_eq!(Schedule::default(), Schedule::Continuous);
        assert!(Schedule::Continuous.is_continuous());
        assert!(!parsed("hourly").is_continuous() && !parsed("weekly@sun@23:59").is_continuous());
        for now in [0, utc("2026-11-27T10:20"), u64::MAX] {
            assert_eq!(Schedule::Continuous.next_after(now), None);
        }
    }

    #[test]
    fn the_next_time_is_strictly_after_now() {
        for (schedule, now, next) in [
            ("hourly", "2026-11-27T10:20:30", "2026-11-27T11:00"),
            ("hourly", "2026-11-27T23:59:59.999", "2026-11-28T00:00"),
            ("hourly", "1970-01-01T00:00", "1970-01-01T01:00"),
            ("hourly:15", "2026-11-27T10:20", "2026-11-27T11:15"),
            ("hourly:15", "2026-11-27T10:05", "2026-11-27T10:15"),
            ("hourly:15", "2026-11-27T11:14:59.999", "2026-11-27T11:15"),
            ("hourly:15", "2026-11-27T11:15:00.000", "2026-11-27T12:15"),
            ("hourly:15", "2026-11-27T11:15:00.001", "2026-11-27T12:15"),
            ("hourly:15", "1970-01-01T00:00", "1970-01-01T00:15"),
            ("daily@09:30", "2026-11-27T08:00", "2026-11-27T09:30"),
            ("daily@09:30", "2026-11-27T09:29:59.999", "2026-11-27T09:30"),
            ("daily@09:30", "2026-11-27T09:30", "2026-11-28T09:30"),
            ("daily@09:30", "2026-11-27T10:00", "2026-11-28T09:30"),
            ("daily@09:30", "2026-11-30T10:00", "2026-12-01T09:30"),
            ("daily@09:30", "2026-12-31T23:59", "2027-01-01T09:30"),
            ("daily@09:30", "2028-02-28T10:00", "2028-02-29T09:30"),
            ("daily@09:30", "2028-02-29T10:00", "2028-03-01T09:30"),
            ("daily@00:00", "2026-11-27T00:00", "2026-11-28T00:00"),
            ("daily@23:59", "2026-12-31T23:59", "2027-01-01T23:59"),
            ("weekly@mon@08:00", "2026-11-29T12:00", "2026-11-30T08:00"),
            ("weekly@mon@08:00", "2026-11-30T07:59", "2026-11-30T08:00"),
            ("weekly@mon@08:00", "2026-11-30T08:00", "2026-12-07T08:00"),
            ("weekly@mon@08:00", "2026-11-30T09:00", "2026-12-07T08:00"),
            ("weekly@mon@08:00", "1970-01-01T00:00", "1970-01-05T08:00"),
            ("weekly@sun@23:59", "2026-11-28T10:00", "2026-11-29T23:59"),
            ("weekly@sun@23:59", "2026-11-29T23:58:59.999", "2026-11-29T23:59"),
            ("weekly@sun@23:59", "2026-11-29T23:59", "2026-12-06T23:59"),
            ("weekly@sun@23:59", "2026-11-30T00:00", "2026-12-06T23:59"),
            ("weekly@fri@17:00", "2026-12-31T18:00", "2027-01-01T17:00"),
            ("weekly@tue@09:30", "2028-02-28T12:00", "2028-02-29T09:30"),
            ("weekly@thu@00:00", "1970-01-01T00:00", "1970-01-08T00:00"),
        ] {
            assert_eq!(parsed(schedule).next_after(utc(now)), Some(utc(next)), "{schedule} after {now}");
        }
    }

    #[test]
    fn the_end_of_time_and_hand_built_values_do_not_panic() {
        assert_eq!(parsed("daily@09:30").next_after(u64::MAX), None);
        assert_eq!(parsed("weekly@sun@23:59").next_after(u64::MAX - 1), None);
        // Out of range only by hand: the times wrap (minute 75 is minute 15), nothing panics.
        let hand_built = Schedule::Hourly { minute: 75 };
        assert_eq!(hand_built.next_after(utc("2026-11-27T10:20")), Some(utc("2026-11-27T11:15")));
        for wild in
            [Schedule::Daily { hour: 255, minute: 255 }, Schedule::Weekly { weekday: 255, hour: 255, minute: 255 }]
        {
            let now = utc("2026-11-27T10:20");
            let next = wild.next_after(now).expect("a time");
            assert!(next > now && next.is_multiple_of(MINUTE), "{wild:?}");
            assert!(!wild.to_string().is_empty());
        }
    }

    #[test]
    fn serde_keeps_the_derived_form_and_checks_ranges() {
        for text in ["continuous", "hourly:15", "daily@09:30", "weekly@fri@17:00"] {
            let schedule = parsed(text);
            let json = serde_json::to_string(&schedule).expect("to JSON");
            assert_eq!(serde_json::from_str::<Schedule>(&json).expect("from JSON"), schedule, "{json}");
            let packed = rmp_serde::to_vec(&schedule).expect("to MessagePack");
            assert_eq!(rmp_serde::from_slice::<Schedule>(&packed).expect("from MessagePack"), schedule);
        }
        assert_eq!(
            serde_json::to_string(&parsed("daily@09:30")).expect("to JSON"),
            r#"{"Daily":{"hour":9,"minute":30}}"#
        );
        for (json, problem) in [
            (r#"{"Hourly":{"minute":60}}"#, "\"hourly:60\": the minute must be 00 to 59"),
            (r#"{"Daily":{"hour":24,"minute":0}}"#, "\"daily@24:00\": the hour must be 00 to 23"),
            (r#"{"Weekly":{"weekday":7,"hour":8,"minute":0}}"#, "\"weekly@7@08:00\": the weekday must be 0"),
        ] {
            let error = serde_json::from_str::<Schedule>(json).expect_err(json).to_string();
            assert!(error.contains(problem), "{json} should say {problem:?}: {error}");
        }
    }

    /// Many times over several years, for schedules at the edges of their periods: the next time
    /// is after now by at most one period, on the schedule's minute, hour and day. Scheduled
    /// times are one period apart, so at most a period ahead also means none was skipped.
    #[test]
    fn the_next_time_matches_the_schedule_for_any_now() {
        let (start, end) = (utc("1970-01-01T00:00"), utc("2040-01-01T00:00"));
        let mut seed: u64 = 0x5eed;
        let mut nows: Vec<u64> = (0..4000)
            .map(|_| {
                seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
                start + (seed >> 11) % (end - start)
            })
            .collect();
        nows.extend([0, 1, MINUTE - 1, MINUTE, WEEK - 1, WEEK, WEEK + 1]);
        for text in [
            "hourly",
            "hourly:59",
            "daily@00:00",
            "daily@23:59",
            "daily@09:30",
            "weekly@mon@00:00",
            "weekly@wed@12:34",
            "weekly@thu@00:00",
            "weekly@sun@23:59",
        ] {
            let schedule = parsed(text);
            let (period, want) = match schedule {
                Schedule::Hourly { minute } => (HOUR, (None, None, minute)),
                Schedule::Daily { hour, minute } => (DAY, (None, Some(hour), minute)),
                Schedule::Weekly { weekday, hour, minute } => (WEEK, (Some(weekday), Some(hour), minute)),
                Schedule::Continuous => unreachable!("no continuous schedule in the list"),
            };
            for &now in &nows {
                let next = schedule.next_after(now).expect("a next time");
                assert!(next > now && next - now <= period, "{text} after {now}: {next}");
                assert_eq!(next % MINUTE, 0, "{text} after {now}: a whole minute");
                assert_eq!(next / MINUTE % 60, u64::from(want.2), "{text} after {now}: minute");
                if let Some(hour) = want.1 {
                    assert_eq!(next / HOUR % 24, u64::from(hour), "{text} after {now}: hour");
                }
                if let Some(day) = want.0 {
                    assert_eq!(weekday(next), u64::from(day), "{text} after {now}: weekday");
                }
                assert_eq!(schedule.next_after(next), Some(next + period), "{text} exactly at {next}");
            }
        }
    }
}
