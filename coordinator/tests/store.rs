//! The store on both backends: the same suite runs against SQLite and (when
//! `WARREN_TEST_POSTGRES_URL` is set) a fresh PostgreSQL database.
#![allow(clippy::unwrap_used)] // helpers outside #[test] fns

mod common;

use std::collections::HashSet;
use std::time::Duration;

use warren::keys::PrivateKey;
use warren_coordinator::store::{NewToken, RegisterInput, Store, StoreError};

fn input(token: Option<&str>, key: &PrivateKey, host: &str) -> RegisterInput {
    RegisterInput {
        token: token.map(str::to_owned),
        node_key: key.public(),
        disco_key: PrivateKey::generate().public(),
        hostname: host.to_owned(),
        os: "linux".into(),
        version: "0.1.0".into(),
        tags: None,
        routes: None,
    }
}

async fn register(
    store: &Store,
    token: Option<&str>,
    key: &PrivateKey,
    host: &str,
) -> Result<warren_coordinator::store::Registered, StoreError> {
    let ula = store.ula_prefix().await?;
    let mut tx = store.begin().await?;
    let r = store
        .register(&mut tx, &input(token, key, host), ula)
        .await?;
    tx.commit().await?;
    Ok(r)
}

async fn suite(store: Store) {
    // The ULA prefix is made once and kept.
    let ula = store.ula_prefix().await.unwrap();
    assert_eq!(store.ula_prefix().await.unwrap(), ula);
    assert_eq!(ula.octets()[0], 0xfd);

    // A reusable token registers many nodes, each with unique addresses in
    // the right ranges, and a unique name even for the same hostname.
    let reusable = store
        .create_token(&NewToken {
            reusable: true,
            tags: vec!["t1".into()],
            ..Default::default()
        })
        .await
        .unwrap()
        .1;
    let mut v4 = HashSet::new();
    let mut names = HashSet::new();
    let mut keys = Vec::new();
    for _ in 0..40 {
        let k = PrivateKey::generate();
        let r = register(&store, Some(&reusable), &k, "Same Host")
            .await
            .unwrap();
        assert!(r.created);
        let ip = r.node.ipv4.octets();
        assert_eq!(ip[0], 100);
        assert!((64..128).contains(&ip[1]), "{}", r.node.ipv4);
        assert_eq!(&r.node.ipv6.octets()[..6], &ula.octets()[..6]);
        assert_eq!(&r.node.ipv6.octets()[12..], &ip);
        assert_eq!(r.node.tags, vec!["t1".to_string()]);
        assert!(v4.insert(r.node.ipv4));
        assert!(
            names.insert(r.node.name.clone()),
            "duplicate name {}",
            r.node.name
        );
        keys.push((k, r.node));
    }
    assert!(names.contains("same-host"));

    // Re-registering a key keeps id and addresses, needs no token, spends
    // nothing; a changed hostname renames the node (`up --hostname`).
    let (k0, n0) = &keys[0];
    let again = register(&store, None, k0, "renamed-host").await.unwrap();
    assert!(!again.created);
    assert_eq!(
        (again.node.id, again.node.ipv4, again.node.ipv6),
        (n0.id, n0.ipv4, n0.ipv6)
    );
    assert_eq!(again.node.hostname, "renamed-host");
    assert_eq!(again.node.name, "renamed-host");
    // The same hostname again (a restart) keeps an admin's rename.
    store.rename_node(n0.id, "admin-name").await.unwrap();
    let again = register(&store, None, k0, "renamed-host").await.unwrap();
    assert_eq!(again.node.name, "admin-name");

    // Advertised tags are stored apart from the token's, shown together in
    // the map; re-registering without tags keeps them, an empty list clears.
    let tagged = |tags: Option<Vec<&str>>| {
        let mut i = input(None, k0, "renamed-host");
        i.tags = tags.map(|t| t.into_iter().map(str::to_owned).collect());
        i
    };
    let reg = |i: RegisterInput| {
        let store = &store;
        async move {
            let ula = store.ula_prefix().await.unwrap();
            let mut tx = store.begin().await.unwrap();
            let r = store.register(&mut tx, &i, ula).await.unwrap();
            tx.commit().await.unwrap();
            r.node
        }
    };
    let n = reg(tagged(Some(vec!["tag:db", "tag:server"]))).await;
    assert_eq!(n.tags, vec!["t1".to_string()]);
    assert_eq!(n.advertised_tags, vec!["tag:db", "tag:server"]);
    assert_eq!(n.to_peer().tags, vec!["t1", "tag:db", "tag:server"]);
    assert_eq!(n.to_peer().os, "linux");
    let n = reg(tagged(None)).await;
    assert_eq!(n.advertised_tags, vec!["tag:db", "tag:server"]);
    let n = reg(tagged(Some(vec![]))).await;
    assert!(n.advertised_tags.is_empty());
    assert_eq!(n.to_peer().tags, vec!["t1"]);

    // A one-off token works once; the same key may come back with it.
    let once = store.create_token(&NewToken::default()).await.unwrap().1;
    let k = PrivateKey::generate();
    register(&store, Some(&once), &k, "a").await.unwrap();
    register(&store, Some(&once), &k, "a").await.unwrap();
    let other = PrivateKey::generate();
    assert!(matches!(
        register(&store, Some(&once), &other, "b").await,
        Err(StoreError::TokenUsed)
    ));

    // Wrong, revoked and expired tokens are refused, and refusals roll back.
    let before = common::snapshot(&store).await;
    assert!(matches!(
        register(&store, Some("wrn_nope_nope"), &other, "b").await,
        Err(StoreError::InvalidToken)
    ));
    assert!(matches!(
        register(&store, None, &other, "b").await,
        Err(StoreError::InvalidToken)
    ));
    let (rid, revoked) = store.create_token(&NewToken::default()).await.unwrap();
    store.revoke_token(&rid).await.unwrap();
    let expired = store
        .create_token(&NewToken {
            expires_in: Some(Duration::from_millis(1)),
            ..Default::default()
        })
        .await
        .unwrap()
        .1;
    tokio::time::sleep(Duration::from_millis(5)).await;
    assert!(matches!(
        register(&store, Some(&revoked), &other, "b").await,
        Err(StoreError::TokenRevoked)
    ));
    assert!(matches!(
        register(&store, Some(&expired), &other, "b").await,
        Err(StoreError::TokenExpired)
    ));
    assert!(matches!(
        store.revoke_token("missing").await,
        Err(StoreError::NoSuchToken(_))
    ));
    let after = common::snapshot(&store).await;
    // Only the two new token rows differ.
    assert_eq!(before.lines().nth(1), after.lines().nth(1), "nodes changed");

    // Rename and remove.
    let (_, n1) = &keys[1];
    let renamed = store.rename_node(n1.id, "web-1").await.unwrap();
    assert_eq!(renamed.name, "web-1");
    assert!(matches!(
        store.rename_node(keys[2].1.id, "web-1").await,
        Err(StoreError::Invalid(_))
    ));
    assert!(matches!(
        store.rename_node(n1.id, "Bad Name").await,
        Err(StoreError::Invalid(_))
    ));
    assert_eq!(store.find_node("web-1").await.unwrap().id, n1.id);
    store.remove_node(n1.id).await.unwrap();
    assert!(store.node_by_key(&n1.key).await.unwrap().is_none());
    assert!(matches!(
        store.remove_node(n1.id).await,
        Err(StoreError::NoSuchNode(_))
    ));

    // Nonces: the second use of one is a replay, and the transaction that
    // saw the replay changed nothing.
    let mut tx = store.begin().await.unwrap();
    Store::consume_nonce(&mut tx, "nonce-aaaaaaaaaaaaaaaa", &k0.public(), 5)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let mut tx = store.begin().await.unwrap();
    assert!(matches!(
        Store::consume_nonce(&mut tx, "nonce-aaaaaaaaaaaaaaaa", &k0.public(), 5).await,
        Err(StoreError::Replayed)
    ));
    drop(tx);

    // Ephemeral nodes disappear once offline past the timeout; others stay.
    let eph = store
        .create_token(&NewToken {
            reusable: true,
            ephemeral: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .1;
    let ke = PrivateKey::generate();
    let e = register(&store, Some(&eph), &ke, "eph").await.unwrap().node;
    assert!(e.ephemeral);
    let nodes_before = store.list_nodes().await.unwrap().len();
    tokio::time::sleep(Duration::from_millis(30)).await;
    let (_, removed) = store.reap(60_000, 10).await.unwrap();
    assert_eq!(removed, 1);
    assert!(store.node_by_key(&ke.public()).await.unwrap().is_none());
    assert_eq!(store.list_nodes().await.unwrap().len(), nodes_before - 1);
}

#[tokio::test]
async fn sqlite_store() {
    common::init();
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&Store::sqlite_url(dir.path())).await.unwrap();
    suite(store).await;
    // Opening again migrates nothing and keeps the data.
    let again = Store::open(&Store::sqlite_url(dir.path())).await.unwrap();
    assert!(!again.list_nodes().await.unwrap().is_empty());
}

#[tokio::test]
async fn postgres_store() {
    common::init();
    let Some(url) = common::fresh_postgres().await else {
        return;
    };
    let store = Store::open(&url).await.unwrap();
    suite(store).await;
    let again = Store::open(&url).await.unwrap();
    assert!(!again.list_nodes().await.unwrap().is_empty());
}

/// A SQLite store in `dir`, and a PostgreSQL one when a server is set up.
async fn both_backends(dir: &std::path::Path) -> Vec<Store> {
    let mut stores = vec![Store::open(&Store::sqlite_url(dir)).await.unwrap()];
    if let Some(url) = common::fresh_postgres().await {
        stores.push(Store::open(&url).await.unwrap());
    }
    stores
}

#[tokio::test]
async fn concurrent_one_off_registrations_admit_one() {
    common::init();
    let dir = tempfile::tempdir().unwrap();
    for store in both_backends(dir.path()).await {
        let once = store.create_token(&NewToken::default()).await.unwrap().1;
        let mut tasks = Vec::new();
        for i in 0..8 {
            let (store, once) = (store.clone(), once.clone());
            tasks.push(tokio::spawn(async move {
                register(
                    &store,
                    Some(&once),
                    &PrivateKey::generate(),
                    &format!("n{i}"),
                )
                .await
            }));
        }
        let mut ok = 0;
        for t in tasks {
            match t.await.unwrap() {
                Ok(_) => ok += 1,
                Err(StoreError::TokenUsed) => {}
                Err(e) => panic!("unexpected {e}"),
            }
        }
        assert_eq!(ok, 1, "{:?}", store.backend());
    }
}

/// The NAT summary and home relay from an endpoint report are stored and
/// reach the peers' view of the node; a later report replaces them.
#[tokio::test]
async fn nat_and_home_relay_round_trip_on_both_backends() {
    use warren::control::{Endpoint, EndpointKind, EndpointsReport};
    use warren::traversal::{Allocation, Mapping, NatSummary};
    common::init();
    let dir = tempfile::tempdir().unwrap();
    for store in both_backends(dir.path()).await {
        let tok = store.create_token(&NewToken::default()).await.unwrap().1;
        let key = PrivateKey::generate();
        let node = register(&store, Some(&tok), &key, "n").await.unwrap().node;
        // Fresh nodes have neither.
        assert_eq!(node.nat, NatSummary::default());
        assert_eq!(node.to_peer().home_relay, None);
        let nat = NatSummary {
            mapping: Mapping::EndpointDependent,
            allocation: Allocation::Random,
            observed: Some("203.0.113.9:41641".parse().unwrap()),
        };
        let report = EndpointsReport {
            nat,
            home_relay: Some(7),
            ..EndpointsReport::endpoints(&[Endpoint {
                addr: "192.0.2.4:41641".parse().unwrap(),
                kind: EndpointKind::Host,
            }])
        };
        let mut tx = store.begin().await.unwrap();
        store.set_endpoints(&mut tx, &node, &report).await.unwrap();
        tx.commit().await.unwrap();
        let back = store.node_by_key(&key.public()).await.unwrap().unwrap();
        let peer = back.to_peer();
        assert_eq!(
            (peer.nat, peer.home_relay),
            (nat, Some(7)),
            "{:?}",
            store.backend()
        );
        assert_eq!(store.list_nodes().await.unwrap()[0].home_relay, Some(7));
        // A report without them clears them (they describe the node now).
        let mut tx = store.begin().await.unwrap();
        store
            .set_endpoints(&mut tx, &back, &EndpointsReport::endpoints(&[]))
            .await
            .unwrap();
        tx.commit().await.unwrap();
        let cleared = store.node_by_key(&key.public()).await.unwrap().unwrap();
        assert_eq!(
            (cleared.nat, cleared.home_relay),
            (NatSummary::default(), None)
        );
    }
}

/// Two processes opening one new SQLite file at once (the admin CLI's
/// `token create` while `serve` starts, as `tests/demo.sh` does) both
/// succeed: each migration is applied once, by whoever claims it first.
#[tokio::test]
async fn two_stores_migrating_one_new_sqlite_file_at_once_both_open() {
    for round in 0..5 {
        let dir = tempfile::tempdir().unwrap();
        let url = Store::sqlite_url(dir.path());
        let (a, b) = tokio::join!(Store::open(&url), Store::open(&url));
        assert!(
            a.is_ok() && b.is_ok(),
            "round {round}: {a:?} / {b:?}",
            a = a.err(),
            b = b.err()
        );
    }
}
