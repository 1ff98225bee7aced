//! The dead-letter queue: which failures are dead-lettered, and the redrive
//! that delivers them later.
//!
//! # Life cycle of a dead letter
//!
//! ```text
//!             redrive fails, attempts left (Retry, back-off)
//!               +-----+
//!               v     |
//! invoke --> pending --+--> delivered   (kept for `retention`, then swept)
//!   fails      |  ^    |
//!   for good   |  |    +--> parked      (kept for `retention`, then swept)
//!              |  |           |  alert: error log, `Event::Parked`, counter,
//!              |  |           |  optional webhook POST
//!              |  +-----------+
//!              |   admin replay by filter (requeue: a fresh count of attempts)
//! ```
//!
//! * **Pending.** [`Runtime::invoke`](crate::runtime::Runtime::invoke) writes
//!   a call of an operation with `dlq` that failed transiently (see
//!   [`is_dead_letterable`]) with its params, priority, idempotency key and
//!   error, due after the back-off's first step.
//! * **Redrive.** [`redrive_due`] (one pass; [`spawn_worker`] runs it in a
//!   loop) sends every due entry through the *same* pipeline as a live call:
//!   breaker, bulkhead at the entry's priority, rate limit, timeouts, and the
//!   entry's idempotency key forwarded upstream, so Clay can deduplicate a
//!   redrive whose earlier answer was lost. Redrive `n` (1 is the first) is
//!   due `backoff.delay(n)` after the previous attempt ended, at least as
//!   long as a `Retry-After` the upstream sent.
//! * **Delivered.** A 2xx answer. When the entry has an idempotency key, the
//!   answer is also stored as the key's completed record (in the same
//!   transaction, and only while the record is still the entry's), so a
//!   duplicate of the original call now replays the delivered answer
//!   instead of "queued".
//! * **Parked.** Out of attempts (`max_attempts` redrives), or a permanent
//!   failure (a 4xx other than 408/429, params the template or the schema
//!   now refuse). Nothing retries a parked entry by itself: it needs a human
//!   ([`replay_one`], [`replay_matching`], or a delete). Parking raises an
//!   alert (see [`RedriveState`] for the counters). The entry's idempotency
//!   record becomes `parked`, so a duplicate of the original call hears
//!   `dead_lettered_parked` (naming the entry) instead of "queued", for as
//!   long as the entry is kept (not the key's `ttl`: a duplicate must not
//!   run the work beside a later replay); a permanent upstream answer is
//!   stored as the record's answer instead, replayed for the `ttl`. A
//!   due row that cannot be read back is parked too (`unreadable_record`,
//!   no expiry), so it cannot block the queue; listings show it as a stub.
//! * **Retention.** Delivered and parked entries are kept for `retention`
//!   (default 14 days), then removed by the worker's sweep. Pending entries
//!   are never swept. Deleting, purging or sweeping an entry drops its
//!   queued or parked idempotency record: the work is gone, and a retry may
//!   run it afresh.
//!
//! # Waiting on the breaker
//!
//! While an operation's breaker is open (and its reset timeout has not yet
//! run out) or forced open, the pass skips that operation altogether: a
//! redrive would be refused without reaching the upstream, and its entries
//! must not burn attempts on an outage. Such an operation is reported in
//! [`RedriveReport::waiting`]. Once the reset timeout has run out, the next
//! redrive is the half-open trial; redrives are sent one at a time, so they
//! never take more than one trial slot. A breaker that opens in the middle
//! of a pass stops that operation's pass at once.
//!
//! A redrive refused by our own layers before anything was sent (breaker,
//! bulkhead full or queue timeout, rate limit or quota gate) is *deferred*:
//! the entry is left as it was (still due, no attempt counted) and the
//! operation's pass stops, since the next entry would meet the same wall.
//!
//! # Pacing
//!
//! Each operation is redriven at most `redrive_rate` entries per second
//! (default 10): sends are spaced `1s / redrive_rate` apart, and the spacing
//! carries over from one pass to the next. Operations are redriven
//! concurrently, each at its own pace. A pass takes at most
//! `10 × redrive_rate` entries of an operation (about ten seconds of work);
//! the worker starts the next pass at once when more were due.
//!
//! # Orphaned entries
//!
//! A pending entry whose operation is not in the serving generation (removed
//! by a reload), or no longer has `dlq`, is *orphaned*: the worker leaves it
//! untouched and counts it in [`RedriveReport::orphaned`]. It is never
//! deleted for that reason: restoring the operation resumes its redrive, an
//! admin may delete it, and [`replay_one`] runs one whose operation still
//! exists (with the default DLQ settings when it lost its `dlq`).
//!
//! # One at a time
//!
//! An entry being redriven or replayed is marked as running in
//! [`RedriveState`]: the worker skips it and [`replay_one`] answers
//! [`ReplayError::Busy`]. The mark is process-local; the store's state is
//! re-read after the mark is taken, so an entry delivered or deleted in the
//! meantime is not sent again. Deleting and purging respect the mark too:
//! deleting an entry that is being sent would free its key while its
//! request is in flight, and a retry of the original call would then send
//! the work a second time. [`delete_one`] takes the mark itself (answering
//! [`DeleteError::Busy`] when it is taken); [`purge`] leaves marked entries
//! alone and says how many, and while it runs no new mark is given.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::{Duration, SystemTime};

use rand::RngExt;
use serde::Serialize;
use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use url::Url;

use crate::clock::{UnixMillis, millis};
use crate::compile::CompileError;
use crate::events::Event;
use crate::pipeline::breaker::{Breaker, BreakerState};
use crate::pipeline::compose::{Invocation, Pipeline};
use crate::pipeline::retry::{self, BackoffConfig};
use crate::pipeline::{Failure, Reply};
use crate::policy::effective::default_dlq_backoff;
use crate::policy::model::{BreakerMode, Condition, DlqPolicy, Priority};
use crate::runtime::Runtime;
use crate::store::{
    DeadLetter, DlqFilter, DlqState, DlqUpdate, StoreError, StoreResult, UnreadableDeadLetter,
};

/// Redrive attempts before an entry is parked, when the policy does not say.
pub const DEFAULT_MAX_ATTEMPTS: u32 = 5;
/// Redrives per second per operation, when the policy does not say.
pub const DEFAULT_REDRIVE_RATE: u32 = 10;
/// How long delivered and parked entries are kept, when the policy does not say.
pub const DEFAULT_RETENTION: Duration = Duration::from_secs(14 * 24 * 3600);

/// DLQ settings of one operation, every field decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DlqConfig {
    /// Redrive attempts before parking.
    pub max_attempts: u32,
    /// Back-off between redrives.
    pub backoff: BackoffConfig,
    /// Redrives per second at most.
    pub redrive_rate: u32,
    /// How long delivered and parked entries are kept.
    pub retention: Duration,
    /// Where parked entries are POSTed (may hold a secret: never printed).
    pub alert_webhook: Option<Url>,
}

