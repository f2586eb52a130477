//! The coordinator's clock. Wall-clock time is read once, when the process starts; from then on
//! time advances with the monotonic clock. Deadlines (heartbeat expiry, grace periods, timeouts)
//! therefore never jump when the wall clock is stepped (NTP setting a Pi's clock at boot, an
//! operator fixing the date), while the times people read (build creation, "last seen") stay
//! wall-clock times as of the start, plus what has elapsed since.

use std::sync::OnceLock;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// A wall-clock reading and the monotonic instant it was taken at.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    wall_ms: u64,
    at: Instant,
}

impl Clock {
    /// Anchored at `wall_ms` (Unix milliseconds) at instant `at`.
    pub fn anchored(wall_ms: u64, at: Instant) -> Clock {
        Clock { wall_ms, at }
    }

    /// Unix milliseconds at `instant`: the anchor plus the monotonic time elapsed since it.
    pub fn at(&self, instant: Instant) -> u64 {
        self.wall_ms + instant.saturating_duration_since(self.at).as_millis() as u64
    }
}

fn wall_now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or(Duration::ZERO).as_millis() as u64
}

/// The process's clock, anchored the first time it is read.
pub fn now_ms() -> u64 {
    static CLOCK: OnceLock<Clock> = OnceLock::new();
    CLOCK.get_or_init(|| Clock::anchored(wall_now_ms(), Instant::now())).at(Instant::now())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn time_advances_with_the_monotonic_clock_only() {
        let start = Instant::now();
        let clock = Clock::anchored(1_000_000, start);
        assert_eq!(clock.at(start), 1_000_000);
        assert_eq!(clock.at(start + Duration::from_secs(5)), 1_005_000);
        // An instant before the anchor does not go back in time.
        assert_eq!(clock.at(start.checked_sub(Duration::from_secs(1)).unwrap_or(start)), 1_000_000);
        // Whatever the wall clock does now, the process's clock only moves forward.
        let (a, b) = (now_ms(), now_ms());
        assert!(b >= a);
    }
}
