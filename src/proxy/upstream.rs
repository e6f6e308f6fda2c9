//! The upstream: its base URL and the pooled client (rustls for https, HTTP/2 by ALPN).
//!
//! The client offers ALPN `h2` then `http/1.1`: against Google every request of a pool
//! shares one HTTP/2 connection (multiplexed streams); an upstream without h2 gets pooled
//! HTTP/1.1 keep-alive connections. TCP connect plus TLS handshake are bounded by
//! `--connect-timeout`, idle pooled connections are closed after `--upstream-idle-timeout`,
//! and a request waits `--upstream-timeout` at most for its response head (one timer per
//! pool for all its requests: `proxy::deadline`).
//! A certificate the client rejects fails the connect with an error naming the reason
//! (e.g. `invalid peer certificate: UnknownIssuer`) and a hint about `--upstream-ca`; the
//! proxy turns it into a 502.
//!
//! The pool is ours: hyper's pooled client (hyper-util's `legacy::Client`) took a lock,
//! cloned itself, boxed two futures and spawned a task per request to put the connection
//! back once the response was read (about 5 % of the proxy's CPU in `perf`, see
//! benches/README.md). HTTP/2 connections are hyper's (`hyper::client::conn::http2`);
//! HTTP/1.1 ones are ours ([`super::h1client`]): a connection travels with its response
//! body and goes back to the pool when the body's end is read; a body dropped before its
//! end closes the connection (it cannot carry another request).
//!
//! On the proxy port's I/O threads (see `crate::server`: each runs its own single-threaded
//! runtime), every thread has its own pool, so a request, its upstream connection and that
//! connection's task stay on one thread: no cross-thread wake-ups per request. Elsewhere
//! (tests, other runtimes) one pool is shared.

use super::body::RequestBody;
use super::deadline::Deadlines;
use super::h1client::{H1Body, H1Conn};
use crate::boxed;
use crate::server::Headers;
use anyhow::Context as _;
use http::uri::{Authority, PathAndQuery, Scheme};
use http_body_util::Either;
use hyper::body::Incoming;
use hyper::client::conn::http2;
use hyper_rustls::{HttpsConnector, MaybeHttpsStream};
use hyper_util::client::legacy::connect::{Connection as _, HttpConnector};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use std::cell::{Cell, RefCell};
use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

/// The parsed `--upstream` base URL.
#[derive(Debug, Clone)]
pub struct Upstream {
    /// `http` or `https`.
    pub scheme: Scheme,
    /// Host and port.
    pub authority: Authority,
    /// Path prefix without a trailing `/` (usually empty).
    pub base_path: String,
    /// As given, for messages.
    pub display: String,
    /// The `Host` header of requests over HTTP/1.1, made once (HTTP/2 sends `:authority`).
    host_header: Option<http::HeaderValue>,
}

impl Upstream {
    /// Parse a base URL such as `https://generativelanguage.googleapis.com`.
    pub fn parse(url: &str) -> anyhow::Result<Self> {
        let uri: http::Uri = url
            .parse()
            .with_context(|| format!("--upstream {url:?} is not a URL"))?;
        let scheme = uri
            .scheme()
            .cloned()
            .with_context(|| format!("--upstream {url:?} needs a scheme (http:// or https://)"))?;
        if scheme != Scheme::HTTP && scheme != Scheme::HTTPS {
            anyhow::bail!("--upstream {url:?}: scheme must be http or https");
        }
        let authority = uri
            .authority()
            .cloned()
            .with_context(|| format!("--upstream {url:?} needs a host"))?;
        // The host, and the port unless it is the scheme's default.
        let default_port = if scheme == Scheme::HTTPS { 443 } else { 80 };
        let host = authority.host();
        let host_header = http::HeaderValue::from_str(&match authority.port_u16() {
            Some(port) if port != default_port => format!("{host}:{port}"),
            _ => host.to_string(),
        })
        .ok();
        Ok(Self {
            scheme,
            authority,
            host_header,
            base_path: uri.path().trim_end_matches('/').to_string(),
            display: url.trim_end_matches('/').to_string(),
        })
    }

