//! The agent's UDP socket, with batched IO.
//!
//! One socket per host carries WireGuard, disco and STUN (the birthday
//! method opens extra sockets beside it, see `mesh/sockets.rs`). It is
//! bound dual-stack (`[::]:port`) where the host has IPv6, else `0.0.0.0`.
//! IO goes through `quinn-udp`, which gives us recvmmsg, UDP GSO on send and
//! GRO on receive with fallbacks for kernels without them; we do not
//! hand-write that. [`TxBatch`] lays sealed packets out back to back so that
//! a run of equal-sized packets to one destination leaves in one `sendmsg`.

use std::io::{self, IoSliceMut};
use std::net::{Ipv6Addr, SocketAddr};

use quinn_udp::{RecvMeta, Transmit, UdpSocketState};
use tokio::io::Interest;

pub struct Udp {
    sock: tokio::net::UdpSocket,
    state: UdpSocketState,
    dual_stack: bool,
    gso: bool,
}

impl std::os::fd::AsRawFd for Udp {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        std::os::fd::AsRawFd::as_raw_fd(&self.sock)
    }
}

impl Udp {
    /// Binds the agent's port. `offload` false turns GSO and GRO off, for
    /// measurements and for kernels that misbehave with them.
    pub fn bind(port: u16, offload: bool) -> io::Result<Udp> {
        let (std_sock, dual_stack) =
            match bind_socket(SocketAddr::from((Ipv6Addr::UNSPECIFIED, port)), true) {
                Ok(s) => (s, true),
                Err(_) => (
                    bind_socket(SocketAddr::from(([0, 0, 0, 0], port)), false)?,
                    false,
                ),
            };
        let state = UdpSocketState::new((&std_sock).into())?;
        if !offload {
            disable_gro(&std_sock);
        }
        let sock = tokio::net::UdpSocket::from_std(std_sock)?;
        let gso = offload && state.max_gso_segments() > 1;
        Ok(Udp {
            sock,
            state,
            dual_stack,
            gso,
        })
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.sock.local_addr()
    }

    /// How many segments one send may carry (1 without GSO).
    pub fn max_segments(&self) -> usize {
        if self.gso {
            self.state.max_gso_segments()
        } else {
            1
        }
    }

    /// How many datagrams one receive buffer may hold after GRO.
    pub fn gro_segments(&self) -> usize {
        self.state.gro_segments()
    }

    /// Sends `contents` to `to`; with `segment` set, as GSO segments of that
    /// size. Falls back to one datagram per segment if the kernel refuses.
    pub async fn send(
        &self,
        to: SocketAddr,
        contents: &[u8],
        segment: Option<usize>,
    ) -> io::Result<()> {
        let destination = self.map_addr(to);
        let t = Transmit {
            destination,
            ecn: None,
            contents,
            segment_size: segment,
            src_ip: None,
        };
        let res = self
            .sock
            .async_io(Interest::WRITABLE, || {
                self.state.try_send((&self.sock).into(), &t)
            })
            .await;
        match (res, segment) {
            (Err(e), Some(seg))
                if e.raw_os_error() == Some(libc::EIO)
                    || e.raw_os_error() == Some(libc::EINVAL) =>
            {
                for chunk in contents.chunks(seg) {
                    self.send_one(destination, chunk).await?;
                }
                Ok(())
            }
            (r, _) => r,
        }
    }

    async fn send_one(&self, destination: SocketAddr, contents: &[u8]) -> io::Result<()> {
        let t = Transmit {
            destination,
            ecn: None,
            contents,
            segment_size: None,
            src_ip: None,
        };
        self.sock
            .async_io(Interest::WRITABLE, || {
                self.state.try_send((&self.sock).into(), &t)
            })
            .await
    }

