//! Deterministic netcheck scenarios: the state machine against a simulated
//! NAT and simulated STUN servers on a virtual clock. No sockets, no sleeps:
//! the loop jumps the clock to the next event (a delivery or the machine's
//! own timeout), quinn-proto style.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::*;
use crate::portmap::PortmapPresence;

mod provisional;
use crate::proto::stun::{self, Class, Message, TransactionId};

#[derive(Debug, Clone, Copy)]
enum Nat {
    /// Public address on the host itself.
    None,
    /// One mapping for every destination (Linux `masquerade`), with the
    /// given external port.
    Eim { port: u16 },
    /// New random port per destination (`masquerade fully-random`).
    EdmRandom,
    /// New port per destination, `step` above the previous one.
    EdmSequential { step: u16 },
    /// Nothing leaves.
    Blocked,
}

const LOCAL: &str = "10.0.0.2:5000";
const PUBLIC: &str = "198.51.100.7";
/// What the TCP STUN answer of a scenario saw.
const TCP_PUBLIC: SocketAddr =
    SocketAddr::new(IpAddr::V4(std::net::Ipv4Addr::new(198, 51, 100, 7)), 41641);

struct Sim {
    nat: Nat,
    hairpin: bool,
    /// One-way delay per server address; absent = server down.
    servers: HashMap<SocketAddr, Duration>,
    /// Drop this many requests per server address before answering.
    lose_first: HashMap<SocketAddr, u32>,
    mappings: HashMap<SocketAddr, SocketAddr>,
    next_port: u16,
    rng: StdRng,
    in_flight: Vec<(Instant, SocketAddr, Vec<u8>)>,
}

impl Sim {
    fn new(nat: Nat) -> Self {
        Self {
            nat,
            hairpin: false,
            servers: HashMap::new(),
            lose_first: HashMap::new(),
            mappings: HashMap::new(),
            next_port: 20000,
            rng: StdRng::seed_from_u64(99),
            in_flight: Vec::new(),
        }
    }

    fn server(mut self, addr: &str, one_way_ms: u64) -> Self {
        self.servers
            .insert(addr.parse().unwrap(), Duration::from_millis(one_way_ms));
        self
    }

    fn local(&self) -> SocketAddr {
        LOCAL.parse().unwrap()
    }

    /// The NAT's mapping for a destination, allocating on first use.
    fn map(&mut self, dest: SocketAddr) -> SocketAddr {
        if dest.is_ipv6() {
            return "[2001:db8::2]:5000".parse().unwrap();
        }
        if let Some(m) = self.mappings.get(&dest) {
            return *m;
        }
        let public: IpAddr = PUBLIC.parse().unwrap();
        let port = match self.nat {
            Nat::None | Nat::Blocked => return self.local(),
            Nat::Eim { port } => port,
            Nat::EdmRandom => self.rng.gen_range(1024..=65535),
            Nat::EdmSequential { step } => {
                self.next_port += step;
                self.next_port
            }
        };
        let m = SocketAddr::new(public, port);
        self.mappings.insert(dest, m);
        m
    }

    fn send(&mut self, now: Instant, dest: SocketAddr, bytes: Vec<u8>) {
        if matches!(self.nat, Nat::Blocked) {
            return;
        }
        let src = self.map(dest);
        if self.mappings.values().any(|m| *m == dest) {
            // Addressed to one of our own mappings: hairpin or drop.
            if self.hairpin {
                self.in_flight
                    .push((now + Duration::from_millis(1), src, bytes));
            }
            return;
        }
        let Some(&delay) = self.servers.get(&dest) else {
            return;
        };
        if let Some(n) = self.lose_first.get_mut(&dest) {
            if *n > 0 {
                *n -= 1;
                return;
            }
        }
        let msg = Message::decode(&bytes).unwrap();
        assert_eq!(msg.class, Class::Request);
        let reply = stun::binding_response(msg.transaction_id, src, Some("sim"));
        self.in_flight.push((now + 2 * delay, dest, reply));
    }
}

fn config(servers: &[(&str, &[&str])]) -> Config {
    Config {
        servers: servers
            .iter()
            .map(|(name, addrs)| Server {
                name: (*name).to_owned(),
                addrs: addrs.iter().map(|a| a.parse().unwrap()).collect(),
            })
            .collect(),
        local_v4: Some(LOCAL.parse().unwrap()),
        local_v6: Some("[2001:db8::2]:5000".parse().unwrap()),
        seed: 1,
        ..Config::default()
    }
}

