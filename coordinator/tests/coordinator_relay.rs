//! The coordinator's STUN server, embedded relay, relay map and node feed,
//! and a standalone relay following that feed, all on loopback: what an
//! agent sees (the relay map, STUN answers, a relay that admits exactly the
//! registered nodes and cuts removed ones within 2 s) and what a relay sees
//! (the feed, and a clean refusal of bad credentials).

#![allow(clippy::unwrap_used)] // helpers of a test crate

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{client, first_full};
use tokio::net::UdpSocket;
use warren::control::ControlClient;
use warren::keys::PrivateKey;
use warren::proto::relay::auth::{auth_header, NodesEvent, NODES_PATH};
use warren::proto::stun::{binding_request, parse_binding_response, TransactionId};
use warren::relay_client::{
    RelayClient, RelayClientConfig, RelayEvent, RelayReceiver, RelaySender, RelayTransport,
};
use warren_coordinator::admin;
use warren_coordinator::server::{self, Config, Running};
use warren_coordinator::standalone;

const SECRET: &[u8] = b"a relay secret of some length";
const T: Duration = Duration::from_secs(10);

async fn start(dir: &Path, database: Option<String>, secret: bool) -> Running {
    common::init();
    let mut cfg = Config::new("127.0.0.1:0".parse().unwrap(), dir.to_path_buf());
    cfg.database = database;
    cfg.keepalive = Duration::from_secs(1);
    cfg.ephemeral_timeout = Duration::from_secs(1);
    cfg.stun_listen = vec!["127.0.0.1:0".parse().unwrap(); 2];
    cfg.relay_secret = secret.then(|| SECRET.to_vec());
    server::start(cfg).await.expect("coordinator starts")
}

/// A registered node: its key and control client.
async fn join(srv: &Running, dir: &Path, name: &str) -> (PrivateKey, ControlClient) {
    join_as(srv, dir, name, false).await
}

async fn join_as(
    srv: &Running,
    dir: &Path,
    name: &str,
    ephemeral: bool,
) -> (PrivateKey, ControlClient) {
    let key = PrivateKey::generate();
    let state = dir.join(name);
    std::fs::create_dir_all(&state).unwrap();
    let c = ControlClient::new(&common::url(srv), key.clone(), &state).unwrap();
    let tok = common::token(&srv.store, false, ephemeral).await;
    c.register(Some(&tok), name, PrivateKey::generate().public())
        .await
        .unwrap();
    (key, c)
}

fn relay_config(url: &str) -> RelayClientConfig {
    let mut c = RelayClientConfig::new(url.to_owned());
    c.transport = RelayTransport::Upgrade;
    c.allow_plain = true;
    c.backoff_min = Duration::from_millis(50);
    c.backoff_max = Duration::from_millis(300);
    c
}

/// The next connection event (RTT and health reports skipped).
async fn next_state(rx: &mut RelayReceiver, within: Duration) -> Option<RelayEvent> {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, rx.recv_event()).await {
            Ok(Some(RelayEvent::Rtt(_) | RelayEvent::Health(_))) => continue,
            Ok(ev) => return ev,
            Err(_) => return None,
        }
    }
}

/// Connects, retrying through refusals (a standalone relay admits nobody
/// until its first snapshot), until the relay accepts or `within` passes.
async fn connected(url: &str, key: &PrivateKey, within: Duration) -> (RelaySender, RelayReceiver) {
    let (tx, mut rx) = RelayClient::connect(relay_config(url), key);
    let deadline = Instant::now() + within;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match next_state(&mut rx, left).await {
            Some(RelayEvent::Connected { .. }) => return (tx, rx),
            Some(RelayEvent::Disconnected { .. }) => continue,
            other => panic!("relay did not accept {}: {other:?}", key.public().short()),
        }
    }
}

/// Connects `a` and `b` and passes a packet from one to the other. Returns
/// both ends (a client stops when its sender is dropped).
async fn exchange(url: &str, a: &PrivateKey, b: &PrivateKey) -> [(RelaySender, RelayReceiver); 2] {
    let (atx, arx) = connected(url, a, T).await;
    let (btx, mut brx) = connected(url, b, T).await;
    atx.send(b.public(), Bytes::from_static(b"through the relay"))
        .await
        .unwrap();
    let got = tokio::time::timeout(T, brx.recv()).await.unwrap();
    assert_eq!(
        got,
        Some((a.public(), Bytes::from_static(b"through the relay")))
    );
    [(atx, arx), (btx, brx)]
}

