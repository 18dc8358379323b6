//! Wiring: database, migrations, slot, router, replication stream and HTTP server.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, RwLock};

use anyhow::Context as _;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, SUPABASE_PUBLICATION};
use aether_auth::{AuthService, JwtKeys};
use aether_changelog::ingest::{self, ReplicationStatus, ReplicationTask};
use aether_changelog::local::{LocalLog, LogOptions, floor_for_slot};
use aether_changelog::monitor::SlotHealth;
use aether_changelog::pump::{self, Durable, LogStatus};
use aether_changelog::{ChangeLog as _, SharedLog};
use aether_http::RateLimits;
use aether_http::{AppState, Operations, Services};
use aether_postgres::store::embedded::{EmbeddedPostgres, LaunchOptions};
use aether_postgres::store::{self, migrate};
use aether_realtime::Realtime;
use aether_realtime::hub::{ChannelConfigs, Hub};
use aether_realtime::registry::Registry;
use aether_router::catalog::{Catalog, SharedCatalog};
use aether_router::{Router, RouterConfig};
use aether_storage::{self as file_storage, Blobs, StorageService};

/// Sockets check tokens as every route does: through the auth core.
struct SocketTokens(AuthService);

impl aether_realtime::Authenticator for SocketTokens {
    fn authenticate<'a>(
        &'a self,
        token: &'a str,
    ) -> aether_realtime::BoxFuture<
        'a,
        Result<aether_core::principal::Principal, aether_realtime::TokenRefused>,
    > {
        Box::pin(async move {
            self.0.authenticate(token).await.map_err(|e| match e {
                aether_auth::AuthError::Internal(cause) => {
                    aether_realtime::TokenRefused::Internal(cause)
                }
                e => aether_realtime::TokenRefused::Definite {
                    code: e.code(),
                    message: e.to_string(),
                },
            })
        })
    }
}

type Task = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

/// Spawns a task inside a span carrying its name, so its logs say who they are.
pub fn spawn_named<F>(name: &'static str, fut: F) -> JoinHandle<F::Output>
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    aether_core::task::spawn_named(name, fut)
}

/// Runs a task the server cannot do without: if it ends (returns or panics)
/// before shutdown, the server says why on `/health` and shuts down, so the
/// process exits non-zero and a supervisor restarts it.
fn spawn_critical<F>(
    name: &'static str,
    fut: F,
    failed: Arc<std::sync::Mutex<Option<String>>>,
    shutdown: CancellationToken,
) -> JoinHandle<()>
where
    F: std::future::Future<Output = ()> + Send + 'static,
{
    let inner = spawn_named(name, fut);
    tokio::spawn(async move {
        let ended = inner.await;
        if shutdown.is_cancelled() {
            return;
        }
        let why = match ended {
            Ok(()) => format!("the {name} task ended unexpectedly"),
            Err(e) => format!("the {name} task failed: {e}"),
        };
        tracing::error!(task = name, reason = %why, "a critical task stopped: shutting down");
        if let Ok(mut f) = failed.lock() {
            f.get_or_insert(why);
        }
        shutdown.cancel();
    })
}

/// A running Aether.
pub struct Server {
    pub addr: SocketAddr,
    pub state: AppState,
    /// The durable change log.
    pub log: SharedLog,
    /// Why a critical task stopped, if one did.
    failed: Arc<std::sync::Mutex<Option<String>>>,
    shutdown: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
    pump: Option<pump::Pump>,
    embedded: Option<EmbeddedPostgres>,
}

/// The database Aether will use: `DATABASE_URL`, or the embedded cluster.
pub async fn database(
    config: &Config,
) -> anyhow::Result<(tokio_postgres::Config, Option<EmbeddedPostgres>)> {
    if let Some(url) = &config.database_url {
        return Ok((url.parse().context("DATABASE_URL")?, None));
    }
    let data_dir = config.data_dir.clone();
    let pg = tokio::task::spawn_blocking(move || {
        EmbeddedPostgres::start(&data_dir, &LaunchOptions::default())
    })
    .await
    .context("embedded PostgreSQL launcher")??;
    tracing::info!(port = pg.port(), "embedded PostgreSQL running");
    Ok((
        pg.connection_string()
            .parse()
            .context("embedded connection string")?,
        Some(pg),
    ))
}

