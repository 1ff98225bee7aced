//! The policy language as Rust types: what one policy file may say.
//!
//! These types are deserialized from a document that already passed the JSON
//! Schema, so their job is to carry meaning, not to explain errors. They are
//! `Eq` (durations in milliseconds, ratios as integers, no floats) so reload
//! can tell "changed" from "unchanged" by comparing values.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// One policy file: a YAML document of the policy language, version 1.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyFile {
    /// Language version; only `1` exists.
    pub version: u32,
    /// Named upstream services (base URL, headers, rate limit, bulkhead classes).
    #[serde(default)]
    pub upstreams: BTreeMap<String, Upstream>,
    /// Named timeout classes; `connect` bounds connection set-up for every call.
    #[serde(default)]
    pub timeouts: BTreeMap<String, Duration>,
    /// Layer settings merged under every operation.
    pub defaults: Option<Defaults>,
    /// Thresholds of the health report.
    pub health: Option<HealthPolicy>,
    /// Named outbound operations.
    #[serde(default)]
    pub operations: BTreeMap<String, Operation>,
}

/// An upstream HTTP service shared by several operations.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Upstream {
    /// Scheme, host and optional path prefix; may hold `${env:…}` references.
    pub base_url: String,
    /// Headers sent on every call; values may hold `${env:…}` references.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// Token bucket shared by every operation of this upstream.
    pub rate_limit: Option<RateLimit>,
    /// Background health probe.
    pub probe: Option<Probe>,
    /// Bulkhead classes of this upstream, by priority name.
    #[serde(default)]
    pub priorities: BTreeMap<Priority, PriorityClass>,
    /// Cap on concurrent calls across all classes; freed slots go to the highest waiting priority.
    pub max_concurrency: Option<u32>,
    /// Largest response body accepted, in bytes; 8 MiB unless said.
    pub max_response_bytes: Option<u64>,
}

/// A token bucket: `per_second` sustained, `burst` at once.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimit {
    /// Sustained calls per second.
    pub per_second: u32,
    /// Bucket size; defaults to `per_second`.
    pub burst: Option<u32>,
    /// Share of the bucket (percent) only `critical` calls may spend.
    pub critical_reserve_percent: Option<u8>,
}

/// A periodic health probe of an upstream.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Probe {
    /// HTTP method of the probe; `GET` unless said.
    #[serde(default = "Method::get")]
    pub method: Method,
    /// Path below the upstream's base URL.
    pub path: String,
    /// Time between probes; 15s unless said.
    pub interval: Option<Duration>,
    /// Time a probe may take; 5s unless said.
    pub timeout: Option<Duration>,
}

/// The bulkhead priority classes, highest first.
///
/// The set is fixed so that "higher" has one meaning everywhere: freed slots of
/// a shared `max_concurrency` go to `critical` first, `bulk` last.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Priority {
    /// User-facing, latency-critical calls; never starved.
    Critical,
    /// Important interactive work.
    High,
    /// The default class.
    Normal,
    /// Background work that may wait.
    Low,
    /// Batch work; served last.
    Bulk,
}

impl Priority {
    /// Every class, highest first.
    pub const ALL: [Priority; 5] = [
        Priority::Critical,
        Priority::High,
        Priority::Normal,
        Priority::Low,
        Priority::Bulk,
    ];

    /// The name used in policy files.
    pub fn as_str(self) -> &'static str {
        match self {
            Priority::Critical => "critical",
            Priority::High => "high",
            Priority::Normal => "normal",
            Priority::Low => "low",
            Priority::Bulk => "bulk",
        }
    }
}

impl fmt::Display for Priority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Limits of one bulkhead class.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PriorityClass {
    /// Calls of this class in flight at once.
    pub concurrency: u32,
    /// Callers that may wait for a slot; a full queue rejects at once.
    pub queue: u32,
    /// How long a caller may wait for a slot.
    pub queue_timeout: Duration,
}

/// Settings merged under every operation.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Defaults {
    /// Default circuit breaker.
    pub breaker: Option<BreakerPolicy>,
    /// Default retry policy.
    pub retry: Option<RetryPolicy>,
    /// Default attempt timeout: a class name or a duration.
    pub timeout: Option<TimeoutRef>,
    /// Default bulkhead class.
    pub priority: Option<Priority>,
}

