//! In-memory tests of the data plane: two nodes hand datagrams to each other
//! directly, no sockets, so handshakes, roaming and drop accounting are
//! checked without the NAT lab.

use std::net::{Ipv4Addr, SocketAddr};

use super::packet::build::ipv4;
use super::*;
use crate::path::{DirectPath, Path};

struct Node {
    dp: DataPlane,
    addr: SocketAddr,
}

fn node(addr: &str) -> Node {
    Node {
        dp: DataPlane::new(PrivateKey::generate(), Instant::now()),
        addr: addr.parse().unwrap(),
    }
}

fn spec(of: &Node, allowed: &str, endpoint: Option<SocketAddr>) -> PeerSpec {
    let mut s = PeerSpec::new(of.dp.public_key(), vec![allowed.parse().unwrap()]);
    s.endpoint = endpoint;
    s
}

/// Delivers one datagram from `src` to `dst`, returning what came out:
/// decrypted packets, and replies that `dst` sends back.
fn deliver(dst: &Node, from: SocketAddr, dgram: &[u8]) -> (Vec<Vec<u8>>, Vec<Vec<u8>>) {
    let set = dst.dp.peers();
    let mut buf = vec![0u8; 2048];
    let mut tunnel = Vec::new();
    let mut replies = Vec::new();
    let Ok(peer) = dst.dp.peer_for(Instant::now(), &set, from, dgram, &mut buf) else {
        return (tunnel, replies);
    };
    match peer.open(Instant::now(), Some(from), dgram, &mut buf) {
        Opened::Tunnel { len } => tunnel.push(buf[..len].to_vec()),
        Opened::Reply { len } => {
            replies.push(buf[..len].to_vec());
            while let Sealed::Send { len, .. } = peer.flush_queued(Instant::now(), &mut buf) {
                replies.push(buf[..len].to_vec());
            }
        }
        _ => {}
    }
    (tunnel, replies)
}

fn seal(n: &Node, pkt: &[u8]) -> Option<(Vec<u8>, SocketAddr)> {
    let set = n.dp.peers();
    let dst = packet::destination(pkt)?;
    let peer = set.routes.lookup(dst)?;
    let mut out = vec![0u8; pkt.len() + SEAL_OVERHEAD + 148];
    match peer.seal(Instant::now(), pkt, &mut out) {
        Sealed::Send { len, to } => Some((out[..len].to_vec(), to)),
        _ => None,
    }
}

const A_IP: Ipv4Addr = Ipv4Addr::new(100, 64, 0, 1);
const B_IP: Ipv4Addr = Ipv4Addr::new(100, 64, 0, 2);

#[test]
fn handshake_then_data_both_ways_and_roaming() {
    let a = node("11.11.0.1:51820");
    let b = node("11.11.0.2:51820");
    a.dp.upsert_peer(Instant::now(), spec(&b, "100.64.0.2/32", Some(b.addr)));
    // b does not know a's endpoint: it must learn it from a's handshake.
    b.dp.upsert_peer(Instant::now(), spec(&a, "100.64.0.1/32", None));

    let ping = ipv4(A_IP, B_IP, b"ping");
    let (init, to) = seal(&a, &ping).expect("handshake initiation");
    assert_eq!(to, b.addr);
    assert_eq!(init[0], 1);
    let (none, resp) = deliver(&b, a.addr, &init);
    assert!(none.is_empty());
    assert_eq!(resp.len(), 1);
    assert_eq!(resp[0][0], 2, "handshake response");
    assert_eq!(
        b.dp.peers().by_key(&a.dp.public_key()).unwrap().endpoint(),
        Some(a.addr)
    );

    // a receives the response: the queued ping is flushed as data.
    let (_, flushed) = deliver(&a, b.addr, &resp[0]);
    assert!(flushed.iter().any(|d| d[0] == 4));
    let mut got = Vec::new();
    for d in &flushed {
        got.extend(deliver(&b, a.addr, d).0);
    }
    assert_eq!(got, vec![ping.clone()]);

    // And back, to a's address after a moved (roaming).
    let moved: SocketAddr = "11.11.0.9:4000".parse().unwrap();
    let (d, _) = seal(&a, &ipv4(A_IP, B_IP, b"again")).unwrap();
    assert_eq!(deliver(&b, moved, &d).0.len(), 1);
    let pong = ipv4(B_IP, A_IP, b"pong");
    let (d, to) = seal(&b, &pong).unwrap();
    assert_eq!(to, moved, "b follows a to its new address");
    assert_eq!(deliver(&a, b.addr, &d).0, vec![pong]);
}

