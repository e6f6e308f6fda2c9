//! Budget alerts end to end: the mock Gemini reports known usage through the real proxy, so
//! an agent's percentage crosses 75 / 90 / 100 in known steps; alerts are read from the
//! in-process `AlertCenter` and webhooks are received by a real HTTP server started here.
#![allow(clippy::unwrap_used)]

mod common;

use budget_proxy::app;
use budget_proxy::budget::alerts::{Alert, Level};
use budget_proxy::clock::ManualClock;
use budget_proxy::config::Config;
use budget_proxy::store::{AlertRow, LocalStore, Store, StoreOp, ALERTS_KEPT};
use budget_proxy::webhook::{RetryPolicy, WebhookSettings, Webhooks};
use bytes::Bytes;
use chrono::{TimeZone, Utc};
use common::mock_gemini::Behavior;
use common::Harness;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::Notify;

const WAIT: Duration = Duration::from_secs(15);

// ---------------------------------------------------------------------------
// A webhook receiver: records every POST; can answer the first N attempts with an error.
// ---------------------------------------------------------------------------

#[derive(Debug, Clone)]
struct Hit {
    path: String,
    status: u16,
    content_type: Option<String>,
    body: serde_json::Value,
}

struct ReceiverState {
    hits: Mutex<Vec<Hit>>,
    notify: Notify,
    /// Attempts still to refuse.
    fail_first: AtomicUsize,
    /// The status they are refused with.
    fail_status: u16,
}

struct Receiver {
    url: String,
    state: Arc<ReceiverState>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Receiver {
    async fn start() -> Receiver {
        Self::failing(0, 500).await
    }

    /// Answers the first `n` attempts with `status`, then 200.
    async fn failing(n: usize, status: u16) -> Receiver {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let state = Arc::new(ReceiverState {
            hits: Mutex::new(Vec::new()),
            notify: Notify::new(),
            fail_first: AtomicUsize::new(n),
            fail_status: status,
        });
        let st = state.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let st = st.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req| handle(st.clone(), req));
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Receiver { url, state, task }
    }

    fn hits(&self) -> Vec<Hit> {
        self.state.hits.lock().unwrap().clone()
    }

    /// Accepted (200) deliveries to `path`.
    fn delivered(&self, path: &str) -> Vec<serde_json::Value> {
        self.hits()
            .into_iter()
            .filter(|h| h.path == path && h.status == 200)
            .map(|h| h.body)
            .collect()
    }

    /// Resolves once `n` deliveries to `path` were accepted.
    async fn wait_delivered(&self, path: &str, n: usize) {
        let wait = async {
            loop {
                let notified = self.state.notify.notified();
                tokio::pin!(notified);
                notified.as_mut().enable();
                if self.delivered(path).len() >= n {
                    return;
                }
                notified.await;
            }
        };
        tokio::time::timeout(WAIT, wait)
            .await
            .unwrap_or_else(|_| panic!("{n} deliveries to {path}; got {:?}", self.hits()));
    }
}

async fn handle(
    st: Arc<ReceiverState>,
    req: hyper::Request<Incoming>,
) -> Result<hyper::Response<Full<Bytes>>, Infallible> {
    let path = req.uri().path().to_string();
    let content_type = req
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let body = req.into_body().collect().await.unwrap().to_bytes();
    let fail = st
        .fail_first
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok();
    let status = if fail { st.fail_status } else { 200 };
    st.hits.lock().unwrap().push(Hit {
        path,
        status,
        content_type,
        body: serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null),
    });
    st.notify.notify_waiters();
    Ok(hyper::Response::builder()
        .status(status)
        .body(Full::new(Bytes::from_static(b"ok")))
        .unwrap())
}

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

/// Agents of 1000 tokens; webhooks `{hooks}/slack` (slack) and `{hooks}/json` (json).
fn config(hooks: &str) -> String {
    config_with(&format!(
        r#"{{"webhooks": [{{"url": "{hooks}/slack", "format": "slack"}},
                         {{"url": "{hooks}/json", "format": "json"}}]}}"#
    ))
}

/// Agents of 1000 tokens and the given `alerts` object.
fn config_with(alerts: &str) -> String {
    format!(
        r#"{{
  "default": {{"max_tokens": 1000000, "period": "monthly", "action_on_limit": "warn"}},
  "agents": {{
    "watch": {{"max_tokens": 1000, "period": "monthly", "action_on_limit": "warn"}},
    "jumpy": {{"max_tokens": 1000, "period": "monthly", "action_on_limit": "block"}},
    "custom": {{"max_tokens": 1000, "period": "monthly", "action_on_limit": "warn",
                "alert_thresholds": [50, 95, 120]}}
  }},
  "alerts": {alerts}
}}"#
    )
}

