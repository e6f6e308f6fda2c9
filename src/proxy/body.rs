//! Bodies: the request body as forwarded (whole when small, else a read prefix followed by
//! the rest of the stream) and the response body (a fixed error/answer or a metered stream).

use super::metered::MeteredBody;
use crate::error::ProxyError;
use crate::server::{BodyError, ClientBody};
use bytes::{Bytes, BytesMut};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use std::collections::VecDeque;
use std::pin::Pin;
use std::task::{Context, Poll};

/// The body sent upstream.
#[derive(Debug)]
pub enum RequestBody {
    /// Known in full.
    Full(Option<Bytes>),
    /// Chunks already read, then the rest of the client's stream.
    Prefixed {
        /// What was read to look at the start of the body.
        prefix: VecDeque<Bytes>,
        /// The remainder, streamed as it comes.
        rest: ClientBody,
    },
}

/// A request body after reading up to `peek_bytes` of it.
#[derive(Debug)]
pub struct PeekedBody {
    /// Whether the whole body was read.
    pub complete: bool,
    /// Bytes read so far (the whole body when `complete`).
    pub head: Bytes,
    /// Total length when known (Content-Length, or the read length when complete).
    pub len: Option<u64>,
    /// The frames read, while the rest is to come (`rest`): forwarded before it. Empty for a
    /// body read whole, which goes on as `head`.
    chunks: VecDeque<Bytes>,
    rest: Option<ClientBody>,
}

impl PeekedBody {
    /// Read at most about `peek_bytes` of `body` (whole frames), refusing bodies whose
    /// declared or read length exceeds `max_bytes`.
    pub async fn read(
        mut body: ClientBody,
        content_length: Option<u64>,
        peek_bytes: usize,
        max_bytes: usize,
    ) -> Result<Self, ProxyError> {
        if content_length.is_some_and(|n| n > max_bytes as u64) {
            return Err(ProxyError::BodyTooLarge {
                limit: max_bytes,
                flag: "--max-body-bytes",
            });
        }
        // The first frame is kept apart: a body of one frame (the usual one) then costs no
        // allocation of the list.
        let mut first: Option<Bytes> = None;
        let mut chunks = VecDeque::new();
        let mut read = 0usize;
        let mut complete = body.is_end_stream();
        while !complete && read < peek_bytes {
            match body.frame().await {
                None => complete = true,
                Some(Err(e)) => return Err(ProxyError::BadRequestBody(e.to_string())),
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        read += data.len();
                        if read > max_bytes {
                            return Err(ProxyError::BodyTooLarge {
                                limit: max_bytes,
                                flag: "--max-body-bytes",
                            });
                        }
                        match first.take() {
                            None if chunks.is_empty() => first = Some(data),
                            earlier => {
                                chunks.extend(earlier);
                                chunks.push_back(data);
                            }
                        }
                    }
                    complete = complete || body.is_end_stream();
                }
            }
        }
        let head = match first {
            Some(only) => {
                if !complete {
                    chunks.push_back(only.clone());
                }
                only
            }
            None => concat(&chunks),
        };
        if complete {
            chunks.clear();
        }
        let len = if complete {
            Some(read as u64)
        } else {
            content_length
        };
        Ok(Self {
            complete,
            head,
            len,
            chunks,
            rest: if complete { None } else { Some(body) },
        })
    }

    /// A body known in full (a stored deferred request).
    pub fn from_bytes(b: Bytes) -> Self {
        Self {
            complete: true,
            len: Some(b.len() as u64),
            chunks: VecDeque::new(),
            head: b,
            rest: None,
        }
    }

    /// Read the rest too (needed to rewrite model names in the body), up to `max_bytes`.
    pub async fn read_all(mut self, max_bytes: usize) -> Result<Self, ProxyError> {
        if let Some(mut rest) = self.rest.take() {
            let mut buf = BytesMut::from(&self.head[..]);
            while let Some(frame) = rest.frame().await {
                let frame = frame.map_err(|e| ProxyError::BadRequestBody(e.to_string()))?;
                if let Ok(data) = frame.into_data() {
                    if buf.len() + data.len() > max_bytes {
                        return Err(ProxyError::BodyTooLarge {
                            limit: max_bytes,
                            flag: "--max-body-bytes",
                        });
                    }
                    buf.extend_from_slice(&data);
                }
            }
            self.head = buf.freeze();
            self.len = Some(self.head.len() as u64);
            self.chunks = VecDeque::new();
            self.complete = true;
        }
        Ok(self)
    }

    /// Own the bytes read so far instead of sharing the buffer they were read into. A
    /// parked request calls this: on HTTP/1.1 that buffer is the connection's read buffer
    /// (4 KiB ours, 8 KiB hyper's over TLS), which a request waiting for minutes should not
    /// pin. Returns the bytes it let go of (see `proxy::resume` for why they are kept a
    /// moment longer).
    pub fn detach(&mut self) -> Bytes {
        let old = std::mem::replace(&mut self.head, Bytes::new());
        self.head = Bytes::copy_from_slice(&old);
        for c in self.chunks.iter_mut() {
            *c = Bytes::copy_from_slice(c);
        }
        old
    }

    /// The body to forward, unchanged.
    pub fn into_forward(self) -> RequestBody {
        match self.rest {
            None => RequestBody::Full(Some(self.head).filter(|b| !b.is_empty())),
            Some(rest) => RequestBody::Prefixed {
                prefix: self.chunks,
                rest,
            },
        }
    }
}

