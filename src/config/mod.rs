//! `budgets.json`: the raw serde types, validation with clear messages, defaults resolution.
//! The result, [`Config`], can only hold valid values.
//!
//! Loading is two steps: [`raw::RawConfig`] mirrors the file (strict: an unknown key is an
//! error naming the valid ones, and the JSON path of any bad value is reported), then
//! [`Config::from_raw`] validates every value and resolves each agent as
//! *agent keys → `default` keys → built-in defaults*. Validation collects every problem,
//! each naming the entry (`default`, `agents.sage`), the field and the valid values.

pub mod live;
pub mod raw;
mod resolve;
mod table;

use crate::budget::period::PeriodSpec;
use crate::budget::pricing::PriceTable;
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::Path;

pub use resolve::valid_agent_id;
pub use table::{describe_reset, AgentRow, DEFAULT_ROW};

/// What happens when an agent reaches its limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    /// Allow and alert.
    Warn,
    /// 429.
    Block,
    /// Rewrite the model to `fallback_model`.
    Degrade,
    /// Park until budget returns.
    Queue,
}

impl Action {
    /// The name used in budgets.json, headers and the admin API.
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Warn => "warn",
            Action::Block => "block",
            Action::Degrade => "degrade",
            Action::Queue => "queue",
        }
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An agent's priority (informational; the seed's table).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Priority {
    /// Critical.
    Critical,
    /// High.
    High,
    /// Medium (the default).
    Medium,
    /// Low.
    Low,
}

impl Priority {
    /// The name used in budgets.json and the admin API.
    pub fn as_str(self) -> &'static str {
        match self {
            Priority::Critical => "critical",
            Priority::High => "high",
            Priority::Medium => "medium",
            Priority::Low => "low",
        }
    }
}

impl fmt::Display for Priority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What to do with an agent id that is not in the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UnknownAgents {
    /// Give it the `default` budget (up to `max_dynamic_agents`).
    Default,
    /// 403.
    Reject,
}

/// Bounds of the queue action.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueLimits {
    /// Longest a request may stay parked (default 300).
    pub max_wait_seconds: u64,
    /// Most requests parked per agent (default 1000).
    pub max_depth: usize,
}

impl Default for QueueLimits {
    /// The built-in bounds: 300 s, 1000 requests.
    fn default() -> Self {
        QueueLimits {
            max_wait_seconds: 300,
            max_depth: 1000,
        }
    }
}

/// One agent's resolved budget (the `default` entry merged under the agent's keys).
#[derive(Debug, Clone, PartialEq)]
pub struct AgentBudget {
    /// Token limit per period (> 0).
    pub max_tokens: u64,
    /// Period, reset day, reset time, time zone.
    pub period: PeriodSpec,
    /// Action at the limit.
    pub action: Action,
    /// Model used on degrade; always set for degrade agents.
    pub fallback_model: Option<String>,
    /// Free text.
    pub description: Option<String>,
    /// Priority.
    pub priority: Priority,
    /// SHA-256 digests of the agent's virtual keys (empty: none).
    pub api_keys: Vec<[u8; 32]>,
    /// Queue bounds.
    pub queue: QueueLimits,
    /// Alert thresholds in percent, ascending (default 75, 90, 100).
    pub alert_thresholds: Vec<u32>,
}

/// A webhook that receives alerts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Webhook {
    /// Where to POST.
    pub url: String,
    /// `slack` or `json`.
    pub format: String,
}

/// A loaded, valid budgets.json.
#[derive(Debug, Clone)]
pub struct Config {
    /// The budget of agents not in the file.
    pub default: AgentBudget,
    /// Named agents, in key order (admin listings). Private so that it cannot drift from
    /// `index`: see [`Config::agents`].
    agents: BTreeMap<String, AgentBudget>,
    /// The same agents behind a hash, for the lookups of every request (see [`AgentIndex`]).
    index: AgentIndex,
    /// Policy for agents not in the file.
    pub unknown_agents: UnknownAgents,
    /// Cap on agents created on the fly under `unknown_agents: default` (default 1000).
    pub max_dynamic_agents: usize,
    /// Prices (built-in overridden by the file).
    pub pricing: PriceTable,
    /// Global alert thresholds in percent.
    pub alert_thresholds: Vec<u32>,
    /// Alert webhooks.
    pub webhooks: Vec<Webhook>,
    /// `open` (default) or `closed`: what to do when Redis is down.
    pub redis_failure_mode: String,
    /// sha256(key) → agent id, for virtual keys.
    pub key_index: HashMap<[u8; 32], String>,
}

