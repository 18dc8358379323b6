//! One connection engine for every WebSocket dialect.
//!
//! The engine owns what every socket needs whatever it speaks: the frame-size
//! cap, the client frame budget, ping and idle timeout, token expiry, revocation,
//! the bounded queue with lag and pull, interruptible flushes, the slow-consumer
//! close, shutdown and the closing handshake. A [`Dialect`] turns queue items into
//! frames and client frames into actions; it decides no limit. So every dialect
//! gets the same limits, and the engine, generic over the socket, is unit tested
//! over in-memory channels.
//!
//! One loop per connection, not a reader and a writer: a dialect's handler
//! writes its replies into the batch the loop flushes next, never into the
//! connection's own queue (which only this loop drains). While the loop
//! sleeps with nothing queued, the router may write row changes to the socket
//! itself ([`crate::wire`]); the loop takes the socket back before it reads,
//! writes or takes from its queue.

use std::future::{Future, poll_fn};
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::task::Poll;
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes};
use bytes::Bytes;
use futures_util::{Sink, SinkExt, Stream, StreamExt};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::gate::{Alarm, Alarms, GatedSocket};
use super::registry::now_ms;
use super::stats::Stats;
use aether_router::queue::{Next, Signal};
use aether_router::{Command, Outbound};

/// Close codes (4000–4999 are application codes).
pub const CLOSE_GOING_AWAY: u16 = 1001;
pub const CLOSE_PROTOCOL: u16 = 1002;
pub const CLOSE_INVALID_DATA: u16 = 1007;
pub const CLOSE_TOO_BIG: u16 = 1009;
pub const CLOSE_IDLE: u16 = 4000;
pub const CLOSE_AUTH: u16 = 4001;
pub const CLOSE_FORBIDDEN: u16 = 4003;
pub const CLOSE_SLOW: u16 = 4008;
pub const CLOSE_LIMIT: u16 = 4029;

/// How much the WebSocket library reads at once. Client frames are small, and
/// this buffer is filled (so committed) on the first read and kept for the
/// socket's life: tungstenite's default of 128 KiB, then 4 KiB, were most of an
/// idle connection's memory (aether-bench fan-out, heaptrack), and 512 B
/// instead of 1 KiB saves 0.6 KiB more per connection (8.6 → 8.0 KiB at
/// 10,000). Subscribe frames fit; a larger frame (a Phoenix join with its
/// token) takes one more read and still arrives whole: the library reserves
/// its full length.
pub const READ_BUFFER_BYTES: usize = 512;

/// Frames written before one flush when the queue holds a burst.
const MAX_FRAMES_PER_FLUSH: usize = 64;

/// Client frames one connection may send: a burst of this many, refilled at a
/// tenth of it per second. Subscribes, joins, status requests and tokens each
/// cost the server work (history scans, queries); nothing legitimate sends more.
const FRAMES_BURST: u32 = 1000;

/// How long the goodbye (last frames and the Close) may take to write, and then
/// how long the peer has to answer the Close.
const GOODBYE: Duration = Duration::from_secs(5);
const CLOSE_ANSWER: Duration = Duration::from_secs(2);

/// Frames a dialect hands the engine to write, in order.
pub(crate) type Frames = Vec<Message>;

/// How a broken client frame closes the connection (RFC 6455 §7.4.1): the
/// close code and reason, and whether the socket may still be read while
/// waiting for the peer's Close.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ProtocolClose {
    pub code: u16,
    pub reason: &'static str,
    /// `false` after a frame header over the size cap: reading on would buffer
    /// that frame's payload, whatever length it claims.
    pub drain: bool,
}

/// The close for an error reading a client's frames, from the library's error
/// kind; `None` when the peer is just gone (reset, end of stream, I/O).
pub(crate) fn protocol_close(e: axum::Error) -> Option<ProtocolClose> {
    use tungstenite::error::{Error as WsError, ProtocolError};
    let inner = e.into_inner();
    let close = |code, reason, drain| {
        Some(ProtocolClose {
            code,
            reason,
            drain,
        })
    };
    match inner.downcast_ref::<WsError>()? {
        WsError::Capacity(_) => close(CLOSE_TOO_BIG, "frame too large", false),
        WsError::Utf8(_) => close(CLOSE_INVALID_DATA, "invalid UTF-8 in a text frame", true),
        WsError::Protocol(ProtocolError::ResetWithoutClosingHandshake) => None,
        WsError::Protocol(_) => close(CLOSE_PROTOCOL, "protocol error", true),
        _ => None,
    }
}

/// An axum socket as the engine reads it: errors classified once.
pub(crate) fn classified(
    socket: axum::extract::ws::WebSocket,
) -> impl Sink<Message> + Stream<Item = Result<Message, Option<ProtocolClose>>> + Unpin + Send {
    socket.map(|r| r.map_err(protocol_close))
}

/// A rate limiter of one connection's, on a clock every connection shares.
///
/// `governor`'s own constructor makes a clock per limiter, and a clock asks
/// the CPU (`cpuid`, which traps in a virtual machine) whether its counter is
/// usable: measured, that was a third of the CPU of opening 10,000 sockets.
pub(crate) fn limiter(quota: governor::Quota) -> governor::DefaultDirectRateLimiter {
    governor::RateLimiter::direct_with_clock(quota, clock())
}

/// The clock [`limiter`] and the hubs' per-channel limiters share.
pub(crate) fn clock() -> governor::clock::DefaultClock {
    static CLOCK: std::sync::OnceLock<governor::clock::DefaultClock> = std::sync::OnceLock::new();
    CLOCK.get_or_init(Default::default).clone()
}

/// The budget of client frames one connection may send, whatever its dialect.
fn frame_budget() -> governor::DefaultDirectRateLimiter {
    let burst = std::num::NonZeroU32::new(FRAMES_BURST).unwrap_or(std::num::NonZeroU32::MIN);
    let rate = std::num::NonZeroU32::new(FRAMES_BURST / 10).unwrap_or(std::num::NonZeroU32::MIN);
    limiter(governor::Quota::per_second(rate).allow_burst(burst))
}

