//! The table of direct paths to one peer, and the choice among them.
//!
//! A path's score is its smoothed round-trip time plus a small penalty by
//! candidate kind, so that on a LAN a host candidate beats the same peer seen
//! through the NAT (hairpin) even when the two latencies are nearly equal.
//! Switching away from a working path needs a clear win (hysteresis), so two
//! paths of similar latency do not make the data plane flap between them.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use super::{DirectPath, Tried};
use crate::proto::disco::CandidateKind;

/// What we know about one direct path.
#[derive(Debug, Clone)]
pub(crate) struct PathInfo {
    pub kind: CandidateKind,
    pub last_ping: Option<Instant>,
    pub last_pong: Option<Instant>,
    pub trusted_until: Option<Instant>,
    pub rtt: Option<Duration>,
    /// When the path first answered (since it was last forgotten).
    answered_at: Option<Instant>,
    /// `Some(n)`: `rtt` started from pings sent before the path first
    /// answered (their round trips may include neighbour discovery, ARP,
    /// NAT mapping setup and packets the kernel queued meanwhile), and `n`
    /// later samples have been taken since; the path settles after
    /// [`SETTLE`] of them. `None`: settled, or never measured in setup.
    settling: Option<u8>,
}

/// Later samples a path measured in its setup takes, keeping the lowest,
/// before its RTT is smoothed like any other. One sample was not enough:
/// a first re-measure that met a load spike made an IPv6 path lose to
/// IPv4 for the minute until the next probe (issue 19 notes).
pub(crate) const SETTLE: u8 = 4;

impl PathInfo {
    fn new(kind: CandidateKind) -> Self {
        PathInfo {
            kind,
            last_ping: None,
            last_pong: None,
            trusted_until: None,
            rtt: None,
            answered_at: None,
            settling: None,
        }
    }

    pub fn trusted(&self, now: Instant) -> bool {
        self.trusted_until.is_some_and(|t| now < t)
    }

    /// Records a pong. The RTT is smoothed (EWMA, 1/4 weight for the new
    /// sample) so one late pong does not trigger a switch. One exception:
    /// an RTT measured only on pings sent before the path first answered
    /// (the setup's cost may be in it: an IPv6 path's first pongs in the
    /// lab came back after 0.8 s, then in 1 ms) is replaced outright by
    /// the first later sample, and then by the lowest of the next ones,
    /// [`SETTLE`] in all, instead of weighing on the path for minutes.
    pub fn record_pong(&mut self, now: Instant, rtt: Duration, trust_for: Duration) {
        let sent = now.checked_sub(rtt);
        let during_setup = match (self.answered_at, sent) {
            (None, _) => true,
            (Some(first), Some(sent)) => sent < first,
            (Some(_), None) => false,
        };
        self.answered_at.get_or_insert(now);
        self.last_pong = Some(now);
        self.trusted_until = Some(now + trust_for);
        self.rtt = Some(match (self.rtt, self.settling) {
            (None, _) => {
                self.settling = during_setup.then_some(0);
                rtt
            }
            // More pongs of the setup's pings: the best of them so far.
            (Some(old), Some(0)) if during_setup => old.min(rtt),
            (Some(_), Some(0)) => {
                self.settling = Some(1);
                rtt
            }
            (Some(old), Some(n)) => {
                self.settling = (n + 1 < SETTLE).then_some(n + 1);
                old.min(rtt)
            }
            (Some(old), None) => (old * 3 + rtt) / 4,
        });
    }

    /// Lower is better. `None` while no RTT is known.
    pub fn score(&self) -> Option<Duration> {
        self.rtt.map(|r| r + kind_penalty(self.kind))
    }

    pub fn forget_trust(&mut self) {
        self.trusted_until = None;
        self.rtt = None;
        self.answered_at = None;
        self.settling = None;
    }
}

/// A host candidate is worth a little latency: it avoids hairpinning and
/// keeps LAN traffic on the LAN.
fn kind_penalty(kind: CandidateKind) -> Duration {
    match kind {
        CandidateKind::Host => Duration::ZERO,
        CandidateKind::PortMapped => Duration::from_millis(1),
        _ => Duration::from_millis(2),
    }
}

/// Whether `candidate` is enough better than `current` to switch: at least
/// 10 % and at least 1 ms lower score.
pub(crate) fn clearly_better(candidate: Duration, current: Duration) -> bool {
    candidate * 10 < current * 9 && current.saturating_sub(candidate) >= Duration::from_millis(1)
}

/// The bounded set of direct paths to one peer. A `BTreeMap`, so iteration
/// order, and therefore every output, is deterministic.
#[derive(Debug, Clone, Default)]
pub(crate) struct PathTable {
    paths: BTreeMap<DirectPath, PathInfo>,
    max: usize,
}

