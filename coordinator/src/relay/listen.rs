//! Serving the relay's router on a TCP listener, with TLS.
//!
//! The relay needs HTTP/1.1 connections that can be upgraded (both the
//! `warren-relay` upgrade and WebSocket take the connection over), so this is
//! a small accept loop over hyper's HTTP/1 server with upgrades enabled, and
//! rustls in front. Plain TCP exists for labs only and must be chosen by
//! name ([`Security::PlainForLab`]); there is no default.

use std::io;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper::server::conn::http1;
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tracing::{debug, warn};

/// How long a client has for the TLS handshake and its HTTP request.
const ACCEPT_TIMEOUT: Duration = Duration::from_secs(10);

/// The client's socket address, put into each request's extensions.
#[derive(Debug, Clone, Copy)]
pub struct PeerAddr(pub SocketAddr);

/// Whether connections are wrapped in TLS.
#[derive(Clone)]
#[non_exhaustive]
pub enum Security {
    Tls(Arc<rustls::ServerConfig>),
    /// Plain TCP: node keys are still proven, but the relay's identity and
    /// the packet metadata are not protected. Labs only.
    PlainForLab,
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
pub fn tls_config_from_pem(
    cert: &Path,
    key: &Path,
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
    tls_config(certs, key)
}

/// A TLS server configuration from DER values (tests, embedded certs).
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

/// Accepts connections forever and serves `router` on each.
pub async fn serve(listener: TcpListener, router: Router, security: Security) -> io::Result<()> {
    let acceptor = match &security {
        Security::Tls(cfg) => Some(TlsAcceptor::from(cfg.clone())),
        Security::PlainForLab => {
            warn!("relay listening on plain TCP (lab mode): traffic metadata is not protected");
            None
        }
    };
    loop {
        let (tcp, addr) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                debug!("accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        let router = router.clone();
        tokio::spawn(async move {
            let svc = TowerToHyperService::new(router.layer(axum::Extension(PeerAddr(addr))));
            let builder = {
                let mut b = http1::Builder::new();
                b.timer(hyper_util::rt::TokioTimer::new())
                    .header_read_timeout(ACCEPT_TIMEOUT);
                b
            };
            let result = match acceptor {
                Some(acc) => match tokio::time::timeout(ACCEPT_TIMEOUT, acc.accept(tcp)).await {
                    Ok(Ok(tls)) => {
                        builder
                            .serve_connection(TokioIo::new(tls), svc)
                            .with_upgrades()
                            .await
                    }
                    Ok(Err(e)) => {
                        debug!(%addr, "TLS handshake failed: {e}");
                        return;
                    }
                    Err(_) => return,
                },
                None => {
                    builder
                        .serve_connection(TokioIo::new(tcp), svc)
                        .with_upgrades()
                        .await
                }
            };
            if let Err(e) = result {
                debug!(%addr, "HTTP connection ended: {e}");
            }
        });
    }
}