/// `RATE_LIMIT_MESSAGES` per `RATE_LIMIT_WINDOW_S`, as a burst refilled at that
/// rate: the budget of messages one client sends to one channel, in any dialect.
pub(crate) fn message_budget(cfg: &crate::Settings) -> governor::DefaultDirectRateLimiter {
    let n = std::num::NonZeroU32::new(cfg.rate_limit_messages).unwrap_or(std::num::NonZeroU32::MIN);
    let period = (cfg.rate_limit_window / n.get()).max(Duration::from_nanos(1));
    let quota = governor::Quota::with_period(period)
        .map(|q| q.allow_burst(n))
        .unwrap_or_else(|| governor::Quota::per_second(n));
    limiter(quota)
}

/// Why the engine ends a connection. The dialect says how ([`Dialect::ending`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Ending {
    Shutdown,
    /// The queue stayed full, or the connection fell behind what can be paged.
    Slow,
    /// The auth session of the connection's token was signed out.
    Revoked,
    /// Silent for longer than `WS_IDLE_TIMEOUT_S`.
    Idle,
    /// A client frame of at least this many bytes, over `WS_MAX_FRAME_BYTES`.
    TooBig(usize),
    /// A frame that breaks the WebSocket protocol.
    Protocol(ProtocolClose),
}

impl From<Signal> for Ending {
    fn from(signal: Signal) -> Ending {
        match signal {
            // Lagging closes nothing (`closing` never names it); it is here
            // only because the match must be whole.
            Signal::Overflowed | Signal::Lagging => Ending::Slow,
            Signal::Revoked => Ending::Revoked,
            Signal::Reaped => Ending::Idle,
        }
    }
}

/// A close: `frames` are written first, then the Close frame.
#[derive(Debug)]
pub(crate) struct Close {
    pub code: u16,
    pub reason: String,
    pub frames: Frames,
}

impl Close {
    pub(crate) fn new(code: u16, reason: impl Into<String>) -> Close {
        Close {
            code,
            reason: reason.into(),
            frames: Frames::new(),
        }
    }

    pub(crate) fn with_texts(mut self, texts: impl IntoIterator<Item = String>) -> Close {
        self.frames
            .extend(texts.into_iter().map(|t| Message::Text(t.into())));
        self
    }
}

/// A client frame the engine has admitted (within the size cap and the budget,
/// token not expired).
pub(crate) enum Inbound {
    Text(Utf8Bytes),
    Binary(Bytes),
}

/// What a WebSocket vocabulary adds to the engine: codecs and a message handler.
pub(crate) trait Dialect: Send {
    /// Runs once before anything else (a greeting, the URL's channel).
    fn open(&mut self, _frames: &mut Frames) -> impl Future<Output = Result<(), Close>> + Send {
        async { Ok(()) }
    }

    /// Frames for one item of the connection's queue when that needs no
    /// waiting (row changes and ready frames: the hot path); `Err` hands the
    /// item back for [`Dialect::outbound`]. Synchronous so that delivering a
    /// change keeps no future in every idle connection's task.
    fn encode(&mut self, out: Outbound, _frames: &mut Frames) -> Result<(), Outbound> {
        Err(out)
    }

    /// Frames for one item of the connection's queue that [`Dialect::encode`]
    /// handed back.
    fn outbound(&mut self, out: Outbound, frames: &mut Frames) -> impl Future<Output = ()> + Send;

    /// Acts on one client frame; replies go into `frames`. `Err` closes.
    fn inbound(
        &mut self,
        msg: Inbound,
        frames: &mut Frames,
    ) -> impl Future<Output = Result<(), Close>> + Send;

    /// When the connection's token expires (Unix seconds).
    fn expires_at(&self) -> Option<i64>;

    /// The token expired: `Err` closes; `Ok` keeps the socket open, having
    /// dropped to a principal that does not expire then.
    fn expired(&mut self, frames: &mut Frames) -> impl Future<Output = Result<(), Close>> + Send;

    /// The reply to a frame past the connection's frame budget.
    fn rate_limited(&mut self, frames: &mut Frames);

    /// How to close for `why`.
    fn ending(&self, why: Ending) -> Close;

    /// The connection is over for everyone else (router, hubs, registry); runs
    /// before the goodbye, which a slow peer may take a while to read.
    fn detach(&mut self) -> impl Future<Output = ()> + Send;
}

/// Where a connection is wired.
pub(crate) struct Link {
    pub session: u64,
    /// Its queue, and the signals its writers raise on it: overflowed (the
    /// router or a hub), revoked (the router), reaped (the registry) and lagging
    /// (the router: once the queue is half empty the engine answers with
    /// [`Command::Pull`]).
    pub rx: aether_router::queue::QueueRx<Outbound>,
    /// When the peer was last heard from (the registry reads it).
    pub last_seen: Arc<AtomicI64>,
    pub router: mpsc::Sender<Command>,
    pub shutdown: CancellationToken,
    /// Its socket as the router's direct writers share it, if they may.
    pub wire: Option<Arc<crate::wire::Wire>>,
}

/// The limits every dialect gets.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    pub ping_every: Duration,
    pub idle: Duration,
    pub max_frame_bytes: usize,
}

impl Limits {
    pub(crate) fn from_settings(cfg: &crate::Settings) -> Limits {
        Limits {
            ping_every: cfg.ws_ping_interval,
            idle: cfg.ws_idle_timeout,
            max_frame_bytes: cfg.ws_max_frame_bytes,
        }
    }
}

/// A connection's queue, bounded as every dialect's is (`WS_QUEUE_CAPACITY`
/// items weighing at most `WS_QUEUE_BYTES`).
pub(crate) fn queue(
    cfg: &crate::Settings,
) -> (
    aether_router::queue::QueueTx<Outbound>,
    aether_router::queue::QueueRx<Outbound>,
) {
    aether_router::queue::weighed(cfg.ws_queue_capacity, cfg.ws_queue_bytes, Outbound::weight)
}

