//! The local API between the daemon (`warren agent`) and the CLI.
//!
//! The daemon listens on a Unix socket, by default
//! [`DEFAULT_SOCKET`] (`/run/warren/warren.sock`), owned by root, group
//! `warren` when that group exists, mode 0660. File permissions are the
//! access control: whoever can connect may ask. A Unix socket rather than
//! loopback TCP because it gives exactly that (no port, no token, and the
//! kernel checks who connects).
//!
//! ## Wire format
//!
//! One request per connection. The client writes a single JSON object on one
//! line (terminated by `\n`), the daemon answers with a single JSON line and
//! closes. One-shot connections keep the server trivially correct (no
//! per-connection state, a stuck client costs one task until its timeout)
//! and the CLI runs one command per process anyway.
//!
//! A request is tagged by `request`:
//!
//! ```json
//! {"request": "status"}
//! {"request": "ip", "peer": "laptop"}
//! {"request": "ping", "peer": "100.64.0.2", "timeout_ms": 5000}
//! {"request": "version"}
//! {"request": "up", "coordinator": "https://…", "token": "…"}
//! {"request": "down"}
//! {"request": "logout"}
//! {"request": "netcheck"}
//! ```
//!
//! The answer is either `{"ok": PAYLOAD}` or
//! `{"error": {"code": "unknown_peer", "message": "…"}}`. A request the
//! daemon does not know (a newer CLI talking to an older daemon) is answered
//! with the code `unknown_request`, so new requests slot in as new variants
//! of [`Request`] without breaking either side. The payload types ([`Status`], [`IpReply`],
//! [`PingReply`], [`VersionReply`]) and their field names are stable: they
//! are also what `--json` prints.

pub mod client;
pub mod mesh;
pub mod resolve;
pub mod server;
mod view;

use std::net::SocketAddr;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::dataplane::DropCounts;
use crate::keys::NodeKey;

/// Where the daemon listens unless configured otherwise (`[agent] socket`,
/// `--socket`, `WARREN_SOCKET`).
pub const DEFAULT_SOCKET: &str = "/run/warren/warren.sock";

/// The group whose members may use the socket besides root.
pub const SOCKET_GROUP: &str = "warren";

/// Longest request line the daemon reads; requests are tiny.
pub const MAX_REQUEST: usize = 16 * 1024;

/// A request from the CLI.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "request", rename_all = "snake_case")]
#[non_exhaustive]
pub enum Request {
    /// The node, its interface and every peer.
    Status,
    /// This node's overlay addresses, or a peer's when `peer` is given.
    Ip {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        peer: Option<String>,
    },
    /// One disco ping round to a peer of the mesh, with its WireGuard-level
    /// liveness (see [`PingReply`]). `timeout_ms` bounds the wait for pongs.
    Ping {
        peer: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        timeout_ms: Option<u64>,
    },
    /// The daemon's version.
    Version,
    /// Join a network with a token, or re-join the last one.
    Up(mesh::UpArgs),
    /// Leave the network for now: peers are dropped, the login is kept.
    Down,
    /// Leave the network for good: the coordinator forgets this node.
    Logout,
    /// Probe the network (STUN, NAT behaviour, port mapping) and report.
    Netcheck,
    /// The resolver: mode, upstreams, counters.
    DnsStatus,
    /// Resolve `name` (of type `qtype`, default A) through the resolver.
    DnsQuery {
        name: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        qtype: Option<String>,
    },
}

/// Why a request failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum ErrorCode {
    /// Not JSON, or not a request object.
    BadRequest,
    /// A request this daemon does not know (it is older than the CLI).
    UnknownRequest,
    /// No peer matches the given hostname, overlay IP or key prefix.
    UnknownPeer,
    /// A key prefix or name matches more than one peer.
    AmbiguousPeer,
    /// The daemon knows the request but cannot do it (yet).
    Unsupported,
    /// The daemon failed.
    Internal,
    /// The coordinator refused (bad token, node removed) or is unreachable.
    Coordinator,
    /// The request needs a joined network (`warren up` first).
    NotJoined,
    /// `up` asked for settings other than those of a node that is already
    /// up; the message lists each, and nothing changed.
    SettingsDiffer,
    /// A code from a newer daemon that this CLI does not know.
    #[serde(other)]
    Other,
}

/// A typed error as it travels on the socket: `{code, message}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{message}")]
pub struct ApiError {
    pub code: ErrorCode,
    pub message: String,
}

