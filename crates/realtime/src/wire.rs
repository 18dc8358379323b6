//! A connection's socket shared between its task and the router's direct
//! writers (`aether_router::direct`).
//!
//! One of them owns the byte stream at a time, by an atomic state:
//! - `TASK`: the connection's task owns it (awake, or with bytes it must
//!   still write);
//! - `IDLE`: the task sleeps with nothing owed (its queue empty, the
//!   WebSocket library flushed), and the router may claim it;
//! - `CLAIMED`: a writer is writing one change;
//! - `CLOSED`: the task is closing or gone; nothing is claimed again.
//!
//! The task takes `IDLE → TASK` before any use of the socket (reads too: the
//! library answers pings by writing) and, finding it `CLAIMED`, is woken when
//! the write ends. A writer that could not write a whole frame leaves the
//! rest here for the task, which writes it before anything else.

use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll, Waker, ready};

use bytes::Bytes;
use tokio::net::TcpStream;

use crate::protocol::WireFrame;
use crate::registry::now_ms;
use crate::stats::Stats;
use aether_router::direct::Tally;
use aether_router::routed::Routed;

const TASK: u8 = 0;
const IDLE: u8 = 1;
const CLAIMED: u8 = 2;
const CLOSED: u8 = 3;

/// Encodes a change for one subscription as a WebSocket frame: the
/// subscription's own head and the change's shared tail.
pub(crate) type Encode = for<'c> fn(&str, &'c Routed) -> WireFrame<'c>;

pub(crate) struct Wire {
    state: AtomicU8,
    /// The task found the socket claimed: the writer wakes it when done.
    wanted: AtomicBool,
    /// The library may hold bytes it has not written (a frame fed and not
    /// flushed, a ping answered while reading): no claim until a flush.
    dirty: AtomicBool,
    /// A direct write failed (not for want of room): a change may be missing
    /// or cut, so the connection must end (the client resumes from the last
    /// change it has, and the log has the rest).
    broken: AtomicBool,
    stream: Arc<TcpStream>,
    /// The stream's descriptor, read here with the state rather than from
    /// the stream (another cache miss per recipient).
    fd: std::os::fd::RawFd,
    /// The rest of a frame a writer could not write whole, and how much of
    /// that the task has written since.
    owed: Mutex<Option<(Bytes, usize)>>,
    /// Wakes the task through its socket's gate, so that it polls the socket
    /// (and pays what is owed).
    waker: OnceLock<Waker>,
    encode: Encode,
    stats: Arc<Stats>,
}

impl Wire {
    pub(crate) fn new(stream: Arc<TcpStream>, encode: Encode, stats: Arc<Stats>) -> Wire {
        use std::os::fd::AsRawFd;
        Wire {
            fd: stream.as_raw_fd(),
            state: AtomicU8::new(TASK),
            wanted: AtomicBool::new(false),
            dirty: AtomicBool::new(false),
            broken: AtomicBool::new(false),
            stream,
            owed: Mutex::new(None),
            waker: OnceLock::new(),
            encode,
            stats,
        }
    }

    /// How a writer reaches the task: the socket gate's waker.
    pub(crate) fn wake_through(&self, waker: &Waker) {
        let _ = self.waker.set(waker.clone());
    }

    fn wake(&self) {
        if let Some(w) = self.waker.get() {
            w.wake_by_ref();
        }
    }

    /// Makes the socket the task's, then writes what a writer left owed.
    /// Pending while a writer holds it (woken when it is done) or while the
    /// owed bytes wait for room.
    pub(crate) fn poll_own(&self, cx: &mut Context<'_>) -> Poll<()> {
        ready!(self.poll_take());
        self.poll_pay(cx)
    }

    /// Makes the socket the task's; pending while a writer holds it (woken,
    /// through the socket's gate, when it is done). The task takes it before
    /// it takes an item from its queue, too: an item taken while the socket
    /// sleeps could be overtaken by a later change a writer claims.
    pub(crate) fn poll_take(&self) -> Poll<()> {
        loop {
            match self.state.load(Ordering::SeqCst) {
                TASK | CLOSED => break,
                IDLE => {
                    if self
                        .state
                        .compare_exchange(IDLE, TASK, Ordering::SeqCst, Ordering::SeqCst)
                        .is_ok()
                    {
                        break;
                    }
                }
                _ => {
                    // Raised before the second look: a writer that releases
                    // in between sees it and wakes us.
                    self.wanted.store(true, Ordering::SeqCst);
                    if self.state.load(Ordering::SeqCst) == CLAIMED {
                        return Poll::Pending;
                    }
                }
            }
        }
        Poll::Ready(())
    }

