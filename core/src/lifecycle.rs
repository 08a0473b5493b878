//! A remote's life in time: when it expires, and how it is told.
//!
//! A remote may go a fixed number of days (set at creation, 2 to 90) without a successful
//! sync. The main counts from the last session it heard of (or from the remote's creation);
//! the remote counts from the last session it completed, so a laptop that stays offline knows
//! it expired without asking anyone. Both use these rules, so they cannot disagree on them.

/// Milliseconds in a day.
pub const DAY_MS: u64 = 86_400_000;

/// The days a remote may go without syncing, when its creator does not say.
pub const DEFAULT_EXPIRES_DAYS: u32 = 30;

/// The days a remote may be given: fewer would expire a laptop over a long weekend, more would
/// keep a lost one's access alive for a season.
pub const EXPIRES_DAYS: std::ops::RangeInclusive<u32> = 2..=90;

/// When a remote that last synced at `last_sync_ms`, and may go `days` days without, expires.
pub fn expires_ms(last_sync_ms: u64, days: u32) -> u64 {
    last_sync_ms.saturating_add(u64::from(days) * DAY_MS)
}

/// Whether it has expired at `now_ms`.
pub fn is_expired(last_sync_ms: u64, days: u32, now_ms: u64) -> bool {
    now_ms >= expires_ms(last_sync_ms, days)
}

/// What a remote that expired at `on_ms` says to its people, in plain words.
pub fn expired_notice(on_ms: u64) -> String {
    format!("this remote expired on {} (UTC); ask an administrator to re-create it", crate::date::utc_day(on_ms))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_remote_expires_the_given_days_after_its_last_sync() {
        let synced = 1_795_737_600_000; // 2026-11-27T00:00Z
        for (days, now, expired) in [
            (2, synced, false),
            (2, synced + 2 * DAY_MS - 1, false),
            (2, synced + 2 * DAY_MS, true),
            (2, synced + 3 * DAY_MS, true),
            (30, synced + 29 * DAY_MS, false),
            (30, synced + 30 * DAY_MS, true),
            (90, synced + 89 * DAY_MS, false),
        ] {
            assert_eq!(is_expired(synced, days, now), expired, "{days} days, now +{} ms", now - synced);
        }
        assert_eq!(expires_ms(u64::MAX - 1, 90), u64::MAX, "no overflow");
    }

    #[test]
    fn the_notice_names_the_day_and_what_to_do() {
        let notice = expired_notice(1_795_737_600_000 + 3 * DAY_MS);
        assert_eq!(notice, "this remote expired on 2026-11-30 (UTC); ask an administrator to re-create it");
    }
}
