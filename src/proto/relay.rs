//! Relay wire protocol: frames exchanged between an agent and a relay.
//!
//! The relay is warren's DERP-like fallback path (see docs/architecture.md,
//! "Relay"): it forwards
//! opaque packets (WireGuard ciphertext, disco boxes) between node keys over
//! TCP/TLS or WebSocket, so it works when UDP is blocked. Every frame is
//! `[type u8][len u32 BE][payload]`. The same bytes flow over a raw upgraded
//! stream and inside WebSocket binary messages (a message may carry several
//! frames, or a frame may span messages), so the decoder is incremental over a
//! byte buffer and never assumes message boundaries.
//!
//! The codec is sans-IO and written by hand: the format is a handful of fixed
//! layouts, and a general serialization crate would add a second framing and
//! make the "never panics on any input" property harder to see.
//!
//! Submodules: [`decoder`] (incremental decoding), [`auth`] (proof of node
//! key, and the relay's node-list feed from the coordinator), [`client`]
//! (client session state machine).

pub mod auth;
pub mod client;
pub mod decoder;

use bytes::{BufMut, Bytes, BytesMut};
use serde::{Deserialize, Serialize};

use crate::keys::NodeKey;

pub use decoder::FrameDecoder;

/// Protocol version carried in both hellos. A peer that speaks another
/// version is refused with [`RefuseReason::Version`].
pub const PROTOCOL_VERSION: u8 = 1;
/// Length of the frame header: type byte + u32 length.
pub const HEADER_LEN: usize = 5;
/// Largest packet the relay forwards (a UDP payload can be no larger).
pub const MAX_PACKET_LEN: usize = 65_535;
/// Default ceiling on a frame's payload: a full packet plus its key.
pub const DEFAULT_MAX_PAYLOAD: usize = MAX_PACKET_LEN + 32;
/// Length of the relay's handshake challenge and of the client's proof.
pub const CHALLENGE_LEN: usize = 32;

/// One frame type byte. Values are grouped: 0x0_ handshake, 0x1_ packets,
/// 0x2_ liveness, 0x3_ health.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum FrameType {
    ServerHello = 0x01,
    ClientHello = 0x02,
    Accepted = 0x03,
    Refused = 0x04,
    SendPacket = 0x10,
    RecvPacket = 0x11,
    PeerGone = 0x12,
    KeepAlive = 0x20,
    Ping = 0x21,
    Pong = 0x22,
    HealthRequest = 0x30,
    Health = 0x31,
}

impl FrameType {
    pub fn from_u8(b: u8) -> Option<Self> {
        use FrameType::*;
        Some(match b {
            0x01 => ServerHello,
            0x02 => ClientHello,
            0x03 => Accepted,
            0x04 => Refused,
            0x10 => SendPacket,
            0x11 => RecvPacket,
            0x12 => PeerGone,
            0x20 => KeepAlive,
            0x21 => Ping,
            0x22 => Pong,
            0x30 => HealthRequest,
            0x31 => Health,
            _ => return None,
        })
    }
}

/// Why the relay refused a client. Sent before it closes the connection, so
/// the client can tell "back off, you are not admitted" from a network fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum RefuseReason {
    UnknownKey,
    BadProof,
    TooManyConnections,
    Version,
    Removed,
    Other(u8),
}

impl RefuseReason {
    fn to_u8(self) -> u8 {
        match self {
            RefuseReason::UnknownKey => 1,
            RefuseReason::BadProof => 2,
            RefuseReason::TooManyConnections => 3,
            RefuseReason::Version => 4,
            RefuseReason::Removed => 5,
            RefuseReason::Other(b) => b,
        }
    }
    fn from_u8(b: u8) -> Self {
        match b {
            1 => RefuseReason::UnknownKey,
            2 => RefuseReason::BadProof,
            3 => RefuseReason::TooManyConnections,
            4 => RefuseReason::Version,
            5 => RefuseReason::Removed,
            b => RefuseReason::Other(b),
        }
    }
}

/// Why a peer is no longer reachable through this relay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum PeerGoneReason {
    /// It was connected and has left.
    Disconnected,
    /// A packet was addressed to it, but it is not connected here.
    NotHere,
    Other(u8),
}

impl PeerGoneReason {
    fn to_u8(self) -> u8 {
        match self {
            PeerGoneReason::Disconnected => 0,
            PeerGoneReason::NotHere => 1,
            PeerGoneReason::Other(b) => b,
        }
    }
    fn from_u8(b: u8) -> Self {
        match b {
            0 => PeerGoneReason::Disconnected,
            1 => PeerGoneReason::NotHere,
            b => PeerGoneReason::Other(b),
        }
    }
}

