//! Self-tests of the mock Gemini upstream used by the integration tests.
#![allow(clippy::unwrap_used)]

#[path = "support/mock_gemini.rs"]
mod mock_gemini;

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use mock_gemini::{Behavior, MockGemini, Usage};
use serde_json::Value;

const GEN: &str = "/v1beta/models/gemini-2.5-flash:generateContent";
const SSE: &str = "/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse";
const ARRAY: &str = "/v1/models/gemini-2.5-flash:streamGenerateContent";

fn client() -> reqwest::Client {
    reqwest::Client::new()
}

fn prompt_body() -> Value {
    serde_json::json!({"contents": [{"role": "user", "parts": [{"text": "Say hi"}]}]})
}

/// Reads the body frame by frame (fails the test on a body error).
async fn frames(resp: reqwest::Response) -> Vec<bytes::Bytes> {
    let mut out = Vec::new();
    let mut s = resp.bytes_stream();
    while let Some(chunk) = s.next().await {
        out.push(chunk.unwrap());
    }
    out
}

fn sse_events(body: &str) -> Vec<Value> {
    body.split("\r\n\r\n")
        .filter(|e| !e.is_empty())
        .map(|e| serde_json::from_str(e.strip_prefix("data: ").unwrap()).unwrap())
        .collect()
}

#[tokio::test]
async fn generate_content_returns_json_with_usage() {
    let mock = MockGemini::start().await;
    let resp = client()
        .post(mock.url_for(GEN))
        .header("x-goog-api-key", "k")
        .json(&prompt_body())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert!(resp.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("application/json"));
    let v: Value = resp.json().await.unwrap();
    let u = &v["usageMetadata"];
    assert_eq!(u["promptTokenCount"], 10);
    assert_eq!(u["candidatesTokenCount"], 20);
    assert_eq!(u["totalTokenCount"], 30);
    assert!(u.get("thoughtsTokenCount").is_none());
    assert!(u.get("cachedContentTokenCount").is_none());
    assert_eq!(u["promptTokensDetails"][0]["modality"], "TEXT");
    assert_eq!(v["modelVersion"], "gemini-2.5-flash");
    assert_eq!(v["candidates"][0]["finishReason"], "STOP");
    let text = v["candidates"][0]["content"]["parts"][0]["text"]
        .as_str()
        .unwrap();
    assert!(text.contains("héllo 🌍 \"quoted\""));
    assert_eq!(mock.reported_total_tokens(), 30);
}

#[tokio::test]
async fn usage_thoughts_cached_and_model_version() {
    let mock = MockGemini::start_with(
        Behavior::new()
            .usage(18, 0, 35)
            .cached(8)
            .model_version("gemini-3-flash-preview"),
    )
    .await;
    let v: Value = client()
        .post(mock.url_for(GEN))
        .json(&prompt_body())
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let u = &v["usageMetadata"];
    assert!(u.get("candidatesTokenCount").is_none(), "omitted when 0");
    assert_eq!(u["thoughtsTokenCount"], 35);
    assert_eq!(u["cachedContentTokenCount"], 8);
    assert_eq!(u["totalTokenCount"], 53);
    assert_eq!(v["modelVersion"], "gemini-3-flash-preview");
    assert_eq!(
        mock.last_sent_usages(),
        vec![Some(Usage {
            prompt: 18,
            candidates: 0,
            thoughts: 35,
            cached: 8,
            total: 53
        })]
    );
}

#[tokio::test]
async fn sse_chunks_arrive_separately_with_cumulative_usage() {
    let mock = MockGemini::start_with(
        Behavior::new()
            .usage(10, 80, 5)
            .chunks(4)
            .chunk_delay(Duration::from_millis(40)),
    )
    .await;
    let resp = client()
        .post(mock.url_for(SSE))
        .json(&prompt_body())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let frames = frames(resp).await;
    assert_eq!(frames.len(), 4, "one body frame per event");
    for f in &frames {
        let s = std::str::from_utf8(f).unwrap();
        assert!(
            s.starts_with("data: {") && s.ends_with("}\r\n\r\n"),
            "{s:?}"
        );
        assert!(!s[6..s.len() - 4].contains('\n'), "one-line JSON");
    }
    let body: String = frames
        .iter()
        .map(|f| std::str::from_utf8(f).unwrap())
        .collect();
    let events = sse_events(&body);
    assert_eq!(events.len(), 4);
    let cands: Vec<u64> = events
        .iter()
        .map(|e| e["usageMetadata"]["candidatesTokenCount"].as_u64().unwrap())
        .collect();
    assert_eq!(cands, vec![20, 40, 60, 80]);
    let totals: Vec<u64> = events
        .iter()
        .map(|e| e["usageMetadata"]["totalTokenCount"].as_u64().unwrap())
        .collect();
    assert_eq!(totals, vec![35, 55, 75, 95]);
    assert!(events[..3]
        .iter()
        .all(|e| e["candidates"][0].get("finishReason").is_none()));
    assert_eq!(events[3]["candidates"][0]["finishReason"], "STOP");
    assert_eq!(mock.reported_total_tokens(), 95);
}

