//! Where sealed packets leave the host: the UDP socket, one of the birthday
//! method's extra sockets, a direct TCP stream to the peer, or the relay.
//!
//! The data plane says per packet whether a peer's path is direct or the
//! relay ([`Sealed`]); this type turns that into the actual send. The relay
//! sink is set once by the mesh task; which region a peer's frames go to
//! is the relays' own `ArcSwap` routing table (`mesh/relays.rs`), read by
//! the packet tasks without a lock. The extra sockets come and go
//! with birthday attempts, so their table is an `ArcSwap` too; the primary
//! socket is a plain field, so the common path costs one match arm and no
//! atomic load.
//!
//! A direct TCP stream carries a peer's packets framed, like the relay: the
//! data plane seals such a peer's packets as [`Sealed::Relay`] ("carried
//! on a stream"), and [`Egress::relay`] looks up the peer's [`StreamTx`]
//! (an `ArcSwap` map, set while traversal's path is that stream) before
//! the relay. Disco for the relay uses [`Egress::via_relay`], which never
//! takes a stream.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use arc_swap::{ArcSwap, ArcSwapOption};
use bytes::Bytes;
use tokio::sync::mpsc;

use super::udp::Udp;
use crate::dataplane::{Drops, Sealed};
use crate::keys::NodeKey;
use crate::path::SocketId;

/// Accepts packets for the relay. It must not block: a full queue drops.
pub trait RelaySink: Send + Sync {
    /// Queues `packet` for `peer`; false when it was dropped.
    fn send(&self, peer: NodeKey, packet: &[u8]) -> bool;
}

/// The writer queue of one direct TCP stream: packets are framed
/// (`proto::stream`) and queued for the stream's writer task. A full
/// queue drops, like the relay's, so one slow stream never holds up the
/// other peers.
#[derive(Debug, Clone)]
pub struct StreamTx(pub mpsc::Sender<Bytes>);

impl StreamTx {
    /// Queues one payload (disco or WireGuard); false when it was dropped.
    pub fn send(&self, packet: &[u8]) -> bool {
        match crate::proto::stream::frame(packet) {
            Ok(f) => self.0.try_send(f).is_ok(),
            Err(_) => false,
        }
    }
}

/// The extra sockets: entry `i` is socket `SocketId(i + 1)`, `None` once
/// closed (ids are positions, so closing one must not renumber the others).
pub type SocketTable = Vec<Option<Arc<Udp>>>;

pub struct Egress {
    pub udp: Arc<Udp>,
    extra: ArcSwap<SocketTable>,
    relay: ArcSwapOption<Box<dyn RelaySink>>,
    /// Peers whose path is a direct TCP stream, and its queue.
    streams: ArcSwap<HashMap<NodeKey, StreamTx>>,
    drops: Arc<Drops>,
}

impl Egress {
    pub fn new(udp: Arc<Udp>, drops: Arc<Drops>) -> Egress {
        Egress {
            udp,
            extra: ArcSwap::from_pointee(Vec::new()),
            relay: ArcSwapOption::empty(),
            streams: ArcSwap::from_pointee(HashMap::new()),
            drops,
        }
    }

    pub fn set_relay(&self, sink: Option<Box<dyn RelaySink>>) {
        self.relay.store(sink.map(Arc::new));
    }

    /// Replaces the table of extra sockets.
    pub fn set_sockets(&self, table: SocketTable) {
        self.extra.store(Arc::new(table));
    }

    /// Extra socket `id`, if it is open (never the primary one).
    pub fn socket(&self, id: SocketId) -> Option<Arc<Udp>> {
        let i = usize::from(id.0).checked_sub(1)?;
        self.extra.load().get(i).cloned().flatten()
    }

    /// Sends one datagram from local socket `socket` (primary or extra).
    pub async fn send_on(&self, socket: SocketId, to: SocketAddr, packet: &[u8]) {
        if socket == SocketId::PRIMARY {
            let _ = self.udp.send(to, packet, None).await;
            return;
        }
        match self.socket(socket) {
            Some(s) => {
                let _ = s.send(to, packet, None).await;
            }
            // The socket closed under a path that still names it: traversal
            // will move the peer; until then its packets have nowhere to go.
            None => Drops::bump(&self.drops.no_endpoint),
        }
    }

