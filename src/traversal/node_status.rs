//! What `warren status` shows of one peer, read from the node: path,
//! latency, why it is relayed (led by the pair's hard-NAT situation) and the
//! direct paths tried. Times are rendered by a function the caller passes,
//! since the core has instants and no wall clock: tests and the simulator
//! show "3.2s ago", the agent shows the time of day.

use std::time::{Duration, Instant};

use super::{hardnat, Node, NodeKey, PeerStats, Tried};
use crate::traversal::Path;

/// One peer's state as `warren status` shows it.
#[derive(Debug, Clone)]
pub struct PeerStatus {
    pub path: Path,
    pub rtt: Option<Duration>,
    pub relay_reason: Option<String>,
    pub stats: PeerStats,
    /// The direct paths pinged so far and their answers.
    pub tried: Vec<Tried>,
}

impl Node {
    /// The peer's status, with times relative to `now`.
    pub fn status(&self, peer: &NodeKey, now: Instant) -> Option<PeerStatus> {
        self.status_with(peer, &|t| {
            format!("{:.1}s ago", now.saturating_duration_since(t).as_secs_f32())
        })
    }

    /// The peer's status, with times rendered by `when` (the driver gives
    /// wall-clock time). The relay reason leads with the pair's hard-NAT
    /// situation when there is one: "both sides EDM random; …".
    pub fn status_with(
        &self,
        peer: &NodeKey,
        when: &dyn Fn(Instant) -> String,
    ) -> Option<PeerStatus> {
        let e = self.peers.get(peer)?;
        let p = &e.paths;
        let nat = hardnat::describe_pair(&self.local_nat, &e.remote_nat);
        let reason = p.relay_reason().map(|r| {
            let text = r.describe_with(when);
            match &nat {
                None => text,
                Some(n) => format!("{n}; {text}"),
            }
        });
        Some(PeerStatus {
            path: p.current_path(),
            rtt: p.rtt(),
            relay_reason: reason,
            stats: p.stats(),
            tried: p.tried(),
        })
    }
}
