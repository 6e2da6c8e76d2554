//! Deterministic simulation of NAT traversal: two or more
//! [`warren::traversal::node::Node`]s over simulated NATs, a relay and a
//! virtual clock (`net` is the network, `harness` the driver). One scenario
//! per test; each fixes its seed, so a failure replays exactly.
//!
//! "Direct where possible within 3 s of virtual time" is asserted for every
//! topology where a direct path exists; the others assert that the peers stay
//! on the relay, that traffic still flows, and why.

// Helpers outside #[test] fns are test code too; clippy only exempts the fns.
#![allow(clippy::unwrap_used)]

mod harness;
mod model;
mod net;
mod properties;
mod relay;
mod scenarios;
mod scenarios_hard;
mod scenarios_paths;
mod wire;
