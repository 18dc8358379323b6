//! Phoenix messages on the wire: the two framings (`vsn=1.0.0` objects,
//! `vsn=2.0.0` arrays), parsing with a reason for what is not a message, and
//! the frames Aether sends.

use serde_json::{Value, json};

/// The two framings of Phoenix messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Vsn {
    V1,
    V2,
}

/// A Phoenix message.
#[derive(Debug, Clone, PartialEq)]
pub struct PhxMessage {
    pub join_ref: Option<String>,
    pub msg_ref: Option<String>,
    pub topic: String,
    pub event: String,
    pub payload: Value,
}

fn ref_value(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// A client frame that is not a Phoenix message: what of its address could be
/// read (so the error reply reaches the right push), and why it was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Garbage {
    pub join_ref: Option<String>,
    pub msg_ref: Option<String>,
    /// `phoenix` when no topic could be read.
    pub topic: String,
    pub reason: String,
}

impl Vsn {
    /// Parses a frame, or says what of it could be read and why it is refused.
    pub fn parse_or_garbage(text: &str) -> Result<PhxMessage, Garbage> {
        if let Some(m) = Self::parse(text) {
            return Ok(m);
        }
        let v: Option<Value> = serde_json::from_str(text).ok();
        let (join_ref, msg_ref, topic, event) = match &v {
            Some(Value::Array(a)) => (
                ref_value(a.first()),
                ref_value(a.get(1)),
                a.get(2).and_then(Value::as_str),
                a.get(3).and_then(Value::as_str),
            ),
            Some(Value::Object(o)) => (
                ref_value(o.get("join_ref")),
                ref_value(o.get("ref")),
                o.get("topic").and_then(Value::as_str),
                o.get("event").and_then(Value::as_str),
            ),
            _ => (None, None, None, None),
        };
        let reason = match (&v, topic, event) {
            (None, ..) => "malformed message: not JSON".to_owned(),
            (Some(Value::Array(a)), ..) if a.len() != 5 => format!(
                "malformed message: an array needs 5 elements [join_ref, ref, topic, event, payload], not {}",
                a.len()
            ),
            (Some(Value::Array(_) | Value::Object(_)), None, _) => {
                "malformed message: topic must be a string".to_owned()
            }
            (Some(Value::Array(_) | Value::Object(_)), _, None) => {
                "malformed message: event must be a string".to_owned()
            }
            _ => "malformed message: expected a JSON object or a 5-element array".to_owned(),
        };
        Err(Garbage {
            join_ref,
            msg_ref,
            // An empty topic is no address: the reply goes to `phoenix` then.
            topic: topic
                .filter(|t| !t.is_empty())
                .unwrap_or("phoenix")
                .to_owned(),
            reason,
        })
    }

    pub fn parse(text: &str) -> Option<PhxMessage> {
        let v: Value = serde_json::from_str(text).ok()?;
        match v {
            Value::Array(a) if a.len() == 5 => Some(PhxMessage {
                join_ref: ref_value(a.first()),
                msg_ref: ref_value(a.get(1)),
                topic: a[2].as_str()?.to_owned(),
                event: a[3].as_str()?.to_owned(),
                payload: a[4].clone(),
            }),
            Value::Object(o) => Some(PhxMessage {
                join_ref: ref_value(o.get("join_ref")),
                msg_ref: ref_value(o.get("ref")),
                topic: o.get("topic")?.as_str()?.to_owned(),
                event: o.get("event")?.as_str()?.to_owned(),
                payload: o.get("payload").cloned().unwrap_or(Value::Null),
            }),
            _ => None,
        }
    }

    /// A `postgres_changes` push with a `data` payload already encoded.
    pub(super) fn change_frame(
        self,
        join_ref: Option<&str>,
        topic: &str,
        id: u32,
        data: &str,
    ) -> String {
        let join_ref = serde_json::to_string(&join_ref).unwrap_or_else(|_| "null".into());
        let topic = serde_json::to_string(topic).unwrap_or_else(|_| "\"\"".into());
        match self {
            Vsn::V1 => format!(
                "{{\"topic\":{topic},\"event\":\"postgres_changes\",\"payload\":{{\"ids\":[{id}],\"data\":{data}}},\"ref\":null,\"join_ref\":{join_ref}}}"
            ),
            Vsn::V2 => format!(
                "[{join_ref},null,{topic},\"postgres_changes\",{{\"ids\":[{id}],\"data\":{data}}}]"
            ),
        }
    }

    pub fn encode(self, m: &PhxMessage) -> String {
        match self {
            Vsn::V1 => json!({
                "topic": m.topic, "event": m.event, "payload": m.payload,
                "ref": m.msg_ref, "join_ref": m.join_ref,
            })
            .to_string(),
            Vsn::V2 => json!([m.join_ref, m.msg_ref, m.topic, m.event, m.payload]).to_string(),
        }
    }
}
