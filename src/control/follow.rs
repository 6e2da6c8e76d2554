//! What the network map asks of this node, decided without IO.
//!
//! The map stream (`control::client`) delivers [`MapEvent`]s: full maps,
//! peer deltas, this node's own record, the packet filter, and the
//! stream's state. [`Follower`] turns them into [`MapAction`]s for the
//! agent state (`agent::state::control`) to carry out: which peers to add, replace or remove (a
//! full map is diffed against the peers it knows), this node's addresses
//! (checked against the overlay and the network's /48, pinned at the first
//! join: `control::bounds`), the packet filter to install (one too big to
//! walk per new flow fails closed), the relay map, and when to leave. It
//! owns the peers as the map describes them; the agent state owns
//! traversal and asks its driver for the rest (the data plane, the relays,
//! the TUN device). A registration's addresses pass the same check
//! (`handle_registration`).
//!
//! Sans-IO in the quinn-proto shape (docs/architecture.md, "Sans-IO state
//! machines"): `handle_map` in, `poll_action` out, so each rule above has a
//! unit test without a coordinator or a TUN device.

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::Duration;

use ipnet::Ipv6Net;

use super::bounds;
use super::netmap::NetMap;
use super::types::{Peer, RelayMap};
use crate::keys::NodeKey;
use crate::policy::filter::MAX_RULES;
use crate::policy::{FilterRule, PacketFilter};

/// What the map stream yields.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum MapEvent {
    /// A complete map: from the file on disk at start (`from_cache`), or
    /// from the coordinator on each (re)connection.
    Full {
        map: NetMap,
        from_cache: bool,
    },
    PeerAdded(Peer),
    PeerChanged(Peer),
    PeerRemoved(NodeKey),
    SelfChanged(Peer),
    /// The packet filter changed (`None`: no policy).
    FilterChanged(Option<Vec<crate::policy::FilterRule>>),
    Connected,
    Disconnected {
        reason: String,
        retry_in: Duration,
    },
    /// The coordinator no longer accepts this node (removed, logged out).
    /// The stream ends after this event.
    Revoked {
        reason: String,
    },
}

/// One thing the map asks the driver to do.
#[derive(Debug)]
#[non_exhaustive]
pub enum MapAction {
    /// The network's /48, seen for the first time: keep it in the login
    /// so that later maps are held to it.
    PinPrefix(Ipv6Net),
    /// Install these overlay addresses (they changed).
    SetAddresses {
        v4: Ipv4Addr,
        v6: Ipv6Addr,
    },
    /// The map gave this node addresses outside the overlay or its
    /// network: nothing was installed.
    AddressesRefused(bounds::OutOfBounds),
    /// This node's name in the network.
    SetName(String),
    /// Add the peer, or update it (its record changed).
    UpsertPeer(Box<Peer>),
    /// The peer is gone from the map (or now out of bounds).
    RemovePeer(NodeKey),
    /// The packet filter to enforce; `None`: the network has no policy.
    SetFilter(Option<Box<PacketFilter>>),
    SetRelayMap(RelayMap),
    /// A map came from the coordinator itself (not the cache).
    MapReceived,
    /// The stream is up, or down with a reason and a retry.
    Connected,
    Disconnected {
        reason: String,
        retry_in: Duration,
    },
    /// The coordinator no longer accepts this node: leave the network.
    Leave(String),
}

/// See the module doc.
#[derive(Debug)]
pub struct Follower {
    me: NodeKey,
    /// The network's /48 once pinned (the login keeps it across restarts).
    prefix: Option<Ipv6Net>,
    /// The addresses last installed.
    addresses: Option<(Ipv4Addr, Ipv6Addr)>,
    /// The routes this node serves, as its own map record says.
    self_routes: Vec<ipnet::IpNet>,
    /// This node's name, and the network's DNS settings (checked; the
    /// defaults when the map has none or they do not pass).
    name: Option<String>,
    dns: crate::dns::DnsSettings,
    peers: HashMap<NodeKey, Peer>,
    out: VecDeque<MapAction>,
}

