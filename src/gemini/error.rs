//! Gemini-shaped (`google.rpc.Status`) error bodies.
//!
//! Errors the proxy makes itself (budget exhausted, bad key, …) use Google's shape so the SDKs
//! raise their usual exception types and show the message; a `RetryInfo` detail tells a
//! client when a budget period resets.

use bytes::Bytes;
use serde_json::{json, Value};

/// `{"error":{"code":…,"message":…,"status":…}}`, plus a `RetryInfo` detail when
/// `retry_delay_secs` is given.
pub fn error_body(code: u16, status: &str, message: &str, retry_delay_secs: Option<u64>) -> Bytes {
    let mut error = json!({
        "code": code,
        "message": message,
        "status": status,
    });
    if let (Some(secs), Some(obj)) = (retry_delay_secs, error.as_object_mut()) {
        obj.insert(
            "details".to_owned(),
            json!([{
                "@type": "type.googleapis.com/google.rpc.RetryInfo",
                "retryDelay": format!("{secs}s"),
            }]),
        );
    }
    // `Value`'s Display writes compact JSON and cannot fail.
    Bytes::from(Value::to_string(&json!({ "error": error })))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_back_with_retry_info() {
        let b = error_body(
            429,
            "RESOURCE_EXHAUSTED",
            "Budget \"daily\" exhausted\nretry in 47s \\ é",
            Some(47),
        );
        let v: Value = serde_json::from_slice(&b).unwrap();
        assert_eq!(v["error"]["code"], 429);
        assert_eq!(v["error"]["status"], "RESOURCE_EXHAUSTED");
        assert_eq!(
            v["error"]["message"],
            "Budget \"daily\" exhausted\nretry in 47s \\ é"
        );
        assert_eq!(
            v["error"]["details"],
            json!([{"@type":"type.googleapis.com/google.rpc.RetryInfo","retryDelay":"47s"}])
        );
    }

    #[test]
    fn no_details_without_delay() {
        let b = error_body(400, "INVALID_ARGUMENT", "API key not valid.", None);
        let v: Value = serde_json::from_slice(&b).unwrap();
        assert_eq!(
            v,
            json!({"error":{"code":400,"message":"API key not valid.","status":"INVALID_ARGUMENT"}})
        );
    }
}
