//! Node-level tests: demultiplexing, sealing between two real nodes, and
//! the checks that run before any crypto.

use super::*;
use crate::proto::disco::CandidateKind;

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
    a.set_local(vec![], nat);
    a.note_traffic(now, &NodeKey([2; 32]));
    a.handle_timeout(now);
    let mut endpoints = None;
    while let Some(t) = a.poll_transmit() {
        if let Dest::Relay(_) = t.dest {
            b.handle_relay(now, NodeKey([1; 32]), &t.bytes);
            let (_, m) =
                disco::open(&b.peers[&NodeKey([1; 32])].sbox, &a.disco_key(), &t.bytes).unwrap();
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
