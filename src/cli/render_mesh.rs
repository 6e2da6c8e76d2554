//! How the mesh looks to a person: the network lines of `warren status`,
//! the reasons peers are relayed, and the `warren netcheck` report.
//!
//! The aim is that nobody has to guess why a connection is relayed: the
//! status says where the node stands with its coordinator, which relay it
//! uses, what its NAT does, and for each relayed peer the reason in words.

use std::fmt::Write;

use crate::api::mesh::{MeshState, MeshStatus, TriedPath};
use crate::api::{PeerPath, PeerStatus};
use crate::netcheck::{FamilyReport, MappingBehavior, PortAllocation, Report};
use crate::traversal::hardnat::{Allocation, Mapping};
use crate::traversal::NatSummary;

/// The lines under the header of `warren status` for a mesh node.
pub fn node(m: &MeshStatus) -> String {
    let mut out = String::new();
    let coord = m.coordinator.as_deref().unwrap_or("-");
    let name = m.name.as_deref().unwrap_or("(unnamed)");
    let state = match m.state {
        MeshState::NeedsLogin => {
            return "network: not joined (warren up --coordinator URL --token TOKEN)\n".into()
        }
        MeshState::Stopped => "stopped (warren up to re-join)".to_owned(),
        MeshState::Running => "connected".to_owned(),
        MeshState::Reconnecting => match &m.last_error {
            Some(e) => format!("coordinator unreachable, using the last map ({e})"),
            None => "connecting".to_owned(),
        },
    };
    let _ = writeln!(out, "network: {name} on {coord}: {state}");
    if !m.tags.is_empty() {
        let _ = writeln!(out, "tags: {}", m.tags.join(", "));
    }
    if !m.advertised_routes.is_empty() {
        let _ = writeln!(
            out,
            "routes: {}",
            advertised(&m.advertised_routes, &m.served_routes)
        );
    }
    if let Some(p) = &m.routes_problem {
        let _ = writeln!(out, "routes: problem: {p}");
    }
    if let Some(d) = &m.dns {
        let at = d.address.map_or_else(|| "-".to_string(), |a| a.to_string());
        let mode = match d.mode {
            crate::agent::dns::Mode::ResolvConf => "this host's resolv.conf points at it",
            crate::agent::dns::Mode::Resolved => "systemd-resolved manages this host's DNS",
            crate::agent::dns::Mode::Off => "this host's DNS is left alone",
        };
        let _ = writeln!(out, "dns: names under {} at {at}; {mode}", d.domain);
        if let Some(p) = &d.problem {
            let _ = writeln!(out, "dns: problem: {}", crate::text::for_terminal(p));
        }
    }
    if let Some(exit) = &m.exit_node {
        let lan = if m.exit_node_lan.is_empty() {
            String::new()
        } else {
            let nets: Vec<String> = m.exit_node_lan.iter().map(ToString::to_string).collect();
            format!("; LAN kept direct: {}", nets.join(", "))
        };
        match &m.exit_node_problem {
            None => {
                let _ = writeln!(out, "exit node: {exit} (all internet traffic){lan}");
            }
            Some(p) => {
                let _ = writeln!(out, "exit node: {exit}: {p}");
            }
        }
    }
    if m.state == MeshState::Stopped {
        return out;
    }
    if let Some(home) = &m.home_relay {
        let lat: Vec<String> = m
            .relay_latency_ms
            .iter()
            .map(|(r, ms)| format!("{r} {ms:.1} ms"))
            .collect();
        let _ = writeln!(
            out,
            "relay: {home} ({}){}",
            match (&m.home_relay_connected, &m.home_relay_error) {
                (true, _) => "connected".to_string(),
                (false, Some(e)) =>
                    format!("connecting; last error: {}", crate::text::for_terminal(e)),
                (false, None) => "connecting".to_string(),
            },
            if lat.is_empty() {
                String::new()
            } else {
                format!("; STUN latency {}", lat.join(", "))
            }
        );
    }
    if let Some(n) = m.policy_rules {
        let _ = writeln!(
            out,
            "access policy: on; {n} rule(s) say who may reach this node, and peers outside the policy are not listed"
        );
        if let Some(e) = &m.reach_error {
            let _ = writeln!(
                out,
                "access policy: what the peers allow you is not known ({})",
                crate::text::for_terminal(e)
            );
        }
    }
    let udp = match m.udp {
        Some(true) => "UDP works",
        Some(false) => "UDP blocked (relay over TCP)",
        None => "UDP not checked yet",
    };
    let _ = writeln!(out, "nat: {}; {udp}", nat(&m.nat));
    if !m.endpoints.is_empty() {
        let eps: Vec<String> = m
            .endpoints
            .iter()
            .map(|e| format!("{} ({:?})", e.addr, e.kind).to_lowercase())
            .collect();
        let _ = writeln!(out, "endpoints: {}", eps.join(", "));
    }
    out
}

