//! Alert webhooks: every alert is POSTed to each `alerts.webhooks` entry of budgets.json,
//! off the hot path.
//!
//! The alert center hands alerts to [`Webhooks::enqueue`], which never blocks: the queue is
//! bounded, and a full queue drops the alert (logged and counted in
//! [`WebhookStats::dropped`]). One worker task reads the queue and delivers each (alert,
//! webhook) pair in its own task, at most `concurrency` at a time, retrying connection
//! errors, time-outs, 408, 429 and 5xx with exponential backoff ([`RetryPolicy`]); other
//! answers are final. The webhook list is read from the live config when an alert is sent,
//! so a reload applies to the next alert.
//!
//! Formats: `slack` → `{"text": "…"}`; `json` → the [`Alert`] object.
//! URLs are never logged whole (they often embed a secret token), only their host.
//!
//! Shutdown ([`Webhooks::shutdown`]) stops taking alerts, delivers what is queued and in
//! flight (retries included) within a deadline, then abandons the rest (counted as dropped).

use crate::budget::alerts::{Alert, Level};
use crate::config::{Config, Webhook};
use anyhow::Context as _;
use arc_swap::ArcSwap;
use bytes::Bytes;
use http::header::{CONTENT_TYPE, RETRY_AFTER, USER_AGENT};
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::sync::mpsc::error::TrySendError;
use tokio::sync::{mpsc, watch, Notify, Semaphore};
use tokio::task::{JoinHandle, JoinSet};

/// How a delivery is retried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts in all, the first included (at least 1).
    pub attempts: u32,
    /// Wait before the first retry; doubled for each next one.
    pub initial_backoff: Duration,
    /// Longest wait between attempts (also caps a receiver's `Retry-After`).
    pub max_backoff: Duration,
    /// Longest wait for one attempt's answer (connect, send, status and body).
    pub request_timeout: Duration,
}

impl Default for RetryPolicy {
    /// 5 attempts, waiting 0.5 s, 1 s, 2 s, 4 s between them (capped at 8 s); 10 s per attempt.
    fn default() -> Self {
        Self {
            attempts: 5,
            initial_backoff: Duration::from_millis(500),
            max_backoff: Duration::from_secs(8),
            request_timeout: Duration::from_secs(10),
        }
    }
}

impl RetryPolicy {
    /// The wait before retry number `retry` (1 = after the first failed attempt):
    /// `initial_backoff · 2^(retry−1)`, at most `max_backoff`.
    pub fn backoff(&self, retry: u32) -> Duration {
        let factor = 1u32 << retry.saturating_sub(1).min(20);
        self.initial_backoff
            .saturating_mul(factor)
            .min(self.max_backoff)
    }
}

/// Tunables of the webhook worker.
#[derive(Debug, Clone)]
pub struct WebhookSettings {
    /// Alerts waiting for delivery before new ones are dropped.
    pub queue_capacity: usize,
    /// Deliveries in flight at once.
    pub concurrency: usize,
    /// TCP connect timeout.
    pub connect_timeout: Duration,
    /// Retries.
    pub retry: RetryPolicy,
}

impl Default for WebhookSettings {
    fn default() -> Self {
        Self {
            queue_capacity: 1024,
            concurrency: 8,
            connect_timeout: Duration::from_secs(5),
            retry: RetryPolicy::default(),
        }
    }
}

/// Delivery counters (for metrics). A delivery is one alert to one webhook.
#[derive(Debug, Default)]
pub struct WebhookStats {
    /// Deliveries the receiver accepted (2xx).
    pub deliveries_ok: AtomicU64,
    /// Deliveries given up: attempts exhausted, a final refusal (4xx), or a bad URL.
    pub deliveries_failed: AtomicU64,
    /// Alerts or deliveries never completed: queue full, sent after shutdown, or still
    /// pending at the shutdown deadline.
    pub dropped: AtomicU64,
    /// Attempts after the first.
    pub retries: AtomicU64,
}

/// A copy of [`WebhookStats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WebhookCounts {
    /// See [`WebhookStats::deliveries_ok`].
    pub deliveries_ok: u64,
    /// See [`WebhookStats::deliveries_failed`].
    pub deliveries_failed: u64,
    /// See [`WebhookStats::dropped`].
    pub dropped: u64,
    /// See [`WebhookStats::retries`].
    pub retries: u64,
}

impl WebhookStats {
    /// All zero (usable in a `static`).
    pub const fn new() -> Self {
        Self {
            deliveries_ok: AtomicU64::new(0),
            deliveries_failed: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            retries: AtomicU64::new(0),
        }
    }

