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

use std::any::Any;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::extract::{Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use sha2::{Digest, Sha256};
use tower_http::catch_panic::CatchPanicLayer;
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
    /// True while a file watcher is set on the policy directories (shared
    /// with the watch task): false with `--no-watch`, and while no watcher
    /// can be created or a directory is missing (only the rescan rereads).
    pub watching: Arc<AtomicBool>,
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
                watching: Arc::new(AtomicBool::new(false)),
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
    document_unauthorized(&mut api);
    let (open, open_api) = OpenApiRouter::new()
        .merge(health::routes())
        .split_for_parts();
    api.merge(open_api);
    (protected, open, api)
}

/// Adds the 401 answer (one shared `Unauthorized` response) to every
/// operation of `api`, all behind the token check: no handler's annotation
/// needs to repeat it, and none can forget it.
fn document_unauthorized(api: &mut utoipa::openapi::OpenApi) {
    use utoipa::openapi::{ContentBuilder, Ref, RefOr, ResponseBuilder};
    let unauthorized = ResponseBuilder::new()
        .description(
            "No `Authorization: Bearer <token>`, or a wrong one, while CLAYGATE_ADMIN_TOKEN is set (`WWW-Authenticate: Bearer`)",
        )
        .content(
            "application/problem+json",
            ContentBuilder::new()
                .schema(Some(Ref::from_schema_name("Problem")))
                .build(),
        )
        .build();
    api.components
        .get_or_insert_with(Default::default)
        .responses
        .insert("Unauthorized".to_owned(), RefOr::T(unauthorized));
    for item in api.paths.paths.values_mut() {
        let operations = [
            &mut item.get,
            &mut item.put,
            &mut item.post,
            &mut item.delete,
            &mut item.options,
            &mut item.head,
            &mut item.patch,
            &mut item.trace,
        ];
        for operation in operations.into_iter().flatten() {
            operation
                .responses
                .responses
                .entry("401".to_owned())
                .or_insert_with(|| RefOr::Ref(Ref::from_response_name("Unauthorized")));
        }
    }
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
        .layer(safety_net())
        .with_state(state)
}

/// The outermost layer: a handler that panics answers a 500 problem
/// document with code `internal` instead of a dropped connection. The panic
/// text goes to the log only: it may hold anything, a secret included.
pub fn safety_net() -> CatchPanicLayer<fn(Box<dyn Any + Send + 'static>) -> Response> {
    CatchPanicLayer::custom(panic_answer as fn(Box<dyn Any + Send + 'static>) -> Response)
}

fn panic_answer(panic: Box<dyn Any + Send + 'static>) -> Response {
    let text = panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".to_owned());
    tracing::error!(panic = %text, "a request handler panicked");
    ApiError::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        "internal",
        "claygate failed while answering this request; the error is in its log",
    )
    .into_response()
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
        .and_then(bearer_token)
        .map(digest);
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

/// The token of an `Authorization: Bearer <token>` value. The scheme is
/// case-insensitive (RFC 9110, section 11.1), so `bearer` and `BEARER` work too.
fn bearer_token(value: &str) -> Option<&str> {
    let (scheme, token) = value.trim_start().split_once([' ', '\t'])?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

fn digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

fn constant_time_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bearer_scheme_is_case_insensitive() {
        for value in [
            "Bearer s3cret",
            "bearer s3cret",
            "BEARER  s3cret ",
            "Bearer\ts3cret",
        ] {
            assert_eq!(bearer_token(value), Some("s3cret"), "{value:?}");
        }
        for value in ["Basic s3cret", "Bearer", "Bearer ", "Bearers3cret", ""] {
            assert_eq!(bearer_token(value), None, "{value:?}");
        }
    }

    #[tokio::test]
    async fn a_panicking_handler_answers_a_problem_without_the_panic_text() {
        use tower::ServiceExt;
        let app = Router::new()
            .route(
                "/boom",
                axum::routing::get(|| async {
                    panic!("secret-in-panic");
                    #[allow(unreachable_code)]
                    ""
                }),
            )
            .layer(safety_net());
        let response = app
            .oneshot(
                Request::builder()
                    .uri("/boom")
                    .body(axum::body::Body::empty())
                    .expect("request"),
            )
            .await
            .expect("an answer, not a dropped connection");
        assert_eq!(response.status(), StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(
            response
                .headers()
                .get(header::CONTENT_TYPE)
                .map(|v| v.as_bytes()),
            Some(&b"application/problem+json"[..])
        );
        let body = axum::body::to_bytes(response.into_body(), 64 * 1024)
            .await
            .expect("body");
        let problem: serde_json::Value = serde_json::from_slice(&body).expect("JSON");
        assert_eq!(problem["code"], "internal");
        assert_eq!(problem["status"], 500);
        assert!(!String::from_utf8_lossy(&body).contains("secret-in-panic"));
    }

    #[test]
    fn tokens_compare_by_digest() {
        assert!(constant_time_eq(&digest("s3cret"), &digest("s3cret")));
        assert!(!constant_time_eq(&digest("s3cret"), &digest("s3cret2")));
        assert!(!constant_time_eq(&digest(""), &digest("x")));
    }
}
