//! Lab test of two relay regions: the coordinator's embedded relay
//! (region `r1`) and a standalone `warren-coordinator relay` (region `r2`)
//! published through `--relay-map`.
//!
//! Each agent must pick the region its STUN probes answer fastest. The lab
//! kernel has no `sch_netem`, so latency is made in user space: each
//! gateway DNATs its LAN's STUN requests for the *far* region to a small
//! forwarder on the gateway that holds every request for [`FAR`] before
//! passing it on (replies come back un-DNATed by conntrack, so the agent
//! sees the real server's address, only later). Agent A is then nearest to
//! r1 and agent B to r2. Both gateways are random-port (EDM) NATs that drop
//! all forwarded UDP except STUN, so there is no direct path: A's packets
//! to B must go through B's home relay (r2), B's replies through A's (r1),
//! and each side's non-home connection must close once idle. Last, B is
//! removed at the coordinator and must be off the standalone relay in 2 s.

use crate::lab;

use std::net::{Ipv4Addr, UdpSocket};
use std::time::{Duration, Instant};

use lab::agent::{tcp_transfer, warren_keypair, Agent, AgentConfig};
use lab::coord::{relay_metrics, start_with_keyed_region, start_with_region};
use lab::mesh::{join_with, overlay_v4, peer_of, up_with};
use lab::nat::Nat;
use lab::{poll_until, Lab, Node};
use serde_json::Value;

/// Extra latency toward the far region's STUN server.
const FAR: Duration = Duration::from_millis(60);
const STUN_PORTS: [u16; 2] = [3478, 3479];
const TRANSFER: usize = 20 << 20;
/// Seconds: the agents' `relay_idle_timeout`.
const IDLE: u64 = 3;

