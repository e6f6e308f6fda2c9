//! A mock Gemini upstream for integration tests and local runs.
//!
//! Self-contained (no dependency on the `budget_proxy` crate). Include it with
//! `#[path = "support/mock_gemini.rs"] mod mock_gemini;` from `tests/*.rs`, or
//! `#[path = "../tests/support/mock_gemini.rs"] mod mock_gemini;` from `examples/`.
//!
//! The server binds `127.0.0.1`, speaks HTTP/1.1 and HTTP/2 (prior knowledge) and
//! stops when its [`MockGemini`] is dropped.
//!
//! Routes (any `/v1*/` version prefix: `v1`, `v1beta`, `v1beta1`, …):
//! - `POST /{v}/…models/{m}:generateContent` → one JSON `GenerateContentResponse`;
//! - `POST /{v}/…models/{m}:streamGenerateContent?alt=sse` → SSE, `data: {json}\r\n\r\n`
//!   per chunk, each chunk its own body frame;
//! - `POST /{v}/…models/{m}:streamGenerateContent` (no `alt`) → pretty-printed JSON
//!   array streamed element by element: `[{…}\n` then `,\r\n{…}\n` … then `]`;
//! - `POST /{v}/…models/{m}:countTokens` → `{"totalTokens":N,"promptTokensDetails":[…]}`;
//! - `POST /{v}/…models/{m}:embedContent` → `{"embedding":{"values":[…]}}`;
//! - `POST /{v}/…models/{m}:batchEmbedContents` → one embedding per `requests[]` entry;
//! - `POST /upload/{v}/files` with `x-goog-upload-protocol: resumable` → 200, empty body,
//!   header `x-goog-upload-url: {url}/upload/{v}/files?upload_id=abc&upload_protocol=resumable`;
//!   `POST /upload/{v}/files?upload_id=…` (the bytes) → `{"file":{…}}`;
//! - `GET /{v}/models` → a model list, `GET /{v}/models/{m}` → one model;
//! - anything else → 404 `{"error":{"code":404,…,"status":"NOT_FOUND"}}`.
//!
//! Every request (any route) is recorded and consumes one behaviour: the oldest
//! [`MockGemini::push_behavior`] one if any, else the default ([`MockGemini::set_behavior`]).
//! A non-200 [`Behavior::status`] answers every known route with a Gemini error body.
#![allow(dead_code)]

use std::collections::VecDeque;
use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, Version};
use http_body::{Body, Frame};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use serde::Serialize;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch, Notify};
use tokio::task::JoinHandle;

/// How long a stream waits, after its last chunk was handed to hyper, before it is
/// cut: lets that chunk reach the socket so "last sent usage" is what a client saw.
const CUT_GRACE: Duration = Duration::from_millis(30);

// ---------------------------------------------------------------------------
// Public types
// ---------------------------------------------------------------------------

/// One request as the mock received it (body fully read).
#[derive(Debug, Clone)]
pub struct Received {
    pub method: Method,
    /// Path without the query, e.g. `/v1beta/models/gemini-2.5-flash:generateContent`.
    pub path: String,
    /// Raw query string without `?`, e.g. `Some("alt=sse")`.
    pub query: Option<String>,
    pub headers: HeaderMap,
    pub body: Bytes,
    /// HTTP version the request came in with (HTTP/1.1 or HTTP/2).
    pub version: Version,
}

impl Received {
    /// A header as `&str` (None when absent or not visible ASCII).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// The body parsed as JSON (None when it is not JSON).
    pub fn body_json(&self) -> Option<serde_json::Value> {
        serde_json::from_slice(&self.body).ok()
    }
}

/// A usage record, as in `usageMetadata` (`total = prompt + candidates + thoughts`;
/// `prompt` includes `cached`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Usage {
    pub prompt: u64,
    pub candidates: u64,
    pub thoughts: u64,
    pub cached: u64,
    pub total: u64,
}

