//! The coordinator side of the mesh: `up`, `down`, `logout`, the map
//! stream's events, and the control requests that run in the background.
//!
//! `up` itself is in [`super::up`]: it registers inline (the CLI waits for
//! the answer, and a refused token must change nothing). A daemon that restarts with a saved
//! login does not wait: it starts the map stream at once — the stream
//! replays the map saved on disk, so tunnels come back even while the
//! coordinator is down — and re-registers in the background to publish the
//! new disco key, retrying with backoff.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::{Duration, Instant};

use ipnet::IpNet;

use super::handle::{Command, MeshReply, Reply};
use super::login::Login;
use super::Mesh;
use crate::api::mesh::{LeaveReply, MeshState, MeshStatus};
use crate::api::{ApiError, ErrorCode};
use crate::control::client::{ControlClient, ControlError, MapEvent, MapStream, Registration};
use crate::control::follow::MapAction;
use crate::control::types::{EndpointsReport, Peer as MapPeer};
use crate::dataplane::PeerSpec;
use crate::keys::NodeKey;
use crate::netcheck::Report;
use crate::proto::disco::DiscoKey;
use crate::traversal::node::PeerInfo;

/// Longest wait on the coordinator for `up` and `logout`.
pub(super) const UP_TIMEOUT: Duration = Duration::from_secs(20);
const RETRY_MIN: Duration = Duration::from_secs(1);
const RETRY_MAX: Duration = Duration::from_secs(60);

pub struct Session {
    pub login: Login,
    pub client: ControlClient,
    pub stream: Option<MapStream>,
    pub name: Option<String>,
    /// The node's overlay addresses.
    pub addresses: Vec<IpAddr>,
    pub state: MeshState,
    pub last_error: Option<String>,
    /// The last report the coordinator accepted, and whether one is in
    /// flight (reports are sent one at a time, the latest state wins).
    pub reported: Option<EndpointsReport>,
    pub reporting: bool,
    /// A map came from the coordinator since the stream (re)started.
    pub map_received: bool,
}

impl Session {
    pub fn is_active(&self) -> bool {
        self.stream.is_some()
    }
}

/// A finished background request.
pub enum Background {
    Registered(Result<Registration, ControlError>),
    Reported {
        report: EndpointsReport,
        result: Result<(), ControlError>,
    },
}

pub async fn next_map(s: &mut Option<Session>) -> Option<MapEvent> {
    match s.as_mut().and_then(|s| s.stream.as_mut()) {
        Some(stream) => stream.recv().await,
        None => std::future::pending().await,
    }
}

pub(super) fn api_err(code: ErrorCode, msg: impl Into<String>) -> ApiError {
    ApiError::new(code, msg)
}

impl Mesh {
    pub(super) fn disco_key(&self) -> NodeKey {
        NodeKey(self.disco.public().0)
    }

    /// At start: follow the network joined last time, unless `down`.
    pub(super) fn resume_saved_login(&mut self) {
        let Some(login) = Login::load(&self.state_dir) else {
            return;
        };
        match login.client(
            self.key.clone(),
            &self.state_dir,
            self.relays.insecure_http(),
        ) {
            Ok(client) => {
                let stopped = login.stopped;
                self.session = Some(Session {
                    login,
                    client,
                    stream: None,
                    name: None,
                    addresses: Vec::new(),
                    state: MeshState::Stopped,
                    last_error: None,
                    reported: None,
                    reporting: false,
                    map_received: false,
                });
                if !stopped {
                    self.start_following(true);
                }
            }
            Err(e) => tracing::warn!(error = %e, "saved login unusable; run `warren up`"),
        }
    }

    /// Opens the map stream and, if `reregister`, re-registers in the
    /// background (new disco key, current host name and version).
    pub(super) fn start_following(&mut self, reregister: bool) {
        let disco = self.disco_key();
        let Some(s) = self.session.as_mut() else {
            return;
        };
        s.stream = Some(s.client.map_stream());
        s.state = MeshState::Reconnecting;
        s.map_received = false;
        // Maps are held to the network's /48 the login pinned.
        self.follow.set_prefix(s.login.ula);
        if reregister {
            let client = s.client.clone();
            let hostname = s.login.hostname.clone();
            let tags = s.login.tags.clone();
            self.background.spawn(async move {
                let mut wait = RETRY_MIN;
                loop {
                    match client
                        .register_tagged(None, &hostname, disco, Some(&tags))
                        .await
                    {
                        Err(e) if !e.is_permanent() => {
                            tracing::info!(error = %e, retry_in = ?wait, "re-registering failed");
                            tokio::time::sleep(wait).await;
                            wait = (wait * 2).min(RETRY_MAX);
                        }
                        res => return Background::Registered(res),
                    }
                }
            });
        }
    }

