//! Dedicated OS threads for the packet loops, and how they wait for work.
//!
//! A ping through the tunnel wakes a packet loop four times per round trip
//! (TUN and UDP, on each side). As tokio tasks, every wake went through the
//! runtime: the driver thread returns from `epoll_wait`, schedules the task,
//! and a worker polls it — often another thread than the one the kernel
//! woke, with the scheduler's delay on a busy machine each time. A thread of
//! its own that sleeps in `poll(2)` on its one descriptor is woken by the
//! kernel directly and goes straight on with the read, as boringtun and
//! wireguard-go do.
//!
//! The loops keep an `async fn run` so the agent still supervises them in
//! its task set: the future starts the thread and waits for its result.
//! Dropping the future (task abort on shutdown) signals the thread through
//! an eventfd that every wait also watches, and joins it, so the device the
//! thread holds is closed before the caller drops its own reference.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

/// Lets a packet thread sleep until its descriptor is ready, or until the
/// agent stops.
pub struct Waiter {
    stop: OwnedFd,
    stopped: AtomicBool,
}

impl Waiter {
    fn new() -> io::Result<Waiter> {
        // SAFETY: plain syscall; the result is checked before use.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Waiter {
            // SAFETY: `fd` is a fresh descriptor that nothing else owns.
            stop: unsafe { OwnedFd::from_raw_fd(fd) },
            stopped: AtomicBool::new(false),
        })
    }

    fn signal(&self) {
        self.stopped.store(true, Ordering::Release);
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a live u64 to our own eventfd. A
        // failure (counter overflow) still leaves it readable.
        unsafe {
            libc::write(
                self.stop.as_raw_fd(),
                &one as *const u64 as *const libc::c_void,
                std::mem::size_of::<u64>(),
            );
        }
    }

    /// True once the agent asked the thread to stop.
    pub fn stopped(&self) -> bool {
        self.stopped.load(Ordering::Acquire)
    }

    /// Blocks until `fd` is readable (or in error), or the thread must stop.
    pub fn readable(&self, fd: RawFd) -> io::Result<()> {
        self.wait(fd, libc::POLLIN)
    }

    fn wait(&self, fd: RawFd, events: libc::c_short) -> io::Result<()> {
        let mut fds = [
            libc::pollfd {
                fd,
                events,
                revents: 0,
            },
            libc::pollfd {
                fd: self.stop.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        loop {
            // SAFETY: `fds` is a live array of two pollfd.
            let rc = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
            if rc >= 0 {
                return Ok(());
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }
}

/// Waits up to `timeout_ms` for `fd` to accept `events`; used when a send
/// finds the socket buffer full, which is brief or means packets are lost
/// anyway.
pub fn wait_fd(fd: RawFd, events: libc::c_short, timeout_ms: libc::c_int) -> bool {
    let mut p = libc::pollfd {
        fd,
        events,
        revents: 0,
    };
    // SAFETY: one live pollfd.
    unsafe { libc::poll(&mut p, 1, timeout_ms) > 0 }
}

/// Runs `f` on a thread of its own named `name`, and waits for its result.
pub async fn run_on_thread<F>(name: &str, f: F) -> io::Result<()>
where
    F: FnOnce(&Waiter) -> io::Result<()> + Send + 'static,
{
    let waiter = Arc::new(Waiter::new()?);
    let (tx, rx) = tokio::sync::oneshot::channel();
    let span = tracing::Span::current();
    let w = waiter.clone();
    let handle = std::thread::Builder::new()
        .name(name.to_owned())
        .spawn(move || {
            let _entered = span.enter();
            let _ = tx.send(f(&w));
        })?;
    let _guard = JoinOnDrop {
        waiter,
        handle: Some(handle),
    };
    rx.await
        .unwrap_or_else(|_| Err(io::Error::other("packet thread panicked")))
}

/// Stops and joins the thread when the waiting future goes away.
struct JoinOnDrop {
    waiter: Arc<Waiter>,
    handle: Option<JoinHandle<()>>,
}

impl Drop for JoinOnDrop {
    fn drop(&mut self) {
        self.waiter.signal();
        if let Some(h) = self.handle.take() {
            // Every wait in the thread also watches the stop eventfd, so
            // this returns as soon as the current batch is done.
            let _ = h.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn dropping_the_future_stops_a_waiting_thread() {
        let (a, _b) = std::os::unix::net::UnixDatagram::pair().unwrap();
        let fd = a.as_raw_fd();
        let run = run_on_thread("test-hot", move |w| {
            let _keep = &a;
            while !w.stopped() {
                w.readable(fd)?;
            }
            Ok(())
        });
        let timed = tokio::time::timeout(std::time::Duration::from_millis(50), run).await;
        assert!(timed.is_err(), "the thread waits while nothing arrives");
        // The timeout dropped the future, which joined the thread: getting
        // here at all is the test.
    }

    #[tokio::test]
    async fn the_thread_result_comes_back() {
        let r = run_on_thread("test-hot", |_| Err(io::Error::other("boom"))).await;
        assert_eq!(r.unwrap_err().to_string(), "boom");
    }
}