/// What the mock does for a request. Build with `Behavior::default()` and the
/// builder methods, or set the pub fields directly.
#[derive(Debug, Clone)]
pub struct Behavior {
    /// `promptTokenCount` (default 10). Ignored when `prompt_from_request`.
    pub prompt_tokens: u64,
    /// Final `candidatesTokenCount` (default 20; omitted from the JSON when 0).
    pub candidates_tokens: u64,
    /// `thoughtsTokenCount` (default 0; only present when > 0). Counted in the total.
    pub thoughts_tokens: u64,
    /// `cachedContentTokenCount` (default 0; only present when > 0). Part of the prompt.
    pub cached_tokens: u64,
    /// When true, prompt tokens = ceil(chars of every `"text"` string in the request
    /// body / 4), at least 1. Also drives `countTokens`.
    pub prompt_from_request: bool,
    /// true (default): cumulative `usageMetadata` on every stream chunk (Gemini 2.5+);
    /// false: only the last chunk carries `usageMetadata` (Gemini 1.5).
    pub usage_every_chunk: bool,
    /// Number of stream chunks (default 3; 0 is treated as 1). Also the number of text
    /// parts joined into the non-stream answer.
    pub chunks: usize,
    /// Delay between stream chunks (default 0).
    pub chunk_delay: Duration,
    /// Delay after the request was received (and recorded) before the response head.
    pub delay_before_headers: Duration,
    /// After the request was recorded (and the delay), wait until this turns true: the
    /// test holds answers until as many requests as it wants are in flight.
    pub hold: Option<tokio::sync::watch::Receiver<bool>>,
    /// HTTP status (default 200). Non-200 → Gemini error body on every known route.
    pub status: u16,
    /// Message of the error body (default: a Gemini-like message for the status).
    pub error_message: Option<String>,
    /// Streams: after `k` chunks abort the connection (body error, no clean end; k may
    /// be 0). Non-stream `generateContent`: send the first half of the JSON (before
    /// `usageMetadata`) with the full `content-length`, then abort.
    pub cut_after_chunks: Option<usize>,
    /// Streams: after the chunks (the last one then has no `finishReason`), end the body
    /// with a raw pretty-printed `{"error":{"code":503,…,"status":"UNAVAILABLE"}}`
    /// (JSON-array streams: as a last array element) and close cleanly.
    pub mid_stream_error: bool,
    /// `modelVersion` in responses (default: the model id from the path).
    pub model_version: Option<String>,
    /// Headers added to every successful response.
    pub response_headers: Vec<(&'static str, &'static str)>,
}

impl Default for Behavior {
    fn default() -> Self {
        Behavior {
            prompt_tokens: 10,
            candidates_tokens: 20,
            thoughts_tokens: 0,
            cached_tokens: 0,
            prompt_from_request: false,
            usage_every_chunk: true,
            chunks: 3,
            chunk_delay: Duration::ZERO,
            delay_before_headers: Duration::ZERO,
            hold: None,
            status: 200,
            error_message: None,
            cut_after_chunks: None,
            mid_stream_error: false,
            model_version: None,
            response_headers: Vec::new(),
        }
    }
}

impl Behavior {
    /// Same as `Behavior::default()`.
    pub fn new() -> Self {
        Self::default()
    }
    /// An error behaviour: `status` with the Gemini error body.
    pub fn error(status: u16) -> Self {
        Self::default().status(status)
    }
    /// Prompt, candidates and thoughts tokens of every response.
    pub fn usage(mut self, prompt: u64, candidates: u64, thoughts: u64) -> Self {
        self.prompt_tokens = prompt;
        self.candidates_tokens = candidates;
        self.thoughts_tokens = thoughts;
        self
    }
    pub fn cached(mut self, cached: u64) -> Self {
        self.cached_tokens = cached;
        self
    }
    pub fn prompt_from_request(mut self, yes: bool) -> Self {
        self.prompt_from_request = yes;
        self
    }
    pub fn usage_every_chunk(mut self, yes: bool) -> Self {
        self.usage_every_chunk = yes;
        self
    }
    pub fn chunks(mut self, n: usize) -> Self {
        self.chunks = n;
        self
    }
    pub fn chunk_delay(mut self, d: Duration) -> Self {
        self.chunk_delay = d;
        self
    }
    pub fn delay_before_headers(mut self, d: Duration) -> Self {
        self.delay_before_headers = d;
        self
    }

    pub fn hold(mut self, until: tokio::sync::watch::Receiver<bool>) -> Self {
        self.hold = Some(until);
        self
    }
    pub fn status(mut self, status: u16) -> Self {
        self.status = status;
        self
    }
    pub fn error_message(mut self, msg: impl Into<String>) -> Self {
        self.error_message = Some(msg.into());
        self
    }
    pub fn cut_after_chunks(mut self, k: usize) -> Self {
        self.cut_after_chunks = Some(k);
        self
    }
    pub fn mid_stream_error(mut self, yes: bool) -> Self {
        self.mid_stream_error = yes;
        self
    }
    pub fn response_header(mut self, name: &'static str, value: &'static str) -> Self {
        self.response_headers.push((name, value));
        self
    }

    pub fn model_version(mut self, v: impl Into<String>) -> Self {
        self.model_version = Some(v.into());
        self
    }
    /// The final `totalTokenCount` of a response with fixed prompt tokens
    /// (`prompt + candidates + thoughts`).
    pub fn total_tokens(&self) -> u64 {
        self.prompt_tokens + self.candidates_tokens + self.thoughts_tokens
    }
    fn n_chunks(&self) -> usize {
        self.chunks.max(1)
    }
}

/// A running mock server. Dropping it stops the server and its connections.
pub struct MockGemini {
    /// Bound address (127.0.0.1:port).
    pub addr: SocketAddr,
    /// `http://127.0.0.1:port` (no trailing slash).
    pub url: String,
    state: Arc<State>,
    task: JoinHandle<()>,
    _shutdown: watch::Sender<bool>,
}

/// Bumped by [`MockGemini::close_idle_connections`]: every plain connection then shuts
/// down gracefully (at once when idle), as an upstream closing kept-alive connections does.
type CloseIdle = watch::Sender<u64>;

impl Drop for MockGemini {
    fn drop(&mut self) {
        self.task.abort();
        // `_shutdown` is dropped right after: every connection task sees it and ends.
    }
}

