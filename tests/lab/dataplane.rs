//! Foundation lab tests of the data plane against the real `warren` binary:
//! two agents through NAT where one learns the other's endpoint by roaming,
//! a 50 MB TCP transfer checked by SHA-256 (with and without offload),
//! roaming after the NAT rebinds, an IPv6 overlay, and interop with stock
//! wireguard-go, each side initiating.

use crate::lab;

use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

use lab::agent::{
    sock, tcp_transfer, warren_keypair, Agent, AgentConfig, PeerCfg, HANDSHAKE_TIMEOUT, PORT,
};
use lab::wg::{wg_keypair, WgGo};
use lab::{Lab, Nat, Node, Proto};

const A_IP: &str = "100.64.0.1";
const B_IP: &str = "100.64.0.2";

/// Two agents behind two EIM NATs; `b` has a UDP port forward, and only
/// `a` knows `b`'s (forwarded, public) endpoint. Checks ping both ways and
/// a 50 MB transfer.
fn two_agents(lab: Lab, offload: Option<bool>) {
    let g1 = lab.gateway("g1", Nat::Eim);
    let h1 = lab.host_behind(&g1, "h1");
    let g2 = lab.gateway("g2", Nat::Eim);
    let h2 = lab.host_behind(&g2, "h2");
    lab.forward(&g2, Proto::Udp, PORT, &h2, PORT);
    let (k1, k2) = (warren_keypair(&lab, &h1), warren_keypair(&lab, &h2));
    let peer2 = PeerCfg::new(&k2.public, &["100.64.0.2/32"])
        .endpoint(sock(g2.ip, PORT))
        .keepalive(5);
    let mut c1 = AgentConfig::new(&k1.private, &["100.64.0.1/24"]).peer(peer2);
    let mut c2 = AgentConfig::new(&k2.private, &["100.64.0.2/24"])
        .peer(PeerCfg::new(&k1.public, &["100.64.0.1/32"]));
    c1.offload = offload;
    c2.offload = offload;
    let a = Agent::start(&lab, &h1, &c1);
    let b = Agent::start(&lab, &h2, &c2);

    assert!(
        lab.ping_within(&h1, B_IP, HANDSHAKE_TIMEOUT),
        "h1 -> h2 over warren"
    );
    // h2 knew no endpoint: it answers because it learned h1's from the
    // authenticated packets (roaming).
    assert!(
        lab.ping_within(&h2, A_IP, Duration::from_secs(5)),
        "h2 -> h1 over warren"
    );

    let len = 50 * 1024 * 1024;
    let start = Instant::now();
    let to = IpAddr::V4(Ipv4Addr::new(100, 64, 0, 2));
    let (sent, received) = tcp_transfer(&lab, &h1, &h2, to, 5001, len);
    let secs = start.elapsed().as_secs_f64();
    let mbit = len as f64 * 8.0 / secs / 1e6;
    eprintln!("50 MB over warren (offload {offload:?}) in {secs:.1} s ({mbit:.0} Mbit/s)");
    assert_eq!(sent, received, "sha256 of the 50 MB sent and received");
    assert!(a.running(&lab) && b.running(&lab), "agents still running");
}

#[test]
fn two_agents_through_nat_ping_and_transfer() {
    if let Some(lab) = Lab::new_or_skip() {
        two_agents(lab, None);
    }
}

#[test]
fn two_agents_transfer_without_offload() {
    if let Some(lab) = Lab::new_or_skip() {
        two_agents(lab, Some(false));
    }
}

/// Public ports `gw`'s conntrack gives UDP flows from `client`:`sport`.
fn nat_ports(lab: &Lab, gw: &Node, client: Ipv4Addr, sport: u16) -> Vec<u16> {
    let out = lab.exec(
        gw,
        &["conntrack", "-L", "-p", "udp", "-s", &client.to_string()],
    );
    let sport = format!("sport={sport}");
    out.expect_ok("conntrack -L")
        .stdout
        .lines()
        .filter(|l| l.split_whitespace().any(|f| f == sport))
        // Reply tuple's dport: the second dport= of the line.
        .filter_map(|l| {
            l.split_whitespace()
                .filter_map(|f| f.strip_prefix("dport="))
                .nth(1)?
                .parse()
                .ok()
        })
        .collect()
}

#[test]
fn roaming_follows_nat_rebinding() {
    let Some(lab) = Lab::new_or_skip() else {
        return;
    };
    let g1 = lab.gateway("g1", Nat::Edm);
    let h1 = lab.host_behind(&g1, "h1");
    let s = lab.public("s");
    let (k1, k2) = (warren_keypair(&lab, &h1), warren_keypair(&lab, &s));
    let peer_s = PeerCfg::new(&k2.public, &["100.64.0.2/32"]).endpoint(sock(s.ip, PORT));
    let _a = Agent::start(
        &lab,
        &h1,
        &AgentConfig::new(&k1.private, &["100.64.0.1/24"]).peer(peer_s),
    );
    let peer_h = PeerCfg::new(&k1.public, &["100.64.0.1/32"]);
    let _b = Agent::start(
        &lab,
        &s,
        &AgentConfig::new(&k2.private, &["100.64.0.2/24"]).peer(peer_h),
    );
    assert!(
        lab.ping_within(&h1, B_IP, HANDSHAKE_TIMEOUT),
        "h1 -> s before rebinding"
    );
    let before = nat_ports(&lab, &g1, h1.ip, PORT);
    assert_eq!(before.len(), 1, "one mapping: {before:?}");

    // Forget every mapping: h1's next packet leaves from a new random port
    // (fully-random), and s must answer there, not at the dead old one.
    lab.exec(&g1, &["conntrack", "-F"])
        .expect_ok("conntrack -F");
    assert!(
        lab.ping_within(&h1, B_IP, Duration::from_secs(10)),
        "h1 -> s after rebinding"
    );
    let after = nat_ports(&lab, &g1, h1.ip, PORT);
    assert_eq!(after.len(), 1, "one mapping: {after:?}");
    // Equal only if the random draw hit the same port (about 1 in 64k).
    assert_ne!(before, after, "the NAT rebound to a new port");
    assert!(
        lab.ping_within(&s, A_IP, Duration::from_secs(5)),
        "s -> h1 after rebinding"
    );
}

