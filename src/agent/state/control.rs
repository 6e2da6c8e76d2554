//! The agent state's side of the coordinator: whether this node is joined
//! and following a map, what the map asks (through the [`Follower`]), and
//! the endpoints reports it owes the coordinator.
//!
//! The driver owns the IO of it: the login file, the HTTP client, the map
//! stream, the requests in flight. It tells this state what happened
//! (`begin`, `registered`, `follow`, `stop`, `leave`, `handle_map`,
//! `handle_reported`) and carries out what follows (`Output::AddPeer`,
//! `Output::Report`, `Output::Revoked`, …). A map event never waits on
//! the coordinator, so a slow coordinator never stalls disco or the
//! relays.
//!
//! [`Follower`]: crate::control::follow::Follower

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::Instant;

use ipnet::Ipv6Net;

use super::{AgentState, Output, RelayCmd, Timer, TICK};
use crate::api::mesh::MeshState;
use crate::control::follow::{MapAction, MapEvent};
use crate::control::types::{EndpointsReport, Peer as MapPeer, RegisterResponse, RelayMap};
use crate::dataplane::PeerSpec;
use crate::netcheck::Report;
use crate::traversal::node::PeerInfo;

/// This node's standing with its coordinator.
#[derive(Debug, Clone)]
pub struct Control {
    pub state: MeshState,
    /// The map stream is open (or being reopened).
    pub following: bool,
    pub name: Option<String>,
    /// The node's overlay addresses.
    pub addresses: Vec<IpAddr>,
    pub last_error: Option<String>,
    /// The last report the coordinator accepted, whether one is in
    /// flight, and the newest one waiting for it (reports are sent one at
    /// a time, the newest wins).
    pub reported: Option<EndpointsReport>,
    pub reporting: bool,
    pending: Option<(EndpointsReport, Option<Box<Report>>)>,
    /// A map came from the coordinator since the stream (re)started.
    pub map_received: bool,
}

impl Control {
    fn new(state: MeshState) -> Control {
        Control {
            state,
            following: false,
            name: None,
            addresses: Vec::new(),
            last_error: None,
            reported: None,
            reporting: false,
            pending: None,
            map_received: false,
        }
    }
}

/// Why a report did not reach the coordinator.
#[derive(Debug, Clone)]
pub struct ReportFailed {
    /// The coordinator refuses this node for good (removed, revoked).
    pub permanent: bool,
    pub message: String,
}

impl AgentState {
    pub fn control(&self) -> Option<&Control> {
        self.control.as_ref()
    }

    /// A login exists (saved, or just accepted): joined, not yet following.
    pub fn begin(&mut self) {
        self.control = Some(Control::new(MeshState::Stopped));
    }

    /// The coordinator accepted a registration. `keep`: the node stays in
    /// the network it follows (its stream and state carry on; a
    /// re-registration that comes back after the node left is ignored);
    /// otherwise a new standing starts. The addresses are checked like a
    /// map's (`Follower::handle_registration`).
    pub fn registered(&mut self, now: Instant, reg: &RegisterResponse, keep: bool) {
        self.clock(now);
        if !keep {
            self.control = Some(Control::new(MeshState::Reconnecting));
        }
        let Some(c) = self.control.as_mut() else {
            return;
        };
        // A background re-registration that comes back after `down` is
        // old news: the next `up` registers afresh.
        if keep && !c.following {
            return;
        }
        tracing::info!(name = %reg.name, ipv4 = %reg.ipv4, ipv6 = %reg.ipv6, "joined the network");
        c.name = Some(reg.name.clone());
        self.follow.handle_registration(reg.ipv4, reg.ipv6);
        while let Some(action) = self.follow.poll_action() {
            self.act(now, action);
        }
        // A new standing starts without addresses; the follower says them
        // only when they change, so take them from it when unchanged.
        if let (Some(c), Some((v4, v6))) = (self.control.as_mut(), self.follow.addresses()) {
            if c.addresses.is_empty() {
                c.addresses = vec![IpAddr::V4(v4), IpAddr::V6(v6)];
            }
        }
        self.set_relay_map(reg.relay_map.clone());
    }

    /// The driver (re)opened the map stream; maps are held to `prefix`,
    /// the network's /48 the login pinned.
    pub fn follow(&mut self, now: Instant, prefix: Option<Ipv6Net>) {
        self.clock(now);
        let Some(c) = self.control.as_mut() else {
            return;
        };
        c.following = true;
        c.state = MeshState::Reconnecting;
        c.map_received = false;
        self.follow.set_prefix(prefix);
        if self.timers.get(Timer::Housekeeping).is_none() {
            self.timers.set(Timer::Housekeeping, now + TICK);
        }
    }

