//! Cluster mode (`NATS_URL`): several nodes on one PostgreSQL, one JetStream
//! stream as their change log.
//!
//! - **One leader** holds the replication slot. Leadership is a PostgreSQL
//!   advisory lock held on the leader's own connection: PostgreSQL releases it
//!   the moment that connection ends (the process was killed, the host or the
//!   network died), with no lease to tune, and it lives next to the slot it
//!   guards. The leader decodes, appends to the stream, and confirms the slot
//!   once the stream acknowledged. A leader that loses its lock connection
//!   exits (its supervisor restarts it as a standby); its appends are fenced
//!   by the stream's expected last sequence in the meantime.
//! - **Every node** (the leader too) follows the stream into its own router and
//!   serves its own sockets: what a client sees does not depend on which node
//!   it is on. Standby nodes try to take the lock every second.
//! - **Members** are read from PostgreSQL: each node keeps one connection named
//!   `aether:<slot>:<node>`; the one holding the lock is the leader. A node
//!   that dies leaves the list when its connection ends.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

pub(crate) mod bus;

use crate::config::Config;
use aether_changelog::ChangeLog as _;
use aether_changelog::ingest::{self, ReplicationStatus, ReplicationTask};
use aether_changelog::jetstream::{FollowStatus, JetStreamLog, StreamOptions};
use aether_changelog::local::floor_for_slot;
use aether_changelog::pump::{self, Durable, Feed, LogStatus};

/// The advisory lock's first key ("Ae"); the second is the slot name's hash.
const LOCK_CLASS: i32 = 0x4165;
/// How often a standby tries to take the lock.
const TRY_EVERY: Duration = Duration::from_secs(1);

/// This node's part of the cluster.
pub(crate) struct Cluster {
    pub node: String,
    pub log: Arc<JetStreamLog>,
    /// This node's reader of the stream.
    pub follow: watch::Receiver<FollowStatus>,
    /// This node holds the slot.
    pub leading: watch::Receiver<bool>,
    slot: String,
}

/// The cluster as PostgreSQL sees it.
#[derive(Debug, Clone, serde::Serialize)]
pub(crate) struct Members {
    pub node: String,
    pub leader: Option<String>,
    pub nodes: Vec<String>,
}

/// What a node is called when `NODE_NAME` is not set: host name and port.
pub(crate) fn default_node_name(port: u16) -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "aether".into());
    format!("{host}-{port}")
}

fn application_name(slot: &str, node: &str) -> String {
    // PostgreSQL keeps 63 bytes of it.
    let mut name = format!("aether:{slot}:{node}");
    name.truncate(63);
    name
}

/// The pieces the binary wires: the log, the follower's and leader's tasks.
pub(crate) struct Parts {
    pub cluster: Cluster,
    pub follow_tx: watch::Sender<FollowStatus>,
    pub leading_tx: watch::Sender<bool>,
    /// Where this node's follower starts (the router's starting point).
    pub start: aether_changelog::jetstream::StartPoint,
    /// Counts the NATS client's (re)connections.
    pub reconnects: watch::Receiver<u64>,
}

/// Connects to NATS and opens the stream. Fails when NATS cannot be reached at
/// start (a supervisor retries); once running, the client reconnects by itself.
pub(crate) async fn open(config: &Config, url: &str) -> anyhow::Result<Parts> {
    let node = config
        .node_name
        .clone()
        .unwrap_or_else(|| default_node_name(config.ws_port));
    let (reconnects_tx, reconnects) = watch::channel(0u64);
    let client = async_nats::ConnectOptions::new()
        .name(format!("aether {node}"))
        .event_callback(move |event| {
            let tx = reconnects_tx.clone();
            async move {
                if matches!(event, async_nats::Event::Connected) {
                    tx.send_modify(|n| *n += 1);
                }
            }
        })
        .connection_timeout(Duration::from_secs(5))
        // Never give up: a node without NATS reports 503 until it is back.
        .max_reconnects(None)
        .connect(url.split(',').map(str::trim).collect::<Vec<_>>().as_slice())
        .await
        .with_context(|| format!("connecting to NATS_URL {url}"))?;
    let opts = StreamOptions::for_slot(
        &config.replication_slot,
        config.resume_retention,
        config.resume_retention_bytes,
    );
    let rt = tokio::runtime::Handle::current();
    let log = tokio::task::spawn_blocking(move || JetStreamLog::open(rt, client, opts))
        .await
        .context("change stream")?
        .context("opening the change stream in NATS JetStream")?;
    let start = log.start_point();
    tracing::info!(%node, epoch = %start.epoch, newest = ?start.newest.map(|p| p.to_string()), start_seq = start.seq, "cluster mode: change stream open");
    let (follow_tx, follow) = watch::channel(FollowStatus::default());
    let (leading_tx, leading) = watch::channel(false);
    Ok(Parts {
        cluster: Cluster {
            node,
            log: Arc::new(log),
            follow,
            leading,
            slot: config.replication_slot.clone(),
        },
        follow_tx,
        leading_tx,
        start,
        reconnects,
    })
}

