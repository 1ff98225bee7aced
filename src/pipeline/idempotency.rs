//! The idempotency layer's parts: keys, fingerprints and the in-process
//! table of calls in flight.
//!
//! A key is the caller's `Idempotency-Key` header, or sha256 over the
//! canonical JSON (RFC 8785) of the operation name and the `key` params:
//! RFC 8785, so that another client can derive the same key, which is why a
//! key param holding a number beyond 2^53 (which RFC 8785's IEEE doubles
//! would round, so two ids could hash alike) is refused.
//!
//! The fingerprint of a call's params (the same key with another
//! fingerprint is a conflict, 422, not a replay) and the fallback cache key
//! are claygate's own business, so they never refuse a call: see
//! [`fingerprint`].
//!
//! Duplicates inside one process meet in [`InFlight`]: the first caller
//! leads, the others wait on a watch channel for its result, so 200
//! concurrent duplicates make one upstream call and one store claim. The
//! store's exclusive lock lets only one process open it, so the only
//! in-flight record another caller can meet in the store is one left by a
//! process that crashed mid-call: it is taken over once its lease lapses.

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
/// [`MAX_SAFE_INTEGER`] as a double (exact: it has 53 bits).
const MAX_SAFE_FLOAT: f64 = 9_007_199_254_740_991.0;

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
    /// A key param holds a number that canonical JSON cannot represent exactly.
    #[error(
        "idempotency key param `{0}` holds a number beyond 2^53, which canonical JSON cannot keep exact; send it as a string"
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

/// The derived key of a call: sha256 over canonical JSON (RFC 8785) of
/// `[operation, {param: value, …}]` for the `key_params`. `None` when the
/// operation declares no key params. A key param holding a number beyond
/// 2^53 in magnitude is refused (RFC 8785 would round it; an integer beyond
/// `u64` has already been rounded by parsing), naming the param.
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
        if !numbers_exact(value, true) {
            return Err(KeyError::UnsafeNumber(name.clone()));
        }
        selected.insert(name.clone(), value.clone());
    }
    let doc = Value::Array(vec![
        Value::String(operation.to_owned()),
        Value::Object(selected),
    ]);
    // Serialising a `Value` cannot fail: its keys are strings, and
    // non-finite floats cannot be stored in one.
    let text = serde_json_canonicalizer::to_string(&doc)
        .map_err(|_| KeyError::UnsafeNumber("params".to_owned()))?;
    Ok(Some(hex(&Sha256::digest(text.as_bytes()))))
}

/// sha256 (hex) of `value`, for comparing params: the idempotency
/// fingerprint and the fallback cache key. Never refuses a value.
///
/// When every integer is within 2^53 this is sha256 over RFC 8785 canonical
/// JSON (what earlier versions stored, so their records still match).
/// Otherwise it is sha256 over `exact:` and a deterministic encoding that
/// keeps integers exact (keys sorted by their bytes, no whitespace, numbers
/// as serde_json prints them: `u64`/`i64` digit for digit), so two 64-bit
/// ids never share a fingerprint. Integers beyond `u64` reach claygate
/// already parsed as doubles and stay rounded.
pub fn fingerprint(value: &Value) -> String {
    if numbers_exact(value, false)
        && let Ok(text) = serde_json_canonicalizer::to_string(value)
    {
        return hex(&Sha256::digest(text.as_bytes()));
    }
    let mut text = String::from("exact:");
    exact_json(value, &mut text);
    hex(&Sha256::digest(text.as_bytes()))
}

/// Whether every number of `value` is one RFC 8785 keeps exact: integers
/// within ±2^53, and (when `floats` is set) floats within ±2^53 too, since a
/// float that large may be a rounded integer.
fn numbers_exact(value: &Value, floats: bool) -> bool {
    match value {
        Value::Number(n) => match (n.as_u64(), n.as_i64(), n.as_f64()) {
            (Some(u), _, _) => u <= MAX_SAFE_INTEGER,
            (None, Some(i), _) => i.unsigned_abs() <= MAX_SAFE_INTEGER,
            (None, None, Some(f)) => !floats || f.abs() <= MAX_SAFE_FLOAT,
            (None, None, None) => false,
        },
        Value::Array(items) => items.iter().all(|v| numbers_exact(v, floats)),
        Value::Object(map) => map.values().all(|v| numbers_exact(v, floats)),
        _ => true,
    }
}

