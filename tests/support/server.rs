//! A real `claygate serve` (in process, via the library) on 127.0.0.1:0,
//! with policies written to a temp dir, and an HTTP client for it; and the
//! admin router without a socket ([`in_process`]), for tests on a paused
//! clock or many requests.

use std::path::PathBuf;
use std::time::Duration;

use claygate::clock::Clock;
use claygate::compile::CompileOptions;
use claygate::health::Probes;
use claygate::pipeline::http::Transport;
use claygate::reload::{self, Reloader};
use claygate::runtime::Runtime;
use claygate::serve::{ServeConfig, Server};
use serde_json::Value;

use crate::support::script::Script;

/// A running server and what it was started with.
pub struct TestServer {
    /// The server.
    pub server: Server,
    /// `http://127.0.0.1:PORT`.
    pub base: String,
    /// A client without a token.
    pub client: reqwest::Client,
    /// The policy directory (write files here to reload).
    pub policies: PathBuf,
    /// The data directory.
    pub data: PathBuf,
    _dirs: (tempfile::TempDir, tempfile::TempDir),
}

/// Options of [`start`].
#[derive(Default)]
pub struct Options {
    /// The admin token.
    pub token: Option<String>,
    /// Watch the policy directory.
    pub watch: bool,
    /// Drain timeout (default 5s).
    pub drain: Option<Duration>,
    /// Reuse this data directory instead of a fresh one.
    pub data: Option<PathBuf>,
}

/// Writes `files` (name, text) into a fresh policy directory, with
/// `{{UPSTREAM}}` replaced by `upstream`, and starts a server on them.
pub async fn start(files: &[(&str, &str)], upstream: &str, options: Options) -> TestServer {
    let policies_dir = tempfile::tempdir().expect("policies dir");
    let data_dir = tempfile::tempdir().expect("data dir");
    for (name, text) in files {
        std::fs::write(
            policies_dir.path().join(name),
            text.replace("{{UPSTREAM}}", upstream),
        )
        .expect("write policy");
    }
    let data = options
        .data
        .clone()
        .unwrap_or_else(|| data_dir.path().to_path_buf());
    let server = Server::start(ServeConfig {
        policies: vec![policies_dir.path().to_path_buf()],
        data: data.clone(),
        listen: "127.0.0.1:0".parse().expect("addr"),
        token: options.token.clone(),
        drain: options.drain.unwrap_or(Duration::from_secs(5)),
        compile: CompileOptions::default(),
        watch: options.watch,
    })
    .await
    .unwrap_or_else(|e| panic!("server starts: {e}"));
    let base = format!("http://{}", server.addr());
    TestServer {
        server,
        base,
        client: reqwest::Client::new(),
        policies: policies_dir.path().to_path_buf(),
        data,
        _dirs: (policies_dir, data_dir),
    }
}

impl TestServer {
    /// `base + path`.
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// POSTs `params` to the operation's invoke endpoint.
    pub async fn invoke(&self, operation: &str, params: Value) -> reqwest::Response {
        self.client
            .post(self.url(&format!("/v1/operations/{operation}/invoke")))
            .json(&params)
            .send()
            .await
            .expect("invoke request")
    }

    /// GETs `path` and parses the JSON answer (any status).
    pub async fn get_json(&self, path: &str) -> (u16, Value) {
        let r = self.client.get(self.url(path)).send().await.expect("GET");
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }
}

