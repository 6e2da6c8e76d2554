//! Simulation of the direct TCP path between two real nodes: UDP is
//! dropped, the relay delivers, and a stream (when the test says it is up)
//! carries frames between the two TCP candidates. Virtual clock, no IO.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use super::node::{Datagram, Dest, Node, NodeEvent, PeerInfo};
use super::{ChangeReason, Config, NatSummary, Path, RelayReason};
use crate::keys::NodeKey;
use crate::proto::disco::{Candidate, CandidateKind, DiscoSecret, Transport};

const WG: [u8; 8] = [4, 0, 0, 0, 1, 2, 3, 4];

fn a_tcp() -> SocketAddr {
    "203.0.113.1:41641".parse().unwrap()
}
fn b_tcp() -> SocketAddr {
    "198.51.100.2:41641".parse().unwrap()
}
fn ka() -> NodeKey {
    NodeKey([1; 32])
}
fn kb() -> NodeKey {
    NodeKey([2; 32])
}

/// What netcheck reports for a NAT that hands out ports `step` apart.
fn sequential(step: u16) -> NatSummary {
    NatSummary {
        mapping: super::Mapping::EndpointDependent,
        allocation: super::Allocation::Sequential { step },
        observed: Some("203.0.113.1:30000".parse().unwrap()),
    }
}

fn tcp_cand(addr: SocketAddr) -> Candidate {
    Candidate {
        addr,
        kind: CandidateKind::ServerReflexive,
        transport: Transport::Tcp,
    }
}

/// Two nodes, UDP between them dropped, a relay that delivers, and a
/// stream between their TCP candidates that is up when `stream` is.
struct Sim {
    a: Node,
    b: Node,
    now: Instant,
    stream: bool,
    /// TcpConnect events seen, per side.
    dials: [Vec<Vec<SocketAddr>>; 2],
    closes: [Vec<SocketAddr>; 2],
    changes: [Vec<(Path, ChangeReason)>; 2],
    udp_dropped: usize,
}

impl Sim {
    fn new(a_blocked: bool, b_blocked: bool) -> Sim {
        let now = Instant::now();
        let mut a = Node::new(
            Config::default(),
            ka(),
            DiscoSecret::from_bytes([11; 32]),
            1,
        );
        let mut b = Node::new(
            Config::default(),
            kb(),
            DiscoSecret::from_bytes([22; 32]),
            2,
        );
        let udp = |ip: &str| Candidate::udp(ip.parse().unwrap(), CandidateKind::Host);
        a.set_tcp_local(now, vec![tcp_cand(a_tcp())], a_blocked);
        b.set_tcp_local(now, vec![tcp_cand(b_tcp())], b_blocked);
        let (da, db) = (a.disco_key(), b.disco_key());
        a.upsert_peer(
            now,
            PeerInfo {
                node_key: kb(),
                disco_key: db,
                candidates: vec![udp("10.0.2.2:41641")],
                nat: NatSummary::default(),
            },
        );
        b.upsert_peer(
            now,
            PeerInfo {
                node_key: ka(),
                disco_key: da,
                candidates: vec![udp("10.0.1.2:41641")],
                nat: NatSummary::default(),
            },
        );
        Sim {
            a,
            b,
            now,
            stream: false,
            dials: Default::default(),
            closes: Default::default(),
            changes: Default::default(),
            udp_dropped: 0,
        }
    }

    /// Moves packets and events until both nodes are quiet.
    fn settle(&mut self) {
        for _ in 0..100 {
            let mut moved = false;
            for side in 0..2 {
                let (from, to) = if side == 0 {
                    (&mut self.a, &mut self.b)
                } else {
                    (&mut self.b, &mut self.a)
                };
                let (me, my_tcp) = if side == 0 {
                    (ka(), a_tcp())
                } else {
                    (kb(), b_tcp())
                };
                while let Some(t) = from.poll_transmit() {
                    moved = true;
                    match t.dest {
                        Dest::Relay(_) => {
                            to.handle_relay(self.now, me, &t.bytes);
                        }
                        Dest::Udp { .. } => self.udp_dropped += 1,
                        Dest::Tcp(_) if self.stream => {
                            to.handle_tcp(self.now, my_tcp, &t.bytes);
                        }
                        Dest::Tcp(_) => {}
                    }
                }
                while let Some(ev) = from.poll_event() {
                    moved = true;
                    match ev {
                        NodeEvent::TcpConnect { targets, .. } => self.dials[side].push(targets),
                        NodeEvent::TcpClose { addr } => self.closes[side].push(addr),
                        NodeEvent::PathChanged { to, reason, .. } => {
                            self.changes[side].push((to, reason))
                        }
                        _ => {}
                    }
                }
            }
            if !moved {
                return;
            }
        }
        panic!("the nodes never went quiet");
    }

