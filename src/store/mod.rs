//! Durable state: idempotency records, the fallback cache and the
//! dead-letter queue.
//!
//! [`Store`] is the interface every caller uses; [`sqlite::SqliteStore`] is
//! the embedded default (one file under the data directory, WAL mode). A
//! shared PostgreSQL store can implement the same trait without changing
//! callers: every method is one statement or one short transaction, times are
//! Unix milliseconds chosen by the caller (so tests drive them with tokio's
//! paused clock), and claims use `INSERT … ON CONFLICT` semantics that both
//! databases share.
//!
//! Durability promises, per record kind:
//!
//! | record | when the returned future resolves |
//! | --- | --- |
//! | dead letter (insert, state changes) | committed and synced to disk |
//! | idempotency record (claim, complete, queue) | committed and synced to disk |
//! | fallback cache entry | accepted; written soon after (a cache may lose its last entries) |

pub mod sqlite;

use bytes::Bytes;
use futures_util::future::BoxFuture;
use serde::{Deserialize, Serialize};

use crate::clock::UnixMillis;

/// Why the store cannot do what was asked. Messages name the file or the
/// record; none carries a stored secret.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// The database file cannot be opened or created.
    #[error("cannot open the store at {path}: {reason}")]
    Open {
        /// The database file.
        path: String,
        /// What went wrong.
        reason: String,
    },
    /// Another process holds the database.
    #[error(
        "the store at {path} is locked by another process (is another claygate running with this data directory?)"
    )]
    Locked {
        /// The database file.
        path: String,
    },
    /// The file was written by a newer claygate.
    #[error(
        "the store at {path} has schema version {found}, newer than the {supported} this claygate knows: upgrade claygate or use another data directory"
    )]
    TooNew {
        /// The database file.
        path: String,
        /// Its schema version.
        found: i64,
        /// The newest version this build knows.
        supported: i64,
    },
    /// The file is not a claygate store (another program's database, or not a database).
    #[error("{path} is not a claygate store: {reason}")]
    Foreign {
        /// The file.
        path: String,
        /// What gave it away.
        reason: String,
    },
    /// The database fails its integrity check.
    #[error("the store at {path} is corrupt: {reason}")]
    Corrupt {
        /// The database file.
        path: String,
        /// What the check reported.
        reason: String,
    },
    /// A statement failed.
    #[error("store operation `{operation}` failed: {reason}")]
    Query {
        /// Which store method.
        operation: &'static str,
        /// What the database said.
        reason: String,
    },
    /// A stored record cannot be read back (never a panic).
    #[error("stored {kind} `{id}` is unreadable: {reason}")]
    BadRecord {
        /// `dead letter`, `idempotency record` or `cache entry`.
        kind: &'static str,
        /// Its id or key.
        id: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The store was closed.
    #[error("the store is closed")]
    Closed,
}

/// Result of a store method.
pub type StoreResult<T> = Result<T, StoreError>;

/// An upstream answer as stored for idempotent replay or the fallback cache.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredResponse {
    /// HTTP status.
    pub status: u16,
    /// The `Content-Type` header, when the upstream sent one.
    pub content_type: Option<String>,
    /// The body as received.
    pub body: Bytes,
}

/// Where an idempotency key stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IdempotencyState {
    /// A call with this key is running; the claim lapses at `lease_until`
    /// (so a crash mid-call does not lock the key forever).
    InFlight {
        /// When another caller may take the key over.
        lease_until: UnixMillis,
    },
    /// The call finished; its answer is replayed until the record expires.
    Completed(StoredResponse),
    /// The call was dead-lettered; a duplicate answers with the entry.
    Queued {
        /// The dead letter's id.
        dlq_id: i64,
    },
}

/// One idempotency key of one operation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdempotencyRecord {
    /// The operation.
    pub operation: String,
    /// The key (client-supplied or derived).
    pub key: String,
    /// sha256 (hex) of the canonical params of the call that claimed the key.
    pub fingerprint: String,
    /// In flight, completed or queued.
    pub state: IdempotencyState,
    /// When the key was claimed.
    pub created_at: UnixMillis,
    /// When the record stops counting (and may be swept).
    pub expires_at: UnixMillis,
}

/// What [`Store::idempotency_claim`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// The caller now holds the key (it was free, expired, or its lease lapsed).
    Claimed,
    /// Someone else holds it, or its answer is stored.
    Existing(IdempotencyRecord),
}

/// A successful answer kept for graceful degradation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheEntry {
    /// The operation.
    pub operation: String,
    /// The cache key (sha256 hex of the selected params).
    pub key: String,
    /// The answer.
    pub response: StoredResponse,
    /// When the upstream gave it.
    pub fetched_at: UnixMillis,
}

/// Life cycle of a dead letter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DlqState {
    /// Waiting for redrive at `next_attempt_at`.
    Pending,
    /// Delivered by a redrive (kept until `expires_at`).
    Delivered,
    /// Out of attempts or failed for good; needs a human (kept until `expires_at`).
    Parked,
}

