//! Policies over HTTP: the serving generation and the reload history,
//! forced reloads (or their plan, with `?dry_run=true`), and validation of
//! posted files against the serving set without applying anything.
//!
//! A reload that fails validation or compilation is refused with 422 and
//! its errors: the previous generation keeps serving (DESIGN.md, hot
//! reload). Every problem, a diagnostic or a compile error, is reported in
//! one shape ([`Issue`]), with `file:line:col` where the problem has one.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::{RawQuery, State};
use axum::http::{HeaderMap, StatusCode, header};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::AppState;
use super::dlq::{query_bool, query_params};
use super::error::{ApiError, Problem};
use crate::compile::CarriedOver;
use crate::policy::SourceFile;
use crate::policy::diagnostic::{Diagnostic, Severity};
use crate::reload::{self, Change, Generation, ReloadRecord, ReloadResult, Reloader, Trigger};

/// Name of a posted YAML file when `?name=` does not give one.
pub const DEFAULT_POSTED_NAME: &str = "posted.yaml";

/// Longest `GET /v1/policies` waits for the store to count dead letters.
const STORE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

pub(super) fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(status))
        .routes(routes!(reload))
        .routes(routes!(validate))
}

/// A problem with a policy set: a validation diagnostic, a compile error or
/// a read error.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Issue {
    /// `error` or `warning`.
    pub severity: String,
    /// Stable kind: a diagnostic code such as `unknown-field`, or
    /// `compile-error` / `read-error`.
    pub code: String,
    /// What is wrong, naming the thing.
    pub message: String,
    /// `file:line:col` (or just the file) when the problem has a place.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub location: Option<String>,
    /// The file.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub file: Option<String>,
    /// 1-based line.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub line: Option<u32>,
    /// 1-based column, in characters.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub column: Option<u32>,
    /// Key path of the node, e.g. `operations.enrich_person.breaker`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// How to fix it, when known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hint: Option<String>,
    /// Other places involved (e.g. the first definition of a duplicate).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub related: Vec<RelatedPlace>,
}

/// Another place a problem refers to.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct RelatedPlace {
    /// `file:line:col` (or just the file).
    pub location: String,
    /// What the place is.
    pub message: String,
}

impl From<&Diagnostic> for Issue {
    fn from(d: &Diagnostic) -> Self {
        Issue {
            severity: match d.severity {
                Severity::Error => "error",
                Severity::Warning => "warning",
            }
            .to_owned(),
            code: d.code.as_str().to_owned(),
            message: d.message.clone(),
            location: Some(d.location()),
            file: Some(d.file.clone()),
            line: d.span.map(|s| s.line),
            column: d.span.map(|s| s.column),
            path: (!d.path.is_empty()).then(|| d.path.clone()),
            hint: d.hint.clone(),
            related: d
                .related
                .iter()
                .map(|r| RelatedPlace {
                    location: match r.span {
                        Some(s) => format!("{}:{}:{}", r.file, s.line, s.column),
                        None => r.file.clone(),
                    },
                    message: r.message.clone(),
                })
                .collect(),
        }
    }
}

impl From<&reload::Problem> for Issue {
    fn from(p: &reload::Problem) -> Self {
        let (code, message) = match p {
            reload::Problem::Diagnostic(d) => return Issue::from(d),
            reload::Problem::Compile { message } => ("compile-error", message),
            reload::Problem::Io { message } => ("read-error", message),
        };
        Issue {
            severity: "error".to_owned(),
            code: code.to_owned(),
            message: message.clone(),
            location: None,
            file: None,
            line: None,
            column: None,
            path: None,
            hint: None,
            related: Vec::new(),
        }
    }
}

