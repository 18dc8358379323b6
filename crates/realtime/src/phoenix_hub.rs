//! Broadcast and presence of `/realtime/v1` (Supabase Realtime's Phoenix
//! channels), kept apart from the Aether channels of [`super::hub`].
//!
//! As in that hub, one task owns every topic, so a topic's broadcasts and
//! presence diffs reach its members in one order, and frames go to the members'
//! bounded queues with `try_send`: a member whose queue is full is closed as a
//! slow consumer (it signals its queue `Overflowed`) instead of holding up the topic.
//!
//! Frames are encoded here for each member's framing: broadcasts once per
//! framing (`vsn=2.0.0` members get realtime-js's binary "user broadcast" frame,
//! kind 4), presence per member (it carries the member's `join_ref`, so a
//! client drops a diff meant for an earlier join of the same topic).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use aether_router::Outbound;
use bytes::Bytes;
use serde_json::{Map, Value, json};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::phoenix::{PhxMessage, Vsn};

/// What a user broadcast carries: JSON, or bytes (a vsn 2.0.0 `ArrayBuffer`).
#[derive(Debug, Clone, PartialEq)]
pub enum BroadcastPayload {
    Json(Value),
    Binary(Bytes),
}

/// A connection as this hub knows it.
pub struct PhxMember {
    /// The connection's one queue, shared with the router.
    pub tx: aether_router::queue::QueueTx<Outbound>,
    pub vsn: Vsn,
}

/// A join's options, from `config.broadcast` and `config.presence`.
#[derive(Debug, Clone)]
pub struct JoinOptions {
    pub join_ref: Option<String>,
    /// `config.broadcast.self`: the sender hears its own broadcasts.
    pub self_broadcast: bool,
    /// `config.presence.enabled` (absent: true, as older clients send none):
    /// the member gets `presence_state` and `presence_diff`.
    pub presence: bool,
    /// `config.presence.key`, or a generated one.
    pub presence_key: String,
}

/// Who a broadcast is from: which members hear it (a member does not hear its
/// own unless it asked), and whether the other nodes of a cluster must.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sender {
    /// A member of the topic on this node.
    Member(u64),
    /// This node's REST API.
    Api,
    /// The database (`realtime.send`): every node decodes it from the log.
    Database,
    /// Another node of the cluster relayed it here.
    OtherNode,
}

pub enum PhxCommand {
    Attach {
        session: u64,
        member: PhxMember,
    },
    Detach {
        session: u64,
    },
    Join {
        session: u64,
        topic: String,
        options: JoinOptions,
    },
    Leave {
        session: u64,
        topic: String,
    },
    /// A user broadcast.
    Broadcast {
        from: Sender,
        topic: String,
        event: String,
        payload: BroadcastPayload,
    },
    Track {
        session: u64,
        topic: String,
        meta: Value,
    },
    Untrack {
        session: u64,
        topic: String,
    },
    /// Another node's members' presence changed (`{key: {metas}}` maps).
    RemotePresence {
        node: String,
        topic: String,
        joins: Map<String, Value>,
        leaves: Map<String, Value>,
    },
    /// All another node's members track, by topic (after it or this one joined
    /// the bus): what differs from what was known is sent as diffs.
    RemoteSnapshot {
        node: String,
        state: HashMap<String, Map<String, Value>>,
    },
    /// Another node is gone: its members leave every topic.
    NodeGone {
        node: String,
    },
    /// What this node's members track, by topic, for another node.
    Snapshot {
        reply: tokio::sync::oneshot::Sender<HashMap<String, Map<String, Value>>>,
    },
}

struct Member {
    options: JoinOptions,
    /// This member's tracked meta (with its `phx_ref`).
    tracked: Option<Value>,
}

#[derive(Default)]
struct Topic {
    members: HashMap<u64, Member>,
}

