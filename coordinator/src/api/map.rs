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
use tokio::sync::broadcast::error::{RecvError, TryRecvError};
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

/// The event just received plus whatever else is already queued (bounded).
fn drain(
    first: Result<HubEvent, RecvError>,
    events: &mut broadcast::Receiver<HubEvent>,
) -> Vec<Result<HubEvent, RecvError>> {
    let mut batch = vec![first];
    while batch.len() < 4096 {
        match events.try_recv() {
            Ok(ev) => batch.push(Ok(ev)),
            Err(TryRecvError::Empty) => break,
            Err(TryRecvError::Lagged(n)) => {
                batch.push(Err(RecvError::Lagged(n)));
                break;
            }
            Err(TryRecvError::Closed) => {
                batch.push(Err(RecvError::Closed));
                break;
            }
        }
    }
    batch
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
        if let Err(end) = self.send_full(false).await {
            return end;
        }
        let mut keepalive = tokio::time::interval(self.st.keepalive);
        keepalive.tick().await;
        loop {
            let result = tokio::select! {
                ev = events.recv() => {
                    let batch = drain(ev, events);
                    self.on_batch(batch).await
                }
                _ = keepalive.tick() => self.send(&MapMessage::Keepalive).await,
                _ = self.lines.closed() => Err(End::Gone),
            };
            if let Err(end) = result {
                return end;
            }
        }
    }

    /// Handles a burst of events. An upsert superseded by a later event for
    /// the same node in the burst is skipped: when a thousand nodes come
    /// online at once, each stream sends each node's final state once.
    async fn on_batch(&mut self, batch: Vec<Result<HubEvent, RecvError>>) -> Result<(), End> {
        if batch.iter().any(|ev| matches!(ev, Err(RecvError::Closed))) {
            return Err(End::Gone);
        }
        let me = self.node.id;
        if batch
            .iter()
            .any(|ev| matches!(ev, Ok(HubEvent::Removed { node_id, .. }) if *node_id == me))
        {
            tracing::info!("node removed: ending its map stream");
            return Err(End::Removed);
        }
        if batch
            .iter()
            .any(|ev| matches!(ev, Ok(HubEvent::Resync) | Err(RecvError::Lagged(_))))
        {
            // The full map is read now, so it is newer than every event here.
            tracing::debug!("resynchronising");
            return self.send_full(true).await;
        }
        let id_of = |ev: &Result<HubEvent, RecvError>| match ev {
            Ok(HubEvent::Upsert(u)) => Some(u.node.id),
            Ok(HubEvent::Removed { node_id, .. }) => Some(*node_id),
            _ => None,
        };
        for (i, ev) in batch.iter().enumerate() {
            let superseded = matches!(ev, Ok(HubEvent::Upsert(_)))
                && batch[i + 1..].iter().any(|later| id_of(later) == id_of(ev));
            if !superseded {
                if let Ok(ev) = ev {
                    self.on_event(ev).await?;
                }
            }
        }
        Ok(())
    }

    async fn on_event(&mut self, ev: &HubEvent) -> Result<(), End> {
        match ev {
            HubEvent::Upsert(u) if u.node.id == self.node.id => {
                self.node = u.node.clone();
                self.send_raw(format!(
                    r#"{{"type":"self_changed","node":{}}}"#,
                    u.peer_json
                ))
                .await
            }
            HubEvent::Upsert(u) => {
                let kind = if self.known.insert(u.node.id) {
                    "peer_added"
                } else {
                    "peer_changed"
                };
                self.send_raw(format!(r#"{{"type":"{kind}","peer":{}}}"#, u.peer_json))
                    .await
            }
            HubEvent::Removed { node_id, key } => {
                if self.known.remove(node_id) {
                    self.send(&MapMessage::PeerRemoved { key: *key }).await
                } else {
                    Ok(())
                }
            }
            HubEvent::Resync => self.send_full(true).await,
        }
    }

    /// Sends a full map built from the hub's snapshot. After a
    /// resynchronisation (`recheck`) the node's own row is read again: it
    /// may have been removed while notes were being lost.
    async fn send_full(&mut self, recheck: bool) -> Result<(), End> {
        if recheck {
            match self.st.store.node_by_id(self.node.id).await {
                Ok(Some(n)) => self.node = n,
                Ok(None) => return Err(End::Removed),
                Err(e) => {
                    tracing::warn!(error = %e, "could not re-read this node");
                    return Err(End::Gone);
                }
            }
        }
        let encoded = serde_json::to_string(&self.node.to_peer())
            .and_then(|me| Ok((me, serde_json::to_string(&self.st.relay_map)?)));
        let (me, relay) = match encoded {
            Ok(x) => x,
            Err(e) => {
                tracing::error!(error = %e, "could not encode the full map");
                return Err(End::Gone);
            }
        };
        let me_id = self.node.id;
        let (line, known) = self.st.hub.with_snapshot(|snap| {
            let mut line = String::with_capacity(
                snap.values().map(|u| u.peer_json.len() + 1).sum::<usize>()
                    + me.len()
                    + relay.len()
                    + 64,
            );
            line.push_str(r#"{"type":"full","self_node":"#);
            line.push_str(&me);
            line.push_str(r#","peers":["#);
            let mut known = HashSet::with_capacity(snap.len());
            for (id, u) in snap.iter().filter(|(id, _)| **id != me_id) {
                if !known.is_empty() {
                    line.push(',');
                }
                line.push_str(&u.peer_json);
                known.insert(*id);
            }
            line.push_str(r#"],"relay_map":"#);
            line.push_str(&relay);
            line.push('}');
            (line, known)
        });
        self.known = known;
        self.send_raw(line).await
    }

    async fn send(&self, msg: &MapMessage) -> Result<(), End> {
        match serde_json::to_string(msg) {
            Ok(line) => self.send_raw(line).await,
            Err(e) => {
                tracing::error!(error = %e, "could not encode a map message");
                Err(End::Gone)
            }
        }
    }

    /// Sends one already-encoded line (the newline is added here).
    async fn send_raw(&self, mut line: String) -> Result<(), End> {
        line.push('\n');
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
