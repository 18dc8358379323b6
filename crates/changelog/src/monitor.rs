//! Watches what the acknowledgement path must never wait for: whether the
//! database answers ordinary queries, and how much WAL the slot makes PostgreSQL
//! keep. Feeds `/health`, `/ws/status` and the metrics.

use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// What the last check found.
#[derive(Debug, Clone, Default)]
pub struct SlotHealth {
    /// The pool could not run a query: REST and status cannot be served.
    pub db_error: Option<String>,
    /// Bytes of WAL the slot retains (`pg_current_wal_lsn() - restart_lsn`).
    pub wal_retained: Option<i64>,
    /// `pg_replication_slots.wal_status`: `reserved`, `extended`, `unreserved`, `lost`.
    pub wal_status: Option<String>,
    /// More retained than `WAL_RETAINED_WARN_BYTES`.
    pub wal_warning: bool,
}

const EVERY: Duration = Duration::from_secs(2);

pub async fn run(
    pool: deadpool_postgres::Pool,
    slot: String,
    warn_bytes: u64,
    out: watch::Sender<SlotHealth>,
    shutdown: CancellationToken,
) {
    let retained_gauge = metrics::gauge!("aether_slot_wal_retained_bytes");
    let mut tick = tokio::time::interval(EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let check = async {
            let client = pool.get().await.map_err(|e| e.to_string())?;
            let row = client
                .query_opt(
                    "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)::int8, wal_status
                       FROM pg_replication_slots WHERE slot_name = $1",
                    &[&slot],
                )
                .await
                .map_err(|e| e.to_string())?;
            Ok::<_, String>(
                row.map(|r| (r.get::<_, Option<i64>>(0), r.get::<_, Option<String>>(1))),
            )
        };
        let found = match tokio::time::timeout(EVERY, check).await {
            Ok(r) => r,
            Err(_) => Err("the database did not answer within 2 s".to_owned()),
        };
        let before = out.borrow().wal_warning;
        let mut h = SlotHealth::default();
        match found {
            Ok(Some((retained, status))) => {
                h.wal_retained = retained;
                h.wal_status = status;
            }
            Ok(None) => {}
            Err(e) => h.db_error = Some(e),
        }
        let retained = h.wal_retained.unwrap_or(0).max(0) as u64;
        retained_gauge.set(retained as f64);
        h.wal_warning = retained > warn_bytes;
        if h.wal_warning && !before {
            tracing::warn!(
                slot = %slot,
                retained_bytes = retained,
                warn_bytes,
                "the replication slot retains more WAL than WAL_RETAINED_WARN_BYTES: Aether is behind or was down; \
                 set max_slot_wal_keep_size to cap it (the slot is then invalidated and recreated, and clients get gap)"
            );
        }
        out.send_replace(h);
    }
}
