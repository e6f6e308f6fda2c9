//! A request as handlers receive it ([`ClientRequest`]), whichever server read it.
//!
//! Its headers ([`Headers`]) are a map when hyper read the request (HTTP/2, TLS) or the
//! proxy built it (a deferred job), and stay as our HTTP/1.1 connection read them otherwise
//! ([`Headers::Raw`]): slices of the head, which the upstream's HTTP/1.1 connection writes
//! on as they are. Building an `http::HeaderMap` of a request's headers (a name lookup, a
//! hash and a value check per header, then a drop) and walking it again to encode it for
//! the upstream was ~2,000 instructions of a proxied request, for the two or three headers
//! the proxy reads (benches/README.md, "Ninth round"). httparse checked names and values by
//! the same rules as `HeaderName` and `HeaderValue`, so a map can still be made of them
//! where one is needed ([`Headers::into_map`]: the admin port, HTTP/2 upstreams, deferred
//! jobs).

use super::ClientBody;
use crate::wire::{is_hop_by_hop, name_eq, push_line, Spans};
use bytes::Bytes;
use http::header::{HeaderMap, HeaderName, HeaderValue, CONNECTION};
use http::{Extensions, Method, Request, Uri, Version};

/// A request: its head and its body.
///
/// The head is boxed: it moves from the connection to the handler, into the proxy's futures
/// and on to the upstream request, and each move of it unboxed was a copy of its 224 bytes
/// (five a request, and as many slots of that size in the futures).
pub struct ClientRequest {
    pub head: Box<RequestHead>,
    pub body: ClientBody,
}

/// A request's head: `http::request::Parts` with a [`Target`] for the URI and [`Headers`]
/// for the map.
#[derive(Debug)]
pub struct RequestHead {
    pub method: Method,
    pub target: Target,
    pub version: Version,
    pub headers: Headers,
    /// [`super::PeerAddr`] and [`crate::tls::Secure`], where the listener sets them.
    pub extensions: Extensions,
}

impl RequestHead {
    /// The head of a request made as an `http::Request`.
    pub fn from_parts(parts: http::request::Parts) -> Self {
        Self {
            method: parts.method,
            target: Target::Uri(parts.uri),
            version: parts.version,
            headers: Headers::Map(parts.headers),
            extensions: parts.extensions,
        }
    }
}

impl ClientRequest {
    /// A request read by hyper.
    pub fn from_http(req: Request<ClientBody>) -> Self {
        let (parts, body) = req.into_parts();
        Self {
            head: Box::new(RequestHead::from_parts(parts)),
            body,
        }
    }

    /// As an `http::Request`, its headers in a map (for handlers that want one).
    pub fn into_http(self) -> Request<ClientBody> {
        let (mut parts, ()) = Request::new(()).into_parts();
        let head = self.head;
        parts.method = head.method;
        parts.uri = head.target.into_uri();
        parts.version = head.version;
        parts.headers = head.headers.into_map();
        parts.extensions = head.extensions;
        Request::from_parts(parts, self.body)
    }
}

/// Bytes of an origin-form target kept as they came ([`Target::origin`]) are those `http::Uri`
/// accepts, without change, both in a path and in a query, and `?`: 0 here. Left out (1):
/// `"` `#` `<` `>` `` ` `` `{` `}`, spaces, controls and non-ASCII bytes (a target with any
/// of them is parsed into a `Uri`, as before).
static NOT_PLAIN: [u8; 256] = {
    let mut t = [1; 256];
    let mut b = 0x21;
    while b < 0x7f {
        if !matches!(b as u8, b'"' | b'#' | b'<' | b'>' | b'`' | b'{' | b'}') {
            t[b] = 0;
        }
        b += 1;
    }
    t
};

/// A request's target.
#[derive(Debug, Clone)]
pub enum Target {
    /// Parsed (hyper's requests, deferred jobs, and targets [`Target::origin`] leaves out).
    Uri(Uri),
    /// An origin-form target as our HTTP/1.1 connection read it (a slice of the head),
    /// checked by [`Target::origin`]: what `http::Uri` would have made of it, without
    /// checking each byte again in a slower loop (730 instructions a request).
    Origin {
        bytes: Bytes,
        /// Where its `?` is.
        query: Option<usize>,
    },
}

impl Target {
    /// `bytes` kept as they are, if they are a path (and query) of plain bytes only (see
    /// [`NOT_PLAIN`]).
    pub fn origin(bytes: Bytes) -> Option<Self> {
        // (A fold without early exit: no branch per byte.)
        let not_plain = bytes
            .iter()
            .fold(0u8, |acc, &b| acc | NOT_PLAIN[usize::from(b)]);
        if bytes.first() != Some(&b'/') || bytes.len() >= usize::from(u16::MAX) || not_plain != 0 {
            return None;
        }
        let query = memchr::memchr(b'?', &bytes);
        Some(Target::Origin { bytes, query })
    }

