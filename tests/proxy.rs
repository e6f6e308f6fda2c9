//! The proxy end to end: a real mock Gemini upstream, the real proxy, a real HTTP client.
#![allow(clippy::unwrap_used)]

mod common;

use common::mock_gemini::Behavior;
use common::{hello, wait_until, Harness, CONFIG, REAL_KEY, VIRTUAL_KEY};
use futures_util::StreamExt;
use std::time::Duration;

fn header<'a>(r: &'a reqwest::Response, name: &str) -> &'a str {
    r.headers()
        .get(name)
        .unwrap_or_else(|| panic!("missing header {name}"))
        .to_str()
        .unwrap()
}

#[tokio::test]
async fn generate_content_is_forwarded_metered_and_prefix_stripped() {
    let h = Harness::start(CONFIG).await;
    h.mock
        .set_behavior(Behavior::new().usage(11, 22, 5).cached(3));
    let r = h
        .http
        .post(h.url("/agents/sage/v1beta/models/gemini-2.5-flash:generateContent?foo=bar"))
        .header("x-custom", "kept")
        .header("x-goog-api-key", "caller-own-key")
        .json(&hello())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "x-budget-agent"), "sage");
    assert_eq!(header(&r, "x-budget-action"), "allow");
    let remaining: u64 = header(&r, "x-budget-remaining").parse().unwrap();
    assert!(
        remaining < 3_000_000 && remaining > 2_990_000,
        "{remaining}"
    );
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["usageMetadata"]["totalTokenCount"], 38);

    let got = &h.mock.received()[0];
    assert_eq!(got.path, "/v1beta/models/gemini-2.5-flash:generateContent");
    assert_eq!(got.query.as_deref(), Some("foo=bar"));
    assert_eq!(got.header("x-custom"), Some("kept"));
    // An agent without api_keys uses its own key, passed through untouched.
    assert_eq!(got.header("x-goog-api-key"), Some("caller-own-key"));
    assert_eq!(got.body_json().unwrap(), hello());

    let s = h.status("sage").await;
    assert_eq!(s["used_tokens"], 38);
    assert_eq!(s["prompt_tokens"], 11);
    assert_eq!(s["completion_tokens"], 27);
    assert_eq!(s["cached_tokens"], 3);
    assert_eq!(s["requests"], 1);
    assert_eq!(s["reserved_tokens"], 0);
    assert!(s["estimated_cost_usd"].as_f64().unwrap() > 0.0);
}

#[tokio::test]
async fn sse_stream_chunks_arrive_one_by_one_and_final_usage_counts() {
    let h = Harness::start(CONFIG).await;
    h.mock.set_behavior(
        Behavior::new()
            .usage(10, 40, 0)
            .chunks(4)
            .chunk_delay(Duration::from_millis(150)),
    );
    let r = h
        .http
        .post(h.url("/agents/sage/v1/models/gemini-2.5-flash:streamGenerateContent?alt=sse"))
        .json(&hello())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "content-type"), "text/event-stream");
    let mut stream = r.bytes_stream();
    // The first event reaches the client while the upstream is still streaming: the
    // proxy forwards each chunk as it comes instead of buffering the body.
    let first = stream.next().await.unwrap().unwrap();
    assert_eq!(String::from_utf8_lossy(&first).matches("data: ").count(), 1);
    let sent_so_far = h.mock.last_sent_usage_totals()[0];
    assert!(
        sent_so_far < 50,
        "the mock had already sent everything ({sent_so_far})"
    );
    let mut all = first.to_vec();
    while let Some(chunk) = stream.next().await {
        all.extend_from_slice(&chunk.unwrap());
    }
    let text = String::from_utf8(all).unwrap();
    assert_eq!(text.matches("data: ").count(), 4);
    assert!(text.ends_with("\r\n\r\n"), "events re-emitted exactly");
    assert_eq!(h.used("sage").await, 50);
}

