//! The change log's second backend: a NATS JetStream stream, shared by the nodes of
//! a cluster (`NATS_URL`).
//!
//! One node, the leader, appends; every node reads. A stream message is one batch
//! of changes, self-contained (it carries the descriptions of the relations its
//! changes use), so any node decodes any message without history. Its headers
//! say what a reader needs without decoding the body:
//!
//! - `Aether-Kind`: `changes`, `epoch` (a reset: a new history starts after
//!   `Aether-Floor`) or `reset-pending` (the slot is being recreated);
//! - `Aether-Epoch`, `Aether-Floor` (every change after it up to this message is
//!   in this message or before it), `Aether-Last` (the newest position in it);
//! - `Nats-Msg-Id` = epoch and last position: a batch re-sent within the stream's
//!   duplicate window is dropped by the server. Past the window the leader's own
//!   check drops it (it appends only above the newest position in the stream).
//!
//! Every publish carries `Nats-Expected-Last-Sequence`: a leader that was deposed
//! while it still held a batch gets [`LogError::Fenced`] instead of appending
//! after its successor.
//!
//! Positions find their stream sequence by binary search over `Aether-Last`
//! (stream order is position order), a few direct reads per resume.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use async_nats::HeaderMap;
use async_nats::jetstream::{self, context::PublishErrorKind, message::PublishMessage, stream};
use bytes::Bytes;
use futures_util::StreamExt;
use tokio::runtime::Handle;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use super::codec::{self, CodecError};
use super::pump::Feed;
use super::{Bounds, ChangeLog, LogError, Page, ReadHint};
use aether_core::changes::{Relation, RowChange, TableId};
use aether_core::lsn::{Epoch, PgLsn, Position};

const KIND: &str = "Aether-Kind";
const EPOCH: &str = "Aether-Epoch";
const FLOOR: &str = "Aether-Floor";
const LAST: &str = "Aether-Last";
/// Which log instance appended: after a refused append, a leader tells its own
/// message (an acknowledgement lost on a reconnect) from another node's.
const WRITER: &str = "Aether-Writer";

const KIND_CHANGES: &str = "changes";
/// The newest position again, so the stream never empties by age: a quiet
/// stream keeps its epoch and where its history stands.
const KIND_MARK: &str = "mark";
/// One piece of a change too large for one message (`Aether-Part: k/n`).
const KIND_PART: &str = "part";
const PART: &str = "Aether-Part";
const KIND_EPOCH: &str = "epoch";
const KIND_RESET_PENDING: &str = "reset-pending";

/// Record tags inside a message body.
const REC_RELATION: u8 = 1;
const REC_CHANGE: u8 = 2;

/// Room left in a message for its headers and the protocol line.
const HEADER_ROOM: usize = 1024;
/// A batch message is cut at this size even when the server allows more: a
/// reader's page then costs at most this much beyond its budget.
const MESSAGE_BYTES: usize = 1 << 20;
/// Retention (the floor, a mark in a quiet stream) is looked at this often.
const RETENTION_EVERY: Duration = Duration::from_secs(5);
/// A follower that received nothing this long checks the stream has nothing
/// more for it.
const IDLE_CHECK: Duration = Duration::from_secs(2);
/// How long a request to the server may take before it counts as failed.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Where the stream lives and how long it keeps changes.
#[derive(Debug, Clone)]
pub struct StreamOptions {
    /// Stream name; its one subject is derived from it.
    pub name: String,
    pub retention_age: Duration,
    pub retention_bytes: u64,
    /// Replicas of the stream (1 for a single NATS server, 3 for a cluster).
    pub replicas: usize,
}

impl StreamOptions {
    /// The stream of a replication slot: every node with the same slot shares it.
    pub fn for_slot(slot: &str, retention_age: Duration, retention_bytes: u64) -> StreamOptions {
        let name: String = slot
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        StreamOptions {
            name: format!("AETHER_{name}"),
            retention_age,
            retention_bytes,
            replicas: 1,
        }
    }

    fn subject(&self) -> String {
        format!("aether.changes.{}", self.name)
    }
}

#[derive(Debug)]
struct State {
    epoch: Epoch,
    floor: Position,
    newest: Option<Position>,
    oldest: Option<Position>,
    bytes: u64,
    records: u64,
    reset_pending: bool,
    /// The stream's last sequence as this node knows it (the fence for appends).
    last_seq: u64,
    /// Who appended the stream's last message.
    last_writer: Option<String>,
    /// The stream's first sequence when the floor was last read.
    first_seq: u64,
    /// The stream sequence this state reflects: the follower applies an older
    /// epoch or reset-pending message no more (the writer is ahead of it).
    applied_seq: u64,
}

impl Default for State {
    fn default() -> State {
        State {
            epoch: Epoch(0),
            floor: Position::new(PgLsn::ZERO, 0),
            newest: None,
            oldest: None,
            bytes: 0,
            records: 0,
            reset_pending: true,
            last_seq: 0,
            last_writer: None,
            first_seq: 0,
            applied_seq: 0,
        }
    }
}

/// A change log in a JetStream stream. Its blocking calls run the client on the
/// runtime given at [`JetStreamLog::open`]; they must not be called from a task
/// of that runtime (the router calls only [`ChangeLog::bounds`], which does no
/// i/o).
pub struct JetStreamLog {
    rt: Handle,
    js: jetstream::Context,
    client: async_nats::Client,
    opts: StreamOptions,
    subject: String,
    /// This instance's name in the messages it appends.
    writer: String,
    /// The largest message, when smaller than the server allows (tests).
    max_message: Option<usize>,
    /// When retention was last looked at.
    retention_at: Mutex<Option<std::time::Instant>>,
    /// One appender at a time on this node (the writer, marks, resets): each
    /// expects the sequence the one before it got.
    append_gate: Mutex<()>,
    /// This node lost the leadership: nothing more is appended from it.
    deposed: std::sync::atomic::AtomicBool,
    state: Mutex<State>,
}

fn nats(what: &str, e: impl std::fmt::Display) -> LogError {
    LogError::Unavailable(format!("{what}: {e}"))
}

fn header<'a>(h: Option<&'a HeaderMap>, name: &str) -> Option<&'a str> {
    h?.get(name).map(|v| v.as_str())
}

fn parse_position(s: &str) -> Option<Position> {
    let (lsn, ord) = s.split_once('.')?;
    Some(Position::new(PgLsn(lsn.parse().ok()?), ord.parse().ok()?))
}

fn format_position(p: Position) -> String {
    format!("{}.{}", p.commit_lsn.0, p.ordinal)
}

/// What a message's headers say about it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Meta {
    kind: Kind,
    epoch: Epoch,
    floor: Position,
    last: Position,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Changes,
    /// Piece `k` of `n` of one change's body.
    Part(u32, u32),
    Mark,
    /// A kind a newer Aether writes: skipped.
    Unknown,
    Epoch,
    ResetPending,
}

