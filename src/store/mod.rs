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
//! | idempotency record (claim, complete, release) | committed and synced to disk |
//! | fallback cache entry | accepted; written soon after (a cache may lose its last entries) |
//!
//! # Who may change an idempotency record
//!
//! A record changes only by the hand that holds it, so a late writer can
//! never overwrite someone else's key:
//!
//! * an **in-flight** record belongs to the [`ClaimToken`] that
//!   [`Store::idempotency_claim`] answered: complete, release and
//!   dead-letter ([`Store::dlq_insert_holding`]) match on it, so a holder
//!   whose lease ran out (and was taken over) changes nothing;
//! * a **queued** or **parked** record belongs to its dead letter (`dlq_id`):
//!   the dead letter's own transitions ([`Store::dlq_update`],
//!   [`Store::dlq_requeue`], [`Store::dlq_delete`], [`Store::dlq_purge`],
//!   [`Store::dlq_sweep`]) change it, in the same transaction as the dead
//!   letter, so a new call that reused the key after it expired is never
//!   touched.
//!
//! The record mirrors its dead letter: `queued` while the entry is pending
//! (and it does not expire meanwhile, so a duplicate never runs the work a
//! second time alongside the redrive), `completed` with the delivering
//! answer (or a permanent upstream answer), `parked` while the entry is
//! parked (without expiry too: it lasts as long as the entry), and gone
//! when the entry is deleted, purged or swept (the work is gone; a retry
//! may run afresh).

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
    /// An idempotency claim is no longer held by the token given (its lease
    /// ran out and another caller took the key over).
    #[error("idempotency key `{key}` of `{operation}` is no longer held by this call")]
    ClaimLost {
        /// The operation.
        operation: String,
        /// The key.
        key: String,
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

/// Proof of holding an in-flight idempotency claim: answered by
/// [`Store::idempotency_claim`], required to complete, release or
/// dead-letter the claimed key (random, so a taken-over claim's old holder
/// cannot guess the new one).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ClaimToken(String);

impl ClaimToken {
    /// A fresh random token (128 bits, hex).
    pub fn random() -> ClaimToken {
        use rand::RngExt;
        let bits: u128 = rand::rng().random();
        ClaimToken(format!("{bits:032x}"))
    }

    /// A token as stored.
    pub fn from_stored(text: impl Into<String>) -> ClaimToken {
        ClaimToken(text.into())
    }

    /// The stored form.
    pub fn as_str(&self) -> &str {
        &self.0
    }
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
    /// The call was dead-lettered and its entry is pending; a duplicate
    /// answers with the entry (202).
    Queued {
        /// The dead letter's id.
        dlq_id: i64,
    },
    /// The call's dead letter was parked (out of attempts): it needs a
    /// human, and a duplicate hears so instead of "queued".
    Parked {
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
    /// In flight, completed, queued or parked.
    pub state: IdempotencyState,
    /// When the key was claimed.
    pub created_at: UnixMillis,
    /// When the record stops counting (and may be swept).
    pub expires_at: UnixMillis,
}

/// What [`Store::idempotency_claim`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// The caller now holds the key (it was free, expired, or its lease
    /// lapsed), with this token.
    Claimed(ClaimToken),
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
    /// The upstream accepted it. The entry's idempotency record (when the
    /// entry still holds it) becomes `completed` with `response`.
    Delivered {
        /// When.
        at: UnixMillis,
        /// The delivering answer.
        response: StoredResponse,
        /// Kept until (retention).
        expires_at: UnixMillis,
        /// When the idempotency record of the answer expires (its ttl).
        key_expires_at: UnixMillis,
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
    /// It failed for good (out of attempts, or a permanent error). The
    /// entry's idempotency record becomes `completed` with `answer` when
    /// given (a permanent upstream answer is the call's result), else
    /// `parked`, without expiry: it lasts as long as its entry.
    Parked {
        /// When.
        at: UnixMillis,
        /// Failure code.
        error_code: String,
        /// Failure message.
        error_message: String,
        /// Kept until (retention).
        expires_at: UnixMillis,
        /// The permanent upstream answer to replay to duplicates, if any.
        answer: Option<StoredResponse>,
        /// When the idempotency record of `answer` expires (its ttl); unused
        /// without an answer.
        key_expires_at: UnixMillis,
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

/// A stored dead letter that cannot be read back (a damaged row): what is
/// known of it, so an admin can find it and delete it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct UnreadableDeadLetter {
    /// Its id.
    pub id: i64,
    /// Its operation, when that column reads.
    pub operation: Option<String>,
    /// What is wrong with it.
    pub reason: String,
}

/// A page of dead letters.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DlqPage {
    /// The entries.
    pub entries: Vec<DeadLetter>,
    /// Rows of the page that cannot be read back, in id order (listed, not
    /// hidden, so they can be deleted).
    pub unreadable: Vec<UnreadableDeadLetter>,
    /// Pass as `after` for the next page; `None` on the last page.
    pub next_after: Option<i64>,
}

/// Due dead letters of one operation: the readable ones to redrive, and
/// rows that cannot be read back (to be parked, so they cannot block the
/// queue).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DueEntries {
    /// Entries to redrive, oldest due first.
    pub entries: Vec<DeadLetter>,
    /// Due rows that cannot be read back.
    pub unreadable: Vec<UnreadableDeadLetter>,
}

/// What [`Store::dlq_purge`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DlqPurged {
    /// Entries deleted.
    pub deleted: u64,
    /// Matching entries left alone because the caller excepted them.
    pub skipped: u64,
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
/// but keep the durability promises of the module table, and the rules of
/// who may change an idempotency record (module docs).
pub trait Store: Send + Sync + 'static {
    /// Claims `key` of `operation` as in flight until `lease_until`, unless a
    /// live record holds it. A record whose `expires_at <= now`, or an
    /// in-flight record whose `lease_until <= now`, is replaced (the caller
    /// takes it over). Answers the new claim's token, or the record found.
    /// Durable before it resolves.
    fn idempotency_claim<'a>(
        &'a self,
        operation: &'a str,
        key: &'a str,
        fingerprint: &'a str,
        now: UnixMillis,
        lease_until: UnixMillis,
        expires_at: UnixMillis,
    ) -> BoxFuture<'a, StoreResult<Claim>>;

    /// Stores the answer of the key claimed with `token`, to be replayed
    /// until `expires_at`. Answers `false`, changing nothing, when `token`
    /// no longer holds the key (taken over, released or gone).
    fn idempotency_complete<'a>(
        &'a self,
        operation: &'a str,
        key: &'a str,
        token: &'a ClaimToken,
        response: &'a StoredResponse,
        expires_at: UnixMillis,
    ) -> BoxFuture<'a, StoreResult<bool>>;

    /// Drops the in-flight claim held with `token` (the call failed in a way
    /// that is not stored, so a later try may run). Answers whether it did.
    fn idempotency_release<'a>(
        &'a self,
        operation: &'a str,
        key: &'a str,
        token: &'a ClaimToken,
    ) -> BoxFuture<'a, StoreResult<bool>>;

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

    /// Deletes entries of every operation *not* in `live` (operations a
    /// reload removed, or that lost their cache) fetched before
    /// `fetched_before`; answers how many.
    fn cache_sweep_others<'a>(
        &'a self,
        live: &'a [String],
        fetched_before: UnixMillis,
    ) -> BoxFuture<'a, StoreResult<u64>>;

    /// Writes a dead letter (state pending); durable before it resolves.
    /// Answers its id. With `claim`, the entry's idempotency key (held with
    /// that token) is marked `queued` in the same transaction, so no crash
    /// can leave a dead letter whose key still looks in flight; when the
    /// token no longer holds the key, nothing is written and the answer is
    /// [`StoreError::ClaimLost`].
    fn dlq_insert_holding<'a>(
        &'a self,
        entry: NewDeadLetter,
        claim: Option<&'a ClaimToken>,
    ) -> BoxFuture<'a, StoreResult<i64>>;

    /// [`dlq_insert_holding`](Store::dlq_insert_holding) without a key to mark.
    fn dlq_insert(&self, entry: NewDeadLetter) -> BoxFuture<'_, StoreResult<i64>> {
        self.dlq_insert_holding(entry, None)
    }

    /// One dead letter.
    fn dlq_get(&self, id: i64) -> BoxFuture<'_, StoreResult<Option<DeadLetter>>>;

    /// Dead letters matching `filter`, a page at a time, in id order; rows
    /// that cannot be read back are listed apart, never fail the page.
    fn dlq_list<'a>(
        &'a self,
        filter: &'a DlqFilter,
        page: PageRequest,
    ) -> BoxFuture<'a, StoreResult<DlqPage>>;

    /// Pending entries of `operation` due at `now` (`next_attempt_at <= now`),
    /// oldest due first, at most `limit` rows; unreadable rows apart.
    fn dlq_due<'a>(
        &'a self,
        operation: &'a str,
        now: UnixMillis,
        limit: u32,
    ) -> BoxFuture<'a, StoreResult<DueEntries>>;

    /// Records the result of one redrive of entry `id` (counting it in
    /// `redrive_attempts`), and moves its idempotency record along (see
    /// [`DlqUpdate`]); durable. Answers the updated entry, `None` when it no
    /// longer exists.
    fn dlq_update(
        &self,
        id: i64,
        update: DlqUpdate,
    ) -> BoxFuture<'_, StoreResult<Option<DeadLetter>>>;

    /// Parks pending entry `id`, whose row cannot be read back, with error
    /// code `unreadable_record` and `reason`, and no expiry (it waits for a
    /// human); its idempotency record, when it holds one, becomes parked.
    /// Answers whether it was pending.
    fn dlq_park_unreadable<'a>(
        &'a self,
        id: i64,
        reason: &'a str,
        at: UnixMillis,
    ) -> BoxFuture<'a, StoreResult<bool>>;

    /// Makes matching entries pending and due at `now` (a replay by filter;
    /// parked entries get a fresh count of redrive attempts), and their
    /// idempotency records queued again. Delivered entries match only a
    /// filter that names the `delivered` state, so a broad replay never
    /// sends delivered work again. Answers how many.
    fn dlq_requeue<'a>(
        &'a self,
        filter: &'a DlqFilter,
        now: UnixMillis,
    ) -> BoxFuture<'a, StoreResult<u64>>;

    /// Deletes one entry, and its idempotency record while queued or parked
    /// (the work is gone: a retry may run afresh); answers whether it existed.
    fn dlq_delete(&self, id: i64) -> BoxFuture<'_, StoreResult<bool>>;

    /// Deletes every matching entry (pending ones too) but those in
    /// `except` (entries being sent now), and their queued or parked
    /// idempotency records; answers how many entries it deleted and how
    /// many matching ones it left for being in `except`.
    fn dlq_purge<'a>(
        &'a self,
        filter: &'a DlqFilter,
        except: &'a [i64],
    ) -> BoxFuture<'a, StoreResult<DlqPurged>>;

    /// Entry counts by operation and state.
    fn dlq_counts(&self) -> BoxFuture<'_, StoreResult<Vec<DlqCount>>>;

    /// Deletes delivered and parked entries with `expires_at <= now`, and
    /// the queued or parked idempotency records they hold.
    fn dlq_sweep(&self, now: UnixMillis) -> BoxFuture<'_, StoreResult<u64>>;

    /// Writes everything accepted so far and closes; later calls fail with
    /// [`StoreError::Closed`].
    fn close(&self) -> BoxFuture<'_, StoreResult<()>>;
}
