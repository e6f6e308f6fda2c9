//! The resolved per-agent table printed by `budget-proxy check-config`, so an operator sees
//! what each agent actually gets after inheritance, not what the file literally says.

use super::{Action, AgentBudget, Config, Priority};
use crate::budget::period::{Period, PeriodSpec};
use chrono::Timelike;

/// Label of the `default` row; parenthesised so it cannot be mistaken for an agent id.
pub const DEFAULT_ROW: &str = "(default)";

/// One row of the resolved table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentRow {
    /// Agent id, or [`DEFAULT_ROW`] for the budget of agents not in the file.
    pub agent: String,
    /// Tokens per period.
    pub max_tokens: u64,
    /// Period kind.
    pub period: Period,
    /// When it resets, in words (`day 1 00:00 Europe/Paris`, `never`).
    pub reset: String,
    /// Action at the limit.
    pub action: Action,
    /// Fallback model (`-` when none).
    pub fallback: Option<String>,
    /// Priority.
    pub priority: Priority,
}

impl AgentRow {
    fn new(agent: &str, b: &AgentBudget) -> AgentRow {
        AgentRow {
            agent: agent.to_string(),
            max_tokens: b.max_tokens,
            period: b.period.period,
            reset: describe_reset(&b.period),
            action: b.action,
            fallback: b.fallback_model.clone(),
            priority: b.priority,
        }
    }
}

/// When a period resets, in words: `00:00 UTC` (daily), `Sun 00:00 UTC`,
/// `day 1 00:00 UTC`, `Jan 1 00:00 UTC`, `never`.
pub fn describe_reset(spec: &PeriodSpec) -> String {
    let t = spec.reset_time;
    let at = format!("{:02}:{:02} {}", t.hour(), t.minute(), spec.timezone.name());
    match spec.period {
        Period::Daily => at,
        Period::Weekly => {
            let days = ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"];
            let day = days
                .get(usize::from(spec.reset_day.saturating_sub(1)))
                .unwrap_or(&"?");
            format!("{day} {at}")
        }
        Period::Monthly => format!("day {} {at}", spec.reset_day),
        Period::Yearly => format!("Jan 1 {at}"),
        Period::Infinite => "never".to_string(),
    }
}

impl Config {
    /// The resolved budget of `default` then of every agent (by id), one row each.
    pub fn resolved_rows(&self) -> Vec<AgentRow> {
        std::iter::once(AgentRow::new(DEFAULT_ROW, &self.default))
            .chain(self.agents.iter().map(|(id, b)| AgentRow::new(id, b)))
            .collect()
    }

    /// [`Config::resolved_rows`] as an aligned text table with a header line; every line
    /// ends with a newline.
    pub fn to_table(&self) -> String {
        let header = [
            "agent",
            "max_tokens",
            "period",
            "reset",
            "action",
            "fallback",
            "priority",
        ];
        let rows: Vec<[String; 7]> = self
            .resolved_rows()
            .into_iter()
            .map(|r| {
                [
                    r.agent,
                    r.max_tokens.to_string(),
                    r.period.to_string(),
                    r.reset,
                    r.action.to_string(),
                    r.fallback.unwrap_or_else(|| "-".to_string()),
                    r.priority.to_string(),
                ]
            })
            .collect();
        let mut widths = header.map(str::len);
        for row in &rows {
            for (w, cell) in widths.iter_mut().zip(row) {
                *w = (*w).max(cell.chars().count());
            }
        }
        let mut out = String::new();
        let mut line = |cells: &[&str]| {
            let mut text = String::new();
            for (i, (cell, w)) in cells.iter().zip(widths).enumerate() {
                if i > 0 {
                    text.push_str("  ");
                }
                // max_tokens is right-aligned so magnitudes line up.
                if i == 1 {
                    text.push_str(&format!("{cell:>w$}"));
                } else {
                    text.push_str(&format!("{cell:<w$}"));
                }
            }
            out.push_str(text.trim_end());
            out.push('\n');
        };
        line(&header);
        for row in &rows {
            let cells: Vec<&str> = row.iter().map(String::as_str).collect();
            line(&cells);
        }
        out
    }
}