/// When a connection's first ping is due: between half and all of the
/// interval, spread by its session number. Connections opened together (every
/// client reconnecting after a restart) would otherwise ping together forever:
/// 10,000 pings and pongs in one burst each interval, in the way of whatever
/// change lands in it. The golden-ratio step puts consecutive sessions far
/// apart, so any run of them covers the half-interval evenly.
fn first_ping(every: Duration, session: u64) -> Duration {
    const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;
    let fraction = session.wrapping_mul(GOLDEN) as f64 / u64::MAX as f64;
    every.mul_f64(1.0 - fraction / 2.0)
}

/// When a token expiring at `exp` (Unix seconds) is over; at most a year
/// ahead, so a token claiming to live for ever cannot overflow the clock.
fn deadline(exp: i64) -> tokio::time::Instant {
    const YEAR: u64 = 86_400 * 365;
    let left = u64::try_from(exp.saturating_sub(chrono::Utc::now().timestamp())).unwrap_or(0);
    tokio::time::Instant::now() + Duration::from_secs(left.min(YEAR))
}

/// The delivery-latency histogram, looked up once per connection: the
/// macro finds it in the recorder's registry on every call.
pub(crate) fn latency_histogram() -> metrics::Histogram {
    metrics::histogram!("aether_delivery_latency_seconds")
}

/// Records how long after its commit a change went out.
pub(crate) fn record_latency(latency: &metrics::Histogram, commit_time_ms: i64, now: i64) {
    record_latencies(latency, now - commit_time_ms, 1);
}

/// Records `n` changes that went out `ms` after their commits.
pub(crate) fn record_latencies(latency: &metrics::Histogram, ms: i64, n: u64) {
    latency.record_many(
        ms.max(0) as f64 / 1000.0,
        usize::try_from(n).unwrap_or(usize::MAX),
    );
}

/// The queue's next item or signal; found empty, the socket is offered to
/// the router's direct writers while the task sleeps. The socket is taken
/// back before the queue is read: a queued item must go out before any change
/// a writer could claim after it left the queue.
async fn next_or_release(
    rx: &mut aether_router::queue::QueueRx<Outbound>,
    wire: Option<&crate::wire::Wire>,
) -> Next<Outbound> {
    let mut next = std::pin::pin!(rx.next());
    poll_fn(|cx| {
        if let Some(w) = wire {
            if w.broken() {
                // A direct write failed: end, and let the client resume.
                return Poll::Ready(Next::Closed);
            }
            std::task::ready!(w.poll_take());
        }
        let r = next.as_mut().poll(cx);
        if let (Some(w), Poll::Pending) = (wire, &r) {
            w.release();
        }
        r
    })
    .await
}

/// Counts what a queue item delivers.
fn account(stats: &Stats, out: &Outbound, now: i64, latency: &metrics::Histogram) -> u64 {
    match out {
        Outbound::Change { change, .. } => {
            record_latency(latency, change.commit_time_ms, now);
            1
        }
        Outbound::Error { code, .. } => {
            stats.error(code);
            0
        }
        _ => 0,
    }
}

/// Writes `frames` (drained) with one flush at the end.
/// A frame leaves `frames` only once the sink has taken it, so a flush that a
/// close interrupts leaves the rest for the goodbye.
async fn send_all<S: Sink<Message> + Unpin>(sink: &mut S, frames: &mut Frames) -> Result<(), ()> {
    while let Some(f) = frames.first() {
        sink.feed(f.clone()).await.map_err(|_| ())?;
        frames.remove(0);
    }
    sink.flush().await.map_err(|_| ())
}

/// Refuses a connection before it runs: `close.frames`, then the Close.
pub(crate) async fn refuse<S: Sink<Message> + Unpin>(socket: &mut S, close: Close) {
    let _ = write_close(socket, Frames::new(), close).await;
}

/// Writes `frames`, then `close.frames` and the Close frame, within
/// [`GOODBYE`]; `true` when all of it went out.
async fn write_close<S: Sink<Message> + Unpin>(
    socket: &mut S,
    frames: Frames,
    close: Close,
) -> bool {
    let write = async {
        for f in frames.into_iter().chain(close.frames) {
            socket.feed(f).await.map_err(|_| ())?;
        }
        let frame = CloseFrame {
            code: close.code,
            reason: close.reason.into(),
        };
        socket
            .send(Message::Close(Some(frame)))
            .await
            .map_err(|_| ())
    };
    matches!(tokio::time::timeout(GOODBYE, write).await, Ok(Ok(())))
}

/// Hands a client frame to the dialect once it is within the size cap and the
/// frame budget, with an unexpired token. Boxed by the caller: the handlers'
/// futures (database checks, the hubs) are large, and inline they would make
/// every idle connection's task that much larger; a frame pays one allocation.
async fn admit<D: Dialect>(
    dialect: &mut D,
    inbound: Inbound,
    frames: &mut Frames,
    budget: &governor::DefaultDirectRateLimiter,
    limits: Limits,
    stats: &Stats,
) -> Result<(), Close> {
    stats.frame_in();
    let len = match &inbound {
        Inbound::Text(t) => t.len(),
        Inbound::Binary(b) => b.len(),
    };
    if len > limits.max_frame_bytes {
        stats.error("frame_too_large");
        return Err(dialect.ending(Ending::TooBig(len)));
    }
    if budget.check().is_err() {
        stats.error("rate_limited");
        dialect.rate_limited(frames);
        return Ok(());
    }
    // The token is checked on every frame, not only by the timer.
    if dialect
        .expires_at()
        .is_some_and(|exp| exp <= chrono::Utc::now().timestamp())
    {
        dialect.expired(frames).await?;
    }
    dialect.inbound(inbound, frames).await
}