    /// Sends `peer`'s stream-carried packets on `stream` (its direct TCP
    /// path), or on the relay again when `None`.
    pub fn set_stream(&self, peer: NodeKey, stream: Option<StreamTx>) {
        let mut map = HashMap::clone(&self.streams.load());
        match stream {
            Some(s) => map.insert(peer, s),
            None => map.remove(&peer),
        };
        self.streams.store(Arc::new(map));
    }

    /// Hands one packet to the peer's TCP stream if it has one, else to the
    /// relay; counts it when it was dropped (a full queue drops, like the
    /// relay's, so one slow stream never holds up the other peers).
    pub fn relay(&self, peer: NodeKey, packet: &[u8]) {
        // The guard is held for one queue push: no Arc clone per packet.
        let streams = self.streams.load();
        match streams.get(&peer) {
            Some(s) => {
                if !s.send(packet) {
                    Drops::bump(&self.drops.no_endpoint);
                }
            }
            None => self.via_relay(peer, packet),
        }
    }

    /// Hands one packet to the relay itself, counting it when there is none.
    pub fn via_relay(&self, peer: NodeKey, packet: &[u8]) {
        let sent = match &*self.relay.load() {
            Some(r) => r.send(peer, packet),
            None => false,
        };
        if !sent {
            Drops::bump(&self.drops.no_endpoint);
        }
    }