    /// Jumps the clock to the next deadline (at most `max` ahead).
    fn step(&mut self, max: Duration) {
        let next = [self.a.poll_timeout(), self.b.poll_timeout()]
            .into_iter()
            .flatten()
            .map(|(t, _)| t)
            .min()
            .unwrap_or(self.now + max);
        self.now = next.min(self.now + max).max(self.now);
        self.a.handle_timeout(self.now);
        self.b.handle_timeout(self.now);
        self.settle();
    }

    /// A's traffic starts discovery; both sides dial; the stream comes up
    /// (B's dial wins: it reports the stream, A's listener accepts it).
    fn go_direct(&mut self) {
        self.a.note_traffic(self.now, &kb());
        self.b.note_traffic(self.now, &ka());
        self.a.handle_timeout(self.now);
        self.settle();
        assert_eq!(self.dials[0], vec![vec![b_tcp()]], "A dials B's candidate");
        assert_eq!(self.dials[1], vec![vec![a_tcp()]], "B dials A's candidate");
        self.stream = true;
        self.now += Duration::from_millis(30);
        self.b.tcp_connected(self.now, ka(), a_tcp());
        self.settle();
    }
}

#[test]
fn udp_blocked_pair_goes_direct_over_tcp() {
    let mut s = Sim::new(true, true);
    s.go_direct();
    assert_eq!(s.b.path(&ka()), Path::Tcp(a_tcp()));
    assert_eq!(s.a.path(&kb()), Path::Tcp(b_tcp()));
    assert_eq!(s.a.tcp_owner(b_tcp()), Some(kb()));
    assert!(s.udp_dropped > 0, "UDP was tried first and dropped");
    assert_eq!(
        s.a.handle_tcp(s.now, b_tcp(), &WG),
        Datagram::WireGuard,
        "WireGuard from the proven stream is taken"
    );
    assert_eq!(s.a.path(&kb()).to_string(), "direct tcp 198.51.100.2:41641");
    // Heartbeats keep it: a minute of traffic, stream up, no fallback.
    let end = s.now + Duration::from_secs(60);
    while s.now < end {
        s.a.note_traffic(s.now, &kb());
        s.b.note_traffic(s.now, &ka());
        s.step(Duration::from_secs(1));
    }
    assert_eq!(s.a.path(&kb()), Path::Tcp(b_tcp()));
    assert_eq!(s.b.path(&ka()), Path::Tcp(a_tcp()));
    assert!(s.closes.iter().all(|c| c.is_empty()));
}

#[test]
fn one_blocked_side_is_enough_to_try_tcp() {
    // A's UDP works; B's CallMeMaybe carries TCP, so A answers with its own.
    let mut s = Sim::new(false, true);
    s.b.note_traffic(s.now, &ka());
    s.b.handle_timeout(s.now);
    s.settle();
    assert_eq!(s.dials[0], vec![vec![b_tcp()]]);
    assert_eq!(s.dials[1], vec![vec![a_tcp()]]);
}

#[test]
fn behind_a_sequential_nat_the_next_tcp_ports_are_offered() {
    // A's NAT hands out ports in steps of 2 (netcheck saw it over UDP): its
    // dial to B leaves from one of the ports after the one STUN saw, so B
    // must dial those too, after the observed one.
    let mut s = Sim::new(false, true);
    let seq = sequential(2);
    s.a.set_local(s.now, Vec::new(), seq);
    s.b.note_traffic(s.now, &ka());
    s.b.handle_timeout(s.now);
    s.settle();
    let mut want = vec![a_tcp()];
    let ports = Config::default().predict_ports;
    want.extend((1..=ports).map(|i| SocketAddr::new(a_tcp().ip(), a_tcp().port() + 2 * i)));
    // and the two before: A's dial may have begun before the STUN query.
    want.extend([2, 4].map(|d| SocketAddr::new(a_tcp().ip(), a_tcp().port() - d)));
    assert_eq!(
        s.dials[1],
        vec![want],
        "B dials A's TCP port and those around it"
    );
    assert_eq!(s.dials[0], vec![vec![b_tcp()]], "B's NAT keeps its port");
}

