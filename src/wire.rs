//! HTTP/1.1 wire pieces shared by our server connection (`server::http1`) and our upstream
//! client connection (`proxy::h1client`): body decoding (`Content-Length`, `chunked`, or
//! until close), chunk-size lines, and vectored writes.

use bytes::{Bytes, BytesMut};
use http::header::{HeaderMap, HeaderName, HeaderValue, CONTENT_LENGTH};
use std::io::{self, IoSlice};
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::net::tcp::OwnedWriteHalf;

/// Where a chunked body's decoder is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Chunk {
    /// Before a chunk-size line.
    Size,
    /// Inside a chunk's data, with this much left.
    Data(u64),
    /// After a chunk's data: its CRLF.
    DataEnd,
    /// After the last chunk: trailer lines until an empty one.
    Trailers,
    /// After the whole body.
    Done,
}

/// The decoder of a message body (request or response) as it arrives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decoder {
    /// `Content-Length`, with this much left.
    Length(u64),
    /// `Transfer-Encoding: chunked`.
    Chunked(Chunk),
    /// Until the connection closes (a response with neither header).
    Eof,
}

/// What a decoding step found in the buffer.
pub enum Step {
    /// Body bytes.
    Data(Bytes),
    /// The buffer holds no more of the body: read.
    NeedMore,
    /// The body is complete.
    End,
}

/// Longest chunk-size or trailer line accepted.
pub const MAX_LINE: usize = 4096;

/// A chunked body that does not follow RFC 9112 §7.1.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Malformed(pub &'static str);

impl Decoder {
    /// Whether the whole body was decoded.
    pub fn is_done(&self) -> bool {
        matches!(self, Decoder::Length(0) | Decoder::Chunked(Chunk::Done))
    }

    /// Take the next piece of the body out of `buf`.
    pub fn step(&mut self, buf: &mut BytesMut) -> Result<Step, Malformed> {
        loop {
            match self {
                Decoder::Length(0) | Decoder::Chunked(Chunk::Done) => return Ok(Step::End),
                Decoder::Eof => {
                    if buf.is_empty() {
                        return Ok(Step::NeedMore);
                    }
                    return Ok(Step::Data(buf.split().freeze()));
                }
                Decoder::Length(left) => {
                    if buf.is_empty() {
                        return Ok(Step::NeedMore);
                    }
                    let take = buf.len().min(usize::try_from(*left).unwrap_or(usize::MAX));
                    *left -= take as u64;
                    return Ok(Step::Data(buf.split_to(take).freeze()));
                }
                Decoder::Chunked(Chunk::Data(left)) => {
                    if buf.is_empty() {
                        return Ok(Step::NeedMore);
                    }
                    let take = buf.len().min(usize::try_from(*left).unwrap_or(usize::MAX));
                    *left -= take as u64;
                    if *left == 0 {
                        *self = Decoder::Chunked(Chunk::DataEnd);
                    }
                    return Ok(Step::Data(buf.split_to(take).freeze()));
                }
                Decoder::Chunked(Chunk::DataEnd) => match buf.first() {
                    None => return Ok(Step::NeedMore),
                    Some(b'\n') => {
                        let _ = buf.split_to(1);
                        *self = Decoder::Chunked(Chunk::Size);
                    }
                    Some(b'\r') if buf.len() < 2 => return Ok(Step::NeedMore),
                    Some(b'\r') if buf[1] == b'\n' => {
                        let _ = buf.split_to(2);
                        *self = Decoder::Chunked(Chunk::Size);
                    }
                    Some(_) => return Err(Malformed("a chunk's data is longer than its size")),
                },
                Decoder::Chunked(state @ (Chunk::Size | Chunk::Trailers)) => {
                    let Some(line) = take_line(buf)? else {
                        return Ok(Step::NeedMore);
                    };
                    if *state == Chunk::Trailers {
                        if line.is_empty() {
                            *self = Decoder::Chunked(Chunk::Done);
                        }
                        continue;
                    }
                    let digits = line.split(|&b| b == b';').next().unwrap_or_default();
                    let digits = std::str::from_utf8(digits)
                        .map_err(|_| Malformed("a chunk size is not hexadecimal"))?
                        .trim();
                    let size = u64::from_str_radix(digits, 16)
                        .map_err(|_| Malformed("a chunk size is not hexadecimal"))?;
                    *self = Decoder::Chunked(if size == 0 {
                        Chunk::Trailers
                    } else {
                        Chunk::Data(size)
                    });
                }
            }
        }
    }
}

