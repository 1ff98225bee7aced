//! `POST /v1/operations/{name}/invoke`: run an operation with JSON params
//! and answer the envelope (`status` ok, fallback or queued; `data`;
//! `meta`) or, for a failed call, a problem document with `outcome: failed`
//! and the same `meta`.
//!
//! `X-Claygate-Priority` asks for a bulkhead class: one the operation's
//! upstream does not define is refused (400 `bad_priority`, naming the
//! classes it has); a lower class than the operation's is used; a higher
//! one is not (any caller could otherwise claim `critical` slots), and the
//! call runs at the operation's own class. `meta.priority` says which class
//! the call ran at.

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use serde_json::Value;
use serde_json::value::RawValue;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::AppState;
use super::error::{ApiError, Problem, invoke_error, rejection};
use crate::pipeline::Failure;
use crate::pipeline::compose::Pipeline;
use crate::policy::model::Priority;
use crate::runtime::{Answer, InvokeRequest, Invoked};
use crate::store::StoredResponse;

/// Header a caller sets to run a call at a lower priority class.
pub const PRIORITY_HEADER: &str = "x-claygate-priority";
/// Header that says a fallback answer's staleness.
pub const STALENESS_HEADER: &str = "x-claygate-staleness";
/// Header set on answers replayed or shared by the idempotency layer.
pub const REPLAYED_HEADER: &str = "idempotent-replayed";

pub(super) fn routes() -> OpenApiRouter<super::AppState> {
    OpenApiRouter::new().routes(routes!(invoke))
}

/// How a call that did not fail was answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum EnvelopeStatus {
    /// The upstream answered.
    Ok,
    /// A cached or static answer was served instead.
    Fallback,
    /// The call failed for good and was written to the DLQ.
    Queued,
}

/// The answer of a call that did not fail.
#[derive(Debug, Serialize, ToSchema)]
pub struct Envelope {
    /// `ok`, `fallback` or `queued` (a failed call answers a problem
    /// document with `outcome: failed`).
    pub status: EnvelopeStatus,
    /// The upstream's (or the fallback's) body: JSON when it is JSON, else a string; null when queued.
    /// JSON bodies are passed on as they came, not parsed and re-encoded.
    #[schema(value_type = Object)]
    pub data: Box<RawValue>,
    /// How the call went.
    pub meta: Meta,
}

/// How a call went.
#[derive(Debug, Serialize, ToSchema)]
pub struct Meta {
    /// The operation.
    pub operation: String,
    /// Requests sent upstream by this call (0 for replays and refusals).
    pub attempts: u32,
    /// Time the call took, in milliseconds.
    pub latency_ms: f64,
    /// The upstream's status (of the answer served, for fallbacks from cache).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub upstream_status: Option<u16>,
    /// The breaker's state when the call ended.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub breaker: Option<&'static str>,
    /// The bulkhead class the call ran at: the operation's, or a lower one
    /// asked with `X-Claygate-Priority` (absent when the upstream has no classes).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>, example = "normal")]
    pub priority: Option<&'static str>,
    /// `fresh`, `stale`, `very_stale` or `static` for fallbacks.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub staleness: Option<&'static str>,
    /// Age of a cached fallback, in milliseconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub age_ms: Option<u64>,
    /// Whether the call was a fallback (`true` only for fallbacks).
    pub fallback: bool,
    /// The dead letter's id for queued calls.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dlq_id: Option<i64>,
    /// Why the call failed, for fallbacks and queued calls.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cause: Option<Cause>,
    /// The idempotency key and whether this answer was replayed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub idempotency: Option<IdempotencyMeta>,
}

/// A failure behind a fallback or a queued call.
#[derive(Debug, Serialize, ToSchema)]
pub struct Cause {
    /// Stable code, e.g. `breaker_open`.
    pub code: &'static str,
    /// What happened.
    pub message: String,
}

/// The idempotency side of an answer.
#[derive(Debug, Serialize, ToSchema)]
pub struct IdempotencyMeta {
    /// The key: the caller's, or sha256 of the key params.
    pub key: String,
    /// True when derived from params.
    pub derived: bool,
    /// True when this is a stored or shared answer, not a new call.
    pub replayed: bool,
}

