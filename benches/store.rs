//! The embedded store: durable `dlq_insert` throughput with 1 and with 64
//! concurrent writers (target: at least 5,000 durable enqueues/s with
//! concurrency, which group commit reaches by sharing one fsync between
//! every insert queued while the previous commit ran), and `idempotency_get`
//! look-ups on a store holding 10,000 records, one at a time and 4 at a
//! time (the read pool's size).
//!
//! Then the path a duplicate really takes: `Runtime::invoke` replaying a
//! completed key (params check, key derivation, fingerprint, the in-process
//! table, a read of the record, the answer), alone and while 16 tasks keep
//! the writer busy with durable DLQ inserts; and, for comparison, what a
//! replay cost when it went through `idempotency_claim` on the writer
//! (before review finding 9), under the same load.
//!
//! Every insert is acknowledged only once committed with `synchronous=FULL`,
//! so the figures depend on the disk's fsync latency. The store lives under
//! cargo's `target/tmp`, on the same disk as the build.
//!
//! Run: `cargo bench --bench store`. Figures are in the README.

use std::hint::black_box;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use claygate::clock::Clock;
use claygate::compile::{CompileOptions, compile_with};
use claygate::pipeline::http::{HttpConfig, Rendered, Transport};
use claygate::pipeline::{Failure, Reply};
use claygate::policy::{LoadOptions, load_str};
use claygate::runtime::{Answer, InvokeRequest, Runtime};
use claygate::store::sqlite::SqliteStore;
use claygate::store::{Claim, NewDeadLetter, Store, StoredResponse};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use futures_util::future::BoxFuture;
use http::{HeaderMap, StatusCode};
use serde_json::json;

const RECORDS: u64 = 10_000;

fn letter(n: u64) -> NewDeadLetter {
    NewDeadLetter {
        operation: "push_row".into(),
        params: json!({"table_id": "t_123", "row": {"email": "ada@example.com", "n": n}}),
        idempotency_key: Some(format!("bench-{n}")),
        priority: Some("bulk".into()),
        error_code: "breaker_open".into(),
        error_message: "the breaker of push_row is open".into(),
        call_attempts: 3,
        first_attempt_at: 1_700_000_000_000,
        last_attempt_at: 1_700_000_001_000,
        next_attempt_at: 1_700_000_031_000,
    }
}

