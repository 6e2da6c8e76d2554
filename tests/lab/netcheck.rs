//! Lab tests for endpoint discovery: `netcheck::run` behind each kind of
//! lab gateway must classify it correctly, and the port mapper must obtain
//! a working mapping from a real miniupnpd through each protocol in turn.
//!
//! The STUN servers are two public lab nodes, each answering on two ports
//! (four destinations, enough to see a sequential allocator's step). They
//! answer with warren's own codec, because the coordinator crate (whose
//! server is the production one) cannot be a dependency of this crate; the
//! coordinator's server is interop-tested against coturn on its own.

use crate::lab;

use std::net::{IpAddr, SocketAddr, SocketAddrV4, UdpSocket};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use lab::{Lab, Nat, Node};
use warren::netcheck::{self, MappingBehavior, PortAllocation, Report, Server};
use warren::portmap::{self, PortMapper, PortmapPresence, Protocol};
use warren::proto::stun::{self, Message};

const STUN_PORTS: [u16; 2] = [3478, 3479];
const IO_TIMEOUT: Duration = Duration::from_secs(5);

/// A STUN responder on `node` for each of [`STUN_PORTS`], alive for 60 s.
fn stun_server(lab: &Lab, node: &Node) -> Server {
    for port in STUN_PORTS {
        let (tx, rx) = mpsc::channel();
        lab.thread_in(node, move || {
            let sock = UdpSocket::bind(("0.0.0.0", port)).unwrap();
            sock.set_read_timeout(Some(Duration::from_millis(200)))
                .unwrap();
            tx.send(()).unwrap();
            let deadline = Instant::now() + Duration::from_secs(60);
            let mut buf = [0u8; 1500];
            while Instant::now() < deadline {
                let Ok((n, from)) = sock.recv_from(&mut buf) else {
                    continue;
                };
                if let Ok(msg) = Message::decode(&buf[..n]) {
                    let reply = stun::binding_response(msg.transaction_id, from, Some("lab"));
                    let _ = sock.send_to(&reply, from);
                }
            }
        });
        rx.recv_timeout(IO_TIMEOUT).unwrap();
    }
    Server {
        name: node.name.clone(),
        addrs: STUN_PORTS
            .iter()
            .map(|&p| SocketAddr::V4(SocketAddrV4::new(node.ip, p)))
            .collect(),
    }
}

/// Runs netcheck from `node`; returns the report and how long it took.
fn netcheck_from(
    lab: &Lab,
    node: &Node,
    servers: Vec<Server>,
    portmap: Option<portmap::Config>,
) -> (Report, Duration) {
    lab.thread_in(node, move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let started = Instant::now();
        let report = rt.block_on(async {
            let sock = tokio::net::UdpSocket::bind("0.0.0.0:0").await.unwrap();
            netcheck::run(vec![sock], servers, portmap, Duration::from_secs(5)).await
        });
        (report.unwrap(), started.elapsed())
    })
    .join()
    .unwrap()
}

/// A gateway of `nat` with one host behind it and two STUN servers on the
/// internet; the report as the host sees it.
fn classify_behind(nat: Nat) -> Option<(Report, Duration, Node)> {
    let lab = Lab::new_or_skip()?;
    let servers = vec![
        stun_server(&lab, &lab.public("s1")),
        stun_server(&lab, &lab.public("s2")),
    ];
    let gw = lab.gateway("gw", nat);
    let h = lab.host_behind(&gw, "h");
    let (report, took) = netcheck_from(&lab, &h, servers, None);
    eprintln!("{report}");
    assert!(
        took < Duration::from_millis(5500),
        "report within the deadline: {took:?}"
    );
    Some((report, took, gw))
}

#[test]
fn netcheck_no_nat() {
    let Some((r, _, _)) = classify_behind(Nat::None) else {
        return;
    };
    assert!(r.udp);
    assert_eq!(r.ipv4.mapping, MappingBehavior::NoNat);
    assert_eq!(r.ipv4.port_allocation, PortAllocation::Preserving);
    assert_eq!(r.hairpinning, None);
    assert!(r.preferred_server.is_some());
}

#[test]
fn netcheck_eim_masquerade() {
    let Some((r, _, gw)) = classify_behind(Nat::Eim) else {
        return;
    };
    assert_eq!(r.ipv4.global.map(|g| g.ip()), Some(IpAddr::V4(gw.ip)));
    assert_eq!(r.ipv4.mapping, MappingBehavior::EndpointIndependent);
    assert_eq!(r.ipv4.port_allocation, PortAllocation::Preserving);
    assert!(
        r.hairpinning.is_some(),
        "behind a NAT the hairpin test runs"
    );
}

#[test]
fn netcheck_edm_fully_random() {
    let Some((r, _, gw)) = classify_behind(Nat::Edm) else {
        return;
    };
    assert_eq!(r.ipv4.global.map(|g| g.ip()), Some(IpAddr::V4(gw.ip)));
    assert_eq!(r.ipv4.mapping, MappingBehavior::EndpointDependent);
    assert_eq!(r.ipv4.port_allocation, PortAllocation::Random);
}