    /// The current values.
    pub fn snapshot(&self) -> WebhookCounts {
        WebhookCounts {
            deliveries_ok: self.deliveries_ok.load(Ordering::Relaxed),
            deliveries_failed: self.deliveries_failed.load(Ordering::Relaxed),
            dropped: self.dropped.load(Ordering::Relaxed),
            retries: self.retries.load(Ordering::Relaxed),
        }
    }
}

type HookClient = Client<HttpsConnector<HttpConnector>, Full<Bytes>>;

const USER_AGENT_VALUE: &str = concat!("budget-proxy/", env!("CARGO_PKG_VERSION"));

/// Largest response body read from a receiver (then discarded).
const MAX_RESPONSE_BYTES: usize = 64 * 1024;

struct Inner {
    config: Arc<ArcSwap<Config>>,
    client: HookClient,
    retry: Mutex<RetryPolicy>,
    stats: WebhookStats,
    /// Alerts queued or being dispatched plus deliveries in flight.
    pending: AtomicU64,
    idle: Notify,
}

impl Inner {
    fn retry(&self) -> RetryPolicy {
        *lock(&self.retry)
    }

    /// `n` pending units finished (saturating: the shutdown deadline may have zeroed them).
    fn done(&self, n: u64) {
        let before = self
            .pending
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |p| {
                Some(p.saturating_sub(n))
            })
            .unwrap_or(0);
        if before <= n {
            self.idle.notify_waiters();
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The webhook worker's handle.
pub struct Webhooks {
    tx: mpsc::Sender<Arc<Alert>>,
    inner: Arc<Inner>,
    stop: watch::Sender<bool>,
    worker: Mutex<Option<JoinHandle<()>>>,
}

impl std::fmt::Debug for Webhooks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Webhooks")
            .field("stats", &self.inner.stats)
            .finish_non_exhaustive()
    }
}

impl Webhooks {
    /// Start the worker on the current runtime; webhooks are read from `config` at send time.
    pub fn start(config: Arc<ArcSwap<Config>>, settings: WebhookSettings) -> anyhow::Result<Self> {
        let (tx, rx) = mpsc::channel(settings.queue_capacity.max(1));
        let inner = Arc::new(Inner {
            config,
            client: client(settings.connect_timeout)?,
            retry: Mutex::new(settings.retry),
            stats: WebhookStats::new(),
            pending: AtomicU64::new(0),
            idle: Notify::new(),
        });
        let (stop, stop_rx) = watch::channel(false);
        let worker = tokio::spawn(run(rx, stop_rx, inner.clone(), settings.concurrency.max(1)));
        Ok(Self {
            tx,
            inner,
            stop,
            worker: Mutex::new(Some(worker)),
        })
    }

    /// Queue an alert for every webhook of the live config. Never blocks; when the queue
    /// is full (or the worker shut down) the alert is dropped, logged and counted.
    pub fn enqueue(&self, alert: Arc<Alert>) {
        if self.inner.config.load().webhooks.is_empty() {
            return;
        }
        self.inner.pending.fetch_add(1, Ordering::AcqRel);
        let (alert, why) = match self.tx.try_send(alert) {
            Ok(()) => return,
            Err(TrySendError::Full(a)) => (a, "the webhook queue is full"),
            Err(TrySendError::Closed(a)) => (a, "webhooks are shut down"),
        };
        self.inner.stats.dropped.fetch_add(1, Ordering::Relaxed);
        self.inner.done(1);
        tracing::warn!(target: "webhook", id = alert.id, agent = %alert.agent_id,
            capacity = self.tx.max_capacity(), "{why}; alert not sent to webhooks");
    }

    /// Delivery counters.
    pub fn stats(&self) -> &WebhookStats {
        &self.inner.stats
    }

    /// The retry policy of deliveries that start from now on.
    pub fn retry_policy(&self) -> RetryPolicy {
        self.inner.retry()
    }

    /// Change the retry policy of deliveries that start from now on (tests use short waits).
    pub fn set_retry_policy(&self, policy: RetryPolicy) {
        *lock(&self.inner.retry) = policy;
    }

    /// Resolves when nothing is queued or being delivered.
    pub async fn wait_idle(&self) {
        loop {
            let notified = self.inner.idle.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.inner.pending.load(Ordering::Acquire) == 0 {
                return;
            }
            notified.await;
        }
    }

