//! The client commands of the `warren` binary (`status`, `ip`, `ping`,
//! `version`): argument parsing, one request to the daemon through
//! [`crate::api::client`], and the answer printed for a person or, with
//! `--json`, as the API's own payload types (stable field names, see
//! [`crate::api`]).
//!
//! They live in the library, not in `main.rs`, so `main.rs` only flattens
//! [`ClientCommand`] into its subcommands and the tests can check the
//! rendering without spawning processes.

pub mod render;

use std::io::{self, Write};
use std::path::{Path, PathBuf};

use clap::{Args, Subcommand};
use serde::Serialize;

use crate::api::client::{call, ClientError};
use crate::api::{IpReply, PingReply, Request, Status, VersionReply, DEFAULT_SOCKET};

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

#[derive(Debug, Clone, Subcommand)]
pub enum ClientCommand {
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
    /// Check that a peer is alive: a WireGuard handshake within 3 minutes.
    ///
    /// Exits with status 1 when the peer is not responding. This reads the
    /// tunnel's state; it sends no ICMP.
    Ping {
        /// A peer: host name, overlay IP, or key prefix (4+ characters).
        peer: String,
        /// Print the peer's liveness as JSON.
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
}

/// Runs a client command against the daemon on `socket`.
pub fn run(cmd: &ClientCommand, socket: &Path) -> Result<(), CliError> {
    let mut out = io::stdout().lock();
    match cmd {
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
        ClientCommand::Ping { peer, json } => {
            let reply: PingReply = call(socket, &Request::Ping { peer: peer.clone() })?;
            let text = render::ping(&reply, peer);
            if *json {
                print_json(&mut out, &reply)?;
            } else if reply.alive {
                writeln!(out, "{text}")?;
            }
            if !reply.alive {
                return Err(CliError::PeerDown(text));
            }
        }
        ClientCommand::Version { json } => {
            let daemon = call::<VersionReply>(socket, &Request::Version);
            version(&mut out, *json, daemon)?;
        }
    }
    Ok(())
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
