//! `/realtime/v1/websocket`: Supabase Realtime's Phoenix-channel protocol, so
//! `@supabase/realtime-js` (and supabase-js's `channel().on('postgres_changes')`)
//! works against Aether.
//!
//! Both framings: `vsn=1.0.0` sends JSON objects
//! `{"topic","event","payload","ref","join_ref"}`, `vsn=2.0.0` (the client's
//! default) JSON arrays `[join_ref, ref, topic, event, payload]`. Each
//! `postgres_changes` binding of a `phx_join` becomes a subscription in the same
//! router as `/ws` (same filters, same authorization, same lagging rules); the
//! `phx_reply` echoes every binding with a stable non-zero id (a hash of its
//! event, schema, table and filter), then a `system` message says
//! "Subscribed to PostgreSQL". Changes arrive as `postgres_changes` with the ids
//! of the bindings they match and `data{schema,table,commit_timestamp,type,
//! columns,record,old_record,errors}`.
//!
//! `broadcast` (JSON, or realtime-js's binary push under vsn 2.0.0) and
//! `presence` (`track`/`untrack`) go to [`crate::phoenix_hub`], which relays to
//! the topic's members; `POST /realtime/v1/api/broadcast[/{topic}/events/{event}]`
//! (in the HTTP layer, with the WebSocket upgrade) broadcast
//! without a socket.
//!
//! One principal per connection: the `access_token` of the latest join or
//! `access_token` message (supabase-js sends the same token on every channel).
//! When it expires, every channel gets a `system` error and `phx_close`.
//!
//! Here: the connection, its channels and token, and the engine's dialect.
//! `join.rs` answers `phx_join`, `messages.rs` relays broadcasts and presence,
//! `changes.rs` encodes change frames, `wire.rs` the two framings.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

use axum::extract::ws::{Message, WebSocket};
use serde_json::{Value, json};

use crate::Realtime;
use crate::engine::{
    self, CLOSE_AUTH, CLOSE_GOING_AWAY, CLOSE_IDLE, CLOSE_LIMIT, CLOSE_SLOW, CLOSE_TOO_BIG, Close,
    Dialect, Ending, Frames, Inbound,
};
use crate::phoenix_hub::{
    BroadcastPayload, JoinOptions, PhxCommand, PhxMember, decode_user_broadcast_push,
};
use crate::protocol::SubscribeRequest;
use crate::registry::{ConnEntry, now_ms};
use crate::session;
use aether_core::principal::Principal;
use aether_router::{Command, Outbound, SessionHandle};

mod changes;
mod join;
mod messages;
mod wire;

use join::Binding;

use changes::PHOENIX_DATA;
pub use changes::{binding_id, change_data};
pub use wire::{Garbage, PhxMessage, Vsn};

struct Channel {
    join_ref: Option<String>,
    /// Router subscription ids of this join.
    subs: Vec<Arc<str>>,
    /// Replies still awaited before the join is answered.
    waiting: usize,
    join_msg_ref: Option<String>,
    failed: Option<String>,
    bindings: Vec<Binding>,
    joined: bool,
    /// `config.broadcast.ack`: a broadcast gets a `phx_reply`.
    ack: bool,
    /// `config.private`: a channel apart from the public one of the same
    /// topic, joined only with the read right of its policies.
    private: bool,
    /// What the member may do (a public channel: everything).
    rights: crate::ChannelRights,
    /// `config.broadcast.replay`: (since ms, limit), sent once joined.
    replay: Option<(i64, usize)>,
    /// Broadcast and presence membership, taken once the join is answered.
    hub: Option<JoinOptions>,
    /// Broadcasts this connection may send on this topic (`RATE_LIMIT_MESSAGES`
    /// per `RATE_LIMIT_WINDOW_S`, as on `/ws` channels).
    messages: governor::DefaultDirectRateLimiter,
}

struct Conn {
    state: Realtime,
    session: u64,
    vsn: Vsn,
    principal: Arc<Principal>,
    channels: HashMap<String, Channel>,
    /// Router subscription id → (topic, binding id).
    subs: HashMap<Arc<str>, (String, u32)>,
    next_join: u64,
    /// Broadcast replays this connection may still ask for (each reads the
    /// change log): [`REPLAYS_PER_MINUTE`], refilled over a minute.
    replays: governor::DefaultDirectRateLimiter,
}

