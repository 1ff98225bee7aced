//! The circuit breaker: stops sending an operation's calls to an upstream
//! that keeps failing, and lets a few trial calls find out when it is back.
//!
//! # State machine
//!
//! ```text
//!             window holds >= volume_threshold calls and
//!             failure% >= error_threshold_percentage (or slow% >= its threshold)
//!   Closed ─────────────────────────────────────────────────────────────────▶ Open
//!     ▲                                                                      │
//!     │ all half_open_trials trials succeed                                  │ reset_timeout elapsed:
//!     │ (fresh window, base reset timeout)                                   │ the next try_acquire
//!     │                                                                      ▼
//!     └─────────────────────────────────────────────────────────────────── HalfOpen
//!                           any trial fails, or no verdict within
//!                           half_open_max_wait ──▶ Open (reset timeout doubles, up to the max)
//! ```
//!
//! Every move happens inside a call to [`Breaker::try_acquire`] or
//! [`BreakerPermit::record`] (or an admin action): there is no background task,
//! so a breaker nobody calls costs nothing and its state is "as of the last
//! call". Admin may pin the breaker [`ForcedOpen`](BreakerState::ForcedOpen) or
//! [`ForcedClosed`](BreakerState::ForcedClosed) until [`Breaker::reset`].
//! Every transition is a [`Transition`] on a broadcast channel
//! ([`Breaker::subscribe`]).
//!
//! # Why refusals never count
//!
//! The window measures the *upstream*. A call the breaker refused never reached
//! it, and neither did a call the bulkhead or the rate limiter turned away
//! after the breaker admitted it (the pipeline drops such a permit unrecorded).
//! Counting refusals as failures (opossum does) makes a breaker feed on
//! itself: an open breaker's own rejections keep the failure rate high, and a
//! full bulkhead opens the breaker of a healthy upstream. So only
//! [`BreakerPermit::record`] counts, and a permit dropped without a verdict
//! (refused further in, or the caller cancelled) counts nothing.
//!
//! # Cost
//!
//! Rejecting while open is one atomic load, one clock read and one atomic
//! increment, with no lock, so a breaker hammered by many threads while open
//! stays cheap. Every other path takes one uncontended mutex; the window is a
//! fixed ring of buckets allocated once, rolled in O(buckets) at worst.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Serialize, Serializer};
use tokio::sync::broadcast;
use tokio::time::Instant;

use super::{Failure, Verdict};
use crate::policy::effective::EffectiveBreaker;
use crate::policy::model::{BreakerMode, SlowCall};

/// Most buckets a window is split into (the schema's bound); more is clamped.
pub const MAX_BUCKETS: u32 = 1000;

/// Transitions a slow [`Breaker::subscribe`] receiver may fall behind by
/// before it sees `RecvError::Lagged`. The runtime's receiver takes each at
/// once; every breaker allocates this many slots (64 bytes each), so with
/// 10,000 operations 64 slots took 40 MiB, 16 take 10.
pub const EVENT_CAPACITY: usize = 16;

/// Slow-call detection: calls slower than `duration` count as slow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SlowCallConfig {
    /// A call whose latency is above this is slow, whatever its verdict.
    pub duration: Duration,
    /// Slow percentage of the window at or above which the breaker opens.
    pub threshold_percentage: u8,
}

impl From<&SlowCall> for SlowCallConfig {
    fn from(slow: &SlowCall) -> Self {
        SlowCallConfig {
            duration: slow.duration.to_std(),
            threshold_percentage: slow.threshold_percentage,
        }
    }
}

/// The settings of one [`Breaker`], in standard durations.
///
/// Which outcomes count as failures (`failure_on`) is not here: the caller
/// decides the [`Verdict`] it records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BreakerConfig {
    /// `enforce` rejects while open; `metrics_only` never rejects and counts
    /// what it would have rejected.
    pub mode: BreakerMode,
    /// Failure percentage of the window at or above which the breaker opens.
    pub error_threshold_percentage: u8,
    /// Calls the window must hold before the breaker may open.
    pub volume_threshold: u32,
    /// Length of the rolling window.
    pub window: Duration,
    /// Buckets the window is split into (1 to [`MAX_BUCKETS`]; clamped).
    pub buckets: u32,
    /// How long the breaker stays open before half-opening (the base value).
    pub reset_timeout: Duration,
    /// When set, the reset timeout doubles after each failed half-open,
    /// up to this bound.
    pub max_reset_timeout: Option<Duration>,
    /// Concurrent trial calls admitted while half-open (at least 1).
    pub half_open_trials: u32,
    /// Longest a half-open breaker waits for its verdict before opening again.
    pub half_open_max_wait: Duration,
    /// Slow-call rule, if any.
    pub slow_call: Option<SlowCallConfig>,
}

impl From<&EffectiveBreaker> for BreakerConfig {
    fn from(b: &EffectiveBreaker) -> Self {
        BreakerConfig {
            mode: b.mode.value,
            error_threshold_percentage: b.error_threshold_percentage.value,
            volume_threshold: b.volume_threshold.value,
            window: b.window.value.to_std(),
            buckets: b.buckets.value,
            reset_timeout: b.reset_timeout.value.to_std(),
            max_reset_timeout: b.max_reset_timeout.value.map(|d| d.to_std()),
            half_open_trials: b.half_open_trials.value,
            half_open_max_wait: b.half_open_max_wait.value.to_std(),
            slow_call: b.slow_call.value.as_ref().map(SlowCallConfig::from),
        }
    }
}

/// Where a breaker stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BreakerState {
    /// Calls pass and are counted.
    Closed,
    /// Calls fail fast until the reset timeout has passed.
    Open,
    /// A few trial calls pass; the rest fail fast.
    HalfOpen,
    /// Pinned open by admin: every call fails fast until reset.
    ForcedOpen,
    /// Pinned closed by admin: no call fails fast, calls are still counted.
    ForcedClosed,
}

impl BreakerState {
    /// The state's name: `closed`, `open`, `half_open`, `forced_open` or
    /// `forced_closed` (as serialized).
    pub fn as_str(self) -> &'static str {
        match self {
            BreakerState::Closed => "closed",
            BreakerState::Open => "open",
            BreakerState::HalfOpen => "half_open",
            BreakerState::ForcedOpen => "forced_open",
            BreakerState::ForcedClosed => "forced_closed",
        }
    }
}

impl fmt::Display for BreakerState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One state change of a breaker, as broadcast to [`Breaker::subscribe`]rs.
///
/// Admin actions are always sent, even when the state does not change (for
/// instance `reset` of a closed breaker, which still clears its window).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Transition {
    /// The state left.
    pub from: BreakerState,
    /// The state entered.
    pub to: BreakerState,
    /// Wall-clock time of the change; serialized as Unix milliseconds.
    #[serde(serialize_with = "unix_millis")]
    pub at: SystemTime,
    /// Why: `failure_threshold`, `slow_call_threshold`,
    /// `reset_timeout_elapsed`, `trials_succeeded`, `probe_passed`, `trial_failed`,
    /// `half_open_max_wait`, `force_open`, `force_closed` or `reset`.
    pub reason: &'static str,
}

