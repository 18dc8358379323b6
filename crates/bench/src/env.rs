//! The world a scenario runs in: a private PostgreSQL cluster, the `aether` binary as
//! a child process, and the load process.

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader};

use aether::config::JwtAlgorithm;
use aether_auth::{Claims, JwtKeys};
use aether_postgres::store::embedded::{EmbeddedPostgres, LaunchOptions};

use crate::RunArgs;

pub const SECRET: &str = "aether-bench-secret-aether-bench-secret";
pub const DATABASE: &str = "aether_bench";
pub const SLOT: &str = "aether";

pub struct Env {
    pub dir: PathBuf,
    pub pg: EmbeddedPostgres,
    pub db_url: String,
    /// Aether's `DATA_DIR` (its change log is `changelog/` in it).
    pub aether_data: PathBuf,
    /// `--aether-bin`, if given.
    aether_bin: Option<PathBuf>,
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
        let aether_data = match &args.aether_data_dir {
            Some(base) => base.join(dir.file_name().context("cluster directory name")?),
            None => dir.join("aether-data"),
        };
        Ok(Env {
            dir,
            pg,
            db_url,
            aether_data,
            aether_bin: args.aether_bin.clone(),
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
        Ok(aether_postgres::store::embedded::find_bin_dir()?)
    }

    /// Starts `aether` with this cluster's URL; waits for the listener only.
    pub fn start_aether(&self, extra: &[(&str, String)]) -> anyhow::Result<Aether> {
        let a = self.spawn_aether(free_port()?, extra)?;
        a.wait_listening(Duration::from_secs(60))?;
        Ok(a)
    }

    /// Starts `aether` on `port` and returns at once (the soak kills it while it
    /// starts, and restarts it on the same port).
    pub fn spawn_aether(&self, port: u16, extra: &[(&str, String)]) -> anyhow::Result<Aether> {
        self.spawn_aether_logged(port, "aether.log", extra)
    }

    /// [`Env::spawn_aether`] with its output appended to `log_name` in the cluster
    /// directory (the `cluster` scenario's nodes each have their own log; `extra`
    /// may override `DATA_DIR`).
    pub fn spawn_aether_logged(
        &self,
        port: u16,
        log_name: &str,
        extra: &[(&str, String)],
    ) -> anyhow::Result<Aether> {
        let exe = std::env::current_exe()?;
        let bin = match &self.aether_bin {
            Some(b) => b.clone(),
            None => exe
                .parent()
                .map(|d| d.join("aether"))
                .filter(|p| p.is_file())
                .context("target/<profile>/aether not found next to aether-bench: run `cargo build --release --bins`")?,
        };
        let log_path = self.dir.join(log_name);
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
            .env("DATA_DIR", &self.aether_data)
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
        Ok(Aether {
            child,
            pid,
            addr,
            log: log_path,
        })
    }

    /// Holds `slot` with a replication connection that never reads, so a restarted
    /// Aether (retrying with backoff) can take its subscribers before it reads the
    /// slot. The holder sends no feedback: the slot's position does not move.
    /// (A pg_hba `replication` line cannot do this: it matches physical replication
    /// only, not the `replication=database` connections of logical decoding.)
    pub async fn hold_slot(&self, slot: &str) -> anyhow::Result<SlotHold> {
        let config: tokio_postgres::Config = self.db_url.parse()?;
        let mut conn =
            aether_postgres::replication::conn::ReplicationConn::connect(&config).await?;
        conn.start_replication(slot, "aether_realtime", aether_core::lsn::PgLsn::ZERO)
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

    /// A signed-in user's token.
    pub fn user_token(user: &str) -> String {
        let keys = JwtKeys::new(SECRET, JwtAlgorithm::HS256, 86_400);
        let now = chrono::Utc::now().timestamp();
        keys.sign(&Claims {
            sub: Some(user.to_owned()),
            email: None,
            role: Some("authenticated".into()),
            exp: now + 86_400,
            iat: Some(now),
            session_id: None,
            aud: None,
        })
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
    _conn: aether_postgres::replication::conn::ReplicationConn,
    /// The walsender serving the hold.
    pub pid: i32,
}

impl Drop for Env {
    fn drop(&mut self) {
        self.pg.stop();
        if !self.keep {
            let _ = std::fs::remove_dir_all(&self.dir);
            let _ = std::fs::remove_dir_all(&self.aether_data);
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
    /// Waits until the listener accepts connections.
    pub fn wait_listening(&self, within: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + within;
        while std::net::TcpStream::connect(self.addr).is_err() {
            if Instant::now() > deadline {
                bail!(
                    "aether did not listen within {within:?}; see {}",
                    self.log.display()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(())
    }

    /// Sends `sig` and waits for the process to end (SIGKILL after `within`);
    /// returns how long it took and whether it ended by itself.
    pub fn signal_and_wait(
        &mut self,
        sig: nix::sys::signal::Signal,
        within: Duration,
    ) -> (Duration, bool) {
        let t = Instant::now();
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid as i32), sig);
        loop {
            if let Ok(Some(_)) = self.child.try_wait() {
                return (t.elapsed(), true);
            }
            if t.elapsed() > within {
                let _ = self.child.kill();
                let _ = self.child.wait();
                return (t.elapsed(), false);
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

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
        // Already ended and reaped (the soak kills it): its pid may be reused.
        if let Ok(Some(_)) = self.child.try_wait() {
            return;
        }
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

/// The body of a `GET` (Connection: close), `None` unless the status is 200.
pub async fn http_get_body(addr: SocketAddr, path: &str) -> std::io::Result<Option<String>> {
    use tokio::io::AsyncReadExt as _;
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await?;
    let text = String::from_utf8_lossy(&buf);
    let Some((head, body)) = text.split_once("\r\n\r\n") else {
        return Ok(None);
    };
    if head.split_whitespace().nth(1) != Some("200") {
        return Ok(None);
    }
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        // Chunked: concatenate the chunks.
        let mut out = String::new();
        let mut rest = body;
        while let Some((size, after)) = rest.split_once("\r\n") {
            let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
            if n == 0 || after.len() < n {
                break;
            }
            out.push_str(&after[..n]);
            rest = after[n..].trim_start_matches("\r\n");
        }
        return Ok(Some(out));
    }
    Ok(Some(body.to_owned()))
}

/// `GET /ws/status` as JSON (`Value::Null` if unavailable).
pub async fn ws_status(addr: SocketAddr) -> serde_json::Value {
    match http_get_body(addr, "/ws/status").await {
        Ok(Some(b)) => serde_json::from_str(&b).unwrap_or(serde_json::Value::Null),
        _ => serde_json::Value::Null,
    }
}

/// The change log's size from `/ws/status`: bytes, records, bytes per record.
pub async fn changelog_size(addr: SocketAddr) -> serde_json::Value {
    let s = ws_status(addr).await;
    let c = &s["changelog"];
    let bytes = c["bytes"].as_f64();
    let records = c["records"].as_f64();
    serde_json::json!({
        "bytes": bytes,
        "records": records,
        "bytes_per_record": match (bytes, records) {
            (Some(b), Some(r)) if r > 0.0 => Some(b / r),
            _ => None,
        },
        "append_us_last": c["append_us"],
        "fsync_us_last": c["fsync_us"],
    })
}

/// Bytes of the change log's segment files under `data_dir/changelog` (the
/// relations file and meta are left out: they do not grow with changes).
pub fn segment_bytes(data_dir: &Path) -> u64 {
    std::fs::read_dir(data_dir.join("changelog"))
        .map(|d| {
            d.flatten()
                .filter(|e| e.file_name().to_string_lossy().ends_with(".seg"))
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

/// Settings that turn on Aether's Prometheus exposition on a free port.
pub fn metrics_settings() -> anyhow::Result<(u16, Vec<(&'static str, String)>)> {
    let port = free_port()?;
    Ok((
        port,
        vec![
            ("ENABLE_METRICS", "true".into()),
            ("METRICS_PORT", port.to_string()),
        ],
    ))
}

/// The change log's histograms (summaries: quantiles, sum, count) and the router's
/// hot-tail gauge from Aether's Prometheus exposition.
pub async fn scrape_log_metrics(port: u16) -> serde_json::Value {
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let Ok(Some(text)) = http_get_body(addr, "/metrics").await else {
        return serde_json::Value::Null;
    };
    let mut out = serde_json::Map::new();
    for (metric, key) in [
        ("aether_changelog_fsync_seconds", "fsync"),
        ("aether_changelog_append_seconds", "append"),
    ] {
        let mut m = serde_json::Map::new();
        for line in text.lines().filter(|l| l.starts_with(metric)) {
            let Some((name, value)) = line.rsplit_once(' ') else {
                continue;
            };
            let Ok(v) = value.parse::<f64>() else {
                continue;
            };
            if let Some(q) = name
                .strip_prefix(metric)
                .and_then(|r| r.strip_prefix("{quantile=\""))
                .and_then(|r| r.strip_suffix("\"}"))
            {
                // Seconds -> µs, keyed like the other summaries.
                let k = match q {
                    "0" => "min_us".to_owned(),
                    "1" => "max_us".to_owned(),
                    q => format!("p{}_us", q.trim_start_matches("0.").trim_end_matches('0')),
                };
                m.insert(k, serde_json::json!(v * 1e6));
            } else if name == format!("{metric}_sum") {
                m.insert("sum_s".into(), serde_json::json!(v));
            } else if name == format!("{metric}_count") {
                m.insert("count".into(), serde_json::json!(v));
            }
        }
        if let (Some(s), Some(c)) = (
            m.get("sum_s").and_then(|v| v.as_f64()),
            m.get("count").and_then(|v| v.as_f64()),
        ) && c > 0.0
        {
            m.insert("mean_us".into(), serde_json::json!(s / c * 1e6));
        }
        out.insert(key.into(), serde_json::Value::Object(m));
    }
    for (metric, key) in [
        ("aether_router_tail_bytes", "tail_bytes"),
        ("aether_changelog_appended_total", "appended"),
        ("aether_changelog_duplicates_total", "duplicates"),
        ("aether_changelog_bytes", "log_bytes"),
        ("aether_changelog_records", "log_records"),
    ] {
        if let Some(v) = text
            .lines()
            .find(|l| l.starts_with(metric) && l[metric.len()..].starts_with(' '))
            .and_then(|l| l.rsplit_once(' '))
            .and_then(|(_, v)| v.parse::<f64>().ok())
        {
            out.insert(key.into(), serde_json::json!(v));
        }
    }
    serde_json::Value::Object(out)
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
    aether_postgres::store::migrate::migrate(&mut c).await?;
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
    stdin: Option<tokio::process::ChildStdin>,
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
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .context("starting the load process")?;
        let stdout = child.stdout.take().context("load stdout")?;
        let stdin = child.stdin.take();
        Ok(LoadProc {
            child,
            lines: BufReader::new(stdout).lines(),
            stdin,
        })
    }

    /// Sends one line to the load process (a scenario's go-ahead or stop).
    pub async fn send(&mut self, line: &str) -> anyhow::Result<()> {
        let stdin = self.stdin.as_mut().context("load stdin closed")?;
        stdin.write_all(format!("{line}\n").as_bytes()).await?;
        stdin.flush().await?;
        Ok(())
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