/// Connects one ordinary client and drives its connection in the background.
pub async fn connect(
    pg: &tokio_postgres::Config,
) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let (client, conn) = pg.connect(tokio_postgres::NoTls).await?;
    spawn_named("pg-connection", async move {
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, "setup connection closed");
        }
    });
    Ok(client)
}

/// `JWT_SECRET`, or a secret generated once and kept in `DATA_DIR/jwt_secret`.
fn jwt_secret(config: &Config) -> anyhow::Result<String> {
    if let Some(s) = &config.jwt_secret {
        return Ok(s.clone());
    }
    let path = config.data_dir.join("jwt_secret");
    if let Ok(s) = std::fs::read_to_string(&path) {
        let s = s.trim().to_owned();
        if s.len() >= 32 {
            return Ok(s);
        }
    }
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("creating {}", config.data_dir.display()))?;
    let secret = format!(
        "{}{}",
        uuid::Uuid::new_v4().simple(),
        uuid::Uuid::new_v4().simple()
    );
    write_private(&path, &secret)?;
    tracing::warn!(path = %path.display(), "JWT_SECRET is not set: generated one and saved it (set JWT_SECRET in production)");
    Ok(secret)
}

fn write_private(path: &Path, content: &str) -> anyhow::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    f.write_all(content.as_bytes())?;
    Ok(())
}

/// Prometheus exposition on `METRICS_PORT`. The recorder is process-wide: a second
/// server in the same process (tests) keeps the first one's.
fn install_prometheus(config: &Config) {
    let builder = metrics_exporter_prometheus::PrometheusBuilder::new()
        .with_http_listener(([0, 0, 0, 0], config.metrics_port))
        .set_buckets_for_metric(
            metrics_exporter_prometheus::Matcher::Full("aether_delivery_latency_seconds".into()),
            &[
                0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
            ],
        );
    match builder {
        Ok(b) => match b.install() {
            Ok(()) => tracing::info!(port = config.metrics_port, "prometheus metrics listening"),
            Err(e) => tracing::warn!(error = %e, "prometheus exporter not installed"),
        },
        Err(e) => tracing::warn!(error = %e, "prometheus exporter not configured"),
    }
}

/// Opens the change log under `DATA_DIR/changelog` (recovering a torn tail). A
/// new log waits to be reset to the slot's position.
async fn open_log(config: &Config) -> anyhow::Result<SharedLog> {
    let dir = config.data_dir.join("changelog");
    let opts = LogOptions {
        // Retention drops whole segments: an eighth of the budget each keeps the
        // log within 1/8 of RESUME_RETENTION_BYTES.
        segment_bytes: (config.resume_retention_bytes / 8).clamp(256, 16 << 20),
        retention_bytes: config.resume_retention_bytes,
        retention_age: config.resume_retention,
    };
    let log = tokio::task::spawn_blocking(move || {
        LocalLog::open(&dir, opts, floor_for_slot(aether_core::lsn::PgLsn::ZERO))
            .map(|(log, _)| log)
            .with_context(|| format!("opening the change log in {}", dir.display()))
    })
    .await
    .context("change log")??;
    let b = log.bounds();
    tracing::info!(epoch = %b.epoch, floor = %b.floor, newest = ?b.newest.map(|p| p.to_string()), bytes = b.bytes, "change log open");
    Ok(Arc::new(log))
}