/// Two servers, two ports each: four destinations, as the coordinator and a
/// relay each listening on a second port would give.
fn four_dests() -> Config {
    config(&[
        ("a", &["192.0.2.1:3478", "192.0.2.1:3479"]),
        ("b", &["203.0.113.1:3478", "203.0.113.1:3479"]),
    ])
}

fn with_servers(nat: Nat, cfg: &Config) -> Sim {
    let mut sim = Sim::new(nat);
    for (i, s) in cfg.servers.iter().enumerate() {
        for a in &s.addrs {
            sim = sim.server(&a.to_string(), 10 + 10 * i as u64);
        }
    }
    sim
}

/// Runs the machine to its report; returns the report and when it came.
fn run(
    sim: &mut Sim,
    cfg: Config,
    portmap_at: Option<(Duration, PortmapPresence)>,
) -> (Report, Duration, Netcheck) {
    run_observed(sim, cfg, portmap_at, None, |_, _| {})
}

/// [`run`], telling the machine at `tcp.0` that a server answered over TCP
/// in `tcp.1`, and showing it to `observe` after every step.
fn run_observed(
    sim: &mut Sim,
    cfg: Config,
    mut portmap_at: Option<(Duration, PortmapPresence)>,
    mut tcp: Option<(Duration, Duration)>,
    mut observe: impl FnMut(Duration, &Netcheck),
) -> (Report, Duration, Netcheck) {
    let start = Instant::now();
    let mut now = start;
    let mut nc = Netcheck::new(now, cfg);
    for _ in 0..10_000 {
        while let Some((dest, bytes)) = nc.poll_transmit(now) {
            sim.send(now, dest, bytes);
        }
        observe(now - start, &nc);
        if let Some(report) = nc.poll_report() {
            return (report, now - start, nc);
        }
        let portmap_due = portmap_at.map(|(d, _)| start + d);
        let next = [
            nc.poll_timeout(),
            sim.in_flight.iter().map(|(t, _, _)| *t).min(),
            portmap_due,
            tcp.map(|(at, _)| start + at),
        ]
        .into_iter()
        .flatten()
        .min()
        .expect("the machine always has a deadline until it reports");
        assert!(next >= now, "time never goes back");
        now = next;
        let (due, later): (Vec<_>, Vec<_>) =
            sim.in_flight.drain(..).partition(|(t, _, _)| *t <= now);
        sim.in_flight = later;
        for (_, from, bytes) in due {
            let _ = nc.handle_stun(now, from, &bytes);
        }
        if let Some((d, presence)) = portmap_at {
            if start + d <= now {
                nc.handle_portmap(presence);
                portmap_at = None;
            }
        }
        if let Some((at, rtt)) = tcp {
            if start + at <= now {
                nc.handle_tcp_answer(rtt, TCP_PUBLIC);
                tcp = None;
            }
        }
        nc.handle_timeout(now);
    }
    panic!("netcheck did not finish");
}

#[test]
fn no_nat() {
    let cfg = four_dests();
    let mut sim = with_servers(Nat::None, &cfg);
    let (r, took, _) = run(&mut sim, cfg, None);
    assert!(r.udp);
    assert_eq!(r.ipv4.global, Some(LOCAL.parse().unwrap()));
    assert_eq!(r.ipv4.mapping, MappingBehavior::NoNat);
    assert_eq!(r.ipv4.port_allocation, PortAllocation::Preserving);
    assert_eq!(r.hairpinning, None, "no NAT, nothing to hairpin");
    assert!(!r.ipv6.works);
    assert!(
        took < Duration::from_millis(100),
        "all answered quickly: {took:?}"
    );
}

#[test]
fn eim_masquerade_preserving_without_hairpin() {
    let cfg = four_dests();
    let mut sim = with_servers(Nat::Eim { port: 5000 }, &cfg);
    let (r, took, _) = run(&mut sim, cfg, None);
    assert_eq!(
        r.ipv4.global,
        Some(format!("{PUBLIC}:5000").parse().unwrap())
    );
    assert_eq!(r.ipv4.mapping, MappingBehavior::EndpointIndependent);
    assert_eq!(r.ipv4.port_allocation, PortAllocation::Preserving);
    assert_eq!(r.hairpinning, Some(false));
    // Waited out the hairpin timeout after the last answer (40 ms RTT).
    assert!(
        took >= Duration::from_millis(1000) && took < Duration::from_millis(1100),
        "{took:?}"
    );
}