/// One generateContent of `agent` for which the mock reports `tokens` tokens; the body is
/// read to the end, so the proxy has settled it (and raised its alerts).
async fn spend(h: &Harness, agent: &str, tokens: u64) -> u16 {
    h.mock.push_behavior(Behavior::new().usage(tokens, 0, 0));
    let r = h.generate(agent).await;
    let status = r.status().as_u16();
    let _ = r.bytes().await.unwrap();
    status
}

fn thresholds(alerts: &[Alert]) -> Vec<u32> {
    alerts.iter().map(|a| a.threshold_percent).collect()
}

fn short_retries(attempts: u32) -> RetryPolicy {
    RetryPolicy {
        attempts,
        initial_backoff: Duration::from_millis(20),
        max_backoff: Duration::from_millis(80),
        request_timeout: Duration::from_secs(5),
    }
}

async fn idle(h: &Harness) {
    let hooks = h.app.alerts.webhooks().unwrap();
    tokio::time::timeout(WAIT, hooks.wait_idle()).await.unwrap();
}

// ---------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------

#[tokio::test]
async fn each_threshold_alerts_exactly_once_and_reaches_both_webhook_formats() {
    let rx = Receiver::start().await;
    let h = Harness::start(&config(&rx.url)).await;
    let alerts = &h.app.alerts;

    // (tokens of the request, thresholds raised so far, newest first)
    let steps: [(u64, &[u32]); 7] = [
        (500, &[]),            // 50 %
        (250, &[75]),          // 75 % exactly
        (100, &[75]),          // 85 %
        (50, &[90, 75]),       // 90 %
        (99, &[90, 75]),       // 99.9 %
        (1, &[100, 90, 75]),   // 100 %
        (200, &[100, 90, 75]), // 120 %: over the limit, nothing new
    ];
    for (tokens, expected) in steps {
        assert_eq!(spend(&h, "watch", tokens).await, 200);
        assert_eq!(
            thresholds(&alerts.list(Some("watch"), None, None)),
            expected,
            "after {tokens} more tokens"
        );
    }
    let list = alerts.list(None, None, None);
    assert_eq!(list.len(), 3, "no other agent alerted");
    let levels: Vec<Level> = list.iter().map(|a| a.level).collect();
    assert_eq!(levels, [Level::Limit, Level::Critical, Level::Warning]);
    let pcts: Vec<f64> = list.iter().map(|a| a.percentage).collect();
    assert_eq!(pcts, [100.0, 90.0, 75.0]);
    assert!(list[0].id > list[1].id && list[1].id > list[2].id);
    let period_start = h.status("watch").await["period_start"].clone();
    for a in &list {
        assert_eq!(a.agent_id, "watch");
        assert_eq!(
            serde_json::to_value(a).unwrap()["period_start"],
            period_start
        );
        assert!(a.message.contains("\"watch\""), "{}", a.message);
    }
    assert!(list[0].message.contains("\"warn\""), "{}", list[0].message);

    // Filters.
    assert_eq!(alerts.list(None, Some(Level::Critical), None).len(), 1);
    assert_eq!(alerts.list(Some("jumpy"), None, None).len(), 0);
    let since = list[1].created_at;
    assert_eq!(thresholds(&alerts.list(None, None, Some(since))), [100, 90]);

    // Webhooks: each alert once per webhook, in its format.
    rx.wait_delivered("/slack", 3).await;
    rx.wait_delivered("/json", 3).await;
    idle(&h).await;
    let mut json = rx.delivered("/json");
    json.sort_by_key(|v| v["id"].as_u64());
    let mut expected: Vec<serde_json::Value> = list
        .iter()
        .map(|a| serde_json::to_value(a).unwrap())
        .collect();
    expected.reverse();
    assert_eq!(json, expected, "json webhooks receive the alert objects");
    let slack = rx.delivered("/slack");
    assert_eq!(slack.len(), 3);
    for body in &slack {
        let obj = body.as_object().unwrap();
        assert_eq!(obj.len(), 1, "slack body is {{\"text\": …}}: {body}");
        let text = obj["text"].as_str().unwrap();
        assert!(list.iter().any(|a| text.contains(&a.message)), "{text}");
    }
    assert!(rx
        .hits()
        .iter()
        .all(|h| h.content_type.as_deref() == Some("application/json")));
    let stats = alerts.webhook_stats().snapshot();
    assert_eq!((stats.deliveries_ok, stats.deliveries_failed), (6, 0));
    assert_eq!(alerts.raised(Level::Warning), 1);
    assert_eq!(alerts.raised(Level::Limit), 1);
}

