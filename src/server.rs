//! Listeners and graceful shutdown. `serve` accepts connections (HTTP/1.1 and HTTP/2 with
//! prior knowledge, auto-detected; over TLS, HTTP/2 or HTTP/1.1 as negotiated by ALPN)
//! until `shutdown` fires, then lets in-flight requests finish within the drain deadline.
//! Requests that arrived over TLS carry the [`Secure`] extension.

use crate::tls::{Secure, HANDSHAKE_TIMEOUT};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;

/// The client's address, put into every request's extensions (per-address auth limits).
#[derive(Debug, Clone, Copy)]
pub struct PeerAddr(pub std::net::SocketAddr);

/// Serve `handler` on `listener` (over TLS when `tls` is set) until `shutdown` turns true,
/// then drain for at most `drain_deadline`. Returns the number of connections still open
/// at the deadline.
pub async fn serve<H, F, B>(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    handler: H,
    mut shutdown: watch::Receiver<bool>,
    drain_deadline: Duration,
    name: &'static str,
) -> usize
where
    H: Fn(Request<Incoming>) -> F + Send + Sync + 'static,
    F: Future<Output = Response<B>> + Send + 'static,
    B: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let handler = Arc::new(handler);
    let shutdown = async move {
        let _ = shutdown.wait_for(|stop| *stop).await;
    };
    let mut shutdown = std::pin::pin!(shutdown);
    let graceful = GracefulShutdown::new();
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder.http2().max_concurrent_streams(1024);
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
        let svc = service_fn(move |mut req: Request<Incoming>| {
            req.extensions_mut().insert(PeerAddr(peer));
            if secure {
                req.extensions_mut().insert(Secure);
            }
            let h = h.clone();
            async move { Ok::<_, Infallible>(h(req).await) }
        });
        let Some(acceptor) = &tls else {
            let conn = builder
                .serve_connection(TokioIo::new(stream), svc)
                .into_owned();
            let conn = graceful.watch(conn);
            tokio::spawn(async move {
                if let Err(e) = conn.await {
                    tracing::debug!(target: "server", listener = name, peer = %peer, error = %e, "connection ended with an error");
                }
            });
            continue;
        };
        // The handshake runs in the connection's task, never in the accept loop; the
        // watcher makes shutdown wait for it too (bounded by the handshake timeout).
        let acceptor = acceptor.clone();
        let watcher = graceful.watcher();
        let builder = builder.clone();
        tokio::spawn(async move {
            let stream = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream))
                .await
            {
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
            let conn = builder.serve_connection(TokioIo::new(stream), svc);
            if let Err(e) = watcher.watch(conn).await {
                tracing::debug!(target: "server", listener = name, peer = %peer, error = %e, "connection ended with an error");
            }
        });
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
