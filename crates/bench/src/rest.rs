//! The load process's side of the `rest` scenario: sign-ups, then sign-ins at rising
//! concurrency; and one big upload streamed from a generated pattern, then its
//! download compared against the same pattern.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use serde::Serialize;
use serde_json::{Value, json};

use crate::http::Http;
use crate::load::log;
use crate::proc::{
    RssSampler, cpu_seconds, cpu_user_system, machine_busy_seconds, rss_kib, tree_cpu_seconds,
};
use crate::stats::{Summary, summarize_us};

pub const PASSWORD: &str = "bench-password-1";

fn email(i: usize) -> String {
    format!("bench-user-{i}@example.com")
}

fn credentials(email: &str) -> Vec<u8> {
    json!({"email": email, "password": PASSWORD})
        .to_string()
        .into_bytes()
}

const JSON: (&str, &str) = ("Content-Type", "application/json");

/// Signs `email` up; returns (user id, access token).
async fn sign_up(conn: &mut Http, email: &str) -> anyhow::Result<(String, String)> {
    let (head, body) = conn
        .request("POST", "/auth/sign-up", &[JSON], &credentials(email))
        .await?;
    if head.status != 201 {
        bail!(
            "sign-up of {email} answered {}: {}",
            head.status,
            String::from_utf8_lossy(&body)
        );
    }
    let v: Value = serde_json::from_slice(&body)?;
    let id = v["user"]["id"].as_str().context("sign-up: no user.id")?;
    let token = v["session"]["access_token"]
        .as_str()
        .context("sign-up: no session.access_token")?;
    Ok((id.to_owned(), token.to_owned()))
}

#[derive(Serialize)]
struct SignInRow {
    concurrency: usize,
    /// Requests started in the measured window (all completed).
    requests: u64,
    seconds: f64,
    per_s: f64,
    latency_ms: Summary,
    /// Responses by status code.
    statuses: BTreeMap<u16, u64>,
    non_200: u64,
    /// Requests that got no response (connection errors).
    errors: u64,
    aether_cores: f64,
    /// Of `aether_cores`, kernel time (page faults, syscalls).
    aether_system_cores: f64,
    load_cores: f64,
    /// The cluster's postmaster and backends.
    postgres_cores: f64,
    /// The whole machine's busy cores: Aether, PostgreSQL, the load, anything else.
    machine_cores: f64,
    /// `machine_cores` less Aether, PostgreSQL and the load: other work on the box.
    other_cores: f64,
    aether_rss_peak_mib: f64,
    aether_rss_after_mib: f64,
}

#[derive(Default)]
struct WorkerOut {
    lat_us: Vec<i64>,
    statuses: BTreeMap<u16, u64>,
    errors: u64,
    last_done: Option<Instant>,
    first_error: Option<String>,
}

