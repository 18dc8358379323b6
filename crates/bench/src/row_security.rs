//! `row-security`: the cost of authorizing changes by RLS policies, against the
//! number of subscribers, each a user of their own with one connection.
//!
//! - **compiled**: `public.rls_owned`, policy `owner = auth.uid()`. Aether
//!   decides in-process and indexes each subscription by its user, so a change
//!   costs work for the subscriber it is for, not for every subscriber.
//! - **in PostgreSQL**: `public.rls_checked`, policy `public.bench_may_read(owner)`
//!   (a function: not compiled). One `aether.rls_visible` call per change
//!   judges every subscriber.
//! - **one query per subscriber** (the reference, same run, same rows): for
//!   each change, one `SELECT` of the row per subscriber as that subscriber
//!   (role and claims set), pipelined on one connection: what authorizing by
//!   re-reading the table costs.
//!
//! Each change is owned by one random subscriber, so exactly one receives it.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use futures_util::SinkExt;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::sync::Semaphore;
use tokio_tungstenite::tungstenite::Message;

use crate::env::{self, Env, LoadProc};
use crate::load::{
    SUBSCRIBER_READ_BUFFER, Shared, Sink, Tracker, drain, log, open, wait_subscribed,
};
use crate::proc::{cpu_seconds, now_us, tree_cpu_seconds};
use crate::stats::{Summary, summarize_us};

const SETUP: &str = r#"
CREATE TABLE IF NOT EXISTS public.rls_owned (id bigserial PRIMARY KEY, owner uuid, path text, size bigint);
CREATE TABLE IF NOT EXISTS public.rls_checked (id bigserial PRIMARY KEY, owner uuid, path text, size bigint);
ALTER TABLE public.rls_owned REPLICA IDENTITY FULL;
ALTER TABLE public.rls_checked REPLICA IDENTITY FULL;
GRANT SELECT ON public.rls_owned, public.rls_checked TO authenticated;
ALTER TABLE public.rls_owned ENABLE ROW LEVEL SECURITY;
ALTER TABLE public.rls_checked ENABLE ROW LEVEL SECURITY;
CREATE OR REPLACE FUNCTION public.bench_may_read(o uuid) RETURNS boolean
    LANGUAGE sql STABLE AS $$ SELECT o = auth.uid() $$;
DROP POLICY IF EXISTS own ON public.rls_owned;
CREATE POLICY own ON public.rls_owned FOR SELECT TO authenticated USING (owner = auth.uid());
DROP POLICY IF EXISTS checked ON public.rls_checked;
CREATE POLICY checked ON public.rls_checked FOR SELECT TO authenticated
    USING (public.bench_may_read(owner));
-- The reference: the row read again as one subscriber.
CREATE OR REPLACE FUNCTION public.bench_read_as(claims text, row_id bigint) RETURNS boolean
LANGUAGE plpgsql AS $f$
DECLARE seen boolean;
BEGIN
    PERFORM set_config('request.jwt.claims', claims, true),
            set_config('request.jwt.claim.sub', claims::jsonb ->> 'sub', true),
            set_config('role', 'authenticated', true);
    SELECT EXISTS (SELECT 1 FROM public.rls_checked WHERE id = row_id) INTO seen;
    RESET ROLE;
    RETURN seen;
END $f$;
DO $$ BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_publication_tables WHERE pubname = 'aether_realtime'
                   AND tablename = 'rls_owned') THEN
        ALTER PUBLICATION aether_realtime ADD TABLE public.rls_owned, public.rls_checked;
    END IF;
END $$;
"#;

pub async fn run(env: &Env, quick: bool) -> anyhow::Result<Value> {
    let steps: Vec<usize> = if quick {
        vec![100, 1_000]
    } else {
        vec![100, 1_000, 10_000]
    };
    let max = *steps.iter().max().unwrap_or(&1);
    env::seed(&env.db_url, 0, "x").await?;
    let sql = env::connect(&env.db_url).await?;
    sql.batch_execute(SETUP).await?;
    sql.execute(
        "INSERT INTO auth.users (email)
         SELECT 'rls' || i || '@bench.test' FROM generate_series(1, $1::int) i
         ON CONFLICT (email) DO NOTHING",
        &[&(max as i32)],
    )
    .await?;
    let aether = env.start_aether(&[])?;
    aether.wait_healthy().await?;
    let mut load = LoadProc::spawn(&json!({
        "mode": "row-security",
        "server": aether.addr,
        "db": env.db_url,
        "aether_pid": aether.pid,
        "pg_pid": env.pg_pid(),
        "steps": steps,
        "rate": 1000.0,
        "seconds": if quick { 3.0 } else { 5.0 },
        "pg_changes": if quick { 10 } else { 20 },
        "pg_rate": 5.0,
        "reference_changes": if quick { 3 } else { 5 },
    }))?;
    let res = load.result().await?;
    let rows: Vec<Vec<String>> = res["rows"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|r| {
            let f = |v: &Value, d: usize| {
                v.as_f64()
                    .map_or_else(|| "-".to_owned(), |x| format!("{x:.d$}"))
            };
            vec![
                r["subscribers"].to_string(),
                f(&r["compiled"]["aether_cpu_us_per_change"], 1),
                f(&r["compiled"]["latency_ms"]["p99"], 2),
                format!("{}/{}", r["compiled"]["delivered"], r["compiled"]["sent"]),
                f(&r["in_postgres"]["aether_cpu_us_per_change"], 0),
                f(&r["in_postgres"]["postgres_cpu_us_per_change"], 0),
                f(&r["in_postgres"]["latency_ms"]["p50"], 1),
                format!(
                    "{}/{}",
                    r["in_postgres"]["delivered"], r["in_postgres"]["sent"]
                ),
                f(&r["per_subscriber_queries"]["ms_per_change"], 1),
                f(
                    &r["per_subscriber_queries"]["postgres_cpu_us_per_change"],
                    0,
                ),
            ]
        })
        .collect();
    println!(
        "Each change is for one random subscriber; every subscriber is a user with a connection of its own."
    );
    crate::report::table(
        &[
            "subscribers",
            "compiled: aether µs/change",
            "p99 ms",
            "delivered",
            "in PG: aether µs/change",
            "PG µs/change",
            "p50 ms",
            "delivered",
            "1 query/subscriber: ms/change",
            "PG µs/change",
        ],
        &rows,
    );
    drop(aether);
    Ok(res)
}

