//! The driver's half of the agent state's outputs: every [`Output`] turned
//! into the IO it names (docs/architecture.md, "The agent state").
//!
//! This is the only place the mesh task acts on the state's decisions.
//! Each arm does one thing with a socket, the data plane, a relay or TCP
//! command, the coordinator client or a waiting API request, and feeds any
//! answer the state asked for straight back (`start_netcheck`,
//! `sockets_opened`, `handle_traffic`, `handle_host`).

use std::net::{IpAddr, SocketAddr};
use std::time::Instant;

use ipnet::IpNet;

use super::handle::MeshReply;
use super::login::{self, Login};
use super::session::Background;
use super::Mesh;
use crate::agent::state::discovery::Sources;
use crate::agent::state::{Output, RelayCmd};
use crate::api::{ApiError, ErrorCode};
use crate::control::types::EndpointsReport;
use crate::netcheck::Report;
use crate::portmap::PortMapper;
use crate::traversal::node::Dest;

impl Mesh {
    /// Carries out everything the state has asked for.
    pub(super) async fn drain(&mut self) {
        // One clock read per drain, not per output (a birthday spray is
        // hundreds of datagrams).
        let now = Instant::now();
        while let Some(out) = self.state.poll_output() {
            self.carry_out(now, out).await;
        }
        self.sync_host_dns();
    }

    /// The host's DNS points at the resolver while this node follows a
    /// network with `--accept-dns` (the default), and only then.
    pub(super) fn sync_host_dns(&self) {
        if let Some(d) = &self.dns {
            let wanted = self
                .session
                .as_ref()
                .is_some_and(|s| s.is_active() && !s.login.stopped && s.login.accept_dns);
            d.set_host(wanted);
        }
    }

