//! `GET /v1/breakers` and `POST /v1/breakers/{name}/{open,close,reset}`:
//! every operation's circuit breaker, and the admin's hand on it.
//!
//! Forcing is pinned until changed: `open` rejects every call (fail fast,
//! nothing reaches the upstream) and `close` admits every call while still
//! counting it, until the other is forced or `reset` returns the breaker to
//! closed with an empty window. Each action is a transition on the event
//! stream, even when the state does not change.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Json;
use axum::extract::{Path, State};
use serde::Serialize;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::AppState;
use super::error::{ApiError, Problem};
use crate::pipeline::breaker::{Breaker, BreakerState};
use crate::pipeline::compose::Pipeline;
use crate::policy::model::BreakerMode;

pub(super) fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list))
        .routes(routes!(open))
        .routes(routes!(close))
        .routes(routes!(reset))
}

/// Where a breaker stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum BreakerStateName {
    /// Calls pass and are counted.
    Closed,
    /// Calls fail fast until the reset timeout has passed.
    Open,
    /// A few trial calls pass; the rest fail fast.
    HalfOpen,
    /// Pinned open by an admin until closed or reset.
    ForcedOpen,
    /// Pinned closed by an admin until opened or reset.
    ForcedClosed,
}

impl From<BreakerState> for BreakerStateName {
    fn from(s: BreakerState) -> Self {
        match s {
            BreakerState::Closed => BreakerStateName::Closed,
            BreakerState::Open => BreakerStateName::Open,
            BreakerState::HalfOpen => BreakerStateName::HalfOpen,
            BreakerState::ForcedOpen => BreakerStateName::ForcedOpen,
            BreakerState::ForcedClosed => BreakerStateName::ForcedClosed,
        }
    }
}

/// Whether a breaker rejects calls or only reports what it would do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum BreakerModeName {
    /// Rejects calls while open.
    Enforce,
    /// Never rejects; counts what it would have rejected (shadow mode).
    MetricsOnly,
}

impl From<BreakerMode> for BreakerModeName {
    fn from(m: BreakerMode) -> Self {
        match m {
            BreakerMode::Enforce => BreakerModeName::Enforce,
            BreakerMode::MetricsOnly => BreakerModeName::MetricsOnly,
        }
    }
}

/// Every operation's breaker.
#[derive(Debug, Serialize, ToSchema)]
pub struct BreakerList {
    /// One per operation, by operation name.
    pub breakers: Vec<BreakerView>,
}

/// One operation's breaker: its state, rolling window and settings.
#[derive(Debug, Serialize, ToSchema)]
pub struct BreakerView {
    /// The operation the breaker guards.
    pub operation: String,
    /// Current state (a lapsed open state is noticed by the next call).
    pub state: BreakerStateName,
    /// `enforce` or `metrics_only`.
    pub mode: BreakerModeName,
    /// When the breaker entered this state (or was created), Unix milliseconds.
    pub since: u64,
    /// Calls in the rolling window now.
    pub window: WindowView,
    /// Failures as a whole percentage of the window's calls (0 when empty).
    pub failure_percentage: u8,
    /// Slow calls as a whole percentage of the window's calls.
    pub slow_percentage: u8,
    /// The reset timeout the next opening uses, in milliseconds (grows with
    /// `max_reset_timeout` after failed trials).
    pub reset_timeout_ms: u64,
    /// While open: milliseconds until a trial call may pass (0 once due).
    pub retry_after_ms: Option<u64>,
    /// Calls rejected since the breaker was created.
    pub rejected: u64,
    /// Calls a `metrics_only` breaker would have rejected since created.
    pub would_have_rejected: u64,
    /// Trial calls in flight while half-open.
    pub half_open_trials_in_flight: u32,
    /// The breaker's effective settings.
    pub config: BreakerConfigView,
}

/// Calls in a breaker's rolling window.
#[derive(Debug, Serialize, ToSchema)]
pub struct WindowView {
    /// Recorded calls (successes plus failures).
    pub calls: u64,
    /// Calls that counted as successes.
    pub successes: u64,
    /// Calls that counted as failures.
    pub failures: u64,
    /// Calls slower than the slow-call duration, whatever their verdict.
    pub slow: u64,
}

/// A breaker's effective settings.
#[derive(Debug, Serialize, ToSchema)]
pub struct BreakerConfigView {
    /// Failure percentage at or above which the breaker opens.
    pub error_threshold_percentage: u8,
    /// Calls the window must hold before the breaker may open.
    pub volume_threshold: u32,
    /// Length of the rolling window, in milliseconds.
    pub window_ms: u64,
    /// Buckets the window is split into.
    pub buckets: u32,
    /// Base reset timeout, in milliseconds.
    pub reset_timeout_ms: u64,
    /// Bound of the growing reset timeout, in milliseconds (absent: fixed).
    pub max_reset_timeout_ms: Option<u64>,
    /// Concurrent trial calls while half-open.
    pub half_open_trials: u32,
    /// Longest a half-open breaker waits for a verdict, in milliseconds.
    pub half_open_max_wait_ms: u64,
}

