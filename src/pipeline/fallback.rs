//! The fallback layer's parts: staleness levels, cache keys and the bounded
//! in-memory cache in front of the store.
//!
//! Every successful answer of an operation with `fallback.cache` is kept in
//! memory (at most `max_entries` answers and `max_bytes` of them, oldest
//! fetched evicted first until both bounds hold: the oldest is also the
//! stalest, so nothing fresher is lost; an answer larger than the whole
//! budget is kept on disk only) and written behind to the store, so a
//! restart can still degrade gracefully. When a call fails, the cached
//! answer is served labelled by age; older than `very_stale` is never
//! served, and the `static` value (if any) answers instead.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use serde::Serialize;
use serde_json::Value;

use super::idempotency::fingerprint;
use crate::clock::{UnixMillis, millis};
use crate::policy::model::CacheFallback;
use crate::store::StoredResponse;

/// Entries kept in memory per operation when the policy does not say.
pub const DEFAULT_MAX_ENTRIES: usize = 10_000;

/// Bytes of answers kept in memory per operation when the policy does not say.
pub const DEFAULT_MAX_BYTES: usize = 64 * 1024 * 1024;

/// What one cached entry costs besides its body, key and content type (the
/// map slot, the order queue's pair, the `Arc`): an estimate, so that a
/// flood of tiny answers is bounded by bytes too.
const ENTRY_OVERHEAD: usize = 128;

/// How old a fallback answer is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Staleness {
    /// Younger than `fresh`.
    Fresh,
    /// Younger than `stale`.
    Stale,
    /// Younger than `very_stale`.
    VeryStale,
    /// The policy's static value, not an upstream answer.
    Static,
}

impl Staleness {
    /// The reported name.
    pub fn as_str(self) -> &'static str {
        match self {
            Staleness::Fresh => "fresh",
            Staleness::Stale => "stale",
            Staleness::VeryStale => "very_stale",
            Staleness::Static => "static",
        }
    }
}

/// Cache limits of one operation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheConfig {
    /// Age up to which an answer is fresh.
    pub fresh: Duration,
    /// Age up to which it is stale.
    pub stale: Duration,
    /// Age up to which it is served at all.
    pub very_stale: Duration,
    /// Params that form the key; all params when `None`.
    pub key: Option<Vec<String>>,
    /// Entries kept in memory.
    pub max_entries: usize,
    /// Bytes of cached answers kept in memory (bodies, keys, content types
    /// and a per-entry overhead).
    pub max_bytes: usize,
}

impl CacheConfig {
    /// The settings of a policy's `fallback.cache`, defaults filled in.
    pub fn from_policy(c: &CacheFallback) -> CacheConfig {
        CacheConfig {
            fresh: c.fresh.to_std(),
            stale: c.stale.to_std(),
            very_stale: c.very_stale.to_std(),
            key: c.key.clone(),
            max_entries: c.max_entries.map_or(DEFAULT_MAX_ENTRIES, |n| {
                usize::try_from(n).unwrap_or(usize::MAX)
            }),
            max_bytes: c.max_bytes.map_or(DEFAULT_MAX_BYTES, |n| {
                usize::try_from(n).unwrap_or(usize::MAX)
            }),
        }
    }

    /// The staleness of an answer `age_ms` old; `None` when too old to serve.
    pub fn staleness(&self, age_ms: i64) -> Option<Staleness> {
        let age = age_ms.max(0);
        if age <= millis(self.fresh) {
            Some(Staleness::Fresh)
        } else if age <= millis(self.stale) {
            Some(Staleness::Stale)
        } else if age <= millis(self.very_stale) {
            Some(Staleness::VeryStale)
        } else {
            None
        }
    }

    /// The cache key of a call: the [`fingerprint`] of the selected params
    /// (all of them without a `key` list), so any params, 64-bit ids
    /// included, have one. A missing key param counts as `null`, so such
    /// calls still share one entry.
    pub fn key_of(&self, params: &Value) -> String {
        match &self.key {
            None => fingerprint(params),
            Some(names) => {
                let selected: serde_json::Map<String, Value> = names
                    .iter()
                    .map(|n| (n.clone(), params.get(n).cloned().unwrap_or(Value::Null)))
                    .collect();
                fingerprint(&Value::Object(selected))
            }
        }
    }
}

/// The fallback of one operation: a cache, a static value, or both.
#[derive(Clone)]
pub struct Fallback {
    /// Cached answers, when the policy has `cache`.
    pub cache: Option<CacheConfig>,
    /// The in-memory side of the cache (carried over across reloads while
    /// the cache settings are unchanged).
    pub memory: Arc<MemoryCache>,
    /// The static answer, JSON-encoded once.
    pub static_value: Option<Value>,
}

