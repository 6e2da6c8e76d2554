//! The policy-routing rules that keep warren's own traffic out of its own
//! routes (README, "Subnet routers and exit nodes"; `docs/architecture.md`,
//! "Routing without loops").
//!
//! The routes into the tunnel (subnet routes, an exit node's default
//! routes) live in table [`sockmark::TABLE`]. These rules, the same for
//! IPv4 and IPv6, decide who reaches that table, in order of priority:
//!
//! | pref | match | action | why |
//! |---|---|---|---|
//! | 5200 | to each coordinator address | main table | its HTTP client (reqwest) offers no hook to mark its sockets |
//! | 5210 | warren's mark | main table | the agent's own sockets (`crate::sockmark`) |
//! | 5250 | warren's mark | unreachable | a marked packet the main table cannot route fails rather than loop |
//! | 5260 | to each local network | main table | `--exit-node-allow-lan-access` |
//! | 5270 | everything | table 87 | the routes into the tunnel |
//!
//! Written with netlink (`netlink-packet-route`, the crates `route_manager`
//! already brings, which has routes but no rules), one request per rule:
//! the set changes when the routes do, never per packet. The rules are
//! recognised by their priorities, so a run killed before it cleaned up
//! has its rules removed by the next one ([`remove_all`]).

use std::io;
use std::net::IpAddr;

use ipnet::IpNet;
use netlink_packet_core::{
    NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_CREATE, NLM_F_EXCL,
    NLM_F_REQUEST,
};
use netlink_packet_route::rule::{RuleAction, RuleAttribute, RuleMessage};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};

use crate::sockmark;

/// The main routing table's number.
const MAIN: u8 = 254;

/// The priorities of warren's rules (see the module doc).
pub const PREF_COORDINATOR: u32 = 5200;
pub const PREF_MARKED: u32 = 5210;
pub const PREF_MARKED_UNREACHABLE: u32 = 5250;
pub const PREF_LAN: u32 = 5260;
pub const PREF_TABLE: u32 = 5270;
const ALL_PREFS: [u32; 5] = [
    PREF_COORDINATOR,
    PREF_MARKED,
    PREF_MARKED_UNREACHABLE,
    PREF_LAN,
    PREF_TABLE,
];

/// One rule, as warren writes them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Rule {
    pub pref: u32,
    pub v6: bool,
    /// Only packets to this prefix.
    pub to: Option<IpNet>,
    /// Only packets carrying warren's mark.
    pub marked: bool,
    /// Look up this table; `None` is "unreachable".
    pub table: Option<u8>,
}

/// The rules for tunnel routes in use: `coordinator` addresses and `lan`
/// prefixes (empty unless an exit node is used with LAN access) go by the
/// main table.
pub fn wanted(coordinator: &[IpAddr], lan: &[IpNet]) -> Vec<Rule> {
    let mut out = Vec::new();
    for v6 in [false, true] {
        let family = |a: &IpAddr| a.is_ipv6() == v6;
        for a in coordinator.iter().filter(|a| family(a)) {
            out.push(Rule {
                pref: PREF_COORDINATOR,
                v6,
                to: Some(IpNet::from(*a)),
                marked: false,
                table: Some(MAIN),
            });
        }
        let marked = |pref, table| Rule {
            pref,
            v6,
            to: None,
            marked: true,
            table,
        };
        out.push(marked(PREF_MARKED, Some(MAIN)));
        out.push(marked(PREF_MARKED_UNREACHABLE, None));
        for net in lan.iter().filter(|n| family(&n.addr())) {
            out.push(Rule {
                pref: PREF_LAN,
                v6,
                to: Some(net.trunc()),
                marked: false,
                table: Some(MAIN),
            });
        }
        out.push(Rule {
            pref: PREF_TABLE,
            v6,
            to: None,
            marked: false,
            table: Some(sockmark::TABLE),
        });
    }
    out.sort();
    out.dedup();
    out
}

fn message(rule: &Rule) -> RuleMessage {
    let mut m = RuleMessage::default();
    m.header.family = if rule.v6 {
        AddressFamily::Inet6
    } else {
        AddressFamily::Inet
    };
    match rule.table {
        Some(t) => {
            m.header.action = RuleAction::ToTable;
            m.header.table = t;
            m.attributes.push(RuleAttribute::Table(u32::from(t)));
        }
        None => m.header.action = RuleAction::Unreachable,
    }
    m.attributes.push(RuleAttribute::Priority(rule.pref));
    if rule.marked {
        m.attributes.push(RuleAttribute::FwMark(sockmark::MARK));
        m.attributes.push(RuleAttribute::FwMask(sockmark::MASK));
    }
    if let Some(to) = rule.to {
        m.header.dst_len = to.prefix_len();
        m.attributes.push(RuleAttribute::Destination(to.network()));
    }
    m
}

