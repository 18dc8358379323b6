//! Shared test harness: one embedded PostgreSQL per test binary (the same launcher
//! Aether uses), a fresh database and replication slot per test, and a real Aether
//! over real sockets. Waits are on events with timeouts, never sleeps.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Duration;

use aether::auth::{Claims, JwtKeys};
use aether::config::{Config, JwtAlgorithm};
use aether::server::Server;
use aether::store::embedded::{EmbeddedPostgres, LaunchOptions};
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

pub const SECRET: &str = "test-secret-test-secret-test-secret!";
pub const WAIT: Duration = Duration::from_secs(15);

struct Cluster {
    pg: EmbeddedPostgres,
    _dir: PathBuf,
}

fn cluster() -> &'static Cluster {
    static CLUSTER: OnceLock<Cluster> = OnceLock::new();
    CLUSTER.get_or_init(|| {
        let dir =
            std::env::temp_dir().join(format!("aether-test-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).unwrap();
        // The postgres account must be able to reach the cluster directory.
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        let opts = LaunchOptions {
            fsync: false,
            database: "postgres".into(),
        };
        let pg = EmbeddedPostgres::start(&dir, &opts).expect("embedded PostgreSQL");
        Cluster { pg, _dir: dir }
    })
}

/// A database of its own for one test.
pub struct TestDb {
    pub name: String,
    pub url: String,
}

impl TestDb {
    pub async fn new() -> TestDb {
        let c = tokio::task::spawn_blocking(cluster).await.unwrap();
        let name = format!("t_{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
        let admin = connect(&c.pg.connection_string_for("postgres")).await;
        admin
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .unwrap();
        TestDb {
            url: c.pg.connection_string_for(&name),
            name,
        }
    }

    pub fn config(&self) -> Config {
        let mut c = Config::defaults();
        c.ws_host = "127.0.0.1".into();
        c.ws_port = 0;
        c.jwt_secret = Some(SECRET.into());
        c.database_url = Some(self.url.clone());
        c.replication_slot = self.name.clone();
        c.data_dir = std::env::temp_dir().join(&self.name);
        // Tests share one client address and few users: only the rate-limit test
        // lowers these.
        c.rate_limit_auth_per_min = 1_000_000;
        c.rate_limit_storage_per_min = 1_000_000;
        c
    }

    pub async fn client(&self) -> tokio_postgres::Client {
        connect(&self.url).await
    }
}

pub async fn connect(url: &str) -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    client
}

/// A running in-process Aether on its own database.
pub struct TestServer {
    pub db: TestDb,
    pub server: Server,
    pub sql: tokio_postgres::Client,
}

impl TestServer {
    pub async fn start() -> TestServer {
        Self::start_with(|_| {}).await
    }

    pub async fn start_with(adjust: impl FnOnce(&mut Config)) -> TestServer {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
        let db = TestDb::new().await;
        let mut config = db.config();
        adjust(&mut config);
        let server = Server::start(config).await.expect("server starts");
        wait_healthy(server.addr).await;
        let sql = db.client().await;
        TestServer { db, server, sql }
    }

    pub fn addr(&self) -> SocketAddr {
        self.server.addr
    }

    pub async fn ws(&self, token: Option<&str>) -> Ws {
        Ws::connect(self.addr(), token).await
    }

    /// Connects with extra query parameters (`client_id=a&channel=b`).
    pub async fn ws_query(&self, query: &str) -> Ws {
        Ws::connect_url(&format!("ws://{}/ws?{query}", self.addr())).await
    }

    /// `http://<addr><path>`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr())
    }

    /// Waits until the change stream has caught up with everything committed so far
    /// (a marker row goes through the whole pipeline).
    pub async fn sync(&self) {
        let marker = format!("sync-{}", uuid::Uuid::new_v4().simple());
        let mut ws = self.ws(Some(&service_token())).await;
        ws.subscribe(
            "sync",
            json!({"table": "buckets", "filter": format!("id=eq.{marker}")}),
        )
        .await;
        bucket(&self.sql, &marker, false).await;
        assert_eq!(ws.change().await["new"]["id"], marker.as_str());
        ws.close().await;
    }

    pub async fn exec(&self, sql: &str) {
        self.sql
            .batch_execute(sql)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
    }
}

