//! Scripted demo scenarios; today `outage`.
//!
//! # `outage`
//!
//! A narrated walk of about 25 seconds (under ten with [`Timings::quick`]),
//! on a copy of the policies paced for it ([`super::pace`]: breakers try
//! again after seconds, not 30s; the probe runs every second; an operation
//! counts as degraded for seconds after a fallback answer), so that the
//! recovery happens by the policies themselves:
//!
//! 1. **normal**: mixed traffic (`lookup_company`, `enrich_person`,
//!    `enrich_company`, `push_row`) fills the fallback caches and delivers rows;
//! 2. **outage**: the demo first shortens the cache windows in its copy (a
//!    hot reload through the watcher, so answers age within the demo), then
//!    the fake Clay refuses connections; traffic goes on until the breakers
//!    open, then calls fail fast: reads are served from the fallback cache
//!    (fresh, then stale, then very stale, with the age they really had) or
//!    the static value, writes are dead-lettered (`queued`), the probe
//!    fails and health goes unhealthy;
//! 3. **recovery**: the fake is back; each breaker's reset timeout runs out,
//!    and a trial call or a passing probe closes it (a breaker still open
//!    after [`Timings::natural_reset_wait`] would be reset by the demo, and
//!    it would say so);
//! 4. **redrive**: the redrive worker may already have delivered some dead
//!    letters on their own schedule (the bundled policy's first back-off is
//!    up to 30s, jittered); the rest are requeued now, as
//!    `POST /v1/dlq/replay` does, and the worker delivers them;
//! 5. **all clear**: client repeats of dead-lettered rows are answered from
//!    the idempotency record, and health is read until healthy.
//!
//! Every number of the [`DemoSummary`] comes from a real counter: the
//! answers received, the store's dead letters, the breakers' transitions,
//! the health report and the fake's own records. Nothing is assumed.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use serde::Serialize;
use serde_json::{Value, json};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::fake_clay::{FakeClay, FakeStats, Faults, Outage};
use crate::health::{HealthReport, Probes, Status};
use crate::pipeline::Failure;
use crate::pipeline::breaker::BreakerState;
use crate::runtime::{Answer, InvokeError, InvokeRequest, Invoked, Runtime};
use crate::store::{DlqFilter, DlqState};

/// The scenarios [`run`] knows.
pub const SCENARIOS: [&str; 1] = ["outage"];

/// The operations the scenario calls, in table order.
pub const OPERATIONS: [&str; 4] = [
    "lookup_company",
    "enrich_person",
    "enrich_company",
    "push_row",
];

/// Staleness levels of cached answers, in the order they come.
const STALENESS: [&str; 3] = ["fresh", "stale", "very_stale"];

/// The table rows are pushed to.
pub const TABLE: &str = "tbl_demo_signups";

const DOMAINS: [&str; 12] = [
    "acme.com",
    "globex.com",
    "initech.com",
    "umbrella.io",
    "hooli.com",
    "piedpiper.com",
    "stark-industries.com",
    "wayne-enterprises.com",
    // Never looked up before the outage: no cached answer to fall back on.
    "cyberdyne.io",
    "tyrell.ai",
    "soylent.co",
    "wonka.com",
];
/// Domains used before the outage.
const KNOWN_DOMAINS: usize = 8;

const PEOPLE: [&str; 10] = [
    "ada.lovelace@acme.com",
    "grace.hopper@globex.com",
    "alan.turing@initech.com",
    "katherine.johnson@umbrella.io",
    "linus.torvalds@hooli.com",
    "margaret.hamilton@piedpiper.com",
    "dennis.ritchie@stark-industries.com",
    "barbara.liskov@wayne-enterprises.com",
    // Never enriched before the outage.
    "radia.perlman@cyberdyne.io",
    "hedy.lamarr@tyrell.ai",
];
const KNOWN_PEOPLE: usize = 8;

/// How long each phase of a scenario lasts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Timings {
    /// Time between rounds of traffic (each round: two lookups, one person,
    /// one row, a company every other round, a client repeat every fourth).
    pub tick: Duration,
    /// Normal traffic before the outage.
    pub normal: Duration,
    /// Longest the outage drives traffic waiting for every breaker to open.
    pub open_within: Duration,
    /// Traffic once the breakers are open (fallbacks age meanwhile), at least.
    pub outage_hold: Duration,
    /// Longest the outage goes on past `outage_hold` until the fallback
    /// answers have been fresh, stale and very stale.
    pub staleness_within: Duration,
    /// Longest the recovery waits for a breaker's own reset timeout; a
    /// breaker due later is reset by the demo.
    pub natural_reset_wait: Duration,
    /// Longest the redrive may take to empty the DLQ.
    pub drain_within: Duration,
    /// Longest the end waits for health to be `healthy` again.
    pub settle: Duration,
    /// Time between progress lines.
    pub report_every: Duration,
    /// Every breaker's `reset_timeout` in the scenario's copy of the policies.
    pub breaker_reset: Duration,
    /// Every probe's `interval` in the copy.
    pub probe_interval: Duration,
    /// `health.fallback_window` in the copy.
    pub fallback_window: Duration,
    /// `fresh` of every cached fallback, set by the hot reload mid-run.
    pub cache_fresh: Duration,
    /// `stale` of every cached fallback, set by the hot reload mid-run.
    pub cache_stale: Duration,
}

impl Timings {
    /// The pace of `claygate demo --scenario outage`: about 25 seconds.
    pub fn demo() -> Timings {
        Timings {
            tick: Duration::from_millis(600),
            normal: Duration::from_secs(6),
            open_within: Duration::from_secs(15),
            outage_hold: Duration::from_secs(4),
            staleness_within: Duration::from_secs(20),
            natural_reset_wait: Duration::from_secs(8),
            drain_within: Duration::from_secs(20),
            settle: Duration::from_secs(16),
            report_every: Duration::from_secs(2),
            breaker_reset: Duration::from_secs(4),
            probe_interval: Duration::from_secs(1),
            fallback_window: Duration::from_secs(5),
            cache_fresh: Duration::from_secs(3),
            cache_stale: Duration::from_secs(8),
        }
    }

    /// The same walk in under ten seconds, for tests (`claygate demo
    /// --scenario outage --pace quick`).
    pub fn quick() -> Timings {
        Timings {
            tick: Duration::from_millis(150),
            normal: Duration::from_millis(600),
            open_within: Duration::from_secs(20),
            outage_hold: Duration::from_millis(500),
            staleness_within: Duration::from_secs(10),
            natural_reset_wait: Duration::from_secs(4),
            drain_within: Duration::from_secs(15),
            settle: Duration::from_secs(10),
            report_every: Duration::from_secs(1),
            breaker_reset: Duration::from_secs(1),
            probe_interval: Duration::from_millis(250),
            fallback_window: Duration::from_secs(1),
            cache_fresh: Duration::from_millis(1500),
            cache_stale: Duration::from_secs(3),
        }
    }

    /// What the scenario's copy of the policies is paced with.
    pub fn pace(&self) -> super::pace::Pace {
        super::pace::Pace {
            breaker_reset: self.breaker_reset,
            probe_interval: self.probe_interval,
            fallback_window: self.fallback_window,
        }
    }
}

impl Default for Timings {
    fn default() -> Self {
        Timings::demo()
    }
}

