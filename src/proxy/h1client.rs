//! Our HTTP/1.1 client connection to the upstream (HTTP/2, which Google speaks, stays on
//! hyper's client; this serves plain-HTTP upstreams and TLS ones without h2).
//!
//! Why not hyper's `client::conn::http1`: it runs every connection in a task of its own and
//! talks to it through channels, so a request woke that task to write, and the response's
//! bytes went from it to the body through a second channel, waking the request's task again.
//! Here the request's own task writes the request (head and a body known in full in one
//! vectored write), reads the response head, and the body reads the socket itself; the
//! connection goes back to the pool the moment the body's last byte is decoded, and closes
//! when the body is dropped before that.
//!
//! An idle pooled connection has no task watching it: at checkout, tokio's cached readiness
//! tells whether anything arrived on it since (the upstream closed it, or sent bytes no
//! request asked for); such a connection is dropped, at no syscall.

use super::body::RequestBody;
use super::upstream::{Pool, UpstreamRequest};
use crate::wire::{
    chunk_size, content_length_in, has_token_in, header_slots, name_eq, push_content_length,
    write_all_to, Decoder, RawHead, Spans, Step,
};
use bytes::{Bytes, BytesMut};
use http::{HeaderValue, Method, Response, StatusCode, Version};
use http_body::{Body, Frame, SizeHint};
use hyper_rustls::MaybeHttpsStream;
use hyper_util::rt::TokioIo;
use std::future::Future;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll, Waker};
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// What the connector hands out, as a tokio stream.
type Io = TokioIo<MaybeHttpsStream<TokioIo<TcpStream>>>;

/// Largest response head.
const MAX_HEAD_BYTES: usize = 256 * 1024;
/// What one read asks for at least: one page, as nginx reads an upstream's response.
///
/// Not more: a fresh buffer is allocated for most responses (the last one's bytes are still
/// on their way to the client), and jemalloc serves sizes up to 4 KiB from its thread cache
/// on its fast path, while an 8 KiB buffer took its slow path to allocate and to free
/// (~220 instructions a response; benches/README.md, "Thirteenth round").
const READ_BYTES: usize = 4096;

/// An HTTP/1.1 connection to the upstream, idle (in the pool) or carrying one exchange.
pub struct H1Conn {
    /// Boxed: with TLS it is over 1 KiB, and a connection moves between the pool, the
    /// request and the body.
    io: Box<Io>,
    buf: BytesMut,
}

impl std::fmt::Debug for H1Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("H1Conn").finish_non_exhaustive()
    }
}

/// Why an exchange failed; `unsent` when the request surely did not reach the upstream
/// (its write failed), so that it may be sent again on another connection.
#[derive(Debug)]
pub struct SendError {
    pub error: BoxError,
    pub unsent: bool,
}

impl SendError {
    fn sent(e: impl Into<BoxError>) -> Self {
        Self {
            error: e.into(),
            unsent: false,
        }
    }
}

/// How the request body goes out.
enum Out {
    /// Known in full (possibly empty).
    Full(Option<Bytes>),
    /// Streamed: `Content-Length` when the client gave it, else chunked.
    Stream(RequestBody, Option<u64>),
}

impl H1Conn {
    pub fn new(io: MaybeHttpsStream<TokioIo<TcpStream>>) -> Self {
        Self {
            io: Box::new(TokioIo::new(io)),
            buf: BytesMut::new(),
        }
    }

    fn tcp(&self) -> &TcpStream {
        match self.io.inner() {
            MaybeHttpsStream::Http(tcp) => tcp.inner(),
            MaybeHttpsStream::Https(tls) => tls.inner().get_ref().0.inner().inner(),
        }
    }

