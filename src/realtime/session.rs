//! One WebSocket connection: a reader that parses client frames and a writer that
//! drains the connection's bounded queue. The router and the hub never wait on
//! either's socket (the router's one wait is the bounded catch-up hold, see
//! `router`).
//!
//! The same connection speaks the change-subscription frames (`subscription`) and
//! the Aether WebSocket API (`connection`, `message`, `system`); a connection opened
//! with `client_id` or `channel` in its URL is greeted with `connection`/`connect`.

use std::net::IpAddr;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket};
use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;

use super::hub::{self, HubCommand, HubError, Member, SendOutcome};
use super::kingshare;
use super::protocol::{self, ClientFrame, FrameError, SubscribeRequest};
use super::registry::{ConnEntry, LimitError, now_ms};
use crate::auth::{Principal, Role};
use crate::server::AppState;
use aether_router::catalog::Catalog;
use aether_router::filter::Filter;
use aether_router::{Command, EventMask, Outbound, SessionHandle, SubscriptionSpec};

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

/// Which vocabulary a connection speaks (docs/kingshare.md):
/// - `Aether`: `protocol=aether` (or subprotocol `aether`), or a URL naming
///   `client_id` or `channel` — change subscriptions and the Aether WebSocket API;
/// - `KingShare`: `protocol=kingshare` (or subprotocol `kingshare`) — KingShare only;
/// - `Mixed`: neither (a token-only or anonymous connection) — both vocabularies,
///   and KingShare events. Errors answer in the vocabulary of the frame that caused
///   them; connection-level errors come in both.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Dialect {
    Aether,
    KingShare,
    #[default]
    Mixed,
}

impl Dialect {
    pub fn detect(protocol: Option<&str>, client_id: bool, channel: bool) -> Dialect {
        match protocol {
            Some("aether") => Dialect::Aether,
            Some("kingshare") => Dialect::KingShare,
            _ if client_id || channel => Dialect::Aether,
            _ => Dialect::Mixed,
        }
    }

    fn kingshare_events(self) -> bool {
        self != Dialect::Aether
    }

    /// Frames for a connection-level error: the Aether envelope, the KingShare
    /// `Error`, or both.
    pub fn error_frames(
        self,
        component: &str,
        code: &str,
        ks_code: Option<&str>,
        message: &str,
    ) -> Vec<String> {
        let aether = || protocol::error_frame(component, code, message, None);
        let ks = || ks_code.map(|c| kingshare::error(c, message));
        match self {
            Dialect::Aether => vec![aether()],
            Dialect::KingShare => ks().into_iter().collect(),
            Dialect::Mixed => std::iter::once(aether()).chain(ks()).collect(),
        }
    }
}

/// How a broken client frame closes the connection (RFC 6455 §7.4.1): the
/// close code and reason, and whether the socket may still be read while
/// waiting for the peer's Close.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProtocolClose {
    pub code: u16,
    pub reason: &'static str,
    /// `false` after a frame header over the size cap: reading on would buffer
    /// that frame's payload, whatever length it claims.
    pub drain: bool,
}

