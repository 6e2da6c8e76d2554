//! Which peer carries which prefix: subnet routes and the exit node,
//! decided without IO (the agent state feeds it, `agent::state::subnets`;
//! the driver installs the result).
//!
//! Input: the peers' approved routes from the map, whether each peer can
//! carry traffic now (online and with a path), this host's own networks,
//! and the user's choices (`--accept-routes`, `--exit-node`,
//! `--exit-node-allow-lan-access`). Output: a [`RouteTable`], each prefix
//! to one peer, and the prefixes left out with the reason, for `status`.
//!
//! The rules, as a Tailscale or NetBird user expects them:
//! - subnet routes are used only with `accept_routes` (off by default on
//!   Linux); a prefix that overlaps one of this host's own networks is
//!   never taken over (the host's LAN and its way to the gateway stay
//!   local);
//! - when several peers serve one prefix, one is primary; it stays primary
//!   while it can carry traffic, and when it cannot, the lowest-keyed
//!   healthy one takes over at once. A peer that lost the role is passed
//!   over until it has been healthy for [`HOLD_DOWN`] (unless every healthy
//!   server is held down), so a peer whose path flaps never makes the
//!   route flap with it;
//! - the exit node is the chosen peer if it serves both default routes
//!   (approved `0.0.0.0/0` and `::/0`); its routes are installed whatever
//!   the host's networks, except that `allow_lan` keeps those direct.
//!
//! The same quinn-proto shape as the rest of the core: time comes in as
//! `now`, the state is a value ([`Routes`]), and every rule has a test.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use ipnet::IpNet;

use crate::keys::NodeKey;

/// How long a peer that lost the primary role must stay healthy before it
/// may win one again.
pub const HOLD_DOWN: Duration = Duration::from_secs(10);

/// What the routing decision needs to know about one peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoutePeer {
    pub key: NodeKey,
    /// Routes the coordinator approved for this peer.
    pub approved: Vec<IpNet>,
    /// Online at the coordinator and with a working path (direct or relay).
    pub healthy: bool,
}

/// The user's choices.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RouteOptions {
    /// `--accept-routes`: install other peers' subnet routes.
    pub accept_routes: bool,
    /// `--exit-node`: send all other traffic through this peer.
    pub exit_node: Option<NodeKey>,
    /// `--exit-node-allow-lan-access`: this host's networks stay direct.
    pub allow_lan: bool,
    /// This host's own networks (its interfaces' prefixes).
    pub local: Vec<IpNet>,
}

/// Why a prefix is not routed through the tunnel.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Skipped {
    /// Subnet routes are off (`--accept-routes` not given).
    NotAccepted,
    /// It overlaps this host's own network, which stays local.
    ShadowsLocal(IpNet),
    /// No peer that serves it can carry traffic now.
    NoHealthyRouter,
    /// The chosen exit node does not serve both default routes.
    NotAnExitNode(NodeKey),
}

/// The decision: each prefix to the peer that carries it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RouteTable {
    pub routes: Vec<(IpNet, NodeKey)>,
    /// Prefixes that stay off the tunnel while an exit node is in use.
    pub bypass: Vec<IpNet>,
    pub skipped: Vec<(IpNet, Skipped)>,
}

impl RouteTable {
    /// The peer that carries `prefix`, if any.
    pub fn via(&self, prefix: &IpNet) -> Option<NodeKey> {
        self.routes
            .iter()
            .find(|(p, _)| p == prefix)
            .map(|(_, k)| *k)
    }
}

/// The routing state: the primary of each prefix and when each peer was
/// last seen unhealthy.
#[derive(Debug, Default)]
pub struct Routes {
    primary: HashMap<IpNet, NodeKey>,
    /// When each peer was last seen unhealthy, within the hold-down.
    last_unhealthy: HashMap<NodeKey, Instant>,
    /// Peers that lost a primary role, until their hold-down ends.
    demoted: HashSet<NodeKey>,
}