impl MockGemini {
    /// Starts on `127.0.0.1:0` with the default behaviour. Panics if it cannot bind.
    pub async fn start() -> MockGemini {
        Self::start_with(Behavior::default()).await
    }

    /// Starts on `127.0.0.1:0` with `b` as the default behaviour. Panics if it cannot bind.
    pub async fn start_with(b: Behavior) -> MockGemini {
        let mock = Self::bind(SocketAddr::from(([127, 0, 0, 1], 0)))
            .await
            .expect("mock Gemini: bind 127.0.0.1:0");
        mock.set_behavior(b);
        mock
    }

    /// Starts on `addr` (e.g. a fixed port) with the default behaviour.
    pub async fn bind(addr: SocketAddr) -> io::Result<MockGemini> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let url = format!("http://{addr}");
        let state = Arc::new(State {
            url: url.clone(),
            inner: Mutex::new(Inner::default()),
            notify: Notify::new(),
            close_idle: watch::channel(0).0,
        });
        let (tx, rx) = watch::channel(false);
        let task = tokio::spawn(accept_loop(listener, state.clone(), rx));
        Ok(MockGemini {
            addr,
            url,
            state,
            task,
            _shutdown: tx,
        })
    }

    /// `{url}{path}`; `path` should start with `/`.
    pub fn url_for(&self, path: &str) -> String {
        format!("{}{}", self.url, path)
    }

    /// Every request seen so far, in arrival order.
    pub fn received(&self) -> Vec<Received> {
        self.state.lock().received.clone()
    }

    /// Number of requests seen so far.
    pub fn request_count(&self) -> usize {
        let inner = self.state.lock();
        inner.received.len() + inner.forgotten
    }

    /// Keep no record of the requests from now on (only their count): for a long-running
    /// mock (`examples/mock-gemini`, the benchmarks), whose records would grow without bound
    /// (a few hundred thousand requests made it 40 % slower).
    pub fn forget_requests(&self) {
        self.state.lock().forget = true;
    }

    /// What "Google billed": for every response that carried usage, the
    /// `totalTokenCount` of the last `usageMetadata` handed to the connection (the
    /// final one for complete responses; for cut or client-abandoned streams the last
    /// chunk actually sent; 0 when none was sent, e.g. non-stream cuts or 1.5-style
    /// streams cut before their last chunk). Each response counts once.
    pub fn reported_total_tokens(&self) -> u64 {
        self.state
            .lock()
            .sent
            .iter()
            .flatten()
            .map(|u| u.total)
            .sum()
    }

    /// Per request (same indices as [`MockGemini::received`]): the `totalTokenCount` of
    /// the last `usageMetadata` sent, 0 when none.
    pub fn last_sent_usage_totals(&self) -> Vec<u64> {
        let inner = self.state.lock();
        inner
            .sent
            .iter()
            .map(|u| u.map_or(0, |u| u.total))
            .collect()
    }

    /// Per request (same indices as [`MockGemini::received`]): the last usage sent.
    pub fn last_sent_usages(&self) -> Vec<Option<Usage>> {
        self.state.lock().sent.clone()
    }

    /// Default behaviour for subsequent requests.
    pub fn set_behavior(&self, b: Behavior) {
        self.state.lock().default = b;
    }

    /// A one-shot behaviour; queued ones are consumed FIFO, one per request, before
    /// the default.
    pub fn push_behavior(&self, b: Behavior) {
        self.state.lock().queue.push_back(b);
    }

    /// Resolves once at least `n` requests were received (no polling; wrap it in
    /// `tokio::time::timeout` in tests).
    pub async fn wait_for_requests(&self, n: usize) {
        self.wait_until(|inner| inner.received.len() >= n).await;
    }

    /// Plain (not TLS) connections accepted so far.
    pub fn connections(&self) -> usize {
        self.state.lock().connections
    }

    /// Plain connections open now.
    pub fn open_connections(&self) -> usize {
        self.state.lock().open_connections
    }

    /// Resolves once exactly `n` plain connections are open (wrap it in a timeout).
    pub async fn wait_for_open_connections(&self, n: usize) {
        self.wait_until(|inner| inner.open_connections == n).await;
    }

    /// Close every idle plain connection (a connection serving a request closes after
    /// it), as an upstream does with kept-alive connections it no longer wants.
    pub fn close_idle_connections(&self) {
        self.state.close_idle.send_modify(|n| *n += 1);
    }

    async fn wait_until(&self, done: impl Fn(&Inner) -> bool) {
        loop {
            let notified = self.state.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if done(&self.state.lock()) {
                return;
            }
            notified.await;
        }
    }
}

// ---------------------------------------------------------------------------
// Shared state
// ---------------------------------------------------------------------------

struct State {
    url: String,
    inner: Mutex<Inner>,
    notify: Notify,
    close_idle: CloseIdle,
}

