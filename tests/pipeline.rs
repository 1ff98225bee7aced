//! The compiled pipeline against a real local HTTP server: templates,
//! retries, timeouts, the breaker, the bulkhead, cancellation, and state
//! carried over by `compile`.
//!
//! These use real sockets, so they run on the real clock with short
//! timeouts; the layers' exact timing is tested on the paused clock in
//! their own unit tests.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use claygate::compile::{CompileError, CompileOptions, Compiled, compile_with};
use claygate::pipeline::Failure;
use claygate::pipeline::compose::{Invocation, Outcome};
use claygate::policy::{LoadOptions, PolicySet, load_str};
use serde_json::json;

use crate::support::upstream::{Behavior, FakeUpstream};

/// Loads a policy text whose upstream `clay` points at `url`.
fn set(url: &str, operations: &str) -> PolicySet {
    let text = format!(
        "version: 1\n\
         upstreams:\n  clay:\n    base_url: \"{url}\"\n    headers: {{ Authorization: \"Bearer ${{env:TEST_CLAY_KEY}}\" }}\n    priorities:\n      critical: {{ concurrency: 4, queue: 4, queue_timeout: 1s }}\n      normal: {{ concurrency: 1, queue: 0, queue_timeout: 1s }}\n\
         timeouts: {{ connect: 1s, request: 2s }}\n\
         operations:\n{operations}"
    );
    let loaded = load_str(
        "test.yaml",
        &text,
        LoadOptions {
            unset_env: claygate::policy::UnsetEnv::Ignore,
        },
    );
    assert!(
        loaded.set.is_some(),
        "test policy must be valid: {:#?}",
        loaded.diagnostics
    );
    loaded.set.expect("valid set")
}

fn options() -> CompileOptions {
    let env: HashMap<&str, &str> = HashMap::from([("TEST_CLAY_KEY", "s3cret-key")]);
    CompileOptions {
        env: Box::new(move |name| env.get(name).map(|v| (*v).to_owned())),
        transport: None,
    }
}

fn build(set: &PolicySet, previous: Option<&Compiled>) -> Compiled {
    match compile_with(set, previous, &options()) {
        Ok(c) => c,
        Err(e) => panic!("compile failed: {e:?}"),
    }
}

const LOOKUP: &str = "  lookup:
    upstream: clay
    request: { method: GET, path: \"/v1/companies/{{ params.domain }}\", query: { fields: \"name,size\" } }
    params_schema: { type: object, properties: { domain: { type: string } } }
    timeout: 2s
    retry: { max_attempts: 3, backoff: { initial: 10ms, max: 20ms, jitter: none }, on: [connect_error, timeout, 503, 429] }
    breaker: { volume_threshold: 4, error_threshold_percentage: 50, reset_timeout: 30s }
";

/// The failure code of an outcome, `None` for a success.
fn code(out: &Outcome) -> Option<&'static str> {
    out.result.as_ref().err().map(Failure::code)
}

