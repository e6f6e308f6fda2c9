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

use super::period::{window, PeriodSpec, Window};
use crate::config::{Action, AgentBudget};
use crate::gemini::Usage;
use crate::store::{PeriodRow, StoreOp, UsageDelta, Writer};
use chrono::{DateTime, Utc};
use dashmap::DashMap;
use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, AtomicUsize, Ordering};
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
    by_model: HashMap<String, ModelTotals>,
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
            by_model: HashMap::new(),
        }
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
            let reserved = self.reserved;
            *self = AgentState::new(w);
            self.spec = Some(*spec);
            self.reserved = reserved;
            None
        } else {
            self.window = w;
            Some((old.start.timestamp(), w))
        }
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
            model: model.to_string(),
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

/// Tokens held for a request in flight. Settle it once; dropping it unsettled releases the
/// hold (charges nothing), so a reservation is never leaked.
#[derive(Debug)]
pub struct Reservation {
    agent: Arc<AgentLedger>,
    spec: PeriodSpec,
    estimate_tokens: u64,
    writer: Option<Writer>,
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
            let rekey = st.align(&self.spec, now);
            let before_tokens = st.committed;
            st.committed = st.committed.saturating_add(charge.total_tokens);
            st.prompt += charge.prompt_tokens;
            st.completion += charge.completion_tokens;
            st.cached += charge.cached_tokens;
            st.cost_pico += charge.cost_pico;
            let m = st.by_model.entry(charge.model.clone()).or_default();
            m.prompt_tokens += charge.prompt_tokens;
            m.completion_tokens += charge.completion_tokens;
            m.cached_tokens += charge.cached_tokens;
            m.total_tokens += charge.total_tokens;
            m.requests += 1;
            m.cost_pico += charge.cost_pico;
            let delta = UsageDelta {
                agent: self.agent.id.to_string(),
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
            let settled = Settled {
                before_tokens,
                after_tokens: st.committed,
                window: st.window,
            };
            (rekey, delta, settled)
        };
        if let Some(w) = &self.writer {
            if let Some((from, win)) = rekey {
                w.send(rekey_op(&self.agent.id, from, win));
            }
            w.send(StoreOp::Add(delta));
        }
        settled
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if !self.settled {
            let mut st = self.agent.lock();
            st.reserved = st.reserved.saturating_sub(self.estimate_tokens);
        }
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

/// All agents' live counters.
#[derive(Debug, Default)]
pub struct Ledger {
    agents: DashMap<Arc<str>, Arc<AgentLedger>>,
    dynamic_agents: AtomicUsize,
    writer: Option<Writer>,
}

impl Ledger {
    /// A ledger that persists through `writer` (`None`: memory only, for benches).
    pub fn new(writer: Option<Writer>) -> Self {
        Self {
            agents: DashMap::new(),
            dynamic_agents: AtomicUsize::new(0),
            writer,
        }
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
                if let Some(wr) = &self.writer {
                    wr.send(rekey_op(&agent, start, w));
                }
            }
            let mut st = AgentState::new(w);
            for r in rows {
                st.committed += r.total_tokens;
                st.prompt += r.prompt_tokens;
                st.completion += r.completion_tokens;
                st.cached += r.cached_tokens;
                st.requests += r.requests;
                st.blocked += r.blocked;
                st.cost_pico += r.cost_pico;
                let m = st.by_model.entry(r.model.clone()).or_default();
                m.prompt_tokens += r.prompt_tokens;
                m.completion_tokens += r.completion_tokens;
                m.cached_tokens += r.cached_tokens;
                m.total_tokens += r.total_tokens;
                m.requests += r.requests;
                m.cost_pico += r.cost_pico;
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
                Arc::new(AgentLedger::new(id, AgentState::new(window(spec, now))))
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
        let (admission, rekey, refused) = {
            let mut st = agent.lock();
            let rekey = st.align(&budget.period, now);
            let over = st.committed.saturating_add(st.reserved) >= budget.max_tokens;
            let retry_after_secs = secs_until(st.window.end, now);
            let decision = if !over {
                Decision::Allow
            } else {
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
                Some(Reservation {
                    agent: agent.clone(),
                    spec: budget.period,
                    estimate_tokens,
                    writer: self.writer.clone(),
                    settled: false,
                })
            } else {
                None
            };
            let refused = if matches!(decision, Decision::Block { .. }) {
                st.blocked += 1;
                Some((
                    st.window.start.timestamp(),
                    st.window.end.map(|e| e.timestamp()),
                ))
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
        if let Some(w) = &self.writer {
            if let Some((from, win)) = rekey {
                w.send(rekey_op(&agent.id, from, win));
            }
            if let Some((period_start, period_end)) = refused {
                w.send(StoreOp::Add(UsageDelta {
                    agent: agent.id.to_string(),
                    period_start,
                    period_end,
                    hour_start: now.timestamp() - now.timestamp().rem_euclid(3600),
                    blocked: 1,
                    ..UsageDelta::default()
                }));
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
        if let (Some(w), Some((from, win))) = (&self.writer, rekey) {
            w.send(rekey_op(&agent.id, from, win));
        }
        remaining
    }

    /// Record a refusal decided outside `admit` (e.g. a queue time-out).
    pub fn count_refusal(&self, agent: &Arc<AgentLedger>, now: DateTime<Utc>) {
        let (period_start, period_end) = {
            let mut st = agent.lock();
            st.blocked += 1;
            (
                st.window.start.timestamp(),
                st.window.end.map(|e| e.timestamp()),
            )
        };
        if let Some(w) = &self.writer {
            w.send(StoreOp::Add(UsageDelta {
                agent: agent.id.to_string(),
                period_start,
                period_end,
                hour_start: now.timestamp() - now.timestamp().rem_euclid(3600),
                blocked: 1,
                ..UsageDelta::default()
            }));
        }
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
        if let (Some(w), Some((from, win))) = (&self.writer, rekey) {
            w.send(rekey_op(&e.id, from, win));
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
            let reserved = st.reserved;
            let w = st.window;
            *st = AgentState::new(w);
            st.reserved = reserved;
            w.start.timestamp()
        };
        if let Some(w) = &self.writer {
            w.send(StoreOp::Reset {
                agent: agent.to_string(),
                period_start: start,
            });
        }
        true
    }

    /// Ids of every agent the ledger knows.
    pub fn agent_ids(&self) -> Vec<String> {
        self.agents.iter().map(|e| e.key().to_string()).collect()
    }
}
