//! The NAT matrix: every ordered pair of gateway kinds, with real agents,
//! a real coordinator (control, STUN and relay) and real kernel NAT.
//!
//! One lab holds two hosts of each kind (a "row" host and a "column"
//! host, each behind its own gateway), all joined to one network. Each
//! ordered pair (row kind, column kind) is its own tunnel, so pairs do not
//! disturb each other's measurements. Traversal starts lazily, on the first
//! packet, so each pair is measured from its own first ping:
//! - time to first packet: the first echo reply (through the relay);
//! - time to direct: from that reply until the row host's status shows a
//!   direct path, waited for only where a direct path is expected;
//! - then a 10 MB checksummed TCP transfer over whatever path is up.
//!
//! The table (rows and columns are gateway kinds, each cell the final path
//! and seconds to direct) is printed and written to
//! `target/nat-matrix.txt`, which `tests/run.sh` shows in the CI log.

#![allow(clippy::unwrap_used)]

mod lab;

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use lab::agent::{tcp_transfer, Agent, AgentConfig};
use lab::coord::Coordinator;
use lab::mesh::{join, join_with, overlay_v4, path_of};
use lab::nat::Nat;
use lab::{poll_until, Lab, Node};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Public,
    Eim,
    EdmSeq,
    EdmRandom,
    DoubleNat,
    Upnp,
    UdpBlocked,
}

const KINDS: [Kind; 7] = [
    Kind::Public,
    Kind::Eim,
    Kind::EdmSeq,
    Kind::EdmRandom,
    Kind::DoubleNat,
    Kind::Upnp,
    Kind::UdpBlocked,
];

impl Kind {
    fn label(self) -> &'static str {
        match self {
            Kind::Public => "public",
            Kind::Eim => "eim",
            Kind::EdmSeq => "edm-seq",
            Kind::EdmRandom => "edm-random",
            Kind::DoubleNat => "double-nat",
            Kind::Upnp => "upnp",
            Kind::UdpBlocked => "udp-blocked",
        }
    }

    /// A host behind a fresh gateway of this kind.
    fn host(self, lab: &Lab, tag: &str) -> Node {
        let gw = |nat| lab.gateway(&format!("g{tag}"), nat);
        match self {
            Kind::Public => lab.public(&format!("h{tag}")),
            Kind::Eim => lab.host_behind(&gw(Nat::Eim), &format!("h{tag}")),
            Kind::EdmSeq => lab.host_behind(&gw(Nat::EdmSequential), &format!("h{tag}")),
            Kind::EdmRandom => lab.host_behind(&gw(Nat::Edm), &format!("h{tag}")),
            Kind::Upnp => lab.host_behind(&gw(Nat::Upnp), &format!("h{tag}")),
            Kind::UdpBlocked => lab.host_behind(&gw(Nat::UdpBlocked), &format!("h{tag}")),
            Kind::DoubleNat => {
                let cgnat = gw(Nat::Eim);
                let home = lab.gateway_behind(&cgnat, &format!("k{tag}"), Nat::Eim);
                lab.host_behind(&home, &format!("h{tag}"))
            }
        }
    }

    fn udp_blocked(self) -> bool {
        self == Kind::UdpBlocked
    }

    /// Reachable at a fixed public address from anyone: no NAT, or a
    /// port mapping.
    fn open(self) -> bool {
        matches!(self, Kind::Public | Kind::Upnp)
    }

    /// Endpoint-independent mapping: one public port for all peers.
    fn easy(self) -> bool {
        matches!(self, Kind::Eim | Kind::DoubleNat)
    }
}

/// Where this agent, as built, must end up: a cell expected direct that
/// ends on the relay fails the test. An open side (no NAT, or a port
/// mapping) is reached by the other side's pings whatever its NAT; two
/// endpoint-independent NATs open their filters to each other with
/// simultaneous pings (`CallMeMaybe` through the relay).
fn expect_direct(a: Kind, b: Kind) -> bool {
    !a.udp_blocked() && !b.udp_blocked() && (a.open() || b.open() || (a.easy() && b.easy()))
}

/// Cells where a direct path exists in principle but is not asserted
/// (marked `*` when the pair was not direct within the window):
/// - an easy side against random EDM: the birthday method (256 extra
///   sockets on the hard side, random probes from the easy side) wins in
///   most runs, in 2–7 s, but it is a probability, not a promise;
/// - sequential EDM against sequential EDM or double NAT: port prediction
///   goes direct (0.3 s against double NAT; about 1.4 s for a fresh pair,
///   see `sequential_edm_pair_goes_direct_by_prediction`, but up to 8 s
///   here, where earlier pairs' flows moved the gateway's counter: a
///   mapping that expired and was re-opened is not counted by the agent);
/// - sequential against random EDM: no method here pairs a predictable
///   port with a random one (the birthday method needs an EIM side).
fn known_gap(a: Kind, b: Kind) -> bool {
    let hard = |k: Kind| matches!(k, Kind::EdmSeq | Kind::EdmRandom);
    let both_random = a == Kind::EdmRandom && b == Kind::EdmRandom;
    let excluded = expect_direct(a, b) || a.udp_blocked() || b.udp_blocked() || both_random;
    !excluded && (hard(a) || hard(b))
}

