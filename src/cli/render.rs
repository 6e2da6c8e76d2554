//! How the client commands look to a person: the status table and the small
//! formats it uses (ages, byte counts, addresses).
//!
//! Kept apart from the commands so the text a person reads is tested as
//! plain strings, with no daemon. The table is plain ASCII columns with
//! upper-case headers (like `kubectl` or `ss`): it survives copy and paste,
//! `grep`, terminals without UTF-8, and `tmux capture-pane`.

use std::fmt::Write;

use comfy_table::{presets, ContentArrangement, Table};
use ipnet::IpNet;

use crate::api::{PeerPath, PeerStatus, PingReply, Status, ALIVE_WITHIN_SECS};
use crate::text::for_terminal;

/// The `status` table's column headers, in order (the tests read them).
pub const STATUS_HEADERS: [&str; 9] = [
    "PEER",
    "IPS",
    "OS",
    "PATH",
    "NAT",
    "LATENCY",
    "HANDSHAKE",
    "RX",
    "TX",
];

/// Renders `warren status`.
pub fn status(st: &Status) -> String {
    let mut out = String::new();
    let addrs: Vec<String> = st.addresses.iter().map(|a| a.to_string()).collect();
    let _ = writeln!(
        out,
        "{}  {}  key {}  listening on {}  (warren {}, up {}{})",
        st.interface,
        if addrs.is_empty() {
            "no addresses".to_owned()
        } else {
            addrs.join(", ")
        },
        st.public_key.short(),
        st.listen,
        st.version,
        duration(st.uptime_secs),
        if st.offload { ", offload" } else { "" },
    );
    if let Some(m) = &st.mesh {
        out.push_str(&super::render_mesh::node(m));
    }
    out.push('\n');
    if st.peers.is_empty() {
        out.push_str("no peers\n");
    } else {
        out.push_str(&peer_table(&st.peers));
        out.push('\n');
        let notes = super::render_mesh::peer_notes(&st.peers);
        if !notes.is_empty() {
            out.push('\n');
            out.push_str(&notes);
        }
    }
    let d = st.drops;
    let drops: Vec<String> = [
        (d.auth, "failed authentication"),
        (d.unknown_peer, "from unknown peers"),
        (d.no_route, "with no route"),
        (d.no_endpoint, "to peers with no endpoint"),
        (d.malformed, "malformed"),
        (d.policy, "by policy"),
        (d.not_ours, "to addresses not ours"),
    ]
    .iter()
    .filter(|(n, _)| *n > 0)
    .map(|(n, why)| format!("{n} {why}"))
    .collect();
    if !drops.is_empty() {
        let _ = writeln!(out, "\ndropped packets: {}", drops.join(", "));
    }
    out
}

fn peer_table(peers: &[PeerStatus]) -> String {
    let mut t = Table::new();
    t.load_style(presets::NOTHING)
        .set_content_arrangement(ContentArrangement::Dynamic)
        .set_header(STATUS_HEADERS);
    for p in peers {
        t.add_row(vec![
            peer_name(p),
            ips(&p.allowed_ips),
            os(p),
            path(&p.path),
            // A peer from the config file has no netcheck to show.
            p.mesh
                .as_ref()
                .map_or_else(|| "-".into(), |m| m.nat.short()),
            p.latency_ms.map(latency).unwrap_or_default(),
            p.last_handshake_secs
                .map(ago)
                .unwrap_or_else(|| "never".into()),
            bytes(p.rx_bytes),
            bytes(p.tx_bytes),
        ]);
    }
    // comfy-table pads every cell by one space on each side; trim the
    // margin so the table starts at column 0.
    t.lines()
        .map(|l| l.strip_prefix(' ').unwrap_or(&l).trim_end().to_owned())
        .collect::<Vec<_>>()
        .join("\n")
}

/// The name `status` shows for a peer: its host name, else its short key.
pub fn peer_name(p: &PeerStatus) -> String {
    match &p.hostname {
        Some(h) => for_terminal(h).into_owned(),
        None => p.public_key.short(),
    }
}

/// The peer's system and warren version ("linux 0.1.0"); "-" for a peer
/// from the config file or an older coordinator.
pub fn os(p: &PeerStatus) -> String {
    let text = p
        .mesh
        .as_ref()
        .map(|m| {
            let text = format!("{} {}", m.os, m.version);
            for_terminal(text.trim()).into_owned()
        })
        .unwrap_or_default();
    if text.is_empty() {
        "-".into()
    } else {
        text
    }
}

