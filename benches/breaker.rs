//! Circuit breaker hot paths: rejecting while open (the fail-fast path, target
//! under 300 ns) and admitting plus recording while closed.
//!
//! Run with `cargo bench --bench breaker`.

use std::hint::black_box;
use std::time::{Duration, Instant};

use claygate::pipeline::Verdict;
use claygate::pipeline::breaker::{Breaker, BreakerConfig};
use claygate::policy::model::BreakerMode;
use criterion::{Criterion, criterion_group, criterion_main};

fn config() -> BreakerConfig {
    BreakerConfig {
        mode: BreakerMode::Enforce,
        error_threshold_percentage: 50,
        volume_threshold: 10,
        window: Duration::from_secs(10),
        buckets: 10,
        // Long enough that the breaker stays open for the whole run.
        reset_timeout: Duration::from_secs(3600),
        max_reset_timeout: None,
        half_open_trials: 1,
        half_open_max_wait: Duration::from_secs(60),
        slow_call: Some(claygate::pipeline::breaker::SlowCallConfig {
            duration: Duration::from_secs(1),
            threshold_percentage: 80,
        }),
    }
}

/// A breaker opened by its window, as in production.
fn tripped() -> Breaker {
    let breaker = Breaker::new(config());
    for _ in 0..10 {
        if let Ok(permit) = breaker.try_acquire() {
            permit.record(Verdict::Failure, Duration::from_millis(5));
        }
    }
    assert!(breaker.try_acquire().is_err(), "the breaker is open");
    breaker
}

fn fail_fast(c: &mut Criterion) {
    let mut group = c.benchmark_group("breaker/fail_fast");

    let open = tripped();
    group.bench_function("open", |b| {
        b.iter(|| black_box(open.try_acquire().is_err()));
    });

    let forced = Breaker::new(config());
    forced.force_open();
    group.bench_function("forced_open", |b| {
        b.iter(|| black_box(forced.try_acquire().is_err()));
    });

    // Every thread rejects at once: the case an outage produces.
    let threads = std::thread::available_parallelism()
        .map_or(4, |n| n.get())
        .min(8);
    let shared = tripped();
    group.bench_function(format!("open_{threads}_threads"), |b| {
        b.iter_custom(|iters| {
            let start = Instant::now();
            std::thread::scope(|s| {
                for _ in 0..threads {
                    s.spawn(|| {
                        for _ in 0..iters {
                            black_box(shared.try_acquire().is_err());
                        }
                    });
                }
            });
            start.elapsed()
        });
    });
    group.finish();
}

fn closed(c: &mut Criterion) {
    let mut group = c.benchmark_group("breaker/closed");

    let breaker = Breaker::new(config());
    group.bench_function("acquire_record_success", |b| {
        b.iter(|| {
            if let Ok(permit) = breaker.try_acquire() {
                permit.record(black_box(Verdict::Success), Duration::from_millis(5));
            }
        });
    });

    let breaker = Breaker::new(config());
    group.bench_function("acquire_drop", |b| {
        b.iter(|| drop(black_box(breaker.try_acquire())));
    });
    group.finish();
}

criterion_group!(benches, fail_fast, closed);
criterion_main!(benches);
