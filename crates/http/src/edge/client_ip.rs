//! The client's address: the TCP peer, or, when the peer is one of
//! `TRUSTED_PROXIES`, the address its `X-Forwarded-For` names. Rate limits and
//! per-address WebSocket counting all go through [`ClientIp`].

use std::net::{IpAddr, SocketAddr};

use axum::http::HeaderMap;

/// The client address of one request, put in its extensions by the HTTP edge.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientIp(pub IpAddr);

/// One `TRUSTED_PROXIES` entry: an address or a CIDR block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Block {
    net: IpAddr,
    prefix: u8,
}

impl Block {
    fn parse(s: &str) -> Result<Block, String> {
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let net: IpAddr = addr
            .trim()
            .parse()
            .map_err(|_| format!("{s:?} is not an IP address or CIDR block"))?;
        let net = net.to_canonical();
        let max = if net.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => match p.trim().parse::<u8>() {
                Ok(n) if n <= max => n,
                _ => return Err(format!("{s:?}: the prefix length must be 0-{max}")),
            },
        };
        Ok(Block { net, prefix })
    }

    fn contains(&self, ip: IpAddr) -> bool {
        match (self.net, ip.to_canonical()) {
            (IpAddr::V4(n), IpAddr::V4(a)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(n) & mask == u32::from(a) & mask
            }
            (IpAddr::V6(n), IpAddr::V6(a)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(n) & mask == u128::from(a) & mask
            }
            _ => false,
        }
    }
}

/// `TRUSTED_PROXIES`: the peers whose `X-Forwarded-For` is believed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TrustedProxies(Vec<Block>);

/// At most this many `X-Forwarded-For` entries are looked at (from the right):
/// no real chain of proxies is longer, and the work per request stays bounded.
const MAX_HOPS: usize = 16;

impl TrustedProxies {
    /// Comma-separated addresses and CIDR blocks (`10.0.0.0/8, ::1`); empty: none.
    pub fn parse(s: &str) -> Result<TrustedProxies, String> {
        s.split(',')
            .map(str::trim)
            .filter(|p| !p.is_empty())
            .map(Block::parse)
            .collect::<Result<Vec<_>, _>>()
            .map(TrustedProxies)
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        self.0.iter().any(|b| b.contains(ip))
    }

    /// The client behind `peer`: the peer itself unless it is trusted; then the
    /// right-most `X-Forwarded-For` entry that is not a trusted proxy (entries
    /// left of it were written by the client and prove nothing). An entry that is
    /// not an address stops the walk at the proxy that wrote it.
    pub fn client_ip(&self, peer: IpAddr, headers: &HeaderMap) -> IpAddr {
        let peer = peer.to_canonical();
        if !self.contains(peer) {
            return peer;
        }
        let mut client = peer;
        let entries = headers
            .get_all("x-forwarded-for")
            .iter()
            .rev()
            .flat_map(|v| v.to_str().unwrap_or("?").rsplit(','));
        for entry in entries.take(MAX_HOPS) {
            let Some(ip) = parse_entry(entry) else {
                return client;
            };
            client = ip;
            if !self.contains(ip) {
                return ip;
            }
        }
        client
    }
}

/// `203.0.113.7`, `2001:db8::1`, and the `addr:port` / `[v6]:port` forms some
/// proxies write.
fn parse_entry(s: &str) -> Option<IpAddr> {
    let s = s.trim();
    s.parse::<IpAddr>()
        .or_else(|_| s.parse::<SocketAddr>().map(|a| a.ip()))
        .ok()
        .map(|ip| ip.to_canonical())
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn xff(values: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in values {
            h.append("x-forwarded-for", HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn blocks_parse_and_match() {
        let t = TrustedProxies::parse(" 10.0.0.0/8, 127.0.0.1 ,fd00::/8,").unwrap();
        assert!(t.contains(ip("10.1.2.3")));
        assert!(t.contains(ip("127.0.0.1")));
        assert!(!t.contains(ip("127.0.0.2")));
        assert!(t.contains(ip("fd12::1")));
        assert!(!t.contains(ip("fe80::1")));
        // IPv4-mapped IPv6 peers (a dual-stack listener) match their IPv4 block.
        assert!(t.contains(ip("::ffff:10.9.9.9")));
        assert!(
            TrustedProxies::parse("0.0.0.0/0")
                .unwrap()
                .contains(ip("8.8.8.8"))
        );
        assert!(TrustedProxies::parse("").unwrap().is_empty());
        for bad in [
            "10.0.0.0/33",
            "::/129",
            "example.com",
            "10.0.0.1/x",
            "1.2.3",
        ] {
            assert!(TrustedProxies::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn forwarded_for_is_believed_only_from_trusted_peers() {
        let t = TrustedProxies::parse("10.0.0.0/8").unwrap();
        let h = xff(&["198.51.100.9, 203.0.113.7"]);
        // Untrusted peer: its header is ignored.
        assert_eq!(t.client_ip(ip("192.0.2.1"), &h), ip("192.0.2.1"));
        // Trusted peer: the right-most untrusted entry.
        assert_eq!(t.client_ip(ip("10.0.0.5"), &h), ip("203.0.113.7"));
        // Trusted hops are skipped; a spoofed left part is not reached.
        let h = xff(&["1.1.1.1, 203.0.113.7, 10.0.0.9"]);
        assert_eq!(t.client_ip(ip("10.0.0.5"), &h), ip("203.0.113.7"));
        // Several header lines read as one list, the last line being the nearest.
        let h = xff(&["1.1.1.1", "203.0.113.8:4431", "10.0.0.9"]);
        assert_eq!(t.client_ip(ip("10.0.0.5"), &h), ip("203.0.113.8"));
        let h = xff(&["[2001:db8::7]:443"]);
        assert_eq!(t.client_ip(ip("10.0.0.5"), &h), ip("2001:db8::7"));
        // No header: the proxy itself.
        assert_eq!(
            t.client_ip(ip("10.0.0.5"), &HeaderMap::new()),
            ip("10.0.0.5")
        );
        // Garbage stops at the hop that wrote it.
        let h = xff(&["203.0.113.7, garbage, 10.0.0.9"]);
        assert_eq!(t.client_ip(ip("10.0.0.5"), &h), ip("10.0.0.9"));
        // Only trusted entries: the left-most of them.
        let h = xff(&["10.0.0.1, 10.0.0.2"]);
        assert_eq!(t.client_ip(ip("10.0.0.5"), &h), ip("10.0.0.1"));
        // Nothing trusted: always the peer.
        let none = TrustedProxies::default();
        assert_eq!(
            none.client_ip(ip("10.0.0.5"), &xff(&["203.0.113.7"])),
            ip("10.0.0.5")
        );
    }

    #[test]
    fn long_chains_stop_after_a_bounded_number_of_hops() {
        let t = TrustedProxies::parse("10.0.0.0/8").unwrap();
        let chain = vec!["10.0.0.1"; 1000].join(",");
        let h = xff(&[&format!("203.0.113.7,{chain}")]);
        assert_eq!(t.client_ip(ip("10.0.0.5"), &h), ip("10.0.0.1"));
    }
}
