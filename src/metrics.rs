//! Prometheus metrics. The hot path only bumps atomics (a `DashMap` of counters keyed by
//! cheap labels: `Arc<str>` agent ids, static action names); everything that can be derived
//! at scrape time (budget used ratio, reloads, queue depth) is read then, by a collector.

use dashmap::DashMap;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::metrics::MetricType;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Kinds of tokens counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TokenKind {
    /// Prompt (cached included).
    Prompt,
    /// Candidates + thoughts.
    Completion,
    /// Cached prompt tokens.
    Cached,
    /// Counted total.
    Total,
}

impl TokenKind {
    fn as_str(self) -> &'static str {
        match self {
            TokenKind::Prompt => "prompt",
            TokenKind::Completion => "completion",
            TokenKind::Cached => "cached",
            TokenKind::Total => "total",
        }
    }
}

/// Counters bumped by the proxy.
#[derive(Debug)]
pub struct Metrics {
    requests: DashMap<(Arc<str>, &'static str, u16), AtomicU64>,
    tokens: DashMap<(Arc<str>, Arc<str>, TokenKind), AtomicU64>,
    /// Seconds from sending upstream to the upstream's response headers.
    pub upstream_latency: Histogram,
    /// Seconds the proxy itself spent on a request before and after the upstream call.
    pub proxy_overhead: Histogram,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            requests: DashMap::new(),
            tokens: DashMap::new(),
            upstream_latency: Histogram::new(exponential_buckets(0.001, 2.0, 18)),
            proxy_overhead: Histogram::new(exponential_buckets(0.000_005, 2.0, 16)),
        }
    }
}

fn bump<K: std::hash::Hash + Eq>(map: &DashMap<K, AtomicU64>, key: K, by: u64) {
    if let Some(c) = map.get(&key) {
        c.fetch_add(by, Ordering::Relaxed);
        return;
    }
    // `entry` so racing first increments are not lost.
    map.entry(key)
        .or_insert_with(|| AtomicU64::new(0))
        .fetch_add(by, Ordering::Relaxed);
}

impl Metrics {
    /// One request answered.
    pub fn request(&self, agent: Arc<str>, action: &'static str, status: u16) {
        bump(&self.requests, (agent, action, status), 1);
    }

    /// Tokens settled.
    pub fn tokens(&self, agent: &Arc<str>, model: &str, kind: TokenKind, n: u64) {
        if n > 0 {
            bump(&self.tokens, (agent.clone(), Arc::from(model), kind), n);
        }
    }

    /// Record a duration in a histogram.
    pub fn observe(h: &Histogram, d: Duration) {
        h.observe(d.as_secs_f64());
    }

    /// Encode the counters (called by the scrape collector).
    pub fn encode_counters(&self, encoder: &mut DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let mut e = encoder.encode_descriptor(
            "budget_proxy_requests",
            "Requests answered on the proxy port, by agent, budget action and HTTP status",
            None,
            MetricType::Counter,
        )?;
        for r in self.requests.iter() {
            let (agent, action, status) = r.key();
            let status = status.to_string();
            let labels = [
                ("agent", &**agent),
                ("action", action),
                ("status", status.as_str()),
            ];
            ConstCounter::new(r.value().load(Ordering::Relaxed))
                .encode(e.encode_family(&labels)?)?;
        }
        let mut e = encoder.encode_descriptor(
            "budget_proxy_tokens",
            "Tokens settled, by agent, model and kind (prompt, completion, cached, total)",
            None,
            MetricType::Counter,
        )?;
        for r in self.tokens.iter() {
            let (agent, model, kind) = r.key();
            let labels = [
                ("agent", &**agent),
                ("model", &**model),
                ("kind", kind.as_str()),
            ];
            ConstCounter::new(r.value().load(Ordering::Relaxed))
                .encode(e.encode_family(&labels)?)?;
        }
        Ok(())
    }
}

/// Encode one gauge family from `(labels, value)` rows.
pub fn encode_gauges<'a>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    label: &'static str,
    rows: impl IntoIterator<Item = (&'a str, f64)>,
) -> Result<(), std::fmt::Error> {
    let mut e = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for (l, v) in rows {
        ConstGauge::new(v).encode(e.encode_family(&[(label, l)])?)?;
    }
    Ok(())
}

/// Encode one unlabelled counter.
pub fn encode_counter(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    v: u64,
) -> Result<(), std::fmt::Error> {
    let e = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
    ConstCounter::new(v).encode(e)
}