/// Encodes `first` and then what is queued, at most `most` items in all, into
/// `frames`, counting what they deliver. Synchronous up to an item the dialect
/// must await ([`Dialect::encode`] handed it back): that one and the rest go
/// through [`encode_awaited`], boxed, so the hot path keeps no future.
fn encode_ready<D: Dialect>(
    dialect: &mut D,
    rx: &mut aether_router::queue::QueueRx<Outbound>,
    first: Option<Outbound>,
    most: usize,
    frames: &mut Frames,
    stats: &Stats,
    latency: &metrics::Histogram,
) -> Option<(Outbound, usize)> {
    let now = now_ms();
    let before = frames.len();
    let mut changes = 0;
    let mut next = first;
    let mut waiting = None;
    for i in 0..most {
        let Some(out) = next.take().or_else(|| rx.try_recv().ok()) else {
            break;
        };
        changes += account(stats, &out, now, latency);
        if let Err(out) = dialect.encode(out, frames) {
            waiting = Some((out, most - i - 1));
            break;
        }
    }
    stats.frames_out((frames.len() - before) as u64, changes);
    waiting
}

/// The rest of [`encode_ready`]'s work from an item the dialect must await.
async fn encode_awaited<D: Dialect>(
    dialect: &mut D,
    rx: &mut aether_router::queue::QueueRx<Outbound>,
    mut waiting: Option<(Outbound, usize)>,
    frames: &mut Frames,
    stats: &Stats,
    latency: &metrics::Histogram,
) {
    while let Some((out, left)) = waiting {
        let before = frames.len();
        dialect.outbound(out, frames).await;
        stats.frames_out((frames.len() - before) as u64, 0);
        waiting = encode_ready(dialect, rx, None, left, frames, stats, latency);
    }
}

/// [`encode_ready`], then [`encode_awaited`] if an item needs it.
macro_rules! encode_queued {
    ($dialect:expr, $rx:expr, $first:expr, $most:expr, $frames:expr, $stats:expr, $latency:expr) => {
        if let Some(waiting) = encode_ready($dialect, $rx, $first, $most, $frames, $stats, $latency)
        {
            Box::pin(encode_awaited(
                $dialect,
                $rx,
                Some(waiting),
                $frames,
                $stats,
                $latency,
            ))
            .await;
        }
    };
}

/// Runs one connection until it ends, then closes it with the reason.
///
/// A plain function returning an `async move` block, not an `async fn`: an
/// `async fn` moves its arguments into locals and keeps both copies in the
/// task, and every idle connection pays for the task's size. The socket is
/// borrowed (368 bytes): the caller's task holds it once.
#[allow(
    clippy::manual_async_fn,
    reason = "an async fn would keep its arguments twice in every connection's task"
)]
pub(crate) fn run<'a, S, D>(
    socket: &'a mut S,
    dialect: &'a mut D,
    mut link: Link,
    limits: Limits,
    stats: &'a Stats,
) -> impl Future<Output = ()> + Send + 'a
where
    S: Sink<Message> + Stream<Item = Result<Message, Option<ProtocolClose>>> + Unpin + Send + 'a,
    D: Dialect,
{
    async move {
        let wire = link.wire.clone();
        let socket = &mut GatedSocket::new(socket, wire.clone());
        let latency = latency_histogram();
        let budget = frame_budget();
        let idle_ms = i64::try_from(limits.idle.as_millis()).unwrap_or(i64::MAX);
        let mut frames = Frames::new();
        // Cleared after a frame header over the size cap: reading on would buffer
        // the payload it claims, so the closing handshake does not wait for the peer.
        let mut drain = true;
        let ending = 'conn: {
            if let Err(close) = Box::pin(dialect.open(&mut frames)).await {
                break 'conn Some(close);
            }
            let ping = tokio::time::interval_at(
                tokio::time::Instant::now() + first_ping(limits.ping_every, link.session),
                limits.ping_every,
            );
            let mut expires = dialect.expires_at();
            // Unarmed without a token that expires (then never polled).
            let expiry = tokio::time::sleep_until(deadline(expires.unwrap_or(i64::MAX)));
            tokio::pin!(expiry);
            let mut pull_wanted = false;
            let session = link.session;
            let rx = &mut link.rx;
            let (last_seen, router) = (&link.last_seen, &link.router);
            // Made once and polled in place: made anew on every turn, it would
            // register with its token and deregister again, under the token's
            // lock, for every frame delivered. Shutdown is one token for every
            // connection, so each watches a child of its own. The other reasons
            // to close are signals on the queue, read with an atomic load.
            let shutdown = link.shutdown.child_token();
            let shutdown = shutdown.cancelled();
            tokio::pin!(shutdown);
            // The shutdown and the timers wake the task through one gate, the
            // socket through its own: a row change polls neither.
            let mut alarms = Alarms::new(shutdown, expiry, expires.is_some(), ping);
            loop {
                // Checked on every turn, not only when the queue wakes the task:
                // a peer that keeps the socket busy must not keep a close away.
                if let Some(signal) = rx.closing() {
                    break Some(dialect.ending(Ending::from(signal)));
                }
                if rx.take_lagging() {
                    pull_wanted = true;
                }
                if !frames.is_empty() || socket.needs_write() {
                    // A peer that stops reading blocks the socket: stay interruptible
                    // so a close decided meanwhile still happens. The write comes
                    // first: when it completes at once, as it nearly always does,
                    // the closes are not polled (nor registered with) at all.
                    let sent = tokio::select! {
                        biased;
                        r = send_all(socket, &mut frames) => Ok(r),
                        _ = poll_fn(|cx| alarms.poll_shutdown(cx)) => {
                            Err(Ending::Shutdown)
                        }
                        signal = rx.closed_by_writer() => Err(Ending::from(signal)),
                    };
                    match sent {
                        // Closed at once: no frame of the peer's is handled first.
                        Err(why) => break Some(dialect.ending(why)),
                        Ok(Err(())) => break None,
                        Ok(Ok(())) => {}
                    }
                }
                // Lagging and half drained: ask the router for what was missed.
                if pull_wanted && aether_router::low_water(rx) {
                    pull_wanted = false;
                    let pull = Command::Pull { session };
                    if Box::pin(router.send(pull)).await.is_err() {
                        break None;
                    }
                }
                tokio::select! {
                    biased;
                    rung = poll_fn(|cx| alarms.poll_rung(cx)) => match rung {
                        Alarm::Shutdown => break Some(dialect.ending(Ending::Shutdown)),
                        Alarm::Expired => {
                            if let Err(close) = Box::pin(dialect.expired(&mut frames)).await {
                                break Some(close);
                            }
                        }
                        Alarm::Ping => {
                            if now_ms() - last_seen.load(Ordering::Relaxed) > idle_ms {
                                break Some(dialect.ending(Ending::Idle));
                            }
                            frames.push(Message::Ping(Bytes::new()));
                        }
                    },
                    // Before the queue: a queue that never empties (a catch-up
                    // paced to keep it full) must not stop the peer's frames, pongs
                    // among them, from being read.
                    msg = socket.next() => {
                        // Any frame, pongs included, counts as life.
                        last_seen.store(now_ms(), Ordering::Relaxed);
                        let inbound = match msg {
                            Some(Ok(Message::Text(text))) => Some(Inbound::Text(text)),
                            Some(Ok(Message::Binary(bytes))) => Some(Inbound::Binary(bytes)),
                            Some(Ok(Message::Close(_))) => {
                                // The library queued its answering Close; a flush
                                // sends it, so the peer sees a clean close.
                                let _ = Box::pin(tokio::time::timeout(CLOSE_ANSWER, socket.flush())).await;
                                break None;
                            }
                            Some(Err(None)) | None => break None,
                            Some(Ok(_)) => None, // pings are answered by the library
                            Some(Err(Some(pc))) => {
                                drain = pc.drain;
                                let why = if pc.code == CLOSE_TOO_BIG {
                                    stats.error("frame_too_large");
                                    Ending::TooBig(limits.max_frame_bytes.saturating_add(1))
                                } else {
                                    stats.error("invalid_message");
                                    Ending::Protocol(pc)
                                };
                                break Some(dialect.ending(why));
                            }
                        };
                        if let Some(inbound) = inbound {
                            let mut replies = Frames::new();
                            let handled =
                                Box::pin(admit(dialect, inbound, &mut replies, &budget, limits, stats)).await;
                            // What was queued while the frame was handled (a hub's
                            // relay of an earlier message, say) goes out before the
                            // replies, as when replies went through the queue. At
                            // most one queue's worth, so this ends.
                            let most = rx.max_capacity();
                            encode_queued!(dialect, rx, None, most, &mut frames, stats, &latency);
                            frames.append(&mut replies);
                            if let Err(close) = handled {
                                break Some(close);
                            }
                        }
                    }
                    next = next_or_release(rx, wire.as_deref()) => match next {
                        // What is already queued goes out in the same write: one flush
                        // (one syscall) per burst instead of one per frame.
                        Next::Item(out) => {
                            encode_queued!(dialect, rx, Some(out), MAX_FRAMES_PER_FLUSH, &mut frames, stats, &latency);
                        }
                        // The next turn reads it.
                        Next::Signalled => {}
                        Next::Closed => break None,
                    },
                }
                if dialect.expires_at() != expires {
                    // A renewed (or dropped) token moves the deadline.
                    expires = dialect.expires_at();
                    alarms.rearm(expires.map(deadline));
                }
            }
        };
        // No direct write after this: what the queue still holds is dropped
        // below, and a change written after it would leave a gap the client
        // could not see when it resumes. The socket stays the task's.
        poll_fn(|cx| socket.poll_take(cx)).await;
        // The queue and the signals go now, not after the goodbye: a slow
        // peer's goodbye may take seconds, and what is still queued for it
        // would be held (and writers would see the queue open) until then.
        drop(link);
        // Boxed, as the goodbye below: cold paths need not size every idle task.
        Box::pin(dialect.detach()).await;
        let Some(close) = ending else { return };
        Box::pin(goodbye(socket, frames, close, drain)).await;
    }
}

