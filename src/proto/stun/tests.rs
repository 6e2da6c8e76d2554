//! Codec tests: round trips, RFC 5769 test vectors, malformed input, and a
//! cross-check against the `stun_codec` crate in both directions.

use super::*;
use bytecodec::{DecodeExt, EncodeExt};
use stun_codec::rfc5389::{attributes as sc_attr, methods::BINDING, Attribute as ScAttribute};
use stun_codec::{Message as ScMessage, MessageClass, MessageDecoder, MessageEncoder};

const TX: TransactionId = TransactionId([
    0xb7, 0xe7, 0xa7, 0x01, 0xbc, 0x34, 0xd6, 0x86, 0xfa, 0x87, 0xdf, 0xae,
]);

fn v4() -> SocketAddr {
    "192.0.2.1:32853".parse().unwrap()
}

fn v6() -> SocketAddr {
    "[2001:db8:1234:5678:11:2233:4455:6677]:32853"
        .parse()
        .unwrap()
}

#[test]
fn message_type_interleaving() {
    assert_eq!(message_type(Class::Request, METHOD_BINDING), 0x0001);
    assert_eq!(message_type(Class::SuccessResponse, METHOD_BINDING), 0x0101);
    assert_eq!(message_type(Class::ErrorResponse, METHOD_BINDING), 0x0111);
    assert_eq!(message_type(Class::Indication, METHOD_BINDING), 0x0011);
    for method in [0x001, 0x003, 0x0ABC, 0x0FFF] {
        for class in [Class::Request, Class::SuccessResponse, Class::ErrorResponse] {
            let t = message_type(class, method);
            assert_eq!(method_of(t), method);
            assert_eq!(Class::from_type(t), class);
        }
    }
}

#[test]
fn request_round_trip() {
    let bytes = binding_request(TX);
    assert_eq!(bytes.len(), HEADER_LEN + 8);
    assert!(is_stun(&bytes));
    let msg = Message::decode(&bytes).unwrap();
    assert_eq!(msg.class, Class::Request);
    assert_eq!(msg.method, METHOD_BINDING);
    assert_eq!(msg.transaction_id, TX);
    assert!(msg.fingerprint);
}

#[test]
fn response_round_trip_v4_and_v6() {
    for addr in [v4(), v6()] {
        let bytes = binding_response(TX, addr, Some("warren test"));
        let msg = Message::decode(&bytes).unwrap();
        assert_eq!(msg.class, Class::SuccessResponse);
        assert_eq!(msg.xor_mapped_address, Some(addr));
        assert_eq!(msg.mapped_address, Some(addr));
        assert_eq!(msg.software.as_deref(), Some("warren test"));
        assert!(msg.fingerprint);
        assert_eq!(parse_binding_response(&bytes).unwrap(), (TX, addr));
    }
}

/// RFC 5769 §2.2 (IPv4) and §2.3 (IPv6) sample responses. They carry
/// MESSAGE-INTEGRITY, which we understand without verifying.
#[test]
fn rfc5769_sample_responses() {
    let v4_vector: [u8; 80] = [
        0x01, 0x01, 0x00, 0x3c, 0x21, 0x12, 0xa4, 0x42, 0xb7, 0xe7, 0xa7, 0x01, 0xbc, 0x34, 0xd6,
        0x86, 0xfa, 0x87, 0xdf, 0xae, 0x80, 0x22, 0x00, 0x0b, 0x74, 0x65, 0x73, 0x74, 0x20, 0x76,
        0x65, 0x63, 0x74, 0x6f, 0x72, 0x20, 0x00, 0x20, 0x00, 0x08, 0x00, 0x01, 0xa1, 0x47, 0xe1,
        0x12, 0xa6, 0x43, 0x00, 0x08, 0x00, 0x14, 0x2b, 0x91, 0xf5, 0x99, 0xfd, 0x9e, 0x90, 0xc3,
        0x8c, 0x74, 0x89, 0xf9, 0x2a, 0xf9, 0xba, 0x53, 0xf0, 0x6b, 0xe7, 0xd7, 0x80, 0x28, 0x00,
        0x04, 0xc0, 0x7d, 0x4c, 0x96,
    ];
    assert!(is_stun(&v4_vector));
    let msg = Message::decode(&v4_vector).unwrap();
    assert_eq!(msg.transaction_id, TX);
    assert_eq!(msg.xor_mapped_address, Some(v4()));
    assert_eq!(msg.software.as_deref(), Some("test vector"));
    assert!(msg.fingerprint);

    let v6_vector: [u8; 92] = [
        0x01, 0x01, 0x00, 0x48, 0x21, 0x12, 0xa4, 0x42, 0xb7, 0xe7, 0xa7, 0x01, 0xbc, 0x34, 0xd6,
        0x86, 0xfa, 0x87, 0xdf, 0xae, 0x80, 0x22, 0x00, 0x0b, 0x74, 0x65, 0x73, 0x74, 0x20, 0x76,
        0x65, 0x63, 0x74, 0x6f, 0x72, 0x20, 0x00, 0x20, 0x00, 0x14, 0x00, 0x02, 0xa1, 0x47, 0x01,
        0x13, 0xa9, 0xfa, 0xa5, 0xd3, 0xf1, 0x79, 0xbc, 0x25, 0xf4, 0xb5, 0xbe, 0xd2, 0xb9, 0xd9,
        0x00, 0x08, 0x00, 0x14, 0xa3, 0x82, 0x95, 0x4e, 0x4b, 0xe6, 0x7b, 0xf1, 0x17, 0x84, 0xc9,
        0x7c, 0x82, 0x92, 0xc2, 0x75, 0xbf, 0xe3, 0xed, 0x41, 0x80, 0x28, 0x00, 0x04, 0xc8, 0xfb,
        0x0b, 0x4c,
    ];
    let msg = Message::decode(&v6_vector).unwrap();
    assert_eq!(msg.xor_mapped_address, Some(v6()));
    assert!(msg.fingerprint);
}

