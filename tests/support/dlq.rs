//! A real SQLite store that is safe under tokio's paused clock, and a spy
//! that watches (and can interfere with) any store.
//!
//! sqlx runs SQLite on threads of its own. While a test's only runtime
//! thread waits for one of them, the runtime looks idle, so a paused clock
//! auto-advances to the next timer: sqlx's own pool timeouts fire
//! (`SqliteStore::open` fails with "pool timed out while waiting for an open
//! connection"), and every other timer (attempt timeouts, the worker's poll)
//! jumps ahead while the test merely waits for a query.
//!
//! [`PausedSafe`] wraps every store call so that, while it runs, a
//! `spawn_blocking` task is alive: tokio does not auto-advance a paused clock
//! while blocking work is in flight (it is real work the runtime waits for).
//! Time then moves only when the test advances it or when everything is
//! idle for real.

use std::future::Future;
use std::path::Path;
use std::sync::Arc;

use claygate::clock::UnixMillis;
use claygate::store::sqlite::SqliteStore;
use claygate::store::{
    CacheEntry, Claim, ClaimToken, DeadLetter, DlqCount, DlqFilter, DlqPage, DlqPurged, DlqUpdate,
    DueEntries, IdempotencyRecord, NewDeadLetter, PageRequest, Store, StoreResult, StoredResponse,
};
use futures_util::future::BoxFuture;

/// Runs `work` with the paused clock's auto-advance held off.
pub async fn inhibited<F: Future>(work: F) -> F::Output {
    let (done, wait) = std::sync::mpsc::channel::<()>();
    // Spawning it is what holds auto-advance off; it ends when `done` drops.
    let blocker = tokio::task::spawn_blocking(move || {
        let _ = wait.recv();
    });
    let out = work.await;
    drop(done);
    let _ = blocker.await;
    out
}

/// Opens a [`SqliteStore`] in `dir`, wrapped in [`PausedSafe`].
pub async fn open_store(dir: &Path) -> Arc<dyn Store> {
    let store = inhibited(SqliteStore::open(dir))
        .await
        .expect("store opens");
    Arc::new(PausedSafe(Arc::new(store)))
}

/// A store whose calls hold off the paused clock's auto-advance.
pub struct PausedSafe(pub Arc<dyn Store>);