impl DlqState {
    /// The stored and reported name.
    pub fn as_str(self) -> &'static str {
        match self {
            DlqState::Pending => "pending",
            DlqState::Delivered => "delivered",
            DlqState::Parked => "parked",
        }
    }

    /// Parses a stored or requested name.
    pub fn parse(s: &str) -> Option<DlqState> {
        match s {
            "pending" => Some(DlqState::Pending),
            "delivered" => Some(DlqState::Delivered),
            "parked" => Some(DlqState::Parked),
            _ => None,
        }
    }
}

/// A call to dead-letter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewDeadLetter {
    /// The operation.
    pub operation: String,
    /// The params of the call.
    pub params: serde_json::Value,
    /// The idempotency key, kept so redrive forwards the same one.
    pub idempotency_key: Option<String>,
    /// The priority class the call ran at.
    pub priority: Option<String>,
    /// Stable failure code (e.g. `breaker_open`).
    pub error_code: String,
    /// Human message of the failure.
    pub error_message: String,
    /// Requests the original call sent.
    pub call_attempts: u32,
    /// When the original call started.
    pub first_attempt_at: UnixMillis,
    /// When it gave up.
    pub last_attempt_at: UnixMillis,
    /// When the first redrive is due.
    pub next_attempt_at: UnixMillis,
}

/// A stored dead letter.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DeadLetter {
    /// Store-assigned id, increasing.
    pub id: i64,
    /// The operation.
    pub operation: String,
    /// The params of the call.
    pub params: serde_json::Value,
    /// The idempotency key forwarded on redrive.
    pub idempotency_key: Option<String>,
    /// The priority class of the call.
    pub priority: Option<String>,
    /// Pending, delivered or parked.
    pub state: DlqState,
    /// Code of the latest failure.
    pub error_code: String,
    /// Message of the latest failure.
    pub error_message: String,
    /// Requests the original call sent.
    pub call_attempts: u32,
    /// Redrives run so far.
    pub redrive_attempts: u32,
    /// When the original call started.
    pub first_attempt_at: UnixMillis,
    /// When the latest attempt (call or redrive) ended.
    pub last_attempt_at: UnixMillis,
    /// When the next redrive is due (pending entries).
    pub next_attempt_at: UnixMillis,
    /// HTTP status of the delivering answer (delivered entries).
    pub delivered_status: Option<u16>,
    /// When a delivered or parked entry may be swept.
    pub expires_at: Option<UnixMillis>,
}

/// The result of one redrive of a dead letter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DlqUpdate {
    /// The upstream accepted it.
    Delivered {
        /// When.
        at: UnixMillis,
        /// The answer's status.
        status: u16,
        /// Kept until (retention).
        expires_at: UnixMillis,
    },
    /// It failed and will be tried again.
    Retry {
        /// When the attempt ended.
        at: UnixMillis,
        /// Failure code.
        error_code: String,
        /// Failure message.
        error_message: String,
        /// When to try again.
        next_attempt_at: UnixMillis,
    },
    /// It failed for good (out of attempts, or a permanent error).
    Parked {
        /// When.
        at: UnixMillis,
        /// Failure code.
        error_code: String,
        /// Failure message.
        error_message: String,
        /// Kept until (retention).
        expires_at: UnixMillis,
    },
}

/// Which dead letters a list, replay or purge concerns; `None` matches all.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct DlqFilter {
    /// Only this operation.
    pub operation: Option<String>,
    /// Only this state.
    pub state: Option<DlqState>,
    /// Only this error code.
    pub error_code: Option<String>,
}

/// One page of a listing: entries with `id > after`, in id order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageRequest {
    /// Start after this id (`None`: from the start).
    pub after: Option<i64>,
    /// At most this many entries (callers cap it).
    pub limit: u32,
}

/// A page of dead letters.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DlqPage {
    /// The entries.
    pub entries: Vec<DeadLetter>,
    /// Pass as `after` for the next page; `None` on the last page.
    pub next_after: Option<i64>,
}

/// How many dead letters one operation has in one state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DlqCount {
    /// The operation.
    pub operation: String,
    /// The state.
    pub state: DlqState,
    /// How many.
    pub count: u64,
}