pub async fn wait_healthy(addr: SocketAddr) {
    let url = format!("http://{addr}/health");
    tokio::time::timeout(WAIT, async {
        loop {
            if let Ok(r) = reqwest_lite(&url).await
                && r == 200
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("server became healthy");
}

/// Minimal HTTP GET returning the status code (keeps the test deps small).
pub async fn reqwest_lite(url: &str) -> std::io::Result<u16> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let rest = url.strip_prefix("http://").unwrap();
    let (host, path) = rest.split_once('/').unwrap();
    let mut s = tokio::net::TcpStream::connect(host).await?;
    s.write_all(
        format!("GET /{path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await?;
    let text = String::from_utf8_lossy(&buf);
    Ok(text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0))
}

pub fn keys() -> JwtKeys {
    JwtKeys::new(SECRET, JwtAlgorithm::HS256, 3600)
}

pub fn token(sub: Option<&str>, role: &str, ttl_s: i64) -> String {
    let now = chrono::Utc::now().timestamp();
    keys().sign(&Claims {
        sub: sub.map(str::to_owned),
        email: None,
        role: Some(role.into()),
        exp: now + ttl_s,
        iat: Some(now),
        session_id: None,
        aud: None,
    })
}

pub fn service_token() -> String {
    token(None, "service_role", 3600)
}

pub fn user_token(user_id: &str) -> String {
    token(Some(user_id), "authenticated", 3600)
}

pub struct Ws {
    inner: tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >,
}

impl Ws {
    pub async fn connect(addr: SocketAddr, token: Option<&str>) -> Ws {
        let url = match token {
            Some(t) => format!("ws://{addr}/ws?token={t}"),
            None => format!("ws://{addr}/ws"),
        };
        let (inner, _) = tokio_tungstenite::connect_async(url)
            .await
            .expect("websocket connects");
        Ws { inner }
    }

    pub async fn connect_url(url: &str) -> Ws {
        let (inner, _) = tokio_tungstenite::connect_async(url)
            .await
            .expect("websocket connects");
        Ws { inner }
    }

    /// The next frame whose `type` is `kind` (others are skipped).
    pub async fn next_of(&mut self, kind: &str) -> Value {
        loop {
            let v = self.next().await;
            if v["type"] == kind {
                return v;
            }
        }
    }

    /// A client with a small fixed receive buffer (no autotuning), so that not
    /// reading makes the server's queue fill up deterministically.
    pub async fn connect_small_buffer(addr: SocketAddr, token: Option<&str>) -> Ws {
        let url = match token {
            Some(t) => format!("ws://{addr}/ws?token={t}"),
            None => format!("ws://{addr}/ws"),
        };
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(64 * 1024).unwrap();
        let stream = socket.connect(addr).await.unwrap();
        let (inner, _) =
            tokio_tungstenite::client_async(url, tokio_tungstenite::MaybeTlsStream::Plain(stream))
                .await
                .expect("websocket connects");
        Ws { inner }
    }

    pub async fn send_text(&mut self, text: &str) {
        self.inner.send(Message::Text(text.into())).await.unwrap();
    }

    pub async fn send(&mut self, v: Value) {
        self.send_text(&v.to_string()).await;
    }

    /// The next JSON text frame; panics on timeout or close.
    pub async fn next(&mut self) -> Value {
        match self.next_message().await {
            Message::Text(t) => serde_json::from_str(&t).unwrap(),
            other => panic!("expected a text frame, got {other:?}"),
        }
    }

    pub async fn next_message(&mut self) -> Message {
        loop {
            let msg = tokio::time::timeout(WAIT, self.inner.next())
                .await
                .expect("frame within timeout")
                .expect("connection open")
                .expect("frame ok");
            match msg {
                Message::Ping(_) | Message::Pong(_) => continue,
                m => return m,
            }
        }
    }

    /// Reads until the server closes; returns the close code and the text frames before it.
    pub async fn until_close(&mut self) -> (Option<u16>, Vec<Value>) {
        let mut frames = Vec::new();
        loop {
            match tokio::time::timeout(WAIT, self.inner.next())
                .await
                .expect("close within timeout")
            {
                Some(Ok(Message::Text(t))) => frames.push(serde_json::from_str(&t).unwrap()),
                Some(Ok(Message::Close(c))) => return (c.map(|c| u16::from(c.code)), frames),
                Some(Ok(_)) => {}
                None | Some(Err(_)) => return (None, frames),
            }
        }
    }

    /// Subscribes and waits for the `subscribed` reply (and returns frames replayed after it).
    pub async fn subscribe(&mut self, id: &str, mut data: Value) -> Value {
        data["id"] = json!(id);
        self.send(json!({"type": "subscription", "action": "subscribe", "data": data}))
            .await;
        let reply = self.next().await;
        assert_eq!(
            (&reply["type"], &reply["action"], &reply["data"]["id"]),
            (&json!("subscription"), &json!("subscribed"), &json!(id)),
            "subscribe reply: {reply}"
        );
        // Where the subscription starts: a position id (resume point before any change).
        let position = reply["data"]["position"]
            .as_str()
            .expect("subscribed.position");
        assert!(
            position
                .parse::<aether::replication::lsn::Position>()
                .is_ok(),
            "{reply}"
        );
        reply
    }

    /// The next `change` frame (panics if another kind of frame comes first).
    pub async fn change(&mut self) -> Value {
        let v = self.next().await;
        assert_eq!(v["type"], "change", "expected a change frame, got {v}");
        v
    }

    pub async fn close(mut self) {
        let _ = self.inner.close(None).await;
    }
}

/// Creates a user row and returns its id.
pub async fn user(sql: &tokio_postgres::Client, email: &str) -> String {
    let row = sql
        .query_one(
            "INSERT INTO auth.users (email) VALUES ($1) RETURNING id::text",
            &[&email],
        )
        .await
        .unwrap();
    row.get(0)
}

/// Creates a bucket (or sets `public` on an existing one, such as the default
/// `UPLOAD_BUCKET` the server creates at start).
pub async fn bucket(sql: &tokio_postgres::Client, id: &str, public: bool) {
    sql.execute(
        "INSERT INTO public.buckets (id, name, public) VALUES ($1, $1, $2)
         ON CONFLICT (id) DO UPDATE SET public = EXCLUDED.public
         WHERE buckets.public IS DISTINCT FROM EXCLUDED.public",
        &[&id, &public],
    )
    .await
    .unwrap();
}

/// Creates a folder and returns its id.
pub async fn folder(sql: &tokio_postgres::Client, bucket: &str, owner: &str, path: &str) -> String {
    let row = sql
        .query_one(
            "INSERT INTO public.folders (bucket_id, owner_id, path, name) VALUES ($1, $2::text::uuid, $3, $3) RETURNING id::text",
            &[&bucket, &owner, &path],
        )
        .await
        .unwrap();
    row.get(0)
}
