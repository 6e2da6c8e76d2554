//! Unit tests of the hard-NAT methods' limits (`peer_punch`): where the
//! birthday probes may go and when. A peer that joined with a valid token
//! is not trusted to aim them (README, "Security model").

use super::*;
use crate::traversal::{Allocation, Mapping};

fn key(b: u8) -> NodeKey {
    NodeKey([b; 32])
}

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn nat(mapping: Mapping, allocation: Allocation, observed: Option<&str>) -> NatSummary {
    NatSummary {
        mapping,
        allocation,
        observed: observed.map(addr),
    }
}

fn hard() -> NatSummary {
    nat(
        Mapping::EndpointDependent,
        Allocation::Random,
        Some("198.51.100.1:5000"),
    )
}

fn drain(m: &mut PeerPaths) -> Vec<Transmit> {
    std::iter::from_fn(|| m.poll_transmit()).collect()
}

fn wants_sockets(m: &mut PeerPaths) -> bool {
    std::iter::from_fn(|| m.poll_event()).any(|e| matches!(e, Event::WantSockets(_)))
}

/// Pings sent to `ip` on a port other than `known`: birthday probes.
fn probes_to(txs: &[Transmit], ip: IpAddr, known: u16) -> usize {
    txs.iter()
        .filter(|t| match (&t.path, &t.payload) {
            (Path::Direct(p), Payload::Disco(Message::Ping { .. })) => {
                p.addr.ip() == ip && p.addr.port() != known
            }
            _ => false,
        })
        .count()
}

/// Runs the machine's timers from `from` for `span`, noting our traffic on
/// each step when `sending`; returns everything sent.
fn run(m: &mut PeerPaths, from: Instant, span: Duration, sending: bool) -> Vec<Transmit> {
    let mut out = Vec::new();
    let mut now = from;
    while now < from + span {
        if sending {
            m.note_traffic(now);
        }
        m.handle_timeout(now);
        out.extend(drain(m));
        now += Duration::from_millis(50);
    }
    out
}

/// We are the hard side; the peer is easy but its map entry has no
/// vouched mapping, only a server-reflexive candidate it claims. The spray
/// must not go there until the peer has been seen at that address.
#[test]
fn the_hard_side_sprays_only_an_address_vouched_for_or_seen() {
    let t0 = Instant::now();
    let claimed = addr("203.0.113.77:41641");
    let mut m = PeerPaths::new(Config::default(), key(1), key(2), 5);
    m.handle_candidates(
        t0,
        vec![Candidate::udp(claimed, CandidateKind::ServerReflexive)],
    );
    let easy = nat(Mapping::EndpointIndependent, Allocation::Preserving, None);
    m.set_nat(t0, hard(), easy);
    let _ = run(&mut m, t0, Duration::from_secs(2), true);
    assert!(!wants_sockets(&mut m), "no spray at a claimed address");
    assert_eq!(m.remote_public(), None);

    // An authenticated ping of the peer from that address vouches for it.
    let ping = Message::Ping {
        tx_id: [7; 12],
        node_key: key(2),
    };
    let from = Path::Direct(DirectPath::primary(addr("203.0.113.77:6000")));
    let t1 = t0 + Duration::from_secs(2);
    m.handle_disco(t1, from, ping).unwrap();
    assert_eq!(m.remote_public(), Some(claimed));
    let _ = run(&mut m, t1, Duration::from_secs(300), true);
    assert!(wants_sockets(&mut m), "a seen address may be sprayed");
}

