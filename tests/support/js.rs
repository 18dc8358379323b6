//! Shared by `tests/js_client.rs` and `tests/browser_e2e.rs`: installing and
//! building the JavaScript packages, running the `aether` binary as a child
//! process (to SIGKILL and restart it), and talking to Node scripts that speak
//! JSON lines on stdin/stdout.
//!
//! Node.js (18 or newer) and npm are required; `.ci/run` installs them. Set
//! `AETHER_SKIP_JS_TESTS=1` to skip these tests on a machine without them.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};

use crate::common::{SECRET, TestDb, wait_healthy};

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// `false` (after saying so) when `AETHER_SKIP_JS_TESTS` is set.
pub fn enabled() -> bool {
    if std::env::var_os("AETHER_SKIP_JS_TESTS").is_some_and(|v| !v.is_empty() && v != "0") {
        eprintln!("AETHER_SKIP_JS_TESTS is set: skipping a JavaScript test");
        return false;
    }
    true
}

/// Runs a command to completion; panics with its output when it fails.
pub fn run(cmd: &mut Command, what: &str) -> Output {
    let started = Instant::now();
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("{what}: cannot run {cmd:?}: {e} (Node.js 18+ and npm are required for the JavaScript tests; .ci/run installs them, AETHER_SKIP_JS_TESTS=1 skips them)"));
    assert!(
        out.status.success(),
        "{what} failed ({}):\n--- stdout\n{}\n--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("{what}: {:.1}s", started.elapsed().as_secs_f64());
    out
}

fn npm() -> Command {
    let mut c = Command::new("npm");
    c.env("npm_config_loglevel", "error")
        .env("npm_config_fund", "false")
        .env("npm_config_audit", "false")
        .env("npm_config_update_notifier", "false");
    c
}

/// `npm ci` in `dir`, unless `node_modules` was installed from this very lockfile.
pub fn npm_ci(dir: &Path) {
    let lock = std::fs::read(dir.join("package-lock.json")).expect("package-lock.json");
    let marker = dir.join("node_modules/.aether-installed-lock");
    if std::fs::read(&marker).ok().as_deref() == Some(&lock[..]) {
        return;
    }
    run(
        npm().arg("ci").arg("--prefer-offline").current_dir(dir),
        &format!("npm ci in {}", dir.display()),
    );
    std::fs::write(&marker, &lock).unwrap();
}

/// `clients/js`: installed and built (`tsc`), once per test binary.
pub fn client_package() -> PathBuf {
    static READY: OnceLock<PathBuf> = OnceLock::new();
    READY
        .get_or_init(|| {
            let dir = repo().join("clients/js");
            npm_ci(&dir);
            run(
                Command::new(dir.join("node_modules/.bin/tsc"))
                    .args(["-p", "tsconfig.json"])
                    .current_dir(&dir),
                "tsc (clients/js)",
            );
            dir
        })
        .clone()
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The `aether` binary as a child process, on a fixed port so that a restart is
/// reachable at the same URL.
pub struct AetherProc {
    child: Option<std::process::Child>,
    pub addr: std::net::SocketAddr,
    pub log: PathBuf,
}

impl AetherProc {
    pub async fn spawn(db: &TestDb, port: u16, extra_env: &[(&str, &str)]) -> AetherProc {
        // Beside the database's data directory, inside the test cluster's, so
        // both go when the cluster's directory does.
        let log = db
            .data_dir
            .with_file_name(format!("{}-aether.log", db.name));
        let stderr = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_aether"));
        cmd.env("DATABASE_URL", &db.url)
            .env("WS_HOST", "127.0.0.1")
            .env("WS_PORT", port.to_string())
            .env("REPLICATION_SLOT", &db.name)
            .env("JWT_SECRET", SECRET)
            .env("DATA_DIR", &db.data_dir)
            .env("RUST_LOG", "warn")
            .env("RATE_LIMIT_AUTH_PER_MIN", "1000")
            .env("RATE_LIMIT_STORAGE_PER_MIN", "10000")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr);
        for (k, v) in extra_env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().expect("aether binary starts");
        let addr = format!("127.0.0.1:{port}").parse().unwrap();
        wait_healthy(addr).await;
        AetherProc {
            child: Some(child),
            addr,
            log,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn signal(&mut self, sig: nix::sys::signal::Signal) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("running");
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), sig).unwrap();
        child.wait().unwrap()
    }

    pub fn sigkill(mut self) {
        self.signal(nix::sys::signal::Signal::SIGKILL);
    }

    pub fn sigterm(mut self) -> std::process::ExitStatus {
        self.signal(nix::sys::signal::Signal::SIGTERM)
    }
}

