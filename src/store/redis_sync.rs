//! Several replicas, one budget: the replica sync layer over Redis (`--redis-url`).
//!
//! The hot path stays local and synchronous (`Ledger::admit` under the agent's mutex). This
//! layer keeps the replicas' ledgers converged and bounds what they may spend together:
//!
//! - **Write-back.** Every change the ledger makes (usage, refusals, rekeys, resets) also
//!   arrives here. One task sends them to Redis in rounds — at once when a request waits on
//!   one, else every [`RedisSettings::interval`] — one pipelined round trip per round, one
//!   [`SYNC_SCRIPT`](super::redis::SYNC_SCRIPT) call per agent. A batch has a number; the
//!   script records the last number applied per replica, so a batch resent after a lost
//!   reply, a Redis outage or a restart (the outbox file) is applied exactly once.
//! - **Read-back.** Each reply carries the agent's shared totals; the ledger then shows
//!   shared totals + what this replica sent that Redis has not confirmed. Replicas announce
//!   the agents they wrote on pub/sub, and the others pull those agents' totals.
//! - **Leases.** Admission also needs a lease: tokens this replica may hold (reservations in
//!   flight + usage not yet written back), granted by the script out of the budget no other
//!   replica holds, with a time-to-live, renewed while used. Far from the limit a lease is a
//!   fair share of what remains, so requests need no round trip; when it runs out (near the
//!   limit, at a new period, a new agent) the request waits for one round that asks for
//!   exactly what it needs — an exact per-request reservation in Redis. A lease of a replica
//!   that died expires.
//! - **Events.** Admin updates and resets, and alerts, go to every replica on pub/sub.
//! - **Failure.** Redis unreachable: reconnect with backoff; `open` mode keeps serving on the
//!   local view (leases off) and keeps every change, written to an outbox file every second
//!   while Redis is away and sent when it returns; `closed` mode answers 503 to budgeted
//!   requests.

use super::redis::{
    agent_prefix, alert_key, applied_key, coalesce, op_agent, op_json, parse_reply, SyncReply,
    ALERT_ID_KEY, EVENTS_CHANNEL, KEEP_AFTER_PERIOD_SECS, SYNC_SCRIPT,
};
use super::{AlertRow, StoreOp, UsageDelta};
use crate::budget::alerts::{Alert, AlertCenter, AlertClaims};
use crate::budget::ledger::{Ledger, PeriodCounts, RemoteUpdate};
use crate::budget::period::window;
use crate::budget::queue::Queues;
use crate::clock::Clock;
use crate::config::live::LiveConfig;
use crate::config::Config;
use bytes::Bytes;
use dashmap::DashMap;
use futures_util::StreamExt as _;
use http::{Response, StatusCode};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use serde_json::{json, Value};
use std::collections::{HashMap, HashSet, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot, Notify};

/// Tunables of the sync layer.
#[derive(Debug, Clone)]
pub struct RedisSettings {
    /// `redis://host:port/db`.
    pub url: String,
    /// Where the outbox file goes (the embedded store's directory).
    pub state_dir: PathBuf,
    /// Longest time a change waits before it is written back (and other replicas see it).
    pub interval: Duration,
    /// Lease time-to-live (renewed while used; a dead replica's lease frees after it).
    pub lease_ttl: Duration,
    /// Longest wait of a request for a lease round (then the failure mode applies).
    pub lease_wait: Duration,
}

impl RedisSettings {
    /// Defaults for `url`.
    pub fn new(url: &str, state_dir: PathBuf) -> Self {
        Self {
            url: url.to_string(),
            state_dir,
            interval: Duration::from_millis(20),
            lease_ttl: Duration::from_secs(3),
            lease_wait: Duration::from_secs(1),
        }
    }
}

/// A formed batch: sent until Redis confirms it, then dropped.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct Batch {
    replica: String,
    seq: u64,
    agent: String,
    ops: Vec<OpRecord>,
}

/// A [`StoreOp`] as the outbox file keeps it.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(tag = "k", rename_all = "lowercase")]
enum OpRecord {
    Add {
        p: i64,
        e: Option<i64>,
        m: String,
        tokens: u64,
        prompt: u64,
        completion: u64,
        cached: u64,
        requests: u64,
        blocked: u64,
        /// pico-USD as a decimal string (exact).
        cost: String,
    },
    Rekey {
        f: i64,
        t: i64,
        e: Option<i64>,
    },
    Reset {
        p: i64,
    },
}

impl OpRecord {
    fn from_op(op: &StoreOp) -> Option<OpRecord> {
        Some(match op {
            StoreOp::Add(d) => OpRecord::Add {
                p: d.period_start,
                e: d.period_end,
                m: d.model.clone(),
                tokens: d.total_tokens,
                prompt: d.prompt_tokens,
                completion: d.completion_tokens,
                cached: d.cached_tokens,
                requests: d.requests,
                blocked: d.blocked,
                cost: d.cost_pico.to_string(),
            },
            StoreOp::Rekey {
                from_start,
                to_start,
                to_end,
                ..
            } => OpRecord::Rekey {
                f: *from_start,
                t: *to_start,
                e: *to_end,
            },
            StoreOp::Reset { period_start, .. } => OpRecord::Reset { p: *period_start },
            StoreOp::Alert(_) => return None,
        })
    }

    fn to_op(&self, agent: &str) -> StoreOp {
        match self {
            OpRecord::Add {
                p,
                e,
                m,
                tokens,
                prompt,
                completion,
                cached,
                requests,
                blocked,
                cost,
            } => StoreOp::Add(UsageDelta {
                agent: agent.to_string(),
                period_start: *p,
                period_end: *e,
                model: m.clone(),
                hour_start: 0,
                prompt_tokens: *prompt,
                completion_tokens: *completion,
                cached_tokens: *cached,
                total_tokens: *tokens,
                requests: *requests,
                blocked: *blocked,
                cost_pico: cost.parse().unwrap_or(0),
            }),
            OpRecord::Rekey { f, t, e } => StoreOp::Rekey {
                agent: agent.to_string(),
                from_start: *f,
                to_start: *t,
                to_end: *e,
            },
            OpRecord::Reset { p } => StoreOp::Reset {
                agent: agent.to_string(),
                period_start: *p,
            },
        }
    }
}