    /// `warren down`: the node stays joined but leaves the mesh.
    pub fn stop(&mut self, now: Instant) {
        self.clock(now);
        if let Some(c) = self.control.as_mut() {
            c.following = false;
            c.state = MeshState::Stopped;
        }
        self.drop_peers(now);
    }

    /// Forgets the network: peers, relays, the standing, the pinned /48.
    pub fn leave(&mut self, now: Instant) {
        self.clock(now);
        self.control = None;
        self.follow.forget_network();
        self.drop_peers(now);
    }

    /// Out of the mesh: every peer goes (as the map removing it would), the
    /// network's filter gives way to the config file's, waiting pings are
    /// answered with what they have, and relays, TCP streams, netcheck and
    /// the port mapping stop.
    fn drop_peers(&mut self, now: Instant) {
        self.follow.clear();
        while let Some(action) = self.follow.poll_action() {
            self.act(now, action);
        }
        self.update_routes(now);
        self.update_dns();
        self.out.push_back(Output::Filter(None));
        while let Some((id, round)) = self.pings.take_any() {
            self.out.push_back(Output::PingDone { id, round });
        }
        self.addrs.clear();
        self.relay_map = RelayMap::default();
        self.home = None;
        self.disc.stop();
        self.netcheck_asked = false;
        self.timers.clear_all();
        self.out.push_back(Output::Relay(RelayCmd::Clear));
        self.out.push_back(Output::TcpClear);
        self.out.push_back(Output::StopPortmap);
    }

    /// One event of the map stream (`None`: the stream ended): the
    /// follower decides what it means; this carries its actions out.
    pub fn handle_map(&mut self, now: Instant, ev: Option<MapEvent>) {
        self.clock(now);
        // Names are rebuilt from the whole map (sorted), so a change that
        // cannot touch them (a peer's endpoints, its presence: most of a
        // coordinator restart's storm) skips that: at 10,000 peers it was
        // most of a delta's cost (`examples/agent_map_bench.rs`).
        let names_kept = match &ev {
            Some(MapEvent::PeerChanged(p)) => {
                self.follow.peers().get(&p.key).is_some_and(|old| {
                    old.name == p.name && old.ipv4 == p.ipv4 && old.ipv6 == p.ipv6
                })
            }
            _ => false,
        };
        self.follow.handle_map(ev);
        while let Some(action) = self.follow.poll_action() {
            self.act(now, action);
        }
        self.update_routes(now);
        if !names_kept {
            self.update_dns();
        }
    }

    fn act(&mut self, now: Instant, action: MapAction) {
        match action {
            MapAction::PinPrefix(net) => self.out.push_back(Output::PinPrefix(net)),
            MapAction::SetAddresses { v4, v6 } => self.set_addresses(v4, v6),
            MapAction::AddressesRefused(e) => {
                tracing::error!(error = %e, "refusing the addresses the coordinator assigned");
                if let Some(c) = self.control.as_mut() {
                    c.last_error = Some(format!("refused the assigned addresses: {e}"));
                }
            }
            MapAction::SetName(name) => {
                if let Some(c) = self.control.as_mut() {
                    c.name = Some(name);
                }
            }
            MapAction::MapReceived => {
                if let Some(c) = self.control.as_mut() {
                    c.map_received = true;
                }
            }
            MapAction::SetRelayMap(map) => self.set_relay_map(map),
            MapAction::SetFilter(filter) => {
                tracing::info!(
                    rules = filter.as_ref().and_then(|f| f.rules()).map(<[_]>::len),
                    "packet filter from the map"
                );
                self.out.push_back(Output::Filter(filter));
            }
            MapAction::UpsertPeer(p) => self.add_peer(now, &p),
            MapAction::RemovePeer(k) => {
                tracing::info!(peer = %k.short(), "peer removed");
                self.node.remove_peer(now, &k);
                self.direct_since.remove(&k);
                self.traffic.remove(&k);
                self.out.push_back(Output::Relay(RelayCmd::RemovePeer(k)));
                self.out.push_back(Output::RemovePeer(k));
            }
            MapAction::Connected => {
                if let Some(c) = self.control.as_mut() {
                    c.state = MeshState::Running;
                    c.last_error = None;
                }
            }
            MapAction::Disconnected { reason, retry_in } => {
                tracing::info!(%reason, ?retry_in, "coordinator unreachable; keeping the last map");
                if let Some(c) = self.control.as_mut() {
                    c.state = MeshState::Reconnecting;
                    c.last_error = Some(reason);
                }
            }
            MapAction::Leave(reason) => self.revoked(now, reason),
        }
    }

