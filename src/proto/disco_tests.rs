//! Round trips, hostile bytes and the replay window of the disco codec.

use super::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

fn pair() -> (DiscoSecret, DiscoSecret) {
    let mut rng = StdRng::seed_from_u64(7);
    (
        DiscoSecret::generate(&mut rng),
        DiscoSecret::generate(&mut rng),
    )
}

fn samples() -> Vec<Message> {
    vec![
        Message::Ping {
            tx_id: [9; 12],
            node_key: NodeKey([3; 32]),
        },
        Message::Pong {
            tx_id: [1; 12],
            observed_src: "198.51.100.7:41641".parse().unwrap(),
        },
        Message::Pong {
            tx_id: [2; 12],
            observed_src: "[2001:db8::1]:7".parse().unwrap(),
        },
        Message::CallMeMaybe { endpoints: vec![] },
        Message::CallMeMaybe {
            endpoints: vec![
                Candidate::udp("10.0.0.2:41641".parse().unwrap(), CandidateKind::Host),
                Candidate::udp(
                    "203.0.113.9:1000".parse().unwrap(),
                    CandidateKind::ServerReflexive,
                ),
                Candidate::udp(
                    "203.0.113.9:1002".parse().unwrap(),
                    CandidateKind::Predicted,
                ),
                Candidate {
                    addr: "[2001:db8::2]:443".parse().unwrap(),
                    kind: CandidateKind::PortMapped,
                    transport: Transport::Tcp,
                },
            ],
        },
    ]
}

#[test]
fn magic_never_starts_wireguard_or_stun() {
    assert!(!(1..=4).contains(&MAGIC[0]));
    assert_ne!(MAGIC[0] & 0xc0, 0, "STUN starts with two zero bits");
    let wg_handshake = [1u8, 0, 0, 0, 1, 2, 3];
    assert!(!looks_like_disco(&wg_handshake));
}

#[test]
fn every_message_round_trips_sealed() {
    let (a, b) = pair();
    let a_to_b = a.box_for(&b.public());
    let b_from_a = b.box_for(&a.public());
    for (i, msg) in samples().into_iter().enumerate() {
        let pkt = seal(&a_to_b, &a.public(), i as u64, [i as u8; 16], &msg);
        assert!(looks_like_disco(&pkt));
        let header = parse_header(&pkt).unwrap();
        assert_eq!(header.sender, a.public());
        assert_eq!(header.counter, i as u64);
        let (_, back) = open(&b_from_a, &a.public(), &pkt).unwrap();
        assert_eq!(back, msg);
    }
}

#[test]
fn third_party_cannot_open_or_forge() {
    let (a, b) = pair();
    let mallory = DiscoSecret::from_bytes([42; 32]);
    let msg = &samples()[0];
    let pkt = seal(&a.box_for(&b.public()), &a.public(), 1, [0; 16], msg);
    // Mallory cannot read it.
    assert_eq!(
        open(&mallory.box_for(&a.public()), &a.public(), &pkt),
        Err(DiscoError::Unsealable)
    );
    // Mallory claims to be `a` but seals with her own key: b cannot open it.
    let forged = seal(&mallory.box_for(&b.public()), &a.public(), 2, [0; 16], msg);
    assert_eq!(
        open(&b.box_for(&a.public()), &a.public(), &forged),
        Err(DiscoError::Unsealable)
    );
}

#[test]
fn any_flipped_bit_is_refused() {
    let (a, b) = pair();
    let pkt = seal(
        &a.box_for(&b.public()),
        &a.public(),
        5,
        [7; 16],
        &samples()[4],
    );
    let sbox = b.box_for(&a.public());
    for i in 6..pkt.len() {
        let mut bad = pkt.clone();
        bad[i] ^= 0x10;
        assert!(open(&sbox, &a.public(), &bad).is_err(), "byte {i} accepted");
    }
}

#[test]
fn short_and_foreign_packets_are_typed_errors() {
    assert_eq!(parse_header(b"hello"), Err(DiscoError::NotDisco));
    assert_eq!(parse_header(&MAGIC), Err(DiscoError::TooShort(6)));
    let mut p = MAGIC.to_vec();
    p.resize(HEADER_LEN + TAG_LEN + 1, 0);
    assert!(matches!(parse_header(&p), Err(DiscoError::TooShort(_))));
}

