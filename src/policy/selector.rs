//! The words of a policy: who a rule is about (selectors), which ports and
//! which IP protocols, each with Tailscale's spelling and meaning
//! (<https://tailscale.com/kb/1337/policy-syntax>), so that a policy moved
//! from Tailscale or Headscale reads the same here.
//!
//! Only the shape of a word is checked here; whether the user, group, tag
//! or host it names exists is `check.rs`'s business, because that depends
//! on the rest of the file and on the network's users.

use std::fmt;
use std::net::IpAddr;

use ipnet::IpNet;

/// Who a `src` or `dst` entry means.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Selector {
    /// `*`: every node of the network and every approved subnet route.
    All,
    /// A user, by the email address they were created with.
    User(String),
    /// `group:NAME` from the `groups` section.
    Group(String),
    /// `tag:NAME`: the nodes owned by that tag.
    Tag(String),
    /// A name from the `hosts` section.
    Host(String),
    /// An IP address (as a /32 or /128) or a CIDR.
    Prefix(IpNet),
    /// `autogroup:member`: every node owned by a user (not tagged).
    Member,
    /// `autogroup:tagged`: every tagged node.
    Tagged,
    /// `autogroup:self`: in `dst` only, the source user's own untagged
    /// nodes.
    SelfDevices,
    /// `autogroup:internet`: in `dst` only, the internet through exit
    /// nodes.
    Internet,
    /// `autogroup:danger-all`: in `src` only, any address at all.
    DangerAll,
}

/// Why a word is not a selector, port list or protocol.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum WordError {
    #[error("{0:?} is an empty name")]
    Empty(String),
    #[error("{0:?} is not an autogroup warren knows (member, tagged, self, internet, danger-all)")]
    UnknownAutogroup(String),
    #[error("{0:?} is not a user email, group:, tag:, autogroup:, host name, IP or CIDR")]
    BadSelector(String),
    #[error("{0}")]
    BadTag(#[source] crate::control::TagError),
    #[error("{0:?} has no port list after the last ':' (write {0}:* for every port)")]
    NoPorts(String),
    #[error("{0:?} is not a port, a range a-b, a list of those or *")]
    BadPorts(String),
    #[error("the port range {0:?} ends before it starts")]
    BackwardRange(String),
    #[error("{0:?} is not an IP protocol name or number (tcp, udp, icmp, ipv6-icmp, sctp, 0-255)")]
    BadProto(String),
}

impl Selector {
    pub fn parse(word: &str) -> Result<Selector, WordError> {
        if word == "*" {
            return Ok(Selector::All);
        }
        if let Some(name) = word.strip_prefix("autogroup:") {
            return match name {
                "member" => Ok(Selector::Member),
                "tagged" => Ok(Selector::Tagged),
                "self" => Ok(Selector::SelfDevices),
                "internet" => Ok(Selector::Internet),
                "danger-all" => Ok(Selector::DangerAll),
                _ => Err(WordError::UnknownAutogroup(word.to_owned())),
            };
        }
        if let Some(name) = word.strip_prefix("group:") {
            return nonempty(name, word).map(|n| Selector::Group(n.to_owned()));
        }
        if word.starts_with("tag:") {
            crate::control::validate_tag(word).map_err(WordError::BadTag)?;
            return Ok(Selector::Tag(word.to_owned()));
        }
        if let Some(p) = parse_prefix(word) {
            return Ok(Selector::Prefix(p));
        }
        if word.contains('@') {
            let (local, domain) = word.split_once('@').unwrap_or_default();
            if local.is_empty() || domain.contains('@') || word.chars().any(char::is_whitespace) {
                return Err(WordError::BadSelector(word.to_owned()));
            }
            return Ok(Selector::User(word.to_owned()));
        }
        let host_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.');
        if !word.is_empty() && word.chars().all(host_char) {
            return Ok(Selector::Host(word.to_owned()));
        }
        Err(WordError::BadSelector(word.to_owned()))
    }
}

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Selector::All => f.write_str("*"),
            Selector::User(s) | Selector::Tag(s) | Selector::Host(s) => f.write_str(s),
            Selector::Group(g) => write!(f, "group:{g}"),
            Selector::Prefix(p) => write!(f, "{p}"),
            Selector::Member => f.write_str("autogroup:member"),
            Selector::Tagged => f.write_str("autogroup:tagged"),
            Selector::SelfDevices => f.write_str("autogroup:self"),
            Selector::Internet => f.write_str("autogroup:internet"),
            Selector::DangerAll => f.write_str("autogroup:danger-all"),
        }
    }
}

fn nonempty<'a>(name: &'a str, word: &str) -> Result<&'a str, WordError> {
    if name.is_empty() {
        Err(WordError::Empty(word.to_owned()))
    } else {
        Ok(name)
    }
}

/// An address (as a host prefix) or a CIDR; `[v6]` is accepted too.
pub fn parse_prefix(word: &str) -> Option<IpNet> {
    let word = word
        .strip_prefix('[')
        .and_then(|w| w.strip_suffix(']'))
        .unwrap_or(word);
    if let Ok(ip) = word.parse::<IpAddr>() {
        return Some(IpNet::from(ip));
    }
    // A CIDR with host bits set is refused: "10.0.0.1/8" is a typo more
    // often than a way of writing 10.0.0.0/8.
    let net = word.parse::<IpNet>().ok()?;
    (net.trunc() == net).then_some(net)
}

/// An inclusive port range; `*` is `0-65535`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PortRange {
    pub first: u16,
    pub last: u16,
}

impl PortRange {
    pub const ALL: PortRange = PortRange {
        first: 0,
        last: u16::MAX,
    };

