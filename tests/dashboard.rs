//! The live dashboard (`GET /` on the admin port) in a real headless Chromium: it asks for
//! the token, refuses a wrong one, shows every agent's budget as the admin API reports it,
//! follows new traffic without a reload, and lists alerts. The page's headers are checked
//! over plain HTTP.
#![allow(clippy::unwrap_used)]

#[path = "support/browser.rs"]
mod browser;
mod common;

use browser::Browser;
use common::{wait_until, Harness, ADMIN_TOKEN, CONFIG};

/// A script giving the cell `field` of `agent`'s row, as its raw value (`data-value`), or
/// null.
fn cell(agent: &str, field: &str) -> String {
    format!(
        "const td = document.querySelector('tr[data-agent=\"{agent}\"] td[data-field=\"{field}\"]'); \
         return td ? td.dataset.value : null;"
    )
}

/// A script giving true while the page asks for the token.
const LOGIN_SHOWN: &str = "return !document.getElementById('login').hidden";

/// A script giving true once that cell's raw value is `want`.
fn cell_is(agent: &str, field: &str, want: &str) -> String {
    format!(
        "const td = document.querySelector('tr[data-agent=\"{agent}\"] td[data-field=\"{field}\"]'); \
         return td !== null && td.dataset.value === '{want}';"
    )
}