/// Runs the operation with the JSON body as params.
#[utoipa::path(
    post,
    path = "/v1/operations/{name}/invoke",
    tag = "invoke",
    params(
        ("name" = String, Path, description = "Operation name"),
        ("Idempotency-Key" = Option<String>, Header, description = "Deduplicates calls: 1–255 visible ASCII characters"),
        ("X-Claygate-Priority" = Option<String>, Header, description = "Run at a lower bulkhead class than the operation's: one of the classes its upstream defines (critical, high, normal, low, bulk), else 400 `bad_priority`; a higher class than the operation's runs at the operation's class. `meta.priority` says the class used"),
    ),
    request_body(content = Object, content_type = "application/json", description = "The operation's params (an empty body means `{}`)"),
    responses(
        (status = 200, description = "Answered by the upstream (`ok`) or by a fallback (`fallback`)", body = Envelope),
        (status = 202, description = "Failed for good and written to the DLQ (`queued`); `Location` names the entry", body = Envelope),
        (status = 400, description = "Malformed body, idempotency key or priority", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "Unknown operation (or the upstream's 404)", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "A call with this idempotency key is in flight (`idempotency_in_flight`), or was dead-lettered and parked (`dead_lettered_parked`, `dlq_id` names the entry)", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "Body over 1 MiB", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "Body is not application/json", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Params fail params_schema, or the idempotency key was used with other params", body = Problem, content_type = "application/problem+json"),
        (status = 429, description = "Bulkhead full or rate limited (`Retry-After`)", body = Problem, content_type = "application/problem+json"),
        (status = 502, description = "Upstream error", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Breaker open without fallback (`Retry-After`), store unavailable, or draining", body = Problem, content_type = "application/problem+json"),
        (status = 504, description = "Attempt timeout or deadline exceeded", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn invoke(
    State(state): State<AppState>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    // The body's rejection (over the limit) is taken here rather than by
    // axum, so it too is a failed invoke.
    let body = body.map_err(|r| rejection(r.status(), r.body_text()).failed_invoke())?;
    run(&state, name, &headers, &body)
        .await
        .map_err(ApiError::failed_invoke)
}

/// The invoke, with refusals before the call (draining, a bad body or
/// header) as errors.
async fn run(
    state: &AppState,
    name: String,
    headers: &HeaderMap,
    body: &Bytes,
) -> Result<Response, ApiError> {
    if state.draining() {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "draining",
            "claygate is shutting down and takes no new calls",
        )
        .retry_after(std::time::Duration::from_secs(1)));
    }
    let params = params(headers, body)?;
    let idempotency_key = match headers.get("idempotency-key") {
        None => None,
        Some(v) => Some(
            v.to_str()
                .map_err(|_| {
                    ApiError::bad_request(
                        "bad_idempotency_key",
                        "the Idempotency-Key header must be visible ASCII",
                    )
                })?
                .to_owned(),
        ),
    };
    let asked = match headers.get(PRIORITY_HEADER) {
        None => None,
        Some(v) => Some(parse_priority(v)?),
    };
    // The class is checked, and the one used named, on the generation
    // serving now; an unknown operation is left to the runtime (404).
    let priority = match state.runtime().compiled().operations.get(&name) {
        Some(pipeline) => {
            if let Some(asked) = asked {
                check_class(pipeline, asked)?;
            }
            pipeline
                .upstream
                .bulkhead
                .as_ref()
                .map(|_| pipeline.priority_for(asked).as_str())
        }
        None => None,
    };
    let invoked = state
        .runtime()
        .invoke(
            &name,
            InvokeRequest {
                params,
                idempotency_key,
                priority: asked,
            },
        )
        .await;
    Ok(answer(invoked, priority))
}

/// The class named by an `X-Claygate-Priority` value.
fn parse_priority(value: &HeaderValue) -> Result<Priority, ApiError> {
    value
        .to_str()
        .ok()
        .and_then(|s| {
            let s = s.trim();
            Priority::ALL
                .into_iter()
                .find(|p| p.as_str().eq_ignore_ascii_case(s))
        })
        .ok_or_else(|| {
            ApiError::bad_request(
                "bad_priority",
                "X-Claygate-Priority must be one of critical, high, normal, low, bulk",
            )
        })
}

/// Refuses a class the operation's upstream does not define, naming those it does.
fn check_class(pipeline: &Pipeline, asked: Priority) -> Result<(), ApiError> {
    let upstream = &pipeline.upstream;
    let classes: Vec<&str> = upstream
        .bulkhead
        .as_ref()
        .map(|b| b.config().classes.keys().map(|p| p.as_str()).collect())
        .unwrap_or_default();
    if classes.contains(&asked.as_str()) {
        return Ok(());
    }
    let has = if classes.is_empty() {
        "defines no priority classes".to_owned()
    } else {
        format!("defines {}", classes.join(", "))
    };
    Err(ApiError::bad_request(
        "bad_priority",
        format!(
            "X-Claygate-Priority `{asked}`: upstream `{}` of operation `{}` has no such class; it {has}",
            upstream.name, pipeline.name
        ),
    ))
}

/// The params: the JSON body, `{}` when empty.
fn params(headers: &HeaderMap, body: &Bytes) -> Result<Value, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(Value::Object(serde_json::Map::new()));
    }
    let json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|m| {
            let m = m.trim().to_ascii_lowercase();
            m == "application/json" || (m.starts_with("application/") && m.ends_with("+json"))
        });
    if !json {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "send the params as a JSON body with `Content-Type: application/json`",
        ));
    }
    serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request("bad_json", format!("the body is not valid JSON: {e}")))
}

