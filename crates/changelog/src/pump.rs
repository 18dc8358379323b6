//! The log's two threads: the writer appends what the replication stream decodes
//! and feeds the router; the syncer makes it durable and says how far PostgreSQL
//! may forget.
//!
//! Order of events for one batch: append (in the operating system: a killed
//! process loses nothing) → the router gets the changes (live delivery does not
//! wait for the disk) → fsync on the syncer thread → [`Durable`] advances and the
//! replication task confirms the slot up to the last transaction in it.
//!
//! A change at or below the newest position in the log is PostgreSQL re-sending
//! what was logged before a restart: dropped here, so nobody sees it twice.

use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::{mpsc, oneshot, watch};

use super::{LogError, SharedLog};
use aether_core::changes::{Relation, RowChange};
use aether_core::lsn::{Epoch, PgLsn, Position};
use aether_postgres::decode::Output;

/// What the replication task hands the log.
#[derive(Debug)]
pub enum LogInput {
    Output(Output),
    /// The slot was recreated: forget everything, start a new epoch after `floor`.
    Reset {
        floor: Position,
        done: oneshot::Sender<Epoch>,
    },
}

/// What the router consumes: a stream of logged changes, wherever they come from.
#[derive(Debug)]
pub enum Feed {
    Change(Arc<RowChange>),
    Relation(Arc<Relation>),
    /// The log was reset: positions of the old epoch mean nothing any more.
    Reset {
        epoch: Epoch,
        floor: Position,
    },
}

/// How far the log is durable, in the replication task's terms.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Durable {
    /// Inputs handled and durable, counted from the start of the pump.
    pub inputs: u64,
    /// End LSN of the last transaction whose changes are all durable.
    pub end_lsn: PgLsn,
}

/// The log's health, for `/health`, `/ws/status` and metrics.
#[derive(Debug, Clone, Default)]
pub struct LogStatus {
    /// Set while appends or fsyncs fail (the disk is full, say).
    pub error: Option<String>,
    /// Time of the last append batch, microseconds.
    pub append_us: u64,
    /// Time of the last fsync, microseconds.
    pub sync_us: u64,
}

/// At most this many inputs are appended as one batch.
const BATCH: usize = 1024;
/// Retention is checked this often.
const RETENTION_EVERY: Duration = Duration::from_secs(5);

#[derive(Default)]
struct SyncRequest {
    pending: Option<Durable>,
    closed: bool,
}

pub struct Pump {
    pub writer: std::thread::JoinHandle<()>,
    pub syncer: std::thread::JoinHandle<()>,
}

/// Starts the writer and syncer threads. They end when `input` closes (after a
/// last fsync) or the router stops taking the feed.
pub fn start(
    log: SharedLog,
    input: mpsc::Receiver<LogInput>,
    feed: mpsc::Sender<Feed>,
    durable: watch::Sender<Durable>,
    status: watch::Sender<LogStatus>,
) -> std::io::Result<Pump> {
    let requests = Arc::new((Mutex::new(SyncRequest::default()), Condvar::new()));
    let status = Arc::new(status);
    let syncer = {
        let log = Arc::clone(&log);
        let requests = Arc::clone(&requests);
        let status = Arc::clone(&status);
        std::thread::Builder::new()
            .name("changelog-sync".into())
            .spawn(move || {
                aether_core::task::unpin_current_thread();
                sync_loop(log, requests, durable, status)
            })?
    };
    let writer = std::thread::Builder::new()
        .name("changelog-writer".into())
        .spawn(move || {
            aether_core::task::unpin_current_thread();
            write_loop(log, input, feed, &requests, &status);
            let (lock, cv) = &*requests;
            lock.lock().unwrap_or_else(|e| e.into_inner()).closed = true;
            cv.notify_one();
        })?;
    Ok(Pump { writer, syncer })
}

