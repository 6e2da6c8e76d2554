//! The hub's batch path, on a real SQLite store: a batch of notes becomes
//! one event per node, in its latest state, and leaves the snapshot equal to
//! the store.

use std::collections::HashMap;

use warren::control::{Endpoint, EndpointKind};
use warren::keys::PrivateKey;

use super::*;
use crate::store::{NewToken, RegisterInput};

async fn register(store: &Store, token: &str) -> NodeRecord {
    let ula = store.ula_prefix().await.unwrap();
    let mut tx = store.begin().await.unwrap();
    let input = RegisterInput {
        token: Some(token.to_owned()),
        node_key: PrivateKey::generate().public(),
        disco_key: PrivateKey::generate().public(),
        hostname: "h".into(),
        os: "linux".into(),
        version: "0".into(),
        tags: None,
        routes: None,
    };
    let r = store.register(&mut tx, &input, ula).await.unwrap();
    tx.commit().await.unwrap();
    r.node
}

async fn report(store: &Store, node: &NodeRecord, port: u16) {
    let eps = [Endpoint {
        addr: std::net::SocketAddr::from(([192, 0, 2, 1], port)),
        kind: EndpointKind::Host,
    }];
    let mut tx = store.begin().await.unwrap();
    store
        .set_endpoints(
            &mut tx,
            node,
            &warren::control::EndpointsReport::endpoints(&eps),
        )
        .await
        .unwrap();
    tx.commit().await.unwrap();
}

#[tokio::test]
async fn a_batch_of_notes_is_one_event_per_node_in_its_latest_state() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&Store::sqlite_url(dir.path())).await.unwrap();
    let spec = NewToken {
        reusable: true,
        ..Default::default()
    };
    let token = store.create_token(&spec).await.unwrap().1;
    let mut nodes = Vec::new();
    for _ in 0..BATCH_LOAD + 4 {
        nodes.push(register(&store, &token).await);
    }
    report(&store, &nodes[0], 1).await;
    report(&store, &nodes[0], 2).await;
    report(&store, &nodes[1], 3).await;
    store.remove_node(nodes[1].id).await.unwrap();

    let hub = Hub::new();
    let mut rx = hub.subscribe();
    let changes: Vec<Change> = store
        .changes_since(0, BATCH_MAX as i64)
        .await
        .unwrap()
        .into_iter()
        .map(|(_, c)| c)
        .collect();
    assert!(changes.len() >= BATCH_LOAD + 7);
    hub.dispatch_all(&store, changes).await;

    let mut seen: HashMap<i64, HubEvent> = HashMap::new();
    while let Ok(ev) = rx.try_recv() {
        let id = match &ev {
            HubEvent::Upsert(u) => u.node.id,
            HubEvent::Removed { node_id, .. } => *node_id,
            HubEvent::Resync => panic!("no resync here"),
            // New nodes make the policy compile again, once per batch.
            HubEvent::Access(_) => continue,
        };
        assert!(seen.insert(id, ev).is_none(), "node {id} dispatched twice");
    }
    assert_eq!(seen.len(), nodes.len());
    match &seen[&nodes[0].id] {
        HubEvent::Upsert(u) => assert_eq!(u.node.endpoints[0].addr.port(), 2),
        other => panic!("{other:?}"),
    }
    assert!(matches!(seen[&nodes[1].id], HubEvent::Removed { .. }));

    let want: BTreeMap<i64, String> = store
        .list_nodes()
        .await
        .unwrap()
        .into_iter()
        .map(|n| (n.id, serde_json::to_string(&n.to_peer()).unwrap()))
        .collect();
    let got: BTreeMap<i64, String> =
        hub.with_snapshot(|s| s.iter().map(|(id, u)| (*id, u.peer_json.clone())).collect());
    assert_eq!(got, want);
}

/// What `put` records about a change: presence alone (online, last seen)
/// or more; a node new to the snapshot is never "presence only".
#[test]
fn a_change_of_presence_alone_is_marked_so() {
    let hub = Hub::new();
    let mut n = NodeRecord::for_test(4);
    let first = hub.put(Upserted::new(n.clone()).unwrap());
    assert!(!first.presence_only, "new to the snapshot");
    assert_eq!(first.entry_version, first.version);
    // Presence alone, twice: the entry is still the first one's.
    for _ in 0..2 {
        n.online = !n.online;
        n.last_seen_ms += 5;
        let u = hub.put(Upserted::new(n.clone()).unwrap());
        assert!(u.presence_only);
        assert_eq!(u.entry_version, first.version);
    }
    n.endpoints = vec![Endpoint {
        addr: std::net::SocketAddr::from(([192, 0, 2, 1], 9)),
        kind: EndpointKind::Host,
    }];
    n.online = !n.online;
    let more = hub.put(Upserted::new(n.clone()).unwrap());
    assert!(!more.presence_only);
    assert_eq!(more.entry_version, more.version);
    let v = hub.put(Upserted::new(n).unwrap()).version;
    assert!(v > first.version, "versions grow");
}
