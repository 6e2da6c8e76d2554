//! Who may connect to the relay.
//!
//! Only nodes the coordinator knows may use a relay (see
//! docs/architecture.md, "Relay"). The relay
//! asks an [`Admission`] at each handshake, and listens to its removals so
//! that a node removed from the network is disconnected at once (within 2 s),
//! not when its connection happens to end. The embedded relay implements the
//! trait on the coordinator's store; a standalone relay uses
//! [`spawn_remote_admission`], which mirrors the coordinator's node list
//! into a [`StaticAdmission`].
//!
//! The remote mirror keeps one streaming request open to the coordinator's
//! node feed (wire format and authentication in
//! [`warren::proto::relay::auth`]): a snapshot replaces the set (keys missing
//! from it count as removed and are disconnected), deltas add and remove.
//! When the feed breaks, the relay keeps the last list it had, so existing
//! tunnels survive a coordinator restart, and reconnects with backoff; the
//! snapshot on reconnection catches up with anything missed meanwhile.

use std::collections::HashSet;
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::{Bytes, BytesMut};
use futures_util::future::BoxFuture;
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::sync::broadcast;
use tokio::task::JoinHandle;
use tracing::{info, warn};
use warren::dial;
use warren::keys::NodeKey;
use warren::proto::relay::auth::{auth_header, NodesEvent, KEEPALIVE_SECS, NODES_PATH};

/// The source of truth on which node keys may connect.
///
/// Boxed futures keep the trait object-safe, so the relay holds an
/// `Arc<dyn Admission>` and is not generic over the store.
pub trait Admission: Send + Sync + 'static {
    /// Whether `key` may connect now. Called once per handshake.
    fn is_allowed<'a>(&'a self, key: &'a NodeKey) -> BoxFuture<'a, bool>;

    /// Keys removed from now on. If the receiver lags (misses messages), the
    /// relay re-checks every connected key with [`Admission::is_allowed`],
    /// so a burst of removals is never lost.
    fn removals(&self) -> broadcast::Receiver<NodeKey>;
}

/// An in-memory key set: for tests, for labs with a fixed node list, and as
/// the mirror behind [`spawn_remote_admission`].
#[derive(Debug)]
pub struct StaticAdmission {
    keys: RwLock<HashSet<NodeKey>>,
    removed: broadcast::Sender<NodeKey>,
}

impl StaticAdmission {
    pub fn new(keys: impl IntoIterator<Item = NodeKey>) -> Arc<Self> {
        let (removed, _) = broadcast::channel(1024);
        Arc::new(StaticAdmission {
            keys: RwLock::new(keys.into_iter().collect()),
            removed,
        })
    }

    pub fn contains(&self, key: &NodeKey) -> bool {
        self.keys.read().map(|s| s.contains(key)).unwrap_or(false)
    }

    pub fn len(&self) -> usize {
        self.keys.read().map(|s| s.len()).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn insert(&self, key: NodeKey) {
        if let Ok(mut s) = self.keys.write() {
            s.insert(key);
        }
    }

    /// Removes `key` and tells the relay to drop its connections.
    pub fn remove(&self, key: &NodeKey) {
        let was = self
            .keys
            .write()
            .map(|mut s| s.remove(key))
            .unwrap_or(false);
        if was {
            // No subscriber simply means no relay is running yet.
            let _ = self.removed.send(*key);
        }
    }

    /// Replaces the whole set; keys that disappear count as removed.
    pub fn replace(&self, keys: impl IntoIterator<Item = NodeKey>) {
        let new: HashSet<NodeKey> = keys.into_iter().collect();
        let gone: Vec<NodeKey> = match self.keys.write() {
            Ok(mut s) => {
                let gone = s.difference(&new).copied().collect();
                *s = new;
                gone
            }
            Err(_) => Vec::new(),
        };
        for k in gone {
            let _ = self.removed.send(k);
        }
    }
}

impl Admission for StaticAdmission {
    fn is_allowed<'a>(&'a self, key: &'a NodeKey) -> BoxFuture<'a, bool> {
        Box::pin(async move { self.contains(key) })
    }

