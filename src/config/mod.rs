//! `budgets.json`: the raw serde types, validation with clear messages, defaults resolution.
//! The result, [`Config`], can only hold valid values.

use crate::budget::period::PeriodSpec;
use crate::budget::pricing::PriceTable;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

/// What happens when an agent reaches its limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
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

/// An agent's priority (informational; the seed's table).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
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

/// What to do with an agent id that is not in the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
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
    /// Named agents.
    pub agents: BTreeMap<String, AgentBudget>,
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
        let _ = text;
        Err(ConfigError::Invalid { path: source.to_string(), message: "unimplemented".into() })
    }

    /// Read, parse and validate a file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&text, &path.display().to_string())
    }

    /// The budget of `agent`: its own entry, or `None` when it is not in the file.
    pub fn agent(&self, agent: &str) -> Option<&AgentBudget> {
        self.agents.get(agent)
    }
}
