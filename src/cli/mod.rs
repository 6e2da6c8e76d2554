//! The client commands of the `warren` binary (`up`, `down`, `logout`,
//! `status`, `ip`, `ping`, `netcheck`, `version`): argument parsing, one request to the daemon through
//! [`crate::api::client`], and the answer printed for a person or, with
//! `--json`, as the API's own payload types (stable field names, see
//! [`crate::api`]).
//!
//! They live in the library, not in `main.rs`, so `main.rs` only flattens
//! [`ClientCommand`] into its subcommands and the tests can check the
//! rendering without spawning processes.

pub mod ping;
pub mod render;
pub mod render_mesh;
pub mod up;

use std::io::{self, Write};
use std::path::{Path, PathBuf};

use clap::{Args, Subcommand};
use serde::Serialize;

use crate::api::client::{call, ClientError};
use crate::api::mesh::{LeaveReply, UpArgs};
use crate::api::{IpReply, Request, Status, VersionReply, DEFAULT_SOCKET};
use crate::netcheck::Report;

/// Options every command takes.
#[derive(Debug, Clone, Args)]
pub struct GlobalArgs {
    /// Path of the daemon's API socket [default: /run/warren/warren.sock,
    /// or `[agent] socket` in the config for `warren agent`].
    #[arg(long, global = true, env = "WARREN_SOCKET", value_name = "PATH")]
    pub socket: Option<PathBuf>,
}

impl GlobalArgs {
    /// The socket the client commands talk to.
    pub fn client_socket(&self) -> PathBuf {
        self.socket
            .clone()
            .unwrap_or_else(|| PathBuf::from(DEFAULT_SOCKET))
    }
}

