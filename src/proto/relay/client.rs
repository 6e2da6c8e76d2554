//! The relay client session as a sans-IO state machine.
//!
//! One [`ClientSession`] covers one connection's life after the transport
//! (TCP/TLS upgrade or WebSocket) is up: answer the relay's challenge, wait to
//! be accepted, then carry packets, ping the relay to keep NATs and proxies
//! from timing out the connection, and declare it dead when pings go
//! unanswered. It does no IO and never reads the clock: the driver feeds
//! received bytes with [`ClientSession::handle_input`], the time with
//! [`ClientSession::handle_timeout`], and writes what
//! [`ClientSession::poll_transmit`] returns. Reconnection belongs to the
//! driver: a session that failed is done, a new one is made per connection.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};

use crate::keys::{NodeKey, PrivateKey};

use super::auth::{self, ProofError};
use super::{
    encode_send_packet, Frame, FrameDecoder, FrameError, FrameType, PeerGoneReason, RefuseReason,
    RelayHealth, DEFAULT_MAX_PAYLOAD, MAX_PACKET_LEN, PROTOCOL_VERSION,
};

/// Timing knobs of a session.
#[derive(Debug, Clone)]
pub struct SessionConfig {
    /// Send a ping when nothing was sent for this long.
    pub keepalive: Duration,
    /// A ping not answered (and nothing else received) within this long
    /// means the connection is dead.
    pub ping_timeout: Duration,
    /// The whole handshake must finish within this long.
    pub handshake_timeout: Duration,
    /// If set, the relay must present this key (from the relay map).
    pub expected_relay_key: Option<NodeKey>,
}

impl Default for SessionConfig {
    fn default() -> Self {
        SessionConfig {
            keepalive: Duration::from_secs(25),
            ping_timeout: Duration::from_secs(10),
            handshake_timeout: Duration::from_secs(10),
            expected_relay_key: None,
        }
    }
}

/// What the session reports to its driver.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ClientEvent {
    Connected {
        relay_key: NodeKey,
    },
    Packet {
        src: NodeKey,
        packet: Bytes,
    },
    PeerGone {
        key: NodeKey,
        reason: PeerGoneReason,
    },
    Health(RelayHealth),
    Pong {
        rtt: Duration,
    },
}

