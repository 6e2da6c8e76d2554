//! Unit tests of one peer machine, fed by hand (the simulator covers pairs).

use super::*;

fn key(b: u8) -> NodeKey {
    NodeKey([b; 32])
}

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn machine(now: Instant) -> PeerPaths {
    let mut m = PeerPaths::new(Config::default(), key(1), key(2), 9);
    m.handle_candidates(
        now,
        vec![Candidate::udp(
            addr("192.0.2.2:41641"),
            CandidateKind::ServerReflexive,
        )],
    );
    m
}

/// A machine with traffic flowing and its first round sent; returns the tx
/// id of the ping to the candidate.
fn started(t0: Instant) -> (PeerPaths, [u8; 12]) {
    let mut m = machine(t0);
    m.note_traffic(t0);
    m.handle_timeout(t0);
    let tx_id = ping_to(&drain(&mut m), addr("192.0.2.2:41641"));
    (m, tx_id)
}

fn drain(m: &mut PeerPaths) -> Vec<Transmit> {
    std::iter::from_fn(|| m.poll_transmit()).collect()
}

/// The tx id of the first ping to `to` among `txs`.
fn ping_to(txs: &[Transmit], to: SocketAddr) -> [u8; 12] {
    txs.iter()
        .find_map(|t| match (&t.path, &t.payload) {
            (Path::Direct(p), Payload::Disco(Message::Ping { tx_id, .. })) if p.addr == to => {
                Some(*tx_id)
            }
            _ => None,
        })
        .expect("a ping to the candidate")
}

#[test]
fn idle_peer_does_not_probe_until_traffic() {
    let t0 = Instant::now();
    let mut m = machine(t0);
    assert_eq!(m.poll_timeout(), None);
    assert!(drain(&mut m).is_empty());
    m.note_traffic(t0);
    m.handle_timeout(t0);
    let txs = drain(&mut m);
    assert!(txs
        .iter()
        .any(|t| t.payload == Payload::CallMeMaybe && t.path == Path::Relay));
    ping_to(&txs, addr("192.0.2.2:41641"));
    assert_eq!(m.current_path(), Path::Relay);
}

#[test]
fn first_matching_pong_promotes_and_bad_pongs_do_not() {
    let t0 = Instant::now();
    let cand = addr("192.0.2.2:41641");
    let (mut m, tx_id) = started(t0);
    let t1 = t0 + Duration::from_millis(40);
    let pong = |tx_id| Message::Pong {
        tx_id,
        observed_src: addr("198.51.100.1:1"),
    };
    // Wrong tx id, right path.
    let wrong = Path::Direct(DirectPath::primary(cand));
    assert_eq!(
        m.handle_disco(t1, wrong, pong([0; 12])),
        Err(Rejected::UnexpectedPong)
    );
    // Right tx id from another address.
    let other = Path::Direct(DirectPath::primary(addr("203.0.113.5:9")));
    assert_eq!(
        m.handle_disco(t1, other, pong(tx_id)),
        Err(Rejected::UnexpectedPong)
    );
    // Over the relay.
    assert_eq!(
        m.handle_disco(t1, Path::Relay, pong(tx_id)),
        Err(Rejected::WrongPath)
    );
    assert_eq!(m.current_path(), Path::Relay);
    assert_eq!(m.poll_event(), None);

    m.handle_disco(t1, wrong, pong(tx_id)).unwrap();
    assert_eq!(m.current_path(), Path::Direct(DirectPath::primary(cand)));
    assert_eq!(m.rtt(), Some(Duration::from_millis(40)));
    assert!(matches!(
        m.poll_event(),
        Some(Event::PathChanged {
            from: Path::Relay,
            reason: ChangeReason::PongReceived,
            ..
        })
    ));
    // The same pong again is a replay of a consumed tx id.
    assert_eq!(
        m.handle_disco(t1, wrong, pong(tx_id)),
        Err(Rejected::UnexpectedPong)
    );
}

