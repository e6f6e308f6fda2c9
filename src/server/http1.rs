//! Our HTTP/1.1 server connection, for plain TCP (TLS and HTTP/2 connections stay on
//! hyper's servers).
//!
//! Why not hyper's: hyper keeps a read buffer and a write buffer of 8 KiB on every HTTP/1
//! connection for its whole life, so 10,000 idle keep-alive clients cost 110 MiB of RSS
//! (issue 5 asks for 100), and every request goes through its dispatcher and a body
//! channel. This connection:
//! - holds no buffer while it idles: it waits for the socket to be readable, then reads
//!   into a fresh 4 KiB buffer, and lets go of it once the request is parsed (the request's
//!   head and body are slices of it, freed with them);
//! - hands a body that arrived with its head to the handler as plain bytes (no channel,
//!   no task); a body still arriving is read by the body itself, from the shared socket,
//!   and the read buffer comes back to the connection at its end;
//! - writes a response's head and its first frame (all of a unary response) in one
//!   `writev`, and every later frame as soon as it arrives (never coalesced);
//! - watches the socket while a response is awaited or streamed, and drops the handler's
//!   future or the body when the client leaves (a parked request leaves its queue, a
//!   metered body drains: see `proxy::metered`).
//!
//! Parsing is httparse's (what hyper uses). Limits: a head of at most 64 KiB and 100 headers
//! (431 beyond), a head must complete within 30 s of its first byte (slow-loris); bodies
//! are `Content-Length` or `chunked` (400 for anything else, and for both at once: request
//! smuggling). HTTP/1.0 requests are answered and the connection closed.

use super::{BoxFuture, ClientRequest, Headers, PeerAddr, RequestHead, Target};
use crate::wire::{
    chunk_size, content_length, has_token, has_token_in, header_slots, offsets,
    push_content_length, value_str, write_all, CarriesHead, Chunk, Decoder, RawHead, Seen, Spans,
    Step, MAX_HEADERS,
};
use bytes::{Bytes, BytesMut};
use http::header::{
    HeaderValue, CONNECTION, CONTENT_LENGTH, CONTENT_TYPE, DATE, TRANSFER_ENCODING,
};
use http::{HeaderMap, Method, Response, StatusCode, Uri, Version};
use http_body::{Body, Frame, SizeHint};
use std::cell::RefCell;
use std::future::Future;
use std::io::{self, IoSlice};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll, Waker};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::io::AsyncReadExt;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::sync::{oneshot, watch};

/// Largest request head.
const MAX_HEAD_BYTES: usize = 64 * 1024;
/// What one read of a head asks for.
const HEAD_READ_BYTES: usize = 4096;
/// What one read of a body asks for at most.
const BODY_READ_BYTES: usize = 64 * 1024;
/// Longest time from a head's first byte to its end.
const HEAD_TIMEOUT: Duration = Duration::from_secs(30);

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Why a request head is refused (the connection answers and closes).
#[derive(Debug, thiserror::Error)]
enum HeadError {
    #[error("the request head is malformed ({0}); send an HTTP/1.1 request line, then headers")]
    Malformed(httparse::Error),
    #[error("the request head is larger than {MAX_HEAD_BYTES} bytes or {MAX_HEADERS} headers; send fewer or shorter headers")]
    TooLarge,
    #[error("{0}")]
    Invalid(&'static str),
}

impl HeadError {
    fn status(&self) -> StatusCode {
        match self {
            HeadError::TooLarge => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            _ => StatusCode::BAD_REQUEST,
        }
    }
}

/// How a request's body is framed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    /// `Content-Length` (0 when the request has neither header).
    Length(u64),
    /// `Transfer-Encoding: chunked`.
    Chunked,
}

/// A parsed request head.
struct Head {
    head: Box<RequestHead>,
    framing: Framing,
    keep_alive: bool,
    expect_continue: bool,
}

