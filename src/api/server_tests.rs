//! Tests of the API server: the protocol through [`answer`], and the socket
//! (permissions, stale sockets, a live round trip with the real client).

use std::os::unix::fs::PermissionsExt;

use super::*;
use crate::api::client::{call, call_raw, ClientError};
use crate::api::{Drops, PeerPath, PeerStatus};
use crate::keys::NodeKey;

struct Fake(Status);

impl Backend for Fake {
    fn status(&self) -> Status {
        self.0.clone()
    }
}

fn fake() -> Fake {
    let peer = |b: u8, ip: &str, ep: Option<&str>, hs: Option<u64>| PeerStatus {
        public_key: NodeKey([b; 32]),
        hostname: None,
        allowed_ips: vec![ip.parse().unwrap(), "10.20.0.0/16".parse().unwrap()],
        path: match ep {
            Some(e) => PeerPath::Direct {
                endpoint: e.parse().unwrap(),
            },
            None => PeerPath::None,
        },
        latency_ms: None,
        last_handshake_secs: hs,
        rx_bytes: 1000,
        tx_bytes: 2000,
        mesh: None,
    };
    Fake(Status {
        version: "9.9.9".into(),
        interface: "wtest0".into(),
        public_key: NodeKey([9; 32]),
        listen: "[::]:51820".parse().unwrap(),
        offload: true,
        addresses: vec![
            "100.64.0.1/10".parse().unwrap(),
            "fd7a::1/48".parse().unwrap(),
        ],
        uptime_secs: 5,
        peers: vec![
            peer(1, "100.64.0.2/32", Some("192.0.2.2:51820"), Some(12)),
            peer(2, "100.64.0.3/32", None, None),
        ],
        drops: Drops::default(),
        mesh: None,
    })
}

/// Runs [`answer`] to completion; the fake backend never waits.
fn ask(b: &dyn Backend, line: &str) -> Reply {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap()
        .block_on(answer(b, line))
}

fn ok(reply: Reply) -> serde_json::Value {
    match reply {
        Reply::Ok(v) => v,
        Reply::Error(e) => panic!("expected ok, got {e:?}"),
    }
}

fn err(reply: Reply) -> ApiError {
    match reply {
        Reply::Error(e) => e,
        Reply::Ok(v) => panic!("expected an error, got {v}"),
    }
}

