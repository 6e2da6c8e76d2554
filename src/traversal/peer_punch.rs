//! Hole punching, the part of the peer machine that looks for a direct
//! path while traffic is relayed: discovery rounds (pings to every
//! candidate, the CallMeMaybe through the relay, the predicted-port walk of
//! `hardnat`), restarts when either side's NAT turns out different, and the
//! birthday method (when to start it, the hard side's spray from extra
//! sockets, the easy side's random probes, how an attempt ends; see
//! `hardnat` for the method and its cost). Kept apart so `peer.rs` reads as
//! the life of a path once found: pongs, heartbeats, expiry, selection.

use std::net::SocketAddr;
use std::time::Instant;

use super::{Birthday, Payload, PeerPaths, Timer, Transmit};
use crate::proto::disco::{is_candidate_addr, Candidate, CandidateKind, Transport, MAX_CANDIDATES};
use crate::traversal::hardnat::{self, BirthdayProber, Strategy};
use crate::traversal::{DirectPath, Event, NatSummary, Path, RelayReason, SocketId};

impl PeerPaths {
    /// The NAT summaries of this host and of the peer (from netcheck and the
    /// coordinator's map).
    ///
    /// The first packet often comes before netcheck has finished on one
    /// side, so the first attempt may have run with neither side knowing it
    /// was behind a hard NAT: no birthday sockets, no predicted ports. When
    /// the NAT kinds change while we are relayed, a fresh attempt starts at
    /// once, with a CallMeMaybe that carries what we know now, instead of
    /// waiting out the failed attempt and its 30 s backoff.
    pub fn set_nat(&mut self, now: Instant, local: NatSummary, remote: NatSummary) {
        let kinds = |n: &NatSummary| (n.mapping, n.allocation);
        let changed =
            kinds(&local) != kinds(&self.local_nat) || kinds(&remote) != kinds(&self.remote_nat);
        self.local_nat = local;
        self.remote_nat = remote;
        if changed && self.current == Path::Relay && self.active(now) {
            self.last_cmm = None;
            self.retry_backoff = self.cfg.retry_initial;
            if let Birthday::Idle { not_before } = &mut self.birthday {
                *not_before = None;
            }
            self.start_discovery(now);
        }
    }

    /// This host's candidates changed (an address came up, a mapping
    /// moved): while direct, re-probe now and tell the peer in a
    /// CallMeMaybe, so a better path over the new address is found without
    /// waiting for the minute's re-probe. A stateful firewall on the peer's
    /// side opens only when both sides ping, hence the message.
    pub fn local_candidates_changed(&mut self, now: Instant) {
        if matches!(self.current, Path::Direct(_) | Path::Tcp(_)) {
            self.timers.set(Timer::Reprobe, now);
            self.last_cmm = None;
            self.maybe_call_me(now);
        }
    }

    pub(super) fn merge_call_me(&mut self, now: Instant, endpoints: Vec<Candidate>) {
        self.cmm_received = Some(now);
        // Predictions are only good for the attempt they were made for.
        let has_predicted = endpoints.iter().any(|c| c.kind == CandidateKind::Predicted);
        self.tcp_candidates(now, &endpoints);
        if has_predicted {
            self.candidates
                .retain(|c| c.kind != CandidateKind::Predicted);
        }
        for c in endpoints {
            if c.transport != Transport::Udp
                || !is_candidate_addr(c.addr)
                || self.candidates.iter().any(|k| k.addr == c.addr)
                || self.candidates.len() >= MAX_CANDIDATES
            {
                continue;
            }
            self.table.insert(now, DirectPath::primary(c.addr), c.kind);
            self.candidates.push(c);
            if self.current != Path::Relay && c.kind != CandidateKind::Predicted {
                // A new address while direct: it may be the better path.
                self.timers.set(Timer::Reprobe, now);
            }
        }
        if self.strategy() == Strategy::BirthdayEasy {
            self.start_birthday_easy(now);
        }
        if self.current == Path::Relay {
            // The peer is probing right now: probe back at once.
            if !self.timers.is_set(Timer::Probe) || self.probe_round == 0 {
                self.start_discovery(now);
            }
            self.probe_now(now);
        }
    }