/// The next line of `buf` without its line end, taken out of `buf`.
fn take_line(buf: &mut BytesMut) -> Result<Option<Bytes>, Malformed> {
    let Some(end) = memchr::memchr(b'\n', buf) else {
        if buf.len() > MAX_LINE {
            return Err(Malformed("a chunk-size or trailer line is too long"));
        }
        return Ok(None);
    };
    let mut line = buf.split_to(end + 1).freeze();
    line.truncate(end);
    if line.last() == Some(&b'\r') {
        line.truncate(end - 1);
    }
    Ok(Some(line))
}

/// Append a `Content-Length` line for `n` bytes (with `itoa`: `write!` went through `fmt`,
/// 330 instructions).
pub fn push_content_length(out: &mut Vec<u8>, n: u64) {
    out.extend_from_slice(b"content-length: ");
    out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
    out.extend_from_slice(b"\r\n");
}

/// `{len:X}\r\n` without allocating.
pub fn chunk_size(len: usize, out: &mut [u8; 20]) -> &[u8] {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    let mut i = out.len() - 2;
    out[i] = b'\r';
    out[i + 1] = b'\n';
    let mut n = len;
    loop {
        i -= 1;
        out[i] = HEX[n & 0xf];
        n >>= 4;
        if n == 0 {
            break;
        }
    }
    &out[i..]
}

