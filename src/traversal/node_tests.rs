//! Node-level tests: demultiplexing, sealing between two real nodes, and
//! the checks that run before any crypto.

use super::*;
use crate::proto::disco::{CandidateKind, Message};
use crate::traversal::{Allocation, Mapping};

fn nodes(now: Instant) -> (Node, Node, SocketAddr, SocketAddr) {
    let a_addr: SocketAddr = "192.0.2.1:41641".parse().unwrap();
    let b_addr: SocketAddr = "192.0.2.2:41641".parse().unwrap();
    let mut a = Node::new(
        Config::default(),
        NodeKey([1; 32]),
        DiscoSecret::from_bytes([11; 32]),
        1,
    );
    let mut b = Node::new(
        Config::default(),
        NodeKey([2; 32]),
        DiscoSecret::from_bytes([22; 32]),
        2,
    );
    let info = |n: &Node, key: u8, addr: SocketAddr| PeerInfo {
        node_key: NodeKey([key; 32]),
        disco_key: n.disco_key(),
        candidates: vec![Candidate::udp(addr, CandidateKind::Host)],
        nat: NatSummary::default(),
    };
    let (ia, ib) = (info(&a, 1, a_addr), info(&b, 2, b_addr));
    a.upsert_peer(now, ib);
    b.upsert_peer(now, ia);
    (a, b, a_addr, b_addr)
}

#[test]
fn demux_by_first_bytes() {
    let now = Instant::now();
    let (mut a, _, _, b_addr) = nodes(now);
    let mut stun_response = vec![0x01, 0x01, 0, 0, 0x21, 0x12, 0xa4, 0x42];
    stun_response.resize(20, 0);
    let mut stun_request = stun_response.clone();
    stun_request[..2].copy_from_slice(&[0, 1]);
    let wg = [4u8, 0, 0, 0, 9, 9, 9, 9];
    let s = SocketId::PRIMARY;
    assert_eq!(a.handle_udp(now, s, b_addr, &stun_response), Datagram::Stun);
    assert_eq!(a.handle_udp(now, s, b_addr, &stun_request), Datagram::Stun);
    assert_eq!(a.handle_udp(now, s, b_addr, &wg), Datagram::WireGuard);
    assert_eq!(a.handle_udp(now, s, b_addr, &[1, 2, 3]), Datagram::Dropped);
    assert_eq!(a.handle_udp(now, s, b_addr, &[]), Datagram::Dropped);
    assert_eq!(a.drops().unknown_datagram, 2);
    assert_eq!(
        a.handle_relay(now, NodeKey([2; 32]), &wg),
        Datagram::WireGuard
    );
}

#[test]
fn two_nodes_go_direct_over_sealed_disco() {
    let now = Instant::now();
    let (mut a, mut b, a_addr, b_addr) = nodes(now);
    let (ka, kb) = (NodeKey([1; 32]), NodeKey([2; 32]));
    a.note_traffic(now, &kb);
    a.handle_timeout(now);
    // Shuttle packets by hand: UDP both ways, relay both ways.
    for _ in 0..4 {
        while let Some(t) = a.poll_transmit() {
            match t.dest {
                Dest::Udp { addr, .. } => {
                    assert_eq!(addr, b_addr);
                    assert_eq!(
                        b.handle_udp(now, SocketId::PRIMARY, a_addr, &t.bytes),
                        Datagram::Disco
                    );
                }
                Dest::Relay(to) => {
                    assert_eq!(to, kb);
                    assert_eq!(b.handle_relay(now, ka, &t.bytes), Datagram::Disco);
                }
                Dest::Tcp(_) => panic!("no TCP without a listener"),
            }
        }
        while let Some(t) = b.poll_transmit() {
            match t.dest {
                Dest::Udp { .. } => {
                    a.handle_udp(now, SocketId::PRIMARY, b_addr, &t.bytes);
                }
                Dest::Relay(_) => {
                    a.handle_relay(now, kb, &t.bytes);
                }
                Dest::Tcp(_) => panic!("no TCP without a listener"),
            }
        }
    }
    assert_eq!(a.path(&kb), Path::Direct(DirectPath::primary(b_addr)));
    assert_eq!(b.path(&ka), Path::Direct(DirectPath::primary(a_addr)));
    assert!(matches!(
        a.poll_event(),
        Some(NodeEvent::PathChanged {
            to: Path::Direct(_),
            ..
        })
    ));
    assert_eq!(a.drops(), DropStats::default());
    assert_eq!(b.drops(), DropStats::default());
    assert!(a.status(&kb, now).unwrap().relay_reason.is_none());
}