#[tokio::test]
async fn json_array_stream_and_usage_only_at_the_end() {
    let h = Harness::start(CONFIG).await;
    h.mock.set_behavior(
        Behavior::new()
            .usage(7, 30, 12)
            .chunks(3)
            .usage_every_chunk(false),
    );
    let r = h
        .http
        .post(h.url("/agents/sage/v1beta/models/gemini-2.5-flash:streamGenerateContent"))
        .json(&hello())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v.as_array().unwrap().len(), 3);
    let s = h.status("sage").await;
    assert_eq!(s["used_tokens"], 49);
    assert_eq!(s["completion_tokens"], 42, "thinking bills as output");
}

#[tokio::test]
async fn count_tokens_and_embeddings_carry_no_generation_usage() {
    let h = Harness::start(CONFIG).await;
    for method in ["countTokens", "embedContent"] {
        let r = h
            .http
            .post(h.url(&format!(
                "/agents/sage/v1beta/models/text-embedding-004:{method}"
            )))
            .json(&hello())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{method}");
        assert_eq!(header(&r, "x-budget-agent"), "sage");
        let _ = r.bytes().await.unwrap();
    }
    let s = h.status("sage").await;
    assert_eq!(s["used_tokens"], 0);
    assert_eq!(s["reserved_tokens"], 0);
    // countTokens is free and not budgeted; embedContent is a budgeted request.
    assert_eq!(s["requests"], 1);
}

#[tokio::test]
async fn agent_from_header_and_v1_paths() {
    let h = Harness::start(CONFIG).await;
    let r = h
        .http
        .post(h.url("/v1/models/gemini-2.5-flash:generateContent"))
        .header("x-agent-id", "sage")
        .json(&hello())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "x-budget-agent"), "sage");
    let _ = r.bytes().await.unwrap();
    assert_eq!(
        h.mock.received()[0].path,
        "/v1/models/gemini-2.5-flash:generateContent"
    );
    assert_eq!(h.used("sage").await, 30);
}

#[tokio::test]
async fn virtual_key_identifies_the_agent_and_is_replaced_upstream() {
    let h = Harness::start(CONFIG).await;
    // In the header.
    let r = h
        .http
        .post(h.url("/v1beta/models/gemini-2.5-flash:generateContent"))
        .header("x-goog-api-key", VIRTUAL_KEY)
        .json(&hello())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "x-budget-agent"), "keyed");
    let _ = r.bytes().await.unwrap();
    // In the query, with the prefix naming the same agent.
    let r = h
        .http
        .post(h.url(&format!(
            "/agents/keyed/v1beta/models/gemini-2.5-flash:generateContent?key={VIRTUAL_KEY}&x=1"
        )))
        .json(&hello())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let _ = r.bytes().await.unwrap();
    let got = h.mock.received();
    assert_eq!(got[0].header("x-goog-api-key"), Some(REAL_KEY));
    assert_eq!(
        got[1].query.as_deref(),
        Some(&*format!("key={REAL_KEY}&x=1"))
    );
    assert_eq!(h.used("keyed").await, 60);
}

#[tokio::test]
async fn identity_errors_are_gemini_shaped() {
    let h = Harness::start(CONFIG).await;
    let cases: Vec<(reqwest::RequestBuilder, u16, &str)> = vec![
        // No identity at all (a real key alone names no agent).
        (
            h.http
                .post(h.url("/v1beta/models/gemini-2.5-flash:generateContent"))
                .header("x-goog-api-key", "some-real-key"),
            401,
            "UNAUTHENTICATED",
        ),
        // Agent with api_keys named by prefix, no key.
        (
            h.http
                .post(h.url("/agents/keyed/v1beta/models/gemini-2.5-flash:generateContent")),
            403,
            "PERMISSION_DENIED",
        ),
        // Agent with api_keys named by header, wrong key.
        (
            h.http
                .post(h.url("/v1beta/models/gemini-2.5-flash:generateContent"))
                .header("x-agent-id", "keyed")
                .header("x-goog-api-key", "not-the-key"),
            403,
            "PERMISSION_DENIED",
        ),
        // Another agent's virtual key.
        (
            h.http
                .post(h.url("/agents/sage/v1beta/models/gemini-2.5-flash:generateContent"))
                .header("x-goog-api-key", VIRTUAL_KEY),
            403,
            "PERMISSION_DENIED",
        ),
        // Bad agent id.
        (
            h.http
                .post(h.url("/v1beta/models/gemini-2.5-flash:generateContent"))
                .header("x-agent-id", "bad id!"),
            400,
            "INVALID_ARGUMENT",
        ),
    ];
    for (i, (req, code, status)) in cases.into_iter().enumerate() {
        let r = req.json(&hello()).send().await.unwrap();
        assert_eq!(r.status().as_u16(), code, "case {i}");
        let v: serde_json::Value = r.json().await.unwrap();
        assert_eq!(v["error"]["code"], code, "case {i}");
        assert_eq!(v["error"]["status"], status, "case {i}");
        assert!(
            v["error"]["message"].as_str().unwrap().len() > 20,
            "case {i}"
        );
    }
    assert_eq!(
        h.mock.request_count(),
        0,
        "nothing refused reaches the upstream"
    );
}

