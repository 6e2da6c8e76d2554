//! Hard NATs: port prediction and the birthday method.
//!
//! A NAT with endpoint-dependent mapping (EDM) gives every new destination a
//! new public port, so the port STUN saw is useless to the peer. Two cases:
//!
//! **Sequential allocation** (ports grow by a fixed step). The owner of such a
//! NAT knows its last STUN-observed port and counts the new destinations it
//! has sent to since, so it can say which ports its *next* destinations will
//! get. It publishes those as `Predicted` candidates in CallMeMaybe
//! ([`predict`]); the peer probes them in order. When both sides are
//! sequential, the i-th probe of each side leaves from its i-th predicted
//! port towards the other's i-th predicted port, so the pairs line up and
//! each NAT already holds the mapping the other side's probe needs. This is
//! exact only while nothing else on the host opens mappings in between; when
//! cross traffic spoils it, the probes simply go unanswered and the peer stays
//! on the relay.
//!
//! **Random allocation** (the birthday method). The hard side opens
//! `birthday_sockets` (256) extra sockets and pings the easy side's public
//! address from each, which leaves 256 open mappings at random ports on its
//! NAT. The easy side (EIM, so all its probes come from one public address,
//! the one the hard side pinged) probes random ports of the hard side's public
//! IP. Each probe hits with probability 256/64512, so n probes succeed with
//! probability `1 - (1 - 256/64512)^n`: 63 % at 250, 98 % at 1000, 99.96 % at
//! 2000. The rate decides the time to direct: at 1000 probes per second the
//! attempt has found its port within 1 s in 98 % of runs and within 2 s in
//! all but 4 in 10,000, which keeps a hard pair under the 3 s a user would
//! expect; at 100 per second a third of the attempts took over 3 s. When
//! both sides are random, one side's probe must hit a port the
//! other opened *towards that very probe's source port*: hopeless, so we do
//! not try and say so ([`super::RelayReason::BothHardNat`]).
//!
//! **Sequential against random.** Prediction does not help here, and no
//! bounded method does. For a packet to cross both NATs, the random side
//! must hold a mapping towards the sequential side's public port `q` at the
//! very random port `x` the sequential side sends to from `q`. The
//! sequential side cannot reuse `q`: every new destination port it tries
//! takes the next port. So each of its guesses needs its own set of
//! mappings on the random side, and the expected number of hits is (the
//! random side's mappings towards ports the sequential side will use) /
//! 64512, whatever the split: one expected hit costs about 65,000 mappings
//! (and packets) on the random side's NAT, three (95 %) about 190,000,
//! more than most NATs' whole tables. The pair stays on the relay, and
//! `status` names both NAT kinds.
//!
//! **Traffic cost** of one birthday attempt with the defaults. A disco ping is
//! 124 bytes of UDP payload (62 header + 2 + 44 + 16 tag), 152 bytes on the
//! wire with IPv4/UDP headers. The hard side sends 256 pings: about 39 KB,
//! once. The easy side sends at most 4000 probes at 1000 per second, so at
//! most 4 s and about 600 KB (1.2 Mbit/s while it lasts), plus one pong per
//! hit; it stops at the first pong, after about 250 probes (38 KB) on
//! average. The attempt ends after 30 s
//! at the latest; after a failure the peer stays on the relay and the next
//! attempt waits `retry_initial` (30 s), doubling to `retry_max` (5 min), so
//! the long-run cost is under 1 KB/s per hard peer.

use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use rand::Rng;

use crate::proto::disco::{Candidate, CandidateKind};

/// How a NAT maps an internal address to public ones (RFC 4787 §4.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum Mapping {
    #[default]
    Unknown,
    /// No NAT: the host address is public.
    None,
    /// Endpoint-independent: one public port for all destinations.
    EndpointIndependent,
    /// Endpoint-dependent: a new public port per destination.
    EndpointDependent,
}

