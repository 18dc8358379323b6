//! The replication task: reads the slot, decodes, hands changes to the change
//! log, and tells PostgreSQL how far it may forget.
//!
//! Acknowledgement rule: the flush position sent to PostgreSQL is the end of the
//! last transaction the log holds durably, or, when everything received before a
//! keepalive is durable and no transaction was open then, that keepalive's WAL end
//! (so an idle slot follows the server, and a fast shutdown, which waits for the
//! client to confirm everything including the shutdown checkpoint, finishes at
//! once). Confirming never needs a database query. The status interval is derived
//! from the server's `wal_sender_timeout`.
//!
//! Errors are classified: transient ones (connection lost, server shutting down)
//! are retried with backoff; a missing or invalidated slot is recreated and the log
//! reset (a new epoch: what happened in between is unknowable); definite ones (no
//! publication, no permission, a change that cannot be decoded) are reported as
//! such on `/health` and retried slowly.

use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;

use crate::local::floor_for_slot;
use crate::pump::{Durable, LogInput};
use aether_core::lsn::{Epoch, PgLsn};
use aether_postgres::decode::{Assembler, ChangeError, Output};
use aether_postgres::replication::conn::{
    ConnError, ReplicationConn, ReplicationFrame, quote_literal,
};
use aether_postgres::replication::pgoutput::{self, DecodeError};

#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error(transparent)]
    Conn(#[from] ConnError),
    #[error("pgoutput decode at {lsn}: {source}")]
    Decode {
        lsn: PgLsn,
        #[source]
        source: DecodeError,
    },
    #[error("change stream at {lsn}: {source}")]
    Change {
        lsn: PgLsn,
        #[source]
        source: ChangeError,
    },
    #[error("the change log has stopped")]
    LogGone,
}

/// What a failure calls for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// Retry soon, with backoff.
    Transient,
    /// The slot is gone or invalidated: recreate it and reset the log.
    SlotLost,
    /// A retry cannot fix it: someone must act. Retried slowly.
    Definite,
}

impl StreamError {
    pub fn class(&self) -> ErrorClass {
        match self {
            StreamError::Conn(ConnError::Server { code, message }) => {
                classify_sqlstate(code, message)
            }
            StreamError::Conn(_) | StreamError::LogGone => ErrorClass::Transient,
            StreamError::Decode { .. } | StreamError::Change { .. } => ErrorClass::Definite,
        }
    }

    /// What an operator should do about a definite error.
    pub fn advice(&self) -> Option<&'static str> {
        let StreamError::Conn(ConnError::Server { code, message }) = self else {
            return match self {
                StreamError::Decode { .. } | StreamError::Change { .. } => Some(
                    "a change could not be decoded: report it with the log line; the slot is not confirmed past it",
                ),
                _ => None,
            };
        };
        Some(match code.as_str() {
            "42704" if message.contains("publication") => {
                "the publication is missing: restart Aether to recreate it (migrations create it)"
            }
            "42501" => "the database user lacks the REPLICATION attribute or a privilege: grant it",
            c if c.starts_with("28") => "authentication failed: check DATABASE_URL",
            "3D000" => "the database does not exist: check DATABASE_URL",
            _ => return None,
        })
    }
}

/// SQLSTATE → what to do. Unknown codes are taken as transient: retrying is safe.
fn classify_sqlstate(code: &str, message: &str) -> ErrorClass {
    match code {
        // undefined_object: the slot (or the publication) does not exist.
        "42704" if message.contains("replication slot") => ErrorClass::SlotLost,
        // object_not_in_prerequisite_state: "can no longer get changes from
        // replication slot" (invalidated by max_slot_wal_keep_size).
        "55000" if message.contains("can no longer get changes") => ErrorClass::SlotLost,
        "42704" | "42501" | "3D000" => ErrorClass::Definite,
        c if c.starts_with("28") => ErrorClass::Definite,
        // admin_shutdown, crash_shutdown, cannot_connect_now, too_many_connections,
        // connection exceptions, object_in_use (the old walsender still holds the slot).
        _ => ErrorClass::Transient,
    }
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
    /// The last error cannot be fixed by retrying: what to do.
    pub advice: Option<String>,
}