/// The relay's counters, sent in a health frame and served as JSON on
/// `GET /relay/metrics`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RelayHealth {
    pub clients: u64,
    pub connections_total: u64,
    /// Admitted connections that came through the HTTP upgrade path.
    #[serde(default)]
    pub connections_upgrade: u64,
    /// Admitted connections that came through WebSocket.
    #[serde(default)]
    pub connections_websocket: u64,
    pub refused_unknown_key: u64,
    pub refused_bad_proof: u64,
    pub refused_too_many: u64,
    pub handshake_timeouts: u64,
    /// Connections turned away because too many handshakes were pending.
    pub refused_busy: u64,
    pub disconnected_removed: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub packets_in: u64,
    pub packets_forwarded: u64,
    /// Bytes currently waiting in all clients' send queues.
    pub queued_bytes: u64,
    pub drop_queue_full: u64,
    pub drop_no_such_peer: u64,
    pub drop_bad_frame: u64,
    pub drop_write_timeout: u64,
}

/// One decoded frame. Packet payloads are `Bytes` cut from the read buffer,
/// so decoding does not copy them.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Frame {
    ServerHello {
        version: u8,
        relay_key: NodeKey,
        challenge: [u8; CHALLENGE_LEN],
    },
    ClientHello {
        version: u8,
        node_key: NodeKey,
        proof: [u8; 32],
    },
    Accepted,
    Refused {
        reason: RefuseReason,
    },
    SendPacket {
        dest: NodeKey,
        packet: Bytes,
    },
    RecvPacket {
        src: NodeKey,
        packet: Bytes,
    },
    PeerGone {
        key: NodeKey,
        reason: PeerGoneReason,
    },
    KeepAlive,
    Ping([u8; 8]),
    Pong([u8; 8]),
    HealthRequest,
    Health(RelayHealth),
}

/// Why bytes could not be decoded into a frame.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FrameError {
    #[error("frame type {0:#04x} is unknown")]
    UnknownType(u8),
    #[error("frame declares {len} payload bytes; the limit is {max}")]
    Oversized { len: usize, max: usize },
    #[error("{ty:?} frame has {len} payload bytes, expected {expected}")]
    BadLength {
        ty: FrameType,
        len: usize,
        expected: &'static str,
    },
    #[error("health frame is not valid JSON: {0}")]
    BadHealth(#[source] serde_json::Error),
}

impl FrameError {
    /// An unknown type is skipped whole (its length is trusted), so a newer
    /// peer's extra frames do not break the stream; every other error means
    /// the stream can no longer be trusted and the connection must close.
    pub fn is_fatal(&self) -> bool {
        !matches!(self, FrameError::UnknownType(_))
    }
}

fn key_at(p: &[u8]) -> NodeKey {
    let mut k = [0u8; 32];
    k.copy_from_slice(&p[..32]);
    NodeKey(k)
}

fn exact<const N: usize>(
    ty: FrameType,
    p: &[u8],
    what: &'static str,
) -> Result<[u8; N], FrameError> {
    <[u8; N]>::try_from(p).map_err(|_| FrameError::BadLength {
        ty,
        len: p.len(),
        expected: what,
    })
}

impl Frame {
    pub fn frame_type(&self) -> FrameType {
        match self {
            Frame::ServerHello { .. } => FrameType::ServerHello,
            Frame::ClientHello { .. } => FrameType::ClientHello,
            Frame::Accepted => FrameType::Accepted,
            Frame::Refused { .. } => FrameType::Refused,
            Frame::SendPacket { .. } => FrameType::SendPacket,
            Frame::RecvPacket { .. } => FrameType::RecvPacket,
            Frame::PeerGone { .. } => FrameType::PeerGone,
            Frame::KeepAlive => FrameType::KeepAlive,
            Frame::Ping(_) => FrameType::Ping,
            Frame::Pong(_) => FrameType::Pong,
            Frame::HealthRequest => FrameType::HealthRequest,
            Frame::Health(_) => FrameType::Health,
        }
    }