    /// The upstream target for a forwarded path and query, in origin form (`/path?query`):
    /// what HTTP/1.1 sends; the pool adds the scheme and authority on HTTP/2. The pieces
    /// must be valid in a URI (see [`UpstreamRequest::target`]).
    pub fn target(&self, path: &str, query: Option<&str>) -> String {
        let mut pq = String::with_capacity(
            self.base_path.len() + path.len() + query.map_or(0, |q| q.len() + 1),
        );
        pq.push_str(&self.base_path);
        pq.push_str(path);
        if let Some(q) = query {
            pq.push('?');
            pq.push_str(q);
        }
        pq
    }
}

/// A request for the upstream.
///
/// Not an `http::Request`, whose `Uri` checks every byte of the target again when it is
/// built (~1,200 instructions a request): the target's pieces were each checked where they
/// came from, and HTTP/1.1 writes it as it is. An `http::Request` is made of it for HTTP/2
/// (hyper's client wants one).
#[derive(Debug)]
pub struct UpstreamRequest {
    pub method: http::Method,
    /// Origin form (`/path?query`), put together by [`Upstream::target`] from pieces that are
    /// valid in a URI: the client's path and query (checked by the server), the base path
    /// (checked at startup), a fallback model id (checked by `rewrite_model_in_path`) and a
    /// query with the key substituted (form-urlencoded).
    pub target: String,
    pub headers: Headers,
    pub body: RequestBody,
}

impl UpstreamRequest {
    /// The request, leaving an empty one in its place.
    fn take(&mut self) -> Self {
        std::mem::replace(
            self,
            Self {
                method: http::Method::GET,
                target: String::new(),
                headers: Headers::Map(http::HeaderMap::new()),
                body: RequestBody::Full(None),
            },
        )
    }

    /// Back from a request that HTTP/2 did not send.
    fn from_request(req: http::Request<RequestBody>) -> Self {
        let (parts, body) = req.into_parts();
        Self {
            method: parts.method,
            target: parts
                .uri
                .path_and_query()
                .map_or("/", PathAndQuery::as_str)
                .to_owned(),
            headers: Headers::Map(parts.headers),
            body,
        }
    }
}

/// The upstream client: one pool for the process, or one per I/O thread there.
#[derive(Debug, Clone)]
pub struct UpstreamClient {
    /// The shared pool (used outside the I/O threads).
    shared: Arc<Pool>,
    /// What the per-thread pools are built from (same connector, same settings).
    connector: Connector,
    timeouts: Timeouts,
    upstream: Upstream,
    /// Tells this client's per-thread pools apart from other clients' (tests run several).
    id: u64,
}

static NEXT_CLIENT_ID: AtomicU64 = AtomicU64::new(0);

thread_local! {
    /// Set on the proxy port's I/O threads: requests made there use a pool of the thread.
    static THREAD_POOLS: Cell<bool> = const { Cell::new(false) };
    /// The pools of this thread, by client id.
    static POOLS: RefCell<Vec<(u64, Arc<Pool>)>> = const { RefCell::new(Vec::new()) };
}

/// Make requests of the current thread use a pool of their own (called once by each of the
/// proxy port's I/O threads, which run a single-threaded runtime).
pub fn use_thread_pools() {
    THREAD_POOLS.with(|t| t.set(true));
}

