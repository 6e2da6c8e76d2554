//! The control API over real HTTP on loopback, driven by the agent's own
//! client: registration, the map stream and its deltas, token rules, and a
//! removed node being cut off.

mod common;

use std::time::{Duration, Instant};

use common::{client, expect, first_full};
use warren::control::{ControlError, Endpoint, EndpointKind, EndpointsReport, ErrorCode, MapEvent};
use warren::keys::PrivateKey;
use warren_coordinator::store::NewToken;

const WITHIN: Duration = Duration::from_secs(1);

fn api_code(e: ControlError) -> ErrorCode {
    match e {
        ControlError::Api { code, .. } => code,
        other => panic!("expected an API error, got {other}"),
    }
}

#[tokio::test]
async fn three_nodes_see_each_other_and_every_change_within_a_second() {
    let dir = tempfile::tempdir().unwrap();
    let (srv, url, tok) = common::start_with_token(dir.path(), false).await;

    let mut clients = Vec::new();
    let mut regs = Vec::new();
    for i in 0..3 {
        let c = client(&url, &dir.path().join(format!("n{i}")));
        std::fs::create_dir_all(dir.path().join(format!("n{i}"))).unwrap();
        regs.push(
            c.register(
                Some(&tok),
                &format!("node{i}"),
                PrivateKey::generate().public(),
            )
            .await
            .unwrap(),
        );
        clients.push(c);
    }
    assert_eq!(srv.store.list_tokens().await.unwrap()[0].uses, 3);

    // Node 0's stream: the full map first, with the other two.
    let mut s0 = clients[0].map_stream();
    let full = first_full(&mut s0).await;
    assert_eq!(full.self_node.ipv4, regs[0].ipv4);
    let mut peer_ips: Vec<_> = full.peers.values().map(|p| p.ipv4).collect();
    // The hub follows the store's change notes (SQLite: a poll, woken by
    // each request), so a node registered a moment before the stream opened
    // may come as a delta right after the full map rather than inside it.
    while peer_ips.len() < 2 {
        let ip = expect(&mut s0, WITHIN, |ev| match ev {
            MapEvent::PeerAdded(p) => Some(p.ipv4),
            _ => None,
        })
        .await;
        peer_ips.push(ip);
    }
    peer_ips.sort();
    let mut want: Vec<_> = vec![regs[1].ipv4, regs[2].ipv4];
    want.sort();
    assert_eq!(peer_ips, want);

    // Node 1 reports endpoints: node 0 hears within a second.
    let eps = vec![
        Endpoint {
            addr: "192.0.2.1:41641".parse().unwrap(),
            kind: EndpointKind::Host,
        },
        Endpoint {
            addr: "198.51.100.7:3478".parse().unwrap(),
            kind: EndpointKind::Srflx,
        },
    ];
    let t = Instant::now();
    clients[1]
        .report_endpoints(&EndpointsReport {
            netcheck: Some(serde_json::json!({"udp": true})),
            ..EndpointsReport::endpoints(&eps)
        })
        .await
        .unwrap();
    let k1 = clients[1].node_key();
    let got = expect(&mut s0, WITHIN, |ev| match ev {
        MapEvent::PeerChanged(p) if p.key == k1 && !p.endpoints.is_empty() => {
            Some(p.endpoints.clone())
        }
        _ => None,
    })
    .await;
    assert_eq!(got, eps);
    assert!(t.elapsed() < WITHIN);

    // Node 2 comes online: node 0 sees it flip.
    let k2 = clients[2].node_key();
    let mut s2 = clients[2].map_stream();
    first_full(&mut s2).await;
    expect(&mut s0, WITHIN, |ev| match ev {
        MapEvent::PeerChanged(p) if p.key == k2 && p.online => Some(()),
        _ => None,
    })
    .await;

    // A fourth node joins; then the administrator removes it.
    let c3 = client(&url, dir.path());
    c3.register(Some(&tok), "node3", PrivateKey::generate().public())
        .await
        .unwrap();
    let k3 = c3.node_key();
    for s in [&mut s0, &mut s2] {
        expect(s, WITHIN, |ev| {
            matches!(ev, MapEvent::PeerAdded(p) if p.key == k3).then_some(())
        })
        .await;
    }
    let n3 = srv.store.node_by_key(&k3).await.unwrap().unwrap();
    srv.store.remove_node(n3.id).await.unwrap();
    for s in [&mut s0, &mut s2] {
        expect(s, WITHIN, |ev| {
            matches!(ev, MapEvent::PeerRemoved(k) if *k == k3).then_some(())
        })
        .await;
    }

    // Node 2 goes away: node 0 sees it offline.
    drop(s2);
    expect(&mut s0, Duration::from_secs(2), |ev| match ev {
        MapEvent::PeerChanged(p) if p.key == k2 && !p.online => Some(()),
        _ => None,
    })
    .await;

    // The map was saved for the next start.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let cached = clients[0].load_cached_map().unwrap().expect("map saved");
    assert_eq!(cached.peers.len(), 2);
    assert_eq!(cached.peers[&k1].endpoints, eps);
}

