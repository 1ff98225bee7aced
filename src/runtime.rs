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
//!
//! The runtime owns admission: a call is counted before it checks whether
//! the runtime is closing (both sequentially consistent), and
//! [`Runtime::drain`] sets `closing` before it counts. So a call either is
//! refused (`draining`) or is seen by the drain, which waits for it and then
//! interrupts it (dead-lettering it when its operation has a DLQ): no call
//! slips in between a shutdown's count and its exit.
//!
//! Upstream error bodies and transport messages are scrubbed of the values
//! the environment put into the upstream's `base_url` and headers and the
//! operation's headers (where `${env:…}` secrets live; see
//! [`crate::scrub`]) before anything answers, stores or dead-letters them.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
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
    CacheEntry, Claim, ClaimToken, IdempotencyRecord, IdempotencyState, NewDeadLetter, Store,
    StoreError, StoredResponse,
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
    /// The runtime is draining for shutdown and takes no new calls; also
    /// the answer of a call the drain ended while it waited, with nothing
    /// sent, on another process's claim of its key.
    #[error("claygate is shutting down and takes no new calls")]
    Draining,
    /// The earlier call with this idempotency key was dead-lettered and its
    /// entry parked: it will not run again unless someone replays it.
    #[error(
        "the call with this idempotency key was dead-lettered and parked as entry {dlq_id}; replay or delete that entry"
    )]
    DeadLetterParked {
        /// The parked entry.
        dlq_id: i64,
    },
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
            InvokeError::Draining => "draining",
            InvokeError::DeadLetterParked { .. } => "dead_lettered_parked",
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
    // Calls running now, the closing flag, and a wake-up at zero.
    admission: Arc<Admission>,
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

/// Who is running: the count of admitted calls, and whether new ones are
/// still admitted.
#[derive(Debug, Default)]
struct Admission {
    active: AtomicUsize,
    closing: AtomicBool,
    idle: tokio::sync::Notify,
}

/// Counts a running call; the count drops (and drain wakes) when it ends,
/// however it ends.
struct ActiveCall(Arc<Admission>);

