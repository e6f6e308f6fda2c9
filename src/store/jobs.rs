//! Deferred jobs (`Prefer: respond-async` to an over-budget queue agent): the request kept
//! durably until budget returns, then its full response kept for retrieval. Jobs are
//! written synchronously (not behind the hot path): a 202 is only sent once the job is on
//! disk, and a store that cannot take it answers 503 with nothing half-written.
//!
//! Execution is at-least-once: a job that was running when the process died runs again.

use super::local::LocalStore;
use super::StoreError;
use rusqlite::{params, OptionalExtension};

/// Where a job is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum JobState {
    /// Waiting for budget.
    Pending,
    /// Being sent upstream.
    Running,
    /// Finished; the response is kept.
    Done,
    /// Cancelled by its caller.
    Cancelled,
}

impl JobState {
    fn as_str(self) -> &'static str {
        match self {
            JobState::Pending => "pending",
            JobState::Running => "running",
            JobState::Done => "done",
            JobState::Cancelled => "cancelled",
        }
    }

    fn parse(s: &str) -> JobState {
        match s {
            "running" => JobState::Running,
            "done" => JobState::Done,
            "cancelled" => JobState::Cancelled,
            _ => JobState::Pending,
        }
    }
}

/// Header name/value pairs as stored.
pub type StoredHeaders = Vec<(String, Vec<u8>)>;

/// A stored response: status, headers, body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredResponse {
    /// HTTP status.
    pub status: u16,
    /// Headers.
    pub headers: StoredHeaders,
    /// Body.
    pub body: Vec<u8>,
}

/// A stored job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Job {
    /// Random id (hex).
    pub id: String,
    /// The agent that made it (retrieval needs the same identity).
    pub agent: String,
    /// State.
    pub state: JobState,
    /// Unix milliseconds of creation (FIFO order).
    pub created_ms: i64,
    /// The request: method, path (without the agent prefix), query.
    pub method: String,
    /// Path.
    pub path: String,
    /// Query.
    pub query: Option<String>,
    /// End-to-end request headers as (name, value) pairs.
    pub headers: StoredHeaders,
    /// Request body.
    pub body: Vec<u8>,
    /// Replace the caller's key by `GEMINI_API_KEY` (header or query) when replaying.
    pub substitute_key: Option<String>,
    /// The response, once done: status, headers, body.
    pub response: Option<StoredResponse>,
    /// Unix seconds after which a finished job is deleted.
    pub expires_at: Option<i64>,
}

const JOB_SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    agent TEXT NOT NULL,
    state TEXT NOT NULL,
    created_ms INTEGER NOT NULL,
    method TEXT NOT NULL,
    path TEXT NOT NULL,
    query TEXT,
    headers TEXT NOT NULL,
    body BLOB NOT NULL,
    substitute_key TEXT,
    response_status INTEGER,
    response_headers TEXT,
    response_body BLOB,
    expires_at INTEGER
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs (state, seq);
";

fn headers_to_json(h: &[(String, Vec<u8>)]) -> String {
    let v: Vec<(String, String)> = h.iter().map(|(k, v)| (k.clone(), hex::encode(v))).collect();
    serde_json::to_string(&v).unwrap_or_else(|_| "[]".to_string())
}

fn headers_from_json(s: &str) -> Vec<(String, Vec<u8>)> {
    serde_json::from_str::<Vec<(String, String)>>(s)
        .unwrap_or_default()
        .into_iter()
        .filter_map(|(k, v)| hex::decode(v).ok().map(|v| (k, v)))
        .collect()
}

const COLUMNS: &str =
    "id, agent, state, created_ms, method, path, query, headers, body, substitute_key,
    response_status, response_headers, response_body, expires_at";

fn row_to_job(r: &rusqlite::Row<'_>) -> rusqlite::Result<Job> {
    let status: Option<i64> = r.get(10)?;
    let rheaders: Option<String> = r.get(11)?;
    let rbody: Option<Vec<u8>> = r.get(12)?;
    let state: String = r.get(2)?;
    let headers: String = r.get(7)?;
    Ok(Job {
        id: r.get(0)?,
        agent: r.get(1)?,
        state: JobState::parse(&state),
        created_ms: r.get(3)?,
        method: r.get(4)?,
        path: r.get(5)?,
        query: r.get(6)?,
        headers: headers_from_json(&headers),
        body: r.get(8)?,
        substitute_key: r.get(9)?,
        response: status.map(|s| StoredResponse {
            status: u16::try_from(s).unwrap_or(500),
            headers: headers_from_json(rheaders.as_deref().unwrap_or("[]")),
            body: rbody.unwrap_or_default(),
        }),
        expires_at: r.get(13)?,
    })
}