    /// Parses one payload whose type byte and length were already read.
    pub fn parse(ty: FrameType, payload: Bytes) -> Result<Frame, FrameError> {
        let p = &payload[..];
        let keyed = |what| -> Result<(), FrameError> {
            if p.len() < 32 {
                return Err(FrameError::BadLength {
                    ty,
                    len: p.len(),
                    expected: what,
                });
            }
            Ok(())
        };
        Ok(match ty {
            FrameType::ServerHello => {
                let b: [u8; 65] = exact(ty, p, "65")?;
                let mut challenge = [0u8; CHALLENGE_LEN];
                challenge.copy_from_slice(&b[33..]);
                Frame::ServerHello {
                    version: b[0],
                    relay_key: key_at(&b[1..]),
                    challenge,
                }
            }
            FrameType::ClientHello => {
                let b: [u8; 65] = exact(ty, p, "65")?;
                let mut proof = [0u8; 32];
                proof.copy_from_slice(&b[33..]);
                Frame::ClientHello {
                    version: b[0],
                    node_key: key_at(&b[1..]),
                    proof,
                }
            }
            FrameType::Accepted => {
                exact::<0>(ty, p, "0")?;
                Frame::Accepted
            }
            FrameType::Refused => {
                let [r] = exact::<1>(ty, p, "1")?;
                Frame::Refused {
                    reason: RefuseReason::from_u8(r),
                }
            }
            FrameType::SendPacket => {
                keyed("at least 32")?;
                Frame::SendPacket {
                    dest: key_at(p),
                    packet: payload.slice(32..),
                }
            }
            FrameType::RecvPacket => {
                keyed("at least 32")?;
                Frame::RecvPacket {
                    src: key_at(p),
                    packet: payload.slice(32..),
                }
            }
            FrameType::PeerGone => {
                let b: [u8; 33] = exact(ty, p, "33")?;
                Frame::PeerGone {
                    key: key_at(&b),
                    reason: PeerGoneReason::from_u8(b[32]),
                }
            }
            FrameType::KeepAlive => {
                exact::<0>(ty, p, "0")?;
                Frame::KeepAlive
            }
            FrameType::Ping => Frame::Ping(exact(ty, p, "8")?),
            FrameType::Pong => Frame::Pong(exact(ty, p, "8")?),
            FrameType::HealthRequest => {
                exact::<0>(ty, p, "0")?;
                Frame::HealthRequest
            }
            FrameType::Health => {
                Frame::Health(serde_json::from_slice(p).map_err(FrameError::BadHealth)?)
            }
        })
    }

    /// Appends the encoded frame to `out`.
    pub fn encode(&self, out: &mut BytesMut) {
        match self {
            Frame::ServerHello {
                version,
                relay_key,
                challenge,
            } => {
                put_header(out, FrameType::ServerHello, 65);
                out.put_u8(*version);
                out.put_slice(relay_key.as_bytes());
                out.put_slice(challenge);
            }
            Frame::ClientHello {
                version,
                node_key,
                proof,
            } => {
                put_header(out, FrameType::ClientHello, 65);
                out.put_u8(*version);
                out.put_slice(node_key.as_bytes());
                out.put_slice(proof);
            }
            Frame::Accepted => put_header(out, FrameType::Accepted, 0),
            Frame::Refused { reason } => {
                put_header(out, FrameType::Refused, 1);
                out.put_u8(reason.to_u8());
            }
            Frame::SendPacket { dest, packet } => encode_send_packet(out, dest, packet),
            Frame::RecvPacket { src, packet } => encode_recv_packet(out, src, packet),
            Frame::PeerGone { key, reason } => {
                put_header(out, FrameType::PeerGone, 33);
                out.put_slice(key.as_bytes());
                out.put_u8(reason.to_u8());
            }
            Frame::KeepAlive => put_header(out, FrameType::KeepAlive, 0),
            Frame::Ping(d) => {
                put_header(out, FrameType::Ping, 8);
                out.put_slice(d);
            }
            Frame::Pong(d) => {
                put_header(out, FrameType::Pong, 8);
                out.put_slice(d);
            }
            Frame::HealthRequest => put_header(out, FrameType::HealthRequest, 0),
            Frame::Health(h) => {
                // Serializing a struct of integers cannot fail.
                let json = serde_json::to_vec(h).unwrap_or_default();
                put_header(out, FrameType::Health, json.len());
                out.put_slice(&json);
            }
        }
    }

    /// The encoded frame as one buffer.
    pub fn to_bytes(&self) -> Bytes {
        let mut out = BytesMut::new();
        self.encode(&mut out);
        out.freeze()
    }
}

fn put_header(out: &mut BytesMut, ty: FrameType, len: usize) {
    out.reserve(HEADER_LEN + len);
    out.put_u8(ty as u8);
    // Callers bound `len` by MAX_PACKET_LEN + 32, far below u32::MAX.
    out.put_u32(u32::try_from(len).unwrap_or(u32::MAX));
}

/// Encodes a send-to-peer frame without building a [`Frame`] (hot path).
pub fn encode_send_packet(out: &mut BytesMut, dest: &NodeKey, packet: &[u8]) {
    put_header(out, FrameType::SendPacket, 32 + packet.len());
    out.put_slice(dest.as_bytes());
    out.put_slice(packet);
}

/// Encodes a recv-from-peer frame without building a [`Frame`] (hot path).
pub fn encode_recv_packet(out: &mut BytesMut, src: &NodeKey, packet: &[u8]) {
    put_header(out, FrameType::RecvPacket, 32 + packet.len());
    out.put_slice(src.as_bytes());
    out.put_slice(packet);
}
