//! The fan-out's subscribers: many WebSockets read by two threads with epoll.
//!
//! The load process shares this machine's two cores with the server it
//! measures, so every microsecond it spends per frame is taken from Aether
//! and shows up as fan-out latency. One tokio task per socket, a WebSocket
//! library and a shared counter bumped per frame cost about 4 µs of user time
//! per frame (perf: task wakes, the split stream's lock, buffer zeroing,
//! cache lines bounced between the threads). Here a socket is a file
//! descriptor in an epoll set: one `recv` per readiness into a reused buffer,
//! server frames (never masked) parsed in place, and the deliveries of a
//! batch counted once per change, not once per frame. A browser tab costs its
//! own machine that work, not the server's.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;

use anyhow::Context as _;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::Semaphore;

use super::{Shared, field_i64};
use crate::proc::now_us;

/// Reader threads: one per core.
const THREADS: usize = 2;
/// The most readiness events one `epoll_wait` returns.
const EVENTS: usize = 1024;

/// Open subscribers and the threads reading them.
pub struct Fleet {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<anyhow::Result<()>>>,
}

struct Conn {
    stream: Option<std::net::TcpStream>,
    /// The start of a frame that a read cut off.
    carry: Vec<u8>,
}

impl Fleet {
    /// Opens `n` connections from `ips` source addresses (at most 256
    /// connecting at once), sends each `subscribe(i)`, and starts reading.
    pub async fn open(
        server: SocketAddr,
        token: &str,
        n: usize,
        ips: u8,
        subscribe: impl Fn(usize) -> String,
        shared: &Arc<Shared>,
    ) -> anyhow::Result<Fleet> {
        let sem = Arc::new(Semaphore::new(256));
        let mut handles = Vec::with_capacity(n);
        for i in 0..n {
            let permit = Arc::clone(&sem).acquire_owned().await?;
            let token = token.to_owned();
            let ip = (ips > 0).then(|| Ipv4Addr::new(127, 0, 0, 2 + (i % ips as usize) as u8));
            handles.push(tokio::spawn(async move {
                // A server that never answers fails the run, not hangs it.
                let r = tokio::time::timeout(
                    std::time::Duration::from_secs(60),
                    handshake(server, &token, ip),
                )
                .await
                .unwrap_or_else(|_| Err(anyhow::anyhow!("no WebSocket handshake within 60 s")));
                drop(permit);
                r
            }));
        }
        let mut conns = Vec::with_capacity(n);
        for (i, h) in handles.into_iter().enumerate() {
            let (mut stream, carry) = h.await??;
            stream
                .write_all(&client_frame(0x1, subscribe(i).as_bytes()))
                .context("sending a subscription")?;
            conns.push(Conn {
                stream: Some(stream),
                carry,
            });
        }
        let stop = Arc::new(AtomicBool::new(false));
        let per = n.div_ceil(THREADS).max(1);
        let mut threads = Vec::new();
        let mut rest = conns;
        while !rest.is_empty() {
            let tail = rest.split_off(per.min(rest.len()));
            let mine = std::mem::replace(&mut rest, tail);
            let (shared, stop) = (Arc::clone(shared), Arc::clone(&stop));
            threads.push(
                std::thread::Builder::new()
                    .name("subscribers".into())
                    .spawn(move || read_loop(mine, &shared, &stop))?,
            );
        }
        Ok(Fleet { stop, threads })
    }

    /// Stops reading and closes every connection.
    pub fn close(mut self) -> anyhow::Result<()> {
        self.stop.store(true, Ordering::Relaxed);
        for t in std::mem::take(&mut self.threads) {
            t.join()
                .map_err(|_| anyhow::anyhow!("a subscriber thread panicked"))??;
        }
        Ok(())
    }
}

