//! What this host offers its peers: the candidates a CallMeMaybe carries
//! (host and reflexive UDP addresses, the ports a sequential NAT will hand
//! out next, TCP addresses and, behind a sequential NAT, the TCP ports it
//! will hand out next), and the direct TCP path's streams.
//!
//! For the TCP path, the driver keeps one stream per far-end address and
//! does the framing (`proto::stream`); the node sees each frame's payload
//! with the address it came from ([`Node::handle_tcp`]), exactly as it sees
//! a datagram. A stream the driver accepted belongs to nobody until a disco
//! message sealed by a known peer arrives on it; until then its WireGuard
//! frames are dropped and counted, so a stranger who connects to the
//! listening port can neither inject packets nor move a path.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use super::{Datagram, Node, NodeEvent, MAX_CONTACTED};
use crate::keys::NodeKey;
use crate::proto::disco::{self, Candidate};
use crate::traversal::hardnat;
use crate::traversal::node::is_wireguard;
use crate::traversal::Path;

/// Ports below the observed one offered as TCP predictions (see
/// `predicted_tcp`).
const TCP_PREDICT_BEHIND: i32 = 2;
/// A direct TCP stream no peer has proven its own by then is closed.
pub const UNPROVEN_TTL: Duration = Duration::from_secs(10);

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
            let tcp = self.tcp_local.iter().copied().chain(self.predicted_tcp());
            out.splice(0..0, tcp);
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

    /// The public ports our NAT gives our TCP dials, when it allocates
    /// sequentially: the ports around the one STUN over TCP saw, in steps
    /// of the allocation step netcheck measured over UDP.
    ///
    /// A dial to the peer leaves through a new NAT mapping, so behind a
    /// sequential NAT it does not leave from the port STUN saw: it leaves
    /// from one of the next few or, when the dial began just before the
    /// STUN query (a dial round reuses its first mapping), from one just
    /// below. A peer that dials only the observed port hits the STUN
    /// server's mapping and is dropped; dialling all of these from its one
    /// port, its SYN meets ours on whichever our NAT picked (its own NAT
    /// must keep its port: EIM or public).
    ///
    /// This assumes TCP gets the same allocator as UDP, as on Linux-based
    /// NATs and most home routers. Where it does not, the extra SYNs are
    /// dropped at our NAT and cost the peer a few packets a round. The base
    /// moves with every netcheck (each queries STUN over TCP again), which
    /// absorbs the mappings our own control and relay connections take.
    fn predicted_tcp(&self) -> Vec<Candidate> {
        let Some(step) = self.local_nat.sequential_step() else {
            return Vec::new();
        };
        let Some(public) = self
            .tcp_local
            .iter()
            .find(|c| c.kind == disco::CandidateKind::ServerReflexive)
        else {
            return Vec::new();
        };
        let (base, step) = (i32::from(public.addr.port()), i32::from(step));
        let ahead = 1..=i32::from(self.cfg.predict_ports);
        let behind = (1..=TCP_PREDICT_BEHIND).map(|i| -i);
        ahead
            .chain(behind)
            .filter_map(|i| u16::try_from(base + step * i).ok())
            .filter(|&port| port != 0)
            .map(|port| Candidate {
                addr: SocketAddr::new(public.addr.ip(), port),
                kind: disco::CandidateKind::Predicted,
                transport: disco::Transport::Tcp,
            })
            .collect()
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
        self.clock = Some(now);
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

    /// A stream from `addr` was accepted on the listening port. Like a
    /// dialled one, it is closed ([`NodeEvent::TcpClose`]) unless a peer's
    /// disco proves it its own within [`UNPROVEN_TTL`]: a stranger's
    /// connection, or a dial that reached the wrong host, holds no place.
    pub fn tcp_accepted(&mut self, now: Instant, addr: SocketAddr) {
        self.clock = Some(now);
        self.unproven.insert(addr, now + UNPROVEN_TTL);
    }

    /// Our dial for `peer` reached `addr`.
    pub fn tcp_connected(&mut self, now: Instant, peer: NodeKey, addr: SocketAddr) {
        self.unproven.insert(addr, now + UNPROVEN_TTL);
        if let Some(e) = self.peers.get_mut(&peer) {
            e.paths.tcp_connected(now, addr);
            self.pump(now, peer);
        }
    }

    /// The stream to `addr` is gone.
    pub fn tcp_closed(&mut self, now: Instant, addr: SocketAddr) {
        self.unproven.remove(&addr);
        let keys: Vec<NodeKey> = self.peers.keys().copied().collect();
        for k in keys {
            if let Some(e) = self.peers.get_mut(&k) {
                e.paths.tcp_closed(now, addr);
            }
            self.pump(now, k);
        }
    }

    /// Closes the streams no peer proved in time (see `tcp_accepted`).
    pub(super) fn reap_unproven(&mut self, now: Instant) {
        let due: Vec<SocketAddr> = self
            .unproven
            .iter()
            .filter(|(_, t)| **t <= now)
            .map(|(a, _)| *a)
            .collect();
        for addr in due {
            self.unproven.remove(&addr);
            if self.tcp_owner(addr).is_none() {
                self.events.push_back(NodeEvent::TcpClose { addr });
                self.tcp_closed(now, addr);
            }
        }
    }

    /// When the next unproven stream is due.
    pub(super) fn unproven_deadline(&self) -> Option<Instant> {
        self.unproven.values().min().copied()
    }

    /// Whether `ip` is one of this host's own addresses (a host candidate,
    /// UDP or TCP).
    pub(super) fn is_own_ip(&self, ip: std::net::IpAddr) -> bool {
        self.local_candidates
            .iter()
            .chain(&self.tcp_local)
            .any(|c| c.kind == disco::CandidateKind::Host && c.addr.ip() == ip)
    }
}
