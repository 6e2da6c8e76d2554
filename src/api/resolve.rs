//! Naming a peer the way a person does: by host name, overlay IP or a
//! prefix of its key.
//!
//! The rules, tried in order, are chosen so that one string never means two
//! things silently:
//! 1. an IP address names the peer whose allowed IPs contain it (longest
//!    prefix wins, as routing does);
//! 2. a host name names the peer with that name (case-insensitive);
//! 3. a full key, or a prefix of at least [`MIN_KEY_PREFIX`] characters of
//!    its base64 form (what `status` shows), names that peer.
//!
//! A name or prefix that fits several peers is an `ambiguous_peer` error
//! listing them, never a guess. It runs in the daemon, on the same list that
//! `status` reports, so the CLI and the daemon cannot disagree on a name.

use std::net::IpAddr;

use super::{ApiError, ErrorCode, PeerStatus};

/// Shortest key prefix accepted: shorter ones match by accident.
pub const MIN_KEY_PREFIX: usize = 4;

/// Finds the peer `query` names among `peers`.
pub fn resolve<'a>(peers: &'a [PeerStatus], query: &str) -> Result<&'a PeerStatus, ApiError> {
    let query = query.trim();
    if query.is_empty() {
        return Err(ApiError::new(
            ErrorCode::UnknownPeer,
            "no peer named: empty",
        ));
    }
    if let Ok(ip) = query.parse::<IpAddr>() {
        return by_ip(peers, ip).ok_or_else(|| {
            ApiError::new(
                ErrorCode::UnknownPeer,
                format!("unknown peer `{query}`: no peer has this overlay address"),
            )
        });
    }
    let named: Vec<&PeerStatus> = peers
        .iter()
        .filter(|p| {
            p.hostname
                .as_deref()
                .is_some_and(|h| h.eq_ignore_ascii_case(query))
        })
        .collect();
    if !named.is_empty() {
        return one(named, query, "host name");
    }
    // A key shown truncated ("abcd1234…") still names its peer.
    let prefix = query.trim_end_matches('…');
    if prefix.len() >= MIN_KEY_PREFIX {
        let keyed: Vec<&PeerStatus> = peers
            .iter()
            .filter(|p| p.public_key.to_string().starts_with(prefix))
            .collect();
        if !keyed.is_empty() {
            return one(keyed, query, "key prefix");
        }
    }
    Err(ApiError::new(
        ErrorCode::UnknownPeer,
        format!(
            "unknown peer `{query}`: no peer has this host name, overlay IP or key prefix \
             (key prefixes need {MIN_KEY_PREFIX} characters or more; see `warren status`)"
        ),
    ))
}

fn by_ip(peers: &[PeerStatus], ip: IpAddr) -> Option<&PeerStatus> {
    peers
        .iter()
        .filter_map(|p| {
            p.allowed_ips
                .iter()
                .filter(|n| n.contains(&ip))
                .map(|n| n.prefix_len())
                .max()
                .map(|len| (len, p))
        })
        .max_by_key(|(len, _)| *len)
        .map(|(_, p)| p)
}

fn one<'a>(
    found: Vec<&'a PeerStatus>,
    query: &str,
    what: &str,
) -> Result<&'a PeerStatus, ApiError> {
    if let [only] = found.as_slice() {
        return Ok(only);
    }
    let names: Vec<String> = found.iter().map(|p| p.public_key.short()).collect();
    Err(ApiError::new(
        ErrorCode::AmbiguousPeer,
        format!(
            "`{query}` is ambiguous: {} peers have this {what} ({}); give more of the key",
            found.len(),
            names.join(", ")
        ),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::PeerPath;
    use crate::keys::NodeKey;

    /// Key number `id` (its last byte). Keys 4 and 5 differ only in their
    /// last byte, so they share a long base64 prefix.
    fn key(id: u8) -> NodeKey {
        let mut k = if id >= 4 { [7; 32] } else { [id; 32] };
        k[31] = id;
        NodeKey(k)
    }

    fn id(p: &PeerStatus) -> u8 {
        p.public_key.0[31]
    }

    fn peer(key_id: u8, ips: &[&str], host: Option<&str>) -> PeerStatus {
        PeerStatus {
            public_key: key(key_id),
            hostname: host.map(str::to_owned),
            allowed_ips: ips.iter().map(|s| s.parse().unwrap()).collect(),
            path: PeerPath::None,
            latency_ms: None,
            last_handshake_secs: None,
            rx_bytes: 0,
            tx_bytes: 0,
            mesh: None,
        }
    }

    fn peers() -> Vec<PeerStatus> {
        vec![
            peer(1, &["100.64.0.2/32", "10.9.0.0/16"], Some("laptop")),
            peer(2, &["100.64.0.3/32", "10.0.0.0/8"], Some("Server")),
            peer(4, &["100.64.0.4/32"], None),
            peer(5, &["100.64.0.5/32"], None),
        ]
    }

    #[test]
    fn by_overlay_ip_longest_prefix_wins() {
        let ps = peers();
        assert_eq!(id(resolve(&ps, "100.64.0.3").unwrap()), 2);
        // 10.9.1.1 is in both 10.0.0.0/8 and 10.9.0.0/16: the /16 wins.
        assert_eq!(id(resolve(&ps, "10.9.1.1").unwrap()), 1);
        assert_eq!(id(resolve(&ps, "10.1.1.1").unwrap()), 2);
        let e = resolve(&ps, "192.0.2.1").unwrap_err();
        assert_eq!(e.code, ErrorCode::UnknownPeer);
        assert!(e.message.contains("overlay address"), "{}", e.message);
    }

    #[test]
    fn by_hostname_ignores_case() {
        let ps = peers();
        assert_eq!(id(resolve(&ps, "server").unwrap()), 2);
        assert_eq!(id(resolve(&ps, "LAPTOP").unwrap()), 1);
    }

    #[test]
    fn by_key_prefix_full_key_and_short_form() {
        let ps = peers();
        let full = key(1).to_string();
        assert_eq!(id(resolve(&ps, &full).unwrap()), 1);
        assert_eq!(id(resolve(&ps, &full[..6]).unwrap()), 1);
        let shown = format!("{}…", key(2).short());
        assert_eq!(id(resolve(&ps, &shown).unwrap()), 2);
    }

    #[test]
    fn ambiguous_prefix_lists_candidates() {
        let ps = peers();
        let k4 = key(4).to_string();
        let k5 = key(5).to_string();
        let common = k4
            .chars()
            .zip(k5.chars())
            .take_while(|(a, b)| a == b)
            .count();
        assert!(common >= MIN_KEY_PREFIX, "test keys must share a prefix");
        let e = resolve(&ps, &k4[..common]).unwrap_err();
        assert_eq!(e.code, ErrorCode::AmbiguousPeer);
        assert!(e.message.contains(&key(5).short()), "{}", e.message);
        assert_eq!(id(resolve(&ps, &k4[..common + 1]).unwrap()), 4);
    }

    #[test]
    fn short_or_unknown_names_are_refused() {
        let ps = peers();
        let full = key(1).to_string();
        assert_eq!(
            resolve(&ps, &full[..3]).unwrap_err().code,
            ErrorCode::UnknownPeer
        );
        assert_eq!(
            resolve(&ps, "desktop").unwrap_err().code,
            ErrorCode::UnknownPeer
        );
        assert_eq!(resolve(&ps, "  ").unwrap_err().code, ErrorCode::UnknownPeer);
    }
}
