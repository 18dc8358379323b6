//! The load process: WebSocket subscribers (tokio-tungstenite), SQL writers, and the
//! HTTP clients of the `rest` scenario (`rest.rs`).
//!
//! It talks to the orchestrator on stdout (`LOG …`, `READY`, `DONE …`, `RESULT <json>`,
//! `FAIL …`) and reads `GO` on stdin where a scenario needs a go-ahead.
//!
//! Latency is measured with a microsecond clock the load process writes itself: each
//! row it inserts carries its send time (µs since the Unix epoch, the same clock the
//! receivers read) in `files.size`, and its sequence number in `files.path` (`s<seq>`).
//! A receiver takes `now − size` when the change frame arrives. The frame's own
//! `timestamp` (the Commit message's time) has only millisecond resolution; live-latency
//! also reports receive time minus it, which is the issue's definition at that resolution.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicI64, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::sync::Semaphore;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;

mod bare;
mod fleet;

pub use bare::null_server;

use crate::proc::{cpu_seconds, cpu_user_system, hwm_kib, now_us, rss_kib};
use crate::stats::{Summary, summarize_us};

#[derive(Serialize, Deserialize, Debug, Clone)]
#[serde(tag = "mode", rename_all = "kebab-case")]
pub enum Spec {
    CatchUp {
        server: SocketAddr,
        token: String,
        expected: u64,
        timeout_s: u64,
    },
    BigTx {
        server: SocketAddr,
        token: String,
        db: String,
        aether_pid: u32,
        expected: u64,
        sql: String,
        timeout_s: u64,
    },
    Latency {
        server: SocketAddr,
        token: String,
        db: String,
        aether_pid: u32,
        owner: String,
        subscribers: Vec<usize>,
        rates: Vec<f64>,
        /// Tried in order after `rates` while p99 stays under `p99_limit_ms`.
        extra_rates: Vec<f64>,
        seconds: f64,
        warmup_s: f64,
        p99_limit_ms: f64,
    },
    FanOut {
        server: SocketAddr,
        token: String,
        db: String,
        aether_pid: u32,
        owner: String,
        connections: usize,
        source_ips: u8,
        rates: Vec<f64>,
        seconds: f64,
    },
    Routing {
        server: SocketAddr,
        token: String,
        db: String,
        aether_pid: u32,
        owner: String,
        steps: Vec<usize>,
        connections: usize,
        rate: f64,
        seconds: f64,
    },
    /// `rest`: sign up `users`, then sign in at each concurrency of `steps`.
    SignIn {
        server: SocketAddr,
        aether_pid: u32,
        /// The postmaster, for PostgreSQL's CPU.
        pg_pid: Option<u32>,
        users: usize,
        signup_concurrency: usize,
        steps: Vec<usize>,
        seconds: f64,
        warmup_s: f64,
    },
    /// `soak`: a writer of numbered rows and a follower that resumes with `since`.
    Soak {
        server: SocketAddr,
        token: String,
        db: String,
        rate: f64,
    },
    /// `rest`: sign up one user, upload `bytes` to `bucket`/`path`, download it back.
    Upload {
        server: SocketAddr,
        aether_pid: u32,
        bytes: u64,
        bucket: String,
        path: String,
        content_type: String,
        download: bool,
    },
    /// `cluster`: each node's CPU per change at a steady commit rate.
    ClusterCpu(crate::cluster::CpuSpec),
    /// `cluster`: subscribers spread over the nodes, one change at a time.
    ClusterFanOut(crate::cluster::FanOutSpec),
    /// `cluster`: a steady writer and a subscriber per node while leaders are killed.
    ClusterFailover(crate::cluster::FailoverSpec),
    /// `row-security`: users with a connection each, changes authorized by RLS.
    RowSecurity(crate::row_security::Spec),
}

