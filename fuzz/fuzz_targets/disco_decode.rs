//! Fuzzes the disco codec and the node's datagram demultiplexer: no input
//! may panic, a decoded plaintext must re-encode to the same message, and no
//! unauthenticated packet may move a path.
#![no_main]

use std::time::Instant;

use libfuzzer_sys::fuzz_target;
use warren::keys::NodeKey;
use warren::proto::disco::{self, DiscoSecret};
use warren::traversal::node::{Node, PeerInfo};
use warren::traversal::{Config, NatSummary, Path, SocketId};

fuzz_target!(|data: &[u8]| {
    if let Ok(msg) = disco::decode_plain(data) {
        let again = disco::decode_plain(&disco::encode_plain(&msg));
        assert_eq!(again.as_ref(), Ok(&msg));
    }

    let ours = DiscoSecret::from_bytes([1; 32]);
    let theirs = DiscoSecret::from_bytes([2; 32]);
    let sbox = ours.box_for(&theirs.public());
    if let Ok(header) = disco::parse_header(data) {
        let _ = header.counter;
        let _ = disco::open(&sbox, &header.sender, data);
    }

    // Whole-node path: raw bytes on the socket and through the relay, from a
    // peer whose disco key is in the map (so the box is actually tried).
    let now = Instant::now();
    let peer = NodeKey([2; 32]);
    let mut node = Node::new(Config::default(), NodeKey([1; 32]), ours, 0);
    node.upsert_peer(
        now,
        PeerInfo {
            node_key: peer,
            disco_key: theirs.public(),
            candidates: Vec::new(),
            nat: NatSummary::default(),
        },
    );
    let src = "192.0.2.1:41641".parse().expect("literal address");
    let mut pkt = data.to_vec();
    if pkt.len() >= 38 {
        // Claim the known sender so the fuzzer reaches the AEAD and beyond.
        pkt[..6].copy_from_slice(&disco::MAGIC);
        pkt[6..38].copy_from_slice(&theirs.public().0);
    }
    let _ = node.handle_udp(now, SocketId::PRIMARY, src, data);
    let _ = node.handle_udp(now, SocketId::PRIMARY, src, &pkt);
    let _ = node.handle_relay(now, peer, &pkt);
    while node.poll_transmit().is_some() {}
    assert_eq!(node.path(&peer), Path::Relay);
});
