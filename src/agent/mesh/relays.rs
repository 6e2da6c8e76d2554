//! The agent's relay connections: one to its home region, kept open, and
//! one to each other region where a peer it talks to lives, opened on
//! demand and closed when idle (see docs/architecture.md, "Relay").
//!
//! Packets for a relayed peer must reach the relay that peer is connected
//! to, so the send side is a routing table — peer key → that region's
//! sender, else the home region's — that the data plane reads without a
//! lock ([`ArcSwap`]) on every relayed packet. The mesh task rebuilds the
//! table when the map or the home region changes, which is rare.
//! A peer whose region's connection was closed for idleness is "parked"
//! in the table rather than routed to the home relay (where it is not):
//! the data plane hands the first packet for it back to the mesh task,
//! which reopens the connection and sends it there.
//!
//! Each connection's receiver is drained by a small task, its pump. The
//! pump opens WireGuard itself and writes it to the TUN in batches
//! (`agent::streamed`): relayed data never crosses the mesh task. Disco and
//! anything else a peer sends (as `Incoming::Packet`) and connection events
//! (tagged with the region) are funnelled into one channel, so the mesh's
//! `select!` waits on one receiver however many relays are open.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use bytes::Bytes;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::agent::egress::RelaySink;
use crate::agent::streamed::{self, StreamedParts};
use crate::control::types::{RelayMap, RelayRegion};
use crate::keys::{NodeKey, PrivateKey};
use crate::relay_client::{
    Received, RelayClient, RelayClientConfig, RelayEvent, RelayReceiver, RelaySender,
    RelayTransport,
};

/// How the pool connects, from the agent's `[agent]` settings.
#[derive(Debug, Clone, Copy)]
pub struct RelayOptions {
    pub transport: RelayTransport,
    /// A non-home connection with no packet in this long is closed.
    pub idle_close: Duration,
    /// `agent.insecure_http`: plain HTTP to coordinators and relays that
    /// are not on this machine (labs only).
    pub insecure_http: bool,
}

impl Default for RelayOptions {
    fn default() -> Self {
        RelayOptions {
            transport: RelayTransport::Auto,
            idle_close: Duration::from_secs(60),
            insecure_http: false,
        }
    }
}

/// What the relay connections deliver to the mesh task.
#[derive(Debug)]
pub enum Incoming {
    Packet {
        from: NodeKey,
        bytes: Bytes,
    },
    Event {
        region: u16,
        event: RelayEvent,
    },
    /// A packet for `peer` found its region's connection closed for
    /// idleness: open it again and send the packet ([`Relays::wanted`]).
    Wanted {
        peer: NodeKey,
        packet: Bytes,
    },
}

#[derive(Default)]
struct Routes {
    home: Option<RelaySender>,
    by_peer: HashMap<NodeKey, RelaySender>,
    /// Peers whose region has no open connection (closed when idle). Their
    /// packets are dropped, not sent to the home relay where the peer is
    /// not, and the first one asks the mesh task to reconnect.
    parked: std::collections::HashSet<NodeKey>,
    /// Whether this table already asked; one request per table is enough,
    /// since reconnecting publishes a new one.
    asked: std::sync::atomic::AtomicBool,
}

/// The data plane's view: where to queue a relayed packet.
struct Sink {
    routes: Arc<ArcSwap<Routes>>,
    wanted: mpsc::Sender<Incoming>,
}

impl RelaySink for Sink {
    fn send(&self, peer: NodeKey, packet: &[u8]) -> bool {
        let routes = self.routes.load();
        if routes.parked.contains(&peer) {
            if routes.asked.swap(true, Ordering::Relaxed) {
                return false;
            }
            // The first packet rides along: it is often a handshake, which
            // WireGuard would otherwise retry only after 5 s.
            let packet = Bytes::copy_from_slice(packet);
            return self
                .wanted
                .try_send(Incoming::Wanted { peer, packet })
                .is_ok();
        }
        let Some(tx) = routes.by_peer.get(&peer).or(routes.home.as_ref()) else {
            return false;
        };
        tx.try_send(peer, Bytes::copy_from_slice(packet)).is_ok()
    }
}

struct Conn {
    tx: RelaySender,
    pump: JoinHandle<()>,
    last_sent: u64,
    last_active: Instant,
    connected: bool,
    /// Why the last attempt failed (a refused relay key, a TLS error),
    /// until one succeeds: `warren status` and `up` show it.
    last_error: Option<String>,
}

impl Drop for Conn {
    fn drop(&mut self) {
        // Dropping the sender stops the client; the pump ends with it.
        self.pump.abort();
    }
}

pub struct Relays {
    key: PrivateKey,
    tls: Option<Arc<rustls::ClientConfig>>,
    options: RelayOptions,
    map: RelayMap,
    /// The home region, as the agent state chose it.
    home: Option<u16>,
    /// Each peer's home region, from the map.
    peer_region: HashMap<NodeKey, u16>,
    conns: HashMap<u16, Conn>,
    routes: Arc<ArcSwap<Routes>>,
    incoming: mpsc::Sender<Incoming>,
    /// Where the pumps open WireGuard; `None` sends it to the mesh task
    /// as `Incoming::Packet` like everything else.
    data: Option<StreamedParts>,
}

