//! Correctness under speed: lab tests that push the data plane hard and
//! check that nothing is lost, corrupted or resized on the way.
//!
//! - Bulk TCP in both directions at once, checked by SHA-256 at both ends:
//!   1 GB each way on the offload path (TUN virtio-net header, UDP GSO/GRO),
//!   128 MB each way on the per-packet path (`offload = false`), which is
//!   several times slower in the debug build the tests run and would blow
//!   the file's time budget (under 2 minutes on 2 cores) at 1 GB.
//! - MTU edges, IPv4 and IPv6 inside the tunnel, as WireGuard requires: a
//!   1280-byte packet and a packet of exactly the interface MTU cross in one
//!   piece with DF set; one byte more with DF set is refused by the sender's
//!   own stack ("message too long", mtu 1420): the tunnel never carries an
//!   inner packet above its MTU and never fragments one itself; without DF
//!   the sender's stack fragments it and the fragments cross and reassemble.
//! - Bulk TCP over the IPv6 overlay.
//! - A path that reorders and loses packets, on both IO paths: the lab's
//!   kernel has no `sch_netem` (CONFIG_NET_SCH_NETEM is not set), so a small
//!   UDP middlebox ([`Impairment`]) sits between the agents and does what
//!   `tc netem delay 1ms reorder 25% 50% loss 1%` would: it drops 1% of
//!   datagrams and holds back 25% until the next one has passed (or 1 ms).
//!   WireGuard's replay window must accept the reordered packets; TCP
//!   repairs the losses; the SHA-256 of what arrives must match.

use crate::lab;

use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use lab::agent::{sock, tcp_transfer, warren_keypair, Agent, AgentConfig, PeerCfg, PORT};
use lab::{Lab, Node};

const A4: &str = "100.64.0.1";
const B4: &str = "100.64.0.2";
const A6: &str = "fd7a:7761::1";
const B6: &str = "fd7a:7761::2";
/// The agents' default interface MTU.
const MTU: usize = 1420;
const MB: usize = 1024 * 1024;
/// How long the first handshake may take; with 1% loss a lost initiation
/// costs WireGuard's 5 s retry.
const HANDSHAKE: Duration = Duration::from_secs(20);

/// Two agents, `a` and `b`, each with an IPv4 and an IPv6 overlay address.
/// `a_to_b` / `b_to_a` are the endpoints each one sends to: the other agent,
/// or a middlebox in between.
fn agents(
    lab: &Lab,
    (a, b): (&Node, &Node),
    (a_to_b, b_to_a): (SocketAddr, SocketAddr),
    offload: bool,
) -> (Agent, Agent) {
    let (ka, kb) = (warren_keypair(lab, a), warren_keypair(lab, b));
    let to_b = PeerCfg::new(&kb.public, &["100.64.0.2/32", "fd7a:7761::2/128"]).endpoint(a_to_b);
    let to_a = PeerCfg::new(&ka.public, &["100.64.0.1/32", "fd7a:7761::1/128"]).endpoint(b_to_a);
    let mut ca = AgentConfig::new(&ka.private, &["100.64.0.1/24", "fd7a:7761::1/64"]).peer(to_b);
    let mut cb = AgentConfig::new(&kb.private, &["100.64.0.2/24", "fd7a:7761::2/64"]).peer(to_a);
    ca.offload = Some(offload);
    cb.offload = Some(offload);
    let agents = (Agent::start(lab, a, &ca), Agent::start(lab, b, &cb));
    assert!(lab.ping_within(a, B4, HANDSHAKE), "a -> b over warren");
    assert!(lab.ping_within(b, A4, HANDSHAKE), "b -> a over warren");
    agents
}

/// Two public hosts with an agent each, sending straight to each other.
fn direct_pair(lab: &Lab, offload: bool) -> (Node, Node, (Agent, Agent)) {
    let (a, b) = (lab.public("a"), lab.public("b"));
    let ag = agents(lab, (&a, &b), (sock(b.ip, PORT), sock(a.ip, PORT)), offload);
    (a, b, ag)
}

/// `len` bytes a -> b and `len` bytes b -> a at the same time, over the
/// overlay addresses `(to_a, to_b)`; asserts both SHA-256 pairs match.
fn both_ways(lab: &Lab, a: &Node, b: &Node, (to_a, to_b): (&str, &str), len: usize) {
    let (to_a, to_b): (IpAddr, IpAddr) = (to_a.parse().expect("ip"), to_b.parse().expect("ip"));
    let start = Instant::now();
    let (ab, ba) = std::thread::scope(|s| {
        let ab = s.spawn(|| tcp_transfer(lab, a, b, to_b, 5101, len));
        let ba = s.spawn(|| tcp_transfer(lab, b, a, to_a, 5102, len));
        (ab.join().expect("a -> b"), ba.join().expect("b -> a"))
    });
    let secs = start.elapsed().as_secs_f64();
    eprintln!(
        "{} MB each way at once in {secs:.1} s ({:.0} Mbit/s in total)",
        len / MB,
        2.0 * len as f64 * 8.0 / secs / 1e6
    );
    assert_eq!(ab.0, ab.1, "sha256 of {len} bytes a -> b");
    assert_eq!(ba.0, ba.1, "sha256 of {len} bytes b -> a");
}

