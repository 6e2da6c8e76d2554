//! The mesh: joining a coordinator and keeping the peers, their paths and
//! the relays in step with the network map.
//!
//! One task owns everything that is not a packet: the control session (the
//! map stream), the traversal core ([`Node`], sans-IO), discovery (netcheck
//! on the shared socket, port mapping) and the relay connections. It is a
//! single `select!` loop over:
//! - commands from the local API (`up`, `down`, `logout`, `netcheck`,
//!   `ping`; a ping waits for its round's pongs in [`ping`]);
//! - map events → peers in the data plane (as managed peers: first packet
//!   on the relay) and in the traversal core;
//! - datagrams the UDP readers set aside (disco → traversal, STUN →
//!   discovery), from the primary socket or the birthday method's extra
//!   sockets ([`sockets`]), and disco from the relays and the direct TCP
//!   streams ([`tcp`]);
//! - the traversal and discovery timers, and a one-second housekeeping tick;
//! - background control requests (registration, endpoint reports), so a slow
//!   coordinator never stalls disco or the relays.
//!
//! The data plane never waits on this task: it reads each peer's path from
//! the peer itself. Disco, STUN and control traffic pass through here.
//! WireGuard that arrives over a relay or a direct TCP stream does not: the
//! relay pumps and the TCP readers open it themselves (`agent::streamed`);
//! only a TCP frame that comes before its stream is proven passes here.
//! Files: [`session`] (the coordinator side), [`up`] (`warren up`),
//! [`relays`], [`tcp`], [`discover`], [`handle`] (the API's view and the
//! typed replies), [`ping`], [`login`], [`sockets`].

mod discover;
mod handle;
mod login;
mod ping;
mod relays;
pub use relays::RelayOptions;
mod session;
mod sockets;
mod tcp;
mod up;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tun_rs::AsyncDevice;

use super::egress::Egress;
use super::inbound::SideDatagram;
use super::streamed::{StreamedIn, StreamedParts};
use crate::api::mesh::{PeerMesh, TriedPath};
use crate::control::follow::Follower;
use crate::dataplane::DataPlane;
use crate::keys::{NodeKey, PrivateKey};
use crate::path::{Path, SocketId};
use crate::proto::disco::DiscoSecret;
use crate::traversal::node::{Datagram, Dest, Node, NodeEvent};

pub use handle::{Command, MeshHandle, MeshReply};
pub use login::Login;

use discover::Discovery;
use relays::{Incoming, Relays};
use session::{Background, Session};
use sockets::ExtraSockets;
use tcp::{TcpIncoming, TcpPaths};

/// How often the housekeeping tick runs: traffic notes for traversal, idle
/// relays, local address changes, the status view.
const TICK: Duration = Duration::from_secs(1);
/// Datagrams from the extra sockets waiting for the mesh task (disco and
/// stray STUN; WireGuard never passes here).
const EXTRA_QUEUE: usize = 256;
/// Frames and stream news from the direct TCP paths waiting for the mesh task.
const TCP_QUEUE: usize = 1024;
/// Local addresses are compared every this many ticks.
const ADDR_CHECK_TICKS: u64 = 2;

/// What the mesh task needs from the agent.
pub struct MeshParts {
    pub dp: Arc<DataPlane>,
    pub egress: Arc<Egress>,
    pub tun: Arc<AsyncDevice>,
    pub key: PrivateKey,
    pub state_dir: PathBuf,
    pub listen: SocketAddr,
    /// Datagrams on the UDP socket that are not WireGuard.
    pub side: mpsc::Receiver<SideDatagram>,
    pub portmap: Option<crate::portmap::Config>,
    /// How relay connections are made and when idle ones close.
    pub relay: RelayOptions,
    /// The direct TCP path's listening port; 0 turns it off.
    pub tcp_port: u16,
    /// Traversal's settings (the defaults, but for what the config sets).
    pub traversal: crate::traversal::Config,
    /// The TUN's MTU: how large an opened packet can be.
    pub mtu: usize,
}

