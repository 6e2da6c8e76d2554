//! `warren ping PEER`, in the manner of `tailscale ping`: one disco ping
//! round per request to the daemon, one line per pong with its path and
//! latency, and a note when the path turns direct.
//!
//! The loop lives here rather than in the daemon so the daemon answers each
//! request in bounded time and keeps nothing between rounds; a round that
//! gets no pong before `--timeout` says so and the loop goes on. A peer from
//! the config file has no disco key: for it, `ping` prints the WireGuard
//! liveness once, as it always did.

use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use serde::Serialize;

use super::{print_json, render, CliError};
use crate::api::client::call;
use crate::api::mesh::Pong;
use crate::api::{PeerPath, PingReply, Request};

/// Least time between the starts of two rounds.
const INTERVAL: Duration = Duration::from_secs(1);

/// `warren ping`'s options.
#[derive(Debug, Clone)]
pub struct Options {
    pub count: u32,
    pub until_direct: bool,
    pub timeout: Duration,
    pub json: bool,
}

/// One round as `--json` prints it.
#[derive(Debug, Serialize)]
struct Round<'a> {
    seq: u32,
    #[serde(flatten)]
    reply: &'a PingReply,
}

/// Runs the ping loop against the daemon on `socket`.
pub fn run(
    out: &mut impl Write,
    socket: &Path,
    peer: &str,
    opts: &Options,
) -> Result<(), CliError> {
    let timeout_ms = u64::try_from(opts.timeout.as_millis()).unwrap_or(u64::MAX);
    let request = Request::Ping {
        peer: peer.to_owned(),
        timeout_ms: Some(timeout_ms),
    };
    let mut replies: Vec<PingReply> = Vec::new();
    let mut direct_after: Option<u32> = None;
    for seq in 1..=opts.count.max(1) {
        let started = Instant::now();
        let reply: PingReply = call(socket, &request)?;
        let Some(round) = &reply.round else {
            return liveness(out, &reply, peer, opts.json);
        };
        if !opts.json {
            if round.pongs.is_empty() {
                writeln!(
                    out,
                    "timeout waiting for pong from {} after {}",
                    who(&reply),
                    ms(opts.timeout.as_secs_f64() * 1e3)
                )?;
            }
            for p in &round.pongs {
                writeln!(out, "{}", pong_line(&reply, p))?;
            }
        }
        let direct = round.direct;
        replies.push(reply);
        if direct && direct_after.is_none() {
            direct_after = Some(seq);
            if opts.until_direct {
                break;
            }
        }
        if seq < opts.count {
            std::thread::sleep(INTERVAL.saturating_sub(started.elapsed()));
        }
    }
    let sent = u32::try_from(replies.len()).unwrap_or(u32::MAX);
    if opts.json {
        let rounds: Vec<Round> = (1..)
            .zip(&replies)
            .map(|(seq, reply)| Round { seq, reply })
            .collect();
        print_json(out, &rounds)?;
    } else {
        if let Some(note) = replies.first().and_then(policy_note) {
            writeln!(out, "{note}")?;
        }
        if let Some(n) = direct_after {
            writeln!(out, "direct path found after {n} {}", plural(n))?;
        }
    }
    let name = replies.first().map(who).unwrap_or_else(|| peer.to_owned());
    if replies
        .iter()
        .all(|r| r.round.as_ref().is_none_or(|r| r.pongs.is_empty()))
    {
        return Err(CliError::PeerDown(format!(
            "no pong from {name} after {sent} {}",
            plural(sent)
        )));
    }
    if opts.until_direct && direct_after.is_none() {
        return Err(CliError::PeerDown(format!(
            "direct path to {name} not found after {sent} {}; traffic goes through the relay",
            plural(sent)
        )));
    }
    Ok(())
}

/// What the access policy lets this node do to the peer: a pong only says
/// the peer is there, since disco is answered whatever the policy says.
fn policy_note(reply: &PingReply) -> Option<String> {
    let allows = reply.allows_you.as_ref()?;
    let name = who(reply);
    Some(if allows.is_empty() {
        format!(
            "the access policy lets you reach nothing on {name}: it is in your map because \
             it may reach you"
        )
    } else {
        let list: Vec<String> = allows.iter().map(ToString::to_string).collect();
        format!(
            "the access policy lets you reach {name} on {}",
            list.join(", ")
        )
    })
}

/// The old answer, for a peer without disco: is the tunnel alive.
fn liveness(
    out: &mut impl Write,
    reply: &PingReply,
    query: &str,
    json: bool,
) -> Result<(), CliError> {
    let text = render::ping(reply, query);
    if json {
        print_json(out, reply)?;
    } else if reply.alive {
        writeln!(out, "{text}")?;
    }
    if !reply.alive {
        return Err(CliError::PeerDown(text));
    }
    Ok(())
}