/// Durable state behind the runtime. Every method is safe to call
/// concurrently; implementations batch writes as they see fit (group commit)
/// but keep the durability promises of the module table.
pub trait Store: Send + Sync + 'static {
    /// Claims `key` of `operation` as in flight until `lease_until`, unless a
    /// live record holds it. A record whose `expires_at <= now`, or an
    /// in-flight record whose `lease_until <= now`, is replaced (the caller
    /// takes it over). Durable before it resolves.
    fn idempotency_claim<'a>(
        &'a self,
        operation: &'a str,
        key: &'a str,
        fingerprint: &'a str,
        now: UnixMillis,
        lease_until: UnixMillis,
        expires_at: UnixMillis,
    ) -> BoxFuture<'a, StoreResult<Claim>>;

    /// Stores the answer of a claimed key, to be replayed until `expires_at`.
    fn idempotency_complete<'a>(
        &'a self,
        operation: &'a str,
        key: &'a str,
        response: &'a StoredResponse,
        expires_at: UnixMillis,
    ) -> BoxFuture<'a, StoreResult<()>>;

    /// Marks a claimed key as dead-lettered in entry `dlq_id`.
    fn idempotency_queue<'a>(
        &'a self,
        operation: &'a str,
        key: &'a str,
        dlq_id: i64,
        expires_at: UnixMillis,
    ) -> BoxFuture<'a, StoreResult<()>>;

    /// Drops an in-flight claim (the call failed in a way that is not
    /// stored, so a later try may run). Completed records are left alone.
    fn idempotency_release<'a>(
        &'a self,
        operation: &'a str,
        key: &'a str,
    ) -> BoxFuture<'a, StoreResult<()>>;

    /// The record of `key`, expired or not.
    fn idempotency_get<'a>(
        &'a self,
        operation: &'a str,
        key: &'a str,
    ) -> BoxFuture<'a, StoreResult<Option<IdempotencyRecord>>>;

    /// Deletes records with `expires_at <= now`; answers how many.
    fn idempotency_sweep(&self, now: UnixMillis) -> BoxFuture<'_, StoreResult<u64>>;

    /// Stores (or replaces) a cache entry. May resolve before the write is
    /// on disk.
    fn cache_put(&self, entry: CacheEntry) -> BoxFuture<'_, StoreResult<()>>;

    /// The cached entry of `key`, if any.
    fn cache_get<'a>(
        &'a self,
        operation: &'a str,
        key: &'a str,
    ) -> BoxFuture<'a, StoreResult<Option<CacheEntry>>>;

    /// Deletes `operation`'s entries fetched before `fetched_before`, then all
    /// but its newest `keep` entries; answers how many were deleted.
    fn cache_sweep<'a>(
        &'a self,
        operation: &'a str,
        fetched_before: UnixMillis,
        keep: u64,
    ) -> BoxFuture<'a, StoreResult<u64>>;

    /// Writes a dead letter (state pending); durable before it resolves.
    /// Answers its id.
    fn dlq_insert(&self, entry: NewDeadLetter) -> BoxFuture<'_, StoreResult<i64>>;

    /// One dead letter.
    fn dlq_get(&self, id: i64) -> BoxFuture<'_, StoreResult<Option<DeadLetter>>>;

    /// Dead letters matching `filter`, a page at a time, in id order.
    fn dlq_list<'a>(
        &'a self,
        filter: &'a DlqFilter,
        page: PageRequest,
    ) -> BoxFuture<'a, StoreResult<DlqPage>>;

    /// Pending entries of `operation` due at `now` (`next_attempt_at <= now`),
    /// oldest due first, at most `limit`.
    fn dlq_due<'a>(
        &'a self,
        operation: &'a str,
        now: UnixMillis,
        limit: u32,
    ) -> BoxFuture<'a, StoreResult<Vec<DeadLetter>>>;

    /// Records the result of one redrive of entry `id` (counting it in
    /// `redrive_attempts`); durable. Answers the updated entry, `None` when
    /// it no longer exists.
    fn dlq_update(
        &self,
        id: i64,
        update: DlqUpdate,
    ) -> BoxFuture<'_, StoreResult<Option<DeadLetter>>>;

    /// Makes matching entries pending and due at `now` (a replay by filter;
    /// parked entries get a fresh count of redrive attempts). Delivered
    /// entries match only a filter that names the `delivered` state, so a
    /// broad replay never sends delivered work again. Answers how many.
    fn dlq_requeue<'a>(
        &'a self,
        filter: &'a DlqFilter,
        now: UnixMillis,
    ) -> BoxFuture<'a, StoreResult<u64>>;

    /// Deletes one entry; answers whether it existed.
    fn dlq_delete(&self, id: i64) -> BoxFuture<'_, StoreResult<bool>>;

    /// Deletes every matching entry; answers how many.
    fn dlq_purge<'a>(&'a self, filter: &'a DlqFilter) -> BoxFuture<'a, StoreResult<u64>>;

    /// Entry counts by operation and state.
    fn dlq_counts(&self) -> BoxFuture<'_, StoreResult<Vec<DlqCount>>>;

    /// Deletes delivered and parked entries with `expires_at <= now`.
    fn dlq_sweep(&self, now: UnixMillis) -> BoxFuture<'_, StoreResult<u64>>;

    /// Writes everything accepted so far and closes; later calls fail with
    /// [`StoreError::Closed`].
    fn close(&self) -> BoxFuture<'_, StoreResult<()>>;
}