struct Cell {
    first_packet: Option<Duration>,
    to_direct: Option<Duration>,
    path: String,
    transfer_ok: bool,
}

#[test]
fn nat_matrix() {
    if !lab::require_root() {
        return;
    }
    let lab = Lab::new();
    let c = lab.public("coord");
    let coord = Coordinator::start(&lab, &c, &[]);
    let (token, _) = coord.token(&lab, &["--reusable"]);
    let mut rows = Vec::new();
    let mut cols = Vec::new();
    for (i, k) in KINDS.iter().enumerate() {
        for (side, list) in [("r", &mut rows), ("c", &mut cols)] {
            let node = k.host(&lab, &format!("{side}{i}"));
            let mut cfg = AgentConfig::mesh(&lab, &node);
            cfg.portmap = *k == Kind::Upnp;
            list.push((*k, join_with(&lab, &coord, &token, &node, &cfg)));
        }
    }
    // Everyone sees everyone before any pair is measured.
    let n = rows.len() + cols.len();
    for (_, a) in rows.iter().chain(cols.iter()) {
        assert!(
            poll_until(Duration::from_secs(30), Duration::from_millis(200), || {
                a.status(&lab)["peers"].as_array().map_or(0, Vec::len) == n - 1
            }),
            "{} does not see the network: {}",
            a.node.name,
            a.status(&lab)
        );
    }
    let mut cells = Vec::new();
    for (rk, ra) in &rows {
        for (ck, ca) in &cols {
            let peer_ip = overlay_v4(&ca.status(&lab));
            let t0 = Instant::now();
            let reached = lab.ping_within(&ra.node, &peer_ip, Duration::from_secs(10));
            let first_packet = reached.then(|| t0.elapsed());
            let t1 = Instant::now();
            let want_direct = expect_direct(*rk, *ck);
            let to_direct = if reached {
                // Birthday attempts run for up to 30 s; give them a while.
                let wait = if want_direct {
                    10
                } else if known_gap(*rk, *ck) {
                    8
                } else {
                    2
                };
                let mut direct = false;
                poll_until(
                    Duration::from_secs(wait),
                    Duration::from_millis(100),
                    || {
                        // Traffic keeps traversal's heartbeats going.
                        let _ = lab.ping(&ra.node, &peer_ip);
                        direct = path_of(&ra.status(&lab), &ca.node.name) == "direct";
                        direct
                    },
                );
                direct.then(|| t1.elapsed())
            } else {
                None
            };
            let transfer_ok = reached && {
                let ip = peer_ip.parse().unwrap();
                let (sent, got) = tcp_transfer(&lab, &ra.node, &ca.node, ip, 5201, 10 << 20);
                sent == got
            };
            let path = path_of(&ra.status(&lab), &ca.node.name);
            cells.push((
                *rk,
                *ck,
                Cell {
                    first_packet,
                    to_direct,
                    path,
                    transfer_ok,
                },
            ));
        }
    }
    let table = render(&cells);
    eprintln!("{table}");
    let out = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("../nat-matrix.txt");
    let _ = std::fs::write(&out, &table);
    let mut failures = Vec::new();
    for (rk, ck, cell) in &cells {
        let name = format!("{} -> {}", rk.label(), ck.label());
        match cell.first_packet {
            None => failures.push(format!("{name}: no packet got through")),
            Some(t) if t > Duration::from_secs(1) => {
                failures.push(format!("{name}: first packet after {t:?} (want < 1 s)"))
            }
            _ => {}
        }
        if !cell.transfer_ok {
            failures.push(format!("{name}: 10 MB transfer failed or corrupted"));
        }
        if expect_direct(*rk, *ck) {
            match cell.to_direct {
                None => failures.push(format!("{name}: stayed on {} (want direct)", cell.path)),
                Some(t) if t > Duration::from_secs(3) => {
                    failures.push(format!("{name}: direct after {t:?} (want < 3 s)"))
                }
                _ => {}
            }
        }
    }
    assert!(failures.is_empty(), "{}\n{table}", failures.join("\n"));
}