/// Writes what is left and the Close, then waits briefly for the peer's Close.
async fn goodbye<S>(socket: &mut S, frames: Frames, close: Close, drain: bool)
where
    S: Sink<Message> + Stream<Item = Result<Message, Option<ProtocolClose>>> + Unpin + Send,
{
    // Replies not yet written (a refusal's reason among them), then the close.
    if write_close(socket, frames, close).await && drain {
        // The closing handshake: wait for the peer's Close before the socket
        // goes, so the peer reads our code rather than a reset.
        let _ = tokio::time::timeout(CLOSE_ANSWER, async {
            while let Some(Ok(m)) = socket.next().await {
                if matches!(m, Message::Close(_)) {
                    break;
                }
            }
        })
        .await;
    }
}

#[cfg(test)]
mod tests {
    //! The engine over in-memory channels: a test dialect echoes text frames and
    //! sends its queue's `Frame`s as they are; the assertions are the engine's.
    use super::*;
    use std::pin::Pin;
    use std::sync::atomic::AtomicBool;
    use std::task::{Context, Poll};

    type Read = Result<Message, Option<ProtocolClose>>;

    /// One end of an in-memory socket; `stuck` never accepts a frame, like a
    /// peer that stopped reading.
    struct Pipe {
        from_peer: mpsc::UnboundedReceiver<Read>,
        to_peer: mpsc::UnboundedSender<Message>,
        stuck: bool,
        /// Frames written so far.
        written: Arc<std::sync::atomic::AtomicUsize>,
    }

    impl Stream for Pipe {
        type Item = Read;
        fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Read>> {
            self.from_peer.poll_recv(cx)
        }
    }

