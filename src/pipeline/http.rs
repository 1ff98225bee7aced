//! The innermost step: fill an operation's request template and send it.
//!
//! A [`CompiledRequest`] is parsed once when policies are compiled; each call
//! [`render`](CompiledRequest::render)s it with the invoke params into a
//! [`Rendered`] request, which a [`Transport`] sends. The transport answers
//! `Ok` for every HTTP status: deciding what a 503 means is the composer's
//! job, not the wire's. It fails only when no reply came:
//! [`Failure::Connect`] when no connection could be set up (so the request
//! certainly had no effect), [`Failure::Transport`] when the connection broke
//! later (so it may have), and [`Failure::BodyTooLarge`] when the reply would
//! not fit in memory.
//!
//! Error texts never include header values: upstream headers carry secrets.

use std::borrow::Cow;
use std::fmt;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures_util::future::BoxFuture;
use http::header::{CONTENT_TYPE, HeaderName, HeaderValue};
use http::{HeaderMap, Method};
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
use serde_json::Value;
use url::Url;

use super::{Failure, Reply};
use crate::policy::model::{self, RequestTemplate};
use crate::policy::template::{Piece, Template};

/// Everything but the RFC 3986 unreserved characters is encoded in a path
/// segment taken from params, so a value can never add a segment (`/`), a
/// query (`?`), a fragment (`#`) or a backslash (which URL parsers treat as
/// `/`).
const SEGMENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// A request template compiled once: method, path, query, headers and body
/// with `{{ params.x }}` placeholders.
#[derive(Debug, Clone)]
pub struct CompiledRequest {
    method: Method,
    path: Template,
    query: Vec<(String, Template)>,
    headers: Vec<(HeaderName, HeaderTemplate)>,
    body: Option<BodyNode>,
}

#[derive(Debug, Clone)]
enum HeaderTemplate {
    /// No placeholder: checked and built at compile time.
    Literal(HeaderValue),
    Template(Template),
}

/// A JSON body with the placeholders found.
#[derive(Debug, Clone)]
enum BodyNode {
    /// A subtree without placeholders.
    Literal(Value),
    /// A string that is exactly one placeholder: the param with its JSON type.
    Whole(Vec<String>),
    /// A string with placeholders among text.
    Text(Template),
    Array(Vec<BodyNode>),
    Object(Vec<(String, BodyNode)>),
}

/// A filled request, ready to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rendered {
    /// HTTP method.
    pub method: Method,
    /// Path (always starting with `/`) and query, to append to the base URL.
    pub path_and_query: String,
    /// The operation's own headers (upstream headers are added on sending).
    pub headers: HeaderMap,
    /// JSON body, if the template has one.
    pub body: Option<Bytes>,
}

impl CompiledRequest {
    /// Compiles `t`. `extra_headers` are more headers of the operation (for
    /// instance its headers after `${env:…}` expansion); they are templates
    /// like `t.headers` and win over a header of the same name there.
    /// Upstream headers are not given here: the transport adds them.
    ///
    /// The error names the field, e.g. `request.headers.X-Key: not a valid
    /// header name`, and never quotes a header value.
    pub fn compile(
        t: &RequestTemplate,
        extra_headers: &[(String, String)],
    ) -> Result<CompiledRequest, String> {
        let path = Template::parse(&t.path).map_err(|e| format!("request.path: {e}"))?;
        let query = t
            .query
            .iter()
            .map(|(name, value)| {
                let template =
                    Template::parse(value).map_err(|e| format!("request.query.{name}: {e}"))?;
                Ok((name.clone(), template))
            })
            .collect::<Result<Vec<_>, String>>()?;
        let headers = t
            .headers
            .iter()
            .map(|(n, v)| (n.as_str(), v.as_str()))
            .chain(extra_headers.iter().map(|(n, v)| (n.as_str(), v.as_str())))
            .map(|(name, value)| compile_header(name, value))
            .collect::<Result<Vec<_>, String>>()?;
        let body = t
            .body
            .as_ref()
            .map(|b| compile_body(b, &mut "request.body".to_owned()))
            .transpose()?;
        Ok(CompiledRequest {
            method: method(t.method),
            path,
            query,
            headers,
            body,
        })
    }

    /// Fills the template with `params`.
    ///
    /// Path placeholders are percent-encoded as (part of) one path segment:
    /// a `/` in a value is encoded, and a value that would make a `.` or `..`
    /// segment is refused. Query values are form-encoded. Header values must
    /// be valid header values (no line breaks). In the JSON body a string that
    /// is exactly one placeholder becomes the param with its JSON type; other
    /// strings interpolate: strings as they are, numbers and booleans as text,
    /// objects and arrays as compact JSON, `null` as nothing. A param missing
    /// from `params` is [`Failure::BadParams`] naming it.
    pub fn render(&self, params: &Value) -> Result<Rendered, Failure> {
        self.fill(params).map_err(Failure::BadParams)
    }