/// How the calls of one operation ended.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct OpTally {
    /// Invokes.
    pub calls: u64,
    /// Answered `ok` (replays included).
    pub ok: u64,
    /// Of `ok`, answers replayed from the idempotency record.
    pub ok_replayed: u64,
    /// Answered from fallback, by staleness (`fresh`, `stale`, `very_stale`, `static`).
    pub fallback: BTreeMap<String, u64>,
    /// Youngest and oldest cached fallback served, in milliseconds.
    pub fallback_age_ms: Option<(u64, u64)>,
    /// Answered `queued` (dead-lettered; replays of a queued key included).
    pub queued: u64,
    /// Of `queued`, answers replayed from the idempotency record (no new entry).
    pub queued_replayed: u64,
    /// Failed, by code (`upstream_404` for an upstream status).
    pub failed: BTreeMap<String, u64>,
    /// Calls the breaker refused (nothing sent), whatever was answered.
    pub failed_fast: u64,
    /// Slowest of those, in microseconds.
    pub failed_fast_max_us: u64,
    /// Requests sent upstream by these calls.
    pub attempts: u64,
    /// Lowest and highest dead-letter id answered.
    #[serde(skip)]
    dlq_ids: Option<(i64, i64)>,
    /// Latencies of the calls that failed fast, in microseconds.
    #[serde(skip)]
    failed_fast_us: Vec<u64>,
}

impl OpTally {
    /// Fallback answers of every staleness.
    pub fn fallbacks(&self) -> u64 {
        self.fallback.values().sum()
    }

    /// Failed answers of every code.
    pub fn failures(&self) -> u64 {
        self.failed.values().sum()
    }

    /// Median latency of the calls that failed fast, in microseconds.
    pub fn failed_fast_median_us(&self) -> Option<u64> {
        let mut sorted = self.failed_fast_us.clone();
        sorted.sort_unstable();
        sorted.get(sorted.len() / 2).copied()
    }
}

/// One breaker transition seen during the run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BreakerEvent {
    /// The operation.
    pub operation: String,
    /// State left.
    pub from: BreakerState,
    /// State entered.
    pub to: BreakerState,
    /// The breaker's reason (`failure_threshold`, `reset`, …).
    pub reason: String,
    /// Milliseconds after the scenario started.
    pub at_ms: u64,
}

/// What happened to one operation's breaker.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct BreakerSummary {
    /// Times it opened (trips and failed trials).
    pub opened: u32,
    /// Times it half-opened (its reset timeout ran out).
    pub half_opened: u32,
    /// Times a trial call closed it.
    pub closed_by_trial: u32,
    /// Times a passing probe closed it (serving as the trial).
    pub closed_by_probe: u32,
    /// Whether the demo reset it (its reset timeout was longer than the demo waits).
    pub reset_by_demo: bool,
    /// Its state at the end.
    pub final_state: Option<BreakerState>,
}

/// The dead letters this run wrote, and where they ended.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct DlqSummary {
    /// Entries written (dead-lettered calls; replays of a queued key add none).
    pub dead_lettered: u64,
    /// Of them, delivered by redrive.
    pub delivered: u64,
    /// Of them, parked (out of attempts or failed for good).
    pub parked: u64,
    /// Of them, still waiting for redrive.
    pub pending: u64,
    /// Entries the demo requeued at once (instead of their first back-off).
    pub requeued_by_demo: u64,
}

/// Every `push_row` accounted for.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct RowSummary {
    /// `push_row` invokes.
    pub invokes: u64,
    /// Distinct rows (idempotency keys) among them.
    pub unique: u64,
    /// Invokes that repeated a row already sent (a client retry).
    pub client_repeats: u64,
    /// Distinct rows the fake Clay holds.
    pub delivered: u64,
    /// Distinct rows not delivered but still in the DLQ (pending or parked).
    pub in_dlq: u64,
    /// Distinct rows refused with an error (never accepted).
    pub refused: u64,
    /// Distinct rows accepted (`ok` or `queued`) yet neither delivered nor in the DLQ.
    pub lost: u64,
    /// Rows the fake recorded (all of them, this run's or not).
    pub fake_rows: u64,
    /// Deliveries of a key the fake had already recorded.
    pub duplicate_deliveries: u64,
}

/// Health as read at one point of the run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HealthMark {
    /// The phase it was read in.
    pub phase: String,
    /// The verdict.
    pub status: Status,
    /// Which checks were not healthy.
    pub output: Option<String>,
}

/// What a demo run did, from real counters.
#[derive(Debug, Clone, Default, Serialize)]
pub struct DemoSummary {
    /// The scenario run (`None`: served until stopped).
    pub scenario: Option<String>,
    /// The seed of the traffic and the fake's faults.
    pub seed: u64,
    /// Length of the run in milliseconds.
    pub elapsed_ms: u64,
    /// Calls by operation.
    pub calls: BTreeMap<String, OpTally>,
    /// Breakers by operation.
    pub breakers: BTreeMap<String, BreakerSummary>,
    /// Every breaker transition, in order.
    pub transitions: Vec<BreakerEvent>,
    /// The dead letters of this run.
    pub dlq: DlqSummary,
    /// `push_row` accounting.
    pub rows: RowSummary,
    /// The fake's counters at the end.
    pub fake: Option<FakeStats>,
    /// Health at the end of each phase.
    pub health: Vec<HealthMark>,
    /// Health at the very end.
    pub final_health: Option<Status>,
    /// True when the final health is degraded only by fallback answers of
    /// the last minute (everything else healthy).
    pub degraded_only_by_recent_fallbacks: bool,
    /// The lines narrated.
    pub transcript: Vec<String>,
}

impl DemoSummary {
    /// Whether every `push_row` was delivered or is still in the DLQ.
    pub fn nothing_lost(&self) -> bool {
        self.rows.lost == 0
    }

    /// Whether `operation`'s breaker opened at least once.
    pub fn breaker_opened(&self, operation: &str) -> bool {
        self.breakers.get(operation).is_some_and(|b| b.opened > 0)
    }
}

/// Prints (unless quiet) and keeps the narration, each line stamped with
/// the time since the start.
#[derive(Debug)]
pub struct Narrator {
    start: Instant,
    echo: bool,
    lines: Mutex<Vec<String>>,
}

impl Narrator {
    /// A narrator that prints to standard output when `echo`.
    pub fn new(echo: bool) -> Narrator {
        Narrator {
            start: Instant::now(),
            echo,
            lines: Mutex::new(Vec::new()),
        }
    }

    /// A line stamped `[  12.3s]`.
    pub fn say(&self, text: &str) {
        let secs = self.start.elapsed().as_secs_f64();
        self.emit(format!("[{secs:6.1}s] {text}"));
    }

    /// A line as is.
    pub fn plain(&self, text: &str) {
        self.emit(text.to_owned());
    }

    fn emit(&self, line: String) {
        if self.echo {
            println!("{line}");
        }
        self.lines
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(line);
    }

