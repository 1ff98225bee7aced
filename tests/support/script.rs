//! An in-memory upstream for runtime tests: answers by a script, records
//! every request (with its idempotency key), and can hold requests in flight
//! until the test lets them go. No sockets, so tests may pause the clock.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use claygate::compile::{CompileOptions, Compiled, compile_with};
use claygate::pipeline::http::{Rendered, Transport};
use claygate::pipeline::{Failure, Reply};
use claygate::policy::{LoadOptions, UnsetEnv, load_str};
use futures_util::future::BoxFuture;
use http::{HeaderMap, HeaderValue, StatusCode};
use tokio::sync::Semaphore;

/// What the scripted upstream does with one request.
#[derive(Debug, Clone)]
pub enum Step {
    /// Answer this status with this JSON body.
    Reply(u16, serde_json::Value),
    /// Answer this status with a header.
    ReplyWith(u16, &'static str, &'static str),
    /// Fail to connect.
    Refuse,
    /// Never answer (until the attempt timeout cuts it).
    Hang,
}

/// One request the upstream received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seen {
    /// Path and query.
    pub path: String,
    /// The JSON body, if any.
    pub body: Option<serde_json::Value>,
    /// The `Idempotency-Key` header, if sent.
    pub key: Option<String>,
    /// The status answered (`None`: refused, or still held / hanging).
    pub status: Option<u16>,
}

#[derive(Default)]
struct State {
    script: VecDeque<Step>,
    otherwise: Option<Step>,
    seen: Vec<Seen>,
}

/// A scripted in-memory upstream; clones share it.
#[derive(Clone)]
pub struct Script {
    state: Arc<Mutex<State>>,
    gate: Arc<Semaphore>,
    held: Arc<std::sync::atomic::AtomicBool>,
}

impl Script {
    /// Answers `200 {"ok": true}` to everything, with the gate open.
    pub fn new() -> Script {
        let s = Script {
            state: Arc::default(),
            gate: Arc::new(Semaphore::new(0)),
            held: Arc::default(),
        };
        s.always(Step::Reply(200, serde_json::json!({"ok": true})));
        s
    }

    /// Answers `step` once, before the default.
    pub fn then(&self, step: Step) -> &Self {
        self.lock().script.push_back(step);
        self
    }

    /// Answers `step` whenever the script is empty.
    pub fn always(&self, step: Step) -> &Self {
        self.lock().otherwise = Some(step);
        self
    }

    /// Holds every request from now on until [`release`](Self::release)
    /// lets it through.
    pub fn hold(&self) {
        self.held.store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// Lets `n` held requests (and later ones up to `n`) through.
    pub fn release(&self, n: usize) {
        self.gate.add_permits(n);
    }

    /// Requests received so far (counted when they arrive, held or not).
    pub fn seen(&self) -> Vec<Seen> {
        self.lock().seen.clone()
    }

    /// How many requests arrived.
    pub fn hits(&self) -> usize {
        self.lock().seen.len()
    }

    /// Requests answered with a 2xx, per idempotency key: more than one
    /// for a key is a duplicate delivery.
    pub fn delivered_per_key(&self) -> HashMap<Option<String>, usize> {
        let mut counts = HashMap::new();
        for s in self.lock().seen.iter() {
            if s.status.is_some_and(|c| (200..300).contains(&c)) {
                *counts.entry(s.key.clone()).or_insert(0) += 1;
            }
        }
        counts
    }

    /// Requests per idempotency key.
    pub fn per_key(&self) -> HashMap<Option<String>, usize> {
        let mut counts = HashMap::new();
        for s in self.lock().seen.iter() {
            *counts.entry(s.key.clone()).or_insert(0) += 1;
        }
        counts
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl Transport for Script {
    fn send<'a>(
        &'a self,
        request: &'a Rendered,
        extra: &'a HeaderMap,
    ) -> BoxFuture<'a, Result<Reply, Failure>> {
        Box::pin(async move {
            let step = {
                let mut state = self.lock();
                state.seen.push(Seen {
                    path: request.path_and_query.clone(),
                    body: request
                        .body
                        .as_ref()
                        .and_then(|b| serde_json::from_slice(b).ok()),
                    key: extra
                        .get("idempotency-key")
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_owned),
                    status: None,
                });
                let step = match state.script.pop_front() {
                    Some(step) => step,
                    None => state.otherwise.clone().unwrap_or(Step::Hang),
                };
                (state.seen.len() - 1, step)
            };
            let (index, step) = step;
            // A held script keeps the request as if the upstream were slow;
            // each released permit lets one request through.
            if self.held.load(std::sync::atomic::Ordering::SeqCst)
                && let Ok(permit) = self.gate.acquire().await
            {
                permit.forget();
            }
            let status = match &step {
                Step::Reply(s, _) | Step::ReplyWith(s, _, _) => Some(*s),
                Step::Refuse | Step::Hang => None,
            };
            self.lock().seen[index].status = status;
            match step {
                Step::Reply(status, body) => Ok(reply(status, Bytes::from(body.to_string()), None)),
                Step::ReplyWith(status, name, value) => Ok(reply(
                    status,
                    Bytes::from_static(b"{}"),
                    Some((name, value)),
                )),
                Step::Refuse => Err(Failure::Connect("connection refused".into())),
                Step::Hang => std::future::pending().await,
            }
        })
    }
}

fn reply(status: u16, body: Bytes, header: Option<(&'static str, &'static str)>) -> Reply {
    let mut headers = HeaderMap::new();
    headers.insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    if let Some((name, value)) = header {
        headers.insert(name, HeaderValue::from_static(value));
    }
    Reply {
        status: StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        headers,
        body,
    }
}

/// The upstream part of a test policy (upstream `clay`, two classes).
pub const UPSTREAM: &str = "version: 1
upstreams:
  clay:
    base_url: \"http://127.0.0.1:9\"
    priorities:
      critical: { concurrency: 8, queue: 1000, queue_timeout: 10s }
      normal: { concurrency: 8, queue: 1000, queue_timeout: 10s }
      bulk: { concurrency: 2, queue: 1000, queue_timeout: 60s }
timeouts: { request: 5s }
";

/// Compiles `UPSTREAM` + `operations` (a YAML `operations:` block) with every
/// upstream answered by `script`.
pub fn compile_script(operations: &str, script: &Script, previous: Option<&Compiled>) -> Compiled {
    compile_script_env(operations, script, previous, |_| None)
}

/// [`compile_script`] with `env` answering `${env:…}` references.
pub fn compile_script_env(
    operations: &str,
    script: &Script,
    previous: Option<&Compiled>,
    env: fn(&str) -> Option<String>,
) -> Compiled {
    let text = format!("{UPSTREAM}{operations}");
    let loaded = load_str(
        "test.yaml",
        &text,
        LoadOptions {
            unset_env: UnsetEnv::Ignore,
        },
    );
    let Some(set) = loaded.set else {
        panic!("test policy must be valid: {:#?}", loaded.diagnostics);
    };
    let script = script.clone();
    let options = CompileOptions {
        env: Box::new(env),
        transport: Some(Box::new(move |_| {
            Arc::new(script.clone()) as Arc<dyn Transport>
        })),
    };
    match compile_with(&set, previous, &options) {
        Ok(c) => c,
        Err(e) => panic!("compile failed: {e:?}"),
    }
}
