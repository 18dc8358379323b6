//! Every open WebSocket connection: for connection limits, stats, presence and
//! reaping peers that stopped answering pings. A std mutex, never held across an await.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use aether_router::Outbound;
use aether_router::queue::{Signal, Signaller};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitError {
    /// `RATE_LIMIT_CONNECTIONS` for this user (or address) reached.
    PerUser(usize),
    /// `WS_MAX_CONNECTIONS` reached.
    Global(usize),
}

impl std::fmt::Display for LimitError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LimitError::PerUser(n) => write!(f, "too many connections for this user (limit {n})"),
            LimitError::Global(n) => write!(f, "the server is at its connection limit ({n})"),
        }
    }
}

/// One live connection.
pub struct ConnEntry {
    /// User id, or `anon:<address>` for anonymous connections.
    pub user_key: String,
    pub user_id: Option<String>,
    pub client_id: Arc<str>,
    /// Milliseconds since the Unix epoch of the last frame from the peer.
    pub last_seen: Arc<AtomicI64>,
    /// Raises `Reaped` on the connection's queue when it is reaped.
    pub close: Signaller<Outbound>,
}

#[derive(Default)]
struct Inner {
    conns: HashMap<u64, ConnEntry>,
    per_user: HashMap<String, usize>,
    /// Cluster mode: other nodes' connections per user key, by node (only
    /// keys with connections), so per-user limits hold across the cluster.
    elsewhere: HashMap<String, HashMap<String, usize>>,
}

impl Inner {
    fn elsewhere(&self, key: &str) -> usize {
        self.elsewhere.get(key).map_or(0, |m| m.values().sum())
    }
}

#[derive(Default)]
pub struct Registry {
    inner: Mutex<Inner>,
    total: AtomicU64,
    /// Cluster mode: this node's per-user counts are announced to the others.
    bus: std::sync::OnceLock<Arc<dyn crate::hub::ChannelBus>>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct ConnStats {
    pub active: usize,
    pub total: u64,
    pub unique_users: usize,
    pub connections_by_user: HashMap<String, usize>,
}

pub fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

impl Registry {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding this lock cannot leave it inconsistent in a way that
        // matters more than refusing every connection afterwards would.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Cluster mode: per-user counts are shared with the other nodes.
    pub fn attach_bus(&self, bus: Arc<dyn crate::hub::ChannelBus>) {
        let _ = self.bus.set(bus);
    }

    fn announce(&self, user_key: &str, count: usize) {
        if let Some(bus) = self.bus.get() {
            bus.announce(crate::hub::Announcement::Connections {
                user_key: user_key.to_owned(),
                count,
            });
        }
    }

    /// Another node's connection count for a user key.
    pub fn set_elsewhere(&self, node: &str, user_key: String, count: usize) {
        let mut g = self.lock();
        if count == 0 {
            if let Some(m) = g.elsewhere.get_mut(&user_key) {
                m.remove(node);
                if m.is_empty() {
                    g.elsewhere.remove(&user_key);
                }
            }
        } else {
            g.elsewhere
                .entry(user_key)
                .or_default()
                .insert(node.to_owned(), count);
        }
    }

    /// All another node's counts (what it said when it joined, or was asked).
    pub fn replace_elsewhere(&self, node: &str, counts: HashMap<String, usize>) {
        self.forget_node(node);
        for (key, n) in counts {
            self.set_elsewhere(node, key, n);
        }
    }

    /// Another node is gone: its connections with it.
    pub fn forget_node(&self, node: &str) {
        let mut g = self.lock();
        g.elsewhere.retain(|_, m| {
            m.remove(node);
            !m.is_empty()
        });
    }

    /// This node's connections per user key.
    pub fn local_counts(&self) -> HashMap<String, usize> {
        self.lock().per_user.clone()
    }

    /// Admits a connection under the per-user (across the cluster) and global
    /// (this node's) limits; returns the user's connections, all nodes'.
    pub fn admit(
        &self,
        session: u64,
        entry: ConnEntry,
        per_user: usize,
        global: usize,
    ) -> Result<usize, LimitError> {
        let mut g = self.lock();
        if g.conns.len() >= global {
            return Err(LimitError::Global(global));
        }
        let here = g.per_user.get(&entry.user_key).copied().unwrap_or(0);
        let n = here + g.elsewhere(&entry.user_key);
        if n >= per_user {
            return Err(LimitError::PerUser(per_user));
        }
        g.per_user.insert(entry.user_key.clone(), here + 1);
        self.announce(&entry.user_key, here + 1);
        g.conns.insert(session, entry);
        self.total.fetch_add(1, Ordering::Relaxed);
        Ok(n + 1)
    }

    /// Removes a connection; returns its user id and how many connections that
    /// user still has, on every node.
    pub fn remove(&self, session: u64) -> Option<(Option<String>, usize)> {
        let mut g = self.lock();
        let e = g.conns.remove(&session)?;
        let left = match g.per_user.get_mut(&e.user_key) {
            Some(n) if *n > 1 => {
                *n -= 1;
                *n
            }
            _ => {
                g.per_user.remove(&e.user_key);
                0
            }
        };
        self.announce(&e.user_key, left);
        Some((e.user_id, left + g.elsewhere(&e.user_key)))
    }

