//! The one mapping from anything that goes wrong to an HTTP answer: an
//! `application/problem+json` document (RFC 9457) with a stable `code` and
//! a human `message` (the same text as RFC 9457's `detail`).

use std::time::Duration;

use axum::Json;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use serde_json::Value;
use utoipa::ToSchema;

use crate::pipeline::Failure;
use crate::runtime::InvokeError;
use crate::store::StoreError;

/// An RFC 9457 problem document, with claygate's stable `code`.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Problem {
    /// A URI naming the problem type (`about:blank` plus `code` for ours).
    #[serde(rename = "type")]
    pub kind: String,
    /// Short summary, the same for every occurrence of this code.
    pub title: String,
    /// The HTTP status.
    pub status: u16,
    /// What happened this time, naming the thing and the place.
    pub detail: String,
    /// The same text as `detail`, for clients that read `code` and `message`.
    pub message: String,
    /// Stable machine-readable code, e.g. `breaker_open`.
    pub code: String,
    /// `failed` on the answer of an invoke that failed: the fourth value of
    /// the envelope's `status` (`ok`, `fallback`, `queued`), which a problem
    /// document cannot carry in `status` (RFC 9457 makes it the HTTP status).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub outcome: Option<Outcome>,
    /// More members for some codes (e.g. the upstream's answer, or `meta` of an invoke).
    #[serde(flatten, skip_serializing_if = "serde_json::Map::is_empty")]
    #[schema(value_type = Object)]
    pub extra: serde_json::Map<String, Value>,
}

/// The `outcome` of a problem document answered by the invoke endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// The call was refused or failed; nothing more will happen to it.
    Failed,
}

/// An error answer: a problem document plus headers such as `Retry-After`.
#[derive(Debug, Clone)]
pub struct ApiError {
    /// The HTTP status.
    pub status: StatusCode,
    /// The stable code.
    pub code: &'static str,
    /// The detail message.
    pub detail: String,
    /// Seconds to put in `Retry-After`.
    pub retry_after: Option<Duration>,
    /// `failed` for a failed invoke (see [`Problem::outcome`]).
    pub outcome: Option<Outcome>,
    /// Extension members.
    pub extra: serde_json::Map<String, Value>,
}

impl ApiError {
    /// An error with `status`, `code` and `detail`.
    pub fn new(status: StatusCode, code: &'static str, detail: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code,
            detail: detail.into(),
            retry_after: None,
            outcome: None,
            extra: serde_json::Map::new(),
        }
    }

    /// 404 for a missing thing.
    pub fn not_found(code: &'static str, detail: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, code, detail)
    }

    /// 400 for a malformed request.
    pub fn bad_request(code: &'static str, detail: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, code, detail)
    }

    /// Adds `Retry-After`.
    pub fn retry_after(mut self, after: Duration) -> ApiError {
        self.retry_after = Some(after);
        self
    }

    /// Marks the answer of a failed invoke (`outcome: failed`).
    pub fn failed_invoke(mut self) -> ApiError {
        self.outcome = Some(Outcome::Failed);
        self
    }

    /// Adds an extension member.
    pub fn with(mut self, name: &str, value: Value) -> ApiError {
        self.extra.insert(name.to_owned(), value);
        self
    }

    /// The problem document.
    pub fn problem(&self) -> Problem {
        Problem {
            kind: format!("https://claygate.dev/problems/{}", self.code),
            title: self.status.canonical_reason().unwrap_or("Error").to_owned(),
            status: self.status.as_u16(),
            detail: self.detail.clone(),
            message: self.detail.clone(),
            code: self.code.to_owned(),
            outcome: self.outcome,
            extra: self.extra.clone(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        if let Some(after) = self.retry_after {
            // Whole seconds, rounded up: `Retry-After: 0` would invite a hammering.
            let secs = after.as_secs() + u64::from(after.subsec_nanos() > 0);
            headers.insert(header::RETRY_AFTER, HeaderValue::from(secs.max(1)));
        }
        (self.status, headers, Json(self.problem())).into_response()
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        tracing::error!(error = %e, "store error");
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "store_unavailable",
            e.to_string(),
        )
    }
}

