//! Scale: how long loading, validating and compiling a policy set of 10,
//! 1,000 and 10,000 operations takes (target: 10,000 operations compile in
//! under 1 s), each phase timed on its own.
//!
//! The sets are generated (see [`write_set`]): 8 upstreams (four rate
//! limited with three bulkhead classes, four internal ones without a rate
//! limit), and operations of six shapes, with `params_schema` (patterns,
//! formats, bounds), path, query, header and body templates, breakers,
//! retries, and some idempotency, fallback caches, static fallbacks and
//! DLQs, 500 operations per file.
//!
//! Phases, each the wall-clock median of several rounds (min–max in
//! brackets) and the median CPU time of all threads (loading checks files
//! on every core when the set is large):
//! - load + validate: `load_paths` (read, YAML parse, JSON Schema, model,
//!   semantic checks), as `claygate validate` and `serve` do;
//! - compile: `compile_plan_owned` on the checked set with nothing before it
//!   (what `serve` does at start: pipelines, params validators, templates,
//!   one HTTP client, bulkhead and limiter per upstream);
//! - recompile: `compile_plan_owned` next to the previous generation,
//!   carrying its state over (what a hot reload does after validating);
//! - serve's start: `reload::prepare` (read, hash, load, validate,
//!   compile), all that `claygate serve` does with the policies at start.
//!
//! Run: `cargo bench --bench scale`. Under `cargo test --benches` (no
//! `--bench` argument) it makes one round of the two smaller sets, as a
//! smoke test.
//!
//! `cargo bench --bench scale -- --write DIR OPERATIONS` writes a generated
//! set to DIR instead and exits (benches/proxy/scale.sh serves those).

use std::fmt::Write as _;
use std::hint::black_box;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use claygate::compile::{CompileOptions, compile_plan_owned, compile_with};
use claygate::policy::{LoadOptions, load_paths};
use claygate::reload::prepare;

/// Operations per generated file.
const PER_FILE: usize = 500;
/// Upstreams in a generated set.
const UPSTREAMS: usize = 8;
/// The target of issue 8 for 10,000 operations.
const TARGET: Duration = Duration::from_secs(1);

/// Writes a set of `operations` operations to `dir`: `00-upstreams.yaml`
/// (upstreams, timeouts, defaults) and files of [`PER_FILE`] operations.
///
/// Upstream `up{u}`'s base URL is `${env:UP{u}_URL:-https://api{u}.example.com}`,
/// so a benchmark can point them all at a local server.
fn write_set(dir: &Path, operations: usize, schemas: Schemas) {
    let mut head = String::from("version: 1\nupstreams:\n");
    for u in 0..UPSTREAMS {
        let _ = write!(
            head,
            "  up{u}:\n    base_url: \"${{env:UP{u}_URL:-https://api{u}.example.com}}\"\n    headers:\n      Authorization: \"Bearer ${{env:UP{u}_KEY:-k}}\"\n      User-Agent: claygate-bench/0.1\n"
        );
        if u < UPSTREAMS / 2 {
            // A rate-limited SaaS API, like Clay.
            let _ = write!(
                head,
                "    rate_limit: {{ per_second: {}, burst: {}, critical_reserve_percent: 20 }}\n    probe: {{ method: GET, path: /health, interval: 15s, timeout: 2s }}\n    max_concurrency: 16\n    priorities:\n      critical: {{ concurrency: 8, queue: 100, queue_timeout: 1s }}\n      normal: {{ concurrency: 6, queue: 200, queue_timeout: 10s }}\n      bulk: {{ concurrency: 2, queue: 1000, queue_timeout: 60s }}\n",
                10 * (u + 1),
                20 * (u + 1)
            );
        } else {
            // An internal service: no rate limit, wide bulkheads.
            head.push_str("    max_concurrency: 256\n    max_response_bytes: 1048576\n    priorities:\n      critical: { concurrency: 64, queue: 256, queue_timeout: 1s }\n      normal: { concurrency: 64, queue: 256, queue_timeout: 1s }\n      bulk: { concurrency: 8, queue: 64, queue_timeout: 1s }\n");
        }
    }
    head.push_str("timeouts: { connect: 2s, fast: 800ms, request: 30s, upload: 120s }\n");
    head.push_str("defaults:\n  timeout: request\n  priority: normal\n  breaker: { error_threshold_percentage: 50, volume_threshold: 10, window: 10s, buckets: 10, reset_timeout: 30s, max_reset_timeout: 5m }\n  retry: { max_attempts: 3, backoff: { initial: 200ms, multiplier: 2, max: 5s, jitter: full }, on: [connect_error, timeout, 429, 502, 503, 504], budget_percent: 20 }\nhealth: { dlq_degraded_above: 100 }\n");
    std::fs::write(dir.join("00-upstreams.yaml"), head).expect("write the upstreams file");

    for (f, first) in (0..operations).step_by(PER_FILE).enumerate() {
        let mut text = String::from("version: 1\noperations:\n");
        for n in first..operations.min(first + PER_FILE) {
            operation(&mut text, n, schemas);
        }
        std::fs::write(dir.join(format!("{:03}-operations.yaml", f + 1)), text)
            .expect("write an operations file");
    }
}