/// `warren dns …`.
#[derive(Subcommand, Debug, Clone)]
pub enum DnsCommand {
    /// How the host's DNS is set up, the network's domain, where other
    /// names go, and the resolver's counters.
    Status {
        /// Print the status as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Resolve a name through warren's resolver and say where the answer
    /// came from (the network's names, split DNS, the cache, …).
    Query {
        /// A name (`b`, `b.warren.internal`, `example.com`), or an address
        /// for TYPE PTR.
        name: String,
        /// The record type: A, AAAA, PTR, MX, TXT, …
        #[arg(default_value = "A")]
        qtype: String,
        /// Print the answer as JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Clone, Subcommand)]
pub enum ClientCommand {
    /// Join a network, or re-join the one left with `down`.
    ///
    /// The first time, give the coordinator and a join token (from
    /// `warren-coordinator token create`). Afterwards `warren up` alone
    /// re-joins; the daemon also re-joins by itself when it restarts.
    ///
    /// Shows each stage (registering, network map, tunnel) and fails after
    /// --timeout. Settings you leave out keep their current values; on a
    /// node that is already up, a setting that differs is refused (and
    /// listed) unless you add --reconfigure.
    Up {
        /// The coordinator, e.g. https://coord.example.com:8443.
        #[arg(long, value_name = "URL")]
        coordinator: Option<String>,
        /// The join token. Prefer --token-file or WARREN_TOKEN: a command
        /// line is visible to every user of the host.
        #[arg(
            long,
            env = "WARREN_TOKEN",
            hide_env_values = true,
            conflicts_with = "token_file"
        )]
        token: Option<String>,
        /// Read the join token from this file.
        #[arg(long, value_name = "PATH")]
        token_file: Option<PathBuf>,
        /// This node's name in the network [default: the host name].
        #[arg(long)]
        hostname: Option<String>,
        /// Trust only this CA certificate (PEM) for the coordinator and its
        /// relays: for a private CA.
        #[arg(long, value_name = "PATH")]
        ca_file: Option<PathBuf>,
        /// Tags to advertise, comma-separated: tag:server,tag:db. Each is
        /// `tag:` then lower-case letters, digits and '-'. An empty value
        /// clears them.
        #[arg(long, value_name = "TAGS", value_parser = parse_tags)]
        advertise_tags: Option<TagList>,
        /// Subnet routes this node offers to carry, comma-separated:
        /// 192.168.50.0/24,fd00:1::/64 (canonical prefixes; an empty value
        /// withdraws them). They carry traffic once an admin approves them
        /// (`warren-coordinator route approve`) or the policy's
        /// autoApprovers do; this node then forwards (and by default
        /// source-NATs) between the tunnel and those networks.
        #[arg(long, value_name = "ROUTES", value_parser = parse_routes)]
        advertise_routes: Option<RouteList>,
        /// Offer this node as an exit node: peers that choose it send all
        /// their internet traffic through it (once approved).
        #[arg(long, value_name = "BOOL", num_args = 0..=1, default_missing_value = "true")]
        advertise_exit_node: Option<bool>,
        /// Send traffic for the subnet routes peers serve through them
        /// (off by default, as Tailscale on Linux: a route could shadow a
        /// network this host reaches directly; one over this host's own
        /// networks is never installed).
        #[arg(long, value_name = "BOOL", num_args = 0..=1, default_missing_value = "true")]
        accept_routes: Option<bool>,
        /// As a subnet router, source-NAT tunnel traffic to this host's LAN
        /// address [default: true]. With false, the LAN's hosts see each
        /// peer's overlay address and need a route back to the overlay
        /// (100.64.0.0/10 and the network's /48) through this host.
        #[arg(long, value_name = "BOOL", num_args = 0..=1, default_missing_value = "true")]
        snat_subnet_routes: Option<bool>,
        /// Send all traffic that is not for the overlay or a subnet route
        /// through this peer (its name, overlay address or key prefix; it
        /// must offer an exit node). An empty value stops using one. While
        /// the exit node is chosen but cannot carry traffic, that traffic
        /// is blocked, never sent outside the tunnel.
        #[arg(long, value_name = "PEER")]
        exit_node: Option<String>,
        /// With an exit node, keep this host's own networks (its LAN)
        /// reachable directly [default: false].
        #[arg(long, value_name = "BOOL", num_args = 0..=1, default_missing_value = "true")]
        exit_node_allow_lan_access: Option<bool>,
        /// Point this host's DNS at warren's resolver (100.100.100.100),
        /// which answers the network's names and forwards the rest
        /// [default: true]. With false the host's DNS is left alone; the
        /// resolver still answers on its address.
        #[arg(long, value_name = "BOOL", num_args = 0..=1, default_missing_value = "true")]
        accept_dns: Option<bool>,
        /// Apply settings that differ from those of a node that is already
        /// up (only those you pass change).
        #[arg(long)]
        reconfigure: bool,
        /// Give up waiting after this long (e.g. 30s, 2m).
        #[arg(long, value_name = "DURATION", default_value = up::DEFAULT_TIMEOUT,
              value_parser = humantime::parse_duration)]
        timeout: std::time::Duration,
        /// No progress; print one JSON object at the end: `coordinator`,
        /// `name`, `addresses`, `tags`, `changed`, `peers`, `interface`,
        /// `home_relay`, `elapsed_ms`.
        #[arg(long)]
        json: bool,
    },
    /// Leave the network for now: tunnels to peers close, the login is
    /// kept, and `warren up` re-joins without a token.
    Down {
        /// Print `{coordinator, name, logged_out}` as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Leave the network for good: the coordinator removes this node, and
    /// joining again takes a new token.
    Logout {
        /// Print `{coordinator, name, logged_out}` as JSON.
        #[arg(long)]
        json: bool,
    },
    /// The resolver: where names go, and test queries.
    #[command(subcommand)]
    Dns(DnsCommand),
    /// Probe the network from the agent's own socket: UDP, IPv4/IPv6,
    /// the NAT's mapping and port pattern, hairpinning, port mapping, and
    /// the latency to each relay.
    Netcheck {
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show this node and every peer: addresses, path, last handshake, bytes.
    ///
    /// Peers are listed by host name when known, else by the first characters
    /// of their key; any of those, or an overlay IP, names a peer in `ip` and
    /// `ping`.
    Status {
        /// Print the status as JSON (stable field names, listed in the README).
        #[arg(long)]
        json: bool,
    },
    /// Print this node's overlay addresses, or those of PEER.
    Ip {
        /// A peer: host name, overlay IP, or key prefix (4+ characters).
        peer: Option<String>,
        /// Only IPv4 addresses.
        #[arg(short = '4', conflicts_with = "v6")]
        v4: bool,
        /// Only IPv6 addresses.
        #[arg(short = '6')]
        v6: bool,
        /// Print `{"public_key", "addresses"}` as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Ping a peer with disco pings, like `tailscale ping`.
    ///
    /// Each round pings over the relay and the direct paths; every pong is
    /// printed with its path and latency, and the moment the path turns
    /// direct is reported. Exits with status 1 when no pong came back, or
    /// with --until-direct when no direct path was found. A peer from the
    /// config file has no disco: its WireGuard liveness is printed instead
    /// (a handshake within 3 minutes).
    Ping {
        /// A peer: host name, overlay IP, or key prefix (4+ characters).
        peer: String,
        /// Rounds to send at most (one a second).
        #[arg(short = 'c', long, default_value_t = 10)]
        count: u32,
        /// Stop at the first direct pong (`--until-direct=false` to send
        /// every round).
        #[arg(long, default_value_t = true, action = clap::ArgAction::Set, num_args = 0..=1, require_equals = true,
              default_missing_value = "true", value_name = "BOOL")]
        until_direct: bool,
        /// How long each round waits for a pong (like 5s or 500ms).
        #[arg(long, default_value = "5s", value_parser = ping::parse_timeout)]
        timeout: std::time::Duration,
        /// Print a JSON array: one object per round, with its pongs' paths
        /// and latencies.
        #[arg(long)]
        json: bool,
    },
    /// Print the version of this CLI and of the running daemon.
    Version {
        /// Print `{"version", "daemon"}` as JSON (`daemon` is null when the
        /// daemon cannot be reached).
        #[arg(long)]
        json: bool,
    },
}