#[tokio::test]
async fn unknown_agents_get_default_or_are_rejected_and_are_capped() {
    let h = Harness::start(CONFIG).await;
    let r = h.generate("newcomer").await;
    assert_eq!(r.status(), 200);
    let _ = r.bytes().await.unwrap();
    let s = h.status("newcomer").await;
    assert_eq!(s["max_tokens"], 1_000_000, "the default budget");
    assert_eq!(s["used_tokens"], 30);

    let reject = CONFIG.replacen(
        "\"default\":",
        "\"unknown_agents\": \"reject\", \"default\":",
        1,
    );
    let h = Harness::start(&reject).await;
    let r = h.generate("stranger").await;
    assert_eq!(r.status(), 403);
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["error"]["status"], "PERMISSION_DENIED");

    let capped = CONFIG.replacen("\"default\":", "\"max_dynamic_agents\": 2, \"default\":", 1);
    let h = Harness::start(&capped).await;
    for (agent, code) in [
        ("a1", 200),
        ("a2", 200),
        ("a3", 403),
        ("a1", 200),
        ("sage", 200),
    ] {
        let r = h.generate(agent).await;
        assert_eq!(r.status().as_u16(), code, "{agent}");
        let _ = r.bytes().await.unwrap();
    }
}

#[tokio::test]
async fn block_answers_429_with_retry_after_and_gemini_body() {
    let h = Harness::start(CONFIG).await;
    // guardian: 50 tokens, each request uses 30. Two are admitted (0 < 50, 30 < 50).
    for _ in 0..2 {
        let r = h.generate("guardian").await;
        assert_eq!(r.status(), 200);
        let _ = r.bytes().await.unwrap();
    }
    let r = h.generate("guardian").await;
    assert_eq!(r.status(), 429);
    assert_eq!(header(&r, "x-budget-action"), "block");
    assert_eq!(header(&r, "x-budget-remaining"), "0");
    assert_eq!(header(&r, "x-budget-agent"), "guardian");
    let retry: u64 = header(&r, "retry-after").parse().unwrap();
    assert!(retry > 0 && retry <= 31 * 86400);
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], 429);
    assert_eq!(v["error"]["status"], "RESOURCE_EXHAUSTED");
    assert!(v["error"]["message"].as_str().unwrap().contains("guardian"));
    let d = &v["error"]["details"][0];
    assert_eq!(d["@type"], "type.googleapis.com/google.rpc.RetryInfo");
    assert_eq!(d["retryDelay"], format!("{retry}s"));
    assert_eq!(h.mock.request_count(), 2);
    let s = h.status("guardian").await;
    assert_eq!(s["used_tokens"], 60);
    assert_eq!(s["blocked"], 1);
    assert_eq!(s["health"], "exceeded");

    // An infinite period never resets: no Retry-After, no RetryInfo.
    for _ in 0..2 {
        let _ = h.generate("tight").await.bytes().await.unwrap();
    }
    let r = h.generate("tight").await;
    assert_eq!(r.status(), 429);
    assert!(r.headers().get("retry-after").is_none());
    let v: serde_json::Value = r.json().await.unwrap();
    assert!(v["error"].get("details").is_none());
}