#[tokio::test]
async fn token_rules_are_enforced_with_clear_errors() {
    common::init();
    let dir = tempfile::tempdir().unwrap();
    let srv = common::start(dir.path(), None).await;
    let url = common::url(&srv);

    let once = common::token(&srv.store, false, false).await;
    let a = client(&url, dir.path());
    let ra = a
        .register(Some(&once), "a", PrivateKey::generate().public())
        .await
        .unwrap();
    // The same node may re-register (keeps its addresses, spends nothing)…
    let ra2 = a
        .register(Some(&once), "a", PrivateKey::generate().public())
        .await
        .unwrap();
    assert_eq!(
        (ra.node_id, ra.ipv4, ra.ipv6),
        (ra2.node_id, ra2.ipv4, ra2.ipv6)
    );
    let ra3 = a
        .register(None, "a", PrivateKey::generate().public())
        .await
        .unwrap();
    assert_eq!(ra3.ipv4, ra.ipv4);
    // …but another node cannot use the one-off token again.
    let b = client(&url, dir.path());
    let err = b
        .register(Some(&once), "b", PrivateKey::generate().public())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("already used"), "{err}");
    assert_eq!(api_code(err), ErrorCode::TokenUsed);

    let (rid, revoked) = srv
        .store
        .create_token(&NewToken {
            reusable: true,
            ..Default::default()
        })
        .await
        .unwrap();
    srv.store.revoke_token(&rid).await.unwrap();
    assert_eq!(
        api_code(
            b.register(Some(&revoked), "b", PrivateKey::generate().public())
                .await
                .unwrap_err()
        ),
        ErrorCode::TokenRevoked
    );

    let expired = srv
        .store
        .create_token(&NewToken {
            reusable: true,
            expires_in: Some(Duration::from_millis(1)),
            ..Default::default()
        })
        .await
        .unwrap()
        .1;
    tokio::time::sleep(Duration::from_millis(5)).await;
    let err = b
        .register(Some(&expired), "b", PrivateKey::generate().public())
        .await
        .unwrap_err();
    assert!(err.is_permanent());
    assert_eq!(api_code(err), ErrorCode::TokenExpired);

    assert_eq!(
        api_code(
            b.register(Some("wrn_x_y"), "b", PrivateKey::generate().public())
                .await
                .unwrap_err()
        ),
        ErrorCode::InvalidToken
    );
    assert_eq!(
        api_code(
            b.register(None, "b", PrivateKey::generate().public())
                .await
                .unwrap_err()
        ),
        ErrorCode::InvalidToken
    );
    assert!(srv
        .store
        .node_by_key(&b.node_key())
        .await
        .unwrap()
        .is_none());
}