#[test]
fn ping_from_stranger_key_is_refused_and_real_ping_is_answered() {
    let t0 = Instant::now();
    let mut m = machine(t0);
    let from = Path::Direct(DirectPath::primary(addr("203.0.113.7:5000")));
    let forged = Message::Ping {
        tx_id: [5; 12],
        node_key: key(3),
    };
    assert_eq!(
        m.handle_disco(t0, from, forged),
        Err(Rejected::NodeKeyMismatch)
    );
    assert!(drain(&mut m).is_empty());
    let real = Message::Ping {
        tx_id: [6; 12],
        node_key: key(2),
    };
    m.handle_disco(t0, from, real).unwrap();
    let txs = drain(&mut m);
    assert_eq!(
        txs[0],
        Transmit {
            path: from,
            payload: Payload::Disco(Message::Pong {
                tx_id: [6; 12],
                observed_src: addr("203.0.113.7:5000"),
            }),
        }
    );
    // And it pings the new source back to prove the path itself.
    ping_to(&txs, addr("203.0.113.7:5000"));
    assert_eq!(m.current_path(), Path::Relay);
}

#[test]
fn a_repeated_ping_on_an_unanswered_path_is_pinged_back_again() {
    // The peer went direct on our pong, but our own ping back (or its pong)
    // was lost. Its next ping, half a second later, must get a new ping of
    // ours, not wait for a gap meant for paths that work.
    let t0 = Instant::now();
    let mut m = machine(t0);
    m.note_traffic(t0);
    let src = addr("203.0.113.7:5000");
    let from = Path::Direct(DirectPath::primary(src));
    let ping = |id: u8| Message::Ping {
        tx_id: [id; 12],
        node_key: key(2),
    };
    m.handle_disco(t0, from, ping(1)).unwrap();
    ping_to(&drain(&mut m), src);
    // A burst: within the short gap, no second ping back.
    let t1 = t0 + Duration::from_millis(50);
    m.handle_disco(t1, from, ping(2)).unwrap();
    let pings_back = |txs: &[Transmit]| {
        txs.iter()
            .filter(|t| matches!(t.payload, Payload::Disco(Message::Ping { .. })) && t.path == from)
            .count()
    };
    assert_eq!(pings_back(&drain(&mut m)), 0);
    // Half a second on, with no pong: ping back again.
    let t2 = t0 + Duration::from_millis(500);
    m.handle_disco(t2, from, ping(3)).unwrap();
    let again = ping_to(&drain(&mut m), src);
    let pong = Message::Pong {
        tx_id: again,
        observed_src: addr("198.51.100.1:41641"),
    };
    m.handle_disco(t2 + Duration::from_millis(1), from, pong)
        .unwrap();
    assert_eq!(m.current_path(), from);
    // Once the path answers, its pings are answered without a ping back
    // for the full gap.
    let t3 = t2 + Duration::from_millis(300);
    m.handle_disco(t3, from, ping(4)).unwrap();
    assert_eq!(pings_back(&drain(&mut m)), 0);
}

#[test]
fn silent_path_falls_back_at_trust_expiry_then_probes_again() {
    let t0 = Instant::now();
    let cand = addr("192.0.2.2:41641");
    let (mut m, tx_id) = started(t0);
    let path = Path::Direct(DirectPath::primary(cand));
    let pong = Message::Pong {
        tx_id,
        observed_src: cand,
    };
    m.handle_disco(t0, path, pong).unwrap();
    let _ = m.poll_event();
    // Keep traffic flowing, never answer heartbeats.
    let mut now = t0;
    let mut last = Vec::new();
    while m.current_path() != Path::Relay {
        let (at, _) = m.poll_timeout().unwrap();
        assert!(at >= now);
        now = at;
        m.note_traffic(now);
        m.handle_timeout(now);
        last = drain(&mut m);
    }
    assert_eq!(
        now,
        t0 + Config::default().trust,
        "falls back exactly at expiry"
    );
    assert!(matches!(
        m.poll_event(),
        Some(Event::PathChanged {
            to: Path::Relay,
            reason: ChangeReason::TimedOut,
            ..
        })
    ));
    assert!(matches!(
        m.relay_reason(),
        Some(RelayReason::DirectTimedOut { .. })
    ));
    // Discovery restarts at once: the candidate is pinged in the same step.
    ping_to(&last, cand);
    assert_eq!(
        m.poll_timeout(),
        Some((now + Duration::from_millis(500), TimerReason::Probe))
    );
}

