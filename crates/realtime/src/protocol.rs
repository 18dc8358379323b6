//! The change-subscription vocabulary on `WS_PATH`: client frames in, server frames out.

use axum::extract::ws::Message;
use serde_json::{Value, json};

use std::fmt::Write as _;

use aether_core::changes::{Relation, RowChange, RowJson};
use aether_router::Outbound;
use aether_router::routed::{FrameSlot, Routed};

/// Where a change's Aether-API encoding is kept beside it.
const AETHER_FRAME: FrameSlot = FrameSlot::new(0);

/// A parsed client frame.
#[derive(Debug, PartialEq)]
pub enum ClientFrame {
    Subscribe(SubscribeRequest),
    Unsubscribe {
        id: String,
    },
    /// `connection`/`join`: join a channel.
    Join {
        channel: String,
    },
    /// `connection`/`leave`: leave a channel.
    Leave {
        channel: String,
    },
    /// `connection`/`refresh`: renew the token without reconnecting.
    Refresh {
        token: String,
    },
    /// `message`/`send` and `message`/`retry`.
    Send {
        channel: String,
        content: Value,
        sequence: Option<i64>,
        timestamp: Option<String>,
        retry: bool,
    },
    /// `system`/`status`: the client asks how the server is.
    Status,
    /// `system`/`broadcast`: an operator's message to everyone or one channel.
    Broadcast {
        message: String,
        severity: String,
        channel: Option<String>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubscribeRequest {
    pub id: String,
    pub schema: String,
    pub table: String,
    pub event: String,
    pub filter: Option<String>,
    pub since: Option<String>,
}

/// A problem with a client frame, reported with the Aether error envelope.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FrameError {
    pub code: &'static str,
    pub message: String,
    pub subscription: Option<String>,
}

impl FrameError {
    fn new(code: &'static str, message: impl Into<String>, subscription: Option<&str>) -> Self {
        FrameError {
            code,
            message: message.into(),
            subscription: subscription.map(str::to_owned),
        }
    }
}

const MAX_ID_LEN: usize = 128;

pub fn parse(text: &str) -> Result<ClientFrame, FrameError> {
    parse_value(&json(text)?)
}

/// A client frame's JSON, or the `invalid_json` error.
pub fn json(text: &str) -> Result<Value, FrameError> {
    serde_json::from_str(text).map_err(|e| {
        FrameError::new(
            "invalid_json",
            format!("frame is not valid JSON: {e}"),
            None,
        )
    })
}

/// A client frame from its parsed JSON.
pub fn parse_value(v: &Value) -> Result<ClientFrame, FrameError> {
    let obj = v
        .as_object()
        .ok_or_else(|| FrameError::new("invalid_message", "frame must be a JSON object", None))?;
    let kind = obj.get("type").and_then(Value::as_str).unwrap_or_default();
    let action = obj
        .get("action")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let data = obj.get("data").and_then(Value::as_object);
    match kind {
        "subscription" => {}
        "connection" | "message" | "system" => return api_frame(kind, action, data),
        // No type, and an action no vocabulary has: the action is what is wrong.
        "" if !action.is_empty() && !KNOWN_ACTIONS.contains(&action) => {
            return Err(unknown_action(action, None));
        }
        _ => {
            return Err(FrameError::new(
                "unknown_type",
                format!(
                    "unknown message type {kind:?} (expected subscription, connection, message or system)"
                ),
                None,
            ));
        }
    }
    // The action is judged before the data: `{"type":"subscription","action":"explode"}`
    // is an unknown action whatever else it lacks.
    if action != "subscribe" && action != "unsubscribe" {
        let id = data.and_then(|d| d.get("id")).and_then(Value::as_str);
        return Err(unknown_action(action, id));
    }
    let data = data.ok_or_else(|| {
        FrameError::new(
            "invalid_message",
            "subscription frames need a data object",
            None,
        )
    })?;
    let id = match data.get("id").and_then(Value::as_str) {
        Some(id) if !id.is_empty() && id.len() <= MAX_ID_LEN && !id.contains(char::is_control) => {
            id.to_owned()
        }
        _ => {
            return Err(FrameError::new(
                "invalid_subscription",
                format!(
                    "data.id must be a non-empty string of at most {MAX_ID_LEN} characters, without control characters"
                ),
                None,
            ));
        }
    };
    let string_field = |name: &str| -> Result<Option<String>, FrameError> {
        match data.get(name) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(_) => Err(FrameError::new(
                "invalid_subscription",
                format!("data.{name} must be a string"),
                Some(&id),
            )),
        }
    };
    match action {
        "unsubscribe" => Ok(ClientFrame::Unsubscribe { id }),
        "subscribe" => {
            let event = string_field("event")?.unwrap_or_else(|| "*".into());
            let since = string_field("since")?;
            let shortcut = |table: &str,
                            column: &str,
                            value: &Value|
             -> Result<SubscribeRequest, FrameError> {
                let filter = match value {
                    Value::String(s) if !s.is_empty() => format!("{column}=eq.{s}"),
                    Value::Null if column == "folder_id" => "folder_id=is.null".to_owned(),
                    _ => {
                        return Err(FrameError::new(
                            "invalid_subscription",
                            format!("the {table} shortcut needs a non-empty string"),
                            Some(&id),
                        ));
                    }
                };
                Ok(SubscribeRequest {
                    id: id.clone(),
                    schema: "public".into(),
                    table: table.into(),
                    event: event.clone(),
                    filter: Some(filter),
                    since: since.clone(),
                })
            };
            if let Some(v) = data.get("files") {
                return shortcut("files", "folder_id", v).map(ClientFrame::Subscribe);
            }
            if let Some(v) = data.get("storage") {
                return shortcut("files", "bucket_id", v).map(ClientFrame::Subscribe);
            }
            if let Some(v) = data.get("auth") {
                return shortcut("auth_events", "user_id", v).map(ClientFrame::Subscribe);
            }
            let table = string_field("table")?.ok_or_else(|| {
                FrameError::new("invalid_subscription", "data.table is required", Some(&id))
            })?;
            Ok(ClientFrame::Subscribe(SubscribeRequest {
                schema: string_field("schema")?.unwrap_or_else(|| "public".into()),
                table,
                event,
                filter: string_field("filter")?.filter(|f| !f.is_empty()),
                since,
                id,
            }))
        }
        other => Err(unknown_action(other, Some(&id))),
    }
}