#[test]
fn eim_with_hairpinning_and_other_port() {
    let cfg = four_dests();
    let mut sim = with_servers(Nat::Eim { port: 41641 }, &cfg);
    sim.hairpin = true;
    let (r, took, _) = run(&mut sim, cfg, None);
    assert_eq!(r.ipv4.mapping, MappingBehavior::EndpointIndependent);
    assert_eq!(r.ipv4.port_allocation, PortAllocation::Unknown);
    assert_eq!(r.hairpinning, Some(true));
    assert!(took < Duration::from_millis(100), "{took:?}");
}

#[test]
fn edm_random() {
    let cfg = four_dests();
    let mut sim = with_servers(Nat::EdmRandom, &cfg);
    let (r, _, _) = run(&mut sim, cfg, None);
    assert_eq!(r.ipv4.mapping, MappingBehavior::EndpointDependent);
    assert_eq!(r.ipv4.port_allocation, PortAllocation::Random);
    let mapped: Vec<_> = r
        .servers
        .iter()
        .flat_map(|s| &s.probes)
        .filter_map(|p| p.mapped)
        .collect();
    assert_eq!(mapped.len(), 4);
}

#[test]
fn edm_sequential_step_two() {
    let cfg = four_dests();
    let mut sim = with_servers(Nat::EdmSequential { step: 2 }, &cfg);
    let (r, _, _) = run(&mut sim, cfg, None);
    assert_eq!(r.ipv4.mapping, MappingBehavior::EndpointDependent);
    assert_eq!(
        r.ipv4.port_allocation,
        PortAllocation::Sequential { step: 2 }
    );
    // The first destination in config order got the first port.
    assert_eq!(r.ipv4.global.map(|g| g.port()), Some(20002));
    // Traversal predicts from the last port handed out: the fourth
    // probe got 20008, and the hairpin request after it (to our own
    // mapping, a destination of its own) 20010.
    assert!(r.hairpinning.is_some(), "the hairpin test ran");
    let summary = crate::traversal::NatSummary::from(&r);
    assert_eq!(
        summary.allocation,
        crate::traversal::Allocation::Sequential { step: 2 }
    );
    assert_eq!(summary.observed.map(|o| o.port()), Some(20010));
}

#[test]
fn udp_blocked_reports_within_deadline() {
    let cfg = four_dests();
    let mut sim = with_servers(Nat::Blocked, &cfg);
    let (r, took, _) = run(&mut sim, cfg.clone(), None);
    assert!(!r.udp);
    assert_eq!(r.ipv4, FamilyReport::default());
    assert_eq!(r.preferred_server, None);
    assert!(r.servers.iter().all(|s| s.latency.is_none()));
    // 4 attempts at 0, 250, 750, 1750 ms; given up at 3750 ms.
    assert_eq!(took, Duration::from_millis(3750));

    // Even with a slower schedule and a portmap result that never comes,
    // the deadline closes the report.
    let slow = Config {
        initial_rto: Duration::from_secs(2),
        expect_portmap: true,
        ..cfg
    };
    let (r, took, _) = run(&mut Sim::new(Nat::Blocked), slow, None);
    assert_eq!(took, Duration::from_secs(5));
    assert_eq!(r.portmap, None);
}

#[test]
fn retransmission_recovers_loss_and_measures_last_attempt() {
    let cfg = config(&[("a", &["192.0.2.1:3478"]), ("b", &["203.0.113.1:3478"])]);
    let mut sim = Sim::new(Nat::Eim { port: 5000 })
        .server("192.0.2.1:3478", 15)
        .server("203.0.113.1:3478", 30);
    sim.hairpin = true;
    sim.lose_first.insert("192.0.2.1:3478".parse().unwrap(), 2);
    let (r, _, _) = run(&mut sim, cfg, None);
    let a = &r.servers[0];
    assert_eq!(
        a.latency,
        Some(Duration::from_millis(30)),
        "RTT of the third attempt alone"
    );
    assert_eq!(r.servers[1].latency, Some(Duration::from_millis(60)));
    assert_eq!(r.preferred_server.as_deref(), Some("a"));
}

