//! `GET /v1/operations` and `GET /v1/operations/{name}`: what each
//! operation of the serving generation does, and how it is doing.
//!
//! The list gives the gist of every operation with its live stats; one
//! operation answers its effective policy layer by layer (the same
//! explanation as `claygate explain --format json`) plus the same stats.
//!
//! Nothing here shows a header value or an expanded `base_url`: headers are
//! listed by name only, and the base URL is shown as written in the policy
//! (with any credentials or query string masked), never as expanded from
//! the environment.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, State};
use serde::Serialize;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::AppState;
use super::breakers::{BreakerStateName, BreakerView, millis};
use super::error::{ApiError, Problem};
use crate::compile::Compiled;
use crate::pipeline::compose::Pipeline;
use crate::store::{DlqCount, DlqState};

pub(super) fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list))
        .routes(routes!(get_one))
}

/// Every operation of the serving generation.
#[derive(Debug, Serialize, ToSchema)]
pub struct OperationList {
    /// The serving generation's hash (absent when the policies are not reloadable).
    pub generation: Option<String>,
    /// The operations, by name.
    pub operations: Vec<OperationSummary>,
}

/// The gist of one operation.
#[derive(Debug, Serialize, ToSchema)]
pub struct OperationSummary {
    /// The operation's name.
    pub name: String,
    /// The upstream it calls.
    pub upstream: String,
    /// HTTP method sent upstream.
    pub method: String,
    /// Path template below the upstream's base URL, e.g. `/v1/tables/{{ params.table_id }}/rows`.
    pub path: String,
    /// Bulkhead class the operation runs at.
    pub priority: String,
    /// Timeout of one attempt, in milliseconds.
    pub attempt_timeout_ms: u64,
    /// Budget of the whole call, in milliseconds (absent: none).
    pub deadline_ms: Option<u64>,
    /// Connection set-up bound of the upstream, in milliseconds.
    pub connect_timeout_ms: u64,
    /// Attempts per call, the first included.
    pub max_attempts: u32,
    /// Whether the policy derives idempotency keys from params (a caller's
    /// `Idempotency-Key` is honoured either way).
    pub idempotency: bool,
    /// Whether failed calls may be served from a cache or a static value.
    pub fallback: bool,
    /// Whether calls that fail for good are dead-lettered.
    pub dlq: bool,
    /// The breaker's state.
    pub breaker: BreakerStateName,
    /// Live figures.
    pub stats: LiveStats,
}

/// One operation: its effective policy and live state.
#[derive(Debug, Serialize, ToSchema)]
pub struct OperationDetail {
    /// The gist (as in the list).
    #[serde(flatten)]
    pub summary: OperationSummary,
    /// Where the operation is defined, `file:line:col`.
    pub defined_at: String,
    /// Its layers, outermost first, with every effective setting and where it came from.
    pub layers: Vec<LayerView>,
    /// The breaker in full.
    pub breaker_detail: BreakerView,
}

/// One layer of an operation's pipeline.
#[derive(Debug, Serialize, ToSchema)]
pub struct LayerView {
    /// `idempotency`, `fallback`, `deadline`, `retry`, `breaker`, `bulkhead`,
    /// `rate_limit`, `timeout`, `http` or `dlq`.
    pub layer: String,
    /// Its effective settings; empty when the layer is off.
    pub settings: Vec<SettingView>,
}

/// One effective setting.
#[derive(Debug, Serialize, ToSchema)]
pub struct SettingView {
    /// The setting, as named in policy files.
    pub name: String,
    /// Its effective value, as policy files would write it.
    pub value: String,
    /// Where it came from: `operation`, `defaults`, `built-in`, `upstream <name>` …
    pub from: String,
}

/// Live figures of an operation.
#[derive(Debug, Serialize, ToSchema)]
pub struct LiveStats {
    /// The upstream's bulkhead (shared by its operations); absent without priority classes.
    pub bulkhead: Option<BulkheadView>,
    /// The upstream's rate limiter (shared by its operations).
    pub rate_limit: Option<RateLimitView>,
    /// The operation's dead letters by state.
    pub dlq: DlqCounts,
}

/// A bulkhead's limits and use now.
#[derive(Debug, Serialize, ToSchema)]
pub struct BulkheadView {
    /// Permits held across all classes.
    pub in_use: u32,
    /// The upstream-wide cap, if any.
    pub max_concurrency: Option<u32>,
    /// Classes by priority name.
    pub classes: BTreeMap<String, ClassView>,
}