#[tokio::test]
async fn a_removed_node_is_cut_off() {
    let dir = tempfile::tempdir().unwrap();
    let (srv, url, tok) = common::start_with_token(dir.path(), false).await;
    let a = client(&url, &dir.path().join("a"));
    let b = client(&url, &dir.path().join("b"));
    std::fs::create_dir_all(dir.path().join("a")).unwrap();
    a.register(Some(&tok), "a", PrivateKey::generate().public())
        .await
        .unwrap();
    b.register(Some(&tok), "b", PrivateKey::generate().public())
        .await
        .unwrap();
    let mut sa = a.map_stream();
    let mut sb = b.map_stream();
    let full = first_full(&mut sa).await;
    first_full(&mut sb).await;
    // b, registered a moment before, may come as a delta right after the
    // full map (the hub follows the store with a short delay). It must
    // be in a's map before it is removed: a stream that never told its
    // agent about a peer does not tell it about the peer's removal either.
    let kb = b.node_key();
    if !full.peers.contains_key(&kb) {
        expect(&mut sa, WITHIN, |ev| {
            matches!(ev, MapEvent::PeerAdded(p) if p.key == kb).then_some(())
        })
        .await;
    }

    // Removal through the administration path (as `node remove` does it).
    let out = warren_coordinator::admin::node_remove(&srv.store, "b")
        .await
        .unwrap();
    assert!(out.contains("removed node"), "{out}");
    expect(&mut sa, WITHIN, |ev| {
        matches!(ev, MapEvent::PeerRemoved(k) if *k == kb).then_some(())
    })
    .await;
    let reason = expect(&mut sb, Duration::from_secs(3), |ev| match ev {
        MapEvent::Revoked { reason } => Some(reason.clone()),
        _ => None,
    })
    .await;
    assert!(reason.contains("not registered"), "{reason}");
    assert!(sb.recv().await.is_none(), "stream ends after revocation");
    // Every request of the removed node is refused now.
    let eps = [Endpoint {
        addr: "192.0.2.9:1".parse().unwrap(),
        kind: EndpointKind::Host,
    }];
    assert_eq!(
        api_code(
            b.report_endpoints(&EndpointsReport::endpoints(&eps))
                .await
                .unwrap_err()
        ),
        ErrorCode::UnknownNode
    );
    assert_eq!(
        api_code(b.logout().await.unwrap_err()),
        ErrorCode::UnknownNode
    );

    // The cached map (deltas are saved within a second) lets a restarted
    // agent start without the coordinator.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    drop(sa);
    drop(srv);
    let mut again = a.map_stream();
    let cached = expect(&mut again, Duration::from_secs(2), |ev| match ev {
        MapEvent::Full {
            map,
            from_cache: true,
        } => Some(map.clone()),
        _ => None,
    })
    .await;
    assert!(cached.peers.is_empty());
    expect(&mut again, Duration::from_secs(5), |ev| {
        matches!(ev, MapEvent::Disconnected { .. }).then_some(())
    })
    .await;
}

#[tokio::test]
async fn ephemeral_nodes_go_on_logout_or_when_offline_too_long() {
    let dir = tempfile::tempdir().unwrap();
    let (srv, url, tok) = common::start_with_token(dir.path(), true).await;
    let watcher = client(&url, &dir.path().join("w"));
    watcher
        .register(Some(&tok), "w", PrivateKey::generate().public())
        .await
        .unwrap();
    let mut sw = watcher.map_stream();
    first_full(&mut sw).await;

    let e1 = client(&url, dir.path());
    assert!(
        e1.register(Some(&tok), "e1", PrivateKey::generate().public())
            .await
            .unwrap()
            .ephemeral
    );
    let k1 = e1.node_key();
    expect(&mut sw, WITHIN, |ev| {
        matches!(ev, MapEvent::PeerAdded(p) if p.key == k1).then_some(())
    })
    .await;
    e1.logout().await.unwrap();
    expect(&mut sw, WITHIN, |ev| {
        matches!(ev, MapEvent::PeerRemoved(k) if *k == k1).then_some(())
    })
    .await;
    assert!(srv.store.node_by_key(&k1).await.unwrap().is_none());

    // Offline past the (1 s, in tests) timeout: reaped.
    let e2 = client(&url, &dir.path().join("e2"));
    e2.register(Some(&tok), "e2", PrivateKey::generate().public())
        .await
        .unwrap();
    let k2 = e2.node_key();
    let mut s2 = e2.map_stream();
    first_full(&mut s2).await;
    drop(s2);
    expect(&mut sw, Duration::from_secs(5), |ev| {
        matches!(ev, MapEvent::PeerRemoved(k) if *k == k2).then_some(())
    })
    .await;
    assert!(srv.store.node_by_key(&k2).await.unwrap().is_none());
}