/// The HTTP answer to a failed invoke. Upstream client errors (400, 404,
/// 409, 410, 422 …) keep their status so callers can tell "no such
/// company" from an outage; credential and quota statuses (401, 403, 407,
/// 408, 429) and 5xx become 502: they are about claygate's access, not the
/// caller's request.
pub fn invoke_error(e: &InvokeError) -> ApiError {
    let (status, retry) = match e {
        InvokeError::UnknownOperation(_) => (StatusCode::NOT_FOUND, None),
        InvokeError::InvalidParams { .. } => (StatusCode::UNPROCESSABLE_ENTITY, None),
        InvokeError::BadIdempotencyKey(_) => (StatusCode::BAD_REQUEST, None),
        InvokeError::IdempotencyConflict => (StatusCode::UNPROCESSABLE_ENTITY, None),
        InvokeError::InFlight => (StatusCode::CONFLICT, Some(Duration::from_secs(1))),
        InvokeError::Store(_) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Some(Duration::from_secs(1)),
        ),
        InvokeError::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, None),
        InvokeError::Draining => (
            StatusCode::SERVICE_UNAVAILABLE,
            Some(Duration::from_secs(1)),
        ),
        InvokeError::DeadLetterParked { .. } => (StatusCode::CONFLICT, None),
        InvokeError::Failure(f) => failure_status(f),
    };
    let mut error = ApiError::new(status, e.code(), e.to_string());
    error.retry_after = retry;
    if let InvokeError::Failure(Failure::Status(reply)) = e {
        let body = serde_json::from_slice::<Value>(&reply.body)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&reply.body).into_owned()));
        error = error.with(
            "upstream",
            serde_json::json!({ "status": reply.status.as_u16(), "body": body }),
        );
    }
    if let InvokeError::InvalidParams { path, .. } = e {
        error = error.with("path", Value::String(path.clone()));
    }
    if let InvokeError::DeadLetterParked { dlq_id } = e {
        error = error.with("dlq_id", Value::from(*dlq_id));
    }
    error
}

/// Status and `Retry-After` of a pipeline failure.
pub fn failure_status(f: &Failure) -> (StatusCode, Option<Duration>) {
    match f {
        Failure::BreakerOpen { retry_after } => {
            (StatusCode::SERVICE_UNAVAILABLE, Some(*retry_after))
        }
        Failure::BulkheadFull { .. } | Failure::QueueTimeout { .. } => {
            (StatusCode::TOO_MANY_REQUESTS, Some(Duration::from_secs(1)))
        }
        Failure::RateLimited { retry_after } => (StatusCode::TOO_MANY_REQUESTS, Some(*retry_after)),
        Failure::AttemptTimeout { .. } | Failure::DeadlineExceeded => {
            (StatusCode::GATEWAY_TIMEOUT, None)
        }
        Failure::Connect(_) | Failure::Transport(_) | Failure::BodyTooLarge { .. } => {
            (StatusCode::BAD_GATEWAY, None)
        }
        Failure::BadParams(_) => (StatusCode::UNPROCESSABLE_ENTITY, None),
        Failure::Interrupted => (
            StatusCode::SERVICE_UNAVAILABLE,
            Some(Duration::from_secs(1)),
        ),
        Failure::Status(reply) => match reply.status.as_u16() {
            401 | 403 | 407 | 408 | 429 => (StatusCode::BAD_GATEWAY, None),
            code @ 400..=499 => (
                StatusCode::from_u16(code).unwrap_or(StatusCode::BAD_GATEWAY),
                None,
            ),
            _ => (StatusCode::BAD_GATEWAY, None),
        },
    }
}

/// Rejections of axum's extractors (bad JSON, wrong content type, too
/// large) as problem documents rather than axum's plain text.
pub fn rejection(status: StatusCode, detail: String) -> ApiError {
    let code = match status {
        StatusCode::PAYLOAD_TOO_LARGE => "request_too_large",
        StatusCode::UNSUPPORTED_MEDIA_TYPE => "unsupported_media_type",
        StatusCode::NOT_FOUND => "not_found",
        StatusCode::METHOD_NOT_ALLOWED => "method_not_allowed",
        s if s.is_server_error() => "internal",
        _ => "bad_request",
    };
    let status = if status.is_client_error() || status.is_server_error() {
        status
    } else {
        StatusCode::BAD_REQUEST
    };
    ApiError::new(status, code, detail)
}
