//! A fake Clay on loopback: the parts of Clay's API the bundled policies
//! call, with Clay-like rate limiting and faults injected at run time.
//!
//! # The API it fakes
//!
//! | method and path | answer |
//! | --- | --- |
//! | `POST /v1/people/enrich` `{email}` | a person derived from the email: name, title, seniority, location, LinkedIn URL, company |
//! | `POST /v1/companies/enrich` `{domain}` | a company derived from the domain: name, industry, size, founding year, HQ, LinkedIn URL |
//! | `GET /v1/companies/{domain}?fields=a,b` | the same company, only the fields asked (all without `fields`) |
//! | `POST /v1/tables/{table_id}/rows` | records the row with its `Idempotency-Key`; a repeated key answers the first result again without recording a second row (as Clay would) but is counted as a *duplicate delivery* |
//! | `GET /health` | `{"status":"ok"}` |
//!
//! Everything derived is deterministic: the same email gives the same
//! person on every run. Domains whose first label starts with `unknown`, or
//! under `.invalid`, answer 404. The `/v1/` routes want an
//! `Authorization: Bearer …` header (any token) and answer 401 without one.
//!
//! # Faults
//!
//! [`Faults`] is set through the Rust handle ([`FakeClay::set_faults`]) or
//! the control API, and applies to the `/v1/` routes, checked in this order:
//!
//! 1. `outage`: `refuse` closes the listener (connections are refused; the
//!    idle kept-alive ones are closed) until the outage ends, when it binds
//!    the same address again; `hang` accepts and never answers (a hung
//!    request is released with 503 when the outage ends). Both also hit
//!    `/health`.
//! 2. `rate_limit`: a token bucket (Clay's 10/s, burst 20, on by default);
//!    an empty bucket answers 429 with `Retry-After` and `X-RateLimit-*`.
//! 3. `storm_429`: that share of requests answers 429 with
//!    `Retry-After: retry_after_s`, whatever the bucket says.
//! 4. latency: `latency_ms` plus up to `jitter_ms`, plus `slow_ms` for the
//!    `slow_rate` share of requests.
//! 5. `error_rate`: that share answers one of `error_statuses` (500, 502,
//!    503). With `recovery`, the rate steps down by `step` every `every_ms`
//!    after the faults were set (a partial recovery).
//!
//! Random draws come from a `StdRng` seeded with `seed` each time the faults
//! are set, all drawn at a request's arrival, so a given sequence of
//! requests meets the same faults on every run.
//!
//! # Control API
//!
//! Served on the fake's own address while it listens, and always on a
//! control address of its own (so an API outage does not take it down):
//!
//! | method and path | what |
//! | --- | --- |
//! | `GET /_fake/faults` | the faults in force |
//! | `PUT /_fake/faults` | replaces them (fields left out take their defaults: `{}` clears every fault) |
//! | `PATCH /_fake/faults` | changes only the fields given |
//! | `POST /_fake/reset` | no faults (the seed is kept), a full bucket, no rows, zeroed stats |
//! | `GET /_fake/rows` | the rows recorded |
//! | `GET /_fake/stats` | counters ([`FakeStats`]) |

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// Longest [`FakeClay::set_faults`] waits for the listener to close or open.
const LISTENER_SETTLE: Duration = Duration::from_secs(5);

/// Largest request body the fake reads.
const BODY_LIMIT: usize = 1024 * 1024;

/// An outage of the fake's API.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outage {
    /// Serving.
    #[default]
    None,
    /// The listener is closed: connections are refused.
    Refuse,
    /// Connections are accepted, requests never answered.
    Hang,
}

impl Outage {
    /// `none`, `refuse` or `hang`.
    pub fn as_str(self) -> &'static str {
        match self {
            Outage::None => "none",
            Outage::Refuse => "refuse",
            Outage::Hang => "hang",
        }
    }
}

/// Clay-like rate limiting: a token bucket over the `/v1/` routes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RateLimitFault {
    /// Whether requests are limited at all.
    pub enabled: bool,
    /// Tokens per second.
    pub per_second: f64,
    /// Bucket size.
    pub burst: u32,
}

impl Default for RateLimitFault {
    /// Clay's public API limit: 10 per second, burst 20, on.
    fn default() -> Self {
        RateLimitFault {
            enabled: true,
            per_second: 10.0,
            burst: 20,
        }
    }
}

/// An error rate that steps down over time (a partial recovery).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Recovery {
    /// How much the error rate drops at each step.
    pub step: f64,
    /// Milliseconds between steps, counted from when the faults were set.
    pub every_ms: u64,
}

/// What the fake does wrong; the default is nothing but Clay's rate limit.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Faults {
    /// Seeds the random draws (error rate, storms, jitter, slow calls).
    pub seed: u64,
    /// `none`, `refuse` or `hang`.
    pub outage: Outage,
    /// Share of `/v1/` requests answered with an error status (0 to 1).
    pub error_rate: f64,
    /// Statuses an injected error answers, drawn evenly.
    pub error_statuses: Vec<u16>,
    /// Steps `error_rate` down over time.
    pub recovery: Option<Recovery>,
    /// Latency added to every `/v1/` answer.
    pub latency_ms: u64,
    /// Up to this much more, drawn per request.
    pub jitter_ms: u64,
    /// Share of requests that are slow (0 to 1).
    pub slow_rate: f64,
    /// How much a slow request adds.
    pub slow_ms: u64,
    /// Share of requests answered 429 whatever the bucket holds (0 to 1).
    pub storm_429: f64,
    /// `Retry-After` of a storm's 429s, in seconds.
    pub retry_after_s: u64,
    /// The token bucket.
    pub rate_limit: RateLimitFault,
}

