//! Health and metrics end to end: a real server on loopback and a fake
//! upstream that fails and recovers. `/health` moves healthy -> degraded ->
//! unhealthy -> healthy with the breakers, fallbacks, probes and the DLQ;
//! `/health/ready` follows draining; `/metrics` follows invokes, retries,
//! fallbacks, replays, breaker transitions, bulkhead use and reloads.
//!
//! Waits poll the real server with a bounded loop (it is the thing that
//! changes state), never a fixed sleep.

use std::sync::atomic::Ordering;
use std::time::Duration;

use claygate::reload::Trigger;
use serde_json::{Value, json};

use crate::support::script::{Script, Step};
use crate::support::server::{self, InProcess, Options, TestServer, UPSTREAM};
use crate::support::upstream::{Behavior, FakeUpstream};

/// Longest any wait for a state takes before the test fails.
const PATIENCE: Duration = Duration::from_secs(5);

/// `UPSTREAM` with a fast probe on `clay`.
fn probed_upstream() -> String {
    UPSTREAM.replace(
        "    priorities:\n",
        "    probe: { path: /health, interval: 100ms, timeout: 500ms }\n    priorities:\n",
    )
}

fn policy(upstream: &str, rest: &str) -> String {
    format!("{upstream}{rest}")
}

/// `GET /health`: status code, content type and body.
async fn health(server: &TestServer) -> (u16, String, Value) {
    let r = server
        .client
        .get(server.url("/health"))
        .send()
        .await
        .expect("GET /health");
    let status = r.status().as_u16();
    let content_type = r
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let text = r.text().await.expect("health body");
    assert!(
        !text.contains("test-secret-key"),
        "the health report leaks a header value: {text}"
    );
    let body = serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"));
    (status, content_type, body)
}

/// Polls `/health` (running `between` before each look) until `want`
/// accepts the body; fails after [`PATIENCE`] with the last body.
async fn until_health<F, Fut>(
    server: &TestServer,
    mut between: F,
    want: impl Fn(u16, &Value) -> bool,
) -> Value
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let started = tokio::time::Instant::now();
    loop {
        between().await;
        let (status, _, body) = health(server).await;
        if want(status, &body) {
            return body;
        }
        assert!(
            started.elapsed() < PATIENCE,
            "health never got there; last answer {status}: {body:#}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

async fn nothing() {}

/// The first object of check `key`.
fn check<'a>(body: &'a Value, key: &str) -> &'a Value {
    let c = &body["checks"][key][0];
    assert!(c.is_object(), "no check `{key}` in {body:#}");
    c
}

/// The reasons of check `key`, as one text.
fn reasons(body: &Value, key: &str) -> String {
    check(body, key)["reasons"]
        .as_array()
        .map(|r| {
            r.iter()
                .filter_map(Value::as_str)
                .collect::<Vec<_>>()
                .join(" | ")
        })
        .unwrap_or_default()
}

/// `GET /metrics` as text, checking its content type.
async fn metrics(server: &TestServer) -> String {
    let r = server
        .client
        .get(server.url("/metrics"))
        .send()
        .await
        .expect("GET /metrics");
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok()),
        Some("application/openmetrics-text; version=1.0.0; charset=utf-8")
    );
    let text = r.text().await.expect("metrics body");
    assert!(text.ends_with("# EOF\n"), "not OpenMetrics text:\n{text}");
    text
}

const STRICT: &str = "operations:
  strict:
    upstream: clay
    request: { method: GET, path: /v1/strict }
    retry: { max_attempts: 1 }
    breaker: { volume_threshold: 2, error_threshold_percentage: 50, reset_timeout: 2s }
