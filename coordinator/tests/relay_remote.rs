//! A standalone relay following a coordinator's node feed: a fake
//! coordinator endpoint (checking the relay's MAC header exactly as the real
//! one must) streams a snapshot and a removal; the relay admits the listed
//! nodes and drops the removed one within 2 s. A relay with the wrong
//! secret is refused by the coordinator and admits nobody.

#![allow(clippy::unwrap_used)] // helpers of a test crate

mod relay_support;

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use relay_support::*;
use tokio::sync::{mpsc, Mutex};
use warren::keys::{NodeKey, PrivateKey};
use warren::proto::relay::nodes::{verify_auth_header, NodesEvent, NODES_PATH};
use warren::relay_client::{RelayEvent, RelayTransport};
use warren_coordinator::relay::remote::{spawn_remote_admission, RemoteAdmissionConfig};

const SECRET: &[u8] = b"relay shared secret for tests";

type Feed = std::sync::Arc<Mutex<Option<mpsc::Receiver<NodesEvent>>>>;

async fn nodes_feed(State(feed): State<Feed>, headers: HeaderMap) -> Response {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let auth = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if verify_auth_header(SECRET, auth, now).is_err() {
        return (
            StatusCode::UNAUTHORIZED,
            r#"{"code":"unauthorized","message":"bad relay MAC"}"#,
        )
            .into_response();
    }
    let Some(rx) = feed.lock().await.take() else {
        return StatusCode::CONFLICT.into_response();
    };
    let lines = futures_util::stream::unfold(rx, |mut rx| async move {
        let ev = rx.recv().await?;
        let mut line = serde_json::to_vec(&ev).unwrap();
        line.push(b'\n');
        Some((Ok::<_, std::io::Error>(Bytes::from(line)), rx))
    });
    (
        [("content-type", "application/x-ndjson")],
        Body::from_stream(lines),
    )
        .into_response()
}

async fn fake_coordinator() -> (String, mpsc::Sender<NodesEvent>) {
    let (tx, rx) = mpsc::channel(16);
    let feed: Feed = std::sync::Arc::new(Mutex::new(Some(rx)));
    let app = axum::Router::new()
        .route(NODES_PATH, axum::routing::get(nodes_feed))
        .with_state(feed);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, tx)
}

fn feed_config(url: &str, secret: &[u8]) -> RemoteAdmissionConfig {
    RemoteAdmissionConfig {
        coordinator_url: url.to_string(),
        allow_plain: true,
        secret: secret.to_vec(),
        relay_key: PrivateKey::generate().public(),
        tls: None,
    }
}

async fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !f() {
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn relay_follows_coordinator_feed_and_drops_removed_nodes() {
    init();
    let (a, b) = (PrivateKey::generate(), PrivateKey::generate());
    let (url, feed) = fake_coordinator().await;
    let (admission, _task) = spawn_remote_admission(feed_config(&url, SECRET));
    let relay = TestRelay::start_with(false, limits(), admission.clone()).await;

    let nodes: Vec<NodeKey> = vec![a.public(), b.public()];
    feed.send(NodesEvent::Snapshot { nodes }).await.unwrap();
    wait_until("snapshot", || admission.len() == 2).await;

    let (_atx, mut arx) = relay.client(&a, RelayTransport::Upgrade).await;
    let (btx, _brx) = relay.client(&b, RelayTransport::Upgrade).await;
    btx.send(a.public(), Bytes::from_static(b"hello"))
        .await
        .unwrap();
    assert!(next_packet(&mut arx, Duration::from_secs(5))
        .await
        .is_some());

    let t0 = Instant::now();
    feed.send(NodesEvent::Remove { node: a.public() })
        .await
        .unwrap();
    match next_event(&mut arx, Duration::from_secs(2)).await {
        Some(RelayEvent::Disconnected { error }) => assert!(error.contains("Removed"), "{error}"),
        other => panic!("not disconnected within 2 s: {other:?}"),
    }
    assert!(t0.elapsed() < Duration::from_secs(2));
    assert!(!admission.contains(&a.public()));
    assert!(admission.contains(&b.public()));
}

#[tokio::test]
async fn wrong_secret_is_refused_and_admits_nobody() {
    init();
    let a = PrivateKey::generate();
    let (url, feed) = fake_coordinator().await;
    let (admission, _task) = spawn_remote_admission(feed_config(&url, b"wrong"));
    let relay = TestRelay::start_with(false, limits(), admission.clone()).await;
    // Would be admitted if the feed had been accepted.
    let _ = feed.try_send(NodesEvent::Snapshot {
        nodes: vec![a.public()],
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(admission.is_empty());
    let (_tx, mut rx) =
        warren::relay_client::RelayClient::connect(relay.config(RelayTransport::Upgrade), &a);
    match next_event(&mut rx, Duration::from_secs(5)).await {
        Some(RelayEvent::Disconnected { error }) => {
            assert!(error.contains("UnknownKey"), "{error}")
        }
        other => panic!("{other:?}"),
    }
}
