//! Conversions from the shapes other modules already have (the netcheck
//! report, the coordinator map's endpoints) into the inputs of the traversal
//! core, so the agent's wiring is a line per field and the rules live here,
//! next to the code that depends on them.
//!
//! This is the one place a netcheck report becomes a [`NatSummary`]: the
//! agent converts its whole [`Report`], which is the IPv4 family's summary
//! with a better address to predict from.
//!
//! The address to predict from is the last port the NAT handed out, which
//! for a sequential endpoint-dependent NAT is one step past netcheck's last
//! answer when the hairpin test ran (its request took a mapping too).
//!
//! Lossy points, on purpose:
//! - netcheck's sequential step is signed (a NAT may count down); prediction
//!   here only models upward steps, so a step outside `1..=65535` is treated
//!   as random: unpredictable (the birthday method may still work) rather
//!   than mispredicted;
//! - the map's endpoint kinds have no peer-reflexive kind (those are learnt
//!   from pings, never published), and all published endpoints are UDP.

use super::hardnat::{Allocation, Mapping, NatSummary};
use super::node::PeerInfo;
use crate::control::types::{Endpoint, EndpointKind, Peer};
use crate::netcheck::{FamilyReport, MappingBehavior, PortAllocation, Report};
use crate::proto::disco::{Candidate, CandidateKind, DiscoKey};

impl From<&FamilyReport> for NatSummary {
    fn from(r: &FamilyReport) -> Self {
        let mapping = match r.mapping {
            MappingBehavior::Unknown => Mapping::Unknown,
            MappingBehavior::NoNat => Mapping::None,
            MappingBehavior::EndpointIndependent => Mapping::EndpointIndependent,
            MappingBehavior::EndpointDependent => Mapping::EndpointDependent,
        };
        let allocation = match r.port_allocation {
            PortAllocation::Preserving => Allocation::Preserving,
            PortAllocation::Random => Allocation::Random,
            PortAllocation::Sequential { step } => match u16::try_from(step) {
                Ok(step) if step > 0 => Allocation::Sequential { step },
                _ => Allocation::Random,
            },
            PortAllocation::Unknown => Allocation::Unknown,
        };
        NatSummary {
            mapping,
            allocation,
            observed: r.global,
        }
    }
}

/// What traversal needs from a whole report: the IPv4 NAT's behaviour and
/// the address to predict from. For a sequential allocator that is the
/// *last* mapping handed out (probes are reported in allocation order),
/// since the next ports follow it, not the first server's `global`.
impl From<&Report> for NatSummary {
    fn from(r: &Report) -> Self {
        let last_mapped = r
            .servers
            .iter()
            .flat_map(|s| &s.probes)
            .filter_map(|p| p.mapped.filter(|_| p.addr.is_ipv4()))
            .next_back();
        let family = NatSummary::from(&r.ipv4);
        let mut observed = last_mapped.or(family.observed);
        // netcheck's hairpin request goes out after every probe, to our
        // own mapped address: a destination of its own, so an
        // endpoint-dependent NAT handed it the next port too. Predictions
        // start past it (found by the simulator, which runs the real
        // machine: with it uncounted, a pair whose NATs had moved on a
        // few more ports missed its window).
        if let (Mapping::EndpointDependent, Allocation::Sequential { step }, Some(_), Some(o)) =
            (family.mapping, family.allocation, r.hairpinning, observed)
        {
            observed = Some(std::net::SocketAddr::new(
                o.ip(),
                o.port().wrapping_add(step),
            ));
        }
        NatSummary { observed, ..family }
    }
}

impl From<EndpointKind> for CandidateKind {
    fn from(k: EndpointKind) -> Self {
        match k {
            EndpointKind::Host => CandidateKind::Host,
            EndpointKind::Portmapped => CandidateKind::PortMapped,
            EndpointKind::Srflx => CandidateKind::ServerReflexive,
            EndpointKind::Predicted => CandidateKind::Predicted,
        }
    }
}

impl From<&Endpoint> for Candidate {
    fn from(e: &Endpoint) -> Self {
        Candidate::udp(e.addr, e.kind.into())
    }
}

