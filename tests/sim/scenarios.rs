//! Topologies where a direct path exists or the relay is the only answer.

use std::time::Duration;

use warren::traversal::node::NodeEvent;
use warren::traversal::{Config, Path, RelayReason};

use crate::harness::Sim;
use crate::net::{Filter, NatConfig};

const MS: Duration = Duration::from_millis(1);
const SEC: Duration = Duration::from_secs(1);

/// Two nodes, each behind `nat` (or public when `None`), 10 ms from the core.
pub fn pair(seed: u64, a: Option<NatConfig>, b: Option<NatConfig>) -> (Sim, usize, usize) {
    pair_with(seed, Config::default(), a, b)
}

pub fn pair_with(
    seed: u64,
    cfg: Config,
    a: Option<NatConfig>,
    b: Option<NatConfig>,
) -> (Sim, usize, usize) {
    let mut sim = Sim::new(seed);
    sim.cfg = cfg;
    let mut ids = Vec::new();
    for cfg in [a, b] {
        let nat = cfg.map(|c| sim.world.add_nat(c));
        let host = sim.world.add_host(nat, 10 * MS);
        ids.push(sim.add_node(host));
    }
    sim.connect(ids[0], ids[1]);
    (sim, ids[0], ids[1])
}

/// Runs 10 s and checks both sides went direct within 3 s.
pub fn assert_direct_fast(sim: &mut Sim, a: usize, b: usize) -> Duration {
    let t0 = sim.now();
    sim.run_for(10 * SEC);
    let mut worst = Duration::ZERO;
    for (x, y) in [(a, b), (b, a)] {
        let peer = sim.nodes[y].key;
        let t = sim.nodes[x]
            .time_to_direct(peer, t0)
            .unwrap_or_else(|| panic!("node {x} never went direct: {:?}", sim.nodes[x].events));
        assert!(t < 3 * SEC, "node {x} took {t:?} to go direct");
        assert!(matches!(sim.path(x, y), Path::Direct(_)));
        worst = worst.max(t);
    }
    eprintln!("time to direct (slower side): {worst:?}");
    // Traffic really flowed direct, and the relay carried the start: the
    // WireGuard handshake at least (data queued behind it may already
    // leave on the direct path, which came first).
    assert!(
        sim.nodes[b].rx_direct > 0 && sim.nodes[b].wg_relay > 0,
        "data direct {}, WireGuard over the relay {}",
        sim.nodes[b].rx_direct,
        sim.nodes[b].wg_relay,
    );
    worst
}

#[test]
fn public_to_public() {
    let (mut sim, a, b) = pair(1, None, None);
    let t = assert_direct_fast(&mut sim, a, b);
    // Relay leg 60 ms, direct RTT 40 ms: about one relay trip plus an RTT.
    assert!(t < 200 * MS, "{t:?}");
    assert_eq!(sim.nodes[a].node().drops(), Default::default());
}

#[test]
fn public_to_port_restricted_nat_by_reversal() {
    let (mut sim, a, b) = pair(2, None, Some(NatConfig::easy()));
    assert_direct_fast(&mut sim, a, b);
}

#[test]
fn eim_to_eim() {
    let (mut sim, a, b) = pair(3, Some(NatConfig::easy()), Some(NatConfig::easy()));
    assert_direct_fast(&mut sim, a, b);
}

#[test]
fn eim_to_edm_sequential() {
    let hard = NatConfig::hard(crate::net::Alloc::Sequential(1));
    let (mut sim, a, b) = pair(4, Some(NatConfig::easy()), Some(hard));
    assert_direct_fast(&mut sim, a, b);
}

#[test]
fn eim_address_filter_to_edm_random_via_relay_free_path() {
    // An address-dependent filter lets the EDM side in once we sent to its
    // IP at all: plain probing is enough, no birthday needed.
    let easy = NatConfig {
        filter: Filter::AddressDependent,
        ..NatConfig::easy()
    };
    let hard = NatConfig::hard(crate::net::Alloc::Random);
    let (mut sim, a, b) = pair(5, Some(easy), Some(hard));
    assert_direct_fast(&mut sim, a, b);
}

#[test]
fn same_nat_without_hairpin_uses_host_candidates() {
    let mut sim = Sim::new(6);
    let nat = sim.world.add_nat(NatConfig::easy());
    let ha = sim.world.add_host(Some(nat), 10 * MS);
    let hb = sim.world.add_host(Some(nat), 10 * MS);
    let (a, b) = (sim.add_node(ha), sim.add_node(hb));
    sim.connect(a, b);
    assert_direct_fast(&mut sim, a, b);
    let Path::Direct(p) = sim.path(a, b) else {
        unreachable!()
    };
    assert_eq!(p.addr.ip(), std::net::IpAddr::V4(sim.world.hosts[hb].ip));
}

