//! `cluster`: three Aether nodes (`NATS_URL`) on one PostgreSQL and one real
//! nats-server with JetStream (`aether_changelog::natsd`, the test harness's
//! pinned release), as in `tests/cluster.rs`.
//!
//! Three measurements, in this order:
//!
//! 1. **The leader's CPU per change with 1 node and with 3 nodes.** A steady
//!    commit rate with a few subscribers on every node, the same number on the
//!    leader in each step; each node's, NATS's and PostgreSQL's CPU over the step
//!    from `/proc`. Steps: the leader alone, three nodes, the leader alone again
//!    (the followers stopped), so a drift of the box between steps shows.
//! 2. **Fan-out across nodes.** Subscribers spread evenly over the three nodes,
//!    all on `files`; one change at a time; the time from the INSERT's send to
//!    the last subscriber of all nodes having it, and nothing lost.
//! 3. **Leader failover.** A writer commits a numbered row every 50 ms, one
//!    subscriber per node; the leader (read from `/ws/status`) is SIGKILLed; the
//!    time from the kill to the first row committed after it reaching a
//!    subscriber on a surviving node. The killed node is restarted as a standby
//!    and its subscriber reconnects; repeated. Every subscription's stream is
//!    checked for gaps, duplicates and reorders.
//!
//! Every process is started by this one (the nodes and the load process die
//! with it; nats-server and PostgreSQL are stopped when their owners drop,
//! error paths included).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use futures_util::{SinkExt as _, StreamExt as _};
use nix::sys::signal::Signal;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::io::AsyncBufReadExt as _;
use tokio_tungstenite::tungstenite::Message;

use aether_changelog::natsd::NatsServer;

use crate::RunArgs;
use crate::env::{self, Aether, Env, LoadProc};
use crate::load::{self, Shared, Tracker, Writer, log, say};
use crate::proc::{cpu_seconds, now_us, rss_kib, tree_cpu_seconds};
use crate::report::{f, group, int, table};
use crate::stats::summarize_us;

const NAMES: [&str; 3] = ["n1", "n2", "n3"];
/// The leader-CPU steps' commit rate.
const CPU_RATE: f64 = 500.0;
/// Subscribers per node in the leader-CPU steps.
const CPU_SUBS_PER_NODE: usize = 3;
/// The reference step's slot (a node without NATS, its own local change log).
const LOCAL_SLOT: &str = "aether_local";
/// The failover writer's pace.
const FAILOVER_INTERVAL_MS: u64 = 50;

// ---------------------------------------------------------------------------
// The nodes

struct Node {
    name: &'static str,
    port: u16,
    proc: Option<Aether>,
}

/// Three nodes on fixed ports (a restarted node comes back on its own); a node
/// that is not running has no process. Dropping this stops the running ones.
struct Nodes<'a> {
    env: &'a Env,
    nats_url: String,
    nodes: Vec<Node>,
}