impl Relays {
    /// Returns the pool, the sink to give the data plane's egress, and the
    /// receiver of everything the relays deliver.
    pub fn new(
        key: PrivateKey,
        tls: Option<Arc<rustls::ClientConfig>>,
        options: RelayOptions,
        data: Option<StreamedParts>,
    ) -> (Relays, Box<dyn RelaySink>, mpsc::Receiver<Incoming>) {
        let routes = Arc::new(ArcSwap::from_pointee(Routes::default()));
        let (incoming, rx) = mpsc::channel(1024);
        let sink = Sink {
            routes: routes.clone(),
            wanted: incoming.clone(),
        };
        let pool = Relays {
            key,
            tls,
            options,
            map: RelayMap::default(),
            home: None,
            peer_region: HashMap::new(),
            conns: HashMap::new(),
            routes: routes.clone(),
            incoming,
            data,
        };
        (pool, Box::new(sink), rx)
    }

    /// TLS settings for relays (a private CA); applies to new connections.
    pub fn set_tls(&mut self, tls: Option<Arc<rustls::ClientConfig>>) {
        self.tls = tls;
    }

    pub fn set_map(&mut self, map: RelayMap) {
        if map != self.map {
            self.map = map;
            self.conns
                .retain(|id, _| self.map.regions.iter().any(|r| r.id == *id));
            if self.home.is_some_and(|h| self.region(h).is_none()) {
                self.home = None;
            }
            self.refresh();
        }
    }

    pub fn home(&self) -> Option<u16> {
        self.home
    }

    pub fn region(&self, id: u16) -> Option<&RelayRegion> {
        self.map.regions.iter().find(|r| r.id == id)
    }

    /// Makes `id` the home region (it must be in the map).
    pub fn set_home(&mut self, id: u16) {
        if self.home != Some(id) && self.region(id).is_some() {
            if let Some(r) = self.region(id) {
                tracing::info!(region = %r.name, url = %r.url, "home relay");
            }
            self.home = Some(id);
            self.refresh();
        }
    }

    /// Records where `peer` can be reached (`None`: unknown, use home).
    pub fn set_peer_region(&mut self, peer: NodeKey, region: Option<u16>) {
        let old = match region {
            Some(r) => self.peer_region.insert(peer, r),
            None => self.peer_region.remove(&peer),
        };
        if old != region {
            self.refresh();
        }
    }

    pub fn remove_peer(&mut self, peer: &NodeKey) {
        if self.peer_region.remove(peer).is_some() {
            self.refresh();
        }
    }

    /// The region a relayed packet to `peer` goes through.
    pub fn peer_region(&self, peer: &NodeKey) -> Option<u16> {
        self.peer_region
            .get(peer)
            .copied()
            .filter(|r| self.region(*r).is_some())
            .or(self.home)
    }

    pub fn is_connected(&self, region: u16) -> bool {
        self.conns.get(&region).is_some_and(|c| c.connected)
    }

    /// Why the connection to `region` is down, if it failed.
    pub fn last_error(&self, region: u16) -> Option<String> {
        self.conns
            .get(&region)
            .filter(|c| !c.connected)
            .and_then(|c| c.last_error.clone())
    }

    /// Notes a connection event (called by the mesh for each
    /// [`Incoming::Event`]).
    pub fn note_event(&mut self, region: u16, event: &RelayEvent) {
        if let Some(c) = self.conns.get_mut(&region) {
            match event {
                RelayEvent::Connected { .. } => {
                    c.connected = true;
                    c.last_error = None;
                }
                RelayEvent::Disconnected { error } => {
                    c.connected = false;
                    c.last_error = Some(error.clone());
                }
                _ => {}
            }
        }
    }

    /// Closes non-home connections that carried nothing for a while.
    pub fn close_idle(&mut self, now: Instant) {
        let home = self.home;
        let idle = self.options.idle_close;
        let mut closed = false;
        for (id, c) in self.conns.iter_mut() {
            let sent = c.tx.stats().packets_sent.load(Ordering::Relaxed)
                + c.tx.stats().packets_received.load(Ordering::Relaxed);
            if sent != c.last_sent {
                c.last_sent = sent;
                c.last_active = now;
            } else if Some(*id) != home && now.duration_since(c.last_active) >= idle {
                closed = true;
            }
        }
        if closed {
            self.conns.retain(|id, c| {
                let keep = Some(*id) == home || now.duration_since(c.last_active) < idle;
                if !keep {
                    tracing::info!(region = id, "closing idle relay connection");
                }
                keep
            });
            // Peers of a closed region are parked until they are needed
            // again.
            self.publish();
        }
    }

