//! The live runtime: the current compiled generation (swapped atomically on
//! reload), the store, the clock and the event stream, and `invoke`, which
//! runs a call through the outer layers around the operation's pipeline:
//!
//! ```text
//! params check -> idempotency -> [ pipeline ] -> on failure: DLQ, else fallback
//! ```
//!
//! A dead letter's first redrive is due after the DLQ back-off's first
//! step, jittered.
//!
//! A call's work runs in its own task, so a caller that goes away (an HTTP
//! client disconnecting) cannot cancel it half-way: the answer is still
//! stored for replay, or the dead letter still written. Nothing accepted is
//! lost; see [`Answer`] for the four ways a call ends.

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use serde_json::Value;

use crate::clock::{Clock, UnixMillis};
use crate::compile::Compiled;
use crate::dlq::is_dead_letterable;
use crate::events::{Event, Events};
use crate::metrics::Metrics;
use crate::pipeline::breaker::BreakerState;
use crate::pipeline::compose::{Invocation, Outcome, Pipeline};
use crate::pipeline::fallback::{Cached, Staleness};
use crate::pipeline::idempotency::{self, InFlight, Joined, KeyError};
use crate::pipeline::{Failure, Reply};
use crate::policy::model::{OnConcurrent, Priority};
use crate::store::{
    CacheEntry, Claim, IdempotencyState, NewDeadLetter, Store, StoreError, StoredResponse,
};

/// Longest a duplicate waits between looks at another process's in-flight claim.
const FOREIGN_POLL: Duration = Duration::from_millis(100);

/// What a caller asks.
#[derive(Debug, Clone, Default)]
pub struct InvokeRequest {
    /// The params, as JSON.
    pub params: Value,
    /// The caller's `Idempotency-Key`, if sent.
    pub idempotency_key: Option<String>,
    /// A lower priority class than the operation's, if asked.
    pub priority: Option<Priority>,
}

/// How a call ended.
#[derive(Debug, Clone)]
pub struct Invoked {
    /// The operation called.
    pub operation: String,
    /// Its answer.
    pub answer: Answer,
    /// Requests sent upstream by this call (0 for a replay or refusal).
    pub attempts: u32,
    /// Time the call took.
    pub latency: Duration,
    /// The breaker's state when it ended (`None` for an unknown operation).
    pub breaker: Option<BreakerState>,
    /// The idempotency key used, if any.
    pub idempotency: Option<IdempotencyMeta>,
}

/// The idempotency side of an answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdempotencyMeta {
    /// The key (the caller's, or derived from params).
    pub key: String,
    /// True when the key was derived from params.
    pub derived: bool,
    /// True when this answer is a stored or shared one, not a new call.
    pub replayed: bool,
}

/// The four ways a call ends (DESIGN.md: delivered, served from fallback,
/// dead-lettered, or refused with a clear error).
#[derive(Debug, Clone)]
pub enum Answer {
    /// The upstream answered with success.
    Ok(Arc<StoredResponse>),
    /// The call failed; a cached or static answer is served instead.
    Fallback {
        /// The answer served.
        response: Arc<StoredResponse>,
        /// How old it is.
        staleness: Staleness,
        /// Its age (`None` for a static value).
        age: Option<Duration>,
        /// Why the call failed.
        cause: Failure,
    },
    /// The call failed for good and was written to the DLQ for redrive.
    Queued {
        /// The dead letter's id.
        dlq_id: i64,
        /// Why the call failed (`None` on an idempotent replay).
        cause: Option<Failure>,
    },
    /// The call was refused or failed; nothing more will happen to it.
    Failed(InvokeError),
}

