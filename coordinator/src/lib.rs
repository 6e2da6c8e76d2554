//! `warren-coordinator`: the control server of a warren network.
//!
//! It registers nodes with join tokens, hands out overlay addresses, keeps
//! the network map in a store (SQLite, or PostgreSQL shared by replicas) and
//! streams it to every connected agent. The binary adds administration
//! subcommands that work on the store directly.
//!
//! - [`store`]: the database, its schema and every query.
//! - [`admin`], [`admin_policy`], [`admin_routes`]: what the administration subcommands do.
//! - [`hub`]: carries change notes from the store to the open map streams.
//! - [`api`]: the HTTP control API (see `warren::control` for the protocol).
//! - [`server`]: configuration, the coordinator key, TLS, background tasks.
//! - [`listen`]: the one accept loop (TLS, upgrades, request deadlines) that
//!   serves the API and the relay.
//! - [`stun`]: the STUN Binding server (also run by standalone relays).
//! - [`relay`]: the encrypted relay, embedded or standalone.
//! - [`relay_map`]: the relay regions agents are told about.
//! - [`relay_nodes`]: who may use the relays (embedded admission, node feed).
//! - [`standalone`]: `warren-coordinator relay`, a relay for another region.

pub mod admin;
pub mod admin_policy;
pub mod admin_routes;
pub mod api;
pub mod dns_config;
pub mod hub;
pub mod listen;
pub mod ratelimit;
pub mod relay;
pub mod relay_map;
pub mod relay_nodes;
pub mod server;
pub mod standalone;
pub mod store;
pub mod stun;