impl Drop for ActiveCall {
    fn drop(&mut self) {
        if self.0.active.fetch_sub(1, Ordering::SeqCst) == 1 {
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
            admission: Arc::default(),
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
        self.admission.active.load(Ordering::SeqCst)
    }

    /// Whether [`drain`](Self::drain) has begun: new calls are refused.
    pub fn is_closing(&self) -> bool {
        self.admission.closing.load(Ordering::SeqCst)
    }

    /// Admits a call: counts it first, then checks `closing`, so a drain
    /// that set `closing` before counting either sees this call or it is
    /// refused (`None`).
    fn admit(&self) -> Option<ActiveCall> {
        self.admission.active.fetch_add(1, Ordering::SeqCst);
        let call = ActiveCall(Arc::clone(&self.admission));
        if self.admission.closing.load(Ordering::SeqCst) {
            // Dropping `call` uncounts it (and wakes a drain at zero).
            return None;
        }
        Some(call)
    }

    async fn until_idle(&self) {
        loop {
            let notified = self.admission.idle.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.active_calls() == 0 {
                break;
            }
            notified.await;
        }
    }

    /// Stops admitting calls (later invokes answer `draining`), lets running
    /// calls finish for up to `timeout`, then interrupts the rest: an
    /// interrupted call of an operation with a DLQ is dead-lettered (never
    /// dropped), any other answers `interrupted`. Whatever happened, it ends
    /// by interrupting, so no call can outlive it; answers once every call
    /// has ended.
    pub async fn drain(&self, timeout: Duration) -> Drained {
        self.admission.closing.store(true, Ordering::SeqCst);
        let before = self.active_calls();
        let interrupted = if tokio::time::timeout(timeout, self.until_idle())
            .await
            .is_ok()
        {
            0
        } else {
            self.active_calls()
        };
        self.interrupt.send_replace(true);
        self.until_idle().await;
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
    /// this future does not cancel it. The call is admitted (counted for a
    /// drain) on the first poll, before the task starts; once a drain has
    /// begun it answers `draining` without running.
    pub async fn invoke(self: &Arc<Self>, operation: &str, request: InvokeRequest) -> Invoked {
        let started = tokio::time::Instant::now();
        let Some(active) = self.admit() else {
            return refused(operation, started, None, InvokeError::Draining);
        };
        let runtime = Arc::clone(self);
        let name = operation.to_owned();
        let task = tokio::spawn(async move {
            let _active = active;
            runtime.run(&name, request).await
        });
        match task.await {
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
        let Some(_active) = self.admit() else {
            return refused(
                operation,
                tokio::time::Instant::now(),
                None,
                InvokeError::Draining,
            );
        };
        self.run(operation, request).await
    }

    /// One admitted call: params, key, then the idempotency layer or not.
    async fn run(&self, operation: &str, request: InvokeRequest) -> Invoked {
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
            Ok(None) => self.protected(pipeline, &request, None, None).await,
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
        let fingerprint = idempotency::fingerprint(&request.params);
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

    /// Replays, refuses or waits on `key`'s stored record; claims the key
    /// when there is none alive, then runs the call.
    ///
    /// The record is read first (a read connection, not the writer): a
    /// completed, queued or parked key replays without waiting behind the
    /// writer's batches of synced DLQ writes. Only an absent or expired key,
    /// or one whose lease lapsed, is claimed.
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
        loop {
            // Nothing will be sent while the breaker refuses: no claim (two
            // synced writes) only to be released, so failing fast stays
            // fast. The breaker may yet turn half-open before the call; see
            // `unclaimed`.
            let fail_fast =
                pipeline.dlq.is_none() && crate::dlq::waiting_on_breaker(&pipeline.breaker);
            let found = match self.store.idempotency_get(name, key).await {
                Ok(found) => found,
                Err(e) => return refused(name, started, Some(pipeline.breaker.state()), e.into()),
            };
            let now = self.clock.now();
            if let Some(record) = found.filter(|r| holds(r, now)) {
                match self.on_record(pipeline, key, fingerprint, record, started, now) {
                    Found::Answer(invoked) => return invoked,
                    Found::Wait(wait) => {
                        if !self.pause(wait).await {
                            return interrupted_waiting(pipeline, started);
                        }
                        continue;
                    }
                }
            }
            if fail_fast {
                return self.unclaimed(pipeline, request, key, fingerprint).await;
            }
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
            match claim {
                Err(e) => return refused(name, started, Some(pipeline.breaker.state()), e.into()),
                Ok(Claim::Claimed(token)) => {
                    let invoked = self
                        .protected(pipeline, request, Some(key), Some(&token))
                        .await;
                    self.keep(pipeline, key, &token, &invoked).await;
                    return invoked;
                }
                Ok(Claim::Existing(record)) => {
                    match self.on_record(pipeline, key, fingerprint, record, started, now) {
                        Found::Answer(invoked) => return invoked,
                        Found::Wait(wait) => {
                            if !self.pause(wait).await {
                                return interrupted_waiting(pipeline, started);
                            }
                        }
                    }
                }
            }
        }
    }

    /// Sleeps `wait`, unless the drain's interrupt comes first (false): a
    /// call waiting on another process's claim (whose lease may run 60 s or
    /// more) must not hold a shutdown past its drain timeout.
    async fn pause(&self, wait: Duration) -> bool {
        let mut interrupt = self.interrupt.subscribe();
        tokio::select! {
            () = tokio::time::sleep(wait) => true,
            _ = interrupt.wait_for(|stop| *stop) => false,
        }
    }

    /// What a live record of `key` means for a new call with `fingerprint`.
    fn on_record(
        &self,
        pipeline: &Pipeline,
        key: &str,
        fingerprint: &str,
        record: IdempotencyRecord,
        started: tokio::time::Instant,
        now: crate::clock::UnixMillis,
    ) -> Found {
        let name = pipeline.name.as_str();
        if record.fingerprint != fingerprint {
            return Found::Answer(refused(
                name,
                started,
                Some(pipeline.breaker.state()),
                InvokeError::IdempotencyConflict,
            ));
        }
        let answer = match record.state {
            IdempotencyState::Completed(response) => replay_answer(response),
            IdempotencyState::Queued { dlq_id } => Answer::Queued {
                dlq_id,
                cause: None,
            },
            IdempotencyState::Parked { dlq_id } => {
                Answer::Failed(InvokeError::DeadLetterParked { dlq_id })
            }
            IdempotencyState::InFlight { lease_until } => {
                // A claim this process does not run: one left by a process
                // that crashed mid-call, until its lease lapses.
                if pipeline.idempotency.on_concurrent == OnConcurrent::Reject {
                    return Found::Answer(refused(
                        name,
                        started,
                        Some(pipeline.breaker.state()),
                        InvokeError::InFlight,
                    ));
                }
                let wait = Duration::from_millis(
                    u64::try_from(lease_until.saturating_sub(now)).unwrap_or(0),
                );
                return Found::Wait(wait.clamp(Duration::from_millis(1), FOREIGN_POLL));
            }
        };
        Found::Answer(replayed(pipeline, key, answer, started))
    }

    /// A call of a key with no record while the breaker refuses everything:
    /// run without a claim. Should the breaker turn half-open meanwhile and
    /// let the call through (`attempts > 0`), its outcome is recorded after
    /// all, as a claimed call's would be.
    async fn unclaimed(
        &self,
        pipeline: &Pipeline,
        request: &InvokeRequest,
        key: &str,
        fingerprint: &str,
    ) -> Invoked {
        let invoked = self.protected(pipeline, request, Some(key), None).await;
        if invoked.attempts == 0 {
            return invoked;
        }
        let name = pipeline.name.as_str();
        let config = &pipeline.idempotency;
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
        match claim {
            Ok(Claim::Claimed(token)) => self.keep(pipeline, key, &token, &invoked).await,
            Ok(Claim::Existing(_)) => {
                tracing::warn!(
                    operation = name,
                    "a record of the key appeared while its call ran unclaimed; the call's outcome is not recorded"
                );
            }
            Err(e) => {
                tracing::error!(operation = name, error = %e, "cannot record the idempotency outcome");
            }
        }
        invoked
    }

    /// Records the outcome of a call that held `key` with `token`: a
    /// success or a permanent upstream answer is completed (replayed to
    /// duplicates), a dead-lettered call was marked queued with its entry,
    /// anything else releases the key so a later try may run.
    async fn keep(&self, pipeline: &Pipeline, key: &str, token: &ClaimToken, invoked: &Invoked) {
        let name = pipeline.name.as_str();
        let expires = self.clock.after(pipeline.idempotency.ttl);
        let kept = match &invoked.answer {
            Answer::Ok(response) => {
                self.store
                    .idempotency_complete(name, key, token, response, expires)
                    .await
            }
            // Marked in the dead letter's own transaction.
            Answer::Queued { .. } => Ok(true),
            // A non-retryable upstream answer (a 4xx) is the call's result:
            // replay it rather than send the same bad request again.
            Answer::Failed(InvokeError::Failure(Failure::Status(reply)))
                if !is_dead_letterable(&Failure::Status(reply.clone()), &pipeline.retry.on) =>
            {
                self.store
                    .idempotency_complete(name, key, token, &stored(reply), expires)
                    .await
            }
            // Fallbacks and failures that a later try may get past are not kept.
            _ => self.store.idempotency_release(name, key, token).await,
        };
        match kept {
            Ok(true) => {}
            Ok(false) => tracing::warn!(
                operation = name,
                "the idempotency claim was taken over before the call ended; its outcome is not recorded"
            ),
            // The answer stands; only the dedupe record is off. Said loudly:
            // until the lease ends a duplicate waits, then it may run again.
            Err(e) => {
                tracing::error!(operation = name, error = %e, "cannot record the idempotency outcome");
            }
        }
    }

    /// The pipeline, then the DLQ or the fallback when it fails. `claim` is
    /// the idempotency claim the call holds, marked queued in the dead
    /// letter's transaction when the call is dead-lettered.
    async fn protected(
        &self,
        pipeline: &Pipeline,
        request: &InvokeRequest,
        key: Option<&str>,
        claim: Option<&ClaimToken>,
    ) -> Invoked {
        let first_attempt_at = self.clock.now();
        let started = tokio::time::Instant::now();
        let invocation = Invocation {
            params: request.params.clone(),
            priority: request.priority,
            idempotency_key: key.map(str::to_owned),
        };
        let sent = AtomicU32::new(0);
        let mut interrupt = self.interrupt.subscribe();
        let outcome = tokio::select! {
            outcome = pipeline.call_counting(&invocation, &sent) => outcome,
            _ = interrupt.wait_for(|stop| *stop) => Outcome {
                result: Err(Failure::Interrupted),
                // Every request counted here reached the upstream.
                attempts: sent.load(Ordering::Relaxed),
                latency: started.elapsed(),
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
                let failure = scrub_failure(pipeline, failure);
                self.after_failure(
                    pipeline,
                    request,
                    key,
                    claim,
                    failure,
                    attempts,
                    first_attempt_at,
                )
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
        let key = config.key_of(params);
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
    #[allow(clippy::too_many_arguments)]
    async fn after_failure(
        &self,
        pipeline: &Pipeline,
        request: &InvokeRequest,
        key: Option<&str>,
        claim: Option<&ClaimToken>,
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
            return match self.store.dlq_insert_holding(entry, claim).await {
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
                // Another caller took the key over (its lease had lapsed):
                // that call does this work; dead-lettering it too could
                // deliver it twice. The caller hears the key is busy.
                Err(StoreError::ClaimLost { .. }) => {
                    tracing::warn!(operation = %pipeline.name, "the idempotency claim was taken over before the call was dead-lettered");
                    Answer::Failed(InvokeError::InFlight)
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
        if let Some(config) = &fallback.cache {
            let key = config.key_of(params);
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

/// The answer of a call the drain ended while it waited on another
/// process's claim of its key: nothing was sent and nothing is kept (the
/// key is that claim's), so the caller hears `draining` and may retry.
fn interrupted_waiting(pipeline: &Pipeline, started: tokio::time::Instant) -> Invoked {
    refused(
        &pipeline.name,
        started,
        Some(pipeline.breaker.state()),
        InvokeError::Draining,
    )
}

fn with_meta(mut invoked: Invoked, meta: IdempotencyMeta) -> Invoked {
    invoked.idempotency = Some(meta);
    invoked
}

fn invoked_replayed(invoked: &Invoked) -> bool {
    invoked.idempotency.as_ref().is_some_and(|m| m.replayed)
}

/// What a stored record of a key means for a new call.
enum Found {
    /// Answer this (a replay, a conflict, a refusal).
    Answer(Invoked),
    /// Another process's claim holds the key: look again after this.
    Wait(Duration),
}

/// Whether `record` still holds its key at `now`: not expired, and not an
/// in-flight claim whose lease has lapsed (those are taken over).
fn holds(record: &IdempotencyRecord, now: UnixMillis) -> bool {
    record.expires_at > now
        && !matches!(record.state, IdempotencyState::InFlight { lease_until } if lease_until <= now)
}

/// `failure` with every secret of `pipeline` (what the environment put
/// into its upstream's `base_url` and headers and its own headers; see
/// [`crate::scrub`]) replaced by `[redacted]` in an upstream error body
/// and in transport messages: an upstream that echoes its `Authorization`
/// header or its URL in an error must not leak the key into an answer, a
/// stored replay or a dead letter.
pub(crate) fn scrub_failure(pipeline: &Pipeline, failure: Failure) -> Failure {
    let secrets = &pipeline.secrets;
    if secrets.is_empty() {
        return failure;
    }
    match failure {
        Failure::Status(mut reply) => {
            if let Some(body) = secrets.scrub_bytes(&reply.body) {
                reply.body = body.into();
            }
            Failure::Status(reply)
        }
        Failure::Connect(m) => Failure::Connect(secrets.scrub_str(&m)),
        Failure::Transport(m) => Failure::Transport(secrets.scrub_str(&m)),
        Failure::BadParams(m) => Failure::BadParams(secrets.scrub_str(&m)),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_holds_its_key_until_expiry_or_lease_end() {
        let record = |state| IdempotencyRecord {
            operation: "op".into(),
            key: "k".into(),
            fingerprint: "f".into(),
            state,
            created_at: 0,
            expires_at: 100,
        };
        let flight = record(IdempotencyState::InFlight { lease_until: 50 });
        assert!(holds(&flight, 49));
        assert!(!holds(&flight, 50), "a lapsed lease is taken over");
        let queued = record(IdempotencyState::Queued { dlq_id: 1 });
        assert!(holds(&queued, 99));
        assert!(!holds(&queued, 100), "expired");
    }
}
