//! The world a scenario runs in: a private PostgreSQL cluster, the `aether` binary as
//! a child process, and the load process.

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader};

use aether::auth::{Claims, JwtKeys};
use aether::config::JwtAlgorithm;
use aether::store::embedded::{EmbeddedPostgres, LaunchOptions};

use crate::RunArgs;

pub const SECRET: &str = "aether-bench-secret-aether-bench-secret";
pub const DATABASE: &str = "aether_bench";
pub const SLOT: &str = "aether";

pub struct Env {
    pub dir: PathBuf,
    pub pg: EmbeddedPostgres,
    pub db_url: String,
    keep: bool,
}

impl Env {
    /// A fresh cluster under `work_dir` (blocking).
    pub fn new(args: &RunArgs, scenario: &str) -> anyhow::Result<Env> {
        std::fs::create_dir_all(&args.work_dir)?;
        let dir = args.work_dir.join(format!(
            "aether-bench-{scenario}-{}",
            &uuid::Uuid::new_v4().simple().to_string()[..8]
        ));
        std::fs::create_dir_all(&dir)?;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755))?;
        let pg = EmbeddedPostgres::start(
            &dir,
            &LaunchOptions {
                fsync: false,
                database: DATABASE.into(),
            },
        )
        .context("starting PostgreSQL")?;
        let db_url = pg.connection_string_for(DATABASE);
        Ok(Env {
            dir,
            pg,
            db_url,
            keep: args.keep,
        })
    }

    /// The postmaster's pid (from `postmaster.pid`).
    pub fn pg_pid(&self) -> Option<u32> {
        std::fs::read_to_string(self.dir.join("postgres").join("postmaster.pid"))
            .ok()?
            .lines()
            .next()?
            .trim()
            .parse()
            .ok()
    }

    pub fn bin_dir() -> anyhow::Result<PathBuf> {
        Ok(aether::store::embedded::find_bin_dir()?)
    }

    /// Starts `aether` with this cluster's URL; waits for the listener only.
    pub fn start_aether(&self, extra: &[(&str, String)]) -> anyhow::Result<Aether> {
        let exe = std::env::current_exe()?;
        let bin = exe
            .parent()
            .map(|d| d.join("aether"))
            .filter(|p| p.is_file())
            .context("target/<profile>/aether not found next to aether-bench: run `cargo build --release --bins`")?;
        let port = free_port()?;
        let log_path = self.dir.join("aether.log");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)?;
        let mut cmd = Command::new(bin);
        cmd.env("DATABASE_URL", &self.db_url)
            .env("WS_HOST", "127.0.0.1")
            .env("WS_PORT", port.to_string())
            .env("REPLICATION_SLOT", SLOT)
            .env("JWT_SECRET", SECRET)
            .env("DATA_DIR", self.dir.join("aether-data"))
            .env("RUST_LOG", "warn")
            // The load process opens up to 10,000 connections with one token from
            // one host: the per-user and total connection limits are not what is
            // measured.
            .env("RATE_LIMIT_CONNECTIONS", "1000000")
            .env("WS_MAX_CONNECTIONS", "100000")
            // Nor are the HTTP connection caps (up to ~1,000 sockets per source
            // address, 127.0.0.2-11): off.
            .env("HTTP_MAX_CONNECTIONS", "0")
            .env("HTTP_MAX_CONNECTIONS_PER_ADDR", "0")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        for (k, v) in extra {
            cmd.env(k, v);
        }
        die_with_parent(&mut cmd);
        let child = cmd.spawn().context("starting aether")?;
        let pid = child.id();
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        let a = Aether {
            child,
            pid,
            addr,
            log: log_path,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        while std::net::TcpStream::connect(addr).is_err() {
            if Instant::now() > deadline {
                bail!("aether did not listen within 60 s; see {}", a.log.display());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(a)
    }

    /// Holds `slot` with a replication connection that never reads, so a restarted
    /// Aether (retrying with backoff) can take its subscribers before it reads the
    /// slot. The holder sends no feedback: the slot's position does not move.
    /// (A pg_hba `replication` line cannot do this: it matches physical replication
    /// only, not the `replication=database` connections of logical decoding.)
    pub async fn hold_slot(&self, slot: &str) -> anyhow::Result<SlotHold> {
        let config: tokio_postgres::Config = self.db_url.parse()?;
        let mut conn = aether::replication::conn::ReplicationConn::connect(&config).await?;
        conn.start_replication(
            slot,
            "aether_realtime",
            aether::replication::lsn::PgLsn::ZERO,
        )
        .await?;
        let c = connect(&self.db_url).await?;
        let pid: i32 = c
            .query_one(
                "SELECT active_pid FROM pg_replication_slots WHERE slot_name = $1 AND active",
                &[&slot],
            )
            .await?
            .get(0);
        Ok(SlotHold { _conn: conn, pid })
    }

    pub fn service_token() -> String {
        let keys = JwtKeys::new(SECRET, JwtAlgorithm::HS256, 86_400);
        let now = chrono::Utc::now().timestamp();
        keys.sign(&Claims {
            sub: None,
            email: None,
            role: Some("service_role".into()),
            exp: now + 86_400,
            iat: Some(now),
            session_id: None,
            aud: None,
        })
    }
}

/// A replication connection holding a slot; dropping it releases the slot.
pub struct SlotHold {
    _conn: aether::replication::conn::ReplicationConn,
    /// The walsender serving the hold.
    pub pid: i32,
}

impl Drop for Env {
    fn drop(&mut self) {
        self.pg.stop();
        if !self.keep {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

pub struct Aether {
    child: Child,
    pub pid: u32,
    pub addr: SocketAddr,
    pub log: PathBuf,
}

impl Aether {
    /// Waits for `/health` to answer 200 (replication streaming).
    pub async fn wait_healthy(&self) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if http_status(self.addr, "/health").await.ok() == Some(200) {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("aether not healthy within 60 s; see {}", self.log.display());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// SIGTERM, then SIGKILL after 20 s.
    pub fn stop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.pid as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Aether {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Ends the child (SIGTERM) if the thread that started it dies, so an interrupted
/// bench leaves no Aether or load process behind.
pub fn die_with_parent(cmd: &mut Command) {
    use std::os::unix::process::CommandExt as _;
    // SAFETY: prctl is async-signal-safe and touches no memory of the parent.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

pub fn free_port() -> anyhow::Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

pub async fn http_status(addr: SocketAddr, path: &str) -> std::io::Result<u16> {
    use tokio::io::AsyncReadExt as _;
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
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

pub async fn connect(url: &str) -> anyhow::Result<tokio_postgres::Client> {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .with_context(|| format!("connecting to {url}"))?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(client)
}

/// Applies Aether's migrations and creates the bench's owner, bucket and `folders`
/// folders named `<prefix><i>`. Returns the owner id.
pub async fn seed(url: &str, folders: usize, prefix: &str) -> anyhow::Result<uuid::Uuid> {
    let mut c = connect(url).await?;
    aether::store::migrate::migrate(&mut c).await?;
    let owner: uuid::Uuid = c
        .query_one(
            "INSERT INTO auth.users (email) VALUES ('bench@example.com')
             ON CONFLICT (email) DO UPDATE SET email = EXCLUDED.email RETURNING id",
            &[],
        )
        .await?
        .get(0);
    c.execute(
        "INSERT INTO public.buckets (id, name, owner_id) VALUES ('bench', 'bench', $1)
         ON CONFLICT DO NOTHING",
        &[&owner],
    )
    .await?;
    if folders > 0 {
        c.execute(
            "INSERT INTO public.folders (bucket_id, path, name, owner_id)
             SELECT 'bench', $1 || i, $1 || i, $2 FROM generate_series(0, $3::int - 1) i
             ON CONFLICT DO NOTHING",
            &[&prefix, &owner, &(folders as i32)],
        )
        .await?;
    }
    Ok(owner)
}

/// The ids of folders `<prefix>0 .. <prefix>n-1`, in index order.
pub async fn folder_ids(
    c: &tokio_postgres::Client,
    prefix: &str,
    n: usize,
) -> anyhow::Result<Vec<uuid::Uuid>> {
    let rows = c
        .query(
            "SELECT id FROM public.folders WHERE bucket_id = 'bench' AND path = ANY(
                 SELECT $1 || i FROM generate_series(0, $2::int - 1) i)
             ORDER BY substr(path, length($1) + 1)::int",
            &[&prefix, &(n as i32)],
        )
        .await?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

/// The load process: this binary run as `aether-bench load --spec <json>`.
pub struct LoadProc {
    child: tokio::process::Child,
    lines: tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
}

impl LoadProc {
    pub fn spawn(spec: &serde_json::Value) -> anyhow::Result<LoadProc> {
        let exe = std::env::current_exe()?;
        let mut std_cmd = Command::new(exe);
        die_with_parent(&mut std_cmd);
        let mut child = tokio::process::Command::from(std_cmd)
            .arg("load")
            .arg("--spec")
            .arg(spec.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .context("starting the load process")?;
        let stdout = child.stdout.take().context("load stdout")?;
        Ok(LoadProc {
            child,
            lines: BufReader::new(stdout).lines(),
        })
    }

    /// Reads lines until one starts with `word`; returns the rest of it. `LOG` lines
    /// are progress and go to stderr.
    pub async fn expect(&mut self, word: &str) -> anyhow::Result<String> {
        loop {
            let Some(line) = self.lines.next_line().await? else {
                let status = self.child.wait().await?;
                bail!("load process ended ({status}) before {word}");
            };
            if let Some(rest) = line.strip_prefix(word) {
                return Ok(rest.trim().to_owned());
            }
            if let Some(rest) = line.strip_prefix("LOG ") {
                eprintln!("  [load] {rest}");
            } else if let Some(rest) = line.strip_prefix("FAIL ") {
                bail!("load process failed: {rest}");
            }
        }
    }

    pub async fn result(&mut self) -> anyhow::Result<serde_json::Value> {
        let text = self.expect("RESULT").await?;
        let _ = self.child.wait().await;
        Ok(serde_json::from_str(&text)?)
    }
}

pub fn write_file(path: &Path, text: &str) -> anyhow::Result<()> {
    if let Some(p) = path.parent() {
        std::fs::create_dir_all(p)?;
    }
    std::fs::write(path, text)?;
    Ok(())
}
