//! WireGuard that arrives over a stream (a relay connection or a direct TCP
//! stream), opened on the task that received it.
//!
//! Relayed and TCP-carried packets used to cross a channel into the mesh
//! task and be opened there one at a time, each with its own TUN write:
//! two channel hops, the control loop's `select!`, and one system call per
//! packet (docs/architecture.md, "The packet path"). Now each relay pump
//! and each direct TCP reader owns a [`StreamedIn`]: it opens the packets
//! it has in hand into its own [`TunWriter`] batch and writes the batch
//! once, exactly as the UDP readers do. Disco and anything that is not
//! WireGuard still goes to the mesh task, which alone runs traversal.
//!
//! Which peer a packet is opened as: over the relay, the sender the relay
//! authenticated; over direct TCP, the peer whose disco proved the stream
//! (`traversal::Node::tcp_owner`, published to the reader by the mesh task
//! through an [`Owner`] cell). Either way WireGuard authenticates the
//! packet itself: a packet opened as the wrong peer fails decryption and
//! is counted, so a stale owner costs a drop, never a forged packet.

use std::sync::Arc;

use arc_swap::ArcSwapOption;
use tun_rs::{AsyncDevice, IDEAL_BATCH_SIZE};

use super::egress::Egress;
use super::inbound::{Outcome, TunWriter};
use crate::dataplane::{DataPlane, Sealed};
use crate::keys::NodeKey;
use crate::proto::disco;
use crate::traversal::node::is_wireguard;

/// The proven owner of one direct TCP stream, as the mesh task last saw
/// it; `None` while no disco message has proven the stream.
pub type Owner = Arc<ArcSwapOption<NodeKey>>;

/// Whether a stream-carried payload is WireGuard for the data path (not
/// disco, which goes to the mesh task).
pub fn is_data(bytes: &[u8]) -> bool {
    !disco::looks_like_disco(bytes) && is_wireguard(bytes)
}

/// What a task needs to open streamed packets; cloned into each task.
#[derive(Clone)]
pub struct StreamedParts {
    pub dp: Arc<DataPlane>,
    pub tun: Arc<AsyncDevice>,
    pub egress: Arc<Egress>,
    pub mtu: usize,
}

impl StreamedParts {
    /// A task's own opener (its own buffers and GRO table).
    pub fn opener(&self) -> StreamedIn {
        let plain = self.mtu + 64;
        StreamedIn {
            dp: self.dp.clone(),
            egress: self.egress.clone(),
            // Stream packets arrive one frame at a time: a modest batch,
            // each buffer reserved at GRO size when first used.
            writer: TunWriter::new(self.tun.clone(), plain, IDEAL_BATCH_SIZE / 4, false),
            queued: vec![0u8; 256.max(plain)],
        }
    }
}

/// One task's opener: [`StreamedIn::set_now`] once per batch, then
/// [`StreamedIn::open`] for each packet in hand, then [`StreamedIn::flush`]
/// before waiting for more.
pub struct StreamedIn {
    dp: Arc<DataPlane>,
    egress: Arc<Egress>,
    writer: TunWriter,
    /// Where a peer's queued packets are sealed after a handshake reply.
    queued: Vec<u8>,
}

impl StreamedIn {
    /// The time the next packets are opened at (one clock read per batch,
    /// not per packet).
    pub fn set_now(&mut self, now: std::time::Instant) {
        self.writer.set_now(now);
    }

    /// Opens one WireGuard packet `from` a peer into the batch; protocol
    /// replies go back the peer's stream-carried way (its TCP stream when
    /// it has one, else the relay).
    pub async fn open(&mut self, from: NodeKey, bytes: &[u8]) {
        let set = self.dp.peers();
        let Some(peer) = set.by_key(&from) else {
            return;
        };
        let now = self.writer.now();
        match self.writer.open(&self.dp, peer, None, bytes).await {
            Ok(Outcome::Done) => {}
            Ok(Outcome::Reply(len)) => {
                self.egress.relay(from, self.writer.reply(len));
                loop {
                    match peer.flush_queued(now, &mut self.queued) {
                        Sealed::Nothing => break,
                        sealed => self.egress.send(from, sealed, &self.queued).await,
                    }
                }
            }
            Err(e) => tracing::debug!(error = %e, "TUN write failed"),
        }
    }

    /// Writes what the batch holds to the TUN.
    pub async fn flush(&mut self) {
        if let Err(e) = self.writer.flush().await {
            tracing::debug!(error = %e, "TUN write failed");
        }
    }
}