/// Calls in the rolling window.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize)]
pub struct WindowCounts {
    /// Recorded calls (successes plus failures).
    pub calls: u64,
    /// Calls recorded as [`Verdict::Success`].
    pub successes: u64,
    /// Calls recorded as [`Verdict::Failure`].
    pub failures: u64,
    /// Calls slower than the slow-call duration, whatever their verdict.
    pub slow: u64,
}

/// A point-in-time view of a breaker, for the admin API and metrics.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BreakerSnapshot {
    /// Current state (as of the last call; see the module docs).
    pub state: BreakerState,
    /// Whether the breaker enforces or only reports.
    pub mode: BreakerMode,
    /// Wall-clock time of the last transition (or of creation); serialized as
    /// Unix milliseconds.
    #[serde(serialize_with = "unix_millis")]
    pub since: SystemTime,
    /// Calls in the rolling window now.
    pub window: WindowCounts,
    /// Failures as a whole percentage of the window's calls, rounded down
    /// (0 when empty); the breaker opens when this reaches the threshold.
    pub failure_percentage: u8,
    /// Slow calls as a whole percentage of the window's calls, rounded down.
    pub slow_percentage: u8,
    /// The reset timeout the next opening will use, in milliseconds.
    pub reset_timeout_ms: u64,
    /// While open: milliseconds until a trial may pass (0 once due).
    pub retry_after_ms: Option<u64>,
    /// Calls rejected since creation (never reset).
    pub rejected: u64,
    /// Calls a `metrics_only` breaker would have rejected since creation
    /// (never reset).
    pub would_have_rejected: u64,
    /// Trial calls in flight while half-open.
    pub half_open_trials_in_flight: u32,
}

fn unix_millis<S: Serializer>(time: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
    let millis = time
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
    s.serialize_u64(millis)
}

/// Counts of one bucket (and the running totals of the window).
#[derive(Debug, Clone, Copy, Default)]
struct Bucket {
    successes: u64,
    failures: u64,
    slow: u64,
}

/// The rolling window: a ring of buckets, `head` the current one, which began
/// at `head_start`. Running totals avoid summing the ring on every call.
#[derive(Debug)]
struct Window {
    buckets: Box<[Bucket]>,
    head: usize,
    head_start: Instant,
    width_nanos: u64,
    totals: Bucket,
}

impl Window {
    fn new(length: Duration, buckets: u32, now: Instant) -> Window {
        let n = buckets.clamp(1, MAX_BUCKETS);
        let width = length.as_nanos() / u128::from(n);
        Window {
            buckets: vec![Bucket::default(); n as usize].into_boxed_slice(),
            head: 0,
            head_start: now,
            width_nanos: u64::try_from(width).unwrap_or(u64::MAX).max(1),
            totals: Bucket::default(),
        }
    }

    /// Retires the buckets that have aged out by `now`: O(buckets) at worst.
    fn roll(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.head_start).as_nanos();
        let width = u128::from(self.width_nanos);
        if elapsed < width {
            return;
        }
        let steps = elapsed / width;
        let len = self.buckets.len();
        if steps >= len as u128 {
            self.buckets.fill(Bucket::default());
            self.totals = Bucket::default();
        } else {
            for _ in 0..steps {
                self.head = if self.head + 1 >= len {
                    0
                } else {
                    self.head + 1
                };
                if let Some(bucket) = self.buckets.get_mut(self.head) {
                    let old = std::mem::take(bucket);
                    self.totals.successes = self.totals.successes.saturating_sub(old.successes);
                    self.totals.failures = self.totals.failures.saturating_sub(old.failures);
                    self.totals.slow = self.totals.slow.saturating_sub(old.slow);
                }
            }
        }
        // Keep bucket boundaries aligned; `steps * width <= elapsed`, so this
        // stays at or before `now`.
        let advance = u64::try_from(steps.saturating_mul(width)).ok();
        self.head_start = advance
            .and_then(|n| self.head_start.checked_add(Duration::from_nanos(n)))
            .unwrap_or(now);
    }

    fn add(&mut self, verdict: Verdict, slow: bool) {
        let totals = &mut self.totals;
        let Some(bucket) = self.buckets.get_mut(self.head) else {
            return;
        };
        match verdict {
            Verdict::Success => {
                bucket.successes = bucket.successes.saturating_add(1);
                totals.successes = totals.successes.saturating_add(1);
            }
            Verdict::Failure => {
                bucket.failures = bucket.failures.saturating_add(1);
                totals.failures = totals.failures.saturating_add(1);
            }
        }
        if slow {
            bucket.slow = bucket.slow.saturating_add(1);
            totals.slow = totals.slow.saturating_add(1);
        }
    }

    fn clear(&mut self, now: Instant) {
        self.buckets.fill(Bucket::default());
        self.totals = Bucket::default();
        self.head = 0;
        self.head_start = now;
    }

    fn counts(&self) -> WindowCounts {
        WindowCounts {
            calls: self.totals.successes.saturating_add(self.totals.failures),
            successes: self.totals.successes,
            failures: self.totals.failures,
            slow: self.totals.slow,
        }
    }
}

/// `part` as a whole percentage of `whole`, rounded down.
fn percentage(part: u64, whole: u64) -> u8 {
    if whole == 0 {
        return 0;
    }
    let p = u128::from(part) * 100 / u128::from(whole);
    u8::try_from(p).unwrap_or(100)
}

/// `part / whole >= threshold %`, exactly, in integers.
fn at_or_above(part: u64, whole: u64, threshold: u8) -> bool {
    u128::from(part) * 100 >= u128::from(threshold) * u128::from(whole)
}

/// The state with what each state needs to decide.
#[derive(Debug, Clone, Copy)]
enum Phase {
    Closed,
    Open {
        opened_at: Instant,
        timeout: Duration,
    },
    HalfOpen {
        since: Instant,
        in_flight: u32,
        succeeded: u32,
    },
    ForcedOpen,
    ForcedClosed,
}

impl Phase {
    fn state(self) -> BreakerState {
        match self {
            Phase::Closed => BreakerState::Closed,
            Phase::Open { .. } => BreakerState::Open,
            Phase::HalfOpen { .. } => BreakerState::HalfOpen,
            Phase::ForcedOpen => BreakerState::ForcedOpen,
            Phase::ForcedClosed => BreakerState::ForcedClosed,
        }
    }
}

#[derive(Debug)]
struct Inner {
    phase: Phase,
    /// Wall-clock time of the last transition.
    since: SystemTime,
    /// Bumped on every transition: a trial permit of an earlier half-open is stale.
    epoch: u64,
    /// Bumped whenever the window is cleared: a permit admitted before counts nothing.
    window_epoch: u64,
    window: Window,
    /// The reset timeout the next opening uses (grows after failed half-opens).
    reset_timeout: Duration,
}

