//! The hub: carries change notes from the store to every open map stream
//! on this replica, and keeps the current network in memory.
//!
//! On SQLite it polls the `changes` table (every 200 ms, and at once when a
//! request on this replica commits a change and calls [`Hub::wake`]); the
//! poll is what also picks up changes that administration commands make
//! from another process. On PostgreSQL it `LISTEN`s on the change channel,
//! so a change committed by any replica (or by an administration command)
//! reaches all of them. If the listening connection drops, notes sent
//! meanwhile are lost, so the hub reloads its snapshot and tells every
//! stream to resynchronise from a full map instead of guessing.
//!
//! Each note is turned into an event once here (one node load, or one load
//! of the whole network for a batch of notes, and one JSON encoding per
//! change, not one per stream) and fanned out through a
//! broadcast channel. The hub also keeps a snapshot of every node, already
//! encoded, from which streams build their full maps: when two thousand
//! agents reconnect at once after a restart, none of them costs a database
//! read of the whole network (with SQLite's single connection that herd
//! used to queue past the pool's timeout). The snapshot is updated *before*
//! an event is broadcast, and streams subscribe *before* reading it, so a
//! stream never misses a change (at worst it hears one twice).
//!
//! What each stream then writes, and when, is decided by its
//! [`outbox::Outbox`]: pending changes coalesced per peer and written at
//! most once per tick, so a reconnect storm does not cost every stream a
//! line per event.

pub mod access;
pub mod encoded;
pub mod outbox;
mod postgres;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use tokio::sync::{broadcast, oneshot, Notify};
use tokio::task::JoinHandle;
use warren::control::PresenceEntry;
use warren::keys::NodeKey;

use crate::store::{Backend, Change, ChangeKind, NodeRecord, Store, StoreError};

/// What map streams receive.
#[derive(Debug, Clone)]
pub enum HubEvent {
    /// A node was added or changed; this is its new state.
    Upsert(Arc<Upserted>),
    Removed {
        node_id: i64,
        key: NodeKey,
        /// The snapshot version the removal made (see [`Upserted::version`]).
        version: u64,
    },
    /// Changes may have been missed: rebuild from a full map.
    Resync,
    /// The policy was compiled again (`access.rs`): streams send their
    /// agents the peers and filter that changed.
    Access(Arc<access::Access>),
}

/// A node's state with its map entry already encoded: thousands of streams
/// write the same bytes, so the hub encodes them once.
#[derive(Debug, Clone)]
pub struct Upserted {
    pub node: NodeRecord,
    /// `Peer` as JSON.
    pub peer_json: String,
    /// The `peer_added` and `peer_changed` lines for this state, newline
    /// included: every stream that writes this change writes these same
    /// bytes (`outbox::Lines`), so a slow agent's pending writes are
    /// pointers, not copies.
    pub added_line: bytes::Bytes,
    pub changed_line: bytes::Bytes,
    /// The `peer_online` line for this state, for streams that take it.
    pub presence_line: bytes::Bytes,
    /// This state's entry in a `presence` line (`[key, online,
    /// last_seen_ms]`), for streams that take those.
    pub presence_entry: Box<str>,
    /// Whether this state differs from the one before it in the snapshot
    /// only in `online` and `last_seen_ms` (set when it enters it): then
    /// an agent holding the state before may be sent `presence_line`.
    pub presence_only: bool,
    /// The snapshot version at which this node's entry last changed in
    /// more than its presence (its own `version` when `presence_only` is
    /// false). An agent holding the entry as of any version since then
    /// needs only its presence (`encoded::Since`).
    pub entry_version: u64,
    /// The snapshot version this state entered it at (the hub counts from
    /// 1; 0 is a state made outside the hub, in tests). A stream whose
    /// agent holds the map as of version V skips events up to V
    /// (`outbox.rs`).
    pub version: u64,
}

