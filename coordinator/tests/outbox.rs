//! The map stream's outbox on a virtual clock: the coalescing rules one by
//! one, then randomized runs (fixed seeds) of adds, changes, removals,
//! re-registrations, resynchronisations and lost events against a reader
//! that is sometimes slow, checking that the agent's folded map always ends
//! equal to the truth and that a quiet stream writes within a tick.
#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng as _, SeedableRng as _};
use warren::control::{Endpoint, EndpointKind, MapMessage, NetMap, PresenceEntry, RelayMap};
use warren::keys::{NodeKey, PrivateKey};
use warren_coordinator::hub::outbox::{full_frame, full_line, Flush, Outbox, PresenceLines, TICK};
use warren_coordinator::hub::{HubEvent, Upserted};
use warren_coordinator::store::NodeRecord;

const ME: i64 = 1;

fn record(id: i64, key: NodeKey) -> NodeRecord {
    NodeRecord {
        id,
        key,
        disco_key: key,
        name: format!("n{id}"),
        hostname: format!("h{id}"),
        os: "linux".into(),
        version: "0".into(),
        ipv4: [100, 64, (id >> 8) as u8, id as u8].into(),
        ipv6: "fd00::1".parse().unwrap(),
        ephemeral: false,
        tags: vec![],
        advertised_tags: vec![],
        endpoints: vec![],
        netcheck: None,
        nat: Default::default(),
        home_relay: None,
        online: false,
        last_seen_ms: 0,
        created_ms: 0,
        user_id: None,
        advertised_routes: vec![],
        approved_routes: vec![],
    }
}

fn key() -> NodeKey {
    PrivateKey::generate().public()
}

fn up(n: &NodeRecord) -> Arc<Upserted> {
    Upserted::new(n.clone()).unwrap()
}

