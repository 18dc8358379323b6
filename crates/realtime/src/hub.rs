//! Channels of the Aether WebSocket API: membership, relay, and per-channel order.
//!
//! One task owns every channel, so each channel's messages reach its members in
//! one order (the `server_sequence` in the relayed metadata). Relays use `try_send`
//! into the members' bounded queues: a member whose queue is full is closed as a
//! slow consumer instead of holding up the channel.

use std::collections::{HashMap, HashSet, VecDeque};
use std::num::NonZeroU32;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use serde_json::{Value, json};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use aether_router::Outbound;

/// A channel's settings, from `aether.channels` (absent: defaults).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct ChannelConfig {
    pub max_connections: Option<u32>,
    pub message_rate_limit: Option<u32>,
    pub require_auth: bool,
}

pub type ChannelConfigs = Arc<RwLock<HashMap<String, ChannelConfig>>>;

pub fn valid_channel_name(name: &str) -> bool {
    let mut bytes = name.bytes();
    matches!(bytes.next(), Some(b) if b.is_ascii_alphanumeric())
        && name.len() <= 128
        && bytes.all(|b| b.is_ascii_alphanumeric() || matches!(b, b':' | b'.' | b'_' | b'-'))
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HubError {
    #[error(
        "channel name must be 1-128 of letters, digits, ':', '.', '_', '-' (starting with a letter or digit)"
    )]
    InvalidChannel,
    #[error("channel {0:?} requires an authenticated connection")]
    AuthRequired(String),
    #[error("channel {0:?} is full ({1} connections)")]
    ChannelFull(String, u32),
    #[error("not a member of channel {0:?}: join it first")]
    NotMember(String),
    #[error("message rate limit for channel {0:?} exceeded ({1} per {2} s)")]
    RateLimited(String, u32, u64),
    #[error("this connection is already in {0} channels, the most allowed; leave one first")]
    TooManyChannels(usize),
    #[error("the channel service is unavailable")]
    Unavailable,
}

impl HubError {
    pub fn code(&self) -> &'static str {
        match self {
            HubError::InvalidChannel => "invalid_channel",
            HubError::AuthRequired(_) => "auth_required",
            HubError::ChannelFull(..) => "channel_full",
            HubError::NotMember(_) => "not_a_member",
            HubError::RateLimited(..) => "rate_limited",
            HubError::TooManyChannels(_) => "too_many_channels",
            HubError::Unavailable => "internal_error",
        }
    }
}

/// A connection as the hub knows it.
#[derive(Clone)]
pub struct Member {
    pub tx: aether_router::queue::QueueTx<Outbound>,
    pub client_id: Arc<str>,
    /// Whose retries and rate budget this is: the connection's user key (user id,
    /// `service_role`, or `anon:<address>`) with the client id, so another user
    /// naming the same client id cannot suppress or throttle this one's messages.
    pub sender_key: Arc<str>,
    pub user_id: Option<Arc<str>>,
    pub authenticated: bool,
}

#[derive(Debug, PartialEq, Eq)]
pub enum SendOutcome {
    Relayed {
        server_sequence: u64,
    },
    /// Already relayed for this `(client_id, sequence)`: not relayed again.
    Duplicate,
}

pub struct Message {
    pub channel: String,
    pub content: Value,
    pub sequence: Option<i64>,
    pub timestamp: Option<String>,
}

/// Carries channel traffic between the nodes of a cluster. With a bus, the hub
/// numbers nothing itself: a relayed message goes to the bus, which gives every
/// channel one order and one numbering across nodes, and reaches this node's
/// members when it comes back as [`HubCommand::Numbered`]. Joins, leaves and
/// system broadcasts are announced to the other nodes as they happen here.
pub trait ChannelBus: Send + Sync + 'static {
    /// Publishes a message; `reply` (a member's send) gets its number, or
    /// [`SendOutcome::Duplicate`] when another node already relayed it.
    fn publish(
        &self,
        message: Relayed,
        reply: Option<oneshot::Sender<Result<SendOutcome, HubError>>>,
    );
    /// Tells the other nodes, not this one.
    fn announce(&self, event: Announcement);
}