#[derive(Default)]
pub struct PhxHub {
    conns: HashMap<u64, (PhxMember, HashSet<String>)>,
    topics: HashMap<String, Topic>,
    next_ref: u64,
    /// Cluster mode: members' and the API's broadcasts go to the other nodes.
    bus: Option<Arc<dyn crate::hub::ChannelBus>>,
    /// Cluster mode: what other nodes' members track, by topic, node and key
    /// (`{key: {metas: [...]}}`).
    remote: HashMap<String, HashMap<String, Map<String, Value>>>,
    /// Makes this node's `phx_ref`s differ from other nodes' (clients match
    /// leaves to joins by them).
    ref_prefix: String,
}

/// realtime-js's binary user broadcast (`lib/serializer.js`, kind 4):
/// `[4, topic len, event len, metadata len, encoding]`, topic, event, metadata,
/// payload (encoding 1: JSON text, 0: raw bytes). `None` when a length does not
/// fit in a byte.
pub fn encode_user_broadcast(
    topic: &str,
    event: &str,
    payload: &BroadcastPayload,
) -> Option<Bytes> {
    let (encoding, body): (u8, Bytes) = match payload {
        BroadcastPayload::Json(v) => (1, Bytes::from(v.to_string())),
        BroadcastPayload::Binary(b) => (0, b.clone()),
    };
    let topic_len = u8::try_from(topic.len()).ok()?;
    let event_len = u8::try_from(event.len()).ok()?;
    let mut out = Vec::with_capacity(5 + topic.len() + event.len() + body.len());
    out.extend_from_slice(&[4, topic_len, event_len, 0, encoding]);
    out.extend_from_slice(topic.as_bytes());
    out.extend_from_slice(event.as_bytes());
    out.extend_from_slice(&body);
    Some(Bytes::from(out))
}

/// A user broadcast pushed in realtime-js's binary frame (kind 3).
#[derive(Debug, Clone, PartialEq)]
pub struct BinaryPush {
    pub join_ref: Option<String>,
    pub msg_ref: Option<String>,
    pub topic: String,
    pub event: String,
    pub payload: BroadcastPayload,
}

/// Decodes `[3, join_ref len, ref len, topic len, event len, metadata len,
/// encoding]`, join_ref, ref, topic, event, metadata, payload.
pub fn decode_user_broadcast_push(frame: &[u8]) -> Option<BinaryPush> {
    let (&kind, rest) = frame.split_first()?;
    if kind != 3 || rest.len() < 6 {
        return None;
    }
    let lens: Vec<usize> = rest[..5].iter().map(|&b| usize::from(b)).collect();
    let encoding = rest[5];
    let mut at = 6;
    let mut parts = Vec::with_capacity(5);
    for len in lens {
        let part = rest.get(at..at + len)?;
        parts.push(std::str::from_utf8(part).ok()?.to_owned());
        at += len;
    }
    let body = &rest[at..];
    let payload = match encoding {
        0 => BroadcastPayload::Binary(Bytes::copy_from_slice(body)),
        1 => BroadcastPayload::Json(serde_json::from_slice(body).ok()?),
        _ => return None,
    };
    let non_empty = |s: &String| (!s.is_empty()).then(|| s.clone());
    Some(BinaryPush {
        join_ref: non_empty(&parts[0]),
        msg_ref: non_empty(&parts[1]),
        topic: parts[2].clone(),
        event: parts[3].clone(),
        payload,
    })
}

/// A private channel's topic in the hub: kept apart from the public channel of
/// the same name (a client's topic never holds NUL: such a join is refused).
const PRIVATE_PREFIX: &str = "\u{0}private:";

/// The hub's name for `topic`, private or public.
pub fn hub_topic(topic: &str, private: bool) -> String {
    if private {
        format!("{PRIVATE_PREFIX}{topic}")
    } else {
        topic.to_owned()
    }
}

/// The topic clients see for a hub topic.
fn shown(topic: &str) -> &str {
    topic.strip_prefix(PRIVATE_PREFIX).unwrap_or(topic)
}