/// Starts the mesh task; the handle is how the API reaches it.
pub fn spawn(parts: MeshParts) -> (MeshHandle, tokio::task::JoinHandle<()>) {
    let (calls_tx, calls) = mpsc::channel(8);
    let view = Arc::new(Mutex::new(handle::View::default()));
    let handle = MeshHandle::new(calls_tx, view.clone());
    let task = tokio::spawn(async move {
        let mesh = Mesh::new(parts, calls, view);
        mesh.run().await
    });
    (handle, task)
}

pub(crate) struct Mesh {
    dp: Arc<DataPlane>,
    egress: Arc<Egress>,
    tun: Arc<AsyncDevice>,
    key: PrivateKey,
    state_dir: PathBuf,
    listen: SocketAddr,
    side: mpsc::Receiver<SideDatagram>,
    /// The birthday method's extra sockets and what their readers set aside.
    sockets: ExtraSockets,
    extra_side: mpsc::Receiver<SideDatagram>,
    calls: mpsc::Receiver<(Command, handle::Reply)>,
    view: Arc<Mutex<handle::View>>,
    portmap: Option<crate::portmap::Config>,

    node: Node,
    disco: DiscoSecret,
    relays: Relays,
    relay_rx: mpsc::Receiver<Incoming>,
    tcp: TcpPaths,
    tcp_rx: mpsc::Receiver<TcpIncoming>,
    /// Our TCP port as the STUN server saw it.
    tcp_public: Option<SocketAddr>,
    discovery: Discovery,
    session: Option<Session>,
    background: JoinSet<Background>,
    /// What the map asks (`control::follow`), and the peers as the map
    /// describes them (names, candidates, home relays).
    follow: Follower,
    /// Netcheck requests waiting for the running netcheck's report.
    netcheck_waiters: Vec<handle::Reply>,
    /// `warren ping` requests waiting for their round's pongs.
    ping_waiters: Vec<ping::Waiter>,
    /// When each peer's path last turned direct.
    direct_since: HashMap<NodeKey, Instant>,
    /// Per peer, the data plane's activity and sealed counters at the last
    /// look (`feed_traffic`).
    traffic: HashMap<NodeKey, (u64, u64)>,
    host_addrs: Vec<crate::control::Endpoint>,
    /// Opens the TCP frames that arrive before their stream is proven.
    streamed: StreamedIn,
}

impl Mesh {
    fn new(
        parts: MeshParts,
        calls: mpsc::Receiver<(Command, handle::Reply)>,
        view: Arc<Mutex<handle::View>>,
    ) -> Mesh {
        let disco = DiscoSecret::generate(&mut rand::rngs::OsRng);
        let node = Node::new(
            parts.traversal.clone(),
            parts.key.public(),
            disco.clone(),
            rand::random(),
        );
        let data = StreamedParts {
            dp: parts.dp.clone(),
            tun: parts.tun.clone(),
            egress: parts.egress.clone(),
            mtu: parts.mtu,
        };
        let follow = Follower::new(parts.dp.public_key(), None);
        let (relays, sink, relay_rx) =
            Relays::new(parts.key.clone(), None, parts.relay, Some(data.clone()));
        parts.egress.set_relay(Some(sink));
        let (extra_tx, extra_side) = mpsc::channel(EXTRA_QUEUE);
        let (tcp_tx, tcp_rx) = mpsc::channel(TCP_QUEUE);
        let tcp = TcpPaths::new(parts.tcp_port, tcp_tx, Some(data.clone()));
        let sockets = ExtraSockets::new(
            parts.dp.clone(),
            parts.tun.clone(),
            parts.egress.clone(),
            extra_tx,
        );
        Mesh {
            sockets,
            extra_side,
            discovery: Discovery::new(parts.listen.port()),
            dp: parts.dp,
            egress: parts.egress,
            tun: parts.tun,
            key: parts.key,
            state_dir: parts.state_dir,
            listen: parts.listen,
            side: parts.side,
            portmap: parts.portmap,
            calls,
            view,
            node,
            disco,
            relays,
            relay_rx,
            tcp,
            tcp_rx,
            tcp_public: None,
            session: None,
            background: JoinSet::new(),
            follow,
            netcheck_waiters: Vec::new(),
            ping_waiters: Vec::new(),
            direct_since: HashMap::new(),
            traffic: HashMap::new(),
            host_addrs: Vec::new(),
            streamed: data.opener(),
        }
    }

