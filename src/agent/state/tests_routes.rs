//! The agent state's routes and names against its outputs: subnet routes
//! and their failover, the exit node (and failing closed), the resolver's
//! view of the map, and a registration that comes back after `down`.
//! Helpers are the main test module's (`tests.rs`).

use std::time::Instant;

use super::tests::{drain, full_map, host, join, me, new_state, registration};
use super::*;
use crate::api::mesh::MeshState;
use crate::control::follow::MapEvent;
use crate::control::types::Peer;

#[test]
fn accepted_subnet_routes_go_to_the_serving_peer_and_what_we_serve_is_said() {
    let now = Instant::now();
    let mut s = new_state();
    join(&mut s, now, true);
    let lan: ipnet::IpNet = "192.168.50.0/24".parse().unwrap();
    let mut a = Peer::for_test(2, "fd7a:115c:a1e0::2");
    let mut b = Peer::for_test(3, "fd7a:115c:a1e0::3");
    a.routes = vec![lan];
    b.routes = vec![lan];
    let subnets = |out: &[Output]| {
        out.iter().rev().find_map(|o| match o {
            Output::Routes { routes, .. } => Some(routes.clone()),
            _ => None,
        })
    };
    s.handle_map(now, Some(full_map(&[&a, &b])));
    assert_eq!(
        subnets(&drain(&mut s)),
        None,
        "not accepted: nothing routed"
    );
    s.set_accept_routes(now, true);
    let primary = subnets(&drain(&mut s)).expect("routed once accepted");
    assert_eq!(primary.len(), 1);
    let (first, other) = if primary[0].1 == a.key {
        (&a, &b)
    } else {
        (&b, &a)
    };
    // The primary goes offline: the other router carries the prefix.
    let mut gone = first.clone();
    gone.online = false;
    s.handle_map(now, Some(MapEvent::PeerChanged(gone)));
    assert_eq!(subnets(&drain(&mut s)), Some(vec![(lan, other.key)]));
    s.set_accept_routes(now, false);
    assert_eq!(subnets(&drain(&mut s)), Some(vec![]));

    // This node's own record serves a route: the driver is told.
    let mut me_serving = me();
    me_serving.routes = vec!["10.9.0.0/16".parse().unwrap()];
    s.handle_map(now, Some(MapEvent::SelfChanged(me_serving)));
    let out = drain(&mut s);
    assert!(out
        .iter()
        .any(|o| matches!(o, Output::Serving(r) if r == &vec!["10.9.0.0/16".parse::<ipnet::IpNet>().unwrap()])));
}

#[test]
fn an_exit_node_takes_both_default_routes_keeps_the_lan_and_fails_closed() {
    let now = Instant::now();
    let mut s = new_state();
    join(&mut s, now, true);
    let mut exit = Peer::for_test(2, "fd7a:115c:a1e0::2");
    exit.routes = crate::control::advertise::exit_routes().to_vec();
    let plain = Peer::for_test(3, "fd7a:115c:a1e0::3");
    s.handle_map(now, Some(full_map(&[&exit, &plain])));
    let lan: ipnet::IpNet = "192.168.1.0/24".parse().unwrap();
    s.handle_local_networks(now, vec![lan]);
    drain(&mut s);
    assert!(s.offers_exit(&exit.key) && !s.offers_exit(&plain.key));
    let routes_of = |out: &[Output]| {
        out.iter().rev().find_map(|o| match o {
            Output::Routes {
                routes,
                lan,
                exit_blocked,
            } => Some((routes.clone(), lan.clone(), *exit_blocked)),
            _ => None,
        })
    };
    // Chosen, with LAN access: both defaults to it, the LAN kept off.
    s.set_exit_node(now, Some(exit.key), true);
    let (routes, kept, blocked) = routes_of(&drain(&mut s)).expect("routes");
    let defaults = crate::control::advertise::exit_routes();
    assert_eq!(routes.len(), 2);
    assert!(routes
        .iter()
        .all(|(n, k)| defaults.contains(n) && *k == exit.key));
    assert_eq!((kept, blocked), (vec![lan], false));
    assert_eq!(s.status().exit_node.as_deref(), Some(exit.name.as_str()));
    // Its exit routes withdrawn: nothing routed to it, and traffic is
    // blocked (fail closed), with the reason in `status`.
    let mut withdrawn = exit.clone();
    withdrawn.routes.clear();
    s.handle_map(now, Some(MapEvent::PeerChanged(withdrawn)));
    let (routes, _, blocked) = routes_of(&drain(&mut s)).expect("routes");
    assert!(routes.is_empty() && blocked);
    assert!(s.status().exit_node_problem.is_some());
    // Cleared: no default routes, nothing blocked.
    s.set_exit_node(now, None, false);
    let (routes, kept, blocked) = routes_of(&drain(&mut s)).expect("routes");
    assert!(routes.is_empty() && kept.is_empty() && !blocked);
    assert!(s.status().exit_node.is_none());
}

