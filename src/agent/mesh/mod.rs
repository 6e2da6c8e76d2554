//! The mesh task: the driver of the agent state ([`AgentState`], sans-IO)
//! for everything that is not a data packet (docs/architecture.md, "The
//! agent state" and "The tokio driver").
//!
//! The state decides; this task only turns IO into `handle_*` calls and the
//! state's outputs into IO ([`drain`]). It is one `select!` loop over:
//! - commands from the local API (`up`, `down`, `logout`, `netcheck`,
//!   `ping`), answered on a oneshot (a ping or netcheck answer waits, by
//!   id, for the state's `PingDone` / `NetcheckDone`);
//! - map stream events → `handle_map`;
//! - datagrams the UDP readers set aside (disco, STUN) from the primary
//!   socket or the birthday method's extra sockets ([`sockets`]) →
//!   `handle_udp`; disco from the relays → `handle_relay`; direct TCP
//!   stream news and frames not yet proven ([`tcp`]) → `handle_tcp_*`;
//! - the state's one deadline (`poll_timeout` → `handle_timeout`: its
//!   timer table, traversal's and the netcheck run's deadlines);
//! - the data plane's wake when a quiet peer sends (`handle_traffic`);
//! - finished background control requests (registration, endpoint
//!   reports), so a slow coordinator never stalls disco or the relays.
//!
//! What the driver itself holds is IO: the login file and coordinator
//! client with the map stream ([`session`], [`up`], [`login`]), the relay
//! connections ([`relays`]), the TCP listener and streams, the extra
//! sockets, the port mapper, and the reply channels of waiting API calls.
//!
//! Tasks it starts: the map stream's reader, one driver and one pump per
//! relay connection, the TCP accept loop and one reader and one writer per
//! stream, one dial task per TCP dial, one reader per extra socket, the
//! port mapper, background control requests (a `JoinSet`). Channels into
//! it: API calls (8), side datagrams (from the agent), extra-socket
//! datagrams ([`EXTRA_QUEUE`]), TCP news ([`TCP_QUEUE`]), relay frames and
//! events (1024): bounded, because no producer may wait on this loop for
//! long, and the data path never waits on it at all — it reads each peer's
//! path from the peer itself, and relay pumps and TCP readers open
//! WireGuard themselves (`agent::streamed`). Locks: only the status view's
//! mutex ([`handle`]), written after each command, map event and
//! housekeeping tick.

mod drain;
mod handle;
mod login;
mod relays;
pub use relays::RelayOptions;
mod routing;
mod rules;
mod session;
mod sockets;
mod tcp;
mod up;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use bytes::Bytes;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tun_rs::AsyncDevice;

use super::egress::Egress;
use super::inbound::SideDatagram;
use super::state::{AgentState, Settings};
use super::streamed::{StreamedIn, StreamedParts};
use crate::dataplane::DataPlane;
use crate::keys::{NodeKey, PrivateKey};
use crate::path::Path;
use crate::portmap::PortMapperHandle;
use crate::proto::disco::DiscoSecret;
use crate::traversal::node::Datagram;

pub use handle::{Command, MeshHandle, MeshReply};
pub use login::Login;

use relays::{Incoming, Relays};
use session::{Background, Session};
use sockets::ExtraSockets;
use tcp::{TcpIncoming, TcpPaths};

/// Datagrams from the extra sockets waiting for the mesh task (disco and
/// stray STUN; WireGuard never passes here).
const EXTRA_QUEUE: usize = 256;
/// Frames and stream news from the direct TCP paths waiting for the mesh task.
const TCP_QUEUE: usize = 1024;

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
    /// The TUN device's index and name, for kernel routes.
    pub tun_index: u32,
    pub tun_name: String,
    /// The resolver, to give names and the host's DNS to.
    pub dns: Option<crate::agent::dns::DnsHandle>,
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
    /// The port mapping for the listen port, while one is kept.
    portmapper: Option<PortMapperHandle>,

    /// Everything decided about the node and its peers (sans-IO).
    state: AgentState,
    relays: Relays,
    relay_rx: mpsc::Receiver<Incoming>,
    tcp: TcpPaths,
    tcp_rx: mpsc::Receiver<TcpIncoming>,
    /// The login, the coordinator client and the map stream.
    session: Option<Session>,
    background: JoinSet<Background>,
    /// Netcheck requests waiting for the running netcheck's report.
    netcheck_waiters: Vec<handle::Reply>,
    /// `warren ping` requests waiting for their round, by the state's id.
    ping_waiters: HashMap<u64, handle::Reply>,
    /// Opens the TCP frames that arrive before their stream is proven.
    streamed: StreamedIn,
    /// Kernel routes for subnet routes, and the NAT of those served.
    host_routes: routing::HostRoutes,
    /// This node's overlay addresses and the subnet routes it serves: what
    /// peers may send to (the firewall's own set).
    own: (Vec<ipnet::IpNet>, Vec<ipnet::IpNet>),
    /// The resolver: names from the state, the host's DNS while joined.
    dns: Option<crate::agent::dns::DnsHandle>,
}