#[test]
fn each_agent_homes_on_its_nearest_region_and_reaches_the_other_through_its_home() {
    let Some(lab) = Lab::new_or_skip() else {
        return;
    };
    let (coord, r2) = start_with_region(
        &lab,
        &lab.public("coord"),
        &["--region-name", "r1"],
        &lab.public("r2"),
        "r2",
    );
    let (r2, r2_url) = (r2.node, r2.url);

    let (ga, gb) = (lab.gateway("ga", Nat::Edm), lab.gateway("gb", Nat::Edm));
    for gw in [&ga, &gb] {
        only_stun_udp_out(&lab, gw);
    }
    delay_stun(&lab, &ga, r2.ip);
    delay_stun(&lab, &gb, coord.ip);
    let (ha, hb) = (lab.host_behind(&ga, "a"), lab.host_behind(&gb, "b"));
    let (token, _) = coord.token(&lab, &["--reusable"]);
    let config = |node: &Node| {
        let mut c = AgentConfig::mesh(&lab, node);
        c.agent_extra = vec![format!("relay_idle_timeout = {IDLE}")];
        c
    };
    let a = join_with(&lab, &coord, &token, &ha, &config(&ha));
    let b = join_with(&lab, &coord, &token, &hb, &config(&hb));

    // Homes follow latency, and the map carries each node's home to the other.
    let settled = poll_until(Duration::from_secs(30), Duration::from_millis(250), || {
        let (sa, sb) = (a.status(&lab), b.status(&lab));
        sa["mesh"]["home_relay"] == "r1"
            && sb["mesh"]["home_relay"] == "r2"
            && sa["mesh"]["home_relay_connected"] == true
            && sb["mesh"]["home_relay_connected"] == true
            && peer_of(&sa, "b").is_some_and(|p| p["mesh"]["relay_region"] == "r2")
            && peer_of(&sb, "a").is_some_and(|p| p["mesh"]["relay_region"] == "r1")
    });
    let (sa, sb) = (a.status(&lab), b.status(&lab));
    assert!(settled, "homes did not settle:\nA: {sa}\nB: {sb}");
    let (la, lb) = (latency(&sa), latency(&sb));
    assert!(la("r1") < la("r2"), "A measured r1 nearer: {sa}");
    assert!(lb("r2") < lb("r1"), "B measured r2 nearer: {sb}");
    assert!(
        la("r2") >= FAR.as_secs_f64() * 1e3,
        "the delay is real: {sa}"
    );

    // A reaches B through B's home region.
    let ip_b = overlay_v4(&sb);
    assert!(
        lab.ping_within(&a.node, &ip_b, Duration::from_secs(5)),
        "{sa}"
    );
    let sa = a.status(&lab);
    let path = &peer_of(&sa, "b").unwrap()["path"];
    assert_eq!(
        (&path["kind"], &path["region"]),
        (&"relay".into(), &"r2".into()),
        "{sa}"
    );
    let (m1, m2) = (
        relay_metrics(&lab, &coord.node, &coord.url()),
        relay_metrics(&lab, &r2, &r2_url),
    );
    let (sent, got) = tcp_transfer(
        &lab,
        &a.node,
        &b.node,
        ip_b.parse().unwrap(),
        5201,
        TRANSFER,
    );
    assert_eq!(sent, got, "the transfer arrives intact");
    let (n1, n2) = (
        relay_metrics(&lab, &coord.node, &coord.url()),
        relay_metrics(&lab, &r2, &r2_url),
    );
    let grew = |old: &Value, new: &Value| {
        new["bytes_out"].as_u64().unwrap() - old["bytes_out"].as_u64().unwrap()
    };
    assert!(grew(&m2, &n2) > TRANSFER as u64, "data went A→r2→B: {n2}");
    assert!(grew(&m1, &n1) > 0, "acknowledgements went B→r1→A: {n1}");
    assert!(
        grew(&m1, &n1) < TRANSFER as u64 / 4,
        "data did not take r1: {n1}"
    );
    // Each relay has its home client and the other side's visitor.
    assert_eq!(
        (n1["clients"].as_u64(), n2["clients"].as_u64()),
        (Some(2), Some(2))
    );

    // Once traffic stops, the visitors leave; the homes stay.
    let closed = poll_until(
        Duration::from_secs(IDLE * 5 + 5),
        Duration::from_millis(250),
        || {
            relay_metrics(&lab, &coord.node, &coord.url())["clients"] == 1
                && relay_metrics(&lab, &r2, &r2_url)["clients"] == 1
        },
    );
    assert!(
        closed,
        "idle non-home connections were not closed:\nr1 {}\nr2 {}",
        relay_metrics(&lab, &coord.node, &coord.url()),
        relay_metrics(&lab, &r2, &r2_url)
    );
    let (sa, sb) = (a.status(&lab), b.status(&lab));
    assert_eq!(sa["mesh"]["home_relay_connected"], true, "{sa}");
    assert_eq!(sb["mesh"]["home_relay_connected"], true, "{sb}");
    // And the next packet opens the visitor connection again.
    assert!(
        lab.ping_within(&a.node, &ip_b, Duration::from_secs(5)),
        "{}",
        a.status(&lab)
    );
    assert_eq!(relay_metrics(&lab, &r2, &r2_url)["clients"], 2);

    // B removed at the coordinator: the standalone relay, which learns the
    // node list over the coordinator's feed, has B off within 2 s.
    coord
        .admin(&lab, &["node", "remove", "b"])
        .expect_ok("node remove");
    let t0 = Instant::now();
    let cut = poll_until(Duration::from_secs(2), Duration::from_millis(50), || {
        relay_metrics(&lab, &r2, &r2_url)["clients"] == 1
    });
    assert!(
        cut,
        "B still on r2 2 s after removal: {}",
        relay_metrics(&lab, &r2, &r2_url)
    );
    eprintln!(
        "removed node off the standalone relay in {:?}",
        t0.elapsed()
    );
}

/// The gateway forwards no UDP but STUN: no direct path between peers.
fn only_stun_udp_out(lab: &Lab, gw: &Node) {
    let ports = format!("{{ {}, {} }}", STUN_PORTS[0], STUN_PORTS[1]);
    lab.filter_first(
        gw,
        &["iifname", "lan", "udp", "dport", "!=", &ports, "drop"],
    );
}

