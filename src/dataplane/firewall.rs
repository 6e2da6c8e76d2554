//! The receiving side's packet filter: every packet a peer sends is checked
//! here after decryption and before it reaches the TUN device (README,
//! "Access policy").
//!
//! A packet passes when it answers a flow this node opened (the connection
//! table below), when it is an ICMP error about such a flow or about a flow
//! the policy allows, or when the node's compiled filter
//! (`policy::PacketFilter`) allows it. A packet allowed by the filter is
//! remembered too, so the rest of its flow costs one table lookup, not a
//! walk over the rules; such entries carry the filter's generation and
//! stop counting once the filter changes, so a revoked rule cuts its
//! flows at once, while replies to flows this node opened always pass.
//!
//! The table is bounded (`MAX_FLOWS`, in shards so the inbound and
//! outbound tasks rarely contend) and entries expire after idle timeouts
//! per protocol. Time comes in as `now`, read by the driver once per batch.
//! With no policy at all nothing is tracked: allow-all costs nothing.

use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use ipnet::IpNet;
use parking_lot::Mutex;
use rustc_hash::{FxHashMap, FxHasher};

use super::flow::{self, Kind};
use crate::policy::filter::Flow;
use crate::policy::selector::{ICMP, ICMPV6, TCP, UDP};
use crate::policy::PacketFilter;

/// Flows remembered at most, over all shards.
pub const MAX_FLOWS: usize = 65_536;
const SHARDS: usize = 16;
const PER_SHARD: usize = MAX_FLOWS / SHARDS;
/// Entries looked at to choose one to evict from a full shard.
const EVICT_SAMPLE: usize = 16;

/// Idle timeouts, close to Linux conntrack's for unreplied and
/// established flows without its five-day TCP default.
const TCP_IDLE: Duration = Duration::from_secs(30 * 60);
const UDP_IDLE: Duration = Duration::from_secs(120);
const ICMP_IDLE: Duration = Duration::from_secs(30);

/// A flow from this node's side: (protocol, local, local port, remote,
/// remote port).
type Key = (u8, IpAddr, u16, IpAddr, u16);

#[derive(Debug, Clone, Copy)]
struct Entry {
    last: Instant,
    /// `None`: this node opened the flow. `Some(g)`: the filter of
    /// generation `g` allowed it.
    allowed_by: Option<u64>,
}

/// How long a packet task trusts its own memory of a flow before asking
/// the shared table again (which also refreshes the flow's idle time
/// there): far below the shortest idle timeout.
const CACHE_FOR: Duration = Duration::from_secs(1);
const CACHE_SLOTS: usize = 4;

/// A packet task's memory of the last few flows it let through, so that
/// the packets of a busy flow cost a comparison, not the shared table's
/// lock and hash (issue 16: the policy may cost at most 5% of a
/// 64-byte packet's throughput). An entry holds for `CACHE_FOR` and only
/// under the generation it was made in, which a new filter or new own
/// addresses bump: a change empties every cache at once.
#[derive(Debug, Default)]
pub struct FlowCache {
    slots: [Option<(Key, u64, Instant)>; CACHE_SLOTS],
    next: usize,
}

impl FlowCache {
    /// Whether any entry is still good: else the packet is not parsed
    /// twice for nothing.
    fn holds(&self, generation: u64, now: Instant) -> bool {
        self.slots
            .iter()
            .flatten()
            .any(|(_, g, at)| *g == generation && now.saturating_duration_since(*at) < CACHE_FOR)
    }

    fn hit(&self, key: &Key, generation: u64, now: Instant) -> bool {
        self.slots.iter().flatten().any(|(k, g, at)| {
            k == key && *g == generation && now.saturating_duration_since(*at) < CACHE_FOR
        })
    }

    fn put(&mut self, key: Key, generation: u64, now: Instant) {
        if let Some(slot) = self.slots.iter_mut().flatten().find(|(k, _, _)| *k == key) {
            *slot = (key, generation, now);
            return;
        }
        self.slots[self.next] = Some((key, generation, now));
        self.next = (self.next + 1) % CACHE_SLOTS;
    }
}