/// Counts of an agent's jobs.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct JobCounts {
    /// Waiting for budget.
    pub pending: u64,
    /// Being sent.
    pub running: u64,
    /// Finished, response kept.
    pub done: u64,
}

impl LocalStore {
    /// Create the jobs table (called by `open`).
    pub(crate) fn init_jobs(conn: &rusqlite::Connection) -> Result<(), StoreError> {
        conn.execute_batch(JOB_SCHEMA)?;
        Ok(())
    }

    /// Store a new pending job (synchronously; the caller answers 202 only after this).
    pub fn insert_job(&self, job: &Job) -> Result<(), StoreError> {
        self.conn().execute(
            "INSERT INTO jobs (id, agent, state, created_ms, method, path, query, headers, body, substitute_key)
             VALUES (?1, ?2, 'pending', ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
            params![
                job.id,
                job.agent,
                job.created_ms,
                job.method,
                job.path,
                job.query,
                headers_to_json(&job.headers),
                job.body,
                job.substitute_key
            ],
        )?;
        Ok(())
    }

    /// One job.
    pub fn job(&self, id: &str) -> Result<Option<Job>, StoreError> {
        let conn = self.conn();
        let sql = format!("SELECT {COLUMNS} FROM jobs WHERE id = ?1");
        Ok(conn.query_row(&sql, params![id], row_to_job).optional()?)
    }

    /// Pending jobs, oldest first.
    pub fn pending_jobs(&self, limit: usize) -> Result<Vec<Job>, StoreError> {
        let conn = self.conn();
        let sql =
            format!("SELECT {COLUMNS} FROM jobs WHERE state = 'pending' ORDER BY seq LIMIT ?1");
        let mut stmt = conn.prepare(&sql)?;
        let rows = stmt.query_map(
            params![i64::try_from(limit).unwrap_or(i64::MAX)],
            row_to_job,
        )?;
        Ok(rows.collect::<Result<Vec<_>, _>>()?)
    }

    /// Move a job between states; `false` when it was not in `from`.
    pub fn transition_job(
        &self,
        id: &str,
        from: JobState,
        to: JobState,
    ) -> Result<bool, StoreError> {
        let n = self.conn().execute(
            "UPDATE jobs SET state = ?3 WHERE id = ?1 AND state = ?2",
            params![id, from.as_str(), to.as_str()],
        )?;
        Ok(n == 1)
    }

    /// Keep the response of a finished job until `expires_at`; drop the request body.
    pub fn finish_job(
        &self,
        id: &str,
        status: u16,
        headers: &[(String, Vec<u8>)],
        body: &[u8],
        expires_at: i64,
    ) -> Result<(), StoreError> {
        self.conn().execute(
            "UPDATE jobs SET state = 'done', response_status = ?2, response_headers = ?3,
                response_body = ?4, expires_at = ?5, body = x''
             WHERE id = ?1",
            params![id, status, headers_to_json(headers), body, expires_at],
        )?;
        Ok(())
    }

    /// Jobs that were running when the process stopped run again (at-least-once).
    pub fn requeue_running_jobs(&self) -> Result<usize, StoreError> {
        Ok(self.conn().execute(
            "UPDATE jobs SET state = 'pending' WHERE state = 'running'",
            [],
        )?)
    }

    /// Delete finished or cancelled jobs whose time is up.
    pub fn prune_jobs(&self, now_secs: i64) -> Result<usize, StoreError> {
        Ok(self.conn().execute(
            "DELETE FROM jobs WHERE state IN ('done', 'cancelled') AND expires_at <= ?1",
            params![now_secs],
        )?)
    }

    /// Cancel a pending job and keep the tombstone until `expires_at`.
    pub fn cancel_job(&self, id: &str, expires_at: i64) -> Result<bool, StoreError> {
        let n = self.conn().execute(
            "UPDATE jobs SET state = 'cancelled', body = x'', expires_at = ?2 WHERE id = ?1 AND state = 'pending'",
            params![id, expires_at],
        )?;
        Ok(n == 1)
    }

    /// Job counts per agent.
    pub fn job_counts(&self) -> Result<Vec<(String, JobCounts)>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT agent, SUM(state = 'pending'), SUM(state = 'running'), SUM(state = 'done')
             FROM jobs GROUP BY agent ORDER BY agent",
        )?;
        let rows = stmt.query_map([], |r| {
            let n = |i: usize| -> rusqlite::Result<u64> {
                Ok(u64::try_from(r.get::<_, i64>(i)?).unwrap_or(0))
            };
            Ok((
                r.get::<_, String>(0)?,
                JobCounts {
                    pending: n(1)?,
                    running: n(2)?,
                    done: n(3)?,
                },
            ))
        })?;
        Ok(rows.collect::<Result<Vec<_>, _>>()?)
    }
}
