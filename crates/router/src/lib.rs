//! The router: one task that owns the subscription index, the hot tail of the
//! change log and the lag state of every connection.
//!
//! It consumes a [`Feed`] of logged changes (it does not care where the log is)
//! and subscription commands on bounded channels, handled in one order, so
//! "subscribed" means live: every change the router handles after a subscription
//! was registered is checked against it.
//!
//! Delivery never waits on a client: frames go to each connection's bounded queue
//! with `try_send`. A full queue puts the connection in the *lagging* state: live
//! changes stop going to it, and as its writer drains the queue it pulls the missed
//! changes, from the hot tail in memory or, when it is further behind, in pages
//! read from the change log off this task. A `since` resume is the same thing: the
//! subscription starts lagging at `since`. Nobody ever holds the stream back. A
//! lagging connection that stops draining for the stall timeout, or falls behind
//! what the log retains, is closed with a reason and can resume with `since`.
//!
//! Each subscription remembers the newest change it was offered (`seen`), so a
//! connection whose queue filled in the middle of fanning one change out to its
//! subscriptions gets the rest of it, and nothing twice.
//!
//! Routing cost follows the matching subscriptions: subscriptions with an equality
//! filter are found through a hash index on (column, value), the rest of a table's
//! subscriptions are scanned.

pub mod catalog;
mod catchup;
pub mod direct;
pub mod filter;
pub mod policy;
pub mod queue;
pub mod routed;
mod subscriptions;
pub mod tail;
pub mod tap;

pub use catchup::low_water;
use catchup::{Lag, PageDone};
use subscriptions::{Subscription, TableSubs};

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use aether_changelog::SharedLog;
use aether_changelog::pump::Feed;
use aether_core::changes::ChangeKind;
use aether_core::lsn::{Epoch, Position, SinceId, StreamId};
use aether_core::principal::Principal;
use filter::Filter;
use policy::{Policy, PolicyWaker};
use routed::Routed;
use tail::Tail;
use tap::{Effects, Tap};

/// Which kinds of change a subscription wants.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EventMask(u8);

impl EventMask {
    pub const ALL: EventMask = EventMask(0b1111);

    pub fn parse(s: &str) -> Option<Self> {
        Some(EventMask(match s {
            "*" => 0b1111,
            "INSERT" => 0b0001,
            "UPDATE" => 0b0010,
            "DELETE" => 0b0100,
            "TRUNCATE" => 0b1000,
            _ => return None,
        }))
    }

    /// Whether a change of `kind` may reach this mask: an UPDATE may be sent as
    /// an INSERT or a DELETE ([`policy::Decision::Enter`], [`policy::Decision::Leave`]).
    fn may_want(self, kind: ChangeKind) -> bool {
        self.contains(kind)
            || (kind == ChangeKind::Update
                && (self.contains(ChangeKind::Insert) || self.contains(ChangeKind::Delete)))
    }

    fn contains(self, kind: ChangeKind) -> bool {
        let bit = match kind {
            ChangeKind::Insert => 0b0001,
            ChangeKind::Update => 0b0010,
            ChangeKind::Delete => 0b0100,
            // TRUNCATE goes to `*` subscriptions as well as explicit ones.
            ChangeKind::Truncate => 0b1000,
        };
        self.0 & bit != 0
    }
}

/// What the router puts on a connection's queue.
#[derive(Debug, Clone)]
pub enum Outbound {
    Change {
        subscription: Arc<str>,
        change: Arc<Routed>,
    },
    /// The subscription is live. `position` is the newest change routed before it
    /// was registered: every change it is sent live comes after it, so it is where
    /// a client that has received nothing yet resumes from. With `since`, the
    /// changes after `since` follow this reply, then live ones.
    Subscribed {
        subscription: Arc<str>,
        position: StreamId,
    },
    Unsubscribed {
        subscription: Arc<str>,
    },
    Error {
        subscription: Option<Arc<str>>,
        code: &'static str,
        message: String,
    },
    /// A text frame encoded once by its producer at the edge (channel messages,
    /// presence, system); the router carries these but never makes them.
    Frame(Arc<str>),
    /// A binary frame, likewise (Phoenix `vsn=2.0.0` user broadcasts).
    Binary(bytes::Bytes),
}

