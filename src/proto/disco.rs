//! Disco: the sealed discovery messages that find and hold direct paths.
//!
//! Disco packets share the UDP socket with WireGuard and STUN, so the first
//! bytes must never be mistaken for either. A disco packet is
//!
//! ```text
//! magic (6) | sender disco public key (32) | nonce (24) | crypto_box(plaintext)
//! ```
//!
//! The magic is `"WR" + U+1F407` (a rabbit, for warren) in UTF-8. `0x57` is not
//! a WireGuard message type (1–4) and its top two bits are `01`, while every
//! STUN message starts with two zero bits (RFC 8489 §6), so the three kinds
//! demultiplex on the first byte alone.
//!
//! The box is `crypto_box` (X25519 + XSalsa20-Poly1305) from the sender's disco
//! key to the receiver's: only the two peers can make or open it. The nonce is
//! an 8-byte big-endian counter followed by 16 random bytes. The counter gives
//! the receiver a cheap, bounded replay window per sender ([`ReplayWindow`],
//! the same sliding bitmap as WireGuard and IPsec use); the random tail keeps
//! nonces unique even if a counter were ever reused. Disco keys are made fresh
//! at each start, so a counter that starts at zero never repeats under one key.
//!
//! The plaintext is `[type u8][version u8][body]`:
//! - `Ping`: tx id (12) + sender's node key (32), binding disco to the node key.
//! - `Pong`: tx id (12) + observed source address (16-byte IPv6 or v4-mapped,
//!   2-byte port).
//! - `CallMeMaybe`: up to [`MAX_CANDIDATES`] entries of
//!   `[kind u8][transport u8][ip 16][port 2]`.
//!
//! The codec is hand-written because the format is ours and tiny; a serde
//! format would add a dependency and hide the exact bytes the fuzzer sees.

use std::fmt;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};

use crypto_box::aead::Aead;
/// The precomputed box between two disco keys (re-exported so callers need
/// no direct `crypto_box` dependency).
pub use crypto_box::SalsaBox;
use crypto_box::{PublicKey, SecretKey};

use crate::keys::NodeKey;

/// The 6 bytes that start every disco packet.
pub const MAGIC: [u8; 6] = *b"WR\xf0\x9f\x90\x87";
/// Magic + sender key + nonce.
pub const HEADER_LEN: usize = 6 + 32 + 24;
/// Poly1305 tag appended by the box.
pub const TAG_LEN: usize = 16;
/// Most candidates one `CallMeMaybe` may carry; bounds both the packet size
/// and the work a peer can make us do per packet.
pub const MAX_CANDIDATES: usize = 32;
const VERSION: u8 = 0;
const ADDR_LEN: usize = 18;
const CANDIDATE_LEN: usize = 2 + ADDR_LEN;

/// Why a packet was not accepted as a disco message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DiscoError {
    #[error("not a disco packet (no magic prefix)")]
    NotDisco,
    #[error("disco packet too short ({0} bytes)")]
    TooShort(usize),
    #[error("disco box does not open (forged, corrupted or for another key)")]
    Unsealable,
    #[error("unknown disco message type {0}")]
    UnknownType(u8),
    #[error("unsupported disco version {0}")]
    UnsupportedVersion(u8),
    #[error("malformed disco {0} message")]
    Malformed(&'static str),
    #[error("disco message carries {0} candidates, more than allowed")]
    TooManyCandidates(usize),
    #[error("disco nonce replayed or too old")]
    Replayed,
}

/// A disco public key: what the coordinator publishes next to the node key.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DiscoKey(pub [u8; 32]);

impl fmt::Debug for DiscoKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Reuse the node key's base64 short form: same shape, same logs.
        write!(f, "DiscoKey({})", NodeKey(self.0).short())
    }
}

/// The private half of a disco key. Made at each start; never stored.
#[derive(Clone)]
pub struct DiscoSecret(SecretKey);

impl DiscoSecret {
    pub fn generate<R: rand::RngCore + rand::CryptoRng>(rng: &mut R) -> Self {
        let mut bytes = [0u8; 32];
        rng.fill_bytes(&mut bytes);
        DiscoSecret(SecretKey::from(bytes))
    }

    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        DiscoSecret(SecretKey::from(bytes))
    }

    pub fn public(&self) -> DiscoKey {
        DiscoKey(self.0.public_key().to_bytes())
    }

    /// Precomputes the shared box with one peer. Callers cache it per peer:
    /// the X25519 step is the expensive part of opening a packet.
    pub fn box_for(&self, peer: &DiscoKey) -> SalsaBox {
        SalsaBox::new(&PublicKey::from(peer.0), &self.0)
    }
}

