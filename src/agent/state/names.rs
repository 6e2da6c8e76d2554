//! Names in the agent state (README, "Names and DNS"): after every map
//! event, the view the resolver answers from (this node, every peer in
//! the map, the network's DNS settings), handed to the driver only when
//! it changed (`Output::Dns`). A rename, a join or a removal reaches the
//! resolver with the map delta that carries it, in the same drain.
//!
//! A peer the policy hides is not in this node's map, so it gets no name.

use super::{AgentState, Output};
use crate::dns::{DnsView, NodeName};

impl AgentState {
    pub(super) fn update_dns(&mut self) {
        let mut nodes: Vec<NodeName> = self
            .follow
            .peers()
            .values()
            .map(|p| NodeName {
                name: p.name.clone(),
                v4: p.ipv4,
                v6: p.ipv6,
            })
            .collect();
        nodes.sort_by(|a, b| a.name.cmp(&b.name).then(a.v4.cmp(&b.v4)));
        if let (Some(name), Some((v4, v6))) = (self.follow.name(), self.follow.addresses()) {
            nodes.insert(
                0,
                NodeName {
                    name: name.to_owned(),
                    v4,
                    v6,
                },
            );
        }
        let view = DnsView {
            settings: self.follow.dns().clone(),
            nodes,
            ula: self.follow.prefix(),
        };
        if view != self.dns {
            self.dns = view.clone();
            self.out.push_back(Output::Dns(Box::new(view)));
        }
    }

    /// The names the resolver answers from, as last given.
    pub fn dns_view(&self) -> &DnsView {
        &self.dns
    }
}
