use super::*;
use crate::policy::{Decision, Viewer};
use aether_changelog::ChangeLog;
use aether_changelog::local::{LocalLog, LogOptions, floor_for_slot, open_ready};
use aether_core::changes::RowChange;
use aether_core::lsn::PgLsn;

use aether_core::changes::test_relation as relation;

struct Fixture {
    r: Router,
    rx: crate::queue::QueueRx<Outbound>,
    log: Arc<LocalLog>,
    pages: mpsc::UnboundedReceiver<PageDone>,
    _dir: tempfile::TempDir,
}

/// A router over a fresh log, holding `memory` bytes of tail, with one service
/// connection (id 1) whose queue holds `queue` frames.
fn fixture(memory: usize, queue: usize) -> Fixture {
    fixture_with(memory, queue, Box::new(policy::AllowAll), vec![])
}

fn fixture_with(
    memory: usize,
    queue: usize,
    policy: Box<dyn Policy>,
    taps: Vec<Box<dyn Tap>>,
) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let (log, _) = open_ready(dir.path(), LogOptions::default(), floor_for_slot(PgLsn(1))).unwrap();
    let log = Arc::new(log);
    let mut r = Router::new(
        RouterConfig {
            log: Arc::clone(&log) as SharedLog,
            policy,
            taps,
            stall_timeout: Duration::from_secs(30),
            max_subscriptions: 2,
            memory_bytes: memory,
            ahead_wait: Duration::ZERO,
        },
        catalog::SharedCatalog::default(),
    );
    let pages = r.pages_rx.take().unwrap();
    let (tx, rx) = crate::queue::channel(queue);
    r.command(Command::Attach {
        session: 1,
        handle: SessionHandle {
            tx,
            principal: Arc::new(Principal::service()),
            direct: None,
        },
    });
    Fixture {
        r,
        rx,
        log,
        pages,
        _dir: dir,
    }
}

impl Fixture {
    fn subscribe(&mut self, id: &str, since: Option<SinceId>) {
        self.subscribe_to(id, "public.t", since);
    }

    fn subscribe_to(&mut self, id: &str, table: &str, since: Option<SinceId>) {
        self.r.command(Command::Subscribe {
            session: 1,
            spec: SubscriptionSpec {
                id: Arc::from(id),
                table: Arc::from(table),
                events: EventMask::ALL,
                filter: Filter { conditions: vec![] },
                since,
            },
        });
    }

    /// One-change transaction number `i`, logged then fed.
    fn commit(&mut self, i: u64) -> Position {
        let change = self.log_only(i);
        let p = change.position;
        self.r.feed(Feed::Change(change));
        p
    }

    /// Transaction `i` in the log, not yet fed to the router.
    fn log_only(&mut self, i: u64) -> Arc<RowChange> {
        let change = Arc::new(
            RowChange::new(
                Position::new(PgLsn(100 * i), 0),
                ChangeKind::Insert,
                relation(),
                Some(vec![]),
                None,
                0,
            )
            .in_epoch(self.log.bounds().epoch),
        );
        self.log.append(std::slice::from_ref(&change)).unwrap();
        change
    }

    fn since(&self, p: Position) -> Option<SinceId> {
        Some(SinceId::Stream(StreamId {
            position: p,
            epoch: self.log.bounds().epoch,
        }))
    }

    /// (subscription, commit number) of the changes queued, plus reply codes.
    fn drain(&mut self) -> Vec<(String, u64)> {
        let mut got = Vec::new();
        while let Ok(out) = self.rx.try_recv() {
            match out {
                Outbound::Change {
                    subscription,
                    change,
                } => got.push((subscription.to_string(), change.position.commit_lsn.0 / 100)),
                Outbound::Error { code, .. } => got.push((code.to_owned(), 0)),
                _ => {}
            }
        }
        got
    }

    /// Lets page reads finish and be handled.
    async fn settle(&mut self) {
        while let Ok(Some(done)) =
            tokio::time::timeout(Duration::from_millis(200), self.pages.recv()).await
        {
            self.r.page_done(done);
        }
    }

