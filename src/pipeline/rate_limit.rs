//! The upstream rate limiter: a token bucket with a reserve for `critical`
//! calls and a quota gate that a 429 closes.
//!
//! # The bucket
//!
//! `per_second` tokens flow in continuously up to `burst`. A call spends one.
//! The bucket is kept as a GCRA "full at" time rather than a token count, in
//! integer nano-tokens (one token is 10^9 nano-tokens, and time in
//! nanoseconds times `per_second` is nano-tokens), so refill never drifts and
//! the state needs no periodic update:
//!
//! ```text
//! tokens(t) = burst - max(0, full_at - t * per_second)      (in nano-tokens)
//! ```
//!
//! Spending a token moves `full_at` one token later. A caller that finds no
//! token now but would find one within its `max_wait` reserves it anyway
//! (the bucket goes negative) and sleeps until then, so concurrent callers
//! are served in arrival order at the sustained rate. A caller that would
//! wait longer fails at once with [`Failure::RateLimited`] and spends nothing.
//!
//! # The reserve
//!
//! `critical_reserve_percent` of the bucket is kept for
//! [`Priority::Critical`]: other classes may only take a token that leaves at
//! least the reserve in the bucket. The reserve never exceeds `burst - 1`
//! tokens, so every class can still spend something from a full bucket.
//!
//! # The quota gate
//!
//! [`RateLimiter::close_until`] (called when the upstream answered 429 with
//! a reset hint) closes the gate until an instant. Every caller then starts
//! no earlier than the reopening, and is counted against the bucket as if it
//! arrived then: callers that queue up behind a closed gate leave at the
//! bucket's pace, not in one flood at reopening.
//!
//! # Cancellation
//!
//! A sleeping [`acquire`](RateLimiter::acquire) that is dropped gives its
//! token back when no later caller has reserved after it. Otherwise the token
//! is lost: later reservations were placed behind it, and handing its slot
//! to a newcomer would let two calls share one slot. A lost token only ever
//! makes the limiter stricter, never looser.

use std::fmt;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use serde::Serialize;
use tokio::time::Instant;

use super::Failure;
use crate::policy::model::{Priority, RateLimit};

/// Nano-tokens in one token.
const TOKEN: i128 = 1_000_000_000;

/// The settings of one upstream's limiter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RateLimitConfig {
    /// Sustained tokens per second (0 is treated as 1).
    pub per_second: u32,
    /// Bucket size in tokens (0 is treated as 1).
    pub burst: u32,
    /// Share of the bucket only `critical` calls may spend, in percent.
    pub critical_reserve_percent: u8,
}

impl From<&RateLimit> for RateLimitConfig {
    fn from(limit: &RateLimit) -> RateLimitConfig {
        RateLimitConfig {
            per_second: limit.per_second,
            burst: limit.burst.unwrap_or(limit.per_second),
            critical_reserve_percent: limit.critical_reserve_percent.unwrap_or(0),
        }
    }
}

/// A token bucket with a critical reserve and a quota gate, shared by the
/// operations of one upstream.
pub struct RateLimiter {
    config: RateLimitConfig,
    /// Nano-tokens gained per nanosecond, i.e. `per_second`.
    rate: i128,
    /// Bucket size in nano-tokens.
    capacity: i128,
    /// How far `full_at` may run ahead of the start time for a caller of a
    /// class to still find its token: `capacity - TOKEN` for `critical`,
    /// less the reserve for the others.
    slack_critical: i128,
    slack_other: i128,
    /// Time zero of the scaled clock.
    base: Instant,
    state: Mutex<State>,
}

struct State {
    /// The scaled time (nanoseconds since `base` times `rate`) at which the
    /// bucket is full again. At or before `base` means full now.
    full_at: i128,
    /// Until when the quota gate is closed, if it ever was.
    gate: Option<Instant>,
}

impl RateLimiter {
    /// A limiter with a full bucket and an open gate.
    pub fn new(config: RateLimitConfig) -> RateLimiter {
        let rate = i128::from(config.per_second.max(1));
        let capacity = i128::from(config.burst.max(1)) * TOKEN;
        let percent = i128::from(config.critical_reserve_percent.min(100));
        let reserve = (capacity * percent / 100).min(capacity - TOKEN);
        RateLimiter {
            rate,
            capacity,
            slack_critical: capacity - TOKEN,
            slack_other: capacity - TOKEN - reserve,
            base: Instant::now(),
            state: Mutex::new(State {
                full_at: 0,
                gate: None,
            }),
            config,
        }
    }