    pub(super) async fn on_command(&mut self, cmd: Command, reply: Reply) {
        let answer = match cmd {
            Command::Up(args) => self.up(args).await,
            Command::Down => self.down(),
            Command::Logout => self.logout().await,
            Command::Shutdown => {
                self.discovery.release_portmap().await;
                Ok(MeshReply::Done)
            }
            Command::Ping { peer, timeout } => {
                self.start_ping(peer, timeout, reply);
                return;
            }
            Command::Netcheck => {
                if self.relays.map().regions.is_empty() {
                    Err(api_err(
                        ErrorCode::NotJoined,
                        "netcheck needs the STUN servers of a network: run `warren up` first",
                    ))
                } else {
                    if !self.discovery.is_running() {
                        self.start_netcheck(Instant::now());
                    }
                    self.netcheck_waiters.push(reply);
                    return;
                }
            }
        };
        let _ = reply.send(answer);
    }

    pub(super) fn on_registered(&mut self, reg: Registration) {
        tracing::info!(name = %reg.name, ipv4 = %reg.ipv4, ipv6 = %reg.ipv6, "joined the network");
        self.set_addresses(reg.ipv4, reg.ipv6);
        if let Some(s) = self.session.as_mut() {
            s.name = Some(reg.name.clone());
        }
        self.set_relay_map(reg.relay_map);
    }

    fn down(&mut self) -> Result<MeshReply, ApiError> {
        let Some(s) = self.session.as_mut() else {
            return Err(api_err(ErrorCode::NotJoined, "not joined to any network"));
        };
        s.login.stopped = true;
        let _ = s.login.save(&self.state_dir);
        s.stream = None;
        s.state = MeshState::Stopped;
        let left = LeaveReply {
            coordinator: s.login.coordinator.clone(),
            name: s.name.clone(),
            logged_out: false,
        };
        self.drop_peers();
        tracing::info!("left the network (down); `warren up` re-joins");
        Ok(MeshReply::Left(left))
    }

    async fn logout(&mut self) -> Result<MeshReply, ApiError> {
        let Some(s) = self.session.as_ref() else {
            return Err(api_err(ErrorCode::NotJoined, "not joined to any network"));
        };
        tokio::time::timeout(UP_TIMEOUT, s.client.logout())
            .await
            .map_err(|_| api_err(ErrorCode::Coordinator, "the coordinator did not answer"))?
            .map_err(|e| api_err(ErrorCode::Coordinator, e.to_string()))?;
        let map_file = s.client.map_path();
        let left = LeaveReply {
            coordinator: s.login.coordinator.clone(),
            name: s.name.clone(),
            logged_out: true,
        };
        self.leave();
        let _ = std::fs::remove_file(map_file);
        tracing::info!("logged out; joining again takes a token");
        Ok(MeshReply::Left(left))
    }

    /// Forgets the network: peers, relays, the saved login.
    pub(super) fn leave(&mut self) {
        self.session = None;
        Login::remove(&self.state_dir);
        self.drop_peers();
    }

    fn drop_peers(&mut self) {
        let now = Instant::now();
        let managed: Vec<NodeKey> = self
            .dp
            .peers()
            .iter()
            .filter(|p| p.spec.managed)
            .map(|p| p.key)
            .collect();
        for k in managed {
            self.dp.remove_peer(&k);
            self.node.remove_peer(now, &k);
        }
        self.follow.clear();
        while self.follow.poll_action().is_some() {}
        self.direct_since.clear();
        self.relays.clear();
        self.tcp.clear();
        self.discovery.stop();
    }

    /// One event of the map stream: the follower (`control::follow`)
    /// decides what it means; this carries its actions out.
    pub(super) fn on_map(&mut self, ev: Option<MapEvent>) {
        let now = Instant::now();
        self.follow.handle_map(ev);
        while let Some(action) = self.follow.poll_action() {
            self.act(now, action);
        }
    }

