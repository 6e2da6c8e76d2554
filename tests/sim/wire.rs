//! How the simulator moves a node's packets, as the agent's egress,
//! packet tasks and TCP tasks do: sealed packets to the socket, the relay
//! session or the TCP stream the data plane's path names; WireGuard opened
//! by the node's real data plane; TCP dials round by round and their
//! streams (see the `harness` module doc for the model).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use warren::dataplane::{Opened, Sealed};
use warren::keys::NodeKey;
use warren::traversal::node::Dest;
use warren::traversal::{Path, SocketId};

use crate::harness::{Sim, PORT};

/// How a WireGuard datagram reached a node.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Via {
    Udp(SocketId, SocketAddr),
    Relay(NodeKey),
    /// A direct TCP stream: its proven owner and its address.
    Tcp(NodeKey, SocketAddr),
}

/// A direct TCP stream between nodes `a` and `b`, and the address each end
/// sees the other at.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Stream {
    pub(crate) a: usize,
    pub(crate) a_sees: SocketAddr,
    pub(crate) b: usize,
    pub(crate) b_sees: SocketAddr,
}

/// A TCP dial in progress (`NodeEvent::TcpConnect`): a SYN to every target
/// each round, as the agent's dial task does, until one connects.
#[derive(Debug, Clone)]
pub(crate) struct Dial {
    pub(crate) node: usize,
    pub(crate) peer: NodeKey,
    pub(crate) targets: Vec<SocketAddr>,
    pub(crate) until: Instant,
    pub(crate) next: Instant,
}

/// The agent's pause between dial rounds (`DIAL_ROUND` + `DIAL_PAUSE`).
pub(crate) const DIAL_EVERY: Duration = Duration::from_millis(1100);

impl Sim {
    /// Sends each due dial's SYNs; the first that gets through is a stream,
    /// which both nodes are told of as the agent's TCP tasks tell them.
    pub(crate) fn dial_rounds(&mut self) {
        let now = self.now();
        let due: Vec<usize> = (0..self.dials.len())
            .filter(|&k| self.dials[k].next <= now)
            .collect();
        let mut done = Vec::new();
        for k in due {
            let Dial {
                node: i,
                peer,
                ref targets,
                until,
                ..
            } = self.dials[k];
            let host = self.nodes[i].host;
            let targets = targets.clone();
            let mut up = None;
            for t in targets {
                if let Some((to_host, seen_from)) = self.world.tcp_syn(host, PORT, t) {
                    if let Some(j) = self.nodes.iter().position(|n| n.host == to_host) {
                        up = Some((t, j, seen_from));
                        break;
                    }
                }
            }
            match up {
                Some((addr, j, seen_from)) => {
                    done.push(k);
                    if self.streams.iter().any(|s| s.a == i && s.a_sees == addr) {
                        continue;
                    }
                    self.streams.push(Stream {
                        a: i,
                        a_sees: addr,
                        b: j,
                        b_sees: seen_from,
                    });
                    self.nodes[i].state.handle_tcp_up(now, addr, Some(peer));
                    self.nodes[j].state.handle_tcp_up(now, seen_from, None);
                }
                None if now + DIAL_EVERY > until => done.push(k),
                None => self.dials[k].next = now + DIAL_EVERY,
            }
        }
        for k in done.into_iter().rev() {
            self.dials.remove(k);
        }
    }

    /// Node `i` closes its stream to `addr`; the far end learns it.
    pub(crate) fn close_stream(&mut self, i: usize, addr: SocketAddr) {
        let now = self.now();
        let Some(k) = self
            .streams
            .iter()
            .position(|s| (s.a == i && s.a_sees == addr) || (s.b == i && s.b_sees == addr))
        else {
            return;
        };
        let s = self.streams.remove(k);
        let (j, seen) = if s.a == i {
            (s.b, s.b_sees)
        } else {
            (s.a, s.a_sees)
        };
        self.nodes[j].state.handle_tcp_closed(now, seen);
    }

    /// Puts what node `i`'s relay session has to send on its connection.
    pub(crate) fn flush_relay(&mut self, i: usize) {
        let host = self.nodes[i].host;
        while let Some(b) = self.nodes[i].relay.poll_transmit() {
            self.world.relay_wire(host, i, true, b);
        }
    }