    /// Drains and pulls until the connection is live again.
    async fn catch_up(&mut self) -> Vec<(String, u64)> {
        let mut got = Vec::new();
        for _ in 0..1000 {
            self.settle().await;
            got.extend(self.drain());
            if self.r.sessions[&1].lag.is_none() {
                return got;
            }
            self.r.command(Command::Pull { session: 1 });
        }
        panic!("never caught up");
    }
}

fn of(got: &[(String, u64)], s: &str) -> Vec<u64> {
    got.iter()
        .filter(|(id, _)| id == s)
        .map(|(_, n)| *n)
        .collect()
}

#[tokio::test]
async fn a_subscription_made_while_lagging_gets_only_later_changes() {
    let mut f = fixture(1 << 20, 4);
    f.subscribe("a", None);
    f.drain();
    for i in 1..=6 {
        f.commit(i);
    }
    // Four fit; the connection lags from change 5 on.
    assert_eq!(f.drain().len(), 4);
    f.subscribe("b", None);
    f.commit(7);
    let got = f.catch_up().await;
    assert_eq!(of(&got, "a"), vec![5, 6, 7]);
    assert_eq!(of(&got, "b"), vec![7], "b was made after change 6");
}

#[tokio::test]
async fn since_replays_exactly_what_followed_then_goes_live_from_memory_or_disk() {
    // Memory for about one change: everything older is paged from disk.
    for memory in [1 << 20, 1] {
        let mut f = fixture(memory, 8);
        let ps: Vec<Position> = (1..=50).map(|i| f.commit(i)).collect();
        f.subscribe("a", f.since(ps[9]));
        let got = f.catch_up().await;
        assert_eq!(
            of(&got, "a"),
            (11..=50).collect::<Vec<_>>(),
            "memory {memory}"
        );
        f.commit(51);
        assert_eq!(f.drain(), vec![("a".to_owned(), 51)]);
        // A second since on the same connection rewinds for it alone.
        f.subscribe("b", f.since(ps[47]));
        f.commit(52);
        let got = f.catch_up().await;
        assert_eq!(of(&got, "b"), vec![49, 50, 51, 52]);
        assert_eq!(of(&got, "a"), vec![52], "a gets nothing twice");
    }
}

#[tokio::test]
async fn a_page_never_delivers_what_the_router_has_not_routed_yet() {
    let mut f = fixture(1, 64);
    let ps: Vec<Position> = (1..=20).map(|i| f.commit(i)).collect();
    // Logged, not fed yet: the writer is a step ahead of the router.
    let ahead: Vec<_> = (21..=25).map(|i| f.log_only(i)).collect();
    f.subscribe("a", f.since(ps[0]));
    let got = f.catch_up().await;
    assert_eq!(of(&got, "a"), (2..=20).collect::<Vec<_>>());
    for c in ahead {
        f.r.feed(Feed::Change(c));
    }
    assert_eq!(of(&f.drain(), "a"), (21..=25).collect::<Vec<_>>());
}

#[tokio::test]
async fn positions_from_another_log_older_than_it_or_ahead_of_it_are_gaps() {
    let mut f = fixture(1 << 20, 8);
    let p = f.commit(1);
    let other = Some(SinceId::Stream(StreamId {
        position: p,
        epoch: Epoch(f.log.bounds().epoch.0 ^ 1),
    }));
    f.subscribe("a", other);
    f.subscribe("b", Some(SinceId::Bare(p)));
    f.subscribe("c", f.since(Position::new(PgLsn(5000), 0)));
    f.subscribe("d", f.since(Position::new(PgLsn(0), 0)));
    let got = f.drain();
    assert_eq!(of(&got, "gap").len(), 4, "{got:?}");
    assert!(f.r.sessions[&1].subs.is_empty());
    // The newest position itself is fine: nothing to replay.
    f.subscribe("e", f.since(p));
    assert!(f.drain().is_empty());
    assert!(f.r.sessions[&1].lag.is_none());
}

