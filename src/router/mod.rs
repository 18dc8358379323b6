//! The router: one task that owns the subscription index, the resume history and
//! the acknowledgement position.
//!
//! Changes and subscription commands arrive on bounded channels and are handled in
//! one order, so "subscribed" means live: every change the router handles after a
//! subscription was registered is checked against it, and a `since` replay is cut
//! from history at the same instant (no gap, no duplicate).
//!
//! Delivery never waits on a client: frames go to each connection's bounded queue
//! with `try_send`. A full queue puts the connection in the *lagging* state: live
//! changes stop going to it, and as its writer drains the queue it pulls the missed
//! changes from the resume history (one shared copy for everyone) until it is back
//! at the head, then goes live again. A lagging connection that stops draining for
//! the stall timeout, or falls behind the resume window, is closed with a reason
//! and can resume with `since`. Either way the change counts as handed on.
//!
//! The one wait: a lagging connection that is still draining and would fall out of
//! the window with the next change holds the replication stream until it pulls,
//! within per-connection and shared time budgets (see [`Router::holder`]).
//!
//! Routing cost follows the matching subscriptions: subscriptions with an equality
//! filter are found through a hash index on (column, value), the rest of a table's
//! subscriptions are scanned.

pub mod authz;
pub mod catalog;
pub mod filter;
pub mod history;

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::auth::Principal;
use crate::changes::{ChangeKind, Output, Relation, RowChange};
use crate::replication::lsn::{PgLsn, Position};
use filter::{Filter, key_of};
use history::History;

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
        change: Arc<RowChange>,
    },
    /// The subscription is live; `replay` holds the changes after its `since`.
    /// `position` is the newest change routed before it was registered: every
    /// change it is sent live comes after it, so it is where a client that has
    /// received nothing yet resumes from.
    Subscribed {
        subscription: Arc<str>,
        replay: Vec<Arc<RowChange>>,
        position: Position,
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
    pub since: Option<Position>,
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

/// What the replication side learns back from the router.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Progress {
    /// PostgreSQL may forget WAL up to here.
    pub released: PgLsn,
    /// End LSN of the last transaction the router has handled.
    pub handled_end: PgLsn,
    /// Every handled transaction is released (the window holds no change).
    pub all_released: bool,
    /// Every change after this position is held (persisted before `released` is
    /// acknowledged, so resumes stay exact across restarts).
    pub floor: Option<Position>,
}

struct Subscription {
    session: u64,
    id: Arc<str>,
    table: Arc<str>,
    events: EventMask,
    filter: Filter,
    /// (column, key) under which it is indexed, if any.
    index: Option<(String, String)>,
    /// The last change handled when it was made: a lagging connection's pages skip
    /// what came before (a `since` replay already had it).
    from: Option<Position>,
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
    /// Time this connection has held the stream back so far (see [`Router::holder`]).
    held: Duration,
}

/// Where a lagging connection stands.
struct Lag {
    /// The first change it has not fully received.
    next: Position,
    /// Subscriptions that did receive `next` already.
    served: Vec<Arc<str>>,
    /// Last time it asked for more (or started lagging).
    since: Instant,
}

/// A lagging connection asks for the next missed changes once its queue is down to
/// half: the router refills it while the writer still has frames to send, so the
/// socket never idles waiting for a page.
pub fn low_water(rx: &mpsc::Receiver<Outbound>) -> bool {
    rx.len() <= rx.max_capacity() / 2
}

/// A lagging connection may hold the stream back only while it keeps emptying its
/// queue at least this often.
const HOLD_DRAIN_WITHIN: Duration = Duration::from_secs(1);

/// The shared hold credit refills at 1/HOLD_SHARE of wall time.
const HOLD_SHARE: u32 = 4;