    /// Receives a batch. Each `meta[i]` describes `bufs[i]`: `len` bytes made
    /// of datagrams of `stride` bytes (the last may be shorter). Source
    /// addresses come back in canonical form (IPv4, not v4-mapped IPv6).
    pub async fn recv(
        &self,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> io::Result<usize> {
        let n = self
            .sock
            .async_io(Interest::READABLE, || {
                self.state.recv((&self.sock).into(), bufs, meta)
            })
            .await?;
        for m in &mut meta[..n] {
            m.addr = canonical(m.addr);
        }
        Ok(n)
    }

    fn map_addr(&self, to: SocketAddr) -> SocketAddr {
        match to {
            SocketAddr::V4(v4) if self.dual_stack => {
                SocketAddr::from((v4.ip().to_ipv6_mapped(), v4.port()))
            }
            other => other,
        }
    }
}

pub fn canonical(a: SocketAddr) -> SocketAddr {
    SocketAddr::from((a.ip().to_canonical(), a.port()))
}

fn bind_socket(addr: SocketAddr, v6: bool) -> io::Result<std::net::UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let domain = if v6 { Domain::IPV6 } else { Domain::IPV4 };
    let s = Socket::new(domain, Type::DGRAM, Some(Protocol::UDP))?;
    if v6 {
        s.set_only_v6(false)?;
    }
    // Large buffers absorb bursts of GSO super-packets and of small packets
    // while a packet task is descheduled. The plain options are capped at
    // rmem_max/wmem_max (208 KB on a stock kernel); the agent holds
    // CAP_NET_ADMIN, which lets the FORCE variants pass the cap, as
    // wireguard-go does. Without the capability, the capped size is fine.
    if !force_buffer_size(&s, libc::SO_RCVBUFFORCE, SOCKET_BUFFER) {
        let _ = s.set_recv_buffer_size(SOCKET_BUFFER);
    }
    if !force_buffer_size(&s, libc::SO_SNDBUFFORCE, SOCKET_BUFFER) {
        let _ = s.set_send_buffer_size(SOCKET_BUFFER);
    }
    crate::sockmark::apply(&s);
    s.set_nonblocking(true)?;
    s.bind(&addr.into())?;
    Ok(s.into())
}

/// Socket buffer size asked for in each direction.
const SOCKET_BUFFER: usize = 8 << 20;

/// Sets a buffer size with `SO_RCVBUFFORCE`/`SO_SNDBUFFORCE`; false when
/// the kernel refuses (no CAP_NET_ADMIN).
fn force_buffer_size(sock: &socket2::Socket, option: libc::c_int, size: usize) -> bool {
    use std::os::fd::AsRawFd;
    let value = libc::c_int::try_from(size).unwrap_or(libc::c_int::MAX);
    // SAFETY: valid fd owned by `sock`; the option value is a c_int that
    // lives across the call.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            option,
            &value as *const _ as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    rc == 0
}

fn disable_gro(sock: &std::net::UdpSocket) {
    use std::os::fd::AsRawFd;
    let off: libc::c_int = 0;
    // SAFETY: valid fd owned by `sock`, option value is a c_int that lives
    // across the call. Failure only means GRO stays as it was.
    unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_UDP,
            libc::UDP_GRO,
            &off as *const _ as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
}

/// Sealed packets waiting to be sent, laid out back to back.
///
/// Consecutive packets to the same destination form a run; a run whose
/// packets all have one size (the last may be smaller) goes out as a single
/// GSO send. The buffer is allocated once; nothing allocates per packet.
pub struct TxBatch {
    buf: Vec<u8>,
    pos: usize,
    slot: usize,
    runs: Vec<Run>,
    max_segments: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Run {
    pub to: SocketAddr,
    pub start: usize,
    pub end: usize,
    pub segment: usize,
    pub count: usize,
    closed: bool,
}

/// The largest UDP payload one GSO send may carry.
const GSO_MAX_BYTES: usize = 65_000;

impl TxBatch {
    /// `slot` is the most bytes one sealed packet may take; `packets` how
    /// many fit before a flush is needed.
    pub fn new(slot: usize, packets: usize, max_segments: usize) -> TxBatch {
        TxBatch {
            buf: vec![0; slot * packets],
            pos: 0,
            slot,
            runs: Vec::with_capacity(packets),
            max_segments: max_segments.max(1),
        }
    }

