//! Connections that fell behind: they catch up from the hot tail or, further
//! back, from pages of the log read off the router task, and go live again;
//! a connection that stalls or falls out of the log is closed with a reason.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use aether_changelog::{LogError, Page, ReadHint};
use aether_core::lsn::Position;

use crate::policy::{Decision, Policy};
use crate::routed::Routed;
use crate::routed::moved;
use crate::subscriptions::{Subscription, decide, matches, moved_matches};
use crate::{Outbound, Router, SessionEntry};

/// Where a lagging connection stands.
pub(crate) struct Lag {
    /// Every change up to here was offered to all its subscriptions.
    pub(crate) after: Position,
    /// Last time it asked for more (or started lagging).
    pub(crate) since: Instant,
    /// A page is being read from the log for it.
    pub(crate) paging: bool,
    /// The policy is deciding on its next change ([`Decision::Pending`]).
    pub(crate) awaiting: bool,
    /// Where the last page ended in the log.
    pub(crate) hint: Option<ReadHint>,
    /// Bumped when `after` moves back (a `since` subscription on a lagging
    /// connection): a page read for the old position is discarded.
    pub(crate) generation: u64,
}

/// A lagging connection asks for the next missed changes once its queue is down to
/// half, in items and in bytes: the router refills it while the writer still has
/// frames to send, so the socket never idles waiting for a page.
pub fn low_water(rx: &crate::queue::QueueRx<Outbound>) -> bool {
    rx.half_drained()
}

/// Bytes of log records read per page.
const PAGE_BYTES: usize = 512 << 10;
/// Pages being read at once, for all connections: what paging holds in memory is
/// bounded by this times a page.
const PAGES_IN_FLIGHT: usize = 4;

pub(crate) struct PageDone {
    pub(crate) session: u64,
    pub(crate) generation: u64,
    pub(crate) result: Result<Page, LogError>,
}