#[test]
fn one_server_down_and_preferred_is_fastest() {
    let cfg = config(&[
        ("down", &["192.0.2.9:3478"]),
        ("slow", &["192.0.2.1:3478"]),
        ("fast", &["203.0.113.1:3478"]),
    ]);
    let mut sim = Sim::new(Nat::Eim { port: 5000 })
        .server("192.0.2.1:3478", 40)
        .server("203.0.113.1:3478", 5);
    sim.hairpin = true;
    let (r, took, _) = run(&mut sim, cfg, None);
    assert_eq!(r.preferred_server.as_deref(), Some("fast"));
    assert_eq!(r.servers[0].latency, None);
    assert_eq!(r.ipv4.mapping, MappingBehavior::EndpointIndependent);
    assert_eq!(
        took,
        Duration::from_millis(3750),
        "waited for the dead server's attempts"
    );
}

#[test]
fn ipv6_global_address() {
    let cfg = config(&[("a", &["192.0.2.1:3478", "[2001:db8:ffff::1]:3478"])]);
    let mut sim = with_servers(Nat::Eim { port: 5000 }, &cfg);
    sim.hairpin = true;
    let (r, _, _) = run(&mut sim, cfg, None);
    assert!(r.ipv6.works);
    assert_eq!(r.ipv6.global, Some("[2001:db8::2]:5000".parse().unwrap()));
    assert_eq!(r.ipv6.mapping, MappingBehavior::NoNat);
    assert_eq!(
        r.ipv4.mapping,
        MappingBehavior::Unknown,
        "one IPv4 destination only"
    );
}

#[test]
fn portmap_result_is_waited_for_and_reported() {
    let mut cfg = four_dests();
    cfg.expect_portmap = true;
    let presence = PortmapPresence {
        upnp: true,
        natpmp: false,
        pcp: true,
    };
    let mut sim = with_servers(Nat::None, &cfg);
    let (r, took, _) = run(&mut sim, cfg, Some((Duration::from_millis(1500), presence)));
    assert_eq!(r.portmap, Some(presence));
    assert_eq!(took, Duration::from_millis(1500));
}

#[test]
fn forged_and_malformed_answers_are_counted_not_accepted() {
    let cfg = config(&[("a", &["192.0.2.1:3478"])]);
    let server: SocketAddr = "192.0.2.1:3478".parse().unwrap();
    let now = Instant::now();
    let mut nc = Netcheck::new(now, cfg);
    let (dest, req) = nc.poll_transmit(now).unwrap();
    assert_eq!(dest, server);
    let tx = Message::decode(&req).unwrap().transaction_id;
    let evil: SocketAddr = "6.6.6.6:666".parse().unwrap();

    let unknown_tx = stun::binding_response(TransactionId([0xEE; 12]), evil, None);
    assert_eq!(
        nc.handle_stun(now, server, &unknown_tx),
        Err(InputError::Stun(stun::StunError::WrongTransaction))
    );
    let right_tx_wrong_source = stun::binding_response(tx, evil, None);
    assert!(matches!(
        nc.handle_stun(now, evil, &right_tx_wrong_source),
        Err(InputError::WrongSource { .. })
    ));
    let mut truncated = stun::binding_response(tx, evil, None);
    truncated.truncate(30);
    assert!(nc.handle_stun(now, server, &truncated).is_err());
    assert!(
        nc.handle_stun(now, server, &req).is_err(),
        "a request is not an answer"
    );

    let real: SocketAddr = "198.51.100.7:5000".parse().unwrap();
    let later = now + Duration::from_millis(20);
    nc.handle_stun(later, server, &stun::binding_response(tx, real, None))
        .unwrap();
    // Drain the hairpin probe; nobody answers it.
    while nc.poll_transmit(later).is_some() {}
    nc.handle_timeout(later + Duration::from_secs(2));
    let r = nc.poll_report().unwrap();
    assert_eq!(r.ipv4.global, Some(real));
    assert_eq!(
        r.rejected,
        Rejected {
            malformed: 1,
            // The unknown id, and our own request (no hairpin test pending).
            wrong_transaction: 2,
            wrong_source: 1,
            unusable: 0,
        }
    );
    // After the report, nothing changes it.
    nc.handle_stun(later, server, &stun::binding_response(tx, evil, None))
        .unwrap();
    assert_eq!(nc.poll_report().unwrap(), r);
    assert_eq!(nc.poll_transmit(later), None);
    assert_eq!(nc.poll_timeout(), None);
}

