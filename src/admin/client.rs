//! `budget-proxy status`: read the admin API of a running proxy and print a table.

use anyhow::Context as _;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;
use std::fmt::Write as _;

/// Fetch `/api/budget/status` from `admin_url` and render it as a table.
pub async fn status_table(admin_url: &str, token: Option<&str>) -> anyhow::Result<String> {
    let url = format!("{}/api/budget/status", admin_url.trim_end_matches('/'));
    let mut req = http::Request::get(&url);
    if let Some(t) = token {
        req = req.header(http::header::AUTHORIZATION, format!("Bearer {t}"));
    }
    let req = req
        .body(Empty::<Bytes>::new())
        .with_context(|| format!("--admin-url {admin_url:?} is not a valid URL"))?;
    let client = Client::builder(TokioExecutor::new()).build_http();
    let resp = client.request(req).await.with_context(|| {
        format!("cannot reach the admin API at {admin_url}; is the proxy running? (--admin-url)")
    })?;
    let status = resp.status();
    let body = resp
        .into_body()
        .collect()
        .await
        .context("reading the admin API's answer")?
        .to_bytes();
    if status == http::StatusCode::UNAUTHORIZED {
        anyhow::bail!(
            "the admin API refused the token: set BUDGET_PROXY_ADMIN_TOKEN to the proxy's token"
        );
    }
    if !status.is_success() {
        anyhow::bail!(
            "the admin API answered {status}: {}",
            String::from_utf8_lossy(&body)
        );
    }
    let v: Value = serde_json::from_slice(&body).context("the admin API's answer is not JSON")?;
    Ok(render(&v))
}

/// The table printed by `budget-proxy status`.
pub fn render(v: &Value) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<16} {:>12} {:>12} {:>8} {:<9} {:<8} {:>12}",
        "AGENT", "USED", "MAX", "%", "HEALTH", "ACTION", "RESETS IN"
    );
    if let Some(agents) = v.get("agents").and_then(Value::as_object) {
        for (id, s) in agents {
            let resets = s
                .get("resets_in_seconds")
                .and_then(Value::as_u64)
                .map_or_else(|| "never".to_string(), human_secs);
            let _ = writeln!(
                out,
                "{:<16} {:>12} {:>12} {:>8.2} {:<9} {:<8} {:>12}",
                id,
                s.get("used_tokens").and_then(Value::as_u64).unwrap_or(0),
                s.get("max_tokens").and_then(Value::as_u64).unwrap_or(0),
                s.get("percentage").and_then(Value::as_f64).unwrap_or(0.0),
                s.get("health").and_then(Value::as_str).unwrap_or("?"),
                s.get("action_on_limit")
                    .and_then(Value::as_str)
                    .unwrap_or("?"),
                resets
            );
        }
    }
    out
}

fn human_secs(s: u64) -> String {
    let (d, h, m) = (s / 86400, (s % 86400) / 3600, (s % 3600) / 60);
    if d > 0 {
        format!("{d}d {h}h")
    } else if h > 0 {
        format!("{h}h {m}m")
    } else {
        format!("{m}m {}s", s % 60)
    }
}
