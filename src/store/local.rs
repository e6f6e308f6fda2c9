//! The embedded store: one SQLite file in `--state-dir`, WAL mode. `synchronous=NORMAL` in
//! WAL survives a process crash (`kill -9`); only an OS crash can lose the last commit.

use super::{AlertKey, AlertRow, LoadedAlerts, ALERTS_KEPT};
use super::{GroupBy, PeriodRow, Store, StoreError, StoreOp, UsageQuery, UsageRow};
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
CREATE TABLE IF NOT EXISTS usage_hourly (
    agent TEXT NOT NULL,
    hour_start INTEGER NOT NULL,
    model TEXT NOT NULL,
    prompt_tokens INTEGER NOT NULL DEFAULT 0,
    completion_tokens INTEGER NOT NULL DEFAULT 0,
    cached_tokens INTEGER NOT NULL DEFAULT 0,
    total_tokens INTEGER NOT NULL DEFAULT 0,
    requests INTEGER NOT NULL DEFAULT 0,
    blocked INTEGER NOT NULL DEFAULT 0,
    cost_pico INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (agent, hour_start, model)
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

/// Alerts: `alert_keys` is the dedupe ledger (one row per agent, period and threshold that
/// alerted; a key is dropped once its period ended), `alerts` the history (the newest
/// [`ALERTS_KEPT`]).
const ALERT_SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS alert_keys (
    agent TEXT NOT NULL,
    period_start INTEGER NOT NULL,
    threshold_percent INTEGER NOT NULL,
    period_end INTEGER,
    PRIMARY KEY (agent, period_start, threshold_percent)
);
CREATE TABLE IF NOT EXISTS alerts (
    id INTEGER PRIMARY KEY,
    agent TEXT NOT NULL,
    period_start INTEGER NOT NULL,
    period_end INTEGER,
    threshold_percent INTEGER NOT NULL,
    level TEXT NOT NULL,
    percentage_hundredths INTEGER NOT NULL,
    created_at_ms INTEGER NOT NULL,
    message TEXT NOT NULL,
    UNIQUE (agent, period_start, threshold_percent)
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
        // The store holds deferred requests (with their headers): keep it private.
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let _ = std::fs::set_permissions(state_dir, std::fs::Permissions::from_mode(0o700));
        }
        let conn = Connection::open(state_dir.join("budget.sqlite3"))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        conn.execute_batch(SCHEMA)?;
        conn.execute_batch(ALERT_SCHEMA)?;
        Self::init_jobs(&conn)?;
        Ok(Self {
            conn: Mutex::new(conn),
        })
    }

    pub(crate) fn conn(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Store for LocalStore {
    fn ping(&self) -> Result<(), StoreError> {
        let conn = self.conn();
        let _: Option<i64> = conn.query_row("SELECT 1", [], |r| r.get(0)).optional()?;
        Ok(())
    }

    fn usage(&self, q: &UsageQuery) -> Result<Vec<UsageRow>, StoreError> {
        let key = match q.group_by {
            GroupBy::Model => "model",
            GroupBy::Day => "(hour_start / 86400) * 86400",
            GroupBy::Hour => "hour_start",
        };
        let sql = format!(
            "SELECT CAST({key} AS TEXT), SUM(prompt_tokens), SUM(completion_tokens),
                    SUM(cached_tokens), SUM(total_tokens), SUM(requests), SUM(blocked),
                    SUM(cost_pico)
             FROM usage_hourly
             WHERE (?1 IS NULL OR agent = ?1) AND (?2 IS NULL OR hour_start >= ?2 - 3599)
               AND (?3 IS NULL OR hour_start < ?3)
             GROUP BY {key} ORDER BY {key}"
        );
        let conn = self.conn();
        let mut stmt = conn.prepare(&sql)?;
        let rows = stmt.query_map(params![q.agent, q.from, q.to], |r| {
            let raw_key: String = r.get(0)?;
            let key = match q.group_by {
                GroupBy::Model => raw_key,
                _ => raw_key
                    .parse::<i64>()
                    .ok()
                    .and_then(|t| chrono::DateTime::from_timestamp(t, 0))
                    .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
                    .unwrap_or(raw_key),
            };
            Ok(UsageRow {
                key,
                prompt_tokens: to_u64(r.get(1)?),
                completion_tokens: to_u64(r.get(2)?),
                cached_tokens: to_u64(r.get(3)?),
                total_tokens: to_u64(r.get(4)?),
                requests: to_u64(r.get(5)?),
                blocked: to_u64(r.get(6)?),
                cost_pico: u128::from(to_u64(r.get(7)?)),
            })
        })?;
        Ok(rows.collect::<Result<Vec<_>, _>>()?)
    }

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
                hour_start: 0,
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
                    // Cached statements: SQLite parses each once per connection, not per
                    // flush (parsing was most of a flush's cost).
                    tx.prepare_cached(
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
                    )?
                    .execute(params![
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
                    ])?;
                    tx.prepare_cached(
                        "INSERT INTO usage_hourly (agent, hour_start, model, prompt_tokens,
                            completion_tokens, cached_tokens, total_tokens, requests, blocked,
                            cost_pico)
                         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)
                         ON CONFLICT (agent, hour_start, model) DO UPDATE SET
                            prompt_tokens = prompt_tokens + excluded.prompt_tokens,
                            completion_tokens = completion_tokens + excluded.completion_tokens,
                            cached_tokens = cached_tokens + excluded.cached_tokens,
                            total_tokens = total_tokens + excluded.total_tokens,
                            requests = requests + excluded.requests,
                            blocked = blocked + excluded.blocked,
                            cost_pico = cost_pico + excluded.cost_pico",
                    )?
                    .execute(params![
                        d.agent,
                        d.hour_start,
                        d.model,
                        to_i64(d.prompt_tokens),
                        to_i64(d.completion_tokens),
                        to_i64(d.cached_tokens),
                        to_i64(d.total_tokens),
                        to_i64(d.requests),
                        to_i64(d.blocked),
                        i64::try_from(d.cost_pico).unwrap_or(i64::MAX),
                    ])?;
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
                StoreOp::Alert(a) => record_alert(&tx, a)?,
            }
        }
        tx.commit()?;
        Ok(())
    }

    fn load_alerts(&self, limit: usize) -> Result<LoadedAlerts, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT id, agent, period_start, period_end, threshold_percent, level,
                    percentage_hundredths, created_at_ms, message
             FROM alerts ORDER BY id DESC LIMIT ?1",
        )?;
        let recent = stmt
            .query_map([to_i64(limit as u64)], |r| {
                Ok(AlertRow {
                    id: to_u64(r.get(0)?),
                    agent: r.get(1)?,
                    period_start: r.get(2)?,
                    period_end: r.get(3)?,
                    threshold_percent: u32::try_from(r.get::<_, i64>(4)?).unwrap_or(0),
                    level: r.get(5)?,
                    percentage_hundredths: to_u64(r.get(6)?),
                    created_at_ms: r.get(7)?,
                    message: r.get(8)?,
                })
            })?
            .collect::<Result<Vec<_>, _>>()?;
        let mut stmt = conn.prepare(
            "SELECT agent, period_start, threshold_percent FROM alert_keys
             ORDER BY agent, period_start, threshold_percent",
        )?;
        let keys = stmt
            .query_map([], |r| {
                Ok(AlertKey {
                    agent: r.get(0)?,
                    period_start: r.get(1)?,
                    threshold_percent: u32::try_from(r.get::<_, i64>(2)?).unwrap_or(0),
                })
            })?
            .collect::<Result<Vec<_>, _>>()?;
        let max_id: i64 =
            conn.query_row("SELECT COALESCE(MAX(id), 0) FROM alerts", [], |r| r.get(0))?;
        Ok(LoadedAlerts {
            recent,
            keys,
            max_id: to_u64(max_id),
        })
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

