//! Retry: run an attempt again when it failed in a way worth retrying.
//!
//! Three things bound how often a call is retried:
//!
//! - `max_attempts` counts every attempt, the first included.
//! - The deadline: a back-off that would end at or after the call's deadline
//!   is not slept at all; the last failure is returned at once so the caller
//!   can go to its fallback or DLQ while there is still time (DESIGN.md,
//!   "Timeouts" and "Retry").
//! - The [`RetryBudget`]. Max-attempts alone multiplies load exactly when the
//!   upstream is least able to take it: with three attempts, an outage turns
//!   every call into three. A budget caps retries as a share of the calls
//!   seen in a rolling window (the breaker's window), so a healthy operation
//!   retries freely while an outage costs at most `budget_percent` more
//!   traffic than it would without retry.
//!
//! Between attempts the layer sleeps an exponential, jittered back-off, or
//! longer when the upstream said how long to wait (`Retry-After`,
//! `x-ratelimit-reset`, see [`retry_after`]). Sleeps use the tokio clock, so
//! tests run on a paused clock.

use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use http::HeaderMap;
use rand::RngExt;
use tokio::time::Instant;

use super::{Failure, Reply};
use crate::policy::effective::EffectiveRetry;
use crate::policy::model::{Backoff, Condition, Jitter};

/// Retries a budget allows in every window however few calls it saw.
///
/// A percentage of a small number is nothing: at 20 %, an operation called
/// four times a minute would never retry at all. Ten retries per window let a
/// quiet operation ride out a blip, and are too few to hurt an upstream that
/// is down (a busy operation is bounded by the percentage instead).
pub const MIN_RETRIES_PER_WINDOW: u32 = 10;

/// The longest server wait hint taken at face value; larger hints are cut to
/// this (a daily quota resets within a day, anything longer is a broken clock
/// or a broken header).
pub const MAX_HINT: Duration = Duration::from_secs(24 * 60 * 60);

/// Above this, an `x-ratelimit-reset` value is a unix time in seconds, not a
/// number of seconds to wait (1e9 s is about 31 years; 1e9 as a time is 2001).
const EPOCH_THRESHOLD: f64 = 1e9;

/// Above this, an `x-ratelimit-reset` value is a unix time in milliseconds
/// (1e12 ms is 2001; 1e12 s would be 31,000 years).
const EPOCH_MILLIS_THRESHOLD: f64 = 1e12;

/// Exponential back-off with jitter, ready to compute delays.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackoffConfig {
    /// Delay before the first retry.
    pub initial: Duration,
    /// Growth factor per retry in thousandths (`2000` doubles). Factors
    /// below 1 count as 1; the policy schema refuses them anyway.
    pub multiplier_milli: u32,
    /// Largest delay, before jitter.
    pub max: Duration,
    /// How the delay is randomised.
    pub jitter: Jitter,
}

impl From<&Backoff> for BackoffConfig {
    fn from(b: &Backoff) -> Self {
        BackoffConfig {
            initial: b.initial.to_std(),
            multiplier_milli: b.multiplier.millis(),
            max: b.max.to_std(),
            jitter: b.jitter,
        }
    }
}

impl BackoffConfig {
    /// The delay before retry number `retry` (1 is the wait before the second
    /// attempt): `min(max, initial * multiplier^(retry - 1))`, then jittered:
    /// [`Jitter::Full`] is uniform in `0..=d`, [`Jitter::Equal`] uniform in
    /// `d/2..=d`, [`Jitter::None`] exactly `d`.
    ///
    /// `unit` is a uniform random number in `[0, 1)` supplied by the caller,
    /// so tests are deterministic; values outside (or NaN) are clamped.
    pub fn delay(&self, retry: u32, unit: f64) -> Duration {
        let max = self.max.as_nanos();
        let factor = u128::from(self.multiplier_milli.max(1000));
        let mut d = self.initial.as_nanos().min(max);
        // Integer steps keep delays exact (100ms * 2^3 is 800ms, not 799.99…).
        // The loop ends once the cap is reached, so a huge `retry` is cheap;
        // a zero delay or a factor of 1 never grows, so stop at once.
        for _ in 1..retry.max(1) {
            if d >= max || d == 0 || factor == 1000 {
                break;
            }
            d = (d.saturating_mul(factor) / 1000).min(max);
        }
        let unit = if unit.is_nan() {
            0.0
        } else {
            unit.clamp(0.0, 1.0)
        };
        let jittered = match self.jitter {
            Jitter::None => d,
            Jitter::Full => scale(d, unit),
            Jitter::Equal => {
                let half = d / 2;
                half + scale(d - half, unit)
            }
        };
        duration_from_nanos(jittered)
    }
}

