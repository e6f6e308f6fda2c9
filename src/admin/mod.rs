//! The side port: budget status and control for operators and tools, metrics, health.
//!
//! HTTP is decoded into an [`AdminCommand`] and run by one [`apply`], which tests can call
//! directly; errors map to responses in one place ([`AdminError::to_response`]).
//! `/api/*` needs `Authorization: Bearer $BUDGET_PROXY_ADMIN_TOKEN` (constant-time compare);
//! repeated failures from one address are refused for a while.

pub mod client;
mod dashboard;
mod openapi;
pub mod status;

use crate::budget::alerts::{AlertCenter, Level};
use crate::budget::ledger::Ledger;
use crate::budget::queue::Queues;
use crate::clock::Clock;
use crate::config::live::{LiveConfig, UpdateError};
use crate::config::valid_agent_id;
use crate::metrics::{encode_counter, encode_gauges, Metrics};
use crate::server::ClientBody;
use crate::server::PeerAddr;
use crate::store::{GroupBy, Store, UsageQuery};
use bytes::Bytes;
use chrono::{DateTime, Utc};
use dashmap::DashMap;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::DescriptorEncoder;
use prometheus_client::registry::Registry;
use serde_json::{json, Value};
use std::net::IpAddr;
use std::sync::Arc;
use subtle::ConstantTimeEq;

/// Largest admin request body.
const MAX_BODY_BYTES: usize = 64 * 1024;
/// Wrong tokens allowed per address per minute before 429.
const MAX_AUTH_FAILURES: u32 = 10;

/// What the admin port reads and changes.
pub struct AdminState {
    /// The live config (reloads, updates).
    pub live: Arc<LiveConfig>,
    /// Live counters.
    pub ledger: Arc<Ledger>,
    /// The store (history, readiness).
    pub store: Arc<dyn Store>,
    /// The injected clock.
    pub clock: Arc<dyn Clock>,
    /// The bearer token (`None`: API open, only allowed on loopback).
    pub token: Option<String>,
    /// Proxy counters.
    pub metrics: Arc<Metrics>,
    /// Parked requests (released after resets and updates).
    pub queues: Arc<Queues>,
    /// Alerts (their list and webhook counters).
    pub alerts: Option<Arc<dyn AlertSource>>,
    /// Deferred jobs (counts for `/api/budget/queue`).
    pub jobs: Option<Arc<crate::store::LocalStore>>,
    /// Replica sync over Redis (updates are published to the other replicas; readiness).
    pub redis: Option<crate::store::redis_sync::RedisSync>,
    registry: Registry,
    auth_failures: DashMap<Option<IpAddr>, (i64, u32)>,
}

/// Where alerts come from (the alert center), as the admin port sees it.
pub trait AlertSource: Send + Sync + 'static {
    /// Alerts, newest first, filtered, at most `limit` of them.
    fn list_json(
        &self,
        agent: Option<&str>,
        level: Option<&str>,
        since: Option<DateTime<Utc>>,
        limit: Option<usize>,
    ) -> Result<Value, String>;
    /// Webhook deliveries (ok, failed).
    fn webhook_counts(&self) -> (u64, u64);
}

/// What the admin port is built from.
pub struct AdminDeps {
    /// The live config.
    pub live: Arc<LiveConfig>,
    /// Live counters.
    pub ledger: Arc<Ledger>,
    /// The store.
    pub store: Arc<dyn Store>,
    /// The injected clock.
    pub clock: Arc<dyn Clock>,
    /// The bearer token.
    pub token: Option<String>,
    /// Proxy counters.
    pub metrics: Arc<Metrics>,
    /// Parked requests.
    pub queues: Arc<Queues>,
    /// Alerts.
    pub alerts: Option<Arc<dyn AlertSource>>,
    /// Deferred jobs.
    pub jobs: Option<Arc<crate::store::LocalStore>>,
    /// Replica sync over Redis.
    pub redis: Option<crate::store::redis_sync::RedisSync>,
}

