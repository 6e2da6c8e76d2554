//! Which node keys may use this network's relays, from the coordinator's
//! side: the embedded relay's [`Admission`], and the node feed
//! (`GET /api/v1/relay/nodes`) that standalone relays follow.
//!
//! Both follow the hub rather than the database: the hub already turns
//! every change note (from this replica, from an administration command, or
//! from another replica through PostgreSQL's NOTIFY) into an event and keeps
//! a snapshot of every node, so a removal anywhere reaches the relays here
//! within the hub's latency (a poll interval on SQLite, a NOTIFY on
//! PostgreSQL), well inside the 2 s a removed node may keep its relay path.
//!
//! The admission mirrors the key set in memory, since it is asked at every
//! relay handshake and a reconnecting herd must not cost a query each. A key
//! missing from the mirror is looked up in the store before it is refused:
//! a node that has just registered may reach the relay before the hub has
//! read its change note. Removals are broadcast for every removal event, not
//! only for keys in the mirror, so a connection admitted by that lookup is
//! still cut when its node goes.
//!
//! The feed sends a snapshot, then `add`/`remove` deltas and keepalives,
//! exactly as `warren::proto::relay::auth` specifies. When the hub says
//! events were lost (or this stream lagged behind it), the stream sends a
//! fresh snapshot, which the relay treats as a replacement.

use std::collections::{HashMap, HashSet};
use std::convert::Infallible;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{header, HeaderMap};
use axum::response::Response;
use axum::routing::get;
use axum::Router;
use futures_util::future::BoxFuture;
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::{broadcast, mpsc};
use tokio::task::JoinHandle;
use tracing::Instrument as _;
use warren::control::ErrorCode;
use warren::keys::NodeKey;
use warren::proto::relay::auth::{
    verify_auth_header, NodesEvent, AUTH_MAX_SKEW_SECS, KEEPALIVE_SECS, NODES_PATH, NONCE_LEN,
};

use crate::api::{unix_now, ApiError};
use crate::hub::{Hub, HubEvent};
use crate::relay::Admission;
use crate::store::Store;

fn snapshot_keys(hub: &Hub) -> HashSet<NodeKey> {
    hub.with_snapshot(|s| s.values().map(|u| u.node.key).collect())
}

/// The embedded relay's admission: registered, not removed.
#[derive(Debug)]
pub struct StoreAdmission {
    store: Store,
    keys: RwLock<HashSet<NodeKey>>,
    removed: broadcast::Sender<NodeKey>,
}

impl StoreAdmission {
    /// Starts following `hub` (which must already be running).
    pub fn spawn(store: Store, hub: &Hub) -> (Arc<StoreAdmission>, JoinHandle<()>) {
        // Subscribe before reading the snapshot: a change in between is
        // seen twice at worst, never missed.
        let events = hub.subscribe();
        let (removed, _) = broadcast::channel(1024);
        let me = Arc::new(StoreAdmission {
            store,
            keys: RwLock::new(snapshot_keys(hub)),
            removed,
        });
        let task = tokio::spawn(me.clone().follow(hub.clone(), events));
        (me, task)
    }

    fn keys(&self) -> std::sync::RwLockWriteGuard<'_, HashSet<NodeKey>> {
        // Only whole inserts and removals happen under the lock.
        self.keys.write().unwrap_or_else(|p| p.into_inner())
    }

    fn contains(&self, key: &NodeKey) -> bool {
        self.keys
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .contains(key)
    }

    async fn follow(self: Arc<Self>, hub: Hub, mut events: broadcast::Receiver<HubEvent>) {
        loop {
            match events.recv().await {
                Ok(HubEvent::Upsert(u)) => {
                    self.keys().insert(u.node.key);
                }
                // Relays admit every node; the policy is for the nodes.
                Ok(HubEvent::Access(_)) => {}
                Ok(HubEvent::Removed { key, .. }) => {
                    self.keys().remove(&key);
                    // No receiver just means no relay is running.
                    let _ = self.removed.send(key);
                }
                Ok(HubEvent::Resync) | Err(RecvError::Lagged(_)) => {
                    let fresh = snapshot_keys(&hub);
                    let gone: Vec<NodeKey> = {
                        let mut keys = self.keys();
                        let gone = keys.difference(&fresh).copied().collect();
                        *keys = fresh;
                        gone
                    };
                    for key in gone {
                        let _ = self.removed.send(key);
                    }
                }
                Err(RecvError::Closed) => return,
            }
        }
    }
}

impl Admission for StoreAdmission {
    fn is_allowed<'a>(&'a self, key: &'a NodeKey) -> BoxFuture<'a, bool> {
        Box::pin(async move {
            if self.contains(key) {
                return true;
            }
            match self.store.node_by_key(key).await {
                Ok(found) => found.is_some(),
                Err(e) => {
                    tracing::warn!(node = %key.short(), error = %e, "relay admission: store lookup failed");
                    false
                }
            }
        })
    }

