//! One WireGuard peer: its session, the peer's current path (a direct
//! address, from the primary socket or one of the birthday method's extra
//! sockets; a direct TCP stream; or the relay) and the prefixes it owns.
//!
//! This is the only place that holds a WireGuard session, and it holds it
//! as a [`Wg`]: every call takes `now`, which [`super::wg`] hands to
//! boringtun in place of its own clock reads, so the driver, the tests and
//! the simulator decide what time the session sees.
//!
//! The session is made at the peer's first packet, handshake or timer
//! that needs it, not when the peer is configured: boringtun's `Tunn` is
//! about 11 KB (eight session slots) and its creation costs an X25519, so
//! a 10,000-peer map of mostly idle peers would otherwise hold 110 MB and
//! spend half a second before the first packet (issue #19; figures in
//! `tests/bench/peers.sh`). A peer with a persistent keepalive gets its
//! session at once, because boringtun's keepalive timer is what starts
//! its first handshake.
//!
//! The session and the path sit behind one short mutex: encryption and
//! decryption of one packet take it, and no system call ever happens while it
//! is held. The outcome of each call is a length into the caller's buffer
//! plus where to send it, so the caller can batch the actual IO.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use boringtun::noise::errors::WireGuardError;
use boringtun::noise::rate_limiter::RateLimiter;
use boringtun::noise::TunnResult;
use ipnet::IpNet;
use parking_lot::Mutex;

use super::wg::Wg;
use crate::keys::{NodeKey, PresharedKey, PrivateKey};
use crate::path::{DirectPath, Path, SocketId};

/// What the data plane needs to know to bring up a peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerSpec {
    pub key: NodeKey,
    pub allowed_ips: Vec<IpNet>,
    pub endpoint: Option<SocketAddr>,
    pub persistent_keepalive: Option<u16>,
    pub preshared_key: Option<[u8; 32]>,
    /// The path is chosen by NAT traversal (a mesh peer): packets start on
    /// the relay and WireGuard's own roaming is off, because an address that
    /// merely delivered one packet is not a proven path. Static peers
    /// (`[[peer]]` in the config) roam as WireGuard does.
    pub managed: bool,
}

impl PeerSpec {
    pub fn new(key: NodeKey, allowed_ips: Vec<IpNet>) -> Self {
        PeerSpec {
            key,
            allowed_ips,
            endpoint: None,
            persistent_keepalive: None,
            preshared_key: None,
            managed: false,
        }
    }

    pub fn with_psk(mut self, psk: Option<PresharedKey>) -> Self {
        self.preshared_key = psk.map(|p| p.0);
        self
    }
}

/// Result of sealing one packet for a peer: `len` bytes at the start of the
/// output buffer, and where they go.
#[derive(Debug, PartialEq, Eq)]
pub enum Sealed {
    Send {
        len: usize,
        to: SocketAddr,
    },
    /// Like `Send`, but from extra socket `socket` (never the primary one):
    /// a path the birthday method found. A variant of its own keeps the
    /// common case's match and batching unchanged.
    SendOn {
        len: usize,
        to: SocketAddr,
        socket: SocketId,
    },
    Relay {
        len: usize,
    },
    /// Something should go out but there is no path to the peer yet.
    NoEndpoint,
    /// Nothing to send (the tunnel queued the packet).
    Nothing,
}

/// Result of opening one datagram from a peer.
#[derive(Debug)]
pub enum Opened {
    /// A decrypted IP packet of `len` bytes at the start of the buffer.
    Tunnel { len: usize },
    /// A protocol reply (handshake response, keepalive, queued data) of
    /// `len` bytes to send back the way the datagram came; call
    /// [`Peer::flush_queued`] after.
    Reply { len: usize },
    /// Authenticated but nothing to deliver (keepalive).
    Nothing,
    /// The packet decrypted but its inner source is not one of the peer's
    /// allowed IPs: dropped, as WireGuard's cryptokey routing requires.
    Spoofed,
    /// Failed authentication or otherwise invalid.
    Rejected(WireGuardError),
}

#[derive(Debug, Clone, Copy)]
pub struct PeerStats {
    pub last_handshake: Option<Duration>,
    pub tx_bytes: u64,
    pub rx_bytes: u64,
    /// `None`: no endpoint known and no relay; packets are dropped.
    pub path: Option<Path>,
}

struct State {
    /// `None` until something needs the session (see the module doc).
    tunn: Option<Box<Wg>>,
    /// The route the packet tasks read per packet; `None`: nowhere yet.
    path: Option<Path>,
    /// Packets sealed or opened for this peer, handshakes and packets that
    /// found no path included: traversal's "is this peer in use" signal,
    /// which byte counters (data only, once a session exists) cannot give
    /// before the first handshake completes.
    activity: u64,
    /// Packets given to [`Peer::seal`]: the part of `activity` that is
    /// ours, which alone may start traversal's hard-NAT methods.
    sealed: u64,
    /// Set when the last [`Peer::poll_activity`] saw no new packets; the
    /// next packet clears it and wakes the agent.
    quiet: bool,
}