impl UpstreamClient {
    /// Send a request (on a connection of this I/O thread's pool, or of the shared one).
    /// The pool puts it in the form the connection's protocol wants (a retry may move a
    /// request from one protocol to the other): HTTP/1.1 with a `Host` header, HTTP/2 with
    /// an absolute URI (`:authority`). An HTTP/1.1 connection goes back to the pool when the
    /// response body's end is read.
    ///
    /// Takes the request by reference (an async fn's arguments are copied into its state
    /// again when it starts, and the request is 224 bytes); a body known in full stays in it.
    /// `now` is the caller's clock reading as it sends (idle connections are checked
    /// against it rather than against a reading of their own).
    pub fn request<'a>(
        &self,
        req: &'a mut UpstreamRequest,
        now: Instant,
    ) -> impl Future<Output = Result<http::Response<UpstreamBody>, UpstreamError>> + Send + 'a {
        self.pool().send(req, now)
    }

    fn pool(&self) -> Arc<Pool> {
        if !THREAD_POOLS.with(Cell::get) {
            return self.shared.clone();
        }
        POOLS.with(|pools| {
            let mut pools = pools.borrow_mut();
            if let Some((_, pool)) = pools.iter().find(|(id, _)| *id == self.id) {
                return pool.clone();
            }
            let pool = Pool::new(self.connector.clone(), self.timeouts, self.upstream.clone());
            pools.push((self.id, pool.clone()));
            pool
        })
    }
}

