//! The relay's shared state: who is connected, and the counters.
//!
//! The [`Hub`] maps node keys to live connections and forwards a packet by
//! pushing it into the receiver's [`FairQueue`] without waiting: the sender's
//! task never blocks on a receiver, which is what isolates a stalled client
//! from everyone else. Locks are std mutexes held for a few instructions (a
//! map lookup, a queue push), never across an await.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, RwLock};

use bytes::{Bytes, BytesMut};
use tokio::sync::{watch, Notify};
use warren::keys::{NodeKey, PrivateKey};
use warren::proto::relay::{encode_recv_packet, Frame, PeerGoneReason, RelayHealth, HEADER_LEN};

use super::admission::Admission;
use super::queue::{FairQueue, QueueFull};
use super::RelayLimits;
use crate::ratelimit::IpSlots;

/// Remember at most this many senders per client for peer-gone notices.
const MAX_TRACKED_SENDERS: usize = 4096;

/// The relay's counters. Field meanings are documented on [`RelayHealth`].
#[derive(Debug, Default)]
pub(crate) struct Metrics {
    pub clients: AtomicU64,
    pub connections_total: AtomicU64,
    pub connections_upgrade: AtomicU64,
    pub connections_websocket: AtomicU64,
    pub refused_unknown_key: AtomicU64,
    pub refused_bad_proof: AtomicU64,
    pub refused_too_many: AtomicU64,
    pub handshake_timeouts: AtomicU64,
    pub refused_busy: AtomicU64,
    pub disconnected_removed: AtomicU64,
    pub bytes_in: AtomicU64,
    pub bytes_out: AtomicU64,
    pub packets_in: AtomicU64,
    pub packets_forwarded: AtomicU64,
    pub queued_bytes: AtomicU64,
    pub drop_queue_full: AtomicU64,
    pub drop_no_such_peer: AtomicU64,
    pub drop_bad_frame: AtomicU64,
    pub drop_write_timeout: AtomicU64,
}

impl Metrics {
    pub fn inc(c: &AtomicU64) {
        c.fetch_add(1, Relaxed);
    }

    pub fn snapshot(&self) -> RelayHealth {
        let g = |c: &AtomicU64| c.load(Relaxed);
        RelayHealth {
            clients: g(&self.clients),
            connections_total: g(&self.connections_total),
            connections_upgrade: g(&self.connections_upgrade),
            connections_websocket: g(&self.connections_websocket),
            refused_unknown_key: g(&self.refused_unknown_key),
            refused_bad_proof: g(&self.refused_bad_proof),
            refused_too_many: g(&self.refused_too_many),
            handshake_timeouts: g(&self.handshake_timeouts),
            refused_busy: g(&self.refused_busy),
            disconnected_removed: g(&self.disconnected_removed),
            bytes_in: g(&self.bytes_in),
            bytes_out: g(&self.bytes_out),
            packets_in: g(&self.packets_in),
            packets_forwarded: g(&self.packets_forwarded),
            queued_bytes: g(&self.queued_bytes),
            drop_queue_full: g(&self.drop_queue_full),
            drop_no_such_peer: g(&self.drop_no_such_peer),
            drop_bad_frame: g(&self.drop_bad_frame),
            drop_write_timeout: g(&self.drop_write_timeout),
        }
    }
}

/// Why a connection is being closed by the relay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CloseReason {
    Removed,
    WriteTimeout,
    Shutdown,
}

/// One live, admitted connection.
#[derive(Debug)]
pub(crate) struct Client {
    pub id: u64,
    pub key: NodeKey,
    pub queue: Mutex<FairQueue>,
    /// Wakes the writer task when the queue gains frames.
    pub wake: Notify,
    pub close: watch::Sender<Option<CloseReason>>,
    /// Keys that sent to this client: they get a peer-gone when it leaves.
    senders: Mutex<HashSet<NodeKey>>,
}

impl Client {
    pub fn request_close(&self, why: CloseReason) {
        self.close.send_if_modified(|c| {
            let first = c.is_none();
            if first {
                *c = Some(why);
            }
            first
        });
    }
}

/// Connected clients plus everything the sessions share.
pub(crate) struct Hub {
    pub key: PrivateKey,
    pub limits: RelayLimits,
    pub admission: Arc<dyn Admission>,
    pub metrics: Metrics,
    /// Bounds connections that have not proven a key yet.
    pub pending: tokio::sync::Semaphore,
    /// Of those, per source IP.
    pub pending_by_ip: IpSlots,
    clients: RwLock<HashMap<NodeKey, Vec<Arc<Client>>>>,
    next_id: AtomicU64,
}

impl Hub {
    pub fn new(key: PrivateKey, limits: RelayLimits, admission: Arc<dyn Admission>) -> Self {
        Hub {
            key,
            limits,
            admission,
            metrics: Metrics::default(),
            pending: tokio::sync::Semaphore::new(limits.max_pending_handshakes),
            pending_by_ip: IpSlots::new(limits.max_pending_per_ip),
            clients: RwLock::new(HashMap::new()),
            next_id: AtomicU64::new(1),
        }
    }

