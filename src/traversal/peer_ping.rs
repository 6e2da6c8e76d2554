//! On-demand pings for `warren ping`: one round pings the peer through the
//! relay and on its direct paths, and each pong that answers the round comes
//! out as an [`Event::PingReply`] with its path and round-trip time.
//!
//! The round's direct pings are the machine's ordinary pings (same pending
//! table, same checks), so their pongs move paths exactly as discovery's do:
//! `warren ping` measures the real thing rather than a side channel, and a
//! round on a relayed peer also helps find the direct path (it counts as
//! traffic and asks the peer to probe back, like `tailscale ping`). Pings
//! over the relay are the one addition to the plain path logic: they are
//! answered over the relay, and their pongs only ever produce a reply, never
//! a path change, since a relay path proves nothing about UDP.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::Instant;

use rand::Rng;

use super::{PeerPaths, Rejected};
use crate::keys::NodeKey;
use crate::proto::disco::{CandidateKind, Message};
use crate::traversal::peer::{Payload, Transmit};
use crate::traversal::{DirectPath, Event, Path};

/// Most on-demand pings remembered per peer; a round sends one per
/// candidate plus one over the relay, so this is many rounds' worth.
const MAX_ON_DEMAND: usize = 256;

/// One on-demand ping in flight.
#[derive(Debug, Clone, Copy)]
struct Sent {
    round: u64,
    path: Path,
    at: Instant,
}

/// The on-demand pings of one peer.
#[derive(Debug, Default)]
pub(super) struct OnDemand {
    next_round: u64,
    sent: HashMap<[u8; 12], Sent>,
}

impl PeerPaths {
    /// Starts a ping round and returns its number. It pings over the relay,
    /// and on the current direct path if there is one, else on every
    /// non-predicted candidate (predicted ports belong to discovery's
    /// attempt and would be spent by a stray ping).
    pub fn ping_round(&mut self, now: Instant) -> u64 {
        self.note_traffic(now);
        let timeout = self.cfg.ping_timeout;
        let od = &mut self.on_demand;
        od.sent.retain(|_, s| now < s.at + timeout);
        od.next_round += 1;
        let round = od.next_round;
        let targets: Vec<DirectPath> = match self.current {
            Path::Direct(p) => vec![p],
            // The stream is pinged below, beside the relay.
            Path::Tcp(_) => Vec::new(),
            Path::Relay => self
                .candidates
                .iter()
                .filter(|c| c.kind != CandidateKind::Predicted)
                .map(|c| DirectPath::primary(c.addr))
                .collect(),
        };
        if self.on_demand.sent.len() + targets.len() < MAX_ON_DEMAND {
            let tx_id: [u8; 12] = self.rng.gen();
            self.stats.pings_sent += 1;
            self.transmits.push_back(Transmit {
                path: Path::Relay,
                payload: Payload::Disco(Message::Ping {
                    tx_id,
                    node_key: self.local_key,
                }),
            });
            self.remember(tx_id, round, Path::Relay, now);
            for p in targets {
                if let Some(tx_id) = self.ping(now, p) {
                    self.remember(tx_id, round, Path::Direct(p), now);
                }
            }
            if let Path::Tcp(addr) = self.current {
                let tx_id = self.ping_tcp(now, addr);
                self.remember(tx_id, round, Path::Tcp(addr), now);
            }
        }
        if self.current == Path::Relay {
            self.maybe_call_me(now);
        }
        round
    }

    fn remember(&mut self, tx_id: [u8; 12], round: u64, path: Path, at: Instant) {
        self.on_demand.sent.insert(tx_id, Sent { round, path, at });
    }

    /// A pong that the machine accepted on `path`: a reply if it answers an
    /// on-demand ping.
    pub(super) fn on_demand_pong(&mut self, now: Instant, tx_id: [u8; 12], path: Path) {
        let Some(s) = self.on_demand.sent.get(&tx_id).copied() else {
            return;
        };
        if s.path != path {
            return;
        }
        self.on_demand.sent.remove(&tx_id);
        self.events.push_back(Event::PingReply {
            round: s.round,
            path,
            rtt: now.saturating_duration_since(s.at),
        });
    }

    /// A ping through the relay (someone runs `warren ping` on the peer):
    /// answered through the relay, nothing else.
    pub(super) fn answer_relay_ping(
        &mut self,
        tx_id: [u8; 12],
        node_key: NodeKey,
    ) -> Result<(), Rejected> {
        if node_key != self.peer_key {
            return Err(Rejected::NodeKeyMismatch);
        }
        // The relay hides the source address; the field is required, so it
        // says "unknown".
        let observed_src = SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0));
        self.transmits.push_back(Transmit {
            path: Path::Relay,
            payload: Payload::Disco(Message::Pong {
                tx_id,
                observed_src,
            }),
        });
        Ok(())
    }

    /// A pong through the relay: only an answer to an on-demand relay ping
    /// is accepted, and it never moves a path.
    pub(super) fn relay_pong(&mut self, now: Instant, tx_id: [u8; 12]) -> Result<(), Rejected> {
        match self.on_demand.sent.get(&tx_id) {
            Some(s) if s.path == Path::Relay => {
                self.stats.pongs_received += 1;
                self.on_demand_pong(now, tx_id, Path::Relay);
                Ok(())
            }
            _ => Err(Rejected::WrongPath),
        }
    }
}