#[test]
fn a_late_sequential_verdict_redials_at_once_with_the_new_ports() {
    // A's netcheck names its NAT only after B has started dialling A's one
    // TCP candidate: A's next CallMeMaybe carries the predicted ports, and
    // B dials the new list at once instead of after its attempt's window
    // and backoff.
    let mut s = Sim::new(false, true);
    s.b.note_traffic(s.now, &ka());
    s.a.note_traffic(s.now, &kb());
    s.b.handle_timeout(s.now);
    s.settle();
    assert_eq!(s.dials[1], vec![vec![a_tcp()]]);
    s.now += Duration::from_millis(300);
    let seq = sequential(1);
    s.a.set_local(s.now, Vec::new(), seq);
    s.a.handle_timeout(s.now);
    s.settle();
    assert_eq!(s.dials[1].len(), 2, "{:?}", s.dials[1]);
    let next = SocketAddr::new(a_tcp().ip(), a_tcp().port() + 1);
    assert!(s.dials[1][1].contains(&next), "{:?}", s.dials[1]);
    // The same list again (A's next CallMeMaybe) starts nothing new.
    for _ in 0..5 {
        s.step(Duration::from_secs(1));
    }
    assert_eq!(s.dials[1].len(), 2, "{:?}", s.dials[1]);
}

#[test]
fn hosts_whose_udp_works_never_dial_tcp() {
    let mut s = Sim::new(false, false);
    s.a.note_traffic(s.now, &kb());
    s.b.note_traffic(s.now, &ka());
    for _ in 0..20 {
        s.step(Duration::from_secs(5));
    }
    assert!(s.dials.iter().all(|d| d.is_empty()), "{:?}", s.dials);
    assert_eq!(s.a.path(&kb()), Path::Relay);
}

#[test]
fn closed_stream_falls_back_to_the_relay_at_once() {
    let mut s = Sim::new(true, true);
    s.go_direct();
    s.now += Duration::from_millis(500);
    s.stream = false;
    s.a.tcp_closed(s.now, b_tcp());
    s.settle();
    assert_eq!(s.a.path(&kb()), Path::Relay);
    assert_eq!(
        s.changes[0].last(),
        Some(&(Path::Relay, ChangeReason::StreamClosed))
    );
    assert!(matches!(
        s.a.relay_reason(&kb()),
        Some(RelayReason::TcpLost { addr, .. }) if addr == b_tcp()
    ));
    assert_eq!(s.a.tcp_owner(b_tcp()), None, "a closed stream owns nothing");
    assert_eq!(s.a.handle_tcp(s.now, b_tcp(), &WG), Datagram::Dropped);
}

#[test]
fn silent_stream_expires_and_is_closed() {
    let mut s = Sim::new(true, true);
    s.go_direct();
    // The stream blackholes (a NAT dropped its mapping): nothing arrives.
    s.stream = false;
    let lost = s.now;
    while s.a.path(&kb()) != Path::Relay && s.now < lost + Duration::from_secs(30) {
        s.a.note_traffic(s.now, &kb());
        s.step(Duration::from_secs(1));
    }
    assert_eq!(s.a.path(&kb()), Path::Relay);
    assert!(s.now - lost <= Config::default().trust + Duration::from_secs(1));
    assert!(s.changes[0].contains(&(Path::Relay, ChangeReason::TimedOut)));
    assert_eq!(s.closes[0], vec![b_tcp()], "the dead stream is closed");
}

