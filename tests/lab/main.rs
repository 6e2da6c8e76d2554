//! The NAT lab's scenarios, in one test binary.
//!
//! `lab` is the harness (namespaces, NAT gateways, real agents and
//! coordinators, wireguard-go; see `harness/mod.rs`); every other module is
//! one scenario. They used to be seventeen test binaries, each compiling and
//! linking the whole harness (and each needing `#![allow(dead_code)]` for
//! the parts it did not use); one binary builds the harness once and links
//! once, which is most of a clean `tests/run.sh`'s build time and disk.
//!
//! Run one scenario with `cargo test --test lab -- matrix::` (a module
//! path filter). Without root every scenario is skipped with the reason
//! printed; under `CI=true` it fails instead ([`lab::Lab::new_or_skip`]).
//! Two tests at a time (`tests/run.sh`) keep a 2-core machine's time bounds
//! meaningful.

// A failed unwrap in a test is the test failing, with its location.
#![allow(clippy::unwrap_used)]

#[path = "harness/mod.rs"]
mod lab;
mod service_fixture;
mod tmux;

mod agent_lifecycle;
mod birthday;
mod dataplane;
mod dns;
mod dns_resolved;
mod exit;
mod faults;
mod harness_selftest;
mod ipv6;
mod matrix;
mod mesh;
mod netcheck;
mod package;
mod ping;
mod policy;
mod portmap;
mod relay;
mod relay_regions;
mod routes;
mod service;
mod speed;
mod tcp;
mod up;
