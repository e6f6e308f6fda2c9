//! The command line: `check-config` and `status` through the real binary.
#![allow(clippy::unwrap_used)]

mod common;

use common::{Harness, ADMIN_TOKEN, CONFIG};
use std::process::Command;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_budget-proxy"))
}

#[test]
fn check_config_prints_the_resolved_table_of_the_shipped_file() {
    let out = bin()
        .args([
            "check-config",
            concat!(env!("CARGO_MANIFEST_DIR"), "/config/budgets.json"),
        ])
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    for agent in [
        "sage", "blaze", "volt", "luna", "nova", "spark", "aura", "stella", "wave", "code",
        "nexus", "node", "guardian",
    ] {
        assert!(
            text.lines().any(|l| l.starts_with(agent)),
            "{agent} missing:\n{text}"
        );
    }
    assert!(text.contains("gemini-2.5-flash-lite"));
}

#[test]
fn check_config_fails_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        ("{\n  \"default\": {\"max_tokens\": 5,\n  oops\n}", "line 3"),
        ("", "empty"),
        (
            r#"{"default": {"max_tokens": 5, "period": "monthly", "action_on_limit": "warn"}, "agents": {"x": {"reset_day": 40}}}"#,
            "agents.x.reset_day",
        ),
        (
            r#"{"default": {"max_tokens": 5, "period": "monthly", "action_on_limit": "warn", "colour": 1}}"#,
            "colour",
        ),
    ];
    for (i, (text, needle)) in cases.iter().enumerate() {
        let p = dir.path().join(format!("b{i}.json"));
        std::fs::write(&p, text).unwrap();
        let out = bin().arg("check-config").arg(&p).output().unwrap();
        assert_eq!(out.status.code(), Some(1), "case {i}");
        let err = String::from_utf8(out.stderr).unwrap();
        assert!(err.contains(needle), "case {i}: {err}");
    }
    let out = bin()
        .args(["check-config", "/nonexistent/budgets.json"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8(out.stderr)
        .unwrap()
        .contains("/nonexistent/budgets.json"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_prints_every_agent_from_a_running_proxy() {
    let h = Harness::start(CONFIG).await;
    let _ = h.generate("guardian").await.bytes().await.unwrap();
    let admin = h.admin.clone();
    let out = tokio::task::spawn_blocking(move || {
        bin()
            .args(["status", "--admin-url", &admin])
            .env("BUDGET_PROXY_ADMIN_TOKEN", ADMIN_TOKEN)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let line = text.lines().find(|l| l.starts_with("guardian")).unwrap();
    assert!(
        line.contains("30") && line.contains("50") && line.contains("60.00"),
        "{line}"
    );
    assert!(text.lines().any(|l| l.starts_with("sage")));

    let admin = h.admin.clone();
    let out = tokio::task::spawn_blocking(move || {
        bin()
            .args(["status", "--admin-url", &admin])
            .env("BUDGET_PROXY_ADMIN_TOKEN", "wrong")
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8(out.stderr)
        .unwrap()
        .contains("BUDGET_PROXY_ADMIN_TOKEN"));

    let out = bin()
        .args(["status", "--admin-url", "http://127.0.0.1:1"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8(out.stderr)
        .unwrap()
        .contains("cannot reach"));
}
