//! Helpers of the end-to-end tests (`tests/e2e.rs`): the compiled
//! `claygate serve` as a child process in front of an in-process
//! [`FakeClay`], an HTTP client for its admin API, bounded polls, and a
//! small webhook listener.

use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use axum::body::Bytes;
use claygate::demo::fake_clay::{FakeClay, Faults};
use reqwest::header::HeaderMap;
use serde_json::Value;
use tokio::time::Instant;

use crate::support::claygate;

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

/// Serialises CPU-heavy tests against timing-sensitive ones: the chaos
/// test, the reload load test and each case of the fuzz and conservation
/// proptests take it for writing, every other end-to-end test for reading,
/// so a test that measures time never shares the two cores with them.
pub static HEAVY: tokio::sync::RwLock<()> = tokio::sync::RwLock::const_new(());

/// A fake Clay on loopback with no faults and no rate limit.
pub async fn fake() -> FakeClay {
    let loopback: SocketAddr = "127.0.0.1:0".parse().expect("addr");
    FakeClay::start_with(loopback, loopback, Faults::none())
        .await
        .expect("the fake Clay starts")
}

/// Puts `faults` in force on `fake` (valid by construction).
pub async fn set_faults(fake: &FakeClay, faults: Faults) {
    fake.set_faults(faults).await.expect("valid faults");
}

/// A client that never goes through a proxy.
pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(30))
        .build()
        .expect("a client")
}

/// Copies a pipe into a shared string on a thread, until it closes.
fn drain_pipe(
    pipe: impl Read + Send + 'static,
    into: Arc<Mutex<String>>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut reader = BufReader::new(pipe);
        let mut line = String::new();
        while matches!(reader.read_line(&mut line), Ok(n) if n > 0) {
            into.lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push_str(&line);
            line.clear();
        }
    })
}

fn text(s: &Arc<Mutex<String>>) -> String {
    s.lock().unwrap_or_else(PoisonError::into_inner).clone()
}

/// Writes `text` to `dir/name` atomically (a temp file renamed over it), so
/// a watcher never reads half a file.
pub fn write_atomic(dir: &Path, name: &str, text: &str) {
    let tmp = dir.join(format!(".{name}.tmp"));
    std::fs::write(&tmp, text).expect("write the temp policy file");
    std::fs::rename(&tmp, dir.join(name)).expect("rename the policy file");
}

/// An answer of the admin API.
#[derive(Debug, Clone)]
pub struct Reply {
    /// HTTP status.
    pub status: u16,
    /// Headers.
    pub headers: HeaderMap,
    /// The body as JSON (`Null` when it is not JSON).
    pub body: Value,
    /// Time from sending to the whole body.
    pub elapsed: Duration,
}

impl Reply {
    /// A header as text.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// The problem document's `code` ("" when absent).
    pub fn code(&self) -> &str {
        self.body["code"].as_str().unwrap_or("")
    }

    /// The envelope's `status` ("" when absent).
    pub fn envelope(&self) -> &str {
        self.body["status"].as_str().unwrap_or("")
    }

    /// True for an `application/problem+json` answer.
    pub fn is_problem(&self) -> bool {
        self.header("content-type")
            .is_some_and(|c| c.starts_with("application/problem+json"))
    }

    /// `Retry-After` in whole seconds.
    pub fn retry_after(&self) -> Option<u64> {
        self.header("retry-after")
            .and_then(|v| v.trim().parse().ok())
    }
}

/// `claygate serve` as a child process over a policy directory of its own,
/// killed when dropped.
pub struct Gate {
    child: Child,
    /// Where it listens.
    pub addr: SocketAddr,
    /// The policy directory (write files here to reload).
    pub policies: PathBuf,
    stderr: Arc<Mutex<String>>,
    client: reqwest::Client,
    _dirs: (tempfile::TempDir, tempfile::TempDir),
}

