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
        }
    }
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
        Ok(config)
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
    fn without_a_key_the_node_key_is_made_in_the_state_dir() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let c = parse(&format!("[agent]\nstate_dir = \"{}\"\n", state.display())).unwrap();
        let k1 = c.private_key().unwrap();
        let k2 = c.private_key().unwrap();
        assert_eq!(k1.public(), k2.public(), "made once, then reused");
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&state.join(NODE_KEY_FILE)), 0o600);
        assert_eq!(mode(&state), 0o700);
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
    fn portmap_protocols_default_to_all_and_can_be_chosen() {
        use crate::portmap::Protocol;
        let c = parse("[agent]\nportmap = true\n").unwrap();
        let pm = c.agent.portmap_config().unwrap();
        assert_eq!(
            pm.protocols(),
            [Protocol::Pcp, Protocol::NatPmp, Protocol::Upnp]
        );
        let c = parse("[agent]\nportmap_protocols = [\"upnp\", \"natpmp\"]\n").unwrap();
        let pm = c.agent.portmap_config().unwrap();
        assert_eq!(pm.protocols(), [Protocol::NatPmp, Protocol::Upnp]);
        let c = parse("[agent]\nportmap = false\nportmap_protocols = [\"pcp\"]\n").unwrap();
        assert!(c.agent.portmap_config().is_none(), "off wins");
    }

    #[test]
    fn bad_portmap_protocols_are_located() {
        let (line, key, msg) =
            invalid("[agent]\nportmap = true\nportmap_protocols = [\"pcp\", \"igd\"]\n");
        assert_eq!(line, 3, "{key}: {msg}");
        assert!(key.starts_with("agent.portmap_protocols"), "{key}");
        assert!(msg.contains("igd") && msg.contains("upnp"), "{msg}");
        let (line, key, msg) = invalid("[agent]\n\nportmap_protocols = []\n");
        assert_eq!(
            (line, key.as_str()),
            (3, "agent.portmap_protocols"),
            "{msg}"
        );
        let (line, key, msg) = invalid("[agent]\nportmap_protocols = [\"pcp\", \"pcp\"]\n");
        assert_eq!((line, key.as_str()), (2, "agent.portmap_protocols"));
        assert!(msg.contains("twice"), "{msg}");
        let (line, key, _) = invalid("[agent]\nportmap_protocols = \"pcp\"\n");
        assert_eq!((line, key.as_str()), (2, "agent.portmap_protocols"));
    }

    #[test]
    fn relay_transport_and_idle_timeout() {
        use crate::relay_client::RelayTransport;
        let c = parse("[agent]\nportmap = false\n").unwrap();
        assert_eq!(c.agent.relay_transport, RelayTransport::Auto);
        assert_eq!(c.agent.relay_idle_timeout, 60);
        for (text, want) in [
            ("auto", RelayTransport::Auto),
            ("upgrade", RelayTransport::Upgrade),
            ("websocket", RelayTransport::WebSocket),
        ] {
            let c = parse(&format!("[agent]\nrelay_transport = \"{text}\"\n")).unwrap();
            assert_eq!(c.agent.relay_transport, want, "{text}");
        }
        let (line, key, msg) = invalid("[agent]\nportmap = true\nrelay_transport = \"ws\"\n");
        assert_eq!((line, key.as_str()), (3, "agent.relay_transport"), "{msg}");
        assert!(
            msg.contains("websocket"),
            "the message lists the choices: {msg}"
        );
        let (line, key, _) = invalid("[agent]\n\nrelay_idle_timeout = 0\n");
        assert_eq!((line, key.as_str()), (3, "agent.relay_idle_timeout"));
        let (line, key, _) = invalid("[agent]\nrelay_idle_timeout = \"1m\"\n");
        assert_eq!((line, key.as_str()), (2, "agent.relay_idle_timeout"));
        let (line, key, _) = invalid("[agent]\nportmap = true\nbirthday_ports = 4\n");
        assert_eq!((line, key.as_str()), (3, "agent.birthday_ports"));
        let (line, key, _) = invalid("[agent]\nbirthday_ports = -1\n");
        assert_eq!((line, key.as_str()), (2, "agent.birthday_ports"));
    }

    #[test]
    fn error_message_names_file() {
        let e = parse("[interface]\nmtu = 100\n").unwrap_err().to_string();
        assert!(e.starts_with("warren.toml:2: key `interface.mtu`"), "{e}");
    }
}
