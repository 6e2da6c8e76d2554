//! The relay map the coordinator publishes: its own embedded relay as one
//! region, plus the regions of standalone relays read from a TOML file.
//!
//! The map travels in every registration answer and every full map, so an
//! agent learns where the relays are from the coordinator alone (see
//! docs/architecture.md, "Relay").
//! The embedded region's URL comes from the URL agents use for this
//! coordinator (`--public-url`), or from the listening address when that is
//! concrete; a wildcard address says nothing about how agents reach us, so
//! then the URL must be given.
//!
//! File errors name the line and the dotted key (`region[1].url`), as the
//! agent's configuration errors do, through the same locator
//! ([`warren::toml_loc`]).

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use warren::control::{RelayMap, RelayRegion};
use warren::dial;
use warren::keys::NodeKey;
use warren::toml_loc;

/// The path the relay is served at (see `relay::RelayServer::router`).
pub const RELAY_PATH: &str = "/relay";

/// A relay map file that cannot be used, located in the file.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RelayMapError {
    #[error("{file}: cannot read: {source}")]
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
    #[error("{file}:{line}: key `{key}`: {source}")]
    BadUrl {
        file: PathBuf,
        line: usize,
        key: String,
        /// Boxed: a `DialError` is large and this one is rare.
        #[source]
        source: Box<dial::DialError>,
    },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct MapFile {
    #[serde(default)]
    region: Vec<RegionEntry>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RegionEntry {
    id: u16,
    name: String,
    url: String,
    #[serde(default)]
    stun: Vec<SocketAddr>,
    /// The relay's public key, as `warren-coordinator relay` logs it at
    /// start; agents then refuse a server at `url` with any other.
    #[serde(default)]
    key: Option<NodeKey>,
}

/// Reads a relay map file. `reserved` is the embedded relay's region id,
/// which no listed region may reuse.
pub fn load(path: &Path, reserved: Option<u16>) -> Result<RelayMap, RelayMapError> {
    let text = std::fs::read_to_string(path).map_err(|source| RelayMapError::Read {
        file: path.to_owned(),
        source,
    })?;
    parse(&text, path, reserved)
}

/// Parses and checks a relay map; `file` is only used in error messages.
pub fn parse(text: &str, file: &Path, reserved: Option<u16>) -> Result<RelayMap, RelayMapError> {
    let parsed: MapFile = toml_loc::from_str(text).map_err(|e| RelayMapError::Invalid {
        file: file.to_owned(),
        line: e.line,
        key: e.key,
        message: e.message,
    })?;
    let invalid = |key: String, message: String| RelayMapError::Invalid {
        file: file.to_owned(),
        line: toml_loc::key_line(text, &key),
        key,
        message,
    };
    let mut ids = HashSet::new();
    let mut regions = Vec::with_capacity(parsed.region.len());
    for (i, r) in parsed.region.into_iter().enumerate() {
        if r.id == 0 {
            return Err(invalid(
                format!("region[{i}].id"),
                "0 is not a region id".into(),
            ));
        }
        if Some(r.id) == reserved {
            return Err(invalid(
                format!("region[{i}].id"),
                format!(
                    "region {} is the embedded relay's (change --region-id or this id)",
                    r.id
                ),
            ));
        }
        if !ids.insert(r.id) {
            return Err(invalid(
                format!("region[{i}].id"),
                format!("region {} is listed twice", r.id),
            ));
        }
        if r.name.trim().is_empty() {
            return Err(invalid(format!("region[{i}].name"), "empty name".into()));
        }
        if let Err(source) = dial::parse_url(&r.url, true) {
            let key = format!("region[{i}].url");
            return Err(RelayMapError::BadUrl {
                file: file.to_owned(),
                line: toml_loc::key_line(text, &key),
                key,
                source: Box::new(source),
            });
        }
        regions.push(RelayRegion {
            id: r.id,
            name: r.name,
            url: r.url,
            stun: r.stun,
            key: r.key,
        });
    }
    Ok(RelayMap { regions })
}

/// The embedded relay's region, as configured.
#[derive(Debug, Clone)]
pub struct EmbeddedRegion {
    pub id: u16,
    pub name: String,
    /// The URL agents use for this coordinator (`https://host[:port]`).
    pub public_url: Option<String>,
    /// STUN addresses to publish; empty means the bound STUN sockets.
    pub stun_advertise: Vec<SocketAddr>,
}

impl Default for EmbeddedRegion {
    fn default() -> Self {
        EmbeddedRegion {
            id: 1,
            name: "default".into(),
            public_url: None,
            stun_advertise: Vec::new(),
        }
    }
}

/// Why the embedded relay's region cannot be published. Local to this file
/// (not `server::ServerError`), which the fuzz target compiles on its own.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EmbeddedError {
    #[error("relay: --public-url: {0}")]
    PublicUrl(#[source] dial::DialError),
    #[error("relay: --public-url {0:?}: give scheme://host[:port] only; the relay is served at {RELAY_PATH} on it")]
    PublicUrlPath(String),
}

impl EmbeddedRegion {
    /// The region agents see, given where the coordinator listens and the
    /// STUN sockets it bound. `None` (with a warning) when no URL can be
    /// told: the relay still runs, but agents are not sent to it.
    pub fn region(
        &self,
        listen: SocketAddr,
        tls: bool,
        stun_bound: &[SocketAddr],
        key: NodeKey,
    ) -> Result<Option<RelayRegion>, EmbeddedError> {
        let base = match &self.public_url {
            Some(u) => {
                dial::parse_url(u, true).map_err(EmbeddedError::PublicUrl)?;
                let rest = u.split_once("://").map(|(_, r)| r).unwrap_or(u);
                if rest.trim_end_matches('/').contains('/') {
                    return Err(EmbeddedError::PublicUrlPath(u.clone()));
                }
                u.trim_end_matches('/').to_owned()
            }
            None if listen.ip().is_unspecified() => {
                tracing::warn!(
                    %listen,
                    "the embedded relay is not published: a wildcard address does not tell \
                     agents where to find it; give --public-url (or --no-relay to silence this)"
                );
                return Ok(None);
            }
            None => format!("{}://{listen}", if tls { "https" } else { "http" }),
        };
        let stun = if self.stun_advertise.is_empty() {
            // A wildcard socket is published at the public URL's address
            // when that is an IP literal; otherwise it cannot be published.
            let public_ip = dial::parse_url(&base, true)
                .ok()
                .and_then(|t| t.host.parse::<std::net::IpAddr>().ok());
            stun_bound
                .iter()
                .filter_map(|a| match (a.ip().is_unspecified(), public_ip) {
                    (false, _) => Some(*a),
                    (true, Some(ip)) => Some(SocketAddr::new(ip, a.port())),
                    (true, None) => {
                        tracing::warn!(
                            stun = %a,
                            "STUN listens on a wildcard address: give --stun-advertise to publish it"
                        );
                        None
                    }
                })
                .collect()
        } else {
            self.stun_advertise.clone()
        };
        Ok(Some(RelayRegion {
            id: self.id,
            name: self.name.clone(),
            url: format!("{base}{RELAY_PATH}"),
            stun,
            key: Some(key),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(text: &str) -> Result<RelayMap, RelayMapError> {
        parse(text, Path::new("relays.toml"), Some(1))
    }

    fn where_(e: RelayMapError) -> (usize, String) {
        match e {
            RelayMapError::Invalid { line, key, .. } | RelayMapError::BadUrl { line, key, .. } => {
                (line, key)
            }
            other => panic!("{other}"),
        }
    }

    const GOOD: &str = "[[region]]\nid = 2\nname = \"eu\"\nurl = \"https://eu.example/relay\"\nstun = [\"192.0.2.1:3478\"]\n\n[[region]]\nid = 3\nname = \"us\"\nurl = \"https://us.example\"\n";

    #[test]
    fn good_file_parses() {
        let m = p(GOOD).unwrap();
        assert_eq!(m.regions.len(), 2);
        assert_eq!(m.regions[0].stun, vec!["192.0.2.1:3478".parse().unwrap()]);
        assert_eq!(m.regions[1].url, "https://us.example");
        assert!(p("").unwrap().regions.is_empty());
        assert_eq!(m.regions[0].key, None, "no key given, none pinned");
        let k = NodeKey([5; 32]);
        let keyed = GOOD.replace("id = 3\n", &format!("id = 3\nkey = \"{k}\"\n"));
        assert_eq!(p(&keyed).unwrap().regions[1].key, Some(k));
        let bad_key = GOOD.replace("id = 3\n", "id = 3\nkey = \"not a key\"\n");
        assert_eq!(where_(p(&bad_key).unwrap_err()).1, "region[1].key");
    }

    #[test]
    fn errors_name_line_and_key() {
        let bad_stun = GOOD.replace("192.0.2.1:3478", "nonsense");
        assert_eq!(
            where_(p(&bad_stun).unwrap_err()),
            (5, "region[0].stun[0]".into())
        );
        let bad_url = GOOD.replace("https://us.example", "ftp://us.example");
        assert_eq!(
            where_(p(&bad_url).unwrap_err()),
            (10, "region[1].url".into())
        );
        let dup = GOOD.replace("id = 3", "id = 2");
        assert_eq!(where_(p(&dup).unwrap_err()), (8, "region[1].id".into()));
        let reserved = GOOD.replace("id = 3", "id = 1");
        let e = p(&reserved).unwrap_err();
        assert!(e.to_string().contains("embedded"), "{e}");
        assert_eq!(where_(e), (8, "region[1].id".into()));
        let unknown = GOOD.replace("name = \"us\"", "name = \"us\"\nport = 1");
        assert_eq!(
            where_(p(&unknown).unwrap_err()),
            (10, "region[1].port".into())
        );
        let missing = GOOD.replace("name = \"us\"\n", "");
        let (line, key) = where_(p(&missing).unwrap_err());
        assert_eq!(key, "region[1]");
        assert!((7..=8).contains(&line), "line {line}");
    }

    #[test]
    fn embedded_region_url_and_stun() {
        let r = EmbeddedRegion::default();
        let listen: SocketAddr = "127.0.0.1:8443".parse().unwrap();
        let stun: Vec<SocketAddr> = vec!["127.0.0.1:3478".parse().unwrap()];
        let k = NodeKey([9; 32]);
        let got = r.region(listen, true, &stun, k).unwrap().unwrap();
        assert_eq!(got.url, "https://127.0.0.1:8443/relay");
        assert_eq!(got.stun, stun);
        assert_eq!(got.key, Some(k), "the embedded region names its key");
        let any: SocketAddr = "0.0.0.0:443".parse().unwrap();
        assert!(matches!(r.region(any, true, &stun, k), Ok(None)));
        let with = EmbeddedRegion {
            public_url: Some("https://198.51.100.4/".into()),
            ..Default::default()
        };
        let wild: Vec<SocketAddr> = vec!["0.0.0.0:3478".parse().unwrap()];
        let got = with.region(any, true, &wild, k).unwrap().unwrap();
        assert_eq!(got.url, "https://198.51.100.4/relay");
        assert_eq!(got.stun, vec!["198.51.100.4:3478".parse().unwrap()]);
        let path = EmbeddedRegion {
            public_url: Some("https://x.example/prefix".into()),
            ..Default::default()
        };
        assert!(path.region(any, true, &wild, k).is_err());
    }
}
