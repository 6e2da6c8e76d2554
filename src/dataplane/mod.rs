//! The data plane: packets between the TUN device and the peers.
//!
//! [`DataPlane`] owns the node's WireGuard identity and the set of peers.
//! The hot paths (TUN → peer, network → TUN) read the peer set through an
//! `ArcSwap` snapshot, so adding or removing a peer (from the config or
//! from the coordinator's map) never takes a lock that a packet waits on:
//! an edit builds a new set and swaps it in.
//!
//! Incoming datagrams are matched to a peer without trying every tunnel:
//! data, handshake responses and cookie replies carry our receiver index,
//! whose upper 24 bits are the peer's slot; a handshake initiation is opened
//! once with our static key (`parse_handshake_anon`) to learn who sent it.
//!
//! Drops are counted, never logged per packet: a flood of forged packets
//! must cost a counter increment, not a log line.

pub mod firewall;
pub mod flow;
pub mod packet;
pub mod peer;
pub mod route;
pub mod wg;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use arc_swap::ArcSwap;
use boringtun::noise::handshake::parse_handshake_anon;
use boringtun::noise::{Packet, Tunn};
use ipnet::IpNet;
use parking_lot::Mutex;
use x25519_dalek::PublicKey;

use crate::keys::{NodeKey, PrivateKey};
pub use peer::{Opened, Peer, PeerSpec, PeerStats, Sealed};
pub use route::RouteTable;

/// Handshakes per second before boringtun demands cookies (its default).
const HANDSHAKE_RATE_LIMIT: u64 = 100;

/// Space a sealed packet needs beyond the plaintext: WireGuard's 16-byte
/// header, 16-byte tag, and up to 15 bytes of padding.
pub const SEAL_OVERHEAD: usize = 32 + 16;

/// An immutable snapshot of the peers.
#[derive(Default)]
pub struct PeerSet {
    pub routes: RouteTable<Arc<Peer>>,
    by_index: HashMap<u32, Arc<Peer>>,
    by_key: HashMap<NodeKey, Arc<Peer>>,
}

impl PeerSet {
    pub fn by_key(&self, key: &NodeKey) -> Option<&Arc<Peer>> {
        self.by_key.get(key)
    }

    pub fn iter(&self) -> impl Iterator<Item = &Arc<Peer>> {
        self.by_key.values()
    }

    pub fn len(&self) -> usize {
        self.by_key.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_key.is_empty()
    }
}

/// Why packets were dropped, counted for `status` and the tests.
#[derive(Default, Debug)]
pub struct Drops {
    /// Datagrams that failed WireGuard authentication or parsing.
    pub auth: AtomicU64,
    /// Datagrams naming a receiver index or key we do not know.
    pub unknown_peer: AtomicU64,
    /// TUN packets with no peer owning the destination.
    pub no_route: AtomicU64,
    /// TUN packets for a peer with no known endpoint.
    pub no_endpoint: AtomicU64,
    /// TUN packets that are not IPv4/IPv6.
    pub malformed: AtomicU64,
}