/// A cached answer in memory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cached {
    /// The answer.
    pub response: Arc<StoredResponse>,
    /// When the upstream gave it.
    pub fetched_at: UnixMillis,
}

/// A map of cached answers bounded by count and by bytes, evicting the
/// oldest written first.
pub struct MemoryCache {
    inner: Mutex<Inner>,
    capacity: usize,
    max_bytes: usize,
}

struct Inner {
    entries: HashMap<String, (Cached, u64)>,
    // Insertion order with a sequence number; stale pairs (the key was
    // written again since) are skipped on eviction.
    order: VecDeque<(String, u64)>,
    seq: u64,
    /// What the entries cost, by [`cost`].
    bytes: usize,
}

/// What keeping `cached` under `key` costs in memory.
fn cost(key: &str, cached: &Cached) -> usize {
    let response = &cached.response;
    response.body.len()
        + response.content_type.as_ref().map_or(0, String::len)
        + key.len()
        + ENTRY_OVERHEAD
}

impl MemoryCache {
    /// An empty cache holding at most `capacity` entries (at least one) and
    /// `max_bytes` of them.
    pub fn new(capacity: usize, max_bytes: usize) -> Arc<MemoryCache> {
        Arc::new(MemoryCache {
            inner: Mutex::new(Inner {
                entries: HashMap::new(),
                order: VecDeque::new(),
                seq: 0,
                bytes: 0,
            }),
            capacity: capacity.max(1),
            max_bytes,
        })
    }

    /// An empty cache with the bounds of `config`.
    pub fn for_config(config: &CacheConfig) -> Arc<MemoryCache> {
        MemoryCache::new(config.max_entries, config.max_bytes)
    }

    /// The entry bound this cache was built with.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// The byte bound this cache was built with.
    pub fn max_bytes(&self) -> usize {
        self.max_bytes
    }

    /// Stores `cached` under `key`, unless a younger answer is already there.
    /// An answer costing more than the whole byte budget is not kept (and
    /// drops the older answer of its key, which it replaces).
    pub fn put(&self, key: &str, cached: Cached) {
        let mut inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((existing, _)) = inner.entries.get(key)
            && existing.fetched_at > cached.fetched_at
        {
            return;
        }
        let size = cost(key, &cached);
        if let Some((old, _)) = inner.entries.remove(key) {
            inner.bytes = inner.bytes.saturating_sub(cost(key, &old));
        }
        if size > self.max_bytes {
            return;
        }
        inner.seq += 1;
        let seq = inner.seq;
        inner.entries.insert(key.to_owned(), (cached, seq));
        inner.bytes += size;
        inner.order.push_back((key.to_owned(), seq));
        while inner.entries.len() > self.capacity || inner.bytes > self.max_bytes {
            let Some((old, old_seq)) = inner.order.pop_front() else {
                break;
            };
            if inner.entries.get(&old).is_some_and(|(_, s)| *s == old_seq)
                && let Some((gone, _)) = inner.entries.remove(&old)
            {
                inner.bytes = inner.bytes.saturating_sub(cost(&old, &gone));
            }
        }
        // Keep the order queue from growing without bound on rewrites.
        if inner.order.len() > inner.entries.len().saturating_mul(2).max(16) {
            let Inner { entries, order, .. } = &mut *inner;
            order.retain(|(k, s)| entries.get(k).is_some_and(|(_, cur)| cur == s));
        }
    }

    /// The answer cached under `key`.
    pub fn get(&self, key: &str) -> Option<Cached> {
        let inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        inner.entries.get(key).map(|(c, _)| c.clone())
    }

    /// Entries held.
    pub fn len(&self) -> usize {
        self.inner
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entries
            .len()
    }