/// Why a session ended or refused an action.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SessionError {
    #[error("bad frame from relay: {0}")]
    Frame(#[from] FrameError),
    #[error("relay refused us: {0:?}")]
    Refused(RefuseReason),
    #[error("relay presented key {got}, expected {expected}")]
    WrongRelayKey { expected: NodeKey, got: NodeKey },
    #[error("relay speaks protocol version {0}")]
    Version(u8),
    #[error("cannot prove our key to this relay: {0}")]
    Proof(#[from] ProofError),
    #[error("handshake did not finish in time")]
    HandshakeTimeout,
    #[error("relay stopped answering pings")]
    Unresponsive,
    #[error("relay sent an unexpected {0:?} frame")]
    Unexpected(FrameType),
    #[error("not connected to the relay yet")]
    NotConnected,
    #[error("packet of {0} bytes is larger than a relay frame allows")]
    PacketTooLarge(usize),
    #[error("session is closed")]
    Closed,
}

#[derive(Debug)]
enum State {
    AwaitServerHello,
    AwaitAccept { relay_key: NodeKey },
    Established,
    Closed,
}

/// One relay connection's protocol state.
#[derive(Debug)]
pub struct ClientSession {
    key: PrivateKey,
    config: SessionConfig,
    state: State,
    decoder: FrameDecoder,
    out: BytesMut,
    events: VecDeque<ClientEvent>,
    handshake_deadline: Instant,
    last_tx: Instant,
    last_rx: Instant,
    /// Ping payload counter and when the outstanding ping left.
    ping_seq: u64,
    ping_out: Option<([u8; 8], Instant)>,
}

impl ClientSession {
    pub fn new(key: PrivateKey, config: SessionConfig, now: Instant) -> Self {
        ClientSession {
            key,
            handshake_deadline: now + config.handshake_timeout,
            config,
            state: State::AwaitServerHello,
            decoder: FrameDecoder::new(DEFAULT_MAX_PAYLOAD),
            out: BytesMut::new(),
            events: VecDeque::new(),
            last_tx: now,
            last_rx: now,
            ping_seq: 0,
            ping_out: None,
        }
    }

    pub fn is_established(&self) -> bool {
        matches!(self.state, State::Established)
    }

    /// Feeds bytes read from the transport. An error ends the session.
    pub fn handle_input(&mut self, now: Instant, data: &[u8]) -> Result<(), SessionError> {
        if matches!(self.state, State::Closed) {
            return Err(SessionError::Closed);
        }
        self.decoder.extend(data);
        loop {
            match self.decoder.next_frame() {
                Ok(Some(frame)) => {
                    if let Err(e) = self.on_frame(now, frame) {
                        self.state = State::Closed;
                        return Err(e);
                    }
                }
                Ok(None) => return Ok(()),
                // A newer relay may send frames we do not know; skip them.
                Err(e) if !e.is_fatal() => continue,
                Err(e) => {
                    self.state = State::Closed;
                    return Err(e.into());
                }
            }
        }
    }

    fn on_frame(&mut self, now: Instant, frame: Frame) -> Result<(), SessionError> {
        // Anything from the relay proves it is alive.
        self.last_rx = now;
        match (&self.state, frame) {
            (
                State::AwaitServerHello,
                Frame::ServerHello {
                    version,
                    relay_key,
                    challenge,
                },
            ) => {
                if version != PROTOCOL_VERSION {
                    return Err(SessionError::Version(version));
                }
                if let Some(expected) = self.config.expected_relay_key {
                    if expected != relay_key {
                        return Err(SessionError::WrongRelayKey {
                            expected,
                            got: relay_key,
                        });
                    }
                }
                let proof = auth::prove(&self.key, &relay_key, &challenge)?;
                self.push(Frame::ClientHello {
                    version: PROTOCOL_VERSION,
                    node_key: self.key.public(),
                    proof,
                });
                self.last_tx = now;
                self.state = State::AwaitAccept { relay_key };
            }
            (State::AwaitAccept { relay_key }, Frame::Accepted) => {
                let relay_key = *relay_key;
                self.state = State::Established;
                self.events.push_back(ClientEvent::Connected { relay_key });
            }
            (_, Frame::Refused { reason }) => return Err(SessionError::Refused(reason)),
            (State::Established, Frame::RecvPacket { src, packet }) => {
                self.events.push_back(ClientEvent::Packet { src, packet });
            }
            (State::Established, Frame::PeerGone { key, reason }) => {
                self.events.push_back(ClientEvent::PeerGone { key, reason });
            }
            (State::Established, Frame::Health(h)) => {
                self.events.push_back(ClientEvent::Health(h));
            }
            (State::Established, Frame::Ping(d)) => self.push(Frame::Pong(d)),
            (State::Established, Frame::Pong(d)) => {
                if let Some((sent_d, at)) = self.ping_out {
                    if sent_d == d {
                        self.ping_out = None;
                        self.events.push_back(ClientEvent::Pong {
                            rtt: now.saturating_duration_since(at),
                        });
                    }
                }
            }
            (State::Established, Frame::KeepAlive) => {}
            (_, other) => return Err(SessionError::Unexpected(other.frame_type())),
        }
        Ok(())
    }

    /// Queues a packet for `dest`. Only valid once established.
    pub fn send_packet(
        &mut self,
        now: Instant,
        dest: &NodeKey,
        packet: &[u8],
    ) -> Result<(), SessionError> {
        match self.state {
            State::Established => {}
            State::Closed => return Err(SessionError::Closed),
            _ => return Err(SessionError::NotConnected),
        }
        if packet.len() > MAX_PACKET_LEN {
            return Err(SessionError::PacketTooLarge(packet.len()));
        }
        encode_send_packet(&mut self.out, dest, packet);
        self.last_tx = now;
        Ok(())
    }

    /// Asks the relay for its counters; the answer arrives as an event.
    pub fn request_health(&mut self) -> Result<(), SessionError> {
        if !self.is_established() {
            return Err(SessionError::NotConnected);
        }
        self.push(Frame::HealthRequest);
        Ok(())
    }

    /// Advances timers: handshake deadline, keepalive pings, liveness.
    pub fn handle_timeout(&mut self, now: Instant) -> Result<(), SessionError> {
        match self.state {
            State::Closed => Err(SessionError::Closed),
            State::AwaitServerHello | State::AwaitAccept { .. } => {
                if now >= self.handshake_deadline {
                    self.state = State::Closed;
                    return Err(SessionError::HandshakeTimeout);
                }
                Ok(())
            }
            State::Established => {
                if let Some((_, at)) = self.ping_out {
                    if now >= at + self.config.ping_timeout {
                        if self.last_rx <= at {
                            self.state = State::Closed;
                            return Err(SessionError::Unresponsive);
                        }
                        // The relay spoke since; the pong is merely late.
                        self.ping_out = None;
                    }
                }
                if self.ping_out.is_none() && now >= self.keepalive_due() {
                    self.ping_seq += 1;
                    let d = self.ping_seq.to_be_bytes();
                    self.push(Frame::Ping(d));
                    self.ping_out = Some((d, now));
                    self.last_tx = now;
                }
                Ok(())
            }
        }
    }

    /// When [`ClientSession::handle_timeout`] next has work to do.
    pub fn poll_timeout(&self) -> Option<Instant> {
        match self.state {
            State::Closed => None,
            State::AwaitServerHello | State::AwaitAccept { .. } => Some(self.handshake_deadline),
            State::Established => Some(match self.ping_out {
                Some((_, at)) => at + self.config.ping_timeout,
                None => self.keepalive_due(),
            }),
        }
    }

    /// Ping when we have been quiet (to keep NATs and proxies from timing the
    /// connection out) or the relay has (to find out whether it is dead,
    /// even while we keep writing into a black hole).
    fn keepalive_due(&self) -> Instant {
        self.last_tx.min(self.last_rx) + self.config.keepalive
    }

    /// Bytes to write to the transport, all pending at once.
    pub fn poll_transmit(&mut self) -> Option<Bytes> {
        if self.out.is_empty() {
            None
        } else {
            Some(self.out.split().freeze())
        }
    }

    pub fn poll_event(&mut self) -> Option<ClientEvent> {
        self.events.pop_front()
    }

    fn push(&mut self, frame: Frame) {
        frame.encode(&mut self.out);
    }
}

#[cfg(test)]
#[path = "client_tests.rs"]
mod tests;