pub struct ReplicationTask {
    pub pg: tokio_postgres::Config,
    pub slot: String,
    pub publication: String,
    pub status_interval: Duration,
    /// Into the change log.
    pub log: mpsc::Sender<LogInput>,
    /// How far the log is durable.
    pub durable: watch::Receiver<Durable>,
    /// The log's epoch, stamped on every change.
    pub epoch: Epoch,
    /// The log itself, to mark a reset pending before the slot is recreated.
    pub changelog: crate::SharedLog,
    pub status: watch::Sender<ReplicationStatus>,
    pub shutdown: CancellationToken,
}

enum Event {
    Shutdown,
    Frame(Result<ReplicationFrame, ConnError>),
    Durable,
    Tick,
}

/// Per-session acknowledgement state.
struct Ack {
    received: PgLsn,
    /// The last flush position sent.
    flushed: PgLsn,
    /// A keepalive's WAL end and the inputs sent before it: confirmable once those
    /// are durable.
    keepalive: Option<(PgLsn, u64)>,
    last_sent: Instant,
}

impl Ack {
    fn flush(&self, d: Durable) -> PgLsn {
        let mut f = d.end_lsn;
        if let Some((end, n)) = self.keepalive
            && d.inputs >= n
        {
            f = f.max(end);
        }
        f.max(self.flushed)
    }
}

/// Slow retries for errors a retry cannot fix.
const DEFINITE_RETRY: Duration = Duration::from_secs(30);