#[derive(Default)]
struct Inner {
    /// Requests are counted but not kept (see [`MockGemini::forget_requests`]).
    forget: bool,
    /// Requests counted but not kept.
    forgotten: usize,
    received: Vec<Received>,
    /// Last usage sent, per request index.
    sent: Vec<Option<Usage>>,
    default: Behavior,
    queue: VecDeque<Behavior>,
    /// TLS connections accepted (handshake done), for [`MockGemini::start_tls`] mocks.
    tls_connections: usize,
    /// Plain connections accepted, and those of them still open.
    connections: usize,
    open_connections: usize,
}

impl State {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Records a request, returns its index and the behaviour that applies.
    fn record(&self, r: Received) -> (usize, Behavior) {
        let out = {
            let mut inner = self.lock();
            let index = inner.received.len() + inner.forgotten;
            if inner.forget {
                inner.forgotten += 1;
            } else {
                inner.received.push(r);
                inner.sent.push(None);
            }
            let b = match inner.queue.pop_front() {
                Some(b) => b,
                None => inner.default.clone(),
            };
            (index, b)
        };
        self.notify.notify_waiters();
        out
    }

    fn record_sent(&self, index: usize, usage: Usage) {
        if let Some(slot) = self.lock().sent.get_mut(index) {
            *slot = Some(usage);
        }
    }
}

// ---------------------------------------------------------------------------
// Server
// ---------------------------------------------------------------------------

type MockBody = BoxBody<Bytes, io::Error>;

async fn accept_loop(
    listener: TcpListener,
    state: Arc<State>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let stream = tokio::select! {
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(_) => {
                    // e.g. too many open files: back off a little and retry.
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
            _ = shutdown.changed() => return,
        };
        let _ = stream.set_nodelay(true);
        let state = state.clone();
        let mut conn_shutdown = shutdown.clone();
        tokio::spawn(async move {
            {
                let mut inner = state.lock();
                inner.connections += 1;
                inner.open_connections += 1;
            }
            state.notify.notify_waiters();
            let mut close_idle = state.close_idle.subscribe();
            let svc_state = state.clone();
            let svc = service_fn(move |req: Request<Incoming>| {
                let state = svc_state.clone();
                async move { Ok::<_, Infallible>(handle(state, req).await) }
            });
            let builder = auto::Builder::new(TokioExecutor::new());
            let conn = builder.serve_connection(TokioIo::new(stream), svc);
            tokio::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => {}
                _ = conn_shutdown.changed() => {}
                _ = close_idle.changed() => {
                    conn.as_mut().graceful_shutdown();
                    let _ = conn.await;
                }
            }
            state.lock().open_connections -= 1;
            state.notify.notify_waiters();
        });
    }
}

enum Route {
    Generate(String),
    StreamSse(String),
    StreamArray(String),
    CountTokens,
    Embed,
    BatchEmbed,
    UploadStart(String),
    UploadBytes,
    ListModels,
    GetModel(String),
    NotFound,
}

fn is_version(seg: &str) -> bool {
    seg.starts_with("v1")
}

fn query_has(query: Option<&str>, key: &str, value: Option<&str>) -> bool {
    query.is_some_and(|q| {
        q.split('&').any(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            k == key && value.is_none_or(|want| v == want)
        })
    })
}

fn route(method: &Method, path: &str, query: Option<&str>, headers: &HeaderMap) -> Route {
    let trimmed = path.trim_start_matches('/');
    let Some((first, rest)) = trimmed.split_once('/') else {
        return Route::NotFound;
    };
    if first == "upload" {
        let Some((version, tail)) = rest.split_once('/') else {
            return Route::NotFound;
        };
        if !is_version(version) || tail != "files" || method != Method::POST {
            return Route::NotFound;
        }
        if query_has(query, "upload_id", None) {
            return Route::UploadBytes;
        }
        let resumable = headers
            .get("x-goog-upload-protocol")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.eq_ignore_ascii_case("resumable"));
        return if resumable {
            Route::UploadStart(version.to_string())
        } else {
            Route::NotFound
        };
    }
    if !is_version(first) {
        return Route::NotFound;
    }
    if method == Method::GET {
        if rest == "models" {
            return Route::ListModels;
        }
        if let Some(m) = rest.strip_prefix("models/") {
            if !m.is_empty() && !m.contains(['/', ':']) {
                return Route::GetModel(m.to_string());
            }
        }
        return Route::NotFound;
    }
    if method != Method::POST {
        return Route::NotFound;
    }
    let Some((resource, action)) = rest.rsplit_once(':') else {
        return Route::NotFound;
    };
    // `models/{m}`, `tunedModels/{m}`, `…/publishers/google/models/{m}`.
    let Some((collection, model)) = resource.rsplit_once('/') else {
        return Route::NotFound;
    };
    if !(collection == "models" || collection.ends_with("/models") || collection == "tunedModels")
        || model.is_empty()
    {
        return Route::NotFound;
    }
    let model = model.to_string();
    match action {
        "generateContent" => Route::Generate(model),
        "streamGenerateContent" if query_has(query, "alt", Some("sse")) => Route::StreamSse(model),
        "streamGenerateContent" => Route::StreamArray(model),
        "countTokens" => Route::CountTokens,
        "embedContent" => Route::Embed,
        "batchEmbedContents" => Route::BatchEmbed,
        _ => Route::NotFound,
    }
}

