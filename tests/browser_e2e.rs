//! The demo app (`examples/files-app`) end to end in headless Chromium:
//! builds it with Vite against a fresh `aether`, then drives two browser
//! sessions with `examples/files-app/e2e/two-sessions.mjs` (playwright-core and
//! Debian's Chromium). One uploads, the other sees the file appear; an SQL
//! UPDATE from here renames it and both show the new name within a second.
//! Screenshots of failures go to `target/tmp/e2e-screenshots/`.
//!
//! Needs Node.js 18+, npm and Chromium (`apt-get install chromium`; `.ci/run`
//! installs them). `CHROMIUM` points at another binary.
#![allow(clippy::unwrap_used, clippy::expect_used, unreachable_pub)] // a test may panic; its helpers are `pub` for the other test files

mod common;
#[path = "support/js.rs"]
mod js;

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use js::{AetherProc, NodeScript};
use serde_json::json;

fn chromium() -> PathBuf {
    let path = std::env::var_os("CHROMIUM")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/bin/chromium"));
    assert!(
        path.exists(),
        "{} not found: install Debian's chromium (`apt-get install chromium`, as .ci/run does), \
         set CHROMIUM to a Chromium binary, or AETHER_SKIP_JS_TESTS=1 to skip",
        path.display()
    );
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_browser_sessions_see_uploads_sql_renames_and_deletes_live() {
    if !js::enabled() {
        return;
    }
    let started = Instant::now();
    let chromium = chromium();
    let app = js::repo().join("examples/files-app");
    let port = js::free_port();
    let server_url = format!("http://127.0.0.1:{port}");
    let dist = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("files-app-dist-{port}"));
    {
        let (app, dist, server_url) = (app.clone(), dist.clone(), server_url.clone());
        tokio::task::spawn_blocking(move || {
            js::npm_ci(&app);
            js::run(
                Command::new(app.join("node_modules/.bin/tsc"))
                    .arg("--noEmit")
                    .current_dir(&app),
                "tsc --noEmit (files-app)",
            );
            js::run(
                Command::new(app.join("node_modules/.bin/vite"))
                    .args(["build", "--emptyOutDir", "--logLevel", "warn", "--outDir"])
                    .arg(&dist)
                    .env("VITE_AETHER_URL", &server_url)
                    .env("VITE_UPLOAD_BUCKET", "files")
                    .env("VITE_MAX_FILE_SIZE", "5242880")
                    .env(
                        "VITE_ALLOWED_FILE_TYPES",
                        "image/*,application/pdf,.doc,.docx",
                    )
                    .current_dir(&app),
                "vite build (files-app)",
            );
        })
        .await
        .unwrap();
    }

    let db = TestDb::new().await;
    let aether = AetherProc::spawn(&db, port, &[]).await;
    let sql = db.client().await;
    let shots = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("e2e-screenshots");
    let mut node = NodeScript::spawn(
        &app,
        "e2e/two-sessions.mjs",
        &[
            ("APP_DIST", dist.display().to_string()),
            ("AETHER_URL", server_url.clone()),
            ("CHROMIUM", chromium.display().to_string()),
            ("SCREENSHOT_DIR", shots.display().to_string()),
        ],
    );
    let uploaded = node
        .event_where(
            "upload seen by both sessions",
            Duration::from_secs(90),
            |v| v["event"] == "uploaded" || v["event"] == "result",
        )
        .await;
    assert_eq!(
        uploaded["event"],
        "uploaded",
        "{uploaded:#}\n{}",
        node.log()
    );
    let id = uploaded["file_id"].as_str().unwrap().to_owned();

    // The DBA's rename, as `psql` would send it.
    let n = sql
        .execute(
            "UPDATE public.files SET name = 'renamed.pdf', path = owner_id::text || '/docs/renamed.pdf' WHERE id = $1::text::uuid",
            &[&id],
        )
        .await
        .unwrap();
    assert_eq!(n, 1);
    node.send(json!({"cmd": "renamed", "name": "renamed.pdf"}))
        .await;

    let result = node.event("result", Duration::from_secs(60)).await;
    assert_eq!(result["ok"], true, "{result:#}\n{}", node.log());
    assert!(result["rename_ms"].as_u64().unwrap() <= 1000, "{result:#}");
    node.finish(Duration::from_secs(20)).await;
    assert!(aether.sigterm().success());
    let _ = std::fs::remove_dir_all(&dist);
    eprintln!(
        "browser e2e: {:.1}s (rename seen after {} ms)",
        started.elapsed().as_secs_f64(),
        result["rename_ms"]
    );
}
