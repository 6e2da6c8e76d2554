//! The [`Backend`] of a running agent: the data plane's live counters and
//! paths, merged with the mesh's view (host names, relay regions, latency,
//! why a peer is relayed), and the mesh commands handed to the mesh task.
//!
//! The data plane is the authority on what packets do now (path, bytes,
//! handshakes); the mesh adds what only the control side knows. A peer from
//! the config file has no mesh entry and shows only the former.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::future::BoxFuture;
use ipnet::IpNet;

use super::mesh::PingRound;
use super::server::Backend;
use super::{ApiError, ErrorCode, PeerPath, PeerStatus, Request, Status};
use crate::agent::mesh::{Command, MeshHandle, MeshReply};
use crate::agent::Running;
use crate::dataplane::DataPlane;
use crate::keys::NodeKey;

pub struct AgentView {
    pub dataplane: Arc<DataPlane>,
    pub interface: String,
    pub addresses: Vec<IpNet>,
    pub listen: std::net::SocketAddr,
    pub offload: bool,
    pub started: Instant,
    pub mesh: Option<MeshHandle>,
    pub dns: Option<crate::agent::dns::DnsHandle>,
}

impl AgentView {
    pub fn new(running: &Running, config: &crate::config::Config) -> AgentView {
        AgentView {
            dataplane: running.dataplane.clone(),
            interface: config.interface.name.clone(),
            addresses: config.interface.addresses.clone(),
            listen: running.listen,
            offload: running.offload,
            started: Instant::now(),
            mesh: Some(running.mesh.clone()),
            dns: running.dns.clone(),
        }
    }
}

impl Backend for AgentView {
    fn status(&self) -> Status {
        let now = std::time::Instant::now();
        let view = self.mesh.as_ref().map(|m| m.view());
        let set = self.dataplane.peers();
        let mut peers: Vec<PeerStatus> = set
            .iter()
            .map(|p| {
                let st = p.stats(now);
                let mesh = view.as_ref().and_then(|v| v.peers.get(&p.key)).cloned();
                PeerStatus {
                    public_key: p.key,
                    hostname: mesh.as_ref().map(|m| m.hostname.clone()),
                    allowed_ips: p.spec.allowed_ips.clone(),
                    path: PeerPath::from_path(
                        st.path,
                        mesh.as_ref().and_then(|m| m.relay_region.clone()),
                    ),
                    latency_ms: mesh.as_ref().and_then(|m| m.latency_ms),
                    last_handshake_secs: st.last_handshake.map(|d| d.as_secs()),
                    rx_bytes: st.rx_bytes,
                    tx_bytes: st.tx_bytes,
                    mesh,
                }
            })
            .collect();
        // Stable order: by first overlay address, then key.
        peers.sort_by(|a, b| {
            (a.allowed_ips.first(), a.public_key).cmp(&(b.allowed_ips.first(), b.public_key))
        });
        let mut addresses = self.addresses.clone();
        let mut node = view.map(|v| v.node);
        if let (Some(n), Some(d)) = (&mut node, &self.dns) {
            let st = d.status();
            n.dns = Some(crate::api::mesh::DnsBrief {
                mode: st.mode,
                address: st.address.first().map(|a| a.ip()),
                domain: st.domain,
                problem: st.problem,
            });
        }
        if let Some(n) = &node {
            for ip in &n.addresses {
                let net = match ip {
                    IpAddr::V4(_) => IpNet::new(*ip, 10),
                    IpAddr::V6(_) => IpNet::new(*ip, 48),
                };
                if let Ok(net) = net {
                    if !addresses.contains(&net) {
                        addresses.push(net);
                    }
                }
            }
        }
        // What this node's own filter lets each peer do: local, unlike
        // what the peers allow (`server::status_with_reach`).
        let filter = self.dataplane.firewall.filter();
        if let (Some(rules), Some(n)) = (filter.rules(), &node) {
            for p in &mut peers {
                let from: Vec<IpAddr> = p
                    .allowed_ips
                    .iter()
                    .filter(|n| n.prefix_len() == n.max_prefix_len())
                    .map(IpNet::addr)
                    .collect();
                if let Some(m) = &mut p.mesh {
                    m.you_allow = Some(crate::policy::reach(rules, &from, &n.addresses));
                }
            }
        }
        Status {
            version: env!("CARGO_PKG_VERSION").into(),
            interface: self.interface.clone(),
            public_key: self.dataplane.public_key(),
            listen: self.listen,
            offload: self.offload,
            addresses,
            uptime_secs: self.started.elapsed().as_secs(),
            peers,
            drops: self.dataplane.drop_counts().into(),
            mesh: node,
        }
    }