#[test]
fn failed_attempt_backs_off_and_records_why() {
    let t0 = Instant::now();
    let mut m = machine(t0);
    let mut now = t0;
    for _ in 0..20 {
        m.note_traffic(now);
        m.handle_timeout(now);
        drain(&mut m);
        match m.poll_timeout() {
            Some((t, TimerReason::Probe)) if t - now >= Duration::from_secs(30) => break,
            Some((t, _)) => now = t,
            None => panic!("no timer"),
        }
    }
    assert!(matches!(
        m.relay_reason(),
        Some(RelayReason::NoAnswer { candidates: 1, .. })
    ));
    let text = m.relay_reason().unwrap().describe(now);
    assert!(text.contains("no pong from 1 candidates"), "{text}");
    // Bounded: 5 rounds of one ping each, one CallMeMaybe (rate-limited).
    assert_eq!(m.stats().pings_sent, 5);
}

#[test]
fn relay_ping_is_answered_and_relay_pong_never_moves_the_path() {
    let t0 = Instant::now();
    let mut m = machine(t0);
    // The peer pings us through the relay: a pong goes back the same way.
    let ping = |key: NodeKey| Message::Ping {
        tx_id: [5; 12],
        node_key: key,
    };
    assert_eq!(
        m.handle_disco(t0, Path::Relay, ping(key(3))),
        Err(Rejected::NodeKeyMismatch)
    );
    m.handle_disco(t0, Path::Relay, ping(key(2))).unwrap();
    let txs = drain(&mut m);
    assert!(matches!(
        txs.as_slice(),
        [Transmit {
            path: Path::Relay,
            payload: Payload::Disco(Message::Pong { tx_id, .. })
        }] if *tx_id == [5; 12]
    ));
    // Our own round: the relay pong makes a reply and nothing else.
    assert_eq!(m.ping_round(t0), 1);
    let relay_tx = drain(&mut m)
        .iter()
        .find_map(|t| match (&t.path, &t.payload) {
            (Path::Relay, Payload::Disco(Message::Ping { tx_id, .. })) => Some(*tx_id),
            _ => None,
        })
        .expect("a ping over the relay");
    let pong = |tx_id| Message::Pong {
        tx_id,
        observed_src: addr("0.0.0.0:0"),
    };
    assert_eq!(
        m.handle_disco(t0, Path::Relay, pong([1; 12])),
        Err(Rejected::WrongPath)
    );
    let t1 = t0 + Duration::from_millis(25);
    m.handle_disco(t1, Path::Relay, pong(relay_tx)).unwrap();
    assert_eq!(m.current_path(), Path::Relay);
    let events: Vec<Event> = std::iter::from_fn(|| m.poll_event()).collect();
    assert_eq!(
        events,
        vec![Event::PingReply {
            round: 1,
            path: Path::Relay,
            rtt: Duration::from_millis(25)
        }]
    );
    // The same pong again matches nothing.
    assert_eq!(
        m.handle_disco(t1, Path::Relay, pong(relay_tx)),
        Err(Rejected::WrongPath)
    );
}

#[test]
fn a_birthday_path_that_dies_gets_a_new_attempt_at_once() {
    use crate::traversal::{Allocation, Mapping, SocketId};
    let t0 = Instant::now();
    let mut m = machine(t0);
    let peer_public = addr("192.0.2.2:41641");
    m.set_nat(
        t0,
        NatSummary {
            mapping: Mapping::EndpointDependent,
            allocation: Allocation::Random,
            observed: Some(addr("198.51.100.1:5000")),
        },
        NatSummary {
            mapping: Mapping::EndpointIndependent,
            allocation: Allocation::Preserving,
            observed: Some(peer_public),
        },
    );
    m.note_traffic(t0);
    m.handle_timeout(t0);
    let wants = |m: &mut PeerPaths| {
        std::iter::from_fn(|| m.poll_event()).any(|e| matches!(e, Event::WantSockets(_)))
    };
    assert!(wants(&mut m), "the hard side asks for sockets");
    m.sockets_ready(t0, 4);
    let via2 = drain(&mut m)
        .iter()
        .find_map(|t| match (&t.path, &t.payload) {
            (Path::Direct(p), Payload::Disco(Message::Ping { tx_id, .. }))
                if p.socket == SocketId(2) =>
            {
                Some((*p, *tx_id))
            }
            _ => None,
        })
        .expect("a spray ping from socket 2");
    let t1 = t0 + Duration::from_millis(300);
    let pong = Message::Pong {
        tx_id: via2.1,
        observed_src: addr("198.51.100.1:6000"),
    };
    m.handle_disco(t1, Path::Direct(via2.0), pong).unwrap();
    assert_eq!(m.current_path(), Path::Direct(via2.0));
    let _ = std::iter::from_fn(|| m.poll_event()).count();
    // The NAT forgets the mapping: no pong answers the heartbeats, the path
    // times out, and the next discovery round starts a new attempt at once
    // (a success must not leave the retry backoff behind).
    let mut now = t1;
    while m.current_path() != Path::Relay {
        let (t, _) = m.poll_timeout().unwrap();
        assert!(t < t1 + Duration::from_secs(10), "the path never timed out");
        now = t;
        m.note_traffic(now);
        m.handle_timeout(now);
        let _ = drain(&mut m);
    }
    let (t, _) = m.poll_timeout().unwrap();
    m.handle_timeout(t.max(now));
    assert!(wants(&mut m), "a new birthday attempt right after the loss");
}