/// The close for an error reading a client's frames, from the library's error
/// kind; `None` when the peer is just gone (reset, end of stream, I/O).
pub fn protocol_close(e: axum::Error) -> Option<ProtocolClose> {
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

/// Frames written before one flush when the queue holds a burst.
const MAX_FRAMES_PER_FLUSH: usize = 64;

/// Client frames one connection may send: a burst of this many, refilled at a
/// tenth of it per second. Subscribes, status requests and tokens each cost the
/// server work (history scans, queries); nothing legitimate sends more.
const FRAMES_BURST: u32 = 1000;

/// The budget of client frames one connection may send, whatever its dialect.
pub(crate) fn frame_budget() -> governor::DefaultDirectRateLimiter {
    governor::RateLimiter::direct(
        governor::Quota::per_second(
            std::num::NonZeroU32::new(FRAMES_BURST / 10).unwrap_or(std::num::NonZeroU32::MIN),
        )
        .allow_burst(std::num::NonZeroU32::new(FRAMES_BURST).unwrap_or(std::num::NonZeroU32::MIN)),
    )
}

/// `RATE_LIMIT_MESSAGES` per `RATE_LIMIT_WINDOW_S`, as a burst refilled at that
/// rate: the budget of messages one client sends to one channel.
pub(crate) fn message_budget(cfg: &crate::config::Config) -> governor::DefaultDirectRateLimiter {
    let n = std::num::NonZeroU32::new(cfg.rate_limit_messages).unwrap_or(std::num::NonZeroU32::MIN);
    let period = (cfg.rate_limit_window / n.get()).max(Duration::from_nanos(1));
    let quota = governor::Quota::with_period(period)
        .map(|q| q.allow_burst(n))
        .unwrap_or_else(|| governor::Quota::per_second(n));
    governor::RateLimiter::direct(quota)
}

/// Counts what a frame delivers; `now` is read once per written burst and
/// `latency` is the histogram handle, looked up once per connection.
fn account(state: &AppState, out: &Outbound, now: i64, latency: &metrics::Histogram) -> u64 {
    match out {
        Outbound::Change { change, .. } => {
            let ms = (now - change.commit_time_ms).max(0);
            latency.record(ms as f64 / 1000.0);
            1
        }
        Outbound::Error { code, .. } => {
            state.stats.error(code);
            0
        }
        _ => 0,
    }
}

/// What the connection URL asked for.
#[derive(Debug, Clone, Default)]
pub struct ConnectParams {
    pub client_id: Option<String>,
    pub channel: Option<String>,
    /// The client's address ([`crate::api::extract::client_ip`]).
    pub addr: Option<IpAddr>,
    pub dialect: Dialect,
}

/// Refuses a connection whose token failed: an error frame, then close.
pub async fn reject(mut socket: WebSocket, dialect: Dialect, code: &str, message: String) {
    let ks = if code == "internal_error" {
        kingshare::code::INTERNAL_ERROR
    } else {
        kingshare::code::INVALID_TOKEN
    };
    for frame in dialect.error_frames("auth", code, Some(ks), &message) {
        let _ = socket.send(Message::Text(frame.into())).await;
    }
    let _ = socket
        .send(Message::Close(Some(CloseFrame {
            code: CLOSE_AUTH,
            reason: Utf8Bytes::from(code.to_owned()),
        })))
        .await;
}

/// Why a connection is being closed: the first reason given wins.
#[derive(Default)]
struct Closer {
    token: CancellationToken,
    reason: Mutex<Option<(u16, String, Vec<String>)>>,
}

impl Closer {
    fn close(&self, code: u16, reason: &str, frames: Vec<String>) {
        let mut r = self.reason.lock().unwrap_or_else(|p| p.into_inner());
        if r.is_none() {
            *r = Some((code, reason.to_owned(), frames));
        }
        self.token.cancel();
    }

    fn take(&self) -> Option<(u16, String, Vec<String>)> {
        self.reason.lock().unwrap_or_else(|p| p.into_inner()).take()
    }
}

/// What a connection's reader keeps between frames.
struct Conn {
    session: u64,
    dialect: Dialect,
    /// KingShare frames per connection: `RATE_LIMIT_MESSAGES` per window.
    ks_limit: governor::DefaultDirectRateLimiter,
    /// Every client frame, whatever the vocabulary (see [`FRAMES_BURST`]).
    frame_limit: governor::DefaultDirectRateLimiter,
    state: AppState,
    principal: Arc<Principal>,
    tx: mpsc::Sender<Outbound>,
    expiry: watch::Sender<Option<i64>>,
    closer: Arc<Closer>,
}

pub async fn run(
    mut socket: WebSocket,
    state: AppState,
    principal: Principal,
    params: ConnectParams,
) {
    let session = state.next_session.fetch_add(1, Ordering::Relaxed);
    let client_id: Arc<str> = Arc::from(
        params
            .client_id
            .clone()
            .filter(|c| !c.is_empty() && c.len() <= 128)
            .unwrap_or_else(|| uuid::Uuid::new_v4().to_string()),
    );
    let closer = Arc::new(Closer::default());
    let last_seen = Arc::new(AtomicI64::new(now_ms()));
    let entry = ConnEntry {
        user_key: user_key(&principal, params.addr),
        user_id: principal.user_id.clone(),
        client_id: Arc::clone(&client_id),
        last_seen: Arc::clone(&last_seen),
        close: closer.token.clone(),
    };
    let cfg = &state.config;
    let admitted = admit(&state, session, entry);
    if let Err(e) = admitted {
        let frames = params.dialect.error_frames(
            "connection",
            "connection_limit",
            Some(kingshare::code::CONNECTION_LIMIT),
            &e.to_string(),
        );
        for frame in frames {
            let _ = socket.send(Message::Text(frame.into())).await;
        }
        let close = CloseFrame {
            code: CLOSE_LIMIT,
            reason: "connection_limit".into(),
        };
        let _ = socket.send(Message::Close(Some(close))).await;
        return;
    }
    metrics::gauge!("aether_ws_connections").increment(1.0);

    let (tx, rx) = mpsc::channel::<Outbound>(cfg.ws_queue_capacity);
    let overflowed = CancellationToken::new();
    let lagging = Arc::new(tokio::sync::Notify::new());
    let revoked = CancellationToken::new();
    let principal = Arc::new(principal);
    let handle = SessionHandle {
        tx: tx.clone(),
        overflowed: overflowed.clone(),
        revoked: revoked.clone(),
        lagging: Arc::clone(&lagging),
        principal: Arc::clone(&principal),
    };
    let member = Member {
        tx: tx.clone(),
        overflowed: overflowed.clone(),
        client_id: Arc::clone(&client_id),
        sender_key: Arc::from(format!("{}/{client_id}", user_key(&principal, params.addr))),
        user_id: principal.user_id.as_deref().map(Arc::from),
        authenticated: principal.user_id.is_some() || principal.is_service(),
    };
    let attached = state
        .router
        .send(Command::Attach { session, handle })
        .await
        .is_ok()
        && state
            .hub
            .send(HubCommand::Attach { session, member })
            .await
            .is_ok();
    let (expiry, expiry_rx) = watch::channel(principal.expires_at);
    if params.dialect.kingshare_events() {
        state.kingshare.register(
            session,
            principal.user_id.as_deref(),
            tx.clone(),
            overflowed.clone(),
        );
    }
    // Presence: a user's first connection.
    if let (Ok(1), Some(uid)) = (&admitted, principal.user_id.clone()) {
        let st = state.clone();
        crate::server::spawn_named("presence", async move {
            kingshare::announce_presence(&st, &uid, true).await
        });
    }
    let conn = Conn {
        session,
        dialect: params.dialect,
        ks_limit: message_budget(cfg),
        frame_limit: frame_budget(),
        state: state.clone(),
        principal,
        tx,
        expiry,
        closer: Arc::clone(&closer),
    };

    if attached && params.dialect == Dialect::Aether {
        greet(&conn, &client_id, params.channel.as_deref()).await;
    }
    if attached {
        let writer = write_loop(
            socket, &conn, rx, overflowed, revoked, lagging, expiry_rx, last_seen,
        );
        writer.await;
    }
    let _ = state.router.send(Command::Detach { session }).await;
    let _ = state.hub.send(HubCommand::Detach { session }).await;
    state.kingshare.unregister(session);
    unregister(&state, session);
    metrics::gauge!("aether_ws_connections").decrement(1.0);
}

/// What a connection counts against for `RATE_LIMIT_CONNECTIONS`: its user, the
/// service role, or `anon:<address>`.
pub(crate) fn user_key(principal: &Principal, addr: Option<IpAddr>) -> String {
    match (&principal.user_id, principal.role) {
        (Some(u), _) => u.clone(),
        (None, Role::Service) => "service_role".to_owned(),
        (None, _) => format!("anon:{}", addr.map(|a| a.to_string()).unwrap_or_default()),
    }
}

/// Registers a connection under `WS_MAX_CONNECTIONS` and `RATE_LIMIT_CONNECTIONS`;
/// a refusal is logged and counted. `Ok` is the user's number of connections.
pub(crate) fn admit(state: &AppState, session: u64, entry: ConnEntry) -> Result<usize, LimitError> {
    let cfg = &state.config;
    let admitted = state.registry.admit(
        session,
        entry,
        cfg.rate_limit_connections,
        cfg.ws_max_connections,
    );
    if let Err(e) = &admitted {
        tracing::warn!(event = "connection_limit", reason = %e, "websocket connection refused");
        state.stats.error("connection_limit");
    }
    admitted
}

/// Removes the connection from the registry (once); a user's last connection going
/// means UserOffline for the users they share with.
pub(crate) fn unregister(state: &AppState, session: u64) {
    if let Some((Some(uid), 0)) = state.registry.remove(session) {
        let st = state.clone();
        crate::server::spawn_named("presence", async move {
            kingshare::announce_presence(&st, &uid, false).await
        });
    }
}

/// The `connection`/`connect` confirmation, joining the URL's channel first.
async fn greet(conn: &Conn, client_id: &str, channel: Option<&str>) {
    match channel {
        Some(ch) => {
            if let Err(e) = join(conn, ch.to_owned()).await {
                let frame = protocol::error_frame("channel", e.code(), &e.to_string(), None);
                conn.state.stats.error(e.code());
                conn.closer.close(CLOSE_FORBIDDEN, e.code(), vec![frame]);
            }
        }
        None => {
            let f = json!({"type": "connection", "action": "connect", "data": {
                "client_id": client_id, "user_id": conn.principal.user_id, "channel": null,
            }});
            let _ = conn
                .tx
                .send(Outbound::Frame(Arc::from(f.to_string())))
                .await;
        }
    }
}

async fn join(conn: &Conn, channel: String) -> Result<(), HubError> {
    let (reply, rx) = oneshot::channel();
    conn.state
        .hub
        .send(HubCommand::Join {
            session: conn.session,
            channel,
            reply,
        })
        .await
        .map_err(|_| HubError::Unavailable)?;
    rx.await.map_err(|_| HubError::Unavailable)?
}

/// Splits the socket and runs reader and writer until either ends.
#[allow(clippy::too_many_arguments)]
async fn write_loop(
    socket: WebSocket,
    conn: &Conn,
    mut rx: mpsc::Receiver<Outbound>,
    overflowed: CancellationToken,
    revoked: CancellationToken,
    lagging: Arc<tokio::sync::Notify>,
    mut expiry_rx: watch::Receiver<Option<i64>>,
    last_seen: Arc<AtomicI64>,
) {
    let (mut sink, mut stream) = socket.split();
    let state = &conn.state;
    let closer = Arc::clone(&conn.closer);
    let session = conn.session;
    let dialect = conn.dialect;
    let shutdown = state.shutdown.clone();
    let router = state.router.clone();
    let ping_every = state.config.ws_ping_interval;
    let idle_ms = i64::try_from(state.config.ws_idle_timeout.as_millis()).unwrap_or(i64::MAX);
    let reader_done = CancellationToken::new();
    // Set by the writer once the closing handshake is over (or timed out).
    let hard_stop = CancellationToken::new();

    let writer = async {
        let latency = metrics::histogram!("aether_delivery_latency_seconds");
        let mut pull_wanted = false;
        let mut frames = Vec::new();
        let mut ping =
            tokio::time::interval_at(tokio::time::Instant::now() + ping_every, ping_every);
        let sleep_until_expiry = |exp: Option<i64>| async move {
            match exp {
                Some(exp) => {
                    let left = exp - chrono::Utc::now().timestamp();
                    tokio::time::sleep(Duration::from_secs(u64::try_from(left).unwrap_or(0))).await
                }
                None => std::future::pending().await,
            }
        };
        let expiry = sleep_until_expiry(*expiry_rx.borrow_and_update());
        tokio::pin!(expiry);
        let close = loop {
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break Some((CLOSE_GOING_AWAY, "server shutting down".to_owned(), Vec::new())),
                _ = overflowed.cancelled() => break Some((
                    CLOSE_SLOW,
                    "slow consumer".to_owned(),
                    dialect.error_frames(
                        "realtime",
                        "slow_consumer",
                        None,
                        "this connection could not keep up (its queue stayed full, or it fell behind the resume window) and is closed; reconnect and resubscribe with `since` set to the last change id received",
                    ),
                )),
                _ = revoked.cancelled() => break Some((
                    CLOSE_AUTH,
                    "auth/revoked-token".to_owned(),
                    dialect.error_frames(
                        "auth",
                        "auth/revoked-token",
                        Some(kingshare::code::INVALID_TOKEN),
                        "the session of this access token has been signed out",
                    ),
                )),
                _ = closer.token.cancelled() => break closer.take(),
                _ = reader_done.cancelled() => break None,
                Ok(()) = expiry_rx.changed() => {
                    // A renewed token moves the deadline.
                    expiry.set(sleep_until_expiry(*expiry_rx.borrow_and_update()));
                }
                _ = &mut expiry => break Some((
                    CLOSE_AUTH,
                    "auth/expired-token".to_owned(),
                    dialect.error_frames("auth", "auth/expired-token", Some(kingshare::code::INVALID_TOKEN), "the access token has expired"),
                )),
                _ = ping.tick() => {
                    if now_ms() - last_seen.load(Ordering::Relaxed) > idle_ms {
                        break Some((CLOSE_IDLE, "idle timeout".to_owned(), Vec::new()));
                    }
                    if sink.send(Message::Ping(Default::default())).await.is_err() {
                        break None;
                    }
                }
                _ = lagging.notified() => pull_wanted = true,
                out = rx.recv() => {
                    let Some(out) = out else { break None };
                    let now = now_ms();
                    let mut changes = account(state, &out, now, &latency);
                    protocol::encode(out, &mut frames);
                    // What is already queued goes out in the same write: one flush
                    // (one syscall) per burst instead of one per frame.
                    while frames.len() < MAX_FRAMES_PER_FLUSH {
                        match rx.try_recv() {
                            Ok(more) => {
                                changes += account(state, &more, now, &latency);
                                protocol::encode(more, &mut frames);
                            }
                            Err(_) => break,
                        }
                    }
                    let n = frames.len() as u64;
                    // A peer that stops reading blocks the socket: stay interruptible
                    // so a close decided meanwhile still happens.
                    let sent = tokio::select! {
                        biased;
                        _ = overflowed.cancelled() => None,
                        _ = closer.token.cancelled() => None,
                        _ = shutdown.cancelled() => None,
                        r = send_all(&mut sink, &mut frames) => Some(r),
                    };
                    match sent {
                        None => continue,
                        Some(Err(())) => break None,
                        Some(Ok(())) => {}
                    }
                    state.stats.frames_out(n, changes);
                }
            }
            // Lagging and half drained: ask the router for what was missed.
            if pull_wanted && aether_router::low_water(&rx) {
                pull_wanted = false;
                if router.send(Command::Pull { session }).await.is_err() {
                    break None;
                }
            }
        };
        // The connection is over for everyone else now, even if the peer takes a
        // while to read the reason.
        unregister(state, session);
        if let Some((code, reason, frames)) = close {
            let goodbye = async {
                for f in frames {
                    sink.feed(Message::Text(f.into())).await?;
                }
                sink.send(Message::Close(Some(CloseFrame {
                    code,
                    reason: reason.into(),
                })))
                .await
            };
            if tokio::time::timeout(Duration::from_secs(5), goodbye)
                .await
                .is_ok()
            {
                // The closing handshake: let the reader see the peer's Close before
                // the socket goes, so the peer reads our code rather than a reset.
                let _ = tokio::time::timeout(Duration::from_secs(2), reader_done.cancelled()).await;
            }
        }
        closer.token.cancel();
        hard_stop.cancel();
    };

    let reader = async {
        let mut principal = Arc::clone(&conn.principal);
        // A frame over `WS_MAX_FRAME_BYTES`: an error frame, then close 1009.
        let too_big = |len: usize| {
            let message = format!(
                "frame of {len} bytes or more is over the {} byte limit",
                state.config.ws_max_frame_bytes
            );
            state.stats.error("frame_too_large");
            let frames = dialect.error_frames(
                "realtime",
                "frame_too_large",
                Some(kingshare::code::INVALID_MESSAGE),
                &message,
            );
            closer.close(CLOSE_TOO_BIG, "frame too large", frames);
        };
        loop {
            let msg = tokio::select! {
                _ = hard_stop.cancelled() => break,
                msg = stream.next() => msg,
            };
            last_seen.store(now_ms(), Ordering::Relaxed);
            if closer.token.is_cancelled()
                && !matches!(msg, Some(Ok(Message::Close(_))) | None | Some(Err(_)))
            {
                // Closing: frames still in flight from the peer are not acted on.
                continue;
            }
            match msg {
                Some(Ok(Message::Text(text))) => {
                    state.stats.frame_in();
                    if text.len() > state.config.ws_max_frame_bytes {
                        too_big(text.len());
                        continue;
                    }
                    // The token is checked on every message, not only at connect.
                    if let Some(exp) = principal.expires_at
                        && exp <= chrono::Utc::now().timestamp()
                    {
                        let frames = dialect.error_frames(
                            "auth",
                            "auth/expired-token",
                            Some(kingshare::code::INVALID_TOKEN),
                            "the access token has expired",
                        );
                        state.stats.error("auth/expired-token");
                        closer.close(CLOSE_AUTH, "auth/expired-token", frames);
                        continue;
                    }
                    // Boxed: the handlers' futures (database checks, the hub) are
                    // large, and inline they would make every idle connection's
                    // task that much larger; a message pays one allocation instead.
                    if let Err(e) = Box::pin(handle_text(conn, &mut principal, &text)).await {
                        let out = Outbound::Error {
                            subscription: e.subscription.map(Arc::from),
                            code: e.code,
                            message: e.message,
                        };
                        if conn.tx.send(out).await.is_err() {
                            break;
                        }
                    }
                }
                Some(Ok(Message::Binary(bytes)))
                    if bytes.len() > state.config.ws_max_frame_bytes =>
                {
                    too_big(bytes.len());
                    continue;
                }
                Some(Ok(Message::Binary(_))) => {
                    let out = Outbound::Error {
                        subscription: None,
                        code: "invalid_message",
                        message: "binary frames are not supported; send JSON text frames".into(),
                    };
                    if conn.tx.send(out).await.is_err() {
                        break;
                    }
                }
                Some(Err(e)) => {
                    // A protocol violation is answered with its close code before the
                    // socket goes; while closing, any error just ends the reading.
                    let Some(pc) = protocol_close(e).filter(|_| !closer.token.is_cancelled())
                    else {
                        break;
                    };
                    if pc.code == CLOSE_TOO_BIG {
                        too_big(state.config.ws_max_frame_bytes.saturating_add(1));
                    } else {
                        state.stats.error("invalid_message");
                        closer.close(pc.code, pc.reason, Vec::new());
                    }
                    if !pc.drain {
                        break;
                    }
                }
                Some(Ok(Message::Close(_))) | None => break,
                Some(Ok(_)) => {} // pings are answered by the library; pongs count as life
            }
        }
        reader_done.cancel();
    };

    tokio::join!(writer, reader);
}

