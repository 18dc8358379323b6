//! A fan-out's practical floor on this machine: the same subscribers, read by
//! the same client, fed by a server that does nothing but write.
//!
//! On one box the server, the load process and the kernel's TCP processing on
//! both ends of every loopback socket share the cores, so "time until the last
//! of N subscribers has a change" cannot go much under what writing alone
//! takes. This measures that: a child process (this binary, `null-server`) accepts the
//! WebSocket upgrades, confirms each subscription with a canned reply and, for
//! each change the load process names on its stdin, writes one prebuilt
//! frame of the same size as Aether's to every socket from one thread per
//! core. No WAL, decoding, log, routing, policy, queue or task scheduling is
//! on that path.

use std::io::{BufRead, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};

use super::fleet::Fleet;
use super::{Shared, Tracker, drain, log, subscribe_text, wait_subscribed};
use crate::proc::{cpu_user_system, now_us};
use crate::stats::{Summary, summarize_us};

/// Writer threads in the null server: one per core, as Aether's runtime has.
fn writers() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get())
}

#[derive(Serialize)]
pub struct BareRow {
    pub rate: f64,
    pub changes: u64,
    pub frame_bytes: usize,
    pub writer_threads: usize,
    pub last_subscriber_ms: Summary,
    /// The same, change by change in the order sent.
    pub last_subscriber_ms_by_change: Vec<f64>,
    pub first_subscriber_ms: Summary,
    pub incomplete_changes: usize,
    /// Writes that failed or wrote less than a whole frame (a broken frame
    /// stream): none, or the row does not measure what it says.
    pub short_writes: Option<u64>,
    pub closed_connections: u64,
    /// The null server's CPU (socket writes only), in cores over the step.
    pub server_cpu_s_per_s: f64,
    pub server_sys_s_per_s: f64,
    /// The same, per change sent.
    pub server_cpu_s_per_change: f64,
    pub load_cpu_s_per_s: f64,
    pub load_sys_s_per_s: f64,
    pub error: Option<String>,
}

/// Opens `connections` subscribers on a null server and sends `rate` changes
/// a second for `seconds`, each a text frame of `frame_bytes`.
pub async fn measure(
    connections: usize,
    source_ips: u8,
    frame_bytes: usize,
    rate: f64,
    seconds: f64,
) -> anyhow::Result<BareRow> {
    let mut child = tokio::process::Command::new(std::env::current_exe()?)
        .arg("null-server")
        .arg("--frame-bytes")
        .arg(frame_bytes.to_string())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let server_pid = child.id().unwrap_or(0);
    let mut stdin = child
        .stdin
        .take()
        .ok_or_else(|| anyhow::anyhow!("no stdin"))?;
    let mut lines = tokio::io::BufReader::new(
        child
            .stdout
            .take()
            .ok_or_else(|| anyhow::anyhow!("no stdout"))?,
    )
    .lines();
    let port: u16 = tokio::time::timeout(Duration::from_secs(10), lines.next_line())
        .await??
        .and_then(|l| l.strip_prefix("PORT ").and_then(|p| p.parse().ok()))
        .ok_or_else(|| anyhow::anyhow!("the null server did not say its port"))?;
    let server = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    log(format!("bare sockets: opening {connections} connections"));
    let shared = Arc::new(Shared::default());
    let subscribe = |i: usize| subscribe_text(&format!("f{i}"), None);
    let fleet = Fleet::open(server, "-", connections, source_ips, subscribe, &shared).await?;
    wait_subscribed(&shared, connections as u64, Duration::from_secs(120)).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;

    let total = ((rate * seconds).round() as u64).max(1);
    let tracker = Tracker::new(1, total as usize);
    *shared
        .tracker
        .write()
        .map_err(|_| anyhow::anyhow!("poisoned"))? = Some(Arc::clone(&tracker));
    let me = std::process::id();
    let (su0, ss0) = cpu_user_system(server_pid).unwrap_or_default();
    let (lu0, ls0) = cpu_user_system(me).unwrap_or_default();
    let start = std::time::Instant::now();
    for i in 0..total {
        let due = Duration::from_secs_f64(i as f64 / rate);
        tokio::time::sleep(due.saturating_sub(start.elapsed())).await;
        tracker.sent[i as usize].store(now_us(), std::sync::atomic::Ordering::Relaxed);
        stdin.write_all(format!("{}\n", i + 1).as_bytes()).await?;
        stdin.flush().await?;
    }
    drain(
        &tracker,
        total * connections as u64,
        Duration::from_secs(10),
    )
    .await;
    let elapsed = start.elapsed().as_secs_f64();
    let (su1, ss1) = cpu_user_system(server_pid).unwrap_or_default();
    let (lu1, ls1) = cpu_user_system(me).unwrap_or_default();
    let (mut last, mut first, short) = tracker.latencies(total as usize, 0, connections as u32);
    // Before the null server goes, which closes every socket.
    let closed = shared.closed.load(std::sync::atomic::Ordering::Relaxed);
    let error = shared.error_text();
    // The end of its input: the null server says how many writes fell short.
    drop(stdin);
    let short_writes = tokio::time::timeout(Duration::from_secs(10), lines.next_line())
        .await
        .ok()
        .and_then(Result::ok)
        .flatten()
        .and_then(|l| l.strip_prefix("SHORT ").and_then(|n| n.parse().ok()));
    fleet.close()?;
    let _ = tokio::time::timeout(Duration::from_secs(5), child.wait()).await;
    let server_cpu = su1 + ss1 - su0 - ss0;
    Ok(BareRow {
        rate,
        changes: total,
        frame_bytes,
        writer_threads: writers(),
        last_subscriber_ms_by_change: super::in_ms(&last),
        last_subscriber_ms: summarize_us(&mut last),
        first_subscriber_ms: summarize_us(&mut first),
        incomplete_changes: short,
        short_writes,
        closed_connections: closed,
        server_cpu_s_per_s: server_cpu / elapsed,
        server_sys_s_per_s: (ss1 - ss0) / elapsed,
        server_cpu_s_per_change: server_cpu / total as f64,
        load_cpu_s_per_s: (lu1 + ls1 - lu0 - ls0) / elapsed,
        load_sys_s_per_s: (ls1 - ls0) / elapsed,
        error,
    })
}

