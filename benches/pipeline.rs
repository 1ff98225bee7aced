//! In-process overhead of a full pipeline — deadline, retry, breaker,
//! bulkhead, rate limit, attempt timeout — with the HTTP step replaced by
//! an immediate in-memory answer (target: under 2 µs per call, median),
//! and the same pipeline failing fast with its breaker open.
//!
//! Run: `cargo bench --bench pipeline`. Figures are in the README.

use std::hint::black_box;
use std::sync::Arc;

use bytes::Bytes;
use claygate::compile::{CompileOptions, compile_with};
use claygate::pipeline::compose::Invocation;
use claygate::pipeline::http::{HttpConfig, Rendered, Transport};
use claygate::pipeline::{Failure, Reply};
use claygate::policy::{LoadOptions, load_str};
use criterion::{Criterion, criterion_group, criterion_main};
use futures_util::future::BoxFuture;
use http::{HeaderMap, StatusCode};

/// Answers every request at once with `200 {}`.
struct Immediate;

impl Transport for Immediate {
    fn send<'a>(
        &'a self,
        _request: &'a Rendered,
        _extra: &'a HeaderMap,
    ) -> BoxFuture<'a, Result<Reply, Failure>> {
        Box::pin(async {
            Ok(Reply {
                status: StatusCode::OK,
                headers: HeaderMap::new(),
                body: Bytes::from_static(b"{}"),
            })
        })
    }
}

const POLICY: &str = r#"
version: 1
upstreams:
  clay:
    base_url: "http://127.0.0.1:9"
    headers: { Authorization: "Bearer k" }
    rate_limit: { per_second: 1000000, burst: 1000000 }
    priorities:
      normal: { concurrency: 64, queue: 64, queue_timeout: 1s }
timeouts: { request: 5s }
operations:
  enrich_person:
    upstream: clay
    request: { method: POST, path: /v1/people/enrich, body: { email: "{{ params.email }}" } }
    params_schema: { type: object, properties: { email: { type: string } } }
    deadline: 10s
    retry: { max_attempts: 3 }
    idempotency: { key: [email] }
    breaker: { volume_threshold: 10, window: 10s, buckets: 10 }
"#;

fn pipeline_overhead(c: &mut Criterion) {
    let loaded = load_str("bench.yaml", POLICY, LoadOptions::default());
    let set = loaded.set.expect("the bench policy is valid");
    let options = CompileOptions {
        env: Box::new(|_| None),
        transport: Some(Box::new(|_: &HttpConfig| {
            Arc::new(Immediate) as Arc<dyn Transport>
        })),
    };
    let compiled = compile_with(&set, None, &options).unwrap_or_else(|e| panic!("compile: {e:?}"));
    let op = Arc::clone(&compiled.operations["enrich_person"]);
    let invocation = Invocation {
        params: serde_json::json!({"email": "ada@example.com"}),
        priority: None,
        idempotency_key: Some("k".into()),
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let check = rt.block_on(op.call(&invocation));
    assert!(check.result.is_ok(), "{:?}", check.result);

    c.bench_function("pipeline: every layer, in-memory upstream", |b| {
        b.to_async(&rt)
            .iter(|| async { black_box(op.call(black_box(&invocation)).await.attempts) })
    });

    op.breaker.force_open();
    c.bench_function("pipeline: breaker open, fail fast", |b| {
        b.to_async(&rt)
            .iter(|| async { black_box(op.call(black_box(&invocation)).await.attempts) })
    });
}

criterion_group!(benches, pipeline_overhead);
criterion_main!(benches);
