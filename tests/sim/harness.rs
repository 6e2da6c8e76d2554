//! Drives whole agent states ([`AgentState`]) over the simulated network
//! the way the agent's tokio driver (`agent::mesh`) does over real sockets:
//! datagrams, map events and timeouts in, every `Output` carried out, and a
//! virtual clock that jumps straight to the next deadline (the next packet,
//! the next state or relay timer, or the next application tick). Each node
//! joins as the agent does: a registration with the world's relay map, a
//! full map, the state's own netcheck runs (at join and every minute) with
//! their probes through the node's NAT to the world's STUN servers, and
//! its endpoint reports, which the harness turns into the node's map entry
//! as the coordinator would, and hands to the peers that have it.
//!
//! Each node also has a real data plane ([`DataPlane`]: WireGuard sessions
//! behind the seam that takes `now`, `dataplane::wg`) and plays a tiny
//! application that sends an IP packet to each of its peers every 200 ms.
//! The packet is sealed by the peer's session and leaves on the path the
//! data plane holds, which the harness sets from the core's `PathChanged`
//! events as the agent's driver does; WireGuard's own timers run on the
//! same tick. A packet counts as received only once the receiver's session
//! opened it, so tests check where real traffic flows, handshakes
//! included, not just what the state machine says. Every disco datagram
//! delivered and every direct path used is also shown to the reference
//! [`Model`], which records what it allows. Relayed traffic goes through
//! each node's real relay client session (`proto::relay::client`) and the
//! relay server's half of the protocol in [`crate::relay`]. Direct TCP is
//! modelled too: every node listens on its UDP port's number, its TCP
//! candidates come from the world's TCP NAT tables, a `TcpConnect` sends a
//! SYN to every target each 1.1 s (as the agent's dial task) and a SYN
//! passes a NAT only where the host behind it already sent one out to
//! that source (simultaneous open); streams carry frames in order.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use std::net::Ipv6Addr;

use rand::rngs::StdRng;
use rand::{RngCore, SeedableRng};
use warren::agent::state::discovery::Sources;
use warren::agent::state::{AgentState, Output, Settings};
use warren::control::follow::MapEvent;
use warren::control::netmap::NetMap;
use warren::control::types::{
    Endpoint, EndpointKind, Peer as MapPeer, RegisterResponse, RelayMap, RelayRegion,
};
use warren::dataplane::packet::build::ipv4;
use warren::dataplane::DataPlane;
use warren::keys::{NodeKey, PrivateKey};
use warren::proto::disco::DiscoSecret;
use warren::proto::relay::client::{ClientEvent, ClientSession, SessionConfig};
use warren::traversal::node::{Datagram, Node, NodeEvent, PeerInfo};
use warren::traversal::{Config, Path, SocketId};

use crate::model::Model;
use crate::net::{Delivery, World};
use crate::relay::SimRelay;
use crate::wire::{Dial, Stream, Via};

pub const PORT: u16 = 41641;
const EXTRA_BASE: u16 = 42000;
const STUN1: &str = "192.0.2.10:3478";
const STUN2: &str = "192.0.2.11:3478";

pub struct SimNode {
    pub host: usize,
    pub key: NodeKey,
    /// The node's whole agent state.
    pub state: AgentState,
    /// The node's WireGuard sessions and their paths.
    pub dp: DataPlane,
    /// The node's overlay address.
    pub ip: Ipv4Addr,
    /// Extra sockets: index `i` is socket id `i + 1`; `None` once closed.
    pub(crate) extra: Vec<Option<u16>>,
    pub peers: Vec<NodeKey>,
    /// The node's map entry, from its last endpoints report (what the
    /// coordinator would send its peers), and that entry as traversal
    /// reads it.
    pub record: Option<MapPeer>,
    pub info: Option<PeerInfo>,
    /// A netcheck run the state started has not reported yet.
    pub(crate) netchecking: bool,
    /// The node's real relay client session, to the world's one relay.
    pub(crate) relay: ClientSession,
    /// What traversal decided, rebuilt from the state's outputs (path
    /// changes with their reasons, sockets, TCP dials and closes).
    pub events: Vec<(Instant, NodeEvent)>,
    /// Data packets the node's sessions opened, by the path they came on.
    pub rx_direct: u64,
    pub rx_relay: u64,
    pub rx_tcp: u64,
    /// Authenticated WireGuard messages of any kind (handshakes and
    /// keepalives too) that came over the relay.
    pub wg_relay: u64,
    pub traffic: bool,
}