fn concat(chunks: &VecDeque<Bytes>) -> Bytes {
    match chunks.len() {
        0 => Bytes::new(),
        1 => chunks[0].clone(),
        _ => {
            let mut b = BytesMut::with_capacity(chunks.iter().map(Bytes::len).sum());
            for c in chunks {
                b.extend_from_slice(c);
            }
            b.freeze()
        }
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        match self.get_mut() {
            RequestBody::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            RequestBody::Prefixed { prefix, rest } => match prefix.pop_front() {
                Some(b) => Poll::Ready(Some(Ok(Frame::data(b)))),
                None => Pin::new(rest).poll_frame(cx),
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            RequestBody::Full(b) => b.is_none(),
            RequestBody::Prefixed { prefix, rest } => prefix.is_empty() && rest.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            RequestBody::Full(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            RequestBody::Prefixed { prefix, rest } => {
                let p: u64 = prefix.iter().map(|b| b.len() as u64).sum();
                let h = rest.size_hint();
                let mut s = SizeHint::new();
                s.set_lower(h.lower() + p);
                if let Some(u) = h.upper() {
                    s.set_upper(u + p);
                }
                s
            }
        }
    }
}

/// The body sent to the client.
#[derive(Debug)]
pub enum ResponseBody {
    /// A body the proxy made (errors) or that needs no metering.
    Full(Option<Bytes>),
    /// The upstream's body, forwarded frame by frame while usage is read out of it.
    Metered(MeteredBody),
}

impl crate::wire::CarriesHead for ResponseBody {
    fn take_head(&mut self) -> Option<Box<crate::wire::RawHead>> {
        match self {
            ResponseBody::Metered(m) => m.take_head(),
            ResponseBody::Full(_) => None,
        }
    }
}

impl ResponseBody {
    /// A fixed body.
    pub fn full(b: Bytes) -> Self {
        ResponseBody::Full(Some(b).filter(|b| !b.is_empty()))
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        match self.get_mut() {
            ResponseBody::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            ResponseBody::Metered(m) => Pin::new(m).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ResponseBody::Full(b) => b.is_none(),
            ResponseBody::Metered(m) => m.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ResponseBody::Full(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            ResponseBody::Metered(m) => m.size_hint(),
        }
    }
}
