//! The relay server's half of the relay protocol, for the simulator: each
//! simulated node runs the real client session (`proto::relay::client`)
//! against this, over a reliable in-order "connection" with the host's
//! relay latency each way (`net::World::relay_wire`).
//!
//! It does what the coordinator's relay does on the wire, and no more: a
//! hello with a fresh challenge, the client's proof checked against its
//! node key (`proto::relay::auth::verify`), then packets forwarded by
//! destination key, a peer that is not connected answered with
//! `PeerGone`, pings answered. Written here rather than taken from the
//! coordinator crate, which depends on this one.

use std::collections::HashMap;

use bytes::Bytes;
use warren::keys::{NodeKey, PrivateKey};
use warren::proto::relay::auth;
use warren::proto::relay::FrameDecoder;
use warren::proto::relay::{Frame, PeerGoneReason, PROTOCOL_VERSION};

struct Conn {
    challenge: [u8; 32],
    decoder: FrameDecoder,
    /// The node key the client proved.
    node: Option<NodeKey>,
}

/// See the module doc. Connections are named by the node's index.
pub struct SimRelay {
    key: PrivateKey,
    conns: HashMap<usize, Conn>,
    /// Packets forwarded, for tests.
    pub forwarded: u64,
}

impl SimRelay {
    pub fn new(key: PrivateKey) -> SimRelay {
        SimRelay {
            key,
            conns: HashMap::new(),
            forwarded: 0,
        }
    }

    pub fn key(&self) -> NodeKey {
        self.key.public()
    }

    /// Node `i` connects: the server's hello, for it.
    pub fn connect(&mut self, i: usize) -> Bytes {
        let challenge = auth::new_challenge();
        self.conns.insert(
            i,
            Conn {
                challenge,
                decoder: FrameDecoder::default(),
                node: None,
            },
        );
        Frame::ServerHello {
            version: PROTOCOL_VERSION,
            relay_key: self.key.public(),
            challenge,
        }
        .to_bytes()
    }

    /// Bytes from node `i`'s connection; what goes back down, to which node.
    pub fn handle(&mut self, i: usize, bytes: &[u8]) -> Vec<(usize, Bytes)> {
        let mut out = Vec::new();
        let Some(c) = self.conns.get_mut(&i) else {
            return out;
        };
        c.decoder.extend(bytes);
        let mut frames = Vec::new();
        while let Ok(Some(f)) = c.decoder.next_frame() {
            frames.push(f);
        }
        for f in frames {
            match f {
                Frame::ClientHello {
                    node_key, proof, ..
                } => {
                    let Some(c) = self.conns.get_mut(&i) else {
                        continue;
                    };
                    if auth::verify(&self.key, &node_key, &c.challenge, &proof).is_ok() {
                        c.node = Some(node_key);
                        out.push((i, Frame::Accepted.to_bytes()));
                    }
                }
                Frame::SendPacket { dest, packet } => {
                    let Some(src) = self.conns.get(&i).and_then(|c| c.node) else {
                        continue;
                    };
                    match self.conns.iter().find(|(_, c)| c.node == Some(dest)) {
                        Some((&j, _)) => {
                            self.forwarded += 1;
                            out.push((j, Frame::RecvPacket { src, packet }.to_bytes()));
                        }
                        None => out.push((
                            i,
                            Frame::PeerGone {
                                key: dest,
                                reason: PeerGoneReason::NotHere,
                            }
                            .to_bytes(),
                        )),
                    }
                }
                Frame::Ping(data) => out.push((i, Frame::Pong(data).to_bytes())),
                _ => {}
            }
        }
        out
    }
}