impl Upserted {
    /// Encodes `node`'s map entry; `None` (logged) if it cannot be.
    pub fn new(node: NodeRecord) -> Option<Arc<Upserted>> {
        let presence = PresenceEntry(node.key, node.online, node.last_seen_ms);
        let encoded = serde_json::to_string(&node.to_peer())
            .and_then(|peer| Ok((peer, serde_json::to_string(&presence)?)));
        match encoded {
            Ok((peer_json, presence_entry)) => Some(Arc::new(Upserted {
                added_line: outbox::line("peer_added", "peer", &peer_json).into(),
                changed_line: outbox::line("peer_changed", "peer", &peer_json).into(),
                presence_line: format!(
                    "{{\"type\":\"peer_online\",\"key\":\"{}\",\"online\":{},\"last_seen_ms\":{}}}\n",
                    node.key, node.online, node.last_seen_ms
                )
                .into(),
                presence_entry: presence_entry.into(),
                presence_only: false,
                entry_version: 0,
                node,
                peer_json,
                version: 0,
            })),
            Err(e) => {
                tracing::error!(error = %e, "could not encode a peer");
                None
            }
        }
    }
}

/// A shared encoding, when it was built, and its difference to the
/// snapshot as last asked for.
#[derive(Debug)]
struct Encoded {
    peers: Arc<encoded::EncodedPeers>,
    built: std::time::Instant,
    since: Arc<encoded::Since>,
}

/// `u` as it enters the snapshot at `version` (not copied when, as from
/// `Upserted::new`, nothing else holds it).
fn stamped(u: Arc<Upserted>, version: u64) -> Upserted {
    let mut u = Arc::unwrap_or_clone(u);
    u.version = version;
    u
}

/// Whether `new` differs from `old` in its presence alone (or not at all).
fn presence_only(old: &NodeRecord, new: &NodeRecord) -> bool {
    let rest = NodeRecord {
        online: old.online,
        last_seen_ms: old.last_seen_ms,
        ..new.clone()
    };
    rest == *old
}

/// Every node by id, already encoded.
pub type Snapshot = BTreeMap<i64, Arc<Upserted>>;

/// The fan-out point. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Hub {
    tx: broadcast::Sender<HubEvent>,
    wake: Arc<Notify>,
    snapshot: Arc<RwLock<Snapshot>>,
    /// Bumped under the snapshot's write lock at every change, so a
    /// reader holding the read lock sees the version of what it reads.
    version: Arc<AtomicU64>,
    /// The snapshot's peers encoded for full maps, at some version
    /// (`encoded.rs`); rebuilt on demand when the snapshot moved on.
    encoded: Arc<Mutex<Option<Encoded>>>,
    access: Arc<RwLock<Arc<access::Access>>>,
    /// Batches of change notes dispatched, and the notes in them
    /// ([`Hub::dispatched`]).
    dispatched: Arc<(AtomicU64, AtomicU64)>,
}

impl Default for Hub {
    fn default() -> Self {
        Self::new()
    }
}

const POLL: Duration = Duration::from_millis(200);

/// From this many change notes read at once, the hub loads the changed
/// nodes in a few queries instead of each on its own: after a restart
/// thousands of nodes come online within a second, and a read per note
/// (queued behind those nodes' own writes on SQLite's single connection)
/// made the hub itself trickle the storm out over tens of seconds. Since
/// the batch reads only the changed nodes, two notes are already worth it
/// (and a registration burst brings a few per poll).
const BATCH_LOAD: usize = 2;

/// How long a shared encoding of the peers serves full maps after the
/// snapshot moved on (`Hub::encoded_peers`). What is in flight to slow
/// agents is about one encoding (3.5 MB at 10,000 nodes) per this much of
/// their slowness; the price is a few deltas after each full map.
const REENCODE_AFTER: Duration = Duration::from_secs(1);

/// Events the broadcast keeps for streams that have not taken them yet.
/// A stream whose agent is still reading an earlier write leaves its
/// events here (`api/map.rs`), where all streams share them, instead of
/// folding them into a private backlog: with 10,000 streams each holding
/// a backlog of 10,000 peers, that was gigabytes. Enough for every node of
/// a large network coming online once (a restart's storm) plus their
/// first reports; a stream overtaken anyway gets a full map. Each slot is
/// a pointer.
const EVENTS_KEPT: usize = 1 << 16;

/// Most change notes taken into one batch.
const BATCH_MAX: usize = 1000;