/// Why a request could not be sent or got no response head.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// TCP, TLS (the source names the reason) or the connect timeout.
    #[error("cannot connect")]
    Connect(#[source] BoxError),
    /// The connection was made but HTTP/1.1 or HTTP/2 could not start on it.
    #[error("HTTP handshake failed")]
    Handshake(#[source] hyper::Error),
    /// The request failed on the connection (closed, reset, malformed response).
    #[error("request failed")]
    Send(#[source] BoxError),
    /// No response head within `--upstream-timeout`.
    #[error("no response within the upstream timeout")]
    Timeout,
    /// The upstream URL could not be made for HTTP/2 (a target that is not valid in a URI:
    /// see [`UpstreamRequest::target`]).
    #[error("cannot build the upstream URL")]
    Target(#[source] http::Error),
}

/// A response body from the upstream: over our HTTP/1.1 connection (`Either::Left`), or
/// hyper's HTTP/2 (`Either::Right`). `Either`'s errors are boxed.
pub type UpstreamBody = Either<H1Body, Incoming>;

/// Only HTTP/1.1 responses keep their head as it came.
impl crate::wire::CarriesHead for UpstreamBody {
    fn take_head(&mut self) -> Option<Box<crate::wire::RawHead>> {
        match self {
            Either::Left(h1) => h1.take_head(),
            Either::Right(_) => None,
        }
    }

    fn head_mut(&mut self) -> Option<&mut crate::wire::RawHead> {
        match self {
            Either::Left(h1) => h1.head_mut(),
            Either::Right(_) => None,
        }
    }
}

/// Idle HTTP/1.1 connections kept per pool at most (hyper-util's pool had the same cap).
const MAX_IDLE: usize = 1024;

/// The connections of one pool: idle HTTP/1.1 ones (most recently used last) and the
/// HTTP/2 one, which every request of the pool shares while it is open.
pub struct Pool {
    state: Mutex<PoolState>,
    connector: Connector,
    /// `--upstream-idle-timeout`: unused connections are closed after it.
    idle_timeout: Duration,
    upstream: Upstream,
    /// The idle sweeper is started with the first connection.
    sweeping: AtomicBool,
    /// The requests waiting for their response head (`--upstream-timeout`), and their
    /// timer.
    deadlines: Deadlines,
}

#[derive(Default)]
struct PoolState {
    idle: Vec<Idle>,
    /// The shared HTTP/2 connection and when a request last took it.
    h2: Option<(http2::SendRequest<RequestBody>, Instant)>,
}

struct Idle {
    conn: H1Conn,
    since: Instant,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("upstream", &self.upstream.display)
            .finish_non_exhaustive()
    }
}

/// A connection checked out for one request.
enum Conn {
    H1(H1Conn),
    H2(http2::SendRequest<RequestBody>),
}

fn lock(state: &Mutex<PoolState>) -> std::sync::MutexGuard<'_, PoolState> {
    // The state holds no invariant a panic could break halfway: use it as it is.
    state
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Pool {
    fn new(connector: Connector, timeouts: Timeouts, upstream: Upstream) -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::new(PoolState::default()),
            connector,
            idle_timeout: timeouts.idle,
            upstream,
            sweeping: AtomicBool::new(false),
            deadlines: Deadlines::new(timeouts.response),
        })
    }

    /// Send `req` and wait for its response head, for `--upstream-timeout` from `now` at
    /// most.
    async fn send(
        self: Arc<Self>,
        req: &mut UpstreamRequest,
        now: Instant,
    ) -> Result<http::Response<UpstreamBody>, UpstreamError> {
        let at = self.deadlines.after(now);
        // Boxed: the exchange (~1 KiB) is written into its box once, and this future stays
        // small (it is moved whole into its caller's state).
        let attempt = boxed!(self.attempt(req, now));
        self.deadlines
            .within(at, attempt)
            .await
            .unwrap_or(Err(UpstreamError::Timeout))
    }

    /// `send` without the timeout: on a pooled connection, or on a fresh one (also when a
    /// pooled one turns out closed before the request went out).
    async fn attempt(
        self: &Arc<Self>,
        req: &mut UpstreamRequest,
        now: Instant,
    ) -> Result<http::Response<UpstreamBody>, UpstreamError> {
        // After a pooled connection refused the request, the retry goes on a fresh one: at
        // most two attempts, whatever state the pool is in.
        let mut fresh_only = false;
        loop {
            let pooled = if fresh_only { None } else { self.checkout(now) };
            let (conn, reused) = match pooled {
                Some(conn) => (conn, true),
                // Boxed: connecting (TLS, HTTP/2 handshake) is a large future, and rare.
                None => (Box::pin(self.connect()).await?, false),
            };
            match conn {
                Conn::H2(mut conn) => {
                    match conn.try_send_request(self.http2_request(req.take())?).await {
                        Ok(resp) => return Ok(resp.map(Either::Right)),
                        Err(mut e) => match e.take_message() {
                            // A pooled connection that closed before the request went out
                            // (a GOAWAY): nothing was sent, try a fresh one. A fresh
                            // connection failing the same way is the upstream's answer.
                            Some(unsent) if reused => {
                                lock(&self.state).h2 = None;
                                fresh_only = true;
                                *req = UpstreamRequest::from_request(unsent);
                            }
                            _ => return Err(UpstreamError::Send(e.into_error().into())),
                        },
                    }
                }
                Conn::H1(conn) => {
                    let host = self.upstream.host_header.as_ref();
                    match conn.send(req, host, self).await {
                        Ok(resp) => return Ok(resp.map(Either::Left)),
                        // A pooled connection the upstream had closed, met on the write:
                        // the request did not go out (a body known in full stayed in
                        // `req`), send it on a fresh one. Never after a write that went
                        // through: the upstream may have acted on it.
                        Err(e) if e.unsent && reused => fresh_only = true,
                        Err(e) => return Err(UpstreamError::Send(e.error)),
                    }
                }
            }
        }
    }

    /// A connection that can take a request `now`: the HTTP/2 one, else the most recently
    /// used idle HTTP/1.1 one. Closed and expired connections met on the way are dropped.
    fn checkout(&self, now: Instant) -> Option<Conn> {
        let mut st = lock(&self.state);
        if let Some((conn, used)) = st.h2.as_mut() {
            if !conn.is_closed() {
                *used = now;
                return Some(Conn::H2(conn.clone()));
            }
            st.h2 = None;
        }
        let mut i = st.idle.len();
        while i > 0 {
            i -= 1;
            let idle = st.idle.remove(i);
            if idle.conn.is_usable() && now.duration_since(idle.since) < self.idle_timeout {
                return Some(Conn::H1(idle.conn));
            }
        }
        None
    }

    /// Back from a response read to its end.
    pub(super) fn put(self: &Arc<Self>, conn: H1Conn) {
        {
            let mut st = lock(&self.state);
            if st.idle.len() >= MAX_IDLE {
                return;
            }
            st.idle.push(Idle {
                conn,
                since: Instant::now(),
            });
        }
        self.start_sweeper();
    }

    /// Connect (DNS, TCP, TLS with ALPN), then start HTTP/2 or HTTP/1.1 on the connection
    /// and run it in a task of the current runtime.
    async fn connect(self: &Arc<Self>) -> Result<Conn, UpstreamError> {
        use tower_service::Service as _;
        let uri = http::Uri::builder()
            .scheme(self.upstream.scheme.clone())
            .authority(self.upstream.authority.clone())
            .path_and_query("/")
            .build()
            .map_err(|e| UpstreamError::Connect(e.into()))?;
        let io = self
            .connector
            .clone()
            .call(uri)
            .await
            .map_err(UpstreamError::Connect)?;
        if io.connected().is_negotiated_h2() {
            let (conn, driver) = http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .handshake(io)
                .await
                .map_err(UpstreamError::Handshake)?;
            tokio::spawn(async move {
                if let Err(e) = driver.await {
                    tracing::debug!(target: "upstream", error = %e, "HTTP/2 connection ended");
                }
            });
            lock(&self.state).h2 = Some((conn.clone(), Instant::now()));
            self.start_sweeper();
            Ok(Conn::H2(conn))
        } else {
            Ok(Conn::H1(H1Conn::new(io)))
        }
    }

    /// Close connections unused for `--upstream-idle-timeout`: a task of the runtime that
    /// made the pool's first connection, which ends with the pool.
    fn start_sweeper(self: &Arc<Self>) {
        // Read first: every response's `put` comes here, and a swap is an atomic
        // read-modify-write even when the sweeper already runs.
        if self.sweeping.load(Ordering::Relaxed) || self.sweeping.swap(true, Ordering::Relaxed) {
            return;
        }
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            self.sweeping.store(false, Ordering::Relaxed);
            return;
        };
        let pool: Weak<Self> = Arc::downgrade(self);
        let every = (self.idle_timeout / 2).max(Duration::from_millis(50));
        rt.spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                let Some(pool) = pool.upgrade() else {
                    return;
                };
                pool.sweep(Instant::now());
            }
        });
    }

    fn sweep(&self, now: Instant) {
        let mut st = lock(&self.state);
        let timeout = self.idle_timeout;
        st.idle
            .retain(|i| i.conn.is_usable() && now.duration_since(i.since) < timeout);
        if st
            .h2
            .as_ref()
            .is_some_and(|(c, used)| c.is_closed() || now.duration_since(*used) >= timeout)
        {
            st.h2 = None;
        }
    }

    /// HTTP/2 wants the absolute form (for `:scheme` and `:authority`) and no `Host`.
    fn http2_request(
        &self,
        out: UpstreamRequest,
    ) -> Result<http::Request<RequestBody>, UpstreamError> {
        let uri = http::Uri::builder()
            .scheme(self.upstream.scheme.clone())
            .authority(self.upstream.authority.clone())
            .path_and_query(out.target)
            .build()
            .map_err(UpstreamError::Target)?;
        let mut req = http::Request::new(out.body);
        *req.method_mut() = out.method;
        *req.uri_mut() = uri;
        *req.headers_mut() = out.headers.into_map();
        req.headers_mut().remove(http::header::HOST);
        *req.version_mut() = http::Version::HTTP_2;
        Ok(req)
    }
}

