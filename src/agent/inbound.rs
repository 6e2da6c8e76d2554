//! Network → TUN: receive datagrams, open them, write the packets out.
//!
//! A receive returns up to a batch of buffers, each possibly holding several
//! datagrams coalesced by UDP GRO. Every datagram is matched to its peer and
//! decrypted straight into a TUN write buffer; the batch then goes to the
//! device through tun-rs's GRO table, which merges consecutive TCP segments
//! of one flow into one super-packet, so the kernel sees a few large writes.
//!
//! Protocol replies (handshake responses, cookies) are rare and are sent at
//! once, from the socket the datagram came in on. Everything else on the
//! socket (disco, STUN answers) is handed to the mesh task through a bounded
//! channel, copied and tagged with the socket: those are a few packets a
//! second, and a full channel drops them (counted) rather than stall the
//! data path.
//!
//! The same loop serves the birthday method's extra sockets ([`Inbound::run_on`]
//! with [`Sizing::EXTRA`]): up to 256 of them are open during an attempt,
//! so each gets a few small buffers instead of the primary socket's
//! megabytes, and the one that wins keeps carrying WireGuard through
//! exactly the code the primary socket uses.

use std::io::IoSliceMut;
use std::net::SocketAddr;
use std::sync::Arc;

use quinn_udp::RecvMeta;
use tokio::sync::mpsc;
use tun_rs::{AsyncDevice, ExpandBuffer, GROTable, IDEAL_BATCH_SIZE, VIRTIO_NET_HDR_LEN};

use super::egress::Egress;
use super::udp::Udp;
use crate::dataplane::firewall::{FlowCache, Verdict};
use crate::dataplane::{DataPlane, Drops, Opened, Peer, PeerSet, Sealed};
use crate::path::SocketId;
use crate::traversal::node::is_wireguard;

/// A datagram that is not WireGuard, for the mesh task: the local socket it
/// came in on, its source, its bytes.
pub type SideDatagram = (SocketId, SocketAddr, Vec<u8>);

/// Most receive buffers per `recvmmsg`.
const MAX_RX_BUFS: usize = 32;

/// Room in front of each decrypted packet for the virtio-net header that
/// tun-rs writes when offload is on.
pub(super) const OFFSET: usize = VIRTIO_NET_HDR_LEN + 6;

pub struct Inbound {
    pub dp: Arc<DataPlane>,
    pub tun: Arc<AsyncDevice>,
    pub egress: Arc<Egress>,
    pub mtu: usize,
    /// Where non-WireGuard datagrams go; `None` drops them (no mesh).
    pub side: Option<mpsc::Sender<SideDatagram>>,
}

/// How much a receive loop holds on to.
#[derive(Debug, Clone, Copy)]
pub struct Sizing {
    /// Receive buffers per `recvmmsg`.
    pub rx_bufs: usize,
    /// Whether the socket coalesces datagrams (GRO): then a buffer must
    /// hold 64 KiB, else one datagram of at most the MTU plus WireGuard's
    /// overhead.
    pub gro: bool,
    /// Whether TUN write buffers are reserved at full GRO size up front
    /// (else each is, the first time it is used).
    pub reserve: bool,
}

impl Sizing {
    /// The primary socket: deep batches, GRO-sized buffers.
    pub const PRIMARY: Sizing = Sizing {
        rx_bufs: MAX_RX_BUFS,
        gro: true,
        reserve: true,
    };
    /// An extra socket, bound without GRO so a buffer of one datagram is
    /// enough: 8 of them still let `recvmmsg` amortise the system call.
    pub const EXTRA: Sizing = Sizing {
        rx_bufs: 8,
        gro: false,
        reserve: false,
    };
}

/// A task's batch of TUN writes: packets are decrypted straight into its
/// buffers and the batch goes to the device in one `send_multiple` through
/// tun-rs's GRO table. Every task that opens WireGuard (the UDP readers,
/// the relay pumps, the direct TCP readers: see `agent::streamed`) has
/// its own, so none waits on another's lock or buffers.
pub(super) struct TunWriter {
    tun: Arc<AsyncDevice>,
    bufs: Vec<TunBuf>,
    used: usize,
    plain: usize,
    gro: GROTable,
    /// This task's memory of the flows the firewall let through.
    flows: FlowCache,
    /// The clock, read once per receive batch for the firewall.
    now: std::time::Instant,
}

/// What [`TunWriter::open`] did with one datagram.
pub(super) enum Outcome {
    /// Queued for the TUN, dropped, or nothing to deliver.
    Done,
    /// A protocol reply of this many bytes ([`TunWriter::reply`]) to send
    /// back the way the datagram came; then the peer's queued packets.
    Reply(usize),
}

