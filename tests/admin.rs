//! The admin API beyond invoke, over real HTTP (an in-process `claygate
//! serve` on 127.0.0.1:0 against a fake upstream): operations, breakers,
//! the DLQ, policies, the event stream, and the OpenAPI document.

use std::sync::Arc;
use std::time::Duration;

use reqwest::header::HeaderMap;
use serde_json::{Value, json};
use tokio::time::Instant;

use crate::support::server::{Options, TestServer, UPSTREAM, start};
use crate::support::upstream::{Behavior, FakeUpstream};

/// Operations under test: a plain GET, and two operations with a DLQ whose
/// first redrive is an hour away (so only the tests' replays send them).
const OPERATIONS: &str = "version: 1
operations:
  lookup:
    upstream: clay
    request: { method: GET, path: /v1/lookup, headers: { X-Api-Key: \"op-header-secret\" } }
    retry: { max_attempts: 1 }
    breaker: { volume_threshold: 1000, reset_timeout: 30s }
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
    idempotency: { key: [table_id, row] }
    dlq: { max_attempts: 3, backoff: { initial: 1h, max: 2h, jitter: none } }
  push_event:
    upstream: clay
    request: { method: POST, path: /v1/events, body: \"{{ params.event }}\" }
    params_schema: { type: object, required: [event], properties: { event: { type: object } } }
    retry: { max_attempts: 1 }
    breaker: { volume_threshold: 1000 }
    dlq: { max_attempts: 3, backoff: { initial: 1h, max: 2h, jitter: none } }
";

/// Secrets of the policies above: none may appear in any answer.
const SECRETS: [&str; 2] = ["test-secret-key", "op-header-secret"];

/// Longest any wait of these tests polls or reads a stream.
const PATIENCE: Duration = Duration::from_secs(10);

async fn rig() -> (FakeUpstream, TestServer) {
    let fake = FakeUpstream::start().await;
    let server = start(
        &[("clay.yaml", UPSTREAM), ("ops.yaml", OPERATIONS)],
        &fake.url(),
        Options::default(),
    )
    .await;
    (fake, server)
}

/// Sends `request` and answers status, headers and the body text.
async fn send(request: reqwest::RequestBuilder) -> (u16, HeaderMap, String) {
    let response = request.send().await.expect("request sent");
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    (status, headers, response.text().await.expect("a body"))
}

/// Checks a JSON answer's status and content type; answers the body.
async fn json_answer(request: reqwest::RequestBuilder, status: u16) -> Value {
    let (got, headers, text) = send(request).await;
    assert_eq!(got, status, "status; body: {text}");
    assert_eq!(
        headers.get("content-type").and_then(|v| v.to_str().ok()),
        Some("application/json"),
        "content type; body: {text}"
    );
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("JSON ({e}): {text}"))
}

/// Checks a problem document: status, content type, `code`, a detail and
/// the same text as `message`.
async fn problem(request: reqwest::RequestBuilder, status: u16, code: &str) -> (HeaderMap, Value) {
    let (got, headers, text) = send(request).await;
    let body: Value = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("a problem document ({e}): {got} {text}"));
    assert_eq!(got, status, "status; body: {body:#}");
    assert_eq!(
        headers.get("content-type").and_then(|v| v.to_str().ok()),
        Some("application/problem+json"),
        "content type: {body:#}"
    );
    assert_eq!(body["code"], code, "code: {body:#}");
    assert_eq!(body["status"], status, "status member: {body:#}");
    assert!(
        body["detail"].as_str().is_some_and(|d| !d.is_empty()),
        "a detail: {body:#}"
    );
    assert_eq!(body["message"], body["detail"], "a message: {body:#}");
    (headers, body)
}

fn get(server: &TestServer, path: &str) -> reqwest::RequestBuilder {
    server.client.get(server.url(path))
}

fn post(server: &TestServer, path: &str) -> reqwest::RequestBuilder {
    server.client.post(server.url(path))
}

fn operation<'a>(list: &'a Value, name: &str) -> &'a Value {
    list["operations"]
        .as_array()
        .and_then(|ops| ops.iter().find(|o| o["name"] == name))
        .unwrap_or_else(|| panic!("operation {name} in {list:#}"))
}

fn setting<'a>(detail: &'a Value, layer: &str, name: &str) -> &'a Value {
    detail["layers"]
        .as_array()
        .and_then(|ls| ls.iter().find(|l| l["layer"] == layer))
        .and_then(|l| l["settings"].as_array())
        .and_then(|ss| ss.iter().find(|s| s["name"] == name))
        .map_or(&Value::Null, |s| &s["value"])
}

fn assert_no_secret(what: &str, text: &str) {
    for secret in SECRETS {
        assert!(
            !text.contains(secret),
            "{what} shows the secret `{secret}`: {text}"
        );
    }
}

/// Invokes `push_row` (failing upstream): answers the dead letter's id.
async fn dead_letter(server: &TestServer, operation: &str, params: Value) -> i64 {
    let body = json_answer(
        post(server, &format!("/v1/operations/{operation}/invoke")).json(&params),
        202,
    )
    .await;
    assert_eq!(body["status"], "queued", "{body:#}");
    body["meta"]["dlq_id"]
        .as_i64()
        .unwrap_or_else(|| panic!("a dlq id: {body:#}"))
}

fn ids(page: &Value) -> Vec<i64> {
    page["entries"]
        .as_array()
        .unwrap_or_else(|| panic!("entries: {page:#}"))
        .iter()
        .map(|e| e["id"].as_i64().expect("an id"))
        .collect()
}