    /// Every line so far.
    pub fn lines(&self) -> Vec<String> {
        self.lines
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Time since the narrator was made.
    pub fn elapsed(&self) -> Duration {
        self.start.elapsed()
    }
}

/// What a scenario runs against.
pub struct Stage<'a> {
    /// The runtime of the started server.
    pub runtime: Arc<Runtime>,
    /// Its probe results (for health).
    pub probes: Arc<Probes>,
    /// The fake Clay it calls.
    pub fake: &'a FakeClay,
    /// `http://ADDR` of the admin API (for the curl equivalents narrated).
    pub admin: String,
    /// Seeds the traffic and the fake's draws.
    pub seed: u64,
    /// Phase lengths.
    pub timings: Timings,
    /// Where the story goes.
    pub narrator: Arc<Narrator>,
    /// The server's reloader (for the hot reload mid-run).
    pub reloader: Option<Arc<crate::reload::Reloader>>,
    /// The policy directory served: the scenario's paced copy.
    pub policies: std::path::PathBuf,
    /// What the copy changed, one line each.
    pub paced: Vec<String>,
}

/// Why a scenario could not run.
#[derive(Debug, thiserror::Error)]
pub enum ScenarioError {
    /// No scenario of that name.
    #[error("unknown scenario `{0}` (known: {known})", known = SCENARIOS.join(", "))]
    Unknown(String),
    /// The policies lack an operation the scenario calls.
    #[error("the policies have no operation `{0}`, which the scenario calls")]
    MissingOperation(String),
    /// The fake refused a fault setting (a bug of the scenario).
    #[error(transparent)]
    Faults(#[from] super::fake_clay::InvalidFaults),
}

/// Runs scenario `name` on `stage`.
pub async fn run(name: &str, stage: &Stage<'_>) -> Result<DemoSummary, ScenarioError> {
    match name {
        "outage" => outage(stage).await,
        other => Err(ScenarioError::Unknown(other.to_owned())),
    }
}

// ---------------------------------------------------------------------------
// Bookkeeping

#[derive(Debug, Default)]
struct RowBook {
    invokes: u64,
    accepted: bool,
    dlq_ids: BTreeSet<i64>,
}

#[derive(Default)]
struct Book {
    total: BTreeMap<String, OpTally>,
    window: BTreeMap<String, OpTally>,
    rows: BTreeMap<String, RowBook>,
    /// Params of each row by key (to repeat it).
    row_params: BTreeMap<String, Value>,
    /// Keys of rows answered `queued`, in order.
    queued_keys: Vec<String>,
    dlq_ids: BTreeSet<i64>,
    push_invokes: u64,
    client_repeats: u64,
}

fn failure_code(failure: &Failure) -> String {
    match failure {
        Failure::Status(reply) => format!("upstream_{}", reply.status.as_u16()),
        other => other.code().to_owned(),
    }
}

fn invoke_code(error: &InvokeError) -> String {
    match error {
        InvokeError::Failure(f) => failure_code(f),
        other => other.code().to_owned(),
    }
}

fn cause_of(answer: &Answer) -> Option<&Failure> {
    match answer {
        Answer::Fallback { cause, .. } => Some(cause),
        Answer::Queued { cause, .. } => cause.as_ref(),
        Answer::Failed(InvokeError::Failure(f)) => Some(f),
        _ => None,
    }
}

fn widen<T: Ord + Copy>(range: &mut Option<(T, T)>, v: T) {
    *range = Some(match *range {
        None => (v, v),
        Some((lo, hi)) => (lo.min(v), hi.max(v)),
    });
}

fn count(tally: &mut OpTally, invoked: &Invoked) {
    tally.calls += 1;
    tally.attempts += u64::from(invoked.attempts);
    let replayed = invoked.idempotency.as_ref().is_some_and(|m| m.replayed);
    match &invoked.answer {
        Answer::Ok(_) => {
            tally.ok += 1;
            if replayed {
                tally.ok_replayed += 1;
            }
        }
        Answer::Fallback { staleness, age, .. } => {
            *tally
                .fallback
                .entry(staleness.as_str().to_owned())
                .or_insert(0) += 1;
            if let Some(age) = age {
                widen(
                    &mut tally.fallback_age_ms,
                    u64::try_from(age.as_millis()).unwrap_or(u64::MAX),
                );
            }
        }
        Answer::Queued { dlq_id, cause } => {
            tally.queued += 1;
            if cause.is_none() {
                tally.queued_replayed += 1;
            }
            widen(&mut tally.dlq_ids, *dlq_id);
        }
        Answer::Failed(e) => {
            *tally.failed.entry(invoke_code(e)).or_insert(0) += 1;
        }
    }
    if matches!(cause_of(&invoked.answer), Some(Failure::BreakerOpen { .. }))
        && invoked.attempts == 0
    {
        let us = u64::try_from(invoked.latency.as_micros()).unwrap_or(u64::MAX);
        tally.failed_fast += 1;
        tally.failed_fast_max_us = tally.failed_fast_max_us.max(us);
        tally.failed_fast_us.push(us);
    }
}

impl Book {
    fn note(&mut self, operation: &str, params: &Value, invoked: &Invoked) {
        count(self.total.entry(operation.to_owned()).or_default(), invoked);
        count(
            self.window.entry(operation.to_owned()).or_default(),
            invoked,
        );
        if operation != "push_row" {
            return;
        }
        self.push_invokes += 1;
        let Some(key) = invoked.idempotency.as_ref().map(|m| m.key.clone()) else {
            return;
        };
        let row = self.rows.entry(key.clone()).or_default();
        row.invokes += 1;
        if row.invokes > 1 {
            self.client_repeats += 1;
        }
        self.row_params
            .entry(key.clone())
            .or_insert_with(|| params.clone());
        match &invoked.answer {
            Answer::Ok(_) => row.accepted = true,
            Answer::Queued { dlq_id, cause } => {
                row.accepted = true;
                row.dlq_ids.insert(*dlq_id);
                if cause.is_some() {
                    self.dlq_ids.insert(*dlq_id);
                    self.queued_keys.push(key);
                }
            }
            Answer::Fallback { .. } | Answer::Failed(_) => {}
        }
    }
}

// ---------------------------------------------------------------------------
// The scenario's machinery

struct Walk<'s, 'a> {
    stage: &'s Stage<'a>,
    rng: StdRng,
    run_id: String,
    round: u64,
    phase: Option<Phase>,
    phase_round: usize,
    book: Book,
    transitions: Arc<Mutex<Vec<BreakerEvent>>>,
    watchers: Vec<JoinHandle<()>>,
    health: Vec<HealthMark>,
    reset_by_demo: BTreeSet<String>,
    requeued: u64,
    afterglow: bool,
}

impl Drop for Walk<'_, '_> {
    fn drop(&mut self) {
        for w in &self.watchers {
            w.abort();
        }
    }
}

/// A phase of the walk, for labels and the traffic mix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Normal,
    Outage,
    Recovery,
    Clear,
}

impl Phase {
    fn label(self) -> &'static str {
        match self {
            Phase::Normal => "normal",
            Phase::Outage => "outage",
            Phase::Recovery => "recovery",
            Phase::Clear => "all clear",
        }
    }
}

fn say_reason(reason: &str) -> &str {
    match reason {
        "failure_threshold" => "failures reached the threshold",
        "slow_call_threshold" => "slow calls reached the threshold",
        "reset_timeout_elapsed" => "reset timeout ran out: one trial call may pass",
        "trials_succeeded" => "the trial call succeeded",
        "trial_failed" => "the trial call failed",
        "half_open_max_wait" => "no verdict in time",
        "probe_passed" => "a passing probe served as the trial",
        "reset" => "reset",
        "force_open" => "forced open",
        "force_closed" => "forced closed",
        other => other,
    }
}

