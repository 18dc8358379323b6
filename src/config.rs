//! Configuration from the environment. Every setting is read and checked at start:
//! a bad value stops Aether with a message naming the variable.

use std::path::PathBuf;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
#[error("{name}: {reason}")]
pub struct ConfigError {
    pub name: &'static str,
    pub reason: String,
}

fn err(name: &'static str, reason: impl Into<String>) -> ConfigError {
    ConfigError {
        name,
        reason: reason.into(),
    }
}

/// A yes-or-no setting.
fn flag(name: &'static str, v: &str) -> Result<bool, ConfigError> {
    match v {
        "true" | "1" | "yes" => Ok(true),
        "false" | "0" | "no" => Ok(false),
        _ => Err(err(name, format!("{v:?} is not true or false"))),
    }
}

pub use aether_auth::JwtAlgorithm;

use aether_storage::valid_bucket_id;
pub use aether_storage::{S3Config, StorageBackend};

#[derive(Clone)]
pub struct Config {
    pub ws_host: String,
    /// 0 picks a free port (tests).
    pub ws_port: u16,
    pub ws_path: String,
    /// `None`: read or create `DATA_DIR/jwt_secret` (embedded default only).
    pub jwt_secret: Option<String>,
    pub jwt_algorithm: JwtAlgorithm,
    pub jwt_expires_s: u64,
    /// The password rule of both APIs (`PASSWORD_MIN_LENGTH`,
    /// `PASSWORD_REQUIRE_LETTER_AND_DIGIT`).
    pub password_policy: aether_auth::password::PasswordPolicy,
    /// `None`: run the embedded PostgreSQL under `data_dir`.
    pub database_url: Option<String>,
    pub replication_slot: String,
    pub publication: String,
    /// Cluster mode (`NATS_URL`): the change log is a JetStream stream shared by
    /// every node; one node at a time holds the slot. `None`: a single node.
    pub nats_url: Option<String>,
    /// This node's name in a cluster (`NODE_NAME`; default host name and port).
    pub node_name: Option<String>,
    /// Schemas `/rest/v1` exposes (`REST_SCHEMAS`), the first the default.
    pub rest_schemas: Vec<String>,
    pub data_dir: PathBuf,
    /// How long logged changes stay available to `since` resumes.
    pub resume_retention: Duration,
    /// The change log is cut to this many bytes, oldest segments first.
    pub resume_retention_bytes: u64,
    /// Bytes of the newest changes kept in memory (older reads page from disk).
    pub resume_memory_bytes: usize,
    /// The slot retaining more WAL than this is a warning and a `degraded` status.
    pub wal_retained_warn_bytes: u64,
    /// Settings given that no longer exist, warned about at start.
    pub obsolete: Vec<&'static str>,
    /// Outbound frames queued per connection before it counts as too slow.
    pub ws_queue_capacity: usize,
    /// What one connection's queue may hold, in bytes, before it lags.
    pub ws_queue_bytes: usize,
    pub ws_max_frame_bytes: usize,
    /// Subscriptions (and channels, topics) one connection may hold at once.
    pub ws_max_subscriptions: usize,
    /// A connection that lags and drains nothing for this long is closed.
    pub ws_stall_timeout: Duration,
    /// Concurrent connections per user (anonymous: per client address).
    pub rate_limit_connections: usize,
    /// Channel messages per client per channel per window.
    pub rate_limit_messages: u32,
    pub rate_limit_window: Duration,
    /// Concurrent connections in all.
    pub ws_max_connections: usize,
    /// WebSocket pings are sent this often; a peer silent for `ws_idle_timeout` is closed.
    pub ws_ping_interval: Duration,
    pub ws_idle_timeout: Duration,
    pub enable_metrics: bool,
    pub metrics_port: u16,
    /// Each runtime worker kept on a CPU of its own (see [`crate::runtime`]).
    pub pin_workers: bool,
    /// Replication further behind than this makes `/ws/status` say `degraded`.
    pub degraded_lag: Duration,
    /// The bucket uploads go to when none is named; created at start.
    pub upload_bucket: String,
    /// Largest accepted upload, in bytes.
    pub max_file_size: u64,
    /// `ALLOWED_FILE_TYPES`: `image/*`, `application/pdf`, `.docx`, …
    pub allowed_file_types: aether_storage::AllowedTypes,
    /// Bytes each user may store in all buckets together.
    pub storage_quota_bytes: u64,
    /// Requests per minute to `/auth/*`, per client address.
    pub rate_limit_auth_per_min: u32,
    /// Requests per minute to `/storage/*`, per user (per address when anonymous).
    pub rate_limit_storage_per_min: u32,
    pub storage_backend: StorageBackend,
    /// Origin put in front of returned file URLs (`https://api.example.com`); `None`:
    /// URLs are path-absolute (`/storage/object/…`).
    pub public_url: Option<String>,
    /// A request head must arrive in full within this long (`None`: no limit).
    pub http_header_timeout: Option<Duration>,
    /// A connection with no request in flight is closed after this long (`None`:
    /// never). Upgraded (WebSocket) connections have their own pings instead.
    pub http_idle_timeout: Option<Duration>,
    /// Open HTTP connections in all (`0`: no cap); `auto` is ¾ of the open-files limit.
    pub http_max_connections: usize,
    /// Open HTTP connections per client address (`0`: no cap).
    pub http_max_connections_per_addr: usize,
    /// Peers whose `X-Forwarded-For` names the client (load balancers).
    pub trusted_proxies: aether_http::edge::TrustedProxies,
}

