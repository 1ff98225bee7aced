//! Cost of a bulkhead acquire/release pair: uncontended, and with 64 tasks
//! fighting over 8 slots on a multi-thread runtime (one class, then three
//! classes sharing a `max_concurrency` of 8).
//!
//! Contended figures are wall time per pair across all tasks, so they include
//! queueing, hand-over through the oneshot channel and task wake-ups. A
//! `tokio::sync::Semaphore` with 8 permits under the same load is measured
//! as a baseline (it has no classes, no queue bound and no queue timeout).

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use claygate::pipeline::bulkhead::{Bulkhead, BulkheadConfig, ClassLimits};
use claygate::policy::model::Priority;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};

const TASKS: u64 = 64;

fn limits(concurrency: u32) -> ClassLimits {
    ClassLimits {
        concurrency,
        queue: 1_000,
        queue_timeout: Duration::from_secs(600),
    }
}

fn one_class(concurrency: u32) -> Arc<Bulkhead> {
    Bulkhead::new(BulkheadConfig {
        classes: [(Priority::Normal, limits(concurrency))]
            .into_iter()
            .collect(),
        max_concurrency: None,
    })
}

fn three_classes_sharing(max: u32) -> Arc<Bulkhead> {
    Bulkhead::new(BulkheadConfig {
        classes: [Priority::Critical, Priority::Normal, Priority::Bulk]
            .into_iter()
            .map(|p| (p, limits(max)))
            .collect(),
        max_concurrency: Some(max),
    })
}

/// `iters` acquire -> yield -> release pairs split over `TASKS` tasks, each
/// task using `priority_of(task)`; returns the wall time.
async fn contended(
    bulkhead: &Arc<Bulkhead>,
    iters: u64,
    priority_of: fn(u64) -> Priority,
) -> Duration {
    let started = Instant::now();
    let tasks: Vec<_> = (0..TASKS)
        .map(|task| {
            let bulkhead = Arc::clone(bulkhead);
            let rounds = iters / TASKS + u64::from(task < iters % TASKS);
            let priority = priority_of(task);
            tokio::spawn(async move {
                for _ in 0..rounds {
                    let permit = bulkhead.acquire(priority).await;
                    let permit = black_box(permit).expect("the queue is deep enough");
                    tokio::task::yield_now().await;
                    drop(permit);
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.expect("bench task");
    }
    started.elapsed()
}

fn bench(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");

    let mut group = c.benchmark_group("bulkhead");
    group.throughput(Throughput::Elements(1));
    group.measurement_time(Duration::from_secs(5));

    let bulkhead = one_class(8);
    group.bench_function("uncontended acquire+release", |b| {
        b.to_async(&runtime).iter(|| async {
            let permit = bulkhead.acquire(Priority::Normal).await;
            drop(black_box(permit));
        })
    });

    let bulkhead = one_class(8);
    group.bench_function("64 tasks, 8 slots, one class", |b| {
        b.to_async(&runtime)
            .iter_custom(|iters| contended(&bulkhead, iters, |_| Priority::Normal))
    });

    let bulkhead = three_classes_sharing(8);
    group.bench_function("64 tasks, 3 classes sharing 8 slots", |b| {
        b.to_async(&runtime).iter_custom(|iters| {
            contended(&bulkhead, iters, |task| {
                [Priority::Critical, Priority::Normal, Priority::Bulk][(task % 3) as usize]
            })
        })
    });

    let semaphore = Arc::new(tokio::sync::Semaphore::new(8));
    group.bench_function("baseline: tokio Semaphore, 64 tasks, 8 permits", |b| {
        b.to_async(&runtime).iter_custom(|iters| {
            let semaphore = Arc::clone(&semaphore);
            async move {
                let started = Instant::now();
                let tasks: Vec<_> = (0..TASKS)
                    .map(|task| {
                        let semaphore = Arc::clone(&semaphore);
                        let rounds = iters / TASKS + u64::from(task < iters % TASKS);
                        tokio::spawn(async move {
                            for _ in 0..rounds {
                                let permit = semaphore.acquire().await.expect("never closed");
                                tokio::task::yield_now().await;
                                drop(black_box(permit));
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
}

criterion_group!(benches, bench);
criterion_main!(benches);