/// Write all of `bufs` (empty slices allowed), in as few `writev` calls as the socket
/// takes; nothing at all when they are all empty.
pub async fn write_all(stream: &OwnedWriteHalf, mut bufs: &mut [IoSlice<'_>]) -> io::Result<()> {
    // Drops the leading empty slices.
    IoSlice::advance_slices(&mut bufs, 0);
    while !bufs.is_empty() {
        match stream.try_write_vectored(bufs) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => IoSlice::advance_slices(&mut bufs, n),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => stream.writable().await?,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// [`write_all`] for any stream (TLS included): vectored writes, then a flush.
pub async fn write_all_to<W: AsyncWrite + Unpin>(
    io: &mut W,
    mut bufs: &mut [IoSlice<'_>],
) -> io::Result<()> {
    IoSlice::advance_slices(&mut bufs, 0);
    while !bufs.is_empty() {
        match io.write_vectored(bufs).await? {
            0 => return Err(io::ErrorKind::WriteZero.into()),
            n => IoSlice::advance_slices(&mut bufs, n),
        }
    }
    io.flush().await
}

/// Most headers in a message head.
pub const MAX_HEADERS: usize = 100;

/// Room for `MAX_HEADERS` parsed headers, left uninitialised: httparse writes only the
/// headers it finds, and zeroing 100 of them (3.2 KiB) cost more than parsing a short head.
pub fn header_slots<'b>() -> [std::mem::MaybeUninit<httparse::Header<'b>>; MAX_HEADERS] {
    [const { std::mem::MaybeUninit::uninit() }; MAX_HEADERS]
}

/// Where a parsed head's header names and values lie in the buffer it was parsed from, so
/// that the map can be built from slices of that buffer once it is frozen (no copies).
/// One entry per header of the head (a fixed array of `MAX_HEADERS` was zeroed per parse).
#[derive(Debug, Clone)]
pub struct Spans(Vec<[usize; 4]>);

impl Spans {
    /// The offsets of `headers` (parsed by httparse out of `buf`) in `buf`.
    pub fn of(buf: &[u8], headers: &[httparse::Header<'_>]) -> Self {
        Self(
            headers
                .iter()
                .map(|h| {
                    let (n0, n1) = offsets(buf, h.name.as_bytes());
                    let (v0, v1) = offsets(buf, h.value);
                    [n0, n1, v0, v1]
                })
                .collect(),
        )
    }

    /// The header map, its values slices of `head` (the buffer, frozen), with room for
    /// `extra` more headers (those the caller adds: no re-hashing of a grown map). A header
    /// `HeaderName` or `HeaderValue` refuses is left out (none: httparse checked them by the
    /// same rules).
    pub fn into_map(&self, head: &Bytes, extra: usize) -> HeaderMap {
        let mut map = HeaderMap::with_capacity(self.0.len() + extra);
        for &[n0, n1, v0, v1] in &self.0 {
            if let (Ok(name), Ok(value)) = (
                HeaderName::from_bytes(&head[n0..n1]),
                HeaderValue::from_maybe_shared(head.slice(v0..v1)),
            ) {
                map.append(name, value);
            }
        }
        map
    }

    /// The values of the headers of `head` named `name` (any case), in order, without a map
    /// (no hashing: a head has a few headers).
    pub fn values<'a>(
        &'a self,
        head: &'a [u8],
        name: &'a str,
    ) -> impl DoubleEndedIterator<Item = &'a [u8]> {
        self.ranges(head, name).map(move |(v0, v1)| &head[v0..v1])
    }

    /// The value ranges of the headers named `name` (any case), in order.
    pub fn ranges<'a>(
        &'a self,
        head: &'a [u8],
        name: &'a str,
    ) -> impl DoubleEndedIterator<Item = (usize, usize)> + 'a {
        self.0
            .iter()
            .filter(move |&&[n0, n1, ..]| name_eq(&head[n0..n1], name.as_bytes()))
            .map(|&[.., v0, v1]| (v0, v1))
    }

    /// Every header's name.
    pub fn names<'a>(&'a self, head: &'a [u8]) -> impl Iterator<Item = &'a [u8]> {
        self.0.iter().map(move |&[n0, n1, ..]| &head[n0..n1])
    }

    /// Append the headers whose name `keep` accepts to `out`, as `name: value\r\n` lines.
    /// Kept headers that stand in `head` as such lines, one right after the other, go in
    /// one copy: a copy per piece was four `memcpy` calls a header.
    pub fn write_lines(&self, head: &[u8], out: &mut Vec<u8>, mut keep: impl FnMut(&[u8]) -> bool) {
        // The run of kept lines not copied yet: `head[from..to]`.
        let mut run: Option<(usize, usize)> = None;
        let flush = |run: &mut Option<(usize, usize)>, out: &mut Vec<u8>| {
            if let Some(line) = run.take().and_then(|(from, to)| head.get(from..to)) {
                out.extend_from_slice(line);
            }
        };
        for &[n0, n1, v0, v1] in &self.0 {
            let name = &head[n0..n1];
            if !keep(name) {
                continue;
            }
            let as_written =
                head.get(n1..v0) == Some(b": ") && head.get(v1..v1 + 2) == Some(b"\r\n");
            match &mut run {
                Some((_, to)) if as_written && *to == n0 => *to = v1 + 2,
                _ => {
                    flush(&mut run, out);
                    if as_written {
                        run = Some((n0, v1 + 2));
                    } else {
                        push_line(out, name, &head[v0..v1]);
                    }
                }
            }
        }
        flush(&mut run, out);
    }

    /// Keep only the headers whose name `keep` accepts.
    pub fn retain(&mut self, head: &[u8], mut keep: impl FnMut(&[u8]) -> bool) {
        self.0.retain(|&[n0, n1, ..]| keep(&head[n0..n1]));
    }

    /// How many headers.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Which of the framing headers the head has (see [`Seen`]), without a map.
    pub fn seen(&self, head: &[u8]) -> Seen {
        let mut seen = Seen::default();
        for &[n0, n1, ..] in &self.0 {
            seen.note(&head[n0..n1]);
        }
        seen
    }
}

/// Which of the headers that frame a message or its connection a head has, noted as it is
/// parsed: the hot path then looks up only those that are there (a lookup hashes the name;
/// most heads have neither `Transfer-Encoding` nor `Connection` nor `Expect`).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Seen {
    pub content_length: bool,
    pub transfer_encoding: bool,
    pub connection: bool,
    pub expect: bool,
    pub date: bool,
}

impl Seen {
    /// A length, then one comparison without case (no hashing).
    fn note(&mut self, name: &[u8]) {
        let (flag, of) = match name.len() {
            4 => (&mut self.date, "date"),
            6 => (&mut self.expect, "expect"),
            10 => (&mut self.connection, "connection"),
            14 => (&mut self.content_length, "content-length"),
            17 => (&mut self.transfer_encoding, "transfer-encoding"),
            _ => return,
        };
        *flag |= name_eq(name, of.as_bytes());
    }
}

