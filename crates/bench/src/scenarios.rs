//! The scenarios, orchestrated: cluster, Aether process, reference, load process.

use std::time::{Duration, Instant};

use anyhow::Context as _;
use serde_json::{Value, json};

use crate::RunArgs;
use crate::env::{self, Aether, Env, LoadProc};
use crate::proc::{cpu_seconds, now_us};
use crate::report::{f, group, int, merge_json, table};

pub fn run(name: &str, args: &RunArgs) -> anyhow::Result<()> {
    println!("== {name}{} ==", if args.quick { " (--quick)" } else { "" });
    let started = Instant::now();
    let result = {
        let env = Env::new(args, name)?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        rt.block_on(async {
            match name {
                "catch-up" => catch_up(&env, args).await,
                "live-latency" => live_latency(&env, args.quick).await,
                "fan-out" => fan_out(&env, args.quick, &args.rates, args.seconds).await,
                "filtered-routing" => filtered_routing(&env, args.quick).await,
                "big-tx" => big_tx(&env, args).await,
                "decode" => decode(&env, args.quick).await,
                "rest" => rest(&env, args.quick).await,
                "soak" => crate::soak::run(&env, args).await,
                "cluster" => crate::cluster::run(&env, args).await,
                "row-security" => crate::row_security::run(&env, args.quick).await,
                other => anyhow::bail!("unknown scenario {other}"),
            }
        })
    };
    let mut result = result?;
    result["quick"] = json!(args.quick);
    result["wall_s"] = json!(started.elapsed().as_secs_f64());
    result["machine"] = machine();
    result["commit"] = commit();
    if let Some(b) = &args.aether_bin {
        result["aether_bin"] = json!(b);
    }
    println!("json: {}", serde_json::to_string(&result)?);
    if let Some(path) = &args.json {
        merge_json(path, name, &result)?;
    }
    println!();
    Ok(())
}

/// The commit of the working tree the bench runs in (`-dirty` with local changes
/// to tracked files).
fn commit() -> Value {
    let git = |args: &[&str]| {
        std::process::Command::new("git")
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
    };
    match git(&["rev-parse", "--short", "HEAD"]) {
        Some(c) => {
            let dirty = git(&["status", "--porcelain", "--untracked-files=no"])
                .is_some_and(|s| !s.is_empty());
            json!(if dirty { format!("{c}-dirty") } else { c })
        }
        None => Value::Null,
    }
}

fn machine() -> Value {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_owned())
        })
        .unwrap_or_default();
    let mem_kib: u64 = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .next()
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0);
    json!({
        "cpu": cpu,
        "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "mem_gib": (mem_kib as f64 / 1048576.0).round(),
        "kernel": std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim(),
    })
}

async fn started_aether(env: &Env, extra: &[(&str, String)]) -> anyhow::Result<Aether> {
    let a = env.start_aether(extra)?;
    a.wait_healthy().await?;
    Ok(a)
}

// ---------------------------------------------------------------------------
// catch-up

/// The backlog: `txs` transactions of 1,000 rows, then `singles` one-row
/// transactions; both 70% INSERT, 20% UPDATE, 10% DELETE of `public.files` rows.
/// A big transaction updates and deletes rows it inserted itself; the one-row
/// transactions update and delete rows inserted by earlier one-row transactions.
/// Rows are found by primary key (the ids the INSERTs returned): an earlier version
/// looked them up by path and slowed down as the table grew.
fn backlog_sql(owner: &uuid::Uuid, folder: &uuid::Uuid, txs: u64, singles: u64) -> String {
    format!(
        r#"
DO $$
DECLARE n bigint := 0; ids uuid[]; live uuid[] := '{{}}'; d int := 1; v uuid;
BEGIN
  FOR t IN 1..{txs} LOOP
    WITH ins AS (
      INSERT INTO public.files (bucket_id, folder_id, path, name, size, mime_type, owner_id, metadata)
        SELECT 'bench', '{folder}', 'a' || i, 'file-' || i || '.txt', i, 'text/plain', '{owner}',
               '{{"source":"bench","tags":["a","b"]}}'::jsonb
          FROM generate_series(n, n + 699) i
        RETURNING id)
    SELECT array_agg(id) INTO ids FROM ins;
    DELETE FROM public.files WHERE id = ANY (ids[1:100]);
    UPDATE public.files SET size = size + 1 WHERE id = ANY (ids[101:300]);
    n := n + 700;
    COMMIT;
  END LOOP;
  FOR t IN 0..{singles} - 1 LOOP
    IF t % 10 < 7 THEN
      INSERT INTO public.files (bucket_id, folder_id, path, name, size, mime_type, owner_id, metadata)
        VALUES ('bench', '{folder}', 'a' || n, 'file-' || n || '.txt', n, 'text/plain', '{owner}',
                '{{"source":"bench","tags":["a","b"]}}'::jsonb)
        RETURNING id INTO v;
      live := live || v;
      n := n + 1;
    ELSIF t % 10 < 9 THEN
      UPDATE public.files SET size = size + 1 WHERE id = live[d + 1 + t % 10 - 7];
    ELSE
      DELETE FROM public.files WHERE id = live[d];
      d := d + 1;
    END IF;
    COMMIT;
  END LOOP;
END $$;
"#
    )
}

struct Recv {
    /// Spawn to the first byte of output.
    first_s: f64,
    /// Spawn to the last byte of output: when the client had the last message.
    wall_s: f64,
    /// Spawn to exit (includes noticing `--endpos` and closing).
    exit_s: f64,
    cpu_s: f64,
}

