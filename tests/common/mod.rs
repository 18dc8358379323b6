//! Shared test harness: one embedded PostgreSQL per test binary (the same launcher
//! Aether uses), a fresh database and replication slot per test, and a real Aether
//! over real sockets. Waits are on events with timeouts, never sleeps.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Duration;

use aether::config::{Config, JwtAlgorithm};
use aether::server::Server;
use aether_auth::{Claims, JwtKeys};
use aether_postgres::store::embedded::{EmbeddedPostgres, LaunchOptions};
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

pub const SECRET: &str = "test-secret-test-secret-test-secret!";
pub const WAIT: Duration = Duration::from_secs(15);

struct Cluster {
    pg: EmbeddedPostgres,
    dir: PathBuf,
}

/// Test clusters of earlier runs: their postmaster is gone with the process that
/// started it, the directory is not. Removed when no postmaster lives there and
/// it is old enough not to be another binary's cluster being created right now.
fn remove_stale_clusters() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for e in entries.flatten() {
        let path = e.path();
        if !e.file_name().to_string_lossy().starts_with("aether-test-") {
            continue;
        }
        let old = e
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age > std::time::Duration::from_secs(600));
        let alive = std::fs::read_to_string(path.join("postgres/postmaster.pid"))
            .ok()
            .and_then(|t| t.lines().next()?.trim().parse::<i32>().ok())
            .is_some_and(|pid| {
                nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok()
            });
        if old && !alive {
            let _ = std::fs::remove_dir_all(&path);
        }
    }
}

/// The longest one test binary may run (`AETHER_TEST_BINARY_LIMIT_S`, default
/// 300 s). Each takes well under a minute; one that hangs fails here, with what
/// it was running, instead of holding CI until its own limit.
fn binary_limit() -> Duration {
    let secs = std::env::var("AETHER_TEST_BINARY_LIMIT_S")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300);
    Duration::from_secs(secs)
}

fn watchdog() {
    let limit = binary_limit();
    let _ = std::thread::Builder::new()
        .name("test-watchdog".into())
        .spawn(move || {
            std::thread::sleep(limit);
            eprintln!(
                "test binary {:?} ran for over {limit:?}: aborting (a test is hung)",
                std::env::args().next()
            );
            std::process::abort();
        });
}

fn cluster() -> &'static Cluster {
    static CLUSTER: OnceLock<Cluster> = OnceLock::new();
    CLUSTER.get_or_init(|| {
        watchdog();
        remove_stale_clusters();
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
        Cluster { pg, dir }
    })
}

/// A database of its own for one test.
pub struct TestDb {
    pub name: String,
    pub url: String,
    /// Inside the cluster's directory, so it goes when the cluster does.
    pub data_dir: PathBuf,
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
            data_dir: c.dir.join(&name),
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
        c.data_dir = self.data_dir.clone();
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
    pub config: Config,
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
        let server = Server::start(config.clone()).await.expect("server starts");
        wait_healthy(server.addr).await;
        let sql = db.client().await;
        TestServer {
            db,
            server,
            sql,
            config,
        }
    }

    /// Stops the server and starts it again on the same database and slot (a new port).
    pub async fn restart(self) -> TestServer {
        let TestServer {
            db,
            server,
            sql,
            config,
        } = self;
        server.stop().await;
        let server = Server::start(config.clone())
            .await
            .expect("server restarts");
        wait_healthy(server.addr).await;
        TestServer {
            db,
            server,
            sql,
            config,
        }
    }

    /// A KingShare client (`protocol=kingshare`), keeping PascalCase messages.
    pub async fn kingshare(&self, token: Option<&str>) -> Ws {
        let mut url = format!("ws://{}/ws?protocol=kingshare", self.addr());
        if let Some(t) = token {
            url.push_str(&format!("&token={t}"));
        }
        let mut ws = Ws::connect_url(&url).await;
        ws.skip_kingshare = false;
        ws
    }

    /// Signs up through the API; returns (user id, access token).
    pub async fn sign_up(&self, email: &str) -> (String, String) {
        let res = reqwest::Client::new()
            .post(self.url("/auth/sign-up"))
            .json(&json!({"email": email, "password": "correct horse 1"}))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 201, "sign-up");
        let v: Value = res.json().await.unwrap();
        (
            v["user"]["id"].as_str().unwrap().to_owned(),
            v["session"]["access_token"].as_str().unwrap().to_owned(),
        )
    }

    /// Uploads through the API; returns the response body.
    pub async fn upload(&self, token: &str, path: &str, bytes: Vec<u8>, mime: &str) -> Value {
        let name = path.rsplit('/').next().unwrap().to_owned();
        let part = reqwest::multipart::Part::bytes(bytes)
            .file_name(name)
            .mime_str(mime)
            .unwrap();
        let form = reqwest::multipart::Form::new()
            .text("path", path.to_owned())
            .part("file", part);
        let res = reqwest::Client::new()
            .post(self.url("/storage/upload"))
            .bearer_auth(token)
            .multipart(form)
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 201, "upload");
        res.json().await.unwrap()
    }

    /// A user row with a fresh email: tokens name users that exist (every route
    /// and socket checks it).
    pub async fn new_user(&self) -> String {
        user(&self.sql, &format!("{}@example.com", uuid::Uuid::new_v4())).await
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

/// A port free right now on 127.0.0.1, for a server started as its own process.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
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
    /// Token-only connections also get KingShare (PascalCase) messages; tests of
    /// the other vocabularies skip them unless they ask for them.
    pub skip_kingshare: bool,
}

