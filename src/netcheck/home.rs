//! Which relay region is this node's home, from netcheck's latencies.
//!
//! The home relay is where peers reach this node while no direct path
//! works, and where its own relayed packets enter. Moving it costs every
//! peer a new route (the coordinator must tell them, the old connection
//! idles out), so it moves only for a clear gain: the nearest region by
//! STUN round trip, but a home that still answered is kept unless the
//! nearest takes under two thirds of its round trip. Two regions a few milliseconds apart
//! would otherwise swap at every netcheck as the round trips jitter. The
//! same rule as Tailscale's netcheck (its preferred DERP); a pure function
//! so the rule has tests (docs/architecture.md, "Endpoint discovery").

use std::time::Duration;

/// The home region after a netcheck: `current` is the present home,
/// `latency` each region's round trip from this run (any order; a region
/// that did not answer is absent).
pub fn choose_home(current: Option<u16>, latency: &[(u16, Duration)]) -> Option<u16> {
    let best = latency.iter().min_by_key(|(id, l)| (*l, *id))?;
    let Some(home) = current else {
        return Some(best.0);
    };
    match latency.iter().find(|(id, _)| *id == home) {
        // Switch only when the nearest is clearly nearer: under two thirds
        // of the home's round trip.
        Some((_, home_rtt)) if best.1 * 3 >= *home_rtt * 2 => Some(home),
        _ => Some(best.0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(v: u64) -> Duration {
        Duration::from_millis(v)
    }

    #[test]
    fn the_first_home_is_the_nearest() {
        assert_eq!(choose_home(None, &[(1, ms(40)), (2, ms(12))]), Some(2));
        assert_eq!(choose_home(None, &[]), None);
        assert_eq!(choose_home(Some(3), &[]), None, "no region answered");
    }

    #[test]
    fn a_home_is_kept_against_a_slightly_nearer_region() {
        // 18 ms against 20 ms: jitter, not a better relay.
        assert_eq!(choose_home(Some(1), &[(1, ms(20)), (2, ms(18))]), Some(1));
        // Exactly two thirds: still kept.
        assert_eq!(choose_home(Some(1), &[(1, ms(30)), (2, ms(20))]), Some(1));
    }

    #[test]
    fn a_home_moves_for_a_clearly_nearer_region_or_when_it_stops_answering() {
        assert_eq!(choose_home(Some(1), &[(1, ms(30)), (2, ms(19))]), Some(2));
        assert_eq!(choose_home(Some(1), &[(2, ms(50))]), Some(2));
    }

    #[test]
    fn ties_go_to_the_lower_region_id() {
        assert_eq!(choose_home(None, &[(5, ms(10)), (4, ms(10))]), Some(4));
    }
}