/// A run that ends early (an error) stops the readers too.
impl Drop for Fleet {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Connects from `source` and upgrades to a WebSocket on `/ws`; returns the
/// socket (non-blocking) and any bytes read past the handshake.
async fn handshake(
    server: SocketAddr,
    token: &str,
    source: Option<Ipv4Addr>,
) -> anyhow::Result<(std::net::TcpStream, Vec<u8>)> {
    let sock = tokio::net::TcpSocket::new_v4()?;
    if let Some(ip) = source {
        sock.bind(SocketAddr::from((ip, 0)))?;
    }
    let mut stream = sock.connect(server).await?;
    stream.set_nodelay(true)?;
    let request = format!(
        "GET /ws?token={token} HTTP/1.1\r\nHost: {server}\r\nUpgrade: websocket\r\n\
         Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
         Sec-WebSocket-Version: 13\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await?;
    let mut got = Vec::with_capacity(512);
    let end = loop {
        let mut chunk = [0u8; 1024];
        let n = stream.read(&mut chunk).await?;
        anyhow::ensure!(n > 0, "closed during the WebSocket handshake");
        got.extend_from_slice(&chunk[..n]);
        if let Some(p) = got.windows(4).position(|w| w == b"\r\n\r\n") {
            break p + 4;
        }
        anyhow::ensure!(got.len() < 16 * 1024, "handshake reply too long");
    };
    anyhow::ensure!(
        got.starts_with(b"HTTP/1.1 101"),
        "handshake refused: {}",
        String::from_utf8_lossy(&got[..end.min(300)])
    );
    let carry = got.split_off(end);
    Ok((stream.into_std()?, carry))
}

/// A masked client frame (RFC 6455 §5.3; the key need not be secret here).
fn client_frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
    const KEY: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];
    let mut f = Vec::with_capacity(payload.len() + 14);
    f.push(0x80 | opcode);
    match payload.len() {
        n if n < 126 => f.push(0x80 | n as u8),
        n if n <= 0xffff => {
            f.push(0x80 | 126);
            f.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            f.push(0x80 | 127);
            f.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    f.extend_from_slice(&KEY);
    f.extend(payload.iter().enumerate().map(|(i, b)| b ^ KEY[i % 4]));
    f
}

/// What one `epoll_wait`'s reads found, handed to [`Shared`] once.
#[derive(Default)]
struct Batch {
    /// (seq, deliveries, first receive, last receive, commit ms) per change.
    changes: Vec<(u64, u32, i64, i64, Option<i64>)>,
    closed: u64,
}

impl Batch {
    fn change(&mut self, seq: u64, recv: i64, commit_ms: Option<i64>) {
        match self.changes.iter_mut().find(|c| c.0 == seq) {
            Some(c) => {
                c.1 += 1;
                c.2 = c.2.min(recv);
                c.3 = c.3.max(recv);
                c.4 = c.4.or(commit_ms);
            }
            None => self.changes.push((seq, 1, recv, recv, commit_ms)),
        }
    }

    fn flush(&mut self, shared: &Shared) {
        if self.closed > 0 {
            shared.closed.fetch_add(self.closed, Ordering::Relaxed);
            self.closed = 0;
        }
        if self.changes.is_empty() {
            return;
        }
        if let Some(t) = shared.tracker.read().ok().and_then(|t| t.clone()) {
            for &(seq, n, first, last, commit_ms) in &self.changes {
                t.record_many(seq, n, first, last, commit_ms);
            }
        }
        self.changes.clear();
    }
}

fn read_loop(mut conns: Vec<Conn>, shared: &Shared, stop: &AtomicBool) -> anyhow::Result<()> {
    // SAFETY: plain syscalls; the descriptor is owned at once.
    let ep = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
    anyhow::ensure!(
        ep >= 0,
        "epoll_create1: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: `ep` is a new descriptor nothing else owns.
    let ep = unsafe { OwnedFd::from_raw_fd(ep) };
    for (i, c) in conns.iter().enumerate() {
        let Some(s) = &c.stream else { continue };
        let mut ev = libc::epoll_event {
            events: libc::EPOLLIN as u32,
            u64: i as u64,
        };
        // SAFETY: both descriptors are open; `ev` outlives the call.
        let r =
            unsafe { libc::epoll_ctl(ep.as_raw_fd(), libc::EPOLL_CTL_ADD, s.as_raw_fd(), &mut ev) };
        anyhow::ensure!(r == 0, "epoll_ctl: {}", std::io::Error::last_os_error());
    }
    // Bytes left over from the handshake.
    let mut batch = Batch::default();
    for c in &mut conns {
        let carried = std::mem::take(&mut c.carry);
        c.feed(&carried, now_us(), shared, &mut batch);
    }
    batch.flush(shared);
    let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; EVENTS];
    let mut buf = vec![0u8; 64 * 1024];
    while !stop.load(Ordering::Relaxed) {
        // SAFETY: `events` holds `EVENTS` entries.
        let n =
            unsafe { libc::epoll_wait(ep.as_raw_fd(), events.as_mut_ptr(), EVENTS as i32, 100) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            anyhow::ensure!(
                e.kind() == std::io::ErrorKind::Interrupted,
                "epoll_wait: {e}"
            );
            continue;
        }
        for ev in &events[..n as usize] {
            let i = ev.u64 as usize;
            let Some(c) = conns.get_mut(i) else { continue };
            let read = match c.stream.as_mut() {
                Some(s) => s.read(&mut buf),
                None => continue,
            };
            match read {
                Ok(k) if k > 0 => c.feed(&buf[..k], now_us(), shared, &mut batch),
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted
                    ) => {}
                // The end, or a reset. Closing the descriptor takes it out of the epoll set.
                _ => {
                    c.stream = None;
                    batch.closed += 1;
                }
            }
        }
        batch.flush(shared);
    }
    Ok(())
}

impl Conn {
    /// Parses what arrived after `carry`; keeps a cut-off frame for the next read.
    fn feed(&mut self, data: &[u8], recv: i64, shared: &Shared, batch: &mut Batch) {
        if self.carry.is_empty() {
            let used = self.frames(data, recv, shared, batch);
            self.carry.extend_from_slice(&data[used..]);
        } else {
            let mut all = std::mem::take(&mut self.carry);
            all.extend_from_slice(data);
            let used = self.frames(&all, recv, shared, batch);
            all.drain(..used);
            self.carry = all;
        }
    }