#[test]
fn relay_frame_must_come_from_the_disco_keys_node() {
    let now = Instant::now();
    let (mut a, mut b, _, _) = nodes(now);
    let ka = NodeKey([1; 32]);
    a.note_traffic(now, &NodeKey([2; 32]));
    a.handle_timeout(now);
    let cmm = std::iter::from_fn(|| a.poll_transmit())
        .find(|t| matches!(t.dest, Dest::Relay(_)))
        .unwrap();
    // The relay says it came from some third node: refused.
    assert_eq!(
        b.handle_relay(now, NodeKey([9; 32]), &cmm.bytes),
        Datagram::Dropped
    );
    assert_eq!(b.drops().relay_mismatch, 1);
    // The genuine one is accepted once, then it is a replay.
    assert_eq!(b.handle_relay(now, ka, &cmm.bytes), Datagram::Disco);
    assert_eq!(b.handle_relay(now, ka, &cmm.bytes), Datagram::Dropped);
    assert_eq!(b.drops().replayed, 1);
}

#[test]
fn unknown_sender_is_dropped_before_crypto() {
    let now = Instant::now();
    let (_, mut b, a_addr, _) = nodes(now);
    let stranger = DiscoSecret::from_bytes([99; 32]);
    let msg = Message::CallMeMaybe { endpoints: vec![] };
    let pkt = disco::seal(
        &stranger.box_for(&b.disco_key()),
        &stranger.public(),
        1,
        [0; 16],
        &msg,
    );
    assert_eq!(
        b.handle_udp(now, SocketId::PRIMARY, a_addr, &pkt),
        Datagram::Dropped
    );
    assert_eq!(b.drops().unknown_sender, 1);
}

#[test]
fn sequential_nat_predicts_in_call_me_maybe() {
    let now = Instant::now();
    let (mut a, mut b, _, _) = nodes(now);
    let observed: SocketAddr = "203.0.113.1:30000".parse().unwrap();
    let nat = NatSummary {
        mapping: Mapping::EndpointDependent,
        allocation: Allocation::Sequential { step: 2 },
        observed: Some(observed),
    };
    a.set_local(now, vec![], nat);
    a.note_traffic(now, &NodeKey([2; 32]));
    a.handle_timeout(now);
    let mut endpoints = None;
    while let Some(t) = a.poll_transmit() {
        if let Dest::Relay(_) = t.dest {
            b.handle_relay(now, NodeKey([1; 32]), &t.bytes);
            let entry = b.peers.get_mut(&NodeKey([1; 32])).unwrap();
            let (_, m) = disco::open(entry.sbox(&b.secret), &a.disco_key(), &t.bytes).unwrap();
            endpoints = Some(m);
        }
    }
    let Some(Message::CallMeMaybe { endpoints }) = endpoints else {
        panic!("no cmm")
    };
    let ports: Vec<u16> = endpoints.iter().map(|c| c.addr.port()).collect();
    // One destination (b's host address) used port 30002; the next eight
    // new destinations will get 30004.., listed first; then the used one.
    let mut want: Vec<u16> = (2..=9).map(|i| 30000 + 2 * i).collect();
    want.push(30002);
    assert_eq!(ports, want);
}

/// Delivers every datagram `from` wants to send to `to` at `now`; returns
/// how many went by relay and by UDP.
fn shuttle(
    from: &mut Node,
    from_key: NodeKey,
    from_addr: SocketAddr,
    to: &mut Node,
    now: Instant,
) -> (usize, usize) {
    let (mut relayed, mut udp) = (0, 0);
    while let Some(t) = from.poll_transmit() {
        match t.dest {
            Dest::Udp { .. } => {
                udp += 1;
                to.handle_udp(now, SocketId::PRIMARY, from_addr, &t.bytes);
            }
            Dest::Relay(_) => {
                relayed += 1;
                to.handle_relay(now, from_key, &t.bytes);
            }
            Dest::Tcp(_) => panic!("no TCP path in these tests"),
        }
    }
    (relayed, udp)
}