/// The messages in a batch of lines, in order.
fn parse(text: &str) -> Vec<MapMessage> {
    assert!(text.ends_with('\n'), "lines end with a newline: {text:?}");
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// The hub's side for the tests: the snapshot every full map is read from.
struct Net {
    snap: BTreeMap<i64, Arc<Upserted>>,
}

impl Net {
    /// What `map.rs` writes for a full map, folded into a fresh agent map.
    fn full(&self, outbox: &mut Outbox) -> NetMap {
        let me = &self.snap[&ME];
        let relay = serde_json::to_string(&RelayMap::default()).unwrap();
        let (text, known) = full_line(&self.snap, ME, &me.peer_json, &relay);
        let msg: MapMessage = serde_json::from_str(&text).unwrap();
        outbox.full_sent(known, 0);
        NetMap::from_full(me.node.key, &msg).unwrap()
    }
}

fn writes_lines(flush: Flush) -> Vec<MapMessage> {
    match flush {
        Flush::Lines { text, .. } => parse(&text.text()),
        other => panic!("expected lines, got {other:?}"),
    }
}

/// A stream past its first full map, and a network of `me` plus `peers`.
fn started(peers: usize, t0: Instant) -> (Outbox, Net, NetMap, Vec<NodeRecord>) {
    let mut nodes: Vec<NodeRecord> = (0..=peers as i64).map(|i| record(ME + i, key())).collect();
    nodes[0].online = true;
    let net = Net {
        snap: nodes.iter().map(|n| (n.id, up(n))).collect(),
    };
    let mut outbox = Outbox::new(ME, t0);
    assert!(matches!(
        outbox.poll_flush(t0, net.snap.len()),
        Flush::Full { recheck: false, .. }
    ));
    let map = net.full(&mut outbox);
    assert_eq!(map.peers.len(), peers);
    (outbox, net, map, nodes)
}

#[test]
fn a_quiet_stream_writes_at_once_and_a_burst_waits_for_the_tick() {
    let t0 = Instant::now();
    let (mut ob, _net, _map, mut nodes) = started(3, t0);
    let t1 = t0 + TICK * 4;
    nodes[1].online = true;
    ob.push(HubEvent::Upsert(up(&nodes[1])), t1);
    assert_eq!(ob.poll_timeout(), Some(t1), "a lone change goes at once");
    let msgs = writes_lines(ob.poll_flush(t1, 4));
    assert!(matches!(&msgs[..], [MapMessage::PeerChanged { peer }] if peer.online));

    // A burst right after: held until a tick after the last write, then one
    // write with every peer once, in its latest state.
    let t2 = t1 + Duration::from_millis(10);
    for online in [false, true, false] {
        nodes[2].online = online;
        ob.push(HubEvent::Upsert(up(&nodes[2])), t2);
        nodes[3].online = !online;
        ob.push(HubEvent::Upsert(up(&nodes[3])), t2);
    }
    assert_eq!(ob.poll_timeout(), Some(t1 + TICK));
    assert!(matches!(ob.poll_flush(t1 + TICK / 2, 4), Flush::Wait));
    let msgs = writes_lines(ob.poll_flush(t1 + TICK, 4));
    assert_eq!(msgs.len(), 2, "{msgs:?}");
    for m in &msgs {
        let MapMessage::PeerChanged { peer } = m else {
            panic!("{m:?}")
        };
        // Node 2 ended offline, node 3 online.
        let want = peer.key != nodes[2].key;
        assert_eq!(peer.online, want);
    }
    assert_eq!(ob.poll_timeout(), None);
}

#[test]
fn an_add_stays_an_add_and_a_removal_supersedes() {
    let t0 = Instant::now();
    let (mut ob, _net, _map, mut nodes) = started(2, t0);
    let t = t0 + TICK;
    // Added, then changed twice: one add with the latest state.
    let mut fresh = record(10, key());
    ob.push(HubEvent::Upsert(up(&fresh)), t);
    fresh.name = "renamed".into();
    ob.push(HubEvent::Upsert(up(&fresh)), t);
    fresh.online = true;
    ob.push(HubEvent::Upsert(up(&fresh)), t);
    // Changed, then removed: one removal.
    nodes[1].online = true;
    ob.push(HubEvent::Upsert(up(&nodes[1])), t);
    ob.push(
        HubEvent::Removed {
            node_id: nodes[1].id,
            key: nodes[1].key,
            version: 0,
        },
        t,
    );
    // Added and removed before anything was written: nothing at all.
    let ghost = record(11, key());
    ob.push(HubEvent::Upsert(up(&ghost)), t);
    ob.push(
        HubEvent::Removed {
            node_id: ghost.id,
            key: ghost.key,
            version: 0,
        },
        t,
    );
    let msgs = writes_lines(ob.poll_flush(t, 4));
    assert_eq!(msgs.len(), 2, "{msgs:?}");
    assert!(msgs.iter().any(|m| matches!(m,
        MapMessage::PeerAdded { peer } if peer.key == fresh.key && peer.name == "renamed" && peer.online)));
    assert!(msgs
        .iter()
        .any(|m| matches!(m, MapMessage::PeerRemoved { key } if *key == nodes[1].key)));

    // The removed key comes back as a new node (new id): whatever order the
    // two events would be written in, the agent ends with the new node.
    let t = t + TICK;
    ob.push(
        HubEvent::Removed {
            node_id: fresh.id,
            key: fresh.key,
            version: 0,
        },
        t,
    );
    let again = NodeRecord {
        id: 12,
        ..fresh.clone()
    };
    ob.push(HubEvent::Upsert(up(&again)), t);
    let msgs = writes_lines(ob.poll_flush(t, 4));
    assert!(matches!(&msgs[..], [MapMessage::PeerChanged { peer }] if peer.node_id == 12));
}

#[test]
fn a_stream_far_behind_gets_one_full_map() {
    let t0 = Instant::now();
    let (mut ob, net, _map, nodes) = started(200, t0);
    let t = t0 + TICK;
    // Under three quarters of the map: deltas.
    for n in &nodes[1..150] {
        ob.push(HubEvent::Upsert(up(n)), t);
    }
    assert_eq!(writes_lines(ob.poll_flush(t, net.snap.len())).len(), 149);
    // Three quarters or more: a full map, and nothing left over.
    let t = t + TICK;
    for n in &nodes[1..152] {
        ob.push(HubEvent::Upsert(up(n)), t);
    }
    assert!(matches!(
        ob.poll_flush(t, net.snap.len()),
        Flush::Full { recheck: false, .. }
    ));
    assert_eq!(ob.poll_timeout(), None);
    // Lost events: a full map with this node re-read.
    ob.lagged(t + TICK);
    assert!(matches!(
        ob.poll_flush(t + TICK, net.snap.len()),
        Flush::Full { recheck: true, .. }
    ));
    // This node removed: said at once, whatever the tick.
    ob.push(HubEvent::Upsert(up(&nodes[3])), t + TICK);
    ob.push(
        HubEvent::Removed {
            node_id: ME,
            key: nodes[0].key,
            version: 0,
        },
        t + TICK,
    );
    assert!(ob.is_removed());
    assert!(matches!(ob.poll_flush(t + TICK, 201), Flush::Removed));
}

/// Every node coming online at once, one stream: each peer is written once,
/// in a handful of writes, not one write per event.
#[test]
fn a_reconnect_storm_costs_a_stream_few_writes() {
    let t0 = Instant::now();
    let (mut ob, net, mut map, mut nodes) = started(2000, t0);
    let mut now = t0 + TICK;
    let (mut writes, mut lines) = (0, 0);
    // 2000 nodes come online over two seconds, one per millisecond.
    for n in nodes.iter_mut().skip(1) {
        n.online = true;
        ob.push(HubEvent::Upsert(up(n)), now);
        if let Flush::Lines { text, .. } = ob.poll_flush(now, net.snap.len()) {
            writes += 1;
            for m in parse(&text.text()) {
                lines += 1;
                map.apply(&m);
            }
        }
        now += Duration::from_millis(1);
    }
    if let Some(due) = ob.poll_timeout() {
        let Flush::Lines { text, .. } = ob.poll_flush(due, net.snap.len()) else {
            panic!()
        };
        writes += 1;
        for m in parse(&text.text()) {
            lines += 1;
            map.apply(&m);
        }
    }
    assert_eq!(lines, 2000);
    assert!(writes <= 10, "{writes} writes");
    assert!(map.peers.values().all(|p| p.online));
}

/// One randomized run; returns how many writes the stream made.
fn random_run(seed: u64, steps: usize) -> usize {
    let mut rng = StdRng::seed_from_u64(seed);
    let t0 = Instant::now();
    let (mut ob, mut net, mut map, _) = started(rng.gen_range(0..30), t0);
    let mut next_id = 1000;
    let mut removed_keys: Vec<NodeKey> = Vec::new();
    // Events the hub has broadcast that this stream has not read yet.
    let mut queue: Vec<HubEvent> = Vec::new();
    let mut now = t0 + TICK;
    let mut writes = 0;
    for _ in 0..steps {
        now += Duration::from_millis(rng.gen_range(0..60));
        // The hub: update the snapshot first, then broadcast.
        let ids: Vec<i64> = net.snap.keys().copied().collect();
        let pick = ids[rng.gen_range(0..ids.len())];
        let ev = match rng.gen_range(0..100) {
            0..=19 => {
                // A node registers; sometimes with a key removed earlier.
                let k = if !removed_keys.is_empty() && rng.gen_bool(0.3) {
                    removed_keys.swap_remove(rng.gen_range(0..removed_keys.len()))
                } else {
                    key()
                };
                next_id += 1;
                let u = up(&record(next_id, k));
                net.snap.insert(next_id, u.clone());
                Some(HubEvent::Upsert(u))
            }
            20..=34 if pick != ME => {
                let u = net.snap.remove(&pick).unwrap();
                removed_keys.push(u.node.key);
                Some(HubEvent::Removed {
                    node_id: pick,
                    key: u.node.key,
                    version: 0,
                })
            }
            35..=37 => Some(HubEvent::Resync),
            38..=39 => {
                // The broadcast overtook the stream: its queue is gone.
                queue.clear();
                ob.lagged(now);
                None
            }
            _ => {
                let mut n = net.snap[&pick].node.clone();
                n.online = !n.online;
                n.last_seen_ms += 1;
                if rng.gen_bool(0.3) {
                    n.endpoints = vec![Endpoint {
                        addr: format!("192.0.2.{}:41641", rng.gen_range(1..255))
                            .parse()
                            .unwrap(),
                        kind: EndpointKind::Host,
                    }];
                }
                let u = up(&n);
                net.snap.insert(pick, u.clone());
                Some(HubEvent::Upsert(u))
            }
        };
        queue.extend(ev);
        // The stream reads its events now or later (a busy task).
        if rng.gen_bool(0.7) {
            for ev in queue.drain(..) {
                ob.push(ev, now);
            }
        }
        // The agent has room for a write only some of the time.
        let reader_ready = rng.gen_bool(0.6);
        if let Some(due) = ob.poll_timeout() {
            assert!(
                due <= now + TICK,
                "seed {seed}: a change waits at most a tick"
            );
        }
        if reader_ready {
            writes += write(&mut ob, &net, &mut map, now);
        }
    }
    // The network goes quiet and the agent catches up.
    for ev in queue.drain(..) {
        ob.push(ev, now);
    }
    while let Some(due) = ob.poll_timeout() {
        now = now.max(due);
        writes += write(&mut ob, &net, &mut map, now);
    }
    let me = &net.snap[&ME].node;
    assert_eq!(map.self_node, me.to_peer(), "seed {seed}: self");
    let truth: BTreeMap<NodeKey, _> = net
        .snap
        .values()
        .filter(|u| u.node.id != ME)
        .map(|u| (u.node.key, u.node.to_peer()))
        .collect();
    assert_eq!(
        map.peers.keys().collect::<HashSet<_>>(),
        truth.keys().collect::<HashSet<_>>(),
        "seed {seed}: peers"
    );
    assert_eq!(map.peers, truth, "seed {seed}: peer states");
    writes
}

/// Writes what is due, folding it into the agent's map.
fn write(ob: &mut Outbox, net: &Net, map: &mut NetMap, now: Instant) -> usize {
    match ob.poll_flush(now, net.snap.len()) {
        Flush::Wait => 0,
        Flush::Full { .. } => {
            *map = net.full(ob);
            1
        }
        Flush::Lines { text, .. } => {
            for m in parse(&text.text()) {
                map.apply(&m);
            }
            1
        }
        Flush::Removed => panic!("this node is never removed here"),
    }
}

#[test]
fn randomized_changes_with_a_slow_reader_fold_to_the_truth() {
    let mut writes = 0;
    for seed in 0..200 {
        writes += random_run(seed, 300);
    }
    assert!(writes > 0);
}

/// A full map written from a shared encoding older than the snapshot
/// (`Hub::encoded_peers` re-encodes at most once a second) is caught up
/// with deltas at the next tick: a removal, a change, an addition and a
/// key registered again under a new id all end as the snapshot has them,
/// and events the catch-up already covered are skipped.
#[test]
fn a_full_map_from_an_older_encoding_is_caught_up_with_deltas() {
    use warren_coordinator::hub::encoded::EncodedPeers;
    let t0 = Instant::now();
    let stamp = |n: &NodeRecord, version: u64| {
        let mut u = Arc::unwrap_or_clone(up(n));
        u.version = version;
        Arc::new(u)
    };
    let nodes: Vec<NodeRecord> = (0..5).map(|i| record(ME + i, key())).collect();
    let old: BTreeMap<i64, Arc<Upserted>> = nodes.iter().map(|n| (n.id, stamp(n, 1))).collect();
    let encoded = EncodedPeers::build(&old, 1);
    // Since: node 2 removed, node 3 renamed, node 9 added, node 4's key
    // registered again as node 10.
    let mut now = old.clone();
    now.remove(&nodes[1].id);
    let mut renamed = nodes[2].clone();
    renamed.name = "renamed".into();
    now.insert(renamed.id, stamp(&renamed, 3));
    let added = record(9, key());
    now.insert(added.id, stamp(&added, 4));
    now.remove(&nodes[3].id);
    let again = NodeRecord {
        id: 10,
        ..nodes[3].clone()
    };
    now.insert(again.id, stamp(&again, 5));

    let mut ob = Outbox::new(ME, t0);
    assert!(matches!(ob.poll_flush(t0, now.len()), Flush::Full { .. }));
    let (parts, known) = encoded.without(ME);
    let peers: String = parts.iter().map(|b| String::from_utf8_lossy(b)).collect();
    let relay = serde_json::to_string(&RelayMap::default()).unwrap();
    let (head, tail) = full_frame(&old[&ME].peer_json, &relay, None);
    let text = format!("{head}{peers}{tail}");
    let mut map = NetMap::from_full(nodes[0].key, &serde_json::from_str(&text).unwrap()).unwrap();
    assert_eq!(map.peers.len(), 4, "the old encoding's peers");
    ob.full_sent(known, encoded.version);
    ob.catch_up(&encoded.since(&now, 5));
    assert_eq!(
        ob.poll_timeout(),
        Some(t0 + TICK),
        "the difference waits a tick"
    );
    for msg in writes_lines(ob.poll_flush(t0 + TICK, now.len())) {
        map.apply(&msg);
    }
    let want: BTreeMap<NodeKey, String> = now
        .values()
        .filter(|u| u.node.id != ME)
        .map(|u| (u.node.key, u.node.name.clone()))
        .collect();
    let got: BTreeMap<NodeKey, String> = map
        .peers
        .values()
        .map(|p| (p.key, p.name.clone()))
        .collect();
    assert_eq!(got, want);
    assert_eq!(
        map.peers[&again.key].node_id, 10,
        "the key under its new id"
    );
    // The events that made those changes arrive late: already covered.
    ob.push(HubEvent::Upsert(stamp(&added, 4)), t0 + TICK * 2);
    ob.push(
        HubEvent::Removed {
            node_id: nodes[1].id,
            key: nodes[1].key,
            version: 2,
        },
        t0 + TICK * 2,
    );
    assert!(matches!(
        ob.poll_flush(t0 + TICK * 3, now.len()),
        Flush::Wait
    ));
}

/// A stream whose agent asked for `v=2` gets a `peer_online` line when a
/// peer's presence alone changed since the last write, one that asked for
/// `presence=1` one `presence` line for all such peers, and either gets
/// the whole entry as soon as anything else changed too; an older agent
/// always gets the whole entry. Every way the agent's map ends equal to
/// the truth.
#[test]
fn presence_alone_goes_as_a_short_line_to_agents_that_ask() {
    let presence = |n: &NodeRecord, only: bool| {
        let mut u = Arc::unwrap_or_clone(up(n));
        u.presence_only = only;
        Arc::new(u)
    };
    use PresenceLines::*;
    for mode in [Whole, PerPeer, Batched] {
        let t0 = Instant::now();
        let (mut ob, _net, mut map, mut nodes) = started(4, t0);
        ob.set_presence_lines(mode);
        // Node 2 comes online, goes offline and online again; node 4 comes
        // online: presence only.
        let mut t = t0 + TICK;
        for online in [true, false, true] {
            nodes[1].online = online;
            nodes[1].last_seen_ms += 1000;
            ob.push(HubEvent::Upsert(presence(&nodes[1], true)), t);
        }
        nodes[3].online = true;
        ob.push(HubEvent::Upsert(presence(&nodes[3], true)), t);
        // Node 3 comes online and then reports an endpoint.
        nodes[2].online = true;
        ob.push(HubEvent::Upsert(presence(&nodes[2], true)), t);
        nodes[2].endpoints = vec![Endpoint {
            addr: "192.0.2.7:41641".parse().unwrap(),
            kind: EndpointKind::Srflx,
        }];
        ob.push(HubEvent::Upsert(presence(&nodes[2], false)), t);
        let msgs = writes_lines(ob.poll_flush(t, 4));
        let count = |f: fn(&MapMessage) -> bool| msgs.iter().filter(|m| f(m)).count();
        let per_peer = count(|m| matches!(m, MapMessage::PeerOnline { .. }));
        let batches = count(|m| matches!(m, MapMessage::Presence { .. }));
        let whole = count(|m| matches!(m, MapMessage::PeerChanged { .. }));
        let want = match mode {
            Whole => (0, 0, 3),
            PerPeer => (2, 0, 1),
            Batched => (0, 1, 1),
        };
        assert_eq!((per_peer, batches, whole), want, "{mode:?}: {msgs:?}");
        if mode == PerPeer {
            assert!(msgs.iter().any(|m| matches!(m,
                MapMessage::PeerOnline { key, online: true, last_seen_ms: 3000 } if *key == nodes[1].key)));
        }
        if mode == Batched {
            let peers = msgs.iter().find_map(|m| match m {
                MapMessage::Presence { peers } => Some(peers.clone()),
                _ => None,
            });
            let mut peers = peers.unwrap();
            peers.sort_by_key(|e| e.0);
            let mut want = vec![
                PresenceEntry(nodes[1].key, true, nodes[1].last_seen_ms),
                PresenceEntry(nodes[3].key, true, nodes[3].last_seen_ms),
            ];
            want.sort_by_key(|e| e.0);
            assert_eq!(peers, want);
        }
        for m in &msgs {
            map.apply(m);
        }
        for n in &nodes[1..] {
            assert_eq!(map.peers[&n.key], n.to_peer(), "{mode:?}");
        }
        t += TICK;
        // A later presence change alone, after a write: short again.
        nodes[2].online = false;
        ob.push(HubEvent::Upsert(presence(&nodes[2], true)), t);
        let msgs = writes_lines(ob.poll_flush(t, 4));
        let short = match mode {
            Whole => matches!(msgs[..], [MapMessage::PeerChanged { .. }]),
            PerPeer => matches!(msgs[..], [MapMessage::PeerOnline { online: false, .. }]),
            Batched => matches!(&msgs[..], [MapMessage::Presence { peers }] if peers.len() == 1),
        };
        assert!(short, "{mode:?}: {msgs:?}");
        map.apply(&msgs[0]);
        assert_eq!(map.peers[&nodes[2].key], nodes[2].to_peer());
    }
}
