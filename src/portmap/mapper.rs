//! The port-mapping task: obtain a UDP mapping for the agent's port, keep it
//! renewed at half its lifetime, delete it on shutdown.
//!
//! Each protocol is tried in [`Config::protocols`] order; the first mapping
//! wins. Every gateway exchange is bounded by `request_timeout`, so a silent
//! gateway costs a few seconds of a background task and never the caller.
//! A mapping obtained while shutdown races it is not deleted; it expires with
//! its lifetime, which is the protocols' own safety net.

use std::collections::HashSet;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::num::NonZeroU16;
use std::time::Duration;

use crab_nat::{natpmp, pcp, InternetProtocol, PortMapping, PortMappingOptions, PortMappingType};
use igd_next::aio::tokio::Tokio;
use igd_next::PortMappingProtocol;
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;

use super::gateway::local_ip_towards;
use super::{Config, Protocol};

/// Why one protocol could not map (logged once per protocol, never fatal).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MappingError {
    #[error("no default gateway")]
    NoGateway,
    #[error("local port 0 cannot be mapped")]
    PortZero,
    #[error("{0} did not answer in time")]
    Timeout(Protocol),
    #[error("socket: {0}")]
    Io(#[from] std::io::Error),
    #[error("PCP: {0}")]
    Pcp(#[from] pcp::Failure),
    #[error("NAT-PMP: {0}")]
    NatPmp(#[from] natpmp::Failure),
    #[error("crab_nat: {0}")]
    Crab(#[from] crab_nat::MappingFailure),
    #[error("UPnP search: {0}")]
    UpnpSearch(#[from] igd_next::SearchError),
    #[error("UPnP add port: {0}")]
    UpnpAdd(#[from] igd_next::AddAnyPortError),
    #[error("UPnP renew: {0}")]
    UpnpRenew(#[from] igd_next::AddPortError),
    #[error("UPnP external address: {0}")]
    UpnpExternalIp(#[from] igd_next::GetExternalIpError),
    #[error("UPnP remove: {0}")]
    UpnpRemove(#[from] igd_next::RemovePortError),
}

/// A mapping currently held at the gateway.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mapping {
    /// The public endpoint peers can send to (candidate kind `portmapped`).
    pub external: SocketAddr,
    pub protocol: Protocol,
}

enum Active {
    Crab(PortMapping, SocketAddr),
    Upnp {
        gateway: igd_next::aio::Gateway<Tokio>,
        local: SocketAddr,
        external: SocketAddr,
    },
}

/// Entry point: [`PortMapper::start`].
pub struct PortMapper;

impl PortMapper {
    /// Starts the mapping task for UDP `local_port`. Must be called inside a
    /// tokio runtime.
    pub fn start(local_port: u16, config: Config) -> PortMapperHandle {
        let (current_tx, current) = watch::channel(None);
        let (shutdown, shutdown_rx) = oneshot::channel();
        let task = tokio::spawn(run(local_port, config, current_tx, shutdown_rx));
        PortMapperHandle {
            current,
            shutdown: Some(shutdown),
            task,
        }
    }
}

/// Handle to the mapping task. Dropping it also ends the task (which then
/// deletes its mapping in the background).
pub struct PortMapperHandle {
    current: watch::Receiver<Option<Mapping>>,
    shutdown: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

impl PortMapperHandle {
    /// The mapped external endpoint, if a mapping is held right now.
    pub fn current(&self) -> Option<SocketAddr> {
        self.current.borrow().map(|m| m.external)
    }

    /// The current mapping with its protocol.
    pub fn mapping(&self) -> Option<Mapping> {
        *self.current.borrow()
    }

    /// A receiver that sees every change (obtained, renewed elsewhere, lost).
    pub fn subscribe(&self) -> watch::Receiver<Option<Mapping>> {
        self.current.clone()
    }

    /// Deletes the mapping at the gateway (bounded by the request timeout)
    /// and ends the task.
    pub async fn shutdown(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        let _ = (&mut self.task).await;
    }
}

async fn run(
    local_port: u16,
    config: Config,
    current: watch::Sender<Option<Mapping>>,
    mut shutdown: oneshot::Receiver<()>,
) {
    let mut logged: HashSet<Protocol> = HashSet::new();
    loop {
        let obtained = tokio::select! {
            m = obtain(local_port, &config, &mut logged) => m,
            _ = &mut shutdown => return,
        };
        let Some((protocol, mut active)) = obtained else {
            tokio::select! {
                _ = tokio::time::sleep(config.retry_interval) => continue,
                _ = &mut shutdown => return,
            }
        };
        tracing::info!(%protocol, external = %active.external(), "port mapping obtained");
        current.send_replace(Some(Mapping {
            external: active.external(),
            protocol,
        }));
        loop {
            tokio::select! {
                _ = tokio::time::sleep(active.renew_after(&config)) => {}
                _ = &mut shutdown => {
                    current.send_replace(None);
                    match bounded(&config, protocol, active.delete()).await {
                        Ok(()) => tracing::info!(%protocol, "port mapping deleted"),
                        Err(e) => tracing::info!(%protocol, error = %e, "port mapping not deleted; it will expire"),
                    }
                    return;
                }
            }
            match bounded(&config, protocol, active.renew(&config)).await {
                Ok(()) => {
                    current.send_replace(Some(Mapping {
                        external: active.external(),
                        protocol,
                    }));
                }
                Err(e) => {
                    log_once(&mut logged, protocol, &e);
                    current.send_replace(None);
                    break;
                }
            }
        }
    }
}

/// First enabled protocol that maps, logging each failure once.
async fn obtain(
    local_port: u16,
    config: &Config,
    logged: &mut HashSet<Protocol>,
) -> Option<(Protocol, Active)> {
    for protocol in config.protocols() {
        match bounded(config, protocol, map(protocol, local_port, config)).await {
            Ok(active) => {
                logged.remove(&protocol);
                return Some((protocol, active));
            }
            Err(e) => log_once(logged, protocol, &e),
        }
    }
    None
}

fn log_once(logged: &mut HashSet<Protocol>, protocol: Protocol, e: &MappingError) {
    if logged.insert(protocol) {
        tracing::info!(%protocol, error = %e, "port mapping unavailable");
    } else {
        tracing::debug!(%protocol, error = %e, "port mapping still unavailable");
    }
}

/// Bounds any gateway exchange; crab_nat has its own retry budget, SSDP and
/// UPnP's HTTP do not.
async fn bounded<T>(
    config: &Config,
    protocol: Protocol,
    fut: impl Future<Output = Result<T, MappingError>>,
) -> Result<T, MappingError> {
    tokio::time::timeout(config.request_timeout * 2, fut)
        .await
        .unwrap_or(Err(MappingError::Timeout(protocol)))
}

async fn map(protocol: Protocol, local_port: u16, config: &Config) -> Result<Active, MappingError> {
    let port = NonZeroU16::new(local_port).ok_or(MappingError::PortZero)?;
    let gw = config.resolve_gateway().ok_or(MappingError::NoGateway)?;
    let client = local_ip_towards(gw)?;
    let options = PortMappingOptions {
        // Ask for the same port: a preserved port is one less thing to learn.
        external_port: Some(port),
        lifetime_seconds: Some(u32::try_from(config.lifetime.as_secs()).unwrap_or(u32::MAX)),
        timeout_config: Some(config.crab_timeouts()),
    };
    match protocol {
        Protocol::Pcp => {
            let base = pcp::BaseMapRequest::new(gw.into(), client, InternetProtocol::Udp, port);
            let m = pcp::port_mapping(base, None, None, options).await?;
            let ip = match m.mapping_type() {
                PortMappingType::Pcp { external_ip, .. } => external_ip,
                PortMappingType::NatPmp => gw,
            };
            let external = SocketAddr::new(ip.to_canonical(), m.external_port().get());
            Ok(Active::Crab(m, external))
        }
        Protocol::NatPmp => {
            let m = natpmp::port_mapping(gw.into(), InternetProtocol::Udp, port, options).await?;
            let ip = natpmp::external_address(gw.into(), Some(config.crab_timeouts())).await?;
            let external = SocketAddr::new(IpAddr::V4(ip), m.external_port().get());
            Ok(Active::Crab(m, external))
        }
        Protocol::Upnp => {
            let gateway = igd_next::aio::tokio::search_gateway(upnp_search(config, client)).await?;
            let local = SocketAddr::new(client, local_port);
            let ip = gateway.get_external_ip().await?;
            let lease = u32::try_from(config.lifetime.as_secs()).unwrap_or(u32::MAX);
            let port = gateway
                .add_any_port(PortMappingProtocol::UDP, local, lease, &config.description)
                .await?;
            Ok(Active::Upnp {
                gateway,
                local,
                external: SocketAddr::new(ip, port),
            })
        }
    }
}

pub(super) fn upnp_search(config: &Config, client: IpAddr) -> igd_next::SearchOptions {
    let mut options = igd_next::SearchOptions::default();
    // Bind to the gateway-facing address so SSDP leaves on that link.
    options.bind_addr = SocketAddr::new(client, 0);
    options.timeout = Some(config.request_timeout);
    options.single_search_timeout = Some(config.request_timeout);
    options
}

impl Active {
    fn external(&self) -> SocketAddr {
        match self {
            Active::Crab(_, external) | Active::Upnp { external, .. } => *external,
        }
    }

    /// Half the granted lifetime; at least a second so a gateway granting
    /// nonsense cannot make us spin.
    fn renew_after(&self, config: &Config) -> Duration {
        let lifetime = match self {
            Active::Crab(m, _) => Duration::from_secs(u64::from(m.lifetime())),
            Active::Upnp { .. } => config.lifetime,
        };
        (lifetime / 2).max(Duration::from_secs(1))
    }

    async fn renew(&mut self, config: &Config) -> Result<(), MappingError> {
        match self {
            Active::Crab(m, external) => {
                m.renew().await?;
                external.set_port(m.external_port().get());
            }
            Active::Upnp {
                gateway,
                local,
                external,
            } => {
                let lease = u32::try_from(config.lifetime.as_secs()).unwrap_or(u32::MAX);
                gateway
                    .add_port(
                        PortMappingProtocol::UDP,
                        external.port(),
                        *local,
                        lease,
                        &config.description,
                    )
                    .await?;
            }
        }
        Ok(())
    }

    async fn delete(self) -> Result<(), MappingError> {
        match self {
            Active::Crab(m, _) => m.try_drop().await.map_err(|(e, _)| e.into()),
            Active::Upnp {
                gateway, external, ..
            } => Ok(gateway
                .remove_port(PortMappingProtocol::UDP, external.port())
                .await?),
        }
    }
}

#[cfg(test)]
#[path = "mapper_tests.rs"]
mod tests;