#[tokio::test]
async fn sse_usage_only_in_last_chunk() {
    let mock = MockGemini::start_with(Behavior::new().usage_every_chunk(false)).await;
    let body = client()
        .post(mock.url_for(SSE))
        .json(&prompt_body())
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let events = sse_events(&body);
    assert_eq!(events.len(), 3);
    assert!(events[..2].iter().all(|e| e.get("usageMetadata").is_none()));
    assert_eq!(events[2]["usageMetadata"]["totalTokenCount"], 30);
}

#[tokio::test]
async fn json_array_stream_parses_as_array() {
    let mock = MockGemini::start().await;
    let resp = client()
        .post(mock.url_for(ARRAY))
        .json(&prompt_body())
        .send()
        .await
        .unwrap();
    assert!(resp.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("application/json"));
    let frames = frames(resp).await;
    assert!(frames.len() >= 3);
    assert!(frames[0].starts_with(b"[{\n  \"candidates\""));
    let body: Vec<u8> = frames.concat();
    let text = std::str::from_utf8(&body).unwrap();
    assert_eq!(text.matches("}\n,\r\n{\n").count(), 2);
    assert!(text.ends_with("}\n]"));
    let v: Value = serde_json::from_slice(&body).unwrap();
    let arr = v.as_array().unwrap();
    assert_eq!(arr.len(), 3);
    assert_eq!(arr[2]["usageMetadata"]["totalTokenCount"], 30);
    assert_eq!(arr[2]["candidates"][0]["finishReason"], "STOP");
    assert_eq!(mock.reported_total_tokens(), 30);
}

#[tokio::test]
async fn cut_stream_is_a_body_error_and_reports_last_sent_usage() {
    let mock = MockGemini::start_with(Behavior::new().usage(10, 90, 0).cut_after_chunks(2)).await;
    let resp = client()
        .post(mock.url_for(SSE))
        .json(&prompt_body())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let mut s = resp.bytes_stream();
    let mut got = Vec::new();
    let mut errored = false;
    while let Some(item) = s.next().await {
        match item {
            Ok(b) => got.extend_from_slice(&b),
            Err(_) => {
                errored = true;
                break;
            }
        }
    }
    assert!(errored, "a cut stream must end with a body error");
    let events = sse_events(std::str::from_utf8(&got).unwrap());
    assert_eq!(events.len(), 2);
    assert_eq!(events[1]["usageMetadata"]["totalTokenCount"], 70);
    assert_eq!(mock.reported_total_tokens(), 70);
    assert_eq!(mock.last_sent_usage_totals(), vec![70]);
}

#[tokio::test]
async fn cut_non_stream_is_a_body_error() {
    let mock = MockGemini::start_with(Behavior::new().cut_after_chunks(0)).await;
    let resp = client()
        .post(mock.url_for(GEN))
        .json(&prompt_body())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert!(resp.bytes().await.is_err());
    assert_eq!(mock.reported_total_tokens(), 0);
}

#[tokio::test]
async fn mid_stream_error_ends_with_raw_error_json() {
    let mock = MockGemini::start_with(Behavior::new().mid_stream_error(true)).await;
    let body = client()
        .post(mock.url_for(SSE))
        .json(&prompt_body())
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let (events, err) = body.rsplit_once("\r\n\r\n").unwrap();
    let events = sse_events(events);
    assert_eq!(events.len(), 3);
    assert!(events
        .iter()
        .all(|e| e["candidates"][0].get("finishReason").is_none()));
    assert!(err.starts_with("{\n  \"error\": {"));
    let e: Value = serde_json::from_str(err).unwrap();
    assert_eq!(e["error"]["code"], 503);
    assert_eq!(e["error"]["status"], "UNAVAILABLE");
}

#[tokio::test]
async fn status_429_gives_gemini_error_shape() {
    let mock = MockGemini::start().await;
    mock.push_behavior(Behavior::error(429));
    let resp = client()
        .post(mock.url_for(GEN))
        .json(&prompt_body())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 429);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["error"]["code"], 429);
    assert_eq!(v["error"]["status"], "RESOURCE_EXHAUSTED");
    assert!(v["error"]["message"].as_str().unwrap().contains("quota"));
    // One-shot: the next request gets the default behaviour.
    let resp = client()
        .post(mock.url_for(GEN))
        .json(&prompt_body())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(mock.reported_total_tokens(), 30);

    mock.set_behavior(Behavior::error(403).error_message("nope"));
    let resp = client().post(mock.url_for(GEN)).send().await.unwrap();
    assert_eq!(resp.status(), 403);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["error"]["status"], "PERMISSION_DENIED");
    assert_eq!(v["error"]["message"], "nope");
}