#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct Spec {
    server: SocketAddr,
    db: String,
    aether_pid: u32,
    pg_pid: Option<u32>,
    steps: Vec<usize>,
    rate: f64,
    seconds: f64,
    pg_changes: u64,
    pg_rate: f64,
    reference_changes: usize,
}

#[derive(Serialize)]
struct Phase {
    sent: u64,
    delivered: u64,
    aether_cpu_us_per_change: f64,
    postgres_cpu_us_per_change: f64,
    latency_ms: Summary,
}

fn token(user: &str) -> String {
    Env::user_token(user)
}

fn claims(user: &str) -> String {
    json!({"role": "authenticated", "sub": user, "aud": "authenticated"}).to_string()
}

/// Paced one-row INSERTs into `table`, each owned by `owner(i)`; the rows'
/// `path` is `s<seq>` and `size` the send time, as the tracker reads them.
async fn write(
    client: &Arc<tokio_postgres::Client>,
    shared: &Shared,
    table: &str,
    base: u64,
    total: u64,
    rate: f64,
    owner: impl Fn(u64) -> uuid::Uuid,
) -> anyhow::Result<(Arc<Tracker>, Vec<i64>)> {
    let tracker = Tracker::new(base, total as usize);
    *shared.tracker.write().unwrap() = Some(Arc::clone(&tracker));
    let stmt = client
        .prepare(&format!(
            "INSERT INTO public.{table} (owner, path, size) VALUES ($1, $2, $3) RETURNING id"
        ))
        .await?;
    let sem = Arc::new(Semaphore::new(256));
    let ids = Arc::new(std::sync::Mutex::new(Vec::new()));
    let start = Instant::now();
    for i in 0..total {
        let due = start + Duration::from_secs_f64(i as f64 / rate);
        tokio::time::sleep_until(due.into()).await;
        let permit = Arc::clone(&sem).acquire_owned().await?;
        let (client, stmt, tracker, ids) = (
            Arc::clone(client),
            stmt.clone(),
            Arc::clone(&tracker),
            Arc::clone(&ids),
        );
        let who = owner(i);
        tokio::spawn(async move {
            let sent = now_us();
            tracker.sent[i as usize].store(sent, Ordering::Relaxed);
            let path = format!("s{}", base + i);
            if let Ok(r) = client.query_one(&stmt, &[&who, &path, &sent]).await {
                ids.lock().unwrap().push(r.get::<_, i64>(0));
            }
            drop(permit);
        });
    }
    let _all = sem.acquire_many(256).await?;
    let ids = ids.lock().unwrap().clone();
    Ok((tracker, ids))
}