/// How a NAT picks the public port of a new mapping.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case", tag = "kind")]
#[non_exhaustive]
pub enum Allocation {
    #[default]
    Unknown,
    Preserving,
    /// Each new mapping gets the previous port plus `step`.
    Sequential {
        step: u16,
    },
    Random,
}

/// The parts of a netcheck report that traversal needs. Serialisable, so
/// the coordinator's map can carry each peer's summary.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct NatSummary {
    pub mapping: Mapping,
    pub allocation: Allocation,
    /// The public address STUN saw last, on the primary socket.
    pub observed: Option<SocketAddr>,
}

impl NatSummary {
    /// Nothing is known yet (no netcheck): the default.
    pub fn is_unknown(&self) -> bool {
        *self == NatSummary::default()
    }

    /// Whether this NAT allocates fresh random ports per destination.
    pub fn is_random_edm(&self) -> bool {
        self.mapping == Mapping::EndpointDependent && self.allocation == Allocation::Random
    }

    /// The step of an endpoint-dependent NAT that hands out ports in
    /// sequence: the case port prediction is for.
    pub fn sequential_step(&self) -> Option<u16> {
        match (self.mapping, self.allocation) {
            (Mapping::EndpointDependent, Allocation::Sequential { step }) => Some(step),
            _ => None,
        }
    }

    /// Whether a peer's probes from one address reach a fixed port here.
    pub fn is_easy(&self) -> bool {
        matches!(self.mapping, Mapping::None | Mapping::EndpointIndependent)
    }

    /// A few characters for a table column: "no NAT", "EIM", "EDM seq+1",
    /// "EDM random", or "-" before any netcheck. The allocation is spelled
    /// out only for EDM, where it decides between prediction and birthday.
    pub fn short(&self) -> String {
        match (self.mapping, self.allocation) {
            (Mapping::None, _) => "no NAT".into(),
            (Mapping::EndpointIndependent, _) => "EIM".into(),
            (Mapping::EndpointDependent, Allocation::Sequential { step }) => {
                format!("EDM seq+{step}")
            }
            (Mapping::EndpointDependent, Allocation::Random) => "EDM random".into(),
            (Mapping::EndpointDependent, _) => "EDM".into(),
            _ => "-".into(),
        }
    }
    fn hard_kind(&self) -> Option<&'static str> {
        match (self.mapping, self.allocation) {
            (Mapping::EndpointDependent, Allocation::Random) => Some("EDM random"),
            (Mapping::EndpointDependent, Allocation::Sequential { .. }) => Some("EDM sequential"),
            (Mapping::EndpointDependent, _) => Some("EDM"),
            _ => None,
        }
    }
}

/// The hard-NAT situation of a pair in a few words, for `status` ("both
/// sides EDM random", "peer EDM sequential"); `None` when neither is hard.
pub fn describe_pair(local: &NatSummary, remote: &NatSummary) -> Option<String> {
    match (local.hard_kind(), remote.hard_kind()) {
        (Some(l), Some(r)) if l == r => Some(format!("both sides {l}")),
        (Some(l), Some(r)) => Some(format!("this side {l}, peer {r}")),
        (Some(l), None) => Some(format!("this side {l}")),
        (None, Some(r)) => Some(format!("peer {r}")),
        (None, None) => None,
    }
}

/// What this side does about hard NATs for one peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Strategy {
    /// Plain candidates (and predicted ones, if published) are enough to try.
    Plain,
    /// We are behind the random-EDM NAT: open sockets and spray the peer.
    BirthdayHard,
    /// The peer is behind the random-EDM NAT: probe its random ports.
    BirthdayEasy,
    /// Both EDM, one of them random: nothing to try beyond the plain
    /// candidates.
    BothHard,
}

