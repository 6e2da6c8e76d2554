//! The hub on PostgreSQL: change notes from `LISTEN`, taken in batches.
//!
//! sqlx's `PgListener` hands out one notification per `try_recv`; its
//! `next_buffered` only returns notes that arrived while the listener was
//! used as a connection, which the hub never does, so it always came back
//! empty. Every note was therefore a batch of one, and each cost a node
//! load and, for a node new to the snapshot, a compilation of the access
//! rules over the whole network (`Access::build`, O(nodes)). Registering
//! 10,000 nodes at two replicas was 10,000 such compilations at each: the
//! hubs fell thousands of nodes behind, every stream opened meanwhile got
//! a full map without them and then each of them as a `peer_added` line
//! (44 million lines in the 10,000-node storm), and the storm took minutes
//! (issue 19).
//!
//! So the listener now runs in a task of its own that only reads notes
//! and forwards them into a channel, and the hub takes everything waiting
//! there at once (up to [`BATCH_MAX`]): while a batch is dispatched, the
//! next one gathers. No future is cancelled midway through a read.
//!
//! If the listening connection drops, notes sent meanwhile are lost, so
//! the hub reloads its snapshot and tells every stream to resynchronise.

use std::time::Duration;

use sqlx::postgres::{PgListener, PgNotification};
use tokio::sync::{mpsc, oneshot};

use super::{Hub, HubEvent, BATCH_MAX};
use crate::store::{Change, Store, StoreError, PG_CHANNEL};

/// What the reading task forwards.
enum Heard {
    Note(PgNotification),
    /// The connection dropped (and will be made again): notes may have
    /// been lost.
    Lost,
    /// The listener failed; the task has ended.
    Failed(StoreError),
}

/// Ends the reading task when the hub stops listening.
struct Reader(tokio::task::JoinHandle<()>);

impl Drop for Reader {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl Hub {
    pub(super) async fn run_postgres(self, store: Store, ready: oneshot::Sender<()>) {
        let mut ready = Some(ready);
        loop {
            if let Err(e) = self.listen_postgres(&store, &mut ready).await {
                tracing::warn!(error = %e, "hub: PostgreSQL listener failed");
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }

    async fn listen_postgres(
        &self,
        store: &Store,
        ready: &mut Option<oneshot::Sender<()>>,
    ) -> Result<(), StoreError> {
        let mut listener = PgListener::connect(store.url()).await?;
        listener.listen(PG_CHANNEL).await?;
        let (tx, mut rx) = mpsc::unbounded_channel();
        let _reader = Reader(tokio::spawn(read(listener, tx)));
        // Listen first, then load: a change in between arrives as a note
        // after the load and is applied again, which is harmless.
        self.reload(store).await?;
        let _ = self.tx.send(HubEvent::Resync);
        tracing::debug!("hub: listening for change notes");
        if let Some(r) = ready.take() {
            let _ = r.send(());
        }
        let mut notes = Vec::with_capacity(BATCH_MAX);
        loop {
            if rx.recv_many(&mut notes, BATCH_MAX).await == 0 {
                return Err(StoreError::Closed);
            }
            let mut changes = Vec::with_capacity(notes.len());
            for note in notes.drain(..) {
                match note {
                    Heard::Note(n) => match Change::parse(n.payload()) {
                        Some(change) => changes.push(change),
                        None => {
                            tracing::warn!(payload = n.payload(), "hub: malformed change note")
                        }
                    },
                    Heard::Lost => {
                        // What came before the loss is applied first; the
                        // reload covers the rest.
                        if !changes.is_empty() {
                            self.dispatch_all(store, std::mem::take(&mut changes)).await;
                        }
                        tracing::info!("hub: PostgreSQL connection lost; resynchronising");
                        self.reload(store).await?;
                        let _ = self.tx.send(HubEvent::Resync);
                    }
                    Heard::Failed(e) => return Err(e),
                }
            }
            if !changes.is_empty() {
                self.dispatch_all(store, changes).await;
            }
        }
    }
}

/// Reads notes until the listener fails or the hub stops listening.
async fn read(mut listener: PgListener, tx: mpsc::UnboundedSender<Heard>) {
    loop {
        let note = match listener.try_recv().await {
            Ok(Some(n)) => Heard::Note(n),
            Ok(None) => Heard::Lost,
            Err(e) => {
                let _ = tx.send(Heard::Failed(e.into()));
                return;
            }
        };
        if tx.send(note).is_err() {
            return;
        }
    }
}