impl Drop for AetherProc {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A Node script that prints JSON lines (`{"event": …}`) and reads commands on stdin.
pub struct NodeScript {
    child: tokio::process::Child,
    stdin: tokio::process::ChildStdin,
    events: tokio::sync::mpsc::UnboundedReceiver<Value>,
    log: Arc<Mutex<String>>,
    what: String,
}

impl NodeScript {
    pub fn spawn(dir: &Path, script: &str, env: &[(&str, String)]) -> NodeScript {
        let mut cmd = tokio::process::Command::new("node");
        cmd.arg(script)
            .current_dir(dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("node {script}: {e} (Node.js is required)"));
        let log = Arc::new(Mutex::new(String::new()));
        let (tx, events) = tokio::sync::mpsc::unbounded_channel();
        let stdout = child.stdout.take().unwrap();
        let stderr = child.stderr.take().unwrap();
        let l = Arc::clone(&log);
        tokio::spawn(async move {
            let mut lines = tokio::io::BufReader::new(stdout).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                l.lock().unwrap().push_str(&format!("[out] {line}\n"));
                if let Ok(v) = serde_json::from_str::<Value>(&line) {
                    let _ = tx.send(v);
                }
            }
        });
        let l = Arc::clone(&log);
        tokio::spawn(async move {
            let mut lines = tokio::io::BufReader::new(stderr).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                l.lock().unwrap().push_str(&format!("[err] {line}\n"));
            }
        });
        NodeScript {
            stdin: child.stdin.take().unwrap(),
            child,
            events,
            log,
            what: script.to_owned(),
        }
    }

    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// The next event matching `want` (others are skipped); panics with the
    /// script's output on timeout or exit.
    pub async fn event_where(
        &mut self,
        what: &str,
        timeout: Duration,
        want: impl Fn(&Value) -> bool,
    ) -> Value {
        let found = tokio::time::timeout(timeout, async {
            while let Some(v) = self.events.recv().await {
                if want(&v) {
                    return Some(v);
                }
            }
            None
        })
        .await;
        match found {
            Ok(Some(v)) => v,
            Ok(None) => panic!("{}: exited before {what}\n{}", self.what, self.log()),
            Err(_) => panic!(
                "{}: no {what} within {timeout:?}\n{}",
                self.what,
                self.log()
            ),
        }
    }

    pub async fn event(&mut self, kind: &str, timeout: Duration) -> Value {
        self.event_where(&format!("{kind:?} event"), timeout, |v| v["event"] == kind)
            .await
    }

    pub async fn send(&mut self, v: Value) {
        self.stdin
            .write_all(format!("{v}\n").as_bytes())
            .await
            .expect("script reads stdin");
        self.stdin.flush().await.unwrap();
    }

    /// Waits for the script to exit; panics with its output unless it succeeded.
    pub async fn finish(mut self, timeout: Duration) {
        let status = tokio::time::timeout(timeout, self.child.wait())
            .await
            .unwrap_or_else(|_| panic!("{} did not exit\n{}", self.what, self.log()))
            .unwrap();
        // Let the readers drain what is left.
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            while self.events.recv().await.is_some() {}
        })
        .await;
        assert!(
            status.success(),
            "{} failed ({status})\n{}",
            self.what,
            self.log()
        );
    }
}
