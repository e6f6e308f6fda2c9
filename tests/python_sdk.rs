//! A real client: the official `google-genai` Python SDK (tests/python/sdk_client.py)
//! talks to the proxy, which talks to the mock Gemini upstream.
//!
//! The SDK runs from the virtualenv that `scripts/test.sh` sets up (`<repo>/.venv`), or
//! from the interpreter named by `BUDGET_PROXY_TEST_PYTHON`. Without it the test fails
//! and says how to set it up: it is never skipped silently.
#![allow(clippy::unwrap_used)]

mod common;

use common::mock_gemini::Behavior;
use common::Harness;
use common::CONFIG;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

/// How long one run of the SDK script may take (interpreter start, SDK import, two calls).
const SCRIPT_TIMEOUT: Duration = Duration::from_secs(120);
const AGENT: &str = "sage";

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// The Python interpreter that has `google-genai` installed.
fn python() -> PathBuf {
    let path = match std::env::var_os("BUDGET_PROXY_TEST_PYTHON") {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => repo().join(".venv/bin/python"),
    };
    assert!(
        path.exists(),
        "no Python for the google-genai SDK test at {}: run scripts/test.sh (it creates \
         .venv and installs tests/python/requirements.txt), or point \
         BUDGET_PROXY_TEST_PYTHON at a python that has google-genai installed",
        path.display()
    );
    path
}

/// How the script names the agent.
#[derive(Clone, Copy)]
enum Mode {
    /// Base URL `{proxy}/agents/sage`.
    Path,
    /// Base URL `{proxy}` and the header `x-agent-id: sage`.
    Header,
}

/// Runs tests/python/sdk_client.py and returns its JSON report.
async fn run_sdk(base_url: &str, mode: Mode) -> Value {
    let script = repo().join("tests/python/sdk_client.py");
    let mut cmd = tokio::process::Command::new(python());
    cmd.arg(&script).arg(base_url);
    match mode {
        Mode::Path => cmd.arg("path"),
        Mode::Header => cmd.arg("header").arg(AGENT),
    };
    // Only the arguments decide where the SDK goes and which API it speaks: no
    // ambient Google settings, no HTTP proxy in front of the loopback servers.
    for var in [
        "GOOGLE_GENAI_API_VERSION",
        "GOOGLE_GENAI_USE_VERTEXAI",
        "GOOGLE_GENAI_USE_ENTERPRISE",
        "GOOGLE_CLOUD_PROJECT",
        "GOOGLE_CLOUD_LOCATION",
        "GOOGLE_API_KEY",
        "GEMINI_API_KEY",
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "ALL_PROXY",
        "http_proxy",
        "https_proxy",
        "all_proxy",
    ] {
        cmd.env_remove(var);
    }
    cmd.env("NO_PROXY", "127.0.0.1,localhost")
        .env("no_proxy", "127.0.0.1,localhost")
        .env("PYTHONIOENCODING", "utf-8")
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);

    let child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", script.display()));
    let out = tokio::time::timeout(SCRIPT_TIMEOUT, child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("the SDK script did not finish within {SCRIPT_TIMEOUT:?}"))
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "the SDK script failed ({}):\n--- stdout\n{stdout}\n--- stderr\n{stderr}",
        out.status
    );
    let line = stdout
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or_else(|| panic!("the SDK script printed nothing; stderr:\n{stderr}"));
    serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"))
}

/// `used_tokens` of the agent once it reaches `want`, or the last value after 5 s.
async fn used_settled(h: &Harness, agent: &str, want: u64) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let used = h.used(agent).await;
        if used == want || Instant::now() >= deadline {
            return used;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The version segment of an upstream path `/{v}/models/gemini-2.5-flash:{method}`.
fn api_version<'a>(path: &'a str, method: &str) -> &'a str {
    let rest = path
        .strip_prefix('/')
        .unwrap_or_else(|| panic!("upstream path {path:?} is not absolute"));
    let (version, tail) = rest
        .split_once('/')
        .unwrap_or_else(|| panic!("upstream path {path:?} has no version segment"));
    assert!(
        version == "v1" || version == "v1beta",
        "upstream path {path:?}: API version {version:?}, expected v1 or v1beta"
    );
    assert_eq!(
        tail,
        format!("models/gemini-2.5-flash:{method}"),
        "upstream path {path:?}"
    );
    version
}

async fn sdk_round_trip(mode: Mode) {
    let h = Harness::start(CONFIG).await;
    // Different usage per call (thinking tokens on the first, 4 chunks on the
    // second), so a mixed-up or double count cannot add up by chance.
    let gen = Behavior::new().usage(12, 34, 5);
    let stream = Behavior::new().usage(7, 40, 0).chunks(4);
    let want = [gen.total_tokens(), stream.total_tokens()];
    h.mock.push_behavior(gen);
    h.mock.push_behavior(stream);
    let base_url = match mode {
        Mode::Path => format!("{}/agents/{AGENT}", h.base),
        Mode::Header => h.base.clone(),
    };
    let report = run_sdk(&base_url, mode).await;
    eprintln!("google-genai report: {report}");

    // The SDK got the mock's answer, intact (UTF-8 included), on both calls.
    let gen_text = report["generate"]["text"].as_str().unwrap_or_default();
    assert!(gen_text.contains("h\u{e9}llo"), "generate text: {report}");
    let stream_text = report["stream"]["text"].as_str().unwrap_or_default();
    assert!(stream_text.contains("h\u{e9}llo"), "stream text: {report}");
    assert!(
        stream_text.contains("Chunk 4 of 4"),
        "stream text: {report}"
    );
    assert_eq!(report["stream"]["chunks"], 4, "{report}");

    // The upstream saw exactly the SDK's two calls, with the agent prefix stripped.
    let got = h.mock.received();
    assert_eq!(got.len(), 2, "upstream requests: {got:#?}");
    let paths: Vec<String> = got
        .iter()
        .map(|r| match &r.query {
            Some(q) => format!("{}?{q}", r.path),
            None => r.path.clone(),
        })
        .collect();
    eprintln!(
        "upstream saw: {paths:?} (x-agent-id upstream: {:?})",
        got[0].header("x-agent-id")
    );
    for r in &got {
        assert!(
            !r.path.contains("/agents/"),
            "agent prefix reached the upstream: {}",
            r.path
        );
        // `sage` has no virtual keys: the caller's own key passes through.
        assert_eq!(r.header("x-goog-api-key"), Some("test-key"));
    }
    let v_gen = api_version(&got[0].path, "generateContent");
    let v_stream = api_version(&got[1].path, "streamGenerateContent");
    assert_eq!(v_gen, v_stream, "{paths:?}");
    assert_eq!(got[1].query.as_deref(), Some("alt=sse"), "{paths:?}");

    // What the SDK saw is what the mock reported is what the proxy counted.
    let sdk_totals = [
        report["generate"]["total_token_count"].as_u64().unwrap(),
        report["stream"]["total_token_count"].as_u64().unwrap(),
    ];
    assert_eq!(sdk_totals, want, "{report}");
    assert_eq!(h.mock.last_sent_usage_totals(), want, "{report}");
    let reported = h.mock.reported_total_tokens();
    assert_eq!(reported, want.iter().sum::<u64>());
    assert_eq!(used_settled(&h, AGENT, reported).await, reported);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn google_genai_sdk_with_agent_in_base_url_path() {
    sdk_round_trip(Mode::Path).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn google_genai_sdk_with_x_agent_id_header() {
    sdk_round_trip(Mode::Header).await;
}