/// Parse a request head at the start of `buf`, taking it out of `buf` when complete. Its
/// headers stay slices of it ([`Headers::Raw`]): no map is built.
fn parse_head(buf: &mut BytesMut) -> Result<Option<Head>, HeadError> {
    let mut headers = header_slots();
    let mut req = httparse::Request::new(&mut []);
    let len = match req.parse_with_uninit_headers(buf, &mut headers) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() > MAX_HEAD_BYTES => {
            return Err(HeadError::TooLarge)
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(HeadError::TooLarge),
        Err(e) => return Err(HeadError::Malformed(e)),
    };
    if len > MAX_HEAD_BYTES {
        return Err(HeadError::TooLarge);
    }
    // Where each piece lies in `buf`, so that the target and the headers can be slices of
    // the head.
    let method = Method::from_bytes(req.method.unwrap_or_default().as_bytes())
        .map_err(|_| HeadError::Invalid("the request method is not a valid token"))?;
    let target = offsets(buf, req.path.unwrap_or_default().as_bytes());
    let version = match req.version {
        Some(0) => Version::HTTP_10,
        _ => Version::HTTP_11,
    };
    let spans = Spans::of(buf, req.headers);
    let head = buf.split_to(len).freeze();
    let target = head.slice(target.0..target.1);
    let target = match Target::origin(target.clone()) {
        Some(t) => t,
        None => Target::Uri(
            Uri::from_maybe_shared(target)
                .map_err(|_| HeadError::Invalid("the request target is not a valid URI"))?,
        ),
    };
    let seen = spans.seen(&head);
    let framing = framing(&spans, &head, seen, version)?;
    let keep_alive = version == Version::HTTP_11
        && !(seen.connection && has_token_in(spans.values(&head, "connection"), "close"));
    let expect_continue = version == Version::HTTP_11
        && seen.expect
        && spans
            .values(&head, "expect")
            .next()
            .is_some_and(|v| v.eq_ignore_ascii_case(b"100-continue"));
    Ok(Some(Head {
        head: Box::new(RequestHead {
            method,
            target,
            version,
            headers: Headers::raw(head, spans),
            extensions: http::Extensions::new(),
        }),
        framing,
        keep_alive,
        expect_continue,
    }))
}

/// The request body's framing (RFC 9112 §6.3), refusing what could smuggle a request.
/// Read from the head's spans: a map lookup hashes the name.
fn framing(spans: &Spans, head: &[u8], seen: Seen, version: Version) -> Result<Framing, HeadError> {
    if !seen.content_length && !seen.transfer_encoding {
        return Ok(Framing::Length(0));
    }
    if seen.transfer_encoding {
        if version == Version::HTTP_10 {
            return Err(HeadError::Invalid(
                "Transfer-Encoding in an HTTP/1.0 request; send Content-Length",
            ));
        }
        if seen.content_length {
            return Err(HeadError::Invalid(
                "the request has both Content-Length and Transfer-Encoding; send one",
            ));
        }
        let last = spans
            .values(head, "transfer-encoding")
            .next_back()
            .and_then(value_str)
            .and_then(|v| v.rsplit(',').next())
            .map(str::trim);
        return match last {
            Some(t) if t.eq_ignore_ascii_case("chunked") => Ok(Framing::Chunked),
            _ => Err(HeadError::Invalid(
                "the request's Transfer-Encoding does not end in chunked; send Content-Length or chunked",
            )),
        };
    }
    let mut length = None;
    for v in spans.values(head, "content-length") {
        let n = std::str::from_utf8(v)
            .ok()
            .map(str::trim)
            .filter(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|s| s.parse::<u64>().ok())
            .ok_or(HeadError::Invalid(
                "the request's Content-Length is not a number",
            ))?;
        if length.is_some_and(|l| l != n) {
            return Err(HeadError::Invalid(
                "the request has several different Content-Length values",
            ));
        }
        length = Some(n);
    }
    Ok(Framing::Length(length.unwrap_or(0)))
}