/// What a permit will count when recorded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PermitKind {
    /// An ordinary call: counts in the window (if that window still stands).
    Counted { window_epoch: u64 },
    /// A half-open trial: its verdict decides the half-open.
    Trial { epoch: u64 },
    /// Admitted only because the breaker is `metrics_only`: counts nothing,
    /// since an enforcing breaker would not have let it reach the upstream.
    Shadow,
}

/// What `try_acquire` decided under the lock.
enum Admission {
    Admit(PermitKind),
    Refuse(Duration),
}

/// A circuit breaker for one operation, shared by all its calls (in an `Arc`).
///
/// See the [module docs](self) for the state machine.
pub struct Breaker {
    config: BreakerConfig,
    /// `half_open_trials`, at least 1.
    trials: u32,
    /// The clock origin of `open_until`.
    origin: Instant,
    /// While open: nanoseconds after `origin` when the reset timeout ends;
    /// 0 otherwise. Lets rejections skip the mutex.
    open_until: AtomicU64,
    rejected: AtomicU64,
    would_have_rejected: AtomicU64,
    inner: Mutex<Inner>,
    events: broadcast::Sender<Transition>,
}

impl fmt::Debug for Breaker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Breaker")
            .field("config", &self.config)
            .field("state", &self.state())
            .finish_non_exhaustive()
    }
}

impl Breaker {
    /// A closed breaker with an empty window.
    pub fn new(config: BreakerConfig) -> Breaker {
        let now = Instant::now();
        let (events, _) = broadcast::channel(EVENT_CAPACITY);
        Breaker {
            trials: config.half_open_trials.max(1),
            origin: now,
            open_until: AtomicU64::new(0),
            rejected: AtomicU64::new(0),
            would_have_rejected: AtomicU64::new(0),
            inner: Mutex::new(Inner {
                phase: Phase::Closed,
                since: SystemTime::now(),
                epoch: 0,
                window_epoch: 0,
                window: Window::new(config.window, config.buckets, now),
                reset_timeout: config.reset_timeout,
            }),
            events,
            config,
        }
    }

    /// The settings this breaker was built with.
    pub fn config(&self) -> &BreakerConfig {
        &self.config
    }

