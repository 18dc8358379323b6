//! Aether's WebSocket side: one connection engine ([`engine`]) and the
//! dialects it runs (`/ws`: [`session`], Aether and KingShare; `/realtime/v1`:
//! [`phoenix`]), the channel and presence hubs, and the registry of open
//! connections. It sits on the router (`aether_router`) and below the HTTP
//! layer, which upgrades sockets and hands them here; what it needs of the
//! application comes in a [`Realtime`] ([`service`]).

pub mod engine;
mod gate;
pub mod hub;
pub mod kingshare;
pub mod phoenix;
pub mod phoenix_hub;
pub mod protocol;
pub mod registry;
pub mod service;
pub mod session;
pub mod stats;
mod wire;

pub use service::{
    Authenticator, BoxFuture, BroadcastHistory, ChannelPolicy, ChannelRights, Directory,
    PastBroadcast, Realtime, ServerStatus, Settings, StatusReport, TokenRefused,
};

/// Queues an item for one connection without waiting: a full queue closes the
/// connection (it is signalled `Overflowed`), as frames that are not row changes
/// cannot be paged from history. The hubs' and KingShare's one delivery rule.
pub(crate) fn offer<T>(tx: &aether_router::queue::QueueTx<T>, item: T, relay: &'static str) {
    if let Err(aether_router::queue::TrySendError::Full(_)) = tx.try_send(item) {
        tracing::warn!(relay, "queue full, closing the slow connection");
        metrics::counter!("aether_queue_drops_total", "kind" => "closed").increment(1);
        tx.raise(aether_router::queue::Signal::Overflowed);
    }
}
