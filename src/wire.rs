//! HTTP/1.1 wire pieces shared by our server connection (`server::http1`) and our upstream
//! client connection (`proxy::h1client`): body decoding (`Content-Length`, `chunked`, or
//! until close), chunk-size lines, and vectored writes.

use bytes::{Bytes, BytesMut};
use http::header::{
    HeaderMap, HeaderName, HeaderValue, CONNECTION, CONTENT_LENGTH, EXPECT, TRANSFER_ENCODING,
};
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
    /// `extra` more headers (those the proxy adds: no re-hashing of a grown map), and which
    /// of the headers that frame the message it has. The error says which part was
    /// invalid: `"name"` or `"value"`.
    pub fn into_map(&self, head: &Bytes, extra: usize) -> Result<(HeaderMap, Seen), &'static str> {
        let mut map = HeaderMap::with_capacity(self.0.len() + extra);
        let mut seen = Seen::default();
        for &[n0, n1, v0, v1] in &self.0 {
            let name = HeaderName::from_bytes(&head[n0..n1]).map_err(|_| "name")?;
            let value = HeaderValue::from_maybe_shared(head.slice(v0..v1)).map_err(|_| "value")?;
            seen.note(&name);
            map.append(name, value);
        }
        Ok((map, seen))
    }
}

/// Which of the headers that frame a message or its connection a head has, noted as its
/// map is built: the hot path then looks up only those that are there (a lookup hashes
/// the name; most heads have neither `Transfer-Encoding` nor `Connection` nor `Expect`).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Seen {
    pub content_length: bool,
    pub transfer_encoding: bool,
    pub connection: bool,
    pub expect: bool,
}

impl Seen {
    /// Comparisons of standard names (no hashing).
    fn note(&mut self, name: &HeaderName) {
        if name == CONTENT_LENGTH {
            self.content_length = true;
        } else if name == TRANSFER_ENCODING {
            self.transfer_encoding = true;
        } else if name == CONNECTION {
            self.connection = true;
        } else if name == EXPECT {
            self.expect = true;
        }
    }
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
    map.get_all(name).iter().any(|v| {
        v.to_str()
            .is_ok_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
    })
}

/// A message's `Content-Length`: `None` when absent, not a number, or given several
/// times with different values.
pub fn content_length(headers: &HeaderMap) -> Option<u64> {
    let mut values = headers.get_all(CONTENT_LENGTH).iter();
    let n = values.next()?.to_str().ok()?.trim().parse().ok()?;
    values
        .all(|v| v.to_str().ok().and_then(|v| v.trim().parse().ok()) == Some(n))
        .then_some(n)
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn header_maps_are_slices_of_the_head() {
        let raw = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-A: 1\r\nx-a: 2\r\nConnection: keep-alive, Close\r\n\r\nhello";
        let mut headers = header_slots();
        let mut resp = httparse::Response::new(&mut []);
        let len = match httparse::ParserConfig::default().parse_response_with_uninit_headers(
            &mut resp,
            raw,
            &mut headers,
        ) {
            Ok(httparse::Status::Complete(n)) => n,
            other => panic!("{other:?}"),
        };
        let spans = Spans::of(raw, resp.headers);
        let head = Bytes::copy_from_slice(&raw[..len]);
        let (map, seen) = spans.into_map(&head, 0).expect("valid");
        assert_eq!(
            seen,
            Seen {
                content_length: true,
                transfer_encoding: false,
                connection: true,
                expect: false
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
    fn chunk_size_lines_are_hex() {
        let mut out = [0u8; 20];
        assert_eq!(chunk_size(0, &mut out), b"0\r\n");
        assert_eq!(chunk_size(255, &mut out), b"FF\r\n");
        assert_eq!(chunk_size(0x1234_5678, &mut out), b"12345678\r\n");
    }
}