impl Ws {
    pub async fn connect(addr: SocketAddr, token: Option<&str>) -> Ws {
        let url = match token {
            Some(t) => format!("ws://{addr}/ws?token={t}"),
            None => format!("ws://{addr}/ws"),
        };
        let (inner, _) = tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(url))
            .await
            .expect("websocket handshake within the timeout")
            .expect("websocket connects");
        Ws {
            inner,
            skip_kingshare: true,
        }
    }

    pub async fn connect_url(url: &str) -> Ws {
        let (inner, _) = tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(url))
            .await
            .expect("websocket handshake within the timeout")
            .expect("websocket connects");
        Ws {
            inner,
            skip_kingshare: true,
        }
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
        let handshake = async {
            let stream = socket.connect(addr).await.unwrap();
            tokio_tungstenite::client_async(url, tokio_tungstenite::MaybeTlsStream::Plain(stream))
                .await
        };
        let (inner, _) = tokio::time::timeout(WAIT, handshake)
            .await
            .expect("websocket handshake within the timeout")
            .expect("websocket connects");
        Ws {
            inner,
            skip_kingshare: true,
        }
    }

    pub async fn send_text(&mut self, text: &str) {
        self.inner.send(Message::Text(text.into())).await.unwrap();
    }

    pub async fn send(&mut self, v: Value) {
        self.send_text(&v.to_string()).await;
    }

    /// The next JSON text frame; panics on timeout or close.
    pub async fn next(&mut self) -> Value {
        loop {
            let v: Value = match self.next_message().await {
                Message::Text(t) => serde_json::from_str(&t).unwrap(),
                other => panic!("expected a text frame, got {other:?}"),
            };
            if self.skip_kingshare && is_kingshare(&v) {
                continue;
            }
            return v;
        }
    }

    /// The next frame but pings and pongs; panics unless it comes within
    /// [`WAIT`] (pings included: a server pinging for ever ends this too).
    pub async fn next_message(&mut self) -> Message {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let msg = tokio::time::timeout_at(deadline, self.inner.next())
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

    /// The next text frame, or the close code once the connection ends.
    pub async fn next_or_close(&mut self) -> Result<Value, Option<u16>> {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            match tokio::time::timeout_at(deadline, self.inner.next())
                .await
                .expect("a frame or a close within the timeout")
            {
                Some(Ok(Message::Text(t))) => {
                    let v: Value = serde_json::from_str(&t).unwrap();
                    if !(self.skip_kingshare && is_kingshare(&v)) {
                        return Ok(v);
                    }
                }
                Some(Ok(Message::Close(c))) => return Err(c.map(|c| u16::from(c.code))),
                Some(Ok(_)) => {}
                None | Some(Err(_)) => return Err(None),
            }
        }
    }

    /// Reads until the server closes; returns the close code and the text frames before it.
    pub async fn until_close(&mut self) -> (Option<u16>, Vec<Value>) {
        let mut frames = Vec::new();
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            match tokio::time::timeout_at(deadline, self.inner.next())
                .await
                .expect("close within timeout")
            {
                Some(Ok(Message::Text(t))) => {
                    let v: Value = serde_json::from_str(&t).unwrap();
                    if !(self.skip_kingshare && is_kingshare(&v)) {
                        frames.push(v);
                    }
                }
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
            matches!(
                position.parse::<aether_core::lsn::SinceId>(),
                Ok(aether_core::lsn::SinceId::Stream(_))
            ),
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

/// A KingShare message: `type` in PascalCase.
pub fn is_kingshare(v: &Value) -> bool {
    v["type"]
        .as_str()
        .is_some_and(|t| t.starts_with(|c: char| c.is_ascii_uppercase()))
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
