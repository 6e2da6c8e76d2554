//! The direct TCP path's sockets: one listening port, the dials of a
//! simultaneous open, the streams, and STUN over TCP to learn the port's
//! public address.
//!
//! Every socket here is bound to the same local port (`[agent] tcp_port`)
//! with `SO_REUSEADDR` and `SO_REUSEPORT`: the listener, each dial, and the
//! STUN query. That is what makes simultaneous open work behind a NAT that
//! keeps source ports (a masquerade): the port the coordinator's STUN
//! server saw is the port the peer dials, and our own dial to the peer
//! leaves from it too, so both SYNs cross each NAT on the mapping the other
//! side's SYN opened. Whichever of dial and accept yields a stream first
//! wins; a second stream to the same address is dropped.
//!
//! Streams carry `proto::stream` frames. Each has a reader task and a
//! writer task behind a bounded queue ([`StreamTx`]: a full queue drops the
//! packet, so a slow stream never blocks the sender of another peer's
//! packets). The reader opens WireGuard itself once the stream is proven
//! (the mesh task publishes the stream's owner in an [`Owner`] cell after
//! each disco message it handles) and writes it to the TUN in batches
//! (`agent::streamed`); disco, and WireGuard before the proof, go to the
//! mesh task. The mesh task
//! owns the table of streams; nothing here decides anything: traversal
//! says when to dial and what to close.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use socket2::{Domain, Protocol, Socket, Type};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::agent::egress::StreamTx;
use crate::agent::streamed::{self, Owner, StreamedIn, StreamedParts};
use crate::keys::NodeKey;
use crate::proto::stream::StreamDecoder;
use crate::proto::stun;

/// Packets queued per stream before new ones are dropped.
const STREAM_QUEUE: usize = 1024;
/// One dial round: a fresh SYN to every target, then this long to connect.
const DIAL_ROUND: Duration = Duration::from_millis(1000);
/// Pause between dial rounds.
const DIAL_PAUSE: Duration = Duration::from_millis(100);
/// Longest a STUN-over-TCP query may take.
const STUN_TIMEOUT: Duration = Duration::from_secs(3);
/// Most streams held at once; a stranger who connects again and again to
/// the listening port gets refused past this.
const MAX_STREAMS: usize = 256;

/// What the TCP tasks tell the mesh task.
pub enum TcpIncoming {
    /// A stream is up: dialled (for `peer`) or accepted (`peer` unknown).
    Up {
        stream: TcpStream,
        addr: SocketAddr,
        peer: Option<NodeKey>,
    },
    Frame {
        addr: SocketAddr,
        id: u64,
        bytes: Bytes,
    },
    Closed {
        addr: SocketAddr,
        id: u64,
    },
    /// Our listening port as the STUN server saw it (`None`: no answer),
    /// and how long the exchange took (connect included).
    Stun {
        seen: Option<SocketAddr>,
        took: Duration,
    },
}

struct Stream {
    id: u64,
    tx: StreamTx,
    /// The peer that proved the stream, for its reader.
    owner: Owner,
    reader: JoinHandle<()>,
}

/// See the module doc.
pub struct TcpPaths {
    port: u16,
    tx: mpsc::Sender<TcpIncoming>,
    listener: Option<JoinHandle<()>>,
    streams: HashMap<SocketAddr, Stream>,
    dials: HashMap<NodeKey, JoinHandle<()>>,
    next_id: u64,
    /// Where readers open WireGuard; `None` sends it all to the mesh.
    data: Option<StreamedParts>,
}

/// A TCP socket on `port` that shares it with the listener and the dials.
fn reusable(port: u16) -> std::io::Result<Socket> {
    let s = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))?;
    s.set_reuse_address(true)?;
    s.set_reuse_port(true)?;
    crate::sockmark::apply(&s);
    s.set_nonblocking(true)?;
    s.bind(&SocketAddr::from((Ipv4Addr::UNSPECIFIED, port)).into())?;
    Ok(s)
}

