//! Busy-polling before a runtime worker parks, while packets are flowing.
//!
//! A ping through the tunnel wakes the agent four times per round trip (the
//! request from the TUN, its answer from UDP on the other side, the answer
//! to the TUN there, the answer from UDP here; docs/architecture.md, "The
//! packet path"). On a virtual machine a wake of a parked thread is not a
//! context switch but a halted vCPU the host has to schedule again, tens
//! of microseconds each, and that, not the crypto, was most of the
//! latency the tunnel added (issue #19: 0.24 ms added against 0.05 ms for
//! the plain link).
//!
//! So a worker that is about to park shortly after a packet went through
//! (within [`set_window`]'s window, 200 µs by default: a LAN round trip)
//! first spins, asking the kernel with a zero-timeout `poll(2)` whether the
//! TUN device or the UDP socket has something, and yielding between polls
//! so that anything else runnable on its CPU runs. As soon as one is ready
//! it returns and tokio parks. When this worker is the one that takes
//! tokio's I/O driver, its `epoll_wait` returns at once with the event and
//! it reads the answer itself; when the other worker already waits in
//! `epoll_wait`, that one is woken, but on a CPU the spin kept out of its
//! idle state less often than not (measured, not derived: added round-trip
//! latency 0.19 → 0.13 ms and thread wakes per ping 2.8 → 2.3 in
//! `tests/bench/throughput.sh`, throughput unchanged). Past the window it
//! parks as before, so an idle agent spins for nothing and a busy one never
//! parks anyway.
//!
//! One worker spins at a time (the others park at once): one running
//! thread is enough, and two would take both of a small machine's cores.
//! The hook is tokio's `on_thread_park`; it cannot run tasks, which is why
//! it only watches the descriptors and lets the runtime do the reading.
//! While it spins, timers and descriptors it does not watch (relay and
//! control connections) wait for it: at most the window, which the config
//! caps at 1 ms.
//!
//! Hand-written: no crate adds a busy-poll phase to tokio's scheduler
//! (the kernel's `SO_BUSY_POLL` polls a NIC's queue, not a TUN device).

use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::Instant;

use parking_lot::Mutex;

/// The default window: a round trip to a peer on the same LAN.
pub const DEFAULT_WINDOW_US: u64 = 200;

/// Nanoseconds since [`origin`] of the last packet batch, 0 for never.
static LAST: AtomicU64 = AtomicU64::new(0);
/// The window in nanoseconds; 0 turns spinning off.
static WINDOW: AtomicU64 = AtomicU64::new(DEFAULT_WINDOW_US * 1_000);
/// Set while one worker spins.
static SPINNING: AtomicBool = AtomicBool::new(false);
/// The most descriptors watched: the TUN queues (up to 4) and the UDP
/// socket.
const MAX_FDS: usize = 8;

/// The descriptors whose readiness ends a spin: the TUN queues and the
/// UDP socket that carry packets.
static FDS: Mutex<Vec<RawFd>> = Mutex::new(Vec::new());

fn origin() -> Instant {
    static ORIGIN: OnceLock<Instant> = OnceLock::new();
    *ORIGIN.get_or_init(Instant::now)
}

fn nanos(at: Instant) -> u64 {
    u64::try_from(at.saturating_duration_since(origin()).as_nanos())
        .unwrap_or(u64::MAX)
        .max(1)
}

/// Sets how long after the last packet a parking worker spins; zero turns
/// it off (`[agent] busy_poll_us`).
pub fn set_window(us: u64) {
    WINDOW.store(us.saturating_mul(1_000), Ordering::Relaxed);
}

/// Watches `fd` (a TUN queue or a UDP socket) for the spin's end; it must
/// stay open while the agent runs. Called once per descriptor at start.
pub fn watch(fd: RawFd) {
    let mut fds = FDS.lock();
    if !fds.contains(&fd) && fds.len() < MAX_FDS {
        fds.push(fd);
    }
}

/// Stops watching every descriptor (the agent is stopping and closes them).
pub fn unwatch_all() {
    FDS.lock().clear();
}

/// Notes that a batch of packets went through at `now`.
pub fn activity(now: Instant) {
    LAST.store(nanos(now), Ordering::Relaxed);
}

/// tokio's `on_thread_park` hook: spins while the last packet is recent and
/// no watched descriptor is ready (see the module doc).
pub fn on_park() {
    let window = WINDOW.load(Ordering::Relaxed);
    let last = LAST.load(Ordering::Relaxed);
    if window == 0 || last == 0 {
        return;
    }
    if nanos(Instant::now()).saturating_sub(last) >= window {
        return;
    }
    if SPINNING.swap(true, Ordering::Acquire) {
        return;
    }
    // On the stack: this runs at every park within the window.
    let mut polls = [libc::pollfd {
        fd: -1,
        events: libc::POLLIN,
        revents: 0,
    }; MAX_FDS];
    let n = {
        let fds = FDS.lock();
        for (p, &fd) in polls.iter_mut().zip(fds.iter()) {
            p.fd = fd;
        }
        fds.len().min(MAX_FDS)
    };
    // Nothing watched (not started yet, or stopped): nothing to wait for.
    if n > 0 {
        loop {
            // SAFETY: `polls` is a live array of at least `n` pollfd
            // entries; a zero timeout never blocks. A descriptor closed
            // meanwhile only reports POLLNVAL, which ends the spin like
            // readiness does.
            let ready = unsafe { libc::poll(polls.as_mut_ptr(), n as libc::nfds_t, 0) };
            if ready != 0 {
                break;
            }
            let since = nanos(Instant::now()).saturating_sub(LAST.load(Ordering::Relaxed));
            if since >= window {
                break;
            }
            std::thread::yield_now();
        }
    }
    SPINNING.store(false, Ordering::Release);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ready_descriptor_ends_the_spin_and_an_old_packet_skips_it() {
        let (a, b) = std::os::unix::net::UnixDatagram::pair().unwrap();
        use std::os::fd::AsRawFd;
        watch(b.as_raw_fd());
        // A window far longer than the test may take: only readiness can
        // end this spin.
        set_window(60_000_000);
        a.send(b"x").unwrap();
        activity(Instant::now());
        let t = Instant::now();
        on_park();
        assert!(t.elapsed().as_secs() < 30, "readiness ended the spin");
        // No packet within the window: parks at once, though nothing is
        // ready.
        let mut buf = [0u8; 4];
        b.recv(&mut buf).unwrap();
        set_window(1);
        activity(Instant::now());
        let t = Instant::now();
        on_park();
        assert!(t.elapsed().as_millis() < 1_000);
        unwatch_all();
        set_window(DEFAULT_WINDOW_US);
    }
}