    /// [`render`](Self::render), failing with the bad-params message.
    fn fill(&self, params: &Value) -> Result<Rendered, String> {
        let mut path_and_query = render_path(&self.path, params)?;
        if !self.query.is_empty() {
            let mut query = url::form_urlencoded::Serializer::new(String::new());
            for (name, template) in &self.query {
                query.append_pair(name, &interpolate(template, params)?);
            }
            path_and_query.push('?');
            path_and_query.push_str(&query.finish());
        }
        let mut headers = HeaderMap::with_capacity(self.headers.len());
        for (name, template) in &self.headers {
            let mut value = match template {
                HeaderTemplate::Literal(v) => v.clone(),
                HeaderTemplate::Template(t) => {
                    let text = interpolate(t, params)?;
                    HeaderValue::from_str(&text).map_err(|_| {
                        format!(
                            "{} do not make a valid value for header `{name}`",
                            describe_params(t)
                        )
                    })?
                }
            };
            // Operation headers may hold secrets; keep them out of Debug output.
            value.set_sensitive(true);
            headers.insert(name.clone(), value);
        }
        let body = match &self.body {
            None => None,
            Some(node) => {
                let mut out = Vec::with_capacity(128);
                write_body(node, params, &mut out)?;
                Some(Bytes::from(out))
            }
        };
        Ok(Rendered {
            method: self.method.clone(),
            path_and_query,
            headers,
            body,
        })
    }
}

fn method(m: model::Method) -> Method {
    match m {
        model::Method::Get => Method::GET,
        model::Method::Head => Method::HEAD,
        model::Method::Post => Method::POST,
        model::Method::Put => Method::PUT,
        model::Method::Patch => Method::PATCH,
        model::Method::Delete => Method::DELETE,
    }
}

fn compile_header(name: &str, value: &str) -> Result<(HeaderName, HeaderTemplate), String> {
    let header = HeaderName::from_bytes(name.as_bytes())
        .map_err(|_| format!("request.headers.{name}: not a valid header name"))?;
    // The parse error may quote the value; say where instead.
    let template = Template::parse(value).map_err(|e| {
        format!(
            "request.headers.{name}: malformed placeholder at byte {}",
            e.offset
        )
    })?;
    let compiled = if template.is_literal() {
        let value = HeaderValue::from_str(value)
            .map_err(|_| format!("request.headers.{name}: not a valid header value"))?;
        HeaderTemplate::Literal(value)
    } else {
        HeaderTemplate::Template(template)
    };
    Ok((header, compiled))
}

/// Compiles a body value; `at` is its field path, for errors.
fn compile_body(value: &Value, at: &mut String) -> Result<BodyNode, String> {
    let node = match value {
        Value::String(s) => {
            let template = Template::parse(s).map_err(|e| format!("{at}: {e}"))?;
            if template.is_literal() {
                BodyNode::Literal(value.clone())
            } else if let Some(path) = template.whole_param() {
                BodyNode::Whole(path.to_vec())
            } else {
                BodyNode::Text(template)
            }
        }
        Value::Array(items) => {
            let mut nodes = Vec::with_capacity(items.len());
            for (i, item) in items.iter().enumerate() {
                let len = at.len();
                at.push_str(&format!("[{i}]"));
                nodes.push(compile_body(item, at)?);
                at.truncate(len);
            }
            if nodes.iter().all(|n| matches!(n, BodyNode::Literal(_))) {
                BodyNode::Literal(value.clone())
            } else {
                BodyNode::Array(nodes)
            }
        }
        Value::Object(fields) => {
            let mut nodes = Vec::with_capacity(fields.len());
            for (key, item) in fields {
                let len = at.len();
                at.push('.');
                at.push_str(key);
                nodes.push((key.clone(), compile_body(item, at)?));
                at.truncate(len);
            }
            if nodes.iter().all(|(_, n)| matches!(n, BodyNode::Literal(_))) {
                BodyNode::Literal(value.clone())
            } else {
                BodyNode::Object(nodes)
            }
        }
        Value::Null | Value::Bool(_) | Value::Number(_) => BodyNode::Literal(value.clone()),
    };
    Ok(node)
}

/// Writes the body as JSON straight into `out`, without building a
/// `Value` first (this runs on every call).
fn write_body(node: &BodyNode, params: &Value, out: &mut Vec<u8>) -> Result<(), String> {
    match node {
        BodyNode::Literal(v) => json(out, v)?,
        BodyNode::Whole(path) => json(out, lookup(params, path)?)?,
        BodyNode::Text(t) => json(out, &*interpolate(t, params)?)?,
        BodyNode::Array(items) => {
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_body(item, params, out)?;
            }
            out.push(b']');
        }
        BodyNode::Object(fields) => {
            out.push(b'{');
            for (i, (key, item)) in fields.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                json(out, key.as_str())?;
                out.push(b':');
                write_body(item, params, out)?;
            }
            out.push(b'}');
        }
    }
    Ok(())
}

/// Appends `value` as compact JSON.
fn json<T: serde::Serialize + ?Sized>(out: &mut Vec<u8>, value: &T) -> Result<(), String> {
    serde_json::to_writer(out, value).map_err(|e| format!("cannot encode the body: {e}"))
}

/// The param at `path` below `params`, walking objects.
fn lookup<'v>(params: &'v Value, path: &[String]) -> Result<&'v Value, String> {
    path.iter()
        .try_fold(params, |v, key| v.get(key.as_str()))
        .ok_or_else(|| format!("missing param `params.{}`", path.join(".")))
}