/// Thresholds of `/health`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct HealthPolicy {
    /// An operation is degraded while its DLQ holds more than this many entries.
    pub dlq_degraded_above: Option<u32>,
    /// An operation is degraded for this long after it answered from its
    /// fallback (default 60s).
    pub fallback_window: Option<Duration>,
}

/// One outbound operation: where it goes and how it is protected.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Operation {
    /// Name of the upstream it calls.
    pub upstream: String,
    /// Free text for operators.
    pub description: Option<String>,
    /// The HTTP request, templated over the params.
    pub request: RequestTemplate,
    /// JSON Schema the invoke params must satisfy.
    pub params_schema: Option<serde_json::Value>,
    /// Attempt timeout: a class name from `timeouts` or a duration.
    pub timeout: Option<TimeoutRef>,
    /// Total budget of a call: queueing, every attempt and back-off.
    pub deadline: Option<Duration>,
    /// Bulkhead class of the upstream.
    pub priority: Option<Priority>,
    /// Circuit breaker, merged over `defaults.breaker`.
    pub breaker: Option<BreakerPolicy>,
    /// Retry policy, merged over `defaults.retry`.
    pub retry: Option<RetryPolicy>,
    /// Deduplication of calls by key.
    pub idempotency: Option<IdempotencyPolicy>,
    /// What to serve when the call fails.
    pub fallback: Option<FallbackPolicy>,
    /// Durable dead-letter queue for calls that fail for good.
    pub dlq: Option<DlqPolicy>,
}

/// An HTTP method claygate can send.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Method {
    /// GET
    Get,
    /// HEAD
    Head,
    /// POST
    Post,
    /// PUT
    Put,
    /// PATCH
    Patch,
    /// DELETE
    Delete,
}

impl Method {
    fn get() -> Method {
        Method::Get
    }

    /// The method's name on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Method::Get => "GET",
            Method::Head => "HEAD",
            Method::Post => "POST",
            Method::Put => "PUT",
            Method::Patch => "PATCH",
            Method::Delete => "DELETE",
        }
    }

    /// Whether repeating the request may apply it twice (RFC 9110 §9.2.2).
    pub fn is_idempotent(self) -> bool {
        !matches!(self, Method::Post | Method::Patch)
    }
}

/// The request an operation sends, with `{{ params.x }}` placeholders.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RequestTemplate {
    /// HTTP method.
    pub method: Method,
    /// Path below the upstream's base URL; placeholders are percent-encoded.
    pub path: String,
    /// Query parameters.
    #[serde(default)]
    pub query: BTreeMap<String, String>,
    /// Extra headers of this operation.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// JSON body; a string that is exactly one placeholder keeps the param's type.
    pub body: Option<serde_json::Value>,
}

/// An attempt timeout: a named class from `timeouts`, or a literal duration.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum TimeoutRef {
    /// A class of the `timeouts` section.
    Class(String),
    /// A literal duration.
    Literal(Duration),
}

impl<'de> Deserialize<'de> for TimeoutRef {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        Ok(match Duration::parse(&text) {
            Ok(duration) => TimeoutRef::Literal(duration),
            Err(_) => TimeoutRef::Class(text),
        })
    }
}

impl Serialize for TimeoutRef {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            TimeoutRef::Class(name) => s.serialize_str(name),
            TimeoutRef::Literal(duration) => duration.serialize(s),
        }
    }
}

