//! The encrypted relay (see docs/architecture.md, "Relay"): DERP-like
//! forwarding of opaque packets
//! between node keys, for peers that have no direct path.
//!
//! Clients connect over HTTP: `GET /relay` with `Upgrade: warren-relay`
//! turns the connection into a raw frame stream, and `GET /relay/ws` does
//! the same inside WebSocket binary messages for networks whose proxies pass
//! nothing else. `GET /relay/metrics` serves the counters as JSON, to a
//! client on loopback or one that presents the metrics token
//! (`--metrics-token-file`): who is connected, and how much they send, is
//! not for anonymous clients. The relay only ever sees WireGuard ciphertext
//! and disco boxes.
//!
//! [`RelayServer::router`] is an axum router, so the coordinator can mount the
//! relay beside its control API; a standalone relay serves it alone. Both
//! run on the one accept loop, [`crate::listen::serve`] (TLS, upgrades,
//! deadlines on every stage of a request).
//! [`run_standalone`] is the `warren-coordinator relay` mode that learns its
//! node list from the coordinator.
//!
//! Structure: [`session`] handles one connection (upgrade or WebSocket),
//! [`state`] holds the connected clients and counters, [`queue`] is each
//! client's fair bounded send queue, [`admission`] decides who may connect.

pub mod admission;
pub mod queue;
mod session;
mod state;

use std::io;
use std::net::SocketAddr;
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
use tracing::{debug, info, warn};
use warren::keys::{NodeKey, PrivateKey};
use warren::proto::relay::{RelayHealth, DEFAULT_MAX_PAYLOAD, HEADER_LEN};

use crate::listen::{serve, PeerAddr, Security};
pub use admission::{
    spawn_remote_admission, Admission, FeedError, RemoteAdmissionConfig, StaticAdmission,
};
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
    /// Connections allowed in the handshake at once; more are closed at
    /// once, so unauthenticated sockets cannot pile up.
    pub max_pending_handshakes: usize,
    /// Of those, from one source address: one host cannot take them all.
    pub max_pending_per_ip: usize,
    /// The client's hello (its key and proof) must arrive within this of
    /// our hello: a client that holds a slot without speaking loses it
    /// well before `handshake_timeout`.
    pub hello_timeout: Duration,
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
            max_pending_handshakes: 1024,
            max_pending_per_ip: 32,
            hello_timeout: Duration::from_secs(3),
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
    /// The bearer token `GET /relay/metrics` accepts off loopback; `None`
    /// serves the counters to loopback clients only.
    metrics_token: Option<Arc<[u8]>>,
}

impl RelayServer {
    /// Creates the relay. Must be called inside a tokio runtime: it spawns
    /// the task that disconnects removed nodes.
    pub fn new(key: PrivateKey, limits: RelayLimits, admission: Arc<dyn Admission>) -> Self {
        let removals = admission.removals();
        let hub = Arc::new(Hub::new(key, limits, admission));
        tokio::spawn(enforce_removals(Arc::downgrade(&hub), removals));
        RelayServer {
            hub,
            metrics_token: None,
        }
    }

    /// Lets clients off loopback read the counters with
    /// `Authorization: Bearer <token>`.
    pub fn with_metrics_token(mut self, token: Option<Vec<u8>>) -> Self {
        self.metrics_token = token.map(Arc::from);
        self
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
    pub async fn serve_stream(&self, io: Box<dyn session::Io>, peer: Option<SocketAddr>) {
        let (rx, tx) = session::from_stream(io);
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
            Err(e) => debug!(?peer, "relay upgrade failed: {e}"),
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
            let (rx, tx) = session::from_websocket(socket);
            session::run(relay.hub.clone(), rx, tx, peer).await;
        })
}

async fn metrics(State(relay): State<RelayServer>, req: Request) -> Response {
    if !relay.may_read_metrics(&req) {
        return (
            StatusCode::UNAUTHORIZED,
            [(header::WWW_AUTHENTICATE, "Bearer")],
            "the relay's counters need the metrics token off loopback\n",
        )
            .into_response();
    }
    Json(relay.health()).into_response()
}

impl RelayServer {
    /// Loopback clients, and clients with the configured token. A request
    /// whose source the listener did not record counts as remote.
    fn may_read_metrics(&self, req: &Request) -> bool {
        if peer_of(req).is_some_and(|p| p.ip().is_loopback()) {
            return true;
        }
        let Some(want) = &self.metrics_token else {
            return false;
        };
        let got = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.as_bytes().strip_prefix(b"Bearer "));
        got.is_some_and(|got| constant_time_eq(got, want))
    }
}

/// Compares without an early exit, so the time taken says nothing about
/// how much of a guess was right.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The client's address, if the listener recorded it.
fn peer_of(req: &Request) -> Option<SocketAddr> {
    req.extensions().get::<PeerAddr>().map(|p| p.0)
}