/// A message in a channel's order, as it travels between nodes.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Relayed {
    pub channel: String,
    pub content: Value,
    pub client_id: Option<String>,
    pub user_id: Option<String>,
    pub sequence: Option<i64>,
    pub timestamp: String,
    pub event: Option<String>,
    /// The same message sent twice (a client's retry on another node, the
    /// database's message seen by every node) has the same key.
    pub dedup: Option<String>,
}

/// What other nodes' members hear of without it being numbered.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Announcement {
    /// A member joined (`connect`) or left (`disconnect`) a channel.
    Connection {
        action: String,
        channel: String,
        client_id: String,
        user_id: Option<String>,
    },
    /// An operator's broadcast, to a channel or to everyone.
    System {
        channel: Option<String>,
        message: String,
        severity: String,
    },
    /// A Supabase Realtime broadcast from a member or the REST API.
    Phoenix {
        topic: String,
        event: String,
        payload: PhoenixPayload,
    },
    /// A presence diff of this node's members (`{key: {metas: [...]}}`).
    PhoenixPresence {
        topic: String,
        joins: serde_json::Map<String, Value>,
        leaves: serde_json::Map<String, Value>,
    },
    /// Everything this node's members track, by topic (the answer to a
    /// [`Announcement::Sync`]).
    PhoenixSnapshot {
        state: HashMap<String, serde_json::Map<String, Value>>,
    },
    /// A KingShare notification (upload progress, presence, an operator's
    /// notification) to a user's connections, or to all.
    KingShare { user: Option<String>, frame: String },
    /// This node's connections of a user key now (0: none).
    Connections { user_key: String, count: usize },
    /// All this node's connections per user key (the answer to a `Sync`).
    ConnectionsSnapshot { counts: HashMap<String, usize> },
    /// A node (re)joined the bus: the others send their snapshots.
    Sync,
    /// A node is alive; one not heard from for a while is gone, and so are its
    /// members' presences.
    Alive,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PhoenixPayload {
    Json(Value),
    /// realtime-js's binary payload, as bytes.
    Binary(Vec<u8>),
}

/// Who a relayed message is from: a member (its client id, user and own
/// sequence) or the database (no client; the message's event).
struct Origin<'a> {
    client_id: Option<&'a str>,
    user_id: Option<&'a str>,
    sequence: Option<i64>,
    timestamp: Option<String>,
    event: Option<&'a str>,
}

pub enum HubCommand {
    Attach {
        session: u64,
        member: Member,
    },
    Detach {
        session: u64,
    },
    Join {
        session: u64,
        channel: String,
        reply: oneshot::Sender<Result<(), HubError>>,
    },
    Leave {
        session: u64,
        channel: String,
        reply: oneshot::Sender<Result<(), HubError>>,
    },
    Send {
        session: u64,
        message: Message,
        reply: oneshot::Sender<Result<SendOutcome, HubError>>,
    },
    Broadcast {
        channel: Option<String>,
        message: String,
        severity: String,
    },
    Authenticated {
        session: u64,
        user_id: Arc<str>,
    },
    /// A message from the database (`realtime.send`): relayed to the
    /// channel's members like a client's, from no client.
    FromDatabase {
        channel: String,
        event: String,
        content: Value,
        /// The change it came in: the same on every node of a cluster.
        id: String,
        /// When its transaction committed (ms since the epoch).
        committed_ms: i64,
    },
    /// A message numbered by the cluster's bus: delivered to this node's members.
    Numbered {
        message: Relayed,
        server_sequence: u64,
    },
    /// Another node's join, leave or system broadcast.
    Announced(Announcement),
    Stats {
        reply: oneshot::Sender<HubStats>,
    },
}

#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct HubStats {
    pub active: usize,
    pub messages_per_second: f64,
    pub messages_total: u64,
    pub members: HashMap<String, usize>,
}

struct Channel {
    members: HashSet<u64>,
    next_sequence: u64,
}

/// In a cluster, a database message this old when a node decodes it is left
/// to the nodes that were not behind (the bus's de-duplication window is 120 s).
const DATABASE_MESSAGE_MAX_AGE_MS: i64 = 100_000;

const DEDUP_PER_CLIENT: usize = 1024;
const DEDUP_CLIENTS: usize = 100_000;

