//! Gemini-shaped (`google.rpc.Status`) error bodies.

use bytes::Bytes;

/// `{"error":{"code":…,"message":…,"status":…}}`, plus a `RetryInfo` detail when
/// `retry_delay_secs` is given.
pub fn error_body(code: u16, status: &str, message: &str, retry_delay_secs: Option<u64>) -> Bytes {
    let _ = (code, status, message, retry_delay_secs);
    Bytes::new()
}