    fn poll_pay(&self, cx: &mut Context<'_>) -> Poll<()> {
        let mut owed = self.owed.lock().unwrap_or_else(|p| p.into_inner());
        while let Some((bytes, at)) = owed.as_mut() {
            if ready!(self.stream.poll_write_ready(cx)).is_err() {
                *owed = None;
                self.broken.store(true, Ordering::SeqCst);
                break;
            }
            match self.stream.try_write(&bytes[*at..]) {
                Ok(n) if n > 0 => {
                    *at += n;
                    if *at >= bytes.len() {
                        *owed = None;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                _ => {
                    *owed = None;
                    self.broken.store(true, Ordering::SeqCst);
                }
            }
        }
        Poll::Ready(())
    }

    /// Whether the task must write before it sleeps: the library's buffer, or
    /// a frame a writer left.
    pub(crate) fn needs_write(&self) -> bool {
        self.dirty.load(Ordering::Relaxed) || self.owed_any()
    }

    fn owed_any(&self) -> bool {
        self.owed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some()
    }

    #[cfg(test)]
    pub(crate) fn is_idle(&self) -> bool {
        self.state.load(Ordering::SeqCst) == IDLE
    }

    /// Whether a direct write failed: the connection must end.
    pub(crate) fn broken(&self) -> bool {
        self.broken.load(Ordering::SeqCst)
    }

    pub(crate) fn set_dirty(&self, dirty: bool) {
        self.dirty.store(dirty, Ordering::Relaxed);
    }

    /// The task is going to sleep with its queue empty: the router may claim
    /// the socket, unless the library or a writer left bytes to write.
    pub(crate) fn release(&self) {
        if self.state.load(Ordering::Relaxed) == TASK
            && !self.dirty.load(Ordering::Relaxed)
            && !self.broken()
            && !self.owed_any()
        {
            let _ = self
                .state
                .compare_exchange(TASK, IDLE, Ordering::SeqCst, Ordering::SeqCst);
        }
    }

    /// No claim after this: the task is gone. A write in flight ends
    /// harmlessly (the stream stays open while the wire holds it); nothing
    /// else writes.
    pub(crate) fn seal(&self) {
        self.state.store(CLOSED, Ordering::SeqCst);
    }

    /// A claim ends. A task that asked for the socket meanwhile gets it at
    /// once (the router could otherwise claim it again first, and keep it
    /// from reading, pinging or closing); else it goes back to sleeping.
    fn unclaim(&self) {
        if self.wanted.swap(false, Ordering::SeqCst) {
            let _ = self
                .state
                .compare_exchange(CLAIMED, TASK, Ordering::SeqCst, Ordering::SeqCst);
            self.wake();
            return;
        }
        let _ = self
            .state
            .compare_exchange(CLAIMED, IDLE, Ordering::SeqCst, Ordering::SeqCst);
        // Asked between the two looks: it finds the socket asleep and takes it.
        if self.wanted.swap(false, Ordering::SeqCst) {
            self.wake();
        }
    }

    /// A claim ends with a failed write: the task owns the socket and ends
    /// the connection.
    fn fail(&self) {
        self.broken.store(true, Ordering::SeqCst);
        let _ = self
            .state
            .compare_exchange(CLAIMED, TASK, Ordering::SeqCst, Ordering::SeqCst);
        self.wanted.store(false, Ordering::SeqCst);
        self.wake();
    }

    /// One `sendmsg` of the frame's two parts, never waiting. Straight to the
    /// socket rather than through the runtime's write, which first checks
    /// the socket's readiness: a cache miss per recipient for a state that is
    /// almost always "writable". A full socket says so (`WouldBlock`).
    fn send(&self, frame: &WireFrame<'_>) -> std::io::Result<usize> {
        let head = frame.head.as_slice();
        let mut parts = [
            libc::iovec {
                iov_base: head.as_ptr() as *mut libc::c_void,
                iov_len: head.len(),
            },
            libc::iovec {
                iov_base: frame.tail.as_ptr() as *mut libc::c_void,
                iov_len: frame.tail.len(),
            },
        ];
        // SAFETY: a zeroed msghdr is valid (no address, no control data).
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = parts.as_mut_ptr();
        msg.msg_iovlen = parts.len() as _;
        loop {
            // SAFETY: the descriptor is open while `self.stream` is (the
            // wire holds it); the iovecs point into `head` and `frame.tail`,
            // which outlive the call, and the kernel only reads them.
            let n =
                unsafe { libc::sendmsg(self.fd, &msg, libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL) };
            if n >= 0 {
                return Ok(n as usize);
            }
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }

    /// A claim ends with bytes left: the task owns the socket and must write
    /// them first. `false` if the connection closed meanwhile and nobody
    /// will write them.
    fn owe(&self, rest: Bytes) -> bool {
        *self.owed.lock().unwrap_or_else(|p| p.into_inner()) = Some((rest, 0));
        let owed = self
            .state
            .compare_exchange(CLAIMED, TASK, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok();
        if !owed {
            *self.owed.lock().unwrap_or_else(|p| p.into_inner()) = None;
        }
        self.wanted.store(false, Ordering::SeqCst);
        self.wake();
        owed
    }
}

impl aether_router::direct::Direct for Wire {
    fn claim(&self) -> bool {
        self.state
            .compare_exchange(IDLE, CLAIMED, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok()
    }

    fn deliver(&self, subscription: &str, change: &Routed, tally: &mut Tally) {
        let frame = (self.encode)(subscription, change);
        let written = match self.send(&frame) {
            Ok(n) if n >= frame.len() => {
                self.unclaim();
                true
            }
            // What the socket did not take, the task writes first.
            Ok(n) => self.owe(frame.rest(n)),
            // The runtime's idea of the socket's readiness is left as it is:
            // clearing it now could erase a "writable" that arrived since
            // this write failed, and the task's own write clears a stale one.
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => self.owe(frame.rest(0)),
            Err(_) => {
                self.fail();
                false
            }
        };
        if written {
            tally.wrote(now_ms() - change.commit_time_ms);
        }
    }

    fn abandon(&self) {
        self.fail();
    }

    /// The handles are looked up per run, not kept: a handle on every
    /// connection is memory on every idle one.
    fn settle(&self, tally: &Tally) {
        self.stats.frames_out(tally.written, tally.written);
        self.stats
            .changes_direct
            .fetch_add(tally.written, Ordering::Relaxed);
        metrics::counter!("aether_events_delivered_direct_total").increment(tally.written);
        let latency = crate::engine::latency_histogram();
        for &(ms, n) in &tally.latencies_ms {
            crate::engine::record_latencies(&latency, ms, n);
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::protocol::Head;
    use aether_router::direct::Direct;
    use std::sync::atomic::AtomicUsize;
    use std::task::Wake;
    use tokio::io::AsyncReadExt;

    /// Counts wakes.
    struct Count(AtomicUsize);
    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    pub(crate) fn change() -> Arc<Routed> {
        Arc::new(Routed::new(Arc::new(aether_core::changes::RowChange::new(
            aether_core::lsn::Position::new(aether_core::lsn::PgLsn(1), 0),
            aether_core::changes::ChangeKind::Insert,
            aether_core::changes::test_relation(),
            None,
            None,
            0,
        ))))
    }

    /// A frame of the subscription's length in KiB, all of its first byte.
    fn sized<'c>(subscription: &str, _: &'c Routed) -> WireFrame<'c> {
        let fill = subscription.as_bytes()[0];
        WireFrame {
            head: Head::from_vec(vec![fill; subscription.len() * 1024]),
            tail: &[],
        }
    }

    /// "frame;", of a head and a tail.
    fn said<'c>(_: &str, _: &'c Routed) -> WireFrame<'c> {
        WireFrame {
            head: Head::from_vec(b"fra".to_vec()),
            tail: b"me;",
        }
    }

    /// A server end (shared, as the edge holds it) and its client.
    pub(crate) async fn tcp_pair() -> (Arc<TcpStream>, TcpStream) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let client = TcpStream::connect(l.local_addr().expect("addr"));
        let (client, server) = tokio::join!(client, l.accept());
        let (server, _) = server.expect("accept");
        (Arc::new(server), client.expect("connect"))
    }

    async fn pair(encode: Encode) -> (Arc<Wire>, TcpStream, Arc<Count>) {
        let (server, client) = tcp_pair().await;
        let wire = Arc::new(Wire::new(server, encode, Arc::default()));
        let count = Arc::new(Count(AtomicUsize::new(0)));
        wire.wake_through(&Waker::from(Arc::clone(&count)));
        (wire, client, count)
    }

    async fn read_exactly(peer: &mut TcpStream, n: usize) -> Vec<u8> {
        let mut got = vec![0; n];
        tokio::time::timeout(std::time::Duration::from_secs(5), peer.read_exact(&mut got))
            .await
            .expect("in time")
            .expect("read");
        got
    }

    #[tokio::test]
    async fn a_claim_needs_a_sleeping_task_and_ends_with_the_write() {
        let (wire, mut peer, _) = pair(said).await;
        let mut tally = Tally::default();
        assert!(!wire.claim(), "the task owns the socket at first");
        wire.release();
        assert!(wire.claim());
        assert!(!wire.claim(), "one claim at a time");
        wire.deliver("s", &change(), &mut tally);
        assert_eq!(read_exactly(&mut peer, 6).await, b"frame;");
        assert!(wire.claim(), "the socket sleeps again after the write");
        wire.deliver("s", &change(), &mut tally);
        assert_eq!(read_exactly(&mut peer, 6).await, b"frame;");
        // Unflushed library bytes keep it the task's.
        let waker = Waker::noop();
        let mut cx = Context::from_waker(waker);
        assert!(wire.poll_own(&mut cx).is_ready());
        wire.set_dirty(true);
        wire.release();
        assert!(!wire.claim());
        wire.set_dirty(false);
        wire.release();
        assert!(wire.claim());
        // A claim given back unwritten ends the connection: its change is
        // missing, and the client resumes from the log.
        wire.abandon();
        assert!(wire.broken());
        wire.release();
        assert!(!wire.claim());
        // Counted once per run, when the router settles it.
        assert_eq!(tally.written, 2);
        assert_eq!(wire.stats.changes_delivered.load(Ordering::Relaxed), 0);
        wire.settle(&tally);
        assert_eq!(wire.stats.changes_delivered.load(Ordering::Relaxed), 2);
        assert_eq!(wire.stats.changes_direct.load(Ordering::Relaxed), 2);
    }

    #[tokio::test]
    async fn a_task_that_finds_a_claim_waits_for_it_and_is_woken() {
        let (wire, _peer, count) = pair(said).await;
        wire.release();
        assert!(wire.claim());
        let waker = Waker::noop();
        let mut cx = Context::from_waker(waker);
        assert!(wire.poll_own(&mut cx).is_pending());
        assert_eq!(count.0.load(Ordering::SeqCst), 0);
        wire.deliver("s", &change(), &mut Tally::default());
        assert_eq!(
            count.0.load(Ordering::SeqCst),
            1,
            "woken when the write ended"
        );
        assert!(
            !wire.claim(),
            "handed to the task that asked, not back to the router"
        );
        assert!(wire.poll_own(&mut cx).is_ready());
        assert!(!wire.claim(), "the task has it now");
        // A claim the task did not wait for wakes nobody.
        wire.release();
        assert!(wire.claim());
        wire.deliver("s", &change(), &mut Tally::default());
        assert_eq!(count.0.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn what_the_socket_did_not_take_is_written_by_the_task_first() {
        // 4 MiB frames, each of its own letter: while the peer does not read,
        // one cannot be written whole.
        let (wire, mut peer, count) = pair(sized).await;
        let frame = |k: usize| format!("{}{}", (b'a' + k as u8) as char, "x".repeat(4095));
        let mut frames = 0;
        loop {
            wire.release();
            assert!(wire.claim(), "no bytes owed yet");
            wire.deliver(&frame(frames), &change(), &mut Tally::default());
            frames += 1;
            if wire.needs_write() {
                break;
            }
            assert!(frames < 16, "a socket buffer took 64 MiB");
        }
        assert!(
            count.0.load(Ordering::SeqCst) >= 1,
            "the task is woken to pay"
        );
        wire.release();
        assert!(!wire.claim(), "no claim while bytes are owed");
        // The task pays as the peer reads: every frame whole, in order, once.
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            let mut buf = vec![0; 1 << 16];
            while got.len() < frames * (4 << 20) {
                let k = peer.read(&mut buf).await.expect("read");
                assert!(k > 0, "the stream ended early");
                got.extend_from_slice(&buf[..k]);
            }
            (got, peer)
        });
        std::future::poll_fn(|cx| wire.poll_own(cx)).await;
        assert!(!wire.needs_write());
        let (got, mut peer) = tokio::time::timeout(std::time::Duration::from_secs(10), reader)
            .await
            .expect("in time")
            .expect("the reader");
        for (k, chunk) in got.chunks(4 << 20).enumerate() {
            assert!(
                chunk.iter().all(|b| *b == b'a' + k as u8),
                "frame {k} whole and in place"
            );
        }
        // Nothing more was written.
        wire.seal();
        drop(wire);
        let mut rest = [0u8; 1];
        assert_eq!(peer.read(&mut rest).await.expect("read"), 0);
    }

    #[tokio::test]
    async fn a_change_frame_reaches_the_peer_as_one_websocket_text_frame() {
        let (wire, mut peer, _) = pair(crate::protocol::change_wire_frame).await;
        let c = change();
        let text = crate::protocol::change_frame("s\"1", &c);
        wire.release();
        assert!(wire.claim());
        let mut tally = Tally::default();
        wire.deliver("s\"1", &c, &mut tally);
        assert_eq!(tally.written, 1);
        let got = read_exactly(&mut peer, 4 + text.len()).await;
        // FIN and text; a 16-bit length (the payload is over 125 bytes).
        assert_eq!(got[..2], [0x81, 126]);
        assert_eq!(
            usize::from(u16::from_be_bytes([got[2], got[3]])),
            text.len()
        );
        assert_eq!(&got[4..], text.as_bytes());
    }

    #[tokio::test]
    async fn a_full_socket_leaves_the_whole_frame_to_the_task_which_writes_it_when_read() {
        let (wire, mut peer, _) = pair(said).await;
        // Filled while the peer does not read.
        let mut filled = 0;
        loop {
            match wire.stream.try_write(&[b'.'; 1 << 16]) {
                Ok(n) => filled += n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => panic!("filling: {e}"),
            }
        }
        wire.release();
        assert!(wire.claim());
        let mut tally = Tally::default();
        wire.deliver("s", &change(), &mut tally);
        assert!(wire.needs_write(), "nothing was taken: all of it is owed");
        assert_eq!(tally.written, 1, "the task will write it");
        let reader = tokio::spawn(async move {
            let got = read_exactly(&mut peer, filled + 6).await;
            assert!(got[..filled].iter().all(|b| *b == b'.'));
            got[filled..].to_vec()
        });
        // The task is woken when the peer makes room, and pays.
        tokio::time::timeout(
            std::time::Duration::from_secs(10),
            std::future::poll_fn(|cx| wire.poll_own(cx)),
        )
        .await
        .expect("room came and the task was woken");
        assert!(!wire.needs_write());
        assert_eq!(reader.await.expect("the reader"), b"frame;");
    }

    #[tokio::test]
    async fn a_failed_write_ends_the_connection_instead_of_leaving_a_gap() {
        let (wire, peer, _) = pair(said).await;
        drop(peer);
        // Writes to a socket its peer closed fail soon (a reset).
        let mut tries = 0;
        let mut tally = Tally::default();
        while !wire.broken() {
            wire.release();
            assert!(wire.claim(), "not broken yet: the socket sleeps again");
            wire.deliver("s", &change(), &mut tally);
            tries += 1;
            assert!(tries < 1000, "the writes never failed");
            tokio::task::yield_now().await;
        }
        wire.release();
        assert!(!wire.claim(), "no claim on a broken socket");
        assert_eq!(tally.written, tries - 1, "the failed write is not counted");
    }

    #[tokio::test]
    async fn a_sealed_socket_is_never_claimed_and_owes_nothing() {
        // A 16 MiB frame: more than a fresh socket takes at once.
        let (wire, _peer, _) = pair(sized).await;
        wire.release();
        assert!(wire.claim());
        // The task ends while a writer holds the socket.
        wire.seal();
        let mut tally = Tally::default();
        wire.deliver(&"s".repeat(16 << 10), &change(), &mut tally);
        wire.release();
        assert!(!wire.claim());
        assert!(!wire.needs_write());
        assert_eq!(
            tally.written, 0,
            "a frame nobody will finish is not counted"
        );
    }
}
