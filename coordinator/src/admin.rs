//! Administration: what `token …` and `node …` subcommands print.
//!
//! These work on the store directly, not through the API, so they need no
//! credentials beyond access to the data directory or database. Changes
//! they make are noted like any other (see `store`), so a running
//! coordinator pushes them to connected agents within a second.

use std::fmt::Write as _;

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
    let mut out = format!(
        "{:<5} {:<20} {:<15} {:<28} {:<7} {:<21} {:<8} {:<6} {:<20} {}\n",
        "ID",
        "NAME",
        "IPV4",
        "IPV6",
        "ONLINE",
        "LAST SEEN",
        "VERSION",
        "RELAY",
        "TAGS",
        "ENDPOINTS"
    );
    for n in &nodes {
        let tags = n.all_tags();
        let _ = writeln!(
            out,
            "{:<5} {:<20} {:<15} {:<28} {:<7} {:<21} {:<8} {:<6} {:<20} {}",
            n.id,
            n.name,
            n.ipv4,
            n.ipv6,
            if n.online { "yes" } else { "no" },
            when(n.last_seen_ms),
            n.version,
            n.home_relay
                .map(|r| r.to_string())
                .unwrap_or_else(|| "-".into()),
            if tags.is_empty() {
                "-".into()
            } else {
                tags.join(",")
            },
            endpoints(n)
        );
    }
    Ok(out)
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