impl TunWriter {
    /// `batch` buffers for packets of up to `plain` bytes; `reserve` sizes
    /// each for a full GRO super-packet up front.
    pub(super) fn new(tun: Arc<AsyncDevice>, plain: usize, batch: usize, reserve: bool) -> Self {
        let cap = if reserve { GRO_CAP } else { 0 };
        TunWriter {
            tun,
            // GRO grows a coalesced buffer up to 64 KB; reserve it once.
            bufs: (0..batch.max(1))
                .map(|_| TunBuf::with_capacity(cap))
                .collect(),
            used: 0,
            plain,
            gro: GROTable::default(),
            flows: FlowCache::default(),
            now: std::time::Instant::now(),
        }
    }

    /// The time the firewall judges the next packets at.
    pub(super) fn set_now(&mut self, now: std::time::Instant) {
        self.now = now;
    }

    pub(super) fn now(&self) -> std::time::Instant {
        self.now
    }

    /// Opens `dgram` from `peer` (`from`: the address it came from, `None`
    /// over a stream) into the batch, through the firewall; writes the
    /// batch first when it is full.
    pub(super) async fn open(
        &mut self,
        dp: &DataPlane,
        peer: &Peer,
        from: Option<SocketAddr>,
        dgram: &[u8],
    ) -> std::io::Result<Outcome> {
        if self.used == self.bufs.len() {
            self.flush().await?;
        }
        let buf = &mut self.bufs[self.used];
        // tun-rs merges segments only into a buffer whose capacity already
        // holds the super-packet, and never grows one: reserve it the first
        // time this buffer is used (a task that never batches much keeps
        // little memory).
        buf.reserve_gro();
        // Protocol replies (handshake response, cookie) fit in 256 bytes.
        buf.set_len(OFFSET + self.plain.max(256));
        match peer.open(self.now, from, dgram, &mut buf.as_mut()[OFFSET..]) {
            Opened::Tunnel { len } => {
                let packet = &buf.as_ref()[OFFSET..OFFSET + len];
                if dp
                    .firewall
                    .inbound_cached(&mut self.flows, packet, self.now)
                    == Verdict::Pass
                {
                    buf.set_len(OFFSET + len);
                    self.used += 1;
                }
            }
            Opened::Reply { len } => return Ok(Outcome::Reply(len)),
            Opened::Nothing | Opened::Spoofed => {}
            Opened::Rejected(_) => Drops::bump(&dp.drops.auth),
        }
        Ok(Outcome::Done)
    }

    /// The reply [`Outcome::Reply`] announced (valid until the next `open`).
    pub(super) fn reply(&self, len: usize) -> &[u8] {
        &self.bufs[self.used].as_ref()[OFFSET..OFFSET + len]
    }

    /// Writes the batch to the TUN.
    pub(super) async fn flush(&mut self) -> std::io::Result<()> {
        if self.used == 0 {
            return Ok(());
        }
        let res = self
            .tun
            .send_multiple(&mut self.gro, &mut self.bufs[..self.used], OFFSET)
            .await;
        self.used = 0;
        match res {
            Ok(_) => Ok(()),
            // A packet the kernel refuses (bad checksum, no route) must not
            // stop the tunnel.
            Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
                tracing::debug!(error = %e, "TUN write failed");
                Ok(())
            }
            Err(e) => Err(e),
        }
    }
}

impl Inbound {
    /// Serves the primary socket.
    pub async fn run(self) -> std::io::Result<()> {
        let udp = self.egress.udp.clone();
        self.run_on(SocketId::PRIMARY, &udp, Sizing::PRIMARY).await
    }

    /// Serves local socket `socket` (`udp`) until it fails.
    pub async fn run_on(self, socket: SocketId, udp: &Udp, size: Sizing) -> std::io::Result<()> {
        let plain = self.mtu + 64;
        // WireGuard adds 32 bytes; a little more lets oversized junk show as
        // a failed open rather than a truncated one.
        let rx_len = if size.gro { 65_535 } else { plain + 64 };
        let used = size.rx_bufs.clamp(1, MAX_RX_BUFS);
        // A fixed array, so the batch's iovecs can be built on the stack
        // (`each_mut`) instead of allocating a Vec of them per receive;
        // entries past `used` stay empty and cost nothing.
        let mut rx: [Vec<u8>; MAX_RX_BUFS] = std::array::from_fn(|i| {
            if i < used {
                vec![0u8; rx_len]
            } else {
                Vec::new()
            }
        });
        let mut meta = vec![RecvMeta::default(); used];
        let batch = if size.reserve {
            IDEAL_BATCH_SIZE
        } else {
            size.rx_bufs
        };
        let mut out = TunWriter::new(self.tun.clone(), plain, batch, size.reserve);
        let mut reply = vec![0u8; 256.max(plain)];
        loop {
            let n = {
                let mut iovs = rx.each_mut().map(|b| IoSliceMut::new(b));
                udp.recv(&mut iovs[..used], &mut meta).await?
            };
            let set = self.dp.peers();
            let now = std::time::Instant::now();
            out.set_now(now);
            super::spin::activity(now);
            for (buf, m) in rx.iter().zip(&meta[..n]) {
                let stride = m.stride.max(1);
                for dgram in buf[..m.len].chunks(stride) {
                    self.open_one(&set, (socket, udp), m.addr, dgram, &mut out, &mut reply)
                        .await?;
                }
            }
            out.flush().await?;
        }
    }

