//! The runtime's outer layers through the library: params checks,
//! idempotency (keys, sharing, replay, conflicts, leases) and the fallback
//! cache with staleness, on an in-memory upstream and a real SQLite store.

use std::sync::Arc;
use std::time::Duration;

use claygate::clock::Clock;
use claygate::pipeline::fallback::Staleness;
use claygate::runtime::{Answer, InvokeError, InvokeRequest, Invoked, Runtime};
use claygate::store::sqlite::SqliteStore;
use claygate::store::{Claim, Store};
use serde_json::{Value, json};

use crate::support::script::{Script, Step, compile_script};
use crate::support::tempdir;

const OPS: &str = "operations:
  enrich:
    upstream: clay
    request: { method: POST, path: /v1/people/enrich, body: { email: \"{{ params.email }}\" } }
    params_schema:
      type: object
      required: [email]
      properties: { email: { type: string, format: email }, note: { type: string } }
    retry: { max_attempts: 2, backoff: { initial: 10ms, max: 10ms, jitter: none } }
    idempotency: { key: [email], ttl: 1h }
    fallback: { cache: { fresh: 5m, stale: 1h, very_stale: 24h, key: [email] }, static: { known: false } }
  strict:
    upstream: clay
    request: { method: POST, path: /v1/strict, body: { id: \"{{ params.id }}\" } }
    params_schema: { type: object, properties: { id: { type: string } } }
    retry: { max_attempts: 1 }
    idempotency: { key: [id], on_concurrent: reject, lease: 10s }
  plain:
    upstream: clay
    request: { method: GET, path: /v1/plain }
    retry: { max_attempts: 1 }
";

struct Rig {
    runtime: Arc<Runtime>,
    script: Script,
    store: Arc<SqliteStore>,
    _dir: tempfile::TempDir,
}

async fn rig() -> Rig {
    let dir = tempdir();
    let script = Script::new();
    let store = Arc::new(SqliteStore::open(dir.path()).await.expect("store opens"));
    let compiled = compile_script(OPS, &script, None);
    let runtime = Runtime::new(compiled, store.clone() as Arc<dyn Store>, Clock::new());
    Rig {
        runtime,
        script,
        store,
        _dir: dir,
    }
}

fn call(params: Value) -> InvokeRequest {
    InvokeRequest {
        params,
        ..InvokeRequest::default()
    }
}

fn body(invoked: &Invoked) -> Value {
    match &invoked.answer {
        Answer::Ok(r) | Answer::Fallback { response: r, .. } => {
            serde_json::from_slice(&r.body).expect("JSON body")
        }
        other => panic!("expected an answer with a body, got {other:?}"),
    }
}

fn error_code(invoked: &Invoked) -> &'static str {
    match &invoked.answer {
        Answer::Failed(e) => e.code(),
        other => panic!("expected a failure, got {other:?}"),
    }
}

fn replayed(invoked: &Invoked) -> bool {
    invoked.idempotency.as_ref().is_some_and(|m| m.replayed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_concurrent_duplicates_make_one_upstream_call() {
    let rig = rig().await;
    rig.script.hold();
    rig.script.then(Step::Reply(200, json!({"name": "Ada"})));
    let mut calls = Vec::new();
    for _ in 0..200 {
        let runtime = Arc::clone(&rig.runtime);
        calls.push(tokio::spawn(async move {
            runtime
                .invoke("enrich", call(json!({"email": "ada@example.com"})))
                .await
        }));
    }
    // Every duplicate has joined the leader before the upstream answers.
    while rig.script.hits() == 0 {
        tokio::task::yield_now().await;
    }
    rig.script.release(1);
    let mut fresh = 0;
    for c in calls {
        let invoked = c.await.expect("call task");
        assert_eq!(body(&invoked), json!({"name": "Ada"}));
        if !replayed(&invoked) {
            fresh += 1;
        }
    }
    assert_eq!(rig.script.hits(), 1, "exactly one upstream call");
    assert_eq!(fresh, 1, "one answer is the call's own, the others shared");
    assert_eq!(rig.runtime.calls_in_flight(), 0);
}

#[tokio::test(start_paused = true)]
async fn completed_keys_replay_until_their_ttl() {
    let rig = rig().await;
    rig.script.then(Step::Reply(201, json!({"n": 1})));
    rig.script.then(Step::Reply(201, json!({"n": 2})));
    let first = rig
        .runtime
        .invoke("enrich", call(json!({"email": "a@b.co"})))
        .await;
    assert_eq!(body(&first), json!({"n": 1}));
    assert!(!replayed(&first));
    let meta = first.idempotency.clone().expect("keyed");
    assert!(meta.derived);
    assert_eq!(meta.key.len(), 64);
    assert_eq!(
        rig.script.seen()[0].key.as_deref(),
        Some(meta.key.as_str()),
        "forwarded upstream"
    );

    let again = rig
        .runtime
        .invoke("enrich", call(json!({"email": "a@b.co"})))
        .await;
    assert_eq!(body(&again), json!({"n": 1}));
    assert!(replayed(&again));
    assert_eq!(again.attempts, 0);
    assert_eq!(rig.script.hits(), 1);

    tokio::time::advance(Duration::from_secs(3601)).await;
    let later = rig
        .runtime
        .invoke("enrich", call(json!({"email": "a@b.co"})))
        .await;
    assert_eq!(body(&later), json!({"n": 2}), "expired: a new call");
    assert!(!replayed(&later));
    assert_eq!(rig.script.hits(), 2);
}

#[tokio::test]
async fn the_same_key_with_other_params_is_a_conflict() {
    let rig = rig().await;
    let key = InvokeRequest {
        params: json!({"email": "a@b.co"}),
        idempotency_key: Some("order-1".into()),
        priority: None,
    };
    let first = rig.runtime.invoke("enrich", key.clone()).await;
    assert!(matches!(first.answer, Answer::Ok(_)));
    assert_eq!(rig.script.seen()[0].key.as_deref(), Some("order-1"));
    let other = InvokeRequest {
        params: json!({"email": "z@b.co"}),
        ..key.clone()
    };
    let conflict = rig.runtime.invoke("enrich", other).await;
    assert_eq!(error_code(&conflict), "idempotency_conflict");
    assert_eq!(rig.script.hits(), 1);
    // The key is the caller's, so another param with the same email but a
    // different note is a different fingerprint too.
    let noted = InvokeRequest {
        params: json!({"email": "a@b.co", "note": "x"}),
        ..key
    };
    assert_eq!(
        error_code(&rig.runtime.invoke("enrich", noted).await),
        "idempotency_conflict"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reject_answers_a_duplicate_in_flight_at_once() {
    let rig = rig().await;
    rig.script.hold();
    let runtime = Arc::clone(&rig.runtime);
    let leader =
        tokio::spawn(async move { runtime.invoke("strict", call(json!({"id": "1"}))).await });
    while rig.script.hits() == 0 {
        tokio::task::yield_now().await;
    }
    let dup = rig.runtime.invoke("strict", call(json!({"id": "1"}))).await;
    assert_eq!(error_code(&dup), "idempotency_in_flight");
    rig.script.release(1);
    assert!(matches!(
        leader.await.expect("leader").answer,
        Answer::Ok(_)
    ));
    assert_eq!(rig.script.hits(), 1);
}

#[tokio::test]
async fn refusals_and_retryable_failures_are_not_stored() {
    let rig = rig().await;
    let op = Arc::clone(&rig.runtime.compiled().operations["strict"]);
    op.breaker.force_open();
    let refused = rig.runtime.invoke("strict", call(json!({"id": "7"}))).await;
    assert_eq!(error_code(&refused), "breaker_open");
    op.breaker.reset();
    rig.script.then(Step::Reply(503, json!({})));
    let failed = rig.runtime.invoke("strict", call(json!({"id": "7"}))).await;
    assert_eq!(error_code(&failed), "upstream_status");
    let ok = rig.runtime.invoke("strict", call(json!({"id": "7"}))).await;
    assert!(
        matches!(ok.answer, Answer::Ok(_)),
        "a later try runs: {ok:?}"
    );
    assert_eq!(rig.script.hits(), 2);
}

#[tokio::test]
async fn a_permanent_upstream_error_is_replayed_not_resent() {
    let rig = rig().await;
    rig.script
        .then(Step::Reply(400, json!({"error": "bad row"})));
    let first = rig.runtime.invoke("strict", call(json!({"id": "9"}))).await;
    assert_eq!(error_code(&first), "upstream_status");
    let again = rig.runtime.invoke("strict", call(json!({"id": "9"}))).await;
    assert!(replayed(&again));
    match &again.answer {
        Answer::Failed(InvokeError::Failure(claygate::pipeline::Failure::Status(r))) => {
            assert_eq!(r.status.as_u16(), 400);
            assert_eq!(&r.body[..], br#"{"error":"bad row"}"#);
        }
        other => panic!("expected the stored 400, got {other:?}"),
    }
    assert_eq!(rig.script.hits(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_crashed_claim_is_taken_over_when_its_lease_ends() {
    let rig = rig().await;
    let key = "caller-key-1";
    let fingerprint =
        claygate::pipeline::idempotency::sha256_canonical(&json!({"id": "3"}), "params")
            .expect("hashable");
    let now = rig.runtime.clock.now();
    // A claim left by a process that died mid-call, lease 10s.
    let claim = rig
        .store
        .idempotency_claim(
            "strict",
            key,
            &fingerprint,
            now,
            now + 10_000,
            now + 3_600_000,
        )
        .await
        .expect("claim");
    assert_eq!(claim, Claim::Claimed);
    let request = InvokeRequest {
        params: json!({"id": "3"}),
        idempotency_key: Some(key.into()),
        priority: None,
    };
    // `strict` rejects duplicates in flight.
    let dup = rig.runtime.invoke("strict", request.clone()).await;
    assert_eq!(error_code(&dup), "idempotency_in_flight");
    tokio::time::advance(Duration::from_secs(11)).await;
    let taken = rig.runtime.invoke("strict", request).await;
    assert!(matches!(taken.answer, Answer::Ok(_)), "{taken:?}");
    assert_eq!(rig.script.hits(), 1);
}

#[tokio::test]
async fn keys_are_checked() {
    let rig = rig().await;
    let bad = InvokeRequest {
        params: json!({"email": "a@b.co"}),
        idempotency_key: Some("has space".into()),
        priority: None,
    };
    assert_eq!(
        error_code(&rig.runtime.invoke("enrich", bad).await),
        "bad_idempotency_key"
    );
    let long = InvokeRequest {
        params: json!({"email": "a@b.co"}),
        idempotency_key: Some("k".repeat(256)),
        priority: None,
    };
    assert_eq!(
        error_code(&rig.runtime.invoke("enrich", long).await),
        "bad_idempotency_key"
    );
    assert_eq!(rig.script.hits(), 0);
}

#[tokio::test]
async fn params_are_checked_against_the_schema() {
    let rig = rig().await;
    let out = rig
        .runtime
        .invoke("enrich", call(json!({"email": 5})))
        .await;
    match &out.answer {
        Answer::Failed(InvokeError::InvalidParams { path, .. }) => assert_eq!(path, "/email"),
        other => panic!("expected invalid params, got {other:?}"),
    }
    let out = rig
        .runtime
        .invoke("enrich", call(json!({"email": "not-an-email"})))
        .await;
    assert_eq!(error_code(&out), "invalid_params");
    let out = rig.runtime.invoke("enrich", call(json!({}))).await;
    assert_eq!(error_code(&out), "invalid_params");
    let out = rig.runtime.invoke("nope", call(json!({}))).await;
    assert_eq!(error_code(&out), "unknown_operation");
    assert_eq!(rig.script.hits(), 0);
}

#[tokio::test(start_paused = true)]
async fn fallback_serves_cached_answers_by_staleness_then_static() {
    let rig = rig().await;
    rig.script.then(Step::Reply(200, json!({"name": "Ada"})));
    let ok = rig
        .runtime
        .invoke("enrich", call(json!({"email": "ada@x.io"})))
        .await;
    assert!(matches!(ok.answer, Answer::Ok(_)));
    rig.script.always(Step::Reply(503, json!({})));

    let mut seen = Vec::new();
    for (wait, note) in [(60, "a"), (600, "b"), (20 * 3600, "c"), (4 * 3600, "d")] {
        tokio::time::advance(Duration::from_secs(wait)).await;
        // Another note makes another fingerprint but the same cache key.
        let params = json!({"email": "ada@x.io", "note": note});
        let out = rig
            .runtime
            .invoke(
                "enrich",
                InvokeRequest {
                    params,
                    idempotency_key: Some(format!("k-{note}")),
                    priority: None,
                },
            )
            .await;
        match &out.answer {
            Answer::Fallback {
                staleness, cause, ..
            } => {
                assert_eq!(cause.code(), "upstream_status");
                seen.push((*staleness, body(&out)));
            }
            other => panic!("expected a fallback, got {other:?}"),
        }
    }
    assert_eq!(
        seen,
        vec![
            (Staleness::Fresh, json!({"name": "Ada"})),
            (Staleness::Stale, json!({"name": "Ada"})),
            (Staleness::VeryStale, json!({"name": "Ada"})),
            // Older than very_stale is never served: the static value is.
            (Staleness::Static, json!({"known": false})),
        ]
    );
}

#[tokio::test]
async fn the_fallback_cache_survives_a_restart() {
    let dir = tempdir();
    let script = Script::new();
    script.then(Step::Reply(200, json!({"name": "Grace"})));
    {
        let store = Arc::new(SqliteStore::open(dir.path()).await.expect("store"));
        let runtime = Runtime::new(
            compile_script(OPS, &script, None),
            store.clone(),
            Clock::new(),
        );
        let ok = runtime
            .invoke("enrich", call(json!({"email": "g@x.io"})))
            .await;
        assert!(matches!(ok.answer, Answer::Ok(_)));
        store.close().await.expect("close flushes the cache write");
    }
    script.always(Step::Refuse);
    let store = Arc::new(SqliteStore::open(dir.path()).await.expect("reopen"));
    let runtime = Runtime::new(compile_script(OPS, &script, None), store, Clock::new());
    let out = runtime
        .invoke(
            "enrich",
            InvokeRequest {
                params: json!({"email": "g@x.io"}),
                idempotency_key: Some("after-restart".into()),
                priority: None,
            },
        )
        .await;
    match &out.answer {
        Answer::Fallback {
            staleness, cause, ..
        } => {
            assert_eq!(*staleness, Staleness::Fresh);
            assert_eq!(cause.code(), "connect_error");
        }
        other => panic!("expected a fallback from disk, got {other:?}"),
    }
    assert_eq!(body(&out), json!({"name": "Grace"}));
}

#[tokio::test]
async fn client_errors_are_not_degraded_to_fallbacks() {
    let rig = rig().await;
    rig.script.then(Step::Reply(200, json!({"name": "Ada"})));
    rig.runtime
        .invoke("enrich", call(json!({"email": "ada@x.io"})))
        .await;
    rig.script
        .then(Step::Reply(404, json!({"error": "no such person"})));
    let out = rig
        .runtime
        .invoke(
            "enrich",
            InvokeRequest {
                params: json!({"email": "ada@x.io"}),
                idempotency_key: Some("another-call".into()),
                priority: None,
            },
        )
        .await;
    assert_eq!(error_code(&out), "upstream_status");
}

#[tokio::test]
async fn operations_without_a_key_run_every_call() {
    let rig = rig().await;
    for _ in 0..3 {
        let out = rig.runtime.invoke("plain", call(json!({}))).await;
        assert!(matches!(out.answer, Answer::Ok(_)));
        assert!(out.idempotency.is_none());
    }
    assert_eq!(rig.script.hits(), 3);
    assert_eq!(rig.script.seen()[0].key, None);
}

#[tokio::test]
async fn an_open_breaker_still_replays_but_writes_no_claim() {
    let rig = rig().await;
    let done = rig.runtime.invoke("strict", call(json!({"id": "a"}))).await;
    assert!(matches!(done.answer, Answer::Ok(_)));
    let op = Arc::clone(&rig.runtime.compiled().operations["strict"]);
    op.breaker.force_open();
    let again = rig.runtime.invoke("strict", call(json!({"id": "a"}))).await;
    assert!(
        matches!(again.answer, Answer::Ok(_)),
        "a stored answer replays: {again:?}"
    );
    assert!(replayed(&again));
    let refused = rig.runtime.invoke("strict", call(json!({"id": "b"}))).await;
    assert_eq!(error_code(&refused), "breaker_open");
    let key = refused.idempotency.expect("keyed").key;
    assert_eq!(
        rig.store
            .idempotency_get("strict", &key)
            .await
            .expect("read"),
        None,
        "no claim was written for a call that was never sent"
    );
    assert_eq!(rig.script.hits(), 1);
}
