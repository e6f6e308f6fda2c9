//! Listeners and graceful shutdown. `serve` accepts connections until `shutdown` fires, then
//! lets in-flight requests finish within the drain deadline. Plain connections are sniffed
//! (a `peek` of their first bytes): HTTP/1.1 is served by our own connection
//! ([`http1`]: no buffer while idle, no channel per request), HTTP/2 with prior knowledge by
//! hyper's server, and a first read that is an incomplete HTTP/2 preface by hyper's
//! auto-detecting one. Over TLS, hyper serves HTTP/2 or HTTP/1.1 as ALPN negotiated.
//! Requests that arrived over TLS carry the [`Secure`] extension; handlers see one request
//! type, [`ClientRequest`] (its body a [`ClientBody`]), whichever server read the request.
//!
//! Cost per connection and per request is kept low (see `benches/README.md`): the handler's
//! future is boxed per request, so an idle connection does not hold a slot the size of that
//! future; and the peer address is only attached to requests of listeners that read it.
//!
//! I/O threads (`--io-threads`, set by `main` through [`set_io_threads`]): the proxy
//! port's connections are handed, round robin, to threads that each run a single-threaded
//! runtime, the way nginx runs workers: a connection, its requests, their upstream
//! connections (a pool per thread, see `proxy::upstream`) and the tasks driving them all
//! stay on one thread, so a request costs no cross-thread wake-ups or work stealing. The
//! accept loop, the admin port and everything else stay on the main runtime. With 0 (the
//! default of the library, used by tests) connections run on the runtime that serves.

mod http1;
mod request;

pub use request::{ClientRequest, Headers, RequestHead, Target};

use crate::tls::{Secure, HANDSHAKE_TIMEOUT};
use http_body_util::Either;
use hyper::body::Incoming;
use hyper::server::conn::http2;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use std::convert::Infallible;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio_rustls::TlsAcceptor;

/// I/O threads of the proxy port (0: none, connections run on the serving runtime).
static IO_THREADS: AtomicUsize = AtomicUsize::new(0);

/// Run the proxy port's connections on `n` I/O threads (0: on the serving runtime). Call
/// before [`serve`] starts the proxy port; the threads are started once per process.
pub fn set_io_threads(n: usize) {
    IO_THREADS.store(n, Ordering::Relaxed);
}

/// Work handed to an I/O thread: runs inside its runtime (it spawns the connection task).
type Job = Box<dyn FnOnce() + Send>;

/// The I/O threads' queues (started on first use, kept for the life of the process: bodies
/// whose client left are still drained there while the process shuts down).
static IO_POOL: OnceLock<Vec<mpsc::UnboundedSender<Job>>> = OnceLock::new();

fn io_pool(n: usize) -> &'static [mpsc::UnboundedSender<Job>] {
    IO_POOL.get_or_init(|| (0..n).filter_map(start_io_thread).collect())
}

fn start_io_thread(i: usize) -> Option<mpsc::UnboundedSender<Job>> {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            tracing::warn!(target: "server", error = %e, "cannot start an I/O thread's runtime");
            return None;
        }
    };
    let (tx, mut rx) = mpsc::unbounded_channel::<Job>();
    let spawned = std::thread::Builder::new()
        .name(format!("proxy-io-{i}"))
        .spawn(move || {
            crate::proxy::upstream::use_thread_pools();
            rt.block_on(async move {
                while let Some(job) = rx.recv().await {
                    job();
                }
            });
        });
    match spawned {
        Ok(_) => Some(tx),
        Err(e) => {
            tracing::warn!(target: "server", error = %e, "cannot start an I/O thread");
            None
        }
    }
}

/// The client's address, put into the extensions of every request of the listeners that
/// use it (per-address auth limits on the admin port; the proxy port's handler never reads
/// it, so its requests go without: inserting it allocates the extensions map).
#[derive(Debug, Clone, Copy)]
pub struct PeerAddr(pub std::net::SocketAddr);

/// Whether requests of the listener `name` carry [`PeerAddr`]: every listener but the
/// proxy port (`"proxy"`), whose handler does not read it.
fn tags_peer(name: &str) -> bool {
    name != "proxy"
}