#[test]
fn stranger_on_the_stream_proves_nothing() {
    let mut s = Sim::new(true, true);
    let stranger: SocketAddr = "192.0.2.66:5555".parse().unwrap();
    // WireGuard before any disco: dropped and counted.
    assert_eq!(s.a.handle_tcp(s.now, stranger, &WG), Datagram::Dropped);
    assert_eq!(s.a.drops().tcp_unproven, 1);
    // A disco box from a key not in the map: dropped before any crypto.
    let mut c = Node::new(
        Config::default(),
        NodeKey([3; 32]),
        DiscoSecret::from_bytes([33; 32]),
        3,
    );
    let da = s.a.disco_key();
    c.upsert_peer(
        s.now,
        PeerInfo {
            node_key: ka(),
            disco_key: da,
            candidates: vec![],
            nat: NatSummary::default(),
        },
    );
    c.set_tcp_local(s.now, vec![tcp_cand(stranger)], true);
    c.note_traffic(s.now, &ka());
    c.handle_timeout(s.now);
    c.tcp_connected(s.now, ka(), a_tcp());
    let mut sent = 0;
    while let Some(t) = c.poll_transmit() {
        sent += 1;
        assert_eq!(s.a.handle_tcp(s.now, stranger, &t.bytes), Datagram::Dropped);
    }
    assert!(sent > 0);
    assert!(s.a.drops().unknown_sender >= 1);
    assert_eq!(s.a.tcp_owner(stranger), None);
    assert_eq!(s.a.path(&kb()), Path::Relay);
}

#[test]
fn failed_attempt_backs_off_before_dialling_again() {
    let mut s = Sim::new(true, true);
    s.a.note_traffic(s.now, &kb());
    s.a.handle_timeout(s.now);
    s.settle();
    assert_eq!(s.dials[0].len(), 1);
    // No stream ever comes up. Within the window + 29 s: no second dial.
    let t0 = s.now;
    while s.now < t0 + Config::default().tcp_window + Duration::from_secs(29) {
        s.a.note_traffic(s.now, &kb());
        s.b.note_traffic(s.now, &ka());
        s.step(Duration::from_secs(1));
    }
    assert_eq!(s.dials[0].len(), 1, "backing off");
    while s.now < t0 + Duration::from_secs(120) {
        s.a.note_traffic(s.now, &kb());
        s.b.note_traffic(s.now, &ka());
        s.step(Duration::from_secs(1));
    }
    assert!(s.dials[0].len() >= 2, "tried again after the backoff");
    assert!(s.dials[0].len() <= 4, "bounded: {}", s.dials[0].len());
    assert_eq!(s.a.path(&kb()), Path::Relay);
}

#[test]
fn netcheck_finding_udp_blocked_late_still_starts_tcp_at_once() {
    let mut s = Sim::new(false, false);
    s.a.note_traffic(s.now, &kb());
    s.b.note_traffic(s.now, &ka());
    s.a.handle_timeout(s.now);
    s.settle();
    assert!(s.dials.iter().all(|d| d.is_empty()));
    // A's netcheck ends 3 s later: its UDP is blocked.
    s.now += Duration::from_secs(3);
    s.a.set_tcp_local(s.now, vec![tcp_cand(a_tcp())], true);
    s.settle();
    assert_eq!(
        s.dials[0],
        vec![vec![b_tcp()]],
        "A dials within the same instant"
    );
    assert_eq!(s.dials[1], vec![vec![a_tcp()]]);
}

#[test]
fn a_withdrawn_suspicion_before_traffic_dials_nothing() {
    // A's netcheck suspects UDP blocked, then a late UDP answer withdraws
    // it, all before any traffic: the pair behaves as two UDP hosts.
    let mut s = Sim::new(false, false);
    s.a.set_tcp_local(s.now, vec![tcp_cand(a_tcp())], true);
    s.settle();
    s.now += Duration::from_millis(300);
    s.a.set_tcp_local(s.now, vec![tcp_cand(a_tcp())], false);
    s.settle();
    s.a.note_traffic(s.now, &kb());
    s.b.note_traffic(s.now, &ka());
    for _ in 0..20 {
        s.step(Duration::from_secs(5));
    }
    assert!(s.dials.iter().all(|d| d.is_empty()), "{:?}", s.dials);
}

#[test]
fn a_suspicion_before_traffic_dials_when_traffic_starts() {
    // The provisional verdict comes before the peer has sent anything (no
    // CallMeMaybe then); the first traffic's discovery carries the TCP
    // candidates and both sides dial in the same instant.
    let mut s = Sim::new(false, false);
    s.a.set_tcp_local(s.now, vec![tcp_cand(a_tcp())], true);
    s.settle();
    assert!(s.dials.iter().all(|d| d.is_empty()));
    s.now += Duration::from_millis(700);
    s.a.note_traffic(s.now, &kb());
    s.a.handle_timeout(s.now);
    s.settle();
    assert_eq!(s.dials[0], vec![vec![b_tcp()]]);
    assert_eq!(s.dials[1], vec![vec![a_tcp()]]);
}

