//! Administration of users and the access policy: what `user …` and
//! `policy …` print (README, "Access policy").
//!
//! Like `admin.rs` these work on the store directly. A policy is parsed,
//! checked against the network's users and its `tests` run before it is
//! stored; a refused one changes nothing. `policy check` and `policy
//! filter` also run offline against an inventory file (`--nodes`), to
//! review a policy before it goes live.

use std::fmt::Write as _;
use std::path::Path;

use warren::policy::eval::{proto_name, Principal, PrincipalError};
use warren::policy::inventory::InventoryError;
use warren::policy::{compile, selector, Inventory, Policy, PolicyError, Selector};
use warren::text::for_terminal;

use crate::store::users::inventory;
use crate::store::{Store, StoreError};

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AdminError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{file}: {source}")]
    Policy {
        file: String,
        #[source]
        source: PolicyError,
    },
    #[error("{file}: {source}")]
    Inventory {
        file: String,
        #[source]
        source: InventoryError,
    },
    #[error("reading {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("no node {0:?} in the network")]
    NoSuchNode(String),
    #[error("{0}")]
    Principal(#[from] PrincipalError),
    #[error("{0}")]
    Word(#[from] selector::WordError),
}

type R<T> = Result<T, AdminError>;

fn read(path: &Path) -> R<String> {
    std::fs::read_to_string(path).map_err(|source| AdminError::Io {
        path: path.display().to_string(),
        source,
    })
}

fn json<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_string_pretty(v).unwrap_or_default() + "\n"
}

/// The live network as the policy sees it.
pub async fn live_inventory(store: &Store) -> R<Inventory> {
    let users = store.list_users().await?;
    let nodes = store.list_nodes().await?;
    Ok(inventory(&users, &nodes))
}

/// An inventory file, or the live network without one.
async fn inventory_from(store: Option<&Store>, nodes: Option<&Path>) -> R<Inventory> {
    match (nodes, store) {
        (Some(path), _) => {
            Inventory::from_json(&read(path)?).map_err(|source| AdminError::Inventory {
                file: path.display().to_string(),
                source,
            })
        }
        (None, Some(store)) => live_inventory(store).await,
        (None, None) => Ok(Inventory::default()),
    }
}

fn load(text: &str, file: &str, inv: &Inventory) -> R<Policy> {
    Policy::load(text, inv).map_err(|source| AdminError::Policy {
        file: file.to_owned(),
        source,
    })
}

fn ignored_note(p: &Policy) -> String {
    p.ignored
        .iter()
        .map(|s| {
            format!(
                "note: {}: the section {:?} is not used by warren and is ignored\n",
                s.pos, s.value
            )
        })
        .collect()
}

pub async fn user_create(
    store: &Store,
    email: &str,
    name: Option<&str>,
    display: &str,
    as_json: bool,
) -> R<String> {
    let u = store.create_user(email, name, display).await?;
    Ok(if as_json {
        json(&u)
    } else {
        format!(
            "created user {} ({})\n",
            for_terminal(&u.email),
            for_terminal(&u.name)
        )
    })
}

pub async fn user_list(store: &Store, as_json: bool) -> R<String> {
    let users = store.list_users().await?;
    if as_json {
        return Ok(json(&users));
    }
    let nodes = store.list_nodes().await?;
    let mut out = format!("{:<6} {:<16} {:<32} {}\n", "ID", "NAME", "EMAIL", "NODES");
    for u in &users {
        let owned = nodes.iter().filter(|n| n.user_id == Some(u.id)).count();
        let _ = writeln!(
            out,
            "{:<6} {:<16} {:<32} {owned}",
            u.id,
            for_terminal(&u.name),
            for_terminal(&u.email)
        );
    }
    Ok(out)
}

pub async fn user_remove(store: &Store, which: &str, force: bool, as_json: bool) -> R<String> {
    let (u, nodes) = store.remove_user(which, force).await?;
    let names: Vec<&str> = nodes.iter().map(|n| n.name.as_str()).collect();
    Ok(if as_json {
        json(&serde_json::json!({"removed": u, "nodes_removed": names}))
    } else if names.is_empty() {
        format!("removed user {}\n", for_terminal(&u.email))
    } else {
        format!(
            "removed user {} and their nodes {}\n",
            for_terminal(&u.email),
            for_terminal(&names.join(", "))
        )
    })
}

/// `policy set FILE`: validate, run the tests, store; replicas follow.
pub async fn policy_set(store: &Store, path: &Path, as_json: bool) -> R<String> {
    let text = read(path)?;
    let inv = live_inventory(store).await?;
    let p = load(&text, &path.display().to_string(), &inv)?;
    store.set_policy_text(Some(&text)).await?;
    let approved = approve_pending(store, &p).await?;
    Ok(if as_json {
        json(&serde_json::json!({
            "stored": true,
            "rules": p.rules.len(),
            "tests": p.tests.len(),
            "routes_approved": approved,
        }))
    } else {
        let routes = match approved {
            0 => String::new(),
            n => format!("; {n} pending route(s) approved by autoApprovers"),
        };
        format!(
            "{}policy stored: {} rules, {} tests passed{routes}; agents get their filters within a second\n",
            ignored_note(&p),
            p.rules.len(),
            p.tests.len()
        )
    })
}

/// Approves every pending route the new policy's `autoApprovers` cover
/// (as when a node advertises: `api::auto_approve`); returns how many.
async fn approve_pending(store: &Store, p: &Policy) -> R<usize> {
    let users = store.list_users().await?;
    let mut count = 0;
    for n in store.list_nodes().await? {
        let pending: Vec<ipnet::IpNet> = n
            .advertised_routes
            .iter()
            .filter(|r| !n.approved_routes.contains(r))
            .copied()
            .collect();
        if pending.is_empty() {
            continue;
        }
        let inv = inventory(&users, std::slice::from_ref(&n));
        let auto = p.auto_approved(&inv, std::net::IpAddr::V4(n.ipv4), &pending);
        if !auto.is_empty() {
            count += auto.len();
            store.change_routes(n.id, &auto, true).await?;
        }
    }
    Ok(count)
}