async fn handle(state: Arc<State>, req: Request<Incoming>) -> Response<MockBody> {
    let (parts, body) = req.into_parts();
    let body = match body.collect().await {
        Ok(c) => c.to_bytes(),
        Err(_) => return error_response(400, Some("mock: could not read the request body")),
    };
    let path = parts.uri.path().to_string();
    let query = parts.uri.query().map(str::to_string);
    let route = route(&parts.method, &path, query.as_deref(), &parts.headers);
    let (index, b) = state.record(Received {
        method: parts.method,
        path,
        query,
        headers: parts.headers,
        body: body.clone(),
        version: parts.version,
    });
    if !b.delay_before_headers.is_zero() {
        tokio::time::sleep(b.delay_before_headers).await;
    }
    if let Some(mut hold) = b.hold.clone() {
        // A dropped sender lets everything go.
        let _ = hold.wait_for(|go| *go).await;
    }
    if matches!(route, Route::NotFound) {
        return error_response(404, Some("Requested entity was not found."));
    }
    if b.status != 200 {
        return error_response(b.status, b.error_message.as_deref());
    }
    let usage = usage_for(&b, &body);
    let mut resp = match route {
        Route::Generate(model) => generate(&state, index, &b, &model, usage),
        Route::StreamSse(model) => stream(&state, index, &b, &model, usage, StreamKind::Sse),
        Route::StreamArray(model) => stream(&state, index, &b, &model, usage, StreamKind::Array),
        Route::CountTokens => json_response(
            200,
            &serde_json::json!({
                "totalTokens": usage.prompt,
                "promptTokensDetails": [{"modality": "TEXT", "tokenCount": usage.prompt}],
            }),
        ),
        Route::Embed => json_response(
            200,
            &serde_json::json!({"embedding": {"values": [0.1, 0.2, 0.3]}}),
        ),
        Route::BatchEmbed => {
            let n = serde_json::from_slice::<serde_json::Value>(&body)
                .ok()
                .and_then(|v| v.get("requests").and_then(|r| r.as_array()).map(Vec::len))
                .unwrap_or(0);
            let one = serde_json::json!({"values": [0.1, 0.2, 0.3]});
            json_response(200, &serde_json::json!({"embeddings": vec![one; n]}))
        }
        Route::UploadStart(version) => {
            let upload_url = format!(
                "{}/upload/{version}/files?upload_id=abc&upload_protocol=resumable",
                state.url
            );
            let mut resp = Response::new(full(Bytes::new()));
            if let Ok(v) = HeaderValue::from_str(&upload_url) {
                resp.headers_mut().insert("x-goog-upload-url", v);
            }
            resp.headers_mut()
                .insert("x-goog-upload-status", HeaderValue::from_static("active"));
            resp
        }
        Route::UploadBytes => {
            let mut resp = json_response(
                200,
                &serde_json::json!({"file": {
                    "name": "files/abc",
                    "mimeType": "application/octet-stream",
                    "sizeBytes": body.len().to_string(),
                    "uri": format!("{}/v1beta/files/abc", state.url),
                    "state": "ACTIVE",
                }}),
            );
            resp.headers_mut()
                .insert("x-goog-upload-status", HeaderValue::from_static("final"));
            resp
        }
        Route::ListModels => json_response(
            200,
            &serde_json::json!({"models": [model_json("gemini-2.5-flash"), model_json("gemini-2.5-pro")]}),
        ),
        Route::GetModel(m) => json_response(200, &model_json(&m)),
        Route::NotFound => error_response(404, None),
    };
    for (name, value) in &b.response_headers {
        resp.headers_mut()
            .append(*name, HeaderValue::from_static(value));
    }
    resp
}

fn model_json(id: &str) -> serde_json::Value {
    serde_json::json!({
        "name": format!("models/{id}"),
        "version": "001",
        "displayName": id,
        "inputTokenLimit": 1_048_576,
        "outputTokenLimit": 65_536,
        "supportedGenerationMethods": ["generateContent", "countTokens", "createCachedContent", "batchGenerateContent"],
    })
}

fn usage_for(b: &Behavior, request_body: &[u8]) -> Usage {
    let prompt = if b.prompt_from_request {
        let chars = serde_json::from_slice::<serde_json::Value>(request_body)
            .map(|v| text_chars(&v))
            .unwrap_or(request_body.len());
        (chars as u64).div_ceil(4).max(1)
    } else {
        b.prompt_tokens
    };
    Usage {
        prompt,
        candidates: b.candidates_tokens,
        thoughts: b.thoughts_tokens,
        cached: b.cached_tokens,
        total: prompt + b.candidates_tokens + b.thoughts_tokens,
    }
}

/// Total chars of every string under a `"text"` key.
fn text_chars(v: &serde_json::Value) -> usize {
    match v {
        serde_json::Value::Object(map) => map
            .iter()
            .map(|(k, v)| match v {
                serde_json::Value::String(s) if k == "text" => s.chars().count(),
                _ => text_chars(v),
            })
            .sum(),
        serde_json::Value::Array(a) => a.iter().map(text_chars).sum(),
        _ => 0,
    }
}

