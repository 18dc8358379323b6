//! The durable change log: every decoded change, in commit order, kept for `since`
//! resumes and for clients catching up.
//!
//! The log splits *delivery history* from the *replication slot*: the slot is
//! confirmed as soon as the log holds a transaction durably, so PostgreSQL keeps
//! only the WAL Aether has not logged yet, however long clients may resume. The
//! log's own retention (age and bytes) decides how far back a `since` can go.
//!
//! Appends are idempotent by position: after a crash PostgreSQL re-sends what was
//! not confirmed, positions are deterministic, and what the log already holds is
//! recognized and dropped before anyone sees it again.
//!
//! [`ChangeLog`] is the seam: [`local::LocalLog`] (segment files under
//! `DATA_DIR/changelog`) is the first backend; [`jetstream::JetStreamLog`] (a NATS
//! JetStream stream shared by a cluster's nodes) is the second, behind the same
//! trait and the same conformance tests.

pub mod codec;
#[cfg(test)]
pub(crate) mod conformance;
pub mod ingest;
pub mod jetstream;
pub mod local;
pub mod monitor;
#[cfg(any(test, feature = "testing"))]
pub mod natsd;
pub mod pump;

use std::sync::Arc;
use std::time::SystemTime;

use aether_core::changes::RowChange;
use aether_core::lsn::{Epoch, Position};

#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("change log i/o ({what}): {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("change log is corrupt in {segment} at byte {offset}: {why}")]
    Corrupt {
        segment: String,
        offset: u64,
        why: String,
    },
    /// The position is older than what the log holds.
    #[error("position {since} is older than the change log (it holds what follows {floor})")]
    Gap { since: Position, floor: Position },
    #[error("append out of order: {position} after {newest}")]
    OutOfOrder {
        position: Position,
        newest: Position,
    },
    #[error("a change of {0} bytes is larger than a log record may be")]
    TooLarge(usize),
    /// Not retried: after a failed fsync the kernel may have dropped the pages.
    #[error("change log fsync failed: {0}")]
    Fsync(String),
    #[error("the change log is waiting to be reset (the replication slot is being recreated)")]
    ResetPending,
    /// The log's server cannot be reached or did not answer in time: retried.
    #[error("change log unavailable: {0}")]
    Unavailable(String),
    /// Another node appended: this one is no longer the leader. Not retried.
    #[error("change log append fenced: {0}")]
    Fenced(String),
}

impl LogError {
    pub(crate) fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> LogError {
        let what = what.into();
        move |source| LogError::Io { what, source }
    }
}

/// What the log holds right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bounds {
    pub epoch: Epoch,
    /// Every change after this position is held.
    pub floor: Position,
    /// The newest change held, if any.
    pub newest: Option<Position>,
    /// The oldest change held, if any.
    pub oldest: Option<Position>,
    /// Bytes on disk.
    pub bytes: u64,
    /// Records appended by this process plus those of the last segment when it
    /// opened (for tests and benchmarks: older segments are not counted).
    pub records: u64,
    /// The slot is being (re)created: the log is reset before it takes changes.
    pub reset_pending: bool,
}

/// Where a reader stopped, so the next page starts there instead of searching.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadHint {
    pub(crate) segment: Position,
    pub(crate) offset: u64,
    /// The last position before `offset`.
    pub(crate) last: Position,
}

/// A page of changes read from the log.
#[derive(Debug, Default)]
pub struct Page {
    pub changes: Vec<Arc<RowChange>>,
    /// Where to continue.
    pub hint: Option<ReadHint>,
    /// The page reaches the newest change the log held when it was read.
    pub end: bool,
}

/// A change log backend. Calls block (file or network i/o): callers run them on
/// threads of their own or `spawn_blocking`, never on the router task.
pub trait ChangeLog: Send + Sync + 'static {
    fn bounds(&self) -> Bounds;

    /// Appends changes whose positions are above the newest held, in order, and
    /// hands them to the operating system: they survive the process being killed,
    /// and are durable once [`ChangeLog::sync`] returns.
    fn append(&self, changes: &[Arc<RowChange>]) -> Result<(), LogError>;

    /// Makes everything appended so far durable.
    fn sync(&self) -> Result<(), LogError>;

    /// Changes after `after`, oldest first, up to about `max_bytes` of records
    /// and at most `max_changes` changes (what the reader can take: reading more
    /// is work thrown away).
    fn read_after(
        &self,
        after: Position,
        max_bytes: usize,
        max_changes: usize,
        hint: Option<&ReadHint>,
    ) -> Result<Page, LogError>;

    /// Drops the oldest changes beyond the retention limits.
    fn enforce_retention(&self, now: SystemTime) -> Result<(), LogError>;

    /// Records, durably, that the slot is about to be (re)created: until
    /// [`ChangeLog::reset`] the log takes no change, and a crash before the reset
    /// still resets it at the next start.
    fn mark_reset_pending(&self) -> Result<(), LogError>;

    /// Forgets everything and starts a new epoch whose history begins after
    /// `floor` (the slot was recreated: what came before is unknowable).
    fn reset(&self, floor: Position) -> Result<Epoch, LogError>;
}

pub type SharedLog = Arc<dyn ChangeLog>;
