//! Health: upstream probes, the per-operation verdicts, and the state
//! gauges refreshed before each metrics scrape.
//!
//! # Probes
//!
//! [`spawn_probes`] runs every upstream's `probe` on its `interval` through
//! the upstream's own transport (its base URL, headers and TLS settings),
//! outside the operation pipelines: a probe takes no bulkhead slot and no
//! rate-limit token, and never counts in a breaker's window. It reads the
//! serving generation at least every second, so a reload adds, changes or
//! removes probes without a restart. A probe passes on a 2xx or 3xx answer
//! within its `timeout`.
//!
//! # Verdicts
//!
//! [`report`] judges each operation of the serving generation
//! (DESIGN.md, "Health"):
//!
//! | status | when |
//! | --- | --- |
//! | `unhealthy` | its upstream's latest probe failed; or its breaker is open (or forced open) and it has neither a fallback nor a DLQ |
//! | `degraded` | its breaker is open or half-open but a fallback or the DLQ serves; its DLQ holds more than `health.dlq_degraded_above` pending and parked entries; or it answered from its fallback within `health.fallback_window` (default a minute) |
//! | `healthy` | otherwise |
//!
//! Dead letters of an operation that a reload removed are kept (never
//! deleted) but nothing redrives them: each such operation gets a
//! `degraded` check `orphaned:<name>` until the operation is back or its
//! entries are deleted, so accepted work is never silently stuck.
//!
//! A DLQ counts as graceful degradation: calls of a write operation are
//! accepted and delivered later. A `metrics_only` breaker never rejects, so
//! its "would be open" is a note, not a verdict. The report is shaped after
//! the health-check response draft (draft-inadarei-api-health-check), with
//! `healthy`/`degraded`/`unhealthy` for its `pass`/`warn`/`fail`. Its texts
//! never hold a header value or credentials of a base URL.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use serde_json::Value;
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;
use utoipa::ToSchema;

use crate::clock::UnixMillis;
use crate::compile::Compiled;
use crate::metrics::{ClassLabels, Metrics, StateLabels, UpstreamLabels};
use crate::pipeline::breaker::BreakerState;
use crate::pipeline::compose::{Pipeline, UpstreamRuntime};
use crate::pipeline::http::Rendered;
use crate::policy::model::{BreakerMode, Method, Probe};
use crate::runtime::Runtime;
use crate::store::{DlqCount, DlqState};

/// Time between probes when the policy does not say.
pub const DEFAULT_PROBE_INTERVAL: Duration = Duration::from_secs(15);
/// Time one probe may take when the policy does not say (the schema's default).
pub const DEFAULT_PROBE_TIMEOUT: Duration = Duration::from_secs(5);
/// DLQ size (pending plus parked) above which an operation is degraded,
/// when `health.dlq_degraded_above` is not set.
pub const DEFAULT_DLQ_DEGRADED_ABOVE: u32 = 100;
/// How long a fallback answer keeps its operation degraded, when
/// `health.fallback_window` is not set.
pub const DEFAULT_FALLBACK_WINDOW: Duration = Duration::from_secs(60);
/// Longest the probe runner goes without looking for a new generation.
const RECONCILE_EVERY: Duration = Duration::from_secs(1);
/// Longest a health answer waits for the store.
const STORE_TIMEOUT: Duration = Duration::from_secs(2);

/// Every breaker state, for the one-hot `breaker_state` gauge.
const BREAKER_STATES: [BreakerState; 5] = [
    BreakerState::Closed,
    BreakerState::Open,
    BreakerState::HalfOpen,
    BreakerState::ForcedOpen,
    BreakerState::ForcedClosed,
];

/// Every dead-letter state, so each has a `dlq_entries` series.
const DLQ_STATES: [DlqState; 3] = [DlqState::Pending, DlqState::Delivered, DlqState::Parked];

/// The latest result of one upstream's probe.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ProbeResult {
    /// True when the probe passed.
    pub ok: bool,
    /// When it ran.
    pub at: UnixMillis,
    /// What it saw (status, or the failure), never a header value.
    pub detail: String,
    /// Failures in a row.
    pub consecutive_failures: u32,
    /// The HTTP status answered, if any.
    pub status: Option<u16>,
    /// Time the probe took, in milliseconds.
    pub latency_ms: u64,
}

/// Latest probe results by upstream.
#[derive(Debug, Default)]
pub struct Probes {
    results: Mutex<BTreeMap<String, ProbeResult>>,
}

impl Probes {
    /// Records `result` for `upstream`.
    pub fn record(&self, upstream: &str, result: ProbeResult) {
        self.lock().insert(upstream.to_owned(), result);
    }

    /// The latest result of `upstream`'s probe.
    pub fn get(&self, upstream: &str) -> Option<ProbeResult> {
        self.lock().get(upstream).cloned()
    }

    /// Drops `upstream`'s result (its probe was removed or now probes
    /// something else).
    pub fn forget(&self, upstream: &str) {
        self.lock().remove(upstream);
    }