impl Batch {
    fn counts(&self) -> PeriodCounts {
        let mut c = PeriodCounts::default();
        for op in &self.ops {
            if let StoreOp::Add(d) = op.to_op(&self.agent) {
                c.add_delta(&d);
            }
        }
        c
    }

    fn ops_json(&self) -> String {
        let ops: Vec<Value> = self
            .ops
            .iter()
            .filter_map(|o| op_json(&o.to_op(&self.agent)))
            .collect();
        Value::Array(ops).to_string()
    }

    fn has_adds(&self) -> bool {
        self.ops.iter().any(|o| matches!(o, OpRecord::Add { .. }))
    }

    fn resets(&self) -> impl Iterator<Item = i64> + '_ {
        self.ops.iter().filter_map(|o| match o {
            OpRecord::Reset { p } => Some(*p),
            _ => None,
        })
    }
}

/// Per-agent state of the sync task.
#[derive(Debug)]
struct AgentSync {
    /// New changes, not yet in a batch.
    buffer: Vec<StoreOp>,
    /// Formed batches, oldest first, sent until confirmed.
    batches: VecDeque<Batch>,
    /// When this replica's lease runs out (local clock, with a safety margin).
    lease_until: Option<Instant>,
    /// The last time a request or a change of this agent was seen here.
    active_at: Instant,
}

impl AgentSync {
    fn new() -> Self {
        Self {
            buffer: Vec::new(),
            batches: VecDeque::new(),
            lease_until: None,
            active_at: Instant::now(),
        }
    }
}

#[derive(Debug, Default)]
struct Stats {
    rounds: AtomicU64,
    round_errors: AtomicU64,
    connects: AtomicU64,
    lease_waits: AtomicU64,
    lease_wait_failures: AtomicU64,
    closed_refusals: AtomicU64,
    buffered_ops: AtomicU64,
    batches_applied: AtomicU64,
    batches_deduplicated: AtomicU64,
    events_received: AtomicU64,
}

struct Inner {
    settings: RedisSettings,
    client: redis::Client,
    replica: String,
    ledger: Arc<Ledger>,
    live: Arc<LiveConfig>,
    queues: Arc<Queues>,
    alerts: Weak<AlertCenter>,
    clock: Arc<dyn Clock>,
    /// A connection for publishes and alert claims (the task has its own clone).
    conn: Mutex<Option<redis::aio::MultiplexedConnection>>,
    up: AtomicBool,
    /// Requests waiting for a lease round, per agent.
    urgent: Mutex<HashMap<String, Vec<oneshot::Sender<bool>>>>,
    /// Agents to read back (another replica wrote them).
    pulls: Mutex<HashSet<String>>,
    /// Agents whose last lease round found no budget: until then, requests do not wait.
    exhausted: DashMap<String, Instant>,
    wake: Notify,
    stopping: AtomicBool,
    /// Turns true at shutdown (ends the pub/sub task).
    stopped: tokio::sync::watch::Sender<bool>,
    stats: Stats,
    last_error: Mutex<Option<String>>,
}

/// The replica sync layer (cheap to clone).
#[derive(Clone)]
pub struct RedisSync {
    inner: Arc<Inner>,
    task: Arc<Mutex<Option<tokio::task::JoinHandle<()>>>>,
}

impl std::fmt::Debug for RedisSync {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisSync")
            .field("replica", &self.inner.replica)
            .field("up", &self.inner.up.load(Ordering::Relaxed))
            .finish()
    }
}

/// What the gate decided about a request before the proxy sees it.
pub enum Gate {
    /// Go on to the proxy.
    Pass,
    /// Answer this instead (503 in `closed` mode while Redis is down).
    Reply(Response<crate::proxy::body::ResponseBody>),
    /// Wait for a lease round, then go on.
    Wait(oneshot::Receiver<bool>, Duration),
}

fn new_replica_id() -> String {
    use sha2::{Digest, Sha256};
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let probe = Box::new(0u8);
    let seed = format!(
        "{now}:{}:{:p}:{:?}",
        std::process::id(),
        &*probe,
        std::thread::current().id()
    );
    hex::encode(&Sha256::digest(seed.as_bytes())[..8])
}

fn closed_mode(config: &Config) -> bool {
    config.redis_failure_mode == "closed"
}

fn unavailable(msg: &str) -> Response<crate::proxy::body::ResponseBody> {
    let body: Bytes = crate::gemini::error_body(503, "UNAVAILABLE", msg, Some(1));
    let mut r = Response::new(crate::proxy::body::ResponseBody::full(body));
    *r.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json; charset=UTF-8"),
    );
    r.headers_mut()
        .insert(http::header::RETRY_AFTER, http::HeaderValue::from(1u32));
    r
}

