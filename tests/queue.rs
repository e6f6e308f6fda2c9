//! The queue action: parked requests, released in FIFO order when budget returns.
#![allow(clippy::unwrap_used)]

mod common;

use budget_proxy::clock::{ManualClock, SystemClock};
use chrono::{TimeZone, Utc};
use common::{Harness, ADMIN_TOKEN};
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::Duration;

const CONFIG: &str = r#"{
  "default": {"max_tokens": 1000000, "period": "monthly", "action_on_limit": "warn"},
  "agents": {
    "spark": {"max_tokens": 50, "period": "monthly", "action_on_limit": "queue",
              "queue": {"max_wait_seconds": 30, "max_depth": 3}},
    "brief": {"max_tokens": 50, "period": "monthly", "action_on_limit": "queue",
              "queue": {"max_wait_seconds": 1, "max_depth": 1}}
  }
}"#;

fn body(n: usize) -> Value {
    json!({"contents": [{"parts": [{"text": format!("request {n}")}]}]})
}

fn send(h: &Harness, agent: &str, n: usize) -> tokio::task::JoinHandle<reqwest::Response> {
    let http = h.http.clone();
    let url = h.url(&format!(
        "/agents/{agent}/v1beta/models/gemini-2.5-flash:generateContent"
    ));
    tokio::spawn(async move { http.post(url).json(&body(n)).send().await.unwrap() })
}

async fn queued(h: &Harness, agent: &str) -> u64 {
    h.status(agent).await["queued"].as_u64().unwrap()
}