    /// Every latest result, by upstream.
    pub fn all(&self) -> BTreeMap<String, ProbeResult> {
        self.lock().clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, ProbeResult>> {
        self.results.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

// ---------------------------------------------------------------------------
// The probe runner

/// One upstream's probe as scheduled by the runner.
struct Scheduled {
    upstream: Arc<UpstreamRuntime>,
    probe: Probe,
    /// Changes when the probe's target changes, so a result of the old
    /// target arriving late is dropped.
    epoch: u64,
    next: Instant,
    running: bool,
}

/// What one probe saw.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Observed {
    ok: bool,
    status: Option<u16>,
    detail: String,
    latency: Duration,
}

/// Runs every upstream's probe on its interval (reading the serving
/// generation each round, so reloads add and remove probes) until `stop`.
pub fn spawn_probes(
    runtime: Arc<Runtime>,
    probes: Arc<Probes>,
    stop: watch::Receiver<bool>,
) -> JoinHandle<()> {
    tokio::spawn(run_probes(runtime, probes, stop))
}

async fn run_probes(runtime: Arc<Runtime>, probes: Arc<Probes>, mut stop: watch::Receiver<bool>) {
    let mut scheduled: BTreeMap<String, Scheduled> = BTreeMap::new();
    let mut running: JoinSet<Observed> = JoinSet::new();
    let mut tasks: HashMap<tokio::task::Id, (String, u64)> = HashMap::new();
    let mut epochs = 0u64;
    let mut seen: Option<Arc<Compiled>> = None;
    loop {
        if *stop.borrow() {
            break;
        }
        let now = Instant::now();
        let compiled = runtime.compiled();
        if !seen.as_ref().is_some_and(|s| Arc::ptr_eq(s, &compiled)) {
            reconcile(
                &compiled,
                &mut scheduled,
                &mut epochs,
                &probes,
                &runtime.metrics,
                now,
            );
            seen = Some(compiled);
        }
        for (name, s) in &mut scheduled {
            if s.running || s.next > now {
                continue;
            }
            s.running = true;
            s.next = now + interval(&s.probe);
            let upstream = Arc::clone(&s.upstream);
            let probe = s.probe.clone();
            let handle = running.spawn(async move { probe_once(&upstream, &probe).await });
            tasks.insert(handle.id(), (name.clone(), s.epoch));
        }
        let wake = scheduled
            .values()
            .filter(|s| !s.running)
            .map(|s| s.next)
            .fold(now + RECONCILE_EVERY, Instant::min);
        tokio::select! {
            changed = stop.changed() => {
                if changed.is_err() {
                    break;
                }
            }
            Some(joined) = running.join_next_with_id(), if !running.is_empty() => {
                let (id, observed) = match joined {
                    Ok((id, observed)) => (id, Some(observed)),
                    Err(e) => (e.id(), None),
                };
                let Some((name, epoch)) = tasks.remove(&id) else { continue };
                let Some(s) = scheduled.get_mut(&name).filter(|s| s.epoch == epoch) else {
                    continue;
                };
                s.running = false;
                let observed = observed.unwrap_or_else(|| Observed {
                    ok: false,
                    status: None,
                    detail: "internal_error: the probe task ended without a result".into(),
                    latency: Duration::ZERO,
                });
                let described = describe(&s.probe);
                record(&runtime, &probes, &name, &described, observed);
            }
            // Due probes, or a look for a new generation.
            () = tokio::time::sleep_until(wake) => {}
        }
    }
    running.abort_all();
}

/// Brings the schedule in line with `compiled`: new probes run at once, a
/// probe whose target changed starts over, removed probes are forgotten.
fn reconcile(
    compiled: &Compiled,
    scheduled: &mut BTreeMap<String, Scheduled>,
    epochs: &mut u64,
    probes: &Probes,
    metrics: &Metrics,
    now: Instant,
) {
    let wanted: BTreeMap<&String, (&Probe, &Arc<UpstreamRuntime>)> = compiled
        .set
        .upstreams
        .iter()
        .filter_map(|(name, u)| {
            let probe = u.probe.as_ref()?;
            Some((name, (probe, compiled.upstreams.get(name)?)))
        })
        .collect();
    scheduled.retain(|name, _| {
        let keep = wanted.contains_key(name);
        if !keep {
            tracing::info!(upstream = %name, "probe removed");
            forget(probes, metrics, name);
        }
        keep
    });
    for (name, (probe, upstream)) in wanted {
        match scheduled.get_mut(name) {
            Some(s)
                if s.upstream.http == upstream.http
                    && s.probe.method == probe.method
                    && s.probe.path == probe.path =>
            {
                // Same target: keep the result, take the new timing.
                if s.probe.interval != probe.interval {
                    s.next = s.next.min(now + interval(probe));
                }
                s.upstream = Arc::clone(upstream);
                s.probe = probe.clone();
            }
            previous => {
                if previous.is_some() {
                    // Another target: the old result says nothing about it.
                    forget(probes, metrics, name);
                }
                *epochs += 1;
                tracing::debug!(upstream = %name, probe = %describe(probe), "probe scheduled");
                scheduled.insert(
                    name.clone(),
                    Scheduled {
                        upstream: Arc::clone(upstream),
                        probe: probe.clone(),
                        epoch: *epochs,
                        next: now,
                        running: false,
                    },
                );
            }
        }
    }
}

fn forget(probes: &Probes, metrics: &Metrics, upstream: &str) {
    probes.forget(upstream);
    metrics.probe_up.remove(&UpstreamLabels {
        upstream: upstream.to_owned(),
    });
}

fn interval(probe: &Probe) -> Duration {
    probe
        .interval
        .map_or(DEFAULT_PROBE_INTERVAL, |d| d.to_std())
}

fn probe_timeout(probe: &Probe) -> Duration {
    probe.timeout.map_or(DEFAULT_PROBE_TIMEOUT, |d| d.to_std())
}

/// `GET /health`.
fn describe(probe: &Probe) -> String {
    format!("{} {}", probe.method.as_str(), probe.path)
}

fn http_method(method: Method) -> http::Method {
    match method {
        Method::Get => http::Method::GET,
        Method::Head => http::Method::HEAD,
        Method::Post => http::Method::POST,
        Method::Put => http::Method::PUT,
        Method::Patch => http::Method::PATCH,
        Method::Delete => http::Method::DELETE,
    }
}

/// Sends one probe through the upstream's transport.
async fn probe_once(upstream: &UpstreamRuntime, probe: &Probe) -> Observed {
    let request = Rendered {
        method: http_method(probe.method),
        path_and_query: probe.path.clone(),
        headers: http::HeaderMap::new(),
        body: None,
    };
    let extra = http::HeaderMap::new();
    let limit = probe_timeout(probe);
    let started = Instant::now();
    let sent = tokio::time::timeout(limit, upstream.transport.send(&request, &extra)).await;
    let latency = started.elapsed();
    let (ok, status, detail) = match sent {
        Err(_) => (
            false,
            None,
            format!("timeout: no answer within {}", human(limit)),
        ),
        Ok(Err(failure)) => (false, None, format!("{}: {failure}", failure.code())),
        Ok(Ok(reply)) => {
            let s = reply.status;
            (
                s.is_success() || s.is_redirection(),
                Some(s.as_u16()),
                s.to_string(),
            )
        }
    };
    Observed {
        ok,
        status,
        detail: upstream.secrets.scrub_str(&detail),
        latency,
    }
}

/// Keeps a probe's result, sets `probe_up`, and logs a change of verdict once.
fn record(runtime: &Runtime, probes: &Probes, upstream: &str, probe: &str, observed: Observed) {
    let previous = probes.get(upstream);
    let consecutive_failures = if observed.ok {
        0
    } else {
        previous
            .as_ref()
            .filter(|p| !p.ok)
            .map_or(0, |p| p.consecutive_failures)
            .saturating_add(1)
    };
    match (previous.as_ref().map(|p| p.ok), observed.ok) {
        (Some(true) | None, false) => tracing::warn!(
            upstream,
            probe,
            detail = %observed.detail,
            "upstream probe failing"
        ),
        (Some(false), true) => tracing::info!(
            upstream,
            probe,
            failures = previous.as_ref().map_or(0, |p| p.consecutive_failures),
            "upstream probe passing again"
        ),
        (None, true) => tracing::debug!(upstream, probe, "upstream probe passing"),
        _ => {}
    }
    runtime
        .metrics
        .probe_up
        .get_or_create(&UpstreamLabels {
            upstream: upstream.to_owned(),
        })
        .set(i64::from(observed.ok));
    if observed.ok {
        // A passing probe serves as the half-open trial of the upstream's
        // open breakers, so an operation without traffic recovers too.
        for (name, pipeline) in &runtime.compiled().operations {
            if pipeline.upstream.name == upstream && pipeline.breaker.probe_passed() {
                tracing::info!(operation = %name, upstream, "breaker closed by a passing probe");
            }
        }
    }
    probes.record(
        upstream,
        ProbeResult {
            ok: observed.ok,
            at: runtime.clock.now(),
            detail: observed.detail,
            consecutive_failures,
            status: observed.status,
            latency_ms: u64::try_from(observed.latency.as_millis()).unwrap_or(u64::MAX),
        },
    );
}

// ---------------------------------------------------------------------------
// The report

/// A verdict, worst last (so `max` is "worst of").
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// Everything works as configured (the draft's `pass`).
    Healthy,
    /// Calls are answered, but from a fallback, the DLQ or a recovering
    /// breaker (the draft's `warn`).
    Degraded,
    /// Calls fail (the draft's `fail`).
    Unhealthy,
}

impl Status {
    /// `healthy`, `degraded` or `unhealthy`.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Healthy => "healthy",
            Status::Degraded => "degraded",
            Status::Unhealthy => "unhealthy",
        }
    }
}