    async fn open_one(
        &self,
        set: &PeerSet,
        (socket, udp): (SocketId, &Udp),
        from: SocketAddr,
        dgram: &[u8],
        out: &mut TunWriter,
        reply: &mut [u8],
    ) -> std::io::Result<()> {
        if !is_wireguard(dgram) {
            let sent = self
                .side
                .as_ref()
                .is_some_and(|side| side.try_send((socket, from, dgram.to_vec())).is_ok());
            if !sent {
                Drops::bump(&self.dp.drops.malformed);
            }
            return Ok(());
        }
        let now = out.now;
        let peer = match self.dp.peer_for(now, set, from, dgram, reply) {
            Ok(p) => p,
            Err(0) => return Ok(()),
            Err(cookie) => {
                let _ = udp.send(from, &reply[..cookie], None).await;
                return Ok(());
            }
        };
        if let Outcome::Reply(len) = out.open(&self.dp, &peer, Some(from), dgram).await? {
            let _ = udp.send(from, out.reply(len), None).await;
            loop {
                match peer.flush_queued(now, reply) {
                    Sealed::Nothing => break,
                    sealed => self.egress.send(peer.key, sealed, reply).await,
                }
            }
        }
        Ok(())
    }
}

/// A TUN write buffer whose length is kept apart from its initialised
/// bytes. A `Vec` truncated to one packet must zero-fill up to the MTU again
/// before the next packet can be decrypted into it; this one only zeroes
/// bytes it never held, so reuse costs nothing per packet. tun-rs's GRO
/// grows and extends it through [`ExpandBuffer`].
pub(super) struct TunBuf {
    /// Initialised bytes: the most this buffer ever held.
    data: Vec<u8>,
    /// Bytes of the current packet (or coalesced packets).
    len: usize,
}

/// What a TUN write buffer must hold for tun-rs to merge into it: a 64 KiB
/// super-packet and twice the virtio header's room (tun-rs's own test
/// before it coalesces).
const GRO_CAP: usize = 2 * OFFSET + 65_535;

impl TunBuf {
    /// Makes room for a full GRO super-packet, once.
    fn reserve_gro(&mut self) {
        if self.data.capacity() < GRO_CAP {
            self.data.reserve_exact(GRO_CAP - self.data.len());
        }
    }

    pub(super) fn with_capacity(n: usize) -> TunBuf {
        TunBuf {
            data: Vec::with_capacity(n),
            len: 0,
        }
    }

    /// Sets the length, exposing stale bytes of earlier packets rather than
    /// zeroing them; only the caller's writes are ever sent.
    pub(super) fn set_len(&mut self, len: usize) {
        if self.data.len() < len {
            self.data.resize(len, 0);
        }
        self.len = len;
    }
}

impl AsRef<[u8]> for TunBuf {
    fn as_ref(&self) -> &[u8] {
        &self.data[..self.len]
    }
}

impl AsMut<[u8]> for TunBuf {
    fn as_mut(&mut self) -> &mut [u8] {
        &mut self.data[..self.len]
    }
}

impl ExpandBuffer for TunBuf {
    fn buf_capacity(&self) -> usize {
        self.data.capacity()
    }

    fn buf_resize(&mut self, new_len: usize, value: u8) {
        let old = self.len;
        self.set_len(new_len);
        if new_len > old {
            self.data[old..new_len].fill(value);
        }
    }

    fn buf_extend_from_slice(&mut self, src: &[u8]) {
        let start = self.len;
        self.set_len(start + src.len());
        self.data[start..self.len].copy_from_slice(src);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tun_buf_reuse_keeps_contract() {
        let mut b = TunBuf::with_capacity(64);
        b.set_len(8);
        b.as_mut().copy_from_slice(b"abcdefgh");
        b.set_len(3);
        assert_eq!(b.as_ref(), b"abc");
        b.buf_extend_from_slice(b"XY");
        assert_eq!(b.as_ref(), b"abcXY");
        b.buf_resize(7, 0);
        assert_eq!(b.as_ref(), b"abcXY\0\0", "growth is filled with the value");
        b.buf_resize(2, 0);
        assert_eq!(b.as_ref(), b"ab");
        assert!(b.buf_capacity() >= 64);
    }
}
