//! Netcheck: what does the network between this host and the internet do to
//! UDP? (See docs/architecture.md, "Endpoint discovery".)
//!
//! The logic is a sans-IO state machine, [`Netcheck`], in the quinn-proto
//! style: it is fed datagrams (`handle_stun`), port-mapping probe results
//! (`handle_portmap`) and timer expiries (`handle_timeout`) with an explicit
//! `now`, and it is drained with `poll_transmit` / `poll_timeout` /
//! `poll_report`. It never touches a socket or the clock, so its tests run on
//! a virtual clock against scripted NAT behaviours. The agent can drive it
//! from its shared UDP socket (STUN is told apart with
//! [`crate::proto::stun::is_stun`]); [`run`] is the stand-alone tokio driver
//! used by `warren netcheck`.
//!
//! How each report field is measured:
//! - every server address is probed with a Binding request, retransmitted
//!   with a doubling timeout; all first transmissions leave in configuration
//!   order, so a NAT allocates its ports in that order;
//! - mapping behaviour compares the mapped addresses seen by different
//!   destinations (equal: endpoint-independent; different: endpoint-dependent;
//!   equal to our own socket address: no NAT);
//! - port allocation compares mapped ports with the local port (preserving)
//!   and, for endpoint-dependent NATs, successive mapped ports from new
//!   destinations (sequential with a small constant-sign step, else random);
//! - hairpinning: once a mapped IPv4 address is known and differs from the
//!   local one, a Binding request is sent to that address from the same
//!   socket. If the NAT hairpins, our own request comes back to us; we
//!   recognise it by its transaction id. It is sent only after every probe's
//!   first transmission so its new mapping cannot disturb the port sequence;
//! - latency is measured per attempt (each retransmission has its own
//!   transaction id, so there is no retransmission ambiguity).
//!
//! Every path ends by `deadline` (5 s by default), even if nothing answers.
//!
//! A blocked UDP shows only as silence, so the report that says so comes
//! at the deadline. A host that also asks a STUN server over TCP (the
//! agent, for its direct TCP path) can tell the machine that the server
//! answered ([`Netcheck::handle_tcp_answer`]); if UDP then stays silent for
//! [`Config::provisional_wait`] (and at least twice the TCP exchange), the
//! machine says UDP is *probably* blocked ([`Netcheck::udp_probably_blocked`])
//! well before the report. Any UDP answer withdraws it; the report decides.

mod driver;
pub mod home;
mod machine;
mod report;

use std::net::SocketAddr;
use std::time::Duration;

pub use driver::{run, NetcheckError};
pub use machine::{InputError, Netcheck};
pub use report::{
    FamilyReport, MappingBehavior, PortAllocation, ProbeReport, Rejected, Report, ServerReport,
    TcpReport,
};

/// A STUN server (a relay or the coordinator), possibly at several addresses
/// (IPv4, IPv6, a second port for mapping tests).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Server {
    pub name: String,
    pub addrs: Vec<SocketAddr>,
}

/// Netcheck parameters. `Default` gives the production values with no
/// servers and no known local endpoints.
#[derive(Debug, Clone)]
pub struct Config {
    pub servers: Vec<Server>,
    /// The local IPv4 endpoint the probes leave from, with the source IP the
    /// kernel picks (not 0.0.0.0). Needed to detect "no NAT" and port
    /// preservation; `None` leaves those undecided.
    pub local_v4: Option<SocketAddr>,
    /// Same for IPv6.
    pub local_v6: Option<SocketAddr>,
    /// The report is final at `start + deadline` whatever is outstanding.
    pub deadline: Duration,
    /// First retransmission timeout; doubles per attempt.
    pub initial_rto: Duration,
    /// Transmissions per server address before it counts as unreachable.
    pub max_attempts: u32,
    /// How long to wait for our own hairpinned request.
    pub hairpin_timeout: Duration,
    /// How long UDP must stay silent, after a STUN server answered over
    /// TCP, before UDP counts as probably blocked (see the module doc).
    pub provisional_wait: Duration,
    /// Whether a port-mapping probe result will be fed in; the report then
    /// waits for it (up to the deadline).
    pub expect_portmap: bool,
    /// Seed for transaction ids (the driver passes a random one; tests a
    /// fixed one).
    pub seed: u64,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            servers: Vec::new(),
            local_v4: None,
            local_v6: None,
            deadline: Duration::from_secs(5),
            initial_rto: Duration::from_millis(250),
            max_attempts: 4,
            hairpin_timeout: Duration::from_millis(1000),
            provisional_wait: Duration::from_millis(500),
            expect_portmap: false,
            seed: 0,
        }
    }
}

#[cfg(test)]
mod tests;
