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
}

impl PathInfo {
    fn new(kind: CandidateKind) -> Self {
        PathInfo {
            kind,
            last_ping: None,
            last_pong: None,
            trusted_until: None,
            rtt: None,
        }
    }

    pub fn trusted(&self, now: Instant) -> bool {
        self.trusted_until.is_some_and(|t| now < t)
    }

    /// Records a pong. The RTT is smoothed (EWMA, 1/4 weight for the new
    /// sample) so one late pong does not trigger a switch.
    pub fn record_pong(&mut self, now: Instant, rtt: Duration, trust_for: Duration) {
        self.last_pong = Some(now);
        self.trusted_until = Some(now + trust_for);
        self.rtt = Some(match self.rtt {
            None => rtt,
            Some(old) => (old * 3 + rtt) / 4,
        });
    }

    /// Lower is better. `None` while no RTT is known.
    pub fn score(&self) -> Option<Duration> {
        self.rtt.map(|r| r + kind_penalty(self.kind))
    }

    pub fn forget_trust(&mut self) {
        self.trusted_until = None;
        self.rtt = None;
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
}
