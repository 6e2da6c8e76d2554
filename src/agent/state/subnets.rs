//! Subnet routes in the agent state (README, "Subnet routers and exit
//! nodes"): which peer carries each prefix peers serve, and which prefixes
//! this node serves itself.
//!
//! The choice is `routes::Routes` (sans-IO: accept-routes, never over this
//! host's own networks, one primary per prefix with failover and a
//! hold-down); this feeds it the map's peers and this host's addresses
//! after every map event and at each housekeeping tick (so a hold-down
//! ends on time), and turns a changed decision into outputs: the driver
//! routes each prefix to its peer in the data plane and the kernel
//! (`Output::SubnetRoutes`), and, for what this node serves, accepts
//! packets to those prefixes and forwards them (`Output::Serving`).
//! Exit nodes are not decided here yet.

use std::time::Instant;

use ipnet::IpNet;

use super::{AgentState, Output};
use crate::keys::NodeKey;
use crate::routes::{RouteOptions, RoutePeer};

impl AgentState {
    /// `warren up --accept-routes`: use the subnet routes peers serve.
    pub fn set_accept_routes(&mut self, now: Instant, accept: bool) {
        self.clock(now);
        self.accept_routes = accept;
        self.update_routes(now);
    }

    /// The subnet routes in use, each with the peer that carries it.
    pub fn subnet_routes(&self) -> &[(IpNet, NodeKey)] {
        &self.subnets
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
        let opts = RouteOptions {
            accept_routes: self.accept_routes,
            local: self
                .addrs
                .iter()
                .map(|e| IpNet::from(e.addr.ip()))
                .collect(),
            ..RouteOptions::default()
        };
        let table = self.routes.update(now, &peers, &opts);
        let mut subnets: Vec<(IpNet, NodeKey)> = table
            .routes
            .into_iter()
            .filter(|(p, _)| p.prefix_len() != 0)
            .collect();
        subnets.sort();
        if subnets != self.subnets {
            tracing::info!(routes = ?subnets, skipped = ?table.skipped, "subnet routes");
            self.subnets.clone_from(&subnets);
            self.out.push_back(Output::SubnetRoutes(subnets));
        }
        let mut served: Vec<IpNet> = self
            .follow
            .self_routes()
            .iter()
            .filter(|p| p.prefix_len() != 0)
            .copied()
            .collect();
        served.sort();
        if served != self.served {
            tracing::info!(routes = ?served, "serving subnet routes");
            self.served.clone_from(&served);
            self.out.push_back(Output::Serving(served));
        }
    }
}