impl ReplicationTask {
    /// Streams until shutdown, reconnecting after errors as their class says. A
    /// reconnect restarts from the slot's confirmed position; the log drops what it
    /// already holds (positions are deterministic).
    pub async fn run(mut self) {
        let mut backoff = Duration::from_millis(100);
        let mut sent = 0u64;
        loop {
            let e = match self.session(&mut sent).await {
                Ok(()) => return,
                Err(StreamError::LogGone) => {
                    self.status.send_modify(|s| {
                        s.connected = false;
                        s.last_error = Some("the change log has stopped".into());
                    });
                    return;
                }
                Err(e) => e,
            };
            let class = e.class();
            let advice = e.advice().map(str::to_owned);
            self.status.send_modify(|s| {
                s.connected = false;
                s.last_error = Some(e.to_string());
                s.advice = advice.clone();
            });
            let wait = match class {
                ErrorClass::Transient => {
                    tracing::warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "replication stream failed");
                    let w = backoff;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                    w
                }
                ErrorClass::SlotLost => {
                    tracing::error!(error = %e, slot = %self.slot, "the replication slot is gone or invalidated: recreating it; changes committed meanwhile are lost to Aether and every subscriber is told `gap`");
                    match self.recreate_slot(&mut sent).await {
                        Ok(()) => Duration::ZERO,
                        Err(e) => {
                            tracing::error!(error = %e, "recreating the replication slot failed");
                            self.status.send_modify(|s| {
                                s.last_error = Some(format!("recreating the slot: {e}"))
                            });
                            Duration::from_secs(5)
                        }
                    }
                }
                ErrorClass::Definite => {
                    tracing::error!(error = %e, advice = advice.as_deref().unwrap_or(""), retry_in_s = DEFINITE_RETRY.as_secs(), "replication cannot continue until this is fixed");
                    DEFINITE_RETRY
                }
            };
            tokio::select! {
                biased;
                _ = self.shutdown.cancelled() => return,
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// Drops what is left of the slot, creates it anew and resets the log.
    async fn recreate_slot(&mut self, sent: &mut u64) -> Result<(), anyhow::Error> {
        let client = aether_postgres::connect(&self.pg).await?;
        // Durably first: a crash between the new slot and the reset below must
        // still reset the log at the next start.
        let log = std::sync::Arc::clone(&self.changelog);
        tokio::task::spawn_blocking(move || log.mark_reset_pending()).await??;
        client
            .execute(
                "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots
                  WHERE slot_name = $1 AND database = current_database()",
                &[&self.slot],
            )
            .await?;
        let (confirmed, _) = ensure_slot(&client, &self.slot).await?;
        let (done, epoch) = oneshot::channel();
        self.log
            .send(LogInput::Reset {
                floor: floor_for_slot(confirmed),
                done,
            })
            .await
            .map_err(|_| anyhow::anyhow!("the change log has stopped"))?;
        *sent += 1;
        self.epoch = epoch.await?;
        Ok(())
    }

    async fn session(&mut self, sent: &mut u64) -> Result<(), StreamError> {
        let mut conn = ReplicationConn::connect(&self.pg).await?;
        conn.start_replication(&self.slot, &self.publication, PgLsn::ZERO)
            .await?;
        tracing::info!(slot = %self.slot, "replication streaming");
        self.status.send_modify(|s| {
            s.connected = true;
            s.last_error = None;
            s.advice = None;
        });
        let mut assembler = Assembler::in_epoch(self.epoch);
        // Looked up once, not per change.
        let decoded = metrics::counter!("aether_events_decoded_total");
        let mut outputs = Vec::with_capacity(4);
        let mut tick = tokio::time::interval(self.status_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut durable = self.durable.clone();
        // `sent` counts inputs handed to the log since the task started, like
        // `Durable::inputs`: it is the caller's, so no early return loses a count.
        let mut ack = Ack {
            received: PgLsn::ZERO,
            flushed: PgLsn::ZERO,
            keepalive: None,
            last_sent: Instant::now(),
        };
        // A reply PostgreSQL asked for and that did not yet confirm its WAL end.
        let mut owed: Option<PgLsn> = None;
        let mut last_commit_ms: Option<i64> = None;

        loop {
            // Status events before frames: under a sustained stream a frame is
            // always ready, and confirmations must still go out.
            let event = tokio::select! {
                biased;
                _ = self.shutdown.cancelled() => Event::Shutdown,
                _ = tick.tick() => Event::Tick,
                r = durable.changed() => match r {
                    Ok(()) => Event::Durable,
                    Err(_) => break Err(StreamError::LogGone),
                },
                frame = conn.next_frame() => Event::Frame(frame),
            };
            let mut reply_now = false;
            match event {
                Event::Shutdown => {
                    // Give the last batch a moment to become durable, so the slot
                    // is confirmed as far as it can be.
                    let want = *sent;
                    let _ = tokio::time::timeout(
                        Duration::from_secs(1),
                        durable.wait_for(|d| d.inputs >= want),
                    )
                    .await;
                    let flush = ack.flush(*durable.borrow());
                    let _ = conn
                        .send_status(ack.received.max(flush), flush, false)
                        .await;
                    break Ok(());
                }
                Event::Tick => reply_now = true,
                Event::Durable => {
                    let flush = ack.flush(*durable.borrow_and_update());
                    // Confirm promptly when PostgreSQL waits for it (a fast shutdown
                    // does), otherwise at most every 100 ms between ticks.
                    reply_now = flush > ack.flushed
                        && (owed.is_some_and(|w| flush >= w)
                            || ack.last_sent.elapsed() >= Duration::from_millis(100));
                }
                Event::Frame(frame) => match frame? {
                    ReplicationFrame::XLogData {
                        wal_end,
                        data,
                        wal_start,
                    } => {
                        ack.received = ack.received.max(wal_end);
                        let msg = pgoutput::decode(data).map_err(|source| StreamError::Decode {
                            lsn: wal_start,
                            source,
                        })?;
                        assembler.push(msg, &mut outputs).map_err(|source| {
                            StreamError::Change {
                                lsn: wal_start,
                                source,
                            }
                        })?;
                        for out in outputs.drain(..) {
                            match &out {
                                Output::Commit { commit_time_ms, .. } => {
                                    // Published with the next status update, not per commit.
                                    last_commit_ms = Some(*commit_time_ms);
                                }
                                Output::Change(_) => decoded.increment(1),
                                _ => {}
                            }
                            // The log may be slow (a failing disk): keep telling the
                            // server we are alive meanwhile.
                            let permit = loop {
                                tokio::select! {
                                    biased;
                                    _ = self.shutdown.cancelled() => {
                                        let flush = ack.flush(*durable.borrow());
                                        let _ = conn.send_status(ack.received.max(flush), flush, false).await;
                                        return Ok(());
                                    }
                                    permit = self.log.reserve() => {
                                        break permit.map_err(|_| StreamError::LogGone)?;
                                    }
                                    _ = tick.tick() => {
                                        let flush = ack.flush(*durable.borrow());
                                        conn.send_status(ack.received.max(flush), flush, false).await?;
                                        ack.flushed = flush;
                                    }
                                }
                            };
                            permit.send(LogInput::Output(out));
                            *sent += 1;
                        }
                    }
                    ReplicationFrame::Keepalive {
                        wal_end,
                        reply_requested,
                    } => {
                        ack.received = ack.received.max(wal_end);
                        // Everything before this keepalive was sent already; outside
                        // a transaction its end is confirmable once that is durable.
                        if !assembler.in_transaction() {
                            ack.keepalive = Some((wal_end, *sent));
                        }
                        if reply_requested {
                            owed = Some(wal_end);
                            reply_now = true;
                        }
                    }
                },
            }
            if reply_now {
                let flush = ack.flush(*durable.borrow());
                conn.send_status(ack.received.max(flush), flush, false)
                    .await?;
                ack.flushed = flush;
                ack.last_sent = Instant::now();
                if owed.is_some_and(|w| flush >= w) {
                    owed = None;
                }
                let received = ack.received;
                self.status.send_modify(|s| {
                    s.received = received;
                    s.flushed = flush;
                    if last_commit_ms.is_some() {
                        s.last_commit_ms = last_commit_ms;
                    }
                });
            }
        }
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

/// Checks `wal_level`, creates the slot if needed, and returns its confirmed
/// position and whether it was created just now.
pub async fn ensure_slot(
    client: &tokio_postgres::Client,
    slot: &str,
) -> Result<(PgLsn, bool), SlotError> {
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
    let (lsn_text, created): (String, bool) = match row {
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
            (lsn.unwrap_or_else(|| "0/0".into()), false)
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
            (row.get(0), true)
        }
    };
    let lsn = lsn_text.parse().map_err(|_| SlotError::Lsn(lsn_text))?;
    Ok((lsn, created))
}

/// Whether `slot` exists.
pub async fn slot_exists(
    client: &tokio_postgres::Client,
    slot: &str,
) -> Result<bool, tokio_postgres::Error> {
    Ok(client
        .query_opt(
            "SELECT 1 FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await?
        .is_some())
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
    fn errors_are_classified_by_sqlstate() {
        let server = |code: &str, message: &str| {
            StreamError::Conn(ConnError::Server {
                code: code.into(),
                message: message.into(),
            })
        };
        let missing = server("42704", "replication slot \"x\" does not exist");
        assert_eq!(missing.class(), ErrorClass::SlotLost);
        let lost = server(
            "55000",
            "can no longer get changes from replication slot \"x\"",
        );
        assert_eq!(lost.class(), ErrorClass::SlotLost);
        let publication = server("42704", "publication \"aether\" does not exist");
        assert_eq!(publication.class(), ErrorClass::Definite);
        assert!(publication.advice().is_some());
        assert_eq!(
            server("42501", "permission denied").class(),
            ErrorClass::Definite
        );
        assert_eq!(
            server(
                "57P01",
                "terminating connection due to administrator command"
            )
            .class(),
            ErrorClass::Transient
        );
        assert_eq!(
            server("55006", "replication slot \"x\" is active for PID 7").class(),
            ErrorClass::Transient
        );
        assert_eq!(
            StreamError::Conn(ConnError::Closed).class(),
            ErrorClass::Transient
        );
    }

    #[test]
    fn a_keepalive_is_confirmed_only_once_what_came_before_it_is_durable() {
        let ack = Ack {
            received: PgLsn(500),
            flushed: PgLsn(100),
            keepalive: Some((PgLsn(500), 10)),
            last_sent: Instant::now(),
        };
        let d = |inputs, end| Durable {
            inputs,
            end_lsn: PgLsn(end),
        };
        assert_eq!(ack.flush(d(9, 300)), PgLsn(300));
        assert_eq!(ack.flush(d(10, 300)), PgLsn(500));
        assert_eq!(ack.flush(d(0, 0)), PgLsn(100), "never backwards");
    }

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