/// The health of claygate and everything it calls, after the health-check
/// response draft (`application/health+json`).
#[derive(Debug, Clone, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct HealthReport {
    /// The worst status of all checks.
    pub status: Status,
    /// claygate's version.
    pub version: String,
    /// What this is.
    pub description: String,
    /// Which checks are not healthy (absent when all are).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub output: Option<String>,
    /// When the report was made (RFC 3339).
    pub time: String,
    /// Checks keyed `operation:<name>`, `upstream:<name>` (upstreams with a
    /// probe), `orphaned:<name>` (dead letters of an operation the policies
    /// no longer define) and, when it fails, `store:dlq`; each an array of
    /// one object.
    pub checks: BTreeMap<String, Vec<Check>>,
}

impl HealthReport {
    /// A report over `checks`, its status the worst of theirs.
    pub fn new(checks: BTreeMap<String, Vec<Check>>, time: UnixMillis) -> HealthReport {
        let status = checks
            .values()
            .flatten()
            .map(|c| c.status)
            .max()
            .unwrap_or(Status::Healthy);
        let mut output = String::new();
        for worst in [Status::Unhealthy, Status::Degraded] {
            let names: Vec<&str> = checks
                .iter()
                .filter(|(_, c)| c.iter().map(|c| c.status).max() == Some(worst))
                .map(|(k, _)| k.as_str())
                .collect();
            if !names.is_empty() {
                if !output.is_empty() {
                    output.push_str("; ");
                }
                let _ = write!(output, "{}: {}", worst.as_str(), names.join(", "));
            }
        }
        HealthReport {
            status,
            version: env!("CARGO_PKG_VERSION").to_owned(),
            description: "claygate".to_owned(),
            output: (!output.is_empty()).then_some(output),
            time: rfc3339(time),
            checks,
        }
    }

    /// The (first and only) object of check `key`.
    pub fn check(&self, key: &str) -> Option<&Check> {
        self.checks.get(key).and_then(|c| c.first())
    }
}

/// One check of the report.
#[derive(Debug, Clone, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Check {
    /// `operation`, `upstream`, `dlq`, `datastore`, `policies` or `server`.
    pub component_type: String,
    /// This check's verdict.
    pub status: Status,
    /// The main measurement: an operation's breaker state, a probe's latency.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Object)]
    pub observed_value: Option<Value>,
    /// The unit of `observedValue` (`breaker_state`, `ms`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub observed_unit: Option<String>,
    /// The reasons as one sentence (absent when there are none).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub output: Option<String>,
    /// Why this status, one short sentence each.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub reasons: Vec<String>,
    /// When it was observed (RFC 3339).
    pub time: String,
    /// An operation's upstream.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub upstream: Option<String>,
    /// An operation's DLQ size: pending plus parked entries.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dlq_entries: Option<u64>,
    /// When an operation last answered from its fallback, and how stale.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_fallback: Option<LastFallback>,
    /// A probe: its method and path.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub probe: Option<String>,
    /// A probe: failures in a row.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub consecutive_failures: Option<u32>,
}

impl Check {
    /// A check of `component_type` with `status` and `reasons`, at `time`.
    pub fn new(
        component_type: &str,
        status: Status,
        reasons: Vec<String>,
        time: UnixMillis,
    ) -> Check {
        Check {
            component_type: component_type.to_owned(),
            status,
            observed_value: None,
            observed_unit: None,
            output: (!reasons.is_empty()).then(|| reasons.join("; ")),
            reasons,
            time: rfc3339(time),
            upstream: None,
            dlq_entries: None,
            last_fallback: None,
            probe: None,
            consecutive_failures: None,
        }
    }
}

/// An operation's latest fallback answer.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct LastFallback {
    /// When (RFC 3339).
    pub at: String,
    /// `fresh`, `stale`, `very_stale` or `static`.
    pub staleness: String,
}

/// The health of every operation and probed upstream of the serving
/// generation.
pub async fn report(runtime: &Runtime, probes: &Probes) -> HealthReport {
    let compiled = runtime.compiled();
    let now = runtime.clock.now();
    let mut checks = BTreeMap::new();

    // Counted even without a DLQ operation: a reload may have removed the
    // operations whose dead letters are still stored.
    let counts = dlq_counts(runtime).await;
    let dlq = if compiled.operations.values().any(|p| p.dlq.is_some()) {
        let sizes = counts.as_deref().map(dlq_sizes).map_err(Clone::clone);
        if let Err(why) = &sizes {
            checks.insert(
                "store:dlq".to_owned(),
                vec![Check::new(
                    "datastore",
                    Status::Degraded,
                    vec![format!("DLQ sizes unknown: {why}")],
                    now,
                )],
            );
        }
        Some(sizes)
    } else {
        None
    };
    if let Ok(counts) = &counts {
        for (operation, n) in crate::reload::orphaned_dead_letters(counts, &compiled) {
            let mut check = Check::new(
                "dlq",
                Status::Degraded,
                vec![format!(
                    "{n} dead letter(s) (pending or parked) of operation `{operation}`, which the serving policies {}: kept, but nothing redrives them; restore it, or inspect and delete them (GET /v1/dlq?operation={operation})",
                    if compiled.operations.contains_key(&operation) {
                        "define without a `dlq`"
                    } else {
                        "no longer define"
                    }
                )],
                now,
            );
            check.dlq_entries = Some(n);
            checks.insert(format!("orphaned:{operation}"), vec![check]);
        }
    }

    // Upstreams with a probe; the failing ones, with what they said.
    let mut failing: BTreeMap<&str, String> = BTreeMap::new();
    for (name, upstream) in &compiled.set.upstreams {
        let Some(probe) = &upstream.probe else {
            continue;
        };
        let described = describe(probe);
        let used = compiled
            .operations
            .values()
            .any(|p| p.upstream.name == *name);
        let check = match probes.get(name) {
            None => {
                let mut c = Check::new(
                    "upstream",
                    Status::Healthy,
                    vec![format!("probe {described} has not run yet")],
                    now,
                );
                c.probe = Some(described);
                c
            }
            Some(result) => {
                let (status, reasons) = if result.ok {
                    (Status::Healthy, Vec::new())
                } else {
                    let mut why = format!("probe {described} failed: {}", result.detail);
                    if result.consecutive_failures > 1 {
                        let _ = write!(why, " ({} times in a row)", result.consecutive_failures);
                    }
                    failing.insert(name.as_str(), why.clone());
                    if used {
                        (Status::Unhealthy, vec![why])
                    } else {
                        (
                            Status::Degraded,
                            vec![format!("{why}; no operation uses it")],
                        )
                    }
                };
                let mut c = Check::new("upstream", status, reasons, result.at);
                c.observed_value = Some(Value::from(result.latency_ms));
                c.observed_unit = Some("ms".to_owned());
                c.probe = Some(described);
                c.consecutive_failures = Some(result.consecutive_failures);
                c
            }
        };
        checks.insert(format!("upstream:{name}"), vec![check]);
    }

    let threshold = u64::from(
        compiled
            .set
            .health
            .dlq_degraded_above
            .unwrap_or(DEFAULT_DLQ_DEGRADED_ABOVE),
    );
    let window = fallback_window(&compiled.set);
    for (name, pipeline) in &compiled.operations {
        let dlq_size = match (&pipeline.dlq, &dlq) {
            (Some(_), Some(Ok(sizes))) => Some(Ok(sizes.get(name).copied().unwrap_or(0))),
            (Some(_), Some(Err(_))) => Some(Err(())),
            _ => None,
        };
        let check = operation_check(
            runtime,
            pipeline,
            failing
                .get(pipeline.upstream.name.as_str())
                .map(String::as_str),
            dlq_size,
            threshold,
            window,
            now,
        );
        checks.insert(format!("operation:{name}"), vec![check]);
    }
    HealthReport::new(checks, now)
}