/// A param as text: strings as they are, `null` as nothing, anything else as
/// compact JSON.
fn text(value: &Value) -> Cow<'_, str> {
    match value {
        Value::String(s) => Cow::Borrowed(s),
        Value::Null => Cow::Borrowed(""),
        other => Cow::Owned(other.to_string()),
    }
}

fn interpolate<'t>(template: &'t Template, params: &Value) -> Result<Cow<'t, str>, String> {
    if let [Piece::Text(t)] = template.pieces() {
        return Ok(Cow::Borrowed(t));
    }
    let mut out = String::new();
    for piece in template.pieces() {
        match piece {
            Piece::Text(t) => out.push_str(t),
            Piece::Param(path) => out.push_str(&text(lookup(params, path)?)),
        }
    }
    Ok(Cow::Owned(out))
}

fn describe_params(template: &Template) -> String {
    let names: Vec<String> = template
        .params()
        .map(|p| format!("`params.{}`", p.join(".")))
        .collect();
    names.join(", ")
}

/// Renders the path, always starting with `/`, with params percent-encoded.
fn render_path(template: &Template, params: &Value) -> Result<String, String> {
    let mut out = String::with_capacity(64);
    // Where the current segment starts and whether a param wrote into it:
    // a param must not make a `.` or `..` segment, which URL parsing would
    // resolve, climbing out of the operation's path.
    let mut segment_start = 0;
    let mut param_in_segment: Option<&[String]> = None;
    let check = |out: &str, start: usize, param: Option<&[String]>| match param {
        Some(path) if is_dot_segment(&out[start..]) => Err(format!(
            "param `params.{}` makes a `.` or `..` path segment",
            path.join(".")
        )),
        _ => Ok(()),
    };
    for piece in template.pieces() {
        match piece {
            Piece::Text(t) => {
                for (i, part) in t.split('/').enumerate() {
                    if i > 0 {
                        check(&out, segment_start, param_in_segment)?;
                        out.push('/');
                        segment_start = out.len();
                        param_in_segment = None;
                    }
                    out.push_str(part);
                }
            }
            Piece::Param(path) => {
                let value = lookup(params, path)?;
                out.extend(utf8_percent_encode(&text(value), SEGMENT));
                param_in_segment = Some(path);
            }
        }
    }
    check(&out, segment_start, param_in_segment)?;
    if !out.starts_with('/') {
        out.insert(0, '/');
    }
    Ok(out)
}

fn is_dot_segment(segment: &str) -> bool {
    matches!(segment, "." | "..")
}

/// Sends rendered requests. A trait so benchmarks and tests can answer in
/// memory.
pub trait Transport: Send + Sync + 'static {
    /// Sends `request` with the `extra` headers of this call (e.g.
    /// `Idempotency-Key`), which win over every other header. Answers `Ok`
    /// for any HTTP status.
    fn send<'a>(
        &'a self,
        request: &'a Rendered,
        extra: &'a HeaderMap,
    ) -> BoxFuture<'a, Result<Reply, Failure>>;
}

/// How to reach one upstream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpConfig {
    /// Base URL; a path in it prefixes every operation's path.
    pub base_url: Url,
    /// Upstream headers, `${env:…}` already expanded (may hold secrets).
    pub headers: HeaderMap,
    /// Bound on setting up a connection (TCP and TLS).
    pub connect_timeout: Duration,
    /// Largest response body accepted, in bytes.
    pub max_response_bytes: usize,
}

/// The [`Transport`] over HTTP: one `reqwest::Client` per upstream, so calls
/// share its keep-alive pool. TLS is rustls; redirects are not followed (an
/// API proxy must not silently send a request somewhere else, perhaps with
/// its credentials) and no proxy is taken from the environment.
pub struct ReqwestTransport {
    client: reqwest::Client,
    config: HttpConfig,
}

impl fmt::Debug for ReqwestTransport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Not the config's Debug: it would print the header values.
        f.debug_struct("ReqwestTransport")
            .field("base_url", &self.config.base_url.as_str())
            .field("headers", &self.config.headers.keys().collect::<Vec<_>>())
            .field("connect_timeout", &self.config.connect_timeout)
            .field("max_response_bytes", &self.config.max_response_bytes)
            .finish()
    }
}

impl ReqwestTransport {
    /// Builds the client for `config`. Fails when the base URL is not
    /// `http` or `https` or the client cannot be built.
    pub fn new(mut config: HttpConfig) -> Result<ReqwestTransport, String> {
        if !matches!(config.base_url.scheme(), "http" | "https") || !config.base_url.has_host() {
            return Err(format!(
                "base_url: `{}` is not an http or https URL",
                config.base_url.scheme()
            ));
        }
        for value in config.headers.values_mut() {
            value.set_sensitive(true);
        }
        let client = reqwest::Client::builder()
            .connect_timeout(config.connect_timeout)
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .tcp_nodelay(true)
            .build()
            .map_err(|e| format!("cannot build the HTTP client: {}", chain(&e)))?;
        Ok(ReqwestTransport { client, config })
    }

    /// The settings this transport was built with.
    pub fn config(&self) -> &HttpConfig {
        &self.config
    }