/// `iters` inserts shared by `writers` tasks; answers the wall time.
async fn inserts(store: &Arc<SqliteStore>, writers: u64, iters: u64) -> Duration {
    let started = Instant::now();
    let tasks: Vec<_> = (0..writers)
        .map(|task| {
            let store = Arc::clone(store);
            let rounds = iters / writers + u64::from(task < iters % writers);
            tokio::spawn(async move {
                for n in 0..rounds {
                    black_box(store.dlq_insert(letter(n)).await.expect("dlq_insert"));
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.expect("bench task");
    }
    started.elapsed()
}

fn temp_dir() -> tempfile::TempDir {
    tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("a temp dir under target/tmp")
}

fn dlq_insert(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let dir = temp_dir();
    let store = Arc::new(
        runtime
            .block_on(SqliteStore::open(dir.path()))
            .expect("the store opens"),
    );

    let mut group = c.benchmark_group("store: durable dlq_insert");
    group.throughput(Throughput::Elements(1));
    group.measurement_time(Duration::from_secs(10));
    for writers in [1, 64] {
        group.bench_function(format!("{writers} concurrent writers"), |b| {
            b.to_async(&runtime)
                .iter_custom(|iters| inserts(&store, writers, iters))
        });
    }
    group.finish();
    runtime.block_on(store.close()).expect("close");
}

fn idempotency_get(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let dir = temp_dir();
    let store = Arc::new(
        runtime
            .block_on(SqliteStore::open(dir.path()))
            .expect("the store opens"),
    );
    let key = |n: u64| format!("{n:064x}");
    runtime.block_on(async {
        let answer = StoredResponse {
            status: 200,
            content_type: Some("application/json".into()),
            body: bytes::Bytes::from_static(
                br#"{"person":{"name":"Ada Lovelace","title":"Analyst"}}"#,
            ),
        };
        let tasks: Vec<_> = (0..64)
            .map(|task| {
                let store = Arc::clone(&store);
                let answer = answer.clone();
                tokio::spawn(async move {
                    for n in (task..RECORDS).step_by(64) {
                        let k = key(n);
                        let Claim::Claimed(token) = store
                            .idempotency_claim("enrich_person", &k, "fp", 1, 2, i64::MAX)
                            .await
                            .expect("claim")
                        else {
                            panic!("a fresh key");
                        };
                        store
                            .idempotency_complete("enrich_person", &k, &token, &answer, i64::MAX)
                            .await
                            .expect("complete");
                    }
                })
            })
            .collect();
        for task in tasks {
            task.await.expect("fill task");
        }
    });
    let keys: Arc<Vec<String>> = Arc::new((0..RECORDS).map(key).collect());

    let mut group = c.benchmark_group("store: idempotency_get, 10,000 records");
    group.throughput(Throughput::Elements(1));
    group.bench_function("one at a time", |b| {
        let mut n = 0usize;
        b.to_async(&runtime).iter(|| {
            n = (n + 7_919) % keys.len();
            let store = Arc::clone(&store);
            let keys = Arc::clone(&keys);
            async move {
                let found = store
                    .idempotency_get("enrich_person", &keys[n])
                    .await
                    .expect("idempotency_get");
                assert!(black_box(found).is_some());
            }
        })
    });
    group.bench_function("4 concurrent readers", |b| {
        b.to_async(&runtime).iter_custom(|iters| {
            let store = Arc::clone(&store);
            let keys = Arc::clone(&keys);
            async move {
                let started = Instant::now();
                let tasks: Vec<_> = (0..4u64)
                    .map(|task| {
                        let store = Arc::clone(&store);
                        let keys = Arc::clone(&keys);
                        let rounds = iters / 4 + u64::from(task < iters % 4);
                        tokio::spawn(async move {
                            for round in 0..rounds {
                                let n = usize::try_from((round * 4 + task) * 7_919 % RECORDS)
                                    .expect("an index");
                                let found = store
                                    .idempotency_get("enrich_person", &keys[n])
                                    .await
                                    .expect("idempotency_get");
                                assert!(black_box(found).is_some());
                            }
                        })
                    })
                    .collect();
                for task in tasks {
                    task.await.expect("bench task");
                }
                started.elapsed()
            }
        })
    });
    group.finish();
    runtime.block_on(store.close()).expect("close");
}

/// Answers every request at once with `200` and a small JSON body.
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
                body: Bytes::from_static(br#"{"person":{"name":"Ada Lovelace"}}"#),
            })
        })
    }
}

const POLICY: &str = r#"
version: 1
upstreams:
  clay:
    base_url: "http://127.0.0.1:9"
    priorities:
      normal: { concurrency: 64, queue: 1000, queue_timeout: 5s }
timeouts: { request: 5s }
operations:
  enrich_person:
    upstream: clay
    request: { method: POST, path: /v1/people/enrich, body: { email: "{{ params.email }}" } }
    params_schema: { type: object, required: [email], properties: { email: { type: string } } }
    idempotency: { key: [email], ttl: 24h }
"#;

fn call(n: u64) -> InvokeRequest {
    InvokeRequest {
        params: json!({ "email": format!("person-{n}@example.com") }),
        ..InvokeRequest::default()
    }
}

/// `iters` replays shared by `tasks` tasks; answers the wall time.
async fn replays(runtime: &Arc<Runtime>, tasks: u64, iters: u64) -> Duration {
    let started = Instant::now();
    let handles: Vec<_> = (0..tasks)
        .map(|task| {
            let runtime = Arc::clone(runtime);
            let rounds = iters / tasks + u64::from(task < iters % tasks);
            tokio::spawn(async move {
                for round in 0..rounds {
                    let n = (round * tasks + task) * 7_919 % RECORDS;
                    let out = runtime.invoke("enrich_person", call(n)).await;
                    assert!(
                        matches!(out.answer, Answer::Ok(_))
                            && out.idempotency.as_ref().is_some_and(|m| m.replayed),
                        "a replay: {out:?}"
                    );
                }
            })
        })
        .collect();
    for h in handles {
        h.await.expect("bench task");
    }
    started.elapsed()
}

