//! Effective settings: an operation's values merged over `defaults`, then the
//! built-in defaults, each remembering where it came from (for `explain`).

use serde::Serialize;

use super::PolicySet;
use super::model::{
    Backoff, BreakerMode, BreakerPolicy, Condition, Defaults, Duration, Jitter, Multiplier,
    Operation, RetryPolicy, SlowCall, TimeoutRef,
};

/// Where an effective value was set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    /// In the operation itself.
    Operation,
    /// In the `defaults` section.
    Defaults,
    /// Not written anywhere: claygate's built-in default.
    BuiltIn,
}

/// A value and where it came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub struct Sourced<T> {
    /// The value in force.
    pub value: T,
    /// Where it was set.
    pub from: Source,
}

fn pick<T: Clone>(op: Option<&T>, defaults: Option<&T>, built_in: T) -> Sourced<T> {
    match (op, defaults) {
        (Some(v), _) => Sourced {
            value: v.clone(),
            from: Source::Operation,
        },
        (None, Some(v)) => Sourced {
            value: v.clone(),
            from: Source::Defaults,
        },
        (None, None) => Sourced {
            value: built_in,
            from: Source::BuiltIn,
        },
    }
}

/// Built-in connect timeout when `timeouts.connect` is absent.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Built-in attempt timeout when neither the operation, `defaults` nor a `request` class says.
pub const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(30);

/// A circuit breaker with every field decided.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct EffectiveBreaker {
    /// Enforce or only record.
    pub mode: Sourced<BreakerMode>,
    /// Failure percentage that opens.
    pub error_threshold_percentage: Sourced<u8>,
    /// Calls needed before opening.
    pub volume_threshold: Sourced<u32>,
    /// Rolling window length.
    pub window: Sourced<Duration>,
    /// Buckets in the window.
    pub buckets: Sourced<u32>,
    /// Open time before half-open.
    pub reset_timeout: Sourced<Duration>,
    /// Bound of the growing reset timeout; `None` keeps it fixed.
    pub max_reset_timeout: Sourced<Option<Duration>>,
    /// Concurrent trials while half-open.
    pub half_open_trials: Sourced<u32>,
    /// Longest half-open without a verdict.
    pub half_open_max_wait: Sourced<Duration>,
    /// Slow-call rule, if any.
    pub slow_call: Sourced<Option<SlowCall>>,
    /// Outcomes counted as failures.
    pub failure_on: Sourced<Vec<Condition>>,
}

/// The built-in outcomes a breaker counts as failures.
pub fn default_failure_on() -> Vec<Condition> {
    vec![
        Condition::ConnectError,
        Condition::TransportError,
        Condition::Timeout,
        Condition::ServerError,
        Condition::Status(408),
        Condition::Status(429),
    ]
}

/// The built-in outcomes worth a retry. A transport error (a reset pooled
/// connection, most often) is retried like a timeout: both may have reached
/// the upstream, which is why validation demands an idempotency key before
/// POST or PATCH may retry at all.
pub fn default_retry_on() -> Vec<Condition> {
    vec![
        Condition::ConnectError,
        Condition::TransportError,
        Condition::Timeout,
        Condition::Status(429),
        Condition::Status(502),
        Condition::Status(503),
        Condition::Status(504),
    ]
}

/// The built-in retry back-off: 200ms doubling to 5s, full jitter.
pub fn default_backoff() -> Backoff {
    Backoff {
        initial: Duration::from_millis(200),
        multiplier: Multiplier::from_millis(2000),
        max: Duration::from_secs(5),
        jitter: Jitter::Full,
    }
}

/// The built-in DLQ redrive back-off: 30s doubling to 30m, full jitter.
pub fn default_dlq_backoff() -> Backoff {
    Backoff {
        initial: Duration::from_secs(30),
        multiplier: Multiplier::from_millis(2000),
        max: Duration::from_secs(30 * 60),
        jitter: Jitter::Full,
    }
}