impl DlqConfig {
    /// Decides every setting of `policy`; `expand` resolves `${env:…}` in the
    /// webhook (`(text, place) -> expanded`). An empty webhook disables it.
    pub fn from_policy(
        policy: &DlqPolicy,
        expand: &dyn Fn(&str, &str) -> Result<String, CompileError>,
    ) -> Result<DlqConfig, CompileError> {
        let alert_webhook = match policy.alert.as_ref().and_then(|a| a.webhook.as_deref()) {
            Some(text) => {
                let expanded = expand(text, "dlq.alert.webhook")?;
                if expanded.trim().is_empty() {
                    None
                } else {
                    let url = Url::parse(expanded.trim()).map_err(|e| CompileError::Invalid {
                        place: "dlq.alert.webhook".into(),
                        reason: format!("not a URL once expanded: {e}"),
                    })?;
                    if !matches!(url.scheme(), "http" | "https") {
                        return Err(CompileError::Invalid {
                            place: "dlq.alert.webhook".into(),
                            reason: "not an http or https URL once expanded".into(),
                        });
                    }
                    Some(url)
                }
            }
            None => None,
        };
        Ok(DlqConfig {
            max_attempts: policy.max_attempts.unwrap_or(DEFAULT_MAX_ATTEMPTS).max(1),
            backoff: BackoffConfig::from(
                &policy.backoff.clone().unwrap_or_else(default_dlq_backoff),
            ),
            redrive_rate: policy.redrive_rate.unwrap_or(DEFAULT_REDRIVE_RATE).max(1),
            retention: policy.retention.map_or(DEFAULT_RETENTION, |d| d.to_std()),
            alert_webhook,
        })
    }
}

/// Whether `failure` is worth dead-lettering: a transient failure that a
/// later try may get past (our own refusals, timeouts, connection trouble,
/// 5xx, 408, 429, or anything the operation retries on). Bad params, 4xx
/// answers and oversized bodies would fail the same way again: they are
/// answered to the caller instead.
pub fn is_dead_letterable(failure: &Failure, retry_on: &[Condition]) -> bool {
    match failure {
        Failure::BadParams(_) | Failure::BodyTooLarge { .. } => false,
        Failure::BreakerOpen { .. }
        | Failure::BulkheadFull { .. }
        | Failure::QueueTimeout { .. }
        | Failure::RateLimited { .. }
        | Failure::AttemptTimeout { .. }
        | Failure::DeadlineExceeded
        | Failure::Connect(_)
        | Failure::Transport(_)
        | Failure::Interrupted => true,
        Failure::Status(reply) => {
            let code = reply.status.as_u16();
            reply.status.is_server_error()
                || code == 408
                || code == 429
                || failure.matches_any(retry_on)
        }
    }
}

impl Default for DlqConfig {
    /// The settings of `dlq: {}`: 5 attempts, 30s back-off doubling to 30m
    /// with full jitter, 10 redrives per second, 14 days of retention, no
    /// webhook. Used by [`replay_one`] for an operation that lost its `dlq`.
    fn default() -> Self {
        DlqConfig {
            max_attempts: DEFAULT_MAX_ATTEMPTS,
            backoff: BackoffConfig::from(&default_dlq_backoff()),
            redrive_rate: DEFAULT_REDRIVE_RATE,
            retention: DEFAULT_RETENTION,
            alert_webhook: None,
        }
    }
}

/// How often the worker looks for due entries when nothing wakes it.
pub const POLL_INTERVAL: Duration = Duration::from_secs(1);
/// How often the worker sweeps expired dead letters, idempotency records and
/// cache entries.
pub const SWEEP_INTERVAL: Duration = Duration::from_secs(60);
/// Least time between the starts of two passes of the worker, so a storm of
/// wake-ups (every dead letter written wakes it) cannot spin it.
pub const MIN_PASS_GAP: Duration = Duration::from_millis(100);
/// Timeout of one alert webhook request.
pub const WEBHOOK_TIMEOUT: Duration = Duration::from_secs(10);
/// Requests sent for one alert before giving up.
pub const WEBHOOK_ATTEMPTS: u32 = 4;
/// Wait before the second webhook request; doubles after each.
pub const WEBHOOK_BACKOFF: Duration = Duration::from_secs(1);
/// How long fallback-cache rows of an operation no longer serving with a
/// cache (removed by a reload, or its cache dropped) are kept before the
/// sweep removes them: long enough for a reload to be undone.
pub const ORPHAN_CACHE_RETENTION: Duration = Duration::from_secs(14 * 24 * 3600);
/// A pass takes at most this many seconds' worth (at `redrive_rate`) of one
/// operation's due entries.
const BATCH_SECONDS: u32 = 10;
/// Most entries of one operation a pass takes.
const MAX_BATCH: u32 = 1000;

/// The redrive worker's shared state (one per [`Runtime`]): wakes the worker
/// when entries become due, keeps the worker and an admin replay from running
/// one entry twice at once, paces each operation across passes, and counts
/// outcomes and alerts for the metrics endpoint.
#[derive(Debug, Default)]
pub struct RedriveState {
    wake: Notify,
    running: Mutex<Marks>,
    /// Per operation: the earliest time the next redrive may be sent.
    pacers: Mutex<HashMap<String, Instant>>,
    delivered: AtomicU64,
    parked: AtomicU64,
    alerts: Arc<AlertStats>,
    client: OnceLock<Result<reqwest::Client, String>>,
}

/// Alert counters, shared with the tasks that POST webhooks.
#[derive(Debug, Default)]
struct AlertStats {
    sent: AtomicU64,
    failed: AtomicU64,
    in_flight: AtomicU64,
    settled: Notify,
}

impl RedriveState {
    /// Wakes the worker (a dead letter was written or requeued). A wake while
    /// the worker is busy is kept: it runs another pass right after.
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    /// Whether entry `id` is being redriven or replayed in this process now.
    pub fn is_running(&self, id: i64) -> bool {
        lock(&self.running).ids.contains(&id)
    }

    /// Entries delivered by redrive or replay since start.
    pub fn delivered_total(&self) -> u64 {
        self.delivered.load(Ordering::Relaxed)
    }

    /// Entries parked (out of attempts or failed for good) since start; each
    /// raised one alert.
    pub fn parked_total(&self) -> u64 {
        self.parked.load(Ordering::Relaxed)
    }

    /// Alert webhooks delivered (a 2xx answer) since start.
    pub fn alerts_sent(&self) -> u64 {
        self.alerts.sent.load(Ordering::Relaxed)
    }

    /// Alert webhooks given up on (every attempt failed, or the client could
    /// not be built) since start.
    pub fn alerts_failed(&self) -> u64 {
        self.alerts.failed.load(Ordering::Relaxed)
    }

    /// Alert webhooks still being delivered (retrying included).
    pub fn alerts_in_flight(&self) -> u64 {
        self.alerts.in_flight.load(Ordering::SeqCst)
    }

