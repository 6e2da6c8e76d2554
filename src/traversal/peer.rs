//! One peer's path state machine (see docs/architecture.md, "Paths"),
//! sans-IO.
//!
//! Traffic starts on the relay at once. Discovery begins with the first
//! traffic (or the peer's first disco message), so idle peers in a large mesh
//! cost nothing: it pings every candidate and asks the peer, through the
//! relay, to do the same (CallMeMaybe), so that both NATs open at the same
//! time. A ping from an unknown source is answered and pinged back, which is
//! how connection reversal and the hard-NAT methods find their paths. Only a
//! pong that matches a ping we sent on that very path can make a path usable;
//! the node has already dropped forged and replayed boxes before they get here.
//!
//! Discovery runs in rounds (0.5, 1, 2, 4, 8 s apart by default). If no pong
//! comes, the peer stays on the relay and the next attempt waits 30 s,
//! doubling up to 5 min. A direct path is heartbeaten every 3 s while traffic
//! flows and every keepalive (25 s) while idle; it is trusted for 6.5 s past
//! its last pong (keepalive + 6.5 s when idle), then traffic goes back to the
//! relay at once and discovery restarts. While direct, the other candidates
//! are re-probed every minute and a clearly better path takes over.
//!
//! When UDP is blocked, a direct TCP stream (`peer_tcp`) ranks between the
//! direct UDP paths and the relay.

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::hardnat::{self, BirthdayProber, Strategy};
use super::select::{clearly_better, PathTable};
use super::timers::{Timer, Timers};
use super::{ChangeReason, Config, DirectPath, Event, NatSummary, Path, RelayReason, TimerReason};
pub use super::{PeerStats, Rejected};
use crate::keys::NodeKey;
use crate::proto::disco::{
    is_candidate_addr, Candidate, CandidateKind, Message, Transport, MAX_CANDIDATES,
};

/// What to send. `CallMeMaybe` carries no endpoints here: the node fills in
/// this host's candidates when it seals the message, because only the node
/// knows them (and counts the NAT ports used, for prediction).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Payload {
    Disco(Message),
    CallMeMaybe,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transmit {
    pub path: Path,
    pub payload: Payload,
}

#[derive(Debug, Clone, Copy)]
struct Pending {
    path: Path,
    sent: Instant,
}

#[derive(Debug, Clone)]
enum Birthday {
    Idle { not_before: Option<Instant> },
    Hard { deadline: Instant, sprayed: u16 },
    Easy(BirthdayProber),
}

/// Bounds the pings in flight: the birthday method alone may have a few
/// hundred outstanding.
const MAX_PENDING: usize = 4096;
/// Source addresses remembered per peer (a peer has one or two public
/// addresses, one per family; a few more cover a roam).
const MAX_SEEN_IPS: usize = 4;
/// Least gap between two pings to one path outside the regular rounds.
const PING_GAP: Duration = Duration::from_secs(1);
/// How soon after switching to a direct path the other candidates are
/// pinged again when one of a better kind answered slower.
const EARLY_REPROBE: Duration = Duration::from_secs(5);
/// The same for a path that has not answered yet: short enough that a
/// repeated ping from the peer is answered with a new ping of ours, long
/// enough that a burst of the peer's pings costs one ping back.
const UNANSWERED_PING_GAP: Duration = Duration::from_millis(200);

/// The per-peer machine. See the module doc for the behaviour.
#[derive(Debug)]
pub struct PeerPaths {
    cfg: Config,
    local_key: NodeKey,
    peer_key: NodeKey,
    local_nat: NatSummary,
    remote_nat: NatSummary,
    candidates: Vec<Candidate>,
    table: PathTable,
    current: Path,
    pending: HashMap<[u8; 12], Pending>,
    transmits: VecDeque<Transmit>,
    events: VecDeque<Event>,
    rng: StdRng,
    /// The probe, heartbeat and reprobe deadlines (`timers.rs`).
    timers: Timers,
    probe_round: u32,
    retry_backoff: Duration,
    last_cmm: Option<Instant>,
    /// The peer's last CallMeMaybe: the easy side's probes start when it
    /// came and we send, in either order (`note_traffic`).
    cmm_received: Option<Instant>,
    last_traffic: Option<Instant>,
    /// The last packet *we* sent the peer: the hard-NAT methods, which
    /// spray a peer's address with probes, run only while it is recent
    /// (a peer cannot start them by sending us traffic).
    last_sent: Option<Instant>,
    /// Addresses an authenticated disco message of the peer came from:
    /// besides the coordinator-vouched NAT mapping, the only ones the
    /// birthday method may aim at (`peer_punch::remote_public`).
    seen_ips: Vec<IpAddr>,
    relay_reason: RelayReason,
    birthday: Birthday,
    on_demand: ping::OnDemand,
    tcp: tcp::TcpState,
    stats: PeerStats,
}