    async fn carry_out(&mut self, now: Instant, out: Output) {
        match out {
            Output::Disco(t) => {
                tracing::trace!(dest = ?t.dest, len = t.bytes.len(), "disco out");
                match t.dest {
                    Dest::Udp { socket, addr } => self.egress.send_on(socket, addr, &t.bytes).await,
                    Dest::Relay(k) => self.egress.via_relay(k, &t.bytes),
                    Dest::Tcp(addr) => {
                        self.tcp.send(addr, &t.bytes);
                    }
                }
            }
            Output::Stun { to, bytes } => {
                let _ = self.egress.udp.send(to, &bytes, None).await;
            }
            Output::Netcheck { v4, v6 } => {
                let port = self.listen.port();
                let local = |dest: Option<SocketAddr>| {
                    let ip = crate::portmap::gateway::local_ip_towards(dest?.ip()).ok()?;
                    Some(SocketAddr::new(ip, port))
                };
                let sources = Sources {
                    v4: local(v4),
                    v6: local(v6),
                };
                let endpoints = login::host_endpoints(port);
                self.state.start_netcheck(now, sources, endpoints);
            }
            Output::TcpStun(server) => self.tcp.query_stun(server),
            Output::NetcheckDone(report) => self.answer_netcheck(report),
            Output::AddPeer { spec, path } => {
                let key = spec.key;
                self.dp.upsert_peer(now, spec);
                // A replaced data-plane peer starts on the relay; keep it
                // in step with what traversal already knows.
                self.apply_path(&key, path);
            }
            Output::RemovePeer(k) => {
                self.dp.remove_peer(&k);
                self.egress.set_stream(k, None);
            }
            Output::Path { peer, path, .. } => self.apply_path(&peer, path),
            Output::Filter(filter) => {
                // Without a policy the config file's filter, if any, is in
                // force.
                self.dp.firewall.set_policy(filter.map(|f| *f));
            }
            Output::Addresses { v4, v6 } => {
                let addresses = [IpAddr::V4(v4), IpAddr::V6(v6)];
                self.own.0 = addresses.iter().map(|a| IpNet::from(*a)).collect();
                self.set_own();
                // The whole overlay range is routed to the device: /10 and
                // /48.
                for res in [
                    self.tun.add_address_v4(v4, 10),
                    self.tun.add_address_v6(v6, 48),
                ] {
                    if let Err(e) = res {
                        // EEXIST on re-join is expected.
                        tracing::debug!(error = %e, "adding overlay address");
                    }
                }
                self.host_routes.set_sources(v4, v6);
            }
            Output::Routes {
                routes,
                lan,
                exit_blocked,
            } => {
                let mut prefixes: Vec<IpNet> = routes.iter().map(|(n, _)| *n).collect();
                if exit_blocked {
                    // Into the tunnel, where no peer takes them: dropped.
                    prefixes.extend(crate::control::advertise::exit_routes());
                }
                self.dp.set_subnet_routes(routes);
                self.host_routes.apply(&prefixes, &lan);
            }
            Output::Serving(served) => {
                self.own.1 = served;
                self.serve();
                self.set_own();
            }
            Output::Dns(view) => {
                if let Some(d) = &self.dns {
                    d.set_view(&view);
                    // The resolver's IPv6 address, in the network's /48.
                    if let Some(v6) = view.ula.map(|u| d.address_v6(u)) {
                        if !d.listens_on(v6.into()) {
                            let index = self.tun.if_index().unwrap_or(0);
                            if let Err(e) = super::rules::add_deprecated_v6(index, v6) {
                                tracing::warn!(error = %e, "adding the resolver's IPv6 address");
                            }
                            d.listen_v6(v6);
                        }
                    }
                }
            }
            Output::PinPrefix(net) => {
                if let Some(s) = self.session.as_mut() {
                    s.login.ula = Some(net);
                    if let Err(e) = s.login.save(&self.state_dir) {
                        tracing::warn!(error = %e, "cannot save the network's prefix");
                    }
                }
            }
            Output::Relay(cmd) => match cmd {
                RelayCmd::Map(map) => self.relays.set_map(map),
                RelayCmd::Home { id, .. } => self.relays.set_home(id),
                RelayCmd::PeerRegion { peer, region } => self.relays.set_peer_region(peer, region),
                RelayCmd::RemovePeer(k) => self.relays.remove_peer(&k),
                RelayCmd::Clear => self.relays.clear(),
            },
            Output::OpenSockets { count } => {
                let t = Instant::now();
                let open = self.sockets.open(count);
                tracing::info!(count, open, took = ?t.elapsed(), "birthday: extra sockets opened");
                self.state.sockets_opened(now, open);
            }
            Output::CloseSockets { keep } => {
                self.sockets.close(&keep);
                tracing::info!(
                    ?keep,
                    still_open = self.sockets.open_count(),
                    "birthday: extra sockets closed"
                );
            }
            Output::TcpDial {
                peer,
                targets,
                until,
            } => self.tcp.dial(peer, targets, until),
            Output::TcpClose(addr) => self.tcp.close(addr),
            Output::TcpClear => self.tcp.clear(),
            Output::Report { report, netcheck } => self.send_report(report, netcheck),
            Output::PingDone { id, round } => {
                if let Some(reply) = self.ping_waiters.remove(&id) {
                    let _ = reply.send(Ok(MeshReply::Ping(round)));
                }
            }
            Output::Housekeep { addresses } => {
                let peers = self.dp.peers();
                self.state.handle_traffic(now, peers.iter().map(|p| &**p));
                self.state
                    .set_portmapped(self.portmapper.as_ref().and_then(|p| p.candidate()));
                self.relays.close_idle(now);
                if addresses {
                    let endpoints = login::host_endpoints(self.listen.port());
                    self.state.handle_host(now, endpoints);
                    let nets = self.host_routes.local_networks();
                    self.state.handle_local_networks(now, nets);
                }
                self.publish_view(now);
            }
            Output::StartPortmap => {
                if let (None, Some(cfg)) = (&self.portmapper, self.portmap.clone()) {
                    self.portmapper = Some(PortMapper::start(self.listen.port(), cfg));
                }
            }
            Output::StopPortmap => {
                // In the background: the gateway may be slow, leaving must
                // not be.
                if let Some(pm) = self.portmapper.take() {
                    tokio::spawn(pm.shutdown());
                }
            }
            Output::Revoked(reason) => {
                tracing::info!(%reason, "forgetting the login");
                self.session = None;
                Login::remove(&self.state_dir);
            }
        }
    }

    /// Forwards (and source-NATs, as the login says) what this node serves.
    pub(super) fn serve(&mut self) {
        let (ula, snat) = self
            .session
            .as_ref()
            .map_or((None, true), |s| (s.login.ula, s.login.snat_subnet_routes));
        self.host_routes.serve(&self.own.1, ula, snat);
    }

    /// Peers may send to this node's addresses and the subnets it serves
    /// only (README, "Access policy").
    fn set_own(&self) {
        let (addrs, served) = &self.own;
        self.dp
            .firewall
            .set_local(addrs.iter().chain(served).copied().collect());
    }

    /// Answers every `warren netcheck` request waiting on the run.
    fn answer_netcheck(&mut self, report: Option<Box<Report>>) {
        let waiters = std::mem::take(&mut self.netcheck_waiters);
        for w in waiters {
            let answer = match &report {
                Some(r) => Ok(MeshReply::Netcheck(r.clone())),
                None => Err(ApiError::new(
                    ErrorCode::NotJoined,
                    "no STUN server known: the coordinator's relay map lists none",
                )),
            };
            let _ = w.send(answer);
        }
    }

    /// Sends an endpoints report in the background; the state hears how it
    /// went (`handle_reported`).
    fn send_report(&mut self, mut report: EndpointsReport, netcheck: Option<Box<Report>>) {
        let Some(s) = self.session.as_ref() else {
            return;
        };
        // The wire carries netcheck's report as JSON (control::types).
        report.netcheck = netcheck.and_then(|r| serde_json::to_value(&*r).ok());
        let client = s.client.clone();
        self.background.spawn(async move {
            let result = client.report_endpoints(&report).await;
            Background::Reported { report, result }
        });
    }
}
