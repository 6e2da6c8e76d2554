//! The birthday method's extra UDP sockets: opened when traversal asks
//! (`NodeEvent::OpenSockets`), closed when it is done with them, except the
//! ones a direct path now runs over.
//!
//! Each socket is a [`Udp`] (quinn-udp) bound to an ephemeral port with
//! offload off, served by its own [`Inbound`] loop with small buffers
//! ([`Sizing::EXTRA`]). Using the primary socket's type and receive loop,
//! rather than plain tokio sockets and a loop of their own, means a path
//! that wins over socket `k` carries WireGuard through exactly the code the
//! primary socket uses (open, cookie and handshake replies from the socket
//! the datagram came in on, disco and STUN to the mesh), and the egress can
//! send on any socket the same way. Offload is off because 256 sockets with
//! GRO-sized buffers would hold tens of megabytes for a 30-second attempt;
//! without GRO a buffer holds one datagram, so a few MTU-sized ones do.
//!
//! Ids are positions: socket `SocketId(i)` is `slots[i - 1]`, and a closed
//! socket leaves a hole, so the ids traversal already uses never move.

use std::sync::Arc;

use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tun_rs::AsyncDevice;

use crate::agent::egress::Egress;
use crate::agent::inbound::{Inbound, SideDatagram, Sizing};
use crate::agent::udp::Udp;
use crate::dataplane::DataPlane;
use crate::path::SocketId;

struct Slot {
    udp: Arc<Udp>,
    reader: JoinHandle<()>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        // The reader holds the other reference to the socket; ending it
        // closes the port.
        self.reader.abort();
    }
}

pub(super) struct ExtraSockets {
    slots: Vec<Option<Slot>>,
    dp: Arc<DataPlane>,
    tun: Arc<AsyncDevice>,
    egress: Arc<Egress>,
    mtu: usize,
    side: mpsc::Sender<SideDatagram>,
}

impl ExtraSockets {
    pub(super) fn new(
        dp: Arc<DataPlane>,
        tun: Arc<AsyncDevice>,
        egress: Arc<Egress>,
        side: mpsc::Sender<SideDatagram>,
    ) -> ExtraSockets {
        // Only sizes receive buffers; 1500 covers every link we run on if
        // the device cannot say.
        let mtu = tun.mtu().map_or(1500, usize::from);
        ExtraSockets {
            slots: Vec::new(),
            dp,
            tun,
            egress,
            mtu,
            side,
        }
    }

    /// Opens sockets `1..=count` (those still open, kept from an earlier
    /// attempt, stay as they are). Returns how many of the first ids are
    /// open, which is what traversal may use: fewer than `count` if the
    /// host ran out of ports or descriptors.
    pub(super) fn open(&mut self, count: u16) -> u16 {
        let want = usize::from(count);
        if self.slots.len() < want {
            self.slots.resize_with(want, || None);
        }
        let mut ready = 0u16;
        let mut failed = None;
        for i in 0..want {
            if self.slots[i].is_none() {
                match Udp::bind(0, false) {
                    Ok(udp) => self.slots[i] = Some(self.serve(i, udp)),
                    Err(e) => {
                        failed = Some(e);
                        break;
                    }
                }
            }
            ready += 1;
        }
        if let Some(e) = failed {
            tracing::warn!(error = %e, opened = ready, wanted = count, "extra sockets: bind failed");
        } else {
            tracing::debug!(count, "extra sockets open");
        }
        self.publish();
        ready
    }

    /// Closes every extra socket not in `keep`.
    pub(super) fn close(&mut self, keep: &[SocketId]) {
        for (i, slot) in self.slots.iter_mut().enumerate() {
            if !keep.contains(&id(i)) {
                *slot = None;
            }
        }
        while matches!(self.slots.last(), Some(None)) {
            self.slots.pop();
        }
        tracing::debug!(kept = ?keep, "extra sockets closed");
        self.publish();
    }

    /// How many extra sockets are open.
    pub(super) fn open_count(&self) -> usize {
        self.slots.iter().flatten().count()
    }

    fn serve(&self, i: usize, udp: Udp) -> Slot {
        let udp = Arc::new(udp);
        let inbound = Inbound {
            dp: self.dp.clone(),
            tun: self.tun.clone(),
            egress: self.egress.clone(),
            mtu: self.mtu,
            side: Some(self.side.clone()),
        };
        let sock = udp.clone();
        let socket = id(i);
        let reader = tokio::spawn(async move {
            if let Err(e) = inbound.run_on(socket, &sock, Sizing::EXTRA).await {
                tracing::debug!(socket = socket.0, error = %e, "extra socket reader ended");
            }
        });
        Slot { udp, reader }
    }

    fn publish(&self) {
        let table = self
            .slots
            .iter()
            .map(|s| s.as_ref().map(|s| s.udp.clone()))
            .collect();
        self.egress.set_sockets(table);
    }
}

fn id(i: usize) -> SocketId {
    SocketId(u16::try_from(i + 1).unwrap_or(u16::MAX))
}
