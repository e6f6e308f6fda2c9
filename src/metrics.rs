//! Prometheus metrics. The hot path writes only counters of its own thread: each thread
//! finds its cells in a map of its own and adds to them with a plain load and store, so a
//! request runs no lock-prefixed instruction for its metrics and no cache line goes back
//! and forth between the I/O threads' cores. A scrape adds every thread's cells up.
//! Everything that can be derived at scrape time (budget used ratio, reloads, queue depth)
//! is read then, by a collector.
//!
//! Why: with one shared `DashMap` of atomic counters, the metrics of a request (its shard
//! read lock, the counter, the token counters, the agent id's reference count) were a dozen
//! atomic read-modify-writes on lines the other core had just written, 7 % of the proxy's
//! user time at 256 connections (benches/README.md, "Eleventh round").

use hashbrown::Equivalent;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::exponential_buckets;
use prometheus_client::metrics::{MetricType, TypedMetric};
use std::cell::RefCell;
use std::hash::Hash;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;
use thread_local::ThreadLocal;

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
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct RequestKey(Arc<str>, &'static str, u16);

/// A borrowed [`RequestKey`]: looks it up without cloning the agent id. Hashes as the
/// owned key does (field by field, in order), as `Equivalent` requires.
#[derive(Hash)]
struct RequestRef<'a>(&'a str, &'static str, u16);

impl Equivalent<RequestKey> for RequestRef<'_> {
    fn equivalent(&self, k: &RequestKey) -> bool {
        self.0 == &*k.0 && self.1 == k.1 && self.2 == k.2
    }
}

/// Key of the token counters: agent, model (the four kinds share one entry).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct TokenKey(Arc<str>, Arc<str>);

/// A borrowed [`TokenKey`], hashed as it is.
#[derive(Hash)]
struct TokenRef<'a>(&'a str, &'a str);

impl Equivalent<TokenKey> for TokenRef<'_> {
    fn equivalent(&self, k: &TokenKey) -> bool {
        self.0 == &*k.0 && self.1 == &*k.1
    }
}

/// Add `v` to a counter that only the calling thread writes: a load and a store, not an
/// atomic read-modify-write (which would be a lock-prefixed instruction, a full barrier).
/// Readers (the scrape) still see whole values, as the cell is atomic.
#[inline]
fn add_own(c: &AtomicU64, v: u64) {
    c.store(c.load(Ordering::Relaxed).wrapping_add(v), Ordering::Relaxed);
}

/// `N` counters of one key, written by one thread. On cache lines of their own, so that two
/// threads' cells never share one.
#[derive(Debug)]
#[repr(align(128))]
struct Cells<const N: usize>([AtomicU64; N]);

impl<const N: usize> Default for Cells<N> {
    fn default() -> Self {
        Self(std::array::from_fn(|_| AtomicU64::new(0)))
    }
}

/// One thread's map from keys to its cells, on cache lines of its own (its `RefCell` flag is
/// written on every update).
#[derive(Debug)]
#[repr(align(128))]
struct Own<K, const N: usize>(RefCell<hashbrown::HashMap<K, Arc<Cells<N>>, MetricHasher>>);

impl<K, const N: usize> Default for Own<K, N> {
    fn default() -> Self {
        Self(RefCell::new(hashbrown::HashMap::with_hasher(
            MetricHasher::default(),
        )))
    }
}

/// Labelled counters, `N` per key, each thread writing cells of its own.
///
/// A thread finds its cells in its own map (no lock, no atomic read-modify-write); the
/// first time a thread meets a key it makes cells for it and also registers them in `all`
/// (under a mutex), where the scrape finds them. Cells outlive their thread: its counts
/// stay counted (and a later thread given the same slot by `ThreadLocal` goes on with
/// them, alone again).
#[derive(Debug)]
struct Counters<K: Send, const N: usize> {
    own: ThreadLocal<Own<K, N>>,
    all: Mutex<Vec<(K, Arc<Cells<N>>)>>,
}

impl<K: Send, const N: usize> Default for Counters<K, N> {
    fn default() -> Self {
        Self {
            own: ThreadLocal::new(),
            all: Mutex::new(Vec::new()),
        }
    }
}

