//! Listeners and graceful shutdown. `serve` accepts connections (HTTP/1.1 and HTTP/2 with
//! prior knowledge, auto-detected) until `shutdown` fires, then lets in-flight requests
//! finish within the drain deadline.

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

/// Serve `handler` on `listener` until `shutdown` turns true, then drain for at most
/// `drain_deadline`. Returns the number of connections still open at the deadline.
pub async fn serve<H, F, B>(
    listener: TcpListener,
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
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // EMFILE and friends: back off briefly instead of spinning.
                        tracing::warn!(target: "server", listener = name, error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                let h = handler.clone();
                let svc = service_fn(move |req| {
                    let h = h.clone();
                    async move { Ok::<_, Infallible>(h(req).await) }
                });
                let conn = builder.serve_connection(TokioIo::new(stream), svc).into_owned();
                let conn = graceful.watch(conn);
                tokio::spawn(async move {
                    if let Err(e) = conn.await {
                        tracing::debug!(target: "server", listener = name, peer = %peer, error = %e, "connection ended with an error");
                    }
                });
            }
            _ = &mut shutdown => break,
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
