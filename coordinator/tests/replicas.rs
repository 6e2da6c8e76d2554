//! Two coordinator replicas on one PostgreSQL database: agents connected to
//! different replicas see each other's changes within a second, a burst
//! of change notes is taken in batches, and a replica with the wrong key
//! refuses to start.

mod common;

use std::time::Duration;

use common::{client, expect, Watch};
use warren::control::{Endpoint, EndpointKind, EndpointsReport, MapEvent};
use warren::keys::PrivateKey;
use warren_coordinator::server::{self, Config, ServerError};

const WITHIN: Duration = Duration::from_secs(1);

#[tokio::test]
async fn agents_on_different_replicas_see_each_other() {
    common::init();
    let Some(db) = common::fresh_postgres().await else {
        return;
    };
    // Replicas share the coordinator key (same data directory here).
    let dir = tempfile::tempdir().unwrap();
    let r1 = common::start(dir.path(), Some(db.clone())).await;
    let r2 = common::start(dir.path(), Some(db.clone())).await;
    let tok = common::token(&r1.store, true, false).await;

    let a = client(&common::url(&r1), &dir.path().join("a"));
    let b = client(&common::url(&r2), &dir.path().join("b"));
    a.register(Some(&tok), "a", PrivateKey::generate().public())
        .await
        .unwrap();
    let mut sa = Watch::new(a.map_stream()).await;

    // B joins through replica 2: A (on replica 1) hears of it.
    b.register(Some(&tok), "b", PrivateKey::generate().public())
        .await
        .unwrap();
    let kb = b.node_key();
    sa.until(WITHIN, "B added", |m| m.peers.contains_key(&kb))
        .await;

    // B comes online and reports endpoints on replica 2.
    let mut sb = Watch::new(b.map_stream()).await;
    assert!(sb.map.peers.contains_key(&a.node_key()));
    let eps = [Endpoint {
        addr: "203.0.113.5:41641".parse().unwrap(),
        kind: EndpointKind::Portmapped,
    }];
    b.report_endpoints(&EndpointsReport::endpoints(&eps))
        .await
        .unwrap();
    sa.until(WITHIN, "B online with endpoints", |m| {
        m.peers
            .get(&kb)
            .is_some_and(|p| p.online && p.endpoints == eps)
    })
    .await;

    // A's endpoints reach B the other way round.
    let ka = a.node_key();
    a.report_endpoints(&EndpointsReport::endpoints(&eps))
        .await
        .unwrap();
    sb.until(WITHIN, "A's endpoints", |m| {
        m.peers.get(&ka).is_some_and(|p| p.endpoints == eps)
    })
    .await;

    // An administrator's removal through replica 2's store cuts B off and
    // reaches A on replica 1.
    let nb = r2.store.node_by_key(&kb).await.unwrap().unwrap();
    r2.store.remove_node(nb.id).await.unwrap();
    sa.until(WITHIN, "B removed", |m| !m.peers.contains_key(&kb))
        .await;
    expect(&mut sb.stream, Duration::from_secs(3), |ev| {
        matches!(ev, MapEvent::Revoked { .. }).then_some(())
    })
    .await;

    // A replica that made its own key cannot join this network.
    let other_dir = tempfile::tempdir().unwrap();
    let mut cfg = Config::new(
        "127.0.0.1:0".parse().unwrap(),
        other_dir.path().to_path_buf(),
    );
    cfg.database = Some(db);
    match server::start(cfg).await {
        Err(ServerError::KeyMismatch { .. }) => {}
        other => panic!("expected a key mismatch, got {other:?}"),
    }
}

/// A burst of change notes (here 300, committed at once) is dispatched in
/// a few batches, not one by one: a hub that read PostgreSQL's notes one
/// at a time paid a node load and a compilation of the access rules per
/// note, and at 10,000 nodes fell thousands of nodes behind (issue 19).
#[tokio::test]
async fn a_burst_of_notes_is_taken_in_batches() {
    use sqlx::Connection as _;
    common::init();
    let Some(db) = common::fresh_postgres().await else {
        return;
    };
    let store = warren_coordinator::store::Store::open(&db).await.unwrap();
    let hub = warren_coordinator::hub::Hub::new();
    let _feed = hub.spawn(store, Duration::from_secs(10)).await;
    // Notes for nodes that do not exist: each is loaded and skipped, which
    // is all this test needs of them.
    let key = PrivateKey::generate().public();
    let mut conn = sqlx::PgConnection::connect(&db).await.unwrap();
    let mut tx = conn.begin().await.unwrap();
    const NOTES: u64 = 300;
    for id in 0..NOTES {
        sqlx::query("SELECT pg_notify($1, $2)")
            .bind(warren_coordinator::store::PG_CHANNEL)
            .bind(format!("upsert:{}:{key}", 1_000_000 + id))
            .execute(&mut *tx)
            .await
            .unwrap();
    }
    tx.commit().await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while hub.dispatched().1 < NOTES {
        assert!(
            tokio::time::Instant::now() < deadline,
            "only {:?} (batches, notes) dispatched",
            hub.dispatched()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (batches, notes) = hub.dispatched();
    assert_eq!(notes, NOTES);
    assert!(
        batches <= NOTES / 10,
        "{notes} notes took {batches} batches"
    );
}
