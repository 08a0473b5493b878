//! Hybrid logical clock: stamps that follow wall-clock time, never go backwards, and are
//! unique per clock, so "newest change wins" is well defined across machines.
//!
//! A stamp is one `u64`: milliseconds since the Unix epoch in the high 48 bits, a counter in
//! the low 16. Stamps compare as plain integers.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

const COUNTER_BITS: u32 = 16;

#[derive(Debug, Default)]
pub struct Clock {
    last: AtomicU64,
}

impl Clock {
    pub fn new() -> Clock {
        Clock::default()
    }

    /// A fresh stamp, greater than every stamp this clock has issued or observed.
    pub fn now(&self) -> u64 {
        let wall = wall_ms() << COUNTER_BITS;
        let mut last = self.last.load(Ordering::Relaxed);
        loop {
            let next = wall.max(last + 1);
            match self.last.compare_exchange_weak(last, next, Ordering::Relaxed, Ordering::Relaxed) {
                Ok(_) => return next,
                Err(seen) => last = seen,
            }
        }
    }

    /// Takes in a stamp seen elsewhere, so that the next local stamp is newer than it.
    pub fn observe(&self, stamp: u64) {
        self.last.fetch_max(stamp, Ordering::Relaxed);
    }
}

/// The wall-clock milliseconds of a stamp.
pub fn millis(stamp: u64) -> u64 {
    stamp >> COUNTER_BITS
}

pub fn wall_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamps_increase_and_follow_the_wall_clock() {
        let clock = Clock::new();
        let a = clock.now();
        let b = clock.now();
        assert!(b > a);
        assert!(millis(a).abs_diff(wall_ms()) < 10_000);
    }

    #[test]
    fn observing_a_future_stamp_moves_the_clock_past_it() {
        let clock = Clock::new();
        let future = (wall_ms() + 60_000) << COUNTER_BITS;
        clock.observe(future);
        assert!(clock.now() > future);
    }
}
