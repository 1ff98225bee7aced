//! The demo's fake Clay (its endpoints, rate limit and faults, and its
//! control API), and the `outage` scenario end to end.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use claygate::demo::fake_clay::{FakeClay, Faults, Outage, RateLimitFault, Recovery};
use claygate::demo::{DemoOptions, Timings};
use serde_json::{Value, json};

fn loopback() -> SocketAddr {
    "127.0.0.1:0".parse().expect("addr")
}

/// A fake with no faults and no rate limit.
async fn fake() -> FakeClay {
    FakeClay::start_with(loopback(), loopback(), Faults::none())
        .await
        .expect("the fake starts")
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .build()
        .expect("a client")
}

async fn post(fake: &FakeClay, path: &str, body: Value) -> reqwest::Response {
    client()
        .post(format!("{}{path}", fake.url()))
        .bearer_auth("test-key")
        .json(&body)
        .send()
        .await
        .expect("request")
}

async fn get(fake: &FakeClay, path: &str) -> reqwest::Response {
    client()
        .get(format!("{}{path}", fake.url()))
        .bearer_auth("test-key")
        .send()
        .await
        .expect("request")
}

async fn json_of(r: reqwest::Response) -> Value {
    r.json().await.expect("a JSON body")
}

async fn push(fake: &FakeClay, table: &str, key: Option<&str>, row: Value) -> reqwest::Response {
    let mut request = client()
        .post(format!("{}/v1/tables/{table}/rows", fake.url()))
        .bearer_auth("test-key")
        .json(&row);
    if let Some(key) = key {
        request = request.header("Idempotency-Key", key);
    }
    request.send().await.expect("request")
}

#[tokio::test]
async fn enriches_people_and_companies_deterministically() {
    let fake = fake().await;
    let first = json_of(
        post(
            &fake,
            "/v1/people/enrich",
            json!({"email": "ada.lovelace@acme.com"}),
        )
        .await,
    )
    .await;
    let again = json_of(
        post(
            &fake,
            "/v1/people/enrich",
            json!({"email": "ada.lovelace@acme.com"}),
        )
        .await,
    )
    .await;
    assert_eq!(first, again, "the same email gives the same person");
    assert_eq!(first["person"]["full_name"], "Ada Lovelace");
    assert_eq!(first["company"]["domain"], "acme.com");
    let linkedin = first["person"]["linkedin_url"]
        .as_str()
        .expect("a LinkedIn URL");
    assert!(
        linkedin.starts_with("https://www.linkedin.com/in/ada-lovelace-"),
        "{linkedin}"
    );
    assert!(first["person"]["title"].is_string());
    let other = json_of(
        post(
            &fake,
            "/v1/people/enrich",
            json!({"email": "grace@gmail.com"}),
        )
        .await,
    )
    .await;
    assert_eq!(other["person"]["first_name"], "Grace");
    assert!(
        other["company"].is_null(),
        "free mail has no company: {other}"
    );

    let company = json_of(
        post(
            &fake,
            "/v1/companies/enrich",
            json!({"domain": "globex.com"}),
        )
        .await,
    )
    .await;
    assert_eq!(company["domain"], "globex.com");
    assert!(
        company["name"]
            .as_str()
            .is_some_and(|n| n.starts_with("Globex"))
    );
    assert!(company["employee_count"].is_u64());
    assert!(company["industry"].is_string());

    let lookup = json_of(get(&fake, "/v1/companies/globex.com?fields=name,industry").await).await;
    let keys: Vec<&String> = lookup.as_object().expect("an object").keys().collect();
    assert_eq!(
        keys,
        ["domain", "industry", "name"],
        "only the fields asked: {lookup}"
    );
    assert_eq!(lookup["name"], company["name"]);

    let missing = get(&fake, "/v1/companies/unknown-startup.com").await;
    assert_eq!(missing.status(), 404);
    assert_eq!(json_of(missing).await["error"]["code"], "not_found");
    let bad = post(&fake, "/v1/people/enrich", json!({"mail": "x"})).await;
    assert_eq!(bad.status(), 400);

    let anonymous = client()
        .post(format!("{}/v1/people/enrich", fake.url()))
        .json(&json!({"email": "ada.lovelace@acme.com"}))
        .send()
        .await
        .expect("request");
    assert_eq!(anonymous.status(), 401);
    let health = client()
        .get(format!("{}/health", fake.url()))
        .send()
        .await
        .expect("health");
    assert_eq!(health.status(), 200);

    let stats = fake.stats();
    assert_eq!(stats.unauthorized, 1);
    assert_eq!(stats.by_endpoint.get("POST /v1/people/enrich"), Some(&5));
    assert_eq!(
        stats.by_endpoint.get("GET /v1/companies/{domain}"),
        Some(&2)
    );
    assert_eq!(stats.by_status.get(&404), Some(&1));
    fake.shutdown().await;
}