fn is_default(p: &IpNet) -> bool {
    p.prefix_len() == 0
}

fn overlaps(a: &IpNet, b: &IpNet) -> bool {
    a.contains(&b.network()) || b.contains(&a.network())
}

impl Routes {
    /// Decides the table at `now`.
    pub fn update(&mut self, now: Instant, peers: &[RoutePeer], opts: &RouteOptions) -> RouteTable {
        for p in peers.iter().filter(|p| !p.healthy) {
            self.last_unhealthy.insert(p.key, now);
        }
        // A hold-down that has passed is forgotten.
        self.last_unhealthy
            .retain(|_, t| now.saturating_duration_since(*t) < HOLD_DOWN);
        let recent = &self.last_unhealthy;
        self.demoted.retain(|k| recent.contains_key(k));
        let mut table = RouteTable::default();
        self.exit(peers, opts, &mut table);
        // Every subnet prefix some peer serves, in a stable order.
        let mut prefixes: Vec<IpNet> = peers
            .iter()
            .flat_map(|p| p.approved.iter().copied())
            .filter(|p| !is_default(p))
            .collect();
        prefixes.sort();
        prefixes.dedup();
        self.primary.retain(|p, _| prefixes.contains(p));
        for prefix in prefixes {
            if !opts.accept_routes {
                table.skipped.push((prefix, Skipped::NotAccepted));
                continue;
            }
            if let Some(local) = opts.local.iter().find(|l| overlaps(l, &prefix)) {
                table.skipped.push((prefix, Skipped::ShadowsLocal(*local)));
                continue;
            }
            match self.choose(prefix, peers) {
                Some(k) => table.routes.push((prefix, k)),
                None => table.skipped.push((prefix, Skipped::NoHealthyRouter)),
            }
        }
        table
    }

    /// The exit node's default routes, when one is chosen and serves them.
    fn exit(&self, peers: &[RoutePeer], opts: &RouteOptions, table: &mut RouteTable) {
        let Some(exit) = opts.exit_node else { return };
        let v4: IpNet = "0.0.0.0/0".parse().expect("a valid prefix");
        let v6: IpNet = "::/0".parse().expect("a valid prefix");
        let serves = peers
            .iter()
            .find(|p| p.key == exit)
            .is_some_and(|p| p.approved.contains(&v4) && p.approved.contains(&v6));
        if !serves {
            table.skipped.push((v4, Skipped::NotAnExitNode(exit)));
            return;
        }
        table.routes.push((v4, exit));
        table.routes.push((v6, exit));
        if opts.allow_lan {
            table.bypass = opts.local.clone();
        }
    }

    /// The primary for `prefix`: the current one while it is healthy, else
    /// the lowest-keyed healthy server of it out of hold-down (or, if every
    /// healthy one is held down, the lowest-keyed of those).
    fn choose(&mut self, prefix: IpNet, peers: &[RoutePeer]) -> Option<NodeKey> {
        let serving = |p: &&RoutePeer| p.healthy && p.approved.contains(&prefix);
        let current = self.primary.get(&prefix).copied();
        if let Some(k) = current {
            if peers.iter().filter(serving).any(|p| p.key == k) {
                return Some(k);
            }
            // The primary can no longer carry traffic: it loses the role.
            self.demoted.insert(k);
        }
        // Demoted, and unhealthy within the hold-down (`update` prunes).
        let held = |k: &NodeKey| self.demoted.contains(k) && self.last_unhealthy.contains_key(k);
        let mut healthy: Vec<NodeKey> = peers.iter().filter(serving).map(|p| p.key).collect();
        healthy.sort();
        let next = healthy
            .iter()
            .find(|k| !held(k))
            .or(healthy.first())
            .copied()?;
        self.primary.insert(prefix, next);
        Some(next)
    }
}

#[cfg(test)]
#[path = "routes_tests.rs"]
mod tests;
