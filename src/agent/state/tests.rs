//! The agent state's rules, driven the way the mesh task drives it, with
//! a virtual clock: joining, netcheck and the home relay, reports to the
//! coordinator, map peers, housekeeping and address changes, ping rounds,
//! leaving. (The whole state over a simulated network: `tests/sim`.)

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use super::discovery::Sources;
use super::*;
use crate::api::mesh::MeshState;
use crate::control::follow::MapEvent;
use crate::control::netmap::NetMap;
use crate::control::types::{EndpointKind, Peer, RegisterResponse, RelayRegion};
use crate::proto::stun::{self, Message};

const LOCAL: &str = "10.0.0.2:41641";
const MAPPED: &str = "198.51.100.7:41641";
const FAR: &str = "192.0.2.10:3478";
const NEAR: &str = "192.0.2.20:3478";

fn relay_map(with_stun: bool) -> RelayMap {
    let region = |id: u16, stun: &str| RelayRegion {
        id,
        name: format!("r{id}"),
        url: format!("https://relay{id}.example/relay"),
        stun: if with_stun {
            vec![stun.parse().unwrap()]
        } else {
            Vec::new()
        },
        key: None,
    };
    RelayMap {
        regions: vec![region(1, FAR), region(2, NEAR)],
    }
}

pub(super) fn new_state() -> AgentState {
    let key = crate::keys::PrivateKey::generate().public();
    let settings = Settings {
        traversal: crate::traversal::Config::default(),
        tcp_port: 41641,
    };
    AgentState::new(settings, key, DiscoSecret::from_bytes([7; 32]), 1)
}

pub(super) fn drain(s: &mut AgentState) -> Vec<Output> {
    std::iter::from_fn(|| s.poll_output()).collect()
}

pub(super) fn me() -> Peer {
    Peer::for_test(1, "fd7a:115c:a1e0::1")
}

pub(super) fn registration(with_stun: bool) -> RegisterResponse {
    let me = me();
    RegisterResponse {
        node_id: 1,
        name: "me".into(),
        ipv4: me.ipv4,
        ipv6: me.ipv6,
        ephemeral: false,
        relay_map: relay_map(with_stun),
    }
}

/// Joins and follows; returns the outputs of joining.
pub(super) fn join(s: &mut AgentState, now: Instant, with_stun: bool) -> Vec<Output> {
    s.begin();
    s.registered(now, &registration(with_stun), false);
    s.follow(now, None);
    drain(s)
}

pub(super) fn full_map(peers: &[&Peer]) -> MapEvent {
    let me = me();
    MapEvent::Full {
        map: NetMap {
            coordinator_key: me.key,
            self_node: me,
            peers: peers
                .iter()
                .map(|p| (p.key, (*p).clone()))
                .collect::<BTreeMap<_, _>>(),
            relay_map: relay_map(true),
            packet_filter: None,
            dns: None,
        },
        from_cache: false,
    }
}

/// The coordinator accepts every report in `out`.
fn accept_reports(s: &mut AgentState, now: Instant, out: &[Output]) {
    for o in out {
        if let Output::Report { report, .. } = o {
            s.handle_reported(now, report.clone(), Ok(()));
        }
    }
}

pub(super) fn host() -> Vec<Endpoint> {
    vec![Endpoint {
        addr: LOCAL.parse().unwrap(),
        kind: EndpointKind::Host,
    }]
}

/// Runs a netcheck the state asked for: every probe is answered with
/// [`MAPPED`], the far server after 40 ms and the near one after 5 ms;
/// returns every output up to and including the run's `NetcheckDone`.
fn run_netcheck(s: &mut AgentState, now: &mut Instant) -> Vec<Output> {
    run_netcheck_on(s, now, host())
}

/// [`run_netcheck`] on a host whose addresses are `endpoints`.
fn run_netcheck_on(s: &mut AgentState, now: &mut Instant, endpoints: Vec<Endpoint>) -> Vec<Output> {
    let sources = Sources {
        v4: Some(LOCAL.parse().unwrap()),
        v6: None,
    };
    s.start_netcheck(*now, sources, endpoints);
    let mut seen = Vec::new();
    let mut replies: Vec<(Instant, SocketAddr, Vec<u8>)> = Vec::new();
    for _ in 0..10_000 {
        let mut finished = false;
        for o in drain(s) {
            if let Output::Stun { to, bytes } = &o {
                let msg = Message::decode(bytes).unwrap();
                let rtt = if to.to_string() == NEAR { 5 } else { 40 };
                let reply =
                    stun::binding_response(msg.transaction_id, MAPPED.parse().unwrap(), None);
                replies.push((*now + Duration::from_millis(rtt), *to, reply));
                continue;
            }
            finished |= matches!(o, Output::NetcheckDone(_));
            seen.push(o);
        }
        if finished {
            return seen;
        }
        let next = replies
            .iter()
            .map(|r| r.0)
            .chain(s.poll_timeout())
            .min()
            .expect("a netcheck run always has a deadline");
        *now = next.max(*now);
        let (due, later): (Vec<_>, Vec<_>) = replies.into_iter().partition(|r| r.0 <= *now);
        replies = later;
        for (_, from, bytes) in due {
            s.handle_udp(*now, SocketId::PRIMARY, from, &bytes);
        }
        s.handle_timeout(*now);
    }
    panic!("netcheck never finished");
}

