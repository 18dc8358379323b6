//! One HTTP connection's hygiene: what it is doing (for the header and idle
//! timeouts), its socket (which keeps its connection-cap place until closed, and
//! lingers before closing when a request body was left unread), and the body
//! wrappers that report requests starting and ending.

use std::future::Future as _;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Instant;

use super::limits::ConnGuard;

/// After answering a request whose body it did not read (a refused upload), the
/// server reads and drops at most this much more before closing, so the client
/// gets to read the answer instead of a reset. A client that reacts to the
/// answer stops sending within a round trip.
pub(crate) const LINGER_BYTES: u64 = 4 * 1024 * 1024;
/// ... and for at most this long.
pub(crate) const LINGER_TIME: Duration = Duration::from_secs(2);
/// ... and stops sooner when nothing arrives for this long: a client still
/// uploading sends without pauses, an idle keep-alive client sends nothing.
pub(crate) const LINGER_GAP: Duration = Duration::from_millis(500);

const NONE: u64 = u64::MAX;

/// What one connection is doing, shared by its socket, its requests and its
/// watchdog. Times are milliseconds since the connection was accepted.
pub(crate) struct Activity {
    epoch: Instant,
    /// Requests whose response has not been written to the end.
    in_flight: AtomicU32,
    /// When the connection last had no request in flight.
    idle_since: AtomicU64,
    /// When the first byte of the next request head arrived (`NONE`: none yet).
    /// A new connection starts with a head under way.
    head_since: AtomicU64,
    /// The current request has a body that was not read to its end.
    unread_body: AtomicBool,
}

/// Why the watchdog closed a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Expired {
    HeaderTimeout,
    IdleTimeout,
}

impl Expired {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Expired::HeaderTimeout => "header_timeout",
            Expired::IdleTimeout => "idle_timeout",
        }
    }
}

impl Activity {
    pub(crate) fn new() -> Arc<Activity> {
        Arc::new(Activity {
            epoch: Instant::now(),
            in_flight: AtomicU32::new(0),
            idle_since: AtomicU64::new(0),
            head_since: AtomicU64::new(0),
            unread_body: AtomicBool::new(false),
        })
    }

    fn now(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(NONE - 1)
    }

    /// Bytes arrived on the socket.
    fn on_read(&self) {
        if self.in_flight.load(Ordering::Relaxed) == 0
            && self.head_since.load(Ordering::Relaxed) == NONE
        {
            self.head_since.store(self.now(), Ordering::Relaxed);
        }
    }

    /// A request head was parsed; the request is in flight until the returned
    /// guard (carried by its response body) is dropped.
    pub(crate) fn start_request(self: &Arc<Self>, has_body: bool) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        self.head_since.store(NONE, Ordering::Relaxed);
        self.unread_body.store(has_body, Ordering::Relaxed);
        InFlight(Arc::clone(self))
    }

    /// When this connection expires if nothing happens, and why; `None` while a
    /// request is in flight (requests have no timeout here).
    fn deadline(&self, header: Option<Duration>, idle: Option<Duration>) -> Option<(u64, Expired)> {
        if self.in_flight.load(Ordering::Relaxed) > 0 {
            return None;
        }
        let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(NONE / 2);
        let head = self.head_since.load(Ordering::Relaxed);
        if head != NONE
            && let Some(h) = header
        {
            return Some((head.saturating_add(ms(h)), Expired::HeaderTimeout));
        }
        let idle_since = self.idle_since.load(Ordering::Relaxed);
        idle.map(|i| (idle_since.saturating_add(ms(i)), Expired::IdleTimeout))
    }

    /// Resolves when the connection has spent too long on a request head
    /// (`header`) or with no request at all (`idle`); never when both are off.
    /// Upgraded connections are not watched: the HTTP connection ends at the
    /// upgrade, and so does this watch.
    pub(crate) async fn expired(
        &self,
        header: Option<Duration>,
        idle: Option<Duration>,
    ) -> Expired {
        let Some(recheck) = header.into_iter().chain(idle).min() else {
            return std::future::pending().await;
        };
        loop {
            let wait = match self.deadline(header, idle) {
                Some((at, why)) => {
                    let now = self.now();
                    if at <= now {
                        return why;
                    }
                    Duration::from_millis(at - now)
                }
                // In flight: look again once the request could have ended and
                // the shorter timeout run out.
                None => recheck,
            };
            tokio::time::sleep(wait).await;
        }
    }
}

