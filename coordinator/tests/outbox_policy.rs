//! The map stream's outbox under an access policy: a node's map holds only
//! the peers it may see, and a new compilation reaches it as deltas (peers
//! added, peers removed, the new filter), never as a full map.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use warren::control::{MapMessage, NetMap, RelayMap};
use warren::keys::PrivateKey;
use warren_coordinator::hub::access::Access;
use warren_coordinator::hub::outbox::{full_line_with, Flush, Outbox, TICK};
use warren_coordinator::hub::{HubEvent, Upserted};
use warren_coordinator::store::{NodeRecord, UserRecord};

const ME: i64 = 1;

fn record(id: i64, user: Option<i64>, tags: &[&str]) -> NodeRecord {
    let key = PrivateKey::generate().public();
    NodeRecord {
        id,
        key,
        disco_key: key,
        name: format!("n{id}"),
        hostname: format!("n{id}"),
        os: "linux".into(),
        version: "0".into(),
        ipv4: [100, 64, 0, id as u8].into(),
        ipv6: format!("fd00:1:2::{id}").parse().unwrap(),
        ephemeral: false,
        tags: tags.iter().map(|t| t.to_string()).collect(),
        advertised_tags: vec![],
        endpoints: vec![],
        netcheck: None,
        nat: Default::default(),
        home_relay: None,
        online: true,
        last_seen_ms: 0,
        created_ms: 0,
        user_id: user,
        advertised_routes: vec![],
        approved_routes: vec![],
    }
}

fn user(id: i64, name: &str) -> UserRecord {
    UserRecord {
        id,
        name: name.into(),
        email: format!("{name}@example.com"),
        display_name: String::new(),
        created_ms: 0,
    }
}

const POLICY: &str = r#"{
  "tagOwners": {"tag:server": ["bob@example.com"]},
  // alice (node 1) may reach the server (node 2); bob's node 3 nothing.
  "acls": [{"action": "accept", "src": ["alice@example.com"], "dst": ["tag:server:22"]}],
}"#;

/// The policy `text` (`None`: none) compiled for these users and nodes.
fn access(users: &[UserRecord], nodes: &[NodeRecord], text: Option<&str>) -> Arc<Access> {
    Arc::new(Access::build(
        text.map(str::to_owned),
        users.to_vec(),
        nodes.iter(),
    ))
}

fn lines(flush: Flush) -> Vec<MapMessage> {
    match flush {
        Flush::Lines { text, .. } => text
            .text()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect(),
        other => panic!("expected lines, got {other:?}"),
    }
}

#[test]
fn a_policy_hides_peers_and_its_changes_arrive_as_deltas() {
    let nodes = [
        record(ME, Some(1), &[]),
        record(2, Some(2), &["tag:server"]),
        record(3, Some(2), &[]),
    ];
    let users = vec![user(1, "alice"), user(2, "bob")];
    let snap: BTreeMap<i64, Arc<Upserted>> = nodes
        .iter()
        .map(|n| (n.id, Upserted::new(n.clone()).unwrap()))
        .collect();
    let build = |text: Option<&str>| access(&users, &nodes, text);

    let t0 = Instant::now();
    let mut ob = Outbox::new(ME, t0);
    ob.set_access(build(Some(POLICY)));
    assert!(matches!(ob.poll_flush(t0, 3), Flush::Full { .. }));
    let relay = serde_json::to_string(&RelayMap::default()).unwrap();
    let (text, known) = full_line_with(&snap, ME, &snap[&ME].peer_json, &relay, ob.full_parts());
    ob.full_sent(known, 0);
    let map = NetMap::from_full(nodes[0].key, &serde_json::from_str(&text).unwrap()).unwrap();
    assert_eq!(
        map.peers.keys().collect::<Vec<_>>(),
        vec![&nodes[1].key],
        "only the server"
    );
    assert_eq!(map.packet_filter, Some(vec![]), "nobody may reach alice");

    // Bob's node changes: alice may not see it, so nothing is written.
    let t1 = t0 + TICK * 2;
    ob.push(HubEvent::Upsert(snap[&3].clone()), t1);
    assert!(matches!(ob.poll_flush(t1, 3), Flush::Wait));

    // The policy is removed: bob's node is added, the filter is cleared,
    // as deltas.
    let t2 = t1 + TICK * 2;
    ob.push(HubEvent::Access(build(None)), t2);
    assert!(ob.needs_recheck());
    ob.recheck(&snap);
    let msgs = lines(ob.poll_flush(t2, 3));
    assert!(
        msgs.iter()
            .any(|m| matches!(m, MapMessage::PeerAdded { peer } if peer.key == nodes[2].key)),
        "{msgs:?}"
    );
    assert!(
        msgs.contains(&MapMessage::FilterChanged {
            packet_filter: None
        }),
        "{msgs:?}"
    );

    // Back: bob's node is removed again and the filter returns.
    let t3 = t2 + TICK * 2;
    ob.push(HubEvent::Access(build(Some(POLICY))), t3);
    ob.recheck(&snap);
    let msgs = lines(ob.poll_flush(t3, 3));
    assert!(
        msgs.contains(&MapMessage::PeerRemoved { key: nodes[2].key }),
        "{msgs:?}"
    );
    assert!(msgs.contains(&MapMessage::FilterChanged {
        packet_filter: Some(vec![])
    }));
    assert_eq!(msgs.len(), 2, "{msgs:?}");
}

/// A policy under which this node sees every peer it saw without one
/// skips the peer-by-peer comparison, yet a node joining afterwards is
/// judged by the policy: not sent when it may not be seen.
#[test]
fn the_same_peers_under_a_new_policy_cost_no_comparison_and_leak_no_newcomer() {
    let mut nodes = vec![
        record(ME, Some(1), &[]),
        record(2, Some(2), &["tag:server"]),
    ];
    let users = vec![user(1, "alice"), user(2, "bob")];
    let build = |nodes: &[NodeRecord], text: Option<&str>| access(&users, nodes, text);
    let t0 = Instant::now();
    let mut ob = Outbox::new(ME, t0);
    ob.set_access(build(&nodes, None));
    assert!(matches!(ob.poll_flush(t0, 2), Flush::Full { .. }));
    let snap: BTreeMap<i64, Arc<Upserted>> = nodes
        .iter()
        .map(|n| (n.id, Upserted::new(n.clone()).unwrap()))
        .collect();
    let relay = serde_json::to_string(&RelayMap::default()).unwrap();
    let (_, known) = full_line_with(&snap, ME, &snap[&ME].peer_json, &relay, ob.full_parts());
    ob.full_sent(known, 0);

    // alice still sees the server, and only it: no comparison owed, only
    // the filter.
    let t1 = t0 + TICK * 2;
    ob.push(HubEvent::Access(build(&nodes, Some(POLICY))), t1);
    assert!(!ob.needs_recheck(), "same peers: nothing to compare");
    let msgs = lines(ob.poll_flush(t1, 2));
    assert_eq!(msgs.len(), 1, "{msgs:?}");
    assert!(matches!(msgs[0], MapMessage::FilterChanged { .. }));

    // bob's new node joins: the build comes first, then its upsert, which
    // alice may not see.
    nodes.push(record(3, Some(2), &[]));
    let t2 = t1 + TICK * 2;
    ob.push(HubEvent::Access(build(&nodes, Some(POLICY))), t2);
    let newcomer = Upserted::new(nodes[2].clone()).unwrap();
    ob.push(HubEvent::Upsert(newcomer), t2);
    assert!(
        matches!(ob.poll_flush(t2, 3), Flush::Wait),
        "the newcomer is not sent"
    );
}