/// Timeouts of the upstream client.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    /// TCP connect plus TLS handshake (`--connect-timeout`).
    pub connect: Duration,
    /// How long an unused pooled connection is kept (`--upstream-idle-timeout`).
    pub idle: Duration,
    /// How long a request waits for its response head (`--upstream-timeout`).
    pub response: Duration,
}

/// Build the client of `upstream`: webpki roots plus `extra_ca` (PEM), ALPN h2 then
/// http/1.1, TCP_NODELAY, keep-alive pool.
pub fn client(
    upstream: &Upstream,
    extra_ca: Option<&Path>,
    timeouts: Timeouts,
) -> anyhow::Result<UpstreamClient> {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(path) = extra_ca {
        use rustls::pki_types::pem::PemObject;
        let certs = rustls::pki_types::CertificateDer::pem_file_iter(path)
            .with_context(|| format!("--upstream-ca {}: cannot read the file", path.display()))?;
        let mut n = 0;
        for cert in certs {
            let cert = cert.with_context(|| {
                format!("--upstream-ca {}: not a PEM certificate", path.display())
            })?;
            roots.add(cert).with_context(|| {
                format!("--upstream-ca {}: certificate rejected", path.display())
            })?;
            n += 1;
        }
        if n == 0 {
            anyhow::bail!(
                "--upstream-ca {}: no certificate found in the file",
                path.display()
            );
        }
    }
    let tls = rustls::ClientConfig::builder_with_provider(crate::tls::provider())
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(timeouts.connect));
    http.set_keepalive(Some(Duration::from_secs(60)));
    // enable_http2 after enable_http1: ALPN offers h2 first, http/1.1 as the fallback.
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .enable_http2()
        .wrap_connector(http);
    let connector = Connector {
        inner: https,
        timeout: timeouts.connect,
    };
    Ok(UpstreamClient {
        shared: Pool::new(connector.clone(), timeouts, upstream.clone()),
        connector,
        timeouts,
        upstream: upstream.clone(),
        id: NEXT_CLIENT_ID.fetch_add(1, Ordering::Relaxed),
    })
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The HTTPS connector with the whole connection set-up (DNS, TCP, TLS) under one
/// deadline, and TLS failures explained.
#[derive(Clone, Debug)]
pub struct Connector {
    inner: HttpsConnector<HttpConnector>,
    timeout: Duration,
}