impl RedisSync {
    /// Connect (waiting at most `connect_wait` for Redis: an unreachable Redis is a failure
    /// mode, not a start-up error), replay the outbox, read every configured agent's totals,
    /// and start the sync and pub/sub tasks.
    #[allow(clippy::too_many_arguments)]
    pub async fn start(
        settings: RedisSettings,
        rx: mpsc::UnboundedReceiver<StoreOp>,
        ledger: Arc<Ledger>,
        live: Arc<LiveConfig>,
        queues: Arc<Queues>,
        alerts: &Arc<AlertCenter>,
        clock: Arc<dyn Clock>,
        connect_wait: Duration,
    ) -> anyhow::Result<RedisSync> {
        let client = redis::Client::open(settings.url.as_str()).map_err(|e| {
            anyhow::anyhow!(
                "invalid --redis-url {:?}: {e} (expected redis://host:port[/db])",
                settings.url
            )
        })?;
        let inner = Arc::new(Inner {
            settings,
            client,
            replica: new_replica_id(),
            ledger,
            live,
            queues,
            alerts: Arc::downgrade(alerts),
            clock,
            conn: Mutex::new(None),
            up: AtomicBool::new(false),
            urgent: Mutex::new(HashMap::new()),
            pulls: Mutex::new(HashSet::new()),
            exhausted: DashMap::new(),
            wake: Notify::new(),
            stopping: AtomicBool::new(false),
            stopped: tokio::sync::watch::channel(false).0,
            stats: Stats::default(),
            last_error: Mutex::new(None),
        });
        let mut task = Task {
            inner: inner.clone(),
            rx,
            agents: HashMap::new(),
            next_seq: 1,
            conn: None,
            script_sha: redis::Script::new(SYNC_SCRIPT).get_hash().to_string(),
            outbox_written: None,
        };
        task.load_outbox();
        let (ready_tx, ready_rx) = oneshot::channel();
        let handle = tokio::spawn(task.run(ready_tx));
        tokio::spawn(pubsub_loop(inner.clone()));
        let sync = RedisSync {
            inner: inner.clone(),
            task: Arc::new(Mutex::new(Some(handle))),
        };
        alerts.set_claims(Arc::new(Claims(Arc::downgrade(&inner))));
        match tokio::time::timeout(connect_wait, ready_rx).await {
            Ok(Ok(())) => {
                tracing::info!(target: "redis", replica = %inner.replica, url = %redacted(&inner.settings.url), "shared counters in Redis: connected and synced")
            }
            _ => {
                let mode = inner.live.get().redis_failure_mode.clone();
                tracing::error!(target: "redis", url = %redacted(&inner.settings.url), mode = %mode,
                    "Redis is unreachable at start-up; serving in {mode} failure mode and reconnecting in the background")
            }
        }
        Ok(sync)
    }

    /// This replica's id in Redis (lease holder, batch origin).
    pub fn replica_id(&self) -> &str {
        &self.inner.replica
    }

    /// Whether Redis answers.
    pub fn is_up(&self) -> bool {
        self.inner.up.load(Ordering::Acquire)
    }

    /// The check in front of the proxy: budgeted requests of an agent whose lease cannot
    /// admit them wait for one lease round; in `closed` mode with Redis down they get 503.
    pub fn gate(&self, req: &crate::server::ClientRequest) -> Gate {
        let req = &req.head;
        if req.method != http::Method::POST {
            return Gate::Pass;
        }
        let inner = &self.inner;
        let config = inner.live.get();
        let path = req.target.path();
        let Ok(ident) = crate::identity::identify(path, req.target.query(), &req.headers, &config)
        else {
            return Gate::Pass;
        };
        let rest = path.get(ident.prefix_len..).unwrap_or("");
        let budgeted = crate::gemini::parse_model_call(if rest.is_empty() { "/" } else { rest })
            .is_some_and(|c| c.method != "countTokens");
        if !budgeted {
            return Gate::Pass;
        }
        if !self.is_up() {
            if closed_mode(&config) {
                inner.stats.closed_refusals.fetch_add(1, Ordering::Relaxed);
                return Gate::Reply(unavailable(&format!(
                    "the budget of agent {:?} cannot be checked: the shared budget store (Redis) is unreachable and redis_failure_mode is \"closed\"; retry shortly",
                    ident.agent
                )));
            }
            return Gate::Pass;
        }
        let budget = config.agent(&ident.agent).unwrap_or(&config.default);
        let now = inner.clock.now();
        let Ok(entry) = inner.ledger.entry(
            &ident.agent,
            &budget.period,
            now,
            ident.dynamic.then_some(config.max_dynamic_agents),
        ) else {
            return Gate::Pass;
        };
        let status = inner.ledger.lease_status(&entry, budget, now);
        if status.has_headroom() {
            return Gate::Pass;
        }
        if inner
            .exhausted
            .get(&ident.agent)
            .is_some_and(|until| *until > Instant::now())
        {
            return Gate::Pass;
        }
        inner.stats.lease_waits.fetch_add(1, Ordering::Relaxed);
        Gate::Wait(self.request_lease(&ident.agent), inner.settings.lease_wait)
    }

    /// Ask the task for a lease round for `agent`; the receiver says whether it happened.
    fn request_lease(&self, agent: &str) -> oneshot::Receiver<bool> {
        let (tx, rx) = oneshot::channel();
        lock(&self.inner.urgent)
            .entry(agent.to_string())
            .or_default()
            .push(tx);
        self.inner.wake.notify_one();
        rx
    }

    /// Wait for a [`Gate::Wait`]; returns the reply to send instead of going on, if any.
    pub async fn wait(
        &self,
        rx: oneshot::Receiver<bool>,
        limit: Duration,
    ) -> Option<Response<crate::proxy::body::ResponseBody>> {
        let ok = matches!(tokio::time::timeout(limit, rx).await, Ok(Ok(true)));
        if ok {
            return None;
        }
        self.inner
            .stats
            .lease_wait_failures
            .fetch_add(1, Ordering::Relaxed);
        if closed_mode(&self.inner.live.get()) {
            self.inner
                .stats
                .closed_refusals
                .fetch_add(1, Ordering::Relaxed);
            return Some(unavailable(
                "the shared budget store (Redis) did not answer in time and redis_failure_mode is \"closed\"; retry shortly",
            ));
        }
        None
    }

    /// Tell the other replicas about an admin update of `agent` (they apply the same patch
    /// to their budgets.json).
    pub async fn publish_update(&self, agent: &str, patch: &Value) {
        let msg =
            json!({"origin": self.inner.replica, "kind": "update", "agent": agent, "patch": patch});
        if let Err(e) = self.inner.publish(&msg).await {
            tracing::error!(target: "redis", agent, error = %e,
                "could not publish the budget update to the other replicas; apply it there too (their budgets.json)");
        }
    }

