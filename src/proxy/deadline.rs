//! The upstream timeout of a pool's requests, kept by one timer for all of them.
//!
//! Why not `tokio::time::timeout`: it gives every request a timer entry of its own in the
//! runtime's timer wheel, registered under the driver's lock when first polled and taken
//! out under it again when the response comes: ~730 instructions and 7.5 atomic
//! read-modify-writes per request more than no timeout at all (release build, 256
//! connections; this list: ~320 and 2.9; benches/README.md, "Twelfth round"). Yet the
//! requests of a pool all wait the same `--upstream-timeout`, so their deadlines come in
//! about the order they were sent, and a timer only needs the earliest. Here a waiting
//! request is a node in a list kept in deadline order (new nodes go at the end, after a
//! comparison or two); one task per pool sleeps until the first deadline, wakes the
//! requests whose deadline passed and unlinks them. A request that gets its answer first
//! unlinks itself at once, so the list holds the requests in flight, never the ones that
//! finished.
//!
//! The timer task wakes only when a deadline is due, or when a request comes in with a
//! deadline earlier than the one it sleeps until. After a deadline-free look it sleeps one
//! `horizon` (the timeout the pool's requests wait: no request sent later is due before
//! that), so a steady flow of requests does not wake it per request; a pool idle for a
//! whole horizon lets the task wait for the next request instead.
//!
//! The task runs on the runtime of the request that started it (a pool of an I/O thread:
//! that thread's). Should that runtime shut down and drop it, the next request starts
//! another.

use std::future::{poll_fn, Future};
use std::pin::pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};

/// The deadlines of one pool's requests (see the module doc).
#[derive(Debug)]
pub struct Deadlines {
    state: Arc<Mutex<State>>,
    /// How long after it looks the timer may sleep when no request waits: no request sent
    /// after the look is due before it (the pool's `--upstream-timeout`).
    horizon: Duration,
}

/// No node (the end of a list).
const NIL: u32 = u32::MAX;

/// The waiting requests: a list of nodes in deadline order, earliest first, its nodes in
/// one vector (a slot is reused when its request is done). A request's node is its own
/// from its first wait to its end: the timer unlinks the node of a request that is due and
/// wakes it; the request frees the node.
#[derive(Debug)]
struct State {
    nodes: Vec<Node>,
    /// The first free slot (free slots are chained through `next`).
    free: u32,
    head: u32,
    tail: u32,
    /// When the timer task will look next (`None`: when a request comes).
    armed: Option<Instant>,
    /// The timer task's waker, for a request whose deadline is earlier than `armed`.
    timer: Option<Waker>,
    /// Whether a timer task runs.
    running: bool,
    /// A request came since the timer last looked.
    busy: bool,
}

#[derive(Debug)]
struct Node {
    at: Instant,
    /// `None` once the timer took the request out of the list: it is due.
    waker: Option<Waker>,
    prev: u32,
    next: u32,
}

impl Default for State {
    fn default() -> Self {
        Self {
            nodes: Vec::new(),
            free: NIL,
            head: NIL,
            tail: NIL,
            armed: None,
            timer: None,
            running: false,
            busy: false,
        }
    }
}

fn idx(i: u32) -> usize {
    i as usize
}

impl State {
    /// A node for a request due `at`, linked in deadline order (from the end: requests
    /// come in about their deadlines' order).
    fn insert(&mut self, at: Instant, waker: Waker) -> u32 {
        let mut after = self.tail;
        while after != NIL && self.nodes[idx(after)].at > at {
            after = self.nodes[idx(after)].prev;
        }
        let next = match after {
            NIL => self.head,
            a => self.nodes[idx(a)].next,
        };
        let node = Node {
            at,
            waker: Some(waker),
            prev: after,
            next,
        };
        let i = match self.free {
            NIL => {
                self.nodes.push(node);
                // (Memory runs out long before 2^32 requests are in flight.)
                u32::try_from(self.nodes.len() - 1).unwrap_or(NIL)
            }
            f => {
                self.free = self.nodes[idx(f)].next;
                self.nodes[idx(f)] = node;
                f
            }
        };
        self.join(after, i);
        self.join(i, next);
        i
    }

    /// Take node `i` out of the list (it stays the request's).
    fn unlink(&mut self, i: u32) {
        let Node { prev, next, .. } = self.nodes[idx(i)];
        self.join(prev, next);
    }

    /// Make `b` follow `a` (`NIL` for `a`: `b` is the head; for `b`: `a` is the tail).
    fn join(&mut self, a: u32, b: u32) {
        match a {
            NIL => self.head = b,
            a => self.nodes[idx(a)].next = b,
        }
        match b {
            NIL => self.tail = a,
            b => self.nodes[idx(b)].prev = a,
        }
    }