    /// Stop taking alerts, deliver what is queued or in flight within `deadline`, then
    /// abandon the rest (counted as dropped). Later calls return at once.
    pub async fn shutdown(&self, deadline: Duration) {
        let _ = self.stop.send(true);
        let Some(mut worker) = lock(&self.worker).take() else {
            return;
        };
        if tokio::time::timeout(deadline, &mut worker).await.is_err() {
            worker.abort();
            let left = self.inner.pending.swap(0, Ordering::AcqRel);
            self.inner.stats.dropped.fetch_add(left, Ordering::Relaxed);
            self.inner.idle.notify_waiters();
            tracing::warn!(target: "webhook", abandoned = left, deadline_secs = deadline.as_secs_f64(),
                "shutdown deadline reached with webhook deliveries pending; abandoned");
        }
    }
}

async fn run(
    mut rx: mpsc::Receiver<Arc<Alert>>,
    mut stop: watch::Receiver<bool>,
    inner: Arc<Inner>,
    concurrency: usize,
) {
    let permits = Arc::new(Semaphore::new(concurrency));
    let mut tasks = JoinSet::new();
    loop {
        let alert = tokio::select! {
            biased;
            _ = stop.wait_for(|s| *s) => break,
            a = rx.recv() => match a {
                Some(a) => a,
                None => break,
            },
        };
        dispatch(&inner, &permits, &mut tasks, alert).await;
        while tasks.try_join_next().is_some() {}
    }
    // Shutting down: take no more, deliver what is queued, wait for the deliveries.
    rx.close();
    while let Some(alert) = rx.recv().await {
        dispatch(&inner, &permits, &mut tasks, alert).await;
    }
    while tasks.join_next().await.is_some() {}
}

/// Start one delivery task per webhook of the live config (waiting for a free slot).
async fn dispatch(
    inner: &Arc<Inner>,
    permits: &Arc<Semaphore>,
    tasks: &mut JoinSet<()>,
    alert: Arc<Alert>,
) {
    let hooks = inner.config.load().webhooks.clone();
    for (index, hook) in hooks.into_iter().enumerate() {
        let Ok(permit) = permits.clone().acquire_owned().await else {
            break;
        };
        inner.pending.fetch_add(1, Ordering::AcqRel);
        let inner = inner.clone();
        let alert = alert.clone();
        tasks.spawn(async move {
            deliver(&inner, index, &hook, &alert).await;
            drop(permit);
            inner.done(1);
        });
    }
    inner.done(1);
}

/// The body POSTed to a webhook of `format` (`slack` or `json`).
pub fn payload(format: &str, alert: &Alert) -> Bytes {
    let value = match format {
        "slack" => serde_json::json!({ "text": slack_text(alert) }),
        _ => serde_json::to_value(alert).unwrap_or_default(),
    };
    Bytes::from(value.to_string())
}

/// The Slack text of an alert: an emoji, the level, the message.
pub fn slack_text(alert: &Alert) -> String {
    let (emoji, title) = match alert.level {
        Level::Warning => (":warning:", "Budget warning"),
        Level::Critical => (":large_orange_diamond:", "Budget critical"),
        Level::Limit => (":rotating_light:", "Budget limit reached"),
    };
    format!(
        "{emoji} *{title}* ({}%): {}",
        alert.threshold_percent, alert.message
    )
}

/// The host of a URL, for logs (never the whole URL: it may hold a secret).
fn host_of(uri: &http::Uri) -> String {
    uri.host().unwrap_or("?").to_string()
}

enum Outcome {
    Delivered(StatusCode),
    Refused(StatusCode),
    Retry {
        reason: String,
        retry_after: Option<Duration>,
    },
}

async fn deliver(inner: &Inner, index: usize, hook: &Webhook, alert: &Alert) {
    let stats = &inner.stats;
    let uri: http::Uri = match hook.url.parse() {
        Ok(u) => u,
        Err(_) => {
            stats.deliveries_failed.fetch_add(1, Ordering::Relaxed);
            tracing::error!(target: "webhook", webhook = index, id = alert.id, "webhook URL cannot be parsed; alert not delivered");
            return;
        }
    };
    let host = host_of(&uri);
    let policy = inner.retry();
    let body = payload(&hook.format, alert);
    let mut attempt = 1;
    loop {
        let (reason, retry_after) = match attempt_once(
            &inner.client,
            &uri,
            body.clone(),
            policy.request_timeout,
        )
        .await
        {
            Outcome::Delivered(status) => {
                stats.deliveries_ok.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(target: "webhook", webhook = index, host = %host, id = alert.id,
                        status = status.as_u16(), attempt, "alert delivered");
                return;
            }
            Outcome::Refused(status) => {
                stats.deliveries_failed.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(target: "webhook", webhook = index, host = %host, id = alert.id,
                        status = status.as_u16(), attempt, "webhook refused the alert; not retried");
                return;
            }
            Outcome::Retry {
                reason,
                retry_after,
            } => (reason, retry_after),
        };
        if attempt >= policy.attempts.max(1) {
            stats.deliveries_failed.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(target: "webhook", webhook = index, host = %host, id = alert.id,
                attempts = attempt, error = %reason, "webhook delivery failed; giving up");
            return;
        }
        let wait = policy
            .backoff(attempt)
            .max(retry_after.unwrap_or_default().min(policy.max_backoff));
        tracing::debug!(target: "webhook", webhook = index, host = %host, id = alert.id, attempt,
            error = %reason, wait_ms = wait.as_millis() as u64, "webhook delivery failed; will retry");
        stats.retries.fetch_add(1, Ordering::Relaxed);
        tokio::time::sleep(wait).await;
        attempt += 1;
    }
}