/// `schema.*` and `*` subscriptions get every table's changes there, live
/// and when catching up; another schema's wildcard gets none.
#[tokio::test]
async fn wildcard_subscriptions_cover_a_schema_or_everything() {
    let mut f = fixture(1 << 20, 16);
    f.r.max_subscriptions = 8;
    f.subscribe_to("schema", "public.*", None);
    f.subscribe_to("all", "*", None);
    f.subscribe_to("other", "other.*", None);
    let p1 = f.commit(1);
    let got = f.drain();
    assert_eq!(of(&got, "schema"), vec![1]);
    assert_eq!(of(&got, "all"), vec![1]);
    assert!(of(&got, "other").is_empty());
    // From the tail: a wildcard subscription resuming.
    f.commit(2);
    f.drain();
    f.subscribe_to("late", "public.*", f.since(p1));
    assert_eq!(of(&f.catch_up().await, "late"), vec![2]);
    // Gone with its last wildcard: routing stops looking.
    for id in ["schema", "all", "other", "late"] {
        f.r.command(Command::Unsubscribe {
            session: 1,
            id: Arc::from(id),
        });
    }
    assert_eq!(f.r.wildcards, 0);
}

/// In a cluster a client may resume on a node that has not consumed its
/// position yet: the subscription waits until this router reaches it, then gets
/// exactly what followed; one never reached is `gap` after the wait.
#[tokio::test]
async fn with_a_shared_log_a_since_ahead_waits_for_the_feed() {
    let mut f = fixture(1 << 20, 16);
    f.r.ahead_wait = Duration::from_millis(300);
    f.commit(1);
    let p3 = Position::new(PgLsn(300), 0);
    f.subscribe("a", f.since(p3));
    assert!(f.drain().is_empty(), "nothing yet: it waits");
    assert!(f.r.sessions[&1].subs.is_empty());
    f.commit(2);
    assert!(f.drain().is_empty());
    f.commit(3);
    f.commit(4);
    f.commit(5);
    assert_eq!(
        of(&f.drain(), "a"),
        vec![4, 5],
        "what followed its position, once"
    );
    // A position never reached.
    f.subscribe("b", f.since(Position::new(PgLsn(90_000), 0)));
    f.r.retry_waiting(true);
    assert!(f.drain().is_empty());
    // Its wait is over (aged, not slept).
    f.r.waiting[0].0 -= Duration::from_millis(300);
    f.r.retry_waiting(true);
    assert_eq!(f.drain(), vec![("gap".to_owned(), 0)]);
    assert!(f.r.waiting.is_empty());
    // One unsubscribed while it waits is never made.
    f.subscribe("c", f.since(Position::new(PgLsn(700), 0)));
    f.r.command(Command::Unsubscribe {
        session: 1,
        id: Arc::from("c"),
    });
    assert!(f.r.waiting.is_empty());
    for i in 6..=8 {
        f.commit(i);
    }
    assert!(of(&f.drain(), "c").is_empty());
}

#[tokio::test]
async fn a_reset_log_tells_every_subscription_gap() {
    let mut f = fixture(1 << 20, 8);
    f.subscribe("a", None);
    f.commit(1);
    f.drain();
    let floor = floor_for_slot(PgLsn(10_000));
    let epoch = f.log.reset(floor).unwrap();
    f.r.feed(Feed::Reset { epoch, floor });
    assert_eq!(f.drain(), vec![("gap".to_owned(), 0)]);
    assert!(f.r.sessions[&1].subs.is_empty());
    assert_eq!(f.r.high_water, floor);
}

#[tokio::test]
async fn a_connection_cannot_hold_more_subscriptions_than_allowed() {
    let mut f = fixture(1 << 20, 16);
    f.subscribe("a", None);
    f.subscribe("b", None);
    f.subscribe("c", None);
    let mut codes = Vec::new();
    while let Ok(out) = f.rx.try_recv() {
        match out {
            Outbound::Subscribed { subscription, .. } => codes.push(subscription.to_string()),
            Outbound::Error { code, .. } => codes.push(code.to_owned()),
            _ => {}
        }
    }
    assert_eq!(codes, ["a", "b", "too_many_subscriptions"]);
    assert_eq!(f.r.sessions[&1].subs.len(), 2);
}

/// Holds connection 1 at one position until released, lets everything else by.
#[derive(Clone, Default)]
struct Gate(Arc<std::sync::Mutex<(Option<Position>, Option<PolicyWaker>)>>);