    /// Resolves once no alert webhook is being delivered (at once when none
    /// is). The counters are up to date by then. For graceful shutdown and
    /// tests; bound it with a timeout, as a webhook may retry for a while.
    pub async fn alerts_settled(&self) {
        loop {
            let notified = self.alerts.settled.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.alerts.in_flight.load(Ordering::SeqCst) == 0 {
                return;
            }
            notified.await;
        }
    }

    /// Marks `id` as running; `None` when it already is, or while a purge
    /// runs.
    fn claim(&self, id: i64) -> Option<Running<'_>> {
        // The guard must be gone before a `Running` exists: dropping one
        // takes the lock again.
        let inserted = {
            let mut marks = lock(&self.running);
            marks.fences == 0 && marks.ids.insert(id)
        };
        inserted.then(|| Running { state: self, id })
    }

    /// Stops new marks until the fence is dropped; answers it with the
    /// entries marked now (in one step, so no entry is sent unseen).
    fn fence(&self) -> (Fence<'_>, Vec<i64>) {
        let mut marks = lock(&self.running);
        marks.fences += 1;
        let running = marks.ids.iter().copied().collect();
        (Fence { state: self }, running)
    }

    /// Reserves the next send slot of `operation` at `rate` per second and
    /// answers when it is.
    fn pace_slot(&self, operation: &str, rate: u32) -> Instant {
        let interval = Duration::from_secs(1) / rate.max(1);
        let now = Instant::now();
        let mut pacers = lock(&self.pacers);
        let slot = pacers.get(operation).copied().unwrap_or(now).max(now);
        pacers.insert(operation.to_owned(), slot + interval);
        slot
    }

    /// The webhook client, built on first use.
    fn client(&self) -> Result<&reqwest::Client, &str> {
        self.client
            .get_or_init(|| {
                reqwest::Client::builder()
                    .timeout(WEBHOOK_TIMEOUT)
                    .connect_timeout(WEBHOOK_TIMEOUT)
                    .redirect(reqwest::redirect::Policy::none())
                    .no_proxy()
                    .build()
                    .map_err(|e| e.to_string())
            })
            .as_ref()
            .map_err(String::as_str)
    }

    /// POSTs the alert `body` about entry `id` to `url` in a task of its
    /// own, retrying with back-off; the outcome lands in the counters.
    fn post_alert(
        &self,
        url: &Url,
        id: i64,
        body: &serde_json::Value,
        metrics: Arc<crate::metrics::Metrics>,
    ) {
        let stats = Arc::clone(&self.alerts);
        let host = url.host_str().unwrap_or_default().to_owned();
        let body = match serde_json::to_vec(body) {
            Ok(b) => bytes::Bytes::from(b),
            Err(e) => {
                tracing::error!(id, host, error = %e, "cannot encode the alert webhook body");
                stats.failed.fetch_add(1, Ordering::Relaxed);
                metrics.alert_failures.inc();
                return;
            }
        };
        let client = match self.client() {
            Ok(c) => c.clone(),
            Err(reason) => {
                tracing::error!(id, host, reason, "cannot build the alert webhook client");
                stats.failed.fetch_add(1, Ordering::Relaxed);
                metrics.alert_failures.inc();
                return;
            }
        };
        let url = url.clone();
        stats.in_flight.fetch_add(1, Ordering::SeqCst);
        tokio::spawn(async move {
            let delivered = deliver_alert(&client, &url, &host, body, id).await;
            if delivered {
                stats.sent.fetch_add(1, Ordering::Relaxed);
            } else {
                stats.failed.fetch_add(1, Ordering::Relaxed);
                metrics.alert_failures.inc();
            }
            if stats.in_flight.fetch_sub(1, Ordering::SeqCst) == 1 {
                stats.settled.notify_waiters();
            }
        });
    }
}

/// Sends one alert, up to [`WEBHOOK_ATTEMPTS`] times; answers whether the
/// receiver took it. Logs name the URL's host only: the URL may carry a token.
async fn deliver_alert(
    client: &reqwest::Client,
    url: &Url,
    host: &str,
    body: bytes::Bytes,
    id: i64,
) -> bool {
    let mut wait = WEBHOOK_BACKOFF;
    for attempt in 1..=WEBHOOK_ATTEMPTS {
        let sent = client
            .post(url.clone())
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(body.clone())
            .send()
            .await;
        let worth_retrying = match sent {
            Ok(answer) if answer.status().is_success() => {
                tracing::info!(id, host, attempt, "alert webhook delivered");
                return true;
            }
            Ok(answer) => {
                let status = answer.status();
                tracing::warn!(
                    id,
                    host,
                    attempt,
                    status = status.as_u16(),
                    "alert webhook answered an error"
                );
                status.is_server_error()
                    || status == http::StatusCode::REQUEST_TIMEOUT
                    || status == http::StatusCode::TOO_MANY_REQUESTS
            }
            Err(e) => {
                tracing::warn!(id, host, attempt, error = %e.without_url(), "alert webhook failed");
                true
            }
        };
        if !worth_retrying || attempt == WEBHOOK_ATTEMPTS {
            break;
        }
        tokio::time::sleep(wait).await;
        wait = wait.saturating_mul(2);
    }
    tracing::error!(id, host, "alert webhook not delivered; giving up");
    false
}

/// An entry marked as running; unmarks it when dropped (also on panic or
/// cancellation).
struct Running<'a> {
    state: &'a RedriveState,
    id: i64,
}

impl Drop for Running<'_> {
    fn drop(&mut self) {
        lock(&self.state.running).ids.remove(&self.id);
    }
}

/// The entries marked as running, and the purges that hold new marks off.
#[derive(Debug, Default)]
struct Marks {
    ids: HashSet<i64>,
    fences: usize,
}

/// A purge in progress: no entry is marked as running until it is dropped.
struct Fence<'a> {
    state: &'a RedriveState,
}

impl Drop for Fence<'_> {
    fn drop(&mut self) {
        lock(&self.state.running).fences -= 1;
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// What one redrive pass did, summed over operations.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct RedriveReport {
    /// Entries delivered.
    pub delivered: u64,
    /// Entries that failed and were rescheduled.
    pub retried: u64,
    /// Entries parked (each raised an alert).
    pub parked: u64,
    /// Entries our own layers refused to send (breaker, bulkhead, rate
    /// limit): left untouched and still due.
    pub deferred: u64,
    /// Due entries skipped because an admin replay was running them.
    pub busy: u64,
    /// Operations skipped, or stopped mid-pass, because their breaker is
    /// open or forced open (sorted, each once).
    pub waiting: Vec<String>,
    /// Pending entries whose operation is not in the serving generation or
    /// has no `dlq`: left untouched.
    pub orphaned: u64,
    /// Store calls that failed (logged; the worker retries next loop).
    pub store_errors: u64,
    /// True when an operation had more due entries than one pass takes.
    pub more_due: bool,
}

