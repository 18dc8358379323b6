//! The change log's promise, tested by killing real processes: no change lost,
//! doubled or reordered across SIGKILL and SIGTERM of Aether, a fast restart of
//! PostgreSQL, and a client away for a long time.
#![allow(clippy::unwrap_used, clippy::expect_used, unreachable_pub)] // a test may panic; its helpers are `pub` for the other test files

mod common;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::time::{Duration, Instant};

use common::*;
use serde_json::{Value, json};

/// The `aether` binary on `db`, listening on `port`.
struct Aether {
    child: Child,
    addr: SocketAddr,
}

impl Aether {
    async fn spawn(db: &TestDb, port: u16) -> Aether {
        let child = Command::new(env!("CARGO_BIN_EXE_aether"))
            .env("DATABASE_URL", &db.url)
            .env("WS_HOST", "127.0.0.1")
            .env("WS_PORT", port.to_string())
            .env("REPLICATION_SLOT", &db.name)
            .env("JWT_SECRET", SECRET)
            .env("DATA_DIR", &db.data_dir)
            .env(
                "RUST_LOG",
                std::env::var("AETHER_CHILD_LOG").unwrap_or_else(|_| "error".into()),
            )
            .stdout(Stdio::null())
            .spawn()
            .expect("aether binary starts");
        let addr = format!("127.0.0.1:{port}").parse().unwrap();
        wait_healthy(addr).await;
        Aether { child, addr }
    }

    fn signal(mut self, sig: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.child.id() as i32), sig).unwrap();
        self.child.wait().unwrap();
    }
}

impl Drop for Aether {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn numbered_table(db: &TestDb) -> tokio_postgres::Client {
    let sql = db.client().await;
    sql.batch_execute(
        "CREATE TABLE public.seq (n int8 PRIMARY KEY, body text);
         ALTER TABLE public.seq REPLICA IDENTITY FULL;
         ALTER PUBLICATION aether_realtime ADD TABLE public.seq;",
    )
    .await
    .unwrap();
    sql
}

/// A subscriber of `public.seq` that reconnects with `since` whenever its
/// connection ends, records every `n` it receives, in order, and the ids.
struct Follower {
    seen: Vec<i64>,
    ids: Vec<String>,
    last_id: Option<String>,
}

impl Follower {
    /// Reads until the connection ends or `until` is reached; `true` if reached.
    async fn follow(&mut self, addr: SocketAddr, until: i64) -> bool {
        self.follow_to(addr, &AtomicI64::new(until)).await
    }

    /// Like `follow`, with a target that may be set while it runs.
    async fn follow_to(&mut self, addr: SocketAddr, until: &AtomicI64) -> bool {
        let Ok(mut ws) = tokio::time::timeout(WAIT, try_connect(addr)).await else {
            return false;
        };
        let Some(ws) = ws.as_mut() else { return false };
        let mut data = json!({"id": "s", "table": "seq"});
        if let Some(id) = &self.last_id {
            data["since"] = json!(id);
        }
        let msg = json!({"type": "subscription", "action": "subscribe", "data": data});
        if ws.send_text(&msg.to_string()).await.is_err() {
            return false;
        }
        loop {
            let v = match tokio::time::timeout(WAIT, ws.next_json()).await {
                Ok(Some(v)) => v,
                _ => return false,
            };
            match v["type"].as_str() {
                Some("change") => {
                    let n = v["new"]["n"].as_i64().unwrap();
                    let id = v["id"].as_str().unwrap().to_owned();
                    self.seen.push(n);
                    self.ids.push(id.clone());
                    self.last_id = Some(id);
                    if n >= until.load(Ordering::Relaxed) {
                        return true;
                    }
                }
                // The first subscription starts at its reply's position.
                Some("subscription") if self.last_id.is_none() => {
                    self.last_id = v["data"]["position"].as_str().map(str::to_owned);
                }
                Some("error") => panic!("the follower got an error: {v}"),
                _ => {}
            }
        }
    }

