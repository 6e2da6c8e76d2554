//! Agents that join a network: `warren up` against a lab coordinator, and
//! reading what `warren status --json` says about the node and its peers.
//! Shared by the mesh, relay, birthday and matrix tests.

use std::time::Duration;

use serde_json::Value;

use super::agent::{Agent, AgentConfig};
use super::coord::Coordinator;
use super::process::Output;
use super::{Lab, Node};

/// How long the two agents of a pair may take to list each other.
const PAIR_TIMEOUT: Duration = Duration::from_secs(20);

/// `warren up` with `token`, named after the agent's node.
pub fn up(lab: &Lab, a: &Agent, coord: &Coordinator, token: &str) -> Output {
    up_with(lab, a, coord, token, &[])
}

/// [`up`] with `extra` flags (`--json`, `--advertise-tags …`).
pub fn up_with(lab: &Lab, a: &Agent, coord: &Coordinator, token: &str, extra: &[&str]) -> Output {
    let url = coord.url();
    let mut argv = vec![
        "up",
        "--coordinator",
        &url,
        "--token",
        token,
        "--hostname",
        &a.node.name,
    ];
    argv.extend_from_slice(extra);
    a.cli(lab, &argv)
}

/// Joins two started agents with one reusable token and waits until each
/// lists the other (and only it); returns B's overlay IPv4 address.
pub fn up_pair(lab: &Lab, coord: &Coordinator, a: &Agent, b: &Agent) -> String {
    let (token, _) = coord.token(lab, &["--reusable"]);
    for agent in [a, b] {
        up(lab, agent, coord, &token).expect_ok(&format!("up {}", agent.node.name));
    }
    assert!(
        wait_peers(lab, a, &[&b.node.name], PAIR_TIMEOUT)
            && wait_peers(lab, b, &[&a.node.name], PAIR_TIMEOUT),
        "the pair does not see each other"
    );
    overlay_v4(&b.status(lab))
}

/// [`up_pair`] for agents it starts on `a` and `b` with the default mesh
/// config; returns them and B's overlay IPv4 address.
pub fn join_pair(lab: &Lab, coord: &Coordinator, a: &Node, b: &Node) -> (Agent, Agent, String) {
    let a = Agent::start(lab, a, &AgentConfig::mesh(lab, a));
    let b = Agent::start(lab, b, &AgentConfig::mesh(lab, b));
    let ip_b = up_pair(lab, coord, &a, &b);
    (a, b, ip_b)
}

/// Starts an agent with `config` on `node` and joins it; panics if `up`
/// fails.
pub fn join_with(
    lab: &Lab,
    coord: &Coordinator,
    token: &str,
    node: &Node,
    config: &AgentConfig,
) -> Agent {
    let a = Agent::start(lab, node, config);
    up(lab, &a, coord, token).expect_ok("warren up");
    a
}

/// [`join_with`] the default mesh config.
pub fn join(lab: &Lab, coord: &Coordinator, token: &str, node: &Node) -> Agent {
    join_with(lab, coord, token, node, &AgentConfig::mesh(lab, node))
}

/// The node's overlay IPv4 address ("" before it has one).
pub fn overlay_v4(st: &Value) -> String {
    st["mesh"]["addresses"]
        .as_array()
        .and_then(|a| {
            a.iter()
                .find_map(|v| v.as_str().filter(|s| s.contains('.')))
        })
        .unwrap_or_default()
        .to_owned()
}

/// A peer's entry, by host name.
pub fn peer_of<'a>(st: &'a Value, name: &str) -> Option<&'a Value> {
    st["peers"]
        .as_array()
        .and_then(|ps| ps.iter().find(|p| p["hostname"] == name))
}

/// A peer's path kind (`direct`, `relay`, `none`), or `unknown` when the
/// peer is not listed.
pub fn path_of(st: &Value, name: &str) -> String {
    peer_of(st, name).map_or_else(
        || "unknown".into(),
        |p| p["path"]["kind"].as_str().unwrap_or("none").to_owned(),
    )
}

/// The peers' host names, sorted.
pub fn peer_names(st: &Value) -> Vec<String> {
    let mut names: Vec<String> = st["peers"]
        .as_array()
        .map(|ps| {
            ps.iter()
                .filter_map(|p| p["hostname"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

/// Waits until `a` lists exactly the peers `want` (sorted), at most
/// `timeout`.
pub fn wait_peers(lab: &Lab, a: &Agent, want: &[&str], timeout: Duration) -> bool {
    super::poll_until(timeout, Duration::from_millis(100), || {
        peer_names(&a.status(lab)) == want
    })
}