impl Policy for Gate {
    fn decide(&mut self, viewer: Viewer<'_>, change: &Arc<RowChange>) -> Decision {
        let held = self.0.lock().unwrap().0;
        if viewer.connection == 1 && held == Some(change.position) {
            Decision::Pending
        } else {
            Decision::Allow
        }
    }

    fn attach(&mut self, waker: PolicyWaker) {
        self.0.lock().unwrap().1 = Some(waker);
    }
}

#[tokio::test]
async fn a_pending_decision_holds_back_only_its_connection_which_then_gets_everything_in_order() {
    let gate = Gate::default();
    let mut f = fixture_with(1 << 20, 16, Box::new(gate.clone()), vec![]);
    let (tx2, mut rx2) = crate::queue::channel(16);
    f.r.command(Command::Attach {
        session: 2,
        handle: SessionHandle {
            tx: tx2,
            principal: Arc::new(Principal::service()),
            direct: None,
        },
    });
    f.subscribe("a", None);
    f.r.command(Command::Subscribe {
        session: 2,
        spec: SubscriptionSpec {
            id: Arc::from("b"),
            table: Arc::from("public.t"),
            events: EventMask::ALL,
            filter: Filter { conditions: vec![] },
            since: None,
        },
    });
    gate.0.lock().unwrap().0 = Some(Position::new(PgLsn(200), 0));
    for i in 1..=3 {
        f.commit(i);
    }
    assert_eq!(of(&f.drain(), "a"), [1]);
    let mut other = Vec::new();
    while let Ok(out) = rx2.try_recv() {
        if let Outbound::Change { change, .. } = out {
            other.push(change.position.commit_lsn.0 / 100);
        }
    }
    assert_eq!(other, [1, 2, 3], "the other connection is not held back");
    // Pulling does not get around a pending decision.
    f.r.command(Command::Pull { session: 1 });
    assert!(f.drain().is_empty());
    assert!(f.r.sessions[&1].lag.as_ref().unwrap().awaiting);

    let waker = {
        let mut g = gate.0.lock().unwrap();
        g.0 = None;
        g.1.clone().unwrap()
    };
    waker.wake(1);
    let woken = tokio::time::timeout(Duration::from_secs(5), waker.woken())
        .await
        .expect("the wake-up reaches the router");
    f.r.policy_decided(woken);
    assert_eq!(of(&f.drain(), "a"), [2, 3]);
    assert!(f.r.sessions[&1].lag.is_none(), "live again");
    f.commit(4);
    assert_eq!(of(&f.drain(), "a"), [4]);
}

/// Revokes one auth session on every change.
struct Revoker(uuid::Uuid);

impl Tap for Revoker {
    fn change(&mut self, _: &RowChange, effects: &mut Effects) {
        effects.revoke_session(self.0);
    }
}

#[tokio::test]
async fn a_tap_can_close_the_connections_of_a_revoked_session() {
    let id = uuid::Uuid::new_v4();
    let mut f = fixture_with(
        1 << 20,
        16,
        Box::new(policy::AllowAll),
        vec![Box::new(Revoker(id))],
    );
    let (tx2, rx2) = crate::queue::channel(16);
    f.r.command(Command::Attach {
        session: 2,
        handle: SessionHandle {
            tx: tx2,
            principal: Arc::new(Principal {
                session_id: Some(id),
                ..Principal::service()
            }),
            direct: None,
        },
    });
    f.commit(1);
    assert_eq!(rx2.closing(), Some(crate::queue::Signal::Revoked));
    assert!(!f.r.sessions.contains_key(&2));
    assert!(f.r.sessions.contains_key(&1), "other sessions stay");
}

/// Records the connections it was told to forget.
#[derive(Clone, Default)]
struct Forgetful(Gate, Arc<std::sync::Mutex<Vec<u64>>>);

impl Policy for Forgetful {
    fn decide(&mut self, viewer: Viewer<'_>, change: &Arc<RowChange>) -> Decision {
        self.0.decide(viewer, change)
    }

    fn forget(&mut self, connection: u64) {
        self.1.lock().unwrap().push(connection);
    }
}