/// Circuit breaker settings; unset fields come from `defaults.breaker`, then built-ins.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct BreakerPolicy {
    /// `enforce` rejects while open; `metrics_only` only reports what it would do.
    pub mode: Option<BreakerMode>,
    /// Failure percentage of the window at or above which the breaker opens.
    pub error_threshold_percentage: Option<u8>,
    /// Calls the window must hold before the breaker may open.
    pub volume_threshold: Option<u32>,
    /// Length of the rolling window.
    pub window: Option<Duration>,
    /// Buckets the window is split into.
    pub buckets: Option<u32>,
    /// How long the breaker stays open before half-opening.
    pub reset_timeout: Option<Duration>,
    /// Upper bound when the reset timeout doubles after each failed trial.
    pub max_reset_timeout: Option<Duration>,
    /// Concurrent trial calls admitted while half-open.
    pub half_open_trials: Option<u32>,
    /// A half-open breaker without a verdict for this long opens again.
    pub half_open_max_wait: Option<Duration>,
    /// Slow calls counted as failures.
    pub slow_call: Option<SlowCall>,
    /// Outcomes that count as failures.
    pub failure_on: Option<Vec<Condition>>,
}

/// Whether a breaker rejects calls or only records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BreakerMode {
    /// Reject calls while open.
    Enforce,
    /// Record and report "would have opened", never reject.
    MetricsOnly,
}

/// Slow-call detection of a breaker.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SlowCall {
    /// A call slower than this is slow.
    pub duration: Duration,
    /// Slow-call percentage of the window at or above which the breaker opens.
    pub threshold_percentage: u8,
}

/// An outcome class a breaker or retry policy reacts to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Condition {
    /// The connection could not be set up (refused, unreachable, connect timeout).
    ConnectError,
    /// The connection broke after it was set up (reset, malformed reply); the
    /// request may have reached the upstream.
    TransportError,
    /// An attempt timed out.
    Timeout,
    /// Any 5xx status.
    ServerError,
    /// One HTTP status code.
    Status(u16),
}

impl Condition {
    /// The spelling used in policy files.
    pub fn name(self) -> String {
        match self {
            Condition::ConnectError => "connect_error".into(),
            Condition::TransportError => "transport_error".into(),
            Condition::Timeout => "timeout".into(),
            Condition::ServerError => "5xx".into(),
            Condition::Status(code) => code.to_string(),
        }
    }
}

impl<'de> Deserialize<'de> for Condition {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Status(u16),
            Name(String),
        }
        match Raw::deserialize(d)? {
            Raw::Status(code) if (100..=599).contains(&code) => Ok(Condition::Status(code)),
            Raw::Status(code) => Err(serde::de::Error::custom(format!(
                "status {code} is outside 100..=599"
            ))),
            Raw::Name(name) => match name.as_str() {
                "connect_error" => Ok(Condition::ConnectError),
                "transport_error" => Ok(Condition::TransportError),
                "timeout" => Ok(Condition::Timeout),
                "5xx" => Ok(Condition::ServerError),
                other => Err(serde::de::Error::custom(format!(
                    "unknown condition `{other}`"
                ))),
            },
        }
    }
}

impl Serialize for Condition {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Condition::Status(code) => s.serialize_u16(*code),
            other => s.serialize_str(&other.name()),
        }
    }
}

/// Retry settings; unset fields come from `defaults.retry`, then built-ins.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RetryPolicy {
    /// Attempts in all, the first included; `1` disables retry.
    pub max_attempts: Option<u32>,
    /// Back-off between attempts.
    pub backoff: Option<Backoff>,
    /// Outcomes worth another attempt.
    pub on: Option<Vec<Condition>>,
    /// Honour `Retry-After` and `x-ratelimit-reset` (never past the deadline).
    pub respect_retry_after: Option<bool>,
    /// Retries allowed as a percentage of the calls in the breaker window.
    pub budget_percent: Option<u8>,
}

/// Exponential back-off: `initial * multiplier^n`, capped at `max`, with jitter.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Backoff {
    /// Delay before the first retry.
    pub initial: Duration,
    /// Growth factor per attempt, 1 to 10.
    #[serde(default = "Multiplier::two")]
    pub multiplier: Multiplier,
    /// Largest delay.
    pub max: Duration,
    /// How delays are randomised.
    #[serde(default = "Jitter::full")]
    pub jitter: Jitter,
}

/// How back-off delays are randomised.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Jitter {
    /// Uniform in `0..=delay` (AWS "full jitter"); spreads retries best.
    Full,
    /// Uniform in `delay/2..=delay`.
    Equal,
    /// Exactly the delay; for tests and strict pacing.
    None,
}