pub fn say(line: &str) {
    use std::io::Write as _;
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

pub fn log(msg: impl AsRef<str>) {
    say(&format!("LOG {}", msg.as_ref()));
}

pub fn main(spec: &str) -> anyhow::Result<()> {
    let spec: Spec = serde_json::from_str(spec)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    match rt.block_on(run(spec)) {
        Ok(v) => {
            say(&format!("RESULT {v}"));
            Ok(())
        }
        Err(e) => {
            say(&format!("FAIL {e:#}"));
            std::process::exit(1);
        }
    }
}

async fn run(spec: Spec) -> anyhow::Result<Value> {
    match spec {
        Spec::CatchUp {
            server,
            token,
            expected,
            timeout_s,
        } => catch_up(server, &token, expected, timeout_s).await,
        Spec::BigTx {
            server,
            token,
            db,
            aether_pid,
            expected,
            sql,
            timeout_s,
        } => big_tx(server, &token, &db, aether_pid, expected, &sql, timeout_s).await,
        Spec::Latency { .. } => latency(spec).await,
        Spec::Soak {
            server,
            token,
            db,
            rate,
        } => crate::soak::load(server, token, db, rate).await,
        Spec::FanOut { .. } => fan_out(spec).await,
        Spec::Routing { .. } => routing(spec).await,
        Spec::SignIn {
            server,
            aether_pid,
            pg_pid,
            users,
            signup_concurrency,
            steps,
            seconds,
            warmup_s,
        } => {
            crate::rest::sign_in(
                server,
                aether_pid,
                pg_pid,
                users,
                signup_concurrency,
                &steps,
                seconds,
                warmup_s,
            )
            .await
        }
        Spec::Upload {
            server,
            aether_pid,
            bytes,
            bucket,
            path,
            content_type,
            download,
        } => {
            crate::rest::upload(
                server,
                aether_pid,
                bytes,
                &bucket,
                &path,
                &content_type,
                download,
            )
            .await
        }
        Spec::ClusterCpu(s) => crate::cluster::cpu_load(s).await,
        Spec::ClusterFanOut(s) => crate::cluster::fan_out_load(s).await,
        Spec::ClusterFailover(s) => crate::cluster::failover_load(s).await,
        Spec::RowSecurity(s) => crate::row_security::load(s).await,
    }
}

// ---------------------------------------------------------------------------
// Receiving

/// Per-change delivery record for one measured step: how many subscribers got
/// change `seq`, and when the first and the last of them did.
pub struct Tracker {
    base: u64,
    pub sent: Vec<AtomicI64>,
    pub count: Vec<AtomicU32>,
    pub first: Vec<AtomicI64>,
    pub last: Vec<AtomicI64>,
    /// The frame's `timestamp`: the Commit message's commit time, in ms.
    pub commit_ms: Vec<AtomicI64>,
    pub deliveries: AtomicU64,
}

impl Tracker {
    pub fn new(base: u64, cap: usize) -> Arc<Tracker> {
        Arc::new(Tracker {
            base,
            sent: (0..cap).map(|_| AtomicI64::new(0)).collect(),
            count: (0..cap).map(|_| AtomicU32::new(0)).collect(),
            first: (0..cap).map(|_| AtomicI64::new(i64::MAX)).collect(),
            last: (0..cap).map(|_| AtomicI64::new(0)).collect(),
            commit_ms: (0..cap).map(|_| AtomicI64::new(0)).collect(),
            deliveries: AtomicU64::new(0),
        })
    }

    fn record(&self, seq: u64, recv: i64, commit_ms: Option<i64>) {
        self.record_many(seq, 1, recv, recv, commit_ms);
    }

    /// `n` deliveries of change `seq`, received between `first` and `last`.
    fn record_many(&self, seq: u64, n: u32, first: i64, last: i64, commit_ms: Option<i64>) {
        let Some(i) = seq.checked_sub(self.base).map(|i| i as usize) else {
            return;
        };
        if i >= self.count.len() {
            return;
        }
        self.count[i].fetch_add(n, Ordering::Relaxed);
        self.first[i].fetch_min(first, Ordering::Relaxed);
        self.last[i].fetch_max(last, Ordering::Relaxed);
        if let Some(ms) = commit_ms {
            self.commit_ms[i].store(ms, Ordering::Relaxed);
        }
        self.deliveries.fetch_add(u64::from(n), Ordering::Relaxed);
    }

    /// Last-subscriber receive time minus the commit time of the Commit message
    /// (the frame's `timestamp`, whole milliseconds: each value is up to 1 ms more
    /// than the true one), µs, over changes `from..n` sent.
    fn since_commit(&self, n: usize, from_us: i64) -> Vec<i64> {
        (0..n.min(self.count.len()))
            .filter(|&i| {
                self.sent[i].load(Ordering::Relaxed) >= from_us
                    && self.count[i].load(Ordering::Relaxed) > 0
                    && self.commit_ms[i].load(Ordering::Relaxed) > 0
            })
            .map(|i| {
                self.last[i].load(Ordering::Relaxed)
                    - self.commit_ms[i].load(Ordering::Relaxed) * 1000
            })
            .collect()
    }

    /// (last-subscriber latencies µs, first-subscriber latencies µs, changes with
    /// fewer than `per_change` deliveries) over changes `from..n` sent.
    pub fn latencies(
        &self,
        n: usize,
        from_us: i64,
        per_change: u32,
    ) -> (Vec<i64>, Vec<i64>, usize) {
        let mut last = Vec::with_capacity(n);
        let mut first = Vec::with_capacity(n);
        let mut short = 0;
        for i in 0..n.min(self.count.len()) {
            let sent = self.sent[i].load(Ordering::Relaxed);
            if sent < from_us {
                continue;
            }
            let c = self.count[i].load(Ordering::Relaxed);
            if c < per_change {
                short += 1;
            }
            if c > 0 {
                last.push(self.last[i].load(Ordering::Relaxed) - sent);
                first.push(self.first[i].load(Ordering::Relaxed) - sent);
            }
        }
        (last, first, short)
    }
}

#[derive(Default)]
pub struct Shared {
    /// Positions of every change frame, when asked for (catch-up diagnostics).
    positions: Option<Mutex<Vec<(u64, u32)>>>,
    pub tracker: RwLock<Option<Arc<Tracker>>>,
    changes: AtomicU64,
    first_us: AtomicI64,
    last_us: AtomicI64,
    subscribed: AtomicU64,
    errors: AtomicU64,
    pub closed: AtomicU64,
    /// The size of the first change frame's text: the bare-socket floor sends
    /// frames of the same size.
    frame_bytes: AtomicU64,
    first_error: Mutex<Option<String>>,
    /// The first few frames that are not changes (subscription replies included),
    /// each cut at 300 bytes: what a subscriber that got nothing was told.
    pub notes: Mutex<Vec<String>>,
}

pub fn field_i64(text: &str, key: &str) -> Option<i64> {
    let start = text.find(key)? + key.len();
    let digits = text[start..]
        .bytes()
        .take_while(|b| b.is_ascii_digit())
        .count();
    text[start..start + digits].parse().ok()
}

/// The change id `"id":"<16 hex commit LSN>-<8 hex ordinal>"` of a frame.
fn position(text: &str) -> Option<(u64, u32)> {
    let start = text.find("\"id\":\"")? + 6;
    let id = text.get(start..start + 25)?;
    let (lsn, ord) = id.split_once('-')?;
    Some((
        u64::from_str_radix(lsn, 16).ok()?,
        u32::from_str_radix(ord, 16).ok()?,
    ))
}

/// What is wrong with a received stream: duplicates, out-of-order frames, and
/// transactions whose ordinals have holes.
fn diagnose(mut v: Vec<(u64, u32)>) -> Value {
    let out_of_order = v.windows(2).filter(|w| w[1] <= w[0]).count();
    v.sort_unstable();
    let before = v.len();
    v.dedup();
    let duplicates = before - v.len();
    let mut txs = 0;
    let mut holed = Vec::new();
    let mut i = 0;
    while i < v.len() {
        let lsn = v[i].0;
        let mut j = i;
        while j < v.len() && v[j].0 == lsn {
            j += 1;
        }
        txs += 1;
        let (first, last, n) = (v[i].1, v[j - 1].1, j - i);
        if first != 0 || last as usize + 1 != n {
            holed.push(
                json!({"commit_lsn": format!("{lsn:X}"), "first": first, "last": last, "count": n}),
            );
        }
        i = j;
    }
    holed.truncate(20);
    json!({
        "out_of_order": out_of_order,
        "duplicates": duplicates,
        "transactions": txs,
        "first": v.first().map(|p| format!("{:X}-{}", p.0, p.1)),
        "last": v.last().map(|p| format!("{:X}-{}", p.0, p.1)),
        "holed_transactions": holed,
    })
}

impl Shared {
    fn on_text(&self, text: &str) {
        if text.starts_with("{\"type\":\"change\"") {
            let recv = now_us();
            let n = self.changes.fetch_add(1, Ordering::Relaxed) + 1;
            if n == 1 {
                self.first_us.store(recv, Ordering::Relaxed);
            }
            self.last_us.fetch_max(recv, Ordering::Relaxed);
            if let Some(p) = &self.positions
                && let Some(pos) = position(text)
                && let Ok(mut v) = p.lock()
            {
                v.push(pos);
            }
            if let Some(t) = self.tracker.read().ok().and_then(|t| t.clone())
                && let Some(seq) = field_i64(text, "\"path\":\"s")
            {
                t.record(seq as u64, recv, field_i64(text, "\"timestamp\":"));
            }
            return;
        }
        self.note(text);
        if text.contains("\"action\":\"subscribed\"") {
            self.subscribed.fetch_add(1, Ordering::Relaxed);
        } else if text.contains("\"type\":\"error\"") {
            self.errors.fetch_add(1, Ordering::Relaxed);
            if let Ok(mut e) = self.first_error.lock()
                && e.is_none()
            {
                *e = Some(text.to_owned());
            }
        }
    }

    fn note(&self, text: &str) {
        if let Ok(mut v) = self.notes.lock()
            && v.len() < 10
        {
            let end = (0..=text.len().min(300))
                .rev()
                .find(|&i| text.is_char_boundary(i))
                .unwrap_or(0);
            v.push(text[..end].to_owned());
        }
    }

    pub fn error_text(&self) -> Option<String> {
        self.first_error.lock().ok().and_then(|e| e.clone())
    }
}

pub type Sink = futures_util::stream::SplitSink<WebSocketStream<tokio::net::TcpStream>, Message>;

/// The read buffer of each of many subscribers' sockets. The library's default
/// (128 KiB) is zero-filled before every read: with one small frame per read,
/// as a fan-out delivers, that was 65 % of the load process's CPU (perf), and
/// the load process shares the cores with the server it measures. A browser's
/// socket reads into a few KiB too.
pub const SUBSCRIBER_READ_BUFFER: usize = 4 * 1024;
/// A single bulk reader's (catch-up, big transactions): the library's default.
pub const BULK_READ_BUFFER: usize = 128 * 1024;

/// Opens a WebSocket from `source` (a 127.0.0.x address, to spread the 4-tuples) and
/// spawns its reader; returns the sending half.
pub async fn open(
    server: SocketAddr,
    token: &str,
    source: Option<Ipv4Addr>,
    read_buffer: usize,
    shared: &Arc<Shared>,
) -> anyhow::Result<Sink> {
    let sock = tokio::net::TcpSocket::new_v4()?;
    if let Some(ip) = source {
        sock.bind(SocketAddr::from((ip, 0)))?;
    }
    let stream = sock.connect(server).await?;
    stream.set_nodelay(true)?;
    let url = format!("ws://{server}/ws?token={token}");
    let config = tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default()
        .read_buffer_size(read_buffer);
    let (ws, _) = tokio_tungstenite::client_async_with_config(url, stream, Some(config)).await?;
    let (sink, mut stream) = ws.split();
    let shared = Arc::clone(shared);
    tokio::spawn(async move {
        while let Some(msg) = stream.next().await {
            match msg {
                Ok(Message::Text(t)) => shared.on_text(t.as_str()),
                Ok(Message::Close(c)) => {
                    if let Ok(mut e) = shared.first_error.lock()
                        && e.is_none()
                    {
                        *e = Some(format!("closed by server: {c:?}"));
                    }
                    break;
                }
                Ok(_) => {}
                Err(_) => break,
            }
        }
        shared.closed.fetch_add(1, Ordering::Relaxed);
    });
    Ok(sink)
}

pub fn subscribe_frame(id: &str, filter: Option<&str>) -> Message {
    Message::Text(subscribe_text(id, filter).into())
}

fn subscribe_text(id: &str, filter: Option<&str>) -> String {
    let mut data = json!({"id": id, "table": "files"});
    if let Some(f) = filter {
        data["filter"] = json!(f);
    }
    json!({"type": "subscription", "action": "subscribe", "data": data}).to_string()
}

/// Opens `n` connections, spread over `ips` source addresses, at most 256 connecting at once.
pub async fn open_many(
    server: SocketAddr,
    token: &str,
    n: usize,
    ips: u8,
    shared: &Arc<Shared>,
) -> anyhow::Result<Vec<Sink>> {
    let sem = Arc::new(Semaphore::new(256));
    let mut handles = Vec::with_capacity(n);
    for i in 0..n {
        let permit = Arc::clone(&sem).acquire_owned().await?;
        let token = token.to_owned();
        let shared = Arc::clone(shared);
        let ip = (ips > 0).then(|| Ipv4Addr::new(127, 0, 0, 2 + (i % ips as usize) as u8));
        handles.push(tokio::spawn(async move {
            let r = open(server, &token, ip, SUBSCRIBER_READ_BUFFER, &shared).await;
            drop(permit);
            r
        }));
    }
    let mut sinks = Vec::with_capacity(n);
    for h in handles {
        sinks.push(h.await??);
    }
    Ok(sinks)
}

pub async fn wait_subscribed(shared: &Shared, n: u64, within: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + within;
    while shared.subscribed.load(Ordering::Relaxed) < n {
        if Instant::now() > deadline {
            anyhow::bail!(
                "only {} of {n} subscriptions confirmed (errors: {}, closed: {}, first: {:?})",
                shared.subscribed.load(Ordering::Relaxed),
                shared.errors.load(Ordering::Relaxed),
                shared.closed.load(Ordering::Relaxed),
                shared.error_text()
            );
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Writing

pub struct Writer {
    clients: Vec<Arc<tokio_postgres::Client>>,
    stmts: Vec<tokio_postgres::Statement>,
    owner: uuid::Uuid,
    /// The number of the next row (`path` = `s<n>`); paths are unique per bucket, so
    /// a second load process on the same database starts elsewhere (`cluster`).
    pub next_seq: u64,
    /// PostgreSQL's own delivery of the same commits, when measured (see [`Reference`]).
    reference: Option<Arc<Shared>>,
    /// Other receivers of the same commits, each with a tracker of its own per step
    /// (`cluster`: the subscribers of each node).
    pub mirrors: Vec<Arc<Shared>>,
}

#[derive(Debug, Serialize)]
pub struct WriteStats {
    pub target_rate: f64,
    pub sent: u64,
    pub achieved_rate: f64,
    pub errors: u64,
}

impl Writer {
    pub async fn new(db: &str, conns: usize, owner: &str) -> anyhow::Result<Writer> {
        let mut clients = Vec::new();
        let mut stmts = Vec::new();
        for _ in 0..conns {
            let c = crate::env::connect(db).await?;
            // The bench cluster runs fsync=off with synchronous_commit=off by default;
            // with that, WAL is flushed (and so decoded) only every wal_writer_delay
            // (200 ms), which would dominate every latency. Commit flushes WAL here,
            // as with PostgreSQL's defaults (the flush itself is cheap with fsync=off).
            c.batch_execute("SET synchronous_commit = on").await?;
            let s = c
                .prepare(
                    "INSERT INTO public.files (bucket_id, folder_id, path, name, size, owner_id)
                     VALUES ('bench', $1, $2, $2, $3, $4)",
                )
                .await?;
            clients.push(Arc::new(c));
            stmts.push(s);
        }
        Ok(Writer {
            clients,
            stmts,
            owner: owner.parse()?,
            next_seq: 1,
            reference: None,
            mirrors: Vec::new(),
        })
    }

    /// One-row autocommit INSERTs paced at `rate` per second for `seconds`; change
    /// `i` of the step goes to folder `folder(i)`. Returns the step's tracker.
    pub async fn run(
        &mut self,
        shared: &Shared,
        rate: f64,
        seconds: f64,
        folder: impl Fn(u64) -> uuid::Uuid,
    ) -> anyhow::Result<(Arc<Tracker>, WriteStats)> {
        let total = ((rate * seconds).round() as u64).max(1);
        let base = self.next_seq;
        self.next_seq += total;
        let tracker = Tracker::new(base, total as usize);
        *shared.tracker.write().unwrap() = Some(Arc::clone(&tracker));
        let ref_tracker = self.reference.as_ref().map(|r| {
            let t = Tracker::new(base, total as usize);
            *r.tracker.write().unwrap() = Some(Arc::clone(&t));
            t
        });
        let mirror_trackers: Arc<Vec<Arc<Tracker>>> = Arc::new(
            self.mirrors
                .iter()
                .map(|m| {
                    let t = Tracker::new(base, total as usize);
                    *m.tracker.write().unwrap() = Some(Arc::clone(&t));
                    t
                })
                .collect(),
        );
        const INFLIGHT: u32 = 512;
        let sem = Arc::new(Semaphore::new(INFLIGHT as usize));
        let errors = Arc::new(AtomicU64::new(0));
        let start = Instant::now();
        let mut next = 0u64;
        while next < total {
            // Asleep until the next change is due, not on a fixed tick: a
            // 500 µs tick woke this process ~900 times a second whatever the
            // rate, and at 1 change/s those wakes competed with the fan-out's
            // subscriber threads for the two cores (load CPU 2x, context
            // switches 4x the null server's run, which paces the same way).
            let at = Duration::from_secs_f64(next as f64 / rate);
            tokio::time::sleep_until((start + at).into()).await;
            let due = ((start.elapsed().as_secs_f64() * rate) as u64 + 1).min(total);
            while next < due {
                let permit = Arc::clone(&sem).acquire_owned().await?;
                let i = next;
                next += 1;
                let k = (i as usize) % self.clients.len();
                let client = Arc::clone(&self.clients[k]);
                let stmt = self.stmts[k].clone();
                let folder_id = folder(i);
                let owner = self.owner;
                let path = format!("s{}", base + i);
                let tracker = Arc::clone(&tracker);
                let ref_tracker = ref_tracker.clone();
                let mirror_trackers = Arc::clone(&mirror_trackers);
                let errors = Arc::clone(&errors);
                tokio::spawn(async move {
                    let sent = now_us();
                    tracker.sent[i as usize].store(sent, Ordering::Relaxed);
                    if let Some(r) = &ref_tracker {
                        r.sent[i as usize].store(sent, Ordering::Relaxed);
                    }
                    for m in mirror_trackers.iter() {
                        m.sent[i as usize].store(sent, Ordering::Relaxed);
                    }
                    if client
                        .execute(&stmt, &[&folder_id, &path, &sent, &owner])
                        .await
                        .is_err()
                    {
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                    drop(permit);
                });
            }
        }
        let _all = sem.acquire_many(INFLIGHT).await?;
        let elapsed = start.elapsed().as_secs_f64();
        Ok((
            tracker,
            WriteStats {
                target_rate: rate,
                sent: total,
                achieved_rate: total as f64 / elapsed.max(seconds),
                errors: errors.load(Ordering::Relaxed),
            },
        ))
    }
}

/// PostgreSQL's own limit for live delivery: `pg_recvlogical` on a `test_decoding`
/// slot of its own, streaming the same commits as Aether's slot, its text output read
/// by this process. Its receive times go to the writer's reference tracker, so each
/// step has the walsender-to-plain-client latency of the very same changes.
struct Reference {
    child: tokio::process::Child,
    shared: Arc<Shared>,
}

impl Reference {
    const SLOT: &'static str = "bench_reference";

    async fn start(db: &str) -> anyhow::Result<Reference> {
        use anyhow::Context as _;
        let sql = crate::env::connect(db).await?;
        sql.batch_execute(&format!(
            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = '{s}';
             SELECT pg_create_logical_replication_slot('{s}', 'test_decoding')",
            s = Self::SLOT
        ))
        .await?;
        let bin = aether_postgres::store::embedded::find_bin_dir()?.join("pg_recvlogical");
        let mut child = tokio::process::Command::new(&bin)
            .args(["-d", db, "--slot", Self::SLOT, "--start", "-f", "-"])
            .args(["-o", "skip-empty-xacts=1", "-o", "include-xids=0"])
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("running {}", bin.display()))?;
        let out = child.stdout.take().context("pg_recvlogical stdout")?;
        let shared = Arc::new(Shared::default());
        let reader = Arc::clone(&shared);
        tokio::spawn(async move {
            use tokio::io::AsyncBufReadExt as _;
            let mut lines = tokio::io::BufReader::new(out).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                // table public.files: INSERT: … path[text]:'s123' …
                if let Some(seq) = field_i64(&line, "path[text]:'s") {
                    let recv = now_us();
                    if let Some(t) = reader.tracker.read().ok().and_then(|t| t.clone()) {
                        t.record(seq as u64, recv, None);
                    }
                }
            }
        });
        Ok(Reference { child, shared })
    }

    /// The step's latencies (µs) for changes sent from `from_us` on, once all `sent`
    /// arrived or 5 s passed, and how many did not arrive.
    async fn latencies(&self, sent: u64, from_us: i64) -> (Vec<i64>, usize) {
        let Some(t) = self.shared.tracker.read().ok().and_then(|t| t.clone()) else {
            return (Vec::new(), 0);
        };
        drain(&t, sent, Duration::from_secs(5)).await;
        let (lat, _, lost) = t.latencies(sent as usize, from_us, 1);
        (lat, lost)
    }

    async fn stop(mut self, db: &str) {
        let _ = self.child.kill().await;
        if let Ok(sql) = crate::env::connect(db).await {
            let _ = sql
                .batch_execute(&format!(
                    "SELECT pg_drop_replication_slot('{}')",
                    Self::SLOT
                ))
                .await;
        }
    }
}

/// Waits until the tracker holds `want` deliveries or `within` passes.
pub async fn drain(tracker: &Tracker, want: u64, within: Duration) {
    let deadline = Instant::now() + within;
    while tracker.deliveries.load(Ordering::Relaxed) < want && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Stragglers of the last few ms.
    tokio::time::sleep(Duration::from_millis(20)).await;
}

struct Xorshift(u64);
impl Xorshift {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
}

// ---------------------------------------------------------------------------
// Modes

async fn catch_up(
    server: SocketAddr,
    token: &str,
    expected: u64,
    timeout_s: u64,
) -> anyhow::Result<Value> {
    let shared = Arc::new(Shared {
        positions: Some(Mutex::new(Vec::with_capacity(expected as usize))),
        ..Shared::default()
    });
    let mut sink = open(server, token, None, BULK_READ_BUFFER, &shared).await?;
    sink.send(subscribe_frame("all", None)).await?;
    wait_subscribed(&shared, 1, Duration::from_secs(30)).await?;
    say("READY");
    wait_all(&shared, expected, timeout_s).await;
    let finished = shared.changes.load(Ordering::Relaxed) >= expected;
    let last = shared.last_us.load(Ordering::Relaxed);
    say(&format!("DONE {last}"));
    let positions = shared
        .positions
        .as_ref()
        .and_then(|p| p.lock().ok().map(|mut v| std::mem::take(&mut *v)))
        .unwrap_or_default();
    Ok(json!({
        "stream": diagnose(positions),
        "complete": finished,
        "received": shared.changes.load(Ordering::Relaxed),
        "expected": expected,
        "first_us": shared.first_us.load(Ordering::Relaxed),
        "last_us": last,
        "closed": shared.closed.load(Ordering::Relaxed),
        "error": shared.error_text(),
    }))
}

/// Waits for `expected` change frames, the connection's end, `timeout_s`, or 30 s
/// without a new frame; logs progress every 5 s.
async fn wait_all(shared: &Shared, expected: u64, timeout_s: u64) {
    let deadline = Instant::now() + Duration::from_secs(timeout_s);
    let mut last_count = 0;
    let mut last_change = Instant::now();
    let mut last_log = Instant::now();
    loop {
        let n = shared.changes.load(Ordering::Relaxed);
        if n >= expected || shared.closed.load(Ordering::Relaxed) > 0 || Instant::now() > deadline {
            return;
        }
        if n != last_count {
            last_count = n;
            last_change = Instant::now();
        } else if last_change.elapsed() > Duration::from_secs(30) {
            log(format!("stalled at {n} of {expected} change frames"));
            return;
        }
        if last_log.elapsed() > Duration::from_secs(5) {
            last_log = Instant::now();
            log(format!("{n} of {expected} change frames"));
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

async fn big_tx(
    server: SocketAddr,
    token: &str,
    db: &str,
    pid: u32,
    expected: u64,
    sql: &str,
    timeout_s: u64,
) -> anyhow::Result<Value> {
    let shared = Arc::new(Shared::default());
    let mut sink = open(server, token, None, BULK_READ_BUFFER, &shared).await?;
    sink.send(subscribe_frame("all", None)).await?;
    wait_subscribed(&shared, 1, Duration::from_secs(30)).await?;
    let client = crate::env::connect(db).await?;
    let rss_before = rss_kib(pid).unwrap_or(0);
    let cpu0 = cpu_seconds(pid).unwrap_or(0.0);
    let sampler = crate::proc::RssSampler::start(pid, Duration::from_millis(50));
    let start = now_us();
    log("running the UPDATE");
    client.batch_execute(sql).await?;
    let committed = now_us();
    log(format!(
        "committed after {:.1} s; waiting for {expected} events",
        (committed - start) as f64 / 1e6
    ));
    wait_all(&shared, expected, timeout_s).await;
    let finished = shared.changes.load(Ordering::Relaxed) >= expected;
    let peak = sampler.stop();
    let cpu1 = cpu_seconds(pid).unwrap_or(0.0);
    let first = shared.first_us.load(Ordering::Relaxed);
    let last = shared.last_us.load(Ordering::Relaxed);
    let received = shared.changes.load(Ordering::Relaxed);
    Ok(json!({
        "complete": finished,
        "received": received,
        "expected": expected,
        "update_s": (committed - start) as f64 / 1e6,
        "first_after_commit_s": (first - committed) as f64 / 1e6,
        "last_after_commit_s": (last - committed) as f64 / 1e6,
        "events_per_s_after_first": received as f64 / (((last - first) as f64 / 1e6).max(1e-6)),
        "rss_before_mib": rss_before as f64 / 1024.0,
        "rss_peak_mib": peak as f64 / 1024.0,
        "vm_hwm_mib": hwm_kib(pid).unwrap_or(0) as f64 / 1024.0,
        "rss_after_mib": rss_kib(pid).unwrap_or(0) as f64 / 1024.0,
        "aether_cpu_s": cpu1 - cpu0,
        "closed": shared.closed.load(Ordering::Relaxed),
        "error": shared.error_text(),
    }))
}

pub async fn folders(db: &str, prefix: &str, n: usize) -> anyhow::Result<Vec<uuid::Uuid>> {
    let c = crate::env::connect(db).await?;
    let ids = crate::env::folder_ids(&c, prefix, n).await?;
    anyhow::ensure!(ids.len() == n, "expected {n} folders, found {}", ids.len());
    Ok(ids)
}

#[derive(Serialize)]
struct LatencyRow {
    subscribers: usize,
    write: WriteStats,
    latency_ms: Summary,
    /// Receive time minus the Commit message's time (ms resolution).
    since_commit_ms: Summary,
    /// The reference step at the same rate: pg_recvlogical on a test_decoding slot
    /// (send time to receive time, like `latency_ms`): PostgreSQL's own limit.
    postgres_reference_ms: Option<Summary>,
    lost: usize,
    aether_cpu_us_per_change: f64,
    aether_rss_mib: f64,
}

async fn latency(spec: Spec) -> anyhow::Result<Value> {
    let Spec::Latency {
        server,
        token,
        db,
        aether_pid,
        owner,
        subscribers,
        rates,
        extra_rates,
        seconds,
        warmup_s,
        p99_limit_ms,
    } = spec
    else {
        unreachable!()
    };
    let max_subs = subscribers.iter().copied().max().unwrap_or(1);
    let folder_ids = folders(&db, "l", max_subs).await?;
    let mut writer = Writer::new(&db, 4, &owner).await?;
    // PostgreSQL's own limit, in steps of its own at each base rate: run next to
    // Aether's steps, the reference's second walsender and client would share the
    // two cores with them (at 5k/s that alone pushed Aether's p99 from 3 to 260 ms).
    // Aether stays connected (its walsender decodes too) but has no subscriber.
    let mut reference_rows = Vec::new();
    {
        let reference = Reference::start(&db).await?;
        writer.reference = Some(Arc::clone(&reference.shared));
        let nobody = Arc::new(Shared::default());
        for &rate in &rates {
            log(format!(
                "live-latency: reference (pg_recvlogical), {rate}/s"
            ));
            let from = now_us() + (warmup_s * 1e6) as i64;
            let (_, write) = writer
                .run(&nobody, rate, seconds + warmup_s, |i| {
                    folder_ids[(i as usize) % max_subs]
                })
                .await?;
            let (mut lat, lost) = reference.latencies(write.sent, from).await;
            reference_rows.push(json!({
                "rate": rate,
                "write": write,
                "latency_ms": summarize_us(&mut lat),
                "lost": lost,
            }));
        }
        writer.reference = None;
        reference.stop(&db).await;
    }
    let reference_at = |rate: f64| -> Option<Summary> {
        reference_rows
            .iter()
            .find(|r| r["rate"].as_f64() == Some(rate))
            .and_then(|r| serde_json::from_value(r["latency_ms"].clone()).ok())
    };
    let mut rows = Vec::new();
    let mut held = Vec::new();
    for &n in &subscribers {
        let shared = Arc::new(Shared::default());
        let mut sinks = open_many(server, &token, n, 10, &shared).await?;
        for (i, sink) in sinks.iter_mut().enumerate() {
            let filter = format!("folder_id=eq.{}", folder_ids[i]);
            sink.send(subscribe_frame(&format!("l{i}"), Some(&filter)))
                .await?;
        }
        wait_subscribed(&shared, n as u64, Duration::from_secs(60)).await?;
        let mut best: Option<f64> = None;
        let ladder: Vec<(f64, bool)> = rates
            .iter()
            .map(|&r| (r, false))
            .chain(extra_rates.iter().map(|&r| (r, true)))
            .collect();
        for (rate, extra) in ladder {
            if extra && best.is_none_or(|b| b < rates.iter().copied().fold(0.0, f64::max)) {
                break;
            }
            log(format!("live-latency: {n} subscribers, {rate}/s"));
            let cpu0 = cpu_seconds(aether_pid).unwrap_or(0.0);
            let from = now_us() + (warmup_s * 1e6) as i64;
            let (tracker, write) = writer
                .run(&shared, rate, seconds + warmup_s, |i| {
                    folder_ids[(i as usize) % n]
                })
                .await?;
            drain(&tracker, write.sent, Duration::from_secs(5)).await;
            let cpu1 = cpu_seconds(aether_pid).unwrap_or(0.0);
            let (mut lat, _, lost) = tracker.latencies(write.sent as usize, from, 1);
            let summary = summarize_us(&mut lat);
            let since_commit = summarize_us(&mut tracker.since_commit(write.sent as usize, from));
            let ok = summary.p99 < p99_limit_ms
                && lost == 0
                && write.achieved_rate >= 0.95 * rate
                && shared.closed.load(Ordering::Relaxed) == 0;
            if ok {
                best = Some(best.map_or(rate, |b: f64| b.max(rate)));
            }
            rows.push(LatencyRow {
                subscribers: n,
                aether_cpu_us_per_change: (cpu1 - cpu0) * 1e6 / write.sent as f64,
                aether_rss_mib: rss_kib(aether_pid).unwrap_or(0) as f64 / 1024.0,
                write,
                latency_ms: summary,
                since_commit_ms: since_commit,
                postgres_reference_ms: reference_at(rate),
                lost,
            });
            if !ok && extra {
                break;
            }
        }
        held.push(json!({"subscribers": n, "max_rate_p99_under_limit": best}));
        for mut s in sinks.drain(..) {
            let _ = s.close().await;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    Ok(
        json!({"p99_limit_ms": p99_limit_ms, "rows": rows, "held": held, "reference": reference_rows}),
    )
}

/// Microseconds as milliseconds, in the same order.
pub(crate) fn in_ms(us: &[i64]) -> Vec<f64> {
    us.iter().map(|&u| u as f64 / 1000.0).collect()
}

#[derive(Serialize)]
struct FanOutRow {
    rate: f64,
    write: WriteStats,
    last_subscriber_ms: Summary,
    /// The same, change by change in the order sent: where a tail comes from.
    last_subscriber_ms_by_change: Vec<f64>,
    first_subscriber_ms: Summary,
    /// The same, change by change: whether a slow change was slow upstream.
    first_subscriber_ms_by_change: Vec<f64>,
    /// The same changes to pg_recvlogical on a test_decoding slot: PostgreSQL's own
    /// delivery to one plain client.
    postgres_reference_ms: Summary,
    incomplete_changes: usize,
    deliveries: u64,
    aether_cpu_s_per_s: f64,
    /// Of which in the kernel (socket writes).
    aether_sys_s_per_s: f64,
    /// The load process's own CPU: it reads every one of the frames.
    load_cpu_s_per_s: f64,
    load_sys_s_per_s: f64,
    closed_connections: u64,
}

async fn fan_out(spec: Spec) -> anyhow::Result<Value> {
    let Spec::FanOut {
        server,
        token,
        db,
        aether_pid,
        owner,
        connections,
        source_ips,
        rates,
        seconds,
    } = spec
    else {
        unreachable!()
    };
    let folder = folders(&db, "f", 1).await?[0];
    let mut writer = Writer::new(&db, 2, &owner).await?;
    let reference = Reference::start(&db).await?;
    writer.reference = Some(Arc::clone(&reference.shared));
    let shared = Arc::new(Shared::default());
    let rss0 = rss_kib(aether_pid).unwrap_or(0);
    let t0 = Instant::now();
    log(format!(
        "fan-out: opening {connections} connections and subscribing"
    ));
    let subscribe = |i: usize| subscribe_text(&format!("f{i}"), None);
    let fleet =
        fleet::Fleet::open(server, &token, connections, source_ips, subscribe, &shared).await?;
    let opened_s = t0.elapsed().as_secs_f64();
    wait_subscribed(&shared, connections as u64, Duration::from_secs(120)).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss1 = rss_kib(aether_pid).unwrap_or(0);
    let mut rows = Vec::new();
    for &rate in &rates {
        log(format!(
            "fan-out: {connections} subscribers, {rate} changes/s"
        ));
        let me = std::process::id();
        let (au0, as0) = cpu_user_system(aether_pid).unwrap_or_default();
        let (lu0, ls0) = cpu_user_system(me).unwrap_or_default();
        let t = Instant::now();
        let (tracker, write) = writer.run(&shared, rate, seconds, |_| folder).await?;
        drain(
            &tracker,
            write.sent * connections as u64,
            Duration::from_secs(10),
        )
        .await;
        let (au1, as1) = cpu_user_system(aether_pid).unwrap_or_default();
        let (lu1, ls1) = cpu_user_system(me).unwrap_or_default();
        let (cpu, sys) = (au1 + as1 - au0 - as0, as1 - as0);
        let (load_cpu, load_sys) = (lu1 + ls1 - lu0 - ls0, ls1 - ls0);
        let (mut last, mut first, short) =
            tracker.latencies(write.sent as usize, 0, connections as u32);
        let (mut ref_lat, _) = reference.latencies(write.sent, 0).await;
        let (by_change, first_by_change) = (in_ms(&last), in_ms(&first));
        let row = FanOutRow {
            rate,
            last_subscriber_ms: summarize_us(&mut last),
            last_subscriber_ms_by_change: by_change,
            first_subscriber_ms: summarize_us(&mut first),
            first_subscriber_ms_by_change: first_by_change,
            postgres_reference_ms: summarize_us(&mut ref_lat),
            incomplete_changes: short,
            deliveries: tracker.deliveries.load(Ordering::Relaxed),
            aether_cpu_s_per_s: cpu / t.elapsed().as_secs_f64(),
            aether_sys_s_per_s: sys / t.elapsed().as_secs_f64(),
            load_cpu_s_per_s: load_cpu / t.elapsed().as_secs_f64(),
            load_sys_s_per_s: load_sys / t.elapsed().as_secs_f64(),
            closed_connections: shared.closed.load(Ordering::Relaxed),
            write,
        };
        let stop = row.closed_connections > 0 || row.last_subscriber_ms.p99 > 2000.0 || short > 0;
        rows.push(row);
        if stop {
            break;
        }
    }
    let rss2 = rss_kib(aether_pid).unwrap_or(0);
    fleet.close()?;
    reference.stop(&db).await;
    // The machine's floor at the first rate, with Aether idle (its sockets are
    // closed) and the same client.
    let frame_bytes = shared.frame_bytes.load(Ordering::Relaxed) as usize;
    // Its failure is reported beside Aether's rows, which stand without it.
    let bare = match rates.first() {
        Some(_) if frame_bytes == 0 => {
            json!({"error": "not measured: Aether sent no change frame to size it by"})
        }
        Some(&rate) => {
            log(format!(
                "fan-out: the null server's floor, {rate} changes/s"
            ));
            match bare::measure(connections, source_ips, frame_bytes, rate, seconds).await {
                Ok(row) => json!(row),
                Err(e) => json!({"error": format!("not measured: {e:#}")}),
            }
        }
        None => Value::Null,
    };
    Ok(json!({
        "connections": connections,
        "source_ips": source_ips,
        "connect_s": opened_s,
        "rss_idle_mib": rss0 as f64 / 1024.0,
        "rss_connected_mib": rss1 as f64 / 1024.0,
        "rss_end_mib": rss2 as f64 / 1024.0,
        "kib_per_connection": (rss1 as f64 - rss0 as f64) / connections as f64,
        "rows": rows,
        "bare_sockets": bare,
        "error": shared.error_text(),
    }))
}

#[derive(Serialize)]
struct RoutingRow {
    subscriptions: usize,
    write: WriteStats,
    delivered: u64,
    aether_cpu_us_per_change: f64,
    latency_ms: Summary,
    aether_rss_mib: f64,
    subscribe_s: f64,
}

async fn routing(spec: Spec) -> anyhow::Result<Value> {
    let Spec::Routing {
        server,
        token,
        db,
        aether_pid,
        owner,
        steps,
        connections,
        rate,
        seconds,
    } = spec
    else {
        unreachable!()
    };
    let max = steps.iter().copied().max().unwrap_or(0).max(1);
    let folder_ids = folders(&db, "r", max).await?;
    let mut writer = Writer::new(&db, 4, &owner).await?;
    let shared = Arc::new(Shared::default());
    let mut sinks = open_many(server, &token, connections, 10, &shared).await?;
    let mut subscribed = 0usize;
    let mut rng = Xorshift(0x9E37_79B9_7F4A_7C15);
    let mut rows = Vec::new();
    for &n in &steps {
        let t = Instant::now();
        // In windows of 200 per connection: the replies share each connection's
        // bounded queue with changes, and a burst must not overflow it.
        while subscribed < n {
            let window = (n - subscribed).min(200 * connections);
            for k in 0..window {
                let i = subscribed + k;
                let filter = format!("folder_id=eq.{}", folder_ids[i]);
                sinks[i % connections]
                    .feed(subscribe_frame(&format!("r{i}"), Some(&filter)))
                    .await?;
            }
            for s in sinks.iter_mut() {
                s.flush().await?;
            }
            subscribed += window;
            wait_subscribed(&shared, subscribed as u64, Duration::from_secs(120)).await?;
        }
        let subscribe_s = t.elapsed().as_secs_f64();
        log(format!(
            "filtered-routing: {n} subscriptions, {rate} changes/s"
        ));
        tokio::time::sleep(Duration::from_millis(500)).await;
        let cpu0 = cpu_seconds(aether_pid).unwrap_or(0.0);
        let picks: Vec<usize> = (0..(rate * seconds) as usize + 1)
            .map(|_| (rng.next() as usize) % n.max(1))
            .collect();
        let (tracker, write) = writer
            .run(&shared, rate, seconds, |i| folder_ids[picks[i as usize]])
            .await?;
        let want = if n > 0 { write.sent } else { 0 };
        drain(&tracker, want, Duration::from_secs(5)).await;
        let cpu1 = cpu_seconds(aether_pid).unwrap_or(0.0);
        let (mut lat, _, _) = tracker.latencies(write.sent as usize, 0, 1);
        rows.push(RoutingRow {
            subscriptions: n,
            delivered: tracker.deliveries.load(Ordering::Relaxed),
            aether_cpu_us_per_change: (cpu1 - cpu0) * 1e6 / write.sent as f64,
            latency_ms: summarize_us(&mut lat),
            aether_rss_mib: rss_kib(aether_pid).unwrap_or(0) as f64 / 1024.0,
            subscribe_s,
            write,
        });
    }
    // Counted before our own closes: the server's answer to one would count
    // as the server closing the connection.
    let (closed, error) = (shared.closed.load(Ordering::Relaxed), shared.error_text());
    for mut s in sinks.drain(..) {
        let _ = s.close().await;
    }
    Ok(json!({
        "connections": connections,
        "rows": rows,
        "closed": closed,
        "error": error,
    }))
}
