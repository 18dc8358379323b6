//! `phx_join`: a channel's `postgres_changes` bindings become router
//! subscriptions, its private flag and broadcast/presence options are checked,
//! and the join is answered once every subscription is live (or one failed).

use std::sync::Arc;

use axum::extract::ws::Message;
use serde_json::{Value, json};

use super::*;

/// A `postgres_changes` binding as the client sent it (echoed in the reply).
#[derive(Debug, Clone)]
pub(super) struct Binding {
    pub(super) id: u32,
    event: String,
    schema: String,
    table: String,
    filter: Option<String>,
    /// `select`: the columns its records carry (all when absent).
    pub(super) select: Option<Vec<String>>,
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

impl Conn {
    pub(super) async fn join(&mut self, m: PhxMessage) -> Vec<Message> {
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
    pub(super) async fn finish_join(&mut self, topic: &str) -> Vec<Message> {
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
    pub(super) async fn settled(
        &mut self,
        sub: &Arc<str>,
        failure: Option<String>,
        batch: &mut Vec<Message>,
    ) {
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
