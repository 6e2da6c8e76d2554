//! The relay client: a tokio driver around the sans-IO
//! [`ClientSession`](crate::proto::relay::client::ClientSession).
//!
//! [`RelayClient::connect`] returns at once with a [`RelaySender`] and a
//! [`RelayReceiver`]; a background task dials the relay ([`dial`]), runs the
//! session, and on any failure dials again with exponential backoff, for as
//! long as the sender lives. The data plane never waits on the relay:
//! [`RelaySender::try_send`] drops when the bounded queue is full, and
//! received packets that the consumer does not take in time are dropped too,
//! and counted, rather than stalling the connection.

pub mod dial;
mod driver;

use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::mpsc;

use crate::keys::{NodeKey, PrivateKey};
use crate::proto::relay::client::SessionConfig;
use crate::proto::relay::{PeerGoneReason, RelayHealth};

pub use crate::dial::{DialError, ProxyConfig};

/// Which HTTP path carries the frames (the agent's `relay_transport`:
/// `"upgrade"`, `"websocket"` or `"auto"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RelayTransport {
    /// `GET /relay` with `Upgrade: warren-relay`: a raw frame stream.
    Upgrade,
    /// `GET /relay/ws`: the same frames in WebSocket binary messages, for
    /// proxies that pass only HTTP and WebSocket.
    WebSocket,
    /// The upgrade first; if something on the path refuses or mangles it,
    /// WebSocket from then on.
    #[default]
    Auto,
}

/// Everything [`RelayClient::connect`] needs besides the node key.
#[derive(Debug, Clone)]
pub struct RelayClientConfig {
    /// `https://host[:port]`; `http://` only with `allow_plain`.
    pub url: String,
    pub transport: RelayTransport,
    /// Accept `http://` URLs (labs only).
    pub allow_plain: bool,
    /// TLS settings; `None` uses the Mozilla root store.
    pub tls: Option<Arc<rustls::ClientConfig>>,
    pub proxy: Option<ProxyConfig>,
    pub session: SessionConfig,
    pub connect_timeout: Duration,
    pub backoff_min: Duration,
    pub backoff_max: Duration,
    /// Packets waiting to be sent / to be received, each direction.
    pub queue_len: usize,
}

impl RelayClientConfig {
    pub fn new(url: impl Into<String>) -> Self {
        RelayClientConfig {
            url: url.into(),
            transport: RelayTransport::Auto,
            allow_plain: false,
            tls: None,
            proxy: None,
            session: SessionConfig::default(),
            connect_timeout: Duration::from_secs(10),
            backoff_min: Duration::from_millis(250),
            backoff_max: Duration::from_secs(30),
            queue_len: 1024,
        }
    }
}

/// Things that happen to the connection, besides packets.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum RelayEvent {
    Connected {
        relay_key: NodeKey,
    },
    Disconnected {
        error: String,
    },
    PeerGone {
        key: NodeKey,
        reason: PeerGoneReason,
    },
    Health(RelayHealth),
    Rtt(Duration),
}

/// Why a packet was not queued.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum RelaySendError {
    #[error("relay send queue is full")]
    Full,
    #[error("relay client has stopped")]
    Closed,
}

pub(crate) enum Command {
    Packet(NodeKey, Bytes),
    Health,
}

/// Counters of the client side.
#[derive(Debug, Default)]
pub struct ClientStats {
    pub connects: AtomicU64,
    pub packets_sent: AtomicU64,
    pub packets_received: AtomicU64,
    /// Received packets dropped because the consumer was behind.
    pub recv_dropped: AtomicU64,
    /// Packets given while not connected, dropped.
    pub send_dropped: AtomicU64,
}

/// The sending half. Dropping it stops the client.
#[derive(Debug, Clone)]
pub struct RelaySender {
    tx: mpsc::Sender<Command>,
    stats: Arc<ClientStats>,
}

impl RelaySender {
    /// Queues a packet for `peer` without waiting.
    pub fn try_send(&self, peer: NodeKey, packet: Bytes) -> Result<(), RelaySendError> {
        self.tx
            .try_send(Command::Packet(peer, packet))
            .map_err(|e| match e {
                mpsc::error::TrySendError::Full(_) => RelaySendError::Full,
                mpsc::error::TrySendError::Closed(_) => RelaySendError::Closed,
            })
    }

    /// Queues a packet for `peer`, waiting for room.
    pub async fn send(&self, peer: NodeKey, packet: Bytes) -> Result<(), RelaySendError> {
        self.tx
            .send(Command::Packet(peer, packet))
            .await
            .map_err(|_| RelaySendError::Closed)
    }

    /// Asks the relay for its counters; they arrive as [`RelayEvent::Health`].
    pub fn request_health(&self) -> Result<(), RelaySendError> {
        self.tx
            .try_send(Command::Health)
            .map_err(|_| RelaySendError::Full)
    }

    pub fn stats(&self) -> &ClientStats {
        &self.stats
    }
}

/// What [`RelayReceiver::recv_any`] yields.
#[derive(Debug)]
pub enum Received {
    Packet(NodeKey, Bytes),
    Event(RelayEvent),
}

/// The receiving half.
#[derive(Debug)]
pub struct RelayReceiver {
    packets: mpsc::Receiver<(NodeKey, Bytes)>,
    events: mpsc::Receiver<RelayEvent>,
}

impl RelayReceiver {
    /// The next packet from a peer; `None` once the client has stopped.
    pub async fn recv(&mut self) -> Option<(NodeKey, Bytes)> {
        self.packets.recv().await
    }

    /// A packet that is already waiting, without waiting for one: lets a
    /// reader open everything in hand before one batched TUN write.
    pub fn try_recv(&mut self) -> Option<(NodeKey, Bytes)> {
        self.packets.try_recv().ok()
    }

    /// The next connection event; `None` once the client has stopped.
    pub async fn recv_event(&mut self) -> Option<RelayEvent> {
        self.events.recv().await
    }

    /// The next packet or event, whichever comes first; `None` once the
    /// client has stopped.
    pub async fn recv_any(&mut self) -> Option<Received> {
        tokio::select! {
            p = self.packets.recv() => p.map(|(from, bytes)| Received::Packet(from, bytes)),
            e = self.events.recv() => e.map(Received::Event),
        }
    }
}

/// Entry point of the relay client.
pub struct RelayClient;

impl RelayClient {
    /// Starts a client for `key` in the background (needs a tokio runtime).
    pub fn connect(config: RelayClientConfig, key: &PrivateKey) -> (RelaySender, RelayReceiver) {
        let (cmd_tx, cmd_rx) = mpsc::channel(config.queue_len);
        let (pkt_tx, pkt_rx) = mpsc::channel(config.queue_len);
        let (ev_tx, ev_rx) = mpsc::channel(64);
        let stats = Arc::new(ClientStats::default());
        let span = tracing::info_span!("relay_client", node = %key.public().short());
        let d = driver::Driver {
            config,
            key: key.clone(),
            cmds: cmd_rx,
            packets: pkt_tx,
            events: ev_tx,
            stats: stats.clone(),
        };
        tokio::spawn(tracing::Instrument::instrument(d.run(), span));
        (
            RelaySender { tx: cmd_tx, stats },
            RelayReceiver {
                packets: pkt_rx,
                events: ev_rx,
            },
        )
    }
}