/// Every action of the Aether vocabularies (subscriptions and the API).
const KNOWN_ACTIONS: &[&str] = &[
    "subscribe",
    "unsubscribe",
    "join",
    "connect",
    "leave",
    "disconnect",
    "refresh",
    "send",
    "retry",
    "status",
    "broadcast",
];

fn unknown_action(action: &str, subscription: Option<&str>) -> FrameError {
    FrameError::new(
        "unknown_action",
        format!("unknown action {action:?} (expected subscribe or unsubscribe)"),
        subscription.filter(|id| !id.is_empty() && id.len() <= MAX_ID_LEN),
    )
}

/// Checks a subscription's text before it is resolved against the catalog
/// (shared by `/ws` and the Phoenix endpoint): names hold no control
/// characters, and a filter holds no NUL or control character other than
/// tab, newline and carriage return (legal in values), and no empty condition
/// (`"&&&"` is refused, not read as "no filter").
pub fn check_subscription(req: &SubscribeRequest) -> Result<(), FrameError> {
    let sub = Some(req.id.as_str());
    // The id is checked where a client chose it (`parse`): the Phoenix
    // endpoint makes its own, with separators.
    for (field, v) in [
        ("schema", &req.schema),
        ("table", &req.table),
        ("event", &req.event),
    ] {
        if v.chars().any(char::is_control) {
            return Err(FrameError::new(
                "invalid_subscription",
                format!("data.{field} cannot contain NUL or control characters"),
                sub,
            ));
        }
    }
    if let Some(since) = &req.since
        && since.chars().any(char::is_control)
    {
        return Err(FrameError::new(
            "invalid_since",
            "data.since cannot contain NUL or control characters",
            sub,
        ));
    }
    if let Some(f) = &req.filter {
        filter_text(f).map_err(|why| FrameError::new("invalid_filter", why, sub))?;
    }
    Ok(())
}

