//! Opening a client connection to a warren server: the URL, TCP (through an
//! HTTP proxy's `CONNECT` when one is set), and TLS. The agent's relay
//! client dials relays with it; the coordinator's own outgoing connections
//! (a standalone relay's node feed from the coordinator, relay admission)
//! use it too, without linking the agent's relay client. The relay-specific
//! layers (the `GET /relay` upgrade, WebSocket) stay in
//! [`crate::relay_client::dial`].
//!
//! The proxy tunnel is one HTTP exchange, written by hand over `httparse`
//! because a full HTTP client (reqwest, hyper's client) would hide the
//! stream we need back afterwards; [`read_head`] is shared with the relay
//! upgrade for the same reason.

use std::io;
use std::sync::Arc;

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use bytes::{Bytes, BytesMut};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::http::Uri;

/// Any stream a connection can run on.
pub trait Io: AsyncRead + AsyncWrite + Send + Unpin + 'static {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> Io for T {}

/// Longest HTTP response head we accept from a proxy or a server.
const MAX_HEAD: usize = 16 * 1024;

/// Why a connection could not be opened.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DialError {
    #[error("URL {0:?} is invalid: {1}")]
    BadUrl(String, &'static str),
    #[error("URL uses plain http, which is allowed only in lab mode")]
    PlainNotAllowed,
    #[error("network: {0}")]
    Io(#[from] io::Error),
    #[error("timed out")]
    Timeout,
    #[error("proxy refused the tunnel: HTTP {0}")]
    ProxyStatus(u16),
    #[error("relay did not switch protocols: HTTP {0}")]
    UpgradeStatus(u16),
    #[error("malformed HTTP response: {0}")]
    BadResponse(&'static str),
    #[error("malformed HTTP response: {0}")]
    BadHead(#[source] httparse::Error),
    #[error("TLS settings: {0}")]
    Tls(#[source] rustls::Error),
    #[error("TLS handshake: {0}")]
    Handshake(#[source] io::Error),
    #[error("CA file: {0}")]
    CaPem(#[source] rustls::pki_types::pem::Error),
    #[error("CA file: {0}")]
    CaCert(#[source] rustls::Error),
    #[error("CA file holds no certificate")]
    NoCaCert,
    #[error("WebSocket: {0}")]
    WebSocket(#[source] Box<tokio_tungstenite::tungstenite::Error>),
}

impl DialError {
    /// Whether the relay was reached but the upgrade did not survive the
    /// path (a proxy or middlebox answered with an error or cut the
    /// exchange): the case where WebSocket may still get through.
    pub fn upgrade_blocked(&self) -> bool {
        matches!(
            self,
            DialError::UpgradeStatus(_) | DialError::BadResponse(_) | DialError::BadHead(_)
        )
    }
}

/// Where a server is, parsed from its URL.
#[derive(Debug, Clone)]
pub struct Target {
    pub host: String,
    pub port: u16,
    pub tls: bool,
}

impl Target {
    /// `host:port`, bracketed for IPv6: the HTTP `Host` header value.
    pub fn authority(&self) -> String {
        authority(self)
    }

    /// Whether the host is this machine (a loopback address or
    /// `localhost`): plain HTTP there crosses no network.
    pub fn is_loopback(&self) -> bool {
        self.host.eq_ignore_ascii_case("localhost")
            || self
                .host
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback())
    }
}

/// Whether `url` may be used: `https://` always; `http://` only to this
/// machine, or anywhere when the operator opted in for a lab (`insecure`).
/// Without TLS anyone on the path could read a join token and spend it
/// first, replace the network map, or pose as the relay.
pub fn plain_http_allowed(url: &str, insecure: bool) -> bool {
    parse_url(url, true).is_ok_and(|t| t.tls || insecure || t.is_loopback())
}

pub fn parse_url(url: &str, allow_plain: bool) -> Result<Target, DialError> {
    let uri: Uri = url
        .parse()
        .map_err(|_| DialError::BadUrl(url.into(), "not a URI"))?;
    let tls = match uri.scheme_str() {
        Some("https") => true,
        Some("http") if allow_plain => false,
        Some("http") => return Err(DialError::PlainNotAllowed),
        _ => return Err(DialError::BadUrl(url.into(), "scheme must be https")),
    };
    let host = uri
        .host()
        .ok_or_else(|| DialError::BadUrl(url.into(), "no host"))?;
    let host = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    let port = uri.port_u16().unwrap_or(if tls { 443 } else { 80 });
    Ok(Target { host, port, tls })
}

fn authority(t: &Target) -> String {
    if t.host.contains(':') {
        format!("[{}]:{}", t.host, t.port)
    } else {
        format!("{}:{}", t.host, t.port)
    }
}

/// Opens TCP (through `proxy` if given) and TLS for an `https://` URL, or
/// plain TCP for `http://` when `allow_plain`. Shared with other long-lived
/// HTTP clients of warren (the relay's node feed from the coordinator), so
/// proxy and TLS handling exist once. No timeout: callers bound it.
pub async fn connect_stream(
    url: &str,
    allow_plain: bool,
    tls: Option<Arc<rustls::ClientConfig>>,
    proxy: Option<&ProxyConfig>,
) -> Result<(Box<dyn Io>, Target), DialError> {
    let target = parse_url(url, allow_plain)?;
    let tcp = match proxy {
        Some(proxy) => connect_via_proxy(proxy, &target).await?,
        None => tcp_connect(&target.host, target.port).await?,
    };
    tcp.set_nodelay(true)?;
    if !target.tls {
        return Ok((Box::new(tcp), target));
    }
    let tls_config = match tls {
        Some(c) => c,
        None => default_tls_config()?,
    };
    let name = ServerName::try_from(target.host.clone())
        .map_err(|_| DialError::BadUrl(url.into(), "host is not a valid TLS name"))?;
    let tls = tokio_rustls::TlsConnector::from(tls_config)
        .connect(name, tcp)
        .await
        .map_err(DialError::Handshake)?;
    Ok((Box::new(tls), target))
}

/// TCP to `host:port`, trying each address it resolves to in turn, from a
/// socket carrying warren's mark ([`crate::sockmark`]) so that it never
/// enters warren's own routes.
pub async fn tcp_connect(host: &str, port: u16) -> io::Result<TcpStream> {
    let mut last = None;
    for addr in tokio::net::lookup_host((host, port)).await? {
        let sock = if addr.is_ipv4() {
            tokio::net::TcpSocket::new_v4()?
        } else {
            tokio::net::TcpSocket::new_v6()?
        };
        crate::sockmark::apply(&sock);
        match sock.connect(addr).await {
            Ok(s) => return Ok(s),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| {
        io::Error::new(io::ErrorKind::NotFound, format!("{host} has no address"))
    }))
}

/// The platform-independent default: Mozilla's roots (webpki-roots), ring.
pub fn default_tls_config() -> Result<Arc<rustls::ClientConfig>, DialError> {
    client_config(rustls::RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    })
}

/// A client configuration trusting `roots`, with ring (the one provider
/// every binary installs).
fn client_config(roots: rustls::RootCertStore) -> Result<Arc<rustls::ClientConfig>, DialError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(DialError::Tls)?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(cfg))
}

/// TLS settings trusting only the CA certificates in `pem`: for a
/// coordinator (and its embedded relay) under a private CA.
pub fn tls_config_with_ca(pem: &[u8]) -> Result<Arc<rustls::ClientConfig>, DialError> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::CertificateDer;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(pem) {
        let cert = cert.map_err(DialError::CaPem)?;
        roots.add(cert).map_err(DialError::CaCert)?;
    }
    if roots.is_empty() {
        return Err(DialError::NoCaCert);
    }
    client_config(roots)
}

async fn connect_via_proxy(proxy: &ProxyConfig, target: &Target) -> Result<TcpStream, DialError> {
    let mut tcp = tcp_connect(&proxy.host, proxy.port).await?;
    let auth = authority(target);
    let mut req = format!("CONNECT {auth} HTTP/1.1\r\nHost: {auth}\r\n");
    if let Some((user, pass)) = &proxy.credentials {
        let token = STANDARD.encode(format!("{user}:{pass}"));
        req.push_str(&format!("Proxy-Authorization: Basic {token}\r\n"));
    }
    req.push_str("\r\n");
    tcp.write_all(req.as_bytes()).await?;
    let (status, rest) = read_head(&mut tcp).await?;
    if !(200..300).contains(&status) {
        return Err(DialError::ProxyStatus(status));
    }
    if !rest.is_empty() {
        // Nothing may follow a CONNECT reply before we speak.
        return Err(DialError::BadResponse("proxy sent data after CONNECT"));
    }
    Ok(tcp)
}

/// An HTTP proxy reached with `CONNECT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxyConfig {
    pub host: String,
    pub port: u16,
    pub credentials: Option<(String, String)>,
}

impl ProxyConfig {
    /// Parses `http://[user:pass@]host[:port]` (the `HTTPS_PROXY` form).
    pub fn parse(s: &str) -> Result<Self, DialError> {
        let bad = |why| DialError::BadUrl(s.into(), why);
        let rest = s.strip_prefix("http://").unwrap_or(s);
        let rest = rest.trim_end_matches('/');
        let (creds, hostport) = match rest.rsplit_once('@') {
            Some((c, h)) => {
                let (u, p) = c.split_once(':').unwrap_or((c, ""));
                (Some((u.to_string(), p.to_string())), h)
            }
            None => (None, rest),
        };
        let t = parse_url(&format!("http://{hostport}"), true).map_err(|_| bad("proxy host"))?;
        let port = if hostport.ends_with(']') || !hostport.contains(':') {
            3128
        } else {
            t.port
        };
        if t.host.is_empty() {
            return Err(bad("proxy host"));
        }
        Ok(ProxyConfig {
            host: t.host,
            port,
            credentials: creds,
        })
    }

    /// The proxy from `HTTPS_PROXY` / `https_proxy`, if set and valid.
    pub fn from_env() -> Option<Self> {
        ["HTTPS_PROXY", "https_proxy"]
            .iter()
            .find_map(|v| std::env::var(v).ok())
            .filter(|v| !v.is_empty())
            .and_then(|v| Self::parse(&v).ok())
    }
}

/// Reads one HTTP/1.1 response head; returns the status and whatever bytes
/// followed it in the same reads.
pub(crate) async fn read_head<S: AsyncRead + Unpin + ?Sized>(
    s: &mut S,
) -> Result<(u16, Bytes), DialError> {
    let mut buf = BytesMut::with_capacity(1024);
    loop {
        if buf.len() >= MAX_HEAD {
            return Err(DialError::BadResponse("response head too long"));
        }
        let n = s.read_buf(&mut buf).await?;
        if n == 0 {
            return Err(DialError::BadResponse("connection closed in response head"));
        }
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut resp = httparse::Response::new(&mut headers);
        match resp.parse(&buf) {
            Ok(httparse::Status::Complete(len)) => {
                let code = resp.code.unwrap_or(0);
                let rest = buf.split_off(len).freeze();
                return Ok((code, rest));
            }
            Ok(httparse::Status::Partial) => continue,
            Err(e) => return Err(DialError::BadHead(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let t = parse_url("https://relay.example", false).unwrap();
        assert_eq!(
            (t.host.as_str(), t.port, t.tls),
            ("relay.example", 443, true)
        );
        let t = parse_url("http://[::1]:8080", true).unwrap();
        assert_eq!((t.host.as_str(), t.port, t.tls), ("::1", 8080, false));
        assert_eq!(authority(&t), "[::1]:8080");
        assert!(matches!(
            parse_url("http://x", false),
            Err(DialError::PlainNotAllowed)
        ));
        assert!(matches!(
            parse_url("ftp://x", true),
            Err(DialError::BadUrl(..))
        ));
        assert!(plain_http_allowed("https://coord.example", false));
        assert!(plain_http_allowed("http://127.0.0.1:8080", false));
        assert!(plain_http_allowed("http://[::1]:8080", false));
        assert!(plain_http_allowed("http://localhost", false));
        assert!(!plain_http_allowed("http://coord.example", false));
        assert!(!plain_http_allowed("http://11.11.0.10:443", false));
        assert!(plain_http_allowed("http://11.11.0.10:443", true));
        assert!(!plain_http_allowed("ftp://x", true));
    }

    #[tokio::test]
    async fn head_parser_keeps_trailing_bytes() {
        let mut data: &[u8] =
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: warren-relay\r\n\r\n\x01\x00";
        let (code, rest) = read_head(&mut data).await.unwrap();
        assert_eq!(code, 101);
        assert_eq!(&rest[..], b"\x01\x00");
        let mut bad: &[u8] = b"garbage\r\n\r\n";
        assert!(matches!(
            read_head(&mut bad).await,
            Err(DialError::BadHead(_))
        ));
    }

    #[test]
    fn proxy_urls() {
        let p = ProxyConfig::parse("http://user:pw@proxy.lan:8080/").unwrap();
        assert_eq!(p.host, "proxy.lan");
        assert_eq!(p.port, 8080);
        assert_eq!(p.credentials, Some(("user".into(), "pw".into())));
        let p = ProxyConfig::parse("10.0.0.1").unwrap();
        assert_eq!(
            (p.host.as_str(), p.port, p.credentials),
            ("10.0.0.1", 3128, None)
        );
        assert!(ProxyConfig::parse("http://").is_err());
    }
}
