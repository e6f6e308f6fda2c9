//! The real binary: counters survive SIGTERM (graceful: drain + flush) and `kill -9`
//! (at most one flush interval lost; here we wait for the flush first); its I/O threads
//! keep the upstream timeout.
#![allow(clippy::unwrap_used)]

#[path = "support/mock_gemini.rs"]
mod mock_gemini;

use futures_util::StreamExt;
use mock_gemini::{Behavior, MockGemini};
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

const TOKEN: &str = "restart-token";
const CONFIG: &str = r#"{
  "default": {"max_tokens": 1000000, "period": "monthly", "action_on_limit": "warn"},
  "agents": {"sage": {"max_tokens": 3000000, "period": "monthly", "action_on_limit": "degrade", "fallback_model": "gemini-2.5-flash-lite"}}
}"#;

struct Proxy {
    child: Child,
    base: String,
    admin: String,
}

async fn spawn(dir: &Path, upstream: &str) -> Proxy {
    spawn_with(dir, upstream, &[]).await
}

async fn spawn_with(dir: &Path, upstream: &str, extra: &[&str]) -> Proxy {
    let mut child = Command::new(env!("CARGO_BIN_EXE_budget-proxy"))
        .arg("serve")
        .arg("--config")
        .arg(dir.join("budgets.json"))
        .arg("--state-dir")
        .arg(dir.join("state"))
        .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
        .args([
            "--upstream",
            upstream,
            "--log-format",
            "json",
            "--flush-interval-ms",
            "50",
        ])
        .args(extra)
        .env("BUDGET_PROXY_ADMIN_TOKEN", TOKEN)
        .env_remove("GEMINI_API_KEY")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let mut lines = BufReader::new(stderr).lines();
    let (base, admin) = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            let line = lines
                .next_line()
                .await
                .unwrap()
                .expect("proxy exited before listening");
            let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) else {
                continue;
            };
            if let (Some(p), Some(a)) =
                (v["fields"]["proxy"].as_str(), v["fields"]["admin"].as_str())
            {
                return (format!("http://{p}"), format!("http://{a}"));
            }
        }
    })
    .await
    .unwrap();
    // Keep draining stderr so the child never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Proxy { child, base, admin }
}

