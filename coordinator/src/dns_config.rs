//! The coordinator's DNS settings file (`serve --dns-config FILE`, README,
//! "Names and DNS"): one `[dns]` table with the network's domain, global
//! nameservers, `override_local`, `[dns.split]` and `[[dns.extra_records]]`.
//! `--dns-domain` overrides the file's domain.
//!
//! Read once at start; the settings go into every full map. A bad file
//! stops the coordinator with the line and the dotted key, through the
//! same locator as the relay map ([`warren::toml_loc`]); the checks are
//! the library's (`warren::dns::DnsSettings::checked`), the same an agent
//! applies to what it receives.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use warren::dns::settings::{ExtraRecord, DEFAULT_DOMAIN};
use warren::dns::{DnsSettings, Upstream};
use warren::toml_loc;

/// A DNS settings file that cannot be used, located in the file.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DnsConfigError {
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
    #[error("--dns-domain: {0}")]
    Domain(String),
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    dns: Table,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Table {
    domain: Option<String>,
    #[serde(default)]
    nameservers: Vec<Upstream>,
    #[serde(default)]
    override_local: bool,
    #[serde(default)]
    split: BTreeMap<String, Vec<Upstream>>,
    #[serde(default)]
    extra_records: Vec<ExtraRecord>,
}

/// The settings from `file` (if any) with `domain` (if given) over its
/// domain, checked.
pub fn load(file: Option<&Path>, domain: Option<&str>) -> Result<DnsSettings, DnsConfigError> {
    let (table, text, path) = match file {
        Some(path) => {
            let text = std::fs::read_to_string(path).map_err(|source| DnsConfigError::Read {
                file: path.to_owned(),
                source,
            })?;
            let parsed: File = toml_loc::from_str(&text).map_err(|e| DnsConfigError::Invalid {
                file: path.to_owned(),
                line: e.line,
                key: e.key,
                message: e.message,
            })?;
            (parsed.dns, text, path.to_owned())
        }
        None => (Table::default(), String::new(), PathBuf::new()),
    };
    let settings = DnsSettings {
        domain: domain
            .map(str::to_owned)
            .or(table.domain)
            .unwrap_or_else(|| DEFAULT_DOMAIN.into()),
        nameservers: table.nameservers,
        override_local: table.override_local,
        split: table.split,
        extra_records: table.extra_records,
    };
    settings.checked().map_err(|e| {
        if e.key == "domain" && domain.is_some() {
            return DnsConfigError::Domain(e.message);
        }
        let key = format!("dns.{}", e.key);
        DnsConfigError::Invalid {
            file: path.clone(),
            line: toml_loc::key_line(&text, &key),
            key,
            message: e.message,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load_text(text: &str, domain: Option<&str>) -> Result<DnsSettings, DnsConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("dns.toml");
        std::fs::write(&f, text).unwrap();
        load(Some(&f), domain)
    }

    #[test]
    fn a_file_and_the_flag_make_the_settings() {
        let s = load_text(
            "[dns]\ndomain = \"corp.internal\"\nnameservers = [\"9.9.9.9\"]\n[dns.split]\n\"office.example\" = [\"10.0.0.53\"]\n[[dns.extra_records]]\nname = \"grafana\"\ntype = \"A\"\nvalue = \"100.64.1.2\"\n",
            None,
        )
        .unwrap();
        assert_eq!(s.domain, "corp.internal");
        assert_eq!(s.extra_records[0].name, "grafana.corp.internal");
        let s = load_text(
            "[dns]\ndomain = \"corp.internal\"\n",
            Some("other.internal"),
        )
        .unwrap();
        assert_eq!(s.domain, "other.internal");
        assert_eq!(load(None, None).unwrap().domain, DEFAULT_DOMAIN);
    }

    #[test]
    fn a_bad_file_names_the_line_and_the_key() {
        let e = load_text(
            "[dns]\nnameservers = [\"9.9.9.9\"]\n\n[[dns.extra_records]]\nname = \"a\"\ntype = \"A\"\nvalue = \"fd00::1\"\n",
            None,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains(":7: key `dns.extra_records[0].value`"), "{e}");
        let e = load_text("[dns]\nnameservers = [\"nine\"]\n", None)
            .unwrap_err()
            .to_string();
        assert!(e.contains(":2: key `dns.nameservers"), "{e}");
        let e = load_text("[dns]\nbogus = 1\n", None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("bogus"), "{e}");
        assert!(matches!(
            load(None, Some("bad domain")),
            Err(DnsConfigError::Domain(_))
        ));
    }
}
