//! The ledger: live per-agent counters for the running period, and admission.
//!
//! Flow: `admit` checks `committed + reserved_by_others < max_tokens` and, when the request
//! goes ahead, *reserves* its estimate; when the response ends the [`Reservation`] is
//! *settled* to the real usage (or the estimate, if the stream was cut before any usage was
//! seen, or zero on release). Because reservations count against the limit, N concurrent
//! requests cannot all slip under it. Over-spend bound: committed ≤ max_tokens + the usage
//! of the last admitted request + whatever the estimates of concurrent requests under-shot;
//! when estimates are upper bounds, committed ≤ max_tokens + one request.
//!
//! Each agent has one small `Mutex` that is never held across an `.await`. Every change is
//! also sent to the store writer, so the numbers survive restarts.
//!
//! # Several replicas (Redis)
//! With a remote sink ([`Ledger::with_remote`]) every change is also sent to the replica
//! sync layer (`store::redis_sync`), and the ledger keeps, per agent, what it sent but the
//! shared store has not confirmed yet (`pending`). The sync layer hands back the shared
//! totals ([`Ledger::apply_remote`]); the agent's numbers become *shared totals + pending*,
//! so this replica's own usage is never missing nor counted twice, and other replicas'
//! usage shows up within one sync round. Admission then also needs a *lease*: the tokens
//! this replica may hold in reservations and unconfirmed usage, granted by the shared
//! store out of the budget nobody else holds (see [`Ledger::set_leased`]).

use super::period::{window, PeriodSpec, Window};
use crate::config::{Action, AgentBudget};
use crate::gemini::Usage;
use crate::store::{PeriodRow, StoreOp, UsageDelta, Writer};
use chrono::{DateTime, Utc};
use dashmap::DashMap;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

/// Totals of one model within a period.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct ModelTotals {
    /// Prompt tokens (cached included).
    pub prompt_tokens: u64,
    /// Candidates + thoughts.
    pub completion_tokens: u64,
    /// Cached prompt tokens.
    pub cached_tokens: u64,
    /// Counted tokens.
    pub total_tokens: u64,
    /// Forwarded requests.
    pub requests: u64,
    /// Cost in pico-dollars.
    pub cost_pico: u128,
}

impl ModelTotals {
    /// The per-model share of a usage delta (a stored row is the same type).
    fn of_delta(d: &UsageDelta) -> Self {
        ModelTotals {
            prompt_tokens: d.prompt_tokens,
            completion_tokens: d.completion_tokens,
            cached_tokens: d.cached_tokens,
            total_tokens: d.total_tokens,
            requests: d.requests,
            cost_pico: d.cost_pico,
        }
    }

    /// Field by field with `op64` (`op128` for the cost): one place for the adding and
    /// subtracting that seeding, settling and the replica sums all do.
    fn combine(
        &mut self,
        o: &ModelTotals,
        op64: fn(u64, u64) -> u64,
        op128: fn(u128, u128) -> u128,
    ) {
        self.prompt_tokens = op64(self.prompt_tokens, o.prompt_tokens);
        self.completion_tokens = op64(self.completion_tokens, o.completion_tokens);
        self.cached_tokens = op64(self.cached_tokens, o.cached_tokens);
        self.total_tokens = op64(self.total_tokens, o.total_tokens);
        self.requests = op64(self.requests, o.requests);
        self.cost_pico = op128(self.cost_pico, o.cost_pico);
    }
}

/// Model name → its totals. Updated by every settle, so hashed with foldhash (as the agent
/// map) rather than SipHash.
pub type ModelMap = HashMap<String, ModelTotals, foldhash::fast::RandomState>;

/// Add `t` to the totals of `model`. The name is copied only the first time the model is
/// seen (a settle used to allocate a copy of it on every call).
fn add_to_model(by_model: &mut ModelMap, model: &str, t: &ModelTotals) {
    match by_model.get_mut(model) {
        Some(m) => m.combine(t, u64::saturating_add, u128::saturating_add),
        None => {
            by_model.insert(model.to_string(), t.clone());
        }
    }
}

/// An agent's numbers for its running period.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentTotals {
    /// The period.
    pub window: Window,
    /// Settled tokens.
    pub committed_tokens: u64,
    /// Tokens reserved by requests in flight.
    pub reserved_tokens: u64,
    /// Prompt tokens (cached included).
    pub prompt_tokens: u64,
    /// Candidates + thoughts.
    pub completion_tokens: u64,
    /// Cached prompt tokens.
    pub cached_tokens: u64,
    /// Forwarded requests.
    pub requests: u64,
    /// Budget refusals.
    pub blocked: u64,
    /// Cost in pico-dollars.
    pub cost_pico: u128,
    /// Per model.
    pub by_model: Vec<(String, ModelTotals)>,
}

/// Numbers of one agent's period as a sum of usage deltas: the shared store's totals, or
/// what this replica sent but the shared store has not confirmed yet.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PeriodCounts {
    /// Counted tokens.
    pub total_tokens: u64,
    /// Prompt tokens (cached included).
    pub prompt_tokens: u64,
    /// Candidates + thoughts.
    pub completion_tokens: u64,
    /// Cached prompt tokens.
    pub cached_tokens: u64,
    /// Settled requests.
    pub requests: u64,
    /// Budget refusals.
    pub blocked: u64,
    /// Cost in pico-dollars.
    pub cost_pico: u128,
    /// Per model (refusals, which name no model, are not in it).
    pub by_model: ModelMap,
}