impl Store for PausedSafe {
    fn idempotency_claim<'a>(
        &'a self,
        operation: &'a str,
        key: &'a str,
        fingerprint: &'a str,
        now: UnixMillis,
        lease_until: UnixMillis,
        expires_at: UnixMillis,
    ) -> BoxFuture<'a, StoreResult<Claim>> {
        Box::pin(inhibited(self.0.idempotency_claim(
            operation,
            key,
            fingerprint,
            now,
            lease_until,
            expires_at,
        )))
    }

    fn idempotency_complete<'a>(
        &'a self,
        operation: &'a str,
        key: &'a str,
        token: &'a ClaimToken,
        response: &'a StoredResponse,
        expires_at: UnixMillis,
    ) -> BoxFuture<'a, StoreResult<bool>> {
        Box::pin(inhibited(self.0.idempotency_complete(
            operation, key, token, response, expires_at,
        )))
    }

    fn idempotency_release<'a>(
        &'a self,
        operation: &'a str,
        key: &'a str,
        token: &'a ClaimToken,
    ) -> BoxFuture<'a, StoreResult<bool>> {
        Box::pin(inhibited(self.0.idempotency_release(operation, key, token)))
    }

    fn idempotency_get<'a>(
        &'a self,
        operation: &'a str,
        key: &'a str,
    ) -> BoxFuture<'a, StoreResult<Option<IdempotencyRecord>>> {
        Box::pin(inhibited(self.0.idempotency_get(operation, key)))
    }

    fn idempotency_sweep(&self, now: UnixMillis) -> BoxFuture<'_, StoreResult<u64>> {
        Box::pin(inhibited(self.0.idempotency_sweep(now)))
    }

    fn cache_put(&self, entry: CacheEntry) -> BoxFuture<'_, StoreResult<()>> {
        Box::pin(inhibited(self.0.cache_put(entry)))
    }

    fn cache_get<'a>(
        &'a self,
        operation: &'a str,
        key: &'a str,
    ) -> BoxFuture<'a, StoreResult<Option<CacheEntry>>> {
        Box::pin(inhibited(self.0.cache_get(operation, key)))
    }

    fn cache_sweep<'a>(
        &'a self,
        operation: &'a str,
        fetched_before: UnixMillis,
        keep: u64,
    ) -> BoxFuture<'a, StoreResult<u64>> {
        Box::pin(inhibited(self.0.cache_sweep(
            operation,
            fetched_before,
            keep,
        )))
    }

    fn cache_sweep_others<'a>(
        &'a self,
        live: &'a [String],
        fetched_before: UnixMillis,
    ) -> BoxFuture<'a, StoreResult<u64>> {
        Box::pin(inhibited(self.0.cache_sweep_others(live, fetched_before)))
    }

    fn dlq_insert_holding<'a>(
        &'a self,
        entry: NewDeadLetter,
        claim: Option<&'a ClaimToken>,
    ) -> BoxFuture<'a, StoreResult<i64>> {
        Box::pin(inhibited(self.0.dlq_insert_holding(entry, claim)))
    }

    fn dlq_get(&self, id: i64) -> BoxFuture<'_, StoreResult<Option<DeadLetter>>> {
        Box::pin(inhibited(self.0.dlq_get(id)))
    }

    fn dlq_list<'a>(
        &'a self,
        filter: &'a DlqFilter,
        page: PageRequest,
    ) -> BoxFuture<'a, StoreResult<DlqPage>> {
        Box::pin(inhibited(self.0.dlq_list(filter, page)))
    }

    fn dlq_due<'a>(
        &'a self,
        operation: &'a str,
        now: UnixMillis,
        limit: u32,
    ) -> BoxFuture<'a, StoreResult<DueEntries>> {
        Box::pin(inhibited(self.0.dlq_due(operation, now, limit)))
    }

    fn dlq_update(
        &self,
        id: i64,
        update: DlqUpdate,
    ) -> BoxFuture<'_, StoreResult<Option<DeadLetter>>> {
        Box::pin(inhibited(self.0.dlq_update(id, update)))
    }

    fn dlq_park_unreadable<'a>(
        &'a self,
        id: i64,
        reason: &'a str,
        at: UnixMillis,
    ) -> BoxFuture<'a, StoreResult<bool>> {
        Box::pin(inhibited(self.0.dlq_park_unreadable(id, reason, at)))
    }

    fn dlq_requeue<'a>(
        &'a self,
        filter: &'a DlqFilter,
        now: UnixMillis,
    ) -> BoxFuture<'a, StoreResult<u64>> {
        Box::pin(inhibited(self.0.dlq_requeue(filter, now)))
    }

    fn dlq_delete(&self, id: i64) -> BoxFuture<'_, StoreResult<bool>> {
        Box::pin(inhibited(self.0.dlq_delete(id)))
    }

    fn dlq_purge<'a>(
        &'a self,
        filter: &'a DlqFilter,
        except: &'a [i64],
    ) -> BoxFuture<'a, StoreResult<DlqPurged>> {
        Box::pin(inhibited(self.0.dlq_purge(filter, except)))
    }

    fn dlq_counts(&self) -> BoxFuture<'_, StoreResult<Vec<DlqCount>>> {
        Box::pin(inhibited(self.0.dlq_counts()))
    }

    fn dlq_sweep(&self, now: UnixMillis) -> BoxFuture<'_, StoreResult<u64>> {
        Box::pin(inhibited(self.0.dlq_sweep(now)))
    }

    fn close(&self) -> BoxFuture<'_, StoreResult<()>> {
        Box::pin(inhibited(self.0.close()))
    }
}

/// A store that forwards to another and lets a test watch and interfere:
/// it counts idempotency claims and look-ups, and can run a future (say,
/// advancing the paused clock) just before the next look-up answers.
pub struct Spy {
    /// The store doing the work.
    pub inner: Arc<dyn Store>,
    /// `idempotency_claim` calls so far.
    pub claims: std::sync::atomic::AtomicUsize,
    /// `idempotency_get` calls so far.
    pub gets: std::sync::atomic::AtomicUsize,
    before_get: std::sync::Mutex<Option<BoxFuture<'static, ()>>>,
}

impl Spy {
    /// Watches `inner`.
    pub fn new(inner: Arc<dyn Store>) -> Arc<Spy> {
        Arc::new(Spy {
            inner,
            claims: Default::default(),
            gets: Default::default(),
            before_get: std::sync::Mutex::new(None),
        })
    }

    /// Runs `work` when the next `idempotency_get` is called, before it answers.
    pub fn before_next_get(&self, work: impl Future<Output = ()> + Send + 'static) {
        *self.before_get.lock().expect("hook lock") = Some(Box::pin(work));
    }

    /// Claims so far.
    pub fn claims(&self) -> usize {
        self.claims.load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl Store for Spy {
    fn idempotency_claim<'a>(
        &'a self,
        operation: &'a str,
        key: &'a str,
        fingerprint: &'a str,
        now: UnixMillis,
        lease_until: UnixMillis,
        expires_at: UnixMillis,
    ) -> BoxFuture<'a, StoreResult<Claim>> {
        self.claims
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.inner
            .idempotency_claim(operation, key, fingerprint, now, lease_until, expires_at)
    }

