//! The agent state: everything the agent decides about this node and its
//! peers, with no IO, no tokio and no clock (docs/architecture.md, "The
//! agent state").
//!
//! It owns the traversal core ([`Node`]: disco, per-peer path choice, hard
//! NAT methods, direct TCP proof), the map follower ([`Follower`]: what
//! the coordinator's map asks), endpoint discovery (the netcheck run,
//! [`discovery`]), the home relay choice (`netcheck::home`), the control
//! session's state (joined, following, reports in flight: [`control`]),
//! `warren ping` rounds ([`ping`]) and its own deadlines ([`timers`]).
//! The driver (`agent::mesh`) turns IO into `handle_*` calls, asks
//! [`AgentState::poll_timeout`] when to call `handle_timeout`, and carries
//! out every [`Output`] from [`AgentState::poll_output`]: datagrams for a
//! socket, a relay or a TCP stream, peers and paths for the data plane,
//! relay and TCP commands, reports for the coordinator, answers for the
//! local API.
//!
//! `now` comes in with every input and is kept (like quinn-proto's
//! `Connection`) so that `poll_output` can run the sub-machines that need
//! it. Randomness comes from a seed, so the simulator replays a run.
//!
//! What stays outside, on purpose: WireGuard sessions and the packet
//! filter live in the data plane (`dataplane`), read by the packet tasks
//! without this state's lock (docs/architecture.md, "How one packet
//! goes"); relay client sessions live in their connections' tasks, whose
//! pumps open relayed WireGuard themselves. Both are sans-IO machines of
//! their own (`dataplane::wg`, `proto::relay::client`), and the simulator
//! drives them beside this one.

pub mod control;
pub mod discovery;
mod names;
mod output;
pub mod ping;
mod subnets;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_routes;
pub mod timers;
mod view;

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{RngCore, SeedableRng};

pub use output::{Output, RelayCmd};
pub use view::wall_clock;

use crate::control::follow::Follower;
use crate::control::types::{Endpoint, RelayMap};
use crate::dataplane::peer::Peer as DataPeer;
use crate::keys::NodeKey;
use crate::path::{Path, SocketId};
use crate::proto::disco::DiscoSecret;
use crate::traversal::node::{Datagram, Node, NodeEvent};
use control::Control;
use discovery::{Discovery, Sources, RESTUN_INTERVAL};
use ping::{PingRefused, Pings};
use timers::{Timer, Timers};

/// How often housekeeping runs (traffic notes, idle relays, the view).
pub const TICK: Duration = Duration::from_secs(1);
/// The host's addresses are compared every this many ticks.
const ADDR_CHECK_TICKS: u64 = 2;

/// What the agent state is built with.
#[derive(Debug, Clone)]
pub struct Settings {
    pub traversal: crate::traversal::Config,
    /// The direct TCP path's listening port; 0: no TCP path.
    pub tcp_port: u16,
}

/// See the module doc.
#[derive(Debug)]
pub struct AgentState {
    node: Node,
    disco_key: NodeKey,
    follow: Follower,
    disc: Discovery,
    /// The relay regions, and the home region with whether a netcheck's
    /// latencies chose it (only then does it get `choose_home`'s
    /// hysteresis).
    relay_map: RelayMap,
    home: Option<(u16, bool)>,
    /// `None`: not joined to any network.
    control: Option<Control>,
    pings: Pings,
    /// When each peer's path last turned direct.
    direct_since: HashMap<NodeKey, Instant>,
    /// Per peer, the data plane's activity and sealed counters at the last
    /// look (`handle_traffic`).
    traffic: HashMap<NodeKey, (u64, u64)>,
    /// What the driver last read of the host: its addresses and the port
    /// mapping (for the candidates).
    host: discovery::HostView,
    /// The host's addresses at the last address check (for noticing a
    /// change, and for the TCP candidates).
    addrs: Vec<Endpoint>,
    /// Our TCP port as the STUN server saw it.
    tcp_public: Option<SocketAddr>,
    tcp_port: u16,
    ticks: u64,
    /// `--accept-routes`, the route choice, the subnet routes in use and
    /// those this node serves (`subnets.rs`).
    accept_routes: bool,
    routes: crate::routes::Routes,
    subnets: Vec<(ipnet::IpNet, NodeKey)>,
    served: Vec<ipnet::IpNet>,
    /// `--exit-node` and `--exit-node-allow-lan-access`, this host's own
    /// networks, the LAN kept off the tunnel, and why the chosen exit node
    /// carries nothing (for `status`).
    exit_node: Option<NodeKey>,
    allow_lan: bool,
    local_nets: Vec<ipnet::IpNet>,
    lan_bypass: Vec<ipnet::IpNet>,
    exit_problem: Option<String>,
    exit_blocked: bool,
    /// The names last given to the resolver (`names.rs`).
    dns: crate::dns::DnsView,
    /// `Output::Netcheck` went out and `start_netcheck` has not answered.
    netcheck_asked: bool,
    timers: Timers,
    rng: StdRng,
    out: VecDeque<Output>,
    /// The latest `now` an input brought.
    now: Option<Instant>,
}