/// `PUT /api/budget/update/{agent}` with `body`; the answer's status.
async fn update(h: &Harness, agent: &str, body: serde_json::Value) -> u16 {
    h.http
        .put(format!("{}/api/budget/update/{agent}", h.admin))
        .bearer_auth(common::ADMIN_TOKEN)
        .json(&body)
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

#[tokio::test]
async fn a_lower_budget_alerts_what_usage_already_stands_at_once() {
    let rx = Receiver::start().await;
    let h = Harness::start(&config(&rx.url)).await;
    let alerts = &h.app.alerts;
    let watch = || thresholds(&alerts.list(Some("watch"), None, None));

    assert_eq!(spend(&h, "watch", 600).await, 200); // 60 % of 1000
    assert!(watch().is_empty());
    // 600 of 700 is 85.7 %: past 75 % without any request crossing it.
    assert_eq!(
        update(&h, "watch", serde_json::json!({"max_tokens": 700})).await,
        200
    );
    common::wait_until(|| async { watch() == [75] }).await;
    // 600 of 500 is 120 %: 90 and 100 now; 75 is not raised again.
    assert_eq!(
        update(&h, "watch", serde_json::json!({"max_tokens": 500})).await,
        200
    );
    common::wait_until(|| async { watch() == [100, 90, 75] }).await;
    let limit = &alerts.list(Some("watch"), None, None)[0];
    assert_eq!(limit.level, Level::Limit);
    assert_eq!(limit.percentage, 120.0);
    rx.wait_delivered("/json", 3).await;

    // Up and down again in the same period: nothing new. A change to `custom` (400 of 1000
    // tokens, thresholds 50/95/120) after them alerts once it is applied, which shows
    // that the changes before it were checked too.
    assert_eq!(
        update(&h, "watch", serde_json::json!({"max_tokens": 1000})).await,
        200
    );
    assert_eq!(
        update(&h, "watch", serde_json::json!({"max_tokens": 500})).await,
        200
    );
    assert_eq!(spend(&h, "custom", 400).await, 200);
    assert!(alerts.list(Some("custom"), None, None).is_empty());
    assert_eq!(
        update(
            &h,
            "custom",
            serde_json::json!({"alert_thresholds": [30, 95, 120]})
        )
        .await,
        200
    );
    common::wait_until(|| async { !alerts.list(Some("custom"), None, None).is_empty() }).await;
    assert_eq!(thresholds(&alerts.list(Some("custom"), None, None)), [30]);
    assert_eq!(watch(), [100, 90, 75]);
}

#[tokio::test]
async fn a_jump_over_several_thresholds_raises_each_once() {
    let rx = Receiver::start().await;
    let h = Harness::start(&config(&rx.url)).await;
    let alerts = &h.app.alerts;

    assert_eq!(spend(&h, "jumpy", 1000).await, 200);
    let list = alerts.list(Some("jumpy"), None, None);
    assert_eq!(thresholds(&list), [100, 90, 75]);
    let levels: Vec<Level> = list.iter().map(|a| a.level).collect();
    assert_eq!(levels, [Level::Limit, Level::Critical, Level::Warning]);
    assert!(list.iter().all(|a| a.percentage == 100.0));
    // The budget is spent: the next request is refused and raises nothing.
    assert_eq!(h.generate("jumpy").await.status(), 429);
    assert_eq!(alerts.list(Some("jumpy"), None, None).len(), 3);

    // Custom thresholds: 50 → warning, 95 → critical, 120 → limit.
    assert_eq!(spend(&h, "custom", 400).await, 200);
    assert!(alerts.list(Some("custom"), None, None).is_empty());
    assert_eq!(spend(&h, "custom", 900).await, 200); // 40 % → 130 %
    let custom = alerts.list(Some("custom"), None, None);
    assert_eq!(thresholds(&custom), [120, 95, 50]);
    let levels: Vec<Level> = custom.iter().map(|a| a.level).collect();
    assert_eq!(levels, [Level::Limit, Level::Critical, Level::Warning]);
    assert!(custom.iter().all(|a| a.percentage == 130.0));

    rx.wait_delivered("/json", 6).await;
    rx.wait_delivered("/slack", 6).await;
    idle(&h).await;
    let mut ids: Vec<u64> = rx
        .delivered("/json")
        .iter()
        .map(|v| v["id"].as_u64().unwrap())
        .collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), 6, "each alert delivered once");
    assert_eq!(rx.delivered("/slack").len(), 6);
}

