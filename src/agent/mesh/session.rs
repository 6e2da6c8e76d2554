//! The coordinator side of the mesh: `up`, `down`, `logout`, the map
//! stream's events, and the control requests that run in the background.
//!
//! `up` itself is in [`super::up`]: it registers inline (the CLI waits for
//! the answer, and a refused token must change nothing). A daemon that restarts with a saved
//! login does not wait: it starts the map stream at once — the stream
//! replays the map saved on disk, so tunnels come back even while the
//! coordinator is down — and re-registers in the background to publish the
//! new disco key, retrying with backoff.

use std::time::{Duration, Instant};

use super::handle::{Command, MeshReply, Reply};
use super::login::Login;
use super::Mesh;
use crate::agent::state::control::ReportFailed;
use crate::agent::state::ping::PingRefused;
use crate::api::mesh::LeaveReply;
use crate::api::{ApiError, ErrorCode};
use crate::control::client::{ControlClient, ControlError, MapEvent, MapStream, Registration};
use crate::control::types::EndpointsReport;
use crate::keys::NodeKey;

/// Longest wait on the coordinator for `up` and `logout`.
pub(super) const UP_TIMEOUT: Duration = Duration::from_secs(20);
const RETRY_MIN: Duration = Duration::from_secs(1);
const RETRY_MAX: Duration = Duration::from_secs(60);

/// The IO side of the control session; its state (joined, following,
/// name, addresses, reports) is the agent state's (`state::control`).
pub struct Session {
    pub login: Login,
    pub client: ControlClient,
    pub stream: Option<MapStream>,
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
    /// The coordinator's addresses (and its proxy's), which must stay off
    /// warren's own routes (`routing.rs`).
    Resolved(Vec<std::net::IpAddr>),
}

