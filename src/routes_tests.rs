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
fn the_exit_node_must_serve_both_default_routes_and_may_leave_the_lan_direct() {
    let mut r = Routes::default();
    let exit = router(7, &["0.0.0.0/0", "::/0"], true);
    let half = router(8, &["0.0.0.0/0"], true);
    let mut opts = RouteOptions {
        exit_node: Some(key(7)),
        local: vec![net(LAN)],
        ..RouteOptions::default()
    };
    let t = r.update(Instant::now(), &[exit.clone(), half.clone()], &opts);
    assert_eq!(t.via(&net("0.0.0.0/0")), Some(key(7)));
    assert_eq!(t.via(&net("::/0")), Some(key(7)));
    assert!(
        t.bypass.is_empty(),
        "without allow_lan everything goes through it"
    );
    opts.allow_lan = true;
    let t = r.update(Instant::now(), &[exit.clone(), half.clone()], &opts);
    assert_eq!(t.bypass, vec![net(LAN)]);
    opts.exit_node = Some(key(8));
    let t = r.update(Instant::now(), &[exit, half], &opts);
    assert!(t.routes.is_empty());
    assert_eq!(
        t.skipped,
        vec![(net("0.0.0.0/0"), Skipped::NotAnExitNode(key(8)))]
    );
}