async fn connect_from(port: u16, to: SocketAddr) -> std::io::Result<TcpStream> {
    let sock = TcpSocket::from_std_stream(reusable(port)?.into());
    sock.set_nodelay(true)?;
    sock.connect(to).await
}

impl TcpPaths {
    /// Binds the listening port (0: the direct TCP path is off) and starts
    /// accepting. A port that cannot be bound turns the feature off, with a
    /// warning: the relay still works.
    pub fn new(port: u16, tx: mpsc::Sender<TcpIncoming>, data: Option<StreamedParts>) -> TcpPaths {
        let mut paths = TcpPaths {
            port: 0,
            tx,
            listener: None,
            streams: HashMap::new(),
            dials: HashMap::new(),
            next_id: 0,
            data,
        };
        if port == 0 {
            return paths;
        }
        let listener = reusable(port)
            .and_then(|s| {
                s.listen(64)?;
                TcpListener::from_std(s.into())
            })
            .and_then(|l| Ok((l.local_addr()?.port(), l)));
        match listener {
            Ok((bound, l)) => {
                tracing::info!(port = bound, "direct tcp: listening");
                paths.port = bound;
                let tx = paths.tx.clone();
                paths.listener = Some(tokio::spawn(accept_loop(l, tx)));
            }
            Err(e) => tracing::warn!(port, error = %e, "direct tcp: cannot listen; relay only"),
        }
        paths
    }

    /// The listening port, 0 when off or when it could not be bound.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Asks `server` (a STUN server's address, TCP on the same port) what
    /// our listening port looks like from outside; answers with
    /// [`TcpIncoming::Stun`].
    pub fn query_stun(&self, server: SocketAddr) {
        if self.port == 0 {
            return;
        }
        let (port, tx) = (self.port, self.tx.clone());
        tokio::spawn(async move {
            let sent = Instant::now();
            let seen = tokio::time::timeout(STUN_TIMEOUT, stun_over_tcp(port, server))
                .await
                .ok()
                .and_then(|r| r.map_err(|e| tracing::debug!(error = %e, "tcp stun")).ok());
            let took = sent.elapsed();
            let _ = tx.send(TcpIncoming::Stun { seen, took }).await;
        });
    }

    /// Dials `targets` for `peer` until one connects or `until`.
    pub fn dial(&mut self, peer: NodeKey, targets: Vec<SocketAddr>, until: Instant) {
        if self.port == 0 {
            return;
        }
        let (port, tx) = (self.port, self.tx.clone());
        let task = tokio::spawn(async move {
            let until = tokio::time::Instant::from_std(until);
            while tokio::time::Instant::now() < until {
                let mut round = tokio::task::JoinSet::new();
                for &t in &targets {
                    round.spawn(async move {
                        let r = tokio::time::timeout(DIAL_ROUND, connect_from(port, t)).await;
                        (t, r)
                    });
                }
                while let Some(done) = round.join_next().await {
                    if let Ok((addr, Ok(Ok(stream)))) = done {
                        let up = TcpIncoming::Up {
                            stream,
                            addr,
                            peer: Some(peer),
                        };
                        let _ = tx.send(up).await;
                        return;
                    }
                }
                tokio::time::sleep(DIAL_PAUSE).await;
            }
        });
        if let Some(old) = self.dials.insert(peer, task) {
            old.abort();
        }
    }