#[tokio::test]
async fn degrade_rewrites_the_model_in_path_and_body() {
    let h = Harness::start(CONFIG).await;
    let r = h.generate("cheap").await; // 30 > 10: the next ones degrade
    assert_eq!(header(&r, "x-budget-action"), "allow");
    let _ = r.bytes().await.unwrap();
    let r = h
        .http
        .post(h.url("/agents/cheap/v1beta/models/gemini-2.5-pro:streamGenerateContent?alt=sse"))
        .json(&hello())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "x-budget-action"), "degrade");
    assert_eq!(header(&r, "x-budget-model"), "gemini-2.5-flash-lite");
    let _ = r.bytes().await.unwrap();
    let batch = serde_json::json!({"requests": [
        {"model": "models/gemini-embedding-001", "content": {"parts": [{"text": "a"}]}},
        {"model": "models/gemini-embedding-001", "content": {"parts": [{"text": "b"}]}}
    ]});
    let r = h
        .http
        .post(h.url("/agents/cheap/v1beta/models/gemini-embedding-001:batchEmbedContents"))
        .json(&batch)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let _ = r.bytes().await.unwrap();
    let got = h.mock.received();
    assert_eq!(
        got[1].path,
        "/v1beta/models/gemini-2.5-flash-lite:streamGenerateContent"
    );
    assert_eq!(got[1].query.as_deref(), Some("alt=sse"));
    assert_eq!(
        got[2].path,
        "/v1beta/models/gemini-2.5-flash-lite:batchEmbedContents"
    );
    let body = got[2].body_json().unwrap();
    for req in body["requests"].as_array().unwrap() {
        assert_eq!(req["model"], "models/gemini-2.5-flash-lite");
    }
    // The usage of the fallback model is recorded under it.
    let s = h.status("cheap").await;
    assert!(
        s["by_model"]["gemini-2.5-flash-lite"]["total_tokens"]
            .as_u64()
            .unwrap()
            >= 30
    );
}

#[tokio::test]
async fn degrade_refuses_a_request_bound_to_a_cached_content() {
    let h = Harness::start(CONFIG).await;
    let _ = h.generate("cheap").await.bytes().await.unwrap();
    let r = h
        .http
        .post(h.url("/agents/cheap/v1beta/models/gemini-2.5-pro:generateContent"))
        .json(&serde_json::json!({"cachedContent": "cachedContents/abc", "contents": []}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 429);
    assert_eq!(header(&r, "x-budget-action"), "block");
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["error"]["status"], "RESOURCE_EXHAUSTED");
    assert!(v["error"]["message"]
        .as_str()
        .unwrap()
        .contains("cachedContent"));
    assert_eq!(h.mock.request_count(), 1);
    assert_eq!(h.status("cheap").await["reserved_tokens"], 0);
}

#[tokio::test]
async fn warn_allows_over_the_limit() {
    let h = Harness::start(CONFIG).await;
    for expected in ["allow", "warn", "warn"] {
        let r = h.generate("loud").await;
        assert_eq!(r.status(), 200);
        assert_eq!(header(&r, "x-budget-action"), expected);
        // The first request's own reservation already exceeds the 10-token budget.
        assert_eq!(header(&r, "x-budget-remaining"), "0");
        let _ = r.bytes().await.unwrap();
    }
    let s = h.status("loud").await;
    assert_eq!(s["used_tokens"], 90);
    assert_eq!(s["percentage"], 900.0);
}

#[tokio::test]
async fn upstream_errors_pass_through_and_charge_nothing() {
    let h = Harness::start(CONFIG).await;
    h.mock.push_behavior(Behavior::error(503));
    let r = h.generate("sage").await;
    assert_eq!(r.status(), 503);
    assert_eq!(header(&r, "x-budget-agent"), "sage");
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["error"]["status"], "UNAVAILABLE");
    let s = h.status("sage").await;
    assert_eq!(s["used_tokens"], 0);
    assert_eq!(s["reserved_tokens"], 0);
}