    pub fn contains(&self, port: u16) -> bool {
        self.first <= port && port <= self.last
    }
}

/// `*`, `22`, `80,443`, `8000-8999`, or a mix.
pub fn parse_ports(word: &str) -> Result<Vec<PortRange>, WordError> {
    if word == "*" {
        return Ok(vec![PortRange::ALL]);
    }
    let bad = || WordError::BadPorts(word.to_owned());
    let port = |s: &str| -> Result<u16, WordError> {
        if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad());
        }
        s.parse().map_err(|_| bad())
    };
    let mut out = Vec::new();
    for part in word.split(',') {
        let range = match part.split_once('-') {
            Some((a, b)) => {
                let (first, last) = (port(a)?, port(b)?);
                if last < first {
                    return Err(WordError::BackwardRange(part.to_owned()));
                }
                PortRange { first, last }
            }
            None => {
                let p = port(part)?;
                PortRange { first: p, last: p }
            }
        };
        out.push(range);
    }
    Ok(out)
}

/// Splits a `dst` entry, `target:ports`, at its last colon (as Tailscale
/// does, which is why an IPv6 address may be written bare or in brackets).
pub fn split_target(word: &str) -> Result<(&str, &str), WordError> {
    match word.rsplit_once(':') {
        Some((target, ports)) if !target.is_empty() && !ports.is_empty() => Ok((target, ports)),
        _ => Err(WordError::NoPorts(word.to_owned())),
    }
}

pub const TCP: u8 = 6;
pub const UDP: u8 = 17;
pub const ICMP: u8 = 1;
pub const ICMPV6: u8 = 58;
pub const SCTP: u8 = 132;

/// What a rule without `proto` allows, as in Tailscale.
pub const DEFAULT_PROTOS: [u8; 4] = [TCP, UDP, ICMP, ICMPV6];

/// A protocol by IANA name (Tailscale's list) or number. `icmp` means
/// both ICMP and ICMPv6, as it does in Tailscale's filter.
pub fn parse_proto(word: &str) -> Result<Vec<u8>, WordError> {
    let one = |p: u8| Ok(vec![p]);
    match word.to_ascii_lowercase().as_str() {
        "tcp" => one(TCP),
        "udp" => one(UDP),
        "icmp" => Ok(vec![ICMP, ICMPV6]),
        "ipv6-icmp" | "icmpv6" => one(ICMPV6),
        "sctp" => one(SCTP),
        "igmp" => one(2),
        "ipv4" | "ip-in-ip" => one(4),
        "egp" => one(8),
        "igp" => one(9),
        "gre" => one(47),
        "esp" => one(50),
        "ah" => one(51),
        n if !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()) => n
            .parse::<u8>()
            .map(|p| vec![p])
            .map_err(|_| WordError::BadProto(word.to_owned())),
        _ => Err(WordError::BadProto(word.to_owned())),
    }
}

/// Whether ports mean anything for the protocol (TCP, UDP, SCTP); for the
/// others a rule's ports must be `*`.
pub fn has_ports(proto: u8) -> bool {
    matches!(proto, TCP | UDP | SCTP)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selectors_take_tailscale_spellings() {
        let s = |w| Selector::parse(w).unwrap();
        assert_eq!(s("*"), Selector::All);
        assert_eq!(
            s("alice@example.com"),
            Selector::User("alice@example.com".into())
        );
        assert_eq!(s("group:dev"), Selector::Group("dev".into()));
        assert_eq!(s("tag:server"), Selector::Tag("tag:server".into()));
        assert_eq!(s("autogroup:self"), Selector::SelfDevices);
        assert_eq!(s("db-1"), Selector::Host("db-1".into()));
        assert_eq!(
            s("10.0.0.0/8"),
            Selector::Prefix("10.0.0.0/8".parse().unwrap())
        );
        assert_eq!(
            s("100.80.1.2"),
            Selector::Prefix("100.80.1.2/32".parse().unwrap())
        );
        assert_eq!(
            s("[fd7a::1]"),
            Selector::Prefix("fd7a::1/128".parse().unwrap())
        );
        for bad in [
            "autogroup:admin",
            "group:",
            "tag:Bad",
            "10.0.0.1/8",
            "a b",
            "@x",
            "",
        ] {
            assert!(Selector::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn ports_and_targets() {
        assert_eq!(parse_ports("*").unwrap(), vec![PortRange::ALL]);
        assert_eq!(
            parse_ports("22,80-81").unwrap(),
            vec![
                PortRange {
                    first: 22,
                    last: 22
                },
                PortRange {
                    first: 80,
                    last: 81
                }
            ]
        );
        for bad in ["", "x", "70000", "5-", "9-1", "1,,2", "+1"] {
            assert!(parse_ports(bad).is_err(), "{bad}");
        }
        assert_eq!(split_target("tag:server:22").unwrap(), ("tag:server", "22"));
        assert_eq!(split_target("fd7a::1:22").unwrap(), ("fd7a::1", "22"));
        assert_eq!(split_target("[fd7a::1]:*").unwrap(), ("[fd7a::1]", "*"));
        assert!(split_target("tag:server:").is_err());
        assert!(split_target("alice@example.com").is_err());
    }

    #[test]
    fn protocols_by_name_or_number() {
        assert_eq!(parse_proto("TCP").unwrap(), vec![6]);
        assert_eq!(parse_proto("icmp").unwrap(), vec![1, 58]);
        assert_eq!(parse_proto("47").unwrap(), vec![47]);
        assert!(parse_proto("256").is_err());
        assert!(parse_proto("quic").is_err());
    }
}
