//! `claygate serve` as a process: the address it prints, its exit codes,
//! its logs, and its signals (SIGTERM/SIGINT drain and stop without losing
//! dead-letterable work; SIGHUP reloads).

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use claygate::store::sqlite::SqliteStore;
use claygate::store::{DlqFilter, DlqState, PageRequest, Store};
use serde_json::{Value, json};

use crate::support::upstream::{Behavior, FakeUpstream};
use crate::support::{claygate, tempdir, write};

/// Variables of `serve` that must not leak in from the environment running the tests.
const ENV: [&str; 7] = [
    "CLAYGATE_POLICIES",
    "CLAYGATE_DATA",
    "CLAYGATE_LISTEN",
    "CLAYGATE_ADMIN_TOKEN",
    "CLAYGATE_DRAIN_TIMEOUT",
    "CLAYGATE_LOG_FORMAT",
    "RUST_LOG",
];

/// The upstream `clay` at `url`, with room for many calls at once and a
/// long attempt timeout, and a DLQ operation `push_row`.
fn policy(url: &str) -> String {
    format!(
        "# yaml-language-server: $schema=../schemas/policy.schema.json
version: 1
upstreams:
  clay:
    base_url: \"{url}\"
    priorities:
      normal: {{ concurrency: 64, queue: 64, queue_timeout: 10s }}
timeouts: {{ connect: 1s, request: 60s }}
operations:
  push_row:
    upstream: clay
    request: {{ method: POST, path: \"/v1/tables/{{{{ params.table_id }}}}/rows\", body: \"{{{{ params.row }}}}\" }}
    params_schema:
      type: object
      required: [table_id, row]
      properties: {{ table_id: {{ type: string }}, row: {{ type: object }} }}
    timeout: request
    priority: normal
    retry: {{ max_attempts: 1 }}
    breaker: {{ volume_threshold: 1000 }}
    idempotency: {{ key: [table_id, row], ttl: 24h }}
    dlq: {{ max_attempts: 5, backoff: {{ initial: 1h, multiplier: 2, max: 2h }} }}
"
    )
}

/// A `claygate serve` child process; killed if still running when dropped.
struct Serving {
    child: Child,
    addr: SocketAddr,
    stdout: Arc<Mutex<String>>,
    stderr: Arc<Mutex<String>>,
    /// The threads copying stdout and stderr; each ends at its pipe's EOF.
    pipes: Vec<std::thread::JoinHandle<()>>,
}

impl Drop for Serving {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Copies a pipe into a shared string on a thread, which ends at the pipe's
/// EOF: join it to have every line the process wrote.
fn drain_pipe(
    pipe: impl Read + Send + 'static,
    into: Arc<Mutex<String>>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut reader = BufReader::new(pipe);
        let mut line = String::new();
        while matches!(reader.read_line(&mut line), Ok(n) if n > 0) {
            into.lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .push_str(&line);
            line.clear();
        }
    })
}

/// Waits for the pipe threads of an exited process: after this, the shared
/// strings hold all it wrote.
async fn join_pipes(pipes: Vec<std::thread::JoinHandle<()>>) {
    tokio::task::spawn_blocking(move || {
        for pipe in pipes {
            pipe.join().expect("the pipe thread ends at EOF");
        }
    })
    .await
    .expect("joined the pipe threads");
}

fn text(s: &Arc<Mutex<String>>) -> String {
    s.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .clone()
}

/// `claygate serve ARGS` with a clean environment plus `env`.
fn command(args: &[&str], env: &[(&str, &str)]) -> std::process::Command {
    let mut cmd = claygate();
    cmd.arg("serve").args(args);
    for name in ENV {
        cmd.env_remove(name);
    }
    cmd.env("NO_COLOR", "1");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd
}

/// Starts `claygate serve` and waits for its `listening on http://ADDR` line.
async fn serve(args: &[&str], env: &[(&str, &str)]) -> Serving {
    serve_command(command(args, env)).await
}

/// Starts `cmd` (a `claygate serve`) and waits for its `listening on` line.
async fn serve_command(mut cmd: std::process::Command) -> Serving {
    let mut child = cmd.spawn().expect("claygate starts");
    let stdout = Arc::new(Mutex::new(String::new()));
    let stderr = Arc::new(Mutex::new(String::new()));
    let pipes = vec![
        drain_pipe(child.stdout.take().expect("stdout"), Arc::clone(&stdout)),
        drain_pipe(child.stderr.take().expect("stderr"), Arc::clone(&stderr)),
    ];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let out = text(&stdout);
        if let Some(line) = out.lines().find(|l| l.starts_with("listening on ")) {
            let addr = line
                .trim_start_matches("listening on http://")
                .trim()
                .parse()
                .unwrap_or_else(|e| panic!("an address in {line:?}: {e}"));
            return Serving {
                child,
                addr,
                stdout,
                stderr,
                pipes,
            };
        }
        if let Ok(Some(status)) = child.try_wait() {
            join_pipes(pipes).await;
            panic!(
                "claygate serve exited ({status}) before listening\nstdout:\n{}\nstderr:\n{}",
                text(&stdout),
                text(&stderr)
            );
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no `listening on` line within 30s\nstderr:\n{}",
            text(&stderr)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

impl Serving {
    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    fn signal(&self, name: &str) {
        let status = std::process::Command::new("kill")
            .arg(format!("-{name}"))
            .arg(self.child.id().to_string())
            .status()
            .expect("kill runs");
        assert!(status.success(), "kill -{name} failed");
    }

    /// Waits for the process to exit; answers its status.
    async fn exited(&mut self, within: Duration) -> ExitStatus {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                join_pipes(std::mem::take(&mut self.pipes)).await;
                return status;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "claygate serve still running after {within:?}\nstderr:\n{}",
                text(&self.stderr)
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Runs `claygate serve ARGS` expecting it to exit on its own; answers (status, stdout, stderr).
fn run_to_exit(args: &[&str], env: &[(&str, &str)]) -> (Option<i32>, String, String) {
    let mut child = command(args, env).spawn().expect("claygate starts");
    let stdout = Arc::new(Mutex::new(String::new()));
    let stderr = Arc::new(Mutex::new(String::new()));
    let pipes = [
        drain_pipe(child.stdout.take().expect("stdout"), Arc::clone(&stdout)),
        drain_pipe(child.stderr.take().expect("stderr"), Arc::clone(&stderr)),
    ];
    let started = std::time::Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            break status;
        }
        if started.elapsed() > Duration::from_secs(30) {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "claygate serve {args:?} did not exit\nstderr:\n{}",
                text(&stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    for pipe in pipes {
        pipe.join().expect("the pipe thread ends at EOF");
    }
    (status.code(), text(&stdout), text(&stderr))
}

fn path_str(p: &Path) -> &str {
    p.to_str().expect("a UTF-8 temp path")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_load_loses_no_dead_letterable_call() {
    const N: usize = 40;
    const SLOW: usize = 8;
    let fake = FakeUpstream::start().await;
    // A few answer slowly (and may finish during the drain); the rest hang.
    fake.then((0..SLOW).map(|_| Behavior::Respond {
        status: 200,
        headers: Vec::new(),
        body: r#"{"accepted":true}"#.into(),
        delay: Duration::from_millis(300),
    }));
    fake.always(Behavior::Hang);
    let policies = tempdir();
    let data = tempdir();
    write(policies.path(), "clay.yaml", &policy(&fake.url()));
    let mut server = serve(
        &[
            "--listen",
            "127.0.0.1:0",
            "--policies",
            path_str(policies.path()),
            "--data",
            path_str(data.path()),
            "--drain-timeout",
            "1s",
            "--no-watch",
        ],
        &[],
    )
    .await;

    let client = reqwest::Client::new();
    let url = server.url("/v1/operations/push_row/invoke");
    let calls: Vec<_> = (0..N)
        .map(|i| {
            let client = client.clone();
            let url = url.clone();
            tokio::spawn(async move {
                let response = client
                    .post(url)
                    .json(&json!({"table_id": "t1", "row": {"email": format!("p{i}@example.com"), "n": i}}))
                    .send()
                    .await
                    .expect("every call is answered");
                let status = response.status().as_u16();
                let body: Value = response.json().await.expect("a JSON answer");
                (i, status, body)
            })
        })
        .collect();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while fake.hits() < N {
        assert!(
            tokio::time::Instant::now() < deadline,
            "only {} of {N} calls reached the upstream\nstderr:\n{}",
            fake.hits(),
            text(&server.stderr)
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    server.signal("TERM");

    let mut delivered = 0;
    let mut queued = BTreeSet::new();
    for call in calls {
        let (i, status, body) = call.await.expect("call task");
        match status {
            200 => {
                assert_eq!(body["status"], "ok", "call {i}: {body}");
                delivered += 1;
            }
            202 => {
                assert_eq!(body["status"], "queued", "call {i}: {body}");
                let id = body["meta"]["dlq_id"].as_i64().expect("a dlq id");
                assert!(queued.insert(id), "call {i} shares dead letter {id}");
            }
            other => panic!("call {i} answered {other}: {body}"),
        }
    }
    assert_eq!(delivered + queued.len(), N);
    assert!(
        queued.len() >= N - SLOW,
        "the hung calls were dead-lettered"
    );

    let status = server.exited(Duration::from_secs(20)).await;
    let stderr = text(&server.stderr);
    assert_eq!(
        status.code(),
        Some(0),
        "clean exit after the drain\nstderr:\n{stderr}"
    );
    assert!(
        stderr.contains("SIGTERM"),
        "the signal is logged:\n{stderr}"
    );

    // The store, reopened after the process is gone, holds exactly one
    // pending dead letter per queued call.
    let store = SqliteStore::open(data.path())
        .await
        .expect("the store reopens");
    let page = store
        .dlq_list(
            &DlqFilter::default(),
            PageRequest {
                after: None,
                limit: 1000,
            },
        )
        .await
        .expect("list");
    assert_eq!(page.entries.len(), queued.len(), "no loss, no duplicate");
    let ids: BTreeSet<i64> = page.entries.iter().map(|e| e.id).collect();
    assert_eq!(ids, queued, "the answered ids are the stored ones");
    let mut keys = BTreeSet::new();
    for entry in &page.entries {
        assert_eq!(entry.state, DlqState::Pending, "{entry:?}");
        assert_eq!(entry.operation, "push_row");
        assert_eq!(entry.error_code, "interrupted", "{entry:?}");
        let key = entry
            .idempotency_key
            .clone()
            .expect("the idempotency key is kept");
        assert!(keys.insert(key), "one dead letter per idempotency key");
    }
    store.close().await.expect("close");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_policies() {
    let fake = FakeUpstream::start().await;
    fake.always(Behavior::ok(r#"{"ok":true}"#));
    let policies = tempdir();
    let data = tempdir();
    write(policies.path(), "clay.yaml", &policy(&fake.url()));
    let server = serve(
        &[
            "--listen",
            "127.0.0.1:0",
            "--policies",
            path_str(policies.path()),
            "--data",
            path_str(data.path()),
            "--no-watch",
        ],
        &[],
    )
    .await;
    let client = reqwest::Client::new();
    let generation = |dir: &Path| {
        let (sources, _) =
            claygate::policy::read_sources(&[PathBuf::from(dir)]).expect("read the policies");
        claygate::reload::generation_hash(&sources)
    };
    let before = generation(policies.path());
    let response = client
        .get(server.url("/v1/policies"))
        .send()
        .await
        .expect("GET");
    assert_eq!(response.status().as_u16(), 200);
    let listing = response.text().await.expect("body");
    assert!(
        listing.contains(&before),
        "the serving generation {before}: {listing}"
    );

    write(
        policies.path(),
        "extra.yaml",
        "version: 1
operations:
  ping:
    upstream: clay
    request: { method: GET, path: /ping }
    retry: { max_attempts: 1 }
",
    );
    let after = generation(policies.path());
    assert_ne!(before, after);
    let invoke = || async {
        client
            .post(server.url("/v1/operations/ping/invoke"))
            .send()
            .await
            .expect("invoke")
            .status()
            .as_u16()
    };
    assert_eq!(invoke().await, 404);

    server.signal("HUP");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while invoke().await != 200 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "`ping` not served 10s after SIGHUP\nstderr:\n{}",
            text(&server.stderr)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let listing = client
        .get(server.url("/v1/policies"))
        .send()
        .await
        .expect("GET")
        .text()
        .await
        .expect("body");
    assert!(
        listing.contains(&after),
        "the new generation {after}: {listing}"
    );
    // Not watching, by its own account and by the history: the signal's
    // reload is the one that applied the new file (a watcher would have
    // applied it first, leaving the signal's reload `unchanged`), and no
    // reload was triggered by a watcher before or after it.
    let status: Value = serde_json::from_str(&listing).expect("JSON");
    assert_eq!(status["watching"], false, "{status:#}");
    let history = status["history"].as_array().expect("a history");
    let triggers: Vec<&str> = history
        .iter()
        .filter_map(|r| r["trigger"].as_str())
        .collect();
    assert_eq!(triggers, ["signal", "startup"], "{status:#}");
    assert_eq!(history[0]["result"], "applied", "{status:#}");
    assert_eq!(history[0]["generation"], after.as_str());
    assert_eq!(history[1]["generation"], before.as_str());
    assert!(
        text(&server.stderr).contains("SIGHUP"),
        "the signal is logged"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_go_to_stderr_and_sigint_stops_cleanly() {
    const TOKEN: &str = "tok-serve-4d1b-never-echoed";
    let fake = FakeUpstream::start().await;
    fake.always(Behavior::ok("{}"));
    let policies = tempdir();
    let data = tempdir();
    write(policies.path(), "clay.yaml", &policy(&fake.url()));
    let mut server = serve(
        &[
            "--listen",
            "127.0.0.1:0",
            "--policies",
            path_str(policies.path()),
            "--data",
            path_str(data.path()),
            "--log-format",
            "json",
        ],
        &[("CLAYGATE_ADMIN_TOKEN", TOKEN), ("RUST_LOG", "debug")],
    )
    .await;
    let client = reqwest::Client::new();
    let invoke = |token: &str| {
        client
            .post(server.url("/v1/operations/push_row/invoke"))
            .header("authorization", format!("Bearer {token}"))
            .json(&json!({"table_id": "t", "row": {"a": 1}}))
            .send()
    };
    assert_eq!(invoke("wrong").await.expect("call").status().as_u16(), 401);
    let response = invoke(TOKEN).await.expect("call");
    assert_eq!(response.status().as_u16(), 200);
    let answer = response.text().await.expect("body");
    assert!(!answer.contains(TOKEN));
    // Served without --no-watch: the policy directory is watched.
    let status: Value = client
        .get(server.url("/v1/policies"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .expect("GET")
        .json()
        .await
        .expect("JSON");
    assert_eq!(status["watching"], true, "{status:#}");

    server.signal("INT");
    let status = server.exited(Duration::from_secs(20)).await;
    let stderr = text(&server.stderr);
    assert_eq!(status.code(), Some(0), "stderr:\n{stderr}");
    assert_eq!(
        text(&server.stdout),
        format!("listening on http://{}\n", server.addr),
        "stdout holds the address line only"
    );
    let mut messages = Vec::new();
    for line in stderr.lines().filter(|l| !l.trim().is_empty()) {
        let event: Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("a JSON log line ({e}): {line}"));
        assert!(event["level"].is_string(), "{line}");
        assert!(event["timestamp"].is_string(), "{line}");
        if event["message"] == "claygate listening" {
            assert_eq!(event["addr"], server.addr.to_string(), "{line}");
        }
        messages.push(event["message"].as_str().unwrap_or_default().to_owned());
    }
    assert!(
        messages.iter().any(|m| m == "claygate listening"),
        "the address is logged: {messages:?}"
    );
    assert!(
        messages.iter().any(|m| m == "claygate stopped"),
        "{messages:?}"
    );
    assert!(!stderr.contains(TOKEN), "the token is never logged");
}

#[test]
fn a_public_address_without_a_token_is_refused() {
    let policies = tempdir();
    let data = tempdir();
    write(policies.path(), "clay.yaml", &policy("http://127.0.0.1:9"));
    let p = path_str(policies.path());
    let d = path_str(data.path());
    let (code, stdout, stderr) = run_to_exit(
        &["--listen", "0.0.0.0:0", "--policies", p, "--data", d],
        &[],
    );
    assert_eq!(code, Some(2), "stderr: {stderr}");
    assert!(stdout.is_empty(), "{stdout}");
    assert!(
        stderr.contains("refusing to listen on 0.0.0.0:0 without an admin token"),
        "{stderr}"
    );
    assert!(stderr.contains("CLAYGATE_ADMIN_TOKEN"), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "one clear message: {stderr}");

    // An empty token protects nothing: refused too.
    let (code, _, stderr) = run_to_exit(
        &["--listen", "127.0.0.1:0", "--policies", p, "--data", d],
        &[("CLAYGATE_ADMIN_TOKEN", "  ")],
    );
    assert_eq!(code, Some(2), "stderr: {stderr}");
    assert!(
        stderr.contains("CLAYGATE_ADMIN_TOKEN is set but empty"),
        "{stderr}"
    );
}

#[test]
fn usage_io_bind_and_store_errors_exit_2() {
    let policies = tempdir();
    let data = tempdir();
    write(policies.path(), "clay.yaml", &policy("http://127.0.0.1:9"));
    let p = path_str(policies.path());
    let d = path_str(data.path());

    let (code, _, stderr) = run_to_exit(&["--drain-timeout", "ten"], &[]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("--drain-timeout"), "{stderr}");
    let (code, _, stderr) = run_to_exit(&["--listen", "nowhere"], &[]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("--listen"), "{stderr}");

    let missing = policies.path().join("missing");
    let (code, _, stderr) = run_to_exit(
        &[
            "--listen",
            "127.0.0.1:0",
            "--policies",
            path_str(&missing),
            "--data",
            d,
        ],
        &[],
    );
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("missing"), "names the path: {stderr}");

    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().expect("addr").to_string();
    let (code, stdout, stderr) =
        run_to_exit(&["--listen", &addr, "--policies", p, "--data", d], &[]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stdout.is_empty());
    assert!(
        stderr.contains(&format!("cannot listen on {addr}")),
        "{stderr}"
    );
    drop(taken);

    let file = write(data.path(), "not-a-dir", "x");
    let (code, _, stderr) = run_to_exit(
        &[
            "--listen",
            "127.0.0.1:0",
            "--policies",
            p,
            "--data",
            path_str(&file),
        ],
        &[],
    );
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("not-a-dir"), "names the data dir: {stderr}");
}

#[test]
fn invalid_policies_exit_1_naming_file_line_and_column() {
    let policies = tempdir();
    let data = tempdir();
    let good = policy("http://127.0.0.1:9");
    // A typo: `retry` misspelt, at the start of its key (column 5).
    let bad = good.replace("    retry: {", "    retyr: {");
    assert_ne!(good, bad);
    let line = bad
        .lines()
        .position(|l| l.starts_with("    retyr:"))
        .expect("the typo")
        + 1;
    write(policies.path(), "clay.yaml", &bad);
    let (code, stdout, stderr) = run_to_exit(
        &[
            "--listen",
            "127.0.0.1:0",
            "--policies",
            path_str(policies.path()),
            "--data",
            path_str(data.path()),
        ],
        &[],
    );
    assert_eq!(code, Some(1), "stderr: {stderr}");
    assert!(!stdout.contains("listening"), "{stdout}");
    let place = format!("clay.yaml:{line}:5:");
    assert!(stderr.contains(&place), "names {place}: {stderr}");
    assert!(stderr.contains("retyr"), "{stderr}");
    assert!(stderr.contains("did you mean `retry`"), "{stderr}");

    // An unset ${env:…} without default is an error at serve.
    let unset = good.replace(
        "    priorities:",
        "    headers: { Authorization: \"Bearer ${env:CLAYGATE_TEST_SURELY_UNSET}\" }\n    priorities:",
    );
    write(policies.path(), "clay.yaml", &unset);
    let (code, _, stderr) = run_to_exit(
        &[
            "--listen",
            "127.0.0.1:0",
            "--policies",
            path_str(policies.path()),
            "--data",
            path_str(data.path()),
        ],
        &[],
    );
    assert_eq!(code, Some(1), "stderr: {stderr}");
    assert!(stderr.contains("CLAYGATE_TEST_SURELY_UNSET"), "{stderr}");
    assert!(stderr.contains("clay.yaml:"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policies_data_and_listen_come_from_the_environment() {
    let fake = FakeUpstream::start().await;
    fake.always(Behavior::status(503, r#"{"error":"busy"}"#));
    let policies = tempdir();
    let data = tempdir();
    // An empty working directory: the defaults `./policies` and `./data`
    // would not serve, and nothing may be created there.
    let cwd = tempdir();
    write(policies.path(), "clay.yaml", &policy(&fake.url()));
    let mut cmd = command(
        &["--no-watch"],
        &[
            ("CLAYGATE_POLICIES", path_str(policies.path())),
            ("CLAYGATE_DATA", path_str(data.path())),
            // Not the default 127.0.0.1:7700: the address printed proves it was read.
            ("CLAYGATE_LISTEN", "127.0.0.2:0"),
        ],
    );
    cmd.current_dir(cwd.path());
    let mut server = serve_command(cmd).await;
    assert_eq!(
        server.addr.ip().to_string(),
        "127.0.0.2",
        "listens where CLAYGATE_LISTEN says"
    );
    let client = reqwest::Client::new();
    let operations: Value = client
        .get(server.url("/v1/operations"))
        .send()
        .await
        .expect("GET")
        .json()
        .await
        .expect("JSON");
    assert!(
        operations.to_string().contains("\"push_row\""),
        "serves CLAYGATE_POLICIES: {operations:#}"
    );
    let response = client
        .post(server.url("/v1/operations/push_row/invoke"))
        .json(&json!({"table_id": "t1", "row": {"n": 1}}))
        .send()
        .await
        .expect("invoke");
    assert_eq!(response.status().as_u16(), 202, "dead-lettered");
    let body: Value = response.json().await.expect("JSON");
    let id = body["meta"]["dlq_id"].as_i64().expect("a dlq id");

    server.signal("TERM");
    let status = server.exited(Duration::from_secs(20)).await;
    assert_eq!(status.code(), Some(0), "{}", text(&server.stderr));
    let left: Vec<_> = std::fs::read_dir(cwd.path())
        .expect("read the working directory")
        .collect();
    assert!(
        left.is_empty(),
        "nothing written to the working directory: {left:?}"
    );
    // The dead letter is in the store under CLAYGATE_DATA.
    let store = SqliteStore::open(data.path())
        .await
        .expect("the store reopens");
    let entry = store.dlq_get(id).await.expect("read").expect("the entry");
    assert_eq!(entry.operation, "push_row");
    store.close().await.expect("close");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_that_cannot_be_flushed_makes_the_stop_an_error() {
    let fake = FakeUpstream::start().await;
    let server = crate::support::server::start(
        &[("clay.yaml", &policy("{{UPSTREAM}}"))],
        &fake.url(),
        crate::support::server::Options::default(),
    )
    .await;
    // Something closed the store under the server: the final flush fails.
    server
        .server
        .state()
        .runtime()
        .store
        .close()
        .await
        .expect("the first close works");
    server.server.stop();
    match server.server.stopped().await {
        Err(claygate::serve::StopError::StoreFlush { drained, source }) => {
            assert_eq!(drained.interrupted, 0);
            assert!(
                matches!(source, claygate::store::StoreError::Closed),
                "{source}"
            );
        }
        other => panic!("a store flush error, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_url_check_never_echoes_an_environment_value() {
    const SECRET: &str = "sk-live-9f8e7d-never-echoed";
    // `${env:CLAY_API_KEY}:` expands to `sk-live-…:`, a URL whose scheme is the secret.
    const LEAKY: &str = "version: 1
upstreams:
  leaky:
    base_url: \"${env:CLAY_API_KEY}:\"
operations:
  leak:
    upstream: leaky
    request: { method: POST, path: /x }
    retry: { max_attempts: 1 }
    dlq: { alert: { webhook: \"${env:CLAY_API_KEY}:\" } }
";
    let policies = tempdir();
    let data = tempdir();
    write(policies.path(), "clay.yaml", &policy("http://127.0.0.1:9"));
    let env = [("CLAY_API_KEY", SECRET)];
    let server = serve(
        &[
            "--listen",
            "127.0.0.1:0",
            "--policies",
            path_str(policies.path()),
            "--data",
            path_str(data.path()),
            "--no-watch",
        ],
        &env,
    )
    .await;
    let client = reqwest::Client::new();
    let expected = [
        "base_url: the value of `${env:CLAY_API_KEY}:` is not an http or https URL with a host",
        "webhook: the value of `${env:CLAY_API_KEY}:` is not an http or https URL with a host",
    ];

    // Posted for validation.
    let answer = client
        .post(server.url("/v1/policies/validate?name=leaky.yaml"))
        .header("content-type", "application/yaml")
        .body(LEAKY)
        .send()
        .await
        .expect("POST")
        .text()
        .await
        .expect("body");
    assert!(
        !answer.contains(SECRET),
        "validation echoes the secret: {answer}"
    );
    for message in expected {
        assert!(answer.contains(message), "missing {message:?}: {answer}");
    }

    // Saved and reloaded: refused, and neither the refusal nor the history says it.
    write(policies.path(), "leaky.yaml", LEAKY);
    let response = client
        .post(server.url("/v1/policies/reload"))
        .send()
        .await
        .expect("POST");
    assert_eq!(response.status().as_u16(), 422);
    let refusal = response.text().await.expect("body");
    assert!(!refusal.contains(SECRET), "{refusal}");
    assert!(refusal.contains(expected[0]), "{refusal}");
    let history = client
        .get(server.url("/v1/policies"))
        .send()
        .await
        .expect("GET")
        .text()
        .await
        .expect("body");
    assert!(!history.contains(SECRET), "{history}");
    assert!(history.contains(expected[0]), "{history}");
    assert!(!text(&server.stderr).contains(SECRET), "the logs echo it");

    // `claygate validate` says the same.
    let out = claygate()
        .args(["validate", "--color", "never", path_str(policies.path())])
        .env("CLAY_API_KEY", SECRET)
        .output()
        .expect("validate runs");
    assert_eq!(out.status.code(), Some(1));
    let printed = String::from_utf8_lossy(&out.stdout);
    assert!(!printed.contains(SECRET), "{printed}");
    assert!(printed.contains(expected[1]), "{printed}");
}

#[test]
fn openapi_prints_the_description() {
    let out = claygate().arg("openapi").output().expect("runs");
    assert_eq!(out.status.code(), Some(0));
    let doc: Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert!(doc["openapi"].as_str().is_some_and(|v| v.starts_with("3.")));
    assert!(
        doc["paths"]["/v1/operations/{name}/invoke"]["post"].is_object(),
        "{doc:#}"
    );
}