    fn idempotency_complete<'a>(
        &'a self,
        operation: &'a str,
        key: &'a str,
        token: &'a ClaimToken,
        response: &'a StoredResponse,
        expires_at: UnixMillis,
    ) -> BoxFuture<'a, StoreResult<bool>> {
        self.inner
            .idempotency_complete(operation, key, token, response, expires_at)
    }

    fn idempotency_release<'a>(
        &'a self,
        operation: &'a str,
        key: &'a str,
        token: &'a ClaimToken,
    ) -> BoxFuture<'a, StoreResult<bool>> {
        self.inner.idempotency_release(operation, key, token)
    }

    fn idempotency_get<'a>(
        &'a self,
        operation: &'a str,
        key: &'a str,
    ) -> BoxFuture<'a, StoreResult<Option<IdempotencyRecord>>> {
        self.gets.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let hook = self.before_get.lock().expect("hook lock").take();
        Box::pin(async move {
            if let Some(hook) = hook {
                hook.await;
            }
            self.inner.idempotency_get(operation, key).await
        })
    }

    fn idempotency_sweep(&self, now: UnixMillis) -> BoxFuture<'_, StoreResult<u64>> {
        self.inner.idempotency_sweep(now)
    }

    fn cache_put(&self, entry: CacheEntry) -> BoxFuture<'_, StoreResult<()>> {
        self.inner.cache_put(entry)
    }

    fn cache_get<'a>(
        &'a self,
        operation: &'a str,
        key: &'a str,
    ) -> BoxFuture<'a, StoreResult<Option<CacheEntry>>> {
        self.inner.cache_get(operation, key)
    }

    fn cache_sweep<'a>(
        &'a self,
        operation: &'a str,
        fetched_before: UnixMillis,
        keep: u64,
    ) -> BoxFuture<'a, StoreResult<u64>> {
        self.inner.cache_sweep(operation, fetched_before, keep)
    }

    fn cache_sweep_others<'a>(
        &'a self,
        live: &'a [String],
        fetched_before: UnixMillis,
    ) -> BoxFuture<'a, StoreResult<u64>> {
        self.inner.cache_sweep_others(live, fetched_before)
    }

    fn dlq_insert_holding<'a>(
        &'a self,
        entry: NewDeadLetter,
        claim: Option<&'a ClaimToken>,
    ) -> BoxFuture<'a, StoreResult<i64>> {
        self.inner.dlq_insert_holding(entry, claim)
    }

    fn dlq_get(&self, id: i64) -> BoxFuture<'_, StoreResult<Option<DeadLetter>>> {
        self.inner.dlq_get(id)
    }

    fn dlq_list<'a>(
        &'a self,
        filter: &'a DlqFilter,
        page: PageRequest,
    ) -> BoxFuture<'a, StoreResult<DlqPage>> {
        self.inner.dlq_list(filter, page)
    }

    fn dlq_due<'a>(
        &'a self,
        operation: &'a str,
        now: UnixMillis,
        limit: u32,
    ) -> BoxFuture<'a, StoreResult<DueEntries>> {
        self.inner.dlq_due(operation, now, limit)
    }

    fn dlq_update(
        &self,
        id: i64,
        update: DlqUpdate,
    ) -> BoxFuture<'_, StoreResult<Option<DeadLetter>>> {
        self.inner.dlq_update(id, update)
    }

    fn dlq_park_unreadable<'a>(
        &'a self,
        id: i64,
        reason: &'a str,
        at: UnixMillis,
    ) -> BoxFuture<'a, StoreResult<bool>> {
        self.inner.dlq_park_unreadable(id, reason, at)
    }

    fn dlq_requeue<'a>(
        &'a self,
        filter: &'a DlqFilter,
        now: UnixMillis,
    ) -> BoxFuture<'a, StoreResult<u64>> {
        self.inner.dlq_requeue(filter, now)
    }

    fn dlq_delete(&self, id: i64) -> BoxFuture<'_, StoreResult<bool>> {
        self.inner.dlq_delete(id)
    }

    fn dlq_purge<'a>(
        &'a self,
        filter: &'a DlqFilter,
        except: &'a [i64],
    ) -> BoxFuture<'a, StoreResult<DlqPurged>> {
        self.inner.dlq_purge(filter, except)
    }

    fn dlq_counts(&self) -> BoxFuture<'_, StoreResult<Vec<DlqCount>>> {
        self.inner.dlq_counts()
    }

    fn dlq_sweep(&self, now: UnixMillis) -> BoxFuture<'_, StoreResult<u64>> {
        self.inner.dlq_sweep(now)
    }

    fn close(&self) -> BoxFuture<'_, StoreResult<()>> {
        self.inner.close()
    }
}