fn render(cells: &[(Kind, Kind, Cell)]) -> String {
    let mut out = String::from(
        "NAT matrix: row = initiator, column = peer; cell = final path, \
         first packet / time to direct (s)\n\n",
    );
    let _ = write!(out, "{:<12}", "");
    for k in KINDS {
        let _ = write!(out, "{:<22}", k.label());
    }
    out.push('\n');
    for r in KINDS {
        let _ = write!(out, "{:<12}", r.label());
        for c in KINDS {
            let cell = cells
                .iter()
                .find(|(a, b, _)| *a == r && *b == c)
                .map(|(_, _, cell)| cell);
            let text = match cell {
                Some(cell) => {
                    let fp = cell
                        .first_packet
                        .map_or("-".into(), |d| format!("{:.2}", d.as_secs_f64()));
                    let td = cell
                        .to_direct
                        .map_or("-".into(), |d| format!("{:.1}", d.as_secs_f64()));
                    let ok = if cell.transfer_ok { "" } else { "!" };
                    let gap = if known_gap(r, c) && cell.to_direct.is_none() {
                        "*"
                    } else {
                        ""
                    };
                    format!("{}{gap}{ok} {fp}/{td}", cell.path)
                }
                None => "?".into(),
            };
            let _ = write!(out, "{text:<22}");
        }
        out.push('\n');
    }
    out.push_str(
        "\n* not direct within the window where a direct path exists in principle: \
         see `known_gap` in tests/lab_matrix.rs (birthday, port prediction)\n\
         ! the 10 MB transfer failed\n",
    );
    out
}

/// Two peers behind the same NAT (EIM, no hairpinning): they reach each
/// other over their host candidates on the LAN, not through the NAT.
#[test]
fn same_nat_pair_goes_direct_over_the_lan() {
    if !lab::require_root() {
        return;
    }
    let lab = Lab::new();
    let c = lab.public("coord");
    let coord = Coordinator::start(&lab, &c, &[]);
    let (token, _) = coord.token(&lab, &["--reusable"]);
    let gw = lab.gateway("gw", Nat::Eim);
    let agents: Vec<Agent> = ["x", "y"]
        .iter()
        .map(|name| {
            let node = lab.host_behind(&gw, name);
            join(&lab, &coord, &token, &node)
        })
        .collect();
    let (x, y) = (&agents[0], &agents[1]);
    assert!(poll_until(
        Duration::from_secs(20),
        Duration::from_millis(200),
        || { path_of(&x.status(&lab), "y") != "unknown" }
    ));
    let ip_y = overlay_v4(&y.status(&lab));
    assert!(
        lab.ping_within(&x.node, &ip_y, Duration::from_secs(5)),
        "{}",
        x.status(&lab)
    );
    let mut path = String::new();
    let direct = poll_until(Duration::from_secs(10), Duration::from_millis(100), || {
        let _ = lab.ping(&x.node, &ip_y);
        path = path_of(&x.status(&lab), "y");
        path == "direct"
    });
    let st = x.status(&lab);
    let endpoint = st["peers"][0]["path"]["endpoint"]
        .as_str()
        .unwrap_or("")
        .to_owned();
    assert!(direct, "same-NAT peers stay on {path}: {st}");
    assert!(
        endpoint.starts_with(&y.node.ip.to_string()),
        "the direct path is the LAN address {}, not {endpoint}",
        y.node.ip
    );
}

/// Two fresh peers behind sequential EDM NATs: port prediction alone (the
/// CallMeMaybe lists the ports each side's probes will take) opens a direct
/// path, when nothing else has moved the NATs' counters.
#[test]
fn sequential_edm_pair_goes_direct_by_prediction() {
    if !lab::require_root() {
        return;
    }
    let lab = Lab::new();
    let coord = Coordinator::start(&lab, &lab.public("coord"), &[]);
    let (token, _) = coord.token(&lab, &["--reusable"]);
    let agents: Vec<Agent> = ["x", "y"]
        .iter()
        .map(|name| {
            let gw = lab.gateway(&format!("g{name}"), Nat::EdmSequential);
            let node = lab.host_behind(&gw, name);
            join(&lab, &coord, &token, &node)
        })
        .collect();
    let (x, y) = (&agents[0], &agents[1]);
    assert!(poll_until(
        Duration::from_secs(20),
        Duration::from_millis(200),
        || path_of(&x.status(&lab), "y") != "unknown"
            && y.status(&lab)["mesh"]["nat"]["allocation"]["kind"] == "sequential"
            && x.status(&lab)["mesh"]["nat"]["allocation"]["kind"] == "sequential"
    ));
    let ip_y = overlay_v4(&y.status(&lab));
    assert!(lab.ping_within(&x.node, &ip_y, Duration::from_secs(5)));
    let t0 = Instant::now();
    let direct = poll_until(Duration::from_secs(10), Duration::from_millis(100), || {
        let _ = lab.ping(&x.node, &ip_y);
        path_of(&x.status(&lab), "y") == "direct"
    });
    eprintln!("sequential pair: direct {direct} after {:?}", t0.elapsed());
    assert!(direct, "{}", x.cli(&lab, &["status"]).stdout);
}