fn meta(h: Option<&HeaderMap>) -> Result<Meta, LogError> {
    let bad = |why: &str| LogError::Corrupt {
        segment: "jetstream".into(),
        offset: 0,
        why: why.into(),
    };
    let kind = match header(h, KIND) {
        Some(KIND_CHANGES) => Kind::Changes,
        Some(KIND_PART) => header(h, PART)
            .and_then(|p| p.split_once('/'))
            .and_then(|(k, n)| Some(Kind::Part(k.parse().ok()?, n.parse().ok()?)))
            .filter(|k| matches!(k, Kind::Part(k, n) if *k >= 1 && k <= n))
            .ok_or_else(|| bad("a part message without a valid Aether-Part"))?,
        Some(KIND_EPOCH) => Kind::Epoch,
        Some(KIND_MARK) => Kind::Mark,
        Some(KIND_RESET_PENDING) => Kind::ResetPending,
        Some(_) => Kind::Unknown,
        None => return Err(bad("a message without Aether-Kind")),
    };
    let epoch = header(h, EPOCH)
        .and_then(|e| e.parse().ok())
        .map(Epoch)
        .ok_or_else(|| bad("a message without Aether-Epoch"))?;
    let floor = header(h, FLOOR)
        .and_then(parse_position)
        .ok_or_else(|| bad("a message without Aether-Floor"))?;
    let last = header(h, LAST)
        .and_then(parse_position)
        .ok_or_else(|| bad("a message without Aether-Last"))?;
    Ok(Meta {
        kind,
        epoch,
        floor,
        last,
    })
}

fn headers(kind: &str, epoch: Epoch, floor: Position, last: Position) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert(KIND, kind);
    h.insert(EPOCH, epoch.0.to_string().as_str());
    h.insert(FLOOR, format_position(floor).as_str());
    h.insert(LAST, format_position(last).as_str());
    h
}

/// Joins the parts of a change too large for one message. Parts arrive in
/// order; a group left incomplete (its leader died mid-way; the next leader
/// appends the change again, whole) is dropped when anything else follows.
#[derive(Default)]
struct Assembler {
    body: Vec<u8>,
    /// The next part expected, and the sequence of the group's first.
    next: Option<(u32, u64)>,
}

impl Assembler {
    /// A message's body to decode, if it completes one: `(body, sequence of
    /// its first message)`. Non-part messages pass through.
    fn push<'a>(&'a mut self, kind: Kind, seq: u64, payload: &'a [u8]) -> Option<(&'a [u8], u64)> {
        match kind {
            Kind::Part(k, n) => {
                match self.next {
                    Some((want, _)) if want == k => {}
                    _ if k == 1 => {
                        self.body.clear();
                        self.next = Some((1, seq));
                    }
                    // A piece of a group whose start is not here.
                    _ => {
                        self.next = None;
                        return None;
                    }
                }
                self.body.extend_from_slice(payload);
                let start = self.next.map_or(seq, |(_, s)| s);
                if k == n {
                    self.next = None;
                    Some((&self.body, start))
                } else {
                    self.next = Some((k + 1, start));
                    None
                }
            }
            _ => {
                self.next = None;
                Some((payload, seq))
            }
        }
    }
}