    fn dns(&self, request: Request) -> BoxFuture<'_, Result<serde_json::Value, ApiError>> {
        Box::pin(async move {
            let Some(d) = &self.dns else {
                return Err(ApiError::new(
                    ErrorCode::Unsupported,
                    "this daemon runs without a resolver ([dns] enabled = false)",
                ));
            };
            let json = match request {
                Request::DnsStatus => serde_json::to_value(d.status()),
                Request::DnsQuery { name, qtype } => {
                    let reply = d
                        .query(&name, qtype.as_deref().unwrap_or("A"))
                        .await
                        .map_err(|e| ApiError::new(ErrorCode::BadRequest, e))?;
                    serde_json::to_value(reply)
                }
                other => {
                    return Err(ApiError::new(
                        ErrorCode::Internal,
                        format!("{other:?} is not a DNS request"),
                    ))
                }
            };
            json.map_err(|e| ApiError::new(ErrorCode::Internal, e.to_string()))
        })
    }

    fn reach(&self) -> BoxFuture<'_, Option<Result<crate::control::ReachResponse, String>>> {
        Box::pin(async move {
            let client = self.mesh.as_ref()?.view().client?;
            Some(client.reach().await.map_err(|e| e.to_string()))
        })
    }

    fn disco_ping(
        &self,
        peer: NodeKey,
        timeout: Duration,
    ) -> BoxFuture<'_, Result<PingRound, ApiError>> {
        Box::pin(async move {
            let Some(mesh) = &self.mesh else {
                return Err(ApiError::new(
                    ErrorCode::Unsupported,
                    "this daemon runs without a mesh",
                ));
            };
            match mesh.call(Command::Ping { peer, timeout }).await? {
                MeshReply::Ping(round) => Ok(round),
                other => Err(unexpected(&other)),
            }
        })
    }

    fn mesh(&self, request: Request) -> BoxFuture<'_, Result<serde_json::Value, ApiError>> {
        Box::pin(async move {
            let Some(mesh) = &self.mesh else {
                return Err(ApiError::new(
                    ErrorCode::Unsupported,
                    "this daemon runs without a mesh",
                ));
            };
            let cmd = match request {
                Request::Up(args) => Command::Up(args),
                Request::Down => Command::Down,
                Request::Logout => Command::Logout,
                Request::Netcheck => Command::Netcheck,
                other => {
                    return Err(ApiError::new(
                        ErrorCode::Internal,
                        format!("{other:?} is not a mesh request"),
                    ))
                }
            };
            // The JSON of the API is made here, at its edge; the mesh task
            // answers in typed values.
            let json = match mesh.call(cmd).await? {
                MeshReply::Up(r) => serde_json::to_value(r),
                MeshReply::Left(r) => serde_json::to_value(r),
                MeshReply::Netcheck(r) => serde_json::to_value(r),
                other => return Err(unexpected(&other)),
            };
            json.map_err(|e| ApiError::new(ErrorCode::Internal, e.to_string()))
        })
    }
}

/// A reply of the wrong kind for its command: a bug in the mesh task.
fn unexpected(reply: &MeshReply) -> ApiError {
    ApiError::new(
        ErrorCode::Internal,
        format!("the mesh task answered out of turn: {reply:?}"),
    )
}