impl PeerPaths {
    /// `seed` feeds the tx ids and birthday ports; the node draws it from its
    /// own RNG so a whole simulation follows from one seed.
    pub fn new(cfg: Config, local_key: NodeKey, peer_key: NodeKey, seed: u64) -> Self {
        let max_paths = cfg.max_paths;
        let retry = cfg.retry_initial;
        PeerPaths {
            cfg,
            local_key,
            peer_key,
            local_nat: NatSummary::default(),
            remote_nat: NatSummary::default(),
            candidates: Vec::new(),
            table: PathTable::new(max_paths),
            current: Path::Relay,
            pending: HashMap::new(),
            transmits: VecDeque::new(),
            events: VecDeque::new(),
            rng: StdRng::seed_from_u64(seed),
            timers: Timers::default(),
            probe_round: 0,
            retry_backoff: retry,
            last_cmm: None,
            cmm_received: None,
            last_traffic: None,
            last_sent: None,
            seen_ips: Vec::new(),
            relay_reason: RelayReason::NoCandidates,
            birthday: Birthday::Idle { not_before: None },
            on_demand: ping::OnDemand::default(),
            tcp: tcp::TcpState::new(retry),
            stats: PeerStats::default(),
        }
    }

    pub fn peer_key(&self) -> NodeKey {
        self.peer_key
    }

    /// The path for the next WireGuard packet.
    pub fn current_path(&self) -> Path {
        self.current
    }

    /// Why we are on the relay; `None` while direct.
    pub fn relay_reason(&self) -> Option<&RelayReason> {
        match self.current {
            Path::Relay => Some(&self.relay_reason),
            Path::Direct(_) | Path::Tcp(_) => None,
        }
    }

    /// Smoothed RTT of the current direct path.
    pub fn rtt(&self) -> Option<Duration> {
        match self.current {
            Path::Direct(p) => self.table.get(&p).and_then(|i| i.rtt),
            Path::Tcp(_) => self.tcp.rtt(),
            Path::Relay => None,
        }
    }

    pub fn stats(&self) -> PeerStats {
        self.stats
    }

    pub fn tried(&self) -> Vec<super::Tried> {
        self.table.tried()
    }

    pub fn strategy(&self) -> Strategy {
        hardnat::strategy(&self.local_nat, &self.remote_nat)
    }

    /// The peer's candidates from the coordinator map (replacing the old).
    pub fn handle_candidates(&mut self, now: Instant, candidates: Vec<Candidate>) {
        let mut fresh: Vec<Candidate> = Vec::new();
        for c in candidates {
            if c.transport == Transport::Udp
                && is_candidate_addr(c.addr)
                && !fresh.iter().any(|f| f.addr == c.addr)
            {
                fresh.push(c);
            }
        }
        fresh.truncate(MAX_CANDIDATES);
        if fresh == self.candidates {
            return;
        }
        for c in &fresh {
            self.table.insert(now, DirectPath::primary(c.addr), c.kind);
        }
        self.candidates = fresh;
        match self.current {
            Path::Relay if self.active(now) => self.start_discovery(now),
            Path::Relay => {}
            Path::Direct(_) | Path::Tcp(_) => self.timers.set(Timer::Reprobe, now),
        }
    }

    /// The data plane sent a packet to this peer (and maybe received some).
    pub fn note_traffic(&mut self, now: Instant) {
        let was_sending = self.sending(now);
        self.last_sent = Some(now);
        self.note_received(now);
        if !was_sending && self.current == Path::Relay {
            // The birthday method waits for our traffic (`start_birthday`);
            // when it begins, so does the method, not at the next round.
            self.traffic_began(now);
        }
    }