impl ApiError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        ApiError {
            code,
            message: message.into(),
        }
    }
}

/// One answer line.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reply {
    Ok(serde_json::Value),
    Error(ApiError),
}

/// Answer to [`Request::Status`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Status {
    /// The daemon's version.
    pub version: String,
    /// Name of the TUN device.
    pub interface: String,
    /// This node's public (WireGuard) key.
    pub public_key: NodeKey,
    /// The UDP address the tunnels use.
    pub listen: SocketAddr,
    /// Whether TUN/UDP segmentation offload is in use.
    pub offload: bool,
    /// This node's overlay addresses, with prefix length.
    pub addresses: Vec<IpNet>,
    /// Seconds since the daemon came up.
    pub uptime_secs: u64,
    pub peers: Vec<PeerStatus>,
    /// Packets dropped since start, by reason.
    pub drops: Drops,
    /// The node's standing in the network; absent for a static config.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mesh: Option<mesh::MeshStatus>,
}

/// Packets dropped since the daemon started, by reason. A copy of the data
/// plane's counters so that renaming those never changes the API.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Drops {
    /// Datagrams that failed WireGuard authentication or parsing.
    pub auth: u64,
    /// Datagrams from a key or session index we do not know.
    pub unknown_peer: u64,
    /// TUN packets to an address no peer owns.
    pub no_route: u64,
    /// TUN packets for a peer with no known endpoint.
    pub no_endpoint: u64,
    /// TUN packets that are not IPv4/IPv6.
    pub malformed: u64,
    /// Packets from peers that the access policy does not allow.
    #[serde(default)]
    pub policy: u64,
    /// Packets from peers to an address this node does not own.
    #[serde(default)]
    pub not_ours: u64,
}

impl From<DropCounts> for Drops {
    fn from(d: DropCounts) -> Drops {
        Drops {
            auth: d.auth,
            unknown_peer: d.unknown_peer,
            no_route: d.no_route,
            no_endpoint: d.no_endpoint,
            malformed: d.malformed,
            policy: d.policy,
            not_ours: d.not_ours,
        }
    }
}

/// One peer in [`Status`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PeerStatus {
    pub public_key: NodeKey,
    /// The peer's host name, once the coordinator provides one.
    pub hostname: Option<String>,
    /// Prefixes routed to the peer (its overlay addresses among them).
    pub allowed_ips: Vec<IpNet>,
    /// How packets reach the peer now.
    pub path: PeerPath,
    /// Round-trip time of the current path, once path probing measures it.
    pub latency_ms: Option<f64>,
    /// Seconds since the last completed WireGuard handshake; `None` before
    /// the first.
    pub last_handshake_secs: Option<u64>,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
    /// Traversal's view of the peer; absent for a peer from the config.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mesh: Option<mesh::PeerMesh>,
}

/// The path packets to a peer take.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
#[non_exhaustive]
pub enum PeerPath {
    /// Straight over UDP to this address.
    Direct { endpoint: SocketAddr },
    /// Through a relay; `region` names it once the agent knows its home
    /// relay's region.
    Relay { region: Option<String> },
    /// Straight to the peer over a TCP stream (simultaneous open, for
    /// networks that block UDP).
    DirectTcp { endpoint: SocketAddr },
    /// No way to reach the peer yet (no endpoint known).
    None,
}

impl PeerPath {
    /// How the API shows `path` (the one path type, `crate::path::Path`);
    /// `region` names the relay a relayed peer is reached through.
    pub fn from_path(path: Option<crate::path::Path>, region: Option<String>) -> PeerPath {
        use crate::path::Path;
        match path {
            Some(Path::Direct(d)) => PeerPath::Direct { endpoint: d.addr },
            Some(Path::Tcp(endpoint)) => PeerPath::DirectTcp { endpoint },
            Some(Path::Relay) => PeerPath::Relay { region },
            None => PeerPath::None,
        }
    }
}

/// Answer to [`Request::Ip`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IpReply {
    /// The peer's public key, or this node's when no peer was asked for.
    pub public_key: NodeKey,
    /// Overlay addresses without prefix length. For a peer, the single
    /// addresses among its allowed IPs (`/32`, `/128`).
    pub addresses: Vec<std::net::IpAddr>,
}

