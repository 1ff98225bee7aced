//! A real `claygate serve` (in process, via the library) on 127.0.0.1:0,
//! with policies written to a temp dir, and an HTTP client for it.

use std::path::PathBuf;
use std::time::Duration;

use claygate::compile::CompileOptions;
use claygate::serve::{ServeConfig, Server};
use serde_json::Value;

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
