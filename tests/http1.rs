//! The proxy port's own HTTP/1.1 connection (`src/server/http1.rs`), spoken to over raw
//! TCP so that what goes on the wire is what the test says: keep-alive and pipelining,
//! chunked request bodies and `Expect: 100-continue`, chunked streamed responses, HTTP/1.0,
//! and the answers to heads it refuses. Behind it: the real proxy and the mock Gemini.
#![allow(clippy::unwrap_used)]

mod common;

use common::mock_gemini::Behavior;
use common::{Harness, CONFIG};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const WAIT: Duration = Duration::from_secs(10);
const BODY: &str =
    r#"{"contents":[{"parts":[{"text":"hi"}]}],"generationConfig":{"maxOutputTokens":20}}"#;

/// A response as read off the wire.
#[derive(Debug)]
struct Resp {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Resp {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// One client connection, read by hand.
struct Raw {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl Raw {
    async fn connect(h: &Harness) -> Raw {
        let addr = h.app.proxy_addr;
        Raw {
            stream: TcpStream::connect(addr).await.unwrap(),
            buf: Vec::new(),
        }
    }

    async fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.unwrap();
    }

    /// Read more bytes; false at end of stream.
    async fn fill(&mut self) -> bool {
        let mut chunk = [0u8; 8192];
        let n = tokio::time::timeout(WAIT, self.stream.read(&mut chunk))
            .await
            .expect("the proxy answers within 10 s")
            .unwrap_or(0);
        self.buf.extend_from_slice(&chunk[..n]);
        n > 0
    }

    async fn take(&mut self, n: usize) -> Vec<u8> {
        while self.buf.len() < n {
            assert!(self.fill().await, "connection closed mid-body");
        }
        self.buf.drain(..n).collect()
    }

    async fn line(&mut self) -> Vec<u8> {
        loop {
            if let Some(i) = self.buf.windows(2).position(|w| w == b"\r\n") {
                let line = self.buf.drain(..i + 2).take(i).collect();
                return line;
            }
            assert!(self.fill().await, "connection closed mid-line");
        }
    }

    /// The next response (an interim 1xx is returned as such, without a body).
    async fn response(&mut self, head_request: bool) -> Resp {
        let (status, headers, len) = loop {
            let mut hs = [httparse::EMPTY_HEADER; 64];
            let mut r = httparse::Response::new(&mut hs);
            if let httparse::Status::Complete(len) = r.parse(&self.buf).unwrap() {
                let headers = r
                    .headers
                    .iter()
                    .map(|h| {
                        (
                            h.name.to_ascii_lowercase(),
                            String::from_utf8_lossy(h.value).into_owned(),
                        )
                    })
                    .collect::<Vec<_>>();
                break (r.code.unwrap(), headers, len);
            }
            assert!(
                self.fill().await,
                "connection closed before a response head"
            );
        };
        self.buf.drain(..len);
        let mut resp = Resp {
            status,
            headers,
            body: Vec::new(),
        };
        if status < 200 || head_request {
            return resp;
        }
        if let Some(n) = resp.header("content-length") {
            let n: usize = n.parse().unwrap();
            resp.body = self.take(n).await;
        } else if resp.header("transfer-encoding") == Some("chunked") {
            loop {
                let size = self.line().await;
                let size = usize::from_str_radix(std::str::from_utf8(&size).unwrap(), 16).unwrap();
                if size == 0 {
                    assert_eq!(self.line().await, b"", "no trailers");
                    break;
                }
                let data = self.take(size).await;
                resp.body.extend_from_slice(&data);
                assert_eq!(self.line().await, b"", "CRLF after chunk data");
            }
        } else {
            while self.fill().await {}
            resp.body = std::mem::take(&mut self.buf);
        }
        resp
    }