impl AdminState {
    /// Assemble the admin state and its metrics registry.
    pub fn new(d: AdminDeps) -> Arc<Self> {
        let mut registry = Registry::default();
        if let Some(r) = &d.redis {
            registry.register_collector(r.collector());
        }
        registry.register_collector(Box::new(Scrape {
            live: d.live.clone(),
            ledger: d.ledger.clone(),
            clock: d.clock.clone(),
            metrics: d.metrics.clone(),
            queues: d.queues.clone(),
            alerts: d.alerts.clone(),
        }));
        registry.register(
            "budget_proxy_upstream_latency_seconds",
            "Time from sending a request upstream to its response headers",
            d.metrics.upstream_latency.clone(),
        );
        registry.register(
            "budget_proxy_overhead_seconds",
            "Time the proxy spent on a request outside the upstream call",
            d.metrics.proxy_overhead.clone(),
        );
        Arc::new(Self {
            live: d.live,
            ledger: d.ledger,
            store: d.store,
            clock: d.clock,
            token: d.token,
            metrics: d.metrics,
            queues: d.queues,
            alerts: d.alerts,
            jobs: d.jobs,
            redis: d.redis,
            registry,
            auth_failures: DashMap::new(),
        })
    }
}

impl AlertSource for AlertCenter {
    fn list_json(
        &self,
        agent: Option<&str>,
        level: Option<&str>,
        since: Option<DateTime<Utc>>,
        limit: Option<usize>,
    ) -> Result<Value, String> {
        let level = level
            .map(|l| l.parse::<Level>().map_err(|e| e.to_string()))
            .transpose()?;
        let list = self.list_newest(agent, level, since, limit.unwrap_or(usize::MAX));
        serde_json::to_value(list).map_err(|e| e.to_string())
    }

    fn webhook_counts(&self) -> (u64, u64) {
        let s = self.webhook_stats().snapshot();
        (s.deliveries_ok, s.deliveries_failed)
    }
}

/// Everything the admin API does.
#[derive(Debug, Clone, PartialEq)]
pub enum AdminCommand {
    /// STATUS of every agent.
    StatusAll,
    /// STATUS of one agent.
    Status(String),
    /// Partial update of an agent's budget (creates it if absent).
    Update(String, Value),
    /// Zero an agent's running period.
    Reset(String),
    /// Alerts, newest first.
    Alerts {
        /// Only this agent.
        agent: Option<String>,
        /// Only this level.
        level: Option<String>,
        /// Only alerts created at or after this instant.
        since: Option<DateTime<Utc>>,
        /// At most this many (the newest).
        limit: Option<usize>,
    },
    /// Usage history.
    Usage(UsageQuery),
    /// The loaded config's metadata.
    Config,
    /// Parked requests per agent.
    Queue,
}

/// Why an admin request failed.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// Missing or wrong token.
    #[error("missing or wrong bearer token: send Authorization: Bearer $BUDGET_PROXY_ADMIN_TOKEN")]
    Unauthorized,
    /// Too many wrong tokens from this address.
    #[error("too many failed authentications from this address; retry in {0} s")]
    TooManyFailures(u64),
    /// No such agent or route.
    #[error("{0}")]
    NotFound(String),
    /// The request is malformed.
    #[error("{0}")]
    BadRequest(String),
    /// The body is over 64 KiB.
    #[error("request body is larger than 64 KiB")]
    PayloadTooLarge,
    /// A dependency (store, file) failed.
    #[error("{0}")]
    Unavailable(String),
}

