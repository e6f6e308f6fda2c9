//! The admin API end to end: auth, status, update (persisted, validated, effective at once),
//! reset, usage, config and hot reload, metrics, and responses checked against /openapi.json.
#![allow(clippy::unwrap_used)]

mod common;

use budget_proxy::clock::SystemClock;
use common::{Harness, ADMIN_TOKEN, CONFIG};
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::Duration;

async fn get(h: &Harness, path: &str, token: Option<&str>) -> reqwest::Response {
    let mut r = h.http.get(format!("{}{path}", h.admin));
    if let Some(t) = token {
        r = r.bearer_auth(t);
    }
    r.send().await.unwrap()
}

async fn put(h: &Harness, agent: &str, body: &Value) -> reqwest::Response {
    h.http
        .put(format!("{}/api/budget/update/{agent}", h.admin))
        .bearer_auth(ADMIN_TOKEN)
        .json(body)
        .send()
        .await
        .unwrap()
}

/// A validator for one component schema of our own OpenAPI document.
fn schema(spec: &Value, name: &str) -> jsonschema::Validator {
    let doc = json!({
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$ref": format!("#/components/schemas/{name}"),
        "components": spec["components"],
    });
    jsonschema::validator_for(&doc).unwrap()
}

fn assert_valid(v: &jsonschema::Validator, value: &Value, what: &str) {
    let errors: Vec<String> = v
        .iter_errors(value)
        .map(|e| format!("{e} at {}", e.instance_path()))
        .collect();
    assert!(
        errors.is_empty(),
        "{what} does not match /openapi.json: {errors:?}\n{value:#}"
    );
}

#[tokio::test]
async fn every_api_route_needs_the_token_and_public_routes_do_not() {
    let h = Harness::start(CONFIG).await;
    for path in [
        "/api/budget/status",
        "/api/budget/status/sage",
        "/api/budget/alerts",
        "/api/budget/usage",
        "/api/budget/config",
    ] {
        let r = get(&h, path, None).await;
        assert_eq!(r.status(), 401, "{path} without token");
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["error"]["code"], 401);
        assert_eq!(
            get(&h, path, Some(ADMIN_TOKEN)).await.status(),
            200,
            "{path} with token"
        );
    }
    assert_eq!(
        get(&h, "/api/budget/status", Some("wrong")).await.status(),
        401
    );
    let r = h
        .http
        .post(format!("{}/api/budget/reset/sage", h.admin))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let r = h
        .http
        .put(format!("{}/api/budget/update/sage", h.admin))
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    for path in ["/healthz", "/readyz", "/metrics", "/openapi.json", "/docs"] {
        assert_eq!(get(&h, path, None).await.status(), 200, "{path}");
    }
}

#[tokio::test]
async fn repeated_wrong_tokens_are_rate_limited_but_the_right_one_works_elsewhere() {
    let h = Harness::start(CONFIG).await;
    let mut codes = Vec::new();
    for _ in 0..12 {
        codes.push(
            get(&h, "/api/budget/status", Some("guess"))
                .await
                .status()
                .as_u16(),
        );
    }
    assert_eq!(&codes[..10], &[401; 10]);
    assert_eq!(codes[10], 429);
    let r = get(&h, "/api/budget/status", Some("guess")).await;
    assert!(r.headers().get("retry-after").is_some());
}

#[tokio::test]
async fn unknown_agents_are_404() {
    let h = Harness::start(CONFIG).await;
    assert_eq!(
        get(&h, "/api/budget/status/nobody", Some(ADMIN_TOKEN))
            .await
            .status(),
        404
    );
    let r = h
        .http
        .post(format!("{}/api/budget/reset/nobody", h.admin))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(
        get(&h, "/api/nothing", Some(ADMIN_TOKEN)).await.status(),
        404
    );
}