/// The filter checks of [`check_subscription`], on the text alone.
pub fn filter_text(f: &str) -> Result<(), String> {
    if let Some(c) = f
        .chars()
        .find(|c| c.is_control() && !matches!(c, '\t' | '\n' | '\r'))
    {
        return Err(format!(
            "filter cannot contain U+{:04X} (NUL and control characters other than tab and newline)",
            c as u32
        ));
    }
    if f.split('&').any(str::is_empty) {
        return Err(format!(
            "filter {f:?} has an empty condition: use column=op.value joined by a single '&'"
        ));
    }
    Ok(())
}

/// The Aether WebSocket API frames (`connection`, `message`, `system`).
fn api_frame(
    kind: &str,
    action: &str,
    data: Option<&serde_json::Map<String, Value>>,
) -> Result<ClientFrame, FrameError> {
    let bad = |msg: String| FrameError::new("invalid_message", msg, None);
    let text = |name: &str| -> Result<Option<String>, FrameError> {
        match data.and_then(|d| d.get(name)) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(_) => Err(bad(format!("data.{name} must be a string"))),
        }
    };
    let required = |name: &str| -> Result<String, FrameError> {
        text(name)?
            .filter(|s| !s.is_empty())
            .ok_or_else(|| bad(format!("{kind}/{action} needs data.{name}")))
    };
    match (kind, action) {
        ("connection", "join" | "connect") => Ok(ClientFrame::Join {
            channel: required("channel")?,
        }),
        ("connection", "leave" | "disconnect") => Ok(ClientFrame::Leave {
            channel: required("channel")?,
        }),
        ("connection", "refresh") => Ok(ClientFrame::Refresh {
            token: required("token")?,
        }),
        ("message", "send" | "retry") => {
            let channel = required("channel")?;
            let content = data
                .and_then(|d| d.get("content"))
                .cloned()
                .unwrap_or(Value::Null);
            if content.is_null() {
                return Err(bad("message frames need data.content".into()));
            }
            let metadata = data
                .and_then(|d| d.get("metadata"))
                .and_then(Value::as_object);
            let sequence = match metadata.and_then(|m| m.get("sequence")) {
                None | Some(Value::Null) => None,
                Some(v) => Some(
                    v.as_i64()
                        .or_else(|| v.as_str().and_then(|s| s.parse().ok()))
                        .ok_or_else(|| bad("metadata.sequence must be an integer".into()))?,
                ),
            };
            if action == "retry" && sequence.is_none() {
                return Err(bad("message/retry needs metadata.sequence".into()));
            }
            let timestamp = metadata
                .and_then(|m| m.get("timestamp"))
                .and_then(Value::as_str)
                .map(str::to_owned);
            Ok(ClientFrame::Send {
                channel,
                content,
                sequence,
                timestamp,
                retry: action == "retry",
            })
        }
        ("system", "status") => Ok(ClientFrame::Status),
        ("system", "broadcast") => {
            let severity = text("severity")?.unwrap_or_else(|| "info".into());
            if !matches!(severity.as_str(), "info" | "warning" | "error") {
                return Err(bad("severity must be info, warning or error".into()));
            }
            Ok(ClientFrame::Broadcast {
                message: required("message")?,
                severity,
                channel: text("channel")?,
            })
        }
        _ => Err(FrameError::new(
            "unknown_action",
            format!("unknown action {action:?} for type {kind:?}"),
            None,
        )),
    }
}

/// `{"type":"error","code","message","details":{"component","reason"}}`, plus the
/// subscription id when the error concerns one.
pub fn error_frame(
    component: &str,
    code: &str,
    message: &str,
    subscription: Option<&str>,
) -> String {
    let mut v = json!({
        "type": "error",
        "code": code,
        "message": message,
        "details": { "component": component, "reason": message },
    });
    if let Some(id) = subscription {
        v["subscription"] = Value::String(id.to_owned());
    }
    v.to_string()
}