    fn removals(&self) -> broadcast::Receiver<NodeKey> {
        self.removed.subscribe()
    }
}

#[derive(Clone)]
struct FeedState {
    hub: Hub,
    secret: Arc<Vec<u8>>,
    /// Header nonces seen within the skew window, with their time: a
    /// captured header is good for one feed, not for a minute of them.
    seen: Arc<std::sync::Mutex<HashMap<[u8; NONCE_LEN], u64>>>,
}

/// The node feed's route, authenticated with `secret`. Mounted only when
/// a relay secret is configured; without one the path is an ordinary 404.
pub fn feed_router(hub: Hub, secret: Vec<u8>) -> Router {
    Router::new()
        .route(NODES_PATH, get(feed))
        .with_state(FeedState {
            hub,
            secret: Arc::new(secret),
            seen: Arc::default(),
        })
}

type Line = Result<Bytes, Infallible>;

async fn feed(State(st): State<FeedState>, headers: HeaderMap) -> Result<Response, ApiError> {
    let value = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| {
            ApiError::new(
                ErrorCode::Unauthenticated,
                "missing Authorization: WarrenRelay header",
            )
        })?;
    let now = unix_now();
    let creds = verify_auth_header(&st.secret, value, now).map_err(|e| {
        tracing::info!(error = %e, "relay node feed: refused credentials");
        ApiError::new(ErrorCode::Unauthenticated, e.to_string())
    })?;
    {
        let mut seen = st.seen.lock().unwrap_or_else(|p| p.into_inner());
        // Older than the window both ways: refused for skew anyway.
        seen.retain(|_, ts| now.abs_diff(*ts) <= AUTH_MAX_SKEW_SECS);
        if seen.insert(creds.nonce, creds.ts).is_some() {
            tracing::info!(relay = %creds.relay.short(), "relay node feed: replayed header refused");
            return Err(ApiError::new(
                ErrorCode::Replayed,
                "this Authorization header was already used",
            ));
        }
    }
    let relay = creds.relay;
    let events = st.hub.subscribe();
    let (lines, rx) = mpsc::channel::<Line>(64);
    let span = tracing::info_span!("relay_feed", relay = %relay.short());
    tokio::spawn(run_feed(st.hub, events, lines).instrument(span));
    Response::builder()
        .header(header::CONTENT_TYPE, "application/x-ndjson")
        .header(header::CACHE_CONTROL, "no-store")
        .body(Body::from_stream(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        ))
        .map_err(|e| ApiError::new(ErrorCode::Internal, e.to_string()))
}

async fn send(lines: &mpsc::Sender<Line>, ev: &NodesEvent) -> Result<(), ()> {
    let mut line = serde_json::to_string(ev).map_err(|e| {
        tracing::error!(error = %e, "could not encode a node feed event");
    })?;
    line.push('\n');
    lines.send(Ok(Bytes::from(line))).await.map_err(|_| ())
}

async fn run_feed(hub: Hub, mut events: broadcast::Receiver<HubEvent>, lines: mpsc::Sender<Line>) {
    let snapshot = |hub: &Hub| {
        let keys = snapshot_keys(hub);
        let ev = NodesEvent::Snapshot {
            nodes: keys.iter().copied().collect(),
        };
        (keys, ev)
    };
    let (mut known, ev) = snapshot(&hub);
    tracing::info!(nodes = known.len(), "relay follows the node feed");
    if send(&lines, &ev).await.is_err() {
        return;
    }
    let mut keepalive = tokio::time::interval(Duration::from_secs(KEEPALIVE_SECS));
    keepalive.tick().await;
    loop {
        let sent = tokio::select! {
            ev = events.recv() => match ev {
                Ok(HubEvent::Upsert(u)) if known.insert(u.node.key) => {
                    send(&lines, &NodesEvent::Add { node: u.node.key }).await
                }
                Ok(HubEvent::Upsert(_)) | Ok(HubEvent::Access(_)) => Ok(()),
                // Sent even for a key this stream never announced: the
                // relay ignores an absent key, and a stale one is worse.
                Ok(HubEvent::Removed { key, .. }) => {
                    known.remove(&key);
                    send(&lines, &NodesEvent::Remove { node: key }).await
                }
                Ok(HubEvent::Resync) | Err(RecvError::Lagged(_)) => {
                    let (keys, ev) = snapshot(&hub);
                    known = keys;
                    send(&lines, &ev).await
                }
                Err(RecvError::Closed) => Err(()),
            },
            _ = keepalive.tick() => send(&lines, &NodesEvent::Keepalive).await,
            _ = lines.closed() => Err(()),
        };
        if sent.is_err() {
            tracing::info!("relay left the node feed");
            return;
        }
    }
}
