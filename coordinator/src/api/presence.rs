//! Map streams opening and closing, written to the store in batches.
//!
//! Opening a map stream writes: its nonce (so a replay is refused), the
//! node's count of open streams, and, when that makes the node come
//! online, a change note. Each open used to be two transactions of its own
//! (the node's lookup, then those writes), and each close one more. On
//! SQLite, whose pool is one connection, the 10,000 agents that reconnect
//! after a coordinator restart queued 20,000 transactions behind each
//! other; the ones still waiting after the pool's 30 s acquire timeout
//! failed, and the run stalled with a third of the streams open
//! (issue 19).
//!
//! Now every open and close goes to one writer task, which takes all that
//! are waiting (up to [`BATCH`]) and writes them in one transaction: a
//! storm of opens costs a few dozen commits, and the connection is free in
//! between for registrations and the hub. Each open still gets its own
//! answer: an unknown key, a replayed nonce are refused one by one inside
//! the batch (`consume_nonce` is an insert that ignores conflicts, so a
//! replay does not abort the others). If the batch itself fails (the
//! database is locked by another process past its busy timeout), each job
//! is tried again alone, so one bad job cannot fail the rest.

use tokio::sync::{mpsc, oneshot};
use warren::keys::NodeKey;

use crate::hub::Hub;
use crate::store::{NodeRecord, Store, StoreError};

/// Most opens and closes written in one transaction.
pub const BATCH: usize = 512;

/// What an open needs from its signed request.
pub struct OpenRequest {
    pub key: NodeKey,
    pub nonce: String,
    pub time: i64,
}

enum Job {
    Open {
        req: OpenRequest,
        /// `Ok(None)`: no node has this key.
        reply: oneshot::Sender<Result<Option<NodeRecord>, StoreError>>,
    },
    Close(Box<NodeRecord>),
}

/// The handle streams use. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Presence {
    jobs: mpsc::UnboundedSender<Job>,
}

impl Presence {
    /// Starts the writer for `store`; it wakes `hub` after each commit.
    /// It runs until every handle is dropped.
    pub fn spawn(store: Store, hub: Hub) -> Presence {
        let (jobs, rx) = mpsc::unbounded_channel();
        tokio::spawn(run(store, hub, rx));
        Presence { jobs }
    }

    /// Looks the node up, consumes the nonce and counts the new stream.
    /// `Ok(None)`: the key is not registered.
    pub async fn open(&self, req: OpenRequest) -> Result<Option<NodeRecord>, StoreError> {
        let (reply, answer) = oneshot::channel();
        self.jobs
            .send(Job::Open { req, reply })
            .map_err(|_| StoreError::Closed)?;
        answer.await.map_err(|_| StoreError::Closed)?
    }

    /// Counts a stream of `node` gone (not waited for).
    pub fn close(&self, node: NodeRecord) {
        if self.jobs.send(Job::Close(Box::new(node))).is_err() {
            tracing::warn!("presence writer gone: a closed stream is not counted");
        }
    }
}

async fn run(store: Store, hub: Hub, mut rx: mpsc::UnboundedReceiver<Job>) {
    let mut orphans: Vec<NodeRecord> = Vec::new();
    let mut jobs = Vec::with_capacity(BATCH);
    while rx.recv_many(&mut jobs, BATCH).await > 0 {
        let batch = std::mem::take(&mut jobs);
        match write(&store, &batch).await {
            Ok(results) => orphans.extend(answer(batch, results)),
            Err(e) => {
                tracing::warn!(error = %e, jobs = batch.len(), "presence batch failed; one by one");
                for job in batch {
                    let one = [job];
                    let results = write(&store, &one).await;
                    let [job] = one;
                    match results {
                        Ok(r) => orphans.extend(answer(vec![job], r)),
                        Err(e) => match job {
                            Job::Open { reply, .. } => {
                                let _ = reply.send(Err(e));
                            }
                            Job::Close(n) => {
                                tracing::warn!(error = %e, node = %n.key.short(), "could not mark a stream closed")
                            }
                        },
                    }
                }
            }
        }
        // Streams counted for requests that were gone before their answer
        // came: counted closed at once.
        if !orphans.is_empty() {
            let closes: Vec<Job> = orphans.drain(..).map(|n| Job::Close(Box::new(n))).collect();
            if let Err(e) = write(&store, &closes).await {
                tracing::warn!(error = %e, "could not mark abandoned streams closed");
            }
        }
        hub.wake();
    }
}

/// Per job in order, what an open gets (closes get `Ok(None)`).
type Results = Vec<Result<Option<NodeRecord>, StoreError>>;

async fn write(store: &Store, jobs: &[Job]) -> Result<Results, StoreError> {
    let mut tx = store.begin().await?;
    let mut out = Vec::with_capacity(jobs.len());
    for job in jobs {
        match job {
            Job::Open { req, .. } => {
                let Some(node) = Store::node_by_key_tx(&mut tx, &req.key).await? else {
                    out.push(Ok(None));
                    continue;
                };
                match Store::consume_nonce(&mut tx, &req.nonce, &req.key, req.time).await {
                    Ok(()) => {
                        store.stream_delta(&mut tx, &node, 1).await?;
                        out.push(Ok(Some(node)));
                    }
                    Err(StoreError::Replayed) => out.push(Err(StoreError::Replayed)),
                    Err(e) => return Err(e),
                }
            }
            Job::Close(node) => {
                store.stream_delta(&mut tx, node, -1).await?;
                out.push(Ok(None));
            }
        }
    }
    tx.commit().await?;
    Ok(out)
}

/// Sends each open its answer; returns the nodes whose stream was counted
/// for a request that is gone (its client hung up while it waited), which
/// nobody else would ever count closed.
fn answer(jobs: Vec<Job>, results: Results) -> Vec<NodeRecord> {
    let mut orphans = Vec::new();
    for (job, result) in jobs.into_iter().zip(results) {
        if let Job::Open { reply, .. } = job {
            if let Err(Ok(Some(node))) = reply.send(result) {
                orphans.push(node);
            }
        }
    }
    orphans
}
