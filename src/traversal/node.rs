//! The node-level traversal core ("magicsock" without the sockets).
//!
//! One [`Node`] per agent. It owns the disco key, one [`PeerPaths`] per peer,
//! and everything that spans peers: the demultiplexing of the shared UDP
//! socket, the sealing counter, the replay windows, the count of NAT
//! mappings this host has opened (for port prediction) and the extra
//! sockets of the birthday method.
//!
//! The agent state (`agent::state`) owns it and feeds it what the mesh
//! task (`agent::mesh`) hands the state:
//!
//! 1. what the UDP readers set aside (every datagram that is not
//!    WireGuard, with its socket `s` and source `src`) →
//!    [`Node::handle_udp`]; it says whether the bytes were disco
//!    (consumed) or STUN (hand to netcheck). Disco from the relay →
//!    [`Node::handle_relay`], direct TCP frames the stream's reader did not
//!    open itself (disco, WireGuard before the stream is proven) →
//!    [`Node::handle_tcp`]; for those, [`Datagram::WireGuard`] means the
//!    driver opens the packet. (The relay pumps and a proven stream's
//!    reader open WireGuard without the node: `agent::streamed`.)
//! 2. loop [`Node::poll_transmit`] and send each [`NodeTransmit`] on the
//!    socket, relay or stream its [`Dest`] names.
//! 3. loop [`Node::poll_event`]: path changes, which the driver applies to
//!    the data plane's peer; requests to open or close the extra sockets
//!    and to dial or close TCP streams; `warren ping` replies.
//! 4. sleep until [`Node::poll_timeout`], then [`Node::handle_timeout`].
//!
//! The data plane does not ask the node per packet: each peer's path is
//! kept in the data plane's own peer, and the driver changes it only on
//! [`NodeEvent::PathChanged`] ([`Node::path`] is read when a peer is added,
//! and per packet only by the simulator in `tests/sim`). The driver calls
//! [`Node::note_traffic`] when the data plane's activity counters move
//! (once a second, or at once when a quiet peer's first packet wakes it).
//! Disco packets from senders that are not in the map are dropped before
//! any X25519 work, so strangers cannot make us do crypto; every drop is
//! counted in [`DropStats`], never logged per packet.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crypto_box::SalsaBox;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::budget::IpBudget;
use super::hardnat;
use super::peer::{PeerPaths, PeerStats};
use super::{
    ChangeReason, Config, DirectPath, Event, NatSummary, Path, RelayReason, SocketId, TimerReason,
    Tried,
};
use crate::keys::NodeKey;
use crate::proto::disco::{self, Candidate, DiscoError, DiscoKey, DiscoSecret, ReplayWindow};
use crate::proto::stun::is_stun;

/// Most destinations remembered for port prediction; past this, prediction
/// is off until the next netcheck (the count would be a guess anyway).
const MAX_CONTACTED: usize = 4096;

/// WireGuard messages start with a type of 1–4 and three reserved zero
/// bytes. The zeros matter: a STUN Binding response starts `0x01 0x01`.
pub fn is_wireguard(b: &[u8]) -> bool {
    matches!(b, [1..=4, 0, 0, 0, ..])
}

/// A peer as the coordinator's map describes it.
#[derive(Debug, Clone)]
pub struct PeerInfo {
    pub node_key: NodeKey,
    pub disco_key: DiscoKey,
    pub candidates: Vec<Candidate>,
    pub nat: NatSummary,
}

/// Where a datagram goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dest {
    Udp {
        socket: SocketId,
        addr: SocketAddr,
    },
    Relay(NodeKey),
    /// The direct TCP stream whose far end is `addr` (framed by the driver).
    Tcp(SocketAddr),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeTransmit {
    pub dest: Dest,
    pub bytes: Vec<u8>,
}

/// What an incoming datagram was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Datagram {
    /// A disco message, consumed.
    Disco,
    /// WireGuard: the data plane's.
    WireGuard,
    /// STUN: netcheck's.
    Stun,
    /// Dropped and counted.
    Dropped,
}