/// A request in flight; dropping it (with its response body) makes the
/// connection idle again once no other request is in flight.
pub(crate) struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        let a = &self.0;
        if a.in_flight.fetch_sub(1, Ordering::Relaxed) == 1 {
            a.idle_since.store(a.now(), Ordering::Relaxed);
            a.head_since.store(NONE, Ordering::Relaxed);
        }
    }
}

/// The request body, reporting when it has been read to its end.
pub(crate) struct RequestBody<B> {
    inner: B,
    activity: Arc<Activity>,
}

impl<B> RequestBody<B> {
    pub(crate) fn new(inner: B, activity: Arc<Activity>) -> Self {
        RequestBody { inner, activity }
    }
}

impl<B: Body + Unpin> Body for RequestBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let r = Pin::new(&mut self.inner).poll_frame(cx);
        if matches!(r, Poll::Ready(None)) || self.inner.is_end_stream() {
            self.activity.unread_body.store(false, Ordering::Relaxed);
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The response body, holding its request's [`InFlight`] until written (or
/// dropped).
pub(crate) struct ResponseBody<B> {
    inner: B,
    _in_flight: InFlight,
}

impl<B> ResponseBody<B> {
    pub(crate) fn new(inner: B, in_flight: InFlight) -> Self {
        ResponseBody {
            inner,
            _in_flight: in_flight,
        }
    }
}

impl<B: Body<Data = Bytes> + Unpin> Body for ResponseBody<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A lingering close under way.
struct Linger {
    deadline: Pin<Box<tokio::time::Sleep>>,
    /// Reset by every read; its expiry ends the linger.
    gap: Pin<Box<tokio::time::Sleep>>,
    left: u64,
    fin_sent: bool,
}

/// The accepted socket. It holds the connection's cap place for as long as it
/// is open (through an upgrade too), tells [`Activity`] when bytes arrive, and
/// on shutdown after an unread request body sends FIN and reads (and drops)
/// what is still coming, within [`LINGER_BYTES`], [`LINGER_TIME`] and
/// [`LINGER_GAP`], before it
/// lets the socket close: closing with unread data makes the kernel send a reset,
/// which can destroy the answer before the client reads it.
pub(crate) struct EdgeIo {
    /// Shared: a WebSocket's row changes may be written by the router's
    /// writers (`aether_router::direct`) while this is the upgraded stream.
    tcp: Arc<TcpStream>,
    activity: Arc<Activity>,
    linger: Option<Linger>,
    _place: ConnGuard,
}

impl EdgeIo {
    pub(crate) fn new(tcp: Arc<TcpStream>, activity: Arc<Activity>, place: ConnGuard) -> Self {
        EdgeIo {
            tcp,
            activity,
            linger: None,
            _place: place,
        }
    }
}

/// Reads from a shared stream: readiness, then a read that clears it when
/// there is nothing (tokio's `TcpStream` does the same behind `&mut`). Into
/// the buffer's uninitialized part, as tokio's does: zeroing it first would
/// cost a pass over hyper's whole read buffer per read.
fn poll_read_shared(
    tcp: &TcpStream,
    cx: &mut Context<'_>,
    buf: &mut ReadBuf<'_>,
) -> Poll<io::Result<()>> {
    loop {
        ready!(tcp.poll_read_ready(cx))?;
        // SAFETY: only written to (by the read), never read from.
        let mut unfilled = unsafe { buf.unfilled_mut() };
        match tcp.try_read_buf(&mut unfilled) {
            Ok(n) => {
                // SAFETY: the read initialized the first `n` bytes.
                unsafe { buf.assume_init(n) };
                buf.advance(n);
                return Poll::Ready(Ok(()));
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Poll::Ready(Err(e)),
        }
    }
}

impl AsyncRead for EdgeIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = poll_read_shared(&self.tcp, cx, buf);
        if buf.filled().len() > before {
            self.activity.on_read();
        }
        r
    }
}

