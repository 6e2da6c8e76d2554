//! Administration of the routes nodes advertise: what `route list`,
//! `route approve` and `route reject` print (README, "Subnet routers and
//! exit nodes").
//!
//! A route a node advertises carries no traffic until it is approved, by
//! an admin here or by the policy's `autoApprovers` when the node
//! advertises it (`api::auto_approve`). Approving a route the node does
//! not (or no longer) advertise is kept: it serves it once it does, as in
//! Tailscale. Every change reaches the node's peers as a map delta.

use std::fmt::Write as _;

use ipnet::IpNet;
use warren::control::advertise::is_exit;
use warren::text::for_terminal;

use crate::store::{NodeRecord, Store, StoreError};

/// One route of one node, as `route list --json` shows it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct RouteRow {
    pub node_id: i64,
    pub node: String,
    pub route: IpNet,
    pub advertised: bool,
    pub approved: bool,
}

fn rows(n: &NodeRecord) -> Vec<RouteRow> {
    let mut all: Vec<IpNet> = n
        .advertised_routes
        .iter()
        .chain(&n.approved_routes)
        .copied()
        .collect();
    all.sort();
    all.dedup();
    all.into_iter()
        .map(|route| RouteRow {
            node_id: n.id,
            node: n.name.clone(),
            route,
            advertised: n.advertised_routes.contains(&route),
            approved: n.approved_routes.contains(&route),
        })
        .collect()
}

/// What a route is, in a word: serving, pending approval, or approved but
/// not advertised.
fn state(r: &RouteRow) -> &'static str {
    match (r.advertised, r.approved) {
        (true, true) => "serving",
        (true, false) => "pending",
        _ => "approved, not advertised",
    }
}

/// `route list [--json]`: every node's advertised and approved routes.
pub async fn route_list(store: &Store, json: bool) -> Result<String, StoreError> {
    let nodes = store.list_nodes().await?;
    let all: Vec<RouteRow> = nodes.iter().flat_map(rows).collect();
    if json {
        return Ok(serde_json::to_string_pretty(&all).unwrap_or_default() + "\n");
    }
    if all.is_empty() {
        return Ok(
            "no node advertises a route (warren up --advertise-routes, --advertise-exit-node)\n"
                .into(),
        );
    }
    let mut out = format!("{:<5} {:<20} {:<24} {}\n", "ID", "NODE", "ROUTE", "STATE");
    for r in &all {
        let _ = writeln!(
            out,
            "{:<5} {:<20} {:<24} {}",
            r.node_id,
            for_terminal(&r.node),
            r.route,
            state(r)
        );
    }
    Ok(out)
}

/// The routes a node serves, for `node list`: `exit` for the default
/// pair, then the subnets; `-` for none.
pub fn served_summary(n: &NodeRecord) -> String {
    let served = n.served_routes();
    let mut parts: Vec<String> = Vec::new();
    if is_exit(&served) {
        parts.push("exit".into());
    }
    parts.extend(
        served
            .iter()
            .filter(|r| r.prefix_len() != 0)
            .map(ToString::to_string),
    );
    let pending = n
        .advertised_routes
        .iter()
        .filter(|r| !n.approved_routes.contains(r))
        .count();
    if pending > 0 {
        parts.push(format!("({pending} pending)"));
    }
    if parts.is_empty() {
        "-".into()
    } else {
        parts.join(",")
    }
}

/// `route approve NODE PREFIX…` / `route reject NODE PREFIX…`; `json`:
/// the node's routes after, as `route list --json` shows them.
pub async fn route_change(
    store: &Store,
    which: &str,
    routes: &[IpNet],
    approve: bool,
    json: bool,
) -> Result<String, StoreError> {
    if routes.is_empty() {
        return Err(StoreError::Invalid(
            "name at least one route (an exit node: 0.0.0.0/0 ::/0)".into(),
        ));
    }
    if let Some(r) = routes.iter().find(|r| r.trunc() != **r) {
        return Err(StoreError::Invalid(format!(
            "{r} has host bits set: write {}",
            r.trunc()
        )));
    }
    let node = store.find_node(which).await?;
    let node = store.change_routes(node.id, routes, approve).await?;
    if json {
        return Ok(serde_json::to_string_pretty(&rows(&node)).unwrap_or_default() + "\n");
    }
    let mut out = String::new();
    for r in rows(&node).iter().filter(|r| routes.contains(&r.route)) {
        let _ = writeln!(
            out,
            "{} {}: {}",
            for_terminal(&node.name),
            r.route,
            state(r)
        );
    }
    for r in routes
        .iter()
        .filter(|r| !node.approved_routes.contains(r) && !node.advertised_routes.contains(r))
    {
        let _ = writeln!(out, "{} {r}: not approved", for_terminal(&node.name));
    }
    Ok(out)
}
