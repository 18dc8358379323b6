//! The embedded default: a private PostgreSQL cluster run from the machine's own
//! PostgreSQL binaries, so `aether` starts with no database set up beforehand.
//!
//! The cluster lives in `DATA_DIR/postgres`, listens on a free loopback port, runs
//! under the `postgres` account when Aether runs as root (PostgreSQL refuses root),
//! and is stopped with Aether. The postmaster is a child of a dedicated thread that
//! asks the kernel to send it SIGINT (fast shutdown) if that thread dies, so even a
//! SIGKILLed Aether leaves no server behind. A server found still running from an
//! earlier start is adopted instead of started twice.

use std::fs;
use std::io::Read as _;
use std::os::unix::fs::PermissionsExt as _;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    #[error(
        "no PostgreSQL server binaries found (tried `pg_config --bindir` and /usr/lib/postgresql/*/bin). \
         Install PostgreSQL 15 or newer (Debian/Ubuntu: `apt-get install postgresql`) \
         or set DATABASE_URL to a server running with wal_level=logical"
    )]
    NoBinaries,
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Failed(String),
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> LaunchError {
    let what = what.into();
    move |source| LaunchError::Io { what, source }
}

#[derive(Debug, Clone)]
pub struct LaunchOptions {
    /// `false` trades crash safety for speed; for throwaway test clusters only.
    pub fsync: bool,
    pub database: String,
}

impl Default for LaunchOptions {
    fn default() -> Self {
        LaunchOptions {
            fsync: true,
            database: "aether".into(),
        }
    }
}

pub struct EmbeddedPostgres {
    pgdata: PathBuf,
    bin_dir: PathBuf,
    port: u16,
    pid: i32,
    database: String,
    stopped: bool,
}

/// Finds the directory holding `initdb` and `postgres`.
pub fn find_bin_dir() -> Result<PathBuf, LaunchError> {
    let has_server = |d: &Path| d.join("initdb").is_file() && d.join("postgres").is_file();
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output() {
        let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if out.status.success() && has_server(&dir) {
            return Ok(dir);
        }
    }
    let mut candidates: Vec<(u32, PathBuf)> = fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let version = e.file_name().to_string_lossy().parse::<u32>().ok()?;
            Some((version, e.path().join("bin")))
        })
        .filter(|(_, d)| has_server(d))
        .collect();
    candidates.sort();
    candidates
        .pop()
        .map(|(_, d)| d)
        .ok_or(LaunchError::NoBinaries)
}

/// The account PostgreSQL must run under: `postgres` when we are root, else ourselves.
fn run_as() -> Result<Option<(u32, u32)>, LaunchError> {
    if !nix::unistd::geteuid().is_root() {
        return Ok(None);
    }
    let user = nix::unistd::User::from_name("postgres")
        .map_err(|e| LaunchError::Failed(format!("looking up the postgres account: {e}")))?
        .ok_or_else(|| {
            LaunchError::Failed(
                "running as root, but there is no `postgres` account to run PostgreSQL under \
                 (PostgreSQL refuses to run as root): create one or run Aether as another user"
                    .into(),
            )
        })?;
    Ok(Some((user.uid.as_raw(), user.gid.as_raw())))
}

fn command(program: PathBuf, account: Option<(u32, u32)>) -> Command {
    let mut cmd = Command::new(program);
    if let Some((uid, gid)) = account {
        cmd.uid(uid).gid(gid);
        // HOME of root is not readable by postgres; some tools look at it.
        cmd.env("HOME", "/tmp");
    }
    cmd
}