    /// The coordinator no longer accepts this node.
    pub fn revoked(&mut self, now: Instant, reason: String) {
        if self.control.is_none() {
            return;
        }
        tracing::warn!(%reason, "the coordinator no longer accepts this node; run `warren up --token`");
        self.leave(now);
        self.out.push_back(Output::Revoked(reason));
    }

    /// Brings a peer the follower accepted into the data plane, traversal
    /// and the relays. A replaced data-plane peer starts on the path
    /// traversal already knows.
    fn add_peer(&mut self, now: Instant, p: &MapPeer) {
        let mut spec = PeerSpec::new(p.key, crate::control::follow::allowed_ips(p));
        spec.managed = true;
        self.node.upsert_peer(now, PeerInfo::from_map(p, p.nat));
        self.out.push_back(Output::Relay(RelayCmd::PeerRegion {
            peer: p.key,
            region: p.home_relay,
        }));
        let path = self.node.path(&p.key);
        self.note_path(now, p.key, path);
        self.out.push_back(Output::AddPeer { spec, path });
    }

    /// This node's overlay addresses (the follower checked them against
    /// the overlay and the pinned /48, `control::bounds`).
    fn set_addresses(&mut self, v4: Ipv4Addr, v6: Ipv6Addr) {
        let Some(c) = self.control.as_mut() else {
            return;
        };
        c.addresses = vec![IpAddr::V4(v4), IpAddr::V6(v6)];
        self.out.push_back(Output::Addresses { v4, v6 });
    }

    fn set_relay_map(&mut self, map: RelayMap) {
        let changed = map != self.relay_map;
        if changed {
            self.relay_map = map.clone();
            self.out.push_back(Output::Relay(RelayCmd::Map(map)));
            if self.home().is_some_and(|h| self.region_name(h).is_none()) {
                self.home = None;
            }
        }
        if self.home.is_none() {
            // Relay from the first packet: the first region until netcheck
            // has measured which is nearest.
            if let Some(first) = self.relay_map.regions.first().map(|r| r.id) {
                self.set_home(first, false);
            }
        }
        if changed {
            self.out.push_back(Output::StartPortmap);
            self.want_netcheck();
        }
    }

    /// Gives traversal this node's candidates and NAT, and publishes them
    /// (with the home relay) to the coordinator.
    pub(super) fn publish_local(&mut self, now: Instant, netcheck: Option<Box<Report>>) {
        let candidates = self.disc.candidates(&self.host);
        let nat = self.disc.nat();
        self.node
            .set_local(now, candidates.iter().map(Into::into).collect(), nat);
        self.publish_tcp(now);
        let report = EndpointsReport {
            endpoints: candidates,
            netcheck: None,
            nat,
            home_relay: self.home(),
        };
        self.report(report, netcheck);
    }

    /// Sends `report` unless it is what the coordinator already has; one
    /// request at a time, the newest wins.
    fn report(&mut self, report: EndpointsReport, netcheck: Option<Box<Report>>) {
        let Some(c) = self.control.as_mut() else {
            return;
        };
        let same = |a: &EndpointsReport, b: &EndpointsReport| {
            a.endpoints == b.endpoints && a.nat == b.nat && a.home_relay == b.home_relay
        };
        if c.reported.as_ref().is_some_and(|r| same(r, &report)) {
            c.pending = None;
            return;
        }
        if c.reporting {
            c.pending = Some((report, netcheck));
            return;
        }
        c.reporting = true;
        self.out.push_back(Output::Report { report, netcheck });
    }

    /// The coordinator answered the report `Output::Report` sent.
    pub fn handle_reported(
        &mut self,
        now: Instant,
        report: EndpointsReport,
        result: Result<(), ReportFailed>,
    ) {
        self.clock(now);
        let Some(c) = self.control.as_mut() else {
            return;
        };
        c.reporting = false;
        match result {
            Ok(()) => c.reported = Some(report),
            Err(e) if e.permanent => return self.revoked(now, e.message),
            Err(e) => {
                // A newer report goes now; else the next netcheck (or
                // address change) retries.
                tracing::info!(error = %e.message, "reporting endpoints failed; will retry");
            }
        }
        if let Some((report, netcheck)) = self.control.as_mut().and_then(|c| c.pending.take()) {
            self.report(report, netcheck);
        }
    }
}
