//! Subnet routes and the exit node in the agent state (README, "Subnet
//! routers and exit nodes"): which peer carries each prefix peers serve,
//! which peer carries the default routes, and which prefixes this node
//! serves itself.
//!
//! The choice is `routes::Routes` (sans-IO: accept-routes, never over this
//! host's own networks, one primary per prefix with failover and a
//! hold-down, the exit node's two default routes); this feeds it the map's
//! peers, this host's networks and the user's choices after every map
//! event and at each housekeeping tick (so a hold-down ends on time), and
//! turns a changed decision into outputs: the driver routes each prefix to
//! its peer in the data plane and the kernel (`Output::Routes`, with the
//! LAN prefixes that stay off the tunnel), and, for what this node serves,
//! accepts packets to those prefixes and forwards them (`Output::Serving`).

use std::time::Instant;

use ipnet::IpNet;

use super::{AgentState, Output};
use crate::keys::NodeKey;
use crate::routes::{RouteOptions, RoutePeer, Skipped};

impl AgentState {
    /// `warren up --accept-routes`: use the subnet routes peers serve.
    pub fn set_accept_routes(&mut self, now: Instant, accept: bool) {
        self.clock(now);
        self.accept_routes = accept;
        self.update_routes(now);
    }

    /// `warren up --exit-node` (`None`: no exit node) and
    /// `--exit-node-allow-lan-access`.
    pub fn set_exit_node(&mut self, now: Instant, exit: Option<NodeKey>, allow_lan: bool) {
        self.clock(now);
        self.exit_node = exit;
        self.allow_lan = allow_lan;
        self.update_routes(now);
    }

    /// This host's own networks (its interfaces' prefixes, the tunnel's
    /// left out), read with its addresses: routes never shadow them, and
    /// with LAN access they stay off an exit node.
    pub fn handle_local_networks(&mut self, now: Instant, mut nets: Vec<IpNet>) {
        self.clock(now);
        nets.sort();
        nets.dedup();
        if nets != self.local_nets {
            self.local_nets = nets;
            self.update_routes(now);
        }
    }

    /// The subnet routes in use, each with the peer that carries it.
    pub fn subnet_routes(&self) -> &[(IpNet, NodeKey)] {
        &self.subnets
    }

    /// The exit node chosen, and why it carries nothing if it does not.
    pub fn exit_node(&self) -> (Option<NodeKey>, Option<&str>) {
        (self.exit_node, self.exit_problem.as_deref())
    }

    /// Whether `key` is in the map and serves both default routes.
    pub fn offers_exit(&self, key: &NodeKey) -> bool {
        self.follow
            .peers()
            .get(key)
            .is_some_and(|p| crate::control::advertise::is_exit(&p.routes))
    }

    pub(super) fn update_routes(&mut self, now: Instant) {
        let peers: Vec<RoutePeer> = self
            .follow
            .peers()
            .values()
            .filter(|p| !p.routes.is_empty())
            .map(|p| RoutePeer {
                key: p.key,
                approved: p.routes.clone(),
                // Online at the coordinator: a router that went away loses
                // its prefixes to another that serves them.
                healthy: p.online,
            })
            .collect();
        // Until the driver reads the networks, the host's addresses stand
        // for them (a route over one of them is still refused).
        let local = if self.local_nets.is_empty() {
            self.addrs
                .iter()
                .map(|e| IpNet::from(e.addr.ip()))
                .collect()
        } else {
            self.local_nets.clone()
        };
        let opts = RouteOptions {
            accept_routes: self.accept_routes,
            exit_node: self.exit_node,
            allow_lan: self.allow_lan,
            local,
        };
        let table = self.routes.update(now, &peers, &opts);
        self.exit_problem = match (self.exit_node, &table.skipped) {
            (Some(k), skipped)
                if skipped
                    .iter()
                    .any(|(_, s)| matches!(s, Skipped::NotAnExitNode(_))) =>
            {
                Some(if self.follow.peers().contains_key(&k) {
                    "it does not offer an exit node (or it is not approved): \
                     internet traffic is blocked until it does, or until \
                     `warren up --exit-node=` clears the choice"
                        .to_string()
                } else {
                    "it is not in this node's map (removed, or hidden by the policy): \
                     internet traffic is blocked until it returns"
                        .to_string()
                })
            }
            _ => None,
        };
        let mut routes = table.routes;
        routes.sort();
        let lan = table.bypass;
        let blocked = self.exit_problem.is_some();
        if routes != self.subnets || lan != self.lan_bypass || blocked != self.exit_blocked {
            tracing::info!(routes = ?routes, lan = ?lan, skipped = ?table.skipped, "routes");
            self.subnets.clone_from(&routes);
            self.lan_bypass.clone_from(&lan);
            self.exit_blocked = blocked;
            self.out.push_back(Output::Routes {
                routes,
                lan,
                exit_blocked: blocked,
            });
        }
        let mut served: Vec<IpNet> = self.follow.self_routes().to_vec();
        served.sort();
        if served != self.served {
            tracing::info!(routes = ?served, "serving routes");
            self.served.clone_from(&served);
            self.out.push_back(Output::Serving(served));
        }
    }
}
