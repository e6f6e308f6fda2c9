#![allow(clippy::unwrap_used)]
//! Throughput of the usage scanner, which sees every byte of every response the proxy serves:
//! a 1 MiB SSE stream of realistic Gemini events fed in 16 KiB chunks, and a ~1 MiB single
//! JSON body.

use std::hint::black_box;

use budget_proxy::gemini::UsageScanner;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};

const MIB: usize = 1024 * 1024;
const CHUNK: usize = 16 * 1024;

/// A small deterministic generator (no `rand` dependency).
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        self.0 >> 33
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// JSON-escaped prose of about `len` bytes: words, punctuation, escaped quotes and newlines,
/// some non-ASCII, like model output.
fn text(rng: &mut Lcg, len: usize) -> String {
    const WORDS: &[&str] = &[
        "the",
        "model",
        "returns",
        "a",
        "streamed",
        "answer",
        "with",
        "tokens",
        "café",
        "naïve",
        "—",
        "résumé",
        "budget",
        "proxy",
        "Gemini",
        "function",
        "value",
        "and",
        "of",
        "to",
        "in",
        "is",
        "that",
        "for",
        "on",
        "\\\"quoted\\\"",
        "code:",
        "`x`",
        "🌊",
        "\\n\\n",
        "1.",
        "2.",
        "**bold**",
        "\\\\path",
        "über",
    ];
    let mut s = String::with_capacity(len + 16);
    while s.len() < len {
        s.push_str(WORDS[rng.below(WORDS.len() as u64) as usize]);
        s.push(if rng.below(12) == 0 { ',' } else { ' ' });
    }
    s
}

/// One SSE event as Gemini sends it (`data: ` + one-line JSON + `\r\n\r\n`), with cumulative
/// usage.
fn sse_event(text: &str, candidates: u64, finish: bool) -> String {
    let finish = if finish {
        "\"finishReason\": \"STOP\","
    } else {
        ""
    };
    let total = 18 + candidates + 35;
    format!(
        "data: {{\"candidates\": [{{\"content\": {{\"parts\": [{{\"text\": \"{text}\"}}],\"role\": \"model\"}},{finish}\"index\": 0}}],\"usageMetadata\": {{\"promptTokenCount\": 18,\"candidatesTokenCount\": {candidates},\"totalTokenCount\": {total},\"promptTokensDetails\": [{{\"modality\": \"TEXT\",\"tokenCount\": 18}}],\"thoughtsTokenCount\": 35}},\"modelVersion\": \"gemini-2.5-flash\",\"responseId\": \"ru1garvBEoOiqtsP2fznmQw\"}}\r\n\r\n"
    )
}

/// About 1 MiB of SSE: events whose text is 100–1500 bytes (Gemini 2.5 chunk sizes).
fn sse_stream() -> (Vec<u8>, usize) {
    let mut rng = Lcg(7);
    let mut out = String::with_capacity(MIB + 4096);
    let mut candidates = 0;
    let mut events = 0;
    while out.len() < MIB {
        let len = 100 + rng.below(1400) as usize;
        let t = text(&mut rng, len);
        candidates += (t.len() / 4) as u64;
        out.push_str(&sse_event(&t, candidates, out.len() + 2000 > MIB));
        events += 1;
    }
    (out.into_bytes(), events)
}

/// About 1 MiB of pretty-printed `generateContent` response: a long answer in several parts.
fn json_body() -> Vec<u8> {
    let mut rng = Lcg(11);
    let mut parts = Vec::new();
    let mut len = 0;
    while len < MIB - 2048 {
        let t = text(&mut rng, 64 * 1024);
        len += t.len() + 40;
        parts.push(format!(
            "          {{\n            \"text\": \"{t}\"\n          }}"
        ));
    }
    format!(
        "{{\n  \"candidates\": [\n    {{\n      \"content\": {{\n        \"parts\": [\n{}\n        ],\n        \"role\": \"model\"\n      }},\n      \"finishReason\": \"STOP\",\n      \"index\": 0\n    }}\n  ],\n  \"usageMetadata\": {{\n    \"promptTokenCount\": 18,\n    \"candidatesTokenCount\": 262144,\n    \"totalTokenCount\": 262197,\n    \"promptTokensDetails\": [\n      {{\n        \"modality\": \"TEXT\",\n        \"tokenCount\": 18\n      }}\n    ],\n    \"thoughtsTokenCount\": 35\n  }},\n  \"modelVersion\": \"gemini-2.5-flash\",\n  \"responseId\": \"ru1garvBEoOiqtsP2fznmQw\"\n}}\n",
        parts.join(",\n")
    )
    .into_bytes()
}

fn scan(body: &[u8]) -> UsageScanner {
    let mut s = UsageScanner::new();
    for c in body.chunks(CHUNK) {
        s.feed(black_box(c));
    }
    s
}

fn bench(c: &mut Criterion) {
    let (sse, events) = sse_stream();
    let s = scan(&sse);
    assert!(s.saw_finish_reason());
    assert_eq!(s.model_version(), Some("gemini-2.5-flash"));
    assert!(s.usage().unwrap().candidates_tokens > 0);
    eprintln!(
        "sse stream: {} bytes, {events} events ({} bytes/event)",
        sse.len(),
        sse.len() / events
    );

    let json = json_body();
    let s = scan(&json);
    assert_eq!(s.usage().unwrap().total_tokens, 262_197);
    eprintln!("json body: {} bytes", json.len());

    let mut g = c.benchmark_group("usage_scanner");
    g.throughput(Throughput::Bytes(sse.len() as u64));
    g.bench_function("sse_1mib_16k_chunks", |b| {
        b.iter(|| black_box(scan(black_box(&sse)).usage()))
    });
    g.throughput(Throughput::Bytes(json.len() as u64));
    g.bench_function("json_1mib_16k_chunks", |b| {
        b.iter(|| black_box(scan(black_box(&json)).usage()))
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
