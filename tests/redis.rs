//! Several replicas on one real Redis: one budget enforced together, admin updates and
//! resets reaching every replica, Redis outages in `open` and `closed` mode, restarts.
//! Needs `redis-server` (SKIP line without it, failure with BUDGET_PROXY_REQUIRE_REDIS=1).
#![allow(clippy::unwrap_used)]

mod common;
#[path = "support/redis_server.rs"]
mod redis_server;

use budget_proxy::app::{self, Running};
use budget_proxy::clock::SystemClock;
use common::mock_gemini::{Behavior, MockGemini};
use common::ADMIN_TOKEN;
use redis_server::RedisServer;
use serde_json::{json, Value};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Every request of these tests uses 30 tokens (mock: prompt 10 + output 20) and is
/// estimated at ≥ 30 (body / 4 + maxOutputTokens 20): estimates are upper bounds.
const PER_REQUEST: u64 = 30;

const CONFIG: &str = r#"{
  "default": {"max_tokens": 1000000000, "period": "monthly", "action_on_limit": "warn"},
  "agents": {
    "pool":   {"max_tokens": 3000, "period": "monthly", "action_on_limit": "block", "alert_thresholds": [50, 100]},
    "guard":  {"max_tokens": 50, "period": "monthly", "action_on_limit": "block"},
    "frugal": {"max_tokens": 50, "period": "monthly", "action_on_limit": "degrade", "fallback_model": "gemini-2.5-flash-lite"},
    "waiter": {"max_tokens": 50, "period": "monthly", "action_on_limit": "queue", "queue": {"max_wait_seconds": 20, "max_depth": 10}},
    "busy":   {"max_tokens": 1000000000, "period": "monthly", "action_on_limit": "block"}
  }
}"#;

struct Replica {
    app: Option<Running>,
    _dir: tempfile::TempDir,
    base: String,
    admin: String,
}

impl Replica {
    async fn start(config: &str, redis: &str, upstream: &str) -> Replica {
        let dir = tempfile::tempdir().unwrap();
        let config_path = dir.path().join("budgets.json");
        std::fs::write(&config_path, config).unwrap();
        let mut opts = common::options(&dir.path().join("state"), config_path, upstream);
        opts.redis_url = Some(redis.to_string());
        let app = app::start_with_clock(opts, Arc::new(SystemClock))
            .await
            .unwrap();
        Replica {
            base: format!("http://{}", app.proxy_addr),
            admin: format!("http://{}", app.admin_addr),
            app: Some(app),
            _dir: dir,
        }
    }

    async fn stop(&mut self) {
        if let Some(app) = self.app.take() {
            app.shutdown().await;
        }
    }
}

fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .pool_max_idle_per_host(64)
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
}

async fn generate(http: &reqwest::Client, r: &Replica, agent: &str) -> reqwest::Response {
    http.post(format!(
        "{}/agents/{agent}/v1beta/models/gemini-2.5-flash:generateContent",
        r.base
    ))
    .json(&json!({"contents": [{"parts": [{"text": "hi"}]}], "generationConfig": {"maxOutputTokens": 20}}))
    .send()
    .await
    .unwrap()
}

/// `GET` an admin route of replica `r` (200 expected), as JSON.
async fn admin_get(http: &reqwest::Client, r: &Replica, path: &str) -> Value {
    let resp = http
        .get(format!("{}{path}", r.admin))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200, "GET {path}");
    resp.json().await.unwrap()
}

async fn status(http: &reqwest::Client, r: &Replica, agent: &str) -> Value {
    admin_get(http, r, &format!("/api/budget/status/{agent}")).await
}

/// The agent's counters hash in Redis for its running period.
async fn redis_counter(
    server: &RedisServer,
    http: &reqwest::Client,
    r: &Replica,
    agent: &str,
    field: &str,
) -> u64 {
    let st = status(http, r, agent).await;
    let start = chrono::DateTime::parse_from_rfc3339(st["period_start"].as_str().unwrap())
        .unwrap()
        .timestamp();
    let mut conn = server.conn().await;
    let v: Option<u64> = redis::cmd("HGET")
        .arg(format!("budget:{{{agent}}}:{start}"))
        .arg(field)
        .query_async(&mut conn)
        .await
        .unwrap();
    v.unwrap_or(0)
}

