//! `GET /map`: the long-lived map stream.
//!
//! The handler authenticates, marks the node online, subscribes to the hub
//! *before* reading the full map (so no change can fall between the two),
//! and hands the response body to a task that turns hub events into lines.
//! What to write and when is the stream's [`Outbox`]'s call (one pending
//! entry per peer, a write per tick at most, a full map for a stream far
//! behind); this task only moves events in and lines out. While the agent
//! reads slowly the task keeps taking events into the outbox, so a slow
//! agent costs one entry per peer, never a queue of every event. When the
//! node itself is removed the task just returns: the body ends, and the
//! node's next request is refused.

use std::convert::Infallible;
use std::time::Instant;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::header;
use axum::response::Response;
use axum::Extension;
use tokio::sync::broadcast::error::{RecvError, TryRecvError};
use tokio::sync::{broadcast, mpsc};
use tokio::time::Instant as TokioInstant;
use tracing::Instrument as _;

use super::signed::{NoBody, Signed};
use super::streams::Ticket;
use super::{ApiError, AppState};
use crate::hub::outbox::{full_line_with, Flush, Outbox};
use crate::hub::HubEvent;
use crate::listen::PeerAddr;
use crate::store::NodeRecord;

type Line = Result<Bytes, Infallible>;

pub(super) async fn map(
    State(st): State<AppState>,
    peer: Option<Extension<PeerAddr>>,
    signed: Signed<NoBody>,
) -> Result<Response, ApiError> {
    // The address's cap first: it needs no database.
    let mut ticket = st.streams.admit(peer.map(|Extension(p)| p.0.ip()))?;
    let (mut tx, node) = signed.begin_as_node(&st).await?;
    ticket.bind(node.id);
    st.store.stream_delta(&mut tx, &node, 1).await?;
    tx.commit().await?;
    st.hub.wake();
    *st.live().entry(node.id).or_default() += 1;

    let events = st.hub.subscribe();
    // Few slots: a write can be a whole map, and a stream whose agent reads
    // slowly should coalesce in its outbox rather than queue writes here.
    let (lines, rx) = mpsc::channel::<Line>(8);
    let mut stream = MapTask {
        st: st.clone(),
        outbox: {
            let mut o = Outbox::new(node.id, Instant::now());
            o.set_access(st.hub.access());
            o
        },
        node,
        lines,
        ticket,
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

/// Most events taken from the broadcast in one go (it holds 8192).
const DRAIN_MAX: usize = 16384;

struct MapTask {
    st: AppState,
    node: NodeRecord,
    outbox: Outbox,
    lines: mpsc::Sender<Line>,
    /// This stream's place among its node's (`streams.rs`).
    ticket: Ticket,
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
        let mut keepalive = tokio::time::interval(self.st.keepalive);
        keepalive.tick().await;
        loop {
            let result = match self.outbox.poll_timeout() {
                Some(due) if due <= Instant::now() => self.write(events).await,
                // Events are left in the broadcast while a write is due
                // later: they are taken in one go when it is, instead of
                // waking this task for each.
                due => tokio::select! {
                    ev = events.recv(), if due.is_none() => self.take(ev),
                    _ = tokio::time::sleep_until(TokioInstant::from_std(
                        due.unwrap_or_else(Instant::now),
                    )), if due.is_some() => Ok(()),
                    _ = keepalive.tick() => self.keepalive(),
                    _ = self.lines.closed() => Err(End::Gone),
                    _ = &mut self.ticket.ended => {
                        tracing::info!("a newer map stream of this node replaces this one");
                        Err(End::Gone)
                    }
                },
            };
            if let Err(end) = result {
                return end;
            }
        }
    }

    /// Takes one event from the broadcast into the outbox.
    fn take(&mut self, ev: Result<HubEvent, RecvError>) -> Result<(), End> {
        match ev {
            Ok(ev) => self.outbox.push(ev, Instant::now()),
            Err(RecvError::Lagged(_)) => self.outbox.lagged(Instant::now()),
            Err(RecvError::Closed) => return Err(End::Gone),
        }
        if self.outbox.is_removed() {
            tracing::info!("node removed: ending its map stream");
            return Err(End::Removed);
        }
        Ok(())
    }

    /// Writes what is due: waits for room in the body (taking events
    /// meanwhile), then takes everything queued and writes it at once.
    async fn write(&mut self, events: &mut broadcast::Receiver<HubEvent>) -> Result<(), End> {
        let lines = self.lines.clone();
        let permit = loop {
            tokio::select! {
                p = lines.reserve() => break p.map_err(|_| End::Gone)?,
                ev = events.recv() => self.take(ev)?,
                // A stream whose agent never reads waits here: being
                // replaced must end it here too.
                _ = &mut self.ticket.ended => return Err(End::Gone),
            }
        };
        for _ in 0..DRAIN_MAX {
            match events.try_recv() {
                Ok(ev) => self.take(Ok(ev))?,
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Lagged(n)) => self.take(Err(RecvError::Lagged(n)))?,
                Err(TryRecvError::Closed) => return Err(End::Gone),
            }
        }
        if self.outbox.needs_recheck() {
            let outbox = &mut self.outbox;
            self.st.hub.with_snapshot(|snap| outbox.recheck(snap));
        }
        let map_len = self.st.hub.node_count();
        let text = match self.outbox.poll_flush(Instant::now(), map_len) {
            Flush::Wait => return Ok(()),
            Flush::Removed => return Err(End::Removed),
            Flush::Lines { text, me } => {
                if let Some(me) = me {
                    self.node = me.node.clone();
                }
                text
            }
            Flush::Full { recheck, me } => {
                if let Some(me) = me {
                    self.node = me.node.clone();
                }
                if recheck {
                    tracing::debug!("resynchronising");
                }
                let mut line = self.full(recheck).await?;
                line.push('\n');
                line
            }
        };
        permit.send(Ok(Bytes::from(text)));
        Ok(())
    }

    /// A keepalive, unless the body is full (then it is not idle anyway).
    fn keepalive(&self) -> Result<(), End> {
        match self
            .lines
            .try_send(Ok(Bytes::from_static(b"{\"type\":\"keepalive\"}\n")))
        {
            Err(mpsc::error::TrySendError::Closed(_)) => Err(End::Gone),
            _ => Ok(()),
        }
    }

    /// A full map built from the hub's snapshot. After a resynchronisation
    /// (`recheck`) the node's own row is read again: it may have been
    /// removed while notes were being lost.
    async fn full(&mut self, recheck: bool) -> Result<String, End> {
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
        let parts = self.outbox.full_parts();
        let (mut line, known) = self
            .st
            .hub
            .with_snapshot(|snap| full_line_with(snap, self.node.id, &me, &relay, parts));
        crate::hub::outbox::add_dns(&mut line, &self.st.dns_json);
        self.outbox.full_sent(known);
        Ok(line)
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
