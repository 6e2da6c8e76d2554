//! The network's DNS settings (README, "Names and DNS"): the domain every
//! node's name lives under, extra records, split DNS, and the global
//! nameservers. The coordinator reads them from its `--dns-config` file
//! and `--dns-domain`, checks them here, and sends them in every full map;
//! the agent's resolver (`dns::resolver`) answers and forwards by them.
//!
//! One type and one check for both sides, in the library, because they
//! travel on the wire: a coordinator never sends what an agent would
//! refuse, and an agent re-checks what arrives (a map is input like any
//! other).

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// The domain when the coordinator is given none.
pub const DEFAULT_DOMAIN: &str = "warren.internal";

/// The most split domains, nameservers and extra records a map may carry:
/// enough for any real network, small enough that a hostile map cannot
/// make a resolver slow.
pub const MAX_ENTRIES: usize = 256;

/// The network's DNS settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DnsSettings {
    /// Nodes are `NAME.DOMAIN`.
    pub domain: String,
    /// Nameservers for everything that is not the network's own nor a
    /// split domain, used instead of the host's own resolvers only with
    /// `override_local` (or when the host has none).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nameservers: Vec<Upstream>,
    /// Use `nameservers` for every other name, not the host's resolvers.
    #[serde(default)]
    pub override_local: bool,
    /// Split DNS: names under each domain go to its servers.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub split: BTreeMap<String, Vec<Upstream>>,
    /// Records the resolver answers besides the nodes' names.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub extra_records: Vec<ExtraRecord>,
}

impl Default for DnsSettings {
    fn default() -> Self {
        DnsSettings {
            domain: DEFAULT_DOMAIN.into(),
            nameservers: Vec::new(),
            override_local: false,
            split: BTreeMap::new(),
            extra_records: Vec::new(),
        }
    }
}

/// One extra record: `name` (relative names are under the domain) has
/// address `value`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExtraRecord {
    pub name: String,
    #[serde(rename = "type")]
    pub kind: RecordKind,
    pub value: IpAddr,
}

/// The record types an extra record may have.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RecordKind {
    A,
    #[serde(rename = "AAAA")]
    Aaaa,
}

/// A nameserver: an address, port 53 unless given (`10.0.0.53`,
/// `10.0.0.53:5353`, `[fd00::53]:53`, `fd00::53`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Upstream(pub SocketAddr);

impl FromStr for Upstream {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        if let Ok(ip) = s.parse::<IpAddr>() {
            return Ok(Upstream(SocketAddr::new(ip, 53)));
        }
        s.parse::<SocketAddr>()
            .map(Upstream)
            .map_err(|_| format!("{s:?} is not a nameserver address (10.0.0.53 or 10.0.0.53:5353)"))
    }
}

impl fmt::Display for Upstream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.port() == 53 {
            write!(f, "{}", self.0.ip())
        } else {
            write!(f, "{}", self.0)
        }
    }
}

