//! Deterministic tests of the client session: a scripted relay on the other
//! side of the codec and a virtual clock.

use super::*;
use crate::proto::relay::auth;

struct FakeRelay {
    key: PrivateKey,
    challenge: [u8; 32],
    decoder: FrameDecoder,
}

impl FakeRelay {
    fn new() -> Self {
        FakeRelay {
            key: PrivateKey::generate(),
            challenge: auth::new_challenge(),
            decoder: FrameDecoder::default(),
        }
    }
    fn hello(&self) -> Bytes {
        Frame::ServerHello {
            version: PROTOCOL_VERSION,
            relay_key: self.key.public(),
            challenge: self.challenge,
        }
        .to_bytes()
    }
    fn read(&mut self, bytes: Option<Bytes>) -> Vec<Frame> {
        if let Some(b) = bytes {
            self.decoder.extend(&b);
        }
        let mut v = Vec::new();
        while let Some(f) = self.decoder.next_frame().unwrap() {
            v.push(f);
        }
        v
    }
}

fn established(now: Instant) -> (ClientSession, FakeRelay, PrivateKey) {
    let node = PrivateKey::generate();
    let mut s = ClientSession::new(node.clone(), SessionConfig::default(), now);
    let mut relay = FakeRelay::new();
    s.handle_input(now, &relay.hello()).unwrap();
    let frames = relay.read(s.poll_transmit());
    let [Frame::ClientHello {
        node_key, proof, ..
    }] = frames.as_slice()
    else {
        panic!("{frames:?}")
    };
    assert_eq!(*node_key, node.public());
    auth::verify(&relay.key, node_key, &relay.challenge, proof).unwrap();
    assert!(!s.is_established());
    s.handle_input(now, &Frame::Accepted.to_bytes()).unwrap();
    assert!(s.is_established());
    assert_eq!(
        s.poll_event(),
        Some(ClientEvent::Connected {
            relay_key: relay.key.public()
        })
    );
    (s, relay, node)
}

#[test]
fn handshake_then_packets_both_ways() {
    let t0 = Instant::now();
    let (mut s, mut relay, _) = established(t0);
    let peer = PrivateKey::generate().public();
    s.send_packet(t0, &peer, b"hello").unwrap();
    assert_eq!(
        relay.read(s.poll_transmit()),
        vec![Frame::SendPacket {
            dest: peer,
            packet: Bytes::from_static(b"hello")
        }]
    );
    let mut wire = BytesMut::new();
    Frame::RecvPacket {
        src: peer,
        packet: Bytes::from_static(b"back"),
    }
    .encode(&mut wire);
    Frame::PeerGone {
        key: peer,
        reason: PeerGoneReason::Disconnected,
    }
    .encode(&mut wire);
    // Split mid-frame: events appear only for complete frames.
    s.handle_input(t0, &wire[..10]).unwrap();
    assert_eq!(s.poll_event(), None);
    s.handle_input(t0, &wire[10..]).unwrap();
    assert_eq!(
        s.poll_event(),
        Some(ClientEvent::Packet {
            src: peer,
            packet: Bytes::from_static(b"back")
        })
    );
    assert!(matches!(s.poll_event(), Some(ClientEvent::PeerGone { .. })));
}

#[test]
fn sending_before_accept_is_refused() {
    let t0 = Instant::now();
    let mut s = ClientSession::new(PrivateKey::generate(), SessionConfig::default(), t0);
    let peer = PrivateKey::generate().public();
    assert!(matches!(
        s.send_packet(t0, &peer, b"x"),
        Err(SessionError::NotConnected)
    ));
    assert!(matches!(
        s.send_packet(t0, &peer, &vec![0; MAX_PACKET_LEN + 1]),
        Err(SessionError::NotConnected)
    ));
}

#[test]
fn refusal_and_wrong_relay_key_end_the_session() {
    let t0 = Instant::now();
    let relay = FakeRelay::new();
    let mut s = ClientSession::new(PrivateKey::generate(), SessionConfig::default(), t0);
    s.handle_input(t0, &relay.hello()).unwrap();
    let e = s
        .handle_input(
            t0,
            &Frame::Refused {
                reason: RefuseReason::UnknownKey,
            }
            .to_bytes(),
        )
        .unwrap_err();
    assert!(
        matches!(e, SessionError::Refused(RefuseReason::UnknownKey)),
        "{e:?}"
    );
    assert!(matches!(s.handle_input(t0, &[]), Err(SessionError::Closed)));

    let pinned = PrivateKey::generate().public();
    let cfg = SessionConfig {
        expected_relay_key: Some(pinned),
        ..SessionConfig::default()
    };
    let mut s = ClientSession::new(PrivateKey::generate(), cfg, t0);
    assert!(matches!(
        s.handle_input(t0, &relay.hello()),
        Err(SessionError::WrongRelayKey { .. })
    ));
    assert_eq!(s.poll_transmit(), None, "no proof sent to an impostor");
}

#[test]
fn handshake_times_out_on_virtual_clock() {
    let t0 = Instant::now();
    let mut s = ClientSession::new(PrivateKey::generate(), SessionConfig::default(), t0);
    let deadline = s.poll_timeout().unwrap();
    assert_eq!(deadline, t0 + Duration::from_secs(10));
    s.handle_timeout(deadline - Duration::from_millis(1))
        .unwrap();
    assert!(matches!(
        s.handle_timeout(deadline),
        Err(SessionError::HandshakeTimeout)
    ));
    assert_eq!(s.poll_timeout(), None);
}

#[test]
fn keepalive_ping_pong_and_dead_relay() {
    let t0 = Instant::now();
    let (mut s, mut relay, _) = established(t0);
    let due = s.poll_timeout().unwrap();
    assert_eq!(due, t0 + Duration::from_secs(25));
    s.handle_timeout(due).unwrap();
    let frames = relay.read(s.poll_transmit());
    let [Frame::Ping(d)] = frames.as_slice() else {
        panic!("{frames:?}")
    };
    // Answered after 40 ms: an RTT event and the next keepalive is scheduled.
    let t1 = due + Duration::from_millis(40);
    s.handle_input(t1, &Frame::Pong(*d).to_bytes()).unwrap();
    assert_eq!(
        s.poll_event(),
        Some(ClientEvent::Pong {
            rtt: Duration::from_millis(40)
        })
    );
    // Next ping goes unanswered: the session dies at the ping timeout.
    let due2 = s.poll_timeout().unwrap();
    s.handle_timeout(due2).unwrap();
    assert!(matches!(
        relay.read(s.poll_transmit()).as_slice(),
        [Frame::Ping(_)]
    ));
    let dead_at = s.poll_timeout().unwrap();
    assert_eq!(dead_at, due2 + Duration::from_secs(10));
    assert!(matches!(
        s.handle_timeout(dead_at),
        Err(SessionError::Unresponsive)
    ));
}

#[test]
fn relay_ping_is_answered_and_garbage_is_fatal() {
    let t0 = Instant::now();
    let (mut s, mut relay, _) = established(t0);
    s.handle_input(t0, &Frame::Ping([3; 8]).to_bytes()).unwrap();
    assert_eq!(relay.read(s.poll_transmit()), vec![Frame::Pong([3; 8])]);
    // Unknown type: skipped.
    s.handle_input(t0, &[0x7e, 0, 0, 0, 0]).unwrap();
    // A second server hello mid-session is a protocol violation.
    assert!(matches!(
        s.handle_input(t0, &relay.hello()),
        Err(SessionError::Unexpected(FrameType::ServerHello))
    ));
}
