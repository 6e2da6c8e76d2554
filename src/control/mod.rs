//! The control protocol between agents and the coordinator.
//!
//! HTTP/1.1 or HTTP/2 over TLS (plain HTTP only on loopback or in the lab),
//! JSON bodies with the types in [`types`], shared by both sides so they
//! cannot drift apart.
//!
//! | request | auth | body → answer |
//! |---|---|---|
//! | `GET /key` | none | → [`types::ServerKeyResponse`] |
//! | `POST /register` | node key | [`types::RegisterRequest`] → [`types::RegisterResponse`] |
//! | `GET /map[?v=2]` | node key | → NDJSON stream of [`types::MapMessage`] |
//! | `POST /endpoints` | node key | [`types::EndpointsReport`] → `{}` |
//! | `POST /logout` | node key | → `{}` |
//! | `GET /reach` | node key | → [`types::ReachResponse`] (what each peer lets this node do) |
//!
//! **Keys and trust.** The agent learns the coordinator's X25519 public key
//! from `GET /key`; TLS (with the usual certificate checks) is what makes
//! that answer trustworthy, exactly as it does for every other answer.
//! Every other request, registration included, is signed as described in
//! [`auth`]: a MAC keyed from X25519(node private, coordinator public). So
//! registration proves the node holds the private half of the key it
//! registers, the join token is spent once there, and afterwards no bearer
//! secret ever travels; a captured request is useless once replayed (stale
//! timestamp or seen nonce), and useless on another path or body.
//!
//! **Errors** are `{code, message}` ([`types::ErrorBody`]) with the status
//! from [`types::ErrorCode::status`]. A request that is malformed,
//! unauthenticated, replayed or otherwise refused changes nothing in the
//! coordinator's store.
//!
//! **The map stream** answers `GET /map` with one JSON object per line: a
//! `full` map first, then deltas within a second of each change anywhere in
//! the network, and a keepalive every [`types::KEEPALIVE_SECS`]. A node the
//! administrator removes sees its stream end and then `unknown_node` (401).
//! Agents ask for [`types::MAP_PATH`] (`/map?v=2&presence=1&zstd=1`),
//! which also allows `peer_online` lines, or one `presence` line per write,
//! for changes of presence alone and, from a
//! coordinator run with `--compress-maps`, a body of zstd frames
//! ([`zmap`]); plain `/map` (older agents) gets whole entries only,
//! uncompressed.
//!
//! [`client`] is the agent's side; the coordinator is its own crate.

pub mod advertise;
pub mod auth;
pub mod bounds;
pub mod client;
pub mod follow;
pub mod netmap;
mod retry;
pub mod types;
pub mod zmap;

pub use client::{ControlClient, ControlError, MapEvent, MapStream, Registration};
pub use netmap::NetMap;
pub use types::*;