/// Poll until `f` holds (or panic after `limit`).
async fn eventually<F, Fut>(what: &str, limit: Duration, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    loop {
        if f().await {
            return;
        }
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn start_all(
    n: usize,
    config: &str,
    server: &RedisServer,
    mock: &MockGemini,
) -> Vec<Replica> {
    let mut out = Vec::new();
    for _ in 0..n {
        out.push(Replica::start(config, &server.url(), &mock.url).await);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_replicas_enforce_one_budget_within_the_bound_and_count_exactly() {
    let Some(server) = RedisServer::start("three_replicas") else {
        return;
    };
    // Slow enough upstream that the 300 requests really overlap.
    let mock =
        MockGemini::start_with(Behavior::new().delay_before_headers(Duration::from_millis(40)))
            .await;
    let replicas = start_all(3, CONFIG, &server, &mock).await;
    let http = http();
    let max = 3000u64;

    let ok = Arc::new(AtomicU64::new(0));
    let blocked = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for i in 0..300usize {
        let (http, ok, blocked) = (http.clone(), ok.clone(), blocked.clone());
        let r = &replicas[i % 3];
        let url = format!(
            "{}/agents/pool/v1beta/models/gemini-2.5-flash:generateContent",
            r.base
        );
        tasks.push(tokio::spawn(async move {
            let resp = http
                .post(url)
                .json(&json!({"contents": [{"parts": [{"text": "hi"}]}], "generationConfig": {"maxOutputTokens": 20}}))
                .send()
                .await
                .unwrap();
            match resp.status().as_u16() {
                200 => ok.fetch_add(1, Ordering::Relaxed),
                429 => blocked.fetch_add(1, Ordering::Relaxed),
                s => panic!("unexpected status {s}: {}", resp.text().await.unwrap()),
            };
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let ok = ok.load(Ordering::Relaxed);
    let blocked = blocked.load(Ordering::Relaxed);
    assert_eq!(ok + blocked, 300);
    let reported = mock.reported_total_tokens();
    assert_eq!(
        reported,
        ok * PER_REQUEST,
        "every forwarded request used 30 tokens"
    );

    // Every token the mock reported is in Redis, once.
    eventually(
        "Redis holds every token",
        Duration::from_secs(5),
        || async {
            redis_counter(&server, &http, &replicas[0], "pool", "tokens").await == reported
        },
    )
    .await;
    let in_redis = redis_counter(&server, &http, &replicas[0], "pool", "tokens").await;
    let requests = redis_counter(&server, &http, &replicas[0], "pool", "requests").await;
    assert_eq!(requests, ok);
    // The stated bound: committed ≤ max_tokens + replicas × one request.
    let bound = max + 3 * PER_REQUEST;
    println!("three replicas: {ok} admitted, {blocked} refused; committed {in_redis} of max {max} (bound {bound})");
    assert!(in_redis <= bound, "committed {in_redis} > bound {bound}");
    // And the budget was used, not refused wholesale.
    assert!(in_redis >= max / 2, "committed only {in_redis} of {max}");

    // Then one request at a time, round robin, until the budget is used up: leases held
    // by idle replicas come back (renewed smaller or expired), so nothing stays stranded.
    let deadline = Instant::now() + Duration::from_secs(8);
    let mut refused_in_a_row = 0;
    let mut i = 0;
    while Instant::now() < deadline && refused_in_a_row < 30 {
        let r = generate(&http, &replicas[i % 3], "pool")
            .await
            .status()
            .as_u16();
        i += 1;
        match r {
            200 => refused_in_a_row = 0,
            429 => {
                refused_in_a_row += 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            s => panic!("unexpected status {s}"),
        }
    }
    let reported = mock.reported_total_tokens();
    eventually(
        "Redis holds every token",
        Duration::from_secs(5),
        || async {
            redis_counter(&server, &http, &replicas[0], "pool", "tokens").await == reported
        },
    )
    .await;
    let in_redis = redis_counter(&server, &http, &replicas[0], "pool", "tokens").await;
    println!(
        "three replicas, then one at a time: committed {in_redis} of max {max} (bound {bound})"
    );
    assert!(in_redis <= bound, "committed {in_redis} > bound {bound}");
    assert!(
        in_redis + PER_REQUEST > max,
        "budget left unused: committed {in_redis} of {max}"
    );

    // Every replica converges on the shared numbers.
    for r in &replicas {
        eventually(
            "replica sees the shared total",
            Duration::from_secs(3),
            || async { status(&http, r, "pool").await["used_tokens"].as_u64() == Some(in_redis) },
        )
        .await;
    }
    // Alerts fired once across replicas (SET NX), and every replica lists each once.
    for r in &replicas {
        eventually(
            "alerts listed once on every replica",
            Duration::from_secs(3),
            || async {
                let a = admin_get(&http, r, "/api/budget/alerts?agent=pool").await;
                let mut th: Vec<u64> = a["alerts"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|x| x["threshold_percent"].as_u64().unwrap())
                    .collect();
                th.sort_unstable();
                th == vec![50, 100] || (in_redis < max && th == vec![50])
            },
        )
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_update_on_a_changes_decisions_on_b_within_100ms_and_degrade_works_anywhere() {
    let Some(server) = RedisServer::start("update") else {
        return;
    };
    let mock = MockGemini::start().await;
    let reps = start_all(2, CONFIG, &server, &mock).await;
    let (a, b) = (&reps[0], &reps[1]);
    let http = http();

    // Spend guard's 50 tokens through B; B then refuses.
    assert_eq!(generate(&http, b, "guard").await.status(), 200);
    assert_eq!(generate(&http, b, "guard").await.status(), 200);
    assert_eq!(generate(&http, b, "guard").await.status(), 429);
    // A sees it too (A has no usage of its own for guard).
    eventually("A sees B's usage", Duration::from_secs(2), || async {
        generate(&http, a, "guard").await.status() == 429
    })
    .await;

    // Raise on A: B admits within 100 ms.
    let r = http
        .put(format!("{}/api/budget/update/guard", a.admin))
        .bearer_auth(ADMIN_TOKEN)
        .json(&json!({"max_tokens": 100000}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let t0 = Instant::now();
    loop {
        let s = generate(&http, b, "guard").await.status();
        if s == 200 {
            break;
        }
        assert_eq!(s, 429);
        assert!(
            t0.elapsed() < Duration::from_millis(100),
            "B still refuses {:?} after A's update",
            t0.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let raised = t0.elapsed();
    // Lower it on A: B refuses within 100 ms.
    let r = http
        .put(format!("{}/api/budget/update/guard", a.admin))
        .bearer_auth(ADMIN_TOKEN)
        .json(&json!({"max_tokens": 60}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let t0 = Instant::now();
    loop {
        let s = generate(&http, b, "guard").await.status();
        if s == 429 {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_millis(100),
            "B still admits {:?} after A's update",
            t0.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    println!(
        "update A→B: raise seen after {raised:?}, lowering after {:?}",
        t0.elapsed()
    );
    // B's own budgets.json got the update too (it survives B's restart).
    let b_cfg = status(&http, b, "guard").await;
    assert_eq!(b_cfg["max_tokens"], 60);

    // Degrade through any replica: spend frugal on A, B degrades.
    assert_eq!(generate(&http, a, "frugal").await.status(), 200);
    assert_eq!(generate(&http, a, "frugal").await.status(), 200);
    eventually("B degrades frugal", Duration::from_secs(2), || async {
        let r = generate(&http, b, "frugal").await;
        r.headers()
            .get("x-budget-action")
            .and_then(|v| v.to_str().ok())
            == Some("degrade")
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_reset_on_a_releases_a_request_parked_on_b() {
    let Some(server) = RedisServer::start("reset") else {
        return;
    };
    let mock = MockGemini::start().await;
    let reps = start_all(2, CONFIG, &server, &mock).await;
    let (a, b) = (&reps[0], &reps[1]);
    let http = http();
    assert_eq!(generate(&http, b, "waiter").await.status(), 200);
    assert_eq!(generate(&http, b, "waiter").await.status(), 200);
    // The third parks on B.
    let parked = {
        let (http, url) = (
            http.clone(),
            format!(
                "{}/agents/waiter/v1beta/models/gemini-2.5-flash:generateContent",
                b.base
            ),
        );
        tokio::spawn(async move {
            let r = http
                .post(url)
                .json(&json!({"contents": [], "generationConfig": {"maxOutputTokens": 20}}))
                .send()
                .await
                .unwrap();
            let action = r
                .headers()
                .get("x-budget-action")
                .map(|v| v.to_str().unwrap().to_string());
            (r.status().as_u16(), action)
        })
    };
    eventually(
        "the request is parked on B",
        Duration::from_secs(3),
        || async {
            let q = admin_get(&http, b, "/api/budget/queue").await;
            q["agents"]["waiter"]["parked"] == 1
        },
    )
    .await;
    assert!(!parked.is_finished());
    // A sees the usage (pulled), then resets.
    eventually("A sees B's usage", Duration::from_secs(2), || async {
        status(&http, a, "waiter").await["used_tokens"] == 60
    })
    .await;
    let t0 = Instant::now();
    let r = http
        .post(format!("{}/api/budget/reset/waiter", a.admin))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let (code, action) = tokio::time::timeout(Duration::from_secs(3), parked)
        .await
        .unwrap()
        .unwrap();
    println!(
        "reset on A released the request parked on B after {:?}",
        t0.elapsed()
    );
    assert_eq!(code, 200);
    assert_eq!(action.as_deref(), Some("queued"));
}

/// Requests to `agent` spread over the replicas until `stop`; returns (ok, other statuses).
fn traffic(
    http: reqwest::Client,
    bases: Vec<String>,
    agent: &'static str,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> tokio::task::JoinHandle<(u64, Vec<u16>)> {
    tokio::spawn(async move {
        let mut ok = 0;
        let mut others = Vec::new();
        let mut i = 0usize;
        while !stop.load(Ordering::Relaxed) {
            let mut batch = Vec::new();
            for _ in 0..4 {
                let url = format!(
                    "{}/agents/{agent}/v1beta/models/gemini-2.5-flash:generateContent",
                    bases[i % bases.len()]
                );
                i += 1;
                let http = http.clone();
                batch.push(tokio::spawn(async move {
                    http.post(url)
                        .json(&json!({"contents": []}))
                        .send()
                        .await
                        .unwrap()
                        .status()
                        .as_u16()
                }));
            }
            for t in batch {
                match t.await.unwrap() {
                    200 => ok += 1,
                    s => others.push(s),
                }
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        (ok, others)
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn open_mode_keeps_serving_through_a_redis_outage_and_writes_every_token_back_once() {
    let Some(mut server) = RedisServer::start("open_outage") else {
        return;
    };
    let mock = MockGemini::start().await;
    let mut reps = start_all(2, CONFIG, &server, &mock).await;
    let http = http();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let t = traffic(
        http.clone(),
        reps.iter().map(|r| r.base.clone()).collect(),
        "busy",
        stop.clone(),
    );
    tokio::time::sleep(Duration::from_millis(400)).await;
    server.kill();
    // Down, open mode: still ready, still serving.
    eventually(
        "readyz shows Redis down",
        Duration::from_secs(3),
        || async {
            let r = http
                .get(format!("{}/readyz", reps[0].admin))
                .send()
                .await
                .unwrap();
            let code = r.status();
            let v: Value = r.json().await.unwrap();
            code == 200 && v["redis"]["state"] == "down"
        },
    )
    .await;
    let during = mock.request_count();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(
        mock.request_count() > during,
        "no traffic served while Redis was down"
    );
    server.restart();
    tokio::time::sleep(Duration::from_millis(600)).await;
    stop.store(true, Ordering::Relaxed);
    let (ok, others) = t.await.unwrap();
    assert!(others.is_empty(), "open mode refused requests: {others:?}");
    let reported = mock.reported_total_tokens();
    assert_eq!(reported, ok * PER_REQUEST);
    eventually(
        "every token is in Redis, once",
        Duration::from_secs(10),
        || async { redis_counter(&server, &http, &reps[0], "busy", "tokens").await == reported },
    )
    .await;
    // And it stays so (nothing is written twice later).
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        redis_counter(&server, &http, &reps[0], "busy", "tokens").await,
        reported
    );
    assert_eq!(
        redis_counter(&server, &http, &reps[0], "busy", "requests").await,
        ok
    );
    println!("open outage: {ok} requests, {reported} tokens, all in Redis once");
    let m = http
        .get(format!("{}/metrics", reps[0].admin))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(m.contains("budget_proxy_redis_up 1"), "{m}");
    for r in reps.iter_mut() {
        r.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn closed_mode_answers_503_to_budgeted_requests_while_redis_is_down() {
    let Some(mut server) = RedisServer::start("closed_outage") else {
        return;
    };
    let mock = MockGemini::start().await;
    let config = CONFIG.replacen('{', r#"{"redis_failure_mode": "closed","#, 1);
    let reps = start_all(2, &config, &server, &mock).await;
    let http = http();
    assert_eq!(generate(&http, &reps[0], "busy").await.status(), 200);
    server.kill();
    // Each replica learns of the outage from its own failed Redis round, so one may still
    // serve after the other refuses (what it serves is written back once Redis returns,
    // checked at the end).
    for rep in &reps {
        eventually(
            "budgeted requests get 503",
            Duration::from_secs(3),
            || async { generate(&http, rep, "busy").await.status() == 503 },
        )
        .await;
    }
    let r = generate(&http, &reps[0], "busy").await;
    assert_eq!(r.status(), 503);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["status"], "UNAVAILABLE");
    // countTokens is not budgeted: it still goes through.
    let ct = http
        .post(format!(
            "{}/agents/busy/v1beta/models/gemini-2.5-flash:countTokens",
            reps[0].base
        ))
        .json(&json!({"contents": []}))
        .send()
        .await
        .unwrap();
    assert_eq!(ct.status(), 200);
    let ready = http
        .get(format!("{}/readyz", reps[0].admin))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), 503);
    server.restart();
    eventually(
        "served again once Redis is back",
        Duration::from_secs(5),
        || async { generate(&http, &reps[1], "busy").await.status() == 200 },
    )
    .await;
    eventually("the usage is in Redis", Duration::from_secs(3), || async {
        redis_counter(&server, &http, &reps[0], "busy", "tokens").await
            == mock.reported_total_tokens()
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn counters_survive_a_restart_of_every_replica() {
    let Some(server) = RedisServer::start("restart") else {
        return;
    };
    let mock = MockGemini::start().await;
    let mut reps = start_all(2, CONFIG, &server, &mock).await;
    let http = http();
    for i in 0..6 {
        assert_eq!(generate(&http, &reps[i % 2], "busy").await.status(), 200);
    }
    for r in reps.iter_mut() {
        r.stop().await;
    }
    // New replicas, new state directories: the counters come from Redis.
    let reps = start_all(2, CONFIG, &server, &mock).await;
    for r in &reps {
        let st = status(&http, r, "busy").await;
        assert_eq!(st["used_tokens"], 6 * PER_REQUEST, "{st}");
        assert_eq!(st["requests"], 6);
    }
    assert_eq!(generate(&http, &reps[0], "busy").await.status(), 200);
}
