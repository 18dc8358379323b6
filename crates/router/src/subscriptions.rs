//! The subscription index and live routing: which subscriptions a change may
//! concern (a hash index on equality filters, a scan for the rest), the filter,
//! then the policy; and subscribing, with `since` checked against the log.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Instant;

use aether_core::changes::{ChangeKind, Relation, RowChange};
use aether_core::lsn::{Position, SinceId, StreamId};
use aether_core::principal::Principal;

use crate::catchup::Lag;
use crate::filter::{Filter, key_of};
use crate::policy::{Decision, Policy, Viewer};
use crate::routed::{Routed, moved};
use crate::{EventMask, Outbound, Router, SubscriptionSpec};

pub(crate) struct Subscription {
    pub(crate) session: u64,
    pub(crate) id: Arc<str>,
    pub(crate) table: Arc<str>,
    pub(crate) events: EventMask,
    pub(crate) filter: Filter,
    /// (column, key) under which it is indexed, if any.
    pub(crate) index: Option<(String, String)>,
    /// (column, key) the policy indexes an unfiltered subscription under
    /// ([`Policy::index_key`]).
    pub(crate) policy_index: Option<(String, String)>,
    /// The newest change this subscription was offered (sent, or judged not for
    /// it): a catching-up connection skips what it already had.
    pub(crate) seen: Position,
}

#[derive(Default)]
pub(crate) struct TableSubs {
    pub(crate) scan: HashSet<u64>,
    by_column: HashMap<String, HashMap<String, HashSet<u64>>>,
    /// Unfiltered subscriptions whose viewer sees only rows with this column
    /// equal to this key (the policy says so).
    pub(crate) by_policy: HashMap<String, HashMap<String, HashSet<u64>>>,
}

impl TableSubs {
    fn is_empty(&self) -> bool {
        self.scan.is_empty() && self.by_column.is_empty() && self.by_policy.is_empty()
    }
}

type KeyIndex = HashMap<String, HashMap<String, HashSet<u64>>>;

fn index_insert(index: &mut KeyIndex, (col, key): &(String, String), uid: u64) {
    index
        .entry(col.clone())
        .or_default()
        .entry(key.clone())
        .or_default()
        .insert(uid);
}

fn index_remove(index: &mut KeyIndex, (col, key): &(String, String), uid: u64) {
    if let Some(keys) = index.get_mut(col) {
        if let Some(set) = keys.get_mut(key) {
            set.remove(&uid);
            if set.is_empty() {
                keys.remove(key);
            }
        }
        if keys.is_empty() {
            index.remove(col);
        }
    }
}

/// Adds the subscriptions of `index` whose key the change's rows hold. With
/// `absent_too`, a row that lacks the column altogether (an old row that is
/// only its key) adds every subscription under that column.
fn index_candidates(
    index: &KeyIndex,
    change: &RowChange,
    absent_too: bool,
    candidates: &mut Vec<u64>,
) {
    for (col, keys) in index {
        let Some(i) = change.relation.column_index(col) else {
            continue;
        };
        for row in [change.new.as_ref(), change.old.as_ref()]
            .into_iter()
            .flatten()
        {
            match row.get(i) {
                Some(Some(v)) => {
                    if let Some(k) = key_of(v)
                        && let Some(set) = keys.get(k.as_ref())
                    {
                        candidates.extend(set.iter().copied());
                    }
                }
                _ if absent_too => {
                    for set in keys.values() {
                        candidates.extend(set.iter().copied());
                    }
                }
                _ => {}
            }
        }
    }
}

/// `schema.*` (every table of a schema) or `*` (every published table).
pub(crate) fn is_wildcard(table: &str) -> bool {
    table == "*" || table.ends_with(".*")
}

/// Whether a subscription to `table` (a table, `schema.*` or `*`) covers `rel`.
pub(crate) fn covers(table: &str, rel: &Relation) -> bool {
    *table == *rel.qualified
        || table == "*"
        || table.strip_suffix(".*") == Some(rel.schema.as_str())
}