impl State {
    /// Counts a packet; true when it ends a quiet spell.
    fn touch(&mut self) -> bool {
        self.activity = self.activity.wrapping_add(1);
        std::mem::take(&mut self.quiet)
    }

    fn sealed(&self, len: usize) -> Sealed {
        match self.path {
            Some(Path::Direct(d)) if d.socket == SocketId::PRIMARY => {
                Sealed::Send { len, to: d.addr }
            }
            Some(Path::Direct(d)) => Sealed::SendOn {
                len,
                to: d.addr,
                socket: d.socket,
            },
            // A TCP stream carries a peer's packets framed like the
            // relay's; the egress picks the stream (`agent::egress`).
            Some(Path::Relay | Path::Tcp(_)) => Sealed::Relay { len },
            None => Sealed::NoEndpoint,
        }
    }
}

pub struct Peer {
    pub key: NodeKey,
    /// What a session is made from when the first use needs it.
    own: x25519_dalek::StaticSecret,
    limiter: Arc<RateLimiter>,
    /// boringtun's 24-bit peer index; session indices are `index << 8 | n`.
    pub index: u32,
    pub spec: PeerSpec,
    state: Mutex<State>,
    /// Packets from this peer whose inner source it does not own.
    pub spoofed: AtomicU64,
    wake: Arc<tokio::sync::Notify>,
    /// The subnet routes this peer carries for us (`DataPlane::
    /// set_subnet_routes`): packets from those sources are its too.
    subnets: arc_swap::ArcSwap<Vec<IpNet>>,
}

impl Peer {
    /// A peer configured at `now`; its session is made then only when it
    /// has a persistent keepalive (see the module doc).
    pub fn new(
        now: Instant,
        own: &PrivateKey,
        spec: PeerSpec,
        index: u32,
        limiter: Arc<RateLimiter>,
        wake: Arc<tokio::sync::Notify>,
    ) -> Peer {
        let path = match (spec.endpoint, spec.managed) {
            (_, true) => Some(Path::Relay),
            (Some(ep), false) => Some(Path::Direct(DirectPath::primary(ep))),
            (None, false) => None,
        };
        let peer = Peer {
            key: spec.key,
            own: own.secret().clone(),
            limiter,
            index,
            state: Mutex::new(State {
                tunn: None,
                path,
                activity: 0,
                sealed: 0,
                quiet: true,
            }),
            spec,
            spoofed: AtomicU64::new(0),
            wake,
            subnets: arc_swap::ArcSwap::from_pointee(Vec::new()),
        };
        if peer.spec.persistent_keepalive.is_some() {
            let mut st = peer.state.lock();
            peer.session(&mut st, now);
        }
        peer
    }