impl PeriodCounts {
    /// Add one delta.
    pub fn add_delta(&mut self, d: &UsageDelta) {
        let t = ModelTotals::of_delta(d);
        self.combine(&t, d.blocked, u64::saturating_add, u128::saturating_add);
        if !d.model.is_empty() {
            add_to_model(&mut self.by_model, &d.model, &t);
        }
    }

    /// Add another sum.
    pub fn add(&mut self, o: &PeriodCounts) {
        self.combine(
            &o.sums(),
            o.blocked,
            u64::saturating_add,
            u128::saturating_add,
        );
        for (k, v) in &o.by_model {
            add_to_model(&mut self.by_model, k, v);
        }
    }

    /// Subtract another sum (saturating at zero; empty models are dropped).
    pub fn sub(&mut self, o: &PeriodCounts) {
        self.combine(
            &o.sums(),
            o.blocked,
            u64::saturating_sub,
            u128::saturating_sub,
        );
        for (k, v) in &o.by_model {
            if let Some(m) = self.by_model.get_mut(k) {
                m.combine(v, u64::saturating_sub, u128::saturating_sub);
                if *m == ModelTotals::default() {
                    self.by_model.remove(k);
                }
            }
        }
    }

    /// The period-wide numbers but `blocked`, in the per-model shape.
    fn sums(&self) -> ModelTotals {
        ModelTotals {
            prompt_tokens: self.prompt_tokens,
            completion_tokens: self.completion_tokens,
            cached_tokens: self.cached_tokens,
            total_tokens: self.total_tokens,
            requests: self.requests,
            cost_pico: self.cost_pico,
        }
    }

    /// The period-wide numbers combined with `t` and `blocked` (see [`ModelTotals::combine`]).
    fn combine(
        &mut self,
        t: &ModelTotals,
        blocked: u64,
        op64: fn(u64, u64) -> u64,
        op128: fn(u128, u128) -> u128,
    ) {
        self.total_tokens = op64(self.total_tokens, t.total_tokens);
        self.prompt_tokens = op64(self.prompt_tokens, t.prompt_tokens);
        self.completion_tokens = op64(self.completion_tokens, t.completion_tokens);
        self.cached_tokens = op64(self.cached_tokens, t.cached_tokens);
        self.requests = op64(self.requests, t.requests);
        self.blocked = op64(self.blocked, blocked);
        self.cost_pico = op128(self.cost_pico, t.cost_pico);
    }

    /// Nothing counted.
    pub fn is_empty(&self) -> bool {
        *self == PeriodCounts::default()
    }
}

/// What the replica sync layer hands back for one agent: the shared totals of a period,
/// what of this replica's pending usage they now include, and this replica's lease.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RemoteUpdate {
    /// The period the totals are of (unix seconds of its start).
    pub period_start: i64,
    /// The shared totals of that period.
    pub totals: PeriodCounts,
    /// Pending usage that the shared store confirmed in this round (any period).
    pub acked: Option<PeriodCounts>,
    /// This replica's lease on that period, in tokens (`None`: unchanged).
    pub lease: Option<u64>,
}

/// An agent's lease position (replica sync).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseStatus {
    /// The running period.
    pub window: Window,
    /// Tokens this replica holds: reservations in flight + usage not yet confirmed.
    pub used: u64,
    /// Tokens leased for the running period.
    pub lease: u64,
    /// Committed tokens as this replica sees them.
    pub committed: u64,
    /// Whether `committed + reserved ≥ max_tokens` here already.
    pub over: bool,
    /// The estimate of the last request admitted or refused (a guess for the next one).
    pub last_estimate: u64,
    /// Reservations in flight.
    pub in_flight: u64,
}

impl LeaseStatus {
    /// Whether the next request can be admitted within the lease.
    pub fn has_headroom(&self) -> bool {
        self.used < self.lease
    }
}

#[derive(Debug)]
struct AgentState {
    window: Window,
    /// The definition `window` was computed from (`None`: not yet known, e.g. seeded).
    spec: Option<PeriodSpec>,
    committed: u64,
    reserved: u64,
    prompt: u64,
    completion: u64,
    cached: u64,
    requests: u64,
    blocked: u64,
    cost_pico: u128,
    by_model: ModelMap,
    /// Replica sync: usage sent but not yet confirmed by the shared store (any period).
    pending: Option<Box<PeriodCounts>>,
    /// Reservations in flight.
    in_flight: u64,
    /// Replica sync: (period start, tokens) this replica may hold for that period.
    lease: Option<(i64, u64)>,
    /// The estimate of the last request seen by `admit`.
    last_estimate: u64,
}

impl AgentState {
    fn new(window: Window) -> Self {
        Self {
            window,
            spec: None,
            committed: 0,
            reserved: 0,
            prompt: 0,
            completion: 0,
            cached: 0,
            requests: 0,
            blocked: 0,
            cost_pico: 0,
            by_model: ModelMap::default(),
            pending: None,
            in_flight: 0,
            lease: None,
            last_estimate: 0,
        }
    }

    /// Zero the counters of the period and move to `w`; what is in flight (reservations,
    /// unconfirmed usage, the lease) stays.
    fn restart(&mut self, w: Window) {
        let spec = self.spec;
        let reserved = self.reserved;
        let pending = self.pending.take();
        let (in_flight, lease, last_estimate) = (self.in_flight, self.lease, self.last_estimate);
        *self = AgentState::new(w);
        self.spec = spec;
        self.reserved = reserved;
        self.pending = pending;
        self.in_flight = in_flight;
        self.lease = lease;
        self.last_estimate = last_estimate;
    }

