//! Write-behind: the hot path merges [`StoreOp`]s into a shared batch; one task takes the
//! batch every flush interval and applies it in one transaction on the blocking pool.
//! A `kill -9` loses at most one interval; [`Writer::flush`] writes everything sent so far.

use super::{Store, StoreOp, UsageDelta};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, Notify};

/// The sending side, cheap to clone.
#[derive(Clone)]
pub struct Writer {
    /// The ops waiting for the next flush, merged as they are sent, under a lock held for
    /// one merge. (A channel cost several atomics per op that the I/O threads contended
    /// for, and the batching task then freed each op's strings on another thread than the
    /// one that allocated them.) One lock keeps the ops in the order they were sent.
    pending: Arc<Mutex<Batch>>,
    /// Flush requests; closed when every writer is gone, which ends the task.
    flushes: mpsc::UnboundedSender<oneshot::Sender<()>>,
    /// Wakes the batching task for a flush (ops alone wait for the tick).
    flush_now: Arc<Notify>,
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
        let (flushes, rx) = mpsc::unbounded_channel();
        let pending = Arc::new(Mutex::new(Batch::default()));
        let flush_now = Arc::new(Notify::new());
        let handle = tokio::spawn(run(
            store,
            pending.clone(),
            rx,
            flush_now.clone(),
            flush_interval,
        ));
        let writer = Writer {
            pending,
            flushes,
            flush_now,
        };
        (writer, handle)
    }

    /// Queue an operation (never blocks on I/O). Lost only if the task is gone, which is
    /// logged.
    pub fn send(&self, op: StoreOp) {
        if self.flushes.is_closed() {
            tracing::error!(target: "store", "store writer is gone; usage not persisted");
            return;
        }
        lock(&self.pending).push(op);
    }

    /// Write everything sent so far and wait until it is on disk.
    pub async fn flush(&self) {
        let (done, wait) = oneshot::channel();
        if self.flushes.send(done).is_ok() {
            self.flush_now.notify_one();
            let _ = wait.await;
        }
    }
}

fn lock(batch: &Mutex<Batch>) -> MutexGuard<'_, Batch> {
    batch.lock().unwrap_or_else(PoisonError::into_inner)
}

async fn run(
    store: Arc<dyn Store>,
    pending: Arc<Mutex<Batch>>,
    mut flushes: mpsc::UnboundedReceiver<oneshot::Sender<()>>,
    flush_now: Arc<Notify>,
    every: Duration,
) {
    // The first tick one interval from now (nothing is pending at the start).
    let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let mut waiters = Vec::new();
        let mut ticked = false;
        // Wake on the tick or a flush request only, never per op.
        tokio::select! {
            _ = ticker.tick() => ticked = true,
            _ = flush_now.notified() => {}
        }
        let mut closed = false;
        loop {
            match flushes.try_recv() {
                Ok(done) => waiters.push(done),
                Err(mpsc::error::TryRecvError::Empty) => break,
                Err(mpsc::error::TryRecvError::Disconnected) => {
                    closed = true;
                    break;
                }
            }
        }
        if closed || ticked || !waiters.is_empty() {
            // Taken after the flush requests were read: the ops sent before them are in it.
            let batch = lock(&pending).take();
            if !batch.is_empty() {
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
                        // Back in front of the ops sent since, in order.
                        let mut pending = lock(&pending);
                        let newer = pending.take();
                        for op in batch.into_iter().chain(newer) {
                            pending.push(op);
                        }
                    }
                    Err(e) => tracing::error!(target: "store", error = %e, "store task panicked"),
                }
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

/// The key of a usage row: agent, period start, model, hour.
type RowKey = (String, i64, String, i64);

/// A [`RowKey`] borrowed from a delta: looked up without allocating. Hashes as the tuple
/// does (field by field, in order), as `Equivalent` requires.
#[derive(Hash)]
struct RowRef<'a>(&'a str, i64, &'a str, i64);

impl hashbrown::Equivalent<RowKey> for RowRef<'_> {
    fn equivalent(&self, k: &RowKey) -> bool {
        self.0 == k.0 && self.1 == k.1 && self.2 == k.2 && self.3 == k.3
    }
}

/// The ops waiting for the next flush, merged as they arrive: `Add`s to the same row that
/// are not separated by a rekey or reset become one, so a busy agent costs one upsert per
/// flush, and the batch holds one op per row, not one per request (a queue of every
/// request's op grew by re-allocation to megabytes between flushes under load).
#[derive(Default)]
struct Batch {
    ops: Vec<StoreOp>,
    /// Where each row's `Add` is in `ops`, since the last rekey or reset.
    rows: hashbrown::HashMap<RowKey, usize, foldhash::fast::RandomState>,
}

impl Batch {
    fn push(&mut self, op: StoreOp) {
        match op {
            StoreOp::Add(d) => {
                let at = self
                    .rows
                    .get(&RowRef(&d.agent, d.period_start, &d.model, d.hour_start))
                    .copied();
                if let Some(StoreOp::Add(acc)) = at.and_then(|i| self.ops.get_mut(i)) {
                    add_into(acc, &d);
                    return;
                }
                let key = (
                    d.agent.clone(),
                    d.period_start,
                    d.model.clone(),
                    d.hour_start,
                );
                self.rows.insert(key, self.ops.len());
                self.ops.push(StoreOp::Add(d));
            }
            // An alert touches no usage row: Adds on either side still merge.
            alert @ StoreOp::Alert(_) => self.ops.push(alert),
            other => {
                self.rows.clear();
                self.ops.push(other);
            }
        }
    }

