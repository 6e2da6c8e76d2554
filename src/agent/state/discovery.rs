//! Endpoint discovery on the agent's own WireGuard socket, decided without
//! IO (see docs/architecture.md, "Endpoint discovery").
//!
//! The mapped address that matters is the one the NAT gives the socket the
//! tunnels use, so netcheck runs on that socket rather than on one of its
//! own (which is what `warren netcheck` without a daemon would see). This
//! holds the sans-IO [`Netcheck`] run: the agent state hands it STUN
//! datagrams from the shared socket and sends its probes out as
//! `Output::Stun`. A run is started when the node joins, when the local
//! addresses change, and every [`RESTUN_INTERVAL`] — re-STUNning keeps the
//! NAT mapping alive and notices a mapping that moved.
//!
//! UDP that is blocked answers nothing, so a run says so only at its
//! deadline. The STUN query over TCP that runs beside it (for the direct
//! TCP path) shortens that: once it has answered and UDP has stayed silent
//! for a short wait, the run reports UDP as *probably* blocked
//! ([`Discovery::udp_blocked`]), and the TCP path can start seconds
//! earlier. A late UDP answer, or the report, overrules it.
//!
//! Out of a finished run come the candidates (host, port-mapped,
//! server-reflexive per family; the host addresses and the port mapping
//! are what the driver last gave), the NAT summary peers need for hard-NAT
//! strategies, and each relay region's latency, which picks the home relay.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::control::types::{Endpoint, EndpointKind, RelayMap};
use crate::netcheck::{self, Netcheck, Report};
use crate::traversal::NatSummary;

/// How often netcheck runs while nothing changes.
pub const RESTUN_INTERVAL: Duration = Duration::from_secs(60);
/// A run's own deadline: shorter than the standalone default, since it
/// repeats.
const RUN_DEADLINE: Duration = Duration::from_secs(3);

#[derive(Debug, Default)]
pub struct Discovery {
    running: Option<Netcheck>,
    pub last: Option<Report>,
    /// The UDP verdict traversal was last given (see [`Self::udp_blocked`]).
    told_blocked: bool,
}

/// This host's source address towards the first STUN server of each
/// family (with the listen port).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Sources {
    pub v4: Option<SocketAddr>,
    pub v6: Option<SocketAddr>,
}

/// The first STUN server of each family in `relays`: where `Sources` are
/// measured towards.
pub fn first_servers(relays: &RelayMap) -> (Option<SocketAddr>, Option<SocketAddr>) {
    let all = || relays.regions.iter().flat_map(|r| r.stun.iter());
    (
        all().find(|a| a.is_ipv4()).copied(),
        all().find(|a| a.is_ipv6()).copied(),
    )
}

/// Where this host sends from: what the driver reads from the kernel.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostView {
    /// The host's own addresses on the listen port (`host` candidates).
    pub endpoints: Vec<Endpoint>,
    /// The port mapping's public address, if one is held.
    pub portmapped: Option<Endpoint>,
}

impl Discovery {
    /// Forgets every run and its results (the node left the network).
    pub fn stop(&mut self) {
        self.running = None;
        self.last = None;
    }

    pub fn is_running(&self) -> bool {
        self.running.is_some()
    }

    /// Starts a run against every relay region's STUN addresses (a run in
    /// progress is replaced: the network changed under it). `local`: this
    /// host's source address towards the first server of each family, as
    /// the kernel picks it (`Output::Netcheck` asks the driver for it).
    pub fn start(&mut self, now: Instant, relays: &RelayMap, local: Sources, seed: u64) -> bool {
        let servers: Vec<netcheck::Server> = relays
            .regions
            .iter()
            .filter(|r| !r.stun.is_empty())
            .map(|r| netcheck::Server {
                name: r.id.to_string(),
                addrs: r.stun.clone(),
            })
            .collect();
        if servers.is_empty() {
            self.running = None;
            return false;
        }
        let config = netcheck::Config {
            servers,
            local_v4: local.v4,
            local_v6: local.v6,
            deadline: RUN_DEADLINE,
            seed,
            ..netcheck::Config::default()
        };
        self.running = Some(Netcheck::new(now, config));
        true
    }

