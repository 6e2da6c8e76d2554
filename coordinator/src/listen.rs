//! The one accept loop of every warren server: the coordinator's control
//! API (with its embedded relay mounted beside it) and a standalone relay
//! both serve their axum router through [`serve`].
//!
//! It exists because both need what `axum::serve` does not give: TLS with
//! a handshake deadline, HTTP/1.1 upgrades (the relay takes the connection
//! over after `GET /relay`), the client's address in every request
//! ([`PeerAddr`], for the relay's logs),
//! and deadlines on a client that sends half a request. Anyone on the
//! internet can open a connection here, so each stage has a bound:
//!
//! - the TLS handshake: [`Timeouts::handshake`];
//! - the request head: [`Timeouts::header_read`] (hyper's HTTP/1 header
//!   timer), so a client that stops mid-header is dropped;
//! - the request body: [`Timeouts::body_read`] (tower-http's body timeout),
//!   so a handler waiting on a body that never finishes gets an error, not
//!   a stuck task. Responses, such as the map stream, are not bounded;
//! - the number of open connections, in all and per source address
//!   ([`Limits`]): a connection past either cap is closed at once, so idle
//!   or slow clients from one address cannot use up the process's file
//!   descriptors (the unit raises `LimitNOFILE` above the global cap).
//!
//! The listening socket is made by [`bind`], with an accept queue of
//! [`BACKLOG`] rather than tokio's 1,024: after a coordinator restart every
//! agent reconnects within seconds, and a connection the full queue drops
//! waits out TCP's retransmissions (10,000 streams opened at once in
//! `tests/bench/coordinator.sh` lost hundreds to "connection timed out").
//!
//! Each accepted socket keeps at most [`NOTSENT_LOWAT`] of written but
//! unsent bytes in the kernel (`TCP_NOTSENT_LOWAT`). A full map is slices
//! of one buffer every stream shares (`hub::encoded`), and a send queue
//! autotuned to megabytes copied it into every slow stream's socket: in a
//! 10,000-stream storm that put the host's TCP memory under pressure for
//! seconds at a time (segments dropped, retransmission timeouts, every
//! connection on the host slowed, the relay's too), and the storm on two
//! PostgreSQL replicas took 44 s to settle instead of 28. The kernel's
//! copies become the process's own queued writes instead, which the
//! coordinator's RSS then shows (its storm peak rose from about 1.1 to
//! 1.9 GB on SQLite: memory the kernel held before, uncounted). Bytes in
//! flight are not limited, so neither is throughput; the server only
//! refills a socket more often.
//!
//! HTTP/1.1 and HTTP/2 are both served (hyper-util's auto builder); over
//! TLS the ALPN list of the server's config decides which a client gets.

use std::io;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;
use tower_http::timeout::RequestBodyTimeoutLayer;
use tracing::debug;

use crate::ratelimit::IpSlots;

/// The accept queue asked for; the kernel caps it at
/// `net.core.somaxconn` (4,096 by default since Linux 5.4).
pub const BACKLOG: u32 = 16_384;

/// A listening TCP socket on `addr` with an accept queue of [`BACKLOG`]
/// (and `SO_REUSEADDR`, as `TcpListener::bind` sets it on Unix).
pub fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = match addr {
        SocketAddr::V4(_) => TcpSocket::new_v4()?,
        SocketAddr::V6(_) => TcpSocket::new_v6()?,
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(BACKLOG)
}

/// The most written but unsent bytes an accepted socket holds.
pub const NOTSENT_LOWAT: u32 = 128 << 10;

/// The client's socket address, put into each request's extensions.
#[derive(Debug, Clone, Copy)]
pub struct PeerAddr(pub SocketAddr);

/// Whether connections are wrapped in TLS.
#[derive(Clone)]
#[non_exhaustive]
pub enum Security {
    Tls(Arc<rustls::ServerConfig>),
    /// Plain TCP: node keys are still proven, but the server's identity and
    /// the traffic's metadata are not protected. Labs and loopback only;
    /// the caller says so in its log.
    Plain,
}

/// How long a client may take over each stage of a request.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    pub handshake: Duration,
    pub header_read: Duration,
    pub body_read: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            handshake: Duration::from_secs(10),
            header_read: Duration::from_secs(10),
            // Request bodies are small JSON documents (register, endpoints);
            // a slow link still sends them in well under this.
            body_read: Duration::from_secs(30),
        }
    }
}

