//! The netcheck report, its classification rules and its two renderings:
//! `Display` for a person and serde (durations as milliseconds) for
//! `--json`.
//!
//! The classification functions are pure and take the probe results in
//! first-transmission order, which is the order a NAT allocated its ports.

use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::portmap::PortmapPresence;

/// Everything netcheck learned.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    /// Some STUN server answered over UDP.
    pub udp: bool,
    pub ipv4: FamilyReport,
    pub ipv6: FamilyReport,
    /// Whether the NAT loops our own IPv4 mapped address back to us; `None`
    /// when not tested (no NAT, or no IPv4 mapping).
    pub hairpinning: Option<bool>,
    /// UPnP / NAT-PMP / PCP availability; `None` when not probed or the probe
    /// did not finish by the deadline.
    pub portmap: Option<PortmapPresence>,
    pub servers: Vec<ServerReport>,
    /// The server with the lowest latency.
    pub preferred_server: Option<String>,
    /// Datagrams that were not accepted, by reason.
    pub rejected: Rejected,
    /// STUN over TCP from the direct-TCP port, when a server answered
    /// during the run: what a peer whose UDP is blocked would dial.
    #[serde(default)]
    pub tcp: Option<TcpReport>,
}

/// What the STUN server saw of our TCP port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct TcpReport {
    /// Our TCP port's public address.
    pub public: SocketAddr,
    /// The fastest exchange (connect, request, answer).
    #[serde(with = "opt_ms", rename = "rtt_ms")]
    pub rtt: Option<Duration>,
}

/// What one address family looks like.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FamilyReport {
    /// A server of this family answered.
    pub works: bool,
    /// Our address as the first answering server saw it.
    pub global: Option<SocketAddr>,
    pub mapping: MappingBehavior,
    pub port_allocation: PortAllocation,
}

/// Whether the mapping depends on the destination.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MappingBehavior {
    /// Fewer than two destinations answered, or nothing to compare with.
    #[default]
    Unknown,
    /// The servers see our socket's own address.
    NoNat,
    /// Every destination sees the same mapped address ("easy" NAT).
    EndpointIndependent,
    /// Destinations see different mapped addresses ("hard" NAT).
    EndpointDependent,
}

/// How the NAT picks external ports.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "kind")]
pub enum PortAllocation {
    #[default]
    Unknown,
    /// Mapped port equals the local port.
    Preserving,
    /// Each new destination gets the previous port plus about `step`.
    Sequential {
        step: i32,
    },
    Random,
}

/// One server: its best latency and the result per address.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerReport {
    pub name: String,
    #[serde(with = "opt_ms")]
    pub latency: Option<Duration>,
    pub probes: Vec<ProbeReport>,
}

/// One server address.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProbeReport {
    pub addr: SocketAddr,
    pub mapped: Option<SocketAddr>,
    #[serde(with = "opt_ms")]
    pub rtt: Option<Duration>,
}

/// Counters of datagrams dropped by netcheck.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rejected {
    /// Not a well-formed STUN message.
    pub malformed: u64,
    /// Well-formed, but its transaction id is not one we sent.
    pub wrong_transaction: u64,
    /// Our transaction id, but from an address we did not ask.
    pub wrong_source: u64,
    /// Ours, but not a usable Binding success response.
    pub unusable: u64,
}

/// Steps up to this size between successive mapped ports count as
/// sequential; a random allocator lands this close with ~0.05% chance.
pub const MAX_SEQUENTIAL_STEP: i32 = 16;

/// Classifies one family from the successful probes in first-transmission
/// order: `(destination, mapped)`.
pub(crate) fn classify(
    local: Option<SocketAddr>,
    results: &[(SocketAddr, SocketAddr)],
) -> FamilyReport {
    let Some(&(_, first)) = results.first() else {
        return FamilyReport::default();
    };
    let mut report = FamilyReport {
        works: true,
        global: Some(first),
        ..FamilyReport::default()
    };
    if results.iter().all(|&(_, m)| Some(m) == local) {
        report.mapping = MappingBehavior::NoNat;
        report.port_allocation = PortAllocation::Preserving;
        return report;
    }
    // One mapped port per distinct destination, in allocation order.
    let mut per_dest: Vec<(SocketAddr, SocketAddr)> = Vec::new();
    for &(dest, mapped) in results {
        if !per_dest.iter().any(|&(d, _)| d == dest) {
            per_dest.push((dest, mapped));
        }
    }
    if per_dest.len() >= 2 {
        report.mapping = if per_dest.iter().all(|&(_, m)| m == first) {
            MappingBehavior::EndpointIndependent
        } else {
            MappingBehavior::EndpointDependent
        };
    }
    let local_port = local.map(|l| l.port());
    let ports: Vec<u16> = per_dest.iter().map(|&(_, m)| m.port()).collect();
    report.port_allocation = if ports.iter().all(|&p| Some(p) == local_port) {
        PortAllocation::Preserving
    } else if report.mapping == MappingBehavior::EndpointDependent {
        sequential_step(&ports).map_or(PortAllocation::Random, |step| PortAllocation::Sequential {
            step,
        })
    } else {
        PortAllocation::Unknown
    };
    report
}