/// Writes `frames` (drained) with one flush at the end.
pub(crate) async fn send_all<S, F>(sink: &mut S, frames: &mut Vec<F>) -> Result<(), ()>
where
    S: futures_util::Sink<Message> + Unpin,
    F: Into<Message>,
{
    for f in frames.drain(..) {
        sink.feed(f.into()).await.map_err(|_| ())?;
    }
    sink.flush().await.map_err(|_| ())
}

fn frame_error(code: &'static str, message: impl Into<String>) -> FrameError {
    FrameError {
        code,
        message: message.into(),
        subscription: None,
    }
}

/// Sends a prebuilt frame on this connection's queue.
async fn reply(conn: &Conn, frame: String) {
    let _ = conn.tx.send(Outbound::Frame(Arc::from(frame))).await;
}

async fn handle_text(
    conn: &Conn,
    principal: &mut Arc<Principal>,
    text: &str,
) -> Result<(), FrameError> {
    if conn.frame_limit.check().is_err() {
        conn.state.stats.error("rate_limited");
        for f in conn.dialect.error_frames(
            "connection",
            "rate_limited",
            Some(kingshare::code::RATE_LIMITED),
            "too many frames on this connection: slow down",
        ) {
            reply(conn, f).await;
        }
        return Ok(());
    }
    // KingShare frames have PascalCase types; the Aether vocabularies do not.
    let kind = serde_json::from_str::<serde_json::Value>(text)
        .ok()
        .and_then(|v| v.get("type").and_then(|t| t.as_str()).map(str::to_owned));
    let pascal = kind
        .as_deref()
        .is_some_and(|k| k.starts_with(|c: char| c.is_ascii_uppercase()));
    match conn.dialect {
        Dialect::KingShare if !pascal => {
            let msg = match kind {
                Some(k) => format!("unknown message type {k:?}"),
                None => "expected a JSON object {\"type\", \"data\"}".to_owned(),
            };
            conn.state.stats.error(kingshare::code::INVALID_MESSAGE);
            reply(
                conn,
                kingshare::error(kingshare::code::INVALID_MESSAGE, &msg),
            )
            .await;
            return Ok(());
        }
        Dialect::KingShare | Dialect::Mixed if pascal => {
            return handle_kingshare(conn, principal, text).await;
        }
        Dialect::Mixed if kind.is_none() => {
            // Neither vocabulary can be told: answer in both.
            reply(
                conn,
                kingshare::error(
                    kingshare::code::INVALID_MESSAGE,
                    "expected a JSON object with a type",
                ),
            )
            .await;
        }
        _ => {}
    }
    handle_aether(conn, principal, text).await
}