fn issues<'a, T: 'a>(items: impl IntoIterator<Item = &'a T>) -> Vec<Issue>
where
    Issue: From<&'a T>,
{
    items.into_iter().map(Issue::from).collect()
}

/// The serving generation and the reload history.
#[derive(Debug, Serialize, ToSchema)]
pub struct PolicyStatus {
    /// The generation serving now.
    pub generation: GenerationView,
    /// Whether a file watcher is set on the policy directory now (edits
    /// reload within moments); false with `--no-watch`, while no watcher can
    /// be created (inotify limits: the 2 s rescan still rereads the files)
    /// and while the directory is missing.
    pub watching: bool,
    /// Pending and parked dead letters of operations the serving
    /// generation no longer defines (or defines without `dlq`), by
    /// operation: kept, never deleted, but not redriven until the operation
    /// is back (absent when the store cannot say).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub orphaned_dead_letters: Option<BTreeMap<String, u64>>,
    /// The latest reload attempts (at most 50), newest first; the first
    /// load at start is the oldest.
    pub history: Vec<ReloadView>,
}

/// A generation of the policies.
#[derive(Debug, Serialize, ToSchema)]
pub struct GenerationView {
    /// sha256 (hex) over its files (sorted paths, lengths and contents).
    pub hash: String,
    /// The files it was read from.
    pub files: Vec<String>,
    /// When it started serving, Unix milliseconds.
    pub loaded_at: i64,
    /// How long reading, validating and compiling it took, in milliseconds.
    pub duration_ms: u64,
    /// Warnings it was applied with.
    pub warnings: Vec<Issue>,
}

impl From<&Generation> for GenerationView {
    fn from(g: &Generation) -> Self {
        GenerationView {
            hash: g.hash.clone(),
            files: g.files.clone(),
            loaded_at: g.loaded_at,
            duration_ms: g.duration_ms,
            warnings: issues(&g.warnings),
        }
    }
}

/// What started a reload.
#[derive(Debug, Clone, Copy, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum TriggerName {
    /// The first load at start.
    Startup,
    /// The file watcher saw a change.
    Watch,
    /// The periodic rescan (or a watch set up again) reread the files.
    Rescan,
    /// `SIGHUP`.
    Signal,
    /// `POST /v1/policies/reload`.
    Api,
}

/// How a reload attempt ended.
#[derive(Debug, Clone, Copy, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ReloadResultName {
    /// A new generation serves.
    Applied,
    /// The files are byte for byte those serving: nothing was done.
    Unchanged,
    /// The files have errors: the previous generation keeps serving.
    Refused,
}

/// One reload attempt.
#[derive(Debug, Serialize, ToSchema)]
pub struct ReloadView {
    /// When it started, Unix milliseconds.
    pub at: i64,
    /// What started it.
    pub trigger: TriggerName,
    /// How it ended.
    pub result: ReloadResultName,
    /// The generation serving afterwards.
    pub generation: String,
    /// The generation the files would make (differs from `generation` when refused).
    pub candidate: String,
    /// Milliseconds from reading the files to serving (or refusing).
    pub duration_ms: u64,
    /// Why it was refused.
    pub errors: Vec<Issue>,
    /// Warnings (applied anyway).
    pub warnings: Vec<Issue>,
    /// Per operation: what changed and which live state carried over.
    pub changes: BTreeMap<String, ChangeView>,
    /// Dead letters kept for operations that no longer exist, by operation.
    pub orphaned_dead_letters: BTreeMap<String, u64>,
}

impl From<&ReloadRecord> for ReloadView {
    fn from(r: &ReloadRecord) -> Self {
        ReloadView {
            at: r.at,
            trigger: match r.trigger {
                Trigger::Startup => TriggerName::Startup,
                Trigger::Watch => TriggerName::Watch,
                Trigger::Rescan => TriggerName::Rescan,
                Trigger::Signal => TriggerName::Signal,
                Trigger::Api => TriggerName::Api,
            },
            result: match r.result {
                ReloadResult::Applied => ReloadResultName::Applied,
                ReloadResult::Unchanged => ReloadResultName::Unchanged,
                ReloadResult::Refused => ReloadResultName::Refused,
            },
            generation: r.generation.clone(),
            candidate: r.candidate.clone(),
            duration_ms: r.duration_ms,
            errors: issues(&r.errors),
            warnings: issues(&r.warnings),
            changes: changes(&r.changes),
            orphaned_dead_letters: r.orphaned_dead_letters.clone(),
        }
    }
}