    /// Room for the next packet; `None` when the batch must be flushed first.
    pub fn slot(&mut self) -> Option<&mut [u8]> {
        let end = self.pos + self.slot;
        self.buf.get_mut(self.pos..end)
    }

    /// Records that `len` bytes were written at the start of the last slot.
    pub fn commit(&mut self, len: usize, to: SocketAddr) {
        let start = self.pos;
        self.pos += len;
        if let Some(run) = self.runs.last_mut() {
            let fits = run.to == to
                && !run.closed
                && len <= run.segment
                && run.count < self.max_segments
                && run.end - run.start + len <= GSO_MAX_BYTES
                && run.end == start;
            if fits {
                run.end = self.pos;
                run.count += 1;
                run.closed = len < run.segment;
                return;
            }
        }
        self.runs.push(Run {
            to,
            start,
            end: self.pos,
            segment: len,
            count: 1,
            closed: false,
        });
    }

    pub fn is_empty(&self) -> bool {
        self.runs.is_empty()
    }

    pub fn runs(&self) -> impl Iterator<Item = (Run, &[u8])> {
        self.runs.iter().map(|r| (*r, &self.buf[r.start..r.end]))
    }

    pub fn clear(&mut self) {
        self.pos = 0;
        self.runs.clear();
    }

    /// Sends every run and empties the batch. Errors are counted by the
    /// caller; one failed send does not stop the others.
    pub async fn flush(&mut self, udp: &Udp) -> usize {
        let mut failed = 0;
        for r in &self.runs {
            let seg = (r.count > 1).then_some(r.segment);
            if udp
                .send(r.to, &self.buf[r.start..r.end], seg)
                .await
                .is_err()
            {
                failed += 1;
            }
        }
        self.clear();
        failed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fill(b: &mut TxBatch, len: usize, to: &str) {
        let s = b.slot().unwrap();
        s[..len].fill(len as u8);
        b.commit(len, to.parse().unwrap());
    }

    #[test]
    fn equal_sizes_to_one_peer_form_one_run() {
        let mut b = TxBatch::new(1500, 64, 64);
        for _ in 0..10 {
            fill(&mut b, 1452, "1.1.1.1:1");
        }
        fill(&mut b, 100, "1.1.1.1:1"); // the short tail closes the run
        fill(&mut b, 1452, "1.1.1.1:1");
        let runs: Vec<Run> = b.runs().map(|(r, _)| r).collect();
        assert_eq!(runs.len(), 2);
        assert_eq!((runs[0].count, runs[0].segment), (11, 1452));
        assert_eq!(runs[0].end - runs[0].start, 10 * 1452 + 100);
        assert_eq!(runs[1].count, 1);
    }

    #[test]
    fn destination_or_growth_splits_runs_and_limits_hold() {
        let mut b = TxBatch::new(1500, 128, 4);
        fill(&mut b, 500, "1.1.1.1:1");
        fill(&mut b, 600, "1.1.1.1:1"); // larger than the segment: new run
        fill(&mut b, 600, "2.2.2.2:2"); // other peer: new run
        for _ in 0..6 {
            fill(&mut b, 600, "2.2.2.2:2");
        }
        let counts: Vec<usize> = b.runs().map(|(r, _)| r.count).collect();
        assert_eq!(counts, vec![1, 1, 4, 3]);
        let total: usize = b.runs().map(|(_, d)| d.len()).sum();
        assert_eq!(total, 500 + 600 * 8);
        b.clear();
        assert!(b.is_empty());
    }

    #[test]
    fn slot_runs_out_when_full() {
        let mut b = TxBatch::new(100, 2, 64);
        fill(&mut b, 100, "1.1.1.1:1");
        fill(&mut b, 100, "1.1.1.1:1");
        assert!(b.slot().is_none());
    }
}