/// Makes STUN from `gw`'s LAN to `server` [`FAR`] slower (see the module doc).
fn delay_stun(lab: &Lab, gw: &Node, server: Ipv4Addr) {
    let lan = gw.lan.as_ref().unwrap().router;
    let nft = |args: &[&str]| {
        let mut argv = vec!["nft"];
        argv.extend_from_slice(args);
        lab.exec(gw, &argv).expect_ok("delay rule");
    };
    nft(&["add", "table", "ip", "labdelay"]);
    nft(&[
        "add",
        "chain",
        "ip",
        "labdelay",
        "pre",
        "{ type nat hook prerouting priority -110 ; }",
    ]);
    for (i, port) in STUN_PORTS.into_iter().enumerate() {
        let local = 40000 + i as u16;
        let to = format!("{lan}:{local}");
        nft(&[
            "add",
            "rule",
            "ip",
            "labdelay",
            "pre",
            "iifname",
            "lan",
            "ip",
            "daddr",
            &server.to_string(),
            "udp",
            "dport",
            &port.to_string(),
            "dnat",
            "to",
            &to,
        ]);
        let down = lab
            .thread_in(gw, move || UdpSocket::bind((lan, local)).unwrap())
            .join()
            .unwrap();
        let up = lab
            .thread_in(gw, move || {
                UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).unwrap()
            })
            .join()
            .unwrap();
        std::thread::spawn(move || forward_late(down, up, (server, port).into()));
    }
}

/// Passes requests from `down` to `target` after [`FAR`], and replies back
/// at once, to the last client heard. Ends by itself after two minutes.
fn forward_late(down: UdpSocket, up: UdpSocket, target: std::net::SocketAddr) {
    let step = Some(Duration::from_millis(2));
    down.set_read_timeout(step).unwrap();
    up.set_read_timeout(step).unwrap();
    let end = Instant::now() + Duration::from_secs(120);
    let mut client = None;
    let mut buf = [0u8; 2048];
    while Instant::now() < end {
        if let Ok((n, from)) = down.recv_from(&mut buf) {
            client = Some(from);
            std::thread::sleep(FAR);
            let _ = up.send_to(&buf[..n], target);
        }
        if let (Ok(n), Some(c)) = (up.recv(&mut buf), client) {
            let _ = down.send_to(&buf[..n], c);
        }
    }
}

/// Looks up a region's measured latency (ms) in a status; infinite if absent.
fn latency(st: &Value) -> impl Fn(&str) -> f64 + '_ {
    move |region| {
        st["mesh"]["relay_latency_ms"]
            .as_array()
            .and_then(|l| {
                l.iter()
                    .find(|e| e[0] == region)
                    .and_then(|e| e[1].as_f64())
            })
            .unwrap_or(f64::INFINITY)
    }
}

/// The relay map names a key the relay does not hold (a relay replaced, or
/// a server posing as it): the agent checks the key the relay proves in its
/// handshake against the map's and refuses the relay before it proves its
/// own, so none of its traffic goes there. `warren up` fails and says why,
/// and `warren status` keeps saying so.
#[test]
fn an_agent_refuses_a_relay_whose_key_is_not_the_one_in_the_map() {
    let Some(lab) = Lab::new_or_skip() else {
        return;
    };
    let coord_node = lab.public("coord");
    let wrong = warren_keypair(&lab, &coord_node).public;
    // No embedded relay: r2 is the only region, so it is the home.
    let (coord, _r2) = start_with_keyed_region(
        &lab,
        &coord_node,
        &["--no-relay"],
        &lab.public("r2"),
        "r2",
        Some(&wrong),
    );
    let ha = lab.public("a");
    let a = Agent::start(&lab, &ha, &AgentConfig::mesh(&lab, &ha));
    let (token, _) = coord.token(&lab, &["--reusable"]);
    let out = up_with(&lab, &a, &coord, &token, &["--timeout", "8s"]);
    assert!(!out.ok(), "up must not succeed: {}", out.stdout);
    assert!(
        out.stderr.contains("did not connect") && out.stderr.contains("presented key"),
        "up names the refused key:\n{}",
        out.stderr
    );
    let st = a.status(&lab);
    let m = &st["mesh"];
    assert_eq!(m["home_relay"], "r2", "{st}");
    assert_eq!(m["home_relay_connected"], false, "{st}");
    let error = m["home_relay_error"].as_str().unwrap_or_default();
    assert!(
        error.contains("presented key") && error.contains("expected"),
        "{st}"
    );
}
