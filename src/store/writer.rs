//! Write-behind: the hot path sends [`StoreOp`]s into a channel; one task batches them and
//! applies each batch in one transaction on the blocking pool, every flush interval.
//! A `kill -9` loses at most one interval; [`Writer::close`] flushes everything.

use super::{Store, StoreOp, UsageDelta};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};

enum Msg {
    Op(StoreOp),
    Flush(oneshot::Sender<()>),
}

/// The sending side, cheap to clone.
#[derive(Clone)]
pub struct Writer {
    tx: mpsc::UnboundedSender<Msg>,
    /// Wakes the batching task for a flush (ops alone wait for the tick).
    flush_now: Arc<tokio::sync::Notify>,
}

impl std::fmt::Debug for Writer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Writer")
    }
}

impl Writer {
    /// Start the batching task on the current runtime.
    pub fn start(
        store: Arc<dyn Store>,
        flush_interval: Duration,
    ) -> (Writer, tokio::task::JoinHandle<()>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let flush_now = Arc::new(tokio::sync::Notify::new());
        let handle = tokio::spawn(run(store, rx, flush_now.clone(), flush_interval));
        (Writer { tx, flush_now }, handle)
    }

    /// Queue an operation (never blocks). Lost only if the task is gone, which is logged.
    pub fn send(&self, op: StoreOp) {
        if self.tx.send(Msg::Op(op)).is_err() {
            tracing::error!(target: "store", "store writer is gone; usage not persisted");
        }
    }

    /// Write everything queued so far and wait until it is on disk.
    pub async fn flush(&self) {
        let (done, wait) = oneshot::channel();
        if self.tx.send(Msg::Flush(done)).is_ok() {
            self.flush_now.notify_one();
            let _ = wait.await;
        }
    }
}

async fn run(
    store: Arc<dyn Store>,
    mut rx: mpsc::UnboundedReceiver<Msg>,
    flush_now: Arc<tokio::sync::Notify>,
    every: Duration,
) {
    let mut pending: Vec<StoreOp> = Vec::new();
    let mut ticker = tokio::time::interval(every);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let mut waiters = Vec::new();
        let mut ticked = false;
        // Wake on the tick or a flush request only, never per op: the hot path's sends
        // cost no task wake-up; ops wait in the channel until the next batch.
        tokio::select! {
            _ = ticker.tick() => ticked = true,
            _ = flush_now.notified() => {}
        }
        let mut closed = false;
        loop {
            match rx.try_recv() {
                Ok(Msg::Op(op)) => pending.push(op),
                Ok(Msg::Flush(done)) => waiters.push(done),
                Err(mpsc::error::TryRecvError::Empty) => break,
                Err(mpsc::error::TryRecvError::Disconnected) => {
                    closed = true;
                    break;
                }
            }
        }
        let due = closed || ticked || !waiters.is_empty();
        if due && !pending.is_empty() {
            let batch = coalesce(std::mem::take(&mut pending));
            let store = store.clone();
            let result = tokio::task::spawn_blocking(move || {
                let r = store.apply(&batch);
                (r, batch)
            })
            .await;
            match result {
                Ok((Ok(()), _)) => {}
                Ok((Err(e), batch)) => {
                    tracing::error!(target: "store", error = %e, "store write failed; will retry");
                    pending = batch;
                }
                Err(e) => tracing::error!(target: "store", error = %e, "store task panicked"),
            }
        }
        for w in waiters {
            let _ = w.send(());
        }
        if closed {
            return;
        }
    }
}

/// Merge `Add`s to the same row that are not separated by a rekey or reset, so a busy agent
/// costs one upsert per flush instead of one per request.
fn coalesce(ops: Vec<StoreOp>) -> Vec<StoreOp> {
    let mut out: Vec<StoreOp> = Vec::with_capacity(ops.len());
    let mut index: HashMap<(String, i64, String, i64), usize> = HashMap::new();
    for op in ops {
        match op {
            StoreOp::Add(d) => {
                let key = (
                    d.agent.clone(),
                    d.period_start,
                    d.model.clone(),
                    d.hour_start,
                );
                match index.get(&key) {
                    Some(&i) => {
                        if let Some(StoreOp::Add(acc)) = out.get_mut(i) {
                            add_into(acc, &d);
                        }
                    }
                    None => {
                        index.insert(key, out.len());
                        out.push(StoreOp::Add(d));
                    }
                }
            }
            // An alert touches no usage row: Adds on either side still merge.
            alert @ StoreOp::Alert(_) => out.push(alert),
            other => {
                index.clear();
                out.push(other);
            }
        }
    }
    out
}

fn add_into(acc: &mut UsageDelta, d: &UsageDelta) {
    acc.period_end = d.period_end;
    acc.prompt_tokens += d.prompt_tokens;
    acc.completion_tokens += d.completion_tokens;
    acc.cached_tokens += d.cached_tokens;
    acc.total_tokens += d.total_tokens;
    acc.requests += d.requests;
    acc.blocked += d.blocked;
    acc.cost_pico += d.cost_pico;
}