/// Replays one connection may ask for per minute.
const REPLAYS_PER_MINUTE: u32 = 10;

fn replay_budget() -> governor::DefaultDirectRateLimiter {
    let n = std::num::NonZeroU32::new(REPLAYS_PER_MINUTE).unwrap_or(std::num::NonZeroU32::MIN);
    crate::engine::limiter(governor::Quota::per_minute(n))
}

impl Conn {
    fn frame(
        &self,
        join_ref: Option<String>,
        msg_ref: Option<String>,
        topic: &str,
        event: &str,
        payload: Value,
    ) -> Message {
        let m = PhxMessage {
            join_ref,
            msg_ref,
            topic: topic.to_owned(),
            event: event.to_owned(),
            payload,
        };
        Message::Text(self.vsn.encode(&m).into())
    }

    /// A `system` message on `topic`: Supabase's word on an extension's state.
    fn system(
        &self,
        join_ref: Option<String>,
        topic: &str,
        extension: &str,
        message: impl std::fmt::Display,
        status: &str,
    ) -> Message {
        self.frame(
            join_ref,
            None,
            topic,
            "system",
            json!({"channel": sub_topic(topic), "extension": extension,
                   "message": message.to_string(), "status": status}),
        )
    }

    /// The `phx_reply` error to a frame that is not a Phoenix message.
    fn garbage_reply(&self, g: Garbage) -> Message {
        self.frame(
            g.join_ref,
            g.msg_ref,
            &g.topic,
            "phx_reply",
            json!({"status": "error", "response": {"reason": g.reason}}),
        )
    }

    fn reply(&self, m: &PhxMessage, status: &str, response: Value) -> Message {
        self.frame(
            m.join_ref.clone(),
            m.msg_ref.clone(),
            &m.topic,
            "phx_reply",
            json!({"status": status, "response": response}),
        )
    }

    /// Sets the connection's principal from a token; `Err` with a reason.
    async fn set_token(&mut self, token: &str) -> Result<(), String> {
        let p = self
            .state
            .auth
            .authenticate(token)
            .await
            .map_err(|e| match e {
                // As on `/ws`: the cause is logged, not sent.
                crate::TokenRefused::Internal(cause) => {
                    tracing::error!(error = %cause, session = self.session, "token check failed");
                    "internal server error".to_owned()
                }
                e => e.to_string(),
            })?;
        let p = Arc::new(p);
        // Counted under the user from now on, as on `/ws`.
        if let Some(uid) = &p.user_id
            && self.principal.user_id.as_deref() != Some(uid.as_str())
        {
            self.state.registry.rekey(self.session, uid);
        }
        let _ = self
            .state
            .router
            .send(Command::SetPrincipal {
                session: self.session,
                principal: Arc::clone(&p),
            })
            .await;
        self.principal = p;
        Ok(())
    }

    async fn drop_subs(&mut self, subs: Vec<Arc<str>>) {
        for id in subs {
            self.subs.remove(&id);
            let _ = self
                .state
                .router
                .send(Command::Unsubscribe {
                    session: self.session,
                    id,
                })
                .await;
        }
    }

    async fn leave(&mut self, topic: &str) {
        if let Some(ch) = self.channels.remove(topic) {
            if ch.joined {
                let _ = self
                    .state
                    .phoenix
                    .send(PhxCommand::Leave {
                        session: self.session,
                        topic: crate::phoenix_hub::hub_topic(topic, ch.private),
                    })
                    .await;
            }
            self.drop_subs(ch.subs).await;
        }
    }

    /// Asks the policies again for every private channel joined (after a
    /// token change): one no longer readable is left, with Supabase's
    /// `Unauthorized` as a system message and a `phx_close`.
    async fn recheck_private(&mut self) -> Vec<Message> {
        let topics: Vec<String> = self
            .channels
            .iter()
            .filter(|(_, c)| c.private && c.joined)
            .map(|(t, _)| t.clone())
            .collect();
        let mut out = Vec::new();
        for topic in topics {
            let principal = Arc::clone(&self.principal);
            let rights = self
                .state
                .channel_policy
                .rights(&principal, sub_topic(&topic))
                .await;
            match rights {
                Ok(r) if r.read => {
                    if let Some(ch) = self.channels.get_mut(&topic) {
                        ch.rights = r;
                    }
                }
                other => {
                    let reason = match other {
                        Err(why) => format!(
                            "Unauthorized: the channel's policies could not be checked: {why}"
                        ),
                        _ => unauthorized("read from", &topic),
                    };
                    let join_ref = self.channels.get(&topic).and_then(|c| c.join_ref.clone());
                    self.leave(&topic).await;
                    out.push(self.system(join_ref.clone(), &topic, "system", reason, "error"));
                    out.push(self.frame(
                        join_ref.clone(),
                        join_ref,
                        &topic,
                        "phx_close",
                        json!({}),
                    ));
                }
            }
        }
        out
    }