/// Node-level outputs.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum NodeEvent {
    PathChanged {
        peer: NodeKey,
        from: Path,
        to: Path,
        reason: ChangeReason,
    },
    /// Open extra UDP sockets with ids `1..=count` (any free local port),
    /// then call [`Node::sockets_opened`].
    OpenSockets { count: u16 },
    /// Close every extra socket except `keep` (in use by a direct path).
    CloseSockets { keep: Vec<SocketId> },
    /// A pong answered on-demand ping round `round` (see [`Node::ping`]).
    PingReply {
        peer: NodeKey,
        round: u64,
        path: Path,
        rtt: Duration,
    },
    /// Dial `targets` from the TCP listening port until a stream is up or
    /// `until`; report it with [`Node::tcp_connected`].
    TcpConnect {
        peer: NodeKey,
        targets: Vec<SocketAddr>,
        until: Instant,
    },
    /// Close the stream to `addr`.
    TcpClose { addr: SocketAddr },
}

/// Counters of refused input.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DropStats {
    pub unknown_datagram: u64,
    pub malformed: u64,
    pub unknown_sender: u64,
    pub replayed: u64,
    pub unsealable: u64,
    /// Relay frame whose disco sender is not the node the relay vouches for.
    pub relay_mismatch: u64,
    /// Opened fine but refused by the peer machine (stray pong, wrong key).
    pub rejected: u64,
    /// WireGuard on a TCP stream no disco message has proven yet.
    pub tcp_unproven: u64,
    /// Disco not sent: its destination IP had used its second's budget
    /// (`budget.rs`).
    pub capped: u64,
}

struct PeerEntry {
    disco: DiscoKey,
    /// The disco box with this peer, made at its first disco message: an
    /// X25519 each, which for a map of 10,000 mostly idle peers was most
    /// of applying it (`examples/agent_map_bench.rs`).
    sbox: Option<SalsaBox>,
    replay: ReplayWindow,
    remote_nat: NatSummary,
    paths: PeerPaths,
}

impl PeerEntry {
    fn sbox(&mut self, secret: &DiscoSecret) -> &SalsaBox {
        self.sbox.get_or_insert_with(|| secret.box_for(&self.disco))
    }
}

/// See the module doc.
pub struct Node {
    cfg: Config,
    local_key: NodeKey,
    secret: DiscoSecret,
    public: DiscoKey,
    peers: BTreeMap<NodeKey, PeerEntry>,
    by_disco: HashMap<DiscoKey, NodeKey>,
    counter: u64,
    rng: StdRng,
    local_candidates: Vec<Candidate>,
    local_nat: NatSummary,
    /// New destinations of the primary socket since the last STUN
    /// observation, with their order and the peer they were for: on a
    /// sequential NAT, the i-th one got port `observed + step * (i + 1)`.
    contacted: HashMap<SocketAddr, (usize, NodeKey)>,
    predicted: Option<(usize, Vec<Candidate>)>,
    sockets_open: u16,
    sockets_requested: bool,
    sockets_wanted_by: BTreeSet<NodeKey>,
    sockets_kept: BTreeSet<SocketId>,
    /// Our TCP candidates (empty: no listener) and whether our UDP works.
    tcp_local: Vec<Candidate>,
    udp_blocked: bool,
    /// Direct TCP streams no peer has proven yet, and when each is closed
    /// unless one does (`node_local.rs`).
    unproven: HashMap<SocketAddr, Instant>,
    events: VecDeque<NodeEvent>,
    drops: DropStats,
    /// Reused by `handle_timeout` for the peer keys it walks.
    scratch_keys: Vec<NodeKey>,
    /// The latest `now` passed in: `poll_transmit` takes none, and the
    /// per-IP budget needs a clock.
    clock: Option<Instant>,
    budget: IpBudget,
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node")
            .field("key", &self.local_key)
            .field("peers", &self.peers.len())
            .finish_non_exhaustive()
    }
}

impl Node {
    /// `seed` drives every random choice (nonce tails, tx ids, birthday
    /// ports); the agent passes OS randomness, the simulator a fixed seed.
    pub fn new(cfg: Config, local_key: NodeKey, secret: DiscoSecret, seed: u64) -> Self {
        let public = secret.public();
        Node {
            cfg,
            local_key,
            secret,
            public,
            peers: BTreeMap::new(),
            by_disco: HashMap::new(),
            counter: 0,
            rng: StdRng::seed_from_u64(seed),
            local_candidates: Vec::new(),
            local_nat: NatSummary::default(),
            contacted: HashMap::new(),
            predicted: None,
            sockets_open: 0,
            sockets_requested: false,
            sockets_wanted_by: BTreeSet::new(),
            sockets_kept: BTreeSet::new(),
            tcp_local: Vec::new(),
            unproven: HashMap::new(),
            udp_blocked: false,
            events: VecDeque::new(),
            scratch_keys: Vec::new(),
            clock: None,
            budget: IpBudget::default(),
            drops: DropStats::default(),
        }
    }

