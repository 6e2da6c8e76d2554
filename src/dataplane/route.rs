//! Cryptokey routing: which peer owns a destination address.
//!
//! Every packet read from the TUN device is looked up here by destination,
//! and every packet decrypted from a peer is checked here by source (a peer
//! may only send from addresses it owns, as in WireGuard). Longest-prefix
//! match comes from `prefix-trie`, a tree-bitmap that stays fast with
//! thousands of peers; this module only splits IPv4 from IPv6.

use std::net::IpAddr;

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use prefix_trie::PrefixMap;

#[derive(Clone)]
pub struct RouteTable<T> {
    v4: PrefixMap<Ipv4Net, T>,
    v6: PrefixMap<Ipv6Net, T>,
}

impl<T> Default for RouteTable<T> {
    fn default() -> Self {
        RouteTable {
            v4: PrefixMap::new(),
            v6: PrefixMap::new(),
        }
    }
}

impl<T> RouteTable<T> {
    /// Adds a route; a later insert of the same prefix replaces the owner,
    /// as `wg set … allowed-ips` moves a prefix between peers.
    pub fn insert(&mut self, net: IpNet, value: T) -> Option<T> {
        match net.trunc() {
            IpNet::V4(n) => self.v4.insert(n, value),
            IpNet::V6(n) => self.v6.insert(n, value),
        }
    }

    pub fn remove(&mut self, net: IpNet) -> Option<T> {
        match net.trunc() {
            IpNet::V4(n) => self.v4.remove(&n),
            IpNet::V6(n) => self.v6.remove(&n),
        }
    }

    /// The owner of the most specific prefix containing `addr`.
    pub fn lookup(&self, addr: IpAddr) -> Option<&T> {
        match addr {
            IpAddr::V4(a) => self.v4.get_lpm(&Ipv4Net::from(a)).map(|(_, v)| v),
            IpAddr::V6(a) => self.v6.get_lpm(&Ipv6Net::from(a)).map(|(_, v)| v),
        }
    }

    /// The owner of exactly `net`, to change it in place.
    pub fn lookup_exact(&mut self, net: IpNet) -> Option<&mut T> {
        match net.trunc() {
            IpNet::V4(n) => self.v4.get_mut(&n),
            IpNet::V6(n) => self.v6.get_mut(&n),
        }
    }

    /// Every owner of a prefix containing `addr`, least specific first.
    pub fn covering(&self, addr: IpAddr) -> Box<dyn Iterator<Item = &T> + '_> {
        match addr {
            IpAddr::V4(a) => Box::new(self.v4.cover_values(&Ipv4Net::from(a))),
            IpAddr::V6(a) => Box::new(self.v6.cover_values(&Ipv6Net::from(a))),
        }
    }

    pub fn len(&self) -> usize {
        self.v4.len() + self.v6.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Removes every prefix whose owner matches `pred`.
    pub fn retain(&mut self, mut keep: impl FnMut(&T) -> bool) {
        let v4: Vec<Ipv4Net> = self
            .v4
            .iter()
            .filter(|(_, v)| !keep(v))
            .map(|(k, _)| k)
            .collect();
        for k in v4 {
            self.v4.remove(&k);
        }
        let v6: Vec<Ipv6Net> = self
            .v6
            .iter()
            .filter(|(_, v)| !keep(v))
            .map(|(k, _)| k)
            .collect();
        for k in v6 {
            self.v6.remove(&k);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }
    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn longest_prefix_wins() {
        let mut t = RouteTable::default();
        t.insert(net("100.64.0.0/10"), 1);
        t.insert(net("100.64.0.7/32"), 2);
        t.insert(net("0.0.0.0/0"), 0);
        assert_eq!(t.lookup(ip("100.64.0.7")), Some(&2));
        assert_eq!(t.lookup(ip("100.64.0.8")), Some(&1));
        assert_eq!(t.lookup(ip("8.8.8.8")), Some(&0));
        assert_eq!(t.lookup(ip("fd00::1")), None);
    }

    #[test]
    fn v6_and_host_bits_are_ignored() {
        let mut t = RouteTable::default();
        t.insert(net("fd7a:115c:a1e0::5/48"), 'a');
        assert_eq!(t.lookup(ip("fd7a:115c:a1e0:1::9")), Some(&'a'));
        assert_eq!(t.remove(net("fd7a:115c:a1e0::/48")), Some('a'));
        assert!(t.is_empty());
    }

    #[test]
    fn retain_drops_a_peer_everywhere() {
        let mut t = RouteTable::default();
        t.insert(net("10.0.0.0/24"), 1);
        t.insert(net("fd00::/64"), 1);
        t.insert(net("10.0.1.0/24"), 2);
        t.retain(|v| *v != 1);
        assert_eq!(t.len(), 1);
        assert_eq!(t.lookup(ip("10.0.1.1")), Some(&2));
    }
}
