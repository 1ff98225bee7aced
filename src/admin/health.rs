//! Admin endpoints: health and metrics. They stay open when an admin token
//! is set (the router merges them outside the token check), so load
//! balancers, Kubernetes probes and Prometheus need no credential; none of
//! them answers a secret.
//!
//! - `GET /health`: every operation and probed upstream ([`crate::health::report`]);
//!   200 for healthy and degraded, 503 for unhealthy.
//! - `GET /health/live`: the process only (never Clay), so an upstream
//!   outage does not get pods restarted.
//! - `GET /health/ready`: policies loaded, the store answering, not draining.
//! - `GET /metrics`: OpenMetrics text, state gauges refreshed first.

use std::collections::BTreeMap;
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::AppState;
use crate::health::{Check, HealthReport, Status};

/// The health-check response draft's media type.
pub const HEALTH_JSON: &str = "application/health+json";
/// OpenMetrics text, as Prometheus negotiates it.
pub const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// Longest readiness waits for the store.
const READY_STORE_TIMEOUT: Duration = Duration::from_secs(1);

pub(super) fn routes() -> OpenApiRouter<super::AppState> {
    OpenApiRouter::new()
        .routes(routes!(health))
        .routes(routes!(live))
        .routes(routes!(ready))
        .routes(routes!(metrics))
}

/// `report` as `application/health+json`: 503 when unhealthy, else 200.
fn answer(report: &HealthReport) -> Response {
    let status = if report.status == Status::Unhealthy {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        StatusCode::OK
    };
    let mut response = (status, axum::Json(report)).into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(HEALTH_JSON));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// The health of every operation and probed upstream, with reasons.
#[utoipa::path(
    get,
    path = "/health",
    tag = "health",
    security(()),
    responses(
        (status = 200, description = "Healthy or degraded: calls are answered (perhaps from a fallback or the DLQ)", body = HealthReport, content_type = "application/health+json"),
        (status = 503, description = "Unhealthy: some operation's calls fail (probe failing, or breaker open without a fallback or DLQ)", body = HealthReport, content_type = "application/health+json"),
    )
)]
pub async fn health(State(state): State<AppState>) -> Response {
    let report = crate::health::report(state.runtime(), &state.shared.probes).await;
    answer(&report)
}

/// Liveness: the process answers. Never looks at upstreams or the store.
#[utoipa::path(
    get,
    path = "/health/live",
    tag = "health",
    security(()),
    responses(
        (status = 200, description = "The process is running", body = HealthReport, content_type = "application/health+json"),
    )
)]
pub async fn live(State(state): State<AppState>) -> Response {
    let now = state.runtime().clock.now();
    answer(&HealthReport::new(BTreeMap::new(), now))
}

/// Readiness: policies loaded, the store answers a cheap query, and the
/// server is not draining.
#[utoipa::path(
    get,
    path = "/health/ready",
    tag = "health",
    security(()),
    responses(
        (status = 200, description = "Ready to take calls", body = HealthReport, content_type = "application/health+json"),
        (status = 503, description = "Not ready: draining, or the store does not answer; `output` says why", body = HealthReport, content_type = "application/health+json"),
    )
)]
pub async fn ready(State(state): State<AppState>) -> Response {
    let runtime = state.runtime();
    let now = runtime.clock.now();
    let mut checks = BTreeMap::new();

    let compiled = runtime.compiled();
    let generation = state
        .shared
        .reloader
        .as_ref()
        .map(|r| format!("generation {} ", short(&r.current().hash)))
        .unwrap_or_default();
    let mut policies = Check::new(
        "policies",
        Status::Healthy,
        vec![format!(
            "{generation}serving {} operation(s)",
            compiled.operations.len()
        )],
        now,
    );
    policies.observed_value = Some(compiled.operations.len().into());
    checks.insert("policies:loaded".to_owned(), vec![policies]);

    // A primary-key lookup that matches nothing: one indexed read.
    let store = match tokio::time::timeout(
        READY_STORE_TIMEOUT,
        runtime.store.idempotency_get("", ""),
    )
    .await
    {
        Ok(Ok(_)) => Check::new("datastore", Status::Healthy, Vec::new(), now),
        Ok(Err(e)) => Check::new(
            "datastore",
            Status::Unhealthy,
            vec![format!("the store failed a read: {e}")],
            now,
        ),
        Err(_) => Check::new(
            "datastore",
            Status::Unhealthy,
            vec!["the store did not answer within 1s".to_owned()],
            now,
        ),
    };
    checks.insert("store:read".to_owned(), vec![store]);

    let draining = if state.draining() {
        Check::new(
            "server",
            Status::Unhealthy,
            vec!["draining: claygate is shutting down and takes no new calls".to_owned()],
            now,
        )
    } else {
        Check::new("server", Status::Healthy, Vec::new(), now)
    };
    checks.insert("server:draining".to_owned(), vec![draining]);

    let mut report = HealthReport::new(checks, now);
    if report.status != Status::Healthy {
        // Say why, not only which check.
        let why: Vec<&str> = report
            .checks
            .values()
            .flatten()
            .filter(|c| c.status != Status::Healthy)
            .filter_map(|c| c.output.as_deref())
            .collect();
        report.output = Some(why.join("; "));
    }
    answer(&report)
}

/// The first 12 characters of a generation hash.
fn short(hash: &str) -> &str {
    hash.get(..12).unwrap_or(hash)
}

/// Prometheus metrics in OpenMetrics text; breaker, bulkhead, DLQ and
/// probe gauges are refreshed from the serving generation first.
#[utoipa::path(
    get,
    path = "/metrics",
    tag = "health",
    security(()),
    responses(
        (status = 200, description = "Every claygate metric, prefixed `claygate_`", body = String, content_type = "application/openmetrics-text; version=1.0.0; charset=utf-8"),
    )
)]
pub async fn metrics(State(state): State<AppState>) -> Response {
    let text = crate::health::encode_metrics(state.runtime(), &state.shared.probes).await;
    let mut response = (StatusCode::OK, text).into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(OPENMETRICS));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn health_routes_are_documented_under_the_health_tag() {
        let api = super::super::openapi();
        for path in ["/health", "/health/live", "/health/ready", "/metrics"] {
            let item = api
                .paths
                .paths
                .get(path)
                .unwrap_or_else(|| panic!("{path} is not in the OpenAPI description"));
            let get = item.get.as_ref().unwrap_or_else(|| panic!("GET {path}"));
            assert_eq!(
                get.tags.as_deref(),
                Some(&["health".to_owned()][..]),
                "{path}"
            );
            // Open even with a token: an empty security requirement.
            assert!(
                get.security.as_ref().is_some_and(|s| !s.is_empty()),
                "{path}"
            );
        }
        let schemas = &api.components.as_ref().expect("components").schemas;
        assert!(schemas.contains_key("HealthReport") && schemas.contains_key("Check"));
    }

    #[test]
    fn short_hashes() {
        assert_eq!(short("0123456789abcdef"), "0123456789ab");
        assert_eq!(short("abc"), "abc");
    }
}
