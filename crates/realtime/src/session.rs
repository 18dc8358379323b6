//! The `/ws` dialects on the connection engine ([`crate::engine`]): change
//! subscriptions and the Aether WebSocket API (`connection`, `message`,
//! `system`), and KingShare; which of them a socket speaks is fixed when it opens
//! ([`Vocabulary`]). A connection opened with `client_id` or `channel` in its URL
//! is greeted with `connection`/`connect`.

use std::future::Future;
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

use axum::extract::ws::{Message, WebSocket};
use serde_json::{Value, json};
use tokio::sync::oneshot;

use crate::Realtime;
use crate::engine::{self, Close, Dialect, Ending, Frames, Inbound};
pub use crate::engine::{
    CLOSE_AUTH, CLOSE_FORBIDDEN, CLOSE_GOING_AWAY, CLOSE_IDLE, CLOSE_INVALID_DATA, CLOSE_LIMIT,
    CLOSE_PROTOCOL, CLOSE_SLOW, CLOSE_TOO_BIG,
};
use crate::hub::{self, HubCommand, HubError, Member, SendOutcome};
use crate::kingshare;
use crate::protocol::{self, ClientFrame, FrameError, SubscribeRequest};
use crate::registry::{ConnEntry, LimitError, now_ms};
use aether_core::principal::{Principal, Role};
use aether_router::catalog::Catalog;
use aether_router::filter::Filter;
use aether_router::{Command, EventMask, Outbound, SessionHandle, SubscriptionSpec};

/// Which vocabularies a `/ws` connection speaks (docs/kingshare.md), fixed when
/// it opens:
/// - `Aether`: `protocol=aether` (or subprotocol `aether`), or a URL naming
///   `client_id` or `channel` — change subscriptions and the Aether WebSocket API;
/// - `KingShare`: `protocol=kingshare` (or subprotocol `kingshare`) — KingShare only;
/// - `Mixed`: neither (a token-only or anonymous connection) — both vocabularies,
///   and KingShare events. A frame goes to the vocabulary its `type` belongs to
///   (KingShare's are PascalCase); errors answer in the vocabulary of the frame
///   that caused them; connection-level errors come in both.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Vocabulary {
    Aether,
    KingShare,
    #[default]
    Mixed,
}

impl Vocabulary {
    pub fn detect(protocol: Option<&str>, client_id: bool, channel: bool) -> Vocabulary {
        match protocol {
            Some("aether") => Vocabulary::Aether,
            Some("kingshare") => Vocabulary::KingShare,
            _ if client_id || channel => Vocabulary::Aether,
            _ => Vocabulary::Mixed,
        }
    }

    fn kingshare_events(self) -> bool {
        self != Vocabulary::Aether
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
            Vocabulary::Aether => vec![aether()],
            Vocabulary::KingShare => ks().into_iter().collect(),
            Vocabulary::Mixed => std::iter::once(aether()).chain(ks()).collect(),
        }
    }
}

/// What the connection URL asked for.
#[derive(Debug, Clone, Default)]
pub struct ConnectParams {
    pub client_id: Option<String>,
    pub channel: Option<String>,
    /// The client's address (as the HTTP layer found it behind proxies).
    pub addr: Option<IpAddr>,
    pub vocabulary: Vocabulary,
    /// The TCP connection, when the socket is a WebSocket upgraded from
    /// HTTP/1.1 (alone on it): row changes are then written to it directly.
    pub tcp: Option<Arc<tokio::net::TcpStream>>,
}

/// Refuses a connection whose token failed: an error frame, then close.
pub async fn reject(socket: WebSocket, vocabulary: Vocabulary, code: &str, message: String) {
    let ks = if code == "internal_error" {
        kingshare::code::INTERNAL_ERROR
    } else {
        kingshare::code::INVALID_TOKEN
    };
    let frames = vocabulary.error_frames("auth", code, Some(ks), &message);
    let mut socket = engine::classified(socket);
    engine::refuse(&mut socket, Close::new(CLOSE_AUTH, code).with_texts(frames)).await;
}

/// One `/ws` connection as its dialect sees it.
struct AetherSocket {
    session: u64,
    vocabulary: Vocabulary,
    client_id: Arc<str>,
    /// The channel the URL named, joined when the connection opens.
    channel: Option<String>,
    /// KingShare frames per connection: `RATE_LIMIT_MESSAGES` per window.
    ks_limit: governor::DefaultDirectRateLimiter,
    state: Realtime,
    principal: Arc<Principal>,
}