pub struct RouterConfig {
    /// The resume floor persisted by the previous run, if any.
    pub floor: Option<Position>,
    pub channel_configs: Option<crate::realtime::hub::ChannelConfigs>,
    /// KingShare connections, told of file and share events derived from changes.
    pub kingshare: Option<Arc<crate::realtime::kingshare::Notifier>>,
    /// KingShare events go out only for changes committed from here on: the
    /// resume window decoded again after a restart must not repeat them.
    pub kingshare_from: PgLsn,
    pub confirmed: PgLsn,
    /// A lagging connection that drains nothing for this long is closed.
    pub stall_timeout: Duration,
    /// How long, in all, one draining connection may hold the stream back.
    pub catchup_hold: Duration,
    /// Subscriptions one connection may hold: each costs memory and routing work.
    pub max_subscriptions: usize,
    pub retention_events: usize,
    pub retention: Duration,
    pub public_buckets: HashSet<String>,
}

pub struct Router {
    sessions: HashMap<u64, SessionEntry>,
    subs: HashMap<u64, Subscription>,
    tables: HashMap<Arc<str>, TableSubs>,
    next_uid: u64,
    history: History,
    public_buckets: HashSet<String>,
    high_water: Option<Position>,
    last_commit: PgLsn,
    open_tx_last: Option<Position>,
    handled_end: PgLsn,
    catalog: catalog::SharedCatalog,
    progress: watch::Sender<Progress>,
    candidates: Vec<u64>,
    /// Channel settings of the WebSocket API, kept current from `aether.channels`.
    channel_configs: Option<crate::realtime::hub::ChannelConfigs>,
    kingshare: Option<Arc<crate::realtime::kingshare::Notifier>>,
    kingshare_from: PgLsn,
    /// (connection, subscription) pairs the change being routed went to.
    delivered_now: Vec<(u64, Arc<str>)>,
    stall_timeout: Duration,
    catchup_hold: Duration,
    max_subscriptions: usize,
    /// Lagging connections by the position they need next (usually none), so the
    /// hold check looks only at those the next eviction would cut off.
    lag_index: BTreeSet<(Position, u64)>,
    /// The connection the stream is held for, and since when.
    holding: Option<(u64, Instant)>,
    /// Hold time left for everyone together: refilled at a quarter of wall time,
    /// at most `catchup_hold`, so reconnecting for a fresh per-connection budget
    /// cannot hold the stream more than a quarter of the time.
    hold_credit: Duration,
    hold_credit_at: Instant,
}

impl Router {
    pub fn new(
        cfg: RouterConfig,
        catalog: catalog::SharedCatalog,
        progress: watch::Sender<Progress>,
    ) -> Self {
        let history = History::new(
            cfg.confirmed,
            cfg.floor,
            cfg.retention_events,
            cfg.retention,
        );
        Router {
            sessions: HashMap::new(),
            subs: HashMap::new(),
            tables: HashMap::new(),
            next_uid: 1,
            history,
            public_buckets: cfg.public_buckets,
            high_water: None,
            last_commit: PgLsn::ZERO,
            open_tx_last: None,
            handled_end: cfg.confirmed,
            catalog,
            progress,
            candidates: Vec::new(),
            channel_configs: cfg.channel_configs,
            kingshare: cfg.kingshare,
            kingshare_from: cfg.kingshare_from,
            delivered_now: Vec::new(),
            stall_timeout: cfg.stall_timeout,
            catchup_hold: cfg.catchup_hold,
            max_subscriptions: cfg.max_subscriptions,
            lag_index: BTreeSet::new(),
            holding: None,
            hold_credit: cfg.catchup_hold,
            hold_credit_at: Instant::now(),
        }
    }

