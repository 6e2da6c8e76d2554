//! The mesh: joining a coordinator and keeping the peers, their paths and
//! the relay in step with the network map.
//!
//! One task owns everything that is not a packet: the control client (the
//! map stream), the traversal core ([`traversal::node::Node`], sans-IO) and
//! the relay connection. It is a single `select!` loop over:
//! - `up` requests from the local API (register with a token, then follow);
//! - map events → peers in the data plane (as managed peers: first packet
//!   on the relay) and in the traversal core;
//! - disco/STUN datagrams that the UDP reader set aside, and packets from
//!   the relay (disco → traversal, WireGuard → opened and written to TUN);
//! - the traversal core's timer; its transmits go out on UDP or the relay,
//!   its path decisions are pushed into the data plane's peers.
//!
//! The data plane never waits on this task: it reads each peer's path from
//! the peer itself, and only disco and control traffic pass through here.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use ipnet::IpNet;
use tokio::sync::{mpsc, oneshot};
use tun_rs::{AsyncDevice, GROTable, VIRTIO_NET_HDR_LEN};

use super::egress::{Egress, RelaySink};
use crate::control::client::{ControlClient, MapEvent};
use crate::control::types::{Endpoint, EndpointKind, EndpointsReport, Peer as MapPeer, RelayMap};
use crate::dataplane::peer::PeerPath;
use crate::dataplane::{DataPlane, Opened, PeerSpec, Sealed};
use crate::keys::{NodeKey, PrivateKey};
use crate::proto::disco::{Candidate, CandidateKind, DiscoKey, DiscoSecret};
use crate::relay_client::{RelayClient, RelayClientConfig, RelayReceiver, RelaySender};
use crate::traversal::node::{Dest, Node, NodeEvent, PeerInfo};
use crate::traversal::{NatSummary, Path, SocketId};

mod login;
pub use login::{Login, UpRequest};

/// How often endpoints are re-gathered and, when changed, reported.
const ENDPOINT_INTERVAL: Duration = Duration::from_secs(30);
/// How often traffic counters are turned into `note_traffic` calls.
const TRAFFIC_INTERVAL: Duration = Duration::from_secs(1);
const OFFSET: usize = VIRTIO_NET_HDR_LEN + 6;

/// A request from the local API, answered on the oneshot.
pub type UpCall = (
    UpRequest,
    oneshot::Sender<Result<serde_json::Value, String>>,
);

pub struct Mesh {
    pub dp: Arc<DataPlane>,
    pub egress: Arc<Egress>,
    pub tun: Arc<AsyncDevice>,
    pub key: PrivateKey,
    pub state_dir: PathBuf,
    pub listen: SocketAddr,
    /// Datagrams on the UDP socket that are not WireGuard.
    pub side: mpsc::Receiver<(SocketAddr, Vec<u8>)>,
    pub up: mpsc::Receiver<UpCall>,
}

struct Joined {
    client: ControlClient,
    relay_url: Option<String>,
    reported: Vec<Endpoint>,
}

/// The receiving ends, kept apart from [`Joined`] so that the select loop
/// can wait on both at once.
#[derive(Default)]
struct Inputs {
    stream: Option<crate::control::client::MapStream>,
    relay: Option<RelayReceiver>,
}

struct Sink(RelaySender);

impl RelaySink for Sink {
    fn send(&self, peer: NodeKey, packet: &[u8]) -> bool {
        self.0
            .try_send(peer, Bytes::copy_from_slice(packet))
            .is_ok()
    }
}