/// A NAT summary in words.
pub fn nat(n: &NatSummary) -> String {
    let mapping = match n.mapping {
        Mapping::None => return "none (public address)".into(),
        Mapping::EndpointIndependent => "endpoint-independent (easy)",
        Mapping::EndpointDependent => "endpoint-dependent (hard)",
        _ => "unknown",
    };
    let alloc = match n.allocation {
        Allocation::Preserving => ", port-preserving".to_owned(),
        Allocation::Sequential { step } => format!(", sequential ports (step {step})"),
        Allocation::Random => ", random ports".to_owned(),
        _ => String::new(),
    };
    format!("{mapping}{alloc}")
}

/// Routes as a person reads them: `exit node` for the default pair, then
/// the subnets.
fn route_names(routes: &[ipnet::IpNet]) -> String {
    let mut parts: Vec<String> = Vec::new();
    if crate::control::advertise::is_exit(routes) {
        parts.push("exit node".into());
    }
    parts.extend(
        routes
            .iter()
            .filter(|r| r.prefix_len() != 0)
            .map(ToString::to_string),
    );
    parts.join(", ")
}

/// This node's advertised routes, and which await approval.
fn advertised(adv: &[ipnet::IpNet], served: &[ipnet::IpNet]) -> String {
    let pending: Vec<ipnet::IpNet> = adv
        .iter()
        .filter(|r| !served.contains(r))
        .copied()
        .collect();
    let mut out = format!("advertising {}", route_names(adv));
    if pending.is_empty() {
        out.push_str(" (approved)");
    } else {
        out.push_str(&format!(
            "; awaiting approval: {} (warren-coordinator route approve)",
            route_names(&pending)
        ));
    }
    out
}

/// One line per relayed peer saying why, and when a path turned direct.
pub fn peer_notes(peers: &[PeerStatus]) -> String {
    let mut out = String::new();
    for p in peers {
        let Some(m) = &p.mesh else { continue };
        let name = super::render::peer_name(p);
        if !m.tags.is_empty() {
            let _ = writeln!(out, "{name}: tags {}", m.tags.join(","));
        }
        if !m.routes.is_empty() {
            let used = if m.routed.is_empty() {
                String::new()
            } else {
                format!(" (in use: {})", route_names(&m.routed))
            };
            let _ = writeln!(out, "{name}: offers {}{used}", route_names(&m.routes));
        }
        match (&p.path, &m.relay_reason, m.direct_since_secs) {
            (PeerPath::Relay { .. }, Some(reason), _) => {
                let _ = writeln!(out, "{name}: relayed: {reason}");
                if !m.tried.is_empty() {
                    let _ = writeln!(out, "{name}: tried {}", tried(&m.tried));
                }
            }
            (PeerPath::Direct { .. } | PeerPath::DirectTcp { .. }, _, Some(secs)) => {
                let _ = writeln!(
                    out,
                    "{name}: direct for {} ({} pings, {} pongs)",
                    super::render::duration(secs),
                    m.pings_sent,
                    m.pongs_received
                );
            }
            _ => {}
        }
        if !m.online {
            let _ = writeln!(out, "{name}: offline at the coordinator");
        }
        if let Some(line) = access(m) {
            let _ = writeln!(out, "{name}: {line}");
        }
    }
    out
}

