//! Endpoint discovery on the agent's own WireGuard socket (see
//! docs/architecture.md, "Endpoint discovery").
//!
//! The mapped address that matters is the one the NAT gives the socket the
//! tunnels use, so netcheck runs here on that socket rather than on one of
//! its own (which is what `warren netcheck` without a daemon would see).
//! The sans-IO [`Netcheck`] is driven from the mesh loop: its transmits go
//! out through the shared UDP socket, STUN datagrams come back through the
//! inbound side channel. A run is started when the node joins, when the
//! local addresses change, and every [`RESTUN_INTERVAL`] — re-STUNning keeps
//! the NAT mapping alive and notices a mapping that moved.
//!
//! A port mapping (UPnP / NAT-PMP / PCP) for the listen port is kept by a
//! [`PortMapper`] task beside it; its public address is a `portmapped`
//! candidate.
//!
//! UDP that is blocked answers nothing, so a run says so only at its
//! deadline. The STUN query over TCP that runs beside it (for the direct
//! TCP path) shortens that: once it has answered and UDP has stayed silent
//! for a short wait, the run reports UDP as *probably* blocked
//! ([`Discovery::udp_blocked`]), and the TCP path can start seconds
//! earlier. A late UDP answer, or the report, overrules it.
//!
//! Out of a finished run come the candidates (host, port-mapped,
//! server-reflexive per family), the NAT summary peers need for hard-NAT
//! strategies, and each relay region's latency, which picks the home relay.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::control::types::{Endpoint, EndpointKind, RelayMap};
use crate::netcheck::{self, Netcheck, Report};
use crate::portmap::{self, PortMapper, PortMapperHandle};
use crate::traversal::NatSummary;

/// How often netcheck runs while nothing changes.
pub const RESTUN_INTERVAL: Duration = Duration::from_secs(60);
/// A run's own deadline: shorter than the standalone default, since it
/// repeats.
const RUN_DEADLINE: Duration = Duration::from_secs(3);

pub struct Discovery {
    listen_port: u16,
    running: Option<Netcheck>,
    pub last: Option<Report>,
    /// When the next periodic run is due.
    next_run: Option<Instant>,
    portmapper: Option<PortMapperHandle>,
    /// The UDP verdict traversal was last given (see [`Self::udp_blocked`]).
    told_blocked: bool,
}

impl Discovery {
    pub fn new(listen_port: u16) -> Self {
        Discovery {
            listen_port,
            running: None,
            last: None,
            next_run: None,
            portmapper: None,
            told_blocked: false,
        }
    }

    /// Starts the port mapper (once; it renews by itself).
    pub fn start_portmap(&mut self, config: portmap::Config) {
        if self.portmapper.is_none() {
            self.portmapper = Some(PortMapper::start(self.listen_port, config));
        }
    }

    /// Stops discovery and gives back the port mapping (in the
    /// background: the gateway may be slow, leaving must not be).
    pub fn stop(&mut self) {
        self.running = None;
        self.next_run = None;
        self.last = None;
        if let Some(pm) = self.portmapper.take() {
            tokio::spawn(pm.shutdown());
        }
    }

    /// Deletes the port mapping and waits for the gateway's answer
    /// (bounded by the mapper's request timeout). For a daemon on its way
    /// out: [`Self::stop`]'s background task would die with the runtime,
    /// before a UPnP delete (TCP + HTTP) even reaches the gateway.
    pub async fn release_portmap(&mut self) {
        if let Some(pm) = self.portmapper.take() {
            pm.shutdown().await;
        }
    }

    pub fn is_running(&self) -> bool {
        self.running.is_some()
    }

    /// Starts a run against every relay region's STUN addresses (a run in
    /// progress is replaced: the network changed under it).
    pub fn start(&mut self, now: Instant, relays: &RelayMap) -> bool {
        let servers: Vec<netcheck::Server> = relays
            .regions
            .iter()
            .filter(|r| !r.stun.is_empty())
            .map(|r| netcheck::Server {
                name: r.id.to_string(),
                addrs: r.stun.clone(),
            })
            .collect();
        self.next_run = Some(now + RESTUN_INTERVAL);
        if servers.is_empty() {
            self.running = None;
            return false;
        }
        let first_v4 = servers
            .iter()
            .flat_map(|s| s.addrs.iter())
            .find(|a| a.is_ipv4())
            .copied();
        let first_v6 = servers
            .iter()
            .flat_map(|s| s.addrs.iter())
            .find(|a| a.is_ipv6())
            .copied();
        let local = |dest: Option<SocketAddr>| {
            let ip = portmap::gateway::local_ip_towards(dest?.ip()).ok()?;
            Some(SocketAddr::new(ip, self.listen_port))
        };
        let config = netcheck::Config {
            servers,
            local_v4: local(first_v4),
            local_v6: local(first_v6),
            deadline: RUN_DEADLINE,
            seed: rand::random(),
            ..netcheck::Config::default()
        };
        self.running = Some(Netcheck::new(now, config));
        true
    }

    /// The next datagram to send, if any.
    pub fn poll_transmit(&mut self, now: Instant) -> Option<(SocketAddr, Vec<u8>)> {
        self.running.as_mut()?.poll_transmit(now)
    }

    pub fn poll_timeout(&self) -> Option<Instant> {
        match &self.running {
            Some(nc) => nc.poll_timeout(),
            None => self.next_run,
        }
    }

    /// Whether a periodic run is due (the caller then calls `start`).
    pub fn due(&self, now: Instant) -> bool {
        self.running.is_none() && self.next_run.is_some_and(|t| t <= now)
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

    /// The port-mapped candidate, if a mapping is held.
    pub fn portmapped(&self) -> Option<Endpoint> {
        self.portmapper.as_ref()?.candidate()
    }

    /// Every candidate: host addresses, the port mapping, and what STUN saw
    /// (for an endpoint-dependent NAT the mapped address is still worth
    /// publishing: a peer behind an easy NAT can reach it after our ping).
    pub fn candidates(&self) -> Vec<Endpoint> {
        let mut out = super::login::host_endpoints(self.listen_port);
        out.extend(self.portmapped());
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
