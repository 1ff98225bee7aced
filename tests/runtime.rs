//! The runtime's outer layers through the library: params checks,
//! idempotency (keys, sharing, replay, conflicts, leases), the fallback
//! cache with staleness, admission and drain, and scrubbing upstream
//! secrets out of error bodies; on an in-memory upstream and a real SQLite
//! store (one test on a real socket, for the upstream's own headers).

use std::sync::Arc;
use std::time::Duration;

use std::future::Future;
use std::task::Poll;

use claygate::clock::Clock;
use claygate::pipeline::fallback::Staleness;
use claygate::runtime::{Answer, Drained, InvokeError, InvokeRequest, Invoked, Runtime};
use claygate::store::sqlite::SqliteStore;
use claygate::store::{Claim, IdempotencyState, Store};
use serde_json::{Value, json};

use crate::support::dlq::{PausedSafe, Spy};
use crate::support::script::{Script, Step, compile_script};
use crate::support::tempdir;
use crate::support::upstream::{Behavior, FakeUpstream};

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
  push:
    upstream: clay
    request: { method: POST, path: /v1/rows, body: { id: \"{{ params.id }}\" } }
    retry: { max_attempts: 1 }
    idempotency: { key: [id] }
    dlq: { max_attempts: 3, backoff: { initial: 1h, max: 2h, jitter: none } }
  tripped:
    upstream: clay
    request: { method: POST, path: /v1/tripped, body: { id: \"{{ params.id }}\" } }
    retry: { max_attempts: 1 }
    breaker: { volume_threshold: 1, error_threshold_percentage: 50, reset_timeout: 30s }
    idempotency: { key: [id] }
  cached:
    upstream: clay
    request: { method: POST, path: /v1/cached, body: { id: \"{{ params.id }}\" } }
    retry: { max_attempts: 1 }
    fallback: { cache: { fresh: 1m, stale: 1h, very_stale: 1d, max_bytes: 4096 } }
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
    // Room for every call: a second upstream call would go through (and be
    // counted) rather than hang, and the bound turns a hang into a failure.
    rig.script.release(1_000);
    let mut fresh = 0;
    let all = tokio::time::timeout(Duration::from_secs(30), async {
        let mut out = Vec::new();
        for c in calls {
            out.push(c.await.expect("call task"));
        }
        out
    })
    .await
    .expect("every duplicate answers within 30s");
    for invoked in all {
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
    let fingerprint = claygate::pipeline::idempotency::fingerprint(&json!({"id": "3"}));
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
    assert!(matches!(claim, Claim::Claimed(_)), "{claim:?}");
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

/// A rig whose store is a [`Spy`] over a paused-clock-safe SQLite store.
async fn spied() -> (Rig, Arc<Spy>) {
    let dir = tempdir();
    let script = Script::new();
    let sqlite = Arc::new(
        crate::support::dlq::inhibited(SqliteStore::open(dir.path()))
            .await
            .expect("store opens"),
    );
    let spy = Spy::new(Arc::new(PausedSafe(sqlite.clone())));
    let compiled = compile_script(OPS, &script, None);
    let runtime = Runtime::new(compiled, spy.clone() as Arc<dyn Store>, Clock::new());
    (
        Rig {
            runtime,
            script,
            store: sqlite,
            _dir: dir,
        },
        spy,
    )
}

/// Review finding 9: a completed key replays from a read; only the first
/// call claims (a synced write on the single writer, behind DLQ batches).
#[tokio::test(start_paused = true)]
async fn a_completed_key_replays_from_a_read_without_claiming() {
    let (rig, spy) = spied().await;
    let first = rig
        .runtime
        .invoke("enrich", call(json!({"email": "r@x.io"})))
        .await;
    assert!(matches!(first.answer, Answer::Ok(_)));
    assert_eq!(spy.claims(), 1);
    for _ in 0..5 {
        let again = rig
            .runtime
            .invoke("enrich", call(json!({"email": "r@x.io"})))
            .await;
        assert!(replayed(&again), "{again:?}");
    }
    assert_eq!(spy.claims(), 1, "replays claim nothing");
    assert_eq!(rig.script.hits(), 1);
}

/// Review finding 15: the no-claim fast path for an open breaker must not
/// lose the answer of a call the breaker let through after all (it turned
/// half-open between the check and the call).
#[tokio::test(start_paused = true)]
async fn a_call_the_breaker_lets_through_after_all_is_recorded() {
    let (rig, spy) = spied().await;
    rig.script.then(Step::Reply(503, json!({})));
    let failed = rig
        .runtime
        .invoke("tripped", call(json!({"id": "a"})))
        .await;
    assert_eq!(error_code(&failed), "upstream_status");
    let breaker = Arc::clone(&rig.runtime.compiled().operations["tripped"].breaker);
    assert_eq!(breaker.state().as_str(), "open");

    // The check sees the breaker open; by the time the call reaches the
    // breaker its reset timeout has passed, and the call is the trial.
    spy.before_next_get(async {
        tokio::time::advance(Duration::from_secs(31)).await;
    });
    rig.script.then(Step::Reply(200, json!({"n": 1})));
    let trial = rig
        .runtime
        .invoke("tripped", call(json!({"id": "b"})))
        .await;
    assert!(matches!(trial.answer, Answer::Ok(_)), "{trial:?}");
    assert_eq!(trial.attempts, 1);
    assert_eq!(rig.script.hits(), 2);

    let again = rig
        .runtime
        .invoke("tripped", call(json!({"id": "b"})))
        .await;
    assert!(replayed(&again), "the trial's answer was stored: {again:?}");
    assert_eq!(body(&again), json!({"n": 1}));
    assert_eq!(rig.script.hits(), 2, "no second delivery");
}

/// Polls `call` once: it is admitted then (counted for a drain).
async fn poll_once<F: Future + Unpin>(call: &mut F) -> bool {
    std::future::poll_fn(|cx| Poll::Ready(std::pin::Pin::new(&mut *call).poll(cx).is_pending()))
        .await
}

/// Review finding 16: a call that passed the API's `draining` check but
/// whose task has not started yet must still be seen by the drain, waited
/// for, and then interrupted (dead-lettered), never dropped. Finding 18:
/// the interrupted call records the request it sent.
#[tokio::test(start_paused = true)]
async fn a_call_admitted_before_the_drain_is_waited_for_and_dead_lettered() {
    let (rig, _spy) = spied().await;
    rig.script.always(Step::Hang);
    let runtime = Arc::clone(&rig.runtime);
    let mut late = Box::pin(runtime.invoke("push", call(json!({"id": "r1"}))));
    assert!(poll_once(&mut late).await, "still running");
    assert_eq!(rig.runtime.active_calls(), 1, "admitted on its first poll");

    let drained = rig.runtime.drain(Duration::from_millis(500)).await;
    assert_eq!(
        drained,
        Drained {
            finished: 0,
            interrupted: 1
        }
    );
    assert_eq!(rig.runtime.active_calls(), 0);
    let invoked = late.await;
    let Answer::Queued { dlq_id, cause } = &invoked.answer else {
        panic!("expected the interrupted call to be dead-lettered: {invoked:?}");
    };
    assert_eq!(cause.as_ref().map(|c| c.code()), Some("interrupted"));
    assert_eq!(invoked.attempts, 1, "the request it sent is counted");
    let entry = rig
        .runtime
        .store
        .dlq_get(*dlq_id)
        .await
        .expect("readable")
        .expect("stored");
    assert_eq!(
        (entry.error_code.as_str(), entry.call_attempts),
        ("interrupted", 1)
    );
    assert_eq!(rig.script.hits(), 1);
}

/// Round 2, item 7: a call waiting on a claim left by a crashed process
/// (lease 60s here) ends when the drain interrupts, answering `draining`
/// with nothing sent, instead of holding the shutdown until the lease
/// lapses.
#[tokio::test(start_paused = true)]
async fn a_call_waiting_on_a_crashed_claim_does_not_outlast_the_drain() {
    let (rig, _spy) = spied().await;
    let params = json!({"id": "r9"});
    let key = "caller-key-9";
    let fingerprint = claygate::pipeline::idempotency::fingerprint(&params);
    let now = rig.runtime.clock.now();
    let claim = crate::support::dlq::inhibited(rig.store.idempotency_claim(
        "push",
        key,
        &fingerprint,
        now,
        now + 60_000,
        now + 3_600_000,
    ))
    .await
    .expect("claim");
    assert!(matches!(claim, Claim::Claimed(_)), "{claim:?}");
    let request = InvokeRequest {
        params,
        idempotency_key: Some(key.into()),
        priority: None,
    };
    let runtime = Arc::clone(&rig.runtime);
    let mut waiting = Box::pin(runtime.invoke("push", request));
    let started = tokio::time::Instant::now();
    assert!(poll_once(&mut waiting).await, "still running");
    assert_eq!(rig.runtime.active_calls(), 1, "admitted on its first poll");

    let drained = rig.runtime.drain(Duration::from_secs(1)).await;
    assert_eq!(
        drained,
        Drained {
            finished: 0,
            interrupted: 1
        }
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "the drain ended at its timeout, not the lease's end: {:?}",
        started.elapsed()
    );
    let invoked = waiting.await;
    assert_eq!(error_code(&invoked), "draining");
    assert_eq!(invoked.attempts, 0);
    assert_eq!(rig.script.hits(), 0, "nothing sent");
    let record = crate::support::dlq::inhibited(rig.store.idempotency_get("push", key))
        .await
        .expect("read")
        .expect("kept");
    assert!(
        matches!(record.state, IdempotencyState::InFlight { .. }),
        "the crashed claim is left as it was: {record:?}"
    );
}

/// Review finding 16: once a drain has begun, a call is refused at
/// admission (`draining`), in `invoke` and `invoke_here` alike.
#[tokio::test(start_paused = true)]
async fn calls_after_the_drain_began_are_refused() {
    let (rig, _spy) = spied().await;
    assert!(!rig.runtime.is_closing());
    let drained = rig.runtime.drain(Duration::from_secs(1)).await;
    assert_eq!(
        drained,
        Drained {
            finished: 0,
            interrupted: 0
        }
    );
    assert!(rig.runtime.is_closing());
    let refused = rig.runtime.invoke("push", call(json!({"id": "r2"}))).await;
    assert_eq!(error_code(&refused), "draining");
    let here = rig.runtime.invoke_here("plain", call(json!({}))).await;
    assert_eq!(error_code(&here), "draining");
    assert_eq!(rig.script.hits(), 0);
    assert_eq!(rig.runtime.active_calls(), 0);
}

/// Review finding 6: a 64-bit id outside the key params no longer refuses
/// a call with a caller's key, its fingerprint keeps adjacent ids apart, and
/// a key param holding one is refused naming the param.
#[tokio::test]
async fn integers_beyond_2_pow_53_outside_key_params_are_fine() {
    let rig = rig().await;
    let big = |id: u64, key: &str| InvokeRequest {
        params: json!({"email": "a@b.co", "clay_id": id}),
        idempotency_key: Some(key.into()),
        priority: None,
    };
    let mut schema_free = rig
        .runtime
        .invoke("plain", big(9_007_199_254_740_993, "k-1"))
        .await;
    assert!(
        matches!(schema_free.answer, Answer::Ok(_)),
        "{schema_free:?}"
    );
    // The same key with the adjacent id: other params, a conflict.
    schema_free = rig
        .runtime
        .invoke("plain", big(9_007_199_254_740_992, "k-1"))
        .await;
    assert_eq!(error_code(&schema_free), "idempotency_conflict");
    let again = rig
        .runtime
        .invoke("plain", big(9_007_199_254_740_993, "k-1"))
        .await;
    assert!(replayed(&again));

    let derived = rig
        .runtime
        .invoke("push", call(json!({"id": 9_007_199_254_740_993u64})))
        .await;
    match &derived.answer {
        Answer::Failed(e @ InvokeError::BadIdempotencyKey(_)) => {
            assert!(e.to_string().contains("`id`"), "{e}");
        }
        other => panic!("expected bad_idempotency_key, got {other:?}"),
    }
    assert_eq!(rig.script.hits(), 1);
}

/// Review finding 4: `fallback.cache.max_bytes` reaches the memory cache.
#[tokio::test]
async fn the_memory_cache_gets_the_policys_byte_budget() {
    let rig = rig().await;
    let compiled = rig.runtime.compiled();
    let memory = |op: &str| {
        let fallback = compiled.operations[op]
            .fallback
            .as_ref()
            .expect("a fallback");
        (fallback.memory.capacity(), fallback.memory.max_bytes())
    };
    assert_eq!(memory("cached"), (10_000, 4096));
    assert_eq!(memory("enrich"), (10_000, 64 * 1024 * 1024));
    rig.script
        .then(Step::Reply(200, json!({"big": "x".repeat(5000)})))
        .then(Step::Reply(200, json!({"small": 1})));
    rig.runtime.invoke("cached", call(json!({"id": "1"}))).await;
    rig.runtime.invoke("cached", call(json!({"id": "2"}))).await;
    let fallback = compiled.operations["cached"]
        .fallback
        .as_ref()
        .expect("fallback");
    assert_eq!(
        fallback.memory.len(),
        1,
        "the answer over budget stays on disk only"
    );
    assert!(fallback.memory.bytes() <= 4096);
}

/// Round 2, item 4: only values the environment gave are scrubbed. A
/// literal header (`X-Api-Version: 2024`), the text around a template's
/// placeholder (`Bearer {{ params.token }}`) and an empty variable (the
/// bundled policy's `Bearer ${env:CLAY_API_KEY:-}` without the key) are no
/// secrets: an error body holding them is answered and stored byte for
/// byte, not turned into invalid JSON.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn error_bodies_without_secrets_are_answered_as_they_came() {
    const ECHO: &str =
        r#"{"id":120245,"error":"Bearer token rejected for api version 2024","token":"tok-0123"}"#;
    let fake = FakeUpstream::start().await;
    fake.then([Behavior::status(404, ECHO)]);
    let text = format!(
        "version: 1
upstreams:
  clay:
    base_url: \"{}\"
    headers: {{ Authorization: \"Bearer ${{env:TEST_UNSET_KEY:-}}\", X-Api-Version: \"2024\" }}
timeouts: {{ request: 2s }}
operations:
  lookup:
    upstream: clay
    request: {{ method: POST, path: /v1/lookup, headers: {{ Proxy-Authorization: \"Bearer {{{{ params.token }}}}\" }}, body: {{ id: \"{{{{ params.id }}}}\" }} }}
    retry: {{ max_attempts: 1 }}
    idempotency: {{ key: [id] }}
",
        fake.url()
    );
    let loaded = claygate::policy::load_str(
        "plain.yaml",
        &text,
        claygate::policy::LoadOptions::default(),
    );
    let set = loaded
        .set
        .unwrap_or_else(|| panic!("{:#?}", loaded.diagnostics));
    let options = claygate::compile::CompileOptions {
        env: Box::new(|_| None),
        transport: None,
    };
    let compiled = claygate::compile::compile_with(&set, None, &options).expect("compiles");
    let dir = tempdir();
    let store = Arc::new(SqliteStore::open(dir.path()).await.expect("store"));
    let runtime = Runtime::new(compiled, store.clone() as Arc<dyn Store>, Clock::new());

    let body_of = |invoked: &Invoked| match &invoked.answer {
        Answer::Failed(InvokeError::Failure(claygate::pipeline::Failure::Status(reply))) => {
            assert_eq!(reply.status.as_u16(), 404);
            String::from_utf8_lossy(&reply.body).into_owned()
        }
        other => panic!("expected the upstream's 404, got {other:?}"),
    };
    let request = || call(json!({"id": "120245", "token": "tok-0123"}));
    let first = runtime.invoke("lookup", request()).await;
    assert_eq!(body_of(&first), ECHO);
    assert_eq!(fake.seen()[0].headers["x-api-version"], "2024");
    let again = runtime.invoke("lookup", request()).await;
    assert!(replayed(&again), "the 404 is stored for replay");
    assert_eq!(body_of(&again), ECHO, "stored as it came");
    assert_eq!(fake.hits(), 1);
    store.close().await.expect("close");
}

/// Review finding 17: an upstream that echoes its `Authorization` header
/// (or an operation header) in an error body must not leak it into the
/// answer, the stored replay, or a dead letter's stored answer. Round 2,
/// item 3: nor a key in its base URL's query, echoed with the URL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_echoed_in_upstream_errors_are_scrubbed() {
    const KEY: &str = "sk-live-0123456789abcdef";
    const OP_SECRET: &str = "op-header-secret-42";
    const QUERY_KEY: &str = "query-key-9876543210";
    let fake = FakeUpstream::start().await;
    let echo = format!(
        "{{\"error\":\"bad credentials\",\"authorization\":\"Bearer {KEY}\",\"token\":\"{KEY}\",\"x-op-key\":\"{OP_SECRET}\",\"url\":\"/v1/lookup?api_key={QUERY_KEY}\"}}"
    );
    fake.then([Behavior::status(401, &echo)]);
    let text = format!(
        "version: 1
upstreams:
  clay:
    base_url: \"{}?api_key=${{env:TEST_QUERY_KEY}}\"
    headers: {{ Authorization: \"Bearer ${{env:TEST_CLAY_KEY}}\" }}
timeouts: {{ request: 2s }}
operations:
  lookup:
    upstream: clay
    request: {{ method: POST, path: /v1/lookup, headers: {{ X-Op-Key: \"${{env:TEST_OP_KEY}}\" }}, body: {{ id: \"{{{{ params.id }}}}\" }} }}
    retry: {{ max_attempts: 1 }}
    idempotency: {{ key: [id] }}
",
        fake.url()
    );
    let loaded = claygate::policy::load_str(
        "secrets.yaml",
        &text,
        claygate::policy::LoadOptions {
            unset_env: claygate::policy::UnsetEnv::Ignore,
        },
    );
    let set = loaded
        .set
        .unwrap_or_else(|| panic!("{:#?}", loaded.diagnostics));
    let options = claygate::compile::CompileOptions {
        env: Box::new(|name| match name {
            "TEST_CLAY_KEY" => Some(KEY.into()),
            "TEST_OP_KEY" => Some(OP_SECRET.into()),
            "TEST_QUERY_KEY" => Some(QUERY_KEY.into()),
            _ => None,
        }),
        transport: None,
    };
    let compiled = claygate::compile::compile_with(&set, None, &options).expect("compiles");
    let dir = tempdir();
    let store = Arc::new(SqliteStore::open(dir.path()).await.expect("store"));
    let runtime = Runtime::new(compiled, store.clone() as Arc<dyn Store>, Clock::new());

    let check = |invoked: &Invoked| match &invoked.answer {
        Answer::Failed(InvokeError::Failure(claygate::pipeline::Failure::Status(reply))) => {
            let body = String::from_utf8_lossy(&reply.body).into_owned();
            assert!(!body.contains(KEY), "{body}");
            assert!(!body.contains(OP_SECRET), "{body}");
            assert!(!body.contains(QUERY_KEY), "{body}");
            assert!(body.contains("bad credentials"), "the rest stays: {body}");
            assert!(body.contains("[redacted]"), "{body}");
            reply.status.as_u16()
        }
        other => panic!("expected the upstream's error, got {other:?}"),
    };
    let first = runtime.invoke("lookup", call(json!({"id": "7"}))).await;
    assert_eq!(check(&first), 401);
    // The upstream did get the secrets: the echo is what it was sent.
    let seen = fake.seen();
    assert_eq!(seen[0].headers["authorization"], format!("Bearer {KEY}"));
    assert_eq!(seen[0].headers["x-op-key"], OP_SECRET);
    assert!(
        seen[0]
            .path_and_query
            .ends_with(&format!("?api_key={QUERY_KEY}")),
        "{}",
        seen[0].path_and_query
    );

    // The stored replay of the 401 is the scrubbed one.
    let again = runtime.invoke("lookup", call(json!({"id": "7"}))).await;
    assert!(replayed(&again));
    assert_eq!(check(&again), 401);
    let key = again.idempotency.expect("keyed").key;
    match store.idempotency_get("lookup", &key).await.expect("read") {
        Some(record) => match record.state {
            IdempotencyState::Completed(r) => {
                let body = String::from_utf8_lossy(&r.body).into_owned();
                assert!(
                    !body.contains(KEY) && !body.contains(OP_SECRET) && !body.contains(QUERY_KEY),
                    "{body}"
                );
            }
            other => panic!("expected a completed record, got {other:?}"),
        },
        None => panic!("the 401 is stored for replay"),
    }
    assert_eq!(fake.hits(), 1);
    store.close().await.expect("close");
}
