//! The queue action: over-budget requests of `queue` agents wait, connection open, in a
//! per-agent FIFO until budget returns — the period resets (a timer at `resets_at`), an
//! admin reset, or a config change that raises the limit. Released requests are re-admitted
//! in FIFO order through the normal admission (with reservations), only as many as the
//! budget admits; the rest stay parked.
//!
//! A parked request is a [`Ticket`]: dropping it (the client went away) removes it from the
//! queue at once, so it never reaches the upstream.

use super::ledger::{Admission, AgentLedger, Decision, Ledger};
use crate::config::{AgentBudget, Config};
use chrono::{DateTime, Utc};
use dashmap::DashMap;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::{oneshot, watch};

/// Why a request could not be parked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueFull {
    /// The configured depth.
    pub max_depth: usize,
}

struct Waiter {
    id: u64,
    estimate_tokens: u64,
    tx: oneshot::Sender<Admission>,
    since: std::time::Instant,
}

#[derive(Default)]
struct AgentQueue {
    waiters: VecDeque<Waiter>,
    /// A reset timer is armed for this period end.
    timer_for: Option<DateTime<Utc>>,
}

/// All agents' parked requests.
pub struct Queues {
    /// Looked up on every settle (`release_agent`) and every admission of a queue agent,
    /// hence foldhash (seeded per process) rather than SipHash.
    agents: DashMap<Arc<str>, Arc<Mutex<AgentQueue>>, foldhash::fast::RandomState>,
    /// Some agent ever had a queue in `agents`: until then (no agent with the queue action
    /// was ever over budget) a settle skips the lookup, whose shard lock the I/O threads
    /// would otherwise pass between cores on every request.
    any_queue: AtomicBool,
    /// Wakes the deferred-job runner when budget may have returned.
    jobs: tokio::sync::Notify,
    /// Deferred jobs waiting for budget: wake-ups are skipped while there are none, so a
    /// settle costs the job runner nothing in the common case.
    jobs_pending: AtomicU64,
    next_id: AtomicU64,
    shutdown: watch::Sender<bool>,
}

impl std::fmt::Debug for Queues {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Queues")
            .field("agents", &self.agents.len())
            .finish()
    }
}

impl Default for Queues {
    fn default() -> Self {
        Self {
            agents: DashMap::default(),
            any_queue: AtomicBool::new(false),
            jobs: tokio::sync::Notify::new(),
            jobs_pending: AtomicU64::new(0),
            next_id: AtomicU64::new(1),
            shutdown: watch::channel(false).0,
        }
    }
}

/// A parked request. Await [`Ticket::released`]; drop it to leave the queue.
pub struct Ticket {
    id: u64,
    queue: Arc<Mutex<AgentQueue>>,
    rx: Option<oneshot::Receiver<Admission>>,
    shutdown: watch::Receiver<bool>,
}

/// How a wait ended.
#[derive(Debug)]
pub enum Wait {
    /// Admitted: the admission carries the reservation.
    Released(Admission),
    /// The proxy is shutting down.
    ShuttingDown,
}

impl Ticket {
    /// Wait for release or shutdown (the caller bounds it with `max_wait`).
    pub async fn released(&mut self) -> Wait {
        let Some(rx) = self.rx.as_mut() else {
            return Wait::ShuttingDown;
        };
        tokio::select! {
            r = rx => match r {
                Ok(a) => { self.rx = None; Wait::Released(a) }
                Err(_) => Wait::ShuttingDown,
            },
            _ = self.shutdown.wait_for(|s| *s) => Wait::ShuttingDown,
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let mut q = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        q.waiters.retain(|w| w.id != self.id);
        // A release that raced with the drop: its reservation is dropped with the
        // receiver (released, charging nothing).
    }
}

fn lock(q: &Mutex<AgentQueue>) -> std::sync::MutexGuard<'_, AgentQueue> {
    q.lock().unwrap_or_else(|e| e.into_inner())
}

impl Queues {
    fn queue(&self, agent: &Arc<str>) -> Arc<Mutex<AgentQueue>> {
        if let Some(q) = self.agents.get(agent) {
            return q.value().clone();
        }
        // Before the queue exists, so that whoever can see it sees the flag too.
        self.any_queue.store(true, Ordering::Release);
        self.agents
            .entry(agent.clone())
            .or_default()
            .value()
            .clone()
    }

    /// Whether requests of `agent` are waiting (new ones must queue behind them).
    pub fn has_waiters(&self, agent: &str) -> bool {
        if !self.any_queue.load(Ordering::Acquire) {
            return false;
        }
        self.agents
            .get(agent)
            .is_some_and(|q| !lock(q.value()).waiters.is_empty())
    }

    /// Parked requests of `agent` and the oldest wait.
    pub fn depth(&self, agent: &str) -> (usize, Option<std::time::Duration>) {
        self.agents.get(agent).map_or((0, None), |q| {
            let q = lock(q.value());
            (
                q.waiters.len(),
                q.waiters.front().map(|w| w.since.elapsed()),
            )
        })
    }

