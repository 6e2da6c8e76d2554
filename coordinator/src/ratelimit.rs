//! Per-source-IP limits: how the servers bound what one address can make
//! them do. Two kinds, one of each for every use:
//!
//! - [`RateLimiter`], token buckets for things per second (STUN answers,
//!   API requests that fail authentication or name an unknown key).
//!   Sans-IO: the caller passes the time. The table is bounded to
//!   [`MAX_TRACKED_IPS`] entries; past that it starts over, which gives
//!   each address at most one more burst (an attacker spraying many
//!   sources gains nothing per source).
//! - [`IpSlots`], places held at once (open connections, map streams,
//!   relay handshakes): an [`IpSlot`] gives its place back when dropped,
//!   also when the task holding it is cancelled. Entries exist only while
//!   held, so the table is bounded by what is held.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// Source IPs tracked at once.
pub const MAX_TRACKED_IPS: usize = 65_536;

#[derive(Debug)]
pub struct RateLimiter {
    rate: f64,
    burst: f64,
    buckets: HashMap<IpAddr, (f64, Instant)>,
}

impl RateLimiter {
    /// `rate` tokens a second, at most `burst` saved up, per source IP.
    pub fn new(rate: f64, burst: f64) -> Self {
        RateLimiter {
            rate,
            burst,
            buckets: HashMap::new(),
        }
    }

    /// Refills `ip`'s bucket to `now` and returns its tokens.
    fn refill(&mut self, ip: IpAddr, now: Instant) -> &mut f64 {
        if self.buckets.len() >= MAX_TRACKED_IPS && !self.buckets.contains_key(&ip) {
            self.buckets.clear();
        }
        let (rate, burst) = (self.rate, self.burst);
        let (tokens, last) = self.buckets.entry(ip).or_insert((burst, now));
        *tokens = (*tokens + now.saturating_duration_since(*last).as_secs_f64() * rate).min(burst);
        *last = now;
        tokens
    }

    /// Whether `ip` may do one more at `now`; takes a token if so.
    pub fn allow(&mut self, ip: IpAddr, now: Instant) -> bool {
        let tokens = self.refill(ip, now);
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Whether `ip` has a token left at `now`, without taking it: for
    /// budgets charged only when something fails ([`RateLimiter::charge`]).
    pub fn has_budget(&mut self, ip: IpAddr, now: Instant) -> bool {
        *self.refill(ip, now) >= 1.0
    }

    /// Takes one token from `ip`, down to zero.
    pub fn charge(&mut self, ip: IpAddr, now: Instant) {
        let tokens = self.refill(ip, now);
        *tokens = (*tokens - 1.0).max(0.0);
    }
}

/// At most `max` places held at once per source IP.
#[derive(Debug, Clone)]
pub struct IpSlots {
    max: usize,
    held: Arc<Mutex<HashMap<IpAddr, usize>>>,
}

/// One place of an [`IpSlots`], given back on drop.
#[derive(Debug)]
pub struct IpSlot {
    slots: IpSlots,
    ip: IpAddr,
}

impl IpSlots {
    pub fn new(max: usize) -> Self {
        IpSlots {
            max,
            held: Arc::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<IpAddr, usize>> {
        // Single map updates: a poisoned lock still guards usable counts.
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A place for `ip`, or `None` when it holds `max` already.
    pub fn take(&self, ip: IpAddr) -> Option<IpSlot> {
        let mut held = self.lock();
        let n = held.entry(ip).or_default();
        if *n >= self.max {
            if *n == 0 {
                held.remove(&ip);
            }
            return None;
        }
        *n += 1;
        Some(IpSlot {
            slots: self.clone(),
            ip,
        })
    }

    /// How many addresses hold a place now.
    pub fn addresses(&self) -> usize {
        self.lock().len()
    }
}

impl Drop for IpSlot {
    fn drop(&mut self) {
        let mut held = self.slots.lock();
        if let Some(n) = held.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                held.remove(&self.ip);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn slots_are_per_address_and_come_back_on_drop() {
        let slots = IpSlots::new(2);
        let (a, b): (IpAddr, IpAddr) = ("192.0.2.1".parse().unwrap(), "192.0.2.2".parse().unwrap());
        let held: Vec<IpSlot> = (0..2).map(|_| slots.take(a).unwrap()).collect();
        assert!(slots.take(a).is_none());
        assert!(slots.take(b).is_some(), "another address is not affected");
        drop(held);
        assert_eq!(
            slots.addresses(),
            0,
            "nothing is kept for an address holding nothing"
        );
        assert!(slots.take(a).is_some());
    }

    #[test]
    fn a_burst_then_the_rate() {
        let mut l = RateLimiter::new(10.0, 20.0);
        let t0 = Instant::now();
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        assert_eq!((0..100).filter(|_| l.allow(ip, t0)).count(), 20);
        let t1 = t0 + Duration::from_secs(1);
        assert_eq!((0..100).filter(|_| l.allow(ip, t1)).count(), 10);
        assert!(l.allow("192.0.2.2".parse().unwrap(), t1));
    }

    #[test]
    fn a_budget_is_spent_only_by_charges() {
        let mut l = RateLimiter::new(1.0, 2.0);
        let t0 = Instant::now();
        let ip: IpAddr = "192.0.2.3".parse().unwrap();
        for _ in 0..10 {
            assert!(l.has_budget(ip, t0), "looking costs nothing");
        }
        l.charge(ip, t0);
        l.charge(ip, t0);
        assert!(!l.has_budget(ip, t0));
        assert!(l.has_budget(ip, t0 + Duration::from_secs(1)));
    }
}
