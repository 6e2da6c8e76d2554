//! Kinds of gateway the lab can build, as nftables rulesets.
//!
//! A gateway namespace has two interfaces: `wan` toward its upstream (the
//! internet segment, or another gateway's LAN for double NAT) and `lan`, a
//! bridge its hosts hang off. Every kind is one nftables ruleset loaded
//! atomically with `nft -f`, so adding a kind is one arm in
//! [`Nat::ruleset`]: the rest of the lab (addressing, routes, port forwards)
//! does not care which kind it is.
//!
//! Mapping behaviour of the kernel's NAT (see LAB-NOTES): `masquerade`
//! keeps the source port when it is free and reuses one mapping toward all
//! destinations (endpoint-independent mapping, EIM); `masquerade
//! fully-random` draws a new random port per destination (endpoint-dependent
//! mapping, EDM). Filtering is the stateful firewall every home router has:
//! replies and port forwards come in, nothing else does.
//!
//! Linux has no sequential port allocator, but nftables can compute the
//! port: `snat to WAN:numgen inc mod N map {..}` is evaluated once per new
//! conntrack entry, so every new mapping (every new destination) takes the
//! next port of a counter. That gives sequential EDM without a user-space
//! NAT helper. The ports come from [`SEQ_BASE`] upward, per protocol.
//!
//! `Upnp` is EIM plus miniupnpd (see `upnp.rs`): its ruleset adds the
//! `table inet filter` chains miniupnpd-nftables fills in.

use std::fmt;

/// How a gateway translates and filters traffic from its LAN.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Nat {
    /// No translation and no filter: a plain router whose LAN is a public
    /// subnet, so hosts behind it have public addresses.
    None,
    /// Port-preserving, endpoint-independent mapping (`masquerade`).
    Eim,
    /// Random port per destination (`masquerade fully-random`).
    Edm,
    /// EIM, but the only traffic allowed out is TCP to port 443: UDP is
    /// blocked entirely, as on some corporate networks.
    UdpBlocked,
    /// Endpoint-dependent mapping whose ports grow by one per new mapping,
    /// from [`SEQ_BASE`]: the case port prediction is meant for.
    EdmSequential,
    /// EIM with miniupnpd serving UPnP IGD, NAT-PMP and PCP on the LAN.
    Upnp,
    /// EIM that drops every UDP packet but lets any TCP out: the case the
    /// direct TCP path (simultaneous open) is for.
    TcpOnly,
}

/// First port an `EdmSequential` gateway hands out (per protocol).
pub const SEQ_BASE: u16 = 30000;
/// How many ports it cycles through.
pub const SEQ_LEN: u16 = 512;

/// `{ 0 : SEQ_BASE, 1 : SEQ_BASE+1, ... }`. A map rather than `numgen ...
/// offset SEQ_BASE`: the kernel takes numgen's result in host byte order
/// as a port in network order (30000, 30001 become 12405, 12661), while
/// map values are typed `inet_service` and stored the right way round.
fn sequential_port_map() -> String {
    let entries: Vec<String> = (0..SEQ_LEN)
        .map(|i| format!("{i} : {}", SEQ_BASE + i))
        .collect();
    format!("{{ {} }}", entries.join(", "))
}

/// Transport protocol of a port forward.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Proto {
    Udp,
    // No scenario forwards a TCP port yet; the NAT and UPnP code paths
    // for it stay, since a forward is the same rule for either protocol.
    #[allow(dead_code)]
    Tcp,
}

impl fmt::Display for Proto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Proto::Udp => "udp",
            Proto::Tcp => "tcp",
        })
    }
}

/// Name of the nftables table holding the NAT chains of a gateway.
pub const NAT_TABLE: &str = "wlnat";
/// Name of the nftables table holding the forward filter of a gateway.
pub const FILTER_TABLE: &str = "wlfilter";

impl Nat {
    /// Whether hosts behind this gateway get private addresses that are
    /// translated to the gateway's WAN address.
    pub fn translates(self) -> bool {
        !matches!(self, Nat::None)
    }