impl AgentState {
    pub fn new(settings: Settings, key: NodeKey, disco: DiscoSecret, seed: u64) -> AgentState {
        let disco_key = NodeKey(disco.public().0);
        AgentState {
            node: Node::new(settings.traversal, key, disco, seed),
            disco_key,
            follow: Follower::new(key, None),
            disc: Discovery::default(),
            relay_map: RelayMap::default(),
            home: None,
            control: None,
            pings: Pings::default(),
            direct_since: HashMap::new(),
            traffic: HashMap::new(),
            host: discovery::HostView::default(),
            addrs: Vec::new(),
            tcp_public: None,
            tcp_port: settings.tcp_port,
            ticks: 0,
            accept_routes: false,
            routes: crate::routes::Routes::default(),
            subnets: Vec::new(),
            served: Vec::new(),
            exit_node: None,
            allow_lan: false,
            local_nets: Vec::new(),
            lan_bypass: Vec::new(),
            exit_problem: None,
            exit_blocked: false,
            dns: crate::dns::DnsView::default(),
            netcheck_asked: false,
            timers: Timers::default(),
            rng: StdRng::seed_from_u64(seed ^ 0x5851_f42d_4c95_7f2d),
            out: VecDeque::new(),
            now: None,
        }
    }

    /// The disco key peers must know to talk to this node.
    pub fn disco_key(&self) -> NodeKey {
        self.disco_key
    }

    /// The traversal core, for status and counters.
    pub fn node(&self) -> &Node {
        &self.node
    }

    /// The peers as the map describes them.
    pub fn follower(&self) -> &Follower {
        &self.follow
    }

    pub fn relay_map(&self) -> &RelayMap {
        &self.relay_map
    }

    pub fn home(&self) -> Option<u16> {
        self.home.map(|(id, _)| id)
    }

    fn clock(&mut self, now: Instant) {
        self.now = Some(self.now.map_or(now, |t| t.max(now)));
    }

