//! The agent's configuration file (TOML).
//!
//! Errors matter more than parsing here: a person edits this file by hand,
//! and "invalid type" alone does not tell them where to look. Every error
//! therefore names the file, the line and the dotted key (`peer[1].endpoint`).
//! [`crate::toml_loc`] finds the key and line of a parse error. Checks that
//! serde cannot express (a key given twice in two forms, duplicate peers) run
//! after parsing and point at the line of the offending key.

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
    #[serde(default)]
    pub interface: InterfaceConfig,
    /// The key read from `private_key_file` at load time, so that a missing
    /// or bad key file is reported against the config line that names it.
    #[serde(skip)]
    loaded_key: Option<PrivateKey>,
    /// The rules read from `filter_file` at load time, for the same reason.
    #[serde(skip)]
    loaded_filter: Option<Vec<crate::policy::FilterRule>>,
    /// Peers configured by hand (`[[peer]]`), for example a stock WireGuard
    /// host. Peers learned from a coordinator come on top of these.
    #[serde(default, rename = "peer")]
    pub peers: Vec<PeerConfig>,
    /// The daemon itself (`[agent]`): its local API socket.
    #[serde(default)]
    pub agent: AgentConfig,
    /// The resolver (`[dns]`).
    #[serde(default)]
    pub dns: DnsConfig,
}

/// `[dns]`: the agent's resolver (README, "Names and DNS").
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DnsConfig {
    /// Run the resolver at all.
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// Where it listens (on the TUN device, for this host only).
    #[serde(default = "default_dns_address")]
    pub address: std::net::Ipv4Addr,
    /// Its IPv6 address [default: the network's /48 with `::53`].
    #[serde(default)]
    pub address_v6: Option<std::net::Ipv6Addr>,
    /// The file to point at it when no systemd-resolved manages DNS.
    #[serde(default = "default_resolv_conf")]
    pub resolv_conf: PathBuf,
}

impl Default for DnsConfig {
    fn default() -> Self {
        DnsConfig {
            enabled: true,
            address: default_dns_address(),
            address_v6: None,
            resolv_conf: default_resolv_conf(),
        }
    }
}

fn default_dns_address() -> std::net::Ipv4Addr {
    crate::agent::dns::DEFAULT_ADDRESS
}

fn default_resolv_conf() -> PathBuf {
    "/etc/resolv.conf".into()
}

/// `[agent]`: settings of the daemon rather than of the tunnel.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// The local API socket the CLI talks to.
    #[serde(default = "default_socket")]
    pub socket: PathBuf,
    /// Keys, the login and the last network map.
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
    /// Ask the gateway for a port mapping (UPnP IGD, NAT-PMP, PCP) once
    /// joined to a network.
    #[serde(default = "default_true")]
    pub portmap: bool,
    /// Which of them to use (`"pcp"`, `"natpmp"`, `"upnp"`); the mapper
    /// tries them in that fixed order whatever the order here.
    #[serde(default = "all_portmap_protocols")]
    pub portmap_protocols: Vec<crate::portmap::Protocol>,
    /// How relay connections enter: `"auto"` (the HTTP upgrade, falling
    /// back to WebSocket when the path refuses it), `"upgrade"` or
    /// `"websocket"` (for proxies that pass nothing else).
    #[serde(default)]
    pub relay_transport: crate::relay_client::RelayTransport,
    /// Seconds without traffic after which a connection to a relay other
    /// than the home relay is closed.
    #[serde(default = "default_relay_idle")]
    pub relay_idle_timeout: u64,
    /// The TCP port of the direct TCP path (used when UDP is blocked):
    /// listened on and dialled from. Unset: the WireGuard UDP port's
    /// number; 0: off.
    #[serde(default)]
    pub tcp_port: Option<u16>,
    /// Extra UDP sockets opened, for one attempt, when this host is the
    /// random-port side of a birthday attempt (16 to 1024).
    #[serde(default = "default_birthday_ports")]
    pub birthday_ports: u16,
    /// Allow `http://` coordinators and relays that are not on this
    /// machine. Labs only: without TLS, anyone on the path can read the
    /// join token, replace the network map and pose as the relay. Set in
    /// this root-owned file, never by a client, so a member of the
    /// `warren` group cannot turn it on.
    #[serde(default)]
    pub insecure_http: bool,
    /// Microseconds a runtime worker keeps polling the TUN device and the
    /// UDP socket after a packet before it parks (`agent::spin`); 0: off.
    /// Applied at start and on SIGHUP.
    #[serde(default = "default_busy_poll")]
    pub busy_poll_us: u64,
}

impl AgentConfig {
    /// The port mapper's settings, or `None` when mapping is off.
    pub fn portmap_config(&self) -> Option<crate::portmap::Config> {
        self.portmap
            .then(|| crate::portmap::Config::with_protocols(&self.portmap_protocols))
    }
}

fn all_portmap_protocols() -> Vec<crate::portmap::Protocol> {
    use crate::portmap::Protocol;
    vec![Protocol::Pcp, Protocol::NatPmp, Protocol::Upnp]
}

impl Default for AgentConfig {
    fn default() -> Self {
        AgentConfig {
            socket: default_socket(),
            state_dir: default_state_dir(),
            portmap: true,
            portmap_protocols: all_portmap_protocols(),
            relay_transport: Default::default(),
            relay_idle_timeout: default_relay_idle(),
            tcp_port: None,
            birthday_ports: default_birthday_ports(),
            insecure_http: false,
            busy_poll_us: default_busy_poll(),
        }
    }
}