/// Applies a new token to this connection (in-band renewal or KingShare
/// `Authenticate`): same user, or an anonymous connection authenticating.
async fn apply_token(
    conn: &Conn,
    principal: &mut Arc<Principal>,
    token: &str,
) -> Result<(), FrameError> {
    let state = &conn.state;
    let session = conn.session;
    // The same check as at connect: a signed-out session's token, or a deleted
    // user's, is no renewal.
    let fresh = state.auth.authenticate(token).await.map_err(|e| match e {
        // As at connect: the cause is logged, not sent.
        crate::auth::AuthError::Internal(cause) => {
            tracing::error!(error = %cause, session, "token renewal check failed");
            frame_error("internal_error", "internal server error")
        }
        e => {
            tracing::warn!(event = "token_refused", session, reason = %e, "token renewal refused");
            frame_error(e.code(), e.to_string())
        }
    })?;
    if principal.user_id.is_some() && fresh.user_id != principal.user_id {
        return Err(frame_error(
            "forbidden",
            "a renewed token must be for the same user",
        ));
    }
    let fresh = Arc::new(fresh);
    if let Some(uid) = &fresh.user_id
        && principal.user_id.is_none()
    {
        state.registry.rekey(session, uid);
        let _ = state
            .hub
            .send(HubCommand::Authenticated {
                session,
                user_id: Arc::from(uid.as_str()),
            })
            .await;
        if conn.dialect.kingshare_events() {
            state.kingshare.authenticate(session, uid);
        }
        if state.registry.user_connections(uid) == 1 {
            kingshare::announce_presence(state, uid, true).await;
        }
    }
    let _ = state
        .router
        .send(Command::SetPrincipal {
            session,
            principal: Arc::clone(&fresh),
        })
        .await;
    let _ = conn.expiry.send(fresh.expires_at);
    *principal = fresh;
    Ok(())
}