/// A response head passed on as the upstream sent it: its header lines stay bytes of the
/// buffer they were read into, and the proxy's own headers are appended as encoded lines.
///
/// Building an `http::HeaderMap` of the upstream's headers (a name lookup, a hash and a
/// value check per header), inserting the proxy's headers into it and encoding it again
/// for the client was a sixth of a proxied request's instructions (benches/README.md,
/// "Seventh round"). Carried by the response's body ([`CarriesHead`]; the response's map
/// holds only headers added to it): the HTTP/1.1 server writes it as it is
/// ([`RawHead::write`]), and [`RawHead::into_map`] gives a map where one is needed (HTTP/2
/// and TLS clients, served by hyper; deferred jobs; an upload URL to rewrite).
///
/// What it passes on (both ways alike, see [`RawHead::passes`]): every header but the
/// hop-by-hop ones (RFC 9110 §7.6.1, with those `Connection` names, and `x-agent-id`),
/// `Content-Length` (the server frames the body it sends), and any `x-budget-*` of the
/// upstream's (the proxy's own say what this proxy decided). httparse checked names and
/// values by the same rules as `HeaderName` and `HeaderValue`.
#[derive(Debug, Clone)]
pub struct RawHead {
    head: Bytes,
    spans: Spans,
    seen: Seen,
    /// The proxy's headers, as `name: value\r\n` lines.
    extra: Vec<u8>,
}

/// `x` with its ASCII upper-case letters made lower case, eight bytes at once (other
/// bytes, non-ASCII ones too, as they are).
#[inline(always)]
fn lower_word(x: u64) -> u64 {
    const ONES: u64 = 0x0101_0101_0101_0101;
    let low7 = x & (ONES * 0x7f);
    // The high bit of each byte: set when its low 7 bits are at least `A`, resp. above `Z`
    // (no sum carries into the next byte).
    let ge_a = low7 + ONES * (0x80 - u64::from(b'A'));
    let gt_z = low7 + ONES * (0x7f - u64::from(b'Z'));
    let upper = ge_a & !gt_z & !x & (ONES * 0x80);
    x | (upper >> 2)
}

/// `a.eq_ignore_ascii_case(b)`, eight bytes at a time: header names are compared on every
/// request (`content-length` byte by byte was ~140 instructions).
#[inline]
pub fn name_eq(a: &[u8], b: &[u8]) -> bool {
    let n = a.len();
    if n != b.len() {
        return false;
    }
    if n < 8 {
        return a.eq_ignore_ascii_case(b);
    }
    let word = |s: &[u8], i: usize| {
        let mut w = [0u8; 8];
        w.copy_from_slice(&s[i..i + 8]);
        lower_word(u64::from_le_bytes(w))
    };
    let mut i = 0;
    while i + 8 < n {
        if word(a, i) != word(b, i) {
            return false;
        }
        i += 8;
    }
    // The last eight bytes (overlapping the word before when `n` is not a multiple of 8).
    word(a, n - 8) == word(b, n - 8)
}

/// Whether `name` (any case) is a hop-by-hop header (RFC 9110 §7.6.1; those a `Connection`
/// header names are the caller's to add), or `x-agent-id` (consumed by the proxy, like the
/// `/agents/{id}` prefix: the agent's name is not Google's business). By length first:
/// most names are compared with nothing.
pub fn is_hop_by_hop(name: &[u8]) -> bool {
    let is = |n: &str| name_eq(name, n.as_bytes());
    match name.len() {
        2 => is("te"),
        7 => is("trailer") || is("upgrade"),
        10 => is("x-agent-id") || is("connection") || is("keep-alive"),
        16 => is("proxy-connection"),
        17 => is("transfer-encoding"),
        18 => is("proxy-authenticate"),
        19 => is("proxy-authorization"),
        _ => false,
    }
}