/// Why a call failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum InvokeError {
    /// No operation of that name in the serving generation.
    #[error("unknown operation `{0}`")]
    UnknownOperation(String),
    /// The params fail the operation's `params_schema`.
    #[error("params{path}: {message}")]
    InvalidParams {
        /// JSON pointer of the failing value (empty for the root).
        path: String,
        /// What is wrong.
        message: String,
    },
    /// No idempotency key can be made from the request.
    #[error(transparent)]
    BadIdempotencyKey(#[from] KeyError),
    /// The key was used before with other params.
    #[error("idempotency key reused with different params")]
    IdempotencyConflict,
    /// A call with this key is in flight and the policy says reject.
    #[error("a call with this idempotency key is in flight")]
    InFlight,
    /// The pipeline's failure (refusal, timeout, upstream error).
    #[error(transparent)]
    Failure(#[from] Failure),
    /// The store could not keep what the call needs kept.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The call's task ended without an answer (a bug; reported, not hidden).
    #[error("the call ended without an answer: {0}")]
    Internal(String),
}

impl InvokeError {
    /// The stable code of this error.
    pub fn code(&self) -> &'static str {
        match self {
            InvokeError::UnknownOperation(_) => "unknown_operation",
            InvokeError::InvalidParams { .. } => "invalid_params",
            InvokeError::BadIdempotencyKey(_) => "bad_idempotency_key",
            InvokeError::IdempotencyConflict => "idempotency_conflict",
            InvokeError::InFlight => "idempotency_in_flight",
            InvokeError::Failure(f) => f.code(),
            InvokeError::Store(_) => "store_unavailable",
            InvokeError::Internal(_) => "internal",
        }
    }
}

impl Answer {
    /// `ok`, `fallback`, `queued` or `failed`.
    pub fn status(&self) -> &'static str {
        match self {
            Answer::Ok(_) => "ok",
            Answer::Fallback { .. } => "fallback",
            Answer::Queued { .. } => "queued",
            Answer::Failed(_) => "failed",
        }
    }
}

/// The running state of claygate.
pub struct Runtime {
    compiled: ArcSwap<Compiled>,
    /// Durable state.
    pub store: Arc<dyn Store>,
    /// Wall time for records (follows tokio's clock).
    pub clock: Clock,
    /// Events for listeners.
    pub events: Events,
    inflight: Arc<InFlight<Invoked>>,
    /// The DLQ redrive worker's state.
    pub redrive: crate::dlq::RedriveState,
    /// Prometheus metrics.
    pub metrics: Arc<Metrics>,
    // Breakers whose transitions are forwarded to `events`, by address.
    watched: std::sync::Mutex<std::collections::HashSet<usize>>,
    // Latest fallback answer per operation (for health's "answers are stale").
    fallbacks: std::sync::Mutex<std::collections::HashMap<String, (UnixMillis, Staleness)>>,
    // Calls running now, and a wake-up when that reaches zero.
    active: std::sync::atomic::AtomicUsize,
    idle: tokio::sync::Notify,
    // Set at the end of a drain: calls still running stop and, when their
    // operation has a DLQ, are dead-lettered.
    interrupt: tokio::sync::watch::Sender<bool>,
}

/// What [`Runtime::drain`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Drained {
    /// Calls that finished on their own during the drain.
    pub finished: usize,
    /// Calls interrupted at the drain timeout (dead-lettered when their operation has a DLQ).
    pub interrupted: usize,
}

/// Counts a running call; the count drops (and drain wakes) when it ends,
/// however it ends.
struct ActiveCall<'a>(&'a Runtime);

impl<'a> ActiveCall<'a> {
    fn new(runtime: &'a Runtime) -> Self {
        runtime
            .active
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        ActiveCall(runtime)
    }
}

impl Drop for ActiveCall<'_> {
    fn drop(&mut self) {
        if self
            .0
            .active
            .fetch_sub(1, std::sync::atomic::Ordering::AcqRel)
            == 1
        {
            self.0.idle.notify_waiters();
        }
    }
}