    /// The earliest moment `handle_timeout` has work.
    pub fn poll_timeout(&self) -> Option<Instant> {
        [
            self.timers.next(),
            self.node.poll_timeout().map(|(t, _)| t),
            self.disc.poll_timeout(),
            // Derived: a round is answered by `poll_output` once due.
            self.pings.deadline(),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        self.clock(now);
        self.node.handle_timeout(now);
        self.disc.handle_timeout(now);
        while let Some(timer) = self.timers.expired(now) {
            match timer {
                Timer::Housekeeping => {
                    self.ticks += 1;
                    let addresses = self.ticks % ADDR_CHECK_TICKS == 0;
                    self.out.push_back(Output::Housekeep { addresses });
                    self.timers.set(Timer::Housekeeping, now + TICK);
                    // Hold-downs end with time, not only with map events.
                    self.update_routes(now);
                }
                Timer::Netcheck => {
                    if self.control.as_ref().is_some_and(|c| c.following) && !self.disc.is_running()
                    {
                        self.want_netcheck();
                    }
                }
            }
        }
    }

    /// The next thing for the driver to do.
    pub fn poll_output(&mut self) -> Option<Output> {
        loop {
            if let Some(o) = self.out.pop_front() {
                return Some(o);
            }
            let now = self.now?;
            if let Some((to, bytes)) = self.disc.poll_transmit(now) {
                return Some(Output::Stun { to, bytes });
            }
            if let Some(report) = self.disc.poll_report() {
                self.on_netcheck(now, report);
                continue;
            }
            if self.disc.udp_blocked_changed() {
                // Netcheck suspects (or no longer suspects) a blocked UDP
                // before its report: the TCP path need not wait for it.
                self.publish_tcp(now);
                tracing::info!(
                    udp_blocked = self.disc.udp_blocked(),
                    "netcheck: provisional UDP verdict"
                );
                continue;
            }
            if let Some(t) = self.node.poll_transmit() {
                return Some(Output::Disco(t));
            }
            if let Some(ev) = self.node.poll_event() {
                self.on_node_event(now, ev);
                continue;
            }
            if let Some((id, round)) = self.pings.poll_done(now) {
                return Some(Output::PingDone { id, round });
            }
            return None;
        }
    }

    fn on_node_event(&mut self, now: Instant, ev: NodeEvent) {
        match ev {
            NodeEvent::PathChanged {
                peer,
                from,
                to,
                reason,
            } => {
                tracing::info!(peer = %peer.short(), %from, %to, ?reason, "path changed");
                self.note_path(now, peer, to);
                self.out.push_back(Output::Path {
                    peer,
                    from,
                    path: to,
                    reason,
                });
            }
            NodeEvent::OpenSockets { count } => self.out.push_back(Output::OpenSockets { count }),
            NodeEvent::CloseSockets { keep } => self.out.push_back(Output::CloseSockets { keep }),
            NodeEvent::PingReply {
                peer,
                round,
                path,
                rtt,
            } => {
                let region = self.peer_region(&peer).and_then(|r| self.region_name(r));
                self.pings.reply(now, (peer, round), path, region, rtt);
            }
            NodeEvent::TcpConnect {
                peer,
                targets,
                until,
            } => {
                // Traversal already left out our own addresses.
                tracing::info!(peer = %peer.short(), ?targets, "direct tcp: dialling");
                self.out.push_back(Output::TcpDial {
                    peer,
                    targets,
                    until,
                });
            }
            NodeEvent::TcpClose { addr } => self.out.push_back(Output::TcpClose(addr)),
        }
    }

    fn note_path(&mut self, now: Instant, peer: NodeKey, path: Path) {
        if path == Path::Relay {
            self.direct_since.remove(&peer);
        } else {
            self.direct_since.entry(peer).or_insert(now);
        }
    }

    /// A datagram on a UDP socket that is not WireGuard (the readers keep
    /// that): disco goes to traversal, STUN on the primary socket to
    /// netcheck. Says what it was.
    pub fn handle_udp(
        &mut self,
        now: Instant,
        socket: SocketId,
        from: SocketAddr,
        bytes: &[u8],
    ) -> Datagram {
        self.clock(now);
        let kind = self.node.handle_udp(now, socket, from, bytes);
        tracing::trace!(socket = socket.0, %from, len = bytes.len(), ?kind, "datagram in");
        if kind == Datagram::Stun && socket == SocketId::PRIMARY {
            self.disc.handle_stun(now, from, bytes);
        }
        kind
    }

    /// A packet a relay delivered from `from` that its pump did not open:
    /// disco is consumed; `WireGuard` is the driver's to open.
    pub fn handle_relay(&mut self, now: Instant, from: NodeKey, bytes: &[u8]) -> Datagram {
        self.clock(now);
        self.node.handle_relay(now, from, bytes)
    }

    /// A direct TCP stream to `addr` is up: `peer` when we dialled it for
    /// that peer, `None` when it was accepted. Traversal closes it unless
    /// a peer proves it its own in time.
    pub fn handle_tcp_up(&mut self, now: Instant, addr: SocketAddr, peer: Option<NodeKey>) {
        self.clock(now);
        match peer {
            Some(peer) => self.node.tcp_connected(now, peer, addr),
            None => self.node.tcp_accepted(now, addr),
        }
    }

    /// A frame on the TCP stream to `addr` that its reader did not open.
    /// Returns what it was and the peer that owns the stream now (a disco
    /// message may just have proven it).
    pub fn handle_tcp_frame(
        &mut self,
        now: Instant,
        addr: SocketAddr,
        bytes: &[u8],
    ) -> (Datagram, Option<NodeKey>) {
        self.clock(now);
        let what = self.node.handle_tcp(now, addr, bytes);
        (what, self.node.tcp_owner(addr))
    }

    pub fn handle_tcp_closed(&mut self, now: Instant, addr: SocketAddr) {
        self.clock(now);
        self.node.tcp_closed(now, addr);
    }

    /// The STUN query over TCP answered: our TCP port as seen from
    /// outside (`None`: it failed), after `took`.
    pub fn handle_tcp_stun(&mut self, now: Instant, seen: Option<SocketAddr>, took: Duration) {
        self.clock(now);
        if let Some(public) = seen {
            // Lets netcheck read UDP's silence early (see discovery).
            self.disc.handle_tcp_answer(took, public);
        }
        if seen != self.tcp_public {
            tracing::info!(public = ?seen, "direct tcp: public address");
            self.tcp_public = seen;
            self.publish_tcp(now);
        }
    }

    /// The extra sockets `OpenSockets` asked for: `count` of them opened.
    pub fn sockets_opened(&mut self, now: Instant, count: u16) {
        self.clock(now);
        self.node.sockets_opened(now, count);
    }

    /// Tells traversal which peers had packets since the last look (the
    /// driver calls this at `Housekeep` and when a quiet peer's first
    /// packet wakes it): heartbeats run only while packets flow, and only
    /// what we sent may start the hard-NAT methods.
    pub fn handle_traffic<'a>(
        &mut self,
        now: Instant,
        peers: impl IntoIterator<Item = &'a DataPeer>,
    ) {
        self.clock(now);
        for p in peers.into_iter().filter(|p| p.spec.managed) {
            // A new peer starts at zero: being added is not traffic.
            let (seen, seen_sealed) = self.traffic.get(&p.key).copied().unwrap_or((0, 0));
            let cur = p.poll_activity(seen);
            if cur != seen {
                let sealed = p.sealed();
                self.traffic.insert(p.key, (cur, sealed));
                if sealed != seen_sealed {
                    self.node.note_traffic(now, &p.key);
                } else {
                    self.node.note_received(now, &p.key);
                }
            }
        }
    }