impl RedriveReport {
    fn merge(&mut self, other: RedriveReport) {
        self.delivered += other.delivered;
        self.retried += other.retried;
        self.parked += other.parked;
        self.deferred += other.deferred;
        self.busy += other.busy;
        self.waiting.extend(other.waiting);
        self.orphaned += other.orphaned;
        self.store_errors += other.store_errors;
        self.more_due |= other.more_due;
    }

    /// Entries sent upstream by the pass (delivered, retried or parked).
    pub fn sent(&self) -> u64 {
        self.delivered + self.retried + self.parked
    }
}

/// What one sweep removed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct SweepReport {
    /// Delivered and parked dead letters past their retention.
    pub dead_letters: u64,
    /// Expired idempotency records.
    pub idempotency_records: u64,
    /// Cache entries older than `very_stale`, beyond `max_entries`, or of an
    /// operation that no longer has a cache (after [`ORPHAN_CACHE_RETENTION`]).
    pub cache_entries: u64,
    /// Store calls that failed (logged).
    pub store_errors: u64,
}

/// Why [`replay_one`] did not run an entry.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReplayError {
    /// No dead letter has this id (never, or deleted or swept).
    #[error("no dead letter with id {0}")]
    NotFound(i64),
    /// The entry was delivered already; replaying would send it twice.
    #[error("dead letter {0} was already delivered")]
    AlreadyDelivered(i64),
    /// The entry's operation is not in the serving generation.
    #[error("operation `{0}` of the dead letter is not in the serving policies")]
    UnknownOperation(String),
    /// The worker (or another replay) is running the entry now.
    #[error("dead letter {0} is being redriven right now; try again shortly")]
    Busy(i64),
    /// Our own layers refused to send it (breaker open, bulkhead full, rate
    /// limited); the entry is left as it was.
    #[error("dead letter {id} was not sent: {failure}")]
    Refused {
        /// The entry.
        id: i64,
        /// The refusal.
        failure: Failure,
    },
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl ReplayError {
    /// The stable code of this error.
    pub fn code(&self) -> &'static str {
        match self {
            ReplayError::NotFound(_) => "dead_letter_not_found",
            ReplayError::AlreadyDelivered(_) => "dlq_already_delivered",
            ReplayError::UnknownOperation(_) => "unknown_operation",
            ReplayError::Busy(_) => "dlq_busy",
            ReplayError::Refused { failure, .. } => failure.code(),
            ReplayError::Store(_) => "store_unavailable",
        }
    }
}

/// Runs one redrive pass: for every operation of the serving generation
/// with `dlq` (concurrently, each paced at its `redrive_rate`), sends the
/// due entries through the operation's pipeline and records each outcome
/// (delivered, retry later, or parked with an alert). Operations whose
/// breaker is open are skipped; entries of operations that are gone are
/// counted as orphaned and left alone. Store errors are logged and counted,
/// never fatal. See the [module docs](self) for the whole life cycle.
pub async fn redrive_due(runtime: &Runtime) -> RedriveReport {
    pass(runtime, None).await
}

async fn pass(runtime: &Runtime, stop: Option<&watch::Receiver<bool>>) -> RedriveReport {
    let compiled = runtime.compiled();
    let passes = compiled.operations.values().filter_map(|pipeline| {
        let config = pipeline.dlq.as_ref()?;
        Some(redrive_operation(runtime, pipeline, config, stop.cloned()))
    });
    let mut report = RedriveReport::default();
    for one in futures_util::future::join_all(passes).await {
        report.merge(one);
    }
    report.waiting.sort();
    report.waiting.dedup();
    match runtime.store.dlq_counts().await {
        Ok(counts) => {
            report.orphaned = counts
                .iter()
                .filter(|c| {
                    c.state == DlqState::Pending
                        && compiled
                            .operations
                            .get(&c.operation)
                            .is_none_or(|p| p.dlq.is_none())
                })
                .map(|c| c.count)
                .sum();
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot count dead letters");
            report.store_errors += 1;
        }
    }
    report
}

/// One operation's part of a pass.
async fn redrive_operation(
    runtime: &Runtime,
    pipeline: &Pipeline,
    config: &DlqConfig,
    mut stop: Option<watch::Receiver<bool>>,
) -> RedriveReport {
    let name = pipeline.name.as_str();
    let mut report = RedriveReport::default();
    if waiting_on_breaker(&pipeline.breaker) {
        report.waiting.push(name.to_owned());
        return report;
    }
    let batch = config
        .redrive_rate
        .saturating_mul(BATCH_SECONDS)
        .clamp(1, MAX_BATCH);
    let due = match runtime
        .store
        .dlq_due(name, runtime.clock.now(), batch)
        .await
    {
        Ok(due) => due,
        Err(e) => {
            tracing::warn!(operation = name, error = %e, "cannot list due dead letters");
            report.store_errors += 1;
            return report;
        }
    };
    let rows = due.entries.len() + due.unreadable.len();
    report.more_due = rows >= usize::try_from(batch).unwrap_or(usize::MAX);
    for stub in &due.unreadable {
        match park_unreadable(runtime, pipeline, config, stub).await {
            Ok(true) => report.parked += 1,
            Ok(false) => {}
            Err(e) => {
                tracing::warn!(operation = name, id = stub.id, error = %e, "cannot park an unreadable dead letter");
                report.store_errors += 1;
            }
        }
    }
    for listed in due.entries {
        if stop.as_ref().is_some_and(stopping) {
            break;
        }
        let Some(_running) = runtime.redrive.claim(listed.id) else {
            report.busy += 1;
            continue;
        };
        if !pace(&runtime.redrive, name, config.redrive_rate, stop.as_mut()).await {
            break;
        }
        if waiting_on_breaker(&pipeline.breaker) {
            report.waiting.push(name.to_owned());
            break;
        }
        // Re-read under the mark: a replay or a delete may have changed it
        // since it was listed, and a delivered entry must not be sent again.
        let entry = match runtime.store.dlq_get(listed.id).await {
            Ok(Some(e))
                if e.state == DlqState::Pending && e.next_attempt_at <= runtime.clock.now() =>
            {
                e
            }
            Ok(_) => continue,
            Err(e) => {
                tracing::warn!(operation = name, id = listed.id, error = %e, "cannot read a dead letter");
                report.store_errors += 1;
                break;
            }
        };
        match redrive_entry(runtime, pipeline, config, &entry).await {
            Ok(Done::Delivered(_)) => report.delivered += 1,
            Ok(Done::Retry(_)) => report.retried += 1,
            Ok(Done::Parked(_) | Done::StillParked(_)) => report.parked += 1,
            Ok(Done::Gone) => {}
            Ok(Done::Deferred(failure)) => {
                report.deferred += 1;
                if matches!(failure, Failure::BreakerOpen { .. }) {
                    report.waiting.push(name.to_owned());
                }
                tracing::debug!(
                    operation = name,
                    id = entry.id,
                    refusal = failure.code(),
                    "redrive deferred"
                );
                break;
            }
            Err(e) => {
                tracing::warn!(operation = name, id = entry.id, error = %e, "cannot record a redrive");
                report.store_errors += 1;
                break;
            }
        }
    }
    report
}