async fn handle_kingshare(
    conn: &Conn,
    principal: &mut Arc<Principal>,
    text: &str,
) -> Result<(), FrameError> {
    use kingshare::code;
    let v: serde_json::Value = serde_json::from_str(text).unwrap_or_default();
    let kind = v["type"].as_str().unwrap_or_default();
    let data = &v["data"];
    let err = |c: &str, m: &str| kingshare::error(c, m);
    if conn.ks_limit.check().is_err() {
        tracing::warn!(
            event = "rate_limited",
            session = conn.session,
            "KingShare message refused"
        );
        conn.state.stats.error(code::RATE_LIMITED);
        reply(
            conn,
            err(code::RATE_LIMITED, "too many messages: slow down"),
        )
        .await;
        return Ok(());
    }
    let out = match kind {
        "Ping" => kingshare::message_without_data("Pong"),
        "Authenticate" => match data["token"].as_str() {
            None => err(code::INVALID_MESSAGE, "Authenticate needs data.token"),
            Some(token) => match apply_token(conn, principal, token).await {
                Ok(()) => kingshare::message(
                    "AuthenticationResult",
                    json!({"success": true, "message": "Authenticated successfully"}),
                ),
                Err(e) => kingshare::message(
                    "AuthenticationResult",
                    json!({"success": false, "message": e.message}),
                ),
            },
        },
        "SystemNotification" => {
            let level = data["level"].as_str().unwrap_or_default();
            match data["message"].as_str() {
                _ if !principal.is_service() => {
                    tracing::warn!(
                        event = "forbidden",
                        session = conn.session,
                        "SystemNotification refused"
                    );
                    err(
                        code::AUTHENTICATION_REQUIRED,
                        "SystemNotification needs a service_role token",
                    )
                }
                Some(m) if crate::api::kingshare::valid_level(level) => {
                    let f = kingshare::message(
                        "SystemNotification",
                        json!({"message": m, "level": level}),
                    );
                    conn.state.kingshare.to_all(&f);
                    return Ok(());
                }
                _ => err(
                    code::INVALID_MESSAGE,
                    "SystemNotification needs data.message and a level of Info, Warning, Error or Success",
                ),
            }
        }
        "AuthenticationResult"
        | "FileUploaded"
        | "FileDeleted"
        | "FileShared"
        | "ShareAccessed"
        | "ShareExpired"
        | "UserOnline"
        | "UserOffline"
        | "UploadProgress"
        | "DownloadStarted"
        | "Pong"
        | "Error" => err(
            code::INVALID_MESSAGE,
            &format!("{kind} is sent by the server, not to it"),
        ),
        other => err(
            code::INVALID_MESSAGE,
            &format!("unknown message type {other:?}"),
        ),
    };
    if out.starts_with(r#"{"data":{"code""#) || out.contains(r#""type":"Error""#) {
        conn.state.stats.error("kingshare");
    }
    reply(conn, out).await;
    Ok(())
}