/// Cumulative usage after chunk `i` (0-based) of `n`: candidates are
/// `round(candidates * (i+1) / n)`; the last chunk has the configured totals.
fn chunk_usage(u: Usage, i: usize, n: usize) -> Usage {
    let (i, n) = (i as u64 + 1, n as u64);
    let candidates = (u.candidates * i * 2 + n) / (2 * n);
    Usage {
        candidates,
        total: u.prompt + candidates + u.thoughts,
        ..u
    }
}

fn chunk_text(i: usize, n: usize) -> String {
    format!(
        "Chunk {} of {n}: h\u{e9}llo \u{1f30d} \"quoted\" \\ done.\n",
        i + 1
    )
}

// ---------------------------------------------------------------------------
// Wire JSON (field order as Gemini sends it)
// ---------------------------------------------------------------------------

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct WireResponse<'a> {
    candidates: Vec<WireCandidate<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    usage_metadata: Option<WireUsage>,
    model_version: &'a str,
    response_id: &'a str,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct WireCandidate<'a> {
    content: WireContent<'a>,
    #[serde(skip_serializing_if = "Option::is_none")]
    finish_reason: Option<&'static str>,
    index: u32,
}

#[derive(Serialize)]
struct WireContent<'a> {
    parts: Vec<WirePart<'a>>,
    role: &'static str,
}

#[derive(Serialize)]
struct WirePart<'a> {
    text: &'a str,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct WireUsage {
    prompt_token_count: u64,
    #[serde(skip_serializing_if = "is_zero")]
    candidates_token_count: u64,
    total_token_count: u64,
    #[serde(skip_serializing_if = "is_zero")]
    cached_content_token_count: u64,
    prompt_tokens_details: Vec<WireModality>,
    #[serde(skip_serializing_if = "is_zero")]
    thoughts_token_count: u64,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct WireModality {
    modality: &'static str,
    token_count: u64,
}

impl From<Usage> for WireUsage {
    fn from(u: Usage) -> Self {
        WireUsage {
            prompt_token_count: u.prompt,
            candidates_token_count: u.candidates,
            total_token_count: u.total,
            cached_content_token_count: u.cached,
            prompt_tokens_details: vec![WireModality {
                modality: "TEXT",
                token_count: u.prompt,
            }],
            thoughts_token_count: u.thoughts,
        }
    }
}

#[derive(Serialize)]
struct WireError<'a> {
    error: WireErrorBody<'a>,
}

#[derive(Serialize)]
struct WireErrorBody<'a> {
    code: u16,
    message: &'a str,
    status: &'a str,
}

fn status_name(code: u16) -> &'static str {
    match code {
        400 => "INVALID_ARGUMENT",
        401 => "UNAUTHENTICATED",
        403 => "PERMISSION_DENIED",
        404 => "NOT_FOUND",
        409 => "ABORTED",
        429 => "RESOURCE_EXHAUSTED",
        499 => "CANCELLED",
        500 => "INTERNAL",
        501 => "NOT_IMPLEMENTED",
        503 => "UNAVAILABLE",
        504 => "DEADLINE_EXCEEDED",
        _ => "UNKNOWN",
    }
}

fn default_message(code: u16) -> &'static str {
    match code {
        400 => "API key not valid. Please pass a valid API key.",
        401 => "Request had invalid authentication credentials.",
        403 => "Method doesn't allow unregistered callers (callers without established identity). Please use API Key or other form of API consumer identity to call this API.",
        404 => "Requested entity was not found.",
        429 => "You exceeded your current quota, please check your plan and billing details. Please retry in 47.88s.",
        500 => "An internal error has occurred. Please retry or report in https://developers.generativeai.google/guide/troubleshooting",
        503 => "The model is overloaded. Please try again later.",
        504 => "Deadline expired before operation could complete.",
        _ => "mock Gemini error",
    }
}

/// Pretty-printed Gemini error body, as Google sends it (ends with `\n`).
fn error_json(code: u16, message: Option<&str>) -> String {
    let e = WireError {
        error: WireErrorBody {
            code,
            message: message.unwrap_or_else(|| default_message(code)),
            status: status_name(code),
        },
    };
    let mut s = serde_json::to_string_pretty(&e).unwrap_or_default();
    s.push('\n');
    s
}

// ---------------------------------------------------------------------------
// Responses
// ---------------------------------------------------------------------------

fn full(b: impl Into<Bytes>) -> MockBody {
    Full::new(b.into()).map_err(|never| match never {}).boxed()
}

fn with_status(mut resp: Response<MockBody>, code: u16) -> Response<MockBody> {
    *resp.status_mut() = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    resp
}

fn json_content_type() -> HeaderValue {
    HeaderValue::from_static("application/json; charset=UTF-8")
}

fn json_response(code: u16, v: &serde_json::Value) -> Response<MockBody> {
    let mut s = serde_json::to_string_pretty(v).unwrap_or_default();
    s.push('\n');
    let mut resp = with_status(Response::new(full(s)), code);
    resp.headers_mut()
        .insert(http::header::CONTENT_TYPE, json_content_type());
    resp
}