async fn attempt_once(
    client: &HookClient,
    uri: &http::Uri,
    body: Bytes,
    timeout: Duration,
) -> Outcome {
    let req = match Request::post(uri.clone())
        .header(CONTENT_TYPE, "application/json")
        .header(USER_AGENT, USER_AGENT_VALUE)
        .body(Full::new(body))
    {
        Ok(r) => r,
        Err(e) => {
            return Outcome::Retry {
                reason: format!("cannot build the request: {e}"),
                retry_after: None,
            }
        }
    };
    let exchange = async {
        let resp = client.request(req).await.map_err(|e| error_chain(&e))?;
        let status = resp.status();
        let retry_after = resp
            .headers()
            .get(RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        // Read (and drop) a bounded body so the connection can go back to the pool.
        let _ = Limited::new(resp.into_body(), MAX_RESPONSE_BYTES)
            .collect()
            .await;
        Ok::<_, String>((status, retry_after))
    };
    match tokio::time::timeout(timeout, exchange).await {
        Err(_) => Outcome::Retry {
            reason: format!("no answer within {} ms", timeout.as_millis()),
            retry_after: None,
        },
        Ok(Err(reason)) => Outcome::Retry {
            reason,
            retry_after: None,
        },
        Ok(Ok((s, _))) if s.is_success() => Outcome::Delivered(s),
        Ok(Ok((s, retry_after)))
            if s.is_server_error()
                || s == StatusCode::TOO_MANY_REQUESTS
                || s == StatusCode::REQUEST_TIMEOUT =>
        {
            Outcome::Retry {
                reason: format!("HTTP {s}"),
                retry_after,
            }
        }
        Ok(Ok((s, _))) => Outcome::Refused(s),
    }
}

/// The client: plain http and https (rustls with Mozilla's roots), HTTP/1.1, pooled.
fn client(connect_timeout: Duration) -> anyhow::Result<HookClient> {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .context("webhook TLS protocol versions")?
    .with_root_certificates(roots)
    .with_no_client_auth();
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(connect_timeout));
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .wrap_connector(http);
    Ok(Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(30))
        .pool_max_idle_per_host(4)
        .build(https))
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(inner) = src {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        src = inner.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let p = RetryPolicy::default();
        let waits: Vec<u128> = (1..=6).map(|r| p.backoff(r).as_millis()).collect();
        assert_eq!(waits, vec![500, 1000, 2000, 4000, 8000, 8000]);
        assert_eq!(p.backoff(u32::MAX), Duration::from_secs(8));
    }

    fn alert(level: Level, threshold: u32) -> Alert {
        Alert {
            id: 7,
            agent_id: "sage".into(),
            level,
            threshold_percent: threshold,
            percentage: 91.5,
            period_start: chrono::Utc.timestamp_opt(1_735_689_600, 0).unwrap(),
            created_at: chrono::Utc.timestamp_opt(1_735_700_000, 0).unwrap(),
            message: "agent \"sage\" used 91.50% of its monthly token budget".into(),
        }
    }

    #[test]
    fn slack_payload_is_a_text_object() {
        let a = alert(Level::Critical, 90);
        let v: serde_json::Value = serde_json::from_slice(&payload("slack", &a)).unwrap();
        let obj = v.as_object().unwrap();
        assert_eq!(obj.len(), 1);
        let text = obj["text"].as_str().unwrap();
        assert!(
            text.contains("Budget critical") && text.contains(&a.message),
            "{text}"
        );
    }

    #[test]
    fn json_payload_is_the_alert() {
        let a = alert(Level::Limit, 100);
        let v: serde_json::Value = serde_json::from_slice(&payload("json", &a)).unwrap();
        assert_eq!(v, serde_json::to_value(&a).unwrap());
        assert_eq!(v["level"], "limit");
        assert_eq!(v["period_start"], "2025-01-01T00:00:00Z");
        assert_eq!(v["created_at"], "2025-01-01T02:53:20.000Z");
    }
}
