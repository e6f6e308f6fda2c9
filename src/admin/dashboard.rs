//! The live dashboard, `GET /` on the admin port: one page and its script, built into the
//! binary (no CDN, no build step, nothing to install).
//!
//! The page itself carries no data, so it is served without the token, like `/docs`; its
//! script reads `/api/budget/status` and `/api/budget/alerts` every two seconds with the
//! token the operator types in (kept in the tab's session storage, or given once in the
//! address as `#token=…`, which browsers never send to a server). The script sits in its own
//! file so that the Content-Security-Policy can forbid inline scripts: an agent id is
//! chosen by callers, and a page that showed one through a bug could not run it.

use bytes::Bytes;
use http::{header, HeaderValue, Response};
use http_body_util::Full;

/// `GET /`.
pub const HTML: &str = include_str!("dashboard.html");

/// `GET /dashboard.js`.
pub const JS: &str = include_str!("dashboard.js");

/// Scripts only from this port, data only from this port, no framing, no referrer (the
/// address may hold the token the first time).
const CSP: &str = "default-src 'none'; script-src 'self'; connect-src 'self'; \
                   style-src 'unsafe-inline'; img-src 'self'; frame-ancestors 'none'; \
                   base-uri 'none'; form-action 'none'";

/// The page or its script, with the headers that keep it to itself.
pub fn response(content_type: &'static str, body: &'static str) -> Response<Full<Bytes>> {
    let mut r = super::text_response(content_type, body);
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    r
}