/// What `/health` and `/ws/status` say of this node.
impl aether_http::ClusterNode for Cluster {
    fn node(&self) -> &str {
        &self.node
    }

    fn is_leader(&self) -> bool {
        Cluster::is_leader(self)
    }

    fn problem(&self) -> Option<String> {
        Cluster::problem(self)
    }

    fn members<'a>(
        &'a self,
        pool: &'a deadpool_postgres::Pool,
    ) -> aether_realtime::BoxFuture<'a, serde_json::Value> {
        Box::pin(async move {
            serde_json::to_value(Cluster::members(self, pool).await)
                .unwrap_or(serde_json::Value::Null)
        })
    }
}

impl Cluster {
    /// NATS is reachable and this node is reading the stream.
    pub(crate) fn problem(&self) -> Option<String> {
        if self.log.client().connection_state() != async_nats::connection::State::Connected {
            return Some("NATS is not reachable: this node cannot read the change stream".into());
        }
        let follow = self.follow.borrow();
        if let Some(e) = &follow.error {
            return Some(format!("the change stream cannot be read: {e}"));
        }
        // Positions handed out before this node's router has the stream's
        // history would be answered `gap` a moment later.
        let stream = self.log.bounds();
        if stream.reset_pending || follow.epoch.0 == 0 || follow.epoch != stream.epoch {
            return Some("this node has not read the change stream's history yet".into());
        }
        None
    }

    pub(crate) fn is_leader(&self) -> bool {
        *self.leading.borrow()
    }

    /// Who is in the cluster, from PostgreSQL's sessions.
    pub(crate) async fn members(&self, pool: &deadpool_postgres::Pool) -> Members {
        let prefix = format!("aether:{}:", self.slot);
        let rows = match pool.get().await {
            Ok(c) => c
                .query(
                    "SELECT substr(a.application_name, length($1) + 1), \
                            EXISTS (SELECT 1 FROM pg_locks l WHERE l.pid = a.pid \
                                    AND l.locktype = 'advisory' AND l.granted \
                                    AND l.classid = $2::int8::oid \
                                    AND l.objid = (hashtext($3)::int8 & 4294967295)::oid \
                                    AND l.objsubid = 2) \
                       FROM pg_stat_activity a \
                      WHERE starts_with(a.application_name, $1) \
                      ORDER BY 1",
                    &[&prefix, &i64::from(LOCK_CLASS), &self.slot],
                )
                .await
                .unwrap_or_default(),
            Err(_) => Vec::new(),
        };
        let mut leader = None;
        let mut nodes = Vec::new();
        for r in rows {
            let name: String = r.get(0);
            if r.get::<_, bool>(1) {
                leader = Some(name.clone());
            }
            nodes.push(name);
        }
        Members {
            node: self.node.clone(),
            leader,
            nodes,
        }
    }
}

/// A node cut off from the change stream (NATS unreachable) this long closes
/// its sockets: its clients reconnect, through the load balancer, to nodes that
/// deliver, and resume with `since`.
pub(crate) const DRAIN_AFTER: Duration = Duration::from_secs(10);

/// Watches this node's reading of the stream; drains its sockets once per
/// outage that lasts [`DRAIN_AFTER`].
pub(crate) async fn drain_when_cut_off(
    cluster: Arc<Cluster>,
    realtime: aether_realtime::Realtime,
    shutdown: CancellationToken,
) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut since: Option<tokio::time::Instant> = None;
    let mut drained = false;
    loop {
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        match cluster.problem() {
            None => {
                since = None;
                drained = false;
            }
            Some(why) => {
                let at = *since.get_or_insert_with(tokio::time::Instant::now);
                if !drained && at.elapsed() >= DRAIN_AFTER {
                    tracing::warn!(%why, "cut off from the change stream: closing this node's sockets so clients move to other nodes");
                    realtime.drain.drain();
                    drained = true;
                }
            }
        }
    }
}

/// Every node's reader of the stream, into its router.
pub(crate) async fn follow(
    log: Arc<JetStreamLog>,
    start: aether_changelog::jetstream::StartPoint,
    feed: mpsc::Sender<Feed>,
    status: watch::Sender<FollowStatus>,
    reconnects: watch::Receiver<u64>,
    shutdown: CancellationToken,
) {
    aether_changelog::jetstream::follow(log, start, feed, status, reconnects, shutdown).await
}

/// What the leader's task needs.
pub(crate) struct Leadership {
    pub pg: tokio_postgres::Config,
    pub node: String,
    pub slot: String,
    pub publication: String,
    pub log: Arc<JetStreamLog>,
    pub leading: watch::Sender<bool>,
    pub replication: watch::Sender<ReplicationStatus>,
    pub log_status: watch::Sender<LogStatus>,
    pub shutdown: CancellationToken,
}