/// Why the listener could not be set up.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ListenError {
    #[error("reading {path}: {source}")]
    Read {
        path: String,
        source: rustls::pki_types::pem::Error,
    },
    #[error("no certificate in {0}")]
    NoCertificate(String),
    #[error("TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
}

/// A TLS server configuration from PEM files (certificate chain, key).
/// `http2` offers HTTP/2 in ALPN beside HTTP/1.1: the coordinator's API
/// takes it; a standalone relay does not (its upgrade is HTTP/1.1 only).
pub fn tls_config_from_pem(
    cert: &Path,
    key: &Path,
    http2: bool,
) -> Result<Arc<rustls::ServerConfig>, ListenError> {
    let read_err = |p: &Path| {
        let path = p.display().to_string();
        move |source| ListenError::Read { path, source }
    };
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(read_err(cert))?
        .collect::<Result<_, _>>()
        .map_err(read_err(cert))?;
    if certs.is_empty() {
        return Err(ListenError::NoCertificate(cert.display().to_string()));
    }
    let key = PrivateKeyDer::from_pem_file(key).map_err(read_err(key))?;
    let mut cfg = tls_config(certs, key)?;
    if http2 {
        // Only this function has made the Arc: it is not shared yet.
        if let Some(cfg) = Arc::get_mut(&mut cfg) {
            cfg.alpn_protocols.insert(0, b"h2".to_vec());
        }
    }
    Ok(cfg)
}

/// A TLS server configuration from DER values (tests, embedded certs),
/// HTTP/1.1 only.
pub fn tls_config(
    certs: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<Arc<rustls::ServerConfig>, ListenError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

/// How many connections may be open at once.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// In all. Below the unit's `LimitNOFILE` (65536), leaving room for
    /// the database, STUN and the process's own files.
    pub total: usize,
    /// From one source IP. Generous, because many agents can sit behind
    /// one NAT (an office, a cloud NAT gateway), each holding a map stream
    /// and a relay connection.
    pub per_ip: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            total: 50_000,
            per_ip: 1_024,
        }
    }
}

/// Accepts connections forever and serves `router` on each, with the
/// default [`Timeouts`] and [`Limits`].
pub async fn serve(listener: TcpListener, router: Router, security: Security) -> io::Result<()> {
    serve_with(
        listener,
        router,
        security,
        Timeouts::default(),
        Limits::default(),
    )
    .await
}

/// [`serve`] with explicit deadlines and caps (tests use small ones).
pub async fn serve_with(
    listener: TcpListener,
    router: Router,
    security: Security,
    timeouts: Timeouts,
    limits: Limits,
) -> io::Result<()> {
    let total = Arc::new(Semaphore::new(limits.total));
    let per_ip = IpSlots::new(limits.per_ip);
    let acceptor = match &security {
        Security::Tls(cfg) => Some(TlsAcceptor::from(cfg.clone())),
        Security::Plain => None,
    };
    let router = router.layer(RequestBodyTimeoutLayer::new(timeouts.body_read));
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                // Typically out of file descriptors: back off, don't spin.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let slot = total
            .clone()
            .try_acquire_owned()
            .ok()
            .zip(per_ip.take(peer.ip()));
        let Some(slot) = slot else {
            tracing::debug!(%peer, "connection refused: too many open");
            drop(tcp);
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let _ = socket2::SockRef::from(&tcp).set_tcp_notsent_lowat(NOTSENT_LOWAT);
        let acceptor = acceptor.clone();
        let app = router.clone();
        tokio::spawn(async move {
            connection(tcp, peer, acceptor, app, timeouts).await;
            drop(slot);
        });
    }
}