#[tokio::test]
async fn update_is_validated_persisted_effective_at_once_and_keeps_key_order() {
    let h = Harness::start(CONFIG).await;
    // guardian: 50 tokens, block. Use it up.
    for _ in 0..2 {
        let _ = h.generate("guardian").await.bytes().await.unwrap();
    }
    assert_eq!(h.generate("guardian").await.status(), 429);

    let r = put(
        &h,
        "guardian",
        &json!({"max_tokens": 1000, "description": "raised"}),
    )
    .await;
    assert_eq!(r.status(), 200);
    let s: Value = r.json().await.unwrap();
    assert_eq!(s["max_tokens"], 1000);
    assert_eq!(s["description"], "raised");
    assert_eq!(s["used_tokens"], 60);
    // Effective at once.
    assert_eq!(h.generate("guardian").await.status(), 200);

    // Written to the file, other entries and key order kept.
    let text = std::fs::read_to_string(h.dir.path().join("budgets.json")).unwrap();
    let v: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["agents"]["guardian"]["max_tokens"], 1000);
    let keys: Vec<&String> = v["agents"].as_object().unwrap().keys().collect();
    assert_eq!(
        keys,
        ["sage", "guardian", "tight", "cheap", "loud", "keyed"]
    );
    assert_eq!(v["agents"]["sage"]["max_tokens"], 3_000_000);

    // Creating an agent: 201.
    let r = put(
        &h,
        "newbie",
        &json!({"max_tokens": 777, "action_on_limit": "block"}),
    )
    .await;
    assert_eq!(r.status(), 201);
    assert_eq!(r.json::<Value>().await.unwrap()["max_tokens"], 777);
    let r = put(&h, "newbie", &json!({"max_tokens": 778})).await;
    assert_eq!(r.status(), 200);

    // Bad input: each refused with a message naming the field; nothing written.
    let before = std::fs::read_to_string(h.dir.path().join("budgets.json")).unwrap();
    for (patch, needle) in [
        (json!({"max_tokens": 0}), "max_tokens"),
        (json!({"max_tokens": -5}), "max_tokens"),
        (json!({"max_tokens": "lots"}), "max_tokens"),
        (json!({"reset_day": 29}), "reset_day"),
        (json!({"period": "weekly", "reset_day": 8}), "reset_day"),
        (json!({"period": "hourly"}), "period"),
        (json!({"action_on_limit": "explode"}), "action_on_limit"),
        (json!({"colour": "blue"}), "colour"),
        (json!([1, 2]), "object"),
    ] {
        let r = put(&h, "guardian", &patch).await;
        assert_eq!(r.status(), 400, "{patch}");
        let msg = r.json::<Value>().await.unwrap()["error"]["message"]
            .as_str()
            .unwrap()
            .to_string();
        assert!(msg.contains(needle), "{patch}: {msg}");
    }
    let after = std::fs::read_to_string(h.dir.path().join("budgets.json")).unwrap();
    assert_eq!(before, after, "refused updates leave the file alone");
    // `null` removes a key: the agent inherits it from `default` (which has a fallback).
    let r = put(&h, "cheap", &json!({"fallback_model": null})).await;
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.json::<Value>().await.unwrap()["fallback_model"],
        "gemini-2.5-flash-lite"
    );

    // Not JSON, and too big.
    let r = h
        .http
        .put(format!("{}/api/budget/update/guardian", h.admin))
        .bearer_auth(ADMIN_TOKEN)
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let big = json!({"description": "x".repeat(70 * 1024)});
    assert_eq!(put(&h, "guardian", &big).await.status(), 413);
}

#[tokio::test]
async fn update_survives_a_restart() {
    let h = Harness::start(CONFIG).await;
    assert_eq!(
        put(&h, "sage", &json!({"max_tokens": 4_000_000}))
            .await
            .status(),
        200
    );
    let config_path = h.dir.path().join("budgets.json");
    let opts = common::options(&h.dir.path().join("state"), config_path, &h.mock.url);
    let Harness { app, dir, mock, .. } = h;
    app.shutdown().await;
    let app = budget_proxy::app::start(opts).await.unwrap();
    let s: Value = reqwest::Client::new()
        .get(format!("http://{}/api/budget/status/sage", app.admin_addr))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(s["max_tokens"], 4_000_000);
    app.shutdown().await;
    drop((dir, mock));
}