#[tokio::test]
async fn the_page_and_its_script_need_no_token_and_forbid_inline_scripts() {
    let h = Harness::start(CONFIG).await;
    for (path, kind) in [("/", "text/html"), ("/dashboard.js", "text/javascript")] {
        let r = h
            .http
            .get(format!("{}{path}", h.admin))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{path}");
        let headers = r.headers().clone();
        assert!(
            headers["content-type"].to_str().unwrap().starts_with(kind),
            "{path}: {:?}",
            headers["content-type"]
        );
        let csp = headers["content-security-policy"].to_str().unwrap();
        let scripts = csp
            .split(';')
            .map(str::trim)
            .find(|d| d.starts_with("script-src"))
            .unwrap_or_else(|| panic!("{path}: no script-src in {csp}"));
        assert_eq!(scripts, "script-src 'self'", "{path}: {csp}");
        assert_eq!(headers["referrer-policy"], "no-referrer");
        assert_eq!(headers["x-content-type-options"], "nosniff");
        let body = r.text().await.unwrap();
        // The page holds no data: nothing of the budgets leaks without the token.
        assert!(!body.contains("guardian"), "{path}");
        if path == "/" {
            assert!(body.contains(r#"<script src="/dashboard.js" defer></script>"#));
            assert!(
                !body.contains("<script>"),
                "no inline script: the CSP forbids it"
            );
        }
    }
}

#[tokio::test]
async fn alerts_limit_keeps_the_newest_and_a_bad_limit_is_explained() {
    let h = Harness::start(CONFIG).await;
    // `loud` (10 tokens, warn) crosses 75, 90 and 100 % with one request: three alerts.
    assert_eq!(h.generate("loud").await.status(), 200);
    let alerts = |q: &'static str| {
        let h = &h;
        async move {
            let r = h
                .http
                .get(format!("{}/api/budget/alerts{q}", h.admin))
                .bearer_auth(ADMIN_TOKEN)
                .send()
                .await
                .unwrap();
            (r.status(), r.json::<serde_json::Value>().await.unwrap())
        }
    };
    wait_until(|| async { alerts("").await.1["alerts"].as_array().unwrap().len() == 3 }).await;
    let (_, all) = alerts("").await;
    let (code, two) = alerts("?limit=2").await;
    assert_eq!(code, 200);
    assert_eq!(
        two["alerts"].as_array().unwrap()[..],
        all["alerts"].as_array().unwrap()[..2]
    );
    let (code, body) = alerts("?limit=-1").await;
    assert_eq!(code, 400);
    assert!(
        body.to_string().contains("limit=\\\"-1\\\""),
        "the error names the value: {body}"
    );
}

#[tokio::test]
async fn the_dashboard_asks_for_the_token_then_shows_live_budgets_and_alerts() {
    let Some(browser) = Browser::start("dashboard").await else {
        return;
    };
    let h = Harness::start(CONFIG).await;
    assert_eq!(h.generate("sage").await.status(), 200);
    wait_until(|| async { h.used("sage").await > 0 }).await;

    // No token: the page asks for it and shows no figures.
    browser.goto(&format!("{}/", h.admin)).await;
    browser.wait_for("the token form", LOGIN_SHOWN).await;
    assert_eq!(
        browser
            .eval("return document.getElementById('data').hidden")
            .await,
        true
    );
    assert_eq!(
        browser.eval(&cell("sage", "used_tokens")).await,
        serde_json::Value::Null
    );

    // A wrong token is refused, and said so.
    browser.type_into("#token", "not-the-token").await;
    browser.click("#login button").await;
    browser
        .wait_for(
            "that the token was refused",
            "return document.getElementById('login-why').textContent.includes('refused')",
        )
        .await;

    // The right one: every agent of the config, with the admin API's figures.
    browser.type_into("#token", ADMIN_TOKEN).await;
    browser.click("#login button").await;
    let used = h.used("sage").await;
    let shown = browser
        .wait_for("sage's used tokens", &cell("sage", "used_tokens"))
        .await;
    assert_eq!(shown, used.to_string());
    let rows = browser
        .eval(
            "return [...document.querySelectorAll('#agents tr')].map(r => r.dataset.agent).sort()",
        )
        .await;
    assert_eq!(
        rows,
        serde_json::json!(["cheap", "guardian", "keyed", "loud", "sage", "tight"])
    );
    let status = h.status("sage").await;
    assert_eq!(status["requests"], 1);
    assert_eq!(browser.eval(&cell("sage", "requests")).await, "1");
    assert_eq!(browser.eval(&cell("sage", "health")).await, "ok");
    assert_eq!(
        browser.eval(&cell("sage", "action_on_limit")).await,
        "degrade"
    );
    assert_eq!(browser.eval(&cell("guardian", "used_tokens")).await, "0");

    // Live: traffic after the page loaded shows up without a reload.
    for _ in 0..2 {
        assert_eq!(h.generate("sage").await.status(), 200);
    }
    assert_eq!(h.generate("loud").await.status(), 200);
    // The mock answers the same body with the same usage: three requests, three times it.
    let used_now = 3 * used;
    wait_until(|| async { h.used("sage").await == used_now }).await;
    browser
        .wait_for(
            "sage's new total",
            &cell_is("sage", "used_tokens", &used_now.to_string()),
        )
        .await;
    assert_eq!(browser.eval(&cell("sage", "requests")).await, "3");
    // `loud` went over its 10 tokens (warn): exceeded, first in the table, with its alerts.
    browser
        .wait_for("loud exceeded", &cell_is("loud", "health", "exceeded"))
        .await;
    assert_eq!(
        browser
            .eval("return document.querySelector('#agents tr').dataset.agent")
            .await,
        "loud"
    );
    let levels = browser
        .wait_for(
            "loud's alerts",
            "const l = [...document.querySelectorAll('#alerts tr')] \
               .filter(r => r.querySelector('[data-field=agent_id]').dataset.value === 'loud') \
               .map(r => r.querySelector('[data-field=level]').dataset.value).sort(); \
             return l.length === 3 ? l : null;",
        )
        .await;
    assert_eq!(levels, serde_json::json!(["critical", "limit", "warning"]));
    assert_eq!(
        browser
            .eval("return document.getElementById('sum-health').textContent")
            .await,
        "0 / 0 / 1"
    );

    // A token given in the address of a fresh page is used, and taken out of the address.
    browser.eval("sessionStorage.clear(); return true").await;
    browser.goto("about:blank").await;
    browser
        .goto(&format!("{}/#token={ADMIN_TOKEN}", h.admin))
        .await;
    browser
        .wait_for("sage's row", &cell("sage", "used_tokens"))
        .await;
    assert_eq!(browser.eval("return location.hash").await, "");
    assert_eq!(
        browser
            .eval("return sessionStorage.getItem('budget-proxy-admin-token')")
            .await,
        ADMIN_TOKEN
    );

    // Forgotten again, the page asks; a token pasted into its address is taken at once.
    browser.eval("sessionStorage.clear(); return true").await;
    browser.goto("about:blank").await;
    browser.goto(&format!("{}/", h.admin)).await;
    browser.wait_for("the token form", LOGIN_SHOWN).await;
    browser
        .eval(&format!(
            "location.hash = 'token={ADMIN_TOKEN}'; return true"
        ))
        .await;
    browser
        .wait_for(
            "the budgets after the token came in the address",
            "return document.getElementById('login').hidden && !document.getElementById('data').hidden",
        )
        .await;
    assert_eq!(browser.eval("return location.hash").await, "");
}