/// `nanos * unit` for `unit` in `[0, 1]`; float precision is ample here.
fn scale(nanos: u128, unit: f64) -> u128 {
    // `as` saturates for floats, and the product never exceeds `nanos`.
    ((nanos as f64 * unit) as u128).min(nanos)
}

fn duration_from_nanos(nanos: u128) -> Duration {
    const NANOS_PER_SEC: u128 = 1_000_000_000;
    let secs = u64::try_from(nanos / NANOS_PER_SEC).unwrap_or(u64::MAX);
    // The remainder is below 1e9, so it fits.
    let sub = u32::try_from(nanos % NANOS_PER_SEC).unwrap_or(0);
    Duration::new(secs, sub)
}

/// A retry policy with every field decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryConfig {
    /// Attempts in all, the first included; `0` and `1` both mean no retry.
    pub max_attempts: u32,
    /// Back-off between attempts.
    pub backoff: BackoffConfig,
    /// Failures worth another attempt.
    pub on: Vec<Condition>,
    /// Wait at least as long as the upstream's `Retry-After` or
    /// `x-ratelimit-reset` asks (never past the deadline).
    pub respect_retry_after: bool,
    /// Retries allowed as a percentage of the calls in the budget's window.
    pub budget_percent: u8,
}

impl From<&EffectiveRetry> for RetryConfig {
    fn from(r: &EffectiveRetry) -> Self {
        RetryConfig {
            max_attempts: r.max_attempts.value,
            backoff: BackoffConfig::from(&r.backoff.value),
            on: r.on.value.clone(),
            respect_retry_after: r.respect_retry_after.value,
            budget_percent: r.budget_percent.value,
        }
    }
}

/// A share of calls that may be retried, over a rolling window.
///
/// The window is split into buckets like the circuit breaker's; a bucket
/// older than the window is forgotten as a whole, so the window rolls in
/// steps of `window / buckets`. Shared by every call of an operation.
#[derive(Debug)]
pub struct RetryBudget {
    percent: u8,
    bucket_len: Duration,
    start: Instant,
    state: Mutex<Ring>,
}

#[derive(Debug)]
struct Ring {
    /// Per bucket: calls and retries.
    buckets: Vec<Counts>,
    /// Index (since `start`, in bucket lengths) of the newest bucket.
    head: u64,
}

#[derive(Debug, Clone, Copy, Default)]
struct Counts {
    calls: u32,
    retries: u32,
}

impl RetryBudget {
    /// A budget allowing `percent` % of the calls in the last `window` as
    /// retries (and at least [`MIN_RETRIES_PER_WINDOW`]). `buckets` of zero
    /// counts as one; a zero window as one millisecond.
    pub fn new(window: Duration, buckets: u32, percent: u8) -> Self {
        let buckets = buckets.max(1);
        let window = window.max(Duration::from_millis(1));
        let bucket_len = (window / buckets).max(Duration::from_nanos(1));
        let len = usize::try_from(buckets).unwrap_or(usize::MAX);
        RetryBudget {
            percent,
            bucket_len,
            start: Instant::now(),
            state: Mutex::new(Ring {
                buckets: vec![Counts::default(); len],
                head: 0,
            }),
        }
    }

    /// Counts one call (not attempt) in the current bucket.
    pub fn record_call(&self) {
        self.with_current(|ring, i| {
            let b = &mut ring.buckets[i];
            b.calls = b.calls.saturating_add(1);
        });
    }

