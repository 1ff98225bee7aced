//! The idempotency layer's parts: keys, fingerprints and the in-process
//! table of calls in flight.
//!
//! A key is the caller's `Idempotency-Key` header, or sha256 over the
//! canonical JSON (RFC 8785) of the operation name and the `key` params. The
//! fingerprint is sha256 over the canonical JSON of all params: the same key
//! with another fingerprint is a conflict (422), not a replay.
//!
//! Duplicates inside one process meet in [`InFlight`]: the first caller
//! leads, the others wait on a watch channel for its result, so 200
//! concurrent duplicates make one upstream call and one store claim.
//! Duplicates across processes meet in the store's in-flight record.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use http::HeaderName;
use serde_json::Value;
use sha2::{Digest, Sha256};
use tokio::sync::watch;

use crate::policy::model::OnConcurrent;

/// Longest key a caller may send (as DESIGN.md and common practice say).
pub const MAX_KEY_LEN: usize = 255;

/// Largest integer that canonical JSON (IEEE doubles) keeps exactly.
const MAX_SAFE_INTEGER: u64 = (1 << 53) - 1;

/// Idempotency settings of one operation, every field decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdempotencyConfig {
    /// Params that form a derived key; empty when the policy declares none
    /// (then only a caller's key deduplicates).
    pub key_params: Vec<String>,
    /// How long a completed answer is replayed.
    pub ttl: Duration,
    /// How long an in-flight claim holds its key.
    pub lease: Duration,
    /// What a duplicate of a call in flight gets.
    pub on_concurrent: OnConcurrent,
    /// Header that forwards the key upstream.
    pub header: HeaderName,
}

/// Why no key can be made.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    /// The caller's key is empty, too long or not visible ASCII.
    #[error("the idempotency key must be 1 to {MAX_KEY_LEN} visible ASCII characters")]
    BadKey,
    /// A key param is missing from the params.
    #[error("idempotency key param `{0}` is missing")]
    MissingParam(String),
    /// A number that canonical JSON cannot represent exactly.
    #[error(
        "`{0}` holds an integer beyond 2^53, which cannot be hashed canonically; send it as a string"
    )]
    UnsafeNumber(String),
}

/// Checks a caller-supplied key.
pub fn check_key(key: &str) -> Result<(), KeyError> {
    if key.is_empty() || key.len() > MAX_KEY_LEN || !key.bytes().all(|b| (0x21..0x7f).contains(&b))
    {
        return Err(KeyError::BadKey);
    }
    Ok(())
}

/// The derived key of a call: sha256 over canonical JSON of
/// `[operation, {param: value, …}]` for the `key_params`. `None` when the
/// operation declares no key params.
pub fn derive_key(
    operation: &str,
    key_params: &[String],
    params: &Value,
) -> Result<Option<String>, KeyError> {
    if key_params.is_empty() {
        return Ok(None);
    }
    let mut selected = serde_json::Map::new();
    for name in key_params {
        let value = params
            .get(name)
            .ok_or_else(|| KeyError::MissingParam(name.clone()))?;
        selected.insert(name.clone(), value.clone());
    }
    let doc = Value::Array(vec![
        Value::String(operation.to_owned()),
        Value::Object(selected),
    ]);
    Ok(Some(sha256_canonical(&doc, "params")?))
}

/// sha256 (hex) over the canonical JSON of `value`, refusing integers that
/// canonical JSON would round (two different ids must not hash alike).
pub fn sha256_canonical(value: &Value, place: &str) -> Result<String, KeyError> {
    check_numbers(value, place)?;
    // Serialising a `Value` cannot fail: its keys are strings, and
    // non-finite floats cannot be stored in one.
    let text = serde_json_canonicalizer::to_string(value)
        .map_err(|_| KeyError::UnsafeNumber(place.to_owned()))?;
    Ok(hex(&Sha256::digest(text.as_bytes())))
}