fn shorten(text: &str, max: usize) -> String {
    if text.chars().count() <= max {
        text.to_owned()
    } else {
        let cut: String = text.chars().take(max.saturating_sub(3)).collect();
        format!("{cut}...")
    }
}

fn millis_text(us: u64) -> String {
    format!("{:.2}ms", us as f64 / 1000.0)
}

fn secs(d: Duration) -> String {
    format!("{:.1}s", d.as_secs_f64())
}

fn ms_range((lo, hi): (u64, u64)) -> String {
    let (lo, hi) = (lo as f64 / 1000.0, hi as f64 / 1000.0);
    if (hi - lo).abs() < 0.05 {
        format!("{lo:.1}s")
    } else {
        format!("{lo:.1}-{hi:.1}s")
    }
}

fn describe(tally: &OpTally) -> String {
    let mut parts = Vec::new();
    if tally.ok > 0 {
        if tally.ok_replayed > 0 {
            parts.push(format!("{} ok ({} replayed)", tally.ok, tally.ok_replayed));
        } else {
            parts.push(format!("{} ok", tally.ok));
        }
    }
    for (staleness, n) in &tally.fallback {
        if staleness == "static" {
            parts.push(format!("{n} static fallback"));
        } else {
            let age = tally
                .fallback_age_ms
                .map(|r| format!(", age {}", ms_range(r)))
                .unwrap_or_default();
            parts.push(format!("{n} fallback ({staleness}{age})"));
        }
    }
    if tally.queued > 0 {
        let ids = match tally.dlq_ids {
            Some((lo, hi)) if lo == hi => format!(" DLQ #{lo}"),
            Some((lo, hi)) => format!(" DLQ #{lo}-#{hi}"),
            None => String::new(),
        };
        let replayed = if tally.queued_replayed > 0 {
            format!(" ({} replayed)", tally.queued_replayed)
        } else {
            String::new()
        };
        parts.push(format!("{} queued{replayed}{ids}", tally.queued));
    }
    for (code, n) in &tally.failed {
        parts.push(format!("{n} failed ({code})"));
    }
    if tally.failed_fast > 0 {
        parts.push(format!(
            "{} refused by the open breaker (median {})",
            tally.failed_fast,
            millis_text(tally.failed_fast_median_us().unwrap_or(0))
        ));
    }
    parts.join(", ")
}

fn breaker_word(state: BreakerState) -> &'static str {
    match state {
        BreakerState::Closed => "closed",
        BreakerState::Open => "OPEN",
        BreakerState::HalfOpen => "half-open",
        BreakerState::ForcedOpen => "FORCED OPEN",
        BreakerState::ForcedClosed => "forced closed",
    }
}