    /// The request is done with node `i`: out of the list if it is still in, slot freed.
    fn release(&mut self, i: u32) {
        if self.nodes[idx(i)].waker.take().is_some() {
            self.unlink(i);
        }
        self.nodes[idx(i)].next = self.free;
        self.free = i;
    }
}

fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    // A panic cannot leave the list half linked (nothing in between panics): use it as it is.
    state.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Deadlines {
    /// Deadlines of requests that wait `horizon` (or longer; a shorter wait is kept too,
    /// at the cost of a timer wake-up).
    pub fn new(horizon: Duration) -> Self {
        Self {
            state: Arc::default(),
            horizon,
        }
    }

    /// The deadline of a request sent at `sent` that waits `horizon`: `None` (no deadline)
    /// when it is too far to add to the clock, as `tokio::time::timeout` has it.
    pub fn after(&self, sent: Instant) -> Option<Instant> {
        sent.checked_add(self.horizon)
    }

    /// Run `fut` until it completes (`Some`) or `at` passes (`None`; `fut` is dropped).
    /// `at: None` is no deadline. Like `tokio::time::timeout_at`, `fut` is polled first,
    /// so one that is ready is never cut short, whatever the clock says.
    pub async fn within<F: Future + Unpin>(
        &self,
        at: Option<Instant>,
        mut fut: F,
    ) -> Option<F::Output> {
        let Some(at) = at else {
            return Some(fut.await);
        };
        let mut entry = Entry {
            deadlines: self,
            node: NIL,
        };
        poll_fn(|cx| {
            if let Poll::Ready(out) = std::pin::Pin::new(&mut fut).poll(cx) {
                return Poll::Ready(Some(out));
            }
            if entry.wait(at, cx.waker()) {
                Poll::Pending
            } else {
                Poll::Ready(None)
            }
        })
        .await
        // `entry` frees its node here.
    }

    /// The requests waiting now.
    #[cfg(test)]
    fn waiting(&self) -> usize {
        let st = lock(&self.state);
        let (mut n, mut i) = (0, st.head);
        while i != NIL {
            n += 1;
            i = st.nodes[idx(i)].next;
        }
        n
    }

    /// Start the timer task on the current runtime (with none, requests wait unbounded: the
    /// upstream's I/O needs a runtime anyway).
    fn start_timer(&self) {
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            lock(&self.state).running = false;
            return;
        };
        rt.spawn(timer(Arc::downgrade(&self.state), self.horizon));
    }
}

impl Drop for Deadlines {
    /// Wake the timer task so that it ends (it holds the state weakly).
    fn drop(&mut self) {
        let timer = lock(&self.state).timer.take();
        if let Some(w) = timer {
            w.wake();
        }
    }
}

/// One request's node (`NIL` before its first wait).
struct Entry<'a> {
    deadlines: &'a Deadlines,
    node: u32,
}

impl Entry<'_> {
    /// Wait with `waker` (entering the list on the first call). False: the deadline passed.
    fn wait(&mut self, at: Instant, waker: &Waker) -> bool {
        let d = self.deadlines;
        let mut st = lock(&d.state);
        let kick = if self.node == NIL {
            self.node = st.insert(at, waker.clone());
            st.busy = true;
            // Earlier than the timer will look: tell it.
            if st.armed.is_none_or(|armed| at < armed) {
                st.armed = Some(at);
                st.timer.take()
            } else {
                None
            }
        } else {
            let Some(w) = st.nodes[idx(self.node)].waker.as_mut() else {
                // The timer took it out: due.
                return false;
            };
            if !w.will_wake(waker) {
                w.clone_from(waker);
            }
            None
        };
        // Marked running only by a request that waits, which then starts the timer.
        let start = !std::mem::replace(&mut st.running, true);
        drop(st);
        if start {
            d.start_timer();
        } else if let Some(w) = kick {
            w.wake();
        }
        true
    }
}

impl Drop for Entry<'_> {
    fn drop(&mut self) {
        if self.node != NIL {
            lock(&self.deadlines.state).release(self.node);
        }
    }
}