    /// Whether this idle connection can take a request: nothing arrived on it since its
    /// last response (tokio's cached readiness, no syscall).
    ///
    /// Asked outside tokio's cooperative budget: a task that has used its budget (checking
    /// more than 128 closed connections in one go, after the upstream closed them all) gets
    /// `Pending` from any readiness poll, which would pass a closed connection as usable.
    pub fn is_usable(&self) -> bool {
        let tcp = self.tcp();
        let check = tokio::task::unconstrained(std::future::poll_fn(|cx| {
            Poll::Ready(tcp.poll_read_ready(cx).is_pending())
        }));
        match std::pin::pin!(check).poll(&mut Context::from_waker(Waker::noop())) {
            Poll::Ready(usable) => usable,
            Poll::Pending => false,
        }
    }

    /// Send `req` with `host` as its `Host` header (the client's is left out; kept when
    /// `host` is `None`) and read the response head. A body known in full stays in `req`
    /// (so that it can be sent again after an unsent failure); a streamed one is taken.
    pub async fn send(
        mut self,
        req: &mut UpstreamRequest,
        host: Option<&HeaderValue>,
        pool: &Arc<Pool>,
    ) -> Result<Response<H1Body>, SendError> {
        let out = match &mut req.body {
            RequestBody::Full(b) => Out::Full(b.clone()),
            streamed => {
                let body = std::mem::replace(streamed, RequestBody::Full(None));
                let len = body.size_hint().exact();
                Out::Stream(body, len)
            }
        };
        let mut head = Vec::with_capacity(128 + 48 * req.headers.len());
        encode_head(req, host, &out, &mut head);
        let written = match out {
            Out::Full(body) => {
                let body = body.unwrap_or_default();
                write_all_to(
                    &mut self.io,
                    &mut [IoSlice::new(&head), IoSlice::new(&body)],
                )
                .await
            }
            Out::Stream(body, len) => {
                if let Err(e) = write_all_to(&mut *self.io, &mut [IoSlice::new(&head)]).await {
                    return Err(SendError {
                        error: e.into(),
                        unsent: false,
                    });
                }
                return self
                    .finish_send(body, len.is_none(), &req.method, pool)
                    .await;
            }
        };
        if let Err(e) = written {
            return Err(SendError {
                error: e.into(),
                unsent: true,
            });
        }
        self.read_response(&req.method, pool).await
    }

    async fn finish_send(
        mut self,
        body: RequestBody,
        chunked: bool,
        method: &Method,
        pool: &Arc<Pool>,
    ) -> Result<Response<H1Body>, SendError> {
        let mut body = std::pin::pin!(body);
        while let Some(frame) = std::future::poll_fn(|cx| body.as_mut().poll_frame(cx)).await {
            let frame = frame.map_err(SendError::sent)?;
            let Ok(data) = frame.into_data() else {
                continue;
            };
            if data.is_empty() {
                continue;
            }
            let mut size = [0u8; 20];
            let mut slices = [
                IoSlice::new(if chunked {
                    chunk_size(data.len(), &mut size)
                } else {
                    &[]
                }),
                IoSlice::new(&data),
                IoSlice::new(if chunked { b"\r\n" } else { b"" }),
            ];
            write_all_to(&mut *self.io, &mut slices)
                .await
                .map_err(SendError::sent)?;
        }
        if chunked {
            write_all_to(&mut *self.io, &mut [IoSlice::new(b"0\r\n\r\n")])
                .await
                .map_err(SendError::sent)?;
        }
        self.read_response(method, pool).await
    }