    /// Asks to make a call. `Ok` carries the permit to record the outcome
    /// with; `Err` is [`Failure::BreakerOpen`] with the time until a trial may
    /// pass, and nothing may be sent.
    ///
    /// While open, rejects without taking the lock. Once the reset timeout has
    /// passed, the first caller moves the breaker to half-open and becomes a
    /// trial. A `metrics_only` breaker never rejects: it counts the call in
    /// [`BreakerSnapshot::would_have_rejected`] and admits it uncounted.
    pub fn try_acquire(&self) -> Result<BreakerPermit<'_>, Failure> {
        let until = self.open_until.load(Ordering::Relaxed);
        if until != 0 {
            let now = self.nanos(Instant::now());
            if now < until {
                return self.refuse(Duration::from_nanos(until - now));
            }
        }
        let admission = {
            let mut inner = self.lock();
            self.admit(&mut inner)
        };
        match admission {
            Admission::Admit(kind) => Ok(BreakerPermit {
                breaker: self,
                kind,
            }),
            Admission::Refuse(retry_after) => self.refuse(retry_after),
        }
    }

    /// The state as of the last call or admin action (timeouts are noticed
    /// lazily, by the next [`try_acquire`](Self::try_acquire) or record).
    pub fn state(&self) -> BreakerState {
        self.lock().phase.state()
    }

    /// Counts, rates and state, with the window rolled to now.
    pub fn snapshot(&self) -> BreakerSnapshot {
        let now = Instant::now();
        let mut inner = self.lock();
        inner.window.roll(now);
        let window = inner.window.counts();
        let (retry_after_ms, in_flight) = match inner.phase {
            Phase::Open { opened_at, timeout } => {
                let left = timeout.saturating_sub(now.saturating_duration_since(opened_at));
                (Some(millis(left)), 0)
            }
            Phase::HalfOpen { in_flight, .. } => (None, in_flight),
            _ => (None, 0),
        };
        BreakerSnapshot {
            state: inner.phase.state(),
            mode: self.config.mode,
            since: inner.since,
            window,
            failure_percentage: percentage(window.failures, window.calls),
            slow_percentage: percentage(window.slow, window.calls),
            reset_timeout_ms: millis(inner.reset_timeout),
            retry_after_ms,
            rejected: self.rejected.load(Ordering::Relaxed),
            would_have_rejected: self.would_have_rejected.load(Ordering::Relaxed),
            half_open_trials_in_flight: in_flight,
        }
    }

    /// A passing upstream probe serves as the trial, so no user call is
    /// spent on it: an open breaker whose reset timeout has run out closes
    /// with a fresh window and the base reset timeout. Answers whether it
    /// closed. A breaker still inside its reset timeout, half-open (its
    /// trials decide), forced, or in `metrics_only` mode is left alone.
    pub fn probe_passed(&self) -> bool {
        if self.config.mode == BreakerMode::MetricsOnly {
            return false;
        }
        let now = Instant::now();
        let mut inner = self.lock();
        match inner.phase {
            Phase::Open { opened_at, timeout }
                if now.saturating_duration_since(opened_at) >= timeout =>
            {
                Self::clear_window(&mut inner, now);
                inner.reset_timeout = self.config.reset_timeout;
                self.transition(&mut inner, Phase::Closed, "probe_passed");
                true
            }
            _ => false,
        }
    }

    /// Pins the breaker open: every call is rejected (a `metrics_only`
    /// breaker only counts it) until [`force_closed`](Self::force_closed) or
    /// [`reset`](Self::reset). Trials in flight then count nothing.
    pub fn force_open(&self) {
        let mut inner = self.lock();
        self.transition(&mut inner, Phase::ForcedOpen, "force_open");
    }

    /// Pins the breaker closed: no call is rejected, calls still count in the
    /// window, and the breaker does not open until [`reset`](Self::reset).
    /// Coming from closed, the window carries on; otherwise it starts empty.
    pub fn force_closed(&self) {
        let now = Instant::now();
        let mut inner = self.lock();
        if !matches!(inner.phase, Phase::Closed | Phase::ForcedClosed) {
            Self::clear_window(&mut inner, now);
        }
        self.transition(&mut inner, Phase::ForcedClosed, "force_closed");
    }

    /// Back to closed with an empty window and the base reset timeout,
    /// whatever the state (forced ones included). The rejection totals are
    /// monotonic counters and are kept.
    pub fn reset(&self) {
        let now = Instant::now();
        let mut inner = self.lock();
        Self::clear_window(&mut inner, now);
        inner.reset_timeout = self.config.reset_timeout;
        self.transition(&mut inner, Phase::Closed, "reset");
    }

    /// A receiver of every transition from now on, in order.
    ///
    /// A receiver more than [`EVENT_CAPACITY`] events behind skips the oldest
    /// (`RecvError::Lagged`). With no receiver, transitions are dropped.
    pub fn subscribe(&self) -> broadcast::Receiver<Transition> {
        self.events.subscribe()
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // No code path panics while holding the lock, and the state stays
        // consistent between statements, so a poisoned lock is still usable.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Nanoseconds from `origin` to `at` (saturating).
    fn nanos(&self, at: Instant) -> u64 {
        let n = at.saturating_duration_since(self.origin).as_nanos();
        u64::try_from(n).unwrap_or(u64::MAX)
    }

    fn refuse(&self, retry_after: Duration) -> Result<BreakerPermit<'_>, Failure> {
        match self.config.mode {
            BreakerMode::Enforce => {
                self.rejected.fetch_add(1, Ordering::Relaxed);
                Err(Failure::BreakerOpen { retry_after })
            }
            BreakerMode::MetricsOnly => {
                self.would_have_rejected.fetch_add(1, Ordering::Relaxed);
                Ok(BreakerPermit {
                    breaker: self,
                    kind: PermitKind::Shadow,
                })
            }
        }
    }

    /// The admission decision, moving open to half-open when due.
    fn admit(&self, inner: &mut Inner) -> Admission {
        match inner.phase {
            Phase::Closed | Phase::ForcedClosed => Admission::Admit(PermitKind::Counted {
                window_epoch: inner.window_epoch,
            }),
            Phase::ForcedOpen => Admission::Refuse(inner.reset_timeout),
            Phase::Open { opened_at, timeout } => {
                let now = Instant::now();
                let open_for = now.saturating_duration_since(opened_at);
                if open_for < timeout {
                    return Admission::Refuse(timeout - open_for);
                }
                let half_open = Phase::HalfOpen {
                    since: now,
                    in_flight: 1,
                    succeeded: 0,
                };
                self.transition(inner, half_open, "reset_timeout_elapsed");
                Admission::Admit(PermitKind::Trial { epoch: inner.epoch })
            }
            Phase::HalfOpen { .. } => {
                let now = Instant::now();
                self.expire_half_open(inner, now);
                match &mut inner.phase {
                    Phase::HalfOpen {
                        since,
                        in_flight,
                        succeeded,
                    } => {
                        if in_flight.saturating_add(*succeeded) < self.trials {
                            *in_flight += 1;
                            Admission::Admit(PermitKind::Trial { epoch: inner.epoch })
                        } else {
                            // The trials decide sooner; at worst the half-open
                            // expires, and then a reset timeout follows.
                            let left = self
                                .config
                                .half_open_max_wait
                                .saturating_sub(now.saturating_duration_since(*since));
                            Admission::Refuse(left.min(inner.reset_timeout))
                        }
                    }
                    // Just expired: open again, for a full reset timeout.
                    _ => Admission::Refuse(inner.reset_timeout),
                }
            }
        }
    }

    /// Counts a verdict (from [`BreakerPermit::record`]).
    fn on_record(&self, kind: PermitKind, verdict: Verdict, latency: Duration) {
        if kind == PermitKind::Shadow {
            return;
        }
        let slow = self
            .config
            .slow_call
            .is_some_and(|rule| latency > rule.duration);
        let now = Instant::now();
        let mut inner = self.lock();
        self.expire_half_open(&mut inner, now);
        match kind {
            PermitKind::Shadow => {}
            PermitKind::Counted { window_epoch } => {
                if window_epoch != inner.window_epoch {
                    return;
                }
                match inner.phase {
                    Phase::Closed => {
                        inner.window.roll(now);
                        inner.window.add(verdict, slow);
                        self.maybe_trip(&mut inner, now);
                    }
                    Phase::ForcedClosed => {
                        inner.window.roll(now);
                        inner.window.add(verdict, slow);
                    }
                    // Admitted before the breaker opened: the window it
                    // belonged to no longer decides anything.
                    _ => {}
                }
            }
            PermitKind::Trial { epoch } => {
                if epoch != inner.epoch {
                    return;
                }
                let Phase::HalfOpen {
                    in_flight,
                    succeeded,
                    ..
                } = &mut inner.phase
                else {
                    return;
                };
                *in_flight = in_flight.saturating_sub(1);
                if verdict == Verdict::Failure || slow {
                    self.reopen(&mut inner, now, "trial_failed");
                } else {
                    *succeeded = succeeded.saturating_add(1);
                    if *succeeded >= self.trials {
                        Self::clear_window(&mut inner, now);
                        inner.reset_timeout = self.config.reset_timeout;
                        self.transition(&mut inner, Phase::Closed, "trials_succeeded");
                    }
                }
            }
        }
    }

    /// A trial permit dropped without a verdict: frees its slot.
    fn on_cancel(&self, epoch: u64) {
        let now = Instant::now();
        let mut inner = self.lock();
        self.expire_half_open(&mut inner, now);
        if epoch != inner.epoch {
            return;
        }
        if let Phase::HalfOpen { in_flight, .. } = &mut inner.phase {
            *in_flight = in_flight.saturating_sub(1);
        }
    }

    /// Opens a closed breaker whose window has crossed a threshold.
    fn maybe_trip(&self, inner: &mut Inner, now: Instant) {
        let counts = inner.window.counts();
        if counts.calls == 0 || counts.calls < u64::from(self.config.volume_threshold) {
            return;
        }
        let reason =
            if at_or_above(
                counts.failures,
                counts.calls,
                self.config.error_threshold_percentage,
            ) {
                "failure_threshold"
            } else if self.config.slow_call.is_some_and(|rule| {
                at_or_above(counts.slow, counts.calls, rule.threshold_percentage)
            }) {
                "slow_call_threshold"
            } else {
                return;
            };
        let open = Phase::Open {
            opened_at: now,
            timeout: inner.reset_timeout,
        };
        self.transition(inner, open, reason);
    }

    /// A half-open without a verdict for `half_open_max_wait` opens again.
    fn expire_half_open(&self, inner: &mut Inner, now: Instant) {
        if let Phase::HalfOpen { since, .. } = inner.phase
            && now.saturating_duration_since(since) >= self.config.half_open_max_wait
        {
            self.reopen(inner, now, "half_open_max_wait");
        }
    }

    /// Half-open failed: open again with a grown reset timeout.
    fn reopen(&self, inner: &mut Inner, now: Instant, reason: &'static str) {
        if let Some(max) = self.config.max_reset_timeout {
            let cap = max.max(self.config.reset_timeout);
            inner.reset_timeout = inner.reset_timeout.saturating_mul(2).min(cap);
        }
        let open = Phase::Open {
            opened_at: now,
            timeout: inner.reset_timeout,
        };
        self.transition(inner, open, reason);
    }

    fn clear_window(inner: &mut Inner, now: Instant) {
        inner.window.clear(now);
        inner.window_epoch = inner.window_epoch.wrapping_add(1);
    }

    /// Enters `to`, keeps the lock-free open gate in step, and broadcasts the
    /// change (under the lock, so receivers see transitions in order).
    fn transition(&self, inner: &mut Inner, to: Phase, reason: &'static str) {
        let from = inner.phase.state();
        inner.phase = to;
        inner.epoch = inner.epoch.wrapping_add(1);
        let at = SystemTime::now();
        inner.since = at;
        // 0 ("not open") also when the timeout ends at `origin` itself: then
        // it has already ended, and the locked path decides.
        let until = match to {
            Phase::Open { opened_at, timeout } => opened_at
                .checked_add(timeout)
                .map_or(u64::MAX, |t| self.nanos(t)),
            _ => 0,
        };
        self.open_until.store(until, Ordering::Relaxed);
        // Err only means nobody listens; the event is then dropped.
        let _ = self.events.send(Transition {
            from,
            to: to.state(),
            at,
            reason,
        });
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Leave to make one call, from [`Breaker::try_acquire`].
///
/// Record the outcome with [`record`](Self::record). Dropping the permit
/// instead means the call never reached a verdict (refused by a later layer,
/// cut by the caller's deadline, or cancelled): it counts nothing, and a
/// half-open trial slot it held is freed for another call.
#[must_use = "a permit dropped without `record` counts nothing"]
pub struct BreakerPermit<'a> {
    breaker: &'a Breaker,
    kind: PermitKind,
}

