//! Which port-mapping protocols does the gateway speak? (netcheck's
//! "UPnP / NAT-PMP / PCP" line.)
//!
//! Every probe is read-only or a no-op at the gateway: NAT-PMP asks for the
//! external address, PCP asks to delete a mapping we never made (a PCP server
//! answers, a NAT-PMP-only one says "version 0"), UPnP runs an SSDP search.
//! A gateway that answers with any protocol-level error still speaks the
//! protocol; only silence or a socket error counts as absent.

use std::future::Future;
use std::net::IpAddr;
use std::num::NonZeroU16;
use std::time::Duration;

use crab_nat::{natpmp, pcp, InternetProtocol};

use super::gateway::local_ip_towards;
use super::mapper::upnp_search;
use super::{Config, PortmapPresence};

/// Probes the enabled protocols concurrently; finishes within about twice
/// `config.request_timeout`.
pub async fn probe(config: &Config) -> PortmapPresence {
    let Some(gw) = config.resolve_gateway() else {
        return PortmapPresence::default();
    };
    let Ok(client) = local_ip_towards(gw) else {
        return PortmapPresence::default();
    };
    let bound = config.request_timeout * 2;
    let (upnp, natpmp, pcp) = tokio::join!(
        bounded(config.upnp, bound, upnp_present(config, client)),
        bounded(config.natpmp, bound, natpmp_present(config, gw)),
        bounded(config.pcp, bound, pcp_present(config, gw, client)),
    );
    PortmapPresence { upnp, natpmp, pcp }
}

async fn bounded(enabled: bool, bound: Duration, fut: impl Future<Output = bool>) -> bool {
    enabled && tokio::time::timeout(bound, fut).await.unwrap_or(false)
}

async fn upnp_present(config: &Config, client: IpAddr) -> bool {
    igd_next::aio::tokio::search_gateway(upnp_search(config, client))
        .await
        .is_ok()
}

async fn natpmp_present(config: &Config, gw: IpAddr) -> bool {
    match natpmp::external_address(gw.into(), Some(config.crab_timeouts())).await {
        Ok(_) => true,
        Err(natpmp::Failure::Timeout | natpmp::Failure::Socket(_)) => false,
        Err(_) => true,
    }
}

async fn pcp_present(config: &Config, gw: IpAddr, client: IpAddr) -> bool {
    // Port 9 ("discard"): a mapping we certainly do not hold.
    let Some(port) = NonZeroU16::new(9) else {
        return false;
    };
    let range = pcp::DropMappingRange::Single {
        protocol: InternetProtocol::Udp,
        internal_port: port,
    };
    let nonce: pcp::Nonce = rand::random();
    match pcp::try_drop_mapping(
        gw.into(),
        client,
        nonce,
        range,
        Some(config.crab_timeouts()),
    )
    .await
    {
        Ok(()) => true,
        Err(
            pcp::Failure::Timeout | pcp::Failure::Socket(_) | pcp::Failure::UnsupportedVersion(_),
        ) => false,
        Err(_) => true,
    }
}
