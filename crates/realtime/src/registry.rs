//! Every open WebSocket connection: for connection limits, stats, presence and
//! reaping peers that stopped answering pings. A std mutex, never held across an await.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

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
    /// Cancelled to close the connection (cleanup, reaping).
    pub close: CancellationToken,
}

#[derive(Default)]
struct Inner {
    conns: HashMap<u64, ConnEntry>,
    per_user: HashMap<String, usize>,
}

#[derive(Default)]
pub struct Registry {
    inner: Mutex<Inner>,
    total: AtomicU64,
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

    /// Admits a connection under the per-user and global limits.
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
        let n = g.per_user.get(&entry.user_key).copied().unwrap_or(0);
        if n >= per_user {
            return Err(LimitError::PerUser(per_user));
        }
        g.per_user.insert(entry.user_key.clone(), n + 1);
        g.conns.insert(session, entry);
        self.total.fetch_add(1, Ordering::Relaxed);
        Ok(n + 1)
    }

    /// Removes a connection; returns its user id and how many connections that user still has.
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
        Some((e.user_id, left))
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
        if let Some(n) = g.per_user.get_mut(&old) {
            *n -= 1;
            if *n == 0 {
                g.per_user.remove(&old);
            }
        }
        *g.per_user.entry(user_id.to_owned()).or_insert(0) += 1;
        if let Some(e) = g.conns.get_mut(&session) {
            e.user_key = user_id.to_owned();
            e.user_id = Some(user_id.to_owned());
        }
    }

    pub fn user_connections(&self, user_id: &str) -> usize {
        self.lock().per_user.get(user_id).copied().unwrap_or(0)
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
            if e.last_seen.load(Ordering::Relaxed) < cutoff && !e.close.is_cancelled() {
                e.close.cancel();
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
            close: CancellationToken::new(),
        }
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
}