    /// The data plane received packets from this peer and sent none.
    pub fn note_received(&mut self, now: Instant) {
        let was_idle = !self.active(now);
        self.last_traffic = Some(now);
        if !was_idle {
            return;
        }
        match self.current {
            Path::Direct(p) => {
                // The idle trust window was long; traffic needs the short one.
                if let Some(info) = self.table.get_mut(&p) {
                    let short = now + self.cfg.trust;
                    info.trusted_until = info.trusted_until.map(|t| t.min(short));
                }
                self.timers.set(Timer::Heartbeat, now);
            }
            Path::Tcp(_) => {
                self.tcp.shorten_trust(now + self.cfg.trust);
                self.timers.set(Timer::Heartbeat, now);
            }
            Path::Relay => {
                let probe = self.timers.get(Timer::Probe);
                if probe.is_none_or(|t| t > now + self.cfg.probe_retry) {
                    self.start_discovery(now);
                }
            }
        }
    }

    /// The local network changed: every direct path is suspect.
    pub fn network_changed(&mut self, now: Instant) {
        for (_, info) in self.table.iter_mut() {
            info.forget_trust();
        }
        self.pending.clear();
        self.last_cmm = None;
        if let Path::Direct(_) = self.current {
            self.switch(now, Path::Relay, ChangeReason::NetworkChanged);
        }
        self.relay_reason = RelayReason::NetworkChanged { at: now };
        self.retry_backoff = self.cfg.retry_initial;
        // Ends a running birthday attempt properly (its sockets are released),
        // then allows a new one at once: the NAT may be another one now.
        self.end_birthday(now, None);
        self.birthday = Birthday::Idle { not_before: None };
        if self.active(now) {
            self.start_discovery(now);
        }
    }

    /// A disco message from the peer, already opened and replay-checked.
    pub fn handle_disco(&mut self, now: Instant, from: Path, msg: Message) -> Result<(), Rejected> {
        match (msg, from) {
            (Message::Ping { tx_id, node_key }, Path::Direct(p)) => {
                if node_key != self.peer_key {
                    return Err(Rejected::NodeKeyMismatch);
                }
                let observed_src = p.addr;
                self.saw_ip(p.addr.ip());
                self.transmits.push_back(Transmit {
                    path: from,
                    payload: Payload::Disco(Message::Pong {
                        tx_id,
                        observed_src,
                    }),
                });
                self.table.insert(now, p, CandidateKind::PeerReflexive);
                // A path that has answered is pinged back at most once per
                // PING_GAP. One that has not may have lost our ping or its
                // pong (a burst of birthday probes can overflow a socket's
                // queue), and the peer pinging again is the moment it
                // works: waiting out the gap left the peer direct and us on
                // the relay until its next heartbeat, 3 s later.
                let info = self.table.get(&p);
                let trusted = info.is_some_and(|i| i.trusted(now));
                let gap = if trusted {
                    PING_GAP
                } else {
                    UNANSWERED_PING_GAP
                };
                let recently = info
                    .and_then(|i| i.last_ping)
                    .is_some_and(|t| now < t + gap);
                // A ping on the path we already trust proves nothing new;
                // answering it is enough, and halves the keepalive traffic.
                let current_ok = self.current == Path::Direct(p)
                    && self.table.get(&p).is_some_and(|i| i.trusted(now));
                if !recently && !current_ok {
                    self.ping(now, p);
                }
                if self.current == Path::Relay && !self.timers.is_set(Timer::Probe) {
                    self.start_discovery(now);
                }
                Ok(())
            }
            (Message::Pong { tx_id, .. }, Path::Direct(p)) => {
                let Some(pending) = self.pending.get(&tx_id).copied() else {
                    return Err(Rejected::UnexpectedPong);
                };
                if pending.path != Path::Direct(p) {
                    return Err(Rejected::UnexpectedPong);
                }
                self.pending.remove(&tx_id);
                self.saw_ip(p.addr.ip());
                self.stats.pongs_received += 1;
                self.on_demand_pong(now, tx_id, Path::Direct(p));
                let trust_for = if self.active(now) {
                    self.cfg.trust
                } else {
                    self.cfg.keepalive + self.cfg.trust
                };
                if !self.table.insert(now, p, CandidateKind::PeerReflexive) {
                    return Ok(());
                }
                if let Some(info) = self.table.get_mut(&p) {
                    info.record_pong(now, now.saturating_duration_since(pending.sent), trust_for);
                }
                self.select(now);
                self.remeasure_soon(now);
                Ok(())
            }
            (Message::CallMeMaybe { endpoints }, _) => {
                self.merge_call_me(now, endpoints);
                Ok(())
            }
            (Message::Ping { tx_id, node_key }, Path::Relay) => {
                self.answer_relay_ping(tx_id, node_key)
            }
            (Message::Pong { tx_id, .. }, Path::Relay) => self.relay_pong(now, tx_id),
            (msg @ (Message::Ping { .. } | Message::Pong { .. }), Path::Tcp(addr)) => {
                self.handle_tcp_disco(now, addr, msg)
            }
        }
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        let timeout = self.cfg.ping_timeout;
        self.pending.retain(|_, p| now < p.sent + timeout);
        self.tcp_timer(now);
        if let Path::Direct(p) = self.current {
            if !self.table.get(&p).is_some_and(|i| i.trusted(now)) {
                self.switch(now, Path::Relay, ChangeReason::TimedOut);
                self.relay_reason = RelayReason::DirectTimedOut { at: now, path: p };
                if self.active(now) {
                    self.start_discovery(now);
                }
            }
        }
        self.discovery_timer(now);
        if self.timers.is_due(Timer::Heartbeat, now) {
            match self.current {
                Path::Direct(p) => {
                    self.ping(now, p);
                }
                Path::Tcp(addr) => {
                    self.ping_tcp(now, addr);
                }
                Path::Relay => {}
            }
            let gap = if self.active(now) {
                self.cfg.heartbeat
            } else {
                self.cfg.keepalive
            };
            self.timers.set(Timer::Heartbeat, now + gap);
        }
        let on = match self.current {
            Path::Direct(p) => Some(Some(p.addr)),
            Path::Tcp(_) => Some(None),
            Path::Relay => None,
        };
        if let (Some(on), Some(at)) = (on, self.timers.get(Timer::Reprobe)) {
            if now >= at {
                // Predicted ports were good for their attempt only; probing
                // them again would open NAT mappings for nothing.
                let others: Vec<SocketAddr> = self
                    .candidates
                    .iter()
                    .filter(|c| c.kind != CandidateKind::Predicted)
                    .map(|c| c.addr)
                    .filter(|a| Some(*a) != on)
                    .collect();
                for addr in others {
                    self.ping(now, DirectPath::primary(addr));
                }
                self.timers.set(Timer::Reprobe, now + self.cfg.reprobe);
            }
        }
        self.birthday_timer(now);
    }