impl Default for Faults {
    fn default() -> Self {
        Faults {
            seed: 0,
            outage: Outage::None,
            error_rate: 0.0,
            error_statuses: vec![500, 502, 503],
            recovery: None,
            latency_ms: 0,
            jitter_ms: 0,
            slow_rate: 0.0,
            slow_ms: 5000,
            storm_429: 0.0,
            retry_after_s: 1,
            rate_limit: RateLimitFault::default(),
        }
    }
}

/// Faults that make no sense.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid faults: {0}")]
pub struct InvalidFaults(pub String);

impl Faults {
    /// No faults, no rate limit: a perfectly healthy Clay.
    pub fn none() -> Faults {
        Faults {
            rate_limit: RateLimitFault {
                enabled: false,
                ..RateLimitFault::default()
            },
            ..Faults::default()
        }
    }

    /// Checks ranges: shares within 0..=1, statuses 100..=599, a positive rate.
    pub fn validate(&self) -> Result<(), InvalidFaults> {
        let share = |name: &str, v: f64| {
            if (0.0..=1.0).contains(&v) {
                Ok(())
            } else {
                Err(InvalidFaults(format!(
                    "`{name}` must be within 0 and 1, not {v}"
                )))
            }
        };
        share("error_rate", self.error_rate)?;
        share("slow_rate", self.slow_rate)?;
        share("storm_429", self.storm_429)?;
        if self.error_rate > 0.0 && self.error_statuses.is_empty() {
            return Err(InvalidFaults(
                "`error_statuses` may not be empty while `error_rate` is above 0".into(),
            ));
        }
        if let Some(s) = self
            .error_statuses
            .iter()
            .find(|s| !(100..=599).contains(*s))
        {
            return Err(InvalidFaults(format!(
                "`error_statuses`: {s} is not an HTTP status"
            )));
        }
        if let Some(r) = &self.recovery {
            if !(r.step > 0.0 && r.step <= 1.0) {
                return Err(InvalidFaults(
                    "`recovery.step` must be within 0 (excluded) and 1".into(),
                ));
            }
            if r.every_ms == 0 {
                return Err(InvalidFaults("`recovery.every_ms` must be above 0".into()));
            }
        }
        let limit = &self.rate_limit;
        if limit.enabled && !(limit.per_second.is_finite() && limit.per_second > 0.0) {
            return Err(InvalidFaults(
                "`rate_limit.per_second` must be above 0".into(),
            ));
        }
        if limit.enabled && limit.burst == 0 {
            return Err(InvalidFaults(
                "`rate_limit.burst` must be at least 1".into(),
            ));
        }
        Ok(())
    }

    /// Faults from JSON as the control API and `claygate demo --faults` take
    /// them (fields left out take their defaults), checked; an error names
    /// the field at fault.
    pub fn from_json(value: Value) -> Result<Faults, InvalidFaults> {
        let Value::Object(fields) = &value else {
            return Err(InvalidFaults(
                "faults are a JSON object, such as {\"error_rate\": 0.5}".into(),
            ));
        };
        let faults = match serde_json::from_value::<Faults>(value.clone()) {
            Ok(faults) => faults,
            Err(e) => {
                // serde_json does not say which field: try them one by one.
                for (name, v) in fields {
                    let one =
                        Value::Object(serde_json::Map::from_iter([(name.clone(), v.clone())]));
                    if let Err(e) = serde_json::from_value::<Faults>(one) {
                        return Err(InvalidFaults(format!("`{name}`: {e}")));
                    }
                }
                return Err(InvalidFaults(e.to_string()));
            }
        };
        faults.validate()?;
        Ok(faults)
    }

    /// The error rate `elapsed` after the faults were set (`recovery` applied).
    pub fn error_rate_after(&self, elapsed: Duration) -> f64 {
        match &self.recovery {
            None => self.error_rate,
            Some(r) => {
                let steps = elapsed.as_millis() / u128::from(r.every_ms.max(1));
                let steps = u32::try_from(steps).unwrap_or(u32::MAX);
                (self.error_rate - r.step * f64::from(steps)).max(0.0)
            }
        }
    }
}

/// A row as the fake recorded it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RowRecord {
    /// Order of arrival, from 1.
    pub seq: u64,
    /// The id the fake gave it (`row_000001`).
    pub id: String,
    /// The table.
    pub table_id: String,
    /// The `Idempotency-Key` it came with.
    pub idempotency_key: Option<String>,
    /// The row.
    pub row: Value,
    /// Milliseconds after the fake started.
    pub received_ms: u64,
}

/// What the fake saw, for tests and the demo's summary.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct FakeStats {
    /// Requests that reached the API routes (control routes excluded;
    /// refused connections never reach anything).
    pub requests: u64,
    /// Requests by `METHOD /route`.
    pub by_endpoint: BTreeMap<String, u64>,
    /// Answers by status.
    pub by_status: BTreeMap<u16, u64>,
    /// Rows recorded (first deliveries).
    pub rows: u64,
    /// Rows whose `Idempotency-Key` had been delivered before: answered
    /// again, not recorded again.
    pub duplicate_deliveries: u64,
    /// Rows recorded without an `Idempotency-Key`.
    pub rows_without_key: u64,
    /// Rows whose key had been used for another row (answered 422).
    pub key_conflicts: u64,
    /// 429s of the token bucket.
    pub rate_limited: u64,
    /// 429s of a storm.
    pub storm_429: u64,
    /// Injected error statuses.
    pub injected_errors: u64,
    /// Requests held by a `hang` outage.
    pub hung: u64,
    /// Requests without a bearer token.
    pub unauthorized: u64,
    /// Whether the API listener is open now.
    pub listening: bool,
    /// The outage in force.
    pub outage: Outage,
    /// The error rate in force now (after any recovery steps).
    pub effective_error_rate: f64,
}

