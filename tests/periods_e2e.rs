//! Period boundaries through the whole proxy, with an injected clock (no sleeping).
#![allow(clippy::unwrap_used)]

mod common;

use budget_proxy::app;
use budget_proxy::clock::ManualClock;
use chrono::{TimeZone, Utc};
use common::Harness;
use std::sync::Arc;

const CONFIG: &str = r#"{
  "default": {"max_tokens": 1000000, "period": "monthly", "action_on_limit": "warn"},
  "agents": {
    "guardian": {"max_tokens": 50, "period": "monthly", "reset_day": 1, "action_on_limit": "block"},
    "pacific": {"max_tokens": 50, "period": "daily", "timezone": "America/Los_Angeles", "action_on_limit": "block"}
  }
}"#;

#[tokio::test]
async fn a_new_month_starts_from_zero_and_retry_after_points_at_it() {
    let clock = Arc::new(ManualClock::new(
        Utc.with_ymd_and_hms(2026, 11, 30, 23, 59, 50).unwrap(),
    ));
    let h = Harness::start_with(CONFIG, clock.clone(), |_| {}).await;
    for _ in 0..2 {
        let _ = h.generate("guardian").await.bytes().await.unwrap();
    }
    let r = h.generate("guardian").await;
    assert_eq!(r.status(), 429);
    assert_eq!(r.headers()["retry-after"], "10");
    let s = h.status("guardian").await;
    assert_eq!(s["period_start"], "2026-11-01T00:00:00Z");
    assert_eq!(s["resets_at"], "2026-12-01T00:00:00Z");

    clock.set(Utc.with_ymd_and_hms(2026, 12, 1, 0, 0, 0).unwrap());
    let r = h.generate("guardian").await;
    assert_eq!(
        r.status(),
        200,
        "the reset instant belongs to the new period"
    );
    let _ = r.bytes().await.unwrap();
    let s = h.status("guardian").await;
    assert_eq!(s["period_start"], "2026-12-01T00:00:00Z");
    assert_eq!(s["used_tokens"], 30);
    assert_eq!(s["blocked"], 0);
}

#[tokio::test]
async fn daily_period_in_pacific_time_resets_at_local_midnight() {
    // 2026-11-29 07:59:59 UTC is 23:59:59 PST.
    let clock = Arc::new(ManualClock::new(
        Utc.with_ymd_and_hms(2026, 11, 29, 7, 59, 59).unwrap(),
    ));
    let h = Harness::start_with(CONFIG, clock.clone(), |_| {}).await;
    for _ in 0..2 {
        let _ = h.generate("pacific").await.bytes().await.unwrap();
    }
    let r = h.generate("pacific").await;
    assert_eq!(r.status(), 429);
    assert_eq!(r.headers()["retry-after"], "1");
    assert_eq!(
        h.status("pacific").await["resets_at"],
        "2026-11-29T08:00:00Z"
    );
    clock.set(Utc.with_ymd_and_hms(2026, 11, 29, 8, 0, 0).unwrap());
    assert_eq!(h.generate("pacific").await.status(), 200);
}

#[tokio::test]
async fn restart_in_a_new_period_starts_from_zero_and_a_changed_reset_day_keeps_usage() {
    let clock = Arc::new(ManualClock::new(
        Utc.with_ymd_and_hms(2026, 11, 20, 12, 0, 0).unwrap(),
    ));
    let h = Harness::start_with(CONFIG, clock.clone(), |_| {}).await;
    for _ in 0..2 {
        let _ = h.generate("guardian").await.bytes().await.unwrap();
    }
    assert_eq!(h.used("guardian").await, 60);
    let config_path = h.dir.path().join("budgets.json");
    let state_dir = h.dir.path().join("state");
    let mock_url = h.mock.url.clone();
    let Harness { app, dir, mock, .. } = h;
    app.shutdown().await;

    // The operator moves the reset day to the 15th: the running period (Nov 1 → Dec 1) now
    // reads Nov 15 → Dec 15. Usage recorded in the running period carries over.
    std::fs::write(
        &config_path,
        CONFIG.replace("\"reset_day\": 1", "\"reset_day\": 15"),
    )
    .unwrap();
    let opts = common::options(&state_dir, config_path.clone(), &mock_url);
    let app = app::start_with_clock(opts.clone(), clock.clone())
        .await
        .unwrap();
    let s = admin_status(&app, "guardian").await;
    assert_eq!(s["period_start"], "2026-11-15T00:00:00Z");
    assert_eq!(
        s["used_tokens"], 60,
        "usage carried into the redefined period"
    );
    app.shutdown().await;

    // Restarting after the period ended: a new period key, zero by construction.
    clock.set(Utc.with_ymd_and_hms(2026, 12, 16, 0, 0, 0).unwrap());
    let app = app::start_with_clock(opts, clock.clone()).await.unwrap();
    let s = admin_status(&app, "guardian").await;
    assert_eq!(s["period_start"], "2026-12-15T00:00:00Z");
    assert_eq!(s["used_tokens"], 0);
    app.shutdown().await;
    drop((dir, mock));
}

async fn admin_status(app: &app::Running, agent: &str) -> serde_json::Value {
    reqwest::Client::new()
        .get(format!(
            "http://{}/api/budget/status/{agent}",
            app.admin_addr
        ))
        .bearer_auth(common::ADMIN_TOKEN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}