    /// Tokens held by this replica: reservations + usage the shared store has not confirmed.
    fn held(&self) -> u64 {
        self.reserved
            .saturating_add(self.pending.as_ref().map_or(0, |p| p.total_tokens))
    }

    fn lease_tokens(&self) -> u64 {
        match self.lease {
            Some((start, tokens)) if start == self.window.start.timestamp() => tokens,
            _ => 0,
        }
    }

    fn note_pending(&mut self, d: &UsageDelta) {
        self.pending
            .get_or_insert_with(Default::default)
            .add_delta(d);
    }

    /// Bring the state to the period that contains `now` under `spec`. A period that ended
    /// starts the next from zero; a period whose *definition* changed while it was running
    /// carries its usage into the new period (returned as a store rekey).
    fn align(&mut self, spec: &PeriodSpec, now: DateTime<Utc>) -> Option<(i64, Window)> {
        // Fast path: same definition and `now` inside the window (no calendar arithmetic).
        if self.spec.as_ref() == Some(spec)
            && now >= self.window.start
            && self.window.end.is_none_or(|end| now < end)
        {
            return None;
        }
        let w = window(spec, now);
        self.spec = Some(*spec);
        if w == self.window {
            return None;
        }
        let old = self.window;
        let ended = old.end.is_some_and(|end| now >= end) || now < old.start;
        if ended {
            self.restart(w);
            None
        } else {
            self.window = w;
            Some((old.start.timestamp(), w))
        }
    }

    /// Add usage to the period-wide numbers (the per-model ones are [`add_to_model`]'s).
    fn add_sums(&mut self, t: &ModelTotals, blocked: u64) {
        self.committed = self.committed.saturating_add(t.total_tokens);
        self.prompt = self.prompt.saturating_add(t.prompt_tokens);
        self.completion = self.completion.saturating_add(t.completion_tokens);
        self.cached = self.cached.saturating_add(t.cached_tokens);
        self.requests = self.requests.saturating_add(t.requests);
        self.blocked = self.blocked.saturating_add(blocked);
        self.cost_pico = self.cost_pico.saturating_add(t.cost_pico);
    }

    fn remaining(&self, max: u64) -> u64 {
        max.saturating_sub(self.committed.saturating_add(self.reserved))
    }
}

/// One agent's entry.
#[derive(Debug)]
pub struct AgentLedger {
    id: Arc<str>,
    state: Mutex<AgentState>,
    /// Unix seconds of the last over-budget warning logged (rate limit: one a minute).
    last_warning_secs: AtomicI64,
}

impl AgentLedger {
    fn new(id: Arc<str>, state: AgentState) -> Self {
        Self {
            id,
            state: Mutex::new(state),
            last_warning_secs: AtomicI64::new(i64::MIN),
        }
    }

    fn lock(&self) -> MutexGuard<'_, AgentState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The agent id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The agent id, shared (cheap to clone into metric labels).
    pub fn id_arc(&self) -> Arc<str> {
        self.id.clone()
    }

    /// Whether an over-budget warning may be logged now (at most one a minute per agent).
    pub fn should_log_warning(&self, now: DateTime<Utc>) -> bool {
        let t = now.timestamp();
        let last = self.last_warning_secs.load(Ordering::Relaxed);
        t.saturating_sub(last) >= 60
            && self
                .last_warning_secs
                .compare_exchange(last, t, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
    }
}

/// What admission decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Under the limit.
    Allow,
    /// Over the limit, allowed anyway (action `warn`).
    Warn,
    /// Over the limit: use the fallback model.
    Degrade(String),
    /// Over the limit: refuse. `retry_after_secs` is the time to the reset (`None`: never).
    Block {
        /// Whole seconds to the end of the period, rounded up.
        retry_after_secs: Option<u64>,
    },
    /// Over the limit, action `queue`: the caller parks or refuses the request.
    Queue {
        /// Whole seconds to the end of the period, rounded up.
        retry_after_secs: Option<u64>,
    },
}

/// The outcome of [`Ledger::admit`].
#[derive(Debug)]
pub struct Admission {
    /// The decision.
    pub decision: Decision,
    /// Present when the request goes ahead.
    pub reservation: Option<Reservation>,
    /// `max − committed − reserved` after this admission, never negative.
    pub remaining_tokens: u64,
    /// End of the running period (`None`: infinite).
    pub resets_at: Option<DateTime<Utc>>,
}

/// What a finished request used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Charge {
    /// Model billed (the response's `modelVersion` when present).
    pub model: String,
    /// Prompt tokens (cached included).
    pub prompt_tokens: u64,
    /// Candidates + thoughts.
    pub completion_tokens: u64,
    /// Cached prompt tokens.
    pub cached_tokens: u64,
    /// Counted tokens.
    pub total_tokens: u64,
    /// Cost in pico-dollars.
    pub cost_pico: u128,
}

impl Charge {
    /// A charge from a response's usage.
    pub fn from_usage(model: &str, usage: &Usage, cost_pico: u128) -> Self {
        Self {
            model: model.to_owned(),
            prompt_tokens: usage.prompt_tokens,
            completion_tokens: usage.candidates_tokens + usage.thoughts_tokens,
            cached_tokens: usage.cached_tokens,
            total_tokens: usage.counted_tokens(),
            cost_pico,
        }
    }

