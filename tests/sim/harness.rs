//! Drives [`warren::traversal::node::Node`]s over the simulated network the
//! way the agent's tokio driver does over real sockets: datagrams in, transmits and
//! events out, and a virtual clock that jumps straight to the next deadline
//! (the next packet, the next node timer or the next application tick).
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

use rand::rngs::StdRng;
use rand::{RngCore, SeedableRng};
use warren::dataplane::packet::build::ipv4;
use warren::dataplane::{DataPlane, PeerSpec};
use warren::keys::{NodeKey, PrivateKey};
use warren::netcheck::{self, Netcheck, Report};
use warren::proto::disco::{Candidate, CandidateKind, DiscoSecret};
use warren::proto::relay::client::{ClientEvent, ClientSession, SessionConfig};
use warren::traversal::node::{Datagram, Node, NodeEvent, PeerInfo};
use warren::traversal::{Config, NatSummary, Path, SocketId};

use crate::model::Model;
use crate::net::{Delivery, World};
use crate::relay::SimRelay;
use crate::wire::{tcp_candidate, Dial, Stream, Via};

pub const PORT: u16 = 41641;
const EXTRA_BASE: u16 = 42000;
const STUN1: &str = "192.0.2.10:3478";
const STUN2: &str = "192.0.2.11:3478";