    /// The merged ops, in order; the batch is empty after.
    fn take(&mut self) -> Vec<StoreOp> {
        self.rows.clear();
        std::mem::take(&mut self.ops)
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{AlertRow, PeriodRow, StoreError, UsageQuery, UsageRow};

    fn add(agent: &str, model: &str, hour: i64, tokens: u64) -> StoreOp {
        StoreOp::Add(UsageDelta {
            agent: agent.into(),
            period_start: 100,
            model: model.into(),
            hour_start: hour,
            total_tokens: tokens,
            requests: 1,
            ..Default::default()
        })
    }

    /// Agent, model, total tokens and requests of an `Add`.
    type Totals = (String, String, u64, u64);

    fn totals(ops: &[StoreOp]) -> Vec<Totals> {
        ops.iter()
            .filter_map(|op| match op {
                StoreOp::Add(d) => {
                    Some((d.agent.clone(), d.model.clone(), d.total_tokens, d.requests))
                }
                _ => None,
            })
            .collect()
    }

    #[test]
    fn adds_to_one_row_merge_as_they_arrive_and_others_stay_apart() {
        let mut b = Batch::default();
        for op in [
            add("a", "m", 0, 1),
            add("b", "m", 0, 10),
            add("a", "m", 0, 2),
            add("a", "n", 0, 100),
            add("a", "m", 3600, 1000),
            StoreOp::Alert(AlertRow::default()),
            add("a", "m", 0, 4),
        ] {
            b.push(op);
        }
        let ops = b.take();
        assert_eq!(
            totals(&ops),
            [
                ("a".into(), "m".into(), 7, 3),
                ("b".into(), "m".into(), 10, 1),
                ("a".into(), "n".into(), 100, 1),
                ("a".into(), "m".into(), 1000, 1),
            ]
        );
        assert_eq!(ops.len(), 5, "the alert is kept");
        assert!(b.take().is_empty());
    }

    #[test]
    fn a_rekey_or_reset_separates_the_adds_around_it() {
        let mut b = Batch::default();
        b.push(add("a", "m", 0, 1));
        b.push(StoreOp::Reset {
            agent: "a".into(),
            period_start: 100,
        });
        b.push(add("a", "m", 0, 2));
        b.push(add("a", "m", 0, 3));
        let ops = b.take();
        assert!(matches!(ops[1], StoreOp::Reset { .. }));
        assert_eq!(
            totals(&ops),
            [
                ("a".into(), "m".into(), 1, 1),
                ("a".into(), "m".into(), 5, 2)
            ]
        );
        // After a flush, rows start over.
        b.push(add("a", "m", 0, 9));
        assert_eq!(totals(&b.take()), [("a".into(), "m".into(), 9, 1)]);
    }

    /// A store whose first write fails; it keeps what the later ones wrote.
    #[derive(Default)]
    struct FlakyStore {
        writes: Mutex<usize>,
        applied: Mutex<Vec<Vec<Totals>>>,
    }

    impl Store for FlakyStore {
        fn usage(&self, _: &UsageQuery) -> Result<Vec<UsageRow>, StoreError> {
            Ok(Vec::new())
        }
        fn ping(&self) -> Result<(), StoreError> {
            Ok(())
        }
        fn load_latest(&self) -> Result<Vec<PeriodRow>, StoreError> {
            Ok(Vec::new())
        }
        fn apply(&self, ops: &[StoreOp]) -> Result<(), StoreError> {
            let mut writes = self.writes.lock().unwrap_or_else(PoisonError::into_inner);
            *writes += 1;
            if *writes == 1 {
                return Err(StoreError::Task("disk full".into()));
            }
            let mut applied = self.applied.lock().unwrap_or_else(PoisonError::into_inner);
            applied.push(totals(ops));
            Ok(())
        }
    }

    #[tokio::test]
    async fn a_failed_write_is_retried_in_front_of_the_ops_sent_since() {
        let store = Arc::new(FlakyStore::default());
        // Only flushes write: the interval is longer than the test.
        let (writer, _task) = Writer::start(store.clone(), Duration::from_secs(3600));
        writer.send(add("a", "m", 0, 1));
        writer.send(add("b", "m", 0, 10));
        writer.flush().await;
        let applied = |s: &FlakyStore| {
            s.applied
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clone()
        };
        assert!(applied(&store).is_empty(), "the first write failed");
        writer.send(add("a", "m", 0, 2));
        writer.send(add("c", "m", 0, 100));
        writer.flush().await;
        assert_eq!(
            applied(&store),
            [vec![
                ("a".to_string(), "m".to_string(), 3, 2),
                ("b".to_string(), "m".to_string(), 10, 1),
                ("c".to_string(), "m".to_string(), 100, 1),
            ]]
        );
        writer.flush().await;
        assert_eq!(applied(&store).len(), 1, "nothing is written twice");
    }
}
