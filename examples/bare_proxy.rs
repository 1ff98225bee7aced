//! The floor of `benches/proxy/run.sh`: the same HTTP stack as `claygate
//! serve` (axum on tokio's multi-thread runtime, one pooled `reqwest`
//! client built as claygate builds it) doing the same job as the benchmark's
//! `lookup` invoke — read `{"domain": …}` from a POSTed JSON body, GET
//! `/v1/companies/{domain}` upstream, answer its body — with no policy at
//! all: no breaker, bulkhead, retry, timeout, metrics, envelope or params
//! check. The distance from this to claygate is what claygate's own work
//! costs; the distance from nginx to this is what the stack costs.
//!
//! With `hyper` as the third argument the upstream call goes through
//! hyper-util's pooled client directly instead of reqwest (which wraps that
//! same client in redirect and retry layers): what leaving reqwest would buy.
//!
//! ```text
//! cargo build --release --example bare_proxy
//! target/release/examples/bare_proxy 127.0.0.1:0 http://127.0.0.1:8080 [reqwest|hyper]
//! ```
//!
//! Prints `listening on http://ADDR` once it accepts connections.

use std::process::ExitCode;
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

/// The upstream client: reqwest as claygate uses it, or hyper-util's alone
/// (behind an `Arc`, as reqwest keeps its own, so a clone per request is cheap).
#[derive(Clone)]
enum Client {
    Reqwest(reqwest::Client),
    Hyper(std::sync::Arc<hyper_util::client::legacy::Client<HttpConnector, Empty<Bytes>>>),
}

#[derive(Clone)]
struct Upstream {
    client: Client,
    base: String,
}

fn bad_gateway(e: impl std::fmt::Display) -> Response {
    (StatusCode::BAD_GATEWAY, e.to_string()).into_response()
}

fn json(status: StatusCode, body: Bytes) -> Response {
    (
        status,
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        body,
    )
        .into_response()
}

async fn lookup(State(upstream): State<Upstream>, body: Bytes) -> Response {
    let params: serde_json::Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => return (StatusCode::BAD_REQUEST, e.to_string()).into_response(),
    };
    let Some(domain) = params.get("domain").and_then(|d| d.as_str()) else {
        return (StatusCode::UNPROCESSABLE_ENTITY, "domain: a string").into_response();
    };
    let url = format!("{}/v1/companies/{domain}", upstream.base);
    match &upstream.client {
        Client::Reqwest(client) => {
            let reply = match client.get(url).send().await {
                Ok(r) => r,
                Err(e) => return bad_gateway(e),
            };
            let status = reply.status();
            match reply.bytes().await {
                Ok(body) => json(status, body),
                Err(e) => bad_gateway(e),
            }
        }
        Client::Hyper(client) => {
            let request = match axum::http::Request::get(url).body(Empty::new()) {
                Ok(r) => r,
                Err(e) => return (StatusCode::BAD_REQUEST, e.to_string()).into_response(),
            };
            let reply = match client.request(request).await {
                Ok(r) => r,
                Err(e) => return bad_gateway(e),
            };
            let status = reply.status();
            match reply.into_body().collect().await {
                Ok(body) => json(status, body.to_bytes()),
                Err(e) => bad_gateway(e),
            }
        }
    }
}

fn client(kind: &str) -> Result<Client, String> {
    match kind {
        "reqwest" => reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(1))
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .tcp_nodelay(true)
            .build()
            .map(Client::Reqwest)
            .map_err(|e| format!("cannot build the HTTP client: {e}")),
        "hyper" => {
            let mut connector = HttpConnector::new();
            connector.set_nodelay(true);
            connector.set_connect_timeout(Some(Duration::from_secs(1)));
            Ok(Client::Hyper(std::sync::Arc::new(
                hyper_util::client::legacy::Client::builder(TokioExecutor::new()).build(connector),
            )))
        }
        other => Err(format!("unknown client `{other}`: reqwest or hyper")),
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (listen, base, kind) = match args.as_slice() {
        [listen, base] => (listen, base, "reqwest"),
        [listen, base, kind] => (listen, base, kind.as_str()),
        _ => {
            eprintln!("usage: bare_proxy LISTEN_ADDR UPSTREAM_BASE_URL [reqwest|hyper]");
            return ExitCode::from(2);
        }
    };
    let upstream = match client(kind) {
        Ok(client) => Upstream {
            client,
            base: base.trim_end_matches('/').to_owned(),
        },
        Err(e) => {
            eprintln!("bare_proxy: {e}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("cannot start the runtime: {e}");
            return ExitCode::from(2);
        }
    };
    let served = runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(listen.as_str()).await?;
        println!("listening on http://{}", listener.local_addr()?);
        let app = Router::new()
            .route("/v1/operations/lookup/invoke", post(lookup))
            .with_state(upstream);
        axum::serve(listener, app).await
    });
    match served {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bare_proxy: {e}");
            ExitCode::from(2)
        }
    }
}