    /// The next datagram to send, if any.
    pub fn poll_transmit(&mut self, now: Instant) -> Option<(SocketAddr, Vec<u8>)> {
        self.running.as_mut()?.poll_transmit(now)
    }

    /// The running netcheck's next deadline.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.running.as_ref()?.poll_timeout()
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        if let Some(nc) = self.running.as_mut() {
            nc.handle_timeout(now);
        }
    }

    /// Feeds a STUN datagram from the shared socket. Not ours (a late
    /// answer, a stray) is counted inside netcheck and ignored.
    pub fn handle_stun(&mut self, now: Instant, from: SocketAddr, bytes: &[u8]) {
        if let Some(nc) = self.running.as_mut() {
            let _ = nc.handle_stun(now, from, bytes);
        }
    }

    /// A STUN server answered our query over TCP after `rtt`, seeing our
    /// TCP port as `public`.
    pub fn handle_tcp_answer(&mut self, rtt: Duration, public: SocketAddr) {
        if let Some(nc) = self.running.as_mut() {
            nc.handle_tcp_answer(rtt, public);
        }
    }

    /// [`Self::udp_blocked`], for handing to traversal: remembered as told,
    /// so [`Self::udp_blocked_changed`] can say when it moves.
    pub fn tell_udp_blocked(&mut self) -> bool {
        self.told_blocked = self.udp_blocked();
        self.told_blocked
    }

    /// Whether the verdict moved since traversal was last told it.
    pub fn udp_blocked_changed(&self) -> bool {
        self.udp_blocked() != self.told_blocked
    }

    /// Whether UDP is blocked: the running netcheck already suspects it
    /// (TCP answered, UDP is silent), or the last report says so.
    pub fn udp_blocked(&self) -> bool {
        self.running
            .as_ref()
            .is_some_and(Netcheck::udp_probably_blocked)
            || self.last.as_ref().is_some_and(|r| !r.udp)
    }

    /// A finished run's report, once; the run is then over.
    pub fn poll_report(&mut self) -> Option<Report> {
        let report = self.running.as_ref()?.poll_report()?;
        self.running = None;
        self.last = Some(report.clone());
        Some(report)
    }

    /// Every candidate: host addresses, the port mapping, and what STUN saw
    /// (for an endpoint-dependent NAT the mapped address is still worth
    /// publishing: a peer behind an easy NAT can reach it after our ping).
    pub fn candidates(&self, host: &HostView) -> Vec<Endpoint> {
        let mut out = host.endpoints.clone();
        out.extend(host.portmapped);
        if let Some(r) = &self.last {
            for fam in [&r.ipv4, &r.ipv6] {
                if let Some(addr) = fam.global {
                    out.push(Endpoint {
                        addr,
                        kind: EndpointKind::Srflx,
                    });
                }
            }
        }
        // One entry per address, keeping the best kind (host before srflx:
        // a public host address is both).
        out.sort_by_key(|e| (e.addr, e.kind));
        out.dedup_by_key(|e| e.addr);
        out.sort_by_key(|e| (e.kind, e.addr));
        out
    }

    /// The NAT summary for IPv4, where NATs live. Built from the whole
    /// report: port prediction counts from the *last* port the NAT handed
    /// out (the last probe), not from the first server's mapping that the
    /// family report calls `global`: with two STUN ports that was one port
    /// behind, and every prediction missed.
    pub fn nat(&self) -> NatSummary {
        self.last.as_ref().map(NatSummary::from).unwrap_or_default()
    }

    /// Each region's latency from the last run, lowest first.
    pub fn region_latency(&self) -> Vec<(u16, Duration)> {
        let Some(r) = &self.last else {
            return Vec::new();
        };
        let mut out: Vec<(u16, Duration)> = r
            .servers
            .iter()
            .filter_map(|s| Some((s.name.parse().ok()?, s.latency?)))
            .collect();
        out.sort_by_key(|(_, l)| *l);
        out
    }
}