    /// The host's own addresses on the listen port, read at a
    /// `Housekeep { addresses: true }`. A change re-discovers paths and
    /// runs netcheck again.
    pub fn handle_host(&mut self, now: Instant, endpoints: Vec<Endpoint>) {
        self.clock(now);
        self.host.endpoints.clone_from(&endpoints);
        if !self.control.as_ref().is_some_and(|c| c.following) || endpoints == self.addrs {
            return;
        }
        let first = self.addrs.is_empty();
        if !first {
            tracing::info!("local addresses changed; re-discovering paths");
            self.node.network_changed(now);
        }
        self.addrs = endpoints;
        // The first look (the driver's, as it starts following) needs no
        // run of its own when one is asked for or under way (it takes the
        // addresses when it starts), when there is no relay map yet (the
        // map's arrival starts one), or when UDP already looks blocked (a
        // restart would only push that verdict back, and the TCP
        // candidates are what peers need now).
        let covered = self.netcheck_asked
            || self.disc.is_running()
            || self.relay_map.regions.is_empty()
            || self.disc.udp_blocked();
        if first && covered {
            self.publish_tcp(now);
        } else {
            self.want_netcheck();
        }
    }

    /// The host's network moved under us (an address or route changed):
    /// every direct path is doubted and rediscovered, and netcheck runs
    /// again. `handle_host` calls this itself when the addresses differ.
    pub fn handle_network_changed(&mut self, now: Instant) {
        self.clock(now);
        tracing::info!("network changed; re-discovering paths");
        self.node.network_changed(now);
        self.want_netcheck();
    }

    /// The traversal core, to set up a moment no input can express (the
    /// simulator's "before netcheck" scenario). Not for the agent.
    #[doc(hidden)]
    pub fn node_mut(&mut self) -> &mut Node {
        &mut self.node
    }

    /// The port mapping's public address, as the mapper holds it now.
    pub fn set_portmapped(&mut self, mapped: Option<Endpoint>) {
        self.host.portmapped = mapped;
    }

    /// `warren ping`: starts a round to `peer`; `Output::PingDone` with
    /// the returned id answers it.
    pub fn ping(
        &mut self,
        now: Instant,
        peer: NodeKey,
        timeout: Duration,
    ) -> Result<u64, PingRefused> {
        self.clock(now);
        if self.pings.is_full() {
            return Err(PingRefused::Busy);
        }
        let round = self.node.ping(now, &peer).ok_or(PingRefused::UnknownPeer)?;
        Ok(self.pings.wait(peer, round, now + timeout))
    }

    /// The relay region a relayed packet to `peer` goes through: its home
    /// region from the map if we know it, else ours.
    pub fn peer_region(&self, peer: &NodeKey) -> Option<u16> {
        self.follow
            .peer(peer)
            .and_then(|p| p.home_relay)
            .filter(|r| self.relay_map.regions.iter().any(|x| x.id == *r))
            .or(self.home())
    }