#[tokio::test]
async fn rate_limits_like_clay_with_retry_after() {
    let fake = fake().await;
    fake.set_faults(Faults {
        rate_limit: RateLimitFault {
            enabled: true,
            per_second: 0.5,
            burst: 2,
        },
        ..Faults::none()
    })
    .await
    .expect("faults");
    for _ in 0..2 {
        assert_eq!(get(&fake, "/v1/companies/acme.com").await.status(), 200);
    }
    let limited = get(&fake, "/v1/companies/acme.com").await;
    assert_eq!(limited.status(), 429);
    let retry_after: u64 = limited.headers()["retry-after"]
        .to_str()
        .expect("ascii")
        .parse()
        .expect("seconds");
    assert!((1..=2).contains(&retry_after), "Retry-After {retry_after}");
    assert_eq!(limited.headers()["x-ratelimit-remaining"], "0");
    assert!(limited.headers().contains_key("x-ratelimit-reset"));
    assert_eq!(json_of(limited).await["error"]["code"], "rate_limited");
    // Health and the control API are not limited.
    let health = client()
        .get(format!("{}/health", fake.url()))
        .send()
        .await
        .expect("health");
    assert_eq!(health.status(), 200);
    assert_eq!(fake.stats().rate_limited, 1);

    // Switched off, nothing is limited.
    fake.update_faults(|f| f.rate_limit.enabled = false)
        .await
        .expect("faults");
    for _ in 0..5 {
        assert_eq!(get(&fake, "/v1/companies/acme.com").await.status(), 200);
    }
    fake.shutdown().await;
}

#[tokio::test]
async fn a_storm_answers_429_with_its_retry_after() {
    let fake = fake().await;
    fake.set_faults(Faults {
        storm_429: 1.0,
        retry_after_s: 3,
        ..Faults::none()
    })
    .await
    .expect("faults");
    let r = post(&fake, "/v1/companies/enrich", json!({"domain": "acme.com"})).await;
    assert_eq!(r.status(), 429);
    assert_eq!(r.headers()["retry-after"], "3");
    assert_eq!(fake.stats().storm_429, 1);
    fake.shutdown().await;
}

#[tokio::test]
async fn refuse_closes_the_listener_and_recovery_opens_it_again() {
    let fake = fake().await;
    let addr = fake.addr();
    assert!(fake.listening());
    // A kept-alive connection from before the outage.
    let pooled = client();
    let url = format!("{}/v1/companies/acme.com", fake.url());
    assert_eq!(
        pooled
            .get(&url)
            .bearer_auth("k")
            .send()
            .await
            .expect("before")
            .status(),
        200
    );

    fake.set_faults(Faults {
        outage: Outage::Refuse,
        ..Faults::none()
    })
    .await
    .expect("faults");
    assert!(!fake.listening());
    let refused = tokio::net::TcpStream::connect(addr).await;
    assert_eq!(
        refused.expect_err("nothing listens").kind(),
        std::io::ErrorKind::ConnectionRefused
    );
    // The pooled client cannot get through either.
    let through = pooled.get(&url).bearer_auth("k").send().await;
    assert!(through.is_err(), "answered during an outage: {through:?}");
    // The control API has its own port and stays up.
    let stats: Value = client()
        .get(format!("{}/_fake/stats", fake.control_url()))
        .send()
        .await
        .expect("control API")
        .json()
        .await
        .expect("JSON");
    assert_eq!(stats["outage"], "refuse");
    assert_eq!(stats["listening"], false);

    // Recovery through the control API: the same address serves again.
    let cleared = client()
        .put(format!("{}/_fake/faults", fake.control_url()))
        .body("{}")
        .send()
        .await
        .expect("PUT");
    assert_eq!(cleared.status(), 200);
    assert!(fake.listening());
    assert_eq!(fake.addr(), addr);
    assert_eq!(get(&fake, "/v1/companies/acme.com").await.status(), 200);
    fake.shutdown().await;
}