#[derive(Default)]
struct Dedup {
    seen: HashSet<i64>,
    order: VecDeque<i64>,
}

pub struct Hub {
    members: HashMap<u64, (Member, HashSet<String>)>,
    channels: HashMap<String, Channel>,
    configs: ChannelConfigs,
    default_rate: u32,
    window: Duration,
    limiters: HashMap<String, (u32, DefaultKeyedRateLimiter<Arc<str>>)>,
    dedup: HashMap<Arc<str>, Dedup>,
    dedup_order: VecDeque<Arc<str>>,
    messages_total: u64,
    rate: f64,
    last_total: u64,
    /// Channels one connection may be in at once.
    max_channels: usize,
    /// Cluster mode: the other nodes, and the channels' one numbering.
    bus: Option<Arc<dyn ChannelBus>>,
}

fn frame(v: Value) -> Outbound {
    Outbound::Frame(Arc::from(v.to_string()))
}

fn connection_frame(action: &str, member: &Member, channel: &str) -> Value {
    json!({"type": "connection", "action": action, "data": {
        "client_id": &*member.client_id,
        "user_id": member.user_id.as_deref(),
        "channel": channel,
    }})
}

impl Hub {
    pub fn new(configs: ChannelConfigs, default_rate: u32, window: Duration) -> Self {
        Hub {
            members: HashMap::new(),
            channels: HashMap::new(),
            configs,
            default_rate: default_rate.max(1),
            window,
            limiters: HashMap::new(),
            dedup: HashMap::new(),
            dedup_order: VecDeque::new(),
            messages_total: 0,
            rate: 0.0,
            last_total: 0,
            max_channels: usize::MAX,
            bus: None,
        }
    }

    /// Cluster mode: relays and announcements go through `bus`.
    pub fn bus(mut self, bus: Arc<dyn ChannelBus>) -> Self {
        self.bus = Some(bus);
        self
    }

    /// Caps the channels one connection may be in at once (`WS_MAX_SUBSCRIPTIONS`).
    pub fn max_channels(mut self, n: usize) -> Self {
        self.max_channels = n.max(1);
        self
    }