    /// Runs until shutdown or until both inputs close.
    pub async fn run(
        mut self,
        mut changes: mpsc::Receiver<Output>,
        mut commands: mpsc::Receiver<Command>,
        shutdown: CancellationToken,
    ) {
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            // Nobody lagging and nothing being held: the common case costs nothing.
            let hold_until = if self.holding.is_some() || self.may_hold() {
                self.update_hold(Instant::now(), !changes.is_empty())
            } else {
                None
            };
            let held = hold_until.is_some();
            tokio::select! {
                biased;
                // 1. Shutdown.
                _ = shutdown.cancelled() => break,
                // 2. Subscription commands, so a burst of changes cannot starve them.
                cmd = commands.recv() => match cmd {
                    Some(cmd) => self.command(cmd),
                    None => break,
                },
                // 3. Changes from the replication stream, unless a catching-up
                //    connection holds it back.
                out = changes.recv(), if !held => match out {
                    Some(out) => {
                        self.output(out);
                        // Drain what is already queued before publishing progress.
                        while !(self.may_hold() && self.holder(Instant::now()).is_some()) {
                            let Ok(out) = changes.try_recv() else { break };
                            self.output(out);
                        }
                        self.publish();
                    }
                    None => break,
                },
                // The holder stops counting as draining: look again.
                _ = async {
                    match hold_until {
                        Some(t) => tokio::time::sleep_until(t.into()).await,
                        None => std::future::pending().await,
                    }
                }, if held => {}
                // 4. Age out the resume window.
                _ = tick.tick() => {
                    self.history.evict(Instant::now());
                    self.close_stalled(Instant::now());
                    self.publish();
                }
            }
        }
    }

    /// Cheap test before [`Router::holder`]: someone lags and the window is full.
    fn may_hold(&self) -> bool {
        !self.lag_index.is_empty() && self.history.is_full()
    }

    /// The connection the stream must wait for, if any, and until when it counts as
    /// draining: a lagging connection that would fall out of the resume window with
    /// the next change, asked for more within the last second, and has hold time
    /// left (its own, and everyone's together).
    ///
    /// Without this a lone client catching up on a backlog larger than the window
    /// is outrun by the router and closed however fast it reads. With it the stream
    /// is paced to that client for at most `catchup_hold` in all per connection, and
    /// at most a quarter of the time overall; a client that drains nothing never
    /// holds anything back for longer than a second.
    fn holder(&self, now: Instant) -> Option<(u64, Instant)> {
        if !self.may_hold() || self.hold_credit.is_zero() {
            return None;
        }
        let front = self.history.front()?;
        self.lag_index
            .range(..=(front, u64::MAX))
            .find_map(|&(_, id)| {
                let e = self.sessions.get(&id)?;
                let lag = e.lag.as_ref()?;
                let draining_until = lag.since + HOLD_DRAIN_WITHIN;
                (now < draining_until && e.held < self.catchup_hold).then_some((id, draining_until))
            })
    }

    /// Charges the hold time since the last call to the connection it was for and
    /// to the shared credit (only while changes were waiting: holding an idle
    /// stream costs no one anything), then says until when the stream is held now.
    fn update_hold(&mut self, now: Instant, pending: bool) -> Option<Instant> {
        let elapsed = now.duration_since(self.hold_credit_at);
        self.hold_credit_at = now;
        self.hold_credit = (self.hold_credit + elapsed / HOLD_SHARE).min(self.catchup_hold);
        if let Some((id, last)) = self.holding.take()
            && pending
        {
            let spent = now.duration_since(last);
            metrics::counter!("aether_stream_held_microseconds_total")
                .increment(spent.as_micros() as u64);
            self.hold_credit = self.hold_credit.saturating_sub(spent);
            if let Some(e) = self.sessions.get_mut(&id) {
                e.held += spent;
            }
        }
        let holder = self.holder(now);
        self.holding = holder.map(|(id, _)| (id, now));
        holder.map(|(_, until)| until)
    }

    fn publish(&self) {
        let p = Progress {
            released: self.history.released(),
            handled_end: self.handled_end,
            all_released: self.history.all_released() && self.open_tx_last.is_none(),
            floor: Some(self.history.floor()),
        };
        self.progress.send_if_modified(|old| {
            if *old == p {
                false
            } else {
                *old = p;
                true
            }
        });
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
                        held: Duration::ZERO,
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
            Command::Pull { session } => self.pull(session),
        }
    }

    /// A signed-out auth session (`auth.sessions.revoked_at` set, or the row gone):
    /// its connections are closed now, not when their token expires.
    fn close_revoked(&mut self, change: &RowChange) {
        let rel = &change.relation;
        if rel.schema != "auth" || rel.name != "sessions" {
            return;
        }
        let at = |row: &crate::changes::Row, col: &str| {
            rel.column_index(col)
                .and_then(|i| row.get(i))
                .and_then(|v| v.clone())
        };
        let revoked = match (change.kind, &change.new, &change.old) {
            (ChangeKind::Update | ChangeKind::Insert, Some(new), _) => at(new, "revoked_at")
                .is_some_and(|v| !v.is_null())
                .then(|| at(new, "id"))
                .flatten(),
            (ChangeKind::Delete, _, Some(old)) => at(old, "id"),
            _ => None,
        };
        let Some(serde_json::Value::String(id)) = revoked else {
            return;
        };
        let Ok(id) = uuid::Uuid::parse_str(&id) else {
            return;
        };
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
        let floor_ok = |next: Position, h: &History| h.since(next.just_before()).is_ok();
        // Only lagging connections can stall: the index lists them.
        let stalled: Vec<(u64, &'static str)> = self
            .lag_index
            .iter()
            .filter_map(|(_, id)| {
                let lag = self.sessions.get(id)?.lag.as_ref()?;
                if now.duration_since(lag.since) > self.stall_timeout {
                    Some((*id, "stalled: its queue stayed full"))
                } else if !floor_ok(lag.next, &self.history) {
                    Some((*id, "fell behind the resume window"))
                } else {
                    None
                }
            })
            .collect();
        for (id, why) in stalled {
            self.kick(id, why);
        }
    }

    /// Sends a lagging connection what it missed, from history, until its queue is
    /// full again (it stays lagging) or it is back at the head (it goes live).
    fn pull(&mut self, session: u64) {
        let Some(entry) = self.sessions.get_mut(&session) else {
            return;
        };
        let Some(lag) = entry.lag.as_mut() else {
            return;
        };
        lag.since = Instant::now();
        let (next, mut served) = (lag.next, lag.served.clone());
        let Ok(held) = self.history.since(next.just_before()) else {
            return self.kick(session, "fell behind the resume window");
        };
        let Some(entry) = self.sessions.get_mut(&session) else {
            return;
        };
        let subs: Vec<&Subscription> = entry
            .subs
            .values()
            .filter_map(|uid| self.subs.get(uid))
            .collect();
        let principal = &entry.handle.principal;
        let mut stopped_at = None;
        'changes: for c in held {
            if c.position != next {
                served.clear();
            }
            for sub in &subs {
                if *sub.table != *c.relation.qualified
                    || !sub.events.contains(c.kind)
                    || sub.from.is_some_and(|from| c.position <= from)
                    || served.iter().any(|s| **s == *sub.id)
                    || !passes(c, &sub.filter, principal, &self.public_buckets)
                {
                    continue;
                }
                let out = Outbound::Change {
                    subscription: Arc::clone(&sub.id),
                    change: Arc::clone(c),
                };
                if entry.handle.tx.try_send(out).is_err() {
                    stopped_at = Some(c.position);
                    break 'changes;
                }
                served.push(Arc::clone(&sub.id));
            }
        }
        match stopped_at {
            Some(position) => {
                if let Some(lag) = entry.lag.as_mut() {
                    lag.next = position;
                    lag.served = served;
                }
                entry.handle.lagging.notify_one();
                self.lag_index.remove(&(next, session));
                self.lag_index.insert((position, session));
            }
            None => {
                entry.lag = None;
                self.lag_index.remove(&(next, session));
            }
        }
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
        let principal = Arc::clone(&entry.handle.principal);
        let mut replay = Vec::new();
        if let Some(since) = spec.since {
            let held = self.history.since(since).map(|iter| {
                iter.filter(|c| {
                    *c.relation.qualified == *spec.table
                        && spec.events.contains(c.kind)
                        && passes(c, &spec.filter, &principal, &self.public_buckets)
                })
                .cloned()
                .collect::<Vec<_>>()
            });
            match held {
                Ok(changes) => replay = changes,
                Err(gap) => {
                    let message = format!(
                        "position {since} is older than the changes Aether still holds (from {} on); \
                         reload the data and subscribe without `since`",
                        gap.floor
                    );
                    self.send(
                        session,
                        Outbound::Error {
                            subscription: Some(spec.id),
                            code: "gap",
                            message,
                        },
                    );
                    return;
                }
            }
        }
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
                from: self.high_water,
            },
        );
        if let Some(e) = self.sessions.get_mut(&session) {
            e.subs.insert(Arc::clone(&spec.id), uid);
        }
        let position = self.high_water.unwrap_or_else(|| self.history.floor());
        self.send(
            session,
            Outbound::Subscribed {
                subscription: spec.id,
                replay,
                position,
            },
        );
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
            if let Some(lag) = &entry.lag {
                self.lag_index.remove(&(lag.next, session));
            }
            for uid in entry.subs.into_values() {
                self.remove_sub(uid);
            }
        }
    }

    /// Queues a reply. Replies cannot be paged from history, so a connection whose
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

    /// Queues a live change, or starts lagging if the queue is full.
    fn send_change(&mut self, session: u64, subscription: Arc<str>, change: &Arc<RowChange>) {
        let Some(entry) = self.sessions.get_mut(&session) else {
            return;
        };
        if entry.lag.is_some() {
            // Lagging: this change will come from history when the connection pulls.
            return;
        }
        let out = Outbound::Change {
            subscription: Arc::clone(&subscription),
            change: Arc::clone(change),
        };
        match entry.handle.tx.try_send(out) {
            Ok(()) => self.delivered_now.push((session, subscription)),
            Err(mpsc::error::TrySendError::Full(_)) => {
                tracing::debug!(session, "outbound queue full: lagging, paging from history");
                metrics::counter!("aether_queue_drops_total", "kind" => "lagging").increment(1);
                // Subscriptions of this connection that already got this change.
                let served = self
                    .delivered_now
                    .iter()
                    .filter(|(s, _)| *s == session)
                    .map(|(_, id)| Arc::clone(id))
                    .collect();
                entry.lag = Some(Lag {
                    next: change.position,
                    served,
                    since: Instant::now(),
                });
                self.lag_index.insert((change.position, session));
                entry.handle.lagging.notify_one();
            }
            Err(mpsc::error::TrySendError::Closed(_)) => self.detach(session),
        }
    }

    pub fn output(&mut self, out: Output) {
        match out {
            Output::Begin { .. } => {}
            Output::Relation(rel) => {
                if let Ok(mut c) = self.catalog.write() {
                    c.update_from_relation(&rel);
                }
            }
            Output::Change(change) => {
                // After a reconnect the server re-sends from the confirmed position:
                // positions are deterministic, so what was handled is recognized.
                if self.high_water.is_some_and(|hw| change.position <= hw) {
                    return;
                }
                self.high_water = Some(change.position);
                self.open_tx_last = Some(change.position);
                if let Some(configs) = &self.channel_configs {
                    track_channels(&change, configs);
                }
                self.close_revoked(&change);
                if let Some(ks) = &self.kingshare
                    && change.commit_lsn() >= self.kingshare_from
                {
                    for (user, frame) in crate::realtime::kingshare::events_for(&change) {
                        ks.to_user(&user, &frame);
                    }
                }
                authz::track_buckets(
                    &change.relation,
                    change.new.as_ref(),
                    change.old.as_ref(),
                    &mut self.public_buckets,
                );
                if change.kind == ChangeKind::Truncate
                    && *change.relation.qualified == *"public.buckets"
                {
                    self.public_buckets.clear();
                }
                self.route(&change);
                self.history.push(change, Instant::now());
            }
            Output::Commit {
                commit_lsn,
                end_lsn,
                ..
            } => {
                if commit_lsn <= self.last_commit && self.last_commit != PgLsn::ZERO {
                    self.open_tx_last = None;
                    return;
                }
                self.last_commit = commit_lsn;
                self.handled_end = self.handled_end.max(end_lsn);
                let last = self.open_tx_last.take();
                self.history.commit(last, end_lsn, Instant::now());
            }
        }
    }

    fn route(&mut self, change: &Arc<RowChange>) {
        let Some(t) = self.tables.get(&change.relation.qualified) else {
            return;
        };
        let mut candidates = std::mem::take(&mut self.candidates);
        candidates.clear();
        self.delivered_now.clear();
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
        for &uid in &candidates {
            let Some(sub) = self.subs.get(&uid) else {
                continue;
            };
            if !sub.events.contains(change.kind) {
                continue;
            }
            let Some(entry) = self.sessions.get(&sub.session) else {
                continue;
            };
            // A lagging connection gets this change from history when it pulls.
            if entry.lag.is_some()
                || !passes(
                    change,
                    &sub.filter,
                    &entry.handle.principal,
                    &self.public_buckets,
                )
            {
                continue;
            }
            let session = sub.session;
            let subscription = Arc::clone(&sub.id);
            self.send_change(session, subscription, change);
        }
        self.candidates = candidates;
    }

    pub fn history_len(&self) -> usize {
        self.history.len()
    }
}

