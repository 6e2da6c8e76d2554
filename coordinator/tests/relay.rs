//! Relay server tests on loopback with real TCP and TLS: forwarding, the
//! WebSocket path, a CONNECT proxy, admission, proof of key, removal,
//! limits, and a standalone relay following a (fake) coordinator's node
//! feed, whose endpoint checks the relay's MAC header exactly as the real
//! one must.

#![allow(clippy::unwrap_used)] // helpers of a test crate

mod relay_support;

use std::time::{Duration, Instant};

use bytes::Bytes;
use relay_support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use warren::keys::PrivateKey;
use warren::proto::relay::{Frame, PeerGoneReason, RefuseReason};
use warren::relay_client::{RelayClient, RelayEvent, RelayTransport};

use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use tokio::sync::{mpsc, Mutex};
use warren::keys::NodeKey;
use warren::proto::relay::auth::{verify_auth_header, NodesEvent, NODES_PATH};
use warren_coordinator::relay::{spawn_remote_admission, RemoteAdmissionConfig};

const T: Duration = Duration::from_secs(5);

async fn exchange(tls: bool, ta: RelayTransport, tb: RelayTransport) {
    let (a, b) = (PrivateKey::generate(), PrivateKey::generate());
    let relay = TestRelay::start(tls, limits(), &[a.public(), b.public()]).await;
    let (atx, mut arx) = relay.client(&a, ta).await;
    let (btx, mut brx) = relay.client(&b, tb).await;
    for i in 0..100u32 {
        let payload = Bytes::from(format!("a->b {i}").repeat(1 + (i as usize % 50)));
        atx.send(b.public(), payload.clone()).await.unwrap();
        let (src, got) = next_packet(&mut brx, T).await.expect("b receives");
        assert_eq!((src, got), (a.public(), payload));
    }
    btx.send(a.public(), Bytes::from_static(b"b->a"))
        .await
        .unwrap();
    assert_eq!(
        next_packet(&mut arx, T).await,
        Some((b.public(), Bytes::from_static(b"b->a")))
    );
    // The writer counts a packet after its write returns, which can be a
    // moment after the peer has read it.
    let t0 = Instant::now();
    while relay.server.health().packets_forwarded < 101 && t0.elapsed() < T {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let h = relay.server.health();
    assert_eq!(h.clients, 2);
    let ws = [ta, tb]
        .iter()
        .filter(|t| **t == RelayTransport::WebSocket)
        .count() as u64;
    assert_eq!(
        (h.connections_websocket, h.connections_upgrade),
        (ws, 2 - ws),
        "each connection is counted by its path"
    );
    assert_eq!(h.packets_in, 101);
    assert_eq!(h.packets_forwarded, 101);
    assert!(h.bytes_in > 0 && h.bytes_out > 0);
}

#[tokio::test]
async fn two_clients_exchange_packets_over_tls_upgrade() {
    exchange(true, RelayTransport::Upgrade, RelayTransport::Upgrade).await;
}

#[tokio::test]
async fn websocket_path_works_and_mixes_with_upgrade() {
    exchange(true, RelayTransport::WebSocket, RelayTransport::Upgrade).await;
    exchange(false, RelayTransport::WebSocket, RelayTransport::WebSocket).await;
}

#[tokio::test]
async fn plain_lab_mode_and_metrics_endpoint() {
    let a = PrivateKey::generate();
    let relay = TestRelay::start(false, limits(), &[a.public()]).await;
    let (atx, mut arx) = relay.client(&a, RelayTransport::Upgrade).await;
    // Sending to a key that is not connected: dropped, and we are told.
    let ghost = PrivateKey::generate().public();
    atx.send(ghost, Bytes::from_static(b"x")).await.unwrap();
    match next_event(&mut arx, T).await {
        Some(RelayEvent::PeerGone { key, reason }) => {
            assert_eq!((key, reason), (ghost, PeerGoneReason::NotHere))
        }
        other => panic!("{other:?}"),
    }
    let mut s = tokio::net::TcpStream::connect(relay.addr).await.unwrap();
    s.write_all(b"GET /relay/metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut body = String::new();
    s.read_to_string(&mut body).await.unwrap();
    assert!(body.starts_with("HTTP/1.1 200"), "{body}");
    let json = &body[body.find("\r\n\r\n").unwrap() + 4..];
    let h: warren::proto::relay::RelayHealth = serde_json::from_str(json).unwrap();
    assert_eq!(h.clients, 1);
    assert_eq!(h.drop_no_such_peer, 1);
    // The health frame carries the same counters.
    atx.request_health().unwrap();
    match next_event(&mut arx, T).await {
        Some(RelayEvent::Health(h)) => assert_eq!(h.drop_no_such_peer, 1),
        other => panic!("{other:?}"),
    }
}

#[test]
fn tls_config_from_pem_files() {
    init();
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let dir = std::env::temp_dir().join(format!("warren-relay-pem-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&cert, ck.cert.pem()).unwrap();
    std::fs::write(&key, ck.signing_key.serialize_pem()).unwrap();
    assert!(warren_coordinator::listen::tls_config_from_pem(&cert, &key, false).is_ok());
    let missing = dir.join("missing.pem");
    let err = warren_coordinator::listen::tls_config_from_pem(&missing, &key, false).unwrap_err();
    assert!(err.to_string().contains("missing.pem"), "{err}");
    std::fs::write(&cert, "").unwrap();
    assert!(warren_coordinator::listen::tls_config_from_pem(&cert, &key, false).is_err());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn plain_get_without_upgrade_is_refused() {
    let relay = TestRelay::start(false, limits(), &[]).await;
    let mut s = tokio::net::TcpStream::connect(relay.addr).await.unwrap();
    s.write_all(b"GET /relay HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut body = String::new();
    s.read_to_string(&mut body).await.unwrap();
    assert!(body.starts_with("HTTP/1.1 426"), "{body}");
}

#[tokio::test]
async fn unknown_key_is_refused_and_cannot_send() {
    let (a, stranger) = (PrivateKey::generate(), PrivateKey::generate());
    let relay = TestRelay::start(true, limits(), &[a.public()]).await;
    let (_atx, mut arx) = relay.client(&a, RelayTransport::Upgrade).await;

    let mut raw = relay.raw().await;
    let answer = raw.hello(&stranger, stranger.public()).await;
    assert_eq!(
        answer,
        Some(Frame::Refused {
            reason: RefuseReason::UnknownKey
        })
    );
    // Whatever it sends now goes nowhere, and the relay hangs up.
    let _ = raw
        .io
        .write_all(
            &Frame::SendPacket {
                dest: a.public(),
                packet: Bytes::from_static(b"sneaky"),
            }
            .to_bytes(),
        )
        .await;
    assert_eq!(raw.recv(Duration::from_secs(2)).await, None);
    assert_eq!(
        next_packet(&mut arx, Duration::from_millis(300)).await,
        None
    );

    // The library client reports the refusal.
    let (_tx, mut rx) = RelayClient::connect(relay.config(RelayTransport::Upgrade), &stranger);
    match next_event(&mut rx, T).await {
        Some(RelayEvent::Disconnected { error }) => {
            assert!(error.contains("UnknownKey"), "{error}")
        }
        other => panic!("{other:?}"),
    }
    let h = relay.server.health();
    assert!(h.refused_unknown_key >= 2, "{h:?}");
    assert_eq!(h.packets_in, 0);
    assert_eq!(h.clients, 1);
}

#[tokio::test]
async fn failed_proof_is_refused_and_nothing_forwarded() {
    let (a, b, mallory) = (
        PrivateKey::generate(),
        PrivateKey::generate(),
        PrivateKey::generate(),
    );
    let relay = TestRelay::start(true, limits(), &[a.public(), b.public()]).await;
    let (_atx, mut arx) = relay.client(&a, RelayTransport::Upgrade).await;
    // Mallory claims b's (admitted) key but cannot prove it; she pipelines
    // a packet right behind the hello, hoping it slips through.
    let mut raw = relay.raw().await;
    let Some(Frame::ServerHello {
        relay_key,
        challenge,
        ..
    }) = raw.recv(T).await
    else {
        panic!("no hello")
    };
    let proof = warren::proto::relay::auth::prove(&mallory, &relay_key, &challenge).unwrap();
    let mut wire = Frame::ClientHello {
        version: warren::proto::relay::PROTOCOL_VERSION,
        node_key: b.public(),
        proof,
    }
    .to_bytes()
    .to_vec();
    wire.extend_from_slice(
        &Frame::SendPacket {
            dest: a.public(),
            packet: Bytes::from_static(b"forged"),
        }
        .to_bytes(),
    );
    raw.send_raw(&wire).await;
    assert_eq!(
        raw.recv(T).await,
        Some(Frame::Refused {
            reason: RefuseReason::BadProof
        })
    );
    assert_eq!(raw.recv(Duration::from_secs(2)).await, None, "closed");
    assert_eq!(
        next_packet(&mut arx, Duration::from_millis(300)).await,
        None
    );
    let h = relay.server.health();
    assert_eq!(h.refused_bad_proof, 1);
    assert_eq!(h.packets_in, 0);
}

#[tokio::test]
async fn removed_node_is_disconnected_within_two_seconds() {
    let (a, b) = (PrivateKey::generate(), PrivateKey::generate());
    let relay = TestRelay::start(true, limits(), &[a.public(), b.public()]).await;
    let (_atx, mut arx) = relay.client(&a, RelayTransport::WebSocket).await;
    let (btx, mut brx) = relay.client(&b, RelayTransport::Upgrade).await;
    btx.send(a.public(), Bytes::from_static(b"hi"))
        .await
        .unwrap();
    assert!(next_packet(&mut arx, T).await.is_some());

    let t0 = Instant::now();
    relay.admission.remove(&a.public());
    match next_event(&mut arx, Duration::from_secs(2)).await {
        Some(RelayEvent::Disconnected { error }) => assert!(error.contains("Removed"), "{error}"),
        other => panic!("not disconnected within 2 s: {other:?}"),
    }
    assert!(t0.elapsed() < Duration::from_secs(2));
    // b, which talked to a, learns that a is gone.
    match next_event(&mut brx, T).await {
        Some(RelayEvent::PeerGone { key, reason }) => {
            assert_eq!((key, reason), (a.public(), PeerGoneReason::Disconnected))
        }
        other => panic!("{other:?}"),
    }
    // a's reconnection attempts are refused from now on.
    match next_event(&mut arx, T).await {
        Some(RelayEvent::Disconnected { error }) => {
            assert!(error.contains("UnknownKey"), "{error}")
        }
        other => panic!("{other:?}"),
    }
    let h = relay.server.health();
    assert_eq!(h.disconnected_removed, 1);
    assert_eq!(h.clients, 1);
    // Re-admitted, the client comes back on its own (reconnect with backoff)
    // and traffic flows again.
    relay.admission.insert(a.public());
    loop {
        match next_event(&mut arx, T).await {
            Some(RelayEvent::Connected { .. }) => break,
            Some(RelayEvent::Disconnected { .. }) => continue,
            other => panic!("{other:?}"),
        }
    }
    btx.send(a.public(), Bytes::from_static(b"again"))
        .await
        .unwrap();
    assert_eq!(
        next_packet(&mut arx, T).await,
        Some((b.public(), Bytes::from_static(b"again")))
    );
}

#[tokio::test]
async fn connections_per_node_are_limited() {
    let a = PrivateKey::generate();
    let mut l = limits();
    l.max_conns_per_node = 2;
    let relay = TestRelay::start(false, l, &[a.public()]).await;
    let mut raws = Vec::new();
    for _ in 0..2 {
        let mut r = relay.raw().await;
        assert_eq!(r.hello(&a, a.public()).await, Some(Frame::Accepted));
        raws.push(r);
    }
    let mut third = relay.raw().await;
    assert_eq!(
        third.hello(&a, a.public()).await,
        Some(Frame::Refused {
            reason: RefuseReason::TooManyConnections
        })
    );
    assert_eq!(relay.server.health().refused_too_many, 1);
}

#[tokio::test]
async fn one_address_holds_a_bounded_share_of_handshakes_and_a_silent_hello_times_out() {
    let a = PrivateKey::generate();
    let mut l = limits();
    l.max_pending_per_ip = 2;
    l.hello_timeout = Duration::from_millis(800);
    l.handshake_timeout = Duration::from_secs(30);
    let relay = TestRelay::start(false, l, &[a.public()]).await;
    // Two silent clients from 127.0.0.1 hold that address's two places.
    let mut silent = Vec::new();
    for _ in 0..2 {
        let mut r = relay.raw().await;
        assert!(matches!(r.recv(T).await, Some(Frame::ServerHello { .. })));
        silent.push(r);
    }
    // A third from the same address is closed at once, without a hello.
    let mut third = relay.raw().await;
    assert_eq!(third.recv(T).await, None);
    assert_eq!(relay.server.health().refused_busy, 1);
    // The silent ones lose their places at the hello deadline, long
    // before the handshake's.
    let started = std::time::Instant::now();
    for r in &mut silent {
        assert_eq!(r.recv(Duration::from_secs(5)).await, None);
    }
    assert!(started.elapsed() < Duration::from_secs(5));
    // Then the address may handshake again.
    let mut again = relay.raw().await;
    assert_eq!(again.hello(&a, a.public()).await, Some(Frame::Accepted));
}

#[tokio::test]
async fn handshake_deadline_and_oversized_frames_close_the_connection() {
    let a = PrivateKey::generate();
    let mut l = limits();
    l.handshake_timeout = Duration::from_millis(300);
    l.max_pending_handshakes = 1;
    l.max_payload = 2048;
    let relay = TestRelay::start(false, l, &[a.public()]).await;
    // Silent client: hello, then nothing until the deadline closes us.
    let mut silent = relay.raw().await;
    assert!(matches!(
        silent.recv(T).await,
        Some(Frame::ServerHello { .. })
    ));
    assert_eq!(silent.recv(T).await, None);
    assert_eq!(relay.server.health().handshake_timeouts, 1);
    // Before proving a key, nothing larger than a hello is buffered.
    let mut early = relay.raw().await;
    assert!(matches!(
        early.recv(T).await,
        Some(Frame::ServerHello { .. })
    ));
    early.send_raw(&[0x02, 0, 0, 0, 66]).await;
    assert_eq!(early.recv(T).await, None);
    assert_eq!(relay.server.health().drop_bad_frame, 1);
    // Admitted client announcing a frame beyond the limit: closed.
    let mut big = relay.raw().await;
    assert_eq!(big.hello(&a, a.public()).await, Some(Frame::Accepted));
    big.send_raw(&[0x10, 0, 1, 0, 0]).await;
    assert_eq!(big.recv(T).await, None);
    assert_eq!(relay.server.health().drop_bad_frame, 2);
}

#[tokio::test]
async fn websocket_and_upgrade_work_through_an_http_connect_proxy() {
    let (a, b) = (PrivateKey::generate(), PrivateKey::generate());
    let relay = TestRelay::start(true, limits(), &[a.public(), b.public()]).await;
    let (proxy, tunnels) = connect_proxy().await;
    let proxy_cfg = warren::relay_client::ProxyConfig::parse(&format!("http://{proxy}")).unwrap();
    let mut ca = relay.config(RelayTransport::WebSocket);
    ca.proxy = Some(proxy_cfg.clone());
    let mut cb = relay.config(RelayTransport::Upgrade);
    cb.proxy = Some(proxy_cfg);
    let (atx, mut arx) = RelayClient::connect(ca, &a);
    let (btx, mut brx) = RelayClient::connect(cb, &b);
    for rx in [&mut arx, &mut brx] {
        assert!(matches!(
            next_event(rx, T).await,
            Some(RelayEvent::Connected { .. })
        ));
    }
    assert_eq!(tunnels.load(std::sync::atomic::Ordering::SeqCst), 2);
    atx.send(b.public(), Bytes::from_static(b"via proxy"))
        .await
        .unwrap();
    assert_eq!(
        next_packet(&mut brx, T).await,
        Some((a.public(), Bytes::from_static(b"via proxy")))
    );
    btx.send(a.public(), Bytes::from_static(b"back"))
        .await
        .unwrap();
    assert!(next_packet(&mut arx, T).await.is_some());
}

// --- standalone relay: the coordinator node feed ---

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

/// Stands in for a middlebox that lets WebSocket through but answers the
/// relay's own upgrade with an error.
async fn block_relay_upgrade(
    State(blocked): State<std::sync::Arc<std::sync::atomic::AtomicUsize>>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let is_relay_upgrade = req
        .headers()
        .get("upgrade")
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"warren-relay"));
    if is_relay_upgrade {
        blocked.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        return StatusCode::FORBIDDEN.into_response();
    }
    next.run(req).await
}

#[tokio::test]
async fn auto_transport_falls_back_to_websocket_when_upgrade_is_blocked() {
    init();
    let (a, b) = (PrivateKey::generate(), PrivateKey::generate());
    let admission = warren_coordinator::relay::StaticAdmission::new([a.public(), b.public()]);
    let server =
        warren_coordinator::relay::RelayServer::new(PrivateKey::generate(), limits(), admission);
    let blocked = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let router = server.router().layer(axum::middleware::from_fn_with_state(
        blocked.clone(),
        block_relay_upgrade,
    ));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(warren_coordinator::listen::serve(
        listener,
        router,
        warren_coordinator::listen::Security::Plain,
    ));
    let config = || {
        let mut c = warren::relay_client::RelayClientConfig::new(url.clone());
        c.allow_plain = true;
        assert_eq!(c.transport, RelayTransport::Auto, "Auto is the default");
        c
    };
    let (atx, mut arx) = RelayClient::connect(config(), &a);
    let (_btx, mut brx) = RelayClient::connect(config(), &b);
    for rx in [&mut arx, &mut brx] {
        assert!(matches!(
            next_event(rx, T).await,
            Some(RelayEvent::Connected { .. })
        ));
    }
    assert_eq!(blocked.load(std::sync::atomic::Ordering::SeqCst), 2);
    let h = server.health();
    assert_eq!(
        (h.connections_websocket, h.connections_upgrade),
        (2, 0),
        "both came in over WebSocket: {h:?}"
    );
    atx.send(b.public(), Bytes::from_static(b"over ws"))
        .await
        .unwrap();
    assert_eq!(
        next_packet(&mut brx, T).await,
        Some((a.public(), Bytes::from_static(b"over ws")))
    );
}