#[test]
fn netcheck_edm_sequential() {
    let Some((r, _, _)) = classify_behind(Nat::EdmSequential) else {
        return;
    };
    assert_eq!(r.ipv4.mapping, MappingBehavior::EndpointDependent);
    assert_eq!(
        r.ipv4.port_allocation,
        PortAllocation::Sequential { step: 1 }
    );
    assert_eq!(r.ipv4.global.map(|g| g.port()), Some(lab::nat::SEQ_BASE));
}

#[test]
fn netcheck_udp_blocked() {
    let Some((r, took, _)) = classify_behind(Nat::UdpBlocked) else {
        return;
    };
    assert!(!r.udp);
    assert_eq!(r.ipv4.global, None);
    assert_eq!(r.preferred_server, None);
    assert!(
        took >= Duration::from_secs(3),
        "waited for retransmissions: {took:?}"
    );
}

#[test]
fn netcheck_sees_upnp_natpmp_and_pcp() {
    let Some(lab) = Lab::new_or_skip() else {
        return;
    };
    let servers = vec![
        stun_server(&lab, &lab.public("s1")),
        stun_server(&lab, &lab.public("s2")),
    ];
    let gw = lab.gateway("gw", Nat::Upnp);
    let h = lab.host_behind(&gw, "h");
    let (r, _) = netcheck_from(&lab, &h, servers, Some(portmap::Config::default()));
    eprintln!("{r}");
    assert_eq!(
        r.portmap,
        Some(PortmapPresence {
            upnp: true,
            natpmp: true,
            pcp: true
        })
    );
    assert_eq!(r.ipv4.mapping, MappingBehavior::EndpointIndependent);
}

/// For each protocol alone: the mapper gets a mapping from miniupnpd, a
/// public host reaches the agent's socket through it, and after shutdown a
/// new flow from outside no longer gets in.
#[test]
fn port_mapper_maps_through_each_protocol() {
    let Some(lab) = Lab::new_or_skip() else {
        return;
    };
    let s = lab.public("s");
    let gw = lab.gateway("gw", Nat::Upnp);
    let h = lab.host_behind(&gw, "h");
    for (i, protocol) in [Protocol::Pcp, Protocol::NatPmp, Protocol::Upnp]
        .into_iter()
        .enumerate()
    {
        let local_port = 47001 + i as u16;
        let config = portmap::Config {
            pcp: protocol == Protocol::Pcp,
            natpmp: protocol == Protocol::NatPmp,
            upnp: protocol == Protocol::Upnp,
            lifetime: Duration::from_secs(120),
            request_timeout: Duration::from_secs(3),
            ..portmap::Config::default()
        };
        let (mapped_tx, mapped_rx) = mpsc::channel();
        let (shut_tx, shut_rx) = mpsc::channel();
        let host = lab.thread_in(&h, move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            let sock = UdpSocket::bind(("0.0.0.0", local_port)).unwrap();
            sock.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
            let handle = rt.block_on(async {
                let handle = PortMapper::start(local_port, config);
                let mut updates = handle.subscribe();
                let _ = tokio::time::timeout(
                    Duration::from_secs(15),
                    updates.wait_for(|m| m.is_some()),
                )
                .await;
                handle
            });
            mapped_tx.send(handle.mapping()).unwrap();
            let mut buf = [0u8; 64];
            if let Ok((n, from)) = sock.recv_from(&mut buf) {
                sock.send_to(&buf[..n], from).unwrap();
            }
            rt.block_on(handle.shutdown());
            shut_tx.send(()).unwrap();
            // Anything arriving now came through a mapping that should be gone.
            sock.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
            sock.recv_from(&mut buf).is_ok()
        });
        let mapping = mapped_rx.recv_timeout(Duration::from_secs(30)).unwrap();
        let mapping = mapping.unwrap_or_else(|| panic!("{protocol}: no mapping"));
        assert_eq!(mapping.protocol, protocol);
        assert_eq!(
            mapping.external.ip(),
            IpAddr::V4(gw.ip),
            "{protocol}: WAN address"
        );
        let external = mapping.external;
        let outside = lab.thread_in(&s, move || {
            let sock = UdpSocket::bind("0.0.0.0:0").unwrap();
            sock.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
            sock.send_to(b"through the mapping", external).unwrap();
            let mut buf = [0u8; 64];
            let echoed = matches!(sock.recv_from(&mut buf), Ok((19, _)));
            shut_rx.recv_timeout(Duration::from_secs(20)).unwrap();
            // A fresh source port: a new flow, which only a mapping admits.
            let fresh = UdpSocket::bind("0.0.0.0:0").unwrap();
            for _ in 0..3 {
                fresh.send_to(b"after shutdown", external).unwrap();
                std::thread::sleep(Duration::from_millis(100));
            }
            echoed
        });
        assert!(
            outside.join().unwrap(),
            "{protocol}: traffic through the mapping"
        );
        assert!(
            !host.join().unwrap(),
            "{protocol}: mapping still open after shutdown"
        );
    }
}
