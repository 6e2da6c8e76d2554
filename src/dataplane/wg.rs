//! The WireGuard session behind a seam that takes `now`.
//!
//! boringtun's `Tunn` and `RateLimiter` read the clock themselves (rekey,
//! keepalive and handshake-retry timers, session expiry, the cookie
//! secret's rotation). A sans-IO core must be told the time instead, so
//! that the driver, the tests and the simulator decide what time it is
//! (docs/architecture.md, "Sans-IO state machines"). boringtun has no
//! `*_at(now)` calls; what it has is the `mock-instant` feature, which
//! makes every one of its clock reads go to `mock_instant`'s per-thread
//! clock. [`Wg`] sets that clock to the caller's `now` immediately before
//! each call into boringtun, on the same thread and with no `.await` in
//! between, so boringtun sees exactly the time it was given.
//!
//! Two rules keep that safe, because `mock_instant`'s `duration_since`
//! panics when time goes backwards:
//! - one epoch for the process ([`epoch`]): every `now` becomes a
//!   duration since it, so instants from different tasks compare;
//! - per session, time never goes back: a packet task may read its batch's
//!   `now` just before another task's later `now` reaches the same peer,
//!   so each `Wg` keeps the latest time it passed on and never passes an
//!   earlier one; the shared rate limiter ([`Limiter`]) keeps its own
//!   latest time the same way, whichever task calls it.
//!
//! Time asleep counts: boringtun's own clock is `CLOCK_BOOTTIME`, so after
//! a laptop's suspend its sessions are as old as they are (a peer dropped
//! them after 180 s). `Instant` stops while suspended; the driver measures
//! the difference and hands it in ([`set_suspended`]), and every `now`
//! passed to boringtun has it added. The simulator never sets it.
//!
//! Hand-written because no crate wraps boringtun this way; firezone keeps a
//! fork of boringtun with explicit `now` parameters instead, which we do
//! not want to maintain.

use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use boringtun::noise::rate_limiter::RateLimiter;
use boringtun::noise::{Tunn, TunnResult};
use mock_instant::MockClock;

/// The instant every `now` is measured from. Taken as early as the clock
/// allows (up to an hour before the first use), so that instants a caller
/// made shortly before it (a simulator's start) still count forward.
pub fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(|| {
        let now = Instant::now();
        [3600, 600, 60, 1]
            .into_iter()
            .find_map(|s| now.checked_sub(Duration::from_secs(s)))
            .unwrap_or(now)
    })
}

/// Time the host spent suspended since the process started, in
/// nanoseconds, as the driver last measured it.
static SUSPENDED: AtomicU64 = AtomicU64::new(0);

/// The driver's measure of the time the host spent suspended since the
/// process started (`CLOCK_BOOTTIME` minus `Instant` elapsed). It only
/// grows: a smaller value is ignored.
pub fn set_suspended(d: Duration) {
    let nanos = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
    SUSPENDED.fetch_max(nanos, Ordering::Relaxed);
}

/// `now` as boringtun's clock reads it: since the epoch, time asleep
/// included.
fn since_epoch(now: Instant) -> Duration {
    now.saturating_duration_since(epoch()) + Duration::from_nanos(SUSPENDED.load(Ordering::Relaxed))
}

/// Sets this thread's boringtun clock to `now` for the calls that follow
/// on this thread (with no `.await` in between).
fn set_clock(now: Duration) {
    MockClock::set_time(now);
}

/// A WireGuard session whose every call takes the time.
pub struct Wg {
    tunn: Tunn,
    /// The latest time given to `tunn`: never goes back (see the module doc).
    last: Duration,
}

impl Wg {
    /// A new session at `now`.
    pub fn new(
        now: Instant,
        own: x25519_dalek::StaticSecret,
        peer: x25519_dalek::PublicKey,
        psk: Option<[u8; 32]>,
        keepalive: Option<u16>,
        index: u32,
        limiter: Option<Arc<RateLimiter>>,
    ) -> Wg {
        let last = since_epoch(now);
        set_clock(last);
        Wg {
            tunn: Tunn::new(own, peer, psk, keepalive, index, limiter),
            last,
        }
    }

    /// Sets boringtun's clock for the next call: `now`, or the latest time
    /// this session has seen if `now` is earlier.
    fn at(&mut self, now: Instant) {
        let t = since_epoch(now);
        if t > self.last {
            self.last = t;
        }
        set_clock(self.last);
    }

    pub fn encapsulate<'a>(
        &mut self,
        now: Instant,
        src: &[u8],
        dst: &'a mut [u8],
    ) -> TunnResult<'a> {
        self.at(now);
        self.tunn.encapsulate(src, dst)
    }

    pub fn decapsulate<'a>(
        &mut self,
        now: Instant,
        from: Option<IpAddr>,
        datagram: &[u8],
        dst: &'a mut [u8],
    ) -> TunnResult<'a> {
        self.at(now);
        self.tunn.decapsulate(from, datagram, dst)
    }

    pub fn update_timers<'a>(&mut self, now: Instant, dst: &'a mut [u8]) -> TunnResult<'a> {
        self.at(now);
        self.tunn.update_timers(dst)
    }

    /// Time since the last handshake, bytes sent and received.
    pub fn stats(&mut self, now: Instant) -> (Option<Duration>, usize, usize) {
        self.at(now);
        let (last, tx, rx, _, _) = self.tunn.stats();
        (last, tx, rx)
    }
}

/// boringtun's handshake rate limiter, shared by a data plane's sessions,
/// behind the same seam: its clock never goes back, whichever task calls.
pub struct Limiter {
    inner: Arc<RateLimiter>,
    /// The latest time (nanoseconds since the epoch) it was given.
    last: AtomicU64,
}

impl Limiter {
    /// A rate limiter created at `now` (its cookie secret rotates from
    /// then).
    pub fn new(now: Instant, own: &x25519_dalek::PublicKey, limit: u64) -> Limiter {
        let t = since_epoch(now);
        set_clock(t);
        Limiter {
            inner: Arc::new(RateLimiter::new(own, limit)),
            last: AtomicU64::new(u64::try_from(t.as_nanos()).unwrap_or(u64::MAX)),
        }
    }

    /// Sets this thread's clock to `now`, or to the latest time the limiter
    /// has seen if `now` is earlier.
    fn at(&self, now: Instant) {
        let t = u64::try_from(since_epoch(now).as_nanos()).unwrap_or(u64::MAX);
        let latest = self.last.fetch_max(t, Ordering::AcqRel).max(t);
        set_clock(Duration::from_nanos(latest));
    }

    /// Its once-a-second reset, at `now`.
    pub fn reset(&self, now: Instant) {
        self.at(now);
        self.inner.reset_count();
    }

    /// The limiter for a call at `now` (checking a handshake's MACs,
    /// answering with a cookie): the clock is set for the calls that follow
    /// on this thread, with no `.await` in between.
    pub fn at_time(&self, now: Instant) -> &RateLimiter {
        self.at(now);
        &self.inner
    }

    /// The limiter itself, for a session to hold.
    pub fn shared(&self) -> Arc<RateLimiter> {
        self.inner.clone()
    }
}

#[cfg(test)]
#[path = "wg_tests.rs"]
mod tests;