#[tokio::test]
async fn a_new_principal_is_asked_again_and_the_policy_forgets_closed_connections() {
    let policy = Forgetful::default();
    let mut f = fixture_with(1 << 20, 16, Box::new(policy.clone()), vec![]);
    f.subscribe("a", None);
    policy.0.0.lock().unwrap().0 = Some(Position::new(PgLsn(200), 0));
    for i in 1..=3 {
        f.commit(i);
    }
    assert_eq!(of(&f.drain(), "a"), [1]);
    // The decision for the old principal no longer holds: renewal asks again,
    // without a wake from the policy.
    policy.0.0.lock().unwrap().0 = None;
    f.r.command(Command::SetPrincipal {
        session: 1,
        principal: Arc::new(Principal::service()),
    });
    assert_eq!(of(&f.drain(), "a"), [2, 3]);
    assert!(f.r.sessions[&1].lag.is_none());
    f.r.command(Command::Detach { session: 1 });
    assert_eq!(*policy.1.lock().unwrap(), [1, 1]);
}

/// Lets a viewer see rows whose `owner` is `me`: an index key for unfiltered
/// subscriptions, and rows that move in or out sent as INSERT or DELETE.
#[derive(Clone)]
struct Owner {
    me: Arc<std::sync::Mutex<String>>,
    asked: Arc<std::sync::atomic::AtomicUsize>,
    generation: Arc<std::sync::atomic::AtomicU64>,
}

fn owner_relation() -> Arc<aether_core::changes::Relation> {
    use aether_core::changes::{Column, Relation, TableId};
    let col = |name: &str, is_key| Column {
        name: name.into(),
        type_oid: 25,
        is_key,
        secret: false,
    };
    Arc::new(Relation {
        id: TableId(9),
        schema: "public".into(),
        name: "o".into(),
        qualified: Arc::from("public.o"),
        replica_identity: b'f',
        columns: vec![col("id", true), col("owner", false)],
    })
}

impl Policy for Owner {
    fn decide(&mut self, _: Viewer<'_>, change: &Arc<RowChange>) -> Decision {
        self.asked.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let me = self.me.lock().unwrap().clone();
        let mine = |row: &Option<aether_core::changes::Row>| match row.as_ref().map(|r| &r[1]) {
            Some(Some(v)) => Some(v.as_str() == Some(me.as_str())),
            Some(None) => None,
            None => Some(false),
        };
        match (change.kind, mine(&change.old), mine(&change.new)) {
            (ChangeKind::Update, Some(false), Some(true)) => Decision::Enter,
            (ChangeKind::Update, Some(true), Some(false)) => Decision::Leave,
            (ChangeKind::Delete, None, _) => Decision::Allow,
            (_, a, b) if a == Some(true) || b == Some(true) => Decision::Allow,
            _ => Decision::Deny,
        }
    }

    fn index_key(&mut self, _: &Principal, table: &str) -> Option<(String, String)> {
        (table == "public.o").then(|| ("owner".to_owned(), self.me.lock().unwrap().clone()))
    }

    fn index_generation(&self) -> u64 {
        self.generation.load(std::sync::atomic::Ordering::SeqCst)
    }
}