/// Remove hop-by-hop headers (RFC 9110 §7.6.1), including those named in `Connection`,
/// and `x-agent-id` (consumed by the proxy, like the `/agents/{id}` prefix).
pub fn strip_hop_by_hop(h: &mut HeaderMap) {
    let hop = |k: &HeaderName| is_hop_by_hop(k.as_str().as_bytes());
    // One pass over the (few) names first: most messages carry none of them.
    if !h.keys().any(hop) {
        return;
    }
    if h.contains_key(http::header::CONNECTION) {
        let named: Vec<HeaderName> = h
            .get_all(http::header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
            .collect();
        for n in named {
            h.remove(n);
        }
    }
    let named: Vec<HeaderName> = h.keys().filter(|k| hop(k)).cloned().collect();
    for n in named {
        h.remove(n);
    }
}

/// The names [`is_hop_by_hop`] must tell (its test holds it to this list).
#[cfg(test)]
const HOP_BY_HOP: [&str; 10] = [
    "x-agent-id",
    "connection",
    "proxy-connection",
    "keep-alive",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "proxy-authorization",
    "proxy-authenticate",
];

impl RawHead {
    /// The head of `spans`, parsed out of `head`.
    pub fn new(head: Bytes, spans: Spans) -> Self {
        let seen = spans.seen(&head);
        Self {
            head,
            spans,
            seen,
            extra: Vec::new(),
        }
    }

    /// Which framing headers it has.
    pub fn seen(&self) -> Seen {
        self.seen
    }

    /// At most the bytes [`RawHead::write`] writes.
    pub fn size(&self) -> usize {
        self.head.len() + self.extra.len()
    }

    /// The values of the headers named `name` (any case), in order.
    pub fn values<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a [u8]> {
        self.spans.values(&self.head, name)
    }

    /// Whether a header named `name` is there.
    pub fn has(&self, name: &str) -> bool {
        self.values(name).next().is_some()
    }

    /// Add a header of the proxy's; a value `HeaderValue` would refuse (a control
    /// character) is left out, as a failed `HeaderValue::from_bytes` would be.
    pub fn push(&mut self, name: &HeaderName, value: &[u8]) {
        if !value
            .iter()
            .all(|&b| b == b'\t' || (b >= 0x20 && b != 0x7f))
        {
            return;
        }
        if self.extra.is_empty() {
            // Room for the proxy's few headers at once (growing line by line reallocated
            // at each).
            self.extra.reserve(160);
        }
        push_line(&mut self.extra, name.as_str().as_bytes(), value);
    }

    /// The names `Connection` lists (hop-by-hop too).
    fn connection_names(&self) -> Vec<&[u8]> {
        if !self.seen.connection {
            return Vec::new();
        }
        self.values("connection")
            .flat_map(|v| v.split(|&b| b == b','))
            .map(<[u8]>::trim_ascii)
            .collect()
    }

    /// Whether the upstream's header `name` is passed on (`length`: keep `Content-Length`,
    /// for a response without a body, whose length says what a GET would have sent).
    fn passes(name: &[u8], length: bool, connection: &[&[u8]]) -> bool {
        !(is_hop_by_hop(name)
            || (!length && name_eq(name, b"content-length"))
            || name
                .get(..9)
                .is_some_and(|p| p.eq_ignore_ascii_case(b"x-budget-"))
            || connection.iter().any(|n| name_eq(name, n)))
    }

    /// Append the header lines to `out`: the upstream's that pass, then the proxy's.
    pub fn write(&self, out: &mut Vec<u8>, length: bool) {
        let connection = self.connection_names();
        self.spans.write_lines(&self.head, out, |name| {
            Self::passes(name, length, &connection)
        });
        out.extend_from_slice(&self.extra);
    }

    /// The same headers in `map` (the upstream's appended, then the proxy's inserted over
    /// any of the same name), `Content-Length` kept: a map's user frames by it.
    pub fn into_map(self, map: &mut HeaderMap) {
        let connection = self.connection_names();
        for &[n0, n1, v0, v1] in &self.spans.0 {
            if !Self::passes(&self.head[n0..n1], true, &connection) {
                continue;
            }
            if let (Ok(name), Ok(value)) = (
                HeaderName::from_bytes(&self.head[n0..n1]),
                HeaderValue::from_maybe_shared(self.head.slice(v0..v1)),
            ) {
                map.append(name, value);
            }
        }
        for line in self.extra.split(|&b| b == b'\n') {
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            let Some(colon) = line.iter().position(|&b| b == b':') else {
                continue;
            };
            if let (Ok(name), Ok(value)) = (
                HeaderName::from_bytes(&line[..colon]),
                HeaderValue::from_bytes(line[colon + 1..].trim_ascii_start()),
            ) {
                map.insert(name, value);
            }
        }
    }
}

/// A response body that may carry its response's head as the upstream sent it (see
/// [`RawHead`]). The head travels with the body rather than in the response's extensions:
/// a first insert into `http::Extensions` allocates and hashes (600 instructions a request).
pub trait CarriesHead {
    /// The head, taken out (the response's map then misses its headers).
    fn take_head(&mut self) -> Option<Box<RawHead>> {
        None
    }

    /// The head, to add to.
    fn head_mut(&mut self) -> Option<&mut RawHead> {
        None
    }
}

impl CarriesHead for http_body_util::Full<Bytes> {}

/// Give `resp` its passed-through head as map entries (see [`RawHead`]), for whatever
/// needs a map rather than the HTTP/1.1 server.
pub fn head_into_map<B: CarriesHead>(resp: &mut http::Response<B>) {
    if let Some(raw) = resp.body_mut().take_head() {
        let mut map = HeaderMap::with_capacity(raw.spans.0.len() + 6);
        raw.into_map(&mut map);
        // Headers added after the raw head replace its headers of the same name.
        let mut last: Option<HeaderName> = None;
        for (name, value) in std::mem::take(resp.headers_mut()) {
            match name {
                Some(name) => {
                    map.insert(name.clone(), value);
                    last = Some(name);
                }
                // Another value of the same name.
                None => {
                    if let Some(name) = &last {
                        map.append(name.clone(), value);
                    }
                }
            }
        }
        *resp.headers_mut() = map;
    }
}

/// A header value as text, as `HeaderValue::to_str` reads it: visible ASCII, spaces and
/// tabs only (`None` otherwise).
pub fn value_str(v: &[u8]) -> Option<&str> {
    if v.iter().all(|&b| b == b'\t' || (0x20..0x7f).contains(&b)) {
        std::str::from_utf8(v).ok()
    } else {
        None
    }
}

/// Append the header line `name: value\r\n`.
pub fn push_line(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// Where `part` (a slice of `buf`) lies in `buf`; an empty span at 0 when it is not in it.
pub fn offsets(buf: &[u8], part: &[u8]) -> (usize, usize) {
    (part.as_ptr() as usize)
        .checked_sub(buf.as_ptr() as usize)
        .filter(|start| start + part.len() <= buf.len())
        .map_or((0, 0), |start| (start, start + part.len()))
}

/// Whether the comma-separated values of `name` include `token` (any case), as
/// `Connection: close`.
pub fn has_token(map: &HeaderMap, name: &HeaderName, token: &str) -> bool {
    has_token_in(map.get_all(name).iter().map(HeaderValue::as_bytes), token)
}

/// [`has_token`] over a header's values.
pub fn has_token_in<'a>(mut values: impl Iterator<Item = &'a [u8]>, token: &str) -> bool {
    values.any(|v| {
        v.split(|&b| b == b',')
            .any(|t| t.trim_ascii().eq_ignore_ascii_case(token.as_bytes()))
    })
}

/// A message's `Content-Length`: `None` when absent, not a number, or given several
/// times with different values.
pub fn content_length(headers: &HeaderMap) -> Option<u64> {
    content_length_in(
        headers
            .get_all(CONTENT_LENGTH)
            .iter()
            .map(HeaderValue::as_bytes),
    )
}

/// [`content_length`] over the header's values.
pub fn content_length_in<'a>(mut values: impl Iterator<Item = &'a [u8]>) -> Option<u64> {
    let number = |v: &[u8]| std::str::from_utf8(v).ok()?.trim().parse::<u64>().ok();
    let n = number(values.next()?)?;
    values.all(|v| number(v) == Some(n)).then_some(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A pair of names: `a`, and `a` with the case of some letters flipped and maybe one
    /// byte changed (any byte, non-ASCII too).
    fn name_pairs() -> impl proptest::strategy::Strategy<Value = (Vec<u8>, Vec<u8>)> {
        use proptest::prelude::*;
        (
            proptest::collection::vec(any::<u8>(), 0..40),
            proptest::collection::vec(any::<bool>(), 40),
            proptest::option::of((any::<usize>(), any::<u8>())),
        )
            .prop_map(|(a, flips, change)| {
                let mut b: Vec<u8> = a
                    .iter()
                    .zip(&flips)
                    .map(|(&c, &flip)| {
                        if flip && c.is_ascii_alphabetic() {
                            c ^ 0x20
                        } else {
                            c
                        }
                    })
                    .collect();
                if let Some((i, c)) = change.filter(|_| !b.is_empty()) {
                    let i = i % b.len();
                    b[i] = c;
                }
                (a, b)
            })
    }

    #[test]
    fn header_lines_are_written_as_they_stand_or_one_by_one() {
        let head: &[u8] = b"GET / HTTP/1.1\r\nA: 1\r\nSkip: 3\r\nB: 2\r\nC:4\r\nD:   5  \r\nE: 6\nF: 7\r\nG: \r\nH: 8\r\n\r\n";
        let mut slots = header_slots();
        let mut req = httparse::Request::new(&mut []);
        req.parse_with_uninit_headers(head, &mut slots)
            .expect("a valid head");
        let spans = Spans::of(head, req.headers);
        let keep = |name: &[u8]| name != b"Skip";
        let mut out = Vec::new();
        spans.write_lines(head, &mut out, keep);
        // As written line by line.
        let mut expected = Vec::new();
        for &[n0, n1, v0, v1] in &spans.0 {
            if keep(&head[n0..n1]) {
                push_line(&mut expected, &head[n0..n1], &head[v0..v1]);
            }
        }
        assert_eq!(
            String::from_utf8_lossy(&out),
            "A: 1\r\nB: 2\r\nC: 4\r\nD: 5\r\nE: 6\r\nF: 7\r\nG: \r\nH: 8\r\n"
        );
        assert_eq!(out, expected);
        // Nothing kept, nothing written.
        let mut none = Vec::new();
        spans.write_lines(head, &mut none, |_| false);
        assert!(none.is_empty());
    }

    proptest::proptest! {
        #[test]
        fn names_compare_as_eq_ignore_ascii_case((a, b) in name_pairs()) {
            proptest::prop_assert_eq!(name_eq(&a, &b), a.eq_ignore_ascii_case(&b));
        }
    }

    #[test]
    fn the_name_pairs_are_often_equal_and_often_not() {
        let equal = crate::testing::how_many_generated(&name_pairs(), 1000, |(a, b)| {
            a.len() >= 8 && a.eq_ignore_ascii_case(b)
        });
        assert!((200..800).contains(&equal), "{equal} of 1000");
    }

    fn decode_all(
        mut d: Decoder,
        input: &[u8],
        split: usize,
    ) -> Result<(Vec<u8>, Vec<u8>), Malformed> {
        let mut buf = BytesMut::new();
        let mut out = Vec::new();
        let mut fed = 0;
        loop {
            match d.step(&mut buf)? {
                Step::Data(b) => out.extend_from_slice(&b),
                Step::End => return Ok((out, buf.to_vec())),
                Step::NeedMore => {
                    if fed == input.len() {
                        return Err(Malformed("cut"));
                    }
                    let n = split.min(input.len() - fed);
                    buf.extend_from_slice(&input[fed..fed + n]);
                    fed += n;
                }
            }
        }
    }

    #[test]
    fn chunked_bodies_decode_at_any_split_and_keep_what_follows() {
        let wire = b"5;ext=1\r\nhello\r\n7\r\n, world\r\n0\r\nTrailer: x\r\n\r\nGET / HTTP/1.1\r\n";
        for split in 1..wire.len() {
            let (body, rest) =
                decode_all(Decoder::Chunked(Chunk::Size), wire, split).expect("valid");
            assert_eq!(body, b"hello, world", "split {split}");
            // What the decoder did not consume stays for the connection (a pipelined
            // request), except for the part fed after the end.
            assert!(
                b"GET / HTTP/1.1\r\n".starts_with(&rest),
                "split {split}: {rest:?}"
            );
        }
        let (body, rest) = decode_all(Decoder::Length(3), b"abcdef", 6).expect("valid");
        assert_eq!((&body[..], &rest[..]), (&b"abc"[..], &b"def"[..]));
    }

    #[test]
    fn malformed_chunks_are_errors() {
        for wire in [&b"zz\r\nab\r\n0\r\n\r\n"[..], b"2\r\nabc\r\n0\r\n\r\n"] {
            assert!(matches!(
                decode_all(Decoder::Chunked(Chunk::Size), wire, wire.len()),
                Err(Malformed(m)) if m != "cut"
            ));
        }
        assert!(matches!(
            decode_all(Decoder::Chunked(Chunk::Size), b"5\r\nab", 100),
            Err(Malformed("cut"))
        ));
    }

    /// The length of the response head at the start of `raw`, and its spans.
    fn parse_response_head(raw: &[u8]) -> (usize, Spans) {
        let mut headers = header_slots();
        let mut resp = httparse::Response::new(&mut []);
        match httparse::ParserConfig::default().parse_response_with_uninit_headers(
            &mut resp,
            raw,
            &mut headers,
        ) {
            Ok(httparse::Status::Complete(n)) => (n, Spans::of(raw, resp.headers)),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn header_maps_are_slices_of_the_head() {
        let raw = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-A: 1\r\nx-a: 2\r\nConnection: keep-alive, Close\r\n\r\nhello";
        let (len, spans) = parse_response_head(raw);
        let head = Bytes::copy_from_slice(&raw[..len]);
        let map = spans.into_map(&head, 0);
        assert_eq!(
            spans.seen(&head),
            Seen {
                content_length: true,
                connection: true,
                ..Seen::default()
            }
        );
        assert_eq!(map.get_all("x-a").iter().count(), 2);
        assert_eq!(content_length(&map), Some(5));
        assert!(has_token(&map, &http::header::CONNECTION, "close"));
        assert_eq!(
            offsets(raw, b"elsewhere"),
            (0, 0),
            "not a slice of the buffer"
        );
        let mut twice = HeaderMap::new();
        twice.append(CONTENT_LENGTH, HeaderValue::from(3));
        twice.append(CONTENT_LENGTH, HeaderValue::from(4));
        assert_eq!(content_length(&twice), None, "disagreeing lengths");
    }

    #[test]
    fn a_raw_head_passes_on_what_a_map_would() {
        let raw = b"HTTP/1.1 200 OK\r\nContent-Type: a/b\r\nContent-Length: 5\r\nConnection: x-Secret\r\nX-Secret: 1\r\nTE: trailers\r\nX-Budget-Agent: other\r\nx-keep: 1\r\nx-keep: 2\r\nDate: d\r\n\r\n";
        let (len, spans) = parse_response_head(raw);
        let mut head = RawHead::new(Bytes::copy_from_slice(&raw[..len]), spans);
        assert!(head.seen().content_length && head.seen().connection && head.seen().date);
        assert!(head.has("X-KEEP") && !head.has("x-kept"));
        head.push(&HeaderName::from_static("x-budget-agent"), b"sage");
        head.push(&HeaderName::from_static("x-budget-model"), b"bad\nvalue");

        let mut out = Vec::new();
        head.write(&mut out, false);
        assert_eq!(
            String::from_utf8_lossy(&out),
            "Content-Type: a/b\r\nx-keep: 1\r\nx-keep: 2\r\nDate: d\r\nx-budget-agent: sage\r\n"
        );
        let mut out = Vec::new();
        head.write(&mut out, true);
        assert!(
            String::from_utf8_lossy(&out).contains("Content-Length: 5\r\n"),
            "kept without a body"
        );

        struct WithHead(Option<Box<RawHead>>);
        impl CarriesHead for WithHead {
            fn take_head(&mut self) -> Option<Box<RawHead>> {
                self.0.take()
            }
        }
        let mut r = http::Response::new(WithHead(Some(Box::new(head))));
        r.headers_mut()
            .insert("x-added", HeaderValue::from_static("later"));
        head_into_map(&mut r);
        let names: Vec<_> = r.headers().keys().map(HeaderName::as_str).collect();
        assert_eq!(
            names,
            [
                "content-type",
                "content-length",
                "x-keep",
                "date",
                "x-budget-agent",
                "x-added"
            ]
        );
        assert_eq!(r.headers().get_all("x-keep").iter().count(), 2);
        assert_eq!(r.headers()["x-budget-agent"], "sage");
    }

    #[test]
    fn no_hop_by_hop_header_passes_in_any_case() {
        for name in HOP_BY_HOP {
            assert!(!RawHead::passes(name.as_bytes(), true, &[]), "{name}");
            let upper = name.to_ascii_uppercase();
            assert!(!RawHead::passes(upper.as_bytes(), true, &[]), "{upper}");
        }
        assert!(RawHead::passes(b"Content-Length", true, &[]));
        assert!(!RawHead::passes(b"Content-Length", false, &[]));
        assert!(RawHead::passes(b"x-budget", false, &[]));
        assert!(!RawHead::passes(b"X-Budget-Remaining", false, &[]));
        assert!(!RawHead::passes(b"X-Mine", false, &[b"x-mine"]));
        assert!(RawHead::passes(b"x-goog-upload-url", false, &[b"x-mine"]));
    }

    #[test]
    fn chunk_size_lines_are_hex() {
        let mut out = [0u8; 20];
        assert_eq!(chunk_size(0, &mut out), b"0\r\n");
        assert_eq!(chunk_size(255, &mut out), b"FF\r\n");
        assert_eq!(chunk_size(0x1234_5678, &mut out), b"12345678\r\n");
    }
}