impl Follower {
    /// A follower for node `me`, with the /48 its login pinned, if any.
    pub fn new(me: NodeKey, prefix: Option<Ipv6Net>) -> Follower {
        Follower {
            me,
            prefix,
            addresses: None,
            self_routes: Vec::new(),
            name: None,
            dns: crate::dns::DnsSettings::default(),
            peers: HashMap::new(),
            out: VecDeque::new(),
        }
    }

    /// Holds later maps to `prefix` (the /48 a saved login pinned).
    pub fn set_prefix(&mut self, prefix: Option<Ipv6Net>) {
        if prefix.is_some() {
            self.prefix = prefix;
        }
    }

    /// The routes this node serves (advertised and approved), from its
    /// own map record.
    pub fn self_routes(&self) -> &[ipnet::IpNet] {
        &self.self_routes
    }

    /// This node's overlay addresses, once installed.
    pub fn addresses(&self) -> Option<(Ipv4Addr, Ipv6Addr)> {
        self.addresses
    }

    /// The network's /48, once pinned.
    pub fn prefix(&self) -> Option<Ipv6Net> {
        self.prefix
    }

    /// This node's name in the network, once a map gave it.
    pub fn name(&self) -> Option<&str> {
        self.name.as_deref()
    }

    /// The network's DNS settings.
    pub fn dns(&self) -> &crate::dns::DnsSettings {
        &self.dns
    }

    /// The peers as the map describes them.
    pub fn peers(&self) -> &HashMap<NodeKey, Peer> {
        &self.peers
    }

    pub fn peer(&self, key: &NodeKey) -> Option<&Peer> {
        self.peers.get(key)
    }

    /// Forgets the map (`warren down`): every known peer is removed; the
    /// network's /48 stays pinned.
    pub fn clear(&mut self) {
        let keys: Vec<NodeKey> = self.peers.keys().copied().collect();
        for k in keys {
            self.remove(k);
        }
        self.addresses = None;
        self.name = None;
        self.self_routes.clear();
    }

    /// Forgets the network (logged out, revoked, or joined another):
    /// [`Self::clear`], and the /48 is no longer pinned, so the next
    /// network's maps are held to the next network's.
    pub fn forget_network(&mut self) {
        self.clear();
        self.prefix = None;
    }

    /// The addresses a registration gave this node: checked against the
    /// overlay and the pinned /48 like a map's (`control::bounds`).
    pub fn handle_registration(&mut self, v4: Ipv4Addr, v6: Ipv6Addr) {
        self.set_self(v4, v6);
    }

    /// Takes one event of the map stream; `None` is the stream's end.
    pub fn handle_map(&mut self, ev: Option<MapEvent>) {
        let Some(ev) = ev else {
            self.out.push_back(MapAction::Leave(
                "the coordinator closed the map stream for good".into(),
            ));
            return;
        };
        match ev {
            MapEvent::Full { map, from_cache } => {
                self.set_self(map.self_node.ipv4, map.self_node.ipv6);
                self.self_routes.clone_from(&map.self_node.routes);
                self.name = Some(map.self_node.name.clone());
                self.dns = match map.dns.map(|d| d.checked()) {
                    None => crate::dns::DnsSettings::default(),
                    Some(Ok(d)) => d,
                    Some(Err(e)) => {
                        tracing::warn!(error = %e, "the map's DNS settings are refused; using the defaults");
                        crate::dns::DnsSettings::default()
                    }
                };
                self.out
                    .push_back(MapAction::SetName(map.self_node.name.clone()));
                if !from_cache {
                    self.out.push_back(MapAction::MapReceived);
                }
                self.out.push_back(MapAction::SetRelayMap(map.relay_map));
                self.set_filter(map.packet_filter);
                let gone: Vec<NodeKey> = self
                    .peers
                    .keys()
                    .filter(|k| !map.peers.contains_key(k))
                    .copied()
                    .collect();
                for k in gone {
                    self.remove(k);
                }
                for p in map.peers.into_values() {
                    self.upsert(p);
                }
            }
            MapEvent::PeerAdded(p) | MapEvent::PeerChanged(p) => self.upsert(p),
            MapEvent::PeerRemoved(k) => {
                if self.peers.contains_key(&k) {
                    self.remove(k);
                }
            }
            MapEvent::SelfChanged(me) => {
                self.set_self(me.ipv4, me.ipv6);
                self.self_routes.clone_from(&me.routes);
                self.name = Some(me.name.clone());
                self.out.push_back(MapAction::SetName(me.name));
            }
            MapEvent::FilterChanged(f) => self.set_filter(f),
            MapEvent::Connected => self.out.push_back(MapAction::Connected),
            MapEvent::Disconnected { reason, retry_in } => self
                .out
                .push_back(MapAction::Disconnected { reason, retry_in }),
            MapEvent::Revoked { reason } => self.out.push_back(MapAction::Leave(reason)),
        }
    }