    /// What `/readyz` shows: (ready, details). Not ready while Redis is down in `closed`
    /// mode (budgeted traffic is refused).
    pub fn readiness(&self) -> (bool, Value) {
        let inner = &self.inner;
        let up = self.is_up();
        let mode = inner.live.get().redis_failure_mode.clone();
        let buffered = inner.stats.buffered_ops.load(Ordering::Relaxed);
        let details = json!({
            "state": if up { "up" } else { "down" },
            "failure_mode": mode,
            "replica": inner.replica,
            "buffered_ops": buffered,
            "last_error": if up { None } else { lock(&inner.last_error).clone() },
        });
        (up || mode != "closed", details)
    }

    /// Prometheus metrics of the sync layer.
    pub fn collector(&self) -> Box<dyn Collector> {
        Box::new(SyncCollector(self.inner.clone()))
    }

    /// Write back everything (at most `deadline`); what Redis did not take goes to the
    /// outbox file, sent by the next start.
    pub async fn shutdown(&self, deadline: Duration) {
        self.inner.stopping.store(true, Ordering::Release);
        self.inner.wake.notify_one();
        let handle = lock(&self.task).take();
        if let Some(h) = handle {
            if tokio::time::timeout(deadline, h).await.is_err() {
                tracing::warn!(target: "redis", "write-back to Redis did not finish within the shutdown deadline");
            }
        }
        let _ = self.inner.stopped.send(true);
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn redacted(url: &str) -> String {
    match url.split_once('@') {
        Some((scheme_auth, host)) => {
            let scheme = scheme_auth.split("://").next().unwrap_or("redis");
            format!("{scheme}://***@{host}")
        }
        None => url.to_string(),
    }
}

impl Inner {
    fn connection(&self) -> Option<redis::aio::MultiplexedConnection> {
        lock(&self.conn).clone()
    }

    async fn publish(&self, msg: &Value) -> anyhow::Result<()> {
        let mut conn = self
            .connection()
            .ok_or_else(|| anyhow::anyhow!("Redis is not connected"))?;
        let _: i64 = redis::cmd("PUBLISH")
            .arg(EVENTS_CHANNEL)
            .arg(msg.to_string())
            .query_async(&mut conn)
            .await?;
        Ok(())
    }

    fn set_down(&self, error: String) {
        let was_up = self.up.swap(false, Ordering::AcqRel);
        if was_up {
            tracing::error!(target: "redis", error = %error, mode = %self.live.get().redis_failure_mode,
                "Redis is unreachable; reconnecting with backoff");
        }
        *lock(&self.last_error) = Some(error);
        *lock(&self.conn) = None;
        // open: each replica enforces its own view until Redis returns.
        self.ledger.set_leased(closed_mode(&self.live.get()));
        for (_, waiters) in lock(&self.urgent).drain() {
            for w in waiters {
                let _ = w.send(false);
            }
        }
    }

    /// Parked requests (and, when `jobs`, deferred jobs) of `agent` may go now.
    fn release_waiters(&self, agent: &str, jobs: bool) {
        if jobs || self.queues.has_waiters(agent) {
            let config = self.live.get();
            self.queues
                .release_agent(&self.ledger, &config, agent, self.clock.now());
        }
    }

    /// A message from another replica.
    fn on_event(self: &Arc<Self>, v: Value) {
        if v["origin"].as_str() == Some(self.replica.as_str()) {
            return;
        }
        self.stats.events_received.fetch_add(1, Ordering::Relaxed);
        match v["kind"].as_str() {
            Some("usage") => {
                if let Some(agents) = v["agents"].as_array() {
                    let mut pulls = lock(&self.pulls);
                    for a in agents.iter().filter_map(Value::as_str) {
                        pulls.insert(a.to_string());
                    }
                }
            }
            Some("reset") => {
                let (Some(agent), Some(start)) = (v["agent"].as_str(), v["start"].as_i64()) else {
                    return;
                };
                self.ledger.reset_view(agent, start);
                self.exhausted.remove(agent);
                lock(&self.pulls).insert(agent.to_string());
                tracing::info!(target: "redis", agent, "budget reset on another replica");
                if self.queues.has_waiters(agent) {
                    lock(&self.urgent).entry(agent.to_string()).or_default();
                }
                self.wake.notify_one();
            }
            Some("update") => {
                let (Some(agent), Some(patch)) = (v["agent"].as_str(), v.get("patch")) else {
                    return;
                };
                let (live, agent, patch) = (self.live.clone(), agent.to_string(), patch.clone());
                self.exhausted.remove(&agent);
                let me = self.clone();
                tokio::spawn(async move {
                    let a = agent.clone();
                    let r =
                        tokio::task::spawn_blocking(move || live.update_agent(&a, &patch)).await;
                    match r {
                        Ok(Ok(_)) => {
                            me.exhausted.remove(&agent);
                            lock(&me.urgent).entry(agent.clone()).or_default();
                            me.wake.notify_one();
                        }
                        Ok(Err(e)) => tracing::error!(target: "redis", agent = %agent, error = %e,
                            "a budget update from another replica does not apply to this replica's budgets.json"),
                        Err(e) => {
                            tracing::error!(target: "redis", error = %e, "update task failed")
                        }
                    }
                });
            }
            Some("alert") => {
                let Some(center) = self.alerts.upgrade() else {
                    return;
                };
                if let Ok(row) = serde_json::from_value::<AlertWire>(v["alert"].clone()) {
                    center.record_remote(&row.into_row());
                }
            }
            _ => {}
        }
    }
}

/// An alert on the wire.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct AlertWire {
    id: u64,
    agent: String,
    period_start: i64,
    period_end: Option<i64>,
    threshold_percent: u32,
    level: String,
    percentage_hundredths: u64,
    created_at_ms: i64,
    message: String,
}

impl AlertWire {
    fn from_row(r: &AlertRow) -> Self {
        AlertWire {
            id: r.id,
            agent: r.agent.clone(),
            period_start: r.period_start,
            period_end: r.period_end,
            threshold_percent: r.threshold_percent,
            level: r.level.clone(),
            percentage_hundredths: r.percentage_hundredths,
            created_at_ms: r.created_at_ms,
            message: r.message.clone(),
        }
    }

