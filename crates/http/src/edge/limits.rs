//! Concurrent connection caps, checked at `accept` before any byte is read:
//! `HTTP_MAX_CONNECTIONS` in all and `HTTP_MAX_CONNECTIONS_PER_ADDR` per peer
//! address. A socket counts from `accept` until it is closed, upgraded WebSockets
//! included, because what runs out is file descriptors.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// `HTTP_MAX_CONNECTIONS_PER_ADDR` reached for this address.
    PerAddress(usize),
    /// `HTTP_MAX_CONNECTIONS` reached.
    Total(usize),
}

#[derive(Default)]
struct Counts {
    total: usize,
    /// Only addresses with open connections: at most one entry per open socket.
    per_addr: HashMap<IpAddr, usize>,
}

/// The counts; a std mutex held for a few instructions, never across an await.
pub struct ConnLimits {
    max_total: usize,
    max_per_addr: usize,
    counts: Mutex<Counts>,
    /// `aether_http_connections`: open sockets.
    gauge: metrics::Gauge,
}

/// One admitted connection; dropping it gives its place back.
pub struct ConnGuard {
    limits: Arc<ConnLimits>,
    /// `None`: not counted per address (a trusted proxy, or no per-address cap).
    addr: Option<IpAddr>,
}

impl ConnLimits {
    /// `0` turns a cap off.
    pub fn new(max_total: usize, max_per_addr: usize) -> Arc<ConnLimits> {
        Arc::new(ConnLimits {
            max_total,
            max_per_addr,
            counts: Mutex::new(Counts::default()),
            gauge: metrics::gauge!("aether_http_connections"),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Counts> {
        // Counts stay consistent even if a holder panicked (it cannot, but a
        // poisoned lock must not refuse every connection from then on).
        self.counts.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Admits a connection from `addr`; `exempt` skips the per-address cap (a
    /// trusted proxy carries many clients).
    pub fn admit(self: &Arc<Self>, addr: IpAddr, exempt: bool) -> Result<ConnGuard, Refusal> {
        let mut c = self.lock();
        if self.max_total > 0 && c.total >= self.max_total {
            return Err(Refusal::Total(self.max_total));
        }
        let per_addr = self.max_per_addr > 0 && !exempt;
        if per_addr {
            let n = c.per_addr.entry(addr).or_insert(0);
            if *n >= self.max_per_addr {
                return Err(Refusal::PerAddress(self.max_per_addr));
            }
            *n += 1;
        }
        c.total += 1;
        self.gauge.increment(1.0);
        Ok(ConnGuard {
            limits: Arc::clone(self),
            addr: per_addr.then_some(addr),
        })
    }

    /// Open connections in all.
    pub fn open(&self) -> usize {
        self.lock().total
    }
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        let mut c = self.limits.lock();
        c.total = c.total.saturating_sub(1);
        self.limits.gauge.decrement(1.0);
        if let Some(addr) = self.addr
            && let Some(n) = c.per_addr.get_mut(&addr)
        {
            *n = n.saturating_sub(1);
            if *n == 0 {
                c.per_addr.remove(&addr);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn caps_per_address_and_in_all_and_give_places_back() {
        let l = ConnLimits::new(5, 2);
        let a1 = l.admit(ip("127.0.0.1"), false).unwrap();
        let _a2 = l.admit(ip("127.0.0.1"), false).unwrap();
        assert_eq!(
            l.admit(ip("127.0.0.1"), false).err(),
            Some(Refusal::PerAddress(2))
        );
        // Another address, and an exempt (trusted proxy) one, still get in.
        let _b = l.admit(ip("127.0.0.2"), false).unwrap();
        let _p1 = l.admit(ip("127.0.0.1"), true).unwrap();
        let _p2 = l.admit(ip("127.0.0.3"), true).unwrap();
        assert_eq!(l.open(), 5);
        assert_eq!(
            l.admit(ip("127.0.0.9"), true).err(),
            Some(Refusal::Total(5))
        );
        drop(a1);
        assert_eq!(l.open(), 4);
        let _a3 = l.admit(ip("127.0.0.1"), false).unwrap();
        // The map only holds addresses with open connections.
        drop(_b);
        assert!(!l.lock().per_addr.contains_key(&ip("127.0.0.2")));
    }

    #[test]
    fn zero_turns_caps_off() {
        let l = ConnLimits::new(0, 0);
        let guards: Vec<_> = (0..1000)
            .map(|_| l.admit(ip("127.0.0.1"), false).unwrap())
            .collect();
        assert_eq!(l.open(), 1000);
        assert!(l.lock().per_addr.is_empty());
        drop(guards);
        assert_eq!(l.open(), 0);
    }
}