/// One ping of `size` payload bytes from `from` with DF (`-M do`) or
/// without (`-M dont`); returns whether a reply came and what ping said.
fn ping_size(lab: &Lab, from: &Node, to: &str, size: usize, df: bool) -> (bool, String) {
    let size = size.to_string();
    let pmtu = if df { "do" } else { "dont" };
    let out = lab.exec_with(
        from,
        &[
            "ping", "-n", "-c", "1", "-W", "2", "-M", pmtu, "-s", &size, to,
        ],
        None,
        Duration::from_secs(10),
    );
    let ok = out.ok();
    (ok, format!("{}{}", out.stdout, out.stderr))
}

/// The MTU edges for one address family; `header` is the IP + ICMP header
/// size (28 for IPv4, 48 for IPv6).
fn mtu_edges(lab: &Lab, from: &Node, to: &str, header: usize) {
    for (packet, what) in [
        (1280, "a 1280-byte packet"),
        (MTU, "a packet of exactly the MTU"),
    ] {
        let (ok, out) = ping_size(lab, from, to, packet - header, true);
        assert!(ok, "{what} to {to} with DF must cross in one piece:\n{out}");
    }
    let over = MTU + 1 - header;
    let (ok, out) = ping_size(lab, from, to, over, true);
    assert!(!ok, "MTU+1 to {to} with DF must not cross:\n{out}");
    // ping says "mtu=1420" for IPv4 and "mtu: 1420" for IPv6.
    assert!(
        out.contains("message too long") && out.contains(&MTU.to_string()),
        "MTU+1 with DF must be refused by the sender's stack at mtu {MTU}:\n{out}"
    );
    let (ok, out) = ping_size(lab, from, to, over, false);
    assert!(
        ok,
        "MTU+1 to {to} without DF must be fragmented and cross:\n{out}"
    );
}

/// MTU edges both ways and families, an IPv6 transfer, then bulk both ways.
fn path_checks(lab: Lab, offload: bool, bulk: usize) {
    let (a, b, (ag_a, ag_b)) = direct_pair(&lab, offload);
    mtu_edges(&lab, &a, B4, 28);
    mtu_edges(&lab, &b, A4, 28);
    assert!(
        lab.ping_within(&a, B6, Duration::from_secs(5)),
        "IPv6 a -> b"
    );
    mtu_edges(&lab, &a, B6, 48);
    mtu_edges(&lab, &b, A6, 48);
    let (sent, received) = tcp_transfer(&lab, &a, &b, B6.parse().expect("ip"), 5103, 32 * MB);
    assert_eq!(sent, received, "sha256 of 32 MB over the IPv6 overlay");
    both_ways(&lab, &a, &b, (A4, B4), bulk);
    assert!(
        ag_a.running(&lab) && ag_b.running(&lab),
        "agents still running"
    );
}

#[test]
fn offload_path_mtu_edges_ipv6_and_1gb_both_ways() {
    if let Some(lab) = Lab::new_or_skip() {
        path_checks(lab, true, 1024 * MB);
    }
}

#[test]
fn per_packet_path_mtu_edges_ipv6_and_bulk_both_ways() {
    if let Some(lab) = Lab::new_or_skip() {
        path_checks(lab, false, 128 * MB);
    }
}

/// Counts of what an [`Impairment`] did, summed over both directions.
#[derive(Default)]
struct ImpairCounts {
    forwarded: AtomicU64,
    dropped: AtomicU64,
    reordered: AtomicU64,
}

/// A UDP middlebox that forwards between two agents, losing and reordering
/// like netem. Side A talks to `near_a`, side B to `near_b`; each datagram
/// leaves from the other socket, so each agent sees one steady peer address.
struct Impairment {
    near_a: SocketAddr,
    near_b: SocketAddr,
    stop: Arc<AtomicBool>,
    counts: Arc<ImpairCounts>,
    threads: Vec<JoinHandle<()>>,
}

/// Percent of datagrams dropped and held back for reordering.
const LOSS_PCT: u64 = 1;
const REORDER_PCT: u64 = 25;
/// Longest a held-back datagram waits for a later one to overtake it.
const HOLD: Duration = Duration::from_millis(1);

