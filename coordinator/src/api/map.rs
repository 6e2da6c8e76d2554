//! `GET /map`: the long-lived map stream.
//!
//! The handler authenticates, marks the node online, subscribes to the hub
//! *before* reading the full map (so no change can fall between the two),
//! and hands the response body to a task that turns hub events into lines.
//! What to write and when is the stream's [`Outbox`]'s call (one pending
//! entry per peer, a write per tick at most, a full map for a stream far
//! behind); this task only moves events in and lines out. While the agent
//! reads slowly its events wait in the hub's broadcast, shared by all
//! streams, and are taken in one go when there is room again; a full map
//! is written as slices of the hub's shared encoding (`hub::encoded`), so
//! a slow agent costs a place in the broadcast, not a copy. When the
//! node itself is removed the task just returns: the body ends, and the
//! node's next request is refused.
//!
//! A stream that asks for `zstd=1` is written as zstd frames
//! (`warren::control::zmap`): every write is wrapped in stored frames
//! here, except a shared full map, which is the hub's compressed blocks
//! (`EncodedPeers::frames_without`).

use std::convert::Infallible;
use std::time::Instant;

use axum::body::{Body, Bytes};
use axum::extract::{RawQuery, State};
use axum::http::header;
use axum::response::Response;
use axum::Extension;
use futures_util::StreamExt as _;
use tokio::sync::broadcast::error::{RecvError, TryRecvError};
use tokio::sync::{broadcast, mpsc};
use tokio::time::Instant as TokioInstant;
use tracing::Instrument as _;

use super::signed::{NoBody, Signed};
use super::streams::Ticket;
use super::{ApiError, AppState};
use crate::hub::outbox::{full_frame, full_line_with, Flush, Outbox, PresenceLines};
use crate::hub::HubEvent;
use crate::listen::PeerAddr;
use crate::store::NodeRecord;

/// One write: a run of lines, or a full map as the shared slices it is
/// made of (`hub::encoded`), sent on without being joined.
type Write = Vec<Bytes>;

pub(super) async fn map(
    State(st): State<AppState>,
    peer: Option<Extension<PeerAddr>>,
    RawQuery(query): RawQuery,
    signed: Signed<NoBody>,
) -> Result<Response, ApiError> {
    // `v=2` (warren::control::MAP_PATH): the agent takes `peer_online`
    // lines; `presence=1`: a `presence` line for all of them. Anything else in the query is ignored, as an older
    // coordinator ignores this.
    let asked = |what: &str| {
        query
            .as_deref()
            .is_some_and(|q| q.split('&').any(|kv| kv == what))
    };
    let presence = if asked("presence=1") {
        PresenceLines::Batched
    } else if asked("v=2") {
        PresenceLines::PerPeer
    } else {
        PresenceLines::Whole
    };
    // Compressed only where the operator turned it on (`serve
    // --compress-maps`): an agent that asks otherwise gets plain lines
    // without the header, as from an older coordinator.
    let zstd = asked("zstd=1") && st.compress_maps;
    // The address's cap first: it needs no database.
    let mut ticket = st.streams.admit(peer.map(|Extension(p)| p.0.ip()))?;
    let node = signed.open_stream(&st).await?;
    ticket.bind(node.id);
    *st.live().entry(node.id).or_default() += 1;

    let events = st.hub.subscribe();
    // Few slots: a stream whose agent reads slowly leaves its events in
    // the hub's broadcast rather than queue writes here.
    let (lines, rx) = mpsc::channel::<Write>(2);
    let mut stream = MapTask {
        st: st.clone(),
        outbox: {
            let mut o = Outbox::new(node.id, Instant::now());
            o.set_access(st.hub.access());
            o.set_presence_lines(presence);
            o
        },
        node,
        lines,
        ticket,
        zstd,
    };
    // The first full map is sent from the task too, so that a failure to
    // build it is handled like any later one.
    let span = tracing::info_span!("map", node = %stream.node.key.short());
    tokio::spawn(async move { stream.run(events).await }.instrument(span));
    let body = Body::from_stream(
        tokio_stream::wrappers::ReceiverStream::new(rx).flat_map(|parts| {
            futures_util::stream::iter(parts.into_iter().map(Ok::<_, Infallible>))
        }),
    );
    let mut resp = Response::builder()
        .header(header::CONTENT_TYPE, "application/x-ndjson")
        .header(header::CACHE_CONTROL, "no-store");
    if zstd {
        resp = resp.header(header::CONTENT_ENCODING, "zstd");
    }
    resp.body(body)
        .map_err(|e| ApiError::new(warren::control::ErrorCode::Internal, e.to_string()))
}