/// The addresses of the coordinator at `url` and of the HTTPS proxy, if
/// one is set: what the control client connects to. A name that does not
/// resolve gives none (the client fails the same way and retries).
async fn resolve_coordinator(url: String) -> Background {
    let mut targets = Vec::new();
    if let Ok(t) = crate::dial::parse_url(&url, true) {
        targets.push((t.host, t.port));
    }
    if let Some(p) = crate::dial::ProxyConfig::from_env() {
        targets.push((p.host, p.port));
    }
    let mut addrs = Vec::new();
    for (host, port) in targets {
        let lookup = tokio::net::lookup_host((host.as_str(), port));
        if let Ok(Ok(found)) =
            tokio::time::timeout(std::time::Duration::from_secs(10), lookup).await
        {
            addrs.extend(found.map(|a| a.ip().to_canonical()));
        }
    }
    Background::Resolved(addrs)
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
        self.state.disco_key()
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
                });
                self.state.begin();
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
        // Maps are held to the network's /48 the login pinned.
        let now = Instant::now();
        let accept = s.login.accept_routes;
        let exit = (s.login.exit_node, s.login.exit_node_allow_lan_access);
        self.background
            .spawn(resolve_coordinator(s.login.coordinator.clone()));
        self.state.follow(now, s.login.ula);
        self.state.set_accept_routes(now, accept);
        self.state.set_exit_node(now, exit.0, exit.1);
        // The first look at the host's addresses, now rather than at the
        // second housekeeping tick.
        let endpoints = super::login::host_endpoints(self.listen.port());
        self.state.handle_host(now, endpoints);
        let nets = self.host_routes.local_networks();
        self.state.handle_local_networks(now, nets);
        if reregister {
            let client = s.client.clone();
            let login = s.login.clone();
            self.background.spawn(async move {
                let mut wait = RETRY_MIN;
                loop {
                    match client
                        .register_advertising(None, &login.hostname, disco, &login.advertised())
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

    /// Serves a command. The answer comes back to be sent once the
    /// state's outputs are carried out and the view published (the
    /// caller's next `status` must see the effect); a command that waits
    /// for the state (ping, netcheck) keeps its reply and returns `None`.
    pub(super) async fn on_command(
        &mut self,
        cmd: Command,
        reply: Reply,
    ) -> Option<(Reply, Result<MeshReply, ApiError>)> {
        let answer = match cmd {
            Command::Up(args) => self.up(args).await,
            Command::Down => self.down(),
            Command::Logout => self.logout().await,
            Command::Shutdown => {
                // Deletes the port mapping and waits for the gateway's
                // answer (bounded by the mapper's request timeout): a
                // background task would die with the runtime, before a
                // UPnP delete even reaches the gateway.
                if let Some(pm) = self.portmapper.take() {
                    pm.shutdown().await;
                }
                // Nothing of ours stays in the host's routing, nftables
                // or DNS.
                self.host_routes.clear();
                if let Some(d) = &self.dns {
                    d.stop().await;
                }
                Ok(MeshReply::Done)
            }
            Command::Ping { peer, timeout } => {
                match self.state.ping(Instant::now(), peer, timeout) {
                    Ok(id) => {
                        self.ping_waiters.insert(id, reply);
                    }
                    Err(e) => {
                        let code = match e {
                            PingRefused::UnknownPeer => ErrorCode::UnknownPeer,
                            _ => ErrorCode::Internal,
                        };
                        return Some((reply, Err(api_err(code, e.to_string()))));
                    }
                }
                return None;
            }
            Command::Netcheck => {
                if self.state.relay_map().regions.is_empty() {
                    Err(api_err(
                        ErrorCode::NotJoined,
                        "netcheck needs the STUN servers of a network: run `warren up` first",
                    ))
                } else {
                    self.state.request_netcheck(Instant::now());
                    self.netcheck_waiters.push(reply);
                    return None;
                }
            }
        };
        Some((reply, answer))
    }

    fn down(&mut self) -> Result<MeshReply, ApiError> {
        let Some(s) = self.session.as_mut() else {
            return Err(api_err(ErrorCode::NotJoined, "not joined to any network"));
        };
        s.login.stopped = true;
        let _ = s.login.save(&self.state_dir);
        s.stream = None;
        let left = LeaveReply {
            coordinator: s.login.coordinator.clone(),
            name: self.state.control().and_then(|c| c.name.clone()),
            logged_out: false,
        };
        self.state.stop(Instant::now());
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
            name: self.state.control().and_then(|c| c.name.clone()),
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
        self.state.leave(Instant::now());
    }

    pub(super) fn on_background(&mut self, bg: Background) {
        let now = Instant::now();
        match bg {
            // Re-registered in the background: the node keeps following.
            Background::Registered(Ok(reg)) => self.state.registered(now, &reg, true),
            Background::Registered(Err(e)) => self.state.revoked(now, e.to_string()),
            Background::Resolved(addrs) => self.host_routes.set_coordinator(addrs),
            Background::Reported { report, result } => {
                let result = result.map_err(|e| ReportFailed {
                    permanent: e.is_permanent(),
                    message: e.to_string(),
                });
                self.state.handle_reported(now, report, result);
            }
        }
    }

    /// `status`'s view of this node: the state's, with what only the
    /// driver knows (the login, the relay connection, the data plane's
    /// policy).
    pub(super) fn node_status(&self) -> crate::api::mesh::MeshStatus {
        let mut st = self.state.status();
        let (Some(s), Some(_)) = (&self.session, self.state.control()) else {
            return st;
        };
        st.coordinator = Some(s.login.coordinator.clone());
        st.tags = s.login.tags.clone();
        st.advertised_routes = s.login.routes.clone();
        st.routes_problem = self.host_routes.problem.clone();
        let home = self.relays.home();
        st.home_relay_connected = home.is_some_and(|h| self.relays.is_connected(h));
        st.home_relay_error = home.and_then(|h| self.relays.last_error(h));
        st.policy_rules = self.dp.firewall.rule_count();
        st
    }
}
