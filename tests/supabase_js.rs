//! The real `@supabase/supabase-js` client (installed from npm with the lockfile in
//! `tests/supabase-js/`) against a real Aether: each test starts a server on its
//! own database and runs one Node script with the URL and keys in its
//! environment; the script exits 0 when every check passed.
//!
//! Scripts ask for plain SQL (changes made outside the client) with a line on
//! stdout, `@@sql {"sql": "…"}`; the answer comes back on stdin as one JSON line
//! (`{"ok":true}` or `{"error":"…"}`).
#![allow(clippy::unwrap_used, clippy::expect_used, unreachable_pub)] // a test may panic; its helpers are `pub` for the other test files

mod common;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::OnceLock;
use std::time::Duration;

use common::TestServer;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/supabase-js")
}

/// `npm ci` once per test binary, unless `node_modules` already matches the lockfile.
fn npm_ci() {
    static DONE: OnceLock<()> = OnceLock::new();
    DONE.get_or_init(|| {
        let d = dir();
        let installed = d.join("node_modules/.package-lock.json");
        let lock = d.join("package-lock.json");
        let fresh = match (std::fs::metadata(&installed), std::fs::metadata(&lock)) {
            (Ok(i), Ok(l)) => match (i.modified(), l.modified()) {
                (Ok(i), Ok(l)) => i >= l,
                _ => false,
            },
            _ => false,
        };
        if fresh {
            return;
        }
        let status = std::process::Command::new("npm")
            .args(["ci", "--no-audit", "--no-fund", "--prefer-offline"])
            .current_dir(&d)
            .status()
            .expect("npm is installed (Node 18 or newer; see README.md)");
        assert!(status.success(), "npm ci failed in {}", d.display());
    });
}

/// The default settings: `ALLOWED_FILE_TYPES` (images, PDF, Word by default)
/// is the seed route's rule, so `/storage/v1` accepts any type, as Supabase
/// does, unless a bucket says otherwise.
async fn start() -> TestServer {
    TestServer::start_with(|_| {}).await
}

/// Runs `script` (in tests/supabase-js) against `server`; panics unless it exits 0.
async fn run(server: &TestServer, script: &str, extra_env: &[(&str, &str)]) {
    tokio::task::spawn_blocking(npm_ci).await.unwrap();
    let jwt = &server.server.state.jwt;
    let mut cmd = tokio::process::Command::new("node");
    cmd.arg(script)
        .current_dir(dir())
        .env("SUPABASE_URL", format!("http://{}", server.addr()))
        .env("SUPABASE_ANON_KEY", jwt.api_key("anon"))
        .env("SUPABASE_SERVICE_KEY", jwt.api_key("service_role"))
        .env("JWT_SECRET", common::SECRET)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true);
    for (k, v) in extra_env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("node runs (Node 18 or newer)");
    let mut stdin = child.stdin.take().unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let work = async {
        while let Some(line) = lines.next_line().await.unwrap() {
            match line.strip_prefix("@@sql ") {
                Some(req) => {
                    let v: serde_json::Value = serde_json::from_str(req).unwrap();
                    let sql = v["sql"].as_str().unwrap();
                    let answer = match server.sql.batch_execute(sql).await {
                        Ok(()) => serde_json::json!({"ok": true}),
                        Err(e) => serde_json::json!({"error": e.to_string()}),
                    };
                    stdin
                        .write_all(format!("{answer}\n").as_bytes())
                        .await
                        .unwrap();
                }
                None => println!("[{script}] {line}"),
            }
        }
        child.wait().await.unwrap()
    };
    let status = tokio::time::timeout(Duration::from_secs(120), work)
        .await
        .unwrap_or_else(|_| panic!("{script} did not finish within 120 s"));
    assert!(status.success(), "{script} failed: {status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn supabase_js_auth() {
    let server = start().await;
    run(&server, "auth.mjs", &[]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn supabase_js_storage() {
    let server = start().await;
    run(&server, "storage.mjs", &[]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn supabase_js_realtime() {
    let server = start().await;
    run(&server, "realtime.mjs", &[]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn supabase_js_broadcast_presence() {
    let server = start().await;
    run(&server, "broadcast.mjs", &[]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn supabase_js_database_broadcast() {
    let server = start().await;
    run(&server, "db_broadcast.mjs", &[]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn supabase_js_rest() {
    let server = start().await;
    run(&server, "rest.mjs", &[]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn supabase_js_auth_admin() {
    let server = start().await;
    run(&server, "auth_admin.mjs", &[]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn supabase_js_storage_buckets() {
    let server = start().await;
    run(&server, "storage_buckets.mjs", &[]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn supabase_js_storage_objects() {
    // A 1 MB quota, so the script can see a copy counted against it.
    let server = TestServer::start_with(|c| c.storage_quota_bytes = 1_000_000).await;
    run(&server, "storage_objects.mjs", &[]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn supabase_js_storage_docs() {
    let server = start().await;
    run(&server, "storage_docs.mjs", &[]).await;
}
