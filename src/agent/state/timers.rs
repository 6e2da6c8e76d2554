//! The agent state's own deadlines, as kinds of the shared timer table
//! (`crate::timers`; docs/architecture.md, "The agent state"). The
//! sub-machines the state owns (traversal, a netcheck run) keep their own
//! deadlines; the state asks them beside the table.

use crate::timers::{TimerKind, TimerTable};

/// One kind of deadline. The discriminant is the slot in the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Timer {
    /// Once a second while following a network: read the data plane's
    /// counters, close idle relays, refresh the status view, and every
    /// other time compare the host's addresses.
    Housekeeping = 0,
    /// The next periodic netcheck run (or, without a STUN server, the
    /// next publication of the host's candidates).
    Netcheck = 1,
}

impl TimerKind for Timer {
    const ALL: &'static [Timer] = &[Timer::Housekeeping, Timer::Netcheck];
    fn slot(self) -> usize {
        self as usize
    }
}

pub type Timers = TimerTable<Timer, 2>;
