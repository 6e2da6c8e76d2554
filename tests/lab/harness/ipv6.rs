//! A routed IPv6 internet laid over the lab's IPv4 one, for tests of
//! direct paths over IPv6.
//!
//! The lab is built IPv4 first (NAT is an IPv4 affair); IPv6 is added per
//! node afterwards, on the same links, so a test picks which nodes get it.
//! The addresses come from 2001:db8::/32: the documentation prefix is what
//! a global address looks like to the agent (it only sets aside loopback,
//! link-local and ULA), and nothing in it is routed anywhere, so the lab
//! stays closed even if a route leaked.
//!
//! - The internet namespace's bridge is `2001:db8::1/64`; a node on the
//!   internet segment whose IPv4 address ends in `.N` gets `2001:db8::N`.
//! - Gateway LAN number `L` (the `L` of 10.L.0.0/24) is `2001:db8:L::/64`,
//!   routed to the gateway without translation, as ISPs delegate a prefix
//!   to a home router. The gateway's `inet` forward filter (policy drop,
//!   replies and LAN-to-WAN only) then acts as the stateful IPv6 firewall
//!   every home router has: nothing unsolicited comes in, so two hosts
//!   still have to punch, but no port changes on the way.
//!
//! Addresses are added with `nodad`: duplicate address detection would
//! keep them tentative (unusable) for a second or two, for nothing in a
//! lab that hands out each address once. In a child module of the lab so
//! it can read the lab's private layout (internet namespace, LAN numbers).

use std::net::Ipv6Addr;

use super::netns::{must, sysctl};
use super::{Lab, Node};

/// The internet namespace's address on the public segment.
pub const INTERNET_ROUTER6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1);

impl Lab {
    /// Gives the internet namespace its IPv6 address and forwarding. Call
    /// once, before any other IPv6 setup.
    pub fn ipv6_internet(&self) {
        let r = format!("{INTERNET_ROUTER6}/64");
        must(&[
            "ip",
            "-n",
            &self.internet,
            "addr",
            "add",
            &r,
            "dev",
            "br0",
            "nodad",
        ]);
        sysctl(&self.internet, "net.ipv6.conf.all.forwarding=1");
    }

    /// Gives `node`, which sits on the internet segment (a public host or
    /// a gateway's WAN), its IPv6 address and default route; returns the
    /// address. For a gateway, also routes its LAN's /64 to it and turns on
    /// forwarding: hosts behind it then get global addresses with
    /// [`Lab::ipv6_host`].
    pub fn ipv6_public(&self, node: &Node) -> Ipv6Addr {
        let ip = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, node.ip.octets()[3].into());
        add_addr(&node.ns, "wan", ip, 64);
        let via = INTERNET_ROUTER6.to_string();
        must(&[
            "ip", "-6", "-n", &node.ns, "route", "add", "default", "via", &via,
        ]);
        if let Some(lan) = &node.lan {
            let router = lan_prefix(lan.prefix[1], 1);
            add_addr(&node.ns, "lan", router, 64);
            sysctl(&node.ns, "net.ipv6.conf.all.forwarding=1");
            let net = format!("{}/64", lan_prefix(lan.prefix[1], 0));
            let via = ip.to_string();
            must(&[
                "ip",
                "-6",
                "-n",
                &self.internet,
                "route",
                "add",
                &net,
                "via",
                &via,
            ]);
        }
        ip
    }

    /// Gives `host`, on `gateway`'s LAN, a global IPv6 address in the
    /// LAN's /64 and a default route through the gateway; returns it.
    /// [`Lab::ipv6_public`] must have been called for the gateway.
    pub fn ipv6_host(&self, gateway: &Node, host: &Node) -> Ipv6Addr {
        let lan = gateway.lan.as_ref().expect("lab: not a gateway");
        let ip = Ipv6Addr::from(
            u128::from(lan_prefix(lan.prefix[1], 0)) | u128::from(host.ip.octets()[3]),
        );
        add_addr(&host.ns, "wan", ip, 64);
        let via = lan_prefix(lan.prefix[1], 1).to_string();
        must(&[
            "ip", "-6", "-n", &host.ns, "route", "add", "default", "via", &via,
        ]);
        ip
    }
}

/// `2001:db8:L::host`.
fn lan_prefix(lan: u8, host: u16) -> Ipv6Addr {
    Ipv6Addr::new(0x2001, 0xdb8, lan.into(), 0, 0, 0, 0, host)
}

fn add_addr(ns: &str, dev: &str, ip: Ipv6Addr, len: u8) {
    let cidr = format!("{ip}/{len}");
    must(&["ip", "-n", ns, "addr", "add", &cidr, "dev", dev, "nodad"]);
}