    pub(super) fn discovery_timer(&mut self, now: Instant) {
        let Some(at) = self.timers.get(Timer::Probe) else {
            return;
        };
        if now < at || self.current != Path::Relay {
            return;
        }
        if self.probe_round >= self.cfg.probe_rounds {
            if !matches!(self.birthday, Birthday::Easy(_) | Birthday::Hard { .. }) {
                self.relay_reason = match self.strategy() {
                    Strategy::BothHard => RelayReason::BothHardNat,
                    _ if self.candidates.is_empty() => RelayReason::NoCandidates,
                    _ if matches!(self.relay_reason, RelayReason::BirthdayFailed { .. }) => {
                        self.relay_reason.clone()
                    }
                    _ => RelayReason::NoAnswer {
                        at: now,
                        candidates: self.candidates.len(),
                    },
                };
            }
            self.probe_round = 0;
            if self.active(now) {
                self.timers.set(Timer::Probe, now + self.retry_backoff);
                self.retry_backoff = (self.retry_backoff * 2).min(self.cfg.retry_max);
            } else {
                self.timers.clear(Timer::Probe);
            }
            return;
        }
        if self.probe_round == 0 {
            self.start_birthday(now);
        }
        self.probe_now(now);
        self.timers.set(
            Timer::Probe,
            now + self.cfg.probe_retry * 2u32.saturating_pow(self.probe_round),
        );
        self.probe_round += 1;
    }

    pub(super) fn start_discovery(&mut self, now: Instant) {
        tracing::debug!(peer = %self.peer_key.short(), "discovery starts");
        self.probe_round = 0;
        self.timers.set(Timer::Probe, now);
        // A specific reason (timed out, network changed, hard NAT) says more
        // than "probing" and stays until an attempt ends.
        if matches!(
            self.relay_reason,
            RelayReason::NoCandidates | RelayReason::NoAnswer { .. }
        ) {
            self.relay_reason = RelayReason::Probing { since: now };
        }
    }

    pub(super) fn probe_now(&mut self, now: Instant) {
        // Non-predicted first, then our CallMeMaybe, then the predicted
        // ones. The CallMeMaybe is sealed between the two, so the ports it
        // predicts for our NAT are the ones our pings to the peer's
        // predicted ports are about to take, also when we only started
        // because the peer's CallMeMaybe came. The order of those pings is
        // `hardnat::walk_predicted`'s two-speed walk.
        let (predicted, plain): (Vec<Candidate>, Vec<Candidate>) = self
            .candidates
            .iter()
            .partition(|c| c.kind == CandidateKind::Predicted);
        for c in plain {
            self.ping(now, DirectPath::primary(c.addr));
        }
        self.maybe_call_me(now);
        let predicted: Vec<SocketAddr> = predicted.iter().map(|c| c.addr).collect();
        let lower = self.local_key < self.peer_key;
        for addr in hardnat::walk_predicted(&predicted, &self.local_nat, &self.remote_nat, lower) {
            self.ping(now, DirectPath::primary(addr));
        }
        self.maybe_start_tcp(now);
    }

    pub(super) fn maybe_call_me(&mut self, now: Instant) {
        if self
            .last_cmm
            .is_some_and(|t| now < t + self.cfg.call_me_maybe_gap)
        {
            return;
        }
        self.last_cmm = Some(now);
        self.stats.call_me_maybe_sent += 1;
        self.transmits.push_back(Transmit {
            path: Path::Relay,
            payload: Payload::CallMeMaybe,
        });
    }

    /// The driver opened `count` extra sockets (ids `1..=count`).
    pub fn sockets_ready(&mut self, now: Instant, count: u16) {
        let Some(target) = self.remote_public() else {
            return;
        };
        let Birthday::Hard { sprayed, .. } = &mut self.birthday else {
            return;
        };
        if *sprayed > 0 {
            return;
        }
        *sprayed = count;
        for i in 1..=count {
            self.ping(
                now,
                DirectPath {
                    socket: SocketId(i),
                    addr: target,
                },
            );
        }
        // Tells the easy side to start probing now that the ports are open.
        self.last_cmm = None;
        self.maybe_call_me(now);
    }