    pub fn disco_key(&self) -> DiscoKey {
        self.public
    }

    pub fn drops(&self) -> DropStats {
        self.drops
    }

    /// This host's candidates and netcheck summary. A new STUN observation
    /// restarts the count of mappings used for port prediction.
    pub fn set_local(&mut self, now: Instant, candidates: Vec<Candidate>, nat: NatSummary) {
        if nat.observed != self.local_nat.observed {
            self.contacted.clear();
            self.predicted = None;
        }
        let changed = candidates != self.local_candidates;
        self.local_candidates = candidates;
        self.local_nat = nat;
        let keys: Vec<NodeKey> = self.peers.keys().copied().collect();
        for k in keys {
            if let Some(entry) = self.peers.get_mut(&k) {
                entry.paths.set_nat(now, nat, entry.remote_nat);
                if changed {
                    entry.paths.local_candidates_changed(now);
                }
            }
            self.pump(now, k);
        }
    }

    /// Adds or updates a peer from the coordinator's map.
    ///
    /// A disco key already credited to another peer stays with that peer:
    /// disco from it is never credited to a second node that claims the
    /// same key (the coordinator refuses such a claim too; this guards
    /// against one that does not), and the claimant gets no disco at all.
    pub fn upsert_peer(&mut self, now: Instant, info: PeerInfo) {
        if let Some(entry) = self.peers.get(&info.node_key) {
            if entry.disco != info.disco_key {
                let old = entry.disco;
                self.forget_disco(&old, &info.node_key);
                self.peers.remove(&info.node_key);
            }
        }
        if !self.peers.contains_key(&info.node_key) {
            let seed = self.rng.gen();
            let mut paths = PeerPaths::new(self.cfg.clone(), self.local_key, info.node_key, seed);
            paths.set_tcp_local(now, !self.tcp_local.is_empty(), self.udp_blocked);
            match self.by_disco.get(&info.disco_key) {
                Some(owner) if *owner != info.node_key => {
                    tracing::warn!(
                        peer = %info.node_key.short(),
                        owner = %owner.short(),
                        "peer claims another peer's disco key; its disco is ignored"
                    );
                }
                _ => {
                    self.by_disco.insert(info.disco_key, info.node_key);
                }
            }
            self.peers.insert(
                info.node_key,
                PeerEntry {
                    disco: info.disco_key,
                    sbox: None,
                    replay: ReplayWindow::default(),
                    remote_nat: info.nat,
                    paths,
                },
            );
        }
        if let Some(entry) = self.peers.get_mut(&info.node_key) {
            entry.remote_nat = info.nat;
            entry.paths.set_nat(now, self.local_nat, info.nat);
            entry.paths.handle_candidates(now, info.candidates);
        }
        self.pump(now, info.node_key);
    }

    pub fn remove_peer(&mut self, now: Instant, key: &NodeKey) {
        if let Some(entry) = self.peers.remove(key) {
            self.forget_disco(&entry.disco, key);
        }
        if self.sockets_wanted_by.remove(key) {
            self.maybe_close_sockets(now);
        }
    }

    /// Drops the mapping of `disco` only if it is `peer`'s: removing a
    /// node that claimed a victim's key must not cut the victim off.
    fn forget_disco(&mut self, disco: &DiscoKey, peer: &NodeKey) {
        if self.by_disco.get(disco) == Some(peer) {
            self.by_disco.remove(disco);
        }
    }

    /// The path for the next WireGuard packet to `peer` (relay if unknown).
    pub fn path(&self, peer: &NodeKey) -> Path {
        self.peers
            .get(peer)
            .map_or(Path::Relay, |e| e.paths.current_path())
    }

    /// The raw relay reason, for callers that want to match on it.
    pub fn relay_reason(&self, peer: &NodeKey) -> Option<RelayReason> {
        self.peers.get(peer)?.paths.relay_reason().cloned()
    }

