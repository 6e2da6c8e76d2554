//! The policy's meaning between identities (a user, a tag, an address),
//! without compiling it for any node: what a file's `tests` assert, and
//! what `policy explain SRC DST[:PORT]` answers ("acls[2] allows it").
//!
//! An address is also the identity of the node that owns it, when the
//! network (the inventory) has one: `tests` may then be written with
//! node addresses and still mean users and tags.

use std::net::IpAddr;

use super::selector::{self, Selector};
use super::{Inventory, Policy, PolicyError, PolicyErrorKind as K, Rule};

/// Who a packet is from or to, as the policy sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Principal {
    User(String),
    Tag(String),
    Addr(IpAddr),
}

impl std::fmt::Display for Principal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Principal::User(s) | Principal::Tag(s) => f.write_str(s),
            Principal::Addr(ip) => write!(f, "{ip}"),
        }
    }
}

/// Why a word cannot name one identity (`policy explain`, `tests`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PrincipalError {
    #[error("{0}")]
    Word(#[from] selector::WordError),
    #[error("{0} names many identities; name a user, a tag, a host or an address")]
    NotOne(String),
    #[error("host {0:?} is not defined in hosts")]
    UnknownHost(String),
}

impl Principal {
    /// A user email, tag, host alias or address.
    pub fn resolve(policy: &Policy, sel: &Selector) -> Result<Principal, PrincipalError> {
        match sel {
            Selector::User(u) => Ok(Principal::User(u.clone())),
            Selector::Tag(t) => Ok(Principal::Tag(t.clone())),
            Selector::Host(h) => policy
                .host(h)
                .map(|a| Principal::Addr(a.prefix.network()))
                .ok_or_else(|| PrincipalError::UnknownHost(h.clone())),
            Selector::Prefix(p) if p.prefix_len() == p.max_prefix_len() => {
                Ok(Principal::Addr(p.addr()))
            }
            other => Err(PrincipalError::NotOne(other.to_string())),
        }
    }
}

impl Policy {
    /// Whether `sel` covers `who`; `src` is the packet's source, which
    /// `autogroup:self` compares with.
    fn covers(&self, inv: &Inventory, sel: &Selector, who: &Principal, src: &Principal) -> bool {
        // The identities an address stands for: the owning node's.
        let node = match who {
            Principal::Addr(ip) => inv.node_by_ip(*ip),
            _ => None,
        };
        let user = match who {
            Principal::User(u) => Some(u.as_str()),
            Principal::Addr(_) => node.and_then(|n| inv.owner_email(n)),
            Principal::Tag(_) => None,
        };
        let has_tag = |t: &str| match who {
            Principal::Tag(x) => x == t,
            _ => node.is_some_and(|n| n.tags.iter().any(|x| x == t)),
        };
        let tagged = matches!(who, Principal::Tag(_)) || node.is_some_and(|n| n.is_tagged());
        let addr_in = |p: &ipnet::IpNet| match who {
            Principal::Addr(ip) => p.contains(ip),
            _ => false,
        };
        match sel {
            Selector::All | Selector::DangerAll => true,
            Selector::User(u) => user.is_some_and(|x| x.eq_ignore_ascii_case(u)),
            Selector::Group(g) => user.is_some_and(|x| {
                self.group(g)
                    .is_some_and(|g| g.members.iter().any(|m| m.value.eq_ignore_ascii_case(x)))
            }),
            Selector::Tag(t) => has_tag(t),
            Selector::Host(h) => self.host(h).is_some_and(|a| addr_in(&a.prefix)),
            Selector::Prefix(p) => addr_in(p),
            Selector::Member => user.is_some(),
            Selector::Tagged => tagged,
            Selector::SelfDevices => {
                let src_user = Policy::principal_user(inv, src);
                user.is_some() && src_user.is_some() && src_user == user.map(str::to_owned)
            }
            Selector::Internet => match who {
                Principal::Addr(ip) => node.is_none() && is_internet(*ip),
                _ => false,
            },
        }
    }

    fn principal_user(inv: &Inventory, p: &Principal) -> Option<String> {
        match p {
            Principal::User(u) => Some(u.to_ascii_lowercase()),
            Principal::Addr(ip) => inv
                .node_by_ip(*ip)
                .and_then(|n| inv.owner_email(n))
                .map(str::to_ascii_lowercase),
            Principal::Tag(_) => None,
        }
    }

    /// The first rule that lets `src` reach `dst` on `proto`/`port`
    /// (the port is ignored for protocols without ports).
    pub fn allowing_rule(
        &self,
        inv: &Inventory,
        src: &Principal,
        dst: &Principal,
        proto: u8,
        port: u16,
    ) -> Option<&Rule> {
        // Compare users case-insensitively, as emails are.
        let lower = |p: &Principal| match p {
            Principal::User(u) => Principal::User(u.to_ascii_lowercase()),
            other => other.clone(),
        };
        let (src, dst) = (lower(src), lower(dst));
        self.rules.iter().find(|r| {
            r.protos.contains(&proto)
                && r.src.iter().any(|s| self.covers(inv, &s.value, &src, &src))
                && r.dst.iter().any(|d| {
                    (!selector::has_ports(proto) || d.ports.iter().any(|p| p.contains(port)))
                        && self.covers(inv, &d.sel.value, &dst, &src)
                })
        })
    }

