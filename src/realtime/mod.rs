//! WebSocket sessions on `WS_PATH`.

pub(crate) mod engine;
pub mod hub;
pub mod kingshare;
pub mod phoenix;
pub mod phoenix_hub;
pub mod protocol;
pub mod registry;
pub mod session;
pub mod stats;

/// Queues an item for one connection without waiting: a full queue closes the
/// connection (its writer sees `overflowed`), as frames that are not row changes
/// cannot be paged from history. The hubs' and KingShare's one delivery rule.
pub(crate) fn offer<T>(
    tx: &aether_router::queue::QueueTx<T>,
    overflowed: &tokio_util::sync::CancellationToken,
    item: T,
    relay: &'static str,
) {
    if let Err(aether_router::queue::TrySendError::Full(_)) = tx.try_send(item) {
        tracing::warn!(relay, "queue full, closing the slow connection");
        metrics::counter!("aether_queue_drops_total", "kind" => "closed").increment(1);
        overflowed.cancel();
    }
}