/// Why a client command failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CliError {
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error("{0}")]
    PeerDown(String),
    #[error("writing the output: {0}")]
    Output(#[from] io::Error),
    #[error("reading the token file {path}: {source}")]
    TokenFile { path: PathBuf, source: io::Error },
    #[error("{0}")]
    Usage(String),
    #[error("--ca-file {0}")]
    CaFile(#[source] crate::api::mesh::CaFileError),
}

/// Runs a client command against the daemon on `socket`.
pub fn run(cmd: &ClientCommand, socket: &Path) -> Result<(), CliError> {
    let mut out = io::stdout().lock();
    match cmd {
        ClientCommand::Up {
            coordinator,
            token,
            token_file,
            hostname,
            ca_file,
            advertise_tags,
            advertise_routes,
            advertise_exit_node,
            accept_routes,
            snat_subnet_routes,
            exit_node,
            exit_node_allow_lan_access,
            accept_dns,
            reconfigure,
            timeout,
            json,
        } => {
            let token = match (token, token_file) {
                (_, Some(path)) => Some(read_token(path)?),
                (t, None) => t.clone(),
            };
            if token.is_some() && coordinator.is_none() {
                return Err(CliError::Usage(
                    "a token needs --coordinator URL too".into(),
                ));
            }
            let ca_file = ca_file
                .as_ref()
                .map(|p| std::path::absolute(p).unwrap_or_else(|_| p.clone()));
            // Read here, as the user, never by the root daemon.
            let ca_pem = match &ca_file {
                Some(p) => Some(crate::api::mesh::read_ca_file(p).map_err(CliError::CaFile)?),
                None => None,
            };
            let args = UpArgs {
                coordinator: coordinator.clone(),
                token,
                hostname: hostname.clone(),
                ca_file,
                ca_pem,
                advertise_tags: advertise_tags.clone().map(|t| t.0),
                advertise_routes: advertise_routes.clone().map(|r| r.0),
                advertise_exit_node: *advertise_exit_node,
                accept_routes: *accept_routes,
                snat_subnet_routes: *snat_subnet_routes,
                exit_node: exit_node.clone(),
                exit_node_allow_lan_access: *exit_node_allow_lan_access,
                accept_dns: *accept_dns,
                reconfigure: *reconfigure,
                timeout_secs: None,
            };
            up::run(socket, args, *timeout, *json, &mut out, &mut io::stderr())?;
        }
        ClientCommand::Down { json } | ClientCommand::Logout { json } => {
            let request = match cmd {
                ClientCommand::Down { .. } => Request::Down,
                _ => Request::Logout,
            };
            let left: LeaveReply = call(socket, &request)?;
            if *json {
                print_json(&mut out, &left)?;
            } else if left.logged_out {
                writeln!(
                    out,
                    "logged out of {}; joining again needs a token",
                    left.coordinator
                )?;
            } else {
                writeln!(
                    out,
                    "left {} for now; `warren up` re-joins",
                    left.coordinator
                )?;
            }
        }
        ClientCommand::Dns(DnsCommand::Status { json }) => {
            let st: crate::agent::dns::DnsStatus = call(socket, &Request::DnsStatus)?;
            if *json {
                print_json(&mut out, &st)?;
            } else {
                out.write_all(render_mesh::dns_status(&st).as_bytes())?;
            }
        }
        ClientCommand::Dns(DnsCommand::Query { name, qtype, json }) => {
            let reply: crate::agent::dns::QueryReply = call(
                socket,
                &Request::DnsQuery {
                    name: name.clone(),
                    qtype: Some(qtype.clone()),
                },
            )?;
            if *json {
                print_json(&mut out, &reply)?;
            } else {
                out.write_all(render_mesh::dns_query(&reply).as_bytes())?;
            }
        }
        ClientCommand::Netcheck { json } => {
            let report: Report = call(socket, &Request::Netcheck)?;
            if *json {
                print_json(&mut out, &report)?;
            } else {
                out.write_all(render_mesh::netcheck(&report).as_bytes())?;
            }
        }
        ClientCommand::Status { json } => {
            let st: Status = call(socket, &Request::Status)?;
            if *json {
                print_json(&mut out, &st)?;
            } else {
                out.write_all(render::status(&st).as_bytes())?;
            }
        }
        ClientCommand::Ip { peer, v4, v6, json } => {
            let mut reply: IpReply = call(socket, &Request::Ip { peer: peer.clone() })?;
            reply
                .addresses
                .retain(|a| (!v4 || a.is_ipv4()) && (!v6 || a.is_ipv6()));
            if *json {
                print_json(&mut out, &reply)?;
            } else {
                for a in &reply.addresses {
                    writeln!(out, "{a}")?;
                }
            }
        }
        ClientCommand::Ping {
            peer,
            count,
            until_direct,
            timeout,
            json,
        } => {
            let opts = ping::Options {
                count: *count,
                until_direct: *until_direct,
                timeout: *timeout,
                json: *json,
            };
            ping::run(&mut out, socket, peer, &opts)?;
        }
        ClientCommand::Version { json } => {
            let daemon = call::<VersionReply>(socket, &Request::Version);
            version(&mut out, *json, daemon)?;
        }
    }
    Ok(())
}

/// `--advertise-tags`' value: one argument holding a comma-separated list
/// (a newtype so clap does not take it for a repeated flag).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TagList(pub Vec<String>);

fn parse_tags(s: &str) -> Result<TagList, String> {
    crate::control::types::parse_tag_list(s)
        .map(TagList)
        .map_err(|e| e.to_string())
}

/// `--advertise-routes`' value: one argument holding a comma-separated
/// list of prefixes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteList(pub Vec<ipnet::IpNet>);

fn parse_routes(s: &str) -> Result<RouteList, String> {
    crate::control::advertise::parse_route_list(s)
        .map(RouteList)
        .map_err(|e| e.to_string())
}

/// A token file holds the token, perhaps with a trailing newline.
fn read_token(path: &Path) -> Result<String, CliError> {
    let text = std::fs::read_to_string(path).map_err(|source| CliError::TokenFile {
        path: path.to_owned(),
        source,
    })?;
    let token = text.trim();
    if token.is_empty() {
        return Err(CliError::Usage(format!(
            "the token file {} is empty",
            path.display()
        )));
    }
    Ok(token.to_owned())
}

#[derive(Serialize)]
struct Versions<'a> {
    version: &'a str,
    daemon: Option<String>,
}

