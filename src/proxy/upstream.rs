//! The upstream: its base URL and the pooled client (rustls for https, HTTP/2 by ALPN).
//!
//! The client offers ALPN `h2` then `http/1.1`: against Google every request of the
//! process shares a few HTTP/2 connections (multiplexed streams); an upstream without h2
//! gets pooled HTTP/1.1 keep-alive connections. TCP connect plus TLS handshake are bounded
//! by `--connect-timeout`, idle pooled connections are closed after
//! `--upstream-idle-timeout`. A certificate the client rejects fails the connect with an
//! error naming the reason (e.g. `invalid peer certificate: UnknownIssuer`) and a hint
//! about `--upstream-ca`; the proxy turns it into a 502.
//!
//! On the proxy port's I/O threads (see `crate::server`: each runs its own single-threaded
//! runtime), every thread has its own pool, so a request, its upstream connection and that
//! connection's task stay on one thread: no cross-thread wake-ups per request. Elsewhere
//! (tests, other runtimes) one pool is shared, as before.

use super::body::RequestBody;
use anyhow::Context as _;
use http::uri::{Authority, Scheme};
use hyper_rustls::{HttpsConnector, MaybeHttpsStream};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::{Client, ResponseFuture};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use std::cell::{Cell, RefCell};
use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

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
    /// The `Host` header of requests over HTTP/1.1 to an `http://` upstream, made once: the
    /// client would otherwise format it for every request. (`https://` upstreams negotiate
    /// the protocol by ALPN; the client sets the header, or `:authority` on HTTP/2.)
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
        // As the client does it: the host, and the port unless it is the scheme's default.
        let host_header = (scheme == Scheme::HTTP)
            .then(|| {
                let host = authority.host();
                let value = match authority.port_u16() {
                    Some(port) if port != 80 => format!("{host}:{port}"),
                    _ => host.to_string(),
                };
                http::HeaderValue::from_str(&value).ok()
            })
            .flatten();
        Ok(Self {
            scheme,
            authority,
            host_header,
            base_path: uri.path().trim_end_matches('/').to_string(),
            display: url.trim_end_matches('/').to_string(),
        })
    }

    /// Replace the client's `Host` with the upstream's (or drop it, for the client to set).
    pub fn set_host(&self, headers: &mut http::HeaderMap) {
        match &self.host_header {
            Some(h) => {
                headers.insert(http::header::HOST, h.clone());
            }
            None => {
                headers.remove(http::header::HOST);
            }
        }
    }

    /// The upstream URI for a forwarded path and query.
    pub fn uri(&self, path: &str, query: Option<&str>) -> Result<http::Uri, http::Error> {
        let mut pq = String::with_capacity(
            self.base_path.len() + path.len() + query.map_or(0, |q| q.len() + 1),
        );
        pq.push_str(&self.base_path);
        pq.push_str(path);
        if let Some(q) = query {
            pq.push('?');
            pq.push_str(q);
        }
        http::Uri::builder()
            .scheme(self.scheme.clone())
            .authority(self.authority.clone())
            .path_and_query(pq)
            .build()
    }
}

type Pooled = Client<Connector, RequestBody>;

/// The pooled upstream client: one pool for the process, or one per I/O thread there.
#[derive(Debug, Clone)]
pub struct UpstreamClient {
    /// The shared pool (used outside the I/O threads).
    shared: Pooled,
    /// What the per-thread pools are built from (same connector, same settings).
    connector: Connector,
    idle: Duration,
    /// Tells this client's per-thread pools apart from other clients' (tests run several).
    id: u64,
}

static NEXT_CLIENT_ID: AtomicU64 = AtomicU64::new(0);

thread_local! {
    /// Set on the proxy port's I/O threads: requests made there use a pool of the thread.
    static THREAD_POOLS: Cell<bool> = const { Cell::new(false) };
    /// The pools of this thread, by client id.
    static POOLS: RefCell<Vec<(u64, Pooled)>> = const { RefCell::new(Vec::new()) };
}

/// Make requests of the current thread use a pool of their own (called once by each of the
/// proxy port's I/O threads, which run a single-threaded runtime).
pub fn use_thread_pools() {
    THREAD_POOLS.with(|t| t.set(true));
}

impl UpstreamClient {
    /// Send a request (the pool of this I/O thread, or the shared one).
    pub fn request(&self, req: http::Request<RequestBody>) -> ResponseFuture {
        if !THREAD_POOLS.with(Cell::get) {
            return self.shared.request(req);
        }
        POOLS.with(|pools| {
            let mut pools = pools.borrow_mut();
            let i = match pools.iter().position(|(id, _)| *id == self.id) {
                Some(i) => i,
                None => {
                    pools.push((self.id, build(self.connector.clone(), self.idle)));
                    pools.len() - 1
                }
            };
            pools[i].1.request(req)
        })
    }
}

fn build(connector: Connector, idle: Duration) -> Pooled {
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(idle)
        .pool_timer(TokioTimer::new())
        .timer(TokioTimer::new())
        .pool_max_idle_per_host(1024)
        .build(connector)
}

/// Timeouts of the upstream client.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    /// TCP connect plus TLS handshake (`--connect-timeout`).
    pub connect: Duration,
    /// How long an unused pooled connection is kept (`--upstream-idle-timeout`).
    pub idle: Duration,
}

/// Build the client: webpki roots plus `extra_ca` (PEM), ALPN h2 then http/1.1,
/// TCP_NODELAY, keep-alive pool.
pub fn client(extra_ca: Option<&Path>, timeouts: Timeouts) -> anyhow::Result<UpstreamClient> {
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
        shared: build(connector.clone(), timeouts.idle),
        connector,
        idle: timeouts.idle,
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
