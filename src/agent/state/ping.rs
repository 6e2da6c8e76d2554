//! `warren ping` rounds in the agent state: one disco ping round per API
//! request.
//!
//! A request starts a round in the traversal core ([`Node::ping`]) and waits
//! here, under an id the driver keeps beside the caller's reply channel,
//! for the core's `PingReply` events. The round is answered
//! (`Output::PingDone`) when it has said what it can: at the first direct
//! pong (nothing faster will come), a short grace after the first relayed
//! pong (a direct pong may be just behind it), or at the request's timeout.
//! The CLI repeats requests for `--count`; the daemon keeps no state
//! between rounds, so a CLI that dies leaves nothing behind.
//!
//! [`Node::ping`]: crate::traversal::node::Node::ping

use std::time::{Duration, Instant};

use crate::api::mesh::{PingRound, Pong};
use crate::api::PeerPath;
use crate::keys::NodeKey;
use crate::path::Path;

/// How long a round keeps waiting after its first relayed pong, for a
/// direct pong that may be just behind it.
const GRACE: Duration = Duration::from_millis(100);
/// Rounds waiting at once; more are refused rather than queued.
pub const MAX_WAITERS: usize = 64;

/// Why a ping request was refused at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PingRefused {
    #[error("too many pings in flight; try again")]
    Busy,
    #[error("the peer is not (or no longer) in the network map")]
    UnknownPeer,
}

/// One ping request waiting for its round.
#[derive(Debug)]
struct Waiter {
    id: u64,
    peer: NodeKey,
    round: u64,
    deadline: Instant,
    pongs: Vec<Pong>,
    direct: bool,
    first: Option<Instant>,
}

impl Waiter {
    fn done_at(&self) -> Instant {
        match self.first {
            Some(t) => (t + GRACE).min(self.deadline),
            None => self.deadline,
        }
    }
}

/// The rounds waiting for pongs.
#[derive(Debug, Default)]
pub struct Pings {
    waiting: Vec<Waiter>,
    next_id: u64,
}

impl Pings {
    pub fn is_full(&self) -> bool {
        self.waiting.len() >= MAX_WAITERS
    }

    /// Parks a started round; returns the request's id.
    pub fn wait(&mut self, peer: NodeKey, round: u64, deadline: Instant) -> u64 {
        self.next_id += 1;
        self.waiting.push(Waiter {
            id: self.next_id,
            peer,
            round,
            deadline,
            pongs: Vec::new(),
            direct: false,
            first: None,
        });
        self.next_id
    }

    /// A pong for round `round` of `peer` came back over `path` (`region`:
    /// the relay region's name when it came relayed).
    pub fn reply(
        &mut self,
        now: Instant,
        (peer, round): (NodeKey, u64),
        path: Path,
        region: Option<String>,
        rtt: Duration,
    ) {
        let Some(w) = self
            .waiting
            .iter_mut()
            .find(|w| w.peer == peer && w.round == round)
        else {
            // The request already went back; a late pong is just late.
            return;
        };
        w.direct |= path != Path::Relay;
        w.first.get_or_insert(now);
        w.pongs.push(Pong {
            path: PeerPath::from_path(Some(path), region),
            latency_ms: rtt.as_secs_f64() * 1e3,
        });
    }

    /// The next round complete at `now`, with its request's id.
    pub fn poll_done(&mut self, now: Instant) -> Option<(u64, PingRound)> {
        let i = self
            .waiting
            .iter()
            .position(|w| w.direct || now >= w.done_at())?;
        let w = self.waiting.swap_remove(i);
        let round = PingRound {
            pongs: w.pongs,
            direct: w.direct,
        };
        Some((w.id, round))
    }

    /// Any waiting round, answered with what it has now (the node left
    /// the mesh: no pong will come).
    pub fn take_any(&mut self) -> Option<(u64, PingRound)> {
        let w = self.waiting.pop()?;
        let round = PingRound {
            pongs: w.pongs,
            direct: w.direct,
        };
        Some((w.id, round))
    }

    /// When the next waiting round must be answered.
    pub fn deadline(&self) -> Option<Instant> {
        self.waiting.iter().map(Waiter::done_at).min()
    }
}
