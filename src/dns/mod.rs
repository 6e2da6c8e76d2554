//! Names: the agent's resolver and the network's DNS settings (README,
//! "Names and DNS").
//!
//! - [`settings`]: what the coordinator sends (the domain, extra records,
//!   split DNS, global nameservers), checked the same way on both sides.
//! - [`zone`]: the names the resolver answers itself, built from the map.
//! - [`cache`]: forwarded answers for their TTL, bounded.
//! - [`resolver`]: what to do with one query, without IO.
//!
//! The IO (the listening sockets, forwarding, the host's resolver
//! configuration) is the agent's (`agent::dns`). The wire format is
//! hickory-proto's: a well-kept parser and encoder facing the network,
//! not one of ours.

pub mod cache;
pub mod resolver;
pub mod settings;
pub mod zone;

pub use resolver::{Decision, Forward, Resolver, Source};
pub use settings::{DnsSettings, Upstream};
pub use zone::{DnsView, NodeName, Zone};
