//! How long `claygate validate` takes on a large policy set: 1,000
//! operations over 20 files (target: under 150 ms on a 2-core machine).
//!
//! Run: `cargo bench --bench validate`. The figure is in the README.

use std::fmt::Write as _;
use std::hint::black_box;
use std::path::PathBuf;

use claygate::policy::{LoadOptions, load_paths};
use criterion::{Criterion, criterion_group, criterion_main};

/// Writes 20 files: one with the upstreams, timeouts and defaults, and 19
/// holding 1,000 operations of four realistic shapes between them.
fn generate(dir: &std::path::Path, operations: usize, files: usize) {
    let mut head = String::from("version: 1\nupstreams:\n");
    for u in 0..4 {
        let _ = write!(
            head,
            "  up{u}:\n    base_url: \"${{env:UP{u}_URL:-https://api{u}.example.com}}\"\n    headers: {{ Authorization: \"Bearer ${{env:UP{u}_KEY:-k}}\" }}\n    rate_limit: {{ per_second: 10, burst: 20 }}\n    priorities:\n      critical: {{ concurrency: 8, queue: 100, queue_timeout: 1s }}\n      normal: {{ concurrency: 6, queue: 200, queue_timeout: 10s }}\n      bulk: {{ concurrency: 2, queue: 1000, queue_timeout: 60s }}\n"
        );
    }
    head.push_str("timeouts: { connect: 2s, fast: 800ms, request: 30s, upload: 120s }\n");
    head.push_str("defaults:\n  timeout: request\n  breaker: { volume_threshold: 10, window: 10s, buckets: 10, reset_timeout: 30s }\n  retry: { max_attempts: 3, backoff: { initial: 200ms, max: 5s } }\n");
    std::fs::write(dir.join("00-base.yaml"), head).expect("write base");
    let per_file = operations.div_ceil(files - 1);
    for f in 1..files {
        let mut text = String::from("version: 1\noperations:\n");
        for i in 0..per_file {
            let n = (f - 1) * per_file + i;
            if n >= operations {
                break;
            }
            let up = n % 4;
            let _ = match n % 4 {
                0 => write!(
                    text,
                    "  enrich_{n}:\n    upstream: up{up}\n    request: {{ method: POST, path: /v1/people/enrich, body: {{ email: \"{{{{ params.email }}}}\" }} }}\n    params_schema: {{ type: object, required: [email], properties: {{ email: {{ type: string }} }} }}\n    deadline: 45s\n    idempotency: {{ key: [email] }}\n    fallback: {{ cache: {{ fresh: 5m, stale: 1h, very_stale: 24h }} }}\n"
                ),
                1 => write!(
                    text,
                    "  push_{n}:\n    upstream: up{up}\n    request: {{ method: POST, path: \"/v1/tables/{{{{ params.table_id }}}}/rows\", body: \"{{{{ params.row }}}}\" }}\n    params_schema: {{ type: object, properties: {{ table_id: {{ type: string }}, row: {{ type: object }} }} }}\n    timeout: upload\n    deadline: 5m\n    priority: bulk\n    idempotency: {{ key: [table_id, row] }}\n    dlq: {{ max_attempts: 5, backoff: {{ initial: 30s, max: 30m }} }}\n"
                ),
                2 => write!(
                    text,
                    "  lookup_{n}:\n    upstream: up{up}\n    request: {{ method: GET, path: \"/v1/companies/{{{{ params.domain }}}}\", query: {{ fields: name }} }}\n    params_schema: {{ type: object, properties: {{ domain: {{ type: string }} }} }}\n    timeout: fast\n    deadline: 2s\n    priority: critical\n    retry: {{ max_attempts: 2, backoff: {{ initial: 50ms, max: 200ms }} }}\n    breaker: {{ volume_threshold: 20, window: 30s }}\n"
                ),
                _ => write!(
                    text,
                    "  status_{n}:\n    upstream: up{up}\n    request: {{ method: GET, path: /v1/status }}\n    timeout: 5s\n    breaker: {{ slow_call: {{ duration: 2s, threshold_percentage: 80 }} }}\n"
                ),
            };
        }
        std::fs::write(dir.join(format!("{f:02}-ops.yaml")), text).expect("write ops");
    }
}

fn validate_large_set(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("temp dir");
    generate(dir.path(), 1_000, 20);
    let paths: Vec<PathBuf> = vec![dir.path().to_path_buf()];
    let loaded = load_paths(&paths, LoadOptions::default()).expect("readable");
    assert!(
        loaded.diagnostics.is_empty(),
        "the generated set must be clean: {:#?}",
        &loaded.diagnostics[..loaded.diagnostics.len().min(3)]
    );
    let set = loaded.set.expect("a valid set");
    assert_eq!(set.operations.len(), 1_000);
    assert_eq!(loaded.sources.files.len(), 20);

    c.bench_function("validate 1000 operations in 20 files", |b| {
        b.iter(|| {
            let loaded = load_paths(black_box(&paths), LoadOptions::default()).expect("readable");
            black_box(loaded.set.is_some())
        })
    });
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(20);
    targets = validate_large_set
}
criterion_main!(benches);