impl PathTable {
    pub fn new(max: usize) -> Self {
        PathTable {
            paths: BTreeMap::new(),
            max: max.max(1),
        }
    }

    pub fn get(&self, p: &DirectPath) -> Option<&PathInfo> {
        self.paths.get(p)
    }

    pub fn get_mut(&mut self, p: &DirectPath) -> Option<&mut PathInfo> {
        self.paths.get_mut(p)
    }

    /// Adds a path or improves its kind. When full, evicts an untrusted path
    /// (the one with the oldest pong, never-answered first); if every path is
    /// trusted the new one is refused and `false` returned.
    pub fn insert(&mut self, now: Instant, p: DirectPath, kind: CandidateKind) -> bool {
        if let Some(info) = self.paths.get_mut(&p) {
            info.kind = info.kind.min(kind);
            return true;
        }
        if self.paths.len() >= self.max {
            let victim = self
                .paths
                .iter()
                .filter(|(_, i)| !i.trusted(now))
                .min_by_key(|(_, i)| i.last_pong)
                .map(|(p, _)| *p);
            match victim {
                Some(v) => {
                    self.paths.remove(&v);
                }
                None => return false,
            }
        }
        self.paths.insert(p, PathInfo::new(kind));
        true
    }

    /// The trusted path with the lowest score.
    pub fn best(&self, now: Instant) -> Option<(DirectPath, Duration)> {
        self.paths
            .iter()
            .filter(|(_, i)| i.trusted(now))
            .filter_map(|(p, i)| i.score().map(|s| (*p, s)))
            .min_by_key(|(_, s)| *s)
    }

    /// Whether a path of a better kind than `current`, still trusted, is
    /// still settling an RTT that started from its setup pongs (it may
    /// have lost on a latency they overstated, or on one slow re-measure).
    /// One gone quiet is not asked about again.
    pub fn better_kind_unsettled(&self, now: Instant, current: &DirectPath) -> bool {
        let Some(kind) = self.paths.get(current).map(|i| i.kind) else {
            return false;
        };
        self.paths
            .values()
            .any(|i| i.kind < kind && i.rtt.is_some() && i.settling.is_some() && i.trusted(now))
    }

    pub fn iter_mut(&mut self) -> impl Iterator<Item = (&DirectPath, &mut PathInfo)> {
        self.paths.iter_mut()
    }

