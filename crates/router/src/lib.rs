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
pub mod filter;
pub mod policy;
pub mod routed;
pub mod tail;
pub mod tap;

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use aether_changelog::pump::Feed;
use aether_changelog::{LogError, Page, ReadHint, SharedLog};
use aether_core::changes::{ChangeKind, Relation, RowChange};
use aether_core::lsn::{Epoch, Position, SinceId, StreamId};
use aether_core::principal::Principal;
use filter::{Filter, key_of};
use policy::{Decision, Policy, PolicyWaker, Viewer};
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
#[derive(Debug)]
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
    /// A frame encoded once by its producer (channel messages, presence, system).
    Frame(Arc<str>),
}

/// A connection as the router knows it.
#[derive(Clone)]
pub struct SessionHandle {
    pub tx: mpsc::Sender<Outbound>,
    /// Cancelled by the router when the connection cannot keep up at all.
    pub overflowed: CancellationToken,
    /// Cancelled when the auth session of the connection's token is signed out.
    pub revoked: CancellationToken,
    /// Signalled when the connection starts lagging: once its queue is half empty the
    /// writer answers with [`Command::Pull`].
    pub lagging: Arc<tokio::sync::Notify>,
    pub principal: Arc<Principal>,
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

struct Subscription {
    session: u64,
    id: Arc<str>,
    table: Arc<str>,
    events: EventMask,
    filter: Filter,
    /// (column, key) under which it is indexed, if any.
    index: Option<(String, String)>,
    /// The newest change this subscription was offered (sent, or judged not for
    /// it): a catching-up connection skips what it already had.
    seen: Position,
}

#[derive(Default)]
struct TableSubs {
    scan: HashSet<u64>,
    by_column: HashMap<String, HashMap<String, HashSet<u64>>>,
}

impl TableSubs {
    fn is_empty(&self) -> bool {
        self.scan.is_empty() && self.by_column.is_empty()
    }
}

struct SessionEntry {
    handle: SessionHandle,
    subs: HashMap<Arc<str>, u64>,
    lag: Option<Lag>,
}

/// Where a lagging connection stands.
struct Lag {
    /// Every change up to here was offered to all its subscriptions.
    after: Position,
    /// Last time it asked for more (or started lagging).
    since: Instant,
    /// A page is being read from the log for it.
    paging: bool,
    /// The policy is deciding on its next change ([`Decision::Pending`]).
    awaiting: bool,
    /// Where the last page ended in the log.
    hint: Option<ReadHint>,
    /// Bumped when `after` moves back (a `since` subscription on a lagging
    /// connection): a page read for the old position is discarded.
    generation: u64,
}

/// A lagging connection asks for the next missed changes once its queue is down to
/// half: the router refills it while the writer still has frames to send, so the
/// socket never idles waiting for a page.
pub fn low_water(rx: &mpsc::Receiver<Outbound>) -> bool {
    rx.len() <= rx.max_capacity() / 2
}

/// Bytes of log records read per page.
const PAGE_BYTES: usize = 512 << 10;
/// Pages being read at once, for all connections: what paging holds in memory is
/// bounded by this times a page.
const PAGES_IN_FLIGHT: usize = 4;

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
}

struct PageDone {
    session: u64,
    generation: u64,
    result: Result<Page, LogError>,
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
                let reply = match uid {
                    Some(uid) => {
                        self.remove_sub(uid);
                        Outbound::Unsubscribed { subscription: id }
                    }
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
                if let Some(s) = self.sessions.get_mut(&session) {
                    s.handle.principal = principal;
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
                let change = Arc::new(Routed::new(change));
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
                self.policy.observe(&change);
                self.route(&change);
                self.tail.push(change);
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
                e.handle.revoked.cancel();
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
            entry.handle.overflowed.cancel();
        }
        self.detach(session);
    }