impl AsyncWrite for EdgeIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        loop {
            ready!(self.tcp.poll_write_ready(cx))?;
            match self.tcp.try_write(buf) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                r => return Poll::Ready(r),
            }
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        loop {
            ready!(self.tcp.poll_write_ready(cx))?;
            match self.tcp.try_write_vectored(bufs) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                r => return Poll::Ready(r),
            }
        }
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        // TCP has nothing of its own to flush (TCP_NODELAY is set).
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.linger.is_none() {
            if !this.activity.unread_body.load(Ordering::Relaxed) {
                return Poll::Ready(shutdown_write(&this.tcp));
            }
            this.linger = Some(Linger {
                deadline: Box::pin(tokio::time::sleep(LINGER_TIME)),
                gap: Box::pin(tokio::time::sleep(LINGER_GAP)),
                left: LINGER_BYTES,
                fin_sent: false,
            });
        }
        let Some(l) = this.linger.as_mut() else {
            return Poll::Ready(Ok(()));
        };
        if !l.fin_sent {
            // The answer is flushed: FIN tells the client it is complete.
            let _ = shutdown_write(&this.tcp);
            l.fin_sent = true;
        }
        let mut scratch = [0u8; 8192];
        while l.left > 0 {
            if l.deadline.as_mut().poll(cx).is_ready() || l.gap.as_mut().poll(cx).is_ready() {
                break;
            }
            let mut rb = ReadBuf::new(&mut scratch);
            match poll_read_shared(&this.tcp, cx, &mut rb) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Ok(())) if rb.filled().is_empty() => break,
                Poll::Ready(Ok(())) => {
                    l.left = l.left.saturating_sub(rb.filled().len() as u64);
                    l.gap
                        .as_mut()
                        .reset(tokio::time::Instant::now() + LINGER_GAP);
                }
                Poll::Ready(Err(_)) => break,
            }
        }
        Poll::Ready(Ok(()))
    }
}

/// Sends FIN (the shared stream has no `&mut` to shut down through).
fn shutdown_write(tcp: &TcpStream) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: a plain syscall on a descriptor `tcp` keeps open.
    match unsafe { libc::shutdown(tcp.as_raw_fd(), libc::SHUT_WR) } {
        0 => Ok(()),
        _ => Err(io::Error::last_os_error()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Option<Duration> = Some(Duration::from_secs(1));
    const L: Option<Duration> = Some(Duration::from_secs(60));

    #[test]
    fn deadlines_follow_what_the_connection_does() {
        let a = Activity::new();
        // New: a head is due within the header timeout.
        assert_eq!(a.deadline(S, L), Some((1000, Expired::HeaderTimeout)));
        // Header timeout off: the idle timeout still bounds it.
        assert_eq!(a.deadline(None, L), Some((60_000, Expired::IdleTimeout)));
        assert_eq!(a.deadline(None, None), None);
        let req = a.start_request(true);
        assert_eq!(a.deadline(S, L), None, "no timeout while in flight");
        a.on_read();
        assert_eq!(a.deadline(S, L), None);
        drop(req);
        // Idle between requests: the idle timeout, until a byte arrives.
        let (at, why) = a.deadline(S, L).unwrap();
        assert_eq!(why, Expired::IdleTimeout);
        assert!(at >= 60_000);
        a.on_read();
        assert_eq!(a.deadline(S, L).unwrap().1, Expired::HeaderTimeout);
        // The body flag follows the body.
        assert!(a.unread_body.load(Ordering::Relaxed));
        let _r = a.start_request(false);
        assert!(!a.unread_body.load(Ordering::Relaxed));
    }

    #[tokio::test]
    async fn a_silent_new_connection_expires_after_the_header_timeout() {
        let a = Activity::new();
        let header = Some(Duration::from_millis(50));
        let why = tokio::time::timeout(Duration::from_secs(10), a.expired(header, L))
            .await
            .expect("expires");
        assert_eq!(why, Expired::HeaderTimeout);
        assert!(a.now() >= 50);
        // Both off: never.
        let never = tokio::time::timeout(Duration::from_millis(50), a.expired(None, None)).await;
        assert!(never.is_err());
    }
}
