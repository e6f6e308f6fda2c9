//! The embedded store: one SQLite file in `--state-dir`, WAL mode. `synchronous=NORMAL` in
//! WAL survives a process crash (`kill -9`); only an OS crash can lose the last commit.

use super::{PeriodRow, Store, StoreError, StoreOp};
use rusqlite::{params, Connection, OptionalExtension};
use std::path::Path;
use std::sync::Mutex;

/// SQLite-backed [`Store`].
pub struct LocalStore {
    conn: Mutex<Connection>,
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS period_usage (
    agent TEXT NOT NULL,
    period_start INTEGER NOT NULL,
    period_end INTEGER,
    model TEXT NOT NULL,
    prompt_tokens INTEGER NOT NULL DEFAULT 0,
    completion_tokens INTEGER NOT NULL DEFAULT 0,
    cached_tokens INTEGER NOT NULL DEFAULT 0,
    total_tokens INTEGER NOT NULL DEFAULT 0,
    requests INTEGER NOT NULL DEFAULT 0,
    blocked INTEGER NOT NULL DEFAULT 0,
    cost_pico INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (agent, period_start, model)
);
CREATE TABLE IF NOT EXISTS usage_history (
    agent TEXT NOT NULL,
    period_start INTEGER NOT NULL,
    period_end INTEGER,
    model TEXT NOT NULL,
    reason TEXT NOT NULL,
    at INTEGER NOT NULL,
    prompt_tokens INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    cached_tokens INTEGER NOT NULL,
    total_tokens INTEGER NOT NULL,
    requests INTEGER NOT NULL,
    blocked INTEGER NOT NULL,
    cost_pico INTEGER NOT NULL
);
";

fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn to_u64(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

impl LocalStore {
    /// Open (or create) `state_dir/budget.sqlite3`.
    pub fn open(state_dir: &Path) -> Result<Self, StoreError> {
        std::fs::create_dir_all(state_dir).map_err(|source| StoreError::Dir {
            path: state_dir.display().to_string(),
            source,
        })?;
        let conn = Connection::open(state_dir.join("budget.sqlite3"))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        conn.execute_batch(SCHEMA)?;
        Ok(Self {
            conn: Mutex::new(conn),
        })
    }

    fn conn(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Store for LocalStore {
    fn load_latest(&self) -> Result<Vec<PeriodRow>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT u.agent, u.period_start, u.period_end, u.model, u.prompt_tokens,
                    u.completion_tokens, u.cached_tokens, u.total_tokens, u.requests,
                    u.blocked, u.cost_pico
             FROM period_usage u
             JOIN (SELECT agent, MAX(period_start) AS ps FROM period_usage GROUP BY agent) l
               ON u.agent = l.agent AND u.period_start = l.ps
             ORDER BY u.agent, u.model",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok(PeriodRow {
                agent: r.get(0)?,
                period_start: r.get(1)?,
                period_end: r.get(2)?,
                model: r.get(3)?,
                prompt_tokens: to_u64(r.get(4)?),
                completion_tokens: to_u64(r.get(5)?),
                cached_tokens: to_u64(r.get(6)?),
                total_tokens: to_u64(r.get(7)?),
                requests: to_u64(r.get(8)?),
                blocked: to_u64(r.get(9)?),
                cost_pico: u128::from(to_u64(r.get(10)?)),
            })
        })?;
        Ok(rows.collect::<Result<Vec<_>, _>>()?)
    }

    fn apply(&self, ops: &[StoreOp]) -> Result<(), StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let now = chrono::Utc::now().timestamp();
        for op in ops {
            match op {
                StoreOp::Add(d) => {
                    tx.execute(
                        "INSERT INTO period_usage (agent, period_start, period_end, model,
                            prompt_tokens, completion_tokens, cached_tokens, total_tokens,
                            requests, blocked, cost_pico)
                         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)
                         ON CONFLICT (agent, period_start, model) DO UPDATE SET
                            period_end = excluded.period_end,
                            prompt_tokens = prompt_tokens + excluded.prompt_tokens,
                            completion_tokens = completion_tokens + excluded.completion_tokens,
                            cached_tokens = cached_tokens + excluded.cached_tokens,
                            total_tokens = total_tokens + excluded.total_tokens,
                            requests = requests + excluded.requests,
                            blocked = blocked + excluded.blocked,
                            cost_pico = cost_pico + excluded.cost_pico",
                        params![
                            d.agent,
                            d.period_start,
                            d.period_end,
                            d.model,
                            to_i64(d.prompt_tokens),
                            to_i64(d.completion_tokens),
                            to_i64(d.cached_tokens),
                            to_i64(d.total_tokens),
                            to_i64(d.requests),
                            to_i64(d.blocked),
                            i64::try_from(d.cost_pico).unwrap_or(i64::MAX),
                        ],
                    )?;
                }
                StoreOp::Rekey {
                    agent,
                    from_start,
                    to_start,
                    to_end,
                } => {
                    // Merge every row of the old key into the new key, then drop the old.
                    tx.execute(
                        "INSERT INTO period_usage (agent, period_start, period_end, model,
                            prompt_tokens, completion_tokens, cached_tokens, total_tokens,
                            requests, blocked, cost_pico)
                         SELECT agent, ?3, ?4, model, prompt_tokens, completion_tokens,
                            cached_tokens, total_tokens, requests, blocked, cost_pico
                         FROM period_usage WHERE agent = ?1 AND period_start = ?2
                         ON CONFLICT (agent, period_start, model) DO UPDATE SET
                            period_end = excluded.period_end,
                            prompt_tokens = prompt_tokens + excluded.prompt_tokens,
                            completion_tokens = completion_tokens + excluded.completion_tokens,
                            cached_tokens = cached_tokens + excluded.cached_tokens,
                            total_tokens = total_tokens + excluded.total_tokens,
                            requests = requests + excluded.requests,
                            blocked = blocked + excluded.blocked,
                            cost_pico = cost_pico + excluded.cost_pico",
                        params![agent, from_start, to_start, to_end],
                    )?;
                    tx.execute(
                        "DELETE FROM period_usage WHERE agent = ?1 AND period_start = ?2",
                        params![agent, from_start],
                    )?;
                }
                StoreOp::Reset {
                    agent,
                    period_start,
                } => {
                    tx.execute(
                        "INSERT INTO usage_history SELECT agent, period_start, period_end, model,
                            'reset', ?3, prompt_tokens, completion_tokens, cached_tokens,
                            total_tokens, requests, blocked, cost_pico
                         FROM period_usage WHERE agent = ?1 AND period_start = ?2",
                        params![agent, period_start, now],
                    )?;
                    tx.execute(
                        "DELETE FROM period_usage WHERE agent = ?1 AND period_start = ?2",
                        params![agent, period_start],
                    )?;
                }
            }
        }
        tx.commit()?;
        Ok(())
    }
}

impl LocalStore {
    /// Whether the database answers (for readiness).
    pub fn ping(&self) -> Result<(), StoreError> {
        let conn = self.conn();
        let _: Option<i64> = conn.query_row("SELECT 1", [], |r| r.get(0)).optional()?;
        Ok(())
    }
}