impl Leadership {
    /// Waits for the lock, then leads until shutdown. Returns early (a failure:
    /// the process exits) only when leadership was lost.
    pub(crate) async fn run(self) {
        let mut pg = self.pg.clone();
        pg.application_name(application_name(&self.slot, &self.node));
        loop {
            match self.attempt(&pg).await {
                Ok(Outcome::Shutdown) => return,
                Ok(Outcome::Lost(why)) => {
                    tracing::error!(node = %self.node, %why, "leadership lost: this node stops (a supervisor restarts it as a standby)");
                    return;
                }
                Err(e) => {
                    // Could not even connect: a standby keeps trying.
                    tracing::warn!(node = %self.node, error = %e, "cluster membership connection");
                    tokio::select! {
                        biased;
                        _ = self.shutdown.cancelled() => return,
                        _ = tokio::time::sleep(TRY_EVERY) => {}
                    }
                }
            }
        }
    }

    async fn attempt(&self, pg: &tokio_postgres::Config) -> anyhow::Result<Outcome> {
        let (client, conn) = pg.connect(tokio_postgres::NoTls).await?;
        let mut conn = Box::pin(conn);
        // Standby: membership connection up, trying the lock.
        let key: [&(dyn tokio_postgres::types::ToSql + Sync); 2] = [&LOCK_CLASS, &self.slot];
        loop {
            let try_lock = client.query_one("SELECT pg_try_advisory_lock($1, hashtext($2))", &key);
            let took = tokio::select! {
                biased;
                _ = self.shutdown.cancelled() => return Ok(Outcome::Shutdown),
                r = &mut conn => anyhow::bail!("membership connection ended: {r:?}"),
                r = try_lock => r?.get::<_, bool>(0),
            };
            if took {
                break;
            }
            tokio::select! {
                biased;
                _ = self.shutdown.cancelled() => return Ok(Outcome::Shutdown),
                r = &mut conn => anyhow::bail!("membership connection ended: {r:?}"),
                _ = tokio::time::sleep(TRY_EVERY) => {}
            }
        }
        tracing::warn!(node = %self.node, "this node is the leader: it holds the replication slot");
        let lead = self.lead(&client);
        tokio::pin!(lead);
        tokio::select! {
            biased;
            r = &mut conn => {
                // Queued changes are not appended after a successor's.
                self.log.depose();
                let _ = self.leading.send(false);
                Ok(Outcome::Lost(format!("the lock connection ended: {r:?}")))
            }
            r = &mut lead => {
                self.log.depose();
                let _ = self.leading.send(false);
                match r {
                    Ok(()) if self.shutdown.is_cancelled() => Ok(Outcome::Shutdown),
                    Ok(()) => Ok(Outcome::Lost("the replication stream stopped".into())),
                    Err(e) => Ok(Outcome::Lost(format!("{e:#}"))),
                }
            }
        }
    }

    /// The leader's work: the slot, the log's writer, the replication stream.
    async fn lead(&self, setup: &tokio_postgres::Client) -> anyhow::Result<()> {
        // Another leader may have appended since this node opened the stream:
        // read where it stands and fence the predecessor's late appends.
        let l = Arc::clone(&self.log);
        tokio::task::spawn_blocking(move || l.claim())
            .await
            .context("change stream")??;
        if !ingest::slot_exists(setup, &self.slot).await? {
            let l = Arc::clone(&self.log);
            tokio::task::spawn_blocking(move || l.mark_reset_pending())
                .await
                .context("change stream")??;
        }
        let (confirmed, _) = ingest::ensure_slot(setup, &self.slot).await?;
        if self.log.bounds().reset_pending {
            let (l, floor) = (Arc::clone(&self.log), floor_for_slot(confirmed));
            let epoch = tokio::task::spawn_blocking(move || l.reset(floor))
                .await
                .context("change stream")??;
            tracing::warn!(%epoch, %floor, "the change stream starts a new epoch for a new replication slot");
        }
        let timeout = ingest::wal_sender_timeout(setup).await?;
        let _ = self.leading.send(true);
        let (log_tx, log_rx) = mpsc::channel(8192);
        // Every node's router, this one's too, reads the stream: what the
        // writer would feed directly is dropped.
        let (feed_tx, mut feed_rx) = mpsc::channel::<Feed>(1024);
        let drain = tokio::spawn(async move { while feed_rx.recv().await.is_some() {} });
        let (durable_tx, durable_rx) = watch::channel(Durable::default());
        let shared: aether_changelog::SharedLog = self.log.clone();
        let pump = pump::start(
            Arc::clone(&shared),
            log_rx,
            feed_tx,
            durable_tx,
            self.log_status.clone(),
        )
        .context("starting the change log threads")?;
        let replication = ReplicationTask {
            pg: self.pg.clone(),
            slot: self.slot.clone(),
            publication: self.publication.clone(),
            status_interval: ingest::status_interval(timeout),
            log: log_tx,
            durable: durable_rx,
            epoch: self.log.bounds().epoch,
            changelog: shared,
            status: self.replication.clone(),
            shutdown: self.shutdown.clone(),
        };
        replication.run().await;
        // The replication task is gone, its sender with it: the writer drains
        // what it has and ends.
        let _ = tokio::task::spawn_blocking(move || {
            let _ = pump.writer.join();
            let _ = pump.syncer.join();
        })
        .await;
        drain.abort();
        Ok(())
    }
}

enum Outcome {
    Shutdown,
    Lost(String),
}