/// One connection: the TLS handshake within its deadline, then HTTP.
async fn connection(
    tcp: TcpStream,
    peer: SocketAddr,
    acceptor: Option<TlsAcceptor>,
    app: Router,
    timeouts: Timeouts,
) {
    let service = TowerToHyperService::new(app.layer(axum::Extension(PeerAddr(peer))));
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        // Queue the body's buffers instead of copying them into one: a
        // full map is slices of a buffer every stream shares
        // (`hub::encoded`), and a copy per connection is what that saves.
        .writev(true)
        .timer(TokioTimer::new())
        .header_read_timeout(timeouts.header_read);
    builder.http2().timer(TokioTimer::new());
    let result = match acceptor {
        None => {
            builder
                .serve_connection_with_upgrades(TokioIo::new(tcp), service)
                .await
        }
        Some(acceptor) => {
            let tls = match tokio::time::timeout(timeouts.handshake, acceptor.accept(tcp)).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    debug!(%peer, error = %e, "TLS handshake failed");
                    return;
                }
                Err(_) => {
                    debug!(%peer, "TLS handshake timed out");
                    return;
                }
            };
            builder
                .serve_connection_with_upgrades(TokioIo::new(tls), service)
                .await
        }
    };
    if let Err(e) = result {
        debug!(%peer, error = %e, "connection ended with an error");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::routing::post;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    const SHORT: Timeouts = Timeouts {
        handshake: Duration::from_millis(300),
        header_read: Duration::from_millis(300),
        body_read: Duration::from_millis(300),
    };

    async fn server() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let app = Router::new().route("/echo", post(|body: String| async move { body }));
        tokio::spawn(serve_with(
            listener,
            app,
            Security::Plain,
            SHORT,
            Limits::default(),
        ));
        addr
    }

    /// What the server sends until it closes or ends a response head,
    /// within `within`; `None` when it does neither (it is still waiting
    /// on us).
    async fn first_reply(s: &mut TcpStream, within: Duration) -> Option<String> {
        let read = async {
            let mut out = Vec::new();
            let mut buf = [0u8; 1024];
            loop {
                let n = s.read(&mut buf).await.unwrap_or(0);
                out.extend_from_slice(&buf[..n]);
                if n == 0 || out.windows(4).any(|w| w == b"\r\n\r\n") {
                    return String::from_utf8_lossy(&out).into_owned();
                }
            }
        };
        tokio::time::timeout(within, read).await.ok()
    }

    #[tokio::test]
    async fn a_complete_request_is_answered() {
        let addr = server().await;
        let mut s = TcpStream::connect(addr).await.expect("connect");
        s.write_all(
            b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nConnection: close\r\n\r\nhi",
        )
        .await
        .expect("write");
        let reply = first_reply(&mut s, Duration::from_secs(5))
            .await
            .expect("an answer");
        assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    }

    #[tokio::test]
    async fn a_half_sent_header_is_dropped_after_the_header_timeout() {
        let addr = server().await;
        let mut s = TcpStream::connect(addr).await.expect("connect");
        s.write_all(b"POST /echo HTTP/1.1\r\nHost: x\r\n")
            .await
            .expect("write");
        // Without the header timer the server would wait forever.
        let reply = first_reply(&mut s, Duration::from_secs(5)).await;
        assert!(reply.is_some(), "the server kept a half-sent header open");
    }

    #[tokio::test]
    async fn a_half_sent_body_gets_an_error_after_the_body_timeout() {
        let addr = server().await;
        let mut s = TcpStream::connect(addr).await.expect("connect");
        s.write_all(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nonly part")
            .await
            .expect("write");
        // Without the body timeout the handler would wait forever for the
        // other 91 bytes.
        let reply = first_reply(&mut s, Duration::from_secs(5))
            .await
            .expect("the server kept a half-sent body open");
        assert!(!reply.starts_with("HTTP/1.1 200"), "{reply}");
    }

    #[tokio::test]
    async fn connections_past_the_per_address_cap_are_closed_at_once() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let app = Router::new().route("/echo", post(|body: String| async move { body }));
        let patient = Timeouts {
            header_read: Duration::from_secs(30),
            ..SHORT
        };
        let limits = Limits {
            total: 100,
            per_ip: 2,
        };
        tokio::spawn(serve_with(listener, app, Security::Plain, patient, limits));
        let mut idle = Vec::new();
        for _ in 0..2 {
            idle.push(TcpStream::connect(addr).await.expect("connect"));
        }
        // Give the accept loop the two before the third arrives.
        tokio::time::sleep(Duration::from_millis(100)).await;
        let mut third = TcpStream::connect(addr).await.expect("connect");
        let closed = first_reply(&mut third, Duration::from_secs(2)).await;
        assert_eq!(closed.as_deref(), Some(""), "the third was not closed");
        // The first two are still open (the header timer is 30 s).
        let held = first_reply(&mut idle[0], Duration::from_millis(200)).await;
        assert!(
            held.is_none(),
            "an idle connection under the cap was closed"
        );
        // A place freed is a place to take.
        drop(idle);
        tokio::time::sleep(Duration::from_millis(100)).await;
        let mut again = TcpStream::connect(addr).await.expect("connect");
        again
            .write_all(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nhi")
            .await
            .expect("write");
        let reply = first_reply(&mut again, Duration::from_secs(2))
            .await
            .expect("answer");
        assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    }
}