    /// Sends a ping on `path`; its tx id, unless too many are in flight.
    pub(super) fn ping(&mut self, now: Instant, path: DirectPath) -> Option<[u8; 12]> {
        if self.pending.len() >= MAX_PENDING {
            let timeout = self.cfg.ping_timeout;
            self.pending.retain(|_, p| now < p.sent + timeout);
            if self.pending.len() >= MAX_PENDING {
                return None;
            }
        }
        let tx_id: [u8; 12] = self.rng.gen();
        self.pending.insert(
            tx_id,
            Pending {
                path: Path::Direct(path),
                sent: now,
            },
        );
        if let Some(info) = self.table.get_mut(&path) {
            info.last_ping = Some(now);
        }
        self.stats.pings_sent += 1;
        self.transmits.push_back(Transmit {
            path: Path::Direct(path),
            payload: Payload::Disco(Message::Ping {
                tx_id,
                node_key: self.local_key,
            }),
        });
        Some(tx_id)
    }

    fn select(&mut self, now: Instant) {
        let Some((best, best_score)) = self.table.best(now) else {
            // No direct UDP path: a proven TCP stream beats the relay.
            if let (Path::Relay, Some(addr)) = (self.current, self.tcp.trusted_addr(now)) {
                self.switch(now, Path::Tcp(addr), ChangeReason::PongReceived);
            }
            return;
        };
        match self.current {
            Path::Relay => self.switch(now, Path::Direct(best), ChangeReason::PongReceived),
            // Direct UDP is always better than TCP (no head-of-line blocking
            // under the tunnel's own congestion control).
            Path::Tcp(_) => self.switch(now, Path::Direct(best), ChangeReason::BetterPath),
            Path::Direct(cur) if cur != best => {
                let cur_score = self.table.get(&cur).and_then(|i| i.score());
                let cur_ok = self.table.get(&cur).is_some_and(|i| i.trusted(now));
                if !cur_ok || cur_score.is_none_or(|c| clearly_better(best_score, c)) {
                    self.switch(now, Path::Direct(best), ChangeReason::BetterPath);
                }
            }
            Path::Direct(_) => {}
        }
    }

