//! The upstream connection pool (`proxy::upstream`, `proxy::h1client`) against a real mock
//! Gemini over plain HTTP/1.1: connections are kept alive and reused once a response was
//! read to its end, an upstream closing them costs no request, and idle ones close after
//! `--upstream-idle-timeout`; and against a hand-written upstream, an interim `100` and a
//! body ended by the connection's close. (HTTP/2 sharing over TLS is in tests/tls.rs.)
#![allow(clippy::unwrap_used)]

mod common;

use common::mock_gemini::Behavior;
use common::{hello, wait_until, Harness, CONFIG};
use futures_util::StreamExt;
use std::sync::Arc;
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(10);
const GENERATE: &str = "/agents/sage/v1beta/models/gemini-2.5-flash:generateContent";

/// A generateContent of `sage` that must answer 200, read to its end (so its upstream
/// connection can go back to the pool).
async fn generate_ok(h: &Harness) {
    let r = h.generate("sage").await;
    let status = r.status();
    let body = r.text().await.unwrap();
    assert_eq!(status, 200, "{body}");
}

#[tokio::test]
async fn sequential_requests_share_one_kept_alive_connection_with_the_upstream_host() {
    let h = Harness::start(CONFIG).await;
    for _ in 0..5 {
        generate_ok(&h).await;
    }
    // Not metered (countTokens): the connection comes back all the same.
    let r = h
        .http
        .post(h.url("/agents/sage/v1beta/models/gemini-2.5-flash:countTokens"))
        .json(&hello())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    r.text().await.unwrap();
    generate_ok(&h).await;

    let received = h.mock.received();
    assert_eq!(received.len(), 7);
    let host = h.mock.addr.to_string();
    for got in &received {
        assert_eq!(got.version, http::Version::HTTP_11);
        // The upstream's host, not the proxy's that the client sent.
        assert_eq!(got.header("host"), Some(host.as_str()));
    }
    assert_eq!(
        h.mock.connections(),
        1,
        "7 requests one after the other should use one upstream connection"
    );
}

#[tokio::test]
async fn an_upstream_that_closes_idle_connections_costs_no_request() {
    let h = Harness::start(CONFIG).await;
    for _ in 1..=3 {
        generate_ok(&h).await;
        // The upstream drops its kept-alive connection (as Google does after a while).
        h.mock.close_idle_connections();
        tokio::time::timeout(WAIT, h.mock.wait_for_open_connections(0))
            .await
            .unwrap();
    }
    generate_ok(&h).await;
    assert_eq!(h.mock.request_count(), 4);
    assert_eq!(h.mock.connections(), 4);
    assert_eq!(h.used("sage").await, 4 * 30);
}

/// More pooled connections than tokio's cooperative budget (128 readiness polls per task
/// poll), all closed by the upstream at once: the request that checks them one after the
/// other must not take the 129th for usable because its task ran out of budget.
#[tokio::test]
async fn an_upstream_that_closes_more_connections_than_a_task_budget_costs_no_request() {
    const CONNS: usize = 150;
    let h = Harness::start(CONFIG).await;
    // Held answers: every request is in flight at once, each on a connection of its own.
    let (release, hold) = tokio::sync::watch::channel(false);
    h.mock.set_behavior(Behavior::new().hold(hold));
    let requests: Vec<_> = (0..CONNS)
        .map(|_| {
            let (http, url) = (h.http.clone(), h.url(GENERATE));
            tokio::spawn(async move {
                let r = http.post(url).json(&hello()).send().await.unwrap();
                let status = r.status();
                let body = r.text().await.unwrap();
                assert_eq!(status, 200, "{body}");
            })
        })
        .collect();
    tokio::time::timeout(WAIT, h.mock.wait_for_requests(CONNS))
        .await
        .unwrap();
    release.send_replace(true);
    for r in requests {
        tokio::time::timeout(WAIT, r).await.unwrap().unwrap();
    }
    assert_eq!(
        h.mock.connections(),
        CONNS,
        "one upstream connection per request"
    );
    h.mock.set_behavior(Behavior::new());
    h.mock.close_idle_connections();
    tokio::time::timeout(WAIT, h.mock.wait_for_open_connections(0))
        .await
        .unwrap();
    for _ in 0..3 {
        generate_ok(&h).await;
    }
    assert_eq!(h.mock.request_count(), CONNS + 3);
    assert_eq!(h.mock.connections(), CONNS + 1);
}