    /// Nothing used (an error response, an embedding, a refused request).
    pub fn nothing(model: &str) -> Self {
        Self::from_usage(model, &Usage::default(), 0)
    }
}

/// What [`Reservation::settle`] did to the agent's running period (for alert checks).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settled {
    /// Committed tokens of the period before the charge (0 when the charge opened a period).
    pub before_tokens: u64,
    /// Committed tokens of the period after the charge.
    pub after_tokens: u64,
    /// The period charged.
    pub window: Window,
}

/// The replica sync layer's inbox: every [`StoreOp`] the ledger emits, in order.
pub type RemoteSink = tokio::sync::mpsc::UnboundedSender<StoreOp>;

/// Where the ledger's changes go: the local store writer and, with several replicas, the
/// sync layer.
#[derive(Debug, Clone, Default)]
struct Sinks {
    writer: Option<Writer>,
    remote: Option<RemoteSink>,
}

impl Sinks {
    fn send(&self, op: StoreOp) {
        match (&self.writer, &self.remote) {
            (Some(w), Some(r)) => {
                let _ = r.send(op.clone());
                w.send(op);
            }
            (Some(w), None) => w.send(op),
            (None, Some(r)) => {
                let _ = r.send(op);
            }
            (None, None) => {}
        }
    }

    fn active(&self) -> bool {
        self.writer.is_some() || self.remote.is_some()
    }
}

/// Tokens held for a request in flight. Settle it once; dropping it unsettled releases the
/// hold (charges nothing), so a reservation is never leaked.
#[derive(Debug)]
pub struct Reservation {
    agent: Arc<AgentLedger>,
    spec: PeriodSpec,
    estimate_tokens: u64,
    /// Shared with the ledger: one reference count per request instead of a clone of each
    /// channel sender (two or three atomic counters apiece, on lines every request touches).
    sinks: Arc<Sinks>,
    settled: bool,
}

impl Reservation {
    /// The reserved estimate.
    pub fn estimate_tokens(&self) -> u64 {
        self.estimate_tokens
    }

    /// The agent id.
    pub fn agent(&self) -> &str {
        &self.agent.id
    }

    /// The agent id, shared.
    pub fn agent_arc(&self) -> Arc<str> {
        self.agent.id.clone()
    }

    /// Replace the estimate (e.g. once the request body was read).
    pub fn set_estimate(&mut self, tokens: u64) {
        let mut st = self.agent.lock();
        st.reserved = st
            .reserved
            .saturating_sub(self.estimate_tokens)
            .saturating_add(tokens);
        self.estimate_tokens = tokens;
    }

    /// Turn the hold into real usage at `now` (the period that contains `now` is charged).
    /// Returns the agent's committed tokens in that period before and after the charge.
    pub fn settle(mut self, charge: Charge, now: DateTime<Utc>) -> Settled {
        self.settled = true;
        let (rekey, delta, settled) = {
            let mut st = self.agent.lock();
            st.reserved = st.reserved.saturating_sub(self.estimate_tokens);
            st.in_flight = st.in_flight.saturating_sub(1);
            let rekey = st.align(&self.spec, now);
            let before_tokens = st.committed;
            let delta = UsageDelta {
                // (`to_string` on an `Arc<str>` goes through `fmt`.)
                agent: String::from(&*self.agent.id),
                period_start: st.window.start.timestamp(),
                period_end: st.window.end.map(|e| e.timestamp()),
                model: charge.model,
                hour_start: now.timestamp() - now.timestamp().rem_euclid(3600),
                prompt_tokens: charge.prompt_tokens,
                completion_tokens: charge.completion_tokens,
                cached_tokens: charge.cached_tokens,
                total_tokens: charge.total_tokens,
                requests: 1,
                blocked: 0,
                cost_pico: charge.cost_pico,
            };
            let t = ModelTotals::of_delta(&delta);
            // The period-wide request count took this request at admission (it counts
            // requests in flight); the model's count takes it now.
            st.add_sums(&ModelTotals { requests: 0, ..t }, 0);
            add_to_model(&mut st.by_model, &delta.model, &t);
            if self.sinks.remote.is_some() {
                st.note_pending(&delta);
            }
            let settled = Settled {
                before_tokens,
                after_tokens: st.committed,
                window: st.window,
            };
            (rekey, delta, settled)
        };
        if let Some((from, win)) = rekey {
            self.sinks.send(rekey_op(&self.agent.id, from, win));
        }
        self.sinks.send(StoreOp::Add(delta));
        settled
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if !self.settled {
            let mut st = self.agent.lock();
            st.reserved = st.reserved.saturating_sub(self.estimate_tokens);
            st.in_flight = st.in_flight.saturating_sub(1);
        }
    }
}

fn blocked_delta(agent: &str, w: Window, now: DateTime<Utc>) -> UsageDelta {
    UsageDelta {
        agent: agent.to_string(),
        period_start: w.start.timestamp(),
        period_end: w.end.map(|e| e.timestamp()),
        hour_start: now.timestamp() - now.timestamp().rem_euclid(3600),
        blocked: 1,
        ..UsageDelta::default()
    }
}

fn rekey_op(agent: &str, from_start: i64, to: Window) -> StoreOp {
    StoreOp::Rekey {
        agent: agent.to_string(),
        from_start,
        to_start: to.start.timestamp(),
        to_end: to.end.map(|e| e.timestamp()),
    }
}