#[test]
fn a_udp_path_takes_over_from_tcp() {
    let mut s = Sim::new(true, true);
    s.go_direct();
    // UDP starts working (the firewall opened): A's reprobe finds B's
    // candidate; deliver the ping and the pong by hand.
    let b_udp: SocketAddr = "10.0.2.2:41641".parse().unwrap();
    let a_udp: SocketAddr = "10.0.1.2:41641".parse().unwrap();
    let end = s.now + Duration::from_secs(70);
    let mut udp_seen = false;
    while s.now < end && !matches!(s.a.path(&kb()), Path::Direct(_)) {
        s.a.note_traffic(s.now, &kb());
        s.b.note_traffic(s.now, &ka());
        s.now += Duration::from_millis(500);
        s.a.handle_timeout(s.now);
        s.b.handle_timeout(s.now);
        for _ in 0..4 {
            for (from, to, src) in [(0, 1, a_udp), (1, 0, b_udp)] {
                let (x, y) = if from == 0 {
                    (&mut s.a, &mut s.b)
                } else {
                    (&mut s.b, &mut s.a)
                };
                let tcp_src = if from == 0 { a_tcp() } else { b_tcp() };
                let key = if from == 0 { ka() } else { kb() };
                let _ = to;
                while let Some(t) = x.poll_transmit() {
                    match t.dest {
                        Dest::Udp { .. } => {
                            udp_seen = true;
                            y.handle_udp(s.now, super::SocketId::PRIMARY, src, &t.bytes);
                        }
                        Dest::Relay(_) => {
                            y.handle_relay(s.now, key, &t.bytes);
                        }
                        Dest::Tcp(_) => {
                            y.handle_tcp(s.now, tcp_src, &t.bytes);
                        }
                    }
                }
                while x.poll_event().is_some() {}
            }
        }
    }
    assert!(udp_seen);
    assert!(
        matches!(s.a.path(&kb()), Path::Direct(d) if d.addr == b_udp),
        "{}",
        s.a.path(&kb())
    );
}

#[test]
fn a_dial_leaves_out_this_hosts_own_addresses() {
    // A's own host address is the IP B's TCP candidate names (a stale
    // map, or the same host): a dial there would connect A to itself.
    let mut s = Sim::new(true, true);
    let own = Candidate::udp("198.51.100.2:41641".parse().unwrap(), CandidateKind::Host);
    s.a.set_local(s.now, vec![own], NatSummary::default());
    s.a.note_traffic(s.now, &kb());
    s.b.note_traffic(s.now, &ka());
    s.a.handle_timeout(s.now);
    s.b.handle_timeout(s.now);
    s.settle();
    assert!(s.dials[0].is_empty(), "A dials nothing: {:?}", s.dials[0]);
    assert_eq!(s.dials[1], vec![vec![a_tcp()]], "B still dials A");
}

#[test]
fn a_stream_no_peer_proves_is_closed_after_ten_seconds_and_a_proven_one_stays() {
    let mut s = Sim::new(true, true);
    s.go_direct();
    let stranger: SocketAddr = "192.0.2.99:5555".parse().unwrap();
    s.a.tcp_accepted(s.now, stranger);
    let end = s.now + Duration::from_secs(9);
    while s.now < end {
        s.a.note_traffic(s.now, &kb());
        s.b.note_traffic(s.now, &ka());
        s.step(Duration::from_secs(1));
    }
    assert!(s.closes[0].is_empty(), "not yet: {:?}", s.closes[0]);
    let end = s.now + Duration::from_secs(3);
    while s.now < end {
        s.a.note_traffic(s.now, &kb());
        s.b.note_traffic(s.now, &ka());
        s.step(Duration::from_secs(1));
    }
    assert_eq!(s.closes[0], vec![stranger], "the stranger's stream, only");
    assert_eq!(
        s.a.path(&kb()),
        Path::Tcp(b_tcp()),
        "the proven one carries on"
    );
    assert!(s.closes[1].is_empty());
}
