//! The names the agent's resolver answers itself (README, "Names and
//! DNS"): every node in this node's map as `NAME.DOMAIN` (A and AAAA),
//! the coordinator's extra records, and PTR for overlay addresses.
//!
//! Built whole from the map on every change that touches a name or an
//! address (`agent::state` emits `Output::Dns`), then swapped in: a lookup
//! never sees half a rename, and building 10,000 names is a few
//! milliseconds, far below how often maps change. A peer the policy hides
//! is not in the map, so it has no name here either.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use super::settings::{canonical, DnsSettings, RecordKind};

/// One name's addresses.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Addrs {
    pub v4: Vec<Ipv4Addr>,
    pub v6: Vec<Ipv6Addr>,
}

/// One node as the zone needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeName {
    /// Its name in the network (a DNS label: the coordinator made it one).
    pub name: String,
    pub v4: Ipv4Addr,
    pub v6: Ipv6Addr,
}

/// What the agent state tells the resolver: the settings and every node's
/// name (this one's first), and the network's /48 (`Output::Dns`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DnsView {
    pub settings: DnsSettings,
    pub nodes: Vec<NodeName>,
    pub ula: Option<ipnet::Ipv6Net>,
}

impl DnsView {
    /// The zone this view describes.
    pub fn zone(&self) -> Zone {
        Zone::build(&self.settings, &self.nodes, self.ula)
    }
}

/// What the zone says about a name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup<'a> {
    /// Ours, with these addresses (a family may be empty: no data).
    Found(&'a Addrs),
    /// Under the network's domain (or an overlay reverse name) but no
    /// such name: NXDOMAIN, never forwarded.
    NoSuchName,
    /// Not the network's: forward it.
    NotOurs,
}

/// The resolver's own names.
#[derive(Debug, Clone, Default)]
pub struct Zone {
    domain: String,
    names: HashMap<String, Addrs>,
    reverse: HashMap<IpAddr, String>,
    /// The network's IPv6 /48, whose reverse names are ours.
    ula: Option<ipnet::Ipv6Net>,
}

impl Zone {
    /// The zone of `settings` and `nodes` (this node among them).
    pub fn build(settings: &DnsSettings, nodes: &[NodeName], ula: Option<ipnet::Ipv6Net>) -> Zone {
        let mut z = Zone {
            domain: canonical(&settings.domain),
            ula,
            ..Zone::default()
        };
        for n in nodes {
            let fqdn = format!("{}.{}", canonical(&n.name), z.domain);
            let a = z.names.entry(fqdn.clone()).or_default();
            a.v4.push(n.v4);
            a.v6.push(n.v6);
            z.reverse.insert(IpAddr::V4(n.v4), fqdn.clone());
            z.reverse.insert(IpAddr::V6(n.v6), fqdn);
        }
        for r in &settings.extra_records {
            let a = z.names.entry(canonical(&r.name)).or_default();
            match (r.kind, r.value) {
                (RecordKind::A, IpAddr::V4(v4)) => a.v4.push(v4),
                (RecordKind::Aaaa, IpAddr::V6(v6)) => a.v6.push(v6),
                // `DnsSettings::checked` refuses a mismatch.
                _ => {}
            }
        }
        for a in z.names.values_mut() {
            a.v4.sort();
            a.v4.dedup();
            a.v6.sort();
            a.v6.dedup();
        }
        z
    }

    /// The network's domain.
    pub fn domain(&self) -> &str {
        &self.domain
    }

    /// How many names it holds.
    pub fn len(&self) -> usize {
        self.names.len()
    }

    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }

    /// Looks up `name` (any case, with or without the trailing dot).
    pub fn lookup(&self, name: &str) -> Lookup<'_> {
        let name = canonical(name);
        if let Some(a) = self.names.get(&name) {
            return Lookup::Found(a);
        }
        if !self.domain.is_empty()
            && (name == self.domain || name.ends_with(&format!(".{}", self.domain)))
        {
            return Lookup::NoSuchName;
        }
        Lookup::NotOurs
    }

    /// What a reverse lookup of `ip` finds.
    pub fn reverse(&self, ip: IpAddr) -> Reverse<'_> {
        if let Some(n) = self.reverse.get(&ip) {
            return Reverse::Name(n);
        }
        let overlay = match ip {
            IpAddr::V4(v4) => crate::control::bounds::OVERLAY_V4.contains(&v4),
            IpAddr::V6(v6) => self.ula.is_some_and(|u| u.contains(&v6)),
        };
        if overlay {
            Reverse::Unused
        } else {
            Reverse::NotOverlay
        }
    }
}