    /// Handles one client message; returns frames to send now.
    async fn handle(&mut self, m: PhxMessage) -> Vec<Message> {
        match m.event.as_str() {
            "heartbeat" if m.topic == "phoenix" => vec![self.reply(&m, "ok", json!({}))],
            "phx_join" => self.join(m).await,
            "phx_leave" => {
                self.leave(&m.topic).await;
                vec![
                    self.reply(&m, "ok", json!({})),
                    self.frame(
                        m.join_ref.clone(),
                        m.join_ref.clone(),
                        &m.topic,
                        "phx_close",
                        json!({}),
                    ),
                ]
            }
            "access_token" => {
                let token = m
                    .payload
                    .get("access_token")
                    .and_then(Value::as_str)
                    .unwrap_or("");
                match self.set_token(token).await {
                    Ok(()) => {
                        let mut out = vec![self.reply(&m, "ok", json!({}))];
                        // A new token, a new member as the policies see it.
                        out.extend(self.recheck_private().await);
                        out
                    }
                    Err(why) => {
                        let mut out = vec![self.system(
                            m.join_ref.clone(),
                            &m.topic,
                            "system",
                            format!("Invalid token: {why}"),
                            "error",
                        )];
                        out.push(self.frame(
                            m.join_ref.clone(),
                            m.join_ref.clone(),
                            &m.topic,
                            "phx_close",
                            json!({}),
                        ));
                        self.leave(&m.topic).await;
                        out
                    }
                }
            }
            "broadcast" => {
                let event = m
                    .payload
                    .get("event")
                    .and_then(Value::as_str)
                    .map(str::to_owned);
                let payload = m.payload.get("payload").cloned().unwrap_or(json!({}));
                self.broadcast(&m, event, BroadcastPayload::Json(payload))
                    .await
            }
            "presence" => self.presence(&m).await,
            _ => vec![self.reply(
                &m,
                "error",
                json!({"reason": format!("unknown event {:?}", m.event)}),
            )],
        }
    }

    /// Turns an item of the connection's queue into frames without waiting;
    /// `Err` hands back a subscription's answer, which [`Conn::queued`] awaits.
    fn encoded(&mut self, out: Outbound, batch: &mut Vec<Message>) -> Result<(), Outbound> {
        match out {
            Outbound::Change {
                subscription,
                change,
            } => {
                let Some((topic, id)) = self.subs.get(&subscription).cloned() else {
                    return Ok(());
                };
                let Some(ch) = self.channels.get(&topic).filter(|c| c.joined) else {
                    return Ok(());
                };
                let select = ch
                    .bindings
                    .iter()
                    .find(|b| b.id == id)
                    .and_then(|b| b.select.as_deref());
                let frame = match select {
                    // `data` is encoded once per change for every Phoenix socket.
                    None => {
                        let data = change.frame(PHOENIX_DATA, |c| change_data(c).to_string());
                        self.vsn
                            .change_frame(ch.join_ref.as_deref(), &topic, id, data)
                    }
                    // Its own columns: encoded for this binding.
                    Some(cols) => {
                        let data = changes::selected(change_data(&change), cols).to_string();
                        self.vsn
                            .change_frame(ch.join_ref.as_deref(), &topic, id, &data)
                    }
                };
                batch.push(Message::Text(frame.into()));
            }
            Outbound::Subscribed { .. }
            | Outbound::Error {
                subscription: Some(_),
                ..
            } => return Err(out),
            Outbound::Frame(text) => batch.push(Message::Text(text.as_ref().into())),
            Outbound::Binary(bytes) => batch.push(Message::Binary(bytes)),
            Outbound::Unsubscribed { .. } | Outbound::Error { .. } => {}
        }
        Ok(())
    }

