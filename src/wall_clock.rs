//! The time of day the lifecycle reads: when a remote expires, when its scheduled sync is
//! due. It is the system's clock, shifted by a configured offset (`CRMSYNC_CLOCK_SHIFT`, to
//! try expiry without waiting days), or a clock set by hand (tests prove an hourly schedule by
//! moving it an hour, not by waiting one).
//!
//! Only these rules read it: the stamps that order changes come from the hybrid logical clock
//! ([`crate::hlc`]), which a shifted clock must not disturb.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

/// The longest a sleep on the system clock goes before it reads the clock again: a laptop that
/// slept through its scheduled time syncs within this of waking.
const RECHECK: Duration = Duration::from_secs(30);

#[derive(Clone, Debug, Default)]
pub struct WallClock {
    shift_ms: i64,
    /// Set by hand: the time, and a way to wake the sleepers when it moves.
    manual: Option<Arc<watch::Sender<u64>>>,
}

impl WallClock {
    /// The system's clock.
    pub fn system() -> WallClock {
        WallClock::default()
    }

    /// The system's clock, `shift_ms` ahead (or behind, if negative).
    pub fn shifted(shift_ms: i64) -> WallClock {
        WallClock { shift_ms, manual: None }
    }

    /// A clock that reads `start_ms` until [`WallClock::advance`] moves it.
    pub fn manual(start_ms: u64) -> WallClock {
        WallClock { shift_ms: 0, manual: Some(Arc::new(watch::channel(start_ms).0)) }
    }

    /// The system's clock, shifted by `CRMSYNC_CLOCK_SHIFT` if it is set (see [`parse_shift`]).
    pub fn from_env() -> anyhow::Result<WallClock> {
        match std::env::var("CRMSYNC_CLOCK_SHIFT") {
            Ok(text) if !text.is_empty() => {
                let shift = parse_shift(&text).map_err(|e| anyhow::anyhow!("CRMSYNC_CLOCK_SHIFT: {e}"))?;
                tracing::warn!("the lifecycle clock runs {text} off the system's (CRMSYNC_CLOCK_SHIFT)");
                Ok(WallClock::shifted(shift))
            }
            _ => Ok(WallClock::system()),
        }
    }

    /// Milliseconds since the Unix epoch.
    pub fn now_ms(&self) -> u64 {
        match &self.manual {
            Some(time) => *time.borrow(),
            None => crate::hlc::wall_ms().saturating_add_signed(self.shift_ms),
        }
    }

    /// Moves a hand-set clock forward, waking whoever sleeps until a time it reaches.
    ///
    /// # Panics
    /// On a clock that is not set by hand: only tests move time.
    pub fn advance(&self, by: Duration) {
        let time = self.manual.as_ref().expect("only a hand-set clock is moved");
        time.send_modify(|now| *now += by.as_millis() as u64);
    }

    /// Returns once the clock reads `at_ms` or later.
    pub async fn sleep_until(&self, at_ms: u64) {
        match &self.manual {
            Some(time) => {
                let _ = time.subscribe().wait_for(|now| *now >= at_ms).await;
            }
            None => loop {
                let now = self.now_ms();
                if now >= at_ms {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(at_ms - now).min(RECHECK)).await;
            },
        }
    }
}

/// Reads a shift of the clock: a signed whole number and a unit, `d`, `h`, `m` or `s`
/// (`3d`, `-2h`, `90m`).
pub fn parse_shift(text: &str) -> Result<i64, String> {
    let bad =
        || format!("{text:?} is not a shift of the clock; write a whole number and a unit d, h, m or s, as 3d or -2h");
    let text = text.trim();
    let unit = text.chars().last().ok_or_else(bad)?;
    let ms = match unit {
        'd' => 86_400_000,
        'h' => 3_600_000,
        'm' => 60_000,
        's' => 1000,
        _ => return Err(bad()),
    };
    let number: i64 = text[..text.len() - 1].parse().map_err(|_| bad())?;
    number.checked_mul(ms).ok_or_else(bad)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shifts_read_with_their_unit() {
        for (text, ms) in [("3d", 259_200_000), ("-2h", -7_200_000), ("90m", 5_400_000), ("10s", 10_000)] {
            assert_eq!(parse_shift(text), Ok(ms), "{text}");
        }
        for bad in ["", "3", "d", "3w", "1.5d", "99999999999999999d"] {
            let e = parse_shift(bad).unwrap_err();
            assert!(e.contains("3d"), "{bad}: {e}");
        }
    }

    #[test]
    fn a_shifted_clock_runs_ahead_of_the_system() {
        let ahead = WallClock::shifted(3 * 86_400_000).now_ms();
        let now = WallClock::system().now_ms();
        assert!(ahead >= now + 3 * 86_400_000 - 1000 && ahead <= now + 3 * 86_400_000 + 1000);
    }

    #[tokio::test]
    async fn a_hand_set_clock_wakes_its_sleepers_when_moved() {
        let clock = WallClock::manual(1000);
        let sleeper = tokio::spawn({
            let clock = clock.clone();
            async move { clock.sleep_until(3_600_000).await }
        });
        tokio::task::yield_now().await;
        assert!(!sleeper.is_finished());
        clock.advance(Duration::from_secs(1800));
        tokio::task::yield_now().await;
        assert!(!sleeper.is_finished(), "woke before its time");
        clock.advance(Duration::from_secs(1800));
        tokio::time::timeout(Duration::from_secs(5), sleeper).await.unwrap().unwrap();
        assert_eq!(clock.now_ms(), 3_601_000);
    }
}