impl Mesh {
    pub async fn run(mut self) {
        let secret = DiscoSecret::generate(&mut rand::rngs::OsRng);
        let disco_pub = secret.public();
        let seed = rand::random();
        let mut node = Node::new(Default::default(), self.key.public(), secret, seed);
        let mut joined: Option<Joined> = None;
        let mut inputs = Inputs::default();
        if let Some(login) = Login::load(&self.state_dir) {
            match self.join(&login, None, disco_pub, &mut inputs).await {
                Ok(j) => joined = Some(j),
                Err(e) => {
                    tracing::warn!(error = %e, "re-joining the coordinator failed; run `warren up`")
                }
            }
        }
        let mut tick_traffic = tokio::time::interval(TRAFFIC_INTERVAL);
        let mut tick_endpoints = tokio::time::interval(ENDPOINT_INTERVAL);
        let mut counters: std::collections::HashMap<NodeKey, (u64, u64)> = Default::default();
        let mut gro = GROTable::default();
        let mut buf = vec![0u8; 65_535 + OFFSET];
        loop {
            let deadline = node.poll_timeout().map(|(t, _)| t);
            let sleep = async {
                match deadline {
                    Some(t) => tokio::time::sleep_until(t.into()).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                call = self.up.recv() => {
                    let Some((req, reply)) = call else { return };
                    let login = Login::from(&req);
                    let answer = match self.join(&login, Some(req.token.as_str()), disco_pub, &mut inputs).await {
                        Ok(j) => {
                            let _ = login.save(&self.state_dir);
                            let addrs = self.dp.public_key();
                            joined = Some(j);
                            Ok(serde_json::json!({ "joined": login.coordinator, "public_key": addrs }))
                        }
                        Err(e) => Err(e),
                    };
                    let _ = reply.send(answer);
                }
                ev = next_map(&mut inputs.stream) => match ev {
                    Some(ev) => self.on_map(&mut node, ev).await,
                    None => {
                        tracing::warn!("coordinator stream ended; this node was removed or logged out");
                        for p in self.dp.peers().iter() {
                            if p.spec.managed {
                                self.dp.remove_peer(&p.key);
                                node.remove_peer(Instant::now(), &p.key);
                            }
                        }
                        self.egress.set_relay(None);
                        joined = None;
                        inputs = Inputs::default();
                    }
                },
                pkt = next_relay(&mut inputs.relay) => match pkt {
                    Some((from, bytes)) => self.on_relay(&mut node, from, &bytes, &mut gro, &mut buf).await,
                    None => inputs.relay = None,
                },
                side = self.side.recv() => {
                    let Some((from, bytes)) = side else { return };
                    node.handle_udp(Instant::now(), SocketId::PRIMARY, from, &bytes);
                }
                _ = sleep => node.handle_timeout(Instant::now()),
                _ = tick_traffic.tick() => {
                    let now = Instant::now();
                    for p in self.dp.peers().iter().filter(|p| p.spec.managed) {
                        let st = p.stats();
                        let cur = (st.tx_bytes, st.rx_bytes);
                        if counters.insert(p.key, cur) != Some(cur) {
                            node.note_traffic(now, &p.key);
                        }
                    }
                }
                _ = tick_endpoints.tick() => {
                    if let Some(j) = joined.as_mut() {
                        self.report_endpoints(&mut node, j).await;
                    }
                }
            }
            self.pump(&mut node).await;
        }
    }

    async fn join(
        &self,
        login: &Login,
        token: Option<&str>,
        disco: DiscoKey,
        inputs: &mut Inputs,
    ) -> Result<Joined, String> {
        let client = login.client(self.key.clone(), &self.state_dir)?;
        let reg = client
            .register(token, &login.hostname, NodeKey(disco.0))
            .await
            .map_err(|e| e.to_string())?;
        self.set_addresses(reg.ipv4.into(), reg.ipv6.into());
        tracing::info!(name = %reg.name, ipv4 = %reg.ipv4, ipv6 = %reg.ipv6, "joined the network");
        inputs.stream = Some(client.map_stream());
        let mut j = Joined {
            client,
            relay_url: None,
            reported: Vec::new(),
        };
        if let Some(rx) = self.connect_relay(&mut j, &reg.relay_map) {
            inputs.relay = Some(rx);
        }
        Ok(j)
    }

    fn set_addresses(&self, v4: IpAddr, v6: IpAddr) {
        // The whole overlay range is routed to the device: /10 and /48.
        for (ip, prefix) in [(v4, 10u8), (v6, 48u8)] {
            let res = match ip {
                IpAddr::V4(a) => self.tun.add_address_v4(a, prefix),
                IpAddr::V6(a) => self.tun.add_address_v6(a, prefix),
            };
            if let Err(e) = res {
                // EEXIST on re-join is expected.
                tracing::debug!(%ip, error = %e, "adding overlay address");
            }
        }
    }

    fn connect_relay(&self, j: &mut Joined, map: &RelayMap) -> Option<RelayReceiver> {
        let region = map.regions.first()?;
        if j.relay_url.as_deref() == Some(region.url.as_str()) {
            return None;
        }
        let mut cfg = RelayClientConfig::new(region.url.clone());
        cfg.allow_plain = region.url.starts_with("http://");
        let (tx, rx) = RelayClient::connect(cfg, &self.key);
        self.egress.set_relay(Some(Box::new(Sink(tx))));
        j.relay_url = Some(region.url.clone());
        tracing::info!(relay = %region.name, url = %region.url, "home relay");
        Some(rx)
    }

    async fn on_map(&self, node: &mut Node, ev: MapEvent) {
        let now = Instant::now();
        match ev {
            MapEvent::Full { map, from_cache } => {
                tracing::info!(peers = map.peers.len(), from_cache, "network map");
                self.set_addresses(map.self_node.ipv4.into(), map.self_node.ipv6.into());
                let keep: std::collections::HashSet<NodeKey> = map.peers.keys().copied().collect();
                for p in self.dp.peers().iter() {
                    if p.spec.managed && !keep.contains(&p.key) {
                        self.dp.remove_peer(&p.key);
                        node.remove_peer(now, &p.key);
                    }
                }
                for p in map.peers.values() {
                    self.add_peer(node, now, p);
                }
            }
            MapEvent::PeerAdded(p) | MapEvent::PeerChanged(p) => self.add_peer(node, now, &p),
            MapEvent::PeerRemoved(k) => {
                tracing::info!(peer = %k.short(), "peer removed");
                self.dp.remove_peer(&k);
                node.remove_peer(now, &k);
            }
            MapEvent::SelfChanged(me) => self.set_addresses(me.ipv4.into(), me.ipv6.into()),
            MapEvent::Revoked { reason } => {
                tracing::warn!(%reason, "coordinator revoked this node")
            }
            _ => {}
        }
    }

    fn add_peer(&self, node: &mut Node, now: Instant, p: &MapPeer) {
        if p.key == self.dp.public_key() {
            return;
        }
        let allowed: Vec<IpNet> = vec![
            IpNet::from(IpAddr::V4(p.ipv4)),
            IpNet::from(IpAddr::V6(p.ipv6)),
        ];
        let mut spec = PeerSpec::new(p.key, allowed);
        spec.managed = true;
        spec.persistent_keepalive = None;
        self.dp.upsert_peer(spec);
        let candidates = p
            .endpoints
            .iter()
            .map(|e| Candidate::udp(e.addr, candidate_kind(e.kind)))
            .collect();
        node.upsert_peer(
            now,
            PeerInfo {
                node_key: p.key,
                disco_key: DiscoKey(p.disco_key.0),
                candidates,
                nat: NatSummary::default(),
            },
        );
    }

    async fn on_relay(
        &self,
        node: &mut Node,
        from: NodeKey,
        bytes: &[u8],
        gro: &mut GROTable,
        buf: &mut Vec<u8>,
    ) {
        use crate::traversal::node::Datagram;
        if node.handle_relay(Instant::now(), from, bytes) != Datagram::WireGuard {
            return;
        }
        let set = self.dp.peers();
        let Some(peer) = set.by_key(&from) else {
            return;
        };
        buf.clear();
        buf.resize(OFFSET + 65_535, 0);
        match peer.open(None, bytes, &mut buf[OFFSET..]) {
            Opened::Tunnel { len } => {
                buf.truncate(OFFSET + len);
                let _ = self
                    .tun
                    .send_multiple(gro, std::slice::from_mut(buf), OFFSET)
                    .await;
            }
            Opened::Reply { len } => {
                self.egress.relay(from, &buf[OFFSET..OFFSET + len]);
                let mut out = vec![0u8; 2048];
                loop {
                    match peer.flush_queued(&mut out) {
                        Sealed::Nothing => break,
                        sealed => self.egress.send(from, sealed, &out).await,
                    }
                }
            }
            _ => {}
        }
    }

    /// Sends what the traversal core wants sent and applies its decisions.
    async fn pump(&self, node: &mut Node) {
        while let Some(t) = node.poll_transmit() {
            match t.dest {
                Dest::Udp { socket, addr } if socket == SocketId::PRIMARY => {
                    let _ = self.egress.udp.send(addr, &t.bytes, None).await;
                }
                // Extra birthday sockets are not opened by this driver yet.
                Dest::Udp { .. } => {}
                Dest::Relay(k) => self.egress.relay(k, &t.bytes),
            }
        }
        while let Some(ev) = node.poll_event() {
            match ev {
                NodeEvent::PathChanged {
                    peer,
                    from,
                    to,
                    reason,
                } => {
                    tracing::info!(peer = %peer.short(), %from, %to, ?reason, "path changed");
                    if let Some(p) = self.dp.peers().by_key(&peer) {
                        p.set_path(match to {
                            Path::Direct(d) if d.socket == SocketId::PRIMARY => {
                                PeerPath::Direct(d.addr)
                            }
                            _ => PeerPath::Relay,
                        });
                    }
                }
                NodeEvent::OpenSockets { .. } | NodeEvent::CloseSockets { .. } => {}
            }
        }
    }

    async fn report_endpoints(&self, node: &mut Node, j: &mut Joined) {
        let eps = login::host_endpoints(self.listen.port());
        let candidates = eps
            .iter()
            .map(|e| Candidate::udp(e.addr, candidate_kind(e.kind)))
            .collect();
        node.set_local(candidates, NatSummary::default());
        if eps != j.reported {
            match j
                .client
                .report_endpoints(&EndpointsReport::endpoints(&eps))
                .await
            {
                Ok(()) => j.reported = eps,
                Err(e) => tracing::info!(error = %e, "reporting endpoints failed; will retry"),
            }
        }
    }
}

fn candidate_kind(k: EndpointKind) -> CandidateKind {
    match k {
        EndpointKind::Host => CandidateKind::Host,
        EndpointKind::Portmapped => CandidateKind::PortMapped,
        EndpointKind::Srflx => CandidateKind::ServerReflexive,
        EndpointKind::Predicted => CandidateKind::Predicted,
    }
}

async fn next_map(s: &mut Option<crate::control::client::MapStream>) -> Option<MapEvent> {
    match s {
        Some(s) => s.recv().await,
        None => std::future::pending().await,
    }
}

async fn next_relay(r: &mut Option<RelayReceiver>) -> Option<(NodeKey, Bytes)> {
    match r {
        Some(r) => r.recv().await,
        None => std::future::pending().await,
    }
}