impl<K: Clone + Eq + Hash + Ord + Send, const N: usize> Counters<K, N> {
    /// Add `n[i]` to counter `i` of the key `probe` stands for; `key` makes the owned key the
    /// first time this thread meets it.
    fn add<Q: Hash + Equivalent<K>>(&self, probe: &Q, key: impl FnOnce() -> K, n: [u64; N]) {
        let own = self.own.get_or_default();
        let mut map = own.0.borrow_mut();
        if let Some(cells) = map.get(probe) {
            return bump(cells, n);
        }
        let key = key();
        let cells = Arc::new(Cells::default());
        self.all
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push((key.clone(), cells.clone()));
        bump(&cells, n);
        map.insert(key, cells);
    }

    /// Every key with the sum of its cells over all threads, in key order.
    fn totals(&self) -> Vec<(K, [u64; N])> {
        let all = self.all.lock().unwrap_or_else(PoisonError::into_inner);
        let mut sums: std::collections::BTreeMap<&K, [u64; N]> = Default::default();
        for (k, cells) in all.iter() {
            let sum = sums.entry(k).or_insert([0; N]);
            for (s, c) in sum.iter_mut().zip(&cells.0) {
                *s = s.wrapping_add(c.load(Ordering::Relaxed));
            }
        }
        sums.into_iter().map(|(k, v)| (k.clone(), v)).collect()
    }
}

/// Add `n` to this thread's `cells` (kinds with 0 are left alone).
fn bump<const N: usize>(cells: &Cells<N>, n: [u64; N]) {
    for (c, v) in cells.0.iter().zip(n) {
        if v > 0 {
            add_own(c, v);
        }
    }
}

/// A latency histogram, each thread counting in a stripe of its own (no lock, no atomic
/// read-modify-write on the request path), encoded as a Prometheus histogram. Buckets as
/// `prometheus_client`'s `exponential_buckets`, plus +Inf.
#[derive(Debug, Clone)]
pub struct Histogram {
    inner: Arc<HistogramInner>,
}

/// Most buckets a histogram has (+Inf included).
const MAX_BUCKETS: usize = 24;

/// One thread's share of a histogram's counters, on cache lines of its own. Every request
/// observes two histograms: with one set of counters the I/O threads took turns owning its
/// cache lines (each update waited for the line to come over from the other core).
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
    /// Each thread's counters, written by it alone (see [`add_own`]); a scrape adds them up.
    stripes: ThreadLocal<Stripe>,
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
                stripes: ThreadLocal::new(),
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
        let stripe = h.stripes.get_or_default();
        add_own(&stripe.counts[i], 1);
        add_own(&stripe.sum_ns, ns);
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
    requests: Counters<RequestKey, 1>,
    /// Per (agent, model): prompt, completion, cached, total (in [`TokenKind::ALL`] order).
    tokens: Counters<TokenKey, 4>,
    /// Seconds from sending upstream to the upstream's response headers.
    pub upstream_latency: Histogram,
    /// Seconds the proxy itself spent on a request before and after the upstream call.
    pub proxy_overhead: Histogram,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            requests: Counters::default(),
            tokens: Counters::default(),
            upstream_latency: Histogram::exponential(0.001, 2.0, 18),
            proxy_overhead: Histogram::exponential(0.000_005, 2.0, 16),
        }
    }
}

impl Metrics {
    /// One request answered (`agent` is empty when none was identified). The id is cloned
    /// only the first time this thread counts it.
    pub fn request(&self, agent: Option<&Arc<str>>, action: &'static str, status: u16) {
        let probe = RequestRef(agent.map_or("", |a| &**a), action, status);
        let key = || {
            RequestKey(
                agent.map_or_else(|| Arc::from(""), Arc::clone),
                action,
                status,
            )
        };
        self.requests.add(&probe, key, [1]);
    }

    /// Tokens settled.
    pub fn tokens(&self, agent: &Arc<str>, model: &str, kind: TokenKind, n: u64) {
        let mut all = [0; 4];
        all[kind as usize] = n;
        self.tokens_all(agent, model, all);
    }

