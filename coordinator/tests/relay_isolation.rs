//! Isolation: a receiver that stops reading must not slow the other pairs,
//! and the relay's queue memory must stay bounded while it is stalled.
//!
//! Three pairs stream packets through the relay while a fourth client floods
//! one more receiver. The pairs' delivered throughput is measured twice:
//! once while the flooded receiver reads, once while it has stopped reading
//! entirely (a raw connection that never calls `read`). The second figure
//! must be at least half the first, the stalled client's packets must be
//! dropped and counted, and the relay's queued bytes must stay within the
//! configured per-client bound.

#![allow(clippy::unwrap_used)] // helpers of a test crate

mod relay_support;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use relay_support::*;
use warren::keys::{NodeKey, PrivateKey};
use warren::proto::relay::Frame;
use warren::relay_client::{RelayReceiver, RelaySender, RelayTransport};
use warren_coordinator::relay::QueueLimits;

const PAIRS: usize = 3;
const WINDOW: Duration = Duration::from_millis(1500);
const QUEUE_BYTES: usize = 256 * 1024;

/// Sends to `dest` as fast as the client accepts until `stop`.
fn pump(tx: RelaySender, dest: NodeKey, stop: Arc<AtomicBool>) {
    let pkt = Bytes::from(vec![0x5a; 1200]);
    tokio::spawn(async move {
        while !stop.load(Relaxed) {
            if tx.send(dest, pkt.clone()).await.is_err() {
                return;
            }
        }
    });
}

/// Counts what `rx` receives into `count`, forever.
fn drain(mut rx: RelayReceiver, count: Arc<AtomicU64>) {
    tokio::spawn(async move {
        while rx.recv().await.is_some() {
            count.fetch_add(1, Relaxed);
        }
    });
}

async fn pairs_rate(counts: &[Arc<AtomicU64>]) -> f64 {
    let total = |c: &[Arc<AtomicU64>]| c.iter().map(|c| c.load(Relaxed)).sum::<u64>();
    let before = total(counts);
    tokio::time::sleep(WINDOW).await;
    (total(counts) - before) as f64 / WINDOW.as_secs_f64()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_receiver_does_not_slow_other_pairs() {
    let keys: Vec<PrivateKey> = (0..2 * PAIRS + 3).map(|_| PrivateKey::generate()).collect();
    let mut limits = limits();
    limits.write_timeout = Duration::from_secs(60);
    limits.queue = QueueLimits {
        max_bytes: QUEUE_BYTES,
        ..QueueLimits::default()
    };
    let publics: Vec<NodeKey> = keys.iter().map(|k| k.public()).collect();
    let relay = TestRelay::start(false, limits, &publics).await;

    let stop = Arc::new(AtomicBool::new(false));
    let mut counts = Vec::new();
    // Unused halves stay alive for the whole test: dropping a sender stops
    // its client.
    let mut keep = Vec::new();
    for p in 0..PAIRS {
        let (s, r) = (&keys[2 * p], &keys[2 * p + 1]);
        let (stx, srx) = relay.client(s, RelayTransport::Upgrade).await;
        let (rtx, rrx) = relay.client(r, RelayTransport::Upgrade).await;
        let c = Arc::new(AtomicU64::new(0));
        drain(rrx, c.clone());
        pump(stx, r.public(), stop.clone());
        counts.push(c);
        keep.push((rtx, srx));
    }
    let flooder = &keys[2 * PAIRS];
    let reader = &keys[2 * PAIRS + 1];
    let staller = &keys[2 * PAIRS + 2];

    // Phase 1: the flood goes to a receiver that reads.
    let (ftx, _frx) = relay.client(flooder, RelayTransport::Upgrade).await;
    let (_xtx, xrx) = relay.client(reader, RelayTransport::Upgrade).await;
    let flood_rx = Arc::new(AtomicU64::new(0));
    drain(xrx, flood_rx.clone());
    let flood_stop = Arc::new(AtomicBool::new(false));
    pump(ftx.clone(), reader.public(), flood_stop.clone());
    tokio::time::sleep(Duration::from_millis(300)).await;
    let baseline = pairs_rate(&counts).await;
    assert!(flood_rx.load(Relaxed) > 0, "flood reached its reader");
    flood_stop.store(true, Relaxed);

    // Phase 2: the flood goes to a client that never reads.
    let mut stalled = relay.raw().await;
    assert_eq!(
        stalled.hello(staller, staller.public()).await,
        Some(Frame::Accepted)
    );
    let drops_before = relay.server.health().drop_queue_full;
    pump(ftx, staller.public(), Arc::new(AtomicBool::new(false)));
    // Let the socket buffers and the stalled queue fill up.
    tokio::time::sleep(Duration::from_millis(700)).await;
    let sampler = {
        let server = relay.server.clone();
        tokio::spawn(async move {
            let mut max = 0;
            for _ in 0..30 {
                max = max.max(server.health().queued_bytes);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            max
        })
    };
    let with_stall = pairs_rate(&counts).await;
    let max_queued = sampler.await.unwrap();
    stop.store(true, Relaxed);

    let h = relay.server.health();
    eprintln!(
        "pairs: {baseline:.0} pkt/s with a reading receiver, {with_stall:.0} pkt/s with a stalled one; \
         max queued {max_queued} B; drops {h:?}"
    );
    assert!(baseline > 100.0, "pairs moved packets at all: {baseline}");
    assert!(
        with_stall >= 0.5 * baseline,
        "stalled receiver slowed the others: {with_stall:.0} vs {baseline:.0} pkt/s"
    );
    assert!(
        h.drop_queue_full > drops_before,
        "the stalled client's packets were dropped and counted"
    );
    // Every client's queue is bounded; the stalled one sits at its bound.
    let clients = h.clients as usize;
    assert!(
        max_queued as usize <= clients * (QUEUE_BYTES + 64 * 1024),
        "queued {max_queued} B across {clients} clients"
    );
    assert!(
        max_queued as usize >= QUEUE_BYTES / 2,
        "the stalled client's queue filled up ({max_queued} B), so the bound was exercised"
    );
    drop((stalled, keep, _frx, _xtx));
}
