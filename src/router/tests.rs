use super::*;
use aether_changelog::ChangeLog;
use aether_changelog::local::{LocalLog, LogOptions, floor_for_slot, open_ready};
use aether_core::lsn::PgLsn;

use aether_core::changes::test_relation as relation;

struct Fixture {
    r: Router,
    rx: mpsc::Receiver<Outbound>,
    log: Arc<LocalLog>,
    pages: mpsc::UnboundedReceiver<PageDone>,
    _dir: tempfile::TempDir,
}

/// A router over a fresh log, holding `memory` bytes of tail, with one service
/// connection (id 1) whose queue holds `queue` frames.
fn fixture(memory: usize, queue: usize) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let (log, _) = open_ready(dir.path(), LogOptions::default(), floor_for_slot(PgLsn(1))).unwrap();
    let log = Arc::new(log);
    let mut r = Router::new(
        RouterConfig {
            log: Arc::clone(&log) as SharedLog,
            channel_configs: None,
            kingshare: None,
            stall_timeout: Duration::from_secs(30),
            max_subscriptions: 2,
            memory_bytes: memory,
            public_buckets: HashSet::new(),
        },
        catalog::SharedCatalog::default(),
    );
    let pages = r.pages_rx.take().unwrap();
    let (tx, rx) = mpsc::channel(queue);
    r.command(Command::Attach {
        session: 1,
        handle: SessionHandle {
            tx,
            overflowed: CancellationToken::new(),
            revoked: CancellationToken::new(),
            lagging: Arc::new(tokio::sync::Notify::new()),
            principal: Arc::new(Principal::service()),
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
        self.r.command(Command::Subscribe {
            session: 1,
            spec: SubscriptionSpec {
                id: Arc::from(id),
                table: Arc::from("public.t"),
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