impl Impairment {
    /// Binds ports 6001 (toward `a`) and 6002 (toward `b`) in `mid`.
    fn start(lab: &Lab, mid: &Node, a: SocketAddr, b: SocketAddr) -> Impairment {
        let ip = mid.ip;
        let (sa, sb) = lab
            .thread_in(mid, move || {
                let sa = UdpSocket::bind((ip, 6001)).expect("bind toward a");
                let sb = UdpSocket::bind((ip, 6002)).expect("bind toward b");
                (sa, sb)
            })
            .join()
            .expect("bind middlebox");
        let stop = Arc::new(AtomicBool::new(false));
        let counts = Arc::new(ImpairCounts::default());
        let mut threads = Vec::new();
        for (seed, rx, tx, to) in [
            (
                1,
                sa.try_clone().expect("clone"),
                sb.try_clone().expect("clone"),
                b,
            ),
            (
                2,
                sb.try_clone().expect("clone"),
                sa.try_clone().expect("clone"),
                a,
            ),
        ] {
            let (stop, counts) = (stop.clone(), counts.clone());
            threads.push(std::thread::spawn(move || {
                forward(seed, &rx, &tx, to, &stop, &counts)
            }));
        }
        Impairment {
            near_a: sa.local_addr().expect("addr"),
            near_b: sb.local_addr().expect("addr"),
            stop,
            counts,
            threads,
        }
    }
}

impl Drop for Impairment {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// One direction of the middlebox. Runs until `stop`; every receive is
/// bounded by a timeout, so it notices within 50 ms.
fn forward(
    seed: u64,
    rx: &UdpSocket,
    tx: &UdpSocket,
    to: SocketAddr,
    stop: &AtomicBool,
    counts: &ImpairCounts,
) {
    // xorshift64*: deterministic per direction, and no dependency.
    let mut state = 0x9e37_79b9_7f4a_7c15_u64 ^ seed;
    let mut percent = move || {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        state.wrapping_mul(0x2545_f491_4f6c_dd1d) % 100
    };
    let mut buf = vec![0u8; 65_536];
    let mut held = vec![0u8; 65_536];
    let mut held_len: Option<usize> = None;
    while !stop.load(Ordering::Relaxed) {
        let wait = if held_len.is_some() {
            HOLD
        } else {
            Duration::from_millis(50)
        };
        rx.set_read_timeout(Some(wait)).expect("read timeout");
        let n = match rx.recv_from(&mut buf) {
            Ok((n, _)) => n,
            Err(_) => {
                // Nothing overtook the held datagram in time: release it.
                if let Some(len) = held_len.take() {
                    let _ = tx.send_to(&held[..len], to);
                    counts.forwarded.fetch_add(1, Ordering::Relaxed);
                }
                continue;
            }
        };
        if percent() < LOSS_PCT {
            counts.dropped.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        if held_len.is_none() && percent() < REORDER_PCT {
            held[..n].copy_from_slice(&buf[..n]);
            held_len = Some(n);
            continue;
        }
        let _ = tx.send_to(&buf[..n], to);
        counts.forwarded.fetch_add(1, Ordering::Relaxed);
        if let Some(len) = held_len.take() {
            let _ = tx.send_to(&held[..len], to);
            counts.forwarded.fetch_add(1, Ordering::Relaxed);
            counts.reordered.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Two agents talking through the impairing middlebox; bulk both ways.
fn impaired(lab: Lab, offload: bool) {
    let (a, mid, b) = (lab.public("a"), lab.public("mid"), lab.public("b"));
    let imp = Impairment::start(&lab, &mid, sock(a.ip, PORT), sock(b.ip, PORT));
    let (ag_a, ag_b) = agents(&lab, (&a, &b), (imp.near_a, imp.near_b), offload);
    both_ways(&lab, &a, &b, (A4, B4), 16 * MB);
    let c = &imp.counts;
    let (fwd, dropped, reordered) = (
        c.forwarded.load(Ordering::Relaxed),
        c.dropped.load(Ordering::Relaxed),
        c.reordered.load(Ordering::Relaxed),
    );
    eprintln!("middlebox: {fwd} forwarded, {dropped} dropped, {reordered} reordered");
    // The path really was impaired: 32 MB is over 20,000 datagrams.
    assert!(dropped > 50, "datagrams dropped: {dropped}");
    assert!(reordered > 1000, "datagrams reordered: {reordered}");
    assert!(
        ag_a.running(&lab) && ag_b.running(&lab),
        "agents still running"
    );
}

#[test]
fn reordering_and_loss_offload_path() {
    if let Some(lab) = Lab::new_or_skip() {
        impaired(lab, true);
    }
}

#[test]
fn reordering_and_loss_per_packet_path() {
    if let Some(lab) = Lab::new_or_skip() {
        impaired(lab, false);
    }
}
