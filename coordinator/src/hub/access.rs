//! The network's policy, compiled, as the hub keeps it for the map
//! streams: who sees whom, and each node's packet filter already encoded.
//!
//! One [`Access`] is built per change that can alter either (a policy set,
//! a user created or removed, a node joining, leaving or changing its
//! addresses, tags or owner) in O(rules × nodes) (`warren::policy::compile`)
//! and shared by every stream as an `Arc`; a node only reporting new
//! endpoints or going online builds nothing. Each stream then works out
//! its own visible set once per build (`visible_set`) and sends its agent
//! the difference as deltas (`outbox`).
//!
//! A stored policy that no longer parses (it was checked when it was set,
//! so only a downgrade could do this) fails closed: no rules, nothing
//! allowed, and the reason logged and kept for `policy get`.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use warren::control::PeerReach;
use warren::keys::NodeKey;
use warren::policy::{compile, reach, Compiled, Policy};

use crate::store::users::{inventory, UserRecord};
use crate::store::NodeRecord;

#[derive(Debug, Default)]
pub struct Access {
    /// `None`: no policy, everyone sees everyone and nothing is filtered.
    policy: Option<Policy>,
    compiled: Compiled,
    index: HashMap<i64, usize>,
    ids: Vec<i64>,
    /// The digest of every node id (`visible_digest` without a policy).
    all_digest: u64,
    /// Per node index: its key and overlay addresses, for `reach`.
    keys: Vec<NodeKey>,
    addrs: Vec<[IpAddr; 2]>,
    /// Per node id: its filter as JSON.
    filters: HashMap<i64, String>,
    pub users: Vec<UserRecord>,
    pub policy_text: Option<String>,
    /// Why the stored policy could not be used, if it could not.
    pub error: Option<String>,
}

/// What of a node the policy depends on: when none of it changes, nothing
/// is rebuilt.
pub fn identity(n: &NodeRecord) -> Identity {
    (n.ipv4, n.ipv6, n.all_tags(), n.user_id, n.served_routes())
}

/// Addresses, tags, user and served routes: what the policy sees of a node.
pub type Identity = (
    Ipv4Addr,
    Ipv6Addr,
    Vec<String>,
    Option<i64>,
    Vec<ipnet::IpNet>,
);

impl Access {
    /// No policy: the state before any is loaded, and with none set.
    pub fn open() -> Access {
        Access::default()
    }

    pub fn build<'a>(
        policy_text: Option<String>,
        users: Vec<UserRecord>,
        nodes: impl Iterator<Item = &'a NodeRecord>,
    ) -> Access {
        let nodes: Vec<&NodeRecord> = nodes.collect();
        let mut ids: Vec<i64> = nodes.iter().map(|n| n.id).collect();
        let all_digest = ids.iter().fold(0u64, |d, id| d.wrapping_add(mix(*id)));
        let Some(text) = policy_text.as_deref() else {
            // No policy: everyone sees everyone and nothing is filtered,
            // so only the ids are kept, sorted (`visible_digest`). This is
            // built again for every batch in which a node joins; with the
            // policy's inputs built as well (an inventory of every node),
            // each registration cost milliseconds at 10,000 nodes
            // (issue 19).
            ids.sort_unstable();
            return Access {
                ids,
                all_digest,
                users,
                ..Access::default()
            };
        };
        let inv = inventory(&users, nodes.iter().copied());
        let mut error = None;
        let policy = match Policy::parse(text) {
            Ok(p) => p,
            Err(e) => {
                tracing::error!(error = %e, "the stored policy does not parse: nothing is allowed");
                error = Some(e.to_string());
                Policy::default()
            }
        };
        let compiled = compile(Some(&policy), &inv);
        let keys = nodes.iter().map(|n| n.key).collect();
        let addrs = nodes
            .iter()
            .map(|n| [IpAddr::V4(n.ipv4), IpAddr::V6(n.ipv6)])
            .collect();
        let index = ids.iter().enumerate().map(|(i, id)| (*id, i)).collect();
        let filters = ids
            .iter()
            .enumerate()
            .map(|(i, id)| {
                let json =
                    serde_json::to_string(compiled.filter(i)).unwrap_or_else(|_| "[]".into());
                (*id, json)
            })
            .collect();
        Access {
            policy: Some(policy),
            compiled,
            index,
            ids,
            all_digest,
            keys,
            addrs,
            filters,
            users,
            policy_text,
            error,
        }
    }

    pub fn is_open(&self) -> bool {
        self.policy.is_none()
    }

    pub fn policy(&self) -> Option<&Policy> {
        self.policy.as_ref()
    }

    /// The node ids `me` may see; `None`: all of them.
    pub fn visible_set(&self, me: i64) -> Option<HashSet<i64>> {
        self.policy.as_ref()?;
        let Some(&i) = self.index.get(&me) else {
            return Some(HashSet::new());
        };
        Some(
            self.compiled
                .visible(i)
                .into_iter()
                .map(|j| self.ids[j])
                .collect(),
        )
    }

    /// A digest of the set `visible_set(me)` stands for (every node but
    /// `me` when there is no policy), in O(rules + nodes) and without
    /// building the set: a stream whose digest did not change skips the
    /// peer-by-peer comparison, which at 5,000 streams of 5,000 peers
    /// is most of a policy change's cost (`outbox::set_access`). A sum of
    /// mixed ids, so order does not matter; the ids are the store's, not
    /// chosen by nodes, so a collision is chance alone (2⁻⁶⁴).
    pub fn visible_digest(&self, me: i64) -> u64 {
        if self.policy.is_none() {
            // Without a policy `ids` is sorted (`build`).
            return match self.ids.binary_search(&me) {
                Ok(_) => self.all_digest.wrapping_sub(mix(me)),
                Err(_) => self.all_digest,
            };
        }
        match self.index.get(&me) {
            None => 0,
            Some(&i) => self
                .compiled
                .visible(i)
                .into_iter()
                .fold(0u64, |d, j| d.wrapping_add(mix(self.ids[j]))),
        }
    }

    /// What each peer `me` may see lets `me` do, from the peers' filters
    /// (`GET /reach`); `None` when there is no policy. O(peers × their
    /// rules), asked for by a person running `warren status`, never pushed.
    pub fn reach(&self, me: i64) -> Option<Vec<PeerReach>> {
        self.policy.as_ref()?;
        let Some(&i) = self.index.get(&me) else {
            return Some(Vec::new());
        };
        let from = &self.addrs[i];
        Some(
            self.compiled
                .visible(i)
                .into_iter()
                .map(|j| PeerReach {
                    key: self.keys[j],
                    allows: reach(self.compiled.filter(j), from, &self.addrs[j]),
                })
                .collect(),
        )
    }

    /// `me`'s packet filter as JSON; `None` when there is no policy. A
    /// node the build did not know yet gets `[]`: nothing in, until the
    /// build that includes it.
    pub fn filter_json(&self, me: i64) -> Option<&str> {
        self.policy.as_ref()?;
        Some(self.filters.get(&me).map_or("[]", String::as_str))
    }
}