#[tokio::test]
async fn operations_list_and_detail_show_policy_and_live_stats_without_secrets() {
    let (fake, server) = rig().await;
    fake.always(Behavior::status(503, r#"{"error":"down"}"#));
    dead_letter(
        &server,
        "push_row",
        json!({"table_id": "t1", "row": {"n": 1}}),
    )
    .await;

    let list = json_answer(get(&server, "/v1/operations"), 200).await;
    let names: Vec<&str> = list["operations"]
        .as_array()
        .expect("operations")
        .iter()
        .filter_map(|o| o["name"].as_str())
        .collect();
    assert_eq!(names, ["lookup", "push_event", "push_row"], "{list:#}");
    assert_eq!(
        list["generation"].as_str().map(str::len),
        Some(64),
        "{list:#}"
    );

    let lookup = operation(&list, "lookup");
    assert_eq!(lookup["upstream"], "clay");
    assert_eq!(lookup["method"], "GET");
    assert_eq!(lookup["path"], "/v1/lookup");
    assert_eq!(lookup["priority"], "normal");
    assert_eq!(
        lookup["attempt_timeout_ms"], 2000,
        "the `request` class: {lookup:#}"
    );
    assert_eq!(lookup["connect_timeout_ms"], 1000);
    assert_eq!(lookup["deadline_ms"], Value::Null);
    assert_eq!(lookup["max_attempts"], 1);
    assert_eq!(
        (&lookup["idempotency"], &lookup["fallback"], &lookup["dlq"]),
        (&json!(false), &json!(false), &json!(false))
    );
    assert_eq!(lookup["breaker"], "closed");
    let bulkhead = &lookup["stats"]["bulkhead"];
    assert_eq!(
        bulkhead["classes"]["normal"]["concurrency"], 4,
        "{bulkhead:#}"
    );
    assert_eq!(bulkhead["classes"]["bulk"]["queue"], 1, "{bulkhead:#}");
    assert_eq!(bulkhead["in_use"], 0, "{bulkhead:#}");
    assert_eq!(
        lookup["stats"]["rate_limit"],
        json!({"per_second": null, "burst": null, "available_tokens": null, "gate_closed_for_ms": null}),
        "no `rate_limit`: only the quota gate acts"
    );
    assert_eq!(
        lookup["stats"]["dlq"],
        json!({"pending": 0, "parked": 0, "delivered": 0})
    );

    let push = operation(&list, "push_row");
    assert_eq!(push["path"], "/v1/tables/{{ params.table_id }}/rows");
    assert_eq!(push["priority"], "bulk");
    assert_eq!(
        (&push["idempotency"], &push["dlq"]),
        (&json!(true), &json!(true))
    );
    assert_eq!(
        push["stats"]["dlq"]["pending"], 1,
        "the dead letter above: {push:#}"
    );

    let detail = json_answer(get(&server, "/v1/operations/push_row"), 200).await;
    assert_eq!(detail["name"], "push_row");
    assert_eq!(detail["stats"]["dlq"]["pending"], 1);
    assert!(
        detail["defined_at"]
            .as_str()
            .is_some_and(|d| d.contains("ops.yaml:")),
        "file:line:col of the definition: {detail:#}"
    );
    let layers: Vec<&str> = detail["layers"]
        .as_array()
        .expect("layers")
        .iter()
        .filter_map(|l| l["layer"].as_str())
        .collect();
    assert_eq!(
        layers,
        [
            "idempotency",
            "fallback",
            "deadline",
            "retry",
            "breaker",
            "bulkhead",
            "rate_limit",
            "timeout",
            "http",
            "dlq"
        ],
        "explain's layers, outermost first"
    );
    assert_eq!(setting(&detail, "dlq", "max_attempts"), "3");
    assert_eq!(setting(&detail, "breaker", "volume_threshold"), "1000");
    assert_eq!(setting(&detail, "bulkhead", "priority"), "bulk");
    assert_eq!(detail["breaker_detail"]["state"], "closed");
    assert_eq!(detail["breaker_detail"]["config"]["volume_threshold"], 1000);

    let lookup = json_answer(get(&server, "/v1/operations/lookup"), 200).await;
    let headers = setting(&lookup, "http", "headers")
        .as_str()
        .expect("header names");
    assert!(
        headers.contains("Authorization") && headers.contains("X-Api-Key"),
        "header names are listed: {headers}"
    );

    problem(
        get(&server, "/v1/operations/nope"),
        404,
        "unknown_operation",
    )
    .await;

    // No secret in anything the API answers.
    for path in [
        "/v1/operations",
        "/v1/operations/lookup",
        "/v1/operations/push_row",
        "/v1/operations/push_event",
        "/v1/breakers",
        "/v1/dlq",
        "/v1/policies",
        "/openapi.json",
    ] {
        let (status, _, text) = send(get(&server, path)).await;
        assert_eq!(status, 200, "{path}: {text}");
        assert_no_secret(path, &text);
    }
    for (path, body) in [
        ("/v1/policies/reload?dry_run=true", None),
        ("/v1/policies/reload", None),
        ("/v1/breakers/lookup/reset", None),
        ("/v1/policies/validate", Some("version: 1\n")),
    ] {
        let mut request = post(&server, path);
        if let Some(body) = body {
            request = request
                .header("content-type", "application/yaml")
                .body(body);
        }
        let (status, _, text) = send(request).await;
        assert_eq!(status, 200, "{path}: {text}");
        assert_no_secret(path, &text);
    }
}

#[tokio::test]
async fn a_forced_open_breaker_fails_fast_until_reset() {
    let (fake, server) = rig().await;
    fake.always(Behavior::ok(r#"{"found":true}"#));

    let list = json_answer(get(&server, "/v1/breakers"), 200).await;
    let breakers = list["breakers"].as_array().expect("breakers");
    assert_eq!(breakers.len(), 3, "one per operation: {list:#}");
    let lookup = breakers
        .iter()
        .find(|b| b["operation"] == "lookup")
        .expect("lookup's breaker");
    assert_eq!(lookup["state"], "closed");
    assert_eq!(lookup["mode"], "enforce");
    assert_eq!(lookup["reset_timeout_ms"], 30_000);
    assert_eq!(lookup["config"]["reset_timeout_ms"], 30_000);
    assert_eq!(
        lookup["window"],
        json!({"calls": 0, "successes": 0, "failures": 0, "slow": 0})
    );
    assert!(
        lookup["since"]
            .as_u64()
            .is_some_and(|s| s > 1_600_000_000_000),
        "{lookup:#}"
    );

    let ok = json_answer(post(&server, "/v1/operations/lookup/invoke"), 200).await;
    assert_eq!(ok["status"], "ok");
    assert_eq!(fake.hits(), 1);

    let opened = json_answer(post(&server, "/v1/breakers/lookup/open"), 200).await;
    assert_eq!(opened["operation"], "lookup");
    assert_eq!(opened["state"], "forced_open");
    assert_eq!(
        opened["window"]["calls"], 1,
        "forcing open keeps the window: {opened:#}"
    );

    let (headers, body) = problem(
        post(&server, "/v1/operations/lookup/invoke"),
        503,
        "breaker_open",
    )
    .await;
    let retry_after: u64 = headers
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("a Retry-After: {headers:?} {body:#}"));
    assert!((1..=30).contains(&retry_after), "Retry-After {retry_after}");
    assert_eq!(body["outcome"], "failed", "{body:#}");
    assert_eq!(
        fake.hits(),
        1,
        "an open breaker does not reach the upstream"
    );
    let list = json_answer(get(&server, "/v1/breakers"), 200).await;
    let lookup = list["breakers"]
        .as_array()
        .and_then(|b| b.iter().find(|b| b["operation"] == "lookup"))
        .expect("lookup's breaker");
    assert_eq!(lookup["state"], "forced_open");
    assert_eq!(lookup["rejected"], 1, "{lookup:#}");

    let closed = json_answer(post(&server, "/v1/breakers/lookup/close"), 200).await;
    assert_eq!(closed["state"], "forced_closed");

    let reset = json_answer(post(&server, "/v1/breakers/lookup/reset"), 200).await;
    assert_eq!(reset["state"], "closed");
    assert_eq!(
        reset["window"]["calls"], 0,
        "reset empties the window: {reset:#}"
    );

    let ok = json_answer(post(&server, "/v1/operations/lookup/invoke"), 200).await;
    assert_eq!(ok["status"], "ok");
    assert_eq!(fake.hits(), 2);

    for action in ["open", "close", "reset"] {
        problem(
            post(&server, &format!("/v1/breakers/nope/{action}")),
            404,
            "unknown_operation",
        )
        .await;
    }
    problem(
        post(&server, "/v1/breakers/lookup/explode"),
        404,
        "not_found",
    )
    .await;
    problem(
        get(&server, "/v1/breakers/lookup/open"),
        405,
        "method_not_allowed",
    )
    .await;
}

#[tokio::test]
async fn dead_letters_list_filter_page_get_replay_and_delete() {
    let (fake, server) = rig().await;
    fake.always(Behavior::status(503, r#"{"error":"down"}"#));
    let mut rows = Vec::new();
    for n in 0..3 {
        rows.push(
            dead_letter(
                &server,
                "push_row",
                json!({"table_id": "t1", "row": {"n": n}}),
            )
            .await,
        );
    }
    let event = dead_letter(&server, "push_event", json!({"event": {"kind": "signup"}})).await;
    let all: Vec<i64> = rows.iter().copied().chain([event]).collect();

    // Listing and filters.
    let page = json_answer(get(&server, "/v1/dlq"), 200).await;
    assert_eq!(ids(&page), all, "{page:#}");
    assert_eq!(page["next_after"], Value::Null);
    let first = &page["entries"][0];
    assert_eq!(first["operation"], "push_row");
    assert_eq!(first["state"], "pending");
    assert_eq!(first["error_code"], "upstream_status");
    assert_eq!(first["params"], json!({"table_id": "t1", "row": {"n": 0}}));
    assert_eq!(first["call_attempts"], 1);
    assert_eq!(first["redrive_attempts"], 0);
    assert_eq!(first["priority"], "bulk");
    assert!(
        first["idempotency_key"]
            .as_str()
            .is_some_and(|k| k.len() == 64),
        "{first:#}"
    );
    let pending_for = first["next_attempt_at"].as_i64().unwrap_or(0)
        - first["last_attempt_at"].as_i64().unwrap_or(0);
    assert!(
        (3_599_000..=3_601_000).contains(&pending_for),
        "the first redrive is the back-off's first step away: {pending_for}ms"
    );

    let by_op = json_answer(get(&server, "/v1/dlq?operation=push_row"), 200).await;
    assert_eq!(ids(&by_op), rows);
    let by_op = json_answer(
        get(&server, "/v1/dlq?operation=push_event&state=pending"),
        200,
    )
    .await;
    assert_eq!(ids(&by_op), [event]);
    let parked = json_answer(get(&server, "/v1/dlq?state=parked"), 200).await;
    assert_eq!(ids(&parked), Vec::<i64>::new());
    let by_code = json_answer(get(&server, "/v1/dlq?error_code=upstream_status"), 200).await;
    assert_eq!(ids(&by_code), all);
    let by_code = json_answer(get(&server, "/v1/dlq?error_code=breaker_open"), 200).await;
    assert_eq!(ids(&by_code), Vec::<i64>::new());

    // Pages of two, followed by `next_after` to the end.
    let mut seen = Vec::new();
    let mut after: Option<i64> = None;
    for _ in 0..5 {
        let path = match after {
            None => "/v1/dlq?limit=2".to_owned(),
            Some(a) => format!("/v1/dlq?limit=2&after={a}"),
        };
        let page = json_answer(get(&server, &path), 200).await;
        let got = ids(&page);
        assert!(got.len() <= 2, "{page:#}");
        seen.extend(got);
        match page["next_after"].as_i64() {
            Some(a) => after = Some(a),
            None => break,
        }
    }
    assert_eq!(seen, all, "paging yields every entry once, in id order");

    // Bad queries.
    for query in [
        "state=bogus",
        "state=",
        "limit=0",
        "limit=501",
        "limit=ten",
        "after=-1",
        "after=x",
        "operaton=push_row",
        "state=pending&state=parked",
        "operation=",
    ] {
        let (_, body) = problem(get(&server, &format!("/v1/dlq?{query}")), 400, "bad_query").await;
        assert!(body["detail"].as_str().is_some(), "{query}: {body:#}");
    }
    let max = json_answer(get(&server, "/v1/dlq?limit=500"), 200).await;
    assert_eq!(ids(&max).len(), 4);

    // One entry.
    let one = json_answer(get(&server, &format!("/v1/dlq/{event}")), 200).await;
    assert_eq!(one["id"], event);
    assert_eq!(one["operation"], "push_event");
    assert_eq!(one["params"], json!({"event": {"kind": "signup"}}));
    problem(get(&server, "/v1/dlq/999999"), 404, "dead_letter_not_found").await;
    problem(get(&server, "/v1/dlq/abc"), 400, "bad_id").await;

    // Replay one now: still failing, then delivered, then never again.
    let hits = fake.hits();
    let replayed = json_answer(post(&server, &format!("/v1/dlq/{}/replay", rows[0])), 200).await;
    assert_eq!(fake.hits(), hits + 1, "a replay sends the entry now");
    assert_eq!(replayed["id"], rows[0]);
    assert_eq!(replayed["state"], "pending", "{replayed:#}");
    assert_eq!(replayed["redrive_attempts"], 1, "{replayed:#}");
    assert_eq!(replayed["error_code"], "upstream_status");

    fake.always(Behavior::ok(r#"{"stored":true}"#));
    let delivered = json_answer(post(&server, &format!("/v1/dlq/{}/replay", rows[0])), 200).await;
    assert_eq!(delivered["state"], "delivered", "{delivered:#}");
    assert_eq!(delivered["delivered_status"], 200);
    assert_eq!(delivered["redrive_attempts"], 2);
    let seen = fake.seen();
    let last = seen.last().expect("the replay reached the upstream");
    assert_eq!(last.path_and_query, "/v1/tables/t1/rows");
    assert_eq!(
        last.headers
            .get("idempotency-key")
            .and_then(|v| v.to_str().ok()),
        delivered["idempotency_key"].as_str(),
        "the redrive forwards the entry's idempotency key"
    );
    let hits = fake.hits();
    problem(
        post(&server, &format!("/v1/dlq/{}/replay", rows[0])),
        409,
        "dlq_already_delivered",
    )
    .await;
    assert_eq!(fake.hits(), hits, "a delivered entry is never sent again");
    problem(
        post(&server, "/v1/dlq/999999/replay"),
        404,
        "dead_letter_not_found",
    )
    .await;
    problem(post(&server, "/v1/dlq/0/replay"), 400, "bad_id").await;
    let delivered = json_answer(get(&server, "/v1/dlq?state=delivered"), 200).await;
    assert_eq!(ids(&delivered), [rows[0]]);

    // Delete.
    let (status, _, text) = send(
        server
            .client
            .delete(server.url(&format!("/v1/dlq/{}", rows[1]))),
    )
    .await;
    assert_eq!((status, text.as_str()), (204, ""));
    problem(
        get(&server, &format!("/v1/dlq/{}", rows[1])),
        404,
        "dead_letter_not_found",
    )
    .await;
    problem(
        server
            .client
            .delete(server.url(&format!("/v1/dlq/{}", rows[1]))),
        404,
        "dead_letter_not_found",
    )
    .await;

    // Replay by filter: the filter must be explicit and well formed.
    for body in [
        json!({}),
        json!({"all": false}),
        json!({"all": true, "operation": "push_row"}),
        json!({"state": "bogus"}),
        json!({"operaton": "push_row"}),
        json!({"operation": ""}),
        json!({"operation": 7}),
        json!([]),
    ] {
        problem(
            post(&server, "/v1/dlq/replay").json(&body),
            400,
            "bad_filter",
        )
        .await;
    }
    problem(
        post(&server, "/v1/dlq/replay")
            .header("content-type", "application/json")
            .body("{"),
        400,
        "bad_filter",
    )
    .await;
    problem(
        post(&server, "/v1/dlq/replay")
            .header("content-type", "text/plain")
            .body("all"),
        415,
        "unsupported_media_type",
    )
    .await;
    let none = json_answer(
        post(&server, "/v1/dlq/replay")
            .json(&json!({"operation": "push_row", "state": "delivered"})),
        200,
    )
    .await;
    assert_eq!(
        none,
        json!({"requeued": 0}),
        "delivered entries are never requeued"
    );

    // Requeue push_row's last pending entry: the worker delivers it.
    let requeued = json_answer(
        post(&server, "/v1/dlq/replay").json(&json!({"operation": "push_row"})),
        200,
    )
    .await;
    assert_eq!(requeued, json!({"requeued": 1}));
    wait_until_delivered(&server, rows[2]).await;
    let requeued = json_answer(
        post(&server, "/v1/dlq/replay").json(&json!({"all": true})),
        200,
    )
    .await;
    assert_eq!(
        requeued,
        json!({"requeued": 1}),
        "push_event's entry is the only one left pending"
    );
    wait_until_delivered(&server, event).await;
    let pending = json_answer(get(&server, "/v1/dlq?state=pending"), 200).await;
    assert_eq!(ids(&pending), Vec::<i64>::new());
}

/// Polls dead letter `id` until the redrive worker delivered it.
async fn wait_until_delivered(server: &TestServer, id: i64) {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let entry = json_answer(get(server, &format!("/v1/dlq/{id}")), 200).await;
        if entry["state"] == "delivered" {
            assert_eq!(entry["delivered_status"], 200, "{entry:#}");
            return;
        }
        assert!(
            Instant::now() < deadline,
            "entry {id} was not redriven: {entry:#}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// One server-sent event.
#[derive(Debug, Default)]
struct Frame {
    event: Option<String>,
    id: Option<u64>,
    data: String,
    retry: Option<u64>,
    comments: Vec<String>,
}

impl Frame {
    fn json(&self) -> Value {
        serde_json::from_str(&self.data).unwrap_or_else(|e| panic!("JSON data ({e}): {self:?}"))
    }
}

/// Reads server-sent events from a streaming response.
struct Events {
    response: reqwest::Response,
    buffer: String,
}

impl Events {
    async fn open(server: &TestServer) -> Events {
        let response = get(server, "/v1/events").send().await.expect("subscribe");
        assert_eq!(response.status().as_u16(), 200);
        assert_eq!(
            response
                .headers()
                .get("content-type")
                .and_then(|v| v.to_str().ok()),
            Some("text/event-stream")
        );
        Events {
            response,
            buffer: String::new(),
        }
    }

    /// The next event, or a panic after `PATIENCE`.
    async fn next(&mut self) -> Frame {
        let deadline = Instant::now() + PATIENCE;
        loop {
            if let Some(end) = self.buffer.find("\n\n") {
                let block: String = self.buffer.drain(..end + 2).collect();
                return parse_frame(&block);
            }
            let chunk = tokio::time::timeout_at(deadline, self.response.chunk())
                .await
                .unwrap_or_else(|_| {
                    panic!("no event within {PATIENCE:?}; buffered: {:?}", self.buffer)
                })
                .expect("the stream reads")
                .expect("the stream stays open");
            self.buffer.push_str(&String::from_utf8_lossy(&chunk));
        }
    }

    /// Skips events until one of type `kind` satisfying `check`.
    async fn next_of(&mut self, kind: &str, check: impl Fn(&Value) -> bool) -> Value {
        self.next_frame_of(kind, check).await.json()
    }

    /// [`next_of`](Self::next_of), answering the whole frame.
    async fn next_frame_of(&mut self, kind: &str, check: impl Fn(&Value) -> bool) -> Frame {
        let mut skipped = Vec::new();
        for _ in 0..200 {
            let frame = self.next().await;
            if frame.event.as_deref() == Some(kind) {
                let data = frame.json();
                assert_eq!(data["type"], kind, "`event:` is the data's type: {frame:?}");
                if check(&data) {
                    return frame;
                }
            }
            skipped.push(frame);
        }
        panic!("no matching `{kind}` event; saw {skipped:#?}");
    }
}

fn parse_frame(block: &str) -> Frame {
    let mut frame = Frame::default();
    for line in block.lines() {
        let (field, value) = line.split_once(':').unwrap_or((line, ""));
        let value = value.strip_prefix(' ').unwrap_or(value);
        match field {
            "" => frame.comments.push(value.to_owned()),
            "event" => frame.event = Some(value.to_owned()),
            "id" => frame.id = value.parse().ok(),
            "data" => {
                if !frame.data.is_empty() {
                    frame.data.push('\n');
                }
                frame.data.push_str(value);
            }
            "retry" => frame.retry = value.parse().ok(),
            _ => {}
        }
    }
    frame
}

#[tokio::test]
async fn the_event_stream_carries_breaker_transitions_and_dead_letters() {
    let (fake, server) = rig().await;
    let mut events = Events::open(&server).await;
    let hello = events.next().await;
    assert!(
        hello.retry.is_some_and(|r| r >= 1000),
        "a retry hint first: {hello:?}"
    );
    assert!(
        hello.comments.iter().any(|c| c == "subscribed"),
        "{hello:?}"
    );

    json_answer(post(&server, "/v1/breakers/lookup/open"), 200).await;
    let frame = events
        .next_frame_of("breaker", |e| e["operation"] == "lookup")
        .await;
    let first_id = frame.id.unwrap_or_else(|| panic!("an `id:`: {frame:?}"));
    let transition = frame.json();
    assert_eq!(transition["from"], "closed", "{transition:#}");
    assert_eq!(transition["to"], "forced_open", "{transition:#}");
    assert_eq!(transition["reason"], "force_open", "{transition:#}");
    json_answer(post(&server, "/v1/breakers/lookup/reset"), 200).await;
    let frame = events
        .next_frame_of("breaker", |e| e["operation"] == "lookup")
        .await;
    assert_eq!(
        frame.id,
        Some(first_id + 1),
        "ids grow by one per event: {frame:?}"
    );
    let transition = frame.json();
    assert_eq!(
        (&transition["from"], &transition["to"]),
        (&json!("forced_open"), &json!("closed"))
    );

    fake.always(Behavior::status(502, "{}"));
    let id = dead_letter(&server, "push_event", json!({"event": {"n": 1}})).await;
    let lettered = events.next_of("dead_lettered", |e| e["id"] == id).await;
    assert_eq!(lettered["operation"], "push_event");
    assert_eq!(lettered["error_code"], "upstream_status");

    let reloaded = json_answer(post(&server, "/v1/policies/reload"), 200).await;
    let reload = events.next_of("reload", |_| true).await;
    assert_eq!(reload["applied"], true);
    assert_eq!(reload["generation"], reloaded["generation"]);
}

#[tokio::test]
async fn a_listener_that_falls_behind_hears_how_many_events_it_missed() {
    let (_fake, server) = rig().await;
    let mut events = Events::open(&server).await;
    events.next().await;
    // The test and the server share one thread: while this loop runs
    // without yielding, the stream cannot drain its receiver, which lags.
    let runtime = Arc::clone(server.server.state().runtime());
    let sent: u64 = 1500;
    for n in 0..sent {
        runtime.events.emit(claygate::events::Event::Reload {
            applied: true,
            generation: format!("g{n}"),
            errors: Vec::new(),
            warnings: Vec::new(),
            at: 0,
        });
    }
    let frame = events.next().await;
    assert_eq!(frame.event.as_deref(), Some("lagged"), "{frame:?}");
    assert_eq!(
        frame.id, None,
        "a lagged notice is not an event of the stream"
    );
    let lagged = frame.json();
    let missed = lagged["missed"].as_u64().unwrap_or(0);
    let capacity = claygate::events::CAPACITY as u64;
    assert_eq!(missed, sent - capacity, "{lagged:#}");
    let frame = events.next_frame_of("reload", |_| true).await;
    let next = frame.json();
    assert_eq!(
        next["generation"],
        format!("g{missed}"),
        "the stream goes on with the oldest kept"
    );
    // The ids say so too: the first after the gap counts the missed ones,
    // and the stream is contiguous again from there.
    let after = frame.id.unwrap_or_else(|| panic!("an `id:`: {frame:?}"));
    assert!(
        after > missed,
        "id {after} counts the {missed} missed events"
    );
    let following = events.next_frame_of("reload", |_| true).await;
    assert_eq!(following.id, Some(after + 1), "{following:?}");
}

#[tokio::test]
async fn policies_show_the_generation_and_reload_with_a_plan_and_refusals() {
    let (_fake, server) = rig().await;
    let status = json_answer(get(&server, "/v1/policies"), 200).await;
    let hash = status["generation"]["hash"]
        .as_str()
        .expect("a hash")
        .to_owned();
    assert_eq!(hash.len(), 64);
    let files: Vec<&str> = status["generation"]["files"]
        .as_array()
        .expect("files")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert_eq!(files.len(), 2, "{status:#}");
    assert!(
        files[0].ends_with("clay.yaml") && files[1].ends_with("ops.yaml"),
        "{files:?}"
    );
    assert!(
        status["generation"]["loaded_at"]
            .as_i64()
            .is_some_and(|t| t > 1_600_000_000_000)
    );
    assert!(status["generation"]["duration_ms"].is_u64());
    let history = status["history"].as_array().expect("history");
    assert_eq!(history.len(), 1);
    assert_eq!(history[0]["trigger"], "startup");
    assert_eq!(history[0]["result"], "applied");
    assert_eq!(history[0]["generation"], hash.as_str());

    // A dry run of the same files: all unchanged, everything carried over.
    let plan = json_answer(post(&server, "/v1/policies/reload?dry_run=true"), 200).await;
    assert_eq!(plan["dry_run"], true);
    assert_eq!(plan["files_changed"], false);
    assert_eq!(
        (&plan["serving"], &plan["candidate"]),
        (&json!(hash), &json!(hash))
    );
    assert_eq!(plan["changes"]["lookup"]["status"], "unchanged");
    assert_eq!(
        plan["changes"]["lookup"]["carried"],
        json!({"breaker": true, "retry_budget": true, "bulkhead": true, "rate_limiter": true, "http_client": true})
    );

    // Change lookup's breaker, add one operation, drop push_event.
    let lookup_breaker = "breaker: { volume_threshold: 1000, reset_timeout: 30s }";
    let edited = OPERATIONS
        .replace(lookup_breaker, "breaker: { volume_threshold: 500, reset_timeout: 30s }")
        .replace(
            "  push_event:\n",
            "  extra:\n    upstream: clay\n    request: { method: GET, path: /v1/extra }\n  gone:\n",
        );
    let edited = remove_operation(&edited, "gone");
    std::fs::write(server.policies.join("ops.yaml"), &edited).expect("edit ops.yaml");

    let plan = json_answer(post(&server, "/v1/policies/reload?dry_run=1"), 200).await;
    assert_eq!(plan["files_changed"], true, "{plan:#}");
    assert_ne!(plan["candidate"], json!(hash));
    assert_eq!(plan["changes"]["extra"]["status"], "added", "{plan:#}");
    assert_eq!(
        plan["changes"]["push_event"]["status"], "removed",
        "{plan:#}"
    );
    assert_eq!(plan["changes"]["push_event"].get("carried"), None);
    assert_eq!(plan["changes"]["lookup"]["status"], "changed");
    assert_eq!(
        plan["changes"]["lookup"]["carried"]["breaker"], false,
        "a new breaker: {plan:#}"
    );
    assert_eq!(plan["changes"]["lookup"]["carried"]["bulkhead"], true);
    assert_eq!(plan["changes"]["push_row"]["status"], "unchanged");
    // Nothing was applied.
    let ops = json_answer(get(&server, "/v1/operations"), 200).await;
    assert_eq!(ops["generation"], json!(hash));
    assert!(
        ops["operations"]
            .as_array()
            .is_some_and(|o| o.iter().all(|o| o["name"] != "extra"))
    );
    let status = json_answer(get(&server, "/v1/policies"), 200).await;
    assert_eq!(
        status["history"].as_array().map(Vec::len),
        Some(1),
        "a dry run is not a reload"
    );

    let applied = json_answer(post(&server, "/v1/policies/reload"), 200).await;
    assert_eq!(applied["result"], "applied", "{applied:#}");
    assert_eq!(applied["trigger"], "api");
    assert_eq!(applied["generation"], plan["candidate"]);
    assert_eq!(applied["changes"]["extra"]["status"], "added");
    assert_eq!(applied["errors"], json!([]));
    let new_hash = applied["generation"].as_str().expect("hash").to_owned();
    let ops = json_answer(get(&server, "/v1/operations"), 200).await;
    assert_eq!(ops["generation"], json!(new_hash));
    assert!(
        ops["operations"]
            .as_array()
            .is_some_and(|o| o.iter().any(|o| o["name"] == "extra"))
    );
    json_answer(get(&server, "/v1/operations/extra"), 200).await;
    problem(
        get(&server, "/v1/operations/push_event"),
        404,
        "unknown_operation",
    )
    .await;

    // A broken file is refused with its place; the previous generation serves on.
    let broken = edited.replace(
        "    retry: { max_attempts: 1 }\n    breaker: { volume_threshold: 500",
        "    retyr: { max_attempts: 1 }\n    breaker: { volume_threshold: 500",
    );
    assert_ne!(broken, edited);
    let line = broken
        .lines()
        .position(|l| l.contains("retyr"))
        .expect("the typo")
        + 1;
    std::fs::write(server.policies.join("ops.yaml"), &broken).expect("break ops.yaml");
    for path in ["/v1/policies/reload", "/v1/policies/reload?dry_run=true"] {
        let (_, body) = problem(post(&server, path), 422, "reload_refused").await;
        assert_eq!(body["serving"], json!(new_hash), "{body:#}");
        assert_eq!(body["dry_run"], path.ends_with("dry_run=true"));
        assert!(
            body["detail"]
                .as_str()
                .is_some_and(|d| d.contains("keeps serving")),
            "{body:#}"
        );
        let errors = body["errors"].as_array().expect("errors");
        let typo = errors
            .iter()
            .find(|e| e["code"] == "unknown-field")
            .unwrap_or_else(|| panic!("the unknown field is named: {body:#}"));
        let location = typo["location"].as_str().expect("a location");
        assert!(
            location.ends_with(&format!("ops.yaml:{line}:5")),
            "file:line:col of `retyr`: {location}"
        );
        assert_eq!((&typo["line"], &typo["column"]), (&json!(line), &json!(5)));
    }
    let status = json_answer(get(&server, "/v1/policies"), 200).await;
    assert_eq!(
        status["generation"]["hash"],
        json!(new_hash),
        "the previous generation serves on"
    );
    let history = status["history"].as_array().expect("history");
    assert_eq!(history.len(), 3, "startup, applied, refused: {status:#}");
    assert_eq!(history[0]["result"], "refused", "newest first");
    assert_eq!(history[0]["generation"], json!(new_hash));
    assert_ne!(history[0]["candidate"], json!(new_hash));
    assert!(
        history[0]["errors"]
            .as_array()
            .is_some_and(|e| !e.is_empty())
    );
    assert_eq!(history[1]["result"], "applied");
    assert_eq!(history[2]["trigger"], "startup");
    json_answer(get(&server, "/v1/operations/extra"), 200).await;

    for query in ["dry_run=maybe", "dryrun=true", "dry_run=true&dry_run=false"] {
        problem(
            post(&server, &format!("/v1/policies/reload?{query}")),
            400,
            "bad_query",
        )
        .await;
    }
    problem(
        get(&server, "/v1/policies/reload"),
        405,
        "method_not_allowed",
    )
    .await;
}

/// `text` without the operation `name` (its line and the more indented ones after it).
fn remove_operation(text: &str, name: &str) -> String {
    let mut out = Vec::new();
    let mut skipping = false;
    for line in text.lines() {
        if line == format!("  {name}:") {
            skipping = true;
            continue;
        }
        if skipping && line.starts_with("    ") {
            continue;
        }
        skipping = false;
        out.push(line);
    }
    out.join("\n") + "\n"
}

#[tokio::test]
async fn posted_policy_files_are_validated_against_the_serving_set() {
    let (_fake, server) = rig().await;
    let yaml = |body: &str, query: &str| {
        post(&server, &format!("/v1/policies/validate{query}"))
            .header("content-type", "application/yaml")
            .body(body.to_owned())
    };

    // A new file using the serving upstream is valid.
    let more = "version: 1\noperations:\n  more:\n    upstream: clay\n    request: { method: GET, path: /v1/more }\n";
    let verdict = json_answer(yaml(more, "?name=more.yaml"), 200).await;
    assert_eq!(verdict["valid"], true, "{verdict:#}");
    assert_eq!(verdict["errors"], 0);

    // An unknown upstream: invalid, with file:line:col.
    let bad = "version: 1\noperations:\n  broken:\n    upstream: nowhere\n    request: { method: GET, path: /x }\n";
    let verdict = json_answer(yaml(bad, ""), 200).await;
    assert_eq!(verdict["valid"], false, "{verdict:#}");
    let diagnostic = verdict["diagnostics"]
        .as_array()
        .and_then(|d| d.iter().find(|d| d["code"] == "unknown-upstream"))
        .unwrap_or_else(|| panic!("an unknown-upstream diagnostic: {verdict:#}"));
    assert_eq!(diagnostic["location"], "posted.yaml:4:15", "{diagnostic:#}");
    assert_eq!(diagnostic["severity"], "error");
    assert_eq!(
        (
            &diagnostic["file"],
            &diagnostic["line"],
            &diagnostic["column"]
        ),
        (&json!("posted.yaml"), &json!(4), &json!(15))
    );
    assert_eq!(diagnostic["path"], "operations.broken.upstream");

    // A name defined twice names both places.
    let twice = "version: 1\noperations:\n  lookup:\n    upstream: clay\n    request: { method: GET, path: /x }\n";
    let verdict = json_answer(yaml(twice, "?name=twice.yml"), 200).await;
    assert_eq!(verdict["valid"], false);
    let duplicate = verdict["diagnostics"]
        .as_array()
        .and_then(|d| d.iter().find(|d| d["code"] == "duplicate-name"))
        .unwrap_or_else(|| panic!("a duplicate-name diagnostic: {verdict:#}"));
    let places = format!("{duplicate}");
    assert!(
        places.contains("twice.yml:3:3") && places.contains("ops.yaml:3:3"),
        "{duplicate:#}"
    );

    // JSON: a file named like a serving one replaces it.
    let replaced = OPERATIONS.replace("reset_timeout: 30s", "reset_timeout: 30 seconds");
    let verdict = json_answer(
        post(&server, "/v1/policies/validate").json(&json!({"files": {"ops.yaml": replaced}})),
        200,
    )
    .await;
    assert_eq!(verdict["valid"], false, "{verdict:#}");
    let diagnostics = verdict["diagnostics"].as_array().expect("diagnostics");
    assert!(
        diagnostics
            .iter()
            .all(|d| d["file"].as_str().is_some_and(|f| f.ends_with("ops.yaml"))),
        "only the replaced file is wrong, named as served: {verdict:#}"
    );
    let line7 = replaced.lines().nth(6).expect("line 7");
    let column = line7.find("30 seconds").expect("the bad duration") + 1;
    assert!(
        diagnostics.iter().any(|d| d["code"] == "invalid-duration"
            && d["location"]
                .as_str()
                .is_some_and(|l| l.ends_with(&format!("ops.yaml:7:{column}")))),
        "the bad duration at ops.yaml:7:{column}: {verdict:#}"
    );
    let verdict = json_answer(
        post(&server, "/v1/policies/validate")
            .json(&json!({"files": {"ops.yaml": OPERATIONS, "more.yaml": more}})),
        200,
    )
    .await;
    assert_eq!(verdict["valid"], true, "{verdict:#}");

    // Warnings pass, unless strict.
    let unused = "version: 1\nupstreams:\n  spare:\n    base_url: \"http://127.0.0.1:9\"\n    priorities:\n      normal: { concurrency: 1, queue: 1, queue_timeout: 1s }\n";
    let verdict = json_answer(yaml(unused, "?name=spare.yaml"), 200).await;
    assert_eq!(
        (&verdict["valid"], &verdict["errors"]),
        (&json!(true), &json!(0)),
        "{verdict:#}"
    );
    assert!(
        verdict["warnings"].as_u64().is_some_and(|w| w >= 1),
        "{verdict:#}"
    );
    assert!(
        verdict["diagnostics"].as_array().is_some_and(|d| d
            .iter()
            .any(|d| d["code"] == "unused-upstream" && d["severity"] == "warning")),
        "{verdict:#}"
    );
    let strict = json_answer(yaml(unused, "?name=spare.yaml&strict=true"), 200).await;
    assert_eq!(strict["valid"], false, "{strict:#}");

    // Nothing was applied.
    let status = json_answer(get(&server, "/v1/policies"), 200).await;
    assert_eq!(status["history"].as_array().map(Vec::len), Some(1));
    problem(
        get(&server, "/v1/operations/more"),
        404,
        "unknown_operation",
    )
    .await;

    // Malformed requests.
    problem(yaml(more, "?name=../etc/x.yaml"), 400, "bad_file_name").await;
    problem(yaml(more, "?name=more.txt"), 400, "bad_file_name").await;
    problem(yaml(more, "?nam=more.yaml"), 400, "bad_query").await;
    problem(yaml(more, "?strict=perhaps"), 400, "bad_query").await;
    problem(
        post(&server, "/v1/policies/validate")
            .header("content-type", "application/yaml")
            .body(vec![0xff, 0xfe]),
        400,
        "bad_body",
    )
    .await;
    for body in [
        json!({"files": {}}),
        json!({"file": {"a.yaml": ""}}),
        json!({"files": {"a.yaml": 1}}),
        json!("version: 1"),
    ] {
        problem(
            post(&server, "/v1/policies/validate").json(&body),
            400,
            "bad_body",
        )
        .await;
    }
    problem(
        post(&server, "/v1/policies/validate")
            .json(&json!({"files": {"/abs/a.yaml": "version: 1\n"}})),
        400,
        "bad_file_name",
    )
    .await;
    problem(
        post(&server, "/v1/policies/validate?name=x.yaml")
            .json(&json!({"files": {"a.yaml": "version: 1\n"}})),
        400,
        "bad_query",
    )
    .await;
    problem(
        post(&server, "/v1/policies/validate")
            .header("content-type", "text/plain")
            .body(more),
        415,
        "unsupported_media_type",
    )
    .await;
}

#[tokio::test]
async fn without_a_policy_directory_reload_and_validate_are_unavailable() {
    use claygate::admin::{AppState, router};
    use claygate::store::Store;

    let fake = FakeUpstream::start().await;
    let text = format!(
        "{}operations:\n  lookup:\n    upstream: clay\n    request: {{ method: GET, path: /v1/lookup }}\n",
        UPSTREAM.replace("{{UPSTREAM}}", &fake.url()).replace(
            "    headers:",
            "    rate_limit: { per_second: 5, burst: 7 }\n    headers:"
        )
    );
    let loaded = claygate::policy::load_str(
        "fixed.yaml",
        &text,
        claygate::policy::LoadOptions::default(),
    );
    let set = loaded
        .set
        .unwrap_or_else(|| panic!("a valid set: {:?}", loaded.diagnostics));
    let compiled = claygate::compile::compile(&set, None).expect("compiles");
    let dir = crate::support::tempdir();
    let store = claygate::store::sqlite::SqliteStore::open(dir.path())
        .await
        .expect("store opens");
    let runtime = claygate::runtime::Runtime::new(
        compiled,
        Arc::new(store) as Arc<dyn Store>,
        claygate::clock::Clock::new(),
    );
    let state = AppState::new(
        runtime,
        None,
        Arc::new(claygate::health::Probes::default()),
        None,
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let base = format!("http://{}", listener.local_addr().expect("addr"));
    tokio::spawn(async move {
        let _ = axum::serve(listener, router(state)).await;
    });
    let client = reqwest::Client::new();

    let ops = json_answer(client.get(format!("{base}/v1/operations")), 200).await;
    assert_eq!(ops["generation"], Value::Null, "{ops:#}");
    let lookup = operation(&ops, "lookup");
    assert_eq!(lookup["method"], "GET");
    assert_eq!(
        lookup["stats"]["rate_limit"],
        json!({"per_second": 5, "burst": 7, "available_tokens": 7, "gate_closed_for_ms": null}),
        "{lookup:#}"
    );
    problem(
        client.get(format!("{base}/v1/policies")),
        503,
        "reload_unavailable",
    )
    .await;
    problem(
        client.post(format!("{base}/v1/policies/reload")),
        503,
        "reload_unavailable",
    )
    .await;
    problem(
        client.post(format!("{base}/v1/policies/reload?dry_run=true")),
        503,
        "reload_unavailable",
    )
    .await;
    problem(
        client
            .post(format!("{base}/v1/policies/validate"))
            .header("content-type", "application/yaml")
            .body("version: 1\n"),
        503,
        "reload_unavailable",
    )
    .await;
}

#[tokio::test]
async fn unknown_routes_are_problem_documents() {
    let (_fake, server) = rig().await;
    for path in ["/v1/nope", "/v1/dlq/1/nope", "/v2/operations", "/"] {
        problem(get(&server, path), 404, "not_found").await;
    }
    let (_, body) = problem(
        server.client.put(server.url("/v1/dlq/1")),
        405,
        "method_not_allowed",
    )
    .await;
    assert!(body.get("outcome").is_none(), "not an invoke: {body:#}");
}

/// Every endpoint of the admin API, as `(method, path)`.
const ENDPOINTS: &[(&str, &str)] = &[
    ("post", "/v1/operations/{name}/invoke"),
    ("get", "/v1/operations"),
    ("get", "/v1/operations/{name}"),
    ("get", "/v1/breakers"),
    ("post", "/v1/breakers/{name}/open"),
    ("post", "/v1/breakers/{name}/close"),
    ("post", "/v1/breakers/{name}/reset"),
    ("get", "/v1/dlq"),
    ("get", "/v1/dlq/{id}"),
    ("delete", "/v1/dlq/{id}"),
    ("post", "/v1/dlq/{id}/replay"),
    ("post", "/v1/dlq/replay"),
    ("get", "/v1/policies"),
    ("post", "/v1/policies/reload"),
    ("post", "/v1/policies/validate"),
    ("get", "/v1/events"),
    ("get", "/health"),
    ("get", "/health/live"),
    ("get", "/health/ready"),
    ("get", "/metrics"),
];

/// The committed `schemas/openapi.json` is the generated document, and the
/// server serves the same one. `CLAYGATE_BLESS=1` rewrites the file.
#[tokio::test]
async fn openapi_document_is_committed_served_and_complete() {
    let generated =
        serde_json::to_string_pretty(&claygate::admin::openapi()).expect("serializes") + "\n";
    let path = crate::support::repo().join("schemas").join("openapi.json");
    if std::env::var_os("CLAYGATE_BLESS").is_some_and(|v| v == "1") {
        std::fs::write(&path, &generated).expect("write schemas/openapi.json");
    }
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        committed == generated,
        "schemas/openapi.json is not the document the code generates (the API changed). \
         Regenerate it with `CLAYGATE_BLESS=1 cargo test --test tests admin::openapi` (or `cargo run -- openapi > schemas/openapi.json`) and commit it."
    );

    let document: Value = serde_json::from_str(&generated).expect("JSON");
    let (_fake, server) = rig().await;
    let served = json_answer(get(&server, "/openapi.json"), 200).await;
    assert_eq!(
        served, document,
        "GET /openapi.json serves the committed document"
    );

    let mut missing = Vec::new();
    for (method, path) in ENDPOINTS {
        if document["paths"][path][method].is_null() {
            missing.push(format!("{} {path}", method.to_uppercase()));
        }
    }
    assert!(
        missing.is_empty(),
        "endpoints missing from the OpenAPI document: {missing:?}"
    );
    for (path, item) in document["paths"].as_object().expect("paths") {
        let open = path == "/health" || path.starts_with("/health/") || path == "/metrics";
        for (method, op) in item.as_object().expect("a path item") {
            assert!(
                op["responses"].as_object().is_some_and(|r| !r.is_empty()),
                "{method} {path} documents its responses"
            );
            // Every endpoint behind the token check documents its 401.
            let unauthorized = &op["responses"]["401"];
            if open {
                assert!(unauthorized.is_null(), "{method} {path} is open");
            } else {
                assert_eq!(
                    unauthorized["$ref"], "#/components/responses/Unauthorized",
                    "{method} {path} documents its 401"
                );
            }
        }
    }
    let unauthorized = &document["components"]["responses"]["Unauthorized"];
    assert_eq!(
        unauthorized["content"]["application/problem+json"]["schema"]["$ref"],
        "#/components/schemas/Problem"
    );
    let invoke = &document["paths"]["/v1/operations/{name}/invoke"]["post"]["responses"];
    for status in [
        "400", "404", "409", "413", "415", "422", "429", "502", "503", "504",
    ] {
        assert!(
            invoke[status].is_object(),
            "invoke documents {status}: {invoke:#}"
        );
    }
    // The envelope's `status` is a closed set, and problems carry `message`.
    let schemas = &document["components"]["schemas"];
    let status = &schemas["Envelope"]["properties"]["status"]["$ref"];
    let name = status
        .as_str()
        .and_then(|r| r.strip_prefix("#/components/schemas/"))
        .unwrap_or_else(|| panic!("Envelope.status names a schema: {status}"));
    assert_eq!(schemas[name]["enum"], json!(["ok", "fallback", "queued"]));
    // (`extra` is flattened, so the members sit in one part of an allOf.)
    let problem = &schemas["Problem"];
    let required = problem["required"]
        .as_array()
        .or_else(|| {
            problem["allOf"]
                .as_array()?
                .iter()
                .find_map(|part| part["required"].as_array())
        })
        .unwrap_or_else(|| panic!("Problem lists required members: {problem:#}"));
    for member in ["type", "title", "status", "detail", "message", "code"] {
        assert!(
            required.iter().any(|r| r == member),
            "Problem requires `{member}`: {required:?}"
        );
    }
    for schema in [
        "OperationList",
        "OperationDetail",
        "BreakerView",
        "DeadLetterPage",
        "DeadLetterView",
        "PolicyStatus",
        "Validation",
        "ReloadPlan",
        "Problem",
    ] {
        assert!(
            document["components"]["schemas"][schema].is_object(),
            "schema {schema} is in the document"
        );
    }
}

// ---- fuzz: random requests through the router never get a 500 --------

/// Operations of every kind the fuzz may call, all answered `200` by the script.
const FUZZ_POLICY: &str = "version: 1
upstreams:
  clay:
    base_url: \"http://127.0.0.1:9\"
    headers: { Authorization: \"Bearer test-secret-key\" }
    priorities:
      normal: { concurrency: 8, queue: 8, queue_timeout: 10s }
      bulk: { concurrency: 2, queue: 8, queue_timeout: 10s }
operations:
  echo:
    upstream: clay
    request: { method: POST, path: /v1/echo, body: { email: \"{{ params.email }}\" } }
    params_schema: { type: object, required: [email], properties: { email: { type: string } } }
    retry: { max_attempts: 1 }
  keyed:
    upstream: clay
    request: { method: POST, path: \"/v1/keyed/{{ params.id }}\" }
    params_schema: { type: object, required: [id], properties: { id: { type: string } } }
    retry: { max_attempts: 1 }
    idempotency: { key: [id] }
  lookup:
    upstream: clay
    request: { method: GET, path: /v1/lookup }
    retry: { max_attempts: 1 }
    fallback: { static: { known: false } }
  queued:
    upstream: clay
    request: { method: POST, path: \"/v1/tables/{{ params.table_id }}/rows\", body: \"{{ params.row }}\" }
    params_schema:
      type: object
      required: [table_id, row]
      properties: { table_id: { type: string }, row: { type: object } }
    priority: bulk
    retry: { max_attempts: 1 }
    idempotency: { key: [table_id, row] }
    dlq: { max_attempts: 3, backoff: { initial: 1h, max: 2h } }
";

const FUZZ_TOKEN: &str = "fuzz-token-5e1d";

/// One random request.
#[derive(Debug, Clone)]
struct Fuzzed {
    guarded: bool,
    method: &'static str,
    path: String,
    headers: Vec<(&'static str, Vec<u8>)>,
    body: Vec<u8>,
}

fn fuzzed() -> impl proptest::strategy::Strategy<Value = Fuzzed> {
    use proptest::prelude::*;
    let segment = || {
        prop_oneof![
            Just("echo".to_owned()),
            Just("keyed".to_owned()),
            Just("lookup".to_owned()),
            Just("queued".to_owned()),
            Just("nope".to_owned()),
            Just("1".to_owned()),
            Just("0".to_owned()),
            Just("-1".to_owned()),
            Just("99999999999999999999".to_owned()),
            Just("%ff".to_owned()),
            Just("%zz".to_owned()),
            "[A-Za-z0-9._~%-]{0,12}",
        ]
    };
    let path = (
        prop_oneof![
            Just("/v1/operations/{}/invoke"),
            Just("/v1/operations/{}"),
            Just("/v1/operations"),
            Just("/v1/breakers"),
            Just("/v1/breakers/{}/open"),
            Just("/v1/breakers/{}/close"),
            Just("/v1/breakers/{}/reset"),
            Just("/v1/breakers/{}/{}"),
            Just("/v1/dlq"),
            Just("/v1/dlq/{}"),
            Just("/v1/dlq/{}/replay"),
            Just("/v1/dlq/replay"),
            Just("/v1/policies"),
            Just("/v1/policies/reload"),
            Just("/v1/policies/validate"),
            Just("/v1/events"),
            Just("/health"),
            Just("/health/live"),
            Just("/health/ready"),
            Just("/metrics"),
            Just("/openapi.json"),
            Just("/{}"),
            Just("/{}/{}/{}"),
        ],
        segment(),
        segment(),
        segment(),
        prop_oneof![
            Just(String::new()),
            Just("?dry_run=true".to_owned()),
            Just("?dry_run=perhaps".to_owned()),
            Just("?limit=0".to_owned()),
            Just("?limit=abc".to_owned()),
            Just("?limit=5&after=3".to_owned()),
            Just("?state=bogus&operation=echo".to_owned()),
            Just("?name=../x.yaml".to_owned()),
            Just("?strict=true&name=x.yaml".to_owned()),
            "\\?[A-Za-z0-9=&%_.-]{0,24}",
        ],
    )
        .prop_map(|(template, a, b, c, query)| {
            let mut path = template.to_owned();
            for s in [a, b, c] {
                path = path.replacen("{}", &s, 1);
            }
            path + &query
        });
    let value = || {
        prop_oneof![
            "[ -~]{0,40}".prop_map(String::into_bytes),
            proptest::collection::vec(any::<u8>(), 0..16),
        ]
    };
    let header = |name: &'static str, known: Vec<&'static str>| {
        let known: Vec<Vec<u8>> = known.into_iter().map(|k| k.as_bytes().to_vec()).collect();
        proptest::option::of(prop_oneof![
            3 => proptest::sample::select(known),
            1 => value(),
        ])
        .prop_map(move |v| v.map(|v| (name, v)))
    };
    let headers = (
        header(
            "content-type",
            vec![
                "application/json",
                "application/json; charset=utf-8",
                "application/yaml",
                "text/plain",
                "application/x-www-form-urlencoded",
            ],
        ),
        header("idempotency-key", vec!["k1", "order-42", ""]),
        header(
            "x-claygate-priority",
            vec!["bulk", "normal", "critical", "low", "x"],
        ),
        header(
            "authorization",
            vec![
                "Bearer fuzz-token-5e1d",
                "bearer fuzz-token-5e1d",
                "Bearer wrong",
                "Basic Zm9vOmJhcg==",
                "Bearer",
            ],
        ),
    )
        .prop_map(|(a, b, c, d)| [a, b, c, d].into_iter().flatten().collect::<Vec<_>>());
    let json_value = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        "[ -~]{0,16}".prop_map(Value::String),
        Just(json!({"n": 1})),
        Just(json!([1, "a"])),
    ];
    let params = proptest::collection::btree_map(
        prop_oneof![
            Just("email".to_owned()),
            Just("id".to_owned()),
            Just("table_id".to_owned()),
            Just("row".to_owned()),
            Just("operation".to_owned()),
            Just("state".to_owned()),
            "[a-z_]{1,8}",
        ],
        json_value,
        0..4,
    )
    .prop_map(|m| serde_json::to_vec(&m).unwrap_or_default());
    let body = prop_oneof![
        Just(Vec::new()),
        Just(b"{}".to_vec()),
        params,
        proptest::collection::vec(any::<u8>(), 0..256),
        "[ -~\n]{0,200}".prop_map(String::into_bytes),
        Just(b"version: 1\n".to_vec()),
        Just(b"version: 1\noperations: { x: { upstream: clay, request: { method: GET, path: /x } } }\n".to_vec()),
        Just(br#"{"files": {"a.yaml": "version: 1\n"}}"#.to_vec()),
        Just(br#"{"files": {"../a.yaml": 5}}"#.to_vec()),
        Just(br#"{"operation": "queued", "state": "parked"}"#.to_vec()),
        Just(b"[1, 2".to_vec()),
    ];
    let anything = (
        any::<bool>(),
        proptest::sample::select(vec![
            "GET", "GET", "POST", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS",
        ]),
        path,
        headers.clone(),
        body,
    )
        .prop_map(|(guarded, method, path, headers, body)| Fuzzed {
            guarded,
            method,
            path,
            headers,
            body,
        });
    // Invokes that mostly pass the checks and reach the (answering)
    // upstream, with the odd header thrown in.
    let invoke = (
        proptest::sample::select(vec![
            ("lookup", json!({})),
            ("echo", json!({"email": "ada@example.com"})),
            ("keyed", json!({"id": "a"})),
            ("queued", json!({"table_id": "t1", "row": {"n": 1}})),
        ]),
        headers,
    )
        .prop_map(|((operation, params), mut headers)| {
            headers.retain(|(name, _)| *name != "content-type" && *name != "authorization");
            headers.push(("content-type", b"application/json".to_vec()));
            headers.push(("authorization", format!("Bearer {FUZZ_TOKEN}").into_bytes()));
            Fuzzed {
                guarded: true,
                method: "POST",
                path: format!("/v1/operations/{operation}/invoke"),
                headers,
                body: params.to_string().into_bytes(),
            }
        });
    prop_oneof![3 => anything, 1 => invoke]
}

/// What must hold of any answer: no 5xx, and a JSON body (a problem
/// document for errors), except the event stream and the metrics text.
fn check_answer(
    request: &Fuzzed,
    answer: &crate::support::server::Answered,
) -> Result<(), proptest::test_runner::TestCaseError> {
    use proptest::prop_assert;
    let text = String::from_utf8_lossy(&answer.body);
    prop_assert!(
        answer.status < 500,
        "{} {} answered {}: {text}",
        request.method,
        request.path,
        answer.status
    );
    prop_assert!(
        !text.contains("test-secret-key") && !text.contains(FUZZ_TOKEN),
        "a secret in the answer: {text}"
    );
    if request.method == "HEAD" {
        return Ok(());
    }
    let content_type = answer.content_type();
    if content_type.starts_with("text/event-stream") {
        prop_assert!(answer.status == 200, "an event stream is a 200");
        return Ok(());
    }
    if content_type.starts_with("application/openmetrics-text") {
        prop_assert!(answer.status == 200 && text.ends_with("# EOF\n"), "{text}");
        return Ok(());
    }
    prop_assert!(
        [
            "application/json",
            "application/problem+json",
            "application/health+json"
        ]
        .iter()
        .any(|t| content_type.starts_with(t)),
        "{} {} answered {} as `{content_type}`: {text}",
        request.method,
        request.path,
        answer.status
    );
    let body: Value = serde_json::from_slice(&answer.body).map_err(|e| {
        proptest::test_runner::TestCaseError::fail(format!("not JSON ({e}): {text}"))
    })?;
    if answer.status >= 400 {
        prop_assert!(
            content_type == "application/problem+json"
                && body["code"].is_string()
                && body["status"] == answer.status,
            "{} {} answered {}: {body:#}",
            request.method,
            request.path,
            answer.status
        );
    }
    Ok(())
}

#[test]
fn random_requests_never_get_a_500_and_always_get_json() {
    use crate::support::script::Script;
    use crate::support::server::in_process;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a runtime");
    let script = Script::new();
    let (open, guarded) = runtime.block_on(async {
        (
            in_process(FUZZ_POLICY, &script, None).await,
            in_process(FUZZ_POLICY, &script, Some(FUZZ_TOKEN)).await,
        )
    });
    let config = proptest::test_runner::Config {
        cases: 1000,
        failure_persistence: None,
        ..proptest::test_runner::Config::default()
    };
    let mut runner = proptest::test_runner::TestRunner::new(config);
    let result = runner.run(&fuzzed(), |request| {
        let rig = if request.guarded { &guarded } else { &open };
        let mut builder = http::Request::builder()
            .method(request.method)
            .uri(request.path.as_str());
        for (name, value) in &request.headers {
            if let Ok(v) = http::HeaderValue::from_bytes(value) {
                builder = builder.header(*name, v);
            }
        }
        // A path `http` cannot parse never reaches a server.
        let Ok(built) = builder.body(axum::body::Body::from(request.body.clone())) else {
            return Ok(());
        };
        let answer = runtime.block_on(rig.send(built));
        // One request's breaker control must not decide the next one's answer.
        for rig in [&open, &guarded] {
            for pipeline in rig.runtime().compiled().operations.values() {
                pipeline.breaker.reset();
            }
        }
        check_answer(&request, &answer)
    });
    if let Err(e) = result {
        panic!("{e}");
    }
    assert!(script.hits() > 0, "some requests reached the upstream");
}