/// A plain function returning an `async move` block (see [`engine::run`]): the
/// connection's task holds each argument once.
pub fn run(
    socket: WebSocket,
    state: Realtime,
    principal: Principal,
    params: ConnectParams,
) -> impl Future<Output = ()> + Send {
    let mut socket = engine::classified(socket);
    async move {
        let session = state.next_session.fetch_add(1, Ordering::Relaxed);
        let vocabulary = params.vocabulary;
        let client_id: Arc<str> = Arc::from(
            params
                .client_id
                .clone()
                .filter(|c| !c.is_empty() && c.len() <= 128)
                .unwrap_or_else(|| uuid::Uuid::new_v4().to_string()),
        );
        let last_seen = Arc::new(AtomicI64::new(now_ms()));
        let cfg = &state.settings;
        let (tx, rx) = engine::queue(cfg);
        let entry = ConnEntry {
            user_key: user_key(&principal, params.addr),
            user_id: principal.user_id.clone(),
            client_id: Arc::clone(&client_id),
            last_seen: Arc::clone(&last_seen),
            close: tx.signaller(),
        };
        let admitted = match admit(&state, session, entry) {
            Ok(n) => n,
            Err(e) => {
                let frames = vocabulary.error_frames(
                    "connection",
                    "connection_limit",
                    Some(kingshare::code::CONNECTION_LIMIT),
                    &e.to_string(),
                );
                let close = Close::new(CLOSE_LIMIT, "connection_limit").with_texts(frames);
                Box::pin(engine::refuse(&mut socket, close)).await;
                return;
            }
        };
        metrics::gauge!("aether_ws_connections").increment(1.0);

        let principal = Arc::new(principal);
        let wire = params.tcp.clone().map(|tcp| {
            Arc::new(crate::wire::Wire::new(
                tcp,
                protocol::change_wire_frame,
                Arc::clone(&state.stats),
            ))
        });
        let handle = SessionHandle {
            tx: tx.clone(),
            principal: Arc::clone(&principal),
            direct: wire
                .clone()
                .map(|w| w as Arc<dyn aether_router::direct::Direct>),
        };
        let member = Member {
            tx: tx.clone(),
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
        if vocabulary.kingshare_events() {
            state
                .kingshare
                .register(session, principal.user_id.as_deref(), tx.clone());
        }
        drop(tx);
        // Presence: a user's first connection.
        if let (1, Some(uid)) = (admitted, principal.user_id.clone()) {
            let st = state.clone();
            aether_core::task::spawn_named("presence", async move {
                kingshare::announce_presence(&st, &uid, true).await
            });
        }
        let mut conn = AetherSocket {
            session,
            vocabulary,
            client_id,
            channel: params.channel.clone(),
            ks_limit: engine::message_budget(cfg),
            state: state.clone(),
            principal,
        };
        if attached {
            let link = engine::Link {
                session,
                rx,
                last_seen,
                router: state.router.clone(),
                shutdown: state.drain.token(),
                wire,
            };
            let limits = engine::Limits::from_settings(cfg);
            engine::run(&mut socket, &mut conn, link, limits, &state.stats).await;
        } else {
            conn.detach().await;
        }
        metrics::gauge!("aether_ws_connections").decrement(1.0);
    }
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
pub(crate) fn admit(state: &Realtime, session: u64, entry: ConnEntry) -> Result<usize, LimitError> {
    let cfg = &state.settings;
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
pub(crate) fn unregister(state: &Realtime, session: u64) {
    if let Some((Some(uid), 0)) = state.registry.remove(session) {
        let st = state.clone();
        aether_core::task::spawn_named("presence", async move {
            kingshare::announce_presence(&st, &uid, false).await
        });
    }
}

fn frame_error(code: &'static str, message: impl Into<String>) -> FrameError {
    FrameError {
        code,
        message: message.into(),
        subscription: None,
    }
}

fn text(frames: &mut Frames, frame: String) {
    frames.push(Message::Text(frame.into()));
}

impl Dialect for AetherSocket {
    /// The `connection`/`connect` confirmation, joining the URL's channel first.
    async fn open(&mut self, frames: &mut Frames) -> Result<(), Close> {
        if self.vocabulary != Vocabulary::Aether {
            return Ok(());
        }
        match self.channel.clone() {
            Some(ch) => {
                if let Err(e) = self.join(ch).await {
                    let frame = protocol::error_frame("channel", e.code(), &e.to_string(), None);
                    self.state.stats.error(e.code());
                    return Err(Close::new(CLOSE_FORBIDDEN, e.code()).with_texts([frame]));
                }
            }
            None => {
                let f = json!({"type": "connection", "action": "connect", "data": {
                    "client_id": &*self.client_id, "user_id": self.principal.user_id, "channel": null,
                }});
                text(frames, f.to_string());
            }
        }
        Ok(())
    }

    fn encode(&mut self, out: Outbound, frames: &mut Frames) -> Result<(), Outbound> {
        protocol::encode(out, frames);
        Ok(())
    }

    /// Never called: [`Self::encode`] takes every item.
    async fn outbound(&mut self, out: Outbound, frames: &mut Frames) {
        protocol::encode(out, frames);
    }

    async fn inbound(&mut self, msg: Inbound, frames: &mut Frames) -> Result<(), Close> {
        let result = match msg {
            Inbound::Text(t) => self.handle_text(&t, frames).await,
            Inbound::Binary(_) => Err(frame_error(
                "invalid_message",
                "binary frames are not supported; send JSON text frames",
            )),
        };
        if let Err(e) = result {
            self.state.stats.error(e.code);
            let out = Outbound::Error {
                subscription: e.subscription.map(Arc::from),
                code: e.code,
                message: e.message,
            };
            protocol::encode(out, frames);
        }
        Ok(())
    }

    fn expires_at(&self) -> Option<i64> {
        self.principal.expires_at
    }

    async fn expired(&mut self, _frames: &mut Frames) -> Result<(), Close> {
        self.state.stats.error("auth/expired-token");
        let frames = self.vocabulary.error_frames(
            "auth",
            "auth/expired-token",
            Some(kingshare::code::INVALID_TOKEN),
            "the access token has expired",
        );
        Err(Close::new(CLOSE_AUTH, "auth/expired-token").with_texts(frames))
    }

    fn rate_limited(&mut self, frames: &mut Frames) {
        for f in self.vocabulary.error_frames(
            "connection",
            "rate_limited",
            Some(kingshare::code::RATE_LIMITED),
            "too many frames on this connection: slow down",
        ) {
            text(frames, f);
        }
    }

    fn ending(&self, why: Ending) -> Close {
        let v = self.vocabulary;
        match why {
            Ending::Shutdown => Close::new(CLOSE_GOING_AWAY, "server shutting down"),
            Ending::Idle => Close::new(CLOSE_IDLE, "idle timeout"),
            Ending::Slow => Close::new(CLOSE_SLOW, "slow consumer").with_texts(v.error_frames(
                "realtime",
                "slow_consumer",
                None,
                "this connection could not keep up (its queue stayed full, or it fell behind the resume window) and is closed; reconnect and resubscribe with `since` set to the last change id received",
            )),
            Ending::Revoked => Close::new(CLOSE_AUTH, "auth/revoked-token").with_texts(
                v.error_frames(
                    "auth",
                    "auth/revoked-token",
                    Some(kingshare::code::INVALID_TOKEN),
                    "the session of this access token has been signed out",
                ),
            ),
            Ending::TooBig(len) => {
                let message = format!(
                    "frame of {len} bytes or more is over the {} byte limit",
                    self.state.settings.ws_max_frame_bytes
                );
                Close::new(CLOSE_TOO_BIG, "frame too large").with_texts(v.error_frames(
                    "realtime",
                    "frame_too_large",
                    Some(kingshare::code::INVALID_MESSAGE),
                    &message,
                ))
            }
            Ending::Protocol(pc) => Close::new(pc.code, pc.reason),
        }
    }

    async fn detach(&mut self) {
        let (state, session) = (&self.state, self.session);
        unregister(state, session);
        let _ = state.router.send(Command::Detach { session }).await;
        let _ = state.hub.send(HubCommand::Detach { session }).await;
        state.kingshare.unregister(session);
    }
}

impl AetherSocket {
    async fn join(&self, channel: String) -> Result<(), HubError> {
        let (reply, rx) = oneshot::channel();
        self.state
            .hub
            .send(HubCommand::Join {
                session: self.session,
                channel,
                reply,
            })
            .await
            .map_err(|_| HubError::Unavailable)?;
        rx.await.map_err(|_| HubError::Unavailable)?
    }

    async fn handle_text(&mut self, frame: &str, frames: &mut Frames) -> Result<(), FrameError> {
        // Parsed once; KingShare types are PascalCase, the Aether vocabularies' not.
        let parsed = protocol::json(frame);
        let kind = parsed
            .as_ref()
            .ok()
            .and_then(|v| v.get("type"))
            .and_then(Value::as_str);
        let pascal = kind.is_some_and(|k| k.starts_with(|c: char| c.is_ascii_uppercase()));
        match self.vocabulary {
            Vocabulary::KingShare if !pascal => {
                let msg = match kind {
                    Some(k) => format!("unknown message type {k:?}"),
                    None => "expected a JSON object {\"type\", \"data\"}".to_owned(),
                };
                self.state.stats.error(kingshare::code::INVALID_MESSAGE);
                text(
                    frames,
                    kingshare::error(kingshare::code::INVALID_MESSAGE, &msg),
                );
                return Ok(());
            }
            Vocabulary::KingShare | Vocabulary::Mixed if pascal => {
                let v = parsed.unwrap_or_default();
                return self.handle_kingshare(&v, frames).await;
            }
            Vocabulary::Mixed if kind.is_none() => {
                // Neither vocabulary can be told: answer in both.
                text(
                    frames,
                    kingshare::error(
                        kingshare::code::INVALID_MESSAGE,
                        "expected a JSON object with a type",
                    ),
                );
            }
            _ => {}
        }
        self.handle_aether(&parsed?, frames).await
    }

    /// Applies a new token to this connection (in-band renewal or KingShare
    /// `Authenticate`): same user, or an anonymous connection authenticating.
    async fn apply_token(&mut self, token: &str) -> Result<(), FrameError> {
        let state = &self.state;
        let session = self.session;
        // The same check as at connect: a signed-out session's token, or a deleted
        // user's, is no renewal.
        let fresh = state.auth.authenticate(token).await.map_err(|e| match e {
            // As at connect: the cause is logged, not sent.
            crate::TokenRefused::Internal(cause) => {
                tracing::error!(error = %cause, session, "token renewal check failed");
                frame_error("internal_error", "internal server error")
            }
            e => {
                tracing::warn!(event = "token_refused", session, reason = %e, "token renewal refused");
                frame_error(e.code(), e.to_string())
            }
        })?;
        if self.principal.user_id.is_some() && fresh.user_id != self.principal.user_id {
            return Err(frame_error(
                "forbidden",
                "a renewed token must be for the same user",
            ));
        }
        let fresh = Arc::new(fresh);
        if let Some(uid) = &fresh.user_id
            && self.principal.user_id.is_none()
        {
            state.registry.rekey(session, uid);
            let _ = state
                .hub
                .send(HubCommand::Authenticated {
                    session,
                    user_id: Arc::from(uid.as_str()),
                })
                .await;
            if self.vocabulary.kingshare_events() {
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
        self.principal = fresh;
        Ok(())
    }

    async fn handle_kingshare(&mut self, v: &Value, frames: &mut Frames) -> Result<(), FrameError> {
        use kingshare::code;
        let kind = v["type"].as_str().unwrap_or_default();
        let data = &v["data"];
        let err = |c: &str, m: &str| kingshare::error(c, m);
        if self.ks_limit.check().is_err() {
            tracing::warn!(
                event = "rate_limited",
                session = self.session,
                "KingShare message refused"
            );
            self.state.stats.error(code::RATE_LIMITED);
            text(
                frames,
                err(code::RATE_LIMITED, "too many messages: slow down"),
            );
            return Ok(());
        }
        let out = match kind {
            "Ping" => kingshare::message_without_data("Pong"),
            "Authenticate" => match data["token"].as_str() {
                None => err(code::INVALID_MESSAGE, "Authenticate needs data.token"),
                Some(token) => match self.apply_token(token).await {
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
                    _ if !self.principal.is_service() => {
                        tracing::warn!(
                            event = "forbidden",
                            session = self.session,
                            "SystemNotification refused"
                        );
                        err(
                            code::AUTHENTICATION_REQUIRED,
                            "SystemNotification needs a service_role token",
                        )
                    }
                    Some(m) if kingshare::valid_level(level) => {
                        let f = kingshare::message(
                            "SystemNotification",
                            json!({"message": m, "level": level}),
                        );
                        self.state.kingshare.to_all(&f);
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
            self.state.stats.error("kingshare");
        }
        text(frames, out);
        Ok(())
    }

    async fn handle_aether(&mut self, v: &Value, frames: &mut Frames) -> Result<(), FrameError> {
        let state = &self.state;
        let session = self.session;
        match protocol::parse_value(v)? {
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
                self.join(channel)
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
                    .map_err(|_| {
                        frame_error("internal_error", "the channel service is unavailable")
                    })?
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
                    .map_err(|_| {
                        frame_error("internal_error", "the channel service is unavailable")
                    })?
                    .map_err(|e| {
                        if let HubError::RateLimited(..) = e {
                            tracing::warn!(
                                event = "rate_limited",
                                session,
                                "channel message refused"
                            );
                        }
                        frame_error(e.code(), e.to_string())
                    })?;
                if outcome == SendOutcome::Duplicate {
                    let f = json!({"type": "message", "action": "ack", "data": {
                        "channel": channel, "sequence": sequence, "duplicate": true, "retry": retry,
                    }});
                    text(frames, f.to_string());
                }
            }
            ClientFrame::Status => {
                let status = state.status.status().await;
                let severity = if status.status == "healthy" {
                    "info"
                } else {
                    "warning"
                };
                let f = json!({"type": "system", "action": "status", "data": {
                    "message": format!("server is {}", status.status),
                    "severity": severity,
                    "status": status.report,
                }});
                text(frames, f.to_string());
            }
            ClientFrame::Broadcast {
                message,
                severity,
                channel,
            } => {
                if !self.principal.is_service() {
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
                self.apply_token(&token).await?;
                let f = json!({"type": "connection", "action": "refreshed", "data": {
                    "user_id": self.principal.user_id, "expires_at": self.principal.expires_at,
                }});
                text(frames, f.to_string());
            }
        }
        Ok(())
    }
}

/// Supabase's publication: its tables join Aether's (`adopt_publication`).
const SUPABASE_PUBLICATION: &str = "supabase_realtime";

/// Validates a subscription against the published tables.
pub(crate) async fn resolve(
    state: &Realtime,
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
        // A DBA may have added the table to the publication since we last
        // looked, or a Supabase migration to Supabase's.
        if let Ok(client) = state.pool.get().await {
            aether_router::catalog::adopt_publication(
                &client,
                SUPABASE_PUBLICATION,
                &state.settings.publication,
            )
            .await;
            if let Ok(fresh) = Catalog::load(&client, &state.settings.publication).await
                && let Ok(mut c) = state.catalog.write()
            {
                c.replace_with(fresh);
                table = lookup(&c);
            }
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
fn catalog_reload_due(state: &Realtime) -> bool {
    let now = now_ms();
    let last = state.catalog_reloaded_ms.load(Ordering::Relaxed);
    now - last >= 1000
        && state
            .catalog_reloaded_ms
            .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
}

#[cfg(test)]
mod tests {
    /// The size of the future an async fn returns, from the fn item alone.
    fn future_size<A, B, C, D, F: std::future::Future>(_: fn(A, B, C, D) -> F) -> usize {
        std::mem::size_of::<F>()
    }
    fn future_size5<A, B, C, D, E, F: std::future::Future>(_: fn(A, B, C, D, E) -> F) -> usize {
        std::mem::size_of::<F>()
    }

    #[test]
    fn an_idle_connections_task_stays_small() {
        let ws = future_size(super::run);
        let phx = future_size5(crate::phoenix::run);
        eprintln!(
            "task futures: /ws {ws} B, phoenix {phx} B, Outbound {} B",
            std::mem::size_of::<aether_router::Outbound>()
        );
        // Every idle connection's task is this big (3,912 and 4,576 bytes
        // before the engine and the dialects' entry points held each argument
        // once and kept the hot path free of futures).
        assert!(ws <= 2560 && phx <= 2560, "{ws} {phx}");
    }
}
