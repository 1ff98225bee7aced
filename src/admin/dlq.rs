//! The dead-letter queue over HTTP: list (filtered, paged), inspect, replay
//! one now, requeue many, delete one, purge many.
//!
//! Query parameters are checked strictly: an unknown or repeated parameter
//! or a bad value is a 400 `bad_query`, never silently ignored, since a
//! typo'd filter would otherwise widen a listing or a replay. Replaying or
//! purging by filter needs an explicit filter: at least one field, or
//! `"all": true`, so an empty body cannot requeue or delete the whole queue
//! by accident.

use std::collections::BTreeMap;

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, StatusCode, header};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::AppState;
use super::error::{ApiError, Problem, failure_status};
use crate::dlq::{DeleteError, ReplayError};
use crate::store::{DeadLetter, DlqFilter, DlqState, PageRequest, UnreadableDeadLetter};

/// Entries a listing answers unless `limit` says otherwise.
pub const DEFAULT_LIMIT: u32 = 50;
/// Most entries one listing answers.
pub const MAX_LIMIT: u32 = 500;

pub(super) fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list))
        .routes(routes!(get_one, delete))
        .routes(routes!(replay_one))
        .routes(routes!(replay_matching))
        .routes(routes!(purge))
}

/// Life cycle state of a dead letter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum DlqStateName {
    /// Waiting for redrive at `next_attempt_at`.
    Pending,
    /// Delivered by a redrive.
    Delivered,
    /// Out of attempts or failed for good; needs a human.
    Parked,
}

impl From<DlqState> for DlqStateName {
    fn from(s: DlqState) -> Self {
        match s {
            DlqState::Pending => DlqStateName::Pending,
            DlqState::Delivered => DlqStateName::Delivered,
            DlqState::Parked => DlqStateName::Parked,
        }
    }
}

/// A dead letter.
#[derive(Debug, Serialize, ToSchema)]
pub struct DeadLetterView {
    /// Id, increasing.
    pub id: i64,
    /// The operation.
    pub operation: String,
    /// The params of the call.
    #[schema(value_type = Object)]
    pub params: Value,
    /// The idempotency key forwarded on redrive.
    pub idempotency_key: Option<String>,
    /// The priority class of the call.
    pub priority: Option<String>,
    /// `pending`, `delivered` or `parked`.
    pub state: DlqStateName,
    /// Stable code of the latest failure, e.g. `upstream_status`.
    pub error_code: String,
    /// Message of the latest failure.
    pub error_message: String,
    /// Requests the original call sent.
    pub call_attempts: u32,
    /// Redrives run so far.
    pub redrive_attempts: u32,
    /// When the original call started, Unix milliseconds.
    pub first_attempt_at: i64,
    /// When the latest attempt ended, Unix milliseconds.
    pub last_attempt_at: i64,
    /// When the next redrive is due (pending entries), Unix milliseconds.
    pub next_attempt_at: i64,
    /// HTTP status of the delivering answer (delivered entries).
    pub delivered_status: Option<u16>,
    /// When a delivered or parked entry may be swept, Unix milliseconds.
    pub expires_at: Option<i64>,
}

impl From<DeadLetter> for DeadLetterView {
    fn from(d: DeadLetter) -> Self {
        DeadLetterView {
            id: d.id,
            operation: d.operation,
            params: d.params,
            idempotency_key: d.idempotency_key,
            priority: d.priority,
            state: d.state.into(),
            error_code: d.error_code,
            error_message: d.error_message,
            call_attempts: d.call_attempts,
            redrive_attempts: d.redrive_attempts,
            first_attempt_at: d.first_attempt_at,
            last_attempt_at: d.last_attempt_at,
            next_attempt_at: d.next_attempt_at,
            delivered_status: d.delivered_status,
            expires_at: d.expires_at,
        }
    }
}

/// A stored dead letter that cannot be read back (a damaged row): find it
/// here, then delete it by id.
#[derive(Debug, Serialize, ToSchema)]
pub struct UnreadableView {
    /// Its id.
    pub id: i64,
    /// Its operation, when that much reads.
    pub operation: Option<String>,
    /// What is wrong with it.
    pub reason: String,
}

impl From<UnreadableDeadLetter> for UnreadableView {
    fn from(u: UnreadableDeadLetter) -> Self {
        UnreadableView {
            id: u.id,
            operation: u.operation,
            reason: u.reason,
        }
    }
}