    /// While direct: a path of a better kind answered, but only the pings
    /// sent before it first answered, and lost on latency. Its first pongs
    /// may have carried the setup's delay (`select::PathInfo::record_pong`),
    /// so it is pinged again within [`EARLY_REPROBE`], not in a minute;
    /// once measured again it no longer asks.
    fn remeasure_soon(&mut self, now: Instant) {
        let Path::Direct(p) = self.current else {
            return;
        };
        let soon = now + EARLY_REPROBE;
        if self.table.better_kind_unsettled(now, &p)
            && self.timers.get(Timer::Reprobe).is_none_or(|t| t > soon)
        {
            self.timers.set(Timer::Reprobe, soon);
        }
    }

    fn switch(&mut self, now: Instant, to: Path, reason: ChangeReason) {
        let from = self.current;
        self.current = to;
        self.events
            .push_back(Event::PathChanged { from, to, reason });
        match to {
            Path::Direct(_) | Path::Tcp(_) => {
                tracing::debug!(peer = %self.peer_key.short(), path = %to, ?reason, "direct path");
                self.timers.clear(Timer::Probe);
                self.probe_round = 0;
                self.retry_backoff = self.cfg.retry_initial;
                // The first heartbeat comes early: the peer may not have
                // proven this path yet (its ping back can be lost), and a
                // ping from us is what lets it, a round trip later.
                self.timers.set(
                    Timer::Heartbeat,
                    now + self.cfg.probe_retry.min(self.cfg.heartbeat),
                );
                self.timers
                    .set_if_unset(Timer::Reprobe, now + self.cfg.reprobe);

                let keep = match to {
                    Path::Direct(p) => Some(p.socket),
                    _ => None,
                };
                self.end_birthday(now, keep);
            }
            Path::Relay => {
                tracing::debug!(peer = %self.peer_key.short(), ?reason, "back to relay");
                self.timers.clear(Timer::Heartbeat);
                self.timers.clear(Timer::Reprobe);
            }
        }
    }

    fn active(&self, now: Instant) -> bool {
        self.last_traffic
            .is_some_and(|t| now < t + self.cfg.active_timeout)
    }

    /// Whether we sent the peer traffic lately.
    pub(super) fn sending(&self, now: Instant) -> bool {
        self.last_sent
            .is_some_and(|t| now < t + self.cfg.active_timeout)
    }

    /// Notes that an authenticated disco message came from `ip`.
    fn saw_ip(&mut self, ip: IpAddr) {
        if self.seen_ips.contains(&ip) {
            return;
        }
        if self.seen_ips.len() >= MAX_SEEN_IPS {
            self.seen_ips.remove(0);
        }
        self.seen_ips.push(ip);
    }

    /// Whether an authenticated disco message came from `ip`.
    pub(super) fn has_seen(&self, ip: IpAddr) -> bool {
        self.seen_ips.contains(&ip)
    }

    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.transmits.pop_front()
    }

    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// The earliest deadline and what it is for; allocates nothing.
    pub fn poll_timeout(&self) -> Option<(Instant, TimerReason)> {
        // Probing runs on the relay; heartbeats and reprobes on a direct
        // path (UDP or TCP).
        let on_relay = self.current == Path::Relay;
        let own = self
            .timers
            .next_where(|t| match t {
                Timer::Probe => on_relay,
                Timer::Heartbeat | Timer::Reprobe => !on_relay,
            })
            .map(|(at, t)| (at, t.reason()));
        let trust = match self.current {
            Path::Direct(p) => self.table.get(&p).and_then(|i| i.trusted_until),
            _ => None,
        };
        let birthday = match &self.birthday {
            Birthday::Easy(p) => Some(p.deadline()),
            Birthday::Hard { deadline, .. } => Some(*deadline),
            Birthday::Idle { .. } => None,
        };
        [
            own,
            trust.map(|t| (t, TimerReason::TrustExpiry)),
            self.tcp.deadline().map(|t| (t, TimerReason::Tcp)),
            birthday.map(|t| (t, TimerReason::Birthday)),
        ]
        .into_iter()
        .flatten()
        .min_by_key(|(t, _)| *t)
    }
}

#[path = "peer_punch.rs"]
mod punch;

#[path = "peer_ping.rs"]
mod ping;
#[path = "peer_tcp.rs"]
mod tcp;

#[cfg(test)]
#[path = "peer_tests.rs"]
mod tests;

#[cfg(test)]
#[path = "punch_tests.rs"]
mod punch_tests;
