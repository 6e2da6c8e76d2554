//! Shared set-up for the relay integration tests: a relay on loopback (TLS
//! with an rcgen certificate, or plain lab mode), library clients, and a raw
//! client that speaks frames by hand for the misbehaving cases.

#![allow(dead_code, clippy::unwrap_used)] // test-only helpers

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use rustls::pki_types::{CertificateDer, PrivatePkcs8KeyDer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use warren::dial::Io;
use warren::keys::{NodeKey, PrivateKey};
use warren::proto::relay::{auth, Frame, FrameDecoder, PROTOCOL_VERSION};
use warren::relay_client::dial::{self, Conn};
use warren::relay_client::{
    RelayClient, RelayClientConfig, RelayEvent, RelayReceiver, RelaySender, RelayTransport,
};
use warren_coordinator::listen::{serve, tls_config, Security};
use warren_coordinator::relay::{Admission, RelayLimits, RelayServer, StaticAdmission};

// The relay tests share the coordinator tests' set-up (crypto provider,
// logging) rather than a copy of it.
#[path = "../common/mod.rs"]
mod common;
pub use common::init;

pub struct TestRelay {
    pub addr: SocketAddr,
    pub server: RelayServer,
    pub admission: Arc<StaticAdmission>,
    /// Client TLS settings trusting the test certificate (None for plain).
    pub client_tls: Option<Arc<rustls::ClientConfig>>,
}

impl TestRelay {
    pub async fn start(tls: bool, limits: RelayLimits, keys: &[NodeKey]) -> TestRelay {
        Self::start_with(tls, limits, StaticAdmission::new(keys.iter().copied())).await
    }

    pub async fn start_with(
        tls: bool,
        limits: RelayLimits,
        admission: Arc<StaticAdmission>,
    ) -> TestRelay {
        init();
        let server = RelayServer::new(
            PrivateKey::generate(),
            limits,
            admission.clone() as Arc<dyn Admission>,
        );
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (security, client_tls) = if tls {
            let (s, c) = self_signed();
            (Security::Tls(s), Some(c))
        } else {
            (Security::Plain, None)
        };
        tokio::spawn(serve(listener, server.router(), security));
        TestRelay {
            addr,
            server,
            admission,
            client_tls,
        }
    }

    pub fn url(&self) -> String {
        match self.client_tls {
            Some(_) => format!("https://localhost:{}", self.addr.port()),
            None => format!("http://127.0.0.1:{}", self.addr.port()),
        }
    }

    pub fn config(&self, transport: RelayTransport) -> RelayClientConfig {
        let mut c = RelayClientConfig::new(self.url());
        c.transport = transport;
        c.allow_plain = self.client_tls.is_none();
        c.tls = self.client_tls.clone();
        c.backoff_min = Duration::from_millis(50);
        c.backoff_max = Duration::from_millis(500);
        c
    }

    /// A library client, returned once the relay has accepted it.
    pub async fn client(
        &self,
        key: &PrivateKey,
        transport: RelayTransport,
    ) -> (RelaySender, RelayReceiver) {
        let (tx, mut rx) = RelayClient::connect(self.config(transport), key);
        match next_event(&mut rx, Duration::from_secs(10)).await {
            Some(RelayEvent::Connected { relay_key }) => {
                assert_eq!(relay_key, self.server.public_key())
            }
            other => panic!("expected Connected, got {other:?}"),
        }
        (tx, rx)
    }

    /// A transport with the HTTP upgrade done, for raw frame tests.
    pub async fn raw(&self) -> RawClient {
        let cfg = self.config(RelayTransport::Upgrade);
        match dial::dial(&cfg).await.unwrap() {
            Conn::Stream(io, rest) => {
                let mut dec = FrameDecoder::default();
                dec.extend(&rest);
                RawClient { io, dec }
            }
            Conn::WebSocket(_) => panic!("the upgrade path gives a byte stream"),
        }
    }
}

/// A self-signed certificate for `localhost`, as server and client configs.
pub fn self_signed() -> (Arc<rustls::ServerConfig>, Arc<rustls::ClientConfig>) {
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let cert: CertificateDer<'static> = ck.cert.der().clone();
    let key = PrivatePkcs8KeyDer::from(ck.signing_key.serialize_der());
    let server = tls_config(vec![cert.clone()], key.into()).unwrap();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert).unwrap();
    let client = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    (server, Arc::new(client))
}