#[tokio::test]
async fn idle_connections_close_after_the_idle_timeout() {
    let h = Harness::start_tweaked(CONFIG, |o| {
        o.upstream_idle_timeout = Duration::from_millis(200)
    })
    .await;
    generate_ok(&h).await;
    assert_eq!(h.mock.open_connections(), 1);
    // The proxy closes it: nobody else would.
    tokio::time::timeout(WAIT, h.mock.wait_for_open_connections(0))
        .await
        .unwrap();
    generate_ok(&h).await;
    assert_eq!(h.mock.connections(), 2);
}

#[tokio::test]
async fn a_stream_drained_after_its_client_left_gives_its_connection_back() {
    let h = Harness::start(CONFIG).await;
    h.mock.set_behavior(
        Behavior::new()
            .usage(10, 100, 0)
            .chunks(4)
            .chunk_delay(Duration::from_millis(30)),
    );
    let r = h
        .http
        .post(h.url("/agents/sage/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse"))
        .json(&hello())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let mut body = r.bytes_stream();
    body.next().await.unwrap().unwrap();
    // The client leaves after the first chunk; the proxy reads the rest for the usage.
    drop(body);
    wait_until(|| async { h.used("sage").await == 110 }).await;
    h.mock.set_behavior(Behavior::new());
    generate_ok(&h).await;
    assert_eq!(
        h.mock.connections(),
        1,
        "the drained connection should have carried the next request"
    );
}

#[tokio::test]
async fn a_response_without_a_body_gives_its_connection_back() {
    let h = Harness::start(CONFIG).await;
    // A HEAD response has no body: hyper never polls it, the proxy drops it unread.
    let r = h
        .http
        .head(h.url("/agents/sage/v1beta/models"))
        .send()
        .await
        .unwrap();
    r.bytes().await.unwrap();
    let r = h
        .http
        .get(h.url("/agents/sage/v1beta/models"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    r.text().await.unwrap();
    assert_eq!(h.mock.request_count(), 2);
    assert_eq!(
        h.mock.connections(),
        1,
        "the HEAD's connection should have carried the GET"
    );
}

/// An HTTP/1.1 upstream written by hand, for what hyper's servers never send: an interim
/// `100 Continue` before the answer, and a body delimited by the connection's close. Every
/// connection answers one request with `answer`, then closes. Returns the address and the
/// number of connections accepted so far.
async fn raw_upstream(
    answer: &'static [u8],
) -> (std::net::SocketAddr, Arc<std::sync::atomic::AtomicUsize>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            tokio::spawn(async move {
                // Read the request head and its Content-Length body.
                let mut req = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    let n = s.read(&mut chunk).await.unwrap_or(0);
                    if n == 0 {
                        return;
                    }
                    req.extend_from_slice(&chunk[..n]);
                    let text = String::from_utf8_lossy(&req).to_ascii_lowercase();
                    if let Some(end) = text.find("\r\n\r\n") {
                        let len = text[..end]
                            .lines()
                            .find_map(|l| l.strip_prefix("content-length:"))
                            .map_or(0, |v| v.trim().parse::<usize>().unwrap());
                        if req.len() >= end + 4 + len {
                            break;
                        }
                    }
                }
                let _ = s.write_all(answer).await;
                // Closing ends the body.
            });
        }
    });
    (addr, accepted)
}

#[tokio::test]
async fn interim_responses_are_skipped_and_a_body_ended_by_close_is_metered_whole() {
    const ANSWER: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\ncontent-type: application/json\r\n\r\n{\"candidates\":[{\"content\":{\"parts\":[{\"text\":\"hi\"}]}}],\"usageMetadata\":{\"promptTokenCount\":7,\"candidatesTokenCount\":5,\"totalTokenCount\":12}}";
    let (addr, accepted) = raw_upstream(ANSWER).await;
    let h = Harness::start_tweaked(CONFIG, |o| o.upstream = format!("http://{addr}")).await;
    for round in 1..=2 {
        let r = h.generate("sage").await;
        assert_eq!(r.status(), 200);
        let body: serde_json::Value = r.json().await.unwrap();
        assert_eq!(
            body["usageMetadata"]["totalTokenCount"], 12,
            "the body, whole"
        );
        // The connection ended with the body: the next request needs a new one.
        assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), round);
    }
    wait_until(|| async { h.used("sage").await == 24 }).await;
}
