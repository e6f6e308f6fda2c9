//! The side port: budget status for operators and tools, health and readiness.
//! `/api/*` needs `Authorization: Bearer $BUDGET_PROXY_ADMIN_TOKEN` (constant-time compare).

pub mod client;
pub mod status;

use crate::budget::ledger::Ledger;
use crate::clock::Clock;
use crate::config::Config;
use arc_swap::ArcSwap;
use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::Full;
use std::sync::Arc;
use subtle::ConstantTimeEq;

/// What the admin port reads.
pub struct AdminState {
    /// The live config.
    pub config: Arc<ArcSwap<Config>>,
    /// Live counters.
    pub ledger: Arc<Ledger>,
    /// The injected clock.
    pub clock: Arc<dyn Clock>,
    /// The bearer token (`None`: API open, only allowed on loopback).
    pub token: Option<String>,
}

fn json(status: StatusCode, v: &serde_json::Value) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(v.to_string())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

fn error(status: StatusCode, message: &str) -> Response<Full<Bytes>> {
    json(
        status,
        &serde_json::json!({"error": {"code": status.as_u16(), "message": message}}),
    )
}

fn authorized<B>(state: &AdminState, req: &Request<B>) -> bool {
    let Some(token) = &state.token else {
        return true;
    };
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    given.as_bytes().ct_eq(token.as_bytes()).into()
}

/// Answer a request on the admin port.
pub async fn handle<B>(state: Arc<AdminState>, req: Request<B>) -> Response<Full<Bytes>> {
    let path = req.uri().path();
    match (req.method(), path) {
        (&Method::GET, "/healthz") => {
            return json(StatusCode::OK, &serde_json::json!({"status": "ok"}))
        }
        (&Method::GET, "/readyz") => {
            return json(StatusCode::OK, &serde_json::json!({"status": "ready"}))
        }
        _ => {}
    }
    if path.starts_with("/api/") && !authorized(&state, &req) {
        return error(
            StatusCode::UNAUTHORIZED,
            "missing or wrong bearer token: send Authorization: Bearer $BUDGET_PROXY_ADMIN_TOKEN",
        );
    }
    let config = state.config.load();
    let now = state.clock.now();
    match (req.method(), path) {
        (&Method::GET, "/api/budget/status") => {
            let v = status::all(&config, &state.ledger, now);
            json(StatusCode::OK, &v)
        }
        (&Method::GET, p) if p.starts_with("/api/budget/status/") => {
            let agent = &p["/api/budget/status/".len()..];
            match status::one(&config, &state.ledger, agent, now) {
                Some(v) => json(StatusCode::OK, &v),
                None => error(
                    StatusCode::NOT_FOUND,
                    &format!("unknown agent {agent:?}: it is not in budgets.json and has sent no request"),
                ),
            }
        }
        _ => error(StatusCode::NOT_FOUND, "no such route"),
    }
}