/// "bob (100.64.0.2)", or the key's start for a peer without a name.
fn who(r: &PingReply) -> String {
    let name = r
        .hostname
        .as_deref()
        .map(|h| crate::text::for_terminal(h).into_owned())
        .unwrap_or_else(|| r.public_key.short());
    match r.address {
        Some(a) => format!("{name} ({a})"),
        None => name,
    }
}

/// "pong from bob (100.64.0.2) via 203.0.113.7:41641 in 1.2ms".
pub fn pong_line(r: &PingReply, p: &Pong) -> String {
    let via = match &p.path {
        PeerPath::Direct { endpoint } => endpoint.to_string(),
        other => render::path(other),
    };
    format!("pong from {} via {via} in {}", who(r), ms(p.latency_ms))
}

fn ms(v: f64) -> String {
    if v < 10.0 {
        format!("{v:.1}ms")
    } else {
        format!("{v:.0}ms")
    }
}

fn plural(n: u32) -> &'static str {
    if n == 1 {
        "ping"
    } else {
        "pings"
    }
}

/// Parses `--timeout`: "5s", "500ms", "1.5" (seconds).
pub fn parse_timeout(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, scale) = if let Some(n) = s.strip_suffix("ms") {
        (n, 1e-3)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1.0)
    } else {
        (s, 1.0)
    };
    let v: f64 = num
        .trim()
        .parse()
        .map_err(|_| format!("`{s}` is not a duration (like 5s or 500ms)"))?;
    let secs = v * scale;
    if !(0.01..=20.0).contains(&secs) {
        return Err(format!("`{s}` is out of range (10ms to 20s)"));
    }
    Ok(Duration::from_secs_f64(secs))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::mesh::PingRound;
    use crate::keys::NodeKey;

    fn reply(pongs: Vec<Pong>) -> PingReply {
        PingReply {
            public_key: NodeKey([7; 32]),
            hostname: Some("bob".into()),
            address: Some("100.64.0.2".parse().unwrap()),
            alive: true,
            path: PeerPath::Relay { region: None },
            latency_ms: None,
            last_handshake_secs: Some(1),
            rx_bytes: 0,
            tx_bytes: 0,
            round: Some(PingRound {
                direct: pongs
                    .iter()
                    .any(|p| matches!(p.path, PeerPath::Direct { .. })),
                pongs,
            }),
            allows_you: None,
        }
    }

    #[test]
    fn the_policy_note_says_what_the_peer_allows() {
        let mut r = reply(vec![]);
        assert_eq!(policy_note(&r), None, "no policy: no note");
        r.allows_you = Some(vec![]);
        assert!(policy_note(&r).unwrap().contains("reach nothing on bob"));
        r.allows_you = Some(vec![crate::policy::Allowance {
            proto: 6,
            ports: crate::policy::PortRange {
                first: 22,
                last: 22,
            },
        }]);
        assert_eq!(
            policy_note(&r).unwrap(),
            "the access policy lets you reach bob (100.64.0.2) on tcp/22"
        );
    }

    #[test]
    fn pong_lines_name_the_path() {
        let direct = Pong {
            path: PeerPath::Direct {
                endpoint: "203.0.113.7:41641".parse().unwrap(),
            },
            latency_ms: 1.23,
        };
        let relay = Pong {
            path: PeerPath::Relay {
                region: Some("default".into()),
            },
            latency_ms: 34.4,
        };
        let r = reply(vec![relay.clone(), direct.clone()]);
        assert_eq!(
            pong_line(&r, &direct),
            "pong from bob (100.64.0.2) via 203.0.113.7:41641 in 1.2ms"
        );
        assert_eq!(
            pong_line(&r, &relay),
            "pong from bob (100.64.0.2) via relay default in 34ms"
        );
    }

    #[test]
    fn json_rounds_carry_seq_and_pongs() {
        let r = reply(vec![Pong {
            path: PeerPath::Relay {
                region: Some("default".into()),
            },
            latency_ms: 3.4,
        }]);
        let v = serde_json::to_value(Round { seq: 2, reply: &r }).unwrap();
        assert_eq!(v["seq"], 2);
        assert_eq!(v["round"]["direct"], false);
        assert_eq!(v["round"]["pongs"][0]["path"]["kind"], "relay");
        assert_eq!(v["round"]["pongs"][0]["latency_ms"], 3.4);
        assert_eq!(v["hostname"], "bob");
    }

    #[test]
    fn timeouts_parse_with_units() {
        assert_eq!(parse_timeout("5s"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_timeout("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_timeout("1.5"), Ok(Duration::from_millis(1500)));
        assert!(parse_timeout("0s").is_err());
        assert!(parse_timeout("1h").is_err());
        assert!(parse_timeout("fast").is_err());
    }
}