fn error_response(code: u16, message: Option<&str>) -> Response<MockBody> {
    let mut resp = with_status(Response::new(full(error_json(code, message))), code);
    resp.headers_mut()
        .insert(http::header::CONTENT_TYPE, json_content_type());
    resp
}

fn response_json(
    texts: &[String],
    finish: bool,
    usage: Option<Usage>,
    model_version: &str,
    response_id: &str,
    pretty: bool,
) -> String {
    let r = WireResponse {
        candidates: vec![WireCandidate {
            content: WireContent {
                parts: texts.iter().map(|t| WirePart { text: t }).collect(),
                role: "model",
            },
            finish_reason: finish.then_some("STOP"),
            index: 0,
        }],
        usage_metadata: usage.map(WireUsage::from),
        model_version,
        response_id,
    };
    if pretty {
        serde_json::to_string_pretty(&r).unwrap_or_default()
    } else {
        serde_json::to_string(&r).unwrap_or_default()
    }
}

fn generate(
    state: &Arc<State>,
    index: usize,
    b: &Behavior,
    model: &str,
    usage: Usage,
) -> Response<MockBody> {
    let n = b.n_chunks();
    let text: String = (0..n).map(|i| chunk_text(i, n)).collect();
    let version = b.model_version.as_deref().unwrap_or(model);
    let id = format!("mock-{index}");
    let mut body = response_json(&[text], true, Some(usage), version, &id, true);
    body.push('\n');
    let mut headers = HeaderMap::new();
    headers.insert(http::header::CONTENT_TYPE, json_content_type());

    if b.cut_after_chunks.is_some() {
        // Send the first half of what precedes usageMetadata, promise the full length,
        // then abort: the client sees a truncated body and no usage.
        let usage_at = body.find("\"usageMetadata\"").unwrap_or(body.len());
        let prefix = Bytes::copy_from_slice(&body.as_bytes()[..usage_at / 2]);
        headers.insert(http::header::CONTENT_LENGTH, HeaderValue::from(body.len()));
        let (tx, rx) = mpsc::channel(1);
        tokio::spawn(async move {
            if tx.send(Piece::Data(prefix, None)).await.is_ok() {
                send_cut(&tx).await;
            }
        });
        let mut resp = Response::new(channel_body(state, index, rx));
        *resp.headers_mut() = headers;
        return resp;
    }

    state.record_sent(index, usage);
    let mut resp = Response::new(full(body));
    *resp.headers_mut() = headers;
    resp
}

#[derive(Clone, Copy, PartialEq)]
enum StreamKind {
    Sse,
    Array,
}

fn stream(
    state: &Arc<State>,
    index: usize,
    b: &Behavior,
    model: &str,
    usage: Usage,
    kind: StreamKind,
) -> Response<MockBody> {
    let n = b.n_chunks();
    let version = b.model_version.as_deref().unwrap_or(model);
    let id = format!("mock-{index}");
    let frames: Vec<(Bytes, Option<Usage>)> = (0..n)
        .map(|i| {
            let last = i + 1 == n;
            let u = (b.usage_every_chunk || last).then(|| chunk_usage(usage, i, n));
            let finish = last && !b.mid_stream_error;
            let texts = [chunk_text(i, n)];
            let frame = match kind {
                StreamKind::Sse => {
                    format!(
                        "data: {}\r\n\r\n",
                        response_json(&texts, finish, u, version, &id, false)
                    )
                }
                StreamKind::Array => format!(
                    "{}{}\n",
                    if i == 0 { "[" } else { ",\r\n" },
                    response_json(&texts, finish, u, version, &id, true)
                ),
            };
            (Bytes::from(frame), u)
        })
        .collect();

    enum Tail {
        Clean(Option<Bytes>),
        Error(Bytes),
        Cut,
    }
    let (frames, tail) = match b.cut_after_chunks {
        Some(k) => (frames.into_iter().take(k).collect::<Vec<_>>(), Tail::Cut),
        None if b.mid_stream_error => {
            let err = error_json(
                503,
                Some("The model is overloaded. Please try again later."),
            );
            let err = match kind {
                StreamKind::Sse => err,
                StreamKind::Array => format!(",\r\n{}]", err.trim_end()),
            };
            (frames, Tail::Error(Bytes::from(err)))
        }
        None => {
            let close = (kind == StreamKind::Array).then(|| Bytes::from_static(b"]"));
            (frames, Tail::Clean(close))
        }
    };

    let delay = b.chunk_delay;
    let (tx, rx) = mpsc::channel::<Piece>(1);
    tokio::spawn(async move {
        for (i, (bytes, u)) in frames.into_iter().enumerate() {
            if i > 0 && !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            if tx.send(Piece::Data(bytes, u)).await.is_err() {
                return; // client went away
            }
        }
        match tail {
            Tail::Clean(Some(close)) => {
                let _ = tx.send(Piece::Data(close, None)).await;
            }
            Tail::Clean(None) => {}
            Tail::Error(err) => {
                if !delay.is_zero() {
                    tokio::time::sleep(delay).await;
                }
                let _ = tx.send(Piece::Data(err, None)).await;
            }
            Tail::Cut => send_cut(&tx).await,
        }
    });

    let content_type = match kind {
        StreamKind::Sse => HeaderValue::from_static("text/event-stream"),
        StreamKind::Array => json_content_type(),
    };
    let mut resp = Response::new(channel_body(state, index, rx));
    resp.headers_mut()
        .insert(http::header::CONTENT_TYPE, content_type);
    resp
}