/// Answer to [`Request::Ping`].
///
/// For a peer of the mesh the daemon runs one disco ping round (over the
/// relay and the direct paths) and `round` lists the pongs, each with its
/// path and latency; the CLI repeats requests, one round each, so the
/// daemon never holds a long-lived request. Every peer also gets the
/// WireGuard-level answer: `alive` when a handshake completed within the
/// last [`ALIVE_WITHIN_SECS`] (WireGuard's own session lifetime: past it,
/// the session would be rejected anyway); for a peer from the config file,
/// which has no disco key, that is all there is.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PingReply {
    pub public_key: NodeKey,
    pub hostname: Option<String>,
    /// The peer's first overlay address.
    #[serde(default)]
    pub address: Option<std::net::IpAddr>,
    pub alive: bool,
    pub path: PeerPath,
    pub latency_ms: Option<f64>,
    pub last_handshake_secs: Option<u64>,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
    /// The disco ping round; absent for a peer from the config.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub round: Option<mesh::PingRound>,
    /// With an access policy: what the peer lets this node do (a disco
    /// ping is answered whatever the policy says; traffic is not).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allows_you: Option<Vec<crate::policy::Allowance>>,
}

/// WireGuard's REJECT_AFTER_TIME: a session older than this is dead.
pub const ALIVE_WITHIN_SECS: u64 = 180;

impl PingReply {
    pub fn from_peer(p: &PeerStatus) -> PingReply {
        PingReply {
            public_key: p.public_key,
            hostname: p.hostname.clone(),
            address: p
                .allowed_ips
                .iter()
                .find(|n| n.prefix_len() == n.max_prefix_len())
                .map(|n| n.addr()),
            alive: p.last_handshake_secs.is_some_and(|s| s < ALIVE_WITHIN_SECS),
            path: p.path.clone(),
            latency_ms: p.latency_ms,
            last_handshake_secs: p.last_handshake_secs,
            rx_bytes: p.rx_bytes,
            tx_bytes: p.tx_bytes,
            round: None,
            allows_you: p.mesh.as_ref().and_then(|m| m.allows_you.clone()),
        }
    }
}

/// Answer to [`Request::Version`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionReply {
    pub version: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_have_stable_wire_names() {
        let r: Request = serde_json::from_str(r#"{"request":"ip","peer":"a"}"#).unwrap();
        assert_eq!(
            r,
            Request::Ip {
                peer: Some("a".into())
            }
        );
        let r: Request = serde_json::from_str(r#"{"request":"ip"}"#).unwrap();
        assert_eq!(r, Request::Ip { peer: None });
        assert_eq!(
            serde_json::to_string(&Request::Status).unwrap(),
            r#"{"request":"status"}"#
        );
        let r: Request = serde_json::from_str(r#"{"request":"up","token":"t"}"#).unwrap();
        assert_eq!(
            r,
            Request::Up(mesh::UpArgs {
                token: Some("t".into()),
                ..Default::default()
            })
        );
        assert!(serde_json::from_str::<Request>(r#"{"request":"up","tokn":"t"}"#).is_err());
    }

    #[test]
    fn replies_round_trip_and_unknown_codes_survive() {
        let e = Reply::Error(ApiError::new(ErrorCode::UnknownPeer, "no such peer"));
        let text = serde_json::to_string(&e).unwrap();
        assert_eq!(
            text,
            r#"{"error":{"code":"unknown_peer","message":"no such peer"}}"#
        );
        let back: Reply =
            serde_json::from_str(r#"{"error":{"code":"quota_exceeded","message":"x"}}"#).unwrap();
        match back {
            Reply::Error(e) => assert_eq!(e.code, ErrorCode::Other),
            Reply::Ok(_) => panic!("expected an error"),
        }
    }

    #[test]
    fn path_is_tagged_by_kind() {
        let p = PeerPath::Direct {
            endpoint: "192.0.2.1:51820".parse().unwrap(),
        };
        assert_eq!(
            serde_json::to_value(&p).unwrap(),
            serde_json::json!({"kind": "direct", "endpoint": "192.0.2.1:51820"})
        );
        assert_eq!(
            serde_json::to_value(PeerPath::None).unwrap(),
            serde_json::json!({"kind": "none"})
        );
        let t = PeerPath::DirectTcp {
            endpoint: "198.51.100.7:41641".parse().unwrap(),
        };
        assert_eq!(
            serde_json::to_value(&t).unwrap(),
            serde_json::json!({"kind": "direct_tcp", "endpoint": "198.51.100.7:41641"})
        );
        assert_eq!(
            crate::cli::render::path(&t),
            "direct tcp 198.51.100.7:41641"
        );
    }
}
