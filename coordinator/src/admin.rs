//! Administration: what `token …` and `node …` subcommands print.
//!
//! These work on the store directly, not through the API, so they need no
//! credentials beyond access to the data directory or database. Changes
//! they make are noted like any other (see `store`), so a running
//! coordinator pushes them to connected agents within a second.

use std::fmt::Write as _;

use warren::text::for_terminal;

use crate::store::{NewToken, NodeRecord, Store, StoreError, TokenInfo};

fn when(ms: i64) -> String {
    if ms <= 0 {
        return "-".into();
    }
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms as u64);
    humantime::format_rfc3339_seconds(t).to_string()
}

/// Creates a token and returns the text to print: the token itself on the
/// first line (so scripts can take `head -1`), then what it grants.
pub async fn token_create(store: &Store, spec: &NewToken) -> Result<String, StoreError> {
    let (id, token) = store.create_token(spec).await?;
    let mut out = format!("{token}\n");
    let _ = write!(
        out,
        "# id {id}; {}{}{}",
        if spec.reusable { "reusable" } else { "one-off" },
        if spec.ephemeral {
            ", ephemeral nodes"
        } else {
            ""
        },
        match spec.expires_in {
            Some(d) => format!(", expires in {}", humantime::format_duration(d)),
            None => ", never expires".into(),
        }
    );
    if !spec.tags.is_empty() {
        let _ = write!(out, ", tags {}", spec.tags.join(","));
    }
    out.push_str("\n# This is the only time the token is shown.\n");
    Ok(out)
}

/// `token list` as a table, or JSON.
pub async fn token_list(store: &Store, json: bool) -> Result<String, StoreError> {
    let tokens = store.list_tokens().await?;
    if json {
        return Ok(serde_json::to_string_pretty(&tokens).unwrap_or_default() + "\n");
    }
    let mut out = format!(
        "{:<12} {:<9} {:<9} {:<5} {:<8} {:<21} {}\n",
        "ID", "KIND", "NODES", "USES", "STATE", "EXPIRES", "TAGS"
    );
    for t in &tokens {
        let _ = writeln!(
            out,
            "{:<12} {:<9} {:<9} {:<5} {:<8} {:<21} {}",
            t.id,
            if t.reusable { "reusable" } else { "one-off" },
            if t.ephemeral { "ephemeral" } else { "normal" },
            t.uses,
            state(t),
            t.expires_ms.map(when).unwrap_or_else(|| "never".into()),
            t.tags.join(",")
        );
    }
    Ok(out)
}

fn state(t: &TokenInfo) -> &'static str {
    if t.revoked {
        "revoked"
    } else if t.expires_ms.is_some_and(|e| e <= crate::store::now_ms()) {
        "expired"
    } else if !t.reusable && t.uses > 0 {
        "used"
    } else {
        "valid"
    }
}

/// `node list` as a table, or JSON (every stored field but the netcheck
/// summary's insides, which JSON output keeps).
pub async fn node_list(store: &Store, json: bool) -> Result<String, StoreError> {
    let nodes = store.list_nodes().await?;
    if json {
        return Ok(serde_json::to_string_pretty(&nodes).unwrap_or_default() + "\n");
    }
    let users = store.list_users().await?;
    let mut out = format!(
        "{:<5} {:<20} {:<15} {:<28} {:<7} {:<21} {:<8} {:<6} {:<11} {:<24} {:<20} {}\n",
        "ID",
        "NAME",
        "IPV4",
        "IPV6",
        "ONLINE",
        "LAST SEEN",
        "VERSION",
        "RELAY",
        "NAT",
        "OWNER",
        "ROUTES",
        "ENDPOINTS"
    );
    for n in &nodes {
        // A tagged node is owned by its tags, not by the user who joined it
        // (README, "Access policy").
        let tags = n.all_tags();
        let owner = if !tags.is_empty() {
            tags.join(",")
        } else {
            n.user_id
                .and_then(|id| users.iter().find(|u| u.id == id))
                .map_or_else(|| "-".into(), |u| u.email.clone())
        };
        let _ = writeln!(
            out,
            "{:<5} {:<20} {:<15} {:<28} {:<7} {:<21} {:<8} {:<6} {:<11} {:<24} {:<20} {}",
            n.id,
            for_terminal(&n.name),
            n.ipv4,
            n.ipv6,
            if n.online { "yes" } else { "no" },
            when(n.last_seen_ms),
            for_terminal(&n.version),
            n.home_relay
                .map(|r| r.to_string())
                .unwrap_or_else(|| "-".into()),
            nat(n),
            for_terminal(&owner),
            crate::admin_routes::served_summary(n),
            endpoints(n)
        );
    }
    Ok(out)
}