/// The subscriber-independent tail of a change frame:
/// `"id":…,"eventType":…,"schema":…,"table":…,"new":…,"old":…,"timestamp":…}`.
fn change_tail(change: &RowChange) -> String {
    let mut s = String::with_capacity(256);
    let _ = write!(
        s,
        "\"id\":\"{}\",\"eventType\":\"{}\",\"schema\":",
        change.id(),
        change.kind.as_str()
    );
    push_json(&mut s, &change.relation.schema);
    s.push_str(",\"table\":");
    push_json(&mut s, &change.relation.name);
    s.push_str(",\"new\":");
    push_row(&mut s, &change.relation, change.new.as_deref());
    s.push_str(",\"old\":");
    push_row(&mut s, &change.relation, change.old.as_deref());
    let _ = write!(s, ",\"timestamp\":{}}}", change.commit_time_ms);
    s
}

fn push_json(out: &mut String, s: &str) {
    // Serializing a &str into a String cannot fail.
    if let Ok(v) = serde_json::to_string(s) {
        out.push_str(&v);
    }
}

fn push_row(out: &mut String, relation: &Relation, row: Option<&[Option<Value>]>) {
    match row {
        None => out.push_str("null"),
        Some(values) => {
            if let Ok(v) = serde_json::to_string(&RowJson { relation, values }) {
                out.push_str(&v);
            }
        }
    }
}

/// A `change` frame. Its tail is encoded once per change and shared by every
/// subscriber of this vocabulary; only the subscription id is per frame.
pub fn change_frame(subscription: &str, change: &Routed) -> String {
    let tail = change.frame(AETHER_FRAME, change_tail);
    let mut v = Vec::with_capacity(CHANGE_PREFIX.len() + subscription.len() + 3 + tail.len());
    v.extend_from_slice(CHANGE_PREFIX.as_bytes());
    // A string into a `Vec` cannot fail.
    let _ = serde_json::to_writer(&mut v, subscription);
    v.push(b',');
    v.extend_from_slice(tail.as_bytes());
    // Built of strings and JSON only.
    String::from_utf8(v).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
}

fn subscription_frame(action: &str, id: &str) -> String {
    json!({"type": "subscription", "action": action, "data": {"id": id}}).to_string()
}

const CHANGE_PREFIX: &str = "{\"type\":\"change\",\"subscription\":";

/// A `change` frame as written to a socket directly: the WebSocket header,
/// the frame's opening and the subscription id, which are the recipient's
/// own, then the tail every recipient of the change shares, borrowed from
/// it rather than copied into a buffer per recipient.
pub(crate) fn change_wire_frame<'c>(subscription: &str, change: &'c Routed) -> WireFrame<'c> {
    let tail = change.frame(AETHER_FRAME, change_tail).as_bytes();
    let mut head = Head::default();
    // A string into a buffer cannot fail.
    let _ = serde_json::to_writer(&mut head, subscription);
    let id = head.len();
    // The payload: opening, id, a comma, the tail.
    let (header, len) = text_header(CHANGE_PREFIX.len() + id + 1 + tail.len());
    head.extend_from_slice(&header[..len]);
    head.extend_from_slice(CHANGE_PREFIX.as_bytes());
    head.rotate_to_front(id);
    head.extend_from_slice(b",");
    WireFrame { head, tail }
}

/// A frame for one recipient in two parts: its own head and a shared tail.
pub(crate) struct WireFrame<'c> {
    pub(crate) head: Head,
    pub(crate) tail: &'c [u8],
}

impl WireFrame<'_> {
    pub(crate) fn len(&self) -> usize {
        self.head.len() + self.tail.len()
    }

    /// The frame's bytes from `at` on, in one buffer.
    pub(crate) fn rest(&self, at: usize) -> bytes::Bytes {
        let mut v = Vec::with_capacity(self.len().saturating_sub(at));
        let head = self.head.as_slice();
        v.extend_from_slice(head.get(at..).unwrap_or_default());
        v.extend_from_slice(
            self.tail
                .get(at.saturating_sub(head.len())..)
                .unwrap_or_default(),
        );
        bytes::Bytes::from(v)
    }
}

