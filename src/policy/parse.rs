//! From the HuJSON tree to a [`Policy`]: every section and key Tailscale
//! defines for network access, each value checked for its shape, every
//! unknown key refused with its place. Whether the names in it exist is
//! checked afterwards (`check.rs`), against the file itself and the
//! network's users.
//!
//! `acls` and `grants` both become [`Rule`]s, one per (rule, protocol
//! set), so the compiler and the `tests` see one kind of rule: an acl's
//! `dst` carries its ports, a grant's `ip` list gives the ports of all its
//! destinations.

use super::hujson::{self, Member, Node, Pos, Value};
use super::selector::{self, PortRange, Selector, WordError, DEFAULT_PROTOS};
use super::{
    AutoApprovers, Dst, Group, HostAlias, Policy, PolicyError, PolicyErrorKind as K, PolicyTest,
    RouteApprover, Rule, Spanned, TagOwner,
};

/// Sections of Tailscale's policy that configure what warren does not do
/// (SSH, node attributes, device posture...). A file moved from Tailscale
/// keeps them; they are read past, and `policy set` says so.
pub const IGNORED_SECTIONS: &[&str] = &[
    "ssh",
    "sshTests",
    "nodeAttrs",
    "postures",
    "defaultSrcPosture",
    "derpMap",
    "disableIPv4",
    "randomizeClientPort",
    "OneCGNATRoute",
];

type R<T> = Result<T, PolicyError>;

fn err(pos: Pos, entry: &str, kind: K) -> PolicyError {
    PolicyError {
        pos,
        entry: entry.to_owned(),
        kind: Box::new(kind),
    }
}

fn object<'a>(node: &'a Node, entry: &str) -> R<&'a [Member]> {
    match &node.value {
        Value::Object(m) => Ok(m),
        other => Err(err(
            node.pos,
            entry,
            K::WrongType {
                expected: "an object",
                found: other.kind(),
            },
        )),
    }
}

fn list<'a>(node: &'a Node, entry: &str) -> R<&'a [Node]> {
    match &node.value {
        Value::Array(items) => Ok(items),
        other => Err(err(
            node.pos,
            entry,
            K::WrongType {
                expected: "a list",
                found: other.kind(),
            },
        )),
    }
}

fn string<'a>(node: &'a Node, entry: &str) -> R<&'a str> {
    match &node.value {
        Value::String(s) => Ok(s),
        other => Err(err(
            node.pos,
            entry,
            K::WrongType {
                expected: "a string",
                found: other.kind(),
            },
        )),
    }
}

fn strings<'a>(node: &'a Node, entry: &str) -> R<Vec<(&'a str, Pos)>> {
    list(node, entry)?
        .iter()
        .enumerate()
        .map(|(i, n)| Ok((string(n, &format!("{entry}[{i}]"))?, n.pos)))
        .collect()
}

fn word<T>(pos: Pos, entry: &str, r: Result<T, WordError>) -> R<T> {
    r.map_err(|e| err(pos, entry, K::Word(e)))
}

fn selectors(node: &Node, entry: &str) -> R<Vec<Spanned<Selector>>> {
    strings(node, entry)?
        .into_iter()
        .enumerate()
        .map(|(i, (s, pos))| {
            let value = word(pos, &format!("{entry}[{i}]"), Selector::parse(s))?;
            Ok(Spanned { value, pos })
        })
        .collect()
}

/// A `target:ports` entry of an acl's `dst` or a test's `accept`/`deny`.
fn target(s: &str, pos: Pos, entry: &str) -> R<Dst> {
    let (t, p) = word(pos, entry, selector::split_target(s))?;
    let ports = selector::parse_ports(p).map_err(|e| {
        // "tag:server" splits into "tag" and "server": the ports are missing.
        let kind = if p.chars().any(|c| c.is_ascii_alphabetic()) {
            WordError::NoPorts(s.to_owned())
        } else {
            e
        };
        err(pos, entry, K::Word(kind))
    })?;
    let sel = word(pos, entry, Selector::parse(t))?;
    Ok(Dst {
        sel: Spanned { value: sel, pos },
        ports,
    })
}

fn targets(node: &Node, entry: &str) -> R<Vec<Dst>> {
    strings(node, entry)?
        .into_iter()
        .enumerate()
        .map(|(i, (s, pos))| target(s, pos, &format!("{entry}[{i}]")))
        .collect()
}

/// Refuses keys other than `known` in an object, with the first one's place.
fn only_keys(members: &[Member], known: &[&str], entry: &str) -> R<()> {
    match members.iter().find(|m| !known.contains(&m.key.as_str())) {
        Some(m) => Err(err(
            m.key_pos,
            entry,
            K::UnknownKey {
                key: m.key.clone(),
                known: known.join(", "),
            },
        )),
        None => Ok(()),
    }
}