impl Runtime {
    /// A runtime serving `compiled`.
    pub fn new(compiled: Compiled, store: Arc<dyn Store>, clock: Clock) -> Arc<Runtime> {
        let runtime = Arc::new(Runtime {
            compiled: ArcSwap::from_pointee(compiled),
            store,
            clock,
            events: Events::new(),
            inflight: InFlight::new(),
            redrive: crate::dlq::RedriveState::default(),
            metrics: Arc::new(Metrics::new()),
            watched: std::sync::Mutex::default(),
            fallbacks: std::sync::Mutex::default(),
            active: std::sync::atomic::AtomicUsize::new(0),
            idle: tokio::sync::Notify::new(),
            interrupt: tokio::sync::watch::channel(false).0,
        });
        runtime.watch_breakers();
        runtime
    }

    /// Forwards the transitions of every breaker of the serving generation
    /// not yet watched to the event stream and the metrics. A forwarder ends
    /// when its breaker is dropped (its operation removed or its breaker
    /// rebuilt by a reload).
    fn watch_breakers(&self) {
        let Ok(handle) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let compiled = self.compiled();
        let mut watched = self
            .watched
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        // Forget breakers no longer serving, so a new one at a reused address is watched.
        let live: std::collections::HashSet<usize> = compiled
            .operations
            .values()
            .map(|p| Arc::as_ptr(&p.breaker) as usize)
            .collect();
        watched.retain(|a| live.contains(a));
        for (name, pipeline) in &compiled.operations {
            if !watched.insert(Arc::as_ptr(&pipeline.breaker) as usize) {
                continue;
            }
            let mut transitions = pipeline.breaker.subscribe();
            let events = self.events.clone();
            let metrics = Arc::clone(&self.metrics);
            let operation = name.clone();
            handle.spawn(async move {
                use tokio::sync::broadcast::error::RecvError;
                loop {
                    match transitions.recv().await {
                        Ok(transition) => {
                            metrics
                                .breaker_transitions
                                .get_or_create(&crate::metrics::TransitionLabels {
                                    operation: operation.clone(),
                                    to: transition.to.as_str().to_owned(),
                                })
                                .inc();
                            tracing::info!(
                                operation = %operation,
                                from = transition.from.as_str(),
                                to = transition.to.as_str(),
                                reason = transition.reason,
                                "breaker transition"
                            );
                            events.emit(Event::Breaker {
                                operation: operation.clone(),
                                transition,
                            });
                        }
                        Err(RecvError::Lagged(missed)) => {
                            tracing::warn!(operation = %operation, missed, "breaker transitions missed by the event stream");
                        }
                        Err(RecvError::Closed) => break,
                    }
                }
            });
        }
    }

    /// The generation serving now. Calls keep the one they started with.
    pub fn compiled(&self) -> Arc<Compiled> {
        self.compiled.load_full()
    }

    /// Serves `next` from now on; answers the generation it replaced.
    pub fn swap(&self, next: Compiled) -> Arc<Compiled> {
        let previous = self.compiled.swap(Arc::new(next));
        self.watch_breakers();
        previous
    }

    /// When `operation` last answered from its fallback, and how stale.
    pub fn last_fallback(&self, operation: &str) -> Option<(UnixMillis, Staleness)> {
        self.fallbacks
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(operation)
            .copied()
    }