/// A recipient's part of a frame: on the stack unless an id is long.
pub(crate) struct Head {
    inline: [u8; HEAD_INLINE],
    len: usize,
    spilled: Vec<u8>,
}

/// Room for the longest WebSocket header (10 bytes), the frame's opening and
/// a 64-byte id with its quotes and the comma after it.
const HEAD_INLINE: usize = 10 + CHANGE_PREFIX.len() + 64 + 3;

impl Default for Head {
    fn default() -> Head {
        Head {
            inline: [0; HEAD_INLINE],
            len: 0,
            spilled: Vec::new(),
        }
    }
}

impl Head {
    #[cfg(test)]
    pub(crate) fn from_vec(spilled: Vec<u8>) -> Head {
        Head {
            spilled,
            ..Head::default()
        }
    }

    pub(crate) fn as_slice(&self) -> &[u8] {
        if self.spilled.is_empty() {
            &self.inline[..self.len]
        } else {
            &self.spilled
        }
    }

    fn len(&self) -> usize {
        self.as_slice().len()
    }

    fn extend_from_slice(&mut self, bytes: &[u8]) {
        if self.spilled.is_empty() && self.len + bytes.len() <= HEAD_INLINE {
            self.inline[self.len..self.len + bytes.len()].copy_from_slice(bytes);
            self.len += bytes.len();
            return;
        }
        if self.spilled.is_empty() {
            self.spilled.extend_from_slice(&self.inline[..self.len]);
        }
        self.spilled.extend_from_slice(bytes);
    }

    /// Moves the first `n` bytes behind the rest.
    fn rotate_to_front(&mut self, n: usize) {
        if self.spilled.is_empty() {
            self.inline[..self.len].rotate_left(n);
        } else {
            self.spilled.rotate_left(n);
        }
    }
}