    /// Adds an admitted connection, unless the node has too many already.
    pub fn register(&self, key: NodeKey) -> Option<Arc<Client>> {
        let mut map = self.clients.write().ok()?;
        let conns = map.entry(key).or_default();
        if conns.len() >= self.limits.max_conns_per_node {
            return None;
        }
        let (close, _) = watch::channel(None);
        let client = Arc::new(Client {
            id: self.next_id.fetch_add(1, Relaxed),
            key,
            queue: Mutex::new(FairQueue::new(self.limits.queue)),
            wake: Notify::new(),
            close,
            senders: Mutex::new(HashSet::new()),
        });
        conns.push(client.clone());
        Metrics::inc(&self.metrics.connections_total);
        self.metrics.clients.fetch_add(1, Relaxed);
        Some(client)
    }

    /// Removes a connection; if it was the node's last, tells its senders.
    pub fn unregister(&self, client: &Client) {
        let last = match self.clients.write() {
            Ok(mut map) => {
                let Some(conns) = map.get_mut(&client.key) else {
                    return;
                };
                let before = conns.len();
                conns.retain(|c| c.id != client.id);
                if conns.len() == before {
                    return;
                }
                let last = conns.is_empty();
                if last {
                    map.remove(&client.key);
                }
                last
            }
            Err(_) => return,
        };
        self.metrics.clients.fetch_sub(1, Relaxed);
        if let Ok(mut q) = client.queue.lock() {
            let freed = q.close();
            self.metrics.queued_bytes.fetch_sub(freed as u64, Relaxed);
        }
        if last {
            let senders: Vec<NodeKey> = client
                .senders
                .lock()
                .map(|s| s.iter().copied().collect())
                .unwrap_or_default();
            let gone = Frame::PeerGone {
                key: client.key,
                reason: PeerGoneReason::Disconnected,
            }
            .to_bytes();
            for s in senders {
                self.send_control(&s, gone.clone());
            }
        }
    }

    fn newest(&self, key: &NodeKey) -> Option<Arc<Client>> {
        let map = self.clients.read().ok()?;
        map.get(key).and_then(|v| v.last().cloned())
    }

    /// Queues `packet` from `src` for `dest`. Never waits.
    pub fn forward(&self, src: &NodeKey, dest: &NodeKey, packet: &[u8]) {
        let Some(to) = self.newest(dest) else {
            Metrics::inc(&self.metrics.drop_no_such_peer);
            let gone = Frame::PeerGone {
                key: *dest,
                reason: PeerGoneReason::NotHere,
            }
            .to_bytes();
            self.send_control(src, gone);
            return;
        };
        let len = HEADER_LEN + 32 + packet.len();
        // Check, build and push under the queue's lock: a packet that would
        // be dropped costs no allocation, and the gauge never underflows.
        let pushed = match to.queue.lock() {
            Ok(mut q) => q.check_packet(src, len).and_then(|()| {
                let mut buf = BytesMut::with_capacity(len);
                encode_recv_packet(&mut buf, src, packet);
                let evicted = q.push_packet(*src, buf.freeze())?;
                self.metrics.queued_bytes.fetch_add(len as u64, Relaxed);
                if evicted.frames > 0 {
                    // Frames of the fattest sender, dropped for this one.
                    self.metrics
                        .queued_bytes
                        .fetch_sub(evicted.bytes as u64, Relaxed);
                    self.metrics
                        .drop_queue_full
                        .fetch_add(evicted.frames, Relaxed);
                }
                Ok(())
            }),
            Err(_) => Err(QueueFull::Closed),
        };
        match pushed {
            Ok(_) => {
                to.wake.notify_one();
                if let Ok(mut s) = to.senders.lock() {
                    if s.len() < MAX_TRACKED_SENDERS && !s.contains(src) {
                        s.insert(*src);
                    }
                }
            }
            Err(_) => Metrics::inc(&self.metrics.drop_queue_full),
        }
    }

    /// Queues a control frame for every connection of `key`.
    pub fn send_control(&self, key: &NodeKey, frame: Bytes) {
        if let Some(c) = self.newest(key) {
            self.push_control(&c, frame);
        }
    }

    pub fn push_control(&self, c: &Client, frame: Bytes) {
        let len = frame.len() as u64;
        let pushed = c.queue.lock().map(|mut q| {
            q.push_control(frame)
                .map(|()| self.metrics.queued_bytes.fetch_add(len, Relaxed))
        });
        if let Ok(Ok(_)) = pushed {
            c.wake.notify_one();
        } else {
            Metrics::inc(&self.metrics.drop_queue_full);
        }
    }

    /// Pops up to `max` bytes of frames for `c`'s writer; returns how many
    /// are forwarded packets.
    pub fn pop_batch(&self, c: &Client, out: &mut Vec<Bytes>, max: usize) -> usize {
        let before = out.len();
        let Ok(mut q) = c.queue.lock() else { return 0 };
        let packets = q.pop_batch(out, max);
        let n: usize = out[before..].iter().map(|b| b.len()).sum();
        self.metrics.queued_bytes.fetch_sub(n as u64, Relaxed);
        packets
    }

    /// Closes every connection of `key`; returns how many there were.
    pub fn disconnect(&self, key: &NodeKey, why: CloseReason) -> usize {
        let conns: Vec<Arc<Client>> = self
            .clients
            .read()
            .map(|m| m.get(key).cloned().unwrap_or_default())
            .unwrap_or_default();
        for c in &conns {
            c.request_close(why);
        }
        conns.len()
    }

    pub fn connected_keys(&self) -> Vec<NodeKey> {
        self.clients
            .read()
            .map(|m| m.keys().copied().collect())
            .unwrap_or_default()
    }
}