/// Appends the deterministic encoding of `value`: object keys sorted by
/// their bytes, no whitespace, scalars as serde_json prints them.
fn exact_json(value: &Value, out: &mut String) {
    match value {
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                exact_json(item, out);
            }
            out.push(']');
        }
        Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort_unstable();
            out.push('{');
            for (i, key) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&Value::String(key.clone()).to_string());
                out.push(':');
                if let Some(v) = map.get(key) {
                    exact_json(v, out);
                }
            }
            out.push('}');
        }
        scalar => out.push_str(&scalar.to_string()),
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
    fn unsafe_numbers_in_key_params_are_refused_not_rounded() {
        let keys = ["id".to_owned()];
        let big = derive_key("op", &keys, &json!({"id": 9007199254740993u64}));
        assert_eq!(big, Err(KeyError::UnsafeNumber("id".into())));
        let nested = derive_key("op", &keys, &json!({"id": {"a": [-9007199254740993i64]}}));
        assert_eq!(nested, Err(KeyError::UnsafeNumber("id".into())));
        // Beyond u64 the parser already rounded it to a double: refused too.
        let huge: Value = serde_json::from_str(r#"{"id": 18446744073709551617}"#).expect("JSON");
        assert_eq!(
            derive_key("op", &keys, &huge),
            Err(KeyError::UnsafeNumber("id".into()))
        );
        assert!(derive_key("op", &keys, &json!({"id": 9007199254740991u64})).is_ok());
        assert!(derive_key("op", &keys, &json!({"id": -9007199254740991i64})).is_ok());
        assert!(derive_key("op", &keys, &json!({"id": 1.5})).is_ok());
        // Only key params count: another param may hold a 64-bit id.
        let other = json!({"id": "x", "clay_id": 9007199254740993u64});
        assert!(derive_key("op", &keys, &other).is_ok());
    }

    #[test]
    fn fingerprints_keep_64_bit_integers_apart_and_never_refuse() {
        let a = fingerprint(&json!({"id": 9007199254740993u64, "n": 1}));
        let b = fingerprint(&json!({"id": 9007199254740992u64, "n": 1}));
        let a_again = fingerprint(&json!({"n": 1, "id": 9007199254740993u64}));
        assert_ne!(a, b, "adjacent 64-bit ids differ");
        assert_eq!(a, a_again, "key order does not matter");
        assert_ne!(
            fingerprint(&json!({"id": u64::MAX})),
            fingerprint(&json!({"id": u64::MAX - 1}))
        );
        assert_ne!(
            fingerprint(&json!({"id": i64::MIN})),
            fingerprint(&json!({"id": i64::MIN + 1}))
        );
        assert_eq!(a.len(), 64);
    }

    #[test]
    fn the_exact_encoding_sorts_keys_and_escapes_strings() {
        let mut out = String::new();
        exact_json(
            &json!({"b": [1, -2, 1.5, true, null], "a": {"z": "q\"u", "y": 18446744073709551615u64}}),
            &mut out,
        );
        assert_eq!(
            out,
            r#"{"a":{"y":18446744073709551615,"z":"q\"u"},"b":[1,-2,1.5,true,null]}"#
        );
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
    fn fingerprints_of_safe_params_are_rfc_8785_as_before() {
        let a = fingerprint(&json!({"x": 1, "y": [1, 2]}));
        let b = fingerprint(&json!({"y": [1, 2], "x": 1}));
        assert_eq!(a, b);
        assert_ne!(a, fingerprint(&json!({"y": [2, 1], "x": 1})));
        // sha256 of `"abc"`: the record format of earlier versions.
        assert_eq!(
            fingerprint(&json!("abc")),
            "6cc43f858fbb763301637b5af970e2a46b46f461f27e5a0f41e009c59b827b25"
        );
        // RFC 8785: 1.0 and 1 are the same number.
        assert_eq!(
            fingerprint(&json!({"x": 1.0})),
            fingerprint(&json!({"x": 1}))
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
