//! NAT traversal and path selection, sans-IO.
//!
//! Two layers, both driven the quinn-proto way (`handle_*(now, ..)` inputs,
//! `poll_transmit` / `poll_timeout` / `poll_event` outputs, no clock, no IO):
//!
//! - [`peer::PeerPaths`]: one peer's path state machine (see
//!   docs/architecture.md, "Paths"). It owns
//!   the peer's candidates, the direct paths it has seen, the pings in flight
//!   and the timers, and decides which path the data plane uses right now.
//! - [`node::Node`]: the "magicsock" core of one agent. It demultiplexes the
//!   shared UDP socket (disco / WireGuard / STUN), seals and opens disco boxes,
//!   filters replays, routes messages to the right peer machine, and turns the
//!   peers' outputs into datagrams, relay frames and TCP frames for the
//!   driver.
//!
//! [`hardnat`] holds the port prediction and birthday-method logic for NATs
//! with endpoint-dependent mapping. The agent state (`agent::state`) owns
//! the [`node::Node`] and turns its outputs into the agent's; the tokio
//! driver (`agent/mesh/`) only moves bytes and time. The node also closes
//! direct TCP streams no peer proves within 10 s and leaves this host's own
//! addresses out of TCP dials.

mod budget;
mod convert;
pub mod hardnat;
pub mod node;
pub mod peer;

mod select;
mod timers;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

pub use hardnat::{Allocation, Mapping, NatSummary};

pub use crate::path::{DirectPath, Path, SocketId};

/// Why a disco message was refused by the peer machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Rejected {
    #[error("ping names node key that is not this peer's")]
    NodeKeyMismatch,
    #[error("pong matches no ping in flight on that path")]
    UnexpectedPong,
    #[error("message not accepted over this path")]
    WrongPath,
}

/// Counters for `warren status` and tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PeerStats {
    pub pings_sent: u64,
    pub pongs_received: u64,
    pub call_me_maybe_sent: u64,
    pub birthday_probes: u64,
}

/// Tunables. The defaults (see docs/architecture.md, "Paths") follow
/// Tailscale's field experience.
#[derive(Debug, Clone)]
pub struct Config {
    /// Ping interval on the current direct path while traffic flows.
    pub heartbeat: Duration,
    /// How long a path stays trusted past its last pong while traffic flows.
    pub trust: Duration,
    /// Ping interval on an idle direct path, to hold NAT mappings open.
    pub keepalive: Duration,
    /// Traffic older than this makes the peer idle.
    pub active_timeout: Duration,
    /// How often a direct path that may not be the best is re-probed.
    pub reprobe: Duration,
    /// First retry of a discovery round; doubles for each round.
    pub probe_retry: Duration,
    /// Rounds before a discovery attempt is declared failed.
    pub probe_rounds: u32,
    /// Wait before the next attempt after a failed one; doubles up to
    /// `retry_max`.
    pub retry_initial: Duration,
    pub retry_max: Duration,
    /// Least gap between two CallMeMaybe to one peer.
    pub call_me_maybe_gap: Duration,
    /// A ping unanswered after this is forgotten.
    pub ping_timeout: Duration,
    /// Ports predicted ahead for a NAT with sequential allocation.
    pub predict_ports: u16,
    /// Extra sockets the hard side opens for the birthday method.
    pub birthday_sockets: u16,
    /// Most random ports the easy side probes in one birthday attempt.
    pub birthday_probes: u32,
    /// Probes per second of the easy side.
    pub birthday_rate: u32,
    /// Longest a birthday attempt may run.
    pub birthday_time: Duration,
    /// Most direct paths remembered per peer (candidates + learnt sources).
    pub max_paths: usize,
    /// How long one direct TCP attempt keeps dialling before it gives up.
    pub tcp_window: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            heartbeat: Duration::from_secs(3),
            trust: Duration::from_millis(6500),
            keepalive: Duration::from_secs(25),
            active_timeout: Duration::from_secs(45),
            reprobe: Duration::from_secs(60),
            probe_retry: Duration::from_millis(500),
            probe_rounds: 5,
            retry_initial: Duration::from_secs(30),
            retry_max: Duration::from_secs(300),
            call_me_maybe_gap: Duration::from_secs(5),
            ping_timeout: Duration::from_secs(5),
            predict_ports: 8,
            birthday_sockets: 256,
            birthday_probes: 4000,
            birthday_rate: 1000,
            birthday_time: Duration::from_secs(30),
            max_paths: 64,
            tcp_window: Duration::from_secs(10),
        }
    }
}