    /// Sends one sealed packet (`buf` starts with it) wherever it goes.
    pub async fn send(&self, peer: NodeKey, sealed: Sealed, buf: &[u8]) {
        match sealed {
            Sealed::Send { len, to } => {
                let _ = self.udp.send(to, &buf[..len], None).await;
            }
            Sealed::SendOn { len, to, socket } => self.send_on(socket, to, &buf[..len]).await,
            Sealed::Relay { len } => self.relay(peer, &buf[..len]),
            Sealed::NoEndpoint => Drops::bump(&self.drops.no_endpoint),
            Sealed::Nothing => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataplane::{DataPlane, PeerSpec};
    use crate::keys::PrivateKey;

    fn bind() -> Arc<Udp> {
        Arc::new(Udp::bind(0, false).unwrap())
    }

    fn port(u: &Udp) -> u16 {
        u.local_addr().unwrap().port()
    }

    /// The source port of the next datagram `rx` receives.
    async fn source_port(rx: &Udp) -> u16 {
        let mut buf = vec![0u8; 2048];
        let mut iov = [std::io::IoSliceMut::new(&mut buf)];
        let mut meta = [quinn_udp::RecvMeta::default()];
        let n = tokio::time::timeout(
            std::time::Duration::from_secs(5),
            rx.recv(&mut iov, &mut meta),
        )
        .await
        .expect("a datagram arrives")
        .unwrap();
        assert_eq!(n, 1);
        meta[0].addr.port()
    }

    #[tokio::test]
    async fn a_peer_on_socket_k_sends_from_socket_k() {
        let primary = bind();
        let extra = [bind(), bind(), bind()];
        let rx = bind();
        let to = SocketAddr::from(([127, 0, 0, 1], port(&rx)));
        let dp = DataPlane::new(PrivateKey::generate(), std::time::Instant::now());
        let egress = Egress::new(primary.clone(), dp.drops.clone());
        // Socket 2 was closed: ids are positions and must not shift.
        egress.set_sockets(vec![Some(extra[0].clone()), None, Some(extra[2].clone())]);
        let packet = crate::dataplane::packet::build::ipv4(
            std::net::Ipv4Addr::new(10, 9, 0, 1),
            std::net::Ipv4Addr::new(10, 9, 0, 2),
            b"hi",
        );
        let mut out = vec![0u8; 2048];
        for (socket, want) in [
            (SocketId(3), port(&extra[2])),
            (SocketId(1), port(&extra[0])),
            (SocketId::PRIMARY, port(&primary)),
        ] {
            // A fresh peer each time: before a session, sealing answers with
            // a handshake initiation once (then queues), and that is this
            // peer's packet on this peer's path.
            let other = PrivateKey::generate().public();
            let mut spec = PeerSpec::new(other, vec!["10.9.0.2/32".parse().unwrap()]);
            spec.managed = true;
            dp.upsert_peer(std::time::Instant::now(), spec);
            let set = dp.peers();
            let peer = set.by_key(&other).unwrap();
            peer.set_path(crate::path::Path::Direct(crate::path::DirectPath {
                socket,
                addr: to,
            }));
            let sealed = peer.seal(std::time::Instant::now(), &packet, &mut out);
            let on_extra = socket != SocketId::PRIMARY;
            assert_eq!(
                matches!(sealed, Sealed::SendOn { .. }),
                on_extra,
                "{sealed:?}"
            );
            assert_eq!(
                matches!(sealed, Sealed::Send { .. }),
                !on_extra,
                "{sealed:?}"
            );
            egress.send(other, sealed, &out).await;
            assert_eq!(source_port(&rx).await, want, "path on {socket:?}");
        }

        // A path on a socket that is gone drops, counted, and sends nothing.
        let before = dp.drops.snapshot().no_endpoint;
        egress.send_on(SocketId(2), to, b"x").await;
        assert_eq!(dp.drops.snapshot().no_endpoint, before + 1);
    }

    /// Records what it is given; refuses once `room` is used up, like a
    /// full queue.
    struct Recorder {
        got: std::sync::Mutex<Vec<(NodeKey, Vec<u8>)>>,
        room: usize,
    }

    impl RelaySink for Recorder {
        fn send(&self, peer: NodeKey, packet: &[u8]) -> bool {
            let mut got = self.got.lock().unwrap();
            if got.len() >= self.room {
                return false;
            }
            got.push((peer, packet.to_vec()));
            true
        }
    }

    fn recorder(room: usize) -> Arc<Recorder> {
        Arc::new(Recorder {
            got: Default::default(),
            room,
        })
    }

    struct Shared(Arc<Recorder>);
    impl RelaySink for Shared {
        fn send(&self, peer: NodeKey, packet: &[u8]) -> bool {
            self.0.send(peer, packet)
        }
    }

    #[tokio::test]
    async fn a_peer_with_a_stream_skips_the_relay_and_a_full_stream_drops() {
        let dp = DataPlane::new(PrivateKey::generate(), std::time::Instant::now());
        let egress = Egress::new(bind(), dp.drops.clone());
        let relay = recorder(100);
        // A stream whose writer queue holds one frame.
        let (qtx, mut qrx) = mpsc::channel::<Bytes>(1);
        egress.set_relay(Some(Box::new(Shared(relay.clone()))));
        let (p, q) = (
            PrivateKey::generate().public(),
            PrivateKey::generate().public(),
        );
        egress.set_stream(p, Some(StreamTx(qtx)));
        egress.relay(p, b"to p");
        egress.relay(q, b"to q");
        // Disco for the relay never takes the stream.
        egress.via_relay(p, b"disco p");
        let framed = qrx.try_recv().expect("p's packet is on its stream");
        assert_eq!(
            framed,
            crate::proto::stream::frame(b"to p").unwrap(),
            "framed for the stream"
        );
        let relayed: Vec<Vec<u8>> = relay
            .got
            .lock()
            .unwrap()
            .iter()
            .map(|(_, b)| b.clone())
            .collect();
        assert_eq!(relayed, vec![b"to q".to_vec(), b"disco p".to_vec()]);
        // The stream's queue is full: dropped and counted, not relayed.
        egress.relay(p, b"fills the queue");
        let before = dp.drops.snapshot().no_endpoint;
        egress.relay(p, b"again");
        assert_eq!(dp.drops.snapshot().no_endpoint, before + 1);
        assert_eq!(relay.got.lock().unwrap().len(), 2);
        // Off the stream: back on the relay.
        egress.set_stream(p, None);
        egress.relay(p, b"later");
        assert_eq!(relay.got.lock().unwrap().len(), 3);
    }
}