impl Outbound {
    /// What an item holds in a connection's queue, for its byte bound: a
    /// change counts whole, frame included, though other queues share it (a
    /// lagging connection keeps it alive). The same every time it is asked.
    pub fn weight(&self) -> usize {
        const ITEM: usize = 64;
        ITEM + match self {
            Outbound::Change { change, .. } => change.approx_bytes(),
            Outbound::Error { message, .. } => message.len(),
            Outbound::Frame(text) => text.len(),
            Outbound::Binary(bytes) => bytes.len(),
            Outbound::Subscribed { .. } | Outbound::Unsubscribed { .. } => 0,
        }
    }
}

/// A connection as the router knows it.
#[derive(Clone)]
pub struct SessionHandle {
    /// Its queue. The router raises [`queue::Signal`]s on it too: `Overflowed`
    /// when it cannot keep up at all, `Revoked` when its token's auth session is
    /// signed out, `Lagging` when it starts lagging (once its queue is half
    /// empty the connection answers with [`Command::Pull`]).
    pub tx: queue::QueueTx<Outbound>,
    pub principal: Arc<Principal>,
    /// Its socket, for row changes written without waking its task, when its
    /// dialect and transport allow (see [`direct`]).
    pub direct: Option<Arc<dyn direct::Direct>>,
}

#[derive(Debug, Clone)]
pub struct SubscriptionSpec {
    pub id: Arc<str>,
    pub table: Arc<str>,
    pub events: EventMask,
    pub filter: Filter,
    pub since: Option<SinceId>,
}

pub enum Command {
    Attach {
        session: u64,
        handle: SessionHandle,
    },
    Subscribe {
        session: u64,
        spec: SubscriptionSpec,
    },
    Unsubscribe {
        session: u64,
        id: Arc<str>,
    },
    Detach {
        session: u64,
    },
    /// The principal of a connection changed (in-band token renewal).
    SetPrincipal {
        session: u64,
        principal: Arc<Principal>,
    },
    /// A lagging connection's queue is half empty: send it the next missed changes.
    Pull {
        session: u64,
    },
}

struct SessionEntry {
    handle: SessionHandle,
    subs: HashMap<Arc<str>, u64>,
    lag: Option<Lag>,
}

pub struct RouterConfig {
    pub log: SharedLog,
    /// Who may see which change.
    pub policy: Box<dyn Policy>,
    /// Told of every change before it is routed.
    pub taps: Vec<Box<dyn Tap>>,
    /// A lagging connection that drains nothing for this long is closed.
    pub stall_timeout: Duration,
    /// Subscriptions one connection may hold: each costs memory and routing work.
    pub max_subscriptions: usize,
    /// Bytes of recent changes kept in memory.
    pub memory_bytes: usize,
    /// How long a `since` ahead of the newest change routed here waits for this
    /// router to reach it. Zero with a log of this process's own (such a position
    /// was never handed out: `gap` at once); in a cluster another node may have
    /// handed it out, and this one has not consumed it yet.
    pub ahead_wait: Duration,
}

pub struct Router {
    sessions: HashMap<u64, SessionEntry>,
    subs: HashMap<u64, Subscription>,
    tables: HashMap<Arc<str>, TableSubs>,
    next_uid: u64,
    log: SharedLog,
    epoch: Epoch,
    /// The newest change routed.
    high_water: Position,
    tail: Tail,
    policy: Box<dyn Policy>,
    waker: PolicyWaker,
    taps: Vec<Box<dyn Tap>>,
    catalog: catalog::SharedCatalog,
    candidates: Vec<u64>,
    stall_timeout: Duration,
    max_subscriptions: usize,
    /// Connections lagging (usually none): the stall check looks only at these.
    lagging: HashSet<u64>,
    pages_tx: mpsc::UnboundedSender<PageDone>,
    pages_rx: Option<mpsc::UnboundedReceiver<PageDone>>,
    pages_in_flight: usize,
    /// Connections waiting for a page read slot, in order.
    page_queue: VecDeque<u64>,
    /// Lag generations, unique for the router's life: a page read for a lag
    /// state that was replaced (rewound, reset, ended) is recognized as stale.
    generations: u64,
    ahead_wait: Duration,
    /// Subscriptions to `schema.*` or `*`: routing looks for them only when
    /// there are some.
    wildcards: usize,
    /// The policy's [`Policy::index_generation`] the subscriptions are indexed for.
    policy_generation: u64,
    /// Subscriptions whose `since` is ahead of `high_water`, oldest first: made
    /// when the feed reaches them, `gap` after `ahead_wait`. At most one per
    /// connection's subscription limit.
    waiting: Vec<(Instant, u64, SubscriptionSpec)>,
    /// Writes the changes claimed for sockets.
    writers: direct::Writers,
}

