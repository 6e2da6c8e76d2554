//! A client's bounded, fair send queue.
//!
//! Every connected client has one: senders push encoded frames into the
//! receiver's queue without ever waiting, and the receiver's writer task pops
//! them. Two rules keep the relay healthy under load:
//!
//! - **Bounded**: the queue holds at most `max_bytes`; a push beyond that is
//!   refused and the caller counts a drop. A slow or dead receiver therefore
//!   loses its own packets and costs the relay a fixed amount of memory.
//! - **Fair by bytes**: packets wait in one sub-queue per sender and are
//!   popped by deficit round robin: each turn gives a sender [`QUANTUM`]
//!   bytes of credit and sends at most one frame, if the credit covers it,
//!   so over time every busy sender gets the same share of the receiver's
//!   link whatever its frame size (a sender of 64 KiB frames no longer gets
//!   forty times the share of one sending 1.5 KiB), and small frames still
//!   alternate one by one.
//!   Each sender may hold at most `max_per_source` packets, and when the
//!   queue is full, a sender holding less than its fair share of bytes
//!   (`max_bytes` over the senders waiting, itself included) makes room by
//!   dropping the newest frames of the sender holding the most: a flood
//!   of large frames fills the queue only until someone else speaks.
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
    /// Per waiting source: its bytes queued and its deficit (credit).
    held: HashMap<NodeKey, Held>,
    bytes: usize,
    closed: bool,
    /// Frames dropped to make room for a sender below its share.
    pub evicted: u64,
}

/// Bytes credited to a sender per round-robin turn: about one full-size
/// WireGuard packet, so such packets go one a turn and a 64 KiB frame
/// waits about forty.
pub const QUANTUM: usize = 1_500;
/// Most credit a sender can save up (one largest frame and a turn): a
/// sender of tiny frames must not bank a burst.
const MAX_DEFICIT: usize = 64 * 1024 + QUANTUM;

/// Frames dropped from the fattest sender to make room for another.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Evicted {
    pub frames: u64,
    pub bytes: usize,
}

#[derive(Debug, Default, Clone, Copy)]
struct Held {
    bytes: usize,
    deficit: usize,
}