impl<'a> Nodes<'a> {
    fn new(env: &'a Env, nats_url: String) -> anyhow::Result<Nodes<'a>> {
        let nodes = NAMES
            .iter()
            .map(|&name| {
                Ok(Node {
                    name,
                    port: env::free_port()?,
                    proc: None,
                })
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        Ok(Nodes {
            env,
            nats_url,
            nodes,
        })
    }

    /// Starts node `i` and waits for its `/health` 200 (the leader: replication
    /// streaming; a standby: reading the stream); returns how long that took.
    async fn start(&mut self, i: usize) -> anyhow::Result<Duration> {
        let t = Instant::now();
        let name = self.nodes[i].name;
        let extra = [
            ("NATS_URL", self.nats_url.clone()),
            ("NODE_NAME", name.to_owned()),
            (
                "DATA_DIR",
                self.env
                    .dir
                    .join(format!("data-{name}"))
                    .display()
                    .to_string(),
            ),
        ];
        let a = self.env.spawn_aether_logged(
            self.nodes[i].port,
            &format!("aether-{name}.log"),
            &extra,
        )?;
        a.wait_listening(Duration::from_secs(60))?;
        let healthy = a.wait_healthy().await;
        // Kept even when unhealthy, so it is stopped with the others.
        self.nodes[i].proc = Some(a);
        healthy?;
        Ok(t.elapsed())
    }

    /// SIGKILL; returns the moment the signal was sent (µs since the epoch).
    fn sigkill(&mut self, i: usize) -> i64 {
        let at = now_us();
        if let Some(mut a) = self.nodes[i].proc.take() {
            a.signal_and_wait(Signal::SIGKILL, Duration::from_secs(10));
        }
        at
    }

    /// SIGTERM and wait (the process's own shutdown).
    fn stop(&mut self, i: usize) {
        if let Some(mut a) = self.nodes[i].proc.take() {
            a.stop();
        }
    }

    fn addr(&self, i: usize) -> SocketAddr {
        ([127, 0, 0, 1], self.nodes[i].port).into()
    }

    fn pid(&self, i: usize) -> Option<u32> {
        self.nodes[i].proc.as_ref().map(|a| a.pid)
    }

    /// (name, address, pid) of the running nodes, `leader` first.
    fn targets(&self, leader: usize) -> Vec<(String, SocketAddr, u32)> {
        let mut order = vec![leader];
        order.extend(self.running().into_iter().filter(|&i| i != leader));
        order
            .into_iter()
            .map(|i| {
                (
                    self.nodes[i].name.to_owned(),
                    self.addr(i),
                    self.pid(i).unwrap_or(0),
                )
            })
            .collect()
    }

    fn running(&self) -> Vec<usize> {
        (0..self.nodes.len())
            .filter(|&i| self.nodes[i].proc.is_some())
            .collect()
    }

    /// Waits until a running node's `/ws/status` lists exactly the running nodes
    /// and one of them as the leader; returns the leader's index.
    async fn wait_members(&self, within: Duration) -> anyhow::Result<usize> {
        let running = self.running();
        let want: Vec<&str> = running.iter().map(|&i| self.nodes[i].name).collect();
        let first = *running.first().context("no node is running")?;
        let deadline = Instant::now() + within;
        loop {
            let s = env::ws_status(self.addr(first)).await;
            let c = &s["cluster"];
            let nodes: Vec<&str> = c["nodes"]
                .as_array()
                .map(|a| a.iter().filter_map(Value::as_str).collect())
                .unwrap_or_default();
            if nodes == want
                && let Some(l) = c["leader"]
                    .as_str()
                    .and_then(|l| NAMES.iter().position(|n| *n == l))
                && running.contains(&l)
            {
                return Ok(l);
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "the cluster did not settle on members {want:?} with a leader within {within:?}: {}",
                s["cluster"]
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

// ---------------------------------------------------------------------------
// The orchestrator

pub async fn run(env: &Env, args: &RunArgs) -> anyhow::Result<Value> {
    let quick = args.quick;
    let owner = env::seed(&env.db_url, 1, "c").await?.to_string();
    // Blocking, and panics on a broken setup: on a thread of its own.
    let nats = tokio::task::spawn_blocking(NatsServer::start)
        .await
        .context("starting nats-server (aether_changelog::natsd)")?;
    let nats_pid = crate::proc::child_named(std::process::id(), "nats-server");
    let nats_bin = aether_changelog::natsd::binary();
    println!(
        "nats-server {} ({}), JetStream store in a temporary directory; 3 nodes n1, n2, n3",
        nats.url(),
        nats_bin.display()
    );
    // Declared after `nats`: dropped (stopped) before it.
    let mut nodes = Nodes::new(env, nats.url())?;

    // 1. The leader's CPU per change: 1 node, 3 nodes, 1 node again; first the
    //    reference, one node without NATS (its local change log, a slot of its own).
    let step = CpuStep {
        env,
        owner: &owner,
        nats_pid,
        seconds: if quick { 5.0 } else { 10.0 },
    };
    let seconds = step.seconds;
    let mut cpu_rows = Vec::new();
    let mut primes = Vec::new();
    {
        let local = env.start_aether(&[
            ("REPLICATION_SLOT", LOCAL_SLOT.to_owned()),
            ("DATA_DIR", env.dir.join("data-local").display().to_string()),
        ])?;
        local.wait_healthy().await?;
        primes.push(prime(env, &owner, "local", local.addr).await?);
        let target = [("local".to_owned(), local.addr, local.pid)];
        cpu_rows.push(step.run(&target, "1 node, no NATS", 500_000).await?);
    }
    env::connect(&env.db_url)
        .await?
        .execute("SELECT pg_drop_replication_slot($1)", &[&LOCAL_SLOT])
        .await?;
    nodes.start(0).await?;
    let leader = nodes.wait_members(Duration::from_secs(60)).await?;
    primes.push(prime(env, &owner, NAMES[leader], nodes.addr(leader)).await?);
    cpu_rows.push(
        step.run(&nodes.targets(leader), "1 node", 1_000_000)
            .await?,
    );
    nodes.start(1).await?;
    nodes.start(2).await?;
    let leader = nodes.wait_members(Duration::from_secs(60)).await?;
    cpu_rows.push(
        step.run(&nodes.targets(leader), "3 nodes", 2_000_000)
            .await?,
    );
    let followers: Vec<usize> = (0..3).filter(|&i| i != leader).collect();
    for &i in &followers {
        nodes.stop(i);
    }
    let leader = nodes.wait_members(Duration::from_secs(60)).await?;
    cpu_rows.push(
        step.run(&nodes.targets(leader), "1 node again", 3_000_000)
            .await?,
    );
    print_cpu(&cpu_rows, seconds);
    for p in &primes {
        println!(
            "  first change on a fresh log ({}): a subscriber made when /health first answered 200 got {} gap frame(s) before a change arrived ({} ms, {} row(s) committed)",
            p["node"].as_str().unwrap_or("-"),
            p["gaps"],
            f(&p["ms"], 0),
            p["rows"]
        );
    }

    // 2. Fan-out across the three nodes.
    for &i in &followers {
        nodes.start(i).await?;
    }
    let leader = nodes.wait_members(Duration::from_secs(60)).await?;
    let per_node = if quick { 100 } else { 1_000 };
    let changes = if quick { 10 } else { 30 };
    let spec = FanOutSpec {
        servers: (0..3).map(|i| nodes.addr(i)).collect(),
        names: NAMES.iter().map(|n| (*n).to_owned()).collect(),
        pids: (0..3).map(|i| nodes.pid(i).unwrap_or(0)).collect(),
        leader: NAMES[leader].to_owned(),
        token: Env::service_token(),
        db: env.db_url.clone(),
        owner: owner.clone(),
        per_node,
        source_ips: 10,
        rate: 1.0,
        changes,
        seq_base: 9_000_000,
    };
    let mut load = LoadProc::spawn(&serde_json::to_value(load::Spec::ClusterFanOut(spec))?)?;
    let fan_out = load.result().await?;
    print_fan_out(&fan_out);

    // 3. Leader failover.
    let rounds = if quick { 1 } else { 3 };
    let failover = failover(env, &mut nodes, &owner, rounds).await?;

    drop(nodes);
    drop(nats);
    Ok(json!({
        "nodes": 3,
        "nats_server": nats_bin,
        "leader_cpu": {
            "rate": CPU_RATE,
            "seconds": seconds,
            "subscribers_per_node": CPU_SUBS_PER_NODE,
            "rows": cpu_rows,
            "first_change": primes,
        },
        "fan_out": fan_out,
        "failover": failover,
    }))
}

/// What the leader-CPU steps share.
struct CpuStep<'a> {
    env: &'a Env,
    owner: &'a str,
    nats_pid: Option<u32>,
    seconds: f64,
}

impl CpuStep<'_> {
    /// One step on `targets` (name, address, pid; the leader first); rows are
    /// numbered from `seq_base`.
    async fn run(
        &self,
        targets: &[(String, SocketAddr, u32)],
        label: &str,
        seq_base: u64,
    ) -> anyhow::Result<Value> {
        println!("leader CPU: {label} ({CPU_RATE}/s for {} s)", self.seconds);
        let spec = CpuSpec {
            label: label.to_owned(),
            servers: targets.iter().map(|t| t.1).collect(),
            names: targets.iter().map(|t| t.0.clone()).collect(),
            pids: targets.iter().map(|t| t.2).collect(),
            nats_pid: self.nats_pid,
            pg_pid: self.env.pg_pid(),
            token: Env::service_token(),
            db: self.env.db_url.clone(),
            owner: self.owner.to_owned(),
            subs_per_node: CPU_SUBS_PER_NODE,
            rate: CPU_RATE,
            seconds: self.seconds,
            warmup_s: 1.0,
            seq_base,
        };
        let mut load = LoadProc::spawn(&serde_json::to_value(load::Spec::ClusterCpu(spec))?)?;
        load.result().await
    }
}

fn print_cpu(values: &[Value], seconds: f64) {
    println!(
        "each node's CPU (/proc/<pid>/stat utime+stime) over {seconds} s of one-row commits at {CPU_RATE}/s, \
         {CPU_SUBS_PER_NODE} subscribers on `files` per node, ÷ changes committed (µs per change):"
    );
    let rows: Vec<Vec<String>> = values
        .iter()
        .map(|r| {
            let others: Vec<String> = r["node_cpu_us_per_change"]
                .as_array()
                .into_iter()
                .flatten()
                .skip(1)
                .map(|v| f(v, 1))
                .collect();
            vec![
                r["label"].as_str().unwrap_or("-").to_owned(),
                r["names"][0].as_str().unwrap_or("-").to_owned(),
                int(&r["write"]["achieved_rate"]),
                int(&r["write"]["sent"]),
                f(&r["leader_cpu_us_per_change"], 1),
                if others.is_empty() {
                    "-".into()
                } else {
                    others.join(" / ")
                },
                f(&r["nats_cpu_us_per_change"], 1),
                f(&r["postgres_cpu_us_per_change"], 1),
                format!("{} / {}", int(&r["delivered"]), int(&r["expected"])),
                f(&r["last_subscriber_ms"]["p50"], 2),
                f(&r["last_subscriber_ms"]["p99"], 2),
            ]
        })
        .collect();
    table(
        &[
            "step",
            "leader",
            "commits/s",
            "changes",
            "leader µs/change",
            "followers µs/change",
            "nats µs/change",
            "postgres µs/change",
            "delivered",
            "last p50 ms",
            "last p99 ms",
        ],
        &rows,
    );
    println!(
        "  ('1 node, no NATS' = the same binary without NATS_URL: its local change log and a slot of its own, \
         the reference for what cluster mode adds per change; nats and postgres columns: their CPU over the step \
         ÷ changes, the writer's backends included in postgres; last p50/p99 = INSERT sent -> the last subscriber has it)"
    );
    for r in values {
        if r["write"]["errors"].as_u64().unwrap_or(0) > 0
            || r["incomplete_changes"].as_u64().unwrap_or(0) > 0
            || !r["error"].is_null()
        {
            println!(
                "  {}: {} write errors, {} changes short of {} deliveries (delivered per node {}), first error {}, first frames {}",
                r["label"].as_str().unwrap_or("-"),
                r["write"]["errors"],
                r["incomplete_changes"],
                r["subscribers_per_node"].as_u64().unwrap_or(0) * r["nodes"].as_u64().unwrap_or(0),
                r["node_delivered"],
                r["error"],
                r["notes"]
            );
        }
    }
}

fn print_fan_out(r: &Value) {
    println!(
        "fan-out: {} subscribers ({} per node) on `files`, {} changes at {}/s; connected and subscribed in {} s; \
         time from the INSERT's send until the last subscriber has the change (ms):",
        int(&r["connections"]),
        int(&r["per_node"]),
        int(&r["write"]["sent"]),
        f(&r["write"]["target_rate"], 0),
        f(&r["connect_s"], 1)
    );
    let mut rows: Vec<Vec<String>> = r["nodes"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|n| {
            vec![
                format!(
                    "{}{}",
                    n["name"].as_str().unwrap_or("-"),
                    if n["leader"] == json!(true) {
                        " (leader)"
                    } else {
                        ""
                    }
                ),
                int(&n["subscribers"]),
                f(&n["first_subscriber_ms"]["p50"], 1),
                f(&n["last_subscriber_ms"]["p50"], 1),
                f(&n["last_subscriber_ms"]["p99"], 1),
                f(&n["last_subscriber_ms"]["max"], 1),
                int(&n["incomplete_changes"]),
                format!("{} / {}", int(&n["deliveries"]), int(&n["expected"])),
                f(&n["cores"], 2),
                f(&n["rss_mib"], 0),
            ]
        })
        .collect();
    let a = &r["all"];
    rows.push(vec![
        "all nodes".into(),
        int(&r["connections"]),
        f(&a["first_subscriber_ms"]["p50"], 1),
        f(&a["last_subscriber_ms"]["p50"], 1),
        f(&a["last_subscriber_ms"]["p99"], 1),
        f(&a["last_subscriber_ms"]["max"], 1),
        int(&a["incomplete_changes"]),
        format!("{} / {}", int(&a["deliveries"]), int(&a["expected"])),
        f(&r["load_cores"], 2),
        "-".into(),
    ]);
    table(
        &[
            "node",
            "subscribers",
            "first p50",
            "last p50",
            "last p99",
            "last max",
            "incomplete",
            "delivered",
            "cores",
            "RSS MiB",
        ],
        &rows,
    );
    println!(
        "  (the 'all nodes' row's cores are the load process's; lost deliveries: {}; closed connections: {}; \
         last subscriber since the Commit message's time (whole ms): p50 {} ms, p99 {} ms)",
        int(&a["lost"]),
        int(&r["closed"]),
        f(&a["since_commit_ms"]["p50"], 1),
        f(&a["since_commit_ms"]["p99"], 1)
    );
    if r["write"]["errors"].as_u64().unwrap_or(0) > 0 || !r["error"].is_null() {
        println!(
            "  {} write errors; first error frame {}; first frames per node {}",
            r["write"]["errors"], r["error"], r["notes"]
        );
    }
}

/// Subscribes to `files` on a node whose log is brand new (a new slot) and commits
/// a row until one arrives. A fresh cluster stream answers a subscription made
/// before its first change with `gap` ("the change log was reset") once the
/// leader starts the slot's epoch, so the measured steps subscribe after this.
/// Returns the gap frames seen, the time it took and the rows committed.
async fn prime(env: &Env, owner: &str, node: &str, addr: SocketAddr) -> anyhow::Result<Value> {
    let sql = env::connect(&env.db_url).await?;
    sql.batch_execute("SET synchronous_commit = on").await?;
    let folder = env::folder_ids(&sql, "c", 1).await?[0];
    let owner: uuid::Uuid = owner.parse()?;
    let token = Env::service_token();
    let t = Instant::now();
    let mut gaps = 0;
    for attempt in 1..=10u32 {
        let (mut sink, mut stream) = ws_connect(addr, &token).await?.split();
        sink.send(load::subscribe_frame("prime", None)).await?;
        let mut subscribed = false;
        let mut committed = false;
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            let Ok(Some(Ok(Message::Text(text)))) =
                tokio::time::timeout(Duration::from_millis(200), stream.next()).await
            else {
                continue;
            };
            let text = text.as_str();
            if text.starts_with("{\"type\":\"change\"") {
                return Ok(json!({
                    "node": node,
                    "gaps": gaps,
                    "ms": t.elapsed().as_secs_f64() * 1e3,
                    "rows": attempt,
                }));
            } else if text.contains("\"code\":\"gap\"") {
                gaps += 1;
                break;
            } else if text.contains("\"action\":\"subscribed\"") {
                subscribed = true;
            }
            if subscribed && !committed {
                let path = format!("prime-{node}-{attempt}-{}", now_us());
                sql.execute(
                    "INSERT INTO public.files (bucket_id, folder_id, path, name, size, owner_id)
                     VALUES ('bench', $1, $2, $2, 0, $3)",
                    &[&folder, &path, &owner],
                )
                .await?;
                committed = true;
            }
        }
        let _ = sink.close().await;
    }
    anyhow::bail!("no change reached a subscriber on {node} after 10 rows ({gaps} gap frames)")
}

/// Polls a surviving node's `/ws/status` until a leader other than `killed` is
/// listed; its name and the time since `kill_us` (ms).
async fn new_leader(addr: SocketAddr, killed: &str, kill_us: i64) -> Option<(String, f64)> {
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        let s = env::ws_status(addr).await;
        if let Some(l) = s["cluster"]["leader"].as_str()
            && l != killed
        {
            return Some((l.to_owned(), (now_us() - kill_us) as f64 / 1e3));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    None
}

async fn failover(
    env: &Env,
    nodes: &mut Nodes<'_>,
    owner: &str,
    rounds: usize,
) -> anyhow::Result<Value> {
    let spec = FailoverSpec {
        servers: (0..3).map(|i| nodes.addr(i)).collect(),
        names: NAMES.iter().map(|n| (*n).to_owned()).collect(),
        token: Env::service_token(),
        db: env.db_url.clone(),
        owner: owner.to_owned(),
        interval_ms: FAILOVER_INTERVAL_MS,
    };
    let mut load = LoadProc::spawn(&serde_json::to_value(load::Spec::ClusterFailover(spec))?)?;
    load.expect("READY").await?;
    let mut results = Vec::new();
    for round in 1..=rounds {
        // Steady streaming first.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let leader = nodes.wait_members(Duration::from_secs(60)).await?;
        let survivor = (leader + 1) % 3;
        let killed = NAMES[leader];
        println!("failover {round}/{rounds}: SIGKILL the leader {killed}");
        let kill_us = nodes.sigkill(leader);
        load.send(&format!("KILLED {kill_us} {leader}")).await?;
        let (elected, delivered) = tokio::join!(
            new_leader(nodes.addr(survivor), killed, kill_us),
            load.expect("DELIVERED")
        );
        let mut r: Value = serde_json::from_str(&delivered?)?;
        r["round"] = json!(round);
        r["killed"] = json!(killed);
        r["new_leader"] = json!(elected.as_ref().map(|e| e.0.clone()));
        r["new_leader_listed_ms"] = json!(elected.as_ref().map(|e| e.1));
        // The killed node comes back as a standby; its subscriber reconnects.
        let restart = nodes.start(leader).await?;
        let now_leader = nodes.wait_members(Duration::from_secs(60)).await?;
        r["restarted_to_healthy_ms"] = json!(restart.as_secs_f64() * 1e3);
        r["restarted_as_standby"] = json!(now_leader != leader);
        load.send(&format!("RESTARTED {leader}")).await?;
        load.expect("READY").await?;
        println!(
            "  new leader {} listed after {} ms; first row committed after the kill (sent +{} ms) delivered on a survivor after {} ms, on both after {} ms",
            r["new_leader"].as_str().unwrap_or("none"),
            f(&r["new_leader_listed_ms"], 0),
            f(&r["first_after_kill"]["sent_after_kill_ms"], 0),
            f(&r["first_after_kill"]["first_survivor_ms"], 0),
            f(&r["first_after_kill"]["all_survivors_ms"], 0),
        );
        results.push(r);
    }
    load.send("STOP").await?;
    let mut res = load.result().await?;
    print_failover(&results, &res);
    let mut times: Vec<i64> = results
        .iter()
        .filter_map(|r| r["first_after_kill"]["first_survivor_ms"].as_f64())
        .map(|ms| (ms * 1e3) as i64)
        .collect();
    res["kill_to_first_delivery_ms"] = json!(summarize_us(&mut times));
    res["rounds"] = json!(results);
    Ok(res)
}

fn print_failover(rounds: &[Value], res: &Value) {
    println!(
        "failover: a writer commits a row every {FAILOVER_INTERVAL_MS} ms, one subscriber per node; \
         the leader SIGKILLed; times from the kill (ms):"
    );
    let rows: Vec<Vec<String>> = rounds
        .iter()
        .map(|r| {
            let a = &r["first_after_kill"];
            vec![
                int(&r["round"]),
                r["killed"].as_str().unwrap_or("-").to_owned(),
                r["new_leader"].as_str().unwrap_or("none").to_owned(),
                f(&r["new_leader_listed_ms"], 0),
                f(&a["sent_after_kill_ms"], 0),
                f(&a["first_survivor_ms"], 0),
                f(&a["all_survivors_ms"], 0),
                f(&r["last_before_kill"]["first_survivor_ms"], 0),
                int(&r["rows_committed_before_delivery"]),
                f(&r["restarted_to_healthy_ms"], 0),
                if r["restarted_as_standby"] == json!(true) {
                    "yes"
                } else {
                    "NO"
                }
                .into(),
            ]
        })
        .collect();
    table(
        &[
            "round",
            "killed",
            "new leader",
            "leader listed",
            "first row after kill sent",
            "delivered (first survivor)",
            "delivered (both survivors)",
            "last row before kill delivered",
            "rows waiting",
            "killed node restart -> healthy",
            "standby",
        ],
        &rows,
    );
    println!(
        "  {} rows written in {} s; {} subscriptions (sessions) received {} frames: lost {}, duplicates {}, reorders {}, error frames {}",
        int(&res["written"]),
        f(&res["writer_s"], 1),
        int(&res["sessions"]),
        group(res["deliveries"].as_i64().unwrap_or(0)),
        int(&res["lost"]),
        int(&res["duplicates"]),
        int(&res["reorders"]),
        int(&res["error_frames"]),
    );
}

// ---------------------------------------------------------------------------
// The load side

#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct CpuSpec {
    label: String,
    /// The leader first.
    servers: Vec<SocketAddr>,
    names: Vec<String>,
    pids: Vec<u32>,
    nats_pid: Option<u32>,
    pg_pid: Option<u32>,
    token: String,
    db: String,
    owner: String,
    subs_per_node: usize,
    rate: f64,
    seconds: f64,
    warmup_s: f64,
    /// The first row number (`s<n>`): paths are unique, each step writes its own.
    seq_base: u64,
}

#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct FanOutSpec {
    servers: Vec<SocketAddr>,
    names: Vec<String>,
    pids: Vec<u32>,
    leader: String,
    token: String,
    db: String,
    owner: String,
    per_node: usize,
    source_ips: u8,
    rate: f64,
    changes: u64,
    seq_base: u64,
}

#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct FailoverSpec {
    servers: Vec<SocketAddr>,
    names: Vec<String>,
    token: String,
    db: String,
    owner: String,
    interval_ms: u64,
}

/// Opens `per_node` connections to each server (one `Shared` per node) and
/// subscribes each to `files`.
async fn subscribe_all(
    servers: &[SocketAddr],
    token: &str,
    per_node: usize,
    source_ips: u8,
) -> anyhow::Result<(Vec<Arc<Shared>>, Vec<load::Sink>)> {
    let shared: Vec<Arc<Shared>> = servers.iter().map(|_| Arc::default()).collect();
    let mut sinks = Vec::new();
    for (k, server) in servers.iter().enumerate() {
        let mut v = load::open_many(*server, token, per_node, source_ips, &shared[k]).await?;
        for (i, sink) in v.iter_mut().enumerate() {
            sink.send(load::subscribe_frame(&format!("c{k}-{i}"), None))
                .await?;
        }
        sinks.extend(v);
    }
    for sh in &shared {
        load::wait_subscribed(sh, per_node as u64, Duration::from_secs(120)).await?;
    }
    Ok((shared, sinks))
}

/// The step's tracker of each node's subscribers.
fn trackers(shared: &[Arc<Shared>]) -> anyhow::Result<Vec<Arc<Tracker>>> {
    shared
        .iter()
        .map(|s| s.tracker.read().unwrap().clone().context("no tracker"))
        .collect()
}

/// Deliveries of changes `0..n` over all nodes' trackers.
struct Merged {
    /// Send to the last subscriber of any node, µs.
    last: Vec<i64>,
    first: Vec<i64>,
    /// The last subscriber minus the Commit message's time (whole ms), µs.
    since_commit: Vec<i64>,
    /// Changes with fewer than `per_change` deliveries.
    short: usize,
    deliveries: u64,
}

fn merged(trackers: &[Arc<Tracker>], n: usize, per_change: u32) -> Merged {
    let mut m = Merged {
        last: Vec::with_capacity(n),
        first: Vec::with_capacity(n),
        since_commit: Vec::with_capacity(n),
        short: 0,
        deliveries: trackers
            .iter()
            .map(|t| t.deliveries.load(Ordering::Relaxed))
            .sum(),
    };
    for i in 0..n {
        let Some(sent) = trackers.first().map(|t| t.sent[i].load(Ordering::Relaxed)) else {
            break;
        };
        let count: u32 = trackers
            .iter()
            .map(|t| t.count[i].load(Ordering::Relaxed))
            .sum();
        if count < per_change {
            m.short += 1;
        }
        if count == 0 {
            continue;
        }
        let last = trackers
            .iter()
            .map(|t| t.last[i].load(Ordering::Relaxed))
            .max()
            .unwrap_or(0);
        let first = trackers
            .iter()
            .map(|t| t.first[i].load(Ordering::Relaxed))
            .min()
            .unwrap_or(0);
        m.last.push(last - sent);
        m.first.push(first - sent);
        if let Some(ms) = trackers
            .iter()
            .map(|t| t.commit_ms[i].load(Ordering::Relaxed))
            .find(|&ms| ms > 0)
        {
            m.since_commit.push(last - ms * 1000);
        }
    }
    m
}

/// Each node's first non-change frames (subscription replies, errors).
fn notes(shared: &[Arc<Shared>]) -> Vec<Vec<String>> {
    shared
        .iter()
        .map(|x| x.notes.lock().map(|v| v.clone()).unwrap_or_default())
        .collect()
}

fn cpus(pids: &[u32]) -> Vec<f64> {
    pids.iter()
        .map(|&p| cpu_seconds(p).unwrap_or(f64::NAN))
        .collect()
}

pub async fn cpu_load(s: CpuSpec) -> anyhow::Result<Value> {
    let folder = load::folders(&s.db, "c", 1).await?[0];
    let (shared, mut sinks) = subscribe_all(&s.servers, &s.token, s.subs_per_node, 0).await?;
    let mut writer = Writer::new(&s.db, 4, &s.owner).await?;
    writer.mirrors = shared[1..].to_vec();
    writer.next_seq = s.seq_base;
    log(format!("cluster {}: warm-up", s.label));
    writer
        .run(&shared[0], s.rate, s.warmup_s, |_| folder)
        .await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    log(format!(
        "cluster {}: {}/s for {} s",
        s.label, s.rate, s.seconds
    ));
    let me = std::process::id();
    let nodes0 = cpus(&s.pids);
    let nats0 = s.nats_pid.and_then(cpu_seconds);
    let pg0 = s.pg_pid.and_then(tree_cpu_seconds);
    let me0 = cpu_seconds(me);
    let t = Instant::now();
    let (_, write) = writer
        .run(&shared[0], s.rate, s.seconds, |_| folder)
        .await?;
    let trackers = trackers(&shared)?;
    for tr in &trackers {
        load::drain(
            tr,
            write.sent * s.subs_per_node as u64,
            Duration::from_secs(5),
        )
        .await;
    }
    let elapsed = t.elapsed().as_secs_f64();
    let nodes1 = cpus(&s.pids);
    let n = write.sent.max(1) as f64;
    let per_change = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) => Some((b - a) * 1e6 / n),
        _ => None,
    };
    let node_us: Vec<f64> = nodes0
        .iter()
        .zip(&nodes1)
        .map(|(a, b)| (b - a) * 1e6 / n)
        .collect();
    let node_cores: Vec<f64> = nodes0
        .iter()
        .zip(&nodes1)
        .map(|(a, b)| (b - a) / elapsed)
        .collect();
    let nats_us = per_change(nats0, s.nats_pid.and_then(cpu_seconds));
    let pg_us = per_change(pg0, s.pg_pid.and_then(tree_cpu_seconds));
    let load_us = per_change(me0, cpu_seconds(me));
    let total_subs = s.subs_per_node * s.servers.len();
    let mut m = merged(&trackers, write.sent as usize, total_subs as u32);
    let closed: u64 = shared
        .iter()
        .map(|x| x.closed.load(Ordering::Relaxed))
        .sum();
    let error = shared.iter().find_map(|x| x.error_text());
    let notes = notes(&shared);
    for mut sink in sinks.drain(..) {
        let _ = sink.close().await;
    }
    Ok(json!({
        "label": s.label,
        "nodes": s.servers.len(),
        "names": s.names,
        "subscribers_per_node": s.subs_per_node,
        "write": write,
        "seconds_with_drain": elapsed,
        "leader_cpu_us_per_change": node_us.first(),
        "node_cpu_us_per_change": node_us,
        "node_cores": node_cores,
        "nats_cpu_us_per_change": nats_us,
        "postgres_cpu_us_per_change": pg_us,
        "load_cpu_us_per_change": load_us,
        "delivered": m.deliveries,
        "node_delivered": trackers.iter().map(|t| t.deliveries.load(Ordering::Relaxed)).collect::<Vec<_>>(),
        "expected": write.sent * total_subs as u64,
        "incomplete_changes": m.short,
        "last_subscriber_ms": summarize_us(&mut m.last),
        "closed": closed,
        "error": error,
        "notes": notes,
    }))
}