impl Router {
    pub fn new(mut cfg: RouterConfig, catalog: catalog::SharedCatalog) -> Self {
        let bounds = cfg.log.bounds();
        let waker = PolicyWaker::default();
        cfg.policy.attach(waker.clone());
        let high_water = bounds.newest.unwrap_or(bounds.floor);
        let (pages_tx, pages_rx) = mpsc::unbounded_channel();
        Router {
            sessions: HashMap::new(),
            subs: HashMap::new(),
            tables: HashMap::new(),
            next_uid: 1,
            epoch: bounds.epoch,
            high_water,
            tail: Tail::new(high_water, cfg.memory_bytes),
            log: cfg.log,
            policy: cfg.policy,
            waker,
            taps: cfg.taps,
            catalog,
            candidates: Vec::new(),
            stall_timeout: cfg.stall_timeout,
            max_subscriptions: cfg.max_subscriptions,
            lagging: HashSet::new(),
            pages_tx,
            pages_rx: Some(pages_rx),
            pages_in_flight: 0,
            page_queue: VecDeque::new(),
            generations: 0,
            ahead_wait: cfg.ahead_wait,
            wildcards: 0,
            policy_generation: 0,
            waiting: Vec::new(),
            writers: direct::Writers::new(),
        }
    }

    /// Runs until shutdown or until both inputs close.
    pub async fn run(
        mut self,
        mut feed: mpsc::Receiver<Feed>,
        mut commands: mpsc::Receiver<Command>,
        shutdown: CancellationToken,
    ) {
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let Some(mut pages) = self.pages_rx.take() else {
            return;
        };
        let tail_bytes = metrics::gauge!("aether_router_tail_bytes");
        let waker = self.waker.clone();
        loop {
            tokio::select! {
                biased;
                // 1. Shutdown.
                _ = shutdown.cancelled() => break,
                // 2. Subscription commands, so a burst of changes cannot starve them.
                cmd = commands.recv() => match cmd {
                    Some(cmd) => self.command(cmd),
                    None => break,
                },
                // 3. Pages read from the log for catching-up connections, and
                //    connections a pending policy decision was made for.
                Some(done) = pages.recv() => self.page_done(done),
                woken = waker.woken() => self.policy_decided(woken),
                // 4. Logged changes.
                f = feed.recv() => match f {
                    Some(f) => {
                        self.feed(f);
                        // Drain what is already queued, a bounded amount at a time.
                        for _ in 0..256 {
                            let Ok(f) = feed.try_recv() else { break };
                            self.feed(f);
                        }
                    }
                    None => break,
                },
                // 5. Close connections that stalled or fell out of the log.
                _ = tick.tick() => {
                    self.close_stalled(Instant::now());
                    if !self.waiting.is_empty() {
                        self.retry_waiting(true);
                    }
                    tail_bytes.set(self.tail.bytes() as f64);
                }
            }
        }
    }

    pub fn command(&mut self, cmd: Command) {
        match cmd {
            Command::Attach { session, handle } => {
                self.sessions.insert(
                    session,
                    SessionEntry {
                        handle,
                        subs: HashMap::new(),
                        lag: None,
                    },
                );
            }
            Command::Subscribe { session, spec } => self.subscribe(session, spec),
            Command::Unsubscribe { session, id } => {
                let uid = self
                    .sessions
                    .get_mut(&session)
                    .and_then(|s| s.subs.remove(&id));
                let waited = uid.is_none() && {
                    let before = self.waiting.len();
                    self.waiting.retain(|w| !(w.1 == session && w.2.id == id));
                    self.waiting.len() != before
                };
                let reply = match uid {
                    Some(uid) => {
                        self.remove_sub(uid);
                        Outbound::Unsubscribed { subscription: id }
                    }
                    // Still waiting for its `since`: it will not be made.
                    None if waited => Outbound::Unsubscribed { subscription: id },
                    None => Outbound::Error {
                        message: format!("no subscription {id:?} on this connection"),
                        subscription: Some(id),
                        code: "unknown_subscription",
                    },
                };
                self.send(session, reply);
            }
            Command::Detach { session } => self.detach(session),
            Command::SetPrincipal { session, principal } => {
                let Some(s) = self.sessions.get_mut(&session) else {
                    return;
                };
                s.handle.principal = principal;
                // A decision pending for the old principal is asked again.
                let pending = match s.lag.as_mut().filter(|l| l.awaiting) {
                    Some(lag) => {
                        lag.awaiting = false;
                        true
                    }
                    None => false,
                };
                self.policy.forget(session);
                self.reindex_policy(Some(&[session]));
                if pending {
                    self.advance(session);
                }
            }
            Command::Pull { session } => self.advance(session),
        }
    }