    /// We sent `peer` packets since the last call (and maybe received).
    pub fn note_traffic(&mut self, now: Instant, peer: &NodeKey) {
        if let Some(e) = self.peers.get_mut(peer) {
            e.paths.note_traffic(now);
            self.pump(now, *peer);
        }
    }

    /// `peer` sent us packets and we sent it none: enough to look for a
    /// direct path, not to start the hard-NAT methods (`peer_punch`).
    pub fn note_received(&mut self, now: Instant, peer: &NodeKey) {
        if let Some(e) = self.peers.get_mut(peer) {
            e.paths.note_received(now);
            self.pump(now, *peer);
        }
    }

    /// Starts an on-demand ping round to `peer` (`warren ping`): pings over
    /// the relay and the direct paths; each pong comes out as a
    /// [`NodeEvent::PingReply`] with the round number returned here.
    pub fn ping(&mut self, now: Instant, peer: &NodeKey) -> Option<u64> {
        let round = self.peers.get_mut(peer)?.paths.ping_round(now);
        self.pump(now, *peer);
        Some(round)
    }

    /// The host's interfaces or default route changed.
    pub fn network_changed(&mut self, now: Instant) {
        self.contacted.clear();
        self.predicted = None;
        let keys: Vec<NodeKey> = self.peers.keys().copied().collect();
        for k in keys {
            if let Some(e) = self.peers.get_mut(&k) {
                e.paths.network_changed(now);
            }
            self.pump(now, k);
        }
    }

    /// The driver opened the requested extra sockets (`1..=count`).
    pub fn sockets_opened(&mut self, now: Instant, count: u16) {
        self.sockets_open = count;
        let wanting: Vec<NodeKey> = self.sockets_wanted_by.iter().copied().collect();
        for k in wanting {
            if let Some(e) = self.peers.get_mut(&k) {
                e.paths.sockets_ready(now, count);
            }
            self.pump(now, k);
        }
    }

    /// A datagram arrived on local socket `socket` from `src`.
    pub fn handle_udp(
        &mut self,
        now: Instant,
        socket: SocketId,
        src: SocketAddr,
        bytes: &[u8],
    ) -> Datagram {
        self.clock = Some(now);
        match bytes.first() {
            Some(_) if disco::looks_like_disco(bytes) => self.handle_disco(
                now,
                Path::Direct(DirectPath { socket, addr: src }),
                None,
                bytes,
            ),
            _ if is_wireguard(bytes) => Datagram::WireGuard,
            _ if is_stun(bytes) => Datagram::Stun,
            _ => {
                self.drops.unknown_datagram += 1;
                Datagram::Dropped
            }
        }
    }

    /// A packet arrived through the relay from node `from` (the relay has
    /// authenticated `from`).
    pub fn handle_relay(&mut self, now: Instant, from: NodeKey, bytes: &[u8]) -> Datagram {
        self.clock = Some(now);
        if disco::looks_like_disco(bytes) {
            self.handle_disco(now, Path::Relay, Some(from), bytes)
        } else if is_wireguard(bytes) {
            Datagram::WireGuard
        } else {
            self.drops.unknown_datagram += 1;
            Datagram::Dropped
        }
    }

