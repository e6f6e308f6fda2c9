//! The STATUS document of DESIGN.md, built from the config and the ledger.

use crate::budget::ledger::{secs_until, Ledger};
use crate::budget::period::Period;
use crate::budget::queue::Queues;
use crate::config::{Action, AgentBudget, Config, Priority};
use chrono::{DateTime, SecondsFormat, Utc};
use serde_json::{json, Value};

fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Secs, true)
}

/// Lower-case name of a period.
pub fn period_name(p: Period) -> &'static str {
    match p {
        Period::Daily => "daily",
        Period::Weekly => "weekly",
        Period::Monthly => "monthly",
        Period::Yearly => "yearly",
        Period::Infinite => "infinite",
    }
}

fn action_name(a: Action) -> &'static str {
    match a {
        Action::Warn => "warn",
        Action::Block => "block",
        Action::Degrade => "degrade",
        Action::Queue => "queue",
    }
}

fn priority_name(p: Priority) -> &'static str {
    match p {
        Priority::Critical => "critical",
        Priority::High => "high",
        Priority::Medium => "medium",
        Priority::Low => "low",
    }
}

/// Health from a percentage: ok < 75 ≤ warning < 90 ≤ critical < 100 ≤ exceeded.
pub fn health(percentage: f64) -> &'static str {
    if percentage >= 100.0 {
        "exceeded"
    } else if percentage >= 90.0 {
        "critical"
    } else if percentage >= 75.0 {
        "warning"
    } else {
        "ok"
    }
}

/// Dollars from pico-dollars, for display only (money is kept in integers).
pub fn usd(pico: u128) -> f64 {
    pico as f64 / 1e12
}

/// STATUS of one agent with `budget`.
pub fn status(
    agent: &str,
    budget: &AgentBudget,
    ledger: &Ledger,
    queues: &Queues,
    now: DateTime<Utc>,
) -> Value {
    let t = ledger.totals(agent, &budget.period, now);
    let w = t
        .as_ref()
        .map(|t| t.window)
        .unwrap_or_else(|| crate::budget::period::window(&budget.period, now));
    let used = t.as_ref().map_or(0, |t| t.committed_tokens);
    let reserved = t.as_ref().map_or(0, |t| t.reserved_tokens);
    let percentage = if budget.max_tokens == 0 {
        0.0
    } else {
        (used as f64 * 10000.0 / budget.max_tokens as f64).round() / 100.0
    };
    let by_model: serde_json::Map<String, Value> = t
        .as_ref()
        .map(|t| {
            t.by_model
                .iter()
                .filter(|(m, _)| !m.is_empty())
                .map(|(m, v)| {
                    (
                        m.clone(),
                        json!({
                            "prompt_tokens": v.prompt_tokens,
                            "completion_tokens": v.completion_tokens,
                            "cached_tokens": v.cached_tokens,
                            "total_tokens": v.total_tokens,
                            "requests": v.requests,
                            "estimated_cost_usd": usd(v.cost_pico),
                        }),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    // Projection at the current period's rate: used × period length / elapsed.
    let cost_pico = t.as_ref().map_or(0, |t| t.cost_pico);
    let (projected_tokens, projected_cost) = match w.end {
        Some(end) => {
            let elapsed = (now - w.start).num_seconds().max(1) as f64;
            let length = (end - w.start).num_seconds().max(1) as f64;
            let factor = (length / elapsed).max(1.0);
            (
                Some((used as f64 * factor).round() as u64),
                Some(usd(cost_pico) * factor),
            )
        }
        None => (None, None),
    };
    json!({
        "agent_id": agent,
        "max_tokens": budget.max_tokens,
        "used_tokens": used,
        "reserved_tokens": reserved,
        "prompt_tokens": t.as_ref().map_or(0, |t| t.prompt_tokens),
        "completion_tokens": t.as_ref().map_or(0, |t| t.completion_tokens),
        "cached_tokens": t.as_ref().map_or(0, |t| t.cached_tokens),
        "remaining_tokens": budget.max_tokens.saturating_sub(used + reserved),
        "percentage": percentage,
        "period": period_name(budget.period.period),
        "period_start": rfc3339(w.start),
        "resets_at": w.end.map(rfc3339),
        "resets_in_seconds": secs_until(w.end, now),
        "action_on_limit": action_name(budget.action),
        "fallback_model": budget.fallback_model,
        "priority": priority_name(budget.priority),
        "description": budget.description,
        "health": health(percentage),
        "requests": t.as_ref().map_or(0, |t| t.requests),
        "blocked": t.as_ref().map_or(0, |t| t.blocked),
        "queued": queues.depth(agent).0,
        "deferred_jobs": 0,
        "estimated_cost_usd": usd(cost_pico),
        "cost_pico_usd": cost_pico.to_string(),
        "projected_tokens_at_period_end": projected_tokens,
        "projected_cost_usd": projected_cost,
        "by_model": by_model,
    })
}

/// STATUS of `agent` if it is in the file or the ledger knows it.
pub fn one(
    config: &Config,
    ledger: &Ledger,
    queues: &Queues,
    agent: &str,
    now: DateTime<Utc>,
) -> Option<Value> {
    match config.agent(agent) {
        Some(b) => Some(status(agent, b, ledger, queues, now)),
        None if ledger.totals(agent, &config.default.period, now).is_some() => {
            Some(status(agent, &config.default, ledger, queues, now))
        }
        None => None,
    }
}

/// `{"agents": {...}, "generated_at": …}` for every agent in the file or the ledger.
pub fn all(config: &Config, ledger: &Ledger, queues: &Queues, now: DateTime<Utc>) -> Value {
    let mut ids: Vec<String> = config.agents().keys().cloned().collect();
    for id in ledger.agent_ids() {
        if !config.agents().contains_key(&id) {
            ids.push(id);
        }
    }
    ids.sort();
    let agents: serde_json::Map<String, Value> = ids
        .iter()
        .filter_map(|id| one(config, ledger, queues, id, now).map(|v| (id.clone(), v)))
        .collect();
    json!({"agents": agents, "generated_at": rfc3339(now)})
}