    pub async fn run(
        mut self,
        mut commands: mpsc::Receiver<HubCommand>,
        shutdown: CancellationToken,
    ) {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                cmd = commands.recv() => match cmd {
                    Some(cmd) => self.command(cmd),
                    None => break,
                },
                _ = tick.tick() => {
                    // Messages per second, smoothed over about ten seconds.
                    let delta = (self.messages_total - self.last_total) as f64;
                    self.last_total = self.messages_total;
                    self.rate = 0.9 * self.rate + 0.1 * delta;
                    self.prune_limiters();
                }
            }
        }
    }

    fn config(&self, channel: &str) -> ChannelConfig {
        self.configs
            .read()
            .ok()
            .and_then(|c| c.get(channel).cloned())
            .unwrap_or_default()
    }

    fn command(&mut self, cmd: HubCommand) {
        match cmd {
            HubCommand::Attach { session, member } => {
                self.members.insert(session, (member, HashSet::new()));
            }
            HubCommand::Detach { session } => {
                if let Some((member, channels)) = self.members.remove(&session) {
                    for ch in channels {
                        self.remove_member(session, &member, &ch);
                    }
                }
            }
            HubCommand::Join {
                session,
                channel,
                reply,
            } => {
                let _ = reply.send(self.join(session, channel));
            }
            HubCommand::Leave {
                session,
                channel,
                reply,
            } => {
                let _ = reply.send(self.leave(session, &channel));
            }
            HubCommand::FromDatabase {
                channel,
                event,
                content,
                id,
                committed_ms,
            } => self.relay_from_database(&channel, &event, content, id, committed_ms),
            HubCommand::Send {
                session,
                message,
                reply,
            } => match (self.relay(session, message), &self.bus) {
                (Ok(Relay::ToBus(m)), Some(bus)) => bus.publish(m, Some(reply)),
                (Ok(Relay::ToBus(_)), None) => {
                    let _ = reply.send(Err(HubError::Unavailable));
                }
                (Ok(Relay::Done(outcome)), _) => {
                    let _ = reply.send(Ok(outcome));
                }
                (Err(e), _) => {
                    let _ = reply.send(Err(e));
                }
            },
            HubCommand::Numbered {
                message,
                server_sequence,
            } => {
                self.deliver_numbered(&message, server_sequence);
            }
            HubCommand::Announced(a) => self.announced(a),
            HubCommand::Broadcast {
                channel,
                message,
                severity,
            } => {
                if let Some(bus) = &self.bus {
                    bus.announce(Announcement::System {
                        channel: channel.clone(),
                        message: message.clone(),
                        severity: severity.clone(),
                    });
                }
                self.system_broadcast(channel, message, severity);
            }
            HubCommand::Authenticated { session, user_id } => {
                if let Some((m, _)) = self.members.get_mut(&session) {
                    m.user_id = Some(user_id);
                    m.authenticated = true;
                }
            }
            HubCommand::Stats { reply } => {
                let _ = reply.send(HubStats {
                    active: self.channels.len(),
                    messages_per_second: (self.rate * 100.0).round() / 100.0,
                    messages_total: self.messages_total,
                    members: self
                        .channels
                        .iter()
                        .map(|(k, c)| (k.clone(), c.members.len()))
                        .collect(),
                });
            }
        }
    }

    fn join(&mut self, session: u64, channel: String) -> Result<(), HubError> {
        if !valid_channel_name(&channel) {
            return Err(HubError::InvalidChannel);
        }
        let cfg = self.config(&channel);
        let Some((member, joined)) = self.members.get(&session) else {
            return Err(HubError::Unavailable);
        };
        if joined.contains(&channel) {
            // Joining twice is harmless: confirm again.
            let _ = member
                .tx
                .try_send(frame(connection_frame("connect", member, &channel)));
            return Ok(());
        }
        if cfg.require_auth && !member.authenticated {
            return Err(HubError::AuthRequired(channel));
        }
        if joined.len() >= self.max_channels {
            return Err(HubError::TooManyChannels(self.max_channels));
        }
        let current = self.channels.get(&channel).map_or(0, |c| c.members.len());
        if let Some(max) = cfg.max_connections
            && current >= max as usize
        {
            return Err(HubError::ChannelFull(channel, max));
        }
        let announce: Arc<str> =
            Arc::from(connection_frame("connect", member, &channel).to_string());
        let channel_name = channel.clone();
        let ch = self
            .channels
            .entry(channel.clone())
            .or_insert_with(|| Channel {
                members: HashSet::new(),
                next_sequence: 1,
            });
        let others: Vec<u64> = ch.members.iter().copied().collect();
        ch.members.insert(session);
        if let Some((_, joined)) = self.members.get_mut(&session) {
            joined.insert(channel);
        }
        // The joiner's confirmation first, then everyone else hears of it.
        self.deliver(session, Outbound::Frame(Arc::clone(&announce)));
        for s in others {
            self.deliver(s, Outbound::Frame(Arc::clone(&announce)));
        }
        if let Some((member, _)) = self.members.get(&session) {
            self.announce_connection("connect", member, &channel_name);
        }
        Ok(())
    }

    fn leave(&mut self, session: u64, channel: &str) -> Result<(), HubError> {
        let Some((member, joined)) = self.members.get_mut(&session) else {
            return Err(HubError::Unavailable);
        };
        if !joined.remove(channel) {
            return Err(HubError::NotMember(channel.to_owned()));
        }
        let confirm = frame(connection_frame("disconnect", member, channel));
        let _ = member.tx.try_send(confirm);
        let member = member.clone();
        self.remove_member(session, &member, channel);
        Ok(())
    }

    fn remove_member(&mut self, session: u64, member: &Member, channel: &str) {
        let Some(ch) = self.channels.get_mut(channel) else {
            return;
        };
        ch.members.remove(&session);
        let rest: Vec<u64> = ch.members.iter().copied().collect();
        if ch.members.is_empty() {
            self.channels.remove(channel);
        }
        let f: Arc<str> = Arc::from(connection_frame("disconnect", member, channel).to_string());
        for s in rest {
            self.deliver(s, Outbound::Frame(Arc::clone(&f)));
        }
        self.announce_connection("disconnect", member, channel);
    }

    /// Channel names and client ids are chosen by clients: forget limiter state
    /// that no longer limits anything, so it cannot grow without bound.
    fn prune_limiters(&mut self) {
        let channels = &self.channels;
        self.limiters.retain(|name, (_, limiter)| {
            limiter.retain_recent();
            limiter.shrink_to_fit();
            channels.contains_key(name) || !limiter.is_empty()
        });
    }

    fn rate_limited(&mut self, channel: &str, client: &Arc<str>) -> Option<HubError> {
        let limit = self
            .config(channel)
            .message_rate_limit
            .unwrap_or(self.default_rate)
            .max(1);
        let window = self.window;
        let entry = self.limiters.entry(channel.to_owned());
        let (l, limiter) = entry.or_insert_with(|| (limit, keyed_limiter(limit, window)));
        if *l != limit {
            *l = limit;
            *limiter = keyed_limiter(limit, window);
        }
        limiter
            .check_key(client)
            .err()
            .map(|_| HubError::RateLimited(channel.to_owned(), limit, window.as_secs()))
    }

    fn relay(&mut self, session: u64, m: Message) -> Result<Relay, HubError> {
        let (client_id, sender, user_id) = match self.members.get(&session) {
            Some((member, joined)) if joined.contains(&m.channel) => (
                Arc::clone(&member.client_id),
                Arc::clone(&member.sender_key),
                member.user_id.clone(),
            ),
            Some(_) => return Err(HubError::NotMember(m.channel)),
            None => return Err(HubError::Unavailable),
        };
        // With a bus, the bus de-duplicates (across nodes, and only what it
        // relayed: a send it failed may be retried).
        if self.bus.is_none()
            && let Some(seq) = m.sequence
            && self
                .dedup
                .get(&sender)
                .is_some_and(|d| d.seen.contains(&seq))
        {
            return Ok(Relay::Done(SendOutcome::Duplicate));
        }
        if let Some(e) = self.rate_limited(&m.channel, &sender) {
            return Err(e);
        }
        if self.bus.is_none()
            && let Some(seq) = m.sequence
        {
            self.remember(&sender, seq);
        }
        metrics::counter!("aether_channel_messages_in_total").increment(1);
        if self.bus.is_some() {
            return Ok(Relay::ToBus(Relayed {
                dedup: m.sequence.map(|seq| format!("{sender}/{seq}")),
                channel: m.channel,
                content: m.content,
                client_id: Some(client_id.to_string()),
                user_id: user_id.map(|u| u.to_string()),
                sequence: m.sequence,
                timestamp: m.timestamp.unwrap_or_else(now),
                event: None,
            }));
        }
        let origin = Origin {
            client_id: Some(&client_id),
            user_id: user_id.as_deref(),
            sequence: m.sequence,
            timestamp: m.timestamp,
            event: None,
        };
        let Some(server_sequence) = self.publish(&m.channel, m.content, origin) else {
            return Err(HubError::NotMember(m.channel));
        };
        Ok(Relay::Done(SendOutcome::Relayed { server_sequence }))
    }

    /// A message the bus numbered: to this node's members of its channel.
    fn deliver_numbered(&mut self, m: &Relayed, server_sequence: u64) {
        let Some(ch) = self.channels.get(&m.channel) else {
            return;
        };
        let targets: Vec<u64> = ch.members.iter().copied().collect();
        let f = message_frame(
            &m.channel,
            &m.content,
            Origin {
                client_id: m.client_id.as_deref(),
                user_id: m.user_id.as_deref(),
                sequence: m.sequence,
                timestamp: Some(m.timestamp.clone()),
                event: m.event.as_deref(),
            },
            server_sequence,
        );
        self.messages_total += 1;
        metrics::counter!("aether_channel_messages_out_total").increment(targets.len() as u64);
        for s in targets {
            self.deliver(s, Outbound::Frame(Arc::clone(&f)));
        }
    }

    /// Another node's join, leave or system broadcast, for this node's members.
    fn announced(&mut self, a: Announcement) {
        match a {
            Announcement::Connection {
                action,
                channel,
                client_id,
                user_id,
            } => {
                let Some(ch) = self.channels.get(&channel) else {
                    return;
                };
                let targets: Vec<u64> = ch.members.iter().copied().collect();
                let f: Arc<str> = Arc::from(
                    json!({"type": "connection", "action": action, "data": {
                        "client_id": client_id, "user_id": user_id, "channel": channel,
                    }})
                    .to_string(),
                );
                for s in targets {
                    self.deliver(s, Outbound::Frame(Arc::clone(&f)));
                }
            }
            Announcement::System {
                channel,
                message,
                severity,
            } => self.system_broadcast(channel, message, severity),
            // The bus gives these to the Phoenix hub, or handles them itself.
            Announcement::Phoenix { .. }
            | Announcement::PhoenixPresence { .. }
            | Announcement::PhoenixSnapshot { .. }
            | Announcement::KingShare { .. }
            | Announcement::Connections { .. }
            | Announcement::ConnectionsSnapshot { .. }
            | Announcement::Sync
            | Announcement::Alive => {}
        }
    }

    fn announce_connection(&self, action: &str, member: &Member, channel: &str) {
        if let Some(bus) = &self.bus {
            bus.announce(Announcement::Connection {
                action: action.into(),
                channel: channel.into(),
                client_id: member.client_id.to_string(),
                user_id: member.user_id.as_deref().map(str::to_owned),
            });
        }
    }

    fn system_broadcast(&mut self, channel: Option<String>, message: String, severity: String) {
        let mut data = json!({"message": message, "severity": severity});
        if let Some(ch) = &channel {
            data["channel"] = json!(ch);
        }
        let f: Arc<str> =
            Arc::from(json!({"type": "system", "action": "broadcast", "data": data}).to_string());
        let targets: Vec<u64> = match &channel {
            Some(ch) => self
                .channels
                .get(ch)
                .map(|c| c.members.iter().copied().collect())
                .unwrap_or_default(),
            None => self.members.keys().copied().collect(),
        };
        for s in targets {
            self.deliver(s, Outbound::Frame(Arc::clone(&f)));
        }
    }

    /// Relays a database message to `channel`'s members, from no client; a
    /// channel no one has joined has no one to tell.
    fn relay_from_database(
        &mut self,
        channel: &str,
        event: &str,
        content: Value,
        id: String,
        committed_ms: i64,
    ) {
        if let Some(bus) = &self.bus {
            // Every node publishes it and the bus keeps one, within its
            // two-minute de-duplication window: a node further behind than
            // that leaves it to the others rather than relaying it twice.
            let age_ms = chrono::Utc::now().timestamp_millis() - committed_ms;
            if age_ms > DATABASE_MESSAGE_MAX_AGE_MS {
                metrics::counter!("aether_database_broadcasts_too_old_total").increment(1);
                return;
            }
            // Every node decodes it: the bus keeps one of them.
            bus.publish(
                Relayed {
                    channel: channel.into(),
                    content,
                    client_id: None,
                    user_id: None,
                    sequence: None,
                    timestamp: now(),
                    event: Some(event.into()),
                    dedup: Some(format!("db/{id}")),
                },
                None,
            );
            return;
        }
        let origin = Origin {
            client_id: None,
            user_id: None,
            sequence: None,
            timestamp: None,
            event: Some(event),
        };
        self.publish(channel, content, origin);
    }

    /// Numbers `content` in `channel`'s one order and queues it for every
    /// member; the number, or `None` when the channel has no members.
    fn publish(&mut self, channel: &str, content: Value, from: Origin<'_>) -> Option<u64> {
        let ch = self.channels.get_mut(channel)?;
        let server_sequence = ch.next_sequence;
        ch.next_sequence += 1;
        let targets: Vec<u64> = ch.members.iter().copied().collect();
        let f = message_frame(channel, &content, from, server_sequence);
        self.messages_total += 1;
        metrics::counter!("aether_channel_messages_out_total").increment(targets.len() as u64);
        for s in targets {
            self.deliver(s, Outbound::Frame(Arc::clone(&f)));
        }
        Some(server_sequence)
    }

    fn remember(&mut self, client: &Arc<str>, seq: i64) {
        if !self.dedup.contains_key(client) {
            if self.dedup.len() >= DEDUP_CLIENTS
                && let Some(old) = self.dedup_order.pop_front()
            {
                self.dedup.remove(&old);
            }
            self.dedup_order.push_back(Arc::clone(client));
        }
        let d = self.dedup.entry(Arc::clone(client)).or_default();
        if d.seen.insert(seq) {
            d.order.push_back(seq);
            if d.order.len() > DEDUP_PER_CLIENT
                && let Some(old) = d.order.pop_front()
            {
                d.seen.remove(&old);
            }
        }
    }

    /// Queues a frame for one connection; a full queue closes it.
    fn deliver(&mut self, session: u64, out: Outbound) {
        let Some((m, _)) = self.members.get(&session) else {
            return;
        };
        super::offer(&m.tx, out, "channel");
    }
}