/// "allows you: tcp/22, tcp/443; you allow it: nothing": both sides of the
/// access policy between this node and a peer, when there is one.
fn access(m: &crate::api::mesh::PeerMesh) -> Option<String> {
    let list = |a: &[crate::policy::Allowance]| {
        if a.is_empty() {
            return "nothing".to_owned();
        }
        a.iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    };
    match (&m.allows_you, &m.you_allow) {
        (None, None) => None,
        (Some(a), None) => Some(format!("allows you: {}", list(a))),
        (None, Some(b)) => Some(format!("you allow it: {}", list(b))),
        (Some(a), Some(b)) => Some(format!(
            "allows you: {}; you allow it: {}",
            list(a),
            list(b)
        )),
    }
}

/// Most tried paths listed on the status line; the rest are counted.
const TRIED_SHOWN: usize = 6;

/// "11.11.0.12:51820 (srflx, no pong), 10.2.0.2:51820 (host, pong at
/// 14:02:05)".
fn tried(paths: &[TriedPath]) -> String {
    let mut parts: Vec<String> = paths
        .iter()
        .take(TRIED_SHOWN)
        .map(|t| match &t.last_pong {
            Some(at) => format!("{} ({}, last pong at {at})", t.addr, t.kind),
            None => format!("{} ({}, no pong)", t.addr, t.kind),
        })
        .collect();
    if paths.len() > TRIED_SHOWN {
        parts.push(format!("and {} more", paths.len() - TRIED_SHOWN));
    }
    parts.join(", ")
}

/// `warren netcheck` for a person.
pub fn netcheck(r: &Report) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "UDP: {}",
        if r.udp {
            "yes"
        } else {
            "no (blocked; the relay over TCP/443 carries traffic)"
        }
    );
    family(&mut out, "IPv4", &r.ipv4);
    family(&mut out, "IPv6", &r.ipv6);
    // Where UDP is blocked, this is the address peers dial for direct TCP.
    let tcp = match &r.tcp {
        Some(t) => format!("yes, seen as {}", t.public),
        None => "no answer over TCP (no direct TCP path)".into(),
    };
    let _ = writeln!(out, "TCP: {tcp}");
    let hp = match r.hairpinning {
        Some(true) => "yes",
        Some(false) => "no",
        None => "not tested",
    };
    let _ = writeln!(out, "hairpinning: {hp}");
    let pm = match r.portmap {
        Some(p) if p.any() => {
            let mut v = Vec::new();
            if p.upnp {
                v.push("UPnP");
            }
            if p.natpmp {
                v.push("NAT-PMP");
            }
            if p.pcp {
                v.push("PCP");
            }
            v.join(", ")
        }
        Some(_) => "none".into(),
        None => "not probed".into(),
    };
    let _ = writeln!(out, "port mapping: {pm}");
    for s in &r.servers {
        let lat = s
            .latency
            .map(|d| format!("{:.1} ms", d.as_secs_f64() * 1e3))
            .unwrap_or_else(|| "no answer".into());
        let preferred = if r.preferred_server.as_deref() == Some(s.name.as_str()) {
            " (nearest)"
        } else {
            ""
        };
        let _ = writeln!(out, "relay {}: {lat}{preferred}", s.name);
    }
    out
}