impl SimNode {
    /// The node's traversal core.
    pub fn node(&self) -> &Node {
        self.state.node()
    }

    pub(crate) fn port_of(&self, s: SocketId) -> Option<u16> {
        match s.0 {
            0 => Some(PORT),
            i => self.extra.get(usize::from(i) - 1).copied().flatten(),
        }
    }

    fn socket_of(&self, port: u16) -> Option<SocketId> {
        if port == PORT {
            return Some(SocketId::PRIMARY);
        }
        let i = self.extra.iter().position(|p| *p == Some(port))?;
        Some(SocketId(u16::try_from(i + 1).ok()?))
    }

    /// Time from `since` to the first switch to a direct path to `peer`.
    pub fn time_to_direct(&self, peer: NodeKey, since: Instant) -> Option<Duration> {
        self.events.iter().find_map(|(t, e)| match e {
            NodeEvent::PathChanged {
                peer: p,
                to: Path::Direct(_),
                ..
            } if *p == peer => Some(t.duration_since(since)),
            _ => None,
        })
    }

    /// Number of path changes towards `peer`.
    pub fn changes(&self, peer: NodeKey) -> usize {
        self.events
            .iter()
            .filter(|(_, e)| matches!(e, NodeEvent::PathChanged { peer: p, .. } if *p == peer))
            .count()
    }
}

pub struct Sim {
    pub world: World,
    pub nodes: Vec<SimNode>,
    pub cfg: Config,
    pub model: Model,
    /// The trust window the model enforces; `None`: the core's own
    /// (`cfg.trust`). A shorter one proves the check can fail.
    pub model_trust: Option<Duration>,
    /// The relay every node connects to.
    pub relay: SimRelay,
    pub(crate) streams: Vec<Stream>,
    pub(crate) dials: Vec<Dial>,
    rng: StdRng,
    tick: Duration,
    next_tick: Instant,
}

impl Sim {
    pub fn new(seed: u64) -> Self {
        let t0 = Instant::now();
        let mut world = World::new(seed, t0);
        world.stun_servers = vec![STUN1.parse().unwrap(), STUN2.parse().unwrap()];
        Sim {
            world,
            nodes: Vec::new(),
            cfg: Config::default(),
            model: Model::default(),
            model_trust: None,
            relay: SimRelay::new(PrivateKey::from_bytes([0x5e; 32])),
            streams: Vec::new(),
            dials: Vec::new(),
            rng: StdRng::seed_from_u64(seed ^ 0x5eed),
            tick: Duration::from_millis(200),
            next_tick: t0,
        }
    }

    pub fn now(&self) -> Instant {
        self.world.now
    }