    /// Read the response head (skipping interim 1xx responses) and frame its body.
    async fn read_response(
        mut self,
        method: &Method,
        pool: &Arc<Pool>,
    ) -> Result<Response<H1Body>, SendError> {
        loop {
            if !self.buf.is_empty() {
                match parse_response(&mut self.buf).map_err(SendError::sent)? {
                    Some((resp, _)) if resp.status().is_informational() => continue,
                    Some((resp, raw)) => return Ok(self.into_exchange(resp, raw, method, pool)),
                    None => {}
                }
            }
            if self.buf.capacity() - self.buf.len() < READ_BYTES / 4 {
                self.buf.reserve(READ_BYTES);
            }
            match self.io.read_buf(&mut self.buf).await {
                Ok(0) => {
                    return Err(SendError::sent(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the upstream closed the connection before a complete response head",
                    )))
                }
                Ok(_) => {}
                Err(e) => return Err(SendError::sent(e)),
            }
        }
    }

    /// The response with its body framed (RFC 9112 §6.3); a response without a body
    /// gives the connection back at once.
    fn into_exchange(
        self,
        resp: Response<()>,
        raw: RawHead,
        method: &Method,
        pool: &Arc<Pool>,
    ) -> Response<H1Body> {
        let seen = raw.seen();
        let status = resp.status();
        let decoder = if method == Method::HEAD
            || status == StatusCode::NO_CONTENT
            || status == StatusCode::NOT_MODIFIED
        {
            Decoder::Length(0)
        } else if let Some(te) = seen
            .transfer_encoding
            .then(|| raw.values("transfer-encoding").last())
            .flatten()
        {
            let chunked = te
                .rsplit(|&b| b == b',')
                .next()
                .is_some_and(|t| t.trim_ascii().eq_ignore_ascii_case(b"chunked"));
            if chunked {
                Decoder::Chunked(crate::wire::Chunk::Size)
            } else {
                Decoder::Eof
            }
        } else {
            match seen
                .content_length
                .then(|| content_length_in(raw.values("content-length")))
                .flatten()
            {
                Some(n) => Decoder::Length(n),
                None => Decoder::Eof,
            }
        };
        let reusable = resp.version() == Version::HTTP_11
            && decoder != Decoder::Eof
            && !(seen.connection && has_token_in(raw.values("connection"), "close"));
        let (parts, ()) = resp.into_parts();
        let mut body = H1Body {
            conn: Some(self),
            decoder,
            reusable,
            pool: pool.clone(),
            head: Some(Box::new(raw)),
        };
        if body.decoder.is_done() {
            body.finish();
        }
        Response::from_parts(parts, body)
    }
}

/// The request head: the request line, the end-to-end headers, and the framing of `out`.
fn encode_head(req: &UpstreamRequest, host: Option<&HeaderValue>, out: &Out, head: &mut Vec<u8>) {
    head.extend_from_slice(req.method.as_str().as_bytes());
    head.push(b' ');
    head.extend_from_slice(req.target.as_bytes());
    head.extend_from_slice(b" HTTP/1.1\r\n");
    if let Some(host) = host {
        head.extend_from_slice(b"host: ");
        head.extend_from_slice(host.as_bytes());
        head.extend_from_slice(b"\r\n");
    }
    req.headers.write_lines(head, |name| {
        // The framing is this connection's to say, and so is `Host` when it has one. (By
        // length first: most names are compared with nothing.)
        !match name.len() {
            4 => host.is_some() && name_eq(name, b"host"),
            14 => name_eq(name, b"content-length"),
            17 => name_eq(name, b"transfer-encoding"),
            _ => false,
        }
    });
    let length = match out {
        Out::Full(b) => Some(b.as_ref().map_or(0, |b| b.len() as u64)),
        Out::Stream(_, len) => *len,
    };
    match length {
        // No body on a method that has none: no header (as hyper did).
        Some(0)
            if matches!(
                req.method,
                Method::GET | Method::HEAD | Method::DELETE | Method::OPTIONS
            ) => {}
        Some(n) => push_content_length(head, n),
        None => head.extend_from_slice(b"transfer-encoding: chunked\r\n"),
    }
    head.extend_from_slice(b"\r\n");
}

