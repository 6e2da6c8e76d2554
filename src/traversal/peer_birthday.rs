//! The hard-NAT part of the peer machine: when to start the birthday
//! method, the hard side's spray from extra sockets, the easy side's random
//! probes, and how an attempt ends (see `hardnat` for the method and its
//! cost). Kept apart so `peer.rs` reads as the plain path logic.

use std::net::SocketAddr;
use std::time::Instant;

use super::{Birthday, PeerPaths};
use crate::proto::disco::CandidateKind;
use crate::traversal::hardnat::{BirthdayProber, Strategy};
use crate::traversal::{DirectPath, Event, Path, RelayReason, SocketId};

impl PeerPaths {
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

    /// The peer's public address as STUN saw it, for the birthday method.
    pub(super) fn remote_public(&self) -> Option<SocketAddr> {
        self.remote_nat.observed.or_else(|| {
            self.candidates
                .iter()
                .find(|c| c.kind == CandidateKind::ServerReflexive)
                .map(|c| c.addr)
        })
    }

    pub(super) fn start_birthday(&mut self, now: Instant) {
        match self.strategy() {
            Strategy::BirthdayHard => {
                let Birthday::Idle { not_before } = self.birthday else {
                    return;
                };
                if not_before.is_some_and(|t| now < t) || self.remote_public().is_none() {
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
        if not_before.is_some_and(|t| now < t) || self.current != Path::Relay {
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