fn text(vsn: Vsn, join_ref: Option<String>, topic: &str, event: &str, payload: Value) -> Outbound {
    let topic = shown(topic);
    let m = PhxMessage {
        join_ref,
        msg_ref: None,
        topic: topic.to_owned(),
        event: event.to_owned(),
        payload,
    };
    Outbound::Frame(Arc::from(vsn.encode(&m)))
}

fn metas(v: &Value) -> &[Value] {
    v.get("metas")
        .and_then(Value::as_array)
        .map_or(&[], Vec::as_slice)
}

fn phx_ref(meta: &Value) -> Option<&Value> {
    meta.get("phx_ref")
}

/// Adds `joins`' metas to `state` (`{key: {metas}}` maps).
fn apply_joins(state: &mut Map<String, Value>, joins: &Map<String, Value>) {
    for (key, v) in joins {
        let entry = state
            .entry(key.clone())
            .or_insert_with(|| json!({"metas": []}));
        if let Some(list) = entry.get_mut("metas").and_then(Value::as_array_mut) {
            list.extend(metas(v).iter().cloned());
        }
    }
}

/// Removes `leaves`' metas (by `phx_ref`) from `state`; keys left empty go.
fn apply_leaves(state: &mut Map<String, Value>, leaves: &Map<String, Value>) {
    for (key, v) in leaves {
        let gone: Vec<&Value> = metas(v).iter().filter_map(phx_ref).collect();
        if let Some(list) = state
            .get_mut(key)
            .and_then(|e| e.get_mut("metas"))
            .and_then(Value::as_array_mut)
        {
            list.retain(|m| phx_ref(m).is_none_or(|r| !gone.contains(&r)));
            if list.is_empty() {
                state.remove(key);
            }
        }
    }
}

/// (joins, leaves) that turn `old` into `new`, by `phx_ref`.
fn difference(
    old: &Map<String, Value>,
    new: &Map<String, Value>,
) -> (Map<String, Value>, Map<String, Value>) {
    let only = |a: &Map<String, Value>, b: &Map<String, Value>| -> Map<String, Value> {
        a.iter()
            .filter_map(|(key, v)| {
                let others: Vec<&Value> = b
                    .get(key)
                    .map(metas)
                    .unwrap_or(&[])
                    .iter()
                    .filter_map(phx_ref)
                    .collect();
                let rest: Vec<Value> = metas(v)
                    .iter()
                    .filter(|m| phx_ref(m).is_none_or(|r| !others.contains(&r)))
                    .cloned()
                    .collect();
                (!rest.is_empty()).then(|| (key.clone(), json!({ "metas": rest })))
            })
            .collect()
    };
    (only(new, old), only(old, new))
}

/// `{key: {metas: [meta, …]}}` of one topic, from its members' tracked metas.
fn presence_state(topic: &Topic) -> Value {
    let mut by_key: BTreeMap<&str, Vec<Value>> = BTreeMap::new();
    let mut members: Vec<(&u64, &Member)> = topic.members.iter().collect();
    members.sort_by_key(|(s, _)| **s);
    for (_, m) in members {
        if let Some(meta) = &m.tracked {
            by_key
                .entry(&m.options.presence_key)
                .or_default()
                .push(meta.clone());
        }
    }
    Value::Object(
        by_key
            .into_iter()
            .map(|(k, metas)| (k.to_owned(), json!({ "metas": metas })))
            .collect(),
    )
}

impl PhxHub {
    /// Cluster mode: broadcasts are announced to the other nodes through `bus`.
    pub fn bus(mut self, bus: Arc<dyn crate::hub::ChannelBus>) -> Self {
        self.bus = Some(bus);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        self.ref_prefix = format!("{:x}{:x}.", std::process::id(), nanos);
        self
    }