/// Allowed IPs, single addresses without their `/32` or `/128`.
pub fn ips(nets: &[IpNet]) -> String {
    if nets.is_empty() {
        return "-".into();
    }
    nets.iter()
        .map(|n| {
            if n.prefix_len() == n.max_prefix_len() {
                n.addr().to_string()
            } else {
                n.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join(", ")
}

pub fn path(p: &PeerPath) -> String {
    match p {
        PeerPath::Direct { endpoint } => format!("direct {endpoint}"),
        PeerPath::Relay { region: Some(r) } => format!("relay {r}"),
        PeerPath::Relay { region: None } => "relay".into(),
        PeerPath::DirectTcp { endpoint } => format!("direct tcp {endpoint}"),
        PeerPath::None => "no endpoint".into(),
    }
}

fn latency(ms: f64) -> String {
    if ms < 10.0 {
        format!("{ms:.1} ms")
    } else {
        format!("{ms:.0} ms")
    }
}

/// "12s ago", "5m 3s ago", "2h 5m ago", "3d 4h ago".
pub fn ago(secs: u64) -> String {
    format!("{} ago", duration(secs))
}

/// A duration in its two largest units: "12s", "5m 3s", "2h 5m", "3d 4h".
pub fn duration(secs: u64) -> String {
    let (d, h, m, s) = (secs / 86400, secs / 3600 % 24, secs / 60 % 60, secs % 60);
    match (d, h, m) {
        (0, 0, 0) => format!("{s}s"),
        (0, 0, _) => format!("{m}m {s}s"),
        (0, _, _) => format!("{h}h {m}m"),
        _ => format!("{d}d {h}h"),
    }
}

/// Bytes in binary units: "512 B", "1.5 KiB", "20.0 MiB".
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut v = n as f64 / 1024.0;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    format!("{v:.1} {}", UNITS[unit])
}

/// Renders `warren ping` for a person.
pub fn ping(r: &PingReply, query: &str) -> String {
    let name = r
        .hostname
        .as_deref()
        .map(|h| for_terminal(h).into_owned())
        .unwrap_or_else(|| r.public_key.short());
    let via = path(&r.path);
    match (r.alive, r.last_handshake_secs) {
        (true, Some(s)) => format!(
            "{query} ({name}) is up: WireGuard handshake {}, {via}, rx {} tx {}",
            ago(s),
            bytes(r.rx_bytes),
            bytes(r.tx_bytes)
        ),
        (_, Some(s)) => format!(
            "{query} ({name}) is not responding: last handshake {} (none in the last {}), {via}",
            ago(s),
            duration(ALIVE_WITHIN_SECS)
        ),
        (_, None) => format!("{query} ({name}) is not responding: no handshake yet, {via}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::Drops;
    use crate::keys::NodeKey;

    #[test]
    fn units() {
        assert_eq!(bytes(0), "0 B");
        assert_eq!(bytes(1023), "1023 B");
        assert_eq!(bytes(1536), "1.5 KiB");
        assert_eq!(bytes(20 * 1024 * 1024), "20.0 MiB");
        assert_eq!(bytes(u64::MAX), "16384.0 PiB");
        assert_eq!(ago(12), "12s ago");
        assert_eq!(ago(303), "5m 3s ago");
        assert_eq!(ago(2 * 3600 + 5 * 60 + 9), "2h 5m ago");
        assert_eq!(ago(3 * 86400 + 4 * 3600), "3d 4h ago");
        assert_eq!(latency(3.25), "3.2 ms");
        assert_eq!(latency(42.4), "42 ms");
    }

    fn status_with(peers: Vec<PeerStatus>, drops: Drops) -> Status {
        Status {
            version: "0.1.0".into(),
            interface: "warren0".into(),
            public_key: NodeKey([9; 32]),
            listen: "[::]:51820".parse().unwrap(),
            offload: false,
            addresses: vec!["100.64.0.1/10".parse().unwrap()],
            uptime_secs: 75,
            peers,
            drops,
            mesh: None,
        }
    }

    #[test]
    fn table_has_headers_and_one_row_per_peer() {
        let peers = vec![
            PeerStatus {
                public_key: NodeKey([1; 32]),
                hostname: None,
                allowed_ips: vec![
                    "100.64.0.2/32".parse().unwrap(),
                    "10.1.0.0/16".parse().unwrap(),
                ],
                path: PeerPath::Direct {
                    endpoint: "192.0.2.7:51820".parse().unwrap(),
                },
                latency_ms: None,
                last_handshake_secs: Some(12),
                rx_bytes: 2048,
                tx_bytes: 100,
                mesh: None,
            },
            PeerStatus {
                public_key: NodeKey([2; 32]),
                hostname: Some("nas".into()),
                allowed_ips: vec![],
                path: PeerPath::Relay {
                    region: Some("fra".into()),
                },
                latency_ms: Some(23.0),
                last_handshake_secs: None,
                rx_bytes: 0,
                tx_bytes: 0,
                mesh: Some(crate::api::mesh::PeerMesh {
                    hostname: "nas".into(),
                    nat: crate::traversal::NatSummary {
                        mapping: crate::traversal::Mapping::EndpointDependent,
                        allocation: crate::traversal::Allocation::Sequential { step: 2 },
                        observed: None,
                    },
                    online: true,
                    os: "linux".into(),
                    version: "0.3.1".into(),
                    tags: vec!["tag:db".into()],
                    ..Default::default()
                }),
            },
        ];
        let text = status(&status_with(peers, Drops::default()));
        let lines: Vec<&str> = text.lines().collect();
        assert!(
            lines[0].starts_with("warren0  100.64.0.1/10  key "),
            "{text}"
        );
        assert!(lines[0].contains("up 1m 15s"), "{text}");
        let header = lines[2].split_whitespace().collect::<Vec<_>>();
        assert_eq!(header, STATUS_HEADERS, "{text}");
        let row = lines[3];
        for cell in [
            NodeKey([1; 32]).short().as_str(),
            "100.64.0.2, 10.1.0.0/16",
            " - ",
            "direct 192.0.2.7:51820",
            "12s ago",
            "2.0 KiB",
            "100 B",
        ] {
            assert!(row.contains(cell), "{cell:?} missing in {row:?}");
        }
        assert!(lines[4].starts_with("nas "), "{text}");
        assert!(lines[4].contains("relay fra") && lines[4].contains("23 ms"));
        assert!(lines[4].contains("never"));
        // The NAT column: from the map for a mesh peer, "-" for a peer
        // from the config file.
        let nat_at = lines[2].find("NAT").unwrap();
        assert!(lines[4][nat_at..].starts_with("EDM seq+2"), "{text}");
        assert!(lines[3][nat_at..].starts_with("- "), "{text}");
        assert!(lines[4].contains("linux 0.3.1"), "{text}");
        assert!(text.contains("\nnas: tags tag:db\n"), "{text}");
        assert!(!text.contains("dropped"), "{text}");
    }

    #[test]
    fn text_from_peers_reaches_the_terminal_escaped() {
        let evil = PeerStatus {
            public_key: NodeKey([3; 32]),
            hostname: Some("ev\u{1b}]0;owned\u{7}il".into()),
            allowed_ips: vec![],
            path: PeerPath::Relay { region: None },
            latency_ms: None,
            last_handshake_secs: None,
            rx_bytes: 0,
            tx_bytes: 0,
            mesh: Some(crate::api::mesh::PeerMesh {
                os: "linux\u{1b}[2J".into(),
                version: "1\u{202e}0".into(),
                ..Default::default()
            }),
        };
        let text = status(&status_with(vec![evil], Drops::default()));
        assert!(
            !text.contains('\u{1b}') && !text.contains('\u{202e}'),
            "{text:?}"
        );
        assert!(text.contains("ev\\u{1b}]0;owned\\u{7}il"), "{text}");
        assert!(text.contains("linux\\u{1b}[2J"), "{text}");
    }

    #[test]
    fn no_peers_and_drops_are_said() {
        let drops = Drops {
            auth: 3,
            no_route: 1,
            policy: 4,
            ..Drops::default()
        };
        let text = status(&status_with(vec![], drops));
        assert!(text.contains("\nno peers\n"), "{text}");
        assert!(
            text.contains("dropped packets: 3 failed authentication, 1 with no route, 4 by policy"),
            "{text}"
        );
    }
}