/// Waits until the previous piece was taken by hyper, gives it time to reach the
/// socket, then aborts the body.
async fn send_cut(tx: &mpsc::Sender<Piece>) {
    if let Ok(permit) = tx.reserve().await {
        tokio::time::sleep(CUT_GRACE).await;
        permit.send(Piece::Cut);
    }
}

// ---------------------------------------------------------------------------
// Channel-backed body: each piece is its own frame; records usage as it is sent.
// ---------------------------------------------------------------------------

enum Piece {
    /// Bytes to send, and the cumulative usage they carry (if any).
    Data(Bytes, Option<Usage>),
    /// Abort: the body errors, hyper drops the connection (h1) or resets the stream (h2).
    Cut,
}

struct ChannelBody {
    rx: mpsc::Receiver<Piece>,
    state: Arc<State>,
    index: usize,
}

fn channel_body(state: &Arc<State>, index: usize, rx: mpsc::Receiver<Piece>) -> MockBody {
    ChannelBody {
        rx,
        state: state.clone(),
        index,
    }
    .boxed()
}

impl Body for ChannelBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        let this = self.get_mut();
        match this.rx.poll_recv(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Ready(Some(Piece::Data(bytes, usage))) => {
                if let Some(u) = usage {
                    this.state.record_sent(this.index, u);
                }
                Poll::Ready(Some(Ok(Frame::data(bytes))))
            }
            Poll::Ready(Some(Piece::Cut)) => Poll::Ready(Some(Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "mock Gemini: connection cut",
            )))),
        }
    }
}

// ---------------------------------------------------------------------------
// TLS
// ---------------------------------------------------------------------------

impl MockGemini {
    /// Starts on `127.0.0.1:0` serving the same routes over TLS with the PEM certificate
    /// chain `cert_pem` (leaf first; it should name `127.0.0.1`) and PEM key `key_pem`.
    /// ALPN offers `h2` and `http/1.1`; [`Received::version`] tells which one a request
    /// used. `url` is `https://127.0.0.1:port`. Panics on a bad certificate or key.
    pub async fn start_tls(cert_pem: &str, key_pem: &str) -> MockGemini {
        Self::bind_tls(SocketAddr::from(([127, 0, 0, 1], 0)), cert_pem, key_pem)
            .await
            .expect("mock Gemini: TLS on 127.0.0.1:0")
    }

    /// [`MockGemini::start_tls`] on `addr` (the `mock-gemini` example's `--tls-cert`). A
    /// certificate or key that does not parse is an `InvalidInput` error naming which.
    pub async fn bind_tls(
        addr: SocketAddr,
        cert_pem: &str,
        key_pem: &str,
    ) -> io::Result<MockGemini> {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        fn invalid(what: &str, e: impl std::fmt::Display) -> io::Error {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("mock Gemini: {what}: {e}"),
            )
        }
        let chain = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| invalid("certificate PEM", e))?;
        let key =
            PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(|e| invalid("key PEM", e))?;
        let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| invalid("TLS versions", e))?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| invalid("certificate and key", e))?;
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));

        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let url = format!("https://{addr}");
        let state = Arc::new(State {
            url: url.clone(),
            inner: Mutex::new(Inner::default()),
            notify: Notify::new(),
            close_idle: watch::channel(0).0,
        });
        let (tx, rx) = watch::channel(false);
        let task = tokio::spawn(tls_accept_loop(listener, acceptor, state.clone(), rx));
        Ok(MockGemini {
            addr,
            url,
            state,
            task,
            _shutdown: tx,
        })
    }

    /// TLS connections accepted so far (0 for a plain mock): with HTTP/2 one connection
    /// carries many requests.
    pub fn tls_connections(&self) -> usize {
        self.state.lock().tls_connections
    }
}

async fn tls_accept_loop(
    listener: TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
    state: Arc<State>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let stream = tokio::select! {
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
            _ = shutdown.changed() => return,
        };
        let _ = stream.set_nodelay(true);
        let state = state.clone();
        let acceptor = acceptor.clone();
        let mut conn_shutdown = shutdown.clone();
        tokio::spawn(async move {
            // A client that rejects the certificate ends the handshake: nothing to serve.
            let Ok(stream) = acceptor.accept(stream).await else {
                return;
            };
            state.lock().tls_connections += 1;
            let svc = service_fn(move |req: Request<Incoming>| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(handle(state, req).await) }
            });
            let builder = auto::Builder::new(TokioExecutor::new());
            let conn = builder.serve_connection(TokioIo::new(stream), svc);
            tokio::select! {
                _ = conn => {}
                _ = conn_shutdown.changed() => {}
            }
        });
    }
}