fn family(out: &mut String, name: &str, f: &FamilyReport) {
    if !f.works {
        let _ = writeln!(out, "{name}: no");
        return;
    }
    let global = f.global.map(|g| g.to_string()).unwrap_or_default();
    let mapping = match f.mapping {
        MappingBehavior::NoNat => "no NAT",
        MappingBehavior::EndpointIndependent => "NAT, endpoint-independent mapping (easy)",
        MappingBehavior::EndpointDependent => "NAT, endpoint-dependent mapping (hard)",
        MappingBehavior::Unknown => "mapping unknown",
    };
    let ports = match f.port_allocation {
        PortAllocation::Preserving => "port-preserving".to_owned(),
        PortAllocation::Sequential { step } => format!("sequential ports, step {step}"),
        PortAllocation::Random => "random ports".to_owned(),
        PortAllocation::Unknown => "port pattern unknown".to_owned(),
    };
    let _ = writeln!(out, "{name}: {global}; {mapping}; {ports}");
}

/// `warren dns status` for a person.
pub fn dns_status(st: &crate::agent::dns::DnsStatus) -> String {
    use crate::agent::dns::Mode;
    let mut out = String::new();
    let at: Vec<String> = st.address.iter().map(ToString::to_string).collect();
    let mode = match st.mode {
        Mode::ResolvConf => "resolv.conf (this host's resolv.conf points at warren)",
        Mode::Resolved => "resolved (systemd-resolved manages this host's DNS)",
        Mode::Off => "off (this host's DNS is left alone)",
    };
    let _ = writeln!(out, "mode: {mode}");
    let _ = writeln!(
        out,
        "resolver: {}; the network's names are NAME.{} ({} known)",
        if at.is_empty() {
            "not listening".into()
        } else {
            at.join(", ")
        },
        st.domain,
        st.names
    );
    let list = |v: &[String]| {
        if v.is_empty() {
            "(none)".to_string()
        } else {
            v.join(", ")
        }
    };
    if st.override_local {
        let _ = writeln!(
            out,
            "other names: the network's nameservers {} (override_local)",
            list(&st.nameservers)
        );
    } else {
        let _ = writeln!(
            out,
            "other names: this host's resolvers {}",
            list(&st.host_resolvers)
        );
        if !st.nameservers.is_empty() {
            let _ = writeln!(
                out,
                "  (the network's nameservers {} when the host has none)",
                list(&st.nameservers)
            );
        }
    }
    for (domain, servers) in &st.split {
        let _ = writeln!(out, "split DNS: {domain} -> {}", servers.join(", "));
    }
    let s = &st.stats;
    let _ = writeln!(
        out,
        "queries: {} ({} answered here, {} from the cache of {}, {} forwarded, {} upstream failures, {} malformed)",
        s.queries, s.answered_locally, s.from_cache, st.cached, s.forwarded, s.upstream_failures, s.malformed
    );
    if let Some(p) = &st.problem {
        let _ = writeln!(out, "problem: {}", crate::text::for_terminal(p));
    }
    out
}

