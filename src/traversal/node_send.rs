//! What the node sends: the next peer transmit, checked against the
//! per-IP budget (`budget.rs`), and sealed into a disco datagram for its
//! destination (a socket and address, a relay, or a TCP stream).

use rand::Rng;

use super::{Dest, Node, NodeTransmit, MAX_CONTACTED};
use crate::keys::NodeKey;
use crate::proto::disco::{self, Message};
use crate::traversal::peer::{Payload, Transmit};
use crate::traversal::{Path, SocketId};

impl Node {
    /// The next datagram to send, sealed.
    pub fn poll_transmit(&mut self) -> Option<NodeTransmit> {
        loop {
            // The first peer with something to send; allocates nothing.
            let (k, t) = self
                .peers
                .iter_mut()
                .find_map(|(k, e)| e.paths.poll_transmit().map(|t| (*k, t)))?;
            if let (Path::Direct(p), Some(now)) = (t.path, self.clock) {
                if !self.budget.take(now, p.addr.ip()) {
                    self.drops.capped += 1;
                    continue;
                }
            }
            return self.seal(k, t);
        }
    }

    /// Seals one peer transmit into a datagram.
    fn seal(&mut self, k: NodeKey, t: Transmit) -> Option<NodeTransmit> {
        let msg = match t.payload {
            Payload::Disco(m) => m,
            Payload::CallMeMaybe => Message::CallMeMaybe {
                endpoints: self.own_endpoints(k),
            },
        };
        let dest = match t.path {
            Path::Relay => Dest::Relay(k),
            Path::Direct(p) => {
                let n = self.contacted.len();
                if p.socket == SocketId::PRIMARY && n < MAX_CONTACTED {
                    self.contacted.entry(p.addr).or_insert((n, k));
                }
                Dest::Udp {
                    socket: p.socket,
                    addr: p.addr,
                }
            }
            Path::Tcp(addr) => Dest::Tcp(addr),
        };
        self.counter += 1;
        let random: [u8; 16] = self.rng.gen();
        let entry = self.peers.get_mut(&k)?;
        let bytes = disco::seal(
            entry.sbox(&self.secret),
            &self.public,
            self.counter,
            random,
            &msg,
        );
        Some(NodeTransmit { dest, bytes })
    }
}