    /// A node on `host`: runs netcheck and connects to the relay, and
    /// returns once both are done.
    pub fn add_node(&mut self, host: usize) -> usize {
        let i = self.nodes.len();
        // Seeded keys, in increasing order like the nodes (as the fixed
        // keys the scenarios were written with were), so that whichever
        // tie-break compares keys sees the same order.
        let wg = loop {
            let mut b = [0u8; 32];
            self.rng.fill_bytes(&mut b);
            let k = PrivateKey::from_bytes(b);
            if self.nodes.last().is_none_or(|n| k.public() > n.key) {
                break k;
            }
        };
        let key = wg.public();
        // The relay session pins the relay's key, as the map's would.
        let session = SessionConfig {
            expected_relay_key: Some(self.relay.key()),
            ..SessionConfig::default()
        };
        let relay = ClientSession::new(wg.clone(), session, self.now());
        let dp = DataPlane::new(wg, self.now());
        let ip = Ipv4Addr::new(100, 64, 0, i as u8 + 1);
        let mut secret_bytes = [0u8; 32];
        self.rng.fill_bytes(&mut secret_bytes);
        self.model.add_node(secret_bytes, key);
        let secret = DiscoSecret::from_bytes(secret_bytes);
        let settings = Settings {
            traversal: self.cfg.clone(),
            // Every node listens for direct TCP on its UDP port's number.
            tcp_port: PORT,
        };
        let state = AgentState::new(settings, key, secret, 1000 + i as u64);
        self.nodes.push(SimNode {
            host,
            key,
            state,
            dp,
            ip,
            extra: Vec::new(),
            peers: Vec::new(),
            record: None,
            info: None,
            netchecking: false,
            relay,
            events: Vec::new(),
            rx_direct: 0,
            rx_relay: 0,
            rx_tcp: 0,
            wg_relay: 0,
            traffic: true,
        });
        self.join(i);
        // The relay connection opens with the server's hello.
        let hello = self.relay.connect(i);
        self.world.relay_wire(host, i, false, hello);
        self.wait_netcheck(i);
        // As `warren up` waits for its home relay before it reports up.
        for _ in 0..1_000 {
            if self.nodes[i].relay.is_established() {
                return i;
            }
            self.run_for(Duration::from_millis(10));
        }
        panic!("node {i}'s relay session never came up")
    }

    /// The world's one relay region, with both STUN servers.
    fn relay_map(&self) -> RelayMap {
        RelayMap {
            regions: vec![RelayRegion {
                id: 1,
                name: "sim".into(),
                url: "https://relay.sim/relay".into(),
                stun: vec![STUN1.parse().unwrap(), STUN2.parse().unwrap()],
                key: None,
            }],
        }
    }

    /// Node `i` joins as `warren up` makes it: registered, following, and
    /// a full map with no peers yet. Its first netcheck starts at once.
    fn join(&mut self, i: usize) {
        let now = self.now();
        let record = MapPeer {
            node_id: i as i64 + 1,
            key: self.nodes[i].key,
            disco_key: self.nodes[i].state.disco_key(),
            name: format!("n{i}"),
            ipv4: self.nodes[i].ip,
            ipv6: Ipv6Addr::new(0xfd7a, 0x115c, 0xa1e0, 0, 0, 0, 0, i as u16 + 1),
            endpoints: Vec::new(),
            online: true,
            last_seen_ms: 0,
            tags: Vec::new(),
            os: "linux".into(),
            version: String::new(),
            nat: Default::default(),
            home_relay: Some(1),
            routes: vec![],
        };
        let reg = RegisterResponse {
            node_id: record.node_id,
            name: record.name.clone(),
            ipv4: record.ipv4,
            ipv6: record.ipv6,
            ephemeral: false,
            relay_map: self.relay_map(),
        };
        let map = NetMap {
            coordinator_key: self.relay.key(),
            self_node: record.clone(),
            peers: Default::default(),
            relay_map: self.relay_map(),
            packet_filter: None,
            dns: None,
        };
        let n = &mut self.nodes[i];
        n.record = Some(record);
        n.state.begin();
        n.state.registered(now, &reg, false);
        n.state.follow(now, None);
        // As the driver does when it starts following.
        let endpoints = self.host_endpoints(i);
        let n = &mut self.nodes[i];
        n.state.handle_host(now, endpoints);
        n.state.handle_map(
            now,
            Some(MapEvent::Full {
                map,
                from_cache: false,
            }),
        );
    }

    /// Runs netcheck for node `i` again, as `warren netcheck` does, and
    /// returns once its report is in.
    pub fn netcheck(&mut self, i: usize) {
        let now = self.now();
        self.nodes[i].state.request_netcheck(now);
        self.wait_netcheck(i);
    }

    fn wait_netcheck(&mut self, i: usize) {
        self.flush();
        for _ in 0..1_000 {
            if !self.nodes[i].netchecking {
                return;
            }
            self.run_for(Duration::from_millis(10));
        }
        panic!("netcheck of node {i} never finished");
    }

