//! Lab tests of the birthday method end to end: a node behind a NAT that
//! maps every destination to a random port (`masquerade fully-random`,
//! [`Nat::Edm`]) and a peer behind a port-preserving NAT ([`Nat::Eim`]) or
//! on a public address, both joined through a real coordinator.
//!
//! Each test asserts the tunnel works (ping, then a checksummed TCP
//! transfer over whatever path is up) and measures how long the pair takes
//! to turn direct, printing the final path and the agents' birthday log
//! lines. The public case is direct without the birthday method; the EIM
//! case is the one the extra sockets are for. It relies on the EIM gateway
//! dropping unsolicited traffic to itself, as home routers (and the lab's
//! gateways) do: an accepted spray would leave conntrack entries there that
//! make the easy side's matching probe leave from a remapped port.

use crate::lab;

use std::time::{Duration, Instant};

use lab::agent::{tcp_transfer, Agent};
use lab::coord::Coordinator;
use lab::mesh::{join, overlay_v4, path_of, peer_of};
use lab::nat::Nat;
use lab::{poll_until, Lab, Node};
use serde_json::Value;

/// A node joins, learns its peer and has a working tunnel within this.
const JOIN_TIMEOUT: Duration = Duration::from_secs(30);
/// Netcheck, then a birthday attempt (30 s at most by default), then its
/// pong: time to direct is waited for this long.
const DIRECT_TIMEOUT: Duration = Duration::from_secs(45);

fn birthday_lines(lab: &Lab, a: &Agent) -> String {
    lab.log(a.proc)
        .lines()
        .filter(|l| l.contains("birthday") || l.contains("path changed"))
        .map(|l| format!("  {}: {l}\n", a.node.name))
        .collect()
}

struct Outcome {
    path: String,
    to_direct: Option<Duration>,
    /// The hard side's log lines about birthday sockets and paths.
    hard_log: String,
}

/// `hard` is behind the random-port NAT, `other` wherever the caller put it.
/// Joins both, checks ping and a transfer, and measures time to direct.
fn run_pair(lab: &Lab, hard: &Node, other: &Node) -> Outcome {
    let c = lab.public("coord");
    // A second STUN port lets netcheck see that the mapping varies by
    // destination: without it no side is known to be hard and the birthday
    // method never starts. Named explicitly (it is also the coordinator's
    // default) so the test does not rest on that default.
    let alt = format!("{}:3479", c.ip);
    let coord = Coordinator::start(lab, &c, &["--stun-alt-listen", &alt]);
    let (token, _) = coord.token(lab, &["--reusable"]);
    let h = join(lab, &coord, &token, hard);
    let o = join(lab, &coord, &token, other);
    for (a, peer) in [(&h, &o), (&o, &h)] {
        assert!(
            poll_until(JOIN_TIMEOUT, Duration::from_millis(100), || {
                peer_of(&a.status(lab), &peer.node.name).is_some()
            }),
            "{} does not see {}: {}",
            a.node.name,
            peer.node.name,
            a.status(lab)
        );
    }
    let ip_o = overlay_v4(&o.status(lab));
    let ip_h = overlay_v4(&h.status(lab));
    let t0 = Instant::now();
    assert!(
        lab.ping_within(&h.node, &ip_o, JOIN_TIMEOUT),
        "{} cannot reach {ip_o}\n{}",
        h.node.name,
        h.cli(lab, &["status"]).stdout
    );
    assert!(lab.ping_within(&o.node, &ip_h, JOIN_TIMEOUT));
    eprintln!("first ping after {:?}", t0.elapsed());
    let t1 = Instant::now();
    let mut direct = false;
    poll_until(DIRECT_TIMEOUT, Duration::from_millis(200), || {
        // Traffic keeps traversal's heartbeats (and so its attempts) going.
        let _ = lab.ping(&h.node, &ip_o);
        direct = path_of(&h.status(lab), &o.node.name) == "direct"
            && path_of(&o.status(lab), &h.node.name) == "direct";
        direct
    });
    let to_direct = direct.then(|| t1.elapsed());
    // Disco pings each side sent so far (the spray and the probes
    // included): the attempt's traffic cost.
    let pings = |a: &Agent, peer: &Agent| {
        peer_of(&a.status(lab), &peer.node.name)
            .map_or(Value::Null, |p| p["mesh"]["pings_sent"].clone())
    };
    eprintln!(
        "disco pings sent: {} {}, {} {}",
        h.node.name,
        pings(&h, &o),
        o.node.name,
        pings(&o, &h)
    );
    let ip = ip_o.parse().unwrap();
    let t2 = Instant::now();
    let (sent, got) = tcp_transfer(lab, &h.node, &o.node, ip, 5201, 4 << 20);
    assert_eq!(sent, got, "the transfer arrives intact");
    eprintln!("4 MiB transfer in {:?}", t2.elapsed());
    assert!(lab.ping_within(&h.node, &ip_o, Duration::from_secs(5)));
    let st = h.status(lab);
    let path = peer_of(&st, &o.node.name).map_or(Value::Null, |p| p["path"].clone());
    let hard_log = birthday_lines(lab, &h);
    eprintln!(
        "{} -> {}: path {path}, time to direct {to_direct:?}\n{hard_log}{}",
        h.node.name,
        o.node.name,
        birthday_lines(lab, &o)
    );
    Outcome {
        path: path_of(&st, &o.node.name),
        to_direct,
        hard_log,
    }
}

#[test]
fn random_port_nat_to_public_host_goes_direct() {
    let Some(lab) = Lab::new_or_skip() else {
        return;
    };
    let gw = lab.gateway("gwh", Nat::Edm);
    let hard = lab.host_behind(&gw, "hard");
    let open = lab.public("open");
    let out = run_pair(&lab, &hard, &open);
    assert_eq!(out.path, "direct", "a public peer is reachable directly");
    assert!(out.to_direct.is_some());
}

/// Both gateways drop unsolicited input, as home routers do: the birthday
/// method's case, which must end direct.
#[test]
fn random_port_nat_to_port_preserving_router_goes_direct() {
    let Some(lab) = Lab::new_or_skip() else {
        return;
    };
    let gh = lab.gateway("gwh", Nat::Edm);
    let hard = lab.host_behind(&gh, "hard");
    let ge = lab.gateway("gwe", Nat::Eim);
    let easy = lab.host_behind(&ge, "easy");
    let out = run_pair(&lab, &hard, &easy);
    eprintln!(
        "EDM-random <-> EIM (router): final path {}, time to direct {:?}",
        out.path, out.to_direct
    );
    // The attempt ran: netcheck saw the random EDM.
    assert!(
        out.hard_log
            .contains("extra sockets opened count=256 open=256"),
        "{}",
        out.hard_log
    );
    assert_eq!(
        out.path, "direct",
        "the birthday method finds a direct path"
    );
    // Over an extra socket, which stays open alone.
    assert!(out.hard_log.contains("(socket "), "{}", out.hard_log);
    assert!(out.hard_log.contains("still_open=1"), "{}", out.hard_log);
}