    /// The path (`/` when empty).
    pub fn path(&self) -> &str {
        match self {
            Target::Uri(uri) => uri.path(),
            Target::Origin { bytes, query } => {
                let path = &bytes[..query.unwrap_or(bytes.len())];
                // (ASCII: checked by `origin`.)
                std::str::from_utf8(path).unwrap_or("/")
            }
        }
    }

    /// The query, without its `?`.
    pub fn query(&self) -> Option<&str> {
        match self {
            Target::Uri(uri) => uri.query(),
            Target::Origin { bytes, query } => {
                query.and_then(|q| std::str::from_utf8(&bytes[q + 1..]).ok())
            }
        }
    }

    /// The parsed URI, when the target is one (only those may carry a scheme and an
    /// authority).
    pub fn uri(&self) -> Option<&Uri> {
        match self {
            Target::Uri(uri) => Some(uri),
            Target::Origin { .. } => None,
        }
    }

    /// As a `Uri`.
    pub fn into_uri(self) -> Uri {
        match self {
            Target::Uri(uri) => uri,
            // Cannot fail: `origin` let through only what a `Uri` accepts.
            Target::Origin { bytes, .. } => Uri::from_maybe_shared(bytes).unwrap_or_default(),
        }
    }

    /// Its own copy of the bytes it is a slice of (see [`Headers::detach`]).
    pub fn detach(&mut self) {
        match self {
            Target::Uri(uri) => {
                if let Ok(own) = Uri::try_from(uri.to_string()) {
                    *uri = own;
                }
            }
            Target::Origin { bytes, .. } => *bytes = Bytes::copy_from_slice(bytes),
        }
    }
}

/// A request's headers: a map, or the head they were read from.
#[derive(Debug)]
pub enum Headers {
    Map(HeaderMap),
    Raw(RawHeaders),
}

/// Headers as our HTTP/1.1 connection read them, with those the proxy set.
#[derive(Debug)]
pub struct RawHeaders {
    /// The request's head (request line and header lines).
    head: Bytes,
    /// The headers of `head` still there (removed ones are taken out of the list).
    spans: Spans,
    /// Headers the proxy set (each replaced every header of its name in `head`).
    set: Vec<(HeaderName, HeaderValue)>,
}

impl Headers {
    /// The headers of `spans`, parsed out of `head` (names and values checked by httparse).
    pub fn raw(head: Bytes, spans: Spans) -> Self {
        Headers::Raw(RawHeaders {
            head,
            spans,
            set: Vec::new(),
        })
    }

    /// The first value of `name`.
    pub fn get(&self, name: &HeaderName) -> Option<&[u8]> {
        match self {
            Headers::Map(m) => m.get(name).map(HeaderValue::as_bytes),
            Headers::Raw(r) => match r.spans.ranges(&r.head, name.as_str()).next() {
                Some((v0, v1)) => Some(&r.head[v0..v1]),
                None => r
                    .set
                    .iter()
                    .find(|(n, _)| n == name)
                    .map(|(_, v)| v.as_bytes()),
            },
        }
    }

    /// Every value of `name`, in order.
    pub fn get_all<'a>(&'a self, name: &'a HeaderName) -> impl Iterator<Item = &'a [u8]> {
        let (map, raw) = match self {
            Headers::Map(m) => (Some(m.get_all(name).iter()), None),
            Headers::Raw(r) => (None, Some(r)),
        };
        let set = raw
            .into_iter()
            .flat_map(move |r| r.set.iter().filter(move |(n, _)| n == name))
            .map(|(_, v)| v.as_bytes());
        map.into_iter()
            .flatten()
            .map(HeaderValue::as_bytes)
            .chain(
                raw.into_iter()
                    .flat_map(move |r| r.spans.values(&r.head, name.as_str())),
            )
            .chain(set)
    }

    /// The first value of `name`, as a `HeaderValue` (a slice of the head: no copy).
    pub fn get_value(&self, name: &HeaderName) -> Option<HeaderValue> {
        match self {
            Headers::Map(m) => m.get(name).cloned(),
            Headers::Raw(r) => match r.set.iter().find(|(n, _)| n == name) {
                Some((_, v)) => Some(v.clone()),
                None => r
                    .spans
                    .ranges(&r.head, name.as_str())
                    .next()
                    .and_then(|(v0, v1)| HeaderValue::from_maybe_shared(r.head.slice(v0..v1)).ok()),
            },
        }
    }

    /// Set `name` to `value`, replacing every header of that name.
    pub fn insert(&mut self, name: HeaderName, value: HeaderValue) {
        match self {
            Headers::Map(m) => {
                m.insert(name, value);
            }
            Headers::Raw(r) => {
                r.remove(&name);
                r.set.push((name, value));
            }
        }
    }