impl std::io::Write for Head {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A server's unmasked, unfragmented text frame header for `n` payload
/// bytes, and how many of its bytes are used.
fn text_header(n: usize) -> ([u8; 10], usize) {
    let mut header = [0u8; 10];
    header[0] = 0x81; // FIN, text
    let len = if n < 126 {
        header[1] = n as u8;
        2
    } else if let Ok(n) = u16::try_from(n) {
        header[1] = 126;
        header[2..4].copy_from_slice(&n.to_be_bytes());
        4
    } else {
        header[1] = 127;
        header[2..10].copy_from_slice(&(n as u64).to_be_bytes());
        10
    };
    (header, len)
}

/// Encodes a queued item as the frames to send, in order.
pub(crate) fn encode(out: Outbound, frames: &mut Vec<Message>) {
    let text = match out {
        Outbound::Change {
            subscription,
            change,
        } => change_frame(&subscription, &change),
        Outbound::Subscribed {
            subscription,
            position,
        } => json!({"type": "subscription", "action": "subscribed", "data": {
            "id": &*subscription, "position": position.to_string(),
        }})
        .to_string(),
        Outbound::Unsubscribed { subscription } => {
            subscription_frame("unsubscribed", &subscription)
        }
        Outbound::Error {
            subscription,
            code,
            message,
        } => error_frame("subscription", code, &message, subscription.as_deref()),
        Outbound::Frame(f) => f.as_ref().to_owned(),
        Outbound::Binary(b) => return frames.push(Message::Binary(b)),
    };
    frames.push(Message::Text(text.into()));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rest_of_a_wire_frame_crosses_from_head_to_tail() {
        let frame = WireFrame {
            head: Head::from_vec(b"head".to_vec()),
            tail: b"tail",
        };
        assert_eq!(frame.len(), 8);
        for (at, want) in [
            (0, &b"headtail"[..]),
            (3, b"dtail"),
            (4, b"tail"),
            (6, b"il"),
            (8, b""),
        ] {
            assert_eq!(&frame.rest(at)[..], want, "{at}");
        }
        // On the stack, and spilled once past the room.
        let mut head = Head::default();
        head.extend_from_slice(&[1; HEAD_INLINE]);
        assert!(head.spilled.is_empty());
        head.extend_from_slice(&[2]);
        assert_eq!(head.len(), HEAD_INLINE + 1);
        assert_eq!(head.as_slice()[HEAD_INLINE], 2);
    }

    #[test]
    fn a_wire_frame_is_the_text_frame_behind_its_websocket_header() {
        let c = Routed::new(std::sync::Arc::new(aether_core::changes::RowChange::new(
            aether_core::lsn::Position::new(aether_core::lsn::PgLsn(1), 0),
            aether_core::changes::ChangeKind::Insert,
            aether_core::changes::test_relation(),
            Some(vec![]),
            None,
            0,
        )));
        // A 16- and a 64-bit length; an id to escape; a head that fits
        // (64), one that spills at the comma (71), at the opening (72),
        // within the id (108) and long ones.
        for id in [
            "s\"1".to_owned(),
            "y".repeat(64),
            "y".repeat(71),
            "y".repeat(72),
            "y".repeat(108),
            "y".repeat(200),
            "y".repeat(70_000),
        ] {
            let frame = change_wire_frame(&id, &c);
            let spilled = !frame.head.spilled.is_empty();
            assert_eq!(spilled, id.len() > 64, "{}", id.len());
            let (wire, text) = (frame.rest(0), change_frame(&id, &c));
            let (header, len) = text_header(text.len());
            assert_eq!(&wire[..len], &header[..len]);
            assert_eq!(&wire[len..], text.as_bytes());
        }
        for (n, want) in [
            (125, &[0x81, 125][..]),
            (126, &[0x81, 126, 0, 126][..]),
            (65_535, &[0x81, 126, 255, 255][..]),
            (65_536, &[0x81, 127, 0, 0, 0, 0, 0, 1, 0, 0][..]),
        ] {
            let (header, len) = text_header(n);
            assert_eq!(&header[..len], want, "{n}");
        }
    }

    #[test]
    fn parses_subscribe_shortcuts_and_errors() {
        let f = parse(r#"{"type":"subscription","action":"subscribe","data":{"id":"s1","table":"files","filter":"size=gt.1"}}"#).unwrap();
        assert!(
            matches!(f, ClientFrame::Subscribe(SubscribeRequest { ref schema, ref event, .. }) if schema == "public" && event == "*")
        );
        let f = parse(
            r#"{"type":"subscription","action":"subscribe","data":{"id":"s2","storage":"files"}}"#,
        )
        .unwrap();
        assert!(
            matches!(f, ClientFrame::Subscribe(SubscribeRequest { ref filter, .. }) if filter.as_deref() == Some("bucket_id=eq.files"))
        );
        let f =
            parse(r#"{"type":"subscription","action":"subscribe","data":{"id":"s3","auth":"u"}}"#)
                .unwrap();
        assert!(
            matches!(f, ClientFrame::Subscribe(SubscribeRequest { ref table, .. }) if table == "auth_events")
        );
        assert_eq!(parse("{").unwrap_err().code, "invalid_json");
        assert_eq!(parse("[]").unwrap_err().code, "invalid_message");
        assert_eq!(
            parse(r#"{"type":"nope"}"#).unwrap_err().code,
            "unknown_type"
        );
        assert_eq!(
            parse(r#"{"type":"subscription","action":"subscribe","data":{}}"#)
                .unwrap_err()
                .code,
            "invalid_subscription"
        );
        assert_eq!(
            parse(r#"{"type":"subscription","action":"subscribe","data":{"id":"x","table":5}}"#)
                .unwrap_err()
                .code,
            "invalid_subscription"
        );
        assert_eq!(
            parse(r#"{"type":"subscription","action":"zap","data":{"id":"x"}}"#)
                .unwrap_err()
                .code,
            "unknown_action"
        );
    }
}
