//! Durable counters. The ledger keeps the live numbers in memory; the store is written
//! behind it in batches (see [`writer`]) and read once at start-up to seed the ledger.
//!
//! Counters are keyed by (agent, period start, model): a new period is a new key, so there
//! is no reset job and a restart in a new period starts from zero by construction.

pub mod local;
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

/// The storage behind the ledger.
pub trait Store: Send + Sync + 'static {
    /// Every row of each agent's latest period.
    fn load_latest(&self) -> Result<Vec<PeriodRow>, StoreError>;
    /// Apply operations in one transaction: all or nothing.
    fn apply(&self, ops: &[StoreOp]) -> Result<(), StoreError>;
}