impl Router {
    /// Makes the waiting subscriptions the feed has reached; with `expire`, says
    /// `gap` to those that waited `ahead_wait` in vain.
    pub(crate) fn retry_waiting(&mut self, expire: bool) {
        let now = Instant::now();
        let high_water = self.high_water;
        let epoch = self.epoch;
        let mut keep = Vec::new();
        for (at, session, spec) in std::mem::take(&mut self.waiting) {
            let reached = match &spec.since {
                Some(SinceId::Stream(id)) => id.position <= high_water || id.epoch != epoch,
                _ => true,
            };
            if reached {
                self.subscribe(session, spec);
            } else if expire && now.duration_since(at) >= self.ahead_wait {
                let message = format!(
                    "position {} is ahead of the newest change ({}) and did not arrive within {:?}: \
                     it was not handed out by this change log; reload the data and subscribe without `since`",
                    match spec.since {
                        Some(SinceId::Stream(id)) => id.to_string(),
                        Some(SinceId::Bare(p)) => p.to_string(),
                        None => String::new(),
                    },
                    StreamId {
                        position: high_water,
                        epoch
                    },
                    self.ahead_wait
                );
                self.gap(session, spec.id, message);
            } else {
                keep.push((at, session, spec));
            }
        }
        // Subscriptions made above may have queued more (they do not: their
        // positions are reached), so appending keeps the order.
        keep.append(&mut self.waiting);
        self.waiting = keep;
    }

    pub(crate) fn gap(&mut self, session: u64, id: Arc<str>, message: String) {
        self.send(
            session,
            Outbound::Error {
                subscription: Some(id),
                code: "gap",
                message,
            },
        );
    }