#[test]
fn forged_and_spoofed_packets_are_counted_not_delivered() {
    let a = node("11.11.0.1:1");
    let b = node("11.11.0.2:1");
    a.dp.upsert_peer(Instant::now(), spec(&b, "100.64.0.2/32", Some(b.addr)));
    b.dp.upsert_peer(Instant::now(), spec(&a, "100.64.0.1/32", Some(a.addr)));
    let (init, _) = seal(&a, &ipv4(A_IP, B_IP, b"x")).unwrap();
    let (_, resp) = deliver(&b, a.addr, &init);
    let (_, flushed) = deliver(&a, b.addr, &resp[0]);
    for d in &flushed {
        deliver(&b, a.addr, d);
    }

    // A tampered data packet fails authentication.
    let (mut d, _) = seal(&a, &ipv4(A_IP, B_IP, b"tamper")).unwrap();
    let last = d.len() - 1;
    d[last] ^= 1;
    let attacker: SocketAddr = "6.6.6.6:6".parse().unwrap();
    assert!(deliver(&b, attacker, &d).0.is_empty());
    // ... and does not move the endpoint.
    let peer = b.dp.peers().by_key(&a.dp.public_key()).unwrap().clone();
    assert_eq!(peer.endpoint(), Some(a.addr));

    // Garbage and an unknown receiver index are counted.
    let before = b.dp.drops.snapshot();
    for junk in [
        &[4u8, 0, 0, 0, 9, 9, 9, 9][..],
        &[1u8; 10][..],
        &[0xffu8; 200][..],
    ] {
        assert!(deliver(&b, attacker, junk).0.is_empty());
    }
    let after = b.dp.drops.snapshot();
    assert!(after.auth + after.unknown_peer >= before.auth + before.unknown_peer + 3);

    // A correctly sealed packet whose inner source a does not own.
    let (d, _) = seal(&a, &ipv4(Ipv4Addr::new(10, 9, 9, 9), B_IP, b"spoof")).unwrap();
    assert!(deliver(&b, a.addr, &d).0.is_empty());
    assert_eq!(peer.spoofed.load(std::sync::atomic::Ordering::Relaxed), 1);
}

#[test]
fn upsert_keeps_session_when_only_endpoint_changes() {
    let a = node("11.11.0.1:1");
    let b = node("11.11.0.2:1");
    a.dp.upsert_peer(Instant::now(), spec(&b, "100.64.0.2/32", Some(b.addr)));
    let before = a.dp.peers().by_key(&b.dp.public_key()).unwrap().index;
    let new_ep: SocketAddr = "11.11.0.3:7".parse().unwrap();
    a.dp.upsert_peer(Instant::now(), spec(&b, "100.64.0.2/32", Some(new_ep)));
    let p = a.dp.peers().by_key(&b.dp.public_key()).unwrap().clone();
    assert_eq!(p.index, before);
    assert_eq!(p.endpoint(), Some(new_ep));
    // And back to the first endpoint: the stored spec still names it, which
    // must not hide the move.
    a.dp.upsert_peer(Instant::now(), spec(&b, "100.64.0.2/32", Some(b.addr)));
    assert_eq!(p.endpoint(), Some(b.addr));
    a.dp.upsert_peer(Instant::now(), spec(&b, "100.64.0.2/32", Some(new_ep)));
    // Changing allowed IPs rebuilds routes.
    a.dp.upsert_peer(Instant::now(), spec(&b, "100.64.0.0/24", Some(new_ep)));
    assert!(a
        .dp
        .peers()
        .routes
        .lookup("100.64.0.77".parse().unwrap())
        .is_some());
    assert!(a.dp.remove_peer(&b.dp.public_key()));
    assert!(a.dp.peers().routes.is_empty());
}