impl Server {
    /// Starts everything and returns once the HTTP listener is bound.
    pub async fn start(config: Config) -> anyhow::Result<Server> {
        let (pg, embedded) = database(&config).await?;
        let mut setup = connect(&pg).await.context("connecting to PostgreSQL")?;
        migrate::migrate(&mut setup)
            .await
            .context("applying migrations")?;
        file_storage::ensure_bucket(&setup, &config.upload_bucket)
            .await
            .with_context(|| format!("creating the UPLOAD_BUCKET {:?}", config.upload_bucket))?;
        let blobs = Blobs::open(&config.storage_backend, &config.data_dir)?;
        for name in &config.obsolete {
            tracing::warn!(
                setting = name,
                "this setting no longer exists and is ignored (see README.md: the change log)"
            );
        }
        // Cluster mode: the log is the nodes' shared stream, and the slot is the
        // leader's business (see `cluster`).
        let cluster = match &config.nats_url {
            Some(url) => Some(crate::cluster::open(&config, url).await?),
            None => None,
        };
        let log: SharedLog = match &cluster {
            Some(c) => c.cluster.log.clone(),
            None => open_log(&config).await?,
        };
        let mut timeout = std::time::Duration::ZERO;
        if cluster.is_none() {
            // A slot about to be created starts a new history: say so in the log
            // first, so a crash between the two still resets it at the next start.
            if !ingest::slot_exists(&setup, &config.replication_slot).await? {
                let l = Arc::clone(&log);
                tokio::task::spawn_blocking(move || l.mark_reset_pending())
                    .await
                    .context("change log")??;
            }
            let (confirmed, _) = ingest::ensure_slot(&setup, &config.replication_slot).await?;
            if log.bounds().reset_pending {
                let (l, floor) = (Arc::clone(&log), floor_for_slot(confirmed));
                let epoch = tokio::task::spawn_blocking(move || l.reset(floor))
                    .await
                    .context("change log")??;
                tracing::warn!(%epoch, %floor, "the change log starts a new epoch for a new replication slot; older positions are answered with gap");
            }
            timeout = ingest::wal_sender_timeout(&setup).await?;
        }
        // Tables a Supabase migration put in `supabase_realtime` join ours.
        aether_router::catalog::adopt_publication(
            &setup,
            SUPABASE_PUBLICATION,
            &config.publication,
        )
        .await;
        let catalog: SharedCatalog = Arc::new(RwLock::new(
            Catalog::load(&setup, &config.publication).await?,
        ));
        let public_buckets: HashSet<String> = setup
            .query("SELECT id FROM public.buckets WHERE public", &[])
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect();
        let channels: ChannelConfigs =
            Arc::new(RwLock::new(aether_http::load_channels(&setup).await?));
        drop(setup);
        if config.enable_metrics {
            install_prometheus(&config);
        }

        let jwt = JwtKeys::new(
            &jwt_secret(&config)?,
            config.jwt_algorithm,
            config.jwt_expires_s,
        );
        let pool = store::pool(&pg, 16).context("connection pool")?;
        let shutdown = CancellationToken::new();
        let (log_tx, log_rx) = mpsc::channel(8192);
        let (feed_tx, feed_rx) = mpsc::channel(8192);
        let (commands_tx, commands_rx) = mpsc::channel(4096);
        let (durable_tx, durable_rx) = watch::channel(Durable::default());
        let (log_status_tx, log_status_rx) = watch::channel(LogStatus::default());
        let (status_tx, status_rx) = watch::channel(ReplicationStatus::default());
        let (slot_health_tx, slot_health_rx) = watch::channel(SlotHealth::default());
        let epoch = log.bounds().epoch;
        // A single node writes its own log; in a cluster the leader's task does.
        let pump = match &cluster {
            None => Some(
                pump::start(
                    Arc::clone(&log),
                    log_rx,
                    feed_tx.clone(),
                    durable_tx,
                    log_status_tx.clone(),
                )
                .context("starting the change log threads")?,
            ),
            Some(_) => None,
        };

        let kingshare = Arc::new(aether_realtime::kingshare::Notifier::default());
        let registry = Arc::new(Registry::default());
        let (hub_tx, hub_rx) = mpsc::channel(4096);
        let hub = Hub::new(
            Arc::clone(&channels),
            config.rate_limit_messages,
            config.rate_limit_window,
        )
        .max_channels(config.ws_max_subscriptions);
        // Cluster mode: channel messages are numbered and carried across nodes.
        let mut bus_tasks = None;
        let mut phoenix_hub = aether_realtime::phoenix_hub::PhxHub::default();
        let (phoenix_tx, phoenix_rx) = mpsc::channel(4096);
        let hub = match &cluster {
            Some(parts) => {
                let (bus, outgoing, incoming) = crate::cluster::bus::start(
                    parts.cluster.log.client().clone(),
                    crate::cluster::bus::Subjects::new(
                        &config.replication_slot,
                        &parts.cluster.node,
                    ),
                    crate::cluster::bus::Hubs {
                        hub: hub_tx.clone(),
                        phoenix: phoenix_tx.clone(),
                        kingshare: Arc::clone(&kingshare),
                        registry: Arc::clone(&registry),
                    },
                    parts.reconnects.clone(),
                    shutdown.clone(),
                );
                bus_tasks = Some((outgoing, incoming));
                phoenix_hub = phoenix_hub.bus(bus.clone());
                kingshare.attach_bus(bus.clone());
                registry.attach_bus(bus.clone());
                hub.bus(bus)
            }
            None => hub,
        };
        let broadcasts_relayed = Arc::new(std::sync::atomic::AtomicI64::new(0));
        // The published tables' grants and RLS policies, read before the first
        // change is routed.
        let (policy, row_security, policy_tasks) = crate::rules::visibility::start(
            pool.clone(),
            config.publication.clone(),
            public_buckets,
            shutdown.clone(),
        )
        .await
        .context("reading the published tables' row security")?;
        let router = Router::new(
            RouterConfig {
                log: Arc::clone(&log),
                policy: Box::new(policy),
                // In the order the router ran them before they were taps.
                taps: vec![
                    Box::new(crate::rules::ChannelSettings(Arc::clone(&channels))),
                    Box::new(crate::rules::SessionRevocation),
                    Box::new(crate::rules::KingShareEvents(Arc::clone(&kingshare))),
                    Box::new(crate::rules::DatabaseBroadcast {
                        phoenix: phoenix_tx.clone(),
                        hub: hub_tx.clone(),
                        relayed: Arc::clone(&broadcasts_relayed),
                    }),
                ],
                stall_timeout: config.ws_stall_timeout,
                max_subscriptions: config.ws_max_subscriptions,
                memory_bytes: config.resume_memory_bytes,
                // Another node may have handed out a position this one has not
                // consumed yet.
                ahead_wait: if cluster.is_some() {
                    std::time::Duration::from_secs(10)
                } else {
                    std::time::Duration::ZERO
                },
            },
            Arc::clone(&catalog),
        );
        let failed: Arc<std::sync::Mutex<Option<String>>> = Arc::default();
        let critical = |name, fut| spawn_critical(name, fut, Arc::clone(&failed), shutdown.clone());
        let mut tasks = vec![critical(
            "hub",
            Box::pin(hub.run(hub_rx, shutdown.clone())) as Task,
        )];
        if let Some((outgoing, incoming)) = bus_tasks {
            tasks.push(critical("channel-bus-out", Box::pin(outgoing)));
            tasks.push(critical("channel-bus-in", Box::pin(incoming)));
        }
        tasks.push(critical(
            "phoenix-hub",
            Box::pin(phoenix_hub.run(phoenix_rx, shutdown.clone())),
        ));
        tasks.push(critical(
            "router",
            Box::pin(router.run(feed_rx, commands_rx, shutdown.clone())),
        ));
        for (name, task) in policy_tasks {
            tasks.push(critical(name, task));
        }
        let cluster = match cluster {
            None => {
                let replication = ReplicationTask {
                    pg: pg.clone(),
                    slot: config.replication_slot.clone(),
                    publication: config.publication.clone(),
                    status_interval: ingest::status_interval(timeout),
                    log: log_tx,
                    durable: durable_rx,
                    epoch,
                    changelog: Arc::clone(&log),
                    status: status_tx,
                    shutdown: shutdown.clone(),
                };
                // The replication task ends only at shutdown or when the log stops.
                tasks.push(critical("replication", Box::pin(replication.run())));
                None
            }
            Some(parts) => {
                drop((log_tx, durable_rx));
                let c = parts.cluster;
                tasks.push(critical(
                    "stream-follower",
                    Box::pin(crate::cluster::follow(
                        Arc::clone(&c.log),
                        parts.start,
                        feed_tx,
                        parts.follow_tx,
                        parts.reconnects,
                        shutdown.clone(),
                    )),
                ));
                let leadership = crate::cluster::Leadership {
                    pg: pg.clone(),
                    node: c.node.clone(),
                    slot: config.replication_slot.clone(),
                    publication: config.publication.clone(),
                    log: Arc::clone(&c.log),
                    leading: parts.leading_tx,
                    replication: status_tx,
                    log_status: log_status_tx,
                    shutdown: shutdown.clone(),
                };
                // Ends before shutdown only when leadership was lost: the process
                // exits and comes back as a standby.
                tasks.push(critical("leadership", Box::pin(leadership.run())));
                Some(Arc::new(c))
            }
        };
        tasks.push(critical(
            "slot-monitor",
            Box::pin(aether_changelog::monitor::run(
                pool.clone(),
                config.replication_slot.clone(),
                config.wal_retained_warn_bytes,
                slot_health_tx,
                shutdown.clone(),
            )),
        ));
        tasks.push(spawn_named(
            "broadcast-pruner",
            crate::rules::prune_broadcasts(pool.clone(), broadcasts_relayed, shutdown.clone()),
        ));
        tasks.push(spawn_named(
            "share-expiry",
            aether_http::share_expiry(pool.clone(), shutdown.clone()),
        ));

        let listener = tokio::net::TcpListener::bind((config.ws_host.as_str(), config.ws_port))
            .await
            .with_context(|| {
                format!(
                    "binding WS_HOST:WS_PORT {}:{}",
                    config.ws_host, config.ws_port
                )
            })?;
        let addr = listener.local_addr()?;
        let auth = AuthService::new(pool.clone(), jwt.clone(), config.password_policy);
        let storage = StorageService::new(
            pool.clone(),
            blobs,
            file_storage::Limits {
                default_bucket: config.upload_bucket.clone(),
                max_file_size: config.max_file_size,
                allowed_types: config.allowed_file_types.clone(),
                quota_bytes: config.storage_quota_bytes,
            },
        );
        let limits = RateLimits::new(
            config.rate_limit_auth_per_min,
            config.rate_limit_storage_per_min,
        );
        let edge = config.edge();
        let settings = aether_realtime::Settings {
            publication: config.publication.clone(),
            ws_queue_capacity: config.ws_queue_capacity,
            ws_queue_bytes: config.ws_queue_bytes,
            ws_max_frame_bytes: config.ws_max_frame_bytes,
            ws_ping_interval: config.ws_ping_interval,
            ws_idle_timeout: config.ws_idle_timeout,
            ws_max_connections: config.ws_max_connections,
            rate_limit_connections: config.rate_limit_connections,
            rate_limit_messages: config.rate_limit_messages,
            rate_limit_window: config.rate_limit_window,
        };
        let http_connections =
            aether_http::edge::ConnLimits::new(edge.max_connections, edge.max_connections_per_addr);
        let services = Services {
            settings: config.http(),
            jwt,
            pool: pool.clone(),
            auth: auth.clone(),
            storage,
            channels,
            limits,
            http_connections,
            operations: Operations {
                replication: status_rx,
                log: Arc::clone(&log),
                log_status: log_status_rx,
                slot_health: slot_health_rx,
                cluster: cluster
                    .clone()
                    .map(|c| c as Arc<dyn aether_http::ClusterNode>),
                row_security,
                failed: Arc::clone(&failed),
                shutdown: shutdown.clone(),
            },
        };
        let state = AppState::new(services, |status| {
            Realtime::new(aether_realtime::service::Inner {
                settings,
                pool: pool.clone(),
                catalog,
                catalog_reloaded_ms: std::sync::atomic::AtomicI64::new(0),
                router: commands_tx,
                hub: hub_tx,
                phoenix: phoenix_tx,
                registry,
                stats: Default::default(),
                kingshare,
                next_session: AtomicU64::new(1),
                shutdown: shutdown.clone(),
                drain: aether_realtime::service::Drain::new(shutdown.clone()),
                auth: Arc::new(SocketTokens(auth.clone())),
                directory: Arc::new(crate::rules::presence::SharesDirectory(pool.clone())),
                channel_policy: Arc::new(crate::rules::channels::MessagePolicies(pool.clone())),
                history: Arc::new(crate::rules::history::LogHistory(Arc::clone(&log))),
                status,
            })
        });
        tasks.push(spawn_named(
            "rate-limit-janitor",
            aether_http::rate_limit_janitor(state.clone(), shutdown.clone()),
        ));
        tasks.push(spawn_named(
            "schema-listener",
            aether_http::listen_for_ddl(pg.clone(), state.clone(), shutdown.clone()),
        ));
        if let Some(c) = cluster.clone() {
            tasks.push(spawn_named(
                "cluster-drain",
                crate::cluster::drain_when_cut_off(c, state.realtime.clone(), shutdown.clone()),
            ));
        }
        let app = aether_http::app(state.clone());
        tasks.push(critical(
            "http",
            Box::pin(aether_http::edge::serve(
                listener,
                app,
                edge,
                Arc::clone(&state.http_connections),
                shutdown.clone(),
            )),
        ));
        tracing::info!(%addr, ws_path = %state.settings.ws_path, "Aether listening");
        Ok(Server {
            addr,
            state,
            log,
            failed,
            shutdown,
            tasks,
            pump,
            embedded,
        })
    }

    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Stops accepting, closes sessions, sends a last status update, stops the
    /// embedded PostgreSQL.
    pub async fn stop(mut self) {
        self.shutdown.cancel();
        for t in self.tasks.drain(..) {
            let _ = tokio::time::timeout(std::time::Duration::from_secs(10), t).await;
        }
        // The replication task is gone, so the log's input is closed: the writer
        // drains it, and the syncer makes it durable before it ends.
        if let Some(p) = self.pump.take() {
            let join = tokio::task::spawn_blocking(move || {
                let _ = p.writer.join();
                let _ = p.syncer.join();
            });
            let _ = tokio::time::timeout(std::time::Duration::from_secs(10), join).await;
        }
        if let Some(mut pg) = self.embedded.take() {
            let _ = tokio::task::spawn_blocking(move || pg.stop()).await;
        }
    }