    /// The paths pinged at least once, best kind first, for `status`.
    pub fn tried(&self) -> Vec<Tried> {
        let mut out: Vec<Tried> = self
            .paths
            .iter()
            .filter(|(_, i)| i.last_ping.is_some())
            .map(|(p, i)| Tried {
                path: *p,
                kind: i.kind,
                last_ping: i.last_ping,
                last_pong: i.last_pong,
                rtt: i.rtt,
            })
            .collect();
        out.sort_by_key(|t| (t.kind, t.path));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn path(port: u16) -> DirectPath {
        DirectPath::primary(std::net::SocketAddr::from(([192, 0, 2, 1], port)))
    }

    #[test]
    fn hysteresis_needs_a_clear_win() {
        let ms = Duration::from_millis;
        assert!(!clearly_better(ms(19), ms(20)));
        assert!(clearly_better(ms(17), ms(20)));
        // 10 % of a tiny RTT is not enough: also needs 1 ms.
        assert!(!clearly_better(
            Duration::from_micros(800),
            Duration::from_micros(1500)
        ));
        assert!(!clearly_better(ms(20), ms(20)));
    }

    #[test]
    fn host_beats_equal_latency_reflexive() {
        let now = Instant::now();
        let mut t = PathTable::new(8);
        t.insert(now, path(1), CandidateKind::ServerReflexive);
        t.insert(now, path(2), CandidateKind::Host);
        for p in [path(1), path(2)] {
            t.get_mut(&p).unwrap().record_pong(
                now,
                Duration::from_millis(1),
                Duration::from_secs(5),
            );
        }
        assert_eq!(t.best(now).unwrap().0, path(2));
        // Untrusted paths never win.
        assert!(t.best(now + Duration::from_secs(6)).is_none());
    }

    #[test]
    fn full_table_evicts_untrusted_only() {
        let now = Instant::now();
        let mut t = PathTable::new(2);
        t.insert(now, path(1), CandidateKind::Host);
        t.insert(now, path(2), CandidateKind::Host);
        t.get_mut(&path(1)).unwrap().record_pong(
            now,
            Duration::from_millis(1),
            Duration::from_secs(5),
        );
        assert!(t.insert(now, path(3), CandidateKind::PeerReflexive));
        assert!(t.get(&path(2)).is_none(), "untrusted path evicted");
        t.get_mut(&path(3)).unwrap().record_pong(
            now,
            Duration::from_millis(1),
            Duration::from_secs(5),
        );
        assert!(!t.insert(now, path(4), CandidateKind::Host));
        assert!(t.get(&path(4)).is_none() && t.get(&path(1)).is_some());
        // Re-inserting improves the kind.
        t.insert(now, path(3), CandidateKind::Host);
        assert_eq!(t.get(&path(3)).unwrap().kind, CandidateKind::Host);
    }

    #[test]
    fn a_setup_rtt_gives_way_to_the_lowest_of_the_next_samples() {
        let ms = Duration::from_millis;
        let trust = Duration::from_secs(5);
        let t0 = Instant::now();
        let mut slow = PathInfo::new(CandidateKind::Host);
        // Pings sent at t0 and t0+0.5 s, answered together at t0+0.8 s
        // (the kernel held them while it resolved the neighbour).
        slow.record_pong(t0 + ms(800), ms(800), trust);
        slow.record_pong(t0 + ms(801), ms(301), trust);
        assert_eq!(slow.rtt, Some(ms(301)));
        // The first ping sent after the first pong replaces it, even when
        // it met a load spike; the lowest of the next ones then wins.
        slow.record_pong(t0 + ms(5_030), ms(30), trust);
        assert_eq!(slow.rtt, Some(ms(30)));
        slow.record_pong(t0 + ms(10_001), ms(1), trust);
        assert_eq!(slow.rtt, Some(ms(1)));
        slow.record_pong(t0 + ms(15_009), ms(9), trust);
        assert_eq!(slow.rtt, Some(ms(1)));
        slow.record_pong(t0 + ms(20_001), ms(1), trust);
        assert_eq!(slow.settling, None, "settled after {SETTLE} later samples");
        // From then on, late pongs are averaged in as always.
        slow.record_pong(t0 + ms(25_000), ms(41), trust);
        assert_eq!(slow.rtt, Some(ms(11)));

        // Every path's first pong is a setup pong: a first RTT that was
        // right only gets the lowest of the next few, then jitter is
        // averaged in.
        let mut fine = PathInfo::new(CandidateKind::Host);
        fine.record_pong(t0 + ms(10), ms(10), trust);
        fine.record_pong(t0 + ms(1_008), ms(8), trust);
        assert_eq!(fine.rtt, Some(ms(8)));
        for i in 1..u64::from(SETTLE) {
            fine.record_pong(t0 + ms(1_000 + 1_000 * i + 9), ms(9), trust);
        }
        assert_eq!((fine.rtt, fine.settling), (Some(ms(8)), None));
        fine.record_pong(t0 + ms(9_012), ms(12), trust);
        assert_eq!(fine.rtt, Some(ms(9)));
        // Forgetting the path forgets when it first answered.
        fine.forget_trust();
        fine.record_pong(t0 + ms(3_000), ms(900), trust);
        fine.record_pong(t0 + ms(4_000), ms(2), trust);
        assert_eq!(fine.rtt, Some(ms(2)));
    }

    #[test]
    fn a_better_kind_measured_only_in_its_setup_is_noticed() {
        let now = Instant::now();
        let mut t = PathTable::new(8);
        t.insert(now, path(1), CandidateKind::ServerReflexive);
        t.insert(now, path(2), CandidateKind::Host);
        let ms = Duration::from_millis;
        let at = now + ms(800);
        assert!(
            !t.better_kind_unsettled(at, &path(1)),
            "host never answered"
        );
        let host = t.get_mut(&path(2)).unwrap();
        host.record_pong(at, ms(800), Duration::from_secs(5));
        assert!(t.better_kind_unsettled(at, &path(1)));
        assert!(!t.better_kind_unsettled(at, &path(2)));
        // Gone quiet past its trust: not asked about again.
        assert!(!t.better_kind_unsettled(at + ms(5_000), &path(1)));
        // Measured again (slow for real): asked about until it settled.
        let host = t.get_mut(&path(2)).unwrap();
        let mut at = now + ms(5_500);
        host.record_pong(at, ms(500), Duration::from_secs(5));
        for _ in 1..SETTLE {
            assert!(t.better_kind_unsettled(at, &path(1)));
            at += ms(5_000);
            let host = t.get_mut(&path(2)).unwrap();
            host.record_pong(at, ms(500), Duration::from_secs(5));
        }
        assert!(!t.better_kind_unsettled(at, &path(1)));
    }
}
