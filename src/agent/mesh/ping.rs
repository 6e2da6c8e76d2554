//! `warren ping` on the mesh task: one disco ping round per API request.
//!
//! The request starts a round in the traversal core ([`Node::ping`]) and
//! waits here, as a [`Waiter`], for the core's `PingReply` events. The
//! answer goes back when the round has said what it can: at the first
//! direct pong (nothing faster will come), a short grace after the first
//! relayed pong (a direct pong may be just behind it), or at the request's
//! timeout. The CLI repeats requests for `--count`; the daemon keeps no
//! state between rounds, so a CLI that dies leaves nothing behind.

use std::time::{Duration, Instant};

use super::handle::{MeshReply, Reply};
use super::Mesh;
use crate::api::mesh::{PingRound, Pong};
use crate::api::{ApiError, ErrorCode, PeerPath};
use crate::keys::NodeKey;
use crate::traversal::Path;

/// How long a round keeps waiting after its first relayed pong, for a
/// direct pong that may be just behind it.
const GRACE: Duration = Duration::from_millis(100);
/// Rounds waiting at once; more are refused rather than queued.
const MAX_WAITERS: usize = 64;

/// One ping request waiting for its round.
pub(super) struct Waiter {
    peer: NodeKey,
    round: u64,
    deadline: Instant,
    pongs: Vec<Pong>,
    direct: bool,
    first: Option<Instant>,
    reply: Reply,
}

impl Waiter {
    fn done_at(&self) -> Instant {
        match self.first {
            Some(t) => (t + GRACE).min(self.deadline),
            None => self.deadline,
        }
    }
}

impl Mesh {
    /// Starts a round to `peer` and parks the request until it is answered.
    pub(super) fn start_ping(&mut self, peer: NodeKey, timeout: Duration, reply: Reply) {
        if self.ping_waiters.len() >= MAX_WAITERS {
            let _ = reply.send(Err(ApiError::new(
                ErrorCode::Internal,
                "too many pings in flight; try again",
            )));
            return;
        }
        let now = Instant::now();
        let Some(round) = self.node.ping(now, &peer) else {
            let _ = reply.send(Err(ApiError::new(
                ErrorCode::UnknownPeer,
                "the peer is not (or no longer) in the network map",
            )));
            return;
        };
        self.ping_waiters.push(Waiter {
            peer,
            round,
            deadline: now + timeout,
            pongs: Vec::new(),
            direct: false,
            first: None,
            reply,
        });
    }

    /// A pong for round `round` of `peer` came back over `path`.
    pub(super) fn on_ping_reply(&mut self, peer: NodeKey, round: u64, path: Path, rtt: Duration) {
        let region = self
            .relays
            .peer_region(&peer)
            .and_then(|r| self.relays.region_name(r));
        let Some(w) = self
            .ping_waiters
            .iter_mut()
            .find(|w| w.peer == peer && w.round == round)
        else {
            // The request already went back; a late pong is just late.
            return;
        };
        w.direct |= path != Path::Relay;
        let path = PeerPath::from_path(Some(path), region);
        w.first.get_or_insert_with(Instant::now);
        w.pongs.push(Pong {
            path,
            latency_ms: rtt.as_secs_f64() * 1e3,
        });
    }

    /// Answers every round that is complete at `now`.
    pub(super) fn finish_pings(&mut self, now: Instant) {
        let (done, waiting): (Vec<Waiter>, Vec<Waiter>) = std::mem::take(&mut self.ping_waiters)
            .into_iter()
            .partition(|w| w.direct || now >= w.done_at());
        self.ping_waiters = waiting;
        for w in done {
            let round = PingRound {
                pongs: w.pongs,
                direct: w.direct,
            };
            let _ = w.reply.send(Ok(MeshReply::Ping(round)));
        }
    }

    /// When the next waiting round must be answered.
    pub(super) fn ping_deadline(&self) -> Option<Instant> {
        self.ping_waiters.iter().map(Waiter::done_at).min()
    }
}