/// One priority class of a bulkhead.
#[derive(Debug, Serialize, ToSchema)]
pub struct ClassView {
    /// Slots of the class.
    pub concurrency: u32,
    /// Most waiters the class queues.
    pub queue: u32,
    /// Slots held now.
    pub in_use: u32,
    /// Calls waiting now.
    pub queued: u32,
}

/// A rate limiter's tokens and quota gate now.
#[derive(Debug, Serialize, ToSchema)]
pub struct RateLimitView {
    /// Tokens added per second; absent when the upstream has no `rate_limit`
    /// (only its quota gate then acts).
    pub per_second: Option<u32>,
    /// Most tokens the bucket holds; absent without `rate_limit`.
    pub burst: Option<u32>,
    /// Whole tokens in the bucket now; absent without `rate_limit`.
    pub available_tokens: Option<u32>,
    /// Milliseconds until the quota gate (closed by a 429 with a reset hint)
    /// reopens; absent when open.
    pub gate_closed_for_ms: Option<u64>,
}

/// Dead letters by state.
#[derive(Debug, Default, Clone, Copy, Serialize, ToSchema)]
pub struct DlqCounts {
    /// Waiting for redrive.
    pub pending: u64,
    /// Out of attempts; need a human.
    pub parked: u64,
    /// Delivered by a redrive (kept for the retention period).
    pub delivered: u64,
}

fn counts_by_operation(counts: Vec<DlqCount>) -> BTreeMap<String, DlqCounts> {
    let mut out: BTreeMap<String, DlqCounts> = BTreeMap::new();
    for c in counts {
        let entry = out.entry(c.operation).or_default();
        match c.state {
            DlqState::Pending => entry.pending += c.count,
            DlqState::Parked => entry.parked += c.count,
            DlqState::Delivered => entry.delivered += c.count,
        }
    }
    out
}

fn summary(compiled: &Compiled, pipeline: &Pipeline, dlq: DlqCounts) -> OperationSummary {
    let op = compiled.set.operations.get(&pipeline.name);
    let upstream = &pipeline.upstream;
    OperationSummary {
        name: pipeline.name.clone(),
        upstream: upstream.name.clone(),
        method: op.map_or_else(String::new, |o| o.request.method.as_str().to_owned()),
        path: op.map_or_else(String::new, |o| o.request.path.clone()),
        priority: pipeline.priority.as_str().to_owned(),
        attempt_timeout_ms: millis(pipeline.attempt_timeout),
        deadline_ms: pipeline.deadline.map(millis),
        connect_timeout_ms: millis(upstream.http.connect_timeout),
        max_attempts: pipeline.retry.max_attempts.max(1),
        idempotency: op.is_some_and(|o| o.idempotency.is_some()),
        fallback: pipeline.fallback.is_some(),
        dlq: pipeline.dlq.is_some(),
        breaker: pipeline.breaker.state().into(),
        stats: LiveStats {
            bulkhead: upstream.bulkhead.as_ref().map(|b| {
                let s = b.snapshot();
                BulkheadView {
                    in_use: s.in_use,
                    max_concurrency: s.max_concurrency,
                    classes: s
                        .classes
                        .into_iter()
                        .map(|(p, c)| {
                            (
                                p.as_str().to_owned(),
                                ClassView {
                                    concurrency: c.concurrency,
                                    queue: c.queue,
                                    in_use: c.in_use,
                                    queued: c.queued,
                                },
                            )
                        })
                        .collect(),
                }
            }),
            rate_limit: upstream.limiter.as_ref().map(|l| {
                let s = l.snapshot();
                // Without `rate_limit` the limiter is unlimited: its token
                // figures mean nothing, only its quota gate does.
                let limited = compiled
                    .set
                    .upstreams
                    .get(&upstream.name)
                    .is_some_and(|u| u.rate_limit.is_some());
                let config = l.config();
                RateLimitView {
                    per_second: limited.then_some(config.per_second),
                    burst: limited.then_some(config.burst),
                    available_tokens: limited.then_some(s.available_tokens),
                    gate_closed_for_ms: s.gate_closed_for_ms,
                }
            }),
            dlq,
        },
    }
}

fn generation(state: &AppState) -> Option<String> {
    state
        .shared
        .reloader
        .as_ref()
        .map(|r| r.current().hash.clone())
}

