//! The floor of `benches/proxy/run.sh`: the same HTTP stack as `claygate
//! serve` (axum on tokio's multi-thread runtime, one pooled `reqwest`
//! client built as claygate builds it) doing the same job as the benchmark's
//! `lookup` invoke — read `{"domain": …}` from a POSTed JSON body, GET
//! `/v1/companies/{domain}` upstream, answer its body — with no policy at
//! all: no breaker, bulkhead, retry, timeout, metrics, envelope or params
//! check. The distance from this to claygate is what claygate's own work
//! costs; the distance from nginx to this is what the stack costs.
//!
//! ```text
//! cargo build --release --example bare_proxy
//! target/release/examples/bare_proxy 127.0.0.1:0 http://127.0.0.1:8080
//! ```
//!
//! Prints `listening on http://ADDR` once it accepts connections.

use std::process::ExitCode;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;

#[derive(Clone)]
struct Upstream {
    client: reqwest::Client,
    base: String,
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
    let reply = match upstream.client.get(url).send().await {
        Ok(r) => r,
        Err(e) => return (StatusCode::BAD_GATEWAY, e.to_string()).into_response(),
    };
    let status = reply.status();
    match reply.bytes().await {
        Ok(body) => (
            status,
            [(axum::http::header::CONTENT_TYPE, "application/json")],
            body,
        )
            .into_response(),
        Err(e) => (StatusCode::BAD_GATEWAY, e.to_string()).into_response(),
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [listen, base] = args.as_slice() else {
        eprintln!("usage: bare_proxy LISTEN_ADDR UPSTREAM_BASE_URL");
        return ExitCode::from(2);
    };
    let client = match reqwest::Client::builder()
        .connect_timeout(std::time::Duration::from_secs(1))
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy()
        .tcp_nodelay(true)
        .build()
    {
        Ok(c) => c,
        Err(e) => {
            eprintln!("cannot build the HTTP client: {e}");
            return ExitCode::from(2);
        }
    };
    let upstream = Upstream {
        client,
        base: base.trim_end_matches('/').to_owned(),
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
