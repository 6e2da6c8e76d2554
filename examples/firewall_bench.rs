//! What the access policy costs the receiving data plane, per packet, in
//! one run: the firewall with no policy, with a 1,000-rule policy over
//! 1,000 peers (flows already in the connection table, and every packet a
//! new flow, the worst case: a walk over the rules), beside the reference,
//! WireGuard opening the same 64-byte packet (boringtun's decapsulate).
//!
//!   cargo run --release --example firewall_bench [-- PACKETS]
//!
//! (`tests/bench/throughput.sh` measures the tunnel end to end; this
//! isolates the filter, which only runs on the receiving side.)

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};
use std::time::Instant;

use boringtun::noise::{Tunn, TunnResult};
use ipnet::IpNet;
use warren::dataplane::firewall::{Firewall, FlowCache, Verdict};
use warren::keys::PrivateKey;
use warren::policy::{DstNet, FilterRule, PacketFilter, PortRange};

const ME: Ipv4Addr = Ipv4Addr::new(100, 64, 0, 1);
const PEERS: u32 = 1000;

fn peer(i: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(100, 65, 0, 0)) + i)
}

/// A 64-byte IPv4/UDP packet from `src:sport` to `ME:dport`.
fn udp(src: Ipv4Addr, sport: u16, dport: u16) -> Vec<u8> {
    let mut p = vec![0u8; 64];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&64u16.to_be_bytes());
    p[8] = 64;
    p[9] = 17;
    p[12..16].copy_from_slice(&src.octets());
    p[16..20].copy_from_slice(&ME.octets());
    p[20..22].copy_from_slice(&sport.to_be_bytes());
    p[22..24].copy_from_slice(&dport.to_be_bytes());
    p[24..26].copy_from_slice(&44u16.to_be_bytes());
    p
}

/// One rule per peer: peer i may reach port 1000+i.
fn policy() -> PacketFilter {
    PacketFilter::new(
        (0..PEERS)
            .map(|i| FilterRule {
                proto: vec![6, 17, 1, 58],
                src: vec![IpNet::from(IpAddr::V4(peer(i)))],
                dst: vec![DstNet {
                    net: IpNet::from(IpAddr::V4(ME)),
                    ports: PortRange {
                        first: 1000 + i as u16,
                        last: 1000 + i as u16,
                    },
                }],
            })
            .collect(),
    )
}

fn per_packet(label: &str, n: usize, reference: Option<f64>, mut f: impl FnMut(usize)) -> f64 {
    let t = Instant::now();
    for i in 0..n {
        f(i);
    }
    let ns = t.elapsed().as_nanos() as f64 / n as f64;
    match reference {
        Some(r) => println!(
            "{label:<52} {ns:>8.1} ns/packet  {:>6.1}% of the reference",
            ns / r * 100.0
        ),
        None => println!("{label:<52} {ns:>8.1} ns/packet  (reference)"),
    }
    ns
}

