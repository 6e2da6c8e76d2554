//! The resolver's answer cache: forwarded answers kept for their TTL.
//!
//! Bounded ([`MAX_ENTRIES`]): when full, the expired entries go, then the
//! eighth that expires soonest, so a flood of one-off names cannot grow it
//! and costs one scan per many inserts. Time comes in as `now`, as
//! everywhere in the sans-IO core; the cache never reads the clock.
//! Generic over what it keeps, so it is
//! tested without DNS messages.

use std::collections::HashMap;
use std::hash::Hash;
use std::time::{Duration, Instant};

/// Most answers kept.
pub const MAX_ENTRIES: usize = 4096;
/// Longest an answer is kept, whatever its TTL says.
pub const MAX_TTL: Duration = Duration::from_secs(86_400);

#[derive(Debug)]
struct Entry<V> {
    value: V,
    stored: Instant,
    expires: Instant,
}

/// A TTL cache of at most `cap` entries.
#[derive(Debug)]
pub struct Cache<K, V> {
    entries: HashMap<K, Entry<V>>,
    cap: usize,
    pub hits: u64,
    pub misses: u64,
}

impl<K: Eq + Hash + Clone, V> Default for Cache<K, V> {
    fn default() -> Self {
        Cache::with_capacity(MAX_ENTRIES)
    }
}

impl<K: Eq + Hash + Clone, V> Cache<K, V> {
    pub fn with_capacity(cap: usize) -> Self {
        Cache {
            entries: HashMap::new(),
            cap: cap.max(1),
            hits: 0,
            misses: 0,
        }
    }

    /// The value for `key` and how long ago it was stored, if it has not
    /// expired at `now`.
    pub fn get(&mut self, now: Instant, key: &K) -> Option<(&V, Duration)> {
        let fresh = self.entries.get(key).is_some_and(|e| now < e.expires);
        if !fresh {
            self.entries.remove(key);
            self.misses += 1;
            return None;
        }
        self.hits += 1;
        self.entries
            .get(key)
            .map(|e| (&e.value, now.saturating_duration_since(e.stored)))
    }

    /// Keeps `value` for `ttl` (at most [`MAX_TTL`]); a zero TTL keeps
    /// nothing.
    pub fn insert(&mut self, now: Instant, key: K, value: V, ttl: Duration) {
        if ttl.is_zero() {
            return;
        }
        if self.entries.len() >= self.cap && !self.entries.contains_key(&key) {
            self.entries.retain(|_, e| now < e.expires);
            if self.entries.len() >= self.cap {
                // An eighth of the entries at once, those expiring soonest:
                // one scan per many inserts, not one per insert.
                let mut expiries: Vec<Instant> = self.entries.values().map(|e| e.expires).collect();
                let nth = (self.cap / 8).min(expiries.len() - 1);
                let (_, cut, _) = expiries.select_nth_unstable(nth);
                let cut = *cut;
                self.entries.retain(|_, e| e.expires > cut);
            }
        }
        self.entries.insert(
            key,
            Entry {
                value,
                stored: now,
                expires: now + ttl.min(MAX_TTL),
            },
        );
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Forgets everything (the upstreams changed).
    pub fn clear(&mut self) {
        self.entries.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_live_for_their_ttl_and_report_their_age() {
        let t0 = Instant::now();
        let mut c: Cache<&str, u32> = Cache::default();
        c.insert(t0, "a", 1, Duration::from_secs(30));
        c.insert(t0, "zero", 2, Duration::ZERO);
        let (v, age) = c.get(t0 + Duration::from_secs(10), &"a").unwrap();
        assert_eq!((*v, age), (1, Duration::from_secs(10)));
        assert!(c.get(t0 + Duration::from_secs(30), &"a").is_none());
        assert!(c.get(t0, &"zero").is_none());
        assert_eq!((c.hits, c.misses), (1, 2));
        assert!(c.is_empty());
    }

    #[test]
    fn a_full_cache_drops_the_entry_expiring_soonest() {
        let t0 = Instant::now();
        let mut c: Cache<u32, u32> = Cache::with_capacity(3);
        for (k, ttl) in [(1, 100), (2, 10), (3, 50)] {
            c.insert(t0, k, k, Duration::from_secs(ttl));
        }
        c.insert(t0, 4, 4, Duration::from_secs(100));
        assert_eq!(c.len(), 3);
        assert!(c.get(t0, &2).is_none(), "the soonest to expire went");
        assert!(c.get(t0, &1).is_some() && c.get(t0, &3).is_some() && c.get(t0, &4).is_some());
        // A huge TTL is capped.
        c.insert(t0, 5, 5, Duration::from_secs(u64::MAX / 4));
        assert!(c.get(t0 + MAX_TTL, &5).is_none());
    }
}