    fn act(&mut self, now: Instant, action: MapAction) {
        match action {
            MapAction::PinPrefix(net) => {
                if let Some(s) = self.session.as_mut() {
                    s.login.ula = Some(net);
                    if let Err(e) = s.login.save(&self.state_dir) {
                        tracing::warn!(error = %e, "cannot save the network's prefix");
                    }
                }
            }
            MapAction::SetAddresses { v4, v6 } => self.set_addresses(v4, v6),
            MapAction::AddressesRefused(e) => {
                tracing::error!(error = %e, "refusing the addresses the coordinator assigned");
                if let Some(s) = self.session.as_mut() {
                    s.last_error = Some(format!("refused the assigned addresses: {e}"));
                }
            }
            MapAction::SetName(name) => {
                if let Some(s) = self.session.as_mut() {
                    s.name = Some(name);
                }
            }
            MapAction::MapReceived => {
                if let Some(s) = self.session.as_mut() {
                    s.map_received = true;
                }
            }
            MapAction::SetRelayMap(map) => self.set_relay_map(map),
            MapAction::SetFilter(filter) => {
                tracing::info!(
                    rules = filter.as_ref().and_then(|f| f.rules()).map(<[_]>::len),
                    "packet filter from the map"
                );
                // Without a policy the config file's filter, if any, is in
                // force.
                self.dp.firewall.set_policy(filter.map(|f| *f));
            }
            MapAction::UpsertPeer(p) => self.add_peer(now, &p),
            MapAction::RemovePeer(k) => {
                tracing::info!(peer = %k.short(), "peer removed");
                self.remove_peer(now, &k);
            }
            MapAction::Connected => {
                if let Some(s) = self.session.as_mut() {
                    s.state = MeshState::Running;
                    s.last_error = None;
                }
            }
            MapAction::Disconnected { reason, retry_in } => {
                tracing::info!(%reason, ?retry_in, "coordinator unreachable; keeping the last map");
                if let Some(s) = self.session.as_mut() {
                    s.state = MeshState::Reconnecting;
                    s.last_error = Some(reason);
                }
            }
            MapAction::Leave(reason) => self.revoked(&reason),
        }
    }

    fn revoked(&mut self, reason: &str) {
        if self.session.is_none() {
            return;
        }
        tracing::warn!(%reason, "the coordinator no longer accepts this node; run `warren up --token`");
        self.leave();
    }

    /// Brings a peer the follower accepted into the data plane, traversal
    /// and the relays.
    fn add_peer(&mut self, now: Instant, p: &MapPeer) {
        let mut spec = PeerSpec::new(p.key, crate::control::follow::allowed_ips(p));
        spec.managed = true;
        self.dp.upsert_peer(now, spec);
        let mut info = PeerInfo::from_map(p, p.nat);
        info.disco_key = DiscoKey(p.disco_key.0);
        self.node.upsert_peer(now, info);
        self.relays.set_peer_region(p.key, p.home_relay);
        // A replaced data-plane peer starts on the relay; keep it in step
        // with what traversal already knows.
        self.apply_path(&p.key, self.node.path(&p.key), now);
    }

    fn remove_peer(&mut self, now: Instant, k: &NodeKey) {
        self.dp.remove_peer(k);
        self.node.remove_peer(now, k);
        self.relays.remove_peer(k);
        self.direct_since.remove(k);
    }

    /// Installs this node's overlay addresses (the follower checked them
    /// against the overlay and the pinned /48, `control::bounds`).
    fn set_addresses(&mut self, v4: Ipv4Addr, v6: Ipv6Addr) {
        let Some(s) = self.session.as_mut() else {
            return;
        };
        let addresses = [IpAddr::V4(v4), IpAddr::V6(v6)];
        s.addresses = addresses.to_vec();
        // Peers may send to these only (README, "Access policy").
        self.dp
            .firewall
            .set_local(addresses.iter().map(|a| IpNet::from(*a)).collect());
        // The whole overlay range is routed to the device: /10 and /48.
        for res in [
            self.tun.add_address_v4(v4, 10),
            self.tun.add_address_v6(v6, 48),
        ] {
            if let Err(e) = res {
                // EEXIST on re-join is expected.
                tracing::debug!(error = %e, "adding overlay address");
            }
        }
    }