impl PeerInfo {
    /// A map entry as the traversal core needs it. The map does not carry
    /// the peer's NAT summary yet, so the caller passes what it knows
    /// (`NatSummary::default()` = unknown: plain probing only).
    pub fn from_map(peer: &Peer, nat: NatSummary) -> Self {
        PeerInfo {
            node_key: peer.key,
            disco_key: DiscoKey(peer.disco_key.0),
            candidates: peer.endpoints.iter().map(Candidate::from).collect(),
            nat,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn netcheck_family_maps_to_summary() {
        let global = Some("203.0.113.4:40000".parse().unwrap());
        let r = FamilyReport {
            works: true,
            global,
            mapping: MappingBehavior::EndpointDependent,
            port_allocation: PortAllocation::Sequential { step: 2 },
        };
        let s = NatSummary::from(&r);
        assert_eq!(s.mapping, Mapping::EndpointDependent);
        assert_eq!(s.allocation, Allocation::Sequential { step: 2 });
        assert_eq!(s.observed, global);
        for step in [0, -1, 70_000] {
            let r = FamilyReport {
                port_allocation: PortAllocation::Sequential { step },
                ..r.clone()
            };
            assert_eq!(
                NatSummary::from(&r).allocation,
                Allocation::Random,
                "{step}"
            );
        }
        let public = FamilyReport {
            mapping: MappingBehavior::NoNat,
            port_allocation: PortAllocation::Random,
            ..r
        };
        let s = NatSummary::from(&public);
        assert!(s.is_easy() && !s.is_random_edm());
    }

    #[test]
    fn a_report_predicts_from_its_last_ipv4_mapping() {
        use crate::netcheck::{ProbeReport, Rejected, ServerReport};
        let probe = |addr: &str, mapped: Option<&str>| ProbeReport {
            addr: addr.parse().unwrap(),
            mapped: mapped.map(|m| m.parse().unwrap()),
            rtt: None,
        };
        let first = "203.0.113.4:20002".parse().unwrap();
        let mut r = Report {
            udp: true,
            ipv4: FamilyReport {
                works: true,
                global: Some(first),
                mapping: MappingBehavior::EndpointDependent,
                port_allocation: PortAllocation::Sequential { step: 2 },
            },
            ipv6: FamilyReport::default(),
            hairpinning: None,
            portmap: None,
            tcp: None,
            servers: vec![ServerReport {
                name: "a".into(),
                latency: None,
                probes: vec![
                    probe("192.0.2.1:3478", Some("203.0.113.4:20002")),
                    probe("192.0.2.1:3479", Some("203.0.113.4:20004")),
                    probe("[2001:db8::1]:3478", Some("[2001:db8::9]:41641")),
                    probe("192.0.2.2:3478", None),
                ],
            }],
            preferred_server: Some("a".into()),
            rejected: Rejected::default(),
        };
        let s = NatSummary::from(&r);
        assert_eq!(s.allocation, Allocation::Sequential { step: 2 });
        assert_eq!(s.mapping, Mapping::EndpointDependent);
        assert_eq!(s.observed, Some("203.0.113.4:20004".parse().unwrap()));
        // No IPv4 mapping among the probes: the family's `global`.
        r.servers.clear();
        assert_eq!(NatSummary::from(&r).observed, Some(first));
    }

    #[test]
    fn map_endpoints_become_candidates() {
        let e = Endpoint {
            addr: "198.51.100.1:41641".parse().unwrap(),
            kind: EndpointKind::Srflx,
        };
        let c = Candidate::from(&e);
        assert_eq!(c.addr, e.addr);
        assert_eq!(c.kind, CandidateKind::ServerReflexive);
        assert_eq!(
            CandidateKind::from(EndpointKind::Portmapped),
            CandidateKind::PortMapped
        );
        assert_eq!(CandidateKind::from(EndpointKind::Host), CandidateKind::Host);
        assert_eq!(
            CandidateKind::from(EndpointKind::Predicted),
            CandidateKind::Predicted
        );
    }
}