    impl Sink<Message> for Pipe {
        type Error = ();
        fn poll_ready(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Result<(), ()>> {
            if self.stuck {
                Poll::Pending
            } else {
                Poll::Ready(Ok(()))
            }
        }
        fn start_send(self: Pin<&mut Self>, m: Message) -> Result<(), ()> {
            self.written.fetch_add(1, Ordering::SeqCst);
            self.to_peer.send(m).map_err(|_| ())
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Result<(), ()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_close(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Result<(), ()>> {
            Poll::Ready(Ok(()))
        }
    }

    struct Echo {
        expires: Option<i64>,
        detached: Arc<AtomicBool>,
        /// The socket's frames written when a text frame was last handled.
        written: Arc<std::sync::atomic::AtomicUsize>,
        heard_at: Arc<std::sync::atomic::AtomicUsize>,
        /// Whether the router could claim the socket when the connection
        /// detached (its queue gone).
        claimable_at_detach: Option<(Arc<crate::wire::Wire>, Arc<AtomicBool>)>,
    }

    impl Dialect for Echo {
        /// Greets only when the token claims to live for ever: the test of
        /// greetings says so, the others need no extra frame.
        async fn open(&mut self, frames: &mut Frames) -> Result<(), Close> {
            if self.expires == Some(i64::MAX) {
                frames.push(Message::Text("hello".into()));
            }
            Ok(())
        }

        async fn outbound(&mut self, out: Outbound, frames: &mut Frames) {
            if let Outbound::Frame(t) = out {
                frames.push(Message::Text(t.as_ref().into()));
            }
        }
        async fn inbound(&mut self, msg: Inbound, frames: &mut Frames) -> Result<(), Close> {
            match msg {
                Inbound::Text(t) if t.as_str() == "bye" => Err(Close::new(4100, "asked")),
                // A token renewed in band: the deadline it brings.
                Inbound::Text(t) if t.as_str().starts_with("expires ") => {
                    self.expires = t.as_str()["expires ".len()..].parse().ok();
                    Ok(())
                }
                Inbound::Text(t) => {
                    let written = self.written.load(Ordering::SeqCst);
                    self.heard_at.store(written, Ordering::SeqCst);
                    frames.push(Message::Text(format!("echo {}", t.as_str()).into()));
                    Ok(())
                }
                Inbound::Binary(_) => Ok(()),
            }
        }
        fn expires_at(&self) -> Option<i64> {
            self.expires
        }
        async fn expired(&mut self, _frames: &mut Frames) -> Result<(), Close> {
            Err(Close::new(CLOSE_AUTH, "expired").with_texts(["token expired".to_owned()]))
        }
        fn rate_limited(&mut self, frames: &mut Frames) {
            frames.push(Message::Text("limited".into()));
        }
        fn ending(&self, why: Ending) -> Close {
            let code = match why {
                Ending::Shutdown => CLOSE_GOING_AWAY,
                Ending::Slow => CLOSE_SLOW,
                Ending::Revoked => CLOSE_AUTH,
                Ending::Idle => CLOSE_IDLE,
                Ending::TooBig(_) => CLOSE_TOO_BIG,
                Ending::Protocol(pc) => pc.code,
            };
            Close::new(code, format!("{why:?}")).with_texts([format!("ending {why:?}")])
        }
        async fn detach(&mut self) {
            use aether_router::direct::Direct;
            if let Some((wire, claimable)) = &self.claimable_at_detach
                && wire.claim()
            {
                claimable.store(true, Ordering::SeqCst);
                wire.abandon();
            }
            self.detached.store(true, Ordering::SeqCst);
        }
    }

    /// A running connection: the peer's ends, the queue, the router's end and
    /// the link's signals.
    struct Harness {
        peer_tx: mpsc::UnboundedSender<Read>,
        peer_rx: mpsc::UnboundedReceiver<Message>,
        queue: aether_router::queue::QueueTx<Outbound>,
        router: mpsc::Receiver<Command>,
        shutdown: CancellationToken,
        detached: Arc<AtomicBool>,
        /// Frames written to the socket when the dialect last handled a text frame.
        heard_at: Arc<std::sync::atomic::AtomicUsize>,
        done: tokio::task::JoinHandle<()>,
    }

    const WAIT: Duration = Duration::from_secs(5);

    fn limits() -> Limits {
        Limits {
            ping_every: Duration::from_secs(60),
            idle: Duration::from_secs(120),
            max_frame_bytes: 100,
        }
    }

    fn start(limits: Limits, expires: Option<i64>, stuck: bool, queue: usize) -> Harness {
        start_probed(limits, expires, stuck, queue, None, None)
    }

    fn start_probed(
        limits: Limits,
        expires: Option<i64>,
        stuck: bool,
        queue: usize,
        wire: Option<Arc<crate::wire::Wire>>,
        wire_probe: Option<(Arc<crate::wire::Wire>, Arc<AtomicBool>)>,
    ) -> Harness {
        let (peer_tx, from_peer) = mpsc::unbounded_channel();
        let (to_peer, peer_rx) = mpsc::unbounded_channel();
        let (queue_tx, rx) = aether_router::queue::channel(queue);
        let (router_tx, router) = mpsc::channel(16);
        let detached = Arc::new(AtomicBool::new(false));
        let written = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let heard_at = Arc::new(std::sync::atomic::AtomicUsize::new(usize::MAX));
        let link = Link {
            session: 7,
            rx,
            last_seen: Arc::new(AtomicI64::new(now_ms())),
            router: router_tx,
            shutdown: CancellationToken::new(),
            wire,
        };
        Harness {
            peer_tx,
            peer_rx,
            queue: queue_tx,
            router,
            shutdown: link.shutdown.clone(),
            detached: Arc::clone(&detached),
            heard_at: Arc::clone(&heard_at),
            done: tokio::spawn(async move {
                let pipe = Pipe {
                    from_peer,
                    to_peer,
                    stuck,
                    written: Arc::clone(&written),
                };
                let mut dialect = Echo {
                    expires,
                    detached,
                    written,
                    heard_at,
                    claimable_at_detach: wire_probe,
                };
                let mut pipe = pipe;
                run(&mut pipe, &mut dialect, link, limits, &Stats::default()).await;
            }),
        }
    }

    impl Harness {
        fn send(&self, text: &str) {
            self.peer_tx
                .send(Ok(Message::Text(text.to_owned().into())))
                .unwrap();
        }

        async fn next(&mut self) -> Message {
            tokio::time::timeout(WAIT, self.peer_rx.recv())
                .await
                .expect("a frame in time")
                .expect("the socket open")
        }

        async fn next_text(&mut self) -> String {
            loop {
                match self.next().await {
                    Message::Text(t) => return t.as_str().to_owned(),
                    Message::Ping(_) => continue,
                    other => panic!("expected text, got {other:?}"),
                }
            }
        }

        /// Reads to the Close frame; returns the texts before it and the code.
        async fn close(&mut self) -> (Vec<String>, u16) {
            let mut texts = Vec::new();
            loop {
                match self.next().await {
                    Message::Text(t) => texts.push(t.as_str().to_owned()),
                    Message::Close(Some(c)) => return (texts, c.code),
                    Message::Ping(_) => {}
                    other => panic!("unexpected {other:?}"),
                }
            }
        }

        /// The peer answers the close; the engine ends and has detached.
        async fn ended(self) {
            let _ = self.peer_tx.send(Ok(Message::Close(None)));
            tokio::time::timeout(WAIT, self.done)
                .await
                .expect("the connection ends")
                .unwrap();
            assert!(self.detached.load(Ordering::SeqCst));
        }
    }

    #[tokio::test]
    async fn the_queue_and_replies_go_out_in_order() {
        let mut h = start(limits(), None, false, 16);
        for t in ["a", "b", "c"] {
            h.queue.try_send(Outbound::Frame(Arc::from(t))).unwrap();
        }
        assert_eq!(h.next_text().await, "a");
        assert_eq!(h.next_text().await, "b");
        assert_eq!(h.next_text().await, "c");
        h.send("hi");
        assert_eq!(h.next_text().await, "echo hi");
        h.send("bye");
        let (texts, code) = h.close().await;
        assert_eq!((texts, code), (vec![], 4100));
        h.ended().await;
    }

    #[tokio::test]
    async fn what_the_dialect_says_on_opening_goes_out_at_once() {
        // A token that claims to live for ever, too: its deadline is capped.
        let mut h = start(limits(), Some(i64::MAX), false, 16);
        assert_eq!(h.next_text().await, "hello");
        h.shutdown.cancel();
        let (_, code) = h.close().await;
        assert_eq!(code, CLOSE_GOING_AWAY);
        h.ended().await;
    }

    #[tokio::test]
    async fn a_frame_over_the_cap_closes_with_1009_after_the_reason() {
        let mut h = start(limits(), None, false, 16);
        h.send(&"x".repeat(101));
        let (texts, code) = h.close().await;
        assert_eq!(code, CLOSE_TOO_BIG);
        assert_eq!(texts, vec!["ending TooBig(101)".to_owned()]);
        h.ended().await;
    }

    #[tokio::test]
    async fn a_frame_header_over_the_cap_closes_without_waiting_for_the_peer() {
        let mut h = start(limits(), None, false, 16);
        let pc = ProtocolClose {
            code: CLOSE_TOO_BIG,
            reason: "frame too large",
            drain: false,
        };
        h.peer_tx.send(Err(Some(pc))).unwrap();
        let (_, code) = h.close().await;
        assert_eq!(code, CLOSE_TOO_BIG);
        // No Close from the peer is awaited: the engine is already done.
        tokio::time::timeout(Duration::from_millis(500), h.done)
            .await
            .expect("ended without the peer's Close")
            .unwrap();
    }

    #[tokio::test]
    async fn frames_past_the_budget_get_the_dialects_reply_and_the_socket_stays_open() {
        let mut h = start(limits(), None, false, 16);
        for i in 0..1100 {
            h.send(&i.to_string());
        }
        let (mut echoed, mut limited) = (0, 0);
        for _ in 0..1100 {
            match h.next_text().await.as_str() {
                "limited" => limited += 1,
                _ => echoed += 1,
            }
        }
        assert!(echoed >= 1000 && limited >= 50, "{echoed} {limited}");
        h.queue.raise(Signal::Reaped);
        let (_, code) = h.close().await;
        assert_eq!(code, CLOSE_IDLE);
        h.ended().await;
    }

    #[tokio::test]
    async fn a_full_queue_does_not_stop_the_peer_being_heard() {
        // A catch-up keeps a connection's queue from emptying; the peer's
        // frames (pongs, heartbeats) must still be read meanwhile, or a healthy
        // client is closed as idle. Before the engine first runs, 50,000 items
        // are queued and the peer has sent one frame: it is read and handled
        // before the backlog is written. Its answer follows what was queued
        // when it was handled, as replies did when they went through the queue.
        let mut h = start(limits(), None, false, 100_000);
        for _ in 0..50_000 {
            h.queue.try_send(Outbound::Frame(Arc::from("q"))).unwrap();
        }
        h.send("hi");
        let mut before = 0;
        loop {
            match h.next().await {
                Message::Text(t) if t.as_str() == "echo hi" => break,
                Message::Text(_) => before += 1,
                other => panic!("unexpected {other:?}"),
            }
        }
        let heard_at = h.heard_at.load(Ordering::SeqCst);
        assert!(
            heard_at < 1_000,
            "read after {heard_at} frames were written"
        );
        assert_eq!(before, 50_000, "the queued frames come before the reply");
        h.shutdown.cancel();
        let (_, code) = h.close().await;
        assert_eq!(code, CLOSE_GOING_AWAY);
        h.ended().await;
    }

    #[test]
    fn first_pings_spread_over_the_second_half_of_the_interval() {
        let every = Duration::from_secs(30);
        let mut firsts: Vec<Duration> = (1..=1000).map(|s| first_ping(every, s)).collect();
        assert!(firsts.iter().all(|f| *f >= every / 2 && *f <= every));
        firsts.sort();
        // Any 1,000 consecutive sessions: no second of the window holds
        // more than a little over its share (1,000 over 15 s is 67).
        for start in 15..30 {
            let (from, to) = (Duration::from_secs(start), Duration::from_secs(start + 1));
            let n = firsts.iter().filter(|f| **f >= from && **f < to).count();
            assert!((50..=85).contains(&n), "{n} first pings in second {start}");
        }
    }

    #[tokio::test]
    async fn a_silent_peer_is_pinged_then_closed_as_idle() {
        let l = Limits {
            ping_every: Duration::from_millis(20),
            idle: Duration::from_millis(150),
            max_frame_bytes: 100,
        };
        let mut h = start(l, None, false, 16);
        assert!(matches!(h.next().await, Message::Ping(_)));
        let (_, code) = h.close().await;
        assert_eq!(code, CLOSE_IDLE);
        h.ended().await;
    }

    #[tokio::test]
    async fn an_expiring_token_closes_with_the_dialects_frames() {
        let now = chrono::Utc::now().timestamp();
        let mut h = start(limits(), Some(now + 1), false, 16);
        let (texts, code) = h.close().await;
        assert_eq!(
            (texts, code),
            (vec!["token expired".to_owned()], CLOSE_AUTH)
        );
        h.ended().await;

        // An expired token is also caught on the next frame, before the handler.
        let mut h = start(limits(), Some(now - 1), false, 16);
        h.send("hi");
        let (texts, code) = h.close().await;
        assert_eq!(
            (texts, code),
            (vec!["token expired".to_owned()], CLOSE_AUTH)
        );
        h.ended().await;
    }

    #[tokio::test]
    async fn a_deadline_a_renewal_brings_or_moves_closes_the_connection() {
        // None before (an API key, say), or a later one: either way the new
        // deadline is kept.
        for before in [None, Some(chrono::Utc::now().timestamp() + 3600)] {
            let mut h = start(limits(), before, false, 16);
            h.send(&format!("expires {}", chrono::Utc::now().timestamp() + 1));
            let (texts, code) = h.close().await;
            assert_eq!(
                (texts, code),
                (vec!["token expired".to_owned()], CLOSE_AUTH),
                "{before:?}"
            );
            h.ended().await;
        }
    }

    #[tokio::test]
    async fn shutdown_overflow_revocation_and_reaping_close_with_their_codes() {
        let cases = [
            (None, CLOSE_GOING_AWAY),
            (Some(Signal::Overflowed), CLOSE_SLOW),
            (Some(Signal::Revoked), CLOSE_AUTH),
            (Some(Signal::Reaped), CLOSE_IDLE),
        ];
        for (signal, expected) in cases {
            let mut h = start(limits(), None, false, 16);
            match signal {
                Some(s) => assert!(h.queue.raise(s)),
                None => h.shutdown.cancel(),
            }
            let (texts, code) = h.close().await;
            assert_eq!(code, expected);
            assert_eq!(texts.len(), 1, "{texts:?}");
            h.ended().await;
        }
    }

    #[tokio::test]
    async fn a_peer_that_stops_reading_is_still_closed() {
        let h = start(limits(), None, true, 16);
        h.queue.try_send(Outbound::Frame(Arc::from("a"))).unwrap();
        h.queue.raise(Signal::Overflowed);
        tokio::time::timeout(GOODBYE + WAIT, h.done)
            .await
            .expect("the connection ends")
            .unwrap();
        assert!(h.detached.load(Ordering::SeqCst));
    }

    #[tokio::test]
    async fn a_lagging_connection_pulls_once_its_queue_is_half_drained() {
        let mut h = start(limits(), None, false, 4);
        for t in ["a", "b", "c", "d"] {
            h.queue.try_send(Outbound::Frame(Arc::from(t))).unwrap();
        }
        h.queue.raise(Signal::Lagging);
        let pull = tokio::time::timeout(WAIT, h.router.recv()).await.unwrap();
        assert!(matches!(pull, Some(Command::Pull { session: 7 })));
        // Everything queued was written before the pull was asked for.
        for t in ["a", "b", "c", "d"] {
            assert_eq!(h.next_text().await, t);
        }
        assert!(h.router.try_recv().is_err(), "one pull per lag");
        h.shutdown.cancel();
        let (_, code) = h.close().await;
        assert_eq!(code, CLOSE_GOING_AWAY);
        h.ended().await;
    }

    /// A wire over a real TCP connection, as a `/ws` socket has, and its peer.
    async fn wire() -> (Arc<crate::wire::Wire>, tokio::net::TcpStream) {
        let (server, client) = crate::wire::tests::tcp_pair().await;
        let wire =
            crate::wire::Wire::new(server, crate::protocol::change_wire_frame, Arc::default());
        (Arc::new(wire), client)
    }

    #[tokio::test]
    async fn the_queue_waits_while_a_writer_holds_the_socket() {
        use aether_router::direct::Direct;
        let (wire, _client) = wire().await;
        let mut h = start_probed(limits(), None, false, 16, Some(Arc::clone(&wire)), None);
        // Asleep with nothing queued, the engine offers the socket.
        tokio::time::timeout(Duration::from_secs(5), async {
            while !wire.claim() {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("the socket is offered");
        // Queued while a writer holds the socket: not taken from the queue
        // (a change claimed after it left the queue could overtake it).
        h.queue.try_send(Outbound::Frame(Arc::from("q"))).unwrap();
        for _ in 0..50 {
            // The engine's task runs here (one thread).
            tokio::task::yield_now().await;
        }
        assert!(
            !h.queue.is_empty(),
            "the engine took an item while the socket was claimed"
        );
        // The writer is done: the item goes out.
        wire.deliver(
            "s",
            &crate::wire::tests::change(),
            &mut aether_router::direct::Tally::default(),
        );
        assert_eq!(h.next_text().await, "q");
        h.ended().await;
    }

    #[tokio::test]
    async fn no_change_is_written_directly_once_the_connection_is_ending() {
        let (wire, _client) = wire().await;
        let claimable = Arc::new(AtomicBool::new(false));
        let probe = Some((Arc::clone(&wire), Arc::clone(&claimable)));
        let mut h = start_probed(limits(), None, false, 16, Some(Arc::clone(&wire)), probe);
        // Asleep, the socket offered; then the connection is shut down.
        tokio::time::timeout(Duration::from_secs(5), async {
            while !wire.is_idle() {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("the socket is offered");
        h.shutdown.cancel();
        let (_, code) = h.close().await;
        assert_eq!(code, CLOSE_GOING_AWAY);
        // When its queue went (detach), the router could not claim the socket:
        // a change written then would follow ones the queue dropped.
        assert!(h.detached.load(Ordering::SeqCst));
        assert!(
            !claimable.load(Ordering::SeqCst),
            "claimable after the queue was dropped"
        );
        h.ended().await;
    }
}