async fn handle_aether(
    conn: &Conn,
    principal: &mut Arc<Principal>,
    text: &str,
) -> Result<(), FrameError> {
    let state = &conn.state;
    let session = conn.session;
    match protocol::parse(text)? {
        ClientFrame::Subscribe(req) => {
            let spec = resolve(state, &req).await?;
            let _ = state
                .router
                .send(Command::Subscribe { session, spec })
                .await;
        }
        ClientFrame::Unsubscribe { id } => {
            let _ = state
                .router
                .send(Command::Unsubscribe {
                    session,
                    id: Arc::from(id),
                })
                .await;
        }
        ClientFrame::Join { channel } => {
            join(conn, channel)
                .await
                .map_err(|e| frame_error(e.code(), e.to_string()))?;
        }
        ClientFrame::Leave { channel } => {
            let (reply, rx) = oneshot::channel();
            let _ = state
                .hub
                .send(HubCommand::Leave {
                    session,
                    channel,
                    reply,
                })
                .await;
            rx.await
                .map_err(|_| frame_error("internal_error", "the channel service is unavailable"))?
                .map_err(|e| frame_error(e.code(), e.to_string()))?;
        }
        ClientFrame::Send {
            channel,
            content,
            sequence,
            timestamp,
            retry,
        } => {
            let (reply, rx) = oneshot::channel();
            let message = hub::Message {
                channel: channel.clone(),
                content,
                sequence,
                timestamp,
            };
            let _ = state
                .hub
                .send(HubCommand::Send {
                    session,
                    message,
                    reply,
                })
                .await;
            let outcome = rx
                .await
                .map_err(|_| frame_error("internal_error", "the channel service is unavailable"))?
                .map_err(|e| {
                    if let HubError::RateLimited(..) = e {
                        tracing::warn!(event = "rate_limited", session, "channel message refused");
                    }
                    frame_error(e.code(), e.to_string())
                })?;
            if outcome == SendOutcome::Duplicate {
                let f = json!({"type": "message", "action": "ack", "data": {
                    "channel": channel, "sequence": sequence, "duplicate": true, "retry": retry,
                }});
                let _ = conn
                    .tx
                    .send(Outbound::Frame(Arc::from(f.to_string())))
                    .await;
            }
        }
        ClientFrame::Status => {
            let status = crate::api::ops::status_cached(state).await;
            let severity = if status.status == "healthy" {
                "info"
            } else {
                "warning"
            };
            let f = json!({"type": "system", "action": "status", "data": {
                "message": format!("server is {}", status.status),
                "severity": severity,
                "status": status,
            }});
            let _ = conn
                .tx
                .send(Outbound::Frame(Arc::from(f.to_string())))
                .await;
        }
        ClientFrame::Broadcast {
            message,
            severity,
            channel,
        } => {
            if !principal.is_service() {
                tracing::warn!(
                    event = "forbidden",
                    session,
                    "system broadcast refused: not service_role"
                );
                return Err(frame_error(
                    "forbidden",
                    "only a service_role token may broadcast",
                ));
            }
            let _ = state
                .hub
                .send(HubCommand::Broadcast {
                    channel,
                    message,
                    severity,
                })
                .await;
        }
        ClientFrame::Refresh { token } => {
            apply_token(conn, principal, &token).await?;
            let f = json!({"type": "connection", "action": "refreshed", "data": {
                "user_id": principal.user_id, "expires_at": principal.expires_at,
            }});
            let _ = conn
                .tx
                .send(Outbound::Frame(Arc::from(f.to_string())))
                .await;
        }
    }
    Ok(())
}