    /// The routes among `advertised` that `autoApprovers` approves for the
    /// node at `node_ip`, as Tailscale's: a subnet route when an entry of
    /// `routes` covers it (the entry's prefix or a part of it) and one of
    /// its approvers covers the node (a user or group owning it, or one of
    /// its tags); a default route (`0.0.0.0/0`, `::/0`) when `exitNode`
    /// covers the node. Used when a router advertises (issue 18).
    pub fn auto_approved(
        &self,
        inv: &Inventory,
        node_ip: IpAddr,
        advertised: &[ipnet::IpNet],
    ) -> Vec<ipnet::IpNet> {
        let who = Principal::Addr(node_ip);
        let covered = |sel: &Selector| self.covers(inv, sel, &who, &who);
        advertised
            .iter()
            .filter(|route| {
                if route.prefix_len() == 0 {
                    return self
                        .auto_approvers
                        .exit_node
                        .iter()
                        .any(|s| covered(&s.value));
                }
                self.auto_approvers.routes.iter().any(|a| {
                    a.prefix.contains(*route) && a.approvers.iter().any(|s| covered(&s.value))
                })
            })
            .copied()
            .collect()
    }

    /// Whether a node may advertise `tag` (`warren up --advertise-tags`):
    /// `tagOwners` names its user (by email, a group, or
    /// `autogroup:member`) or a tag its token granted. A tag with no entry
    /// is nobody's, as in Tailscale.
    pub fn may_use_tag(&self, user: Option<&str>, granted: &[String], tag: &str) -> bool {
        let Some(owners) = self.tag_owner(tag) else {
            return false;
        };
        owners.owners.iter().any(|o| match (&o.value, user) {
            (Selector::User(u), Some(me)) => u.eq_ignore_ascii_case(me),
            (Selector::Group(g), Some(me)) => self
                .group(g)
                .is_some_and(|g| g.members.iter().any(|m| m.value.eq_ignore_ascii_case(me))),
            (Selector::Member, Some(_)) => true,
            (Selector::Tag(t), _) => granted.iter().any(|x| x == t),
            _ => false,
        })
    }

    /// Runs the file's `tests`; the first that fails is the error.
    pub fn run_tests(&self, inv: &Inventory) -> Result<(), PolicyError> {
        for t in &self.tests {
            let at = |kind| PolicyError {
                pos: t.pos,
                entry: t.entry.clone(),
                kind: Box::new(kind),
            };
            let word = |e: PrincipalError| match e {
                PrincipalError::Word(w) => at(K::Word(w)),
                other => at(K::Principal(other)),
            };
            let src = Principal::resolve(self, &t.src.value).map_err(word)?;
            for (targets, want) in [(&t.accept, true), (&t.deny, false)] {
                for d in targets {
                    let dst = Principal::resolve(self, &d.sel.value).map_err(word)?;
                    for range in &d.ports {
                        for &proto in &t.protos {
                            for port in [range.first, range.last] {
                                let got =
                                    self.allowing_rule(inv, &src, &dst, proto, port).is_some();
                                if got != want {
                                    return Err(at(K::TestFailed {
                                        src: src.to_string(),
                                        dst: format!("{dst}:{port}"),
                                        proto: proto_name(proto),
                                        verb: if got { "can reach" } else { "cannot reach" },
                                        says: if want { "must" } else { "must not" },
                                    }));
                                }
                            }
                        }
                    }
                }
            }
        }
        Ok(())
    }
}

/// Not an overlay, private, loopback or link-local address.
fn is_internet(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let cgnat = ipnet::Ipv4Net::new(std::net::Ipv4Addr::new(100, 64, 0, 0), 10)
                .is_ok_and(|n| n.contains(&v4));
            !(v4.is_private()
                || v4.is_loopback()
                || v4.is_link_local()
                || v4.is_unspecified()
                || cgnat)
        }
        IpAddr::V6(v6) => {
            let ula = (v6.segments()[0] & 0xfe00) == 0xfc00;
            let link_local = (v6.segments()[0] & 0xffc0) == 0xfe80;
            !(ula || link_local || v6.is_loopback() || v6.is_unspecified())
        }
    }
}

/// A protocol number as people say it.
pub fn proto_name(p: u8) -> String {
    match p {
        selector::TCP => "tcp".into(),
        selector::UDP => "udp".into(),
        selector::ICMP => "icmp".into(),
        selector::ICMPV6 => "ipv6-icmp".into(),
        selector::SCTP => "sctp".into(),
        n => format!("proto {n}"),
    }
}