struct FaultState {
    faults: Faults,
    set_at: Instant,
    rng: StdRng,
}

struct Bucket {
    tokens: f64,
    at: Instant,
}

#[derive(Default)]
struct Log {
    stats: FakeStats,
    rows: Vec<RowRecord>,
    /// Index into `rows` by idempotency key, with the answer given.
    by_key: HashMap<String, (usize, Value)>,
    /// Deliveries per key (1 for a row never duplicated).
    deliveries: HashMap<String, u32>,
}

struct Inner {
    state: Mutex<FaultState>,
    bucket: Mutex<Bucket>,
    log: Mutex<Log>,
    outage: watch::Sender<Outage>,
    listening: watch::Sender<bool>,
    stop: watch::Sender<bool>,
    started: Instant,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The running fake. Cloning shares it; [`shutdown`](Self::shutdown) stops it.
#[derive(Clone)]
pub struct FakeClay {
    addr: SocketAddr,
    control_addr: SocketAddr,
    inner: Arc<Inner>,
    tasks: Arc<Mutex<Vec<JoinHandle<()>>>>,
}

impl std::fmt::Debug for FakeClay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FakeClay")
            .field("addr", &self.addr)
            .field("control_addr", &self.control_addr)
            .finish_non_exhaustive()
    }
}

impl FakeClay {
    /// Starts the fake on `addr` (port 0 picks one) with the default faults
    /// (Clay's rate limit only), and its control API on a port of its own
    /// on the same interface.
    pub async fn start(addr: SocketAddr) -> std::io::Result<FakeClay> {
        let control = SocketAddr::new(addr.ip(), 0);
        FakeClay::start_with(addr, control, Faults::default()).await
    }

    /// Starts the fake on `addr` with its control API on `control`, and
    /// `faults` in force from the first request.
    pub async fn start_with(
        addr: SocketAddr,
        control: SocketAddr,
        faults: Faults,
    ) -> std::io::Result<FakeClay> {
        faults
            .validate()
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
        let api_listener = TcpListener::bind(addr).await?;
        let addr = api_listener.local_addr()?;
        let control_listener = TcpListener::bind(control).await?;
        let control_addr = control_listener.local_addr()?;
        let now = Instant::now();
        let burst = f64::from(faults.rate_limit.burst);
        let inner = Arc::new(Inner {
            state: Mutex::new(FaultState {
                rng: StdRng::seed_from_u64(faults.seed),
                faults: faults.clone(),
                set_at: now,
            }),
            bucket: Mutex::new(Bucket {
                tokens: burst,
                at: now,
            }),
            log: Mutex::new(Log::default()),
            outage: watch::channel(Outage::None).0,
            listening: watch::channel(false).0,
            stop: watch::channel(false).0,
            started: now,
        });
        let api = api_router(Arc::clone(&inner));
        let control_app = control_router().with_state(Arc::clone(&inner));
        let mut tasks = Vec::new();
        tasks.push(tokio::spawn(run_api(
            Arc::clone(&inner),
            api,
            api_listener,
            addr,
        )));
        let mut stop = inner.stop.subscribe();
        tasks.push(tokio::spawn(async move {
            let serve =
                axum::serve(control_listener, control_app).with_graceful_shutdown(async move {
                    let _ = stop.wait_for(|s| *s).await;
                });
            if let Err(e) = serve.await {
                tracing::warn!(error = %e, "the fake Clay's control API stopped");
            }
        }));
        let fake = FakeClay {
            addr,
            control_addr,
            inner,
            tasks: Arc::new(Mutex::new(tasks)),
        };
        fake.wait_listening(true).await;
        if faults.outage != Outage::None {
            fake.inner.outage.send_replace(faults.outage);
            fake.wait_listening(faults.outage != Outage::Refuse).await;
        }
        tracing::info!(%addr, %control_addr, "fake Clay listening");
        Ok(fake)
    }

    /// The API's address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://ADDR`: the base URL to give claygate.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The control API's own address (up during an outage too).
    pub fn control_addr(&self) -> SocketAddr {
        self.control_addr
    }

    /// `http://CONTROL_ADDR`.
    pub fn control_url(&self) -> String {
        format!("http://{}", self.control_addr)
    }

    /// The faults in force.
    pub fn faults(&self) -> Faults {
        lock(&self.inner.state).faults.clone()
    }

    /// Puts `faults` in force (reseeding the random draws). Answers once
    /// the listener is closed (`refuse`) or open again (anything else).
    pub async fn set_faults(&self, faults: Faults) -> Result<(), InvalidFaults> {
        apply(&self.inner, faults).await
    }

    /// Changes the faults in force with `change`, as [`set_faults`](Self::set_faults).
    pub async fn update_faults(
        &self,
        change: impl FnOnce(&mut Faults),
    ) -> Result<(), InvalidFaults> {
        let mut faults = self.faults();
        change(&mut faults);
        self.set_faults(faults).await
    }

    /// No faults (the seed is kept), a full bucket, no rows, zeroed stats.
    pub async fn reset(&self) {
        reset(&self.inner).await;
    }

    /// The rows recorded, in order of arrival.
    pub fn rows(&self) -> Vec<RowRecord> {
        lock(&self.inner.log).rows.clone()
    }