    /// Remove the hop-by-hop headers (see [`is_hop_by_hop`]) and those `Connection` names.
    pub fn strip_hop_by_hop(&mut self) {
        match self {
            Headers::Map(m) => crate::wire::strip_hop_by_hop(m),
            Headers::Raw(r) => {
                let head = &r.head;
                // One pass over the (few) names first: most requests carry none of them.
                if !r.spans.names(head).any(is_hop_by_hop) {
                    return;
                }
                let named: Vec<Vec<u8>> = r
                    .spans
                    .values(head, CONNECTION.as_str())
                    .flat_map(|v| v.split(|&b| b == b','))
                    .map(|n| n.trim_ascii().to_vec())
                    .collect();
                r.spans.retain(head, |name| {
                    !is_hop_by_hop(name) && !named.iter().any(|n| name_eq(name, n))
                });
            }
        }
    }

    /// Append the headers whose name `keep` accepts to `out`, as `name: value\r\n` lines:
    /// a raw head's as they stand (see [`Spans::write_lines`]), then those the proxy set.
    pub fn write_lines(&self, out: &mut Vec<u8>, mut keep: impl FnMut(&[u8]) -> bool) {
        match self {
            Headers::Map(m) => write_pairs(m.iter(), out, keep),
            Headers::Raw(r) => {
                r.spans.write_lines(&r.head, out, &mut keep);
                write_pairs(r.set.iter().map(|(n, v)| (n, v)), out, keep);
            }
        }
    }

    /// How many headers there are.
    pub fn len(&self) -> usize {
        match self {
            Headers::Map(m) => m.len(),
            Headers::Raw(r) => r.spans.len() + r.set.len(),
        }
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// As a map (values of a raw head stay slices of it).
    pub fn into_map(self) -> HeaderMap {
        match self {
            Headers::Map(m) => m,
            Headers::Raw(r) => {
                let mut map = r.spans.into_map(&r.head, r.set.len());
                for (name, value) in r.set {
                    map.insert(name, value);
                }
                map
            }
        }
    }

    /// Give the headers their own copy of the bytes they are slices of: those of the buffer
    /// the connection read the request into, which a parked request holding them would keep
    /// alive for as long as it waits (measured with `benches/queue_memory.sh`).
    pub fn detach(&mut self) {
        match self {
            Headers::Map(m) => {
                let mut headers = HeaderMap::with_capacity(m.len());
                for (name, value) in m.iter() {
                    if let Ok(mut v) = HeaderValue::from_bytes(value.as_bytes()) {
                        v.set_sensitive(value.is_sensitive());
                        headers.append(name.clone(), v);
                    }
                }
                *m = headers;
            }
            Headers::Raw(r) => r.head = Bytes::copy_from_slice(&r.head),
        }
    }
}

/// [`Headers::write_lines`] of headers in a map or a list.
fn write_pairs<'a>(
    pairs: impl Iterator<Item = (&'a HeaderName, &'a HeaderValue)>,
    out: &mut Vec<u8>,
    mut keep: impl FnMut(&[u8]) -> bool,
) {
    for (name, value) in pairs {
        if keep(name.as_str().as_bytes()) {
            push_line(out, name.as_str().as_bytes(), value.as_bytes());
        }
    }
}

