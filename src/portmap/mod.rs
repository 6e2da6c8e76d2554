//! Port mapping: asking the home gateway to forward a public UDP port to the
//! agent's socket (candidate kind `portmapped`; see docs/architecture.md,
//! "Endpoint discovery").
//!
//! Three protocols, each optional: PCP (RFC 6887) and NAT-PMP (RFC 6886)
//! through `crab_nat`, and UPnP IGD through `igd-next`. We do not write our
//! own NAT-PMP/PCP codec: `crab_nat` already implements both with the RFC
//! retry schedule, typed errors and delete/renew, and it lets us call each
//! protocol separately, which is what "configurable which are enabled" needs.
//! What it leaves to us is finding the gateway ([`gateway`]).
//!
//! [`PortMapper`] is a tokio task with a handle: it obtains a mapping, renews
//! it at half its lifetime, and deletes it on [`PortMapperHandle::shutdown`].
//! A protocol that fails is logged once at info level; nothing here ever
//! blocks the caller. [`probe`] answers netcheck's "which protocols does the
//! gateway speak?".

pub mod gateway;
mod mapper;
mod probe;

use std::net::IpAddr;
use std::time::Duration;

pub use mapper::{MappingError, PortMapper, PortMapperHandle};
pub use probe::probe;

/// Which port-mapping protocols the gateway answered.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PortmapPresence {
    pub upnp: bool,
    pub natpmp: bool,
    pub pcp: bool,
}

impl PortmapPresence {
    pub fn any(&self) -> bool {
        self.upnp || self.natpmp || self.pcp
    }
}

/// The protocols, in the order the mapper tries them: the two small UDP
/// protocols first (PCP is NAT-PMP's successor), UPnP's SSDP + HTTP last.
/// In the agent's config they are spelled `pcp`, `natpmp`, `upnp`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Pcp,
    NatPmp,
    Upnp,
}

impl std::fmt::Display for Protocol {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Protocol::Pcp => "PCP",
            Protocol::NatPmp => "NAT-PMP",
            Protocol::Upnp => "UPnP",
        })
    }
}

/// Port-mapping settings.
#[derive(Debug, Clone)]
pub struct Config {
    pub upnp: bool,
    pub natpmp: bool,
    pub pcp: bool,
    /// The gateway to ask; `None` reads the IPv4 default route.
    pub gateway: Option<IpAddr>,
    /// Requested mapping lifetime; the gateway may grant less.
    pub lifetime: Duration,
    /// Bound on one protocol's attempt (request + retries, or SSDP search).
    pub request_timeout: Duration,
    /// Pause before trying again after every protocol failed.
    pub retry_interval: Duration,
    /// UPnP mapping description shown in router UIs.
    pub description: String,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            upnp: true,
            natpmp: true,
            pcp: true,
            gateway: None,
            lifetime: Duration::from_secs(7200),
            request_timeout: Duration::from_secs(2),
            retry_interval: Duration::from_secs(300),
            description: "warren".to_owned(),
        }
    }
}

impl Config {
    /// The defaults with only `protocols` enabled.
    pub fn with_protocols(protocols: &[Protocol]) -> Config {
        Config {
            upnp: protocols.contains(&Protocol::Upnp),
            natpmp: protocols.contains(&Protocol::NatPmp),
            pcp: protocols.contains(&Protocol::Pcp),
            ..Config::default()
        }
    }

    /// The enabled protocols in trial order.
    pub fn protocols(&self) -> Vec<Protocol> {
        [
            (self.pcp, Protocol::Pcp),
            (self.natpmp, Protocol::NatPmp),
            (self.upnp, Protocol::Upnp),
        ]
        .into_iter()
        .filter_map(|(on, p)| on.then_some(p))
        .collect()
    }

    /// The gateway from the config or the default route.
    pub fn resolve_gateway(&self) -> Option<IpAddr> {
        self.gateway
            .or_else(|| gateway::default_gateway_v4().ok().flatten().map(IpAddr::V4))
    }

    /// crab_nat's retry schedule fitted inside `request_timeout`.
    fn crab_timeouts(&self) -> crab_nat::TimeoutConfig {
        let initial = (self.request_timeout / 8).max(Duration::from_millis(50));
        crab_nat::TimeoutConfig {
            initial_timeout: initial,
            max_retries: 2,
            max_retry_timeout: Some(self.request_timeout / 2),
        }
    }
}
