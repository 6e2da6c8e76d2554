//! A client's bounded, fair send queue.
//!
//! Every connected client has one: senders push encoded frames into the
//! receiver's queue without ever waiting, and the receiver's writer task pops
//! them. Two rules keep the relay healthy under load:
//!
//! - **Bounded**: the queue holds at most `max_bytes`; a push beyond that is
//!   refused and the caller counts a drop. A slow or dead receiver therefore
//!   loses its own packets and costs the relay a fixed amount of memory.
//! - **Fair**: packets wait in one sub-queue per sender and are popped round
//!   robin, and each sender may hold at most `max_per_source` packets. A
//!   flooding sender fills its own sub-queue and has its own packets dropped,
//!   while a quiet sender to the same receiver still gets its turn.
//!
//! Control frames (pongs, peer-gone, health) bypass the fair part: they are
//! few, small and latency-sensitive, and go first, within their own bound.
//! The structure is plain data, no locks and no IO, so it is tested directly.

use std::collections::{HashMap, VecDeque};

use bytes::Bytes;
use warren::keys::NodeKey;

/// Why a push was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueueFull {
    /// The receiver's whole queue is at its byte limit.
    Bytes,
    /// This sender already has its share of packets waiting.
    Source,
    /// Too many control frames are waiting.
    Control,
    /// The receiver has disconnected.
    Closed,
}

/// Limits of one queue.
#[derive(Debug, Clone, Copy)]
pub struct QueueLimits {
    pub max_bytes: usize,
    pub max_per_source: usize,
    pub max_control: usize,
}

impl Default for QueueLimits {
    fn default() -> Self {
        QueueLimits {
            max_bytes: 1 << 20,
            max_per_source: 256,
            max_control: 64,
        }
    }
}

/// The queue itself. `bytes()` is what it holds now, for the memory gauge.
#[derive(Debug)]
pub struct FairQueue {
    limits: QueueLimits,
    control: VecDeque<Bytes>,
    per_source: HashMap<NodeKey, VecDeque<Bytes>>,
    /// Sources with waiting packets, in round-robin order.
    ring: VecDeque<NodeKey>,
    bytes: usize,
    closed: bool,
}

impl FairQueue {
    pub fn new(limits: QueueLimits) -> Self {
        FairQueue {
            limits,
            control: VecDeque::new(),
            per_source: HashMap::new(),
            ring: VecDeque::new(),
            bytes: 0,
            closed: false,
        }
    }

    pub fn bytes(&self) -> usize {
        self.bytes
    }

    pub fn is_empty(&self) -> bool {
        self.control.is_empty() && self.ring.is_empty()
    }

    /// Whether a packet frame of `len` bytes from `src` would be accepted;
    /// lets the caller skip building a frame that would be dropped.
    pub fn check_packet(&self, src: &NodeKey, len: usize) -> Result<(), QueueFull> {
        if self.closed {
            return Err(QueueFull::Closed);
        }
        if self.bytes + len > self.limits.max_bytes {
            return Err(QueueFull::Bytes);
        }
        if self
            .per_source
            .get(src)
            .is_some_and(|q| q.len() >= self.limits.max_per_source)
        {
            return Err(QueueFull::Source);
        }
        Ok(())
    }

    /// Queues a forwarded packet frame from `src`.
    pub fn push_packet(&mut self, src: NodeKey, frame: Bytes) -> Result<(), QueueFull> {
        self.check_packet(&src, frame.len())?;
        let q = self.per_source.entry(src).or_default();
        if q.is_empty() {
            self.ring.push_back(src);
        }
        self.bytes += frame.len();
        q.push_back(frame);
        Ok(())
    }

    /// Queues a control frame; these go out before any packet.
    pub fn push_control(&mut self, frame: Bytes) -> Result<(), QueueFull> {
        if self.closed {
            return Err(QueueFull::Closed);
        }
        if self.control.len() >= self.limits.max_control {
            return Err(QueueFull::Control);
        }
        self.bytes += frame.len();
        self.control.push_back(frame);
        Ok(())
    }