impl AdminError {
    fn status(&self) -> StatusCode {
        match self {
            AdminError::Unauthorized => StatusCode::UNAUTHORIZED,
            AdminError::TooManyFailures(_) => StatusCode::TOO_MANY_REQUESTS,
            AdminError::NotFound(_) => StatusCode::NOT_FOUND,
            AdminError::BadRequest(_) => StatusCode::BAD_REQUEST,
            AdminError::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            AdminError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    /// `{"error": {"code", "message"}}` with the status (and `Retry-After` on 429).
    pub fn to_response(&self) -> Response<Full<Bytes>> {
        let status = self.status();
        let mut r = json_response(
            status,
            &json!({"error": {"code": status.as_u16(), "message": self.to_string()}}),
        );
        if let AdminError::TooManyFailures(secs) = self {
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(*secs));
        }
        if let AdminError::Unauthorized = self {
            r.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        r
    }
}

fn json_response(status: StatusCode, v: &Value) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(v.to_string())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

fn text_response(content_type: &'static str, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

fn known_agent(state: &AdminState, agent: &str) -> Result<(), AdminError> {
    let config = state.live.get();
    if config.agent(agent).is_some() || state.ledger.agent_ids().iter().any(|a| a == agent) {
        Ok(())
    } else {
        Err(AdminError::NotFound(format!(
            "unknown agent {agent:?}: it is not in budgets.json and has sent no request"
        )))
    }
}

fn one_status(state: &AdminState, agent: &str) -> Result<Value, AdminError> {
    let config = state.live.get();
    status::one(
        &config,
        &state.ledger,
        &state.queues,
        agent,
        state.clock.now(),
    )
    .ok_or_else(|| {
        AdminError::NotFound(format!(
            "unknown agent {agent:?}: it is not in budgets.json and has sent no request"
        ))
    })
}

/// Pending deferred jobs per agent (empty when the store cannot say).
async fn pending_jobs(state: &AdminState) -> std::collections::HashMap<String, u64> {
    let Some(j) = state.jobs.clone() else {
        return Default::default();
    };
    match tokio::task::spawn_blocking(move || j.job_counts()).await {
        Ok(Ok(rows)) => rows
            .into_iter()
            .map(|(a, c)| (a, c.pending + c.running))
            .collect(),
        _ => Default::default(),
    }
}

/// Run one command.
pub async fn apply(
    state: &Arc<AdminState>,
    cmd: AdminCommand,
) -> Result<(StatusCode, Value), AdminError> {
    match cmd {
        AdminCommand::StatusAll => {
            let config = state.live.get();
            let mut v = status::all(&config, &state.ledger, &state.queues, state.clock.now());
            let counts = pending_jobs(state).await;
            if let Some(agents) = v.get_mut("agents").and_then(Value::as_object_mut) {
                for (id, s) in agents.iter_mut() {
                    s["deferred_jobs"] = json!(counts.get(id).copied().unwrap_or(0));
                }
            }
            Ok((StatusCode::OK, v))
        }
        AdminCommand::Status(agent) => {
            let mut v = one_status(state, &agent)?;
            v["deferred_jobs"] = json!(pending_jobs(state).await.get(&agent).copied().unwrap_or(0));
            Ok((StatusCode::OK, v))
        }
        AdminCommand::Update(agent, patch) => {
            if !valid_agent_id(&agent) {
                return Err(AdminError::BadRequest(format!(
                    "invalid agent id {agent:?}: use 1 to 128 characters from A-Z a-z 0-9 . _ - (not starting with .)"
                )));
            }
            let live = state.live.clone();
            let a = agent.clone();
            let published = state.redis.as_ref().map(|_| patch.clone());
            let created = tokio::task::spawn_blocking(move || live.update_agent(&a, &patch))
                .await
                .map_err(|e| AdminError::Unavailable(format!("update task failed: {e}")))?
                .map_err(|e| match e {
                    UpdateError::Io { .. } => AdminError::Unavailable(e.to_string()),
                    UpdateError::BadPatch(_) | UpdateError::Invalid(_) => {
                        AdminError::BadRequest(e.to_string())
                    }
                })?;
            // Every replica applies the same patch (resets reach them through the sync layer).
            if let (Some(redis), Some(patch)) = (&state.redis, published) {
                redis.publish_update(&agent, &patch).await;
            }
            let code = if created {
                StatusCode::CREATED
            } else {
                StatusCode::OK
            };
            Ok((code, one_status(state, &agent)?))
        }
        AdminCommand::Reset(agent) => {
            known_agent(state, &agent)?;
            state.ledger.reset(&agent);
            tracing::info!(target: "admin", agent = %agent, "budget reset");
            state
                .queues
                .release_agent(&state.ledger, &state.live.get(), &agent, state.clock.now());
            Ok((StatusCode::OK, one_status(state, &agent)?))
        }
        AdminCommand::Alerts {
            agent,
            level,
            since,
            limit,
        } => {
            let Some(alerts) = &state.alerts else {
                return Ok((StatusCode::OK, json!({"alerts": []})));
            };
            let list = alerts
                .list_json(agent.as_deref(), level.as_deref(), since, limit)
                .map_err(AdminError::BadRequest)?;
            Ok((StatusCode::OK, json!({"alerts": list})))
        }
        AdminCommand::Usage(q) => {
            let store = state.store.clone();
            let q2 = q.clone();
            let rows = tokio::task::spawn_blocking(move || store.usage(&q2))
                .await
                .map_err(|e| AdminError::Unavailable(format!("usage task failed: {e}")))?
                .map_err(|e| AdminError::Unavailable(e.to_string()))?;
            let rows: Vec<Value> = rows
                .into_iter()
                .map(|r| {
                    json!({
                        "key": r.key,
                        "prompt_tokens": r.prompt_tokens,
                        "completion_tokens": r.completion_tokens,
                        "cached_tokens": r.cached_tokens,
                        "total_tokens": r.total_tokens,
                        "requests": r.requests,
                        "blocked": r.blocked,
                        "cost_usd": status::usd(r.cost_pico),
                        "cost_pico_usd": r.cost_pico.to_string(),
                    })
                })
                .collect();
            let group_by = match q.group_by {
                GroupBy::Model => "model",
                GroupBy::Day => "day",
                GroupBy::Hour => "hour",
            };
            Ok((
                StatusCode::OK,
                json!({"agent": q.agent, "group_by": group_by, "rows": rows}),
            ))
        }
        AdminCommand::Config => Ok((StatusCode::OK, json!(state.live.info()))),
        AdminCommand::Queue => {
            let jobs = match &state.jobs {
                Some(j) => {
                    let j = j.clone();
                    tokio::task::spawn_blocking(move || j.job_counts())
                        .await
                        .map_err(|e| AdminError::Unavailable(format!("queue task failed: {e}")))?
                        .map_err(|e| AdminError::Unavailable(e.to_string()))?
                }
                None => Vec::new(),
            };
            let mut agents = serde_json::Map::new();
            let mut ids: Vec<String> = state.queues.depths().into_iter().map(|(a, _)| a).collect();
            ids.extend(jobs.iter().map(|(a, _)| a.clone()));
            ids.sort();
            ids.dedup();
            for agent in ids {
                let (parked, oldest) = state.queues.depth(&agent);
                let counts = jobs
                    .iter()
                    .find(|(a, _)| *a == agent)
                    .map(|(_, c)| c.clone())
                    .unwrap_or_default();
                agents.insert(
                    agent,
                    json!({"parked": parked, "oldest_wait_ms": oldest.map(|d| d.as_millis() as u64), "jobs": counts}),
                );
            }
            Ok((StatusCode::OK, json!({"agents": agents})))
        }
    }
}

fn query_param(query: Option<&str>, name: &str) -> Option<String> {
    form_urlencoded::parse(query?.as_bytes())
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.into_owned())
        .filter(|v| !v.is_empty())
}

fn parse_time(name: &str, v: Option<String>) -> Result<Option<DateTime<Utc>>, AdminError> {
    v.map(|s| {
        DateTime::parse_from_rfc3339(&s)
            .map(|t| t.with_timezone(&Utc))
            .map_err(|_| {
                AdminError::BadRequest(format!(
                    "{name}={s:?} is not an RFC 3339 time (e.g. 2026-11-29T00:00:00Z)"
                ))
            })
    })
    .transpose()
}

async fn read_json(body: ClientBody) -> Result<Value, AdminError> {
    let bytes = match Limited::new(body, MAX_BODY_BYTES).collect().await {
        Ok(c) => c.to_bytes(),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => {
            return Err(AdminError::PayloadTooLarge)
        }
        Err(e) => return Err(AdminError::BadRequest(format!("cannot read the body: {e}"))),
    };
    serde_json::from_slice(&bytes).map_err(|e| {
        AdminError::BadRequest(format!(
            "the body is not valid JSON: {e}; send an object of budget fields, e.g. {{\"max_tokens\": 4000000}}"
        ))
    })
}

/// The `/api` routes; the value is the index matched in [`decode`].
static ROUTER: std::sync::LazyLock<matchit::Router<usize>> = std::sync::LazyLock::new(|| {
    let mut router = matchit::Router::new();
    let routes = [
        "/api/budget/status",
        "/api/budget/status/{agent}",
        "/api/budget/update/{agent}",
        "/api/budget/reset/{agent}",
        "/api/budget/alerts",
        "/api/budget/usage",
        "/api/budget/config",
        "/api/budget/queue",
    ];
    for (i, r) in routes.iter().enumerate() {
        // The patterns are fixed and distinct: insertion cannot fail.
        let _ = router.insert(*r, i);
    }
    router
});

/// Decode a request into a command (the body is read only for updates).
async fn decode(req: Request<ClientBody>) -> Result<AdminCommand, AdminError> {
    let router = &*ROUTER;
    let path = req.uri().path().to_string();
    let query = req.uri().query().map(str::to_string);
    let q = query.as_deref();
    let Ok(m) = router.at(&path) else {
        return Err(AdminError::NotFound(format!("no route {path}; see /docs")));
    };
    let agent = m
        .params
        .get("agent")
        .map(str::to_string)
        .unwrap_or_default();
    let wrong_method =
        || AdminError::NotFound(format!("{} {path} is not a route; see /docs", req.method()));
    let method = req.method().clone();
    match (*m.value, method) {
        (0, Method::GET) => Ok(AdminCommand::StatusAll),
        (1, Method::GET) => Ok(AdminCommand::Status(agent)),
        (2, Method::PUT) | (2, Method::PATCH) => Ok(AdminCommand::Update(
            agent,
            read_json(req.into_body()).await?,
        )),
        (3, Method::POST) => Ok(AdminCommand::Reset(agent)),
        (4, Method::GET) => {
            let level = query_param(q, "level");
            if let Some(l) = &level {
                if !matches!(l.as_str(), "warning" | "critical" | "limit") {
                    return Err(AdminError::BadRequest(format!(
                        "level={l:?}: valid levels are warning, critical, limit"
                    )));
                }
            }
            let limit = query_param(q, "limit")
                .map(|l| {
                    l.parse::<usize>().map_err(|_| {
                        AdminError::BadRequest(format!(
                            "limit={l:?}: give a whole number of alerts, e.g. limit=20"
                        ))
                    })
                })
                .transpose()?;
            Ok(AdminCommand::Alerts {
                agent: query_param(q, "agent"),
                level,
                since: parse_time("since", query_param(q, "since"))?,
                limit,
            })
        }
        (5, Method::GET) => {
            let group_by = match query_param(q, "group_by").as_deref() {
                None | Some("model") => GroupBy::Model,
                Some("day") => GroupBy::Day,
                Some("hour") => GroupBy::Hour,
                Some(other) => {
                    return Err(AdminError::BadRequest(format!(
                        "group_by={other:?}: valid values are model, day, hour"
                    )))
                }
            };
            Ok(AdminCommand::Usage(UsageQuery {
                agent: query_param(q, "agent"),
                group_by,
                from: parse_time("from", query_param(q, "from"))?.map(|t| t.timestamp()),
                to: parse_time("to", query_param(q, "to"))?.map(|t| t.timestamp()),
            }))
        }
        (6, Method::GET) => Ok(AdminCommand::Config),
        (7, Method::GET) => Ok(AdminCommand::Queue),
        _ => Err(wrong_method()),
    }
}

fn check_token<B>(state: &AdminState, req: &Request<B>) -> Result<(), AdminError> {
    let Some(token) = &state.token else {
        return Ok(());
    };
    let peer = req.extensions().get::<PeerAddr>().map(|p| p.0.ip());
    let minute = state.clock.now().timestamp() / 60;
    if let Some(f) = state.auth_failures.get(&peer) {
        if f.0 == minute && f.1 >= MAX_AUTH_FAILURES {
            let secs = 60 - state.clock.now().timestamp().rem_euclid(60);
            return Err(AdminError::TooManyFailures(
                u64::try_from(secs).unwrap_or(60),
            ));
        }
    }
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    if bool::from(given.as_bytes().ct_eq(token.as_bytes())) {
        return Ok(());
    }
    let mut f = state.auth_failures.entry(peer).or_insert((minute, 0));
    if f.0 != minute {
        *f = (minute, 0);
    }
    f.1 += 1;
    tracing::warn!(target: "admin", peer = ?peer, "admin API: wrong or missing token");
    Err(AdminError::Unauthorized)
}

/// Answer a request on the admin port.
pub async fn handle(state: Arc<AdminState>, req: Request<ClientBody>) -> Response<Full<Bytes>> {
    let path = req.uri().path();
    match (req.method(), path) {
        (&Method::GET, "/healthz") => {
            return json_response(StatusCode::OK, &json!({"status": "ok"}))
        }
        (&Method::GET, "/readyz") => {
            let store = state.store.clone();
            let ready = tokio::task::spawn_blocking(move || store.ping()).await;
            return match ready {
                Ok(Ok(())) => match &state.redis {
                    None => {
                        json_response(StatusCode::OK, &json!({"status": "ready", "store": "ok"}))
                    }
                    // Not ready while Redis is down in closed mode (budgeted traffic gets 503).
                    Some(r) => {
                        let (ready, redis) = r.readiness();
                        let (code, status) = if ready {
                            (StatusCode::OK, "ready")
                        } else {
                            (StatusCode::SERVICE_UNAVAILABLE, "not ready")
                        };
                        json_response(
                            code,
                            &json!({"status": status, "store": "ok", "redis": redis}),
                        )
                    }
                },
                Ok(Err(e)) => json_response(
                    StatusCode::SERVICE_UNAVAILABLE,
                    &json!({"status": "not ready", "store": e.to_string()}),
                ),
                Err(e) => json_response(
                    StatusCode::SERVICE_UNAVAILABLE,
                    &json!({"status": "not ready", "store": e.to_string()}),
                ),
            };
        }
        (&Method::GET, "/metrics") => {
            let mut out = String::new();
            return match prometheus_client::encoding::text::encode(&mut out, &state.registry) {
                Ok(()) => text_response(
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    out,
                ),
                Err(_) => AdminError::Unavailable("cannot encode metrics".into()).to_response(),
            };
        }
        (&Method::GET, "/openapi.json") => return text_response("application/json", openapi::SPEC),
        (&Method::GET, "/docs") => {
            return text_response("text/html; charset=utf-8", openapi::DOCS_HTML)
        }
        (&Method::GET, "/") => {
            return dashboard::response("text/html; charset=utf-8", dashboard::HTML)
        }
        (&Method::GET, "/dashboard.js") => {
            return dashboard::response("text/javascript; charset=utf-8", dashboard::JS)
        }
        _ => {}
    }
    if !path.starts_with("/api/") {
        return AdminError::NotFound(format!("no route {path}; see /docs")).to_response();
    }
    if let Err(e) = check_token(&state, &req) {
        return e.to_response();
    }
    let result = match decode(req).await {
        Ok(cmd) => apply(&state, cmd).await,
        Err(e) => Err(e),
    };
    match result {
        Ok((code, v)) => json_response(code, &v),
        Err(e) => e.to_response(),
    }
}

/// Scrape-time metrics derived from the config and the ledger.
struct Scrape {
    queues: Arc<Queues>,
    live: Arc<LiveConfig>,
    ledger: Arc<Ledger>,
    clock: Arc<dyn Clock>,
    metrics: Arc<Metrics>,
    alerts: Option<Arc<dyn AlertSource>>,
}

impl std::fmt::Debug for Scrape {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Scrape")
    }
}

impl Collector for Scrape {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        self.metrics.encode_counters(&mut encoder)?;
        let config = self.live.get();
        let now = self.clock.now();
        let mut ratios: Vec<(String, f64)> = Vec::new();
        let mut ids: Vec<String> = config.agents().keys().cloned().collect();
        ids.extend(
            self.ledger
                .agent_ids()
                .into_iter()
                .filter(|a| !config.agents().contains_key(a)),
        );
        for id in ids {
            let b = config.budget_for(&id);
            let used = self
                .ledger
                .totals(&id, &b.period, now)
                .map_or(0, |t| t.committed_tokens);
            ratios.push((id, used as f64 / b.max_tokens.max(1) as f64));
        }
        encode_gauges(
            &mut encoder,
            "budget_proxy_budget_used_ratio",
            "Used tokens / max_tokens of the running period, per agent",
            "agent",
            ratios.iter().map(|(a, r)| (a.as_str(), *r)),
        )?;
        encode_gauges(
            &mut encoder,
            "budget_proxy_queue_depth",
            "Requests parked by the queue action, per agent",
            "agent",
            self.queues
                .depths()
                .iter()
                .map(|(a, n)| (a.as_str(), *n as f64)),
        )?;
        let (ok, failed) = self.live.reload_counts();
        encode_counter(
            &mut encoder,
            "budget_proxy_config_reloads",
            "budgets.json reloads applied",
            ok,
        )?;
        encode_counter(
            &mut encoder,
            "budget_proxy_config_reload_failures",
            "budgets.json reloads refused (the last good config stayed)",
            failed,
        )?;
        let (wok, wfailed) = self.alerts.as_ref().map_or((0, 0), |a| a.webhook_counts());
        encode_counter(
            &mut encoder,
            "budget_proxy_webhook_deliveries",
            "Alert webhook deliveries that succeeded",
            wok,
        )?;
        encode_counter(
            &mut encoder,
            "budget_proxy_webhook_failures",
            "Alert webhook deliveries that failed after all retries",
            wfailed,
        )?;
        Ok(())
    }
}