impl Drop for Gate {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

impl Gate {
    /// Writes `policy` as `clay.yaml` (with `{{FAKE}}` replaced by `fake_url`)
    /// into a fresh directory and starts `claygate serve` on it, watching the
    /// directory when `watch`; answers once it prints its address.
    pub async fn start(policy: &str, fake_url: &str, watch: bool) -> Gate {
        let policies = tempfile::tempdir().expect("policies dir");
        let data = tempfile::tempdir().expect("data dir");
        write_atomic(
            policies.path(),
            "clay.yaml",
            &policy.replace("{{FAKE}}", fake_url),
        );
        let mut cmd = claygate();
        cmd.arg("serve")
            .arg("--policies")
            .arg(policies.path())
            .arg("--data")
            .arg(data.path())
            .args(["--listen", "127.0.0.1:0", "--drain-timeout", "1s"]);
        if !watch {
            cmd.arg("--no-watch");
        }
        for name in ENV {
            cmd.env_remove(name);
        }
        cmd.env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("claygate starts");
        let stdout = Arc::new(Mutex::new(String::new()));
        let stderr = Arc::new(Mutex::new(String::new()));
        let _ = drain_pipe(child.stdout.take().expect("stdout"), Arc::clone(&stdout));
        let _ = drain_pipe(child.stderr.take().expect("stderr"), Arc::clone(&stderr));
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let out = text(&stdout);
            if let Some(line) = out.lines().find(|l| l.starts_with("listening on ")) {
                let addr = line
                    .trim_start_matches("listening on http://")
                    .trim()
                    .parse()
                    .unwrap_or_else(|e| panic!("an address in {line:?}: {e}"));
                return Gate {
                    child,
                    addr,
                    policies: policies.path().to_path_buf(),
                    stderr,
                    client: client(),
                    _dirs: (policies, data),
                };
            }
            if let Ok(Some(status)) = child.try_wait() {
                tokio::time::sleep(Duration::from_millis(100)).await;
                panic!(
                    "claygate serve exited ({status}) before listening\nstderr:\n{}",
                    text(&stderr)
                );
            }
            assert!(
                Instant::now() < deadline,
                "no `listening on` line within 30s\nstderr:\n{}",
                text(&stderr)
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// What the server logged so far.
    pub fn logs(&self) -> String {
        text(&self.stderr)
    }

    /// `http://ADDR` + `path`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// The shared client.
    pub fn client(&self) -> &reqwest::Client {
        &self.client
    }

    /// Invokes `operation` with `params`.
    pub async fn invoke(&self, operation: &str, params: &Value) -> Reply {
        self.invoke_with(operation, params, &[]).await
    }

    /// Invokes `operation` with `params` and extra `headers`.
    pub async fn invoke_with(
        &self,
        operation: &str,
        params: &Value,
        headers: &[(&str, &str)],
    ) -> Reply {
        invoke(&self.client, self.addr, operation, params, headers).await
    }

    /// GETs `path`.
    pub async fn get(&self, path: &str) -> Reply {
        send(self.client.get(self.url(path))).await
    }

    /// POSTs to `path` without a body.
    pub async fn post(&self, path: &str) -> Reply {
        send(self.client.post(self.url(path))).await
    }

    /// The state of `operation`'s breaker, from `GET /v1/breakers`.
    pub async fn breaker(&self, operation: &str) -> Value {
        let reply = self.get("/v1/breakers").await;
        assert_eq!(reply.status, 200, "{:?}", reply.body);
        reply.body["breakers"]
            .as_array()
            .and_then(|list| list.iter().find(|b| b["operation"] == operation))
            .cloned()
            .unwrap_or_else(|| panic!("no breaker for {operation}: {}", reply.body))
    }

    /// `GET /v1/dlq/{id}`.
    pub async fn dead_letter(&self, id: i64) -> Value {
        let reply = self.get(&format!("/v1/dlq/{id}")).await;
        assert_eq!(reply.status, 200, "GET /v1/dlq/{id}: {:?}", reply.body);
        reply.body
    }

    /// Every dead letter matching `query` (e.g. `state=pending`), all pages.
    pub async fn dead_letters(&self, query: &str) -> Vec<Value> {
        let mut out = Vec::new();
        let mut after: Option<i64> = None;
        loop {
            let mut path = format!("/v1/dlq?limit=500&{query}");
            if let Some(a) = after {
                path.push_str(&format!("&after={a}"));
            }
            let reply = self.get(&path).await;
            assert_eq!(reply.status, 200, "GET {path}: {:?}", reply.body);
            out.extend(
                reply.body["entries"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default(),
            );
            match reply.body["next_after"].as_i64() {
                Some(a) => after = Some(a),
                None => return out,
            }
        }
    }

    /// `GET /health`: (HTTP status, body).
    pub async fn health(&self) -> Reply {
        self.get("/health").await
    }
}

/// Sends `request` and reads the answer.
async fn send(request: reqwest::RequestBuilder) -> Reply {
    let started = Instant::now();
    let response = request.send().await.expect("claygate answers");
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let bytes = response.bytes().await.expect("a body");
    let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    Reply {
        status,
        headers,
        body,
        elapsed: started.elapsed(),
    }
}

/// Invokes `operation` on the gate at `addr` (for tasks holding a client clone).
pub async fn invoke(
    client: &reqwest::Client,
    addr: SocketAddr,
    operation: &str,
    params: &Value,
    headers: &[(&str, &str)],
) -> Reply {
    let mut request = client
        .post(format!("http://{addr}/v1/operations/{operation}/invoke"))
        .json(params);
    for (k, v) in headers {
        request = request.header(*k, *v);
    }
    send(request).await
}

/// Polls `probe` every `every` until it answers `Some`, for at most `within`;
/// panics with `what` and the last value seen otherwise.
pub async fn until<T, F, Fut>(what: &str, within: Duration, every: Duration, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, String>>,
{
    let deadline = Instant::now() + within;
    loop {
        let last = match probe().await {
            Ok(v) => return v,
            Err(last) => last,
        };
        assert!(
            Instant::now() < deadline,
            "{what}: not within {within:?}; last seen: {last}"
        );
        tokio::time::sleep(every).await;
    }
}

/// A loopback HTTP listener that keeps every POSTed JSON body (the DLQ
/// alert webhook's receiver).
pub struct Webhook {
    /// Where it listens.
    pub addr: SocketAddr,
    received: Arc<Mutex<Vec<Value>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Webhook {
    /// Starts the listener on 127.0.0.1:0.
    pub async fn start() -> Webhook {
        let received = Arc::new(Mutex::new(Vec::new()));
        let keep = Arc::clone(&received);
        let app = axum::Router::new().route(
            "/alert",
            axum::routing::post(move |body: Bytes| {
                let keep = Arc::clone(&keep);
                async move {
                    let value = serde_json::from_slice(&body)
                        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&body).into()));
                    keep.lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .push(value);
                    "ok"
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the webhook");
        let addr = listener.local_addr().expect("addr");
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Webhook {
            addr,
            received,
            task,
        }
    }

    /// The URL to put in `dlq.alert.webhook`.
    pub fn url(&self) -> String {
        format!("http://{}/alert", self.addr)
    }

    /// The bodies received so far.
    pub fn received(&self) -> Vec<Value> {
        self.received
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

impl Drop for Webhook {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A `claygate` child process with its output captured, killed when dropped.
pub struct Spawned {
    child: Child,
    stdout: Arc<Mutex<String>>,
    stderr: Arc<Mutex<String>>,
    pipes: Vec<std::thread::JoinHandle<()>>,
}

impl Drop for Spawned {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

impl Spawned {
    /// `claygate <args>` run from the repository root (as a user runs the
    /// README's commands), with the server's variables cleared.
    pub fn start(args: &[&str]) -> Spawned {
        let mut cmd = claygate();
        cmd.args(args).current_dir(crate::support::repo());
        for name in ENV {
            cmd.env_remove(name);
        }
        cmd.env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("claygate starts");
        let stdout = Arc::new(Mutex::new(String::new()));
        let stderr = Arc::new(Mutex::new(String::new()));
        let pipes = vec![
            drain_pipe(child.stdout.take().expect("stdout"), Arc::clone(&stdout)),
            drain_pipe(child.stderr.take().expect("stderr"), Arc::clone(&stderr)),
        ];
        Spawned {
            child,
            stdout,
            stderr,
            pipes,
        }
    }

    /// Standard output so far.
    pub fn stdout(&self) -> String {
        text(&self.stdout)
    }

    /// Standard error so far.
    pub fn stderr(&self) -> String {
        text(&self.stderr)
    }

    /// The first line of standard output that `wanted` accepts, waiting at
    /// most `within`; panics (with the output) otherwise.
    pub async fn line(
        &mut self,
        what: &str,
        within: Duration,
        wanted: impl Fn(&str) -> bool,
    ) -> String {
        let deadline = Instant::now() + within;
        loop {
            if let Some(line) = self.stdout().lines().find(|l| wanted(l)) {
                return line.to_owned();
            }
            let exited = self.child.try_wait().ok().flatten();
            assert!(
                exited.is_none() && Instant::now() < deadline,
                "{what}: not printed within {within:?} (exited: {exited:?})\nstdout:\n{}\nstderr:\n{}",
                self.stdout(),
                self.stderr()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Sends signal `name` (`TERM`, `HUP`, …) with `kill`.
    pub fn signal(&self, name: &str) {
        let status = std::process::Command::new("kill")
            .arg(format!("-{name}"))
            .arg(self.child.id().to_string())
            .status()
            .expect("kill runs");
        assert!(status.success(), "kill -{name} failed");
    }

    /// Whether it is still running.
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Waits at most `within` for it to exit; answers its exit code.
    pub async fn exit(&mut self, within: Duration) -> Option<i32> {
        let deadline = Instant::now() + within;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                // Its pipes are closed: the threads end with the last lines.
                for pipe in self.pipes.drain(..) {
                    let _ = pipe.join();
                }
                return status.code();
            }
            assert!(
                Instant::now() < deadline,
                "still running after {within:?}\nstdout:\n{}\nstderr:\n{}",
                self.stdout(),
                self.stderr()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}