/// Applies changes to `aether.channels` to the live channel settings.
fn track_channels(change: &RowChange, configs: &crate::realtime::hub::ChannelConfigs) {
    let rel = &change.relation;
    if rel.schema != "aether" || rel.name != "channels" {
        return;
    }
    let at = |row: &crate::changes::Row, col: &str| {
        rel.column_index(col)
            .and_then(|i| row.get(i))
            .and_then(|v| v.clone())
    };
    let Ok(mut map) = configs.write() else { return };
    match change.kind {
        ChangeKind::Truncate => map.clear(),
        ChangeKind::Delete => {
            if let Some(serde_json::Value::String(name)) =
                change.old.as_ref().and_then(|o| at(o, "name"))
            {
                map.remove(&name);
            }
        }
        ChangeKind::Insert | ChangeKind::Update => {
            let Some(new) = &change.new else { return };
            if let Some(serde_json::Value::String(old)) =
                change.old.as_ref().and_then(|o| at(o, "name"))
            {
                map.remove(&old);
            }
            let Some(serde_json::Value::String(name)) = at(new, "name") else {
                return;
            };
            let num = |col: &str| {
                at(new, col)
                    .and_then(|v| v.as_u64())
                    .and_then(|n| u32::try_from(n).ok())
            };
            let config = crate::realtime::hub::ChannelConfig {
                max_connections: num("max_connections"),
                message_rate_limit: num("message_rate_limit"),
                require_auth: at(new, "require_auth")
                    .and_then(|v| v.as_bool())
                    .unwrap_or(false),
            };
            map.insert(name, config);
        }
    }
}