    /// What went wrong, if anything: lost, doubled, reordered.
    fn check(&self, last: i64) {
        let mut dup = 0;
        let mut back = 0;
        let mut set = BTreeSet::new();
        for w in self.seen.windows(2) {
            if w[1] <= w[0] {
                back += 1;
            }
        }
        for n in &self.seen {
            if !set.insert(*n) {
                dup += 1;
            }
        }
        let lost = (1..=last).filter(|n| !set.contains(n)).count();
        let ids_back = self.ids.windows(2).filter(|w| w[1] <= w[0]).count();
        assert_eq!(
            (lost, dup, back, ids_back),
            (0, 0, 0, 0),
            "lost, duplicates, order reversals, id reversals over {} changes",
            self.seen.len()
        );
    }
}

/// A raw WebSocket that reports a closed connection instead of panicking.
struct RawWs(
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>,
);

async fn try_connect(addr: SocketAddr) -> Option<RawWs> {
    let url = format!("ws://{addr}/ws?token={}", service_token());
    tokio_tungstenite::connect_async(url)
        .await
        .ok()
        .map(|(ws, _)| RawWs(ws))
}

impl RawWs {
    async fn send_text(&mut self, text: &str) -> Result<(), ()> {
        use futures_util::SinkExt;
        self.0
            .send(tokio_tungstenite::tungstenite::Message::Text(text.into()))
            .await
            .map_err(|_| ())
    }

