//! The path type: where a peer's packets go. One type from traversal's
//! decision (`traversal::peer::PeerPaths`) through the data plane's
//! per-peer route (`dataplane::Peer`) to what the API shows
//! (`api::PeerPath::from_path`), so no layer translates between its own
//! copies (docs/architecture.md, "Paths").
//!
//! It sits below both traversal and the data plane because both speak it
//! and neither should depend on the other for it.

use std::fmt;
use std::net::SocketAddr;

/// Which local UDP socket a datagram uses. `0` is the primary socket shared
/// with WireGuard; `1..` are the extra sockets of the birthday method.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct SocketId(pub u16);

impl SocketId {
    pub const PRIMARY: SocketId = SocketId(0);
}

/// A direct UDP path: from one of our sockets to one address of the peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DirectPath {
    pub socket: SocketId,
    pub addr: SocketAddr,
}

impl DirectPath {
    pub fn primary(addr: SocketAddr) -> Self {
        DirectPath {
            socket: SocketId::PRIMARY,
            addr,
        }
    }
}

/// Where packets for a peer go.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Path {
    /// Through the relay (DERP-like), always available.
    Relay,
    Direct(DirectPath),
    /// A direct TCP stream to the peer (simultaneous open, for when UDP is
    /// blocked), named by the peer's address as the stream sees it.
    Tcp(SocketAddr),
}

impl fmt::Display for Path {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Path::Relay => f.write_str("relay"),
            Path::Direct(d) if d.socket == SocketId::PRIMARY => write!(f, "direct {}", d.addr),
            Path::Direct(d) => write!(f, "direct {} (socket {})", d.addr, d.socket.0),
            Path::Tcp(a) => write!(f, "direct tcp {a}"),
        }
    }
}