/// Validates a subscription against the published tables.
pub(crate) async fn resolve(
    state: &AppState,
    req: &SubscribeRequest,
) -> Result<SubscriptionSpec, FrameError> {
    protocol::check_subscription(req)?;
    let err = |code, message: String| FrameError {
        code,
        message,
        subscription: Some(req.id.clone()),
    };
    let events = EventMask::parse(&req.event).ok_or_else(|| {
        err(
            "invalid_event",
            format!(
                "event {:?} is not INSERT, UPDATE, DELETE, TRUNCATE or *",
                req.event
            ),
        )
    })?;
    let since = req
        .since
        .as_deref()
        .map(|s| {
            s.parse::<aether_core::lsn::SinceId>()
                .map_err(|e| err("invalid_since", e.to_string()))
        })
        .transpose()?;
    let lookup = |c: &Catalog| c.get(&req.schema, &req.table);
    let mut table = state.catalog.read().ok().and_then(|c| lookup(&c));
    if table.is_none() && catalog_reload_due(state) {
        // A DBA may have added the table to the publication since we last looked.
        if let Ok(client) = state.pool.get().await
            && let Ok(fresh) = Catalog::load(&client, &state.config.publication).await
            && let Ok(mut c) = state.catalog.write()
        {
            c.replace_with(fresh);
            table = lookup(&c);
        }
    }
    let table = table.ok_or_else(|| {
        err(
            "unknown_table",
            format!(
                "table {}.{} does not exist or is not published for realtime",
                req.schema, req.table
            ),
        )
    })?;
    let filter = match &req.filter {
        Some(f) => Filter::parse(f, &table).map_err(|e| err("invalid_filter", e.to_string()))?,
        None => Filter::default(),
    };
    Ok(SubscriptionSpec {
        id: Arc::from(req.id.as_str()),
        table: Arc::clone(&table.qualified),
        events,
        filter,
        since,
    })
}

/// Claims the (at most once a second) catalog reload for a table not known yet.
fn catalog_reload_due(state: &AppState) -> bool {
    let now = now_ms();
    let last = state.catalog_reloaded_ms.load(Ordering::Relaxed);
    now - last >= 1000
        && state
            .catalog_reloaded_ms
            .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
}
