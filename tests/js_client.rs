//! The TypeScript client in `clients/js`: its unit tests (`node --test`), and
//! integration tests against the real `aether` binary: SIGKILLed and restarted
//! mid-stream while the client is subscribed, and, in cluster mode (NATS), the
//! node the client is on SIGKILLed so that it fails over to the other one. Every
//! change arrives exactly once, in order.
//!
//! Needs Node.js 18+ and npm (`.ci/run` installs them); the first run does
//! `npm ci` in `clients/js` (later runs reuse `node_modules` while the lockfile
//! is unchanged).
#![allow(clippy::unwrap_used, clippy::expect_used, unreachable_pub)] // a test may panic; its helpers are `pub` for the other test files

mod common;
#[path = "support/js.rs"]
mod js;

use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use aether_changelog::natsd::NatsServer;
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

/// One node of a cluster: its own port, `DATA_DIR` and `NODE_NAME`, the shared
/// database, slot and NATS.
async fn cluster_node(db: &TestDb, nats: &NatsServer, name: &str) -> AetherProc {
    let data_dir = db.data_dir.join(name);
    let nats_url = nats.url();
    let env = [
        ("NATS_URL", nats_url.as_str()),
        ("NODE_NAME", name),
        ("DATA_DIR", data_dir.to_str().unwrap()),
        ("ALLOWED_FILE_TYPES", "image/*,application/pdf,text/plain"),
    ];
    AetherProc::spawn(db, js::free_port(), &env).await
}

/// The `cluster.leader` of a node's `/ws/status`.
async fn leader(node: &AetherProc) -> Option<String> {
    let status: Value = reqwest::get(format!("{}/ws/status", node.url()))
        .await
        .ok()?
        .json()
        .await
        .ok()?;
    status["cluster"]["leader"].as_str().map(str::to_owned)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn js_client_fails_over_to_another_cluster_node_and_loses_and_doubles_nothing() {
    if !js::enabled() {
        return;
    }
    let started = Instant::now();
    let dir = tokio::task::spawn_blocking(js::client_package)
        .await
        .unwrap();
    let nats = tokio::task::spawn_blocking(NatsServer::start)
        .await
        .unwrap();
    let db = TestDb::new().await;
    // n1 leads (it holds the slot): killing it fails over the client and the
    // leadership at once.
    let n1 = cluster_node(&db, &nats, "n1").await;
    tokio::time::timeout(WAIT, async {
        while leader(&n1).await.as_deref() != Some("n1") {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("n1 leads");
    let n2 = cluster_node(&db, &nats, "n2").await;
    let (n1_ws, n2_ws) = (
        format!("ws://{}/ws", n1.addr),
        format!("ws://{}/ws", n2.addr),
    );

    let mut node = NodeScript::spawn(
        &dir,
        "test/integration/resume.mjs",
        &[("AETHER_URLS", format!("{},{}", n1.url(), n2.url()))],
    );
    let ready = node.event("ready", Duration::from_secs(30)).await;
    assert_eq!(ready["url"], n1_ws, "the first URL first");

    // A writer commits 120 rows, one per transaction, paced so that the kill
    // falls in the middle of them.
    let written = Arc::new(AtomicUsize::new(0));
    let writer = {
        let sql = db.client().await;
        let ready = ready.clone();
        let written = Arc::clone(&written);
        tokio::spawn(async move {
            let mut pace = tokio::time::interval(Duration::from_millis(15));
            for name in names(0..120) {
                pace.tick().await;
                insert_rows(&sql, &ready, &[name]).await;
                written.fetch_add(1, Ordering::SeqCst);
            }
        })
    };
    // The client has some of them from n1: kill n1 mid-stream.
    node.send(json!({"cmd": "progress", "rows": 20})).await;
    let progress = node.event("progress", Duration::from_secs(30)).await;
    assert_eq!(progress["url"], n1_ws, "{progress}");
    n1.sigkill();
    let at_kill = written.load(Ordering::SeqCst);
    assert!(at_kill < 120, "the writer was done before the kill");
    node.event_where("reconnecting", Duration::from_secs(15), |v| {
        v["event"] == "state" && v["state"] == "reconnecting"
    })
    .await;
    let resumed = node
        .event_where("resubscribed on n2", Duration::from_secs(30), |v| {
            v["event"] == "subscribed" && v["reconnected"] == true
        })
        .await;
    assert_eq!(resumed["resumed"], true, "{resumed}");
    writer.await.unwrap();

    node.send(json!({"cmd": "expect", "names": names(0..120)}))
        .await;
    let result = node.event("result", Duration::from_secs(60)).await;
    let log = node.log();
    assert_eq!(result["ok"], true, "{result:#}\n{log}");
    assert_eq!(result["duplicates"], json!([]), "{log}");
    assert_eq!(result["missing"], json!([]), "{log}");
    // It moved to n2 and stayed there.
    assert_eq!(result["opened"], json!([n1_ws, n2_ws]), "{result:#}\n{log}");
    assert!(
        result["resumed_after_reconnect"].as_u64().unwrap() >= 1,
        "{result:#}"
    );
    node.finish(Duration::from_secs(10)).await;
    assert!(n2.sigterm().success());
    eprintln!(
        "JS cluster failover test: {:.1}s ({at_kill} of 120 rows committed at the kill)",
        started.elapsed().as_secs_f64()
    );
}