#[test]
fn same_nat_with_hairpin_still_prefers_host() {
    let mut sim = Sim::new(7);
    let nat = sim.world.add_nat(NatConfig {
        hairpin: true,
        ..NatConfig::easy()
    });
    let ha = sim.world.add_host(Some(nat), 10 * MS);
    let hb = sim.world.add_host(Some(nat), 10 * MS);
    let (a, b) = (sim.add_node(ha), sim.add_node(hb));
    sim.connect(a, b);
    assert_direct_fast(&mut sim, a, b);
    sim.run_for(90 * SEC);
    for (x, y) in [(a, b), (b, a)] {
        let Path::Direct(p) = sim.path(x, y) else {
            panic!("relay")
        };
        let host_ip = sim.world.hosts[sim.nodes[y].host].ip;
        assert_eq!(
            p.addr.ip(),
            std::net::IpAddr::V4(host_ip),
            "node {x} hairpins"
        );
    }
}

/// UDP blocked on one side, TCP open: the pair dials each other's TCP
/// candidates (a simultaneous open through both NATs) and carries its
/// WireGuard over the stream, heartbeats and all, for minutes.
#[test]
fn udp_blocked_on_one_side_goes_direct_over_tcp() {
    let blocked = NatConfig {
        udp_blocked: true,
        ..NatConfig::easy()
    };
    let (mut sim, a, b) = pair(8, Some(blocked), Some(NatConfig::easy()));
    let t0 = sim.now();
    sim.run_for(120 * SEC);
    assert!(
        matches!(sim.path(a, b), Path::Tcp(_)),
        "{:?}",
        sim.path(a, b)
    );
    assert!(
        matches!(sim.path(b, a), Path::Tcp(_)),
        "{:?}",
        sim.path(b, a)
    );
    let events = &sim.nodes[a].events;
    let first_tcp = events.iter().find_map(|(t, e)| match e {
        NodeEvent::PathChanged {
            to: Path::Tcp(_), ..
        } => Some(t.duration_since(t0)),
        _ => None,
    });
    assert!(first_tcp.is_some_and(|t| t < 5 * SEC), "{first_tcp:?}");
    // Real WireGuard opened over the stream, both ways, most of the run.
    assert!(sim.nodes[b].rx_tcp > 400, "{}", sim.nodes[b].rx_tcp);
    assert!(sim.nodes[a].rx_tcp > 400, "{}", sim.nodes[a].rx_tcp);
}

/// UDP blocked and TCP only to 443 (the lab's "udp-blocked" gateway): the
/// relay carries everything.
#[test]
fn udp_blocked_stays_on_relay() {
    let blocked = NatConfig {
        udp_blocked: true,
        tcp_blocked: true,
        ..NatConfig::easy()
    };
    let (mut sim, a, b) = pair(8, Some(blocked), Some(NatConfig::easy()));
    sim.run_for(120 * SEC);
    assert_eq!(sim.path(a, b), Path::Relay);
    assert_eq!(sim.path(b, a), Path::Relay);
    assert_eq!(sim.nodes[a].changes(sim.nodes[b].key), 0);
    // Traffic flows through the relay the whole time (5 packets/s).
    assert!(sim.nodes[b].rx_relay > 500, "{}", sim.nodes[b].rx_relay);
    let why = sim.nodes[b].node().relay_reason(&sim.nodes[a].key).unwrap();
    assert!(
        matches!(
            why,
            RelayReason::NoAnswer { .. } | RelayReason::Probing { .. }
        ),
        "{why:?}"
    );
    // Probing is bounded: 5 rounds, then 30 s, 60 s backoff.
    let st = sim.nodes[b]
        .node()
        .status(&sim.nodes[a].key, sim.now())
        .unwrap();
    assert!(st.stats.pings_sent < 40, "{:?}", st.stats);
}

#[test]
fn full_cone_to_edm_random_needs_no_birthday() {
    // Endpoint-independent filtering lets the hard side's first ping in.
    let cone = NatConfig {
        filter: Filter::EndpointIndependent,
        ..NatConfig::easy()
    };
    let hard = NatConfig::hard(crate::net::Alloc::Random);
    let (mut sim, a, b) = pair(9, Some(cone), Some(hard));
    assert_direct_fast(&mut sim, a, b);
}

#[test]
fn eim_to_eim_with_ten_percent_loss() {
    // Retries at 0.5 s, 1 s, 2 s absorb the loss.
    let (mut sim, a, b) = pair(10, Some(NatConfig::easy()), Some(NatConfig::easy()));
    sim.world.loss = 0.1;
    assert_direct_fast(&mut sim, a, b);
    // A minute of loss: a fallback needs two lost heartbeat round trips in
    // a row (trust 6.5 s, heartbeat 3 s), and is repaired by the next round.
    sim.run_for(60 * SEC);
    assert!(matches!(sim.path(a, b), Path::Direct(_)));
    let changes = sim.nodes[a].changes(sim.nodes[b].key);
    eprintln!("path changes under 10 % loss in 70 s: {changes}");
    assert!(changes <= 5, "{changes}");
}
