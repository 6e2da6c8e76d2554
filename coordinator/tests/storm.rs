//! Map streams under load, over real HTTP: every node coming online at once
//! (the storm after a coordinator restart), and a seeded random run of
//! registrations, re-registrations under a removed key, endpoint reports,
//! removals and streams opening and closing, while one watcher does not
//! read its stream at all. Either way every stream must end holding exactly
//! the network in the store.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use common::Watch;
use rand::rngs::StdRng;
use rand::{Rng as _, SeedableRng as _};
use warren::control::{ControlClient, Endpoint, EndpointKind, EndpointsReport, NetMap, Peer};
use warren::keys::{NodeKey, PrivateKey};
use warren_coordinator::server::Running;

/// What a peer looks like, minus `last_seen_ms` (liveness refreshes move
/// it without a change note, by design).
fn shape(p: &Peer) -> (String, std::net::Ipv4Addr, Vec<Endpoint>, bool) {
    (p.name.clone(), p.ipv4, p.endpoints.clone(), p.online)
}

/// The peers `me` should see, from the store.
async fn truth(srv: &Running, me: &NodeKey) -> BTreeMap<NodeKey, Peer> {
    srv.store
        .list_nodes()
        .await
        .unwrap()
        .into_iter()
        .filter(|n| n.key != *me)
        .map(|n| (n.key, n.to_peer()))
        .collect()
}

fn same(map: &NetMap, want: &BTreeMap<NodeKey, Peer>) -> bool {
    map.peers.len() == want.len()
        && want
            .iter()
            .all(|(k, p)| map.peers.get(k).is_some_and(|q| shape(q) == shape(p)))
}

async fn registered(
    url: &str,
    dir: &Path,
    tok: &str,
    name: &str,
    key: PrivateKey,
) -> ControlClient {
    let state = dir.join(name);
    std::fs::create_dir_all(&state).unwrap();
    let c = ControlClient::new(url, key, &state).unwrap();
    c.register(Some(tok), name, PrivateKey::generate().public())
        .await
        .unwrap();
    c
}

#[tokio::test]
async fn a_reconnect_storm_settles_with_every_stream_holding_the_network() {
    let dir = tempfile::tempdir().unwrap();
    let (srv, url, tok) = common::start_with_token(dir.path(), false).await;
    let mut clients = Vec::new();
    for i in 0..60 {
        let name = format!("n{i}");
        clients.push(registered(&url, dir.path(), &tok, &name, PrivateKey::generate()).await);
    }
    // Every node comes online at once.
    let streams: Vec<_> = clients.iter().map(|c| c.map_stream()).collect();
    let mut watches = Vec::new();
    for s in streams {
        watches.push(Watch::new(s).await);
    }
    for (c, w) in clients.iter().zip(&mut watches) {
        let me = c.node_key();
        w.until(Duration::from_secs(10), "every peer online", |m| {
            m.peers.len() == 59 && m.peers.values().all(|p| p.online)
        })
        .await;
        assert!(same(&w.map, &truth(&srv, &me).await));
        assert!(w.map.self_node.online);
    }
}

async fn random_run(srv: Running, seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed);
    let dir = tempfile::tempdir().unwrap();
    let url = common::url(&srv);
    let tok = common::token(&srv.store, true, false).await;
    let watcher = registered(&url, dir.path(), &tok, "watcher", PrivateKey::generate()).await;
    // The watcher's stream is opened and then not read until the end.
    let mut watch = Watch::new(watcher.map_stream()).await;

    let mut nodes: Vec<(
        ControlClient,
        PrivateKey,
        Option<warren::control::MapStream>,
    )> = Vec::new();
    let mut removed: Vec<PrivateKey> = Vec::new();
    for step in 0..120 {
        let op = rng.gen_range(0..100);
        if nodes.is_empty() || op < 25 {
            // A registration; sometimes under a key that was removed.
            let key = if !removed.is_empty() && rng.gen_bool(0.4) {
                removed.swap_remove(rng.gen_range(0..removed.len()))
            } else {
                PrivateKey::generate()
            };
            let name = format!("s{step}");
            let c = registered(&url, dir.path(), &tok, &name, key.clone()).await;
            nodes.push((c, key, None));
            continue;
        }
        let i = rng.gen_range(0..nodes.len());
        match op {
            25..=39 => {
                let (c, key, stream) = nodes.swap_remove(i);
                drop(stream);
                let n = srv.store.node_by_key(&c.node_key()).await.unwrap().unwrap();
                srv.store.remove_node(n.id).await.unwrap();
                removed.push(key);
            }
            40..=69 => {
                // Online or offline.
                let (c, _, stream) = &mut nodes[i];
                *stream = match stream.take() {
                    Some(_) => None,
                    None => Some(c.map_stream()),
                };
            }
            _ => {
                let eps = [Endpoint {
                    addr: format!("192.0.2.{}:{}", rng.gen_range(1..255), 1000 + step)
                        .parse()
                        .unwrap(),
                    kind: EndpointKind::Srflx,
                }];
                nodes[i]
                    .0
                    .report_endpoints(&EndpointsReport::endpoints(&eps))
                    .await
                    .unwrap();
            }
        }
    }
    // Streams that were just opened count as online once the coordinator
    // has them: wait until the store agrees with the test about who is.
    let online = |n: &(ControlClient, PrivateKey, Option<_>)| n.2.is_some();
    let want_online: BTreeMap<NodeKey, bool> =
        nodes.iter().map(|n| (n.0.node_key(), online(n))).collect();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let now: BTreeMap<NodeKey, bool> = truth(&srv, &watcher.node_key())
            .await
            .into_iter()
            .map(|(k, p)| (k, p.online))
            .collect();
        if now == want_online {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "seed {seed}: the store never settled"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let want = truth(&srv, &watcher.node_key()).await;
    watch
        .until(Duration::from_secs(10), "the watcher's map", |m| {
            same(m, &want)
        })
        .await;
    // Nothing later (a stale delta written out of order) undoes it. A late
    // delta that repeats the settled state (an offline node's last-seen
    // time written once more) is harmless; one that changes it is not.
    while let Ok(Some(ev)) =
        tokio::time::timeout(Duration::from_millis(600), watch.stream.recv()).await
    {
        match ev {
            warren::control::MapEvent::Full { map, .. } => watch.map = map,
            warren::control::MapEvent::PeerAdded(ref p)
            | warren::control::MapEvent::PeerChanged(ref p) => {
                watch.map.peers.insert(p.key, p.clone());
                assert!(
                    same(&watch.map, &want),
                    "seed {seed}: a change after the network settled: {ev:?}"
                );
            }
            _ => panic!("seed {seed}: a change after the network settled: {ev:?}"),
        }
    }
    assert!(same(&watch.map, &want), "seed {seed}");
}