#[tokio::test]
async fn hang_accepts_and_never_answers_until_the_outage_ends() {
    let fake = fake().await;
    fake.set_faults(Faults {
        outage: Outage::Hang,
        ..Faults::none()
    })
    .await
    .expect("faults");
    let hung = client()
        .get(format!("{}/v1/companies/acme.com", fake.url()))
        .bearer_auth("k")
        .timeout(Duration::from_millis(300))
        .send()
        .await;
    assert!(hung.expect_err("no answer").is_timeout());

    // A request left waiting is released (503) when the outage ends.
    let waiting = tokio::spawn({
        let url = format!("{}/health", fake.url());
        async move { client().get(url).send().await.map(|r| r.status().as_u16()) }
    });
    let arrived = Instant::now();
    while fake.stats().hung < 2 && arrived.elapsed() < Duration::from_secs(5) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(fake.stats().hung, 2);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!waiting.is_finished(), "a hung request was answered");
    fake.set_faults(Faults::none()).await.expect("faults");
    let status = tokio::time::timeout(Duration::from_secs(5), waiting)
        .await
        .expect("released")
        .expect("task")
        .expect("an answer");
    assert_eq!(status, 503);
    assert_eq!(get(&fake, "/v1/companies/acme.com").await.status(), 200);
    fake.shutdown().await;
}

/// Statuses of `n` lookups in a row.
async fn statuses(fake: &FakeClay, n: usize) -> Vec<u16> {
    let mut out = Vec::new();
    for _ in 0..n {
        out.push(get(fake, "/v1/companies/acme.com").await.status().as_u16());
    }
    out
}

#[tokio::test]
async fn an_error_rate_with_a_seed_repeats_itself() {
    let fake = fake().await;
    let faults = Faults {
        seed: 7,
        error_rate: 0.5,
        ..Faults::none()
    };
    fake.set_faults(faults.clone()).await.expect("faults");
    let first = statuses(&fake, 40).await;
    fake.set_faults(faults).await.expect("faults");
    let second = statuses(&fake, 40).await;
    assert_eq!(first, second, "the same seed, the same faults");
    let errors = first.iter().filter(|s| **s != 200).count();
    assert!((8..=32).contains(&errors), "about half fail: {first:?}");
    assert!(
        first.iter().all(|s| [200, 500, 502, 503].contains(s)),
        "{first:?}"
    );
    assert_eq!(fake.stats().injected_errors, 2 * errors as u64);

    fake.set_faults(Faults {
        seed: 8,
        error_rate: 0.5,
        ..Faults::none()
    })
    .await
    .expect("faults");
    assert_ne!(
        statuses(&fake, 40).await,
        first,
        "another seed, other faults"
    );
    fake.shutdown().await;
}

#[tokio::test]
async fn a_partial_recovery_steps_the_error_rate_down() {
    const STEP: Duration = Duration::from_secs(60);
    let fake = fake().await;
    fake.set_faults(Faults {
        error_rate: 1.0,
        error_statuses: vec![503],
        recovery: Some(Recovery {
            step: 0.5,
            every_ms: 60_000,
        }),
        ..Faults::none()
    })
    .await
    .expect("faults");
    // Well within the first minute, on the real clock.
    assert_eq!(statuses(&fake, 3).await, [503, 503, 503]);
    assert_eq!(fake.stats().effective_error_rate, 1.0);
    // The fake reads tokio's clock: from here the test moves it.
    tokio::time::pause();
    tokio::time::advance(STEP).await;
    assert_eq!(fake.stats().effective_error_rate, 0.5, "one step down");
    tokio::time::advance(STEP).await;
    assert_eq!(fake.stats().effective_error_rate, 0.0, "recovered");
    tokio::time::resume();
    assert_eq!(statuses(&fake, 3).await, [200, 200, 200]);
    fake.shutdown().await;
}

#[tokio::test]
async fn latency_and_slow_calls_add_time() {
    let fake = fake().await;
    fake.set_faults(Faults {
        latency_ms: 100,
        slow_rate: 1.0,
        slow_ms: 150,
        ..Faults::none()
    })
    .await
    .expect("faults");
    let started = Instant::now();
    assert_eq!(get(&fake, "/v1/companies/acme.com").await.status(), 200);
    assert!(
        started.elapsed() >= Duration::from_millis(250),
        "{:?}",
        started.elapsed()
    );
    fake.shutdown().await;
}

