//! `GET /map`: the long-lived map stream.
//!
//! The handler authenticates, marks the node online, subscribes to the hub
//! *before* reading the full map (so no change can fall between the two),
//! and hands the response body to a task that turns hub events into deltas.
//! The task tracks which peers this stream has been told about, so it can
//! say `peer_added` or `peer_changed` and never announces a removal of a
//! peer the node never saw. When the node itself is removed the task just
//! returns: the body ends, and the node's next request is refused.

use std::collections::HashSet;
use std::convert::Infallible;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{header, HeaderMap, Method, Uri};
use axum::response::Response;
use tokio::sync::{broadcast, mpsc};
use tracing::Instrument as _;
use warren::control::MapMessage;

use super::{authenticate, require_empty, unknown_node, ApiError, AppState};
use crate::hub::HubEvent;
use crate::store::{NodeRecord, Store};

type Line = Result<Bytes, Infallible>;

pub(super) async fn map(
    State(st): State<AppState>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let a = authenticate(&st, &method, &uri, &headers, body).await?;
    require_empty(&a.body)?;
    let mut tx = st.store.begin().await?;
    Store::consume_nonce(&mut tx, &a.auth.nonce, &a.auth.node, a.auth.time as i64).await?;
    let node = Store::node_by_key_tx(&mut tx, &a.auth.node)
        .await?
        .ok_or_else(unknown_node)?;
    st.store.stream_delta(&mut tx, &node, 1).await?;
    tx.commit().await?;
    st.hub.wake();
    *st.live().entry(node.id).or_default() += 1;

    let events = st.hub.subscribe();
    let (lines, rx) = mpsc::channel::<Line>(64);
    let mut stream = MapTask {
        st: st.clone(),
        node,
        known: HashSet::new(),
        lines,
    };
    // The first full map is sent from the task too, so that a failure to
    // build it is handled like any later one.
    let span = tracing::info_span!("map", node = %stream.node.key.short());
    tokio::spawn(async move { stream.run(events).await }.instrument(span));
    let body = Body::from_stream(tokio_stream::wrappers::ReceiverStream::new(rx));
    Response::builder()
        .header(header::CONTENT_TYPE, "application/x-ndjson")
        .header(header::CACHE_CONTROL, "no-store")
        .body(body)
        .map_err(|e| ApiError::new(warren::control::ErrorCode::Internal, e.to_string()))
}

struct MapTask {
    st: AppState,
    node: NodeRecord,
    known: HashSet<i64>,
    lines: mpsc::Sender<Line>,
}

/// Why a stream ended.
enum End {
    /// The node was removed: do not touch its (deleted) row.
    Removed,
    /// The agent went away or the server is failing.
    Gone,
}

impl MapTask {
    async fn run(&mut self, mut events: broadcast::Receiver<HubEvent>) {
        let end = self.serve(&mut events).await;
        self.close(end).await;
    }

    async fn serve(&mut self, events: &mut broadcast::Receiver<HubEvent>) -> End {
        if let Err(end) = self.send_full().await {
            return end;
        }
        let mut keepalive = tokio::time::interval(self.st.keepalive);
        keepalive.tick().await;
        loop {
            let result = tokio::select! {
                ev = events.recv() => self.on_event(ev).await,
                _ = keepalive.tick() => self.send(&MapMessage::Keepalive).await,
                _ = self.lines.closed() => Err(End::Gone),
            };
            if let Err(end) = result {
                return end;
            }
        }
    }

    async fn on_event(
        &mut self,
        ev: Result<HubEvent, broadcast::error::RecvError>,
    ) -> Result<(), End> {
        match ev {
            Ok(HubEvent::Upsert(n)) if n.id == self.node.id => {
                self.node = (*n).clone();
                self.send(&MapMessage::SelfChanged { node: n.to_peer() })
                    .await
            }
            Ok(HubEvent::Upsert(n)) => {
                let peer = n.to_peer();
                let msg = if self.known.insert(n.id) {
                    MapMessage::PeerAdded { peer }
                } else {
                    MapMessage::PeerChanged { peer }
                };
                self.send(&msg).await
            }
            Ok(HubEvent::Removed { node_id, .. }) if node_id == self.node.id => {
                tracing::info!("node removed: ending its map stream");
                Err(End::Removed)
            }
            Ok(HubEvent::Removed { node_id, key }) => {
                if self.known.remove(&node_id) {
                    self.send(&MapMessage::PeerRemoved { key }).await
                } else {
                    Ok(())
                }
            }
            Ok(HubEvent::Resync) | Err(broadcast::error::RecvError::Lagged(_)) => {
                self.send_full().await
            }
            Err(broadcast::error::RecvError::Closed) => Err(End::Gone),
        }
    }

    async fn send_full(&mut self) -> Result<(), End> {
        let nodes = match self.st.store.list_nodes().await {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!(error = %e, "could not build the full map");
                return Err(End::Gone);
            }
        };
        let Some(me) = nodes.iter().find(|n| n.id == self.node.id).cloned() else {
            return Err(End::Removed);
        };
        self.known = nodes
            .iter()
            .filter(|n| n.id != me.id)
            .map(|n| n.id)
            .collect();
        let msg = MapMessage::Full {
            self_node: me.to_peer(),
            peers: nodes
                .iter()
                .filter(|n| n.id != me.id)
                .map(NodeRecord::to_peer)
                .collect(),
            relay_map: self.st.relay_map.clone(),
        };
        self.node = me;
        self.send(&msg).await
    }

    async fn send(&self, msg: &MapMessage) -> Result<(), End> {
        let mut line = match serde_json::to_vec(msg) {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(error = %e, "could not encode a map message");
                return Err(End::Gone);
            }
        };
        line.push(b'\n');
        self.lines
            .send(Ok(Bytes::from(line)))
            .await
            .map_err(|_| End::Gone)
    }

    async fn close(&self, end: End) {
        {
            let mut live = self.st.live();
            if let Some(n) = live.get_mut(&self.node.id) {
                *n -= 1;
                if *n == 0 {
                    live.remove(&self.node.id);
                }
            }
        }
        if let End::Removed = end {
            return;
        }
        let result = async {
            let mut tx = self.st.store.begin().await?;
            self.st.store.stream_delta(&mut tx, &self.node, -1).await?;
            tx.commit().await?;
            Ok::<_, crate::store::StoreError>(())
        }
        .await;
        match result {
            Ok(()) => self.st.hub.wake(),
            Err(e) => tracing::warn!(error = %e, "could not mark the node offline"),
        }
    }
}