/// Agent id → budget in a hash map, built once per config snapshot next to the ordered
/// `BTreeMap`. Every request looks its agent up at least twice (identity, admission) and
/// every settle once more; with many agents the `BTreeMap` walk (a dozen or more string
/// compares, each a pointer chase) was most of the admission cost.
///
/// The budgets are boxed copies: the table's slots stay small (24 bytes, not ~150 with the
/// budget inline), so the table itself stays in cache and TLB reach. With thousands of
/// agents admission is bound by memory (how many cache lines and pages it touches), not by
/// instructions; see benches/budget_check.rs. The two maps are only built together
/// (`resolve`, the one place a `Config` is made) and neither is mutable from outside this
/// module.
#[derive(Clone, Default)]
struct AgentIndex(HashMap<Box<str>, Box<AgentBudget>, foldhash::fast::RandomState>);

impl AgentIndex {
    fn new(agents: &BTreeMap<String, AgentBudget>) -> Self {
        let mut map =
            HashMap::with_capacity_and_hasher(agents.len(), foldhash::fast::RandomState::default());
        for (id, budget) in agents {
            // The clone's own allocations first, then the box and the id one after the
            // other: with glibc's malloc those two are then neighbours in memory, and a
            // lookup's key compare and budget read share a page.
            let budget = Box::new(budget.clone());
            map.insert(Box::from(id.as_str()), budget);
        }
        AgentIndex(map)
    }
}

impl fmt::Debug for AgentIndex {
    /// Only the size: the entries are the ones `Config::agents` already prints.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "AgentIndex({} agents)", self.0.len())
    }
}

/// Why a budgets.json was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// The reason.
        source: std::io::Error,
    },
    /// Not JSON, or a wrong type / unknown key (serde), with its location.
    #[error("{path}: {message} (line {line}, column {column})")]
    Parse {
        /// The file.
        path: String,
        /// What serde said, with the JSON path of the offending value.
        message: String,
        /// 1-based line.
        line: usize,
        /// 1-based column.
        column: usize,
    },
    /// A value that parses but is not allowed.
    #[error("{path}: {message}")]
    Invalid {
        /// The file.
        path: String,
        /// Names the agent, the field and the valid values.
        message: String,
    },
}

impl Config {
    /// Parse and validate the text of a budgets.json; `source` names it in errors.
    pub fn parse(text: &str, source: &str) -> Result<Config, ConfigError> {
        let raw = raw::RawConfig::parse(text, source)?;
        Self::from_raw(&raw, source)
    }

    /// Validate a parsed file and resolve every agent against `default`; `source` names the
    /// file in errors. Tools that edit the file (admin updates) go through here too, so an
    /// edit is held to the same rules as a hand-written file.
    pub fn from_raw(raw: &raw::RawConfig, source: &str) -> Result<Config, ConfigError> {
        resolve::resolve(raw).map_err(|problems| ConfigError::Invalid {
            path: source.to_string(),
            message: join_problems(&problems),
        })
    }

    /// Read, parse and validate a file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&text, &path.display().to_string())
    }

    /// Named agents in key order (for listings; lookups go through [`Config::agent`]).
    pub fn agents(&self) -> &BTreeMap<String, AgentBudget> {
        &self.agents
    }

    /// The budget of `agent`: its own entry, or `None` when it is not in the file.
    pub fn agent(&self, agent: &str) -> Option<&AgentBudget> {
        self.index.0.get(agent).map(|b| &**b)
    }

    /// The budget that applies to `agent`: its own entry, else `default` (whether an unknown
    /// agent is admitted at all is [`Config::unknown_agents`]' business, not this one's).
    pub fn budget_for(&self, agent: &str) -> &AgentBudget {
        self.agent(agent).unwrap_or(&self.default)
    }
}