#[tokio::test]
async fn received_records_path_query_headers_body() {
    let mock = MockGemini::start().await;
    let body = prompt_body();
    client()
        .post(mock.url_for(SSE))
        .header("x-goog-api-key", "real-key")
        .header("x-agent-id", "sage")
        .json(&body)
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    let r = mock.received();
    assert_eq!(r.len(), 1);
    assert_eq!(r[0].method, reqwest::Method::POST);
    assert_eq!(
        r[0].path,
        "/v1beta/models/gemini-2.5-flash:streamGenerateContent"
    );
    assert_eq!(r[0].query.as_deref(), Some("alt=sse"));
    assert_eq!(r[0].header("x-goog-api-key"), Some("real-key"));
    assert_eq!(r[0].header("x-agent-id"), Some("sage"));
    assert_eq!(r[0].body_json().unwrap(), body);
}

#[tokio::test]
async fn wait_for_requests_wakes_up_without_polling() {
    let mock =
        MockGemini::start_with(Behavior::new().delay_before_headers(Duration::from_secs(30))).await;
    let url = mock.url_for(GEN);
    let pending = tokio::spawn(async move {
        let _ = client().post(url).json(&prompt_body()).send().await;
    });
    let start = Instant::now();
    tokio::time::timeout(Duration::from_secs(5), mock.wait_for_requests(1))
        .await
        .unwrap();
    assert!(start.elapsed() < Duration::from_secs(5));
    assert_eq!(mock.request_count(), 1);
    // Already satisfied: returns at once.
    mock.wait_for_requests(1).await;
    pending.abort();
}

#[tokio::test]
async fn other_endpoints() {
    let mock = MockGemini::start().await;
    let c = client();

    let v: Value = c
        .post(mock.url_for("/v1beta/models/gemini-2.5-flash:countTokens"))
        .json(&prompt_body())
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["totalTokens"], 10);
    assert_eq!(v["promptTokensDetails"][0]["modality"], "TEXT");

    let v: Value = c
        .post(mock.url_for("/v1beta/models/text-embedding-004:embedContent"))
        .json(&serde_json::json!({"content": {"parts": [{"text": "x"}]}}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(v["embedding"]["values"].is_array());

    let req = serde_json::json!({"model": "models/text-embedding-004", "content": {"parts": [{"text": "x"}]}});
    let v: Value = c
        .post(mock.url_for("/v1beta/models/text-embedding-004:batchEmbedContents"))
        .json(&serde_json::json!({"requests": [req.clone(), req]}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["embeddings"].as_array().unwrap().len(), 2);

    let resp = c
        .post(mock.url_for("/upload/v1beta/files"))
        .header("x-goog-upload-protocol", "resumable")
        .header("x-goog-upload-command", "start")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.headers()["x-goog-upload-url"],
        format!(
            "{}/upload/v1beta/files?upload_id=abc&upload_protocol=resumable",
            mock.url
        )
        .as_str()
    );
    assert!(resp.bytes().await.unwrap().is_empty());

    let v: Value = c
        .get(mock.url_for("/v1beta/models"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(!v["models"].as_array().unwrap().is_empty());

    let resp = c.get(mock.url_for("/nope")).send().await.unwrap();
    assert_eq!(resp.status(), 404);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["error"]["status"], "NOT_FOUND");

    // Embeddings and countTokens are not billed as generation.
    assert_eq!(mock.reported_total_tokens(), 0);
}

#[tokio::test]
async fn prompt_from_request_counts_text() {
    let mock = MockGemini::start_with(Behavior::new().prompt_from_request(true)).await;
    let body = serde_json::json!({"contents": [{"parts": [{"text": "a".repeat(41)}]}]});
    let v: Value = client()
        .post(mock.url_for(GEN))
        .json(&body)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["usageMetadata"]["promptTokenCount"], 11);
    assert_eq!(v["usageMetadata"]["totalTokenCount"], 31);
}

#[tokio::test]
async fn http2_prior_knowledge_works() {
    let mock = MockGemini::start().await;
    let c = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    let resp = c
        .post(mock.url_for(SSE))
        .json(&prompt_body())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.version(), reqwest::Version::HTTP_2);
    let body = resp.text().await.unwrap();
    assert_eq!(sse_events(&body).len(), 3);
    assert_eq!(mock.received()[0].version, reqwest::Version::HTTP_2);

    // A cut over HTTP/2 is a stream reset: a body error too.
    mock.push_behavior(Behavior::new().cut_after_chunks(1));
    let resp = c
        .post(mock.url_for(SSE))
        .json(&prompt_body())
        .send()
        .await
        .unwrap();
    assert!(resp.bytes().await.is_err());
    assert_eq!(mock.last_sent_usage_totals(), vec![30, 17]);
}

#[tokio::test]
async fn dropping_the_mock_stops_the_server() {
    let mock = MockGemini::start().await;
    let url = mock.url_for(GEN);
    drop(mock);
    tokio::task::yield_now().await;
    let c = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    assert!(c.post(url).json(&prompt_body()).send().await.is_err());
}