    fn removals(&self) -> broadcast::Receiver<NodeKey> {
        self.removed.subscribe()
    }
}

/// Longest line the feed may send (a snapshot of ~100k keys fits).
const MAX_LINE: usize = 8 << 20;

/// Where and how to reach the coordinator's node feed.
#[derive(Clone)]
pub struct RemoteAdmissionConfig {
    /// `https://coordinator[:port]`; `http://` only with `allow_plain`.
    pub coordinator_url: String,
    pub allow_plain: bool,
    /// The relay secret shared with the coordinator.
    pub secret: Vec<u8>,
    /// This relay's public key, named in the authorization header.
    pub relay_key: NodeKey,
    /// TLS roots; `None` uses the Mozilla root store.
    pub tls: Option<Arc<rustls::ClientConfig>>,
}

/// Why one feed connection ended.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FeedError {
    #[error("connecting: {0}")]
    Dial(#[from] dial::DialError),
    #[error("HTTP: {0}")]
    Http(#[from] hyper::Error),
    #[error("coordinator answered HTTP {0}")]
    Status(u16),
    #[error("building the feed request: {0}")]
    Request(#[from] hyper::http::Error),
    #[error("feed line is not a valid event: {0}")]
    BadLine(#[source] serde_json::Error),
    #[error("feed line longer than {MAX_LINE} bytes")]
    LineTooLong,
    #[error("no keepalive from the coordinator in {0:?}")]
    Silent(Duration),
    #[error("coordinator closed the feed")]
    Closed,
    #[error("timed out")]
    Timeout,
}

/// Starts mirroring the coordinator's node list. The returned admission is
/// empty (everyone refused) until the first snapshot arrives.
pub fn spawn_remote_admission(
    cfg: RemoteAdmissionConfig,
) -> (Arc<StaticAdmission>, JoinHandle<()>) {
    let admission = StaticAdmission::new([]);
    let task = tokio::spawn(feed_loop(cfg, admission.clone()));
    (admission, task)
}

async fn feed_loop(cfg: RemoteAdmissionConfig, admission: Arc<StaticAdmission>) {
    let mut backoff = Duration::from_millis(500);
    loop {
        let mut got_snapshot = false;
        let err = follow_feed(&cfg, &admission, &mut got_snapshot).await;
        warn!(
            "coordinator node feed ended: {err}; keeping {} known nodes",
            admission.len()
        );
        if got_snapshot {
            backoff = Duration::from_millis(500);
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(30));
    }
}

/// One connection to the feed; returns why it ended.
async fn follow_feed(
    cfg: &RemoteAdmissionConfig,
    admission: &StaticAdmission,
    got_snapshot: &mut bool,
) -> FeedError {
    let setup = async {
        let (io, target) =
            dial::connect_stream(&cfg.coordinator_url, cfg.allow_plain, cfg.tls.clone(), None)
                .await?;
        let (mut sender, conn) = http1::handshake(TokioIo::new(io)).await?;
        tokio::spawn(conn);
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let req = hyper::Request::get(NODES_PATH)
            .header(hyper::header::HOST, target.authority())
            .header(
                hyper::header::AUTHORIZATION,
                auth_header(&cfg.secret, &cfg.relay_key, now),
            )
            .header(hyper::header::ACCEPT, "application/x-ndjson")
            .body(Empty::<Bytes>::new())?;
        let resp = sender.send_request(req).await?;
        if !resp.status().is_success() {
            return Err(FeedError::Status(resp.status().as_u16()));
        }
        Ok(resp.into_body())
    };
    let mut body = match tokio::time::timeout(Duration::from_secs(10), setup).await {
        Ok(Ok(b)) => b,
        Ok(Err(e)) => return e,
        Err(_) => return FeedError::Timeout,
    };
    info!("following the coordinator's node feed");
    let silence = Duration::from_secs(3 * KEEPALIVE_SECS);
    let mut buf = BytesMut::new();
    loop {
        let frame = match tokio::time::timeout(silence, body.frame()).await {
            Err(_) => return FeedError::Silent(silence),
            Ok(None) => return FeedError::Closed,
            Ok(Some(Err(e))) => return e.into(),
            Ok(Some(Ok(f))) => f,
        };
        let Ok(data) = frame.into_data() else {
            continue;
        };
        buf.extend_from_slice(&data);
        while let Some(pos) = buf.iter().position(|&b| b == b'\n') {
            let line = buf.split_to(pos + 1);
            let line = &line[..pos];
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            match serde_json::from_slice::<NodesEvent>(line) {
                Ok(ev) => apply(admission, ev, got_snapshot),
                Err(e) => return FeedError::BadLine(e),
            }
        }
        if buf.len() > MAX_LINE {
            return FeedError::LineTooLong;
        }
    }
}

fn apply(admission: &StaticAdmission, ev: NodesEvent, got_snapshot: &mut bool) {
    match ev {
        NodesEvent::Snapshot { nodes } => {
            info!(nodes = nodes.len(), "node list snapshot from coordinator");
            admission.replace(nodes);
            *got_snapshot = true;
        }
        NodesEvent::Add { node } => admission.insert(node),
        NodesEvent::Remove { node } => admission.remove(&node),
        NodesEvent::Keepalive => {}
        // Newer event kinds are ignored, so the coordinator can grow them.
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn replace_reports_removed_keys() {
        let (a, b, c) = (NodeKey([1; 32]), NodeKey([2; 32]), NodeKey([3; 32]));
        let adm = StaticAdmission::new([a, b]);
        let mut rx = adm.removals();
        assert!(adm.is_allowed(&a).await);
        assert!(!adm.is_allowed(&c).await);
        adm.replace([b, c]);
        assert_eq!(rx.recv().await.unwrap(), a);
        assert!(!adm.is_allowed(&a).await);
        assert!(adm.is_allowed(&c).await);
        adm.remove(&c);
        assert_eq!(rx.recv().await.unwrap(), c);
        // Removing an absent key is silent.
        adm.remove(&c);
        assert!(rx.try_recv().is_err());
    }
}