/// Waits for the operation's next send slot; `false` when `stop` fired.
async fn pace(
    state: &RedriveState,
    operation: &str,
    rate: u32,
    stop: Option<&mut watch::Receiver<bool>>,
) -> bool {
    let slot = state.pace_slot(operation, rate);
    match stop {
        None => {
            tokio::time::sleep_until(slot).await;
            true
        }
        Some(stop) => tokio::select! {
            () = tokio::time::sleep_until(slot) => true,
            _ = stop.wait_for(|s| *s) => false,
        },
    }
}

/// Whether the worker should leave `breaker`'s operation alone: forced
/// open, or open with time left before a trial may pass. A `metrics_only`
/// breaker never refuses, so it never makes the worker wait.
pub fn waiting_on_breaker(breaker: &Breaker) -> bool {
    if breaker.config().mode == BreakerMode::MetricsOnly {
        return false;
    }
    match breaker.state() {
        BreakerState::ForcedOpen => true,
        // `state()` notices the end of the reset timeout lazily; the
        // snapshot says whether a trial may pass now.
        BreakerState::Open => breaker.snapshot().retry_after_ms.is_none_or(|ms| ms > 0),
        _ => false,
    }
}

/// Whether the worker was told to stop (or its sender is gone).
fn stopping(stop: &watch::Receiver<bool>) -> bool {
    *stop.borrow() || stop.has_changed().is_err()
}

/// How one redrive ended, with the entry as recorded.
enum Done {
    Delivered(DeadLetter),
    Retry(DeadLetter),
    Parked(DeadLetter),
    /// A parked entry replayed by admin failed again: it stays parked.
    StillParked(DeadLetter),
    /// Refused by our own layers before anything was sent: left untouched.
    Deferred(Failure),
    /// The entry was deleted meanwhile.
    Gone,
}

/// Sends `entry` through `pipeline` and records the outcome.
async fn redrive_entry(
    runtime: &Runtime,
    pipeline: &Pipeline,
    config: &DlqConfig,
    entry: &DeadLetter,
) -> StoreResult<Done> {
    let name = pipeline.name.as_str();
    let (result, attempts) = send(pipeline, entry).await;
    let now = runtime.clock.now();
    let retention_end = now.saturating_add(millis(config.retention));
    // The key's record replays an answer for the key's ttl; a parked record
    // (no answer) lives exactly as long as its entry (see `DlqUpdate::Parked`).
    let key_end = now.saturating_add(millis(pipeline.idempotency.ttl));
    let failure = match result {
        Ok(reply) => {
            let response = crate::runtime::stored(&reply);
            let status = response.status;
            let update = DlqUpdate::Delivered {
                at: now,
                response,
                expires_at: retention_end,
                key_expires_at: key_end,
            };
            let Some(updated) = runtime.store.dlq_update(entry.id, update).await? else {
                tracing::info!(
                    operation = name,
                    id = entry.id,
                    "dead letter delivered, but it was deleted meanwhile"
                );
                return Ok(Done::Gone);
            };
            runtime.redrive.delivered.fetch_add(1, Ordering::Relaxed);
            runtime
                .metrics
                .redelivered
                .get_or_create(&crate::metrics::op(name))
                .inc();
            tracing::info!(
                operation = name,
                id = entry.id,
                redrive_attempts = updated.redrive_attempts,
                status,
                "dead letter delivered"
            );
            runtime.events.emit(Event::Delivered {
                id: entry.id,
                operation: name.to_owned(),
                redrive_attempts: updated.redrive_attempts,
                at: now,
            });
            return Ok(Done::Delivered(updated));
        }
        Err(failure) if attempts == 0 && is_local_refusal(&failure) => {
            return Ok(Done::Deferred(failure));
        }
        Err(failure) => failure,
    };
    let error_code = failure.code().to_owned();
    let error_message = failure.to_string();
    let permanent = !is_dead_letterable(&failure, &pipeline.retry.on);
    // A permanent upstream answer is the call's result: a duplicate of the
    // original call replays it (as a live call's 4xx is replayed) instead of
    // hearing "queued" or "parked".
    let answer = match (&failure, permanent) {
        (Failure::Status(reply), true) => Some(crate::runtime::stored(reply)),
        _ => None,
    };
    // This redrive's number (1 is the first); `max_attempts` redrives in all.
    let number = entry.redrive_attempts.saturating_add(1);
    if entry.state == DlqState::Parked {
        // An admin replay of a parked entry: it has no attempts to consume,
        // so it stays parked with the new error (and raises no new alert).
        let update = DlqUpdate::Parked {
            at: now,
            error_code,
            error_message,
            expires_at: retention_end,
            answer,
            key_expires_at: key_end,
        };
        let Some(updated) = runtime.store.dlq_update(entry.id, update).await? else {
            return Ok(Done::Gone);
        };
        tracing::warn!(
            operation = name,
            id = entry.id,
            error = failure.code(),
            "replay of a parked dead letter failed; it stays parked"
        );
        return Ok(Done::StillParked(updated));
    }
    if !permanent && number < config.max_attempts {
        let unit: f64 = rand::rng().random();
        let mut wait = config.backoff.delay(number.saturating_add(1), unit);
        if let Some(hint) = retry::hint(&failure, SystemTime::now()) {
            wait = wait.max(hint);
        }
        let update = DlqUpdate::Retry {
            at: now,
            error_code,
            error_message,
            next_attempt_at: now.saturating_add(millis(wait)),
        };
        let Some(updated) = runtime.store.dlq_update(entry.id, update).await? else {
            return Ok(Done::Gone);
        };
        tracing::info!(
            operation = name,
            id = entry.id,
            error = failure.code(),
            redrive_attempts = updated.redrive_attempts,
            next_in_ms = millis(wait),
            "dead letter redrive failed; will try again"
        );
        return Ok(Done::Retry(updated));
    }
    let update = DlqUpdate::Parked {
        at: now,
        error_code,
        error_message,
        expires_at: retention_end,
        answer,
        key_expires_at: key_end,
    };
    let Some(updated) = runtime.store.dlq_update(entry.id, update).await? else {
        return Ok(Done::Gone);
    };
    alert(
        runtime,
        config.alert_webhook.as_ref(),
        &updated,
        permanent,
        now,
    );
    Ok(Done::Parked(updated))
}