    /// Parked requests per agent.
    pub fn depths(&self) -> Vec<(String, usize)> {
        self.agents
            .iter()
            .map(|e| (e.key().to_string(), lock(e.value()).waiters.len()))
            .collect()
    }

    /// Park a request of `agent` that would use about `estimate_tokens`.
    pub fn park(
        &self,
        agent: &Arc<str>,
        estimate_tokens: u64,
        max_depth: usize,
    ) -> Result<Ticket, QueueFull> {
        let queue = self.queue(agent);
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        {
            let mut q = lock(&queue);
            if q.waiters.len() >= max_depth {
                return Err(QueueFull { max_depth });
            }
            q.waiters.push_back(Waiter {
                id,
                estimate_tokens,
                tx,
                since: std::time::Instant::now(),
            });
        }
        Ok(Ticket {
            id,
            queue,
            rx: Some(rx),
            shutdown: self.shutdown.subscribe(),
        })
    }

    /// Admit parked requests of `agent` in FIFO order while the budget admits them.
    /// Returns how many were released.
    pub fn release(
        &self,
        ledger: &Ledger,
        entry: &Arc<AgentLedger>,
        budget: &AgentBudget,
        now: DateTime<Utc>,
    ) -> usize {
        let Some(queue) = self.agents.get(entry.id()).map(|q| q.value().clone()) else {
            return 0;
        };
        let mut released = 0;
        let mut q = lock(&queue);
        while let Some(front) = q.waiters.front() {
            if front.tx.is_closed() {
                q.waiters.pop_front();
                continue;
            }
            let admission = ledger.admit(entry, budget, now, front.estimate_tokens);
            if !matches!(
                admission.decision,
                Decision::Allow | Decision::Warn | Decision::Degrade(_)
            ) {
                break;
            }
            if let Some(w) = q.waiters.pop_front() {
                // A waiter that left between the check and now drops the reservation.
                let _ = w.tx.send(admission);
                released += 1;
            }
        }
        released
    }

    /// Tell the deferred-job runner that budget may have returned.
    pub fn wake_jobs(&self) {
        if self.jobs_pending.load(Ordering::Relaxed) > 0 {
            self.jobs.notify_one();
        }
    }

    /// Deferred jobs waiting for budget.
    pub fn jobs_pending(&self) -> u64 {
        self.jobs_pending.load(Ordering::Relaxed)
    }

    /// Set the number of deferred jobs waiting (at start-up, from the store).
    pub fn set_jobs_pending(&self, n: u64) {
        self.jobs_pending.store(n, Ordering::Relaxed);
    }

    /// A deferred job was stored.
    pub fn job_added(&self) {
        self.jobs_pending.fetch_add(1, Ordering::Relaxed);
    }

    /// A deferred job left the pending state for good (done or cancelled).
    pub fn job_settled(&self) {
        let _ = self
            .jobs_pending
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1));
    }

    /// Resolves when [`Queues::wake_jobs`] was called.
    pub async fn jobs_woken(&self) {
        self.jobs.notified().await;
    }

    /// [`Queues::release`] for `agent` under `config` (and a wake-up for deferred jobs).
    pub fn release_agent(
        &self,
        ledger: &Ledger,
        config: &Config,
        agent: &str,
        now: DateTime<Utc>,
    ) -> usize {
        self.wake_jobs();
        if !self.has_waiters(agent) {
            return 0;
        }
        let budget = config.budget_for(agent);
        match ledger.entry(agent, &budget.period, now, None) {
            Ok(entry) => self.release(ledger, &entry, budget, now),
            Err(_) => 0,
        }
    }

    /// Release every agent with parked requests (after a config change or a tick).
    pub fn release_all(&self, ledger: &Ledger, config: &Config, now: DateTime<Utc>) -> usize {
        self.agents_waiting()
            .iter()
            .map(|a| self.release_agent(ledger, config, a, now))
            .sum()
    }

    /// Arm a one-shot timer that releases `agent` at `resets_at` (once per period end).
    /// `on_fire` runs at that time; it should call [`Queues::release`].
    pub fn arm_reset_timer(
        &self,
        agent: &Arc<str>,
        resets_at: DateTime<Utc>,
        now: DateTime<Utc>,
        on_fire: impl FnOnce() + Send + 'static,
    ) {
        let queue = self.queue(agent);
        {
            let mut q = lock(&queue);
            if q.timer_for == Some(resets_at) {
                return;
            }
            q.timer_for = Some(resets_at);
        }
        let wait = (resets_at - now).to_std().unwrap_or_default();
        tokio::spawn(async move {
            tokio::time::sleep(wait).await;
            lock(&queue).timer_for = None;
            on_fire();
        });
    }

    /// Agents with parked requests.
    pub fn agents_waiting(&self) -> Vec<Arc<str>> {
        self.agents
            .iter()
            .filter(|e| !lock(e.value()).waiters.is_empty())
            .map(|e| e.key().clone())
            .collect()
    }

    /// Wake every parked request with [`Wait::ShuttingDown`].
    pub fn shut_down(&self) {
        let _ = self.shutdown.send(true);
    }
}