pub async fn next_event(rx: &mut RelayReceiver, within: Duration) -> Option<RelayEvent> {
    tokio::time::timeout(within, rx.recv_event())
        .await
        .ok()
        .flatten()
}

pub async fn next_packet(rx: &mut RelayReceiver, within: Duration) -> Option<(NodeKey, Bytes)> {
    tokio::time::timeout(within, rx.recv()).await.ok().flatten()
}

/// Speaks frames by hand, to misbehave on purpose.
pub struct RawClient {
    pub io: Box<dyn Io>,
    pub dec: FrameDecoder,
}

impl RawClient {
    pub async fn send(&mut self, f: &Frame) {
        self.io.write_all(&f.to_bytes()).await.unwrap();
    }

    pub async fn send_raw(&mut self, b: &[u8]) {
        self.io.write_all(b).await.unwrap();
    }

    /// The next frame, or `None` on close/timeout.
    pub async fn recv(&mut self, within: Duration) -> Option<Frame> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            if let Ok(Some(f)) = self.dec.next_frame() {
                return Some(f);
            }
            let mut buf = [0u8; 4096];
            match tokio::time::timeout_at(deadline, self.io.read(&mut buf)).await {
                Ok(Ok(n)) if n > 0 => self.dec.extend(&buf[..n]),
                _ => return None,
            }
        }
    }

    /// Reads the server hello and answers with a proof made by `prover`
    /// while claiming to be `claimed`.
    pub async fn hello(&mut self, prover: &PrivateKey, claimed: NodeKey) -> Option<Frame> {
        let Some(Frame::ServerHello {
            relay_key,
            challenge,
            ..
        }) = self.recv(Duration::from_secs(5)).await
        else {
            panic!("no server hello");
        };
        let proof = auth::prove(prover, &relay_key, &challenge).unwrap();
        self.send(&Frame::ClientHello {
            version: PROTOCOL_VERSION,
            node_key: claimed,
            proof,
        })
        .await;
        self.recv(Duration::from_secs(5)).await
    }
}

pub fn limits() -> RelayLimits {
    RelayLimits::default()
}

/// A minimal HTTP CONNECT proxy on loopback, like tinyproxy in the lab:
/// returns its address and a counter of tunnels it opened.
pub async fn connect_proxy() -> (SocketAddr, Arc<std::sync::atomic::AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let tunnels = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = tunnels.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut c, _)) = listener.accept().await else {
                return;
            };
            let count = count.clone();
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut b = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") {
                    if c.read(&mut b).await.unwrap_or(0) == 0 || head.len() > 8192 {
                        return;
                    }
                    head.push(b[0]);
                }
                let head = String::from_utf8_lossy(&head).to_string();
                let Some(target) = head
                    .strip_prefix("CONNECT ")
                    .and_then(|r| r.split_whitespace().next())
                else {
                    let _ = c
                        .write_all(b"HTTP/1.1 405 Method Not Allowed\r\n\r\n")
                        .await;
                    return;
                };
                let Ok(mut up) = tokio::net::TcpStream::connect(target).await else {
                    let _ = c.write_all(b"HTTP/1.1 502 Bad Gateway\r\n\r\n").await;
                    return;
                };
                count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let _ = c
                    .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
                    .await;
                let _ = tokio::io::copy_bidirectional(&mut c, &mut up).await;
            });
        }
    });
    (addr, tunnels)
}
