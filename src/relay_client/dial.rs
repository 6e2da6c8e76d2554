//! Opening a transport to a relay: the connection itself
//! ([`crate::dial::connect_stream`]: TCP, an optional HTTP proxy, TLS), then
//! the HTTP upgrade or the WebSocket handshake.
//!
//! The layers stack in a fixed order, each over the one before:
//! TCP → (proxy `CONNECT`) → (TLS) → `GET /relay` upgrade or `GET /relay/ws`.
//! The upgrade is one HTTP exchange, written by hand over `httparse` (see
//! [`crate::dial`] for why). WebSocket uses tokio-tungstenite over the
//! stream built there, so TLS and proxies are handled once for both paths.

use std::time::Duration;

use bytes::Bytes;
use tokio::io::AsyncWriteExt;
use tokio_tungstenite::WebSocketStream;

use crate::dial::{connect_stream, read_head, DialError, Io, Target};

use super::{RelayClientConfig, RelayTransport};

/// A connected transport, ready for the relay handshake.
pub enum Conn {
    /// The raw frame stream, plus any bytes that arrived with the upgrade
    /// response (the relay may send its hello right behind it).
    Stream(Box<dyn Io>, Bytes),
    WebSocket(Box<WebSocketStream<Box<dyn Io>>>),
}

/// Opens a transport to the relay, within `config.connect_timeout`.
/// [`RelayTransport::Auto`] dials the upgrade path; the driver decides when
/// to fall back.
pub async fn dial(config: &RelayClientConfig) -> Result<Conn, DialError> {
    dial_with(config, config.transport).await
}

/// Like [`dial`], with the transport chosen by the caller.
pub async fn dial_with(
    config: &RelayClientConfig,
    transport: RelayTransport,
) -> Result<Conn, DialError> {
    tokio::time::timeout(config.connect_timeout, dial_inner(config, transport))
        .await
        .map_err(|_| DialError::Timeout)?
}

async fn dial_inner(
    config: &RelayClientConfig,
    transport: RelayTransport,
) -> Result<Conn, DialError> {
    let (stream, target) = connect_stream(
        &config.url,
        config.allow_plain,
        config.tls.clone(),
        config.proxy.as_ref(),
    )
    .await?;
    match transport {
        RelayTransport::Upgrade | RelayTransport::Auto => upgrade(stream, &target).await,
        RelayTransport::WebSocket => {
            let scheme = if target.tls { "wss" } else { "ws" };
            let url = format!("{scheme}://{}/relay/ws", target.authority());
            let (ws, _resp) = tokio_tungstenite::client_async(url, stream)
                .await
                .map_err(|e| DialError::WebSocket(Box::new(e)))?;
            Ok(Conn::WebSocket(Box::new(ws)))
        }
    }
}

async fn upgrade(mut stream: Box<dyn Io>, target: &Target) -> Result<Conn, DialError> {
    let req = format!(
        "GET /relay HTTP/1.1\r\nHost: {}\r\nConnection: Upgrade\r\nUpgrade: warren-relay\r\n\r\n",
        target.authority()
    );
    stream.write_all(req.as_bytes()).await?;
    stream.flush().await?;
    let (status, rest) = read_head(&mut stream).await?;
    if status != 101 {
        return Err(DialError::UpgradeStatus(status));
    }
    Ok(Conn::Stream(stream, rest))
}

/// Used by the driver for its write deadline.
pub(crate) const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