/// A key the coordinator never registered is refused.
async fn expect_refused(url: &str) {
    let stranger = PrivateKey::generate();
    let (_tx, mut rx) = RelayClient::connect(relay_config(url), &stranger);
    match next_state(&mut rx, T).await {
        Some(RelayEvent::Disconnected { error }) => {
            assert!(error.contains("UnknownKey"), "{error}")
        }
        other => panic!("an unregistered key got in: {other:?}"),
    }
}

/// Removes `name` as the administrator does, and checks that `rx` (its
/// relay connection) is cut within 2 s.
async fn remove_and_expect_cut(
    store: &warren_coordinator::store::Store,
    name: &str,
    rx: &mut RelayReceiver,
) {
    let t0 = Instant::now();
    admin::node_remove(store, name).await.unwrap();
    match next_state(rx, Duration::from_secs(2)).await {
        Some(RelayEvent::Disconnected { error }) => assert!(error.contains("Removed"), "{error}"),
        other => panic!("not disconnected within 2 s: {other:?}"),
    }
    assert!(t0.elapsed() < Duration::from_secs(2));
    // And it stays out.
    match next_state(rx, T).await {
        Some(RelayEvent::Disconnected { error }) => {
            assert!(error.contains("UnknownKey"), "{error}")
        }
        other => panic!("a removed node got back in: {other:?}"),
    }
}

#[tokio::test]
async fn stun_answers_and_relay_map_lists_the_embedded_region() {
    let dir = tempfile::tempdir().unwrap();
    let srv = start(dir.path(), None, false).await;
    assert_eq!(srv.stun.len(), 2);
    assert_ne!(srv.stun[0], srv.stun[1]);

    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let me = sock.local_addr().unwrap();
    for (i, stun) in srv.stun.iter().enumerate() {
        let tx = TransactionId([i as u8 + 7; 12]);
        sock.send_to(&binding_request(tx), stun).await.unwrap();
        let mut buf = [0u8; 1500];
        let (n, from) = tokio::time::timeout(T, sock.recv_from(&mut buf))
            .await
            .expect("STUN answer")
            .unwrap();
        assert_eq!(from, *stun);
        assert_eq!(parse_binding_response(&buf[..n]).unwrap(), (tx, me));
    }

    let c = client(&common::url(&srv), dir.path());
    let tok = common::token(&srv.store, false, false).await;
    let reg = c
        .register(Some(&tok), "n", PrivateKey::generate().public())
        .await
        .unwrap();
    assert_eq!(reg.relay_map.regions.len(), 1);
    let region = &reg.relay_map.regions[0];
    assert_eq!(region.id, 1);
    assert_eq!(region.name, "default");
    assert_eq!(region.url, format!("http://{}/relay", srv.addr));
    assert_eq!(region.stun, srv.stun);
    // The full map carries the same.
    let mut stream = c.map_stream();
    assert_eq!(first_full(&mut stream).await.relay_map, reg.relay_map);
}

#[tokio::test]
async fn embedded_relay_admits_registered_nodes_only_and_cuts_removed_ones() {
    let dir = tempfile::tempdir().unwrap();
    let srv = start(dir.path(), None, false).await;
    let url = srv.relay_map.regions[0].url.clone();
    let (a, _ca) = join(&srv, dir.path(), "a").await;
    let (b, _cb) = join(&srv, dir.path(), "b").await;
    let [(_atx, mut arx), _b] = exchange(&url, &a, &b).await;

    expect_refused(&url).await;

    remove_and_expect_cut(&srv.store, "a", &mut arx).await;
    let h = srv.relay.as_ref().unwrap().health();
    assert_eq!(h.disconnected_removed, 1);
    assert!(h.refused_unknown_key >= 2, "{h:?}");

    // The counters are served as JSON beside the relay.
    let body = reqwest::get(format!("{}/relay/metrics", common::url(&srv)))
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(body["disconnected_removed"], 1);
}

#[tokio::test]
async fn logout_cuts_the_relay_connection_too() {
    let dir = tempfile::tempdir().unwrap();
    let srv = start(dir.path(), None, false).await;
    let url = srv.relay_map.regions[0].url.clone();
    let (a, ca) = join(&srv, dir.path(), "a").await;
    let (_atx, mut arx) = connected(&url, &a, T).await;
    let t0 = Instant::now();
    ca.logout().await.unwrap();
    match next_state(&mut arx, Duration::from_secs(2)).await {
        Some(RelayEvent::Disconnected { error }) => assert!(error.contains("Removed"), "{error}"),
        other => panic!("not disconnected within 2 s: {other:?}"),
    }
    assert!(t0.elapsed() < Duration::from_secs(2));
}

