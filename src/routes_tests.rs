//! The routing rules of `routes.rs`, one test each.

use std::time::{Duration, Instant};

use super::*;
use crate::keys::NodeKey;

fn net(s: &str) -> IpNet {
    s.parse().unwrap()
}

fn key(b: u8) -> NodeKey {
    NodeKey([b; 32])
}

fn router(b: u8, routes: &[&str], healthy: bool) -> RoutePeer {
    RoutePeer {
        key: key(b),
        approved: routes.iter().map(|r| net(r)).collect(),
        healthy,
    }
}

fn accepting(local: &[&str]) -> RouteOptions {
    RouteOptions {
        accept_routes: true,
        local: local.iter().map(|l| net(l)).collect(),
        ..RouteOptions::default()
    }
}

const LAN: &str = "192.168.50.0/24";

#[test]
fn subnet_routes_need_accept_routes() {
    let mut r = Routes::default();
    let peers = [router(1, &[LAN], true)];
    let t = r.update(Instant::now(), &peers, &RouteOptions::default());
    assert!(t.routes.is_empty());
    assert_eq!(t.skipped, vec![(net(LAN), Skipped::NotAccepted)]);
    let t = r.update(Instant::now(), &peers, &accepting(&[]));
    assert_eq!(t.via(&net(LAN)), Some(key(1)));
}

#[test]
fn a_route_never_takes_over_this_hosts_own_network() {
    let mut r = Routes::default();
    // The same LAN, a wider one around it, and a narrower one inside it.
    let peers = [router(1, &[LAN, "192.168.0.0/16", "10.0.0.0/24"], true)];
    let t = r.update(Instant::now(), &peers, &accepting(&[LAN, "10.0.0.0/8"]));
    assert!(t.routes.is_empty(), "{:?}", t.routes);
    assert_eq!(t.skipped.len(), 3);
    assert!(t
        .skipped
        .iter()
        .all(|(_, why)| matches!(why, Skipped::ShadowsLocal(_))));
}

#[test]
fn two_routers_fail_over_at_once_and_do_not_flap_back() {
    let t0 = Instant::now();
    let at = |s: u64| t0 + Duration::from_secs(s);
    let mut r = Routes::default();
    let opts = accepting(&[]);
    let both = |a: bool, b: bool| [router(1, &[LAN], a), router(2, &[LAN], b)];
    assert_eq!(
        r.update(at(0), &both(true, true), &opts).via(&net(LAN)),
        Some(key(1))
    );
    // The primary loses its path: the other takes over in the same update.
    assert_eq!(
        r.update(at(1), &both(false, true), &opts).via(&net(LAN)),
        Some(key(2))
    );
    // It comes back: the new primary keeps the role.
    for s in 2..30 {
        assert_eq!(
            r.update(at(s), &both(true, true), &opts).via(&net(LAN)),
            Some(key(2))
        );
    }
    // The second goes down much later: back to the first, which has been
    // healthy longer than the hold-down.
    assert_eq!(
        r.update(at(30), &both(true, false), &opts).via(&net(LAN)),
        Some(key(1))
    );
}

#[test]
fn a_flapping_router_waits_out_its_hold_down() {
    let t0 = Instant::now();
    let at = |s: u64| t0 + Duration::from_secs(s);
    let mut r = Routes::default();
    let opts = accepting(&[]);
    let three = |a: bool, b: bool, c: bool| {
        [
            router(1, &[LAN], a),
            router(2, &[LAN], b),
            router(3, &[LAN], c),
        ]
    };
    assert_eq!(
        r.update(at(0), &three(true, true, true), &opts)
            .via(&net(LAN)),
        Some(key(1))
    );
    assert_eq!(
        r.update(at(1), &three(false, true, true), &opts)
            .via(&net(LAN)),
        Some(key(2))
    );
    // 2 fails 3 s after 1 came back: 1 is still held down, so 3 takes it.
    assert_eq!(
        r.update(at(4), &three(true, false, true), &opts)
            .via(&net(LAN)),
        Some(key(3))
    );
    // No healthy router at all: the prefix is reported, not routed.
    let t = r.update(at(5), &three(false, false, false), &opts);
    assert_eq!(t.skipped, vec![(net(LAN), Skipped::NoHealthyRouter)]);
}

#[test]
fn a_held_down_router_is_passed_over_until_its_hold_down_ends() {
    let t0 = Instant::now();
    let at = |s: u64| t0 + Duration::from_secs(s);
    let mut r = Routes::default();
    let opts = accepting(&[]);
    let three = |a: bool, b: bool, c: bool| {
        [
            router(1, &[LAN], a),
            router(2, &[LAN], b),
            router(3, &[LAN], c),
        ]
    };
    assert_eq!(
        r.update(at(0), &three(true, true, true), &opts)
            .via(&net(LAN)),
        Some(key(1))
    );
    // 1 loses its path at 1 s: 2 takes over; 1 comes back at 3 s.
    r.update(at(1), &three(false, true, true), &opts);
    r.update(at(3), &three(true, true, true), &opts);
    // 2 fails at 20 s: 1's hold-down (from 1 s) is over, so the lowest
    // key, 1, takes the role back rather than 3.
    assert_eq!(
        r.update(at(20), &three(true, false, true), &opts)
            .via(&net(LAN)),
        Some(key(1))
    );
}