    /// Moves a connection to another user key (an anonymous connection that authenticated).
    pub fn rekey(&self, session: u64, user_id: &str) {
        let mut g = self.lock();
        let Some(old) = g.conns.get(&session).map(|e| e.user_key.clone()) else {
            return;
        };
        if old == user_id {
            return;
        }
        let mut old_left = 0;
        if let Some(n) = g.per_user.get_mut(&old) {
            *n -= 1;
            old_left = *n;
            if *n == 0 {
                g.per_user.remove(&old);
            }
        }
        self.announce(&old, old_left);
        let new = g.per_user.entry(user_id.to_owned()).or_insert(0);
        *new += 1;
        let new = *new;
        self.announce(user_id, new);
        if let Some(e) = g.conns.get_mut(&session) {
            e.user_key = user_id.to_owned();
            e.user_id = Some(user_id.to_owned());
        }
    }

    /// A user's connections, on every node.
    pub fn user_connections(&self, user_id: &str) -> usize {
        let g = self.lock();
        g.per_user.get(user_id).copied().unwrap_or(0) + g.elsewhere(user_id)
    }

    pub fn stats(&self) -> ConnStats {
        let g = self.lock();
        let by_user: HashMap<String, usize> = g
            .conns
            .values()
            .filter_map(|e| e.user_id.clone())
            .fold(HashMap::new(), |mut m, u| {
                *m.entry(u).or_insert(0) += 1;
                m
            });
        ConnStats {
            active: g.conns.len(),
            total: self.total.load(Ordering::Relaxed),
            unique_users: by_user.len(),
            connections_by_user: by_user,
        }
    }

    /// Closes connections silent for longer than `idle`; returns how many.
    pub fn reap(&self, idle: Duration) -> usize {
        let cutoff = now_ms() - i64::try_from(idle.as_millis()).unwrap_or(i64::MAX);
        let g = self.lock();
        let mut n = 0;
        for e in g.conns.values() {
            if e.last_seen.load(Ordering::Relaxed) < cutoff && e.close.raise(Signal::Reaped) {
                n += 1;
            }
        }
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(user: &str) -> ConnEntry {
        ConnEntry {
            user_key: user.into(),
            user_id: Some(user.into()),
            client_id: Arc::from("c"),
            last_seen: Arc::new(AtomicI64::new(now_ms())),
            close: aether_router::queue::channel(1).0.signaller(),
        }
    }

    #[test]
    fn a_silent_connection_is_reaped_once() {
        let r = Registry::default();
        let (tx, rx) = aether_router::queue::channel::<Outbound>(1);
        let mut silent = entry("u");
        silent.close = tx.signaller();
        silent.last_seen.store(now_ms() - 60_000, Ordering::Relaxed);
        r.admit(1, silent, 5, 5).unwrap();
        r.admit(2, entry("v"), 5, 5).unwrap();
        assert_eq!(r.reap(Duration::from_secs(30)), 1);
        assert_eq!(rx.closing(), Some(Signal::Reaped));
        assert_eq!(r.reap(Duration::from_secs(30)), 0, "told once");
    }

    #[test]
    fn limits_and_counts() {
        let r = Registry::default();
        assert_eq!(r.admit(1, entry("u"), 2, 3), Ok(1));
        assert_eq!(r.admit(2, entry("u"), 2, 3), Ok(2));
        assert_eq!(r.admit(3, entry("u"), 2, 3), Err(LimitError::PerUser(2)));
        assert_eq!(r.admit(3, entry("v"), 2, 3), Ok(1));
        assert_eq!(r.admit(4, entry("w"), 2, 3), Err(LimitError::Global(3)));
        assert_eq!(r.stats().unique_users, 2);
        assert_eq!(r.remove(1), Some((Some("u".into()), 1)));
        assert_eq!(r.remove(2), Some((Some("u".into()), 0)));
        assert_eq!(r.user_connections("u"), 0);
        assert_eq!(r.stats().total, 3);
    }

    #[test]
    fn other_nodes_connections_count_toward_a_users_limit() {
        let r = Registry::default();
        r.set_elsewhere("n2", "u".into(), 1);
        assert_eq!(r.admit(1, entry("u"), 2, 10), Ok(2));
        assert_eq!(r.admit(2, entry("u"), 2, 10), Err(LimitError::PerUser(2)));
        // n2's connection closed: room again.
        r.set_elsewhere("n2", "u".into(), 0);
        assert_eq!(r.admit(2, entry("u"), 2, 10), Ok(2));
        r.replace_elsewhere("n3", [("u".to_owned(), 5)].into_iter().collect());
        assert_eq!(r.user_connections("u"), 7);
        // Leaving while n3's are there: the user is still online elsewhere.
        assert_eq!(r.remove(1), Some((Some("u".into()), 6)));
        r.forget_node("n3");
        assert_eq!(r.remove(2), Some((Some("u".into()), 0)));
        assert!(r.lock().elsewhere.is_empty());
    }
}