    async fn execute(&self, request: &Rendered, extra: &HeaderMap) -> Result<Reply, Failure> {
        let url = join(&self.config.base_url, &request.path_and_query);
        let mut headers = HeaderMap::with_capacity(
            self.config.headers.len() + request.headers.len() + extra.len() + 1,
        );
        if request.body.is_some() {
            headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        }
        overlay(&mut headers, &self.config.headers);
        overlay(&mut headers, &request.headers);
        overlay(&mut headers, extra);
        let mut builder = self
            .client
            .request(request.method.clone(), url)
            .headers(headers);
        if let Some(body) = &request.body {
            builder = builder.body(body.clone());
        }
        let mut response = builder.send().await.map_err(classify)?;

        let limit = self.config.max_response_bytes;
        let too_large = Failure::BodyTooLarge { limit };
        let status = response.status();
        // An error status must stay visible (it decides retries and the
        // breaker's verdict), so an oversized error body is cut at the limit
        // rather than turned into `body_too_large`.
        let truncate = !status.is_success();
        let declared = response.content_length();
        if declared.is_some_and(|n| n > limit as u64) && !truncate {
            return Err(too_large);
        }
        let headers = std::mem::take(response.headers_mut());
        let capacity = declared.map_or(0, |n| usize::try_from(n).unwrap_or(limit).min(limit));
        let mut body = BytesMut::with_capacity(capacity);
        // Stop at the limit: a body without Content-Length may never end.
        while let Some(chunk) = response.chunk().await.map_err(classify)? {
            if body.len() + chunk.len() > limit {
                if truncate {
                    let room = limit - body.len();
                    body.extend_from_slice(&chunk[..room]);
                    break;
                }
                return Err(too_large);
            }
            body.extend_from_slice(&chunk);
        }
        Ok(Reply {
            status,
            headers,
            body: body.freeze(),
        })
    }
}

impl Transport for ReqwestTransport {
    fn send<'a>(
        &'a self,
        request: &'a Rendered,
        extra: &'a HeaderMap,
    ) -> BoxFuture<'a, Result<Reply, Failure>> {
        Box::pin(self.execute(request, extra))
    }
}

/// Puts every header of `layer` into `into`, replacing headers of the same
/// name but keeping repeated values within `layer`.
fn overlay(into: &mut HeaderMap, layer: &HeaderMap) {
    for name in layer.keys() {
        into.remove(name);
        for value in layer.get_all(name) {
            into.append(name.clone(), value.clone());
        }
    }
}

/// `base` + `path_and_query`, keeping the base's path as a prefix
/// (`https://h/api` + `/v1/x` is `https://h/api/v1/x`) and its query.
fn join(base: &Url, path_and_query: &str) -> Url {
    let (path, query) = match path_and_query.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (path_and_query, None),
    };
    // Setting path and query on a copy of the base parses only those two;
    // parsing the whole URL again (host, IDNA) was a tenth of an invoke.
    let mut url = base.clone();
    let base_path = base.path().trim_end_matches('/');
    let mut full = String::with_capacity(base_path.len() + path.len() + 1);
    full.push_str(base_path);
    if !path.starts_with('/') {
        full.push('/');
    }
    full.push_str(path);
    url.set_path(&full);
    let queries: Vec<&str> = base
        .query()
        .into_iter()
        .chain(query)
        .filter(|q| !q.is_empty())
        .collect();
    match queries.as_slice() {
        [] => url.set_query(None),
        [one] => url.set_query(Some(one)),
        many => url.set_query(Some(&many.join("&"))),
    }
    url
}

/// Maps a reqwest error to a failure. The URL is dropped from the message
/// (a base URL may carry a key in its query); header values never appear in
/// reqwest's messages.
fn classify(error: reqwest::Error) -> Failure {
    let error = error.without_url();
    let message = chain(&error);
    if error.is_connect() {
        Failure::Connect(message)
    } else if error.is_builder() {
        Failure::BadParams(message)
    } else {
        Failure::Transport(message)
    }
}