/// The body for the envelope: JSON as it came (checked, not parsed into a
/// tree and re-encoded: that was a tenth of an invoke's work), any other
/// body as a string, an empty one as null.
fn data_of(response: &StoredResponse) -> Box<RawValue> {
    if response.body.is_empty() {
        return RawValue::NULL.to_owned();
    }
    if let Ok(raw) = serde_json::from_slice::<&RawValue>(&response.body) {
        return raw.to_owned();
    }
    serde_json::value::to_raw_value(&String::from_utf8_lossy(&response.body))
        .unwrap_or_else(|_| RawValue::NULL.to_owned())
}

/// The HTTP answer of a finished call that ran at bulkhead class `priority`.
pub fn answer(invoked: Invoked, priority: Option<&'static str>) -> Response {
    let mut meta = Meta {
        operation: invoked.operation.clone(),
        attempts: invoked.attempts,
        latency_ms: invoked.latency.as_secs_f64() * 1000.0,
        upstream_status: None,
        breaker: invoked.breaker.map(|b| b.as_str()),
        priority,
        staleness: None,
        age_ms: None,
        fallback: false,
        dlq_id: None,
        cause: None,
        idempotency: invoked.idempotency.as_ref().map(|i| IdempotencyMeta {
            key: i.key.clone(),
            derived: i.derived,
            replayed: i.replayed,
        }),
    };
    let replayed = invoked.idempotency.as_ref().is_some_and(|i| i.replayed);
    let cause = |f: &Failure| Cause {
        code: f.code(),
        message: f.to_string(),
    };
    let mut response = match invoked.answer {
        Answer::Ok(r) => {
            meta.upstream_status = Some(r.status);
            let envelope = Envelope {
                status: EnvelopeStatus::Ok,
                data: data_of(&r),
                meta,
            };
            (StatusCode::OK, axum::Json(envelope)).into_response()
        }
        Answer::Fallback {
            response,
            staleness,
            age,
            cause: why,
        } => {
            meta.fallback = true;
            meta.upstream_status = age.map(|_| response.status);
            meta.staleness = Some(staleness.as_str());
            meta.age_ms = age.map(|a| u64::try_from(a.as_millis()).unwrap_or(u64::MAX));
            meta.cause = Some(cause(&why));
            let envelope = Envelope {
                status: EnvelopeStatus::Fallback,
                data: data_of(&response),
                meta,
            };
            let mut r = (StatusCode::OK, axum::Json(envelope)).into_response();
            r.headers_mut().insert(
                STALENESS_HEADER,
                HeaderValue::from_static(staleness.as_str()),
            );
            r
        }
        Answer::Queued { dlq_id, cause: why } => {
            meta.dlq_id = Some(dlq_id);
            meta.cause = why.as_ref().map(cause);
            let envelope = Envelope {
                status: EnvelopeStatus::Queued,
                data: RawValue::NULL.to_owned(),
                meta,
            };
            let mut r = (StatusCode::ACCEPTED, axum::Json(envelope)).into_response();
            if let Ok(v) = HeaderValue::from_str(&format!("/v1/dlq/{dlq_id}")) {
                r.headers_mut().insert(header::LOCATION, v);
            }
            r
        }
        Answer::Failed(e) => {
            let error = invoke_error(&e).failed_invoke();
            let meta = serde_json::to_value(&meta).unwrap_or(Value::Null);
            error.with("meta", meta).into_response()
        }
    };
    if replayed {
        response
            .headers_mut()
            .insert(REPLAYED_HEADER, HeaderValue::from_static("true"));
    }
    response
}
