//! The admin API (axum): invoke operations, watch health, breakers, the
//! DLQ, policies, metrics and events.
//!
//! [`router`] builds the whole API from an [`AppState`] (tests call it
//! without a socket); every handler answers JSON, and every error is an
//! `application/problem+json` document from [`error`]. The OpenAPI
//! description is collected from the handlers' `#[utoipa::path]`
//! annotations, so it cannot drift from the code: it is served at
//! `/openapi.json` and kept in the repo as `schemas/openapi.json` (a test
//! compares them).

pub mod breakers;
pub mod dlq;
pub mod error;
pub mod events;
pub mod health;
pub mod invoke;
pub mod operations;
pub mod policies;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::extract::{FromRequest, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use serde::de::DeserializeOwned;
use sha2::{Digest, Sha256};
use utoipa::OpenApi;
use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
use utoipa_axum::router::OpenApiRouter;

use self::error::{ApiError, rejection};
use crate::health::Probes;
use crate::reload::Reloader;
use crate::runtime::Runtime;

/// Largest request body the API reads (1 MiB): params are small, and a
/// gateway must not buffer whatever a client sends.
pub const BODY_LIMIT: usize = 1024 * 1024;

/// Everything the handlers share; cloning is cheap.
#[derive(Clone)]
pub struct AppState {
    /// The shared parts.
    pub shared: Arc<Shared>,
}

/// What [`AppState`] holds.
pub struct Shared {
    /// Pipelines, store, clock, events, metrics.
    pub runtime: Arc<Runtime>,
    /// Reloads the policies (absent when serving a fixed set, as some tests do).
    pub reloader: Option<Arc<Reloader>>,
    /// Latest probe result per upstream.
    pub probes: Arc<Probes>,
    /// sha256 of the admin token, when one is required.
    pub token: Option<[u8; 32]>,
    /// Set when shutdown begins: readiness fails, new invokes are refused.
    pub draining: AtomicBool,
}

impl AppState {
    /// State over `runtime`; `token` (the raw admin token) turns auth on.
    pub fn new(
        runtime: Arc<Runtime>,
        reloader: Option<Arc<Reloader>>,
        probes: Arc<Probes>,
        token: Option<&str>,
    ) -> AppState {
        AppState {
            shared: Arc::new(Shared {
                runtime,
                reloader,
                probes,
                token: token.map(|t| digest(t.trim())),
                draining: AtomicBool::new(false),
            }),
        }
    }

    /// The runtime.
    pub fn runtime(&self) -> &Arc<Runtime> {
        &self.shared.runtime
    }

    /// True once shutdown began.
    pub fn draining(&self) -> bool {
        self.shared.draining.load(Ordering::Acquire)
    }
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "claygate admin API",
        description = "Invoke operations through their resilience pipeline; watch health, breakers, dead letters, policies, metrics and events."
    ),
    modifiers(&BearerAuth),
    components(schemas(error::Problem))
)]
struct ApiDoc;

struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(Http::new(HttpAuthScheme::Bearer)),
        );
        openapi.security = Some(vec![utoipa::openapi::security::SecurityRequirement::new(
            "bearer",
            Vec::<String>::new(),
        )]);
    }
}

/// The API's routes and their OpenAPI description, before state is attached.
fn parts() -> (Router<AppState>, Router<AppState>, utoipa::openapi::OpenApi) {
    let (protected, mut api) = OpenApiRouter::with_openapi(ApiDoc::openapi())
        .merge(invoke::routes())
        .merge(operations::routes())
        .merge(breakers::routes())
        .merge(dlq::routes())
        .merge(policies::routes())
        .merge(events::routes())
        .split_for_parts();
    let (open, open_api) = OpenApiRouter::new()
        .merge(health::routes())
        .split_for_parts();
    api.merge(open_api);
    (protected, open, api)
}

/// The OpenAPI description of the API.
pub fn openapi() -> utoipa::openapi::OpenApi {
    parts().2
}

/// The whole API over `state`.
pub fn router(state: AppState) -> Router {
    let (protected, open, api) = parts();
    let api = Arc::new(api);
    let protected = protected.route(
        "/openapi.json",
        axum::routing::get(move || {
            let api = Arc::clone(&api);
            async move { Json(api.as_ref().clone()) }
        }),
    );
    protected
        .merge(open)
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::map_response(problem_documents))
        .layer(middleware::from_fn_with_state(state.clone(), require_token))
        .layer(axum::extract::DefaultBodyLimit::max(BODY_LIMIT))
        .with_state(state)
}

/// Paths that stay open with a token configured: orchestrators and
/// scrapers probe them without credentials.
fn is_open_path(path: &str) -> bool {
    path == "/health" || path.starts_with("/health/") || path == "/metrics"
}

/// Turns axum's own plain-text rejections (a body over the limit, a bad
/// path parameter) into problem documents, so every error of the API has
/// one shape.
async fn problem_documents(response: Response) -> Response {
    let status = response.status();
    let plain = response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_none_or(|v| v.starts_with("text/plain"));
    if !(status.is_client_error() || status.is_server_error()) || !plain {
        return response;
    }
    let retry_after = response.headers().get(header::RETRY_AFTER).cloned();
    let body = axum::body::to_bytes(response.into_body(), 64 * 1024)
        .await
        .unwrap_or_default();
    let detail = String::from_utf8_lossy(&body).trim().to_owned();
    let detail = if detail.is_empty() {
        status.canonical_reason().unwrap_or("error").to_lowercase()
    } else {
        detail
    };
    let mut out = rejection(status, detail).into_response();
    if let Some(v) = retry_after {
        out.headers_mut().insert(header::RETRY_AFTER, v);
    }
    out
}

async fn not_found(request: Request) -> ApiError {
    ApiError::not_found(
        "not_found",
        format!(
            "no endpoint at {} {}",
            request.method(),
            request.uri().path()
        ),
    )
}

async fn method_not_allowed(request: Request) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        format!(
            "{} is not allowed on {}",
            request.method(),
            request.uri().path()
        ),
    )
}

/// With a token configured, every protected route needs
/// `Authorization: Bearer <token>`. Both sides are hashed before a
/// constant-time comparison, so neither the content nor the length of the
/// token leaks through timing.
async fn require_token(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let Some(expected) = state.shared.token else {
        return next.run(request).await;
    };
    if is_open_path(request.uri().path()) {
        return next.run(request).await;
    }
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(|t| digest(t.trim()));
    match presented {
        Some(d) if constant_time_eq(&d, &expected) => next.run(request).await,
        Some(_) => ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "the bearer token is not valid",
        )
        .with_header_www_authenticate(),
        None => ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "this endpoint needs `Authorization: Bearer <token>` (CLAYGATE_ADMIN_TOKEN)",
        )
        .with_header_www_authenticate(),
    }
}

impl ApiError {
    fn with_header_www_authenticate(self) -> Response {
        let mut response = self.into_response();
        response.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            axum::http::HeaderValue::from_static("Bearer"),
        );
        response
    }
}

fn digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

fn constant_time_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// A JSON body whose rejections (bad JSON, wrong content type, too large)
/// are problem documents with a clear message.
pub struct ApiJson<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        match Json::<T>::from_request(req, state).await {
            Ok(Json(v)) => Ok(ApiJson(v)),
            Err(r) => Err(rejection(r.status(), r.body_text())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_compare_by_digest() {
        assert!(constant_time_eq(&digest("s3cret"), &digest("s3cret")));
        assert!(!constant_time_eq(&digest("s3cret"), &digest("s3cret2")));
        assert!(!constant_time_eq(&digest(""), &digest("x")));
    }
}