    async fn next_json(&mut self) -> Option<Value> {
        use futures_util::StreamExt;
        loop {
            match self.0.next().await? {
                Ok(tokio_tungstenite::tungstenite::Message::Text(t)) => {
                    return serde_json::from_str(&t).ok();
                }
                Ok(tokio_tungstenite::tungstenite::Message::Close(_)) | Err(_) => return None,
                Ok(_) => {}
            }
        }
    }
}

/// A writer committing numbered rows, one per transaction, until stopped.
fn writer(db: &TestDb, stop: Arc<AtomicBool>, last: Arc<AtomicI64>) -> tokio::task::JoinHandle<()> {
    let url = db.url.clone();
    tokio::spawn(async move {
        let sql = connect(&url).await;
        let mut n = 0i64;
        while !stop.load(Ordering::Relaxed) {
            n += 1;
            sql.execute(
                "INSERT INTO public.seq (n, body) VALUES ($1, repeat('x', 100))",
                &[&n],
            )
            .await
            .unwrap();
            last.store(n, Ordering::Relaxed);
            // About 300 commits a second: the kills land mid-stream.
            tokio::time::sleep(Duration::from_millis(3)).await;
        }
    })
}

/// A pseudo-random sequence, reproducible from the printed seed.
struct Lcg(u64);

impl Lcg {
    fn next(&mut self, below: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        (self.0 >> 33) % below
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kills_and_restarts_under_a_steady_write_lose_double_and_reorder_nothing() {
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    println!("seed {seed}");
    let mut rng = Lcg(seed);
    let db = TestDb::new().await;
    let port = free_port();
    let mut aether = Some(Aether::spawn(&db, port).await);
    let addr = aether.as_ref().unwrap().addr;
    numbered_table(&db).await;
    let stop = Arc::new(AtomicBool::new(false));
    let last = Arc::new(AtomicI64::new(0));
    let writing = writer(&db, Arc::clone(&stop), Arc::clone(&last));

    // The follower runs beside the killer, from the start of the log, reconnecting
    // with `since` whenever it is cut off.
    let target = Arc::new(AtomicI64::new(i64::MAX));
    let start = log_start(addr).await;
    let follower = {
        let target = Arc::clone(&target);
        tokio::spawn(async move {
            let mut f = Follower {
                seen: Vec::new(),
                ids: Vec::new(),
                last_id: Some(start),
            };
            loop {
                if f.follow_to(addr, &target).await {
                    return f;
                }
                println!(
                    "follower cut off after {} changes (last {:?}); reconnecting; status {}",
                    f.seen.len(),
                    f.seen.last(),
                    http_get(&format!("http://{addr}/ws/status"))
                        .await
                        .map(|v| v.to_string())
                        .unwrap_or_default()
                );
                // Reconnect the moment the server is healthy again.
                wait_healthy(addr).await;
            }
        })
    };

    // 5 SIGKILLs and 2 SIGTERMs, in a random order, at random moments.
    let mut signals = vec![nix::sys::signal::Signal::SIGKILL; 5];
    signals.extend([nix::sys::signal::Signal::SIGTERM; 2]);
    for i in (1..signals.len()).rev() {
        signals.swap(i, rng.next(i as u64 + 1) as usize);
    }
    for sig in signals {
        tokio::time::sleep(Duration::from_millis(200 + rng.next(800))).await;
        aether.take().unwrap().signal(sig);
        // Down for a moment while rows keep coming.
        tokio::time::sleep(Duration::from_millis(rng.next(300))).await;
        aether = Some(Aether::spawn(&db, port).await);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    writing.await.unwrap();
    let n = last.load(Ordering::Relaxed);
    assert!(n > 500, "the writer committed only {n} rows");
    target.store(n, Ordering::Relaxed);
    // The follower may be waiting for frames on a live connection: one more row
    // past the target wakes it if it already has everything else.
    let sql = db.client().await;
    sql.execute("INSERT INTO public.seq (n) VALUES ($1)", &[&(n + 1)])
        .await
        .unwrap();
    let f = tokio::time::timeout(Duration::from_secs(60), follower)
        .await
        .expect("the follower catches up")
        .unwrap();
    let upto: Vec<i64> = f.seen.iter().copied().filter(|x| *x <= n).collect();
    let f = Follower {
        seen: upto,
        ids: f.ids[..f.seen.iter().filter(|x| **x <= n).count()].to_vec(),
        last_id: None,
    };
    f.check(n);
    println!(
        "{} changes through 7 restarts: none lost, doubled or reordered",
        n
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resuming_right_after_a_restart_with_nothing_written_delivers_nothing_old() {
    let db = TestDb::new().await;
    let port = free_port();
    let aether = Aether::spawn(&db, port).await;
    let sql = numbered_table(&db).await;
    let mut f = Follower {
        seen: Vec::new(),
        ids: Vec::new(),
        last_id: None,
    };
    // Subscribed before the rows: the follower takes the reply's position.
    let follow = {
        let addr = aether.addr;
        tokio::spawn(async move {
            assert!(f.follow(addr, 2000).await);
            f
        })
    };
    // Let the subscription land before writing.
    wait_for_subscribers(aether.addr).await;
    sql.batch_execute(
        "INSERT INTO public.seq (n) SELECT i FROM generate_series(1, 1000) i;
         INSERT INTO public.seq (n) SELECT i FROM generate_series(1001, 2000) i;",
    )
    .await
    .unwrap();
    let f = tokio::time::timeout(Duration::from_secs(60), follow)
        .await
        .unwrap()
        .unwrap();
    f.check(2000);
    aether.signal(nix::sys::signal::Signal::SIGTERM);
    let aether = Aether::spawn(&db, port).await;
    // The moment it is healthy: one client resumes at the last id, one subscribes
    // without `since`. Nothing old reaches either: the next change each gets is
    // the one written after.
    let mut resumed = Ws::connect(aether.addr, Some(&service_token())).await;
    resumed
        .subscribe(
            "s",
            json!({"table": "seq", "since": f.last_id.clone().unwrap()}),
        )
        .await;
    let mut fresh = Ws::connect(aether.addr, Some(&service_token())).await;
    let reply = fresh.subscribe("s", json!({"table": "seq"})).await;
    assert_eq!(
        reply["data"]["position"].as_str(),
        f.last_id.as_deref(),
        "a new subscription starts at the newest logged change"
    );
    sql.execute("INSERT INTO public.seq (n) VALUES (2001)", &[])
        .await
        .unwrap();
    assert_eq!(resumed.change().await["new"]["n"], 2001);
    assert_eq!(fresh.change().await["new"]["n"], 2001);
}

/// The id a client resumes from to get everything the log holds.
async fn log_start(addr: SocketAddr) -> String {
    let status = http_get(&format!("http://{addr}/ws/status")).await.unwrap();
    format!(
        "{}.{}",
        status["changelog"]["floor"].as_str().unwrap(),
        status["changelog"]["epoch"].as_str().unwrap()
    )
}

/// Waits until the server counts a subscribed connection.
async fn wait_for_subscribers(addr: SocketAddr) {
    let url = format!("http://{addr}/ws/status");
    tokio::time::timeout(WAIT, async {
        loop {
            if let Ok(body) = http_get(&url).await
                && body["connections"]["active"].as_u64().unwrap_or(0) > 0
            {
                // The subscribe frame follows the connection at once; the
                // router handles commands before changes.
                tokio::time::sleep(Duration::from_millis(100)).await;
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("a subscriber connected");
}

async fn http_get(url: &str) -> reqwest::Result<Value> {
    reqwest::get(url).await?.json().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_away_for_150k_changes_and_a_restart_resumes_without_a_gap() {
    let db = TestDb::new().await;
    let port = free_port();
    let aether = Aether::spawn(&db, port).await;
    let sql = numbered_table(&db).await;
    let mut ws = Ws::connect(aether.addr, Some(&service_token())).await;
    ws.subscribe("s", json!({"table": "seq"})).await;
    sql.execute("INSERT INTO public.seq (n) VALUES (0)", &[])
        .await
        .unwrap();
    let c = ws.change().await;
    let since = c["id"].as_str().unwrap().to_owned();
    ws.close().await;
    // Away: 150,000 changes, and Aether restarts in the middle.
    sql.batch_execute("INSERT INTO public.seq (n) SELECT i FROM generate_series(1, 75000) i")
        .await
        .unwrap();
    aether.signal(nix::sys::signal::Signal::SIGKILL);
    let aether = Aether::spawn(&db, port).await;
    sql.batch_execute("INSERT INTO public.seq (n) SELECT i FROM generate_series(75001, 150000) i")
        .await
        .unwrap();
    let end_lsn: String = sql
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await
        .unwrap()
        .get(0);
    // The slot follows the log within seconds, not when resumes stop needing it.
    let started = Instant::now();
    loop {
        let caught: bool = sql
            .query_one(
                "SELECT confirmed_flush_lsn >= $1::text::pg_lsn FROM pg_replication_slots WHERE slot_name = $2",
                &[&end_lsn, &db.name],
            )
            .await
            .unwrap()
            .get(0);
        if caught {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the slot was not confirmed past the last commit"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!(
        "slot confirmed {:?} after the last commit",
        started.elapsed()
    );
    let mut f = Follower {
        seen: Vec::new(),
        ids: Vec::new(),
        last_id: Some(since),
    };
    assert!(
        tokio::time::timeout(Duration::from_secs(120), f.follow(aether.addr, 150_000))
            .await
            .expect("the resume finishes")
    );
    f.check(150_000);
    assert_eq!(f.seen.len(), 150_000);
}

/// `pg_ctl` as the account the embedded cluster runs under.
fn pg_ctl(pgdata: &std::path::Path, args: &[&str]) -> std::process::Output {
    use std::os::unix::process::CommandExt as _;
    let bin = aether_postgres::store::embedded::find_bin_dir().unwrap();
    let mut cmd = Command::new(bin.join("pg_ctl"));
    cmd.args(["-D", pgdata.to_str().unwrap()]).args(args);
    if nix::unistd::geteuid().is_root() {
        let pw = nix::unistd::User::from_name("postgres").unwrap().unwrap();
        cmd.uid(pw.uid.as_raw())
            .gid(pw.gid.as_raw())
            .env("HOME", "/tmp");
    }
    cmd.stdout(Stdio::null()).output().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fast_postgres_restart_is_not_held_up_and_nothing_is_lost() {
    // A cluster of its own: restarting the shared one would disturb other tests.
    let dir = std::env::temp_dir().join(format!("aether-test-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let pg = {
        let dir = dir.clone();
        tokio::task::spawn_blocking(move || {
            aether_postgres::store::embedded::EmbeddedPostgres::start(
                &dir,
                &aether_postgres::store::embedded::LaunchOptions {
                    fsync: false,
                    database: "postgres".into(),
                },
            )
            .unwrap()
        })
        .await
        .unwrap()
    };
    let pgdata = dir.join("postgres");
    let url = pg.connection_string_for("postgres");
    let mut config = aether::config::Config::defaults();
    config.ws_host = "127.0.0.1".into();
    config.ws_port = 0;
    config.jwt_secret = Some(SECRET.into());
    config.database_url = Some(url.clone());
    config.data_dir = dir.join("aether");
    let server = aether::server::Server::start(config).await.unwrap();
    let addr = server.addr;
    wait_healthy(addr).await;
    let sql = connect(&url).await;
    sql.batch_execute(
        "CREATE TABLE public.seq (n int8 PRIMARY KEY, body text);
         ALTER PUBLICATION aether_realtime ADD TABLE public.seq;
         INSERT INTO public.seq (n) SELECT i FROM generate_series(1, 100) i;",
    )
    .await
    .unwrap();
    let mut f = Follower {
        seen: Vec::new(),
        ids: Vec::new(),
        last_id: Some(
            // From the very start of the log.
            {
                let b = server.log.bounds();
                aether_core::lsn::StreamId {
                    position: b.floor,
                    epoch: b.epoch,
                }
                .to_string()
            },
        ),
    };
    assert!(f.follow(addr, 100).await);

    // How it was started, so `pg_ctl start` starts it the same way (port, settings).
    let opts = std::fs::read_to_string(pgdata.join("postmaster.opts")).unwrap();
    let opts = opts.trim().split_once(' ').unwrap().1.to_owned();
    // Caught up: a fast shutdown must not wait for Aether.
    let t = Instant::now();
    let out = pg_ctl(&pgdata, &["stop", "-m", "fast", "-w", "-t", "60"]);
    let took = t.elapsed();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        took < Duration::from_secs(5),
        "a fast shutdown took {took:?} with Aether connected"
    );
    println!("fast shutdown took {took:?}");
    // Down: /health says so.
    tokio::time::timeout(WAIT, async {
        while reqwest_lite(&format!("http://{addr}/health")).await.ok() != Some(503) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("/health is 503 while the database is down");
    let log = pgdata.join("restart.log");
    let out = pg_ctl(
        &pgdata,
        &[
            "start",
            "-w",
            "-t",
            "60",
            "-o",
            &opts,
            "-l",
            log.to_str().unwrap(),
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_healthy(addr).await;
    let sql = connect(&url).await;
    sql.batch_execute("INSERT INTO public.seq (n) SELECT i FROM generate_series(101, 200) i")
        .await
        .unwrap();
    assert!(f.follow(addr, 200).await);
    f.check(200);
    server.stop().await;
    let _ = pg_ctl(&pgdata, &["stop", "-m", "immediate"]);
    drop(pg);
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_slot_is_recreated_and_every_subscriber_is_told_gap() {
    let t = TestServer::start().await;
    t.exec(
        "CREATE TABLE public.seq (n int8 PRIMARY KEY);
         ALTER PUBLICATION aether_realtime ADD TABLE public.seq;",
    )
    .await;
    let mut ws = t.ws(Some(&service_token())).await;
    ws.subscribe("s", json!({"table": "seq"})).await;
    t.exec("INSERT INTO public.seq VALUES (1)").await;
    let old_id = ws.change().await["id"].as_str().unwrap().to_owned();
    let old_epoch = t.server.log.bounds().epoch;
    // Someone drops the slot: its walsender first, then the slot, before Aether
    // reconnects to it.
    tokio::time::timeout(WAIT, async {
        loop {
            let r = t
                .sql
                .batch_execute(&format!(
                    "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots
                      WHERE slot_name = '{0}' AND active_pid IS NOT NULL;
                     SELECT pg_drop_replication_slot('{0}');",
                    t.db.name
                ))
                .await;
            if r.is_ok() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("the slot is dropped");
    // Changes committed now are unknowable to Aether.
    t.exec("INSERT INTO public.seq VALUES (2)").await;
    let e = ws.next().await;
    assert_eq!(
        (
            e["type"].as_str(),
            e["code"].as_str(),
            e["subscription"].as_str()
        ),
        (Some("error"), Some("gap"), Some("s")),
        "{e}"
    );
    assert_ne!(t.server.log.bounds().epoch, old_epoch);
    // An id from before is a gap; a new subscription is live in the new epoch.
    wait_healthy(t.addr()).await;
    let mut again = t.ws(Some(&service_token())).await;
    again
        .send(json!({"type":"subscription","action":"subscribe","data":{"id":"r","table":"seq","since": old_id}}))
        .await;
    assert_eq!(again.next().await["code"], "gap");
    again.subscribe("live", json!({"table": "seq"})).await;
    t.exec("INSERT INTO public.seq VALUES (3)").await;
    let c = again.change().await;
    assert_eq!(c["new"]["n"], 3);
    assert!(
        c["id"]
            .as_str()
            .unwrap()
            .ends_with(&t.server.log.bounds().epoch.to_string())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_publication_is_a_definite_error_on_health_with_advice() {
    let t = TestServer::start().await;
    t.exec(
        "CREATE TABLE public.seq (n int8 PRIMARY KEY);
         ALTER PUBLICATION aether_realtime ADD TABLE public.seq;
         DROP PUBLICATION aether_realtime;
         INSERT INTO public.seq VALUES (1);",
    )
    .await;
    let url = format!("http://{}/health", t.addr());
    let body = tokio::time::timeout(WAIT, async {
        loop {
            let r = reqwest::get(&url).await.unwrap();
            if r.status() == 503 {
                return r.json::<Value>().await.unwrap();
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("/health turns 503");
    let reasons = body["reasons"].to_string();
    assert!(reasons.contains("publication"), "{body}");
    assert_eq!(body["status"], "unavailable");
    assert!(body["replication"]["advice"].is_string(), "{body}");
}
