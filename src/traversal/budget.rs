//! The node's budget of UDP datagrams per destination IP, over all peers.
//!
//! Each peer machine bounds its own probing (rounds, the birthday run's
//! count, rate and time), but a node with many peers could still be made
//! to spray one address many times over: a dozen joined nodes that all
//! claim a random-port NAT at a third party's address would each start a
//! birthday run toward it (README, "Security model"). The node therefore
//! counts what it sends to each IP per second and drops what is past
//! [`MAX_UDP_PER_IP_PER_SEC`]: one birthday run and the pings beside it
//! fit, a multiple of it does not. Sans-IO: the time comes in.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

/// Disco datagrams the node sends to one IP address in a second.
pub const MAX_UDP_PER_IP_PER_SEC: u32 = 1_200;

#[derive(Debug, Default)]
pub(super) struct IpBudget {
    /// Datagrams per destination IP since `window` began.
    sent: HashMap<IpAddr, u32>,
    window: Option<Instant>,
}

impl IpBudget {
    /// Counts one datagram to `ip` at `now`; `false` (and nothing
    /// counted) when that IP's second is used up.
    pub fn take(&mut self, now: Instant, ip: IpAddr) -> bool {
        if self
            .window
            .is_none_or(|w| now.saturating_duration_since(w) >= Duration::from_secs(1))
        {
            self.window = Some(now);
            self.sent.clear();
        }
        let n = self.sent.entry(ip).or_default();
        if *n >= MAX_UDP_PER_IP_PER_SEC {
            return false;
        }
        *n += 1;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_ip_gets_its_second_and_no_more() {
        let mut b = IpBudget::default();
        let t0 = Instant::now();
        let victim: IpAddr = "203.0.113.9".parse().unwrap();
        let sent = (0..5_000).filter(|_| b.take(t0, victim)).count();
        assert_eq!(sent as u32, MAX_UDP_PER_IP_PER_SEC);
        assert!(b.take(t0, "203.0.113.10".parse().unwrap()));
        assert!(b.take(t0 + Duration::from_secs(1), victim));
    }
}