    fn into_row(self) -> AlertRow {
        AlertRow {
            id: self.id,
            agent: self.agent,
            period_start: self.period_start,
            period_end: self.period_end,
            threshold_percent: self.threshold_percent,
            level: self.level,
            percentage_hundredths: self.percentage_hundredths,
            created_at_ms: self.created_at_ms,
            message: self.message,
        }
    }
}

/// Alert keys claimed across replicas with `SET NX`.
struct Claims(Weak<Inner>);

impl AlertClaims for Claims {
    fn claim(&self, alert: Alert, period_end: Option<i64>) {
        let Some(inner) = self.0.upgrade() else {
            return;
        };
        tokio::spawn(async move {
            let Some(center) = inner.alerts.upgrade() else {
                return;
            };
            let start = alert.period_start.timestamp();
            let key = alert_key(&alert.agent_id, start, alert.threshold_percent);
            let claimed = async {
                let mut conn = inner
                    .connection()
                    .ok_or_else(|| anyhow::anyhow!("Redis is not connected"))?;
                let mut set = redis::cmd("SET");
                set.arg(&key).arg(&inner.replica).arg("NX");
                if let Some(end) = period_end {
                    set.arg("PXAT")
                        .arg((end + KEEP_AFTER_PERIOD_SECS).saturating_mul(1000));
                }
                let won: Option<String> = set.query_async(&mut conn).await?;
                if won.is_none() {
                    return Ok::<_, anyhow::Error>(None);
                }
                let id: u64 = redis::cmd("INCR")
                    .arg(ALERT_ID_KEY)
                    .query_async(&mut conn)
                    .await?;
                Ok(Some(id))
            }
            .await;
            match claimed {
                Ok(Some(id)) => {
                    let row = center.deliver(alert, Some(id), period_end);
                    let msg = json!({"origin": inner.replica, "kind": "alert", "alert": AlertWire::from_row(&row)});
                    if let Err(e) = inner.publish(&msg).await {
                        tracing::warn!(target: "redis", error = %e, "could not share an alert with the other replicas");
                    }
                }
                Ok(None) => {} // another replica raised it; its message brings it here
                Err(e) => {
                    // Better twice than never: raise it here.
                    tracing::warn!(target: "redis", error = %e, "alert claim in Redis failed; raising the alert on this replica only");
                    center.deliver(alert, None, period_end);
                }
            }
        });
    }
}

/// The sync task's own state.
struct Task {
    inner: Arc<Inner>,
    rx: mpsc::UnboundedReceiver<StoreOp>,
    agents: HashMap<String, AgentSync>,
    next_seq: u64,
    conn: Option<redis::aio::MultiplexedConnection>,
    script_sha: String,
    /// When the outbox file was last written (`None`: no file of ours).
    outbox_written: Option<Instant>,
}

/// One agent's part of a round.
struct Part {
    agent: String,
    batches: Vec<Batch>,
    period_start: i64,
    /// Lease request: (held, want); `None`: only report.
    lease: Option<(u64, u64)>,
    waiters: Vec<oneshot::Sender<bool>>,
}

impl Task {
    fn outbox_path(&self) -> PathBuf {
        self.inner.settings.state_dir.join("redis-outbox.json")
    }

    /// Batches a previous run could not write back: sent first, exactly once (their
    /// original replica id and number are kept), and counted in the local view meanwhile.
    fn load_outbox(&mut self) {
        let path = self.outbox_path();
        let Ok(text) = std::fs::read_to_string(&path) else {
            return;
        };
        let batches: Vec<Batch> = match serde_json::from_str(&text) {
            Ok(b) => b,
            Err(e) => {
                tracing::error!(target: "redis", path = %path.display(), error = %e, "unreadable Redis outbox; left in place");
                return;
            }
        };
        let n = batches.len();
        for b in batches {
            self.note_pending(&b);
            self.agents
                .entry(b.agent.clone())
                .or_insert_with(AgentSync::new)
                .batches
                .push_back(b);
        }
        self.outbox_written = Some(Instant::now());
        tracing::info!(target: "redis", batches = n, "Redis outbox of a previous run loaded; writing it back");
    }

    /// Count a replayed batch's usage as pending in the ledger (it is not in Redis yet).
    fn note_pending(&self, b: &Batch) {
        let config = self.inner.live.get();
        let budget = config.budget_for(&b.agent);
        let now = self.inner.clock.now();
        self.inner
            .ledger
            .add_pending(&b.agent, &budget.period, now, &b.counts());
    }

    fn write_outbox(&mut self) {
        let all: Vec<&Batch> = self
            .agents
            .values()
            .flat_map(|a| a.batches.iter())
            .collect();
        let path = self.outbox_path();
        if all.is_empty() {
            if self.outbox_written.take().is_some() {
                let _ = std::fs::remove_file(&path);
            }
            return;
        }
        let text = match serde_json::to_string(&all) {
            Ok(t) => t,
            Err(_) => return,
        };
        let tmp = path.with_extension("json.tmp");
        let r = std::fs::create_dir_all(&self.inner.settings.state_dir)
            .and_then(|_| std::fs::write(&tmp, text))
            .and_then(|_| std::fs::rename(&tmp, &path));
        match r {
            Ok(()) => self.outbox_written = Some(Instant::now()),
            Err(e) => {
                tracing::error!(target: "redis", path = %path.display(), error = %e, "cannot write the Redis outbox")
            }
        }
    }

    /// Move every change received into per-agent buffers.
    fn drain(&mut self) {
        while let Ok(op) = self.rx.try_recv() {
            let Some(agent) = op_agent(&op).map(str::to_string) else {
                continue;
            };
            let a = self.agents.entry(agent).or_insert_with(AgentSync::new);
            a.buffer.push(op);
            a.active_at = Instant::now();
        }
        let n: usize = self
            .agents
            .values()
            .map(|a| a.buffer.len() + a.batches.iter().map(|b| b.ops.len()).sum::<usize>())
            .sum();
        self.inner
            .stats
            .buffered_ops
            .store(n as u64, Ordering::Relaxed);
    }

