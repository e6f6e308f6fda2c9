//! A real headless Chromium for tests, driven over WebDriver (W3C) by `chromedriver`: its own
//! loopback port, its own temp profile, both processes gone on drop.
//!
//! The protocol is JSON over HTTP, so the test's own `reqwest` speaks it; no WebDriver crate.
//!
//! Chromium or chromedriver missing: [`Browser::start`] prints `SKIP: …` and returns `None`,
//! unless `BUDGET_PROXY_REQUIRE_BROWSER=1`, then it panics (CI installs Debian's `chromium`
//! and `chromium-driver`).
#![allow(dead_code, clippy::unwrap_used)]

use serde_json::{json, Value};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// The key of an element reference in WebDriver answers.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

pub struct Browser {
    port: u16,
    session: String,
    driver: Child,
    http: reqwest::Client,
    _profile: tempfile::TempDir,
}

fn find(env: &str, names: &[&str]) -> Option<PathBuf> {
    if let Ok(p) = std::env::var(env) {
        return Some(PathBuf::from(p));
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .flat_map(|dir| names.iter().map(move |n| dir.join(n)))
        .find(|p| p.is_file())
}

/// One WebDriver command: JSON in, JSON out.
async fn send(http: &reqwest::Client, method: reqwest::Method, url: String, body: &Value) -> Value {
    http.request(method, url)
        .json(body)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

impl Browser {
    /// Start chromedriver and a headless Chromium session, or `None` (after a visible SKIP
    /// line) when they are not installed.
    pub async fn start(test: &str) -> Option<Browser> {
        let chromium = find(
            "BUDGET_PROXY_CHROMIUM",
            &["chromium", "chromium-browser", "google-chrome"],
        );
        let driver = find("BUDGET_PROXY_CHROMEDRIVER", &["chromedriver"]);
        let (Some(chromium), Some(driver)) = (chromium, driver) else {
            if std::env::var("BUDGET_PROXY_REQUIRE_BROWSER").as_deref() == Ok("1") {
                panic!("{test}: chromium or chromedriver is not installed and BUDGET_PROXY_REQUIRE_BROWSER=1 (apt-get install chromium chromium-driver)");
            }
            let _ = writeln!(
                std::io::stderr(),
                "SKIP: chromium or chromedriver not installed ({test})"
            );
            return None;
        };
        let http = reqwest::Client::new();
        // A port freed by the probe may be taken meanwhile: try a few.
        for _ in 0..5 {
            let port = free_port();
            let mut child = Command::new(&driver)
                .arg(format!("--port={port}"))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap_or_else(|e| panic!("{test}: cannot run {}: {e}", driver.display()));
            if !Self::ready(&http, port, &mut child).await {
                let _ = child.kill();
                let _ = child.wait();
                continue;
            }
            let profile = tempfile::tempdir().unwrap();
            // As the machine notes say: no sandbox (tests may run as root), no GPU, and no
            // background connections to Google (the network is closed).
            let args = [
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--window-size=1400,900",
            ]
            .map(String::from)
            .into_iter()
            .chain([format!("--user-data-dir={}", profile.path().display())])
            .collect::<Vec<_>>();
            let caps = json!({"capabilities": {"alwaysMatch": {
                "browserName": "chrome",
                "goog:chromeOptions": {"binary": chromium, "args": args},
            }}});
            let url = format!("http://127.0.0.1:{port}/session");
            let r = send(&http, reqwest::Method::POST, url, &caps).await;
            let Some(session) = r["value"]["sessionId"].as_str() else {
                let _ = child.kill();
                let _ = child.wait();
                panic!("{test}: chromedriver did not start a session: {r}");
            };
            return Some(Browser {
                port,
                session: session.to_string(),
                driver: child,
                http,
                _profile: profile,
            });
        }
        panic!("{test}: chromedriver did not start");
    }

    /// Whether chromedriver answers `/status` with `ready` (within 20 s of starting).
    async fn ready(http: &reqwest::Client, port: u16, child: &mut Child) -> bool {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while tokio::time::Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return false; // exited: the port was taken
            }
            if let Ok(r) = http
                .get(format!("http://127.0.0.1:{port}/status"))
                .send()
                .await
            {
                if let Ok(v) = r.json::<Value>().await {
                    if v["value"]["ready"] == true {
                        return true;
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        false
    }

    async fn call(&self, method: reqwest::Method, path: &str, body: Value) -> Value {
        let url = format!(
            "http://127.0.0.1:{}/session/{}{path}",
            self.port, self.session
        );
        let r = send(&self.http, method, url, &body).await;
        if r["value"].get("error").is_some() {
            panic!("WebDriver {path}: {}", r["value"]);
        }
        r["value"].clone()
    }

    /// Navigate to `url` (returns when the page has loaded).
    pub async fn goto(&self, url: &str) {
        self.call(reqwest::Method::POST, "/url", json!({"url": url}))
            .await;
    }

    /// Run `script` (a function body; `return` gives the value) in the page.
    pub async fn eval(&self, script: &str) -> Value {
        self.call(
            reqwest::Method::POST,
            "/execute/sync",
            json!({"script": script, "args": []}),
        )
        .await
    }

    /// Evaluate `script` until it returns something other than `null` or `false`, and return
    /// that; panics with `what` after 15 s (the page polls every 2 s).
    pub async fn wait_for(&self, what: &str, script: &str) -> Value {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
        loop {
            let v = self.eval(script).await;
            if !v.is_null() && v != false {
                return v;
            }
            if tokio::time::Instant::now() >= deadline {
                let page = self
                    .eval("return document.body ? document.body.innerText : ''")
                    .await;
                panic!("the page did not show {what} within 15 s; it shows:\n{page}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Type `text` into the element at `css`.
    pub async fn type_into(&self, css: &str, text: &str) {
        let id = self.element(css).await;
        self.call(
            reqwest::Method::POST,
            &format!("/element/{id}/value"),
            json!({"text": text}),
        )
        .await;
    }

    /// Click the element at `css`.
    pub async fn click(&self, css: &str) {
        let id = self.element(css).await;
        self.call(
            reqwest::Method::POST,
            &format!("/element/{id}/click"),
            json!({}),
        )
        .await;
    }

    async fn element(&self, css: &str) -> String {
        let v = self
            .call(
                reqwest::Method::POST,
                "/element",
                json!({"using": "css selector", "value": css}),
            )
            .await;
        v[ELEMENT].as_str().unwrap().to_string()
    }
}

impl Drop for Browser {
    /// End the session (chromedriver then stops Chromium), then stop chromedriver. Plain
    /// blocking I/O: drop cannot await, and this runs once per test.
    fn drop(&mut self) {
        if let Ok(mut s) = TcpStream::connect(("127.0.0.1", self.port)) {
            let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
            let _ = write!(
                s,
                "DELETE /session/{} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                self.session, self.port
            );
            let mut sink = Vec::new();
            let _ = s.read_to_end(&mut sink);
        }
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}
