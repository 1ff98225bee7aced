//! A scriptable fake upstream on 127.0.0.1: answers each request with the
//! next scripted behaviour (or the default), and records what it received.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};

/// What the fake does with one request.
#[derive(Debug, Clone)]
pub enum Behavior {
    /// Answer with this status, headers and body, after `delay`.
    Respond {
        status: u16,
        headers: Vec<(&'static str, String)>,
        body: String,
        delay: Duration,
    },
    /// Never answer.
    Hang,
    /// Start a 200 answer, then break the connection mid-body.
    ResetMidBody,
    /// Answer this status with a body of this many bytes, streamed in chunks.
    LargeBody(u16, usize),
}

impl Behavior {
    /// A plain answer.
    pub fn status(status: u16, body: &str) -> Behavior {
        Behavior::Respond {
            status,
            headers: Vec::new(),
            body: body.to_owned(),
            delay: Duration::ZERO,
        }
    }

    /// `200` with a JSON body.
    pub fn ok(body: &str) -> Behavior {
        Behavior::status(200, body)
    }

    /// An answer with extra headers.
    pub fn with_header(mut self, name: &'static str, value: &str) -> Behavior {
        if let Behavior::Respond { headers, .. } = &mut self {
            headers.push((name, value.to_owned()));
        }
        self
    }
}

/// A request as the fake saw it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    pub path_and_query: String,
    pub headers: HeaderMap,
    pub body: Bytes,
}

#[derive(Default)]
struct Script {
    queue: VecDeque<Behavior>,
    default: Option<Behavior>,
    seen: Vec<Seen>,
}

/// The running fake. Dropping it does not stop the server task; tests are short-lived.
#[derive(Clone)]
pub struct FakeUpstream {
    pub addr: SocketAddr,
    script: Arc<Mutex<Script>>,
}

impl FakeUpstream {
    /// Starts a fake answering `200 {}` unless scripted otherwise.
    pub async fn start() -> FakeUpstream {
        let script = Arc::new(Mutex::new(Script::default()));
        let app = Router::new()
            .fallback(handle)
            .with_state(Arc::clone(&script));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the fake upstream");
        let addr = listener.local_addr().expect("local addr");
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        FakeUpstream { addr, script }
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Queues behaviours for the next requests, in order.
    pub fn then(&self, behaviors: impl IntoIterator<Item = Behavior>) -> &Self {
        self.script
            .lock()
            .expect("script lock")
            .queue
            .extend(behaviors);
        self
    }

    /// The behaviour once the queue is empty.
    pub fn always(&self, behavior: Behavior) -> &Self {
        self.script.lock().expect("script lock").default = Some(behavior);
        self
    }

    /// The requests received so far.
    pub fn seen(&self) -> Vec<Seen> {
        self.script.lock().expect("script lock").seen.clone()
    }

    /// How many requests arrived.
    pub fn hits(&self) -> usize {
        self.script.lock().expect("script lock").seen.len()
    }
}

async fn handle(State(script): State<Arc<Mutex<Script>>>, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    let body = axum::body::to_bytes(body, 16 * 1024 * 1024)
        .await
        .unwrap_or_default();
    let behavior = {
        let mut s = script.lock().expect("script lock");
        s.seen.push(Seen {
            method: parts.method.to_string(),
            path_and_query: parts
                .uri
                .path_and_query()
                .map(|p| p.as_str().to_owned())
                .unwrap_or_default(),
            headers: parts.headers.clone(),
            body,
        });
        s.queue
            .pop_front()
            .or_else(|| s.default.clone())
            .unwrap_or_else(|| Behavior::ok("{}"))
    };
    match behavior {
        Behavior::Respond {
            status,
            headers,
            body,
            delay,
        } => {
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            let mut response = (
                StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
                body,
            )
                .into_response();
            response.headers_mut().insert(
                "content-type",
                axum::http::HeaderValue::from_static("application/json"),
            );
            for (name, value) in headers {
                if let Ok(v) = axum::http::HeaderValue::from_str(&value) {
                    response.headers_mut().insert(name, v);
                }
            }
            response
        }
        Behavior::Hang => {
            std::future::pending::<()>().await;
            StatusCode::OK.into_response()
        }
        Behavior::ResetMidBody => {
            let chunks: Vec<Result<Bytes, std::io::Error>> = vec![
                Ok(Bytes::from_static(b"{\"partial\":")),
                Err(std::io::Error::other("connection dropped by the fake")),
            ];
            Response::new(Body::from_stream(futures_util::stream::iter(chunks)))
        }
        Behavior::LargeBody(status, n) => {
            let chunk = Bytes::from(vec![b'x'; 64 * 1024]);
            let count = n.div_ceil(chunk.len());
            let chunks: Vec<Result<Bytes, std::io::Error>> =
                (0..count).map(|_| Ok(chunk.clone())).collect();
            let mut response = Response::new(Body::from_stream(futures_util::stream::iter(chunks)));
            *response.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::OK);
            response
        }
    }
}