    /// Form batches of the buffers (one per agent with changes).
    fn form_batches(&mut self) {
        for (agent, a) in self.agents.iter_mut() {
            if a.buffer.is_empty() {
                continue;
            }
            let ops: Vec<OpRecord> = coalesce(std::mem::take(&mut a.buffer))
                .iter()
                .filter_map(OpRecord::from_op)
                .collect();
            if ops.is_empty() {
                continue;
            }
            a.batches.push_back(Batch {
                replica: self.inner.replica.clone(),
                seq: self.next_seq,
                agent: agent.clone(),
                ops,
            });
            self.next_seq += 1;
        }
    }

    async fn connect(&mut self) -> Result<(), String> {
        let inner = &self.inner;
        let config = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Duration::from_secs(1))
            .set_response_timeout(Duration::from_secs(2));
        let mut conn = inner
            .client
            .get_multiplexed_async_connection_with_config(&config)
            .await
            .map_err(|e| e.to_string())?;
        let sha: String = redis::cmd("SCRIPT")
            .arg("LOAD")
            .arg(SYNC_SCRIPT)
            .query_async(&mut conn)
            .await
            .map_err(|e| e.to_string())?;
        self.script_sha = sha;
        *lock(&inner.conn) = Some(conn.clone());
        self.conn = Some(conn);
        inner.stats.connects.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    async fn run(mut self, ready: oneshot::Sender<()>) {
        let mut ready = Some(ready);
        let mut backoff = Duration::from_millis(50);
        let mut last_round = Instant::now();
        loop {
            let stopping = self.inner.stopping.load(Ordering::Acquire);
            self.drain();
            if self.conn.is_none() {
                match self.connect().await {
                    Ok(()) => {
                        backoff = Duration::from_millis(50);
                        // Read back everything known: events may have been missed.
                        let mut pulls = lock(&self.inner.pulls);
                        for a in self.inner.live.get().agents().keys() {
                            pulls.insert(a.clone());
                        }
                        for a in self.inner.ledger.agent_ids() {
                            pulls.insert(a);
                        }
                    }
                    Err(e) => {
                        self.inner.set_down(e);
                        self.form_batches();
                        let stale = self
                            .outbox_written
                            .is_none_or(|t| t.elapsed() >= Duration::from_secs(1));
                        if stopping || stale {
                            self.write_outbox();
                        }
                        if stopping {
                            return;
                        }
                        tokio::select! {
                            _ = tokio::time::sleep(backoff) => {}
                            _ = self.inner.wake.notified() => {
                                tokio::time::sleep(Duration::from_millis(10).min(backoff)).await;
                            }
                        }
                        backoff = (backoff * 2).min(Duration::from_secs(2));
                        continue;
                    }
                }
            }
            match self.round().await {
                Ok(did) => {
                    if !self.inner.up.swap(true, Ordering::AcqRel) {
                        self.inner.ledger.set_leased(true);
                        tracing::info!(target: "redis", replica = %self.inner.replica, "Redis is reachable; shared counters in sync");
                    }
                    if let Some(r) = ready.take() {
                        let _ = r.send(());
                    }
                    if did {
                        last_round = Instant::now();
                    } else if last_round.elapsed() >= Duration::from_secs(1) {
                        // Idle: a heartbeat so an outage is seen without traffic.
                        if let Some(conn) = self.conn.as_mut() {
                            let pong: redis::RedisResult<String> =
                                redis::cmd("PING").query_async(conn).await;
                            if let Err(e) = pong {
                                self.fail(e.to_string());
                                continue;
                            }
                        }
                        last_round = Instant::now();
                    }
                    if self.outbox_written.is_some() && self.unconfirmed() == 0 {
                        self.write_outbox();
                    }
                }
                Err(e) => {
                    self.fail(e);
                    continue;
                }
            }
            if stopping {
                self.drain();
                if self.unconfirmed() == 0 {
                    return;
                }
                continue;
            }
            tokio::select! {
                _ = tokio::time::sleep(self.inner.settings.interval) => {}
                _ = self.inner.wake.notified() => {}
            }
        }
    }

    fn fail(&mut self, e: String) {
        self.inner
            .stats
            .round_errors
            .fetch_add(1, Ordering::Relaxed);
        self.conn = None;
        self.inner.set_down(e);
    }

    fn unconfirmed(&self) -> usize {
        self.agents
            .values()
            .map(|a| a.buffer.len() + a.batches.len())
            .sum()
    }

