//! One operation's pipeline: the layers of this module's siblings composed
//! in the order documented in [`super`], with the per-invoke and per-attempt
//! tracing spans.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, SystemTime};

use http::{HeaderMap, HeaderName, HeaderValue};
use serde_json::Value;
use tokio::time::Instant;
use tracing::Instrument;

use super::breaker::{Breaker, BreakerState};
use super::bulkhead::Bulkhead;
use super::fallback::Fallback;
use super::http::{CompiledRequest, HttpConfig, Rendered, Transport};
use super::idempotency::IdempotencyConfig;
use super::rate_limit::RateLimiter;
use super::retry::{self, RetryBudget, RetryConfig};
use super::{Failure, Reply, Verdict, timeout};
use crate::dlq::DlqConfig;
use crate::policy::model::{Condition, Priority};
use crate::scrub::Secrets;

/// What an upstream shares among its operations: the HTTP client, the
/// bulkhead and the rate limiter.
pub struct UpstreamRuntime {
    /// The upstream's name.
    pub name: String,
    /// HTTP settings the transport was built with.
    pub http: HttpConfig,
    /// What the environment put into `base_url` and the headers: scrubbed
    /// from anything repeated about this upstream (never printed).
    pub secrets: Secrets,
    /// Sends the requests.
    pub transport: Arc<dyn Transport>,
    /// Priority classes; `None` when the upstream defines none.
    pub bulkhead: Option<Arc<Bulkhead>>,
    /// Token bucket and quota gate; `None` without a `rate_limit`.
    pub limiter: Option<Arc<RateLimiter>>,
}

/// One call of an operation.
#[derive(Debug, Clone, Default)]
pub struct Invocation {
    /// The params, as JSON.
    pub params: Value,
    /// A priority asked by the caller, used when the upstream has that class.
    pub priority: Option<Priority>,
    /// The idempotency key to forward upstream, if any.
    pub idempotency_key: Option<String>,
}

/// How a call ended, with what the API reports about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// The successful reply, or why there is none.
    pub result: Result<Reply, Failure>,
    /// Requests sent (0 when refused before the first was sent).
    pub attempts: u32,
    /// Time from the start of the call to its end.
    pub latency: Duration,
    /// The breaker's state when the call ended.
    pub breaker: BreakerState,
}

/// The compiled pipeline of one operation.
pub struct Pipeline {
    /// The operation's name.
    pub name: String,
    /// The upstream's secrets and what the environment put into the
    /// operation's headers: scrubbed from error bodies and messages.
    pub secrets: Secrets,
    /// The upstream it calls.
    pub upstream: Arc<UpstreamRuntime>,
    /// The request template.
    pub request: CompiledRequest,
    /// Bulkhead class unless the caller asks for another.
    pub priority: Priority,
    /// Bound of one attempt.
    pub attempt_timeout: Duration,
    /// Bound of the whole call.
    pub deadline: Option<Duration>,
    /// Retry settings.
    pub retry: RetryConfig,
    /// Retry budget, shared across reloads while unchanged.
    pub budget: Arc<RetryBudget>,
    /// Circuit breaker, shared across reloads while unchanged.
    pub breaker: Arc<Breaker>,
    /// Outcomes the breaker counts as failures.
    pub failure_on: Vec<Condition>,
    /// Header that forwards the idempotency key.
    pub idempotency_header: Option<HeaderName>,
    /// Checks the params before anything else runs.
    pub params_schema: Option<Arc<jsonschema::Validator>>,
    /// Idempotency settings (a caller's key is honoured on every operation).
    pub idempotency: IdempotencyConfig,
    /// What is served when the call fails.
    pub fallback: Option<Fallback>,
    /// Where calls that fail for good go.
    pub dlq: Option<DlqConfig>,
}

impl Pipeline {
    /// Runs one call through every layer.
    pub async fn call(&self, invocation: &Invocation) -> Outcome {
        let attempts = AtomicU32::new(0);
        self.call_counting(invocation, &attempts).await
    }

    /// [`call`](Self::call), keeping the number of requests sent so far in
    /// `attempts` as it goes: a caller that stops waiting (a shutdown
    /// interrupting the call) still knows how many reached the upstream.
    pub async fn call_counting(&self, invocation: &Invocation, attempts: &AtomicU32) -> Outcome {
        let started = Instant::now();
        // Debug level: nothing inside a call logs at info or above, and an
        // enabled span costs field formatting on every call (7% of an
        // invoke at the default level, measured with callgrind).
        let span = tracing::debug_span!(
            "invoke",
            operation = %self.name,
            outcome = tracing::field::Empty,
            attempts = tracing::field::Empty,
        );
        // Boxed once here: the layers' futures nest deeply, and moving the
        // whole state machine through each wrapper showed up as memmove.
        let result = Box::pin(self.run(invocation, started, attempts))
            .instrument(span.clone())
            .await;
        let attempts = attempts.load(Ordering::Relaxed);
        span.record("outcome", result.as_ref().err().map_or("ok", Failure::code));
        span.record("attempts", attempts);
        Outcome {
            result,
            attempts,
            latency: started.elapsed(),
            breaker: self.breaker.state(),
        }
    }

    async fn run(
        &self,
        invocation: &Invocation,
        started: Instant,
        attempts: &AtomicU32,
    ) -> Result<Reply, Failure> {
        let rendered = self.request.render(&invocation.params)?;
        let extra = self.extra_headers(invocation)?;
        let deadline = self.deadline.and_then(|d| started.checked_add(d));
        let priority = self.priority_for(invocation.priority);
        let attempts_loop = retry::run(&self.retry, &self.budget, deadline, |n| {
            self.attempt(n, attempts, &rendered, &extra, priority, deadline)
        });
        let (result, _) = timeout::deadline(deadline, async { Ok(attempts_loop.await) }).await?;
        result
    }