pub async fn fan_out_load(s: FanOutSpec) -> anyhow::Result<Value> {
    let folder = load::folders(&s.db, "c", 1).await?[0];
    let nodes = s.servers.len();
    log(format!(
        "cluster fan-out: {} connections on each of {nodes} nodes",
        s.per_node
    ));
    let t0 = Instant::now();
    let (shared, mut sinks) = subscribe_all(&s.servers, &s.token, s.per_node, s.source_ips).await?;
    let connect_s = t0.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut writer = Writer::new(&s.db, 1, &s.owner).await?;
    writer.mirrors = shared[1..].to_vec();
    writer.next_seq = s.seq_base;
    log(format!(
        "cluster fan-out: {} changes at {}/s",
        s.changes, s.rate
    ));
    let me = std::process::id();
    let cpu0 = cpus(&s.pids);
    let me0 = cpu_seconds(me).unwrap_or(0.0);
    let t = Instant::now();
    let (_, write) = writer
        .run(&shared[0], s.rate, s.changes as f64 / s.rate, |_| folder)
        .await?;
    let trackers = trackers(&shared)?;
    for tr in &trackers {
        load::drain(tr, write.sent * s.per_node as u64, Duration::from_secs(10)).await;
    }
    let elapsed = t.elapsed().as_secs_f64();
    let cpu1 = cpus(&s.pids);
    let load_cores = (cpu_seconds(me).unwrap_or(0.0) - me0) / elapsed;
    let sent = write.sent as usize;
    let per_node: Vec<Value> = (0..nodes)
        .map(|k| {
            let (mut last, mut first, short) = trackers[k].latencies(sent, 0, s.per_node as u32);
            json!({
                "name": s.names[k],
                "leader": s.names[k] == s.leader,
                "subscribers": s.per_node,
                "last_subscriber_ms": summarize_us(&mut last),
                "first_subscriber_ms": summarize_us(&mut first),
                "incomplete_changes": short,
                "deliveries": trackers[k].deliveries.load(Ordering::Relaxed),
                "expected": write.sent * s.per_node as u64,
                "cores": (cpu1[k] - cpu0[k]) / elapsed,
                "rss_mib": rss_kib(s.pids[k]).unwrap_or(0) as f64 / 1024.0,
                "closed": shared[k].closed.load(Ordering::Relaxed),
            })
        })
        .collect();
    let connections = s.per_node * nodes;
    let mut m = merged(&trackers, sent, connections as u32);
    let expected = write.sent * connections as u64;
    let closed: u64 = shared
        .iter()
        .map(|x| x.closed.load(Ordering::Relaxed))
        .sum();
    let error = shared.iter().find_map(|x| x.error_text());
    let notes = notes(&shared);
    for mut sink in sinks.drain(..) {
        let _ = sink.close().await;
    }
    Ok(json!({
        "connections": connections,
        "per_node": s.per_node,
        "source_ips": s.source_ips,
        "connect_s": connect_s,
        "write": write,
        "nodes": per_node,
        "all": {
            "last_subscriber_ms": summarize_us(&mut m.last),
            "first_subscriber_ms": summarize_us(&mut m.first),
            "since_commit_ms": summarize_us(&mut m.since_commit),
            "incomplete_changes": m.short,
            "deliveries": m.deliveries,
            "expected": expected,
            "lost": expected.saturating_sub(m.deliveries),
        },
        "load_cores": load_cores,
        "closed": closed,
        "error": error,
        "notes": notes,
    }))
}

