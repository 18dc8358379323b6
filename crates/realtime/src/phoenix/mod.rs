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

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

use axum::extract::ws::{Message, WebSocket};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

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
mod wire;

use changes::PHOENIX_DATA;
pub use changes::{binding_id, change_data};
pub use wire::{Garbage, PhxMessage, Vsn};

/// A `postgres_changes` binding as the client sent it (echoed in the reply).
#[derive(Debug, Clone)]
struct Binding {
    id: u32,
    event: String,
    schema: String,
    table: String,
    filter: Option<String>,
    /// `select`: the columns its records carry (all when absent).
    select: Option<Vec<String>>,
}

impl Binding {
    fn reply(&self) -> Value {
        let mut v =
            json!({"id": self.id, "event": self.event, "schema": self.schema, "table": self.table});
        if let Some(f) = &self.filter {
            v["filter"] = json!(f);
        }
        if let Some(cols) = &self.select {
            v["select"] = json!(cols.join(","));
        }
        v
    }
}

/// A binding's `select`: `"a,b"` or `["a", "b"]`, each a column of the table
/// (checked when the table is known); absent or `"*"` for all.
fn parse_select(
    v: Option<&Value>,
    table: Option<&aether_router::catalog::TableInfo>,
) -> Result<Option<Vec<String>>, String> {
    let cols: Vec<String> = match v {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::String(s)) if s.trim() == "*" => return Ok(None),
        Some(Value::String(s)) => s.split(',').map(|c| c.trim().to_owned()).collect(),
        Some(Value::Array(a)) => a
            .iter()
            .map(|c| c.as_str().map(|c| c.trim().to_owned()))
            .collect::<Option<_>>()
            .ok_or("select takes column names")?,
        Some(_) => return Err("select takes a comma-separated list of columns".into()),
    };
    if cols.is_empty() || cols.len() > 256 || cols.iter().any(|c| c.is_empty() || c.len() > 63) {
        return Err("select takes a comma-separated list of columns".into());
    }
    if let Some(t) = table
        && let Some(c) = cols.iter().find(|c| t.column(c).is_none())
    {
        return Err(format!("column {c} does not exist"));
    }
    Ok(Some(cols))
}

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
    governor::RateLimiter::direct(governor::Quota::per_minute(n))
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

    /// A user broadcast from this connection (JSON or binary frame).
    async fn broadcast(
        &mut self,
        m: &PhxMessage,
        event: Option<String>,
        payload: BroadcastPayload,
    ) -> Vec<Message> {
        let Some(ch) = self.channels.get(&m.topic).filter(|c| c.joined) else {
            return vec![self.reply(m, "error", json!({"reason": "unmatched topic"}))];
        };
        if !ch.rights.broadcast {
            return vec![self.reply(
                m,
                "error",
                json!({"reason": unauthorized("write to", &m.topic)}),
            )];
        }
        let hub_topic = crate::phoenix_hub::hub_topic(&m.topic, ch.private);
        let Some(event) = event else {
            return vec![self.reply(m, "error", json!({"reason": "a broadcast needs an event"}))];
        };
        if ch.messages.check().is_err() {
            self.state.stats.error("rate_limited");
            tracing::warn!(
                event = "rate_limited",
                session = self.session,
                "broadcast refused"
            );
            return vec![self.reply(
                m,
                "error",
                json!({"reason": "rate_limited: too many broadcasts on this topic (RATE_LIMIT_MESSAGES per RATE_LIMIT_WINDOW_S)"}),
            )];
        }
        let ack = ch.ack;
        let _ = self
            .state
            .phoenix
            .send(PhxCommand::Broadcast {
                from: crate::phoenix_hub::Sender::Member(self.session),
                topic: hub_topic,
                event,
                payload,
            })
            .await;
        if ack {
            vec![self.reply(m, "ok", json!({}))]
        } else {
            Vec::new()
        }
    }

    /// `presence` `{type, event: track|untrack, payload}`.
    async fn presence(&mut self, m: &PhxMessage) -> Vec<Message> {
        let Some(ch) = self.channels.get(&m.topic).filter(|c| c.joined) else {
            return vec![self.reply(m, "error", json!({"reason": "unmatched topic"}))];
        };
        if !ch.rights.presence {
            return vec![self.reply(
                m,
                "error",
                json!({"reason": unauthorized("track presence on", &m.topic)}),
            )];
        }
        let (session, topic) = (
            self.session,
            crate::phoenix_hub::hub_topic(&m.topic, ch.private),
        );
        let cmd = match m.payload.get("event").and_then(Value::as_str) {
            Some("track") => PhxCommand::Track {
                session,
                topic,
                meta: m.payload.get("payload").cloned().unwrap_or(Value::Null),
            },
            Some("untrack") => PhxCommand::Untrack { session, topic },
            other => {
                return vec![self.reply(
                    m,
                    "error",
                    json!({"reason": format!("unknown presence event {other:?} (track, untrack)")}),
                )];
            }
        };
        let _ = self.state.phoenix.send(cmd).await;
        vec![self.reply(m, "ok", json!({}))]
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

    async fn join(&mut self, m: PhxMessage) -> Vec<Message> {
        if self.channels.contains_key(&m.topic) {
            self.leave(&m.topic).await;
        }
        if let Some(token) = m.payload.get("access_token").and_then(Value::as_str)
            && let Err(why) = self.set_token(token).await
        {
            return vec![self.reply(
                &m,
                "error",
                json!({"reason": format!("Invalid token: {why}")}),
            )];
        }
        let specs = m
            .payload
            .pointer("/config/postgres_changes")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        self.next_join += 1;
        let mut bindings = Vec::new();
        let mut resolved = Vec::new();
        for (i, b) in specs.iter().enumerate() {
            let text = |k: &str| b.get(k).and_then(Value::as_str).map(str::to_owned);
            let event = text("event").unwrap_or_else(|| "*".into());
            let schema = text("schema").unwrap_or_else(|| "public".into());
            let filter = text("filter").filter(|f| !f.is_empty());
            // No table, or `*`: every published table of the schema (`*`: of
            // every schema), as Supabase allows.
            let table = text("table").unwrap_or_else(|| "*".into());
            let id: Arc<str> = Arc::from(format!("{}\u{1f}{}\u{1f}{i}", m.topic, self.next_join));
            let req = SubscribeRequest {
                id: id.to_string(),
                schema: schema.clone(),
                table: table.clone(),
                event: event.to_ascii_uppercase(),
                filter: filter.clone(),
                since: None,
            };
            let spec = if table == "*" || schema == "*" {
                wildcard(&req)
            } else {
                crate::session::resolve(&self.state, &req)
                    .await
                    .map_err(|e| e.message)
            };
            match spec {
                Ok(spec) => resolved.push(spec),
                Err(reason) => {
                    return vec![self.reply(&m, "error", json!({"reason": reason}))];
                }
            }
            let known = self
                .state
                .catalog
                .read()
                .ok()
                .and_then(|c| c.get(&schema, &table));
            let select = match parse_select(b.get("select"), known.as_deref()) {
                Ok(s) => s,
                Err(reason) => {
                    return vec![self.reply(&m, "error", json!({"reason": reason}))];
                }
            };
            bindings.push(Binding {
                id: binding_id(
                    &event,
                    &schema,
                    &table,
                    filter.as_deref(),
                    select.as_ref().map(|c| c.join(",")).as_deref(),
                ),
                event,
                schema,
                table,
                filter,
                select,
            });
        }
        let config = m.payload.get("config");
        let flag = |path: &str| {
            config
                .and_then(|c| c.pointer(path))
                .and_then(Value::as_bool)
        };
        let private = flag("/private").unwrap_or(false);
        // Supabase's broadcast replay: private channels only, at most 25.
        let replay = match config.and_then(|c| c.pointer("/broadcast/replay")) {
            None | Some(Value::Null) => None,
            Some(r) => {
                let since = r.get("since").and_then(Value::as_i64);
                let limit = match r.get("limit") {
                    None | Some(Value::Null) => Some(25),
                    Some(l) => l.as_u64().filter(|l| (1..=25).contains(l)),
                };
                match (since, limit, private) {
                    (Some(since), Some(limit), true) => Some((since, limit as usize)),
                    (_, _, false) => {
                        return vec![self.reply(
                            &m,
                            "error",
                            json!({"reason": "Replay is only available on private channels"}),
                        )];
                    }
                    _ => {
                        return vec![self.reply(
                            &m,
                            "error",
                            json!({"reason": "config.broadcast.replay takes `since` (ms since the epoch) and an optional `limit` from 1 to 25"}),
                        )];
                    }
                }
            }
        };
        let rights = if private {
            if m.topic.contains('\0') {
                return vec![self.reply(
                    &m,
                    "error",
                    json!({"reason": "a topic may not hold NUL"}),
                )];
            }
            let principal = Arc::clone(&self.principal);
            match self
                .state
                .channel_policy
                .rights(&principal, sub_topic(&m.topic))
                .await
            {
                Ok(r) if r.read => r,
                Ok(_) => {
                    return vec![self.reply(
                        &m,
                        "error",
                        json!({"reason": unauthorized("read from", &m.topic)}),
                    )];
                }
                Err(why) => {
                    tracing::error!(error = %why, session = self.session, "private channel authorization");
                    return vec![self.reply(&m, "error", json!({"reason": format!("Unauthorized: the channel's policies could not be checked: {why}")}))];
                }
            }
        } else {
            crate::ChannelRights {
                read: true,
                broadcast: true,
                presence: true,
            }
        };
        let presence_key = config
            .and_then(|c| c.pointer("/presence/key"))
            .and_then(Value::as_str)
            .filter(|k| !k.is_empty())
            .map_or_else(|| uuid::Uuid::new_v4().to_string(), str::to_owned);
        let mut ch = Channel {
            join_ref: m.join_ref.clone(),
            subs: Vec::new(),
            waiting: resolved.len(),
            join_msg_ref: m.msg_ref.clone(),
            failed: None,
            bindings,
            joined: false,
            ack: flag("/broadcast/ack").unwrap_or(false),
            private,
            rights,
            replay,
            hub: Some(JoinOptions {
                join_ref: m.join_ref.clone(),
                self_broadcast: flag("/broadcast/self").unwrap_or(false),
                presence: flag("/presence/enabled").unwrap_or(true),
                presence_key,
            }),
            messages: engine::message_budget(&self.state.settings),
        };
        for (spec, b) in resolved.into_iter().zip(&ch.bindings) {
            self.subs
                .insert(Arc::clone(&spec.id), (m.topic.clone(), b.id));
            ch.subs.push(Arc::clone(&spec.id));
            let _ = self
                .state
                .router
                .send(Command::Subscribe {
                    session: self.session,
                    spec,
                })
                .await;
        }
        let done = ch.waiting == 0;
        self.channels.insert(m.topic.clone(), ch);
        if done {
            self.finish_join(&m.topic).await
        } else {
            Vec::new()
        }
    }

    /// Answers a join once every binding is live (or one failed).
    async fn finish_join(&mut self, topic: &str) -> Vec<Message> {
        let Some(ch) = self.channels.get_mut(topic) else {
            return Vec::new();
        };
        ch.joined = true;
        let (join_ref, msg_ref) = (ch.join_ref.clone(), ch.join_msg_ref.clone());
        if let Some(reason) = ch.failed.clone() {
            let subs = std::mem::take(&mut ch.subs);
            self.channels.remove(topic);
            self.drop_subs(subs).await;
            return vec![self.frame(
                join_ref,
                msg_ref,
                topic,
                "phx_reply",
                json!({"status": "error", "response": {"reason": reason}}),
            )];
        }
        let replies: Vec<Value> = ch.bindings.iter().map(Binding::reply).collect();
        let has_pg = !replies.is_empty();
        let hub = ch.hub.take();
        let replay = ch.replay.take();
        let hub_topic = crate::phoenix_hub::hub_topic(topic, ch.private);
        let mut out = vec![self.frame(
            join_ref.clone(),
            msg_ref,
            topic,
            "phx_reply",
            json!({"status": "ok", "response": {"postgres_changes": replies}}),
        )];
        if has_pg {
            out.push(self.system(
                join_ref,
                topic,
                "postgres_changes",
                "Subscribed to PostgreSQL",
                "ok",
            ));
        }
        // After the reply is queued for the socket: the hub's presence_state
        // goes through the connection's queue, read only once these are sent.
        if let Some(options) = hub {
            let _ = self
                .state
                .phoenix
                .send(PhxCommand::Join {
                    session: self.session,
                    topic: hub_topic,
                    options,
                })
                .await;
        }
        // Missed database broadcasts, marked as replayed. Read after the
        // member is in the hub: a message committed meanwhile may come twice
        // (live, and replayed with the same `meta.id`), never not at all.
        if let Some((since, limit)) = replay {
            if self.replays.check().is_err() {
                out.push(self.system(None, topic, "broadcast", format!("Replay refused: at most {REPLAYS_PER_MINUTE} replays a minute per connection"), "error"));
                return out;
            }
            match self
                .state
                .history
                .since(sub_topic(topic), since, limit)
                .await
            {
                Ok(past) => {
                    for b in past {
                        out.push(self.frame(
                            None,
                            None,
                            topic,
                            "broadcast",
                            json!({"type": "broadcast", "event": b.event, "payload": b.payload,
                                   "meta": {"replayed": true, "id": b.id}}),
                        ));
                    }
                }
                Err(why) => {
                    tracing::warn!(error = %why, session = self.session, "broadcast replay");
                    out.push(self.system(
                        None,
                        topic,
                        "broadcast",
                        format!("Replay failed: {why}"),
                        "error",
                    ));
                }
            }
        }
        out
    }

    /// A subscription of a pending join is live (or failed).
    async fn settled(&mut self, sub: &Arc<str>, failure: Option<String>, batch: &mut Vec<Message>) {
        let Some((topic, _)) = self.subs.get(sub).cloned() else {
            return;
        };
        let Some(ch) = self.channels.get_mut(&topic).filter(|c| !c.joined) else {
            return;
        };
        if failure.is_some() && ch.failed.is_none() {
            ch.failed = failure;
        }
        ch.waiting = ch.waiting.saturating_sub(1);
        if ch.waiting == 0 {
            let frames = self.finish_join(&topic).await;
            batch.extend(frames);
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

/// A binding to every table of a schema (`schema.*`) or of every schema
/// (`*`): no filter (a filter names a table's column), and what each
/// subscriber sees of each change is still the policy's to decide.
fn wildcard(req: &SubscribeRequest) -> Result<aether_router::SubscriptionSpec, String> {
    crate::protocol::check_subscription(req).map_err(|e| e.message)?;
    if req.schema != "*" && req.table != "*" {
        return Err("a wildcard binding needs table '*'".into());
    }
    if req.filter.is_some() {
        return Err("a filter needs one table: it cannot go with schema or table '*'".into());
    }
    let events = aether_router::EventMask::parse(&req.event).ok_or_else(|| {
        format!(
            "event {:?} is not INSERT, UPDATE, DELETE, TRUNCATE or *",
            req.event
        )
    })?;
    let key = if req.schema == "*" {
        "*".to_owned()
    } else {
        format!("{}.*", req.schema)
    };
    Ok(aether_router::SubscriptionSpec {
        id: Arc::from(req.id.as_str()),
        table: Arc::from(key),
        events,
        filter: aether_router::filter::Filter::default(),
        since: None,
    })
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
        let reaped = CancellationToken::new();
        let entry = ConnEntry {
            user_key: session::user_key(&principal, addr),
            user_id: principal.user_id.clone(),
            client_id: Arc::from(format!("phoenix-{session}")),
            last_seen: Arc::clone(&last_seen),
            close: reaped.clone(),
        };
        if session::admit(&state, session, entry).is_err() {
            Box::pin(engine::refuse(
                &mut socket,
                Close::new(CLOSE_LIMIT, "connection_limit"),
            ))
            .await;
            return;
        }
        let (tx, rx) = aether_router::queue::channel::<Outbound>(state.settings.ws_queue_capacity);
        let overflowed = CancellationToken::new();
        let revoked = CancellationToken::new();
        let lagging = Arc::new(tokio::sync::Notify::new());
        let principal = Arc::new(principal);
        let handle = SessionHandle {
            tx: tx.clone(),
            overflowed: overflowed.clone(),
            revoked: revoked.clone(),
            lagging: Arc::clone(&lagging),
            principal: Arc::clone(&principal),
        };
        let member = PhxMember {
            tx,
            overflowed: overflowed.clone(),
            vsn,
        };
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
            overflowed,
            revoked,
            lagging,
            reaped,
            last_seen,
            router: state.router.clone(),
            shutdown: state.drain.token(),
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