    /// The peer's public address as STUN saw it, for the birthday method,
    /// which sends it thousands of probes: only an address that is
    /// vouched for. The NAT mapping in the map is (the coordinator keeps
    /// it only when the peer's own request came from that address,
    /// `coordinator::api::vouch_observed`); a server-reflexive candidate
    /// is only once an authenticated disco message of the peer came from
    /// its IP. Anything else is the peer's claim, and a peer could name a
    /// third party's address to have us scan it (README, "Security model").
    pub(super) fn remote_public(&self) -> Option<SocketAddr> {
        self.remote_nat.observed.or_else(|| {
            self.candidates
                .iter()
                .find(|c| c.kind == CandidateKind::ServerReflexive && self.has_seen(c.addr.ip()))
                .map(|c| c.addr)
        })
    }

    /// We began sending the peer traffic while relayed. The first packet
    /// usually comes before the WireGuard handshake is done, so the first
    /// discovery round (and the peer's CallMeMaybe) found us not sending
    /// yet; without this the birthday method would wait for the next
    /// round, 30 s later. The easy side starts only if the peer asked
    /// lately: its CallMeMaybe follows the spray, and probes before the
    /// spray hit no mapping.
    pub(super) fn traffic_began(&mut self, now: Instant) {
        match self.strategy() {
            Strategy::BirthdayHard => self.start_birthday(now),
            Strategy::BirthdayEasy
                if self
                    .cmm_received
                    .is_some_and(|t| now < t + self.cfg.birthday_time) =>
            {
                self.start_birthday_easy(now)
            }
            _ => {}
        }
    }

    pub(super) fn start_birthday(&mut self, now: Instant) {
        match self.strategy() {
            Strategy::BirthdayHard => {
                let Birthday::Idle { not_before } = self.birthday else {
                    return;
                };
                if not_before.is_some_and(|t| now < t)
                    || self.remote_public().is_none()
                    || !self.sending(now)
                {
                    return;
                }
                self.birthday = Birthday::Hard {
                    deadline: now + self.cfg.birthday_time,
                    sprayed: 0,
                };
                self.events
                    .push_back(Event::WantSockets(self.cfg.birthday_sockets));
            }
            Strategy::BothHard => self.relay_reason = RelayReason::BothHardNat,
            _ => {}
        }
    }

    pub(super) fn start_birthday_easy(&mut self, now: Instant) {
        let Birthday::Idle { not_before } = self.birthday else {
            return;
        };
        // Only while we send the peer traffic: a peer's CallMeMaybe alone
        // must not set off thousands of probes.
        if not_before.is_some_and(|t| now < t) || self.current != Path::Relay || !self.sending(now)
        {
            return;
        }
        if let Some(target) = self.remote_public() {
            self.birthday = Birthday::Easy(BirthdayProber::new(now, target.ip(), &self.cfg));
        }
    }

    pub(super) fn birthday_timer(&mut self, now: Instant) {
        match &mut self.birthday {
            Birthday::Easy(prober) => {
                let probes = prober.poll(now, &mut self.rng);
                let finished = prober.finished(now).then_some(prober.sent());
                // Probes are not candidates: a path is only learnt if a pong
                // comes back, which keeps the table small.
                for addr in probes {
                    self.stats.birthday_probes += 1;
                    self.ping(now, DirectPath::primary(addr));
                }
                if let Some(probes) = finished {
                    self.fail_birthday(now, probes);
                }
            }
            Birthday::Hard { deadline, sprayed } if now >= *deadline => {
                let probes = u32::from(*sprayed);
                self.fail_birthday(now, probes);
            }
            _ => {}
        }
    }

    pub(super) fn fail_birthday(&mut self, now: Instant, probes: u32) {
        if self.current == Path::Relay {
            self.relay_reason = RelayReason::BirthdayFailed { at: now, probes };
        }
        self.end_birthday(now, None);
    }

    pub(super) fn end_birthday(&mut self, now: Instant, keep: Option<SocketId>) {
        let was_hard = matches!(self.birthday, Birthday::Hard { .. });
        if matches!(self.birthday, Birthday::Idle { .. }) {
            return;
        }
        // `keep` is given when a direct path won: a success earns no
        // backoff, so when that path dies later (the NAT forgot its
        // mapping) a new attempt may start at once.
        self.birthday = Birthday::Idle {
            not_before: keep.is_none().then(|| now + self.retry_backoff),
        };
        if was_hard {
            let keep = keep.filter(|s| *s != SocketId::PRIMARY);
            self.events.push_back(Event::ReleaseSockets { keep });
        }
    }
}
