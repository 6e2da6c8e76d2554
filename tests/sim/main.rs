//! Deterministic simulation of the agent's sans-IO machines: two or more
//! nodes (each a whole agent state, `agent::state::AgentState`, with a
//! real data plane and a real relay client session beside it) over
//! simulated NATs, a relay and a virtual clock (`net` is the
//! network, `harness` and `wire` the driver, `relay` the relay server's
//! half). One scenario per test; each fixes its seed, so a failure replays
//! exactly.
//!
//! Most UDP topologies with a direct path assert "direct within 3 s of
//! virtual time" (the TCP one within 5 s, the random-port birthday one
//! within its own bound; the generated pairs check the path at the end);
//! the others assert that the peers stay on the relay, that traffic still
//! flows, and why.

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