    /// The full nftables ruleset of a gateway of this kind whose WAN
    /// address is `wan`.
    pub fn ruleset(self, wan: std::net::Ipv4Addr) -> String {
        let masq = match self {
            Nat::None => String::new(),
            Nat::Eim | Nat::UdpBlocked | Nat::Upnp | Nat::TcpOnly => {
                "oifname \"wan\" masquerade".into()
            }
            Nat::Edm => "oifname \"wan\" masquerade fully-random".into(),
            // Ports for UDP and TCP from a counter; anything else (ICMP)
            // is plainly masqueraded.
            Nat::EdmSequential => {
                let map = sequential_port_map();
                format!(
                    "oifname \"wan\" meta l4proto udp snat ip to {wan}:numgen inc mod {SEQ_LEN} map {map}
    oifname \"wan\" meta l4proto tcp snat ip to {wan}:numgen inc mod {SEQ_LEN} map {map}
    oifname \"wan\" masquerade"
                )
            }
        };
        let outbound = match self {
            Nat::UdpBlocked => "iifname \"lan\" oifname \"wan\" tcp dport 443 accept",
            Nat::TcpOnly => "iifname \"lan\" oifname \"wan\" meta l4proto tcp accept",
            _ => "iifname \"lan\" oifname \"wan\" accept",
        };
        let upnp = match self {
            Nat::Upnp => super::upnp::RULESET,
            _ => "",
        };
        // Without NAT the gateway is a router: inbound is allowed too, as for
        // a host with a public address and no firewall.
        let inbound = match self {
            Nat::None => "iifname \"wan\" oifname \"lan\" accept",
            _ => "",
        };
        // A home router drops what nobody asked for on its WAN side. That
        // matters beyond tidiness: an unsolicited packet that is accepted
        // leaves a conntrack entry whose tuple then collides with the
        // router's own mapping when the host answers the same peer, so the
        // host's port gets remapped (hole punching between two such NATs
        // would then fail in a way real routers do not). A dropped packet's
        // entry is never confirmed.
        let input = match self {
            Nat::None => "",
            _ => "iifname \"wan\" ct state new drop",
        };
        format!(
            "table ip {NAT_TABLE} {{
  chain prerouting {{
    type nat hook prerouting priority dstnat; policy accept;
  }}
  chain postrouting {{
    type nat hook postrouting priority srcnat; policy accept;
    {masq}
  }}
}}
table inet {FILTER_TABLE} {{
  chain forward {{
    type filter hook forward priority filter; policy drop;
    ct state established,related accept
    ct status dnat accept
    {outbound}
    {inbound}
  }}
  chain input {{
    type filter hook input priority filter; policy accept;
    {input}
  }}
}}
{upnp}"
        )
    }
}

/// The nft command arguments (after `nft`) adding a port forward: traffic
/// arriving on the gateway's WAN at `public_port` goes to `to`.
pub fn forward_rule(proto: Proto, public_port: u16, to: std::net::SocketAddrV4) -> Vec<String> {
    [
        "add",
        "rule",
        "ip",
        NAT_TABLE,
        "prerouting",
        "iifname",
        "wan",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain([
        proto.to_string(),
        "dport".into(),
        public_port.to_string(),
        "dnat".into(),
        "to".into(),
        to.to_string(),
    ])
    .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rulesets_differ_where_the_kinds_do() {
        let wan = std::net::Ipv4Addr::new(11, 11, 0, 10);
        assert!(Nat::Eim.ruleset(wan).contains("masquerade\n"));
        assert!(Nat::Edm.ruleset(wan).contains("masquerade fully-random"));
        assert!(!Nat::None.ruleset(wan).contains("masquerade"));
        assert!(Nat::UdpBlocked
            .ruleset(wan)
            .contains("tcp dport 443 accept"));
        assert!(Nat::EdmSequential
            .ruleset(wan)
            .contains("snat ip to 11.11.0.10:numgen inc"));
        assert!(Nat::Upnp.ruleset(wan).contains("jump miniupnpd"));
        assert!(Nat::TcpOnly
            .ruleset(wan)
            .contains("meta l4proto tcp accept"));
        assert!(!Nat::TcpOnly.ruleset(wan).contains("udp"));
        let rule = forward_rule(Proto::Udp, 51820, "10.1.0.2:51821".parse().unwrap());
        assert_eq!(
            rule.join(" "),
            "add rule ip wlnat prerouting iifname wan udp dport 51820 dnat to 10.1.0.2:51821"
        );
    }
}