    /// The host addresses of node `i` on the listen port, as the agent
    /// reads them from the kernel.
    fn host_endpoints(&self, i: usize) -> Vec<Endpoint> {
        let h = &self.world.hosts[self.nodes[i].host];
        let mut out = vec![Endpoint {
            addr: SocketAddr::new(IpAddr::V4(h.ip), PORT),
            kind: EndpointKind::Host,
        }];
        if let Some((alias, _)) = h.alias {
            out.push(Endpoint {
                addr: SocketAddr::new(IpAddr::V4(alias), PORT),
                kind: EndpointKind::Host,
            });
        }
        out
    }

    /// An endpoints report from node `i`, as the coordinator takes it: the
    /// node's map entry changes, and the peers that have it hear so.
    fn reported(&mut self, i: usize, report: &warren::control::types::EndpointsReport) {
        let now = self.now();
        let Some(mut record) = self.nodes[i].record.clone() else {
            return;
        };
        record.endpoints.clone_from(&report.endpoints);
        record.nat = report.nat;
        self.nodes[i].info = Some(PeerInfo::from_map(&record, record.nat));
        self.nodes[i].record = Some(record.clone());
        self.nodes[i]
            .state
            .handle_reported(now, report.clone(), Ok(()));
        let key = self.nodes[i].key;
        for j in 0..self.nodes.len() {
            if self.nodes[j].peers.contains(&key) {
                let ev = MapEvent::PeerChanged(record.clone());
                self.nodes[j].state.handle_map(now, Some(ev));
            }
        }
    }

    /// Puts `a` and `b` in each other's map; traffic starts on the next tick.
    pub fn connect(&mut self, a: usize, b: usize) {
        let now = self.now();
        for x in [a, b] {
            assert!(
                self.nodes[x].relay.is_established(),
                "node {x}'s relay session is up before it has peers"
            );
        }
        for (x, y) in [(a, b), (b, a)] {
            let record = self.nodes[y].record.clone().expect("node joined");
            self.nodes[x].peers.push(record.key);
            // A mesh peer: its session starts on the relay and follows the
            // state's path changes, never WireGuard's roaming.
            let ev = MapEvent::PeerAdded(record);
            self.nodes[x].state.handle_map(now, Some(ev));
        }
        self.flush();
    }

    pub(crate) fn index_of(&self, key: &NodeKey) -> Option<usize> {
        self.nodes.iter().position(|n| n.key == *key)
    }

    /// Data packets node `i` received, direct or relayed.
    pub fn rx(&self, i: usize) -> u64 {
        self.nodes[i].rx_direct + self.nodes[i].rx_relay + self.nodes[i].rx_tcp
    }

    pub fn path(&self, a: usize, b: usize) -> Path {
        self.nodes[a].node().path(&self.nodes[b].key)
    }

    /// Carries out every pending output of every node, as the agent's
    /// driver does (`agent::mesh::drain`).
    fn flush(&mut self) {
        for i in 0..self.nodes.len() {
            while let Some(out) = self.nodes[i].state.poll_output() {
                self.carry_out(i, out);
            }
        }
    }