#[tokio::test]
async fn alerts_survive_a_restart_and_are_not_raised_again() {
    let rx = Receiver::start().await;
    let h = Harness::start(&config(&rx.url)).await;
    assert_eq!(spend(&h, "watch", 800).await, 200);
    let before = h.app.alerts.list(None, None, None);
    assert_eq!(thresholds(&before), [75]);
    rx.wait_delivered("/json", 1).await;

    let Harness {
        mock,
        app,
        dir,
        http,
        ..
    } = h;
    app.shutdown().await;
    let opts = common::options(
        &dir.path().join("state"),
        dir.path().join("budgets.json"),
        &mock.url,
    );
    let app = app::start(opts).await.unwrap();
    let h = Harness {
        base: format!("http://{}", app.proxy_addr),
        admin: format!("http://{}", app.admin_addr),
        mock,
        app,
        dir,
        http,
    };
    let alerts = &h.app.alerts;
    assert_eq!(h.used("watch").await, 800, "usage survived");
    assert_eq!(alerts.list(None, None, None), before, "the alert survived");

    assert_eq!(spend(&h, "watch", 50).await, 200); // 85 %: nothing new
    assert_eq!(alerts.list(None, None, None).len(), 1);

    // Zero the running period and cross 75 % again: same agent, period and threshold, so
    // no second alert (the key was claimed durably before the restart).
    assert!(h.app.ledger.reset("watch"));
    assert_eq!(spend(&h, "watch", 800).await, 200);
    assert_eq!(alerts.list(None, None, None).len(), 1);

    // 95 %: a new threshold alerts, with a later id.
    assert_eq!(spend(&h, "watch", 150).await, 200);
    let after = alerts.list(None, None, None);
    assert_eq!(thresholds(&after), [90, 75]);
    assert!(after[0].id > before[0].id);

    rx.wait_delivered("/json", 2).await;
    idle(&h).await;
    let json = rx.delivered("/json");
    assert_eq!(json.len(), 2, "no webhook repeated: {json:?}");
    assert_eq!(rx.delivered("/slack").len(), 2);

    // And once more across a restart: still the same two.
    let Harness { mock, app, dir, .. } = h;
    app.shutdown().await;
    let opts = common::options(
        &dir.path().join("state"),
        dir.path().join("budgets.json"),
        &mock.url,
    );
    let app = app::start(opts).await.unwrap();
    assert_eq!(app.alerts.list(None, None, None), after);
    app.shutdown().await;
}

