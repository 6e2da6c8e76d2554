//! The deadlines the path machine sets itself, as kinds of the shared
//! timer table (`crate::timers`). Deadlines that follow from other state (a
//! path's trust window, a TCP attempt, a birthday run) stay with that state
//! and are folded in by the machine's `poll_timeout`.

use super::TimerReason;
use crate::timers::{TimerKind, TimerTable};

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

impl TimerKind for Timer {
    const ALL: &'static [Timer] = &[Timer::Probe, Timer::Heartbeat, Timer::Reprobe];
    fn slot(self) -> usize {
        self as usize
    }
}

impl Timer {
    pub(super) fn reason(self) -> TimerReason {
        match self {
            Timer::Probe => TimerReason::Probe,
            Timer::Heartbeat => TimerReason::Heartbeat,
            Timer::Reprobe => TimerReason::Reprobe,
        }
    }
}

pub(super) type Timers = TimerTable<Timer, 3>;