fn main() -> anyhow::Result<()> {
    let n: usize = std::env::args()
        .nth(1)
        .map_or(Ok(1_000_000), |s| s.parse())?;
    // Packets of established flows: each peer on its own port.
    let flows: Vec<Vec<u8>> = (0..PEERS)
        .map(|i| udp(peer(i), 40000, 1000 + i as u16))
        .collect();

    // The reference: boringtun opening a sealed 64-byte packet.
    let (a, b) = (PrivateKey::generate(), PrivateKey::generate());
    let mut ta = Tunn::new(
        a.secret().clone(),
        b.public().to_x25519(),
        None,
        None,
        1,
        None,
    );
    let mut tb = Tunn::new(
        b.secret().clone(),
        a.public().to_x25519(),
        None,
        None,
        2,
        None,
    );
    let (mut buf, mut out) = (vec![0u8; 2048], vec![0u8; 2048]);
    // Handshake in memory: init, response, then a first data packet.
    let init = match ta.format_handshake_initiation(&mut buf, false) {
        TunnResult::WriteToNetwork(p) => p.to_vec(),
        _ => anyhow::bail!("no handshake initiation"),
    };
    let resp = match tb.decapsulate(None, &init, &mut out) {
        TunnResult::WriteToNetwork(p) => p.to_vec(),
        _ => anyhow::bail!("no handshake response"),
    };
    let _ = ta.decapsulate(None, &resp, &mut out);
    let sealed: Vec<Vec<u8>> = (0..1024)
        .map(
            |i| match ta.encapsulate(&flows[i % flows.len()], &mut buf) {
                TunnResult::WriteToNetwork(p) => p.to_vec(),
                _ => Vec::new(),
            },
        )
        .collect();
    anyhow::ensure!(sealed.iter().all(|s| !s.is_empty()), "sealing failed");
    // Replay protection would refuse repeats: open each sealed packet once,
    // then time fresh ones sealed in the loop (seal + open, halved).
    let wg = per_packet("WireGuard seal + open, halved", n, None, |i| {
        let p = &flows[i % flows.len()];
        if let TunnResult::WriteToNetwork(s) = ta.encapsulate(p, &mut buf) {
            black_box(tb.decapsulate(None, s, &mut out).is_err_free());
        }
    }) / 2.0;
    println!(
        "{:<52} {wg:>8.1} ns/packet  (the reference below)",
        "  = one WireGuard open"
    );

    // The same for a full-size packet, where the filter's share is smaller.
    let big: Vec<u8> = {
        let mut p = udp(peer(0), 40000, 1000);
        p.resize(1400, 0);
        p[2..4].copy_from_slice(&1400u16.to_be_bytes());
        p
    };
    let wg_big = per_packet(
        "WireGuard seal + open of 1,400 bytes, halved",
        n / 4,
        None,
        |_| {
            if let TunnResult::WriteToNetwork(s) = ta.encapsulate(&big, &mut buf) {
                black_box(tb.decapsulate(None, s, &mut out).is_err_free());
            }
        },
    ) / 2.0;
    println!(
        "{:<52} {wg_big:>8.1} ns/packet",
        "  = one WireGuard open of 1,400 bytes"
    );

    let now = Instant::now();
    let open = Firewall::default();
    per_packet(
        "firewall, no policy, no local addresses (static config)",
        n,
        Some(wg),
        |i| {
            black_box(open.inbound(&flows[i % flows.len()], now) == Verdict::Pass);
        },
    );
    open.set_local(vec![IpNet::from(IpAddr::V4(ME))]);
    per_packet(
        "firewall, no policy (mesh: own addresses checked)",
        n,
        Some(wg),
        |i| {
            black_box(open.inbound(&flows[i % flows.len()], now) == Verdict::Pass);
        },
    );
    let fw = Firewall::default();
    fw.set_filter(policy());
    for f in &flows {
        assert_eq!(fw.inbound(f, now), Verdict::Pass);
    }
    let est = per_packet(
        "firewall, 1,000 rules, established flows",
        n,
        Some(wg),
        |i| {
            black_box(fw.inbound(&flows[i % flows.len()], now) == Verdict::Pass);
        },
    );
    println!(
        "{:<52} {:>8.1}%",
        "  = as a share of one 1,400-byte open",
        est / wg_big * 100.0
    );
    // What the packet tasks do: a busy flow's packets come in runs, and
    // each task's FlowCache answers them without the shared table.
    let mut cache = FlowCache::default();
    let one = &flows[0];
    per_packet(
        "firewall, 1,000 rules, a busy flow (task's cache)",
        n,
        Some(wg),
        |_| {
            black_box(fw.inbound_cached(&mut cache, one, now) == Verdict::Pass);
        },
    );
    // New flows: a fresh source port each time (the table evicts as it
    // fills), so every packet walks the rules.
    let fresh: Vec<Vec<u8>> = (0..65536u32)
        .map(|i| {
            udp(
                peer(i % PEERS),
                (i / PEERS) as u16 + 1,
                1000 + (i % PEERS) as u16,
            )
        })
        .collect();
    let fw_new = Firewall::default();
    fw_new.set_filter(policy());
    per_packet(
        "firewall, 1,000 rules, every packet a new flow",
        n.min(65536),
        Some(wg),
        |i| {
            black_box(fw_new.inbound(&fresh[i], now) == Verdict::Pass);
        },
    );
    let denied = udp(Ipv4Addr::new(100, 66, 0, 1), 1, 1);
    per_packet(
        "firewall, 1,000 rules, denied (walks every rule)",
        n.min(65536),
        Some(wg),
        |_| {
            black_box(fw.inbound(&denied, now) == Verdict::Policy);
        },
    );
    Ok(())
}

trait ErrFree {
    fn is_err_free(&self) -> bool;
}

impl ErrFree for TunnResult<'_> {
    fn is_err_free(&self) -> bool {
        !matches!(self, TunnResult::Err(_))
    }
}
