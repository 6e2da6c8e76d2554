//! Network → TUN: receive datagrams, open them, write the packets out.
//!
//! A receive returns up to a batch of buffers, each possibly holding several
//! datagrams coalesced by UDP GRO. Every datagram is matched to its peer and
//! decrypted straight into a TUN write buffer; the batch then goes to the
//! device through tun-rs's GRO table, which merges consecutive TCP segments
//! of one flow into one super-packet, so the kernel sees a few large writes.
//!
//! Protocol replies (handshake responses, cookies) are rare and are sent at
//! once. Non-WireGuard datagrams are dropped and counted here; disco and
//! STUN will be demultiplexed at this point when they share the socket.

use std::io::IoSliceMut;
use std::net::SocketAddr;
use std::sync::Arc;

use quinn_udp::RecvMeta;
use tun_rs::{AsyncDevice, GROTable, IDEAL_BATCH_SIZE, VIRTIO_NET_HDR_LEN};

use super::egress::Egress;
use crate::dataplane::{DataPlane, Drops, Opened, PeerSet, Sealed};

/// Receive buffers per `recvmmsg`.
const RX_BUFS: usize = 32;
/// Room in front of each decrypted packet for the virtio-net header that
/// tun-rs writes when offload is on.
const OFFSET: usize = VIRTIO_NET_HDR_LEN + 6;

pub struct Inbound {
    pub dp: Arc<DataPlane>,
    pub tun: Arc<AsyncDevice>,
    pub egress: Arc<Egress>,
    pub mtu: usize,
}

struct TunBatch {
    bufs: Vec<Vec<u8>>,
    used: usize,
    plain: usize,
    gro: GROTable,
}

impl Inbound {
    pub async fn run(self) -> std::io::Result<()> {
        let rx_size = 65_535;
        let mut rx: Vec<Vec<u8>> = (0..RX_BUFS).map(|_| vec![0u8; rx_size]).collect();
        let mut meta = vec![RecvMeta::default(); RX_BUFS];
        let plain = self.mtu + 64;
        let mut out = TunBatch {
            // GRO grows a coalesced buffer up to 64 KB; reserve it once.
            bufs: (0..IDEAL_BATCH_SIZE)
                .map(|_| Vec::with_capacity(OFFSET + 65_535))
                .collect(),
            used: 0,
            plain,
            gro: GROTable::default(),
        };
        let mut reply = vec![0u8; 256.max(plain)];
        loop {
            let n = {
                let mut iovs: Vec<IoSliceMut<'_>> =
                    rx.iter_mut().map(|b| IoSliceMut::new(b)).collect();
                self.egress.udp.recv(&mut iovs, &mut meta).await?
            };
            let set = self.dp.peers();
            for (buf, m) in rx.iter().zip(&meta[..n]) {
                let stride = m.stride.max(1);
                for dgram in buf[..m.len].chunks(stride) {
                    self.open_one(&set, m.addr, dgram, &mut out, &mut reply)
                        .await?;
                }
            }
            self.flush(&mut out).await?;
        }
    }

    async fn open_one(
        &self,
        set: &PeerSet,
        from: SocketAddr,
        dgram: &[u8],
        out: &mut TunBatch,
        reply: &mut [u8],
    ) -> std::io::Result<()> {
        if !matches!(dgram.first(), Some(1..=4)) {
            Drops::bump(&self.dp.drops.malformed);
            return Ok(());
        }
        let peer = match self.dp.peer_for(set, from, dgram, reply) {
            Ok(p) => p,
            Err(0) => return Ok(()),
            Err(cookie) => {
                let _ = self.egress.udp.send(from, &reply[..cookie], None).await;
                return Ok(());
            }
        };
        if out.used == out.bufs.len() {
            self.flush(out).await?;
        }
        let buf = &mut out.bufs[out.used];
        buf.clear();
        buf.resize(OFFSET + out.plain, 0);
        match peer.open(Some(from), dgram, &mut buf[OFFSET..]) {
            Opened::Tunnel { len } => {
                buf.truncate(OFFSET + len);
                out.used += 1;
            }
            Opened::Reply { len } => {
                let _ = self
                    .egress
                    .udp
                    .send(from, &buf[OFFSET..OFFSET + len], None)
                    .await;
                loop {
                    match peer.flush_queued(reply) {
                        Sealed::Nothing => break,
                        sealed => self.egress.send(peer.key, sealed, reply).await,
                    }
                }
            }
            Opened::Nothing | Opened::Spoofed => {}
            Opened::Rejected(_) => Drops::bump(&self.dp.drops.auth),
        }
        Ok(())
    }

    async fn flush(&self, out: &mut TunBatch) -> std::io::Result<()> {
        if out.used == 0 {
            return Ok(());
        }
        let res = self
            .tun
            .send_multiple(&mut out.gro, &mut out.bufs[..out.used], OFFSET)
            .await;
        out.used = 0;
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