#[test]
fn a_re_registration_answered_after_down_is_ignored_and_the_next_up_has_addresses() {
    let now = Instant::now();
    let mut s = new_state();
    join(&mut s, now, true);
    s.handle_map(now, Some(full_map(&[])));
    drain(&mut s);
    // `down` while a background re-registration is on its way …
    s.stop(now);
    drain(&mut s);
    // … which then comes back: nothing changes.
    s.registered(now, &registration(true), true);
    let out = drain(&mut s);
    assert!(!out.iter().any(|o| matches!(o, Output::Addresses { .. })));
    assert_eq!(s.status().state, MeshState::Stopped);
    // `up` registers afresh: the new standing has the addresses.
    s.registered(now, &registration(true), false);
    s.follow(now, None);
    drain(&mut s);
    assert_eq!(
        s.status().addresses.len(),
        2,
        "no addresses after down and up"
    );
}

#[test]
fn names_follow_the_map_a_removed_or_hidden_peer_has_none() {
    let now = Instant::now();
    let mut s = new_state();
    join(&mut s, now, true);
    let b = Peer::for_test(3, "fd7a:115c:a1e0::3");
    let names = |out: &[Output]| {
        out.iter().rev().find_map(|o| match o {
            Output::Dns(v) => Some(v.nodes.iter().map(|n| n.name.clone()).collect::<Vec<_>>()),
            _ => None,
        })
    };
    s.handle_map(now, Some(full_map(&[&b])));
    let got = names(&drain(&mut s)).expect("names after the map");
    assert!(got.contains(&b.name), "{got:?}");
    assert_eq!(got[0], me().name, "this node first");
    // A rename is one delta away.
    let mut renamed = b.clone();
    renamed.name = "bee".into();
    s.handle_map(now, Some(MapEvent::PeerChanged(renamed.clone())));
    let got = names(&drain(&mut s)).expect("names after the rename");
    assert!(got.contains(&"bee".to_string()) && !got.contains(&b.name));
    // A change that keeps names and addresses (presence, endpoints) does
    // not rebuild them, and the next rename still does.
    let mut moved = renamed.clone();
    moved.online = !moved.online;
    moved.endpoints = host();
    s.handle_map(now, Some(MapEvent::PeerChanged(moved.clone())));
    assert_eq!(names(&drain(&mut s)), None);
    moved.name = "bea".into();
    s.handle_map(now, Some(MapEvent::PeerChanged(moved)));
    let got = names(&drain(&mut s)).expect("names after a second rename");
    assert!(got.contains(&"bea".to_string()) && !got.contains(&"bee".to_string()));
    // Removed (or hidden by a new policy: the coordinator removes it from
    // this node's map): no name.
    s.handle_map(now, Some(MapEvent::PeerRemoved(b.key)));
    let got = names(&drain(&mut s)).expect("names after the removal");
    assert!(!got.contains(&"bea".to_string()));
    // Nothing changed: no output.
    s.handle_map(now, Some(MapEvent::PeerRemoved(b.key)));
    assert_eq!(names(&drain(&mut s)), None);
}