/// Parks due row `stub`, which cannot be read back, so it stops holding up
/// its operation's queue, and raises the alert (as for any parked entry).
/// Answers whether it was parked (`false`: no longer pending).
async fn park_unreadable(
    runtime: &Runtime,
    pipeline: &Pipeline,
    config: &DlqConfig,
    stub: &UnreadableDeadLetter,
) -> StoreResult<bool> {
    let now = runtime.clock.now();
    let reason = format!("the stored entry cannot be read back: {}", stub.reason);
    if !runtime
        .store
        .dlq_park_unreadable(stub.id, &reason, now)
        .await?
    {
        return Ok(false);
    }
    runtime.redrive.parked.fetch_add(1, Ordering::Relaxed);
    runtime
        .metrics
        .parked
        .get_or_create(&crate::metrics::op(&pipeline.name))
        .inc();
    tracing::error!(
        id = stub.id,
        operation = %pipeline.name,
        error = "unreadable_record",
        reason = %stub.reason,
        "dead letter parked: its stored row cannot be read back (inspect the listing's `unreadable`, then delete it)"
    );
    runtime.events.emit(Event::Parked {
        id: stub.id,
        operation: pipeline.name.clone(),
        error_code: "unreadable_record".into(),
        at: now,
    });
    if let Some(url) = &config.alert_webhook {
        let body = serde_json::json!({
            "event": "dead_letter_parked",
            "entry": {
                "id": stub.id,
                "operation": pipeline.name,
                "state": "parked",
                "error_code": "unreadable_record",
                "error_message": reason,
            }
        });
        runtime
            .redrive
            .post_alert(url, stub.id, &body, Arc::clone(&runtime.metrics));
    }
    Ok(true)
}

/// Raises the alert of a newly parked entry: error log (id, operation and
/// error code only: never params or the webhook URL), counter, event, and
/// the webhook when configured.
fn alert(
    runtime: &Runtime,
    webhook: Option<&Url>,
    entry: &DeadLetter,
    permanent: bool,
    now: UnixMillis,
) {
    runtime.redrive.parked.fetch_add(1, Ordering::Relaxed);
    runtime
        .metrics
        .parked
        .get_or_create(&crate::metrics::op(&entry.operation))
        .inc();
    tracing::error!(
        id = entry.id,
        operation = %entry.operation,
        error = %entry.error_code,
        redrive_attempts = entry.redrive_attempts,
        reason = if permanent { "permanent_failure" } else { "out_of_attempts" },
        webhook_host = webhook.and_then(Url::host_str),
        "dead letter parked: it needs a human (replay or delete it)"
    );
    runtime.events.emit(Event::Parked {
        id: entry.id,
        operation: entry.operation.clone(),
        error_code: entry.error_code.clone(),
        at: now,
    });
    if let Some(url) = webhook {
        let body = serde_json::json!({ "event": "dead_letter_parked", "entry": entry });
        runtime
            .redrive
            .post_alert(url, entry.id, &body, Arc::clone(&runtime.metrics));
    }
}

/// One call of `entry` through `pipeline`: its params (checked against the
/// current `params_schema`, which a reload may have changed), priority and
/// idempotency key. Answers the result and the requests sent.
async fn send(pipeline: &Pipeline, entry: &DeadLetter) -> (Result<Reply, Failure>, u32) {
    if let Some(validator) = &pipeline.params_schema
        && let Some(e) = validator.iter_errors(&entry.params).next()
    {
        let failure = Failure::BadParams(format!(
            "params{} no longer match the operation's params_schema: {e}",
            e.instance_path()
        ));
        return (Err(failure), 0);
    }
    let invocation = Invocation {
        params: entry.params.clone(),
        priority: entry.priority.as_deref().and_then(parse_priority),
        idempotency_key: entry.idempotency_key.clone(),
    };
    let outcome = pipeline.call(&invocation).await;
    let result = outcome
        .result
        .map_err(|f| crate::runtime::scrub_failure(pipeline, f));
    (result, outcome.attempts)
}

/// A refusal of our own layers that sent nothing and says nothing about the
/// entry: trying again later costs no attempt.
fn is_local_refusal(failure: &Failure) -> bool {
    matches!(
        failure,
        Failure::BreakerOpen { .. }
            | Failure::BulkheadFull { .. }
            | Failure::QueueTimeout { .. }
            | Failure::RateLimited { .. }
    )
}

fn parse_priority(name: &str) -> Option<Priority> {
    Priority::ALL.into_iter().find(|p| p.as_str() == name)
}

/// Runs dead letter `id` now, whatever its due time, through its operation's
/// pipeline (an admin action; not paced, not skipped for an open breaker:
/// the breaker itself refuses then, with [`ReplayError::Refused`]).
///
/// * Success: delivered, exactly as a redrive (the idempotency record then
///   replays the answer).
/// * Failure of a **pending** entry: recorded as a redrive (it consumes an
///   attempt: retried with back-off, or parked with an alert when out of
///   attempts or the failure is permanent).
/// * Failure of a **parked** entry: it stays parked with the new error and
///   no new alert; its attempt count grows (a record of tries, since a
///   parked entry has no attempts left to consume). Requeue it with
///   [`replay_matching`] to give it a fresh count of attempts instead.
///
/// Answers the entry as recorded. A delivered entry is never sent again
/// ([`ReplayError::AlreadyDelivered`]). An operation that lost its `dlq`
/// is replayed with the default DLQ settings.
pub async fn replay_one(runtime: &Runtime, id: i64) -> Result<DeadLetter, ReplayError> {
    let Some(_running) = runtime.redrive.claim(id) else {
        return Err(ReplayError::Busy(id));
    };
    let entry = runtime
        .store
        .dlq_get(id)
        .await?
        .ok_or(ReplayError::NotFound(id))?;
    if entry.state == DlqState::Delivered {
        return Err(ReplayError::AlreadyDelivered(id));
    }
    let compiled = runtime.compiled();
    let Some(pipeline) = compiled.operations.get(&entry.operation) else {
        return Err(ReplayError::UnknownOperation(entry.operation));
    };
    let config = pipeline.dlq.clone().unwrap_or_default();
    match redrive_entry(runtime, pipeline, &config, &entry).await? {
        Done::Delivered(e) | Done::Retry(e) | Done::Parked(e) | Done::StillParked(e) => Ok(e),
        Done::Deferred(failure) => Err(ReplayError::Refused { id, failure }),
        Done::Gone => Err(ReplayError::NotFound(id)),
    }
}

/// Requeues every pending or parked entry matching `filter` (due now; parked
/// ones get a fresh count of attempts) and wakes the worker, which then
/// redrives them paced as usual. Delivered entries are never requeued, even
/// when the filter asks for them (answers 0 then). Answers how many.
pub async fn replay_matching(runtime: &Runtime, filter: &DlqFilter) -> StoreResult<u64> {
    let now = runtime.clock.now();
    let count = match filter.state {
        Some(DlqState::Delivered) => 0,
        Some(_) => runtime.store.dlq_requeue(filter, now).await?,
        None => {
            // Pending first: requeued parked entries are pending too, and
            // must not be counted twice.
            let mut total = 0;
            for state in [DlqState::Pending, DlqState::Parked] {
                let one = DlqFilter {
                    state: Some(state),
                    ..filter.clone()
                };
                total += runtime.store.dlq_requeue(&one, now).await?;
            }
            total
        }
    };
    if count > 0 {
        runtime.redrive.wake();
    }
    Ok(count)
}