    /// Tokens settled, every kind at once (in [`TokenKind::ALL`] order: prompt, completion,
    /// cached, total). Kinds with 0 tokens are not bumped; nothing is allocated once this
    /// thread has seen the (agent, model) pair.
    pub fn tokens_all(&self, agent: &Arc<str>, model: &str, n: [u64; 4]) {
        if n.iter().all(|v| *v == 0) {
            return;
        }
        let key = || TokenKey(agent.clone(), Arc::from(model));
        self.tokens.add(&TokenRef(agent, model), key, n);
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
        for (RequestKey(agent, action, status), [n]) in self.requests.totals() {
            let status = status.to_string();
            let labels = [
                ("agent", &*agent),
                ("action", action),
                ("status", status.as_str()),
            ];
            ConstCounter::new(n).encode(e.encode_family(&labels)?)?;
        }
        let mut e = encoder.encode_descriptor(
            "budget_proxy_tokens",
            "Tokens settled, by agent, model and kind (prompt, completion, cached, total)",
            None,
            MetricType::Counter,
        )?;
        for (TokenKey(agent, model), counts) in self.tokens.totals() {
            for kind in TokenKind::ALL {
                let n = counts[kind as usize];
                // As before: a kind appears once it was bumped by a non-zero amount.
                if n == 0 {
                    continue;
                }
                let labels = [
                    ("agent", &*agent),
                    ("model", &*model),
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
    use prometheus_client::registry::Registry;

    /// Assert that `registry`, encoded as the scrape does, has each of `lines`.
    fn assert_scraped(registry: &Registry, lines: &[&str]) {
        let mut text = String::new();
        assert!(prometheus_client::encoding::text::encode(&mut text, registry).is_ok());
        for line in lines {
            assert!(text.lines().any(|l| l == *line), "{line:?} not in:\n{text}");
        }
    }

    #[test]
    fn a_histogram_counts_the_observations_of_every_thread() {
        let h = Histogram::exponential(0.001, 2.0, 4);
        // Ten threads, each counting in a stripe of its own.
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
        let mut registry = Registry::default();
        registry.register("lat", "latency", h);
        // 100 × (0 + 1 + … + 9) ms = 4.5 s; buckets ≤ 1, 2, 4, 8 ms and +Inf.
        assert_scraped(
            &registry,
            &[
                "lat_sum 4.5",
                "lat_count 1000",
                "lat_bucket{le=\"0.001\"} 200",
                "lat_bucket{le=\"0.002\"} 300",
                "lat_bucket{le=\"0.004\"} 500",
                "lat_bucket{le=\"0.008\"} 900",
                "lat_bucket{le=\"+Inf\"} 1000",
            ],
        );
    }

    /// The counters as the admin port's collector encodes them.
    #[derive(Debug)]
    struct Scrape(Metrics);

    impl prometheus_client::collector::Collector for Scrape {
        fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
            self.0.encode_counters(&mut encoder)
        }
    }

    #[test]
    fn counters_add_up_the_cells_of_every_thread() {
        let m = Metrics::default();
        let agents: Vec<Arc<str>> = vec![Arc::from("sage"), Arc::from("scout")];
        // Eight threads, each counting both agents: every key gets a cell per thread.
        std::thread::scope(|s| {
            for t in 0..8u64 {
                let (m, agents) = (&m, &agents);
                s.spawn(move || {
                    for i in 0..1000u64 {
                        let agent = &agents[usize::from(i % 2 == 1)];
                        m.request(Some(agent), "allow", 200);
                        m.tokens_all(agent, "gemini-2.5-flash", [10, 20, t, 30]);
                    }
                    m.request(None, "none", 404);
                });
            }
        });
        let mut registry = Registry::default();
        registry.register_collector(Box::new(Scrape(m)));
        assert_scraped(
            &registry,
            &[
            "budget_proxy_requests_total{agent=\"sage\",action=\"allow\",status=\"200\"} 4000",
            "budget_proxy_requests_total{agent=\"scout\",action=\"allow\",status=\"200\"} 4000",
            "budget_proxy_requests_total{agent=\"\",action=\"none\",status=\"404\"} 8",
            // 8 threads × 500 requests × 10 prompt tokens.
            "budget_proxy_tokens_total{agent=\"sage\",model=\"gemini-2.5-flash\",kind=\"prompt\"} 40000",
            "budget_proxy_tokens_total{agent=\"scout\",model=\"gemini-2.5-flash\",kind=\"completion\"} 80000",
            // Thread t adds t cached tokens a request: 500 × (0 + 1 + … + 7).
            "budget_proxy_tokens_total{agent=\"sage\",model=\"gemini-2.5-flash\",kind=\"cached\"} 14000",
            "budget_proxy_tokens_total{agent=\"scout\",model=\"gemini-2.5-flash\",kind=\"total\"} 120000",
            ],
        );
    }
}