impl Jitter {
    fn full() -> Jitter {
        Jitter::Full
    }
}

/// A back-off growth factor stored in thousandths, so policies stay `Eq`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Multiplier(u32);

impl Multiplier {
    fn two() -> Multiplier {
        Multiplier(2000)
    }

    /// A factor given in thousandths (`1500` is 1.5).
    pub const fn from_millis(millis: u32) -> Multiplier {
        Multiplier(millis)
    }

    /// The factor in thousandths (`2000` is 2.0).
    pub fn millis(self) -> u32 {
        self.0
    }
}

impl<'de> Deserialize<'de> for Multiplier {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let value = f64::deserialize(d)?;
        if !(1.0..=10.0).contains(&value) {
            return Err(serde::de::Error::custom(format!(
                "multiplier {value} is outside 1..=10"
            )));
        }
        // In range 1..=10, so the product fits a u32 exactly enough.
        Ok(Multiplier((value * 1000.0).round() as u32))
    }
}

impl Serialize for Multiplier {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_f64(f64::from(self.0) / 1000.0)
    }
}

impl fmt::Display for Multiplier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let whole = self.0 / 1000;
        let frac = self.0 % 1000;
        if frac == 0 {
            write!(f, "{whole}")
        } else {
            let digits = format!("{frac:03}");
            write!(f, "{whole}.{}", digits.trim_end_matches('0'))
        }
    }
}

/// Deduplication of calls.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct IdempotencyPolicy {
    /// Params whose values (with the operation name) form the key.
    pub key: Vec<String>,
    /// How long a completed result is replayed.
    pub ttl: Option<Duration>,
    /// Header that carries the key upstream.
    pub header: Option<String>,
    /// A duplicate of a call in flight waits for its result, or is rejected with 409.
    pub on_concurrent: Option<OnConcurrent>,
    /// How long an in-flight record holds its key before a crash is assumed.
    pub lease: Option<Duration>,
}

/// What a duplicate of an in-flight call gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum OnConcurrent {
    /// Wait for the first call and share its result.
    Wait,
    /// Answer 409 at once.
    Reject,
}

/// What is served when a call fails.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct FallbackPolicy {
    /// Serve a cached success, labelled by age.
    pub cache: Option<CacheFallback>,
    /// Serve this value when no cached answer is young enough.
    #[serde(rename = "static")]
    pub static_value: Option<serde_json::Value>,
}

/// Staleness limits of cached fallbacks; older than `very_stale` is never served.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CacheFallback {
    /// Age up to which an answer is `fresh`.
    pub fresh: Duration,
    /// Age up to which an answer is `stale`.
    pub stale: Duration,
    /// Age up to which an answer is `very_stale`; the cache keeps entries this long.
    pub very_stale: Duration,
    /// Params that form the cache key; all params unless said.
    pub key: Option<Vec<String>>,
    /// Entries kept in memory.
    pub max_entries: Option<u32>,
    /// Bytes of cached answers kept in memory; 64 MiB unless said.
    pub max_bytes: Option<u64>,
}

/// Dead-letter queue settings of an operation.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DlqPolicy {
    /// Redrive attempts before an entry is parked.
    pub max_attempts: Option<u32>,
    /// Back-off between redrive attempts.
    pub backoff: Option<Backoff>,
    /// Redrives per second at most.
    pub redrive_rate: Option<u32>,
    /// How long delivered and parked entries are kept.
    pub retention: Option<Duration>,
    /// Where parked entries are announced.
    pub alert: Option<Alert>,
}

/// Alert channel for parked dead letters.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Alert {
    /// URL that receives a POST with the parked entry; empty disables it.
    pub webhook: Option<String>,
}

/// A span of time, kept in whole milliseconds.
///
/// Written `250ms`, `30s`, `5m`, `24h` or `7d` in policy files.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Duration {
    millis: u64,
}

/// Why a duration string was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{0}` is not a duration such as 250ms, 30s, 5m, 24h or 7d")]
pub struct DurationError(String);

impl Duration {
    /// A duration of `millis` milliseconds.
    pub const fn from_millis(millis: u64) -> Duration {
        Duration { millis }
    }

