//! What the packet filter needs to know of a packet: protocol, addresses,
//! ports (or the ICMP echo id), and, for an ICMP error, the flow of the
//! packet it is about.
//!
//! Hand-written like `packet.rs`, for the same reason: it reads a handful
//! of fixed offsets on the hot path, and every length is checked, since
//! the packet came from a peer (a short or lying header is `None`, which
//! the filter drops).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::policy::filter::Flow;
use crate::policy::selector::{ICMP, ICMPV6, SCTP, TCP, UDP};

/// A packet as the filter sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Parsed {
    pub flow: Flow,
    pub kind: Kind,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// TCP, UDP, SCTP, an ICMP echo (ports are the echo id), or another
    /// protocol (ports zero).
    Plain,
    /// A TCP segment with SYN and not ACK: it opens a connection.
    TcpSyn,
    /// An ICMP echo request (its reply is [`Kind::Plain`]).
    EchoRequest,
    /// An ICMP error quoting a packet of `inner`'s flow.
    IcmpError { inner: Flow },
    /// A fragment after the first: it carries no ports.
    Fragment,
}

const V6_HOP_BY_HOP: u8 = 0;
const V6_ROUTING: u8 = 43;
const V6_FRAGMENT: u8 = 44;
const V6_DEST_OPTS: u8 = 60;

/// Parses an IPv4 or IPv6 packet; `None` if it is not one or is cut short.
pub fn parse(packet: &[u8]) -> Option<Parsed> {
    parse_depth(packet, true)
}

fn parse_depth(packet: &[u8], outer: bool) -> Option<Parsed> {
    let (proto, src, dst, l4, fragment) = match packet.first()? >> 4 {
        4 => {
            let ihl = usize::from(packet.first()? & 0x0f) * 4;
            if ihl < 20 || packet.len() < ihl {
                return None;
            }
            let frag = u16::from_be_bytes([*packet.get(6)?, *packet.get(7)?]) & 0x1fff;
            let src: [u8; 4] = packet.get(12..16)?.try_into().ok()?;
            let dst: [u8; 4] = packet.get(16..20)?.try_into().ok()?;
            (
                *packet.get(9)?,
                IpAddr::V4(Ipv4Addr::from(src)),
                IpAddr::V4(Ipv4Addr::from(dst)),
                packet.get(ihl..)?,
                frag != 0,
            )
        }
        6 => {
            let src: [u8; 16] = packet.get(8..24)?.try_into().ok()?;
            let dst: [u8; 16] = packet.get(24..40)?.try_into().ok()?;
            let (proto, l4, fragment) = v6_payload(*packet.get(6)?, packet.get(40..)?)?;
            (
                proto,
                IpAddr::V6(Ipv6Addr::from(src)),
                IpAddr::V6(Ipv6Addr::from(dst)),
                l4,
                fragment,
            )
        }
        _ => return None,
    };
    let mut flow = Flow {
        proto,
        src,
        dst,
        src_port: 0,
        dst_port: 0,
    };
    if fragment {
        return Some(Parsed {
            flow,
            kind: Kind::Fragment,
        });
    }
    let kind = match proto {
        TCP | UDP | SCTP => {
            // A quoted packet in an ICMP error may keep only 8 bytes of its
            // transport header: the ports are in the first 4.
            flow.src_port = u16::from_be_bytes([*l4.first()?, *l4.get(1)?]);
            flow.dst_port = u16::from_be_bytes([*l4.get(2)?, *l4.get(3)?]);
            match (proto, l4.get(13)) {
                (TCP, Some(flags)) if flags & 0x12 == 0x02 => Kind::TcpSyn,
                (TCP, None) if outer => return None,
                _ => Kind::Plain,
            }
        }
        ICMP | ICMPV6 => {
            let t = *l4.first()?;
            let (request, reply, error) = if proto == ICMP {
                (t == 8, t == 0, matches!(t, 3 | 4 | 5 | 11 | 12))
            } else {
                (t == 128, t == 129, matches!(t, 1..=4))
            };
            if request || reply {
                let id = u16::from_be_bytes([*l4.get(4)?, *l4.get(5)?]);
                flow.src_port = id;
                flow.dst_port = id;
            }
            if request {
                Kind::EchoRequest
            } else if error && outer {
                let inner = parse_depth(l4.get(8..)?, false)?;
                Kind::IcmpError { inner: inner.flow }
            } else {
                Kind::Plain
            }
        }
        _ => Kind::Plain,
    };
    Some(Parsed { flow, kind })
}

/// Skips the IPv6 extension headers a transport header may follow.
fn v6_payload(mut next: u8, mut rest: &[u8]) -> Option<(u8, &[u8], bool)> {
    for _ in 0..8 {
        match next {
            V6_HOP_BY_HOP | V6_ROUTING | V6_DEST_OPTS => {
                let len = (usize::from(*rest.get(1)?) + 1) * 8;
                next = *rest.first()?;
                rest = rest.get(len..)?;
            }
            V6_FRAGMENT => {
                let offset = u16::from_be_bytes([*rest.get(2)?, *rest.get(3)?]) >> 3;
                next = *rest.first()?;
                rest = rest.get(8..)?;
                if offset != 0 {
                    return Some((next, rest, true));
                }
            }
            _ => return Some((next, rest, false)),
        }
    }
    None
}