    fn carry_out(&mut self, i: usize, out: Output) {
        let now = self.now();
        let host = self.nodes[i].host;
        let event = |sim: &mut Sim, ev: NodeEvent| sim.nodes[i].events.push((now, ev));
        match out {
            Output::Disco(t) => self.send_from(i, t.dest, t.bytes),
            Output::Stun { to, bytes } => self.world.send(host, PORT, to, bytes),
            Output::Netcheck { .. } => {
                let local = SocketAddr::new(IpAddr::V4(self.world.hosts[host].ip), PORT);
                let sources = Sources {
                    v4: Some(local),
                    v6: None,
                };
                let endpoints = self.host_endpoints(i);
                self.nodes[i].netchecking = true;
                self.nodes[i].state.start_netcheck(now, sources, endpoints);
            }
            Output::TcpStun(server) => {
                // Our TCP port as the server sees it, through the NAT's
                // TCP table.
                let seen = self.world.tcp_out(host, PORT, server);
                self.nodes[i]
                    .state
                    .handle_tcp_stun(now, seen, Duration::from_millis(10));
            }
            Output::NetcheckDone(_) => self.nodes[i].netchecking = false,
            Output::Report { report, .. } => self.reported(i, &report),
            Output::AddPeer { spec, path } => {
                let key = spec.key;
                self.nodes[i].dp.upsert_peer(now, spec);
                if let Some(p) = self.nodes[i].dp.peers().by_key(&key) {
                    p.set_path(path);
                }
            }
            Output::RemovePeer(k) => {
                self.nodes[i].dp.remove_peer(&k);
            }
            Output::Path {
                peer,
                from,
                path,
                reason,
            } => {
                if let Path::Direct(p) = path {
                    let trust = self.model_trust.unwrap_or(self.cfg.trust);
                    self.model
                        .check_direct(now, i, peer, p, trust, "switches to");
                }
                // What the agent's driver does (`apply_path`).
                if let Some(p) = self.nodes[i].dp.peers().by_key(&peer) {
                    p.set_path(path);
                }
                let ev = NodeEvent::PathChanged {
                    peer,
                    from,
                    to: path,
                    reason,
                };
                event(self, ev);
            }
            Output::OpenSockets { count } => {
                let n = &mut self.nodes[i];
                n.extra = (1..=count).map(|s| Some(EXTRA_BASE + s)).collect();
                n.state.sockets_opened(now, count);
                event(self, NodeEvent::OpenSockets { count });
            }
            Output::CloseSockets { keep } => {
                for (idx, slot) in self.nodes[i].extra.iter_mut().enumerate() {
                    if !keep.iter().any(|k| usize::from(k.0) == idx + 1) {
                        *slot = None;
                    }
                }
                event(self, NodeEvent::CloseSockets { keep });
            }
            Output::TcpDial {
                peer,
                targets,
                until,
            } => {
                self.dials.push(Dial {
                    node: i,
                    peer,
                    targets: targets.clone(),
                    until,
                    next: now,
                });
                let ev = NodeEvent::TcpConnect {
                    peer,
                    targets,
                    until,
                };
                event(self, ev);
            }
            Output::TcpClose(addr) => {
                self.close_stream(i, addr);
                event(self, NodeEvent::TcpClose { addr });
            }
            Output::Housekeep { addresses } => {
                self.feed_traffic(i);
                if addresses {
                    let endpoints = self.host_endpoints(i);
                    self.nodes[i].state.handle_host(now, endpoints);
                }
            }
            // The world has one relay, every session to it is up, and
            // there is no TUN, port mapping, login or API to serve.
            _ => {}
        }
    }

    /// Node `i`'s data-plane counters to its state, as the driver does on
    /// a wake and at housekeeping.
    fn feed_traffic(&mut self, i: usize) {
        let now = self.now();
        let n = &mut self.nodes[i];
        let peers = n.dp.peers();
        n.state.handle_traffic(now, peers.iter().map(|p| &**p));
    }

    fn app_tick(&mut self) {
        let now = self.now();
        let mut buf = vec![0u8; 2048];
        for i in 0..self.nodes.len() {
            // WireGuard's timers (handshake retries, keepalives, rekeys),
            // as the agent's 250 ms timer task runs them.
            let peers: Vec<_> = self.nodes[i].dp.peers().iter().cloned().collect();
            for p in &peers {
                let sealed = p.tick(now, &mut buf);
                self.send_sealed(i, p.key, sealed, &buf);
            }
            if !self.nodes[i].traffic {
                continue;
            }
            for peer in self.nodes[i].peers.clone() {
                let Some(p) = self.nodes[i].dp.peers().by_key(&peer).cloned() else {
                    continue;
                };
                let to = self
                    .index_of(&peer)
                    .map_or(Ipv4Addr::UNSPECIFIED, |j| self.nodes[j].ip);
                let packet = ipv4(self.nodes[i].ip, to, &[7u8; 68]);
                let sealed = p.seal(now, &packet, &mut buf);
                self.send_sealed(i, peer, sealed, &buf);
            }
            // What the agent's driver does when a quiet peer's first
            // packet wakes it.
            self.feed_traffic(i);
        }
    }

