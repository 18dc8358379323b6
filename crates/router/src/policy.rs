//! Who may see a change: a policy object the application gives the router.
//!
//! The router knows no table. It asks its [`Policy`] about each change a
//! subscription's filter matched, for the connection's [`Principal`]. A decision
//! the policy cannot make on the spot (a later policy evaluates some rules in
//! PostgreSQL) is [`Decision::Pending`]: the router stops that connection at that
//! change, exactly as when its queue is full, and goes on routing for everyone
//! else. When the policy knows, it wakes the connection through its
//! [`PolicyWaker`] and the router asks again; the connection then catches up from
//! the tail or the log, in order, like any lagging one. So a slow decision stalls
//! only the connections it concerns, never the router.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use aether_core::changes::RowChange;
use aether_core::principal::Principal;
use tokio::sync::Notify;

/// A connection as a policy sees it.
#[derive(Debug, Clone, Copy)]
pub struct Viewer<'a> {
    /// The router's id of the connection: what [`PolicyWaker::wake`] takes.
    pub connection: u64,
    pub principal: &'a Arc<Principal>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Allow,
    Deny,
    /// Not known yet: ask again after [`PolicyWaker::wake`] for this connection.
    Pending,
    /// An UPDATE that brings a row into the viewer's sight: sent as the INSERT
    /// of its new row (the old one was never theirs to see).
    Enter,
    /// An UPDATE that takes a row out of the viewer's sight: sent as the DELETE
    /// of its old row (which they could see), so their copy goes.
    Leave,
}

/// Authorization of changes, on the router task: `observe` and `decide` must not
/// block (no I/O); a decision that needs I/O is [`Decision::Pending`] and made
/// elsewhere.
pub trait Policy: Send {
    /// Sees every change in log order before it is routed, so state derived from
    /// tables (which buckets are public, say) is current when it decides.
    fn observe(&mut self, change: &RowChange) {
        let _ = change;
    }

    /// May `viewer` see `change`? TRUNCATE is not asked about: it names no row.
    fn decide(&mut self, viewer: Viewer<'_>, change: &Arc<RowChange>) -> Decision;

    /// The router has asked about every candidate of a change (or of a catching
    /// up connection's page): decisions left pending may be sent off together.
    fn settle(&mut self) {}

    /// A column whose value must equal `key` in every row of `table` that
    /// `principal` may see, if the policy knows one (`owner_id = auth.uid()`):
    /// the router then indexes an unfiltered subscription under it, so a change
    /// costs work for the subscribers it concerns, not for every subscriber.
    fn index_key(&mut self, principal: &Principal, table: &str) -> Option<(String, String)> {
        let _ = (principal, table);
        None
    }

    /// Changes whenever an [`index_key`](Self::index_key) answer may have
    /// changed (the policies were reloaded): the router indexes again.
    fn index_generation(&self) -> u64 {
        0
    }

    /// The connection closed, or acts as another principal now (token
    /// renewal): what was decided or is pending for it no longer holds.
    fn forget(&mut self, connection: u64) {
        let _ = connection;
    }

    /// Called once with the handle that wakes connections left pending.
    fn attach(&mut self, waker: PolicyWaker) {
        let _ = waker;
    }
}

/// Lets every principal see every change: for tests and tools that authorize
/// elsewhere.
pub struct AllowAll;

impl Policy for AllowAll {
    fn decide(&mut self, _: Viewer<'_>, _: &Arc<RowChange>) -> Decision {
        Decision::Allow
    }
}

/// Wakes connections a [`Decision::Pending`] stopped. The set it keeps holds at
/// most one entry per connection, so it is bounded by the connections open.
#[derive(Clone, Default)]
pub struct PolicyWaker {
    inner: Arc<WakerInner>,
}

#[derive(Default)]
struct WakerInner {
    woken: Mutex<HashSet<u64>>,
    notify: Notify,
}

impl PolicyWaker {
    /// The policy has an answer for `connection`: the router asks again.
    pub fn wake(&self, connection: u64) {
        if let Ok(mut w) = self.inner.woken.lock() {
            w.insert(connection);
        }
        self.inner.notify.notify_one();
    }

    pub(crate) async fn woken(&self) -> Vec<u64> {
        loop {
            let notified = self.inner.notify.notified();
            let woken: Vec<u64> = match self.inner.woken.lock() {
                Ok(mut w) => w.drain().collect(),
                Err(_) => Vec::new(),
            };
            if !woken.is_empty() {
                return woken;
            }
            notified.await;
        }
    }
}