#[test]
fn managed_peer_starts_on_relay_and_does_not_roam() {
    let a = node("11.11.0.1:1");
    let b = node("11.11.0.2:1");
    let mut sb = spec(&b, "100.64.0.2/32", None);
    sb.managed = true;
    a.dp.upsert_peer(Instant::now(), sb);
    let mut sa = spec(&a, "100.64.0.1/32", None);
    sa.managed = true;
    b.dp.upsert_peer(Instant::now(), sa);
    let pa = b.dp.peers().by_key(&a.dp.public_key()).unwrap().clone();
    let pb = a.dp.peers().by_key(&b.dp.public_key()).unwrap().clone();
    assert_eq!(pb.path(), Some(Path::Relay));

    // The first packet goes to the relay at once: a handshake initiation.
    let mut out = vec![0u8; 2048];
    let Sealed::Relay { len } = pb.seal(Instant::now(), &ipv4(A_IP, B_IP, b"x"), &mut out) else {
        panic!("expected the relay");
    };
    assert_eq!(out[0], 1);
    // b opens it (arriving through the relay: no source address) and
    // answers; nothing moves b's path for a off the relay.
    let init = out[..len].to_vec();
    let mut buf = vec![0u8; 2048];
    assert!(matches!(
        pa.open(Instant::now(), None, &init, &mut buf),
        Opened::Reply { .. }
    ));
    assert_eq!(pa.path(), Some(Path::Relay));
    // A direct datagram does not roam a managed peer either.
    let (d, _) = {
        let resp = buf[..148.min(buf.len())].to_vec();
        (resp, ())
    };
    let _ = pb.open(
        Instant::now(),
        Some("9.9.9.9:9".parse().unwrap()),
        &d[..92],
        &mut out,
    );
    assert_eq!(pb.path(), Some(Path::Relay));
    // Traversal moves it.
    pb.set_path(Path::Direct(DirectPath::primary(b.addr)));
    assert_eq!(pb.endpoint(), Some(b.addr));
}

#[test]
fn upsert_peers_in_bulk_keeps_unchanged_tunnels() {
    let a = node("10.0.0.1:1");
    let others: Vec<Node> = (2..5).map(|i| node(&format!("10.0.0.{i}:1"))).collect();
    let specs = |ep: u16| -> Vec<PeerSpec> {
        others
            .iter()
            .enumerate()
            .map(|(i, n)| {
                let ep = SocketAddr::from(([10, 0, 0, 9], ep));
                spec(n, &format!("100.64.0.{}/32", i + 2), Some(ep))
            })
            .collect()
    };
    a.dp.upsert_peers(Instant::now(), specs(1));
    let first = a.dp.peers();
    assert_eq!(first.len(), 3);
    for (i, n) in others.iter().enumerate() {
        let dst = Ipv4Addr::new(100, 64, 0, i as u8 + 2).into();
        let routed = first.routes.lookup(dst).expect("route to each peer");
        assert_eq!(routed.key, n.dp.public_key());
    }
    // Same specs, then only new endpoints: the same tunnels stay.
    a.dp.upsert_peers(Instant::now(), specs(1));
    a.dp.upsert_peers(Instant::now(), specs(7));
    let now = a.dp.peers();
    for p in first.iter() {
        let kept = now.by_key(&p.key).expect("still there");
        assert!(Arc::ptr_eq(p, kept), "tunnel of an unchanged peer kept");
        assert_eq!(kept.endpoint().map(|e| e.port()), Some(7));
    }
    // A changed allowed IP gives that one peer a new tunnel.
    let mut changed = specs(7);
    changed[0].allowed_ips = vec!["100.64.1.0/24".parse().unwrap()];
    a.dp.upsert_peers(Instant::now(), changed);
    let last = a.dp.peers();
    assert_eq!(last.len(), 3);
    let k0 = others[0].dp.public_key();
    assert!(!Arc::ptr_eq(
        now.by_key(&k0).unwrap(),
        last.by_key(&k0).unwrap()
    ));
    assert!(last.routes.lookup("100.64.1.9".parse().unwrap()).is_some());
    assert!(last.routes.lookup("100.64.0.2".parse().unwrap()).is_none());
}