#[test]
fn joining_relays_from_the_first_region_then_moves_home_to_the_nearest() {
    let mut now = Instant::now();
    let mut s = new_state();
    let out = join(&mut s, now, true);
    assert!(out
        .iter()
        .any(|o| matches!(o, Output::Relay(RelayCmd::Map(_)))));
    assert!(out.iter().any(|o| matches!(
        o,
        Output::Relay(RelayCmd::Home {
            id: 1,
            measured: false
        })
    )));
    assert!(out.iter().any(|o| matches!(o, Output::StartPortmap)));
    assert!(out.iter().any(|o| matches!(o, Output::TcpStun(_))));
    assert!(out.iter().any(|o| matches!(o, Output::Addresses { .. })));
    let wanted = out.iter().find_map(|o| match o {
        Output::Netcheck { v4, v6 } => Some((*v4, *v6)),
        _ => None,
    });
    assert_eq!(wanted, Some((Some(FAR.parse().unwrap()), None)));

    let out = run_netcheck(&mut s, &mut now);
    assert!(
        out.iter().any(|o| matches!(
            o,
            Output::Relay(RelayCmd::Home {
                id: 2,
                measured: true
            })
        )),
        "{out:?}"
    );
    let report = out.iter().find_map(|o| match o {
        Output::Report { report, netcheck } => Some((report.clone(), netcheck.is_some())),
        _ => None,
    });
    let (report, with_netcheck) = report.expect("the run's candidates are reported");
    assert!(with_netcheck);
    assert_eq!(report.home_relay, Some(2));
    let addrs: Vec<String> = report
        .endpoints
        .iter()
        .map(|e| e.addr.to_string())
        .collect();
    assert_eq!(addrs, [LOCAL, MAPPED]);
    assert_eq!(s.status().home_relay.as_deref(), Some("r2"));
}

#[test]
fn one_report_at_a_time_none_unchanged_and_a_permanent_refusal_leaves() {
    let mut now = Instant::now();
    let mut s = new_state();
    join(&mut s, now, true);
    let reports = |out: &[Output]| {
        out.iter()
            .filter_map(|o| match o {
                Output::Report { report, .. } => Some(report.clone()),
                _ => None,
            })
            .collect::<Vec<_>>()
    };
    let first = reports(&run_netcheck(&mut s, &mut now));
    assert_eq!(first.len(), 1);
    // In flight: a second run's report, the same, waits and then goes nowhere.
    s.request_netcheck(now);
    assert!(reports(&run_netcheck(&mut s, &mut now)).is_empty());
    s.handle_reported(now, first[0].clone(), Ok(()));
    // Accepted, and nothing changed: nothing to send.
    s.request_netcheck(now);
    assert!(reports(&run_netcheck(&mut s, &mut now)).is_empty());
    assert_eq!(s.status().endpoints, first[0].endpoints);

    // A report the coordinator refuses for good: the node leaves.
    s.request_netcheck(now);
    let sent = reports(&run_netcheck_on(&mut s, &mut now, vec![]));
    assert_eq!(sent.len(), 1, "the host addresses changed");
    let refusal = control::ReportFailed {
        permanent: true,
        message: "node removed".into(),
    };
    s.handle_reported(now, sent[0].clone(), Err(refusal));
    let out = drain(&mut s);
    assert!(out
        .iter()
        .any(|o| matches!(o, Output::Revoked(r) if r == "node removed")));
    assert!(out
        .iter()
        .any(|o| matches!(o, Output::Relay(RelayCmd::Clear))));
    assert!(s.control().is_none());
    assert_eq!(s.poll_timeout(), None, "nothing runs for a node that left");
}