/// A policy file with upstream `clay` at `{{UPSTREAM}}` and short timeouts.
pub const UPSTREAM: &str = "# yaml-language-server: $schema=../schemas/policy.schema.json
version: 1
upstreams:
  clay:
    base_url: \"{{UPSTREAM}}\"
    headers: { Authorization: \"Bearer test-secret-key\" }
    priorities:
      critical: { concurrency: 4, queue: 10, queue_timeout: 1s }
      normal: { concurrency: 4, queue: 10, queue_timeout: 1s }
      bulk: { concurrency: 1, queue: 1, queue_timeout: 1s }
timeouts: { connect: 1s, request: 2s }
";

/// The admin API in process: [`claygate::admin::router`] over a runtime
/// whose upstreams are all answered by a [`Script`], with a real SQLite
/// store (safe under a paused clock) and a reloader on the policy files.
/// No socket, so a test may pause the clock; requests go through
/// `tower::ServiceExt::oneshot` (see [`InProcess::send`]).
pub struct InProcess {
    /// The router (clone it per request).
    pub router: axum::Router,
    /// The handlers' state.
    pub state: claygate::admin::AppState,
    /// The scripted upstream.
    pub script: Script,
    _dirs: (tempfile::TempDir, tempfile::TempDir),
}

/// One answer of [`InProcess::send`].
#[derive(Debug)]
pub struct Answered {
    /// The status.
    pub status: u16,
    /// The headers.
    pub headers: http::HeaderMap,
    /// The body (empty for an event stream, which never ends).
    pub body: bytes::Bytes,
}

impl Answered {
    /// The body as JSON, or a panic naming the answer.
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "a JSON body ({e}): {} {}",
                self.status,
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    /// The content type, or "".
    pub fn content_type(&self) -> &str {
        self.headers
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
    }
}

/// Compile options whose every upstream is `script`, with no environment.
fn scripted(script: &Script) -> CompileOptions {
    let script = script.clone();
    CompileOptions {
        env: Box::new(|_| None),
        transport: Some(Box::new(move |_| {
            std::sync::Arc::new(script.clone()) as std::sync::Arc<dyn Transport>
        })),
    }
}

/// Serves `policy` (one file, upstream URLs unused) in process over `script`.
pub async fn in_process(policy: &str, script: &Script, token: Option<&str>) -> InProcess {
    let policies = tempfile::tempdir().expect("policies dir");
    let data = tempfile::tempdir().expect("data dir");
    std::fs::write(policies.path().join("policy.yaml"), policy).expect("write policy");
    let paths = vec![policies.path().to_path_buf()];
    let clock = Clock::new();
    let prepared = reload::prepare(&paths, None, &scripted(script), clock.now())
        .unwrap_or_else(|e| panic!("the test policy serves: {e:?}"));
    prepared.compiled.activate();
    let store = crate::support::dlq::open_store(data.path()).await;
    let runtime = Runtime::new(prepared.compiled, store, clock);
    let reloader = Reloader::new(
        std::sync::Arc::clone(&runtime),
        paths,
        scripted(script),
        prepared.generation,
    );
    let state = claygate::admin::AppState::new(
        runtime,
        Some(reloader),
        std::sync::Arc::new(Probes::default()),
        token,
    );
    InProcess {
        router: claygate::admin::router(state.clone()),
        state,
        script: script.clone(),
        _dirs: (policies, data),
    }
}

impl InProcess {
    /// Sends `request` through the router; reads the body unless it is an
    /// event stream.
    pub async fn send(&self, request: http::Request<axum::body::Body>) -> Answered {
        use tower::ServiceExt;
        let response = self
            .router
            .clone()
            .oneshot(request)
            .await
            .unwrap_or_else(|e| match e {});
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let streaming = headers
            .get(http::header::CONTENT_TYPE)
            .is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"));
        let body = if streaming {
            bytes::Bytes::new()
        } else {
            axum::body::to_bytes(response.into_body(), usize::MAX)
                .await
                .expect("the body reads")
        };
        Answered {
            status,
            headers,
            body,
        }
    }

    /// POSTs `params` as JSON to the operation's invoke endpoint.
    pub async fn invoke(&self, operation: &str, params: Value) -> Answered {
        self.send(
            http::Request::post(format!("/v1/operations/{operation}/invoke"))
                .header("content-type", "application/json")
                .body(axum::body::Body::from(params.to_string()))
                .expect("a request"),
        )
        .await
    }

    /// GETs `path`.
    pub async fn get(&self, path: &str) -> Answered {
        self.send(
            http::Request::get(path)
                .body(axum::body::Body::empty())
                .expect("a request"),
        )
        .await
    }

    /// The runtime.
    pub fn runtime(&self) -> &std::sync::Arc<Runtime> {
        self.state.runtime()
    }
}