/// What [`Hub::relay`] leaves to do.
enum Relay {
    Done(SendOutcome),
    /// Cluster mode: the bus numbers and delivers it.
    ToBus(Relayed),
}

fn now() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// A relayed message's frame, shared by every member it goes to.
fn message_frame(
    channel: &str,
    content: &Value,
    from: Origin<'_>,
    server_sequence: u64,
) -> Arc<str> {
    let timestamp = from.timestamp.unwrap_or_else(now);
    let mut metadata = json!({
        "sequence": from.sequence, "timestamp": timestamp, "server_sequence": server_sequence,
    });
    if let Some(event) = from.event {
        metadata["event"] = json!(event);
    }
    Arc::from(
        json!({"type": "message", "action": "send", "data": {
            "content": content,
            "channel": channel,
            "client_id": from.client_id,
            "user_id": from.user_id,
            "metadata": metadata,
        }})
        .to_string(),
    )
}

fn keyed_limiter(limit: u32, window: Duration) -> DefaultKeyedRateLimiter<Arc<str>> {
    let n = NonZeroU32::new(limit).unwrap_or(NonZeroU32::MIN);
    let period = (window / n.get()).max(Duration::from_nanos(1));
    let quota = Quota::with_period(period)
        .map(|q| q.allow_burst(n))
        .unwrap_or_else(|| Quota::per_second(n));
    // On the shared clock: a clock of its own would ask the CPU (`cpuid`)
    // for every channel joined.
    RateLimiter::new(quota, Default::default(), crate::engine::clock())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limiter_state_of_gone_channels_is_forgotten() {
        let configs: ChannelConfigs = Arc::default();
        let mut hub = Hub::new(configs, 5, Duration::from_millis(50));
        let client: Arc<str> = Arc::from("c");
        assert!(hub.rate_limited("gone", &client).is_none());
        hub.prune_limiters();
        // Still limiting (the burst is not refilled yet): kept.
        assert_eq!(hub.limiters.len(), 1);
        // Refill is wall-clock: once the window passes, the state is indistinguishable
        // from fresh and the channel is gone, so it is dropped.
        std::thread::sleep(Duration::from_millis(60));
        hub.prune_limiters();
        assert!(hub.limiters.is_empty());
    }

    #[test]
    fn a_connection_cannot_join_more_channels_than_allowed() {
        let mut hub = Hub::new(Arc::default(), 5, Duration::from_secs(1)).max_channels(2);
        let (tx, _rx) = aether_router::queue::channel(64);
        hub.members.insert(
            1,
            (
                Member {
                    tx,
                    client_id: Arc::from("c"),
                    sender_key: Arc::from("u/c"),
                    user_id: None,
                    authenticated: true,
                },
                HashSet::new(),
            ),
        );
        assert!(hub.join(1, "a".into()).is_ok());
        assert!(hub.join(1, "b".into()).is_ok());
        // Joining again is not a new channel.
        assert!(hub.join(1, "a".into()).is_ok());
        assert!(matches!(
            hub.join(1, "c".into()),
            Err(HubError::TooManyChannels(2))
        ));
        assert!(hub.leave(1, "a").is_ok());
        assert!(hub.join(1, "c".into()).is_ok());
    }

    #[test]
    fn channel_names() {
        assert!(valid_channel_name("main"));
        assert!(valid_channel_name("room:42.a_b-c"));
        assert!(!valid_channel_name(""));
        assert!(!valid_channel_name("-x"));
        assert!(!valid_channel_name("a b"));
        assert!(!valid_channel_name(&"a".repeat(129)));
    }
}