pub fn strategy(local: &NatSummary, remote: &NatSummary) -> Strategy {
    let edm = |n: &NatSummary| n.mapping == Mapping::EndpointDependent;
    match (local.is_random_edm(), remote.is_random_edm()) {
        (true, true) => Strategy::BothHard,
        // Sequential (or unknown EDM) against random: see the module doc.
        (true, false) | (false, true) if edm(local) && edm(remote) => Strategy::BothHard,
        (true, false) if remote.is_easy() => Strategy::BirthdayHard,
        (false, true) if local.is_easy() => Strategy::BirthdayEasy,
        _ => Strategy::Plain,
    }
}

/// The next `count` public ports of a sequential NAT, as candidates.
///
/// `base` is the last STUN-observed mapping; `opened_since` counts the new
/// destinations sent to from the same socket after it.
pub fn predict(base: SocketAddr, step: u16, opened_since: u32, count: u16) -> Vec<Candidate> {
    (1..=u32::from(count))
        .filter_map(|i| {
            let offset = u32::from(step).checked_mul(opened_since + i)?;
            let port = u32::from(base.port()) + offset;
            let port = u16::try_from(port).ok()?;
            Some(Candidate::udp(
                SocketAddr::new(base.ip(), port),
                CandidateKind::Predicted,
            ))
        })
        .collect()
}

/// How many of the peer's predicted ports the faster walker of a
/// sequential pair visits; the slower one visits twice as many.
pub const SEQ_WALK: u16 = 16;

/// The order in which to probe the peer's `predicted` ports (as listed in
/// its CallMeMaybe: its next ports first, then ports already given out).
///
/// When both NATs are sequential, each side's predictions may be short by
/// a few ports: mappings the agent cannot see (another program, a mapping
/// that expired and was opened again) move the counter. With offsets `da`
/// and `db` unknown, both sides walking the peer's list index by index line
/// up only when `da + db == 0`. So the two sides walk at different speeds:
/// the side with the lower node key (A) probes `B(0), B(1), B(2), ...`, the
/// other (B) probes `A(0), A(2), A(4), ...`, where `X(i)` is X's i-th
/// predicted port. A's m-th probe leaves from `A(m + da)`, B's n-th from
/// `B(n + db)`; they meet when `m + da = 2n` and `m = n + db`, that is at
/// `n = da + db`, `m = da + 2·db`. Any offsets with `da + db < SEQ_WALK`
/// and `da + 2·db < 2·SEQ_WALK` therefore pair up, for 48 probes per
/// attempt instead of 16. Ports past the published list are extrapolated
/// with the peer's step (from the coordinator's map).
pub fn walk_predicted(
    predicted: &[SocketAddr],
    local: &NatSummary,
    remote: &NatSummary,
    lower_key: bool,
) -> Vec<SocketAddr> {
    let (Some(_), Some(step), Some(first)) = (
        local.sequential_step(),
        remote.sequential_step(),
        predicted.first(),
    ) else {
        return predicted.to_vec();
    };
    let (stride, count) = if lower_key {
        (1, 2 * SEQ_WALK)
    } else {
        (2, SEQ_WALK)
    };
    let mut out: Vec<SocketAddr> = (0..u32::from(count))
        .map_while(|k| {
            let port = u32::from(first.port()) + k * stride * u32::from(step);
            u16::try_from(port)
                .ok()
                .map(|p| SocketAddr::new(first.ip(), p))
        })
        .collect();
    for a in predicted {
        if !out.contains(a) {
            out.push(*a);
        }
    }
    out
}

/// The easy side of a birthday attempt: random probes of the peer's IP.
#[derive(Debug, Clone)]
pub struct BirthdayProber {
    target: IpAddr,
    started: Instant,
    next_at: Instant,
    sent: u32,
    tried: HashSet<u16>,
    max_probes: u32,
    batch: u32,
    interval: Duration,
    deadline: Instant,
}

/// Batches go out 20 times a second, so a high rate does not cost a timer
/// wake-up per probe.
const BATCHES_PER_SEC: u32 = 20;