    /// The settings this limiter was built from.
    pub fn config(&self) -> &RateLimitConfig {
        &self.config
    }

    /// Takes one token for a call of class `priority`, waiting at most
    /// `max_wait` for it (and for the quota gate to reopen).
    ///
    /// Fails at once, spending nothing, with [`Failure::RateLimited`] whose
    /// `retry_after` is the time until this caller's token would be
    /// available (at least until the gate reopens).
    pub async fn acquire(&self, priority: Priority, max_wait: Duration) -> Result<(), Failure> {
        let now = Instant::now();
        let (wake, reservation) = {
            let mut state = self.lock();
            let now_scaled = self.scaled(now);
            let start = match state.gate {
                Some(gate) if gate > now => self.scaled(gate).max(now_scaled),
                _ => now_scaled,
            };
            let slack = if priority == Priority::Critical {
                self.slack_critical
            } else {
                self.slack_other
            };
            let ready = start.max(state.full_at.saturating_sub(slack));
            if ready <= now_scaled {
                state.full_at = state.full_at.max(now_scaled).saturating_add(TOKEN);
                return Ok(());
            }
            let wait = nanos_to_duration(div_ceil(ready.saturating_sub(now_scaled), self.rate));
            let wake = match now.checked_add(wait) {
                Some(wake) if wait <= max_wait => wake,
                _ => return Err(Failure::RateLimited { retry_after: wait }),
            };
            let before = state.full_at;
            state.full_at = state.full_at.max(start).saturating_add(TOKEN);
            (
                wake,
                Reservation {
                    limiter: self,
                    before,
                    after: state.full_at,
                    armed: true,
                },
            )
        };
        let mut reservation = reservation;
        tokio::time::sleep_until(wake).await;
        reservation.armed = false;
        Ok(())
    }

    /// Closes the quota gate until `until`; a gate already closed until
    /// later stays so (the gate is only ever extended).
    pub fn close_until(&self, until: Instant) {
        let mut state = self.lock();
        state.gate = Some(state.gate.map_or(until, |gate| gate.max(until)));
    }

    /// Tokens and gate now, for the admin API and metrics.
    pub fn snapshot(&self) -> RateLimitSnapshot {
        let now = Instant::now();
        let state = self.lock();
        let debt = state.full_at.saturating_sub(self.scaled(now)).max(0);
        let tokens = (self.capacity - debt.min(self.capacity)) / TOKEN;
        let gate_closed_for_ms = state.gate.filter(|gate| *gate > now).map(|gate| {
            let left = gate.duration_since(now);
            let ms = left.as_millis() + u128::from(left.subsec_nanos() % 1_000_000 != 0);
            u64::try_from(ms).unwrap_or(u64::MAX)
        });
        RateLimitSnapshot {
            available_tokens: u32::try_from(tokens).unwrap_or(u32::MAX),
            gate_closed_for_ms,
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Nothing panics under this lock; a poisoned one still holds a
        // consistent bucket.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// `instant` on the scaled clock: nanoseconds since `base` times `rate`.
    fn scaled(&self, instant: Instant) -> i128 {
        let nanos = instant.saturating_duration_since(self.base).as_nanos();
        i128::try_from(nanos)
            .unwrap_or(i128::MAX)
            .saturating_mul(self.rate)
    }
}

impl fmt::Debug for RateLimiter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RateLimiter")
            .field("config", &self.config)
            .field("snapshot", &self.snapshot())
            .finish()
    }
}

/// A token reserved by a sleeping `acquire`; given back if the sleep is
/// cancelled and nobody reserved after it.
struct Reservation<'a> {
    limiter: &'a RateLimiter,
    /// `full_at` before and after this reservation.
    before: i128,
    after: i128,
    armed: bool,
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        if self.armed {
            let mut state = self.limiter.lock();
            // `full_at` only grows, except by this undo; equal means no
            // token was taken after ours.
            if state.full_at == self.after {
                state.full_at = self.before;
            }
        }
    }
}