#[test]
fn map_peers_start_relayed_leave_with_their_entry_and_with_the_network() {
    let now = Instant::now();
    let mut s = new_state();
    join(&mut s, now, true);
    let (a, b) = (
        Peer::for_test(2, "fd7a:115c:a1e0::2"),
        Peer::for_test(3, "fd7a:115c:a1e0::3"),
    );
    s.handle_map(now, Some(full_map(&[&a, &b])));
    let out = drain(&mut s);
    let added: Vec<_> = out
        .iter()
        .filter_map(|o| match o {
            Output::AddPeer { spec, path } => Some((spec.key, *path, spec.managed)),
            _ => None,
        })
        .collect();
    assert_eq!(added.len(), 2);
    assert!(added.iter().all(|(_, p, m)| *p == Path::Relay && *m));
    assert!(out
        .iter()
        .any(|o| matches!(o, Output::Relay(RelayCmd::PeerRegion { peer, .. }) if *peer == a.key)));
    assert!(s.control().is_some_and(|c| c.map_received));
    assert_eq!(s.peer_views(now, std::time::SystemTime::now()).len(), 2);

    s.handle_map(now, Some(MapEvent::PeerRemoved(a.key)));
    let out = drain(&mut s);
    assert!(out
        .iter()
        .any(|o| matches!(o, Output::RemovePeer(k) if *k == a.key)));
    assert!(out
        .iter()
        .any(|o| matches!(o, Output::Relay(RelayCmd::RemovePeer(k)) if *k == a.key)));

    // `down`: the rest go, the relays and TCP streams close, the standing
    // stays (Stopped).
    s.stop(now);
    let out = drain(&mut s);
    assert!(out
        .iter()
        .any(|o| matches!(o, Output::RemovePeer(k) if *k == b.key)));
    assert!(out.iter().any(|o| matches!(o, Output::TcpClear)));
    assert!(out.iter().any(|o| matches!(o, Output::StopPortmap)));
    assert_eq!(s.status().state, MeshState::Stopped);
    assert!(s.follower().peers().is_empty());
}

#[test]
fn housekeeping_ticks_each_second_and_a_changed_address_rediscovers() {
    let mut now = Instant::now();
    let mut s = new_state();
    assert_eq!(s.poll_timeout(), None, "nothing runs before joining");
    let out = join(&mut s, now, false);
    accept_reports(&mut s, now, &out);
    let mut housekeeps = Vec::new();
    for _ in 0..4 {
        let t = s.poll_timeout().expect("housekeeping is armed");
        assert!(t <= now + TICK);
        now = t;
        s.handle_timeout(now);
        for o in drain(&mut s) {
            if let Output::Housekeep { addresses } = o {
                housekeeps.push(addresses);
            }
        }
    }
    assert_eq!(housekeeps, [false, true, false, true]);

    let wants_netcheck = |out: &[Output]| out.iter().any(|o| matches!(o, Output::NetcheckDone(_)));
    // The first look at the addresses publishes them (no STUN server
    // here: the run ends at once).
    s.handle_host(now, host());
    let out = drain(&mut s);
    assert!(wants_netcheck(&out));
    accept_reports(&mut s, now, &out);
    s.handle_host(now, host());
    assert!(drain(&mut s).is_empty(), "same addresses: nothing to do");
    let moved = vec![Endpoint {
        addr: "10.9.0.2:41641".parse().unwrap(),
        kind: EndpointKind::Host,
    }];
    s.handle_host(now, moved);
    let out = drain(&mut s);
    assert!(wants_netcheck(&out));
    let report = out.iter().find_map(|o| match o {
        Output::Report { report, .. } => Some(report.clone()),
        _ => None,
    });
    assert_eq!(
        report.map(|r| r.endpoints[0].addr.to_string()).as_deref(),
        Some("10.9.0.2:41641")
    );
}

#[test]
fn pings_are_refused_for_unknown_peers_and_a_silent_round_ends_at_its_timeout() {
    let mut now = Instant::now();
    let mut s = new_state();
    join(&mut s, now, true);
    let stranger = crate::keys::PrivateKey::generate().public();
    assert_eq!(
        s.ping(now, stranger, Duration::from_secs(1)),
        Err(PingRefused::UnknownPeer)
    );
    let a = Peer::for_test(2, "fd7a:115c:a1e0::2");
    s.handle_map(now, Some(full_map(&[&a])));
    let _ = drain(&mut s);
    let id = s.ping(now, a.key, Duration::from_secs(1)).unwrap();
    let out = drain(&mut s);
    assert!(
        out.iter().any(|o| matches!(o, Output::Disco(t) if t.dest == crate::traversal::node::Dest::Relay(a.key))),
        "the round pings over the relay: {out:?}"
    );
    let mut done = None;
    while done.is_none() {
        now = s.poll_timeout().unwrap();
        s.handle_timeout(now);
        done = drain(&mut s).into_iter().find_map(|o| match o {
            Output::PingDone { id, round } => Some((id, round)),
            _ => None,
        });
    }
    let (got, round) = done.unwrap();
    assert_eq!(got, id);
    assert!(round.pongs.is_empty() && !round.direct);

    for _ in 0..ping::MAX_WAITERS {
        s.ping(now, a.key, Duration::from_secs(5)).unwrap();
    }
    assert_eq!(
        s.ping(now, a.key, Duration::from_secs(5)),
        Err(PingRefused::Busy)
    );
}

