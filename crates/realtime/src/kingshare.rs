//! The KingShare WebSocket API (seed 002): `{"type":"PascalCase","data":{…}}`
//! messages about a user's files, shares and presence.
//!
//! File and share events are derived from the change stream (the WAL), so a row
//! deleted by plain SQL yields `FileDeleted` like an API delete does:
//! - `public.files` INSERT → `FileUploaded`, DELETE → `FileDeleted` (to the owner);
//! - `public.shares` INSERT → `FileShared`, an `access_count` increase →
//!   `ShareAccessed`, `expired_at` set → `ShareExpired` (to the share's owner).
//!
//! `UploadProgress`, `DownloadStarted`, `SystemNotification`, `UserOnline` and
//! `UserOffline` are notifications about things that are not row changes; they are
//! sent directly to the connections concerned.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use serde_json::{Value, json};

use aether_core::changes::{ChangeKind, Row, RowChange};
use aether_router::Outbound;

/// KingShare error codes (seed 002).
pub mod code {
    pub const INVALID_MESSAGE: &str = "INVALID_MESSAGE";
    pub const AUTHENTICATION_REQUIRED: &str = "AUTHENTICATION_REQUIRED";
    pub const INVALID_TOKEN: &str = "INVALID_TOKEN";
    pub const RATE_LIMITED: &str = "RATE_LIMITED";
    pub const CONNECTION_LIMIT: &str = "CONNECTION_LIMIT";
    pub const INTERNAL_ERROR: &str = "INTERNAL_ERROR";
}

pub fn message(kind: &str, data: Value) -> String {
    json!({"type": kind, "data": data}).to_string()
}

/// `{"type":"Pong"}`: messages the document shows without `data`.
pub fn message_without_data(kind: &str) -> String {
    json!({ "type": kind }).to_string()
}

pub fn error(code: &str, text: &str) -> String {
    message("Error", json!({"code": code, "message": text}))
}

struct Target {
    tx: aether_router::queue::QueueTx<Outbound>,
}

/// Connections that receive KingShare messages, by user.
#[derive(Default)]
pub struct Notifier {
    inner: Mutex<NotifierInner>,
    /// Cluster mode: what is sent here is sent on the other nodes too.
    bus: std::sync::OnceLock<Arc<dyn crate::hub::ChannelBus>>,
}

#[derive(Default)]
struct NotifierInner {
    by_user: HashMap<String, HashMap<u64, Target>>,
    all: HashMap<u64, Target>,
}

impl Notifier {
    fn lock(&self) -> std::sync::MutexGuard<'_, NotifierInner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn register(
        &self,
        session: u64,
        user: Option<&str>,
        tx: aether_router::queue::QueueTx<Outbound>,
    ) {
        let mut g = self.lock();
        if let Some(u) = user {
            g.by_user
                .entry(u.to_owned())
                .or_default()
                .insert(session, Target { tx: tx.clone() });
        }
        g.all.insert(session, Target { tx });
    }

    /// Moves a connection under a user (after `Authenticate`).
    pub fn authenticate(&self, session: u64, user: &str) {
        let mut g = self.lock();
        let Some(t) = g.all.get(&session).map(|t| Target { tx: t.tx.clone() }) else {
            return;
        };
        for sessions in g.by_user.values_mut() {
            sessions.remove(&session);
        }
        g.by_user.retain(|_, s| !s.is_empty());
        g.by_user
            .entry(user.to_owned())
            .or_default()
            .insert(session, t);
    }

    pub fn unregister(&self, session: u64) {
        let mut g = self.lock();
        g.all.remove(&session);
        for sessions in g.by_user.values_mut() {
            sessions.remove(&session);
        }
        g.by_user.retain(|_, s| !s.is_empty());
    }

    /// Cluster mode: [`Notifier::to_user`] and [`Notifier::to_all`] reach the
    /// other nodes' connections too.
    pub fn attach_bus(&self, bus: Arc<dyn crate::hub::ChannelBus>) {
        let _ = self.bus.set(bus);
    }

    fn announce(&self, user: Option<&str>, frame: &str) {
        if let Some(bus) = self.bus.get() {
            bus.announce(crate::hub::Announcement::KingShare {
                user: user.map(str::to_owned),
                frame: frame.to_owned(),
            });
        }
    }

    /// Sends to every KingShare connection of `user`, on every node. A full
    /// queue closes that connection rather than waiting.
    pub fn to_user(&self, user: &str, frame: &str) {
        self.announce(Some(user), frame);
        self.to_user_here(user, frame);
    }

    /// Sends to every KingShare connection, on every node.
    pub fn to_all(&self, frame: &str) {
        self.announce(None, frame);
        self.to_all_here(frame);
    }

    /// Sends to `user`'s connections on this node only: for what every node
    /// learns by itself (row changes), or was told by another.
    pub fn to_user_here(&self, user: &str, frame: &str) {
        let g = self.lock();
        if let Some(sessions) = g.by_user.get(user) {
            let f: Arc<str> = Arc::from(frame);
            for t in sessions.values() {
                deliver(t, &f);
            }
        }
    }

    /// Sends to every KingShare connection on this node only.
    pub fn to_all_here(&self, frame: &str) {
        let g = self.lock();
        let f: Arc<str> = Arc::from(frame);
        for t in g.all.values() {
            deliver(t, &f);
        }
    }
}

