//! Who may connect to the relay.
//!
//! Only nodes the coordinator knows may use a relay (DESIGN §6). The relay
//! asks an [`Admission`] at each handshake, and listens to its removals so
//! that a node removed from the network is disconnected at once (within 2 s),
//! not when its connection happens to end. The embedded relay implements the
//! trait on the coordinator's store; a standalone relay uses
//! [`super::remote::RemoteAdmission`], which mirrors the coordinator's node
//! list into a [`StaticAdmission`].

use std::collections::HashSet;
use std::sync::{Arc, RwLock};

use futures_util::future::BoxFuture;
use tokio::sync::broadcast;
use warren::keys::NodeKey;

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
/// the mirror behind [`super::remote::RemoteAdmission`].
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
