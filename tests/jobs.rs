//! Deferred jobs: `Prefer: respond-async` to an over-budget queue agent.
#![allow(clippy::unwrap_used)]

mod common;

use common::{Harness, ADMIN_TOKEN};
use serde_json::{json, Value};
use std::time::Duration;

const CONFIG: &str = r#"{
  "default": {"max_tokens": 1000000, "period": "monthly", "action_on_limit": "warn"},
  "agents": {
    "spark": {"max_tokens": 50, "period": "monthly", "action_on_limit": "queue"},
    "aura": {"max_tokens": 50, "period": "monthly", "action_on_limit": "queue"}
  }
}"#;

async fn exhaust(h: &Harness, agent: &str) {
    for _ in 0..2 {
        let r = h.generate(agent).await;
        assert_eq!(r.status(), 200);
        let _ = r.bytes().await.unwrap();
    }
}

async fn defer(h: &Harness, agent: &str, text: &str) -> reqwest::Response {
    h.http
        .post(h.url(&format!(
            "/agents/{agent}/v1beta/models/gemini-2.5-flash:generateContent"
        )))
        .header("prefer", "respond-async")
        .json(&json!({"contents": [{"parts": [{"text": text}]}]}))
        .send()
        .await
        .unwrap()
}

async fn reset(h: &Harness, agent: &str) {
    let r = h
        .http
        .post(format!("{}/api/budget/reset/{agent}", h.admin))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

/// Await the job's stored response (the runner works in the background).
async fn until_done(h: &Harness, location: &str) -> reqwest::Response {
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        let r = h.http.get(h.url(location)).send().await.unwrap();
        if r.status() != 202 {
            return r;
        }
        assert!(std::time::Instant::now() < deadline, "job never finished");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_deferred_job_runs_when_budget_returns_and_its_response_is_kept() {
    let h = Harness::start(CONFIG).await;
    exhaust(&h, "spark").await;
    let r = defer(&h, "spark", "later please").await;
    assert_eq!(r.status(), 202);
    let location = r.headers()["location"].to_str().unwrap().to_string();
    assert!(
        location.starts_with("/agents/spark/budget-jobs/"),
        "{location}"
    );
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["state"], "pending");

    // Every settle (here: aura's requests) wakes the runner; while spark is over budget
    // its job must stay `pending`, never flicker to `running` between the runner's tries.
    for _ in 0..20 {
        let r = h.generate("aura").await;
        assert_eq!(r.status(), 200);
        let _ = r.bytes().await.unwrap();
        let r = h.http.get(h.url(&location)).send().await.unwrap();
        assert_eq!(r.status(), 202);
        assert_eq!(r.json::<Value>().await.unwrap()["state"], "pending");
        reset(&h, "aura").await;
    }
    assert_eq!(
        h.mock.request_count(),
        22,
        "nothing of spark's sent while over budget"
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
    assert_eq!(q["agents"]["spark"]["jobs"]["pending"], 1);
    assert_eq!(h.status("spark").await["deferred_jobs"], 1);

    reset(&h, "spark").await;
    let r = until_done(&h, &location).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-budget-agent"], "spark");
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["usageMetadata"]["totalTokenCount"], 30);
    let got = h.mock.received();
    assert_eq!(got.len(), 23);
    assert_eq!(
        got[22].path,
        "/v1beta/models/gemini-2.5-flash:generateContent"
    );
    assert!(String::from_utf8_lossy(&got[22].body).contains("later please"));
    assert!(got[22].header("prefer").is_none());
    assert_eq!(
        h.used("spark").await,
        30,
        "the job went through admission and metering"
    );
    // Fetching again gives the same stored response.
    let r = h.http.get(h.url(&location)).send().await.unwrap();
    assert_eq!(r.status(), 200);
}

#[tokio::test]
async fn jobs_belong_to_their_agent_and_can_be_cancelled() {
    let h = Harness::start(CONFIG).await;
    exhaust(&h, "spark").await;
    let location = defer(&h, "spark", "x").await.headers()["location"]
        .to_str()
        .unwrap()
        .to_string();
    let id = location.rsplit('/').next().unwrap();
    // Another agent, or an unknown id: 404, Gemini-shaped.
    let r = h
        .http
        .get(h.url(&format!("/agents/aura/budget-jobs/{id}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(
        r.json::<Value>().await.unwrap()["error"]["status"],
        "NOT_FOUND"
    );
    let r = h
        .http
        .get(h.url("/agents/spark/budget-jobs/nope"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    // The same agent by header works too.
    let r = h
        .http
        .get(h.url(&format!("/budget-jobs/{id}")))
        .header("x-agent-id", "spark")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    // Cancel, then it is gone and never runs.
    let r = h.http.delete(h.url(&location)).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.json::<Value>().await.unwrap()["state"], "cancelled");
    assert_eq!(
        h.http
            .delete(h.url(&location))
            .send()
            .await
            .unwrap()
            .status(),
        409
    );
    assert_eq!(
        h.http.get(h.url(&location)).send().await.unwrap().status(),
        410
    );
    reset(&h, "spark").await;
    let r = h.generate("spark").await; // the next request goes through normally
    assert_eq!(r.status(), 200);
    let _ = r.bytes().await.unwrap();
    assert_eq!(h.mock.request_count(), 3);
}

#[tokio::test]
async fn a_pending_job_survives_a_restart_and_runs_after_it() {
    let h = Harness::start(CONFIG).await;
    exhaust(&h, "spark").await;
    let location = defer(&h, "spark", "across a restart").await.headers()["location"]
        .to_str()
        .unwrap()
        .to_string();
    let config_path = h.dir.path().join("budgets.json");
    let opts = common::options(&h.dir.path().join("state"), config_path, &h.mock.url);
    let Harness {
        app,
        dir,
        mock,
        http,
        ..
    } = h;
    app.shutdown().await;

    let app = budget_proxy::app::start(opts).await.unwrap();
    let base = format!("http://{}", app.proxy_addr);
    let r = http.get(format!("{base}{location}")).send().await.unwrap();
    assert_eq!(r.status(), 202, "still pending after the restart");
    let r = http
        .post(format!("http://{}/api/budget/reset/spark", app.admin_addr))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        let r = http.get(format!("{base}{location}")).send().await.unwrap();
        if r.status() == 200 {
            break;
        }
        assert!(std::time::Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(mock.request_count(), 3);
    assert!(String::from_utf8_lossy(&mock.received()[2].body).contains("across a restart"));
    app.shutdown().await;
    drop(dir);
}

#[tokio::test]
async fn bad_deferred_requests_are_refused_and_nothing_is_half_written() {
    let h = Harness::start(CONFIG).await;
    exhaust(&h, "spark").await;
    // Over the deferred body limit (64 KiB in the tests).
    let big = "y".repeat(100 * 1024);
    let r = defer(&h, "spark", &big).await;
    assert_eq!(r.status(), 413);
    assert_eq!(
        r.json::<Value>().await.unwrap()["error"]["status"],
        "INVALID_ARGUMENT"
    );
    // A store that cannot take the job: 503 with Retry-After.
    let db = h.dir.path().join("state").join("budget.sqlite3");
    rusqlite::Connection::open(&db)
        .unwrap()
        .execute_batch("DROP TABLE jobs")
        .unwrap();
    let r = defer(&h, "spark", "small").await;
    assert_eq!(r.status(), 503);
    assert!(r.headers().get("retry-after").is_some());
    assert_eq!(
        r.json::<Value>().await.unwrap()["error"]["status"],
        "UNAVAILABLE"
    );
    assert_eq!(h.mock.request_count(), 2);
}
