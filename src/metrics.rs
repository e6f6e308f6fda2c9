//! Prometheus metrics. The hot path only bumps atomics (a `DashMap` of counters keyed by
//! cheap labels: `Arc<str>` agent ids, static action names); everything that can be derived
//! at scrape time (budget used ratio, reloads, queue depth) is read then, by a collector.

use dashmap::DashMap;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::exponential_buckets;
use prometheus_client::metrics::{MetricType, TypedMetric};
use std::borrow::Borrow;
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
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
    const ALL: [TokenKind; 4] = [
        TokenKind::Prompt,
        TokenKind::Completion,
        TokenKind::Cached,
        TokenKind::Total,
    ];

    fn as_str(self) -> &'static str {
        match self {
            TokenKind::Prompt => "prompt",
            TokenKind::Completion => "completion",
            TokenKind::Cached => "cached",
            TokenKind::Total => "total",
        }
    }
}

/// The metric maps are keyed by short strings of a bounded set (configured agents, at most
/// `max_dynamic_agents` others, and model names) and bumped on every request: hashed with
/// foldhash (as the ledger and the queues are) rather than SipHash.
type MetricHasher = foldhash::fast::RandomState;

/// Key of the request counters: agent, budget action, HTTP status.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct RequestKey(Arc<str>, &'static str, u16);

/// Key of the token counters: agent, model (the four kinds share one entry).
#[derive(Debug, Clone, PartialEq, Eq)]
struct TokenKey(Arc<str>, Arc<str>);

/// A borrowed (agent, model) pair: looks a [`TokenKey`] up without allocating.
trait AgentModel {
    fn agent(&self) -> &str;
    fn model(&self) -> &str;
}

impl AgentModel for TokenKey {
    fn agent(&self) -> &str {
        &self.0
    }
    fn model(&self) -> &str {
        &self.1
    }
}

impl AgentModel for (&str, &str) {
    fn agent(&self) -> &str {
        self.0
    }
    fn model(&self) -> &str {
        self.1
    }
}

impl<'a> Borrow<dyn AgentModel + 'a> for TokenKey {
    fn borrow(&self) -> &(dyn AgentModel + 'a) {
        self
    }
}

impl Hash for dyn AgentModel + '_ {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.agent().hash(state);
        self.model().hash(state);
    }
}

impl PartialEq for dyn AgentModel + '_ {
    fn eq(&self, other: &Self) -> bool {
        self.agent() == other.agent() && self.model() == other.model()
    }
}

impl Eq for dyn AgentModel + '_ {}

// Hash as the borrowed form does, as `Borrow` requires.
impl Hash for TokenKey {
    fn hash<H: Hasher>(&self, state: &mut H) {
        (self as &dyn AgentModel).hash(state);
    }
}

/// A latency histogram updated with atomics (no lock on the request path), encoded as a
/// Prometheus histogram. Buckets as `prometheus_client`'s `exponential_buckets`, plus +Inf.
#[derive(Debug, Clone)]
pub struct Histogram {
    inner: Arc<HistogramInner>,
}

/// Most buckets a histogram has (+Inf included).
const MAX_BUCKETS: usize = 24;

/// Stripes a histogram's counters are spread over. Every request observes two histograms;
/// with one set of counters the I/O threads took turns owning its cache lines (each update
/// waited for the line to come over from the other core). A thread updates its own stripe
/// (stripes are handed out to threads round robin) and a scrape adds the stripes up.
const STRIPES: usize = 8;

/// One thread's share of a histogram's counters, on cache lines of its own.
#[derive(Debug, Default)]
#[repr(align(128))]
struct Stripe {
    counts: [AtomicU64; MAX_BUCKETS],
    sum_ns: AtomicU64,
}

#[derive(Debug)]
struct HistogramInner {
    /// Upper bounds in seconds (the last one is `f64::MAX`, shown as +Inf).
    bounds: Vec<f64>,
    /// Upper bounds in nanoseconds, for the lookup.
    bounds_ns: Vec<u64>,
    stripes: [Stripe; STRIPES],
}

/// The stripe of the current thread.
fn stripe_index() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static STRIPE: usize = NEXT.fetch_add(1, Ordering::Relaxed) % STRIPES;
    }
    STRIPE.with(|s| *s)
}

impl Histogram {
    /// `length` buckets from `start` seconds, each `factor` times the previous, and +Inf
    /// (at most `MAX_BUCKETS` in all: more are cut off).
    pub fn exponential(start: f64, factor: f64, length: u16) -> Self {
        let length = u16::try_from(MAX_BUCKETS - 1).map_or(length, |max| length.min(max));
        let mut bounds: Vec<f64> = exponential_buckets(start, factor, length).collect();
        bounds.push(f64::MAX);
        let bounds_ns = bounds
            .iter()
            .map(|b| {
                if *b >= u64::MAX as f64 / 1e9 {
                    u64::MAX
                } else {
                    (b * 1e9).round() as u64
                }
            })
            .collect();
        Self {
            inner: Arc::new(HistogramInner {
                bounds,
                bounds_ns,
                stripes: Default::default(),
            }),
        }
    }

    /// Record one duration.
    pub fn observe(&self, d: Duration) {
        let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        let h = &*self.inner;
        let i = h
            .bounds_ns
            .iter()
            .position(|b| ns <= *b)
            .unwrap_or(h.bounds_ns.len() - 1);
        let stripe = &h.stripes[stripe_index()];
        stripe.counts[i].fetch_add(1, Ordering::Relaxed);
        stripe.sum_ns.fetch_add(ns, Ordering::Relaxed);
    }
}