    /// The class a call takes: the caller may lower its priority (a batch
    /// caller yielding to others) but never raise it above the operation's,
    /// or any caller could claim `critical` slots and the critical token reserve.
    pub fn priority_for(&self, asked: Option<Priority>) -> Priority {
        match (asked, &self.upstream.bulkhead) {
            // `Priority` orders highest first: a larger value is a lower class.
            (Some(p), Some(b)) if p >= self.priority && b.has_class(p) => p,
            _ => self.priority,
        }
    }

    /// Headers added to every attempt: the idempotency key, which must be a
    /// valid header value (else upstream deduplication would silently stop).
    fn extra_headers(&self, invocation: &Invocation) -> Result<HeaderMap, Failure> {
        let mut extra = HeaderMap::new();
        if let (Some(name), Some(key)) = (&self.idempotency_header, &invocation.idempotency_key) {
            let value = HeaderValue::from_str(key).map_err(|_| {
                Failure::BadParams(format!(
                    "the idempotency key cannot be sent as header `{name}`: use visible ASCII"
                ))
            })?;
            extra.insert(name.clone(), value);
        }
        Ok(extra)
    }

    /// One attempt: breaker, bulkhead, rate limit, attempt timeout, HTTP.
    async fn attempt(
        &self,
        n: u32,
        attempts: &AtomicU32,
        rendered: &Rendered,
        extra: &HeaderMap,
        priority: Priority,
        deadline: Option<Instant>,
    ) -> Result<Reply, Failure> {
        let span = tracing::debug_span!("attempt", attempt = n, outcome = tracing::field::Empty);
        let result = Box::pin(self.attempt_inner(n, attempts, rendered, extra, priority, deadline))
            .instrument(span.clone())
            .await;
        span.record("outcome", result.as_ref().err().map_or("ok", Failure::code));
        result
    }

    async fn attempt_inner(
        &self,
        n: u32,
        attempts: &AtomicU32,
        rendered: &Rendered,
        extra: &HeaderMap,
        priority: Priority,
        deadline: Option<Instant>,
    ) -> Result<Reply, Failure> {
        // Fail fast on an open breaker before queueing anywhere; the permit
        // itself is taken only once a slot and a token are held, so a
        // half-open trial never waits in a queue while everyone else is refused.
        drop(self.breaker.try_acquire()?);
        let _slot = match &self.upstream.bulkhead {
            Some(bulkhead) => Some(bulkhead.acquire(priority).await?),
            None => None,
        };
        if let Some(limiter) = &self.upstream.limiter {
            let max_wait = match deadline {
                Some(d) => d
                    .saturating_duration_since(Instant::now())
                    .saturating_sub(MIN_SEND_TIME),
                None => self.attempt_timeout,
            };
            limiter.acquire(priority, max_wait).await?;
        }
        // A refusal from here on drops the permit unrecorded: refusals never count.
        let permit = self.breaker.try_acquire()?;
        let sent = Instant::now();
        if deadline.is_some_and(|d| d.saturating_duration_since(sent) < MIN_SEND_TIME) {
            // Sending now would put a request on the wire only to abandon it.
            return Err(Failure::DeadlineExceeded);
        }
        attempts.store(n, Ordering::Relaxed);
        let result = timeout::attempt_from(
            sent,
            self.attempt_timeout,
            deadline,
            self.upstream.transport.send(rendered, extra),
        )
        .await
        .and_then(classify);
        let latency = sent.elapsed();
        match &result {
            Ok(_) => permit.record(Verdict::Success, latency),
            // The deadline cut a request in flight. Long enough in flight, that
            // is the upstream timing out (else a hung upstream behind a tight
            // deadline would never open the breaker); a short cut says nothing.
            Err(Failure::DeadlineExceeded) => {
                if latency >= self.attempt_timeout / 2
                    && self.failure_on.contains(&Condition::Timeout)
                {
                    permit.record(Verdict::Failure, latency);
                }
            }
            Err(f) if f.is_refusal() => drop(permit),
            Err(f) if f.matches_any(&self.failure_on) => permit.record(Verdict::Failure, latency),
            Err(_) => permit.record(Verdict::Success, latency),
        }
        if let (Err(f @ Failure::Status(reply)), Some(limiter)) = (&result, &self.upstream.limiter)
            && reply.status == http::StatusCode::TOO_MANY_REQUESTS
            && let Some(wait) = retry::hint(f, SystemTime::now())
        {
            // A wrong hint must not silence an upstream for a day.
            let wait = wait.min(MAX_QUOTA_GATE);
            if let Some(until) = Instant::now().checked_add(wait) {
                limiter.close_until(until);
            }
        }
        result
    }
}

/// Least time worth sending a request with; less is a deadline miss.
pub const MIN_SEND_TIME: Duration = Duration::from_millis(1);

/// Longest a 429's reset hint closes the upstream's quota gate.
pub const MAX_QUOTA_GATE: Duration = Duration::from_secs(3600);

/// A 2xx reply is a success; any other status is a failure carrying the reply.
fn classify(reply: Reply) -> Result<Reply, Failure> {
    if reply.status.is_success() {
        Ok(reply)
    } else {
        Err(Failure::Status(Box::new(reply)))
    }
}