    /// Takes a stream that came up; `false` if one to `addr` exists (the
    /// new one is dropped: first wins).
    pub fn adopt(&mut self, stream: TcpStream, addr: SocketAddr, peer: Option<NodeKey>) -> bool {
        if let Some(p) = peer {
            if let Some(d) = self.dials.remove(&p) {
                d.abort();
            }
        }
        if self.streams.contains_key(&addr) || self.streams.len() >= MAX_STREAMS {
            return false;
        }
        let _ = stream.set_nodelay(true);
        self.next_id += 1;
        let id = self.next_id;
        let (rd, mut wr) = stream.into_split();
        let (qtx, mut qrx) = mpsc::channel::<Bytes>(STREAM_QUEUE);
        let tx = self.tx.clone();
        tokio::spawn(async move {
            while let Some(frame) = qrx.recv().await {
                if wr.write_all(&frame).await.is_err() {
                    break;
                }
            }
            let _ = wr.shutdown().await;
        });
        let owner = Owner::default();
        let data = self.data.as_ref().map(StreamedParts::opener);
        let reader = tokio::spawn(read_loop(rd, (addr, id), tx, owner.clone(), data));
        self.streams.insert(
            addr,
            Stream {
                id,
                tx: StreamTx(qtx),
                owner,
                reader,
            },
        );
        true
    }

    /// Queues one payload (disco or WireGuard) on the stream to `addr`.
    pub fn send(&self, addr: SocketAddr, payload: &[u8]) -> bool {
        self.streams.get(&addr).is_some_and(|s| s.tx.send(payload))
    }

    /// The egress's handle on the stream to `addr`.
    pub fn sink(&self, addr: SocketAddr) -> Option<StreamTx> {
        self.streams.get(&addr).map(|s| s.tx.clone())
    }

    /// Tells the reader of the stream to `addr` which peer proved it
    /// (traversal's `Node::tcp_owner`), so it opens that peer's WireGuard
    /// itself.
    pub fn set_owner(&self, addr: SocketAddr, owner: Option<NodeKey>) {
        if let Some(s) = self.streams.get(&addr) {
            if s.owner.load().as_deref() != owner.as_ref() {
                s.owner.store(owner.map(Arc::new));
            }
        }
    }

    /// Whether `id` is the live stream to `addr` (a late report from a
    /// replaced stream must not close the new one).
    pub fn is_current(&self, addr: SocketAddr, id: u64) -> bool {
        self.streams.get(&addr).is_some_and(|s| s.id == id)
    }

    /// Closes the stream to `addr`: the reader stops, and the writer ends
    /// once its queue is dropped.
    pub fn close(&mut self, addr: SocketAddr) {
        if let Some(s) = self.streams.remove(&addr) {
            s.reader.abort();
        }
    }

    /// Closes everything (leaving the network).
    pub fn clear(&mut self) {
        let addrs: Vec<SocketAddr> = self.streams.keys().copied().collect();
        for a in addrs {
            self.close(a);
        }
        for (_, d) in self.dials.drain() {
            d.abort();
        }
    }
}

impl Drop for TcpPaths {
    fn drop(&mut self) {
        self.clear();
        if let Some(l) = self.listener.take() {
            l.abort();
        }
    }
}