/// A page of dead letters.
#[derive(Debug, Serialize, ToSchema)]
pub struct DeadLetterPage {
    /// The entries, in id order.
    pub entries: Vec<DeadLetterView>,
    /// Rows of this page that cannot be read back (usually none).
    pub unreadable: Vec<UnreadableView>,
    /// Pass as `after` for the next page; absent on the last page.
    pub next_after: Option<i64>,
}

/// Which dead letters to requeue. At least one field, or `all: true` alone.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ReplayFilter {
    /// Only this operation.
    pub operation: Option<String>,
    /// Only this state: `pending` or `parked` (delivered entries are never requeued).
    pub state: Option<String>,
    /// Only this error code.
    pub error_code: Option<String>,
    /// Every pending and parked entry; must be alone.
    pub all: Option<bool>,
}

/// Which dead letters to delete. At least one field, or `all: true` alone.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PurgeFilter {
    /// Only this operation.
    pub operation: Option<String>,
    /// Only this state: `pending`, `delivered` or `parked`. Without it,
    /// pending entries (work not yet delivered) are deleted too.
    pub state: Option<String>,
    /// Only this error code.
    pub error_code: Option<String>,
    /// Every entry, pending ones included; must be alone.
    pub all: Option<bool>,
}

/// How many entries a purge deleted, and how many it left alone.
#[derive(Debug, Serialize, ToSchema)]
pub struct Purged {
    /// Entries deleted (their queued or parked idempotency keys are freed).
    pub purged: u64,
    /// Matching entries left alone because they were being redriven or
    /// replayed at that moment (their keys must hold while their requests
    /// are in flight); purge again to delete them.
    pub skipped: u64,
}

/// How many entries a replay by filter requeued.
#[derive(Debug, Serialize, ToSchema)]
pub struct Requeued {
    /// Entries made pending and due now; the redrive worker sends them, paced.
    pub requeued: u64,
}

/// The query parameters of a request, each at most once and each one of
/// `allowed`; anything else is a 400 `bad_query`.
pub(super) fn query_params(
    raw: Option<&str>,
    allowed: &[&str],
) -> Result<BTreeMap<String, String>, ApiError> {
    let mut out = BTreeMap::new();
    for (key, value) in url::form_urlencoded::parse(raw.unwrap_or("").as_bytes()) {
        if !allowed.contains(&key.as_ref()) {
            return Err(bad_query(format!(
                "unknown query parameter `{key}`; expected one of {}",
                allowed.join(", ")
            )));
        }
        if out
            .insert(key.clone().into_owned(), value.into_owned())
            .is_some()
        {
            return Err(bad_query(format!(
                "query parameter `{key}` is given more than once"
            )));
        }
    }
    Ok(out)
}

/// 400 `bad_query`.
pub(super) fn bad_query(detail: impl Into<String>) -> ApiError {
    ApiError::bad_request("bad_query", detail)
}

/// A boolean query parameter: `true`/`false` (or `1`/`0`); absent is false.
pub(super) fn query_bool(params: &BTreeMap<String, String>, name: &str) -> Result<bool, ApiError> {
    match params.get(name).map(String::as_str) {
        None | Some("false" | "0") => Ok(false),
        Some("true" | "1" | "") => Ok(true),
        Some(other) => Err(bad_query(format!(
            "`{name}` must be true or false, not `{other}`"
        ))),
    }
}

fn parse_state(text: &str, what: &str) -> Result<DlqState, String> {
    DlqState::parse(text)
        .ok_or_else(|| format!("{what} must be pending, delivered or parked, not `{text}`"))
}

fn not_a_name(name: &str, text: &str) -> Option<String> {
    text.trim()
        .is_empty()
        .then(|| format!("`{name}` must not be empty"))
}

/// Parses a dead letter's id from the path (400 `bad_id` when it is not one).
fn entry_id(text: &str) -> Result<i64, ApiError> {
    text.parse::<i64>()
        .ok()
        .filter(|id| *id > 0)
        .ok_or_else(|| {
            ApiError::bad_request(
                "bad_id",
                format!("`{text}` is not a dead letter id (a positive integer)"),
            )
        })
}

