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
    /// A CA certificate (PEM) to trust for a coordinator with a private CA:
    /// the file's name, for `status` and the settings check.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
    /// That file's contents, read by the CLI with its user's permissions
    /// ([`read_ca_file`]): the root daemon never opens a path a client
    /// names (a FIFO would block it, `/dev/zero` exhaust it, a root-only
    /// file be read on the client's behalf).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_pem: Option<String>,
    /// Tags to advertise (`tag:server`); `Some(vec![])` clears them, `None`
    /// keeps the current ones.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub advertise_tags: Option<Vec<String>>,
    /// Subnet routes to advertise (`10.0.0.0/24`); `Some(vec![])`
    /// withdraws them, `None` keeps the current ones.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub advertise_routes: Option<Vec<ipnet::IpNet>>,
    /// Offer this node as an exit node (both default routes); `None` keeps
    /// the current choice.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub advertise_exit_node: Option<bool>,
    /// Use the subnet routes peers serve; `None` keeps the current choice.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accept_routes: Option<bool>,
    /// Source-NAT what this node forwards into the networks it serves
    /// (default on); `None` keeps the current choice.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snat_subnet_routes: Option<bool>,
    /// The exit node, as a peer's name, overlay address or key prefix;
    /// `Some("")` clears it, `None` keeps the current one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_node: Option<String>,
    /// Keep this host's networks off the exit node; `None` keeps the
    /// current choice.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_node_allow_lan_access: Option<bool>,
    /// Point the host's DNS at warren's resolver; `None` keeps the
    /// current choice (default on).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accept_dns: Option<bool>,
    /// Apply settings that differ from those of a node that is already up.
    /// Without it such an `up` is refused with the differences listed
    /// ([`crate::api::ErrorCode::SettingsDiffer`]) and changes nothing.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub reconfigure: bool,
    /// Longest wait on the coordinator's answer, in seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_secs: Option<u64>,
}

/// Answer to [`crate::api::Request::Down`] and
/// [`crate::api::Request::Logout`]: the network that was left.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaveReply {
    /// The coordinator of the network left.
    pub coordinator: String,
    /// This node's name there, when it had one.
    pub name: Option<String>,
    /// `false` after `down` (the login is kept and `warren up` re-joins),
    /// `true` after `logout` (joining again needs a token).
    pub logged_out: bool,
}

/// Answer to `up`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpReply {
    pub coordinator: String,
    /// The node's name in the network (the coordinator may add a suffix).
    pub name: String,
    pub addresses: Vec<IpAddr>,
    /// The tags this node advertises.
    #[serde(default)]
    pub tags: Vec<String>,
    /// The settings this `up` changed (`coordinator`, `hostname`,
    /// `advertise-tags`, `ca-file`); empty when the node was already up
    /// with them.
    #[serde(default)]
    pub changed: Vec<String>,
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
    /// Why the home relay connection failed last, while it is down.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub home_relay_error: Option<String>,
    /// With an access policy, how many rules of this node's packet filter
    /// there are (peers may reach it on what they allow); `None`: the
    /// network has no policy and everything is allowed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy_rules: Option<usize>,
    /// Why the peers' side of the policy (`allows_you`) is not shown.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reach_error: Option<String>,
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
    /// Whether a network map came from the coordinator since the map stream
    /// (re)started; a map replayed from disk does not count. `warren up`
    /// waits for it.
    #[serde(default)]
    pub map_received: bool,
    /// The tags this node advertises.
    #[serde(default)]
    pub tags: Vec<String>,
    /// The routes this node advertises (`--advertise-routes`, both default
    /// routes for `--advertise-exit-node`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub advertised_routes: Vec<ipnet::IpNet>,
    /// Those the coordinator approved: the ones it serves.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub served_routes: Vec<ipnet::IpNet>,
    /// Why the routes it serves cannot carry traffic (IP forwarding off,
    /// the NAT not installed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub routes_problem: Option<String>,
    /// The exit node chosen (`--exit-node`): its name, or its key when it
    /// is not in the map.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_node: Option<String>,
    /// `--exit-node-allow-lan-access`, and the networks it keeps direct.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub exit_node_lan: Vec<ipnet::IpNet>,
    /// Why the exit node carries nothing (internet traffic is blocked).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_node_problem: Option<String>,
    /// The resolver and the host's DNS (`warren dns status` has more).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dns: Option<DnsBrief>,
}

/// The DNS line of `status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DnsBrief {
    pub mode: crate::agent::dns::Mode,
    pub address: Option<std::net::IpAddr>,
    pub domain: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub problem: Option<String>,
}