/// An error and its sources, joined with `: `.
fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        let more = e.to_string();
        // Some errors repeat their source in their own message.
        if !text.ends_with(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        source = e.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::net::SocketAddr;
    use std::sync::Arc;

    use axum::Router;
    use axum::body::Body;
    use axum::response::IntoResponse;
    use axum::routing::get;
    use futures_util::StreamExt;
    use serde_json::json;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use super::*;

    fn template(
        method: model::Method,
        path: &str,
        query: &[(&str, &str)],
        headers: &[(&str, &str)],
        body: Option<Value>,
    ) -> RequestTemplate {
        let map = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
            pairs
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect()
        };
        RequestTemplate {
            method,
            path: path.to_owned(),
            query: map(query),
            headers: map(headers),
            body,
        }
    }

    fn get_path(path: &str) -> CompiledRequest {
        CompiledRequest::compile(&template(model::Method::Get, path, &[], &[], None), &[])
            .expect("compiles")
    }

    fn body_of(r: &Rendered) -> Value {
        serde_json::from_slice(r.body.as_deref().expect("has a body")).expect("json body")
    }

    #[test]
    fn body_placeholders_keep_their_json_type() {
        let t = template(
            model::Method::Post,
            "/rows",
            &[],
            &[],
            Some(json!({
                "row": "{{ params.row }}",
                "count": "{{params.count}}",
                "flag": "{{ params.flag }}",
                "tags": ["{{ params.tags }}", "fixed", 3],
                "email": "{{ params.row.email }}",
                "label": "n={{ params.count }} ok={{ params.flag }} row={{ params.row }} s={{ params.name }} z={{ params.nothing }}",
                "static": {"a": [1, "b"]}
            })),
        );
        let compiled = CompiledRequest::compile(&t, &[]).expect("compiles");
        let params = json!({
            "row": {"email": "a@b.c", "n": 1},
            "count": 42,
            "flag": true,
            "tags": ["x", "y"],
            "name": "Zoë",
            "nothing": null
        });
        let r = compiled.render(&params).expect("renders");
        assert_eq!(r.method, Method::POST);
        assert_eq!(
            body_of(&r),
            json!({
                "row": {"email": "a@b.c", "n": 1},
                "count": 42,
                "flag": true,
                "tags": [["x", "y"], "fixed", 3],
                "email": "a@b.c",
                "label": r#"n=42 ok=true row={"email":"a@b.c","n":1} s=Zoë z="#,
                "static": {"a": [1, "b"]}
            })
        );
    }

    #[test]
    fn path_params_are_encoded_as_one_segment() {
        let c = get_path("/v1/tables/{{ params.table }}/rows/{{ params.id }}");
        let r = c
            .render(&json!({"table": "a/b?c d#e", "id": "ü-._~%\\"}))
            .expect("renders");
        assert_eq!(
            r.path_and_query,
            "/v1/tables/a%2Fb%3Fc%20d%23e/rows/%C3%BC-._~%25%5C"
        );
        let r = c.render(&json!({"table": 7, "id": true})).expect("renders");
        assert_eq!(r.path_and_query, "/v1/tables/7/rows/true");
        // No leading slash in the template: one is added.
        let r = get_path("x/{{ params.id }}")
            .render(&json!({"id": "1"}))
            .expect("renders");
        assert_eq!(r.path_and_query, "/x/1");
    }

    #[test]
    fn path_params_cannot_make_dot_segments() {
        let c = get_path("/v1/tables/{{ params.table }}/rows");
        for bad in [".", ".."] {
            let err = c.render(&json!({"table": bad})).expect_err("refused");
            assert!(
                matches!(&err, Failure::BadParams(m) if m.contains("params.table")),
                "{err:?}"
            );
        }
        // Dots inside a longer segment are harmless.
        for fine in ["...", "a..", "..b", ".x"] {
            assert!(c.render(&json!({"table": fine})).is_ok(), "{fine}");
        }
        let prefixed = get_path("/v1/x{{ params.a }}/y");
        assert!(prefixed.render(&json!({"a": ".."})).is_ok());
        let tail = get_path("/v1/{{ params.a }}");
        assert!(tail.render(&json!({"a": ".."})).is_err());
    }

    #[test]
    fn query_values_are_form_encoded() {
        let t = template(
            model::Method::Get,
            "/search",
            &[
                ("q", "{{ params.q }}"),
                ("limit", "{{ params.limit }}"),
                ("fixed", "a b"),
            ],
            &[],
            None,
        );
        let c = CompiledRequest::compile(&t, &[]).expect("compiles");
        let r = c
            .render(&json!({"q": "a&b=c d/ü", "limit": 10}))
            .expect("renders");
        assert_eq!(
            r.path_and_query,
            "/search?fixed=a+b&limit=10&q=a%26b%3Dc+d%2F%C3%BC"
        );
        assert_eq!(r.body, None);
    }

    #[test]
    fn headers_are_filled_and_checked() {
        let t = template(
            model::Method::Get,
            "/x",
            &[],
            &[
                ("X-Row", "row-{{ params.id }}"),
                ("X-Fixed", "yes"),
                ("X-Both", "template"),
            ],
            None,
        );
        let extra = [("x-both".to_owned(), "extra {{ params.id }}".to_owned())];
        let c = CompiledRequest::compile(&t, &extra).expect("compiles");
        let r = c.render(&json!({"id": 5})).expect("renders");
        assert_eq!(r.headers["x-row"], "row-5");
        assert_eq!(r.headers["x-fixed"], "yes");
        assert_eq!(r.headers["x-both"], "extra 5");
        assert_eq!(r.headers.len(), 3);
        // Header injection through a param is refused, and the value is not quoted.
        let err = c
            .render(&json!({"id": "1\r\nX-Evil: 1"}))
            .expect_err("refused");
        match err {
            Failure::BadParams(m) => {
                assert!(m.contains("params.id") && m.contains("X-Row".to_lowercase().as_str()));
                assert!(!m.contains("Evil"), "{m}");
            }
            other => panic!("unexpected {other:?}"),
        }
        // Values are kept out of Debug output.
        assert!(!format!("{r:?}").contains("row-5"));
    }

    #[test]
    fn compile_errors_name_the_field_and_not_the_value() {
        let compile = |t: RequestTemplate, extra: &[(String, String)]| {
            CompiledRequest::compile(&t, extra).expect_err("refused")
        };
        let bad_name = template(model::Method::Get, "/x", &[], &[("X Key", "v")], None);
        assert_eq!(
            compile(bad_name, &[]),
            "request.headers.X Key: not a valid header name"
        );
        let bad_value = template(
            model::Method::Get,
            "/x",
            &[],
            &[("X-Key", "s3cret\n")],
            None,
        );
        let e = compile(bad_value, &[]);
        assert_eq!(e, "request.headers.X-Key: not a valid header value");
        let extra = [("X-Key".to_owned(), "s3cret {{ nope }}".to_owned())];
        let e = compile(template(model::Method::Get, "/x", &[], &[], None), &extra);
        assert!(
            e.starts_with("request.headers.X-Key:") && !e.contains("s3cret"),
            "{e}"
        );
        let e = compile(
            template(model::Method::Get, "/{{ x }}", &[], &[], None),
            &[],
        );
        assert!(e.starts_with("request.path:"), "{e}");
        let e = compile(
            template(model::Method::Get, "/x", &[("q", "{{ params.q")], &[], None),
            &[],
        );
        assert!(e.starts_with("request.query.q:"), "{e}");
        let body = json!({"rows": [{"a": 1}, {"email": "{{ email }}"}]});
        let e = compile(
            template(model::Method::Post, "/x", &[], &[], Some(body)),
            &[],
        );
        assert!(e.starts_with("request.body.rows[1].email:"), "{e}");
    }

    #[test]
    fn missing_params_are_named() {
        let t = template(
            model::Method::Post,
            "/x",
            &[],
            &[],
            Some(json!({"email": "{{ params.row.email }}"})),
        );
        let c = CompiledRequest::compile(&t, &[]).expect("compiles");
        let missing = Failure::BadParams("missing param `params.row.email`".into());
        assert_eq!(c.render(&json!({})), Err(missing.clone()));
        assert_eq!(c.render(&json!({"row": {}})), Err(missing.clone()));
        assert_eq!(c.render(&json!({"row": "text"})), Err(missing.clone()));
        assert_eq!(c.render(&json!([1, 2])), Err(missing.clone()));
        assert_eq!(c.render(&Value::Null), Err(missing));
        let path = get_path("/t/{{ params.id }}");
        assert_eq!(
            path.render(&json!({"idx": 1})),
            Err(Failure::BadParams("missing param `params.id`".into()))
        );
    }

    #[test]
    fn urls_join_below_the_base_path() {
        let j = |base: &str, pq: &str| join(&Url::parse(base).expect("valid base"), pq).to_string();
        assert_eq!(j("https://h/api", "/v1/x"), "https://h/api/v1/x");
        assert_eq!(j("https://h/api/", "/v1/x?a=1"), "https://h/api/v1/x?a=1");
        assert_eq!(j("https://h", "/v1/x"), "https://h/v1/x");
        assert_eq!(j("https://h:8443/", "/v1/x"), "https://h:8443/v1/x");
        assert_eq!(
            j("https://h/api?key=k", "/v1?a=1"),
            "https://h/api/v1?key=k&a=1"
        );
        assert_eq!(j("https://h/api?key=k", "/v1"), "https://h/api/v1?key=k");
        assert_eq!(j("https://h/a%2Fb", "/c%2Fd"), "https://h/a%2Fb/c%2Fd");
        // What the templates render is passed on as it is: encoded bytes
        // stay encoded, a space or a non-ASCII letter is encoded once.
        assert_eq!(j("https://h/api", "/v1/a b"), "https://h/api/v1/a%20b");
        assert_eq!(
            j("https://h/api", "/v1/caf%C3%A9?q=a%20b"),
            "https://h/api/v1/caf%C3%A9?q=a%20b"
        );
        assert_eq!(j("https://h/api", "/v1/x?"), "https://h/api/v1/x");
    }

    // ---- against a real server ----

    const LIMIT: usize = 1024;

    async fn echo(
        method: Method,
        uri: http::Uri,
        headers: HeaderMap,
        body: Bytes,
    ) -> axum::Json<Value> {
        let headers: BTreeMap<String, String> = headers
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("?").to_owned()))
            .collect();
        axum::Json(json!({
            "method": method.as_str(),
            "path": uri.path(),
            "query": uri.query(),
            "headers": headers,
            "body": String::from_utf8_lossy(&body),
        }))
    }

    fn app() -> Router {
        let chunks = || {
            futures_util::stream::iter(
                (0..4).map(|_| Ok::<_, std::io::Error>(Bytes::from(vec![b'c'; 512]))),
            )
        };
        Router::new()
            .route("/ok", get(|| async { ([("x-upstream", "yes")], "hello") }))
            .route(
                "/down",
                get(|| async {
                    (
                        http::StatusCode::SERVICE_UNAVAILABLE,
                        [("retry-after", "7")],
                        "busy",
                    )
                }),
            )
            .route("/exact", get(|| async { vec![b'e'; LIMIT] }))
            .route("/big", get(|| async { vec![b'b'; LIMIT * 2] }))
            .route(
                "/chunked",
                get(move || async move { Body::from_stream(chunks()) }),
            )
            .route(
                "/chunked-hangs",
                get(move || async move {
                    // Over the limit, then never ends: reading must stop at the limit.
                    Body::from_stream(chunks().chain(futures_util::stream::pending()))
                }),
            )
            .route(
                "/chunked-small",
                get(|| async {
                    Body::from_stream(futures_util::stream::iter(
                        ["ab", "cd"].map(|s| Ok::<_, std::io::Error>(Bytes::from(s))),
                    ))
                }),
            )
            .route(
                "/redirect",
                get(|| async { (http::StatusCode::FOUND, [("location", "/ok")]).into_response() }),
            )
            .fallback(echo)
    }

    async fn serve(app: Router) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("local addr");
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        addr
    }

    fn transport(base: &str) -> ReqwestTransport {
        let mut headers = HeaderMap::new();
        headers.insert("authorization", HeaderValue::from_static("Bearer s3cret"));
        headers.insert("x-layer", HeaderValue::from_static("upstream"));
        headers.insert("x-upstream-only", HeaderValue::from_static("u"));
        ReqwestTransport::new(HttpConfig {
            base_url: Url::parse(base).expect("valid base"),
            headers,
            connect_timeout: Duration::from_secs(2),
            max_response_bytes: LIMIT,
        })
        .expect("client builds")
    }

    fn rendered(path: &str) -> Rendered {
        get_path(path).render(&json!({})).expect("renders")
    }

    async fn send(t: &ReqwestTransport, r: &Rendered, extra: &HeaderMap) -> Result<Reply, Failure> {
        tokio::time::timeout(Duration::from_secs(10), t.send(r, extra))
            .await
            .expect("send did not finish in time")
    }

    #[tokio::test]
    async fn replies_of_any_status_are_ok() {
        let addr = serve(app()).await;
        let t = transport(&format!("http://{addr}"));
        let none = HeaderMap::new();
        let ok = send(&t, &rendered("/ok"), &none).await.expect("reply");
        assert_eq!(ok.status, http::StatusCode::OK);
        assert_eq!(ok.body, "hello");
        assert_eq!(ok.headers["x-upstream"], "yes");
        let down = send(&t, &rendered("/down"), &none).await.expect("reply");
        assert_eq!(down.status, http::StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(down.headers["retry-after"], "7");
        assert_eq!(down.body, "busy");
        let redirect = send(&t, &rendered("/redirect"), &none)
            .await
            .expect("reply");
        assert_eq!(
            redirect.status,
            http::StatusCode::FOUND,
            "followed a redirect"
        );
        let small = send(&t, &rendered("/chunked-small"), &none)
            .await
            .expect("reply");
        assert_eq!(small.body, "abcd");
    }

    #[tokio::test]
    async fn bodies_over_the_limit_are_refused() {
        let addr = serve(app()).await;
        let t = transport(&format!("http://{addr}"));
        let none = HeaderMap::new();
        let exact = send(&t, &rendered("/exact"), &none).await.expect("reply");
        assert_eq!(exact.body.len(), LIMIT);
        let too_large = Err(Failure::BodyTooLarge { limit: LIMIT });
        assert_eq!(send(&t, &rendered("/big"), &none).await, too_large);
        assert_eq!(send(&t, &rendered("/chunked"), &none).await, too_large);
        assert_eq!(
            send(&t, &rendered("/chunked-hangs"), &none).await,
            too_large
        );
        // The client still works after dropping those responses.
        assert!(send(&t, &rendered("/ok"), &none).await.is_ok());
        // A HEAD reply declares a length but has no body to refuse.
        let head =
            CompiledRequest::compile(&template(model::Method::Head, "/big", &[], &[], None), &[])
                .expect("compiles")
                .render(&json!({}))
                .expect("renders");
        let reply = send(&t, &head, &none).await.expect("reply");
        assert_eq!((reply.status, reply.body.len()), (http::StatusCode::OK, 0));
    }

    /// A raw server that reads one request head and answers `response`
    /// (nothing: close at once), then closes.
    async fn raw_server(response: &'static [u8], read_first: bool) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("local addr");
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                if read_first {
                    let mut seen = Vec::new();
                    let mut buf = [0u8; 1024];
                    while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
                        match socket.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => seen.extend_from_slice(&buf[..n]),
                        }
                    }
                }
                let _ = socket.write_all(response).await;
                if response.ends_with(b"HANG") {
                    // Keep the connection open without sending more.
                    tokio::spawn(async move {
                        tokio::time::sleep(Duration::from_secs(60)).await;
                        drop(socket);
                    });
                }
            }
        });
        addr
    }

    #[tokio::test]
    async fn declared_length_over_the_limit_is_refused_before_reading() {
        // Declares 1 MB, sends a little, then hangs: only the header can answer.
        let addr = raw_server(
            b"HTTP/1.1 200 OK\r\ncontent-length: 1000000\r\n\r\nHANG",
            true,
        )
        .await;
        let t = transport(&format!("http://{addr}"));
        assert_eq!(
            send(&t, &rendered("/x"), &HeaderMap::new()).await,
            Err(Failure::BodyTooLarge { limit: LIMIT })
        );
    }

    #[tokio::test]
    async fn broken_connections_are_transport_failures() {
        let closes = raw_server(b"", false).await;
        let t = transport(&format!("http://{closes}"));
        let err = send(&t, &rendered("/x"), &HeaderMap::new())
            .await
            .expect_err("no reply");
        assert!(matches!(err, Failure::Transport(_)), "{err:?}");

        let truncated =
            raw_server(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nabc", true).await;
        let t = transport(&format!("http://{truncated}"));
        let err = send(&t, &rendered("/x"), &HeaderMap::new())
            .await
            .expect_err("incomplete body");
        assert!(matches!(err, Failure::Transport(_)), "{err:?}");

        let garbage = raw_server(b"SMTP ready\r\n\r\n", true).await;
        let t = transport(&format!("http://{garbage}"));
        let err = send(&t, &rendered("/x"), &HeaderMap::new())
            .await
            .expect_err("not http");
        assert!(matches!(err, Failure::Transport(_)), "{err:?}");
        assert!(!err.to_string().contains("s3cret"));
    }

    #[tokio::test]
    async fn refused_connections_are_connect_failures() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("local addr");
        drop(listener);
        let t = transport(&format!("http://{addr}/api?key=topsecret"));
        let err = send(&t, &rendered("/x"), &HeaderMap::new())
            .await
            .expect_err("refused");
        match &err {
            Failure::Connect(m) => {
                assert!(!m.contains("s3cret") && !m.contains("topsecret"), "{m}");
            }
            other => panic!("expected Connect, got {other:?}"),
        }
        assert!(!err.reached_upstream());
    }

    #[tokio::test]
    async fn requests_arrive_below_the_base_path_with_all_headers() {
        let addr = serve(app()).await;
        let t = transport(&format!("http://{addr}/api/"));
        let tmpl = template(
            model::Method::Post,
            "/v1/tables/{{ params.table }}/rows",
            &[("dry", "{{ params.dry }}")],
            &[("X-Layer", "operation"), ("X-Op", "{{ params.table }}")],
            Some(json!({"row": "{{ params.row }}"})),
        );
        let request = CompiledRequest::compile(&tmpl, &[])
            .expect("compiles")
            .render(&json!({"table": "t/1", "dry": true, "row": {"n": 1}}))
            .expect("renders");
        let mut extra = HeaderMap::new();
        extra.insert("idempotency-key", HeaderValue::from_static("key-1"));
        let reply = send(&t, &request, &extra).await.expect("reply");
        assert_eq!(reply.status, http::StatusCode::OK);
        let seen: Value = serde_json::from_slice(&reply.body).expect("json");
        assert_eq!(seen["method"], "POST");
        assert_eq!(seen["path"], "/api/v1/tables/t%2F1/rows");
        assert_eq!(seen["query"], "dry=true");
        assert_eq!(seen["body"], r#"{"row":{"n":1}}"#);
        let h = &seen["headers"];
        assert_eq!(h["content-type"], "application/json");
        assert_eq!(h["authorization"], "Bearer s3cret");
        assert_eq!(h["x-upstream-only"], "u");
        assert_eq!(h["x-layer"], "operation", "operation headers win");
        assert_eq!(h["x-op"], "t/1");
        assert_eq!(h["idempotency-key"], "key-1");

        // Extra headers win over operation headers.
        let mut extra = HeaderMap::new();
        extra.insert("x-layer", HeaderValue::from_static("call"));
        let reply = send(&t, &request, &extra).await.expect("reply");
        let seen: Value = serde_json::from_slice(&reply.body).expect("json");
        assert_eq!(seen["headers"]["x-layer"], "call");

        // No body, no content type.
        let reply = send(&t, &rendered("/v1/plain"), &HeaderMap::new())
            .await
            .expect("reply");
        let seen: Value = serde_json::from_slice(&reply.body).expect("json");
        assert_eq!(seen["path"], "/api/v1/plain");
        assert!(seen["headers"].get("content-type").is_none());
    }

    #[test]
    fn construction_checks_the_base_url_and_hides_secrets() {
        let config = |base: &str| HttpConfig {
            base_url: Url::parse(base).expect("valid url"),
            headers: HeaderMap::new(),
            connect_timeout: Duration::from_secs(1),
            max_response_bytes: LIMIT,
        };
        assert!(ReqwestTransport::new(config("ftp://h/")).is_err());
        assert!(ReqwestTransport::new(config("mailto:a@b.c")).is_err());
        let t = transport("https://h/api");
        assert_eq!(t.config().base_url.as_str(), "https://h/api");
        assert_eq!(t.config().max_response_bytes, LIMIT);
        assert!(!format!("{t:?}").contains("s3cret"));
        assert!(!format!("{:?}", t.config()).contains("s3cret"));
    }

    #[tokio::test]
    async fn transports_can_answer_in_memory() {
        struct Canned;
        impl Transport for Canned {
            fn send<'a>(
                &'a self,
                request: &'a Rendered,
                _extra: &'a HeaderMap,
            ) -> BoxFuture<'a, Result<Reply, Failure>> {
                Box::pin(async move {
                    Ok(Reply {
                        status: http::StatusCode::OK,
                        headers: HeaderMap::new(),
                        body: Bytes::from(request.path_and_query.clone()),
                    })
                })
            }
        }
        let t: Arc<dyn Transport> = Arc::new(Canned);
        let reply = t
            .send(&rendered("/memory"), &HeaderMap::new())
            .await
            .expect("reply");
        assert_eq!(reply.body, "/memory");
    }
}