";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_breaker_without_fallback_is_unhealthy_until_the_upstream_recovers() {
    let fake = FakeUpstream::start().await;
    let server = server::start(
        &[("policy.yaml", &policy(UPSTREAM, STRICT))],
        &fake.url(),
        Options::default(),
    )
    .await;

    let r = server.invoke("strict", json!({})).await;
    assert_eq!(r.status(), 200);
    let (status, content_type, body) = health(&server).await;
    assert_eq!(
        (status, content_type.as_str()),
        (200, "application/health+json")
    );
    assert_eq!(body["status"], "healthy", "{body:#}");
    assert_eq!(check(&body, "operation:strict")["status"], "healthy");
    assert_eq!(check(&body, "operation:strict")["observedValue"], "closed");
    assert_eq!(check(&body, "operation:strict")["upstream"], "clay");
    assert!(
        body["time"].as_str().is_some_and(|t| t.ends_with('Z')),
        "{body:#}"
    );

    // One failure in two calls reaches 50%: the breaker opens, and there
    // is no fallback and no DLQ behind it.
    fake.always(Behavior::status(503, r#"{"error":"down"}"#));
    assert_eq!(server.invoke("strict", json!({})).await.status(), 502);
    assert_eq!(
        server.invoke("strict", json!({})).await.status(),
        503,
        "fails fast"
    );
    let (status, content_type, body) = health(&server).await;
    assert_eq!(
        (status, content_type.as_str()),
        (503, "application/health+json")
    );
    assert_eq!(body["status"], "unhealthy", "{body:#}");
    assert_eq!(body["output"], "unhealthy: operation:strict");
    let strict = check(&body, "operation:strict");
    assert_eq!(strict["status"], "unhealthy");
    assert_eq!(strict["observedValue"], "open");
    let why = reasons(&body, "operation:strict");
    assert!(
        why.starts_with("breaker open since ") && why.contains(", calls fail fast"),
        "{why}"
    );
    assert_eq!(strict["output"], why.as_str());

    // The upstream recovers: calls find out (a trial after the reset
    // timeout, 2 s so that a stall above cannot turn the fail-fast call
    // into the trial), and health follows them back to healthy.
    fake.always(Behavior::ok(r#"{"ok":true}"#));
    let body = until_health(
        &server,
        || async {
            let _ = server.invoke("strict", json!({})).await;
        },
        |status, body| status == 200 && body["status"] == "healthy",
    )
    .await;
    assert_eq!(check(&body, "operation:strict")["observedValue"], "closed");
    assert!(body.get("output").is_none(), "{body:#}");
    server.server.shutdown().await;
}

const LOOKUP: &str = "operations:
  lookup:
    upstream: clay
    request: { method: GET, path: /v1/lookup }
    retry: { max_attempts: 1 }
    breaker: { volume_threshold: 3, error_threshold_percentage: 50, reset_timeout: 30s }
    fallback: { static: { known: false } }
";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fallback_answers_and_a_breaker_open_behind_a_fallback_are_degraded() {
    let fake = FakeUpstream::start().await;
    let server = server::start(
        &[("policy.yaml", &policy(UPSTREAM, LOOKUP))],
        &fake.url(),
        Options::default(),
    )
    .await;
    let (status, _, body) = health(&server).await;
    assert_eq!((status, body["status"].as_str()), (200, Some("healthy")));

    // One failed call answered from the fallback: degraded, breaker still closed.
    fake.always(Behavior::status(503, "{}"));
    let r = server.invoke("lookup", json!({})).await;
    assert_eq!(r.status(), 200);
    let answer: Value = r.json().await.expect("envelope");
    assert_eq!(answer["status"], "fallback");
    let (status, _, body) = health(&server).await;
    assert_eq!(status, 200, "degraded still answers 200");
    assert_eq!(body["status"], "degraded", "{body:#}");
    let lookup = check(&body, "operation:lookup");
    assert_eq!(lookup["status"], "degraded");
    assert_eq!(lookup["observedValue"], "closed");
    assert_eq!(lookup["lastFallback"]["staleness"], "static");
    let why = reasons(&body, "operation:lookup");
    assert!(
        why.starts_with("answered from its fallback (static) "),
        "{why}"
    );

    // More failures open the breaker; the fallback keeps serving.
    for _ in 0..2 {
        let r = server.invoke("lookup", json!({})).await;
        assert_eq!(r.status(), 200);
    }
    let (status, _, body) = health(&server).await;
    assert_eq!(status, 200);
    assert_eq!(body["status"], "degraded", "{body:#}");
    assert_eq!(check(&body, "operation:lookup")["observedValue"], "open");
    let why = reasons(&body, "operation:lookup");
    assert!(
        why.contains("breaker open since ") && why.contains(", serving from fallback"),
        "{why}"
    );
    server.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_probe_is_unhealthy_and_health_and_metrics_stay_open_with_a_token() {
    let fake = FakeUpstream::start().await;
    let server = server::start(
        &[("policy.yaml", &policy(&probed_upstream(), STRICT))],
        &fake.url(),
        Options {
            token: Some("admin-token".into()),
            ..Options::default()
        },
    )
    .await;
    // Health and metrics need no token; the rest does.
    let r = server.invoke("strict", json!({})).await;
    assert_eq!(r.status(), 401);

    let body = until_health(&server, nothing, |status, body| {
        status == 200 && body["checks"]["upstream:clay"][0]["consecutiveFailures"] == 0
    })
    .await;
    let up = check(&body, "upstream:clay");
    assert_eq!(up["status"], "healthy");
    assert_eq!(up["probe"], "GET /health");
    assert_eq!(up["observedUnit"], "ms");
    // The probe went through the upstream's transport, with its headers.
    let probe = fake
        .seen()
        .into_iter()
        .find(|s| s.path_and_query == "/health")
        .expect("a probe arrived");
    assert_eq!(probe.method, "GET");
    assert_eq!(
        probe
            .headers
            .get("authorization")
            .and_then(|v| v.to_str().ok()),
        Some("Bearer test-secret-key")
    );
    assert!(
        metrics(&server)
            .await
            .contains("claygate_probe_up{upstream=\"clay\"} 1")
    );

    fake.always(Behavior::status(503, r#"{"error":"maintenance"}"#));
    let body = until_health(&server, nothing, |status, _| status == 503).await;
    assert_eq!(body["status"], "unhealthy");
    assert_eq!(check(&body, "upstream:clay")["status"], "unhealthy");
    let why = reasons(&body, "upstream:clay");
    assert!(
        why.starts_with("probe GET /health failed: 503 Service Unavailable"),
        "{why}"
    );
    let why = reasons(&body, "operation:strict");
    assert!(
        why.starts_with("upstream `clay` probe GET /health failed: 503 Service Unavailable"),
        "{why}"
    );
    assert_eq!(
        check(&body, "operation:strict")["observedValue"],
        "closed",
        "no call was made"
    );
    let text = metrics(&server).await;
    assert!(
        text.contains("claygate_probe_up{upstream=\"clay\"} 0"),
        "{text}"
    );
    assert!(!text.contains("test-secret-key"));

    fake.always(Behavior::ok("{}"));
    let body = until_health(&server, nothing, |status, body| {
        status == 200 && body["status"] == "healthy"
    })
    .await;
    assert_eq!(check(&body, "upstream:clay")["consecutiveFailures"], 0);
    server.server.shutdown().await;
}

/// A `push_row`-like operation with a DLQ whose redrive waits an hour.
const PUSH: &str = "health: { dlq_degraded_above: 2 }
operations:
  push_row:
    upstream: clay
    request: { method: POST, path: \"/v1/tables/{{ params.table_id }}/rows\", body: \"{{ params.row }}\" }
    params_schema:
      type: object
      required: [table_id, row]
      properties: { table_id: { type: string }, row: { type: object } }
    priority: bulk
    retry: { max_attempts: 1 }
    breaker: { volume_threshold: 1000 }
    idempotency: { key: [table_id, row], ttl: 24h }
    dlq: { max_attempts: 3, backoff: { initial: 1h, max: 2h } }
";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dlq_above_its_threshold_is_degraded() {
    let fake = FakeUpstream::start().await;
    let server = server::start(
        &[("policy.yaml", &policy(UPSTREAM, PUSH))],
        &fake.url(),
        Options::default(),
    )
    .await;
    fake.always(Behavior::status(503, "{}"));
    let push = |n: u32| server.invoke("push_row", json!({"table_id": "t1", "row": {"n": n}}));

    for n in 0..2 {
        assert_eq!(push(n).await.status(), 202, "queued in the DLQ");
    }
    let (status, _, body) = health(&server).await;
    assert_eq!(status, 200);
    assert_eq!(
        body["status"], "healthy",
        "2 entries are not more than 2: {body:#}"
    );
    assert_eq!(check(&body, "operation:push_row")["dlqEntries"], 2);

    assert_eq!(push(2).await.status(), 202);
    let (status, _, body) = health(&server).await;
    assert_eq!(status, 200);
    assert_eq!(body["status"], "degraded", "{body:#}");
    let push_row = check(&body, "operation:push_row");
    assert_eq!(push_row["dlqEntries"], 3);
    assert_eq!(
        reasons(&body, "operation:push_row"),
        "DLQ holds 3 pending or parked entries (more than 2)"
    );
    let text = metrics(&server).await;
    for line in [
        "claygate_dlq_entries{operation=\"push_row\",state=\"pending\"} 3",
        "claygate_dlq_entries{operation=\"push_row\",state=\"parked\"} 0",
        "claygate_dead_lettered_total{operation=\"push_row\"} 3",
    ] {
        assert!(text.contains(line), "missing `{line}`:\n{text}");
    }
    server.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_fails_while_draining_and_live_does_not() {
    let fake = FakeUpstream::start().await;
    let server = server::start(
        &[("policy.yaml", &policy(UPSTREAM, STRICT))],
        &fake.url(),
        Options::default(),
    )
    .await;

    let (status, body) = server.get_json("/health/ready").await;
    assert_eq!(status, 200, "{body:#}");
    assert_eq!(body["status"], "healthy");
    assert_eq!(body["checks"]["store:read"][0]["status"], "healthy");
    let loaded = body["checks"]["policies:loaded"][0]["output"]
        .as_str()
        .unwrap_or_default();
    assert!(
        loaded.starts_with("generation ") && loaded.ends_with("serving 1 operation(s)"),
        "{loaded}"
    );

    server
        .server
        .state()
        .shared
        .draining
        .store(true, Ordering::Release);
    let (status, body) = server.get_json("/health/ready").await;
    assert_eq!(status, 503, "{body:#}");
    assert_eq!(body["status"], "unhealthy");
    assert_eq!(
        body["output"],
        "draining: claygate is shutting down and takes no new calls"
    );
    let (status, body) = server.get_json("/health/live").await;
    assert_eq!(
        (status, body["status"].as_str()),
        (200, Some("healthy")),
        "live is the process only"
    );
    // Draining says nothing about the upstreams.
    let (status, _, _) = health(&server).await;
    assert_eq!(status, 200);

    server
        .server
        .state()
        .shared
        .draining
        .store(false, Ordering::Release);
    let (status, _) = server.get_json("/health/ready").await;
    assert_eq!(status, 200);

    // A closed store is not ready either.
    server
        .server
        .state()
        .runtime()
        .store
        .close()
        .await
        .expect("close the store");
    let (status, body) = server.get_json("/health/ready").await;
    assert_eq!(status, 503, "{body:#}");
    assert!(
        body["output"]
            .as_str()
            .is_some_and(|o| o.starts_with("the store failed a read: ")),
        "{body:#}"
    );
    server.server.shutdown().await;
}

const TWO: &str = "operations:
  lookup:
    upstream: clay
    request: { method: GET, path: /v1/lookup }
    retry: { max_attempts: 1 }
  gone:
    upstream: clay
    request: { method: GET, path: /v1/gone }
    retry: { max_attempts: 1 }
";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_move_with_invokes_and_removed_operations_disappear_on_reload() {
    let fake = FakeUpstream::start().await;
    let server = server::start(
        &[("policy.yaml", &policy(UPSTREAM, TWO))],
        &fake.url(),
        Options::default(),
    )
    .await;

    assert_eq!(server.invoke("lookup", json!({})).await.status(), 200);
    let text = metrics(&server).await;
    for line in [
        "claygate_invokes_total{operation=\"lookup\",status=\"ok\",code=\"ok\"} 1",
        "claygate_breaker_state{operation=\"lookup\",state=\"closed\"} 1",
        "claygate_breaker_state{operation=\"lookup\",state=\"open\"} 0",
        "claygate_breaker_state{operation=\"gone\",state=\"closed\"} 1",
        "claygate_bulkhead_in_use{upstream=\"clay\",priority=\"normal\"} 0",
        "claygate_bulkhead_queued{upstream=\"clay\",priority=\"bulk\"} 0",
    ] {
        assert!(text.contains(line), "missing `{line}`:\n{text}");
    }
    assert!(
        !text.contains("claygate_probe_up{"),
        "no probe, no series:\n{text}"
    );
    assert!(!text.contains("test-secret-key"));

    fake.always(Behavior::status(503, "{}"));
    assert_eq!(server.invoke("lookup", json!({})).await.status(), 502);
    assert_eq!(server.invoke("lookup", json!({})).await.status(), 502);
    let text = metrics(&server).await;
    for line in [
        "claygate_invokes_total{operation=\"lookup\",status=\"ok\",code=\"ok\"} 1",
        "claygate_invokes_total{operation=\"lookup\",status=\"failed\",code=\"upstream_status\"} 2",
    ] {
        assert!(text.contains(line), "missing `{line}`:\n{text}");
    }

    // Reload without `gone`: its gauges and its health check go.
    std::fs::write(
        server.policies.join("policy.yaml"),
        policy(UPSTREAM, TWO.split("  gone:").next().unwrap_or(TWO))
            .replace("{{UPSTREAM}}", &fake.url()),
    )
    .expect("rewrite the policy");
    let reloader = server
        .server
        .state()
        .shared
        .reloader
        .clone()
        .expect("a reloader");
    let record = reloader.reload(Trigger::Api, false).await;
    assert_eq!(
        record.changes.get("gone").map(|c| c.status),
        Some("removed"),
        "{record:?}"
    );
    let text = metrics(&server).await;
    assert!(
        !text.contains("claygate_breaker_state{operation=\"gone\""),
        "{text}"
    );
    assert!(
        text.contains("claygate_breaker_state{operation=\"lookup\",state=\"closed\"} 1"),
        "{text}"
    );
    let (_, _, body) = health(&server).await;
    assert!(body["checks"].get("operation:gone").is_none(), "{body:#}");
    assert!(body["checks"].get("operation:lookup").is_some(), "{body:#}");
    server.server.shutdown().await;
}

/// Operations that each move one metric, answered by the scripted upstream.
const MOVERS: &str = "version: 1
upstreams:
  clay:
    base_url: \"http://127.0.0.1:9\"
    headers: { Authorization: \"Bearer test-secret-key\" }
    priorities:
      normal: { concurrency: 4, queue: 4, queue_timeout: 30s }
      bulk: { concurrency: 1, queue: 1, queue_timeout: 30s }
operations:
  retried:
    upstream: clay
    request: { method: GET, path: /v1/retried }
    retry: { max_attempts: 2, backoff: { initial: 1ms, max: 1ms, jitter: none }, on: [503] }
    breaker: { volume_threshold: 1000 }
  lookup:
    upstream: clay
    request: { method: GET, path: /v1/lookup }
    retry: { max_attempts: 1 }
    breaker: { volume_threshold: 1000 }
    fallback: { static: { known: false } }
  keyed:
    upstream: clay
    request: { method: POST, path: /v1/keyed, body: { id: \"{{ params.id }}\" } }
    params_schema: { type: object, required: [id], properties: { id: { type: string } } }
    retry: { max_attempts: 1 }
    idempotency: { key: [id] }
  fragile:
    upstream: clay
    request: { method: GET, path: /v1/fragile }
    retry: { max_attempts: 1 }
    breaker: { volume_threshold: 2, error_threshold_percentage: 50, reset_timeout: 1h }
  batch:
    upstream: clay
    request: { method: GET, path: /v1/batch }
    priority: bulk
    timeout: 30s
    retry: { max_attempts: 1 }
";

/// Polls the in-process `/metrics` until every line of `want` is there.
async fn scrape_until(rig: &InProcess, want: &[&str]) -> String {
    let started = tokio::time::Instant::now();
    loop {
        let answer = rig.get("/metrics").await;
        assert_eq!(answer.status, 200);
        let text = String::from_utf8_lossy(&answer.body).into_owned();
        if want.iter().all(|line| text.contains(line)) {
            assert!(!text.contains("test-secret-key"));
            return text;
        }
        assert!(
            started.elapsed() < PATIENCE,
            "metrics never showed all of {want:#?}:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_fallbacks_replays_transitions_latency_and_bulkhead_gauges_move() {
    let script = Script::new();
    let rig = server::in_process(MOVERS, &script, None).await;

    // A retried call: 503, then the default 200.
    script.then(Step::Reply(503, json!({"error": "busy"})));
    let answer = rig.invoke("retried", json!({})).await;
    assert_eq!(answer.status, 200, "{:#}", answer.json());
    assert_eq!(answer.json()["meta"]["attempts"], 2);
    // A fallback: the static answer after a 503.
    script.then(Step::Reply(503, json!({})));
    let answer = rig.invoke("lookup", json!({})).await;
    assert_eq!(answer.json()["status"], "fallback");
    // A replay: the same idempotent params twice.
    for _ in 0..2 {
        assert_eq!(rig.invoke("keyed", json!({"id": "a"})).await.status, 200);
    }
    // A breaker opening: two failures in two calls reach 50%.
    script.then(Step::Reply(503, json!({})));
    script.then(Step::Reply(503, json!({})));
    for _ in 0..2 {
        assert_eq!(rig.invoke("fragile", json!({})).await.status, 502);
    }
    let text = scrape_until(
        &rig,
        &[
            "claygate_retries_total{operation=\"retried\"} 1",
            "claygate_fallbacks_total{operation=\"lookup\",staleness=\"static\"} 1",
            "claygate_idempotent_replays_total{operation=\"keyed\"} 1",
            "claygate_breaker_transitions_total{operation=\"fragile\",to=\"open\"} 1",
            "claygate_breaker_state{operation=\"fragile\",state=\"open\"} 1",
            "claygate_invoke_duration_seconds_count{operation=\"retried\"} 1",
            "claygate_invoke_duration_seconds_count{operation=\"keyed\"} 2",
            "claygate_bulkhead_in_use{upstream=\"clay\",priority=\"bulk\"} 0",
            "claygate_bulkhead_queued{upstream=\"clay\",priority=\"bulk\"} 0",
        ],
    )
    .await;
    for absent in [
        "claygate_retries_total{operation=\"lookup\"}",
        "claygate_idempotent_replays_total{operation=\"retried\"}",
        "claygate_breaker_transitions_total{operation=\"retried\"",
    ] {
        assert!(!text.contains(absent), "`{absent}` moved:\n{text}");
    }
    assert!(
        text.contains(
            "claygate_invoke_duration_seconds_bucket{le=\"+Inf\",operation=\"retried\"} 1"
        ),
        "a latency histogram:\n{text}"
    );

    // The bulkhead: one `batch` call holds the one `bulk` slot (held by the
    // script), a second waits in the queue; a scrape sees both.
    script.hold();
    let hits = script.hits();
    let spawn = || {
        let rig_router = rig.router.clone();
        tokio::spawn(async move {
            use tower::ServiceExt;
            let request = http::Request::post("/v1/operations/batch/invoke")
                .body(axum::body::Body::empty())
                .expect("a request");
            rig_router
                .oneshot(request)
                .await
                .unwrap_or_else(|e| match e {})
                .status()
        })
    };
    let holder = spawn();
    let started = tokio::time::Instant::now();
    while script.hits() == hits {
        assert!(
            started.elapsed() < PATIENCE,
            "the holder never reached the upstream"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let waiter = spawn();
    scrape_until(
        &rig,
        &[
            "claygate_bulkhead_in_use{upstream=\"clay\",priority=\"bulk\"} 1",
            "claygate_bulkhead_queued{upstream=\"clay\",priority=\"bulk\"} 1",
            "claygate_bulkhead_in_use{upstream=\"clay\",priority=\"normal\"} 0",
        ],
    )
    .await;
    assert_eq!(script.hits(), hits + 1, "the waiter is queued, not sent");
    script.release(2);
    assert_eq!(holder.await.expect("holder"), 200);
    assert_eq!(waiter.await.expect("waiter"), 200);
    scrape_until(
        &rig,
        &[
            "claygate_bulkhead_in_use{upstream=\"clay\",priority=\"bulk\"} 0",
            "claygate_bulkhead_queued{upstream=\"clay\",priority=\"bulk\"} 0",
            "claygate_invoke_duration_seconds_count{operation=\"batch\"} 2",
        ],
    )
    .await;
}
