//! The direct-TCP part of the peer machine (see docs/architecture.md,
//! "Paths"): when
//! to dial the peer's TCP candidates, how a stream becomes a trusted path,
//! and how it stops being one.
//!
//! A TCP attempt is coordinated like a UDP one. Each side publishes its TCP
//! candidates in `CallMeMaybe` (only when its UDP is blocked, or once the
//! peer has published some: two hosts whose UDP works never pay for TCP).
//! Whoever learns the other's TCP candidates while having a listener of its
//! own starts an attempt: the driver dials them from the listening port,
//! retrying for `tcp_window`, so that both SYNs cross the NATs at nearly the
//! same time (TCP simultaneous open) or one side's listener accepts.
//!
//! A stream proves nothing by existing. The side that connected pings over
//! it; a ping that opens (the node has checked the box and its replay
//! window) names the peer, and the pong to our own ping makes the stream a
//! trusted path, exactly like a UDP path. It ranks below every direct UDP
//! path and above the relay. It is heartbeaten like a direct path and its
//! trust lapses the same way; when the driver reports the stream closed,
//! traffic goes back to the relay at once. A failed attempt waits for the
//! next one with the same backoff as UDP discovery (30 s doubling to 5 min),
//! unless the peer publishes TCP addresses it had not (a late netcheck that
//! found its NAT sequential adds predicted ports): those are dialled at once.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use rand::Rng;

use super::{Path, Payload, PeerPaths, Pending, Rejected, Transmit};
use crate::proto::disco::{is_candidate_addr, Candidate, Message, Transport, MAX_CANDIDATES};
use crate::traversal::{ChangeReason, Event, RelayReason};

/// One stream to the peer, as the driver reported it.
#[derive(Debug, Clone, Copy)]
pub(super) struct TcpLink {
    addr: SocketAddr,
    trusted_until: Option<Instant>,
    rtt: Option<Duration>,
    last_ping: Option<Instant>,
    /// An authentic disco message from the peer came over it.
    proven: bool,
}

#[derive(Debug, Clone)]
pub(super) struct TcpState {
    /// We listen on a TCP port and can dial from it.
    local: bool,
    /// Our UDP is blocked: publish our TCP candidates unasked.
    udp_blocked: bool,
    /// The peer's TCP candidates, from its CallMeMaybe.
    remote: Vec<SocketAddr>,
    /// The running attempt ends then.
    attempt_until: Option<Instant>,
    /// No new attempt before this (backoff after a failed one).
    not_before: Option<Instant>,
    backoff: Duration,
    link: Option<TcpLink>,
}

impl TcpState {
    pub(super) fn new(backoff: Duration) -> Self {
        TcpState {
            local: false,
            udp_blocked: false,
            remote: Vec::new(),
            attempt_until: None,
            not_before: None,
            backoff,
            link: None,
        }
    }

    pub(super) fn rtt(&self) -> Option<Duration> {
        self.link.and_then(|l| l.rtt)
    }

    /// The stream's address while a pong vouches for it.
    pub(super) fn trusted_addr(&self, now: Instant) -> Option<SocketAddr> {
        self.link
            .filter(|l| l.trusted_until.is_some_and(|t| now < t))
            .map(|l| l.addr)
    }

    pub(super) fn shorten_trust(&mut self, until: Instant) {
        if let Some(l) = &mut self.link {
            l.trusted_until = l.trusted_until.map(|t| t.min(until));
        }
    }

    /// The attempt's end, or the moment the stream's trust lapses.
    pub(super) fn deadline(&self) -> Option<Instant> {
        let trust = self.link.and_then(|l| l.trusted_until);
        [self.attempt_until, trust].into_iter().flatten().min()
    }
}

impl PeerPaths {
    /// Whether this host has a TCP listener, and whether its UDP is blocked.
    /// Netcheck may say so well after discovery began: a peer we are
    /// relaying to then hears our TCP candidates at once, not at the next
    /// discovery attempt.
    pub fn set_tcp_local(&mut self, now: Instant, listening: bool, udp_blocked: bool) {
        let wanted = self.wants_tcp();
        self.tcp.local = listening;
        self.tcp.udp_blocked = udp_blocked;
        if !wanted && self.wants_tcp() && self.current == Path::Relay && self.active(now) {
            self.last_cmm = None;
            self.maybe_call_me(now);
            self.maybe_start_tcp(now);
        }
    }

