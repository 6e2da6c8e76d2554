//! Port mapping through the real daemon: a `warren agent` behind a
//! miniupnpd gateway (UPnP IGD, NAT-PMP and PCP all served), configured
//! with one protocol at a time (`[agent] portmap_protocols`), publishes a
//! `portmapped` endpoint; a stock WireGuard peer on the internet segment,
//! given only that endpoint, completes a handshake and pings the agent's
//! overlay address through it; and once the agent stops cleanly the
//! gateway's forwarding rule is gone.
//!
//! Why this proves the mapping and nothing else: the gateway drops new
//! flows from its WAN side unless a DNAT rule admits them, and the agent
//! never sends first to the WireGuard peer (it has no endpoint for it), so
//! no conntrack entry of the agent's own can let the peer in. Each
//! protocol gets its own host and listen port, so the previous agent's
//! conntrack entries at the gateway cannot carry the next one's traffic.

use crate::lab;

use std::net::SocketAddr;
use std::time::Duration;

use lab::agent::{Agent, AgentConfig, PeerCfg};
use lab::coord::Coordinator;
use lab::mesh::{join_with, overlay_v4};
use lab::nat::Nat;
use lab::wg::{wg_keypair, WgGo};
use lab::{poll_until, Lab, Node};

/// The stock WireGuard peer's overlay address (inside 100.64.0.0/10, the
/// agent's TUN route, far from what the coordinator hands out first).
const PEER_OVERLAY: &str = "100.127.250.1";
const MAP_TIMEOUT: Duration = Duration::from_secs(20);
const PING_TIMEOUT: Duration = Duration::from_secs(20);

/// The `portmapped` endpoint the agent publishes, once it has one.
fn portmapped(lab: &Lab, a: &Agent) -> Option<SocketAddr> {
    let mut found = None;
    poll_until(MAP_TIMEOUT, Duration::from_millis(200), || {
        let st = a.status(lab);
        found = st["mesh"]["endpoints"].as_array().and_then(|eps| {
            eps.iter()
                .find(|e| e["kind"] == "portmapped")
                .and_then(|e| e["addr"].as_str()?.parse().ok())
        });
        found.is_some()
    });
    found
}

/// The miniupnpd chains of the gateway's ruleset (where every mapping,
/// whatever the protocol, becomes a DNAT rule).
fn gateway_rules(lab: &Lab, gw: &Node) -> String {
    lab.exec(gw, &["nft", "list", "table", "inet", "filter"])
        .expect_ok("nft list")
        .stdout
}

#[test]
fn agent_maps_its_port_through_each_protocol_in_turn() {
    let Some(lab) = Lab::new_or_skip() else {
        return;
    };
    let c = lab.public("coord");
    let coord = Coordinator::start(&lab, &c, &[]);
    let (token, _) = coord.token(&lab, &["--reusable"]);
    let p = lab.public("p");
    let keys = wg_keypair();
    let wg = WgGo::start(&lab, &p, &keys, 51820, &format!("{PEER_OVERLAY}/32"));
    let gw = lab.gateway("gw", Nat::Upnp);

    for (i, protocol) in ["pcp", "natpmp", "upnp"].into_iter().enumerate() {
        let h = lab.host_behind(&gw, &format!("h{protocol}"));
        let listen_port = 51821 + i as u16;
        let config = AgentConfig {
            listen_port,
            portmap: true,
            portmap_protocols: Some(vec![protocol.to_owned()]),
            ..AgentConfig::mesh(&lab, &h)
        }
        .peer(PeerCfg::new(&keys.public, &[&format!("{PEER_OVERLAY}/32")]));
        let a = join_with(&lab, &coord, &token, &h, &config);

        let mapped = portmapped(&lab, &a)
            .unwrap_or_else(|| panic!("{protocol}: no portmapped endpoint\n{}", lab.log(a.proc)));
        assert_eq!(mapped.ip(), std::net::IpAddr::V4(gw.ip), "{protocol}");
        let log = lab.log(a.proc);
        assert!(
            log.lines().any(
                |l| l.contains("port mapping obtained") && l.contains(&protocol_name(protocol))
            ),
            "{protocol}: the mapping came from this protocol:\n{log}"
        );
        let target = format!("{}:{listen_port}", h.ip);
        let rules = gateway_rules(&lab, &gw);
        assert!(
            rules.contains(&target),
            "{protocol}: no DNAT to {target} at the gateway:\n{rules}"
        );

        // The stock peer knows only the mapped endpoint.
        let st = a.status(&lab);
        let agent_key = st["public_key"].as_str().unwrap().to_owned();
        let overlay = overlay_v4(&st);
        assert!(!overlay.is_empty(), "{st}");
        wg.add_peer(
            &lab,
            &agent_key,
            &format!("{overlay}/32"),
            Some(mapped),
            None,
        );
        lab.exec(
            &p,
            &[
                "ip",
                "route",
                "add",
                &format!("{overlay}/32"),
                "dev",
                &wg.ifname,
            ],
        )
        .expect_ok("route to the agent's overlay");
        assert!(
            lab.ping_within(&p, &overlay, PING_TIMEOUT),
            "{protocol}: no ping through {mapped}\n{}",
            lab.log(a.proc)
        );
        assert!(
            wg.latest_handshake(&lab, &agent_key).is_some(),
            "{protocol}: WireGuard handshake through the mapping"
        );

        // A clean stop deletes the mapping at the gateway.
        lab.signal(a.proc, libc::SIGTERM);
        let status = lab.wait_exit(a.proc, Duration::from_secs(10));
        assert!(
            status.is_some_and(|s| s.success()),
            "{protocol}: clean stop: {status:?}\n{}",
            lab.log(a.proc)
        );
        let rules = gateway_rules(&lab, &gw);
        assert!(
            !rules.contains(&target),
            "{protocol}: mapping still at the gateway after stop:\n{rules}\n{}",
            lab.log(a.proc)
        );
    }
}

/// How the agent's log names a protocol (`portmap::Protocol`'s Display).
fn protocol_name(config_name: &str) -> String {
    match config_name {
        "pcp" => "PCP",
        "natpmp" => "NAT-PMP",
        _ => "UPnP",
    }
    .to_owned()
}