impl EmbeddedPostgres {
    /// Initializes (first run) and starts the cluster under `data_dir/postgres`.
    /// Blocking: call from a blocking context.
    pub fn start(data_dir: &Path, options: &LaunchOptions) -> Result<Self, LaunchError> {
        let bin_dir = find_bin_dir()?;
        let account = run_as()?;
        fs::create_dir_all(data_dir)
            .map_err(io(format!("creating DATA_DIR {}", data_dir.display())))?;
        let data_dir = fs::canonicalize(data_dir).map_err(io("resolving DATA_DIR"))?;
        let pgdata = data_dir.join("postgres");
        if !pgdata.join("PG_VERSION").is_file() {
            init_cluster(&bin_dir, &pgdata, account)?;
        }
        let log_path = data_dir.join("postgres.log");

        let (pid, port) = match running_postmaster(&pgdata) {
            Some(found) => {
                tracing::info!(
                    pid = found.0,
                    port = found.1,
                    "adopting the embedded PostgreSQL that is already running"
                );
                found
            }
            None => {
                let port = free_port()?;
                let pid = spawn_postmaster(&bin_dir, &pgdata, &log_path, port, options, account)?;
                (pid, port)
            }
        };
        let mut pg = EmbeddedPostgres {
            pgdata,
            bin_dir,
            port,
            pid,
            database: options.database.clone(),
            stopped: false,
        };
        pg.wait_ready(&log_path)?;
        pg.ensure_database()?;
        Ok(pg)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// A connection string for `database` on this cluster.
    pub fn connection_string_for(&self, database: &str) -> String {
        format!(
            "host=127.0.0.1 port={} user=postgres dbname={database}",
            self.port
        )
    }

    pub fn connection_string(&self) -> String {
        self.connection_string_for(&self.database)
    }

    fn wait_ready(&mut self, log_path: &Path) -> Result<(), LaunchError> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let ok = Command::new(self.bin_dir.join("pg_isready"))
                .args([
                    "-q",
                    "-h",
                    "127.0.0.1",
                    "-p",
                    &self.port.to_string(),
                    "-U",
                    "postgres",
                ])
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
            if ok {
                return Ok(());
            }
            if !alive(self.pid) || Instant::now() > deadline {
                let mut log = String::new();
                let _ = fs::File::open(log_path).and_then(|mut f| f.read_to_string(&mut log));
                let tail: Vec<&str> = log.lines().rev().take(15).collect();
                let tail: Vec<&str> = tail.into_iter().rev().collect();
                return Err(LaunchError::Failed(format!(
                    "the embedded PostgreSQL did not start; last lines of {}:\n{}",
                    log_path.display(),
                    tail.join("\n")
                )));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn ensure_database(&self) -> Result<(), LaunchError> {
        let psql = |sql: &str| {
            Command::new(self.bin_dir.join("psql"))
                .args([
                    "-X",
                    "-q",
                    "-A",
                    "-t",
                    "-h",
                    "127.0.0.1",
                    "-p",
                    &self.port.to_string(),
                ])
                .args([
                    "-U",
                    "postgres",
                    "-d",
                    "postgres",
                    "-v",
                    "ON_ERROR_STOP=1",
                    "-c",
                    sql,
                ])
                .output()
                .map_err(io("running psql"))
        };
        let lit = self.database.replace('\'', "''");
        let out = psql(&format!(
            "SELECT 1 FROM pg_database WHERE datname = '{lit}'"
        ))?;
        if String::from_utf8_lossy(&out.stdout).trim() == "1" {
            return Ok(());
        }
        let ident = self.database.replace('"', "\"\"");
        let out = psql(&format!("CREATE DATABASE \"{ident}\""))?;
        if !out.status.success() {
            return Err(LaunchError::Failed(format!(
                "creating database {}: {}",
                self.database,
                String::from_utf8_lossy(&out.stderr)
            )));
        }
        Ok(())
    }

    /// Fast shutdown; waits up to 30 s.
    pub fn stop(&mut self) {
        if self.stopped {
            return;
        }
        self.stopped = true;
        let pid = nix::unistd::Pid::from_raw(self.pid);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT);
        let deadline = Instant::now() + Duration::from_secs(30);
        while alive(self.pid) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        tracing::info!(pgdata = %self.pgdata.display(), "embedded PostgreSQL stopped");
    }
}

impl Drop for EmbeddedPostgres {
    fn drop(&mut self) {
        self.stop();
    }
}

fn alive(pid: i32) -> bool {
    // A zombie still answers kill(0); check /proc for the state too.
    let pid_ok = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok();
    if !pid_ok {
        return false;
    }
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat
            .rsplit_once(')')
            .map(|(_, rest)| rest.trim_start().starts_with('Z'))
            .unwrap_or(false),
        Err(_) => true,
    }
}