#[tokio::test]
async fn dead_upstream_is_502_and_slow_upstream_is_504() {
    // A port bound but not listening: connection refused. The socket keeps the port taken
    // for the whole test (a listener closed at once let another test's server take its port,
    // which then answered).
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let dead = socket.local_addr().unwrap();
    let h = Harness::start_tweaked(CONFIG, |o| {
        o.upstream = format!("http://{dead}");
    })
    .await;
    let r = h.generate("sage").await;
    assert_eq!(r.status(), 502);
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["error"]["status"], "UNAVAILABLE");
    assert!(v["error"]["message"]
        .as_str()
        .unwrap()
        .contains(&dead.to_string()));
    assert_eq!(h.status("sage").await["reserved_tokens"], 0);

    let h = Harness::start_tweaked(CONFIG, |o| {
        o.upstream_timeout = Duration::from_millis(200);
    })
    .await;
    h.mock
        .set_behavior(Behavior::new().delay_before_headers(Duration::from_secs(3)));
    let r = h.generate("sage").await;
    assert_eq!(r.status(), 504);
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["error"]["status"], "DEADLINE_EXCEEDED");
}

#[tokio::test]
async fn an_upstream_timeout_too_large_for_the_clock_is_no_timeout() {
    // `--upstream-timeout 18446744073709551615`: the deadline cannot be added to the clock.
    let h = Harness::start_tweaked(CONFIG, |o| {
        o.upstream_timeout = Duration::from_secs(u64::MAX);
    })
    .await;
    let r = h.generate("sage").await;
    assert_eq!(r.status(), 200);
    assert_eq!(h.mock.request_count(), 1);
}

#[tokio::test]
async fn cut_stream_records_the_last_usage_seen() {
    let h = Harness::start(CONFIG).await;
    h.mock.set_behavior(
        Behavior::new()
            .usage(10, 90, 0)
            .chunks(3)
            .cut_after_chunks(2),
    );
    let r = h
        .http
        .post(h.url("/agents/sage/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse"))
        .json(&hello())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.bytes().await.is_err(), "the client sees the cut");
    let seen = h.mock.reported_total_tokens();
    assert_eq!(seen, 10 + 60);
    // Settlement happens when the proxy sees the cut; poll the status until it lands.
    wait_until(|| async { h.used("sage").await == seen }).await;
}

#[tokio::test]
async fn cut_before_any_usage_charges_the_estimate() {
    let h = Harness::start(CONFIG).await;
    h.mock.set_behavior(
        Behavior::new()
            .usage(10, 90, 0)
            .chunks(3)
            .usage_every_chunk(false)
            .cut_after_chunks(1),
    );
    let r = h
        .http
        .post(h.url("/agents/sage/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse"))
        .json(&serde_json::json!({"contents": [], "generationConfig": {"maxOutputTokens": 500}}))
        .send()
        .await
        .unwrap();
    assert!(r.bytes().await.is_err());
    // Estimate: body bytes / 4 + maxOutputTokens.
    wait_until(|| async { h.used("sage").await >= 500 }).await;
    assert_eq!(h.status("sage").await["reserved_tokens"], 0);
}

#[tokio::test]
async fn client_disconnect_mid_stream_still_records_usage() {
    let h = Harness::start(CONFIG).await;
    h.mock.set_behavior(
        Behavior::new()
            .usage(10, 100, 0)
            .chunks(5)
            .chunk_delay(Duration::from_millis(40)),
    );
    let r = h
        .http
        .post(h.url("/agents/sage/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse"))
        .json(&hello())
        .send()
        .await
        .unwrap();
    let mut s = r.bytes_stream();
    let first = s.next().await.unwrap().unwrap();
    assert!(first.starts_with(b"data: "));
    drop(s); // the client goes away after the first chunk
             // The proxy keeps draining the upstream: the full usage is recorded.
    wait_until(|| async { h.used("sage").await == 110 }).await;
    assert_eq!(h.mock.reported_total_tokens(), 110);
}

#[tokio::test]
async fn mid_stream_error_after_200_is_forwarded() {
    let h = Harness::start(CONFIG).await;
    h.mock.set_behavior(
        Behavior::new()
            .usage(5, 20, 0)
            .chunks(2)
            .mid_stream_error(true),
    );
    let r = h
        .http
        .post(h.url("/agents/sage/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse"))
        .json(&hello())
        .send()
        .await
        .unwrap();
    let text = r.text().await.unwrap();
    assert!(text.contains("\"UNAVAILABLE\""));
    assert_eq!(h.used("sage").await, 25);
}

