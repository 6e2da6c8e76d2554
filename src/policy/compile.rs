//! From a policy and the network's nodes to each node's packet filter and
//! to who may see whom in the maps.
//!
//! The cost is O(rules × nodes) for the filters: each rule's sources are
//! resolved once to prefixes, then the rule is handed to each node it has
//! a destination on, cut down to that node's own addresses and the routes
//! it serves (a node only ever checks packets addressed to itself).
//! Visibility is kept per rule as two bit sets of nodes, sources and
//! destinations, so a node's peer set is a few hundred word-wide ORs, not
//! a walk over every pair of nodes (issue 16: never O(nodes²) per node).
//!
//! Meanings follow Tailscale's: `*` as a source is every node and every
//! approved route; a tag replaces its node's user; `autogroup:self`
//! allows each user's sources to that user's own untagged nodes only.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

use super::filter::{DstNet, FilterRule};
use super::{Dst, Inventory, InventoryNode, Policy, Rule, Selector};

/// What `compile` gives: filters and visibility, by index into the
/// inventory's nodes.
#[derive(Debug, Clone, Default)]
pub struct Compiled {
    filters: Vec<Vec<FilterRule>>,
    /// Per rule (one per user for `autogroup:self`): its source and
    /// destination nodes.
    sets: Vec<(Bits, Bits)>,
    nodes: usize,
}

impl Compiled {
    pub fn filter(&self, node: usize) -> &[FilterRule] {
        self.filters.get(node).map_or(&[], Vec::as_slice)
    }

    /// The nodes `node` may reach or that may reach it, without itself.
    pub fn visible(&self, node: usize) -> Vec<usize> {
        let mut seen = Bits::new(self.nodes);
        for (src, dst) in &self.sets {
            if dst.get(node) {
                seen.or(src);
            }
            if src.get(node) {
                seen.or(dst);
            }
        }
        (0..self.nodes)
            .filter(|&i| i != node && seen.get(i))
            .collect()
    }

    /// Whether `a` and `b` see each other.
    pub fn sees(&self, a: usize, b: usize) -> bool {
        self.sets
            .iter()
            .any(|(s, d)| (s.get(a) && d.get(b)) || (s.get(b) && d.get(a)))
    }
}

/// A fixed-size set of node indices.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Bits(Vec<u64>);

impl Bits {
    fn new(n: usize) -> Self {
        Bits(vec![0; n.div_ceil(64)])
    }
    fn set(&mut self, i: usize) {
        if let Some(w) = self.0.get_mut(i / 64) {
            *w |= 1 << (i % 64);
        }
    }
    fn get(&self, i: usize) -> bool {
        self.0.get(i / 64).is_some_and(|w| w & (1 << (i % 64)) != 0)
    }
    fn or(&mut self, other: &Bits) {
        for (a, b) in self.0.iter_mut().zip(&other.0) {
            *a |= b;
        }
    }
}

/// The prefixes every node's addresses are in: 100.64.0.0/10 and the
/// ULA /48s the nodes' IPv6 addresses are in.
fn overlay(inv: &Inventory) -> Vec<IpNet> {
    let mut out: BTreeSet<IpNet> = BTreeSet::new();
    if let Ok(v4) = Ipv4Net::new(Ipv4Addr::new(100, 64, 0, 0), 10) {
        out.insert(IpNet::V4(v4));
    }
    for n in &inv.nodes {
        if let Ok(v6) = Ipv6Net::new(n.ipv6, 48) {
            out.insert(IpNet::V6(v6.trunc()));
        }
    }
    out.into_iter().collect()
}

/// Whether node `n` is what an identity selector names.
fn names_node(policy: &Policy, inv: &Inventory, sel: &Selector, n: &InventoryNode) -> bool {
    let email = inv.owner_email(n);
    match sel {
        Selector::User(u) => email.is_some_and(|e| e.eq_ignore_ascii_case(u)),
        Selector::Group(g) => email.is_some_and(|e| {
            policy
                .group(g)
                .is_some_and(|g| g.members.iter().any(|m| m.value.eq_ignore_ascii_case(e)))
        }),
        Selector::Tag(t) => n.tags.iter().any(|x| x == t),
        Selector::Member => email.is_some(),
        Selector::Tagged => n.is_tagged(),
        _ => false,
    }
}

/// A rule's sources as prefixes.
fn src_nets(policy: &Policy, inv: &Inventory, rule: &Rule, overlay: &[IpNet]) -> Vec<IpNet> {
    let mut out: BTreeSet<IpNet> = BTreeSet::new();
    for s in &rule.src {
        match &s.value {
            Selector::All => {
                out.extend(overlay.iter().copied());
                out.extend(inv.nodes.iter().flat_map(|n| n.served_routes().copied()));
            }
            Selector::DangerAll => {
                out.insert(IpNet::V4(Ipv4Net::default()));
                out.insert(IpNet::V6(Ipv6Net::default()));
            }
            Selector::Prefix(p) => {
                out.insert(*p);
            }
            Selector::Host(h) => out.extend(policy.host(h).map(|a| a.prefix)),
            sel => {
                for n in inv.nodes.iter().filter(|n| names_node(policy, inv, sel, n)) {
                    out.extend(n.addrs());
                }
            }
        }
    }
    out.into_iter().collect()
}