    /// Whether the proxy closes the connection (after any bytes still unread) within 10 s.
    async fn closed(&mut self) -> bool {
        let mut chunk = [0u8; 8192];
        loop {
            match tokio::time::timeout(WAIT, self.stream.read(&mut chunk)).await {
                Err(_) => return false,
                Ok(Ok(0) | Err(_)) => return true,
                Ok(Ok(_)) => {}
            }
        }
    }
}

fn generate(agent: &str, extra: &str) -> Vec<u8> {
    format!(
        "POST /agents/{agent}/v1beta/models/gemini-2.5-flash:generateContent HTTP/1.1\r\nHost: proxy\r\nContent-Type: application/json\r\nContent-Length: {}\r\n{extra}\r\n{BODY}",
        BODY.len()
    )
    .into_bytes()
}

#[tokio::test]
async fn one_connection_serves_sequential_and_pipelined_requests() {
    let h = Harness::start(CONFIG).await;
    let mut c = Raw::connect(&h).await;
    c.send(&generate("sage", "")).await;
    let first = c.response(false).await;
    assert_eq!(
        first.status,
        200,
        "{}",
        String::from_utf8_lossy(&first.body)
    );
    assert_eq!(first.header("x-budget-agent"), Some("sage"));
    assert!(first.header("date").is_some(), "a Date header");
    assert_eq!(first.header("connection"), None, "kept alive");
    let json: serde_json::Value = serde_json::from_slice(&first.body).unwrap();
    assert!(json["usageMetadata"]["totalTokenCount"].as_u64().unwrap() > 0);

    // Two requests in one write: answered in order on the same connection.
    let mut two = generate("sage", "");
    two.extend_from_slice(b"GET /agents/sage/v1beta/models HTTP/1.1\r\nHost: proxy\r\n\r\n");
    c.send(&two).await;
    let second = c.response(false).await;
    let third = c.response(false).await;
    assert_eq!(second.status, 200);
    assert_eq!(
        third.status,
        200,
        "{}",
        String::from_utf8_lossy(&third.body)
    );
    let received = h.mock.received();
    assert_eq!(received.len(), 3);
    assert_eq!(received[2].path, "/v1beta/models");
    assert_eq!(received[0].body, BODY.as_bytes());

    // A HEAD response has no body; the connection goes on.
    c.send(b"HEAD /agents/sage/v1beta/models HTTP/1.1\r\nHost: proxy\r\n\r\n")
        .await;
    let head = c.response(true).await;
    assert!(head.header("content-length").is_some(), "{head:?}");
    assert_eq!(h.mock.received()[3].method, http::Method::HEAD);
    c.send(&generate("sage", "Connection: close\r\n")).await;
    let last = c.response(false).await;
    assert_eq!(last.status, 200);
    assert_eq!(last.header("connection"), Some("close"));
    assert!(c.closed().await);
    assert_eq!(h.mock.request_count(), 5);
}

#[tokio::test]
async fn a_chunked_body_after_100_continue_reaches_the_upstream_whole() {
    let h = Harness::start(CONFIG).await;
    let mut c = Raw::connect(&h).await;
    c.send(b"POST /agents/sage/v1beta/models/gemini-2.5-flash:generateContent HTTP/1.1\r\nHost: proxy\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\nExpect: 100-continue\r\n\r\n")
        .await;
    let interim = c.response(false).await;
    assert_eq!(interim.status, 100, "the proxy asks for the body");
    // The body in uneven chunks (one with an extension), in separate writes.
    let (a, b) = BODY.split_at(10);
    c.send(format!("{:x};ext=1\r\n{a}\r\n", a.len()).as_bytes())
        .await;
    c.send(format!("{:X}\r\n{b}\r\n", b.len()).as_bytes()).await;
    c.send(b"0\r\n\r\n").await;
    let resp = c.response(false).await;
    assert_eq!(resp.status, 200, "{}", String::from_utf8_lossy(&resp.body));
    let received = h.mock.received();
    assert_eq!(received.len(), 1);
    assert_eq!(received[0].body, BODY.as_bytes(), "decoded, byte for byte");
    assert_eq!(
        received[0].header("transfer-encoding"),
        None,
        "the client's framing is not forwarded as a header"
    );

    // The connection is still usable.
    c.send(&generate("sage", "")).await;
    assert_eq!(c.response(false).await.status, 200);
}

/// A body sent after `100 Continue` in one write, larger than what the proxy reads before
/// forwarding (64 KiB): the proxy's first read of it is usually that whole first part in
/// one frame, then the rest streams on. The upstream gets it byte for byte.
#[tokio::test]
async fn a_large_body_after_100_continue_reaches_the_upstream_whole() {
    let h = Harness::start(CONFIG).await;
    let body = common::large_body(150_000);
    let mut c = Raw::connect(&h).await;
    c.send(format!("POST /agents/sage/v1beta/models/gemini-2.5-flash:generateContent HTTP/1.1\r\nHost: proxy\r\nContent-Type: application/json\r\nContent-Length: {}\r\nExpect: 100-continue\r\n\r\n", body.len()).as_bytes())
        .await;
    assert_eq!(
        c.response(false).await.status,
        100,
        "the proxy asks for the body"
    );
    c.send(&body).await;
    let resp = c.response(false).await;
    assert_eq!(resp.status, 200, "{}", String::from_utf8_lossy(&resp.body));
    let received = h.mock.received();
    assert_eq!(received.len(), 1);
    assert!(
        received[0].body == body,
        "the upstream got {} bytes of {}",
        received[0].body.len(),
        body.len()
    );
}

#[tokio::test]
async fn a_streamed_response_is_chunked_and_counted() {
    let h = Harness::start(CONFIG).await;
    h.mock
        .set_behavior(Behavior::new().chunks(4).usage(10, 5, 0));
    let mut c = Raw::connect(&h).await;
    let req = format!(
        "POST /agents/sage/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse HTTP/1.1\r\nHost: proxy\r\nContent-Length: {}\r\n\r\n{BODY}",
        BODY.len()
    );
    c.send(req.as_bytes()).await;
    let resp = c.response(false).await;
    assert_eq!(resp.status, 200);
    assert_eq!(resp.header("transfer-encoding"), Some("chunked"));
    let text = String::from_utf8(resp.body).unwrap();
    assert_eq!(text.matches("data: ").count(), 4, "{text}");
    common::wait_until(|| async { h.used("sage").await == 15 }).await;
    // And the connection goes on.
    c.send(&generate("sage", "")).await;
    assert_eq!(c.response(false).await.status, 200);
}

#[tokio::test]
async fn an_http10_request_is_answered_and_the_connection_closed() {
    let h = Harness::start(CONFIG).await;
    let mut c = Raw::connect(&h).await;
    c.send(b"GET /agents/sage/v1beta/models HTTP/1.0\r\n\r\n")
        .await;
    let resp = c.response(false).await;
    assert_eq!(resp.status, 200);
    assert_eq!(resp.header("connection"), Some("close"));
    assert!(c.closed().await);
}

#[tokio::test]
async fn refused_heads_get_a_clear_error_and_the_connection_closes() {
    let h = Harness::start(CONFIG).await;
    let many = (0..120)
        .map(|i| format!("x-h{i}: v\r\n"))
        .collect::<String>();
    let cases: [(Vec<u8>, u16, &str); 4] = [
        (
            b"POST /agents/sage/v1beta/models/m:generateContent HTTP/1.1\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec(),
            400,
            "both Content-Length and Transfer-Encoding",
        ),
        (
            b"POST /agents/sage/v1beta/models/m:generateContent HTTP/1.1\r\nContent-Length: two\r\n\r\n".to_vec(),
            400,
            "Content-Length is not a number",
        ),
        (b"GARBAGE\x01 / HTTP/1.1\r\n\r\n".to_vec(), 400, "malformed"),
        (
            format!("GET / HTTP/1.1\r\n{many}\r\n").into_bytes(),
            431,
            "fewer or shorter headers",
        ),
    ];
    for (raw, status, says) in cases {
        let mut c = Raw::connect(&h).await;
        c.send(&raw).await;
        let resp = c.response(false).await;
        assert_eq!(resp.status, status, "{}", String::from_utf8_lossy(&raw));
        let json: serde_json::Value = serde_json::from_slice(&resp.body).unwrap();
        let message = json["error"]["message"].as_str().unwrap();
        assert!(message.contains(says), "{message}");
        assert_eq!(resp.header("connection"), Some("close"));
        assert!(c.closed().await);
    }
    assert_eq!(h.mock.request_count(), 0, "nothing reached the upstream");
}

#[tokio::test]
async fn a_request_parked_after_its_chunked_body_notices_its_client_leaving() {
    const QUEUE: &str = r#"{
      "default": {"max_tokens": 1000000, "period": "monthly", "action_on_limit": "warn"},
      "agents": {"spark": {"max_tokens": 1, "period": "monthly", "action_on_limit": "queue",
                           "queue": {"max_wait_seconds": 30, "max_depth": 3}}}
    }"#;
    let h = Harness::start(QUEUE).await;
    // Spend the budget.
    let r = h.generate("spark").await;
    assert_eq!(r.status(), 200);
    r.bytes().await.unwrap();
    // A chunked body is read by the body itself (it arrives after the head), which gives
    // the connection's reading half back at its end: the request then parks.
    let mut c = Raw::connect(&h).await;
    c.send(b"POST /agents/spark/v1beta/models/gemini-2.5-flash:generateContent HTTP/1.1\r\nHost: proxy\r\nTransfer-Encoding: chunked\r\n\r\n")
        .await;
    c.send(format!("{:x}\r\n{BODY}\r\n0\r\n\r\n", BODY.len()).as_bytes())
        .await;
    common::wait_until(|| async { h.status("spark").await["queued"] == 1 }).await;
    drop(c);
    common::wait_until(|| async { h.status("spark").await["queued"] == 0 }).await;
    assert_eq!(
        h.mock.request_count(),
        1,
        "the parked request never reached Google"
    );
}