impl fmt::Debug for DiscoSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DiscoSecret(public {:?})", self.public())
    }
}

/// Where a candidate address came from; also its rank when choosing a path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub enum CandidateKind {
    /// A local interface address.
    Host,
    /// A mapping made with UPnP IGD, NAT-PMP or PCP.
    PortMapped,
    /// Server-reflexive: what STUN saw.
    ServerReflexive,
    /// A guessed port of a NAT that allocates ports with a fixed step.
    Predicted,
    /// Learnt from the source of a peer's ping (ICE's peer-reflexive).
    PeerReflexive,
}

impl CandidateKind {
    /// Short name for status output (ICE's words where ICE has one).
    pub fn name(self) -> &'static str {
        match self {
            CandidateKind::Host => "host",
            CandidateKind::PortMapped => "portmap",
            CandidateKind::ServerReflexive => "srflx",
            CandidateKind::Predicted => "predicted",
            CandidateKind::PeerReflexive => "prflx",
        }
    }

    fn to_wire(self) -> u8 {
        match self {
            CandidateKind::Host => 1,
            CandidateKind::PortMapped => 2,
            CandidateKind::ServerReflexive => 3,
            CandidateKind::Predicted => 4,
            CandidateKind::PeerReflexive => 5,
        }
    }

    fn from_wire(b: u8) -> Option<Self> {
        Some(match b {
            1 => CandidateKind::Host,
            2 => CandidateKind::PortMapped,
            3 => CandidateKind::ServerReflexive,
            4 => CandidateKind::Predicted,
            5 => CandidateKind::PeerReflexive,
            _ => return None,
        })
    }
}

/// The transport a candidate speaks. TCP is reserved for the direct TCP
/// simultaneous open (see docs/architecture.md, "Paths").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Transport {
    Udp,
    Tcp,
}

/// One address a peer may be reached at.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Candidate {
    pub addr: SocketAddr,
    pub kind: CandidateKind,
    pub transport: Transport,
}

impl Candidate {
    pub fn udp(addr: SocketAddr, kind: CandidateKind) -> Self {
        Candidate {
            addr,
            kind,
            transport: Transport::Udp,
        }
    }
}

/// A disco message, before sealing / after opening.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Message {
    Ping {
        tx_id: [u8; 12],
        node_key: NodeKey,
    },
    Pong {
        tx_id: [u8; 12],
        observed_src: SocketAddr,
    },
    CallMeMaybe {
        endpoints: Vec<Candidate>,
    },
}

impl Message {
    /// The message's name, for counters and logs.
    pub fn name(&self) -> &'static str {
        match self {
            Message::Ping { .. } => "ping",
            Message::Pong { .. } => "pong",
            Message::CallMeMaybe { .. } => "call-me-maybe",
        }
    }
}

/// Whether `ip` can be a candidate a peer is asked to send to: not this
/// machine (loopback, unspecified), not a link (link-local), not a group
/// (multicast, broadcast), and not inside the overlay's own ranges
/// (100.64.0.0/10 and ULAs, which route into the tunnel). The same rule
/// serves three places: the host addresses an agent publishes, what the
/// coordinator accepts in a report, and what a peer will probe or dial
/// from a map or a `CallMeMaybe` (a joined node is not trusted to point
/// its peers at arbitrary hosts; README, "Security model").
pub fn is_candidate_ip(ip: IpAddr) -> bool {
    match ip.to_canonical() {
        IpAddr::V4(a) => {
            let o = a.octets();
            let overlay = o[0] == 100 && (64..128).contains(&o[1]);
            !(a.is_loopback()
                || a.is_link_local()
                || a.is_unspecified()
                || a.is_multicast()
                || a.is_broadcast()
                || overlay)
        }
        IpAddr::V6(a) => {
            let seg = a.segments();
            let link_local = seg[0] & 0xffc0 == 0xfe80;
            let ula = seg[0] & 0xfe00 == 0xfc00;
            !(a.is_loopback() || a.is_unspecified() || a.is_multicast() || link_local || ula)
        }
    }
}

/// [`is_candidate_ip`], and a port other than 0.
pub fn is_candidate_addr(addr: SocketAddr) -> bool {
    addr.port() != 0 && is_candidate_ip(addr.ip())
}

