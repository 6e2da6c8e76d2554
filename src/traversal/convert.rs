//! Conversions from the shapes other modules already have (the netcheck
//! report, the coordinator map's endpoints) into the inputs of the traversal
//! core, so the agent's wiring is a line per field and the rules live here,
//! next to the code that depends on them.
//!
//! Lossy points, on purpose:
//! - netcheck's sequential step is signed (a NAT may count down); prediction
//!   here only models upward steps, so a step outside `1..=65535` is treated
//!   as an unknown allocation (plain probing, then the relay);
//! - the map's endpoint kinds have no peer-reflexive kind (those are learnt
//!   from pings, never published), and all published endpoints are UDP.

use super::hardnat::{Allocation, Mapping, NatSummary};
use super::node::PeerInfo;
use crate::control::types::{Endpoint, EndpointKind, Peer};
use crate::netcheck::{FamilyReport, MappingBehavior, PortAllocation};
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
                _ => Allocation::Unknown,
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
                Allocation::Unknown,
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
