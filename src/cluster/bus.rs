//! Channel traffic between the nodes of a cluster (`aether_realtime::hub`'s
//! [`ChannelBus`]).
//!
//! - **Relayed messages** go through a JetStream stream (in memory: channel
//!   messages are not replayed, in one node or several), one subject per
//!   channel. The publishing node numbers a message one past the channel's last
//!   and publishes it expecting that last message's subject sequence: two nodes
//!   numbering at once cannot both succeed, and the loser renumbers. So every
//!   channel has one order and one gapless numbering (`server_sequence`) across
//!   nodes. `Nats-Msg-Id` is the sender and its `sequence` (or the database
//!   change), so a retry on another node, or a database message every node
//!   decodes, is relayed once. Every node reads the stream and delivers to its
//!   own members.
//! - **Announcements** (joins, leaves, operators' broadcasts) are plain NATS
//!   messages: they are not numbered, and a node that misses one while NATS is
//!   away misses what a member would miss while reconnecting.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::{self, context::PublishErrorKind, message::PublishMessage, stream};
use futures_util::StreamExt;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;

use aether_realtime::hub::{
    Announcement, ChannelBus, HubCommand, HubError, PhoenixPayload, Relayed, SendOutcome,
};
use aether_realtime::phoenix_hub::{BroadcastPayload, PhxCommand, Sender};

const NUMBER: &str = "Aether-Number";
/// Channels whose last number is remembered (beyond it, it is read again).
const CACHED_CHANNELS: usize = 10_000;
/// Renumbering attempts when other nodes keep winning.
const ATTEMPTS: usize = 8;
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

type Reply = oneshot::Sender<Result<SendOutcome, HubError>>;

enum Out {
    Publish(Relayed, Option<Reply>),
    Announce(Announcement),
}

/// The hub's side: hands work to the bus's tasks without waiting.
pub(crate) struct NatsChannelBus {
    out: mpsc::Sender<Out>,
}

impl ChannelBus for NatsChannelBus {
    fn publish(&self, message: Relayed, reply: Option<Reply>) {
        if let Err(mpsc::error::TrySendError::Full(Out::Publish(_, Some(reply)))) =
            self.out.try_send(Out::Publish(message, reply))
        {
            let _ = reply.send(Err(HubError::Unavailable));
        }
    }

    fn announce(&self, event: Announcement) {
        if self.out.try_send(Out::Announce(event)).is_err() {
            // NATS cannot keep up: the other nodes miss it (as a member would
            // while reconnecting); counted, never waited for.
            metrics::counter!("aether_cluster_announcements_dropped_total").increment(1);
        }
    }
}

/// Where a cluster's channel traffic goes.
#[derive(Clone)]
pub(crate) struct Subjects {
    stream: String,
    messages: String,
    announcements: String,
    node: String,
}

impl Subjects {
    pub(crate) fn new(slot: &str, node: &str) -> Subjects {
        let slot: String = slot
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
            .collect();
        Subjects {
            stream: format!("AETHER_CH_{slot}"),
            messages: format!("aether.ch.{slot}"),
            announcements: format!("aether.ev.{slot}"),
            node: node.to_owned(),
        }
    }

    /// A channel's subject: its name in hex (names may hold `.`, a subject
    /// separator).
    fn channel(&self, name: &str) -> String {
        let mut s = String::with_capacity(self.messages.len() + 1 + 2 * name.len());
        s.push_str(&self.messages);
        s.push('.');
        for b in name.bytes() {
            s.push_str(&format!("{b:02x}"));
        }
        s
    }
}

#[derive(serde::Serialize, serde::Deserialize)]
struct Envelope {
    node: String,
    event: Announcement,
}

/// The bus and its two tasks: `outgoing` publishes, `incoming` delivers what
/// every node published to this node's hub.
pub(crate) fn start(
    client: async_nats::Client,
    subjects: Subjects,
    hubs: Hubs,
    reconnects: watch::Receiver<u64>,
    shutdown: CancellationToken,
) -> (
    Arc<NatsChannelBus>,
    impl std::future::Future<Output = ()> + Send + 'static,
    impl std::future::Future<Output = ()> + Send + 'static,
) {
    let (tx, rx) = mpsc::channel(4096);
    let js = jetstream::new(client.clone());
    let outgoing = outgoing(
        js.clone(),
        client.clone(),
        subjects.clone(),
        rx,
        shutdown.clone(),
    );
    let incoming = incoming(js, client, subjects, hubs, reconnects, shutdown);
    (Arc::new(NatsChannelBus { out: tx }), outgoing, incoming)
}