/// Whole seconds from `now` to `end`, rounded up.
pub fn secs_until(end: Option<DateTime<Utc>>, now: DateTime<Utc>) -> Option<u64> {
    end.map(|end| {
        let ms = (end - now).num_milliseconds().max(0);
        u64::try_from(ms).unwrap_or(0).div_ceil(1000)
    })
}

/// The agent could not be created: too many agents not in the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DynamicAgentCap(pub usize);

/// Agent id → entry. Looked up on every request, so hashed with foldhash rather than
/// SipHash (randomly seeded too: ids come from callers).
type AgentMap = DashMap<Arc<str>, Arc<AgentLedger>, foldhash::fast::RandomState>;

/// All agents' live counters.
#[derive(Debug, Default)]
pub struct Ledger {
    agents: AgentMap,
    dynamic_agents: AtomicUsize,
    sinks: Arc<Sinks>,
    /// Replica sync: admission also needs a lease (off while the shared store is down in
    /// `open` failure mode: each replica then enforces its own view).
    leased: AtomicBool,
    /// Replica sync: agents refused only for want of a lease (e.g. deferred jobs, which do
    /// not pass the gate): the sync layer gets them one.
    lease_wanted: Mutex<std::collections::HashSet<Arc<str>>>,
}

impl Ledger {
    /// A ledger that persists through `writer` (`None`: memory only, for benches).
    pub fn new(writer: Option<Writer>) -> Self {
        Self {
            agents: AgentMap::default(),
            dynamic_agents: AtomicUsize::new(0),
            sinks: Arc::new(Sinks {
                writer,
                remote: None,
            }),
            leased: AtomicBool::new(false),
            lease_wanted: Mutex::default(),
        }
    }

    /// A ledger of one replica among several: every change also goes to `remote` (the
    /// replica sync layer), and admission needs a lease while [`Ledger::set_leased`] is on
    /// (it starts on).
    pub fn with_remote(writer: Option<Writer>, remote: RemoteSink) -> Self {
        Self {
            agents: AgentMap::default(),
            dynamic_agents: AtomicUsize::new(0),
            sinks: Arc::new(Sinks {
                writer,
                remote: Some(remote),
            }),
            leased: AtomicBool::new(true),
            lease_wanted: Mutex::default(),
        }
    }

    /// Replica sync: the agents refused for want of a lease since the last call.
    pub fn take_lease_wanted(&self) -> Vec<Arc<str>> {
        let mut w = self.lease_wanted.lock().unwrap_or_else(|e| e.into_inner());
        w.drain().collect()
    }

    /// Whether admission needs a lease (replica sync with the shared store reachable).
    pub fn set_leased(&self, on: bool) {
        self.leased.store(on, Ordering::Release);
    }

    /// See [`Ledger::set_leased`].
    pub fn is_leased(&self) -> bool {
        self.sinks.remote.is_some() && self.leased.load(Ordering::Acquire)
    }