impl BirthdayProber {
    pub fn new(now: Instant, target: IpAddr, cfg: &super::Config) -> Self {
        let rate = cfg.birthday_rate.max(1);
        let batch = (rate / BATCHES_PER_SEC).max(1);
        BirthdayProber {
            target,
            started: now,
            next_at: now,
            sent: 0,
            tried: HashSet::new(),
            max_probes: cfg.birthday_probes,
            batch,
            interval: Duration::from_secs(u64::from(batch)) / rate,
            deadline: now + cfg.birthday_time,
        }
    }

    pub fn started(&self) -> Instant {
        self.started
    }

    pub fn sent(&self) -> u32 {
        self.sent
    }

    /// When the next batch is due, or the attempt ends.
    pub fn deadline(&self) -> Instant {
        if self.exhausted() {
            self.deadline
        } else {
            self.next_at.min(self.deadline)
        }
    }

    fn exhausted(&self) -> bool {
        self.sent >= self.max_probes
    }

    /// Whether the attempt is over at `now` (time or probes used up and the
    /// last answers had their chance).
    pub fn finished(&self, now: Instant) -> bool {
        now >= self.deadline
    }

    /// The addresses to probe now: a batch of fresh random ports.
    pub fn poll(&mut self, now: Instant, rng: &mut impl Rng) -> Vec<SocketAddr> {
        if now < self.next_at || self.exhausted() || self.finished(now) {
            return Vec::new();
        }
        self.next_at = now + self.interval;
        let mut out = Vec::new();
        while out.len() < self.batch as usize && !self.exhausted() {
            // Ports below 1024 are almost never allocated by NATs. Bounded
            // retries keep this loop finite even when most ports were tried.
            let mut port = None;
            for _ in 0..16 {
                let p = rng.gen_range(1024..=u16::MAX);
                if self.tried.insert(p) {
                    port = Some(p);
                    break;
                }
            }
            let Some(port) = port else { break };
            self.sent += 1;
            out.push(SocketAddr::new(self.target, port));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    fn summary(mapping: Mapping, allocation: Allocation) -> NatSummary {
        NatSummary {
            mapping,
            allocation,
            observed: None,
        }
    }

    #[test]
    fn strategy_picks_roles() {
        let easy = summary(Mapping::EndpointIndependent, Allocation::Preserving);
        let public = summary(Mapping::None, Allocation::Unknown);
        let hard = summary(Mapping::EndpointDependent, Allocation::Random);
        let seq = summary(
            Mapping::EndpointDependent,
            Allocation::Sequential { step: 1 },
        );
        assert_eq!(strategy(&hard, &easy), Strategy::BirthdayHard);
        assert_eq!(strategy(&public, &hard), Strategy::BirthdayEasy);
        assert_eq!(strategy(&hard, &hard), Strategy::BothHard);
        assert_eq!(strategy(&seq, &seq), Strategy::Plain);
        // A sequential NAT is not an easy side for the birthday method, and
        // nothing else bounded works against a random one.
        assert_eq!(strategy(&seq, &hard), Strategy::BothHard);
        assert_eq!(strategy(&hard, &seq), Strategy::BothHard);
    }

    #[test]
    fn prediction_skips_opened_ports_and_stops_at_65535() {
        let base: SocketAddr = "203.0.113.1:40000".parse().unwrap();
        let p = predict(base, 2, 3, 4);
        let ports: Vec<u16> = p.iter().map(|c| c.addr.port()).collect();
        assert_eq!(ports, vec![40008, 40010, 40012, 40014]);
        assert!(p.iter().all(|c| c.kind == CandidateKind::Predicted));
        let high: SocketAddr = "203.0.113.1:65533".parse().unwrap();
        assert_eq!(predict(high, 1, 0, 8).len(), 2);
    }

    #[test]
    fn sequential_pairs_walk_at_two_speeds_and_others_keep_the_list() {
        let seq = |step| NatSummary {
            mapping: Mapping::EndpointDependent,
            allocation: Allocation::Sequential { step },
            observed: None,
        };
        let easy = summary(Mapping::EndpointIndependent, Allocation::Preserving);
        let list: Vec<SocketAddr> = [
            "198.51.100.7:30010",
            "198.51.100.7:30012",
            "198.51.100.7:29990",
        ]
        .iter()
        .map(|a| a.parse().unwrap())
        .collect();
        // Not both sequential: the peer's list as it is.
        assert_eq!(walk_predicted(&list, &easy, &seq(2), true), list);
        assert_eq!(walk_predicted(&list, &seq(1), &easy, false), list);
        let ports = |w: Vec<SocketAddr>| w.iter().map(|a| a.port()).collect::<Vec<_>>();
        let fast = ports(walk_predicted(&list, &seq(1), &seq(2), true));
        assert_eq!(fast.len(), 2 * SEQ_WALK as usize + 1);
        assert_eq!(&fast[..3], &[30010, 30012, 30014]);
        // The port already given out comes after the walk.
        assert_eq!(fast.last(), Some(&29990));
        let slow = ports(walk_predicted(&list, &seq(1), &seq(2), false));
        assert_eq!(&slow[..3], &[30010, 30014, 30018]);
        assert_eq!(slow.len(), SEQ_WALK as usize + 2);
        // Never past port 65535.
        let high = ["198.51.100.7:65530".parse().unwrap()];
        assert_eq!(walk_predicted(&high, &seq(1), &seq(1), true).len(), 6);
    }

    /// The two walks meet for every pair of offsets within the bound: the
    /// NATs' i-th new mappings, shifted by `da` and `db`, must pair up.
    #[test]
    fn two_speed_walks_meet_for_small_offsets() {
        let seq = NatSummary {
            mapping: Mapping::EndpointDependent,
            allocation: Allocation::Sequential { step: 1 },
            observed: None,
        };
        let a_first: SocketAddr = "198.51.100.1:30000".parse().unwrap();
        let b_first: SocketAddr = "198.51.100.2:40000".parse().unwrap();
        for da in 0..8u16 {
            for db in 0..8u16 {
                let a_walk = walk_predicted(&[b_first], &seq, &seq, true);
                let b_walk = walk_predicted(&[a_first], &seq, &seq, false);
                // (own public port, peer port) of each mapping either NAT opens.
                let a_maps: HashSet<(u16, u16)> = a_walk
                    .iter()
                    .enumerate()
                    .map(|(m, to)| (30000 + da + m as u16, to.port()))
                    .collect();
                let met = b_walk
                    .iter()
                    .enumerate()
                    .any(|(n, to)| a_maps.contains(&(to.port(), 40000 + db + n as u16)));
                assert!(met, "offsets {da}/{db}");
            }
        }
    }

    #[test]
    fn birthday_prober_is_bounded_in_count_rate_and_time() {
        let cfg = super::super::Config {
            birthday_probes: 120,
            birthday_rate: 1000,
            ..Default::default()
        };
        let t0 = Instant::now();
        let mut rng = StdRng::seed_from_u64(1);
        let mut b = BirthdayProber::new(t0, "198.51.100.1".parse().unwrap(), &cfg);
        let first = b.poll(t0, &mut rng);
        assert_eq!(first.len(), 50, "1000/s in 20 batches a second");
        // Not due again until the batch interval passed.
        assert!(b.poll(t0, &mut rng).is_empty());
        assert_eq!(b.deadline(), t0 + Duration::from_millis(50));
        let mut all: Vec<SocketAddr> = first;
        let mut t = t0;
        while !b.finished(t) {
            t = b.deadline();
            all.extend(b.poll(t, &mut rng));
        }
        assert_eq!(all.len(), 120);
        let distinct: HashSet<_> = all.iter().collect();
        assert_eq!(distinct.len(), 120, "no port probed twice");
        assert!(all.iter().all(|a| a.port() >= 1024));
        assert!(t <= t0 + cfg.birthday_time);
    }
}