async fn ensure_stream(
    js: &jetstream::Context,
    subjects: &Subjects,
) -> anyhow::Result<stream::Stream> {
    let config = stream::Config {
        name: subjects.stream.clone(),
        subjects: vec![format!("{}.*", subjects.messages)],
        storage: stream::StorageType::Memory,
        max_age: Duration::from_secs(600),
        max_bytes: 256 << 20,
        discard: stream::DiscardPolicy::Old,
        duplicate_window: Duration::from_secs(120),
        ..Default::default()
    };
    Ok(tokio::time::timeout(REQUEST_TIMEOUT, js.get_or_create_stream(config)).await??)
}

async fn outgoing(
    js: jetstream::Context,
    client: async_nats::Client,
    subjects: Subjects,
    mut rx: mpsc::Receiver<Out>,
    shutdown: CancellationToken,
) {
    // Channel → (subject sequence, number) of its last message.
    let mut last: HashMap<String, (u64, u64)> = HashMap::new();
    let mut stream: Option<stream::Stream> = None;
    loop {
        let out = tokio::select! {
            biased;
            _ = shutdown.cancelled() => return,
            out = rx.recv() => match out {
                Some(out) => out,
                None => return,
            },
        };
        match out {
            Out::Announce(event) => {
                let envelope = Envelope {
                    node: subjects.node.clone(),
                    event,
                };
                if let Ok(body) = serde_json::to_vec(&envelope)
                    && let Err(e) = client
                        .publish(subjects.announcements.clone(), body.into())
                        .await
                {
                    tracing::warn!(error = %e, "announcing to the other nodes");
                }
            }
            Out::Publish(message, reply) => {
                let result = publish(&js, &subjects, &mut stream, &mut last, &message).await;
                let result = result.map_err(|e| {
                    tracing::warn!(error = %e, channel = %message.channel, "relaying through NATS");
                    stream = None;
                    HubError::Unavailable
                });
                if let Some(reply) = reply {
                    let _ = reply.send(result);
                }
            }
        }
    }
}

async fn publish(
    js: &jetstream::Context,
    subjects: &Subjects,
    stream: &mut Option<stream::Stream>,
    last: &mut HashMap<String, (u64, u64)>,
    message: &Relayed,
) -> anyhow::Result<SendOutcome> {
    let s = match stream {
        Some(s) => s,
        None => stream.insert(ensure_stream(js, subjects).await?),
    };
    let subject = subjects.channel(&message.channel);
    let body = bytes::Bytes::from(serde_json::to_vec(message)?);
    for _ in 0..ATTEMPTS {
        let (seq, number) = match last.get(&message.channel) {
            Some(l) => *l,
            None => {
                let found = tokio::time::timeout(
                    REQUEST_TIMEOUT,
                    s.get_last_raw_message_by_subject(&subject),
                )
                .await?;
                match found {
                    Ok(m) => (
                        m.sequence,
                        m.headers
                            .get(NUMBER)
                            .and_then(|v| v.as_str().parse().ok())
                            .unwrap_or(0),
                    ),
                    Err(e)
                        if e.kind()
                            == jetstream::stream::LastRawMessageErrorKind::NoMessageFound =>
                    {
                        (0, 0)
                    }
                    Err(e) => return Err(e.into()),
                }
            }
        };
        let mut headers = HeaderMap::new();
        headers.insert(NUMBER, (number + 1).to_string().as_str());
        let mut publish = PublishMessage::build()
            .headers(headers)
            .payload(body.clone())
            .expected_last_subject_sequence(seq);
        if let Some(id) = &message.dedup {
            publish = publish.message_id(format!("{}:{id}", message.channel));
        }
        let ack = js.send_publish(subject.clone(), publish).await?;
        match tokio::time::timeout(REQUEST_TIMEOUT, ack).await? {
            Ok(ack) if ack.duplicate => return Ok(SendOutcome::Duplicate),
            Ok(ack) => {
                if last.len() >= CACHED_CHANNELS {
                    last.clear();
                }
                last.insert(message.channel.clone(), (ack.sequence, number + 1));
                return Ok(SendOutcome::Relayed {
                    server_sequence: number + 1,
                });
            }
            // Another node numbered first: read where the channel is, again.
            Err(e) if e.kind() == PublishErrorKind::WrongLastSequence => {
                last.remove(&message.channel);
            }
            Err(e) => return Err(e.into()),
        }
    }
    anyhow::bail!(
        "channel {:?}: other nodes kept numbering first",
        message.channel
    )
}