    /// Runs until `shutdown` is cancelled, then stops. Returns why, if a critical
    /// task stopping was the reason.
    pub async fn run_until_stopped(self) -> Option<String> {
        self.shutdown.cancelled().await;
        let failed = Arc::clone(&self.failed);
        self.stop().await;
        failed.lock().ok().and_then(|f| f.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_critical_task_that_ends_or_panics_shuts_the_server_down_and_says_why() {
        for panics in [false, true] {
            let failed: Arc<std::sync::Mutex<Option<String>>> = Arc::default();
            let shutdown = CancellationToken::new();
            let h = spawn_critical(
                "router",
                async move {
                    if panics {
                        panic!("boom");
                    }
                },
                Arc::clone(&failed),
                shutdown.clone(),
            );
            h.await.unwrap();
            assert!(shutdown.is_cancelled());
            let why = failed.lock().unwrap().clone().unwrap();
            assert!(why.contains("router"), "{why}");
        }
        // Ending because of a shutdown is no failure.
        let failed: Arc<std::sync::Mutex<Option<String>>> = Arc::default();
        let shutdown = CancellationToken::new();
        shutdown.cancel();
        spawn_critical("hub", async {}, Arc::clone(&failed), shutdown.clone())
            .await
            .unwrap();
        assert!(failed.lock().unwrap().is_none());
    }
}
