//! `warren-coordinator`: the control server of a warren network.
//!
//! It registers nodes with join tokens, hands out overlay addresses, keeps
//! the network map in a store (SQLite, or PostgreSQL shared by replicas) and
//! streams it to every connected agent. The binary adds administration
//! subcommands that work on the store directly.
//!
//! - [`store`]: the database, its schema and every query.
//! - [`hub`]: carries change notes from the store to the open map streams.
//! - [`api`]: the HTTP control API (see `warren::control` for the protocol).
//! - [`server`]: configuration, the coordinator key, TLS, background tasks.
//! - [`stun`]: the STUN Binding server (also run by standalone relays).

pub mod admin;
pub mod api;
pub mod hub;
pub mod server;
pub mod store;
pub mod stun;