/// Where traffic from other nodes goes on this one.
pub(crate) struct Hubs {
    pub hub: mpsc::Sender<HubCommand>,
    pub phoenix: mpsc::Sender<PhxCommand>,
    pub kingshare: Arc<aether_realtime::kingshare::Notifier>,
    pub registry: Arc<aether_realtime::registry::Registry>,
}

async fn incoming(
    js: jetstream::Context,
    client: async_nats::Client,
    subjects: Subjects,
    hubs: Hubs,
    mut reconnects: watch::Receiver<u64>,
    shutdown: CancellationToken,
) {
    // Kept across reconnects: a node that died while NATS was away is still
    // known here, falls silent, and is declared gone.
    let mut nodes = Nodes::default();
    // Where this node stands in the channel stream (across reconnects).
    let mut after_seq: Option<u64> = None;
    loop {
        reconnects.borrow_and_update();
        let r = tokio::select! {
            biased;
            _ = shutdown.cancelled() => return,
            r = incoming_once(&js, &client, &subjects, &hubs, &mut nodes, &mut after_seq) => r,
            _ = reconnects.changed() => Err(anyhow::anyhow!("NATS reconnected")),
        };
        match r {
            Ok(()) => return, // the hub is gone
            Err(e) => tracing::warn!(error = %e, "channel traffic from other nodes; reading again"),
        }
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
        }
    }
}

async fn incoming_once(
    js: &jetstream::Context,
    client: &async_nats::Client,
    subjects: &Subjects,
    hubs: &Hubs,
    nodes: &mut Nodes,
    after_seq: &mut Option<u64>,
) -> anyhow::Result<()> {
    use async_nats::jetstream::consumer::{DeliverPolicy, pull::OrderedConfig};
    let s = ensure_stream(js, subjects).await?;
    // After a reconnect, from where this node stopped: members miss nothing
    // the stream still holds.
    let deliver_policy = match *after_seq {
        // (A stream in memory starts again at 1 after NATS restarted.)
        Some(seq) if s.cached_info().state.last_sequence >= seq => DeliverPolicy::ByStartSequence {
            start_sequence: seq + 1,
        },
        Some(_) => DeliverPolicy::All,
        None => DeliverPolicy::New,
    };
    let mut messages = s
        .create_consumer(OrderedConfig {
            deliver_policy,
            ..Default::default()
        })
        .await?
        .messages()
        .await?;
    let mut announcements = client.subscribe(subjects.announcements.clone()).await?;
    // Whoever is there sends what its members track; and what this node's
    // track replaces what others knew under its name (an earlier run of it).
    say(client, subjects, Announcement::Sync).await?;
    if !send_snapshots(client, subjects, hubs).await? {
        return Ok(());
    }
    // Everyone known starts its silence now.
    let now = tokio::time::Instant::now();
    for at in nodes.seen.values_mut() {
        *at = now;
    }
    let mut alive = tokio::time::interval(ALIVE_EVERY);
    alive.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            m = messages.next() => {
                let Some(m) = m else { anyhow::bail!("the channel stream's consumer ended") };
                let m = m?;
                if let Ok(info) = m.info() {
                    *after_seq = Some(info.stream_sequence);
                }
                let number = m
                    .headers
                    .as_ref()
                    .and_then(|h| h.get(NUMBER))
                    .and_then(|v| v.as_str().parse::<u64>().ok());
                let (Some(server_sequence), Ok(message)) =
                    (number, serde_json::from_slice::<Relayed>(&m.payload))
                else {
                    tracing::warn!("a channel message without its number or body: skipped");
                    continue;
                };
                if hubs.hub.send(HubCommand::Numbered { message, server_sequence }).await.is_err() {
                    return Ok(());
                }
            }
            a = announcements.next() => {
                let Some(a) = a else { anyhow::bail!("the announcements subscription ended") };
                match serde_json::from_slice::<Envelope>(&a.payload) {
                    Ok(e) if e.node == subjects.node => {}
                    Ok(e) => {
                        nodes.seen.insert(e.node.clone(), tokio::time::Instant::now());
                        if nodes.gone.remove(&e.node) {
                            say(client, subjects, Announcement::Sync).await?;
                        }
                        if !announced(client, subjects, hubs, e).await? {
                            return Ok(());
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "an announcement that is not one: skipped"),
                }
            }
            _ = alive.tick() => {
                say(client, subjects, Announcement::Alive).await?;
                let now = tokio::time::Instant::now();
                let gone: Vec<String> = nodes
                    .seen
                    .iter()
                    .filter(|(_, at)| now.duration_since(**at) > GONE_AFTER)
                    .map(|(n, _)| n.clone())
                    .collect();
                for node in gone {
                    nodes.seen.remove(&node);
                    if nodes.gone.len() < 1024 {
                        nodes.gone.insert(node.clone());
                    }
                    tracing::warn!(%node, "a node went silent: its members' presence and connections are dropped");
                    hubs.registry.forget_node(&node);
                    if hubs.phoenix.send(PhxCommand::NodeGone { node }).await.is_err() {
                        return Ok(());
                    }
                }
            }
        }
    }
}