fn version(
    out: &mut impl Write,
    json: bool,
    daemon: Result<VersionReply, ClientError>,
) -> io::Result<()> {
    let mine = env!("CARGO_PKG_VERSION");
    if json {
        let daemon = daemon.ok().map(|d| d.version);
        return print_json(
            out,
            &Versions {
                version: mine,
                daemon,
            },
        );
    }
    writeln!(out, "warren {mine}")?;
    match daemon {
        Ok(d) if d.version == mine => writeln!(out, "daemon: warren {} (running)", d.version),
        Ok(d) => writeln!(
            out,
            "daemon: warren {} (running; differs from this CLI: restart it after upgrading)",
            d.version
        ),
        Err(ClientError::NotRunning { .. }) => writeln!(out, "daemon: not running"),
        Err(e) => writeln!(out, "daemon: unknown ({e})"),
    }
}

fn print_json(out: &mut impl Write, v: &impl Serialize) -> io::Result<()> {
    serde_json::to_writer_pretty(&mut *out, v).map_err(io::Error::other)?;
    writeln!(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(json: bool, daemon: Result<VersionReply, ClientError>) -> String {
        let mut buf = Vec::new();
        version(&mut buf, json, daemon).unwrap();
        String::from_utf8(buf).unwrap()
    }

    #[test]
    fn version_with_and_without_daemon() {
        let me = env!("CARGO_PKG_VERSION");
        let up = || Ok(VersionReply { version: me.into() });
        let down = || {
            Err(ClientError::NotRunning {
                socket: "/x".into(),
            })
        };
        assert_eq!(
            text(false, up()),
            format!("warren {me}\ndaemon: warren {me} (running)\n")
        );
        assert_eq!(
            text(false, down()),
            format!("warren {me}\ndaemon: not running\n")
        );
        let v: serde_json::Value = serde_json::from_str(&text(true, up())).unwrap();
        assert_eq!(v, serde_json::json!({"version": me, "daemon": me}));
        let v: serde_json::Value = serde_json::from_str(&text(true, down())).unwrap();
        assert_eq!(v, serde_json::json!({"version": me, "daemon": null}));
        let old = text(
            false,
            Ok(VersionReply {
                version: "0.0.1".into(),
            }),
        );
        assert!(old.contains("differs from this CLI"), "{old}");
    }
}
