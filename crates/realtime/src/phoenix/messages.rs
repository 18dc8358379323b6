//! What a joined member sends on a channel: broadcasts (JSON or realtime-js's
//! binary push) and presence `track`/`untrack`, relayed by the Phoenix hub.

use axum::extract::ws::Message;
use serde_json::json;

use super::*;

impl Conn {
    /// A user broadcast from this connection (JSON or binary frame).
    pub(super) async fn broadcast(
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
    pub(super) async fn presence(&mut self, m: &PhxMessage) -> Vec<Message> {
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
}