    /// Reopens the connection to `peer`'s region (a packet for it found
    /// the connection closed) and queues that packet on it; the client
    /// sends it once connected.
    pub fn wanted(&mut self, peer: &NodeKey, packet: Bytes) {
        let Some(id) = self.peer_region(peer) else {
            return;
        };
        if !self.conns.contains_key(&id) {
            if let Some(region) = self.region(id).cloned() {
                tracing::debug!(region = %region.name, "reopening relay connection on demand");
                let conn = self.connect(&region);
                self.conns.insert(id, conn);
            }
        }
        if let Some(c) = self.conns.get(&id) {
            let _ = c.tx.try_send(*peer, packet);
        }
        self.publish();
    }

    /// Closes every connection (the node left the network).
    pub fn clear(&mut self) {
        self.conns.clear();
        self.peer_region.clear();
        self.home = None;
        self.map = RelayMap::default();
        self.publish();
    }

    /// Opens the connections the routes need and publishes the routes.
    fn refresh(&mut self) {
        let mut wanted: Vec<u16> = self.home.into_iter().collect();
        wanted.extend(self.peer_region.values().copied());
        wanted.sort_unstable();
        wanted.dedup();
        for id in wanted {
            if !self.conns.contains_key(&id) {
                if let Some(region) = self.region(id).cloned() {
                    let conn = self.connect(&region);
                    self.conns.insert(id, conn);
                }
            }
        }
        self.publish();
    }

    fn publish(&self) {
        let home = self
            .home
            .and_then(|h| self.conns.get(&h))
            .map(|c| c.tx.clone());
        let mut by_peer = HashMap::new();
        let mut parked = std::collections::HashSet::new();
        for (k, r) in &self.peer_region {
            if Some(*r) == self.home || self.region(*r).is_none() {
                continue;
            }
            match self.conns.get(r) {
                Some(c) => {
                    by_peer.insert(*k, c.tx.clone());
                }
                None => {
                    parked.insert(*k);
                }
            }
        }
        self.routes.store(Arc::new(Routes {
            home,
            by_peer,
            parked,
            asked: Default::default(),
        }));
    }

    /// Whether plain HTTP may go beyond this machine (`agent.insecure_http`).
    pub(super) fn insecure_http(&self) -> bool {
        self.options.insecure_http
    }

    fn connect(&self, region: &RelayRegion) -> Conn {
        let mut cfg = RelayClientConfig::new(region.url.clone());
        // A map may list http:// relays; they are dialled only where plain
        // HTTP is allowed at all (crate::dial::plain_http_allowed).
        cfg.allow_plain = crate::dial::plain_http_allowed(&region.url, self.options.insecure_http);
        cfg.transport = self.options.transport;
        cfg.tls = self.tls.clone();
        cfg.proxy = crate::dial::ProxyConfig::from_env();
        // The map names the relay's key: a server that proves another one
        // is refused before we prove ours (proto::relay::client).
        cfg.session.expected_relay_key = region.key;
        tracing::debug!(region = %region.name, url = %region.url, "connecting to relay");
        let (tx, rx) = RelayClient::connect(cfg, &self.key);
        let pump = tokio::spawn(pump(
            rx,
            region.id,
            self.incoming.clone(),
            self.data.as_ref().map(StreamedParts::opener),
        ));
        Conn {
            tx,
            pump,
            last_sent: 0,
            last_active: Instant::now(),
            connected: false,
            last_error: None,
        }
    }
}

/// Packets a pump takes in one go before it writes them and looks at
/// connection events again.
const PUMP_BATCH: usize = 256;

/// Drains one relay connection: WireGuard is opened here, everything in
/// hand before one TUN write; the rest goes to the mesh task.
async fn pump(
    mut rx: RelayReceiver,
    region: u16,
    out: mpsc::Sender<Incoming>,
    mut data: Option<streamed::StreamedIn>,
) {
    loop {
        let (mut from, mut bytes) = match rx.recv_any().await {
            Some(Received::Packet(from, bytes)) => (from, bytes),
            Some(Received::Event(event)) => {
                if out.send(Incoming::Event { region, event }).await.is_err() {
                    return;
                }
                continue;
            }
            None => return,
        };
        if let Some(d) = data.as_mut() {
            d.set_now(std::time::Instant::now());
        }
        // At most a batch's worth before events get their turn again.
        for _ in 0..PUMP_BATCH {
            match data.as_mut() {
                Some(d) if streamed::is_data(&bytes) => d.open(from, &bytes).await,
                _ => {
                    // What this batch opened so far goes first: nothing
                    // waits behind the mesh task.
                    if let Some(d) = data.as_mut() {
                        d.flush().await;
                    }
                    if out.send(Incoming::Packet { from, bytes }).await.is_err() {
                        return;
                    }
                }
            }
            match rx.try_recv() {
                Some(next) => (from, bytes) = next,
                None => break,
            }
        }
        if let Some(d) = data.as_mut() {
            d.flush().await;
        }
    }
}