    /// One round: every agent with changes, waiting requests, a lease to renew or release,
    /// or totals to read back. Returns whether anything was sent.
    async fn round(&mut self) -> Result<bool, String> {
        let inner = self.inner.clone();
        self.form_batches();
        let now_i = Instant::now();
        let now = inner.clock.now();
        let config = inner.live.get();
        let ttl = inner.settings.lease_ttl;
        let mut urgent: HashMap<String, Vec<oneshot::Sender<bool>>> =
            std::mem::take(&mut *lock(&inner.urgent));
        // Admissions that missed only a lease (deferred jobs, releases) and parked
        // requests need one.
        let wanted = inner.ledger.take_lease_wanted();
        let wanted_set: HashSet<String> = wanted.iter().map(|a| a.to_string()).collect();
        for agent in inner.queues.agents_waiting().into_iter().chain(wanted) {
            if inner
                .exhausted
                .get(&*agent)
                .is_none_or(|until| *until <= now_i)
            {
                urgent.entry(agent.to_string()).or_default();
            }
        }
        let mut pulls: HashSet<String> = std::mem::take(&mut *lock(&inner.pulls));
        for a in urgent.keys() {
            pulls.remove(a);
            self.agents
                .entry(a.clone())
                .or_insert_with(AgentSync::new)
                .active_at = now_i;
        }
        let mut parts: Vec<Part> = Vec::new();
        let mut names: Vec<String> = self.agents.keys().cloned().collect();
        names.extend(
            urgent
                .keys()
                .filter(|a| !self.agents.contains_key(*a))
                .cloned(),
        );
        names.extend(
            pulls
                .iter()
                .filter(|a| !self.agents.contains_key(*a))
                .cloned(),
        );
        names.sort();
        names.dedup();
        for agent in names {
            if !self.agents.contains_key(&agent)
                && !urgent.contains_key(&agent)
                && inner.ledger.get(&agent).is_none()
                && !config.agents().contains_key(&agent)
            {
                continue;
            }
            let budget = config.budget_for(&agent);
            let entry = inner.ledger.get(&agent);
            let status = entry
                .as_ref()
                .map(|e| inner.ledger.lease_status(e, budget, now));
            let period_start = status
                .map(|s| s.window.start.timestamp())
                .unwrap_or_else(|| window(&budget.period, now).start.timestamp());
            let waiters = urgent.remove(&agent);
            let a = self
                .agents
                .entry(agent.clone())
                .or_insert_with(AgentSync::new);
            let held = status.map_or(0, |s| s.used);
            let next = status.map_or(0, |s| s.last_estimate).max(1);
            let lease_left = a.lease_until.map(|t| t.saturating_duration_since(now_i));
            if a.lease_until.is_some_and(|t| t <= now_i) {
                inner.ledger.drop_lease(&agent);
                a.lease_until = None;
            }
            let active = a.active_at.elapsed() < ttl;
            let lease = if let Some(w) = &waiters {
                // Enough for every request waiting on this round.
                Some((held, next.saturating_mul(w.len().max(1) as u64)))
            } else if lease_left.is_some_and(|l| l < ttl / 2) {
                if held > 0 || active {
                    Some((held, next))
                } else {
                    // Idle: give the budget back to the others. No admission against the
                    // lease meanwhile (a request now waits for the next round instead).
                    inner.ledger.drop_lease(&agent);
                    Some((0, 0))
                }
            } else {
                None
            };
            let pull = pulls.contains(&agent);
            if a.batches.is_empty() && lease.is_none() && !pull {
                if a.buffer.is_empty() && a.lease_until.is_none() && !active {
                    self.agents.remove(&agent);
                }
                continue;
            }
            parts.push(Part {
                agent,
                batches: a.batches.iter().cloned().collect(),
                period_start,
                lease,
                waiters: waiters.unwrap_or_default(),
            });
        }
        if parts.is_empty() {
            return Ok(false);
        }
        let Some(conn) = self.conn.as_mut() else {
            return Err("not connected".into());
        };
        let keep = KEEP_AFTER_PERIOD_SECS.to_string();
        let ttl_ms = ttl.as_millis().to_string();
        let mut pipe = redis::pipe();
        let mut calls: Vec<(usize, bool, bool)> = Vec::new(); // (part, has a batch, last call)
        let mut published: Vec<String> = Vec::new();
        let mut resets: Vec<(String, i64)> = Vec::new();
        for (i, p) in parts.iter().enumerate() {
            let budget = config.budget_for(&p.agent);
            let period_end = window(&budget.period, now)
                .end
                .map(|e| e.timestamp().to_string())
                .unwrap_or_default();
            let max = budget.max_tokens.min(1 << 52).to_string();
            let n = p.batches.len();
            for j in 0..n.max(1) {
                let last = j + 1 >= n.max(1);
                let (replica, seq, ops) = match p.batches.get(j) {
                    Some(b) => (b.replica.as_str(), b.seq, b.ops_json()),
                    None => ("", 0, "[]".to_string()),
                };
                let (held, want) = match (last, p.lease) {
                    (true, Some((h, w))) => (h.min(1 << 52) as i64, w.min(1 << 52)),
                    _ => (-1, 0),
                };
                pipe.cmd("EVALSHA")
                    .arg(&self.script_sha)
                    .arg(1)
                    .arg(applied_key(&p.agent))
                    .arg(agent_prefix(&p.agent))
                    .arg(replica)
                    .arg(seq)
                    .arg(ops)
                    .arg(p.period_start)
                    .arg(&period_end)
                    .arg(&inner.replica)
                    .arg(held)
                    .arg(want)
                    .arg(&max)
                    .arg(&ttl_ms)
                    .arg(&keep);
                calls.push((i, j < n, last));
            }
            if p.batches.iter().any(Batch::has_adds) {
                published.push(p.agent.clone());
            }
            for b in &p.batches {
                for start in b.resets() {
                    resets.push((p.agent.clone(), start));
                }
            }
        }
        if !published.is_empty() {
            pipe.cmd("PUBLISH").arg(EVENTS_CHANNEL).arg(
                json!({"origin": inner.replica, "kind": "usage", "agents": published}).to_string(),
            );
        }
        for (agent, start) in &resets {
            pipe.cmd("PUBLISH").arg(EVENTS_CHANNEL).arg(
                json!({"origin": inner.replica, "kind": "reset", "agent": agent, "start": start})
                    .to_string(),
            );
        }
        inner.stats.rounds.fetch_add(1, Ordering::Relaxed);
        let sent_at = Instant::now();
        let replies: Vec<redis::Value> = match pipe.query_async(conn).await {
            Ok(r) => r,
            Err(e) => {
                for p in parts {
                    for w in p.waiters {
                        let _ = w.send(false);
                    }
                }
                return Err(e.to_string());
            }
        };
        // Decode everything before changing any state.
        let mut last_reply: HashMap<usize, SyncReply> = HashMap::new();
        for (k, (i, batch, last)) in calls.iter().enumerate() {
            let reply = replies.get(k).and_then(parse_reply).ok_or_else(|| {
                format!(
                    "unexpected reply from the sync script: {:?}",
                    replies.get(k)
                )
            })?;
            if reply.applied {
                inner.stats.batches_applied.fetch_add(1, Ordering::Relaxed);
            } else if *batch {
                inner
                    .stats
                    .batches_deduplicated
                    .fetch_add(1, Ordering::Relaxed);
            }
            if *last {
                last_reply.insert(*i, reply);
            }
        }
        let now = inner.clock.now();
        for (i, p) in parts.into_iter().enumerate() {
            let Some(reply) = last_reply.remove(&i) else {
                continue;
            };
            let a = self
                .agents
                .entry(p.agent.clone())
                .or_insert_with(AgentSync::new);
            let mut acked: Option<PeriodCounts> = None;
            for _ in 0..p.batches.len() {
                if let Some(b) = a.batches.pop_front() {
                    acked.get_or_insert_with(Default::default).add(&b.counts());
                }
            }
            a.lease_until = (reply.lease > 0).then(|| {
                sent_at
                    + Duration::from_millis(reply.lease_ttl_ms)
                        .saturating_sub(Duration::from_millis(100))
            });
            let budget = config.budget_for(&p.agent);
            let create = config.agents().contains_key(&p.agent) || !p.waiters.is_empty();
            let settled = inner.ledger.apply_remote(
                &p.agent,
                &budget.period,
                now,
                RemoteUpdate {
                    period_start: p.period_start,
                    totals: reply.totals,
                    acked,
                    lease: Some(reply.lease),
                },
                create,
            );
            if let (Some(s), Some(center)) = (settled, inner.alerts.upgrade()) {
                center.check(&p.agent, budget, &s, now);
            }
            if p.lease.is_some() {
                let headroom = inner
                    .ledger
                    .get(&p.agent)
                    .map(|e| inner.ledger.lease_status(&e, budget, now).has_headroom())
                    .unwrap_or(false);
                if headroom {
                    inner.exhausted.remove(&p.agent);
                } else {
                    inner
                        .exhausted
                        .insert(p.agent.clone(), Instant::now() + inner.settings.interval);
                }
            }
            inner.release_waiters(&p.agent, wanted_set.contains(&p.agent));
            for w in p.waiters {
                let _ = w.send(true);
            }
        }
        self.drain();
        Ok(true)
    }
}

/// Receive other replicas' events; reconnect with backoff.
async fn pubsub_loop(inner: Arc<Inner>) {
    let mut stopped = inner.stopped.subscribe();
    tokio::select! {
        _ = pubsub_run(inner.clone()) => {}
        _ = stopped.wait_for(|s| *s) => {}
    }
}

async fn pubsub_run(inner: Arc<Inner>) {
    let mut backoff = Duration::from_millis(50);
    loop {
        let sub = async {
            let mut ps = inner.client.get_async_pubsub().await?;
            ps.subscribe(EVENTS_CHANNEL).await?;
            Ok::<_, redis::RedisError>(ps)
        }
        .await;
        match sub {
            Ok(mut ps) => {
                backoff = Duration::from_millis(50);
                {
                    // Events may have been missed while disconnected: read everything back.
                    let mut pulls = lock(&inner.pulls);
                    for a in inner.ledger.agent_ids() {
                        pulls.insert(a);
                    }
                }
                let mut stream = ps.on_message();
                while let Some(msg) = stream.next().await {
                    let Ok(payload) = msg.get_payload::<String>() else {
                        continue;
                    };
                    if let Ok(v) = serde_json::from_str::<Value>(&payload) {
                        inner.on_event(v);
                    }
                }
                // The connection is gone: Redis is probably down; let the task find out now.
                inner.wake.notify_one();
            }
            Err(_) => {
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
        }
    }
}

struct SyncCollector(Arc<Inner>);

impl std::fmt::Debug for SyncCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SyncCollector")
    }
}