#[test]
fn ipv6_overlay() {
    let Some(lab) = Lab::new_or_skip() else {
        return;
    };
    let (n1, n2) = (lab.public("n1"), lab.public("n2"));
    let (k1, k2) = (warren_keypair(&lab, &n1), warren_keypair(&lab, &n2));
    let p2 = PeerCfg::new(&k2.public, &["100.64.0.2/32", "fd7a:7761::2/128"])
        .endpoint(sock(n2.ip, PORT));
    let p1 = PeerCfg::new(&k1.public, &["100.64.0.1/32", "fd7a:7761::1/128"])
        .endpoint(sock(n1.ip, PORT));
    let _a = Agent::start(
        &lab,
        &n1,
        &AgentConfig::new(&k1.private, &["100.64.0.1/24", "fd7a:7761::1/64"]).peer(p2),
    );
    let _b = Agent::start(
        &lab,
        &n2,
        &AgentConfig::new(&k2.private, &["100.64.0.2/24", "fd7a:7761::2/64"]).peer(p1),
    );
    assert!(
        lab.ping_within(&n1, "fd7a:7761::2", HANDSHAKE_TIMEOUT),
        "IPv6 n1 -> n2"
    );
    assert!(
        lab.ping_within(&n2, "fd7a:7761::1", Duration::from_secs(5)),
        "IPv6 n2 -> n1"
    );
    let to = "fd7a:7761::2".parse().expect("v6");
    let (sent, received) = tcp_transfer(&lab, &n1, &n2, to, 5002, 4 * 1024 * 1024);
    assert_eq!(sent, received, "4 MB over the IPv6 overlay");
}

/// warren behind an EIM NAT and wireguard-go on a public host;
/// `warren_initiates` chooses which side knows the other's endpoint (the
/// other one learns it by roaming).
fn interop(lab: Lab, warren_initiates: bool) {
    let gw = lab.gateway("gw", Nat::Eim);
    let wh = lab.host_behind(&gw, "warren");
    let pub_host = lab.public("wggo");
    // When wireguard-go initiates, it needs a way in to warren: a forward.
    lab.forward(&gw, Proto::Udp, PORT, &wh, PORT);
    let kw = warren_keypair(&lab, &wh);
    let kg = wg_keypair();
    let wg = WgGo::start(&lab, &pub_host, &kg, PORT, "100.64.0.2/24");
    let mut peer = PeerCfg::new(&kg.public, &["100.64.0.2/32"]);
    if warren_initiates {
        peer = peer.endpoint(sock(pub_host.ip, PORT)).keepalive(5);
    }
    let _agent = Agent::start(
        &lab,
        &wh,
        &AgentConfig::new(&kw.private, &["100.64.0.1/24"]).peer(peer),
    );
    if warren_initiates {
        wg.add_peer(&lab, &kw.public, "100.64.0.1/32", None, None);
        assert!(
            lab.ping_within(&wh, B_IP, HANDSHAKE_TIMEOUT),
            "warren -> wireguard-go"
        );
        assert!(
            lab.ping_within(&pub_host, A_IP, Duration::from_secs(5)),
            "wireguard-go -> warren"
        );
    } else {
        wg.add_peer(
            &lab,
            &kw.public,
            "100.64.0.1/32",
            Some(sock(gw.ip, PORT)),
            Some(5),
        );
        assert!(
            lab.ping_within(&pub_host, A_IP, HANDSHAKE_TIMEOUT),
            "wireguard-go -> warren"
        );
        assert!(
            lab.ping_within(&wh, B_IP, Duration::from_secs(5)),
            "warren -> wireguard-go"
        );
    }
    let hs = wg.latest_handshake(&lab, &kw.public);
    assert!(hs.is_some(), "wg show latest-handshakes has a handshake");
    let to = IpAddr::V4(Ipv4Addr::new(100, 64, 0, 2));
    let (sent, received) = tcp_transfer(&lab, &wh, &pub_host, to, 5003, 8 * 1024 * 1024);
    assert_eq!(sent, received, "8 MB from warren to wireguard-go");
}

#[test]
fn interop_warren_initiates_to_wireguard_go() {
    if let Some(lab) = Lab::new_or_skip() {
        interop(lab, true);
    }
}

#[test]
fn interop_wireguard_go_initiates_to_warren() {
    if let Some(lab) = Lab::new_or_skip() {
        interop(lab, false);
    }
}