    /// Turns an item of the connection's queue into frames.
    async fn queued(&mut self, out: Outbound, batch: &mut Vec<Message>) {
        match self.encoded(out, batch) {
            Ok(()) => {}
            Err(Outbound::Subscribed { subscription, .. }) => {
                self.settled(&subscription, None, batch).await;
            }
            Err(Outbound::Error {
                subscription: Some(subscription),
                message,
                ..
            }) => {
                self.settled(&subscription, Some(message), batch).await;
            }
            Err(_) => {}
        }
    }
}

/// Supabase's words for a private channel the policies do not open.
fn unauthorized(what: &str, topic: &str) -> String {
    format!(
        "Unauthorized: You do not have permissions to {what} this Channel topic: {}",
        sub_topic(topic)
    )
}

fn sub_topic(topic: &str) -> &str {
    topic.strip_prefix("realtime:").unwrap_or(topic)
}

/// A plain function returning an `async move` block (see [`engine::run`]): the
/// connection's task holds each argument once.
pub fn run(
    socket: WebSocket,
    state: Realtime,
    principal: Principal,
    vsn: Vsn,
    addr: Option<std::net::IpAddr>,
) -> impl std::future::Future<Output = ()> + Send {
    let mut socket = engine::classified(socket);
    async move {
        let session = state.next_session.fetch_add(1, Ordering::Relaxed);
        // The same admission as `/ws`: WS_MAX_CONNECTIONS, RATE_LIMIT_CONNECTIONS,
        // stats and cleanup.
        let last_seen = Arc::new(AtomicI64::new(now_ms()));
        let (tx, rx) = engine::queue(&state.settings);
        let entry = ConnEntry {
            user_key: session::user_key(&principal, addr),
            user_id: principal.user_id.clone(),
            client_id: Arc::from(format!("phoenix-{session}")),
            last_seen: Arc::clone(&last_seen),
            close: tx.signaller(),
        };
        if session::admit(&state, session, entry).is_err() {
            Box::pin(engine::refuse(
                &mut socket,
                Close::new(CLOSE_LIMIT, "connection_limit"),
            ))
            .await;
            return;
        }
        let principal = Arc::new(principal);
        let handle = SessionHandle {
            direct: None,
            tx: tx.clone(),
            principal: Arc::clone(&principal),
        };
        let member = PhxMember { tx, vsn };
        let mut conn = Conn {
            state: state.clone(),
            session,
            vsn,
            principal,
            channels: HashMap::new(),
            subs: HashMap::new(),
            next_join: 0,
            replays: replay_budget(),
        };
        let attached = state
            .router
            .send(Command::Attach { session, handle })
            .await
            .is_ok()
            && state
                .phoenix
                .send(PhxCommand::Attach { session, member })
                .await
                .is_ok();
        if !attached {
            conn.detach().await;
            return;
        }
        metrics::gauge!("aether_ws_connections").increment(1.0);
        let link = engine::Link {
            session,
            rx,
            last_seen,
            router: state.router.clone(),
            shutdown: state.drain.token(),
            wire: None,
        };
        let limits = engine::Limits::from_settings(&state.settings);
        engine::run(&mut socket, &mut conn, link, limits, &state.stats).await;
        metrics::gauge!("aether_ws_connections").decrement(1.0);
    }
}

impl Dialect for Conn {
    fn encode(&mut self, out: Outbound, frames: &mut Frames) -> Result<(), Outbound> {
        self.encoded(out, frames)
    }

    async fn outbound(&mut self, out: Outbound, frames: &mut Frames) {
        self.queued(out, frames).await;
    }

    async fn inbound(&mut self, msg: Inbound, frames: &mut Frames) -> Result<(), Close> {
        match msg {
            Inbound::Text(text) => match Vsn::parse_or_garbage(&text) {
                Ok(m) => frames.extend(self.handle(m).await),
                Err(g) => {
                    self.state.stats.error("invalid_message");
                    frames.push(self.garbage_reply(g));
                }
            },
            Inbound::Binary(bytes) => match decode_user_broadcast_push(&bytes) {
                Some(p) => {
                    let m = PhxMessage {
                        join_ref: p.join_ref,
                        msg_ref: p.msg_ref,
                        topic: p.topic,
                        event: "broadcast".into(),
                        payload: Value::Null,
                    };
                    frames.extend(self.broadcast(&m, Some(p.event), p.payload).await);
                }
                None => {
                    self.state.stats.error("invalid_message");
                    frames.push(self.garbage_reply(Garbage {
                        join_ref: None,
                        msg_ref: None,
                        topic: "phoenix".into(),
                        reason:
                            "malformed message: a binary frame must be a broadcast push (kind 3)"
                                .into(),
                    }));
                }
            },
        }
        Ok(())
    }

