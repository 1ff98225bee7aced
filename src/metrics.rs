//! Prometheus metrics (prometheus-client, an explicit registry: no global
//! state, so every test and every runtime has its own).
//!
//! Counters and histograms are recorded where things happen (invoke,
//! redrive, reload); gauges that describe state (breakers, bulkheads, DLQ
//! size) are refreshed from snapshots right before each scrape, so they
//! cost nothing between scrapes and cannot drift.

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Labels: an operation.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OpLabels {
    /// The operation.
    pub operation: String,
}

/// Labels: an operation and how its call ended.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    /// The operation.
    pub operation: String,
    /// `ok`, `fallback`, `queued` or `failed`.
    pub status: String,
    /// `ok`, or the failure code (for fallbacks and queued calls, the cause).
    pub code: String,
}

/// Labels: an operation and a staleness level.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StalenessLabels {
    /// The operation.
    pub operation: String,
    /// `fresh`, `stale`, `very_stale` or `static`.
    pub staleness: String,
}

/// Labels: an operation and a state.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabels {
    /// The operation.
    pub operation: String,
    /// The state.
    pub state: String,
}

/// Labels: a breaker transition.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TransitionLabels {
    /// The operation.
    pub operation: String,
    /// The state entered.
    pub to: String,
}

/// Labels: an upstream's bulkhead class.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ClassLabels {
    /// The upstream.
    pub upstream: String,
    /// The priority class.
    pub priority: String,
}

/// Labels: an upstream.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UpstreamLabels {
    /// The upstream.
    pub upstream: String,
}

/// Labels: a reload result.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReloadLabels {
    /// `applied`, `unchanged` or `refused`.
    pub result: String,
}

/// Every metric claygate exports, and the registry that encodes them.
pub struct Metrics {
    registry: Registry,
    /// Invokes by operation, status and code.
    pub invokes: Family<OutcomeLabels, Counter>,
    /// Invoke latency in seconds, by operation.
    pub latency: Family<OpLabels, Histogram>,
    /// Retries sent (attempts beyond the first), by operation.
    pub retries: Family<OpLabels, Counter>,
    /// Fallback answers served, by operation and staleness.
    pub fallbacks: Family<StalenessLabels, Counter>,
    /// Answers replayed or shared by the idempotency layer, by operation.
    pub idempotent_replays: Family<OpLabels, Counter>,
    /// Breaker state per operation: 1 for the current state's label, else 0.
    pub breaker_state: Family<StateLabels, Gauge>,
    /// Breaker transitions, by operation and state entered.
    pub breaker_transitions: Family<TransitionLabels, Counter>,
    /// Bulkhead slots in use, by upstream and class.
    pub bulkhead_in_use: Family<ClassLabels, Gauge>,
    /// Bulkhead waiters, by upstream and class.
    pub bulkhead_queued: Family<ClassLabels, Gauge>,
    /// Dead letters by operation and state.
    pub dlq_entries: Family<StateLabels, Gauge>,
    /// Dead letters written, by operation.
    pub dead_lettered: Family<OpLabels, Counter>,
    /// Dead letters delivered by redrive, by operation.
    pub redelivered: Family<OpLabels, Counter>,
    /// Dead letters parked, by operation.
    pub parked: Family<OpLabels, Counter>,
    /// Alert webhooks that could not be delivered.
    pub alert_failures: Counter,
    /// Upstream probe result: 1 passing, 0 failing.
    pub probe_up: Family<UpstreamLabels, Gauge>,
    /// Policy reload attempts by result.
    pub reloads: Family<ReloadLabels, Counter>,
    /// Reload duration in seconds (load, validate, compile, swap).
    pub reload_seconds: Histogram,
    /// Unix time of the serving generation's load.
    pub generation_loaded: Gauge<f64, AtomicU64>,
}

impl Metrics {
    /// Registers every metric in a fresh registry, prefixed `claygate_`.
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("claygate");
        let m = Metrics {
            invokes: Family::default(),
            latency: Family::new_with_constructor(latency_histogram as fn() -> Histogram),
            retries: Family::default(),
            fallbacks: Family::default(),
            idempotent_replays: Family::default(),
            breaker_state: Family::default(),
            breaker_transitions: Family::default(),
            bulkhead_in_use: Family::default(),
            bulkhead_queued: Family::default(),
            dlq_entries: Family::default(),
            dead_lettered: Family::default(),
            redelivered: Family::default(),
            parked: Family::default(),
            alert_failures: Counter::default(),
            probe_up: Family::default(),
            reloads: Family::default(),
            reload_seconds: Histogram::new(exponential_buckets(0.001, 2.0, 14)),
            generation_loaded: Gauge::default(),
            registry: Registry::default(),
        };
        registry.register(
            "invokes",
            "Invokes by operation, status and code",
            m.invokes.clone(),
        );
        registry.register(
            "invoke_duration_seconds",
            "Invoke latency by operation",
            m.latency.clone(),
        );
        registry.register("retries", "Retries sent, by operation", m.retries.clone());
        registry.register(
            "fallbacks",
            "Fallback answers served, by operation and staleness",
            m.fallbacks.clone(),
        );
        registry.register(
            "idempotent_replays",
            "Answers replayed or shared by the idempotency layer",
            m.idempotent_replays.clone(),
        );
        registry.register(
            "breaker_state",
            "Breaker state per operation (1 for the current state)",
            m.breaker_state.clone(),
        );
        registry.register(
            "breaker_transitions",
            "Breaker transitions by operation and state entered",
            m.breaker_transitions.clone(),
        );
        registry.register(
            "bulkhead_in_use",
            "Bulkhead slots in use by upstream and class",
            m.bulkhead_in_use.clone(),
        );
        registry.register(
            "bulkhead_queued",
            "Bulkhead waiters by upstream and class",
            m.bulkhead_queued.clone(),
        );
        registry.register(
            "dlq_entries",
            "Dead letters by operation and state",
            m.dlq_entries.clone(),
        );
        registry.register(
            "dead_lettered",
            "Calls written to the DLQ, by operation",
            m.dead_lettered.clone(),
        );
        registry.register(
            "dlq_redelivered",
            "Dead letters delivered by redrive, by operation",
            m.redelivered.clone(),
        );
        registry.register(
            "dlq_parked",
            "Dead letters parked, by operation",
            m.parked.clone(),
        );
        registry.register(
            "dlq_alert_failures",
            "Alert webhooks that could not be delivered",
            m.alert_failures.clone(),
        );
        registry.register(
            "probe_up",
            "Upstream probe result (1 passing, 0 failing)",
            m.probe_up.clone(),
        );
        registry.register(
            "reloads",
            "Policy reload attempts by result",
            m.reloads.clone(),
        );
        registry.register(
            "reload_duration_seconds",
            "Policy reload duration",
            m.reload_seconds.clone(),
        );
        registry.register(
            "generation_loaded_timestamp_seconds",
            "When the serving policy generation was loaded",
            m.generation_loaded.clone(),
        );
        Metrics { registry, ..m }
    }

    /// The registry in Prometheus text format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

/// Invoke latency buckets: 250 µs doubling to about 65 s.
fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.000_25, 2.0, 19))
}

/// Labels of one operation.
pub fn op(operation: &str) -> OpLabels {
    OpLabels {
        operation: operation.to_owned(),
    }
}
