//! Where the coordinator may put this node and its peers: the overlay's
//! own ranges, and nowhere else.
//!
//! The agent installs its own addresses on the TUN device with the whole
//! overlay routed to it (/10 and /48), and a peer's addresses as that
//! peer's allowed IPs. A coordinator that is malicious, or a map spoofed on
//! the path, could otherwise assign this node `8.8.8.8/10` and route the
//! host's DNS into the tunnel, or hand a peer the host's gateway (issue
//! 15). So every address from the map must be inside 100.64.0.0/10 (IPv4)
//! or inside the network's ULA /48 (IPv6), which is pinned at the first
//! join (kept in the login) and never moves after: a later map with
//! another /48 is refused, not followed. Pure: the agent's mesh task
//! calls [`check`] and decides what to do with a refusal.

use std::net::{Ipv4Addr, Ipv6Addr};

use ipnet::{Ipv4Net, Ipv6Net};

/// The IPv4 overlay range (the carrier-grade NAT block, as Tailscale's).
pub const OVERLAY_V4: Ipv4Net = match Ipv4Net::new(Ipv4Addr::new(100, 64, 0, 0), 10) {
    Ok(n) => n,
    Err(_) => panic!("100.64.0.0/10 is a valid prefix"),
};

/// An overlay address the map may not give.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum OutOfBounds {
    #[error("{0} is outside the overlay's IPv4 range {OVERLAY_V4}")]
    V4(Ipv4Addr),
    #[error("{0} is not a unique local (fc00::/7) address")]
    NotUla(Ipv6Addr),
    #[error("{addr} is outside this network's {net} (pinned at the first join)")]
    OtherNetwork { addr: Ipv6Addr, net: Ipv6Net },
}

/// The /48 a ULA address belongs to.
pub fn ula48(v6: Ipv6Addr) -> Option<Ipv6Net> {
    (v6.segments()[0] & 0xfe00 == 0xfc00).then(|| {
        Ipv6Net::new(v6, 48)
            .map(|n| n.trunc())
            .unwrap_or_else(|_| Ipv6Net::default())
    })
}

/// Checks one node's pair of overlay addresses against the network's /48
/// (`pinned`, or none yet at the first join); returns the /48 they are in.
pub fn check(v4: Ipv4Addr, v6: Ipv6Addr, pinned: Option<Ipv6Net>) -> Result<Ipv6Net, OutOfBounds> {
    if !OVERLAY_V4.contains(&v4) {
        return Err(OutOfBounds::V4(v4));
    }
    let net = ula48(v6).ok_or(OutOfBounds::NotUla(v6))?;
    match pinned {
        Some(p) if p != net => Err(OutOfBounds::OtherNetwork { addr: v6, net: p }),
        _ => Ok(net),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_overlay_addresses_in_the_pinned_network_pass() {
        let v6: Ipv6Addr = "fd8e:433b:d1ee::6459:f986".parse().unwrap();
        let net = check("100.89.249.134".parse().unwrap(), v6, None).unwrap();
        assert_eq!(net.to_string(), "fd8e:433b:d1ee::/48");
        assert_eq!(check("100.64.0.1".parse().unwrap(), v6, Some(net)), Ok(net));
        // The host's DNS server, a LAN, the whole internet: refused.
        for bad in ["8.8.8.8", "10.0.0.1", "100.128.0.1", "0.0.0.0"] {
            let v4: Ipv4Addr = bad.parse().unwrap();
            assert_eq!(check(v4, v6, Some(net)), Err(OutOfBounds::V4(v4)));
        }
        let global: Ipv6Addr = "2001:db8::1".parse().unwrap();
        assert_eq!(
            check("100.64.0.1".parse().unwrap(), global, Some(net)),
            Err(OutOfBounds::NotUla(global))
        );
        let other: Ipv6Addr = "fd00:1::1".parse().unwrap();
        assert!(matches!(
            check("100.64.0.1".parse().unwrap(), other, Some(net)),
            Err(OutOfBounds::OtherNetwork { .. })
        ));
    }
}