async fn accept_loop(listener: TcpListener, tx: mpsc::Sender<TcpIncoming>) {
    loop {
        match listener.accept().await {
            Ok((stream, addr)) => {
                let addr = SocketAddr::new(addr.ip().to_canonical(), addr.port());
                let up = TcpIncoming::Up {
                    stream,
                    addr,
                    peer: None,
                };
                if tx.send(up).await.is_err() {
                    return;
                }
            }
            Err(e) => {
                tracing::debug!(error = %e, "direct tcp: accept");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn read_loop(
    mut rd: tokio::net::tcp::OwnedReadHalf,
    (addr, id): (SocketAddr, u64),
    tx: mpsc::Sender<TcpIncoming>,
    owner: Owner,
    mut data: Option<StreamedIn>,
) {
    let mut dec = StreamDecoder::new();
    let mut buf = vec![0u8; 64 * 1024];
    'read: loop {
        let n = match rd.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        dec.push(&buf[..n]);
        // Once per read, not per frame: the owner and the clock.
        let proven = owner.load_full();
        if let Some(d) = data.as_mut() {
            d.set_now(std::time::Instant::now());
        }
        loop {
            match dec.next_frame() {
                Ok(Some(bytes)) => match (data.as_mut(), proven.as_deref()) {
                    (Some(d), Some(peer)) if streamed::is_data(&bytes) => {
                        d.open(*peer, &bytes).await;
                    }
                    _ => {
                        // What this read opened so far goes first: nothing
                        // waits behind the mesh task, nor comes after
                        // packets it opens from this frame on.
                        if let Some(d) = data.as_mut() {
                            d.flush().await;
                        }
                        let frame = TcpIncoming::Frame { addr, id, bytes };
                        if tx.send(frame).await.is_err() {
                            return;
                        }
                    }
                },
                Ok(None) => break,
                Err(e) => {
                    tracing::debug!(%addr, error = %e, "direct tcp: bad frame; closing");
                    // The frames before it were opened: deliver them.
                    if let Some(d) = data.as_mut() {
                        d.flush().await;
                    }
                    break 'read;
                }
            }
        }
        // Everything this read held goes to the TUN in one write.
        if let Some(d) = data.as_mut() {
            d.flush().await;
        }
    }
    let _ = tx.send(TcpIncoming::Closed { addr, id }).await;
}

/// RFC 8489 §6.2.2: a Binding request on a TCP connection from our
/// listening port; STUN messages frame themselves (20-byte header with the
/// body length).
async fn stun_over_tcp(port: u16, server: SocketAddr) -> std::io::Result<SocketAddr> {
    let bad = |e: stun::StunError| std::io::Error::new(std::io::ErrorKind::InvalidData, e);
    let mut s = connect_from(port, server).await?;
    let tx = stun::TransactionId::random(&mut rand::thread_rng());
    s.write_all(&stun::binding_request(tx)).await?;
    let mut msg = vec![0u8; 20];
    s.read_exact(&mut msg).await?;
    let len = usize::from(u16::from_be_bytes([msg[2], msg[3]]));
    if 20 + len > stun::MAX_MESSAGE_LEN {
        return Err(bad(stun::StunError::Truncated(len)));
    }
    msg.resize(20 + len, 0);
    s.read_exact(&mut msg[20..]).await?;
    let (got, addr) = stun::parse_binding_response(&msg).map_err(bad)?;
    if got != tx {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "STUN answer for another transaction",
        ));
    }
    Ok(addr)
}

impl super::Mesh {
    /// News from the TCP tasks: streams up and down, frames, STUN answers.
    pub(super) async fn on_tcp(&mut self, inc: TcpIncoming) {
        let now = Instant::now();
        match inc {
            TcpIncoming::Up { stream, addr, peer } => {
                if !self.tcp.adopt(stream, addr, peer) {
                    return;
                }
                tracing::info!(%addr, dialled = peer.is_some(), "direct tcp: stream up");
                // Traversal closes it (`Output::TcpClose`) unless a peer
                // proves it its own in time.
                self.state.handle_tcp_up(now, addr, peer);
            }
            TcpIncoming::Frame { addr, id, bytes } => {
                if !self.tcp.is_current(addr, id) {
                    return;
                }
                let (what, owner) = self.state.handle_tcp_frame(now, addr, &bytes);
                // A disco message may have proven the stream: from now on
                // its reader opens the owner's WireGuard itself.
                self.tcp.set_owner(addr, owner);
                if what != crate::traversal::node::Datagram::WireGuard {
                    return;
                }
                if let Some(peer) = owner {
                    self.open_streamed(peer, &bytes).await;
                }
            }
            TcpIncoming::Closed { addr, id } => {
                if !self.tcp.is_current(addr, id) {
                    return;
                }
                tracing::info!(%addr, "direct tcp: stream closed");
                self.tcp.close(addr);
                self.state.handle_tcp_closed(now, addr);
            }
            TcpIncoming::Stun { seen, took } => self.state.handle_tcp_stun(now, seen, took),
        }
    }
}
