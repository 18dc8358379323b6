//! Row changes written straight to a connection's socket.
//!
//! A fan-out woke one task per connection to move each change from a queue
//! into its socket: scheduling, the engine's pass, the queue and the
//! WebSocket library's copy cost ~4.5 µs per delivery, a third of the
//! server's CPU at 10,000 subscribers, where the kernel's write is the rest
//! (aether-bench fan-out against its null server). A connection whose task
//! sleeps with nothing owed can be *claimed*: the router takes the socket
//! for one change and writer tasks write it there, in runs taken oldest
//! first. Order holds because a claim needs an empty queue and a claimed
//! connection's next item goes to the queue, which its task reads only once
//! the claim is over.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use crate::routed::Routed;

/// A connection's socket as the router may write to it.
pub trait Direct: Send + Sync {
    /// Takes the socket for one write if the connection's task sleeps with
    /// nothing owed; a `true` must be followed by [`deliver`](Self::deliver)
    /// or [`abandon`](Self::abandon).
    fn claim(&self) -> bool;
    /// Writes `change` for `subscription` (a claim is held) and gives the
    /// socket back; what the socket did not take is owed to the connection's
    /// task, which writes it before anything else. Counts it in `tally`.
    fn deliver(&self, subscription: &str, change: &Routed, tally: &mut Tally);
    /// Gives a claim back without writing its change (its run dropped with
    /// the writers at shutdown, a panic while writing). The change counts as sent to the
    /// connection, so the connection must end, and its client resume from
    /// the log, or it would miss the change.
    fn abandon(&self);
    /// Adds a run's tally to the counters of every connection like this one:
    /// called once per run, on the run's first connection.
    fn settle(&self, tally: &Tally);
}

/// What a run's writes came to, reported once at its end: counters shared
/// by every connection, bumped per delivery from two cores at once, bounce
/// between them (and the histogram's lookups cost more than the count).
#[derive(Debug, Default)]
pub struct Tally {
    /// Changes handed to sockets, whole or partly owed.
    pub written: u64,
    /// Milliseconds from commit to write, each with how many writes in a row
    /// took that long.
    pub latencies_ms: Vec<(i64, u64)>,
}

impl Tally {
    /// One change handed over, `latency_ms` after its commit.
    pub fn wrote(&mut self, latency_ms: i64) {
        self.written += 1;
        match self.latencies_ms.last_mut() {
            Some((ms, n)) if *ms == latency_ms => *n += 1,
            _ => self.latencies_ms.push((latency_ms, 1)),
        }
    }
}

/// Claims are handed to writers in runs of at most this many: the first
/// write starts while the offer loop is still claiming, and the last runs of
/// a change are small enough for both cores to finish together.
pub(crate) const BATCH: usize = 256;

/// A connection claimed for a run's change; dropped unwritten (its run
/// dropped with the writers at shutdown, a panic in an earlier write), it
/// gives the claim back.
struct Claim {
    to: Arc<dyn Direct>,
    subscription: Arc<str>,
    written: bool,
}

impl Claim {
    fn write(mut self, change: &Routed, tally: &mut Tally) {
        self.written = true;
        let (to, subscription) = (&self.to, &self.subscription);
        // A panic in a dialect's encoding must not leave the socket claimed
        // for ever (its task would wait on it).
        let delivered = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            to.deliver(subscription, change, tally)
        }));
        if delivered.is_err() {
            tracing::error!("a direct write panicked; the claim is given back");
            to.abandon();
        }
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        if !self.written {
            self.to.abandon();
        }
    }
}

/// Claims for one change, written in order by one writer. The change is
/// held once per run, not once per claim: its count would bounce between
/// the cores.
pub(crate) struct Run {
    change: Arc<Routed>,
    claims: Vec<Claim>,
}

impl Run {
    fn write(self) {
        let Some(first) = self.claims.first().map(|c| Arc::clone(&c.to)) else {
            return;
        };
        let mut tally = Tally::default();
        for claim in self.claims {
            claim.write(&self.change, &mut tally);
        }
        // Counting must not end a writer task: runs queued behind this one
        // would wait for the next large run to start another.
        let settled =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| first.settle(&tally)));
        if settled.is_err() {
            tracing::error!("settling a run's counts panicked");
        }
    }
}

/// The runs an offer loop fills, handed to the writers as each is full: one
/// per form of the change (as it is, or a row entering or leaving a
/// subscriber's view), so subscribers that alternate between forms still
/// fill whole runs.
#[derive(Default)]
pub(crate) struct Runs {
    filling: Vec<Run>,
}

