//! The timer table of one peer's path machine: one array of deadlines,
//! indexed by what each is for.
//!
//! The machine used to keep each deadline in its own `Option<Instant>`
//! field and gather them into a fresh `Vec` on every `poll_timeout`; a
//! table keeps them in one place, lets `poll_timeout` find the earliest
//! without allocating, and makes "which timers exist" one enum. Deadlines
//! that follow from other state (a path's trust window, a TCP attempt, a
//! birthday run) stay with that state and are folded in by the machine's
//! `poll_timeout`: copying them here would be two places to keep in step.

use std::time::Instant;

use super::TimerReason;

/// The deadlines the path machine sets itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Timer {
    /// The next discovery round (only while on the relay).
    Probe = 0,
    /// The next heartbeat or keepalive on the current direct path.
    Heartbeat = 1,
    /// The next look for a better path than the current direct one.
    Reprobe = 2,
}

impl Timer {
    const ALL: [Timer; 3] = [Timer::Probe, Timer::Heartbeat, Timer::Reprobe];

    fn reason(self) -> TimerReason {
        match self {
            Timer::Probe => TimerReason::Probe,
            Timer::Heartbeat => TimerReason::Heartbeat,
            Timer::Reprobe => TimerReason::Reprobe,
        }
    }
}

/// One deadline per [`Timer`], each set or not.
#[derive(Debug, Clone, Default)]
pub(super) struct Timers {
    at: [Option<Instant>; Timer::ALL.len()],
}

impl Timers {
    pub fn get(&self, t: Timer) -> Option<Instant> {
        self.at[t as usize]
    }

    pub fn set(&mut self, t: Timer, at: Instant) {
        self.at[t as usize] = Some(at);
    }

    /// Sets `t` unless it is already set.
    pub fn set_if_unset(&mut self, t: Timer, at: Instant) {
        self.at[t as usize].get_or_insert(at);
    }

    pub fn clear(&mut self, t: Timer) {
        self.at[t as usize] = None;
    }

    pub fn is_set(&self, t: Timer) -> bool {
        self.at[t as usize].is_some()
    }

    /// Whether `t` is set and has come.
    pub fn is_due(&self, t: Timer, now: Instant) -> bool {
        self.at[t as usize].is_some_and(|at| now >= at)
    }

    /// The earliest of the timers `armed` says count now, with its reason.
    pub fn next(&self, armed: impl Fn(Timer) -> bool) -> Option<(Instant, TimerReason)> {
        Timer::ALL
            .into_iter()
            .filter(|&t| armed(t))
            .filter_map(|t| self.get(t).map(|at| (at, t.reason())))
            .min_by_key(|(at, _)| *at)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn next_is_the_earliest_armed_timer() {
        let now = Instant::now();
        let mut t = Timers::default();
        assert_eq!(t.next(|_| true), None);
        t.set(Timer::Heartbeat, now + Duration::from_secs(2));
        t.set(Timer::Reprobe, now + Duration::from_secs(1));
        assert_eq!(
            t.next(|_| true),
            Some((now + Duration::from_secs(1), TimerReason::Reprobe))
        );
        assert_eq!(
            t.next(|k| k != Timer::Reprobe),
            Some((now + Duration::from_secs(2), TimerReason::Heartbeat))
        );
        t.set_if_unset(Timer::Heartbeat, now);
        assert_eq!(t.get(Timer::Heartbeat), Some(now + Duration::from_secs(2)));
        assert!(!t.is_due(Timer::Heartbeat, now));
        assert!(t.is_due(Timer::Heartbeat, now + Duration::from_secs(2)));
        t.clear(Timer::Heartbeat);
        assert!(!t.is_set(Timer::Heartbeat));
    }
}
