//! `soak`: Aether killed and restarted at random moments under a steady writer,
//! with a follower that resumes with `since` after every restart.
//!
//! The orchestrator (this process) owns the kill schedule: the release `aether`
//! binary runs with a `DATA_DIR` of its own, is sent SIGKILL (mostly) or SIGTERM at
//! random moments (some while it is still starting), and is restarted on the same
//! port. The load process commits numbered rows into `public.soak`, one per
//! transaction, at a steady rate, straight to PostgreSQL (which stays up), and runs
//! the follower: one WebSocket subscription to `soak` that, whenever its connection
//! ends, polls `/health` and reconnects the moment it answers 200, subscribing with
//! `since` = the id of the last change it received. At the end every committed row
//! must have reached the follower exactly once, in commit order.
//!
//! The approach is `tests/durability.rs`'s, at soak size: tens of kills and tens of
//! thousands of rows instead of 7 and ~1,000, with the times measured.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use nix::sys::signal::Signal;
use serde_json::{Value, json};
use tokio::io::AsyncBufReadExt as _;
use tokio_tungstenite::tungstenite::Message;

use crate::RunArgs;
use crate::env::{self, Aether, Env, LoadProc};
use crate::load::log;
use crate::proc::now_us;
use crate::report::{f, group, int};
use crate::stats::summarize_us;

/// Commits per second of the writer.
const RATE: f64 = 1000.0;

/// A pseudo-random sequence, reproducible from the printed seed (the same
/// generator as tests/durability.rs).
struct Lcg(u64);

impl Lcg {
    fn next(&mut self, below: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        (self.0 >> 33) % below.max(1)
    }
}

/// One planned kill.
#[derive(Clone, Copy)]
struct Kill {
    signal: Signal,
    /// Lands while Aether is starting: a random moment after the spawn, without
    /// waiting for `/health`.
    early: bool,
}

/// The kill schedule: about one in six is a SIGTERM (at least two), the rest
/// SIGKILL; about one SIGKILL in six lands during start-up. Shuffled by `rng`.
fn schedule(kills: usize, rng: &mut Lcg) -> Vec<Kill> {
    let terms = (kills / 6).max(2).min(kills);
    let mut v: Vec<Kill> = (0..kills)
        .map(|i| Kill {
            signal: if i < terms {
                Signal::SIGTERM
            } else {
                Signal::SIGKILL
            },
            early: false,
        })
        .collect();
    for k in v.iter_mut().filter(|k| k.signal == Signal::SIGKILL) {
        k.early = rng.next(6) == 0;
    }
    for i in (1..v.len()).rev() {
        v.swap(i, rng.next(i as u64 + 1) as usize);
    }
    v
}