    fn deliver(&mut self, d: Delivery) {
        let now = self.now();
        match d {
            Delivery::Udp {
                host,
                to_port,
                from,
                bytes,
            } => {
                let Some(i) = self.nodes.iter().position(|n| n.host == host) else {
                    return;
                };
                let Some(socket) = self.nodes[i].socket_of(to_port) else {
                    return;
                };
                self.model.observe_udp(now, i, socket, from, &bytes);
                // The state takes disco, and STUN for its netcheck run.
                let kind = self.nodes[i].state.handle_udp(now, socket, from, &bytes);
                if kind == Datagram::WireGuard && self.open(i, Via::Udp(socket, from), &bytes) {
                    self.nodes[i].rx_direct += 1;
                }
            }
            Delivery::TcpFrame {
                node: i,
                from,
                bytes,
            } => {
                let (what, owner) = self.nodes[i].state.handle_tcp_frame(now, from, &bytes);
                if what == Datagram::WireGuard {
                    if let Some(owner) = owner {
                        if self.open(i, Via::Tcp(owner, from), &bytes) {
                            self.nodes[i].rx_tcp += 1;
                        }
                    }
                }
            }
            Delivery::RelayWire {
                node: i,
                up: true,
                bytes,
            } => {
                for (j, down) in self.relay.handle(i, &bytes) {
                    let host = self.nodes[j].host;
                    self.world.relay_wire(host, j, false, down);
                }
            }
            Delivery::RelayWire {
                node: i,
                up: false,
                bytes,
            } => {
                if let Err(e) = self.nodes[i].relay.handle_input(now, &bytes) {
                    panic!("node {i}: the relay session failed: {e}");
                }
                self.flush_relay(i);
                while let Some(ev) = self.nodes[i].relay.poll_event() {
                    let ClientEvent::Packet { src, packet } = ev else {
                        continue;
                    };
                    if self.nodes[i].state.handle_relay(now, src, &packet) == Datagram::WireGuard
                        && self.open(i, Via::Relay(src), &packet)
                    {
                        self.nodes[i].rx_relay += 1;
                    }
                }
            }
        }
    }

    /// Runs the world for `d` of virtual time.
    pub fn run_for(&mut self, d: Duration) {
        let end = self.now() + d;
        let mut stalls = 0u32;
        for _ in 0..5_000_000 {
            self.flush();
            let mut next = self.next_tick;
            next = next.min(self.world.next_delivery().unwrap_or(end));
            for d in &self.dials {
                next = next.min(d.next);
            }
            for n in &self.nodes {
                if let Some(t) = n.state.poll_timeout() {
                    next = next.min(t);
                }
                if let Some(t) = n.relay.poll_timeout() {
                    next = next.min(t);
                }
            }
            if next >= end {
                self.world.now = end;
                return;
            }
            if next <= self.world.now {
                stalls += 1;
                assert!(
                    stalls < 10_000,
                    "no progress at {:?}: tick {:?} delivery {:?} timers {:?}",
                    self.world.now,
                    self.next_tick,
                    self.world.next_delivery(),
                    self.nodes
                        .iter()
                        .map(|n| n.state.poll_timeout())
                        .collect::<Vec<_>>()
                );
            } else {
                stalls = 0;
            }
            self.world.now = next.max(self.world.now);
            let now = self.now();
            while let Some(d) = self.world.pop_due() {
                self.deliver(d);
            }
            for n in &mut self.nodes {
                if n.state.poll_timeout().is_some_and(|t| t <= now) {
                    n.state.handle_timeout(now);
                }
                if n.relay.poll_timeout().is_some_and(|t| t <= now) {
                    if let Err(e) = n.relay.handle_timeout(now) {
                        panic!("a relay session timed out: {e}");
                    }
                }
            }
            for i in 0..self.nodes.len() {
                self.flush_relay(i);
            }
            self.dial_rounds();
            if now >= self.next_tick {
                self.app_tick();
                self.next_tick = now + self.tick;
            }
        }
        let timers: Vec<_> = self.nodes.iter().map(|n| n.state.poll_timeout()).collect();
        panic!(
            "simulation stuck at {:?} (timers {timers:?}, next delivery {:?}): a busy loop in the core?",
            self.now(),
            self.world.next_delivery()
        );
    }
}