    /// True, and counts the retry, when the retries in the window stay within
    /// `max(MIN_RETRIES_PER_WINDOW, calls * percent / 100)`; false when the
    /// budget is spent.
    pub fn try_spend(&self) -> bool {
        let percent = u64::from(self.percent);
        self.with_current(|ring, i| {
            let (calls, retries) = ring.buckets.iter().fold((0u64, 0u64), |(c, r), b| {
                (c + u64::from(b.calls), r + u64::from(b.retries))
            });
            let allowed = (calls * percent / 100).max(u64::from(MIN_RETRIES_PER_WINDOW));
            if retries < allowed {
                let b = &mut ring.buckets[i];
                b.retries = b.retries.saturating_add(1);
                true
            } else {
                false
            }
        })
    }

    /// Rolls the window forward to now, then runs `f` on the ring and the
    /// index of the current bucket.
    fn with_current<T>(&self, f: impl FnOnce(&mut Ring, usize) -> T) -> T {
        let elapsed = Instant::now().saturating_duration_since(self.start);
        let now =
            u64::try_from(elapsed.as_nanos() / self.bucket_len.as_nanos()).unwrap_or(u64::MAX);
        // A panic while holding the lock cannot leave the counters invalid,
        // so a poisoned lock is still good to use.
        let mut ring = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let len = ring.buckets.len() as u64;
        if now > ring.head {
            let stale = (now - ring.head).min(len);
            for step in 1..=stale {
                let i = ((ring.head + step) % len) as usize;
                ring.buckets[i] = Counts::default();
            }
            ring.head = now;
        }
        let i = (ring.head % len) as usize;
        f(&mut ring, i)
    }
}