    /// Calls running now.
    pub fn active_calls(&self) -> usize {
        self.active.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Lets running calls finish for up to `timeout`, then interrupts the
    /// rest: an interrupted call of an operation with a DLQ is dead-lettered
    /// (never dropped), any other answers `interrupted`. Answers once every
    /// call has ended. New calls should be refused before draining.
    pub async fn drain(&self, timeout: Duration) -> Drained {
        let before = self.active_calls();
        let idle = async {
            loop {
                let notified = self.idle.notified();
                if self.active_calls() == 0 {
                    break;
                }
                notified.await;
            }
        };
        if tokio::time::timeout(timeout, idle).await.is_ok() {
            return Drained {
                finished: before,
                interrupted: 0,
            };
        }
        let interrupted = self.active_calls();
        self.interrupt.send_replace(true);
        loop {
            let notified = self.idle.notified();
            if self.active_calls() == 0 {
                break;
            }
            notified.await;
        }
        Drained {
            finished: before.saturating_sub(interrupted),
            interrupted,
        }
    }

    /// Idempotent calls in flight in this process.
    pub fn calls_in_flight(&self) -> usize {
        self.inflight.len()
    }

    /// Runs one call of `operation`. The work runs in its own task: dropping
    /// this future does not cancel it.
    pub async fn invoke(self: &Arc<Self>, operation: &str, request: InvokeRequest) -> Invoked {
        let runtime = Arc::clone(self);
        let name = operation.to_owned();
        let started = tokio::time::Instant::now();
        match tokio::spawn(async move { runtime.invoke_here(&name, request).await }).await {
            Ok(invoked) => {
                self.record(&invoked);
                invoked
            }
            Err(e) => Invoked {
                operation: operation.to_owned(),
                answer: Answer::Failed(InvokeError::Internal(e.to_string())),
                attempts: 0,
                latency: started.elapsed(),
                breaker: None,
                idempotency: None,
            },
        }
    }

    /// Counts a finished call in the metrics.
    fn record(&self, invoked: &Invoked) {
        let m = &self.metrics;
        let code = match &invoked.answer {
            Answer::Ok(_) => "ok",
            Answer::Fallback { cause, .. } => cause.code(),
            Answer::Queued { cause, .. } => cause.as_ref().map_or("replayed", Failure::code),
            Answer::Failed(e) => e.code(),
        };
        // Unknown operation names come from callers: one label set for all,
        // so a scan of random names cannot grow the registry without bound.
        let known = !matches!(
            &invoked.answer,
            Answer::Failed(InvokeError::UnknownOperation(_))
        );
        let operation = if known {
            invoked.operation.as_str()
        } else {
            "(unknown)"
        };
        m.invokes
            .get_or_create(&crate::metrics::OutcomeLabels {
                operation: operation.to_owned(),
                status: invoked.answer.status().to_owned(),
                code: code.to_owned(),
            })
            .inc();
        if !known {
            return;
        }
        let labels = crate::metrics::op(operation);
        m.latency
            .get_or_create(&labels)
            .observe(invoked.latency.as_secs_f64());
        if invoked.attempts > 1 {
            m.retries
                .get_or_create(&labels)
                .inc_by(u64::from(invoked.attempts - 1));
        }
        if let Answer::Fallback { staleness, .. } = &invoked.answer {
            self.fallbacks
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .insert(operation.to_owned(), (self.clock.now(), *staleness));
            m.fallbacks
                .get_or_create(&crate::metrics::StalenessLabels {
                    operation: operation.to_owned(),
                    staleness: staleness.as_str().to_owned(),
                })
                .inc();
        }
        if invoked.idempotency.as_ref().is_some_and(|i| i.replayed) {
            m.idempotent_replays.get_or_create(&labels).inc();
        }
    }

    /// [`invoke`](Self::invoke) in the caller's task (cancelled with it).
    pub async fn invoke_here(&self, operation: &str, request: InvokeRequest) -> Invoked {
        let _active = ActiveCall::new(self);
        let started = tokio::time::Instant::now();
        let compiled = self.compiled();
        let Some(pipeline) = compiled.operations.get(operation) else {
            return refused(
                operation,
                started,
                None,
                InvokeError::UnknownOperation(operation.into()),
            );
        };
        let breaker = Some(pipeline.breaker.state());
        if let Err(e) = check_params(pipeline, &request.params) {
            return refused(operation, started, breaker, e);
        }
        let key = match &request.idempotency_key {
            Some(k) => idempotency::check_key(k).map(|()| Some((k.clone(), false))),
            None => idempotency::derive_key(
                operation,
                &pipeline.idempotency.key_params,
                &request.params,
            )
            .map(|k| k.map(|k| (k, true))),
        };
        let mut invoked = match key {
            Err(e) => refused(operation, started, breaker, e.into()),
            Ok(None) => self.protected(pipeline, &request, None).await,
            Ok(Some((key, derived))) => {
                let mut invoked = self.idempotent(pipeline, &request, &key).await;
                if let Some(meta) = &mut invoked.idempotency {
                    meta.derived = derived;
                }
                invoked
            }
        };
        invoked.latency = started.elapsed();
        invoked
    }

    /// The idempotency layer: one call per key, duplicates share or replay it.
    async fn idempotent(&self, pipeline: &Pipeline, request: &InvokeRequest, key: &str) -> Invoked {
        let started = tokio::time::Instant::now();
        let name = pipeline.name.as_str();
        let fingerprint = match idempotency::sha256_canonical(&request.params, "params") {
            Ok(f) => f,
            Err(e) => return refused(name, started, Some(pipeline.breaker.state()), e.into()),
        };
        let meta = |replayed| IdempotencyMeta {
            key: key.to_owned(),
            derived: false,
            replayed,
        };
        let leader = loop {
            match self.inflight.join(name, key, &fingerprint) {
                Joined::Lead(leader) => break leader,
                Joined::Conflict => {
                    return with_meta(
                        refused(
                            name,
                            started,
                            Some(pipeline.breaker.state()),
                            InvokeError::IdempotencyConflict,
                        ),
                        meta(false),
                    );
                }
                Joined::Follow(receiver) => {
                    if pipeline.idempotency.on_concurrent == OnConcurrent::Reject {
                        return with_meta(
                            refused(
                                name,
                                started,
                                Some(pipeline.breaker.state()),
                                InvokeError::InFlight,
                            ),
                            meta(false),
                        );
                    }
                    if let Some(mut shared) = idempotency::follow(receiver).await {
                        shared.attempts = 0;
                        if let Some(m) = &mut shared.idempotency {
                            m.replayed = true;
                        }
                        return shared;
                    }
                    // The leader went away without an answer: try again.
                }
            }
        };
        let invoked = self.claimed(pipeline, request, key, &fingerprint).await;
        let replayed = invoked_replayed(&invoked);
        let invoked = with_meta(invoked, meta(replayed));
        leader.publish(invoked.clone());
        invoked
    }

    /// Claims `key` in the store, then runs, replays or refuses.
    async fn claimed(
        &self,
        pipeline: &Pipeline,
        request: &InvokeRequest,
        key: &str,
        fingerprint: &str,
    ) -> Invoked {
        let started = tokio::time::Instant::now();
        let name = pipeline.name.as_str();
        let config = &pipeline.idempotency;
        if pipeline.dlq.is_none() && crate::dlq::waiting_on_breaker(&pipeline.breaker) {
            // Nothing will be sent: a stored answer still replays, but no
            // claim is written (two synced writes) only to be released, so
            // failing fast stays fast.
            let now = self.clock.now();
            if let Ok(Some(record)) = self.store.idempotency_get(name, key).await
                && record.expires_at > now
            {
                if record.fingerprint != fingerprint {
                    return refused(
                        name,
                        started,
                        Some(pipeline.breaker.state()),
                        InvokeError::IdempotencyConflict,
                    );
                }
                let answer = match record.state {
                    IdempotencyState::Completed(response) => Some(replay_answer(response)),
                    IdempotencyState::Queued { dlq_id } => Some(Answer::Queued {
                        dlq_id,
                        cause: None,
                    }),
                    IdempotencyState::InFlight { .. } => None,
                };
                if let Some(answer) = answer {
                    return replayed(pipeline, key, answer, started);
                }
            }
            return self.protected(pipeline, request, Some(key)).await;
        }
        loop {
            let now = self.clock.now();
            let claim = self
                .store
                .idempotency_claim(
                    name,
                    key,
                    fingerprint,
                    now,
                    now.saturating_add(crate::clock::millis(config.lease)),
                    now.saturating_add(crate::clock::millis(config.ttl)),
                )
                .await;
            let record = match claim {
                Err(e) => return refused(name, started, Some(pipeline.breaker.state()), e.into()),
                Ok(Claim::Claimed) => break,
                Ok(Claim::Existing(record)) => record,
            };
            if record.fingerprint != fingerprint {
                return refused(
                    name,
                    started,
                    Some(pipeline.breaker.state()),
                    InvokeError::IdempotencyConflict,
                );
            }
            let answer = match record.state {
                IdempotencyState::Completed(response) => replay_answer(response),
                IdempotencyState::Queued { dlq_id } => Answer::Queued {
                    dlq_id,
                    cause: None,
                },
                IdempotencyState::InFlight { lease_until } => {
                    // Another process runs this key.
                    if config.on_concurrent == OnConcurrent::Reject {
                        return refused(
                            name,
                            started,
                            Some(pipeline.breaker.state()),
                            InvokeError::InFlight,
                        );
                    }
                    let wait = Duration::from_millis(
                        u64::try_from(lease_until.saturating_sub(now)).unwrap_or(0),
                    );
                    tokio::time::sleep(wait.clamp(Duration::from_millis(1), FOREIGN_POLL)).await;
                    continue;
                }
            };
            return replayed(pipeline, key, answer, started);
        }
        let invoked = self.protected(pipeline, request, Some(key)).await;
        let expires = self.clock.after(config.ttl);
        let kept = match &invoked.answer {
            Answer::Ok(response) => {
                self.store
                    .idempotency_complete(name, key, response, expires)
                    .await
            }
            Answer::Queued { dlq_id, .. } => {
                self.store
                    .idempotency_queue(name, key, *dlq_id, expires)
                    .await
            }
            // A non-retryable upstream answer (a 4xx) is the call's result:
            // replay it rather than send the same bad request again.
            Answer::Failed(InvokeError::Failure(Failure::Status(reply)))
                if !is_dead_letterable(&Failure::Status(reply.clone()), &pipeline.retry.on) =>
            {
                self.store
                    .idempotency_complete(name, key, &stored(reply), expires)
                    .await
            }
            // Fallbacks and failures that a later try may get past are not kept.
            _ => self.store.idempotency_release(name, key).await,
        };
        if let Err(e) = kept {
            // The answer stands; only the dedupe record is off. Said loudly:
            // until the lease ends a duplicate waits, then it may run again.
            tracing::error!(operation = name, error = %e, "cannot record the idempotency outcome");
        }
        invoked
    }

    /// The pipeline, then the DLQ or the fallback when it fails.
    async fn protected(
        &self,
        pipeline: &Pipeline,
        request: &InvokeRequest,
        key: Option<&str>,
    ) -> Invoked {
        let first_attempt_at = self.clock.now();
        let invocation = Invocation {
            params: request.params.clone(),
            priority: request.priority,
            idempotency_key: key.map(str::to_owned),
        };
        let mut interrupt = self.interrupt.subscribe();
        let outcome = tokio::select! {
            outcome = pipeline.call(&invocation) => outcome,
            _ = interrupt.wait_for(|stop| *stop) => Outcome {
                result: Err(Failure::Interrupted),
                attempts: 0,
                latency: Duration::ZERO,
                breaker: pipeline.breaker.state(),
            },
        };
        let Outcome {
            result,
            attempts,
            latency,
            breaker,
        } = outcome;
        let answer = match result {
            Ok(reply) => {
                let response = Arc::new(stored(&reply));
                self.remember(pipeline, &request.params, &response).await;
                Answer::Ok(response)
            }
            Err(failure) => {
                self.after_failure(pipeline, request, key, failure, attempts, first_attempt_at)
                    .await
            }
        };
        Invoked {
            operation: pipeline.name.clone(),
            answer,
            attempts,
            latency,
            breaker: Some(breaker),
            idempotency: key.map(|k| IdempotencyMeta {
                key: k.to_owned(),
                derived: false,
                replayed: false,
            }),
        }
    }

    /// Keeps a success for the fallback cache.
    async fn remember(&self, pipeline: &Pipeline, params: &Value, response: &Arc<StoredResponse>) {
        let Some((config, memory)) = pipeline
            .fallback
            .as_ref()
            .and_then(|f| f.cache.as_ref().map(|c| (c, &f.memory)))
        else {
            return;
        };
        let Ok(key) = config.key_of(params) else {
            return;
        };
        let fetched_at = self.clock.now();
        memory.put(
            &key,
            Cached {
                response: Arc::clone(response),
                fetched_at,
            },
        );
        let entry = CacheEntry {
            operation: pipeline.name.clone(),
            key,
            response: StoredResponse::clone(response),
            fetched_at,
        };
        if let Err(e) = self.store.cache_put(entry).await {
            tracing::debug!(operation = %pipeline.name, error = %e, "fallback cache entry not persisted");
        }
    }

    /// A failed call: dead-lettered when the operation has a DLQ and the
    /// failure is transient, else served from fallback, else failed.
    async fn after_failure(
        &self,
        pipeline: &Pipeline,
        request: &InvokeRequest,
        key: Option<&str>,
        failure: Failure,
        attempts: u32,
        first_attempt_at: UnixMillis,
    ) -> Answer {
        let transient = is_dead_letterable(&failure, &pipeline.retry.on);
        if pipeline.dlq.is_some() && transient {
            let now = self.clock.now();
            let entry = NewDeadLetter {
                operation: pipeline.name.clone(),
                params: request.params.clone(),
                idempotency_key: key.map(str::to_owned),
                priority: Some(pipeline.priority_for(request.priority).as_str().to_owned()),
                error_code: failure.code().to_owned(),
                error_message: failure.to_string(),
                call_attempts: attempts,
                first_attempt_at,
                last_attempt_at: now,
                next_attempt_at: now.saturating_add(first_redrive_delay(pipeline)),
            };
            return match self.store.dlq_insert(entry).await {
                Ok(id) => {
                    tracing::warn!(operation = %pipeline.name, id, error = failure.code(), "call dead-lettered");
                    self.redrive.wake();
                    self.metrics
                        .dead_lettered
                        .get_or_create(&crate::metrics::op(&pipeline.name))
                        .inc();
                    self.events.emit(Event::DeadLettered {
                        id,
                        operation: pipeline.name.clone(),
                        error_code: failure.code().to_owned(),
                        at: now,
                    });
                    Answer::Queued {
                        dlq_id: id,
                        cause: Some(failure),
                    }
                }
                // Not accepted: the caller hears so and keeps the work.
                Err(e) => {
                    tracing::error!(operation = %pipeline.name, error = %e, "cannot dead-letter a failed call");
                    Answer::Failed(InvokeError::Store(e))
                }
            };
        }
        if transient && let Some(answer) = self.fallback(pipeline, &request.params, &failure).await
        {
            return answer;
        }
        Answer::Failed(InvokeError::Failure(failure))
    }

    /// The cached (memory, then store) or static answer for a failed call.
    async fn fallback(
        &self,
        pipeline: &Pipeline,
        params: &Value,
        cause: &Failure,
    ) -> Option<Answer> {
        let fallback = pipeline.fallback.as_ref()?;
        if let Some(config) = &fallback.cache
            && let Ok(key) = config.key_of(params)
        {
            let cached = match fallback.memory.get(&key) {
                Some(c) => Some(c),
                None => match self.store.cache_get(&pipeline.name, &key).await {
                    Ok(Some(entry)) => {
                        let c = Cached {
                            response: Arc::new(entry.response),
                            fetched_at: entry.fetched_at,
                        };
                        fallback.memory.put(&key, c.clone());
                        Some(c)
                    }
                    Ok(None) => None,
                    Err(e) => {
                        tracing::warn!(operation = %pipeline.name, error = %e, "fallback cache unreadable");
                        None
                    }
                },
            };
            if let Some(c) = cached {
                let age = self.clock.now().saturating_sub(c.fetched_at);
                if let Some(staleness) = config.staleness(age) {
                    return Some(Answer::Fallback {
                        response: c.response,
                        staleness,
                        age: Some(Duration::from_millis(u64::try_from(age).unwrap_or(0))),
                        cause: cause.clone(),
                    });
                }
            }
        }
        let value = fallback.static_value.as_ref()?;
        Some(Answer::Fallback {
            response: Arc::new(StoredResponse {
                status: 200,
                content_type: Some("application/json".into()),
                body: serde_json::to_vec(value).ok()?.into(),
            }),
            staleness: Staleness::Static,
            age: None,
            cause: cause.clone(),
        })
    }
}

/// First redrive delay of a dead letter: the back-off's first step with its
/// jitter, so calls dead-lettered together in an outage do not all come due
/// at the same instant.
fn first_redrive_delay(pipeline: &Pipeline) -> i64 {
    use rand::RngExt;
    pipeline.dlq.as_ref().map_or(0, |d| {
        crate::clock::millis(d.backoff.delay(1, rand::rng().random::<f64>()))
    })
}

fn check_params(pipeline: &Pipeline, params: &Value) -> Result<(), InvokeError> {
    let Some(validator) = &pipeline.params_schema else {
        return Ok(());
    };
    match validator.iter_errors(params).next() {
        None => Ok(()),
        Some(e) => Err(InvokeError::InvalidParams {
            path: e.instance_path().to_string(),
            message: e.to_string(),
        }),
    }
}

/// A reply as stored for replay or the fallback cache.
pub(crate) fn stored(reply: &Reply) -> StoredResponse {
    StoredResponse {
        status: reply.status.as_u16(),
        content_type: reply
            .headers
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned),
        body: reply.body.clone(),
    }
}