    /// The next thing to do.
    pub fn poll_action(&mut self) -> Option<MapAction> {
        self.out.pop_front()
    }

    fn set_self(&mut self, v4: Ipv4Addr, v6: Ipv6Addr) {
        match bounds::check(v4, v6, self.prefix) {
            Ok(net) => {
                if self.prefix.is_none() {
                    self.prefix = Some(net);
                    self.out.push_back(MapAction::PinPrefix(net));
                }
                // Every full map and self change repeats them: one action
                // per actual change.
                if self.addresses != Some((v4, v6)) {
                    self.addresses = Some((v4, v6));
                    self.out.push_back(MapAction::SetAddresses { v4, v6 });
                }
            }
            Err(e) => self.out.push_back(MapAction::AddressesRefused(e)),
        }
    }

    /// A peer's addresses become its allowed IPs, so only overlay ones in
    /// this network are taken; this node's own record is never a peer.
    fn upsert(&mut self, p: Peer) {
        if p.key == self.me {
            return;
        }
        if let Err(e) = bounds::check(p.ipv4, p.ipv6, self.prefix) {
            tracing::warn!(peer = %p.key.short(), error = %e, "peer ignored: the map gives it an address outside the overlay");
            if self.peers.contains_key(&p.key) {
                self.remove(p.key);
            }
            return;
        }
        if self.peers.get(&p.key) == Some(&p) {
            return;
        }
        self.peers.insert(p.key, p.clone());
        self.out.push_back(MapAction::UpsertPeer(Box::new(p)));
    }

    fn remove(&mut self, k: NodeKey) {
        self.peers.remove(&k);
        self.out.push_back(MapAction::RemovePeer(k));
    }

    /// README, "Access policy": a filter too big to walk per new flow
    /// fails closed.
    fn set_filter(&mut self, rules: Option<Vec<FilterRule>>) {
        let filter = match rules {
            None => None,
            Some(r) if r.len() > MAX_RULES => {
                tracing::warn!(
                    rules = r.len(),
                    max = MAX_RULES,
                    "packet filter too big: nothing is allowed in"
                );
                Some(PacketFilter::new(Vec::new()))
            }
            Some(r) => Some(PacketFilter::new(r)),
        };
        self.out
            .push_back(MapAction::SetFilter(filter.map(Box::new)));
    }
}

/// The addresses a peer is allowed to send from (its overlay addresses).
pub fn allowed_ips(p: &Peer) -> Vec<ipnet::IpNet> {
    vec![
        ipnet::IpNet::from(IpAddr::V4(p.ipv4)),
        ipnet::IpNet::from(IpAddr::V6(p.ipv6)),
    ]
}

#[cfg(test)]
#[path = "follow_tests.rs"]
mod tests;
