//! The simulated network: hosts, NATs, links, a relay, and a packet queue
//! ordered by delivery time on a virtual clock.
//!
//! NATs follow RFC 4787: mapping endpoint-independent or -dependent, port
//! allocation preserving / sequential (with a step) / random, filtering
//! endpoint-independent, address-dependent or address-and-port-dependent,
//! hairpinning on or off, UDP blocked, TCP blocked but to 443, mapping
//! timeout. Each NAT keeps a TCP mapping table beside its UDP one, for the
//! direct TCP path's simultaneous open; STUN servers answer Binding
//! requests with the source they saw. Every random choice
//! (loss, jitter, random ports) comes from one seeded RNG, and the queue
//! breaks ties by insertion order, so a seed fixes the whole run.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use bytes::Bytes;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use warren::proto::stun;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MapKind {
    Eim,
    Edm,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Alloc {
    Preserving,
    Sequential(u16),
    Random,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Filter {
    EndpointIndependent,
    AddressDependent,
    AddressPortDependent,
}

#[derive(Debug, Clone, Copy)]
pub struct NatConfig {
    pub mapping: MapKind,
    pub alloc: Alloc,
    pub filter: Filter,
    pub hairpin: bool,
    pub udp_blocked: bool,
    /// No TCP but to port 443 (the relay): the lab's "udp-blocked" gateway.
    pub tcp_blocked: bool,
    pub timeout: Duration,
}

impl NatConfig {
    /// A typical home router: EIM, port preserving, port-restricted filter.
    pub fn easy() -> Self {
        NatConfig {
            mapping: MapKind::Eim,
            alloc: Alloc::Preserving,
            filter: Filter::AddressPortDependent,
            hairpin: false,
            udp_blocked: false,
            tcp_blocked: false,
            timeout: Duration::from_secs(60),
        }
    }

    pub fn hard(alloc: Alloc) -> Self {
        NatConfig {
            mapping: MapKind::Edm,
            alloc,
            ..Self::easy()
        }
    }
}

#[derive(Debug)]
struct MappingState {
    internal: SocketAddr,
    sent_to: HashSet<SocketAddr>,
    last_used: Instant,
}

#[derive(Debug)]
pub struct Nat {
    pub cfg: NatConfig,
    pub public_ip: Ipv4Addr,
    /// Hosts inside share the first three octets of this address.
    pub lan: Ipv4Addr,
    by_key: HashMap<(SocketAddr, Option<SocketAddr>), u16>,
    by_port: BTreeMap<u16, MappingState>,
    next_port: u16,
    pub lan_latency: Duration,
}

impl Nat {
    /// NAT number `n`'s table, handing out ports from `next_port`.
    fn new(cfg: NatConfig, n: u8, next_port: u16) -> Nat {
        Nat {
            cfg,
            public_ip: Ipv4Addr::new(203, 0, 113, 10 + n),
            lan: Ipv4Addr::new(10, n, 0, 0),
            by_key: HashMap::new(),
            by_port: BTreeMap::new(),
            next_port,
            lan_latency: Duration::from_micros(500),
        }
    }

    fn lan_contains(&self, ip: IpAddr) -> bool {
        match ip {
            IpAddr::V4(v4) => v4.octets()[..3] == self.lan.octets()[..3],
            IpAddr::V6(_) => false,
        }
    }

    fn expire(&mut self, now: Instant) {
        let timeout = self.cfg.timeout;
        let dead: Vec<u16> = self
            .by_port
            .iter()
            .filter(|(_, m)| now >= m.last_used + timeout)
            .map(|(p, _)| *p)
            .collect();
        for p in dead {
            self.by_port.remove(&p);
            self.by_key.retain(|_, v| *v != p);
        }
    }

    /// Translates an outbound packet; returns the public source port.
    fn outbound(
        &mut self,
        now: Instant,
        src: SocketAddr,
        dst: SocketAddr,
        rng: &mut StdRng,
    ) -> u16 {
        self.expire(now);
        let key = match self.cfg.mapping {
            MapKind::Eim => (src, None),
            MapKind::Edm => (src, Some(dst)),
        };
        let port = match self.by_key.get(&key) {
            Some(p) => *p,
            None => {
                let port = self.allocate(src.port(), rng);
                self.by_key.insert(key, port);
                self.by_port.insert(
                    port,
                    MappingState {
                        internal: src,
                        sent_to: HashSet::new(),
                        last_used: now,
                    },
                );
                port
            }
        };
        if let Some(m) = self.by_port.get_mut(&port) {
            m.sent_to.insert(dst);
            m.last_used = now;
        }
        port
    }

    fn allocate(&mut self, wanted: u16, rng: &mut StdRng) -> u16 {
        let free =
            |p: u16, by_port: &BTreeMap<u16, MappingState>| p >= 1024 && !by_port.contains_key(&p);
        match self.cfg.alloc {
            Alloc::Preserving if free(wanted, &self.by_port) => wanted,
            Alloc::Preserving | Alloc::Random => loop {
                let p = rng.gen_range(1024..=u16::MAX);
                if free(p, &self.by_port) {
                    break p;
                }
            },
            Alloc::Sequential(step) => loop {
                self.next_port = self.next_port.wrapping_add(step).max(1024);
                if free(self.next_port, &self.by_port) {
                    break self.next_port;
                }
            },
        }
    }

    /// Moves a sequential NAT's counter as `flows` mappings the agents do
    /// not know of would (another program, a mapping that expired and was
    /// opened again).
    pub fn burn(&mut self, flows: u16) {
        if let Alloc::Sequential(step) = self.cfg.alloc {
            self.next_port = self.next_port.wrapping_add(step.wrapping_mul(flows));
        }
    }

    /// Filters an inbound packet to `port` from `from`; returns the inside
    /// address it goes to.
    fn inbound(&mut self, now: Instant, from: SocketAddr, port: u16) -> Option<SocketAddr> {
        self.expire(now);
        let m = self.by_port.get(&port)?;
        let ok = match self.cfg.filter {
            Filter::EndpointIndependent => true,
            Filter::AddressDependent => m.sent_to.iter().any(|d| d.ip() == from.ip()),
            Filter::AddressPortDependent => m.sent_to.contains(&from),
        };
        ok.then_some(m.internal)
    }
}

#[derive(Debug)]
pub struct Host {
    pub ip: Ipv4Addr,
    pub nat: Option<usize>,
    /// One-way delay from this host to the Internet core.
    pub latency: Duration,
    /// Extra random delay per packet, uniform in `0..jitter`.
    pub jitter: Duration,
    /// A second public address, with its own extra delay.
    pub alias: Option<(Ipv4Addr, Duration)>,
    /// When set, every UDP packet from or to this host is lost.
    pub udp_down: bool,
    pub relay_latency: Duration,
    /// Which local IP last heard from a remote: replies go out from it (the
    /// driver answers with IP_PKTINFO).
    last_local_ip: HashMap<SocketAddr, Ipv4Addr>,
}

/// Something the network hands to a host.
#[derive(Debug, Clone)]
pub enum Delivery {
    Udp {
        host: usize,
        to_port: u16,
        from: SocketAddr,
        bytes: Vec<u8>,
    },
    /// Bytes on node `node`'s relay connection: `up` to the relay server,
    /// else down to the node.
    RelayWire { node: usize, up: bool, bytes: Bytes },
    /// A frame on a direct TCP stream, for node `node`, from the far end
    /// as that node's stream sees it.
    TcpFrame {
        node: usize,
        from: SocketAddr,
        bytes: Vec<u8>,
    },
}

/// A UDP packet seen on the wire, for taps and tests.
#[derive(Debug, Clone)]
pub struct Seen {
    pub from: SocketAddr,
    pub to: SocketAddr,
    pub bytes: Vec<u8>,
}

pub struct World {
    pub now: Instant,
    pub rng: StdRng,
    pub nats: Vec<Nat>,
    pub hosts: Vec<Host>,
    pub loss: f64,
    queue: BinaryHeap<Reverse<(Instant, u64)>>,
    pending: HashMap<u64, Delivery>,
    seq: u64,
    /// Every UDP packet delivered to a host, in order.
    pub tap: Vec<Seen>,
    pub udp_sent: u64,
    pub udp_bytes: u64,
    /// Addresses where a STUN server answers Binding requests with the
    /// source it saw (after every NAT on the way).
    pub stun_servers: Vec<SocketAddr>,
    /// Each NAT's TCP half: the same behaviour with a mapping table of its
    /// own, as a kernel NAT keeps per protocol.
    tcp_nats: Vec<Nat>,
}

impl World {
    pub fn new(seed: u64, now: Instant) -> Self {
        World {
            now,
            rng: StdRng::seed_from_u64(seed),
            nats: Vec::new(),
            hosts: Vec::new(),
            loss: 0.0,
            queue: BinaryHeap::new(),
            pending: HashMap::new(),
            seq: 0,
            tap: Vec::new(),
            udp_sent: 0,
            udp_bytes: 0,
            stun_servers: Vec::new(),
            tcp_nats: Vec::new(),
        }
    }

    pub fn add_nat(&mut self, cfg: NatConfig) -> usize {
        let n = self.nats.len() as u8;
        let start = 20000 + u16::from(n) * 1000;
        self.tcp_nats.push(Nat::new(cfg, n, start + 500));
        self.nats.push(Nat::new(cfg, n, start));
        self.nats.len() - 1
    }

    pub fn add_host(&mut self, nat: Option<usize>, latency: Duration) -> usize {
        let h = self.hosts.len() as u8;
        let ip = match nat {
            Some(n) => {
                let o = self.nats[n].lan.octets();
                Ipv4Addr::new(o[0], o[1], o[2], 2 + h)
            }
            None => Ipv4Addr::new(198, 51, 100, 2 + h),
        };
        self.hosts.push(Host {
            ip,
            nat,
            latency,
            jitter: Duration::ZERO,
            alias: None,
            udp_down: false,
            relay_latency: Duration::from_millis(30),
            last_local_ip: HashMap::new(),
        });
        self.hosts.len() - 1
    }

    fn push(&mut self, at: Instant, d: Delivery) {
        self.seq += 1;
        self.queue.push(Reverse((at, self.seq)));
        self.pending.insert(self.seq, d);
    }

    pub fn next_delivery(&self) -> Option<Instant> {
        self.queue.peek().map(|Reverse((t, _))| *t)
    }

    /// The next delivery due at or before `now`.
    pub fn pop_due(&mut self) -> Option<Delivery> {
        let Reverse((t, seq)) = *self.queue.peek()?;
        if t > self.now {
            return None;
        }
        self.queue.pop();
        self.pending.remove(&seq)
    }

    fn delay(&mut self, base: Duration, jitter: Duration) -> Duration {
        if jitter.is_zero() {
            return base;
        }
        base + jitter.mul_f64(self.rng.gen::<f64>())
    }

    /// Bytes on node `node`'s relay connection (on `host`): reliable and in
    /// order, no NAT, no UDP needed; the host's relay latency each way.
    pub fn relay_wire(&mut self, host: usize, node: usize, up: bool, bytes: Bytes) {
        let d = self.hosts[host].relay_latency;
        self.push(self.now + d, Delivery::RelayWire { node, up, bytes });
    }

    /// Sends a UDP datagram from `host`'s `port` to `dst`.
    pub fn send(&mut self, host: usize, port: u16, dst: SocketAddr, bytes: Vec<u8>) {
        self.udp_sent += 1;
        self.udp_bytes += bytes.len() as u64 + 28;
        let now = self.now;
        let h = &self.hosts[host];
        if h.udp_down || (self.loss > 0.0 && self.rng.gen::<f64>() < self.loss) {
            return;
        }
        let src_ip = h.last_local_ip.get(&dst).copied().unwrap_or(h.ip);
        let src = SocketAddr::new(IpAddr::V4(src_ip), port);
        let (lat, jit) = (h.latency, h.jitter);
        let mut out_src = src;
        if let Some(n) = h.nat {
            let nat = &self.nats[n];
            if nat.lan_contains(dst.ip()) {
                let d = nat.lan_latency;
                return self.deliver_local(dst, src, bytes, d);
            }
            if nat.cfg.udp_blocked {
                return;
            }
            let public_ip = nat.public_ip;
            let port = self.nats[n].outbound(now, src, dst, &mut self.rng);
            out_src = SocketAddr::new(IpAddr::V4(public_ip), port);
            if dst.ip() == IpAddr::V4(public_ip) {
                // Hairpin: back in through the same NAT, never leaving it.
                if !self.nats[n].cfg.hairpin {
                    return;
                }
                let Some(inside) = self.nats[n].inbound(now, out_src, dst.port()) else {
                    return;
                };
                let d = self.nats[n].lan_latency * 2;
                return self.deliver_local(inside, out_src, bytes, d);
            }
        }
        let delay = self.delay(lat, jit);
        self.deliver_internet(out_src, dst, bytes, delay);
    }

    /// Delivery inside one NAT's LAN (direct or hairpinned).
    fn deliver_local(&mut self, dst: SocketAddr, from: SocketAddr, bytes: Vec<u8>, d: Duration) {
        let Some(to) = self.hosts.iter().position(|h| IpAddr::V4(h.ip) == dst.ip()) else {
            return;
        };
        if self.hosts[to].udp_down {
            return;
        }
        let at = self.now + d;
        self.tap.push(Seen {
            from,
            to: dst,
            bytes: bytes.clone(),
        });
        self.push(
            at,
            Delivery::Udp {
                host: to,
                to_port: dst.port(),
                from,
                bytes,
            },
        );
    }

    fn deliver_internet(
        &mut self,
        from: SocketAddr,
        dst: SocketAddr,
        bytes: Vec<u8>,
        mut delay: Duration,
    ) {
        let now = self.now;
        if self.stun_servers.contains(&dst) {
            // The answer goes back to the mapping the request came from,
            // through the same NAT filtering as any other datagram.
            if let Ok(m) = stun::Message::decode(&bytes) {
                if m.class == stun::Class::Request {
                    let answer = stun::binding_response(m.transaction_id, from, None);
                    self.deliver_internet(dst, from, answer, delay);
                }
            }
            return;
        }
        // A public host, by its main address or alias.
        let target = self.hosts.iter().position(|h| {
            h.nat.is_none()
                && (IpAddr::V4(h.ip) == dst.ip()
                    || h.alias.is_some_and(|(a, _)| IpAddr::V4(a) == dst.ip()))
        });
        let (host, to_port) = if let Some(t) = target {
            (t, dst.port())
        } else if let Some(n) = self
            .nats
            .iter()
            .position(|n| IpAddr::V4(n.public_ip) == dst.ip())
        {
            if self.nats[n].cfg.udp_blocked {
                return;
            }
            let Some(inside) = self.nats[n].inbound(now, from, dst.port()) else {
                return;
            };
            let Some(h) = self
                .hosts
                .iter()
                .position(|h| IpAddr::V4(h.ip) == inside.ip())
            else {
                return;
            };
            (h, inside.port())
        } else {
            return;
        };
        let h = &self.hosts[host];
        if h.udp_down {
            return;
        }
        let (lat, jit) = (h.latency, h.jitter);
        if let Some((alias, extra)) = h.alias {
            if IpAddr::V4(alias) == dst.ip() {
                delay += extra;
            }
        }
        if let IpAddr::V4(local) = dst.ip() {
            if h.nat.is_none() {
                self.hosts[host].last_local_ip.insert(from, local);
            }
        }
        delay += self.delay(lat, jit);
        self.tap.push(Seen {
            from,
            to: dst,
            bytes: bytes.clone(),
        });
        self.push(
            now + delay,
            Delivery::Udp {
                host,
                to_port,
                from,
                bytes,
            },
        );
    }

    /// Where a TCP connection from `host`'s `port` to `dst` appears to come
    /// from once it crosses the host's NAT (the mapping is made, as a SYN
    /// makes it); `None` where TCP cannot leave.
    pub fn tcp_out(&mut self, host: usize, port: u16, dst: SocketAddr) -> Option<SocketAddr> {
        let now = self.now;
        let h = &self.hosts[host];
        let src = SocketAddr::new(IpAddr::V4(h.ip), port);
        let Some(n) = h.nat else { return Some(src) };
        let nat = &self.tcp_nats[n];
        if nat.lan_contains(dst.ip()) {
            return Some(src);
        }
        if nat.cfg.tcp_blocked && dst.port() != 443 {
            return None;
        }
        let public = nat.public_ip;
        let p = self.tcp_nats[n].outbound(now, src, dst, &mut self.rng);
        Some(SocketAddr::new(IpAddr::V4(public), p))
    }

    /// A SYN from `host`'s `port` to `dst`: the host it reaches and the
    /// address that host sees it come from, when the NATs on the way let
    /// it through. Simultaneous open: a SYN into a NAT passes where the
    /// host behind it has already sent one back out to that source.
    pub fn tcp_syn(
        &mut self,
        host: usize,
        port: u16,
        dst: SocketAddr,
    ) -> Option<(usize, SocketAddr)> {
        let now = self.now;
        let seen_from = self.tcp_out(host, port, dst)?;
        let public_host = self
            .hosts
            .iter()
            .any(|h| h.nat.is_none() && IpAddr::V4(h.ip) == dst.ip());
        let same_lan = self.hosts[host]
            .nat
            .is_some_and(|n| self.tcp_nats[n].lan_contains(dst.ip()));
        let inside = if public_host || same_lan {
            dst
        } else {
            let n = self
                .tcp_nats
                .iter()
                .position(|n| IpAddr::V4(n.public_ip) == dst.ip())?;
            if self.tcp_nats[n].cfg.tcp_blocked {
                return None;
            }
            self.tcp_nats[n].inbound(now, seen_from, dst.port())?
        };
        let target = self
            .hosts
            .iter()
            .position(|h| IpAddr::V4(h.ip) == inside.ip())?;
        Some((target, seen_from))
    }

    /// A frame on a TCP stream from `from_host` to node `node` on
    /// `to_host`: reliable, in order, both hosts' latency.
    pub fn tcp_frame(
        &mut self,
        (from_host, to_host): (usize, usize),
        node: usize,
        from: SocketAddr,
        bytes: Vec<u8>,
    ) {
        let d = self.hosts[from_host].latency + self.hosts[to_host].latency;
        self.push(self.now + d, Delivery::TcpFrame { node, from, bytes });
    }

    /// Puts an arbitrary datagram on the wire (an attacker, a replay).
    pub fn inject(&mut self, from: SocketAddr, dst: SocketAddr, bytes: Vec<u8>) {
        self.deliver_internet(from, dst, bytes, Duration::from_millis(1));
    }
}