/// Filter and authorization for one change and one subscriber.
fn passes(
    change: &RowChange,
    filter: &Filter,
    principal: &Principal,
    public_buckets: &HashSet<String>,
) -> bool {
    let rel: &Relation = &change.relation;
    if change.kind == ChangeKind::Truncate {
        return true;
    }
    let filter_ok = |row: Option<&crate::changes::Row>| row.is_some_and(|r| filter.matches(rel, r));
    // An UPDATE that moves a row out of a filter's range is still news to its
    // subscribers: match on the new or the old row.
    let matched = match change.kind {
        ChangeKind::Update => filter_ok(change.new.as_ref()) || filter_ok(change.old.as_ref()),
        _ => filter_ok(change.visible_row()),
    };
    matched
        && change
            .visible_row()
            .is_some_and(|row| authz::visible(principal, rel, row, public_buckets))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::changes::TableId;

    fn relation() -> Arc<Relation> {
        Arc::new(Relation {
            id: TableId(1),
            schema: "public".into(),
            name: "t".into(),
            qualified: Arc::from("public.t"),
            replica_identity: b'f',
            columns: vec![],
        })
    }

    /// A router holding at most `window` changes, one service connection (id 1)
    /// with a queue of `queue` frames, and the receiving end of that queue.
    fn router(window: usize, queue: usize, hold: Duration) -> (Router, mpsc::Receiver<Outbound>) {
        let (progress, _) = watch::channel(Progress::default());
        let mut r = Router::new(
            RouterConfig {
                floor: None,
                channel_configs: None,
                kingshare: None,
                kingshare_from: PgLsn::ZERO,
                confirmed: PgLsn(1),
                stall_timeout: Duration::from_secs(30),
                catchup_hold: hold,
                max_subscriptions: 2,
                retention_events: window,
                retention: Duration::from_secs(3600),
                public_buckets: HashSet::new(),
            },
            catalog::SharedCatalog::default(),
            progress,
        );
        let (tx, rx) = mpsc::channel(queue);
        let principal = Principal::service();
        r.command(Command::Attach {
            session: 1,
            handle: SessionHandle {
                tx,
                overflowed: CancellationToken::new(),
                revoked: CancellationToken::new(),
                lagging: Arc::new(tokio::sync::Notify::new()),
                principal: Arc::new(principal),
            },
        });
        (r, rx)
    }

    fn subscribe(r: &mut Router, id: &str) {
        r.command(Command::Subscribe {
            session: 1,
            spec: SubscriptionSpec {
                id: Arc::from(id),
                table: Arc::from("public.t"),
                events: EventMask::ALL,
                filter: Filter { conditions: vec![] },
                since: None,
            },
        });
    }

    /// One-change transactions at LSNs 100·i.
    fn commit(r: &mut Router, i: u64) {
        let lsn = PgLsn(100 * i);
        r.output(Output::Change(Arc::new(RowChange::new(
            Position::new(lsn, 0),
            ChangeKind::Insert,
            relation(),
            Some(vec![]),
            None,
            0,
        ))));
        r.output(Output::Commit {
            commit_lsn: lsn,
            end_lsn: PgLsn(100 * i + 50),
            commit_time_ms: 0,
        });
    }

    /// (subscription, commit number) of the changes queued, and whether replies came.
    fn drain(rx: &mut mpsc::Receiver<Outbound>) -> Vec<(String, u64)> {
        let mut got = Vec::new();
        while let Ok(out) = rx.try_recv() {
            if let Outbound::Change {
                subscription,
                change,
            } = out
            {
                got.push((subscription.to_string(), change.position.commit_lsn.0 / 100));
            }
        }
        got
    }

    #[test]
    fn a_subscription_made_while_lagging_gets_only_later_changes() {
        let (mut r, mut rx) = router(1000, 4, Duration::from_secs(30));
        subscribe(&mut r, "a");
        drain(&mut rx);
        for i in 1..=6 {
            commit(&mut r, i);
        }
        // Four fit; the connection lags from change 5 on.
        assert_eq!(drain(&mut rx).len(), 4);
        subscribe(&mut r, "b");
        commit(&mut r, 7);
        drain(&mut rx);
        let mut got = Vec::new();
        for _ in 0..4 {
            r.command(Command::Pull { session: 1 });
            got.extend(drain(&mut rx));
        }
        let of = |s: &str| -> Vec<u64> {
            got.iter()
                .filter(|(id, _)| id == s)
                .map(|(_, n)| *n)
                .collect()
        };
        assert_eq!(of("a"), vec![5, 6, 7]);
        assert_eq!(of("b"), vec![7], "b was made after change 6");
    }

    #[test]
    fn a_draining_connection_at_the_window_edge_holds_the_stream_within_its_budgets() {
        let (mut r, mut rx) = router(4, 2, Duration::from_secs(30));
        subscribe(&mut r, "a");
        drain(&mut rx);
        for i in 1..=3 {
            commit(&mut r, i);
        }
        // Two queued, lagging from 3; the window (1..3) is not full yet.
        assert!(r.holder(Instant::now()).is_none());
        commit(&mut r, 4);
        // Full, and the next change would evict 1 only: 3 is still held.
        assert!(r.holder(Instant::now()).is_none());
        commit(&mut r, 5);
        commit(&mut r, 6);
        // Now the front is 3: one more change and the connection falls out.
        let now = Instant::now();
        let (id, until) = r.holder(now).expect("held for the connection");
        assert_eq!(id, 1);
        // A second later without a pull it no longer counts as draining.
        assert!(r.holder(until).is_none());
        // Nothing waiting: holding costs no budget.
        assert!(r.update_hold(now, false).is_some());
        assert!(
            r.update_hold(now + Duration::from_millis(500), false)
                .is_some()
        );
        assert_eq!(r.sessions[&1].held, Duration::ZERO);
        // Changes waiting: the time is charged to the connection and the shared credit.
        r.update_hold(now + Duration::from_millis(900), true);
        assert_eq!(r.sessions[&1].held, Duration::from_millis(400));
        assert!(r.hold_credit < Duration::from_secs(30));
        // A pull moves it past the front: no longer held.
        drain(&mut rx);
        r.command(Command::Pull { session: 1 });
        assert!(r.holder(Instant::now()).is_none());
        // It leaves: the index forgets it.
        r.command(Command::Detach { session: 1 });
        assert!(r.lag_index.is_empty());
    }

    #[test]
    fn no_hold_time_means_no_hold_and_an_exhausted_budget_ends_the_hold() {
        let (mut r, mut rx) = router(2, 2, Duration::ZERO);
        subscribe(&mut r, "a");
        drain(&mut rx);
        for i in 1..=4 {
            commit(&mut r, i);
        }
        assert!(r.may_hold());
        assert!(r.holder(Instant::now()).is_none());

        let (mut r, mut rx) = router(2, 2, Duration::from_secs(1));
        subscribe(&mut r, "a");
        drain(&mut rx);
        for i in 1..=4 {
            commit(&mut r, i);
        }
        let now = Instant::now();
        assert!(r.update_hold(now, true).is_some());
        r.sessions.get_mut(&1).unwrap().held = Duration::from_secs(1);
        assert!(
            r.update_hold(now, true).is_none(),
            "its own budget is spent"
        );
    }

    #[test]
    fn a_connection_cannot_hold_more_subscriptions_than_allowed() {
        let (mut r, mut rx) = router(100, 16, Duration::ZERO);
        subscribe(&mut r, "a");
        subscribe(&mut r, "b");
        subscribe(&mut r, "c");
        let mut codes = Vec::new();
        while let Ok(out) = rx.try_recv() {
            match out {
                Outbound::Subscribed { subscription, .. } => codes.push(subscription.to_string()),
                Outbound::Error { code, .. } => codes.push(code.to_owned()),
                _ => {}
            }
        }
        assert_eq!(codes, ["a", "b", "too_many_subscriptions"]);
        assert_eq!(r.sessions[&1].subs.len(), 2);
    }
}