/// A stored answer replayed: a success, or the upstream error it was.
fn replay_answer(response: StoredResponse) -> Answer {
    if (200..300).contains(&response.status) {
        return Answer::Ok(Arc::new(response));
    }
    let mut headers = http::HeaderMap::new();
    if let Some(ct) = response
        .content_type
        .as_deref()
        .and_then(|c| http::HeaderValue::from_str(c).ok())
    {
        headers.insert(http::header::CONTENT_TYPE, ct);
    }
    let status =
        http::StatusCode::from_u16(response.status).unwrap_or(http::StatusCode::BAD_GATEWAY);
    Answer::Failed(InvokeError::Failure(Failure::Status(Box::new(Reply {
        status,
        headers,
        body: response.body,
    }))))
}

fn refused(
    operation: &str,
    started: tokio::time::Instant,
    breaker: Option<BreakerState>,
    error: InvokeError,
) -> Invoked {
    Invoked {
        operation: operation.to_owned(),
        answer: Answer::Failed(error),
        attempts: 0,
        latency: started.elapsed(),
        breaker,
        idempotency: None,
    }
}

/// A stored answer of `key`, replayed: nothing was sent.
fn replayed(
    pipeline: &Pipeline,
    key: &str,
    answer: Answer,
    started: tokio::time::Instant,
) -> Invoked {
    Invoked {
        operation: pipeline.name.clone(),
        answer,
        attempts: 0,
        latency: started.elapsed(),
        breaker: Some(pipeline.breaker.state()),
        idempotency: Some(IdempotencyMeta {
            key: key.to_owned(),
            derived: false,
            replayed: true,
        }),
    }
}

fn with_meta(mut invoked: Invoked, meta: IdempotencyMeta) -> Invoked {
    invoked.idempotency = Some(meta);
    invoked
}

fn invoked_replayed(invoked: &Invoked) -> bool {
    invoked.idempotency.as_ref().is_some_and(|m| m.replayed)
}