/// A rate limiter's tokens and gate at one moment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RateLimitSnapshot {
    /// Whole tokens in the bucket now (0 while callers are queued on it),
    /// counting the critical reserve.
    pub available_tokens: u32,
    /// Milliseconds until the quota gate reopens, rounded up; `None` when open.
    pub gate_closed_for_ms: Option<u64>,
}

/// `a / b` rounded up, for `a >= 0` and `b > 0`.
fn div_ceil(a: i128, b: i128) -> i128 {
    a / b + i128::from(a % b != 0)
}

/// A non-negative nanosecond count as a duration, saturating at `Duration::MAX`.
fn nanos_to_duration(nanos: i128) -> Duration {
    if nanos <= 0 {
        return Duration::ZERO;
    }
    let secs = nanos / 1_000_000_000;
    let subsec = u32::try_from(nanos % 1_000_000_000).unwrap_or(0);
    match u64::try_from(secs) {
        Ok(secs) => Duration::new(secs, subsec),
        Err(_) => Duration::MAX,
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use futures_util::FutureExt;

    use super::*;

    const C: Priority = Priority::Critical;
    const N: Priority = Priority::Normal;
    const NOW: Duration = Duration::ZERO;

    fn ms(millis: u64) -> Duration {
        Duration::from_millis(millis)
    }

    fn limiter(per_second: u32, burst: u32, reserve: u8) -> RateLimiter {
        RateLimiter::new(RateLimitConfig {
            per_second,
            burst,
            critical_reserve_percent: reserve,
        })
    }

    fn limited(retry_after: Duration) -> Failure {
        Failure::RateLimited { retry_after }
    }

    /// Runs `acquire` to completion and says how long it took.
    async fn timed(limiter: &RateLimiter, priority: Priority, max_wait: Duration) -> Duration {
        let started = Instant::now();
        limiter.acquire(priority, max_wait).await.expect("token");
        started.elapsed()
    }

    #[tokio::test(start_paused = true)]
    async fn burst_at_once_then_paced_at_the_sustained_rate() {
        let limiter = limiter(10, 5, 0);
        for _ in 0..5 {
            assert_eq!(limiter.acquire(N, NOW).now_or_never(), Some(Ok(())));
        }
        assert_eq!(limiter.snapshot().available_tokens, 0);
        assert_eq!(limiter.acquire(N, NOW).await, Err(limited(ms(100))));
        assert_eq!(timed(&limiter, N, ms(1_000)).await, ms(100));
        assert_eq!(timed(&limiter, N, ms(1_000)).await, ms(100));
        // Idle time refills, up to the burst.
        tokio::time::advance(ms(350)).await;
        assert_eq!(limiter.snapshot().available_tokens, 3);
        tokio::time::advance(ms(10_000)).await;
        assert_eq!(limiter.snapshot().available_tokens, 5);
    }

    #[tokio::test(start_paused = true)]
    async fn concurrent_reservations_queue_at_the_sustained_rate() {
        let limiter = Arc::new(limiter(4, 1, 0));
        limiter.acquire(N, NOW).await.expect("the burst");
        let waiters: Vec<_> = (0..3)
            .map(|_| {
                let limiter = Arc::clone(&limiter);
                tokio::spawn(async move { timed(&limiter, N, ms(1_000)).await })
            })
            .collect();
        let mut waited = Vec::new();
        for waiter in waiters {
            waited.push(waiter.await.expect("join"));
        }
        assert_eq!(waited, [ms(250), ms(500), ms(750)]);
        // The next token is one interval after the last reservation.
        assert_eq!(limiter.acquire(N, ms(249)).await, Err(limited(ms(250))));
        assert_eq!(timed(&limiter, N, ms(250)).await, ms(250));
    }

    #[tokio::test(start_paused = true)]
    async fn a_reservation_waits_exactly_until_its_token() {
        // 3 per second: tokens every 333.33 ms, no drift over many of them.
        let limiter = limiter(3, 1, 0);
        let started = Instant::now();
        for _ in 0..31 {
            limiter.acquire(N, ms(1_000)).await.expect("token");
        }
        // 30 tokens after the first take exactly 10 s (sleeps round up to
        // the timer's millisecond, the bucket does not).
        assert_eq!(started.elapsed(), ms(10_000));
    }

    #[tokio::test(start_paused = true)]
    async fn a_short_max_wait_fails_at_once_and_spends_nothing() {
        let limiter = limiter(10, 1, 0);
        limiter.acquire(N, NOW).await.expect("the burst");
        let attempt = limiter.acquire(N, ms(50)).now_or_never();
        assert_eq!(attempt, Some(Err(limited(ms(100)))));
        // Nothing was reserved: the next caller's token is still 100 ms away.
        assert_eq!(limiter.acquire(N, NOW).await, Err(limited(ms(100))));
        tokio::time::advance(ms(100)).await;
        assert_eq!(limiter.acquire(N, NOW).await, Ok(()));
    }

    #[tokio::test(start_paused = true)]
    async fn critical_calls_keep_their_reserve() {
        // 20 % of 10 tokens are for critical calls only.
        let limiter = limiter(10, 10, 20);
        for _ in 0..8 {
            assert_eq!(limiter.acquire(N, NOW).await, Ok(()));
        }
        // Two tokens left, both reserved: normal waits for one more.
        assert_eq!(limiter.acquire(N, NOW).await, Err(limited(ms(100))));
        assert_eq!(limiter.snapshot().available_tokens, 2);
        assert_eq!(limiter.acquire(C, NOW).await, Ok(()));
        assert_eq!(limiter.acquire(C, NOW).await, Ok(()));
        assert_eq!(limiter.acquire(C, NOW).await, Err(limited(ms(100))));
        // Normal now needs three tokens' worth of refill; critical one.
        assert_eq!(limiter.acquire(N, NOW).await, Err(limited(ms(300))));
        assert_eq!(timed(&limiter, C, ms(1_000)).await, ms(100));
    }

    #[test]
    fn the_reserve_leaves_every_class_a_token_of_a_full_bucket() {
        let limiter = limiter(1, 1, 90);
        assert_eq!(limiter.acquire(N, NOW).now_or_never(), Some(Ok(())));
    }

    #[tokio::test(start_paused = true)]
    async fn the_quota_gate_holds_every_caller_until_it_reopens() {
        let limiter = limiter(10, 10, 0);
        limiter.close_until(Instant::now() + ms(5_000));
        assert_eq!(limiter.snapshot().gate_closed_for_ms, Some(5_000));
        assert_eq!(limiter.acquire(C, ms(1_000)).await, Err(limited(ms(5_000))));
        assert_eq!(timed(&limiter, N, ms(5_000)).await, ms(5_000));
        assert_eq!(limiter.snapshot().gate_closed_for_ms, None);
        assert_eq!(limiter.acquire(N, NOW).await, Ok(()));
    }

    #[tokio::test(start_paused = true)]
    async fn the_quota_gate_is_only_ever_extended() {
        let limiter = limiter(10, 10, 0);
        let now = Instant::now();
        limiter.close_until(now + ms(5_000));
        limiter.close_until(now + ms(1_000));
        assert_eq!(limiter.snapshot().gate_closed_for_ms, Some(5_000));
        limiter.close_until(now + ms(8_000));
        assert_eq!(limiter.snapshot().gate_closed_for_ms, Some(8_000));
        tokio::time::advance(ms(2_000)).await;
        assert_eq!(limiter.acquire(N, NOW).await, Err(limited(ms(6_000))));
        // A gate in the past changes nothing.
        limiter.close_until(now);
        assert_eq!(limiter.snapshot().gate_closed_for_ms, Some(6_000));
    }

    #[tokio::test(start_paused = true)]
    async fn callers_behind_the_gate_leave_at_the_bucket_pace() {
        let limiter = Arc::new(limiter(10, 2, 0));
        limiter.close_until(Instant::now() + ms(1_000));
        let waiters: Vec<_> = (0..4)
            .map(|_| {
                let limiter = Arc::clone(&limiter);
                tokio::spawn(async move { timed(&limiter, N, ms(10_000)).await })
            })
            .collect();
        let mut waited = Vec::new();
        for waiter in waiters {
            waited.push(waiter.await.expect("join"));
        }
        // The burst at reopening, then 10 per second; no flood of tokens
        // that accrued while the gate was closed.
        assert_eq!(waited, [ms(1_000), ms(1_000), ms(1_100), ms(1_200)]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_cancelled_last_reservation_gives_its_token_back() {
        let limiter = limiter(10, 1, 0);
        limiter.acquire(N, NOW).await.expect("the burst");
        let mut sleeping = Box::pin(limiter.acquire(N, ms(1_000)));
        assert!((&mut sleeping).now_or_never().is_none());
        assert_eq!(limiter.acquire(N, NOW).await, Err(limited(ms(200))));
        drop(sleeping);
        assert_eq!(limiter.acquire(N, NOW).await, Err(limited(ms(100))));
    }

    #[tokio::test(start_paused = true)]
    async fn a_cancelled_earlier_reservation_is_lost() {
        let limiter = limiter(10, 1, 0);
        limiter.acquire(N, NOW).await.expect("the burst");
        let mut first = Box::pin(limiter.acquire(N, ms(1_000)));
        assert!((&mut first).now_or_never().is_none());
        let mut second = Box::pin(limiter.acquire(N, ms(1_000)));
        assert!((&mut second).now_or_never().is_none());
        drop(first);
        // Handing the first slot on would put two calls in the second's
        // slot; the limiter stays strict instead.
        assert_eq!(limiter.acquire(N, NOW).await, Err(limited(ms(300))));
        drop(second);
    }

    #[tokio::test(start_paused = true)]
    async fn huge_durations_and_rates_do_not_overflow() {
        let limiter = limiter(u32::MAX, u32::MAX, 90);
        assert_eq!(limiter.acquire(N, Duration::MAX).await, Ok(()));
        tokio::time::advance(Duration::from_secs(10 * 365 * 86_400)).await;
        assert_eq!(limiter.snapshot().available_tokens, u32::MAX);

        let century = Duration::from_secs(100 * 365 * 86_400);
        limiter.close_until(Instant::now() + century);
        assert_eq!(limiter.acquire(C, ms(1_000)).await, Err(limited(century)));
        assert_eq!(limiter.acquire(C, Duration::MAX).now_or_never(), None);

        let slow = self::limiter(1, 1, 0);
        slow.acquire(N, NOW).await.expect("the burst");
        assert_eq!(slow.acquire(N, NOW).await, Err(limited(ms(1_000))));
        assert_eq!(timed(&slow, N, Duration::MAX).await, ms(1_000));
    }

    #[tokio::test(start_paused = true)]
    async fn zero_settings_do_not_panic() {
        let limiter = limiter(0, 0, 200);
        assert_eq!(limiter.acquire(N, NOW).await, Ok(()));
        assert_eq!(limiter.acquire(N, NOW).await, Err(limited(ms(1_000))));
    }

    #[test]
    fn the_limiter_and_its_future_cross_threads() {
        fn send_sync<T: Send + Sync>() {}
        fn send<T: Send>(_: &T) {}
        send_sync::<RateLimiter>();
        send(&limiter(1, 1, 0).acquire(N, NOW));
    }

    #[test]
    fn config_from_a_policy() {
        let policy = RateLimit {
            per_second: 10,
            burst: None,
            critical_reserve_percent: None,
        };
        let expected = RateLimitConfig {
            per_second: 10,
            burst: 10,
            critical_reserve_percent: 0,
        };
        assert_eq!(RateLimitConfig::from(&policy), expected);
        let policy = RateLimit {
            per_second: 10,
            burst: Some(20),
            critical_reserve_percent: Some(25),
        };
        let limiter = RateLimiter::new(RateLimitConfig::from(&policy));
        assert_eq!(limiter.config().burst, 20);
        assert_eq!(limiter.config().critical_reserve_percent, 25);
    }

    #[tokio::test(start_paused = true)]
    async fn snapshot_serializes() {
        let limiter = limiter(10, 3, 0);
        limiter.close_until(Instant::now() + Duration::from_micros(1_500));
        let json = serde_json::to_value(limiter.snapshot()).expect("serializes");
        assert_eq!(
            json,
            serde_json::json!({ "available_tokens": 3, "gate_closed_for_ms": 2 })
        );
    }
}