#[tokio::test]
async fn rows_are_deduplicated_by_idempotency_key_and_duplicates_counted() {
    let fake = fake().await;
    let row = json!({"email": "ada.lovelace@acme.com", "plan": "pro"});
    let first = push(&fake, "tbl_1", Some("key-1"), row.clone()).await;
    assert_eq!(first.status(), 201);
    assert!(first.headers().get("idempotent-replayed").is_none());
    let first = json_of(first).await;
    let again = push(&fake, "tbl_1", Some("key-1"), row.clone()).await;
    assert_eq!(again.status(), 201);
    assert_eq!(again.headers()["idempotent-replayed"], "true");
    assert_eq!(json_of(again).await, first, "the same answer again");

    let conflict = push(&fake, "tbl_1", Some("key-1"), json!({"other": 1})).await;
    assert_eq!(conflict.status(), 422);
    assert_eq!(
        push(&fake, "tbl_1", Some("key-2"), row.clone())
            .await
            .status(),
        201
    );
    assert_eq!(push(&fake, "tbl_1", None, row.clone()).await.status(), 201);
    assert_eq!(push(&fake, "tbl_1", None, row.clone()).await.status(), 201);
    let not_an_object = push(&fake, "tbl_1", Some("key-3"), json!([1, 2])).await;
    assert_eq!(not_an_object.status(), 400);

    let rows = fake.rows();
    assert_eq!(rows.len(), 4, "{rows:?}");
    assert_eq!(rows[0].idempotency_key.as_deref(), Some("key-1"));
    assert_eq!(rows[0].row, row);
    assert_eq!(rows[0].table_id, "tbl_1");
    assert_eq!(fake.deliveries("key-1"), 2);
    assert_eq!(fake.deliveries("key-2"), 1);
    assert_eq!(fake.deliveries("never"), 0);
    let stats = fake.stats();
    assert_eq!(stats.rows, 4);
    assert_eq!(stats.duplicate_deliveries, 1);
    assert_eq!(stats.rows_without_key, 2);
    assert_eq!(stats.key_conflicts, 1);
    fake.shutdown().await;
}