#[tokio::test]
async fn an_expired_ephemeral_node_is_cut_from_the_relay() {
    let dir = tempfile::tempdir().unwrap();
    let srv = start(dir.path(), None, false).await;
    let url = srv.relay_map.regions[0].url.clone();
    let (a, _ca) = join_as(&srv, dir.path(), "eph", true).await;
    // Connected to the relay but with no map stream: offline to the
    // coordinator, so it expires after the 1 s ephemeral timeout.
    let (_atx, mut arx) = connected(&url, &a, T).await;
    match next_state(&mut arx, Duration::from_secs(5)).await {
        Some(RelayEvent::Disconnected { error }) => assert!(error.contains("Removed"), "{error}"),
        other => panic!("not cut after expiry: {other:?}"),
    }
    assert!(srv.store.node_by_key(&a.public()).await.unwrap().is_none());
}

#[tokio::test]
async fn removal_on_another_replica_cuts_the_relay_connection() {
    let Some(db) = common::fresh_postgres().await else {
        return;
    };
    let (d1, d2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let r1 = start(d1.path(), Some(db.clone()), false).await;
    std::fs::copy(
        d1.path().join("coordinator.key"),
        d2.path().join("coordinator.key"),
    )
    .unwrap();
    let r2 = start(d2.path(), Some(db), false).await;
    let url = r1.relay_map.regions[0].url.clone();
    let (a, _ca) = join(&r1, d1.path(), "a").await;
    let (b, _cb) = join(&r2, d2.path(), "b").await;
    let [(_atx, mut arx), _b] = exchange(&url, &a, &b).await;
    // Removed through replica 2's store: replica 1's relay hears it by NOTIFY.
    remove_and_expect_cut(&r2.store, "a", &mut arx).await;
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// Reads the node feed line by line.
struct FeedReader {
    resp: reqwest::Response,
    buf: Vec<u8>,
}

impl FeedReader {
    async fn next(&mut self, within: Duration) -> NodesEvent {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            if let Some(pos) = self.buf.iter().position(|&c| c == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=pos).collect();
                return serde_json::from_slice(&line).unwrap();
            }
            let chunk = tokio::time::timeout_at(deadline, self.resp.chunk())
                .await
                .unwrap_or_else(|_| panic!("no feed line within {within:?}"))
                .unwrap()
                .expect("the feed does not end");
            self.buf.extend_from_slice(&chunk);
        }
    }
}

#[tokio::test]
async fn node_feed_refuses_bad_credentials_and_streams_a_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let srv = start(dir.path(), None, true).await;
    let (a, _ca) = join(&srv, dir.path(), "a").await;
    let feed = format!("{}{NODES_PATH}", common::url(&srv));
    let http = reqwest::Client::new();
    let relay_key = PrivateKey::generate().public();
    for header in [
        None,
        Some("Bearer nonsense".to_owned()),
        Some(auth_header(
            b"the wrong secret, long enough",
            &relay_key,
            unix_now(),
        )),
        Some(auth_header(SECRET, &relay_key, unix_now() - 3600)),
    ] {
        let mut req = http.get(&feed);
        if let Some(h) = &header {
            req = req.header("authorization", h);
        }
        let resp = req.send().await.unwrap();
        assert_eq!(resp.status(), 401, "{header:?}");
        let body: warren::control::ErrorBody =
            serde_json::from_slice(&resp.bytes().await.unwrap()).unwrap();
        assert_eq!(body.code, warren::control::ErrorCode::Unauthenticated);
        assert!(!body.message.is_empty());
    }

    let header = auth_header(SECRET, &relay_key, unix_now());
    let resp = http
        .get(&feed)
        .header("authorization", &header)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.headers()["content-type"].to_str().unwrap(),
        "application/x-ndjson"
    );
    // The same header again, within its minute: a replay, refused.
    let replay = http
        .get(&feed)
        .header("authorization", &header)
        .send()
        .await
        .unwrap();
    assert_eq!(replay.status(), 401);
    let body: warren::control::ErrorBody =
        serde_json::from_slice(&replay.bytes().await.unwrap()).unwrap();
    assert_eq!(body.code, warren::control::ErrorCode::Replayed);
    let mut feed = FeedReader {
        resp,
        buf: Vec::new(),
    };
    let (b, _cb) = join(&srv, dir.path(), "b").await;
    // The hub follows change notes a moment behind the commit, so a node
    // registered just before the feed opened may come as an `add` right
    // after the snapshot instead of inside it. Either way both arrive.
    let mut seen = std::collections::HashSet::new();
    match feed.next(T).await {
        NodesEvent::Snapshot { nodes } => seen.extend(nodes),
        other => panic!("first line is not a snapshot: {other:?}"),
    }
    while !(seen.contains(&a.public()) && seen.contains(&b.public())) {
        match feed.next(T).await {
            NodesEvent::Add { node } => seen.insert(node),
            NodesEvent::Keepalive => continue,
            other => panic!("unexpected {other:?}"),
        };
    }
    // A removal follows as a `remove` line.
    admin::node_remove(&srv.store, "b").await.unwrap();
    loop {
        match feed.next(Duration::from_secs(2)).await {
            NodesEvent::Remove { node } if node == b.public() => break,
            NodesEvent::Keepalive => continue,
            other => panic!("unexpected {other:?}"),
        }
    }

    // Without a secret the feed does not exist.
    let dir2 = tempfile::tempdir().unwrap();
    let plain = start(dir2.path(), None, false).await;
    let resp = http
        .get(format!("{}{NODES_PATH}", common::url(&plain)))
        .header("authorization", auth_header(SECRET, &relay_key, unix_now()))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 404);
}

