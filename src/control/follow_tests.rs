//! The follower's rules, one test each (module doc of `follow.rs`).

use std::collections::BTreeMap;
use std::time::Duration;

use super::*;
use crate::control::netmap::NetMap;
use crate::policy::FilterRule;

fn peer(id: u8, v6: &str) -> Peer {
    Peer::for_test(id, v6)
}

fn full(me: &Peer, peers: &[&Peer], filter: Option<Vec<FilterRule>>) -> MapEvent {
    MapEvent::Full {
        map: NetMap {
            coordinator_key: me.key,
            self_node: me.clone(),
            peers: peers
                .iter()
                .map(|p| (p.key, (*p).clone()))
                .collect::<BTreeMap<_, _>>(),
            relay_map: RelayMap::default(),
            packet_filter: filter,
            dns: None,
        },
        from_cache: false,
    }
}

fn drain(f: &mut Follower) -> Vec<MapAction> {
    std::iter::from_fn(|| f.poll_action()).collect()
}

fn upserted(actions: &[MapAction]) -> Vec<NodeKey> {
    actions
        .iter()
        .filter_map(|a| match a {
            MapAction::UpsertPeer(p) => Some(p.key),
            _ => None,
        })
        .collect()
}

fn removed(actions: &[MapAction]) -> Vec<NodeKey> {
    actions
        .iter()
        .filter_map(|a| match a {
            MapAction::RemovePeer(k) => Some(*k),
            _ => None,
        })
        .collect()
}

const NET: &str = "fd7a:115c:a1e0::";

#[test]
fn a_full_map_replaces_the_peers_and_never_lists_this_node() {
    let me = peer(1, "fd7a:115c:a1e0::1");
    let (a, b, c) = (
        peer(2, "fd7a:115c:a1e0::2"),
        peer(3, "fd7a:115c:a1e0::3"),
        peer(4, "fd7a:115c:a1e0::4"),
    );
    let mut f = Follower::new(me.key, None);
    f.handle_map(Some(full(&me, &[&a, &b, &me], None)));
    let first = drain(&mut f);
    let mut got = upserted(&first);
    got.sort();
    let mut want = vec![a.key, b.key];
    want.sort();
    assert_eq!(got, want, "this node's own record is not a peer");
    assert!(first
        .iter()
        .any(|x| matches!(x, MapAction::PinPrefix(n) if n.to_string() == format!("{NET}/48"))));
    assert!(first
        .iter()
        .any(|x| matches!(x, MapAction::SetAddresses { .. })));

    // The next full map: b gone, c new, a unchanged (nothing to redo).
    f.handle_map(Some(full(&me, &[&a, &c], None)));
    let second = drain(&mut f);
    assert_eq!(upserted(&second), vec![c.key]);
    assert_eq!(removed(&second), vec![b.key]);
    assert!(
        !second
            .iter()
            .any(|x| matches!(x, MapAction::SetAddresses { .. } | MapAction::PinPrefix(_))),
        "the same addresses are not installed again"
    );
    assert_eq!(f.peers().len(), 2);
}

#[test]
fn addresses_outside_the_pinned_network_are_refused_and_so_are_such_peers() {
    let me = peer(1, "fd7a:115c:a1e0::1");
    let pinned: Ipv6Net = format!("{NET}/48").parse().unwrap();
    let mut f = Follower::new(me.key, Some(pinned));
    let stranger = peer(2, "fd00:bad::2");
    let mut moved_me = me.clone();
    moved_me.ipv6 = "fd00:bad::1".parse().unwrap();
    f.handle_map(Some(full(&moved_me, &[&stranger], None)));
    let actions = drain(&mut f);
    assert!(actions
        .iter()
        .any(|x| matches!(x, MapAction::AddressesRefused(_))));
    assert!(!actions
        .iter()
        .any(|x| matches!(x, MapAction::SetAddresses { .. } | MapAction::PinPrefix(_))));
    assert!(
        upserted(&actions).is_empty(),
        "a peer in another network is not taken"
    );

    // A known peer that moves out of the overlay is removed.
    let mut a = peer(3, "fd7a:115c:a1e0::3");
    f.handle_map(Some(MapEvent::PeerAdded(a.clone())));
    assert_eq!(upserted(&drain(&mut f)), vec![a.key]);
    a.ipv4 = [10, 0, 0, 3].into();
    f.handle_map(Some(MapEvent::PeerChanged(a.clone())));
    assert_eq!(removed(&drain(&mut f)), vec![a.key]);
    assert!(f.peer(&a.key).is_none());
}

#[test]
fn a_filter_too_big_to_walk_fails_closed_and_none_means_no_policy() {
    let me = peer(1, "fd7a:115c:a1e0::1");
    let mut f = Follower::new(me.key, None);
    let rule: FilterRule =
        serde_json::from_str(r#"{"proto": [6], "src": ["100.64.0.0/10"], "dst": [{"net": "100.64.0.1/32", "ports": [22, 22]}]}"#)
            .unwrap();
    f.handle_map(Some(MapEvent::FilterChanged(Some(vec![
        rule;
        MAX_RULES + 1
    ]))));
    match drain(&mut f).as_slice() {
        [MapAction::SetFilter(Some(filter))] => {
            assert_eq!(filter.rules().map(<[_]>::len), Some(0), "deny all");
        }
        other => panic!("{other:?}"),
    }
    f.handle_map(Some(MapEvent::FilterChanged(None)));
    assert!(matches!(
        drain(&mut f).as_slice(),
        [MapAction::SetFilter(None)]
    ));
}

#[test]
fn revocation_and_the_end_of_the_stream_mean_leave() {
    let me = peer(1, "fd7a:115c:a1e0::1");
    let mut f = Follower::new(me.key, None);
    f.handle_map(Some(MapEvent::Disconnected {
        reason: "timeout".into(),
        retry_in: Duration::from_secs(1),
    }));
    f.handle_map(Some(MapEvent::Revoked {
        reason: "node removed".into(),
    }));
    f.handle_map(None);
    let actions = drain(&mut f);
    assert!(matches!(actions[0], MapAction::Disconnected { .. }));
    assert!(matches!(&actions[1], MapAction::Leave(r) if r == "node removed"));
    assert!(matches!(actions[2], MapAction::Leave(_)));

    // Leaving removes every peer it knew.
    let a = peer(2, "fd7a:115c:a1e0::2");
    f.handle_map(Some(full(&me, &[&a], None)));
    drain(&mut f);
    f.clear();
    assert_eq!(removed(&drain(&mut f)), vec![a.key]);
    assert!(f.peers().is_empty());
}
