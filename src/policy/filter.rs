//! A node's compiled packet filter: the form it travels in to the agent
//! (the map stream, `policy filter --json`) and the stateless match the
//! data plane runs on the first packet of a flow (the connection table in
//! `dataplane::conntrack` lets the rest of the flow through without it).
//!
//! The wire form is Tailscale's compiled filter in spirit and documented in
//! the README ("Compiled filter"): a packet to this node, or to a route it
//! serves, is allowed when some rule lists its protocol, covers its source
//! and covers its destination address and port (ports are ignored for
//! protocols without them).

use std::net::IpAddr;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use super::selector::{has_ports, PortRange};
use crate::dataplane::route::RouteTable;

#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct FilterRule {
    pub proto: Vec<u8>,
    pub src: Vec<IpNet>,
    pub dst: Vec<DstNet>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct DstNet {
    pub net: IpNet,
    /// `[first, last]`, inclusive.
    #[serde(with = "ports_pair")]
    pub ports: PortRange,
}

mod ports_pair {
    use super::PortRange;
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub fn serialize<S: Serializer>(p: &PortRange, s: S) -> Result<S::Ok, S::Error> {
        [p.first, p.last].serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<PortRange, D::Error> {
        let [first, last] = <[u16; 2]>::deserialize(d)?;
        if last < first {
            return Err(serde::de::Error::custom("port range ends before it starts"));
        }
        Ok(PortRange { first, last })
    }
}

/// Most rules a filter from the coordinator may hold; a bigger one is
/// refused by the agent rather than walked on every new flow.
pub const MAX_RULES: usize = 20_000;

/// The stateless part of the agent's filter.
///
/// The rules are indexed by source prefix (`RouteTable`, a prefix trie),
/// so a packet is checked against the rules whose sources cover it, not
/// against all of them: with a rule per peer that is one or two rules
/// whatever the policy's size (`examples/firewall_bench.rs`).
#[derive(Clone, Default)]
pub struct PacketFilter {
    /// `None`: no policy, everything is allowed (Tailscale's default).
    rules: Option<Vec<FilterRule>>,
    /// Source prefix → indices of the rules listing it.
    by_src: RouteTable<Vec<u32>>,
}

impl PartialEq for PacketFilter {
    fn eq(&self, other: &Self) -> bool {
        self.rules == other.rules
    }
}

impl Eq for PacketFilter {}

impl std::fmt::Debug for PacketFilter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PacketFilter")
            .field("rules", &self.rules)
            .finish()
    }
}

/// The fields of a packet the filter looks at.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Flow {
    pub proto: u8,
    pub src: IpAddr,
    pub dst: IpAddr,
    /// Zero for protocols without ports.
    pub src_port: u16,
    pub dst_port: u16,
}

impl PacketFilter {
    pub fn allow_all() -> Self {
        PacketFilter::default()
    }

    pub fn new(rules: Vec<FilterRule>) -> Self {
        let mut by_src: RouteTable<Vec<u32>> = RouteTable::default();
        for (i, r) in rules.iter().enumerate() {
            for s in &r.src {
                let i = u32::try_from(i).unwrap_or(u32::MAX);
                match by_src.lookup_exact(*s) {
                    Some(list) => list.push(i),
                    None => {
                        by_src.insert(*s, vec![i]);
                    }
                }
            }
        }
        PacketFilter {
            rules: Some(rules),
            by_src,
        }
    }

    /// The rules whose sources cover `src`.
    fn candidates<'a>(
        &'a self,
        rules: &'a [FilterRule],
        src: IpAddr,
    ) -> impl Iterator<Item = &'a FilterRule> + 'a {
        self.by_src
            .covering(src)
            .flatten()
            .filter_map(move |&i| rules.get(i as usize))
    }

    pub fn is_allow_all(&self) -> bool {
        self.rules.is_none()
    }

    pub fn rules(&self) -> Option<&[FilterRule]> {
        self.rules.as_deref()
    }

    /// Whether some rule allows the packet.
    pub fn allows(&self, f: &Flow) -> bool {
        let Some(rules) = &self.rules else {
            return true;
        };
        let ports = has_ports(f.proto);
        self.candidates(rules, f.src).any(|r| {
            r.proto.contains(&f.proto)
                && r.dst
                    .iter()
                    .any(|d| d.net.contains(&f.dst) && (!ports || d.ports.contains(f.dst_port)))
        })
    }

    /// Whether some rule allows `proto` from `src` to `dst` on some port:
    /// for fragments after the first, which carry no ports.
    pub fn allows_addrs(&self, proto: u8, src: IpAddr, dst: IpAddr) -> bool {
        let Some(rules) = &self.rules else {
            return true;
        };
        self.candidates(rules, src)
            .any(|r| r.proto.contains(&proto) && r.dst.iter().any(|d| d.net.contains(&dst)))
    }
}

/// One thing a node's filter lets a peer do: a protocol, and for TCP, UDP
/// and SCTP a port range. What `warren status` prints per peer ("allows
/// you: tcp/22, tcp/443") and the coordinator's `GET /reach` carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Allowance {
    pub proto: u8,
    #[serde(with = "ports_pair")]
    pub ports: PortRange,
}

