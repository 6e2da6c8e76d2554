//! The API's types for the mesh: joining a coordinator (`up`, `down`,
//! `logout`), the node's standing in the network and each peer's path as
//! traversal sees it. Kept apart from [`super`]'s data-plane types because a
//! daemon with a static config and no coordinator has none of this: every
//! field here is optional in [`super::Status`].

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::traversal::NatSummary;

/// `warren up`'s arguments. With no `coordinator` the daemon re-joins the
/// network it last left with `down` (no token needed: the coordinator knows
/// the node key); a first join needs both.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpArgs {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub coordinator: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    /// A CA certificate (PEM) to trust for a coordinator with a private CA.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
}

/// Answer to `up`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpReply {
    pub coordinator: String,
    /// The node's name in the network (the coordinator may add a suffix).
    pub name: String,
    pub addresses: Vec<IpAddr>,
}

/// Where the node stands with its coordinator.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MeshState {
    /// Never joined, or logged out: `warren up --token` is needed.
    #[default]
    NeedsLogin,
    /// Joined but switched off with `warren down`.
    Stopped,
    /// Following the coordinator's map.
    Running,
    /// The coordinator is unreachable; the last map is in use and the
    /// agent retries with backoff.
    Reconnecting,
}

/// The mesh part of `status`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct MeshStatus {
    pub state: MeshState,
    pub coordinator: Option<String>,
    /// This node's name in the network.
    pub name: Option<String>,
    /// The overlay addresses the coordinator gave this node.
    pub addresses: Vec<IpAddr>,
    /// The relay region this node keeps a connection to.
    pub home_relay: Option<String>,
    /// Whether the connection to the home relay is up.
    pub home_relay_connected: bool,
    /// Latency to each relay region's STUN server, from the last netcheck.
    pub relay_latency_ms: Vec<(String, f64)>,
    /// The candidates this node publishes, by kind.
    pub endpoints: Vec<crate::control::Endpoint>,
    /// What netcheck found about this node's NAT.
    pub nat: NatSummary,
    /// Whether UDP reached any STUN server in the last netcheck.
    pub udp: Option<bool>,
    /// The last error talking to the coordinator, while reconnecting.
    pub last_error: Option<String>,
}

/// The mesh part of one peer's status.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PeerMesh {
    pub hostname: String,
    pub online: bool,
    /// The relay region the peer is reached through while relayed.
    pub relay_region: Option<String>,
    /// Round-trip time of the current path, from disco pings.
    pub latency_ms: Option<f64>,
    /// Why the peer is on the relay, when it is ("both sides EDM random;
    /// birthday probing failed at 14:02").
    pub relay_reason: Option<String>,
    /// The peer's published candidates.
    pub candidates: Vec<SocketAddr>,
    /// The peer's NAT as its last netcheck saw it (from the map).
    #[serde(default)]
    pub nat: NatSummary,
    pub pings_sent: u64,
    pub pongs_received: u64,
    /// When the path last turned direct, as seconds ago.
    pub direct_since_secs: Option<u64>,
}