fn ping_replies(n: &mut Node) -> Vec<(u64, Path, Duration)> {
    std::iter::from_fn(|| n.poll_event())
        .filter_map(|e| match e {
            NodeEvent::PingReply {
                round, path, rtt, ..
            } => Some((round, path, rtt)),
            _ => None,
        })
        .collect()
}

#[test]
fn ping_round_reports_the_relay_pong_then_the_direct_one() {
    let t0 = Instant::now();
    let ms = Duration::from_millis;
    let (mut a, mut b, a_addr, b_addr) = nodes(t0);
    let (ka, kb) = (NodeKey([1; 32]), NodeKey([2; 32]));
    assert_eq!(a.ping(t0, &NodeKey([7; 32])), None, "not a peer");
    assert_eq!(a.ping(t0, &kb), Some(1));
    // Relay ping + CallMeMaybe, and a ping to b's one candidate.
    let (relayed, udp) = shuttle(&mut a, ka, a_addr, &mut b, t0 + ms(20));
    assert_eq!((relayed, udp), (2, 1));
    // b answers both pings (and probes back, being asked to).
    shuttle(&mut b, kb, b_addr, &mut a, t0 + ms(40));
    let replies = ping_replies(&mut a);
    assert_eq!(
        replies,
        vec![
            (1, Path::Relay, ms(40)),
            (1, Path::Direct(DirectPath::primary(b_addr)), ms(40)),
        ]
    );
    // The direct pong was a real one: the path moved.
    assert_eq!(a.path(&kb), Path::Direct(DirectPath::primary(b_addr)));
    assert_eq!(a.drops(), DropStats::default());
    assert_eq!(b.drops(), DropStats::default());

    // Let b's probes back settle.
    for _ in 0..3 {
        shuttle(&mut a, ka, a_addr, &mut b, t0 + ms(50));
        shuttle(&mut b, kb, b_addr, &mut a, t0 + ms(50));
    }
    assert!(ping_replies(&mut a).is_empty());
    // On a direct path a round pings that path and the relay, no CallMeMaybe.
    let t1 = t0 + ms(2000);
    assert_eq!(a.ping(t1, &kb), Some(2));
    let (relayed, udp) = shuttle(&mut a, ka, a_addr, &mut b, t1 + ms(1));
    assert_eq!((relayed, udp), (1, 1));
    shuttle(&mut b, kb, b_addr, &mut a, t1 + ms(3));
    let mut replies = ping_replies(&mut a);
    replies.sort_by_key(|r| r.2);
    assert_eq!(
        replies,
        vec![
            (2, Path::Relay, ms(3)),
            (2, Path::Direct(DirectPath::primary(b_addr)), ms(3)),
        ]
    );
}

#[test]
fn a_late_or_replayed_pong_makes_no_second_reply() {
    let t0 = Instant::now();
    let (mut a, mut b, a_addr, b_addr) = nodes(t0);
    let (ka, kb) = (NodeKey([1; 32]), NodeKey([2; 32]));
    a.ping(t0, &kb);
    shuttle(&mut a, ka, a_addr, &mut b, t0);
    // Keep b's relay pong aside and deliver it twice.
    let pong = std::iter::from_fn(|| b.poll_transmit())
        .find(|t| matches!(t.dest, Dest::Relay(_)))
        .unwrap();
    a.handle_relay(t0, kb, &pong.bytes);
    assert_eq!(a.handle_relay(t0, kb, &pong.bytes), Datagram::Dropped);
    assert_eq!(a.drops().replayed, 1);
    assert_eq!(ping_replies(&mut a).len(), 1);
    // A pong whose round has expired is refused and reports nothing.
    a.ping(t0, &kb);
    shuttle(&mut a, ka, a_addr, &mut b, t0);
    let late = t0 + Config::default().ping_timeout + Duration::from_secs(1);
    a.ping(late, &kb); // forgets the expired round's pings
    let _ = std::iter::from_fn(|| a.poll_transmit()).count();
    let before = a.drops().rejected;
    shuttle(&mut b, kb, b_addr, &mut a, late);
    assert!(ping_replies(&mut a).iter().all(|(round, _, _)| *round != 2));
    assert!(a.drops().rejected > before);
}