/// What a reload does to one operation.
#[derive(Debug, Serialize, ToSchema)]
pub struct ChangeView {
    /// `added`, `removed`, `changed` or `unchanged`.
    pub status: String,
    /// Which live state carries over from the serving generation (absent for removed operations).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub carried: Option<CarriedView>,
}

/// Live state of an operation kept across a reload.
#[derive(Debug, Serialize, ToSchema)]
pub struct CarriedView {
    /// The breaker (its state and window).
    pub breaker: bool,
    /// The retry budget's window.
    pub retry_budget: bool,
    /// The upstream's bulkhead (permits held stay honoured).
    pub bulkhead: bool,
    /// The upstream's rate limiter (tokens and quota gate).
    pub rate_limiter: bool,
    /// The upstream's HTTP client and its pooled connections.
    pub http_client: bool,
}

impl From<CarriedOver> for CarriedView {
    fn from(c: CarriedOver) -> Self {
        CarriedView {
            breaker: c.breaker,
            retry_budget: c.retry_budget,
            bulkhead: c.bulkhead,
            rate_limiter: c.rate_limiter,
            http_client: c.http_client,
        }
    }
}

fn changes(changes: &BTreeMap<String, Change>) -> BTreeMap<String, ChangeView> {
    changes
        .iter()
        .map(|(name, c)| {
            (
                name.clone(),
                ChangeView {
                    status: c.status.to_owned(),
                    carried: c.carried.map(CarriedView::from),
                },
            )
        })
        .collect()
}

/// The answer of `POST /v1/policies/reload`: the record of an applied
/// reload, or with `dry_run` the plan.
#[derive(Debug, Serialize, ToSchema)]
#[serde(untagged)]
pub enum ReloadAnswer {
    /// The reload was applied (or found nothing to do).
    Applied(ReloadView),
    /// The plan of a dry run.
    Plan(ReloadPlan),
}

/// What a reload would do, without doing it.
#[derive(Debug, Serialize, ToSchema)]
pub struct ReloadPlan {
    /// Always true: nothing was applied.
    pub dry_run: bool,
    /// The generation serving now (and still serving).
    pub serving: String,
    /// The generation the files would make.
    pub candidate: String,
    /// Whether the files differ from those serving.
    pub files_changed: bool,
    /// Per operation: `added`, `removed`, `changed` or `unchanged`, and
    /// which live state would carry over.
    pub changes: BTreeMap<String, ChangeView>,
    /// Warnings the set would be applied with.
    pub warnings: Vec<Issue>,
}

/// The verdict on posted policy files.
#[derive(Debug, Serialize, ToSchema)]
pub struct Validation {
    /// True when the set (serving files plus posted ones) has no errors
    /// (and, with `strict`, no warnings).
    pub valid: bool,
    /// Errors found.
    pub errors: usize,
    /// Warnings found.
    pub warnings: usize,
    /// Every problem, by file and position.
    pub diagnostics: Vec<Issue>,
}

/// Posted files: names (e.g. `enrichment.yaml`) and their YAML text.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PostedFiles {
    /// File name to YAML text; a name of a serving file replaces it.
    pub files: BTreeMap<String, String>,
}

fn reloader(state: &AppState) -> Result<Arc<Reloader>, ApiError> {
    state.shared.reloader.clone().ok_or_else(|| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "reload_unavailable",
            "this server serves a fixed policy set: there is no policy directory to reload or validate against",
        )
    })
}