fn write_loop(
    log: SharedLog,
    mut input: mpsc::Receiver<LogInput>,
    feed: mpsc::Sender<Feed>,
    requests: &(Mutex<SyncRequest>, Condvar),
    status: &watch::Sender<LogStatus>,
) {
    let appended = metrics::counter!("aether_changelog_appended_total");
    let duplicates = metrics::counter!("aether_changelog_duplicates_total");
    let append_seconds = metrics::histogram!("aether_changelog_append_seconds");
    let mut inputs = 0u64;
    let mut end_lsn = PgLsn::ZERO;
    let mut newest = log.bounds().newest;
    let mut batch = Vec::with_capacity(BATCH);
    let mut to_log: Vec<Arc<RowChange>> = Vec::with_capacity(BATCH);
    let mut to_feed: Vec<Feed> = Vec::with_capacity(BATCH);
    while let Some(first) = input.blocking_recv() {
        batch.push(first);
        while batch.len() < BATCH {
            match input.try_recv() {
                Ok(more) => batch.push(more),
                Err(_) => break,
            }
        }
        for item in batch.drain(..) {
            inputs += 1;
            match item {
                LogInput::Output(Output::Change(c)) => {
                    if newest.is_some_and(|n| c.position <= n) {
                        duplicates.increment(1);
                        continue;
                    }
                    newest = Some(c.position);
                    to_log.push(Arc::clone(&c));
                    to_feed.push(Feed::Change(c));
                }
                LogInput::Output(Output::Relation(r)) => to_feed.push(Feed::Relation(r)),
                LogInput::Output(Output::Commit { end_lsn: e, .. }) => end_lsn = end_lsn.max(e),
                LogInput::Output(Output::Begin { .. }) => {}
                LogInput::Reset { floor, done } => {
                    if !flush(
                        &log,
                        &mut to_log,
                        &mut to_feed,
                        &feed,
                        status,
                        &append_seconds,
                    ) {
                        return;
                    }
                    let epoch = loop {
                        match log.reset(floor) {
                            Ok(e) => break e,
                            Err(e) => {
                                if !retry_pause(status, &e, &feed) {
                                    return;
                                }
                            }
                        }
                    };
                    tracing::error!(%epoch, %floor, "change log reset: a new epoch starts; positions from before are answered with gap");
                    newest = None;
                    // Positions of the old slot mean nothing to the new one.
                    end_lsn = PgLsn::ZERO;
                    to_feed.push(Feed::Reset { epoch, floor });
                    let _ = done.send(epoch);
                }
            }
        }
        appended.increment(to_log.len() as u64);
        if !flush(
            &log,
            &mut to_log,
            &mut to_feed,
            &feed,
            status,
            &append_seconds,
        ) {
            return;
        }
        let (lock, cv) = requests;
        lock.lock().unwrap_or_else(|e| e.into_inner()).pending = Some(Durable { inputs, end_lsn });
        cv.notify_one();
    }
}

/// Appends and forwards; `false` when the router is gone.
fn flush(
    log: &SharedLog,
    to_log: &mut Vec<Arc<RowChange>>,
    to_feed: &mut Vec<Feed>,
    feed: &mpsc::Sender<Feed>,
    status: &watch::Sender<LogStatus>,
    append_seconds: &metrics::Histogram,
) -> bool {
    if !to_log.is_empty() {
        let t = Instant::now();
        // A failing disk stops the stream here (PostgreSQL keeps the WAL) until it
        // works again; nothing unlogged is delivered.
        while let Err(e) = log.append(to_log) {
            if matches!(e, LogError::ResetPending) {
                // The slot is being recreated and the log reset: changes still
                // queued from the old slot belong to a history being discarded.
                to_log.clear();
                to_feed.retain(|f| !matches!(f, Feed::Change(_)));
                break;
            }
            if matches!(
                e,
                LogError::Fsync(_) | LogError::TooLarge(_) | LogError::Fenced(_)
            ) {
                tracing::error!(error = %e, "change log append failed for good: stopping");
                status.send_modify(|s| s.error = Some(e.to_string()));
                return false;
            }
            if !retry_pause(status, &e, feed) {
                return false;
            }
            // Part of the batch may have been sealed before the failure: retry the rest.
            let newest = log.bounds().newest;
            to_log.retain(|c| newest.is_none_or(|n| c.position > n));
            if to_log.is_empty() {
                break;
            }
        }
        let took = t.elapsed();
        append_seconds.record(took.as_secs_f64());
        status.send_if_modified(|s| {
            s.append_us = took.as_micros() as u64;
            std::mem::take(&mut s.error).is_some()
        });
        to_log.clear();
    }
    for f in to_feed.drain(..) {
        if feed.blocking_send(f).is_err() {
            return false;
        }
    }
    true
}

/// Reports a log error and waits before the retry; `false` if the router is gone.
fn retry_pause(status: &watch::Sender<LogStatus>, e: &LogError, feed: &mpsc::Sender<Feed>) -> bool {
    tracing::error!(error = %e, "change log not writable; retrying");
    status.send_modify(|s| s.error = Some(e.to_string()));
    std::thread::sleep(Duration::from_secs(1));
    !feed.is_closed()
}

