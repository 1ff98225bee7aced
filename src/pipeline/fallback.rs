//! The fallback layer's parts: staleness levels, cache keys and the bounded
//! in-memory cache in front of the store.
//!
//! Every successful answer of an operation with `fallback.cache` is kept in
//! memory (at most `max_entries`, oldest fetched evicted first: the oldest is
//! also the stalest, so nothing fresher is lost) and written behind to the
//! store, so a restart can still degrade gracefully. When a call fails, the
//! cached answer is served labelled by age; older than `very_stale` is never
//! served, and the `static` value (if any) answers instead.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use serde::Serialize;
use serde_json::Value;

use super::idempotency::{KeyError, sha256_canonical};
use crate::clock::{UnixMillis, millis};
use crate::store::StoredResponse;

/// Entries kept in memory per operation when the policy does not say.
pub const DEFAULT_MAX_ENTRIES: usize = 10_000;

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
}

impl CacheConfig {
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

    /// The cache key of a call: sha256 over canonical JSON of the selected
    /// params (all of them without a `key` list). A missing key param counts
    /// as `null`, so such calls still share one entry.
    pub fn key_of(&self, params: &Value) -> Result<String, KeyError> {
        match &self.key {
            None => sha256_canonical(params, "params"),
            Some(names) => {
                let selected: serde_json::Map<String, Value> = names
                    .iter()
                    .map(|n| (n.clone(), params.get(n).cloned().unwrap_or(Value::Null)))
                    .collect();
                sha256_canonical(&Value::Object(selected), "params")
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

/// A bounded map of cached answers, evicting the oldest fetched first.
pub struct MemoryCache {
    inner: Mutex<Inner>,
    capacity: usize,
}

struct Inner {
    entries: HashMap<String, (Cached, u64)>,
    // Insertion order with a sequence number; stale pairs (the key was
    // written again since) are skipped on eviction.
    order: VecDeque<(String, u64)>,
    seq: u64,
}

impl MemoryCache {
    /// An empty cache holding at most `capacity` entries (at least one).
    pub fn new(capacity: usize) -> Arc<MemoryCache> {
        Arc::new(MemoryCache {
            inner: Mutex::new(Inner {
                entries: HashMap::new(),
                order: VecDeque::new(),
                seq: 0,
            }),
            capacity: capacity.max(1),
        })
    }

    /// The bound this cache was built with.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Stores `cached` under `key`, unless a younger answer is already there.
    pub fn put(&self, key: &str, cached: Cached) {
        let mut inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((existing, _)) = inner.entries.get(key)
            && existing.fetched_at > cached.fetched_at
        {
            return;
        }
        inner.seq += 1;
        let seq = inner.seq;
        inner.entries.insert(key.to_owned(), (cached, seq));
        inner.order.push_back((key.to_owned(), seq));
        while inner.entries.len() > self.capacity {
            let Some((old, old_seq)) = inner.order.pop_front() else {
                break;
            };
            if inner.entries.get(&old).is_some_and(|(_, s)| *s == old_seq) {
                inner.entries.remove(&old);
            }
        }
        // Keep the order queue from growing without bound on rewrites.
        if inner.order.len() > self.capacity.saturating_mul(2).max(16) {
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

    #[test]
    fn keys_select_params() {
        let mut c = config();
        assert_ne!(
            c.key_of(&json!({"d": "a.com", "x": 1})),
            c.key_of(&json!({"d": "a.com", "x": 2}))
        );
        c.key = Some(vec!["d".into()]);
        assert_eq!(
            c.key_of(&json!({"d": "a.com", "x": 1})),
            c.key_of(&json!({"x": 2, "d": "a.com"}))
        );
    }

    #[test]
    fn bounded_evicting_oldest_written() {
        let cache = MemoryCache::new(2);
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
        let cache = MemoryCache::new(4);
        cache.put("a", cached(10));
        cache.put("a", cached(5));
        assert_eq!(cache.get("a").map(|c| c.fetched_at), Some(10));
    }
}