fn default_busy_poll() -> u64 {
    crate::agent::spin::DEFAULT_WINDOW_US
}

fn default_relay_idle() -> u64 {
    60
}

fn default_birthday_ports() -> u16 {
    crate::traversal::Config::default().birthday_sockets
}

fn default_state_dir() -> PathBuf {
    "/var/lib/warren".into()
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
    /// A compiled packet filter (the JSON `warren-coordinator policy
    /// filter NODE --json` prints): what peers may send this host. Without
    /// one everything from a peer's allowed IPs passes; a network's policy
    /// replaces it while the node is joined to one that has a policy.
    pub filter_file: Option<PathBuf>,
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

impl Default for InterfaceConfig {
    fn default() -> Self {
        InterfaceConfig {
            name: default_name(),
            private_key: None,
            private_key_file: None,
            listen_port: default_port(),
            mtu: default_mtu(),
            addresses: Vec::new(),
            offload: true,
            filter_file: None,
        }
    }
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
                line: crate::toml_loc::key_line(&text, "interface.private_key_file"),
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
        if let Some(file) = &config.interface.filter_file {
            config.loaded_filter =
                Some(read_filter(file).map_err(|message| ConfigError::Invalid {
                    file: path.to_owned(),
                    line: crate::toml_loc::key_line(&text, "interface.filter_file"),
                    key: "interface.filter_file".into(),
                    message,
                })?);
        }
        Ok(config)
    }

    /// The rules of `[interface] filter_file`, as loaded.
    pub fn packet_filter(&self) -> Option<&[crate::policy::FilterRule]> {
        self.loaded_filter.as_deref()
    }

    /// Parses and validates `text`; `file` is only used in error messages.
    pub fn parse(text: &str, file: &Path) -> Result<Config, ConfigError> {
        let config: Config = crate::toml_loc::from_str(text).map_err(|e| ConfigError::Invalid {
            file: file.to_owned(),
            line: e.line,
            key: e.key,
            message: e.message,
        })?;
        config.validate(text, file)?;
        Ok(config)
    }

    fn validate(&self, text: &str, file: &Path) -> Result<(), ConfigError> {
        let err = |key: String, message: &str| ConfigError::Invalid {
            line: crate::toml_loc::key_line(text, &key),
            file: file.to_owned(),
            key,
            message: message.to_string(),
        };
        let iface = &self.interface;
        if iface.private_key.is_some() && iface.private_key_file.is_some() {
            return Err(err(
                "interface.private_key_file".into(),
                "give either private_key or private_key_file, not both",
            ));
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
        let protocols = &self.agent.portmap_protocols;
        if protocols.is_empty() {
            return Err(err(
                "agent.portmap_protocols".into(),
                "list at least one of \"pcp\", \"natpmp\", \"upnp\" \
                 (portmap = false turns port mapping off)",
            ));
        }
        for (i, p) in protocols.iter().enumerate() {
            if protocols[..i].contains(p) {
                return Err(err(
                    "agent.portmap_protocols".into(),
                    &format!("{p} is listed twice"),
                ));
            }
        }
        if self.agent.relay_idle_timeout == 0 {
            return Err(err(
                "agent.relay_idle_timeout".into(),
                "must be at least 1 (seconds)",
            ));
        }
        if self.agent.busy_poll_us > 1_000 {
            return Err(err(
                "agent.busy_poll_us".into(),
                "must be at most 1000 (microseconds; 0 turns busy-polling off)",
            ));
        }
        if !(16..=1024).contains(&self.agent.birthday_ports) {
            return Err(err(
                "agent.birthday_ports".into(),
                "must be between 16 and 1024 (sockets)",
            ));
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
        if let Some(path) = &self.interface.private_key_file {
            return read_key_file(path);
        }
        // No key configured: the node key lives in the state directory and
        // is made at first start (see docs/architecture.md, "Keys").
        let path = self.agent.state_dir.join(NODE_KEY_FILE);
        if path.exists() {
            return read_key_file(&path);
        }
        let key = PrivateKey::generate();
        write_private(&path, &key.to_base64()).map_err(|source| ConfigError::Read {
            file: path.clone(),
            source,
        })?;
        tracing::info!(file = %path.display(), "created a new node key");
        Ok(key)
    }
}

/// The node key's file name inside the state directory.
pub const NODE_KEY_FILE: &str = "private.key";

/// Reads a compiled filter file; the error says where in it.
fn read_filter(file: &Path) -> Result<Vec<crate::policy::FilterRule>, String> {
    use crate::policy::filter::MAX_RULES;
    let text = std::fs::read_to_string(file)
        .map_err(|e| format!("cannot read {}: {e}", file.display()))?;
    let rules: Vec<crate::policy::FilterRule> = serde_json::from_str(&text).map_err(|e| {
        format!(
            "{}: not a compiled filter (a JSON list of {{\"proto\", \"src\", \"dst\"}} \
             rules): {e}",
            file.display()
        )
    })?;
    if rules.len() > MAX_RULES {
        return Err(format!(
            "{}: {} rules, more than the {MAX_RULES} a filter may have",
            file.display(),
            rules.len()
        ));
    }
    Ok(rules)
}

fn read_key_file(path: &Path) -> Result<PrivateKey, ConfigError> {
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

/// Writes a secret file with mode 0600 inside a 0700 directory.
fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    if let Some(dir) = path.parent() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)?;
    }
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(text.as_bytes())?;
    f.write_all(b"\n")?;
    f.sync_all()
}

#[cfg(test)]
#[path = "config_tests.rs"]
mod tests;
