//! Where sealed packets leave the host: the UDP socket, or the relay.
//!
//! The data plane says per packet whether a peer's path is direct or the
//! relay ([`Sealed`]); this type turns that into the actual send. The relay
//! connection comes and goes (it is dialled in the background and may be
//! replaced when the home relay changes), so it sits in an `ArcSwapOption`
//! that the packet tasks read without a lock.

use std::sync::Arc;

use arc_swap::ArcSwapOption;

use super::udp::Udp;
use crate::dataplane::{Drops, Sealed};
use crate::keys::NodeKey;

/// Accepts packets for the relay. It must not block: a full queue drops.
pub trait RelaySink: Send + Sync {
    /// Queues `packet` for `peer`; false when it was dropped.
    fn send(&self, peer: NodeKey, packet: &[u8]) -> bool;
}

pub struct Egress {
    pub udp: Arc<Udp>,
    relay: ArcSwapOption<Box<dyn RelaySink>>,
    drops: Arc<Drops>,
}

impl Egress {
    pub fn new(udp: Arc<Udp>, drops: Arc<Drops>) -> Egress {
        Egress {
            udp,
            relay: ArcSwapOption::empty(),
            drops,
        }
    }

    pub fn set_relay(&self, sink: Option<Box<dyn RelaySink>>) {
        self.relay.store(sink.map(Arc::new));
    }

    /// Hands one packet to the relay, counting it when there is none.
    pub fn relay(&self, peer: NodeKey, packet: &[u8]) {
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
            Sealed::Relay { len } => self.relay(peer, &buf[..len]),
            Sealed::NoEndpoint => Drops::bump(&self.drops.no_endpoint),
            Sealed::Nothing => {}
        }
    }
}