    /// The counters.
    pub fn stats(&self) -> FakeStats {
        stats(&self.inner)
    }

    /// Deliveries of `key` (0 when never delivered; more than 1 means duplicates).
    pub fn deliveries(&self, key: &str) -> u32 {
        lock(&self.inner.log)
            .deliveries
            .get(key)
            .copied()
            .unwrap_or(0)
    }

    /// Whether the API listener is open now.
    pub fn listening(&self) -> bool {
        *self.inner.listening.borrow()
    }

    /// Stops both listeners and releases hung requests; answers when the
    /// fake's tasks have ended (bounded).
    pub async fn shutdown(&self) {
        self.inner.stop.send_replace(true);
        let tasks: Vec<JoinHandle<()>> = std::mem::take(&mut *lock(&self.tasks));
        for task in tasks {
            let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
        }
    }

    async fn wait_listening(&self, open: bool) {
        wait_listening(&self.inner, open).await;
    }
}

async fn wait_listening(inner: &Inner, open: bool) {
    let mut rx = inner.listening.subscribe();
    let waited = tokio::time::timeout(LISTENER_SETTLE, async {
        let _ = rx.wait_for(|l| *l == open).await;
    })
    .await;
    if waited.is_err() {
        tracing::warn!(open, "the fake Clay's listener did not settle in time");
    }
}

async fn apply(inner: &Inner, faults: Faults) -> Result<(), InvalidFaults> {
    faults.validate()?;
    let outage = faults.outage;
    {
        let mut state = lock(&inner.state);
        state.rng = StdRng::seed_from_u64(faults.seed);
        state.set_at = Instant::now();
        state.faults = faults;
    }
    let previous = inner.outage.send_replace(outage);
    if previous != outage && !*inner.stop.borrow() {
        wait_listening(inner, outage != Outage::Refuse).await;
    }
    Ok(())
}

async fn reset(inner: &Inner) {
    let seed = lock(&inner.state).faults.seed;
    {
        let mut log = lock(&inner.log);
        *log = Log::default();
    }
    let faults = Faults {
        seed,
        ..Faults::default()
    };
    {
        let mut bucket = lock(&inner.bucket);
        bucket.tokens = f64::from(faults.rate_limit.burst);
        bucket.at = Instant::now();
    }
    // Default faults always validate.
    let _ = apply(inner, faults).await;
}

fn stats(inner: &Inner) -> FakeStats {
    let (outage, rate) = {
        let state = lock(&inner.state);
        (
            state.faults.outage,
            state.faults.error_rate_after(state.set_at.elapsed()),
        )
    };
    let mut stats = lock(&inner.log).stats.clone();
    stats.listening = *inner.listening.borrow();
    stats.outage = outage;
    stats.effective_error_rate = rate;
    stats
}

// ---------------------------------------------------------------------------
// Listening, and not listening

/// A listener that says when it has been closed (dropped), so an outage
/// is in force the moment [`FakeClay::set_faults`] answers.
struct Tracked {
    listener: Option<TcpListener>,
    closed: Option<oneshot::Sender<()>>,
}

impl Drop for Tracked {
    fn drop(&mut self) {
        // Close the socket first, then tell.
        drop(self.listener.take());
        if let Some(closed) = self.closed.take() {
            let _ = closed.send(());
        }
    }
}

impl axum::serve::Listener for Tracked {
    type Io = TcpStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (TcpStream, SocketAddr) {
        match self.listener.as_mut() {
            Some(listener) => axum::serve::Listener::accept(listener).await,
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        match &self.listener {
            Some(listener) => listener.local_addr(),
            None => Err(std::io::Error::new(
                std::io::ErrorKind::NotConnected,
                "the fake Clay's listener is closed",
            )),
        }
    }
}

/// Serves the API on `addr`, closing the listener while the outage is
/// `refuse` and binding it again after, until stopped.
async fn run_api(inner: Arc<Inner>, app: Router, first: TcpListener, addr: SocketAddr) {
    let mut outage = inner.outage.subscribe();
    let mut stop = inner.stop.subscribe();
    let mut next = Some(first);
    loop {
        let listener = match next.take() {
            Some(l) => l,
            None => {
                tokio::select! {
                    _ = outage.wait_for(|o| *o != Outage::Refuse) => {}
                    _ = stop.wait_for(|s| *s) => {}
                }
                if *stop.borrow() {
                    break;
                }
                match bind_again(addr, &mut stop).await {
                    Some(l) => l,
                    None => break,
                }
            }
        };
        let (closed_tx, closed_rx) = oneshot::channel();
        let (signal_tx, signal_rx) = oneshot::channel::<()>();
        let tracked = Tracked {
            listener: Some(listener),
            closed: Some(closed_tx),
        };
        let serve = axum::serve(tracked, app.clone()).with_graceful_shutdown(async move {
            let _ = signal_rx.await;
        });
        // Connections accepted before an outage finish in this task.
        tokio::spawn(async move {
            if let Err(e) = serve.await {
                tracing::warn!(error = %e, "the fake Clay's API server stopped");
            }
        });
        inner.listening.send_replace(true);
        tokio::select! {
            _ = outage.wait_for(|o| *o == Outage::Refuse) => {}
            _ = stop.wait_for(|s| *s) => {}
        }
        let _ = signal_tx.send(());
        let _ = closed_rx.await;
        inner.listening.send_replace(false);
        if *stop.borrow() {
            break;
        }
    }
}

/// Binds `addr` again after an outage (retrying briefly: the old socket
/// may linger a moment); `None` when stopped or it cannot be had.
async fn bind_again(addr: SocketAddr, stop: &mut watch::Receiver<bool>) -> Option<TcpListener> {
    let mut wait = Duration::from_millis(10);
    for attempt in 1..=50 {
        match TcpListener::bind(addr).await {
            Ok(l) => return Some(l),
            Err(e) => {
                if attempt == 50 {
                    tracing::error!(%addr, error = %e, "the fake Clay cannot listen again");
                    return None;
                }
            }
        }
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            _ = stop.wait_for(|s| *s) => return None,
        }
        wait = (wait * 2).min(Duration::from_millis(200));
    }
    None
}