/// Await until `agent` has `n` parked requests (parking is observable only through the API).
async fn until_queued(h: &Harness, agent: &str, n: u64) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while queued(h, agent).await != n {
        assert!(
            std::time::Instant::now() < deadline,
            "never reached {n} parked"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn exhaust(h: &Harness, agent: &str) {
    for _ in 0..2 {
        let r = h.generate(agent).await;
        assert_eq!(r.status(), 200);
        let _ = r.bytes().await.unwrap();
    }
}

async fn admin_post(h: &Harness, path: &str) -> reqwest::Response {
    h.http
        .post(format!("{}{path}", h.admin))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn parked_request_is_released_by_an_admin_reset() {
    let h = Harness::start(CONFIG).await;
    exhaust(&h, "spark").await;
    let parked = send(&h, "spark", 1);
    until_queued(&h, "spark", 1).await;
    assert_eq!(
        h.mock.request_count(),
        2,
        "a parked request does not reach the upstream"
    );
    let q: Value = h
        .http
        .get(format!("{}/api/budget/queue", h.admin))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(q["agents"]["spark"]["parked"], 1);
    assert_eq!(
        admin_post(&h, "/api/budget/reset/spark").await.status(),
        200
    );
    let r = parked.await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-budget-action"], "queued");
    assert!(r.headers()["x-budget-queued-ms"]
        .to_str()
        .unwrap()
        .parse::<u64>()
        .is_ok());
    let _ = r.bytes().await.unwrap();
    assert_eq!(h.mock.request_count(), 3);
    assert_eq!(queued(&h, "spark").await, 0);
}

#[tokio::test]
async fn raising_the_limit_releases_parked_requests() {
    let h = Harness::start(CONFIG).await;
    exhaust(&h, "spark").await;
    let parked = send(&h, "spark", 1);
    until_queued(&h, "spark", 1).await;
    let r = h
        .http
        .put(format!("{}/api/budget/update/spark", h.admin))
        .bearer_auth(ADMIN_TOKEN)
        .json(&json!({"max_tokens": 1000}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = parked.await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-budget-action"], "queued");
}

#[tokio::test]
async fn parked_requests_go_in_fifo_order_and_only_as_many_as_fit() {
    let h = Harness::start(CONFIG).await;
    exhaust(&h, "spark").await;
    let mut parked = Vec::new();
    for n in 1..=3 {
        parked.push(send(&h, "spark", n));
        until_queued(&h, "spark", n as u64).await;
    }
    // After the reset, 50 tokens: each estimate is ~28 (bytes/4 + 16), so two fit and the
    // third stays parked behind them.
    assert_eq!(
        admin_post(&h, "/api/budget/reset/spark").await.status(),
        200
    );
    let third = parked.pop().unwrap();
    for p in parked {
        let r = p.await.unwrap();
        assert_eq!(r.status(), 200);
        let _ = r.bytes().await.unwrap();
    }
    let texts: Vec<String> = h.mock.received()[2..]
        .iter()
        .map(|r| {
            r.body_json().unwrap()["contents"][0]["parts"][0]["text"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(texts, ["request 1", "request 2"]);
    assert_eq!(queued(&h, "spark").await, 1, "the third still waits");
    // Now 60 tokens are used: it waits for the next budget; another reset releases it.
    assert_eq!(
        admin_post(&h, "/api/budget/reset/spark").await.status(),
        200
    );
    assert_eq!(third.await.unwrap().status(), 200);
}

#[tokio::test]
async fn max_depth_and_max_wait_answer_429_saying_why() {
    let h = Harness::start(CONFIG).await;
    exhaust(&h, "brief").await;
    let first = send(&h, "brief", 1);
    until_queued(&h, "brief", 1).await;
    // Depth 1: the second is refused at once.
    let r = h.generate("brief").await;
    assert_eq!(r.status(), 429);
    assert!(r.headers().get("retry-after").is_some());
    let v: Value = r.json().await.unwrap();
    assert!(v["error"]["message"]
        .as_str()
        .unwrap()
        .contains("queue is full"));
    // The first waits max_wait_seconds (1 s) and then gives up.
    let r = first.await.unwrap();
    assert_eq!(r.status(), 429);
    assert!(r.headers().get("retry-after").is_some());
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["status"], "RESOURCE_EXHAUSTED");
    assert!(v["error"]["message"]
        .as_str()
        .unwrap()
        .contains("waited 1 s"));
    assert_eq!(h.mock.request_count(), 2);
    assert_eq!(h.status("brief").await["blocked"], 2);
}

#[tokio::test]
async fn a_client_that_leaves_is_removed_and_never_reaches_the_upstream() {
    let h = Harness::start(CONFIG).await;
    exhaust(&h, "spark").await;
    let impatient = reqwest::Client::builder()
        .timeout(Duration::from_millis(300))
        .build()
        .unwrap();
    let url = h.url("/agents/spark/v1beta/models/gemini-2.5-flash:generateContent");
    let waiting = tokio::spawn(async move { impatient.post(url).json(&body(9)).send().await });
    until_queued(&h, "spark", 1).await;
    assert!(waiting.await.unwrap().is_err(), "the client gave up");
    until_queued(&h, "spark", 0).await;
    assert_eq!(
        admin_post(&h, "/api/budget/reset/spark").await.status(),
        200
    );
    // A later request goes through; the one that left never reached the mock.
    let r = h.generate("spark").await;
    assert_eq!(r.status(), 200);
    let _ = r.bytes().await.unwrap();
    assert_eq!(h.mock.request_count(), 3);
    assert!(h
        .mock
        .received()
        .iter()
        .all(|r| !String::from_utf8_lossy(&r.body).contains("request 9")));
}

#[tokio::test]
async fn the_period_reset_releases_parked_requests() {
    let end = Utc.with_ymd_and_hms(2026, 12, 1, 0, 0, 0).unwrap();
    let clock = Arc::new(ManualClock::new(end - chrono::Duration::milliseconds(500)));
    let h = Harness::start_with(CONFIG, clock.clone(), |_| {}).await;
    exhaust(&h, "spark").await;
    let parked = send(&h, "spark", 1);
    until_queued(&h, "spark", 1).await;
    // The reset timer fires at resets_at (in 0.5 s); by then the clock is in December.
    clock.set(end);
    let r = tokio::time::timeout(Duration::from_secs(10), parked)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-budget-action"], "queued");
    assert_eq!(
        h.status("spark").await["period_start"],
        "2026-12-01T00:00:00Z"
    );
}

#[tokio::test]
async fn shutdown_answers_parked_requests_503() {
    let h = Harness::start_with(CONFIG, Arc::new(SystemClock), |_| {}).await;
    exhaust(&h, "spark").await;
    let parked = send(&h, "spark", 1);
    until_queued(&h, "spark", 1).await;
    let Harness { app, mock, dir, .. } = h;
    app.shutdown().await;
    let r = parked.await.unwrap();
    assert_eq!(r.status(), 503);
    assert!(r.headers().get("retry-after").is_some());
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["status"], "UNAVAILABLE");
    assert_eq!(mock.request_count(), 2);
    drop(dir);
}