/// What the zone says about an address's reverse name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reverse<'a> {
    /// A node's: its name.
    Name(&'a str),
    /// An overlay address nobody has: NXDOMAIN.
    Unused,
    /// Not an overlay address: forward the query.
    NotOverlay,
}

/// The address a reverse name (`4.3.2.1.in-addr.arpa`, the 32 nibbles of
/// `ip6.arpa`) stands for; `None` for any other name.
pub fn reverse_name_ip(name: &str) -> Option<IpAddr> {
    let name = canonical(name);
    if let Some(rest) = name.strip_suffix(".in-addr.arpa") {
        let octets: Vec<u8> = rest
            .split('.')
            .map(|o| o.parse().ok())
            .collect::<Option<Vec<u8>>>()?;
        let [d, c, b, a] = octets.as_slice() else {
            return None;
        };
        return Some(IpAddr::V4(Ipv4Addr::new(*a, *b, *c, *d)));
    }
    let rest = name.strip_suffix(".ip6.arpa")?;
    let nibbles: Vec<u8> = rest
        .split('.')
        .map(|n| {
            (n.len() == 1)
                .then(|| u8::from_str_radix(n, 16).ok())
                .flatten()
        })
        .collect::<Option<Vec<u8>>>()?;
    if nibbles.len() != 32 {
        return None;
    }
    let v = nibbles
        .iter()
        .rev()
        .fold(0u128, |acc, n| (acc << 4) | u128::from(*n));
    Some(IpAddr::V6(Ipv6Addr::from(v)))
}

/// The reverse name of `ip`, as PTR queries ask it.
pub fn reverse_name(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => {
            let [a, b, c, d] = v4.octets();
            format!("{d}.{c}.{b}.{a}.in-addr.arpa")
        }
        IpAddr::V6(v6) => {
            let mut out = String::with_capacity(72);
            for byte in v6.octets().iter().rev() {
                out.push_str(&format!("{:x}.{:x}.", byte & 0xf, byte >> 4));
            }
            out.push_str("ip6.arpa");
            out
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dns::settings::ExtraRecord;

    fn zone() -> Zone {
        let mut s = DnsSettings::default();
        s.extra_records.push(ExtraRecord {
            name: "grafana.warren.internal".into(),
            kind: RecordKind::A,
            value: "100.64.9.9".parse().unwrap(),
        });
        let nodes = [NodeName {
            name: "laptop".into(),
            v4: "100.64.0.2".parse().unwrap(),
            v6: "fd7a:115c:a1e0::6440:2".parse().unwrap(),
        }];
        Zone::build(&s, &nodes, "fd7a:115c:a1e0::/48".parse().ok())
    }

    #[test]
    fn nodes_and_extra_records_answer_in_any_case() {
        let z = zone();
        match z.lookup("LAPTOP.warren.internal.") {
            Lookup::Found(a) => {
                assert_eq!(a.v4, vec!["100.64.0.2".parse::<Ipv4Addr>().unwrap()]);
                assert_eq!(a.v6.len(), 1);
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(z.lookup("grafana.warren.internal"), Lookup::Found(a) if a.v6.is_empty()));
        assert_eq!(z.lookup("nobody.warren.internal"), Lookup::NoSuchName);
        assert_eq!(z.lookup("warren.internal"), Lookup::NoSuchName);
        assert_eq!(z.lookup("example.com"), Lookup::NotOurs);
        assert_eq!(z.lookup("notwarren.internal"), Lookup::NotOurs);
    }

    #[test]
    fn reverse_names_round_trip_and_overlay_addresses_are_ours() {
        let z = zone();
        for ip in [
            "100.64.0.2",
            "fd7a:115c:a1e0::6440:2",
            "8.8.8.8",
            "2001:db8::1",
        ] {
            let ip: IpAddr = ip.parse().unwrap();
            assert_eq!(reverse_name_ip(&reverse_name(ip)), Some(ip), "{ip}");
        }
        assert_eq!(
            reverse_name(IpAddr::V4("100.64.0.2".parse().unwrap())),
            "2.0.64.100.in-addr.arpa"
        );
        assert_eq!(
            z.reverse("100.64.0.2".parse().unwrap()),
            Reverse::Name("laptop.warren.internal")
        );
        assert_eq!(z.reverse("100.64.0.3".parse().unwrap()), Reverse::Unused);
        assert_eq!(
            z.reverse("fd7a:115c:a1e0::1".parse().unwrap()),
            Reverse::Unused
        );
        assert_eq!(z.reverse("8.8.8.8".parse().unwrap()), Reverse::NotOverlay);
        assert_eq!(reverse_name_ip("1.2.3.in-addr.arpa"), None);
        assert_eq!(reverse_name_ip("x.ip6.arpa"), None);
    }
}