#[tokio::test]
async fn the_control_api_sets_patches_lists_and_resets() {
    let fake = fake().await;
    let c = client();
    let faults_url = format!("{}/_fake/faults", fake.control_url());
    // curl -d sends a form content type: the body is read as JSON anyway.
    let put = c
        .put(&faults_url)
        .header("content-type", "application/x-www-form-urlencoded")
        .body(r#"{"error_rate":0.25,"latency_ms":5,"seed":3}"#)
        .send()
        .await
        .expect("PUT");
    assert_eq!(put.status(), 200);
    let set: Value = put.json().await.expect("JSON");
    assert_eq!(set["error_rate"], 0.25);
    assert_eq!(set["rate_limit"]["enabled"], true, "left out: the default");
    assert_eq!(fake.faults().seed, 3);

    let patched: Value = c
        .patch(&faults_url)
        .body(r#"{"latency_ms":0,"rate_limit":{"enabled":false}}"#)
        .send()
        .await
        .expect("PATCH")
        .json()
        .await
        .expect("JSON");
    assert_eq!(patched["error_rate"], 0.25, "kept");
    assert_eq!(patched["latency_ms"], 0);
    assert_eq!(patched["rate_limit"]["enabled"], false);
    assert_eq!(patched["rate_limit"]["burst"], 20, "merged, not replaced");
    let got: Value = c
        .get(&faults_url)
        .send()
        .await
        .expect("GET")
        .json()
        .await
        .expect("JSON");
    assert_eq!(got, patched);

    for bad in [
        r#"{"error_rate":2}"#,
        r#"{"outage":"sometimes"}"#,
        r#"{"eror_rate":0.1}"#,
        "nope",
    ] {
        let r = c.put(&faults_url).body(bad).send().await.expect("PUT");
        assert_eq!(r.status(), 400, "{bad}");
    }
    assert_eq!(
        fake.faults().error_rate,
        0.25,
        "a bad document changes nothing"
    );

    // The control API answers on the fake's own port too.
    fake.set_faults(Faults::none()).await.expect("faults");
    push(&fake, "tbl_1", Some("k"), json!({"a": 1})).await;
    push(&fake, "tbl_1", Some("k"), json!({"a": 1})).await;
    let rows: Value = c
        .get(format!("{}/_fake/rows", fake.url()))
        .send()
        .await
        .expect("rows")
        .json()
        .await
        .expect("JSON");
    assert_eq!(rows["rows"].as_array().map(Vec::len), Some(1));
    assert_eq!(rows["duplicate_deliveries"], 1);
    let stats: Value = c
        .get(format!("{}/_fake/stats", fake.control_url()))
        .send()
        .await
        .expect("stats")
        .json()
        .await
        .expect("JSON");
    assert_eq!(stats["rows"], 1);
    assert_eq!(stats["requests"], 2, "control calls are not counted");
    assert_eq!(stats["by_status"]["201"], 2);

    let reset = c
        .post(format!("{}/_fake/reset", fake.control_url()))
        .send()
        .await
        .expect("reset");
    assert_eq!(reset.status(), 200);
    assert!(fake.rows().is_empty());
    assert_eq!(fake.stats().requests, 0);
    assert_eq!(
        fake.faults(),
        Faults {
            seed: 0,
            ..Faults::default()
        }
    );
    fake.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_outage_scenario_loses_nothing_and_duplicates_nothing() {
    let _shared = crate::support::e2e::HEAVY.read().await;
    let started = Instant::now();
    let summary = claygate::demo::run_until(
        DemoOptions {
            listen: loopback(),
            fake_listen: loopback(),
            policies: crate::support::repo().join("policies"),
            scenario: Some("outage".into()),
            seed: 7,
            timings: Timings::quick(),
            echo: false,
            ..DemoOptions::default()
        },
        std::future::pending(),
    )
    .await
    .expect("the scenario runs");
    let transcript = summary.transcript.join("\n");
    println!("{transcript}");
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "took {:?}",
        started.elapsed()
    );

    // Traffic flowed, then the breakers opened and calls failed fast.
    let calls = &summary.calls;
    for op in claygate::demo::scenario::OPERATIONS {
        assert!(
            calls.get(op).is_some_and(|t| t.calls > 0),
            "no calls of {op}"
        );
    }
    assert!(summary.breaker_opened("push_row"), "{transcript}");
    assert!(summary.breaker_opened("lookup_company"), "{transcript}");
    let failed_fast: u64 = calls.values().map(|t| t.failed_fast).sum();
    assert!(failed_fast > 0, "{transcript}");

    // Reads were served from fallback while Clay was down, ageing through
    // every level after the hot reload shortened the cache windows.
    let lookup = &calls["lookup_company"];
    assert!(lookup.fallbacks() > 0, "{transcript}");
    for level in ["fresh", "stale", "very_stale"] {
        let n: u64 = calls
            .values()
            .map(|t| t.fallback.get(level).copied().unwrap_or(0))
            .sum();
        assert!(n > 0, "no {level} fallback answer:\n{transcript}");
    }
    assert!(
        transcript.contains("phase 2/5 begins with a hot reload")
            && transcript.contains("reload applied (the watcher saw the edit)"),
        "the cache windows change through the watcher:\n{transcript}"
    );

    // Writes were dead-lettered, then redriven: the DLQ is drained.
    let rows = &calls["push_row"];
    assert!(rows.queued > 0, "{transcript}");
    assert!(summary.dlq.dead_lettered > 0);
    assert_eq!(summary.dlq.pending, 0, "{transcript}");
    assert_eq!(summary.dlq.parked, 0, "{transcript}");
    assert_eq!(summary.dlq.delivered, summary.dlq.dead_lettered);

    // Every row accounted for, none delivered twice.
    let r = &summary.rows;
    assert_eq!(r.duplicate_deliveries, 0, "{transcript}");
    assert_eq!(r.lost, 0, "{transcript}");
    assert!(summary.nothing_lost());
    assert_eq!(r.unique, r.delivered + r.in_dlq + r.refused);
    assert_eq!(r.in_dlq, 0);
    assert_eq!(
        r.delivered, r.fake_rows,
        "the fake holds exactly the rows delivered"
    );
    assert_eq!(r.invokes, r.unique + r.client_repeats);
    assert!(r.client_repeats > 0);
    assert_eq!(r.invokes, rows.calls);

    // Health went unhealthy (the probe failed) and came back healthy by
    // itself; every breaker that opened closed by itself too.
    let during = summary
        .health
        .iter()
        .find(|h| h.phase == "outage")
        .expect("health during the outage");
    assert_eq!(
        during.status,
        claygate::health::Status::Unhealthy,
        "{transcript}"
    );
    assert_eq!(
        summary.final_health,
        Some(claygate::health::Status::Healthy),
        "{transcript}"
    );
    assert!(!summary.degraded_only_by_recent_fallbacks);
    for (op, b) in &summary.breakers {
        assert_eq!(
            b.final_state,
            Some(claygate::pipeline::breaker::BreakerState::Closed),
            "{op}"
        );
        assert!(
            !b.reset_by_demo,
            "{op} was reset by the demo:\n{transcript}"
        );
        if b.opened > 0 {
            assert!(
                b.closed_by_trial + b.closed_by_probe > 0,
                "{op} opened and closed by a trial or a probe: {b:?}\n{transcript}"
            );
        }
    }
    assert!(transcript.contains("== summary: outage"), "{transcript}");
    assert!(
        transcript.contains("verdict: nothing lost, nothing duplicated"),
        "{transcript}"
    );
}

#[tokio::test]
async fn an_unknown_scenario_is_refused_before_anything_starts() {
    let e = claygate::demo::run_until(
        DemoOptions {
            listen: loopback(),
            scenario: Some("meteor".into()),
            echo: false,
            ..DemoOptions::default()
        },
        std::future::pending(),
    )
    .await
    .expect_err("unknown");
    assert!(e.to_string().contains("unknown scenario `meteor`"), "{e}");
}

/// The scenario at the pace of `claygate demo --scenario outage` (about 25
/// seconds), printed: `cargo test --test tests demo_pace -- --ignored --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "takes about 25 seconds; run by hand to watch the demo (the quick pace runs in CI)"]
async fn the_outage_scenario_at_demo_pace() {
    let summary = claygate::demo::run_until(
        DemoOptions {
            listen: loopback(),
            fake_listen: loopback(),
            policies: crate::support::repo().join("policies"),
            scenario: Some("outage".into()),
            timings: Timings::demo(),
            ..DemoOptions::default()
        },
        std::future::pending(),
    )
    .await
    .expect("the scenario runs");
    assert!(summary.nothing_lost());
    assert_eq!(summary.rows.duplicate_deliveries, 0);
}

/// The demo without a scenario: the lines its banner prints work against
/// the real admin API and the fake's control API.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_interactive_demo_answers_the_curl_lines_it_prints() {
    let demo = claygate::demo::Demo::start(DemoOptions {
        listen: loopback(),
        fake_listen: loopback(),
        policies: crate::support::repo().join("policies"),
        echo: false,
        ..DemoOptions::default()
    })
    .await
    .expect("the demo starts");
    let banner = demo.narrator().lines().join("\n");
    let admin = format!("http://{}", demo.addr());
    let control = demo.fake().control_url();
    assert!(
        banner.contains(&format!(
            "curl -s -X POST {}/v1/operations/lookup_company/invoke",
            demo.addr()
        )),
        "{banner}"
    );
    assert!(
        banner.contains(&format!(
            "curl -s -X PUT {}/_fake/faults -d '{{\"outage\":\"refuse\"}}'",
            demo.fake().control_addr()
        )),
        "{banner}"
    );
    let c = client();
    let invoke = |op: &str, params: Value| {
        c.post(format!("{admin}/v1/operations/{op}/invoke"))
            .header("content-type", "application/json")
            .body(params.to_string())
            .send()
    };

    let ok = invoke("lookup_company", json!({"domain": "acme.com"}))
        .await
        .expect("invoke");
    assert_eq!(ok.status(), 200);
    let ok = json_of(ok).await;
    assert_eq!(ok["status"], "ok", "{ok}");
    assert_eq!(ok["data"]["domain"], "acme.com", "{ok}");
    let person = json_of(
        invoke("enrich_person", json!({"email": "ada.lovelace@acme.com"}))
            .await
            .expect("invoke"),
    )
    .await;
    assert_eq!(
        person["data"]["person"]["full_name"], "Ada Lovelace",
        "{person}"
    );
    let row = json!({"table_id": "tbl_demo_signups", "row": {"email": "ada.lovelace@acme.com", "plan": "pro"}});
    let pushed = invoke("push_row", row.clone()).await.expect("invoke");
    assert_eq!(pushed.status(), 200);

    let down = c
        .put(format!("{control}/_fake/faults"))
        .body(r#"{"outage":"refuse"}"#)
        .send()
        .await
        .expect("PUT");
    assert_eq!(down.status(), 200);
    let served = json_of(
        invoke("lookup_company", json!({"domain": "acme.com"}))
            .await
            .expect("invoke"),
    )
    .await;
    assert_eq!(served["status"], "fallback", "{served}");
    assert_eq!(served["meta"]["staleness"], "fresh", "{served}");
    let queued = invoke(
        "push_row",
        json!({"table_id": "tbl_demo_signups", "row": {"email": "grace.hopper@globex.com", "plan": "team"}}),
    )
    .await
    .expect("invoke");
    assert_eq!(queued.status(), 202);
    let queued = json_of(queued).await;
    assert_eq!(queued["status"], "queued", "{queued}");
    assert!(queued["meta"]["dlq_id"].is_i64(), "{queued}");

    let health = c
        .get(format!("{admin}/health"))
        .send()
        .await
        .expect("health");
    assert!([200, 503].contains(&health.status().as_u16()));
    assert_ne!(json_of(health).await["status"], "healthy");
    let dlq = c.get(format!("{admin}/v1/dlq")).send().await.expect("dlq");
    assert_eq!(dlq.status(), 200);
    assert!(dlq.text().await.expect("text").contains("push_row"));
    let metrics = c
        .get(format!("{admin}/metrics"))
        .send()
        .await
        .expect("metrics");
    assert_eq!(metrics.status(), 200);
    let breakers = c
        .get(format!("{admin}/v1/breakers"))
        .send()
        .await
        .expect("breakers");
    assert_eq!(breakers.status(), 200);

    let up = c
        .put(format!("{control}/_fake/faults"))
        .body("{}")
        .send()
        .await
        .expect("PUT");
    assert_eq!(up.status(), 200);
    let replayed = invoke("push_row", row).await.expect("invoke");
    assert_eq!(replayed.headers()["idempotent-replayed"], "true");

    let summary = demo.summary().await;
    assert_eq!(summary.rows.fake_rows, 1);
    assert_eq!(summary.rows.duplicate_deliveries, 0);
    assert_eq!(summary.dlq.pending, 1);
    assert_eq!(
        demo.fake()
            .stats()
            .by_endpoint
            .get("POST /v1/tables/{table_id}/rows"),
        Some(&1)
    );
    demo.shutdown().await;
}

// ---------------------------------------------------------------------------
// `claygate demo` as a user runs it: the compiled binary from the repository root.

/// The words of a shell line, with '…' quoting (all the banner uses).
fn shell_words(line: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut quoted = false;
    let mut any = false;
    for c in line.chars() {
        match c {
            '\'' => {
                quoted = !quoted;
                any = true;
            }
            c if c.is_whitespace() && !quoted => {
                if any {
                    words.push(std::mem::take(&mut word));
                    any = false;
                }
            }
            c => {
                word.push(c);
                any = true;
            }
        }
    }
    if any {
        words.push(word);
    }
    words
}

/// Runs a printed `curl` line (method, headers, body, URL) with reqwest, so
/// the test does not need curl installed; answers status and body.
async fn run_curl(line: &str) -> (u16, Value) {
    let words = shell_words(line);
    assert_eq!(words.first().map(String::as_str), Some("curl"), "{line}");
    let (mut method, mut url, mut body) = ("GET".to_owned(), None, None);
    let mut headers = Vec::new();
    let mut rest = words[1..].iter();
    while let Some(w) = rest.next() {
        match w.as_str() {
            "-s" => {}
            "-X" => method = rest.next().expect("a method").clone(),
            "-H" => headers.push(rest.next().expect("a header").clone()),
            "-d" => body = Some(rest.next().expect("a body").clone()),
            other if other.starts_with("http://") => url = Some(other.to_owned()),
            // curl's default scheme, as the banner prints `127.0.0.1:7700/…`.
            other if other.starts_with("127.0.0.1:") => url = Some(format!("http://{other}")),
            other => panic!("unexpected curl word {other:?} in {line}"),
        }
    }
    let method = reqwest::Method::from_bytes(method.as_bytes()).expect("a method");
    let mut request = client().request(method, url.expect("a URL"));
    for h in headers {
        let (name, value) = h.split_once(':').expect("name: value");
        request = request.header(name.trim(), value.trim());
    }
    if let Some(body) = body {
        request = request.body(body);
    }
    let response = request.send().await.expect("the curl line answers");
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_binary_runs_the_outage_scenario_to_its_summary() {
    let _shared = crate::support::e2e::HEAVY.read().await;
    let started = Instant::now();
    let mut demo = crate::support::e2e::Spawned::start(&[
        "demo",
        "--scenario",
        "outage",
        "--pace",
        "quick",
        "--listen",
        "127.0.0.1:0",
    ]);
    let code = demo.exit(Duration::from_secs(90)).await;
    let out = demo.stdout();
    assert_eq!(code, Some(0), "stdout:\n{out}\nstderr:\n{}", demo.stderr());
    assert!(out.contains("== summary: outage"), "{out}");
    assert!(
        out.contains("verdict: nothing lost, nothing duplicated"),
        "{out}"
    );
    let health = out
        .lines()
        .find(|l| l.starts_with("health: "))
        .unwrap_or_else(|| panic!("a health line: {out}"));
    assert!(health.contains("outage unhealthy"), "{health}");
    assert!(health.ends_with("all clear healthy"), "{health}");
    println!(
        "demo --scenario outage --pace quick took {:?}",
        started.elapsed()
    );
}

#[cfg(unix)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_binary_serves_the_curl_lines_it_prints_and_reloads_on_sighup() {
    let _shared = crate::support::e2e::HEAVY.read().await;
    let mut demo = crate::support::e2e::Spawned::start(&["demo", "--listen", "127.0.0.1:0"]);
    demo.line("the banner's end", Duration::from_secs(30), |l| {
        l.starts_with("Edit the files in")
    })
    .await;
    let lookup = demo
        .line("the lookup_company line", Duration::ZERO, |l| {
            l.contains("/v1/operations/lookup_company/invoke")
        })
        .await;
    let (status, body) = run_curl(lookup.trim()).await;
    assert_eq!((status, &body["status"]), (200, &json!("ok")), "{body:#}");
    assert_eq!(body["data"]["domain"], "acme.com", "{body:#}");
    let admin = shell_words(lookup.trim())
        .into_iter()
        .find(|w| w.contains("/v1/operations/"))
        .and_then(|u| u.split("/v1/").next().map(str::to_owned))
        .map(|a| {
            if a.starts_with("http://") {
                a
            } else {
                format!("http://{a}")
            }
        })
        .expect("the admin URL");

    // SIGHUP reloads, and does not stop the demo.
    demo.signal("HUP");
    demo.line("the reload on SIGHUP", Duration::from_secs(10), |l| {
        l.contains("reload unchanged") || l.contains("reload applied")
    })
    .await;
    assert!(demo.running(), "SIGHUP must not stop the demo");
    let policies: Value = client()
        .get(format!("{admin}/v1/policies"))
        .send()
        .await
        .expect("policies")
        .json()
        .await
        .expect("JSON");
    assert!(
        policies["history"]
            .as_array()
            .is_some_and(|h| h.iter().any(|r| r["trigger"] == "signal")),
        "{policies:#}"
    );

    demo.signal("TERM");
    let code = demo.exit(Duration::from_secs(20)).await;
    assert_eq!(code, Some(0), "stderr:\n{}", demo.stderr());
    assert!(demo.stdout().contains("== summary"), "{}", demo.stdout());
}

#[cfg(unix)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_binary_runs_the_fake_alone_with_the_faults_given() {
    let mut demo = crate::support::e2e::Spawned::start(&[
        "demo",
        "--fake-only",
        "--fake-listen",
        "127.0.0.1:0",
        "--faults",
        r#"{"error_rate": 1, "error_statuses": [503], "rate_limit": {"enabled": false}}"#,
    ]);
    let line = demo
        .line("the fake's URL", Duration::from_secs(30), |l| {
            l.trim_start().starts_with("fake Clay")
        })
        .await;
    let url = line
        .split_whitespace()
        .find(|w| w.starts_with("http://"))
        .expect("a URL")
        .to_owned();
    let control = demo
        .line("the control URL", Duration::ZERO, |l| {
            l.trim_start().starts_with("control API")
        })
        .await;
    let control = control
        .split_whitespace()
        .find(|w| w.starts_with("http://"))
        .expect("a URL")
        .to_owned();
    let answer = client()
        .get(format!("{url}/v1/companies/acme.com"))
        .bearer_auth("demo-key")
        .send()
        .await
        .expect("the fake answers");
    assert_eq!(answer.status(), 503, "error_rate 1 with status 503");
    let faults: Value = client()
        .get(&control)
        .send()
        .await
        .expect("faults")
        .json()
        .await
        .expect("JSON");
    assert_eq!(faults["error_rate"], 1.0, "{faults}");
    assert_eq!(faults["seed"], 42, "seeded with --seed: {faults}");
    assert!(
        demo.stdout().contains("claygate serve"),
        "how to point claygate at it"
    );
    demo.signal("TERM");
    assert_eq!(demo.exit(Duration::from_secs(20)).await, Some(0));
}

#[test]
fn bad_faults_are_refused_naming_the_field() {
    for (faults, field, why) in [
        (r#"{"eror_rate": 1}"#, "eror_rate", "unknown field"),
        (r#"{"error_rate": 2}"#, "error_rate", "within 0 and 1"),
        (r#"{"latency_ms": "slow"}"#, "latency_ms", "invalid type"),
        (r#"{"outage": "meteor"}"#, "outage", "unknown variant"),
        ("{error_rate: 1}", "not JSON", ""),
    ] {
        let out = crate::support::run(&["demo", "--fake-only", "--faults", faults]);
        let stderr = crate::support::stderr(&out);
        assert_eq!(out.status.code(), Some(2), "{faults}: {stderr}");
        assert!(
            stderr.contains(field) && stderr.contains(why),
            "{faults}: {stderr}"
        );
    }
    let out = crate::support::run(&["demo", "--scenario", "outage", "--faults", "{}"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        crate::support::stderr(&out).contains("cannot be used with"),
        "{}",
        crate::support::stderr(&out)
    );
}
