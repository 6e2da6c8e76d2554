//! The reference model the property scenarios check the core against.
//!
//! It watches the simulated wire from outside the nodes and keeps its own
//! record of what each node could have learnt: every disco packet a node
//! receives over UDP is opened here with that node's own disco secret, and
//! a pong counts only the first time its exact bytes arrive (a replay is
//! not news) and only when it really comes from the peer it names. From
//! that record alone the model says whether the core may use a direct path:
//! only if a fresh, authenticated pong came over that very path (socket and
//! source address) within the trust window. Every time the core names a
//! direct path (a `PathChanged` to it, or the application sending data on
//! it) the harness asks the model, and a "no" is recorded as a violation.
//!
//! The model knows nothing of the core's path table, timers or replay
//! windows: it is written from the protocol (docs/architecture.md, "Paths")
//! so that a bug in the core's bookkeeping cannot hide in both.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use warren::keys::NodeKey;
use warren::proto::disco::{self, DiscoKey, DiscoSecret, Message};
use warren::traversal::{DirectPath, SocketId};

/// What the model knows of one node.
struct Known {
    secret: DiscoSecret,
    public: DiscoKey,
    key: NodeKey,
}

#[derive(Default)]
pub struct Model {
    nodes: Vec<Known>,
    /// (receiver, peer, socket, source) → when its last fresh pong came.
    pongs: HashMap<(usize, NodeKey, SocketId, SocketAddr), Instant>,
    /// Every disco packet already delivered to each receiver.
    seen: HashSet<(usize, Vec<u8>)>,
    /// Fresh authenticated pongs seen, for the scenarios' sanity checks.
    pub fresh_pongs: u64,
    /// Forged or replayed disco packets delivered.
    pub rejected: u64,
    pub violations: Vec<String>,
}

impl Model {
    /// Registers node `i` (nodes are added in index order) with the disco
    /// secret it was built with.
    pub fn add_node(&mut self, secret_bytes: [u8; 32], key: NodeKey) {
        let secret = DiscoSecret::from_bytes(secret_bytes);
        let public = secret.public();
        self.nodes.push(Known {
            secret,
            public,
            key,
        });
    }

    /// A UDP datagram delivered to node `to` on `socket` from `from`.
    pub fn observe_udp(
        &mut self,
        now: Instant,
        to: usize,
        socket: SocketId,
        from: SocketAddr,
        bytes: &[u8],
    ) {
        if !disco::looks_like_disco(bytes) {
            return;
        }
        let Ok(header) = disco::parse_header(bytes) else {
            self.rejected += 1;
            return;
        };
        let Some(sender) = self.nodes.iter().position(|n| n.public == header.sender) else {
            self.rejected += 1;
            return;
        };
        let sbox = self.nodes[to].secret.box_for(&header.sender);
        let Ok((_, msg)) = disco::open(&sbox, &header.sender, bytes) else {
            self.rejected += 1;
            return;
        };
        if !self.seen.insert((to, bytes.to_vec())) {
            self.rejected += 1;
            return;
        }
        if let Message::Pong { .. } = msg {
            let peer = self.nodes[sender].key;
            self.pongs.insert((to, peer, socket, from), now);
            self.fresh_pongs += 1;
        }
    }

    /// Node `i` uses (or switches to) direct path `p` to `peer` at `now`:
    /// allowed only with a fresh pong over `p` within `trust`.
    pub fn check_direct(
        &mut self,
        now: Instant,
        i: usize,
        peer: NodeKey,
        p: DirectPath,
        trust: Duration,
        what: &str,
    ) {
        let last = self.pongs.get(&(i, peer, p.socket, p.addr)).copied();
        let ok = last.is_some_and(|t| now.saturating_duration_since(t) < trust);
        if !ok {
            self.violations.push(format!(
                "node {i} {what} direct {} (socket {}) to {}: last fresh pong {:?} ago",
                p.addr,
                p.socket.0,
                peer.short(),
                last.map(|t| now.saturating_duration_since(t)),
            ));
        }
    }
}