/// Why [`delete_one`] did not delete an entry.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeleteError {
    /// No dead letter has this id (never, or deleted or swept).
    #[error("no dead letter with id {0}")]
    NotFound(i64),
    /// The worker (or a replay) is sending the entry now: deleting it would
    /// free its key while its request is in flight.
    #[error("dead letter {0} is being redriven right now; try again shortly")]
    Busy(i64),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl DeleteError {
    /// The stable code of this error.
    pub fn code(&self) -> &'static str {
        match self {
            DeleteError::NotFound(_) => "dead_letter_not_found",
            DeleteError::Busy(_) => "dlq_busy",
            DeleteError::Store(_) => "store_unavailable",
        }
    }
}

/// Deletes entry `id` and its queued or parked idempotency record (the
/// work is gone: a retry of the original call runs afresh). Refused with
/// [`DeleteError::Busy`] while the entry is being redriven or replayed; it
/// holds the entry's mark meanwhile, so no redrive starts during it.
pub async fn delete_one(runtime: &Runtime, id: i64) -> Result<(), DeleteError> {
    let Some(_running) = runtime.redrive.claim(id) else {
        return Err(DeleteError::Busy(id));
    };
    if runtime.store.dlq_delete(id).await? {
        Ok(())
    } else {
        Err(DeleteError::NotFound(id))
    }
}

/// What [`purge`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct PurgeReport {
    /// Entries deleted, with their queued or parked idempotency records.
    pub purged: u64,
    /// Matching entries left alone because they were being redriven or
    /// replayed at that moment; a later purge deletes them.
    pub skipped: u64,
}

/// Deletes every entry matching `filter` (pending ones too) and their
/// queued or parked idempotency records, except entries being redriven or
/// replayed now (their keys must hold while their requests are in flight):
/// those are counted in [`PurgeReport::skipped`]. No redrive or replay
/// starts while it runs.
pub async fn purge(runtime: &Runtime, filter: &DlqFilter) -> StoreResult<PurgeReport> {
    let (_fence, running) = runtime.redrive.fence();
    let done = runtime.store.dlq_purge(filter, &running).await?;
    Ok(PurgeReport {
        purged: done.deleted,
        skipped: done.skipped,
    })
}

/// Removes what has expired: delivered and parked dead letters past their
/// retention, idempotency records past their ttl, per operation with a
/// fallback cache, entries older than `very_stale` and beyond `max_entries`,
/// and cache entries of operations serving without a cache (or not at all)
/// older than [`ORPHAN_CACHE_RETENTION`]. Store errors are logged and
/// counted.
pub async fn sweep(runtime: &Runtime) -> SweepReport {
    let now = runtime.clock.now();
    let mut report = SweepReport::default();
    match runtime.store.dlq_sweep(now).await {
        Ok(n) => report.dead_letters = n,
        Err(e) => {
            tracing::warn!(error = %e, "cannot sweep dead letters");
            report.store_errors += 1;
        }
    }
    match runtime.store.idempotency_sweep(now).await {
        Ok(n) => report.idempotency_records = n,
        Err(e) => {
            tracing::warn!(error = %e, "cannot sweep idempotency records");
            report.store_errors += 1;
        }
    }
    let compiled = runtime.compiled();
    let mut cached = Vec::new();
    for pipeline in compiled.operations.values() {
        let Some(cache) = pipeline.fallback.as_ref().and_then(|f| f.cache.as_ref()) else {
            continue;
        };
        cached.push(pipeline.name.clone());
        let before = now.saturating_sub(millis(cache.very_stale));
        let keep = u64::try_from(cache.max_entries).unwrap_or(u64::MAX);
        match runtime
            .store
            .cache_sweep(&pipeline.name, before, keep)
            .await
        {
            Ok(n) => report.cache_entries += n,
            Err(e) => {
                tracing::warn!(operation = %pipeline.name, error = %e, "cannot sweep the fallback cache");
                report.store_errors += 1;
            }
        }
    }
    // Rows of operations that no longer serve with a cache: kept a while
    // (a reload may be undone), then swept.
    let before = now.saturating_sub(millis(ORPHAN_CACHE_RETENTION));
    match runtime.store.cache_sweep_others(&cached, before).await {
        Ok(n) => report.cache_entries += n,
        Err(e) => {
            tracing::warn!(error = %e, "cannot sweep the fallback cache of removed operations");
            report.store_errors += 1;
        }
    }
    lock(&runtime.redrive.pacers)
        .retain(|operation, _| compiled.operations.contains_key(operation));
    report
}

/// Starts the redrive worker: it runs a pass ([`redrive_due`]), then waits
/// for the earliest of a [wake-up](RedriveState::wake), [`POLL_INTERVAL`] or
/// shutdown (at once when the pass left more due). Every
/// [`SWEEP_INTERVAL`] (and at start) it also [sweeps](sweep). Store errors
/// are logged and retried on the next loop; passes start at least
/// [`MIN_PASS_GAP`] apart.
///
/// Shutdown: send `true` on the channel (dropping its sender does the same).
/// The worker takes no new entry after that; a redrive in flight finishes
/// and is recorded (bounded by the operation's timeouts), then the task
/// ends. Alert webhooks still retrying run on in their own tasks (see
/// [`RedriveState::alerts_settled`]).
pub fn spawn_worker(runtime: Arc<Runtime>, shutdown: watch::Receiver<bool>) -> JoinHandle<()> {
    tokio::spawn(worker(runtime, shutdown))
}

