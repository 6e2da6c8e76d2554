//! What the agent state asks its driver to do: one enum, polled with
//! `AgentState::poll_output` (docs/architecture.md, "The agent state").
//!
//! Each value is a complete instruction: the driver carries it out with
//! the socket, relay connection, TCP stream, data plane or coordinator
//! request it names, and feeds any answer back through a `handle_*` call.
//! Nothing here is JSON: the driver turns values into API replies only at
//! the local API's edge.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Instant;

use ipnet::Ipv6Net;

use crate::api::mesh::PingRound;
use crate::control::types::{EndpointsReport, RelayMap};
use crate::dataplane::PeerSpec;
use crate::keys::NodeKey;
use crate::netcheck::Report;
use crate::path::{Path, SocketId};
use crate::policy::PacketFilter;
use crate::traversal::node::NodeTransmit;
use crate::traversal::ChangeReason;

/// See the module doc.
#[derive(Debug)]
#[non_exhaustive]
pub enum Output {
    /// A disco datagram: on a UDP socket, through a relay, or on a direct
    /// TCP stream (`transmit.dest`).
    Disco(NodeTransmit),
    /// A netcheck STUN probe, on the primary socket.
    Stun {
        to: SocketAddr,
        bytes: Vec<u8>,
    },
    /// A netcheck run is wanted: the driver finds this host's source
    /// address towards these servers (the kernel's route choice) and
    /// calls `AgentState::start_netcheck`.
    Netcheck {
        v4: Option<SocketAddr>,
        v6: Option<SocketAddr>,
    },
    /// Ask a STUN server over TCP, from the direct TCP port, what our TCP
    /// port looks like from outside (`handle_tcp_stun` answers).
    TcpStun(SocketAddr),
    /// A netcheck finished (`None`: the relay map lists no STUN server):
    /// for the `warren netcheck` requests waiting on it.
    NetcheckDone(Option<Box<Report>>),
    /// Put the peer in the data plane (replacing one with the same key)
    /// and send on `path` until told otherwise.
    AddPeer {
        spec: PeerSpec,
        path: Path,
    },
    RemovePeer(NodeKey),
    /// Send to `peer` on `path` from now on (it was on `from`; traversal
    /// said why).
    Path {
        peer: NodeKey,
        from: Path,
        path: Path,
        reason: ChangeReason,
    },
    /// The packet filter from the map (`None`: the network has no policy).
    Filter(Option<Box<PacketFilter>>),
    /// Install this node's overlay addresses (the firewall's own set and
    /// the TUN's addresses).
    Addresses {
        v4: Ipv4Addr,
        v6: Ipv6Addr,
    },
    /// Route each prefix to its peer, in the data plane and the kernel
    /// (the whole set: what is not in it is no longer routed): subnet
    /// routes, and an exit node's two default routes. `lan` stays off the
    /// tunnel (`--exit-node-allow-lan-access`).
    Routes {
        routes: Vec<(ipnet::IpNet, NodeKey)>,
        lan: Vec<ipnet::IpNet>,
        /// An exit node is chosen but carries nothing: the default routes
        /// still go into the tunnel, where no peer takes them, so traffic
        /// meant for the exit node is dropped rather than leaked onto the
        /// underlay (Tailscale fails closed the same way).
        exit_blocked: bool,
    },
    /// The routes this node serves (subnets, and both default routes as an
    /// exit node): accept packets to them from peers and forward them (the
    /// whole set).
    Serving(Vec<ipnet::IpNet>),
    /// The names and DNS settings changed: rebuild the resolver's zone.
    Dns(Box<crate::dns::DnsView>),
    /// Keep the network's /48 in the saved login.
    PinPrefix(Ipv6Net),
    Relay(RelayCmd),
    /// Open extra UDP sockets `1..=count`, then `sockets_opened`.
    OpenSockets {
        count: u16,
    },
    /// Close every extra socket but `keep`.
    CloseSockets {
        keep: Vec<SocketId>,
    },
    /// Dial `targets` from the TCP port until a stream is up or `until`.
    TcpDial {
        peer: NodeKey,
        targets: Vec<SocketAddr>,
        until: Instant,
    },
    /// Close the direct TCP stream to `addr`; `TcpClear` closes them all.
    TcpClose(SocketAddr),
    TcpClear,
    /// Send this endpoints report to the coordinator (with the netcheck
    /// report, which the wire carries as JSON), then `handle_reported`.
    Report {
        report: EndpointsReport,
        netcheck: Option<Box<Report>>,
    },
    /// A `warren ping` request is answered.
    PingDone {
        id: u64,
        round: PingRound,
    },
    /// Time to look at the data plane's counters (`handle_traffic`), the
    /// idle relays and, when `addresses`, the host's addresses
    /// (`handle_host`).
    Housekeep {
        addresses: bool,
    },
    /// Keep a port mapping for the listen port (once; it renews itself).
    StartPortmap,
    /// Give the port mapping back (the node left the network).
    StopPortmap,
    /// The coordinator no longer accepts this node: forget the login.
    Revoked(String),
}

/// What the relay connections should do.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum RelayCmd {
    /// The regions the network has.
    Map(RelayMap),
    /// The home region; `measured`: a netcheck's latencies chose it.
    Home {
        id: u16,
        measured: bool,
    },
    /// Where `peer` can be reached (`None`: its home is unknown, use ours).
    PeerRegion {
        peer: NodeKey,
        region: Option<u16>,
    },
    RemovePeer(NodeKey),
    /// Close every connection (the node left the network).
    Clear,
}