/// A node's NAT summary and home relay reach its peers as a delta, like
/// its endpoints do; a NAT mapping at another address than the request's
/// does not.
#[tokio::test]
async fn nat_and_home_relay_changes_reach_peers() {
    use warren::traversal::{Allocation, Mapping, NatSummary};
    common::init();
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = warren_coordinator::server::Config::new(
        "127.0.0.1:0".parse().unwrap(),
        dir.path().to_path_buf(),
    );
    cfg.keepalive = Duration::from_secs(1);
    cfg.relay_map.regions = [2, 3]
        .into_iter()
        .map(|id| warren::control::RelayRegion {
            id,
            name: format!("r{id}"),
            url: format!("http://127.0.0.1:{id}/relay"),
            stun: Vec::new(),
            key: None,
        })
        .collect();
    let srv = warren_coordinator::server::start(cfg).await.unwrap();
    let url = common::url(&srv);
    let tok = common::token(&srv.store, true, false).await;
    let (d0, d1) = (dir.path().join("0"), dir.path().join("1"));
    std::fs::create_dir_all(&d0).unwrap();
    std::fs::create_dir_all(&d1).unwrap();
    let (c0, c1) = (client(&url, &d0), client(&url, &d1));
    c0.register(Some(&tok), "zero", PrivateKey::generate().public())
        .await
        .unwrap();
    c1.register(Some(&tok), "one", PrivateKey::generate().public())
        .await
        .unwrap();
    let mut w = common::Watch::new(c0.map_stream()).await;
    let k1 = c1.node_key();
    w.until(WITHIN, "peer one", |m| m.peers.contains_key(&k1))
        .await;
    let nat = NatSummary {
        mapping: Mapping::EndpointDependent,
        allocation: Allocation::Sequential { step: 2 },
        observed: Some("198.51.100.20:5000".parse().unwrap()),
    };
    for home in [Some(2), Some(3), None] {
        c1.report_endpoints(&EndpointsReport {
            nat,
            home_relay: home,
            ..EndpointsReport::endpoints(&[])
        })
        .await
        .unwrap();
        // The mapping's address is not the one the request came from
        // (127.0.0.1): peers get the NAT's kind but not that address, which
        // they would aim hard-NAT probes at.
        let vouched = NatSummary {
            observed: None,
            ..nat
        };
        w.until(WITHIN, "nat and home relay", |m| {
            m.peers
                .get(&k1)
                .is_some_and(|p| p.nat == vouched && p.home_relay == home)
        })
        .await;
    }
    // A region the relay map does not have is refused and changes nothing.
    let err = c1
        .report_endpoints(&EndpointsReport {
            nat,
            home_relay: Some(9),
            ..EndpointsReport::endpoints(&[])
        })
        .await
        .unwrap_err();
    assert!(
        matches!(&err, ControlError::Api { code: ErrorCode::BadRequest, message, .. } if message.contains("home_relay 9")),
        "{err:?}"
    );
    let node = srv.store.list_nodes().await.unwrap();
    assert!(node.iter().all(|n| n.home_relay.is_none()), "{node:?}");
}
