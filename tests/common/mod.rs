//! Shared test harness: a mock Gemini upstream and the proxy, in-process, on ephemeral
//! loopback ports, with a fresh state directory.
#![allow(dead_code, clippy::unwrap_used)]

#[path = "../support/mock_gemini.rs"]
pub mod mock_gemini;

use budget_proxy::app::{self, Options, Running};
use budget_proxy::clock::{Clock, SystemClock};
use mock_gemini::MockGemini;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// The real key the proxy sends upstream in place of virtual keys.
pub const REAL_KEY: &str = "real-gemini-key-xyz";
/// Admin token used by the tests.
pub const ADMIN_TOKEN: &str = "test-admin-token";

/// The virtual key of agent `keyed` (its sha256 is in [`CONFIG`]).
pub const VIRTUAL_KEY: &str = "vk-keyed-1";

/// A config with one agent per action and a virtual-key agent.
pub const CONFIG: &str = r#"{
  "default": {"max_tokens": 1000000, "period": "monthly", "action_on_limit": "warn", "fallback_model": "gemini-2.5-flash-lite"},
  "agents": {
    "sage": {"max_tokens": 3000000, "period": "monthly", "action_on_limit": "degrade", "fallback_model": "gemini-2.5-flash-lite"},
    "guardian": {"max_tokens": 50, "period": "monthly", "action_on_limit": "block"},
    "tight": {"max_tokens": 50, "period": "infinite", "action_on_limit": "block"},
    "cheap": {"max_tokens": 10, "period": "monthly", "action_on_limit": "degrade", "fallback_model": "gemini-2.5-flash-lite"},
    "loud": {"max_tokens": 10, "period": "daily", "action_on_limit": "warn"},
    "keyed": {"max_tokens": 100000, "period": "monthly", "action_on_limit": "block",
              "api_keys": ["sha256:990b103e79f877c82fe4dcec32bd3595046b6c9e656ec67be4dd6a1f7e9f9f4f"]}
  }
}"#;

pub fn options(state_dir: &Path, config_path: PathBuf, upstream: &str) -> Options {
    Options {
        config_path,
        listen: "127.0.0.1:0".parse().unwrap(),
        admin_listen: "127.0.0.1:0".parse().unwrap(),
        upstream: upstream.to_string(),
        upstream_ca: None,
        state_dir: state_dir.to_path_buf(),
        upstream_timeout: Duration::from_secs(10),
        connect_timeout: Duration::from_secs(2),
        upstream_idle_timeout: Duration::from_secs(90),
        tls: Default::default(),
        drain_timeout: Duration::from_secs(10),
        shutdown_timeout: Duration::from_secs(10),
        flush_interval: Duration::from_millis(50),
        max_body_bytes: 1024 * 1024,
        max_deferred_body_bytes: 64 * 1024,
        job_ttl: Duration::from_secs(3600),
        default_output_tokens: 16,
        watch_config: None,
        admin_token: Some(ADMIN_TOKEN.to_string()),
        gemini_api_key: Some(REAL_KEY.to_string()),
        redis_url: None,
    }
}

pub struct Harness {
    pub mock: MockGemini,
    pub app: Running,
    pub dir: tempfile::TempDir,
    pub http: reqwest::Client,
    /// `http://127.0.0.1:port` of the proxy.
    pub base: String,
    /// `http://127.0.0.1:port` of the admin API.
    pub admin: String,
}

impl Harness {
    pub async fn start(config: &str) -> Harness {
        Self::start_tweaked(config, |_| {}).await
    }

    /// On the system clock, with `tweak` applied to the proxy's options.
    pub async fn start_tweaked(config: &str, tweak: impl FnOnce(&mut Options)) -> Harness {
        Self::start_with(config, Arc::new(SystemClock), tweak).await
    }

    pub async fn start_with(
        config: &str,
        clock: Arc<dyn Clock>,
        tweak: impl FnOnce(&mut Options),
    ) -> Harness {
        let mock = MockGemini::start().await;
        let dir = tempfile::tempdir().unwrap();
        let config_path = dir.path().join("budgets.json");
        std::fs::write(&config_path, config).unwrap();
        let mut opts = options(&dir.path().join("state"), config_path, &mock.url);
        tweak(&mut opts);
        let app = app::start_with_clock(opts, clock).await.unwrap();
        let base = format!("http://{}", app.proxy_addr);
        let admin = format!("http://{}", app.admin_addr);
        Harness {
            mock,
            app,
            dir,
            http: reqwest::Client::new(),
            base,
            admin,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    /// STATUS of one agent from the admin API.
    pub async fn status(&self, agent: &str) -> serde_json::Value {
        let r = self
            .http
            .get(format!("{}/api/budget/status/{agent}", self.admin))
            .bearer_auth(ADMIN_TOKEN)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "status of {agent}");
        r.json().await.unwrap()
    }

    pub async fn used(&self, agent: &str) -> u64 {
        self.status(agent).await["used_tokens"].as_u64().unwrap()
    }

    /// POST a generateContent for `agent` via the path prefix.
    pub async fn generate(&self, agent: &str) -> reqwest::Response {
        self.http
            .post(self.url(&format!(
                "/agents/{agent}/v1beta/models/gemini-2.5-flash:generateContent"
            )))
            .json(&serde_json::json!({"contents": [{"parts": [{"text": "hi"}]}]}))
            .send()
            .await
            .unwrap()
    }
}

/// A simple request body.
pub fn hello() -> serde_json::Value {
    serde_json::json!({"contents": [{"role": "user", "parts": [{"text": "Hello there"}]}]})
}

/// A generateContent body whose text is `letters` letters long (a–z over and over): for
/// bodies larger than what the proxy reads before forwarding.
pub fn large_body(letters: u32) -> Vec<u8> {
    let text: String = (0..letters)
        .map(|i| char::from(b'a' + (i % 26) as u8))
        .collect();
    serde_json::to_vec(&serde_json::json!({"contents": [{"parts": [{"text": text}]}]})).unwrap()
}

/// Poll an async condition until it holds (settlement completes after the response).
pub async fn wait_until<F, Fut>(mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        if cond().await {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "condition not met within 10 s"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