/// Most events taken from the broadcast in one go (it holds 65,536).
const DRAIN_MAX: usize = 1 << 17;

struct MapTask {
    st: AppState,
    node: NodeRecord,
    outbox: Outbox,
    lines: mpsc::Sender<Write>,
    /// This stream's place among its node's (`streams.rs`).
    ticket: Ticket,
    /// Written as zstd frames (`zstd=1`).
    zstd: bool,
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
        self.close(end);
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

    /// Writes what is due: waits for room in the body, then takes
    /// everything queued and writes it at once. While it waits, events
    /// stay in the hub's broadcast, shared by every stream, rather than in
    /// this stream's outbox (`hub.rs`, `EVENTS_KEPT`): a slow agent costs
    /// its place in the broadcast, and a full map if it falls out of it.
    async fn write(&mut self, events: &mut broadcast::Receiver<HubEvent>) -> Result<(), End> {
        let lines = self.lines.clone();
        let permit = tokio::select! {
            p = lines.reserve() => p.map_err(|_| End::Gone)?,
            // A stream whose agent never reads waits here: being replaced
            // must end it here too. Its node's removal is taken with the
            // events below, before anything more is written.
            _ = &mut self.ticket.ended => return Err(End::Gone),
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
        let write = match self.outbox.poll_flush(Instant::now(), map_len) {
            Flush::Wait => return Ok(()),
            Flush::Removed => return Err(End::Removed),
            Flush::Lines { text, me } => {
                if let Some(me) = me {
                    self.node = me.node.clone();
                }
                self.framed(text.into_parts())
            }
            Flush::Full { recheck, me } => {
                if let Some(me) = me {
                    self.node = me.node.clone();
                }
                if recheck {
                    tracing::debug!("resynchronising");
                }
                self.full(recheck).await?
            }
        };
        permit.send(write);
        Ok(())
    }

    /// `parts` as this stream writes them: as they are, or in stored
    /// zstd frames.
    fn framed(&self, parts: Write) -> Write {
        if self.zstd {
            warren::control::zmap::raw_frames(parts)
        } else {
            parts
        }
    }

    /// A keepalive, unless the body is full (then it is not idle anyway).
    fn keepalive(&self) -> Result<(), End> {
        let line = vec![Bytes::from_static(b"{\"type\":\"keepalive\"}\n")];
        match self.lines.try_send(self.framed(line)) {
            Err(mpsc::error::TrySendError::Closed(_)) => Err(End::Gone),
            _ => Ok(()),
        }
    }

    /// A full map built from the hub's snapshot, newline included. After
    /// a resynchronisation (`recheck`) the node's own row is read again:
    /// it may have been removed while notes were being lost.
    ///
    /// A node that may see every peer gets the hub's shared encoding minus
    /// its own entry (`hub::encoded`): no copy of the map per stream.
    async fn full(&mut self, recheck: bool) -> Result<Write, End> {
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
        if parts.0.is_none() {
            let (shared, since) = self.st.hub.encoded_peers();
            let (head, mut tail) = full_frame(&me, &relay, parts.1);
            crate::hub::outbox::add_dns(&mut tail, &self.st.dns_json);
            tail.push('\n');
            let (peers, known) = if self.zstd {
                shared.frames_without(self.node.id)
            } else {
                shared.without(self.node.id)
            };
            let mut write = self.framed(vec![Bytes::from(head)]);
            write.extend(peers);
            write.extend(self.framed(vec![Bytes::from(tail)]));
            self.outbox.full_sent(known, shared.version);
            self.outbox.catch_up(&since);
            return Ok(write);
        }
        let (mut line, known, version) = self.st.hub.with_snapshot_at(|snap, version| {
            let (line, known) = full_line_with(snap, self.node.id, &me, &relay, parts);
            (line, known, version)
        });
        crate::hub::outbox::add_dns(&mut line, &self.st.dns_json);
        line.push('\n');
        self.outbox.full_sent(known, version);
        Ok(self.framed(vec![Bytes::from(line)]))
    }

    fn close(&self, end: End) {
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
        self.st.presence.close(self.node.clone());
    }
}