impl Mesh {
    fn new(
        parts: MeshParts,
        calls: mpsc::Receiver<(Command, handle::Reply)>,
        view: Arc<Mutex<handle::View>>,
    ) -> Mesh {
        let data = StreamedParts {
            dp: parts.dp.clone(),
            tun: parts.tun.clone(),
            egress: parts.egress.clone(),
            mtu: parts.mtu,
        };
        let (relays, sink, relay_rx) =
            Relays::new(parts.key.clone(), None, parts.relay, Some(data.clone()));
        parts.egress.set_relay(Some(sink));
        let (extra_tx, extra_side) = mpsc::channel(EXTRA_QUEUE);
        let (tcp_tx, tcp_rx) = mpsc::channel(TCP_QUEUE);
        let tcp = TcpPaths::new(parts.tcp_port, tcp_tx, Some(data.clone()));
        let disco = DiscoSecret::generate(&mut rand::rngs::OsRng);
        let settings = Settings {
            traversal: parts.traversal.clone(),
            // The port actually listened on: 0 when the listener could not
            // be bound, so that no TCP candidate is published for it.
            tcp_port: tcp.port(),
        };
        let state = AgentState::new(settings, parts.key.public(), disco, rand::random());
        let sockets = ExtraSockets::new(
            parts.dp.clone(),
            parts.tun.clone(),
            parts.egress.clone(),
            extra_tx,
        );
        Mesh {
            sockets,
            extra_side,
            dp: parts.dp,
            egress: parts.egress,
            tun: parts.tun,
            key: parts.key,
            state_dir: parts.state_dir,
            listen: parts.listen,
            side: parts.side,
            portmap: parts.portmap,
            portmapper: None,
            calls,
            view,
            state,
            relays,
            relay_rx,
            tcp,
            tcp_rx,
            session: None,
            background: JoinSet::new(),
            netcheck_waiters: Vec::new(),
            ping_waiters: HashMap::new(),
            host_routes: routing::HostRoutes::new(parts.tun_index, parts.tun_name),
            own: (Vec::new(), Vec::new()),
            dns: parts.dns,
            streamed: data.opener(),
        }
    }

    async fn run(mut self) {
        // One short `nft` run, before anything waits on this task.
        self.host_routes.forget_stale();
        self.resume_saved_login();
        self.drain().await;
        let wake = self.dp.activity_wake();
        loop {
            let deadline = self.state.poll_timeout();
            let sleep = async {
                match deadline {
                    Some(t) => tokio::time::sleep_until(t.into()).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                call = self.calls.recv() => {
                    let Some((cmd, reply)) = call else { return };
                    let answer = self.on_command(cmd, reply).await;
                    self.drain().await;
                    // The caller's next `status` must see the effect.
                    self.publish_view(Instant::now());
                    if let Some((reply, answer)) = answer {
                        let _ = reply.send(answer);
                    }
                    continue;
                }
                ev = session::next_map(&mut self.session) => {
                    self.state.handle_map(Instant::now(), ev);
                    self.drain().await;
                    self.publish_view(Instant::now());
                    continue;
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
                _ = sleep => self.state.handle_timeout(Instant::now()),
                // A quiet peer's first packet: traversal hears of it now,
                // not at the next housekeeping.
                _ = wake.notified() => {
                    let peers = self.dp.peers();
                    self.state.handle_traffic(Instant::now(), peers.iter().map(|p| &**p));
                }
            }
            self.drain().await;
        }
    }

    /// A datagram a UDP reader set aside: the state takes disco and STUN.
    fn on_side(&mut self, (socket, from, bytes): SideDatagram) {
        self.state.handle_udp(Instant::now(), socket, from, &bytes);
    }

    /// Opens a WireGuard packet that came through a relay and writes it to
    /// the TUN; disco is consumed by traversal.
    async fn on_relay(&mut self, from: NodeKey, bytes: &Bytes) {
        if self.state.handle_relay(Instant::now(), from, bytes) != Datagram::WireGuard {
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

    /// Moves the peer in the data plane to traversal's path: direct from
    /// whichever local socket won (the primary one or a birthday socket), or
    /// the relay.
    fn apply_path(&self, peer: &NodeKey, to: Path) {
        let set = self.dp.peers();
        let stream = match to {
            Path::Tcp(addr) => self.tcp.sink(addr),
            _ => None,
        };
        // The stream first: a packet that sees the TCP path finds its
        // writer.
        self.egress.set_stream(*peer, stream);
        if let Some(p) = set.by_key(peer) {
            p.set_path(to);
        }
    }

    /// Writes the status view the API reads.
    fn publish_view(&self, now: Instant) {
        let node = self.node_status();
        let peers = self.state.peer_views(now, std::time::SystemTime::now());
        let client = self.session.as_ref().map(|s| s.client.clone());
        handle::publish(&self.view, |v| {
            v.node = node;
            v.peers = peers;
            v.client = client;
        });
    }
}
