//! UPnP/NAT-PMP/PCP gateways: miniupnpd (Debian's 2.3.1, nftables build)
//! in a `Nat::Upnp` gateway, and a minimal NAT-PMP client for checking it.
//!
//! miniupnpd's packaged init scripts assume a whole machine, so the lab
//! creates the chains it expects itself ([`RULESET`], see LAB-NOTES) and
//! runs it in the foreground (`-d`, logs to stderr) as a lab process, with
//! its pid file in the lab directory so gateways in parallel labs do not
//! fight over `/var/run/miniupnpd.pid`.
//!
//! The NAT-PMP client (RFC 6886) is hand-written because it is twelve
//! bytes each way and an independent implementation is the point: the
//! agent's own port mapper is what gets tested against this gateway later,
//! the harness must not share its code.

use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::time::Duration;

use super::{Lab, Node, ProcId, Proto};

/// Chains miniupnpd-nftables fills in, in the table it expects. Our own
/// `wlfilter` forward chain already accepts `ct status dnat`, which is what
/// lets mapped traffic through; this chain's policy is accept.
pub const RULESET: &str = "table inet filter {
  chain forward {
    type filter hook forward priority filter; policy accept;
    jump miniupnpd
  }
  chain miniupnpd {
  }
  chain prerouting {
    type nat hook prerouting priority dstnat; policy accept;
    jump prerouting_miniupnpd
  }
  chain postrouting {
    type nat hook postrouting priority srcnat; policy accept;
    jump postrouting_miniupnpd
  }
  chain prerouting_miniupnpd {
  }
  chain postrouting_miniupnpd {
  }
}
";

/// The UDP port NAT-PMP and PCP are served on.
pub const NATPMP_PORT: u16 = 5351;

/// Writes a miniupnpd config for gateway `gw_ns` (LAN `lan_cidr`) and
/// starts it, returning once it serves NAT-PMP on `router`.
pub fn start(lab: &Lab, gw: &Node, router: Ipv4Addr, lan_cidr: &str) -> ProcId {
    let uuid = format!(
        "00000000-0000-4000-8000-{:012x}",
        u64::from(u32::from(router)) << 8
    );
    let conf = format!(
        "ext_ifname=wan
listening_ip=lan
port=0
enable_natpmp=yes
enable_upnp=yes
secure_mode=yes
system_uptime=no
uuid={uuid}
allow 1024-65535 {lan_cidr} 1024-65535
deny 0-65535 0.0.0.0/0 0-65535
"
    );
    let conf = lab.write_file(&format!("{}-miniupnpd.conf", gw.name), &conf);
    let pid = lab.dir().join(format!("{}-miniupnpd.pid", gw.name));
    let (conf, pid) = (conf.to_string_lossy(), pid.to_string_lossy());
    let proc = lab.spawn(
        gw,
        &format!("miniupnpd-{}", gw.name),
        &["miniupnpd", "-d", "-f", &conf, "-P", &pid],
    );
    let listening = format!("{router}:{NATPMP_PORT}");
    let up = super::poll_until(Duration::from_secs(10), Duration::from_millis(50), || {
        lab.exit_status(proc).is_some()
            || lab.exec(gw, &["ss", "-Hlun"]).stdout.contains(&listening)
    });
    if !up || lab.exit_status(proc).is_some() {
        panic!("miniupnpd in {} did not start:\n{}", gw.name, lab.log(proc));
    }
    proc
}

/// A NAT-PMP result: the external address, or the server's result code.
#[derive(Debug, PartialEq, Eq)]
pub enum NatPmp {
    Mapped {
        external: SocketAddrV4,
        lifetime: u32,
    },
    Refused(u16),
}

/// From a socket bound inside a LAN host's namespace (call on a
/// `Lab::thread_in` thread): asks gateway `router` for its external address,
/// then maps `internal` (the socket's port) to `suggested` for `lifetime` s.
pub fn natpmp_map(
    router: Ipv4Addr,
    proto: Proto,
    sock: &UdpSocket,
    suggested: u16,
    lifetime: u32,
) -> std::io::Result<NatPmp> {
    let gw = SocketAddrV4::new(router, NATPMP_PORT);
    let client = UdpSocket::bind("0.0.0.0:0")?;
    client.set_read_timeout(Some(Duration::from_secs(2)))?;
    client.send_to(&[0, 0], gw)?;
    let mut buf = [0u8; 16];
    let n = client.recv(&mut buf)?;
    if n < 12 || buf[1] != 128 {
        return Err(bad("external address response"));
    }
    let code = u16::from_be_bytes([buf[2], buf[3]]);
    if code != 0 {
        return Ok(NatPmp::Refused(code));
    }
    let ip = Ipv4Addr::new(buf[8], buf[9], buf[10], buf[11]);
    let op = match proto {
        Proto::Udp => 1,
        Proto::Tcp => 2,
    };
    let internal = sock.local_addr()?.port();
    let mut req = vec![0, op, 0, 0];
    req.extend(internal.to_be_bytes());
    req.extend(suggested.to_be_bytes());
    req.extend(lifetime.to_be_bytes());
    client.send_to(&req, gw)?;
    let n = client.recv(&mut buf)?;
    if n < 16 || buf[1] != 128 + op {
        return Err(bad("mapping response"));
    }
    let code = u16::from_be_bytes([buf[2], buf[3]]);
    if code != 0 {
        return Ok(NatPmp::Refused(code));
    }
    let external = u16::from_be_bytes([buf[10], buf[11]]);
    let lifetime = u32::from_be_bytes([buf[12], buf[13], buf[14], buf[15]]);
    Ok(NatPmp::Mapped {
        external: SocketAddrV4::new(ip, external),
        lifetime,
    })
}

fn bad(what: &str) -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::InvalidData,
        format!("NAT-PMP: malformed {what}"),
    )
}
