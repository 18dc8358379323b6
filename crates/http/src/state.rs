//! What the routes share: the cores they call, the realtime side they hand
//! sockets to, and what the operations routes report on. The binary builds it
//! from its configuration ([`Services`]); routes see narrow groups of it.

use std::collections::BTreeMap;
use std::ops::Deref;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use aether_auth::{AuthService, JwtKeys};
use aether_changelog::SharedLog;
use aether_changelog::ingest::ReplicationStatus;
use aether_changelog::monitor::SlotHealth;
use aether_changelog::pump::LogStatus;
use aether_realtime::hub::ChannelConfigs;
use aether_realtime::{BoxFuture, Realtime, StatusReport};
use aether_storage::StorageService;
use serde_json::Value;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::edge::ConnLimits;
use crate::ops::{ServerStatusReport, Status};
use crate::rate_limit::RateLimits;
use crate::supabase::rest::SchemaCache;

/// What the routes read from the configuration.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Where the Aether / KingShare socket is served (`WS_PATH`).
    pub ws_path: String,
    /// Client frames above this are refused (`WS_MAX_FRAME_BYTES`).
    pub ws_max_frame_bytes: usize,
    /// KingShare's cleanup reaps clients silent for two of these.
    pub ws_ping_interval: Duration,
    /// The schemas `/rest/v1` serves (`REST_SCHEMAS`).
    pub rest_schemas: Vec<String>,
    /// Origin put in front of returned file URLs (`PUBLIC_URL`).
    pub public_url: Option<String>,
    pub publication: String,
    pub replication_slot: String,
    /// Replication further behind than this is `degraded` (`REPLICATION_DEGRADED_LAG_S`).
    pub degraded_lag: Duration,
}

/// Cluster mode, as the operations routes see this node.
pub trait ClusterNode: Send + Sync {
    /// This node's name.
    fn node(&self) -> &str;
    /// Whether this node holds the replication slot and appends the stream.
    fn is_leader(&self) -> bool;
    /// Why this node cannot serve what it promises, if it cannot.
    fn problem(&self) -> Option<String>;
    /// This node, the leader and every node, by name.
    fn members<'a>(&'a self, pool: &'a deadpool_postgres::Pool) -> BoxFuture<'a, Value>;
}

/// How each published table's rows are authorized, per role (`/ws/status`).
pub trait RowSecurityReport: Send + Sync {
    fn report(&self) -> BTreeMap<String, Value>;
}

/// The pipeline's progress and the process's health: what `/health` and
/// `/ws/status` report.
pub struct Operations {
    pub replication: watch::Receiver<ReplicationStatus>,
    /// The durable change log (bounds only; reads happen in the router).
    pub log: SharedLog,
    pub log_status: watch::Receiver<LogStatus>,
    /// Database reachability and the WAL the slot retains.
    pub slot_health: watch::Receiver<SlotHealth>,
    /// Cluster mode only.
    pub cluster: Option<Arc<dyn ClusterNode>>,
    pub row_security: Arc<dyn RowSecurityReport>,
    /// Set when a critical task stopped: the server is shutting down because of it.
    pub failed: Arc<Mutex<Option<String>>>,
    pub shutdown: CancellationToken,
}

/// Everything the binary hands the routes.
pub struct Services {
    pub settings: Settings,
    pub jwt: JwtKeys,
    pub pool: deadpool_postgres::Pool,
    /// Sign-up, sign-in, sign-out and token checks (with revocation).
    pub auth: AuthService,
    /// Buckets, folders, files and their bytes.
    pub storage: StorageService,
    pub channels: ChannelConfigs,
    pub limits: RateLimits,
    /// Open HTTP connections (and their caps), counted by the HTTP edge.
    pub http_connections: Arc<ConnLimits>,
    pub operations: Operations,
}

/// State shared by every route and socket.
#[derive(Clone)]
pub struct AppState(Arc<Inner>);

pub struct Inner {
    pub settings: Settings,
    pub jwt: JwtKeys,
    /// The WebSocket side: sockets, hubs, the connection registry and stats.
    pub realtime: Realtime,
    pub http_connections: Arc<ConnLimits>,
    pub(crate) pool: deadpool_postgres::Pool,
    pub(crate) auth: AuthService,
    pub(crate) storage: StorageService,
    pub(crate) channels: ChannelConfigs,
    pub(crate) limits: RateLimits,
    pub(crate) operations: Operations,
    /// What `/rest/v1` knows of the exposed schemas.
    pub(crate) rest_schema: SchemaCache,
    /// The last status a WebSocket client asked for (see `ops::status_cached`).
    pub(crate) status_cache: Mutex<Option<(Instant, Status)>>,
}

impl AppState {
    /// The routes' state around `services`. The realtime side is made inside:
    /// the status a socket asks for is the server's, which holds the realtime
    /// side, so it gets the server through a weak handle.
    pub fn new(
        services: Services,
        realtime: impl FnOnce(Arc<dyn StatusReport>) -> Realtime,
    ) -> AppState {
        AppState(Arc::new_cyclic(|server| Inner {
            realtime: realtime(Arc::new(ServerStatusReport(server.clone()))),
            settings: services.settings,
            jwt: services.jwt,
            pool: services.pool,
            auth: services.auth,
            storage: services.storage,
            channels: services.channels,
            limits: services.limits,
            http_connections: services.http_connections,
            operations: services.operations,
            rest_schema: SchemaCache::default(),
            status_cache: Mutex::new(None),
        }))
    }

    /// The server behind a weak handle, while it lives.
    pub(crate) fn upgrade(weak: &Weak<Inner>) -> Option<AppState> {
        weak.upgrade().map(AppState)
    }
}

impl Deref for AppState {
    type Target = Inner;
    fn deref(&self) -> &Inner {
        &self.0
    }
}
