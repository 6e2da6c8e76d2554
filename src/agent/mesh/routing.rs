//! The host side of subnet routes and exit nodes (README, "Subnet routers
//! and exit nodes"; `docs/architecture.md`, "Routing without loops"):
//! kernel routes into the TUN device for the prefixes peers carry, the
//! policy-routing rules that keep warren's own traffic out of them
//! (`rules.rs`), and, on a subnet router or exit node, forwarding with
//! source NAT for what it serves. The decisions are the agent state's
//! (`state::subnets`); this only applies them and undoes them on exit.
//!
//! Kernel routes go through netlink (`route_manager`, the routing crate of
//! tun-rs's author) into warren's own table (`sockmark::TABLE`), never the
//! main one: the main table stays the host's, and warren's marked sockets
//! keep using it. Source NAT is one nftables table of our own,
//! `warren`, loaded with `nft -f -` when the served set changes (never per
//! packet) and deleted on exit: no Rust crate drives nftables without the
//! `nft` binary either (the `nftables` crate shells out to it too), and a
//! one-table ruleset is clearer as nft's own text than as its JSON.
//! Forwarding itself is the kernel's; `net.ipv{4,6}.ip_forward` is checked,
//! never changed, and a clear error says what to set when it is off.

use std::collections::BTreeSet;
use std::io::Write as _;
use std::net::IpAddr;
use std::process::{Command, Stdio};

use ipnet::IpNet;
use route_manager::{Route, RouteManager};

use super::rules::{self, Rule};
use crate::control::bounds::OVERLAY_V4;
use crate::sockmark::TABLE;

/// The nftables table warren's source NAT lives in.
const NFT_TABLE: &str = "warren";

/// The kernel routes and rules this agent installed, and its NAT table.
#[derive(Debug, Default)]
pub struct HostRoutes {
    /// The TUN device's index and name.
    ifindex: u32,
    ifname: String,
    /// Prefixes routed into the TUN device in warren's table.
    installed: BTreeSet<IpNet>,
    /// The rules in force (empty while the table is).
    rules: Vec<Rule>,
    /// The coordinator's addresses, which stay on the main table.
    coordinator: Vec<IpAddr>,
    /// Local networks kept off an exit node.
    lan: Vec<IpNet>,
    /// This node's overlay addresses: the source of what it sends by these
    /// routes. Without it the kernel would take the TUN's first address,
    /// which may be the resolver's (100.100.100.100), and peers refuse a
    /// source that is not the node's.
    sources: (Option<std::net::Ipv4Addr>, Option<std::net::Ipv6Addr>),
    nat: bool,
    /// Why forwarding cannot work, for `status`.
    pub problem: Option<String>,
}