/// Supabase's publication: tables a Supabase migration adds to it
/// (`ALTER PUBLICATION supabase_realtime ADD TABLE …`) join Aether's own.
pub const SUPABASE_PUBLICATION: &str = "supabase_realtime";

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Config")
            .field("ws_host", &self.ws_host)
            .field("ws_port", &self.ws_port)
            .field("ws_path", &self.ws_path)
            .field("database_url", &self.database_url.as_ref().map(|_| "<set>"))
            .field("replication_slot", &self.replication_slot)
            .field("nats_url", &self.nats_url)
            .field("node_name", &self.node_name)
            .field("data_dir", &self.data_dir)
            .finish_non_exhaustive()
    }
}

pub const DEFAULT_ALLOWED_FILE_TYPES: &str = "image/*,application/pdf,.doc,.docx";

fn positive<T: std::str::FromStr + PartialOrd + Default>(
    name: &'static str,
    v: &str,
    what: &str,
) -> Result<T, ConfigError> {
    match v.trim().parse::<T>() {
        Ok(n) if n > T::default() => Ok(n),
        _ => Err(err(name, format!("{v:?} is not a positive {what}"))),
    }
}

fn http_url(name: &'static str, v: &str) -> Result<String, ConfigError> {
    let v = v.trim().trim_end_matches('/');
    let rest = v
        .strip_prefix("http://")
        .or_else(|| v.strip_prefix("https://"));
    match rest {
        Some(host) if !host.is_empty() && !host.contains(char::is_whitespace) => Ok(v.to_owned()),
        _ => Err(err(
            name,
            format!("{v:?} must be an http:// or https:// URL"),
        )),
    }
}

impl Config {
    /// What the HTTP edge enforces on every connection.
    pub fn edge(&self) -> aether_http::edge::EdgeSettings {
        aether_http::edge::EdgeSettings {
            header_timeout: self.http_header_timeout,
            idle_timeout: self.http_idle_timeout,
            max_connections: self.http_max_connections,
            max_connections_per_addr: self.http_max_connections_per_addr,
            trusted_proxies: std::sync::Arc::new(self.trusted_proxies.clone()),
        }
    }

    /// What the routes read.
    pub fn http(&self) -> aether_http::Settings {
        aether_http::Settings {
            ws_path: self.ws_path.clone(),
            ws_max_frame_bytes: self.ws_max_frame_bytes,
            ws_ping_interval: self.ws_ping_interval,
            rest_schemas: self.rest_schemas.clone(),
            public_url: self.public_url.clone(),
            publication: self.publication.clone(),
            replication_slot: self.replication_slot.clone(),
            degraded_lag: self.degraded_lag,
        }
    }