/// The "bad input" list, each carrying the right transaction id
/// and a forged mapped address, from the server's own address: every one
/// is dropped and counted, and the forged address never becomes the
/// endpoint (with no good answer, the report says UDP does not work).
#[test]
fn bad_answers_from_the_server_are_counted_and_never_an_endpoint() {
    let cfg = config(&[("a", &["192.0.2.1:3478"])]);
    let server: SocketAddr = "192.0.2.1:3478".parse().unwrap();
    let now = Instant::now();
    let mut nc = Netcheck::new(now, cfg);
    let (_, req) = nc.poll_transmit(now).unwrap();
    let tx = Message::decode(&req).unwrap().transaction_id;
    let evil: SocketAddr = "6.6.6.6:666".parse().unwrap();
    let good = stun::binding_response(tx, evil, None);

    let truncated = good[..10].to_vec();
    let cut_after_header = good[..good.len() - 4].to_vec();
    let mut oversized = good.clone();
    oversized.resize(stun::MAX_MESSAGE_LEN + 4, 0);
    let len = u16::try_from(oversized.len() - stun::HEADER_LEN).unwrap();
    oversized[2..4].copy_from_slice(&len.to_be_bytes());
    let mut wrong_cookie = good.clone();
    wrong_cookie[4] ^= 0xFF;
    let mut attr_overflow = good.clone();
    attr_overflow[stun::HEADER_LEN + 2..stun::HEADER_LEN + 4]
        .copy_from_slice(&200u16.to_be_bytes());
    let malformed = [
        truncated,
        cut_after_header,
        oversized,
        wrong_cookie,
        attr_overflow,
    ];
    for (i, bytes) in malformed.iter().enumerate() {
        assert!(
            matches!(nc.handle_stun(now, server, bytes), Err(InputError::Stun(_))),
            "bad input {i} accepted"
        );
    }
    let mut other_tx = tx;
    other_tx.0[0] ^= 1;
    assert_eq!(
        nc.handle_stun(now, server, &stun::binding_response(other_tx, evil, None)),
        Err(InputError::Stun(stun::StunError::WrongTransaction))
    );

    while nc.poll_transmit(now).is_some() {}
    nc.handle_timeout(now + Duration::from_secs(10));
    let r = nc.poll_report().unwrap();
    assert!(!r.udp, "{r:?}");
    assert_eq!(r.ipv4.global, None);
    assert!(
        r.servers
            .iter()
            .flat_map(|s| &s.probes)
            .all(|p| p.mapped.is_none()),
        "{r:?}"
    );
    assert_eq!(
        r.rejected,
        Rejected {
            malformed: 5,
            wrong_transaction: 1,
            wrong_source: 0,
            unusable: 0,
        }
    );
}

#[test]
fn report_display_and_json() {
    let cfg = four_dests();
    let mut sim = with_servers(Nat::EdmSequential { step: 1 }, &cfg);
    let (r, _, _) = run(
        &mut sim,
        cfg,
        Some((Duration::ZERO, PortmapPresence::default())),
    );
    let text = r.to_string();
    assert!(text.contains("UDP: true"), "{text}");
    assert!(text.contains("varies by destination"), "{text}");
    assert!(text.contains("sequential, step 1"), "{text}");
    assert!(text.contains("Preferred server: a"), "{text}");
    let json = serde_json::to_string(&r).unwrap();
    assert!(json.contains("\"latency\":20.0"), "{json}");
    assert!(
        json.contains("\"kind\":\"sequential\",\"step\":1"),
        "{json}"
    );
    let back: Report = serde_json::from_str(&json).unwrap();
    assert_eq!(back, r);
}

#[test]
fn classify_edge_cases() {
    use super::report::classify;
    let d = |i: u16| -> SocketAddr { format!("192.0.2.{i}:3478").parse().unwrap() };
    let m = |p: u16| -> SocketAddr { format!("{PUBLIC}:{p}").parse().unwrap() };
    // Mixed directions or large gaps are random.
    let zigzag = [(d(1), m(1000)), (d(2), m(1003)), (d(3), m(1001))];
    assert_eq!(
        classify(None, &zigzag).port_allocation,
        PortAllocation::Random
    );
    // Descending allocators are sequential with a negative step; the
    // smallest gap is the step when others' allocations interleave.
    let down = [(d(1), m(3000)), (d(2), m(2999)), (d(3), m(2996))];
    assert_eq!(
        classify(None, &down).port_allocation,
        PortAllocation::Sequential { step: -1 }
    );
    // Nothing answered: all unknown.
    assert_eq!(classify(None, &[]), FamilyReport::default());
}