    /// Handles the whole frames at the start of `data`; returns the bytes used.
    fn frames(&mut self, data: &[u8], recv: i64, shared: &Shared, batch: &mut Batch) -> usize {
        let mut at = 0;
        while let Some((opcode, payload, len)) = frame(&data[at..]) {
            at += len;
            match opcode {
                0x1 => match std::str::from_utf8(payload) {
                    Ok(text) if text.starts_with("{\"type\":\"change\"") => {
                        if shared.frame_bytes.load(Ordering::Relaxed) == 0 {
                            shared
                                .frame_bytes
                                .store(text.len() as u64, Ordering::Relaxed);
                        }
                        if let Some(seq) = field_i64(text, "\"path\":\"s") {
                            batch.change(seq as u64, recv, field_i64(text, "\"timestamp\":"));
                        }
                    }
                    Ok(text) => shared.on_text(text),
                    Err(_) => shared.on_text(
                        "{\"type\":\"error\",\"note\":\"a text frame that is not UTF-8\"}",
                    ),
                },
                0x8 => {
                    if let Ok(mut e) = shared.first_error.lock()
                        && e.is_none()
                    {
                        let code = payload.get(..2).map(|c| u16::from_be_bytes([c[0], c[1]]));
                        *e = Some(format!("closed by server: {code:?}"));
                    }
                }
                0x9 => {
                    if let Some(s) = self.stream.as_mut() {
                        // A pong keeps the connection from being reaped as idle.
                        let _ = s.write_all(&client_frame(0xA, payload));
                    }
                }
                _ => {}
            }
        }
        at
    }
}

/// The first whole server frame in `data`: (opcode, payload, bytes used).
/// Aether sends whole frames, so fragments are not joined.
fn frame(data: &[u8]) -> Option<(u8, &[u8], usize)> {
    let (&b0, &b1) = (data.first()?, data.get(1)?);
    let (len, header): (usize, usize) = match b1 & 0x7f {
        126 => (
            u16::from_be_bytes([*data.get(2)?, *data.get(3)?]) as usize,
            4,
        ),
        127 => {
            let b: [u8; 8] = data.get(2..10)?.try_into().ok()?;
            (usize::try_from(u64::from_be_bytes(b)).ok()?, 10)
        }
        l => (l as usize, 2),
    };
    let payload = data.get(header..header.checked_add(len)?)?;
    Some((b0 & 0x0f, payload, header + len))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_are_read_whole_across_cuts() {
        // Server frames: unmasked text of 5, 300 and 70,000 bytes, then a ping.
        let mut wire = Vec::new();
        for len in [5usize, 300, 70_000] {
            wire.extend(super::super::bare::server_frame(&vec![b'x'; len]));
        }
        wire.extend_from_slice(&[0x89, 0x00]);
        let mut at = 0;
        let mut seen = Vec::new();
        while let Some((op, payload, used)) = frame(&wire[at..]) {
            seen.push((op, payload.len()));
            at += used;
        }
        assert_eq!(seen, vec![(1, 5), (1, 300), (1, 70_000), (9, 0)]);
        assert_eq!(at, wire.len());
        // Every cut short of a whole frame waits for more.
        for cut in [0, 1, 3, 6, 8, 300, 310] {
            let f = frame(&wire[..cut]);
            assert!(f.is_none() || f.unwrap().2 <= cut, "{cut}");
        }
    }

    #[test]
    fn client_frames_are_masked() {
        let f = client_frame(0x1, b"hello");
        assert_eq!(&f[..2], &[0x81, 0x80 | 5]);
        let key = &f[2..6];
        let text: Vec<u8> = f[6..]
            .iter()
            .enumerate()
            .map(|(i, b)| b ^ key[i % 4])
            .collect();
        assert_eq!(text, b"hello");
        let long = client_frame(0x1, &[b'a'; 200]);
        assert_eq!(&long[..4], &[0x81, 0x80 | 126, 0, 200]);
    }
}