    /// Whether our CallMeMaybe to this peer should carry our TCP candidates.
    pub fn wants_tcp(&self) -> bool {
        self.tcp.local && (self.tcp.udp_blocked || !self.tcp.remote.is_empty())
    }

    /// The peer's TCP candidates, if its CallMeMaybe carries any.
    pub(super) fn tcp_candidates(&mut self, now: Instant, endpoints: &[Candidate]) {
        let mut remote: Vec<SocketAddr> = Vec::new();
        // Never a dial to this host, a link or the overlay (see
        // `is_candidate_addr`), whatever a CallMeMaybe says.
        for c in endpoints
            .iter()
            .filter(|c| c.transport == Transport::Tcp && is_candidate_addr(c.addr))
        {
            if !remote.contains(&c.addr) && remote.len() < MAX_CANDIDATES {
                remote.push(c.addr);
            }
        }
        if remote.is_empty() {
            return;
        }
        let fresh = self.tcp.remote.is_empty();
        let grew = remote.iter().any(|a| !self.tcp.remote.contains(a));
        self.tcp.remote = remote;
        if grew && !fresh && self.tcp.link.is_none() {
            // New addresses are new information (typically a late netcheck
            // that found the peer's NAT sequential, and its predicted
            // ports): dial the new list now rather than after the running
            // attempt and its backoff. The driver's new dial replaces the
            // old one. Bounded by how often the peer learns new addresses.
            self.tcp.attempt_until = None;
            self.tcp.not_before = None;
        }
        if fresh && self.tcp.local {
            // The peer has not heard our TCP candidates if our UDP works:
            // answer now instead of after the CallMeMaybe gap.
            self.last_cmm = None;
            self.maybe_call_me(now);
        }
        self.maybe_start_tcp(now);
    }

    /// Starts a TCP attempt if one may run now.
    pub(super) fn maybe_start_tcp(&mut self, now: Instant) {
        let t = &self.tcp;
        if !t.local
            || t.remote.is_empty()
            || t.attempt_until.is_some()
            || t.link.is_some()
            || t.not_before.is_some_and(|nb| now < nb)
            || matches!(self.current, Path::Direct(_) | Path::Tcp(_))
        {
            return;
        }
        let until = now + self.cfg.tcp_window;
        self.tcp.attempt_until = Some(until);
        tracing::debug!(peer = %self.peer_key.short(), targets = ?self.tcp.remote, "direct tcp attempt");
        self.events.push_back(Event::TcpConnect {
            targets: self.tcp.remote.clone(),
            until,
        });
    }

    /// Our dial to `addr` produced a stream (the driver knows it was for
    /// this peer). It is pinged; only the pong makes it a path.
    pub fn tcp_connected(&mut self, now: Instant, addr: SocketAddr) {
        self.adopt_link(addr);
        self.ping_tcp(now, addr);
    }

    /// The stream to `addr` closed (reset, EOF, write error).
    pub fn tcp_closed(&mut self, now: Instant, addr: SocketAddr) {
        if self.tcp.link.is_none_or(|l| l.addr != addr) {
            return;
        }
        self.tcp.link = None;
        self.pending.retain(|_, p| p.path != Path::Tcp(addr));
        if self.current == Path::Tcp(addr) {
            self.lose_tcp(now, addr, ChangeReason::StreamClosed);
        }
    }

    /// Whether the stream to `addr` has carried an authentic disco message
    /// from this peer, so WireGuard packets from it may be taken.
    pub fn tcp_proven(&self, addr: SocketAddr) -> bool {
        self.tcp.link.is_some_and(|l| l.addr == addr && l.proven)
    }