#[test]
fn a_policy_index_key_limits_the_candidates_and_moves_become_insert_or_delete() {
    use std::sync::atomic::Ordering;
    let policy = Owner {
        me: Arc::new(std::sync::Mutex::new("me".into())),
        asked: Arc::default(),
        generation: Arc::default(),
    };
    let mut f = fixture_with(1 << 20, 64, Box::new(policy.clone()), vec![]);
    f.subscribe_to("o", "public.o", None);
    let t = &f.r.tables["public.o"];
    assert!(t.scan.is_empty() && t.by_policy["owner"].contains_key("me"));

    let rel = owner_relation();
    let epoch = f.log.bounds().epoch;
    let row = |id: i64, owner: Option<&str>| -> Option<aether_core::changes::Row> {
        Some(vec![
            Some(serde_json::json!(id)),
            owner.map(|o| serde_json::json!(o)),
        ])
    };
    let mut lsn = 0;
    let mut feed = |f: &mut Fixture, kind, new, old| {
        lsn += 100;
        let c = Arc::new(
            RowChange::new(
                Position::new(PgLsn(lsn), 0),
                kind,
                Arc::clone(&rel),
                new,
                old,
                0,
            )
            .in_epoch(epoch),
        );
        f.log.append(std::slice::from_ref(&c)).unwrap();
        f.r.feed(Feed::Change(c));
    };
    // Someone else's rows: not even asked about.
    for i in 0..10 {
        feed(&mut f, ChangeKind::Insert, row(i, Some("other")), None);
    }
    assert_eq!(policy.asked.load(Ordering::SeqCst), 0);
    feed(&mut f, ChangeKind::Insert, row(1, Some("me")), None);
    feed(
        &mut f,
        ChangeKind::Update,
        row(1, Some("other")),
        row(1, Some("me")),
    );
    feed(
        &mut f,
        ChangeKind::Update,
        row(2, Some("me")),
        row(2, Some("other")),
    );
    // A deleted row that is only its key reaches every policy-indexed viewer.
    feed(&mut f, ChangeKind::Delete, None, row(3, None));
    let mut got = Vec::new();
    while let Ok(out) = f.rx.try_recv() {
        if let Outbound::Change { change, .. } = out {
            let id = |r: &Option<aether_core::changes::Row>| {
                r.as_ref().and_then(|r| r[0].clone()).unwrap_or_default()
            };
            got.push((change.kind, id(&change.new), id(&change.old)));
        }
    }
    use serde_json::json;
    assert_eq!(
        got,
        [
            (ChangeKind::Insert, json!(1), json!(null)),
            (ChangeKind::Delete, json!(null), json!(1)),
            (ChangeKind::Insert, json!(2), json!(null)),
            (ChangeKind::Delete, json!(null), json!(3)),
        ]
    );
    // New rules, another key: indexed again before the next change is routed.
    *policy.me.lock().unwrap() = "other".into();
    policy.generation.fetch_add(1, Ordering::SeqCst);
    feed(&mut f, ChangeKind::Insert, row(4, Some("other")), None);
    assert!(matches!(f.rx.try_recv(), Ok(Outbound::Change { .. })));
    assert!(f.r.tables["public.o"].by_policy["owner"].contains_key("other"));
}

#[tokio::test]
async fn a_queue_full_by_weight_lags_and_catches_up_in_order() {
    // A second connection whose queue holds 100 items but one change's bytes:
    // it lags at the second change and gets all of them, in order, by pulls.
    let mut f = fixture(1 << 20, 100);
    f.subscribe("a", None);
    f.drain();
    let (tx2, mut rx2) = crate::queue::weighed(100, 1, Outbound::weight);
    f.r.command(Command::Attach {
        session: 2,
        handle: SessionHandle {
            tx: tx2,
            principal: Arc::new(Principal::service()),
            direct: None,
        },
    });
    f.r.command(Command::Subscribe {
        session: 2,
        spec: SubscriptionSpec {
            id: Arc::from("w"),
            table: Arc::from("public.t"),
            events: EventMask::ALL,
            filter: Filter { conditions: vec![] },
            since: None,
        },
    });
    while rx2.try_recv().is_ok() {}
    for i in 1..=5 {
        f.commit(i);
    }
    assert_eq!(rx2.len(), 1, "one change's weight fills it");
    assert!(f.r.sessions[&2].lag.is_some(), "lagging, not closed");
    assert!(!crate::low_water(&rx2), "not half drained by weight");
    let mut got = Vec::new();
    for _ in 0..100 {
        f.settle().await;
        while let Ok(out) = rx2.try_recv() {
            if let Outbound::Change { change, .. } = out {
                got.push(change.position.commit_lsn.0 / 100);
            }
        }
        if f.r.sessions[&2].lag.is_none() {
            break;
        }
        assert!(crate::low_water(&rx2));
        f.r.command(Command::Pull { session: 2 });
    }
    assert_eq!(got, vec![1, 2, 3, 4, 5]);
    // The first connection, bounded in items only, never lagged.
    assert_eq!(f.drain().len(), 5);
    assert!(rx2.closing().is_none());
}