/// The first packet of a quiet peer wakes the agent once; packets while
/// it is busy do not, and after a look that found no news it wakes again.
#[test]
fn a_quiet_peers_first_packet_wakes_the_agent_once() {
    use futures_util::FutureExt;
    let a = node("11.11.0.1:51820");
    let b = node("11.11.0.2:51820");
    a.dp.upsert_peer(Instant::now(), spec(&b, "100.64.0.2/32", Some(b.addr)));
    let wake = a.dp.activity_wake();
    let woken = || wake.notified().now_or_never().is_some();
    assert!(!woken(), "adding a peer is not traffic");
    let peer = a.dp.peers().by_key(&b.dp.public_key()).unwrap().clone();
    let _ = seal(&a, &ipv4(A_IP, B_IP, b"one"));
    assert!(woken(), "the first packet wakes");
    let seen = peer.poll_activity(0);
    assert_eq!(seen, 1);
    assert_eq!(peer.sealed(), 1, "a sealed packet is ours");
    let _ = seal(&a, &ipv4(A_IP, B_IP, b"two"));
    assert!(!woken(), "a busy peer does not wake again");
    // The agent looks: news (the second packet), so not quiet yet.
    let seen = peer.poll_activity(seen);
    let _ = seal(&a, &ipv4(A_IP, B_IP, b"three"));
    assert!(!woken());
    // A look with nothing new marks it quiet; the next packet wakes.
    let seen = peer.poll_activity(seen + 1);
    assert_eq!(peer.poll_activity(seen), seen);
    let _ = seal(&a, &ipv4(A_IP, B_IP, b"four"));
    assert!(woken());
}

#[test]
fn a_session_is_made_at_its_first_use_or_at_once_with_a_keepalive() {
    let a = node("11.11.0.1:51820");
    let b = node("11.11.0.2:51820");
    let c = node("11.11.0.3:51820");
    a.dp.upsert_peer(Instant::now(), spec(&b, "100.64.0.2/32", Some(b.addr)));
    b.dp.upsert_peer(Instant::now(), spec(&a, "100.64.0.1/32", None));
    let mut with_keepalive = spec(&c, "100.64.0.3/32", Some(c.addr));
    with_keepalive.persistent_keepalive = Some(25);
    a.dp.upsert_peer(Instant::now(), with_keepalive);
    let peer = |n: &Node, of: &Node| n.dp.peers().by_key[&of.dp.public_key()].clone();
    assert!(!peer(&a, &b).has_session(), "an idle peer holds no session");
    assert!(
        peer(&a, &c).has_session(),
        "boringtun's keepalive timer needs one"
    );

    // An idle peer's timers and stats need no session and make none.
    let mut buf = vec![0u8; 2048];
    assert_eq!(peer(&a, &b).tick(Instant::now(), &mut buf), Sealed::Nothing);
    assert_eq!(peer(&a, &b).stats(Instant::now()).tx_bytes, 0);
    assert!(!peer(&a, &b).has_session());

    // A forged data packet to b's index for a makes no session there.
    let mut forged = vec![0u8; 48];
    forged[0] = 4;
    forged[4..8].copy_from_slice(&(peer(&b, &a).index << 8).to_le_bytes());
    let mut out = vec![0u8; 2048];
    assert!(matches!(
        peer(&b, &a).open(Instant::now(), Some(a.addr), &forged, &mut out),
        Opened::Rejected(_)
    ));
    assert!(
        !peer(&b, &a).has_session(),
        "only a handshake makes a session"
    );

    // The first packet makes a's session; its handshake makes b's.
    let (init, _) = seal(&a, &ipv4(A_IP, B_IP, b"ping")).expect("handshake initiation");
    assert!(peer(&a, &b).has_session());
    assert!(!peer(&b, &a).has_session());
    let (_, resp) = deliver(&b, a.addr, &init);
    assert_eq!(
        resp.len(),
        1,
        "b answers the handshake with a session made for it"
    );
    assert!(peer(&b, &a).has_session());
    let (tunnel, _) = deliver(&a, b.addr, &resp[0]);
    assert_eq!(tunnel.len(), 0);
    assert!(peer(&a, &b).stats(Instant::now()).last_handshake.is_some());
}