/// Serve one plain HTTP/1.1 connection until the client closes it, a response cannot
/// keep it open, or `stop` turns true (checked between requests, and while idle).
///
/// The socket is split: the loop writes on its half, and reads on the other while it holds
/// it; a body still arriving takes the reading half and gives it back at its end. Reads go
/// through tokio's `AsyncRead`, which marks the socket drained after a short read, so that
/// waiting for the next request costs no `recvfrom` that finds nothing.
pub(super) async fn serve_connection<H, B>(
    stream: TcpStream,
    handler: Arc<H>,
    peer: Option<SocketAddr>,
    stop: watch::Receiver<bool>,
) where
    H: Fn(ClientRequest) -> BoxFuture<Response<B>> + Send + Sync + 'static,
    B: Body<Data = Bytes> + CarriesHead + Send + 'static,
    B::Error: Into<BoxError> + Send,
{
    let (read, write) = stream.into_split();
    let mut read = Some(read);
    let mut buf = BytesMut::new();
    // Shutdown, watched while waiting for a head: one future for the connection's life,
    // so that each wait for the next request does not register (and remove) a waiter on
    // the watch again. It resolves once, when `stop` turns true (or its sender is gone).
    let mut watching = stop.clone();
    let mut stopping = std::pin::pin!(async move {
        let _ = watching.wait_for(|s| *s).await;
    });
    loop {
        let Some(reader) = read.as_mut() else {
            return;
        };
        let head = match next_head(reader, &mut buf, stopping.as_mut()).await {
            Ok(Some(head)) => head,
            Ok(None) => return,
            Err(e) => {
                tracing::debug!(target: "server", error = %e, "bad request head");
                let _ = write_refusal(&write, &e).await;
                return;
            }
        };
        let Head {
            head: mut request_head,
            framing,
            keep_alive,
            expect_continue,
        } = head;
        let (body, back) = match (framing, read.take()) {
            (Framing::Length(n), reader) if buf.len() as u64 >= n => {
                read = reader;
                // `n` fits in usize: it is at most the buffer's length.
                let bytes = buf.split_to(n as usize).freeze();
                (RecvBody::full(bytes), None)
            }
            (_, None) => return,
            (framing, Some(reader)) => {
                if expect_continue
                    && write_all(
                        &write,
                        &mut [IoSlice::new(b"HTTP/1.1 100 Continue\r\n\r\n")],
                    )
                    .await
                    .is_err()
                {
                    return;
                }
                let (tx, rx) = oneshot::channel();
                let decoder = match framing {
                    Framing::Length(n) => Decoder::Length(n),
                    Framing::Chunked => Decoder::Chunked(Chunk::Size),
                };
                let body = RecvBody::streaming(reader, std::mem::take(&mut buf), decoder, tx);
                (body, Some(rx))
            }
        };
        if buf.is_empty() {
            // Let go of the read buffer: the request's bytes keep it alive as long as
            // they live, and an idle connection holds none.
            buf = BytesMut::new();
        }
        let is_head = request_head.method == Method::HEAD;
        let http10 = request_head.version == Version::HTTP_10;
        if let Some(peer) = peer {
            request_head.extensions.insert(PeerAddr(peer));
        }
        let mut response = handler(ClientRequest {
            head: request_head,
            body: http_body_util::Either::Right(body),
        });
        // The client is watched while this loop holds the reading half: from the start, or
        // once a body that was still arriving gave it back (a request parked after reading
        // its body must still notice its client leaving).
        let mut back = back;
        let resp = loop {
            match (read.as_mut(), back.as_mut()) {
                (Some(reader), _) => tokio::select! {
                    biased;
                    resp = &mut response => break resp,
                    () = client_gone(reader, &mut buf) => return,
                },
                (None, Some(rx)) => tokio::select! {
                    resp = &mut response => break resp,
                    given = rx => {
                        back = None;
                        if let Ok((reader, rest)) = given {
                            read = Some(reader);
                            buf = rest;
                        }
                    }
                },
                (None, None) => break response.await,
            }
        };
        // A body read to its end gave the reading half back; one that was not leaves the
        // connection at an unknown place in the stream, so the response says it closes.
        if let Some(mut back) = back {
            if let Ok((reader, rest)) = back.try_recv() {
                read = Some(reader);
                buf = rest;
            }
        }
        let keep_alive = keep_alive && read.is_some() && !*stop.borrow();
        let out = Outgoing {
            write: &write,
            is_head,
            http10,
        };
        if !out.write(resp, keep_alive, read.as_mut(), &mut buf).await {
            return;
        }
        if *stop.borrow() {
            return;
        }
    }
}