    fn set_relay_map(&mut self, map: crate::control::types::RelayMap) {
        let changed = &map != self.relays.map();
        self.relays.set_map(map);
        if self.relays.home().is_none() {
            // Relay from the first packet: the first region until netcheck
            // has measured which is nearest.
            if let Some(first) = self.relays.map().regions.first().map(|r| r.id) {
                self.relays.set_home(first, false);
            }
        }
        if changed {
            if let Some(pm) = self.portmap.clone() {
                self.discovery.start_portmap(pm);
            }
            self.start_netcheck(Instant::now());
        }
    }

    pub(super) fn on_netcheck(&mut self, report: Report) {
        let latency = self.discovery.region_latency();
        let home = crate::netcheck::home::choose_home(self.relays.measured_home(), &latency);
        if let Some(home) = home {
            if self.relays.home() != Some(home) {
                let rtt = latency.iter().find(|(id, _)| *id == home).map(|(_, l)| *l);
                tracing::info!(region = home, ?rtt, "home relay chosen by latency");
            }
            self.relays.set_home(home, true);
        }
        let waiters = std::mem::take(&mut self.netcheck_waiters);
        for w in waiters {
            let _ = w.send(Ok(MeshReply::Netcheck(Box::new(report.clone()))));
        }
        self.publish_local(serde_json::to_value(&report).ok());
    }

    /// Gives traversal this node's candidates and NAT, and publishes them
    /// (with the home relay) to the coordinator.
    pub(super) fn publish_local(&mut self, netcheck: Option<serde_json::Value>) {
        let candidates = self.discovery.candidates();
        let nat = self.discovery.nat();
        self.node.set_local(
            Instant::now(),
            candidates.iter().map(Into::into).collect(),
            nat,
        );
        self.publish_tcp();
        let report = EndpointsReport {
            endpoints: candidates,
            netcheck,
            nat,
            home_relay: self.relays.home(),
        };
        self.report(report);
    }

    /// Sends `report` unless it is what the coordinator already has; one
    /// request at a time, the newest wins.
    fn report(&mut self, report: EndpointsReport) {
        let Some(s) = self.session.as_mut() else {
            return;
        };
        let same = |a: &EndpointsReport, b: &EndpointsReport| {
            a.endpoints == b.endpoints && a.nat == b.nat && a.home_relay == b.home_relay
        };
        if s.reported.as_ref().is_some_and(|r| same(r, &report)) || s.reporting {
            return;
        }
        s.reporting = true;
        let client = s.client.clone();
        self.background.spawn(async move {
            let result = client.report_endpoints(&report).await;
            Background::Reported { report, result }
        });
    }

    pub(super) fn on_background(&mut self, bg: Background) {
        match bg {
            Background::Registered(Ok(reg)) => self.on_registered(reg),
            Background::Registered(Err(e)) => self.revoked(&e.to_string()),
            Background::Reported { report, result } => {
                let Some(s) = self.session.as_mut() else {
                    return;
                };
                s.reporting = false;
                match result {
                    Ok(()) => s.reported = Some(report),
                    Err(e) if e.is_permanent() => self.revoked(&e.to_string()),
                    Err(e) => {
                        tracing::info!(error = %e, "reporting endpoints failed; will retry");
                        // The next netcheck (or address change) retries.
                    }
                }
            }
        }
    }

    pub(super) fn node_status(&self) -> MeshStatus {
        let Some(s) = &self.session else {
            return MeshStatus::default();
        };
        let names = |id: u16| {
            self.relays
                .region_name(id)
                .unwrap_or_else(|| id.to_string())
        };
        MeshStatus {
            state: s.state,
            coordinator: Some(s.login.coordinator.clone()),
            name: s.name.clone(),
            addresses: s.addresses.clone(),
            home_relay: self.relays.home().map(names),
            home_relay_connected: self
                .relays
                .home()
                .is_some_and(|h| self.relays.is_connected(h)),
            home_relay_error: self.relays.home().and_then(|h| self.relays.last_error(h)),
            policy_rules: self.dp.firewall.rule_count(),
            reach_error: None,
            relay_latency_ms: self
                .discovery
                .region_latency()
                .into_iter()
                .map(|(id, d)| (names(id), d.as_secs_f64() * 1e3))
                .collect(),
            endpoints: s
                .reported
                .as_ref()
                .map(|r| r.endpoints.clone())
                .unwrap_or_default(),
            nat: self.discovery.nat(),
            udp: self.discovery.last.as_ref().map(|r| r.udp),
            last_error: s.last_error.clone(),
            map_received: s.map_received,
            tags: s.login.tags.clone(),
        }
    }
}