/// The timer task: wake the requests that are due, sleep until the next deadline or until
/// a request with an earlier one comes; end with the pool.
async fn timer(state: Weak<Mutex<State>>, horizon: Duration) {
    // Dropped with the task (also when its runtime shuts down): the next request starts
    // another.
    struct Running(Weak<Mutex<State>>);
    impl Drop for Running {
        fn drop(&mut self) {
            if let Some(state) = self.0.upgrade() {
                let mut st = lock(&state);
                st.running = false;
                st.armed = None;
                st.timer = None;
            }
        }
    }
    let _running = Running(state.clone());
    let mut sleep = pin!(tokio::time::sleep(Duration::ZERO));
    let mut due = Vec::new();
    loop {
        let Some(strong) = state.upgrade() else {
            return;
        };
        let now = Instant::now();
        let next = {
            let mut st = lock(&strong);
            while st.head != NIL && st.nodes[idx(st.head)].at <= now {
                let i = st.head;
                st.unlink(i);
                due.extend(st.nodes[idx(i)].waker.take());
            }
            let next = match st.head {
                // Requests came since the last look: more will, none due before this.
                NIL if st.busy => now.checked_add(horizon),
                NIL => None,
                h => Some(st.nodes[idx(h)].at),
            };
            st.busy = false;
            st.armed = next;
            next
        };
        drop(strong);
        for waker in due.drain(..) {
            waker.wake();
        }
        if let Some(at) = next {
            sleep.as_mut().reset(tokio::time::Instant::from_std(at));
        }
        poll_fn(|cx| {
            if next.is_some() && sleep.as_mut().poll(cx).is_ready() {
                return Poll::Ready(());
            }
            let Some(strong) = state.upgrade() else {
                return Poll::Ready(());
            };
            let mut st = lock(&strong);
            if st.armed != next {
                // A request due earlier came.
                return Poll::Ready(());
            }
            match &mut st.timer {
                Some(w) if w.will_wake(cx.waker()) => {}
                t => *t = Some(cx.waker().clone()),
            }
            Poll::Pending
        })
        .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::pin::Pin;

    const LONG: Duration = Duration::from_secs(600);

    /// The deadlines in the list, first to last.
    fn order(st: &State) -> Vec<Instant> {
        let (mut out, mut i) = (Vec::new(), st.head);
        while i != NIL {
            out.push(st.nodes[idx(i)].at);
            i = st.nodes[idx(i)].next;
        }
        out
    }

    #[test]
    fn the_list_keeps_deadline_order_and_reuses_freed_slots() {
        let t = Instant::now();
        let at = |ms| t + Duration::from_millis(ms);
        let mut st = State::default();
        let waker = Waker::noop();
        let late = st.insert(at(30), waker.clone());
        let early = st.insert(at(10), waker.clone());
        let middle = st.insert(at(20), waker.clone());
        let last = st.insert(at(30), waker.clone());
        assert_eq!(order(&st), [at(10), at(20), at(30), at(30)]);
        // Equal deadlines keep their arrival order.
        assert_eq!(st.tail, last);
        st.release(middle);
        assert_eq!(order(&st), [at(10), at(30), at(30)]);
        // The timer unlinks a due node; its request frees it later.
        st.unlink(early);
        st.nodes[idx(early)].waker = None;
        assert_eq!(order(&st), [at(30), at(30)]);
        assert_eq!(st.head, late);
        st.release(early);
        assert_eq!(order(&st), [at(30), at(30)]);
        // Freed slots are taken again before the vector grows.
        let again = st.insert(at(5), waker.clone());
        let again2 = st.insert(at(40), waker.clone());
        assert!([early, middle].contains(&again) && [early, middle].contains(&again2));
        assert_eq!(st.nodes.len(), 4);
        assert_eq!(order(&st), [at(5), at(30), at(30), at(40)]);
        for i in [late, last, again, again2] {
            st.release(i);
        }
        assert_eq!((st.head, st.tail), (NIL, NIL));
    }

    #[tokio::test]
    async fn a_request_past_its_deadline_ends_and_leaves_the_list() {
        let d = Deadlines::new(Duration::from_millis(50));
        let start = Instant::now();
        let at = start + Duration::from_millis(50);
        let out = d.within(Some(at), std::future::pending::<()>()).await;
        assert_eq!(out, None);
        assert!(Instant::now() >= at, "ended before its deadline");
        assert_eq!(d.waiting(), 0);
    }

    #[tokio::test]
    async fn a_request_answered_in_time_leaves_the_list_at_once() {
        let d = Deadlines::new(LONG);
        let (tx, rx) = tokio::sync::oneshot::channel::<u32>();
        let waiting = d.within(Some(Instant::now() + LONG), rx);
        let mut waiting = pin!(waiting);
        // Polled once: pending, so it is in the map.
        assert!(poll_once(waiting.as_mut()).await.is_none());
        assert_eq!(d.waiting(), 1);
        tx.send(7).expect("receiver alive");
        assert_eq!(waiting.await, Some(Ok(7)));
        assert_eq!(d.waiting(), 0);
    }

    #[tokio::test]
    async fn a_dropped_request_leaves_the_list() {
        let d = Deadlines::new(LONG);
        {
            let waiting = d.within(Some(Instant::now() + LONG), std::future::pending::<()>());
            let mut waiting = pin!(waiting);
            assert!(poll_once(waiting.as_mut()).await.is_none());
            assert_eq!(d.waiting(), 1);
        }
        assert_eq!(d.waiting(), 0);
    }

    #[tokio::test]
    async fn a_ready_request_is_not_cut_short_by_a_passed_deadline() {
        let d = Deadlines::new(LONG);
        let past = Instant::now();
        assert_eq!(d.within(Some(past), Box::pin(async { 3 })).await, Some(3));
        assert_eq!(d.within(None, Box::pin(async { 4 })).await, Some(4));
        assert_eq!(d.waiting(), 0);
    }

    #[tokio::test]
    async fn an_earlier_deadline_that_comes_later_wakes_the_timer() {
        // The timer sleeps until the first request's deadline (10 minutes); the second
        // request is due in 50 ms and must not wait for the first.
        let d = Arc::new(Deadlines::new(LONG));
        let first = {
            let d = d.clone();
            tokio::spawn(async move {
                d.within(Some(Instant::now() + LONG), std::future::pending::<()>())
                    .await
            })
        };
        // Wait until the first is in the map (an event, not a sleep).
        while d.waiting() < 1 {
            tokio::task::yield_now().await;
        }
        let at = Instant::now() + Duration::from_millis(50);
        // A guard against a timer that missed the kick (it would sleep for 10 minutes).
        let second = d.within(Some(at), std::future::pending::<()>());
        let out = tokio::time::timeout(Duration::from_secs(60), second)
            .await
            .expect("the timer slept past the earlier deadline");
        assert_eq!(out, None);
        assert!(Instant::now() >= at);
        assert_eq!(d.waiting(), 1, "the first request still waits");
        first.abort();
        assert!(first.await.is_err_and(|e| e.is_cancelled()));
        assert_eq!(d.waiting(), 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn many_requests_due_together_all_end() {
        let d = Arc::new(Deadlines::new(Duration::from_millis(30)));
        let at = Instant::now() + Duration::from_millis(30);
        let tasks: Vec<_> = (0..500)
            .map(|i| {
                let d = d.clone();
                tokio::spawn(async move {
                    // Every other request is answered in time.
                    let fut = async move {
                        if i % 2 == 0 {
                            std::future::pending::<u32>().await
                        } else {
                            i
                        }
                    };
                    d.within(Some(at), Box::pin(fut)).await
                })
            })
            .collect();
        for (i, t) in tasks.into_iter().enumerate() {
            let out = t.await.expect("task ran");
            let i = u32::try_from(i).expect("small");
            assert_eq!(out, (i % 2 == 1).then_some(i));
        }
        assert_eq!(d.waiting(), 0);
    }

    #[test]
    fn the_timer_starts_again_on_a_new_runtime() {
        // The first runtime's shutdown drops the timer task; the next request, on another
        // runtime, must get a timer of its own.
        let d = Deadlines::new(Duration::from_millis(20));
        for _ in 0..2 {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_time()
                .build()
                .expect("runtime");
            let out = rt.block_on(d.within(
                Some(Instant::now() + Duration::from_millis(20)),
                std::future::pending::<()>(),
            ));
            assert_eq!(out, None);
            drop(rt);
            assert!(!lock(&d.state).running, "the timer ended with its runtime");
        }
    }

    #[test]
    fn a_request_found_due_on_a_new_runtime_leaves_no_phantom_timer() {
        // The first runtime's timer takes the request out, then that runtime goes away
        // before the request looks again; the request, polled on a second runtime, finds
        // itself due. It must not mark a timer as running: the next request needs one.
        let d = Deadlines::new(Duration::from_millis(20));
        let rt = || {
            tokio::runtime::Builder::new_current_thread()
                .enable_time()
                .build()
                .expect("runtime")
        };
        let first_rt = rt();
        let at = Instant::now() + Duration::from_millis(20);
        let mut first = Box::pin(d.within(Some(at), std::future::pending::<()>()));
        first_rt.block_on(async {
            assert!(poll_once(first.as_mut()).await.is_none());
            // Let the timer run until it has taken the request out (an event, awaited).
            while d.waiting() > 0 {
                tokio::task::yield_now().await;
            }
        });
        drop(first_rt);
        let second_rt = rt();
        assert_eq!(second_rt.block_on(first), None);
        assert!(!lock(&d.state).running);
        let next = d.within(
            Some(Instant::now() + Duration::from_millis(20)),
            std::future::pending::<()>(),
        );
        let out = second_rt.block_on(async {
            tokio::time::timeout(Duration::from_secs(60), next)
                .await
                .expect("the next request got no timer")
        });
        assert_eq!(out, None);
    }

    /// Poll `fut` once: its output if it is ready.
    async fn poll_once<F: Future + Unpin>(mut fut: F) -> Option<F::Output> {
        poll_fn(|cx| {
            Poll::Ready(match Pin::new(&mut fut).poll(cx) {
                Poll::Ready(v) => Some(v),
                Poll::Pending => None,
            })
        })
        .await
    }
}
