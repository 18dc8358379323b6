//! What the realtime side is given by the application, and nothing more: its
//! settings, the router and hubs it talks to, and three questions it asks the
//! application through traits (is this token good, who hears of a user's
//! presence, how is the server). The binary builds one [`Realtime`] and hands it
//! to every socket; the HTTP layer reads its registry and stats.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64};
use std::time::Duration;

use aether_core::principal::Principal;
use aether_router::Command;
use aether_router::catalog::SharedCatalog;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::hub::HubCommand;
use crate::kingshare::Notifier;
use crate::phoenix_hub::PhxCommand;
use crate::registry::Registry;
use crate::stats::Stats;

/// A boxed future: the traits below are called through `dyn`.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// The limits and names every socket works under (from the server's config).
#[derive(Debug, Clone)]
pub struct Settings {
    /// The publication whose tables may be subscribed to.
    pub publication: String,
    /// Items one connection's queue holds.
    pub ws_queue_capacity: usize,
    /// What a connection's queue may hold, in bytes ([`Outbound::weight`]).
    pub ws_queue_bytes: usize,
    /// The largest client frame.
    pub ws_max_frame_bytes: usize,
    pub ws_ping_interval: Duration,
    pub ws_idle_timeout: Duration,
    /// Open sockets in all.
    pub ws_max_connections: usize,
    /// Open sockets per user (or per address for anonymous ones).
    pub rate_limit_connections: usize,
    /// Messages one client may send to one channel per window.
    pub rate_limit_messages: u32,
    pub rate_limit_window: Duration,
}

/// Why a token gives no principal.
#[derive(Debug, Clone, thiserror::Error)]
pub enum TokenRefused {
    /// The token is bad, expired, revoked, or its user is gone: said to the client.
    #[error("{message}")]
    Definite { code: &'static str, message: String },
    /// The check itself failed (database down): logged, not said.
    #[error("token check failed: {0}")]
    Internal(String),
}

impl TokenRefused {
    /// The error code a client is told.
    pub fn code(&self) -> &'static str {
        match self {
            TokenRefused::Definite { code, .. } => code,
            TokenRefused::Internal(_) => "internal_error",
        }
    }
}

/// Turns a token into a principal, with the same rules as every HTTP route.
pub trait Authenticator: Send + Sync {
    fn authenticate<'a>(&'a self, token: &'a str)
    -> BoxFuture<'a, Result<Principal, TokenRefused>>;
}

/// What a member may do on a private channel (`config.private`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ChannelRights {
    /// Join, and receive its broadcasts and presence.
    pub read: bool,
    /// Send broadcasts.
    pub broadcast: bool,
    /// Track presence.
    pub presence: bool,
}

/// Who may use a private channel: decided by the application (Supabase's
/// Realtime Authorization: the `realtime.messages` RLS policies), once per join.
pub trait ChannelPolicy: Send + Sync {
    /// `Err` when it could not be decided (the join is refused with the reason).
    fn rights<'a>(
        &'a self,
        principal: &'a Principal,
        topic: &'a str,
    ) -> BoxFuture<'a, Result<ChannelRights, String>>;
}

/// A broadcast from the database that a joining member may have missed.
#[derive(Debug, Clone)]
pub struct PastBroadcast {
    /// The message's id (`realtime.messages.id`), as `meta.id`.
    pub id: String,
    pub event: String,
    pub payload: serde_json::Value,
}

/// The database broadcasts of a topic since a time, for a private join with
/// `config.broadcast.replay` (Supabase's broadcast replay): read by the
/// application from wherever it keeps them (Aether: the change log).
pub trait BroadcastHistory: Send + Sync {
    /// Private messages of `topic` committed at or after `since_ms` (ms since
    /// the epoch), oldest first, at most `limit`.
    fn since<'a>(
        &'a self,
        topic: &'a str,
        since_ms: i64,
        limit: usize,
    ) -> BoxFuture<'a, Result<Vec<PastBroadcast>, String>>;
}

/// Who hears of a user coming online or going offline (KingShare presence).
pub trait Directory: Send + Sync {
    /// The user's display name and the users told of its presence.
    fn presence<'a>(&'a self, user_id: &'a str) -> BoxFuture<'a, (Option<String>, Vec<String>)>;
}

/// The server's health, for a socket's `system`/`status` request.
#[derive(Debug, Clone)]
pub struct ServerStatus {
    /// `healthy`, `degraded` or `down`.
    pub status: String,
    /// The whole report, as `GET /ws/status` gives it.
    pub report: serde_json::Value,
}

pub trait StatusReport: Send + Sync {
    fn status(&self) -> BoxFuture<'_, ServerStatus>;
}

/// The realtime side of one server; cheap to clone.
#[derive(Clone)]
pub struct Realtime(Arc<Inner>);

pub struct Inner {
    pub settings: Settings,
    /// For reloading the catalog when a subscription names a new table.
    pub pool: deadpool_postgres::Pool,
    pub catalog: SharedCatalog,
    /// When the catalog was last reloaded for an unknown table (ms since the
    /// epoch): at most once a second, so clients naming bogus tables cannot load
    /// the database.
    pub catalog_reloaded_ms: AtomicI64,
    pub router: mpsc::Sender<Command>,
    /// Aether channels (`/ws`).
    pub hub: mpsc::Sender<HubCommand>,
    /// Broadcast and presence of `/realtime/v1`.
    pub phoenix: mpsc::Sender<PhxCommand>,
    pub registry: Arc<Registry>,
    pub stats: Arc<Stats>,
    pub kingshare: Arc<Notifier>,
    pub next_session: AtomicU64,
    pub shutdown: CancellationToken,
    /// Closes this node's sockets while it keeps running (see [`Drain`]).
    pub drain: Drain,
    pub auth: Arc<dyn Authenticator>,
    pub directory: Arc<dyn Directory>,
    pub channel_policy: Arc<dyn ChannelPolicy>,
    /// Past database broadcasts, for `config.broadcast.replay`.
    pub history: Arc<dyn BroadcastHistory>,
    pub status: Arc<dyn StatusReport>,
}

/// Closes every socket of this node at once, as a shutdown does (1001, "going
/// away": clients reconnect, elsewhere behind a load balancer), while the node
/// keeps running: a cluster node that lost its change stream sends its clients
/// to nodes that have it, rather than keeping them and delivering nothing.
pub struct Drain {
    shutdown: CancellationToken,
    current: std::sync::Mutex<CancellationToken>,
}

impl Drain {
    pub fn new(shutdown: CancellationToken) -> Drain {
        let current = std::sync::Mutex::new(shutdown.child_token());
        Drain { shutdown, current }
    }

    /// What a new socket ends on: this drain or the server's shutdown.
    pub fn token(&self) -> CancellationToken {
        self.current
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Closes every socket open now; later ones are not affected.
    pub fn drain(&self) {
        let mut g = self.current.lock().unwrap_or_else(|p| p.into_inner());
        g.cancel();
        *g = self.shutdown.child_token();
    }
}

impl Realtime {
    pub fn new(inner: Inner) -> Realtime {
        Realtime(Arc::new(inner))
    }
}

impl std::ops::Deref for Realtime {
    type Target = Inner;
    fn deref(&self) -> &Inner {
        &self.0
    }
}