#[tokio::test]
async fn a_reply_still_fits_a_queue_a_catch_up_refilled() {
    // Eight slots: row changes take seven, before and after a pull; the
    // eighth is there for a reply, which would otherwise close the connection.
    let mut f = fixture(1 << 20, 8);
    f.subscribe("a", None);
    f.drain();
    for i in 1..=20 {
        f.commit(i);
    }
    assert_eq!(f.rx.len(), 7);
    assert!(f.r.sessions[&1].lag.is_some());
    let mut got = Vec::new();
    for _ in 0..4 {
        if let Ok(Outbound::Change { change, .. }) = f.rx.try_recv() {
            got.push(change.position.commit_lsn.0 / 100);
        }
    }
    f.r.command(Command::Pull { session: 1 });
    f.settle().await;
    assert_eq!(f.rx.len(), 7, "the pull refills to seven eighths");
    f.subscribe("b", None);
    assert_eq!(f.rx.len(), 8, "the reply takes the last slot");
    assert!(f.rx.closing().is_none(), "not closed");
    got.extend(of(&f.catch_up().await, "a"));
    assert_eq!(got, (1..=20).collect::<Vec<_>>());
}

/// A socket that records what is written to it directly, and stays claimed
/// until told the write is over.
#[derive(Default)]
struct Socket {
    busy: std::sync::atomic::AtomicBool,
    got: std::sync::Mutex<Vec<Position>>,
}

impl Socket {
    fn written(&self) -> Vec<Position> {
        self.got.lock().unwrap().clone()
    }
    fn done(&self) {
        self.busy.store(false, std::sync::atomic::Ordering::SeqCst);
    }
}

impl direct::Direct for Socket {
    fn claim(&self) -> bool {
        !self.busy.swap(true, std::sync::atomic::Ordering::SeqCst)
    }
    fn deliver(&self, _: &str, change: &crate::routed::Routed, _: &mut direct::Tally) {
        self.got.lock().unwrap().push(change.position);
    }
    fn abandon(&self) {
        self.done();
    }
    fn settle(&self, _: &direct::Tally) {}
}

#[test]
fn a_change_goes_straight_to_the_socket_only_with_nothing_queued_ahead() {
    let mut f = fixture(1 << 20, 16);
    let socket = Arc::new(Socket::default());
    let (tx, mut rx) = crate::queue::channel(16);
    f.r.command(Command::Attach {
        session: 2,
        handle: SessionHandle {
            tx,
            principal: Arc::new(Principal::service()),
            direct: Some(Arc::clone(&socket) as Arc<dyn direct::Direct>),
        },
    });
    f.r.command(Command::Subscribe {
        session: 2,
        spec: SubscriptionSpec {
            id: Arc::from("d"),
            table: Arc::from("public.t"),
            events: EventMask::ALL,
            filter: Filter { conditions: vec![] },
            since: None,
        },
    });
    // What is queued: changes by position, the subscribe's reply as `None`.
    let mut queued = || -> Vec<Option<Position>> {
        std::iter::from_fn(|| match rx.try_recv() {
            Ok(Outbound::Change { change, .. }) => Some(Some(change.position)),
            Ok(Outbound::Subscribed { .. }) => Some(None),
            _ => None,
        })
        .collect()
    };
    // The subscribe's reply is queued: the change goes behind it.
    let p1 = f.commit(1);
    assert_eq!(queued(), vec![None, Some(p1)]);
    assert!(socket.written().is_empty());
    // Nothing queued: straight to the socket.
    let p2 = f.commit(2);
    assert_eq!(socket.written(), vec![p2]);
    // Its write not over: the next change queues.
    let p3 = f.commit(3);
    socket.done();
    // The socket is free, but the third is still queued: the fourth goes
    // behind it, not around it.
    let p4 = f.commit(4);
    assert_eq!(socket.written(), vec![p2], "nothing jumps the queue");
    assert_eq!(queued(), vec![Some(p3), Some(p4)]);
    // Drained: straight to the socket again.
    let p5 = f.commit(5);
    assert_eq!(socket.written(), vec![p2, p5]);
}