#[tokio::test]
async fn standalone_relay_follows_the_feed_and_cuts_removed_nodes() {
    let dir = tempfile::tempdir().unwrap();
    let srv = start(dir.path(), None, true).await;
    let (a, _ca) = join(&srv, dir.path(), "a").await;
    let (b, _cb) = join(&srv, dir.path(), "b").await;
    let relay = standalone::start(standalone::Options {
        listen: "127.0.0.1:0".parse().unwrap(),
        tls_cert: None,
        tls_key: None,
        insecure_http: false,
        coordinator: common::url(&srv),
        coordinator_ca: None,
        secret: SECRET.to_vec(),
        data_dir: dir.path().join("relay"),
        stun_listen: vec!["127.0.0.1:0".parse().unwrap()],
        limits: Default::default(),
        health_every: None,
        metrics_token: None,
    })
    .await
    .unwrap();
    assert!(dir.path().join("relay/relay.key").exists());
    let url = format!("http://{}/relay", relay.addr());
    let [(_atx, mut arx), _b] = exchange(&url, &a, &b).await;

    expect_refused(&url).await;
    remove_and_expect_cut(&srv.store, "a", &mut arx).await;
    assert_eq!(relay.relay.server.health().disconnected_removed, 1);

    // Its STUN server answers too.
    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let tx = TransactionId([3; 12]);
    sock.send_to(&binding_request(tx), relay.stun[0])
        .await
        .unwrap();
    let mut buf = [0u8; 1500];
    let (n, _) = tokio::time::timeout(T, sock.recv_from(&mut buf))
        .await
        .unwrap()
        .unwrap();
    let (got_tx, seen): (TransactionId, SocketAddr) = parse_binding_response(&buf[..n]).unwrap();
    assert_eq!((got_tx, seen), (tx, sock.local_addr().unwrap()));
}

#[tokio::test]
async fn standalone_relay_refuses_plain_http_off_loopback() {
    let dir = tempfile::tempdir().unwrap();
    let opts = standalone::Options {
        listen: "0.0.0.0:0".parse().unwrap(),
        tls_cert: None,
        tls_key: None,
        insecure_http: false,
        coordinator: "http://127.0.0.1:1".into(),
        coordinator_ca: None,
        secret: SECRET.to_vec(),
        data_dir: dir.path().to_path_buf(),
        stun_listen: Vec::new(),
        limits: Default::default(),
        health_every: None,
        metrics_token: None,
    };
    let err = standalone::start(opts.clone()).await.err().unwrap();
    assert!(err.to_string().contains("plain HTTP"), "{err}");
    let far = standalone::Options {
        listen: "127.0.0.1:0".parse().unwrap(),
        coordinator: "http://192.0.2.1:443".into(),
        ..opts
    };
    let err = standalone::start(far).await.err().unwrap();
    assert!(err.to_string().contains("--coordinator"), "{err}");
}

#[test]
fn serve_rejects_a_bad_relay_map_naming_line_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let map = dir.path().join("relays.toml");
    std::fs::write(
        &map,
        "[[region]]\nid = 2\nname = \"eu\"\nurl = \"https://eu.example\"\n\n[[region]]\nid = 3\nname = \"us\"\nurl = \"https://us.example\"\nstun = [\"not an address\"]\n",
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_warren-coordinator"))
        .arg("--data-dir")
        .arg(dir.path())
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--no-stun",
            "--relay-map",
        ])
        .arg(&map)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("relays.toml:10: key `region[1].stun[0]`"),
        "{err}"
    );
}
