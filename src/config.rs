//! The agent's configuration file (TOML).
//!
//! Errors matter more than parsing here: a person edits this file by hand,
//! and "invalid type" alone does not tell them where to look. Every error
//! therefore names the file, the line and the dotted key (`peer[1].endpoint`).
//! The key path comes from `serde_path_to_error`, the line from the span the
//! TOML parser reports. Checks that serde cannot express (a key given twice
//! in two forms, duplicate peers) run after parsing and point at the line of
//! the offending key, found through the parsed document's spans.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use ipnet::IpNet;
use serde::Deserialize;

use crate::keys::{NodeKey, PresharedKey, PrivateKey};

/// Default MTU of the TUN device: 1500 minus the worst-case WireGuard
/// overhead over IPv6 (40 IPv6 + 8 UDP + 32 WireGuard), as wg-quick does.
pub const DEFAULT_MTU: u16 = 1420;
pub const DEFAULT_PORT: u16 = 51820;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub interface: InterfaceConfig,
    /// The key read from `private_key_file` at load time, so that a missing
    /// or bad key file is reported against the config line that names it.
    #[serde(skip)]
    loaded_key: Option<PrivateKey>,
    /// Peers configured by hand (`[[peer]]`), for example a stock WireGuard
    /// host. Peers learned from a coordinator come on top of these.
    #[serde(default, rename = "peer")]
    pub peers: Vec<PeerConfig>,
    /// The daemon itself (`[agent]`): its local API socket.
    #[serde(default)]
    pub agent: AgentConfig,
}

/// `[agent]`: settings of the daemon rather than of the tunnel.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// The local API socket the CLI talks to.
    #[serde(default = "default_socket")]
    pub socket: PathBuf,
}

impl Default for AgentConfig {
    fn default() -> Self {
        AgentConfig {
            socket: default_socket(),
        }
    }
}

fn default_socket() -> PathBuf {
    crate::api::DEFAULT_SOCKET.into()
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InterfaceConfig {
    #[serde(default = "default_name")]
    pub name: String,
    pub private_key: Option<PrivateKey>,
    pub private_key_file: Option<PathBuf>,
    #[serde(default = "default_port")]
    pub listen_port: u16,
    #[serde(default = "default_mtu")]
    pub mtu: u16,
    #[serde(default)]
    pub addresses: Vec<IpNet>,
    /// TUN and UDP segmentation offload; turned off automatically where the
    /// kernel lacks it.
    #[serde(default = "default_true")]
    pub offload: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeerConfig {
    pub public_key: NodeKey,
    #[serde(default)]
    pub allowed_ips: Vec<IpNet>,
    pub endpoint: Option<SocketAddr>,
    pub persistent_keepalive: Option<u16>,
    pub preshared_key: Option<PresharedKey>,
}

fn default_name() -> String {
    "warren0".into()
}
fn default_port() -> u16 {
    DEFAULT_PORT
}
fn default_mtu() -> u16 {
    DEFAULT_MTU
}
fn default_true() -> bool {
    true
}

/// A configuration error, located in the file.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    #[error("{file}: cannot read")]
    Read {
        file: PathBuf,
        source: std::io::Error,
    },
    #[error("{file}:{line}: key `{key}`: {message}")]
    Invalid {
        file: PathBuf,
        line: usize,
        key: String,
        message: String,
    },
}

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            file: path.to_owned(),
            source,
        })?;
        let mut config = Config::parse(&text, path)?;
        if let Some(key_file) = &config.interface.private_key_file {
            let at = |message: String| ConfigError::Invalid {
                file: path.to_owned(),
                line: find_key_line(&text, "interface.private_key_file"),
                key: "interface.private_key_file".into(),
                message,
            };
            let body = std::fs::read_to_string(key_file)
                .map_err(|e| at(format!("cannot read {}: {e}", key_file.display())))?;
            let key = body
                .trim()
                .parse::<PrivateKey>()
                .map_err(|e| at(format!("{}: {e}", key_file.display())))?;
            config.loaded_key = Some(key);
        }
        Ok(config)
    }

    /// Parses and validates `text`; `file` is only used in error messages.
    pub fn parse(text: &str, file: &Path) -> Result<Config, ConfigError> {
        let de = toml::Deserializer::new(text);
        let config: Config = serde_path_to_error::deserialize(de).map_err(|e| {
            let key = e.path().to_string();
            let inner = e.into_inner();
            let line = inner
                .span()
                .map(|s| line_of(text, s.start))
                .unwrap_or_else(|| find_key_line(text, &key));
            ConfigError::Invalid {
                file: file.to_owned(),
                line,
                key: if key == "." {
                    "(top level)".into()
                } else {
                    key
                },
                message: inner.message().trim().to_string(),
            }
        })?;
        config.validate(text, file)?;
        Ok(config)
    }

    fn validate(&self, text: &str, file: &Path) -> Result<(), ConfigError> {
        let err = |key: String, message: &str| ConfigError::Invalid {
            line: find_key_line(text, &key),
            file: file.to_owned(),
            key,
            message: message.to_string(),
        };
        let iface = &self.interface;
        match (&iface.private_key, &iface.private_key_file) {
            (Some(_), Some(_)) => {
                return Err(err(
                    "interface.private_key_file".into(),
                    "give either private_key or private_key_file, not both",
                ))
            }
            (None, None) => {
                return Err(err(
                    "interface.private_key".into(),
                    "missing: set private_key or private_key_file",
                ))
            }
            _ => {}
        }
        let bad_char = |c: char| c == '/' || c == ':' || c.is_whitespace() || c.is_control();
        if iface.name.is_empty()
            || iface.name.len() > 15
            || iface.name.chars().any(bad_char)
            || iface.name == "."
            || iface.name == ".."
        {
            return Err(err(
                "interface.name".into(),
                "an interface name has 1 to 15 characters, none of them `/`, `:` or white space, \
                 and is not `.` or `..`",
            ));
        }
        if iface.mtu < 1280 || iface.mtu > 9000 {
            return Err(err("interface.mtu".into(), "must be between 1280 and 9000"));
        }
        for (i, p) in self.peers.iter().enumerate() {
            if self.peers[..i].iter().any(|q| q.public_key == p.public_key) {
                return Err(err(
                    format!("peer[{i}].public_key"),
                    "this peer is listed twice",
                ));
            }
        }
        Ok(())
    }

    /// The node's private key, read from the file if configured that way.
    pub fn private_key(&self) -> Result<PrivateKey, ConfigError> {
        if let Some(k) = self
            .interface
            .private_key
            .as_ref()
            .or(self.loaded_key.as_ref())
        {
            return Ok(k.clone());
        }
        let path = self
            .interface
            .private_key_file
            .as_deref()
            .unwrap_or(Path::new(""));
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            file: path.to_owned(),
            source,
        })?;
        text.trim()
            .parse()
            .map_err(|e: crate::keys::KeyError| ConfigError::Invalid {
                file: path.to_owned(),
                line: 1,
                key: "private key".into(),
                message: e.to_string(),
            })
    }
}

fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].matches('\n').count() + 1
}

/// Best-effort line of a dotted key such as `peer[1].endpoint` or
/// `interface.mtu`: the line of the last segment's key inside the right
/// table, or of the table header when the key itself is absent (a missing
/// key). Used for errors the parser gives no span for.
fn find_key_line(text: &str, path: &str) -> usize {
    let mut segs: Vec<&str> = path.split('.').collect();
    let leaf = segs.pop().unwrap_or("");
    let (table, index) = match segs.first() {
        Some(t) => match t.split_once('[') {
            Some((name, rest)) => (name, rest.trim_end_matches(']').parse::<usize>().ok()),
            None => (*t, None),
        },
        None => ("", None),
    };
    let mut in_table = table.is_empty();
    let mut header_line = 1;
    let mut seen = 0usize;
    for (n, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.starts_with('[') {
            let name = line.trim_matches(|c| c == '[' || c == ']').trim();
            in_table = name == table
                && match index {
                    Some(i) => {
                        seen += 1;
                        seen == i + 1
                    }
                    None => true,
                };
            if in_table {
                header_line = n + 1;
            }
            continue;
        }
        if in_table {
            if let Some((k, _)) = line.split_once('=') {
                if k.trim() == leaf {
                    return n + 1;
                }
            }
        }
    }
    header_line
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk=";
    const PUB: &str = "HIgo9xNzJMWLKASShiTqIybxZ0U3wGLiUeJ1PKf8ykw=";

    fn parse(s: &str) -> Result<Config, ConfigError> {
        Config::parse(s, Path::new("warren.toml"))
    }

    #[test]
    fn full_config_parses_with_defaults() {
        let c = parse(&format!(
            "[interface]\nprivate_key = \"{KEY}\"\naddresses = [\"100.64.0.1/24\", \"fd00::1/64\"]\n\n\
             [[peer]]\npublic_key = \"{PUB}\"\nallowed_ips = [\"100.64.0.2/32\"]\nendpoint = \"11.11.0.2:51820\"\npersistent_keepalive = 25\n"
        ))
        .unwrap();
        assert_eq!(c.interface.name, "warren0");
        assert_eq!(c.interface.mtu, DEFAULT_MTU);
        assert_eq!(c.interface.listen_port, DEFAULT_PORT);
        assert!(c.interface.offload);
        assert_eq!(c.interface.addresses.len(), 2);
        assert_eq!(c.peers.len(), 1);
        assert_eq!(c.peers[0].persistent_keepalive, Some(25));
        assert_eq!(c.private_key().unwrap().public().to_string(), PUB);
        assert_eq!(c.agent.socket, Path::new("/run/warren/warren.sock"));
    }

    fn invalid(s: &str) -> (usize, String, String) {
        match parse(s) {
            Err(ConfigError::Invalid {
                line, key, message, ..
            }) => (line, key, message),
            other => panic!("expected an error, got {other:?}"),
        }
    }

    #[test]
    fn bad_value_names_line_and_key() {
        let (line, key, msg) = invalid(&format!(
            "[interface]\nprivate_key = \"{KEY}\"\nmtu = \"big\"\n"
        ));
        assert_eq!((line, key.as_str()), (3, "interface.mtu"), "{msg}");
    }

    #[test]
    fn unknown_key_names_line() {
        let (line, key, msg) = invalid(&format!(
            "[interface]\nprivate_key = \"{KEY}\"\n\n[[peer]]\npublic_key = \"{PUB}\"\nendpont = \"1.2.3.4:5\"\n"
        ));
        assert_eq!(line, 6, "{key}: {msg}");
        assert!(msg.contains("endpont"), "{msg}");
    }

    #[test]
    fn bad_key_in_second_peer() {
        let (line, key, msg) = invalid(&format!(
            "[interface]\nprivate_key = \"{KEY}\"\n[[peer]]\npublic_key = \"{PUB}\"\n[[peer]]\npublic_key = \"short\"\n"
        ));
        assert_eq!((line, key.as_str()), (6, "peer[1].public_key"));
        assert!(msg.contains("base64") || msg.contains("32 bytes"), "{msg}");
    }

    #[test]
    fn bad_endpoint_and_cidr() {
        let (line, key, _) = invalid(&format!(
            "[interface]\nprivate_key = \"{KEY}\"\n[[peer]]\npublic_key = \"{PUB}\"\nendpoint = \"nowhere\"\n"
        ));
        assert_eq!((line, key.as_str()), (5, "peer[0].endpoint"));
        let (line, key, _) = invalid(&format!(
            "[interface]\nprivate_key = \"{KEY}\"\naddresses = [\"100.64.0.1/99\"]\n"
        ));
        assert_eq!(line, 3);
        assert!(key.starts_with("interface.addresses"), "{key}");
    }

    #[test]
    fn syntax_error_has_line() {
        let (line, _, _) = invalid("[interface]\nprivate_key = \n");
        assert_eq!(line, 2);
    }

    #[test]
    fn semantic_errors_are_located() {
        let (line, key, _) = invalid("[interface]\nmtu = 1400\n");
        assert_eq!((line, key.as_str()), (1, "interface.private_key"));
        let (line, key, _) = invalid(&format!(
            "[interface]\nprivate_key = \"{KEY}\"\nmtu = 100\n"
        ));
        assert_eq!((line, key.as_str()), (3, "interface.mtu"));
        let (line, key, _) = invalid(&format!(
            "[interface]\nprivate_key = \"{KEY}\"\n[[peer]]\npublic_key = \"{PUB}\"\n[[peer]]\npublic_key = \"{PUB}\"\n"
        ));
        assert_eq!((line, key.as_str()), (6, "peer[1].public_key"));
    }

    #[test]
    fn bad_interface_names() {
        for name in ["a/b", "a b", "x:y", "..", "sixteen-chars-xx"] {
            let (line, key, _) = invalid(&format!(
                "[interface]\nprivate_key = \"{KEY}\"\nname = \"{name}\"\n"
            ));
            assert_eq!((line, key.as_str()), (3, "interface.name"), "{name}");
        }
    }

    #[test]
    fn key_file_errors_point_at_the_config_line() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("warren.toml");
        std::fs::write(
            &cfg,
            "[interface]\nmtu = 1400\nprivate_key_file = \"/nonexistent/key\"\n",
        )
        .unwrap();
        let e = Config::load(&cfg).unwrap_err().to_string();
        assert!(
            e.contains("warren.toml:3: key `interface.private_key_file`"),
            "{e}"
        );
        assert!(e.contains("cannot read /nonexistent/key"), "{e}");
        let keyfile = dir.path().join("key");
        std::fs::write(&keyfile, format!("{KEY}\n")).unwrap();
        std::fs::write(
            &cfg,
            format!(
                "[interface]\nprivate_key_file = \"{}\"\n",
                keyfile.display()
            ),
        )
        .unwrap();
        let c = Config::load(&cfg).unwrap();
        assert_eq!(c.private_key().unwrap().public().to_string(), PUB);
    }

    #[test]
    fn error_message_names_file() {
        let e = parse("[interface]\nmtu = 1400\n").unwrap_err().to_string();
        assert!(
            e.starts_with("warren.toml:1: key `interface.private_key`"),
            "{e}"
        );
    }
}