// ---------------------------------------------------------------------------
// Routes

fn api_router(inner: Arc<Inner>) -> Router {
    Router::new()
        .route("/v1/people/enrich", post(enrich_person))
        .route("/v1/companies/enrich", post(enrich_company))
        .route("/v1/companies/{domain}", get(lookup_company))
        .route("/v1/tables/{table_id}/rows", post(push_row))
        .route("/health", get(health))
        .merge(control_router())
        .layer(middleware::from_fn_with_state(
            Arc::clone(&inner),
            clay_layer,
        ))
        .with_state(inner)
}

fn control_router() -> Router<Arc<Inner>> {
    Router::new()
        .route(
            "/_fake/faults",
            get(get_faults).put(put_faults).patch(patch_faults),
        )
        .route("/_fake/reset", post(post_reset))
        .route("/_fake/rows", get(get_rows))
        .route("/_fake/stats", get(get_stats))
}

/// What one request meets, drawn at its arrival.
struct Draw {
    storm: bool,
    delay: Duration,
    error: Option<u16>,
    retry_after_s: u64,
}

fn draw(inner: &Inner) -> Draw {
    let mut state = lock(&inner.state);
    let FaultState {
        faults,
        set_at,
        rng,
    } = &mut *state;
    let storm: f64 = rng.random();
    let slow: f64 = rng.random();
    let jitter: f64 = rng.random();
    let error: f64 = rng.random();
    let pick: f64 = rng.random();
    let rate = faults.error_rate_after(set_at.elapsed());
    let mut delay = Duration::from_millis(faults.latency_ms);
    if faults.jitter_ms > 0 {
        delay +=
            Duration::from_secs_f64(jitter * Duration::from_millis(faults.jitter_ms).as_secs_f64());
    }
    if slow < faults.slow_rate {
        delay += Duration::from_millis(faults.slow_ms);
    }
    let error = (error < rate && !faults.error_statuses.is_empty()).then(|| {
        let n = faults.error_statuses.len();
        let i = ((pick * n as f64) as usize).min(n - 1);
        faults.error_statuses[i]
    });
    Draw {
        storm: storm < faults.storm_429,
        delay,
        error,
        retry_after_s: faults.retry_after_s.max(1),
    }
}

/// Takes a token; `Err` with the wait for the next one when empty.
fn take_token(inner: &Inner) -> Result<(), (Duration, f64)> {
    let limit = lock(&inner.state).faults.rate_limit.clone();
    if !limit.enabled {
        return Ok(());
    }
    let burst = f64::from(limit.burst.max(1));
    let mut bucket = lock(&inner.bucket);
    let now = Instant::now();
    let elapsed = now.saturating_duration_since(bucket.at).as_secs_f64();
    bucket.tokens = (bucket.tokens + elapsed * limit.per_second).min(burst);
    bucket.at = now;
    if bucket.tokens >= 1.0 {
        bucket.tokens -= 1.0;
        Ok(())
    } else {
        let wait = (1.0 - bucket.tokens) / limit.per_second;
        Err((Duration::from_secs_f64(wait), limit.per_second))
    }
}

fn endpoint_label(method: &Method, path: &str) -> String {
    let route =
        if path == "/v1/people/enrich" || path == "/v1/companies/enrich" || path == "/health" {
            path.to_owned()
        } else if path.starts_with("/v1/companies/") {
            "/v1/companies/{domain}".to_owned()
        } else if path.starts_with("/v1/tables/") && path.ends_with("/rows") {
            "/v1/tables/{table_id}/rows".to_owned()
        } else {
            "(other)".to_owned()
        };
    format!("{method} {route}")
}

/// Faults, auth and the rate limit in front of the API routes; counts
/// every answer.
async fn clay_layer(State(inner): State<Arc<Inner>>, request: Request, next: Next) -> Response {
    let path = request.uri().path().to_owned();
    if path.starts_with("/_fake/") {
        return next.run(request).await;
    }
    {
        let mut log = lock(&inner.log);
        log.stats.requests += 1;
        *log.stats
            .by_endpoint
            .entry(endpoint_label(request.method(), &path))
            .or_insert(0) += 1;
    }
    let response = faulted(&inner, &path, request, next).await;
    *lock(&inner.log)
        .stats
        .by_status
        .entry(response.status().as_u16())
        .or_insert(0) += 1;
    response
}

