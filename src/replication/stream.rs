//! The replication task: reads the slot, decodes, hands changes to the router, and
//! tells PostgreSQL how far it may forget.
//!
//! Acknowledgement rule: the flush position sent to PostgreSQL is what the router
//! has released (changes handed to every subscriber queue and out of the resume
//! window). Keepalive positions are acknowledged only when nothing is pending, so a
//! change can never be confirmed before it was handed on. The status interval is
//! derived from the server's `wal_sender_timeout`.

use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use super::conn::{ConnError, ReplicationConn, ReplicationFrame, quote_literal};
use super::lsn::PgLsn;
use super::pgoutput::{self, DecodeError};
use crate::changes::{Assembler, ChangeError, Output};
use crate::router::Progress;

#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error(transparent)]
    Conn(#[from] ConnError),
    #[error("pgoutput decode: {0}")]
    Decode(#[from] DecodeError),
    #[error("change stream: {0}")]
    Change(#[from] ChangeError),
    #[error("the router has stopped")]
    RouterGone,
}

/// Health of the stream, for `/health` and status endpoints.
#[derive(Debug, Clone, Default)]
pub struct ReplicationStatus {
    pub connected: bool,
    pub received: PgLsn,
    pub flushed: PgLsn,
    /// Commit time (ms since epoch) of the last transaction received.
    pub last_commit_ms: Option<i64>,
    pub last_error: Option<String>,
}

pub struct ReplicationTask {
    pub pg: tokio_postgres::Config,
    /// For persisting the resume floor before acknowledging.
    pub pool: deadpool_postgres::Pool,
    pub slot: String,
    pub publication: String,
    pub status_interval: Duration,
    pub changes: mpsc::Sender<Output>,
    pub progress: watch::Receiver<Progress>,
    pub status: watch::Sender<ReplicationStatus>,
    pub shutdown: CancellationToken,
}

enum Event {
    Shutdown,
    Frame(Result<ReplicationFrame, ConnError>),
    Tick,
}

impl ReplicationTask {
    /// Streams until shutdown, reconnecting with backoff after errors. A reconnect
    /// restarts from the slot's confirmed position; the router drops what it has
    /// already handled (positions are deterministic).
    pub async fn run(mut self) {
        let mut backoff = Duration::from_millis(100);
        loop {
            match self.session().await {
                Ok(()) => return,
                Err(StreamError::RouterGone) => return,
                Err(e) => {
                    tracing::warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "replication stream failed");
                    self.status.send_modify(|s| {
                        s.connected = false;
                        s.last_error = Some(e.to_string());
                    });
                }
            }
            tokio::select! {
                _ = self.shutdown.cancelled() => return,
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    }

    async fn session(&mut self) -> Result<(), StreamError> {
        let mut conn = ReplicationConn::connect(&self.pg).await?;
        conn.start_replication(&self.slot, &self.publication, PgLsn::ZERO)
            .await?;
        tracing::info!(slot = %self.slot, "replication streaming");
        self.status.send_modify(|s| {
            s.connected = true;
            s.last_error = None;
        });
        let mut assembler = Assembler::new();
        // Looked up once, not per change.
        let decoded = metrics::counter!("aether_events_decoded_total");
        let mut outputs = Vec::with_capacity(4);
        let mut tick = tokio::time::interval(self.status_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut received = PgLsn::ZERO;
        let mut keepalive_end = PgLsn::ZERO;
        let mut forwarded_end = PgLsn::ZERO;
        let mut flushed = PgLsn::ZERO;
        let mut persisted_floor = None;
        let mut last_commit_ms: Option<i64> = None;

        loop {
            let event = tokio::select! {
                biased;
                _ = self.shutdown.cancelled() => Event::Shutdown,
                frame = conn.next_frame() => Event::Frame(frame),
                _ = tick.tick() => Event::Tick,
            };
            let mut reply_now = false;
            match event {
                Event::Shutdown => {
                    let flush =
                        self.flush_position(flushed, keepalive_end, forwarded_end, &assembler);
                    let _ = conn.send_status(received.max(flush), flush, false).await;
                    return Ok(());
                }
                Event::Tick => reply_now = true,
                Event::Frame(frame) => match frame? {
                    ReplicationFrame::XLogData { wal_end, data, .. } => {
                        received = received.max(wal_end);
                        let msg = pgoutput::decode(data)?;
                        assembler.push(msg, &mut outputs)?;
                        for out in outputs.drain(..) {
                            match &out {
                                Output::Commit {
                                    end_lsn,
                                    commit_time_ms,
                                    ..
                                } => {
                                    forwarded_end = forwarded_end.max(*end_lsn);
                                    // Published with the next status update, not per commit.
                                    last_commit_ms = Some(*commit_time_ms);
                                }
                                Output::Change(_) => decoded.increment(1),
                                _ => {}
                            }
                            // The router may hold the stream back for a catching-up
                            // client: keep telling the server we are alive meanwhile.
                            let permit = loop {
                                tokio::select! {
                                    biased;
                                    _ = self.shutdown.cancelled() => {
                                        let flush = self.flush_position(
                                            flushed,
                                            keepalive_end,
                                            forwarded_end,
                                            &assembler,
                                        );
                                        let _ = conn
                                            .send_status(received.max(flush), flush, false)
                                            .await;
                                        return Ok(());
                                    }
                                    permit = self.changes.reserve() => {
                                        break permit.map_err(|_| StreamError::RouterGone)?;
                                    }
                                    _ = tick.tick() => {
                                        conn.send_status(received.max(flushed), flushed, false)
                                            .await?;
                                    }
                                }
                            };
                            permit.send(out);
                        }
                    }
                    ReplicationFrame::Keepalive {
                        wal_end,
                        reply_requested,
                    } => {
                        received = received.max(wal_end);
                        keepalive_end = keepalive_end.max(wal_end);
                        reply_now = reply_requested;
                    }
                },
            }
            if reply_now {
                let next = self.flush_position(flushed, keepalive_end, forwarded_end, &assembler);
                // The floor goes to disk before PostgreSQL may forget what is below it.
                let floor = self.progress.borrow().floor;
                if next > flushed && floor != persisted_floor {
                    match self.persist_floor(floor).await {
                        Ok(()) => {
                            persisted_floor = floor;
                            flushed = next;
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "could not persist the resume floor; not acknowledging")
                        }
                    }
                } else {
                    flushed = next;
                }
                conn.send_status(received.max(flushed), flushed, false)
                    .await?;
                self.status.send_modify(|s| {
                    s.received = received;
                    s.flushed = flushed;
                    if last_commit_ms.is_some() {
                        s.last_commit_ms = last_commit_ms;
                    }
                });
            }
        }
    }

    async fn persist_floor(
        &self,
        floor: Option<crate::replication::lsn::Position>,
    ) -> Result<(), String> {
        let Some(floor) = floor else { return Ok(()) };
        // Bounded: a pool exhausted by HTTP traffic must not stall the stream past
        // wal_sender_timeout. Not persisting only means not acknowledging yet.
        let write = async {
            let client = self.pool.get().await.map_err(|e| e.to_string())?;
            client
                .execute(
                    "INSERT INTO aether.replication_state (slot, floor) VALUES ($1, $2)
                     ON CONFLICT (slot) DO UPDATE SET floor = EXCLUDED.floor, updated_at = now()",
                    &[&self.slot, &floor.to_string()],
                )
                .await
                .map_err(|e| e.to_string())?;
            Ok(())
        };
        tokio::time::timeout(self.status_interval, write)
            .await
            .map_err(|_| "timed out".to_owned())?
    }

    fn flush_position(
        &self,
        flushed: PgLsn,
        keepalive_end: PgLsn,
        forwarded_end: PgLsn,
        assembler: &Assembler,
    ) -> PgLsn {
        let p = *self.progress.borrow();
        let mut flush = p.released;
        // Nothing in flight and nothing retained: the server's own position is safe.
        if p.all_released && p.handled_end >= forwarded_end && !assembler.in_transaction() {
            flush = flush.max(keepalive_end);
        }
        flush.max(flushed)
    }
}

/// Interval between standby status updates: half of `wal_sender_timeout`, at most
/// one second (so the slot follows closely), at least 50 ms.
pub fn status_interval(wal_sender_timeout: Duration) -> Duration {
    if wal_sender_timeout.is_zero() {
        return Duration::from_secs(1);
    }
    (wal_sender_timeout / 2).clamp(Duration::from_millis(50), Duration::from_secs(1))
}

#[derive(Debug, thiserror::Error)]
pub enum SlotError {
    #[error(transparent)]
    Db(#[from] tokio_postgres::Error),
    #[error(
        "PostgreSQL runs with wal_level={0}; Aether needs wal_level=logical \
         (set it in postgresql.conf and restart PostgreSQL)"
    )]
    WalLevel(String),
    #[error(
        "replication slot {slot:?} uses plugin {plugin:?}, not pgoutput; drop it or set REPLICATION_SLOT"
    )]
    WrongPlugin { slot: String, plugin: String },
    #[error(
        "replication slot {slot:?} belongs to database {database:?}; set REPLICATION_SLOT to another name"
    )]
    OtherDatabase { slot: String, database: String },
    #[error("bad LSN from the server: {0}")]
    Lsn(String),
}