fn check_numbers(value: &Value, place: &str) -> Result<(), KeyError> {
    match value {
        Value::Number(n) => {
            let exact = match (n.as_u64(), n.as_i64()) {
                (Some(u), _) => u <= MAX_SAFE_INTEGER,
                (None, Some(i)) => i.unsigned_abs() <= MAX_SAFE_INTEGER,
                (None, None) => true,
            };
            if exact {
                Ok(())
            } else {
                Err(KeyError::UnsafeNumber(place.to_owned()))
            }
        }
        Value::Array(items) => items.iter().try_for_each(|v| check_numbers(v, place)),
        Value::Object(map) => map
            .iter()
            .try_for_each(|(k, v)| check_numbers(v, &format!("{place}.{k}"))),
        _ => Ok(()),
    }
}

/// Lowercase hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(char::from(DIGITS[usize::from(b >> 4)]));
        out.push(char::from(DIGITS[usize::from(b & 0xf)]));
    }
    out
}

/// The calls in flight in this process, by operation and key, each with the
/// fingerprint of its params and a channel that will carry its result.
pub struct InFlight<T> {
    calls: Mutex<HashMap<(String, String), Entry<T>>>,
}

struct Entry<T> {
    fingerprint: String,
    result: watch::Receiver<Option<T>>,
}

/// What [`InFlight::join`] decided.
pub enum Joined<T> {
    /// The caller leads: it runs the call and publishes through the guard.
    Lead(Leader<T>),
    /// Another call with the same key and params is running: wait on this.
    Follow(watch::Receiver<Option<T>>),
    /// Another call with the same key but other params is running.
    Conflict,
}

/// The leader's handle: publishing removes the entry and wakes followers.
/// Dropped without publishing (the leader was cancelled), it removes the
/// entry too, and the followers see a closed channel and try again.
pub struct Leader<T> {
    table: Arc<InFlight<T>>,
    id: (String, String),
    sender: Option<watch::Sender<Option<T>>>,
}

impl<T: Clone> InFlight<T> {
    /// An empty table.
    pub fn new() -> Arc<InFlight<T>> {
        Arc::new(InFlight {
            calls: Mutex::new(HashMap::new()),
        })
    }

    /// Joins the call of `operation` + `key`, or leads it.
    pub fn join(self: &Arc<Self>, operation: &str, key: &str, fingerprint: &str) -> Joined<T> {
        let id = (operation.to_owned(), key.to_owned());
        let mut calls = self.calls.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(entry) = calls.get(&id) {
            return if entry.fingerprint == fingerprint {
                Joined::Follow(entry.result.clone())
            } else {
                Joined::Conflict
            };
        }
        let (sender, receiver) = watch::channel(None);
        calls.insert(
            id.clone(),
            Entry {
                fingerprint: fingerprint.to_owned(),
                result: receiver,
            },
        );
        Joined::Lead(Leader {
            table: Arc::clone(self),
            id,
            sender: Some(sender),
        })
    }

    /// Calls in flight (for metrics and tests).
    pub fn len(&self) -> usize {
        self.calls
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    /// True when no call is in flight.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl<T> Leader<T> {
    /// Publishes the result to every follower and frees the key.
    pub fn publish(mut self, result: T) {
        self.remove();
        if let Some(sender) = self.sender.take() {
            // No follower is not an error.
            let _ = sender.send(Some(result));
        }
    }

    fn remove(&self) {
        self.table
            .calls
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&self.id);
    }
}

impl<T> Drop for Leader<T> {
    fn drop(&mut self) {
        if self.sender.is_some() {
            self.remove();
        }
    }
}