/// The step if successive ports move by small amounts in one direction.
fn sequential_step(ports: &[u16]) -> Option<i32> {
    let deltas: Vec<i32> = ports
        .windows(2)
        .map(|w| i32::from(w[1]) - i32::from(w[0]))
        .collect();
    let small = |d: &i32| *d != 0 && d.abs() <= MAX_SEQUENTIAL_STEP;
    let same_sign = deltas.iter().all(|d| *d > 0) || deltas.iter().all(|d| *d < 0);
    if deltas.is_empty() || !same_sign || !deltas.iter().all(small) {
        return None;
    }
    // Other hosts' allocations interleave with ours, so the smallest step
    // seen is the allocator's own.
    deltas.iter().copied().min_by_key(|d| d.abs())
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "Report:")?;
        writeln!(f, "  * UDP: {}", self.udp)?;
        for (name, fam) in [("IPv4", &self.ipv4), ("IPv6", &self.ipv6)] {
            match fam.global {
                Some(addr) => writeln!(f, "  * {name}: yes, {addr}")?,
                None => writeln!(f, "  * {name}: no")?,
            }
            if fam.works {
                writeln!(f, "      mapping: {}", fam.mapping)?;
                writeln!(f, "      port allocation: {}", fam.port_allocation)?;
            }
        }
        let yes_no = |b: Option<bool>| match b {
            Some(true) => "yes",
            Some(false) => "no",
            None => "not tested",
        };
        match &self.tcp {
            Some(t) => writeln!(f, "  * TCP: yes, {}", t.public)?,
            None => writeln!(f, "  * TCP: no answer")?,
        }
        writeln!(f, "  * Hairpinning: {}", yes_no(self.hairpinning))?;
        match &self.portmap {
            Some(p) => writeln!(
                f,
                "  * Port mapping: UPnP {}, NAT-PMP {}, PCP {}",
                yes_no(Some(p.upnp)),
                yes_no(Some(p.natpmp)),
                yes_no(Some(p.pcp))
            )?,
            None => writeln!(f, "  * Port mapping: not probed")?,
        }
        writeln!(
            f,
            "  * Preferred server: {}",
            self.preferred_server.as_deref().unwrap_or("none")
        )?;
        writeln!(f, "  * Server latency:")?;
        for s in &self.servers {
            match s.latency {
                Some(l) => writeln!(f, "    - {}: {:.1}ms", s.name, l.as_secs_f64() * 1e3)?,
                None => writeln!(f, "    - {}: unreachable", s.name)?,
            }
        }
        let r = &self.rejected;
        let total = r.malformed + r.wrong_transaction + r.wrong_source + r.unusable;
        if total > 0 {
            writeln!(
                f,
                "  * Rejected datagrams: {total} (malformed {}, wrong transaction {}, wrong source {}, unusable {})",
                r.malformed, r.wrong_transaction, r.wrong_source, r.unusable
            )?;
        }
        Ok(())
    }
}

impl fmt::Display for MappingBehavior {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            MappingBehavior::Unknown => "unknown",
            MappingBehavior::NoNat => "no NAT",
            MappingBehavior::EndpointIndependent => "endpoint-independent (easy NAT)",
            MappingBehavior::EndpointDependent => "varies by destination (hard NAT)",
        })
    }
}

impl fmt::Display for PortAllocation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PortAllocation::Unknown => f.write_str("unknown"),
            PortAllocation::Preserving => f.write_str("preserving"),
            PortAllocation::Sequential { step } => write!(f, "sequential, step {step}"),
            PortAllocation::Random => f.write_str("random"),
        }
    }
}

/// `Option<Duration>` as fractional milliseconds, readable in `--json`.
mod opt_ms {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.serialize_some(&(d.as_secs_f64() * 1e3)),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        let ms = Option::<f64>::deserialize(d)?;
        ms.map(|ms| Duration::try_from_secs_f64(ms / 1e3).map_err(serde::de::Error::custom))
            .transpose()
    }
}