/// Right after a path turns direct, the first heartbeat goes out within
/// half a second: the peer may still be on the relay (its ping back lost),
/// and our ping is what lets it prove the path. Later ones keep the
/// regular interval.
#[test]
fn a_new_direct_path_is_pinged_early_once() {
    let t0 = Instant::now();
    let cand = addr("192.0.2.2:41641");
    let (mut m, tx_id) = started(t0);
    let t1 = t0 + Duration::from_millis(40);
    let on = Path::Direct(DirectPath::primary(cand));
    let pong = Message::Pong {
        tx_id,
        observed_src: addr("198.51.100.1:1"),
    };
    m.handle_disco(t1, on, pong).unwrap();
    assert_eq!(m.current_path(), on);
    drain(&mut m);
    let early = t1 + Duration::from_millis(500);
    assert_eq!(m.poll_timeout(), Some((early, TimerReason::Heartbeat)));
    m.handle_timeout(early);
    ping_to(&drain(&mut m), cand);
    let (next, why) = m.poll_timeout().unwrap();
    assert_eq!(why, TimerReason::Heartbeat);
    assert_eq!(next, early + Duration::from_secs(3));
}

/// While direct, a new address on either side is re-probed at once (not
/// at the minute's re-probe), and our own new address is announced.
#[test]
fn new_addresses_while_direct_are_probed_at_once() {
    let t0 = Instant::now();
    let cand = addr("192.0.2.2:41641");
    let (mut m, tx_id) = started(t0);
    let t1 = t0 + Duration::from_millis(40);
    let pong = Message::Pong {
        tx_id,
        observed_src: addr("198.51.100.1:1"),
    };
    m.handle_disco(t1, Path::Direct(DirectPath::primary(cand)), pong)
        .unwrap();
    drain(&mut m);
    // The early first heartbeat, out of the way.
    m.handle_timeout(t1 + Duration::from_millis(500));
    drain(&mut m);
    // Our side: a CallMeMaybe goes out and the re-probe is due now.
    let t2 = t1 + Duration::from_millis(600);
    m.local_candidates_changed(t2);
    let txs = drain(&mut m);
    assert!(txs
        .iter()
        .any(|t| t.payload == Payload::CallMeMaybe && t.path == Path::Relay));
    assert_eq!(m.poll_timeout(), Some((t2, TimerReason::Reprobe)));
    m.handle_timeout(t2);
    drain(&mut m);
    // The peer's side: its CallMeMaybe brings a new address.
    let t3 = t2 + Duration::from_secs(1);
    let v6 = addr("[2001:db8::2]:41641");
    m.handle_disco(
        t3,
        Path::Relay,
        Message::CallMeMaybe {
            endpoints: vec![Candidate::udp(v6, CandidateKind::Host)],
        },
    )
    .unwrap();
    assert_eq!(m.poll_timeout(), Some((t3, TimerReason::Reprobe)));
    m.handle_timeout(t3);
    ping_to(&drain(&mut m), v6);
}