/// `warren dns query` for a person.
pub fn dns_query(r: &crate::agent::dns::QueryReply) -> String {
    let mut out = format!(
        "{} {}: {}, from {} in {:.1} ms\n",
        r.name, r.qtype, r.rcode, r.source, r.elapsed_ms
    );
    for a in &r.answers {
        out.push_str(&format!("  {}\n", crate::text::for_terminal(a)));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_are_said_in_words() {
        let m = MeshStatus::default();
        assert!(node(&m).contains("not joined"), "{}", node(&m));
        let m = MeshStatus {
            state: MeshState::Reconnecting,
            coordinator: Some("https://c".into()),
            name: Some("a".into()),
            last_error: Some("connection refused".into()),
            home_relay: Some("lab".into()),
            relay_latency_ms: vec![("lab".into(), 1.25)],
            udp: Some(false),
            ..Default::default()
        };
        let text = node(&m);
        assert!(text.contains("network: a on https://c: coordinator unreachable"));
        assert!(text.contains("connection refused"));
        assert!(
            text.contains("relay: lab (connecting); STUN latency lab 1.2 ms"),
            "{text}"
        );
        assert!(text.contains("UDP blocked"), "{text}");
    }

    #[test]
    fn advertised_routes_say_which_await_approval() {
        let net = |s: &str| -> ipnet::IpNet { s.parse().unwrap() };
        let m = MeshStatus {
            state: MeshState::Running,
            coordinator: Some("https://c".into()),
            name: Some("r".into()),
            advertised_routes: vec![net("0.0.0.0/0"), net("192.168.50.0/24"), net("::/0")],
            served_routes: vec![net("192.168.50.0/24")],
            ..Default::default()
        };
        let text = node(&m);
        assert!(
            text.contains(
                "routes: advertising exit node, 192.168.50.0/24; awaiting approval: exit node"
            ),
            "{text}"
        );
        let all = MeshStatus {
            served_routes: m.advertised_routes.clone(),
            ..m
        };
        assert!(
            node(&all).contains("192.168.50.0/24 (approved)"),
            "{}",
            node(&all)
        );
    }

    #[test]
    fn nat_words() {
        let n = NatSummary {
            mapping: Mapping::EndpointDependent,
            allocation: Allocation::Sequential { step: 1 },
            observed: None,
        };
        assert_eq!(
            nat(&n),
            "endpoint-dependent (hard), sequential ports (step 1)"
        );
        assert_eq!(nat(&NatSummary::default()), "unknown");
    }

    #[test]
    fn nat_short_labels() {
        let n = |mapping, allocation| NatSummary {
            mapping,
            allocation,
            observed: None,
        };
        for (summary, want) in [
            (n(Mapping::None, Allocation::Preserving), "no NAT"),
            (
                n(Mapping::EndpointIndependent, Allocation::Preserving),
                "EIM",
            ),
            (n(Mapping::EndpointIndependent, Allocation::Random), "EIM"),
            (
                n(
                    Mapping::EndpointDependent,
                    Allocation::Sequential { step: 1 },
                ),
                "EDM seq+1",
            ),
            (
                n(Mapping::EndpointDependent, Allocation::Random),
                "EDM random",
            ),
            (n(Mapping::EndpointDependent, Allocation::Unknown), "EDM"),
            (NatSummary::default(), "-"),
        ] {
            assert_eq!(summary.short(), want, "{summary:?}");
        }
    }

    #[test]
    fn relayed_peer_shows_reason_and_tried_paths() {
        use crate::api::mesh::PeerMesh;
        use crate::keys::NodeKey;
        let t = |addr: &str, kind: &str, pong: Option<&str>| TriedPath {
            addr: addr.parse().unwrap(),
            kind: kind.into(),
            last_ping: Some("14:02:01".into()),
            last_pong: pong.map(str::to_owned),
            rtt_ms: None,
        };
        let mut paths = vec![
            t("10.2.0.2:51820", "host", None),
            t("11.11.0.12:51820", "srflx", Some("14:01:00")),
        ];
        let peer = PeerStatus {
            public_key: NodeKey([3; 32]),
            hostname: Some("bob".into()),
            allowed_ips: vec![],
            path: PeerPath::Relay { region: None },
            latency_ms: None,
            last_handshake_secs: None,
            rx_bytes: 0,
            tx_bytes: 0,
            mesh: Some(PeerMesh {
                hostname: "bob".into(),
                online: true,
                relay_reason: Some(
                    "both sides EDM random; birthday probing failed after 2000 probes at 14:02:05 UTC"
                        .into(),
                ),
                tried: paths.clone(),
                ..Default::default()
            }),
        };
        let text = peer_notes(std::slice::from_ref(&peer));
        assert_eq!(
            text,
            "bob: relayed: both sides EDM random; birthday probing failed after 2000 probes \
             at 14:02:05 UTC\n\
             bob: tried 10.2.0.2:51820 (host, no pong), 11.11.0.12:51820 (srflx, last pong \
             at 14:01:00)\n"
        );
        paths.extend((0..7).map(|i| t(&format!("10.9.0.{i}:1"), "predicted", None)));
        assert!(tried(&paths).ends_with(", and 3 more"), "{}", tried(&paths));
    }
}
