//! The coordinator over TLS (a throwaway CA made with rcgen), and its
//! refusal to serve plain HTTP on a non-loopback address.

mod common;

use std::time::Duration;

use warren::control::ControlClient;
use warren::keys::PrivateKey;
use warren::relay_client::{RelayClient, RelayClientConfig, RelayEvent, RelayTransport};
use warren_coordinator::server::{self, Config, ServerError};

#[tokio::test]
async fn agent_registers_and_streams_over_tls() {
    common::init();
    let dir = tempfile::tempdir().unwrap();
    let cert =
        rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string(), "localhost".to_string()])
            .unwrap();
    let cert_path = dir.path().join("cert.pem");
    let key_path = dir.path().join("key.pem");
    std::fs::write(&cert_path, cert.cert.pem()).unwrap();
    std::fs::write(&key_path, cert.signing_key.serialize_pem()).unwrap();

    let mut cfg = Config::new("127.0.0.1:0".parse().unwrap(), dir.path().join("data"));
    cfg.tls_cert = Some(cert_path);
    cfg.tls_key = Some(key_path);
    let srv = server::start(cfg).await.unwrap();
    let url = format!("https://127.0.0.1:{}", srv.addr.port());
    let tok = common::token(&srv.store, true, false).await;

    let node_key = PrivateKey::generate();
    let c = ControlClient::with_ca_pem(
        &url,
        node_key.clone(),
        dir.path().join("a"),
        cert.cert.pem().as_bytes(),
    )
    .unwrap();
    let reg = c
        .register(Some(&tok), "tls-node", PrivateKey::generate().public())
        .await
        .unwrap();
    let mut s = c.map_stream();
    let map = common::first_full(&mut s).await;
    assert_eq!(map.self_node.ipv4, reg.ipv4);

    // The embedded relay shares the TLS listener (HTTP/1.1 upgrade there,
    // though the listener also offers h2) and is published with https.
    let region = &reg.relay_map.regions[0];
    assert_eq!(
        region.url,
        format!("https://127.0.0.1:{}/relay", srv.addr.port())
    );
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert.cert.der().clone()).unwrap();
    let trust = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    for transport in [RelayTransport::Upgrade, RelayTransport::WebSocket] {
        let mut rc = RelayClientConfig::new(region.url.clone());
        rc.transport = transport;
        rc.tls = Some(std::sync::Arc::new(trust.clone()));
        let (_tx, mut rx) = RelayClient::connect(rc, &node_key);
        match tokio::time::timeout(Duration::from_secs(10), rx.recv_event()).await {
            Ok(Some(RelayEvent::Connected { relay_key })) => {
                assert_eq!(Some(relay_key), srv.relay.as_ref().map(|r| r.public_key()))
            }
            other => panic!("{transport:?}: {other:?}"),
        }
    }

    // A client that does not trust this CA gets nowhere, and plain HTTP to
    // the TLS port is no way around it.
    let untrusting =
        ControlClient::new(&url, PrivateKey::generate(), dir.path().join("b")).unwrap();
    assert!(untrusting
        .register(Some(&tok), "x", PrivateKey::generate().public())
        .await
        .is_err());
    let plain = ControlClient::new(
        &format!("http://127.0.0.1:{}", srv.addr.port()),
        PrivateKey::generate(),
        dir.path().join("c"),
    )
    .unwrap();
    assert!(plain
        .register(Some(&tok), "x", PrivateKey::generate().public())
        .await
        .is_err());
    assert_eq!(srv.store.list_nodes().await.unwrap().len(), 1);
}

#[tokio::test]
async fn plain_http_only_on_loopback_or_with_the_lab_flag() {
    common::init();
    let dir = tempfile::tempdir().unwrap();
    let cfg = Config::new("0.0.0.0:0".parse().unwrap(), dir.path().to_path_buf());
    assert!(matches!(
        server::start(cfg.clone()).await,
        Err(ServerError::PlainHttpRefused(_))
    ));
    let mut lab = cfg;
    lab.insecure_http = true;
    let srv = server::start(lab).await.unwrap();
    assert_ne!(srv.addr.port(), 0);
    // The key file is private.
    use std::os::unix::fs::PermissionsExt as _;
    let mode = std::fs::metadata(dir.path().join("coordinator.key"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
}