fn running_postmaster(pgdata: &Path) -> Option<(i32, u16)> {
    let text = fs::read_to_string(pgdata.join("postmaster.pid")).ok()?;
    let mut lines = text.lines();
    let pid: i32 = lines.next()?.trim().parse().ok()?;
    let port: u16 = lines.nth(2)?.trim().parse().ok()?;
    alive(pid).then_some((pid, port))
}

fn free_port() -> Result<u16, LaunchError> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").map_err(io("finding a free port"))?;
    Ok(l.local_addr().map_err(io("finding a free port"))?.port())
}

fn init_cluster(
    bin_dir: &Path,
    pgdata: &Path,
    account: Option<(u32, u32)>,
) -> Result<(), LaunchError> {
    fs::create_dir_all(pgdata).map_err(io(format!("creating {}", pgdata.display())))?;
    fs::set_permissions(pgdata, fs::Permissions::from_mode(0o700)).map_err(io("chmod pgdata"))?;
    if let Some((uid, gid)) = account {
        nix::unistd::chown(pgdata, Some(uid.into()), Some(gid.into())).map_err(|e| {
            LaunchError::Failed(format!("giving {} to postgres: {e}", pgdata.display()))
        })?;
    }
    let out = command(bin_dir.join("initdb"), account)
        .arg("-D")
        .arg(pgdata)
        .args(["-U", "postgres", "-A", "trust", "-E", "UTF8", "--no-locale"])
        .output()
        .map_err(io("running initdb"))?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let hint = if stderr.contains("Permission denied") {
            "\n(the postgres account must be able to reach DATA_DIR: choose a DATA_DIR outside /root)"
        } else {
            ""
        };
        return Err(LaunchError::Failed(format!(
            "initdb failed: {stderr}{hint}"
        )));
    }
    Ok(())
}

fn spawn_postmaster(
    bin_dir: &Path,
    pgdata: &Path,
    log_path: &Path,
    port: u16,
    options: &LaunchOptions,
    account: Option<(u32, u32)>,
) -> Result<i32, LaunchError> {
    let log = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log_path)
        .map_err(io(format!("opening {}", log_path.display())))?;
    let log2 = log.try_clone().map_err(io("opening the log"))?;
    let mut cmd = command(bin_dir.join("postgres"), account);
    cmd.arg("-D").arg(pgdata).arg("-p").arg(port.to_string());
    let settings = [
        "listen_addresses=127.0.0.1".to_string(),
        "unix_socket_directories=".to_string(),
        "wal_level=logical".to_string(),
        "max_wal_senders=64".to_string(),
        "max_replication_slots=64".to_string(),
        "max_connections=400".to_string(),
        format!("fsync={}", if options.fsync { "on" } else { "off" }),
        format!(
            "synchronous_commit={}",
            if options.fsync { "on" } else { "off" }
        ),
        format!(
            "full_page_writes={}",
            if options.fsync { "on" } else { "off" }
        ),
    ];
    for s in &settings {
        cmd.arg("-c").arg(s);
    }
    cmd.stdin(Stdio::null()).stdout(log).stderr(log2);
    // SAFETY: prctl is async-signal-safe and touches no memory of the parent.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGINT) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    // PDEATHSIG fires when the *thread* that forked dies, so fork from a thread
    // that lives exactly as long as the postmaster.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("embedded-postgres".into())
        .spawn(move || {
            // The postmaster inherits this thread's CPU set.
            aether_core::task::unpin_current_thread();
            match cmd.spawn() {
                Ok(mut child) => {
                    let _ = tx.send(Ok(child.id() as i32));
                    let _ = child.wait();
                }
                Err(e) => {
                    let _ = tx.send(Err(e));
                }
            }
        })
        .map_err(io("starting the supervisor thread"))?;
    rx.recv()
        .map_err(|_| LaunchError::Failed("supervisor thread vanished".into()))?
        .map_err(io("starting postgres"))
}