/// How long a fallback answer keeps its operation degraded under `set`.
pub fn fallback_window(set: &crate::policy::PolicySet) -> Duration {
    set.health
        .fallback_window
        .map_or(DEFAULT_FALLBACK_WINDOW, |d| d.to_std())
}

/// Pending plus parked dead letters per operation.
fn dlq_sizes(counts: &[DlqCount]) -> HashMap<String, u64> {
    let mut sizes = HashMap::new();
    for c in counts {
        if matches!(c.state, DlqState::Pending | DlqState::Parked) {
            *sizes.entry(c.operation.clone()).or_insert(0) += c.count;
        }
    }
    sizes
}

async fn dlq_counts(runtime: &Runtime) -> Result<Vec<DlqCount>, String> {
    match tokio::time::timeout(STORE_TIMEOUT, runtime.store.dlq_counts()).await {
        Ok(Ok(counts)) => Ok(counts),
        Ok(Err(e)) => Err(format!("the store failed: {e}")),
        Err(_) => Err(format!(
            "the store did not answer within {}",
            human(STORE_TIMEOUT)
        )),
    }
}

/// The verdict on one operation.
fn operation_check(
    runtime: &Runtime,
    pipeline: &Pipeline,
    probe_failure: Option<&str>,
    dlq_size: Option<Result<u64, ()>>,
    dlq_threshold: u64,
    fallback_window: Duration,
    now: UnixMillis,
) -> Check {
    let mut status = Status::Healthy;
    let mut reasons = Vec::new();
    let mut worsen = |to: Status, why: String| {
        status = status.max(to);
        reasons.push(why);
    };
    let upstream = pipeline.upstream.name.as_str();
    if let Some(failure) = probe_failure {
        worsen(
            Status::Unhealthy,
            format!("upstream `{upstream}` {failure}"),
        );
    }

    let breaker = pipeline.breaker.snapshot();
    let since = rfc3339(system_millis(breaker.since));
    let serves = if pipeline.fallback.is_some() {
        Some("serving from fallback")
    } else if pipeline.dlq.is_some() {
        Some("calls are queued in the DLQ for redrive")
    } else {
        None
    };
    let next_trial = match breaker.retry_after_ms {
        Some(0) => " (a trial call is due)".to_owned(),
        Some(ms) => format!(" (next trial in {})", human(Duration::from_millis(ms))),
        None => String::new(),
    };
    match (breaker.state, breaker.mode) {
        (BreakerState::Closed, _) => {}
        // A note: the verdict stays as it is.
        (state, BreakerMode::MetricsOnly) => worsen(
            Status::Healthy,
            format!(
                "breaker would be {} since {since} (metrics_only: calls still pass)",
                state.as_str().replace('_', " ")
            ),
        ),
        (BreakerState::Open, BreakerMode::Enforce) => match serves {
            Some(s) => worsen(Status::Degraded, format!("breaker open since {since}, {s}")),
            None => worsen(
                Status::Unhealthy,
                format!("breaker open since {since}, calls fail fast{next_trial}"),
            ),
        },
        (BreakerState::ForcedOpen, BreakerMode::Enforce) => match serves {
            Some(s) => worsen(
                Status::Degraded,
                format!("breaker forced open by an admin since {since}, {s}"),
            ),
            None => worsen(
                Status::Unhealthy,
                format!("breaker forced open by an admin since {since}, calls fail fast"),
            ),
        },
        (BreakerState::HalfOpen, BreakerMode::Enforce) => worsen(
            Status::Degraded,
            match serves {
                Some(s) => {
                    format!("breaker half-open since {since}, trial calls test the upstream, {s}")
                }
                None => format!(
                    "breaker half-open since {since}, trial calls test the upstream and other calls fail fast"
                ),
            },
        ),
        (BreakerState::ForcedClosed, BreakerMode::Enforce) => worsen(
            Status::Healthy,
            format!("breaker forced closed by an admin since {since}: failures cannot open it"),
        ),
    }

    let dlq_entries = match dlq_size {
        Some(Ok(n)) => {
            if n > dlq_threshold {
                worsen(
                    Status::Degraded,
                    format!("DLQ holds {n} pending or parked entries (more than {dlq_threshold})"),
                );
            }
            Some(n)
        }
        Some(Err(())) => {
            worsen(
                Status::Degraded,
                "DLQ size unknown: the store did not answer".to_owned(),
            );
            None
        }
        None => None,
    };

    let last_fallback = runtime.last_fallback(&pipeline.name);
    if let Some((at, staleness)) = last_fallback {
        let ago = Duration::from_millis(u64::try_from(now.saturating_sub(at)).unwrap_or(0));
        if ago <= fallback_window {
            worsen(
                Status::Degraded,
                format!(
                    "answered from its fallback ({}) {} ago",
                    staleness.as_str().replace('_', " "),
                    human(ago)
                ),
            );
        }
    }

    let mut check = Check::new("operation", status, reasons, now);
    check.observed_value = Some(Value::from(breaker.state.as_str()));
    check.observed_unit = Some("breaker_state".to_owned());
    check.upstream = Some(upstream.to_owned());
    check.dlq_entries = dlq_entries;
    check.last_fallback = last_fallback.map(|(at, staleness)| LastFallback {
        at: rfc3339(at),
        staleness: staleness.as_str().to_owned(),
    });
    check
}

// ---------------------------------------------------------------------------
// Metrics

/// Serializes refresh-and-encode, so one scrape's refresh cannot clear the
/// gauges another scrape is encoding.
static SCRAPE: Mutex<()> = Mutex::new(());

/// The metrics in OpenMetrics text, with the state gauges (breakers,
/// bulkheads, DLQ sizes, probes) refreshed from the serving generation
/// first. Gauge families are cleared before they are filled, so operations
/// and upstreams removed by a reload disappear. When the store does not
/// answer, the DLQ gauges keep their last values.
pub async fn encode_metrics(runtime: &Runtime, probes: &Probes) -> String {
    let compiled = runtime.compiled();
    // Counted even without a DLQ operation: dead letters of operations a
    // reload removed keep their gauges.
    let counts = match dlq_counts(runtime).await {
        Ok(counts) => Some(counts),
        Err(why) => {
            tracing::warn!(error = %why, "DLQ gauges not refreshed");
            None
        }
    };
    let _one_at_a_time = SCRAPE.lock().unwrap_or_else(PoisonError::into_inner);
    refresh_gauges(&runtime.metrics, &compiled, probes, counts.as_deref());
    runtime.metrics.encode()
}