/// One problem per line when there are several, so `check-config` lists them all.
fn join_problems(problems: &[String]) -> String {
    match problems {
        [one] => one.clone(),
        many => {
            let mut out = format!("{} problems:", many.len());
            for p in many {
                out.push_str("\n  - ");
                out.push_str(p);
            }
            out
        }
    }
}

impl raw::RawConfig {
    /// Parse the text of a budgets.json without validating values; errors carry the JSON
    /// path of the offending value (`agents.sage.period: unknown variant ...`) and its line
    /// and column. `source` names the file in errors.
    pub fn parse(text: &str, source: &str) -> Result<raw::RawConfig, ConfigError> {
        let text = text.strip_prefix('\u{feff}').unwrap_or(text);
        let invalid = |message: &str| ConfigError::Invalid {
            path: source.to_string(),
            message: message.to_string(),
        };
        let trimmed = text.trim_start();
        if trimmed.is_empty() {
            return Err(invalid(
                "the file is empty (expected a JSON object such as \
                 {\"default\": {\"max_tokens\": 1000000, \"period\": \"monthly\", \
                 \"action_on_limit\": \"warn\"}, \"agents\": {}})",
            ));
        }
        if !trimmed.starts_with('{') {
            return Err(invalid(
                "the top level must be a JSON object with \"default\" and \"agents\"",
            ));
        }
        let mut de = serde_json::Deserializer::from_str(text);
        let raw = serde_path_to_error::deserialize(&mut de)
            .map_err(|e| parse_error(source, &e.path().to_string(), e.inner()))?;
        // Anything but whitespace after the object.
        de.end().map_err(|e| parse_error(source, ".", &e))?;
        Ok(raw)
    }
}

/// A serde_json error as [`ConfigError::Parse`]: the JSON path (when serde knows one) in
/// front of serde's message, line and column apart.
fn parse_error(source: &str, json_path: &str, inner: &serde_json::Error) -> ConfigError {
    let (line, column) = (inner.line(), inner.column());
    let what = inner.to_string();
    let suffix = format!(" at line {line} column {column}");
    let what = what.strip_suffix(&suffix).unwrap_or(&what);
    // Syntax errors keep the path too when serde knows it: it says where the parser was.
    let located = !(json_path == "." || json_path == "?" || inner.is_eof());
    let message = if located {
        format!("{json_path}: {what}")
    } else {
        what.to_string()
    };
    ConfigError::Parse {
        path: source.to_string(),
        message,
        line,
        column,
    }
}

/// SHA-256 of a virtual key as sent by a caller: budgets.json stores only this digest
/// (`"sha256:<hex>"`), so identity hashes the presented key and looks it up in
/// [`Config::key_index`].
pub fn hash_api_key(key: &str) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(key.as_bytes()).into()
}

/// The budgets.json spelling of a key digest, `"sha256:<64 lowercase hex>"`; for tools that
/// write keys into the file and for showing which key matched without revealing it.
pub fn format_key_digest(digest: &[u8; 32]) -> String {
    format!("sha256:{}", hex::encode(digest))
}

/// Parse `"sha256:<64 hex>"` (either case) into a digest; `None` when it is not exactly that.
pub fn parse_key_digest(text: &str) -> Option<[u8; 32]> {
    let hex_part = text.strip_prefix("sha256:")?;
    if hex_part.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    hex::decode_to_slice(hex_part, &mut out).ok()?;
    Some(out)
}

/// A monthly `block` budget of `max_tokens`, for unit tests of the budget logic.
#[cfg(test)]
pub(crate) fn test_budget(max_tokens: u64) -> AgentBudget {
    let c = Config::parse(
        r#"{"default": {"max_tokens": 1000, "period": "monthly", "action_on_limit": "block"}, "agents": {}}"#,
        "t",
    )
    .expect("the test config parses");
    AgentBudget {
        max_tokens,
        ..c.default
    }
}

#[cfg(test)]
mod tests;