    /// One item of the log's feed.
    pub fn feed(&mut self, f: Feed) {
        match f {
            Feed::Relation(rel) => {
                if let Ok(mut c) = self.catalog.write() {
                    c.update_from_relation(&rel);
                }
            }
            Feed::Change(change) => {
                let change = Arc::new(Routed::counted(change, self.tail.counter()));
                // The log drops what it already held; this guards the invariant.
                if change.position <= self.high_water {
                    return;
                }
                self.high_water = change.position;
                let mut effects = Effects::default();
                for tap in &mut self.taps {
                    tap.change(&change, &mut effects);
                }
                for id in effects.revoked_sessions {
                    self.revoke(id);
                }
                self.policy.observe(change.change());
                self.route(&change);
                self.tail.push(change);
                if !self.waiting.is_empty() {
                    self.retry_waiting(false);
                }
            }
            Feed::Reset { epoch, floor } => self.reset(epoch, floor),
        }
    }

    /// The log started a new epoch: every subscription is told `gap` and dropped
    /// (its client must reload), and positions start over after `floor`.
    fn reset(&mut self, epoch: Epoch, floor: Position) {
        let ids: Vec<(u64, Arc<str>)> = self
            .sessions
            .iter()
            .flat_map(|(s, e)| e.subs.keys().map(|id| (*s, Arc::clone(id))))
            .collect();
        for (session, id) in ids {
            if let Some(uid) = self
                .sessions
                .get_mut(&session)
                .and_then(|e| e.subs.remove(&id))
            {
                self.remove_sub(uid);
            }
            self.send(
                session,
                Outbound::Error {
                    subscription: Some(id),
                    code: "gap",
                    message:
                        "the change log was reset (the replication slot was recreated): changes \
                              may have been missed; reload the data and subscribe again"
                            .into(),
                },
            );
        }
        for e in self.sessions.values_mut() {
            e.lag = None;
        }
        self.lagging.clear();
        self.page_queue.clear();
        self.tail.clear(floor);
        self.epoch = epoch;
        self.high_water = floor;
    }

    /// A signed-out auth session (a tap said so): its connections are closed
    /// now, not when their token expires.
    fn revoke(&mut self, id: uuid::Uuid) {
        let hit: Vec<u64> = self
            .sessions
            .iter()
            .filter(|(_, e)| e.handle.principal.session_id == Some(id))
            .map(|(s, _)| *s)
            .collect();
        for s in hit {
            if let Some(e) = self.sessions.get(&s) {
                tracing::info!(
                    event = "session_revoked",
                    session = s,
                    "closing a signed-out connection"
                );
                e.handle.tx.raise(queue::Signal::Revoked);
            }
            self.detach(s);
        }
    }

    /// Closes a connection that cannot keep up at all.
    fn kick(&mut self, session: u64, why: &str) {
        if let Some(entry) = self.sessions.get(&session) {
            tracing::warn!(
                event = "slow_consumer",
                session,
                why,
                "closing a slow connection"
            );
            metrics::counter!("aether_queue_drops_total", "kind" => "closed").increment(1);
            entry.handle.tx.raise(queue::Signal::Overflowed);
        }
        self.detach(session);
    }

    fn detach(&mut self, session: u64) {
        self.waiting.retain(|w| w.1 != session);
        if let Some(entry) = self.sessions.remove(&session) {
            self.policy.forget(session);
            self.lagging.remove(&session);
            for uid in entry.subs.into_values() {
                self.remove_sub(uid);
            }
        }
    }

    /// Queues a reply. Replies cannot be paged from the log, so a connection whose
    /// queue is full even for them is closed.
    fn send(&mut self, session: u64, out: Outbound) {
        let Some(entry) = self.sessions.get(&session) else {
            return;
        };
        match entry.handle.tx.try_send(out) {
            Ok(()) => {}
            Err(queue::TrySendError::Full(_)) => self.kick(session, "queue full for a reply"),
            Err(queue::TrySendError::Closed(_)) => self.detach(session),
        }
    }

    /// Bytes and changes of the hot tail.
    pub fn tail_size(&self) -> (usize, usize) {
        (self.tail.bytes(), self.tail.len())
    }
}

#[cfg(test)]
mod tests;
