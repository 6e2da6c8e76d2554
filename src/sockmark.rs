//! The firewall mark on every socket the agent opens, so that its own
//! traffic never enters its own routes (README, "Subnet routers and exit
//! nodes"; `docs/architecture.md`, "Routing without loops").
//!
//! When an exit node or a subnet route covers the coordinator, a relay, a
//! STUN server or a peer's underlay address, a packet of the tunnel itself
//! would be routed back into the tunnel. The agent's routes live in a table
//! of their own ([`TABLE`]) that the kernel consults for unmarked traffic
//! only; marked traffic is looked up in the main table (the rules are in
//! `agent::mesh::routing`). This module marks the sockets: the UDP socket
//! and the birthday method's extra sockets, the direct TCP listener and
//! dials, netcheck's STUN sockets, the port mapper's, and every TCP
//! connection to the coordinator and the relays (`crate::dial`).
//!
//! Marking is process-wide, switched on once by the daemon
//! ([`enable`]): the library is also linked by the coordinator and by
//! tests, which must not mark (and usually may not: `SO_MARK` needs
//! `CAP_NET_ADMIN`). A global is the honest shape here: it is a property
//! of the process, as Tailscale's `netns` package treats it.

use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, Ordering};

/// The mark warren's own sockets carry (bits 16–23, clear of the low bits
/// that Kubernetes and Docker use and of Tailscale's 0x80000).
pub const MARK: u32 = 0x0057_0000;
/// The bits of the mark that are warren's.
pub const MASK: u32 = 0x00ff_0000;
/// The routing table holding the routes into the tunnel.
pub const TABLE: u8 = 87;

static ENABLED: AtomicBool = AtomicBool::new(false);
static WARNED: AtomicBool = AtomicBool::new(false);

/// Marks every socket opened from now on (the daemon, at start).
pub fn enable() {
    ENABLED.store(true, Ordering::Relaxed);
}

/// Whether sockets are marked.
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// Marks `sock` when marking is on. A refusal (no `CAP_NET_ADMIN`) is
/// logged once and otherwise ignored: without the capability the agent
/// cannot install routes either, so nothing can loop.
pub fn apply(sock: &impl AsFd) {
    if !enabled() {
        return;
    }
    if let Err(e) = socket2::SockRef::from(sock).set_mark(MARK) {
        if !WARNED.swap(true, Ordering::Relaxed) {
            tracing::warn!(error = %e, "cannot mark warren's sockets (SO_MARK)");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_mark_is_inside_its_mask() {
        assert_eq!(MARK & MASK, MARK);
        assert_eq!(MARK & 0x80000, 0, "clear of Tailscale's mark");
        assert_eq!(MARK & 0xffff, 0, "clear of the low bits others use");
    }
}
