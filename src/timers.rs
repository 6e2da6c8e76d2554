//! A timer table for a sans-IO state machine: one array of deadlines,
//! indexed by a small enum of what each is for (docs/architecture.md,
//! "Sans-IO state machines").
//!
//! A machine that kept each deadline in its own `Option<Instant>` field
//! gathered them into a fresh `Vec` on every `poll_timeout`; a table keeps
//! them in one place, finds the earliest without allocating, and makes
//! "which timers exist" one enum with one `match` on expiry. The path
//! machine (`traversal::timers`) and the agent state (`agent::state::
//! timers`) each declare their enum and use this table. Deadlines that
//! follow from other state (a path's trust window, a netcheck run's) stay
//! with that state and are folded in by the machine's `poll_timeout`:
//! copying them here would be two places to keep in step.

use std::marker::PhantomData;
use std::time::Instant;

/// The kinds of deadline of one machine. `ALL` lists them in slot order:
/// `ALL[k.slot()] == k`.
pub trait TimerKind: Copy + Eq + 'static {
    const ALL: &'static [Self];
    fn slot(self) -> usize;
}

/// One deadline per kind `K`, each set or not; `N` is `K::ALL.len()`.
#[derive(Debug, Clone)]
pub struct TimerTable<K, const N: usize> {
    at: [Option<Instant>; N],
    kind: PhantomData<K>,
}

impl<K: TimerKind, const N: usize> Default for TimerTable<K, N> {
    fn default() -> Self {
        debug_assert_eq!(K::ALL.len(), N, "a timer table sized for its kinds");
        TimerTable {
            at: [None; N],
            kind: PhantomData,
        }
    }
}

impl<K: TimerKind, const N: usize> TimerTable<K, N> {
    pub fn get(&self, k: K) -> Option<Instant> {
        self.at[k.slot()]
    }

    pub fn set(&mut self, k: K, at: Instant) {
        self.at[k.slot()] = Some(at);
    }

    /// Sets `k` unless it is already set.
    pub fn set_if_unset(&mut self, k: K, at: Instant) {
        self.at[k.slot()].get_or_insert(at);
    }

    pub fn clear(&mut self, k: K) {
        self.at[k.slot()] = None;
    }

    pub fn clear_all(&mut self) {
        self.at = [None; N];
    }

    pub fn is_set(&self, k: K) -> bool {
        self.at[k.slot()].is_some()
    }

    /// Whether `k` is set and has come.
    pub fn is_due(&self, k: K, now: Instant) -> bool {
        self.at[k.slot()].is_some_and(|at| now >= at)
    }

    /// The earliest deadline among the kinds `armed` says count now.
    pub fn next_where(&self, armed: impl Fn(K) -> bool) -> Option<(Instant, K)> {
        K::ALL
            .iter()
            .filter(|&&k| armed(k))
            .filter_map(|&k| self.get(k).map(|at| (at, k)))
            .min_by_key(|(at, _)| *at)
    }

    /// The earliest deadline in the table.
    pub fn next(&self) -> Option<Instant> {
        self.at.iter().flatten().min().copied()
    }

    /// Takes the earliest deadline that has come at `now`, clearing it.
    pub fn expired(&mut self, now: Instant) -> Option<K> {
        let (at, k) = self.next_where(|_| true)?;
        if at > now {
            // The earliest has not come: none has.
            return None;
        }
        self.clear(k);
        Some(k)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum T {
        A,
        B,
        C,
    }

    impl TimerKind for T {
        const ALL: &'static [T] = &[T::A, T::B, T::C];
        fn slot(self) -> usize {
            self as usize
        }
    }

    #[test]
    fn expired_deadlines_come_out_earliest_first_and_once() {
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let mut t: TimerTable<T, 3> = TimerTable::default();
        t.set(T::B, t0 + s(3));
        t.set(T::A, t0 + s(1));
        t.set(T::C, t0 + s(9));
        assert_eq!(t.next(), Some(t0 + s(1)));
        assert_eq!(t.expired(t0), None);
        assert_eq!(t.expired(t0 + s(5)), Some(T::A));
        assert_eq!(t.expired(t0 + s(5)), Some(T::B));
        assert_eq!(t.expired(t0 + s(5)), None);
        assert_eq!(t.next(), Some(t0 + s(9)));
        t.clear_all();
        assert_eq!(t.next(), None);
    }

    #[test]
    fn next_where_counts_only_armed_kinds() {
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let mut t: TimerTable<T, 3> = TimerTable::default();
        assert_eq!(t.next_where(|_| true), None);
        t.set(T::B, t0 + s(2));
        t.set(T::C, t0 + s(1));
        assert_eq!(t.next_where(|_| true), Some((t0 + s(1), T::C)));
        assert_eq!(t.next_where(|k| k != T::C), Some((t0 + s(2), T::B)));
        t.set_if_unset(T::B, t0);
        assert_eq!(t.get(T::B), Some(t0 + s(2)));
        assert!(!t.is_due(T::B, t0) && t.is_due(T::B, t0 + s(2)));
        t.clear(T::B);
        assert!(!t.is_set(T::B));
    }
}