impl Runs {
    /// Adds a claimed connection for `change` (`sent`, one of the change's
    /// forms: as it is, or as a row entering or leaving a subscriber's view).
    pub(crate) fn add(
        &mut self,
        writers: &Writers,
        to: Arc<dyn Direct>,
        subscription: Arc<str>,
        sent: &Arc<Routed>,
    ) {
        let at = match self
            .filling
            .iter()
            .position(|r| Arc::ptr_eq(&r.change, sent))
        {
            Some(at) => at,
            None => {
                self.filling.push(Run {
                    change: Arc::clone(sent),
                    claims: Vec::new(),
                });
                self.filling.len() - 1
            }
        };
        let run = &mut self.filling[at];
        run.claims.push(Claim {
            to,
            subscription,
            written: false,
        });
        if run.claims.len() >= BATCH {
            writers.write(self.filling.swap_remove(at));
        }
    }

    /// Hands the runs being filled to the writers.
    pub(crate) fn finish(&mut self, writers: &Writers) {
        for run in self.filling.drain(..) {
            writers.write(run);
        }
    }
}

/// A few claims are written by the router itself: handing them to a writer
/// would cost more than the writes (a single subscriber's stream).
const INLINE: usize = 16;

/// The writers of claimed changes: runs of claims wait in one queue and are
/// written oldest first by at most one task per core. Subscribers are served
/// in the order the router offered them the change (a task per run, as
/// before, was taken newest first by the scheduler's LIFO slot), and a core
/// that finishes early takes the next run instead of idling while the other
/// writes a large one. The queue is bounded by the connections: one is
/// claimed for one change at a time.
pub(crate) struct Writers {
    shared: Arc<Shared>,
}

struct Shared {
    state: Mutex<State>,
    /// Writer tasks at most: the cores the writes can use.
    most: usize,
}

#[derive(Default)]
struct State {
    runs: VecDeque<Run>,
    /// Writer tasks running or about to.
    writers: usize,
}

impl Writers {
    pub(crate) fn new() -> Writers {
        let most = std::thread::available_parallelism().map_or(2, |n| n.get());
        Writers::with_most(most)
    }

    fn with_most(most: usize) -> Writers {
        Writers {
            shared: Arc::new(Shared {
                state: Mutex::new(State::default()),
                most: most.max(1),
            }),
        }
    }

    /// Writes `run`, in order: at once if short, else after the runs queued
    /// before it.
    fn write(&self, run: Run) {
        if run.claims.len() <= INLINE {
            run.write();
            return;
        }
        let start = {
            let mut state = self.shared.lock();
            state.runs.push_back(run);
            let start = state.writers < self.shared.most;
            if start {
                state.writers += 1;
            }
            start
        };
        if start {
            let writer = Writer(Some(Arc::clone(&self.shared)));
            aether_core::task::spawn_named("direct-writer", writer.run());
        }
    }
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // Nothing panics while the lock is held (claims are written outside it).
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// One writer task's count in [`State::writers`], given back however the
/// task ends (it may be dropped unrun at shutdown).
struct Writer(Option<Arc<Shared>>);

impl Writer {
    async fn run(mut self) {
        while let Some(run) = self.next() {
            run.write();
            // Other tasks on this core (the router, a handshake, a ping) get
            // their turn between runs.
            tokio::task::yield_now().await;
        }
    }