/// Runs `attempt(n)` for `n = 1, 2, …` until it succeeds, fails in a way not
/// in `config.on`, `max_attempts` is reached, the budget is spent, or the
/// wait before the next attempt would end at or after `deadline`; in those
/// cases the last failure is returned at once, without sleeping. Returns the
/// result and the number of attempts made.
///
/// Records one call in `budget` per invocation. The wait before a retry is
/// the back-off delay, or with `respect_retry_after` the longer of it and the
/// failure's [`hint`].
pub async fn run<F, Fut>(
    config: &RetryConfig,
    budget: &RetryBudget,
    deadline: Option<Instant>,
    mut attempt: F,
) -> (Result<Reply, Failure>, u32)
where
    F: FnMut(u32) -> Fut,
    Fut: std::future::Future<Output = Result<Reply, Failure>>,
{
    budget.record_call();
    let mut n: u32 = 1;
    loop {
        let failure = match attempt(n).await {
            Ok(reply) => return (Ok(reply), n),
            Err(failure) => failure,
        };
        if n >= config.max_attempts || !failure.matches_any(&config.on) {
            return (Err(failure), n);
        }
        let unit: f64 = rand::rng().random();
        let mut wait = config.backoff.delay(n, unit);
        if config.respect_retry_after
            && let Some(h) = hint(&failure, SystemTime::now())
        {
            wait = wait.max(h);
        }
        if let Some(deadline) = deadline {
            // A wait ending at the deadline leaves no time for the attempt.
            let ends_in_time = Instant::now()
                .checked_add(wait)
                .is_some_and(|end| end < deadline);
            if !ends_in_time {
                tracing::debug!(
                    attempt = n,
                    delay_ms = millis(wait),
                    code = failure.code(),
                    "not retrying: the wait would pass the deadline"
                );
                return (Err(failure), n);
            }
        }
        if !budget.try_spend() {
            tracing::debug!(
                attempt = n,
                code = failure.code(),
                "not retrying: the retry budget is spent"
            );
            return (Err(failure), n);
        }
        tracing::debug!(
            attempt = n,
            delay_ms = millis(wait),
            code = failure.code(),
            "retrying"
        );
        tokio::time::sleep(wait).await;
        n += 1;
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// The server's wait hint in `headers`: `Retry-After` as delta-seconds or an
/// HTTP date (relative to `now`), else `x-ratelimit-reset` as delta seconds,
/// or as a unix time in seconds when larger than 1e9. A time in the past is
/// zero; hints are cut to [`MAX_HINT`]. Unparseable values are ignored.
pub fn retry_after(headers: &HeaderMap, now: SystemTime) -> Option<Duration> {
    let text = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
    };
    let hint = text("retry-after")
        .and_then(|v| parse_retry_after(v, now))
        .or_else(|| text("x-ratelimit-reset").and_then(|v| parse_reset(v, now)))?;
    Some(hint.min(MAX_HINT))
}

/// RFC 9110 §10.2.3: `delay-seconds` (digits only) or an HTTP date.
fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) {
        // Digits that overflow a u64 are still "a very long time".
        return Some(value.parse().map_or(MAX_HINT, Duration::from_secs));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

/// Seconds to wait, or a unix time in seconds; fractions are allowed.
fn parse_reset(value: &str, now: SystemTime) -> Option<Duration> {
    // Only plain decimals: `f64::from_str` would also take "inf", "NaN", "1e3".
    let plain = !value.is_empty()
        && value.bytes().all(|b| b.is_ascii_digit() || b == b'.')
        && value.bytes().filter(|b| *b == b'.').count() <= 1
        && value.bytes().any(|b| b.is_ascii_digit());
    if !plain {
        return None;
    }
    let mut seconds: f64 = value.parse().ok()?;
    if seconds > EPOCH_MILLIS_THRESHOLD {
        // Some APIs send the reset as a unix time in milliseconds.
        seconds /= 1000.0;
    }
    if seconds > EPOCH_THRESHOLD {
        let at = SystemTime::UNIX_EPOCH.checked_add(Duration::try_from_secs_f64(seconds).ok()?)?;
        return Some(at.duration_since(now).unwrap_or(Duration::ZERO));
    }
    Duration::try_from_secs_f64(seconds).ok()
}

/// The wait hint a failure carries: from the headers of a
/// [`Failure::Status`] reply, or the `retry_after` of
/// [`Failure::RateLimited`] and [`Failure::BreakerOpen`].
pub fn hint(failure: &Failure, now: SystemTime) -> Option<Duration> {
    match failure {
        Failure::Status(reply) => retry_after(&reply.headers, now),
        Failure::RateLimited { retry_after } | Failure::BreakerOpen { retry_after } => {
            Some(*retry_after)
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU32, Ordering};

    use bytes::Bytes;
    use http::{HeaderValue, StatusCode};

    use super::*;

    fn backoff(
        initial_ms: u64,
        multiplier_milli: u32,
        max_ms: u64,
        jitter: Jitter,
    ) -> BackoffConfig {
        BackoffConfig {
            initial: Duration::from_millis(initial_ms),
            multiplier_milli,
            max: Duration::from_millis(max_ms),
            jitter,
        }
    }

    fn config(max_attempts: u32) -> RetryConfig {
        RetryConfig {
            max_attempts,
            backoff: backoff(100, 2000, 1000, Jitter::None),
            on: vec![
                Condition::ConnectError,
                Condition::Timeout,
                Condition::ServerError,
                Condition::Status(429),
            ],
            respect_retry_after: true,
            budget_percent: 20,
        }
    }

    fn budget() -> RetryBudget {
        RetryBudget::new(Duration::from_secs(10), 10, 20)
    }

    fn status(code: u16, headers: &[(&'static str, &str)]) -> Failure {
        let mut map = HeaderMap::new();
        for (name, value) in headers {
            map.insert(*name, HeaderValue::from_str(value).expect("valid value"));
        }
        Failure::Status(Box::new(Reply {
            status: StatusCode::from_u16(code).expect("valid status"),
            headers: map,
            body: Bytes::new(),
        }))
    }

    fn ok() -> Reply {
        Reply {
            status: StatusCode::OK,
            headers: HeaderMap::new(),
            body: Bytes::from_static(b"done"),
        }
    }

    /// When each attempt started, by attempt number.
    type Log = Arc<Mutex<Vec<(u32, Instant)>>>;

    /// An attempt that fails with `failure` for the first `failures` attempts,
    /// then succeeds; records when each attempt started.
    fn script(
        failures: u32,
        failure: Failure,
    ) -> (
        impl FnMut(u32) -> std::future::Ready<Result<Reply, Failure>>,
        Log,
    ) {
        let log = Arc::new(Mutex::new(Vec::new()));
        let seen = Arc::clone(&log);
        let f = move |n: u32| {
            seen.lock().expect("lock").push((n, Instant::now()));
            std::future::ready(if n <= failures {
                Err(failure.clone())
            } else {
                Ok(ok())
            })
        };
        (f, log)
    }

    fn gaps(log: &Mutex<Vec<(u32, Instant)>>) -> Vec<Duration> {
        let log = log.lock().expect("lock");
        log.windows(2).map(|w| w[1].1 - w[0].1).collect()
    }

    #[test]
    fn delays_grow_exponentially_up_to_the_cap() {
        let b = backoff(100, 2000, 1000, Jitter::None);
        let delays: Vec<u64> = (1..=6)
            .map(|r| b.delay(r, 0.5).as_millis() as u64)
            .collect();
        assert_eq!(delays, [100, 200, 400, 800, 1000, 1000]);
        assert_eq!(b.delay(0, 0.5), Duration::from_millis(100));
        assert_eq!(b.delay(u32::MAX, 0.5), Duration::from_millis(1000));
        let slow = backoff(100, 1500, 60_000, Jitter::None);
        assert_eq!(slow.delay(3, 0.0), Duration::from_millis(225));
        let flat = backoff(250, 1000, 60_000, Jitter::None);
        assert_eq!(flat.delay(u32::MAX, 0.0), Duration::from_millis(250));
        let capped_start = backoff(5000, 2000, 1000, Jitter::None);
        assert_eq!(capped_start.delay(1, 0.0), Duration::from_millis(1000));
        let huge = BackoffConfig {
            initial: Duration::MAX,
            multiplier_milli: 10_000,
            max: Duration::MAX,
            jitter: Jitter::Full,
        };
        assert!(huge.delay(40, 0.999) <= Duration::MAX);
    }

    #[test]
    fn jitter_stays_within_its_bounds() {
        let full = backoff(100, 2000, 1000, Jitter::Full);
        let equal = backoff(100, 2000, 1000, Jitter::Equal);
        let d = Duration::from_millis(400);
        let mut full_seen = (Duration::MAX, Duration::ZERO);
        let mut equal_seen = (Duration::MAX, Duration::ZERO);
        for i in 0..1000 {
            let unit = f64::from(i) / 1000.0;
            let f = full.delay(3, unit);
            assert!(f <= d, "full jitter {f:?} above {d:?}");
            full_seen = (full_seen.0.min(f), full_seen.1.max(f));
            let e = equal.delay(3, unit);
            assert!(
                e >= d / 2 && e <= d,
                "equal jitter {e:?} outside {:?}..={d:?}",
                d / 2
            );
            equal_seen = (equal_seen.0.min(e), equal_seen.1.max(e));
        }
        // The whole range is used, not just a corner of it.
        assert_eq!(full_seen.0, Duration::ZERO);
        assert!(full_seen.1 > d * 99 / 100);
        assert_eq!(equal_seen.0, d / 2);
        assert!(equal_seen.1 > d * 99 / 100);
        // Out-of-range units are clamped, never a panic.
        for unit in [f64::NAN, -1.0, 2.0, f64::INFINITY, f64::NEG_INFINITY] {
            assert!(full.delay(3, unit) <= d);
            assert!(equal.delay(3, unit) >= d / 2);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn retries_until_success_and_counts_attempts() {
        let (attempt, log) = script(2, status(503, &[]));
        let (result, attempts) = run(&config(5), &budget(), None, attempt).await;
        assert_eq!(result, Ok(ok()));
        assert_eq!(attempts, 3);
        assert_eq!(
            gaps(&log),
            [Duration::from_millis(100), Duration::from_millis(200)]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn stops_at_max_attempts_with_the_last_failure() {
        let (attempt, log) = script(u32::MAX, Failure::Connect("refused".into()));
        let (result, attempts) = run(&config(3), &budget(), None, attempt).await;
        assert_eq!(result, Err(Failure::Connect("refused".into())));
        assert_eq!(attempts, 3);
        assert_eq!(log.lock().expect("lock").len(), 3);

        for max in [0, 1] {
            let (attempt, _) = script(u32::MAX, Failure::Connect("refused".into()));
            let (_, attempts) = run(&config(max), &budget(), None, attempt).await;
            assert_eq!(attempts, 1, "max_attempts {max}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn backoff_grows_and_is_capped_between_attempts() {
        let (attempt, log) = script(
            u32::MAX,
            Failure::AttemptTimeout {
                after: Duration::from_secs(1),
            },
        );
        let (_, attempts) = run(&config(7), &budget(), None, attempt).await;
        assert_eq!(attempts, 7);
        let ms: Vec<u128> = gaps(&log).iter().map(Duration::as_millis).collect();
        assert_eq!(ms, [100, 200, 400, 800, 1000, 1000]);
    }

    #[tokio::test(start_paused = true)]
    async fn failures_not_in_on_are_not_retried() {
        let not_retryable = [
            status(400, &[]),
            status(404, &[]),
            Failure::BreakerOpen {
                retry_after: Duration::from_secs(1),
            },
            Failure::RateLimited {
                retry_after: Duration::from_secs(1),
            },
            Failure::BadParams("missing param `params.x`".into()),
            Failure::BodyTooLarge { limit: 10 },
            Failure::DeadlineExceeded,
        ];
        for failure in not_retryable {
            let start = Instant::now();
            let (attempt, _) = script(u32::MAX, failure.clone());
            let (result, attempts) = run(&config(5), &budget(), None, attempt).await;
            assert_eq!((result, attempts), (Err(failure), 1));
            assert_eq!(Instant::now(), start, "slept before giving up");
        }
        // 429 is retried because `on` lists it.
        let (attempt, _) = script(1, status(429, &[]));
        assert_eq!(run(&config(5), &budget(), None, attempt).await.1, 2);
    }

    #[tokio::test(start_paused = true)]
    async fn retry_after_lengthens_the_wait_when_respected() {
        let slow_down = status(429, &[("retry-after", "3")]);
        let (attempt, log) = script(1, slow_down.clone());
        let (result, attempts) = run(&config(3), &budget(), None, attempt).await;
        assert_eq!((result.is_ok(), attempts), (true, 2));
        assert_eq!(gaps(&log), [Duration::from_secs(3)]);

        let mut ignoring = config(3);
        ignoring.respect_retry_after = false;
        let (attempt, log) = script(1, slow_down);
        let _ = run(&ignoring, &budget(), None, attempt).await;
        assert_eq!(gaps(&log), [Duration::from_millis(100)]);

        // A hint shorter than the back-off does not shorten it.
        let (attempt, log) = script(1, status(503, &[("retry-after", "0")]));
        let _ = run(&config(3), &budget(), None, attempt).await;
        assert_eq!(gaps(&log), [Duration::from_millis(100)]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_wait_past_the_deadline_returns_at_once() {
        let start = Instant::now();
        let deadline = start + Duration::from_secs(2);
        let (attempt, log) = script(u32::MAX, status(503, &[("retry-after", "5")]));
        let (result, attempts) = run(&config(5), &budget(), Some(deadline), attempt).await;
        assert_eq!(attempts, 1);
        assert_eq!(result.map_err(|f| f.code()), Err("upstream_status"));
        assert_eq!(Instant::now(), start, "the clock advanced: it slept");
        assert_eq!(log.lock().expect("lock").len(), 1);

        // Back-off alone: 100, 200, 400 fit in 750ms; the 800ms wait does not.
        let start = Instant::now();
        let deadline = start + Duration::from_millis(750);
        let (attempt, _) = script(u32::MAX, Failure::Connect("refused".into()));
        let (_, attempts) = run(&config(10), &budget(), Some(deadline), attempt).await;
        assert_eq!(attempts, 4);
        assert_eq!(Instant::now() - start, Duration::from_millis(700));

        // A wait ending exactly at the deadline leaves no time for an attempt.
        let start = Instant::now();
        let (attempt, _) = script(u32::MAX, Failure::Connect("refused".into()));
        let deadline = Some(start + Duration::from_millis(100));
        assert_eq!(run(&config(10), &budget(), deadline, attempt).await.1, 1);
        assert_eq!(Instant::now(), start);
    }

    #[tokio::test(start_paused = true)]
    async fn an_exhausted_budget_stops_retries_until_the_window_rolls() {
        // 0 % leaves only the floor of MIN_RETRIES_PER_WINDOW retries.
        let budget = RetryBudget::new(Duration::from_secs(10), 10, 0);
        let (attempt, _) = script(u32::MAX, Failure::Connect("refused".into()));
        let (_, attempts) = run(&config(100), &budget, None, attempt).await;
        assert_eq!(attempts, MIN_RETRIES_PER_WINDOW + 1);
        let (attempt, _) = script(u32::MAX, Failure::Connect("refused".into()));
        let start = Instant::now();
        let (_, attempts) = run(&config(100), &budget, None, attempt).await;
        assert_eq!(attempts, 1, "retried on a spent budget");
        assert_eq!(Instant::now(), start);

        // The first run slept 100+200+400+800 + 6*1000 = 7.5s; after 10s more
        // every bucket holding those retries has rolled out of the window.
        tokio::time::advance(Duration::from_secs(10)).await;
        let (attempt, _) = script(2, Failure::Connect("refused".into()));
        let (result, attempts) = run(&config(100), &budget, None, attempt).await;
        assert_eq!((result.is_ok(), attempts), (true, 3));
    }

    #[tokio::test(start_paused = true)]
    async fn budget_allows_a_share_of_calls_and_rolls_by_bucket() {
        let budget = RetryBudget::new(Duration::from_secs(10), 10, 20);
        for _ in 0..100 {
            budget.record_call();
        }
        // 20 % of 100 calls.
        assert_eq!((0..30).filter(|_| budget.try_spend()).count(), 20);

        // Calls and retries age out bucket by bucket.
        let budget = RetryBudget::new(Duration::from_secs(10), 10, 50);
        for _ in 0..40 {
            budget.record_call();
        }
        assert_eq!((0..30).filter(|_| budget.try_spend()).count(), 20);
        tokio::time::advance(Duration::from_secs(5)).await;
        assert!(!budget.try_spend(), "window rolled too early");
        tokio::time::advance(Duration::from_millis(5001)).await;
        // Everything above was in the first bucket, now out of the window.
        assert_eq!(
            (0..30).filter(|_| budget.try_spend()).count(),
            MIN_RETRIES_PER_WINDOW as usize
        );
        // A long silence clears the ring however many buckets it skipped.
        tokio::time::advance(Duration::from_secs(3600)).await;
        assert!(budget.try_spend());
    }

    #[test]
    fn degenerate_budgets_do_not_panic() {
        let b = RetryBudget::new(Duration::ZERO, 0, 100);
        b.record_call();
        assert!(b.try_spend());
        let b = RetryBudget::new(Duration::from_nanos(3), 1000, 255);
        b.record_call();
        assert!(b.try_spend());
    }

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(*name, HeaderValue::from_str(value).expect("valid value"));
        }
        map
    }

    #[test]
    fn retry_after_reads_seconds_and_http_dates() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let h = |v: &str| retry_after(&headers(&[("retry-after", v)]), now);
        assert_eq!(h("120"), Some(Duration::from_secs(120)));
        assert_eq!(h(" 7 "), Some(Duration::from_secs(7)));
        assert_eq!(h("0"), Some(Duration::ZERO));
        let later = httpdate::fmt_http_date(now + Duration::from_secs(90));
        assert_eq!(h(&later), Some(Duration::from_secs(90)));
        let earlier = httpdate::fmt_http_date(now - Duration::from_secs(90));
        assert_eq!(h(&earlier), Some(Duration::ZERO));
        // Capped.
        assert_eq!(h("99999999999999999999999"), Some(MAX_HINT));
        assert_eq!(h("604800"), Some(MAX_HINT));
        for garbage in [
            "",
            "-5",
            "1.5",
            "soon",
            "1e3",
            "Wed, 32 Foo 2024 99:00:00 GMT",
            "١٢",
        ] {
            assert_eq!(h(garbage), None, "{garbage:?}");
        }
        let mut binary = HeaderMap::new();
        binary.insert(
            "retry-after",
            HeaderValue::from_bytes(b"\xff\xfe").expect("obs-text is a valid header value"),
        );
        assert_eq!(retry_after(&binary, now), None);
        assert_eq!(retry_after(&HeaderMap::new(), now), None);
    }

    #[test]
    fn x_ratelimit_reset_reads_deltas_and_epochs() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let h = |v: &str| retry_after(&headers(&[("x-ratelimit-reset", v)]), now);
        assert_eq!(h("30"), Some(Duration::from_secs(30)));
        assert_eq!(h("1.5"), Some(Duration::from_millis(1500)));
        assert_eq!(h("1700000042"), Some(Duration::from_secs(42)));
        assert_eq!(h("1699999000"), Some(Duration::ZERO));
        assert_eq!(h("1800000000"), Some(MAX_HINT));
        for garbage in ["", ".", "1.2.3", "inf", "NaN", "-1", "1e3", "soon"] {
            assert_eq!(h(garbage), None, "{garbage:?}");
        }
        // Retry-After wins; unparseable Retry-After falls back to the reset.
        let both = headers(&[("retry-after", "5"), ("x-ratelimit-reset", "30")]);
        assert_eq!(retry_after(&both, now), Some(Duration::from_secs(5)));
        let bad = headers(&[("retry-after", "soon"), ("x-ratelimit-reset", "30")]);
        assert_eq!(retry_after(&bad, now), Some(Duration::from_secs(30)));
    }

    #[test]
    fn hints_come_from_replies_and_refusals() {
        let now = SystemTime::now();
        let wait = Duration::from_secs(4);
        assert_eq!(hint(&status(429, &[("retry-after", "4")]), now), Some(wait));
        assert_eq!(hint(&status(503, &[]), now), None);
        assert_eq!(
            hint(&Failure::RateLimited { retry_after: wait }, now),
            Some(wait)
        );
        assert_eq!(
            hint(&Failure::BreakerOpen { retry_after: wait }, now),
            Some(wait)
        );
        assert_eq!(hint(&Failure::Connect("refused".into()), now), None);
    }

    #[test]
    fn config_comes_from_the_effective_policy() {
        let effective = EffectiveRetry::resolve(None, None);
        let c = RetryConfig::from(&effective);
        assert_eq!(c.max_attempts, effective.max_attempts.value);
        assert_eq!(c.on, effective.on.value);
        assert_eq!(c.budget_percent, 20);
        assert!(c.respect_retry_after);
        assert_eq!(c.backoff, BackoffConfig::from(&effective.backoff.value));
        assert_eq!(c.backoff.initial, effective.backoff.value.initial.to_std());
    }

    #[test]
    fn the_retry_future_is_send() {
        fn assert_send<T: Send>(_: T) {}
        let (config, budget) = (config(3), budget());
        assert_send(run(&config, &budget, None, |_| async {
            Err::<Reply, _>(Failure::DeadlineExceeded)
        }));
    }

    #[tokio::test(start_paused = true)]
    async fn attempts_are_numbered_from_one() {
        let seen = Arc::new(AtomicU32::new(0));
        let s = Arc::clone(&seen);
        let (_, attempts) = run(&config(4), &budget(), None, move |n| {
            let previous = s.swap(n, Ordering::SeqCst);
            assert_eq!(previous + 1, n);
            std::future::ready(Err(Failure::Connect("refused".into())))
        })
        .await;
        assert_eq!((attempts, seen.load(Ordering::SeqCst)), (4, 4));
    }

    #[test]
    fn an_epoch_in_milliseconds_is_read_as_a_time() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_733_220_000);
        let mut h = HeaderMap::new();
        h.insert(
            "x-ratelimit-reset",
            HeaderValue::from_static("1733220030000"),
        );
        assert_eq!(retry_after(&h, now), Some(Duration::from_secs(30)));
    }
}