/// The serving generation and the reload history.
#[utoipa::path(
    get,
    path = "/v1/policies",
    tag = "policies",
    responses(
        (status = 200, description = "The serving generation and the latest reload attempts, newest first", body = PolicyStatus),
        (status = 503, description = "No policy directory (`reload_unavailable`)", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn status(State(state): State<AppState>) -> Result<Json<PolicyStatus>, ApiError> {
    let reloader = reloader(&state)?;
    let runtime = state.runtime();
    let compiled = runtime.compiled();
    let orphaned = match tokio::time::timeout(STORE_TIMEOUT, runtime.store.dlq_counts()).await {
        Ok(Ok(counts)) => Some(reload::orphaned_dead_letters(&counts, &compiled)),
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "cannot count orphaned dead letters");
            None
        }
        Err(_) => {
            tracing::warn!(timeout = ?STORE_TIMEOUT, "the store did not count orphaned dead letters in time");
            None
        }
    };
    Ok(Json(PolicyStatus {
        generation: GenerationView::from(reloader.current().as_ref()),
        watching: state
            .shared
            .watching
            .load(std::sync::atomic::Ordering::Acquire),
        orphaned_dead_letters: orphaned,
        history: reloader.history().iter().map(ReloadView::from).collect(),
    }))
}

fn refused(
    serving: &str,
    candidate: &str,
    errors: Vec<Issue>,
    warnings: Vec<Issue>,
    dry_run: bool,
) -> ApiError {
    let short = serving.get(..12).unwrap_or(serving);
    let first = errors
        .first()
        .map(|e| match &e.location {
            Some(at) => format!("{at}: {}", e.message),
            None => e.message.clone(),
        })
        .unwrap_or_default();
    let detail = if dry_run {
        format!(
            "the policies would be refused ({} error(s); first: {first}); generation {short} keeps serving",
            errors.len()
        )
    } else {
        format!(
            "the policies were not applied ({} error(s); first: {first}); the previous generation {short} keeps serving",
            errors.len()
        )
    };
    ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "reload_refused", detail)
        .with("dry_run", dry_run.into())
        .with("serving", serving.into())
        .with("candidate", candidate.into())
        .with("errors", serde_json::to_value(errors).unwrap_or_default())
        .with(
            "warnings",
            serde_json::to_value(warnings).unwrap_or_default(),
        )
}