    async fn run(mut self) {
        self.resume_saved_login();
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut ticks: u64 = 0;
        let wake = self.dp.activity_wake();
        loop {
            let deadline = [
                self.node.poll_timeout().map(|(t, _)| t),
                self.discovery.poll_timeout(),
                self.ping_deadline(),
            ]
            .into_iter()
            .flatten()
            .min();
            let sleep = async {
                match deadline {
                    Some(t) => tokio::time::sleep_until(t.into()).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                call = self.calls.recv() => {
                    let Some((cmd, reply)) = call else { return };
                    self.on_command(cmd, reply).await;
                    // The caller's next `status` must see the effect.
                    self.publish_view(Instant::now());
                }
                ev = session::next_map(&mut self.session) => {
                    self.on_map(ev);
                    self.publish_view(Instant::now());
                }
                inc = self.relay_rx.recv() => match inc {
                    Some(Incoming::Packet { from, bytes }) => self.on_relay(from, &bytes).await,
                    Some(Incoming::Event { region, event }) => self.relays.note_event(region, &event),
                    Some(Incoming::Wanted { peer, packet }) => self.relays.wanted(&peer, packet),
                    None => return,
                },
                // The UDP reader goes first at shutdown: its channel closing
                // must not end this loop before the `Shutdown` call (which
                // gives the port mapping back) is served.
                Some(d) = self.side.recv() => self.on_side(d),
                Some(d) = self.extra_side.recv() => self.on_side(d),
                Some(inc) = self.tcp_rx.recv() => self.on_tcp(inc).await,
                Some(done) = self.background.join_next() => match done {
                    Ok(bg) => self.on_background(bg),
                    Err(e) => tracing::warn!(error = %e, "control request task failed"),
                },
                _ = sleep => {
                    let now = Instant::now();
                    self.node.handle_timeout(now);
                    self.discovery.handle_timeout(now);
                }
                _ = wake.notified() => self.feed_traffic(Instant::now()),
                _ = tick.tick() => {
                    ticks += 1;
                    self.housekeeping(Instant::now(), ticks % ADDR_CHECK_TICKS == 0);
                }
            }
            self.pump().await;
        }
    }

    /// Tells traversal which peers had packets since the last look: once a
    /// second, and at once when a quiet peer's first packet wakes us.
    fn feed_traffic(&mut self, now: Instant) {
        for p in self.dp.peers().iter().filter(|p| p.spec.managed) {
            // A new peer starts at zero: being added is not traffic.
            let (seen, seen_sealed) = self.traffic.get(&p.key).copied().unwrap_or((0, 0));
            let cur = p.poll_activity(seen);
            if cur != seen {
                // Only what we sent may start the hard-NAT methods.
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

    /// Once a second: feed traffic to traversal (heartbeats run only while
    /// packets flow), close idle relays, notice address changes, start a
    /// due netcheck, refresh the API's view.
    fn housekeeping(&mut self, now: Instant, check_addrs: bool) {
        self.feed_traffic(now);
        self.traffic.retain(|k, _| self.follow.peer(k).is_some());
        self.relays.close_idle(now);
        let active = self.session.as_ref().is_some_and(|s| s.is_active());
        if active && check_addrs {
            let addrs = login::host_endpoints(self.listen.port());
            if addrs != self.host_addrs {
                let first = self.host_addrs.is_empty();
                if !first {
                    tracing::info!("local addresses changed; re-discovering paths");
                    self.node.network_changed(now);
                }
                self.host_addrs = addrs;
                if first && self.discovery.udp_blocked() {
                    // UDP already looks blocked: a restart would only push
                    // that verdict (the run's whole deadline) back, and the
                    // TCP candidates are what peers need now.
                    self.publish_tcp();
                } else {
                    self.start_netcheck(now);
                }
            }
        }
        if active && self.discovery.due(now) {
            self.start_netcheck(now);
        }
        self.publish_view(now);
    }

    fn start_netcheck(&mut self, now: Instant) {
        let stun = self
            .relays
            .map()
            .regions
            .iter()
            .find_map(|r| r.stun.first());
        if let Some(server) = stun {
            self.tcp.query_stun(*server);
        }
        if !self.discovery.start(now, self.relays.map()) {
            // No STUN server: host and port-mapped candidates still count.
            self.publish_local(None);
            let waiters = std::mem::take(&mut self.netcheck_waiters);
            for w in waiters {
                let _ = w.send(Err(crate::api::ApiError::new(
                    crate::api::ErrorCode::NotJoined,
                    "no STUN server known: the coordinator's relay map lists none",
                )));
            }
        }
    }

    /// A datagram a UDP reader set aside: traversal takes disco and says
    /// what else it is.
    fn on_side(&mut self, (socket, from, bytes): SideDatagram) {
        let now = Instant::now();
        let kind = self.node.handle_udp(now, socket, from, &bytes);
        tracing::trace!(socket = socket.0, %from, len = bytes.len(), ?kind, "datagram in");
        // Netcheck runs on the primary socket only.
        if kind == Datagram::Stun && socket == SocketId::PRIMARY {
            self.discovery.handle_stun(now, from, &bytes);
        }
    }

    /// Opens a WireGuard packet that came through a relay and writes it to
    /// the TUN; disco is consumed by traversal.
    async fn on_relay(&mut self, from: NodeKey, bytes: &Bytes) {
        if self.node.handle_relay(Instant::now(), from, bytes) != Datagram::WireGuard {
            return;
        }
        self.open_streamed(from, bytes).await;
    }

    /// Opens a WireGuard packet `from` a peer that came over a stream (the
    /// relay's or a direct TCP one) and reached this task, writes it to
    /// the TUN, and sends any protocol reply back the peer's stream-carried
    /// way.
    async fn open_streamed(&mut self, from: NodeKey, bytes: &Bytes) {
        self.streamed.set_now(Instant::now());
        self.streamed.open(from, bytes).await;
        self.streamed.flush().await;
    }

    /// Sends what traversal and discovery want sent and applies traversal's
    /// path decisions to the data plane.
    async fn pump(&mut self) {
        let now = Instant::now();
        while let Some((to, bytes)) = self.discovery.poll_transmit(now) {
            let _ = self.egress.udp.send(to, &bytes, None).await;
        }
        if let Some(report) = self.discovery.poll_report() {
            self.on_netcheck(report);
        }
        if self.discovery.udp_blocked_changed() {
            // Netcheck suspects (or no longer suspects) a blocked UDP
            // before its report: the TCP path need not wait for it.
            self.publish_tcp();
            tracing::info!(
                udp_blocked = self.discovery.udp_blocked(),
                "netcheck: provisional UDP verdict"
            );
        }
        // Opening sockets makes traversal send (the birthday spray), so
        // transmits and events are drained until neither has more.
        loop {
            while let Some(t) = self.node.poll_transmit() {
                tracing::trace!(dest = ?t.dest, len = t.bytes.len(), "disco out");
                match t.dest {
                    Dest::Udp { socket, addr } => self.egress.send_on(socket, addr, &t.bytes).await,
                    Dest::Relay(k) => self.egress.via_relay(k, &t.bytes),
                    Dest::Tcp(addr) => {
                        self.tcp.send(addr, &t.bytes);
                    }
                }
            }
            let Some(ev) = self.node.poll_event() else {
                break;
            };
            match ev {
                NodeEvent::PathChanged {
                    peer,
                    from,
                    to,
                    reason,
                } => {
                    tracing::info!(peer = %peer.short(), %from, %to, ?reason, "path changed");
                    self.apply_path(&peer, to, now);
                }
                NodeEvent::OpenSockets { count } => {
                    let t = std::time::Instant::now();
                    let open = self.sockets.open(count);
                    let took = t.elapsed();
                    tracing::info!(count, open, ?took, "birthday: extra sockets opened");
                    self.node.sockets_opened(now, open);
                }
                NodeEvent::PingReply {
                    peer,
                    round,
                    path,
                    rtt,
                } => self.on_ping_reply(peer, round, path, rtt),
                NodeEvent::TcpConnect {
                    peer,
                    targets,
                    until,
                } => {
                    // Traversal already left out our own addresses.
                    tracing::info!(peer = %peer.short(), ?targets, "direct tcp: dialling");
                    self.tcp.dial(peer, targets, until);
                }
                NodeEvent::TcpClose { addr } => self.tcp.close(addr),
                NodeEvent::CloseSockets { keep } => {
                    self.sockets.close(&keep);
                    tracing::info!(
                        ?keep,
                        still_open = self.sockets.open_count(),
                        "birthday: extra sockets closed"
                    );
                }
            }
        }
        self.finish_pings(Instant::now());
    }

    /// Moves the peer in the data plane to traversal's path: direct from
    /// whichever local socket won (the primary one or a birthday socket), or
    /// the relay.
    fn apply_path(&mut self, peer: &NodeKey, to: Path, now: Instant) {
        let set = self.dp.peers();
        let dp_peer = set.by_key(peer);
        let stream = match to {
            Path::Tcp(addr) => self.tcp.sink(addr),
            _ => None,
        };
        self.egress.set_stream(*peer, stream);
        if to == Path::Relay {
            self.direct_since.remove(peer);
        } else {
            self.direct_since.entry(*peer).or_insert(now);
        }
        if let Some(p) = dp_peer {
            p.set_path(to);
        }
    }

    /// Writes the status view the API reads.
    fn publish_view(&self, now: Instant) {
        let node = self.node_status();
        let wall = std::time::SystemTime::now();
        let clock = |t: Instant| handle::wall_clock(now, wall, t);
        let at = |t: Instant| format!("at {} UTC", clock(t));
        let peers = self
            .follow
            .peers()
            .values()
            .map(|p| {
                let st = self.node.status_with(&p.key, &at);
                let relayed = st.as_ref().is_none_or(|s| matches!(s.path, Path::Relay));
                let mesh = PeerMesh {
                    hostname: p.name.clone(),
                    online: p.online,
                    os: p.os.clone(),
                    version: p.version.clone(),
                    tags: p.tags.clone(),
                    relay_region: if relayed {
                        self.relays
                            .peer_region(&p.key)
                            .and_then(|r| self.relays.region_name(r))
                    } else {
                        None
                    },
                    latency_ms: st
                        .as_ref()
                        .and_then(|s| s.rtt)
                        .map(|d| d.as_secs_f64() * 1e3),
                    relay_reason: st.as_ref().and_then(|s| s.relay_reason.clone()),
                    candidates: p.endpoints.iter().map(|e| e.addr).collect(),
                    nat: p.nat,
                    pings_sent: st.as_ref().map_or(0, |s| s.stats.pings_sent),
                    pongs_received: st.as_ref().map_or(0, |s| s.stats.pongs_received),
                    direct_since_secs: self
                        .direct_since
                        .get(&p.key)
                        .map(|t| now.duration_since(*t).as_secs()),
                    tried: st.as_ref().map_or_else(Vec::new, |s| {
                        s.tried
                            .iter()
                            .map(|t| TriedPath {
                                addr: t.path.addr,
                                kind: t.kind.name().into(),
                                last_ping: t.last_ping.map(clock),
                                last_pong: t.last_pong.map(clock),
                                rtt_ms: t.rtt.map(|d| d.as_secs_f64() * 1e3),
                            })
                            .collect()
                    }),
                    // Filled in per request (`api::view`, `api::server`).
                    allows_you: None,
                    you_allow: None,
                };
                (p.key, mesh)
            })
            .collect();
        let client = self.session.as_ref().map(|s| s.client.clone());
        handle::publish(&self.view, |v| {
            v.node = node;
            v.peers = peers;
            v.client = client;
        });
    }
}