    /// The oldest run. None left, the writer's count is given back under
    /// the same lock: a run queued after this starts a writer of its own.
    fn next(&mut self) -> Option<Run> {
        let shared = self.0.as_ref()?;
        let mut state = shared.lock();
        let run = state.runs.pop_front();
        if run.is_none() {
            state.writers -= 1;
            drop(state);
            self.0 = None;
        }
        run
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        if let Some(shared) = self.0.take() {
            shared.lock().writers -= 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A socket that takes every claim and logs what was written to it.
    #[derive(Default)]
    struct Log {
        written: Mutex<Vec<String>>,
        grew: tokio::sync::Notify,
    }

    impl Direct for Log {
        fn claim(&self) -> bool {
            true
        }
        fn deliver(&self, subscription: &str, _: &Routed, tally: &mut Tally) {
            tally.wrote(0);
            self.note(subscription);
        }
        fn abandon(&self) {
            self.note("abandoned");
        }
        fn settle(&self, tally: &Tally) {
            self.note(&format!("settled {}", tally.written));
        }
    }

    impl Log {
        fn note(&self, what: &str) {
            self.written.lock().expect("log").push(what.to_owned());
            self.grew.notify_one();
        }

        async fn wait_for(&self, n: usize) -> Vec<String> {
            let wait = async {
                loop {
                    let grew = self.grew.notified();
                    {
                        let w = self.written.lock().expect("log");
                        if w.len() >= n {
                            return w.clone();
                        }
                    }
                    grew.await;
                }
            };
            tokio::time::timeout(std::time::Duration::from_secs(10), wait)
                .await
                .expect("the writes within 10 s")
        }
    }

    fn change(lsn: u64) -> Arc<Routed> {
        Arc::new(Routed::new(Arc::new(aether_core::changes::RowChange::new(
            aether_core::lsn::Position::new(aether_core::lsn::PgLsn(lsn), 0),
            aether_core::changes::ChangeKind::Insert,
            aether_core::changes::test_relation(),
            None,
            None,
            0,
        ))))
    }

    /// A run of claims named `run-0`, `run-1`, … (more than are written inline).
    fn run(log: &Arc<Log>, name: &str) -> Run {
        let change = change(1);
        let to: Arc<dyn Direct> = log.clone();
        Run {
            change,
            claims: (0..=INLINE)
                .map(|i| Claim {
                    to: Arc::clone(&to),
                    subscription: format!("{name}-{i}").into(),
                    written: false,
                })
                .collect(),
        }
    }

    /// What the log holds once `runs` are written: each run's writes, in
    /// order, then its tally settled.
    fn names(runs: &[&str]) -> Vec<String> {
        runs.iter()
            .flat_map(|r| {
                (0..=INLINE)
                    .map(move |i| format!("{r}-{i}"))
                    .chain([format!("settled {}", INLINE + 1)])
            })
            .collect()
    }

    /// One worker thread: a task per run would go newest first (the
    /// scheduler's LIFO slot); the queue keeps the router's order.
    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn runs_are_written_oldest_first() {
        // On the worker, as the router runs: there, a spawned task goes to
        // the LIFO slot, and nothing else runs until this task yields.
        tokio::spawn(async {
            let log = Arc::new(Log::default());
            let writers = Writers::with_most(1);
            for name in ["a", "b", "c"] {
                writers.write(run(&log, name));
            }
            assert_eq!(
                log.wait_for(3 * (INLINE + 2)).await,
                names(&["a", "b", "c"])
            );
        })
        .await
        .expect("the test task");
    }

    /// A writer task dropped unrun (its runtime shut down) gives its place
    /// back: the runs it left are written by the next writer, before the new.
    #[test]
    fn a_writer_dropped_unrun_leaves_its_runs_to_the_next() {
        let log = Arc::new(Log::default());
        let writers = Writers::with_most(1);
        let first = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        first.block_on(async { writers.write(run(&log, "a")) });
        drop(first);
        assert!(log.written.lock().expect("log").is_empty());
        let second = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("runtime");
        let written = second.block_on(async {
            writers.write(run(&log, "b"));
            log.wait_for(2 * (INLINE + 2)).await
        });
        assert_eq!(written, names(&["a", "b"]));
    }

    /// A run holds one form of a change and at most a batch of claims; the
    /// forms fill runs side by side.
    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn runs_hold_one_form_of_a_change_and_at_most_a_batch() {
        let log = Arc::new(Log::default());
        let writers = Writers::with_most(1);
        let (x, y) = (change(1), change(2));
        let mut runs = Runs::default();
        let to: Arc<dyn Direct> = log.clone();
        for (i, sent) in std::iter::repeat_n(&x, BATCH + 44)
            .chain([&y, &x])
            .enumerate()
        {
            runs.add(&writers, Arc::clone(&to), format!("{i}").into(), sent);
        }
        runs.finish(&writers);
        let written = log.wait_for(BATCH + 46 + 3).await;
        let mut settled: Vec<&str> = written
            .iter()
            .filter_map(|w| w.strip_prefix("settled "))
            .collect();
        settled.sort_unstable();
        assert_eq!(settled, ["1", "256", "45"]);
        let mut subscriptions: Vec<usize> = written.iter().filter_map(|w| w.parse().ok()).collect();
        subscriptions.sort_unstable();
        assert_eq!(subscriptions, (0..BATCH + 46).collect::<Vec<_>>());
    }

    /// A socket whose counting panics.
    struct Unsettled(Log);

    impl Direct for Unsettled {
        fn claim(&self) -> bool {
            true
        }
        fn deliver(&self, subscription: &str, _: &Routed, _: &mut Tally) {
            self.0.note(subscription);
        }
        fn abandon(&self) {
            self.0.note("abandoned");
        }
        fn settle(&self, _: &Tally) {
            panic!("counting failed");
        }
    }

    /// A panic while settling a run's counts does not end the writer: the
    /// runs queued behind it are still written.
    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn a_panic_in_settling_leaves_the_queue_written() {
        tokio::spawn(async {
            let socket = Arc::new(Unsettled(Log::default()));
            let writers = Writers::with_most(1);
            let to: Arc<dyn Direct> = socket.clone();
            for name in ["a", "b"] {
                let mut runs = Runs::default();
                let sent = change(1);
                for i in 0..=INLINE {
                    runs.add(
                        &writers,
                        Arc::clone(&to),
                        format!("{name}-{i}").into(),
                        &sent,
                    );
                }
                runs.finish(&writers);
            }
            let written = socket.0.wait_for(2 * (INLINE + 1)).await;
            assert_eq!(written.len(), 2 * (INLINE + 1));
            assert!(!written.iter().any(|w| w == "abandoned"));
        })
        .await
        .expect("the test task");
    }
}