/// Sends one request and reads its acknowledgement.
pub(super) fn request(msg: RouteNetlinkMessage, flags: u16) -> io::Result<()> {
    let mut socket = Socket::new(NETLINK_ROUTE)?;
    socket.bind_auto()?;
    socket.connect(&SocketAddr::new(0, 0))?;
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | NLM_F_ACK | flags;
    let mut packet = NetlinkMessage::new(header, NetlinkPayload::from(msg));
    packet.finalize();
    let mut buf = vec![0; packet.header.length as usize];
    packet.serialize(&mut buf[..]);
    socket.send(&buf, 0)?;
    let mut answer = vec![0; 4096];
    let n = socket.recv(&mut &mut answer[..], 0)?;
    let reply = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&answer[..n])
        .map_err(|e| io::Error::other(format!("netlink answer: {e}")))?;
    match reply.payload {
        NetlinkPayload::Error(e) if e.code.is_some() => Err(e.to_io()),
        _ => Ok(()),
    }
}

/// Puts `addr`/128 on interface `ifindex` as a deprecated address without
/// duplicate address detection: usable at once, bindable, and never picked
/// as a source by the kernel (RFC 6724 avoids deprecated addresses). The
/// resolver's IPv6 address is one: with a /128 it would otherwise win the
/// longest-match rule against the node's own /48 address, and peers drop
/// packets from a source that is not the node's. The ioctl tun-rs uses
/// cannot set either flag.
pub fn add_deprecated_v6(ifindex: u32, addr: std::net::Ipv6Addr) -> io::Result<()> {
    use netlink_packet_route::address::{
        AddressAttribute, AddressFlags, AddressMessage, CacheInfo,
    };
    let mut m = AddressMessage::default();
    m.header.family = AddressFamily::Inet6;
    m.header.prefix_len = 128;
    m.header.index = ifindex;
    m.attributes.push(AddressAttribute::Local(IpAddr::V6(addr)));
    m.attributes
        .push(AddressAttribute::Address(IpAddr::V6(addr)));
    m.attributes
        .push(AddressAttribute::Flags(AddressFlags::Nodad));
    let mut life = CacheInfo::default();
    life.ifa_preferred = 0;
    life.ifa_valid = u32::MAX;
    m.attributes.push(AddressAttribute::CacheInfo(life));
    match request(
        RouteNetlinkMessage::NewAddress(m),
        NLM_F_CREATE | NLM_F_EXCL,
    ) {
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        r => r,
    }
}

/// Adds `rule`; one already there is fine.
pub fn add(rule: &Rule) -> io::Result<()> {
    match request(
        RouteNetlinkMessage::NewRule(message(rule)),
        NLM_F_CREATE | NLM_F_EXCL,
    ) {
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        r => r,
    }
}

/// Removes `rule`; one already gone is fine.
pub fn delete(rule: &Rule) -> io::Result<()> {
    match request(RouteNetlinkMessage::DelRule(message(rule)), 0) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        r => r,
    }
}

/// Removes every rule at warren's priorities, whatever else it matches:
/// what a killed run left behind. Bounded: a priority holds at most a few
/// hundred of ours (one per local network or coordinator address).
pub fn remove_all() {
    for v6 in [false, true] {
        for pref in ALL_PREFS {
            for _ in 0..512 {
                let mut m = RuleMessage::default();
                m.header.family = if v6 {
                    AddressFamily::Inet6
                } else {
                    AddressFamily::Inet
                };
                m.attributes.push(RuleAttribute::Priority(pref));
                if request(RouteNetlinkMessage::DelRule(m), 0).is_err() {
                    break;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marked_traffic_is_routed_by_main_before_the_tunnel_table() {
        let coord: IpAddr = "203.0.113.7".parse().unwrap();
        let lan: IpNet = "192.168.1.0/24".parse().unwrap();
        let rules = wanted(&[coord], &[lan]);
        let v4: Vec<&Rule> = rules.iter().filter(|r| !r.v6).collect();
        let prefs: Vec<u32> = v4.iter().map(|r| r.pref).collect();
        assert_eq!(
            prefs,
            [
                PREF_COORDINATOR,
                PREF_MARKED,
                PREF_MARKED_UNREACHABLE,
                PREF_LAN,
                PREF_TABLE
            ]
        );
        assert_eq!(v4[0].to, Some(IpNet::from(coord)));
        assert!(v4[1].marked && v4[1].table == Some(MAIN));
        assert!(v4[2].marked && v4[2].table.is_none());
        assert_eq!(v4[4].table, Some(sockmark::TABLE));
        // IPv6 gets its own marked rules and table rule, and no v4 prefix.
        let v6: Vec<&Rule> = rules.iter().filter(|r| r.v6).collect();
        assert_eq!(v6.len(), 3);
        assert!(v6.iter().all(|r| r.to.is_none()));
    }

    #[test]
    fn a_rule_message_carries_mark_table_and_destination() {
        let r = Rule {
            pref: PREF_LAN,
            v6: false,
            to: Some("10.1.0.0/16".parse().unwrap()),
            marked: false,
            table: Some(MAIN),
        };
        let m = message(&r);
        assert_eq!(m.header.dst_len, 16);
        assert_eq!(m.header.action, RuleAction::ToTable);
        assert!(m.attributes.contains(&RuleAttribute::Priority(PREF_LAN)));
        assert!(m
            .attributes
            .contains(&RuleAttribute::Destination("10.1.0.0".parse().unwrap())));
        let marked = message(&Rule {
            marked: true,
            table: None,
            to: None,
            ..r
        });
        assert_eq!(marked.header.action, RuleAction::Unreachable);
        assert!(marked
            .attributes
            .contains(&RuleAttribute::FwMark(sockmark::MARK)));
    }
}