/// Everything `warren-coordinator relay` needs.
#[derive(Clone)]
pub struct StandaloneConfig {
    pub listen: SocketAddr,
    pub security: Security,
    pub key: PrivateKey,
    pub limits: RelayLimits,
    pub coordinator: RemoteAdmissionConfig,
    /// See [`RelayServer::with_metrics_token`].
    pub metrics_token: Option<Vec<u8>>,
}

/// A standalone relay that is listening: its address, the server (for its
/// counters) and the tasks, stopped when this is dropped.
pub struct Standalone {
    pub addr: SocketAddr,
    pub server: RelayServer,
    serve: tokio::task::JoinHandle<io::Result<()>>,
    feed: tokio::task::JoinHandle<()>,
}

impl Standalone {
    /// Runs until the listener fails.
    pub async fn wait(&mut self) -> io::Result<()> {
        match (&mut self.serve).await {
            Ok(r) => r,
            Err(e) => Err(io::Error::other(e)),
        }
    }
}

impl Drop for Standalone {
    fn drop(&mut self) {
        self.serve.abort();
        self.feed.abort();
    }
}

/// Binds and starts a relay that learns its node list from the coordinator.
pub async fn start_standalone(cfg: StandaloneConfig) -> io::Result<Standalone> {
    let listener = crate::listen::bind(cfg.listen)?;
    let addr = listener.local_addr()?;
    let (admission, feed) = spawn_remote_admission(cfg.coordinator.clone());
    let server = RelayServer::new(cfg.key, cfg.limits, admission as Arc<dyn Admission>)
        .with_metrics_token(cfg.metrics_token);
    info!(%addr, key = %server.public_key(), "standalone relay listening");
    if matches!(cfg.security, Security::Plain) {
        warn!("relay listening on plain TCP (lab mode): traffic metadata is not protected");
    }
    let serve = tokio::spawn(serve(listener, server.router(), cfg.security));
    Ok(Standalone {
        addr,
        server,
        serve,
        feed,
    })
}

/// Runs a relay that learns its node list from the coordinator, until the
/// listener fails.
pub async fn run_standalone(cfg: StandaloneConfig) -> std::io::Result<()> {
    start_standalone(cfg).await?.wait().await
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use tower_service::Service;

    const TOKEN: &[u8] = b"a-metrics-token-of-some-length";

    /// Asks the relay's router for its counters as a client at `from`.
    async fn get_metrics(relay: &RelayServer, from: &str, auth: Option<&str>) -> StatusCode {
        let mut req = Request::get("/relay/metrics");
        if let Some(a) = auth {
            req = req.header(header::AUTHORIZATION, a);
        }
        let mut req = req.body(Body::empty()).unwrap();
        req.extensions_mut().insert(PeerAddr(from.parse().unwrap()));
        let mut router = relay.router();
        router.call(req).await.unwrap().status()
    }

    fn relay(token: Option<&[u8]>) -> RelayServer {
        RelayServer::new(
            PrivateKey::generate(),
            RelayLimits::default(),
            StaticAdmission::new([]) as Arc<dyn Admission>,
        )
        .with_metrics_token(token.map(<[u8]>::to_vec))
    }

    #[tokio::test]
    async fn counters_are_served_to_loopback_and_to_the_token_only() {
        let r = relay(Some(TOKEN));
        let bearer = format!("Bearer {}", std::str::from_utf8(TOKEN).unwrap());
        assert_eq!(
            get_metrics(&r, "127.0.0.1:5000", None).await,
            StatusCode::OK
        );
        assert_eq!(get_metrics(&r, "[::1]:5000", None).await, StatusCode::OK);
        let remote = "198.51.100.7:5000";
        assert_eq!(
            get_metrics(&r, remote, None).await,
            StatusCode::UNAUTHORIZED
        );
        assert_eq!(
            get_metrics(&r, remote, Some("Bearer a-metrics-token-of-some-lengtX")).await,
            StatusCode::UNAUTHORIZED
        );
        assert_eq!(
            get_metrics(&r, remote, Some("Basic YTpi")).await,
            StatusCode::UNAUTHORIZED
        );
        assert_eq!(get_metrics(&r, remote, Some(&bearer)).await, StatusCode::OK);
        // Without a token configured, no header opens it off loopback.
        let r = relay(None);
        assert_eq!(
            get_metrics(&r, remote, Some(&bearer)).await,
            StatusCode::UNAUTHORIZED
        );
        assert_eq!(
            get_metrics(&r, "127.0.0.1:5000", None).await,
            StatusCode::OK
        );
    }

    #[test]
    fn token_comparison() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"abcd"));
        assert!(!constant_time_eq(b"", b"a"));
    }
}