    fn handle_disco(
        &mut self,
        now: Instant,
        path: Path,
        relay_from: Option<NodeKey>,
        bytes: &[u8],
    ) -> Datagram {
        let header = match disco::parse_header(bytes) {
            Ok(h) => h,
            Err(_) => {
                self.drops.malformed += 1;
                return Datagram::Dropped;
            }
        };
        let Some(&peer) = self.by_disco.get(&header.sender) else {
            self.drops.unknown_sender += 1;
            return Datagram::Dropped;
        };
        if relay_from.is_some_and(|f| f != peer) {
            self.drops.relay_mismatch += 1;
            return Datagram::Dropped;
        }
        let Some(entry) = self.peers.get_mut(&peer) else {
            self.drops.unknown_sender += 1;
            return Datagram::Dropped;
        };
        if entry.replay.check(header.counter).is_err() {
            self.drops.replayed += 1;
            return Datagram::Dropped;
        }
        let disco_key = entry.disco;
        let msg = match disco::open(entry.sbox(&self.secret), &disco_key, bytes) {
            Ok((_, msg)) => msg,
            Err(DiscoError::Unsealable) => {
                self.drops.unsealable += 1;
                return Datagram::Dropped;
            }
            Err(_) => {
                self.drops.malformed += 1;
                return Datagram::Dropped;
            }
        };
        // Only an authentic box may advance the window.
        if entry.replay.accept(header.counter).is_err() {
            self.drops.replayed += 1;
            return Datagram::Dropped;
        }
        if entry.paths.handle_disco(now, path, msg).is_err() {
            self.drops.rejected += 1;
        }
        self.pump(now, peer);
        Datagram::Disco
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        self.clock = Some(now);
        // `pump` needs all of `self`, so the keys are copied out first, into
        // a buffer kept between calls: no allocation per timeout.
        let mut keys = std::mem::take(&mut self.scratch_keys);
        keys.clear();
        keys.extend(self.peers.keys().copied());
        for &k in &keys {
            if let Some(e) = self.peers.get_mut(&k) {
                if e.paths.poll_timeout().is_some_and(|(t, _)| t <= now) {
                    e.paths.handle_timeout(now);
                }
            }
            self.pump(now, k);
        }
        self.scratch_keys = keys;
        self.reap_unproven(now);
    }

    /// The earliest deadline over all peers. O(peers); a timer wheel can
    /// replace the scan when meshes grow large.
    pub fn poll_timeout(&self) -> Option<(Instant, TimerReason)> {
        self.peers
            .values()
            .filter_map(|e| e.paths.poll_timeout())
            .chain(self.unproven_deadline().map(|t| (t, TimerReason::Tcp)))
            .min_by_key(|(t, _)| *t)
    }

    pub fn poll_event(&mut self) -> Option<NodeEvent> {
        self.events.pop_front()
    }

    /// Moves one peer's events to the node queue, acting on socket requests.
    fn pump(&mut self, now: Instant, key: NodeKey) {
        while let Some(ev) = self.peers.get_mut(&key).and_then(|e| e.paths.poll_event()) {
            match ev {
                Event::PathChanged { from, to, reason } => {
                    self.events.push_back(NodeEvent::PathChanged {
                        peer: key,
                        from,
                        to,
                        reason,
                    });
                }
                Event::WantSockets(count) => {
                    self.sockets_wanted_by.insert(key);
                    if self.sockets_open > 0 {
                        let open = self.sockets_open;
                        if let Some(e) = self.peers.get_mut(&key) {
                            e.paths.sockets_ready(now, open);
                        }
                    } else if !self.sockets_requested {
                        self.sockets_requested = true;
                        self.events.push_back(NodeEvent::OpenSockets { count });
                    }
                }
                Event::PingReply { round, path, rtt } => {
                    self.events.push_back(NodeEvent::PingReply {
                        peer: key,
                        round,
                        path,
                        rtt,
                    });
                }
                Event::ReleaseSockets { keep } => {
                    self.sockets_kept.extend(keep);
                    self.sockets_wanted_by.remove(&key);
                    self.maybe_close_sockets(now);
                }
                Event::TcpConnect { mut targets, until } => {
                    // One of this host's own addresses would connect to
                    // ourselves (a TCP self-connect) and end the dial
                    // before the real target answers.
                    targets.retain(|t| !self.is_own_ip(t.ip()));
                    if !targets.is_empty() {
                        self.events.push_back(NodeEvent::TcpConnect {
                            peer: key,
                            targets,
                            until,
                        });
                    }
                }
                Event::TcpClose { addr } => self.events.push_back(NodeEvent::TcpClose { addr }),
            }
        }
    }

    fn maybe_close_sockets(&mut self, _now: Instant) {
        if self.sockets_wanted_by.is_empty() && (self.sockets_open > 0 || self.sockets_requested) {
            self.sockets_open = 0;
            self.sockets_requested = false;
            let keep = self.sockets_kept.iter().copied().collect();
            self.events.push_back(NodeEvent::CloseSockets { keep });
        }
    }
}

#[path = "node_status.rs"]
mod status;
pub use status::PeerStatus;
#[path = "node_local.rs"]
mod local;

#[path = "node_send.rs"]
mod send;

#[cfg(test)]
#[path = "node_tests.rs"]
mod tests;