    /// The next frame to write: control first, then one packet from the
    /// next source in the ring.
    pub fn pop(&mut self) -> Option<Bytes> {
        let frame = match self.control.pop_front() {
            Some(f) => f,
            None => {
                let src = self.ring.pop_front()?;
                let q = self.per_source.get_mut(&src)?;
                let f = q.pop_front()?;
                if q.is_empty() {
                    self.per_source.remove(&src);
                } else {
                    self.ring.push_back(src);
                }
                f
            }
        };
        self.bytes -= frame.len();
        Some(frame)
    }

    /// Empties the queue for good (the receiver left); returns the bytes
    /// freed. Later pushes are refused, so nothing piles up in a queue that
    /// a sender found just before the receiver went away.
    pub fn close(&mut self) -> usize {
        self.closed = true;
        self.control.clear();
        self.per_source.clear();
        self.ring.clear();
        std::mem::take(&mut self.bytes)
    }

    /// Pops frames until about `max_bytes` are gathered, for one write.
    /// Returns how many of them are forwarded packets (not control frames).
    pub fn pop_batch(&mut self, out: &mut Vec<Bytes>, max_bytes: usize) -> usize {
        let mut packets = 0;
        let mut size = 0;
        while size < max_bytes {
            let is_packet = self.control.is_empty();
            let Some(f) = self.pop() else { break };
            size += f.len();
            out.push(f);
            packets += usize::from(is_packet);
        }
        packets
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn k(b: u8) -> NodeKey {
        NodeKey([b; 32])
    }

    fn pkt(tag: u8, len: usize) -> Bytes {
        Bytes::from(vec![tag; len])
    }

    #[test]
    fn round_robin_between_sources() {
        let mut q = FairQueue::new(QueueLimits::default());
        for _ in 0..5 {
            q.push_packet(k(1), pkt(1, 10)).unwrap();
        }
        q.push_packet(k(2), pkt(2, 10)).unwrap();
        q.push_packet(k(2), pkt(2, 10)).unwrap();
        let order: Vec<u8> = std::iter::from_fn(|| q.pop()).map(|b| b[0]).collect();
        assert_eq!(order, vec![1, 2, 1, 2, 1, 1, 1]);
        assert_eq!(q.bytes(), 0);
        assert!(q.is_empty());
    }

    #[test]
    fn flooding_source_is_capped_and_quiet_source_still_fits() {
        let limits = QueueLimits {
            max_bytes: 10_000,
            max_per_source: 4,
            max_control: 2,
        };
        let mut q = FairQueue::new(limits);
        let mut dropped = 0;
        for _ in 0..100 {
            if q.push_packet(k(1), pkt(1, 100)).is_err() {
                dropped += 1;
            }
        }
        assert_eq!(dropped, 96);
        assert_eq!(q.push_packet(k(2), pkt(2, 100)), Ok(()));
        assert_eq!(q.pop().unwrap()[0], 1);
        assert_eq!(q.pop().unwrap()[0], 2);
    }

    #[test]
    fn byte_limit_bounds_memory() {
        let limits = QueueLimits {
            max_bytes: 1000,
            max_per_source: 1000,
            max_control: 2,
        };
        let mut q = FairQueue::new(limits);
        let mut ok = 0;
        for i in 0..100u8 {
            if q.push_packet(k(i), pkt(i, 300)).is_ok() {
                ok += 1;
            }
        }
        assert_eq!(ok, 3);
        assert!(q.bytes() <= 1000);
        assert_eq!(q.push_packet(k(200), pkt(0, 300)), Err(QueueFull::Bytes));
        assert_eq!(q.close(), 900);
        assert_eq!(q.push_control(pkt(0, 1)), Err(QueueFull::Closed));
        assert!(q.is_empty());
    }

    #[test]
    fn control_goes_first_within_its_bound() {
        let limits = QueueLimits {
            max_bytes: 10_000,
            max_per_source: 10,
            max_control: 2,
        };
        let mut q = FairQueue::new(limits);
        q.push_packet(k(1), pkt(1, 10)).unwrap();
        q.push_control(pkt(9, 5)).unwrap();
        q.push_control(pkt(9, 5)).unwrap();
        assert_eq!(q.push_control(pkt(9, 5)), Err(QueueFull::Control));
        let mut batch = Vec::new();
        assert_eq!(q.pop_batch(&mut batch, 12), 1, "one packet, two control");
        let tags: Vec<u8> = batch.iter().map(|b| b[0]).collect();
        assert_eq!(tags, vec![9, 9, 1]);
    }
}
