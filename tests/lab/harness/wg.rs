//! Stock WireGuard peers for the lab: Debian's `wireguard-go` configured
//! with `wg set`, and key helpers using `wg genkey`/`wg pubkey`.
//!
//! The kernel here has no WireGuard module, so wireguard-go (user space,
//! run in the foreground with `-f`) is the reference peer: the harness
//! self-test proves the lab carries WireGuard through NAT with it, and the
//! interop test pits warren against it. Its UAPI socket directory
//! (`/var/run/wireguard`) is shared by all namespaces, so every instance
//! gets a machine-unique interface name from [`Lab::ifname`].

use std::net::SocketAddr;
use std::time::Duration;

use super::{Lab, Node};

/// A key pair in `wg`'s base64 format.
#[derive(Clone, Debug)]
pub struct KeyPair {
    pub private: String,
    pub public: String,
}

/// Generates a key pair with `wg genkey` / `wg pubkey`.
pub fn wg_keypair() -> KeyPair {
    let t = Duration::from_secs(10);
    let private = super::process::run_bounded(&["wg", "genkey"], None, t)
        .expect("run wg genkey")
        .expect_ok("wg genkey")
        .stdout
        .trim()
        .to_owned();
    let public = super::process::run_bounded(&["wg", "pubkey"], Some(private.as_bytes()), t)
        .expect("run wg pubkey")
        .expect_ok("wg pubkey")
        .stdout
        .trim()
        .to_owned();
    KeyPair { private, public }
}

/// A running wireguard-go interface in some node.
pub struct WgGo {
    pub node: Node,
    pub ifname: String,
}

impl WgGo {
    /// Starts wireguard-go in `node` with `keys`, listening on `port`, and
    /// gives the interface `cidr` (e.g. "100.64.0.1/24").
    pub fn start(lab: &Lab, node: &Node, keys: &KeyPair, port: u16, cidr: &str) -> WgGo {
        let ifname = lab.ifname();
        lab.spawn(
            node,
            &format!("wireguard-go-{}", node.name),
            &["wireguard-go", "-f", &ifname],
        );
        let sock = format!("/var/run/wireguard/{ifname}.sock");
        super::wait_for(Duration::from_secs(10), "wireguard-go UAPI socket", || {
            std::path::Path::new(&sock).exists()
        });
        let key_file = lab.write_file(&format!("{ifname}.key"), &keys.private);
        let key_file = key_file.to_string_lossy();
        let port = port.to_string();
        lab.exec(
            node,
            &[
                "wg",
                "set",
                &ifname,
                "private-key",
                &key_file,
                "listen-port",
                &port,
            ],
        )
        .expect_ok("wg set private-key");
        lab.exec(node, &["ip", "addr", "add", cidr, "dev", &ifname])
            .expect_ok("ip addr add");
        lab.exec(node, &["ip", "link", "set", &ifname, "up"])
            .expect_ok("ip link set up");
        WgGo {
            node: node.clone(),
            ifname,
        }
    }

    /// Adds a peer. `endpoint` is optional: without it wireguard-go learns
    /// the peer's address from its first authenticated packet.
    pub fn add_peer(
        &self,
        lab: &Lab,
        public: &str,
        allowed_ips: &str,
        endpoint: Option<SocketAddr>,
        keepalive: Option<u16>,
    ) {
        let mut argv = vec![
            "wg",
            "set",
            &self.ifname,
            "peer",
            public,
            "allowed-ips",
            allowed_ips,
        ];
        let ep;
        if let Some(e) = endpoint {
            ep = e.to_string();
            argv.extend(["endpoint", &ep]);
        }
        let ka;
        if let Some(k) = keepalive {
            ka = k.to_string();
            argv.extend(["persistent-keepalive", &ka]);
        }
        lab.exec(&self.node, &argv).expect_ok("wg set peer");
    }

    /// Unix time of the last handshake with `public`, if any.
    pub fn latest_handshake(&self, lab: &Lab, public: &str) -> Option<u64> {
        let out = lab.exec(
            &self.node,
            &["wg", "show", &self.ifname, "latest-handshakes"],
        );
        out.stdout.lines().find_map(|l| {
            let mut f = l.split_whitespace();
            (f.next() == Some(public))
                .then(|| f.next()?.parse::<u64>().ok())
                .flatten()
                .filter(|&t| t > 0)
        })
    }

    /// The endpoint wireguard-go currently uses for `public`, if any.
    pub fn endpoint(&self, lab: &Lab, public: &str) -> Option<SocketAddr> {
        let out = lab.exec(&self.node, &["wg", "show", &self.ifname, "endpoints"]);
        out.stdout.lines().find_map(|l| {
            let mut f = l.split_whitespace();
            (f.next() == Some(public))
                .then(|| f.next()?.parse().ok())
                .flatten()
        })
    }
}
