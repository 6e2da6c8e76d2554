//! The node's side of the direct TCP path: this host's TCP candidates, and
//! the bytes and lifecycle of the streams the driver holds.
//!
//! The driver keeps one stream per far-end address and does the framing
//! (`proto::stream`); the node sees each frame's payload with the address
//! it came from ([`Node::handle_tcp`]), exactly as it sees a datagram. A
//! stream the driver accepted belongs to nobody until a disco message
//! sealed by a known peer arrives on it; until then its WireGuard frames
//! are dropped and counted, so a stranger who connects to the listening
//! port can neither inject packets nor move a path.

use std::net::SocketAddr;
use std::time::Instant;

use super::{Datagram, Node};
use crate::keys::NodeKey;
use crate::proto::disco::{self, Candidate};
use crate::traversal::node::is_wireguard;
use crate::traversal::Path;

impl Node {
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
