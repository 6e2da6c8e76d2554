//! The hub: carries change notes from the store to every open map stream
//! on this replica.
//!
//! On SQLite it polls the `changes` table (every 200 ms, and at once when a
//! request on this replica commits a change and calls [`Hub::wake`]); the
//! poll is what also picks up changes that administration commands make
//! from another process. On PostgreSQL it `LISTEN`s on the change channel,
//! so a change committed by any replica (or by an administration command)
//! reaches all of them. If the listening connection drops, notes sent
//! meanwhile are lost, so the hub tells every stream to resynchronise from
//! a full map instead of guessing what it missed.
//!
//! Each note is turned into an event once here (one node load per change,
//! not one per stream) and fanned out through a broadcast channel; a stream
//! that falls behind the channel resynchronises the same way.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{broadcast, oneshot, Notify};
use tokio::task::JoinHandle;
use warren::keys::NodeKey;

use crate::store::{Backend, Change, ChangeKind, NodeRecord, Store, PG_CHANNEL};

/// What map streams receive.
#[derive(Debug, Clone)]
pub enum HubEvent {
    /// A node was added or changed; this is its new state.
    Upsert(Arc<NodeRecord>),
    Removed {
        node_id: i64,
        key: NodeKey,
    },
    /// Changes may have been missed: rebuild from a full map.
    Resync,
}

/// The fan-out point. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Hub {
    tx: broadcast::Sender<HubEvent>,
    wake: Arc<Notify>,
}

impl Default for Hub {
    fn default() -> Self {
        Self::new()
    }
}

const POLL: Duration = Duration::from_millis(200);

impl Hub {
    pub fn new() -> Self {
        let (tx, _) = broadcast::channel(8192);
        Hub {
            tx,
            wake: Arc::new(Notify::new()),
        }
    }

    pub fn subscribe(&self) -> broadcast::Receiver<HubEvent> {
        self.tx.subscribe()
    }

    /// Polls now: a request on this replica just committed a change.
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    /// Starts the task that feeds the hub from `store`, and waits (up to
    /// `ready_within`) until it is following the change notes, so that a
    /// replica does not accept agents before it can tell them of changes.
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

    async fn dispatch(&self, store: &Store, change: Change) {
        let event = match change.kind {
            ChangeKind::Removed => HubEvent::Removed {
                node_id: change.node_id,
                key: change.node_key,
            },
            ChangeKind::Upsert => match store.node_by_id(change.node_id).await {
                Ok(Some(node)) => HubEvent::Upsert(Arc::new(node)),
                // Removed since: its removal note follows.
                Ok(None) => return,
                Err(e) => {
                    tracing::warn!(error = %e, "hub could not load a changed node");
                    HubEvent::Resync
                }
            },
        };
        // No receivers is fine: nobody is connected to this replica.
        let _ = self.tx.send(event);
    }

    async fn run_sqlite(self, store: Store, ready: oneshot::Sender<()>) {
        let mut last = loop {
            match store.last_change_id().await {
                Ok(id) => break id,
                Err(e) => {
                    tracing::warn!(error = %e, "hub: reading change notes");
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
            match store.changes_since(last, 1000).await {
                Ok(changes) => {
                    for (id, change) in changes {
                        last = id;
                        self.dispatch(&store, change).await;
                    }
                }
                Err(e) => tracing::warn!(error = %e, "hub: reading change notes"),
            }
        }
    }

    async fn run_postgres(self, store: Store, ready: oneshot::Sender<()>) {
        let mut ready = Some(ready);
        loop {
            match self.listen_postgres(&store, &mut ready).await {
                Ok(()) => {}
                Err(e) => tracing::warn!(error = %e, "hub: PostgreSQL listener failed"),
            }
            let _ = self.tx.send(HubEvent::Resync);
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }

    async fn listen_postgres(
        &self,
        store: &Store,
        ready: &mut Option<oneshot::Sender<()>>,
    ) -> Result<(), sqlx::Error> {
        let mut listener = sqlx::postgres::PgListener::connect(store.url()).await?;
        listener.listen(PG_CHANNEL).await?;
        tracing::debug!("hub: listening for change notes");
        if let Some(r) = ready.take() {
            let _ = r.send(());
        }
        // Whatever happened before we listened is in the full maps streams
        // send on connect; streams that were already open must catch up.
        let _ = self.tx.send(HubEvent::Resync);
        loop {
            match listener.try_recv().await? {
                Some(n) => match Change::parse(n.payload()) {
                    Some(change) => self.dispatch(store, change).await,
                    None => tracing::warn!(payload = n.payload(), "hub: malformed change note"),
                },
                // The connection dropped and will be re-established by the
                // next call; notes may have been lost meanwhile.
                None => {
                    tracing::info!("hub: PostgreSQL connection lost; streams will resynchronise");
                    let _ = self.tx.send(HubEvent::Resync);
                }
            }
        }
    }
}
