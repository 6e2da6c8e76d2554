//! warren: a mesh VPN.
//!
//! The library holds the sans-IO core (`proto` and the state machines), the
//! data plane (`dataplane`) and the tokio driver (`agent`). The `warren`
//! binary is the agent daemon plus the CLI; `warren-coordinator` depends on
//! this crate for the wire protocols it shares with the agent.

pub mod agent;
pub mod api;
pub mod cli;
pub mod config;
pub mod control;
pub mod dataplane;
pub mod dial;
pub mod dns;
pub mod keys;
pub mod netcheck;
pub mod path;
pub mod policy;
pub mod portmap;
pub mod proto;
pub mod relay_client;
pub mod routes;
pub mod sockmark;
pub mod text;
pub mod timers;
pub mod toml_loc;
pub mod traversal;