fn get<'a>(members: &'a [Member], key: &str) -> Option<&'a Node> {
    members.iter().find(|m| m.key == key).map(|m| &m.value)
}

fn require<'a>(members: &'a [Member], keys: &[&'static str], at: Pos, entry: &str) -> R<&'a Node> {
    keys.iter()
        .find_map(|k| get(members, k))
        .ok_or_else(|| err(at, entry, K::MissingKey(keys[0])))
}

/// Parses a policy file's text; see the module doc.
pub fn parse(text: &str) -> R<Policy> {
    let root = hujson::parse(text).map_err(|e| err(e.pos, "", K::Syntax(e.message)))?;
    let mut policy = Policy::default();
    for m in object(&root, "the file")? {
        let node = &m.value;
        match m.key.as_str() {
            "groups" => policy.groups = groups(node)?,
            "tagOwners" => policy.tag_owners = tag_owners(node)?,
            "hosts" => policy.hosts = hosts(node)?,
            "acls" => {
                for (i, n) in list(node, "acls")?.iter().enumerate() {
                    policy.rules.push(acl(n, &format!("acls[{i}]"))?);
                }
            }
            "grants" => {
                for (i, n) in list(node, "grants")?.iter().enumerate() {
                    policy.rules.extend(grant(n, &format!("grants[{i}]"))?);
                }
            }
            "autoApprovers" => policy.auto_approvers = auto_approvers(node)?,
            "tests" => {
                for (i, n) in list(node, "tests")?.iter().enumerate() {
                    policy.tests.push(test(n, &format!("tests[{i}]"))?);
                }
            }
            k if IGNORED_SECTIONS.contains(&k) => policy.ignored.push(Spanned {
                value: k.to_owned(),
                pos: m.key_pos,
            }),
            other => return Err(err(m.key_pos, "", K::UnknownSection(other.to_owned()))),
        }
    }
    Ok(policy)
}

fn groups(node: &Node) -> R<Vec<Group>> {
    object(node, "groups")?
        .iter()
        .map(|m| {
            let entry = format!("groups.{:?}", m.key);
            let Some(name) = m.key.strip_prefix("group:").filter(|n| !n.is_empty()) else {
                return Err(err(
                    m.key_pos,
                    &entry,
                    K::BadName {
                        what: "group",
                        name: m.key.clone(),
                        prefix: "group:",
                    },
                ));
            };
            let members = strings(&m.value, &entry)?
                .into_iter()
                .map(|(s, pos)| Spanned {
                    value: s.to_owned(),
                    pos,
                })
                .collect();
            Ok(Group {
                name: name.to_owned(),
                pos: m.key_pos,
                members,
            })
        })
        .collect()
}

fn tag_owners(node: &Node) -> R<Vec<TagOwner>> {
    object(node, "tagOwners")?
        .iter()
        .map(|m| {
            let entry = format!("tagOwners.{:?}", m.key);
            if crate::control::validate_tag(&m.key).is_err() {
                return Err(err(
                    m.key_pos,
                    &entry,
                    K::BadName {
                        what: "tag",
                        name: m.key.clone(),
                        prefix: "tag:",
                    },
                ));
            }
            Ok(TagOwner {
                tag: m.key.clone(),
                pos: m.key_pos,
                owners: selectors(&m.value, &entry)?,
            })
        })
        .collect()
}

fn hosts(node: &Node) -> R<Vec<HostAlias>> {
    object(node, "hosts")?
        .iter()
        .map(|m| {
            let entry = format!("hosts.{:?}", m.key);
            match Selector::parse(&m.key) {
                Ok(Selector::Host(_)) => {}
                _ => {
                    return Err(err(
                        m.key_pos,
                        &entry,
                        K::BadName {
                            what: "host",
                            name: m.key.clone(),
                            prefix: "",
                        },
                    ))
                }
            }
            let s = string(&m.value, &entry)?;
            let prefix = selector::parse_prefix(s).ok_or_else(|| {
                err(
                    m.value.pos,
                    &entry,
                    K::Word(WordError::BadSelector(s.to_owned())),
                )
            })?;
            Ok(HostAlias {
                name: m.key.clone(),
                pos: m.key_pos,
                prefix,
            })
        })
        .collect()
}

fn protos(node: Option<&Node>, entry: &str) -> R<Vec<u8>> {
    match node {
        None => Ok(DEFAULT_PROTOS.to_vec()),
        Some(n) => {
            let s = string(n, &format!("{entry}.proto"))?;
            word(n.pos, &format!("{entry}.proto"), selector::parse_proto(s))
        }
    }
}

/// A protocol without ports (ICMP, GRE...) takes only `*`, as in Tailscale.
fn ports_fit(protos: &[u8], ports: &[PortRange], pos: Pos, entry: &str) -> R<()> {
    let specific = ports != [PortRange::ALL];
    if specific && protos.iter().all(|p| !selector::has_ports(*p)) {
        return Err(err(pos, entry, K::PortsWithoutProto(protos.to_vec())));
    }
    Ok(())
}

fn acl(node: &Node, entry: &str) -> R<Rule> {
    let m = object(node, entry)?;
    only_keys(
        m,
        &["action", "src", "dst", "proto", "users", "ports"],
        entry,
    )?;
    let action = string(require(m, &["action"], node.pos, entry)?, entry)?;
    if action != "accept" {
        return Err(err(node.pos, entry, K::BadAction(action.to_owned())));
    }
    let src = selectors(
        require(m, &["src", "users"], node.pos, entry)?,
        &format!("{entry}.src"),
    )?;
    let dst = targets(
        require(m, &["dst", "ports"], node.pos, entry)?,
        &format!("{entry}.dst"),
    )?;
    let protos = protos(get(m, "proto"), entry)?;
    for d in &dst {
        ports_fit(&protos, &d.ports, d.sel.pos, entry)?;
    }
    Ok(Rule {
        pos: node.pos,
        entry: entry.to_owned(),
        protos,
        src,
        dst,
    })
}

fn grant(node: &Node, entry: &str) -> R<Vec<Rule>> {
    let m = object(node, entry)?;
    if let Some(app) = get(m, "app") {
        return Err(err(app.pos, entry, K::AppGrant));
    }
    if let Some(via) = get(m, "via") {
        return Err(err(via.pos, entry, K::Unsupported("via (routing grants)")));
    }
    only_keys(m, &["src", "dst", "ip"], entry)?;
    let src = selectors(
        require(m, &["src"], node.pos, entry)?,
        &format!("{entry}.src"),
    )?;
    let dst_sel = selectors(
        require(m, &["dst"], node.pos, entry)?,
        &format!("{entry}.dst"),
    )?;
    let ip = strings(
        require(m, &["ip"], node.pos, entry)?,
        &format!("{entry}.ip"),
    )?;
    let mut rules = Vec::with_capacity(ip.len());
    for (i, (spec, pos)) in ip.into_iter().enumerate() {
        let e = format!("{entry}.ip[{i}]");
        // "*", "443", "tcp:22", "icmp:*".
        let (protos, ports) = match spec.split_once(':') {
            Some((proto, ports)) => (
                word(pos, &e, selector::parse_proto(proto))?,
                word(pos, &e, selector::parse_ports(ports))?,
            ),
            None => (
                DEFAULT_PROTOS.to_vec(),
                word(pos, &e, selector::parse_ports(spec))?,
            ),
        };
        ports_fit(&protos, &ports, pos, &e)?;
        let dst = dst_sel
            .iter()
            .map(|s| Dst {
                sel: s.clone(),
                ports: ports.clone(),
            })
            .collect();
        rules.push(Rule {
            pos: node.pos,
            entry: entry.to_owned(),
            protos,
            src: src.clone(),
            dst,
        });
    }
    Ok(rules)
}

fn auto_approvers(node: &Node) -> R<AutoApprovers> {
    let entry = "autoApprovers";
    let m = object(node, entry)?;
    only_keys(m, &["routes", "exitNode"], entry)?;
    let mut out = AutoApprovers::default();
    if let Some(routes) = get(m, "routes") {
        for r in object(routes, "autoApprovers.routes")? {
            let e = format!("autoApprovers.routes.{:?}", r.key);
            let prefix = selector::parse_prefix(&r.key).ok_or_else(|| {
                err(
                    r.key_pos,
                    &e,
                    K::Word(WordError::BadSelector(r.key.clone())),
                )
            })?;
            out.routes.push(RouteApprover {
                prefix,
                pos: r.key_pos,
                approvers: selectors(&r.value, &e)?,
            });
        }
    }
    if let Some(exit) = get(m, "exitNode") {
        out.exit_node = selectors(exit, "autoApprovers.exitNode")?;
    }
    Ok(out)
}

fn test(node: &Node, entry: &str) -> R<PolicyTest> {
    let m = object(node, entry)?;
    only_keys(m, &["src", "proto", "accept", "deny"], entry)?;
    let src_node = require(m, &["src"], node.pos, entry)?;
    let src = string(src_node, entry)?;
    let src = Spanned {
        value: word(src_node.pos, entry, Selector::parse(src))?,
        pos: src_node.pos,
    };
    // A test without `proto` is about TCP, the protocol its ports mean.
    let protos = match get(m, "proto") {
        None => vec![selector::TCP],
        some => protos(some, entry)?,
    };
    let accept =
        get(m, "accept").map_or(Ok(Vec::new()), |n| targets(n, &format!("{entry}.accept")))?;
    let deny = get(m, "deny").map_or(Ok(Vec::new()), |n| targets(n, &format!("{entry}.deny")))?;
    Ok(PolicyTest {
        pos: node.pos,
        entry: entry.to_owned(),
        src,
        protos,
        accept,
        deny,
    })
}