#[tokio::test]
async fn a_new_period_alerts_again() {
    let rx = Receiver::start().await;
    let clock = Arc::new(ManualClock::new(
        Utc.with_ymd_and_hms(2026, 3, 30, 12, 0, 0).unwrap(),
    ));
    let h = Harness::start_with(&config(&rx.url), clock.clone(), |_| {}).await;
    assert_eq!(spend(&h, "watch", 800).await, 200);
    clock.set(Utc.with_ymd_and_hms(2026, 4, 1, 0, 0, 1).unwrap());
    assert_eq!(spend(&h, "watch", 100).await, 200);
    assert_eq!(spend(&h, "watch", 700).await, 200);
    let list = h.app.alerts.list(Some("watch"), Some(Level::Warning), None);
    assert_eq!(list.len(), 2);
    let starts: Vec<String> = list
        .iter()
        .map(|a| {
            serde_json::to_value(a).unwrap()["period_start"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(starts, ["2026-04-01T00:00:00Z", "2026-03-01T00:00:00Z"]);
    assert_eq!(
        serde_json::to_value(&list[0]).unwrap()["created_at"],
        "2026-04-01T00:00:01.000Z"
    );
    rx.wait_delivered("/json", 2).await;
}

#[tokio::test]
async fn a_webhook_that_fails_twice_is_retried_then_delivered() {
    let rx = Receiver::failing(2, 500).await;
    let config = config_with(&format!(
        r#"{{"webhooks": [{{"url": "{}/hook", "format": "json"}}]}}"#,
        rx.url
    ));
    let h = Harness::start(&config).await;
    let webhooks = h.app.alerts.webhooks().unwrap();
    assert_eq!(webhooks.retry_policy(), RetryPolicy::default());
    webhooks.set_retry_policy(short_retries(5));

    assert_eq!(spend(&h, "watch", 750).await, 200);
    rx.wait_delivered("/hook", 1).await;
    idle(&h).await;
    let statuses: Vec<u16> = rx.hits().iter().map(|h| h.status).collect();
    assert_eq!(statuses, [500, 500, 200]);
    let bodies: Vec<serde_json::Value> = rx.hits().into_iter().map(|h| h.body).collect();
    assert!(
        bodies.windows(2).all(|w| w[0] == w[1]),
        "the same alert each time"
    );
    let alert = &h.app.alerts.list(None, None, None)[0];
    assert_eq!(bodies[2], serde_json::to_value(alert).unwrap());
    let s = h.app.alerts.webhook_stats().snapshot();
    assert_eq!(
        (s.deliveries_ok, s.deliveries_failed, s.retries, s.dropped),
        (1, 0, 2, 0)
    );
}

fn one_hook_config(url: &str, format: &str) -> Arc<arc_swap::ArcSwap<Config>> {
    let text = format!(
        r#"{{"default": {{"max_tokens": 1000, "period": "monthly", "action_on_limit": "warn"}},
             "agents": {{}},
             "alerts": {{"webhooks": [{{"url": "{url}", "format": "{format}"}}]}}}}"#
    );
    Arc::new(arc_swap::ArcSwap::from_pointee(
        Config::parse(&text, "budgets.json").unwrap(),
    ))
}

fn alert(id: u64) -> Arc<Alert> {
    Arc::new(Alert {
        id,
        agent_id: "sage".into(),
        level: Level::Critical,
        threshold_percent: 90,
        percentage: 90.5,
        period_start: Utc.with_ymd_and_hms(2026, 3, 1, 0, 0, 0).unwrap(),
        created_at: Utc.with_ymd_and_hms(2026, 3, 20, 10, 0, 0).unwrap(),
        message: format!("alert {id}"),
    })
}

#[tokio::test]
async fn failing_and_refusing_webhooks_are_counted_as_failed() {
    // 503 every time: retried until the attempts run out.
    let rx = Receiver::failing(usize::MAX, 503).await;
    let hooks = Webhooks::start(
        one_hook_config(&format!("{}/down", rx.url), "json"),
        WebhookSettings {
            retry: short_retries(3),
            ..WebhookSettings::default()
        },
    )
    .unwrap();
    hooks.enqueue(alert(1));
    tokio::time::timeout(WAIT, hooks.wait_idle()).await.unwrap();
    assert_eq!(rx.hits().len(), 3);
    let s = hooks.stats().snapshot();
    assert_eq!((s.deliveries_ok, s.deliveries_failed, s.retries), (0, 1, 2));

    // 404: final at once.
    let rx = Receiver::failing(usize::MAX, 404).await;
    let hooks = Webhooks::start(
        one_hook_config(&format!("{}/gone", rx.url), "slack"),
        WebhookSettings {
            retry: short_retries(3),
            ..WebhookSettings::default()
        },
    )
    .unwrap();
    hooks.enqueue(alert(2));
    tokio::time::timeout(WAIT, hooks.wait_idle()).await.unwrap();
    assert_eq!(rx.hits().len(), 1);
    assert_eq!(
        rx.hits()[0].body["text"]
            .as_str()
            .map(|t| t.contains("alert 2")),
        Some(true)
    );
    let s = hooks.stats().snapshot();
    assert_eq!((s.deliveries_ok, s.deliveries_failed, s.retries), (0, 1, 0));
    hooks.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn a_full_queue_drops_and_counts_and_shutdown_delivers_what_is_queued() {
    let rx = Receiver::start().await;
    let hooks = Webhooks::start(
        one_hook_config(&format!("{}/q", rx.url), "json"),
        WebhookSettings {
            queue_capacity: 2,
            ..WebhookSettings::default()
        },
    )
    .unwrap();
    // The worker cannot run between these (current-thread runtime, no await): the queue
    // holds two, the third is dropped.
    hooks.enqueue(alert(1));
    hooks.enqueue(alert(2));
    hooks.enqueue(alert(3));
    assert_eq!(hooks.stats().snapshot().dropped, 1);
    hooks.shutdown(Duration::from_secs(10)).await;
    let mut ids: Vec<u64> = rx
        .delivered("/q")
        .iter()
        .map(|v| v["id"].as_u64().unwrap())
        .collect();
    ids.sort_unstable();
    assert_eq!(ids, [1, 2], "shutdown delivered the queue");
    // After shutdown nothing is taken.
    hooks.enqueue(alert(4));
    assert_eq!(hooks.stats().snapshot().dropped, 2);
    assert_eq!(hooks.stats().snapshot().deliveries_ok, 2);
}

#[tokio::test]
async fn shutdown_gives_up_on_deliveries_past_its_deadline() {
    let rx = Receiver::failing(usize::MAX, 500).await;
    let hooks = Webhooks::start(
        one_hook_config(&format!("{}/down", rx.url), "json"),
        WebhookSettings {
            retry: RetryPolicy {
                attempts: 5,
                initial_backoff: Duration::from_secs(30),
                max_backoff: Duration::from_secs(30),
                request_timeout: Duration::from_secs(5),
            },
            ..WebhookSettings::default()
        },
    )
    .unwrap();
    hooks.enqueue(alert(1));
    rx.wait_for_hits(1).await;
    let started = std::time::Instant::now();
    hooks.shutdown(Duration::from_millis(200)).await;
    assert!(started.elapsed() < Duration::from_secs(10));
    assert_eq!(hooks.stats().snapshot().dropped, 1);
    tokio::time::timeout(WAIT, hooks.wait_idle()).await.unwrap();
}

impl Receiver {
    /// Resolves once `n` requests of any kind arrived.
    async fn wait_for_hits(&self, n: usize) {
        let wait = async {
            loop {
                let notified = self.state.notify.notified();
                tokio::pin!(notified);
                notified.as_mut().enable();
                if self.hits().len() >= n {
                    return;
                }
                notified.await;
            }
        };
        tokio::time::timeout(WAIT, wait).await.unwrap();
    }
}

fn row(id: u64, agent: &str, period_start: i64, threshold: u32) -> AlertRow {
    AlertRow {
        id,
        agent: agent.into(),
        period_start,
        period_end: Some(period_start + 1000),
        threshold_percent: threshold,
        level: "warning".into(),
        percentage_hundredths: 7500,
        created_at_ms: period_start * 1000 + 10,
        message: format!("alert {id}"),
    }
}

#[test]
fn the_store_claims_each_key_once_and_keeps_the_newest_alerts() {
    let dir = tempfile::tempdir().unwrap();
    let store = LocalStore::open(dir.path()).unwrap();
    // The same key twice (even with another id): stored once.
    store
        .apply(&[
            StoreOp::Alert(row(1, "a", 1000, 75)),
            StoreOp::Alert(row(2, "a", 1000, 75)),
            StoreOp::Alert(row(3, "a", 1000, 90)),
        ])
        .unwrap();
    let loaded = store.load_alerts(ALERTS_KEPT).unwrap();
    let ids: Vec<u64> = loaded.recent.iter().map(|r| r.id).collect();
    assert_eq!(ids, [3, 1]);
    assert_eq!(loaded.recent[1], row(1, "a", 1000, 75));
    assert_eq!(loaded.keys.len(), 2);
    assert_eq!(loaded.max_id, 3);

    // More than ALERTS_KEPT alerts: the oldest are pruned. A later alert of agent "a" in a
    // new period drops the keys of its ended period.
    let n = ALERTS_KEPT as u64 + 5;
    let ops: Vec<StoreOp> = (0..n)
        .map(|i| StoreOp::Alert(row(10 + i, &format!("x{i}"), 5000, 75)))
        .chain([StoreOp::Alert(row(10 + n, "a", 3000, 75))])
        .collect();
    store.apply(&ops).unwrap();
    let loaded = store.load_alerts(ALERTS_KEPT).unwrap();
    assert_eq!(loaded.recent.len(), ALERTS_KEPT);
    assert_eq!(loaded.recent[0].id, 10 + n);
    assert_eq!(
        loaded.recent[ALERTS_KEPT - 1].id,
        10 + n - ALERTS_KEPT as u64 + 1
    );
    assert_eq!(loaded.max_id, 10 + n);
    let a_keys: Vec<(i64, u32)> = loaded
        .keys
        .iter()
        .filter(|k| k.agent == "a")
        .map(|k| (k.period_start, k.threshold_percent))
        .collect();
    assert_eq!(a_keys, [(3000, 75)]);
    assert_eq!(store.load_alerts(3).unwrap().recent.len(), 3);
}