/// Checks `wal_level`, creates the slot if needed, and returns its confirmed position.
pub async fn ensure_slot(client: &tokio_postgres::Client, slot: &str) -> Result<PgLsn, SlotError> {
    let level: String = client.query_one("SHOW wal_level", &[]).await?.get(0);
    if level != "logical" {
        return Err(SlotError::WalLevel(level));
    }
    let row = client
        .query_opt(
            "SELECT plugin::text, database::text, confirmed_flush_lsn::text, current_database()::text
               FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await?;
    let lsn_text: String = match row {
        Some(row) => {
            let plugin: Option<String> = row.get(0);
            let database: Option<String> = row.get(1);
            let current: String = row.get(3);
            if plugin.as_deref() != Some("pgoutput") {
                return Err(SlotError::WrongPlugin {
                    slot: slot.into(),
                    plugin: plugin.unwrap_or_default(),
                });
            }
            if database.as_deref() != Some(current.as_str()) {
                return Err(SlotError::OtherDatabase {
                    slot: slot.into(),
                    database: database.unwrap_or_default(),
                });
            }
            let lsn: Option<String> = row.get(2);
            lsn.unwrap_or_else(|| "0/0".into())
        }
        None => {
            let row = client
                .query_one(
                    &format!(
                        "SELECT lsn::text FROM pg_create_logical_replication_slot({}, 'pgoutput')",
                        quote_literal(slot)
                    ),
                    &[],
                )
                .await?;
            tracing::info!(slot, "replication slot created");
            // A new slot starts a new history: an old floor would promise changes
            // that nobody kept.
            client
                .execute(
                    "DELETE FROM aether.replication_state WHERE slot = $1",
                    &[&slot],
                )
                .await?;
            row.get(0)
        }
    };
    lsn_text.parse().map_err(|_| SlotError::Lsn(lsn_text))
}

/// The resume floor persisted for `slot` by an earlier run.
pub async fn persisted_floor(
    client: &tokio_postgres::Client,
    slot: &str,
) -> Result<Option<crate::replication::lsn::Position>, tokio_postgres::Error> {
    let row = client
        .query_opt(
            "SELECT floor FROM aether.replication_state WHERE slot = $1",
            &[&slot],
        )
        .await?;
    Ok(row.and_then(|r| r.get::<_, String>(0).parse().ok()))
}

/// Reads `wal_sender_timeout`.
pub async fn wal_sender_timeout(
    client: &tokio_postgres::Client,
) -> Result<Duration, tokio_postgres::Error> {
    let ms: i64 = client
        .query_one(
            "SELECT setting::int8 FROM pg_settings WHERE name = 'wal_sender_timeout'",
            &[],
        )
        .await?
        .get(0);
    Ok(Duration::from_millis(u64::try_from(ms).unwrap_or(0)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interval_follows_the_timeout() {
        assert_eq!(
            status_interval(Duration::from_secs(60)),
            Duration::from_secs(1)
        );
        assert_eq!(
            status_interval(Duration::from_millis(400)),
            Duration::from_millis(200)
        );
        assert_eq!(status_interval(Duration::ZERO), Duration::from_secs(1));
    }
}