#[test]
fn status_names_the_hard_nat_pair_and_the_paths_tried_with_times() {
    let t0 = Instant::now();
    let (mut a, _, _, b_addr) = nodes(t0);
    let kb = NodeKey([2; 32]);
    let random = NatSummary {
        mapping: Mapping::EndpointDependent,
        allocation: Allocation::Random,
        observed: None,
    };
    a.set_local(t0, vec![], random);
    a.upsert_peer(
        t0,
        PeerInfo {
            node_key: kb,
            disco_key: a.peers[&kb].disco,
            candidates: vec![Candidate::udp(b_addr, CandidateKind::ServerReflexive)],
            nat: random,
        },
    );
    a.note_traffic(t0, &kb);
    a.handle_timeout(t0);
    // Every round goes unanswered.
    let mut now = t0;
    while let Some((t, _)) = a
        .poll_timeout()
        .filter(|(t, _)| *t < t0 + Duration::from_secs(20))
    {
        now = t;
        a.handle_timeout(now);
        let _ = std::iter::from_fn(|| a.poll_transmit()).count();
    }
    let when = |t: Instant| format!("at +{}s", t.duration_since(t0).as_secs());
    let st = a.status_with(&kb, &when).unwrap();
    let reason = st.relay_reason.unwrap();
    assert!(reason.starts_with("both sides EDM"), "{reason}");
    assert_eq!(st.tried.len(), 1);
    assert_eq!(st.tried[0].path, DirectPath::primary(b_addr));
    assert_eq!(st.tried[0].last_pong, None);
    assert!(st.tried[0].last_ping.is_some_and(|t| t <= now));
    // An unanswered attempt against an easy peer says when it gave up.
    let (mut c, _, _, _) = nodes(t0);
    c.note_traffic(t0, &kb);
    while let Some((t, _)) = c
        .poll_timeout()
        .filter(|(t, _)| *t < t0 + Duration::from_secs(20))
    {
        c.handle_timeout(t);
        let _ = std::iter::from_fn(|| c.poll_transmit()).count();
    }
    let reason = c.status_with(&kb, &when).unwrap().relay_reason.unwrap();
    assert_eq!(reason, "no pong from 1 candidates; gave up at +15s");
    assert_eq!(
        super::hardnat::describe_pair(&NatSummary::default(), &random).as_deref(),
        Some("peer EDM random")
    );
}

#[test]
fn a_peer_claiming_anothers_disco_key_neither_takes_nor_removes_it() {
    let now = Instant::now();
    let (mut a, mut b, _, b_addr) = nodes(now);
    let (kb, thief) = (NodeKey([2; 32]), NodeKey([3; 32]));
    // A third node in a's map with b's disco key.
    a.upsert_peer(
        now,
        PeerInfo {
            node_key: thief,
            disco_key: b.disco_key(),
            candidates: vec![],
            nat: NatSummary::default(),
        },
    );
    // b's disco is still credited to b (the box opens, the ping is b's).
    b.note_traffic(now, &NodeKey([1; 32]));
    b.handle_timeout(now);
    let ping = std::iter::from_fn(|| b.poll_transmit())
        .find(|t| matches!(t.dest, Dest::Udp { .. }))
        .expect("b pings a");
    let before = a.drops();
    assert_eq!(
        a.handle_udp(now, SocketId::PRIMARY, b_addr, &ping.bytes),
        Datagram::Disco
    );
    assert_eq!(a.drops(), before, "b's ping was accepted as b's");
    // Removing the thief must not remove b's mapping.
    a.remove_peer(now, &thief);
    assert_eq!(a.by_disco.get(&b.disco_key()), Some(&kb));
}