    fn close_stalled(&mut self, now: Instant) {
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
    fn advance(&mut self, session: u64) {
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
    fn policy_decided(&mut self, woken: Vec<u64>) {
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
    fn request_page(&mut self, session: u64) {
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
            .map_or(1, |e| e.handle.tx.capacity().max(1));
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

    fn page_done(&mut self, done: PageDone) {
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

    fn gap(&mut self, session: u64, id: Arc<str>, message: String) {
        self.send(
            session,
            Outbound::Error {
                subscription: Some(id),
                code: "gap",
                message,
            },
        );
    }

    fn subscribe(&mut self, session: u64, spec: SubscriptionSpec) {
        let Some(entry) = self.sessions.get(&session) else {
            return;
        };
        if entry.subs.contains_key(&spec.id) {
            let msg = format!(
                "subscription id {:?} is already in use on this connection",
                spec.id
            );
            self.send(
                session,
                Outbound::Error {
                    subscription: Some(spec.id),
                    code: "duplicate_subscription",
                    message: msg,
                },
            );
            return;
        }
        if entry.subs.len() >= self.max_subscriptions {
            let message = format!(
                "this connection already holds {} subscriptions, the most allowed (WS_MAX_SUBSCRIPTIONS); unsubscribe first",
                entry.subs.len()
            );
            self.send(
                session,
                Outbound::Error {
                    subscription: Some(spec.id),
                    code: "too_many_subscriptions",
                    message,
                },
            );
            return;
        }
        // Where the subscription starts: `since`, checked against this log.
        let start = match spec.since {
            None => self.high_water,
            Some(SinceId::Bare(p)) => {
                let message = format!(
                    "position {p} names no change log (it has no epoch; it is from an older Aether): \
                     reload the data and subscribe without `since`"
                );
                return self.gap(session, spec.id, message);
            }
            Some(SinceId::Stream(id)) if id.epoch != self.epoch => {
                let message = format!(
                    "position {id} is from another change log (epoch {}; this one is {}): the log was \
                     reset or replaced, changes may have been missed; reload the data and subscribe without `since`",
                    id.epoch, self.epoch
                );
                return self.gap(session, spec.id, message);
            }
            Some(SinceId::Stream(id)) if id.position > self.high_water => {
                let message = format!(
                    "position {id} is ahead of the newest change ({}): it was not handed out by this log; \
                     reload the data and subscribe without `since`",
                    StreamId {
                        position: self.high_water,
                        epoch: self.epoch
                    }
                );
                return self.gap(session, spec.id, message);
            }
            Some(SinceId::Stream(id)) => {
                let floor = self.log.bounds().floor;
                if id.position < floor {
                    let message = format!(
                        "position {id} is older than the changes Aether still holds (from {} on); \
                         reload the data and subscribe without `since`",
                        StreamId {
                            position: floor,
                            epoch: self.epoch
                        }
                    );
                    return self.gap(session, spec.id, message);
                }
                id.position
            }
        };
        let uid = self.next_uid;
        self.next_uid += 1;
        let index = spec.filter.index_key().map(|(c, k)| (c.to_owned(), k));
        let t = self.tables.entry(Arc::clone(&spec.table)).or_default();
        match &index {
            Some((col, key)) => {
                t.by_column
                    .entry(col.clone())
                    .or_default()
                    .entry(key.clone())
                    .or_default()
                    .insert(uid);
            }
            None => {
                t.scan.insert(uid);
            }
        }
        self.subs.insert(
            uid,
            Subscription {
                session,
                id: Arc::clone(&spec.id),
                table: spec.table,
                events: spec.events,
                filter: spec.filter,
                index,
                seen: start,
            },
        );
        let position = StreamId {
            position: self.high_water,
            epoch: self.epoch,
        };
        let Some(entry) = self.sessions.get_mut(&session) else {
            return;
        };
        entry.subs.insert(Arc::clone(&spec.id), uid);
        let replay = start < self.high_water;
        if replay {
            // The connection (re)starts catching up at `start`. Its other
            // subscriptions were offered everything up to where it stood.
            let stood = entry.lag.as_ref().map_or(self.high_water, |l| l.after);
            if start < stood {
                for other in entry.subs.values().filter(|u| **u != uid) {
                    if let Some(s) = self.subs.get_mut(other) {
                        s.seen = s.seen.max(stood);
                    }
                }
                self.generations += 1;
                match entry.lag.as_mut() {
                    Some(lag) => {
                        lag.after = start;
                        lag.hint = None;
                        lag.generation = self.generations;
                    }
                    None => {
                        entry.lag = Some(Lag {
                            after: start,
                            since: Instant::now(),
                            paging: false,
                            awaiting: false,
                            hint: None,
                            generation: self.generations,
                        });
                        self.lagging.insert(session);
                    }
                }
            }
        }
        self.send(
            session,
            Outbound::Subscribed {
                subscription: spec.id,
                position,
            },
        );
        if replay {
            self.advance(session);
        }
    }

    fn remove_sub(&mut self, uid: u64) {
        let Some(sub) = self.subs.remove(&uid) else {
            return;
        };
        if let Some(t) = self.tables.get_mut(&sub.table) {
            match &sub.index {
                Some((col, key)) => {
                    if let Some(keys) = t.by_column.get_mut(col) {
                        if let Some(set) = keys.get_mut(key) {
                            set.remove(&uid);
                            if set.is_empty() {
                                keys.remove(key);
                            }
                        }
                        if keys.is_empty() {
                            t.by_column.remove(col);
                        }
                    }
                }
                None => {
                    t.scan.remove(&uid);
                }
            }
            if t.is_empty() {
                self.tables.remove(&sub.table);
            }
        }
    }

    fn detach(&mut self, session: u64) {
        if let Some(entry) = self.sessions.remove(&session) {
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
            Err(mpsc::error::TrySendError::Full(_)) => self.kick(session, "queue full for a reply"),
            Err(mpsc::error::TrySendError::Closed(_)) => self.detach(session),
        }
    }

    fn route(&mut self, change: &Arc<Routed>) {
        let Some(t) = self.tables.get(&change.relation.qualified) else {
            return;
        };
        let mut candidates = std::mem::take(&mut self.candidates);
        candidates.clear();
        candidates.extend(t.scan.iter().copied());
        for (col, keys) in &t.by_column {
            let Some(i) = change.relation.column_index(col) else {
                continue;
            };
            for row in [change.new.as_ref(), change.old.as_ref()]
                .into_iter()
                .flatten()
            {
                if let Some(Some(v)) = row.get(i)
                    && let Some(k) = key_of(v)
                    && let Some(set) = keys.get(k.as_ref())
                {
                    candidates.extend(set.iter().copied());
                }
            }
        }
        if change.kind == ChangeKind::Truncate {
            // A truncate names no row: every subscription of the table hears of it.
            for keys in t.by_column.values() {
                for set in keys.values() {
                    candidates.extend(set.iter().copied());
                }
            }
        }
        candidates.sort_unstable();
        candidates.dedup();
        let mut closed = Vec::new();
        for &uid in &candidates {
            let Some(sub) = self.subs.get_mut(&uid) else {
                continue;
            };
            if !sub.events.contains(change.kind) {
                continue;
            }
            let Some(entry) = self.sessions.get_mut(&sub.session) else {
                continue;
            };
            // A lagging connection gets this change from the tail when it pulls.
            if entry.lag.is_some() || !matches(change, &sub.filter) {
                continue;
            }
            match decide(
                &mut *self.policy,
                sub.session,
                &entry.handle.principal,
                change,
            ) {
                Decision::Allow => {}
                Decision::Deny => {
                    sub.seen = change.position;
                    continue;
                }
                Decision::Pending => {
                    // Like a full queue, but nothing to pull until the policy
                    // wakes it.
                    self.generations += 1;
                    entry.lag = Some(Lag {
                        after: change.position.just_before(),
                        since: Instant::now(),
                        paging: false,
                        awaiting: true,
                        hint: None,
                        generation: self.generations,
                    });
                    self.lagging.insert(sub.session);
                    continue;
                }
            }
            let out = Outbound::Change {
                subscription: Arc::clone(&sub.id),
                change: Arc::clone(change),
            };
            match entry.handle.tx.try_send(out) {
                Ok(()) => sub.seen = change.position,
                Err(mpsc::error::TrySendError::Full(_)) => {
                    tracing::debug!(
                        session = sub.session,
                        "outbound queue full: lagging, catching up from the log"
                    );
                    metrics::counter!("aether_queue_drops_total", "kind" => "lagging").increment(1);
                    // Subscriptions that got this change already have it as `seen`.
                    self.generations += 1;
                    entry.lag = Some(Lag {
                        after: change.position.just_before(),
                        since: Instant::now(),
                        paging: false,
                        awaiting: false,
                        hint: None,
                        generation: self.generations,
                    });
                    self.lagging.insert(sub.session);
                    entry.handle.lagging.notify_one();
                }
                Err(mpsc::error::TrySendError::Closed(_)) => closed.push(sub.session),
            }
        }
        self.candidates = candidates;
        for s in closed {
            self.detach(s);
        }
    }

    /// Bytes and changes of the hot tail.
    pub fn tail_size(&self) -> (usize, usize) {
        (self.tail.bytes(), self.tail.len())
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
        for uid in &uids {
            let Some(sub) = subs.get_mut(uid) else {
                continue;
            };
            if c.position <= sub.seen
                || *sub.table != *c.relation.qualified
                || !sub.events.contains(c.kind)
                || !matches(c, &sub.filter)
            {
                continue;
            }
            match decide(policy, session, principal, c) {
                Decision::Allow => {}
                Decision::Deny => {
                    sub.seen = c.position;
                    continue;
                }
                Decision::Pending => {
                    lag.after = c.position.just_before();
                    lag.awaiting = true;
                    return true;
                }
            }
            let out = Outbound::Change {
                subscription: Arc::clone(&sub.id),
                change: Arc::clone(c),
            };
            if entry.handle.tx.try_send(out).is_err() {
                lag.after = c.position.just_before();
                entry.handle.lagging.notify_one();
                return true;
            }
            sub.seen = c.position;
        }
        lag.after = c.position;
    }
    false
}

/// Does the change match the subscription's filter?
fn matches(change: &RowChange, filter: &Filter) -> bool {
    let rel: &Relation = &change.relation;
    if change.kind == ChangeKind::Truncate {
        return true;
    }
    let filter_ok =
        |row: Option<&aether_core::changes::Row>| row.is_some_and(|r| filter.matches(rel, r));
    // An UPDATE that moves a row out of a filter's range is still news to its
    // subscribers: match on the new or the old row.
    match change.kind {
        ChangeKind::Update => filter_ok(change.new.as_ref()) || filter_ok(change.old.as_ref()),
        _ => filter_ok(change.visible_row()),
    }
}

/// The policy's word on one change for one connection. A TRUNCATE names no row
/// and goes to every subscription of its table.
fn decide(
    policy: &mut dyn Policy,
    connection: u64,
    principal: &Principal,
    change: &RowChange,
) -> Decision {
    if change.kind == ChangeKind::Truncate {
        return Decision::Allow;
    }
    policy.decide(
        Viewer {
            connection,
            principal,
        },
        change,
    )
}

#[cfg(test)]
mod tests;