    pub(crate) fn send_from(&mut self, i: usize, dest: Dest, bytes: Vec<u8>) {
        let host = self.nodes[i].host;
        match dest {
            Dest::Udp { socket, addr } => {
                if let Some(port) = self.nodes[i].port_of(socket) {
                    self.world.send(host, port, addr, bytes);
                }
            }
            // Dropped while the session is not up yet, as the agent's
            // relay client drops what it cannot send.
            Dest::Relay(to) => {
                let now = self.now();
                let _ = self.nodes[i].relay.send_packet(now, &to, &bytes);
                self.flush_relay(i);
            }
            Dest::Tcp(addr) => {
                let far = self.streams.iter().find_map(|s| {
                    if s.a == i && s.a_sees == addr {
                        Some((s.b, s.b_sees))
                    } else if s.b == i && s.b_sees == addr {
                        Some((s.a, s.a_sees))
                    } else {
                        None
                    }
                });
                if let Some((j, seen)) = far {
                    let to_host = self.nodes[j].host;
                    self.world.tcp_frame((host, to_host), j, seen, bytes);
                }
            }
        }
    }

    /// Sends what the data plane sealed for `peer` where the sealing says,
    /// as the agent's egress does.
    pub(crate) fn send_sealed(&mut self, i: usize, peer: NodeKey, sealed: Sealed, buf: &[u8]) {
        let now = self.now();
        let (dest, len) = match sealed {
            Sealed::Send { len, to } => (
                Dest::Udp {
                    socket: SocketId::PRIMARY,
                    addr: to,
                },
                len,
            ),
            Sealed::SendOn { len, to, socket } => (Dest::Udp { socket, addr: to }, len),
            // A TCP path's packets are sealed like relayed ones.
            Sealed::Relay { len } => match self.nodes[i].node().path(&peer) {
                Path::Tcp(addr) => (Dest::Tcp(addr), len),
                _ => (Dest::Relay(peer), len),
            },
            // A mesh peer always has a path: the relay until a direct one
            // is proven (an invariant every scenario checks).
            Sealed::NoEndpoint => panic!("node {i} had no path to a mesh peer at {now:?}"),
            Sealed::Nothing => return,
        };
        if let Dest::Udp { socket, addr } = dest {
            let trust = self.model_trust.unwrap_or(self.cfg.trust);
            let p = warren::traversal::DirectPath { socket, addr };
            self.model
                .check_direct(now, i, peer, p, trust, "sends data on");
        }
        self.send_from(i, dest, buf[..len].to_vec());
    }

    /// Opens a WireGuard datagram at node `i` as its data plane would
    /// (`via`: the local socket and UDP source, the relay's sender, or the
    /// TCP stream's proven owner and address); true when it was a data
    /// packet from the peer's own address.
    pub(crate) fn open(&mut self, i: usize, via: Via, bytes: &[u8]) -> bool {
        let now = self.now();
        let mut buf = vec![0u8; 2048];
        let set = self.nodes[i].dp.peers();
        let peer = match via {
            Via::Udp(_, addr) => {
                match self.nodes[i].dp.peer_for(now, &set, addr, bytes, &mut buf) {
                    Ok(p) => p,
                    Err(_) => return false,
                }
            }
            Via::Relay(key) | Via::Tcp(key, _) => match set.by_key(&key) {
                Some(p) => p.clone(),
                None => return false,
            },
        };
        drop(set);
        let udp_from = match via {
            Via::Udp(_, addr) => Some(addr),
            _ => None,
        };
        let opened = peer.open(now, udp_from, bytes, &mut buf);
        if matches!(via, Via::Relay(_)) && !matches!(opened, Opened::Rejected(_) | Opened::Spoofed)
        {
            self.nodes[i].wg_relay += 1;
        }
        match opened {
            Opened::Tunnel { .. } => true,
            Opened::Reply { len } => {
                // Back the way it came, then whatever the session queued.
                let back = match via {
                    Via::Udp(socket, addr) => Dest::Udp { socket, addr },
                    Via::Relay(key) => Dest::Relay(key),
                    Via::Tcp(_, addr) => Dest::Tcp(addr),
                };
                self.send_from(i, back, buf[..len].to_vec());
                loop {
                    match peer.flush_queued(now, &mut buf) {
                        Sealed::Nothing => break,
                        sealed => self.send_sealed(i, peer.key, sealed, &buf),
                    }
                }
                false
            }
            _ => false,
        }
    }
}