    /// An opened disco ping or pong that came over the stream from `addr`.
    pub(super) fn handle_tcp_disco(
        &mut self,
        now: Instant,
        addr: SocketAddr,
        msg: Message,
    ) -> Result<(), Rejected> {
        match msg {
            Message::Ping { tx_id, node_key } => {
                if node_key != self.peer_key {
                    return Err(Rejected::NodeKeyMismatch);
                }
                // An accepted stream becomes this peer's on its first ping.
                self.adopt_link(addr);
                if let Some(l) = self.tcp.link.as_mut().filter(|l| l.addr == addr) {
                    l.proven = true;
                }
                self.transmits.push_back(Transmit {
                    path: Path::Tcp(addr),
                    payload: Payload::Disco(Message::Pong {
                        tx_id,
                        observed_src: addr,
                    }),
                });
                let trusted = self.tcp.trusted_addr(now) == Some(addr);
                let recently = self
                    .tcp
                    .link
                    .and_then(|l| l.last_ping)
                    .is_some_and(|t| now < t + Duration::from_secs(1));
                if !trusted && !recently {
                    self.ping_tcp(now, addr);
                }
                Ok(())
            }
            Message::Pong { tx_id, .. } => {
                match self.pending.get(&tx_id) {
                    Some(p) if p.path == Path::Tcp(addr) => {}
                    _ => return Err(Rejected::UnexpectedPong),
                }
                let Some(pending) = self.pending.remove(&tx_id) else {
                    return Err(Rejected::UnexpectedPong);
                };
                self.stats.pongs_received += 1;
                let trust_for = if self.active(now) {
                    self.cfg.trust
                } else {
                    self.cfg.keepalive + self.cfg.trust
                };
                let Some(link) = self.tcp.link.as_mut().filter(|l| l.addr == addr) else {
                    return Err(Rejected::WrongPath);
                };
                let rtt = now.saturating_duration_since(pending.sent);
                link.trusted_until = Some(now + trust_for);
                link.proven = true;
                link.rtt = Some(link.rtt.map_or(rtt, |old| (old * 3 + rtt) / 4));
                self.tcp.attempt_until = None;
                self.tcp.not_before = None;
                self.tcp.backoff = self.cfg.retry_initial;
                self.select(now);
                self.on_demand_pong(now, tx_id, Path::Tcp(addr));
                Ok(())
            }
            Message::CallMeMaybe { .. } => Err(Rejected::WrongPath),
        }
    }

    /// Sends a disco ping over the stream to `addr`.
    pub(super) fn ping_tcp(&mut self, now: Instant, addr: SocketAddr) -> [u8; 12] {
        let tx_id: [u8; 12] = self.rng.gen();
        self.pending.insert(
            tx_id,
            Pending {
                path: Path::Tcp(addr),
                sent: now,
            },
        );
        if let Some(l) = self.tcp.link.as_mut().filter(|l| l.addr == addr) {
            l.last_ping = Some(now);
        }
        self.stats.pings_sent += 1;
        self.transmits.push_back(Transmit {
            path: Path::Tcp(addr),
            payload: Payload::Disco(Message::Ping {
                tx_id,
                node_key: self.local_key,
            }),
        });
        tx_id
    }

    /// Attempt deadlines and stream expiry.
    pub(super) fn tcp_timer(&mut self, now: Instant) {
        if self.tcp.attempt_until.is_some_and(|t| now >= t) {
            self.tcp.attempt_until = None;
            if self.tcp.trusted_addr(now).is_none() {
                self.tcp.not_before = Some(now + self.tcp.backoff);
                self.tcp.backoff = (self.tcp.backoff * 2).max(self.cfg.retry_initial);
                self.tcp.backoff = self.tcp.backoff.min(self.cfg.retry_max);
                if let Some(l) = self.tcp.link.take() {
                    self.events.push_back(Event::TcpClose { addr: l.addr });
                }
            }
        }
        let lapsed = self
            .tcp
            .link
            .filter(|l| l.trusted_until.is_some_and(|t| now >= t))
            .map(|l| l.addr);
        if let Some(addr) = lapsed {
            // Silent past its trust window: a dead stream (or a path nobody
            // uses any more, once UDP took over). Either way, close it.
            self.tcp.link = None;
            self.events.push_back(Event::TcpClose { addr });
            if self.current == Path::Tcp(addr) {
                self.lose_tcp(now, addr, ChangeReason::TimedOut);
            }
        }
    }

    fn adopt_link(&mut self, addr: SocketAddr) {
        match self.tcp.link {
            Some(l) if l.addr == addr => {}
            // A second stream while the first is proven: keep the first.
            Some(l) if l.trusted_until.is_some() => {}
            _ => {
                self.tcp.link = Some(TcpLink {
                    addr,
                    trusted_until: None,
                    rtt: None,
                    last_ping: None,
                    proven: false,
                })
            }
        }
    }

    fn lose_tcp(&mut self, now: Instant, addr: SocketAddr, reason: ChangeReason) {
        self.switch(now, Path::Relay, reason);
        self.relay_reason = RelayReason::TcpLost { at: now, addr };
        self.tcp.not_before = Some(now + self.tcp.backoff);
        if self.active(now) {
            self.start_discovery(now);
        }
    }
}
