//! Aether killed with SIGKILL mid-stream: changes committed while it was down are
//! decoded when it comes back, and a client resuming with `since` gets exactly the
//! changes it missed.
#![allow(clippy::unwrap_used, clippy::expect_used, unreachable_pub)] // a test may panic; its helpers are `pub` for the other test files

mod common;

use std::process::{Child, Command, Stdio};

use common::*;
use serde_json::json;

struct Aether {
    child: Child,
    addr: std::net::SocketAddr,
}

/// The `aether` binary configured for `db`, listening on `port`.
fn aether_command(db: &TestDb, port: u16) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_aether"));
    cmd.env("DATABASE_URL", &db.url)
        .env("WS_HOST", "127.0.0.1")
        .env("WS_PORT", port.to_string())
        .env("REPLICATION_SLOT", &db.name)
        .env("JWT_SECRET", SECRET)
        .env("DATA_DIR", &db.data_dir);
    cmd
}

impl Aether {
    async fn spawn(db: &TestDb, port: u16) -> Aether {
        let child = aether_command(db, port)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()
            .expect("aether binary starts");
        let addr = format!("127.0.0.1:{port}").parse().unwrap();
        wait_healthy(addr).await;
        Aether { child, addr }
    }

    fn sigkill(mut self) {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGKILL,
        )
        .unwrap();
        self.child.wait().unwrap();
    }

    fn sigterm(mut self) -> std::process::ExitStatus {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .unwrap();
        self.child.wait().unwrap()
    }
}

fn names(frames: &[serde_json::Value]) -> Vec<String> {
    frames
        .iter()
        .map(|c| {
            let row = if c["eventType"] == "DELETE" {
                &c["old"]
            } else {
                &c["new"]
            };
            format!(
                "{} {}",
                c["eventType"].as_str().unwrap(),
                row["name"].as_str().unwrap()
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_stream_then_restart_loses_nothing_and_resume_gets_exactly_the_missed_changes()
{
    let db = TestDb::new().await;
    let port = free_port();
    let aether = Aether::spawn(&db, port).await;
    let sql = db.client().await;
    bucket(&sql, "pub", true).await;

    let mut ws = Ws::connect(aether.addr, Some(&service_token())).await;
    ws.subscribe("s", json!({"table": "files"})).await;
    for n in ["a", "b", "c"] {
        sql.batch_execute(&format!(
            "INSERT INTO public.files (bucket_id, path, name) VALUES ('pub', '{n}', '{n}')"
        ))
        .await
        .unwrap();
    }
    let seen = [ws.change().await, ws.change().await, ws.change().await];
    assert_eq!(names(&seen), ["INSERT a", "INSERT b", "INSERT c"]);
    let first_id = seen[0]["id"].as_str().unwrap().to_owned();
    let last_id = seen[2]["id"].as_str().unwrap().to_owned();

    // Mid-stream: a transaction is committed as Aether dies.
    sql.batch_execute("INSERT INTO public.files (bucket_id, path, name) VALUES ('pub', 'd', 'd')")
        .await
        .unwrap();
    aether.sigkill();
    // While it is down.
    sql.batch_execute(
        "UPDATE public.files SET size = 42 WHERE name = 'a';
         DELETE FROM public.files WHERE name = 'b';
         INSERT INTO public.files (bucket_id, path, name) SELECT 'pub', 'm' || i, 'm' || i FROM generate_series(1, 3) i;",
    )
    .await
    .unwrap();

    let aether = Aether::spawn(&db, port).await;
    let mut ws = Ws::connect(aether.addr, Some(&service_token())).await;
    ws.subscribe("s", json!({"table": "files", "since": last_id}))
        .await;
    let mut missed = Vec::new();
    for _ in 0..6 {
        missed.push(ws.change().await);
    }
    assert_eq!(
        names(&missed),
        [
            "INSERT d",
            "UPDATE a",
            "DELETE b",
            "INSERT m1",
            "INSERT m2",
            "INSERT m3"
        ]
    );
    assert_eq!(missed[1]["new"]["size"], 42);
    assert_eq!(missed[1]["old"]["size"], 0);
    // Live again, with no duplicate in between.
    sql.batch_execute(
        "INSERT INTO public.files (bucket_id, path, name) VALUES ('pub', 'live', 'live')",
    )
    .await
    .unwrap();
    assert_eq!(names(&[ws.change().await]), ["INSERT live"]);

    // The window survived the restart: resuming from the very first change works too,
    // with the same ids as before the crash (positions are deterministic).
    let mut again = Ws::connect(aether.addr, Some(&service_token())).await;
    again
        .subscribe("s", json!({"table": "files", "since": first_id}))
        .await;
    let b = again.change().await;
    assert_eq!(names(std::slice::from_ref(&b)), ["INSERT b"]);
    assert_eq!(b["id"], seen[1]["id"]);
    assert_eq!(again.change().await["id"], seen[2]["id"]);

    // SIGTERM shuts down cleanly.
    assert!(aether.sigterm().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aether_migrate_applies_each_migration_once() {
    let db = TestDb::new().await;
    let run = || {
        let out = Command::new(env!("CARGO_BIN_EXE_aether"))
            .arg("migrate")
            .env("DATABASE_URL", &db.url)
            .env("RUST_LOG", "warn")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let first = run();
    assert!(
        first.starts_with(&format!(
            "applied {} migration(s): 0001_init",
            aether_postgres::store::migrate::MIGRATIONS.len()
        )),
        "{first}"
    );
    assert!(run().starts_with("applied 0 migration(s)"));
    let sql = db.client().await;
    let n: i64 = sql
        .query_one("SELECT count(*) FROM aether.schema_migrations", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        n as usize,
        aether_postgres::store::migrate::MIGRATIONS.len()
    );
}

#[test]
fn a_bad_setting_stops_start_up_with_a_message_naming_it() {
    let out = Command::new(env!("CARGO_BIN_EXE_aether"))
        .env("WS_PORT", "eighty")
        .env(
            "DATA_DIR",
            std::env::temp_dir().join("aether-test-bad-setting"),
        )
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("WS_PORT"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_are_json_lines_in_the_documented_format_with_security_events() {
    use tokio::io::AsyncBufReadExt;
    let db = TestDb::new().await;
    let port = free_port();
    let mut child = tokio::process::Command::from(aether_command(&db, port))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = tokio::io::BufReader::new(child.stderr.take().unwrap()).lines();
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    wait_healthy(addr).await;
    let secret_token = token(Some(&uuid::Uuid::new_v4().to_string()), "authenticated", -5);
    let mut ws = Ws::connect(addr, Some(&secret_token)).await;
    ws.until_close().await;
    let mut refused = None;
    tokio::time::timeout(WAIT, async {
        while let Ok(Some(line)) = lines.next_line().await {
            let v: serde_json::Value =
                serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
            for key in ["timestamp", "level", "event"] {
                assert!(v[key].is_string(), "{key} missing: {line}");
            }
            assert!(
                v["data"]["component"].is_string() && v["data"]["details"].is_object(),
                "{line}"
            );
            assert!(!line.contains(&secret_token), "a token was logged");
            if v["event"] == "token_refused" {
                refused = Some(v);
                break;
            }
        }
    })
    .await
    .expect("a token_refused security event is logged");
    let refused = refused.unwrap();
    assert_eq!(refused["level"], "warn");
    assert_eq!(refused["data"]["component"], "api");
    assert!(
        refused["data"]["details"]["reason"]
            .as_str()
            .unwrap()
            .contains("expired")
    );
    child.kill().await.unwrap();
}
