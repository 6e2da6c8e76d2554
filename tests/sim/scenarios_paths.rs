//! Paths over time: a dying path, forged and replayed disco, hysteresis,
//! network changes and idle keepalives.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use warren::proto::disco::{self, DiscoSecret, Message};
use warren::traversal::node::NodeEvent;
use warren::traversal::{ChangeReason, Path, RelayReason};

use crate::harness::{Sim, PORT};
use crate::net::NatConfig;
use crate::scenarios::{assert_direct_fast, pair};

const MS: Duration = Duration::from_millis(1);
const SEC: Duration = Duration::from_secs(1);

/// When node `x` last switched to `to_relay` (relay) or direct.
fn switches(sim: &Sim, x: usize) -> Vec<(Duration, Path, ChangeReason)> {
    let t0 = sim.nodes[x]
        .events
        .first()
        .map(|e| e.0)
        .unwrap_or(sim.now());
    sim.nodes[x]
        .events
        .iter()
        .filter_map(|(t, e)| match e {
            NodeEvent::PathChanged { to, reason, .. } => Some((t.duration_since(t0), *to, *reason)),
            _ => None,
        })
        .collect()
}

#[test]
fn direct_path_dies_falls_back_at_once_then_recovers() {
    let (mut sim, a, b) = pair(21, Some(NatConfig::easy()), Some(NatConfig::easy()));
    assert_direct_fast(&mut sim, a, b);
    let cut = sim.now();
    let hb = sim.nodes[b].host;
    sim.world.hosts[hb].udp_down = true;
    sim.run_for(10 * SEC);
    // Fell back within the trust window (6.5 s past the last pong).
    let (t, e) = sim.nodes[a].events.last().cloned().unwrap();
    assert!(matches!(
        e,
        NodeEvent::PathChanged {
            to: Path::Relay,
            reason: ChangeReason::TimedOut,
            ..
        }
    ));
    assert!(
        t.duration_since(cut) <= Duration::from_millis(6500),
        "{:?}",
        t - cut
    );
    let why = sim.nodes[a].node().relay_reason(&sim.nodes[b].key).unwrap();
    assert!(matches!(why, RelayReason::DirectTimedOut { .. }), "{why:?}");
    // From the fallback on, traffic reaches b through the relay.
    let relayed = sim.nodes[b].rx_relay;
    sim.run_for(2 * SEC);
    assert!(
        sim.nodes[b].rx_relay >= relayed + 9,
        "{} -> {}",
        relayed,
        sim.nodes[b].rx_relay
    );

    let healed = sim.now();
    sim.world.hosts[hb].udp_down = false;
    sim.run_for(40 * SEC);
    assert!(matches!(sim.path(a, b), Path::Direct(_)));
    assert!(matches!(sim.path(b, a), Path::Direct(_)));
    let back = sim.nodes[a]
        .events
        .iter()
        .find(|(t, e)| {
            *t > healed
                && matches!(
                    e,
                    NodeEvent::PathChanged {
                        to: Path::Direct(_),
                        ..
                    }
                )
        })
        .map(|(t, _)| t.duration_since(healed))
        .expect("recovered");
    assert!(back < 30 * SEC, "{back:?}");
}

#[test]
fn forged_and_replayed_disco_never_move_the_path() {
    let (mut sim, a, b) = pair(22, None, None);
    assert_direct_fast(&mut sim, a, b);
    let a_addr = SocketAddr::new(IpAddr::V4(sim.world.hosts[sim.nodes[a].host].ip), PORT);
    let b_addr = SocketAddr::new(IpAddr::V4(sim.world.hosts[sim.nodes[b].host].ip), PORT);
    let captured: Vec<Vec<u8>> = sim
        .world
        .tap
        .iter()
        .filter(|s| s.from == b_addr && s.to == a_addr && disco::looks_like_disco(&s.bytes))
        .map(|s| s.bytes.clone())
        .collect();
    assert!(captured.len() > 5);
    // b goes away; a falls back to the relay.
    let hb = sim.nodes[b].host;
    sim.world.hosts[hb].udp_down = true;
    sim.run_for(8 * SEC);
    assert_eq!(sim.path(a, b), Path::Relay);
    let before = sim.nodes[a].events.len();

    let mallory: SocketAddr = "192.0.2.66:4444".parse().unwrap();
    let b_disco = sim.nodes[b].node().disco_key();
    let a_disco = sim.nodes[a].node().disco_key();
    let evil = DiscoSecret::from_bytes([66; 32]);
    let pong = Message::Pong {
        tx_id: [0; 12],
        observed_src: a_addr,
    };
    for (i, pkt) in captured.iter().enumerate() {
        // Replays from b's own address and from elsewhere.
        sim.world.inject(b_addr, a_addr, pkt.clone());
        sim.world.inject(mallory, a_addr, pkt.clone());
        // Forgery: claims b's disco key, sealed with another key.
        let forged = disco::seal(
            &evil.box_for(&a_disco),
            &b_disco,
            1_000_000 + i as u64,
            [1; 16],
            &pong,
        );
        sim.world.inject(b_addr, a_addr, forged);
        // A stranger with its own key.
        let stranger = disco::seal(
            &evil.box_for(&a_disco),
            &evil.public(),
            i as u64,
            [2; 16],
            &pong,
        );
        sim.world.inject(mallory, a_addr, stranger);
        sim.run_for(100 * MS);
    }
    sim.run_for(5 * SEC);
    assert_eq!(sim.path(a, b), Path::Relay);
    assert!(
        !sim.nodes[a].events[before..].iter().any(|(_, e)| matches!(
            e,
            NodeEvent::PathChanged {
                to: Path::Direct(_),
                ..
            }
        )),
        "a forged or replayed packet moved the path"
    );
    let d = sim.nodes[a].node().drops();
    let n = captured.len() as u64;
    assert_eq!(d.replayed, 2 * n, "{d:?}");
    assert_eq!(d.unsealable, n, "{d:?}");
    assert_eq!(d.unknown_sender, n, "{d:?}");
    assert_eq!(d.rejected, 0, "{d:?}");
}