// ---------------------------------------------------------------------------
// The load side of failover: a steady writer and one subscriber per node

/// What one node's subscriber received.
#[derive(Default)]
struct NodeSub {
    /// Per WebSocket session: (row number, receive time µs).
    sessions: Vec<Vec<(u64, i64)>>,
    /// Each row's first receive time on this node.
    first_recv: HashMap<u64, i64>,
    /// Sessions whose subscription was confirmed.
    subscribed: u64,
    /// The current session is subscribed and open.
    live: bool,
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

/// Subscribes to `files` on `server` and records the `k<n>` rows; when the
/// connection ends, waits for `/health` 200 and subscribes again.
async fn follow_node(
    server: SocketAddr,
    token: String,
    state: Arc<Mutex<NodeSub>>,
    quit: Arc<AtomicBool>,
) {
    while !quit.load(Ordering::Relaxed) {
        if env::http_status(server, "/health").await.ok() != Some(200) {
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        }
        let Ok(ws) = ws_connect(server, &token).await else {
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        };
        let (mut sink, mut stream) = ws.split();
        if sink.send(load::subscribe_frame("k", None)).await.is_err() {
            continue;
        }
        state.lock().unwrap().sessions.push(Vec::new());
        loop {
            let frame = tokio::select! {
                m = stream.next() => m,
                _ = tokio::time::sleep(Duration::from_millis(100)) => {
                    if quit.load(Ordering::Relaxed) {
                        break;
                    }
                    continue;
                }
            };
            let text = match frame {
                Some(Ok(Message::Text(t))) => t,
                Some(Ok(Message::Close(_))) | Some(Err(_)) | None => break,
                Some(Ok(_)) => continue,
            };
            let text = text.as_str();
            let mut st = state.lock().unwrap();
            if text.starts_with("{\"type\":\"change\"") {
                if let Some(n) = load::field_i64(text, "\"path\":\"k") {
                    let recv = now_us();
                    let n = n as u64;
                    if let Some(s) = st.sessions.last_mut() {
                        s.push((n, recv));
                    }
                    st.first_recv.entry(n).or_insert(recv);
                }
            } else if text.contains("\"action\":\"subscribed\"") {
                st.subscribed += 1;
                st.live = true;
            } else if text.contains("\"type\":\"error\"") {
                st.errors.push(text.to_owned());
            }
        }
        state.lock().unwrap().live = false;
    }
}

/// Commits row `k<n>` every `interval` until `stop`; (send, commit acknowledged)
/// times of row n at index n - 1.
async fn steady_writer(
    db: String,
    owner: uuid::Uuid,
    folder: uuid::Uuid,
    interval: Duration,
    rows: Arc<Mutex<Vec<(i64, i64)>>>,
    stop: Arc<AtomicBool>,
) -> anyhow::Result<f64> {
    let c = env::connect(&db).await?;
    // Commit flushes WAL (the bench cluster defaults to synchronous_commit=off).
    c.batch_execute("SET synchronous_commit = on").await?;
    let stmt = c
        .prepare(
            "INSERT INTO public.files (bucket_id, folder_id, path, name, size, owner_id)
             VALUES ('bench', $1, $2, $2, $3, $4)",
        )
        .await?;
    let start = Instant::now();
    let mut n = 0u32;
    while !stop.load(Ordering::Relaxed) {
        n += 1;
        let path = format!("k{n}");
        let sent = now_us();
        c.execute(&stmt, &[&folder, &path, &sent, &owner]).await?;
        let acked = now_us();
        rows.lock().unwrap().push((sent, acked));
        let due = interval * n;
        let now = start.elapsed();
        if due > now {
            tokio::time::sleep(due - now).await;
        }
    }
    Ok(start.elapsed().as_secs_f64())
}

/// Waits for the first row sent after `kill_us` to reach every surviving node;
/// the times, ms from the kill.
async fn after_kill(
    kill_us: i64,
    killed: usize,
    rows: &Mutex<Vec<(i64, i64)>>,
    subs: &[Arc<Mutex<NodeSub>>],
    names: &[String],
) -> Value {
    let survivors: Vec<usize> = (0..subs.len()).filter(|&k| k != killed).collect();
    let ms = |us: i64| (us - kill_us) as f64 / 1e3;
    let deadline = Instant::now() + Duration::from_secs(60);
    // The last row whose commit was acknowledged before the kill.
    let last_before = rows
        .lock()
        .unwrap()
        .iter()
        .rposition(|&(_, acked)| acked < kill_us)
        .map(|i| i as u64 + 1);
    loop {
        let first_after = {
            let r = rows.lock().unwrap();
            r.iter()
                .position(|&(sent, _)| sent >= kill_us)
                .map(|i| (i as u64 + 1, r[i]))
        };
        let recv = |n: u64| -> Vec<Option<i64>> {
            survivors
                .iter()
                .map(|&k| subs[k].lock().unwrap().first_recv.get(&n).copied())
                .collect()
        };
        let timed_out = Instant::now() > deadline;
        if let Some((n, (sent, acked))) = first_after {
            let got = recv(n);
            if got.iter().all(Option::is_some) || timed_out {
                let times: Vec<i64> = got.iter().flatten().copied().collect();
                let first = times.iter().min().copied();
                let all = if times.len() == got.len() {
                    times.iter().max().copied()
                } else {
                    None
                };
                let waiting = first.map(|f| {
                    rows.lock()
                        .unwrap()
                        .iter()
                        .filter(|&&(s, _)| s >= kill_us && s <= f)
                        .count()
                });
                let before = last_before.map(|b| {
                    let t: Vec<i64> = recv(b).into_iter().flatten().collect();
                    json!({
                        "row": b,
                        "first_survivor_ms": t.iter().min().map(|&x| ms(x)),
                    })
                });
                return json!({
                    "first_after_kill": {
                        "row": n,
                        "sent_after_kill_ms": ms(sent),
                        "acked_after_kill_ms": ms(acked),
                        "first_survivor_ms": first.map(ms),
                        "all_survivors_ms": all.map(ms),
                        "commit_acked_to_first_delivery_ms": first.map(|f| (f - acked) as f64 / 1e3),
                        "per_survivor_ms": survivors.iter().zip(&got)
                            .map(|(&k, t)| (names[k].clone(), json!(t.map(ms))))
                            .collect::<serde_json::Map<_, _>>(),
                    },
                    "last_before_kill": before,
                    "rows_committed_before_delivery": waiting,
                    "timed_out": timed_out,
                });
            }
        } else if timed_out {
            return json!({"timed_out": true, "error": "no row was committed after the kill"});
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

pub async fn failover_load(s: FailoverSpec) -> anyhow::Result<Value> {
    let folder = load::folders(&s.db, "c", 1).await?[0];
    let owner: uuid::Uuid = s.owner.parse()?;
    let quit = Arc::new(AtomicBool::new(false));
    let subs: Vec<Arc<Mutex<NodeSub>>> = s.servers.iter().map(|_| Arc::default()).collect();
    let mut followers = Vec::new();
    for (k, server) in s.servers.iter().enumerate() {
        followers.push(tokio::spawn(follow_node(
            *server,
            s.token.clone(),
            Arc::clone(&subs[k]),
            Arc::clone(&quit),
        )));
    }
    let subscribed = |k: usize| subs[k].lock().unwrap().subscribed;
    let wait = |k: usize, above: u64| {
        let subs = &subs;
        async move {
            let deadline = Instant::now() + Duration::from_secs(60);
            loop {
                {
                    let st = subs[k].lock().unwrap();
                    if st.subscribed > above && st.live {
                        return Ok(());
                    }
                }
                anyhow::ensure!(
                    Instant::now() < deadline,
                    "node {k}'s subscription not confirmed"
                );
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    };
    for k in 0..subs.len() {
        wait(k, 0).await?;
    }
    let rows: Arc<Mutex<Vec<(i64, i64)>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let writer = tokio::spawn(steady_writer(
        s.db.clone(),
        owner,
        folder,
        Duration::from_millis(s.interval_ms),
        Arc::clone(&rows),
        Arc::clone(&stop),
    ));
    say("READY");
    let mut at_kill: HashMap<usize, u64> = HashMap::new();
    let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    while let Some(line) = lines.next_line().await? {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["KILLED", kill_us, idx] => {
                let (kill_us, idx): (i64, usize) = (kill_us.parse()?, idx.parse()?);
                at_kill.insert(idx, subscribed(idx));
                let r = after_kill(kill_us, idx, &rows, &subs, &s.names).await;
                say(&format!("DELIVERED {r}"));
            }
            ["RESTARTED", idx] => {
                let idx: usize = idx.parse()?;
                wait(idx, at_kill.get(&idx).copied().unwrap_or(0)).await?;
                say("READY");
            }
            ["STOP"] => break,
            _ => {}
        }
    }
    stop.store(true, Ordering::Relaxed);
    let writer_s = writer.await??;
    let written = rows.lock().unwrap().len() as u64;
    // Every open subscription gets the last row (or 30 s pass).
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        let done = subs.iter().all(|x| {
            let st = x.lock().unwrap();
            !st.live
                || st
                    .sessions
                    .last()
                    .and_then(|v| v.iter().map(|r| r.0).max())
                    .unwrap_or(0)
                    >= written
        });
        if done {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let live_at_end: Vec<bool> = subs.iter().map(|x| x.lock().unwrap().live).collect();
    quit.store(true, Ordering::Relaxed);
    for h in followers {
        let _ = tokio::time::timeout(Duration::from_secs(5), h).await;
    }
    // Each session must be gapless from its first row on, in order, once each;
    // a session still open at the end must reach the last row written.
    let (mut lost, mut duplicates, mut reorders, mut sessions, mut deliveries, mut errors) =
        (0u64, 0u64, 0u64, 0u64, 0u64, 0usize);
    let mut per_node = Vec::new();
    for (k, x) in subs.iter().enumerate() {
        let st = x.lock().unwrap();
        errors += st.errors.len();
        let mut node_lost = 0;
        for (j, sess) in st.sessions.iter().enumerate() {
            sessions += 1;
            deliveries += sess.len() as u64;
            reorders += sess.windows(2).filter(|w| w[1].0 <= w[0].0).count() as u64;
            let mut v: Vec<u64> = sess.iter().map(|r| r.0).collect();
            v.sort_unstable();
            let all = v.len();
            v.dedup();
            duplicates += (all - v.len()) as u64;
            if let (Some(&lo), Some(&hi)) = (v.first(), v.last()) {
                node_lost += hi - lo + 1 - v.len() as u64;
                // Open until the bench quit, not ended by the server: the tail counts.
                if j + 1 == st.sessions.len() && live_at_end[k] {
                    node_lost += written.saturating_sub(hi);
                }
            }
        }
        lost += node_lost;
        per_node.push(json!({
            "name": s.names[k],
            "sessions": st.sessions.len(),
            "rows_received": st.sessions.iter().map(Vec::len).sum::<usize>(),
            "lost": node_lost,
        }));
    }
    Ok(json!({
        "interval_ms": s.interval_ms,
        "written": written,
        "writer_s": writer_s,
        "sessions": sessions,
        "deliveries": deliveries,
        "lost": lost,
        "duplicates": duplicates,
        "reorders": reorders,
        "error_frames": errors,
        "first_errors": subs.iter().flat_map(|x| x.lock().unwrap().errors.iter().take(3).cloned().collect::<Vec<_>>()).collect::<Vec<_>>(),
        "per_node": per_node,
    }))
}