async fn faulted(inner: &Arc<Inner>, path: &str, request: Request, next: Next) -> Response {
    if *inner.outage.borrow() == Outage::Hang {
        lock(&inner.log).stats.hung += 1;
        let mut outage = inner.outage.subscribe();
        let mut stop = inner.stop.subscribe();
        tokio::select! {
            _ = outage.wait_for(|o| *o != Outage::Hang) => {}
            _ = stop.wait_for(|s| *s) => {}
        }
        return clay_error(
            StatusCode::SERVICE_UNAVAILABLE,
            "service_unavailable",
            "the request hung through an outage",
        );
    }
    if !path.starts_with("/v1/") {
        return next.run(request).await;
    }
    if !has_bearer(request.headers()) {
        lock(&inner.log).stats.unauthorized += 1;
        return clay_error(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "send your API key as `Authorization: Bearer <key>`",
        );
    }
    if let Err((wait, per_second)) = take_token(inner) {
        lock(&inner.log).stats.rate_limited += 1;
        let seconds = wait.as_secs_f64().ceil().max(1.0) as u64;
        let mut response = clay_error(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limited",
            &format!("rate limit exceeded: {per_second} requests per second"),
        );
        let headers = response.headers_mut();
        headers.insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        headers.insert(
            "x-ratelimit-limit",
            HeaderValue::from(per_second.round() as u64),
        );
        headers.insert("x-ratelimit-remaining", HeaderValue::from(0u64));
        headers.insert("x-ratelimit-reset", HeaderValue::from(seconds));
        return response;
    }
    let draw = draw(inner);
    if draw.storm {
        lock(&inner.log).stats.storm_429 += 1;
        let mut response = clay_error(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limited",
            "too many requests: slow down",
        );
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(draw.retry_after_s));
        return response;
    }
    if !draw.delay.is_zero() {
        tokio::time::sleep(draw.delay).await;
    }
    if let Some(status) = draw.error {
        lock(&inner.log).stats.injected_errors += 1;
        let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let code = match status.as_u16() {
            502 => "bad_gateway",
            503 => "service_unavailable",
            504 => "gateway_timeout",
            _ => "internal_error",
        };
        return clay_error(status, code, "injected fault");
    }
    next.run(request).await
}

fn has_bearer(headers: &HeaderMap) -> bool {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .is_some_and(|token| !token.trim().is_empty())
}

/// Clay's error shape: `{"error": {"code", "message"}}`.
fn clay_error(status: StatusCode, code: &str, message: &str) -> Response {
    (
        status,
        Json(json!({ "error": { "code": code, "message": message } })),
    )
        .into_response()
}

fn json_body(body: &Bytes) -> Result<Value, Box<Response>> {
    serde_json::from_slice(body).map_err(|e| {
        Box::new(clay_error(
            StatusCode::BAD_REQUEST,
            "invalid_json",
            &format!("the body is not JSON: {e}"),
        ))
    })
}

async fn health() -> Json<Value> {
    Json(json!({ "status": "ok" }))
}

async fn enrich_person(body: Bytes) -> Response {
    let body = match json_body(&body) {
        Ok(b) => b,
        Err(r) => return *r,
    };
    let Some(email) = body
        .get("email")
        .and_then(Value::as_str)
        .filter(|e| valid_email(e))
    else {
        return clay_error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "`email` is required and must be an email address",
        );
    };
    Json(person(email)).into_response()
}

async fn enrich_company(body: Bytes) -> Response {
    let body = match json_body(&body) {
        Ok(b) => b,
        Err(r) => return *r,
    };
    let Some(domain) = body.get("domain").and_then(Value::as_str) else {
        return clay_error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "`domain` is required",
        );
    };
    company_answer(domain, None)
}

async fn lookup_company(
    Path(domain): Path<String>,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    company_answer(&domain, query.get("fields").map(String::as_str))
}

fn company_answer(domain: &str, fields: Option<&str>) -> Response {
    let domain = domain.trim().to_ascii_lowercase();
    if !valid_domain(&domain) {
        return clay_error(
            StatusCode::BAD_REQUEST,
            "invalid_domain",
            "`domain` must be a domain name such as acme.com",
        );
    }
    if unknown_domain(&domain) {
        return clay_error(
            StatusCode::NOT_FOUND,
            "not_found",
            &format!("no company found for {domain}"),
        );
    }
    let mut company = company(&domain);
    if let (Some(fields), Some(map)) = (fields, company.as_object_mut()) {
        let wanted: Vec<&str> = fields
            .split(',')
            .map(str::trim)
            .filter(|f| !f.is_empty())
            .collect();
        if !wanted.is_empty() {
            map.retain(|k, _| k == "domain" || wanted.contains(&k.as_str()));
        }
    }
    Json(company).into_response()
}