    /// A duration of `secs` seconds.
    pub const fn from_secs(secs: u64) -> Duration {
        Duration {
            millis: secs * 1000,
        }
    }

    /// Whole milliseconds.
    pub fn as_millis(self) -> u64 {
        self.millis
    }

    /// As a standard library duration.
    pub fn to_std(self) -> std::time::Duration {
        std::time::Duration::from_millis(self.millis)
    }

    /// Parses `<digits><unit>` with unit `ms`, `s`, `m`, `h` or `d`.
    ///
    /// ```
    /// use claygate::policy::model::Duration;
    ///
    /// assert_eq!(Duration::parse("250ms").map(|d| d.as_millis()), Ok(250));
    /// assert_eq!(Duration::parse("5m").map(|d| d.to_string()), Ok("5m".to_owned()));
    /// assert!(Duration::parse("10 seconds").is_err());
    /// ```
    pub fn parse(text: &str) -> Result<Duration, DurationError> {
        let fail = || DurationError(text.to_owned());
        let split = text.find(|c: char| !c.is_ascii_digit()).ok_or_else(fail)?;
        let (digits, unit) = text.split_at(split);
        if digits.is_empty() || digits.len() > 12 {
            return Err(fail());
        }
        let n: u64 = digits.parse().map_err(|_| fail())?;
        let scale = match unit {
            "ms" => 1,
            "s" => 1_000,
            "m" => 60_000,
            "h" => 3_600_000,
            "d" => 86_400_000,
            _ => return Err(fail()),
        };
        n.checked_mul(scale)
            .map(Duration::from_millis)
            .ok_or_else(fail)
    }
}

impl fmt::Display for Duration {
    /// The largest unit that divides the value exactly: `90s`, `2h`, `250ms`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = self.millis;
        for (unit, scale) in [
            ("d", 86_400_000),
            ("h", 3_600_000),
            ("m", 60_000),
            ("s", 1_000),
        ] {
            if ms != 0 && ms.is_multiple_of(scale) {
                return write!(f, "{}{unit}", ms / scale);
            }
        }
        write!(f, "{ms}ms")
    }
}

impl<'de> Deserialize<'de> for Duration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        Duration::parse(&text).map_err(serde::de::Error::custom)
    }
}

impl Serialize for Duration {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_and_print_in_the_largest_exact_unit() {
        assert_eq!(Duration::parse("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(Duration::parse("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(Duration::parse("5m").map(|d| d.as_millis()), Ok(300_000));
        assert_eq!(
            Duration::parse("24h").map(|d| d.as_millis()),
            Ok(86_400_000)
        );
        assert_eq!(
            Duration::parse("90s").map(|d| d.to_string()),
            Ok("90s".into())
        );
        assert_eq!(
            Duration::parse("120s").map(|d| d.to_string()),
            Ok("2m".into())
        );
        assert_eq!(Duration::from_millis(0).to_string(), "0ms");
        for bad in [
            "",
            "s",
            "10",
            "1.5s",
            "-1s",
            "10 s",
            "5w",
            "999999999999999d",
        ] {
            assert!(Duration::parse(bad).is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn multipliers_keep_three_decimals() {
        let m: Multiplier = serde_json::from_str("1.5").expect("valid multiplier");
        assert_eq!(m.millis(), 1500);
        assert_eq!(m.to_string(), "1.5");
        assert!(serde_json::from_str::<Multiplier>("0.5").is_err());
        assert!(serde_json::from_str::<Multiplier>("11").is_err());
    }

    #[test]
    fn conditions_read_names_and_status_codes() {
        let c: Vec<Condition> =
            serde_json::from_str(r#"["connect_error","timeout","5xx",429]"#).expect("valid");
        assert_eq!(
            c,
            vec![
                Condition::ConnectError,
                Condition::Timeout,
                Condition::ServerError,
                Condition::Status(429)
            ]
        );
        assert!(serde_json::from_str::<Condition>("700").is_err());
        assert!(serde_json::from_str::<Condition>("\"4xx\"").is_err());
    }
}
