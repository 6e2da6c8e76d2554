//! What `warren up` leaves behind: which coordinator this node joined, as
//! whom, so that a restarted daemon re-joins by itself (no token needed:
//! the coordinator knows the node key). Plus the host endpoint candidates.
//!
//! The login file is small JSON in the state directory, written with mode
//! 0600 like the node key beside it.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::control::client::ControlClient;
use crate::control::types::{Endpoint, EndpointKind};
use crate::keys::PrivateKey;

const LOGIN_FILE: &str = "login.json";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Login {
    pub coordinator: String,
    pub hostname: String,
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// The CA file's contents as `warren up` sent them (see
    /// [`crate::api::mesh::read_ca_file`]); kept here so a restart never
    /// has the daemon open the path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_pem: Option<String>,
    /// The network's IPv6 /48, pinned at the first join: later maps may
    /// not move this node or its peers out of it
    /// ([`crate::control::bounds`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ula: Option<ipnet::Ipv6Net>,
    /// The tags this node advertises, sorted (see [`crate::control::types::validate_tag`]).
    #[serde(default)]
    pub tags: Vec<String>,
    /// The routes this node advertises (subnets, and both default routes
    /// as an exit node), sorted (`control::advertise`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<ipnet::IpNet>,
    /// `warren up --accept-routes`: use the subnet routes peers serve.
    #[serde(default)]
    pub accept_routes: bool,
    /// `--snat-subnet-routes`: source-NAT what this router forwards.
    #[serde(default = "yes")]
    pub snat_subnet_routes: bool,
    /// `--exit-node`: the peer all other traffic goes through.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_node: Option<crate::keys::NodeKey>,
    /// `--exit-node-allow-lan-access`: this host's networks stay direct.
    #[serde(default)]
    pub exit_node_allow_lan_access: bool,
    /// `--accept-dns`: point the host's DNS at warren's resolver.
    #[serde(default = "yes")]
    pub accept_dns: bool,
    /// Set by `warren down`: the node stays out of the network across
    /// restarts until `warren up`.
    #[serde(default)]
    pub stopped: bool,
}

fn yes() -> bool {
    true
}

impl Login {
    /// What a registration advertises for this login: its tags and routes.
    pub fn advertised(&self) -> crate::control::client::Advertised<'_> {
        crate::control::client::Advertised {
            tags: Some(&self.tags),
            routes: Some(&self.routes),
        }
    }

    pub fn load(state_dir: &Path) -> Option<Login> {
        let text = std::fs::read_to_string(state_dir.join(LOGIN_FILE)).ok()?;
        match serde_json::from_str(&text) {
            Ok(l) => Some(l),
            Err(e) => {
                tracing::warn!(error = %e, "ignoring unreadable {LOGIN_FILE}");
                None
            }
        }
    }

    pub fn save(&self, state_dir: &Path) -> std::io::Result<()> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::create_dir_all(state_dir)?;
        let tmp = state_dir.join(format!("{LOGIN_FILE}.tmp"));
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(
            serde_json::to_string_pretty(self)
                .map_err(std::io::Error::other)?
                .as_bytes(),
        )?;
        f.sync_all()?;
        std::fs::rename(tmp, state_dir.join(LOGIN_FILE))
    }

    pub fn remove(state_dir: &Path) {
        let _ = std::fs::remove_file(state_dir.join(LOGIN_FILE));
    }

    /// The CA certificate(s) to trust, when the login has them. A login
    /// saved by an older version has only the file's name: that file is
    /// read once, with the same checks as the CLI's, and kept.
    pub fn ca_pem(&self) -> Result<Option<Vec<u8>>, String> {
        match (&self.ca_pem, &self.ca_file) {
            (Some(pem), _) => Ok(Some(pem.clone().into_bytes())),
            (None, Some(ca)) => crate::api::mesh::read_ca_file(ca)
                .map(|pem| Some(pem.into_bytes()))
                .map_err(|e| format!("the CA file: {e}")),
            (None, None) => Ok(None),
        }
    }

    /// The control client for this login. `insecure` is
    /// `agent.insecure_http`: without it, `http://` is refused unless the
    /// coordinator is on this machine.
    pub fn client(
        &self,
        key: PrivateKey,
        state_dir: &Path,
        insecure: bool,
    ) -> Result<ControlClient, String> {
        if !crate::dial::plain_http_allowed(&self.coordinator, insecure) {
            return Err(format!(
                "refusing plain HTTP to {}: use https://, or set agent.insecure_http = true \
                 in the config (labs only: the token and the map would cross the network \
                 unprotected)",
                self.coordinator
            ));
        }
        let res = match self.ca_pem()? {
            Some(pem) => ControlClient::with_ca_pem(&self.coordinator, key, state_dir, &pem),
            None => ControlClient::new(&self.coordinator, key, state_dir),
        };
        res.map_err(|e| e.to_string())
    }
}

pub fn system_hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "warren-node".into())
}

/// The host's own addresses with our port: the `host` candidates. Loopback,
/// link-local and the overlay ranges are left out: a peer cannot reach us
/// there (or would loop through the tunnel).
pub fn host_endpoints(port: u16) -> Vec<Endpoint> {
    let Ok(addrs) = nix::ifaddrs::getifaddrs() else {
        return Vec::new();
    };
    let mut out: Vec<Endpoint> = addrs
        .filter_map(|ifa| {
            let sa = ifa.address?;
            let ip: IpAddr = if let Some(v4) = sa.as_sockaddr_in() {
                IpAddr::V4(v4.ip())
            } else {
                IpAddr::V6(sa.as_sockaddr_in6()?.ip())
            };
            crate::proto::disco::is_candidate_ip(ip).then_some(Endpoint {
                addr: SocketAddr::new(ip, port),
                kind: EndpointKind::Host,
            })
        })
        .collect();
    out.sort_by_key(|e| e.addr);
    out.dedup();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn login_round_trips_and_is_private() {
        let dir = tempfile::tempdir().unwrap();
        let l = Login {
            coordinator: "http://11.11.0.1:8080".into(),
            hostname: "a".into(),
            ca_file: None,
            ca_pem: None,
            ula: None,
            tags: vec!["tag:db".into()],
            routes: vec!["10.0.0.0/24".parse().unwrap()],
            accept_routes: true,
            snat_subnet_routes: false,
            exit_node: Some(crate::keys::NodeKey([7; 32])),
            exit_node_allow_lan_access: true,
            accept_dns: false,
            stopped: true,
        };
        l.save(dir.path()).unwrap();
        assert_eq!(Login::load(dir.path()), Some(l));
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join(LOGIN_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        Login::remove(dir.path());
        assert_eq!(Login::load(dir.path()), None);
    }
}