/// Read the next request head: `Ok(None)` when the client closed the connection or
/// `stopping` resolved (shutdown) while it was idle or partly read.
///
/// The `select!`s of this file are `biased`: the branch that usually completes (bytes
/// read, a response or a frame ready) is polled first, so that the watch beside it
/// (shutdown, the client leaving) is polled only while it is waited on: each poll of the
/// shutdown watch cost ~150 instructions, and an unbiased `select!` polled it up to three
/// times per request.
async fn next_head(
    read: &mut OwnedReadHalf,
    buf: &mut BytesMut,
    mut stopping: Pin<&mut impl Future<Output = ()>>,
) -> Result<Option<Head>, HeadError> {
    let mut deadline = None;
    loop {
        if !buf.is_empty() {
            if let Some(head) = parse_head(buf)? {
                return Ok(Some(head));
            }
        }
        let idle = buf.is_empty();
        if idle {
            // Idle: no buffer and no timer until a byte arrives; only shutdown.
            tokio::select! {
                biased;
                r = readable(read) => if r.is_err() { return Ok(None) },
                () = stopping.as_mut() => return Ok(None),
            }
        }
        if buf.capacity() - buf.len() < HEAD_READ_BYTES / 4 {
            buf.reserve(HEAD_READ_BYTES);
        }
        let n = if idle {
            tokio::select! {
                biased;
                n = read.read_buf(buf) => n,
                () = stopping.as_mut() => return Ok(None),
            }
        } else {
            let deadline =
                *deadline.get_or_insert_with(|| tokio::time::Instant::now() + HEAD_TIMEOUT);
            // A head half-sent when shutdown comes is not waited for.
            tokio::select! {
                biased;
                n = tokio::time::timeout_at(deadline, read.read_buf(buf)) => match n {
                    Ok(n) => n,
                    Err(_) => {
                        tracing::debug!(target: "server", "request head not complete within 30 s; closing");
                        return Ok(None);
                    }
                },
                () = stopping.as_mut() => return Ok(None),
            }
        };
        match n {
            Ok(0) | Err(_) => return Ok(None),
            Ok(_) => {}
        }
    }
}

/// Resolves when the socket has bytes to read (or was closed).
///
/// tokio's `readable()` puts a waiter in the socket's list under its lock and takes it out
/// again when dropped, twice per request here (waiting for the next request, and watching
/// the client while its request is handled: ~500 instructions); `poll_read_ready` keeps the
/// waker in the socket's one reader slot. Only one task reads a connection's socket at a
/// time (the loop, or a request body that took the reading half), so the slot is ours.
async fn readable(read: &OwnedReadHalf) -> io::Result<()> {
    let tcp: &TcpStream = read.as_ref();
    std::future::poll_fn(|cx| tcp.poll_read_ready(cx)).await
}

/// Resolves when the client closed the connection (or it failed). Bytes that arrive in the
/// meantime (a pipelined request) are kept in `buf`, up to one head's worth; no buffer is
/// taken before a byte arrives (a parked request's connection holds none).
async fn client_gone(read: &mut OwnedReadHalf, buf: &mut BytesMut) {
    loop {
        if buf.len() >= MAX_HEAD_BYTES {
            // Enough read ahead: stop watching rather than buffer without bound.
            return std::future::pending().await;
        }
        if readable(read).await.is_err() {
            return;
        }
        if buf.capacity() - buf.len() < HEAD_READ_BYTES / 4 {
            buf.reserve(HEAD_READ_BYTES);
        }
        match read.read_buf(buf).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
    }
}