#[test]
fn a_network_without_stun_answers_netcheck_at_once_with_host_candidates() {
    let now = Instant::now();
    let mut s = new_state();
    let out = join(&mut s, now, false);
    assert!(out.iter().any(|o| matches!(o, Output::NetcheckDone(None))));
    assert!(!out.iter().any(|o| matches!(o, Output::Netcheck { .. })));
    accept_reports(&mut s, now, &out);
    s.handle_host(now, host());
    let out = drain(&mut s);
    let endpoints = out.iter().find_map(|o| match o {
        Output::Report { report, .. } => Some(report.endpoints.clone()),
        _ => None,
    });
    assert_eq!(endpoints, Some(host()));
}

#[test]
fn registered_addresses_are_checked_and_a_new_network_is_not_held_to_the_old_48() {
    let now = Instant::now();
    let mut s = new_state();
    let mut bad = registration(true);
    bad.ipv4 = "8.8.8.8".parse().unwrap();
    s.begin();
    s.registered(now, &bad, false);
    let out = drain(&mut s);
    assert!(
        !out.iter().any(|o| matches!(o, Output::Addresses { .. })),
        "an address outside the overlay never reaches the TUN: {out:?}"
    );
    assert!(s.control().unwrap().last_error.is_some());

    // A good registration pins the network's /48 …
    let out = join(&mut s, now, true);
    assert!(out.iter().any(|o| matches!(o, Output::PinPrefix(_))));
    assert!(out.iter().any(|o| matches!(o, Output::Addresses { .. })));
    // … and after leaving, another network's addresses are taken.
    s.leave(now);
    let _ = drain(&mut s);
    let mut other = registration(true);
    other.ipv6 = "fd11:2233:4455::9".parse().unwrap();
    s.begin();
    s.registered(now, &other, false);
    let out = drain(&mut s);
    assert!(
        out.iter().any(|o| matches!(o, Output::Addresses { .. })),
        "{out:?}"
    );

    // A background re-registration that comes back after the node left
    // brings nothing back.
    s.leave(now);
    let _ = drain(&mut s);
    s.registered(now, &other, true);
    assert!(drain(&mut s).is_empty());
    assert!(s.control().is_none());
}

#[test]
fn down_answers_waiting_pings_and_gives_the_filter_back_to_the_config() {
    let now = Instant::now();
    let mut s = new_state();
    join(&mut s, now, true);
    let a = Peer::for_test(2, "fd7a:115c:a1e0::2");
    s.handle_map(now, Some(full_map(&[&a])));
    let _ = drain(&mut s);
    let id = s.ping(now, a.key, Duration::from_secs(30)).unwrap();
    let _ = drain(&mut s);
    s.stop(now);
    let out = drain(&mut s);
    assert!(out
        .iter()
        .any(|o| matches!(o, Output::PingDone { id: got, .. } if *got == id)));
    assert!(out.iter().any(|o| matches!(o, Output::Filter(None))));
}

#[test]
fn the_newest_report_goes_once_the_one_in_flight_is_answered() {
    let mut now = Instant::now();
    let mut s = new_state();
    join(&mut s, now, true);
    let report_of = |out: &[Output]| {
        out.iter().find_map(|o| match o {
            Output::Report { report, .. } => Some(report.clone()),
            _ => None,
        })
    };
    let first = report_of(&run_netcheck(&mut s, &mut now)).expect("a first report");
    // While it is in flight the host moves: the newer report waits …
    s.request_netcheck(now);
    let moved = vec![Endpoint {
        addr: "10.9.0.2:41641".parse().unwrap(),
        kind: EndpointKind::Host,
    }];
    assert!(report_of(&run_netcheck_on(&mut s, &mut now, moved)).is_none());
    // … and goes as soon as the first is answered.
    s.handle_reported(now, first, Ok(()));
    let newer = report_of(&drain(&mut s)).expect("the newer report");
    assert_eq!(newer.endpoints[0].addr.to_string(), "10.9.0.2:41641");
}