impl Serialize for Upstream {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Upstream {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Why DNS settings were refused: the dotted key and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{key}: {message}")]
pub struct SettingsError {
    pub key: String,
    pub message: String,
}

fn err(key: impl Into<String>, message: impl Into<String>) -> SettingsError {
    SettingsError {
        key: key.into(),
        message: message.into(),
    }
}

/// Whether `name` is a DNS name warren accepts: dot-separated labels of
/// 1–63 letters, digits, `-` or `_` (not starting or ending with `-`), 253
/// characters at most; one trailing dot allowed.
pub fn valid_name(name: &str) -> bool {
    let name = name.strip_suffix('.').unwrap_or(name);
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

/// A name in the form the resolver compares: lower case, no trailing dot.
pub fn canonical(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

impl DnsSettings {
    /// Checks the settings and puts every name in canonical form.
    pub fn checked(mut self) -> Result<DnsSettings, SettingsError> {
        if !valid_name(&self.domain) || !self.domain.contains(|c: char| c.is_ascii_alphabetic()) {
            return Err(err(
                "domain",
                format!(
                    "{:?} is not a DNS domain (such as warren.internal)",
                    self.domain
                ),
            ));
        }
        self.domain = canonical(&self.domain);
        let too_many = |what: &str, n: usize| {
            (n > MAX_ENTRIES).then(|| err(what, format!("{n} given; at most {MAX_ENTRIES}")))
        };
        if let Some(e) = too_many("nameservers", self.nameservers.len())
            .or_else(|| too_many("split", self.split.len()))
            .or_else(|| too_many("extra_records", self.extra_records.len()))
        {
            return Err(e);
        }
        if self.override_local && self.nameservers.is_empty() {
            return Err(err(
                "override_local",
                "is true but no nameservers are given: every name outside the network would fail",
            ));
        }
        let mut split = BTreeMap::new();
        for (domain, servers) in std::mem::take(&mut self.split) {
            let key = format!("split.{domain}");
            if !valid_name(&domain) {
                return Err(err(key, format!("{domain:?} is not a DNS domain")));
            }
            if servers.is_empty() || servers.len() > MAX_ENTRIES {
                return Err(err(key, "needs 1 to 256 nameservers"));
            }
            let d = canonical(&domain);
            if d == self.domain || d.ends_with(&format!(".{}", self.domain)) {
                return Err(err(
                    key,
                    format!("is inside the network's own domain {}", self.domain),
                ));
            }
            split.insert(d, servers);
        }
        self.split = split;
        for (i, r) in self.extra_records.iter_mut().enumerate() {
            let key = |k: &str| format!("extra_records[{i}].{k}");
            if !valid_name(&r.name) {
                return Err(err(key("name"), format!("{:?} is not a DNS name", r.name)));
            }
            // A relative name is under the network's domain.
            r.name = if r.name.ends_with('.') || r.name.contains('.') {
                canonical(&r.name)
            } else {
                format!("{}.{}", canonical(&r.name), self.domain)
            };
            let family_ok = match r.kind {
                RecordKind::A => r.value.is_ipv4(),
                RecordKind::Aaaa => r.value.is_ipv6(),
            };
            if !family_ok {
                return Err(err(
                    key("value"),
                    format!("{} does not fit a record of type {:?}", r.value, r.kind),
                ));
            }
        }
        Ok(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(toml_text: &str) -> Result<DnsSettings, SettingsError> {
        let s: DnsSettings = toml::from_str(toml_text).map_err(|e| err("toml", e.to_string()))?;
        s.checked()
    }

    #[test]
    fn names_are_canonical_and_relative_records_join_the_domain() {
        let s = settings(
            r#"
            domain = "Corp.Warren.Internal."
            nameservers = ["1.1.1.1", "[2606:4700::1111]:53"]
            [split]
            "Office.Example" = ["10.0.0.53:5353"]
            [[extra_records]]
            name = "grafana"
            type = "A"
            value = "100.64.9.9"
            [[extra_records]]
            name = "db.example.com."
            type = "AAAA"
            value = "fd00::5"
            "#,
        )
        .unwrap();
        assert_eq!(s.domain, "corp.warren.internal");
        assert_eq!(s.extra_records[0].name, "grafana.corp.warren.internal");
        assert_eq!(s.extra_records[1].name, "db.example.com");
        assert_eq!(s.split["office.example"][0].0.port(), 5353);
        assert_eq!(s.nameservers[0].0.port(), 53);
        assert_eq!(s.nameservers[0].to_string(), "1.1.1.1");
    }

    #[test]
    fn bad_settings_name_the_key() {
        let cases = [
            ("domain = \"not a domain\"", "domain"),
            ("domain = \"x\"\noverride_local = true", "override_local"),
            (
                "domain = \"x.internal\"\n[split]\n\"bad domain\" = [\"10.0.0.1\"]",
                "split.bad domain",
            ),
            (
                "domain = \"x.internal\"\n[split]\n\"a.x.internal\" = [\"10.0.0.1\"]",
                "split.a.x.internal",
            ),
            ("domain = \"x.internal\"\n[split]\n\"corp.example\" = []", "split.corp.example"),
            (
                "domain = \"x.internal\"\n[[extra_records]]\nname = \"a\"\ntype = \"A\"\nvalue = \"fd00::1\"",
                "extra_records[0].value",
            ),
            (
                "domain = \"x.internal\"\n[[extra_records]]\nname = \"-a\"\ntype = \"A\"\nvalue = \"10.0.0.1\"",
                "extra_records[0].name",
            ),
        ];
        for (text, key) in cases {
            let e = settings(text).unwrap_err();
            assert_eq!(e.key, key, "{text}: {e}");
        }
        assert!("10.0.0.1:99999".parse::<Upstream>().is_err());
    }

    #[test]
    fn valid_names() {
        assert!(valid_name("a.b-c.d_e."));
        assert!(!valid_name("a..b"));
        assert!(!valid_name(&"a".repeat(64)));
        assert!(!valid_name("a b"));
        assert!(!valid_name(""));
    }
}