/// Waits for a leader's result; `None` when the leader went away without one.
pub async fn follow<T: Clone>(mut receiver: watch::Receiver<Option<T>>) -> Option<T> {
    match receiver.wait_for(Option::is_some).await {
        Ok(value) => value.clone(),
        Err(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn derived_keys_ignore_key_order_and_other_params() {
        let keys = ["a".to_owned(), "b".to_owned()];
        let one = derive_key("op", &keys, &json!({"a": 1, "b": {"y": 2, "x": 1}, "c": 3}));
        let two = derive_key("op", &keys, &json!({"b": {"x": 1, "y": 2}, "a": 1, "c": 9}));
        assert_eq!(one, two);
        let other_op = derive_key("op2", &keys, &json!({"a": 1, "b": {"x": 1, "y": 2}}));
        assert_ne!(one, other_op);
        let key = one.expect("derivable").expect("declared");
        assert_eq!(key.len(), 64);
        assert!(key.bytes().all(|b| b.is_ascii_hexdigit()));
    }

    #[test]
    fn derived_key_needs_its_params() {
        let keys = ["email".to_owned()];
        assert_eq!(
            derive_key("op", &keys, &json!({})),
            Err(KeyError::MissingParam("email".into()))
        );
        assert_eq!(derive_key("op", &[], &json!({})), Ok(None));
    }

    #[test]
    fn unsafe_integers_are_refused_not_rounded() {
        let keys = ["id".to_owned()];
        let big = derive_key("op", &keys, &json!({"id": 9007199254740993u64}));
        assert_eq!(big, Err(KeyError::UnsafeNumber("params.id".into())));
        assert!(derive_key("op", &keys, &json!({"id": 9007199254740991u64})).is_ok());
        assert!(derive_key("op", &keys, &json!({"id": -9007199254740991i64})).is_ok());
        assert!(derive_key("op", &keys, &json!({"id": 1.5})).is_ok());
    }

    #[test]
    fn caller_keys_are_checked() {
        assert!(check_key("order-42").is_ok());
        assert_eq!(check_key(""), Err(KeyError::BadKey));
        assert_eq!(check_key("has space"), Err(KeyError::BadKey));
        assert_eq!(check_key("é"), Err(KeyError::BadKey));
        assert_eq!(check_key(&"k".repeat(256)), Err(KeyError::BadKey));
        assert!(check_key(&"k".repeat(255)).is_ok());
    }

    #[test]
    fn fingerprints_are_canonical() {
        let a = sha256_canonical(&json!({"x": 1, "y": [1, 2]}), "params");
        let b = sha256_canonical(&json!({"y": [1, 2], "x": 1}), "params");
        assert_eq!(a, b);
        assert_ne!(a, sha256_canonical(&json!({"y": [2, 1], "x": 1}), "params"));
        assert_eq!(
            sha256_canonical(&json!("abc"), "p"),
            Ok("6cc43f858fbb763301637b5af970e2a46b46f461f27e5a0f41e009c59b827b25".into())
        );
    }

    #[tokio::test]
    async fn followers_share_the_leaders_result() {
        let table = InFlight::<u32>::new();
        let Joined::Lead(leader) = table.join("op", "k", "f1") else {
            panic!("first caller leads");
        };
        let Joined::Follow(rx) = table.join("op", "k", "f1") else {
            panic!("second caller follows");
        };
        assert!(matches!(table.join("op", "k", "f2"), Joined::Conflict));
        assert!(matches!(table.join("op", "other", "f1"), Joined::Lead(_)));
        let waiter = tokio::spawn(follow(rx));
        leader.publish(7);
        assert_eq!(waiter.await.expect("joins"), Some(7));
        assert!(table.is_empty());
    }

    #[tokio::test]
    async fn a_cancelled_leader_frees_the_key() {
        let table = InFlight::<u32>::new();
        let Joined::Lead(leader) = table.join("op", "k", "f") else {
            panic!("leads");
        };
        let Joined::Follow(rx) = table.join("op", "k", "f") else {
            panic!("follows");
        };
        drop(leader);
        assert_eq!(follow(rx).await, None);
        assert!(matches!(table.join("op", "k", "f"), Joined::Lead(_)));
    }
}