impl FairQueue {
    pub fn new(limits: QueueLimits) -> Self {
        FairQueue {
            limits,
            control: VecDeque::new(),
            per_source: HashMap::new(),
            ring: VecDeque::new(),
            held: HashMap::new(),
            bytes: 0,
            closed: false,
            evicted: 0,
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
        if self
            .per_source
            .get(src)
            .is_some_and(|q| q.len() >= self.limits.max_per_source)
        {
            return Err(QueueFull::Source);
        }
        if self.bytes + len > self.limits.max_bytes && !self.below_share(src, len) {
            return Err(QueueFull::Bytes);
        }
        Ok(())
    }

    /// Whether `src`, holding `len` more, would still be within its fair
    /// share of the bytes: the queue's size over the senders waiting, it
    /// included.
    fn below_share(&self, src: &NodeKey, len: usize) -> bool {
        let mine = self.held.get(src).map_or(0, |h| h.bytes);
        let senders = self.ring.len() + usize::from(!self.held.contains_key(src));
        mine + len <= self.limits.max_bytes / senders.max(1)
    }

    /// Drops the newest frames of the sender holding the most bytes (never
    /// `keep`) until `len` more bytes fit; returns the frames and bytes
    /// dropped.
    fn make_room(&mut self, keep: &NodeKey, len: usize) -> Evicted {
        let mut evicted = Evicted::default();
        while self.bytes + len > self.limits.max_bytes {
            let Some((&fattest, _)) = self
                .held
                .iter()
                .filter(|(k, _)| *k != keep)
                .max_by_key(|(_, h)| h.bytes)
            else {
                break;
            };
            let Some(frame) = self
                .per_source
                .get_mut(&fattest)
                .and_then(VecDeque::pop_back)
            else {
                break;
            };
            self.bytes -= frame.len();
            self.evicted += 1;
            evicted.frames += 1;
            evicted.bytes += frame.len();
            self.account(&fattest, frame.len());
        }
        evicted
    }

    /// Takes `len` bytes off `src`'s count; forgets a sender left empty.
    fn account(&mut self, src: &NodeKey, len: usize) {
        let empty = self.per_source.get(src).is_none_or(VecDeque::is_empty);
        if empty {
            self.per_source.remove(src);
            self.held.remove(src);
            self.ring.retain(|k| k != src);
        } else if let Some(h) = self.held.get_mut(src) {
            h.bytes -= len;
        }
    }

    /// Queues a forwarded packet frame from `src`; says what was dropped
    /// from another sender to make room.
    pub fn push_packet(&mut self, src: NodeKey, frame: Bytes) -> Result<Evicted, QueueFull> {
        self.check_packet(&src, frame.len())?;
        let evicted = self.make_room(&src, frame.len());
        let q = self.per_source.entry(src).or_default();
        if q.is_empty() {
            self.ring.push_back(src);
        }
        self.bytes += frame.len();
        self.held.entry(src).or_default().bytes += frame.len();
        q.push_back(frame);
        Ok(evicted)
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

    /// The next frame to write: control first, then by deficit round
    /// robin over the senders (see the module doc).
    pub fn pop(&mut self) -> Option<Bytes> {
        if let Some(f) = self.control.pop_front() {
            self.bytes -= f.len();
            return Some(f);
        }
        // Each turn credits the front sender a quantum, sends its head
        // frame if the credit covers it, and moves it to the back; credit
        // grows every turn, so this ends within a frame's worth of turns.
        loop {
            let src = *self.ring.front()?;
            let head = self.per_source.get(&src).and_then(VecDeque::front)?.len();
            let held = self.held.get_mut(&src)?;
            held.deficit = (held.deficit + QUANTUM).min(MAX_DEFICIT.max(head));
            self.ring.rotate_left(1);
            if held.deficit >= head {
                held.deficit -= head;
                let f = self.per_source.get_mut(&src)?.pop_front()?;
                self.bytes -= f.len();
                self.account(&src, f.len());
                return Some(f);
            }
        }
    }

    /// Empties the queue for good (the receiver left); returns the bytes
    /// freed. Later pushes are refused, so nothing piles up in a queue that
    /// a sender found just before the receiver went away.
    pub fn close(&mut self) -> usize {
        self.closed = true;
        self.control.clear();
        self.per_source.clear();
        self.ring.clear();
        self.held.clear();
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
        assert!(q.push_packet(k(2), pkt(2, 100)).is_ok());
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

    #[test]
    fn large_frames_get_a_byte_share_not_a_packet_share() {
        let limits = QueueLimits {
            max_bytes: 1 << 20,
            max_per_source: 256,
            max_control: 2,
        };
        let mut q = FairQueue::new(limits);
        let (big, small) = (k(1), k(2));
        // The big sender fills the whole queue with 64 KiB frames first.
        while q.push_packet(big, pkt(1, 65_535)).is_ok() {}
        assert!(q.bytes() > (1 << 20) - 65_535);
        // The small sender still gets in: the big one makes room.
        for _ in 0..200 {
            q.push_packet(small, pkt(2, 1_400)).unwrap();
        }
        assert!(
            q.evicted > 0,
            "room was made by dropping the big sender's frames"
        );
        // Drain while both keep sending: bytes out per sender stay level.
        let mut out = [0usize; 3];
        for _ in 0..2_000 {
            let _ = q.push_packet(big, pkt(1, 65_535));
            let _ = q.push_packet(small, pkt(2, 1_400));
            let f = q.pop().unwrap();
            out[usize::from(f[0])] += f.len();
        }
        let ratio = out[1] as f64 / out[2] as f64;
        assert!(
            (0.5..2.0).contains(&ratio),
            "big {} vs small {} bytes: ratio {ratio:.2}",
            out[1],
            out[2]
        );
        assert!(q.bytes() <= 1 << 20);
    }

    #[test]
    fn a_sender_over_its_share_is_refused_when_full() {
        let limits = QueueLimits {
            max_bytes: 1000,
            max_per_source: 100,
            max_control: 2,
        };
        let mut q = FairQueue::new(limits);
        for _ in 0..5 {
            q.push_packet(k(1), pkt(1, 100)).unwrap();
            q.push_packet(k(2), pkt(2, 100)).unwrap();
        }
        // Full, and each holds exactly its share: nobody evicts anybody.
        assert_eq!(q.push_packet(k(1), pkt(1, 100)), Err(QueueFull::Bytes));
        // A third sender's share is a third: it may take 300 bytes.
        for _ in 0..3 {
            q.push_packet(k(3), pkt(3, 100)).unwrap();
        }
        assert_eq!(q.push_packet(k(3), pkt(3, 100)), Err(QueueFull::Bytes));
        assert_eq!(q.bytes(), 1000);
    }
}