/// What happened to an inbound packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Pass,
    /// No rule allows it and it answers no flow of ours.
    Policy,
    /// Addressed to an address this node does not own or serve.
    NotOurs,
    /// Not a well-formed IP packet.
    Malformed,
}

#[derive(Debug, Default)]
pub struct FirewallDrops {
    pub policy: AtomicU64,
    pub not_ours: AtomicU64,
}

#[derive(Debug, Default)]
struct Rules {
    filter: PacketFilter,
    /// Addresses this node owns and routes it serves; empty until the
    /// driver sets them (then nothing is refused for its destination).
    local: Vec<IpNet>,
}

pub struct Firewall {
    /// The filter and this node's addresses, in one swap: one load per
    /// packet (`examples/firewall_bench.rs`).
    rules: ArcSwap<Rules>,
    generation: AtomicU64,
    /// FxHash: SipHash's flood resistance is not needed for keys a peer
    /// cannot choose freely (its source address is checked first, and the
    /// table is bounded), and it cost a third of a WireGuard open.
    shards: Vec<Mutex<FxHashMap<Key, Entry>>>,
    /// False while there is neither a policy nor a set of own addresses:
    /// then every packet passes after one relaxed load (static configs).
    active: std::sync::atomic::AtomicBool,
    /// Where the filter comes from: the config file's (`[interface]
    /// filter_file`, allow-all without one) and the network's policy
    /// from the map, which replaces it while there is one. Only the
    /// writers (the mesh task, a reload) take this lock.
    sources: Mutex<(PacketFilter, Option<PacketFilter>)>,
    pub drops: FirewallDrops,
}

impl Default for Firewall {
    fn default() -> Self {
        Firewall {
            rules: ArcSwap::from_pointee(Rules::default()),
            generation: AtomicU64::new(0),
            shards: (0..SHARDS)
                .map(|_| Mutex::new(FxHashMap::default()))
                .collect(),
            active: std::sync::atomic::AtomicBool::new(false),
            sources: Mutex::new((PacketFilter::allow_all(), None)),
            drops: FirewallDrops::default(),
        }
    }
}

fn idle(proto: u8) -> Duration {
    match proto {
        TCP => TCP_IDLE,
        UDP => UDP_IDLE,
        ICMP | ICMPV6 => ICMP_IDLE,
        _ => UDP_IDLE,
    }
}

fn shard_of(key: &Key) -> usize {
    use std::hash::{Hash, Hasher};
    let mut h = FxHasher::default();
    key.hash(&mut h);
    (h.finish() as usize) % SHARDS
}

impl Firewall {
    /// Installs a new filter; flows the old one allowed must pass the new.
    /// Called by one task at a time (under `sources`, or a test's), as are
    /// `set_local`'s.
    pub fn set_filter(&self, filter: PacketFilter) {
        let cur = self.rules.load_full();
        if cur.filter == filter {
            return;
        }
        let local = cur.local.clone();
        self.store(Rules { filter, local });
        self.generation.fetch_add(1, Ordering::Release);
    }

    /// The config file's filter: in force whenever the network has no
    /// policy (or this node is in no network).
    pub fn set_base(&self, filter: PacketFilter) {
        let mut src = self.sources.lock();
        src.0 = filter;
        self.set_filter(src.1.clone().unwrap_or_else(|| src.0.clone()));
    }

    /// The network's policy for this node (`None`: the network has none).
    pub fn set_policy(&self, filter: Option<PacketFilter>) {
        let mut src = self.sources.lock();
        src.1 = filter;
        self.set_filter(src.1.clone().unwrap_or_else(|| src.0.clone()));
    }

    fn store(&self, rules: Rules) {
        let on = !rules.filter.is_allow_all() || !rules.local.is_empty();
        self.rules.store(std::sync::Arc::new(rules));
        self.active.store(on, Ordering::Release);
    }