impl fmt::Debug for BreakerPermit<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BreakerPermit")
            .field("kind", &self.kind)
            .finish_non_exhaustive()
    }
}

impl BreakerPermit<'_> {
    /// Records the call's verdict and latency (the latency decides whether it
    /// was slow). A half-open trial passes when its verdict is
    /// [`Verdict::Success`] and, with a slow-call rule, it was not slow.
    pub fn record(mut self, verdict: Verdict, latency: Duration) {
        let kind = std::mem::replace(&mut self.kind, PermitKind::Shadow);
        self.breaker.on_record(kind, verdict, latency);
    }
}

impl Drop for BreakerPermit<'_> {
    fn drop(&mut self) {
        if let PermitKind::Trial { epoch } = self.kind {
            self.kind = PermitKind::Shadow;
            self.breaker.on_cancel(epoch);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::model::{self, BreakerPolicy};
    use tokio::sync::broadcast::error::TryRecvError;
    use tokio::time::advance;

    const SEC: Duration = Duration::from_secs(1);

    fn config() -> BreakerConfig {
        BreakerConfig {
            mode: BreakerMode::Enforce,
            error_threshold_percentage: 50,
            volume_threshold: 10,
            window: Duration::from_secs(10),
            buckets: 10,
            reset_timeout: Duration::from_secs(30),
            max_reset_timeout: None,
            half_open_trials: 1,
            half_open_max_wait: Duration::from_secs(60),
            slow_call: None,
        }
    }

    fn call(b: &Breaker, verdict: Verdict) {
        b.try_acquire()
            .expect("breaker admits the call")
            .record(verdict, Duration::from_millis(1));
    }

    fn calls(b: &Breaker, verdict: Verdict, n: u32) {
        for _ in 0..n {
            call(b, verdict);
        }
    }

    fn retry_after(b: &Breaker) -> Duration {
        match b.try_acquire() {
            Err(Failure::BreakerOpen { retry_after }) => retry_after,
            other => panic!("expected breaker_open, got {other:?}"),
        }
    }

    /// Trips a breaker of `config()` shape (volume 10, 50%).
    fn trip(b: &Breaker) {
        calls(b, Verdict::Failure, b.config().volume_threshold.max(1));
        assert_eq!(b.state(), BreakerState::Open);
    }

    fn drain(
        rx: &mut broadcast::Receiver<Transition>,
    ) -> Vec<(BreakerState, BreakerState, &'static str)> {
        let mut seen = Vec::new();
        loop {
            match rx.try_recv() {
                Ok(t) => seen.push((t.from, t.to, t.reason)),
                Err(TryRecvError::Empty) => return seen,
                Err(e) => panic!("receiver failed: {e}"),
            }
        }
    }

    #[test]
    fn breaker_and_permit_are_send_and_sync() {
        fn send_sync<T: Send + Sync>() {}
        send_sync::<Breaker>();
        send_sync::<BreakerPermit<'static>>();
        send_sync::<Transition>();
    }

    #[tokio::test(start_paused = true)]
    async fn opens_exactly_at_the_threshold_and_not_one_call_before() {
        let b = Breaker::new(config());
        // 9 calls at 55% failures: below the volume.
        calls(&b, Verdict::Success, 4);
        calls(&b, Verdict::Failure, 5);
        assert_eq!(b.state(), BreakerState::Closed);
        // The 10th call, a success, brings the volume to 10 at exactly 50%.
        call(&b, Verdict::Success);
        assert_eq!(b.state(), BreakerState::Open);
        assert_eq!(b.snapshot().failure_percentage, 50);
    }

    #[tokio::test(start_paused = true)]
    async fn stays_closed_just_below_the_percentage() {
        let b = Breaker::new(config());
        // 49/100 calls fail: 49% < 50%.
        calls(&b, Verdict::Success, 51);
        calls(&b, Verdict::Failure, 49);
        assert_eq!(b.state(), BreakerState::Closed);
        call(&b, Verdict::Failure); // 50/101 = 49.5%
        assert_eq!(b.state(), BreakerState::Closed);
        call(&b, Verdict::Failure); // 51/102 = 50%
        assert_eq!(b.state(), BreakerState::Open);
    }

    #[tokio::test(start_paused = true)]
    async fn does_not_open_below_volume_even_at_all_failures() {
        let b = Breaker::new(config());
        calls(&b, Verdict::Failure, 9);
        assert_eq!(b.state(), BreakerState::Closed);
        assert_eq!(b.snapshot().failure_percentage, 100);
        assert!(b.try_acquire().is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn old_buckets_roll_out_of_the_window() {
        let b = Breaker::new(config()); // 10s in 10 buckets of 1s
        calls(&b, Verdict::Failure, 5);
        advance(Duration::from_secs(5)).await;
        calls(&b, Verdict::Failure, 4);
        assert_eq!(b.snapshot().window.calls, 9);
        advance(Duration::from_secs(5)).await;
        // The first five are 10s old: gone; the last four remain.
        assert_eq!(b.snapshot().window.failures, 4);
        call(&b, Verdict::Failure);
        assert_eq!(b.state(), BreakerState::Closed, "5 calls < volume 10");
        advance(Duration::from_secs(10)).await;
        assert_eq!(b.snapshot().window, WindowCounts::default());
        // A full window later, nine failures are still below the volume.
        calls(&b, Verdict::Failure, 9);
        assert_eq!(b.state(), BreakerState::Closed);
    }

    #[tokio::test(start_paused = true)]
    async fn window_rolls_after_a_long_idle_and_within_one_bucket() {
        let b = Breaker::new(config());
        calls(&b, Verdict::Failure, 3);
        advance(Duration::from_millis(999)).await;
        assert_eq!(b.snapshot().window.calls, 3, "same bucket");
        advance(Duration::from_secs(3600 * 24 * 365)).await;
        assert_eq!(b.snapshot().window.calls, 0);
        calls(&b, Verdict::Failure, 10);
        assert_eq!(b.state(), BreakerState::Open);
    }

    #[tokio::test(start_paused = true)]
    async fn refusals_never_count() {
        let b = Breaker::new(config());
        trip(&b);
        let before = b.snapshot().window;
        for _ in 0..100 {
            assert!(b.try_acquire().is_err());
        }
        let snap = b.snapshot();
        assert_eq!(snap.window, before);
        assert_eq!(snap.rejected, 100);
        assert_eq!(snap.would_have_rejected, 0);
    }

    #[tokio::test(start_paused = true)]
    async fn open_fails_fast_with_the_time_left() {
        let b = Breaker::new(config());
        trip(&b);
        assert_eq!(retry_after(&b), Duration::from_secs(30));
        advance(Duration::from_secs(12)).await;
        assert_eq!(retry_after(&b), Duration::from_secs(18));
        assert_eq!(b.snapshot().retry_after_ms, Some(18_000));
        let err = b.try_acquire().expect_err("open");
        assert_eq!(err.code(), "breaker_open");
    }

    #[tokio::test(start_paused = true)]
    async fn half_open_admits_exactly_n_concurrent_trials() {
        let b = Breaker::new(BreakerConfig {
            half_open_trials: 3,
            ..config()
        });
        trip(&b);
        advance(Duration::from_secs(29)).await;
        assert!(b.try_acquire().is_err(), "still open at 29s");
        advance(SEC).await;
        let trials: Vec<_> = (0..3)
            .map(|_| b.try_acquire().expect("a trial slot"))
            .collect();
        assert_eq!(b.state(), BreakerState::HalfOpen);
        assert_eq!(b.snapshot().half_open_trials_in_flight, 3);
        assert!(b.try_acquire().is_err(), "the 4th is rejected");
        // One success does not make room for a 4th trial: exactly 3 in all.
        let mut trials = trials.into_iter();
        trials
            .next()
            .expect("trial")
            .record(Verdict::Success, Duration::ZERO);
        assert!(b.try_acquire().is_err());
        assert_eq!(b.state(), BreakerState::HalfOpen);
        assert_eq!(b.snapshot().rejected, 3);
    }

    #[tokio::test(start_paused = true)]
    async fn all_trials_succeeding_closes_with_a_fresh_window() {
        let b = Breaker::new(BreakerConfig {
            half_open_trials: 3,
            ..config()
        });
        trip(&b);
        advance(Duration::from_secs(30)).await;
        let trials: Vec<_> = (0..3)
            .map(|_| b.try_acquire().expect("a trial slot"))
            .collect();
        for (i, trial) in trials.into_iter().enumerate() {
            assert_eq!(b.state(), BreakerState::HalfOpen, "before trial {i}");
            trial.record(Verdict::Success, Duration::ZERO);
        }
        assert_eq!(b.state(), BreakerState::Closed);
        let snap = b.snapshot();
        assert_eq!(snap.window, WindowCounts::default());
        assert_eq!(snap.half_open_trials_in_flight, 0);
        // Fresh window: nine failures are below the volume again.
        calls(&b, Verdict::Failure, 9);
        assert_eq!(b.state(), BreakerState::Closed);
    }

    #[tokio::test(start_paused = true)]
    async fn one_failed_trial_reopens() {
        let b = Breaker::new(BreakerConfig {
            half_open_trials: 3,
            ..config()
        });
        trip(&b);
        advance(Duration::from_secs(30)).await;
        let mut trials: Vec<_> = (0..3)
            .map(|_| b.try_acquire().expect("a trial slot"))
            .collect();
        let late = trials.pop().expect("trial");
        let failing = trials.pop().expect("trial");
        let succeeding = trials.pop().expect("trial");
        succeeding.record(Verdict::Success, Duration::ZERO);
        failing.record(Verdict::Failure, Duration::ZERO);
        assert_eq!(b.state(), BreakerState::Open);
        // A trial of the finished half-open counts nothing.
        late.record(Verdict::Success, Duration::ZERO);
        assert_eq!(b.state(), BreakerState::Open);
        assert_eq!(retry_after(&b), Duration::from_secs(30), "no max: fixed");
    }

    #[tokio::test(start_paused = true)]
    async fn reset_timeout_doubles_up_to_the_max_and_returns_to_base() {
        let b = Breaker::new(BreakerConfig {
            reset_timeout: SEC,
            max_reset_timeout: Some(Duration::from_secs(3)),
            ..config()
        });
        trip(&b);
        assert_eq!(retry_after(&b), SEC);
        for expected in [2, 3, 3] {
            let wait = retry_after(&b);
            advance(wait).await;
            call(&b, Verdict::Failure); // the trial
            assert_eq!(retry_after(&b), Duration::from_secs(expected));
            assert_eq!(b.snapshot().reset_timeout_ms, expected * 1000);
        }
        advance(Duration::from_secs(3)).await;
        call(&b, Verdict::Success);
        assert_eq!(b.state(), BreakerState::Closed);
        assert_eq!(b.snapshot().reset_timeout_ms, 1000);
        trip(&b);
        assert_eq!(retry_after(&b), SEC);
    }

    #[tokio::test(start_paused = true)]
    async fn half_open_max_wait_reopens_a_stuck_half_open_on_acquire() {
        let b = Breaker::new(BreakerConfig {
            half_open_max_wait: Duration::from_secs(5),
            ..config()
        });
        let mut rx = b.subscribe();
        trip(&b);
        advance(Duration::from_secs(30)).await;
        let stuck = b.try_acquire().expect("trial");
        advance(Duration::from_millis(4999)).await;
        let wait = retry_after(&b);
        assert_eq!(wait, Duration::from_millis(1), "half-open has 1ms left");
        assert_eq!(b.state(), BreakerState::HalfOpen);
        advance(Duration::from_millis(1)).await;
        assert_eq!(retry_after(&b), Duration::from_secs(30));
        assert_eq!(b.state(), BreakerState::Open);
        // The stuck trial's late verdict belongs to a finished half-open.
        stuck.record(Verdict::Success, Duration::from_secs(5));
        assert_eq!(b.state(), BreakerState::Open);
        let reasons: Vec<_> = drain(&mut rx).into_iter().map(|t| t.2).collect();
        assert_eq!(
            reasons,
            [
                "failure_threshold",
                "reset_timeout_elapsed",
                "half_open_max_wait"
            ]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn half_open_max_wait_is_also_noticed_by_a_record() {
        let b = Breaker::new(BreakerConfig {
            half_open_max_wait: Duration::from_secs(5),
            ..config()
        });
        trip(&b);
        advance(Duration::from_secs(30)).await;
        let stuck = b.try_acquire().expect("trial");
        advance(Duration::from_secs(5)).await;
        stuck.record(Verdict::Success, Duration::from_secs(5));
        assert_eq!(b.state(), BreakerState::Open);
    }

    #[tokio::test(start_paused = true)]
    async fn a_cancelled_trial_frees_its_slot_and_counts_nothing() {
        let b = Breaker::new(config());
        trip(&b);
        advance(Duration::from_secs(30)).await;
        let trial = b.try_acquire().expect("trial");
        assert!(b.try_acquire().is_err(), "the only slot is taken");
        drop(trial);
        assert_eq!(b.state(), BreakerState::HalfOpen, "counted nothing");
        assert_eq!(b.snapshot().half_open_trials_in_flight, 0);
        // The slot is free again; this trial's success closes.
        call(&b, Verdict::Success);
        assert_eq!(b.state(), BreakerState::Closed);
    }

    #[tokio::test(start_paused = true)]
    async fn a_dropped_closed_permit_counts_nothing() {
        let b = Breaker::new(BreakerConfig {
            volume_threshold: 1,
            ..config()
        });
        for _ in 0..20 {
            drop(b.try_acquire().expect("closed"));
        }
        assert_eq!(b.snapshot().window, WindowCounts::default());
        assert_eq!(b.state(), BreakerState::Closed);
    }

    #[tokio::test(start_paused = true)]
    async fn a_permit_admitted_before_a_fresh_window_counts_nothing() {
        let b = Breaker::new(config());
        let old = b.try_acquire().expect("closed");
        trip(&b);
        advance(Duration::from_secs(30)).await;
        call(&b, Verdict::Success); // trial: closes with a fresh window
        assert_eq!(b.state(), BreakerState::Closed);
        old.record(Verdict::Failure, Duration::ZERO);
        assert_eq!(b.snapshot().window, WindowCounts::default());
    }

    #[tokio::test(start_paused = true)]
    async fn slow_call_rate_opens() {
        let b = Breaker::new(BreakerConfig {
            error_threshold_percentage: 100,
            volume_threshold: 4,
            slow_call: Some(SlowCallConfig {
                duration: Duration::from_millis(100),
                threshold_percentage: 50,
            }),
            ..config()
        });
        let mut rx = b.subscribe();
        let record = |latency_ms| {
            b.try_acquire()
                .expect("closed")
                .record(Verdict::Success, Duration::from_millis(latency_ms));
        };
        record(10);
        record(100); // exactly the duration: not slow
        record(101);
        assert_eq!(b.snapshot().window.slow, 1);
        assert_eq!(b.state(), BreakerState::Closed);
        record(500); // 2 slow of 4
        assert_eq!(b.state(), BreakerState::Open);
        let snap = b.snapshot();
        assert_eq!((snap.window.slow, snap.slow_percentage), (2, 50));
        assert_eq!(
            drain(&mut rx),
            [(
                BreakerState::Closed,
                BreakerState::Open,
                "slow_call_threshold"
            )]
        );
        // A slow successful trial does not close it.
        advance(Duration::from_secs(30)).await;
        b.try_acquire()
            .expect("trial")
            .record(Verdict::Success, Duration::from_millis(150));
        assert_eq!(b.state(), BreakerState::Open);
    }

    #[tokio::test(start_paused = true)]
    async fn slow_calls_count_whatever_the_verdict_and_only_with_a_rule() {
        let b = Breaker::new(BreakerConfig {
            slow_call: Some(SlowCallConfig {
                duration: Duration::from_millis(100),
                threshold_percentage: 100,
            }),
            ..config()
        });
        b.try_acquire()
            .expect("closed")
            .record(Verdict::Failure, SEC);
        assert_eq!(b.snapshot().window.slow, 1);
        let plain = Breaker::new(config());
        plain
            .try_acquire()
            .expect("closed")
            .record(Verdict::Success, Duration::from_secs(3600));
        assert_eq!(plain.snapshot().window.slow, 0);
    }

    #[tokio::test(start_paused = true)]
    async fn metrics_only_never_rejects_but_reports() {
        let b = Breaker::new(BreakerConfig {
            mode: BreakerMode::MetricsOnly,
            half_open_trials: 2,
            ..config()
        });
        calls(&b, Verdict::Failure, 10);
        assert_eq!(b.state(), BreakerState::Open);
        // Admitted while open: these would not reach the upstream, so they count nothing.
        calls(&b, Verdict::Failure, 5);
        let snap = b.snapshot();
        assert_eq!(snap.state, BreakerState::Open);
        assert_eq!(snap.would_have_rejected, 5);
        assert_eq!(snap.rejected, 0);
        assert_eq!(snap.window.calls, 10);
        // Half-open runs for real: two trials, the third would be rejected.
        advance(Duration::from_secs(30)).await;
        let t1 = b.try_acquire().expect("trial");
        let t2 = b.try_acquire().expect("trial");
        b.try_acquire()
            .expect("metrics_only admits")
            .record(Verdict::Failure, Duration::ZERO);
        assert_eq!(b.state(), BreakerState::HalfOpen);
        assert_eq!(b.snapshot().would_have_rejected, 6);
        t1.record(Verdict::Success, Duration::ZERO);
        t2.record(Verdict::Success, Duration::ZERO);
        assert_eq!(b.state(), BreakerState::Closed);
        // Forced open is only reported too.
        b.force_open();
        assert!(b.try_acquire().is_ok());
        assert_eq!(b.snapshot().would_have_rejected, 7);
        assert_eq!(b.snapshot().rejected, 0);
    }

    #[tokio::test(start_paused = true)]
    async fn force_open_force_closed_and_reset() {
        let b = Breaker::new(BreakerConfig {
            reset_timeout: SEC,
            max_reset_timeout: Some(Duration::from_secs(8)),
            ..config()
        });
        let mut rx = b.subscribe();
        b.force_open();
        assert_eq!(b.state(), BreakerState::ForcedOpen);
        assert_eq!(retry_after(&b), SEC);
        advance(Duration::from_secs(3600)).await;
        assert!(b.try_acquire().is_err(), "forced open does not half-open");

        b.force_closed();
        assert_eq!(b.state(), BreakerState::ForcedClosed);
        calls(&b, Verdict::Failure, 50);
        assert_eq!(b.state(), BreakerState::ForcedClosed, "never opens");
        assert_eq!(b.snapshot().window.failures, 50, "still records");

        b.reset();
        assert_eq!(b.state(), BreakerState::Closed);
        assert_eq!(b.snapshot().window, WindowCounts::default());
        // Grow the reset timeout, then reset brings back the base.
        trip(&b);
        advance(SEC).await;
        call(&b, Verdict::Failure);
        assert_eq!(b.snapshot().reset_timeout_ms, 2000);
        b.reset();
        assert_eq!(b.snapshot().reset_timeout_ms, 1000);
        assert!(b.try_acquire().is_ok());
        let snap = b.snapshot();
        assert_eq!(snap.rejected, 2, "totals survive reset");

        use BreakerState::*;
        assert_eq!(
            drain(&mut rx),
            [
                (Closed, ForcedOpen, "force_open"),
                (ForcedOpen, ForcedClosed, "force_closed"),
                (ForcedClosed, Closed, "reset"),
                (Closed, Open, "failure_threshold"),
                (Open, HalfOpen, "reset_timeout_elapsed"),
                (HalfOpen, Open, "trial_failed"),
                (Open, Closed, "reset"),
            ]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn force_closed_from_closed_keeps_the_window() {
        let b = Breaker::new(config());
        calls(&b, Verdict::Failure, 3);
        b.force_closed();
        assert_eq!(b.snapshot().window.failures, 3);
        b.force_open();
        b.force_closed();
        assert_eq!(b.snapshot().window.calls, 0, "from forced open: fresh");
    }

    #[tokio::test(start_paused = true)]
    async fn a_passing_probe_closes_an_open_breaker_once_its_timeout_ran_out() {
        let b = Breaker::new(BreakerConfig {
            reset_timeout: SEC,
            ..config()
        });
        trip(&b);
        assert!(!b.probe_passed(), "still inside the reset timeout");
        assert_eq!(b.state(), BreakerState::Open);
        advance(SEC).await;
        let mut rx = b.subscribe();
        assert!(b.probe_passed());
        assert_eq!(b.state(), BreakerState::Closed);
        assert_eq!(b.snapshot().window.calls, 0, "a fresh window");
        assert_eq!(
            drain(&mut rx),
            [(BreakerState::Open, BreakerState::Closed, "probe_passed")]
        );
        assert!(!b.probe_passed(), "closed: nothing to do");
        b.force_open();
        advance(SEC).await;
        assert!(!b.probe_passed(), "forced open stays forced");
    }

    #[tokio::test(start_paused = true)]
    async fn transitions_are_broadcast_in_order() {
        let b = Breaker::new(BreakerConfig {
            reset_timeout: SEC,
            ..config()
        });
        let mut rx = b.subscribe();
        trip(&b);
        advance(SEC).await;
        call(&b, Verdict::Failure);
        advance(SEC).await;
        call(&b, Verdict::Success);
        use BreakerState::*;
        assert_eq!(
            drain(&mut rx),
            [
                (Closed, Open, "failure_threshold"),
                (Open, HalfOpen, "reset_timeout_elapsed"),
                (HalfOpen, Open, "trial_failed"),
                (Open, HalfOpen, "reset_timeout_elapsed"),
                (HalfOpen, Closed, "trials_succeeded"),
            ]
        );
        // With no receiver, transitions are simply dropped.
        drop(rx);
        trip(&b);
        b.reset();
        assert_eq!(b.state(), BreakerState::Closed);
    }

    #[test]
    fn snapshot_and_transition_serialize() {
        let b = Breaker::new(config());
        let mut rx = b.subscribe();
        b.force_open();
        let json = serde_json::to_value(b.snapshot()).expect("serializes");
        assert_eq!(json["state"], "forced_open");
        assert_eq!(json["mode"], "enforce");
        assert!(json["since"].as_u64().expect("unix ms") > 1_600_000_000_000);
        assert_eq!(json["window"]["calls"], 0);
        assert_eq!(json["reset_timeout_ms"], 30_000);
        let t = rx.try_recv().expect("transition");
        let json = serde_json::to_value(&t).expect("serializes");
        assert_eq!(json["from"], "closed");
        assert_eq!(json["to"], "forced_open");
        assert_eq!(json["reason"], "force_open");
        assert!(json["at"].is_u64());
        for s in [
            BreakerState::Closed,
            BreakerState::Open,
            BreakerState::HalfOpen,
            BreakerState::ForcedOpen,
            BreakerState::ForcedClosed,
        ] {
            assert_eq!(serde_json::to_value(s).expect("serializes"), s.as_str());
            assert_eq!(s.to_string(), s.as_str());
        }
    }

    #[tokio::test(start_paused = true)]
    async fn degenerate_settings_do_not_panic() {
        let b = Breaker::new(BreakerConfig {
            volume_threshold: 0,
            window: Duration::ZERO,
            buckets: 0,
            reset_timeout: Duration::MAX,
            max_reset_timeout: Some(Duration::MAX),
            half_open_trials: 0,
            half_open_max_wait: Duration::ZERO,
            ..config()
        });
        call(&b, Verdict::Success);
        advance(SEC).await;
        call(&b, Verdict::Failure);
        assert_eq!(b.state(), BreakerState::Open);
        assert!(retry_after(&b) > Duration::from_secs(3600 * 24 * 365));
        let huge = Breaker::new(BreakerConfig {
            buckets: u32::MAX,
            window: Duration::MAX,
            ..config()
        });
        call(&huge, Verdict::Failure);
        advance(Duration::from_secs(3600)).await;
        assert_eq!(huge.snapshot().window.calls, 1);
    }

    #[test]
    fn from_effective_breaker_maps_every_field() {
        let policy = BreakerPolicy {
            mode: Some(BreakerMode::MetricsOnly),
            error_threshold_percentage: Some(37),
            volume_threshold: Some(21),
            window: Some(model::Duration::from_secs(45)),
            buckets: Some(9),
            reset_timeout: Some(model::Duration::from_millis(1500)),
            max_reset_timeout: Some(model::Duration::from_secs(90)),
            half_open_trials: Some(4),
            half_open_max_wait: Some(model::Duration::from_secs(7)),
            slow_call: Some(model::SlowCall {
                duration: model::Duration::from_millis(750),
                threshold_percentage: 66,
            }),
            failure_on: None,
        };
        let effective = EffectiveBreaker::resolve(Some(&policy), None);
        assert_eq!(
            BreakerConfig::from(&effective),
            BreakerConfig {
                mode: BreakerMode::MetricsOnly,
                error_threshold_percentage: 37,
                volume_threshold: 21,
                window: Duration::from_secs(45),
                buckets: 9,
                reset_timeout: Duration::from_millis(1500),
                max_reset_timeout: Some(Duration::from_secs(90)),
                half_open_trials: 4,
                half_open_max_wait: Duration::from_secs(7),
                slow_call: Some(SlowCallConfig {
                    duration: Duration::from_millis(750),
                    threshold_percentage: 66,
                }),
            }
        );
        // And the built-ins, where nothing is written.
        let built_in = BreakerConfig::from(&EffectiveBreaker::resolve(None, None));
        assert_eq!(built_in, config());
    }
}
