//! TUN → peers: read packets from the device, seal them, send them.
//!
//! One read from an offloading TUN returns a TCP super-packet of up to 64 KB,
//! which tun-rs splits into MTU-sized IP packets. We seal them into one
//! [`TxBatch`] and keep reading while the device has more (without waiting),
//! so that a burst leaves as a few GSO sends instead of one system call per
//! packet. The peer set is loaded once per batch, not per packet.

use std::sync::Arc;

use tun_rs::{AsyncDevice, IDEAL_BATCH_SIZE, VIRTIO_NET_HDR_LEN};

use super::egress::Egress;
use super::udp::TxBatch;
use crate::dataplane::{packet, DataPlane, Drops, PeerSet, Sealed, SEAL_OVERHEAD};

/// Packets per TUN read batch before we flush to the network.
const MAX_BATCH: usize = IDEAL_BATCH_SIZE;

pub struct Outbound {
    pub dp: Arc<DataPlane>,
    pub tun: Arc<AsyncDevice>,
    pub egress: Arc<Egress>,
    pub offload: bool,
    pub mtu: usize,
}

impl Outbound {
    pub async fn run(self) -> std::io::Result<()> {
        // Plaintext packets can reach the MTU; a handshake initiation (148
        // bytes) can come out of a sealing call too.
        let plain = self.mtu.max(148) + 64;
        let mut original = vec![0u8; VIRTIO_NET_HDR_LEN + 65_535];
        let mut bufs = vec![vec![0u8; plain]; MAX_BATCH];
        let mut sizes = vec![0usize; MAX_BATCH];
        let mut flows = crate::dataplane::firewall::FlowCache::default();
        let mut batch = TxBatch::new(
            plain + SEAL_OVERHEAD,
            MAX_BATCH * 2,
            self.egress.udp.max_segments(),
        );
        loop {
            let n = if self.offload {
                self.tun
                    .recv_multiple(&mut original, &mut bufs, &mut sizes, 0)
                    .await?
            } else {
                sizes[0] = self.tun.recv(&mut bufs[0]).await?;
                1
            };
            let set = self.dp.peers();
            self.seal_all(&set, &bufs, &sizes[..n], &mut batch, &mut flows)
                .await;
            // Drain what else is ready, bounded so latency stays low.
            let mut packets = n;
            while packets < MAX_BATCH {
                let more = if self.offload {
                    self.tun
                        .try_recv_multiple(&mut original, &mut bufs, &mut sizes, 0)
                } else {
                    self.tun.try_recv(&mut bufs[0]).map(|len| {
                        sizes[0] = len;
                        1
                    })
                };
                match more {
                    Ok(m) => {
                        packets += m;
                        self.seal_all(&set, &bufs, &sizes[..m], &mut batch, &mut flows)
                            .await;
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(e) => return Err(e),
                }
            }
            batch.flush(&self.egress.udp).await;
            super::spin::activity(std::time::Instant::now());
        }
    }

    async fn seal_all(
        &self,
        set: &PeerSet,
        bufs: &[Vec<u8>],
        sizes: &[usize],
        batch: &mut TxBatch,
        flows: &mut crate::dataplane::firewall::FlowCache,
    ) {
        // One reading of the clock per batch, for the firewall's table.
        let now = std::time::Instant::now();
        for (buf, &len) in bufs.iter().zip(sizes) {
            let pkt = &buf[..len];
            let Some(dst) = packet::destination(pkt) else {
                Drops::bump(&self.dp.drops.malformed);
                continue;
            };
            let Some(peer) = set.routes.lookup(dst) else {
                Drops::bump(&self.dp.drops.no_route);
                continue;
            };
            if batch.slot().is_none() {
                batch.flush(&self.egress.udp).await;
            }
            let Some(slot) = batch.slot() else { continue };
            // Replies to what we send pass the peer's firewall.
            self.dp.firewall.outbound_cached(flows, pkt, now);
            match peer.seal(now, pkt, slot) {
                Sealed::Send { len, to } => batch.commit(len, to),
                // A birthday path: rare, and not batched with the primary socket's.
                sealed @ Sealed::SendOn { .. } => self.egress.send(peer.key, sealed, slot).await,
                Sealed::Relay { len } => self.egress.relay(peer.key, &slot[..len]),
                Sealed::NoEndpoint => Drops::bump(&self.dp.drops.no_endpoint),
                Sealed::Nothing => {}
            }
        }
    }
}