#[test]
fn unknown_optional_attribute_is_skipped() {
    let mut w = MessageWriter::new(Class::SuccessResponse, METHOD_BINDING, TX);
    w.attribute(0x802B, &[1, 2, 3, 4, 5, 6, 7, 8]) // RESPONSE-ORIGIN: optional, unknown to us
        .attribute(0xC057, &[9]) // odd length: padding must be honoured
        .xor_mapped_address(v4());
    let msg = Message::decode(&w.finish_with_fingerprint()).unwrap();
    assert_eq!(msg.skipped_optional, 2);
    assert_eq!(msg.xor_mapped_address, Some(v4()));
}

#[test]
fn unknown_required_attribute_is_an_error() {
    let mut w = MessageWriter::new(Class::SuccessResponse, METHOD_BINDING, TX);
    w.xor_mapped_address(v4()).attribute(0x0042, &[0; 4]);
    assert_eq!(
        Message::decode(&w.finish()),
        Err(StunError::UnknownRequiredAttribute(0x0042))
    );
}

#[test]
fn malformed_inputs_are_typed_errors() {
    let good = binding_response(TX, v4(), None);
    assert!(matches!(
        Message::decode(&good[..10]),
        Err(StunError::Truncated(10))
    ));
    assert!(matches!(
        Message::decode(&vec![0u8; MAX_MESSAGE_LEN + 4]),
        Err(StunError::Oversized(_))
    ));

    let mut bad = good.clone();
    bad[0] |= 0x80;
    assert_eq!(Message::decode(&bad), Err(StunError::NotStun));

    let mut bad = good.clone();
    bad[4] = 0;
    assert!(matches!(
        Message::decode(&bad),
        Err(StunError::BadMagicCookie(_))
    ));

    // Datagram cut after the header: header length now lies.
    assert!(matches!(
        Message::decode(&good[..good.len() - 4]),
        Err(StunError::LengthMismatch { .. })
    ));

    // Attribute length pointing past the end (header length kept honest).
    let mut bad = good.clone();
    bad[HEADER_LEN + 2..HEADER_LEN + 4].copy_from_slice(&200u16.to_be_bytes());
    assert!(matches!(
        Message::decode(&bad),
        Err(StunError::AttributeOverflow {
            attr_type: attr::XOR_MAPPED_ADDRESS,
            len: 200
        })
    ));

    // Corrupted mapped address: fingerprint no longer matches.
    let mut bad = good.clone();
    bad[HEADER_LEN + 7] ^= 1;
    assert_eq!(Message::decode(&bad), Err(StunError::BadFingerprint));

    // Unknown address family.
    let mut w = MessageWriter::new(Class::SuccessResponse, METHOD_BINDING, TX);
    w.attribute(attr::XOR_MAPPED_ADDRESS, &[0, 3, 0, 1, 1, 2, 3, 4]);
    assert_eq!(
        Message::decode(&w.finish()),
        Err(StunError::BadAddressFamily(3))
    );

    // IPv4 family with an IPv6-sized body.
    let mut w = MessageWriter::new(Class::SuccessResponse, METHOD_BINDING, TX);
    w.attribute(attr::MAPPED_ADDRESS, &[0, 1, 0, 1, 1, 2, 3, 4, 5, 6, 7, 8]);
    assert!(matches!(
        Message::decode(&w.finish()),
        Err(StunError::BadAttributeLength { .. })
    ));

    // Something after FINGERPRINT.
    let mut bytes = binding_request(TX);
    bytes.extend_from_slice(&[0x80, 0x22, 0, 0]);
    let len = (bytes.len() - HEADER_LEN) as u16;
    bytes[2..4].copy_from_slice(&len.to_be_bytes());
    assert_eq!(Message::decode(&bytes), Err(StunError::FingerprintNotLast));
}

#[test]
fn parse_binding_response_rejects_non_responses() {
    assert_eq!(
        parse_binding_response(&binding_request(TX)),
        Err(StunError::NotBindingResponse)
    );
    let empty = MessageWriter::new(Class::SuccessResponse, METHOD_BINDING, TX).finish();
    assert_eq!(
        parse_binding_response(&empty),
        Err(StunError::NoMappedAddress)
    );
    let zero_port = binding_response(TX, "198.51.100.1:0".parse().unwrap(), None);
    assert_eq!(
        parse_binding_response(&zero_port),
        Err(StunError::NoMappedAddress)
    );
}

