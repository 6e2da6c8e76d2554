//! What this host offers its peers: the candidates a CallMeMaybe carries
//! (host and reflexive UDP addresses, the ports a sequential NAT will hand
//! out next, TCP addresses), and the direct TCP path's streams.
//!
//! For the TCP path, the driver keeps one stream per far-end address and
//! does the framing (`proto::stream`); the node sees each frame's payload
//! with the address it came from ([`Node::handle_tcp`]), exactly as it sees
//! a datagram. A stream the driver accepted belongs to nobody until a disco
//! message sealed by a known peer arrives on it; until then its WireGuard
//! frames are dropped and counted, so a stranger who connects to the
//! listening port can neither inject packets nor move a path.

use std::net::SocketAddr;
use std::time::Instant;

use super::{Datagram, Node, MAX_CONTACTED};
use crate::keys::NodeKey;
use crate::proto::disco::{self, Candidate};
use crate::traversal::hardnat;
use crate::traversal::node::is_wireguard;
use crate::traversal::Path;

impl Node {
    /// Our candidates for a CallMeMaybe to `peer`. When our NAT allocates
    /// sequentially, two lists of predicted ports follow (see `hardnat`):
    /// first the next `predict_ports` ports our new destinations will get
    /// (kept until used up, so repeated CallMeMaybe agree), then the ports
    /// our NAT already gave to the destinations we probed for this peer.
    /// The peer walks them (`hardnat::walk_predicted`) so that both sides'
    /// future ports meet.
    pub(super) fn own_endpoints(&mut self, peer: NodeKey) -> Vec<Candidate> {
        let mut out = self.local_candidates.clone();
        if self.peers.get(&peer).is_some_and(|e| e.paths.wants_tcp()) {
            // First, so the truncation below can never drop them.
            out.splice(0..0, self.tcp_local.iter().copied());
        }
        if let (Some(step), Some(base)) =
            (self.local_nat.sequential_step(), self.local_nat.observed)
        {
            let used = self.contacted.len();
            let stale = self
                .predicted
                .as_ref()
                .is_none_or(|(start, p)| used >= start + p.len());
            if stale && used < MAX_CONTACTED {
                let opened = u32::try_from(used).unwrap_or(u32::MAX);
                let p = hardnat::predict(base, step, opened, self.cfg.predict_ports);
                self.predicted = Some((used, p));
            }
            if let Some((_, p)) = &self.predicted {
                out.extend(p.iter().copied());
            }
            let mut mine: Vec<usize> = self
                .contacted
                .values()
                .filter(|(_, k)| *k == peer)
                .map(|(i, _)| *i)
                .collect();
            mine.sort_unstable();
            for i in mine {
                let opened = u32::try_from(i).unwrap_or(u32::MAX);
                out.extend(hardnat::predict(base, step, opened, 1));
            }
        }
        out.truncate(disco::MAX_CANDIDATES);
        out
    }

    /// This host's TCP candidates (empty when it has no listener) and
    /// whether netcheck found UDP blocked. Hosts whose UDP works publish
    /// their TCP candidates only to peers that published theirs.
    pub fn set_tcp_local(&mut self, now: Instant, candidates: Vec<Candidate>, udp_blocked: bool) {
        let listening = !candidates.is_empty();
        self.tcp_local = candidates;
        self.udp_blocked = udp_blocked;
        let keys: Vec<NodeKey> = self.peers.keys().copied().collect();
        for k in keys {
            if let Some(e) = self.peers.get_mut(&k) {
                e.paths.set_tcp_local(now, listening, udp_blocked);
            }
            self.pump(now, k);
        }
    }

    /// One frame's payload from the stream whose far end is `addr`.
    pub fn handle_tcp(&mut self, now: Instant, addr: SocketAddr, bytes: &[u8]) -> Datagram {
        if disco::looks_like_disco(bytes) {
            self.handle_disco(now, Path::Tcp(addr), None, bytes)
        } else if is_wireguard(bytes) {
            if self.tcp_owner(addr).is_some() {
                Datagram::WireGuard
            } else {
                self.drops.tcp_unproven += 1;
                Datagram::Dropped
            }
        } else {
            self.drops.unknown_datagram += 1;
            Datagram::Dropped
        }
    }

    /// The peer that has proven the stream to `addr` is its own.
    pub fn tcp_owner(&self, addr: SocketAddr) -> Option<NodeKey> {
        self.peers
            .iter()
            .find(|(_, e)| e.paths.tcp_proven(addr))
            .map(|(k, _)| *k)
    }

    /// Our dial for `peer` reached `addr`.
    pub fn tcp_connected(&mut self, now: Instant, peer: NodeKey, addr: SocketAddr) {
        if let Some(e) = self.peers.get_mut(&peer) {
            e.paths.tcp_connected(now, addr);
            self.pump(now, peer);
        }
    }

    /// The stream to `addr` is gone.
    pub fn tcp_closed(&mut self, now: Instant, addr: SocketAddr) {
        let keys: Vec<NodeKey> = self.peers.keys().copied().collect();
        for k in keys {
            if let Some(e) = self.peers.get_mut(&k) {
                e.paths.tcp_closed(now, addr);
            }
            self.pump(now, k);
        }
    }
}