/// Why a timer was set; returned with the deadline by `poll_timeout`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum TimerReason {
    /// Next discovery round (pings to every candidate + CallMeMaybe).
    Probe,
    /// Heartbeat or keepalive ping on the current direct path.
    Heartbeat,
    /// The current direct path stops being trusted.
    TrustExpiry,
    /// Look again for a better path than the current direct one.
    Reprobe,
    /// Next batch of birthday probes, or the end of the attempt.
    Birthday,
    /// The end of a direct TCP attempt, or an idle stream's expiry.
    Tcp,
}

/// Why the path changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ChangeReason {
    /// A first pong proved a direct path.
    PongReceived,
    /// A clearly better direct path answered.
    BetterPath,
    /// The direct path went silent past its trust window.
    TimedOut,
    /// The local network changed; every direct path is suspect.
    NetworkChanged,
    /// The direct TCP stream closed.
    StreamClosed,
}

/// Outputs of a peer machine besides datagrams.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Event {
    PathChanged {
        from: Path,
        to: Path,
        reason: ChangeReason,
    },
    /// The birthday method needs this many extra local sockets.
    WantSockets(u16),
    /// The extra sockets are no longer needed, except `keep` if set.
    ReleaseSockets { keep: Option<SocketId> },
    /// A pong answered on-demand ping round `round` (`warren ping`).
    PingReply {
        round: u64,
        path: Path,
        rtt: Duration,
    },
    /// Dial the peer's TCP candidates from our listening port, again and
    /// again until a stream is up or `until` passes (simultaneous open).
    TcpConnect {
        targets: Vec<SocketAddr>,
        until: Instant,
    },
    /// Close the stream to `addr`: it is not (or no longer) a path.
    TcpClose { addr: SocketAddr },
}

/// A direct path that was pinged, and what came of it (`warren status`'s
/// "candidates tried").
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tried {
    pub path: DirectPath,
    pub kind: crate::proto::disco::CandidateKind,
    pub last_ping: Option<Instant>,
    pub last_pong: Option<Instant>,
    pub rtt: Option<Duration>,
}

/// Why a peer is on the relay, for `warren status`.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum RelayReason {
    /// Discovery is running and nothing has answered yet.
    Probing { since: Instant },
    /// The peer published no candidate we can reach over UDP.
    NoCandidates,
    /// A discovery attempt ended with no pong.
    NoAnswer { at: Instant, candidates: usize },
    /// Both sides map per destination and at least one randomises the
    /// ports; no bounded method opens a direct path without a port mapping
    /// (see `hardnat`).
    BothHardNat,
    /// The birthday attempt ran out of probes or time.
    BirthdayFailed { at: Instant, probes: u32 },
    /// The direct path went silent.
    DirectTimedOut { at: Instant, path: DirectPath },
    /// The local network changed.
    NetworkChanged { at: Instant },
    /// The direct TCP stream closed or went silent.
    TcpLost { at: Instant, addr: SocketAddr },
}

impl RelayReason {
    /// Human text, with instants shown relative to `now` ("3.2s ago").
    pub fn describe(&self, now: Instant) -> String {
        self.describe_with(&|t| {
            format!("{:.1}s ago", now.saturating_duration_since(t).as_secs_f32())
        })
    }

    /// Human text, with each instant rendered by `when` ("at 14:02:05").
    /// The core has no wall clock; the driver, which has, passes one in.
    pub fn describe_with(&self, when: &dyn Fn(Instant) -> String) -> String {
        match self {
            RelayReason::Probing { since } => {
                format!("probing candidates, started {}", when(*since))
            }
            RelayReason::NoCandidates => "peer has no UDP candidates".into(),
            RelayReason::NoAnswer { at, candidates } => {
                format!(
                    "no pong from {candidates} candidates; gave up {}",
                    when(*at)
                )
            }
            RelayReason::BothHardNat => {
                "no bounded method opens a direct path between these NATs without a port mapping"
                    .into()
            }
            RelayReason::BirthdayFailed { at, probes } => {
                format!(
                    "birthday probing failed after {probes} probes {}",
                    when(*at)
                )
            }
            RelayReason::DirectTimedOut { at, path } => {
                format!("direct path {} went silent {}", path.addr, when(*at))
            }
            RelayReason::NetworkChanged { at } => format!("local network changed {}", when(*at)),
            RelayReason::TcpLost { at, addr } => {
                format!("direct tcp {addr} closed {}", when(*at))
            }
        }
    }
}

#[cfg(test)]
mod tcp_tests;