/// Drains `slot` with pg_recvlogical up to `endpos`, its output read from a pipe.
fn pg_recvlogical(env: &Env, slot: &str, endpos: &str) -> anyhow::Result<Recv> {
    use std::io::Read as _;
    let bin = Env::bin_dir()?.join("pg_recvlogical");
    let start = Instant::now();
    let mut child = std::process::Command::new(&bin)
        .args(["-h", "127.0.0.1", "-p", &env.pg.port().to_string()])
        .args([
            "-U",
            "postgres",
            "-d",
            env::DATABASE,
            "--slot",
            slot,
            "--start",
        ])
        .args([
            "-o",
            "proto_version=1",
            "-o",
            "publication_names=aether_realtime",
        ])
        .args(["--endpos", endpos, "--no-loop", "-f", "-"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .with_context(|| format!("running {}", bin.display()))?;
    let mut out = child.stdout.take().context("pg_recvlogical stdout")?;
    let reader = std::thread::spawn(move || {
        let mut buf = vec![0u8; 256 * 1024];
        let (mut first, mut last) = (None, start);
        while let Ok(n) = out.read(&mut buf) {
            if n == 0 {
                break;
            }
            last = Instant::now();
            first.get_or_insert(last);
        }
        (first.unwrap_or(start), last)
    });
    let pid = child.id() as libc::pid_t;
    let mut status = 0;
    // SAFETY: rusage is plain data; wait4 reaps our own child.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let r = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    let exit_s = start.elapsed().as_secs_f64();
    let (first, last) = reader.join().unwrap_or((start, start));
    anyhow::ensure!(r == pid, "wait4 failed");
    anyhow::ensure!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "pg_recvlogical failed (status {status})"
    );
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    Ok(Recv {
        first_s: first.duration_since(start).as_secs_f64(),
        wall_s: last.duration_since(start).as_secs_f64(),
        exit_s,
        cpu_s: tv(usage.ru_utime) + tv(usage.ru_stime),
    })
}

async fn catch_up(env: &Env, args: &RunArgs) -> anyhow::Result<Value> {
    let quick = args.quick;
    let (metrics_port, settings) = args.aether_settings()?;
    let (txs, singles) = if quick {
        (100, 10_000)
    } else {
        (1_000, 100_000)
    };
    let txs = args.catch_up_txs.unwrap_or(txs);
    let expected = txs * 1_000 + singles;
    let owner = env::seed(&env.db_url, 1, "c").await?;
    let sql = env::connect(&env.db_url).await?;
    let folder = env::folder_ids(&sql, "c", 1).await?[0];
    // First start: migrations and the slot; the twin slot at the same point.
    let mut aether = started_aether(env, &[]).await?;
    // Twin slots at the same point: pg_recvlogical drains one before Aether runs and
    // the other after, so a drift of the machine during the run shows.
    sql.batch_execute(
        "SELECT pg_create_logical_replication_slot('twin', 'pgoutput');
         SELECT pg_create_logical_replication_slot('twin_after', 'pgoutput')",
    )
    .await?;
    aether.stop();
    drop(aether);

    println!(
        "committing the backlog: {txs} x 1,000-row transactions + {singles} one-row transactions (70/20/10 insert/update/delete)"
    );
    let t = Instant::now();
    // PL/pgSQL keeps the first plan of each statement, made while the table was
    // empty (a sequential scan): make the UPDATE/DELETE of the backlog use the index.
    sql.batch_execute("SET synchronous_commit = off; SET enable_seqscan = off")
        .await?;
    sql.batch_execute(&backlog_sql(&owner, &folder, txs, singles))
        .await?;
    let endpos: String = sql
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await?
        .get(0);
    let wal_mb: f64 = sql
        .query_one(
            "SELECT (pg_current_wal_lsn() - confirmed_flush_lsn)::float8 / 1048576
               FROM pg_replication_slots WHERE slot_name = 'twin'",
            &[],
        )
        .await?
        .get(0);
    println!(
        "  committed in {:.1} s, {wal_mb:.0} MiB of WAL",
        t.elapsed().as_secs_f64()
    );

    // Reference: pg_recvlogical with pgoutput, twin slot.
    let recv = pg_recvlogical(env, "twin", &endpos)?;
    println!(
        "  pg_recvlogical (before): {:.2} s, {} events/s",
        recv.wall_s,
        group((expected as f64 / recv.wall_s) as i64)
    );

    // Aether: restart while the slot is held, subscribe, then let it read the slot.
    let hold = env.hold_slot(env::SLOT).await?;
    let aether = env.start_aether(&settings)?;
    let rss_start = crate::proc::rss_kib(aether.pid).unwrap_or(0) as f64 / 1024.0;
    let mut load = LoadProc::spawn(&json!({
        "mode": "catch-up",
        "server": aether.addr,
        "token": Env::service_token(),
        "expected": expected,
        "timeout_s": 900,
    }))?;
    load.expect("READY").await?;
    let cpu0 = cpu_seconds(aether.pid).unwrap_or(0.0);
    let holder = hold.pid;
    drop(hold);
    // Aether retries with backoff; its walsender taking the slot starts the clock.
    let t0 = loop {
        let row = sql
            .query_one(
                "SELECT active_pid FROM pg_replication_slots WHERE slot_name = $1",
                &[&env::SLOT],
            )
            .await?;
        let pid: Option<i32> = row.get(0);
        if pid.is_some_and(|p| p != holder) {
            break now_us();
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    };
    let done: i64 = load.expect("DONE").await?.parse()?;
    let cpu1 = cpu_seconds(aether.pid).unwrap_or(0.0);
    let res = load.result().await?;
    let rss = crate::proc::hwm_kib(aether.pid).unwrap_or(0) as f64 / 1024.0;
    let rss_end = crate::proc::rss_kib(aether.pid).unwrap_or(0) as f64 / 1024.0;
    let mut log_size = env::changelog_size(aether.addr).await;
    let seg = env::segment_bytes(&env.aether_data);
    log_size["segment_file_bytes"] = json!(seg);
    log_size["segment_bytes_per_event"] = json!(seg as f64 / expected as f64);
    let metrics = match metrics_port {
        Some(p) => {
            // The tail gauge is set on the router's 500 ms tick.
            tokio::time::sleep(Duration::from_millis(600)).await;
            env::scrape_log_metrics(p).await
        }
        None => Value::Null,
    };
    drop(aether);
    let recv2 = pg_recvlogical(env, "twin_after", &endpos)?;
    println!(
        "  pg_recvlogical (after): {:.2} s, {} events/s",
        recv2.wall_s,
        group((expected as f64 / recv2.wall_s) as i64)
    );
    // The reference: the mean of the two drains' times.
    let recv_s = (recv.wall_s + recv2.wall_s) / 2.0;
    let recv_cpu = (recv.cpu_s + recv2.cpu_s) / 2.0;
    let recv_rate = expected as f64 / recv_s;
    let aether_s = (done - t0) as f64 / 1e6;
    let received = res["received"].as_u64().unwrap_or(0);
    let complete = res["complete"].as_bool().unwrap_or(false);
    let aether_rate = received as f64 / aether_s;
    let cpu = cpu1 - cpu0;
    let ratio = aether_rate / recv_rate;
    table(
        &[
            "client",
            "events",
            "seconds",
            "events/s",
            "client CPU s",
            "CPU s / M events",
        ],
        &[
            vec![
                "pg_recvlogical (mean of 2)".into(),
                group(expected as i64),
                format!("{recv_s:.2}"),
                group(recv_rate as i64),
                format!("{recv_cpu:.2}"),
                format!("{:.2}", recv_cpu * 1e6 / expected as f64),
            ],
            vec![
                "aether -> 1 subscriber".into(),
                group(received as i64),
                format!("{aether_s:.2}"),
                group(aether_rate as i64),
                format!("{cpu:.2}"),
                format!("{:.2}", cpu * 1e6 / received.max(1) as f64),
            ],
        ],
    );
    if !complete {
        println!(
            "  INCOMPLETE: {received} of {expected} events ({}); stream: {}; Aether log {}",
            res["error"],
            res["stream"],
            env.dir.join("aether.log").display()
        );
    }
    println!("ratio: {ratio:.3}");
    print_log_costs(&log_size, &metrics, aether_s, received, rss_start, rss_end);
    Ok(json!({
        "transactions_1000_rows": txs,
        "one_row_transactions": singles,
        "events": expected,
        "wal_mib": wal_mb,
        "pg_recvlogical": {
            "seconds": recv_s,
            "events_per_s": recv_rate,
            "cpu_s": recv_cpu,
            "runs_s": [recv.wall_s, recv2.wall_s],
            "runs_exit_s": [recv.exit_s, recv2.exit_s],
        },
        "aether": {
            "seconds": aether_s,
            "events_per_s": aether_rate,
            "received": received,
            "complete": complete,
            "cpu_s": cpu,
            "cpu_s_per_million": cpu * 1e6 / received.max(1) as f64,
            "peak_rss_mib": rss,
            "rss_start_mib": rss_start,
            "rss_end_mib": rss_end,
            "error": res["error"],
            "stream": res["stream"],
        },
        "ratio": ratio,
        "ws_queue_capacity": args.ws_queue_capacity,
        "aether_settings": settings_json(&settings),
        "aether_data_dir": env.aether_data,
        "changelog": log_size,
        "metrics": metrics,
    }))
}

fn settings_json(settings: &[(&str, String)]) -> Value {
    Value::Object(
        settings
            .iter()
            .map(|(k, v)| ((*k).to_owned(), json!(v)))
            .collect(),
    )
}

/// The change log's size on disk and, with `--metrics`, its append and fsync
/// costs and the hot tail's size.
fn print_log_costs(
    log_size: &Value,
    metrics: &Value,
    run_s: f64,
    events: u64,
    rss_start: f64,
    rss_end: f64,
) {
    println!(
        "  change log (/ws/status): {} bytes, {} records: {} bytes on disk per change; segment files {} bytes / {} events = {} bytes per event",
        int(&log_size["bytes"]),
        int(&log_size["records"]),
        f(&log_size["bytes_per_record"], 0),
        int(&log_size["segment_file_bytes"]),
        group(events as i64),
        f(&log_size["segment_bytes_per_event"], 0)
    );
    if metrics.is_null() {
        return;
    }
    for (k, name) in [
        ("append", "append (write into the page cache)"),
        ("fsync", "fsync"),
    ] {
        let m = &metrics[k];
        println!(
            "  {name}: {} calls, {} s in all ({:.1}% of the run, {:.2} s per million events); per call p50 {} µs, p99 {} µs, max {} µs, mean {} µs",
            int(&m["count"]),
            f(&m["sum_s"], 3),
            m["sum_s"].as_f64().unwrap_or(0.0) / run_s.max(1e-9) * 100.0,
            m["sum_s"].as_f64().unwrap_or(0.0) * 1e6 / events.max(1) as f64,
            f(&m["p50_us"], 0),
            f(&m["p99_us"], 0),
            f(&m["max_us"], 0),
            f(&m["mean_us"], 0),
        );
    }
    println!(
        "  hot tail: {} MiB (aether_router_tail_bytes, the router's estimate); Aether RSS {rss_start:.1} MiB at start, {rss_end:.1} MiB at the end",
        f(
            &json!(metrics["tail_bytes"].as_f64().unwrap_or(0.0) / 1048576.0),
            1
        )
    );
}

// ---------------------------------------------------------------------------
// live-latency

async fn live_latency(env: &Env, quick: bool) -> anyhow::Result<Value> {
    let owner = env::seed(&env.db_url, 1000, "l").await?;
    let aether = started_aether(env, &[]).await?;
    let mut load = LoadProc::spawn(&json!({
        "mode": "latency",
        "server": aether.addr,
        "token": Env::service_token(),
        "db": env.db_url,
        "aether_pid": aether.pid,
        "owner": owner.to_string(),
        "subscribers": [1, 100, 1000],
        "rates": [1000.0, 5000.0],
        "extra_rates": if quick { json!([]) } else { json!([7500.0, 10000.0, 15000.0, 20000.0]) },
        "seconds": if quick { 4.0 } else { 10.0 },
        "warmup_s": 1.0,
        "p99_limit_ms": 50.0,
    }))?;
    let res = load.result().await?;
    let rows: Vec<Vec<String>> = res["rows"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|r| {
            let l = &r["latency_ms"];
            vec![
                int(&r["subscribers"]),
                int(&r["write"]["target_rate"]),
                int(&r["write"]["achieved_rate"]),
                f(&l["p50"], 2),
                f(&l["p95"], 2),
                f(&l["p99"], 2),
                f(&l["p999"], 2),
                f(&l["max"], 2),
                f(&r["since_commit_ms"]["p50"], 1),
                f(&r["since_commit_ms"]["p99"], 1),
                f(&r["postgres_reference_ms"]["p50"], 2),
                f(&r["postgres_reference_ms"]["p99"], 2),
                int(&r["lost"]),
                f(&r["aether_cpu_us_per_change"], 1),
            ]
        })
        .collect();
    println!("latency = receive time - send time written by the load process (µs clock), ms;");
    println!(
        "'commit p50/p99' = receive time - the Commit message's time (frame `timestamp`, whole ms);"
    );
    println!(
        "'pg p50/p99' = the reference step at that rate: the same kind of commits to pg_recvlogical on a test_decoding slot, no Aether subscriber (send to receive): PostgreSQL's own limit, ms:"
    );
    table(
        &[
            "subscribers",
            "target/s",
            "commits/s",
            "p50",
            "p95",
            "p99",
            "p99.9",
            "max",
            "commit p50",
            "commit p99",
            "pg p50",
            "pg p99",
            "lost",
            "aether CPU µs/change",
        ],
        &rows,
    );
    for h in res["held"].as_array().into_iter().flatten() {
        println!(
            "  {} subscribers: highest commit rate held with p99 < 50 ms: {}",
            h["subscribers"],
            match h["max_rate_p99_under_limit"].as_f64() {
                Some(r) => format!("{}/s (highest tried that held)", group(r as i64)),
                None => "none of the rates tried".into(),
            }
        );
    }
    drop(aether);
    Ok(res)
}

// ---------------------------------------------------------------------------
// fan-out

async fn fan_out(
    env: &Env,
    quick: bool,
    rates: &[f64],
    seconds: Option<f64>,
) -> anyhow::Result<Value> {
    let owner = env::seed(&env.db_url, 1, "f").await?;
    let aether = started_aether(env, &[]).await?;
    let connections = if quick { 2_000 } else { 10_000 };
    let mut load = LoadProc::spawn(&json!({
        "mode": "fan-out",
        "server": aether.addr,
        "token": Env::service_token(),
        "db": env.db_url,
        "aether_pid": aether.pid,
        "owner": owner.to_string(),
        "connections": connections,
        "source_ips": 10,
        "rates": if !rates.is_empty() { json!(rates) } else if quick { json!([1.0, 5.0, 20.0]) } else { json!([1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0]) },
        "seconds": seconds.unwrap_or(if quick { 4.0 } else { 10.0 }),
    }))?;
    let res = load.result().await?;
    println!(
        "{} connections from {} source addresses; Aether RSS {} MiB idle -> {} MiB subscribed: {} KiB per connection",
        res["connections"],
        res["source_ips"],
        f(&res["rss_idle_mib"], 1),
        f(&res["rss_connected_mib"], 1),
        f(&res["kib_per_connection"], 1)
    );
    let rows: Vec<Vec<String>> = res["rows"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|r| {
            vec![
                f(&r["rate"], 0),
                int(&r["write"]["sent"]),
                f(&r["postgres_reference_ms"]["p50"], 1),
                f(&r["first_subscriber_ms"]["p50"], 1),
                f(&r["last_subscriber_ms"]["p50"], 1),
                f(&r["last_subscriber_ms"]["p99"], 1),
                f(&r["last_subscriber_ms"]["max"], 1),
                int(&r["incomplete_changes"]),
                format!(
                    "{} ({} sys)",
                    f(&r["aether_cpu_s_per_s"], 2),
                    f(&r["aether_sys_s_per_s"], 2)
                ),
                format!(
                    "{} ({} sys)",
                    f(&r["load_cpu_s_per_s"], 2),
                    f(&r["load_sys_s_per_s"], 2)
                ),
                int(&r["closed_connections"]),
            ]
        })
        .collect();
    println!(
        "time until the last subscriber has each change (ms); 'pg p50' = the same changes to pg_recvlogical on a test_decoding slot:"
    );
    table(
        &[
            "changes/s",
            "changes",
            "pg p50",
            "first p50",
            "last p50",
            "last p99",
            "last max",
            "incomplete",
            "aether cores",
            "load cores",
            "closed",
        ],
        &rows,
    );
    let b = &res["bare_sockets"];
    if b["changes"].is_u64() {
        println!(
            "a null server on the same client (it only writes a {}-byte frame to each socket, from {} threads), {} changes at {}/s: first p50 {}, last p50 {}, last p99 {}, last max {} ms, incomplete {}, short writes {}, closed {}; server {} ({} sys) cores, {} CPU s per change; load {} ({} sys) cores",
            int(&b["frame_bytes"]),
            int(&b["writer_threads"]),
            int(&b["changes"]),
            f(&b["rate"], 0),
            f(&b["first_subscriber_ms"]["p50"], 1),
            f(&b["last_subscriber_ms"]["p50"], 1),
            f(&b["last_subscriber_ms"]["p99"], 1),
            f(&b["last_subscriber_ms"]["max"], 1),
            int(&b["incomplete_changes"]),
            int(&b["short_writes"]),
            int(&b["closed_connections"]),
            f(&b["server_cpu_s_per_s"], 2),
            f(&b["server_sys_s_per_s"], 2),
            f(&b["server_cpu_s_per_change"], 3),
            f(&b["load_cpu_s_per_s"], 2),
            f(&b["load_sys_s_per_s"], 2),
        );
    }
    if let Some(e) = b["error"].as_str() {
        println!("the null server's floor: {e}");
    }
    drop(aether);
    Ok(res)
}

// ---------------------------------------------------------------------------
// filtered-routing

async fn filtered_routing(env: &Env, quick: bool) -> anyhow::Result<Value> {
    let steps: Vec<usize> = if quick {
        vec![0, 100, 1_000, 10_000]
    } else {
        vec![0, 100, 1_000, 10_000, 100_000]
    };
    let max = *steps.iter().max().unwrap_or(&1);
    let owner = env::seed(&env.db_url, max, "r").await?;
    let aether = started_aether(env, &[]).await?;
    let mut load = LoadProc::spawn(&json!({
        "mode": "routing",
        "server": aether.addr,
        "token": Env::service_token(),
        "db": env.db_url,
        "aether_pid": aether.pid,
        "owner": owner.to_string(),
        "steps": steps,
        "connections": 100,
        "rate": 5000.0,
        "seconds": if quick { 4.0 } else { 10.0 },
    }))?;
    let res = load.result().await?;
    let rows: Vec<Vec<String>> = res["rows"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|r| {
            vec![
                int(&r["subscriptions"]),
                int(&r["write"]["achieved_rate"]),
                int(&r["delivered"]),
                f(&r["aether_cpu_us_per_change"], 1),
                f(&r["latency_ms"]["p50"], 2),
                f(&r["latency_ms"]["p99"], 2),
                f(&r["aether_rss_mib"], 1),
            ]
        })
        .collect();
    println!("5k one-row commits/s, each to a random subscribed folder, over 100 connections:");
    table(
        &[
            "subscriptions",
            "commits/s",
            "delivered",
            "aether CPU µs/change",
            "p50 ms",
            "p99 ms",
            "RSS MiB",
        ],
        &rows,
    );
    drop(aether);
    Ok(res)
}

// ---------------------------------------------------------------------------
// big-tx

async fn big_tx(env: &Env, args: &RunArgs) -> anyhow::Result<Value> {
    let quick = args.quick;
    let (metrics_port, settings) = args.aether_settings()?;
    let rows: u64 = if quick { 100_000 } else { 1_000_000 };
    let owner = env::seed(&env.db_url, 1, "b").await?;
    let sql = env::connect(&env.db_url).await?;
    let folder = env::folder_ids(&sql, "b", 1).await?[0];
    println!(
        "loading {} rows (before Aether's slot exists)",
        group(rows as i64)
    );
    sql.batch_execute(&format!(
        "INSERT INTO public.files (bucket_id, folder_id, path, name, size, mime_type, owner_id, metadata)
         SELECT 'bench', '{folder}', 'b' || i, 'file-' || i || '.txt', i, 'text/plain', '{owner}',
                '{{\"source\":\"bench\"}}'::jsonb
           FROM generate_series(1, {rows}) i"
    ))
    .await?;
    sql.batch_execute("VACUUM ANALYZE public.files").await?;
    let aether = started_aether(env, &settings).await?;
    // The reference: a twin slot at the same point, drained after Aether's run.
    sql.batch_execute("SELECT pg_create_logical_replication_slot('bt_twin', 'pgoutput')")
        .await?;
    let mut load = LoadProc::spawn(&json!({
        "mode": "big-tx",
        "server": aether.addr,
        "token": Env::service_token(),
        "db": env.db_url,
        "aether_pid": aether.pid,
        "expected": rows,
        "sql": "SET synchronous_commit = off; UPDATE public.files SET size = size + 1",
        "timeout_s": 900,
    }))?;
    let mut res = load.result().await?;
    res["rows"] = json!(rows);
    res["ws_queue_capacity"] = json!(args.ws_queue_capacity);
    res["aether_settings"] = settings_json(&settings);
    res["aether_data_dir"] = json!(env.aether_data);
    res["changelog"] = env::changelog_size(aether.addr).await;
    let seg = env::segment_bytes(&env.aether_data);
    res["changelog"]["segment_file_bytes"] = json!(seg);
    res["changelog"]["segment_bytes_per_event"] = json!(seg as f64 / rows as f64);
    res["metrics"] = match metrics_port {
        Some(p) => {
            tokio::time::sleep(Duration::from_millis(600)).await;
            env::scrape_log_metrics(p).await
        }
        None => Value::Null,
    };
    drop(aether);
    let endpos: String = sql
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await?
        .get(0);
    let recv = pg_recvlogical(env, "bt_twin", &endpos)?;
    // pg_recvlogical starts after the commit: its walsender first reads the whole
    // transaction's WAL, then sends it. Its sending rate is first to last byte.
    let send_s = (recv.wall_s - recv.first_s).max(1e-9);
    res["pg_recvlogical"] = json!({
        "first_byte_s": recv.first_s,
        "last_byte_s": recv.wall_s,
        "events_per_s_after_first": rows as f64 / send_s,
        "cpu_s": recv.cpu_s,
    });
    let aether_rate = res["events_per_s_after_first"].as_f64().unwrap_or(0.0);
    res["ratio_after_first"] = json!(aether_rate / (rows as f64 / send_s));
    table(
        &[
            "rows",
            "UPDATE s",
            "first event s",
            "last event s",
            "events/s",
            "RSS before MiB",
            "peak RSS MiB",
            "RSS after MiB",
            "complete",
        ],
        &[vec![
            group(rows as i64),
            f(&res["update_s"], 2),
            f(&res["first_after_commit_s"], 2),
            f(&res["last_after_commit_s"], 2),
            int(&res["events_per_s_after_first"]),
            f(&res["rss_before_mib"], 1),
            f(&res["rss_peak_mib"], 1),
            f(&res["rss_after_mib"], 1),
            res["complete"].to_string(),
        ]],
    );
    println!("  (event times are measured from the UPDATE's commit as the client saw it)");
    let run_s = res["last_after_commit_s"].as_f64().unwrap_or(0.0);
    print_log_costs(
        &res["changelog"],
        &res["metrics"],
        run_s,
        rows,
        res["rss_before_mib"].as_f64().unwrap_or(0.0),
        res["rss_after_mib"].as_f64().unwrap_or(0.0),
    );
    println!(
        "  reference: pg_recvlogical on a twin slot, started after Aether's run: first byte after {:.2} s (its walsender reads the transaction's WAL first), last after {:.2} s: {} events/s from first to last byte; Aether / pg_recvlogical events/s: {:.2}",
        recv.first_s,
        recv.wall_s,
        group((rows as f64 / send_s) as i64),
        res["ratio_after_first"].as_f64().unwrap_or(0.0)
    );
    if res["complete"] != json!(true) {
        println!(
            "  INCOMPLETE: {} of {rows} events ({})",
            res["received"], res["error"]
        );
    }
    Ok(res)
}

// ---------------------------------------------------------------------------
// decode

async fn decode(env: &Env, quick: bool) -> anyhow::Result<Value> {
    use aether_postgres::decode::{Assembler, Output};
    use aether_postgres::replication::pgoutput;
    let owner = env::seed(&env.db_url, 1, "d").await?;
    let sql = env::connect(&env.db_url).await?;
    let folder = env::folder_ids(&sql, "d", 1).await?[0];
    sql.batch_execute(
        "SELECT pg_create_logical_replication_slot('dec', 'pgoutput');
         SELECT pg_create_logical_replication_slot('dec_recv', 'pgoutput')",
    )
    .await?;
    let (txs, singles) = (100, 10_000);
    sql.batch_execute("SET enable_seqscan = off").await?;
    sql.batch_execute(&backlog_sql(&owner, &folder, txs, singles))
        .await?;
    let endpos: String = sql
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await?
        .get(0);
    let rows = sql
        .query(
            "SELECT data FROM pg_logical_slot_peek_binary_changes('dec', NULL, NULL,
                 'proto_version', '1', 'publication_names', 'aether_realtime')",
            &[],
        )
        .await?;
    let msgs: Vec<bytes::Bytes> = rows
        .iter()
        .map(|r| bytes::Bytes::from(r.get::<_, Vec<u8>>(0)))
        .collect();
    let bytes_total: usize = msgs.iter().map(|m| m.len()).sum();
    let events_per_pass = txs * 1000 + singles;
    let budget = Duration::from_secs_f64(if quick { 1.5 } else { 5.0 });

    let mut out = Vec::with_capacity(16);
    let mut measure = |encode: bool| -> anyhow::Result<(f64, u64)> {
        let start = Instant::now();
        let mut events = 0u64;
        while start.elapsed() < budget {
            let mut asm = Assembler::new();
            for m in &msgs {
                asm.push(pgoutput::decode(m.clone())?, &mut out)?;
                for o in out.drain(..) {
                    if let Output::Change(c) = o {
                        events += 1;
                        if encode {
                            let routed = aether_router::routed::Routed::new(c);
                            std::hint::black_box(aether_realtime::protocol::change_frame(
                                "s", &routed,
                            ));
                        }
                    }
                }
            }
        }
        Ok((events as f64 / start.elapsed().as_secs_f64(), events))
    };
    let (decode_rate, _) = measure(false)?;
    let (encode_rate, _) = measure(true)?;
    let recv = pg_recvlogical(env, "dec_recv", &endpos)?;
    let recv_rate = events_per_pass as f64 / recv.wall_s;
    table(
        &["stage", "events/s", "per event µs"],
        &[
            vec![
                "aether decode + Assembler::push".into(),
                group(decode_rate as i64),
                format!("{:.2}", 1e6 / decode_rate),
            ],
            vec![
                "  + frame JSON (encoded_tail)".into(),
                group(encode_rate as i64),
                format!("{:.2}", 1e6 / encode_rate),
            ],
            vec![
                "pg_recvlogical drain, same WAL".into(),
                group(recv_rate as i64),
                format!("{:.2}", 1e6 / recv_rate),
            ],
        ],
    );
    println!(
        "  ({} pgoutput messages, {:.1} MiB, {} events per pass; one core)",
        group(msgs.len() as i64),
        bytes_total as f64 / 1048576.0,
        group(events_per_pass as i64)
    );
    Ok(json!({
        "messages": msgs.len(),
        "bytes": bytes_total,
        "events_per_pass": events_per_pass,
        "decode_assemble_events_per_s": decode_rate,
        "decode_assemble_encode_events_per_s": encode_rate,
        "pg_recvlogical_events_per_s": recv_rate,
        "pg_recvlogical_s": recv.wall_s,
        "pg_recvlogical_exit_s": recv.exit_s,
    }))
}

// ---------------------------------------------------------------------------
// rest

/// The parameters of an argon2 PHC string (`$argon2id$v=19$m=19456,t=2,p=1$…`).
fn argon2_params(phc: &str) -> Value {
    let parts: Vec<&str> = phc.split('$').collect();
    let mut v = json!({
        "algorithm": parts.get(1),
        "version": parts.get(2).and_then(|p| p.strip_prefix("v=")).and_then(|x| x.parse::<u32>().ok()),
    });
    for kv in parts.get(3).unwrap_or(&"").split(',') {
        if let Some((k, n)) = kv.split_once('=')
            && let Ok(n) = n.parse::<u64>()
        {
            let key = match k {
                "m" => "m_cost_kib",
                "t" => "t_cost",
                "p" => "p_cost",
                other => other,
            };
            v[key] = json!(n);
        }
    }
    v
}

/// Calls `f` on this thread for `budget` (3 calls at least); µs per call and calls.
fn time_per_call(budget: Duration, mut f: impl FnMut()) -> (f64, u64) {
    let start = Instant::now();
    let mut n = 0u64;
    while n < 3 || start.elapsed() < budget {
        f();
        n += 1;
    }
    (start.elapsed().as_secs_f64() * 1e6 / n as f64, n)
}

async fn rest(env: &Env, quick: bool) -> anyhow::Result<Value> {
    use aether_auth::password;
    const AUTH_LIMIT: u32 = 1_000_000;
    let bytes: u64 = if quick { 128 << 20 } else { 1 << 30 };
    let users = if quick { 16 } else { 64 };
    let steps = [1, 2, 4, 8];
    let seconds = if quick { 3.0 } else { 10.0 };
    let warmup_s = if quick { 0.5 } else { 1.0 };
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());

    // The hash cost: the server's own function, timed here on one core.
    let budget = Duration::from_secs_f64(if quick { 1.0 } else { 3.0 });
    let phc = password::hash(crate::rest::PASSWORD).map_err(anyhow::Error::msg)?;
    let params = argon2_params(&phc);
    let busy0 = crate::proc::machine_busy_seconds().unwrap_or(0.0);
    let own0 = cpu_seconds(std::process::id()).unwrap_or(0.0);
    let timing = Instant::now();
    let (hash_us, hashes) = time_per_call(budget, || {
        std::hint::black_box(password::hash(crate::rest::PASSWORD).ok());
    });
    let (verify_us, verifies) = time_per_call(budget, || {
        std::hint::black_box(password::verify(crate::rest::PASSWORD, &phc));
    });
    // Other work on the machine while timing (this process excluded).
    let timing_other_cores = (crate::proc::machine_busy_seconds().unwrap_or(0.0)
        - busy0
        - (cpu_seconds(std::process::id()).unwrap_or(0.0) - own0))
        / timing.elapsed().as_secs_f64();

    let limits: Vec<(&str, String)> = vec![
        ("RATE_LIMIT_AUTH_PER_MIN", AUTH_LIMIT.to_string()),
        ("RATE_LIMIT_STORAGE_PER_MIN", AUTH_LIMIT.to_string()),
        ("MAX_FILE_SIZE", (2 * bytes).to_string()),
        ("STORAGE_QUOTA_BYTES", (4 * bytes).to_string()),
        ("ALLOWED_FILE_TYPES", "application/octet-stream".into()),
    ];

    let settings = limits
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(" ");

    // Sign-in: its own Aether process.
    let aether = started_aether(env, &limits).await?;
    let mut load = LoadProc::spawn(&json!({
        "mode": "sign-in",
        "server": aether.addr,
        "aether_pid": aether.pid,
        "pg_pid": env.pg_pid(),
        "users": users,
        "signup_concurrency": 2,
        "steps": steps,
        "seconds": seconds,
        "warmup_s": warmup_s,
    }))?;
    let mut sign_in = load.result().await?;
    drop(aether);
    for r in sign_in["rows"].as_array_mut().into_iter().flatten() {
        let per_s = r["per_s"].as_f64().unwrap_or(0.0);
        r["argon2_cores"] = json!(per_s * verify_us / 1e6);
    }

    println!(
        "password hash: {} v={}, m_cost {} KiB, t_cost {}, p_cost {} (parameters read from the PHC string of aether_auth::password::hash)",
        params["algorithm"].as_str().unwrap_or("?"),
        params["version"],
        params["m_cost_kib"],
        params["t_cost"],
        params["p_cost"]
    );
    println!(
        "  one core, in-process, same functions as the server: hash {:.0} µs, verify {:.0} µs \
         ({} and {} calls; other work on the box meanwhile: {:.2} cores) -> at most {:.0} sign-ins/s per core, {:.0} on {cores} cores",
        hash_us,
        verify_us,
        hashes,
        verifies,
        timing_other_cores.max(0.0),
        1e6 / verify_us,
        cores as f64 * 1e6 / verify_us
    );
    println!(
        "  RATE_LIMIT_AUTH_PER_MIN={} for this run (default 5 per address): the limiter is not what is measured",
        group(AUTH_LIMIT as i64)
    );
    println!(
        "  {} users signed up first over 2 connections: {} s, {}/s; Aether RSS {} MiB idle, {} MiB after the sign-ups",
        users,
        f(&sign_in["sign_up"]["seconds"], 1),
        f(&sign_in["sign_up"]["per_s"], 1),
        f(&sign_in["aether_rss_idle_mib"], 1),
        f(&sign_in["aether_rss_after_sign_up_mib"], 1)
    );
    let rows: Vec<Vec<String>> = sign_in["rows"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|r| {
            vec![
                int(&r["concurrency"]),
                int(&r["requests"]),
                f(&r["per_s"], 1),
                f(&r["latency_ms"]["p50"], 1),
                f(&r["latency_ms"]["p99"], 1),
                int(&r["non_200"]),
                int(&r["errors"]),
                f(&r["aether_cores"], 2),
                f(&r["aether_system_cores"], 2),
                f(&r["argon2_cores"], 2),
                f(&r["postgres_cores"], 2),
                f(&r["other_cores"], 2),
                f(&r["aether_rss_peak_mib"], 0),
                f(&r["aether_rss_after_mib"], 0),
            ]
        })
        .collect();
    println!(
        "POST /auth/sign-in, one keep-alive connection per client, {seconds} s per step after {warmup_s} s of warm-up:"
    );
    table(
        &[
            "clients",
            "sign-ins",
            "sign-ins/s",
            "p50 ms",
            "p99 ms",
            "non-200",
            "errors",
            "aether cores",
            "of which sys",
            "argon2 cores",
            "postgres cores",
            "other cores",
            "peak RSS MiB",
            "RSS after MiB",
        ],
        &rows,
    );
    println!(
        "  (argon2 cores = sign-ins/s x one verify's time on one core; other cores = the machine's busy CPU \
         less Aether, PostgreSQL and the load: work of others on the shared box; errors = requests with no response)"
    );
    if !sign_in["first_error"].is_null() {
        println!("  first failure: {}", sign_in["first_error"]);
    }

    // Upload and download: a fresh Aether process.
    let aether = started_aether(env, &limits).await?;
    let mut load = LoadProc::spawn(&json!({
        "mode": "upload",
        "server": aether.addr,
        "aether_pid": aether.pid,
        "bytes": bytes,
        "bucket": "files",
        "path": "bench/big.bin",
        "content_type": "application/octet-stream",
        "download": true,
    }))?;
    let mut upload = load.result().await?;
    drop(aether);
    // The stored object: the response, the row, the bytes on disk.
    let id: uuid::Uuid = upload["response"]["id"]
        .as_str()
        .context("upload response without id")?
        .parse()?;
    let sql = env::connect(&env.db_url).await?;
    let row = sql
        .query_one(
            "SELECT size, storage_key FROM public.files WHERE id = $1",
            &[&id],
        )
        .await?;
    let row_size: i64 = row.get(0);
    let key: String = row.get(1);
    let disk = std::fs::metadata(env.aether_data.join("storage").join(&key))
        .map(|m| m.len())
        .ok();
    let response_size = upload["response"]["size"].as_u64();
    let stored_ok = response_size == Some(bytes) && row_size as u64 == bytes && disk == Some(bytes);
    upload["stored"] = json!({
        "response_size": response_size,
        "row_size": row_size,
        "disk_size": disk,
        "ok": stored_ok,
    });
    let d = &upload["download"];
    let mib = bytes as f64 / 1048576.0;
    println!(
        "POST /storage/upload (multipart, streamed, Content-Length known) of {mib:.0} MiB, then GET of the same object; \
         Aether RSS sampled every 50 ms; a fresh Aether with {}:",
        settings
    );
    table(
        &[
            "transfer",
            "MiB",
            "seconds",
            "MiB/s",
            "RSS before MiB",
            "peak RSS MiB",
            "RSS after MiB",
            "aether CPU s",
            "checked",
        ],
        &[
            vec![
                "upload".into(),
                format!("{mib:.0}"),
                f(&upload["seconds"], 2),
                f(&upload["mib_per_s"], 0),
                f(&upload["rss_before_mib"], 1),
                f(&upload["rss_peak_mib"], 1),
                f(&upload["rss_after_mib"], 1),
                f(&upload["aether_cpu_s"], 2),
                if stored_ok { "size ok" } else { "SIZE WRONG" }.into(),
            ],
            vec![
                "download".into(),
                format!("{:.0}", d["bytes"].as_f64().unwrap_or(0.0) / 1048576.0),
                f(&d["seconds"], 2),
                f(&d["mib_per_s"], 0),
                f(&d["rss_before_mib"], 1),
                f(&d["rss_peak_mib"], 1),
                f(&d["rss_after_mib"], 1),
                f(&d["aether_cpu_s"], 2),
                if d["verified"] == json!(true) {
                    "bytes ok"
                } else {
                    "BYTES WRONG"
                }
                .into(),
            ],
        ],
    );
    let r = &upload["small_reads"];
    println!(
        "  {} reads of the object's first KiB, one after another on one connection: {}/s, p50 {} ms, p99 {} ms, Aether CPU {} µs per read",
        r["reads"],
        f(&r["per_s"], 0),
        f(&r["p50_ms"], 2),
        f(&r["p99_ms"], 2),
        f(&r["aether_cpu_us_per_read"], 0)
    );
    println!(
        "  upload: last byte sent at {} s, response {} s later (blob completion with fsync, row commit); \
         stored size: response {}, row {}, file on disk {}",
        f(&upload["last_byte_sent_s"], 2),
        f(&upload["response_after_last_byte_s"], 2),
        upload["stored"]["response_size"],
        row_size,
        upload["stored"]["disk_size"]
    );
    Ok(json!({
        "argon2": {
            "params": params,
            "hash_us_one_core": hash_us,
            "verify_us_one_core": verify_us,
            "hash_calls": hashes,
            "verify_calls": verifies,
            "other_cores_while_timing": timing_other_cores.max(0.0),
        },
        "rate_limit_auth_per_min": AUTH_LIMIT,
        "aether_settings": settings,
        "sign_in": sign_in,
        "upload": upload,
    }))
}