impl<'s, 'a> Walk<'s, 'a> {
    fn new(stage: &'s Stage<'a>) -> Walk<'s, 'a> {
        let run_id = format!(
            "{:x}",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis())
        );
        Walk {
            stage,
            rng: StdRng::seed_from_u64(stage.seed),
            run_id,
            round: 0,
            phase: None,
            phase_round: 0,
            book: Book::default(),
            transitions: Arc::new(Mutex::new(Vec::new())),
            watchers: Vec::new(),
            health: Vec::new(),
            reset_by_demo: BTreeSet::new(),
            requeued: 0,
            afterglow: false,
        }
    }

    fn say(&self, text: &str) {
        self.stage.narrator.say(text);
    }

    fn plain(&self, text: &str) {
        self.stage.narrator.plain(text);
    }

    /// Narrates every breaker transition as it happens, and keeps them.
    fn watch_breakers(&mut self) {
        let compiled = self.stage.runtime.compiled();
        for name in OPERATIONS {
            let Some(pipeline) = compiled.operations.get(name) else {
                continue;
            };
            let mut rx = pipeline.breaker.subscribe();
            let narrator = Arc::clone(&self.stage.narrator);
            let log = Arc::clone(&self.transitions);
            let name = name.to_owned();
            self.watchers.push(tokio::spawn(async move {
                use tokio::sync::broadcast::error::RecvError;
                loop {
                    match rx.recv().await {
                        Ok(t) => {
                            narrator.say(&format!(
                                "  breaker {name}: {} -> {} ({})",
                                t.from.as_str(),
                                t.to.as_str(),
                                say_reason(t.reason)
                            ));
                            log.lock()
                                .unwrap_or_else(PoisonError::into_inner)
                                .push(BreakerEvent {
                                    operation: name.clone(),
                                    from: t.from,
                                    to: t.to,
                                    reason: t.reason.to_owned(),
                                    at_ms: u64::try_from(narrator.elapsed().as_millis())
                                        .unwrap_or(u64::MAX),
                                });
                        }
                        Err(RecvError::Lagged(_)) => continue,
                        Err(RecvError::Closed) => break,
                    }
                }
            }));
        }
    }

    fn transitions(&self) -> Vec<BreakerEvent> {
        self.transitions
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn opened(&self) -> BTreeSet<String> {
        self.transitions()
            .into_iter()
            .filter(|t| t.to == BreakerState::Open)
            .map(|t| t.operation)
            .collect()
    }

    fn breaker_state(&self, operation: &str) -> Option<BreakerState> {
        self.stage
            .runtime
            .compiled()
            .operations
            .get(operation)
            .map(|p| p.breaker.state())
    }

    fn breakers_line(&self) -> String {
        OPERATIONS
            .iter()
            .filter_map(|op| {
                self.breaker_state(op)
                    .map(|s| format!("{op} {}", breaker_word(s)))
            })
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// The calls of one round.
    fn plan(&mut self, phase: Phase) -> Vec<(&'static str, InvokeRequest)> {
        self.round += 1;
        let round = self.round;
        if self.phase != Some(phase) {
            self.phase = Some(phase);
            self.phase_round = 0;
        }
        let phase_round = self.phase_round;
        self.phase_round += 1;
        let (domains, people) = if phase == Phase::Normal {
            (KNOWN_DOMAINS, KNOWN_PEOPLE)
        } else {
            (DOMAINS.len(), PEOPLE.len())
        };
        let mut calls = Vec::new();
        for _ in 0..2 {
            let domain = DOMAINS[self.rng.random_range(0..domains)];
            calls.push((
                "lookup_company",
                InvokeRequest {
                    params: json!({ "domain": domain }),
                    ..InvokeRequest::default()
                },
            ));
        }
        // Reads carry the app's own request id as Idempotency-Key: without
        // one, the key derives from the email (policies: key [email], ttl
        // 24h) and every later call would replay the first answer for a day.
        // People come in turn from the start of each phase, so the outage
        // meets those enriched before it first, then the never-seen ones.
        let email = PEOPLE[phase_round % people];
        calls.push((
            "enrich_person",
            InvokeRequest {
                params: json!({ "email": email }),
                idempotency_key: Some(format!("demo-{}-p{round}", self.run_id)),
                ..InvokeRequest::default()
            },
        ));
        if round.is_multiple_of(2) {
            let domain = DOMAINS[self.rng.random_range(0..domains.min(KNOWN_DOMAINS + 1))];
            calls.push((
                "enrich_company",
                InvokeRequest {
                    params: json!({ "domain": domain }),
                    idempotency_key: Some(format!("demo-{}-c{round}", self.run_id)),
                    ..InvokeRequest::default()
                },
            ));
        }
        let who = PEOPLE[self.rng.random_range(0..PEOPLE.len())];
        let plan = ["free", "pro", "team"][self.rng.random_range(0..3)];
        calls.push((
            "push_row",
            InvokeRequest {
                params: json!({
                    "table_id": TABLE,
                    "row": { "email": who, "plan": plan, "signup": round, "run": self.run_id },
                }),
                ..InvokeRequest::default()
            },
        ));
        // A client retrying a write it already sent: the latest queued one
        // while there is one, else the latest row.
        if round.is_multiple_of(4) {
            let key = self
                .book
                .queued_keys
                .last()
                .or_else(|| self.book.row_params.keys().next_back())
                .cloned();
            if let Some(params) = key.and_then(|k| self.book.row_params.get(&k).cloned()) {
                calls.push((
                    "push_row",
                    InvokeRequest {
                        params,
                        ..InvokeRequest::default()
                    },
                ));
            }
        }
        calls
    }

    /// Runs `calls` at once and books their answers.
    async fn send(
        &mut self,
        calls: Vec<(&'static str, InvokeRequest)>,
    ) -> Vec<(&'static str, Invoked)> {
        let runtime = &self.stage.runtime;
        let answers = futures_util::future::join_all(calls.into_iter().map(|(op, request)| {
            let runtime = Arc::clone(runtime);
            async move {
                let params = request.params.clone();
                let invoked = runtime.invoke(op, request).await;
                (op, params, invoked)
            }
        }))
        .await;
        answers
            .into_iter()
            .map(|(op, params, invoked)| {
                self.book.note(op, &params, &invoked);
                (op, invoked)
            })
            .collect()
    }

    fn progress(&mut self, phase: Phase) {
        let window = std::mem::take(&mut self.book.window);
        if window.is_empty() {
            return;
        }
        self.say(&format!("{} traffic:", phase.label()));
        for op in OPERATIONS {
            if let Some(tally) = window.get(op) {
                self.plain(&format!("           {op:<15} {}", describe(tally)));
            }
        }
        self.plain(&format!("           breakers: {}", self.breakers_line()));
    }

    /// Rounds of traffic until `done` (checked after each round) or `max`.
    async fn drive(
        &mut self,
        phase: Phase,
        max: Duration,
        done: impl Fn(&Self) -> bool,
    ) -> Duration {
        let started = Instant::now();
        let every = self
            .stage
            .timings
            .report_every
            .max(Duration::from_millis(100));
        let mut next_report = started + every;
        loop {
            let round_started = Instant::now();
            let calls = self.plan(phase);
            self.send(calls).await;
            if Instant::now() >= next_report {
                self.progress(phase);
                next_report = Instant::now() + every;
            }
            if done(self) || started.elapsed() >= max {
                break;
            }
            tokio::time::sleep_until(round_started + self.stage.timings.tick).await;
        }
        self.progress(phase);
        started.elapsed()
    }

    async fn health(&mut self, phase: &str) -> HealthReport {
        let report = crate::health::report(&self.stage.runtime, &self.stage.probes).await;
        self.say(&format!(
            "health: {}{}",
            report.status.as_str(),
            report
                .output
                .as_deref()
                .map(|o| format!(" ({o})"))
                .unwrap_or_default()
        ));
        for (key, checks) in &report.checks {
            for check in checks.iter().filter(|c| c.status != Status::Healthy) {
                // An operation repeats its upstream's probe failure, which
                // the upstream's own line tells.
                let probe = check.reasons.iter().any(|r| r.starts_with("upstream `"));
                let other = check.reasons.iter().find(|r| !r.starts_with("upstream `"));
                let text = match (other, probe) {
                    (Some(r), true) => format!("{r}; and its upstream's probe fails"),
                    (Some(r), false) => r.clone(),
                    (None, true) => "its upstream's probe fails".to_owned(),
                    (None, false) => continue,
                };
                self.plain(&format!("           {key}: {}", shorten(&text, 150)));
            }
        }
        self.health.push(HealthMark {
            phase: phase.to_owned(),
            status: report.status,
            output: report.output.clone(),
        });
        report
    }

    fn reset_breaker(&mut self, operation: &str, why: &str) {
        let compiled = self.stage.runtime.compiled();
        if let Some(p) = compiled.operations.get(operation) {
            self.say(&format!(
                "  {operation}: {why}: the demo resets it, as `curl -X POST {}/v1/breakers/{operation}/reset` does",
                self.stage.admin
            ));
            p.breaker.reset();
            self.reset_by_demo.insert(operation.to_owned());
        }
    }

    /// Whether the cached fallback answers have been fresh, stale and very stale.
    fn staleness_crossed(&self) -> bool {
        STALENESS.iter().all(|level| self.fallbacks_of(level) > 0)
    }

    /// Cached fallback answers of `level`, over every operation.
    fn fallbacks_of(&self, level: &str) -> u64 {
        self.book
            .total
            .values()
            .map(|t| t.fallback.get(level).copied().unwrap_or(0))
            .sum()
    }

    /// Shortens the cache windows in the served copy and waits (bounded)
    /// for the watcher to apply them: a hot reload, narrated.
    async fn shorten_cache_windows(&mut self) {
        let stage = self.stage;
        let Some(reloader) = stage.reloader.clone() else {
            return;
        };
        let (fresh, stale) = (stage.timings.cache_fresh, stage.timings.cache_stale);
        let before = reloader.current().hash.clone();
        self.say(&format!(
            "phase 2/5 begins with a hot reload: so that cached answers age within this demo, the demo edits the cache windows in its copy of the policies (fresh {}, stale {}):",
            secs(fresh),
            secs(stale)
        ));
        let written = Instant::now();
        let notes = match super::pace::shorten_cache_windows(&stage.policies, fresh, stale) {
            Ok(notes) => notes,
            Err(e) => {
                self.say(&format!("  cannot edit the copy: {e}"));
                return;
            }
        };
        for note in &notes {
            self.plain(&format!("           {note}"));
        }
        if notes.is_empty() {
            return;
        }
        let deadline = written + Duration::from_secs(5);
        while reloader.current().hash == before && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let seen = written.elapsed();
        let record = if reloader.current().hash == before {
            self.say(
                "  the watcher did not reload within 5s; reloading explicitly, as SIGHUP does",
            );
            reloader.reload(crate::reload::Trigger::Signal, true).await
        } else {
            let hash = reloader.current().hash.clone();
            match reloader
                .history()
                .into_iter()
                .find(|r| r.generation == hash)
            {
                Some(r) => r,
                None => return,
            }
        };
        let carried = record
            .changes
            .values()
            .filter_map(|c| c.carried)
            .filter(|c| c.breaker && c.bulkhead && c.rate_limiter)
            .count();
        self.say(&format!(
            "  reload {} ({}): generation {} -> {}, serving {} after the write ({} ms to load, validate and compile); {carried} of {} operations kept their breaker, bulkhead and rate limiter",
            record.result.as_str(),
            match record.trigger {
                crate::reload::Trigger::Watch => "the watcher saw the edit",
                crate::reload::Trigger::Rescan => "the periodic rescan read it",
                _ => "forced",
            },
            short_hash(&before),
            short_hash(&record.generation),
            secs(seen),
            record.duration_ms,
            record.changes.len()
        ));
    }

    /// This run's dead letters as stored now (deleted ones left out).
    async fn dlq_entries(&self) -> Vec<crate::store::DeadLetter> {
        let mut entries = Vec::new();
        for id in &self.book.dlq_ids {
            if let Ok(Some(e)) = self.stage.runtime.store.dlq_get(*id).await {
                entries.push(e);
            }
        }
        entries
    }

    /// States of this run's dead letters: (pending, delivered, parked).
    async fn dlq_states(&self) -> (u64, u64, u64) {
        let mut states = (0, 0, 0);
        for id in &self.book.dlq_ids {
            // Deleted (by an admin) or unreadable entries count nowhere;
            // the row accounting tells where their rows are.
            if let Ok(Some(e)) = self.stage.runtime.store.dlq_get(*id).await {
                match e.state {
                    DlqState::Pending => states.0 += 1,
                    DlqState::Delivered => states.1 += 1,
                    DlqState::Parked => states.2 += 1,
                }
            }
        }
        states
    }
}

fn short_hash(hash: &str) -> &str {
    hash.get(..12).unwrap_or(hash)
}

fn only_fallback_afterglow(report: &HealthReport) -> bool {
    report.status != Status::Healthy
        && report
            .checks
            .values()
            .flatten()
            .filter(|c| c.status != Status::Healthy)
            .all(|c| {
                c.component_type == "operation"
                    && c.reasons
                        .iter()
                        .all(|r| r.starts_with("answered from its fallback"))
            })
}

// ---------------------------------------------------------------------------
// outage

async fn outage(stage: &Stage<'_>) -> Result<DemoSummary, ScenarioError> {
    let compiled = stage.runtime.compiled();
    for op in OPERATIONS {
        if !compiled.operations.contains_key(op) {
            return Err(ScenarioError::MissingOperation(op.to_owned()));
        }
    }
    drop(compiled);
    let timings = stage.timings.clone();
    let control = stage.fake.control_url();
    let mut walk = Walk::new(stage);
    walk.watch_breakers();
    let fake_faults = Faults {
        seed: stage.seed,
        ..Faults::default()
    };
    stage.fake.set_faults(fake_faults.clone()).await?;

    walk.plain("");
    walk.plain("== scenario: outage ==");
    if !stage.paced.is_empty() {
        walk.say(&format!(
            "the scenario serves a copy of the policies paced for a short demo ({}), so that the recovery is the policies' own:",
            stage.policies.display()
        ));
        for note in &stage.paced {
            walk.plain(&format!("           {note}"));
        }
    }
    walk.say(&format!(
        "phase 1/5, normal: mixed traffic for {} (a round every {}): lookups, enrichments, rows pushed to table {TABLE}",
        secs(timings.normal),
        secs(timings.tick)
    ));
    walk.drive(Phase::Normal, timings.normal, |_| false).await;
    walk.health("normal").await;

    walk.plain("");
    walk.shorten_cache_windows().await;
    walk.say(&format!(
        "phase 2/5, outage: Clay stops accepting connections, as `curl -X PUT {control}/_fake/faults -d '{{\"outage\":\"refuse\"}}'` does"
    ));
    stage
        .fake
        .set_faults(Faults {
            outage: Outage::Refuse,
            ..fake_faults.clone()
        })
        .await?;
    walk.say(&format!(
        "  fake Clay listening: {} (connections to {} are refused)",
        stage.fake.listening(),
        stage.fake.addr()
    ));
    let took = walk
        .drive(Phase::Outage, timings.open_within, |w| {
            let opened = w.opened();
            OPERATIONS.iter().all(|op| opened.contains(*op))
        })
        .await;
    let opened = walk.opened();
    if OPERATIONS.iter().all(|op| opened.contains(*op)) {
        walk.say(&format!(
            "every breaker opened within {} of the outage: calls now fail fast, nothing is sent to Clay",
            secs(took)
        ));
    } else {
        let closed: Vec<&str> = OPERATIONS
            .iter()
            .copied()
            .filter(|op| !opened.contains(*op))
            .collect();
        walk.say(&format!(
            "after {}: breakers opened: {}; not (yet) open: {} (too few calls in their window)",
            secs(took),
            if opened.is_empty() {
                "none".to_owned()
            } else {
                opened.iter().cloned().collect::<Vec<_>>().join(", ")
            },
            closed.join(", ")
        ));
    }
    walk.say(&format!(
        "  keeping traffic up for {} or more: reads are answered from the fallback cache (watch the age grow: fresh, stale, very stale) or the static value, rows are dead-lettered",
        secs(timings.outage_hold)
    ));
    walk.drive(Phase::Outage, timings.outage_hold, |_| false)
        .await;
    if !walk.staleness_crossed() {
        walk.drive(
            Phase::Outage,
            timings.staleness_within,
            Walk::staleness_crossed,
        )
        .await;
    }
    let levels: Vec<String> = STALENESS
        .iter()
        .map(|level| format!("{level} {}", walk.fallbacks_of(level)))
        .collect();
    walk.say(&format!(
        "  cached fallback answers so far: {}",
        levels.join(", ")
    ));
    let (pending, _, _) = walk.dlq_states().await;
    walk.say(&format!(
        "  DLQ: {} dead letters written by this run, {pending} pending",
        walk.book.dlq_ids.len()
    ));
    walk.health("outage").await;

    walk.plain("");
    walk.say(&format!(
        "phase 3/5, recovery: Clay is back, as `curl -X PUT {control}/_fake/faults -d '{{}}'` does"
    ));
    stage.fake.set_faults(fake_faults.clone()).await?;
    walk.say(&format!(
        "  fake Clay listening: {}",
        stage.fake.listening()
    ));
    let compiled = stage.runtime.compiled();
    for op in OPERATIONS {
        let Some(pipeline) = compiled.operations.get(op) else {
            continue;
        };
        let snapshot = pipeline.breaker.snapshot();
        let configured = pipeline.breaker.config().reset_timeout;
        match snapshot.state {
            BreakerState::Open => {
                let left = Duration::from_millis(snapshot.retry_after_ms.unwrap_or(0));
                if left <= timings.natural_reset_wait {
                    walk.say(&format!(
                        "  {op}: open; its reset timeout lets a trial call through in {}",
                        secs(left)
                    ));
                } else {
                    let why = format!(
                        "open, next trial in {} (reset_timeout {} in the policy, {} now): longer than this demo waits",
                        secs(left),
                        secs(configured),
                        secs(Duration::from_millis(snapshot.reset_timeout_ms))
                    );
                    walk.reset_breaker(op, &why);
                }
            }
            BreakerState::ForcedOpen => walk.reset_breaker(op, "forced open"),
            BreakerState::HalfOpen => {
                walk.say(&format!("  {op}: half-open; the next call is the trial"))
            }
            BreakerState::Closed | BreakerState::ForcedClosed => {
                walk.say(&format!("  {op}: {}", snapshot.state.as_str()));
            }
        }
    }
    drop(compiled);
    let wait = timings.natural_reset_wait + Duration::from_secs(2);
    let all_closed = |w: &Walk<'_, '_>| {
        OPERATIONS.iter().all(|op| {
            matches!(
                w.breaker_state(op),
                Some(BreakerState::Closed | BreakerState::ForcedClosed) | None
            )
        })
    };
    walk.drive(Phase::Recovery, wait, all_closed).await;
    for op in OPERATIONS {
        if let Some(state) = walk.breaker_state(op)
            && !matches!(state, BreakerState::Closed | BreakerState::ForcedClosed)
        {
            walk.reset_breaker(
                op,
                &format!("still {} after {}", state.as_str(), secs(wait)),
            );
        }
    }
    walk.health("recovery").await;

    walk.plain("");
    let entries = walk.dlq_entries().await;
    let now = stage.runtime.clock.now();
    let due_in: Vec<i64> = entries
        .iter()
        .filter(|e| e.state == DlqState::Pending)
        .map(|e| e.next_attempt_at.saturating_sub(now).max(0))
        .collect();
    let delivered = entries
        .iter()
        .filter(|e| e.state == DlqState::Delivered)
        .count();
    let backoff = stage
        .runtime
        .compiled()
        .operations
        .get("push_row")
        .and_then(|p| p.dlq.as_ref().map(|d| d.backoff.initial))
        .unwrap_or_default();
    let schedule = match (due_in.iter().min(), due_in.iter().max()) {
        (Some(lo), Some(hi)) => format!(
            ", due in {} to {} (their first back-off: up to {}, jittered)",
            secs(Duration::from_millis(u64::try_from(*lo).unwrap_or(0))),
            secs(Duration::from_millis(u64::try_from(*hi).unwrap_or(0))),
            secs(backoff)
        ),
        _ => String::new(),
    };
    walk.say(&format!(
        "phase 4/5, redrive: of {} dead letters, {delivered} delivered by the redrive worker on their own schedule so far, {} pending{schedule}",
        walk.book.dlq_ids.len(),
        due_in.len()
    ));
    walk.say(&format!(
        "  the demo requeues them now rather than wait, as `curl -X POST {}/v1/dlq/replay -H 'content-type: application/json' -d '{{\"operation\":\"push_row\"}}'` does",
        stage.admin
    ));
    let requeued = match crate::dlq::replay_matching(
        &stage.runtime,
        &DlqFilter {
            operation: Some("push_row".to_owned()),
            ..DlqFilter::default()
        },
    )
    .await
    {
        Ok(n) => n,
        Err(e) => {
            walk.say(&format!("  cannot requeue: {e}"));
            0
        }
    };
    walk.requeued = requeued;
    walk.say(&format!(
        "  requeued {requeued}; the redrive worker sends them through the same pipeline (paced, with each row's original Idempotency-Key)"
    ));
    let started = Instant::now();
    let mut next_report = started + timings.report_every;
    loop {
        let (pending, delivered, parked) = walk.dlq_states().await;
        let done = pending == 0;
        if done || Instant::now() >= next_report || started.elapsed() >= timings.drain_within {
            walk.say(&format!(
                "  DLQ: {delivered} delivered, {parked} parked, {pending} pending"
            ));
            next_report = Instant::now() + timings.report_every;
        }
        if done {
            walk.say(&format!("  the DLQ drained in {}", secs(started.elapsed())));
            break;
        }
        if started.elapsed() >= timings.drain_within {
            walk.say(&format!(
                "  {pending} still pending after {}; the worker keeps trying after the demo",
                secs(timings.drain_within)
            ));
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    walk.plain("");
    walk.say("phase 5/5, all clear: clients repeat three rows that were dead-lettered");
    let repeats: Vec<String> = walk.book.queued_keys.iter().take(3).cloned().collect();
    for key in repeats {
        let Some(params) = walk.book.row_params.get(&key).cloned() else {
            continue;
        };
        let before = stage.fake.deliveries(&key);
        let answers = walk
            .send(vec![(
                "push_row",
                InvokeRequest {
                    params,
                    ..InvokeRequest::default()
                },
            )])
            .await;
        for (_, invoked) in answers {
            let replayed = invoked.idempotency.as_ref().is_some_and(|m| m.replayed);
            walk.say(&format!(
                "  push_row repeat: {}{}, attempts {}; Clay holds the row {} time(s) (before: {before})",
                invoked.answer.status(),
                if replayed { " (replayed from the idempotency record)" } else { "" },
                invoked.attempts,
                stage.fake.deliveries(&key),
            ));
        }
    }
    walk.drive(Phase::Clear, timings.tick * 3, |_| false).await;
    let settle_started = Instant::now();
    let mut report = walk.health("all clear").await;
    let window = crate::health::fallback_window(&stage.runtime.compiled().set);
    if report.status != Status::Healthy && !timings.settle.is_zero() {
        walk.say(&format!(
            "  waiting up to {} for health to recover (the probe runs every {}; a fallback answer counts for {})",
            secs(timings.settle),
            secs(timings.probe_interval),
            secs(window)
        ));
    }
    while report.status != Status::Healthy && settle_started.elapsed() < timings.settle {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let next = crate::health::report(&stage.runtime, &stage.probes).await;
        if next.status != report.status || next.output != report.output {
            report = walk.health("all clear").await;
        } else {
            report = next;
        }
    }
    walk.afterglow = only_fallback_afterglow(&report);
    if walk.afterglow {
        walk.say(&format!(
            "  degraded only because reads were answered from fallback in the last {} (health.fallback_window); breakers, probe and DLQ are healthy",
            secs(window)
        ));
    }
    let summary = summarize(&mut walk, Some("outage")).await;
    print_summary(stage.narrator.as_ref(), &summary);
    Ok(summary)
}

async fn summarize(walk: &mut Walk<'_, '_>, scenario: Option<&str>) -> DemoSummary {
    let stage = walk.stage;
    let fake_stats = stage.fake.stats();
    let rows = stage.fake.rows();
    let delivered_keys: BTreeSet<&str> = rows
        .iter()
        .filter_map(|r| r.idempotency_key.as_deref())
        .collect();
    let mut dlq = DlqSummary {
        dead_lettered: walk.book.dlq_ids.len() as u64,
        requeued_by_demo: walk.requeued,
        ..DlqSummary::default()
    };
    let mut in_dlq_keys = BTreeSet::new();
    let mut entry_state = BTreeMap::new();
    for id in &walk.book.dlq_ids {
        if let Ok(Some(e)) = stage.runtime.store.dlq_get(*id).await {
            match e.state {
                DlqState::Pending => dlq.pending += 1,
                DlqState::Delivered => dlq.delivered += 1,
                DlqState::Parked => dlq.parked += 1,
            }
            entry_state.insert(*id, e.state);
        }
    }
    for (key, row) in &walk.book.rows {
        if row.dlq_ids.iter().any(|id| {
            matches!(
                entry_state.get(id),
                Some(DlqState::Pending | DlqState::Parked)
            )
        }) {
            in_dlq_keys.insert(key.clone());
        }
    }
    let mut accounting = RowSummary {
        invokes: walk.book.push_invokes,
        unique: walk.book.rows.len() as u64,
        client_repeats: walk.book.client_repeats,
        fake_rows: rows.len() as u64,
        duplicate_deliveries: fake_stats.duplicate_deliveries,
        ..RowSummary::default()
    };
    for (key, row) in &walk.book.rows {
        if delivered_keys.contains(key.as_str()) {
            accounting.delivered += 1;
        } else if in_dlq_keys.contains(key) {
            accounting.in_dlq += 1;
        } else if row.accepted {
            accounting.lost += 1;
        } else {
            accounting.refused += 1;
        }
    }
    let transitions = walk.transitions();
    let mut breakers = BTreeMap::new();
    for op in OPERATIONS {
        let mut b = BreakerSummary {
            reset_by_demo: walk.reset_by_demo.contains(op),
            final_state: walk.breaker_state(op),
            ..BreakerSummary::default()
        };
        for t in transitions.iter().filter(|t| t.operation == op) {
            match (t.from, t.to) {
                (_, BreakerState::Open) => b.opened += 1,
                (_, BreakerState::HalfOpen) => b.half_opened += 1,
                (BreakerState::HalfOpen, BreakerState::Closed)
                    if t.reason == "trials_succeeded" =>
                {
                    b.closed_by_trial += 1;
                }
                (_, BreakerState::Closed) if t.reason == "probe_passed" => {
                    b.closed_by_probe += 1;
                }
                _ => {}
            }
        }
        breakers.insert(op.to_owned(), b);
    }
    DemoSummary {
        scenario: scenario.map(str::to_owned),
        seed: stage.seed,
        elapsed_ms: u64::try_from(stage.narrator.elapsed().as_millis()).unwrap_or(u64::MAX),
        calls: walk.book.total.clone(),
        breakers,
        transitions,
        dlq,
        rows: accounting,
        fake: Some(fake_stats),
        final_health: walk.health.last().map(|h| h.status),
        degraded_only_by_recent_fallbacks: walk.afterglow,
        health: walk.health.clone(),
        transcript: Vec::new(),
    }
}

/// Prints the summary table through `narrator`.
pub fn print_summary(narrator: &Narrator, s: &DemoSummary) {
    let mut out = String::new();
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "== summary{} (seed {}, {:.1}s) ==",
        s.scenario
            .as_deref()
            .map(|n| format!(": {n}"))
            .unwrap_or_default(),
        s.seed,
        s.elapsed_ms as f64 / 1000.0
    );
    if !s.calls.is_empty() {
        let _ = writeln!(
            out,
            "{:<15} {:>5} {:>9} {:>25} {:>12} {:>6}  failed",
            "operation", "calls", "ok(repl)", "fallback fr/st/vs/static", "queued(repl)", "sent"
        );
        for (op, t) in &s.calls {
            let fb = |k: &str| t.fallback.get(k).copied().unwrap_or(0);
            let failed = if t.failed.is_empty() {
                "-".to_owned()
            } else {
                t.failed
                    .iter()
                    .map(|(c, n)| format!("{c} {n}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            let _ = writeln!(
                out,
                "{op:<15} {:>5} {:>9} {:>25} {:>12} {:>6}  {failed}",
                t.calls,
                format!("{}({})", t.ok, t.ok_replayed),
                format!(
                    "{}/{}/{}/{}",
                    fb("fresh"),
                    fb("stale"),
                    fb("very_stale"),
                    fb("static")
                ),
                format!("{}({})", t.queued, t.queued_replayed),
                t.attempts,
            );
        }
        for (op, t) in &s.calls {
            if let Some(range) = t.fallback_age_ms {
                let _ = writeln!(
                    out,
                    "  {op}: cached fallbacks served aged {}",
                    ms_range(range)
                );
            }
            if t.failed_fast > 0 {
                let _ = writeln!(
                    out,
                    "  {op}: {} calls failed fast on the open breaker (nothing sent): median {}, slowest {}",
                    t.failed_fast,
                    millis_text(t.failed_fast_median_us().unwrap_or(0)),
                    millis_text(t.failed_fast_max_us)
                );
            }
        }
    }
    for (op, b) in &s.breakers {
        if b.opened == 0 && !b.reset_by_demo {
            continue;
        }
        let _ = writeln!(
            out,
            "breaker {op}: opened {}x, half-opened {}x, closed by a trial call {}x, by a passing probe {}x{}, now {}",
            b.opened,
            b.half_opened,
            b.closed_by_trial,
            b.closed_by_probe,
            if b.reset_by_demo {
                ", reset by the demo"
            } else {
                ""
            },
            b.final_state.map_or("?", BreakerState::as_str)
        );
    }
    let d = &s.dlq;
    let _ = writeln!(
        out,
        "DLQ: {} dead-lettered in; out: {} delivered, {} parked; still pending {} (requeued by the demo: {})",
        d.dead_lettered, d.delivered, d.parked, d.pending, d.requeued_by_demo
    );
    let r = &s.rows;
    let _ = writeln!(
        out,
        "push_row: {} invokes = {} distinct rows + {} client repeats; delivered {}, still in DLQ {}, refused {}, lost {}",
        r.invokes, r.unique, r.client_repeats, r.delivered, r.in_dlq, r.refused, r.lost
    );
    if let Some(f) = &s.fake {
        let _ = writeln!(
            out,
            "fake Clay: {} requests, {} rows received, {} duplicate deliveries, {} rate-limited (429)",
            f.requests,
            f.rows,
            f.duplicate_deliveries,
            f.rate_limited + f.storm_429
        );
    }
    let marks: Vec<String> = s
        .health
        .iter()
        .map(|h| format!("{} {}", h.phase, h.status.as_str()))
        .collect();
    if !marks.is_empty() {
        let note = if s.degraded_only_by_recent_fallbacks {
            " (only by fallback answers of the last minute)"
        } else {
            ""
        };
        let _ = writeln!(out, "health: {}{note}", marks.join(" -> "));
    }
    let verdict = if r.lost == 0 && r.duplicate_deliveries == 0 {
        "nothing lost, nothing duplicated"
    } else if r.lost > 0 {
        "ROWS LOST"
    } else {
        "DUPLICATE DELIVERIES"
    };
    let _ = write!(out, "verdict: {verdict}");
    for line in out.lines() {
        narrator.plain(line);
    }
}

/// The summary of a demo that served until stopped: the fake's records and
/// the store's dead letters (no scripted calls to count).
pub async fn interactive_summary(stage: &Stage<'_>) -> DemoSummary {
    let fake = stage.fake.stats();
    let mut dlq = DlqSummary::default();
    if let Ok(counts) = stage.runtime.store.dlq_counts().await {
        for c in counts {
            match c.state {
                DlqState::Pending => dlq.pending += c.count,
                DlqState::Delivered => dlq.delivered += c.count,
                DlqState::Parked => dlq.parked += c.count,
            }
        }
        dlq.dead_lettered = dlq.pending + dlq.delivered + dlq.parked;
    }
    let report = crate::health::report(&stage.runtime, &stage.probes).await;
    DemoSummary {
        scenario: None,
        seed: stage.seed,
        elapsed_ms: u64::try_from(stage.narrator.elapsed().as_millis()).unwrap_or(u64::MAX),
        rows: RowSummary {
            fake_rows: fake.rows,
            duplicate_deliveries: fake.duplicate_deliveries,
            ..RowSummary::default()
        },
        dlq,
        fake: Some(fake),
        final_health: Some(report.status),
        ..DemoSummary::default()
    }
}