pub async fn load(spec: Spec) -> anyhow::Result<Value> {
    let db = env::connect(&spec.db).await?;
    db.batch_execute("SET synchronous_commit = on").await?;
    let db = Arc::new(db);
    let max = spec.steps.iter().copied().max().unwrap_or(1);
    let users: Vec<uuid::Uuid> = db
        .query(
            "SELECT id FROM auth.users WHERE email LIKE 'rls%@bench.test'
              ORDER BY (substring(email FROM 4 FOR position('@' IN email) - 4))::int LIMIT $1",
            &[&(max as i64)],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    anyhow::ensure!(users.len() >= max, "only {} bench users", users.len());
    let shared = Arc::new(Shared::default());
    let mut sinks: Vec<Sink> = Vec::new();
    let mut rows = Vec::new();
    let mut seq = 1u64;
    let mut rng = 0x9E37_79B9_7F4A_7C15u64;
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let reference = env::connect(&spec.db).await?;
    for &n in &spec.steps {
        // Connect users `sinks.len()..n`, 256 at a time, from 10 source addresses.
        let sem = Arc::new(Semaphore::new(256));
        let mut handles = Vec::new();
        for (i, u) in users.iter().enumerate().take(n).skip(sinks.len()) {
            let permit = Arc::clone(&sem).acquire_owned().await?;
            let (shared, tok) = (Arc::clone(&shared), token(&u.to_string()));
            let ip = Ipv4Addr::new(127, 0, 0, 2 + (i % 10) as u8);
            let server = spec.server;
            handles.push(tokio::spawn(async move {
                let mut s = open(server, &tok, Some(ip), SUBSCRIBER_READ_BUFFER, &shared).await?;
                for (id, table) in [("o", "rls_owned"), ("c", "rls_checked")] {
                    s.feed(Message::Text(
                        json!({"type": "subscription", "action": "subscribe",
                               "data": {"id": id, "table": table}})
                        .to_string()
                        .into(),
                    ))
                    .await?;
                }
                s.flush().await?;
                drop(permit);
                anyhow::Ok(s)
            }));
        }
        for h in handles {
            sinks.push(h.await??);
        }
        wait_subscribed(&shared, 2 * n as u64, Duration::from_secs(300)).await?;
        log(format!("row-security: {n} subscribers"));
        tokio::time::sleep(Duration::from_millis(500)).await;

        // Compiled.
        let total = (spec.rate * spec.seconds) as u64;
        let picks: Vec<uuid::Uuid> = (0..total).map(|_| users[next() as usize % n]).collect();
        let (cpu0, pg0) = (
            cpu_seconds(spec.aether_pid).unwrap_or(0.0),
            spec.pg_pid.and_then(tree_cpu_seconds).unwrap_or(0.0),
        );
        let (tracker, _) = write(&db, &shared, "rls_owned", seq, total, spec.rate, |i| {
            picks[i as usize]
        })
        .await?;
        seq += total;
        drain(&tracker, total, Duration::from_secs(30)).await;
        let compiled = phase(&spec, &tracker, total, cpu0, pg0);

        // In PostgreSQL.
        let total = spec.pg_changes;
        let picks: Vec<uuid::Uuid> = (0..total).map(|_| users[next() as usize % n]).collect();
        let (cpu0, pg0) = (
            cpu_seconds(spec.aether_pid).unwrap_or(0.0),
            spec.pg_pid.and_then(tree_cpu_seconds).unwrap_or(0.0),
        );
        let (tracker, ids) = write(&db, &shared, "rls_checked", seq, total, spec.pg_rate, |i| {
            picks[i as usize]
        })
        .await?;
        seq += total;
        drain(&tracker, total, Duration::from_secs(300)).await;
        let in_postgres = phase(&spec, &tracker, total, cpu0, pg0);

        // One query per subscriber per change, on the same rows.
        let stmt = reference
            .prepare("SELECT public.bench_read_as($1, $2)")
            .await?;
        let all_claims: Vec<String> = users[..n].iter().map(|u| claims(&u.to_string())).collect();
        let pg0 = spec.pg_pid.and_then(tree_cpu_seconds).unwrap_or(0.0);
        let t = Instant::now();
        let mut seen = 0u64;
        let sample = &ids[..ids.len().min(spec.reference_changes)];
        for id in sample {
            let calls = all_claims.iter().map(|c| {
                let (reference, stmt) = (&reference, &stmt);
                async move { reference.query_one(stmt, &[c, id]).await }
            });
            for r in futures_util::future::join_all(calls).await {
                if r?.get::<_, bool>(0) {
                    seen += 1;
                }
            }
        }
        let per = sample.len().max(1) as f64;
        let per_subscriber = json!({
            "changes": sample.len(),
            "queries": sample.len() * n,
            "visible": seen,
            "ms_per_change": t.elapsed().as_secs_f64() * 1e3 / per,
            "postgres_cpu_us_per_change":
                (spec.pg_pid.and_then(tree_cpu_seconds).unwrap_or(0.0) - pg0) * 1e6 / per,
        });
        rows.push(json!({
            "subscribers": n,
            "compiled": compiled,
            "in_postgres": in_postgres,
            "per_subscriber_queries": per_subscriber,
        }));
    }
    for mut s in sinks.drain(..) {
        let _ = s.close().await;
    }
    Ok(json!({
        "rows": rows,
        "closed": shared.closed.load(Ordering::Relaxed),
        "error": shared.error_text(),
    }))
}

fn phase(spec: &Spec, tracker: &Tracker, total: u64, cpu0: f64, pg0: f64) -> Phase {
    let cpu1 = cpu_seconds(spec.aether_pid).unwrap_or(0.0);
    let pg1 = spec.pg_pid.and_then(tree_cpu_seconds).unwrap_or(0.0);
    let (mut lat, _, _) = tracker.latencies(total as usize, 0, 1);
    Phase {
        sent: total,
        delivered: tracker.deliveries.load(Ordering::Relaxed),
        aether_cpu_us_per_change: (cpu1 - cpu0) * 1e6 / total.max(1) as f64,
        postgres_cpu_us_per_change: (pg1 - pg0) * 1e6 / total.max(1) as f64,
        latency_ms: summarize_us(&mut lat),
    }
}
