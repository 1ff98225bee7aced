//! The embedded store: durable `dlq_insert` throughput with 1 and with 64
//! concurrent writers (target: at least 5,000 durable enqueues/s with
//! concurrency, which group commit reaches by sharing one fsync between
//! every insert queued while the previous commit ran), and `idempotency_get`
//! look-ups on a store holding 10,000 records, one at a time and 4 at a
//! time (the read pool's size).
//!
//! Every insert is acknowledged only once committed with `synchronous=FULL`,
//! so the figures depend on the disk's fsync latency. The store lives under
//! cargo's `target/tmp`, on the same disk as the build.
//!
//! Run: `cargo bench --bench store`. Figures are in the README.

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use claygate::store::sqlite::SqliteStore;
use claygate::store::{NewDeadLetter, Store, StoredResponse};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
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
                        store
                            .idempotency_claim("enrich_person", &k, "fp", 1, 2, i64::MAX)
                            .await
                            .expect("claim");
                        store
                            .idempotency_complete("enrich_person", &k, &answer, i64::MAX)
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

criterion_group!(benches, dlq_insert, idempotency_get);
criterion_main!(benches);
