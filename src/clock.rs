//! Wall-clock time that follows tokio's clock.
//!
//! Durable records need wall-clock times (they outlive the process), while
//! tests drive time with tokio's paused clock. [`Clock`] reads the system
//! time once and then advances with `tokio::time::Instant`, so a test that
//! calls `tokio::time::advance(25h)` sees an idempotency record expire, and a
//! server sees ordinary wall time.

use std::time::{SystemTime, UNIX_EPOCH};

use tokio::time::Instant;

/// Milliseconds since the Unix epoch: how the store keeps times.
pub type UnixMillis = i64;

/// A wall clock anchored once, advancing with tokio's clock.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    anchor_wall: UnixMillis,
    anchor: Instant,
}

impl Clock {
    /// A clock anchored at the current system time.
    pub fn new() -> Clock {
        let wall = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
        Clock::anchored(wall)
    }

    /// A clock that reads `wall` now (tests start at a known time).
    pub fn anchored(wall: UnixMillis) -> Clock {
        Clock {
            anchor_wall: wall,
            anchor: Instant::now(),
        }
    }

    /// The current time in Unix milliseconds.
    pub fn now(&self) -> UnixMillis {
        let elapsed = i64::try_from(self.anchor.elapsed().as_millis()).unwrap_or(i64::MAX);
        self.anchor_wall.saturating_add(elapsed)
    }

    /// `now() + d`, saturating.
    pub fn after(&self, d: std::time::Duration) -> UnixMillis {
        self.now().saturating_add(millis(d))
    }
}

impl Default for Clock {
    fn default() -> Self {
        Clock::new()
    }
}

/// A duration in whole milliseconds, saturating at `i64::MAX`.
pub fn millis(d: std::time::Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test(start_paused = true)]
    async fn follows_the_paused_clock() {
        let clock = Clock::anchored(1_000);
        assert_eq!(clock.now(), 1_000);
        tokio::time::advance(Duration::from_secs(90_000)).await;
        assert_eq!(clock.now(), 1_000 + 90_000_000);
        assert_eq!(clock.after(Duration::from_millis(5)), 90_001_005);
    }
}