    pub fn filter(&self) -> PacketFilter {
        self.rules.load().filter.clone()
    }

    /// How many rules the filter has; `None`: no policy.
    pub fn rule_count(&self) -> Option<usize> {
        self.rules.load().filter.rules().map(<[_]>::len)
    }

    pub fn set_local(&self, local: Vec<IpNet>) {
        let cur = self.rules.load_full();
        if cur.local == local {
            return;
        }
        let filter = cur.filter.clone();
        self.store(Rules { filter, local });
        // The packet tasks' caches skip the destination check: what they
        // hold was judged against the old addresses.
        self.generation.fetch_add(1, Ordering::Release);
    }

    /// Flows in the table (for `status` and the tests).
    pub fn tracked(&self) -> usize {
        self.shards.iter().map(|s| s.lock().len()).sum()
    }

    /// A packet this node sends a peer (read from the TUN device): its
    /// replies will pass.
    pub fn outbound(&self, packet: &[u8], now: Instant) {
        self.outbound_cached(&mut FlowCache::default(), packet, now);
    }

    /// [`Self::outbound`] for a packet task that keeps a [`FlowCache`].
    pub fn outbound_cached(&self, cache: &mut FlowCache, packet: &[u8], now: Instant) {
        if !self.active.load(Ordering::Acquire) || self.rules.load().filter.is_allow_all() {
            return;
        }
        let Some(p) = flow::parse(packet) else {
            return;
        };
        if matches!(p.kind, Kind::IcmpError { .. } | Kind::Fragment) {
            return;
        }
        let f = p.flow;
        let key = (f.proto, f.src, f.src_port, f.dst, f.dst_port);
        // A flow of ours stays ours whatever the filter: generation 0.
        if p.kind != Kind::TcpSyn && cache.hit(&key, 0, now) {
            return;
        }
        self.insert(key, now, None, p.kind == Kind::TcpSyn);
        cache.put(key, 0, now);
    }

    /// Checks a packet a peer sent; counts what it drops.
    pub fn inbound(&self, packet: &[u8], now: Instant) -> Verdict {
        self.inbound_cached(&mut FlowCache::default(), packet, now)
    }

    /// [`Self::inbound`] for a packet task that keeps a [`FlowCache`].
    pub fn inbound_cached(&self, cache: &mut FlowCache, packet: &[u8], now: Instant) -> Verdict {
        let verdict = self.judge(cache, packet, now);
        match verdict {
            Verdict::Policy => bump(&self.drops.policy),
            Verdict::NotOurs => bump(&self.drops.not_ours),
            _ => {}
        }
        verdict
    }

