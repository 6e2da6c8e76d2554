//! The encrypted relay (DESIGN §6): DERP-like forwarding of opaque packets
//! between node keys, for peers that have no direct path.
//!
//! Clients connect over HTTP: `GET /relay` with `Upgrade: warren-relay`
//! turns the connection into a raw frame stream, and `GET /relay/ws` does
//! the same inside WebSocket binary messages for networks whose proxies pass
//! nothing else. `GET /relay/metrics` serves the counters as JSON. The
//! relay only ever sees WireGuard ciphertext and disco boxes.
//!
//! [`RelayServer::router`] is an axum router, so the coordinator can mount the
//! relay beside its control API; [`listen::serve`] runs any such router on a
//! TCP listener with TLS (or plain TCP, only when asked for by name, for
//! labs); [`remote::run_standalone`] is the `warren-coordinator relay` mode
//! that learns its node list from the coordinator.
//!
//! Structure: [`session`] handles one connection, [`state`] holds the
//! connected clients and counters, [`queue`] is each client's fair bounded
//! send queue, [`admission`] decides who may connect.

pub mod admission;
pub mod listen;
pub mod queue;
pub mod remote;
mod session;
mod state;
mod transport;

use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::WebSocketUpgrade;
use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use hyper_util::rt::TokioIo;
use tokio::sync::broadcast::error::RecvError;
use tracing::{debug, info};
use warren::keys::{NodeKey, PrivateKey};
use warren::proto::relay::{RelayHealth, DEFAULT_MAX_PAYLOAD, HEADER_LEN};

pub use admission::{Admission, StaticAdmission};
pub use listen::{serve, tls_config_from_pem, ListenError, Security};
pub use queue::QueueLimits;

use state::{CloseReason, Hub};

/// The `Upgrade` token of the raw frame-stream path.
pub const UPGRADE_PROTOCOL: &str = "warren-relay";

/// Limits that protect the relay from clients, and clients from each other.
#[derive(Debug, Clone, Copy)]
pub struct RelayLimits {
    /// Largest frame payload accepted.
    pub max_payload: usize,
    /// Connections one node key may hold at once (reconnects overlap).
    pub max_conns_per_node: usize,
    /// Hello, proof and admission must finish within this.
    pub handshake_timeout: Duration,
    /// A client silent for this long is dropped (clients ping every 25 s).
    pub idle_timeout: Duration,
    /// A write that makes no progress for this long ends the connection.
    pub write_timeout: Duration,
    pub queue: QueueLimits,
}

impl Default for RelayLimits {
    fn default() -> Self {
        RelayLimits {
            max_payload: DEFAULT_MAX_PAYLOAD,
            max_conns_per_node: 4,
            handshake_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(90),
            write_timeout: Duration::from_secs(10),
            queue: QueueLimits::default(),
        }
    }
}

/// A running relay: shared state plus the task that enforces removals.
#[derive(Clone)]
pub struct RelayServer {
    hub: Arc<Hub>,
}

impl RelayServer {
    /// Creates the relay. Must be called inside a tokio runtime: it spawns
    /// the task that disconnects removed nodes.
    pub fn new(key: PrivateKey, limits: RelayLimits, admission: Arc<dyn Admission>) -> Self {
        let removals = admission.removals();
        let hub = Arc::new(Hub::new(key, limits, admission));
        tokio::spawn(enforce_removals(Arc::downgrade(&hub), removals));
        RelayServer { hub }
    }

    pub fn public_key(&self) -> NodeKey {
        self.hub.key.public()
    }

    pub fn health(&self) -> RelayHealth {
        self.hub.metrics.snapshot()
    }

    /// The relay's HTTP routes: `/relay`, `/relay/ws`, `/relay/metrics`.
    pub fn router(&self) -> Router {
        Router::new()
            .route("/relay", get(upgrade))
            .route("/relay/ws", get(websocket))
            .route("/relay/metrics", get(metrics))
            .with_state(self.clone())
    }

    /// Serves one already-established byte stream (for callers with their
    /// own listener, and for tests).
    pub async fn serve_stream(&self, io: Box<dyn transport::Io>, peer: String) {
        let (rx, tx) = transport::from_stream(io);
        session::run(self.hub.clone(), rx, tx, peer).await;
    }
}

async fn enforce_removals(
    hub: std::sync::Weak<Hub>,
    mut removals: tokio::sync::broadcast::Receiver<NodeKey>,
) {
    loop {
        let r = removals.recv().await;
        let Some(hub) = hub.upgrade() else { return };
        match r {
            Ok(key) => {
                let n = hub.disconnect(&key, CloseReason::Removed);
                if n > 0 {
                    info!(node = %key.short(), "removed node disconnected from relay");
                    hub.metrics
                        .disconnected_removed
                        .fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
                }
            }
            Err(RecvError::Lagged(_)) => {
                // Removals were missed: ask about everyone still here.
                for key in hub.connected_keys() {
                    if !hub.admission.is_allowed(&key).await {
                        let n = hub.disconnect(&key, CloseReason::Removed);
                        hub.metrics
                            .disconnected_removed
                            .fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
                    }
                }
            }
            Err(RecvError::Closed) => return,
        }
    }
}

async fn upgrade(State(relay): State<RelayServer>, mut req: Request) -> Response {
    let wants = req
        .headers()
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case(UPGRADE_PROTOCOL));
    if !wants {
        return (
            StatusCode::UPGRADE_REQUIRED,
            [(header::UPGRADE, UPGRADE_PROTOCOL)],
            "this endpoint speaks the warren relay protocol only\n",
        )
            .into_response();
    }
    let peer = peer_of(&req);
    let on_upgrade = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        match on_upgrade.await {
            Ok(up) => relay.serve_stream(Box::new(TokioIo::new(up)), peer).await,
            Err(e) => debug!(%peer, "relay upgrade failed: {e}"),
        }
    });
    let mut resp = StatusCode::SWITCHING_PROTOCOLS.into_response();
    let h = resp.headers_mut();
    h.insert(header::UPGRADE, HeaderValue::from_static(UPGRADE_PROTOCOL));
    h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    resp
}

async fn websocket(
    State(relay): State<RelayServer>,
    ws: WebSocketUpgrade,
    req: Request,
) -> Response {
    let peer = peer_of(&req);
    let max = relay.hub.limits.max_payload + HEADER_LEN;
    ws.max_message_size(max.max(64 * 1024) * 2)
        .max_frame_size(max.max(64 * 1024) * 2)
        .on_upgrade(move |socket| async move {
            let (rx, tx) = transport::from_websocket(socket);
            session::run(relay.hub.clone(), rx, tx, peer).await;
        })
}

async fn metrics(State(relay): State<RelayServer>) -> Json<RelayHealth> {
    Json(relay.health())
}

/// The client's address, if the listener recorded it.
fn peer_of(req: &Request) -> String {
    req.extensions()
        .get::<listen::PeerAddr>()
        .map(|p| p.0.to_string())
        .unwrap_or_else(|| "unknown".into())
}