/// The mesh part of one peer's status.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PeerMesh {
    pub hostname: String,
    pub online: bool,
    /// The peer's operating system and warren version as it registered
    /// them (empty when its coordinator is older).
    #[serde(default)]
    pub os: String,
    #[serde(default)]
    pub version: String,
    /// Its tags, granted and advertised.
    #[serde(default)]
    pub tags: Vec<String>,
    /// The routes it serves (a subnet router's prefixes, both default
    /// routes for an exit node).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<ipnet::IpNet>,
    /// Those this node sends through it (`--accept-routes`, and it is the
    /// primary router of each).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub routed: Vec<ipnet::IpNet>,
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
    /// The direct paths pinged so far ("candidates tried"), best kind first.
    #[serde(default)]
    pub tried: Vec<TriedPath>,
    /// With an access policy: what the peer's filter lets this node do
    /// ("allows you: tcp/22"), as the coordinator answered `GET /reach`;
    /// `None` without a policy or when it could not be asked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allows_you: Option<Vec<crate::policy::Allowance>>,
    /// With an access policy: what this node's own filter lets the peer do.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub you_allow: Option<Vec<crate::policy::Allowance>>,
}

/// One direct path traversal pinged, and what came of it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TriedPath {
    pub addr: SocketAddr,
    /// Where the address came from: host, portmap, srflx, predicted, prflx.
    pub kind: String,
    /// Wall-clock time (UTC, `HH:MM:SS`) of the last ping.
    pub last_ping: Option<String>,
    /// Wall-clock time of the last pong; `None` when it never answered.
    pub last_pong: Option<String>,
    pub rtt_ms: Option<f64>,
}

/// One on-demand disco ping round (`warren ping`): the pongs that came back
/// within the round's wait, fastest path first as they arrived.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PingRound {
    pub pongs: Vec<Pong>,
    /// Whether a pong came back over a direct path.
    pub direct: bool,
}

/// One pong of a [`PingRound`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Pong {
    /// The path it took: direct (the peer's address) or a relay region.
    pub path: super::PeerPath,
    pub latency_ms: f64,
}

/// Largest CA file `warren up --ca-file` takes: a bundle of a few dozen
/// certificates.
pub const MAX_CA_FILE: u64 = 256 * 1024;

/// Why a CA file was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CaFileError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}: not a regular file")]
    NotAFile(String),
    #[error("{0}: larger than {MAX_CA_FILE} bytes")]
    TooLarge(String),
    #[error("{0}: no PEM certificate in it")]
    NoCertificate(String),
}

/// Reads a CA file for `warren up --ca-file`: a regular file of at most
/// [`MAX_CA_FILE`] bytes holding at least one PEM certificate. Opened
/// without blocking, so a FIFO is refused instead of waited on.
pub fn read_ca_file(path: &std::path::Path) -> Result<String, CaFileError> {
    use std::io::Read as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let name = path.display().to_string();
    let io = |source| CaFileError::Io {
        path: name.clone(),
        source,
    };
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(io)?;
    let meta = file.metadata().map_err(io)?;
    if !meta.is_file() {
        return Err(CaFileError::NotAFile(name));
    }
    let mut text = String::new();
    file.take(MAX_CA_FILE + 1)
        .read_to_string(&mut text)
        .map_err(io)?;
    if text.len() as u64 > MAX_CA_FILE {
        return Err(CaFileError::TooLarge(name));
    }
    if !text.contains("-----BEGIN CERTIFICATE-----") {
        return Err(CaFileError::NoCertificate(name));
    }
    Ok(text)
}

#[cfg(test)]
mod ca_file_tests {
    use super::*;

    #[test]
    fn only_a_small_regular_pem_file_is_read() {
        let dir = tempfile::tempdir().unwrap();
        let pem = dir.path().join("ca.pem");
        std::fs::write(
            &pem,
            "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        assert!(read_ca_file(&pem).unwrap().starts_with("-----BEGIN"));
        assert!(matches!(
            read_ca_file(std::path::Path::new("/dev/zero")),
            Err(CaFileError::NotAFile(_))
        ));
        assert!(matches!(
            read_ca_file(dir.path()),
            Err(CaFileError::NotAFile(_))
        ));
        let fifo = dir.path().join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
        // Without O_NONBLOCK this open would wait for a writer forever.
        assert!(matches!(read_ca_file(&fifo), Err(CaFileError::NotAFile(_))));
        let big = dir.path().join("big.pem");
        std::fs::write(&big, vec![b'A'; MAX_CA_FILE as usize + 1]).unwrap();
        assert!(matches!(read_ca_file(&big), Err(CaFileError::TooLarge(_))));
        let junk = dir.path().join("junk.pem");
        std::fs::write(&junk, "not a certificate").unwrap();
        assert!(matches!(
            read_ca_file(&junk),
            Err(CaFileError::NoCertificate(_))
        ));
    }
}