#[test]
fn bad_plaintexts_are_typed_errors() {
    assert_eq!(decode_plain(&[]), Err(DiscoError::TooShort(0)));
    assert_eq!(decode_plain(&[1]), Err(DiscoError::TooShort(1)));
    assert_eq!(decode_plain(&[9, 0]), Err(DiscoError::UnknownType(9)));
    assert_eq!(
        decode_plain(&[1, 7]),
        Err(DiscoError::UnsupportedVersion(7))
    );
    assert_eq!(
        decode_plain(&[1, 0, 1, 2]),
        Err(DiscoError::Malformed("ping"))
    );
    assert_eq!(decode_plain(&[2, 0]), Err(DiscoError::Malformed("pong")));
    assert_eq!(
        decode_plain(&[3, 0, 1]),
        Err(DiscoError::Malformed("call-me-maybe"))
    );
    // Unknown candidate kind.
    let mut cmm = vec![3, 0, 99, 0];
    cmm.extend_from_slice(&[0; 18]);
    assert_eq!(
        decode_plain(&cmm),
        Err(DiscoError::Malformed("call-me-maybe"))
    );
    // Too many candidates.
    let mut many = vec![3, 0];
    for _ in 0..=MAX_CANDIDATES {
        many.extend_from_slice(&[1, 0]);
        many.extend_from_slice(&[0; 18]);
    }
    assert_eq!(
        decode_plain(&many),
        Err(DiscoError::TooManyCandidates(MAX_CANDIDATES + 1))
    );
}

#[test]
fn encoder_caps_candidates() {
    let c = Candidate::udp("1.2.3.4:5".parse().unwrap(), CandidateKind::Host);
    let msg = Message::CallMeMaybe {
        endpoints: vec![c; MAX_CANDIDATES + 10],
    };
    match decode_plain(&encode_plain(&msg)).unwrap() {
        Message::CallMeMaybe { endpoints } => assert_eq!(endpoints.len(), MAX_CANDIDATES),
        other => panic!("{other:?}"),
    }
}

#[test]
fn random_bytes_never_panic() {
    let mut rng = StdRng::seed_from_u64(99);
    let (a, b) = pair();
    let sbox = b.box_for(&a.public());
    for _ in 0..5000 {
        let len = rng.gen_range(0..200);
        let mut buf: Vec<u8> = (0..len).map(|_| rng.gen()).collect();
        let _ = decode_plain(&buf);
        if buf.len() >= 6 {
            buf[..6].copy_from_slice(&MAGIC);
        }
        let _ = open(&sbox, &a.public(), &buf);
    }
}

#[test]
fn replay_window_accepts_once_and_reorders() {
    let mut w = ReplayWindow::default();
    w.accept(10).unwrap();
    assert_eq!(w.accept(10), Err(DiscoError::Replayed));
    w.accept(12).unwrap();
    w.accept(11).unwrap(); // late but inside the window
    assert_eq!(w.accept(11), Err(DiscoError::Replayed));
    w.accept(10 + ReplayWindow::SIZE + 5).unwrap();
    // 12 is now more than SIZE behind: refused even though never seen twice.
    assert_eq!(w.check(12), Err(DiscoError::Replayed));
    // A big jump clears the bitmap but keeps refusing the old.
    w.accept(u64::MAX - 1).unwrap();
    assert_eq!(w.accept(u64::MAX - 1), Err(DiscoError::Replayed));
    w.accept(u64::MAX).unwrap();
    assert_eq!(w.check(1000), Err(DiscoError::Replayed));
}

#[test]
fn check_does_not_record() {
    let mut w = ReplayWindow::default();
    w.check(3).unwrap();
    w.check(3).unwrap();
    w.accept(3).unwrap();
    assert!(w.check(3).is_err());
}

#[test]
fn local_group_and_overlay_addresses_are_not_candidates() {
    use std::net::IpAddr;
    for bad in [
        "127.0.0.1",
        "100.64.0.7",
        "169.254.1.1",
        "0.0.0.0",
        "224.0.0.251",
        "255.255.255.255",
        "::1",
        "::",
        "ff02::1",
        "fe80::1",
        "fd7a::1",
        "::ffff:127.0.0.1",
    ] {
        let ip: IpAddr = bad.parse().unwrap();
        assert!(!is_candidate_ip(ip), "{bad}");
    }
    for good in ["11.11.0.2", "10.1.0.2", "192.168.1.5", "2001:db8::5"] {
        assert!(is_candidate_ip(good.parse().unwrap()), "{good}");
    }
    assert!(!is_candidate_addr("11.11.0.2:0".parse().unwrap()));
    assert!(is_candidate_addr("11.11.0.2:41641".parse().unwrap()));
}
