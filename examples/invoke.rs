//! A small client of a running claygate: invokes one operation and prints
//! the answer.
//!
//! ```text
//! claygate serve &                       # in another terminal
//! cargo run --example invoke -- lookup_company '{"domain":"acme.com"}'
//! cargo run --example invoke -- push_row '{"table_id":"t_1","row":{"email":"ada@example.com"}}' order-42
//! ```
//!
//! Arguments: `OPERATION [PARAMS_JSON] [IDEMPOTENCY_KEY]` (params default to
//! `{}`). `CLAYGATE_URL` (default `http://127.0.0.1:7700`) names the server;
//! `CLAYGATE_ADMIN_TOKEN`, when set, is sent as `Authorization: Bearer`.
//!
//! Exit codes: 0 when the call was answered (ok or fallback) or queued in the
//! DLQ, 1 when claygate answered a problem document, 2 on usage or
//! connection errors.

use std::process::ExitCode;

use serde_json::Value;

const DEFAULT_URL: &str = "http://127.0.0.1:7700";

/// Characters encoded in a path segment: controls, space, and those that
/// would end or split it (RFC 3986 keeps only unreserved ones and `-._~` as is).
const SEGMENT: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (operation, params, key) = match args.as_slice() {
        [op] => (op.as_str(), "{}", None),
        [op, params] => (op.as_str(), params.as_str(), None),
        [op, params, key] => (op.as_str(), params.as_str(), Some(key.as_str())),
        _ => {
            eprintln!("usage: invoke OPERATION [PARAMS_JSON] [IDEMPOTENCY_KEY]");
            eprintln!("  e.g. invoke lookup_company '{{\"domain\":\"acme.com\"}}'");
            return ExitCode::from(2);
        }
    };
    // Check the params here, so a typo is reported before anything is sent.
    let params: Value = match serde_json::from_str(params) {
        Ok(v) => v,
        Err(e) => {
            eprintln!("invoke: PARAMS_JSON is not valid JSON: {e}");
            return ExitCode::from(2);
        }
    };
    let base = std::env::var("CLAYGATE_URL").unwrap_or_else(|_| DEFAULT_URL.to_owned());
    // The name is one path segment: encoded, so `a/b` or `a?b` cannot
    // reach another endpoint.
    let segment = percent_encoding::utf8_percent_encode(operation, SEGMENT);
    let url = format!(
        "{}/v1/operations/{segment}/invoke",
        base.trim_end_matches('/')
    );

    let mut request = reqwest::Client::new()
        .post(&url)
        .header("content-type", "application/json")
        .body(params.to_string());
    if let Ok(token) = std::env::var("CLAYGATE_ADMIN_TOKEN") {
        request = request.bearer_auth(token.trim());
    }
    if let Some(key) = key {
        request = request.header("idempotency-key", key);
    }
    let response = match request.send().await {
        Ok(r) => r,
        Err(e) => {
            eprintln!("invoke: cannot reach claygate at {base}: {e}");
            return ExitCode::from(2);
        }
    };

    let status = response.status();
    let header = |name: &str| {
        response
            .headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let content_type = header("content-type").unwrap_or_default();
    let location = header("location");
    let retry_after = header("retry-after");
    let staleness = header("x-claygate-staleness");
    let replayed = header("idempotent-replayed").is_some_and(|v| v == "true");
    let text = match response.text().await {
        Ok(t) => t,
        Err(e) => {
            eprintln!("invoke: the answer broke off: {e}");
            return ExitCode::from(2);
        }
    };
    let body: Value = serde_json::from_str(&text).unwrap_or(Value::String(text));
    let pretty = serde_json::to_string_pretty(&body).unwrap_or_default();

    if content_type.starts_with("application/problem+json") {
        // A problem document (RFC 9457) with claygate's stable `code`.
        eprintln!(
            "{} {}: {}",
            status.as_u16(),
            body["code"].as_str().unwrap_or("error"),
            body["detail"].as_str().unwrap_or("")
        );
        if let Some(after) = retry_after {
            eprintln!("retry after {after}s");
        }
        println!("{pretty}");
        return ExitCode::from(1);
    }
    match status.as_u16() {
        200 => {
            match body["status"].as_str() {
                Some("fallback") => eprintln!(
                    "answered from fallback ({}), because: {}",
                    staleness.as_deref().unwrap_or("unknown staleness"),
                    body["meta"]["cause"]["message"].as_str().unwrap_or("?")
                ),
                _ if replayed => eprintln!("replayed an earlier answer (idempotency)"),
                _ => {}
            }
            println!("{pretty}");
            ExitCode::SUCCESS
        }
        202 => {
            eprintln!(
                "queued: dead letter {} ({}); claygate will redrive it",
                body["meta"]["dlq_id"],
                location.as_deref().unwrap_or("no Location")
            );
            println!("{pretty}");
            ExitCode::SUCCESS
        }
        other => {
            eprintln!("unexpected answer {other}");
            println!("{pretty}");
            ExitCode::from(1)
        }
    }
}