/// The other nodes as this one hears them.
#[derive(Default)]
struct Nodes {
    /// When each was last heard from.
    seen: HashMap<String, tokio::time::Instant>,
    /// Taken for gone: one heard from again was only slow, and is asked for
    /// what its members track.
    gone: std::collections::HashSet<String>,
}

/// Every node says it is alive this often; one silent for [`GONE_AFTER`] is gone.
const ALIVE_EVERY: Duration = Duration::from_secs(2);
const GONE_AFTER: Duration = Duration::from_secs(6);

async fn say(
    client: &async_nats::Client,
    subjects: &Subjects,
    event: Announcement,
) -> anyhow::Result<()> {
    let body = serde_json::to_vec(&Envelope {
        node: subjects.node.clone(),
        event,
    })?;
    client
        .publish(subjects.announcements.clone(), body.into())
        .await?;
    Ok(())
}

/// What this node's members track and its connections per user, to the
/// others; `false` when the hubs are gone.
async fn send_snapshots(
    client: &async_nats::Client,
    subjects: &Subjects,
    hubs: &Hubs,
) -> anyhow::Result<bool> {
    let (reply, rx) = oneshot::channel();
    if hubs
        .phoenix
        .send(PhxCommand::Snapshot { reply })
        .await
        .is_err()
    {
        return Ok(false);
    }
    if let Ok(Ok(state)) = tokio::time::timeout(REQUEST_TIMEOUT, rx).await {
        say(client, subjects, Announcement::PhoenixSnapshot { state }).await?;
    }
    let counts = hubs.registry.local_counts();
    say(
        client,
        subjects,
        Announcement::ConnectionsSnapshot { counts },
    )
    .await?;
    Ok(true)
}

/// Another node's announcement, to this node's hubs; `false` when they are gone.
async fn announced(
    client: &async_nats::Client,
    subjects: &Subjects,
    hubs: &Hubs,
    e: Envelope,
) -> anyhow::Result<bool> {
    let phoenix = |cmd| async { hubs.phoenix.send(cmd).await.is_ok() };
    Ok(match e.event {
        Announcement::Phoenix {
            topic,
            event,
            payload,
        } => {
            let payload = match payload {
                PhoenixPayload::Json(v) => BroadcastPayload::Json(v),
                PhoenixPayload::Binary(b) => BroadcastPayload::Binary(b.into()),
            };
            phoenix(PhxCommand::Broadcast {
                from: Sender::OtherNode,
                topic,
                event,
                payload,
            })
            .await
        }
        Announcement::PhoenixPresence {
            topic,
            joins,
            leaves,
        } => {
            phoenix(PhxCommand::RemotePresence {
                node: e.node,
                topic,
                joins,
                leaves,
            })
            .await
        }
        Announcement::PhoenixSnapshot { state } => {
            phoenix(PhxCommand::RemoteSnapshot {
                node: e.node,
                state,
            })
            .await
        }
        Announcement::Sync => send_snapshots(client, subjects, hubs).await?,
        Announcement::Connections { user_key, count } => {
            hubs.registry.set_elsewhere(&e.node, user_key, count);
            true
        }
        Announcement::ConnectionsSnapshot { counts } => {
            hubs.registry.replace_elsewhere(&e.node, counts);
            true
        }
        Announcement::KingShare { user, frame } => {
            match user {
                Some(u) => hubs.kingshare.to_user_here(&u, &frame),
                None => hubs.kingshare.to_all_here(&frame),
            }
            true
        }
        Announcement::Alive => true,
        other => hubs.hub.send(HubCommand::Announced(other)).await.is_ok(),
    })
}
