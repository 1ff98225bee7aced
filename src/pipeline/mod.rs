//! The executable pipeline: the layers that protect one call, and the
//! vocabulary they share (replies, failures, verdicts).
//!
//! # Order
//!
//! A call meets the layers in this order (DESIGN.md, "Data flow"):
//!
//! ```text
//! deadline -> retry -> breaker -> bulkhead -> rate limit -> attempt timeout -> HTTP
//! ```
//!
//! Retry runs everything inside it once per attempt, so every attempt is
//! admitted by the breaker, takes a bulkhead slot and a rate-limit token and
//! has its own timeout, while back-off sleeps hold none of them. Swapping two
//! layers changes behaviour: a breaker outside retry would count one call
//! where the upstream saw three; a bulkhead outside retry would hold its slot
//! through back-off sleeps.
//!
//! Each layer lives in its own file and knows nothing of the others: it takes
//! its settings and an inner step, and returns what the inner step returned
//! or a [`Failure`] of its own. [`Pipeline`](compose::Pipeline) composes them.

pub mod breaker;
pub mod bulkhead;
pub mod compose;
pub mod fallback;
pub mod http;
pub mod idempotency;
pub mod rate_limit;
pub mod retry;
pub mod timeout;

use std::time::Duration;

use ::http::{HeaderMap, StatusCode};
use bytes::Bytes;

use crate::policy::model::{Condition, Priority};

/// What the upstream answered (any status).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// HTTP status.
    pub status: StatusCode,
    /// Response headers.
    pub headers: HeaderMap,
    /// Response body, already size-limited.
    pub body: Bytes,
}

/// Why a call (or one attempt of it) did not produce a successful reply.
///
/// Each variant has a stable [`code`](Failure::code) that the admin API,
/// metrics and logs use.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Failure {
    /// The operation's circuit breaker is open; nothing was sent.
    #[error("circuit breaker is open")]
    BreakerOpen {
        /// When the breaker will next let a trial through.
        retry_after: Duration,
    },
    /// The bulkhead class and its queue are full; nothing was sent.
    #[error("bulkhead class `{priority}` is full")]
    BulkheadFull {
        /// The class that was full.
        priority: Priority,
    },
    /// Waited for a bulkhead slot longer than the class's queue timeout.
    #[error("no bulkhead slot of class `{priority}` within {waited:?}")]
    QueueTimeout {
        /// The class waited for.
        priority: Priority,
        /// How long the call waited.
        waited: Duration,
    },
    /// The upstream's rate limit (or its quota gate) has no token before the deadline.
    #[error("rate limited")]
    RateLimited {
        /// When a token (or the quota) is next available.
        retry_after: Duration,
    },
    /// One attempt took longer than the attempt timeout.
    #[error("attempt timed out after {after:?}")]
    AttemptTimeout {
        /// The timeout that fired.
        after: Duration,
    },
    /// The whole call ran out of its deadline.
    #[error("deadline exceeded")]
    DeadlineExceeded,
    /// No connection could be set up (refused, unreachable, connect timeout).
    #[error("cannot connect to the upstream: {0}")]
    Connect(String),
    /// The connection failed after it was set up (reset, malformed response).
    #[error("connection to the upstream failed: {0}")]
    Transport(String),
    /// The upstream answered with a non-success status (boxed: replies are
    /// large and failures travel through every layer's `Result`).
    #[error("upstream answered {}", .0.status)]
    Status(Box<Reply>),
    /// The response body was larger than allowed.
    #[error("upstream response body exceeds {limit} bytes")]
    BodyTooLarge {
        /// The limit in bytes.
        limit: usize,
    },
    /// The params cannot fill the request template.
    #[error("bad params: {0}")]
    BadParams(String),
    /// claygate shut down before the call finished (the request may have
    /// reached the upstream).
    #[error("interrupted by shutdown")]
    Interrupted,
}

