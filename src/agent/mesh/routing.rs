//! The host side of subnet routes (README, "Subnet routers and exit
//! nodes"): kernel routes to the TUN device for the prefixes peers carry,
//! and, on a subnet router, forwarding with source NAT for the prefixes it
//! serves. The decisions are the agent state's (`state::subnets`); this
//! only applies them and undoes them on exit.
//!
//! Kernel routes go through netlink (`route_manager`, the routing crate of
//! tun-rs's author). Source NAT is one nftables table of our own,
//! `warren`, loaded with `nft -f -` when the served set changes (never per
//! packet) and deleted on exit: no Rust crate drives nftables without the
//! `nft` binary either (the `nftables` crate shells out to it too), and a
//! one-table ruleset is clearer as nft's own text than as its JSON.
//! Forwarding itself is the kernel's; `net.ipv{4,6}.ip_forward` is checked,
//! never changed, and a clear error says what to set when it is off.

use std::collections::BTreeSet;
use std::io::Write as _;
use std::process::{Command, Stdio};

use ipnet::IpNet;
use route_manager::{Route, RouteManager};

use crate::control::bounds::OVERLAY_V4;

/// The nftables table warren's source NAT lives in.
const NFT_TABLE: &str = "warren";

/// The kernel routes this agent installed, and its NAT table.
#[derive(Debug, Default)]
pub struct HostRoutes {
    /// The TUN device's index and name.
    ifindex: u32,
    ifname: String,
    installed: BTreeSet<IpNet>,
    nat: bool,
    /// Why forwarding cannot work, for `status`.
    pub problem: Option<String>,
}

fn route_of(net: &IpNet, ifindex: u32) -> Route {
    Route::new(net.network(), net.prefix_len()).with_if_index(ifindex)
}

impl HostRoutes {
    /// Nothing installed yet, for the TUN device `ifname` (index `ifindex`).
    pub fn new(ifindex: u32, ifname: String) -> HostRoutes {
        HostRoutes {
            ifindex,
            ifname,
            ..HostRoutes::default()
        }
    }

    /// Routes exactly `wanted` to the TUN device.
    pub fn apply(&mut self, wanted: &[IpNet]) {
        let wanted: BTreeSet<IpNet> = wanted.iter().copied().collect();
        let mut rm = match RouteManager::new() {
            Ok(rm) => rm,
            Err(e) => {
                tracing::error!(error = %e, "cannot open netlink for routes");
                return;
            }
        };
        for net in self.installed.difference(&wanted) {
            if let Err(e) = rm.delete(&route_of(net, self.ifindex)) {
                tracing::warn!(%net, error = %e, "removing a subnet route");
            }
        }
        for net in wanted.difference(&self.installed) {
            match rm.add(&route_of(net, self.ifindex)) {
                Ok(()) => tracing::info!(%net, dev = %self.ifname, "subnet route installed"),
                // Already there (a restart): ours all the same.
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => tracing::warn!(%net, error = %e, "adding a subnet route"),
            }
        }
        self.installed = wanted;
    }

    /// Serves `served` (this node is their subnet router): a check that
    /// the kernel forwards, and with `snat` source NAT of tunnel traffic
    /// leaving by any other interface. An empty set (or `snat` off)
    /// removes the NAT table.
    pub fn serve(&mut self, served: &[IpNet], ula: Option<ipnet::Ipv6Net>, snat: bool) {
        if (served.is_empty() || !snat) && self.nat {
            self.remove_nat();
        }
        if served.is_empty() {
            self.problem = None;
            return;
        }
        self.problem = forwarding_problem(served);
        if let Some(p) = &self.problem {
            tracing::error!("{p}");
        }
        if !snat {
            tracing::info!(routes = ?served, "serving subnet routes, without source NAT");
            return;
        }
        let ruleset = nat_ruleset(&self.ifname, ula);
        match nft(&ruleset) {
            Ok(()) => {
                self.nat = true;
                tracing::info!(routes = ?served, "serving subnet routes, with source NAT");
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot install the source NAT (nft)");
                self.problem = Some(format!("source NAT not installed: {e}"));
            }
        }
    }

    /// Removes a NAT table a previous run left behind (killed before it
    /// could clean up); the state re-installs it if this node still
    /// serves routes. No table, or no `nft` at all, is the usual case.
    pub fn forget_stale(&mut self) {
        let _ = nft(&format!(
            "table inet {NFT_TABLE} {{}}\ndelete table inet {NFT_TABLE}\n"
        ));
        self.nat = false;
    }

    /// Undoes everything (the agent stops).
    pub fn clear(&mut self) {
        self.apply(&[]);
        if self.nat {
            self.remove_nat();
        }
    }

    fn remove_nat(&mut self) {
        if let Err(e) = nft(&format!("delete table inet {NFT_TABLE}\n")) {
            tracing::warn!(error = %e, "removing the source NAT table");
        }
        self.nat = false;
    }
}

/// The NAT table: tunnel sources (the overlay's /10 and the network's /48)
/// leaving by an interface other than the tunnel are masqueraded to that
/// interface's address. Flushed and refilled as one transaction.
pub fn nat_ruleset(ifname: &str, ula: Option<ipnet::Ipv6Net>) -> String {
    let v6 = ula
        .map(|u| format!("        oifname != \"{ifname}\" ip6 saddr {u} masquerade\n"))
        .unwrap_or_default();
    format!(
        "table inet {NFT_TABLE} {{}}\n\
         delete table inet {NFT_TABLE}\n\
         table inet {NFT_TABLE} {{\n    \
             chain postrouting {{\n        \
                 type nat hook postrouting priority srcnat; policy accept;\n        \
                 oifname != \"{ifname}\" ip saddr {OVERLAY_V4} masquerade\n\
         {v6}    }}\n\
         }}\n"
    )
}

fn nft(ruleset: &str) -> std::io::Result<()> {
    let mut child = Command::new("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(ruleset.as_bytes())?;
    }
    let out = child.wait_with_output()?;
    if out.status.success() {
        Ok(())
    } else {
        Err(std::io::Error::other(
            String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        ))
    }
}

/// What stops the kernel from forwarding `served`, if anything.
fn forwarding_problem(served: &[IpNet]) -> Option<String> {
    let off = |path: &str| std::fs::read_to_string(path).is_ok_and(|v| v.trim() == "0");
    let mut missing = Vec::new();
    if served.iter().any(|n| n.addr().is_ipv4()) && off("/proc/sys/net/ipv4/ip_forward") {
        missing.push("net.ipv4.ip_forward=1");
    }
    if served.iter().any(|n| n.addr().is_ipv6()) && off("/proc/sys/net/ipv6/conf/all/forwarding") {
        missing.push("net.ipv6.conf.all.forwarding=1");
    }
    (!missing.is_empty()).then(|| {
        format!(
            "IP forwarding is off, so the routes this node serves carry nothing: set {} \
             (sysctl -w, and in /etc/sysctl.d/ to keep it)",
            missing.join(" and ")
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_nat_table_masquerades_tunnel_sources_leaving_elsewhere() {
        let ula = "fd7a:115c:a1e0::/48".parse().ok();
        let r = nat_ruleset("warren0", ula);
        assert!(
            r.contains("oifname != \"warren0\" ip saddr 100.64.0.0/10 masquerade"),
            "{r}"
        );
        assert!(
            r.contains("ip6 saddr fd7a:115c:a1e0::/48 masquerade"),
            "{r}"
        );
        assert!(
            r.starts_with("table inet warren {}\ndelete table inet warren\n"),
            "{r}"
        );
        assert!(!nat_ruleset("warren0", None).contains("ip6"));
    }
}