    pub fn region_name(&self, id: u16) -> Option<String> {
        self.relay_map
            .regions
            .iter()
            .find(|r| r.id == id)
            .map(|r| r.name.clone())
    }

    /// `warren netcheck`: a run now, unless one is running; its report
    /// comes as `Output::NetcheckDone`.
    pub fn request_netcheck(&mut self, now: Instant) {
        self.clock(now);
        if !self.disc.is_running() {
            self.want_netcheck();
        }
    }

    /// Asks the driver for what a netcheck run needs (this host's source
    /// addresses), and the STUN server over TCP for our TCP port.
    fn want_netcheck(&mut self) {
        let stun = self.relay_map.regions.iter().find_map(|r| r.stun.first());
        if let Some(server) = stun {
            self.out.push_back(Output::TcpStun(*server));
        }
        let (v4, v6) = discovery::first_servers(&self.relay_map);
        if v4.is_none() && v6.is_none() {
            // No STUN server: host and port-mapped candidates still count,
            // and are published again on the same schedule.
            if let Some(now) = self.now {
                self.timers.set(Timer::Netcheck, now + RESTUN_INTERVAL);
                self.publish_local(now, None);
            }
            self.out.push_back(Output::NetcheckDone(None));
            return;
        }
        if !self.netcheck_asked {
            self.netcheck_asked = true;
            self.out.push_back(Output::Netcheck { v4, v6 });
        }
    }

    /// Starts the netcheck run `Output::Netcheck` asked for, with this
    /// host's source addresses towards the first STUN servers and its
    /// addresses now (the run's `host` candidates).
    pub fn start_netcheck(&mut self, now: Instant, local: Sources, endpoints: Vec<Endpoint>) {
        self.clock(now);
        self.netcheck_asked = false;
        self.host.endpoints = endpoints;
        let seed = self.rng.next_u64();
        // The next run is due a minute after this one started.
        self.timers.set(Timer::Netcheck, now + RESTUN_INTERVAL);
        if !self.disc.start(now, &self.relay_map, local, seed) {
            self.publish_local(now, None);
            self.out.push_back(Output::NetcheckDone(None));
        }
    }

    /// A finished run: the home relay by latency, the answer for waiting
    /// requests, and our candidates to traversal and the coordinator.
    fn on_netcheck(&mut self, now: Instant, report: crate::netcheck::Report) {
        let latency = self.disc.region_latency();
        let measured = self.home.filter(|(_, m)| *m).map(|(id, _)| id);
        if let Some(home) = crate::netcheck::home::choose_home(measured, &latency) {
            if self.home() != Some(home) {
                let rtt = latency.iter().find(|(id, _)| *id == home).map(|(_, l)| *l);
                tracing::info!(region = home, ?rtt, "home relay chosen by latency");
            }
            self.set_home(home, true);
        }
        let report = Box::new(report);
        self.out
            .push_back(Output::NetcheckDone(Some(report.clone())));
        self.publish_local(now, Some(report));
    }

    fn set_home(&mut self, id: u16, measured: bool) {
        if !self.relay_map.regions.iter().any(|r| r.id == id) || self.home == Some((id, measured)) {
            return;
        }
        self.home = Some((id, measured));
        self.out
            .push_back(Output::Relay(RelayCmd::Home { id, measured }));
    }

    /// Gives traversal our TCP candidates: the host addresses on the
    /// listening port and the public address STUN saw, and whether netcheck
    /// found (or already suspects) UDP blocked, which is when they are
    /// published unasked.
    fn publish_tcp(&mut self, now: Instant) {
        use crate::proto::disco::{Candidate, CandidateKind, Transport};
        let udp_blocked = self.disc.tell_udp_blocked();
        let port = self.tcp_port;
        if port == 0 {
            return;
        }
        let tcp = |addr, kind| Candidate {
            addr,
            kind,
            transport: Transport::Tcp,
        };
        let mut cands: Vec<Candidate> = Vec::new();
        cands.extend(
            self.tcp_public
                .map(|a| tcp(a, CandidateKind::ServerReflexive)),
        );
        for e in self.addrs.iter().filter(|e| e.addr.is_ipv4()) {
            let c = tcp(SocketAddr::new(e.addr.ip(), port), CandidateKind::Host);
            if !cands.iter().any(|k| k.addr == c.addr) {
                cands.push(c);
            }
        }
        self.node.set_tcp_local(now, cands, udp_blocked);
    }
}