#[test]
fn is_stun_demultiplexes_wireguard_and_disco() {
    // WireGuard handshake initiation: type 1, three zero bytes, random index.
    let mut wg = vec![0u8; 148];
    wg[0] = 1;
    wg[4..8].copy_from_slice(&MAGIC_COOKIE.to_be_bytes()); // even an unlucky index
    assert!(!is_stun(&wg));
    let mut wg_data = vec![0u8; 32];
    wg_data[0] = 4;
    assert!(!is_stun(&wg_data));
    // Disco: 6-byte magic whose first byte has the top bits set.
    let disco = [b"TS\xf0\x9f\x92\xac".as_slice(), &[0u8; 60]].concat();
    assert!(!is_stun(&disco));
    assert!(!is_stun(&[]));
    assert!(is_stun(&binding_request(TX)));
}

#[test]
fn software_is_cut_at_char_boundary() {
    let long = "é".repeat(100); // 200 bytes
    let mut w = MessageWriter::new(Class::Request, METHOD_BINDING, TX);
    w.software(&long);
    let msg = Message::decode(&w.finish()).unwrap();
    let got = msg.software.unwrap();
    assert!(got.len() <= MAX_SOFTWARE_LEN && got.chars().all(|c| c == 'é'));
}

#[test]
fn error_code_round_trip() {
    let mut w = MessageWriter::new(Class::ErrorResponse, METHOD_BINDING, TX);
    w.error_code(420, "Unknown Attribute");
    let msg = Message::decode(&w.finish_with_fingerprint()).unwrap();
    assert_eq!(msg.class, Class::ErrorResponse);
    assert_eq!(msg.error_code, Some((420, "Unknown Attribute".to_owned())));
}

fn sc_decode(bytes: &[u8]) -> ScMessage<ScAttribute> {
    MessageDecoder::<ScAttribute>::new()
        .decode_from_bytes(bytes)
        .unwrap()
        .unwrap()
}

#[test]
fn stun_codec_reads_our_messages() {
    let req = sc_decode(&binding_request(TX));
    assert_eq!(req.class(), MessageClass::Request);
    assert_eq!(req.method(), BINDING);
    assert_eq!(req.transaction_id().as_bytes(), &TX.0);
    assert!(req.get_attribute::<sc_attr::Fingerprint>().is_some());

    for addr in [v4(), v6()] {
        let resp = sc_decode(&binding_response(TX, addr, Some("warren")));
        assert_eq!(resp.class(), MessageClass::SuccessResponse);
        let xma = resp.get_attribute::<sc_attr::XorMappedAddress>().unwrap();
        assert_eq!(xma.address(), addr);
        let ma = resp.get_attribute::<sc_attr::MappedAddress>().unwrap();
        assert_eq!(ma.address(), addr);
        let sw = resp.get_attribute::<sc_attr::Software>().unwrap();
        assert_eq!(sw.description(), "warren");
    }
}

#[test]
fn we_read_stun_codec_messages() {
    for addr in [v4(), v6()] {
        let mut m = ScMessage::<ScAttribute>::new(
            MessageClass::SuccessResponse,
            BINDING,
            stun_codec::TransactionId::new(TX.0),
        );
        m.add_attribute(sc_attr::Software::new("other stack".to_owned()).unwrap());
        m.add_attribute(sc_attr::XorMappedAddress::new(addr));
        let fp = sc_attr::Fingerprint::new(&m).unwrap();
        m.add_attribute(fp);
        let bytes = MessageEncoder::new().encode_into_bytes(m).unwrap();
        assert!(is_stun(&bytes));
        let ours = Message::decode(&bytes).unwrap();
        assert_eq!(ours.xor_mapped_address, Some(addr));
        assert_eq!(ours.software.as_deref(), Some("other stack"));
        assert!(ours.fingerprint);
        assert_eq!(parse_binding_response(&bytes).unwrap(), (TX, addr));
    }
}

#[test]
fn random_transaction_ids_differ() {
    use rand::SeedableRng;
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    assert_ne!(
        TransactionId::random(&mut rng),
        TransactionId::random(&mut rng)
    );
}

/// Cheap in-process fuzzing so CI exercises the decoder even without
/// cargo-fuzz: random mutations of valid messages must never panic.
#[test]
fn mutated_messages_never_panic() {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(42);
    let seeds = [
        binding_request(TX),
        binding_response(TX, v4(), Some("x")),
        binding_response(TX, v6(), None),
    ];
    for _ in 0..20_000 {
        let mut m = seeds[rng.gen_range(0..seeds.len())].clone();
        for _ in 0..rng.gen_range(1..4) {
            let i = rng.gen_range(0..m.len());
            m[i] = rng.gen();
        }
        if rng.gen_bool(0.2) {
            m.truncate(rng.gen_range(0..m.len()));
        }
        let _ = Message::decode(&m);
        let _ = is_stun(&m);
    }
}