/// The null server's process: prints `PORT <n>`, accepts upgrades, and for
/// each line `<seq>` on stdin writes change `seq` to every socket. At the
/// end of stdin it prints `SHORT <n>`, the writes that fell short, and ends.
pub fn null_server(frame_bytes: usize) -> anyhow::Result<()> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let port = listener.local_addr()?.port();
    let n = writers();
    let shards: Arc<Vec<Mutex<Vec<TcpStream>>>> =
        Arc::new((0..n).map(|_| Mutex::new(Vec::new())).collect());
    {
        let shards = Arc::clone(&shards);
        std::thread::Builder::new()
            .name("accept".into())
            .spawn(move || accept_loop(&listener, &shards))?;
    }
    let short = Arc::new(AtomicU64::new(0));
    let mut senders = Vec::new();
    let mut threads = Vec::new();
    for k in 0..n {
        let (tx, rx) = mpsc::channel::<Arc<Vec<u8>>>();
        let (shards, short) = (Arc::clone(&shards), Arc::clone(&short));
        threads.push(
            std::thread::Builder::new()
                .name("write".into())
                .spawn(move || {
                    for frame in rx {
                        let Ok(mut socks) = shards[k].lock() else {
                            return;
                        };
                        for s in socks.iter_mut() {
                            // Non-blocking: a frame this small fits an idle socket.
                            if !matches!(s.write(&frame), Ok(w) if w == frame.len()) {
                                short.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    }
                })?,
        );
        senders.push(tx);
    }
    let mut out = std::io::stdout().lock();
    writeln!(out, "PORT {port}")?;
    out.flush()?;
    for line in std::io::stdin().lock().lines() {
        let Ok(seq) = line?.trim().parse::<u64>() else {
            continue;
        };
        let frame = Arc::new(change_frame(seq, frame_bytes));
        for w in &senders {
            let _ = w.send(Arc::clone(&frame));
        }
    }
    drop(senders);
    for t in threads {
        let _ = t.join();
    }
    writeln!(out, "SHORT {}", short.load(Ordering::Relaxed))?;
    out.flush()?;
    Ok(())
}

fn accept_loop(listener: &TcpListener, shards: &[Mutex<Vec<TcpStream>>]) {
    let mut next = 0;
    for stream in listener.incoming() {
        let Ok(mut s) = stream else {
            // Out of descriptors, say: let some go before trying again.
            std::thread::sleep(Duration::from_millis(10));
            continue;
        };
        if upgrade(&mut s).is_err() {
            continue;
        }
        if let Ok(mut shard) = shards[next % shards.len()].lock() {
            shard.push(s);
        }
        next += 1;
    }
}

/// Reads the client's upgrade request and answers it, with the subscription
/// already confirmed.
fn upgrade(s: &mut TcpStream) -> std::io::Result<()> {
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut got = Vec::new();
    let mut chunk = [0u8; 1024];
    while !got.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = s.read(&mut chunk)?;
        if n == 0 || got.len() > 16 * 1024 {
            return Err(std::io::ErrorKind::InvalidData.into());
        }
        got.extend_from_slice(&chunk[..n]);
    }
    let mut reply = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\
        Connection: Upgrade\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n"
        .to_vec();
    reply.extend(server_frame(br#"{"type":"ack","action":"subscribed"}"#));
    s.write_all(&reply)?;
    s.set_nodelay(true)?;
    s.set_nonblocking(true)
}

/// A change frame the fleet reads as Aether's, padded to `bytes` of text.
fn change_frame(seq: u64, bytes: usize) -> Vec<u8> {
    let ms = now_us() / 1000;
    let mut text =
        format!(r#"{{"type":"change","record":{{"path":"s{seq}"}},"timestamp":{ms},"pad":""#);
    let end = "\"}";
    text.extend(std::iter::repeat_n(
        'x',
        bytes.saturating_sub(text.len() + end.len()),
    ));
    text.push_str(end);
    server_frame(text.as_bytes())
}

/// An unmasked final frame (RFC 6455 §5.2): text.
pub(super) fn server_frame(payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(payload.len() + 10);
    f.push(0x81);
    match payload.len() {
        n if n < 126 => f.push(n as u8),
        n if n <= 0xffff => {
            f.push(126);
            f.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            f.push(127);
            f.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    f.extend_from_slice(payload);
    f
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_change_frame_has_the_asked_size_and_reads_as_a_change() {
        let f = change_frame(42, 600);
        assert_eq!(&f[..2], &[0x81, 126]);
        let len = u16::from_be_bytes([f[2], f[3]]) as usize;
        assert_eq!(len, 600);
        let text = std::str::from_utf8(&f[4..]).unwrap();
        assert!(text.starts_with("{\"type\":\"change\""));
        assert_eq!(super::super::field_i64(text, "\"path\":\"s"), Some(42));
        assert!(serde_json::from_str::<serde_json::Value>(text).is_ok());
    }
}