/// Answer a request head that cannot be served (Gemini's error shape), before closing.
async fn write_refusal(write: &OwnedWriteHalf, e: &HeadError) -> io::Result<()> {
    let status = e.status();
    let body =
        crate::gemini::error::error_body(status.as_u16(), "INVALID_ARGUMENT", &e.to_string(), None);
    let mut headers = HeaderMap::new();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    headers.insert(CONNECTION, HeaderValue::from_static("close"));
    headers.insert(DATE, date());
    let mut head = Vec::with_capacity(256);
    encode_head(
        status,
        None,
        false,
        Some(body.len() as u64),
        &headers,
        &mut head,
    );
    write_all(write, &mut [IoSlice::new(&head), IoSlice::new(&body)]).await
}

/// How a response's body goes on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Out {
    /// No body (HEAD, 1xx, 204, 304).
    None,
    /// `Content-Length`.
    Length(u64),
    /// `Transfer-Encoding: chunked`.
    Chunked,
    /// Until the connection closes (an HTTP/1.0 client and no known length).
    Close,
}

/// Where and how a response is written.
struct Outgoing<'a> {
    write: &'a OwnedWriteHalf,
    is_head: bool,
    http10: bool,
}

impl Outgoing<'_> {
    /// Write `resp`; returns whether the connection can serve another request.
    /// `read`: the reading half when this loop holds it, to notice the client leaving.
    async fn write<B>(
        &self,
        resp: Response<B>,
        mut keep_alive: bool,
        mut read: Option<&mut OwnedReadHalf>,
        buf: &mut BytesMut,
    ) -> bool
    where
        B: Body<Data = Bytes> + CarriesHead,
        B::Error: Into<BoxError>,
    {
        let (mut parts, mut body) = resp.into_parts();
        let status = parts.status;
        // An upstream's head passed on as it came (its framing and hop-by-hop headers are
        // left out as it is written); the map holds what was added to it.
        let raw = body.take_head();
        let headers = &mut parts.headers;
        // Framing is this connection's to set (a handler forwards the upstream's headers).
        if !headers.is_empty() {
            headers.remove(TRANSFER_ENCODING);
        }
        let no_body = self.is_head
            || status.is_informational()
            || status == StatusCode::NO_CONTENT
            || status == StatusCode::NOT_MODIFIED;
        // A length written by `encode_head` (not inserted into the map: an insert into the
        // empty map of a passed-through head allocated it, and the value too).
        let mut length = None;
        let out = if no_body {
            Out::None
        } else if let Some(n) = content_length(headers) {
            Out::Length(n)
        } else if let Some(n) = body.size_hint().exact() {
            headers.remove(CONTENT_LENGTH);
            length = Some(n);
            Out::Length(n)
        } else if self.http10 {
            // A Content-Length that is not a number is not passed on.
            headers.remove(CONTENT_LENGTH);
            Out::Close
        } else {
            headers.remove(CONTENT_LENGTH);
            headers.insert(TRANSFER_ENCODING, HeaderValue::from_static("chunked"));
            Out::Chunked
        };
        keep_alive = keep_alive && out != Out::Close && !has_token(headers, &CONNECTION, "close");
        if !keep_alive {
            headers.insert(CONNECTION, HeaderValue::from_static("close"));
        }
        if !headers.contains_key(DATE) && !raw.as_ref().is_some_and(|r| r.seen().date) {
            headers.insert(DATE, date());
        }
        let mut head =
            Vec::with_capacity(64 + raw.as_ref().map_or(0, |r| r.size()) + 40 * headers.len());
        encode_head(status, raw.as_deref(), no_body, length, headers, &mut head);
        // Its bytes share the upstream connection's read buffer: let go of them before the
        // body is read into it (a stream's next reads can then reuse the buffer).
        drop(raw);
        if out == Out::None {
            // Dropped unpolled (an empty upstream body gave its connection back already,
            // see `proxy::h1client`).
            drop(body);
            return write_all(self.write, &mut [IoSlice::new(&head)])
                .await
                .is_ok()
                && keep_alive;
        }
        let mut body = std::pin::pin!(body);
        // A first frame that is ready now (all of a unary response) goes out with the head.
        let mut next = match body
            .as_mut()
            .poll_frame(&mut Context::from_waker(Waker::noop()))
        {
            Poll::Ready(frame) => Some(frame),
            Poll::Pending => None,
        };
        let mut head = Some(head);
        if next.is_none() {
            // The client sees the head now (time to first byte), not with the first chunk.
            if let Some(h) = head.take() {
                if write_all(self.write, &mut [IoSlice::new(&h)])
                    .await
                    .is_err()
                {
                    return false;
                }
            }
        }
        let mut written = 0u64;
        let mut terminated = false;
        loop {
            let frame = match next.take() {
                Some(frame) => frame,
                None => match read.as_deref_mut() {
                    Some(reader) => tokio::select! {
                        biased;
                        frame = std::future::poll_fn(|cx| body.as_mut().poll_frame(cx)) => frame,
                        () = client_gone(reader, buf) => return false,
                    },
                    None => std::future::poll_fn(|cx| body.as_mut().poll_frame(cx)).await,
                },
            };
            let data = match frame {
                None => break,
                Some(Err(e)) => {
                    let e: BoxError = e.into();
                    tracing::debug!(target: "server", error = %e, "response body failed; closing the connection");
                    // Without the chunked terminator the client sees a cut body.
                    let _ = self.flush_head(&mut head).await;
                    return false;
                }
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) if !data.is_empty() => data,
                    // Trailers are not forwarded; empty frames carry nothing.
                    _ => continue,
                },
            };
            written += data.len() as u64;
            let end = out == Out::Chunked && body.is_end_stream();
            let mut size = [0u8; 20];
            let pre = head.take();
            let chunked = out == Out::Chunked;
            let mut slices = [
                IoSlice::new(pre.as_deref().unwrap_or_default()),
                IoSlice::new(if chunked {
                    chunk_size(data.len(), &mut size)
                } else {
                    &[]
                }),
                IoSlice::new(&data),
                IoSlice::new(match (chunked, end) {
                    (true, true) => b"\r\n0\r\n\r\n",
                    (true, false) => b"\r\n",
                    _ => b"",
                }),
            ];
            if write_all(self.write, &mut slices).await.is_err() {
                return false;
            }
            terminated = end;
        }
        let mut tail: &[u8] = b"";
        if out == Out::Chunked && !terminated {
            tail = b"0\r\n\r\n";
        }
        let pre = head.take();
        let mut slices = [
            IoSlice::new(pre.as_deref().unwrap_or_default()),
            IoSlice::new(tail),
        ];
        if write_all(self.write, &mut slices).await.is_err() {
            return false;
        }
        if let Out::Length(n) = out {
            // A body that did not match its length leaves the client unsure where the
            // next response starts.
            keep_alive = keep_alive && written == n;
        }
        keep_alive
    }

    async fn flush_head(&self, head: &mut Option<Vec<u8>>) -> io::Result<()> {
        match head.take() {
            Some(h) => write_all(self.write, &mut [IoSlice::new(&h)]).await,
            None => Ok(()),
        }
    }
}