pub struct SimNode {
    pub host: usize,
    pub key: NodeKey,
    pub node: Node,
    /// The node's WireGuard sessions and their paths.
    pub dp: DataPlane,
    /// The node's overlay address.
    pub ip: Ipv4Addr,
    /// Extra sockets: index `i` is socket id `i + 1`; `None` once closed.
    pub(crate) extra: Vec<Option<u16>>,
    pub peers: Vec<NodeKey>,
    pub info: Option<PeerInfo>,
    /// The netcheck run in progress (the real machine, its STUN through
    /// the simulated NATs to the world's STUN servers).
    pub(crate) netcheck: Option<Netcheck>,
    /// The node's real relay client session, to the world's one relay.
    pub(crate) relay: ClientSession,
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
        let node = Node::new(self.cfg.clone(), key, secret, 1000 + i as u64);
        self.nodes.push(SimNode {
            host,
            key,
            node,
            dp,
            ip,
            extra: Vec::new(),
            peers: Vec::new(),
            info: None,
            netcheck: None,
            relay,
            events: Vec::new(),
            rx_direct: 0,
            rx_relay: 0,
            rx_tcp: 0,
            wg_relay: 0,
            traffic: true,
        });
        // The relay connection opens with the server's hello.
        let hello = self.relay.connect(i);
        self.world.relay_wire(host, i, false, hello);
        self.netcheck(i);
        // As `warren up` waits for its home relay before it reports up.
        for _ in 0..1_000 {
            if self.nodes[i].relay.is_established() {
                return i;
            }
            self.run_for(Duration::from_millis(10));
        }
        panic!("node {i}'s relay session never came up")
    }

    /// Runs netcheck for node `i` as the agent does: the real machine,
    /// its probes through the node's NAT to the world's two STUN servers
    /// (and a hairpin test), driven by the same loop as everything else
    /// until its report is in; the report gives the node its candidates
    /// and NAT summary (`traversal::convert`), as `Discovery` does.
    pub fn netcheck(&mut self, i: usize) {
        let now = self.now();
        let h = &self.world.hosts[self.nodes[i].host];
        let local = SocketAddr::new(IpAddr::V4(h.ip), PORT);
        let config = netcheck::Config {
            servers: vec![netcheck::Server {
                name: "1".into(),
                addrs: vec![STUN1.parse().unwrap(), STUN2.parse().unwrap()],
            }],
            local_v4: Some(local),
            seed: 7 + i as u64,
            ..netcheck::Config::default()
        };
        self.nodes[i].netcheck = Some(Netcheck::new(now, config));
        for _ in 0..1_000 {
            if self.nodes[i].netcheck.is_none() {
                return;
            }
            self.run_for(Duration::from_millis(10));
        }
        panic!("netcheck of node {i} never finished");
    }

    /// A finished netcheck's report: the node's candidates and NAT.
    fn apply_report(&mut self, i: usize, report: &Report) {
        let now = self.now();
        let h = &self.world.hosts[self.nodes[i].host];
        let local = SocketAddr::new(IpAddr::V4(h.ip), PORT);
        let mut candidates = vec![Candidate::udp(local, CandidateKind::Host)];
        if let Some((alias, _)) = h.alias {
            candidates.push(Candidate::udp(
                SocketAddr::new(IpAddr::V4(alias), PORT),
                CandidateKind::Host,
            ));
        }
        if let Some(o) = report.ipv4.global.filter(|o| *o != local) {
            candidates.push(Candidate::udp(o, CandidateKind::ServerReflexive));
        }
        let nat = NatSummary::from(report);
        // The direct TCP port (the agent's default: the UDP port's number):
        // the host address, and the public one STUN over TCP would see.
        let host = self.nodes[i].host;
        let mut tcp = vec![tcp_candidate(local, CandidateKind::Host)];
        if let Some(public) = self.world.tcp_out(host, PORT, STUN1.parse().unwrap()) {
            if public != local {
                tcp.push(tcp_candidate(public, CandidateKind::ServerReflexive));
            }
        }
        let n = &mut self.nodes[i];
        n.node.set_tcp_local(now, tcp, !report.udp);
        n.node.set_local(now, candidates.clone(), nat);
        n.info = Some(PeerInfo {
            node_key: n.key,
            disco_key: n.node.disco_key(),
            candidates,
            nat,
        });
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
            let info = self.nodes[y].info.clone().expect("netcheck ran");
            let key = info.node_key;
            let ip = self.nodes[y].ip;
            let n = &mut self.nodes[x];
            n.node.upsert_peer(now, info);
            n.peers.push(key);
            // A mesh peer: its session starts on the relay and follows the
            // core's path changes, never WireGuard's roaming.
            let mut spec = PeerSpec::new(key, vec![IpAddr::V4(ip).into()]);
            spec.managed = true;
            n.dp.upsert_peer(now, spec);
        }
    }

    pub(crate) fn index_of(&self, key: &NodeKey) -> Option<usize> {
        self.nodes.iter().position(|n| n.key == *key)
    }

    /// Data packets node `i` received, direct or relayed.
    pub fn rx(&self, i: usize) -> u64 {
        self.nodes[i].rx_direct + self.nodes[i].rx_relay + self.nodes[i].rx_tcp
    }

    pub fn path(&self, a: usize, b: usize) -> Path {
        self.nodes[a].node.path(&self.nodes[b].key)
    }

    /// Moves every pending transmit and event out of the nodes.
    fn flush(&mut self) {
        let now = self.now();
        for i in 0..self.nodes.len() {
            if let Some(nc) = self.nodes[i].netcheck.as_mut() {
                let mut out = Vec::new();
                while let Some(t) = nc.poll_transmit(now) {
                    out.push(t);
                }
                let report = nc.poll_report();
                let host = self.nodes[i].host;
                for (dst, bytes) in out {
                    self.world.send(host, PORT, dst, bytes);
                }
                if let Some(r) = report {
                    self.nodes[i].netcheck = None;
                    self.apply_report(i, &r);
                }
            }
            loop {
                let mut progressed = false;
                while let Some(t) = self.nodes[i].node.poll_transmit() {
                    progressed = true;
                    self.send_from(i, t.dest, t.bytes);
                }
                while let Some(ev) = self.nodes[i].node.poll_event() {
                    progressed = true;
                    match &ev {
                        NodeEvent::OpenSockets { count } => {
                            let n = &mut self.nodes[i];
                            n.extra = (1..=*count).map(|s| Some(EXTRA_BASE + s)).collect();
                            n.node.sockets_opened(now, *count);
                        }
                        NodeEvent::TcpConnect {
                            peer,
                            targets,
                            until,
                        } => self.dials.push(Dial {
                            node: i,
                            peer: *peer,
                            targets: targets.clone(),
                            until: *until,
                            next: now,
                        }),
                        NodeEvent::TcpClose { addr } => self.close_stream(i, *addr),
                        NodeEvent::CloseSockets { keep } => {
                            for (idx, slot) in self.nodes[i].extra.iter_mut().enumerate() {
                                if !keep.iter().any(|k| usize::from(k.0) == idx + 1) {
                                    *slot = None;
                                }
                            }
                        }
                        NodeEvent::PathChanged { peer, to, .. } => {
                            if let Path::Direct(p) = to {
                                let trust = self.model_trust.unwrap_or(self.cfg.trust);
                                self.model
                                    .check_direct(now, i, *peer, *p, trust, "switches to");
                            }
                            // What the agent's driver does (`apply_path`).
                            if let Some(p) = self.nodes[i].dp.peers().by_key(peer) {
                                p.set_path(*to);
                            }
                        }
                        _ => {}
                    }
                    self.nodes[i].events.push((now, ev));
                }
                if !progressed {
                    break;
                }
            }
        }
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
                self.nodes[i].node.note_traffic(now, &peer);
            }
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
                match self.nodes[i].node.handle_udp(now, socket, from, &bytes) {
                    Datagram::WireGuard if self.open(i, Via::Udp(socket, from), &bytes) => {
                        self.nodes[i].rx_direct += 1;
                    }
                    Datagram::Stun if socket == SocketId::PRIMARY => {
                        if let Some(nc) = self.nodes[i].netcheck.as_mut() {
                            let _ = nc.handle_stun(now, from, &bytes);
                        }
                    }
                    _ => {}
                }
            }
            Delivery::TcpFrame {
                node: i,
                from,
                bytes,
            } => {
                if self.nodes[i].node.handle_tcp(now, from, &bytes) == Datagram::WireGuard {
                    if let Some(owner) = self.nodes[i].node.tcp_owner(from) {
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
                    if self.nodes[i].node.handle_relay(now, src, &packet) == Datagram::WireGuard
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
                if let Some((t, _)) = n.node.poll_timeout() {
                    next = next.min(t);
                }
                if let Some(t) = n.netcheck.as_ref().and_then(Netcheck::poll_timeout) {
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
                        .map(|n| n.node.poll_timeout())
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
                if n.node.poll_timeout().is_some_and(|(t, _)| t <= now) {
                    n.node.handle_timeout(now);
                }
                if let Some(nc) = n.netcheck.as_mut() {
                    if nc.poll_timeout().is_some_and(|t| t <= now) {
                        nc.handle_timeout(now);
                    }
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
        let timers: Vec<_> = self.nodes.iter().map(|n| n.node.poll_timeout()).collect();
        panic!(
            "simulation stuck at {:?} (timers {timers:?}, next delivery {:?}): a busy loop in the core?",
            self.now(),
            self.world.next_delivery()
        );
    }
}