/// Claim the alert's key (`INSERT OR IGNORE`: the SQL form of `SET NX`); only a new claim
/// writes the alert. Then prune: the newest [`ALERTS_KEPT`] alerts stay, and the agent's
/// keys of periods that ended before this alert go (no settle can charge them any more).
fn record_alert(tx: &rusqlite::Transaction<'_>, a: &AlertRow) -> Result<(), StoreError> {
    let claimed = tx.execute(
        "INSERT OR IGNORE INTO alert_keys (agent, period_start, threshold_percent, period_end)
         VALUES (?1, ?2, ?3, ?4)",
        params![a.agent, a.period_start, a.threshold_percent, a.period_end],
    )?;
    if claimed == 0 {
        return Ok(());
    }
    tx.execute(
        "INSERT OR IGNORE INTO alerts (id, agent, period_start, period_end, threshold_percent,
            level, percentage_hundredths, created_at_ms, message)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
        params![
            to_i64(a.id),
            a.agent,
            a.period_start,
            a.period_end,
            a.threshold_percent,
            a.level,
            to_i64(a.percentage_hundredths),
            a.created_at_ms,
            a.message,
        ],
    )?;
    tx.execute(
        "DELETE FROM alerts WHERE id <= (SELECT id FROM alerts ORDER BY id DESC LIMIT 1 OFFSET ?1)",
        [to_i64(ALERTS_KEPT as u64)],
    )?;
    tx.execute(
        "DELETE FROM alert_keys
         WHERE agent = ?1 AND period_end IS NOT NULL AND period_end <= ?2",
        params![a.agent, a.created_at_ms.div_euclid(1000)],
    )?;
    Ok(())
}