#[test]
fn slightly_better_path_does_not_flap() {
    // b is public with two addresses, the second 0.3 ms further away; both
    // links jitter by up to 2 ms, so the measured order keeps swapping.
    let mut sim = Sim::new(23);
    let ha = sim.world.add_host(None, 10 * MS);
    let hb = sim.world.add_host(None, 10 * MS);
    sim.world.hosts[hb].alias =
        Some((Ipv4Addr::new(198, 51, 100, 200), Duration::from_micros(300)));
    for h in [ha, hb] {
        sim.world.hosts[h].jitter = 2 * MS;
    }
    let (a, b) = (sim.add_node(ha), sim.add_node(hb));
    sim.connect(a, b);
    sim.run_for(300 * SEC);
    let sw = switches(&sim, a);
    assert_eq!(sw.len(), 1, "flapping: {sw:?}");
    assert!(matches!(sim.path(a, b), Path::Direct(_)));
    // Both addresses were measured: the re-probe every minute reached the other.
    let st = sim.nodes[a]
        .node()
        .status(&sim.nodes[b].key, sim.now())
        .unwrap();
    assert!(st.stats.pongs_received > 90, "{:?}", st.stats);
}

#[test]
fn network_change_drops_to_relay_and_rediscovers() {
    let (mut sim, a, b) = pair(24, Some(NatConfig::easy()), None);
    assert_direct_fast(&mut sim, a, b);
    let t = sim.now();
    sim.nodes[a].state.handle_network_changed(t);
    assert_eq!(sim.path(a, b), Path::Relay);
    let why = sim.nodes[a].node().relay_reason(&sim.nodes[b].key).unwrap();
    assert_eq!(why, RelayReason::NetworkChanged { at: t });
    sim.run_for(3 * SEC);
    assert!(matches!(sim.path(a, b), Path::Direct(_)));
    let sw = switches(&sim, a);
    assert_eq!(sw[sw.len() - 2].2, ChangeReason::NetworkChanged);
}

#[test]
fn idle_direct_path_is_kept_by_keepalives() {
    let (mut sim, a, b) = pair(25, Some(NatConfig::easy()), Some(NatConfig::easy()));
    assert_direct_fast(&mut sim, a, b);
    for n in &mut sim.nodes {
        n.traffic = false;
    }
    let pongs = |sim: &Sim| {
        sim.nodes[a]
            .node()
            .status(&sim.nodes[b].key, sim.now())
            .unwrap()
            .stats
            .pongs_received
    };
    let before = pongs(&sim);
    // Ten minutes idle, NAT mappings time out after 60 s.
    sim.run_for(600 * SEC);
    assert!(
        matches!(sim.path(a, b), Path::Direct(_)),
        "{:?}",
        switches(&sim, a)
    );
    let idle_pongs = pongs(&sim) - before;
    // Heartbeats every 3 s for the first 45 s, then one per 25 s (plus re-probes).
    assert!((25..=60).contains(&idle_pongs), "{idle_pongs}");
    for n in &mut sim.nodes {
        n.traffic = true;
    }
    let rx = sim.nodes[b].rx_direct;
    sim.run_for(5 * SEC);
    assert!(sim.nodes[b].rx_direct >= rx + 20);
    assert_eq!(switches(&sim, a).len(), 1);
}