impl EffectiveBreaker {
    /// Merges `op` over `defaults` over the built-ins.
    pub fn resolve(op: Option<&BreakerPolicy>, defaults: Option<&BreakerPolicy>) -> Self {
        macro_rules! field {
            ($name:ident, $built_in:expr) => {
                pick(
                    op.and_then(|p| p.$name.as_ref()),
                    defaults.and_then(|p| p.$name.as_ref()),
                    $built_in,
                )
            };
        }
        let optional = |a: Option<&BreakerPolicy>,
                        b: Option<&BreakerPolicy>,
                        f: fn(&BreakerPolicy) -> Option<Duration>| {
            match (a.and_then(f), b.and_then(f)) {
                (Some(v), _) => Sourced {
                    value: Some(v),
                    from: Source::Operation,
                },
                (None, Some(v)) => Sourced {
                    value: Some(v),
                    from: Source::Defaults,
                },
                (None, None) => Sourced {
                    value: None,
                    from: Source::BuiltIn,
                },
            }
        };
        let slow_call = match (
            op.and_then(|p| p.slow_call.clone()),
            defaults.and_then(|p| p.slow_call.clone()),
        ) {
            (Some(v), _) => Sourced {
                value: Some(v),
                from: Source::Operation,
            },
            (None, Some(v)) => Sourced {
                value: Some(v),
                from: Source::Defaults,
            },
            (None, None) => Sourced {
                value: None,
                from: Source::BuiltIn,
            },
        };
        EffectiveBreaker {
            mode: field!(mode, BreakerMode::Enforce),
            error_threshold_percentage: field!(error_threshold_percentage, 50),
            volume_threshold: field!(volume_threshold, 10),
            window: field!(window, Duration::from_secs(10)),
            buckets: field!(buckets, 10),
            reset_timeout: field!(reset_timeout, Duration::from_secs(30)),
            max_reset_timeout: optional(op, defaults, |p| p.max_reset_timeout),
            half_open_trials: field!(half_open_trials, 1),
            half_open_max_wait: field!(half_open_max_wait, Duration::from_secs(60)),
            slow_call,
            failure_on: field!(failure_on, default_failure_on()),
        }
    }
}

/// A retry policy with every field decided.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct EffectiveRetry {
    /// Attempts in all.
    pub max_attempts: Sourced<u32>,
    /// Back-off between attempts.
    pub backoff: Sourced<Backoff>,
    /// Outcomes worth a retry.
    pub on: Sourced<Vec<Condition>>,
    /// Whether `Retry-After` is honoured.
    pub respect_retry_after: Sourced<bool>,
    /// Retry budget in percent of the window's calls.
    pub budget_percent: Sourced<u8>,
}

impl EffectiveRetry {
    /// Merges `op` over `defaults` over the built-ins.
    pub fn resolve(op: Option<&RetryPolicy>, defaults: Option<&RetryPolicy>) -> Self {
        macro_rules! field {
            ($name:ident, $built_in:expr) => {
                pick(
                    op.and_then(|p| p.$name.as_ref()),
                    defaults.and_then(|p| p.$name.as_ref()),
                    $built_in,
                )
            };
        }
        EffectiveRetry {
            max_attempts: field!(max_attempts, 3),
            backoff: field!(backoff, default_backoff()),
            on: field!(on, default_retry_on()),
            respect_retry_after: field!(respect_retry_after, true),
            budget_percent: field!(budget_percent, 20),
        }
    }
}

/// The attempt timeout of an operation, as written (class or literal).
pub fn timeout_ref(op: &Operation, defaults: &Defaults) -> Sourced<Option<TimeoutRef>> {
    match (&op.timeout, &defaults.timeout) {
        (Some(t), _) => Sourced {
            value: Some(t.clone()),
            from: Source::Operation,
        },
        (None, Some(t)) => Sourced {
            value: Some(t.clone()),
            from: Source::Defaults,
        },
        (None, None) => Sourced {
            value: None,
            from: Source::BuiltIn,
        },
    }
}

impl PolicySet {
    /// The attempt timeout of `op`: its own, else `defaults.timeout`, else the
    /// class `request` when defined, else 30s. `None` when a class is unknown.
    pub fn attempt_timeout(&self, op: &Operation) -> Option<Duration> {
        resolve_timeout(&self.timeouts, op, &self.defaults)
    }

    /// The connect timeout: class `connect`, else 5s.
    pub fn connect_timeout(&self) -> Duration {
        self.timeouts
            .get("connect")
            .copied()
            .unwrap_or(CONNECT_TIMEOUT)
    }
}

/// See [`PolicySet::attempt_timeout`]; usable before a set exists.
pub fn resolve_timeout(
    classes: &std::collections::BTreeMap<String, Duration>,
    op: &Operation,
    defaults: &Defaults,
) -> Option<Duration> {
    match timeout_ref(op, defaults).value {
        Some(TimeoutRef::Literal(d)) => Some(d),
        Some(TimeoutRef::Class(name)) => classes.get(&name).copied(),
        None => Some(classes.get("request").copied().unwrap_or(ATTEMPT_TIMEOUT)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn operation_beats_defaults_beats_built_in() {
        let op = BreakerPolicy {
            window: Some(Duration::from_secs(20)),
            ..BreakerPolicy::default()
        };
        let defaults = BreakerPolicy {
            window: Some(Duration::from_secs(60)),
            buckets: Some(6),
            ..BreakerPolicy::default()
        };
        let b = EffectiveBreaker::resolve(Some(&op), Some(&defaults));
        assert_eq!(
            b.window,
            Sourced {
                value: Duration::from_secs(20),
                from: Source::Operation
            }
        );
        assert_eq!(
            b.buckets,
            Sourced {
                value: 6,
                from: Source::Defaults
            }
        );
        assert_eq!(
            b.volume_threshold,
            Sourced {
                value: 10,
                from: Source::BuiltIn
            }
        );
    }
}