/// What of node `n` a destination entry covers.
fn dst_nets(policy: &Policy, inv: &Inventory, d: &Dst, n: &InventoryNode) -> Vec<IpNet> {
    let within = |p: &IpNet| -> Vec<IpNet> {
        let own = n.addrs().into_iter().filter(|a| p.contains(a));
        let routes = n.served_routes().filter_map(|r| {
            if p.contains(r) {
                Some(*r)
            } else if r.contains(p) {
                Some(*p)
            } else {
                None
            }
        });
        own.chain(routes).collect()
    };
    match &d.sel.value {
        Selector::All => n
            .addrs()
            .into_iter()
            .chain(n.served_routes().copied())
            .collect(),
        Selector::Prefix(p) => within(p),
        Selector::Host(h) => policy
            .host(h)
            .map(|a| within(&a.prefix))
            .unwrap_or_default(),
        Selector::Internet => n
            .served_routes()
            .filter(|r| r.prefix_len() == 0)
            .copied()
            .collect(),
        Selector::SelfDevices | Selector::DangerAll => Vec::new(),
        sel if names_node(policy, inv, sel, n) => n.addrs().to_vec(),
        _ => Vec::new(),
    }
}

/// Whether a node's addresses or served routes are among `nets`.
fn covered(n: &InventoryNode, nets: &[IpNet]) -> bool {
    n.addrs()
        .iter()
        .chain(n.served_routes())
        .any(|a| nets.iter().any(|s| s.contains(a)))
}

/// Compiles `policy` for the nodes of `inv`; `None` is no policy (allow
/// all), under which every node sees every other.
pub fn compile(policy: Option<&Policy>, inv: &Inventory) -> Compiled {
    let count = inv.nodes.len();
    let mut out = Compiled {
        filters: vec![Vec::new(); count],
        sets: Vec::new(),
        nodes: count,
    };
    let overlay = overlay(inv);
    let Some(policy) = policy else {
        let mut all = Bits::new(count);
        (0..count).for_each(|i| all.set(i));
        out.sets.push((all.clone(), all));
        return out;
    };
    for rule in &policy.rules {
        let src = src_nets(policy, inv, rule, &overlay);
        let mut src_set = Bits::new(count);
        for (i, n) in inv.nodes.iter().enumerate() {
            if covered(n, &src) {
                src_set.set(i);
            }
        }
        let mut dst_set = Bits::new(count);
        for (i, n) in inv.nodes.iter().enumerate() {
            let dst = node_dsts(policy, inv, rule, n);
            if !dst.is_empty() {
                dst_set.set(i);
                out.filters[i].push(FilterRule {
                    proto: rule.protos.clone(),
                    src: src.clone(),
                    dst,
                });
            }
        }
        out.sets.push((src_set.clone(), dst_set));
        if rule
            .dst
            .iter()
            .any(|d| d.sel.value == Selector::SelfDevices)
        {
            compile_self(&mut out, inv, rule, &src_set);
        }
    }
    out
}

fn node_dsts(policy: &Policy, inv: &Inventory, rule: &Rule, n: &InventoryNode) -> Vec<DstNet> {
    let mut dst = Vec::new();
    for d in &rule.dst {
        for net in dst_nets(policy, inv, d, n) {
            for &ports in &d.ports {
                let entry = DstNet { net, ports };
                if !dst.contains(&entry) {
                    dst.push(entry);
                }
            }
        }
    }
    dst
}

/// `autogroup:self`: for each user, the rule from that user's untagged
/// nodes among the sources to the same user's untagged nodes.
fn compile_self(out: &mut Compiled, inv: &Inventory, rule: &Rule, src_set: &Bits) {
    let count = inv.nodes.len();
    let ports: Vec<_> = rule
        .dst
        .iter()
        .filter(|d| d.sel.value == Selector::SelfDevices)
        .flat_map(|d| d.ports.iter().copied())
        .collect();
    for user in &inv.users {
        let own: Vec<usize> = (0..count)
            .filter(|&i| inv.owner_email(&inv.nodes[i]) == Some(user.email.as_str()))
            .collect();
        let srcs: Vec<usize> = own.iter().copied().filter(|&i| src_set.get(i)).collect();
        if srcs.is_empty() {
            continue;
        }
        let src: Vec<IpNet> = srcs.iter().flat_map(|&i| inv.nodes[i].addrs()).collect();
        let (mut s, mut d) = (Bits::new(count), Bits::new(count));
        srcs.iter().for_each(|&i| s.set(i));
        for &i in &own {
            d.set(i);
            let dst = inv.nodes[i]
                .addrs()
                .into_iter()
                .flat_map(|net| ports.iter().map(move |&p| DstNet { net, ports: p }))
                .collect();
            out.filters[i].push(FilterRule {
                proto: rule.protos.clone(),
                src: src.clone(),
                dst,
            });
        }
        out.sets.push((s, d));
    }
}

/// The node owning `ip`, by index (for `policy filter NODE`, the lab).
pub fn node_index(inv: &Inventory, ip: IpAddr) -> Option<usize> {
    inv.nodes.iter().position(|n| n.owns(ip))
}