/// A response head at the start of `buf`, taken out of `buf` when complete.
/// Its headers stay as they came ([`RawHead`], handed to the body): the response's map is
/// empty.
fn parse_response(buf: &mut BytesMut) -> Result<Option<(Response<()>, RawHead)>, BoxError> {
    let mut headers = header_slots();
    let mut resp = httparse::Response::new(&mut []);
    let len = match httparse::ParserConfig::default().parse_response_with_uninit_headers(
        &mut resp,
        buf,
        &mut headers,
    ) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() > MAX_HEAD_BYTES => {
            return Err("the upstream's response head is larger than 256 KiB".into())
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err(format!("the upstream's response head is malformed: {e}").into()),
    };
    let status = StatusCode::from_u16(resp.code.unwrap_or(0))
        .map_err(|_| "the upstream's response has an invalid status code")?;
    let version = match resp.version {
        Some(0) => Version::HTTP_10,
        _ => Version::HTTP_11,
    };
    let spans = Spans::of(buf, resp.headers);
    let head = buf.split_to(len).freeze();
    let mut out = Response::new(());
    *out.status_mut() = status;
    *out.version_mut() = version;
    Ok(Some((out, RawHead::new(head, spans))))
}

/// A response body read from its connection, which goes back to the pool at the body's end.
pub struct H1Body {
    /// `None` once the body ended (the connection went back, or closed).
    conn: Option<H1Conn>,
    decoder: Decoder,
    /// Whether the connection can take another request after this body.
    reusable: bool,
    pool: Arc<Pool>,
    /// The response's headers, as they came (the response's map is empty).
    head: Option<Box<RawHead>>,
}

impl crate::wire::CarriesHead for H1Body {
    fn take_head(&mut self) -> Option<Box<RawHead>> {
        self.head.take()
    }

    fn head_mut(&mut self) -> Option<&mut RawHead> {
        self.head.as_deref_mut()
    }
}

impl std::fmt::Debug for H1Body {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("H1Body")
            .field("decoder", &self.decoder)
            .finish_non_exhaustive()
    }
}

impl H1Body {
    /// The body was read to its end: the connection goes back (holding no buffer) if it
    /// can take another request and nothing followed the body.
    fn finish(&mut self) {
        if let Some(mut conn) = self.conn.take() {
            if self.reusable && conn.buf.is_empty() {
                conn.buf = BytesMut::new();
                self.pool.put(conn);
            }
        }
    }
}

impl Body for H1Body {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        loop {
            let Some(conn) = this.conn.as_mut() else {
                return Poll::Ready(None);
            };
            match this.decoder.step(&mut conn.buf) {
                Ok(Step::Data(data)) => {
                    if this.decoder.is_done() {
                        this.finish();
                    }
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Ok(Step::End) => {
                    this.finish();
                    return Poll::Ready(None);
                }
                Ok(Step::NeedMore) => {}
                Err(e) => {
                    this.conn = None;
                    return Poll::Ready(Some(Err(format!(
                        "the upstream's chunked body is malformed: {e}"
                    )
                    .into())));
                }
            }
            if conn.buf.capacity() - conn.buf.len() < READ_BYTES / 4 {
                conn.buf.reserve(READ_BYTES);
            }
            match ready!(tokio_util::io::poll_read_buf(
                Pin::new(&mut *conn.io),
                cx,
                &mut conn.buf
            )) {
                Ok(0) if this.decoder == Decoder::Eof => {
                    // The end of a body delimited by the connection's close.
                    this.conn = None;
                    this.decoder = Decoder::Length(0);
                    return Poll::Ready(None);
                }
                Ok(0) => {
                    this.conn = None;
                    return Poll::Ready(Some(Err(
                        "the upstream closed the connection before the end of the body".into(),
                    )));
                }
                Ok(_) => {}
                Err(e) => {
                    this.conn = None;
                    return Poll::Ready(Some(Err(e.into())));
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.decoder.is_done() || (self.conn.is_none() && self.decoder != Decoder::Eof)
    }

    fn size_hint(&self) -> SizeHint {
        match self.decoder {
            Decoder::Length(n) => SizeHint::with_exact(n),
            _ => SizeHint::default(),
        }
    }
}