impl Router {
    pub(crate) fn close_stalled(&mut self, now: Instant) {
        if self.lagging.is_empty() {
            return;
        }
        let floor = self.log.bounds().floor;
        let stalled: Vec<(u64, &'static str)> = self
            .lagging
            .iter()
            .filter_map(|id| {
                let lag = self.sessions.get(id)?.lag.as_ref()?;
                if lag.after < floor {
                    Some((*id, "fell behind what the change log retains"))
                } else if !lag.paging && now.duration_since(lag.since) > self.stall_timeout {
                    Some((
                        *id,
                        if lag.awaiting {
                            "stalled: the authorization of its next change did not come"
                        } else {
                            "stalled: its queue stayed full"
                        },
                    ))
                } else {
                    None
                }
            })
            .collect();
        for (id, why) in stalled {
            self.kick(id, why);
        }
    }

    /// Sends a lagging connection what it missed, from the tail or (further back)
    /// a page of the log, until its queue is full again (it stays lagging) or it is
    /// back at the head (it goes live).
    pub(crate) fn advance(&mut self, session: u64) {
        let Some(entry) = self.sessions.get_mut(&session) else {
            return;
        };
        let Some(lag) = entry.lag.as_mut() else {
            return;
        };
        lag.since = Instant::now();
        if lag.paging || lag.awaiting {
            return;
        }
        let after = lag.after;
        if !self.tail.covers(after) {
            self.request_page(session);
            return;
        }
        let full = deliver(
            session,
            entry,
            &mut self.subs,
            &mut *self.policy,
            self.tail.after(after),
        );
        if !full {
            entry.lag = None;
            self.lagging.remove(&session);
        }
    }

    /// The policy decided for connections it had left pending: they go on from
    /// the change it was asked about.
    pub(crate) fn policy_decided(&mut self, woken: Vec<u64>) {
        for session in woken {
            let Some(lag) = self.sessions.get_mut(&session).and_then(|e| e.lag.as_mut()) else {
                continue;
            };
            if lag.awaiting {
                lag.awaiting = false;
                self.advance(session);
            }
        }
    }

    /// Queues a page read for a connection further behind than the tail.
    pub(crate) fn request_page(&mut self, session: u64) {
        let Some(lag) = self.sessions.get_mut(&session).and_then(|e| e.lag.as_mut()) else {
            return;
        };
        lag.paging = true;
        if self.pages_in_flight >= PAGES_IN_FLIGHT {
            self.page_queue.push_back(session);
            return;
        }
        self.pages_in_flight += 1;
        let (after, hint, generation) = (lag.after, lag.hint.clone(), lag.generation);
        // No more than its queue can take now: the rest would be read again.
        let room = self
            .sessions
            .get(&session)
            .map_or(1, |e| e.handle.tx.bulk_capacity().max(1));
        let log = Arc::clone(&self.log);
        let tx = self.pages_tx.clone();
        // File i/o: off the router task.
        tokio::task::spawn_blocking(move || {
            let result = log.read_after(after, PAGE_BYTES, room, hint.as_ref());
            let _ = tx.send(PageDone {
                session,
                generation,
                result,
            });
        });
    }

    pub(crate) fn page_done(&mut self, done: PageDone) {
        self.pages_in_flight = self.pages_in_flight.saturating_sub(1);
        while self.pages_in_flight < PAGES_IN_FLIGHT {
            let Some(next) = self.page_queue.pop_front() else {
                break;
            };
            if let Some(lag) = self.sessions.get_mut(&next).and_then(|e| e.lag.as_mut()) {
                lag.paging = false;
                self.request_page(next);
            }
        }
        let PageDone {
            session,
            generation,
            result,
        } = done;
        let Some(entry) = self.sessions.get_mut(&session) else {
            return;
        };
        let Some(lag) = entry.lag.as_mut() else {
            return;
        };
        lag.paging = false;
        if lag.generation != generation {
            return self.advance(session);
        }
        let page = match result {
            Ok(page) => page,
            Err(LogError::Gap { .. }) => {
                return self.kick(session, "fell behind what the change log retains");
            }
            Err(e) => {
                tracing::error!(error = %e, session, "reading the change log for a catching-up connection");
                return self.kick(session, "the change log could not be read");
            }
        };
        if page.changes.is_empty() && !self.tail.covers(lag.after) {
            tracing::error!(after = %lag.after, "the change log has nothing where the tail starts");
            return self.kick(session, "the change log could not be read");
        }
        // The log is written before the router is fed: what it holds past the
        // newest change routed comes through the feed (and the tail), not from here.
        let high_water = self.high_water;
        // Wrapped for this connection: its subscriptions share the encodings.
        let routed: Vec<Arc<Routed>> = page
            .changes
            .iter()
            .take_while(|c| c.position <= high_water)
            .map(|c| Arc::new(Routed::new(Arc::clone(c))))
            .collect();
        lag.hint = if page.changes.last().is_some_and(|c| c.position > high_water) {
            None
        } else {
            page.hint
        };
        let full = deliver(
            session,
            entry,
            &mut self.subs,
            &mut *self.policy,
            routed.iter(),
        );
        if !full {
            self.advance(session);
        }
    }
}

/// Offers `changes` (after the connection's `after`, oldest first) to its
/// subscriptions; `true` if its queue filled (it stays lagging from there).
fn deliver<'a>(
    session: u64,
    entry: &mut SessionEntry,
    subs: &mut HashMap<u64, Subscription>,
    policy: &mut dyn Policy,
    changes: impl Iterator<Item = &'a Arc<Routed>>,
) -> bool {
    let Some(lag) = entry.lag.as_mut() else {
        return false;
    };
    let mut uids: Vec<u64> = entry.subs.values().copied().collect();
    uids.sort_unstable();
    let principal = &entry.handle.principal;
    for c in changes {
        if c.position <= lag.after {
            continue;
        }
        let mut entered: Option<Arc<Routed>> = None;
        let mut left: Option<Arc<Routed>> = None;
        for uid in &uids {
            let Some(sub) = subs.get_mut(uid) else {
                continue;
            };
            if c.position <= sub.seen
                || !crate::subscriptions::covers(&sub.table, &c.relation)
                || !sub.events.may_want(c.kind)
                || !matches(c, &sub.filter)
            {
                continue;
            }
            let sent = match decide(policy, session, principal, c) {
                Decision::Allow => Arc::clone(c),
                Decision::Enter if moved_matches(c, &sub.filter, true) => {
                    Arc::clone(entered.get_or_insert_with(|| moved(c, true)))
                }
                Decision::Leave if moved_matches(c, &sub.filter, false) => {
                    Arc::clone(left.get_or_insert_with(|| moved(c, false)))
                }
                Decision::Deny | Decision::Enter | Decision::Leave => {
                    sub.seen = c.position;
                    continue;
                }
                Decision::Pending => {
                    lag.after = c.position.just_before();
                    lag.awaiting = true;
                    policy.settle();
                    return true;
                }
            };
            if !sub.events.contains(sent.kind) {
                sub.seen = c.position;
                continue;
            }
            let out = Outbound::Change {
                subscription: Arc::clone(&sub.id),
                change: sent,
            };
            if entry.handle.tx.try_send_bulk(out).is_err() {
                lag.after = c.position.just_before();
                entry.handle.tx.raise(crate::queue::Signal::Lagging);
                return true;
            }
            sub.seen = c.position;
        }
        lag.after = c.position;
    }
    false
}