#[tokio::test]
async fn upload_url_is_rewritten_to_the_proxy_with_the_agent_prefix() {
    let h = Harness::start(CONFIG).await;
    let r = h
        .http
        .post(h.url("/agents/sage/upload/v1beta/files"))
        .header("x-goog-upload-protocol", "resumable")
        .header("x-goog-upload-command", "start")
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let url = header(&r, "x-goog-upload-url").to_string();
    assert!(
        url.starts_with(&format!(
            "{}/agents/sage/upload/v1beta/files?upload_id=",
            h.base
        )),
        "{url}"
    );
    // The rewritten URL works through the proxy.
    let r = h.http.post(&url).body("bytes").send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(h.mock.received()[1].path, "/upload/v1beta/files");
}

#[tokio::test]
async fn hop_by_hop_headers_are_not_forwarded() {
    let h = Harness::start(CONFIG).await;
    let r = h
        .http
        .post(h.url("/agents/sage/v1beta/models/gemini-2.5-flash:generateContent"))
        .header("connection", "x-drop-me")
        .header("x-drop-me", "1")
        .header("proxy-authorization", "secret")
        .header("x-keep", "1")
        .json(&hello())
        .send()
        .await
        .unwrap();
    let _ = r.bytes().await.unwrap();
    let got = &h.mock.received()[0];
    assert!(got.header("x-drop-me").is_none());
    assert!(got.header("proxy-authorization").is_none());
    assert_eq!(got.header("x-keep"), Some("1"));
    assert_eq!(got.header("host"), Some(&*h.mock.addr.to_string()));
    assert_eq!(
        got.headers.get_all("host").iter().count(),
        1,
        "the client's Host too"
    );
}

/// The upstream's head goes back as it came (HTTP/1.1 clients) or through a map (HTTP/2
/// clients, served by hyper): either way without its hop-by-hop headers or an `x-budget-*`
/// of its own, and with the proxy's.
#[tokio::test]
async fn hop_by_hop_headers_of_the_upstream_are_not_passed_back() {
    let h = Harness::start(CONFIG).await;
    h.mock.set_behavior(
        Behavior::new()
            .response_header("connection", "x-hop-secret")
            .response_header("x-hop-secret", "1")
            .response_header("keep-alive", "timeout=5")
            .response_header("x-budget-agent", "someone-else")
            .response_header("x-budget-model", "upstream-model")
            .response_header("X-Upstream-Keep", "yes")
            .response_header("x-upstream-keep", "twice"),
    );
    let h2 = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    for (client, version) in [
        (&h.http, reqwest::Version::HTTP_11),
        (&h2, reqwest::Version::HTTP_2),
    ] {
        let r = client
            .post(h.url("/agents/sage/v1beta/models/gemini-2.5-flash:generateContent"))
            .json(&hello())
            .send()
            .await
            .unwrap();
        assert_eq!(r.version(), version);
        assert_eq!(r.status(), 200);
        let headers = r.headers().clone();
        let body: serde_json::Value = r.json().await.unwrap();
        assert_eq!(body["usageMetadata"]["totalTokenCount"], 30, "{version:?}");
        for gone in ["x-hop-secret", "keep-alive", "connection", "x-budget-model"] {
            assert!(
                headers.get(gone).is_none(),
                "{gone} passed back ({version:?})"
            );
        }
        let agent: Vec<_> = headers.get_all("x-budget-agent").iter().collect();
        assert_eq!(agent, ["sage"], "{version:?}");
        assert_eq!(headers["x-budget-action"], "allow");
        let kept: Vec<_> = headers.get_all("x-upstream-keep").iter().collect();
        assert_eq!(kept, ["yes", "twice"], "{version:?}");
        assert_eq!(headers["content-type"], "application/json; charset=UTF-8");
        assert_eq!(headers.get_all("date").iter().count(), 1, "{version:?}");
    }
}

#[tokio::test]
async fn http2_prior_knowledge_clients_are_served() {
    let h = Harness::start(CONFIG).await;
    let c = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    let r = c
        .post(h.url("/agents/sage/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse"))
        .json(&hello())
        .send()
        .await
        .unwrap();
    assert_eq!(r.version(), reqwest::Version::HTTP_2);
    assert_eq!(r.status(), 200);
    assert!(r.text().await.unwrap().contains("finishReason"));
    assert_eq!(h.used("sage").await, 30);
}