/// Whether operations of one shape share their `params_schema`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Schemas {
    /// Operations of a shape have equal schemas (6 distinct in a set).
    Shared,
    /// Every schema has a `title` naming its operation, so none are equal:
    /// the worst case for sharing validators.
    Distinct,
}

/// Appends operation `n`: one of six shapes, on upstream `n % 8`.
fn operation(text: &mut String, n: usize, schemas: Schemas) {
    let start = text.len();
    shape(text, n);
    if schemas == Schemas::Distinct {
        let titled = text[start..].replace(
            "    params_schema:\n",
            &format!("    params_schema:\n      title: params of operation {n}\n"),
        );
        text.truncate(start);
        text.push_str(&titled);
    }
}

/// Writes operation `n` of shape `n % 6`.
fn shape(text: &mut String, n: usize) {
    let up = n % UPSTREAMS;
    let _ = match n % 6 {
        0 => write!(
            text,
            "  enrich_person_{n}:
    upstream: up{up}
    description: Enrich a person from their work email.
    request: {{ method: POST, path: /v1/people/enrich, body: {{ email: \"{{{{ params.email }}}}\", source: claygate }} }}
    params_schema:
      type: object
      required: [email]
      additionalProperties: false
      properties: {{ email: {{ type: string, format: email, maxLength: 320 }} }}
    deadline: 45s
    idempotency: {{ key: [email], ttl: 24h }}
    fallback: {{ cache: {{ fresh: 5m, stale: 1h, very_stale: 24h, max_entries: 1000 }} }}
"
        ),
        1 => write!(
            text,
            "  push_row_{n}:
    upstream: up{up}
    request: {{ method: POST, path: \"/v1/tables/{{{{ params.table_id }}}}/rows\", body: \"{{{{ params.row }}}}\" }}
    params_schema:
      type: object
      required: [table_id, row]
      additionalProperties: false
      properties:
        table_id: {{ type: string, pattern: \"^[A-Za-z0-9_-]{{1,64}}$\" }}
        row: {{ type: object, maxProperties: 200 }}
    timeout: upload
    deadline: 5m
    priority: bulk
    idempotency: {{ key: [table_id, row], ttl: 24h }}
    dlq:
      max_attempts: 5
      backoff: {{ initial: 30s, multiplier: 2, max: 30m }}
      redrive_rate: 10
      retention: 14d
      alert: {{ webhook: \"${{env:ALERT_WEBHOOK_URL:-}}\" }}
"
        ),
        2 => write!(
            text,
            "  lookup_company_{n}:
    upstream: up{up}
    request:
      method: GET
      path: \"/v1/companies/{{{{ params.domain }}}}\"
      query: {{ fields: \"name,industry,employee_count\" }}
    params_schema:
      type: object
      required: [domain]
      additionalProperties: false
      properties:
        domain: {{ type: string, pattern: \"^[A-Za-z0-9.-]+\\\\.[A-Za-z]{{2,}}$\", maxLength: 253 }}
    timeout: fast
    deadline: 2s
    priority: critical
    retry: {{ max_attempts: 2, backoff: {{ initial: 50ms, max: 200ms }}, on: [connect_error, 502, 503], respect_retry_after: false }}
    breaker: {{ volume_threshold: 20, window: 30s, buckets: 10, reset_timeout: 10s }}
    fallback:
      cache: {{ fresh: 10m, stale: 6h, very_stale: 3d }}
      static: {{ known: false }}
"
        ),
        3 => write!(
            text,
            "  status_{n}:
    upstream: up{up}
    request: {{ method: GET, path: /v1/status }}
    timeout: 5s
    breaker: {{ slow_call: {{ duration: 2s, threshold_percentage: 80 }} }}
"
        ),
        4 => write!(
            text,
            "  update_contact_{n}:
    upstream: up{up}
    request:
      method: PATCH
      path: \"/v1/contacts/{{{{ params.id }}}}\"
      headers: {{ X-Request-Source: \"{{{{ params.source }}}}\", X-Api-Version: \"2026-01\" }}
      body: {{ name: \"{{{{ params.name }}}}\", note: \"updated by {{{{ params.source }}}}\", tags: [crm, \"{{{{ params.source }}}}\"] }}
    params_schema:
      type: object
      required: [id, name, source]
      properties:
        id: {{ type: string, minLength: 1, maxLength: 64 }}
        name: {{ type: string, maxLength: 200 }}
        source: {{ type: string, enum: [crm, import, api] }}
    timeout: 5s
    deadline: 20s
    retry: {{ max_attempts: 4, backoff: {{ initial: 100ms, max: 2s }}, on: [connect_error, timeout, 503] }}
    idempotency: {{ key: [id, name], on_concurrent: reject }}
"
        ),
        _ => write!(
            text,
            "  search_{n}:
    upstream: up{up}
    request:
      method: GET
      path: /v1/search
      query: {{ q: \"{{{{ params.q }}}}\", limit: \"{{{{ params.limit }}}}\", page: \"{{{{ params.page }}}}\" }}
    params_schema:
      type: object
      required: [q, limit, page]
      properties:
        q: {{ type: string, minLength: 1, maxLength: 500 }}
        limit: {{ type: integer, minimum: 1, maximum: 100 }}
        page: {{ type: integer, minimum: 0 }}
    timeout: fast
    deadline: 3s
    priority: critical
    breaker: {{ error_threshold_percentage: 30, volume_threshold: 50 }}
    fallback: {{ cache: {{ fresh: 1m, stale: 10m, very_stale: 1h, key: [q, limit, page] }} }}
"
        ),
    };
}

/// CPU time this process has used so far, every thread's, user and system
/// (Linux: `/proc/self/stat`, in ticks of 10 ms); `None` elsewhere.
fn cpu_time() -> Option<Duration> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name, which is in parentheses; utime and
    // stime are fields 14 and 15 of the whole line.
    let rest = stat.get(stat.rfind(')')? + 2..)?;
    let mut fields = rest.split(' ').skip(11);
    let user: u64 = fields.next()?.parse().ok()?;
    let system: u64 = fields.next()?.parse().ok()?;
    Some(Duration::from_millis((user + system) * 10))
}

/// One phase's samples: wall-clock time and CPU time.
#[derive(Default)]
struct Phase {
    wall: Vec<Duration>,
    cpu: Vec<Duration>,
}

impl Phase {
    /// Runs `f`, recording how long it took.
    fn time<R>(&mut self, f: impl FnOnce() -> R) -> R {
        let cpu = cpu_time();
        let started = Instant::now();
        let out = f();
        self.wall.push(started.elapsed());
        if let (Some(before), Some(after)) = (cpu, cpu_time()) {
            self.cpu.push(after.saturating_sub(before));
        }
        out
    }

    /// The median wall-clock time.
    fn median(&mut self) -> Duration {
        self.wall.sort();
        self.wall[self.wall.len() / 2]
    }
}

impl std::fmt::Display for Phase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        let mut wall = self.wall.clone();
        wall.sort();
        write!(
            f,
            "{:8.1} ms ({:.1}–{:.1})",
            ms(wall[wall.len() / 2]),
            ms(wall[0]),
            ms(wall[wall.len() - 1])
        )?;
        if !self.cpu.is_empty() {
            let mut cpu = self.cpu.clone();
            cpu.sort();
            write!(f, ", CPU {:.0} ms", ms(cpu[cpu.len() / 2]))?;
        }
        Ok(())
    }
}

/// Times the phases on a generated set of `operations`, `rounds` times;
/// answers the medians of compile and of serve's start.
fn measure(operations: usize, schemas: Schemas, rounds: usize) -> (Duration, Duration) {
    let dir = tempfile::tempdir().expect("a temp dir");
    write_set(dir.path(), operations, schemas);
    let paths: Vec<PathBuf> = vec![dir.path().to_path_buf()];
    let bytes: u64 = std::fs::read_dir(dir.path())
        .expect("the set's dir")
        .filter_map(|e| e.ok()?.metadata().ok())
        .map(|m| m.len())
        .sum();

    // Check once that the set is clean and complete.
    let loaded = load_paths(&paths, LoadOptions::default()).expect("readable");
    assert!(
        loaded.diagnostics.is_empty(),
        "the generated set must be clean: {:#?}",
        &loaded.diagnostics[..loaded.diagnostics.len().min(3)]
    );
    let set = loaded.set.expect("a valid set");
    assert_eq!(set.operations.len(), operations);
    let options = CompileOptions::default();
    let mut previous = compile_with(&set, None, &options).unwrap_or_else(|e| panic!("{e:?}"));

    let (mut load, mut compile, mut recompile, mut start) = Default::default();
    for _ in 0..rounds {
        let loaded = Phase::time(&mut load, || {
            load_paths(black_box(&paths), LoadOptions::default()).expect("readable")
        });
        let set = loaded.set.expect("a valid set");

        // Serve and reload hand the set they loaded to compile (no copy).
        let owned = set.clone();
        let compiled = Phase::time(&mut compile, || {
            let compiled = compile_plan_owned(black_box(owned), None, &options);
            if let Ok(c) = &compiled {
                c.activate();
            }
            compiled
        });
        let compiled = compiled.unwrap_or_else(|e| panic!("{e:?}"));
        assert_eq!(compiled.operations.len(), operations);

        let owned = set.clone();
        let next = Phase::time(&mut recompile, || {
            compile_plan_owned(black_box(owned), Some(&previous), &options)
        });
        let next = next.unwrap_or_else(|e| panic!("{e:?}"));
        assert!(next.carried.values().all(|c| c.breaker && c.http_client));

        // All of what `claygate serve` does with the policies at start.
        let prepared = Phase::time(&mut start, || prepare(black_box(&paths), None, &options, 0));
        let prepared = prepared.unwrap_or_else(|e| panic!("{e:?}"));
        assert_eq!(prepared.compiled.operations.len(), operations);

        // Dropping a generation is not part of any phase.
        drop(std::mem::replace(&mut previous, compiled));
        drop((next, prepared, set, loaded.sources));
    }
    let files = std::fs::read_dir(dir.path()).map_or(0, Iterator::count);
    let distinct = match schemas {
        Schemas::Shared => "6 distinct params_schemas",
        Schemas::Distinct => "every params_schema distinct",
    };
    println!(
        "{operations:>6} operations in {files} files ({:.1} KiB), {distinct}, {rounds} rounds:",
        bytes as f64 / 1024.0
    );
    println!("  load + validate            {load}");
    println!("  compile (cold)             {compile}");
    println!("  recompile (reload)         {recompile}");
    println!("  serve's start (prepare)    {start}");
    (compile.median(), start.median())
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let schemas = if args.iter().any(|a| a == "--distinct-schemas") {
        Schemas::Distinct
    } else {
        Schemas::Shared
    };
    if let Some(i) = args.iter().position(|a| a == "--write") {
        let (Some(dir), Some(Ok(operations))) =
            (args.get(i + 1), args.get(i + 2).map(|n| n.parse::<usize>()))
        else {
            eprintln!(
                "usage: cargo bench --bench scale -- --write DIR OPERATIONS [--distinct-schemas]"
            );
            std::process::exit(2);
        };
        std::fs::create_dir_all(dir).expect("create the policy directory");
        write_set(Path::new(dir), operations, schemas);
        return;
    }
    // `--ops N` measures one size only (for profiling).
    let only: Option<usize> = args
        .iter()
        .position(|a| a == "--ops")
        .and_then(|i| args.get(i + 1)?.parse().ok());
    let benching = args.iter().any(|a| a == "--bench");
    let sizes: &[(usize, Schemas, usize)] = if benching {
        &[
            (10, Schemas::Shared, 20),
            (1_000, Schemas::Shared, 10),
            (10_000, Schemas::Shared, 7),
            (10_000, Schemas::Distinct, 7),
        ]
    } else {
        &[(10, Schemas::Shared, 1), (1_000, Schemas::Distinct, 1)]
    };
    println!("scale: load + validate and compile time by number of operations");
    println!("  command: cargo bench --bench scale");
    println!(
        "  wall-clock median of the rounds (min–max), then the median CPU time of all threads"
    );
    println!("  serve's start = reload::prepare: read, hash, load + validate, compile");
    for &(operations, schemas, rounds) in sizes {
        if only.is_some_and(|n| n != operations) {
            continue;
        }
        let (compile, start) = measure(operations, schemas, rounds);
        if operations == 10_000 {
            let verdict = |d: Duration| if d < TARGET { "met" } else { "MISSED" };
            println!(
                "  target: 10,000 operations compile in < {} ms: compile alone {}, serve's start (load + validate + compile) {}",
                TARGET.as_millis(),
                verdict(compile),
                verdict(start),
            );
        }
    }
}
