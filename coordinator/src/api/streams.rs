//! Who holds which map streams, and the caps on them.
//!
//! A map stream is the most expensive thing a client can ask for: a task,
//! a hub subscription, and a full map written to it now and then. So that
//! one joined node cannot open thousands and never read (issue 15), each
//! node key may hold [`MAX_PER_NODE`] at once, the newest winning: opening
//! one more ends the oldest, which is also what an agent that reconnects
//! before its old connection died wants. Each source address may hold
//! [`MAX_PER_ADDRESS`] (many agents can share one NAT), checked before any
//! database work. What each stream queues is bounded elsewhere: eight
//! writes in its body channel, one pending entry per peer in its outbox.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use tokio::sync::oneshot;
use warren::control::ErrorCode;

use super::ApiError;
use crate::ratelimit::{IpSlot, IpSlots};

/// Map streams one node key may hold at once.
pub const MAX_PER_NODE: usize = 4;
/// Map streams one source address may hold at once.
pub const MAX_PER_ADDRESS: usize = 1024;

#[derive(Default)]
struct Inner {
    next_id: u64,
    /// Per node id, its streams oldest first, each with the sender that
    /// ends it.
    by_node: HashMap<i64, VecDeque<(u64, oneshot::Sender<()>)>>,
}

/// The registry. Cheap to clone.
#[derive(Clone)]
pub struct MapStreams {
    inner: Arc<Mutex<Inner>>,
    by_ip: IpSlots,
}

impl Default for MapStreams {
    fn default() -> Self {
        MapStreams {
            inner: Arc::default(),
            by_ip: IpSlots::new(MAX_PER_ADDRESS),
        }
    }
}

/// A stream's place: gives it back when dropped. `ended` fires when a
/// newer stream of the same node pushed this one out.
pub struct Ticket {
    streams: MapStreams,
    id: u64,
    node: Option<i64>,
    /// The address's place; given back on drop.
    _ip: Option<IpSlot>,
    pub ended: oneshot::Receiver<()>,
    end: Option<oneshot::Sender<()>>,
}

impl MapStreams {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // Every update is a few map operations: a poisoned lock still
        // guards consistent counts.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A place for a stream from `ip`, before anything else is done for it.
    pub fn admit(&self, ip: Option<IpAddr>) -> Result<Ticket, ApiError> {
        let slot = match ip {
            Some(ip) => Some(self.by_ip.take(ip).ok_or_else(|| {
                ApiError::new(
                    ErrorCode::TooManyRequests,
                    format!("{MAX_PER_ADDRESS} map streams are open from this address already"),
                )
            })?),
            None => None,
        };
        let mut inner = self.lock();
        inner.next_id += 1;
        let (end, ended) = oneshot::channel();
        Ok(Ticket {
            streams: self.clone(),
            id: inner.next_id,
            node: None,
            _ip: slot,
            ended,
            end: Some(end),
        })
    }

    /// How many streams `node` holds.
    pub fn of_node(&self, node: i64) -> usize {
        self.lock().by_node.get(&node).map_or(0, VecDeque::len)
    }
}

impl Ticket {
    /// Files the stream under `node`, ending that node's oldest streams
    /// past [`MAX_PER_NODE`].
    pub fn bind(&mut self, node: i64) {
        let Some(end) = self.end.take() else { return };
        self.node = Some(node);
        let mut inner = self.streams.lock();
        let queue = inner.by_node.entry(node).or_default();
        queue.push_back((self.id, end));
        while queue.len() > MAX_PER_NODE {
            if let Some((_, oldest)) = queue.pop_front() {
                let _ = oldest.send(());
            }
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let mut inner = self.streams.lock();
        if let Some(node) = self.node {
            if let Some(q) = inner.by_node.get_mut(&node) {
                q.retain(|(id, _)| *id != self.id);
                if q.is_empty() {
                    inner.by_node.remove(&node);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_newest_streams_of_a_node_win() {
        let s = MapStreams::default();
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        let mut tickets: Vec<Ticket> = (0..MAX_PER_NODE + 2)
            .map(|_| {
                let mut t = s.admit(Some(ip)).unwrap();
                t.bind(7);
                t
            })
            .collect();
        assert_eq!(s.of_node(7), MAX_PER_NODE);
        // The two oldest were told to end; the others were not.
        for (i, t) in tickets.iter_mut().enumerate() {
            let ended = t.ended.try_recv().is_ok();
            assert_eq!(ended, i < 2, "ticket {i}");
        }
        drop(tickets);
        assert_eq!(s.of_node(7), 0);
        assert_eq!(s.by_ip.addresses(), 0);
    }

    #[test]
    fn an_address_at_its_cap_is_refused_before_anything_else() {
        let s = MapStreams::default();
        let ip: IpAddr = "192.0.2.2".parse().unwrap();
        let held: Vec<Ticket> = (0..MAX_PER_ADDRESS)
            .map(|_| s.admit(Some(ip)).unwrap())
            .collect();
        let refused = s.admit(Some(ip)).err().expect("past the cap");
        assert_eq!(refused.code, ErrorCode::TooManyRequests);
        assert!(s.admit(Some("192.0.2.3".parse().unwrap())).is_ok());
        drop(held);
        assert!(s.admit(Some(ip)).is_ok());
    }
}