    fn judge(&self, cache: &mut FlowCache, packet: &[u8], now: Instant) -> Verdict {
        if !self.active.load(Ordering::Acquire) {
            return Verdict::Pass;
        }
        let generation = self.generation.load(Ordering::Acquire);
        // A busy flow this task let through under this generation (of the
        // filter and of this node's addresses): nothing else to check.
        let parsed = if cache.holds(generation, now) {
            let Some(p) = flow::parse(packet) else {
                return Verdict::Malformed;
            };
            let f = &p.flow;
            let key = (f.proto, f.dst, f.dst_port, f.src, f.src_port);
            if !matches!(
                p.kind,
                Kind::TcpSyn | Kind::IcmpError { .. } | Kind::Fragment
            ) && cache.hit(&key, generation, now)
            {
                return Verdict::Pass;
            }
            Some(p)
        } else {
            None
        };
        let rules = self.rules.load();
        let (filter, local) = (&rules.filter, &rules.local);
        if filter.is_allow_all() {
            // Only the destination matters: no need to parse further.
            return match super::packet::destination(packet) {
                None => Verdict::Malformed,
                Some(dst) if !local.is_empty() && !local.iter().any(|n| n.contains(&dst)) => {
                    Verdict::NotOurs
                }
                Some(_) => Verdict::Pass,
            };
        }
        let Some(p) = parsed.or_else(|| flow::parse(packet)) else {
            return Verdict::Malformed;
        };
        let f = p.flow;
        if !local.is_empty() && !local.iter().any(|n| n.contains(&f.dst)) {
            return Verdict::NotOurs;
        }
        match p.kind {
            Kind::IcmpError { inner } => {
                // The quoted packet is one we sent: our flow, seen from us.
                let ours = (
                    inner.proto,
                    inner.src,
                    inner.src_port,
                    inner.dst,
                    inner.dst_port,
                );
                let known = self.touch(&ours, now, generation);
                // An error about a flow the peer opened to us (its quote
                // has it as the source) is allowed like that flow.
                if known || filter.allows(&reversed(&inner)) {
                    Verdict::Pass
                } else {
                    Verdict::Policy
                }
            }
            Kind::Fragment => {
                if filter.allows_addrs(f.proto, f.src, f.dst) || self.some_flow_between(&f) {
                    Verdict::Pass
                } else {
                    Verdict::Policy
                }
            }
            _ => {
                let key = (f.proto, f.dst, f.dst_port, f.src, f.src_port);
                // A SYN opens a new connection: it must pass the rules even
                // if an old entry of the same ports is still in the table.
                if p.kind != Kind::TcpSyn && self.touch(&key, now, generation) {
                    cache.put(key, generation, now);
                    return Verdict::Pass;
                }
                if filter.allows(&f) {
                    self.insert(key, now, Some(generation), false);
                    cache.put(key, generation, now);
                    Verdict::Pass
                } else {
                    Verdict::Policy
                }
            }
        }
    }

    /// Whether `key` is a live flow; refreshes it if so.
    fn touch(&self, key: &Key, now: Instant, generation: u64) -> bool {
        let mut shard = self.shards[shard_of(key)].lock();
        let Some(e) = shard.get_mut(key) else {
            return false;
        };
        let live = now.saturating_duration_since(e.last) < idle(key.0)
            && e.allowed_by.is_none_or(|g| g == generation);
        if live {
            e.last = now;
        } else {
            shard.remove(key);
        }
        live
    }

    /// Remembers a flow: `allowed_by` `None` is ours (we sent first),
    /// `Some(g)` the filter of generation `g` let the peer open it.
    /// `opens`: our packet opens a new connection (a TCP SYN).
    fn insert(&self, key: Key, now: Instant, allowed_by: Option<u64>, opens: bool) {
        let mut shard = self.shards[shard_of(&key)].lock();
        if let Some(e) = shard.get_mut(&key) {
            e.last = now;
            // Answering a flow the peer opened does not make it ours (a
            // revoked rule must still cut it); a connection we open on the
            // same ports is ours.
            if opens {
                e.allowed_by = None;
            }
            return;
        }
        if shard.len() >= PER_SHARD {
            // Full: the stalest of a sample goes (an expired one if the
            // sample has one). Sampled, as Redis evicts, so a flood of new
            // flows costs each a few lookups, not a scan of the shard.
            let victim = shard
                .iter()
                .take(EVICT_SAMPLE)
                .min_by_key(|(k, e)| (now.saturating_duration_since(e.last) < idle(k.0), e.last))
                .map(|(k, _)| *k);
            if let Some(k) = victim {
                shard.remove(&k);
            }
        }
        shard.insert(
            key,
            Entry {
                last: now,
                allowed_by,
            },
        );
    }

    /// Any flow of ours between the fragment's two addresses in its
    /// protocol (its first fragment opened or answered it).
    fn some_flow_between(&self, f: &Flow) -> bool {
        self.shards.iter().any(|s| {
            s.lock()
                .keys()
                .any(|k| k.0 == f.proto && k.1 == f.dst && k.3 == f.src)
        })
    }
}

fn reversed(f: &Flow) -> Flow {
    Flow {
        proto: f.proto,
        src: f.dst,
        dst: f.src,
        src_port: f.dst_port,
        dst_port: f.src_port,
    }
}

fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

#[cfg(test)]
#[path = "firewall_tests.rs"]
mod tests;