fn invoke(params: serde_json::Value) -> Invocation {
    Invocation {
        params,
        ..Invocation::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_renders_its_template_and_sends_the_upstream_headers() {
    let fake = FakeUpstream::start().await;
    fake.then([Behavior::ok(r#"{"name":"Acme"}"#)]);
    let c = build(&set(&fake.url(), LOOKUP), None);
    let out = c.operations["lookup"]
        .call(&invoke(json!({"domain": "acme.com/x y"})))
        .await;
    let reply = out.result.expect("a reply");
    assert_eq!(reply.status, 200);
    assert_eq!(&reply.body[..], br#"{"name":"Acme"}"#);
    assert_eq!(out.attempts, 1);
    let seen = &fake.seen()[0];
    assert_eq!(seen.method, "GET");
    assert_eq!(
        seen.path_and_query,
        "/v1/companies/acme.com%2Fx%20y?fields=name%2Csize"
    );
    assert_eq!(seen.headers["authorization"], "Bearer s3cret-key");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retryable_statuses_are_retried_and_others_are_not() {
    let fake = FakeUpstream::start().await;
    fake.then([
        Behavior::status(503, "busy"),
        Behavior::status(503, "busy"),
        Behavior::ok("{}"),
    ]);
    let c = build(&set(&fake.url(), LOOKUP), None);
    let out = c.operations["lookup"]
        .call(&invoke(json!({"domain": "a.com"})))
        .await;
    assert!(out.result.is_ok(), "{:?}", out.result);
    assert_eq!((out.attempts, fake.hits()), (3, 3));

    fake.then([Behavior::status(404, "no such company")]);
    let out = c.operations["lookup"]
        .call(&invoke(json!({"domain": "b.com"})))
        .await;
    match out.result {
        Err(Failure::Status(r)) => assert_eq!(r.status, 404),
        other => panic!("expected a 404 failure, got {other:?}"),
    }
    assert_eq!((out.attempts, fake.hits()), (1, 4));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_after_past_the_deadline_fails_at_once() {
    let fake = FakeUpstream::start().await;
    fake.then([Behavior::status(429, "slow down").with_header("retry-after", "30")]);
    let ops = LOOKUP.replace("    timeout: 2s\n", "    timeout: 2s\n    deadline: 5s\n");
    let c = build(&set(&fake.url(), &ops), None);
    let started = std::time::Instant::now();
    let out = c.operations["lookup"]
        .call(&invoke(json!({"domain": "a.com"})))
        .await;
    assert_eq!(code(&out), Some("upstream_status"));
    assert_eq!(out.attempts, 1);
    // It did not sleep 30s, nor until the deadline.
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hanging_upstream_times_out_per_attempt_then_hits_the_deadline() {
    let fake = FakeUpstream::start().await;
    fake.always(Behavior::Hang);
    let short = LOOKUP.replace("    timeout: 2s\n", "    timeout: 300ms\n");
    let c = build(&set(&fake.url(), &short), None);
    let out = c.operations["lookup"]
        .call(&invoke(json!({"domain": "a.com"})))
        .await;
    assert_eq!(code(&out), Some("attempt_timeout"));
    assert_eq!(out.attempts, 3);

    let ops = LOOKUP.replace(
        "    timeout: 2s\n",
        "    timeout: 300ms\n    deadline: 450ms\n",
    );
    let c = build(&set(&fake.url(), &ops), None);
    let out = c.operations["lookup"]
        .call(&invoke(json!({"domain": "a.com"})))
        .await;
    assert_eq!(code(&out), Some("deadline_exceeded"));
    // Two on real time; one when a stall lets both timers run out before
    // the next poll (the paused-clock test in tests/invoke.rs is exact).
    assert!((1..=2).contains(&out.attempts), "{}", out.attempts);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_connections_and_resets_are_told_apart() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let url = format!("http://{}", closed.local_addr().expect("addr"));
    drop(closed);
    let c = build(&set(&url, LOOKUP), None);
    let out = c.operations["lookup"]
        .call(&invoke(json!({"domain": "a.com"})))
        .await;
    assert_eq!(code(&out), Some("connect_error"));
    assert_eq!(out.attempts, 3, "connect errors are retried");

    let fake = FakeUpstream::start().await;
    fake.always(Behavior::ResetMidBody);
    let c = build(&set(&fake.url(), LOOKUP), None);
    let out = c.operations["lookup"]
        .call(&invoke(json!({"domain": "a.com"})))
        .await;
    assert_eq!(code(&out), Some("transport_error"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_body_is_refused() {
    let fake = FakeUpstream::start().await;
    fake.then([
        Behavior::LargeBody(200, 2 * 1024 * 1024),
        Behavior::LargeBody(502, 2 * 1024 * 1024),
    ]);
    let mut small = set(
        &fake.url(),
        &LOOKUP.replace("max_attempts: 3", "max_attempts: 1"),
    );
    small
        .upstreams
        .get_mut("clay")
        .expect("clay")
        .max_response_bytes = Some(1024 * 1024);
    let c = build(&small, None);
    let out = c.operations["lookup"]
        .call(&invoke(json!({"domain": "a.com"})))
        .await;
    assert_eq!(code(&out), Some("body_too_large"));
    // An error status stays visible (it decides retries and the breaker's
    // verdict); its oversized body is cut at the limit instead.
    let out = c.operations["lookup"]
        .call(&invoke(json!({"domain": "a.com"})))
        .await;
    match out.result {
        Err(Failure::Status(reply)) => {
            assert_eq!(reply.status, 502);
            assert_eq!(reply.body.len(), 1024 * 1024);
        }
        other => panic!("expected the 502, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_breaker_opens_and_then_spares_the_upstream() {
    let fake = FakeUpstream::start().await;
    fake.always(Behavior::status(500, "boom"));
    let ops = LOOKUP.replace("max_attempts: 3", "max_attempts: 1");
    let c = build(&set(&fake.url(), &ops), None);
    let op = &c.operations["lookup"];
    for _ in 0..4 {
        let out = op.call(&invoke(json!({"domain": "a.com"}))).await;
        assert_eq!(code(&out), Some("upstream_status"));
    }
    let hits = fake.hits();
    let out = op.call(&invoke(json!({"domain": "a.com"}))).await;
    assert_eq!(code(&out), Some("breaker_open"));
    assert_eq!(out.attempts, 0, "nothing was sent");
    assert_eq!(out.breaker.as_str(), "open");
    assert_eq!(fake.hits(), hits, "an open breaker sends nothing");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_bulkhead_rejects_and_cancellation_leaks_nothing() {
    let fake = FakeUpstream::start().await;
    fake.always(Behavior::Hang);
    let ops = LOOKUP.replace("timeout: 2s", "timeout: 30s");
    let c = Arc::new(build(&set(&fake.url(), &ops), None));
    // `normal` has one slot and no queue: a hanging call takes it.
    let holder = {
        let c = Arc::clone(&c);
        tokio::spawn(async move {
            c.operations["lookup"]
                .call(&invoke(json!({"domain": "a.com"})))
                .await
        })
    };
    while fake.hits() == 0 {
        tokio::task::yield_now().await;
    }
    let out = c.operations["lookup"]
        .call(&invoke(json!({"domain": "b.com"})))
        .await;
    assert_eq!(code(&out), Some("bulkhead_full"));
    // A caller cannot raise itself to `critical` (it would take critical
    // slots and the critical token reserve): it stays in `normal`, which is full.
    let mut critical = invoke(json!({"domain": "c.com"}));
    critical.priority = Some(claygate::policy::model::Priority::Critical);
    let out = c.operations["lookup"].call(&critical).await;
    assert_eq!(code(&out), Some("bulkhead_full"));

    // Cancel the holder: its slot comes back, and the breaker counted nothing.
    holder.abort();
    let _ = holder.await;
    let bulkhead = c.upstreams["clay"].bulkhead.as_ref().expect("bulkhead");
    let snap = serde_json::to_value(bulkhead.snapshot()).expect("snapshot");
    assert_eq!(snap["in_use"], 0, "{snap}");
    let breaker =
        serde_json::to_value(c.operations["lookup"].breaker.snapshot()).expect("snapshot");
    assert_eq!(breaker["window"]["calls"], 0, "{breaker}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_idempotency_key_is_forwarded() {
    let fake = FakeUpstream::start().await;
    let ops = "  push:
    upstream: clay
    request: { method: POST, path: /v1/rows, body: \"{{ params.row }}\" }
    params_schema: { type: object, properties: { row: { type: object } } }
    idempotency: { key: [row], header: X-Dedupe }
";
    let c = build(&set(&fake.url(), ops), None);
    let mut call = invoke(json!({"row": {"email": "a@b.c", "n": 1}}));
    call.idempotency_key = Some("k-123".into());
    let out = c.operations["push"].call(&call).await;
    assert!(out.result.is_ok(), "{:?}", out.result);
    let seen = &fake.seen()[0];
    assert_eq!(seen.headers["x-dedupe"], "k-123");
    assert_eq!(seen.headers["content-type"], "application/json");
    let body: serde_json::Value = serde_json::from_slice(&seen.body).expect("json body");
    assert_eq!(
        body,
        json!({"email": "a@b.c", "n": 1}),
        "the row is inserted as an object"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compile_carries_state_over_only_where_unchanged() {
    let fake = FakeUpstream::start().await;
    let first = build(&set(&fake.url(), LOOKUP), None);
    first.operations["lookup"].breaker.force_open();

    let same = build(&set(&fake.url(), LOOKUP), Some(&first));
    assert!(Arc::ptr_eq(
        &first.operations["lookup"].breaker,
        &same.operations["lookup"].breaker
    ));
    assert_eq!(
        same.operations["lookup"].breaker.state().as_str(),
        "forced_open"
    );
    let carried = same.carried["lookup"];
    assert!(
        carried.breaker && carried.retry_budget && carried.bulkhead && carried.http_client,
        "{carried:?}"
    );

    let changed = LOOKUP.replace("volume_threshold: 4", "volume_threshold: 8");
    let next = build(&set(&fake.url(), &changed), Some(&same));
    assert!(!Arc::ptr_eq(
        &same.operations["lookup"].breaker,
        &next.operations["lookup"].breaker
    ));
    assert_eq!(next.operations["lookup"].breaker.state().as_str(), "closed");
    assert!(!next.carried["lookup"].breaker);
    assert!(
        next.carried["lookup"].bulkhead,
        "bulkheads always carry over"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unset_secret_is_a_compile_error_naming_the_variable() {
    let s = set("http://127.0.0.1:9", LOOKUP);
    let no_env = CompileOptions {
        env: Box::new(|_| None),
        transport: None,
    };
    let errors = match compile_with(&s, None, &no_env) {
        Ok(_) => panic!("compiled without TEST_CLAY_KEY"),
        Err(e) => e,
    };
    assert_eq!(
        errors,
        vec![CompileError::UnsetVariable {
            place: "upstream clay, header Authorization".into(),
            variable: "TEST_CLAY_KEY".into(),
        }]
    );
    let text = errors[0].to_string();
    assert_eq!(
        text,
        "upstream clay, header Authorization: environment variable `TEST_CLAY_KEY` is not set and has no default"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operation_headers_expand_environment_references() {
    let fake = FakeUpstream::start().await;
    let ops = "  get:
    upstream: clay
    request: { method: GET, path: /v1/x, headers: { X-Api-Key: \"${env:TEST_CLAY_KEY}\", X-Literal: \"cost $${x}\" } }
";
    let c = build(&set(&fake.url(), ops), None);
    let out = c.operations["get"].call(&invoke(json!({}))).await;
    assert!(out.result.is_ok(), "{:?}", out.result);
    let seen = &fake.seen()[0];
    assert_eq!(seen.headers["x-api-key"], "s3cret-key");
    assert_eq!(seen.headers["x-literal"], "cost ${x}");

    let no_env = CompileOptions {
        env: Box::new(|_| None),
        transport: None,
    };
    let s = set(&fake.url(), ops);
    let errors = compile_with(&s, None, &no_env)
        .err()
        .expect("unset variables");
    assert!(
        errors.contains(&CompileError::UnsetVariable {
            place: "operation get, header X-Api-Key".into(),
            variable: "TEST_CLAY_KEY".into(),
        }),
        "{errors:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_429_closes_the_quota_gate_for_every_operation_of_the_upstream() {
    let fake = FakeUpstream::start().await;
    fake.then([Behavior::status(429, "quota").with_header("retry-after", "30")]);
    let ops = format!(
        "{}    deadline: 2s\n  other:\n    upstream: clay\n    request: {{ method: GET, path: /v1/other }}\n    deadline: 2s\n",
        LOOKUP.replace("max_attempts: 3", "max_attempts: 1")
    );
    let c = build(&set(&fake.url(), &ops), None);
    let out = c.operations["lookup"]
        .call(&invoke(json!({"domain": "a.com"})))
        .await;
    assert_eq!(code(&out), Some("upstream_status"));
    // The upstream has no `rate_limit`, yet its quota gate is closed for 30s:
    // the other operation is refused at once without reaching it.
    let out = c.operations["other"].call(&invoke(json!({}))).await;
    match &out.result {
        Err(Failure::RateLimited { retry_after }) => {
            assert!(*retry_after > Duration::from_secs(25), "{retry_after:?}")
        }
        other => panic!("expected rate_limited, got {other:?}"),
    }
    assert_eq!(fake.hits(), 1);
}