#[cfg(test)]
pub(crate) mod build {
    //! Packets for the filter's tests.
    use std::net::Ipv4Addr;

    fn v4(proto: u8, src: Ipv4Addr, dst: Ipv4Addr, l4: &[u8]) -> Vec<u8> {
        let mut p = vec![0u8; 20];
        p[0] = 0x45;
        p[2..4].copy_from_slice(&((20 + l4.len()) as u16).to_be_bytes());
        p[8] = 64;
        p[9] = proto;
        p[12..16].copy_from_slice(&src.octets());
        p[16..20].copy_from_slice(&dst.octets());
        p.extend_from_slice(l4);
        p
    }

    /// A TCP segment; `syn` alone opens, `ack` answers.
    pub fn tcp(
        src: Ipv4Addr,
        sport: u16,
        dst: Ipv4Addr,
        dport: u16,
        syn: bool,
        ack: bool,
    ) -> Vec<u8> {
        let mut h = vec![0u8; 20];
        h[0..2].copy_from_slice(&sport.to_be_bytes());
        h[2..4].copy_from_slice(&dport.to_be_bytes());
        h[12] = 5 << 4;
        h[13] = u8::from(syn) << 1 | u8::from(ack) << 4;
        v4(6, src, dst, &h)
    }

    pub fn udp(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16) -> Vec<u8> {
        let mut h = vec![0u8; 8];
        h[0..2].copy_from_slice(&sport.to_be_bytes());
        h[2..4].copy_from_slice(&dport.to_be_bytes());
        v4(17, src, dst, &h)
    }

    /// ICMP echo request (`request`) or reply with identifier `id`.
    pub fn echo(src: Ipv4Addr, dst: Ipv4Addr, id: u16, request: bool) -> Vec<u8> {
        let mut h = vec![0u8; 8];
        h[0] = if request { 8 } else { 0 };
        h[4..6].copy_from_slice(&id.to_be_bytes());
        v4(1, src, dst, &h)
    }

    /// An ICMP "port unreachable" from `src` quoting `quoted`.
    pub fn unreachable(src: Ipv4Addr, dst: Ipv4Addr, quoted: &[u8]) -> Vec<u8> {
        let mut h = vec![0u8; 8];
        h[0] = 3;
        h[1] = 3;
        h.extend_from_slice(&quoted[..quoted.len().min(28)]);
        v4(1, src, dst, &h)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: Ipv4Addr = Ipv4Addr::new(100, 64, 0, 1);
    const B: Ipv4Addr = Ipv4Addr::new(100, 64, 0, 2);

    #[test]
    fn reads_ports_syn_echo_and_quoted_flows() {
        let syn = parse(&build::tcp(A, 4000, B, 22, true, false)).unwrap();
        assert_eq!(
            (syn.flow.src_port, syn.flow.dst_port, syn.kind),
            (4000, 22, Kind::TcpSyn)
        );
        let ack = parse(&build::tcp(B, 22, A, 4000, true, true)).unwrap();
        assert_eq!(ack.kind, Kind::Plain);
        let ping = parse(&build::echo(A, B, 7, true)).unwrap();
        assert_eq!((ping.flow.dst_port, ping.kind), (7, Kind::EchoRequest));
        let udp = build::udp(A, 5000, B, 53);
        let err = parse(&build::unreachable(B, A, &udp)).unwrap();
        let Kind::IcmpError { inner } = err.kind else {
            panic!("{err:?}")
        };
        assert_eq!((inner.src, inner.dst_port), (IpAddr::V4(A), 53));
    }

    #[test]
    fn short_and_lying_headers_are_none_never_a_panic() {
        let good = build::tcp(A, 1, B, 2, true, false);
        for cut in 0..good.len() - 1 {
            let _ = parse(&good[..cut]);
        }
        assert!(
            parse(&good[..30]).is_none(),
            "TCP header cut before the flags"
        );
        let mut bad_ihl = good.clone();
        bad_ihl[0] = 0x4f;
        assert!(parse(&bad_ihl).is_none());
        let mut v6 = vec![0u8; 48];
        v6[0] = 0x60;
        v6[6] = V6_HOP_BY_HOP;
        v6[41] = 200;
        assert!(
            parse(&v6).is_none(),
            "extension header longer than the packet"
        );
    }

    #[test]
    fn later_fragments_carry_no_ports() {
        let mut p = build::udp(A, 5000, B, 53);
        p[6] = 0x00;
        p[7] = 0x10;
        assert_eq!(parse(&p).unwrap().kind, Kind::Fragment);
    }
}