impl tower_service::Service<http::Uri> for Connector {
    type Response = MaybeHttpsStream<TokioIo<tokio::net::TcpStream>>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        let connecting = self.inner.call(uri.clone());
        let timeout = self.timeout;
        Box::pin(async move {
            let host = uri.authority().map_or("?", |a| a.as_str()).to_string();
            match tokio::time::timeout(timeout, connecting).await {
                Ok(Ok(stream)) => Ok(stream),
                Ok(Err(e)) => Err(explain(e, &host)),
                Err(_) => Err(format!(
                    "connecting to {host} (TCP and TLS) took longer than {} s (--connect-timeout)",
                    timeout.as_secs_f64()
                )
                .into()),
            }
        })
    }
}

/// A connect error: TLS failures get a message naming the rustls reason and a log line.
#[derive(Debug)]
struct TlsFailure {
    message: String,
}

impl std::fmt::Display for TlsFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for TlsFailure {}

fn explain(e: BoxError, host: &str) -> BoxError {
    let Some(tls) = find_rustls_error(e.as_ref()) else {
        return e;
    };
    let hint = match tls {
        rustls::Error::InvalidCertificate(_) => {
            " (the upstream's certificate is not trusted: if a private CA signed it, pass that CA with --upstream-ca)"
        }
        _ => "",
    };
    let message = format!("TLS handshake with {host} failed: {tls}{hint}");
    tracing::warn!(target: "upstream", host = %host, error = %tls, "upstream TLS handshake failed");
    Box::new(TlsFailure { message })
}

/// The rustls error behind a connect error: io::Errors nest it (`get_ref`), and an
/// io::Error's `source()` skips the error it wraps, so both paths are searched.
fn find_rustls_error<'a>(e: &'a (dyn std::error::Error + 'static)) -> Option<&'a rustls::Error> {
    if let Some(tls) = e.downcast_ref::<rustls::Error>() {
        return Some(tls);
    }
    if let Some(inner) = e
        .downcast_ref::<std::io::Error>()
        .and_then(|io| io.get_ref())
    {
        if let Some(tls) = find_rustls_error(inner) {
            return Some(tls);
        }
    }
    e.source().and_then(find_rustls_error)
}