pub(super) fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn unix_millis(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, millis)
}

/// The view of `breaker`, guarding `operation`.
pub fn view(operation: &str, breaker: &Breaker) -> BreakerView {
    let s = breaker.snapshot();
    let c = breaker.config();
    BreakerView {
        operation: operation.to_owned(),
        state: s.state.into(),
        mode: s.mode.into(),
        since: unix_millis(s.since),
        window: WindowView {
            calls: s.window.calls,
            successes: s.window.successes,
            failures: s.window.failures,
            slow: s.window.slow,
        },
        failure_percentage: s.failure_percentage,
        slow_percentage: s.slow_percentage,
        reset_timeout_ms: s.reset_timeout_ms,
        retry_after_ms: s.retry_after_ms,
        rejected: s.rejected,
        would_have_rejected: s.would_have_rejected,
        half_open_trials_in_flight: s.half_open_trials_in_flight,
        config: BreakerConfigView {
            error_threshold_percentage: c.error_threshold_percentage,
            volume_threshold: c.volume_threshold,
            window_ms: millis(c.window),
            buckets: c.buckets,
            reset_timeout_ms: millis(c.reset_timeout),
            max_reset_timeout_ms: c.max_reset_timeout.map(millis),
            half_open_trials: c.half_open_trials,
            half_open_max_wait_ms: millis(c.half_open_max_wait),
        },
    }
}

/// The serving pipeline of `name`, or 404 `unknown_operation`.
pub(super) fn pipeline(state: &AppState, name: &str) -> Result<std::sync::Arc<Pipeline>, ApiError> {
    state
        .runtime()
        .compiled()
        .operations
        .get(name)
        .cloned()
        .ok_or_else(|| {
            ApiError::not_found(
                "unknown_operation",
                format!("no operation named `{name}` is serving"),
            )
        })
}

/// Lists every operation's breaker.
#[utoipa::path(
    get,
    path = "/v1/breakers",
    tag = "breakers",
    responses(
        (status = 200, description = "Every operation's breaker, by operation name", body = BreakerList),
    )
)]
pub async fn list(State(state): State<AppState>) -> Json<BreakerList> {
    let compiled = state.runtime().compiled();
    let breakers = compiled
        .operations
        .iter()
        .map(|(name, p)| view(name, &p.breaker))
        .collect();
    Json(BreakerList { breakers })
}

/// Forces the breaker open: every call fails fast until closed or reset.
#[utoipa::path(
    post,
    path = "/v1/breakers/{name}/open",
    tag = "breakers",
    params(("name" = String, Path, description = "Operation name")),
    responses(
        (status = 200, description = "The breaker after the change (`forced_open`)", body = BreakerView),
        (status = 404, description = "No such operation (`unknown_operation`)", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn open(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<BreakerView>, ApiError> {
    let p = pipeline(&state, &name)?;
    p.breaker.force_open();
    tracing::warn!(operation = %name, "breaker forced open by admin");
    Ok(Json(view(&name, &p.breaker)))
}

/// Forces the breaker closed: no call fails fast (calls still count) until
/// opened or reset.
#[utoipa::path(
    post,
    path = "/v1/breakers/{name}/close",
    tag = "breakers",
    params(("name" = String, Path, description = "Operation name")),
    responses(
        (status = 200, description = "The breaker after the change (`forced_closed`)", body = BreakerView),
        (status = 404, description = "No such operation (`unknown_operation`)", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn close(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<BreakerView>, ApiError> {
    let p = pipeline(&state, &name)?;
    p.breaker.force_closed();
    tracing::warn!(operation = %name, "breaker forced closed by admin");
    Ok(Json(view(&name, &p.breaker)))
}

/// Resets the breaker: closed, with an empty window and the base reset
/// timeout (whatever its state, forced ones included).
#[utoipa::path(
    post,
    path = "/v1/breakers/{name}/reset",
    tag = "breakers",
    params(("name" = String, Path, description = "Operation name")),
    responses(
        (status = 200, description = "The breaker after the change (`closed`)", body = BreakerView),
        (status = 404, description = "No such operation (`unknown_operation`)", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn reset(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<BreakerView>, ApiError> {
    let p = pipeline(&state, &name)?;
    p.breaker.reset();
    tracing::info!(operation = %name, "breaker reset by admin");
    Ok(Json(view(&name, &p.breaker)))
}