/// The HTTP/2 client preface (RFC 9113 §3.4).
const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// What the first bytes of a plain connection say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Sniffed {
    /// Not the HTTP/2 preface.
    Http1,
    /// The whole HTTP/2 preface.
    Http2,
    /// A strict prefix of the preface: let the auto-detecting server read on.
    Unsure,
    /// End of stream or an error before any byte.
    Closed,
}

fn classify(first: &[u8]) -> Sniffed {
    match first.len() {
        0 => Sniffed::Closed,
        n if first != &H2_PREFACE[..n] => Sniffed::Http1,
        n if n == H2_PREFACE.len() => Sniffed::Http2,
        _ => Sniffed::Unsure,
    }
}

/// Peek (without consuming) at the first bytes of a connection.
async fn sniff(stream: &TcpStream) -> Sniffed {
    let mut buf = [0u8; 24];
    match stream.peek(&mut buf).await {
        Ok(n) => classify(&buf[..n]),
        Err(_) => Sniffed::Closed,
    }
}

/// The error of a request body: hyper's, or our HTTP/1.1 connection's.
pub type BodyError = Box<dyn std::error::Error + Send + Sync>;

/// A request's body as handlers receive it: from hyper (HTTP/2, and everything over TLS;
/// `Either::Left`) or from our HTTP/1.1 connection (plain HTTP/1.1, see [`http1`];
/// `Either::Right`). `Either`'s errors are boxed: [`BodyError`].
pub type ClientBody = Either<Incoming, http1::RecvBody>;

/// A boxed, sendable future: what a handler returns. Boxed because hyper keeps one slot of
/// the service future's size in every connection, idle or not.
pub type BoxFuture<T> = std::pin::Pin<Box<dyn Future<Output = T> + Send>>;

/// `Box::pin(f)`, with `f` written into a box allocated first. `Box::pin` built the future
/// on the stack and copied it whole into the box, twice here (the proxy's handler future is
/// 3 KiB); written this way, only what the future holds before its first poll is copied.
/// A macro: the same code as a function marked `#[inline(always)]` measured ~600
/// instructions a request more.
#[macro_export]
macro_rules! boxed {
    ($f:expr) => {{
        // (Typed here, so that a `dyn` the caller expects is coerced to, not inferred.)
        let b: ::std::pin::Pin<::std::boxed::Box<_>> = ::std::boxed::Box::into_pin(
            ::std::boxed::Box::write(::std::boxed::Box::new_uninit(), $f),
        );
        b
    }};
}