/// Lists every operation with its live stats.
#[utoipa::path(
    get,
    path = "/v1/operations",
    tag = "operations",
    responses(
        (status = 200, description = "Every operation of the serving generation, by name", body = OperationList),
        (status = 503, description = "The store cannot be read (`store_unavailable`)", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn list(State(state): State<AppState>) -> Result<Json<OperationList>, ApiError> {
    let compiled = state.runtime().compiled();
    let counts = counts_by_operation(state.runtime().store.dlq_counts().await?);
    let operations = compiled
        .operations
        .values()
        .map(|p| {
            summary(
                &compiled,
                p,
                counts.get(&p.name).copied().unwrap_or_default(),
            )
        })
        .collect();
    Ok(Json(OperationList {
        generation: generation(&state),
        operations,
    }))
}

/// One operation's effective policy, layer by layer, and its live stats.
#[utoipa::path(
    get,
    path = "/v1/operations/{name}",
    tag = "operations",
    params(("name" = String, Path, description = "Operation name")),
    responses(
        (status = 200, description = "The operation's effective policy and live state", body = OperationDetail),
        (status = 404, description = "No such operation (`unknown_operation`)", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "The store cannot be read (`store_unavailable`)", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn get_one(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<OperationDetail>, ApiError> {
    let compiled = state.runtime().compiled();
    let unknown = || {
        ApiError::not_found(
            "unknown_operation",
            format!("no operation named `{name}` is serving"),
        )
    };
    let pipeline: &Arc<Pipeline> = compiled.operations.get(&name).ok_or_else(unknown)?;
    let explanation = crate::explain::explain(&compiled.set, &name).ok_or_else(unknown)?;
    let counts = counts_by_operation(state.runtime().store.dlq_counts().await?);
    let dlq = counts.get(&name).copied().unwrap_or_default();
    let layers = explanation
        .layers
        .into_iter()
        .map(|l| LayerView {
            layer: l.layer.to_owned(),
            settings: l
                .settings
                .into_iter()
                .map(|s| SettingView {
                    value: if l.layer == "http" && s.name == "base_url" {
                        mask_url(&s.value)
                    } else {
                        s.value
                    },
                    name: s.name,
                    from: s.from,
                })
                .collect(),
        })
        .collect();
    Ok(Json(OperationDetail {
        summary: summary(&compiled, pipeline, dlq),
        defined_at: explanation.defined_at,
        layers,
        breaker_detail: super::breakers::view(&name, &pipeline.breaker),
    }))
}

/// Masks what a URL as written may carry besides its address: credentials
/// (`user:pass@`) and the query string. `${env:…}` references stay as
/// written; they are names, not values.
fn mask_url(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find("://") {
        out.push_str(&rest[..i + 3]);
        rest = &rest[i + 3..];
        let authority_end = rest
            .find(['/', '?', '#', '}', '"', ' '])
            .unwrap_or(rest.len());
        match rest[..authority_end].rfind('@') {
            Some(at) => {
                out.push_str("***");
                out.push_str(&rest[at..authority_end]);
            }
            None => out.push_str(&rest[..authority_end]),
        }
        rest = &rest[authority_end..];
        let path_end = rest.find(['?', '#', '}', '"', ' ']).unwrap_or(rest.len());
        out.push_str(&rest[..path_end]);
        rest = &rest[path_end..];
        if let Some(query) = rest.strip_prefix('?') {
            let end = query.find(['#', '}', '"', ' ']).unwrap_or(query.len());
            out.push_str("?***");
            rest = &query[end..];
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::mask_url;

    #[test]
    fn masks_credentials_and_queries_only() {
        assert_eq!(
            mask_url("https://api.clay.com/v1"),
            "https://api.clay.com/v1"
        );
        assert_eq!(
            mask_url("https://u:p@api.clay.com/v1?key=s"),
            "https://***@api.clay.com/v1?***"
        );
        assert_eq!(
            mask_url("${env:CLAY_BASE_URL:-https://api.clay.com?k=s}"),
            "${env:CLAY_BASE_URL:-https://api.clay.com?***}"
        );
        assert_eq!(mask_url("${env:CLAY_BASE_URL}"), "${env:CLAY_BASE_URL}");
        assert_eq!(
            mask_url("http://127.0.0.1:9/x#frag"),
            "http://127.0.0.1:9/x#frag"
        );
    }
}