/// The status line and headers, as HTTP/1.1 writes them: a passed-through head's first
/// (its `Content-Length` only when the response has no body), then `length` as the
/// `Content-Length`, then the map's.
fn encode_head(
    status: StatusCode,
    raw: Option<&RawHead>,
    no_body: bool,
    length: Option<u64>,
    headers: &HeaderMap,
    out: &mut Vec<u8>,
) {
    if status == StatusCode::OK {
        // Most responses: one copy rather than five.
        out.extend_from_slice(b"HTTP/1.1 200 OK\r\n");
    } else {
        out.extend_from_slice(b"HTTP/1.1 ");
        out.extend_from_slice(status.as_str().as_bytes());
        out.push(b' ');
        out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    if let Some(raw) = raw {
        raw.write(out, no_body);
    }
    if let Some(n) = length {
        push_content_length(out, n);
    }
    for (name, value) in headers {
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

/// The `Date` header of now, formatted once per second per thread.
fn date() -> HeaderValue {
    thread_local! {
        static CACHED: RefCell<(u64, Option<HeaderValue>)> = const { RefCell::new((0, None)) };
    }
    let now = SystemTime::now();
    let secs = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    CACHED.with_borrow_mut(|(at, value)| match value {
        Some(v) if *at == secs => v.clone(),
        _ => {
            let v = HeaderValue::from_str(&httpdate::fmt_http_date(now))
                .unwrap_or_else(|_| HeaderValue::from_static("Thu, 01 Jan 1970 00:00:00 GMT"));
            *at = secs;
            *value = Some(v.clone());
            v
        }
    })
}

/// The error of a request body that cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum RecvError {
    #[error("the client closed the connection before the end of the request body")]
    Cut,
    #[error("the request body's chunked encoding is malformed ({0}); send valid chunks or Content-Length")]
    Chunked(#[from] crate::wire::Malformed),
    #[error("reading the request body failed: {0}")]
    Io(#[from] io::Error),
}

/// A request body from this connection.
#[derive(Debug)]
pub struct RecvBody {
    kind: RecvKind,
}

#[derive(Debug)]
enum RecvKind {
    /// Arrived with the head (or empty).
    Full(Option<Bytes>),
    /// Still arriving: read from the socket by the body.
    Streaming(Box<Streaming>),
}

#[derive(Debug)]
struct Streaming {
    /// The connection's reading half; `None` once given back.
    read: Option<OwnedReadHalf>,
    buf: BytesMut,
    decoder: Decoder,
    /// Gives the reading half and the buffer (with any bytes after the body) back to the
    /// connection.
    back: Option<oneshot::Sender<(OwnedReadHalf, BytesMut)>>,
}

impl Streaming {
    fn give_back(&mut self) {
        if let (Some(tx), Some(read)) = (self.back.take(), self.read.take()) {
            let _ = tx.send((read, std::mem::take(&mut self.buf)));
        }
    }
}

impl RecvBody {
    fn full(b: Bytes) -> Self {
        Self {
            kind: RecvKind::Full(Some(b).filter(|b| !b.is_empty())),
        }
    }

    fn streaming(
        read: OwnedReadHalf,
        buf: BytesMut,
        decoder: Decoder,
        back: oneshot::Sender<(OwnedReadHalf, BytesMut)>,
    ) -> Self {
        Self {
            kind: RecvKind::Streaming(Box::new(Streaming {
                read: Some(read),
                buf,
                decoder,
                back: Some(back),
            })),
        }
    }
}

impl Body for RecvBody {
    type Data = Bytes;
    type Error = RecvError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, RecvError>>> {
        let s = match &mut self.get_mut().kind {
            RecvKind::Full(b) => return Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            RecvKind::Streaming(s) => s,
        };
        loop {
            match s.decoder.step(&mut s.buf).map_err(RecvError::from) {
                Ok(Step::Data(data)) => {
                    if s.decoder.is_done() {
                        s.give_back();
                    }
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Ok(Step::End) => {
                    s.give_back();
                    return Poll::Ready(None);
                }
                Ok(Step::NeedMore) => {}
                Err(e) => return Poll::Ready(Some(Err(e))),
            }
            let Some(read) = s.read.as_mut() else {
                return Poll::Ready(None);
            };
            if s.buf.capacity() - s.buf.len() < HEAD_READ_BYTES / 4 {
                let want = match s.decoder {
                    Decoder::Length(left) => usize::try_from(left).unwrap_or(usize::MAX),
                    Decoder::Chunked(_) | Decoder::Eof => BODY_READ_BYTES,
                };
                s.buf.reserve(want.clamp(HEAD_READ_BYTES, BODY_READ_BYTES));
            }
            match ready!(tokio_util::io::poll_read_buf(
                Pin::new(read),
                cx,
                &mut s.buf
            )) {
                Ok(0) => return Poll::Ready(Some(Err(RecvError::Cut))),
                Ok(_) => {}
                Err(e) => return Poll::Ready(Some(Err(e.into()))),
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            RecvKind::Full(b) => b.is_none(),
            RecvKind::Streaming(s) => s.decoder.is_done(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            RecvKind::Full(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            RecvKind::Streaming(s) => match s.decoder {
                Decoder::Length(left) => SizeHint::with_exact(left),
                Decoder::Chunked(_) | Decoder::Eof => SizeHint::default(),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(raw: &[u8]) -> Result<Option<Head>, HeadError> {
        parse_head(&mut BytesMut::from(raw))
    }

    #[test]
    fn parses_a_request_head_and_leaves_the_body() {
        let mut buf = BytesMut::from(
            &b"POST /v1beta/models/m:generateContent?key=k HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nX-A: 1\r\nX-A: 2\r\n\r\n{}"[..],
        );
        let head = parse_head(&mut buf).expect("valid").expect("complete");
        assert_eq!(head.head.method, Method::POST);
        assert_eq!(head.head.target.path(), "/v1beta/models/m:generateContent");
        assert_eq!(head.head.target.query(), Some("key=k"));
        let x_a = http::HeaderName::from_static("x-a");
        assert_eq!(head.head.headers.get_all(&x_a).count(), 2);
        assert_eq!(head.framing, Framing::Length(2));
        assert!(head.keep_alive);
        assert_eq!(&buf[..], b"{}");
    }

    #[test]
    fn a_partial_head_waits_and_a_bad_one_is_refused() {
        assert!(matches!(parse(b"GET / HTTP/1.1\r\nHost: x\r\n"), Ok(None)));
        assert!(matches!(
            parse(b"GET / HTTP/1.1\r\nBad Header: x\r\n\r\n"),
            Err(HeadError::Malformed(_))
        ));
        let mut many = b"GET / HTTP/1.1\r\n".to_vec();
        for i in 0..=MAX_HEADERS {
            many.extend_from_slice(format!("x-{i}: v\r\n").as_bytes());
        }
        many.extend_from_slice(b"\r\n");
        let e = parse(&many).err().expect("too many headers");
        assert_eq!(e.status(), StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);
        let long = [
            b"GET / HTTP/1.1\r\nx: ".as_slice(),
            &vec![b'a'; MAX_HEAD_BYTES + 1],
        ]
        .concat();
        assert!(matches!(parse(&long), Err(HeadError::TooLarge)));
    }

    #[test]
    fn framing_refuses_what_could_smuggle_a_request() {
        for raw in [
            &b"POST / HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n"[..],
            b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n",
            b"POST / HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n",
            b"POST / HTTP/1.1\r\nContent-Length: +3\r\n\r\n",
            b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n",
        ] {
            assert!(matches!(parse(raw), Err(HeadError::Invalid(_))), "{raw:?}");
        }
        let head = parse(b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n")
            .expect("valid")
            .expect("complete");
        assert_eq!(head.framing, Framing::Chunked);
        let head = parse(b"GET / HTTP/1.0\r\n\r\n")
            .expect("valid")
            .expect("complete");
        assert!(!head.keep_alive, "HTTP/1.0 closes");
        let head = parse(b"GET / HTTP/1.1\r\nConnection: keep-alive, close\r\n\r\n")
            .expect("valid")
            .expect("complete");
        assert!(!head.keep_alive);
    }
}
