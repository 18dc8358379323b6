//! The TypeScript client in `clients/js`: its unit tests (`node --test`), and an
//! integration test against the real `aether` binary that is SIGKILLed and
//! restarted mid-stream while the client is subscribed: every change arrives
//! exactly once, in order.
//!
//! Needs Node.js 18+ and npm (`.ci/run` installs them); the first run does
//! `npm ci` in `clients/js` (later runs reuse `node_modules` while the lockfile
//! is unchanged).
#![allow(clippy::unwrap_used, clippy::expect_used, unreachable_pub)] // a test may panic; its helpers are `pub` for the other test files

mod common;
#[path = "support/js.rs"]
mod js;

use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use js::{AetherProc, NodeScript};
use serde_json::{Value, json};

#[test]
fn js_unit_tests_pass() {
    if !js::enabled() {
        return;
    }
    let dir = js::client_package();
    let mut tests: Vec<String> = std::fs::read_dir(dir.join("test"))
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.ends_with(".test.mjs"))
        .map(|n| format!("test/{n}"))
        .collect();
    tests.sort();
    assert!(tests.len() >= 2, "unit test files: {tests:?}");
    let out = js::run(
        Command::new("node")
            .arg("--test")
            .args(&tests)
            .current_dir(&dir),
        "node --test (clients/js)",
    );
    let tap = String::from_utf8_lossy(&out.stdout);
    assert!(tap.contains("# fail 0"), "{tap}");
}

async fn insert_rows(sql: &tokio_postgres::Client, ready: &Value, names: &[String]) {
    for name in names {
        sql.execute(
            "INSERT INTO public.files (bucket_id, folder_id, path, name, owner_id, size, mime_type)
             VALUES ($1, $2::text::uuid, 'live/' || $3, $3, $4::text::uuid, 1, 'text/plain')",
            &[
                &ready["bucket"].as_str().unwrap(),
                &ready["folder_id"].as_str().unwrap(),
                name,
                &ready["user_id"].as_str().unwrap(),
            ],
        )
        .await
        .unwrap();
    }
}

fn names(range: std::ops::Range<usize>) -> Vec<String> {
    range.map(|i| format!("row-{i:03}")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn js_client_loses_nothing_and_duplicates_nothing_across_sigkill_and_restart() {
    if !js::enabled() {
        return;
    }
    let started = Instant::now();
    let dir = tokio::task::spawn_blocking(js::client_package)
        .await
        .unwrap();
    let db = TestDb::new().await;
    let port = js::free_port();
    // Tokens live 6 s, so the client has to renew in-band during the test.
    let env = [
        ("JWT_EXPIRES_S", "6"),
        ("ALLOWED_FILE_TYPES", "image/*,application/pdf,text/plain"),
    ];
    let aether = AetherProc::spawn(&db, port, &env).await;
    let mut node = NodeScript::spawn(
        &dir,
        "test/integration/resume.mjs",
        &[("AETHER_URL", aether.url())],
    );
    let ready = node.event("ready", Duration::from_secs(30)).await;
    let sql = db.client().await;

    // Streaming; then SIGKILL while those changes are still in flight.
    insert_rows(&sql, &ready, &names(0..40)).await;
    aether.sigkill();
    node.event_where("reconnecting", Duration::from_secs(15), |v| {
        v["event"] == "state" && v["state"] == "reconnecting"
    })
    .await;
    // Committed while Aether is down.
    insert_rows(&sql, &ready, &names(40..80)).await;
    let aether = AetherProc::spawn(&db, port, &env).await;
    // Committed while the client is still backing off (or just resubscribing).
    insert_rows(&sql, &ready, &names(80..100)).await;
    node.event_where("resubscribed", Duration::from_secs(15), |v| {
        v["event"] == "subscribed" && v["reconnected"] == true
    })
    .await;
    // A clean shutdown (close 1001) and restart too.
    assert!(aether.sigterm().success());
    insert_rows(&sql, &ready, &names(100..110)).await;
    let aether = AetherProc::spawn(&db, port, &env).await;
    insert_rows(&sql, &ready, &names(110..120)).await;

    node.send(json!({"cmd": "expect", "names": names(0..120), "renewals": true}))
        .await;
    let result = node.event("result", Duration::from_secs(60)).await;
    let log = node.log();
    assert_eq!(result["ok"], true, "{result:#}\n{log}");
    assert_eq!(result["duplicates"], json!([]), "{log}");
    assert_eq!(result["missing"], json!([]), "{log}");
    let states: Vec<&str> = result["states"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap())
        .collect();
    assert!(
        states.iter().filter(|s| **s == "reconnecting").count() >= 2,
        "{states:?}"
    );
    assert!(
        result["resumed_after_reconnect"].as_u64().unwrap() >= 2,
        "{result:#}"
    );
    assert!(
        result["in_band_refreshes"].as_u64().unwrap() >= 1,
        "{result:#}"
    );
    // Renewal signs in again, and the auth subscription sees it.
    assert!(
        result["auth_events"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e == "sign_in"),
        "{result:#}"
    );
    node.finish(Duration::from_secs(10)).await;
    assert!(aether.sigterm().success());
    eprintln!(
        "JS integration test: {:.1}s",
        started.elapsed().as_secs_f64()
    );
}