    /// What the entries held cost, in bytes (bodies, keys, content types and
    /// a fixed overhead each).
    pub fn bytes(&self) -> usize {
        self.inner
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .bytes
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use serde_json::json;

    fn config() -> CacheConfig {
        CacheConfig {
            fresh: Duration::from_secs(60),
            stale: Duration::from_secs(3600),
            very_stale: Duration::from_secs(86_400),
            key: None,
            max_entries: 2,
            max_bytes: DEFAULT_MAX_BYTES,
        }
    }

    fn cached(at: i64) -> Cached {
        Cached {
            response: Arc::new(StoredResponse {
                status: 200,
                content_type: None,
                body: Bytes::from(at.to_string()),
            }),
            fetched_at: at,
        }
    }

    #[test]
    fn staleness_by_age_with_inclusive_limits() {
        let c = config();
        assert_eq!(c.staleness(0), Some(Staleness::Fresh));
        assert_eq!(c.staleness(-5), Some(Staleness::Fresh));
        assert_eq!(c.staleness(60_000), Some(Staleness::Fresh));
        assert_eq!(c.staleness(60_001), Some(Staleness::Stale));
        assert_eq!(c.staleness(3_600_000), Some(Staleness::Stale));
        assert_eq!(c.staleness(3_600_001), Some(Staleness::VeryStale));
        assert_eq!(c.staleness(86_400_000), Some(Staleness::VeryStale));
        assert_eq!(c.staleness(86_400_001), None);
    }

    fn sized(at: i64, body: usize) -> Cached {
        Cached {
            response: Arc::new(StoredResponse {
                status: 200,
                content_type: None,
                body: Bytes::from(vec![b'x'; body]),
            }),
            fetched_at: at,
        }
    }

    #[test]
    fn keys_select_params() {
        let mut c = config();
        assert_ne!(
            c.key_of(&json!({"d": "a.com", "x": 1})),
            c.key_of(&json!({"d": "a.com", "x": 2}))
        );
        // 64-bit ids have a key of their own: caching is never skipped.
        assert_ne!(
            c.key_of(&json!({"d": 9007199254740993u64})),
            c.key_of(&json!({"d": 9007199254740992u64}))
        );
        c.key = Some(vec!["d".into()]);
        assert_eq!(
            c.key_of(&json!({"d": "a.com", "x": 1})),
            c.key_of(&json!({"x": 2, "d": "a.com"}))
        );
    }

    #[test]
    fn bounded_evicting_oldest_written() {
        let cache = MemoryCache::new(2, DEFAULT_MAX_BYTES);
        cache.put("a", cached(1));
        cache.put("b", cached(2));
        cache.put("a", cached(3)); // a is now the newest
        cache.put("c", cached(4)); // evicts b
        assert_eq!(cache.len(), 2);
        assert!(cache.get("b").is_none());
        assert_eq!(cache.get("a").map(|c| c.fetched_at), Some(3));
        assert_eq!(cache.get("c").map(|c| c.fetched_at), Some(4));
        for i in 0..1000 {
            cache.put("a", cached(10 + i));
        }
        assert_eq!(cache.len(), 2);
        assert!(cache.inner.lock().expect("lock").order.len() <= 16);
    }

    #[test]
    fn an_older_answer_never_replaces_a_younger_one() {
        let cache = MemoryCache::new(4, DEFAULT_MAX_BYTES);
        cache.put("a", cached(10));
        cache.put("a", cached(5));
        assert_eq!(cache.get("a").map(|c| c.fetched_at), Some(10));
    }

    #[test]
    fn bounded_by_bytes_evicting_oldest_written() {
        // Room for three 1,000-byte answers (and their overhead), not four.
        let entry = 1_000 + 1 + ENTRY_OVERHEAD;
        let cache = MemoryCache::new(10_000, 3 * entry + 10);
        for (i, key) in ["a", "b", "c"].into_iter().enumerate() {
            cache.put(key, sized(i64::try_from(i).expect("small"), 1_000));
        }
        assert_eq!((cache.len(), cache.bytes()), (3, 3 * entry));
        cache.put("d", sized(10, 1_000));
        assert!(cache.get("a").is_none(), "the oldest goes first");
        assert_eq!((cache.len(), cache.bytes()), (3, 3 * entry));
        // A big answer evicts as many as it needs.
        cache.put("e", sized(11, 2_500));
        assert_eq!(cache.len(), 1);
        assert!(cache.get("e").is_some());
        assert!(cache.bytes() <= cache.max_bytes());
        // Rewriting a key frees its old cost.
        cache.put("e", sized(12, 10));
        assert_eq!(cache.bytes(), 10 + 1 + ENTRY_OVERHEAD);
        // An answer over the whole budget is not kept in memory, and the
        // key's older answer (which it replaces) is dropped.
        cache.put("e", sized(13, 10_000));
        assert!(cache.get("e").is_none());
        assert_eq!((cache.len(), cache.bytes()), (0, 0));
    }

    #[test]
    fn settings_come_from_the_policy_with_defaults() {
        let policy: CacheFallback = serde_json::from_value(json!({
            "fresh": "1m", "stale": "1h", "very_stale": "1d"
        }))
        .expect("a cache policy");
        let c = CacheConfig::from_policy(&policy);
        assert_eq!(
            (c.max_entries, c.max_bytes),
            (DEFAULT_MAX_ENTRIES, DEFAULT_MAX_BYTES)
        );
        let policy: CacheFallback = serde_json::from_value(json!({
            "fresh": "1m", "stale": "1h", "very_stale": "1d", "max_entries": 5, "max_bytes": 4096
        }))
        .expect("a cache policy");
        let c = CacheConfig::from_policy(&policy);
        assert_eq!((c.max_entries, c.max_bytes), (5, 4096));
        let memory = MemoryCache::for_config(&c);
        assert_eq!((memory.capacity(), memory.max_bytes()), (5, 4096));
    }
}
