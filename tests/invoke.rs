//! The invoke endpoint over real HTTP (an in-process `claygate serve` on
//! 127.0.0.1:0 against a fake upstream): the envelope, the status table,
//! the problem documents, and auth.

use std::time::Duration;

use claygate::store::DlqState;
use reqwest::header::HeaderMap;
use serde_json::{Value, json};

use crate::support::capture_logs;
use crate::support::script::{Script, Step};
use crate::support::server::{Options, TestServer, UPSTREAM, in_process, start};
use crate::support::upstream::{Behavior, FakeUpstream};

/// A second, narrow upstream and the operations under test.
const OPERATIONS: &str = "version: 1
upstreams:
  tight:
    base_url: \"{{UPSTREAM}}\"
    priorities:
      normal: { concurrency: 1, queue: 0, queue_timeout: 1s }
  ranked:
    base_url: \"{{UPSTREAM}}\"
    priorities:
      critical: { concurrency: 4, queue: 4, queue_timeout: 30s }
      normal: { concurrency: 4, queue: 4, queue_timeout: 30s }
      bulk: { concurrency: 1, queue: 1, queue_timeout: 30s }
operations:
  echo:
    upstream: clay
    request: { method: POST, path: /v1/echo, body: { email: \"{{ params.email }}\" } }
    params_schema:
      type: object
      required: [email]
      properties: { email: { type: string, minLength: 3 }, tags: { type: array, items: { type: string } } }
    retry: { max_attempts: 1 }
  anything:
    upstream: clay
    request: { method: POST, path: /v1/anything }
    params_schema: { type: object }
    retry: { max_attempts: 1 }
  strict:
    upstream: clay
    request: { method: POST, path: /v1/strict, body: { id: \"{{ params.id }}\" } }
    params_schema: { type: object, required: [id], properties: { id: { type: string } } }
    timeout: 10s
    retry: { max_attempts: 1 }
    idempotency: { key: [id], on_concurrent: reject }
  narrow:
    upstream: tight
    request: { method: GET, path: /v1/narrow }
    timeout: 3s
    retry: { max_attempts: 1 }
  ranked:
    upstream: ranked
    request: { method: GET, path: /v1/ranked }
    priority: normal
    timeout: 30s
    retry: { max_attempts: 1 }
  deadline:
    upstream: clay
    request: { method: GET, path: /v1/slow }
    timeout: 200ms
    deadline: 300ms
    retry: { max_attempts: 3, backoff: { initial: 10ms, max: 10ms, jitter: none }, on: [timeout] }
  company:
    upstream: clay
    request: { method: GET, path: \"/v1/companies/{{ params.domain }}\" }
    params_schema: { type: object, required: [domain], properties: { domain: { type: string } } }
    retry: { max_attempts: 1 }
    fallback: { cache: { fresh: 5m, stale: 1h, very_stale: 24h } }
  push_row:
    upstream: clay
    request: { method: POST, path: \"/v1/tables/{{ params.table_id }}/rows\", body: \"{{ params.row }}\" }
    params_schema:
      type: object
      required: [table_id, row]
      properties: { table_id: { type: string }, row: { type: object } }
    retry: { max_attempts: 1 }
    idempotency: { key: [table_id, row] }
    dlq: { max_attempts: 3, backoff: { initial: 1h, max: 2h } }
";

const TOKEN: &str = "tok-7f3a9c1e-never-shown";

async fn rig_with(options: Options) -> (FakeUpstream, TestServer) {
    let fake = FakeUpstream::start().await;
    let server = start(
        &[("clay.yaml", UPSTREAM), ("ops.yaml", OPERATIONS)],
        &fake.url(),
        options,
    )
    .await;
    (fake, server)
}

async fn rig() -> (FakeUpstream, TestServer) {
    rig_with(Options::default()).await
}

/// POSTs raw bytes to an operation's invoke endpoint.
async fn post_raw(
    server: &TestServer,
    operation: &str,
    content_type: Option<&str>,
    body: impl Into<reqwest::Body>,
) -> reqwest::Response {
    let mut request = server
        .client
        .post(server.url(&format!("/v1/operations/{operation}/invoke")))
        .body(body);
    if let Some(ct) = content_type {
        request = request.header("content-type", ct);
    }
    request.send().await.expect("invoke request")
}

/// Checks a success envelope's status and content type; answers headers and body.
async fn envelope(response: reqwest::Response, status: u16) -> (HeaderMap, Value) {
    let headers = response.headers().clone();
    let got = response.status().as_u16();
    let body: Value = response.json().await.expect("a JSON body");
    assert_eq!(got, status, "status; body: {body:#}");
    assert_eq!(
        headers.get("content-type").and_then(|v| v.to_str().ok()),
        Some("application/json"),
        "content type of an envelope"
    );
    (headers, body)
}

/// Checks a problem document: status, `application/problem+json`, `code`
/// and `status` members, a `message` (the `detail` again) and, past the
/// token check, `outcome: failed`. Answers headers and body.
async fn problem(response: reqwest::Response, status: u16, code: &str) -> (HeaderMap, Value) {
    let headers = response.headers().clone();
    let got = response.status().as_u16();
    let text = response.text().await.expect("a body");
    let body: Value = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("a problem document ({e}): {got} {text}"));
    assert_eq!(got, status, "status; body: {body:#}");
    assert_eq!(
        headers.get("content-type").and_then(|v| v.to_str().ok()),
        Some("application/problem+json"),
        "content type of a {status} answer: {body:#}"
    );
    assert_eq!(body["status"], status, "status member: {body:#}");
    assert_eq!(body["code"], code, "code member: {body:#}");
    assert!(
        body["detail"].as_str().is_some_and(|d| !d.is_empty()),
        "a detail: {body:#}"
    );
    assert_eq!(body["message"], body["detail"], "a message: {body:#}");
    if status == 401 {
        // Refused before the endpoint: not an invoke at all.
        assert!(body.get("outcome").is_none(), "{body:#}");
    } else {
        assert_eq!(body["outcome"], "failed", "a failed invoke: {body:#}");
    }
    (headers, body)
}

fn retry_after(headers: &HeaderMap) -> u64 {
    headers
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("a Retry-After in seconds: {headers:?}"))
}

async fn wait_for_hits(fake: &FakeUpstream, n: usize) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while fake.hits() < n {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the upstream saw {} requests, expected {n}",
            fake.hits()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ok_answers_the_envelope() {
    let (fake, server) = rig().await;
    fake.then([Behavior::ok(r#"{"name":"Ada","company":"Acme"}"#)]);
    let response = server
        .invoke("echo", json!({"email": "ada@example.com"}))
        .await;
    let (headers, body) = envelope(response, 200).await;
    assert!(headers.get("idempotent-replayed").is_none());
    assert_eq!(body["status"], "ok");
    assert_eq!(body["data"], json!({"name": "Ada", "company": "Acme"}));
    let meta = &body["meta"];
    assert_eq!(meta["operation"], "echo");
    assert_eq!(meta["attempts"], 1);
    assert!(
        meta["latency_ms"].as_f64().is_some_and(|ms| ms >= 0.0),
        "{meta}"
    );
    assert_eq!(meta["upstream_status"], 200);
    assert_eq!(meta["breaker"], "closed");
    assert_eq!(meta["fallback"], false);
    // What went upstream: the templated request.
    let seen = fake.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].method, "POST");
    assert_eq!(seen[0].path_and_query, "/v1/echo");
    let sent: Value = serde_json::from_slice(&seen[0].body).expect("JSON sent upstream");
    assert_eq!(sent, json!({"email": "ada@example.com"}));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_operation_is_404() {
    let (fake, server) = rig().await;
    let response = server.invoke("no_such_op", json!({})).await;
    let (_, body) = problem(response, 404, "unknown_operation").await;
    assert!(
        body["detail"]
            .as_str()
            .is_some_and(|d| d.contains("no_such_op")),
        "{body}"
    );
    assert_eq!(fake.hits(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_params_are_422_naming_the_path() {
    let (fake, server) = rig().await;
    let response = server.invoke("echo", json!({"email": 5})).await;
    let (_, body) = problem(response, 422, "invalid_params").await;
    assert_eq!(body["path"], "/email", "{body}");
    assert!(
        body["detail"]
            .as_str()
            .is_some_and(|d| d.contains("/email")),
        "{body}"
    );

    let response = server
        .invoke(
            "echo",
            json!({"email": "ada@example.com", "tags": ["a", 7]}),
        )
        .await;
    let (_, body) = problem(response, 422, "invalid_params").await;
    assert_eq!(body["path"], "/tags/1", "{body}");

    // The params must be an object (the schema says so).
    let response = server.invoke("echo", json!([1, 2])).await;
    problem(response, 422, "invalid_params").await;
    assert_eq!(fake.hits(), 0, "invalid params never reach the upstream");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_or_mistyped_bodies_are_400_and_415() {
    let (fake, server) = rig().await;
    let response = post_raw(
        &server,
        "echo",
        Some("application/json"),
        "{\"email\": \"ada@example.com\",\n  \"tags\": [",
    )
    .await;
    let (_, body) = problem(response, 400, "bad_json").await;
    let detail = body["detail"].as_str().unwrap_or_default();
    assert!(detail.contains("line 2 column"), "says where: {detail}");

    let response = post_raw(&server, "echo", Some("text/plain"), "{\"email\":\"a@b.c\"}").await;
    problem(response, 415, "unsupported_media_type").await;
    let response = post_raw(&server, "echo", None, "{\"email\":\"a@b.c\"}").await;
    problem(response, 415, "unsupported_media_type").await;
    // A parameter on the media type and a +json type are fine.
    fake.always(Behavior::ok("{}"));
    let response = post_raw(
        &server,
        "echo",
        Some("application/json; charset=utf-8"),
        "{\"email\":\"a@b.c\"}",
    )
    .await;
    envelope(response, 200).await;
    let response = post_raw(
        &server,
        "echo",
        Some("application/merge-patch+json"),
        "{\"email\":\"a@b.c\"}",
    )
    .await;
    envelope(response, 200).await;
    assert_eq!(fake.hits(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_body_means_no_params() {
    let (fake, server) = rig().await;
    fake.always(Behavior::ok(r#"{"ok":true}"#));
    let response = post_raw(&server, "anything", None, "").await;
    let (_, body) = envelope(response, 200).await;
    assert_eq!(body["data"], json!({"ok": true}));
    let response = post_raw(&server, "anything", Some("application/json"), " \n").await;
    envelope(response, 200).await;
    // `{}` is checked like any params: `email` is required.
    let response = post_raw(&server, "echo", None, "").await;
    let (_, body) = problem(response, 422, "invalid_params").await;
    assert!(
        body["detail"].as_str().is_some_and(|d| d.contains("email")),
        "{body}"
    );
    assert_eq!(fake.hits(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_over_one_mib_is_413() {
    let (fake, server) = rig().await;
    let big = format!("{{\"email\":\"{}\"}}", "a".repeat(1024 * 1024));
    let response = post_raw(&server, "echo", Some("application/json"), big).await;
    problem(response, 413, "request_too_large").await;
    // Just under the limit is read (and then checked).
    let fits = format!("{{\"email\":\"{}\"}}", "a".repeat(1024 * 1024 - 64));
    fake.always(Behavior::ok("{}"));
    let response = post_raw(&server, "echo", Some("application/json"), fits).await;
    envelope(response, 200).await;
    assert_eq!(fake.hits(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotency_in_flight_replay_and_conflict() {
    let (fake, server) = rig().await;
    fake.then([Behavior::Respond {
        status: 200,
        headers: Vec::new(),
        body: r#"{"id":"a","created":true}"#.into(),
        // Long enough that a stalled test still sends the duplicate
        // while this call is in flight.
        delay: Duration::from_secs(3),
    }]);
    let first = {
        let client = server.client.clone();
        let url = server.url("/v1/operations/strict/invoke");
        tokio::spawn(async move {
            client
                .post(url)
                .json(&json!({"id": "a"}))
                .send()
                .await
                .expect("first call")
        })
    };
    wait_for_hits(&fake, 1).await;
    // A duplicate while the first is in flight: `on_concurrent: reject`.
    let response = server.invoke("strict", json!({"id": "a"})).await;
    let (headers, _) = problem(response, 409, "idempotency_in_flight").await;
    assert!(retry_after(&headers) >= 1);

    let (headers, body) = envelope(first.await.expect("first task"), 200).await;
    assert!(headers.get("idempotent-replayed").is_none());
    let key = body["meta"]["idempotency"]["key"]
        .as_str()
        .expect("the derived key")
        .to_owned();
    assert_eq!(body["meta"]["idempotency"]["replayed"], false);

    // Completed: replayed from the store, marked, with no upstream call.
    let response = server.invoke("strict", json!({"id": "a"})).await;
    let (headers, body) = envelope(response, 200).await;
    assert_eq!(
        headers
            .get("idempotent-replayed")
            .and_then(|v| v.to_str().ok()),
        Some("true")
    );
    assert_eq!(body["data"], json!({"id": "a", "created": true}));
    assert_eq!(body["meta"]["attempts"], 0);
    assert_eq!(body["meta"]["idempotency"]["key"], key.as_str());
    assert_eq!(body["meta"]["idempotency"]["replayed"], true);
    assert_eq!(fake.hits(), 1);

    // The caller's key, reused with other params: 422.
    fake.always(Behavior::ok("{}"));
    let with_key = |id: &str| {
        server
            .client
            .post(server.url("/v1/operations/strict/invoke"))
            .header("idempotency-key", "order-1")
            .json(&json!({ "id": id }))
            .send()
    };
    envelope(with_key("b").await.expect("call"), 200).await;
    let response = with_key("c").await.expect("call");
    problem(response, 422, "idempotency_conflict").await;
    assert_eq!(fake.hits(), 2);

    // A key the API cannot use.
    let response = server
        .client
        .post(server.url("/v1/operations/strict/invoke"))
        .header("idempotency-key", "k".repeat(300))
        .json(&json!({"id": "d"}))
        .send()
        .await
        .expect("call");
    problem(response, 400, "bad_idempotency_key").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_bulkhead_is_429_and_a_hung_attempt_504() {
    let (fake, server) = rig().await;
    fake.always(Behavior::Hang);
    let first = {
        let client = server.client.clone();
        let url = server.url("/v1/operations/narrow/invoke");
        tokio::spawn(async move { client.post(url).send().await.expect("first call") })
    };
    wait_for_hits(&fake, 1).await;
    let response = post_raw(&server, "narrow", None, "").await;
    let (headers, _) = problem(response, 429, "bulkhead_full").await;
    assert!(retry_after(&headers) >= 1);
    assert_eq!(
        fake.hits(),
        1,
        "the refused call never reached the upstream"
    );
    // The slot holder times out after its 1s attempt timeout.
    let (_, body) = problem(first.await.expect("first task"), 504, "attempt_timeout").await;
    assert_eq!(body["meta"]["operation"], "narrow", "{body}");
}

/// Polls `/metrics` until it holds every line of `want`.
async fn wait_for_metrics(server: &TestServer, want: &[&str]) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let text = server
            .client
            .get(server.url("/metrics"))
            .send()
            .await
            .expect("GET /metrics")
            .text()
            .await
            .expect("metrics text");
        if want.iter().all(|line| text.contains(line)) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "metrics never showed {want:?}:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lowered_priority_takes_that_class_and_a_raised_one_is_not_granted() {
    let (fake, server) = rig().await;
    fake.then([Behavior::Hang]);
    fake.always(Behavior::ok(r#"{"ok":true}"#));
    let call = |operation: &str, priority: Option<&str>| {
        let mut request = server
            .client
            .post(server.url(&format!("/v1/operations/{operation}/invoke")));
        if let Some(p) = priority {
            request = request.header("x-claygate-priority", p);
        }
        request.send()
    };
    let spawn_bulk = || {
        let request = server
            .client
            .post(server.url("/v1/operations/ranked/invoke"))
            .header("x-claygate-priority", "bulk");
        tokio::spawn(async move { request.send().await })
    };
    // `ranked` is a `normal` operation; asked for `bulk`, a call takes the
    // one `bulk` slot (and hangs there), the next waits in `bulk`'s queue.
    let _holder = spawn_bulk();
    wait_for_hits(&fake, 1).await;
    let _waiter = spawn_bulk();
    wait_for_metrics(
        &server,
        &[
            "claygate_bulkhead_in_use{upstream=\"ranked\",priority=\"bulk\"} 1",
            "claygate_bulkhead_queued{upstream=\"ranked\",priority=\"bulk\"} 1",
            "claygate_bulkhead_in_use{upstream=\"ranked\",priority=\"normal\"} 0",
        ],
    )
    .await;
    // A third `bulk` call finds class and queue full: that class's limits
    // applied, not the operation's own (`normal` has room).
    let response = call("ranked", Some("bulk")).await.expect("call");
    let (_, body) = problem(response, 429, "bulkhead_full").await;
    assert_eq!(body["meta"]["priority"], "bulk", "{body:#}");
    assert_eq!(fake.hits(), 1, "refused before the upstream");

    // Without the header: the operation's class, which has room.
    let (_, body) = envelope(call("ranked", None).await.expect("call"), 200).await;
    assert_eq!(body["meta"]["priority"], "normal", "{body:#}");
    // A higher class than the operation's is not granted: `normal` again.
    let (_, body) = envelope(call("ranked", Some("Critical")).await.expect("call"), 200).await;
    assert_eq!(body["meta"]["priority"], "normal", "{body:#}");
    assert_eq!(fake.hits(), 3);

    // A class the upstream does not define, or no class at all: 400.
    let response = call("ranked", Some("low")).await.expect("call");
    let (_, body) = problem(response, 400, "bad_priority").await;
    let detail = body["detail"].as_str().unwrap_or_default();
    assert!(
        detail.contains("`low`")
            && detail.contains("`ranked`")
            && detail.contains("critical, normal, bulk"),
        "names the classes the upstream has: {detail}"
    );
    let response = call("ranked", Some("urgent")).await.expect("call");
    problem(response, 400, "bad_priority").await;
    // An unknown operation is 404 whatever the header says.
    let response = call("no_such_op", Some("low")).await.expect("call");
    problem(response, 404, "unknown_operation").await;
    assert_eq!(fake.hits(), 3, "refused calls never reach the upstream");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_breaker_is_503_with_retry_after() {
    let (fake, server) = rig().await;
    server.server.state().runtime().compiled().operations["echo"]
        .breaker
        .force_open();
    let response = server
        .invoke("echo", json!({"email": "ada@example.com"}))
        .await;
    let (headers, body) = problem(response, 503, "breaker_open").await;
    assert!(retry_after(&headers) >= 1);
    assert_eq!(body["meta"]["breaker"], "forced_open", "{body}");
    assert_eq!(fake.hits(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_passed_deadline_is_504() {
    let (fake, server) = rig().await;
    fake.always(Behavior::Hang);
    let started = std::time::Instant::now();
    let response = post_raw(&server, "deadline", None, "").await;
    let elapsed = started.elapsed();
    // The first attempt times out at 200ms and is retried; the 300ms
    // deadline ends the second (exact figures: the paused-clock test below).
    let (_, body) = problem(response, 504, "deadline_exceeded").await;
    assert!(
        body["meta"]["attempts"].as_u64().is_some_and(|n| n >= 1),
        "{body:#}"
    );
    assert!(
        elapsed >= Duration::from_millis(300),
        "not before the deadline: {elapsed:?}"
    );
    assert!(
        elapsed < Duration::from_secs(2),
        "the 300ms deadline held: {elapsed:?}"
    );
}

/// One operation with a 200ms attempt timeout inside a 300ms deadline.
const DEADLINE: &str = "version: 1
upstreams:
  clay:
    base_url: \"http://127.0.0.1:9\"
    priorities:
      normal: { concurrency: 8, queue: 8, queue_timeout: 10s }
operations:
  deadline:
    upstream: clay
    request: { method: GET, path: /v1/slow }
    timeout: 200ms
    deadline: 300ms
    retry: { max_attempts: 3, backoff: { initial: 10ms, max: 10ms, jitter: none }, on: [timeout] }
";

#[tokio::test(start_paused = true)]
async fn the_deadline_ends_the_call_at_the_deadline_on_the_paused_clock() {
    let script = Script::new();
    script.always(Step::Hang);
    let rig = in_process(DEADLINE, &script, None).await;
    let started = tokio::time::Instant::now();
    let answer = rig.invoke("deadline", json!({})).await;
    let elapsed = started.elapsed();
    let body = answer.json();
    assert_eq!(answer.status, 504, "{body:#}");
    assert_eq!(answer.content_type(), "application/problem+json");
    assert_eq!(body["code"], "deadline_exceeded", "{body:#}");
    assert_eq!(body["outcome"], "failed");
    // Attempt 1 times out at 200ms, the back-off is 10ms, attempt 2 starts
    // at 210ms and the deadline cuts it at 300ms: two attempts, not three.
    assert_eq!(body["meta"]["attempts"], 2, "{body:#}");
    assert_eq!(script.hits(), 2);
    assert!(
        elapsed >= Duration::from_millis(300) && elapsed < Duration::from_millis(305),
        "ended at the deadline: {elapsed:?}"
    );
    let latency = body["meta"]["latency_ms"].as_f64().unwrap_or(-1.0);
    assert!(
        (300.0..305.0).contains(&latency),
        "meta.latency_ms {latency}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_500_is_502_and_a_404_passes_through() {
    let (fake, server) = rig().await;
    fake.then([
        Behavior::status(500, r#"{"error":"boom"}"#),
        Behavior::status(404, r#"{"error":"no such company"}"#),
    ]);
    let response = server
        .invoke("echo", json!({"email": "ada@example.com"}))
        .await;
    let (_, body) = problem(response, 502, "upstream_status").await;
    assert_eq!(body["upstream"]["status"], 500, "{body}");
    assert_eq!(body["upstream"]["body"], json!({"error": "boom"}));

    let response = server
        .invoke("company", json!({"domain": "nowhere.example"}))
        .await;
    let (_, body) = problem(response, 404, "upstream_status").await;
    assert_eq!(body["upstream"]["status"], 404, "{body}");
    assert_eq!(
        body["upstream"]["body"],
        json!({"error": "no such company"})
    );
    assert_eq!(
        fake.seen()[1].path_and_query,
        "/v1/companies/nowhere.example"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_call_is_served_from_the_fallback_cache() {
    let (fake, server) = rig().await;
    fake.then([Behavior::ok(r#"{"name":"Acme"}"#)]);
    let params = json!({"domain": "acme.com"});
    let (headers, body) = envelope(server.invoke("company", params.clone()).await, 200).await;
    assert_eq!(body["status"], "ok");
    assert!(headers.get("x-claygate-staleness").is_none());

    fake.always(Behavior::status(503, r#"{"error":"down"}"#));
    let (headers, body) = envelope(server.invoke("company", params).await, 200).await;
    assert_eq!(body["status"], "fallback", "{body}");
    assert_eq!(body["data"], json!({"name": "Acme"}));
    assert_eq!(
        headers
            .get("x-claygate-staleness")
            .and_then(|v| v.to_str().ok()),
        Some("fresh")
    );
    let meta = &body["meta"];
    assert_eq!(meta["fallback"], true);
    assert_eq!(meta["staleness"], "fresh");
    assert_eq!(meta["upstream_status"], 200);
    assert!(meta["age_ms"].as_u64().is_some(), "{meta}");
    assert_eq!(meta["cause"]["code"], "upstream_status");
    assert_eq!(fake.hits(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_lettered_call_is_202_with_location() {
    let (fake, server) = rig().await;
    fake.always(Behavior::status(503, r#"{"error":"busy"}"#));
    let params = json!({"table_id": "t1", "row": {"email": "ada@example.com"}});
    let response = server.invoke("push_row", params.clone()).await;
    let (headers, body) = envelope(response, 202).await;
    assert_eq!(body["status"], "queued", "{body}");
    assert_eq!(body["data"], Value::Null);
    let id = body["meta"]["dlq_id"].as_i64().expect("a dlq id");
    assert_eq!(
        headers.get("location").and_then(|v| v.to_str().ok()),
        Some(format!("/v1/dlq/{id}").as_str())
    );
    assert_eq!(body["meta"]["cause"]["code"], "upstream_status");
    let entry = server
        .server
        .state()
        .runtime()
        .store
        .dlq_get(id)
        .await
        .expect("store")
        .expect("the entry");
    assert_eq!(entry.state, DlqState::Pending);
    assert_eq!(entry.params, params);

    // The same call again is the same dead letter, not a second one.
    let response = server.invoke("push_row", params).await;
    let (headers, body) = envelope(response, 202).await;
    assert_eq!(body["meta"]["dlq_id"], id);
    assert_eq!(
        headers
            .get("idempotent-replayed")
            .and_then(|v| v.to_str().ok()),
        Some("true")
    );
    assert_eq!(fake.hits(), 1);
}

/// Every route of the API (from its OpenAPI description), with sample path params.
fn every_route() -> Vec<(reqwest::Method, String)> {
    let api = serde_json::to_value(claygate::admin::openapi()).expect("OpenAPI as JSON");
    let mut routes = Vec::new();
    for (path, item) in api["paths"].as_object().expect("paths") {
        let concrete = path
            .replace("{name}", "echo")
            .replace("{id}", "999999")
            .replace("{operation}", "echo");
        for method in ["get", "post", "put", "delete", "patch"] {
            if item.get(method).is_some() {
                let m =
                    reqwest::Method::from_bytes(method.to_uppercase().as_bytes()).expect("method");
                routes.push((m, concrete.clone()));
            }
        }
    }
    routes.push((reqwest::Method::GET, "/openapi.json".into()));
    routes
}

fn is_open(path: &str) -> bool {
    path == "/health" || path.starts_with("/health/") || path == "/metrics"
}

// Current-thread, so the capturing subscriber (a thread default) sees the
// server's tasks too.
#[tokio::test]
async fn with_a_token_every_endpoint_but_health_and_metrics_needs_it() {
    let (logs, _guard) = capture_logs(tracing::Level::TRACE);

    let (fake, server) = rig_with(Options {
        token: Some(TOKEN.into()),
        ..Options::default()
    })
    .await;
    fake.always(Behavior::ok(r#"{"name":"Ada"}"#));
    let mut seen_text = String::new();
    let routes = every_route();
    assert!(
        routes.iter().any(|(_, p)| p.ends_with("/invoke")),
        "the invoke route is described: {routes:?}"
    );
    for (method, path) in &routes {
        let url = server.url(path);
        for bad in [
            None,
            Some("Bearer wrong-token"),
            Some(TOKEN),
            Some("Basic Zm9vOmJhcg=="),
        ] {
            let mut request = server
                .client
                .request(method.clone(), &url)
                .header("content-type", "application/json")
                .body("{}");
            if let Some(auth) = bad {
                request = request.header("authorization", auth);
            }
            let response = request.send().await.expect("request");
            let status = response.status().as_u16();
            let headers = response.headers().clone();
            if is_open(path) {
                assert_ne!(status, 401, "{method} {path} is open");
                continue;
            }
            assert_eq!(status, 401, "{method} {path} with {bad:?}");
            assert_eq!(
                headers
                    .get("www-authenticate")
                    .and_then(|v| v.to_str().ok()),
                Some("Bearer"),
                "{method} {path}"
            );
            seen_text.push_str(&format!("{headers:?}"));
            let (_, body) = problem(response, 401, "unauthorized").await;
            seen_text.push_str(&body.to_string());
        }
    }

    let authed = |method: reqwest::Method, path: &str| {
        server
            .client
            .request(method, server.url(path))
            .header("authorization", format!("Bearer {TOKEN}"))
    };
    // With the token, the protected endpoints answer.
    for (method, path) in &routes {
        if is_open(path) || path.ends_with("/events") {
            continue;
        }
        let response = authed(method.clone(), path)
            .header("content-type", "application/json")
            .body("{}")
            .send()
            .await
            .expect("request");
        assert_ne!(
            response.status().as_u16(),
            401,
            "{method} {path} with the token"
        );
        seen_text.push_str(&format!("{:?}", response.headers()));
        seen_text.push_str(&response.text().await.unwrap_or_default());
    }
    let response = authed(reqwest::Method::POST, "/v1/operations/echo/invoke")
        .json(&json!({"email": "ada@example.com"}))
        .send()
        .await
        .expect("invoke");
    let (headers, body) = envelope(response, 200).await;
    assert_eq!(body["data"], json!({"name": "Ada"}));
    seen_text.push_str(&format!("{headers:?}{body}"));
    // The scheme is case-insensitive (RFC 9110); the token is not.
    for scheme in ["bearer", "BEARER", "BeArEr"] {
        let response = server
            .client
            .get(server.url("/v1/operations"))
            .header("authorization", format!("{scheme} {TOKEN}"))
            .send()
            .await
            .expect("GET");
        assert_eq!(response.status().as_u16(), 200, "scheme {scheme}");
    }
    let response = server
        .client
        .get(server.url("/v1/operations"))
        .header("authorization", format!("Bearer {}", TOKEN.to_uppercase()))
        .send()
        .await
        .expect("GET");
    problem(response, 401, "unauthorized").await;
    let response = authed(reqwest::Method::GET, "/openapi.json")
        .send()
        .await
        .expect("openapi");
    assert_eq!(response.status().as_u16(), 200);
    seen_text.push_str(&response.text().await.unwrap_or_default());

    // Health and metrics never ask for it.
    for path in ["/health", "/health/live", "/health/ready", "/metrics"] {
        let response = server
            .client
            .get(server.url(path))
            .send()
            .await
            .expect("GET");
        assert_ne!(response.status().as_u16(), 401, "{path} is open");
        seen_text.push_str(&response.text().await.unwrap_or_default());
    }
    // A token-less client cannot reach the upstream through invoke.
    let hits = fake.hits();
    let response = server
        .invoke("echo", json!({"email": "ada@example.com"}))
        .await;
    problem(response, 401, "unauthorized").await;
    assert_eq!(fake.hits(), hits);

    assert!(!seen_text.is_empty());
    assert!(!seen_text.contains(TOKEN), "the token appears in an answer");
    // (A thread-scoped subscriber may miss an event that another test's
    // thread registered first; `serve::json_logs_…` checks a real process.)
    let logs = logs.text();
    assert!(!logs.is_empty(), "the logs were captured");
    assert!(
        !logs.contains(TOKEN),
        "the token appears in the logs:\n{logs}"
    );
    // Nor does the upstream's secret header.
    assert!(
        !logs.contains("test-secret-key"),
        "an upstream secret in the logs"
    );
    assert!(
        !seen_text.contains("test-secret-key"),
        "an upstream secret in an answer"
    );
}
