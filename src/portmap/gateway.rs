//! Finding the default gateway, which NAT-PMP and PCP must be sent to.
//!
//! Hand-written on purpose: on Linux the answer is one line of
//! `/proc/net/route` (IPv4) or `/proc/net/ipv6_route` (IPv6), and the crates
//! that do this portably (netdev, default-net) bring an interface-enumeration
//! stack we would not otherwise use. Parsing is pure and tested on captured
//! text; only [`default_gateway_v4`]/[`default_gateway_v6`] read the files.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};

/// `RTF_GATEWAY` from `<linux/route.h>`: the route goes through a next hop.
const RTF_GATEWAY: u32 = 0x0002;
/// `RTF_UP`.
const RTF_UP: u32 = 0x0001;

/// The IPv4 default gateway from `/proc/net/route` text: the up, gateway
/// route to 0.0.0.0/0 with the lowest metric.
pub fn parse_ipv4_route(text: &str) -> Option<Ipv4Addr> {
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            // Iface Destination Gateway Flags RefCnt Use Metric Mask ...
            if f.len() < 8 || f[1] != "00000000" || f[7] != "00000000" {
                return None;
            }
            let flags = u32::from_str_radix(f[3], 16).ok()?;
            if flags & (RTF_UP | RTF_GATEWAY) != RTF_UP | RTF_GATEWAY {
                return None;
            }
            // The kernel prints the address as a native-endian u32; on the
            // little-endian machines we ship for that means reversed octets.
            let raw = u32::from_str_radix(f[2], 16).ok()?;
            let metric: u32 = f[6].parse().ok()?;
            Some((metric, Ipv4Addr::from(raw.to_ne_bytes())))
        })
        .min_by_key(|&(metric, _)| metric)
        .map(|(_, gw)| gw)
}

/// The IPv6 default gateway from `/proc/net/ipv6_route` text: a route to
/// ::/0 with a non-zero next hop, lowest metric first. Link-local next hops
/// come with the interface name, needed as the scope.
pub fn parse_ipv6_route(text: &str) -> Option<(Ipv6Addr, String)> {
    text.lines()
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            // dest dest_len src src_len next_hop metric refcnt use flags iface
            if f.len() < 10 || f[1] != "00" || f[0].chars().any(|c| c != '0') {
                return None;
            }
            let hop = parse_hex_v6(f[4])?;
            let flags = u32::from_str_radix(f[8], 16).ok()?;
            if hop.is_unspecified() || flags & RTF_UP == 0 {
                return None;
            }
            let metric = u32::from_str_radix(f[5], 16).ok()?;
            Some((metric, hop, f[9].to_owned()))
        })
        .min_by_key(|(metric, _, _)| *metric)
        .map(|(_, hop, iface)| (hop, iface))
}

fn parse_hex_v6(s: &str) -> Option<Ipv6Addr> {
    if s.len() != 32 {
        return None;
    }
    u128::from_str_radix(s, 16).ok().map(Ipv6Addr::from)
}

/// The IPv4 default gateway of this host, if any.
pub fn default_gateway_v4() -> io::Result<Option<Ipv4Addr>> {
    Ok(parse_ipv4_route(&read_proc_net("route")?))
}

/// The IPv6 default gateway of this host and its interface, if any.
pub fn default_gateway_v6() -> io::Result<Option<(Ipv6Addr, String)>> {
    Ok(parse_ipv6_route(&read_proc_net("ipv6_route")?))
}

/// `/proc/net` is the *process's* network namespace; a thread that entered
/// another namespace (setns) must read `/proc/thread-self/net`. Old kernels
/// (< 3.17) lack it, so fall back.
fn read_proc_net(file: &str) -> io::Result<String> {
    std::fs::read_to_string(format!("/proc/thread-self/net/{file}"))
        .or_else(|_| std::fs::read_to_string(format!("/proc/net/{file}")))
}

/// The source address the kernel would use to reach `dest`. Connecting a
/// UDP socket only consults the routing table; nothing is sent.
pub fn local_ip_towards(dest: IpAddr) -> io::Result<IpAddr> {
    let bind: SocketAddr = match dest {
        IpAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        IpAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let socket = UdpSocket::bind(bind)?;
    // Marked, so the lookup is the underlay's even under an exit node.
    crate::sockmark::apply(&socket);
    // Any port will do for a route lookup; 9 is "discard".
    socket.connect((dest, 9))?;
    Ok(socket.local_addr()?.ip())
}

#[cfg(test)]
mod tests {
    use super::*;

    const ROUTE: &str = "\
Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT
eth0\t00000000\t0101A8C0\t0003\t0\t0\t600\t00000000\t0\t0\t0
eth0\t0001A8C0\t00000000\t0001\t0\t0\t600\t00FFFFFF\t0\t0\t0
wg0\t00000000\t0100000A\t0003\t0\t0\t50\t00000000\t0\t0\t0
tun0\t00000000\t00000000\t0001\t0\t0\t10\t00000000\t0\t0\t0
";

    #[test]
    fn ipv4_default_route_lowest_metric_with_gateway() {
        // tun0 has the lowest metric but no gateway flag: skipped.
        let gw = parse_ipv4_route(ROUTE);
        if cfg!(target_endian = "little") {
            assert_eq!(gw, Some(Ipv4Addr::new(10, 0, 0, 1)));
        }
        let only_eth = ROUTE.replace("wg0", "#").replace("\t50\t", "\t900\t");
        if cfg!(target_endian = "little") {
            assert_eq!(
                parse_ipv4_route(&only_eth),
                Some(Ipv4Addr::new(192, 168, 1, 1))
            );
        }
    }

    #[test]
    fn ipv4_no_default_route() {
        let text = ROUTE
            .lines()
            .filter(|l| !l.contains("\t00000000\t0"))
            .collect::<Vec<_>>()
            .join("\n");
        assert_eq!(parse_ipv4_route(&text), None);
        assert_eq!(parse_ipv4_route(""), None);
        assert_eq!(parse_ipv4_route("header\ngarbage line\n"), None);
    }

    const ROUTE6: &str = "\
fe800000000000000000000000000000 40 00000000000000000000000000000000 00 00000000000000000000000000000000 00000100 00000001 00000000 00000001     eth0
00000000000000000000000000000000 00 00000000000000000000000000000000 00 fe800000000000000000000000000001 00000400 00000001 00000000 00000003     eth0
00000000000000000000000000000000 00 00000000000000000000000000000000 00 00000000000000000000000000000000 ffffffff 00000001 00000000 00200200       lo
";

    #[test]
    fn ipv6_default_route() {
        let (hop, iface) = parse_ipv6_route(ROUTE6).unwrap();
        assert_eq!(hop, "fe80::1".parse::<Ipv6Addr>().unwrap());
        assert_eq!(iface, "eth0");
        let no_default: String = ROUTE6.lines().take(1).collect();
        assert_eq!(parse_ipv6_route(&no_default), None);
    }

    #[test]
    fn reading_this_host_does_not_fail() {
        // The files exist on any Linux; whether a default route exists
        // depends on the machine, so only the IO path is checked.
        default_gateway_v4().unwrap();
        default_gateway_v6().unwrap();
        assert!(local_ip_towards(IpAddr::V4(Ipv4Addr::LOCALHOST))
            .unwrap()
            .is_loopback());
    }
}