impl Failure {
    /// The stable code of this failure, e.g. `breaker_open`.
    pub fn code(&self) -> &'static str {
        match self {
            Failure::BreakerOpen { .. } => "breaker_open",
            Failure::BulkheadFull { .. } => "bulkhead_full",
            Failure::QueueTimeout { .. } => "queue_timeout",
            Failure::RateLimited { .. } => "rate_limited",
            Failure::AttemptTimeout { .. } => "attempt_timeout",
            Failure::DeadlineExceeded => "deadline_exceeded",
            Failure::Connect(_) => "connect_error",
            Failure::Transport(_) => "transport_error",
            Failure::Status(_) => "upstream_status",
            Failure::BodyTooLarge { .. } => "body_too_large",
            Failure::BadParams(_) => "bad_params",
            Failure::Interrupted => "interrupted",
        }
    }

    /// True when the request may have reached the upstream (so its effect
    /// may have happened). Refusals by our own layers never reach it.
    pub fn reached_upstream(&self) -> bool {
        matches!(
            self,
            Failure::AttemptTimeout { .. }
                | Failure::DeadlineExceeded
                | Failure::Transport(_)
                | Failure::Status(_)
                | Failure::BodyTooLarge { .. }
                | Failure::Interrupted
        )
    }

    /// True when a protective layer of ours refused the call; such refusals
    /// never count in a circuit breaker's window.
    pub fn is_refusal(&self) -> bool {
        matches!(
            self,
            Failure::BreakerOpen { .. }
                | Failure::BulkheadFull { .. }
                | Failure::QueueTimeout { .. }
                | Failure::RateLimited { .. }
                | Failure::BadParams(_)
        )
    }

    /// Whether this failure is of the outcome class `condition`.
    pub fn matches(&self, condition: Condition) -> bool {
        match (condition, self) {
            (Condition::ConnectError, Failure::Connect(_)) => true,
            (Condition::TransportError, Failure::Transport(_)) => true,
            (Condition::Timeout, Failure::AttemptTimeout { .. }) => true,
            (Condition::ServerError, Failure::Status(r)) => r.status.is_server_error(),
            (Condition::Status(code), Failure::Status(r)) => r.status.as_u16() == code,
            _ => false,
        }
    }

    /// True when any of `conditions` matches.
    pub fn matches_any(&self, conditions: &[Condition]) -> bool {
        conditions.iter().any(|c| self.matches(*c))
    }
}

/// What a finished attempt means to a circuit breaker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Verdict {
    /// Counted as a success (includes non-failure statuses such as 404).
    Success,
    /// Counted as a failure (the outcome is in `failure_on`).
    Failure,
}

/// A `std` duration from a policy duration.
pub(crate) fn std(d: crate::policy::model::Duration) -> Duration {
    d.to_std()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(code: u16) -> Failure {
        Failure::Status(Box::new(Reply {
            status: StatusCode::from_u16(code).expect("valid status"),
            headers: HeaderMap::new(),
            body: Bytes::new(),
        }))
    }

    #[test]
    fn conditions_match_their_failures_only() {
        let connect = Failure::Connect("refused".into());
        let reset = Failure::Transport("reset".into());
        let timeout = Failure::AttemptTimeout {
            after: Duration::from_secs(1),
        };
        assert!(connect.matches(Condition::ConnectError));
        assert!(!reset.matches(Condition::ConnectError));
        assert!(reset.matches(Condition::TransportError));
        assert!(timeout.matches(Condition::Timeout));
        assert!(!Failure::DeadlineExceeded.matches(Condition::Timeout));
        assert!(status(503).matches(Condition::ServerError));
        assert!(status(503).matches(Condition::Status(503)));
        assert!(!status(429).matches(Condition::ServerError));
        assert!(status(429).matches_any(&[Condition::Timeout, Condition::Status(429)]));
        assert!(!status(404).matches_any(&[Condition::ServerError, Condition::Status(429)]));
    }

    #[test]
    fn refusals_never_reached_the_upstream() {
        let refusals = [
            Failure::BreakerOpen {
                retry_after: Duration::ZERO,
            },
            Failure::BulkheadFull {
                priority: Priority::Bulk,
            },
            Failure::QueueTimeout {
                priority: Priority::Normal,
                waited: Duration::ZERO,
            },
            Failure::RateLimited {
                retry_after: Duration::ZERO,
            },
            Failure::BadParams("x".into()),
        ];
        for f in &refusals {
            assert!(f.is_refusal(), "{}", f.code());
            assert!(!f.reached_upstream(), "{}", f.code());
        }
        for f in [
            status(500),
            Failure::Transport("reset".into()),
            Failure::DeadlineExceeded,
        ] {
            assert!(!f.is_refusal(), "{}", f.code());
            assert!(f.reached_upstream(), "{}", f.code());
        }
        assert!(!Failure::Connect("refused".into()).reached_upstream());
    }

    #[test]
    fn codes_are_stable_snake_case() {
        assert_eq!(status(502).code(), "upstream_status");
        assert_eq!(Failure::DeadlineExceeded.code(), "deadline_exceeded");
        assert_eq!(Failure::Transport(String::new()).code(), "transport_error");
        assert_eq!(Failure::BodyTooLarge { limit: 1 }.code(), "body_too_large");
    }
}