/// Serve `handler` on `listener` (over TLS when `tls` is set) until `shutdown` turns true,
/// then drain for at most `drain_deadline`. Returns the number of connections still open
/// at the deadline.
pub async fn serve<H, B>(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    handler: H,
    mut shutdown: watch::Receiver<bool>,
    drain_deadline: Duration,
    name: &'static str,
) -> usize
where
    H: Fn(ClientRequest) -> BoxFuture<Response<B>> + Send + Sync + 'static,
    B: http_body::Body<Data = bytes::Bytes> + crate::wire::CarriesHead + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>> + Send,
{
    let handler = Arc::new(handler);
    let stop = shutdown.clone();
    let shutdown = async move {
        let _ = shutdown.wait_for(|stop| *stop).await;
    };
    let mut shutdown = std::pin::pin!(shutdown);
    let graceful = GracefulShutdown::new();
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder.http2().max_concurrent_streams(1024);
    // The same settings as `builder`'s, for connections whose protocol is known.
    let mut h2 = http2::Builder::new(TokioExecutor::new());
    h2.max_concurrent_streams(1024);
    let plain = Arc::new((h2, builder));
    let tag_peer = tags_peer(name);
    let io_threads = match IO_THREADS.load(Ordering::Relaxed) {
        n if n > 0 && name == "proxy" => io_pool(n),
        _ => &[],
    };
    let mut next_thread = 0usize;
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // EMFILE and friends: back off briefly instead of spinning.
                    tracing::warn!(target: "server", listener = name, error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let h = handler.clone();
        let secure = tls.is_some();
        let svc = service_fn(move |req: Request<Incoming>| {
            let mut req = req.map(Either::Left);
            if tag_peer {
                req.extensions_mut().insert(PeerAddr(peer));
            }
            if secure {
                req.extensions_mut().insert(Secure);
            }
            let fut = h(ClientRequest::from_http(req));
            async move {
                // hyper writes the map: a passed-through head goes into it.
                let mut resp = fut.await;
                crate::wire::head_into_map(&mut resp);
                Ok::<_, Infallible>(resp)
            }
        });
        // The watcher is taken now, so shutdown waits for this connection from here on.
        let watcher = graceful.watcher();
        let acceptor = tls.clone();
        let mut stop = stop.clone();
        let builders = plain.clone();
        let own = handler.clone();
        let run = move |stream: TcpStream| async move {
            let Some(acceptor) = acceptor else {
                let sniffed = tokio::select! {
                    s = sniff(&stream) => s,
                    _ = stop.wait_for(|s| *s) => return,
                };
                if sniffed == Sniffed::Http1 {
                    // Shutdown waits for this connection while the watcher lives; `stop`
                    // tells the connection to finish its request and close.
                    let _watcher = watcher;
                    let peer = tag_peer.then_some(peer);
                    return http1::serve_connection(stream, own, peer, stop).await;
                }
                drop(stop);
                let io = TokioIo::new(stream);
                let (h2, auto) = &*builders;
                let ended: Result<(), BodyError> = match sniffed {
                    Sniffed::Closed | Sniffed::Http1 => return,
                    // Rare: boxed so that the common HTTP/1 task stays small.
                    Sniffed::Http2 => Box::pin(watcher.watch(h2.serve_connection(io, svc)))
                        .await
                        .map_err(Into::into),
                    Sniffed::Unsure => {
                        Box::pin(watcher.watch(auto.serve_connection(io, svc).into_owned())).await
                    }
                };
                if let Err(e) = ended {
                    tracing::debug!(target: "server", listener = name, peer = %peer, error = %e, "connection ended with an error");
                }
                return;
            };
            // TLS: the handshake runs in the connection's task, never in the accept loop;
            // the watcher makes shutdown wait for it too (bounded by the handshake
            // timeout). Boxed, so that plain connections' tasks stay small.
            Box::pin(async move {
                let stream =
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                        Ok(Ok(s)) => s,
                        Ok(Err(e)) => {
                            tracing::debug!(target: "server", listener = name, peer = %peer, error = %e, "TLS handshake failed");
                            return;
                        }
                        Err(_) => {
                            tracing::debug!(target: "server", listener = name, peer = %peer, "TLS handshake timed out");
                            return;
                        }
                    };
                let conn = builders.1.serve_connection(TokioIo::new(stream), svc);
                if let Err(e) = watcher.watch(conn).await {
                    tracing::debug!(target: "server", listener = name, peer = %peer, error = %e, "connection ended with an error");
                }
            })
            .await;
        };
        if io_threads.is_empty() {
            tokio::spawn(run(stream));
            continue;
        }
        // Hand the socket to an I/O thread: it is registered with that thread's runtime.
        let thread = &io_threads[next_thread % io_threads.len()];
        next_thread = next_thread.wrapping_add(1);
        match stream.into_std() {
            Ok(std_stream) => {
                let job: Job = Box::new(move || match TcpStream::from_std(std_stream) {
                    Ok(stream) => {
                        tokio::spawn(run(stream));
                    }
                    Err(e) => {
                        tracing::debug!(target: "server", listener = name, peer = %peer, error = %e, "cannot register a connection on an I/O thread");
                    }
                });
                if thread.send(job).is_err() {
                    tracing::warn!(target: "server", listener = name, "an I/O thread is gone; connection dropped");
                }
            }
            Err(e) => {
                tracing::debug!(target: "server", listener = name, peer = %peer, error = %e, "cannot hand a connection to an I/O thread");
            }
        }
    }
    drop(listener);
    tokio::select! {
        _ = graceful.shutdown() => 0,
        _ = tokio::time::sleep(drain_deadline) => {
            tracing::warn!(target: "server", listener = name, "drain deadline reached; closing remaining connections");
            1
        }
    }
}