/// Reloads the policies now (even when the files did not change), or with
/// `?dry_run=true` answers the plan without applying it.
#[utoipa::path(
    post,
    path = "/v1/policies/reload",
    tag = "policies",
    params(
        ("dry_run" = Option<bool>, Query, description = "Answer the plan (per operation: added, removed, changed, unchanged, and the live state carried over) without applying it"),
    ),
    responses(
        (status = 200, description = "Applied: the reload record; with `dry_run`, the plan", body = ReloadAnswer),
        (status = 400, description = "Bad query parameter (`bad_query`)", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Refused (`reload_refused`): the files have errors (members `errors`, `warnings`, `serving`, `candidate`); the previous generation keeps serving", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "No policy directory (`reload_unavailable`)", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn reload(
    State(state): State<AppState>,
    RawQuery(query): RawQuery,
) -> Result<Json<ReloadAnswer>, ApiError> {
    let q = query_params(query.as_deref(), &["dry_run"])?;
    let dry_run = query_bool(&q, "dry_run")?;
    let reloader = reloader(&state)?;
    if dry_run {
        let serving = reloader.current().hash.clone();
        return match reloader.plan().await {
            Ok((generation, plan)) => Ok(Json(ReloadAnswer::Plan(ReloadPlan {
                dry_run: true,
                files_changed: generation.hash != serving,
                serving,
                candidate: generation.hash.clone(),
                changes: changes(&plan),
                warnings: issues(&generation.warnings),
            }))),
            Err(refusal) => Err(refused(
                &serving,
                &refusal.candidate,
                issues(&refusal.errors),
                issues(&refusal.warnings),
                true,
            )),
        };
    }
    // In its own task: a client that goes away must not stop a reload
    // between building the generation and recording it.
    let record = tokio::spawn(async move { reloader.reload(Trigger::Api, true).await })
        .await
        .map_err(super::dlq::internal)?;
    let view = ReloadView::from(&record);
    if record.result == ReloadResult::Refused {
        return Err(refused(
            &view.generation,
            &view.candidate,
            view.errors,
            view.warnings,
            false,
        ));
    }
    Ok(Json(ReloadAnswer::Applied(view)))
}

fn bad_body(detail: impl Into<String>) -> ApiError {
    ApiError::bad_request("bad_body", detail)
}

/// A posted file name must be a plain `*.yaml` / `*.yml` name: it labels
/// diagnostics and matches a serving file, and is never a path.
fn check_name(name: &str) -> Result<(), ApiError> {
    let plain = !name.is_empty()
        && !name.starts_with('.')
        && !name.contains(['/', '\\', '\0'])
        && (name.ends_with(".yaml") || name.ends_with(".yml"));
    if plain {
        Ok(())
    } else {
        Err(ApiError::bad_request(
            "bad_file_name",
            format!("`{name}` is not a policy file name: use a plain name ending in .yaml or .yml"),
        ))
    }
}

/// Validates the serving files with the posted ones added (or replacing
/// those of the same name); applies nothing.
#[utoipa::path(
    post,
    path = "/v1/policies/validate",
    tag = "policies",
    params(
        ("name" = Option<String>, Query, description = "Name of a posted YAML file (default `posted.yaml`); a serving file of that name is replaced"),
        ("strict" = Option<bool>, Query, description = "Warnings make the set invalid too"),
    ),
    request_body(description = "One YAML file, or several as JSON", content(
        (String = "application/yaml"),
        (PostedFiles = "application/json"),
    )),
    responses(
        (status = 200, description = "The verdict, valid or not", body = Validation),
        (status = 400, description = "Malformed request (`bad_body`, `bad_file_name`, `bad_query`)", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "Body is neither YAML nor JSON", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "No policy directory (`reload_unavailable`), or the serving files cannot be read (`policies_unreadable`)", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn validate(
    State(state): State<AppState>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<Validation>, ApiError> {
    let q = query_params(query.as_deref(), &["name", "strict"])?;
    let strict = query_bool(&q, "strict")?;
    let media = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .map(|m| m.trim().to_ascii_lowercase())
        .unwrap_or_default();
    let files = match media.as_str() {
        "application/yaml" | "application/x-yaml" | "text/yaml" | "text/x-yaml" => {
            let name = q.get("name").map_or(DEFAULT_POSTED_NAME, String::as_str);
            check_name(name)?;
            let text = String::from_utf8(body.to_vec())
                .map_err(|_| bad_body("the YAML body is not UTF-8 text"))?;
            vec![SourceFile {
                name: name.to_owned(),
                text,
            }]
        }
        "application/json" => {
            if q.contains_key("name") {
                return Err(super::dlq::bad_query(
                    "`name` names a YAML body; a JSON body names its files itself",
                ));
            }
            let posted: PostedFiles = serde_json::from_slice(&body).map_err(|e| {
                bad_body(format!(
                    "the body is not {{\"files\": {{\"name.yaml\": \"text\"}}}}: {e}"
                ))
            })?;
            if posted.files.is_empty() {
                return Err(bad_body("`files` is empty: post at least one file"));
            }
            for name in posted.files.keys() {
                check_name(name)?;
            }
            posted
                .files
                .into_iter()
                .map(|(name, text)| SourceFile { name, text })
                .collect()
        }
        _ => {
            return Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                "post one YAML file with `Content-Type: application/yaml`, or {\"files\": {…}} with `Content-Type: application/json`",
            ));
        }
    };
    let reloader = reloader(&state)?;
    let loaded = tokio::task::spawn_blocking(move || reloader.validate_with(files))
        .await
        .map_err(super::dlq::internal)?
        .map_err(|e| {
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "policies_unreadable",
                format!("the serving policy files cannot be read: {e}"),
            )
        })?;
    let summary = loaded.summary();
    Ok(Json(Validation {
        valid: loaded.is_valid(strict),
        errors: summary.errors,
        warnings: summary.warnings,
        diagnostics: issues(&loaded.diagnostics),
    }))
}