    pub async fn run(
        mut self,
        mut commands: mpsc::Receiver<PhxCommand>,
        shutdown: CancellationToken,
    ) {
        loop {
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                cmd = commands.recv() => match cmd {
                    Some(cmd) => self.command(cmd),
                    None => break,
                },
            }
        }
    }

    pub fn command(&mut self, cmd: PhxCommand) {
        match cmd {
            PhxCommand::Attach { session, member } => {
                self.conns.insert(session, (member, HashSet::new()));
            }
            PhxCommand::Detach { session } => {
                if let Some((_, topics)) = self.conns.get(&session) {
                    for topic in topics.clone() {
                        self.leave(session, &topic);
                    }
                }
                self.conns.remove(&session);
            }
            PhxCommand::Join {
                session,
                topic,
                options,
            } => self.join(session, topic, options),
            PhxCommand::Leave { session, topic } => self.leave(session, &topic),
            PhxCommand::Broadcast {
                from,
                topic,
                event,
                payload,
            } => self.broadcast(from, &topic, &event, &payload),
            PhxCommand::Track {
                session,
                topic,
                meta,
            } => self.track(session, &topic, meta),
            PhxCommand::RemotePresence {
                node,
                topic,
                joins,
                leaves,
            } => {
                let known = self
                    .remote
                    .entry(topic.clone())
                    .or_default()
                    .entry(node)
                    .or_default();
                apply_leaves(known, &leaves);
                apply_joins(known, &joins);
                self.send_diff(&topic, json!({"joins": joins, "leaves": leaves}));
                self.remote.retain(|_, nodes| {
                    nodes.retain(|_, keys| !keys.is_empty());
                    !nodes.is_empty()
                });
            }
            PhxCommand::RemoteSnapshot { node, mut state } => {
                let topics: HashSet<String> = self
                    .remote
                    .iter()
                    .filter(|(_, nodes)| nodes.contains_key(&node))
                    .map(|(t, _)| t.clone())
                    .chain(state.keys().cloned())
                    .collect();
                for topic in topics {
                    let new = state.remove(&topic).unwrap_or_default();
                    let old = self
                        .remote
                        .get_mut(&topic)
                        .and_then(|n| n.remove(&node))
                        .unwrap_or_default();
                    let (joins, leaves) = difference(&old, &new);
                    if !new.is_empty() {
                        self.remote
                            .entry(topic.clone())
                            .or_default()
                            .insert(node.clone(), new);
                    }
                    if !joins.is_empty() || !leaves.is_empty() {
                        self.send_diff(&topic, json!({"joins": joins, "leaves": leaves}));
                    }
                }
                self.remote.retain(|_, nodes| !nodes.is_empty());
            }
            PhxCommand::NodeGone { node } => {
                let gone: Vec<(String, Map<String, Value>)> = self
                    .remote
                    .iter_mut()
                    .filter_map(|(t, nodes)| Some((t.clone(), nodes.remove(&node)?)))
                    .collect();
                self.remote.retain(|_, nodes| !nodes.is_empty());
                for (topic, leaves) in gone {
                    self.send_diff(&topic, json!({"joins": {}, "leaves": leaves}));
                }
            }
            PhxCommand::Snapshot { reply } => {
                let state = self
                    .topics
                    .iter()
                    .filter_map(|(name, t)| match presence_state(t) {
                        Value::Object(m) if !m.is_empty() => Some((name.clone(), m)),
                        _ => None,
                    })
                    .collect();
                let _ = reply.send(state);
            }
            PhxCommand::Untrack { session, topic } => {
                let left = self
                    .topics
                    .get_mut(&topic)
                    .and_then(|t| t.members.get_mut(&session))
                    .and_then(|m| Some((m.options.presence_key.clone(), m.tracked.take()?)));
                if let Some((key, meta)) = left {
                    self.diff(
                        &topic,
                        Map::new(),
                        [(key, vec![meta])].into_iter().collect(),
                    );
                }
            }
        }
    }

    fn join(&mut self, session: u64, topic: String, options: JoinOptions) {
        if self
            .topics
            .get(&topic)
            .is_some_and(|t| t.members.contains_key(&session))
        {
            self.leave(session, &topic);
        }
        let Some((_, topics)) = self.conns.get_mut(&session) else {
            return;
        };
        topics.insert(topic.clone());
        let presence = options.presence;
        let join_ref = options.join_ref.clone();
        let t = self.topics.entry(topic.clone()).or_default();
        t.members.insert(
            session,
            Member {
                options,
                tracked: None,
            },
        );
        if presence {
            let mut state = presence_state(t);
            if let (Value::Object(state), Some(nodes)) = (&mut state, self.remote.get(&topic)) {
                for keys in nodes.values() {
                    apply_joins(state, keys);
                }
            }
            self.send_presence(session, join_ref, &topic, "presence_state", state);
        }
    }

    fn leave(&mut self, session: u64, topic: &str) {
        if let Some((_, topics)) = self.conns.get_mut(&session) {
            topics.remove(topic);
        }
        let Some(t) = self.topics.get_mut(topic) else {
            return;
        };
        let Some(m) = t.members.remove(&session) else {
            return;
        };
        if t.members.is_empty() {
            self.topics.remove(topic);
            // No one here to tell; other nodes' members may be.
            if let (Some(bus), Some(meta)) = (&self.bus, m.tracked) {
                bus.announce(crate::hub::Announcement::PhoenixPresence {
                    topic: topic.to_owned(),
                    joins: Map::new(),
                    leaves: [(m.options.presence_key, json!({ "metas": [meta] }))]
                        .into_iter()
                        .collect(),
                });
            }
            return;
        }
        if let Some(meta) = m.tracked {
            let leaves = [(m.options.presence_key, vec![meta])].into_iter().collect();
            self.diff(topic, Map::new(), leaves);
        }
    }

    fn broadcast(&mut self, from: Sender, topic: &str, event: &str, payload: &BroadcastPayload) {
        if let (Some(bus), Sender::Member(_) | Sender::Api) = (&self.bus, from) {
            bus.announce(crate::hub::Announcement::Phoenix {
                topic: topic.to_owned(),
                event: event.to_owned(),
                payload: match payload {
                    BroadcastPayload::Json(v) => crate::hub::PhoenixPayload::Json(v.clone()),
                    BroadcastPayload::Binary(b) => crate::hub::PhoenixPayload::Binary(b.to_vec()),
                },
            });
        }
        let Some(t) = self.topics.get(topic) else {
            return;
        };
        let targets: Vec<u64> = t
            .members
            .iter()
            .filter(|(s, m)| from != Sender::Member(**s) || m.options.self_broadcast)
            .map(|(s, _)| *s)
            .collect();
        let mut v1: Option<Option<Outbound>> = None;
        let mut v2: Option<Option<Outbound>> = None;
        let json_frame = |vsn: Vsn| match payload {
            BroadcastPayload::Json(p) => Some(text(
                vsn,
                None,
                topic,
                "broadcast",
                json!({"type": "broadcast", "event": event, "payload": p}),
            )),
            // vsn 1.0.0 is JSON only: bytes cannot reach such a client.
            BroadcastPayload::Binary(_) => None,
        };
        metrics::counter!("aether_phoenix_broadcasts_total").increment(1);
        for s in targets {
            let Some((member, _)) = self.conns.get(&s) else {
                continue;
            };
            let frame = match member.vsn {
                Vsn::V1 => v1.get_or_insert_with(|| json_frame(Vsn::V1)).clone(),
                Vsn::V2 => v2
                    .get_or_insert_with(|| {
                        encode_user_broadcast(shown(topic), event, payload)
                            .map(Outbound::Binary)
                            .or_else(|| json_frame(Vsn::V2))
                    })
                    .clone(),
            };
            if let Some(f) = frame {
                self.deliver(s, f);
            }
        }
    }

    fn track(&mut self, session: u64, topic: &str, meta: Value) {
        self.next_ref += 1;
        let phx_ref = format!("F{}{:x}", self.ref_prefix, self.next_ref);
        let Some(m) = self
            .topics
            .get_mut(topic)
            .and_then(|t| t.members.get_mut(&session))
        else {
            return;
        };
        let mut meta = match meta {
            Value::Object(o) => o,
            Value::Null => Map::new(),
            other => [("value".to_owned(), other)].into_iter().collect(),
        };
        meta.remove("phx_ref_prev");
        let previous = m.tracked.take();
        if let Some(prev) = previous.as_ref().and_then(|p| p.get("phx_ref")) {
            meta.insert("phx_ref_prev".into(), prev.clone());
        }
        meta.insert("phx_ref".into(), json!(phx_ref));
        let meta = Value::Object(meta);
        m.tracked = Some(meta.clone());
        let key = m.options.presence_key.clone();
        // A re-track is two diffs, the leave of the old meta first: in one
        // diff realtime-js applies the join first, and its join callback strips
        // `phx_ref` from the metas already there, so the leave would miss.
        if let Some(prev) = previous {
            self.diff(
                topic,
                Map::new(),
                [(key.clone(), vec![prev])].into_iter().collect(),
            );
        }
        let joins = [(key, json!({ "metas": [meta] }))].into_iter().collect();
        self.diff(topic, joins, HashMap::new());
    }

    /// Sends `presence_diff {joins, leaves}` to the topic's presence members.
    fn diff(
        &mut self,
        topic: &str,
        joins: Map<String, Value>,
        leaves: HashMap<String, Vec<Value>>,
    ) {
        let leaves: Map<String, Value> = leaves
            .into_iter()
            .map(|(k, metas)| (k, json!({ "metas": metas })))
            .collect();
        if let Some(bus) = &self.bus {
            bus.announce(crate::hub::Announcement::PhoenixPresence {
                topic: topic.to_owned(),
                joins: joins.clone(),
                leaves: leaves.clone(),
            });
        }
        self.send_diff(topic, json!({"joins": joins, "leaves": leaves}));
    }

    /// `presence_diff` to the topic's presence members on this node.
    fn send_diff(&mut self, topic: &str, payload: Value) {
        let Some(t) = self.topics.get(topic) else {
            return;
        };
        let targets: Vec<(u64, Option<String>)> = t
            .members
            .iter()
            .filter(|(_, m)| m.options.presence)
            .map(|(s, m)| (*s, m.options.join_ref.clone()))
            .collect();
        for (s, join_ref) in targets {
            self.send_presence(s, join_ref, topic, "presence_diff", payload.clone());
        }
    }

    fn send_presence(
        &mut self,
        session: u64,
        join_ref: Option<String>,
        topic: &str,
        event: &str,
        payload: Value,
    ) {
        let Some((member, _)) = self.conns.get(&session) else {
            return;
        };
        let f = text(member.vsn, join_ref, topic, event, payload);
        self.deliver(session, f);
    }

    /// Queues a frame for one connection; a full queue closes it.
    fn deliver(&mut self, session: u64, frame: Outbound) {
        let Some((m, _)) = self.conns.get(&session) else {
            return;
        };
        super::offer(&m.tx, frame, "phoenix");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binary_frames() {
        // What realtime-js's Serializer._encodeUserBroadcastPush makes for
        // join_ref "1", ref "2", topic "realtime:r", event "ev", JSON {"a":1}.
        let mut push = vec![3u8, 1, 1, 10, 2, 0, 1];
        push.extend_from_slice(b"12realtime:rev{\"a\":1}");
        let p = decode_user_broadcast_push(&push).unwrap();
        assert_eq!(p.join_ref.as_deref(), Some("1"));
        assert_eq!(p.msg_ref.as_deref(), Some("2"));
        assert_eq!(p.topic, "realtime:r");
        assert_eq!(p.event, "ev");
        assert_eq!(p.payload, BroadcastPayload::Json(json!({"a": 1})));
        assert!(decode_user_broadcast_push(&push[..8]).is_none());

        let out = encode_user_broadcast("realtime:r", "ev", &p.payload).unwrap();
        let mut want = vec![4u8, 10, 2, 0, 1];
        want.extend_from_slice(b"realtime:rev{\"a\":1}");
        assert_eq!(&out[..], &want[..]);
        assert!(encode_user_broadcast(&"t".repeat(256), "ev", &p.payload).is_none());
    }

    fn member(hub: &mut PhxHub, session: u64, vsn: Vsn) -> aether_router::queue::QueueRx<Outbound> {
        let (tx, rx) = aether_router::queue::channel(16);
        hub.command(PhxCommand::Attach {
            session,
            member: PhxMember { tx, vsn },
        });
        rx
    }

    #[test]
    fn a_full_queue_closes_only_that_member() {
        let mut hub = PhxHub::default();
        let (tx, slow) = aether_router::queue::channel(1);
        hub.command(PhxCommand::Attach {
            session: 1,
            member: PhxMember { tx, vsn: Vsn::V2 },
        });
        let mut fast = member(&mut hub, 2, Vsn::V2);
        for s in [1, 2] {
            let options = JoinOptions {
                join_ref: None,
                self_broadcast: false,
                presence: false,
                presence_key: s.to_string(),
            };
            hub.command(PhxCommand::Join {
                session: s,
                topic: "t".into(),
                options,
            });
        }
        for n in 0..3 {
            hub.command(PhxCommand::Broadcast {
                from: Sender::Api,
                topic: "t".into(),
                event: "e".into(),
                payload: BroadcastPayload::Json(json!(n)),
            });
        }
        assert_eq!(
            slow.closing(),
            Some(aether_router::queue::Signal::Overflowed)
        );
        let mut got = 0;
        while let Ok(Outbound::Binary(_)) = fast.try_recv() {
            got += 1;
        }
        assert_eq!(got, 3);
    }

    fn texts(rx: &mut aether_router::queue::QueueRx<Outbound>) -> Vec<Value> {
        let mut out = Vec::new();
        while let Ok(m) = rx.try_recv() {
            if let Outbound::Frame(t) = m {
                out.push(serde_json::from_str(&t).unwrap());
            }
        }
        out
    }

    #[test]
    fn presence_track_update_leave() {
        let mut hub = PhxHub::default();
        let mut a = member(&mut hub, 1, Vsn::V1);
        let mut b = member(&mut hub, 2, Vsn::V1);
        let opts = |r: &str, k: &str| JoinOptions {
            join_ref: Some(r.into()),
            self_broadcast: false,
            presence: true,
            presence_key: k.into(),
        };
        hub.command(PhxCommand::Join {
            session: 1,
            topic: "t".into(),
            options: opts("1", "a"),
        });
        hub.command(PhxCommand::Track {
            session: 1,
            topic: "t".into(),
            meta: json!({"x": 1}),
        });
        hub.command(PhxCommand::Join {
            session: 2,
            topic: "t".into(),
            options: opts("5", "b"),
        });
        let got = texts(&mut b);
        assert_eq!(got[0]["event"], "presence_state");
        assert_eq!(got[0]["join_ref"], "5");
        assert_eq!(got[0]["payload"]["a"]["metas"][0]["x"], 1);
        hub.command(PhxCommand::Track {
            session: 1,
            topic: "t".into(),
            meta: json!({"x": 2}),
        });
        let got = texts(&mut b);
        let (leave, join) = (&got[0]["payload"], &got[1]["payload"]);
        assert_eq!(leave["leaves"]["a"]["metas"][0]["x"], 1);
        assert_eq!(leave["joins"], json!({}));
        assert_eq!(join["joins"]["a"]["metas"][0]["x"], 2);
        assert_eq!(
            join["joins"]["a"]["metas"][0]["phx_ref_prev"],
            leave["leaves"]["a"]["metas"][0]["phx_ref"]
        );
        hub.command(PhxCommand::Detach { session: 1 });
        let got = texts(&mut b);
        assert_eq!(got[0]["payload"]["leaves"]["a"]["metas"][0]["x"], 2);
        assert_eq!(texts(&mut a).len(), 4, "state, diff, two diffs");
    }
}