/// The node's NAT in a few characters. "UDP blocked" comes from the
/// netcheck report (the summary only describes mappings, and a node whose
/// UDP never got out has none).
fn nat(n: &NodeRecord) -> String {
    let udp = n
        .netcheck
        .as_ref()
        .and_then(|v| v.get("udp"))
        .and_then(|v| v.as_bool());
    if udp == Some(false) {
        "UDP blocked".into()
    } else {
        n.nat.short()
    }
}

fn endpoints(n: &NodeRecord) -> String {
    let list: Vec<String> = n
        .endpoints
        .iter()
        .map(|e| {
            format!(
                "{}({})",
                e.addr,
                serde_json::to_value(e.kind)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_owned))
                    .unwrap_or_default()
            )
        })
        .collect();
    if list.is_empty() {
        "-".into()
    } else {
        list.join(" ")
    }
}

/// `node remove NODE` (by id, name or key).
pub async fn node_remove(store: &Store, which: &str) -> Result<String, StoreError> {
    let node = store.find_node(which).await?;
    let node = store.remove_node(node.id).await?;
    Ok(format!(
        "removed node {} ({}, {})\n",
        node.id, node.name, node.ipv4
    ))
}

/// `node rename NODE NAME`.
pub async fn node_rename(store: &Store, which: &str, name: &str) -> Result<String, StoreError> {
    let node = store.find_node(which).await?;
    let node = store.rename_node(node.id, name).await?;
    Ok(format!("node {} is now {}\n", node.id, node.name))
}

#[cfg(test)]
mod tests {
    use warren::control::EndpointsReport;
    use warren::keys::PrivateKey;
    use warren::traversal::{Allocation, Mapping, NatSummary};

    use super::*;
    use crate::store::RegisterInput;

    /// Registers a node named `name` and stores its endpoint report.
    async fn node_with(store: &Store, token: &str, name: &str, report: EndpointsReport) {
        let ula = store.ula_prefix().await.unwrap();
        let mut tx = store.begin().await.unwrap();
        let input = RegisterInput {
            token: Some(token.to_owned()),
            node_key: PrivateKey::generate().public(),
            disco_key: PrivateKey::generate().public(),
            hostname: name.into(),
            os: "linux".into(),
            version: "0".into(),
            tags: None,
            routes: None,
        };
        let node = store.register(&mut tx, &input, ula).await.unwrap().node;
        store.set_endpoints(&mut tx, &node, &report).await.unwrap();
        tx.commit().await.unwrap();
    }

    fn reported(mapping: Mapping, allocation: Allocation, udp: bool) -> EndpointsReport {
        EndpointsReport {
            netcheck: Some(serde_json::json!({ "udp": udp })),
            nat: NatSummary {
                mapping,
                allocation,
                observed: None,
            },
            ..EndpointsReport::endpoints(&[])
        }
    }

    #[tokio::test]
    async fn node_list_has_a_nat_column() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&Store::sqlite_url(dir.path())).await.unwrap();
        let spec = NewToken {
            reusable: true,
            ..Default::default()
        };
        let token = store.create_token(&spec).await.unwrap().1;
        let seq = Allocation::Sequential { step: 1 };
        for (name, report) in [
            (
                "easy",
                reported(Mapping::EndpointIndependent, Allocation::Preserving, true),
            ),
            ("hard", reported(Mapping::EndpointDependent, seq, true)),
            (
                "public",
                reported(Mapping::None, Allocation::Preserving, true),
            ),
            (
                "blocked",
                reported(Mapping::Unknown, Allocation::Unknown, false),
            ),
            ("fresh", EndpointsReport::endpoints(&[])),
        ] {
            node_with(&store, &token, name, report).await;
        }
        let text = node_list(&store, false).await.unwrap();
        let mut lines = text.lines();
        let header = lines.next().unwrap();
        let col = header.find("NAT ").expect("a NAT column");
        let nat_of = |name: &str| {
            let line = text
                .lines()
                .find(|l| l.split_whitespace().nth(1) == Some(name))
                .unwrap_or_else(|| panic!("{name} missing:\n{text}"));
            line[col..col + 11].trim().to_owned()
        };
        assert_eq!(nat_of("easy"), "EIM", "{text}");
        assert_eq!(nat_of("hard"), "EDM seq+1", "{text}");
        assert_eq!(nat_of("public"), "no NAT", "{text}");
        assert_eq!(nat_of("blocked"), "UDP blocked", "{text}");
        assert_eq!(nat_of("fresh"), "-", "{text}");
    }
}