/// We are the easy side of a birthday attempt against a hard-NAT peer.
/// Its CallMeMaybe, or its traffic to us, must not start thousands of
/// probes: only traffic we send does.
#[test]
fn the_easy_side_probes_only_while_we_send() {
    let t0 = Instant::now();
    let public = addr("192.0.2.2:41641");
    let mut m = PeerPaths::new(Config::default(), key(1), key(2), 5);
    m.handle_candidates(
        t0,
        vec![Candidate::udp(public, CandidateKind::ServerReflexive)],
    );
    let easy = nat(
        Mapping::EndpointIndependent,
        Allocation::Preserving,
        Some("198.51.100.9:41641"),
    );
    let peer_hard = nat(
        Mapping::EndpointDependent,
        Allocation::Random,
        Some("192.0.2.2:41641"),
    );
    m.set_nat(t0, easy, peer_hard);
    let cmm = || Message::CallMeMaybe {
        endpoints: vec![Candidate::udp(public, CandidateKind::ServerReflexive)],
    };
    // Asked by the peer, with no traffic at all, then with the peer's
    // traffic only.
    m.handle_disco(t0, Path::Relay, cmm()).unwrap();
    let txs = run(&mut m, t0, Duration::from_secs(3), false);
    assert_eq!(probes_to(&txs, public.ip(), public.port()), 0);
    let t1 = t0 + Duration::from_secs(3);
    m.note_received(t1);
    m.handle_disco(t1, Path::Relay, cmm()).unwrap();
    let txs = run(&mut m, t1, Duration::from_secs(3), false);
    assert_eq!(
        probes_to(&txs, public.ip(), public.port()),
        0,
        "the peer's traffic is not ours"
    );

    // Our traffic: the probes run (after any backoff the attempts above
    // left, which there is none of: they never started).
    let t2 = t1 + Duration::from_secs(3);
    m.note_traffic(t2);
    m.handle_disco(t2, Path::Relay, cmm()).unwrap();
    let txs = run(&mut m, t2, Duration::from_secs(2), true);
    assert!(probes_to(&txs, public.ip(), public.port()) > 50);
}

/// The peer's CallMeMaybe (and our first discovery round) usually come
/// before our first packet is sealed, the WireGuard handshake being still
/// under way. The birthday method must start when our traffic does, on
/// either side, not at the next round 30 s later (the NAT matrix's
/// EIM-to-random-EDM pairs went relayed without this).
#[test]
fn the_birthday_method_starts_when_our_traffic_begins() {
    let t0 = Instant::now();
    let peer_public = addr("192.0.2.2:41641");
    let easy = nat(
        Mapping::EndpointIndependent,
        Allocation::Preserving,
        Some("192.0.2.2:41641"),
    );
    let cmm = || Message::CallMeMaybe {
        endpoints: vec![Candidate::udp(peer_public, CandidateKind::ServerReflexive)],
    };

    // Hard side: its discovery round found it not sending.
    let mut hard_side = PeerPaths::new(Config::default(), key(1), key(2), 5);
    hard_side.set_nat(t0, hard(), easy);
    hard_side.note_received(t0);
    hard_side.handle_disco(t0, Path::Relay, cmm()).unwrap();
    let _ = run(&mut hard_side, t0, Duration::from_millis(500), false);
    assert!(!wants_sockets(&mut hard_side));
    let t1 = t0 + Duration::from_millis(500);
    hard_side.note_traffic(t1);
    assert!(
        wants_sockets(&mut hard_side),
        "the spray starts with our traffic"
    );

    // Easy side: the peer's CallMeMaybe came before our traffic.
    let mut easy_side = PeerPaths::new(Config::default(), key(1), key(2), 5);
    let peer_hard = nat(
        Mapping::EndpointDependent,
        Allocation::Random,
        Some("192.0.2.2:41641"),
    );
    easy_side.set_nat(t0, easy, peer_hard);
    easy_side.note_received(t0);
    easy_side.handle_disco(t0, Path::Relay, cmm()).unwrap();
    let txs = run(&mut easy_side, t0, Duration::from_millis(500), false);
    assert_eq!(probes_to(&txs, peer_public.ip(), peer_public.port()), 0);
    let txs = run(&mut easy_side, t1, Duration::from_secs(1), true);
    assert!(
        probes_to(&txs, peer_public.ip(), peer_public.port()) > 50,
        "the probes start with our traffic"
    );
}