/// Cheap first-byte test used by the socket demultiplexer.
pub fn looks_like_disco(packet: &[u8]) -> bool {
    packet.starts_with(&MAGIC)
}

/// The unauthenticated outside of a disco packet. Only `sender` may be used
/// before opening, and only to look up which box to open with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub sender: DiscoKey,
    pub counter: u64,
}

/// Reads the header without opening the box.
pub fn parse_header(packet: &[u8]) -> Result<Header, DiscoError> {
    if !looks_like_disco(packet) {
        return Err(DiscoError::NotDisco);
    }
    if packet.len() < HEADER_LEN + TAG_LEN + 2 {
        return Err(DiscoError::TooShort(packet.len()));
    }
    let mut sender = [0u8; 32];
    sender.copy_from_slice(&packet[6..38]);
    let mut counter = [0u8; 8];
    counter.copy_from_slice(&packet[38..46]);
    Ok(Header {
        sender: DiscoKey(sender),
        counter: u64::from_be_bytes(counter),
    })
}

/// Seals `msg` from `sender` with the precomputed `sbox`.
/// `counter` must grow per sender key; `random` fills the rest of the nonce.
pub fn seal(
    sbox: &SalsaBox,
    sender: &DiscoKey,
    counter: u64,
    random: [u8; 16],
    msg: &Message,
) -> Vec<u8> {
    let mut nonce = [0u8; 24];
    nonce[..8].copy_from_slice(&counter.to_be_bytes());
    nonce[8..].copy_from_slice(&random);
    let plain = encode_plain(msg);
    let mut out = Vec::with_capacity(HEADER_LEN + plain.len() + TAG_LEN);
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&sender.0);
    out.extend_from_slice(&nonce);
    // Encryption into a Vec only fails on a buffer overflow, which a packet of
    // a few hundred bytes cannot cause; an empty packet would just be dropped
    // by the peer, so we do not need a panic path here.
    let sealed = sbox
        .encrypt(crypto_box::Nonce::from_slice(&nonce), plain.as_slice())
        .unwrap_or_default();
    out.extend_from_slice(&sealed);
    out
}

/// Opens a packet from `sender`, whose box with us is `sbox`. A header that
/// names another sender is refused: the key in the header is not covered by
/// the box, so it is checked here.
pub fn open(
    sbox: &SalsaBox,
    sender: &DiscoKey,
    packet: &[u8],
) -> Result<(Header, Message), DiscoError> {
    let header = parse_header(packet)?;
    if header.sender != *sender {
        return Err(DiscoError::Unsealable);
    }
    let nonce = &packet[38..HEADER_LEN];
    let plain = sbox
        .decrypt(crypto_box::Nonce::from_slice(nonce), &packet[HEADER_LEN..])
        .map_err(|_| DiscoError::Unsealable)?;
    Ok((header, decode_plain(&plain)?))
}

fn put_addr(out: &mut Vec<u8>, addr: SocketAddr) {
    let ip = match addr.ip() {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    };
    out.extend_from_slice(&ip.octets());
    out.extend_from_slice(&addr.port().to_be_bytes());
}

fn get_addr(b: &[u8]) -> Option<SocketAddr> {
    let ip: [u8; 16] = b.get(..16)?.try_into().ok()?;
    let port: [u8; 2] = b.get(16..18)?.try_into().ok()?;
    let v6 = Ipv6Addr::from(ip);
    let ip = match v6.to_ipv4_mapped() {
        Some(v4) => IpAddr::V4(v4),
        None => IpAddr::V6(v6),
    };
    Some(SocketAddr::new(ip, u16::from_be_bytes(port)))
}

/// Serialises the plaintext (exposed for the fuzzer and tests).
pub fn encode_plain(msg: &Message) -> Vec<u8> {
    let mut out = Vec::with_capacity(64);
    match msg {
        Message::Ping { tx_id, node_key } => {
            out.extend_from_slice(&[1, VERSION]);
            out.extend_from_slice(tx_id);
            out.extend_from_slice(node_key.as_bytes());
        }
        Message::Pong {
            tx_id,
            observed_src,
        } => {
            out.extend_from_slice(&[2, VERSION]);
            out.extend_from_slice(tx_id);
            put_addr(&mut out, *observed_src);
        }
        Message::CallMeMaybe { endpoints } => {
            out.extend_from_slice(&[3, VERSION]);
            for c in endpoints.iter().take(MAX_CANDIDATES) {
                let transport = match c.transport {
                    Transport::Udp => 0,
                    Transport::Tcp => 1,
                };
                out.extend_from_slice(&[c.kind.to_wire(), transport]);
                put_addr(&mut out, c.addr);
            }
        }
    }
    out
}