    /// Defaults for everything; used by tests that then set what they need.
    // The one `expect` is on a constant list; `config::tests` parse it too.
    #[allow(clippy::expect_used)]
    pub fn defaults() -> Self {
        Config {
            ws_host: "0.0.0.0".into(),
            ws_port: 8080,
            ws_path: "/ws".into(),
            jwt_secret: None,
            jwt_algorithm: JwtAlgorithm::HS256,
            jwt_expires_s: 3600,
            password_policy: Default::default(),
            database_url: None,
            replication_slot: "aether".into(),
            publication: "aether_realtime".into(),
            nats_url: None,
            node_name: None,
            rest_schemas: vec!["public".into()],
            data_dir: PathBuf::from("./data"),
            resume_retention: Duration::from_secs(86_400),
            resume_retention_bytes: 1 << 30,
            resume_memory_bytes: 64 << 20,
            wal_retained_warn_bytes: 1 << 30,
            obsolete: Vec::new(),
            ws_queue_capacity: 1024,
            ws_queue_bytes: 8 << 20,
            ws_max_frame_bytes: 64 * 1024,
            ws_max_subscriptions: 1000,
            ws_stall_timeout: Duration::from_secs(30),
            rate_limit_connections: 10,
            rate_limit_messages: 50,
            rate_limit_window: Duration::from_secs(60),
            ws_max_connections: 10_000,
            ws_ping_interval: Duration::from_secs(30),
            ws_idle_timeout: Duration::from_secs(90),
            enable_metrics: false,
            metrics_port: 9090,
            pin_workers: true,
            degraded_lag: Duration::from_secs(10),
            upload_bucket: "files".into(),
            max_file_size: 5 * 1024 * 1024,
            allowed_file_types: aether_storage::AllowedTypes::parse(DEFAULT_ALLOWED_FILE_TYPES)
                .expect("default ALLOWED_FILE_TYPES parse"),
            storage_quota_bytes: 1024 * 1024 * 1024,
            rate_limit_auth_per_min: 5,
            rate_limit_storage_per_min: 100,
            storage_backend: StorageBackend::Local,
            public_url: None,
            http_header_timeout: Some(Duration::from_secs(10)),
            http_idle_timeout: Some(Duration::from_secs(75)),
            http_max_connections: aether_http::edge::auto_max_connections(),
            http_max_connections_per_addr: 256,
            trusted_proxies: aether_http::edge::TrustedProxies::default(),
        }
    }

    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_lookup(|k| std::env::var(k).ok())
    }

    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let mut c = Self::defaults();
        let nonempty = |k: &'static str| get(k).filter(|v| !v.trim().is_empty());
        if let Some(v) = nonempty("WS_HOST") {
            c.ws_host = v;
        }
        if let Some(v) = nonempty("WS_PORT") {
            c.ws_port = v
                .parse()
                .map_err(|_| err("WS_PORT", format!("{v:?} is not a port number (0-65535)")))?;
        }
        if let Some(v) = nonempty("WS_PATH") {
            if !v.starts_with('/') || v.len() < 2 {
                return Err(err(
                    "WS_PATH",
                    format!("{v:?} must start with '/' and name a path, like /ws"),
                ));
            }
            c.ws_path = v;
        }
        if let Some(v) = nonempty("JWT_SECRET") {
            if v.len() < 32 {
                return Err(err("JWT_SECRET", "must be at least 32 characters"));
            }
            c.jwt_secret = Some(v);
        }
        if let Some(v) = nonempty("JWT_ALGORITHM") {
            c.jwt_algorithm = match v.as_str() {
                "HS256" => JwtAlgorithm::HS256,
                "HS384" => JwtAlgorithm::HS384,
                "HS512" => JwtAlgorithm::HS512,
                _ => {
                    return Err(err(
                        "JWT_ALGORITHM",
                        format!("{v:?} is not supported (HS256, HS384, HS512)"),
                    ));
                }
            };
        }
        if let Some(v) = nonempty("JWT_EXPIRES_S") {
            c.jwt_expires_s = match v.parse::<u64>() {
                Ok(n) if n > 0 => n,
                _ => {
                    return Err(err(
                        "JWT_EXPIRES_S",
                        format!("{v:?} is not a positive number of seconds"),
                    ));
                }
            };
        }
        if let Some(v) = nonempty("PASSWORD_MIN_LENGTH") {
            c.password_policy.min_chars = match v.parse::<usize>() {
                Ok(n) if (1..=1024).contains(&n) => n,
                _ => {
                    return Err(err(
                        "PASSWORD_MIN_LENGTH",
                        format!("{v:?} is not a number of characters from 1 to 1024"),
                    ));
                }
            };
        }
        if let Some(v) = nonempty("PASSWORD_REQUIRE_LETTER_AND_DIGIT") {
            c.password_policy.letter_and_digit = flag("PASSWORD_REQUIRE_LETTER_AND_DIGIT", &v)?;
        }
        c.database_url = nonempty("DATABASE_URL");
        if let Some(url) = &c.database_url {
            url.parse::<tokio_postgres::Config>().map_err(|e| {
                err(
                    "DATABASE_URL",
                    format!("not a PostgreSQL connection string: {e}"),
                )
            })?;
        }
        if let Some(v) = nonempty("REPLICATION_SLOT") {
            let ok = v.len() <= 63
                && v.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
            if !ok {
                return Err(err(
                    "REPLICATION_SLOT",
                    format!("{v:?}: use 1-63 of a-z, 0-9 and _"),
                ));
            }
            c.replication_slot = v;
        }
        if let Some(v) = nonempty("DATA_DIR") {
            c.data_dir = PathBuf::from(v);
        }
        if let Some(v) = nonempty("NATS_URL") {
            if !v.split(',').all(|u| {
                let u = u.trim();
                !u.is_empty() && !u.contains(char::is_whitespace)
            }) {
                return Err(err(
                    "NATS_URL",
                    format!("{v:?}: expected nats://host:port, or several separated by commas"),
                ));
            }
            c.nats_url = Some(v);
        }
        if let Some(v) = nonempty("NODE_NAME") {
            if v.len() > 40
                || !v
                    .chars()
                    .all(|ch| ch.is_ascii_alphanumeric() || "-_.".contains(ch))
            {
                return Err(err(
                    "NODE_NAME",
                    format!("{v:?}: use 1-40 of a-z, A-Z, 0-9, '-', '_' and '.'"),
                ));
            }
            c.node_name = Some(v);
        }
        if let Some(v) = nonempty("RESUME_RETENTION_S") {
            c.resume_retention = Duration::from_secs(v.parse().map_err(|_| {
                err(
                    "RESUME_RETENTION_S",
                    format!("{v:?} is not a number of seconds"),
                )
            })?);
        }
        if let Some(v) = nonempty("RESUME_RETENTION_BYTES") {
            c.resume_retention_bytes = positive("RESUME_RETENTION_BYTES", &v, "number of bytes")?;
        }
        if let Some(v) = nonempty("RESUME_MEMORY_BYTES") {
            c.resume_memory_bytes = positive("RESUME_MEMORY_BYTES", &v, "number of bytes")?;
        }
        if let Some(v) = nonempty("WAL_RETAINED_WARN_BYTES") {
            c.wal_retained_warn_bytes = positive("WAL_RETAINED_WARN_BYTES", &v, "number of bytes")?;
        }
        // Gone with the change log: the log has no event count, and nobody paces
        // the stream any more.
        for gone in ["RESUME_RETENTION_EVENTS", "WS_CATCHUP_HOLD_S"] {
            if get(gone).is_some() {
                c.obsolete.push(gone);
            }
        }
        if let Some(v) = nonempty("WS_QUEUE_CAPACITY") {
            c.ws_queue_capacity = match v.parse::<usize>() {
                Ok(n) if n >= 8 => n,
                _ => {
                    return Err(err(
                        "WS_QUEUE_CAPACITY",
                        format!("{v:?}: must be a count of at least 8"),
                    ));
                }
            };
        }
        if let Some(v) = nonempty("WS_QUEUE_BYTES") {
            c.ws_queue_bytes = positive("WS_QUEUE_BYTES", &v, "number of bytes")?;
        }
        if let Some(v) = nonempty("WS_MAX_SUBSCRIPTIONS") {
            c.ws_max_subscriptions = match v.parse::<usize>() {
                Ok(n) if n > 0 => n,
                _ => {
                    return Err(err(
                        "WS_MAX_SUBSCRIPTIONS",
                        format!("{v:?} is not a positive count"),
                    ));
                }
            };
        }
        if let Some(v) = nonempty("WS_MAX_FRAME_BYTES") {
            c.ws_max_frame_bytes = match v.parse::<usize>() {
                Ok(n) if n >= 1024 => n,
                _ => {
                    return Err(err(
                        "WS_MAX_FRAME_BYTES",
                        format!("{v:?}: must be a byte count of at least 1024"),
                    ));
                }
            };
        }
        if let Some(v) = nonempty("WS_STALL_TIMEOUT_S") {
            c.ws_stall_timeout = match v.parse::<u64>() {
                Ok(n) if n > 0 => Duration::from_secs(n),
                _ => {
                    return Err(err(
                        "WS_STALL_TIMEOUT_S",
                        format!("{v:?} is not a positive number of seconds"),
                    ));
                }
            };
        }
        let count = |name: &'static str, v: String| -> Result<u64, ConfigError> {
            match v.parse::<u64>() {
                Ok(n) if n > 0 => Ok(n),
                _ => Err(err(name, format!("{v:?} is not a positive whole number"))),
            }
        };
        if let Some(v) = nonempty("RATE_LIMIT_CONNECTIONS") {
            c.rate_limit_connections = count("RATE_LIMIT_CONNECTIONS", v)? as usize;
        }
        if let Some(v) = nonempty("RATE_LIMIT_MESSAGES") {
            c.rate_limit_messages =
                u32::try_from(count("RATE_LIMIT_MESSAGES", v)?).unwrap_or(u32::MAX);
        }
        if let Some(v) = nonempty("RATE_LIMIT_WINDOW_S") {
            c.rate_limit_window = Duration::from_secs(count("RATE_LIMIT_WINDOW_S", v)?);
        }
        if let Some(v) = nonempty("WS_MAX_CONNECTIONS") {
            c.ws_max_connections = count("WS_MAX_CONNECTIONS", v)? as usize;
        }
        if let Some(v) = nonempty("WS_PING_INTERVAL_S") {
            c.ws_ping_interval = Duration::from_secs(count("WS_PING_INTERVAL_S", v)?);
        }
        if let Some(v) = nonempty("WS_IDLE_TIMEOUT_S") {
            c.ws_idle_timeout = Duration::from_secs(count("WS_IDLE_TIMEOUT_S", v)?);
        }
        if let Some(v) = nonempty("ENABLE_METRICS") {
            c.enable_metrics = flag("ENABLE_METRICS", &v)?;
        }
        if let Some(v) = nonempty("RUNTIME_PIN_WORKERS") {
            c.pin_workers = flag("RUNTIME_PIN_WORKERS", &v)?;
        }
        if let Some(v) = nonempty("METRICS_PORT") {
            c.metrics_port = v
                .parse()
                .map_err(|_| err("METRICS_PORT", format!("{v:?} is not a port number")))?;
        }
        if let Some(v) = nonempty("REPLICATION_DEGRADED_LAG_S") {
            c.degraded_lag = Duration::from_secs(count("REPLICATION_DEGRADED_LAG_S", v)?);
        }
        c.read_storage(&nonempty)?;
        c.read_http(&nonempty)?;
        Ok(c)
    }

    /// The HTTP edge: timeouts, connection caps, trusted proxies.
    fn read_http(
        &mut self,
        nonempty: &impl Fn(&'static str) -> Option<String>,
    ) -> Result<(), ConfigError> {
        let whole = |name: &'static str, v: &str| -> Result<u64, ConfigError> {
            v.trim().parse::<u64>().map_err(|_| {
                err(
                    name,
                    format!("{v:?} is not a whole number (0 turns it off)"),
                )
            })
        };
        let secs = |n: u64| (n > 0).then(|| Duration::from_secs(n));
        if let Some(v) = nonempty("HTTP_HEADER_TIMEOUT_S") {
            self.http_header_timeout = secs(whole("HTTP_HEADER_TIMEOUT_S", &v)?);
        }
        if let Some(v) = nonempty("HTTP_IDLE_TIMEOUT_S") {
            self.http_idle_timeout = secs(whole("HTTP_IDLE_TIMEOUT_S", &v)?);
        }
        if let Some(v) = nonempty("HTTP_MAX_CONNECTIONS") {
            self.http_max_connections = if v.trim().eq_ignore_ascii_case("auto") {
                aether_http::edge::auto_max_connections()
            } else {
                usize::try_from(whole("HTTP_MAX_CONNECTIONS", &v)?).unwrap_or(usize::MAX)
            };
        }
        if let Some(v) = nonempty("HTTP_MAX_CONNECTIONS_PER_ADDR") {
            self.http_max_connections_per_addr =
                usize::try_from(whole("HTTP_MAX_CONNECTIONS_PER_ADDR", &v)?).unwrap_or(usize::MAX);
        }
        if let Some(v) = nonempty("TRUSTED_PROXIES") {
            self.trusted_proxies = aether_http::edge::TrustedProxies::parse(&v)
                .map_err(|reason| err("TRUSTED_PROXIES", reason))?;
        }
        if let Some(v) = nonempty("REST_SCHEMAS") {
            let names: Vec<String> = v.split(',').map(|s| s.trim().to_owned()).collect();
            let ok = |n: &String| {
                !n.is_empty()
                    && n.len() <= 63
                    && n.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
            };
            // Never the catalogs or Aether's own schemas: `rpc` there could
            // change settings of pooled connections, or read secrets.
            let internal = |n: &String| {
                let n = n.to_ascii_lowercase();
                n.starts_with("pg_")
                    || matches!(
                        n.as_str(),
                        "information_schema" | "auth" | "aether" | "realtime"
                    )
            };
            if names.iter().any(internal) {
                return Err(err(
                    "REST_SCHEMAS",
                    "pg_catalog, pg_*, information_schema, auth, aether and realtime cannot be exposed",
                ));
            }
            if !names.iter().all(ok) {
                return Err(err(
                    "REST_SCHEMAS",
                    "a comma-separated list of schema names (letters, digits, _)",
                ));
            }
            self.rest_schemas = names;
        }
        Ok(())
    }

    /// Storage, upload and rate-limit settings.
    fn read_storage(
        &mut self,
        nonempty: &impl Fn(&'static str) -> Option<String>,
    ) -> Result<(), ConfigError> {
        if let Some(v) = nonempty("UPLOAD_BUCKET") {
            if !valid_bucket_id(&v) {
                return Err(err(
                    "UPLOAD_BUCKET",
                    format!(
                        "{v:?}: use 1-63 of A-Z, a-z, 0-9, '.', '_' and '-', starting with a letter or digit"
                    ),
                ));
            }
            self.upload_bucket = v;
        }
        if let Some(v) = nonempty("MAX_FILE_SIZE") {
            self.max_file_size = positive("MAX_FILE_SIZE", &v, "number of bytes")?;
        }
        if let Some(v) = nonempty("ALLOWED_FILE_TYPES") {
            self.allowed_file_types = aether_storage::AllowedTypes::parse(&v)
                .map_err(|reason| err("ALLOWED_FILE_TYPES", reason))?;
        }
        if let Some(v) = nonempty("STORAGE_QUOTA_BYTES") {
            self.storage_quota_bytes = positive("STORAGE_QUOTA_BYTES", &v, "number of bytes")?;
        }
        if let Some(v) = nonempty("RATE_LIMIT_AUTH_PER_MIN") {
            self.rate_limit_auth_per_min = positive("RATE_LIMIT_AUTH_PER_MIN", &v, "count")?;
        }
        if let Some(v) = nonempty("RATE_LIMIT_STORAGE_PER_MIN") {
            self.rate_limit_storage_per_min = positive("RATE_LIMIT_STORAGE_PER_MIN", &v, "count")?;
        }
        if let Some(v) = nonempty("PUBLIC_URL") {
            self.public_url = Some(http_url("PUBLIC_URL", &v)?);
        }
        let backend = nonempty("STORAGE_BACKEND").unwrap_or_else(|| "local".into());
        self.storage_backend = match backend.trim().to_ascii_lowercase().as_str() {
            "local" => StorageBackend::Local,
            "s3" => {
                let bucket = nonempty("S3_BUCKET")
                    .ok_or_else(|| err("S3_BUCKET", "must be set when STORAGE_BACKEND=s3"))?;
                let endpoint = nonempty("S3_ENDPOINT")
                    .map(|v| http_url("S3_ENDPOINT", &v))
                    .transpose()?;
                let access_key_id = nonempty("AWS_ACCESS_KEY_ID");
                let secret_access_key = nonempty("AWS_SECRET_ACCESS_KEY");
                match (&access_key_id, &secret_access_key) {
                    (Some(_), None) => {
                        return Err(err(
                            "AWS_SECRET_ACCESS_KEY",
                            "must be set when AWS_ACCESS_KEY_ID is",
                        ));
                    }
                    (None, Some(_)) => {
                        return Err(err(
                            "AWS_ACCESS_KEY_ID",
                            "must be set when AWS_SECRET_ACCESS_KEY is",
                        ));
                    }
                    _ => {}
                }
                StorageBackend::S3(S3Config {
                    bucket: bucket.trim().to_owned(),
                    region: nonempty("S3_REGION")
                        .or_else(|| nonempty("AWS_REGION"))
                        .unwrap_or_else(|| "us-east-1".into()),
                    endpoint,
                    access_key_id,
                    secret_access_key,
                })
            }
            _ => {
                return Err(err(
                    "STORAGE_BACKEND",
                    format!("{backend:?} is not supported (local, s3)"),
                ));
            }
        };
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn cfg(pairs: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let m: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Config::from_lookup(|k| m.get(k).cloned())
    }

    #[test]
    fn defaults_and_errors_name_the_variable() {
        let c = cfg(&[]).unwrap();
        assert_eq!(
            (c.ws_port, c.ws_path.as_str(), c.replication_slot.as_str()),
            (8080, "/ws", "aether")
        );
        assert_eq!(cfg(&[("WS_PORT", "x")]).unwrap_err().name, "WS_PORT");
        assert_eq!(
            cfg(&[("JWT_SECRET", "short")]).unwrap_err().name,
            "JWT_SECRET"
        );
        assert_eq!(
            cfg(&[("JWT_ALGORITHM", "RS256")]).unwrap_err().name,
            "JWT_ALGORITHM"
        );
        assert_eq!(
            cfg(&[("REPLICATION_SLOT", "Bad-Name")]).unwrap_err().name,
            "REPLICATION_SLOT"
        );
        assert_eq!(
            cfg(&[("DATABASE_URL", "postgres://x:y@h:notaport/db")])
                .unwrap_err()
                .name,
            "DATABASE_URL"
        );
        for schemas in [
            "pg_catalog",
            "public,auth",
            "aether",
            "information_schema",
            "realtime",
            "x;y",
        ] {
            assert_eq!(
                cfg(&[("REST_SCHEMAS", schemas)]).unwrap_err().name,
                "REST_SCHEMAS"
            );
        }
        assert_eq!(
            cfg(&[("REST_SCHEMAS", "public, api")])
                .unwrap()
                .rest_schemas,
            vec!["public".to_owned(), "api".to_owned()]
        );
        assert_eq!(
            cfg(&[("JWT_EXPIRES_S", "0")]).unwrap_err().name,
            "JWT_EXPIRES_S"
        );
        assert!(c.pin_workers);
        assert!(
            !cfg(&[("RUNTIME_PIN_WORKERS", "false")])
                .unwrap()
                .pin_workers
        );
        assert_eq!(
            cfg(&[("RUNTIME_PIN_WORKERS", "sometimes")])
                .unwrap_err()
                .name,
            "RUNTIME_PIN_WORKERS"
        );
    }

    #[test]
    fn log_settings_parse_and_obsolete_ones_are_named() {
        let c = cfg(&[]).unwrap();
        assert_eq!(c.resume_retention, Duration::from_secs(86_400));
        assert_eq!(c.resume_retention_bytes, 1 << 30);
        assert_eq!(c.resume_memory_bytes, 64 << 20);
        assert!(c.obsolete.is_empty());
        let c = cfg(&[
            ("WS_CATCHUP_HOLD_S", "30"),
            ("RESUME_RETENTION_EVENTS", "5"),
        ])
        .unwrap();
        assert_eq!(c.obsolete, ["RESUME_RETENTION_EVENTS", "WS_CATCHUP_HOLD_S"]);
        assert_eq!(
            cfg(&[("RESUME_RETENTION_BYTES", "-1")]).unwrap_err().name,
            "RESUME_RETENTION_BYTES"
        );
    }

    #[test]
    fn storage_settings_parse_and_fail_naming_the_variable() {
        let c = cfg(&[]).unwrap();
        assert_eq!(c.upload_bucket, "files");
        assert_eq!(c.max_file_size, 5_242_880);
        assert_eq!(c.storage_quota_bytes, 1 << 30);
        assert_eq!(
            (c.rate_limit_auth_per_min, c.rate_limit_storage_per_min),
            (5, 100)
        );
        assert_eq!(c.storage_backend, StorageBackend::Local);
        assert!(c.allowed_file_types.allows("image/png", "x.png"));
        assert!(
            c.allowed_file_types
                .allows("application/octet-stream", "a.DOCX")
        );
        assert!(!c.allowed_file_types.allows("text/html", "a.html"));

        let c = cfg(&[
            ("UPLOAD_BUCKET", "media"),
            ("MAX_FILE_SIZE", "1024"),
            ("ALLOWED_FILE_TYPES", "text/plain, .md"),
            ("STORAGE_QUOTA_BYTES", "4096"),
            ("RATE_LIMIT_AUTH_PER_MIN", "7"),
            ("RATE_LIMIT_STORAGE_PER_MIN", "9"),
            ("PUBLIC_URL", "https://api.example.com/"),
            ("STORAGE_BACKEND", "s3"),
            ("S3_BUCKET", "blobs"),
            ("S3_ENDPOINT", "http://127.0.0.1:9000"),
            ("AWS_ACCESS_KEY_ID", "k"),
            ("AWS_SECRET_ACCESS_KEY", "s"),
        ])
        .unwrap();
        assert_eq!(c.upload_bucket, "media");
        assert_eq!((c.max_file_size, c.storage_quota_bytes), (1024, 4096));
        assert_eq!(c.public_url.as_deref(), Some("https://api.example.com"));
        assert!(c.allowed_file_types.allows("text/plain", "a"));
        assert!(c.allowed_file_types.allows("", "notes.md"));
        match &c.storage_backend {
            StorageBackend::S3(s3) => {
                assert_eq!(s3.bucket, "blobs");
                assert_eq!(s3.region, "us-east-1");
                assert_eq!(s3.endpoint.as_deref(), Some("http://127.0.0.1:9000"));
            }
            other => panic!("{other:?}"),
        }

        for (pairs, name) in [
            (vec![("UPLOAD_BUCKET", "../x")], "UPLOAD_BUCKET"),
            (vec![("MAX_FILE_SIZE", "0")], "MAX_FILE_SIZE"),
            (vec![("MAX_FILE_SIZE", "5MB")], "MAX_FILE_SIZE"),
            (vec![("ALLOWED_FILE_TYPES", "image")], "ALLOWED_FILE_TYPES"),
            (vec![("ALLOWED_FILE_TYPES", ",")], "ALLOWED_FILE_TYPES"),
            (vec![("STORAGE_QUOTA_BYTES", "-1")], "STORAGE_QUOTA_BYTES"),
            (
                vec![("RATE_LIMIT_AUTH_PER_MIN", "0")],
                "RATE_LIMIT_AUTH_PER_MIN",
            ),
            (
                vec![("RATE_LIMIT_STORAGE_PER_MIN", "x")],
                "RATE_LIMIT_STORAGE_PER_MIN",
            ),
            (vec![("STORAGE_BACKEND", "gcs")], "STORAGE_BACKEND"),
            (vec![("STORAGE_BACKEND", "s3")], "S3_BUCKET"),
            (
                vec![
                    ("STORAGE_BACKEND", "s3"),
                    ("S3_BUCKET", "b"),
                    ("S3_ENDPOINT", "minio:9000"),
                ],
                "S3_ENDPOINT",
            ),
            (
                vec![
                    ("STORAGE_BACKEND", "s3"),
                    ("S3_BUCKET", "b"),
                    ("AWS_ACCESS_KEY_ID", "k"),
                ],
                "AWS_SECRET_ACCESS_KEY",
            ),
            (vec![("PUBLIC_URL", "example.com")], "PUBLIC_URL"),
        ] {
            assert_eq!(cfg(&pairs).unwrap_err().name, name, "{pairs:?}");
        }
    }

    #[test]
    fn http_edge_settings_parse_with_zero_as_off() {
        let c = cfg(&[]).unwrap();
        assert_eq!(c.http_header_timeout, Some(Duration::from_secs(10)));
        assert_eq!(c.http_idle_timeout, Some(Duration::from_secs(75)));
        assert_eq!(c.http_max_connections_per_addr, 256);
        assert_eq!(
            c.http_max_connections,
            aether_http::edge::auto_max_connections()
        );
        assert!(c.trusted_proxies.is_empty());

        let c = cfg(&[
            ("HTTP_HEADER_TIMEOUT_S", "0"),
            ("HTTP_IDLE_TIMEOUT_S", "5"),
            ("HTTP_MAX_CONNECTIONS", "0"),
            ("HTTP_MAX_CONNECTIONS_PER_ADDR", "0"),
            ("TRUSTED_PROXIES", "10.0.0.0/8, ::1"),
        ])
        .unwrap();
        assert_eq!(c.http_header_timeout, None);
        assert_eq!(c.http_idle_timeout, Some(Duration::from_secs(5)));
        assert_eq!(
            (c.http_max_connections, c.http_max_connections_per_addr),
            (0, 0)
        );
        assert!(c.trusted_proxies.contains("10.2.3.4".parse().unwrap()));
        let c = cfg(&[("HTTP_MAX_CONNECTIONS", "auto")]).unwrap();
        assert_eq!(
            c.http_max_connections,
            aether_http::edge::auto_max_connections()
        );

        for (k, v) in [
            ("HTTP_HEADER_TIMEOUT_S", "-1"),
            ("HTTP_IDLE_TIMEOUT_S", "1.5"),
            ("HTTP_MAX_CONNECTIONS", "lots"),
            ("HTTP_MAX_CONNECTIONS_PER_ADDR", "x"),
            ("TRUSTED_PROXIES", "10.0.0.0/40"),
        ] {
            assert_eq!(cfg(&[(k, v)]).unwrap_err().name, k, "{k}={v}");
        }
    }
}