#[tokio::test]
async fn random_changes_reach_a_slow_reader_in_order_sqlite() {
    common::init();
    for seed in [1, 2] {
        let dir = tempfile::tempdir().unwrap();
        random_run(common::start(dir.path(), None).await, seed).await;
    }
}

#[tokio::test]
async fn random_changes_reach_a_slow_reader_in_order_postgres() {
    common::init();
    let Some(db) = common::fresh_postgres().await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    random_run(common::start(dir.path(), Some(db)).await, 3).await;
}

/// Why 10,000 agents reconnecting at once stalled the coordinator
/// (issue 19): each stream opening was two transactions of its own, queued
/// on SQLite's single connection until those at the back timed out. Here
/// 300 open at once; every one must get its map, and their writes must go
/// in batches (`api::presence`): a transaction per stream, the old way,
/// would be 600.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_hundred_streams_opening_at_once_share_their_transactions() {
    const N: usize = 300;
    let dir = tempfile::tempdir().unwrap();
    let (srv, url, tok) = common::start_with_token(dir.path(), false).await;
    let ula = srv.store.ula_prefix().await.unwrap();
    let mut clients = Vec::new();
    for i in 0..N {
        let key = PrivateKey::generate();
        let input = warren_coordinator::store::RegisterInput {
            token: Some(tok.clone()),
            node_key: key.public(),
            disco_key: PrivateKey::generate().public(),
            hostname: format!("n{i}"),
            os: "linux".into(),
            version: "0".into(),
            tags: None,
            routes: None,
        };
        let mut tx = srv.store.begin().await.unwrap();
        srv.store.register(&mut tx, &input, ula).await.unwrap();
        tx.commit().await.unwrap();
        let state = dir.path().join(format!("n{i}"));
        std::fs::create_dir_all(&state).unwrap();
        clients.push(ControlClient::new(&url, key, &state).unwrap());
    }
    let before = srv.store.transactions_begun();
    let streams: Vec<_> = clients.iter().map(|c| c.map_stream()).collect();
    let t = std::time::Instant::now();
    let opened = futures_util::future::join_all(streams.into_iter().map(|mut s| async move {
        // Bounded generously: 300 clients parse 300 maps of 300 peers on
        // the same two cores, in a debug build.
        let map = common::expect(&mut s, Duration::from_secs(60), |ev| match ev {
            warren::control::MapEvent::Full {
                map,
                from_cache: false,
            } => Some(map.clone()),
            _ => None,
        })
        .await;
        (s, map)
    }))
    .await;
    eprintln!("{N} streams open with full maps in {:.1?}", t.elapsed());
    let used = srv.store.transactions_begun() - before;
    assert_eq!(opened.len(), N);
    // The hub may have been a poll behind the registrations: what is
    // missing from a first map follows as deltas.
    let mut watches: Vec<Watch> = Vec::new();
    for (stream, map) in opened {
        watches.push(Watch { stream, map });
        let w = watches.last_mut().unwrap();
        w.until(Duration::from_secs(30), "every other node, online", |m| {
            m.peers.len() == N - 1 && m.peers.values().all(|p| p.online)
        })
        .await;
    }
    assert!(
        used < N as u64 / 3,
        "{N} streams opening at once began {used} transactions"
    );
    // And each is counted: every node is online.
    let online = srv.store.list_nodes().await.unwrap();
    assert!(online.iter().all(|n| n.online), "every node online");
}