impl DataPlane {
    /// Every drop counter, the firewall's included.
    pub fn drop_counts(&self) -> DropCounts {
        let mut c = self.drops.snapshot();
        c.policy = self.firewall.drops.policy.load(Ordering::Relaxed);
        c.not_ours = self.firewall.drops.not_ours.load(Ordering::Relaxed);
        c
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct DropCounts {
    pub auth: u64,
    pub unknown_peer: u64,
    pub no_route: u64,
    pub no_endpoint: u64,
    pub malformed: u64,
    /// Packets from peers that no policy rule allows and that answer no
    /// flow of ours.
    #[serde(default)]
    pub policy: u64,
    /// Packets from peers to an address this node does not own or serve.
    #[serde(default)]
    pub not_ours: u64,
}

impl Drops {
    pub fn snapshot(&self) -> DropCounts {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        DropCounts {
            auth: g(&self.auth),
            unknown_peer: g(&self.unknown_peer),
            no_route: g(&self.no_route),
            no_endpoint: g(&self.no_endpoint),
            malformed: g(&self.malformed),
            policy: 0,
            not_ours: 0,
        }
    }

    pub fn bump(c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }
}

pub struct DataPlane {
    key: PrivateKey,
    public: PublicKey,
    limiter: wg::Limiter,
    peers: ArcSwap<PeerSet>,
    /// Serialises edits of the peer set (not packets).
    /// Serialises edits of the peer set, and holds the subnet routes
    /// every rebuild applies.
    edit: Mutex<Vec<(IpNet, NodeKey)>>,
    next_index: AtomicU32,
    pub drops: Arc<Drops>,
    /// The receiving side's packet filter (`firewall.rs`), fed the policy
    /// from the coordinator's map.
    pub firewall: Arc<firewall::Firewall>,
    /// Woken by the first packet of a peer that was quiet (see
    /// [`Peer::poll_activity`]), so traversal starts on the first packet
    /// rather than on the next housekeeping tick.
    wake: Arc<tokio::sync::Notify>,
}

impl DataPlane {
    /// The data plane of node `key`, started at `now`.
    pub fn new(key: PrivateKey, now: Instant) -> DataPlane {
        let public = PublicKey::from(key.secret());
        DataPlane {
            limiter: wg::Limiter::new(now, &public, HANDSHAKE_RATE_LIMIT),
            key,
            public,
            peers: ArcSwap::from_pointee(PeerSet::default()),
            edit: Mutex::new(Vec::new()),
            next_index: AtomicU32::new(1),
            drops: Arc::default(),
            firewall: Arc::default(),
            wake: Arc::default(),
        }
    }

    /// Notified when a quiet peer sends or receives a packet.
    pub fn activity_wake(&self) -> Arc<tokio::sync::Notify> {
        self.wake.clone()
    }

    pub fn public_key(&self) -> NodeKey {
        NodeKey::from(self.public)
    }

    /// The current peer set; cheap, meant to be taken once per batch.
    pub fn peers(&self) -> arc_swap::Guard<Arc<PeerSet>> {
        self.peers.load()
    }

    /// Adds a peer, or replaces it when its settings changed. A peer whose
    /// spec is unchanged keeps its tunnel (and session) untouched.
    pub fn upsert_peer(&self, now: Instant, spec: PeerSpec) {
        self.upsert_peers(now, [spec]);
    }

    /// [`DataPlane::upsert_peer`] for many peers with one rebuild of the
    /// peer set. Adding peers one by one rebuilds the set (and its route
    /// table) each time, which is quadratic: a 1,000-peer config took over a
    /// second to load.
    /// New sessions start at `now`.
    pub fn upsert_peers(&self, now: Instant, specs: impl IntoIterator<Item = PeerSpec>) {
        let g = self.edit.lock();
        let cur = self.peers.load_full();
        // Copied from `cur` at the first peer that needs a new tunnel.
        let mut next: Option<HashMap<NodeKey, Arc<Peer>>> = None;
        for spec in specs {
            let known = match &next {
                Some(m) => m.get(&spec.key),
                None => cur.by_key.get(&spec.key),
            };
            if let Some(p) = known {
                // At most the endpoint changed: move it without a new
                // handshake. The stored spec keeps the first endpoint, so
                // the path, not the spec, is what is compared.
                let mut same = p.spec.clone();
                same.endpoint = spec.endpoint;
                if same == spec {
                    if let Some(ep) = spec.endpoint.filter(|ep| p.endpoint() != Some(*ep)) {
                        p.set_endpoint(ep);
                    }
                    continue;
                }
            }
            let index = self.next_index.fetch_add(1, Ordering::Relaxed) & 0x00ff_ffff;
            let peer = Arc::new(Peer::new(
                now,
                &self.key,
                spec,
                index,
                self.limiter.shared(),
                self.wake.clone(),
            ));
            next.get_or_insert_with(|| cur.by_key.clone())
                .insert(peer.key, peer);
        }
        if let Some(peers) = next {
            self.peers
                .store(Arc::new(build(peers.into_values().collect(), &g)));
        }
    }

    pub fn remove_peer(&self, key: &NodeKey) -> bool {
        let g = self.edit.lock();
        let cur = self.peers.load_full();
        if !cur.by_key.contains_key(key) {
            return false;
        }
        let peers = cur
            .by_key
            .values()
            .filter(|p| &p.key != key)
            .cloned()
            .collect();
        self.peers.store(Arc::new(build(peers, &g)));
        true
    }

    /// Routes each subnet prefix to the peer that carries it (the whole
    /// set), and accepts packets from those prefixes from that peer.
    pub fn set_subnet_routes(&self, routes: Vec<(IpNet, NodeKey)>) {
        let mut g = self.edit.lock();
        if *g == routes {
            return;
        }
        *g = routes;
        let cur = self.peers.load_full();
        let peers = cur.by_key.values().cloned().collect();
        self.peers.store(Arc::new(build(peers, &g)));
    }

    /// Called once a second: lets boringtun's handshake rate limiter forget
    /// the last second's count.
    /// `now` must only go forward from one call to the next (one task
    /// calls it).
    pub fn reset_rate_limiter(&self, now: Instant) {
        self.limiter.reset(now);
    }

    /// Finds the peer a WireGuard datagram belongs to. `reply` receives a
    /// cookie reply when we are under handshake load; its length is returned
    /// in the error so the caller can send it.
    pub fn peer_for(
        &self,
        now: Instant,
        set: &PeerSet,
        from: std::net::SocketAddr,
        datagram: &[u8],
        reply: &mut [u8],
    ) -> Result<Arc<Peer>, usize> {
        let packet = match self
            .limiter
            .at_time(now)
            .verify_packet(Some(from.ip()), datagram, reply)
        {
            Ok(p) => p,
            Err(boringtun::noise::TunnResult::WriteToNetwork(cookie)) => return Err(cookie.len()),
            Err(_) => {
                Drops::bump(&self.drops.auth);
                return Err(0);
            }
        };
        let found = match packet {
            Packet::HandshakeInit(ref init) => {
                match parse_handshake_anon(self.key.secret(), &self.public, init) {
                    Ok(half) => set.by_key.get(&NodeKey(half.peer_static_public)),
                    Err(_) => {
                        Drops::bump(&self.drops.auth);
                        return Err(0);
                    }
                }
            }
            Packet::HandshakeResponse(ref p) => set.by_index.get(&(p.receiver_idx >> 8)),
            Packet::PacketCookieReply(ref p) => set.by_index.get(&(p.receiver_idx >> 8)),
            Packet::PacketData(ref p) => set.by_index.get(&(p.receiver_idx >> 8)),
        };
        match found {
            Some(p) => Ok(p.clone()),
            None => {
                Drops::bump(&self.drops.unknown_peer);
                Err(0)
            }
        }
    }

    /// True when `datagram` parses as a WireGuard message at all.
    pub fn is_wireguard(datagram: &[u8]) -> bool {
        Tunn::parse_incoming_packet(datagram).is_ok()
    }
}

/// The snapshot of `peers`, with the subnet routes each carries routed to
/// it and accepted from it.
fn build(peers: Vec<Arc<Peer>>, subnets: &[(IpNet, NodeKey)]) -> PeerSet {
    let mut set = PeerSet::default();
    for p in peers {
        for net in &p.spec.allowed_ips {
            set.routes.insert(*net, p.clone());
        }
        let carried: Vec<IpNet> = subnets
            .iter()
            .filter(|(_, k)| *k == p.key)
            .map(|(n, _)| *n)
            .collect();
        for net in &carried {
            set.routes.insert(*net, p.clone());
        }
        p.set_subnets(carried);
        set.by_index.insert(p.index, p.clone());
        set.by_key.insert(p.key, p);
    }
    set
}

#[cfg(test)]
mod tests;
