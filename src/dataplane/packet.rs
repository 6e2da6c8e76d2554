//! Just enough IP header parsing for routing: the version, the source and
//! the destination address of a packet read from the TUN device.
//!
//! Hand-written because it is a dozen lines and sits on the hot path; a
//! full packet-parsing crate would decode far more than we look at.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Destination address of an IPv4 or IPv6 packet, or `None` when the packet
/// is too short or not IP.
pub fn destination(packet: &[u8]) -> Option<IpAddr> {
    match packet.first()? >> 4 {
        4 => {
            let b: [u8; 4] = packet.get(16..20)?.try_into().ok()?;
            Some(IpAddr::V4(Ipv4Addr::from(b)))
        }
        6 => {
            let b: [u8; 16] = packet.get(24..40)?.try_into().ok()?;
            Some(IpAddr::V6(Ipv6Addr::from(b)))
        }
        _ => None,
    }
}

/// Source address, same rules as [`destination`].
pub fn source(packet: &[u8]) -> Option<IpAddr> {
    match packet.first()? >> 4 {
        4 => {
            let b: [u8; 4] = packet.get(12..16)?.try_into().ok()?;
            Some(IpAddr::V4(Ipv4Addr::from(b)))
        }
        6 => {
            let b: [u8; 16] = packet.get(8..24)?.try_into().ok()?;
            Some(IpAddr::V6(Ipv6Addr::from(b)))
        }
        _ => None,
    }
}

pub mod build {
    //! Minimal packet builders for tests and the simulator (`tests/sim`).
    use std::net::Ipv4Addr;

    /// An IPv4/UDP-shaped packet with a valid header length field.
    pub fn ipv4(src: Ipv4Addr, dst: Ipv4Addr, payload: &[u8]) -> Vec<u8> {
        let total = 20 + payload.len();
        let mut p = vec![0u8; 20];
        p[0] = 0x45;
        p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
        p[8] = 64;
        p[9] = 17;
        p[12..16].copy_from_slice(&src.octets());
        p[16..20].copy_from_slice(&dst.octets());
        let mut sum: u32 = 0;
        for c in p.chunks(2) {
            sum += u32::from(u16::from_be_bytes([c[0], c[1]]));
        }
        while sum > 0xffff {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        p[10..12].copy_from_slice(&(!(sum as u16)).to_be_bytes());
        p.extend_from_slice(payload);
        p
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_v4_and_v6() {
        let p = build::ipv4([100, 64, 0, 1].into(), [100, 64, 0, 2].into(), b"hi");
        assert_eq!(destination(&p), Some("100.64.0.2".parse().unwrap()));
        assert_eq!(source(&p), Some("100.64.0.1".parse().unwrap()));
        let mut v6 = vec![0u8; 40];
        v6[0] = 0x60;
        v6[39] = 1;
        assert_eq!(destination(&v6), Some("::1".parse().unwrap()));
    }

    #[test]
    fn short_or_garbage_is_none() {
        assert_eq!(destination(&[]), None);
        assert_eq!(destination(&[0x45, 0, 0]), None);
        assert_eq!(destination(&[0x10; 60]), None);
        assert_eq!(source(&[0x60; 20]), None);
    }
}