impl RawHeaders {
    fn remove(&mut self, name: &HeaderName) {
        self.spans
            .retain(&self.head, |n| !name_eq(n, name.as_str().as_bytes()));
        self.set.retain(|(n, _)| n != name);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The headers of a parsed head, raw.
    fn raw(head: &'static [u8]) -> Headers {
        let mut slots = crate::wire::header_slots();
        let mut req = httparse::Request::new(&mut []);
        let head = Bytes::from_static(head);
        let status = req
            .parse_with_uninit_headers(&head, &mut slots)
            .expect("a valid head");
        assert!(status.is_complete());
        let spans = Spans::of(&head, req.headers);
        Headers::raw(head, spans)
    }

    /// The map's entries, sorted (a map's order depends on how it was changed).
    fn map_of(h: Headers) -> Vec<(String, String)> {
        let mut entries: Vec<(String, String)> = h
            .into_map()
            .iter()
            .map(|(n, v)| (n.to_string(), String::from_utf8_lossy(v.as_bytes()).into()))
            .collect();
        entries.sort();
        entries
    }

    fn both(head: &'static [u8]) -> [Headers; 2] {
        let map = Headers::Map(raw(head).into_map());
        [raw(head), map]
    }

    /// Targets: a `/` (mostly) then bytes of every kind the server could meet.
    fn targets() -> impl proptest::strategy::Strategy<Value = Vec<u8>> {
        use proptest::prelude::*;
        let byte = prop_oneof![
            60 => proptest::sample::select(b"abcXYZ019/-._~%:=&+,;!$'()*@".to_vec()),
            6 => Just(b'?'),
            2 => proptest::sample::select(b"\"#<>`{}|^[]\\".to_vec()),
            1 => any::<u8>(),
        ];
        (
            prop_oneof![9 => Just(b'/'), 1 => any::<u8>()],
            proptest::collection::vec(byte, 0..40),
        )
            .prop_map(|(first, rest)| [vec![first], rest].concat())
    }

    proptest::proptest! {
        /// A target kept as it came reads as `http::Uri` reads it.
        #[test]
        fn a_kept_target_reads_as_a_uri(t in targets()) {
            let bytes = Bytes::from(t);
            if let Some(target) = Target::origin(bytes.clone()) {
                let uri = Uri::from_maybe_shared(bytes).expect("a kept target is a valid URI");
                proptest::prop_assert_eq!(target.path(), uri.path());
                proptest::prop_assert_eq!(target.query(), uri.query());
                proptest::prop_assert_eq!(target.clone().into_uri(), uri);
            }
        }
    }

    #[test]
    fn most_generated_targets_are_kept_and_some_are_not() {
        let kept = crate::testing::how_many_generated(&targets(), 1000, |t| {
            Target::origin(Bytes::from(t.clone())).is_some()
        });
        assert!((300..900).contains(&kept), "{kept} of 1000");
        // Gemini's own targets are.
        let t = Target::origin(Bytes::from_static(
            b"/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse&key=k",
        ))
        .expect("kept");
        assert_eq!(
            t.path(),
            "/v1beta/models/gemini-2.5-flash:streamGenerateContent"
        );
        assert_eq!(t.query(), Some("alt=sse&key=k"));
    }

    const HEAD: &[u8] = b"POST /v1beta/x HTTP/1.1\r\nHost: a\r\nX-Goog-Api-Key: k1\r\nConnection: keep-alive, X-Drop\r\nx-drop: 1\r\nAccept: a\r\naccept: b\r\nTE: trailers\r\n\r\n";

    #[test]
    fn raw_and_map_headers_read_alike() {
        let key = HeaderName::from_static("x-goog-api-key");
        let accept = http::header::ACCEPT;
        for h in both(HEAD) {
            assert_eq!(h.get(&key), Some(&b"k1"[..]));
            assert_eq!(h.get_all(&accept).collect::<Vec<_>>(), [&b"a"[..], b"b"]);
            assert_eq!(h.get(&http::header::CONTENT_TYPE), None);
            assert_eq!(h.get_value(&key).expect("set"), "k1");
            assert_eq!(h.len(), 7);
        }
    }

    #[test]
    fn raw_and_map_headers_change_alike() {
        let key = HeaderName::from_static("x-goog-api-key");
        let results = both(HEAD).map(|mut h| {
            h.strip_hop_by_hop();
            h.insert(key.clone(), HeaderValue::from_static("real"));
            assert_eq!(h.get(&key), Some(&b"real"[..]));
            assert_eq!(h.get_value(&key).expect("set"), "real");
            let mut out = Vec::new();
            h.write_lines(&mut out, |_| true);
            let text = String::from_utf8_lossy(&out).to_ascii_lowercase();
            let mut lines: Vec<String> = text.split_terminator("\r\n").map(str::to_owned).collect();
            lines.sort();
            (lines, h.len(), map_of(h))
        });
        assert_eq!(results[0], results[1]);
        let (lines, len, map) = &results[0];
        assert_eq!(
            lines,
            &["accept: a", "accept: b", "host: a", "x-goog-api-key: real"]
        );
        assert_eq!(*len, 4);
        assert_eq!(
            map,
            &[
                ("accept".to_string(), "a".to_string()),
                ("accept".to_string(), "b".to_string()),
                ("host".to_string(), "a".to_string()),
                ("x-goog-api-key".to_string(), "real".to_string()),
            ]
        );
    }

    #[test]
    fn detached_raw_headers_no_longer_share_the_read_buffer() {
        let buf = Bytes::from(HEAD.to_vec());
        let mut slots = crate::wire::header_slots();
        let mut req = httparse::Request::new(&mut []);
        req.parse_with_uninit_headers(&buf, &mut slots)
            .expect("valid");
        let spans = Spans::of(&buf, req.headers);
        let mut h = Headers::raw(buf.clone(), spans);
        h.detach();
        let Headers::Raw(r) = &h else {
            panic!("raw headers stay raw");
        };
        assert_ne!(r.head.as_ptr(), buf.as_ptr());
        assert_eq!(h.get(&http::header::HOST), Some(&b"a"[..]));
    }
}