/// SplitMix64's finalizer: spreads consecutive ids over all 64 bits.
fn mix(id: i64) -> u64 {
    let mut z = (id as u64).wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(id: i64, v4: [u8; 4], user: Option<i64>, tags: &[&str]) -> NodeRecord {
        NodeRecord {
            ipv4: v4.into(),
            tags: tags.iter().map(|t| t.to_string()).collect(),
            user_id: user,
            ..NodeRecord::for_test(id)
        }
    }

    fn user(id: i64, name: &str) -> UserRecord {
        UserRecord {
            id,
            name: name.into(),
            email: format!("{name}@example.com"),
            display_name: String::new(),
            created_ms: 0,
        }
    }

    #[test]
    fn visibility_and_filters_follow_the_policy_and_fail_closed() {
        let nodes = [
            node(1, [100, 64, 0, 1], Some(1), &[]),
            node(2, [100, 64, 0, 2], Some(2), &[]),
            node(3, [100, 64, 0, 3], Some(2), &["tag:server"]),
        ];
        let users = vec![user(1, "alice"), user(2, "bob")];
        let text = r#"{"tagOwners": {"tag:server": ["bob@example.com"]},
            "acls": [{"action": "accept", "src": ["alice@example.com"], "dst": ["tag:server:22"]}]}"#;
        let a = Access::build(Some(text.into()), users.clone(), nodes.iter());
        assert_eq!(a.visible_set(1), Some(HashSet::from([3])));
        assert_eq!(a.visible_set(2), Some(HashSet::new()), "bob is in no rule");
        assert!(a.filter_json(3).unwrap().contains("100.64.0.3/32"));
        assert_eq!(a.filter_json(1), Some("[]"));
        assert_eq!(a.filter_json(99), Some("[]"), "unknown node: nothing in");
        let reach = a.reach(1).unwrap();
        assert_eq!(reach.len(), 1);
        assert_eq!(reach[0].key, nodes[2].key);
        let allows: Vec<String> = reach[0].allows.iter().map(|a| a.to_string()).collect();
        assert_eq!(allows, ["icmp", "tcp/22", "udp/22", "ipv6-icmp"]);
        let back = a.reach(3).unwrap();
        assert!(
            back[0].allows.is_empty(),
            "alice's node allows the server nothing"
        );
        assert_eq!(a.reach(2), Some(vec![]));

        // The digest follows the set, whatever stands for it.
        let everyone = r#"{"acls": [{"action": "accept", "src": ["*"], "dst": ["*:*"]}]}"#;
        let all = Access::build(Some(everyone.into()), users.clone(), nodes.iter());
        let open = Access::build(None, users.clone(), nodes.iter());
        assert_eq!(all.visible_digest(1), open.visible_digest(1));
        assert_ne!(a.visible_digest(1), open.visible_digest(1));
        assert_eq!(a.visible_digest(2), 0, "bob sees nobody");
        assert_ne!(a.visible_digest(1), a.visible_digest(3));

        assert_eq!(open.visible_set(2), None);
        assert_eq!(open.filter_json(2), None);
        assert_eq!(open.reach(2), None);

        let broken = Access::build(Some("{not json".into()), users, nodes.iter());
        assert!(broken.error.is_some());
        assert_eq!(broken.filter_json(3), Some("[]"));
        assert_eq!(broken.visible_set(1), Some(HashSet::new()));
    }
}