/// Sign-ins on one connection until `deadline`; requests started before `measure`
/// are warm-up and not recorded.
async fn sign_in_worker(
    server: SocketAddr,
    users: Arc<Vec<Vec<u8>>>,
    first: usize,
    stride: usize,
    measure: Instant,
    deadline: Instant,
) -> WorkerOut {
    let mut out = WorkerOut::default();
    let mut conn: Option<Http> = None;
    let mut k = first;
    while Instant::now() < deadline {
        let c = match conn.as_mut() {
            Some(c) => c,
            None => match Http::connect(server).await {
                Ok(c) => conn.insert(c),
                Err(e) => {
                    out.errors += 1;
                    out.first_error.get_or_insert(format!("{e:#}"));
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
        };
        let body = &users[k % users.len()];
        k += stride;
        let start = Instant::now();
        let r = c.request("POST", "/auth/sign-in", &[JSON], body).await;
        let done = Instant::now();
        let recorded = start >= measure;
        match r {
            Ok((head, resp)) => {
                if head.close {
                    conn = None;
                }
                if recorded {
                    out.lat_us
                        .push(done.duration_since(start).as_micros() as i64);
                    *out.statuses.entry(head.status).or_default() += 1;
                    out.last_done = Some(done);
                }
                if head.status != 200 {
                    out.first_error.get_or_insert(format!(
                        "{}: {}",
                        head.status,
                        String::from_utf8_lossy(&resp)
                    ));
                }
            }
            Err(e) => {
                conn = None;
                if recorded {
                    out.errors += 1;
                    out.last_done = Some(done);
                }
                out.first_error.get_or_insert(format!("{e:#}"));
            }
        }
    }
    out
}

#[allow(clippy::too_many_arguments)]
pub async fn sign_in(
    server: SocketAddr,
    aether_pid: u32,
    pg_pid: Option<u32>,
    users: usize,
    signup_concurrency: usize,
    steps: &[usize],
    seconds: f64,
    warmup_s: f64,
) -> anyhow::Result<Value> {
    // Sign-ups: `signup_concurrency` connections, each taking every n-th user.
    let rss_idle = rss_kib(aether_pid).unwrap_or(0);
    log(format!(
        "rest: signing up {users} users over {signup_concurrency} connections"
    ));
    let t = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..signup_concurrency {
        tasks.push(tokio::spawn(async move {
            let mut conn = Http::connect(server).await?;
            for i in (w..users).step_by(signup_concurrency) {
                sign_up(&mut conn, &email(i)).await?;
            }
            anyhow::Ok(())
        }));
    }
    for h in tasks {
        h.await??;
    }
    let signup_s = t.elapsed().as_secs_f64();
    let rss_signed_up = rss_kib(aether_pid).unwrap_or(0);
    let bodies: Arc<Vec<Vec<u8>>> = Arc::new((0..users).map(|i| credentials(&email(i))).collect());
    let me = std::process::id();
    let mut rows = Vec::new();
    let mut first_error = None;
    for &c in steps {
        log(format!(
            "rest: sign-in, {c} concurrent clients, {seconds} s"
        ));
        let start = Instant::now();
        let measure = start + Duration::from_secs_f64(warmup_s);
        let deadline = measure + Duration::from_secs_f64(seconds);
        let handles: Vec<_> = (0..c)
            .map(|w| {
                let bodies = Arc::clone(&bodies);
                tokio::spawn(sign_in_worker(server, bodies, w, c, measure, deadline))
            })
            .collect();
        tokio::time::sleep_until(measure.into()).await;
        let (user0, sys0) = cpu_user_system(aether_pid).unwrap_or_default();
        let load0 = cpu_seconds(me).unwrap_or(0.0);
        let busy0 = machine_busy_seconds().unwrap_or(0.0);
        let pg0 = pg_pid.and_then(tree_cpu_seconds).unwrap_or(0.0);
        let sampler = RssSampler::start(aether_pid, Duration::from_millis(50));
        let mut all = WorkerOut::default();
        for h in handles {
            let o = h.await?;
            all.lat_us.extend(o.lat_us);
            for (s, n) in o.statuses {
                *all.statuses.entry(s).or_default() += n;
            }
            all.errors += o.errors;
            all.last_done = all.last_done.max(o.last_done);
            if all.first_error.is_none() {
                all.first_error = o.first_error;
            }
        }
        let end = Instant::now();
        let (user1, sys1) = cpu_user_system(aether_pid).unwrap_or_default();
        let (cpu, sys) = (user1 + sys1 - user0 - sys0, sys1 - sys0);
        let load_cpu = cpu_seconds(me).unwrap_or(0.0) - load0;
        let busy = machine_busy_seconds().unwrap_or(0.0) - busy0;
        let pg = pg_pid.and_then(tree_cpu_seconds).unwrap_or(0.0) - pg0;
        let peak = sampler.stop();
        // The window: from `measure` to the last recorded completion.
        let window = all
            .last_done
            .unwrap_or(end)
            .saturating_duration_since(measure)
            .as_secs_f64()
            .max(1e-6);
        let wall = end.duration_since(measure).as_secs_f64().max(1e-6);
        let requests = all.lat_us.len() as u64 + all.errors;
        let non_200 = all
            .statuses
            .iter()
            .filter(|(s, _)| **s != 200)
            .map(|(_, n)| n)
            .sum();
        if first_error.is_none() {
            first_error = all.first_error.clone();
        }
        rows.push(SignInRow {
            concurrency: c,
            requests,
            seconds: window,
            per_s: all.lat_us.len() as f64 / window,
            latency_ms: summarize_us(&mut all.lat_us),
            statuses: all.statuses,
            non_200,
            errors: all.errors,
            aether_cores: cpu / wall,
            aether_system_cores: sys / wall,
            load_cores: load_cpu / wall,
            postgres_cores: pg / wall,
            machine_cores: busy / wall,
            other_cores: ((busy - cpu - pg - load_cpu) / wall).max(0.0),
            aether_rss_peak_mib: peak as f64 / 1024.0,
            aether_rss_after_mib: rss_kib(aether_pid).unwrap_or(0) as f64 / 1024.0,
        });
    }
    Ok(json!({
        "users": users,
        "sign_up": {
            "concurrency": signup_concurrency,
            "seconds": signup_s,
            "per_s": users as f64 / signup_s,
        },
        "warmup_s": warmup_s,
        "aether_rss_idle_mib": rss_idle as f64 / 1024.0,
        "aether_rss_after_sign_up_mib": rss_signed_up as f64 / 1024.0,
        "rows": rows,
        "first_error": first_error,
    }))
}

// ---------------------------------------------------------------------------
// Upload and download

/// The bytes sent: a pseudo-random MiB repeated (incompressible, and checkable on
/// the way back without keeping a copy).
struct Pattern(Vec<u8>);

impl Pattern {
    fn new() -> Pattern {
        let mut x: u64 = 0x2545_F491_4F6C_DD1D;
        let mut v = Vec::with_capacity(1 << 20);
        while v.len() < 1 << 20 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            v.extend_from_slice(&x.to_le_bytes());
        }
        Pattern(v)
    }

    /// Whether `chunk` is the pattern's bytes from file offset `at`.
    fn matches(&self, mut at: u64, mut chunk: &[u8]) -> bool {
        let len = self.0.len() as u64;
        while !chunk.is_empty() {
            let i = (at % len) as usize;
            let n = chunk.len().min(self.0.len() - i);
            if chunk[..n] != self.0[i..i + n] {
                return false;
            }
            chunk = &chunk[n..];
            at += n as u64;
        }
        true
    }
}

const BOUNDARY: &str = "aether-bench-boundary-7f3a9c";

pub async fn upload(
    server: SocketAddr,
    aether_pid: u32,
    bytes: u64,
    bucket: &str,
    path: &str,
    content_type: &str,
    download: bool,
) -> anyhow::Result<Value> {
    let pattern = Pattern::new();
    let mut conn = Http::connect(server).await?;
    let (user_id, token) = sign_up(&mut conn, "bench-uploader@example.com").await?;
    let auth = format!("Bearer {token}");
    let file_name = path.rsplit('/').next().unwrap_or(path);
    let form_head = format!(
        "--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"bucket\"\r\n\r\n{bucket}\r\n\
         --{BOUNDARY}\r\nContent-Disposition: form-data; name=\"path\"\r\n\r\n{path}\r\n\
         --{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{file_name}\"\r\n\
         Content-Type: {content_type}\r\n\r\n"
    );
    let form_tail = format!("\r\n--{BOUNDARY}--\r\n");
    let length = form_head.len() as u64 + bytes + form_tail.len() as u64;
    let content_type_header = format!("multipart/form-data; boundary={BOUNDARY}");
    let head = conn.head(
        "POST",
        "/storage/upload",
        &[
            ("Authorization", &auth),
            ("Content-Type", &content_type_header),
        ],
        length,
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    let me = std::process::id();
    let rss_before = rss_kib(aether_pid).unwrap_or(0);
    let cpu0 = cpu_seconds(aether_pid).unwrap_or(0.0);
    let load0 = cpu_seconds(me).unwrap_or(0.0);
    let sampler = RssSampler::start(aether_pid, Duration::from_millis(50));
    log(format!("rest: uploading {} MiB", bytes as f64 / 1048576.0));
    let start = Instant::now();
    let mut req = head.into_bytes();
    req.extend_from_slice(form_head.as_bytes());
    let mut sent = 0u64;
    let mut write_error = None;
    let mut next_log = bytes / 4;
    if let Err(e) = conn.write(&req).await {
        write_error = Some(e);
    }
    while write_error.is_none() && sent < bytes {
        let n = (bytes - sent).min(pattern.0.len() as u64) as usize;
        if let Err(e) = conn.write(&pattern.0[..n]).await {
            write_error = Some(e);
            break;
        }
        sent += n as u64;
        if sent >= next_log && sent < bytes {
            log(format!(
                "rest: {} MiB sent, Aether RSS {} MiB",
                sent >> 20,
                rss_kib(aether_pid).unwrap_or(0) >> 10
            ));
            next_log += bytes / 4;
        }
    }
    if write_error.is_none()
        && let Err(e) = conn.write(form_tail.as_bytes()).await
    {
        write_error = Some(e);
    }
    let sent_s = start.elapsed().as_secs_f64();
    // The answer (an early refusal, too, when the write failed).
    let answer = async {
        let h = conn.read_head().await?;
        let mut body = Vec::new();
        conn.read_body(&h, |b| body.extend_from_slice(b)).await?;
        anyhow::Ok((h, body))
    }
    .await;
    let total_s = start.elapsed().as_secs_f64();
    let peak = sampler.stop();
    let cpu = cpu_seconds(aether_pid).unwrap_or(0.0) - cpu0;
    let load_cpu = cpu_seconds(me).unwrap_or(0.0) - load0;
    let rss_after = rss_kib(aether_pid).unwrap_or(0);
    let (status, response): (u16, Value) = match &answer {
        Ok((h, body)) => (
            h.status,
            serde_json::from_slice(body).unwrap_or_else(|_| json!(String::from_utf8_lossy(body))),
        ),
        Err(e) => (0, json!(format!("{e:#}"))),
    };
    if let Some(e) = write_error {
        bail!(
            "upload: sending failed after {sent} of {bytes} bytes: {e}; response {status}: {response}"
        );
    }
    if status != 201 {
        bail!("upload answered {status}: {response}");
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss_settled = rss_kib(aether_pid).unwrap_or(0);
    let mib = bytes as f64 / 1048576.0;
    let mut out = json!({
        "bytes": bytes,
        "user_id": user_id,
        "status": status,
        "response": response,
        "seconds": total_s,
        "mib_per_s": mib / total_s,
        "last_byte_sent_s": sent_s,
        "response_after_last_byte_s": total_s - sent_s,
        "rss_before_mib": rss_before as f64 / 1024.0,
        "rss_peak_mib": peak as f64 / 1024.0,
        "rss_after_mib": rss_after as f64 / 1024.0,
        "rss_after_1s_mib": rss_settled as f64 / 1024.0,
        "aether_cpu_s": cpu,
        "load_cpu_s": load_cpu,
    });
    if download {
        out["download"] = fetch(
            server,
            aether_pid,
            &auth,
            &format!("/storage/object/{bucket}/{user_id}/{path}"),
            bytes,
            &pattern,
        )
        .await?;
        out["small_reads"] = small_reads(
            server,
            aether_pid,
            &auth,
            &format!("/storage/object/{bucket}/{user_id}/{path}"),
            SMALL_READS,
        )
        .await?;
    }
    Ok(out)
}

/// How many small reads [`small_reads`] makes.
const SMALL_READS: usize = 2000;

/// `n` GETs of the first KiB of `url`, one after another on one connection:
/// what a read costs apart from its bytes (the token, the row, the access
/// check, the blob's opening).
async fn small_reads(
    server: SocketAddr,
    aether_pid: u32,
    auth: &str,
    url: &str,
    n: usize,
) -> anyhow::Result<Value> {
    let mut conn = Http::connect(server).await?;
    log(format!("rest: {n} reads of 1 KiB"));
    let cpu0 = cpu_seconds(aether_pid).unwrap_or(0.0);
    let mut took_us: Vec<f64> = Vec::with_capacity(n);
    let start = Instant::now();
    for _ in 0..n {
        let req = conn.head(
            "GET",
            url,
            &[("Authorization", auth), ("Range", "bytes=0-1023")],
            0,
        );
        let t = Instant::now();
        conn.write(req.as_bytes()).await?;
        let head = conn.read_head().await?;
        conn.read_body(&head, |_| {}).await?;
        if head.status != 206 {
            bail!("a small read answered {}", head.status);
        }
        took_us.push(t.elapsed().as_secs_f64() * 1e6);
    }
    let total_s = start.elapsed().as_secs_f64();
    let cpu = cpu_seconds(aether_pid).unwrap_or(0.0) - cpu0;
    took_us.sort_by(f64::total_cmp);
    let at = |q: f64| took_us[((took_us.len() as f64 - 1.0) * q).round() as usize];
    Ok(json!({
        "reads": n,
        "per_s": n as f64 / total_s,
        "p50_ms": at(0.5) / 1000.0,
        "p99_ms": at(0.99) / 1000.0,
        "aether_cpu_us_per_read": cpu * 1e6 / n as f64,
    }))
}

/// GET `url` and compare the body with the pattern.
async fn fetch(
    server: SocketAddr,
    aether_pid: u32,
    auth: &str,
    url: &str,
    bytes: u64,
    pattern: &Pattern,
) -> anyhow::Result<Value> {
    let mut conn = Http::connect(server).await?;
    let req = conn.head("GET", url, &[("Authorization", auth)], 0);
    let rss_before = rss_kib(aether_pid).unwrap_or(0);
    let cpu0 = cpu_seconds(aether_pid).unwrap_or(0.0);
    let sampler = RssSampler::start(aether_pid, Duration::from_millis(50));
    log(format!(
        "rest: downloading {} MiB",
        bytes as f64 / 1048576.0
    ));
    let start = Instant::now();
    conn.write(req.as_bytes()).await?;
    let head = conn.read_head().await?;
    let first_byte_s = start.elapsed().as_secs_f64();
    let mut at = 0u64;
    let mut mismatch: Option<u64> = None;
    let got = conn
        .read_body(&head, |chunk| {
            if mismatch.is_none() && !pattern.matches(at, chunk) {
                mismatch = Some(at);
            }
            at += chunk.len() as u64;
        })
        .await?;
    let total_s = start.elapsed().as_secs_f64();
    let peak = sampler.stop();
    let cpu = cpu_seconds(aether_pid).unwrap_or(0.0) - cpu0;
    if head.status != 200 {
        bail!("download answered {}", head.status);
    }
    Ok(json!({
        "status": head.status,
        "bytes": got,
        "content_length": head.length,
        "verified": got == bytes && mismatch.is_none(),
        "first_mismatch_at": mismatch,
        "first_byte_s": first_byte_s,
        "seconds": total_s,
        "mib_per_s": got as f64 / 1048576.0 / total_s,
        "rss_before_mib": rss_before as f64 / 1024.0,
        "rss_peak_mib": peak as f64 / 1024.0,
        "rss_after_mib": rss_kib(aether_pid).unwrap_or(0) as f64 / 1024.0,
        "aether_cpu_s": cpu,
    }))
}