async fn push_row(
    State(inner): State<Arc<Inner>>,
    Path(table_id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if table_id.is_empty()
        || table_id.len() > 64
        || !table_id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    {
        return clay_error(StatusCode::NOT_FOUND, "table_not_found", "no such table");
    }
    if body.len() > BODY_LIMIT {
        return clay_error(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_large",
            "the row is too large",
        );
    }
    let row = match json_body(&body) {
        Ok(Value::Object(map)) => Value::Object(map),
        Ok(_) => {
            return clay_error(
                StatusCode::BAD_REQUEST,
                "invalid_row",
                "a row is a JSON object of column values",
            );
        }
        Err(r) => return *r,
    };
    let key = headers
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let received_ms = u64::try_from(inner.started.elapsed().as_millis()).unwrap_or(u64::MAX);
    let mut log = lock(&inner.log);
    if let Some(key) = &key
        && let Some((index, answer)) = log.by_key.get(key).cloned()
    {
        let same = log
            .rows
            .get(index)
            .is_some_and(|r| r.table_id == table_id && r.row == row);
        if !same {
            log.stats.key_conflicts += 1;
            return clay_error(
                StatusCode::UNPROCESSABLE_ENTITY,
                "idempotency_key_reused",
                "this Idempotency-Key was used for another row",
            );
        }
        log.stats.duplicate_deliveries += 1;
        *log.deliveries.entry(key.clone()).or_insert(0) += 1;
        let mut response = (StatusCode::CREATED, Json(answer)).into_response();
        response
            .headers_mut()
            .insert("idempotent-replayed", HeaderValue::from_static("true"));
        return response;
    }
    let seq = log.rows.len() as u64 + 1;
    let id = format!("row_{seq:06}");
    let answer = json!({ "id": id, "table_id": table_id, "status": "created" });
    log.rows.push(RowRecord {
        seq,
        id,
        table_id,
        idempotency_key: key.clone(),
        row,
        received_ms,
    });
    log.stats.rows += 1;
    match key {
        Some(key) => {
            let index = log.rows.len() - 1;
            log.by_key.insert(key.clone(), (index, answer.clone()));
            log.deliveries.insert(key, 1);
        }
        None => log.stats.rows_without_key += 1,
    }
    (StatusCode::CREATED, Json(answer)).into_response()
}

// ---------------------------------------------------------------------------
// Control API

async fn get_faults(State(inner): State<Arc<Inner>>) -> Json<Faults> {
    Json(lock(&inner.state).faults.clone())
}

async fn put_faults(State(inner): State<Arc<Inner>>, body: Bytes) -> Response {
    let body = if body.iter().all(u8::is_ascii_whitespace) {
        Bytes::from_static(b"{}")
    } else {
        body
    };
    let faults = serde_json::from_slice::<Value>(&body)
        .map_err(|e| InvalidFaults(format!("not JSON: {e}")))
        .and_then(Faults::from_json);
    match faults {
        Ok(faults) => set_and_answer(&inner, faults).await,
        Err(e) => clay_error(StatusCode::BAD_REQUEST, "invalid_faults", &e.0),
    }
}

async fn patch_faults(State(inner): State<Arc<Inner>>, body: Bytes) -> Response {
    let patch: Value = match serde_json::from_slice(&body) {
        Ok(Value::Object(p)) => Value::Object(p),
        Ok(_) => {
            return clay_error(
                StatusCode::BAD_REQUEST,
                "invalid_faults",
                "send a JSON object",
            );
        }
        Err(e) => return clay_error(StatusCode::BAD_REQUEST, "invalid_faults", &e.to_string()),
    };
    let current = lock(&inner.state).faults.clone();
    let mut merged = serde_json::to_value(current).unwrap_or(Value::Null);
    merge(&mut merged, patch);
    match Faults::from_json(merged) {
        Ok(faults) => set_and_answer(&inner, faults).await,
        Err(e) => clay_error(StatusCode::BAD_REQUEST, "invalid_faults", &e.0),
    }
}

/// JSON merge patch (RFC 7386): objects merge, `null` removes, the rest replaces.
fn merge(target: &mut Value, patch: Value) {
    match (target, patch) {
        (Value::Object(t), Value::Object(p)) => {
            for (k, v) in p {
                if v.is_null() {
                    t.remove(&k);
                } else {
                    merge(t.entry(k).or_insert(Value::Null), v);
                }
            }
        }
        (t, p) => *t = p,
    }
}

async fn set_and_answer(inner: &Arc<Inner>, faults: Faults) -> Response {
    match apply(inner, faults).await {
        Ok(()) => Json(lock(&inner.state).faults.clone()).into_response(),
        Err(e) => clay_error(StatusCode::BAD_REQUEST, "invalid_faults", &e.0),
    }
}

async fn post_reset(State(inner): State<Arc<Inner>>) -> Json<Faults> {
    reset(&inner).await;
    Json(lock(&inner.state).faults.clone())
}

async fn get_rows(State(inner): State<Arc<Inner>>) -> Json<Value> {
    let log = lock(&inner.log);
    Json(json!({
        "rows": log.rows,
        "duplicate_deliveries": log.stats.duplicate_deliveries,
    }))
}

async fn get_stats(State(inner): State<Arc<Inner>>) -> Json<FakeStats> {
    Json(stats(&inner))
}

// ---------------------------------------------------------------------------
// Deterministic people and companies

const FIRST_NAMES: [&str; 16] = [
    "Ada",
    "Grace",
    "Alan",
    "Katherine",
    "Linus",
    "Margaret",
    "Dennis",
    "Barbara",
    "Ken",
    "Frances",
    "Edsger",
    "Radia",
    "Donald",
    "Hedy",
    "Tim",
    "Shafi",
];
const LAST_NAMES: [&str; 16] = [
    "Lovelace",
    "Hopper",
    "Turing",
    "Johnson",
    "Torvalds",
    "Hamilton",
    "Ritchie",
    "Liskov",
    "Thompson",
    "Allen",
    "Dijkstra",
    "Perlman",
    "Knuth",
    "Lamarr",
    "Berners-Lee",
    "Goldwasser",
];
const TITLES: [(&str, &str); 12] = [
    ("Head of Growth", "director"),
    ("VP of Sales", "vp"),
    ("Account Executive", "individual_contributor"),
    ("Chief Revenue Officer", "c_suite"),
    ("Revenue Operations Manager", "manager"),
    ("Software Engineer", "individual_contributor"),
    ("Marketing Director", "director"),
    ("Founder & CEO", "c_suite"),
    ("Data Analyst", "individual_contributor"),
    ("Sales Development Representative", "individual_contributor"),
    ("Head of Partnerships", "director"),
    ("Product Manager", "manager"),
];
const CITIES: [(&str, &str); 10] = [
    ("San Francisco", "US"),
    ("New York", "US"),
    ("Austin", "US"),
    ("London", "GB"),
    ("Berlin", "DE"),
    ("Paris", "FR"),
    ("Toronto", "CA"),
    ("Amsterdam", "NL"),
    ("Sydney", "AU"),
    ("Singapore", "SG"),
];
const INDUSTRIES: [&str; 10] = [
    "Software Development",
    "Financial Services",
    "Marketing Services",
    "IT Services and Consulting",
    "Manufacturing",
    "Retail",
    "Hospital and Health Care",
    "Logistics",
    "Education",
    "Media Production",
];
const SIZES: [(u64, &str); 7] = [
    (8, "1-10"),
    (35, "11-50"),
    (140, "51-200"),
    (420, "201-500"),
    (870, "501-1000"),
    (3200, "1001-5000"),
    (12500, "10001+"),
];
const TECHNOLOGIES: [&str; 10] = [
    "Salesforce",
    "HubSpot",
    "Snowflake",
    "Segment",
    "Stripe",
    "Zendesk",
    "Google Analytics",
    "AWS",
    "Slack",
    "Marketo",
];
const FREE_MAIL: [&str; 6] = [
    "gmail.com",
    "yahoo.com",
    "outlook.com",
    "hotmail.com",
    "icloud.com",
    "proton.me",
];

/// A stable 64-bit hash (FNV-1a, then a splitmix64 finalizer).
fn hash(text: &str, salt: u64) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325 ^ salt;
    for b in text.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h = (h ^ (h >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h = (h ^ (h >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

fn pick<T: Copy>(list: &[T], text: &str, salt: u64) -> T {
    let i = usize::try_from(hash(text, salt) % list.len() as u64).unwrap_or(0);
    list[i]
}

fn capitalize(word: &str) -> String {
    let mut chars = word.chars();
    match chars.next() {
        Some(first) => first
            .to_uppercase()
            .chain(chars.flat_map(char::to_lowercase))
            .collect(),
        None => String::new(),
    }
}

fn valid_email(email: &str) -> bool {
    match email.split_once('@') {
        Some((local, domain)) => !local.is_empty() && valid_domain(domain),
        None => false,
    }
}

fn valid_domain(domain: &str) -> bool {
    domain.len() <= 253
        && domain.contains('.')
        && !domain.starts_with('.')
        && !domain.ends_with('.')
        && domain
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-')
}

fn unknown_domain(domain: &str) -> bool {
    domain.starts_with("unknown") || domain.ends_with(".invalid")
}

fn company_name(domain: &str) -> String {
    let label = domain.split('.').next().unwrap_or(domain);
    let name: Vec<String> = label.split('-').map(capitalize).collect();
    let suffix = pick(
        &["", " Inc.", " Labs", " Technologies", " Group", ""],
        domain,
        7,
    );
    format!("{}{suffix}", name.join(" "))
}

fn slug(text: &str) -> String {
    text.to_ascii_lowercase()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect::<String>()
        .split('-')
        .filter(|s| !s.is_empty())
        .collect::<Vec<_>>()
        .join("-")
}

/// The person behind `email`, the same on every run.
pub fn person(email: &str) -> Value {
    let email = email.trim().to_ascii_lowercase();
    let (local, domain) = email.split_once('@').unwrap_or((email.as_str(), ""));
    let parts: Vec<&str> = local
        .split(['.', '_', '-', '+'])
        .filter(|p| !p.is_empty() && p.chars().all(char::is_alphabetic))
        .collect();
    let (first, last) = match parts.as_slice() {
        [first, .., last] => (capitalize(first), capitalize(last)),
        [first] => (capitalize(first), pick(&LAST_NAMES, &email, 2).to_owned()),
        [] => (
            pick(&FIRST_NAMES, &email, 1).to_owned(),
            pick(&LAST_NAMES, &email, 2).to_owned(),
        ),
    };
    let full = format!("{first} {last}");
    let (title, seniority) = pick(&TITLES, &email, 3);
    let (city, country) = pick(&CITIES, &email, 4);
    let company = if FREE_MAIL.contains(&domain) || domain.is_empty() {
        Value::Null
    } else {
        json!({
            "name": company_name(domain),
            "domain": domain,
            "linkedin_url": format!("https://www.linkedin.com/company/{}", slug(&company_name(domain))),
        })
    };
    json!({
        "email": email,
        "person": {
            "full_name": full,
            "first_name": first,
            "last_name": last,
            "title": title,
            "seniority": seniority,
            "location": { "city": city, "country": country },
            "linkedin_url": format!("https://www.linkedin.com/in/{}-{:06x}", slug(&full), hash(&email, 5) & 0xff_ffff),
        },
        "company": company,
        "email_status": "valid",
        "source": "fake-clay",
    })
}

/// The company at `domain`, the same on every run.
pub fn company(domain: &str) -> Value {
    let domain = domain.trim().to_ascii_lowercase();
    let name = company_name(&domain);
    let (employees, range) = pick(&SIZES, &domain, 11);
    let (city, country) = pick(&CITIES, &domain, 12);
    let industry = pick(&INDUSTRIES, &domain, 13);
    let founded = 1975 + hash(&domain, 14) % 48;
    let tech: Vec<&str> =
        (0..3)
            .map(|i| pick(&TECHNOLOGIES, &domain, 20 + i))
            .fold(Vec::new(), |mut v, t| {
                if !v.contains(&t) {
                    v.push(t);
                }
                v
            });
    json!({
        "domain": domain,
        "name": name,
        "industry": industry,
        "employee_count": employees,
        "employee_range": range,
        "founded": founded,
        "headquarters": { "city": city, "country": country },
        "linkedin_url": format!("https://www.linkedin.com/company/{}", slug(&name)),
        "description": format!("{name} is a {} company headquartered in {city}.", industry.to_ascii_lowercase()),
        "technologies": tech,
        "source": "fake-clay",
    })
}
