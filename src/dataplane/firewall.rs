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

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use ipnet::IpNet;
use parking_lot::Mutex;

use super::flow::{self, Kind};
use crate::policy::filter::Flow;
use crate::policy::selector::{ICMP, ICMPV6, TCP, UDP};
use crate::policy::PacketFilter;

/// Flows remembered at most, over all shards.
pub const MAX_FLOWS: usize = 65_536;
const SHARDS: usize = 16;
const PER_SHARD: usize = MAX_FLOWS / SHARDS;

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

pub struct Firewall {
    filter: ArcSwap<PacketFilter>,
    generation: AtomicU64,
    /// Addresses this node owns and routes it serves; empty until the
    /// driver sets them (then nothing is refused for its destination).
    local: ArcSwap<Vec<IpNet>>,
    shards: Vec<Mutex<HashMap<Key, Entry>>>,
    pub drops: FirewallDrops,
}

impl Default for Firewall {
    fn default() -> Self {
        Firewall {
            filter: ArcSwap::from_pointee(PacketFilter::allow_all()),
            generation: AtomicU64::new(0),
            local: ArcSwap::from_pointee(Vec::new()),
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
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
    let mut h = std::collections::hash_map::DefaultHasher::new();
    key.hash(&mut h);
    (h.finish() as usize) % SHARDS
}

impl Firewall {
    /// Installs a new filter; flows the old one allowed must pass the new.
    pub fn set_filter(&self, filter: PacketFilter) {
        if **self.filter.load() == filter {
            return;
        }
        self.filter.store(std::sync::Arc::new(filter));
        self.generation.fetch_add(1, Ordering::Release);
    }

    pub fn filter(&self) -> std::sync::Arc<PacketFilter> {
        self.filter.load_full()
    }

    pub fn set_local(&self, nets: Vec<IpNet>) {
        self.local.store(std::sync::Arc::new(nets));
    }

    /// Flows in the table (for `status` and the tests).
    pub fn tracked(&self) -> usize {
        self.shards.iter().map(|s| s.lock().len()).sum()
    }

    /// A packet this node sends a peer (read from the TUN device): its
    /// replies will pass.
    pub fn outbound(&self, packet: &[u8], now: Instant) {
        if self.filter.load().is_allow_all() {
            return;
        }
        let Some(p) = flow::parse(packet) else {
            return;
        };
        if matches!(p.kind, Kind::IcmpError { .. } | Kind::Fragment) {
            return;
        }
        let f = p.flow;
        self.insert((f.proto, f.src, f.src_port, f.dst, f.dst_port), now, None);
    }

    /// Checks a packet a peer sent; counts what it drops.
    pub fn inbound(&self, packet: &[u8], now: Instant) -> Verdict {
        let verdict = self.judge(packet, now);
        match verdict {
            Verdict::Policy => bump(&self.drops.policy),
            Verdict::NotOurs => bump(&self.drops.not_ours),
            _ => {}
        }
        verdict
    }

    fn judge(&self, packet: &[u8], now: Instant) -> Verdict {
        let filter = self.filter.load();
        let local = self.local.load();
        if filter.is_allow_all() && local.is_empty() {
            return Verdict::Pass;
        }
        let Some(p) = flow::parse(packet) else {
            return Verdict::Malformed;
        };
        let f = p.flow;
        if !local.is_empty() && !local.iter().any(|n| n.contains(&f.dst)) {
            return Verdict::NotOurs;
        }
        if filter.is_allow_all() {
            return Verdict::Pass;
        }
        let generation = self.generation.load(Ordering::Acquire);
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
                    return Verdict::Pass;
                }
                if filter.allows(&f) {
                    self.insert(key, now, Some(generation));
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

    fn insert(&self, key: Key, now: Instant, allowed_by: Option<u64>) {
        let mut shard = self.shards[shard_of(&key)].lock();
        if let Some(e) = shard.get_mut(&key) {
            e.last = now;
            // A flow we opened stays ours.
            e.allowed_by = e.allowed_by.and(allowed_by);
            return;
        }
        if shard.len() >= PER_SHARD {
            shard.retain(|k, e| now.saturating_duration_since(e.last) < idle(k.0));
        }
        if shard.len() >= PER_SHARD {
            // Full of live flows: the least recently used one goes.
            if let Some(oldest) = shard.iter().min_by_key(|(_, e)| e.last).map(|(k, _)| *k) {
                shard.remove(&oldest);
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