fn route_of(net: &IpNet, ifindex: u32) -> Route {
    Route::new(net.network(), net.prefix_len())
        .with_if_index(ifindex)
        .with_table(TABLE)
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

    /// Routes exactly `wanted` into the TUN device, keeping `lan` off it.
    pub fn apply(&mut self, wanted: &[IpNet], lan: &[IpNet]) {
        let wanted: BTreeSet<IpNet> = wanted.iter().copied().collect();
        lan.clone_into(&mut self.lan);
        let mut rm = match RouteManager::new() {
            Ok(rm) => rm,
            Err(e) => {
                tracing::error!(error = %e, "cannot open netlink for routes");
                return;
            }
        };
        // Rules go before the routes they lead to are removed, and after
        // those they lead to are added: never a moment where the table
        // rule catches traffic the table cannot route yet.
        if wanted.is_empty() {
            self.installed_rules(Vec::new());
        }
        for net in self.installed.difference(&wanted) {
            if let Err(e) = rm.delete(&route_of(net, self.ifindex)) {
                tracing::warn!(%net, error = %e, "removing a route");
            }
        }
        for net in wanted.difference(&self.installed) {
            let src = match net {
                IpNet::V4(_) => self.sources.0.map(IpAddr::V4),
                IpNet::V6(_) => self.sources.1.map(IpAddr::V6),
            };
            let route = route_of(net, self.ifindex);
            let route = match src {
                Some(ip) => route.with_pref_source(ip),
                None => route,
            };
            match rm.add(&route) {
                Ok(()) => {
                    tracing::info!(%net, dev = %self.ifname, table = TABLE, "route installed")
                }
                // Already there (a restart): ours all the same.
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => tracing::warn!(%net, error = %e, "adding a route"),
            }
        }
        self.installed = wanted;
        self.sync_rules();
    }

    /// This node's overlay addresses, the source of what goes by warren's
    /// routes: routes installed with other ones are installed again.
    pub fn set_sources(&mut self, v4: std::net::Ipv4Addr, v6: std::net::Ipv6Addr) {
        if self.sources == (Some(v4), Some(v6)) {
            return;
        }
        self.sources = (Some(v4), Some(v6));
        let routes: Vec<IpNet> = self.installed.iter().copied().collect();
        let lan = self.lan.clone();
        if !routes.is_empty() {
            self.apply(&[], &lan);
            self.apply(&routes, &lan);
        }
    }

    /// The coordinator's addresses (resolved from its URL, and the proxy's
    /// when one is set): traffic to them stays on the main table.
    pub fn set_coordinator(&mut self, mut addrs: Vec<IpAddr>) {
        addrs.sort();
        addrs.dedup();
        if addrs != self.coordinator {
            self.coordinator = addrs;
            self.sync_rules();
        }
    }

    fn sync_rules(&mut self) {
        let wanted = if self.installed.is_empty() {
            Vec::new()
        } else {
            rules::wanted(&self.coordinator, &self.lan)
        };
        self.installed_rules(wanted);
    }

    /// Makes the rules in force exactly `wanted`: new ones added in order
    /// of priority (the table's last), old ones removed from the table's.
    fn installed_rules(&mut self, wanted: Vec<Rule>) {
        for r in self.rules.iter().rev().filter(|r| !wanted.contains(r)) {
            if let Err(e) = rules::delete(r) {
                tracing::warn!(rule = ?r, error = %e, "removing a routing rule");
            }
        }
        for r in wanted.iter().filter(|r| !self.rules.contains(r)) {
            if let Err(e) = rules::add(r) {
                // IPv6 may be off on this host: its rules cannot exist.
                tracing::warn!(rule = ?r, error = %e, "adding a routing rule");
            }
        }
        self.rules = wanted;
    }

    /// Serves `served` (this node is their subnet router, or an exit node
    /// with both default routes): a check that the kernel forwards, and
    /// source NAT of tunnel traffic leaving by any other interface (with
    /// `snat` off, only what an exit node sends to the internet). An empty
    /// set removes the NAT table.
    pub fn serve(&mut self, served: &[IpNet], ula: Option<ipnet::Ipv6Net>, snat: bool) {
        let exit = crate::control::advertise::is_exit(served);
        if (served.is_empty() || (!snat && !exit)) && self.nat {
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
        if !snat && !exit {
            tracing::info!(routes = ?served, "serving subnet routes, without source NAT");
            return;
        }
        let keep: Vec<IpNet> = if snat {
            Vec::new()
        } else {
            served
                .iter()
                .filter(|n| n.prefix_len() != 0)
                .copied()
                .collect()
        };
        let ruleset = nat_ruleset(&self.ifname, ula, &keep);
        match nft(&ruleset) {
            Ok(()) => {
                self.nat = true;
                tracing::info!(routes = ?served, snat, "serving routes, with source NAT");
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot install the source NAT (nft)");
                self.problem = Some(format!("source NAT not installed: {e}"));
            }
        }
    }

    /// Removes what a previous run left behind (killed before it could
    /// clean up): the NAT table, warren's rules and its routing table. The
    /// state installs again what this run needs. None of it, or no `nft`
    /// at all, is the usual case.
    pub fn forget_stale(&mut self) {
        let _ = nft(&format!(
            "table inet {NFT_TABLE} {{}}\ndelete table inet {NFT_TABLE}\n"
        ));
        self.nat = false;
        rules::remove_all();
        if let Ok(mut rm) = RouteManager::new() {
            let stale: Vec<Route> = rm
                .list()
                .unwrap_or_default()
                .into_iter()
                .filter(|r| r.table() == TABLE)
                .collect();
            for r in stale {
                let _ = rm.delete(&r);
            }
        }
    }

    /// Undoes everything (the agent stops).
    pub fn clear(&mut self) {
        self.apply(&[], &[]);
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

impl HostRoutes {
    /// This host's own networks: each interface's prefix but the tunnel's,
    /// loopback and link-local ones, and any inside the overlay.
    pub fn local_networks(&self) -> Vec<IpNet> {
        local_networks(&self.ifname)
    }
}

fn local_networks(tun: &str) -> Vec<IpNet> {
    let Ok(addrs) = nix::ifaddrs::getifaddrs() else {
        return Vec::new();
    };
    let mut out: Vec<IpNet> = addrs
        .filter(|ifa| ifa.interface_name != tun)
        .filter_map(|ifa| {
            let (addr, mask) = (ifa.address?, ifa.netmask?);
            let (ip, len) =
                if let (Some(a), Some(m)) = (addr.as_sockaddr_in(), mask.as_sockaddr_in()) {
                    (IpAddr::V4(a.ip()), u32::from(m.ip()).count_ones())
                } else {
                    let (a, m) = (addr.as_sockaddr_in6()?, mask.as_sockaddr_in6()?);
                    (IpAddr::V6(a.ip()), u128::from(m.ip()).count_ones())
                };
            let net = IpNet::new(ip, u8::try_from(len).ok()?).ok()?.trunc();
            let link_local = match ip {
                IpAddr::V4(a) => a.is_link_local(),
                IpAddr::V6(a) => a.segments()[0] & 0xffc0 == 0xfe80,
            };
            let skip = ip.is_loopback()
                || ip.is_unspecified()
                || ip.is_multicast()
                || link_local
                || IpNet::V4(OVERLAY_V4).contains(&ip);
            (!skip).then_some(net)
        })
        .collect();
    out.sort();
    out.dedup();
    out
}

/// The NAT table: tunnel sources (the overlay's /10 and the network's /48)
/// leaving by an interface other than the tunnel are masqueraded to that
/// interface's address, except toward `keep` (the subnets an exit node
/// also serves with `--snat-subnet-routes=false`). Its forward chain drops
/// what would go from the tunnel straight back into it: a router or exit
/// node is a way out of the overlay, never a hop between two peers.
/// Flushed and refilled as one transaction.
pub fn nat_ruleset(ifname: &str, ula: Option<ipnet::Ipv6Net>, keep: &[IpNet]) -> String {
    let except = |v6: bool| {
        let nets: Vec<String> = keep
            .iter()
            .filter(|n| n.addr().is_ipv6() == v6)
            .map(ToString::to_string)
            .collect();
        if nets.is_empty() {
            String::new()
        } else {
            format!(
                " {} daddr != {{ {} }}",
                if v6 { "ip6" } else { "ip" },
                nets.join(", ")
            )
        }
    };
    let v4 = format!(
        "        oifname != \"{ifname}\" ip saddr {OVERLAY_V4}{} masquerade\n",
        except(false)
    );
    let v6 = ula
        .map(|u| {
            format!(
                "        oifname != \"{ifname}\" ip6 saddr {u}{} masquerade\n",
                except(true)
            )
        })
        .unwrap_or_default();
    format!(
        "table inet {NFT_TABLE} {{}}\n\
         delete table inet {NFT_TABLE}\n\
         table inet {NFT_TABLE} {{\n    \
             chain postrouting {{\n        \
                 type nat hook postrouting priority srcnat; policy accept;\n\
         {v4}{v6}    }}\n    \
             chain forward {{\n        \
                 type filter hook forward priority filter; policy accept;\n        \
                 iifname \"{ifname}\" oifname \"{ifname}\" drop\n    \
             }}\n\
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
        let r = nat_ruleset("warren0", ula, &[]);
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
        assert!(
            r.contains("iifname \"warren0\" oifname \"warren0\" drop"),
            "{r}"
        );
        assert!(!nat_ruleset("warren0", None, &[]).contains("ip6"));
    }

    #[test]
    fn an_exit_node_without_snat_keeps_its_subnets_unmasqueraded() {
        let keep: Vec<IpNet> = vec![
            "10.0.0.0/24".parse().unwrap(),
            "fd00:1::/64".parse().unwrap(),
        ];
        let r = nat_ruleset("warren0", "fd7a:115c:a1e0::/48".parse().ok(), &keep);
        assert!(
            r.contains("ip saddr 100.64.0.0/10 ip daddr != { 10.0.0.0/24 } masquerade"),
            "{r}"
        );
        assert!(r.contains("ip6 daddr != { fd00:1::/64 } masquerade"), "{r}");
    }
}