impl std::fmt::Display for Allowance {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let name = super::eval::proto_name(self.proto);
        if !has_ports(self.proto) {
            return f.write_str(&name);
        }
        match (self.ports.first, self.ports.last) {
            (0, u16::MAX) => write!(f, "{name}/*"),
            (a, b) if a == b => write!(f, "{name}/{a}"),
            (a, b) => write!(f, "{name}/{a}-{b}"),
        }
    }
}

/// What `rules` (a node's filter) let a node with the addresses `from` do
/// to the addresses `to` (the filter's node itself, not the routes it
/// serves): every (protocol, port range) once, sorted. A walk over the
/// rules, not the index: it answers a person, not a packet.
pub fn reach(rules: &[FilterRule], from: &[IpAddr], to: &[IpAddr]) -> Vec<Allowance> {
    let mut out: Vec<Allowance> = Vec::new();
    for r in rules {
        if !r.src.iter().any(|s| from.iter().any(|ip| s.contains(ip))) {
            continue;
        }
        for d in r
            .dst
            .iter()
            .filter(|d| to.iter().any(|ip| d.net.contains(ip)))
        {
            for &proto in &r.proto {
                let ports = if has_ports(proto) {
                    d.ports
                } else {
                    PortRange::ALL
                };
                let a = Allowance { proto, ports };
                if !out.contains(&a) {
                    out.push(a);
                }
            }
        }
    }
    out.sort();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(proto: &[u8], src: &str, dst: &str, ports: (u16, u16)) -> FilterRule {
        FilterRule {
            proto: proto.to_vec(),
            src: vec![src.parse().unwrap()],
            dst: vec![DstNet {
                net: dst.parse().unwrap(),
                ports: PortRange {
                    first: ports.0,
                    last: ports.1,
                },
            }],
        }
    }

    fn flow(proto: u8, src: &str, dst: &str, port: u16) -> Flow {
        Flow {
            proto,
            src: src.parse().unwrap(),
            dst: dst.parse().unwrap(),
            src_port: 40000,
            dst_port: port,
        }
    }

    #[test]
    fn a_packet_needs_protocol_source_destination_and_port() {
        let f = PacketFilter::new(vec![rule(
            &[6, 1],
            "100.64.0.1/32",
            "100.64.0.2/32",
            (22, 22),
        )]);
        assert!(f.allows(&flow(6, "100.64.0.1", "100.64.0.2", 22)));
        assert!(!f.allows(&flow(6, "100.64.0.1", "100.64.0.2", 80)), "port");
        assert!(
            !f.allows(&flow(17, "100.64.0.1", "100.64.0.2", 22)),
            "protocol"
        );
        assert!(
            !f.allows(&flow(6, "100.64.0.3", "100.64.0.2", 22)),
            "source"
        );
        assert!(
            !f.allows(&flow(6, "100.64.0.1", "100.64.0.9", 22)),
            "destination"
        );
        assert!(
            f.allows(&flow(1, "100.64.0.1", "100.64.0.2", 0)),
            "ICMP has no ports"
        );
        assert!(PacketFilter::allow_all().allows(&flow(6, "1.2.3.4", "5.6.7.8", 1)));
        assert!(!PacketFilter::new(vec![]).allows(&flow(6, "100.64.0.1", "100.64.0.2", 22)));
    }

    #[test]
    fn reach_lists_what_a_peer_may_do_to_this_node_only() {
        let rules = vec![
            rule(&[6, 17], "100.64.0.1/32", "100.64.0.2/32", (22, 22)),
            rule(&[6], "100.64.0.0/10", "100.64.0.2/32", (8000, 8100)),
            rule(&[1], "100.64.0.1/32", "100.64.0.2/32", (0, 0)),
            rule(&[6], "100.64.0.1/32", "10.33.0.0/16", (0, 65535)),
            rule(&[6], "100.64.0.9/32", "100.64.0.2/32", (443, 443)),
        ];
        let me: Vec<IpAddr> = vec!["100.64.0.1".parse().unwrap()];
        let node: Vec<IpAddr> = vec!["100.64.0.2".parse().unwrap()];
        let got: Vec<String> = reach(&rules, &me, &node)
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(got, ["icmp", "tcp/22", "tcp/8000-8100", "udp/22"]);
        let other: Vec<IpAddr> = vec!["100.64.0.7".parse().unwrap()];
        assert_eq!(reach(&rules, &other, &node).len(), 1, "only the /10 rule");
        assert!(
            reach(&rules, &me, &other).is_empty(),
            "not the filter's node"
        );
        let all = Allowance {
            proto: 17,
            ports: PortRange::ALL,
        };
        assert_eq!(all.to_string(), "udp/*");
        let json = serde_json::to_string(&all).unwrap();
        assert_eq!(json, r#"{"proto":17,"ports":[0,65535]}"#);
    }

    #[test]
    fn the_wire_form_is_the_documented_one() {
        let r = rule(&[6], "100.64.0.0/10", "100.80.1.2/32", (22, 22));
        let json = serde_json::to_string(&r).unwrap();
        assert_eq!(
            json,
            r#"{"proto":[6],"src":["100.64.0.0/10"],"dst":[{"net":"100.80.1.2/32","ports":[22,22]}]}"#
        );
        assert_eq!(serde_json::from_str::<FilterRule>(&json).unwrap(), r);
        let backwards = r#"{"proto":[6],"src":[],"dst":[{"net":"100.80.1.2/32","ports":[9,1]}]}"#;
        assert!(serde_json::from_str::<FilterRule>(backwards).is_err());
    }
}