impl Collector for SyncCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let s = &self.0.stats;
        let gauge = |encoder: &mut DescriptorEncoder, name: &str, help: &str, v: f64| {
            let e = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
            ConstGauge::new(v).encode(e)
        };
        gauge(
            &mut encoder,
            "budget_proxy_redis_up",
            "1 while Redis (shared counters) answers, 0 while it is unreachable",
            if self.0.up.load(Ordering::Relaxed) {
                1.0
            } else {
                0.0
            },
        )?;
        gauge(
            &mut encoder,
            "budget_proxy_redis_buffered_ops",
            "Changes not yet confirmed by Redis (grows during an outage in open mode)",
            s.buffered_ops.load(Ordering::Relaxed) as f64,
        )?;
        let counters: [(&str, &str, &AtomicU64); 9] = [
            (
                "budget_proxy_redis_rounds",
                "Sync rounds sent to Redis",
                &s.rounds,
            ),
            (
                "budget_proxy_redis_round_errors",
                "Sync rounds that failed (Redis unreachable or erroring)",
                &s.round_errors,
            ),
            (
                "budget_proxy_redis_connects",
                "Connections made to Redis (the first and every reconnect)",
                &s.connects,
            ),
            (
                "budget_proxy_redis_lease_waits",
                "Requests that waited for a lease round",
                &s.lease_waits,
            ),
            (
                "budget_proxy_redis_lease_wait_failures",
                "Requests whose lease round did not happen in time",
                &s.lease_wait_failures,
            ),
            (
                "budget_proxy_redis_closed_refusals",
                "Budgeted requests answered 503 because Redis was down in closed mode",
                &s.closed_refusals,
            ),
            (
                "budget_proxy_redis_batches_applied",
                "Batches of changes Redis applied",
                &s.batches_applied,
            ),
            (
                "budget_proxy_redis_batches_deduplicated",
                "Batches resent after a lost reply and recognised as applied",
                &s.batches_deduplicated,
            ),
            (
                "budget_proxy_redis_events_received",
                "Pub/sub events received from other replicas",
                &s.events_received,
            ),
        ];
        for (name, help, v) in counters {
            let e = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            ConstCounter::new(v.load(Ordering::Relaxed)).encode(e)?;
        }
        Ok(())
    }
}