#[test]
fn status_and_version() {
    let b = fake();
    let st: Status = serde_json::from_value(ok(ask(&b, r#"{"request":"status"}"#))).unwrap();
    assert_eq!(st, b.0);
    let v = ok(ask(&b, r#"{"request":"version"}"#));
    assert_eq!(v["version"], env!("CARGO_PKG_VERSION"));
}

#[test]
fn ip_of_self_and_of_a_peer() {
    let b = fake();
    let me: IpReply = serde_json::from_value(ok(ask(&b, r#"{"request":"ip"}"#))).unwrap();
    assert_eq!(me.public_key, NodeKey([9; 32]));
    let shown: Vec<String> = me.addresses.iter().map(|a| a.to_string()).collect();
    assert_eq!(shown, ["100.64.0.1", "fd7a::1"]);
    // Only host routes are a peer's addresses; its /16 is not.
    let p: IpReply =
        serde_json::from_value(ok(ask(&b, r#"{"request":"ip","peer":"100.64.0.3"}"#))).unwrap();
    assert_eq!(p.public_key, NodeKey([2; 32]));
    assert_eq!(
        p.addresses,
        vec!["100.64.0.3".parse::<std::net::IpAddr>().unwrap()]
    );
}

#[test]
fn ping_reports_liveness() {
    let b = fake();
    let alive: PingReply =
        serde_json::from_value(ok(ask(&b, r#"{"request":"ping","peer":"100.64.0.2"}"#))).unwrap();
    assert!(alive.alive);
    assert_eq!(alive.last_handshake_secs, Some(12));
    let silent: PingReply =
        serde_json::from_value(ok(ask(&b, r#"{"request":"ping","peer":"100.64.0.3"}"#))).unwrap();
    assert!(!silent.alive);
    assert_eq!(silent.path, PeerPath::None);
}

/// A backend whose first peer is a mesh peer: pings get a round, and the
/// timeout asked for is recorded.
struct MeshFake(Fake, std::sync::Mutex<Vec<std::time::Duration>>);

impl Backend for MeshFake {
    fn status(&self) -> Status {
        let mut st = self.0.status();
        st.peers[0].mesh = Some(crate::api::mesh::PeerMesh::default());
        st
    }

    fn disco_ping(
        &self,
        peer: NodeKey,
        timeout: std::time::Duration,
    ) -> BoxFuture<'_, Result<PingRound, ApiError>> {
        self.1.lock().unwrap().push(timeout);
        Box::pin(async move {
            assert_eq!(peer, NodeKey([1; 32]));
            Ok(PingRound {
                pongs: vec![crate::api::mesh::Pong {
                    path: PeerPath::Relay {
                        region: Some("default".into()),
                    },
                    latency_ms: 3.4,
                }],
                direct: false,
            })
        })
    }
}

#[test]
fn ping_runs_a_disco_round_for_mesh_peers_only() {
    let b = MeshFake(fake(), Default::default());
    let r: PingReply = serde_json::from_value(ok(ask(
        &b,
        r#"{"request":"ping","peer":"100.64.0.2","timeout_ms":60000}"#,
    )))
    .unwrap();
    let round = r.round.expect("a disco round");
    assert_eq!(round.pongs.len(), 1);
    assert_eq!(round.pongs[0].latency_ms, 3.4);
    assert_eq!(r.address, Some("100.64.0.2".parse().unwrap()));
    // The wait is capped, and defaults to PING_TIMEOUT.
    let _ = ask(&b, r#"{"request":"ping","peer":"100.64.0.2"}"#);
    let asked = b.1.lock().unwrap().clone();
    assert_eq!(asked, vec![MAX_PING_TIMEOUT, PING_TIMEOUT]);
    // A peer from the config has no disco: liveness only.
    let r: PingReply =
        serde_json::from_value(ok(ask(&b, r#"{"request":"ping","peer":"100.64.0.3"}"#))).unwrap();
    assert!(r.round.is_none());
    assert_eq!(b.1.lock().unwrap().len(), 2);
}

#[test]
fn errors_are_typed() {
    let b = fake();
    assert_eq!(err(ask(&b, "not json")).code, ErrorCode::BadRequest);
    assert_eq!(err(ask(&b, r#"{"peer":"x"}"#)).code, ErrorCode::BadRequest);
    assert_eq!(
        err(ask(&b, r#"{"request":"ping"}"#)).code,
        ErrorCode::BadRequest
    );
    let e = err(ask(&b, r#"{"request":"teleport"}"#));
    assert_eq!(e.code, ErrorCode::UnknownRequest);
    assert!(e.message.contains("teleport"), "{}", e.message);
    // Known, but this backend has no mesh.
    let e = err(ask(&b, r#"{"request":"netcheck"}"#));
    assert_eq!(e.code, ErrorCode::Unsupported);
    let e = err(ask(&b, r#"{"request":"up","token":7}"#));
    assert_eq!(e.code, ErrorCode::BadRequest);
    let e = err(ask(&b, r#"{"request":"ping","peer":"nobody"}"#));
    assert_eq!(e.code, ErrorCode::UnknownPeer);
}

#[test]
fn socket_is_0660_and_removed_on_drop() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    // The parent directory is created when missing.
    let path = dir.path().join("run/warren.sock");
    let _g = rt.enter();
    let l = Listener::bind(&path).unwrap();
    let mode = std::fs::metadata(&path).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o660, "{mode:o}");
    drop(l);
    assert!(!path.exists());
}

#[test]
fn stale_socket_is_replaced_but_a_live_one_is_not() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let _g = rt.enter();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("warren.sock");
    drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
    let live = Listener::bind(&path).expect("stale socket replaced");
    match Listener::bind(&path) {
        Err(ServeError::InUse { .. }) => {}
        Err(e) => panic!("expected InUse, got {e}"),
        Ok(_) => panic!("a second daemon took a live socket"),
    }
    assert!(
        path.exists(),
        "a refused bind must not remove the live socket"
    );
    drop(live);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_trip_over_the_socket() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("warren.sock");
    let l = Listener::bind(&path).unwrap();
    let server = tokio::spawn(serve(l, Arc::new(fake())));
    let p = path.clone();
    let (st, e, raw) = tokio::task::spawn_blocking(move || {
        let st: Status = call(&p, &Request::Status).unwrap();
        let e = call_raw(
            &p,
            &Request::Ping {
                peer: "zzzzzz".into(),
                timeout_ms: None,
            },
        )
        .unwrap_err();
        // A client that sends a line without the request it names.
        let raw = {
            use std::io::{Read, Write};
            let mut s = std::os::unix::net::UnixStream::connect(&p).unwrap();
            s.write_all(b"{\"request\":\"teleport\"}\n").unwrap();
            let mut out = String::new();
            s.read_to_string(&mut out).unwrap();
            out
        };
        (st, e, raw)
    })
    .await
    .unwrap();
    assert_eq!(st.interface, "wtest0");
    assert_eq!(st.peers.len(), 2);
    match e {
        ClientError::Api(a) => assert_eq!(a.code, ErrorCode::UnknownPeer),
        other => panic!("expected an API error, got {other:?}"),
    }
    let v: serde_json::Value = serde_json::from_str(raw.trim()).unwrap();
    assert_eq!(v["error"]["code"], "unknown_request");
    server.abort();
    let _ = server.await;
    assert!(!path.exists(), "aborting the server removes the socket");
}