async fn worker(runtime: Arc<Runtime>, mut shutdown: watch::Receiver<bool>) {
    tracing::info!("DLQ redrive worker started");
    let mut next_sweep = Instant::now();
    loop {
        if stopping(&shutdown) {
            break;
        }
        let started = Instant::now();
        if started >= next_sweep {
            let swept = sweep(&runtime).await;
            next_sweep = Instant::now() + SWEEP_INTERVAL;
            tracing::debug!(?swept, "swept expired state");
        }
        let report = pass(&runtime, Some(&shutdown)).await;
        if report.store_errors > 0 {
            tracing::warn!(
                errors = report.store_errors,
                "DLQ redrive pass hit store errors; retrying on the next loop"
            );
        } else if report != RedriveReport::default() {
            tracing::debug!(?report, "DLQ redrive pass");
        }
        let again_now = report.more_due && report.store_errors == 0;
        if !again_now {
            tokio::select! {
                () = runtime.redrive.wake.notified() => {}
                () = tokio::time::sleep(POLL_INTERVAL) => {}
                _ = shutdown.wait_for(|stop| *stop) => break,
            }
        }
        tokio::select! {
            () = tokio::time::sleep_until(started + MIN_PASS_GAP) => {}
            _ = shutdown.wait_for(|stop| *stop) => break,
        }
    }
    tracing::info!("DLQ redrive worker stopped");
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::Verdict;
    use crate::pipeline::breaker::BreakerConfig;
    use crate::policy::model::DlqPolicy;

    fn breaker(mode: BreakerMode) -> Breaker {
        Breaker::new(BreakerConfig {
            mode,
            error_threshold_percentage: 50,
            volume_threshold: 1,
            window: Duration::from_secs(10),
            buckets: 10,
            reset_timeout: Duration::from_secs(30),
            max_reset_timeout: None,
            half_open_trials: 1,
            half_open_max_wait: Duration::from_secs(60),
            slow_call: None,
        })
    }

    fn open(b: &Breaker) {
        b.try_acquire()
            .expect("closed breaker admits")
            .record(Verdict::Failure, Duration::from_millis(1));
        assert_eq!(b.state(), BreakerState::Open);
    }

    #[test]
    fn a_running_mark_is_exclusive_and_released_on_drop() {
        let state = RedriveState::default();
        let first = state.claim(7).expect("free");
        assert!(state.is_running(7));
        // A second claim is refused without touching the first mark (and
        // without deadlocking on the set's lock).
        assert!(state.claim(7).is_none());
        assert!(state.is_running(7));
        let other = state.claim(8).expect("another entry is free");
        drop(first);
        assert!(!state.is_running(7));
        assert!(state.is_running(8));
        drop(other);
        assert!(state.claim(7).is_some());
    }

    /// Round 2, item 5: a purge sees every entry marked before it, and no
    /// entry is marked while it runs.
    #[test]
    fn a_fence_names_the_running_entries_and_holds_new_marks_off() {
        let state = RedriveState::default();
        let running = state.claim(7).expect("free");
        let (fence, marked) = state.fence();
        assert_eq!(marked, vec![7]);
        assert!(state.claim(8).is_none(), "no new mark during a purge");
        let (second, _) = state.fence();
        drop(fence);
        assert!(state.claim(8).is_none(), "one purge still runs");
        drop(second);
        drop(running);
        assert!(state.claim(8).is_some(), "marks again once it is done");
    }

    #[tokio::test(start_paused = true)]
    async fn pacing_spaces_sends_per_operation_across_passes() {
        let state = RedriveState::default();
        let start = Instant::now();
        let slots: Vec<Duration> = (0..4).map(|_| state.pace_slot("a", 4) - start).collect();
        assert_eq!(
            slots,
            [0, 250, 500, 750].map(Duration::from_millis),
            "4 per second"
        );
        assert_eq!(state.pace_slot("b", 4), start, "operations pace apart");
        // Once the slots are in the past, the next send is not held back.
        tokio::time::advance(Duration::from_secs(5)).await;
        assert_eq!(state.pace_slot("a", 4), Instant::now());
        // A rate of 0 cannot divide by zero: it counts as 1 per second.
        assert_eq!(state.pace_slot("c", 0), Instant::now());
        assert_eq!(
            state.pace_slot("c", 0) - Instant::now(),
            Duration::from_secs(1)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn the_worker_waits_on_open_breakers_until_a_trial_may_pass() {
        let b = breaker(BreakerMode::Enforce);
        assert!(!waiting_on_breaker(&b));
        open(&b);
        assert!(waiting_on_breaker(&b));
        // `state()` still says open once the reset timeout is over (it is
        // noticed lazily); the worker must go ahead and be the trial.
        tokio::time::advance(Duration::from_secs(30)).await;
        assert_eq!(b.state(), BreakerState::Open);
        assert!(!waiting_on_breaker(&b));
        b.force_open();
        assert!(waiting_on_breaker(&b));
        b.force_closed();
        assert!(!waiting_on_breaker(&b));
        b.reset();
        assert!(!waiting_on_breaker(&b));
    }

    #[tokio::test(start_paused = true)]
    async fn a_metrics_only_breaker_never_makes_the_worker_wait() {
        let b = breaker(BreakerMode::MetricsOnly);
        b.force_open();
        assert!(!waiting_on_breaker(&b));
    }

    #[test]
    fn the_default_config_is_that_of_an_empty_dlq_policy() {
        let policy = DlqPolicy {
            max_attempts: None,
            backoff: None,
            redrive_rate: None,
            retention: None,
            alert: None,
        };
        let decided = DlqConfig::from_policy(&policy, &|text, _| Ok(text.to_owned()))
            .expect("an empty policy compiles");
        assert_eq!(decided, DlqConfig::default());
    }

    #[test]
    fn local_refusals_are_deferred_and_bad_params_are_not() {
        assert!(is_local_refusal(&Failure::BreakerOpen {
            retry_after: Duration::from_secs(1)
        }));
        assert!(is_local_refusal(&Failure::BulkheadFull {
            priority: Priority::Bulk
        }));
        assert!(is_local_refusal(&Failure::RateLimited {
            retry_after: Duration::from_secs(1)
        }));
        assert!(!is_local_refusal(&Failure::BadParams("no".into())));
        assert!(!is_local_refusal(&Failure::Connect("refused".into())));
        assert!(!is_local_refusal(&Failure::DeadlineExceeded));
    }

    #[test]
    fn stored_priorities_parse_back() {
        for p in Priority::ALL {
            assert_eq!(parse_priority(p.as_str()), Some(p));
        }
        assert_eq!(parse_priority("urgent"), None);
    }

    #[test]
    fn a_stop_signal_or_a_dropped_sender_stops_the_worker() {
        let (tx, rx) = watch::channel(false);
        assert!(!stopping(&rx));
        tx.send(true).expect("receiver alive");
        assert!(stopping(&rx));
        let (tx, rx) = watch::channel(false);
        drop(tx);
        assert!(stopping(&rx));
    }

    #[tokio::test]
    async fn alerts_settle_at_once_when_none_is_in_flight() {
        let state = RedriveState::default();
        state.alerts_settled().await;
        assert_eq!((state.alerts_sent(), state.alerts_failed()), (0, 0));
        assert_eq!(state.alerts_in_flight(), 0);
    }

    #[test]
    fn reports_merge_and_count_sends() {
        let mut a = RedriveReport {
            delivered: 1,
            waiting: vec!["x".into()],
            ..RedriveReport::default()
        };
        a.merge(RedriveReport {
            retried: 2,
            parked: 3,
            deferred: 4,
            more_due: true,
            ..RedriveReport::default()
        });
        assert_eq!(a.sent(), 6);
        assert_eq!(a.deferred, 4);
        assert!(a.more_due);
        assert_eq!(a.waiting, ["x"]);
    }

    #[test]
    fn replay_errors_have_stable_codes() {
        assert_eq!(ReplayError::NotFound(1).code(), "dead_letter_not_found");
        assert_eq!(ReplayError::Busy(1).code(), "dlq_busy");
        assert_eq!(
            ReplayError::Refused {
                id: 1,
                failure: Failure::BreakerOpen {
                    retry_after: Duration::from_secs(1)
                }
            }
            .code(),
            "breaker_open"
        );
    }
}