#[tokio::test]
async fn reset_zeroes_the_period_and_keeps_history() {
    let h = Harness::start(CONFIG).await;
    for _ in 0..2 {
        let _ = h.generate("guardian").await.bytes().await.unwrap();
    }
    assert_eq!(h.generate("guardian").await.status(), 429);
    let r = h
        .http
        .post(format!("{}/api/budget/reset/guardian", h.admin))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let s: Value = r.json().await.unwrap();
    assert_eq!(s["used_tokens"], 0);
    assert_eq!(h.generate("guardian").await.status(), 200);
    // History still has the usage from before the reset (written behind; poll).
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let v: Value = get(
            &h,
            "/api/budget/usage?agent=guardian&group_by=model",
            Some(ADMIN_TOKEN),
        )
        .await
        .json()
        .await
        .unwrap();
        let total: u64 = v["rows"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["total_tokens"].as_u64().unwrap())
            .sum();
        if total == 90 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "history: {v}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn usage_groups_by_model_day_and_hour() {
    let h = Harness::start(CONFIG).await;
    let _ = h.generate("sage").await.bytes().await.unwrap();
    let _ = h.generate("cheap").await.bytes().await.unwrap();
    let _ = h.generate("cheap").await.bytes().await.unwrap(); // degraded: other model
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let by_model = loop {
        let v: Value = get(
            &h,
            "/api/budget/usage?agent=cheap&group_by=model",
            Some(ADMIN_TOKEN),
        )
        .await
        .json()
        .await
        .unwrap();
        if v["rows"].as_array().unwrap().len() == 2 {
            break v;
        }
        assert!(std::time::Instant::now() < deadline, "{v}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let keys: Vec<&str> = by_model["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["key"].as_str().unwrap())
        .collect();
    assert_eq!(keys, ["gemini-2.5-flash", "gemini-2.5-flash-lite"]);
    let day: Value = get(&h, "/api/budget/usage?group_by=day", Some(ADMIN_TOKEN))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(day["rows"].as_array().unwrap().len(), 1);
    assert_eq!(day["rows"][0]["total_tokens"], 90);
    assert!(day["rows"][0]["key"]
        .as_str()
        .unwrap()
        .ends_with("T00:00:00Z"));
    let hour: Value = get(
        &h,
        "/api/budget/usage?group_by=hour&agent=sage",
        Some(ADMIN_TOKEN),
    )
    .await
    .json()
    .await
    .unwrap();
    assert_eq!(hour["rows"][0]["total_tokens"], 30);
    let r = get(&h, "/api/budget/usage?group_by=week", Some(ADMIN_TOKEN)).await;
    assert_eq!(r.status(), 400);
    let r = get(&h, "/api/budget/usage?from=yesterday", Some(ADMIN_TOKEN)).await;
    assert_eq!(r.status(), 400);
    // A window in the future has nothing.
    let v: Value = get(
        &h,
        "/api/budget/usage?from=2999-01-01T00:00:00Z",
        Some(ADMIN_TOKEN),
    )
    .await
    .json()
    .await
    .unwrap();
    assert!(v["rows"].as_array().unwrap().is_empty());
}

async fn config_info(h: &Harness) -> Value {
    get(h, "/api/budget/config", Some(ADMIN_TOKEN))
        .await
        .json()
        .await
        .unwrap()
}

/// Await the next applied or refused reload (the watcher is asynchronous by nature).
async fn wait_reload(h: &Harness, ok: u64, failed: u64) -> Value {
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        let v = config_info(h).await;
        if v["reloads_ok"] == ok && v["reloads_failed"] == failed {
            return v;
        }
        assert!(std::time::Instant::now() < deadline, "reload not seen: {v}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

#[tokio::test]
async fn hot_reload_applies_good_files_and_keeps_the_last_good_one() {
    let h = Harness::start_with(CONFIG, Arc::new(SystemClock), |o| {
        o.watch_config = Some(Duration::from_millis(50));
    })
    .await;
    let path = h.dir.path().join("budgets.json");
    let info = config_info(&h).await;
    assert_eq!(info["last_error"], Value::Null);
    use sha2::Digest;
    assert_eq!(
        info["sha256"],
        hex::encode(sha2::Sha256::digest(CONFIG.as_bytes()))
    );

    // A good edit.
    std::fs::write(
        &path,
        CONFIG.replace(
            "\"max_tokens\": 50, \"period\": \"monthly\"",
            "\"max_tokens\": 5000, \"period\": \"monthly\"",
        ),
    )
    .unwrap();
    wait_reload(&h, 1, 0).await;
    assert_eq!(h.status("guardian").await["max_tokens"], 5000);

    // A broken file: refused with line and column; the last good config stays.
    std::fs::write(&path, "{\n  \"default\": {\"max_tokens\": 1,\n  oops\n}").unwrap();
    let v = wait_reload(&h, 1, 1).await;
    let msg = v["last_error"]["message"].as_str().unwrap();
    assert!(msg.contains("line 3"), "{msg}");
    assert_eq!(h.status("guardian").await["max_tokens"], 5000);
    assert_eq!(h.generate("guardian").await.status(), 200);

    // An empty file and an invalid value are refused too.
    std::fs::write(&path, "").unwrap();
    wait_reload(&h, 1, 2).await;

    // Deleted and recreated (as editors do): the new file is applied.
    std::fs::remove_file(&path).unwrap();
    std::fs::write(&path, CONFIG).unwrap();
    let v = wait_reload(&h, 2, 2).await;
    // The error may have been counted once more for the deletion; a good load clears it.
    assert_eq!(v["last_error"], Value::Null);
    assert_eq!(h.status("guardian").await["max_tokens"], 50);

    // Our own write (admin update) is not reloaded again.
    assert_eq!(
        put(&h, "guardian", &json!({"max_tokens": 60}))
            .await
            .status(),
        200
    );
    // A manual edit afterwards wins.
    std::fs::write(
        &path,
        CONFIG.replace(
            "\"max_tokens\": 50, \"period\": \"monthly\"",
            "\"max_tokens\": 70, \"period\": \"monthly\"",
        ),
    )
    .unwrap();
    wait_reload(&h, 3, 2).await;
    assert_eq!(h.status("guardian").await["max_tokens"], 70);
}

/// One sample: name, labels, value.
type Sample = (String, Vec<(String, String)>, f64);

/// `name{labels} value` lines of the Prometheus text format.
fn parse_metrics(text: &str) -> Vec<Sample> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| {
            let (head, value) = l.rsplit_once(' ').unwrap();
            let (name, labels) = match head.split_once('{') {
                Some((n, rest)) => {
                    let labels = rest
                        .trim_end_matches('}')
                        .split("\",")
                        .filter(|s| !s.is_empty())
                        .map(|kv| {
                            let (k, v) = kv.split_once('=').unwrap();
                            (k.to_string(), v.trim_matches('"').to_string())
                        })
                        .collect();
                    (n.to_string(), labels)
                }
                None => (head.to_string(), vec![]),
            };
            (name, labels, value.parse::<f64>().unwrap())
        })
        .collect()
}

fn metric(m: &[Sample], name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    m.iter()
        .find(|(n, l, _)| {
            n == name
                && labels
                    .iter()
                    .all(|(k, v)| l.iter().any(|(lk, lv)| lk == k && lv == v))
        })
        .map(|(_, _, v)| *v)
}

#[tokio::test]
async fn metrics_are_scraped_and_parsed() {
    let h = Harness::start(CONFIG).await;
    let _ = h.generate("sage").await.bytes().await.unwrap();
    for _ in 0..3 {
        let _ = h.generate("guardian").await.bytes().await.unwrap();
    }
    let r = get(&h, "/metrics", None).await;
    assert!(r.headers()["content-type"]
        .to_str()
        .unwrap()
        .contains("text"));
    let text = r.text().await.unwrap();
    let m = parse_metrics(&text);
    assert_eq!(
        metric(
            &m,
            "budget_proxy_requests_total",
            &[("agent", "sage"), ("action", "allow"), ("status", "200")]
        ),
        Some(1.0)
    );
    assert_eq!(
        metric(
            &m,
            "budget_proxy_requests_total",
            &[
                ("agent", "guardian"),
                ("action", "block"),
                ("status", "429")
            ]
        ),
        Some(1.0)
    );
    assert_eq!(
        metric(
            &m,
            "budget_proxy_tokens_total",
            &[
                ("agent", "sage"),
                ("model", "gemini-2.5-flash"),
                ("kind", "total")
            ]
        ),
        Some(30.0)
    );
    assert_eq!(
        metric(
            &m,
            "budget_proxy_budget_used_ratio",
            &[("agent", "guardian")]
        ),
        Some(60.0 / 50.0)
    );
    assert!(metric(&m, "budget_proxy_upstream_latency_seconds_count", &[]).unwrap() >= 3.0);
    assert!(metric(&m, "budget_proxy_overhead_seconds_count", &[]).unwrap() >= 4.0);
    assert_eq!(
        metric(&m, "budget_proxy_config_reloads_total", &[]),
        Some(0.0)
    );
}

#[tokio::test]
async fn responses_match_the_openapi_document() {
    let h = Harness::start(CONFIG).await;
    let spec: Value = get(&h, "/openapi.json", None).await.json().await.unwrap();
    assert_eq!(spec["openapi"], "3.1.0");
    let _ = h.generate("sage").await.bytes().await.unwrap();
    let _ = h.generate("cheap").await.bytes().await.unwrap();
    let cases: Vec<(&str, &str)> = vec![
        ("/api/budget/status", "StatusAll"),
        ("/api/budget/status/sage", "Status"),
        ("/api/budget/status/tight", "Status"),
        ("/api/budget/alerts", "Alerts"),
        ("/api/budget/usage?group_by=hour", "Usage"),
        ("/api/budget/config", "ConfigInfo"),
        ("/api/budget/status/nobody", "Error"),
    ];
    for (path, name) in cases {
        let v: Value = get(&h, path, Some(ADMIN_TOKEN)).await.json().await.unwrap();
        assert_valid(&schema(&spec, name), &v, path);
    }
    let r = put(&h, "sage", &json!({"max_tokens": 3_100_000})).await;
    assert_valid(&schema(&spec, "Status"), &r.json().await.unwrap(), "update");
    let r = put(&h, "sage", &json!({"max_tokens": 0})).await;
    assert_valid(
        &schema(&spec, "Error"),
        &r.json().await.unwrap(),
        "update error",
    );
    let r = h
        .http
        .post(format!("{}/api/budget/reset/sage", h.admin))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert_valid(&schema(&spec, "Status"), &r.json().await.unwrap(), "reset");
    let r = get(&h, "/api/budget/status", None).await;
    assert_valid(&schema(&spec, "Error"), &r.json().await.unwrap(), "401");
    // Every path of the document answers (with the token) with a documented status.
    for (path, ops) in spec["paths"].as_object().unwrap() {
        if ops.get("get").is_some() && !path.contains('{') {
            let code = get(&h, path, Some(ADMIN_TOKEN))
                .await
                .status()
                .as_u16()
                .to_string();
            assert!(
                ops["get"]["responses"].get(&code).is_some(),
                "{path} answered {code}"
            );
        }
    }
    let docs = get(&h, "/docs", None).await.text().await.unwrap();
    assert!(
        docs.contains("/openapi.json") && !docs.contains("https://"),
        "docs must not load a CDN"
    );
}