/// Polls `/health` every 5 ms until 200; the time it took.
async fn wait_healthy(addr: SocketAddr, within: Duration) -> anyhow::Result<Duration> {
    let t = Instant::now();
    loop {
        if env::http_status(addr, "/health").await.ok() == Some(200) {
            return Ok(t.elapsed());
        }
        anyhow::ensure!(
            t.elapsed() < within,
            "aether not healthy within {within:?} after a restart"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn us(d: Duration) -> i64 {
    d.as_micros() as i64
}

pub async fn run(env: &Env, args: &RunArgs) -> anyhow::Result<Value> {
    let quick = args.quick;
    let kills = args.kills.unwrap_or(if quick { 8 } else { 40 });
    let min_rows: i64 = if quick { 3_000 } else { 20_000 };
    let seed = args.seed.unwrap_or_else(|| now_us() as u64);
    println!("seed {seed} (`--seed {seed}` replays this kill schedule)");
    let mut rng = Lcg(seed);
    let plan = schedule(kills, &mut rng);

    env::seed(&env.db_url, 0, "k").await?;
    let sql = env::connect(&env.db_url).await?;
    sql.batch_execute(
        "CREATE TABLE public.soak (n int8 PRIMARY KEY, body text);
         ALTER PUBLICATION aether_realtime ADD TABLE public.soak;",
    )
    .await?;

    let port = env::free_port()?;
    let mut aether: Aether = env.spawn_aether(port, &[])?;
    let addr = aether.addr;
    let first_start = wait_healthy(addr, Duration::from_secs(60)).await?;
    let mut load = LoadProc::spawn(&json!({
        "mode": "soak",
        "server": addr,
        "token": Env::service_token(),
        "db": env.db_url,
        "rate": RATE,
    }))?;
    load.expect("READY").await?;
    let started = Instant::now();
    println!(
        "{kills} kills ({} SIGKILL, of which {} during start-up; {} SIGTERM), writer at {} commits/s",
        plan.iter().filter(|k| k.signal == Signal::SIGKILL).count(),
        plan.iter().filter(|k| k.early).count(),
        plan.iter().filter(|k| k.signal == Signal::SIGTERM).count(),
        RATE
    );

    // spawn -> /health 200, and signal -> /health 200 (what a client sees as down).
    let mut restart_to_healthy = Vec::new();
    let mut kill_to_healthy = Vec::new();
    let mut term_shutdown = Vec::new();
    let mut term_forced = 0;
    let mut early_while_healthy = 0;
    let mut events = Vec::new();
    for (i, k) in plan.iter().enumerate() {
        let was_healthy = if k.early {
            // A random moment of start-up (spawn to healthy is ~50-100 ms here).
            tokio::time::sleep(Duration::from_millis(rng.next(100))).await;
            env::http_status(addr, "/health").await.ok() == Some(200)
        } else {
            // Up for a while: 0.2 to 2.5 s of streaming.
            tokio::time::sleep(Duration::from_millis(200 + rng.next(2300))).await;
            true
        };
        if k.early && was_healthy {
            early_while_healthy += 1;
        }
        let (took, clean) = aether.signal_and_wait(k.signal, Duration::from_secs(30));
        let killed_at = Instant::now() - took;
        if k.signal == Signal::SIGTERM {
            term_shutdown.push(us(took));
            if !clean {
                term_forced += 1;
            }
        }
        // Down for a moment while rows keep coming.
        let down = rng.next(300);
        tokio::time::sleep(Duration::from_millis(down)).await;
        aether = env.spawn_aether(port, &[])?;
        let spawned = Instant::now();
        let next_early = plan.get(i + 1).is_some_and(|n| n.early);
        let healthy = if next_early {
            None
        } else {
            let t = wait_healthy(addr, Duration::from_secs(60)).await?;
            restart_to_healthy.push(us(t));
            kill_to_healthy.push(us(spawned.elapsed() + (spawned - killed_at)));
            Some(t)
        };
        events.push(json!({
            "signal": k.signal.as_str(),
            "early": k.early,
            "was_healthy": was_healthy,
            "exit_ms": took.as_secs_f64() * 1e3,
            "down_ms": down,
            "restart_to_healthy_ms": healthy.map(|t| t.as_secs_f64() * 1e3),
        }));
        if (i + 1) % 10 == 0 {
            eprintln!(
                "  {} kills done, {:.0} s",
                i + 1,
                started.elapsed().as_secs_f64()
            );
        }
    }
    // The last restart is healthy (the loop waited); keep writing to the minimum.
    loop {
        let n: i64 = sql
            .query_one("SELECT coalesce(max(n), 0) FROM public.soak", &[])
            .await?
            .get(0);
        if n >= min_rows {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    load.send("STOP").await?;
    let mut res = load.result().await?;
    let wall = started.elapsed().as_secs_f64();
    let mut log_size = env::changelog_size(addr).await;
    log_size["segment_file_bytes"] = json!(env::segment_bytes(&env.aether_data));
    let wal_retained: Option<i64> = sql
        .query_one(
            "SELECT (pg_current_wal_lsn() - confirmed_flush_lsn)::int8 FROM pg_replication_slots WHERE slot_name = $1",
            &[&env::SLOT],
        )
        .await?
        .get(0);
    drop(aether);
    let log_text = std::fs::read_to_string(env.dir.join("aether.log")).unwrap_or_default();
    let log_errors = log_text
        .lines()
        .filter(|l| l.contains("\"level\":\"ERROR\""))
        .count();
    let panics = log_text.lines().filter(|l| l.contains("panicked")).count();

    let restart = summarize_us(&mut restart_to_healthy);
    let down = summarize_us(&mut kill_to_healthy);
    let term = summarize_us(&mut term_shutdown);
    res["seed"] = json!(seed);
    res["kills"] = json!({
        "total": kills,
        "sigkill": plan.iter().filter(|k| k.signal == Signal::SIGKILL).count(),
        "sigkill_during_start_up": plan.iter().filter(|k| k.early).count(),
        "of_which_already_healthy": early_while_healthy,
        "sigterm": plan.iter().filter(|k| k.signal == Signal::SIGTERM).count(),
        "sigterm_needed_sigkill": term_forced,
    });
    res["first_start_to_healthy_ms"] = json!(first_start.as_secs_f64() * 1e3);
    res["restart_to_healthy_ms"] = json!(restart);
    res["kill_to_healthy_ms"] = json!(down);
    res["sigterm_exit_ms"] = json!(term);
    res["changelog_at_end"] = log_size;
    res["slot_wal_retained_bytes_at_end"] = json!(wal_retained);
    res["aether_log_error_lines"] = json!(log_errors);
    res["aether_panics"] = json!(panics);
    res["wall_s_from_first_kill_plan"] = json!(wall);
    res["events"] = json!(events);
    res["writer_rate"] = json!(RATE);

    let r = &res;
    let ok = ["lost", "duplicates", "order_reversals", "id_reversals"]
        .iter()
        .all(|k| r[*k].as_u64() == Some(0))
        && r["complete"] == json!(true);
    println!(
        "  written {} rows in {:.0} s ({} commits/s); follower received {}: lost {}, duplicates {}, order reversals {}, id reversals {}, error frames {} -> {}",
        int(&r["written"]),
        r["writer_s"].as_f64().unwrap_or(0.0),
        f(&r["writer_achieved_rate"], 0),
        int(&r["received"]),
        int(&r["lost"]),
        int(&r["duplicates"]),
        int(&r["order_reversals"]),
        int(&r["id_reversals"]),
        int(&r["error_frames"]),
        if ok { "OK" } else { "FAILED" }
    );
    println!(
        "  kills: {} SIGKILL ({} during start-up, {} of those already healthy), {} SIGTERM (exit p50 {:.0} ms, max {:.0} ms; {} needed SIGKILL)",
        res["kills"]["sigkill"],
        res["kills"]["sigkill_during_start_up"],
        early_while_healthy,
        res["kills"]["sigterm"],
        term.p50,
        term.max,
        term_forced
    );
    println!(
        "  restart (spawn) -> /health 200: p50 {:.0} ms, p95 {:.0}, max {:.0} ({} restarts; first start {:.0} ms); signal -> /health 200: p50 {:.0} ms, max {:.0}",
        restart.p50,
        restart.p95,
        restart.max,
        restart.count,
        first_start.as_secs_f64() * 1e3,
        down.p50,
        down.max
    );
    println!(
        "  follower: {} reconnects; /health 200 -> first change p50 {} ms, p95 {}, max {} ({} samples); connect+subscribe p50 {} ms",
        int(&r["reconnects"]),
        f(&r["reconnect_to_first_change_ms"]["p50"], 1),
        f(&r["reconnect_to_first_change_ms"]["p95"], 1),
        f(&r["reconnect_to_first_change_ms"]["max"], 1),
        int(&r["reconnect_to_first_change_ms"]["count"]),
        f(&r["connect_to_subscribed_ms"]["p50"], 1),
    );
    let seg = res["changelog_at_end"]["segment_file_bytes"]
        .as_f64()
        .unwrap_or(0.0);
    let per_row = seg / res["written"].as_f64().unwrap_or(0.0).max(1.0);
    res["changelog_at_end"]["segment_bytes_per_row"] = json!(per_row);
    println!(
        "  change log at the end: segment files {} bytes for {} rows ({per_row:.0} bytes per change); /ws/status: {} bytes, {} records; slot WAL retained {}; Aether log: {} ERROR lines, {} panics",
        group(seg as i64),
        int(&res["written"]),
        int(&res["changelog_at_end"]["bytes"]),
        int(&res["changelog_at_end"]["records"]),
        wal_retained.map_or("-".into(), group),
        log_errors,
        panics
    );
    Ok(res)
}

// ---------------------------------------------------------------------------
// The load side: writer and follower.

/// One reconnection of the follower, µs since the Unix epoch.
#[derive(Default, Clone)]
struct Attempt {
    /// `/health` answered 200.
    healthy: i64,
    /// WebSocket handshake done.
    connected: Option<i64>,
    /// The `subscribed` reply.
    subscribed: Option<i64>,
    first_change: Option<i64>,
}

#[derive(Default)]
struct Followed {
    seen: Vec<i64>,
    ids: Vec<String>,
    last_id: Option<String>,
    attempts: Vec<Attempt>,
    errors: Vec<String>,
}

type Ws = tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>;

async fn ws_connect(server: SocketAddr, token: &str) -> anyhow::Result<Ws> {
    let stream = tokio::net::TcpStream::connect(server).await?;
    stream.set_nodelay(true)?;
    let url = format!("ws://{server}/ws?token={token}");
    let (ws, _) = tokio_tungstenite::client_async(url, stream).await?;
    Ok(ws)
}

/// Follows `soak` until it has received `target` (set at the end) or `quit`.
async fn follow(
    server: SocketAddr,
    token: String,
    state: Arc<Mutex<Followed>>,
    target: Arc<AtomicI64>,
    ready: Arc<tokio::sync::Notify>,
    quit: Arc<AtomicBool>,
) {
    let mut first = true;
    while !quit.load(Ordering::Relaxed) {
        // Reconnect the moment the server is healthy.
        while env::http_status(server, "/health").await.ok() != Some(200) {
            if quit.load(Ordering::Relaxed) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let mut attempt = Attempt {
            healthy: now_us(),
            ..Attempt::default()
        };
        let ws = match ws_connect(server, &token).await {
            Ok(ws) => ws,
            Err(_) => {
                state.lock().unwrap().attempts.push(attempt);
                tokio::time::sleep(Duration::from_millis(5)).await;
                continue;
            }
        };
        attempt.connected = Some(now_us());
        let (mut sink, mut stream) = ws.split();
        let mut data = json!({"id": "s", "table": "soak"});
        if let Some(id) = state.lock().unwrap().last_id.clone() {
            data["since"] = json!(id);
        }
        let msg = json!({"type": "subscription", "action": "subscribe", "data": data});
        if sink
            .send(Message::Text(msg.to_string().into()))
            .await
            .is_err()
        {
            state.lock().unwrap().attempts.push(attempt);
            continue;
        }
        let mut tick = tokio::time::interval(Duration::from_millis(50));
        loop {
            let frame = tokio::select! {
                m = stream.next() => m,
                _ = tick.tick() => {
                    let st = state.lock().unwrap();
                    if st.seen.last().copied().unwrap_or(0) >= target.load(Ordering::Relaxed)
                        || quit.load(Ordering::Relaxed)
                    {
                        drop(st);
                        state.lock().unwrap().attempts.push(attempt);
                        return;
                    }
                    continue;
                }
            };
            let text = match frame {
                Some(Ok(Message::Text(t))) => t,
                Some(Ok(Message::Close(_))) | Some(Err(_)) | None => break,
                Some(Ok(_)) => continue,
            };
            let Ok(v) = serde_json::from_str::<Value>(text.as_str()) else {
                continue;
            };
            let mut st = state.lock().unwrap();
            match v["type"].as_str() {
                Some("change") => {
                    let (Some(n), Some(id)) = (v["new"]["n"].as_i64(), v["id"].as_str()) else {
                        continue;
                    };
                    attempt.first_change.get_or_insert_with(now_us);
                    st.seen.push(n);
                    st.ids.push(id.to_owned());
                    st.last_id = Some(id.to_owned());
                }
                Some("subscription") if v["action"] == "subscribed" => {
                    attempt.subscribed = Some(now_us());
                    // The first subscription starts at its reply's position.
                    if st.last_id.is_none() {
                        st.last_id = v["data"]["position"].as_str().map(str::to_owned);
                    }
                    if first {
                        first = false;
                        ready.notify_one();
                    }
                }
                Some("error") => st.errors.push(text.to_string()),
                _ => {}
            }
        }
        state.lock().unwrap().attempts.push(attempt);
    }
}

/// Commits numbered rows, one per transaction, at `rate` until `stop`; the last
/// number committed is in `written`.
async fn write(
    db: String,
    rate: f64,
    stop: Arc<AtomicBool>,
    written: Arc<AtomicI64>,
) -> anyhow::Result<(i64, f64)> {
    let c = env::connect(&db).await?;
    // The bench cluster's default is synchronous_commit=off: WAL would reach the
    // walsender only every wal_writer_delay. Commit flushes here (cheap: fsync=off).
    c.batch_execute("SET synchronous_commit = on").await?;
    let stmt = c
        .prepare("INSERT INTO public.soak (n, body) VALUES ($1, repeat('x', 100))")
        .await?;
    let start = Instant::now();
    let mut n = 0i64;
    while !stop.load(Ordering::Relaxed) {
        c.execute(&stmt, &[&(n + 1)]).await?;
        n += 1;
        written.store(n, Ordering::Relaxed);
        let due = Duration::from_secs_f64(n as f64 / rate);
        let now = start.elapsed();
        if due > now + Duration::from_millis(1) {
            tokio::time::sleep(due - now).await;
        }
    }
    Ok((n, start.elapsed().as_secs_f64()))
}

/// The load process's part: follower first, then the writer; `STOP` on stdin
/// ends the writing; the result once the follower has every row (or 120 s).
pub async fn load(
    server: SocketAddr,
    token: String,
    db: String,
    rate: f64,
) -> anyhow::Result<Value> {
    let state = Arc::new(Mutex::new(Followed::default()));
    let target = Arc::new(AtomicI64::new(i64::MAX));
    let ready = Arc::new(tokio::sync::Notify::new());
    let quit = Arc::new(AtomicBool::new(false));
    let follower = tokio::spawn(follow(
        server,
        token,
        Arc::clone(&state),
        Arc::clone(&target),
        Arc::clone(&ready),
        Arc::clone(&quit),
    ));
    tokio::time::timeout(Duration::from_secs(30), ready.notified())
        .await
        .map_err(|_| anyhow::anyhow!("the follower's first subscription was not confirmed"))?;
    let stop = Arc::new(AtomicBool::new(false));
    let written = Arc::new(AtomicI64::new(0));
    let writer = tokio::spawn(write(db, rate, Arc::clone(&stop), Arc::clone(&written)));
    crate::load::say("READY");

    let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    let mut progress = tokio::time::interval(Duration::from_secs(10));
    progress.tick().await;
    loop {
        tokio::select! {
            l = lines.next_line() => match l {
                Ok(Some(l)) if l.trim() == "STOP" => break,
                Ok(Some(_)) => {}
                _ => break,
            },
            _ = progress.tick() => {
                let st = state.lock().unwrap();
                log(format!(
                    "written {}, follower has {}, {} connections",
                    written.load(Ordering::Relaxed),
                    st.seen.len(),
                    st.attempts.len() + 1
                ));
            }
        }
    }
    stop.store(true, Ordering::Relaxed);
    let (n, writer_s) = writer.await??;
    target.store(n, Ordering::Relaxed);
    let caught_up = tokio::time::timeout(Duration::from_secs(120), async {
        loop {
            if state.lock().unwrap().seen.last().copied().unwrap_or(0) >= n {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .is_ok();
    quit.store(true, Ordering::Relaxed);
    let _ = tokio::time::timeout(Duration::from_secs(5), follower).await;

    let st = state.lock().unwrap();
    let upto: Vec<i64> = st.seen.iter().copied().filter(|x| *x <= n).collect();
    let order_reversals = st.seen.windows(2).filter(|w| w[1] <= w[0]).count();
    let id_reversals = st.ids.windows(2).filter(|w| w[1] <= w[0]).count();
    let mut sorted = upto.clone();
    sorted.sort_unstable();
    let before = sorted.len();
    sorted.dedup();
    let duplicates = before - sorted.len();
    let lost = n as usize - sorted.len();
    // The first connection needs no reconnect; every later one does.
    let reconnects: Vec<&Attempt> = st.attempts.iter().skip(1).collect();
    let mut to_first: Vec<i64> = reconnects
        .iter()
        .filter_map(|a| a.first_change.map(|c| c - a.healthy))
        .collect();
    let mut to_subscribed: Vec<i64> = st
        .attempts
        .iter()
        .filter_map(|a| a.subscribed.map(|s| s - a.healthy))
        .collect();
    let failed = reconnects.iter().filter(|a| a.connected.is_none()).count();
    let cut_before_first = reconnects
        .iter()
        .filter(|a| a.connected.is_some() && a.first_change.is_none())
        .count();
    Ok(json!({
        "written": n,
        "writer_s": writer_s,
        "writer_achieved_rate": n as f64 / writer_s.max(1e-9),
        "complete": caught_up,
        "received": st.seen.len(),
        "lost": lost,
        "duplicates": duplicates,
        "order_reversals": order_reversals,
        "id_reversals": id_reversals,
        "error_frames": st.errors.len(),
        "first_errors": st.errors.iter().take(5).collect::<Vec<_>>(),
        "reconnects": reconnects.len(),
        "reconnects_refused": failed,
        "reconnects_cut_before_a_change": cut_before_first,
        "reconnect_to_first_change_ms": summarize_us(&mut to_first),
        "connect_to_subscribed_ms": summarize_us(&mut to_subscribed),
    }))
}