fn deliver(t: &Target, f: &Arc<str>) {
    super::offer(&t.tx, Outbound::Frame(Arc::clone(f)), "kingshare");
}

fn text<'r>(change: &RowChange, row: &'r Row, col: &str) -> Option<&'r Value> {
    change.relation.value(row, col)
}

/// The KingShare messages a change yields, with the user each goes to.
pub fn events_for(change: &RowChange) -> Vec<(String, String)> {
    let rel = &change.relation;
    let owner_of = |row: &Row| {
        text(change, row, "owner_id")
            .and_then(Value::as_str)
            .map(str::to_owned)
    };
    let field = |row: &Row, col: &str| text(change, row, col).cloned().unwrap_or(Value::Null);
    let mut out = Vec::new();
    match (rel.schema.as_str(), rel.name.as_str(), change.kind) {
        ("public", "files", ChangeKind::Insert) => {
            if let Some(new) = &change.new
                && let Some(owner) = owner_of(new)
            {
                let data = json!({"file_id": field(new, "id"), "filename": field(new, "name"), "size": field(new, "size")});
                out.push((owner, message("FileUploaded", data)));
            }
        }
        ("public", "files", ChangeKind::Delete) => {
            if let Some(old) = &change.old
                && let Some(owner) = owner_of(old)
            {
                let data = json!({"file_id": field(old, "id"), "filename": field(old, "name")});
                out.push((owner, message("FileDeleted", data)));
            }
        }
        ("public", "shares", ChangeKind::Insert) => {
            if let Some(new) = &change.new
                && let Some(owner) = owner_of(new)
            {
                let data = json!({"share_id": field(new, "id"), "file_id": field(new, "file_id"), "share_token": field(new, "token")});
                out.push((owner, message("FileShared", data)));
            }
        }
        ("public", "shares", ChangeKind::Update) => {
            let (Some(new), Some(old)) = (&change.new, &change.old) else {
                return out;
            };
            let Some(owner) = owner_of(new) else {
                return out;
            };
            let count = |row: &Row| field(row, "access_count").as_i64().unwrap_or(0);
            if count(new) > count(old) {
                let data = json!({"share_id": field(new, "id"), "file_id": field(new, "file_id"), "filename": field(new, "filename")});
                out.push((owner.clone(), message("ShareAccessed", data)));
            }
            if field(old, "expired_at").is_null() && !field(new, "expired_at").is_null() {
                let data = json!({"share_id": field(new, "id"), "file_id": field(new, "file_id")});
                out.push((owner, message("ShareExpired", data)));
            }
        }
        _ => {}
    }
    out
}

/// Tells the related users that `user_id` came online (`online`) or went offline.
pub async fn announce_presence(state: &crate::Realtime, user_id: &str, online: bool) {
    let (name, related) = state.directory.presence(user_id).await;
    let frame = message(
        if online { "UserOnline" } else { "UserOffline" },
        json!({"user_id": user_id, "username": name}),
    );
    for other in related {
        state.kingshare.to_user(&other, &frame);
    }
}

/// A `SystemNotification` level KingShare knows (docs/kingshare.md).
pub fn valid_level(level: &str) -> bool {
    matches!(level, "Info" | "Warning" | "Error" | "Success")
}