impl TypedMetric for Histogram {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for Histogram {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let h = &*self.inner;
        let buckets: Vec<(f64, u64)> = h
            .bounds
            .iter()
            .enumerate()
            .map(|(i, b)| {
                let n = h
                    .stripes
                    .iter()
                    .map(|s| s.counts[i].load(Ordering::Relaxed));
                (*b, n.fold(0u64, u64::wrapping_add))
            })
            .collect();
        // The count is the sum of the buckets read, so the encoding is self-consistent.
        let count = buckets
            .iter()
            .map(|(_, c)| *c)
            .fold(0u64, u64::wrapping_add);
        let sum_ns = h.stripes.iter().map(|s| s.sum_ns.load(Ordering::Relaxed));
        let sum_ns = sum_ns.fold(0u64, u64::wrapping_add);
        let sum = sum_ns as f64 / 1e9;
        encoder.encode_histogram::<NoLabelSet>(sum, count, &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

/// Counters bumped by the proxy.
#[derive(Debug)]
pub struct Metrics {
    requests: DashMap<RequestKey, AtomicU64, MetricHasher>,
    /// Per (agent, model): prompt, completion, cached, total (in [`TokenKind::ALL`] order).
    tokens: DashMap<TokenKey, [AtomicU64; 4], MetricHasher>,
    /// Seconds from sending upstream to the upstream's response headers.
    pub upstream_latency: Histogram,
    /// Seconds the proxy itself spent on a request before and after the upstream call.
    pub proxy_overhead: Histogram,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            requests: DashMap::with_hasher(MetricHasher::default()),
            tokens: DashMap::with_hasher(MetricHasher::default()),
            upstream_latency: Histogram::exponential(0.001, 2.0, 18),
            proxy_overhead: Histogram::exponential(0.000_005, 2.0, 16),
        }
    }
}

impl Metrics {
    /// One request answered.
    pub fn request(&self, agent: Arc<str>, action: &'static str, status: u16) {
        let key = RequestKey(agent, action, status);
        if let Some(c) = self.requests.get(&key) {
            c.fetch_add(1, Ordering::Relaxed);
            return;
        }
        // `entry` so racing first increments are not lost.
        self.requests
            .entry(key)
            .or_insert_with(|| AtomicU64::new(0))
            .fetch_add(1, Ordering::Relaxed);
    }

    /// Tokens settled.
    pub fn tokens(&self, agent: &Arc<str>, model: &str, kind: TokenKind, n: u64) {
        let mut all = [0; 4];
        all[kind as usize] = n;
        self.tokens_all(agent, model, all);
    }

    /// Tokens settled, every kind at once (in [`TokenKind::ALL`] order: prompt, completion,
    /// cached, total). Kinds with 0 tokens are not bumped; nothing is allocated once the
    /// (agent, model) pair has been seen.
    pub fn tokens_all(&self, agent: &Arc<str>, model: &str, n: [u64; 4]) {
        if n.iter().all(|v| *v == 0) {
            return;
        }
        let bump = |c: &[AtomicU64; 4]| {
            for (c, v) in c.iter().zip(n) {
                if v > 0 {
                    c.fetch_add(v, Ordering::Relaxed);
                }
            }
        };
        let probe: &dyn AgentModel = &(&**agent, model);
        if let Some(c) = self.tokens.get(probe) {
            return bump(&c);
        }
        let e = self
            .tokens
            .entry(TokenKey(agent.clone(), Arc::from(model)))
            .or_default();
        bump(&e);
    }

    /// Record a duration in a histogram.
    pub fn observe(h: &Histogram, d: Duration) {
        h.observe(d);
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
            let RequestKey(agent, action, status) = r.key();
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
            let TokenKey(agent, model) = r.key();
            for kind in TokenKind::ALL {
                let n = r.value()[kind as usize].load(Ordering::Relaxed);
                // As before: a kind appears once it was bumped by a non-zero amount.
                if n == 0 {
                    continue;
                }
                let labels = [
                    ("agent", &**agent),
                    ("model", &**model),
                    ("kind", kind.as_str()),
                ];
                ConstCounter::new(n).encode(e.encode_family(&labels)?)?;
            }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_histogram_counts_the_observations_of_every_thread() {
        let h = Histogram::exponential(0.001, 2.0, 4);
        // Ten threads, so that several share a stripe and several stripes are used.
        std::thread::scope(|s| {
            for ms in 0..10u64 {
                let h = &h;
                s.spawn(move || {
                    for _ in 0..100 {
                        h.observe(Duration::from_millis(ms));
                    }
                });
            }
        });
        let mut registry = prometheus_client::registry::Registry::default();
        registry.register("lat", "latency", h);
        let mut text = String::new();
        assert!(prometheus_client::encoding::text::encode(&mut text, &registry).is_ok());
        // 100 × (0 + 1 + … + 9) ms = 4.5 s; buckets ≤ 1, 2, 4, 8 ms and +Inf.
        for line in [
            "lat_sum 4.5",
            "lat_count 1000",
            "lat_bucket{le=\"0.001\"} 200",
            "lat_bucket{le=\"0.002\"} 300",
            "lat_bucket{le=\"0.004\"} 500",
            "lat_bucket{le=\"0.008\"} 900",
            "lat_bucket{le=\"+Inf\"} 1000",
        ] {
            assert!(text.lines().any(|l| l == line), "{line:?} not in:\n{text}");
        }
    }
}