    /// Seed from the store's latest rows at start-up. `budget_of` gives each agent's budget
    /// (the `default` one for agents not in the file).
    pub fn seed<'a>(
        &self,
        rows: Vec<PeriodRow>,
        budget_of: impl Fn(&str) -> &'a AgentBudget,
        now: DateTime<Utc>,
    ) {
        let mut by_agent: HashMap<String, Vec<PeriodRow>> = HashMap::new();
        for r in rows {
            by_agent.entry(r.agent.clone()).or_default().push(r);
        }
        for (agent, rows) in by_agent {
            let spec = budget_of(&agent).period;
            let w = window(&spec, now);
            let Some(first) = rows.first() else { continue };
            let start = first.period_start;
            let end = first.period_end;
            let running = start <= now.timestamp() && end.is_none_or(|e| now.timestamp() < e);
            if start != w.start.timestamp() && !running {
                continue; // an old period: the running one starts from zero
            }
            if start != w.start.timestamp() {
                self.sinks.send(rekey_op(&agent, start, w));
            }
            let mut st = AgentState::new(w);
            for r in &rows {
                let t = ModelTotals::of_delta(r);
                st.add_sums(&t, r.blocked);
                add_to_model(&mut st.by_model, &r.model, &t);
            }
            let id: Arc<str> = Arc::from(agent.as_str());
            self.agents
                .insert(id.clone(), Arc::new(AgentLedger::new(id, st)));
        }
    }

    /// The entry of `agent`, created on first use. `dynamic_cap` is `Some(cap)` for agents
    /// not in the file: creation fails once `cap` of them exist.
    pub fn entry(
        &self,
        agent: &str,
        spec: &PeriodSpec,
        now: DateTime<Utc>,
        dynamic_cap: Option<usize>,
    ) -> Result<Arc<AgentLedger>, DynamicAgentCap> {
        if let Some(e) = self.agents.get(agent) {
            return Ok(e.value().clone());
        }
        if let Some(cap) = dynamic_cap {
            let n = self.dynamic_agents.fetch_add(1, Ordering::AcqRel);
            if n >= cap {
                self.dynamic_agents.fetch_sub(1, Ordering::AcqRel);
                return Err(DynamicAgentCap(cap));
            }
        }
        let id: Arc<str> = Arc::from(agent);
        let mut created = false;
        let e = self
            .agents
            .entry(id.clone())
            .or_insert_with(|| {
                created = true;
                let mut st = AgentState::new(window(spec, now));
                // The window is `spec`'s: the first admission need not compute it again.
                st.spec = Some(*spec);
                Arc::new(AgentLedger::new(id, st))
            })
            .value()
            .clone();
        if !created && dynamic_cap.is_some() {
            self.dynamic_agents.fetch_sub(1, Ordering::AcqRel);
        }
        Ok(e)
    }

    /// Decide on a request of `agent` that would use about `estimate_tokens`.
    pub fn admit(
        &self,
        agent: &Arc<AgentLedger>,
        budget: &AgentBudget,
        now: DateTime<Utc>,
        estimate_tokens: u64,
    ) -> Admission {
        let leased = self.is_leased();
        let (admission, rekey, refused) = {
            let mut st = agent.lock();
            let rekey = st.align(&budget.period, now);
            st.last_estimate = estimate_tokens;
            let over_view = st.committed.saturating_add(st.reserved) >= budget.max_tokens;
            let over_lease = leased && st.held() >= st.lease_tokens();
            if over_lease && !over_view {
                self.lease_wanted
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(agent.id.clone());
            }
            let over = over_view || over_lease;
            let decision = if !over {
                Decision::Allow
            } else {
                // Only refusals carry it: chrono's date arithmetic was over a quarter of an
                // admission's instructions when done for every request.
                let retry_after_secs = secs_until(st.window.end, now);
                match budget.action {
                    Action::Warn => Decision::Warn,
                    Action::Degrade => match &budget.fallback_model {
                        Some(m) => Decision::Degrade(m.clone()),
                        None => Decision::Block { retry_after_secs },
                    },
                    Action::Block => Decision::Block { retry_after_secs },
                    Action::Queue => Decision::Queue { retry_after_secs },
                }
            };
            let goes_ahead = matches!(
                decision,
                Decision::Allow | Decision::Warn | Decision::Degrade(_)
            );
            let reservation = if goes_ahead {
                st.reserved = st.reserved.saturating_add(estimate_tokens);
                st.requests += 1;
                st.in_flight += 1;
                Some(Reservation {
                    agent: agent.clone(),
                    spec: budget.period,
                    estimate_tokens,
                    sinks: self.sinks.clone(),
                    settled: false,
                })
            } else {
                None
            };
            let refused = if matches!(decision, Decision::Block { .. }) {
                st.blocked += 1;
                let d = blocked_delta(&agent.id, st.window, now);
                if self.sinks.remote.is_some() {
                    st.note_pending(&d);
                }
                Some(d)
            } else {
                None
            };
            let remaining_tokens = if goes_ahead {
                st.remaining(budget.max_tokens)
            } else {
                0
            };
            (
                Admission {
                    decision,
                    reservation,
                    remaining_tokens,
                    resets_at: st.window.end,
                },
                rekey,
                refused,
            )
        };
        if self.sinks.active() {
            if let Some((from, win)) = rekey {
                self.sinks.send(rekey_op(&agent.id, from, win));
            }
            if let Some(d) = refused {
                self.sinks.send(StoreOp::Add(d));
            }
        }
        admission
    }

    /// `max − committed − reserved` of `agent` now, never negative.
    pub fn remaining(
        &self,
        agent: &Arc<AgentLedger>,
        budget: &AgentBudget,
        now: DateTime<Utc>,
    ) -> u64 {
        let (remaining, rekey) = {
            let mut st = agent.lock();
            let rekey = st.align(&budget.period, now);
            (st.remaining(budget.max_tokens), rekey)
        };
        if let Some((from, win)) = rekey {
            self.sinks.send(rekey_op(&agent.id, from, win));
        }
        remaining
    }

    /// Record a refusal decided outside `admit` (e.g. a queue time-out).
    pub fn count_refusal(&self, agent: &Arc<AgentLedger>, now: DateTime<Utc>) {
        let d = {
            let mut st = agent.lock();
            st.blocked += 1;
            let d = blocked_delta(&agent.id, st.window, now);
            if self.sinks.remote.is_some() {
                st.note_pending(&d);
            }
            d
        };
        self.sinks.send(StoreOp::Add(d));
    }

    /// The numbers of `agent` for the period that contains `now` (`None`: never seen).
    pub fn totals(
        &self,
        agent: &str,
        spec: &PeriodSpec,
        now: DateTime<Utc>,
    ) -> Option<AgentTotals> {
        let e = self.agents.get(agent)?.value().clone();
        let (t, rekey) = {
            let mut st = e.lock();
            let rekey = st.align(spec, now);
            let mut by_model: Vec<(String, ModelTotals)> = st
                .by_model
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            by_model.sort_by(|a, b| a.0.cmp(&b.0));
            (
                AgentTotals {
                    window: st.window,
                    committed_tokens: st.committed,
                    reserved_tokens: st.reserved,
                    prompt_tokens: st.prompt,
                    completion_tokens: st.completion,
                    cached_tokens: st.cached,
                    requests: st.requests,
                    blocked: st.blocked,
                    cost_pico: st.cost_pico,
                    by_model,
                },
                rekey,
            )
        };
        if let Some((from, win)) = rekey {
            self.sinks.send(rekey_op(&e.id, from, win));
        }
        Some(t)
    }

    /// Zero the running period of `agent` (admin reset); the old numbers go to history.
    pub fn reset(&self, agent: &str) -> bool {
        let Some(e) = self.agents.get(agent).map(|e| e.value().clone()) else {
            return false;
        };
        let start = {
            let mut st = e.lock();
            let w = st.window;
            st.restart(w);
            w.start.timestamp()
        };
        self.sinks.send(StoreOp::Reset {
            agent: agent.to_string(),
            period_start: start,
        });
        true
    }

    /// Another replica reset `agent`'s period that starts at `period_start`: zero this
    /// replica's view of it (the shared store was reset by that replica). Returns whether
    /// the running period was that one.
    pub fn reset_view(&self, agent: &str, period_start: i64) -> bool {
        let Some(e) = self.agents.get(agent).map(|e| e.value().clone()) else {
            return false;
        };
        let mut st = e.lock();
        if st.window.start.timestamp() != period_start {
            return false;
        }
        let w = st.window;
        st.restart(w);
        true
    }

    /// Replica sync: take the shared store's numbers for `agent` (see [`RemoteUpdate`]).
    /// The agent's numbers become the shared totals plus what this replica sent that they
    /// do not include yet. Returns the committed tokens before and after (for alerts) when
    /// the totals are of the running period. `create`: make the entry if it is missing.
    pub fn apply_remote(
        &self,
        agent: &str,
        spec: &PeriodSpec,
        now: DateTime<Utc>,
        update: RemoteUpdate,
        create: bool,
    ) -> Option<Settled> {
        let e = match self.agents.get(agent) {
            Some(e) => e.value().clone(),
            None if create => self.entry(agent, spec, now, None).ok()?,
            None => return None,
        };
        let (rekey, settled) = {
            let mut st = e.lock();
            let rekey = st.align(spec, now);
            if let (Some(acked), Some(p)) = (&update.acked, st.pending.as_mut()) {
                p.sub(acked);
                if p.is_empty() {
                    st.pending = None;
                }
            }
            let settled = (update.period_start == st.window.start.timestamp()).then(|| {
                let before = st.committed;
                let mut view = update.totals;
                if let Some(p) = &st.pending {
                    view.add(p);
                }
                st.committed = view.total_tokens;
                st.prompt = view.prompt_tokens;
                st.completion = view.completion_tokens;
                st.cached = view.cached_tokens;
                st.requests = view.requests.saturating_add(st.in_flight);
                st.blocked = view.blocked;
                st.cost_pico = view.cost_pico;
                st.by_model = view.by_model;
                if let Some(l) = update.lease {
                    st.lease = Some((update.period_start, l));
                }
                Settled {
                    before_tokens: before,
                    after_tokens: st.committed,
                    window: st.window,
                }
            });
            (rekey, settled)
        };
        if let Some((from, win)) = rekey {
            self.sinks.send(rekey_op(&e.id, from, win));
        }
        settled
    }

    /// Replica sync: usage of `agent` that this replica holds but the shared store has not
    /// confirmed (e.g. an outbox replayed at start-up): counted now, confirmed later through
    /// [`RemoteUpdate::acked`].
    pub fn add_pending(
        &self,
        agent: &str,
        spec: &PeriodSpec,
        now: DateTime<Utc>,
        counts: &PeriodCounts,
    ) {
        let Ok(e) = self.entry(agent, spec, now, None) else {
            return;
        };
        let mut st = e.lock();
        st.pending.get_or_insert_with(Default::default).add(counts);
        st.add_sums(&counts.sums(), counts.blocked);
        for (k, v) in &counts.by_model {
            add_to_model(&mut st.by_model, k, v);
        }
    }

    /// Replica sync: forget the lease of `agent` (it expired without renewal).
    pub fn drop_lease(&self, agent: &str) {
        if let Some(e) = self.agents.get(agent) {
            e.value().lock().lease = None;
        }
    }

    /// Replica sync: the lease position of `agent` under `budget` at `now`.
    pub fn lease_status(
        &self,
        agent: &Arc<AgentLedger>,
        budget: &AgentBudget,
        now: DateTime<Utc>,
    ) -> LeaseStatus {
        let (status, rekey) = {
            let mut st = agent.lock();
            let rekey = st.align(&budget.period, now);
            (
                LeaseStatus {
                    window: st.window,
                    used: st.held(),
                    lease: st.lease_tokens(),
                    committed: st.committed,
                    over: st.committed.saturating_add(st.reserved) >= budget.max_tokens,
                    last_estimate: st.last_estimate,
                    in_flight: st.in_flight,
                },
                rekey,
            )
        };
        if let Some((from, win)) = rekey {
            self.sinks.send(rekey_op(&agent.id, from, win));
        }
        status
    }

    /// The entry of `agent` if it exists.
    pub fn get(&self, agent: &str) -> Option<Arc<AgentLedger>> {
        self.agents.get(agent).map(|e| e.value().clone())
    }

    /// Ids of every agent the ledger knows.
    pub fn agent_ids(&self) -> Vec<String> {
        self.agents.iter().map(|e| e.key().to_string()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::config::test_budget as budget;

    fn charge(tokens: u64) -> Charge {
        Charge {
            model: "m".into(),
            prompt_tokens: tokens,
            completion_tokens: 0,
            cached_tokens: 0,
            total_tokens: tokens,
            cost_pico: 0,
        }
    }

    #[test]
    fn seeded_settled_and_pending_usage_add_up_per_period_and_per_model() {
        let ledger = Ledger::new(None);
        let b = budget(1000);
        let now = Utc::now();
        let w = window(&b.period, now);
        let row = |model: &str, t: [u64; 6], blocked: u64| UsageDelta {
            agent: "a".into(),
            period_start: w.start.timestamp(),
            period_end: w.end.map(|e| e.timestamp()),
            model: model.into(),
            prompt_tokens: t[0],
            completion_tokens: t[1],
            cached_tokens: t[2],
            total_tokens: t[3],
            requests: t[4],
            blocked,
            cost_pico: u128::from(t[5]),
            ..UsageDelta::default()
        };
        let rows = vec![
            row("m1", [10, 5, 2, 15, 1, 7], 0),
            row("m1", [1, 1, 0, 2, 1, 1], 0),
            row("", [0; 6], 1),
        ];
        ledger.seed(rows, |_| &b, now);
        let e = ledger.entry("a", &b.period, now, None).unwrap();
        let r = ledger.admit(&e, &b, now, 100).reservation.unwrap();
        let charge = Charge {
            model: "m2".into(),
            prompt_tokens: 3,
            completion_tokens: 4,
            cached_tokens: 1,
            total_tokens: 7,
            cost_pico: 5,
        };
        assert_eq!(r.settle(charge, now).after_tokens, 24);
        let model = |t: &AgentTotals, m: &str| {
            t.by_model
                .iter()
                .find(|(k, _)| k == m)
                .map(|(_, v)| v.clone())
                .unwrap()
        };
        let totals = |t: [u64; 6]| ModelTotals {
            prompt_tokens: t[0],
            completion_tokens: t[1],
            cached_tokens: t[2],
            total_tokens: t[3],
            requests: t[4],
            cost_pico: u128::from(t[5]),
        };
        let t = ledger.totals("a", &b.period, now).unwrap();
        // The admission counted the request period-wide; the settle counts it for its model.
        assert_eq!(
            (
                t.committed_tokens,
                t.prompt_tokens,
                t.completion_tokens,
                t.cached_tokens
            ),
            (24, 14, 10, 3)
        );
        assert_eq!((t.requests, t.blocked, t.cost_pico), (3, 1, 13));
        assert_eq!(model(&t, "m1"), totals([11, 6, 2, 17, 2, 8]));
        assert_eq!(model(&t, "m2"), totals([3, 4, 1, 7, 1, 5]));
        let mut pending = PeriodCounts::default();
        pending.add_delta(&row("m1", [6, 4, 0, 10, 2, 2], 1));
        ledger.add_pending("a", &b.period, now, &pending);
        let t = ledger.totals("a", &b.period, now).unwrap();
        assert_eq!((t.committed_tokens, t.requests, t.blocked), (34, 5, 2));
        assert_eq!(model(&t, "m1"), totals([17, 10, 2, 27, 4, 10]));
        // Subtracting what was added leaves nothing, and drops the emptied model.
        let mut again = pending.clone();
        again.add(&pending);
        again.sub(&pending);
        again.sub(&pending);
        assert!(again.is_empty());
    }

    #[test]
    fn a_replica_admits_within_its_lease_and_counts_shared_totals_plus_pending() {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let ledger = Ledger::with_remote(None, tx);
        let b = budget(1000);
        let now = Utc::now();
        let e = ledger.entry("a", &b.period, now, None).unwrap();
        // No lease yet: refused, and the agent is asked for.
        let a = ledger.admit(&e, &b, now, 40);
        assert!(matches!(a.decision, Decision::Block { .. }));
        assert_eq!(ledger.take_lease_wanted(), vec![Arc::from("a")]);
        let start = ledger.lease_status(&e, &b, now).window.start.timestamp();
        // The shared store: 500 used by others, a lease of 50 for us.
        let totals = PeriodCounts {
            total_tokens: 500,
            ..Default::default()
        };
        let update = RemoteUpdate {
            period_start: start,
            totals: totals.clone(),
            acked: None,
            lease: Some(50),
        };
        ledger.apply_remote("a", &b.period, now, update, false);
        let r1 = ledger.admit(&e, &b, now, 40).reservation.unwrap();
        let r2 = ledger.admit(&e, &b, now, 40).reservation.unwrap();
        // 80 held ≥ 50 leased: the third waits for a lease.
        assert!(ledger.admit(&e, &b, now, 40).reservation.is_none());
        r1.settle(charge(30), now);
        drop(r2);
        let st = ledger.lease_status(&e, &b, now);
        assert_eq!((st.used, st.committed, st.in_flight), (30, 530, 0));
        // The write-back is confirmed: shared 530, nothing pending.
        let mut acked = PeriodCounts::default();
        while let Ok(StoreOp::Add(d)) = rx.try_recv() {
            acked.add_delta(&d);
        }
        assert_eq!(acked.total_tokens, 30);
        let update = RemoteUpdate {
            period_start: start,
            totals: PeriodCounts {
                total_tokens: 530,
                ..totals
            },
            acked: Some(acked),
            lease: Some(20),
        };
        let s = ledger
            .apply_remote("a", &b.period, now, update, false)
            .unwrap();
        assert_eq!((s.before_tokens, s.after_tokens), (530, 530));
        let st = ledger.lease_status(&e, &b, now);
        assert_eq!((st.used, st.lease, st.committed), (0, 20, 530));
        // Without leases (Redis down, open mode) the local view decides alone.
        ledger.set_leased(false);
        assert!(ledger.admit(&e, &b, now, 400).reservation.is_some());
        // A reset elsewhere zeroes the view of that period only.
        assert!(!ledger.reset_view("a", start + 1));
        assert!(ledger.reset_view("a", start));
        assert_eq!(ledger.lease_status(&e, &b, now).committed, 0);
    }
}