    fn expires_at(&self) -> Option<i64> {
        self.principal.expires_at
    }

    /// Every channel is told, then closed; the socket stays up for a fresh
    /// token and join.
    async fn expired(&mut self, frames: &mut Frames) -> Result<(), Close> {
        let topics: Vec<(String, Option<String>)> = self
            .channels
            .iter()
            .map(|(t, c)| (t.clone(), c.join_ref.clone()))
            .collect();
        for (topic, join_ref) in topics {
            frames.push(self.system(
                join_ref.clone(),
                &topic,
                "system",
                "Token has expired",
                "error",
            ));
            frames.push(self.frame(join_ref.clone(), join_ref, &topic, "phx_close", json!({})));
            self.leave(&topic).await;
        }
        let anon = Arc::new(Principal::anonymous());
        let _ = self
            .state
            .router
            .send(Command::SetPrincipal {
                session: self.session,
                principal: Arc::clone(&anon),
            })
            .await;
        self.principal = anon;
        Ok(())
    }

    fn rate_limited(&mut self, frames: &mut Frames) {
        frames.push(self.garbage_reply(Garbage {
            join_ref: None,
            msg_ref: None,
            topic: "phoenix".into(),
            reason: "rate_limited: too many frames on this connection: slow down".into(),
        }));
    }

    fn ending(&self, why: Ending) -> Close {
        match why {
            Ending::Shutdown => Close::new(CLOSE_GOING_AWAY, "server shutting down"),
            Ending::Slow => Close::new(CLOSE_SLOW, "slow consumer"),
            Ending::Revoked => Close::new(CLOSE_AUTH, "session signed out"),
            Ending::Idle => Close::new(CLOSE_IDLE, "idle timeout"),
            Ending::TooBig(_) => Close::new(CLOSE_TOO_BIG, "frame too large"),
            Ending::Protocol(pc) => Close::new(pc.code, pc.reason),
        }
    }

    async fn detach(&mut self) {
        let session = self.session;
        let _ = self
            .state
            .phoenix
            .send(PhxCommand::Detach { session })
            .await;
        let _ = self.state.router.send(Command::Detach { session }).await;
        session::unregister(&self.state, session);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_change_frame_spliced_from_its_shared_data_is_the_generic_encoding() {
        let data = json!({"schema": "public", "table": "t", "record": {"a": "x\"y"}});
        for vsn in [Vsn::V1, Vsn::V2] {
            for join_ref in [None, Some("3")] {
                let spliced = vsn.change_frame(join_ref, "realtime:ro\"om", 7, &data.to_string());
                let generic = vsn.encode(&PhxMessage {
                    join_ref: join_ref.map(str::to_owned),
                    msg_ref: None,
                    topic: "realtime:ro\"om".into(),
                    event: "postgres_changes".into(),
                    payload: json!({"ids": [7], "data": data}),
                });
                let parse = |s: &str| serde_json::from_str::<Value>(s).unwrap();
                assert_eq!(parse(&spliced), parse(&generic), "{vsn:?} {join_ref:?}");
            }
        }
    }

    #[test]
    fn both_framings_round_trip() {
        let m = PhxMessage {
            join_ref: Some("1".into()),
            msg_ref: Some("2".into()),
            topic: "realtime:x".into(),
            event: "phx_join".into(),
            payload: json!({"a": 1}),
        };
        for v in [Vsn::V1, Vsn::V2] {
            assert_eq!(Vsn::parse(&v.encode(&m)), Some(m.clone()));
        }
        let id = binding_id("INSERT", "public", "t", None, None);
        assert_ne!(id, 0);
        assert_eq!(id, binding_id("INSERT", "public", "t", None, None));
        assert_ne!(
            id,
            binding_id("INSERT", "public", "t", Some("a=eq.1"), None)
        );
        assert_ne!(id, binding_id("INSERT", "public", "t", None, Some("a")));
    }
}