    pub(crate) fn subscribe(&mut self, session: u64, spec: SubscriptionSpec) {
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
            Some(SinceId::Stream(id))
                if id.position > self.high_water && !self.ahead_wait.is_zero() =>
            {
                let waiting = self.waiting.iter().filter(|w| w.1 == session).count();
                if waiting + entry.subs.len() < self.max_subscriptions {
                    self.waiting.push((Instant::now(), session, spec));
                    return;
                }
                let message = format!(
                    "position {id} is ahead of what this node has received, and this connection \
                     already has {waiting} subscriptions waiting for it"
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
        if is_wildcard(&spec.table) {
            self.wildcards += 1;
        }
        let index = spec.filter.index_key().map(|(c, k)| (c.to_owned(), k));
        let policy_index = match &index {
            None if !is_wildcard(&spec.table) => {
                self.policy.index_key(&entry.handle.principal, &spec.table)
            }
            _ => None,
        };
        let t = self.tables.entry(Arc::clone(&spec.table)).or_default();
        match (&index, &policy_index) {
            (Some(key), _) => index_insert(&mut t.by_column, key, uid),
            (None, Some(key)) => index_insert(&mut t.by_policy, key, uid),
            (None, None) => {
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
                policy_index,
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

    pub(crate) fn remove_sub(&mut self, uid: u64) {
        let Some(sub) = self.subs.remove(&uid) else {
            return;
        };
        if is_wildcard(&sub.table) {
            self.wildcards = self.wildcards.saturating_sub(1);
        }
        if let Some(t) = self.tables.get_mut(&sub.table) {
            match (&sub.index, &sub.policy_index) {
                (Some(key), _) => index_remove(&mut t.by_column, key, uid),
                (None, Some(key)) => index_remove(&mut t.by_policy, key, uid),
                (None, None) => {
                    t.scan.remove(&uid);
                }
            }
            if t.is_empty() {
                self.tables.remove(&sub.table);
            }
        }
    }

    /// Indexes again, as the policy now says, the unfiltered subscriptions of
    /// `sessions` (all of them with `None`): its policies were reloaded, or a
    /// connection acts as another principal.
    pub(crate) fn reindex_policy(&mut self, sessions: Option<&[u64]>) {
        let uids: Vec<u64> = match sessions {
            None => self.subs.keys().copied().collect(),
            Some(list) => list
                .iter()
                .filter_map(|s| self.sessions.get(s))
                .flat_map(|e| e.subs.values().copied())
                .collect(),
        };
        for uid in uids {
            let Some(sub) = self.subs.get(&uid) else {
                continue;
            };
            if sub.index.is_some() || is_wildcard(&sub.table) {
                continue;
            }
            let Some(entry) = self.sessions.get(&sub.session) else {
                continue;
            };
            let now = self.policy.index_key(&entry.handle.principal, &sub.table);
            if now == sub.policy_index {
                continue;
            }
            let table = Arc::clone(&sub.table);
            let before = sub.policy_index.clone();
            let t = self.tables.entry(table).or_default();
            match &before {
                Some(key) => index_remove(&mut t.by_policy, key, uid),
                None => {
                    t.scan.remove(&uid);
                }
            }
            match &now {
                Some(key) => index_insert(&mut t.by_policy, key, uid),
                None => {
                    t.scan.insert(uid);
                }
            }
            if let Some(sub) = self.subs.get_mut(&uid) {
                sub.policy_index = now;
            }
        }
    }

    pub(crate) fn route(&mut self, change: &Arc<Routed>) {
        let generation = self.policy.index_generation();
        if generation != self.policy_generation {
            self.policy_generation = generation;
            self.reindex_policy(None);
        }
        let mut candidates = std::mem::take(&mut self.candidates);
        candidates.clear();
        // Subscriptions to every table of a schema, or of every schema.
        if self.wildcards > 0 {
            let schema_key = format!("{}.*", change.relation.schema);
            for key in [schema_key.as_str(), "*"] {
                if let Some(w) = self.tables.get(key) {
                    candidates.extend(w.scan.iter().copied());
                }
            }
        }
        let Some(t) = self.tables.get(&change.relation.qualified) else {
            if !candidates.is_empty() {
                self.offer(change, candidates);
            } else {
                self.candidates = candidates;
            }
            return;
        };
        candidates.extend(t.scan.iter().copied());
        index_candidates(&t.by_column, change, false, &mut candidates);
        // An old row that is only its key (no REPLICA IDENTITY FULL) may
        // still be sent, as that key, to those the policy lets read the table.
        index_candidates(&t.by_policy, change, true, &mut candidates);
        if change.kind == ChangeKind::Truncate {
            // A truncate names no row: every subscription of the table hears of it.
            for keys in t.by_column.values().chain(t.by_policy.values()) {
                for set in keys.values() {
                    candidates.extend(set.iter().copied());
                }
            }
        }
        self.offer(change, candidates);
    }

    /// Offers `change` to the candidate subscriptions: events, filter, policy,
    /// then the connection's queue.
    fn offer(&mut self, change: &Arc<Routed>, mut candidates: Vec<u64>) {
        candidates.sort_unstable();
        candidates.dedup();
        let mut closed = Vec::new();
        // What viewers for whom an UPDATE moves the row in or out get.
        let mut entered: Option<Arc<Routed>> = None;
        let mut left: Option<Arc<Routed>> = None;
        let mut runs = crate::direct::Runs::default();
        for &uid in &candidates {
            let Some(sub) = self.subs.get_mut(&uid) else {
                continue;
            };
            if !sub.events.may_want(change.kind) {
                continue;
            }
            let Some(entry) = self.sessions.get_mut(&sub.session) else {
                continue;
            };
            // A lagging connection gets this change from the tail when it pulls.
            if entry.lag.is_some() || !matches(change, &sub.filter) {
                continue;
            }
            let sent = match decide(
                &mut *self.policy,
                sub.session,
                &entry.handle.principal,
                change,
            ) {
                Decision::Allow => change,
                // The row sent must pass the filter itself (the UPDATE may
                // have matched on its other row).
                Decision::Enter if moved_matches(change, &sub.filter, true) => {
                    &*entered.get_or_insert_with(|| moved(change, true))
                }
                Decision::Leave if moved_matches(change, &sub.filter, false) => {
                    &*left.get_or_insert_with(|| moved(change, false))
                }
                Decision::Deny | Decision::Enter | Decision::Leave => {
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
            };
            if !sub.events.contains(sent.kind) {
                sub.seen = change.position;
                continue;
            }
            // Straight to the socket if its task sleeps with nothing owed and
            // nothing is queued ahead of this.
            if let Some(to) = &entry.handle.direct
                && entry.handle.tx.is_empty()
                && to.claim()
            {
                runs.add(&self.writers, Arc::clone(to), Arc::clone(&sub.id), sent);
                sub.seen = change.position;
                continue;
            }
            let out = Outbound::Change {
                subscription: Arc::clone(&sub.id),
                change: Arc::clone(sent),
            };
            match entry.handle.tx.try_send_bulk(out) {
                Ok(()) => sub.seen = change.position,
                Err(crate::queue::TrySendError::Full(_)) => {
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
                    entry.handle.tx.raise(crate::queue::Signal::Lagging);
                }
                Err(crate::queue::TrySendError::Closed(_)) => closed.push(sub.session),
            }
        }
        self.candidates = candidates;
        runs.finish(&self.writers);
        self.policy.settle();
        for s in closed {
            self.detach(s);
        }
    }
}

/// Does the row a moved change is sent with (the new row for an INSERT, the
/// old one for a DELETE) match the filter?
pub(crate) fn moved_matches(change: &RowChange, filter: &Filter, new: bool) -> bool {
    let row = if new { &change.new } else { &change.old };
    row.as_ref()
        .is_some_and(|r| filter.matches(&change.relation, r))
}

/// Does the change match the subscription's filter?
pub(crate) fn matches(change: &RowChange, filter: &Filter) -> bool {
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
pub(crate) fn decide(
    policy: &mut dyn Policy,
    connection: u64,
    principal: &Arc<Principal>,
    change: &Routed,
) -> Decision {
    if change.kind == ChangeKind::Truncate {
        return Decision::Allow;
    }
    policy.decide(
        Viewer {
            connection,
            principal,
        },
        change.change(),
    )
}