fn sync_loop(
    log: SharedLog,
    requests: Arc<(Mutex<SyncRequest>, Condvar)>,
    durable: watch::Sender<Durable>,
    status: Arc<watch::Sender<LogStatus>>,
) {
    let sync_seconds = metrics::histogram!("aether_changelog_fsync_seconds");
    let bytes_gauge = metrics::gauge!("aether_changelog_bytes");
    let mut retention_at = Instant::now();
    loop {
        let (next, closed) = {
            let (lock, cv) = &*requests;
            let mut req = lock.lock().unwrap_or_else(|e| e.into_inner());
            while req.pending.is_none() && !req.closed {
                let (r, timeout) = cv
                    .wait_timeout(req, RETENTION_EVERY)
                    .unwrap_or_else(|e| e.into_inner());
                req = r;
                if timeout.timed_out() {
                    break;
                }
            }
            (req.pending.take(), req.closed)
        };
        if let Some(d) = next {
            let t = Instant::now();
            if let Err(e) = log.sync() {
                // Not retried: after a failed fsync the kernel may have marked the
                // unwritten pages clean, and a retry would report them durable.
                // Ending here stops the slot's confirmation (the replication task
                // sees the log gone) and the process restarts from what is on disk.
                tracing::error!(error = %e, "change log fsync failed: stopping");
                status.send_modify(|s| s.error = Some(e.to_string()));
                return;
            }
            let took = t.elapsed();
            sync_seconds.record(took.as_secs_f64());
            status.send_modify(|s| s.sync_us = took.as_micros() as u64);
            durable.send_if_modified(|old| {
                let changed = *old != d;
                *old = d;
                changed
            });
            bytes_gauge.set(log.bounds().bytes as f64);
        }
        // Cheap when nothing is due (no i/o); at least every few seconds for age.
        if next.is_some() || retention_at.elapsed() >= RETENTION_EVERY {
            retention_at = Instant::now();
            if let Err(e) = log.enforce_retention(SystemTime::now()) {
                tracing::warn!(error = %e, "change log retention");
            }
        }
        if closed && next.is_none() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::local::{LogOptions, floor_for_slot, open_ready};
    use aether_core::changes::ChangeKind;

    fn change(lsn: u64) -> Output {
        let rel = aether_core::changes::test_relation();
        Output::Change(Arc::new(RowChange::new(
            Position::new(PgLsn(lsn), 0),
            ChangeKind::Insert,
            rel,
            Some(vec![]),
            None,
            0,
        )))
    }

    fn commit(lsn: u64) -> Output {
        Output::Commit {
            commit_lsn: PgLsn(lsn),
            end_lsn: PgLsn(lsn + 8),
            commit_time_ms: 0,
        }
    }

    #[tokio::test]
    async fn re_sent_changes_are_dropped_and_durable_follows_commits() {
        let dir = tempfile::tempdir().unwrap();
        let (log, _) =
            open_ready(dir.path(), LogOptions::default(), floor_for_slot(PgLsn(1))).unwrap();
        let log: SharedLog = Arc::new(log);
        let run = |log: SharedLog, inputs: Vec<Output>| async move {
            let (in_tx, in_rx) = mpsc::channel(16);
            let (feed_tx, mut feed_rx) = mpsc::channel(16);
            let (durable_tx, mut durable_rx) = watch::channel(Durable::default());
            let (status_tx, _) = watch::channel(LogStatus::default());
            let pump = start(log, in_rx, feed_tx, durable_tx, status_tx).unwrap();
            let n = inputs.len() as u64;
            for i in inputs {
                in_tx.send(LogInput::Output(i)).await.unwrap();
            }
            let d = *durable_rx
                .wait_for(|d| d.inputs == n)
                .await
                .expect("durable reaches every input");
            drop(in_tx);
            let mut fed = Vec::new();
            while let Some(f) = feed_rx.recv().await {
                if let Feed::Change(c) = f {
                    fed.push(c.position.commit_lsn.0);
                }
            }
            pump.writer.join().unwrap();
            pump.syncer.join().unwrap();
            (d, fed)
        };
        let (d, fed) = run(
            Arc::clone(&log),
            vec![change(10), commit(10), change(20), commit(20)],
        )
        .await;
        assert_eq!(fed, [10, 20]);
        assert_eq!(d.end_lsn, PgLsn(28));
        // PostgreSQL re-sends from an older confirmed position after a restart.
        let (d, fed) = run(
            Arc::clone(&log),
            vec![change(20), commit(20), change(30), commit(30)],
        )
        .await;
        assert_eq!(fed, [30], "what the log holds is not fed again");
        assert_eq!(d.end_lsn, PgLsn(38));
    }
}