/// Keeps the writer busy with durable inserts until dropped.
struct Load(Arc<AtomicBool>);

impl Load {
    fn start(store: &Arc<dyn Store>, writers: u64) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        for w in 0..writers {
            let store = Arc::clone(store);
            let stop = Arc::clone(&stop);
            tokio::spawn(async move {
                let mut n = w;
                while !stop.load(Ordering::Relaxed) {
                    store.dlq_insert(letter(n)).await.expect("dlq_insert");
                    n += writers;
                }
            });
        }
        Load(stop)
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

fn invoke_replay(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let dir = temp_dir();
    let store: Arc<dyn Store> = Arc::new(
        rt.block_on(SqliteStore::open(dir.path()))
            .expect("the store opens"),
    );
    let loaded = load_str("bench.yaml", POLICY, LoadOptions::default());
    let set = loaded.set.expect("the bench policy is valid");
    let options = CompileOptions {
        env: Box::new(|_| None),
        transport: Some(Box::new(|_: &HttpConfig| {
            Arc::new(Immediate) as Arc<dyn Transport>
        })),
    };
    let compiled = compile_with(&set, None, &options).unwrap_or_else(|e| panic!("compile: {e:?}"));
    let runtime = Runtime::new(compiled, Arc::clone(&store), Clock::new());
    // 10,000 completed keys, each from a real first call.
    rt.block_on(async {
        let tasks: Vec<_> = (0..64)
            .map(|task| {
                let runtime = Arc::clone(&runtime);
                tokio::spawn(async move {
                    for n in (task..RECORDS).step_by(64) {
                        let out = runtime.invoke("enrich_person", call(n)).await;
                        assert!(matches!(out.answer, Answer::Ok(_)), "{out:?}");
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.expect("fill task");
        }
    });
    let keys: Vec<String> = (0..RECORDS)
        .map(|n| {
            claygate::pipeline::idempotency::derive_key(
                "enrich_person",
                &["email".to_owned()],
                &call(n).params,
            )
            .expect("derivable")
            .expect("declared")
        })
        .collect();
    let keys = Arc::new(keys);

    let mut group = c.benchmark_group("invoke: replay of a completed key, 10,000 keys");
    group.throughput(Throughput::Elements(1));
    group.bench_function("one at a time", |b| {
        b.to_async(&rt)
            .iter_custom(|iters| replays(&runtime, 1, iters))
    });
    group.bench_function("4 concurrent", |b| {
        b.to_async(&rt)
            .iter_custom(|iters| replays(&runtime, 4, iters))
    });
    group.bench_function("one at a time, 16 durable DLQ writers busy", |b| {
        b.to_async(&rt).iter_custom(|iters| {
            let runtime = Arc::clone(&runtime);
            let store = Arc::clone(&store);
            async move {
                let _load = Load::start(&store, 16);
                replays(&runtime, 1, iters).await
            }
        })
    });
    // What a replay cost before: a claim of the completed key, on the writer.
    group.bench_function(
        "before: idempotency_claim of a completed key, 16 durable DLQ writers busy",
        |b| {
            b.to_async(&rt).iter_custom(|iters| {
                let store = Arc::clone(&store);
                let keys = Arc::clone(&keys);
                async move {
                    let _load = Load::start(&store, 16);
                    let started = Instant::now();
                    for i in 0..iters {
                        let n = usize::try_from(i * 7_919 % RECORDS).expect("an index");
                        let found = store
                            .idempotency_claim("enrich_person", &keys[n], "fp", 1, 2, i64::MAX)
                            .await
                            .expect("claim");
                        assert!(matches!(black_box(found), Claim::Existing(_)));
                    }
                    started.elapsed()
                }
            })
        },
    );
    group.finish();
    rt.block_on(store.close()).expect("close");
}

criterion_group!(benches, dlq_insert, idempotency_get, invoke_replay);
criterion_main!(benches);