impl Hub {
    pub fn new() -> Self {
        let (tx, _) = broadcast::channel(EVENTS_KEPT);
        Hub {
            tx,
            wake: Arc::new(Notify::new()),
            snapshot: Arc::default(),
            version: Arc::default(),
            encoded: Arc::default(),
            access: Arc::new(RwLock::new(Arc::new(access::Access::open()))),
            dispatched: Arc::default(),
        }
    }

    /// The policy as last compiled.
    pub fn access(&self) -> Arc<access::Access> {
        self.access
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Compiles the policy again for the snapshot's nodes, with `fresh`
    /// users and policy text if they changed, and tells the streams.
    fn rebuild(&self, fresh: Option<(Option<String>, Vec<crate::store::UserRecord>)>) {
        let old = self.access();
        let (text, users) = fresh.unwrap_or_else(|| (old.policy_text.clone(), old.users.clone()));
        let built = self.with_snapshot(|s| {
            Arc::new(access::Access::build(
                text,
                users,
                s.values().map(|u| &u.node),
            ))
        });
        *self.access.write().unwrap_or_else(|p| p.into_inner()) = built.clone();
        let _ = self.tx.send(HubEvent::Access(built));
    }

    /// Reads the users and the policy, then rebuilds.
    async fn reload_access(&self, store: &Store) -> Result<(), StoreError> {
        let text = store.policy_text().await?;
        let users = store.list_users().await?;
        self.rebuild(Some((text, users)));
        Ok(())
    }

    /// Whether `node` differs from the snapshot's copy in what the policy
    /// looks at (or is new).
    fn identity_changed(&self, node: &NodeRecord) -> bool {
        self.with_snapshot(|s| {
            s.get(&node.id)
                .is_none_or(|old| access::identity(&old.node) != access::identity(node))
        })
    }

    /// How many batches of change notes this hub has dispatched, and how
    /// many notes they held: a hub that takes notes one at a time falls
    /// behind a burst (`postgres.rs`).
    pub fn dispatched(&self) -> (u64, u64) {
        let (batches, notes) = &*self.dispatched;
        (
            batches.load(Ordering::Relaxed),
            notes.load(Ordering::Relaxed),
        )
    }

    pub fn subscribe(&self) -> broadcast::Receiver<HubEvent> {
        self.tx.subscribe()
    }

    /// Polls now: a request on this replica just committed a change.
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    /// Runs `f` over the current snapshot (node id → encoded node).
    pub fn with_snapshot<T>(&self, f: impl FnOnce(&Snapshot) -> T) -> T {
        // Writers only insert or remove whole entries, so a poisoned lock
        // still guards a consistent map.
        f(&self.snapshot.read().unwrap_or_else(|p| p.into_inner()))
    }

    /// How many nodes the network has (this node included).
    pub fn node_count(&self) -> usize {
        self.with_snapshot(|s| s.len())
    }

    /// The snapshot to change, and the version the change makes.
    fn snapshot_mut(&self) -> (std::sync::RwLockWriteGuard<'_, Snapshot>, u64) {
        let guard = self.snapshot.write().unwrap_or_else(|p| p.into_inner());
        let version = self.version.fetch_add(1, Ordering::Relaxed) + 1;
        (guard, version)
    }

    /// Puts `u` into the snapshot, stamped with the version it makes and
    /// with what changed since the state it replaces.
    fn put(&self, u: Arc<Upserted>) -> Arc<Upserted> {
        let (mut snap, version) = self.snapshot_mut();
        let mut u = stamped(u, version);
        let old = snap.get(&u.node.id);
        u.presence_only = old.is_some_and(|old| presence_only(&old.node, &u.node));
        u.entry_version = match old {
            Some(old) if u.presence_only => old.entry_version,
            _ => version,
        };
        let u = Arc::new(u);
        snap.insert(u.node.id, u.clone());
        u
    }

    /// Takes node `id` out of the snapshot; the version that makes.
    fn take_out(&self, id: i64) -> u64 {
        let (mut snap, version) = self.snapshot_mut();
        snap.remove(&id);
        version
    }

    /// Runs `f` over the snapshot and its version, read together.
    pub fn with_snapshot_at<T>(&self, f: impl FnOnce(&Snapshot, u64) -> T) -> T {
        let snap = self.snapshot.read().unwrap_or_else(|p| p.into_inner());
        f(&snap, self.version.load(Ordering::Relaxed))
    }

    /// Every node's map entry encoded at some recent version of the
    /// snapshot, shared by all the full maps written from it
    /// (`encoded.rs`). It is built again once the snapshot has changed
    /// and the last build is [`REENCODE_AFTER`] old, so that during a
    /// storm, when the version moves with every batch of nodes coming
    /// online, a few encodings are in flight rather than one per batch;
    /// a stream whose full map is older than the snapshot owes its agent
    /// the difference as deltas, returned beside it (`Outbox::catch_up`).
    pub fn encoded_peers(&self) -> (Arc<encoded::EncodedPeers>, Arc<encoded::Since>) {
        let mut cache = self.encoded.lock().unwrap_or_else(|p| p.into_inner());
        let now = std::time::Instant::now();
        self.with_snapshot_at(|snap, version| {
            let c = match cache.as_mut() {
                Some(c)
                    if c.peers.version == version
                        || now.duration_since(c.built) < REENCODE_AFTER =>
                {
                    c
                }
                _ => {
                    let peers = Arc::new(encoded::EncodedPeers::build(snap, version));
                    let since = Arc::new(peers.since(snap, version));
                    cache.insert(Encoded {
                        peers,
                        built: now,
                        since,
                    })
                }
            };
            // The difference to the snapshot now, once per version for
            // every stream that asks (`Outbox::catch_up`).
            if c.since.version != version {
                c.since = Arc::new(c.peers.since(snap, version));
            }
            (c.peers.clone(), c.since.clone())
        })
    }

    /// Starts the task that feeds the hub from `store`, and waits (up to
    /// `ready_within`) until it holds a snapshot and follows the change
    /// notes, so a replica does not accept agents before it can serve them.
    pub async fn spawn(&self, store: Store, ready_within: Duration) -> JoinHandle<()> {
        let hub = self.clone();
        let (ready, is_ready) = oneshot::channel();
        let task = tokio::spawn(async move {
            match store.backend() {
                Backend::Sqlite => hub.run_sqlite(store, ready).await,
                Backend::Postgres => hub.run_postgres(store, ready).await,
            }
        });
        if tokio::time::timeout(ready_within, is_ready).await.is_err() {
            tracing::warn!(
                "hub is not following changes yet; continuing (streams will resynchronise)"
            );
        }
        task
    }

    /// Replaces the snapshot with the store's current nodes.
    async fn reload(&self, store: &Store) -> Result<(), StoreError> {
        let nodes = store.list_nodes().await?;
        {
            let (mut snap, version) = self.snapshot_mut();
            *snap = nodes
                .into_iter()
                .filter_map(|n| {
                    let u = stamped(Upserted::new(n)?, version);
                    Some((u.node.id, Arc::new(u)))
                })
                .collect();
        }
        self.reload_access(store).await
    }

    async fn dispatch(&self, store: &Store, change: Change) {
        let event = match change.kind {
            ChangeKind::Access => {
                if let Err(e) = self.reload_access(store).await {
                    tracing::warn!(error = %e, "hub could not reload users and policy");
                }
                return;
            }
            ChangeKind::Removed => {
                let version = self.take_out(change.node_id);
                self.rebuild(None);
                HubEvent::Removed {
                    node_id: change.node_id,
                    key: change.node_key,
                    version,
                }
            }
            ChangeKind::Upsert => match store.node_by_id(change.node_id).await {
                Ok(Some(node)) => {
                    let changed = self.identity_changed(&node);
                    let Some(u) = Upserted::new(node) else { return };
                    let u = self.put(u);
                    // Streams learn the new visibility before the node.
                    if changed {
                        self.rebuild(None);
                    }
                    HubEvent::Upsert(u)
                }
                // Removed since: its removal note follows.
                Ok(None) => return,
                Err(e) => {
                    tracing::warn!(error = %e, "hub could not load a changed node");
                    if let Err(e) = self.reload(store).await {
                        tracing::warn!(error = %e, "hub could not reload the network");
                    }
                    HubEvent::Resync
                }
            },
        };
        // No receivers is fine: nobody is connected to this replica.
        let _ = self.tx.send(event);
    }

    /// Dispatches a batch of notes, in order. A node with several notes in
    /// the batch is dispatched once, at its last, from one load of the
    /// changed nodes.
    async fn dispatch_all(&self, store: &Store, changes: Vec<Change>) {
        self.dispatched.0.fetch_add(1, Ordering::Relaxed);
        self.dispatched
            .1
            .fetch_add(changes.len() as u64, Ordering::Relaxed);
        if changes.len() < BATCH_LOAD {
            for change in changes {
                self.dispatch(store, change).await;
            }
            return;
        }
        // Read after the notes were: every node is at least as new as its
        // last note here (newer is fine, its own note follows). Only the
        // changed nodes: at 10,000 nodes a read of the whole network per
        // batch held SQLite's one connection for most of each poll.
        let mut ids: Vec<i64> = changes
            .iter()
            .filter(|c| c.kind == ChangeKind::Upsert)
            .map(|c| c.node_id)
            .collect();
        ids.sort_unstable();
        ids.dedup();
        let mut fresh: HashMap<i64, NodeRecord> = match store.nodes_by_ids(&ids).await {
            Ok(nodes) => nodes.into_iter().map(|n| (n.id, n)).collect(),
            Err(e) => {
                tracing::warn!(error = %e, "hub could not load the network; reading nodes one by one");
                for change in changes {
                    self.dispatch(store, change).await;
                }
                return;
            }
        };
        let last: HashMap<i64, usize> = changes
            .iter()
            .enumerate()
            .map(|(i, c)| (c.node_id, i))
            .collect();
        // The events wait until the policy is compiled again, if it must
        // be, so that streams learn the new visibility before the nodes.
        let (mut events, mut rebuild, mut access) = (Vec::new(), false, false);
        for (i, change) in changes.into_iter().enumerate() {
            if last.get(&change.node_id) != Some(&i) {
                continue;
            }
            let event = match change.kind {
                ChangeKind::Access => {
                    access = true;
                    continue;
                }
                ChangeKind::Removed => {
                    let version = self.take_out(change.node_id);
                    rebuild = true;
                    HubEvent::Removed {
                        node_id: change.node_id,
                        key: change.node_key,
                        version,
                    }
                }
                // Not there: removed since, and its removal note follows.
                ChangeKind::Upsert => match fresh.remove(&change.node_id).and_then(Upserted::new) {
                    Some(u) => {
                        rebuild |= self.identity_changed(&u.node);
                        HubEvent::Upsert(self.put(u))
                    }
                    None => continue,
                },
            };
            events.push(event);
        }
        if access {
            if let Err(e) = self.reload_access(store).await {
                tracing::warn!(error = %e, "hub could not reload users and policy");
                self.rebuild(None);
            }
        } else if rebuild {
            self.rebuild(None);
        }
        for event in events {
            let _ = self.tx.send(event);
        }
    }

    async fn run_sqlite(self, store: Store, ready: oneshot::Sender<()>) {
        // Read the position first, then the snapshot: notes committed in
        // between are replayed, which is harmless.
        let mut last = loop {
            let start = async {
                let last = store.last_change_id().await?;
                self.reload(&store).await?;
                Ok::<_, StoreError>(last)
            };
            match start.await {
                Ok(id) => break id,
                Err(e) => {
                    tracing::warn!(error = %e, "hub: loading the network");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        };
        let _ = ready.send(());
        loop {
            tokio::select! {
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep(POLL) => {}
            }
            match store.changes_since(last, BATCH_MAX as i64).await {
                Ok(changes) => {
                    if let Some((id, _)) = changes.last() {
                        last = *id;
                    }
                    let changes = changes.into_iter().map(|(_, c)| c).collect();
                    self.dispatch_all(&store, changes).await;
                }
                Err(e) => tracing::warn!(error = %e, "hub: reading change notes"),
            }
        }
    }
}

#[cfg(test)]
mod tests;
