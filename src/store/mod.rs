//! Durable counters. The ledger keeps the live numbers in memory; the store is written
//! behind it in batches (see [`writer`]) and read once at start-up to seed the ledger.
//!
//! Counters are keyed by (agent, period start, model): a new period is a new key, so there
//! is no reset job and a restart in a new period starts from zero by construction.

pub mod jobs;
pub mod local;
/// Shared counters across replicas: Redis keys and the sync script.
pub mod redis;
pub mod redis_sync;
pub mod writer;

pub use local::LocalStore;
pub use writer::Writer;

/// Usage to add to one (agent, period, model) row.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UsageDelta {
    /// Agent id.
    pub agent: String,
    /// Unix seconds of the period start (the key of the period).
    pub period_start: i64,
    /// Unix seconds of the period end (`None`: infinite). Kept so a later change of the
    /// period definition can tell whether this row's period is still running.
    pub period_end: Option<i64>,
    /// Model the usage was billed for (empty for refusals that named none).
    pub model: String,
    /// Unix seconds of the UTC hour the usage happened in (the history bucket).
    pub hour_start: i64,
    /// Prompt tokens (cached included).
    pub prompt_tokens: u64,
    /// Candidates + thoughts tokens.
    pub completion_tokens: u64,
    /// Cached prompt tokens.
    pub cached_tokens: u64,
    /// Counted tokens (`totalTokenCount`).
    pub total_tokens: u64,
    /// Forwarded requests.
    pub requests: u64,
    /// Budget refusals.
    pub blocked: u64,
    /// Cost in pico-dollars.
    pub cost_pico: u128,
}

/// One operation for the store, applied in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreOp {
    /// Add usage to a row.
    Add(UsageDelta),
    /// The definition of an agent's period changed while a period was running: move that
    /// period's rows to the new period key, so recorded usage carries over (never lost,
    /// never counted twice).
    Rekey {
        /// Agent id.
        agent: String,
        /// Old period start (unix seconds).
        from_start: i64,
        /// New period start.
        to_start: i64,
        /// New period end.
        to_end: Option<i64>,
    },
    /// Zero an agent's running period (admin reset): its rows move to history under
    /// a `reset` marker and stop counting.
    Reset {
        /// Agent id.
        agent: String,
        /// Period start.
        period_start: i64,
    },
    /// Record a budget alert once: first claim its key (agent, period start, threshold),
    /// the SQL twin of a Redis `SET NX`; only a new claim writes the alert, and the store
    /// keeps the newest [`ALERTS_KEPT`] alerts.
    Alert(AlertRow),
}

/// How many alerts the store keeps (the oldest are pruned).
pub const ALERTS_KEPT: usize = 10_000;

/// One budget alert as stored (see `budget::alerts::Alert` for the API form).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AlertRow {
    /// Alert id, increasing.
    pub id: u64,
    /// Agent id.
    pub agent: String,
    /// Unix seconds of the period start (part of the dedupe key).
    pub period_start: i64,
    /// Unix seconds of the period end (`None`: infinite); the key is dropped once it passed.
    pub period_end: Option<i64>,
    /// Threshold crossed, in percent (part of the dedupe key).
    pub threshold_percent: u32,
    /// `warning`, `critical` or `limit`.
    pub level: String,
    /// Percentage of the budget used, in hundredths of a percent.
    pub percentage_hundredths: u64,
    /// Unix milliseconds.
    pub created_at_ms: i64,
    /// Human-readable text.
    pub message: String,
}

/// An alert key that was claimed: (agent, period start, threshold) already alerted.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct AlertKey {
    /// Agent id.
    pub agent: String,
    /// Unix seconds of the period start.
    pub period_start: i64,
    /// Threshold in percent.
    pub threshold_percent: u32,
}

/// Alerts read back at start-up.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LoadedAlerts {
    /// The newest alerts, newest first.
    pub recent: Vec<AlertRow>,
    /// Every claimed key of periods that may still be running, oldest period first.
    pub keys: Vec<AlertKey>,
    /// The highest alert id ever stored (0: none).
    pub max_id: u64,
}

/// A stored row, as read back at start-up.
pub type PeriodRow = UsageDelta;

/// Why the store failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// SQLite said no.
    #[error("embedded store: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// The state directory could not be created.
    #[error("cannot create state directory {path}: {source}")]
    Dir {
        /// The directory.
        path: String,
        /// The reason.
        source: std::io::Error,
    },
    /// The blocking task running the write was lost.
    #[error("store task failed: {0}")]
    Task(String),
}

/// How `/api/budget/usage` groups history.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroupBy {
    /// One row per model.
    Model,
    /// One row per UTC day.
    Day,
    /// One row per UTC hour.
    Hour,
}

/// A usage history query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageQuery {
    /// Only this agent (all when `None`).
    pub agent: Option<String>,
    /// Grouping.
    pub group_by: GroupBy,
    /// From this instant (unix seconds, inclusive; hour granularity).
    pub from: Option<i64>,
    /// Up to this instant (unix seconds, exclusive).
    pub to: Option<i64>,
}

/// One group of usage history.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct UsageRow {
    /// The model, or the start of the day/hour (RFC 3339).
    pub key: String,
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
    /// Budget refusals.
    pub blocked: u64,
    /// Cost in pico-dollars (exact).
    pub cost_pico: u128,
}

/// The storage behind the ledger.
pub trait Store: Send + Sync + 'static {
    /// Usage history, grouped (reads only; never on the hot path).
    fn usage(&self, q: &UsageQuery) -> Result<Vec<UsageRow>, StoreError>;
    /// Whether the store answers (readiness).
    fn ping(&self) -> Result<(), StoreError>;
    /// Every row of each agent's latest period.
    fn load_latest(&self) -> Result<Vec<PeriodRow>, StoreError>;
    /// Apply operations in one transaction: all or nothing.
    fn apply(&self, ops: &[StoreOp]) -> Result<(), StoreError>;
    /// The newest `limit` alerts and the alert keys already claimed (a store that keeps no
    /// alerts returns none).
    fn load_alerts(&self, limit: usize) -> Result<LoadedAlerts, StoreError> {
        let _ = limit;
        Ok(LoadedAlerts::default())
    }
}