#[test]
fn a_call_me_maybe_cannot_aim_probes_or_dials_at_local_or_group_addresses() {
    let t0 = Instant::now();
    let (mut m, _) = started(t0);
    m.set_tcp_local(t0, true, false);
    let bad = [
        "127.0.0.1:22",
        "[::1]:22",
        "169.254.169.254:80",
        "224.0.0.251:5353",
        "100.64.0.9:41641",
        "0.0.0.0:41641",
        "192.0.2.9:0",
    ];
    let mut endpoints: Vec<Candidate> = bad
        .iter()
        .map(|a| Candidate::udp(addr(a), CandidateKind::Host))
        .collect();
    endpoints.extend(bad.iter().map(|a| Candidate {
        transport: Transport::Tcp,
        ..Candidate::udp(addr(a), CandidateKind::Host)
    }));
    m.handle_disco(t0, Path::Relay, Message::CallMeMaybe { endpoints })
        .unwrap();
    for t in 0..20 {
        m.handle_timeout(t0 + Duration::from_millis(250 * t));
        for tx in drain(&mut m) {
            if let Path::Direct(p) = tx.path {
                assert!(
                    !bad.contains(&p.addr.to_string().as_str()),
                    "pinged {}",
                    p.addr
                );
            }
            if let Path::Tcp(a) = tx.path {
                assert!(!bad.contains(&a.to_string().as_str()), "TCP to {a}");
            }
        }
        while let Some(ev) = m.poll_event() {
            if let Event::TcpConnect { targets, .. } = &ev {
                for a in targets {
                    assert!(!bad.contains(&a.to_string().as_str()), "dialled {a}");
                }
            }
        }
    }
    // The map cannot do it either.
    m.handle_candidates(
        t0,
        bad.iter()
            .map(|a| Candidate::udp(addr(a), CandidateKind::Host))
            .collect(),
    );
    assert!(m.candidates.is_empty(), "{:?}", m.candidates);
}

/// A host path whose first pongs were slow (the kernel held them while it
/// resolved the neighbour) loses to the reflexive one at first, is pinged
/// again within seconds, and wins once it answers at its real latency.
#[test]
fn a_better_kind_that_answered_slowly_is_measured_again_soon() {
    let t0 = Instant::now();
    let v4 = addr("192.0.2.2:41641");
    let v6 = addr("[2001:db8::2]:41641");
    let mut m = PeerPaths::new(Config::default(), key(1), key(2), 9);
    m.handle_candidates(
        t0,
        vec![
            Candidate::udp(v4, CandidateKind::ServerReflexive),
            Candidate::udp(v6, CandidateKind::Host),
        ],
    );
    m.note_traffic(t0);
    m.handle_timeout(t0);
    let txs = drain(&mut m);
    let (tx4, tx6) = (ping_to(&txs, v4), ping_to(&txs, v6));
    let pong = |tx_id| Message::Pong {
        tx_id,
        observed_src: addr("198.51.100.1:1"),
    };
    let on = |a| Path::Direct(DirectPath::primary(a));
    let t1 = t0 + Duration::from_millis(2);
    m.handle_disco(t1, on(v4), pong(tx4)).unwrap();
    assert_eq!(m.current_path(), on(v4));
    let t2 = t0 + Duration::from_millis(800);
    m.handle_disco(t2, on(v6), pong(tx6)).unwrap();
    assert_eq!(m.current_path(), on(v4), "800 ms loses to 2 ms");
    // Within 5 s of that pong (not at the minute's re-probe), v6 is pinged.
    let mut now = t2;
    let tx = loop {
        let (at, _) = m.poll_timeout().expect("timers while direct");
        assert!(at <= t2 + Duration::from_secs(5), "no early re-probe");
        now = at.max(now);
        m.handle_timeout(now);
        let txs = drain(&mut m);
        if let Some(tx) = txs.iter().find_map(|t| match (&t.path, &t.payload) {
            (Path::Direct(p), Payload::Disco(Message::Ping { tx_id, .. })) if p.addr == v6 => {
                Some(*tx_id)
            }
            _ => None,
        }) {
            break tx;
        }
    };
    m.handle_disco(now + Duration::from_millis(1), on(v6), pong(tx))
        .unwrap();
    assert_eq!(
        m.current_path(),
        on(v6),
        "measured again, the host path wins"
    );
}
