//! The agent state's own deadlines, as one table (docs/architecture.md,
//! "The agent state").
//!
//! Every deadline the state keeps for itself is a slot in one array,
//! indexed by [`Timer`]: `poll_timeout` is one scan of a fixed-size array
//! (no allocation), and `handle_timeout` takes every expired slot and runs
//! one `match` on its kind. The sub-machines the state owns (traversal,
//! a netcheck run) keep their own deadlines; the state asks them beside
//! the table.

use std::time::Instant;

/// One kind of deadline. The discriminant is the slot in the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(usize)]
pub enum Timer {
    /// Once a second while following a network: read the data plane's
    /// counters, close idle relays, refresh the status view, and every
    /// other time compare the host's addresses.
    Housekeeping,
    /// The next periodic netcheck run.
    Netcheck,
    /// The earliest `warren ping` round that must be answered.
    Ping,
}

impl Timer {
    pub const ALL: [Timer; 3] = [Timer::Housekeeping, Timer::Netcheck, Timer::Ping];
}

/// See the module doc.
#[derive(Debug, Clone, Default)]
pub struct Timers {
    slots: [Option<Instant>; Timer::ALL.len()],
}

impl Timers {
    pub fn set(&mut self, timer: Timer, at: Instant) {
        self.slots[timer as usize] = Some(at);
    }

    pub fn stop(&mut self, timer: Timer) {
        self.slots[timer as usize] = None;
    }

    pub fn get(&self, timer: Timer) -> Option<Instant> {
        self.slots[timer as usize]
    }

    /// The earliest deadline in the table.
    pub fn next(&self) -> Option<Instant> {
        self.slots.iter().flatten().min().copied()
    }

    /// Takes the earliest slot that has expired at `now`, clearing it.
    pub fn expired(&mut self, now: Instant) -> Option<Timer> {
        let (i, _) = self
            .slots
            .iter()
            .enumerate()
            .filter_map(|(i, t)| t.filter(|t| *t <= now).map(|t| (i, t)))
            .min_by_key(|(_, t)| *t)?;
        self.slots[i] = None;
        Some(Timer::ALL[i])
    }

    pub fn clear(&mut self) {
        self.slots = Default::default();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn expired_slots_come_out_earliest_first_and_once() {
        let t0 = Instant::now();
        let mut t = Timers::default();
        t.set(Timer::Netcheck, t0 + Duration::from_secs(3));
        t.set(Timer::Housekeeping, t0 + Duration::from_secs(1));
        t.set(Timer::Ping, t0 + Duration::from_secs(9));
        assert_eq!(t.next(), Some(t0 + Duration::from_secs(1)));
        assert_eq!(t.expired(t0), None);
        let now = t0 + Duration::from_secs(5);
        assert_eq!(t.expired(now), Some(Timer::Housekeeping));
        assert_eq!(t.expired(now), Some(Timer::Netcheck));
        assert_eq!(t.expired(now), None);
        assert_eq!(t.next(), Some(t0 + Duration::from_secs(9)));
        t.stop(Timer::Ping);
        assert_eq!(t.next(), None);
    }

    #[test]
    fn setting_a_slot_again_moves_it() {
        let t0 = Instant::now();
        let mut t = Timers::default();
        t.set(Timer::Netcheck, t0);
        t.set(Timer::Netcheck, t0 + Duration::from_secs(2));
        assert_eq!(t.expired(t0 + Duration::from_secs(1)), None);
        assert_eq!(t.get(Timer::Netcheck), Some(t0 + Duration::from_secs(2)));
    }
}