async fn status(p: &Proxy) -> serde_json::Value {
    reqwest::Client::new()
        .get(format!("{}/api/budget/status/sage", p.admin))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

fn counters(s: &serde_json::Value) -> Vec<serde_json::Value> {
    [
        "used_tokens",
        "prompt_tokens",
        "completion_tokens",
        "cached_tokens",
        "requests",
        "cost_pico_usd",
        "period_start",
    ]
    .iter()
    .map(|k| s[*k].clone())
    .collect()
}

async fn sigterm(mut p: Proxy) {
    let pid = rustix::process::Pid::from_raw(p.child.id().unwrap().try_into().unwrap()).unwrap();
    rustix::process::kill_process(pid, rustix::process::Signal::TERM).unwrap();
    let exit = tokio::time::timeout(Duration::from_secs(20), p.child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(exit.success(), "graceful exit, got {exit:?}");
}

async fn generate(p: &Proxy, stream: bool) -> reqwest::Response {
    let method = if stream {
        "streamGenerateContent?alt=sse"
    } else {
        "generateContent"
    };
    reqwest::Client::new()
        .post(format!(
            "{}/agents/sage/v1beta/models/gemini-2.5-flash:{method}",
            p.base
        ))
        .json(&serde_json::json!({"contents": [{"parts": [{"text": "hi"}]}]}))
        .send()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counters_survive_sigterm_including_a_stream_in_flight() {
    let mock = MockGemini::start_with(Behavior::new().usage(100, 200, 50).cached(40)).await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("budgets.json"), CONFIG).unwrap();

    let p = spawn(dir.path(), &mock.url).await;
    for _ in 0..3 {
        let r = generate(&p, false).await;
        assert_eq!(r.status(), 200);
        let _ = r.bytes().await.unwrap();
    }
    // A slow stream still running when SIGTERM arrives: it is drained, then counted.
    mock.set_behavior(
        Behavior::new()
            .usage(10, 40, 0)
            .chunks(4)
            .chunk_delay(Duration::from_millis(100)),
    );
    let r = generate(&p, true).await;
    let mut body = r.bytes_stream();
    let first = body.next().await.unwrap().unwrap();
    assert!(first.starts_with(b"data: "));
    let reader = tokio::spawn(async move {
        let mut n = 1;
        while let Some(c) = body.next().await {
            c.unwrap();
            n += 1;
        }
        n
    });
    let before_stream = status(&p).await;
    sigterm(p).await;
    assert!(
        reader.await.unwrap() >= 2,
        "the stream finished during the drain"
    );

    let p = spawn(dir.path(), &mock.url).await;
    let after = status(&p).await;
    assert_eq!(after["used_tokens"], 3 * 350 + 50);
    assert_eq!(after["requests"], 4);
    assert_eq!(after["cached_tokens"], 3 * 40);
    assert_eq!(before_stream["used_tokens"], 3 * 350);
    assert_eq!(
        after["used_tokens"].as_u64().unwrap(),
        mock.reported_total_tokens()
    );
    // A second clean restart changes nothing.
    sigterm(p).await;
    let p = spawn(dir.path(), &mock.url).await;
    assert_eq!(counters(&status(&p).await), counters(&after));
    sigterm(p).await;
}

/// The binary serves the proxy port on I/O threads, each with an upstream pool of its own
/// and that pool's timer for the upstream timeout (`proxy::deadline`): a request with no
/// response head in time is answered 504 on every thread, and the next one goes through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_upstream_timeout_holds_on_every_io_thread() {
    let mock =
        MockGemini::start_with(Behavior::new().delay_before_headers(Duration::from_secs(30))).await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("budgets.json"), CONFIG).unwrap();
    let p = spawn_with(
        dir.path(),
        &mock.url,
        &["--upstream-timeout", "1", "--io-threads", "2"],
    )
    .await;
    // Two connections (a client each): the threads take connections in turn.
    let (a, b) = tokio::join!(generate(&p, false), generate(&p, true));
    for r in [a, b] {
        assert_eq!(r.status(), 504);
        let v: serde_json::Value = r.json().await.unwrap();
        assert_eq!(v["error"]["status"], "DEADLINE_EXCEEDED");
    }
    mock.set_behavior(Behavior::new().usage(5, 6, 0));
    for _ in 0..2 {
        let r = generate(&p, false).await;
        assert_eq!(r.status(), 200);
        let _ = r.bytes().await.unwrap();
    }
    let s = status(&p).await;
    assert_eq!(s["used_tokens"], 2 * 11);
    assert_eq!(s["reserved_tokens"], 0);
    sigterm(p).await;
}

/// SIGTERM as soon as the proxy has said where it listens: handled (a graceful exit), not
/// the default action that ends the process before it flushes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_right_after_the_listening_line_is_handled() {
    let mock = MockGemini::start().await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("budgets.json"), CONFIG).unwrap();
    for _ in 0..10 {
        sigterm(spawn(dir.path(), &mock.url).await).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counters_survive_kill_9_after_a_flush() {
    let mock = MockGemini::start_with(Behavior::new().usage(5, 6, 0)).await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("budgets.json"), CONFIG).unwrap();
    let mut p = spawn(dir.path(), &mock.url).await;
    for _ in 0..5 {
        let _ = generate(&p, false).await.bytes().await.unwrap();
    }
    let expected = counters(&status(&p).await);
    // Wait until the write-behind has put the usage on disk (the flush interval is 50 ms).
    let db = dir.path().join("state").join("budget.sqlite3");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let total: i64 = rusqlite::Connection::open(&db)
            .and_then(|c| {
                c.query_row(
                    "SELECT COALESCE(SUM(total_tokens),0) FROM period_usage WHERE agent='sage'",
                    [],
                    |r| r.get(0),
                )
            })
            .unwrap_or(0);
        if total == 55 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "usage never reached the store"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    p.child.kill().await.unwrap(); // SIGKILL
    let p = spawn(dir.path(), &mock.url).await;
    assert_eq!(counters(&status(&p).await), expected);
    sigterm(p).await;
}