#[tokio::test]
async fn body_over_the_limit_is_413() {
    let h = Harness::start_tweaked(CONFIG, |o| {
        o.max_body_bytes = 1000;
    })
    .await;
    let r = h
        .http
        .post(h.url("/agents/sage/v1beta/models/gemini-2.5-flash:generateContent"))
        .body(vec![b'x'; 5000])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413);
    assert_eq!(h.mock.request_count(), 0);
}

#[tokio::test]
async fn non_json_body_is_forwarded_as_is() {
    let h = Harness::start(CONFIG).await;
    let r = h
        .http
        .post(h.url("/agents/sage/v1beta/models/gemini-2.5-flash:generateContent"))
        .body("this is not json")
        .send()
        .await
        .unwrap();
    let _ = r.bytes().await.unwrap();
    assert_eq!(&h.mock.received()[0].body[..], b"this is not json");
}

/// A body larger than what the proxy reads before forwarding (64 KiB) goes on whole: the
/// frames read first, then the rest as it comes, in order; sent in pieces (chunked) and
/// with a Content-Length.
#[tokio::test]
async fn a_body_larger_than_the_peek_goes_on_whole() {
    let h = Harness::start(CONFIG).await;
    let body = common::large_body(200_000);
    let url = h.url("/agents/sage/v1beta/models/gemini-2.5-flash:generateContent");
    let pieces: Vec<Result<Vec<u8>, std::io::Error>> =
        body.chunks(10 * 1024).map(|c| Ok(c.to_vec())).collect();
    let chunked = h
        .http
        .post(&url)
        .header("content-type", "application/json")
        .body(reqwest::Body::wrap_stream(futures_util::stream::iter(
            pieces,
        )))
        .send()
        .await
        .unwrap();
    assert_eq!(chunked.status(), 200);
    let _ = chunked.bytes().await.unwrap();
    let with_length = h
        .http
        .post(&url)
        .header("content-type", "application/json")
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(with_length.status(), 200);
    let _ = with_length.bytes().await.unwrap();
    let received = h.mock.received();
    assert_eq!(received.len(), 2);
    for r in &received {
        assert!(
            r.body == body,
            "the upstream got {} bytes of {}",
            r.body.len(),
            body.len()
        );
    }
}

#[tokio::test]
async fn concurrent_requests_cannot_all_slip_under_the_limit() {
    let cfg = r#"{"default": {"max_tokens": 1000, "period": "monthly", "action_on_limit": "block"},
                  "agents": {"busy": {"max_tokens": 3000, "period": "monthly", "action_on_limit": "block"}}}"#;
    let h = Harness::start_tweaked(cfg, |o| {
        o.default_output_tokens = 40;
    })
    .await;
    h.mock.set_behavior(
        Behavior::new()
            .usage(10, 30, 0)
            .prompt_from_request(false)
            .delay_before_headers(Duration::from_millis(20)),
    );
    let mut tasks = Vec::new();
    for _ in 0..200 {
        let http = h.http.clone();
        let url = h.url("/agents/busy/v1beta/models/gemini-2.5-flash:generateContent");
        tasks.push(tokio::spawn(async move {
            let r = http.post(url).json(&hello()).send().await.unwrap();
            let code = r.status().as_u16();
            let _ = r.bytes().await.unwrap();
            code
        }));
    }
    let mut ok = 0;
    let mut blocked = 0;
    for t in tasks {
        match t.await.unwrap() {
            200 => ok += 1,
            429 => blocked += 1,
            c => panic!("unexpected status {c}"),
        }
    }
    assert_eq!(ok + blocked, 200);
    let s = h.status("busy").await;
    let used = s["used_tokens"].as_u64().unwrap();
    // Exact accounting: the proxy recorded what the upstream reported, to the token.
    assert_eq!(used, h.mock.reported_total_tokens());
    assert_eq!(used, ok * 40);
    // The bound: estimates (≥ 40 = real usage) are upper bounds, so committed ≤ max + one request.
    assert!(used <= 3000 + 40, "used {used}");
    assert!(blocked > 0);
    assert_eq!(s["reserved_tokens"], 0);
}