/// Parses a plaintext; never panics, whatever the bytes.
pub fn decode_plain(plain: &[u8]) -> Result<Message, DiscoError> {
    let (&ty, rest) = plain.split_first().ok_or(DiscoError::TooShort(0))?;
    let (&version, body) = rest.split_first().ok_or(DiscoError::TooShort(1))?;
    if !(1..=3).contains(&ty) {
        return Err(DiscoError::UnknownType(ty));
    }
    if version != VERSION {
        return Err(DiscoError::UnsupportedVersion(version));
    }
    match ty {
        1 => {
            if body.len() != 12 + 32 {
                return Err(DiscoError::Malformed("ping"));
            }
            let tx_id = body[..12]
                .try_into()
                .map_err(|_| DiscoError::Malformed("ping"))?;
            let key = body[12..]
                .try_into()
                .map_err(|_| DiscoError::Malformed("ping"))?;
            Ok(Message::Ping {
                tx_id,
                node_key: NodeKey(key),
            })
        }
        2 => {
            if body.len() != 12 + ADDR_LEN {
                return Err(DiscoError::Malformed("pong"));
            }
            let tx_id = body[..12]
                .try_into()
                .map_err(|_| DiscoError::Malformed("pong"))?;
            let observed_src = get_addr(&body[12..]).ok_or(DiscoError::Malformed("pong"))?;
            Ok(Message::Pong {
                tx_id,
                observed_src,
            })
        }
        _ => {
            if body.len() % CANDIDATE_LEN != 0 {
                return Err(DiscoError::Malformed("call-me-maybe"));
            }
            let n = body.len() / CANDIDATE_LEN;
            if n > MAX_CANDIDATES {
                return Err(DiscoError::TooManyCandidates(n));
            }
            let endpoints = body
                .chunks_exact(CANDIDATE_LEN)
                .map(|c| {
                    let kind = CandidateKind::from_wire(c[0]);
                    let transport = match c[1] {
                        0 => Some(Transport::Udp),
                        1 => Some(Transport::Tcp),
                        _ => None,
                    };
                    match (kind, transport, get_addr(&c[2..])) {
                        (Some(kind), Some(transport), Some(addr)) => Ok(Candidate {
                            addr,
                            kind,
                            transport,
                        }),
                        _ => Err(DiscoError::Malformed("call-me-maybe")),
                    }
                })
                .collect::<Result<Vec<_>, _>>()?;
            Ok(Message::CallMeMaybe { endpoints })
        }
    }
}

/// Sliding-window replay filter over nonce counters, per sender key.
///
/// Accepts each counter at most once, and anything newer than the highest
/// seen; refuses counters more than [`ReplayWindow::SIZE`] behind it. Disco
/// packets are few, and reordering between the relay and a direct path is
/// far less than 128 packets, so the window costs 24 bytes per peer.
#[derive(Debug, Clone, Default)]
pub struct ReplayWindow {
    highest: Option<u64>,
    seen: u128,
}

impl ReplayWindow {
    pub const SIZE: u64 = 128;

    /// Whether `counter` would be accepted; does not record it.
    pub fn check(&self, counter: u64) -> Result<(), DiscoError> {
        let Some(high) = self.highest else {
            return Ok(());
        };
        if counter > high {
            return Ok(());
        }
        let back = high - counter;
        if back >= Self::SIZE || self.seen & (1u128 << back) != 0 {
            return Err(DiscoError::Replayed);
        }
        Ok(())
    }

    /// Records a counter. Call only after the box opened, so a forger
    /// cannot advance the window and lock the real peer out.
    pub fn accept(&mut self, counter: u64) -> Result<(), DiscoError> {
        self.check(counter)?;
        match self.highest {
            Some(high) if counter <= high => self.seen |= 1u128 << (high - counter),
            Some(high) => {
                let shift = counter - high;
                self.seen = if shift >= Self::SIZE {
                    0
                } else {
                    self.seen << shift
                };
                self.seen |= 1;
                self.highest = Some(counter);
            }
            None => {
                self.seen = 1;
                self.highest = Some(counter);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
#[path = "disco_tests.rs"]
mod tests;