/// Sets the state gauges from `compiled`; `dlq` `None` leaves the DLQ
/// gauges as they were.
pub fn refresh_gauges(
    metrics: &Metrics,
    compiled: &Compiled,
    probes: &Probes,
    dlq: Option<&[DlqCount]>,
) {
    metrics.breaker_state.clear();
    for (name, pipeline) in &compiled.operations {
        let state = pipeline.breaker.state();
        for s in BREAKER_STATES {
            metrics
                .breaker_state
                .get_or_create(&StateLabels {
                    operation: name.clone(),
                    state: s.as_str().to_owned(),
                })
                .set(i64::from(s == state));
        }
    }

    metrics.bulkhead_in_use.clear();
    metrics.bulkhead_queued.clear();
    for (name, upstream) in &compiled.upstreams {
        let Some(bulkhead) = &upstream.bulkhead else {
            continue;
        };
        for (priority, class) in bulkhead.snapshot().classes {
            let labels = ClassLabels {
                upstream: name.clone(),
                priority: priority.as_str().to_owned(),
            };
            metrics
                .bulkhead_in_use
                .get_or_create(&labels)
                .set(i64::from(class.in_use));
            metrics
                .bulkhead_queued
                .get_or_create(&labels)
                .set(i64::from(class.queued));
        }
    }

    if let Some(counts) = dlq {
        metrics.dlq_entries.clear();
        let mut by: HashMap<(&str, DlqState), u64> = HashMap::new();
        for c in counts {
            *by.entry((c.operation.as_str(), c.state)).or_insert(0) += c.count;
        }
        // Every operation with a DLQ, and every operation with entries,
        // defined or not (a reload may have removed it: its entries stay).
        let names: std::collections::BTreeSet<&str> = compiled
            .operations
            .iter()
            .filter(|(_, p)| p.dlq.is_some())
            .map(|(name, _)| name.as_str())
            .chain(
                counts
                    .iter()
                    .filter(|c| c.count > 0)
                    .map(|c| c.operation.as_str()),
            )
            .collect();
        for name in names {
            for state in DLQ_STATES {
                let n = by.get(&(name, state)).copied().unwrap_or(0);
                metrics
                    .dlq_entries
                    .get_or_create(&StateLabels {
                        operation: name.to_owned(),
                        state: state.as_str().to_owned(),
                    })
                    .set(i64::try_from(n).unwrap_or(i64::MAX));
            }
        }
    }

    metrics.probe_up.clear();
    for (name, upstream) in &compiled.set.upstreams {
        if upstream.probe.is_none() {
            continue;
        }
        if let Some(result) = probes.get(name) {
            metrics
                .probe_up
                .get_or_create(&UpstreamLabels {
                    upstream: name.clone(),
                })
                .set(i64::from(result.ok));
        }
    }
}

// ---------------------------------------------------------------------------
// Time texts

/// Unix milliseconds of a wall-clock time.
fn system_millis(t: SystemTime) -> UnixMillis {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_millis()).unwrap_or(i64::MAX),
        Err(e) => -i64::try_from(e.duration().as_millis()).unwrap_or(i64::MAX),
    }
}

/// `2026-12-01T10:00:00.123Z`.
pub fn rfc3339(at: UnixMillis) -> String {
    let secs = at.div_euclid(1000);
    let millis = at.rem_euclid(1000);
    let (year, month, day) = civil_from_days(secs.div_euclid(86_400));
    let of_day = secs.rem_euclid(86_400);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{millis:03}Z",
        of_day / 3600,
        of_day % 3600 / 60,
        of_day % 60
    )
}

/// Year, month and day of a count of days since 1970-01-01 (Howard
/// Hinnant's `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// `250ms`, `12s`, `3m20s`, `2h5m`.
fn human(d: Duration) -> String {
    let ms = d.as_millis();
    if ms < 1000 {
        return format!("{ms}ms");
    }
    let s = d.as_secs();
    match s {
        0..60 => format!("{s}s"),
        60..3600 if s.is_multiple_of(60) => format!("{}m", s / 60),
        60..3600 => format!("{}m{}s", s / 60, s % 60),
        _ if s % 3600 / 60 == 0 => format!("{}h", s / 3600),
        _ => format!("{}h{}m", s / 3600, s % 3600 / 60),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU16, AtomicUsize, Ordering};

    use bytes::Bytes;
    use futures_util::future::BoxFuture;
    use http::{HeaderMap, StatusCode};

    use super::*;
    use crate::clock::Clock;
    use crate::compile::{CompileOptions, compile_with};
    use crate::pipeline::http::{HttpConfig, Transport};
    use crate::pipeline::{Failure, Reply};
    use crate::policy::{LoadOptions, UnsetEnv, load_str};
    use crate::store::sqlite::SqliteStore;
    use crate::store::{NewDeadLetter, Store};

    /// Answers every request with `status` (0: refuse the connection), and
    /// counts the requests and what they carried.
    #[derive(Default)]
    struct Fake {
        status: AtomicU16,
        hits: AtomicUsize,
        seen: Mutex<Vec<(String, String)>>,
    }

    struct FakeTransport {
        fake: Arc<Fake>,
        http: HttpConfig,
    }

    impl Transport for FakeTransport {
        fn send<'a>(
            &'a self,
            request: &'a Rendered,
            _extra: &'a HeaderMap,
        ) -> BoxFuture<'a, Result<Reply, Failure>> {
            Box::pin(async move {
                self.fake.hits.fetch_add(1, Ordering::SeqCst);
                let auth = self
                    .http
                    .headers
                    .get("authorization")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default()
                    .to_owned();
                self.fake
                    .seen
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .push((
                        format!("{} {}", request.method, request.path_and_query),
                        auth,
                    ));
                match self.fake.status.load(Ordering::SeqCst) {
                    // A broken upstream that echoes the credential it was sent.
                    0 => Err(Failure::Connect(format!(
                        "refused (sent {})",
                        self.http
                            .headers
                            .get("authorization")
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or_default()
                    ))),
                    s => Ok(Reply {
                        status: StatusCode::from_u16(s).unwrap_or(StatusCode::OK),
                        headers: HeaderMap::new(),
                        body: Bytes::from_static(b"{}"),
                    }),
                }
            })
        }
    }

    const UPSTREAM: &str = "version: 1