pub async fn policy_clear(store: &Store, as_json: bool) -> R<String> {
    store.set_policy_text(None).await?;
    Ok(if as_json {
        json(&serde_json::json!({"stored": false}))
    } else {
        "policy removed: every node may reach every other\n".into()
    })
}

pub async fn policy_get(store: &Store, as_json: bool) -> R<String> {
    let text = store.policy_text().await?;
    Ok(match (text, as_json) {
        (Some(t), false) => t,
        (None, false) => {
            "no policy is set: every node may reach every other (Tailscale's default)\n".into()
        }
        (t, true) => json(&serde_json::json!({ "policy": t })),
    })
}

/// `policy check FILE [--nodes INVENTORY]`: what `set` would say, storing
/// nothing.
pub async fn policy_check(
    store: Option<&Store>,
    path: &Path,
    nodes: Option<&Path>,
    as_json: bool,
) -> R<String> {
    let text = read(path)?;
    let inv = inventory_from(store, nodes).await?;
    let p = load(&text, &path.display().to_string(), &inv)?;
    Ok(if as_json {
        json(&serde_json::json!({"ok": true, "rules": p.rules.len(), "tests": p.tests.len()}))
    } else {
        format!(
            "{}{}: ok, {} rules, {} tests passed\n",
            ignored_note(&p),
            path.display(),
            p.rules.len(),
            p.tests.len()
        )
    })
}

/// The policy to judge by: a file, else the stored one (`None`: none).
async fn policy_from(
    store: Option<&Store>,
    file: Option<&Path>,
    inv: &Inventory,
) -> R<Option<Policy>> {
    let (text, name) = match (file, store) {
        (Some(f), _) => (Some(read(f)?), f.display().to_string()),
        (None, Some(s)) => (s.policy_text().await?, "the stored policy".to_owned()),
        (None, None) => (None, String::new()),
    };
    text.map(|t| load(&t, &name, inv)).transpose()
}

/// `policy filter [NODE]`: the compiled filter of one node, or of every
/// node keyed by name (always JSON: it is the wire format).
pub async fn policy_filter(
    store: Option<&Store>,
    node: Option<&str>,
    policy: Option<&Path>,
    nodes: Option<&Path>,
) -> R<String> {
    let inv = inventory_from(store, nodes).await?;
    let p = policy_from(store, policy, &inv).await?;
    let c = compile(p.as_ref(), &inv);
    let filter_of = |i: usize| match &p {
        Some(_) => serde_json::to_value(c.filter(i)).unwrap_or_default(),
        None => serde_json::Value::Null,
    };
    Ok(match node {
        Some(name) => {
            let i = inv
                .nodes
                .iter()
                .position(|n| n.name == name)
                .ok_or_else(|| AdminError::NoSuchNode(name.to_owned()))?;
            json(&filter_of(i))
        }
        None => {
            let all: serde_json::Map<String, serde_json::Value> = inv
                .nodes
                .iter()
                .enumerate()
                .map(|(i, n)| (n.name.clone(), filter_of(i)))
                .collect();
            json(&all)
        }
    })
}

/// A word naming one identity: a user, tag, host, address, or a node's
/// name (which stands for its address).
fn principal(p: &Policy, inv: &Inventory, word: &str) -> R<Principal> {
    if let Some(n) = inv.node_by_name(word) {
        return Ok(Principal::Addr(n.ipv4.into()));
    }
    Ok(Principal::resolve(p, &Selector::parse(word)?)?)
}

/// `policy explain SRC DST[:PORT]`: which rule allows it, or that none does.
#[allow(clippy::too_many_arguments)]
pub async fn policy_explain(
    store: Option<&Store>,
    src: &str,
    dst: &str,
    proto: &str,
    policy: Option<&Path>,
    nodes: Option<&Path>,
    as_json: bool,
) -> R<String> {
    let inv = inventory_from(store, nodes).await?;
    let Some(p) = policy_from(store, policy, &inv).await? else {
        return Ok(if as_json {
            json(&serde_json::json!({"allowed": true, "rule": null, "why": "no policy"}))
        } else {
            "allowed: no policy is set, so everything is\n".into()
        });
    };
    let (dst_word, port) = match dst.rsplit_once(':') {
        Some((d, port)) if !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()) => (
            d,
            port.parse::<u16>()
                .map_err(|_| selector::WordError::BadPorts(port.into()))?,
        ),
        _ => (dst, 0),
    };
    let protos = selector::parse_proto(proto)?;
    let (s, d) = (principal(&p, &inv, src)?, principal(&p, &inv, dst_word)?);
    let rule = protos
        .iter()
        .find_map(|&pr| p.allowing_rule(&inv, &s, &d, pr, port).map(|r| (pr, r)));
    Ok(match (rule, as_json) {
        (Some((pr, r)), true) => json(&serde_json::json!({
            "allowed": true, "rule": r.entry, "line": r.pos.line, "proto": proto_name(pr)})),
        (None, true) => json(&serde_json::json!({"allowed": false, "rule": null})),
        (Some((pr, r)), false) => format!(
            "allowed ({}): {} at {} lets {s} reach {d}:{port}\n",
            proto_name(pr),
            r.entry,
            r.pos
        ),
        (None, false) => format!("denied: no rule lets {s} reach {d}:{port} over {proto}\n"),
    })
}