/// 500 for a task that ended without an answer (a bug; reported, not hidden).
pub(super) fn internal(e: tokio::task::JoinError) -> ApiError {
    tracing::error!(error = %e, "an admin task ended without an answer");
    ApiError::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        "internal",
        format!("the task ended without an answer: {e}"),
    )
}

fn not_found(id: i64) -> ApiError {
    ApiError::not_found(
        "dead_letter_not_found",
        format!("no dead letter with id {id}"),
    )
}

/// Lists dead letters, filtered, a page at a time in id order.
#[utoipa::path(
    get,
    path = "/v1/dlq",
    tag = "dlq",
    params(
        ("operation" = Option<String>, Query, description = "Only this operation"),
        ("state" = Option<String>, Query, description = "Only this state: pending, delivered or parked"),
        ("error_code" = Option<String>, Query, description = "Only this error code, e.g. `upstream_status`"),
        ("after" = Option<i64>, Query, description = "Entries after this id (the previous page's `next_after`)"),
        ("limit" = Option<u32>, Query, description = "Entries per page: 1 to 500, default 50"),
    ),
    responses(
        (status = 200, description = "A page of dead letters", body = DeadLetterPage),
        (status = 400, description = "Unknown, repeated or bad query parameter (`bad_query`)", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "The store cannot be read (`store_unavailable`)", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn list(
    State(state): State<AppState>,
    RawQuery(query): RawQuery,
) -> Result<Json<DeadLetterPage>, ApiError> {
    let q = query_params(
        query.as_deref(),
        &["operation", "state", "error_code", "after", "limit"],
    )?;
    for name in ["operation", "error_code"] {
        if let Some(problem) = q.get(name).and_then(|v| not_a_name(name, v)) {
            return Err(bad_query(problem));
        }
    }
    let filter = DlqFilter {
        operation: q.get("operation").cloned(),
        state: q
            .get("state")
            .map(|s| parse_state(s, "`state`"))
            .transpose()
            .map_err(bad_query)?,
        error_code: q.get("error_code").cloned(),
    };
    let after = q
        .get("after")
        .map(|a| {
            a.parse::<i64>().ok().filter(|a| *a >= 0).ok_or_else(|| {
                bad_query(format!(
                    "`after` must be an entry id (0 or more), not `{a}`"
                ))
            })
        })
        .transpose()?;
    let limit = match q.get("limit") {
        None => DEFAULT_LIMIT,
        Some(l) => l
            .parse::<u32>()
            .ok()
            .filter(|l| (1..=MAX_LIMIT).contains(l))
            .ok_or_else(|| {
                bad_query(format!(
                    "`limit` must be a number from 1 to {MAX_LIMIT}, not `{l}`"
                ))
            })?,
    };
    let page = state
        .runtime()
        .store
        .dlq_list(&filter, PageRequest { after, limit })
        .await?;
    Ok(Json(DeadLetterPage {
        entries: page.entries.into_iter().map(DeadLetterView::from).collect(),
        unreadable: page
            .unreadable
            .into_iter()
            .map(UnreadableView::from)
            .collect(),
        next_after: page.next_after,
    }))
}

/// One dead letter.
#[utoipa::path(
    get,
    path = "/v1/dlq/{id}",
    tag = "dlq",
    params(("id" = i64, Path, description = "Dead letter id")),
    responses(
        (status = 200, description = "The entry", body = DeadLetterView),
        (status = 400, description = "Not an id (`bad_id`)", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such entry (`dead_letter_not_found`)", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "The store cannot be read (`store_unavailable`)", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn get_one(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<DeadLetterView>, ApiError> {
    let id = entry_id(&id)?;
    match state.runtime().store.dlq_get(id).await? {
        Some(entry) => Ok(Json(entry.into())),
        None => Err(not_found(id)),
    }
}

/// Deletes one dead letter (it will never be sent) and frees its queued or
/// parked idempotency key. Refused while the entry is being redriven or
/// replayed: freeing its key then would let a retry of the original call
/// send the work beside the request in flight.
#[utoipa::path(
    delete,
    path = "/v1/dlq/{id}",
    tag = "dlq",
    params(("id" = i64, Path, description = "Dead letter id")),
    responses(
        (status = 204, description = "Deleted"),
        (status = 400, description = "Not an id (`bad_id`)", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such entry (`dead_letter_not_found`)", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "Being redriven or replayed now (`dlq_busy`, `Retry-After`); the entry is unchanged", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "The store cannot be written (`store_unavailable`)", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn delete(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    let id = entry_id(&id)?;
    // In its own task: the entry's mark must be held until the delete has
    // committed, whatever the client does.
    let runtime = std::sync::Arc::clone(state.runtime());
    let deleted = tokio::spawn(async move { crate::dlq::delete_one(&runtime, id).await })
        .await
        .map_err(internal)?;
    match deleted {
        Ok(()) => {
            tracing::info!(id, "dead letter deleted by admin");
            Ok(StatusCode::NO_CONTENT)
        }
        Err(DeleteError::NotFound(id)) => Err(not_found(id)),
        Err(e @ DeleteError::Busy(_)) => {
            Err(ApiError::new(StatusCode::CONFLICT, e.code(), e.to_string())
                .retry_after(std::time::Duration::from_secs(1)))
        }
        Err(DeleteError::Store(e)) => Err(ApiError::from(e)),
    }
}

/// Runs one dead letter now through its operation's pipeline, whatever its
/// due time, and answers the entry as recorded after the attempt
/// (`delivered`, or still `pending`/`parked` with the new error).
#[utoipa::path(
    post,
    path = "/v1/dlq/{id}/replay",
    tag = "dlq",
    params(("id" = i64, Path, description = "Dead letter id")),
    responses(
        (status = 200, description = "The entry after the attempt", body = DeadLetterView),
        (status = 400, description = "Not an id (`bad_id`)", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such entry (`dead_letter_not_found`)", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "Already delivered (`dlq_already_delivered`), being redriven now (`dlq_busy`, `Retry-After`), or its operation is not serving (`unknown_operation`)", body = Problem, content_type = "application/problem+json"),
        (status = 429, description = "Not sent: bulkhead full or rate limited (`Retry-After`); the entry is unchanged", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Not sent: breaker open (`breaker_open`, `Retry-After`); or the store is unavailable", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn replay_one(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<DeadLetterView>, ApiError> {
    let id = entry_id(&id)?;
    // In its own task: a client that goes away must not cancel a redrive
    // half-way (sent, but its outcome not recorded).
    let runtime = std::sync::Arc::clone(state.runtime());
    let replayed = tokio::spawn(async move { crate::dlq::replay_one(&runtime, id).await })
        .await
        .map_err(internal)?;
    match replayed {
        Ok(entry) => {
            tracing::info!(
                id,
                state = entry.state.as_str(),
                "dead letter replayed by admin"
            );
            Ok(Json(entry.into()))
        }
        Err(e) => Err(replay_error(e)),
    }
}

/// The HTTP answer to a failed replay.
fn replay_error(e: ReplayError) -> ApiError {
    match &e {
        ReplayError::NotFound(id) => not_found(*id),
        ReplayError::AlreadyDelivered(_) | ReplayError::UnknownOperation(_) => {
            ApiError::new(StatusCode::CONFLICT, e.code(), e.to_string())
        }
        ReplayError::Busy(_) => ApiError::new(StatusCode::CONFLICT, e.code(), e.to_string())
            .retry_after(std::time::Duration::from_secs(1)),
        ReplayError::Refused { failure, .. } => {
            let (status, retry) = failure_status(failure);
            let mut error = ApiError::new(status, e.code(), e.to_string());
            error.retry_after = retry;
            error
        }
        ReplayError::Store(s) => ApiError::from(s.clone()),
    }
}

/// Requeues every pending or parked entry matching the filter: due now, and
/// parked ones with a fresh count of attempts. The redrive worker then sends
/// them, paced.
#[utoipa::path(
    post,
    path = "/v1/dlq/replay",
    tag = "dlq",
    request_body(content = ReplayFilter, content_type = "application/json", description = "At least one of `operation`, `state`, `error_code`; or `{\"all\": true}`"),
    responses(
        (status = 200, description = "How many entries were requeued", body = Requeued),
        (status = 400, description = "Malformed body, bad value, or no filter (`bad_filter`)", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "Body is not application/json", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "The store cannot be written (`store_unavailable`)", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn replay_matching(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<Requeued>, ApiError> {
    let filter = replay_filter(&headers, &body)?;
    let runtime = std::sync::Arc::clone(state.runtime());
    let task_filter = filter.clone();
    let requeued =
        tokio::spawn(async move { crate::dlq::replay_matching(&runtime, &task_filter).await })
            .await
            .map_err(internal)??;
    tracing::info!(?filter, requeued, "dead letters requeued by admin");
    Ok(Json(Requeued { requeued }))
}

fn bad_filter(detail: impl Into<String>) -> ApiError {
    ApiError::bad_request("bad_filter", detail)
}

/// Deletes every dead letter matching the filter, pending ones too unless
/// the filter names a state, and frees their queued or parked idempotency
/// keys (the work is gone: a retry of the original call runs afresh).
/// Entries being redriven or replayed at that moment are left alone and
/// counted in `skipped`.
#[utoipa::path(
    post,
    path = "/v1/dlq/purge",
    tag = "dlq",
    request_body(content = PurgeFilter, content_type = "application/json", description = "At least one of `operation`, `state`, `error_code`; or `{\"all\": true}` for every entry"),
    responses(
        (status = 200, description = "How many entries were deleted, and how many were skipped for being redriven right then", body = Purged),
        (status = 400, description = "Malformed body, bad value, or no filter (`bad_filter`)", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "Body is not application/json", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "The store cannot be written (`store_unavailable`)", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn purge(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<Purged>, ApiError> {
    let f: PurgeFilter = filter_body(&headers, &body)?;
    let filter = selected(
        [f.operation, f.state, f.error_code],
        f.all,
        "say which entries to purge: at least one of `operation`, `state`, `error_code`, or `{\"all\": true}` for every entry (pending ones included)",
        "`all: true` purges every entry and cannot be combined with a filter field; send one or the other",
    )?;
    let runtime = std::sync::Arc::clone(state.runtime());
    let task_filter = filter.clone();
    // In its own task: a client that goes away must not cut it off.
    let done = tokio::spawn(async move { crate::dlq::purge(&runtime, &task_filter).await })
        .await
        .map_err(internal)??;
    tracing::info!(
        ?filter,
        purged = done.purged,
        skipped = done.skipped,
        "dead letters purged by admin"
    );
    Ok(Json(Purged {
        purged: done.purged,
        skipped: done.skipped,
    }))
}

/// The body of `POST /v1/dlq/replay` as a store filter.
fn replay_filter(headers: &HeaderMap, body: &Bytes) -> Result<DlqFilter, ApiError> {
    let f: ReplayFilter = filter_body(headers, body)?;
    selected(
        [f.operation, f.state, f.error_code],
        f.all,
        "say which entries to replay: at least one of `operation`, `state`, `error_code`, or `{\"all\": true}` for every pending and parked entry",
        "`all: true` replays every entry and cannot be combined with a filter field; send one or the other",
    )
}

/// A JSON filter body (`Content-Type: application/json`).
fn filter_body<T: serde::de::DeserializeOwned>(
    headers: &HeaderMap,
    body: &Bytes,
) -> Result<T, ApiError> {
    let json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|m| m.trim().eq_ignore_ascii_case("application/json"));
    if !json {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "send the filter as JSON with `Content-Type: application/json`",
        ));
    }
    serde_json::from_slice(body).map_err(|e| bad_filter(format!("the body is not a filter: {e}")))
}

/// `operation`, `state`, `error_code` and `all` of a filter body as a store
/// filter: at least one field, or `all: true` alone.
fn selected(
    [operation, state, error_code]: [Option<String>; 3],
    all: Option<bool>,
    none: &str,
    both: &str,
) -> Result<DlqFilter, ApiError> {
    let fields = [&operation, &state, &error_code];
    for (name, value) in ["operation", "state", "error_code"].into_iter().zip(fields) {
        if let Some(problem) = value.as_deref().and_then(|v| not_a_name(name, v)) {
            return Err(bad_filter(problem));
        }
    }
    let any_field = fields.iter().any(|v| v.is_some());
    match (all, any_field) {
        (Some(true), true) => return Err(bad_filter(both)),
        (Some(true), false) | (None | Some(false), true) => {}
        (None | Some(false), false) => return Err(bad_filter(none)),
    }
    Ok(DlqFilter {
        operation,
        state: state
            .as_deref()
            .map(|s| parse_state(s, "`state`"))
            .transpose()
            .map_err(bad_filter)?,
        error_code,
    })
}