/// The changes of one message body, oldest first.
fn decode_body(body: &[u8], epoch: Epoch) -> Result<Vec<(Arc<RowChange>, usize)>, LogError> {
    let corrupt = |e: CodecError| LogError::Corrupt {
        segment: "jetstream".into(),
        offset: 0,
        why: e.to_string(),
    };
    let mut relations: HashMap<u32, Arc<Relation>> = HashMap::new();
    let mut out = Vec::new();
    let mut rest = body;
    while !rest.is_empty() {
        let (&tag, after) = rest
            .split_first()
            .ok_or_else(|| corrupt(CodecError::Short))?;
        let len = after
            .get(..4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
            .ok_or_else(|| corrupt(CodecError::Short))?;
        let record = after
            .get(4..4 + len)
            .ok_or_else(|| corrupt(CodecError::Short))?;
        rest = &after[4 + len..];
        match tag {
            REC_RELATION => {
                let (version, rel) = codec::decode_relation(record).map_err(corrupt)?;
                relations.insert(version, Arc::new(rel));
            }
            REC_CHANGE => {
                let c = codec::decode_change(record, epoch, |v| relations.get(&v).cloned())
                    .map_err(corrupt)?;
                out.push((Arc::new(c), record.len()));
            }
            t => return Err(corrupt(CodecError::Tag(t))),
        }
    }
    Ok(out)
}

/// A message to append: headers, body, message id, the newest position it
/// makes the stream hold.
type Outgoing = (HeaderMap, Bytes, String, Option<Position>);

/// A batch of changes after `floor` up to `last`, as one message.
fn batch_message(epoch: Epoch, floor: Position, last: Position, body: Vec<u8>) -> Outgoing {
    (
        headers(KIND_CHANGES, epoch, floor, last),
        Bytes::from(body),
        format!("{}:{}", epoch.0, format_position(last)),
        Some(last),
    )
}

fn push_record(tag: u8, body: &[u8], out: &mut Vec<u8>) {
    out.push(tag);
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(body);
}

impl JetStreamLog {
    /// Connects the stream (creating it, or updating its retention) and reads
    /// where it stands. Call from outside the runtime's tasks (`spawn_blocking`).
    pub fn open(
        rt: Handle,
        client: async_nats::Client,
        opts: StreamOptions,
    ) -> Result<JetStreamLog, LogError> {
        let js = {
            let _in_runtime = rt.enter();
            jetstream::new(client.clone())
        };
        let subject = opts.subject();
        let config = stream::Config {
            name: opts.name.clone(),
            subjects: vec![subject.clone()],
            max_age: opts.retention_age,
            max_bytes: i64::try_from(opts.retention_bytes).unwrap_or(i64::MAX),
            discard: stream::DiscardPolicy::Old,
            storage: stream::StorageType::File,
            num_replicas: opts.replicas.max(1),
            // At most the stream's age (the server refuses more).
            duplicate_window: if opts.retention_age.is_zero() {
                Duration::from_secs(120)
            } else {
                opts.retention_age.min(Duration::from_secs(120))
            },
            ..Default::default()
        };
        rt.block_on(async {
            let mut s = js
                .get_or_create_stream(config.clone())
                .await
                .map_err(|e| nats("creating the change stream", e))?;
            let current = s
                .info()
                .await
                .map_err(|e| nats("reading the change stream", e))?;
            if current.config.max_age != config.max_age
                || current.config.max_bytes != config.max_bytes
            {
                js.update_stream(config)
                    .await
                    .map_err(|e| nats("updating the change stream's retention", e))?;
            }
            Ok::<_, LogError>(())
        })?;
        let log = JetStreamLog {
            rt,
            js,
            client,
            opts,
            subject,
            writer: uuid::Uuid::new_v4().simple().to_string(),
            max_message: None,
            retention_at: Mutex::new(None),
            append_gate: Mutex::new(()),
            deposed: std::sync::atomic::AtomicBool::new(false),
            state: Mutex::new(State::default()),
        };
        log.refresh()?;
        Ok(log)
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Messages no larger than `bytes` (the server's `max_payload` is the
    /// limit otherwise): tests send large rows in parts with it.
    pub fn with_max_message(mut self, bytes: usize) -> Self {
        self.max_message = Some(bytes);
        self
    }

    /// This node is no longer the leader: appends fail at once (queued changes
    /// are not appended after the successor's).
    pub fn depose(&self) {
        self.deposed
            .store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// This node becomes the leader: reads where the stream stands and appends
    /// a mark expecting it, so a deposed leader's late append is refused from
    /// now on. Retried while the predecessor's last appends land.
    pub fn claim(&self) -> Result<(), LogError> {
        self.deposed
            .store(false, std::sync::atomic::Ordering::SeqCst);
        let mut last = None;
        for _ in 0..20 {
            let _gate = self.gate()?;
            self.refresh()?;
            if self.state().reset_pending {
                // Nothing to fence yet: the reset that follows is fenced.
                return Ok(());
            }
            match self.rt.block_on(self.mark()) {
                Ok(()) => return Ok(()),
                Err(LogError::Fenced(why)) => last = Some(why),
                Err(e) => return Err(e),
            }
            drop(_gate);
            std::thread::sleep(Duration::from_millis(100));
        }
        Err(LogError::Fenced(last.unwrap_or_default()))
    }

    /// Appends a mark: the newest position again (see [`KIND_MARK`]).
    async fn mark(&self) -> Result<(), LogError> {
        let (epoch, newest, pending, last_seq) = {
            let g = self.state();
            (
                g.epoch,
                g.newest.unwrap_or(g.floor),
                g.reset_pending,
                g.last_seq,
            )
        };
        if pending {
            return Ok(());
        }
        let h = headers(KIND_MARK, epoch, newest, newest);
        let id = format!("{}:mark:{last_seq}:{}", epoch.0, self.writer);
        self.publish_all(vec![(h, Bytes::new(), id, None)], last_seq)
            .await
            .map(|_| ())
    }

    /// Serializes this node's appends; refuses once it is deposed.
    fn gate(&self) -> Result<std::sync::MutexGuard<'_, ()>, LogError> {
        let g = self.append_gate.lock().unwrap_or_else(|e| e.into_inner());
        if self.deposed.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(LogError::Fenced("this node lost the leadership".into()));
        }
        Ok(g)
    }

    /// The client, for the node's other traffic and its health.
    pub fn client(&self) -> &async_nats::Client {
        &self.client
    }

    /// The stream's last sequence as last read or appended.
    pub fn last_sequence(&self) -> u64 {
        self.state().last_seq
    }

    async fn stream(&self) -> Result<stream::Stream, LogError> {
        tokio::time::timeout(REQUEST_TIMEOUT, self.js.get_stream(&self.opts.name))
            .await
            .map_err(|e| nats("the change stream", e))?
            .map_err(|e| nats("the change stream", e))
    }

    async fn message(
        &self,
        s: &stream::Stream,
        seq: u64,
    ) -> Result<Option<jetstream::message::StreamMessage>, LogError> {
        match tokio::time::timeout(REQUEST_TIMEOUT, s.get_raw_message(seq)).await {
            Err(e) => Err(nats("reading the change stream", e)),
            Ok(Ok(m)) => Ok(Some(m)),
            Ok(Err(e)) if e.kind() == jetstream::stream::RawMessageErrorKind::NoMessageFound => {
                Ok(None)
            }
            Ok(Err(e)) => Err(nats("reading the change stream", e)),
        }
    }

    /// Reads where the stream stands (at open, and when this node becomes the
    /// leader: another node may have appended since).
    pub fn refresh(&self) -> Result<(), LogError> {
        let fresh = self.rt.block_on(async {
            let mut s = self.stream().await?;
            let info = s
                .info()
                .await
                .map_err(|e| nats("reading the change stream", e))?
                .clone();
            let st = &info.state;
            let mut fresh = State {
                bytes: st.bytes,
                last_seq: st.last_sequence,
                first_seq: st.first_sequence,
                applied_seq: st.last_sequence,
                reset_pending: true,
                ..State::default()
            };
            if st.messages == 0 {
                return Ok(fresh);
            }
            let Some(last) = self.message(&s, st.last_sequence).await? else {
                return Ok(fresh);
            };
            fresh.last_writer = header(Some(&last.headers), WRITER).map(str::to_owned);
            let last = meta(Some(&last.headers))?;
            fresh.epoch = last.epoch;
            fresh.reset_pending = last.kind == Kind::ResetPending;
            fresh.newest = match last.kind {
                Kind::Changes => Some(last.last),
                Kind::Part(k, n) if k == n => Some(last.last),
                // An incomplete group: what came before it.
                Kind::Part(..) => Some(last.floor),
                Kind::Mark => Some(last.last),
                _ => None,
            };
            // The oldest message left: its floor is the log's.
            let mut seq = st.first_sequence;
            while seq <= st.last_sequence {
                if let Some(m) = self.message(&s, seq).await? {
                    let first = meta(Some(&m.headers))?;
                    fresh.floor = first.floor;
                    if first.kind == Kind::Changes {
                        fresh.oldest = decode_body(&m.payload, first.epoch)?
                            .first()
                            .map(|(c, _)| c.position);
                    } else if matches!(first.kind, Kind::Part(..)) {
                        fresh.oldest = Some(first.last);
                    } else if let Some(newest) = fresh.newest {
                        // Only the marker's history: the oldest is the first change after it.
                        fresh.oldest = self
                            .read_from(&s, seq + 1, first.floor, 1, 1)
                            .await?
                            .changes
                            .first()
                            .map(|c| c.position)
                            .or(Some(newest));
                    }
                    break;
                }
                seq += 1;
            }
            Ok::<_, LogError>(fresh)
        })?;
        let mut st = self.state();
        let records = st.records;
        *st = fresh;
        st.records = records;
        Ok(())
    }

    /// Publishes messages in order, each expecting the one before it; returns the
    /// sequence of the last.
    async fn publish_all(
        &self,
        messages: Vec<Outgoing>,
        mut last_seq: u64,
    ) -> Result<u64, LogError> {
        // One at a time, each expecting the sequence the one before it got: a
        // message re-sent after a lost acknowledgement comes back as a
        // duplicate with its original sequence, which the next one expects.
        for (mut h, body, id, newest) in messages {
            h.insert(WRITER, self.writer.as_str());
            let msg = PublishMessage::build()
                .headers(h)
                .payload(body)
                .message_id(id)
                .expected_last_sequence(last_seq);
            let ack = self
                .js
                .send_publish(self.subject.clone(), msg)
                .await
                .map_err(|e| match e.kind() {
                    PublishErrorKind::MaxPayloadExceeded => LogError::TooLarge(0),
                    _ => nats("appending to the change stream", e),
                })?;
            let ack = tokio::time::timeout(REQUEST_TIMEOUT, ack)
                .await
                .map_err(|e| nats("waiting for the change stream's acknowledgement", e))?
                .map_err(|e| match e.kind() {
                    PublishErrorKind::WrongLastSequence => LogError::Fenced(
                        "another node appended to the change stream: this node is no longer the leader".into(),
                    ),
                    _ => nats("appending to the change stream", e),
                })?;
            last_seq = last_seq.max(ack.sequence);
            // Where the stream stands after each message: a failure later in
            // the batch leaves the part already stored counted.
            let mut st = self.state();
            st.last_seq = last_seq;
            st.applied_seq = st.applied_seq.max(last_seq);
            if let Some(n) = newest
                && st.newest < Some(n)
            {
                st.newest = Some(n);
            }
        }
        Ok(last_seq)
    }

    /// Keeps the floor (what retention dropped), the size and, on the leader,
    /// a recent message in the stream; never the epoch or the fence. At most
    /// every few seconds.
    async fn retention(&self, leader: bool) -> Result<(), LogError> {
        let mut s = self.stream().await?;
        let info = s
            .info()
            .await
            .map_err(|e| nats("reading the change stream", e))?
            .clone();
        let st = &info.state;
        let first_changed = {
            let mut g = self.state();
            g.bytes = st.bytes;
            g.first_seq != st.first_sequence
        };
        if first_changed && st.messages > 0 {
            let mut seq = st.first_sequence;
            while seq <= st.last_sequence {
                if let Some(m) = self.message(&s, seq).await? {
                    let first = meta(Some(&m.headers))?;
                    let mut g = self.state();
                    if first.epoch == g.epoch && first.floor > g.floor {
                        g.floor = first.floor;
                        g.oldest = Some(first.last.max(first.floor));
                    }
                    g.first_seq = st.first_sequence;
                    break;
                }
                seq += 1;
            }
        }
        // A stream whose newest message is older than half its age limit gets
        // a mark, so age never empties it: its epoch and floor survive quiet.
        let age = info.config.max_age;
        let now_s = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        let last_age = Duration::from_secs(
            now_s
                .saturating_sub(st.last_timestamp.unix_timestamp())
                .max(0) as u64,
        );
        let quiet = st.messages == 0 || last_age > age / 2;
        if leader && !age.is_zero() && quiet {
            self.mark().await?;
        }
        Ok(())
    }

    /// An append refused for its expected last sequence: fenced if another
    /// writer appended; if the last message is this writer's own, a message was
    /// stored without its acknowledgement arriving (or dropped while the
    /// connection was down), and the append is retried from where the stream
    /// stands (the caller drops what it now holds).
    fn refused(&self, why: String) -> LogError {
        if let Err(e) = self.refresh() {
            return e;
        }
        let st = self.state();
        if st.last_writer.as_deref() == Some(self.writer.as_str()) {
            return LogError::Unavailable(format!(
                "the change stream is at sequence {} after a lost acknowledgement; appending the rest",
                st.last_seq
            ));
        }
        LogError::Fenced(why)
    }

    /// Changes after `after` from stream sequence `seq` on.
    async fn read_from(
        &self,
        s: &stream::Stream,
        mut seq: u64,
        after: Position,
        max_bytes: usize,
        max_changes: usize,
    ) -> Result<Page, LogError> {
        let last_seq = self
            .state()
            .last_seq
            .max(s.cached_info().state.last_sequence);
        let mut page = Page::default();
        let mut bytes = 0usize;
        let mut parts = Assembler::default();
        while seq <= last_seq {
            let Some(m) = self.message(s, seq).await? else {
                seq += 1;
                continue;
            };
            let meta = meta(Some(&m.headers))?;
            let carries = matches!(meta.kind, Kind::Changes | Kind::Part(..));
            if carries
                && meta.last > after
                && let Some((body, start)) = parts.push(meta.kind, seq, &m.payload)
            {
                let changes = decode_body(body, meta.epoch)?;
                let mut taken_all = true;
                for (c, size) in changes {
                    if c.position <= after {
                        continue;
                    }
                    if page.changes.len() >= max_changes
                        || (!page.changes.is_empty() && bytes + size > max_bytes)
                    {
                        taken_all = false;
                        break;
                    }
                    bytes += size;
                    page.changes.push(c);
                }
                if !taken_all {
                    // The next read starts at this message (a group: its first part).
                    let last = page.changes.last().map_or(after, |c| c.position);
                    page.hint = Some(ReadHint {
                        segment: Position::new(PgLsn(start), 0),
                        offset: start,
                        last,
                    });
                    return Ok(page);
                }
            }
            seq += 1;
            let mid_group = matches!(meta.kind, Kind::Part(k, n) if k < n);
            if !mid_group && (page.changes.len() >= max_changes || bytes >= max_bytes) {
                break;
            }
        }
        let last = page.changes.last().map_or(after, |c| c.position);
        // Stopped inside a group (its last parts not written yet): the next
        // read starts at its first part, and there is more to come.
        if let Some((_, start)) = parts.next {
            page.end = false;
            page.hint = Some(ReadHint {
                segment: Position::new(PgLsn(start), 0),
                offset: start,
                last,
            });
            return Ok(page);
        }
        page.end = seq > last_seq;
        page.hint = Some(ReadHint {
            segment: Position::new(PgLsn(seq), 0),
            offset: seq,
            last,
        });
        Ok(page)
    }

    /// The first sequence whose message may hold changes after `after`.
    async fn find(
        &self,
        s: &stream::Stream,
        after: Position,
        first: u64,
        last: u64,
    ) -> Result<u64, LogError> {
        let (mut lo, mut hi) = (first, last + 1);
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            // A sequence retention removed counts as old.
            let newer = match self.message(s, mid).await? {
                Some(m) => meta(Some(&m.headers))?.last > after,
                None => false,
            };
            if newer {
                hi = mid;
            } else {
                lo = mid + 1;
            }
        }
        Ok(lo)
    }
}

impl ChangeLog for JetStreamLog {
    fn bounds(&self) -> Bounds {
        let st = self.state();
        Bounds {
            epoch: st.epoch,
            floor: st.floor,
            newest: st.newest,
            oldest: st.oldest,
            bytes: st.bytes,
            records: st.records,
            reset_pending: st.reset_pending,
        }
    }

    fn append(&self, changes: &[Arc<RowChange>]) -> Result<(), LogError> {
        let Some(first) = changes.first() else {
            return Ok(());
        };
        let _gate = self.gate()?;
        let (epoch, mut floor, last_seq) = {
            let st = self.state();
            if st.reset_pending {
                return Err(LogError::ResetPending);
            }
            let newest = st.newest.unwrap_or(st.floor);
            if first.position <= newest {
                return Err(LogError::OutOfOrder {
                    position: first.position,
                    newest,
                });
            }
            (st.epoch, newest, st.last_seq)
        };
        // What one message may carry, and where a batch is cut.
        let max = self
            .max_message
            .unwrap_or_else(|| self.client.server_info().max_payload)
            .saturating_sub(HEADER_ROOM)
            .max(1);
        let limit = max.min(MESSAGE_BYTES);
        let mut messages = Vec::new();
        let mut body = Vec::new();
        let mut versions: HashMap<TableId, u32> = HashMap::new();
        let mut record = Vec::new();
        let mut last = floor;
        for c in changes {
            if c.position <= last {
                return Err(LogError::OutOfOrder {
                    position: c.position,
                    newest: last,
                });
            }
            record.clear();
            let version = versions.len() as u32;
            let mut rel = Vec::new();
            let known = versions.get(&c.relation.id).copied();
            if known.is_none() {
                codec::encode_relation(version, &c.relation, &mut rel);
            }
            codec::encode_change(c, known.unwrap_or(version), &mut record);
            let size = record.len() + rel.len() + 10;
            if size > limit {
                // Alone, after what came before it; in parts if it exceeds a message.
                if !body.is_empty() {
                    messages.push(batch_message(epoch, floor, last, std::mem::take(&mut body)));
                    floor = last;
                }
                versions.clear();
                let mut solo = Vec::with_capacity(size);
                rel.clear();
                record.clear();
                codec::encode_relation(0, &c.relation, &mut rel);
                codec::encode_change(c, 0, &mut record);
                push_record(REC_RELATION, &rel, &mut solo);
                push_record(REC_CHANGE, &record, &mut solo);
                let chunks: Vec<&[u8]> = solo.chunks(max).collect();
                let n = u32::try_from(chunks.len()).map_err(|_| LogError::TooLarge(solo.len()))?;
                for (i, chunk) in chunks.into_iter().enumerate() {
                    let k = i as u32 + 1;
                    let mut h = headers(KIND_PART, epoch, floor, c.position);
                    h.insert(PART, format!("{k}/{n}").as_str());
                    // The writer in the id: a group another leader left
                    // incomplete is appended again whole, not de-duplicated in part.
                    let id = format!(
                        "{}:{}:{k}/{n}:{}",
                        epoch.0,
                        format_position(c.position),
                        self.writer
                    );
                    let newest = (k == n).then_some(c.position);
                    messages.push((h, Bytes::copy_from_slice(chunk), id, newest));
                }
                last = c.position;
                floor = last;
                continue;
            }
            if !body.is_empty() && body.len() + size > limit {
                messages.push(batch_message(epoch, floor, last, std::mem::take(&mut body)));
                floor = last;
                versions.clear();
                // The relation goes again in the next message: each is self-contained.
                record.clear();
                rel.clear();
                codec::encode_relation(0, &c.relation, &mut rel);
                codec::encode_change(c, 0, &mut record);
                versions.insert(c.relation.id, 0);
            } else if known.is_none() {
                versions.insert(c.relation.id, version);
            }
            if !rel.is_empty() {
                push_record(REC_RELATION, &rel, &mut body);
            }
            push_record(REC_CHANGE, &record, &mut body);
            last = c.position;
        }
        if !body.is_empty() {
            messages.push(batch_message(epoch, floor, last, body));
        }
        match self.rt.block_on(self.publish_all(messages, last_seq)) {
            Ok(_) => {}
            Err(LogError::Fenced(why)) => return Err(self.refused(why)),
            Err(e) => return Err(e),
        }
        let mut st = self.state();
        st.oldest = st.oldest.or(Some(first.position));
        st.records += changes.len() as u64;
        Ok(())
    }

    /// An acknowledged append is stored (fsynced first where the server runs with
    /// `sync_interval: always`, as Aether's NATS configuration does).
    fn sync(&self) -> Result<(), LogError> {
        Ok(())
    }

    fn read_after(
        &self,
        after: Position,
        max_bytes: usize,
        max_changes: usize,
        hint: Option<&ReadHint>,
    ) -> Result<Page, LogError> {
        let (floor, epoch) = {
            let st = self.state();
            (st.floor, st.epoch)
        };
        if after < floor {
            return Err(LogError::Gap {
                since: after,
                floor,
            });
        }
        self.rt.block_on(async {
            let mut s = self.stream().await?;
            let info = s
                .info()
                .await
                .map_err(|e| nats("reading the change stream", e))?;
            let (first, last) = (info.state.first_sequence, info.state.last_sequence);
            let start = match hint {
                Some(h) if h.last == after && h.offset >= first => h.offset,
                _ => self.find(&s, after, first, last).await?,
            };
            if start < first {
                return Err(LogError::Gap {
                    since: after,
                    floor,
                });
            }
            // The first message left begins after `after`: what came between
            // was dropped by retention (this node's floor may lag the stream's).
            if start == first
                && let Some(m) = self.message(&s, first).await?
                && let Ok(first_meta) = meta(Some(&m.headers))
                && (first_meta.floor > after
                    || matches!(first_meta.kind, Kind::Part(k, _) if k > 1))
            {
                // (A group whose first parts are gone: its change is lost too.)
                return Err(LogError::Gap {
                    since: after,
                    floor: first_meta.floor.max(first_meta.last),
                });
            }
            let page = self
                .read_from(&s, start, after, max_bytes, max_changes)
                .await?;
            // A message of another epoch (a reset since) ends what this history holds.
            if page.changes.iter().any(|c| c.epoch != epoch) {
                return Err(LogError::Gap {
                    since: after,
                    floor,
                });
            }
            Ok(page)
        })
    }

    /// The stream's limits drop the oldest messages; the floor follows them.
    fn enforce_retention(&self, _now: SystemTime) -> Result<(), LogError> {
        {
            let mut g = self.retention_at.lock().unwrap_or_else(|e| e.into_inner());
            if g.is_some_and(|at| at.elapsed() < RETENTION_EVERY) {
                return Ok(());
            }
            *g = Some(std::time::Instant::now());
        }
        // Only the leader's writer calls this; its mark is an append.
        let _gate = self.gate()?;
        self.rt.block_on(self.retention(true))
    }

    fn mark_reset_pending(&self) -> Result<(), LogError> {
        let _gate = self.gate()?;
        let (epoch, floor, newest, last_seq) = {
            let st = self.state();
            (
                st.epoch,
                st.floor,
                st.newest.unwrap_or(st.floor),
                st.last_seq,
            )
        };
        let h = headers(KIND_RESET_PENDING, epoch, floor, newest);
        let id = format!("{}:reset-pending:{last_seq}", epoch.0);
        let seq = self
            .rt
            .block_on(self.publish_all(vec![(h, Bytes::new(), id, None)], last_seq))?;
        let mut st = self.state();
        st.last_seq = seq;
        st.reset_pending = true;
        Ok(())
    }

    fn reset(&self, floor: Position) -> Result<Epoch, LogError> {
        let _gate = self.gate()?;
        let old = self.state().epoch;
        let epoch = loop {
            let e = Epoch::generate();
            if e != old {
                break e;
            }
        };
        let seq = self.rt.block_on(async {
            let s = self.stream().await?;
            s.purge()
                .await
                .map_err(|e| nats("purging the change stream", e))?;
            let last_seq = self.state().last_seq;
            let h = headers(KIND_EPOCH, epoch, floor, floor);
            self.publish_all(
                vec![(h, Bytes::new(), format!("{}:epoch", epoch.0), None)],
                last_seq,
            )
            .await
        })?;
        let mut st = self.state();
        *st = State {
            epoch,
            floor,
            last_seq: seq,
            applied_seq: seq,
            reset_pending: false,
            ..State::default()
        };
        Ok(epoch)
    }
}

/// Where a follower starts: the stream as the log read it when it opened,
/// taken at once so no change falls between the sequence and the position.
#[derive(Debug, Clone, Copy)]
pub struct StartPoint {
    pub seq: u64,
    pub newest: Option<Position>,
    pub epoch: Epoch,
}

impl JetStreamLog {
    /// Where a follower of this log starts now.
    pub fn start_point(&self) -> StartPoint {
        let st = self.state();
        StartPoint {
            seq: st.last_seq,
            newest: st.newest,
            epoch: st.epoch,
        }
    }
}

/// Whether the node's NATS connection is up, and what happened to it last.
#[derive(Debug, Clone)]
pub struct FollowStatus {
    /// Set while the stream cannot be read.
    pub error: Option<String>,
    /// Stream sequence of the last message handed to the router.
    pub consumed: u64,
    /// The epoch the router was last handed (0: the stream has none yet).
    pub epoch: Epoch,
}

impl Default for FollowStatus {
    fn default() -> FollowStatus {
        FollowStatus {
            error: None,
            consumed: 0,
            epoch: Epoch(0),
        }
    }
}

/// Every node's reader: hands the stream's changes, in order, from the message
/// after `after_seq` on, to this node's router. Returns at shutdown or when the
/// router is gone; a lost connection is retried from where it stopped.
/// `reconnects` changes whenever the client (re)connects: a consumer does not
/// survive its server's restart and would notice only when its heartbeats stop,
/// so a reconnect starts a new one at once.
pub async fn follow(
    log: Arc<JetStreamLog>,
    start: StartPoint,
    feed: mpsc::Sender<Feed>,
    status: watch::Sender<FollowStatus>,
    mut reconnects: watch::Receiver<u64>,
    shutdown: CancellationToken,
) {
    status.send_modify(|s| s.epoch = start.epoch);
    let mut place = Place {
        after_seq: start.seq,
        seen_seq: start.seq,
        relations: HashMap::new(),
        newest: start.newest,
        epoch: start.epoch,
        parts: Assembler::default(),
    };
    loop {
        let result = tokio::select! {
            biased;
            _ = shutdown.cancelled() => return,
            r = follow_once(&log, &mut place, &feed, &status, &mut reconnects) => r,
        };
        match result {
            Ok(()) => return, // the router is gone
            Err(e) => {
                tracing::warn!(error = %e, after_seq = place.after_seq, "reading the change stream; retrying");
                status.send_modify(|s| s.error = Some(e.to_string()));
                tokio::select! {
                    biased;
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                }
            }
        }
    }
}

/// Where a follower stands in the stream.
struct Place {
    after_seq: u64,
    /// The last message delivered, parts of a group included (the idle
    /// check's measure: `after_seq` waits for a group's end).
    seen_seq: u64,
    /// The relations last handed to the router, by table.
    relations: HashMap<TableId, Arc<Relation>>,
    newest: Option<Position>,
    epoch: Epoch,
    /// A change arriving in parts.
    parts: Assembler,
}

impl Place {
    /// A new history for this reader: after `floor` in `epoch` (`newest`: the
    /// position it now stands at). Its router is told (`false`: it is gone).
    async fn restart(
        &mut self,
        epoch: Epoch,
        floor: Position,
        newest: Option<Position>,
        feed: &mpsc::Sender<Feed>,
    ) -> bool {
        self.epoch = epoch;
        self.newest = newest;
        self.relations.clear();
        self.parts = Assembler::default();
        feed.send(Feed::Reset { epoch, floor }).await.is_ok()
    }
}

async fn follow_once(
    log: &JetStreamLog,
    place: &mut Place,
    feed: &mpsc::Sender<Feed>,
    status: &watch::Sender<FollowStatus>,
    reconnects: &mut watch::Receiver<u64>,
) -> Result<(), LogError> {
    reconnects.borrow_and_update();
    use async_nats::jetstream::consumer::{DeliverPolicy, pull::OrderedConfig};
    let s = log.stream().await?;
    let consumer = s
        .create_consumer(OrderedConfig {
            deliver_policy: DeliverPolicy::ByStartSequence {
                start_sequence: place.after_seq + 1,
            },
            ..Default::default()
        })
        .await
        .map_err(|e| nats("reading the change stream", e))?;
    let mut messages = consumer
        .messages()
        .await
        .map_err(|e| nats("reading the change stream", e))?;
    status.send_if_modified(|s| s.error.take().is_some());
    let mut idle_since = tokio::time::Instant::now();
    let mut bounds = tokio::time::interval(RETENTION_EVERY);
    bounds.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let m = tokio::select! {
            biased;
            m = messages.next() => match m {
                Some(m) => m,
                None => break,
            },
            // What retention dropped (the floor a `since` is checked against).
            _ = bounds.tick() => {
                log.retention(false).await?;
                continue;
            }
            // Quiet for a while: if the stream has more than was delivered, the
            // consumer is stuck (a purge under it, a lost server-side state).
            _ = tokio::time::sleep_until(idle_since + IDLE_CHECK) => {
                idle_since = tokio::time::Instant::now();
                let last = s.get_info().await.map_err(|e| nats("reading the change stream", e))?.state.last_sequence;
                if last > place.seen_seq {
                    return Err(LogError::Unavailable(format!(
                        "the stream holds up to sequence {last} but its reader stopped after {}: reading again",
                        place.after_seq
                    )));
                }
                continue;
            }
            r = reconnects.changed() => {
                if r.is_err() {
                    // No one reports reconnects any more: the stream is read as is.
                    std::future::pending::<()>().await;
                }
                return Err(LogError::Unavailable("NATS reconnected: reading the stream again".into()));
            }
        };
        idle_since = tokio::time::Instant::now();
        let m = m.map_err(|e| nats("reading the change stream", e))?;
        let seq = m
            .info()
            .map_err(|e| nats("a change stream message", e))?
            .stream_sequence;
        if seq <= place.after_seq {
            continue;
        }
        place.seen_seq = seq;
        let meta = meta(m.headers.as_ref())?;
        // A message of an epoch this reader never saw begin (its epoch
        // message expired before it read it): what it had is void.
        // What this reader had is void when the stream moved to an epoch it
        // never saw begin (its epoch message expired before it read it), or
        // when a message's floor (the newest position before it) is past what
        // it has: messages it never read were dropped by retention. Its router
        // cannot promise anything from before: a reset tells every
        // subscription `gap`.
        let starts = matches!(meta.kind, Kind::Changes | Kind::Part(1, _) | Kind::Mark);
        let lost = if meta.kind != Kind::Epoch
            && meta.kind != Kind::Unknown
            && meta.epoch != place.epoch
        {
            Some("the change stream moved to an epoch this node did not see begin")
        } else if starts && place.newest.is_some_and(|n| meta.floor > n) {
            Some("this node fell behind what the change stream retains")
        } else {
            None
        };
        if let Some(why) = lost {
            tracing::error!(epoch = %meta.epoch, floor = %meta.floor, "{why}: its subscriptions are told gap");
            if !place
                .restart(meta.epoch, meta.floor, Some(meta.floor), feed)
                .await
            {
                return Ok(());
            }
        }
        match meta.kind {
            Kind::Epoch => {
                if meta.epoch != place.epoch {
                    {
                        // The writer on this node may be ahead: it knows.
                        let mut st = log.state();
                        if seq > st.applied_seq {
                            st.applied_seq = seq;
                            st.epoch = meta.epoch;
                            st.floor = meta.floor;
                            st.newest = None;
                            st.oldest = None;
                            st.reset_pending = false;
                        }
                    }
                    if !place.restart(meta.epoch, meta.floor, None, feed).await {
                        return Ok(());
                    }
                } else {
                    let mut st = log.state();
                    if seq > st.applied_seq {
                        st.applied_seq = seq;
                        st.reset_pending = false;
                    }
                }
            }
            Kind::ResetPending => {
                let mut st = log.state();
                if seq > st.applied_seq {
                    st.applied_seq = seq;
                    st.reset_pending = true;
                }
            }
            Kind::Mark | Kind::Unknown => {}
            Kind::Changes | Kind::Part(..) => {
                let Some((body, _)) = place.parts.push(meta.kind, seq, &m.payload) else {
                    // Mid-group: where this reader stands moves at the group's end.
                    continue;
                };
                for (c, _) in decode_body(body, meta.epoch)? {
                    if place.newest.is_some_and(|n| c.position <= n) {
                        continue;
                    }
                    if place.relations.get(&c.relation.id) != Some(&c.relation) {
                        place
                            .relations
                            .insert(c.relation.id, Arc::clone(&c.relation));
                        if feed
                            .send(Feed::Relation(Arc::clone(&c.relation)))
                            .await
                            .is_err()
                        {
                            return Ok(());
                        }
                    }
                    place.newest = Some(c.position);
                    {
                        let mut st = log.state();
                        if st.newest < Some(c.position) {
                            st.newest = Some(c.position);
                        }
                        st.oldest = st.oldest.or(Some(c.position));
                    }
                    if feed.send(Feed::Change(c)).await.is_err() {
                        return Ok(());
                    }
                }
            }
        }
        place.after_seq = seq;
        let epoch = place.epoch;
        status.send_modify(|s| {
            s.consumed = seq;
            s.epoch = epoch;
        });
    }
    Err(LogError::Unavailable(
        "the change stream's consumer ended".into(),
    ))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use crate::conformance::{self, read_all};
    use crate::natsd::NatsServer;
    use aether_core::changes::{ChangeKind, Column};
    use serde_json::json;

    struct Fixture {
        rt: tokio::runtime::Runtime,
        nats: NatsServer,
    }

    fn fixture() -> Fixture {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        Fixture {
            rt,
            nats: NatsServer::start(),
        }
    }

    impl Fixture {
        fn open(&self, name: &str) -> JetStreamLog {
            self.open_aged(name, Duration::from_secs(3600))
        }

        fn open_aged(&self, name: &str, age: Duration) -> JetStreamLog {
            let client = self
                .rt
                .block_on(async_nats::connect(self.nats.url()))
                .unwrap();
            let opts = StreamOptions {
                name: name.into(),
                retention_age: age,
                retention_bytes: 1 << 30,
                replicas: 1,
            };
            JetStreamLog::open(self.rt.handle().clone(), client, opts).unwrap()
        }

        /// A new log reset to start after LSN 50.
        fn ready(&self, name: &str) -> JetStreamLog {
            let log = self.open(name);
            assert!(
                log.bounds().reset_pending,
                "a new stream waits for its reset"
            );
            log.reset(Position::new(PgLsn(50), u32::MAX)).unwrap();
            log
        }
    }

    fn rel(name: &str) -> Arc<Relation> {
        Arc::new(Relation {
            id: TableId(name.bytes().map(u32::from).sum()),
            schema: "public".into(),
            name: name.into(),
            qualified: Arc::from(format!("public.{name}").as_str()),
            replica_identity: b'f',
            columns: vec![Column {
                name: "body".into(),
                type_oid: 25,
                is_key: true,
                secret: false,
            }],
        })
    }

    fn change(rel: &Arc<Relation>, lsn: u64, text: String) -> Arc<RowChange> {
        Arc::new(RowChange::new(
            Position::new(PgLsn(lsn), 0),
            ChangeKind::Insert,
            Arc::clone(rel),
            Some(vec![Some(json!(text))]),
            None,
            lsn as i64,
        ))
    }

    #[test]
    fn the_stream_passes_the_change_log_conformance_tests() {
        let f = fixture();
        conformance::appends_read_back_in_order_with_their_values(&f.ready("CONF_A"));
        conformance::appends_are_refused_out_of_order_and_old_positions_are_gaps(
            &f.ready("CONF_B"),
        );
        conformance::a_reset_starts_a_new_epoch_after_its_floor(&f.ready("CONF_C"));
    }

    /// What one node appended another node reads back, whatever the batch sizes:
    /// batches above a message's size are cut into self-contained messages.
    #[test]
    fn another_node_reads_what_the_leader_appended_across_messages() {
        let f = fixture();
        let leader = f.ready("SHARED");
        let (a, b) = (rel("notes"), rel("files"));
        let big = "x".repeat(300_000);
        let changes: Vec<_> = (1..=12u64)
            .map(|i| {
                let r = if i % 2 == 0 { &a } else { &b };
                change(r, 100 + i, format!("{i}:{big}"))
            })
            .collect();
        leader.append(&changes[..7]).unwrap();
        leader.append(&changes[7..]).unwrap();
        let other = f.open("SHARED");
        let bo = other.bounds();
        assert_eq!(bo.epoch, leader.bounds().epoch);
        assert_eq!(bo.newest, Some(changes[11].position));
        assert_eq!(bo.oldest, Some(changes[0].position));
        assert!(!bo.reset_pending);
        let back = read_all(&other, bo.floor, 700_000);
        assert_eq!(back.len(), 12);
        for (x, y) in back.iter().zip(&changes) {
            assert_eq!(
                (x.position, &x.relation.qualified),
                (y.position, &y.relation.qualified)
            );
            assert!(x.new == y.new, "the values of {} came back", x.position);
        }
        // A resume from the middle finds its place by position.
        let rest = read_all(&other, changes[4].position, 1 << 20);
        assert_eq!(rest.first().map(|c| c.position), Some(changes[5].position));
        assert_eq!(rest.len(), 7);
    }

    /// A row larger than a message travels in parts, between whole batches,
    /// and comes back whole to readers and followers.
    #[test]
    fn a_row_larger_than_a_message_travels_in_parts() {
        let f = fixture();
        let leader = f.ready("PARTS").with_max_message(64 << 10);
        let r = rel("big");
        let big = |i: u64| change(&r, 100 * i, format!("{i}:{}", "y".repeat(200_000)));
        let small = |i: u64| change(&r, 100 * i, format!("{i}"));
        let node = Arc::new(f.open("PARTS"));
        let start = node.start_point();
        let (tx, mut rx) = mpsc::channel(64);
        let (status, _) = watch::channel(FollowStatus::default());
        let (_reconnects_tx, reconnects) = watch::channel(0);
        let shutdown = CancellationToken::new();
        let task = f.rt.spawn(follow(
            Arc::clone(&node),
            start,
            tx,
            status,
            reconnects,
            shutdown.clone(),
        ));
        let changes = vec![small(1), big(2), small(3), small(4), big(5)];
        leader.append(&changes[..3]).unwrap();
        leader.append(&changes[3..]).unwrap();
        let reader = f.open("PARTS");
        assert_eq!(reader.bounds().newest, Some(changes[4].position));
        // The epoch, small 1, big 2 in 4 parts, small 3, small 4, big 5 in 4.
        assert_eq!(reader.last_sequence(), 12, "the big rows went in parts");
        for page in [1, 100_000, 1 << 22] {
            let back = read_all(&reader, reader.bounds().floor, page);
            assert_eq!(back.len(), 5, "page {page}");
            for (x, y) in back.iter().zip(&changes) {
                assert_eq!(x.position, y.position);
                assert!(x.new == y.new, "{} came back whole", x.position);
            }
        }
        // From the middle of a group's history.
        let rest = read_all(&reader, changes[1].position, 1);
        assert_eq!(rest.len(), 3);
        let fed: Vec<Position> = f.rt.block_on(async {
            let mut got = Vec::new();
            while got.len() < 5 {
                match tokio::time::timeout(Duration::from_secs(10), rx.recv())
                    .await
                    .expect("the feed goes on")
                    .unwrap()
                {
                    Feed::Change(c) => {
                        assert!(c.new == changes[got.len()].new);
                        got.push(c.position);
                    }
                    Feed::Relation(_) => {}
                    Feed::Reset { .. } => panic!("no reset here"),
                }
            }
            got
        });
        assert_eq!(fed, changes.iter().map(|c| c.position).collect::<Vec<_>>());
        shutdown.cancel();
        f.rt.block_on(task).unwrap();
    }

    /// Age never empties a quiet stream: the leader keeps a mark in it, so a
    /// node opening it later knows its epoch and where its history stands,
    /// and a `since` from before what expired is a gap.
    #[test]
    fn a_quiet_stream_keeps_its_epoch_and_floor_past_its_age() {
        let f = fixture();
        let age = Duration::from_secs(2);
        let leader = f.open_aged("QUIET", age);
        leader.reset(Position::new(PgLsn(50), u32::MAX)).unwrap();
        let r = rel("t");
        let (a, b) = (change(&r, 100, "a".into()), change(&r, 200, "b".into()));
        leader.append(&[Arc::clone(&a), Arc::clone(&b)]).unwrap();
        let epoch = leader.bounds().epoch;
        // The leader's retention runs until the changes have expired.
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            f.rt.block_on(leader.retention(true)).unwrap();
            let reader = f.open_aged("QUIET", age);
            if reader.bounds().floor == b.position {
                let bo = reader.bounds();
                assert_eq!(
                    (bo.epoch, bo.newest, bo.reset_pending),
                    (epoch, Some(b.position), false)
                );
                assert!(matches!(
                    reader.read_after(a.position, 1 << 20, 100, None),
                    Err(LogError::Gap { .. })
                ));
                let page = reader.read_after(b.position, 1 << 20, 100, None).unwrap();
                assert!(page.changes.is_empty() && page.end);
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the changes expired behind a mark"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// A leader that lost its place (another appended after it) is fenced, and
    /// appends nothing.
    #[test]
    fn a_deposed_leader_is_fenced() {
        let f = fixture();
        let old = f.ready("FENCE");
        let r = rel("t");
        old.append(&[change(&r, 100, "a".into())]).unwrap();
        let new = f.open("FENCE");
        new.append(&[change(&r, 200, "b".into())]).unwrap();
        let err = old.append(&[change(&r, 300, "c".into())]).unwrap_err();
        assert!(matches!(err, LogError::Fenced(_)), "{err}");
        new.refresh().unwrap();
        assert_eq!(new.bounds().newest, Some(Position::new(PgLsn(200), 0)));
        // A successor's claim fences at once, before it appends anything.
        let third = f.open("FENCE");
        third.claim().unwrap();
        let err = new.append(&[change(&r, 400, "d".into())]).unwrap_err();
        assert!(matches!(err, LogError::Fenced(_)), "{err}");
        third.append(&[change(&r, 400, "d".into())]).unwrap();
        // A node told it lost the leadership appends nothing more.
        third.depose();
        let err = third.append(&[change(&r, 500, "e".into())]).unwrap_err();
        assert!(matches!(err, LogError::Fenced(_)), "{err}");
        let reader = f.open("FENCE");
        assert_eq!(reader.bounds().newest, Some(Position::new(PgLsn(400), 0)));
    }

    /// Every node's reader gets every change once, in order, with a reset in the
    /// middle, from where it started on.
    #[test]
    fn follow_feeds_changes_and_resets_in_order() {
        let f = fixture();
        let leader = f.ready("FOLLOW");
        let r = rel("t");
        leader.append(&[change(&r, 100, "before".into())]).unwrap();
        let node = Arc::new(f.open("FOLLOW"));
        let start = node.start_point();
        let (tx, mut rx) = mpsc::channel(64);
        let (status, _) = watch::channel(FollowStatus::default());
        let shutdown = CancellationToken::new();
        let (_reconnects_tx, reconnects) = watch::channel(0);
        let task = f.rt.spawn(follow(
            Arc::clone(&node),
            start,
            tx,
            status,
            reconnects,
            shutdown.clone(),
        ));
        leader
            .append(&[change(&r, 200, "1".into()), change(&r, 300, "2".into())])
            .unwrap();
        let next = |rx: &mut mpsc::Receiver<Feed>| {
            let item = f.rt.block_on(async {
                tokio::time::timeout(Duration::from_secs(10), rx.recv())
                    .await
                    .expect("the feed goes on")
                    .unwrap()
            });
            match item {
                Feed::Change(c) => format!(
                    "change {} {} {}",
                    c.position.commit_lsn.0,
                    c.new.as_ref().unwrap()[0].as_ref().unwrap(),
                    c.epoch
                ),
                Feed::Relation(r) => format!("relation {}", r.qualified),
                Feed::Reset { epoch, floor } => format!("reset {epoch} {floor}"),
            }
        };
        let old = leader.bounds().epoch;
        let seen: Vec<String> = (0..3).map(|_| next(&mut rx)).collect();
        assert_eq!(
            seen,
            [
                "relation public.t".to_owned(),
                format!("change 200 \"1\" {old}"),
                format!("change 300 \"2\" {old}"),
            ]
        );
        // A reset purges the stream under the follower's feet; it goes on with
        // the new epoch.
        let floor = Position::new(PgLsn(1000), u32::MAX);
        let epoch = leader.reset(floor).unwrap();
        leader.append(&[change(&r, 2000, "3".into())]).unwrap();
        let seen: Vec<String> = (0..3).map(|_| next(&mut rx)).collect();
        assert_eq!(
            seen,
            [
                format!("reset {epoch} {floor}"),
                "relation public.t".to_owned(),
                format!("change 2000 \"3\" {epoch}"),
            ]
        );
        assert_eq!(node.bounds().epoch, epoch);
        shutdown.cancel();
        f.rt.block_on(task).unwrap();
    }
}