upstreams:
  clay:
    base_url: \"http://127.0.0.1:9\"
    headers: { Authorization: \"Bearer sekrit-token\" }
    probe: { path: /health, interval: 100ms, timeout: 1s }
    priorities:
      normal: { concurrency: 2, queue: 10, queue_timeout: 1s }
  other:
    base_url: \"http://127.0.0.1:9\"
timeouts: { request: 2s }
";

    const OPS: &str = "health: { dlq_degraded_above: 2 }
operations:
  plain:
    upstream: clay
    request: { method: GET, path: /v1/plain }
    retry: { max_attempts: 1 }
    breaker: { volume_threshold: 2, error_threshold_percentage: 50, reset_timeout: 30s }
  cached:
    upstream: other
    request: { method: GET, path: /v1/cached }
    retry: { max_attempts: 1 }
    fallback: { static: { known: false } }
  shadow:
    upstream: other
    request: { method: GET, path: /v1/shadow }
    retry: { max_attempts: 1 }
    breaker: { mode: metrics_only }
  queued:
    upstream: other
    request: { method: POST, path: /v1/rows, body: { id: \"{{ params.id }}\" } }
    params_schema: { type: object, properties: { id: { type: string } } }
    retry: { max_attempts: 1 }
    idempotency: { key: [id] }
    dlq: { max_attempts: 3, backoff: { initial: 1h, max: 2h } }
";

    fn compile(text: &str, fake: &Arc<Fake>, previous: Option<&Compiled>) -> Compiled {
        let loaded = load_str(
            "test.yaml",
            text,
            LoadOptions {
                unset_env: UnsetEnv::Ignore,
            },
        );
        let Some(set) = loaded.set else {
            panic!("test policy must be valid: {:#?}", loaded.diagnostics);
        };
        let fake = Arc::clone(fake);
        let options = CompileOptions {
            env: Box::new(|_| None),
            transport: Some(Box::new(move |http: &HttpConfig| {
                Arc::new(FakeTransport {
                    fake: Arc::clone(&fake),
                    http: http.clone(),
                }) as Arc<dyn Transport>
            })),
        };
        match compile_with(&set, previous, &options) {
            Ok(c) => c,
            Err(e) => panic!("compile failed: {e:?}"),
        }
    }

    struct Rig {
        runtime: Arc<Runtime>,
        fake: Arc<Fake>,
        store: Arc<SqliteStore>,
        _dir: tempfile::TempDir,
    }

    async fn rig(text: &str) -> Rig {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = Arc::new(SqliteStore::open(dir.path()).await.expect("store opens"));
        let fake = Arc::new(Fake::default());
        fake.status.store(200, Ordering::SeqCst);
        let compiled = compile(text, &fake, None);
        let runtime = Runtime::new(compiled, Arc::clone(&store) as Arc<dyn Store>, Clock::new());
        Rig {
            runtime,
            fake,
            store,
            _dir: dir,
        }
    }

    fn op<'a>(report: &'a HealthReport, name: &str) -> &'a Check {
        report
            .check(&format!("operation:{name}"))
            .unwrap_or_else(|| panic!("no check of {name}: {report:#?}"))
    }

    fn failed(ok: bool, detail: &str, n: u32) -> ProbeResult {
        ProbeResult {
            ok,
            at: 0,
            detail: detail.to_owned(),
            consecutive_failures: n,
            status: None,
            latency_ms: 3,
        }
    }

    #[test]
    fn timestamps_are_rfc3339_utc() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(951_782_400_123), "2000-02-29T00:00:00.123Z");
        assert_eq!(rfc3339(1_798_761_599_999), "2026-12-31T23:59:59.999Z");
        assert_eq!(rfc3339(-1), "1969-12-31T23:59:59.999Z");
    }

    #[test]
    fn durations_read_short() {
        assert_eq!(human(Duration::from_millis(250)), "250ms");
        assert_eq!(human(Duration::from_secs(12)), "12s");
        assert_eq!(human(Duration::from_secs(200)), "3m20s");
        assert_eq!(human(Duration::from_secs(120)), "2m");
        assert_eq!(human(Duration::from_secs(7500)), "2h5m");
        assert_eq!(human(Duration::from_secs(7200)), "2h");
    }

    #[test]
    fn statuses_order_worst_last() {
        assert!(Status::Healthy < Status::Degraded && Status::Degraded < Status::Unhealthy);
        let mut checks = BTreeMap::new();
        checks.insert(
            "operation:a".into(),
            vec![Check::new("operation", Status::Degraded, vec![], 0)],
        );
        checks.insert(
            "operation:b".into(),
            vec![Check::new("operation", Status::Healthy, vec![], 0)],
        );
        let r = HealthReport::new(checks.clone(), 0);
        assert_eq!(r.status, Status::Degraded);
        assert_eq!(r.output.as_deref(), Some("degraded: operation:a"));
        checks.insert(
            "upstream:x".into(),
            vec![Check::new("upstream", Status::Unhealthy, vec![], 0)],
        );
        let r = HealthReport::new(checks, 0);
        assert_eq!(r.status, Status::Unhealthy);
        assert_eq!(
            r.output.as_deref(),
            Some("unhealthy: upstream:x; degraded: operation:a")
        );
        assert_eq!(
            HealthReport::new(BTreeMap::new(), 0).status,
            Status::Healthy
        );
    }

    /// Round 2, items 3 and 4: a probe's detail is scrubbed of what the
    /// environment put into the upstream (its URL's query, its headers), the
    /// URL's password and the `Authorization` value, and of nothing else.
    #[tokio::test]
    async fn secrets_are_scrubbed_from_probe_texts() {
        const KEY: &str = "query-key-0123456789";
        const TOKEN: &str = "sekrit-token";
        let text = "version: 1
upstreams:
  clay:
    base_url: \"https://bob:hunter22@api.example.com/v1?api_key=${env:T_KEY}\"
    headers: { Authorization: \"Bearer ${env:T_TOKEN}\", X-Api-Version: \"2024-01-01\" }
    probe: { method: GET, path: /ping }
operations:
  lookup:
    upstream: clay
    request: { method: GET, path: /v1/lookup }
";
        let loaded = load_str(
            "secrets.yaml",
            text,
            LoadOptions {
                unset_env: UnsetEnv::Ignore,
            },
        );
        let set = loaded
            .set
            .unwrap_or_else(|| panic!("{:#?}", loaded.diagnostics));
        struct Echo;
        impl Transport for Echo {
            fn send<'a>(
                &'a self,
                _: &'a Rendered,
                _: &'a HeaderMap,
            ) -> BoxFuture<'a, Result<Reply, Failure>> {
                Box::pin(async {
                    Err(Failure::Connect(format!(
                        "refused: https://bob:hunter22@api.example.com/v1/ping?api_key={KEY} \
                         with Bearer {TOKEN} (scheme Bearer), version 2024-01-01, user bob"
                    )))
                })
            }
        }
        let options = CompileOptions {
            env: Box::new(|name| match name {
                "T_KEY" => Some(KEY.into()),
                "T_TOKEN" => Some(TOKEN.into()),
                _ => None,
            }),
            transport: Some(Box::new(|_: &HttpConfig| {
                Arc::new(Echo) as Arc<dyn Transport>
            })),
        };
        let compiled = compile_with(&set, None, &options).expect("compiles");
        let upstream = &compiled.upstreams["clay"];
        let probe = set.upstreams["clay"].probe.clone().expect("a probe");
        let seen = probe_once(upstream, &probe).await;
        let detail = seen.detail;
        for secret in [KEY, TOKEN, "hunter22"] {
            assert!(!detail.contains(secret), "{detail}");
        }
        // Policy text and short values are left alone.
        for kept in ["2024-01-01", "scheme Bearer", "user bob", "api_key="] {
            assert!(detail.contains(kept), "`{kept}` kept: {detail}");
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_quiet_generation_is_healthy() {
        let rig = rig(&format!("{UPSTREAM}{OPS}")).await;
        let probes = Probes::default();
        let r = report(&rig.runtime, &probes).await;
        assert_eq!(r.status, Status::Healthy, "{r:#?}");
        assert_eq!(r.output, None);
        for name in ["plain", "cached", "shadow", "queued"] {
            let c = op(&r, name);
            assert_eq!(c.status, Status::Healthy, "{name}: {c:#?}");
            assert_eq!(c.observed_value, Some(Value::from("closed")));
        }
        assert_eq!(op(&r, "queued").dlq_entries, Some(0));
        assert_eq!(op(&r, "plain").dlq_entries, None);
        let up = r
            .check("upstream:clay")
            .expect("probed upstream has a check");
        assert_eq!(up.status, Status::Healthy);
        assert_eq!(
            up.output.as_deref(),
            Some("probe GET /health has not run yet")
        );
        assert!(
            r.check("upstream:other").is_none(),
            "unprobed upstreams have no check"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn open_breakers_are_unhealthy_without_a_fallback_and_degraded_with_one() {
        let rig = rig(&format!("{UPSTREAM}{OPS}")).await;
        let probes = Probes::default();
        let compiled = rig.runtime.compiled();
        compiled.operations["plain"].breaker.force_open();
        compiled.operations["cached"].breaker.force_open();
        compiled.operations["queued"].breaker.force_open();
        compiled.operations["shadow"].breaker.force_open();
        let r = report(&rig.runtime, &probes).await;
        assert_eq!(r.status, Status::Unhealthy);
        let plain = op(&r, "plain");
        assert_eq!(plain.status, Status::Unhealthy);
        assert_eq!(plain.observed_value, Some(Value::from("forced_open")));
        assert!(
            plain.reasons[0].starts_with("breaker forced open by an admin since "),
            "{plain:#?}"
        );
        assert!(plain.reasons[0].ends_with("calls fail fast"), "{plain:#?}");
        let cached = op(&r, "cached");
        assert_eq!(cached.status, Status::Degraded);
        assert!(
            cached.reasons[0].ends_with(", serving from fallback"),
            "{cached:#?}"
        );
        let queued = op(&r, "queued");
        assert_eq!(
            queued.status,
            Status::Degraded,
            "a DLQ is graceful degradation"
        );
        assert!(
            queued.reasons[0].contains("queued in the DLQ"),
            "{queued:#?}"
        );
        let shadow = op(&r, "shadow");
        assert_eq!(shadow.status, Status::Healthy, "metrics_only never rejects");
        assert!(shadow.reasons[0].contains("metrics_only"), "{shadow:#?}");
        assert_eq!(
            r.output.as_deref(),
            Some("unhealthy: operation:plain; degraded: operation:cached, operation:queued")
        );

        // Opened by failures: the text says when the next trial is.
        compiled.operations["plain"].breaker.reset();
        rig.fake.status.store(503, Ordering::SeqCst);
        for _ in 0..2 {
            let _ = rig.runtime.invoke("plain", Default::default()).await;
        }
        let r = report(&rig.runtime, &probes).await;
        let plain = op(&r, "plain");
        assert_eq!(
            plain.observed_value,
            Some(Value::from("open")),
            "{plain:#?}"
        );
        assert!(
            plain.reasons[0].contains("calls fail fast (next trial in "),
            "{plain:#?}"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn fallback_answers_degrade_for_a_minute() {
        let rig = rig(&format!("{UPSTREAM}{OPS}")).await;
        let probes = Probes::default();
        rig.fake.status.store(503, Ordering::SeqCst);
        let invoked = rig.runtime.invoke("cached", Default::default()).await;
        assert_eq!(invoked.answer.status(), "fallback");
        let r = report(&rig.runtime, &probes).await;
        let cached = op(&r, "cached");
        assert_eq!(cached.status, Status::Degraded);
        assert_eq!(cached.observed_value, Some(Value::from("closed")));
        assert!(
            cached.reasons[0].starts_with("answered from its fallback (static) "),
            "{cached:#?}"
        );
        assert_eq!(
            cached.last_fallback.as_ref().map(|f| f.staleness.as_str()),
            Some("static")
        );
    }

    /// Runs `work` with the paused clock's auto-advance held off, so a
    /// store answering on another thread does not move the clock.
    async fn held<F: Future>(work: F) -> F::Output {
        let (done, wait) = std::sync::mpsc::channel::<()>();
        let blocker = tokio::task::spawn_blocking(move || {
            let _ = wait.recv();
        });
        let out = work.await;
        drop(done);
        let _ = blocker.await;
        out
    }

    #[tokio::test]
    async fn the_fallback_window_is_policy() {
        let text = format!(
            "{UPSTREAM}health: {{ fallback_window: 3s }}
operations:
  cached:
    upstream: other
    request: {{ method: GET, path: /v1/cached }}
    retry: {{ max_attempts: 1 }}
    fallback: {{ static: {{ known: false }} }}
"
        );
        let rig = rig(&text).await;
        assert_eq!(
            fallback_window(&rig.runtime.compiled().set),
            Duration::from_secs(3)
        );
        let probes = Probes::default();
        rig.fake.status.store(503, Ordering::SeqCst);
        let invoked = rig.runtime.invoke("cached", Default::default()).await;
        assert_eq!(invoked.answer.status(), "fallback");
        // From here the clock moves only when the test says.
        tokio::time::pause();
        let r = held(report(&rig.runtime, &probes)).await;
        assert_eq!(op(&r, "cached").status, Status::Degraded, "{r:#?}");
        tokio::time::advance(Duration::from_millis(3100)).await;
        let r = held(report(&rig.runtime, &probes)).await;
        let cached = op(&r, "cached");
        assert_eq!(
            cached.status,
            Status::Healthy,
            "3s after its fallback answer, with a 3s window: {cached:#?}"
        );
        assert_eq!(
            cached.last_fallback.as_ref().map(|f| f.staleness.as_str()),
            Some("static"),
            "the last fallback is still shown"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failing_probe_makes_its_operations_unhealthy() {
        let rig = rig(&format!("{UPSTREAM}{OPS}")).await;
        let probes = Probes::default();
        probes.record("clay", failed(false, "503 Service Unavailable", 3));
        let r = report(&rig.runtime, &probes).await;
        assert_eq!(r.status, Status::Unhealthy);
        let up = r.check("upstream:clay").expect("upstream check");
        assert_eq!(up.status, Status::Unhealthy);
        assert_eq!(
            up.reasons,
            ["probe GET /health failed: 503 Service Unavailable (3 times in a row)"]
        );
        assert_eq!(up.observed_value, Some(Value::from(3)));
        let plain = op(&r, "plain");
        assert_eq!(plain.status, Status::Unhealthy);
        assert_eq!(
            plain.reasons,
            [
                "upstream `clay` probe GET /health failed: 503 Service Unavailable (3 times in a row)"
            ]
        );
        assert_eq!(op(&r, "cached").status, Status::Healthy, "another upstream");
        probes.record("clay", failed(true, "200 OK", 0));
        let r = report(&rig.runtime, &probes).await;
        assert_eq!(r.status, Status::Healthy, "{r:#?}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_dlq_above_its_threshold_degrades() {
        let rig = rig(&format!("{UPSTREAM}{OPS}")).await;
        let probes = Probes::default();
        let entry = |n: i64| NewDeadLetter {
            operation: "queued".into(),
            params: serde_json::json!({"id": n.to_string()}),
            idempotency_key: None,
            priority: None,
            error_code: "upstream_status".into(),
            error_message: "upstream answered 503".into(),
            call_attempts: 1,
            first_attempt_at: 0,
            last_attempt_at: 0,
            next_attempt_at: i64::MAX / 2,
        };
        for n in 0..2 {
            rig.store.dlq_insert(entry(n)).await.expect("insert");
        }
        let r = report(&rig.runtime, &probes).await;
        assert_eq!(
            op(&r, "queued").status,
            Status::Healthy,
            "2 is not more than 2"
        );
        assert_eq!(op(&r, "queued").dlq_entries, Some(2));
        rig.store.dlq_insert(entry(3)).await.expect("insert");
        let r = report(&rig.runtime, &probes).await;
        let queued = op(&r, "queued");
        assert_eq!(queued.status, Status::Degraded);
        assert_eq!(
            queued.reasons,
            ["DLQ holds 3 pending or parked entries (more than 2)"]
        );
        assert_eq!(r.status, Status::Degraded);

        // A store that does not answer: degraded, and said so.
        rig.store.close().await.expect("close");
        let r = report(&rig.runtime, &probes).await;
        assert_eq!(op(&r, "queued").status, Status::Degraded);
        let store = r.check("store:dlq").expect("a store check");
        assert_eq!(store.status, Status::Degraded);
        assert!(
            store.reasons[0].starts_with("DLQ sizes unknown: the store failed"),
            "{store:#?}"
        );
    }

    /// Waits (bounded) until `probes` holds a result for `upstream` that `f` accepts.
    async fn until(
        probes: &Probes,
        upstream: &str,
        f: impl Fn(Option<&ProbeResult>) -> bool,
    ) -> Option<ProbeResult> {
        for _ in 0..200 {
            let r = probes.get(upstream);
            if f(r.as_ref()) {
                return r;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!(
            "probe of {upstream} never got there; last: {:?}",
            probes.get(upstream)
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_runner_probes_on_the_interval_follows_reloads_and_stops() {
        let rig = rig(&format!("{UPSTREAM}{OPS}")).await;
        let probes = Arc::new(Probes::default());
        let (stop, stopped) = watch::channel(false);
        let handle = spawn_probes(Arc::clone(&rig.runtime), Arc::clone(&probes), stopped);

        let passed = until(&probes, "clay", |r| r.is_some())
            .await
            .expect("a result");
        assert!(
            passed.ok && passed.status == Some(200) && passed.detail == "200 OK",
            "{passed:?}"
        );
        {
            let seen = rig.fake.seen.lock().unwrap_or_else(PoisonError::into_inner);
            assert_eq!(
                seen[0],
                ("GET /health".to_owned(), "Bearer sekrit-token".to_owned())
            );
        }
        let up = |m: &Metrics| {
            m.probe_up
                .get(&UpstreamLabels {
                    upstream: "clay".into(),
                })
                .map(|g| g.get())
        };
        assert_eq!(up(&rig.runtime.metrics), Some(1));

        // Failing: counted in a row; the echoed credential never reaches the text.
        rig.fake.status.store(0, Ordering::SeqCst);
        let failing = until(&probes, "clay", |r| {
            r.is_some_and(|r| r.consecutive_failures >= 2)
        })
        .await;
        let failing = failing.expect("a result");
        assert!(!failing.ok);
        assert!(failing.detail.starts_with("connect_error: "), "{failing:?}");
        assert!(!failing.detail.contains("sekrit-token"), "{failing:?}");
        assert_eq!(up(&rig.runtime.metrics), Some(0));
        rig.fake.status.store(302, Ordering::SeqCst);
        let back = until(&probes, "clay", |r| r.is_some_and(|r| r.ok))
            .await
            .expect("a result");
        assert_eq!(back.consecutive_failures, 0, "a redirect passes");

        // Probes run on the interval, not in a busy loop.
        // Bounds from the time that really passed: a loaded machine may
        // oversleep, or starve the probe task for a while.
        let before = rig.fake.hits.load(Ordering::SeqCst);
        let started = tokio::time::Instant::now();
        tokio::time::sleep(Duration::from_millis(550)).await;
        let ran = rig.fake.hits.load(Ordering::SeqCst) - before;
        let elapsed = started.elapsed();
        let most = elapsed.as_millis() / 100 + 2;
        assert!(
            ran >= 1 && ran as u128 <= most,
            "{ran} probes in {elapsed:?} at a 100ms interval"
        );

        // A reload without the probe removes it.
        let without = format!("{UPSTREAM}{OPS}").replace(
            "    probe: { path: /health, interval: 100ms, timeout: 1s }\n",
            "",
        );
        let next = compile(&without, &rig.fake, Some(&rig.runtime.compiled()));
        rig.runtime.swap(next);
        until(&probes, "clay", |r| r.is_none()).await;
        assert_eq!(up(&rig.runtime.metrics), None);
        let r = report(&rig.runtime, &probes).await;
        assert!(r.check("upstream:clay").is_none());

        stop.send_replace(true);
        tokio::time::timeout(Duration::from_secs(2), handle)
            .await
            .expect("the runner stops")
            .expect("without panicking");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_probe_past_its_timeout_fails() {
        struct Hang;
        impl Transport for Hang {
            fn send<'a>(
                &'a self,
                _: &'a Rendered,
                _: &'a HeaderMap,
            ) -> BoxFuture<'a, Result<Reply, Failure>> {
                Box::pin(std::future::pending())
            }
        }
        let upstream = UpstreamRuntime {
            name: "slow".into(),
            http: HttpConfig {
                base_url: url::Url::parse("http://127.0.0.1:9").expect("url"),
                headers: HeaderMap::new(),
                connect_timeout: Duration::from_secs(1),
                max_response_bytes: 1024,
            },
            secrets: crate::scrub::Secrets::default(),
            transport: Arc::new(Hang),
            bulkhead: None,
            limiter: None,
        };
        let probe = Probe {
            method: Method::Head,
            path: "/ping".into(),
            interval: None,
            timeout: Some(crate::policy::model::Duration::from_millis(50)),
        };
        let seen = probe_once(&upstream, &probe).await;
        assert!(!seen.ok);
        assert_eq!(seen.detail, "timeout: no answer within 50ms");
        assert!(seen.latency >= Duration::from_millis(50));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn gauges_follow_the_serving_generation() {
        let rig = rig(&format!("{UPSTREAM}{OPS}")).await;
        let probes = Probes::default();
        rig.runtime.compiled().operations["plain"]
            .breaker
            .force_open();
        probes.record("clay", failed(false, "503 Service Unavailable", 1));
        let text = encode_metrics(&rig.runtime, &probes).await;
        for line in [
            "claygate_breaker_state{operation=\"plain\",state=\"forced_open\"} 1",
            "claygate_breaker_state{operation=\"plain\",state=\"closed\"} 0",
            "claygate_breaker_state{operation=\"cached\",state=\"closed\"} 1",
            "claygate_bulkhead_in_use{upstream=\"clay\",priority=\"normal\"} 0",
            "claygate_bulkhead_queued{upstream=\"clay\",priority=\"normal\"} 0",
            "claygate_dlq_entries{operation=\"queued\",state=\"pending\"} 0",
            "claygate_probe_up{upstream=\"clay\"} 0",
        ] {
            assert!(text.contains(line), "missing `{line}` in\n{text}");
        }
        assert!(
            !text.contains("claygate_dlq_entries{operation=\"plain\""),
            "no DLQ, no series"
        );

        let fewer = format!("{UPSTREAM}{OPS}").replace("  shadow:\n", "  renamed:\n");
        let next = compile(&fewer, &rig.fake, Some(&rig.runtime.compiled()));
        rig.runtime.swap(next);
        let text = encode_metrics(&rig.runtime, &probes).await;
        assert!(!text.contains("operation=\"shadow\""), "{text}");
        assert!(
            text.contains("claygate_breaker_state{operation=\"renamed\",state=\"closed\"} 1"),
            "{text}"
        );
    }
}