    /// The session, made at `now` if this is its first use.
    fn session<'s>(&self, st: &'s mut State, now: Instant) -> &'s mut Wg {
        st.tunn.get_or_insert_with(|| {
            Box::new(Wg::new(
                now,
                self.own.clone(),
                self.spec.key.to_x25519(),
                self.spec.preshared_key,
                self.spec.persistent_keepalive,
                self.index,
                Some(self.limiter.clone()),
            ))
        })
    }

    /// Whether the session has been made.
    #[cfg(test)]
    pub(crate) fn has_session(&self) -> bool {
        self.state.lock().tunn.is_some()
    }

    /// The direct address packets go to, if the path is direct.
    pub fn endpoint(&self) -> Option<SocketAddr> {
        match self.state.lock().path {
            Some(Path::Direct(d)) => Some(d.addr),
            _ => None,
        }
    }

    /// Where the peer's packets go now.
    pub fn path(&self) -> Option<Path> {
        self.state.lock().path
    }

    /// A direct path from the primary socket (a static peer's endpoint).
    pub fn set_endpoint(&self, to: SocketAddr) {
        self.set_path(Path::Direct(DirectPath::primary(to)));
    }

    /// Moves the peer to another path (NAT traversal's decision). The
    /// WireGuard session is untouched: it does not depend on the path.
    pub fn set_path(&self, path: Path) {
        self.state.lock().path = Some(path);
    }

    /// Encrypts one IP packet into `out` (which must hold `src.len() + 32`
    /// bytes and at least 148).
    pub fn seal(&self, now: Instant, src: &[u8], out: &mut [u8]) -> Sealed {
        let mut st = self.state.lock();
        st.sealed = st.sealed.wrapping_add(1);
        if st.touch() {
            self.wake.notify_one();
        }
        let len = match self.session(&mut st, now).encapsulate(now, src, out) {
            TunnResult::WriteToNetwork(p) => p.len(),
            _ => return Sealed::Nothing,
        };
        st.sealed(len)
    }

    /// Decrypts one datagram into `out`. `from` is the UDP source, or `None`
    /// for a datagram that came through the relay. A static peer's endpoint
    /// roams to `from` when the datagram proves to come from the peer.
    pub fn open(
        &self,
        now: Instant,
        from: Option<SocketAddr>,
        datagram: &[u8],
        out: &mut [u8],
    ) -> Opened {
        let kind = datagram.first().copied().unwrap_or(0);
        let mut st = self.state.lock();
        // Only a handshake initiation can be good for a peer without a
        // session: anything else addressed to its index is refused
        // before one is made, so forged data packets cannot make every
        // idle peer's session (and cost an X25519 and 11 KB each).
        if st.tunn.is_none() && kind != 1 {
            return Opened::Rejected(WireGuardError::NoCurrentSession);
        }
        if st.touch() {
            self.wake.notify_one();
        }
        let (opened, authentic) =
            match self
                .session(&mut st, now)
                .decapsulate(now, from.map(|f| f.ip()), datagram, out)
            {
                TunnResult::WriteToTunnelV4(p, src) => {
                    (self.check_source(p.len(), src.into()), true)
                }
                TunnResult::WriteToTunnelV6(p, src) => {
                    (self.check_source(p.len(), src.into()), true)
                }
                TunnResult::WriteToNetwork(p) => {
                    // A cookie reply answers a packet we could not yet trust.
                    let authentic = p.first() != Some(&3);
                    (Opened::Reply { len: p.len() }, authentic)
                }
                TunnResult::Done => (Opened::Nothing, kind == 4 || kind == 2),
                TunnResult::Err(e) => (Opened::Rejected(e), false),
            };
        if let Some(from) = from {
            let roam = authentic && kind != 3 && !self.spec.managed;
            let there = Some(Path::Direct(DirectPath::primary(from)));
            if roam && st.path != there {
                tracing::debug!(peer = %self.key.short(), %from, "endpoint roamed");
                st.path = there;
            }
        }
        opened
    }

    /// Sets the subnet routes this peer carries.
    pub(super) fn set_subnets(&self, nets: Vec<IpNet>) {
        self.subnets.store(Arc::new(nets));
    }

    fn check_source(&self, len: usize, src: IpAddr) -> Opened {
        // The subnets are read only when the peer's own addresses do not
        // match: a subnet router's forwarded packets.
        if self.spec.allowed_ips.iter().any(|n| n.contains(&src))
            || self.subnets.load().iter().any(|n| n.contains(&src))
        {
            Opened::Tunnel { len }
        } else {
            self.spoofed.fetch_add(1, Ordering::Relaxed);
            Opened::Spoofed
        }
    }

    /// After an [`Opened::Reply`], drains packets the tunnel queued while the
    /// handshake was in flight: the next one to send, or [`Sealed::Nothing`].
    pub fn flush_queued(&self, now: Instant, out: &mut [u8]) -> Sealed {
        let mut st = self.state.lock();
        let Some(tunn) = st.tunn.as_mut() else {
            return Sealed::Nothing;
        };
        let len = match tunn.decapsulate(now, None, &[], out) {
            TunnResult::WriteToNetwork(p) => p.len(),
            _ => return Sealed::Nothing,
        };
        st.sealed(len)
    }

    /// Runs WireGuard's timers (rekey, handshake retry, keepalives): a
    /// datagram to send, or [`Sealed::Nothing`]. `out` must hold 148 bytes.
    pub fn tick(&self, now: Instant, out: &mut [u8]) -> Sealed {
        let mut st = self.state.lock();
        // A peer without a session has no timers to run.
        let Some(tunn) = st.tunn.as_mut() else {
            return Sealed::Nothing;
        };
        let len = match tunn.update_timers(now, out) {
            TunnResult::WriteToNetwork(p) => p.len(),
            _ => return Sealed::Nothing,
        };
        st.sealed(len)
    }

    /// The activity counter, for the agent's "is this peer in use" check;
    /// when it still equals `seen` the peer is marked quiet, and its next
    /// packet wakes the agent through the data plane's `activity_wake`.
    pub fn poll_activity(&self, seen: u64) -> u64 {
        let mut st = self.state.lock();
        if st.activity == seen {
            st.quiet = true;
        }
        st.activity
    }

    /// How many packets were sealed for this peer (ever, wrapping).
    pub fn sealed(&self) -> u64 {
        self.state.lock().sealed
    }

    pub fn stats(&self, now: Instant) -> PeerStats {
        let mut st = self.state.lock();
        let (last_handshake, tx, rx) = match st.tunn.as_mut() {
            Some(tunn) => tunn.stats(now),
            None => (None, 0, 0),
        };
        PeerStats {
            last_handshake,
            tx_bytes: tx as u64,
            rx_bytes: rx as u64,
            path: st.path,
        }
    }
}
