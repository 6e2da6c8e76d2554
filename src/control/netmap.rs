//! The agent's copy of the network map, and its file on disk.
//!
//! The map stream delivers one `full` message and then deltas; [`NetMap`]
//! folds them into the current view. The client writes that view to a file
//! after every change (write to a temporary file, fsync, rename, so a crash
//! leaves either the old map or the new one, never half of one) and loads it
//! at start: with the coordinator down, the agent still knows its peers and
//! existing tunnels keep working.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::types::{MapMessage, Peer, PresenceEntry, RelayMap};
use crate::keys::NodeKey;
use crate::policy::FilterRule;

/// Why the map file could not be read or written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MapFileError {
    #[error("map file {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("map file {path} is not a valid map: {source}")]
    Parse {
        path: String,
        #[source]
        source: serde_json::Error,
    },
}

/// What changed when a message was applied, for the caller to act on.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum MapChange {
    /// A full map replaced everything.
    Replaced,
    PeerAdded(NodeKey),
    PeerChanged(NodeKey),
    PeerRemoved(NodeKey),
    /// These peers' presence changed (a `presence` line), in its order.
    Presence(Vec<NodeKey>),
    SelfChanged,
    /// The packet filter changed.
    FilterChanged,
    /// Nothing (a keepalive, or a delta that changed nothing).
    None,
}

/// The current network map as one node sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetMap {
    /// The coordinator's public key this map came from (pinned for later
    /// requests, see the client).
    pub coordinator_key: NodeKey,
    pub self_node: Peer,
    #[serde(with = "peers_as_list")]
    pub peers: BTreeMap<NodeKey, Peer>,
    pub relay_map: RelayMap,
    /// This node's packet filter; `None`: the network has no policy.
    #[serde(default)]
    pub packet_filter: Option<Vec<FilterRule>>,
    /// The network's DNS settings, as the coordinator sent them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dns: Option<Box<crate::dns::DnsSettings>>,
}

impl NetMap {
    /// Builds a map from a `full` message; `None` for any other message.
    pub fn from_full(coordinator_key: NodeKey, msg: &MapMessage) -> Option<Self> {
        match msg {
            MapMessage::Full {
                self_node,
                peers,
                relay_map,
                packet_filter,
                dns,
            } => Some(NetMap {
                coordinator_key,
                self_node: self_node.clone(),
                peers: peers.iter().map(|p| (p.key, p.clone())).collect(),
                relay_map: relay_map.clone(),
                packet_filter: packet_filter.clone(),
                dns: dns.clone(),
            }),
            _ => None,
        }
    }

    /// Sets one peer's presence; whether it changed. A peer the map does
    /// not hold is left out: the coordinator sends the whole entry for a
    /// new peer, never its presence alone.
    fn set_presence(&mut self, PresenceEntry(key, online, seen): PresenceEntry) -> bool {
        match self.peers.get_mut(&key) {
            Some(p) if p.online != online || p.last_seen_ms != seen => {
                p.online = online;
                p.last_seen_ms = seen;
                true
            }
            _ => false,
        }
    }

    /// Folds one message into the map.
    pub fn apply(&mut self, msg: &MapMessage) -> MapChange {
        match msg {
            MapMessage::Full { .. } => {
                if let Some(m) = NetMap::from_full(self.coordinator_key, msg) {
                    *self = m;
                }
                MapChange::Replaced
            }
            MapMessage::PeerAdded { peer } | MapMessage::PeerChanged { peer } => {
                match self.peers.insert(peer.key, peer.clone()) {
                    None => MapChange::PeerAdded(peer.key),
                    Some(old) if old == *peer => MapChange::None,
                    Some(_) => MapChange::PeerChanged(peer.key),
                }
            }
            MapMessage::PeerOnline {
                key,
                online,
                last_seen_ms,
            } => {
                if self.set_presence(PresenceEntry(*key, *online, *last_seen_ms)) {
                    MapChange::PeerChanged(*key)
                } else {
                    MapChange::None
                }
            }
            MapMessage::Presence { peers } => {
                let changed: Vec<NodeKey> = peers
                    .iter()
                    .filter(|e| self.set_presence(**e))
                    .map(|e| e.0)
                    .collect();
                if changed.is_empty() {
                    MapChange::None
                } else {
                    MapChange::Presence(changed)
                }
            }
            MapMessage::PeerRemoved { key } => match self.peers.remove(key) {
                Some(_) => MapChange::PeerRemoved(*key),
                None => MapChange::None,
            },
            MapMessage::SelfChanged { node } => {
                if self.self_node == *node {
                    MapChange::None
                } else {
                    self.self_node = node.clone();
                    MapChange::SelfChanged
                }
            }
            MapMessage::FilterChanged { packet_filter } => {
                if self.packet_filter == *packet_filter {
                    MapChange::None
                } else {
                    self.packet_filter = packet_filter.clone();
                    MapChange::FilterChanged
                }
            }
            MapMessage::Keepalive => MapChange::None,
        }
    }

    /// Reads a map file; `Ok(None)` when there is none yet.
    pub fn load(path: &Path) -> Result<Option<Self>, MapFileError> {
        let text = match std::fs::read(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(MapFileError::Io {
                    path: path.display().to_string(),
                    source,
                })
            }
        };
        serde_json::from_slice(&text)
            .map(Some)
            .map_err(|source| MapFileError::Parse {
                path: path.display().to_string(),
                source,
            })
    }

    /// Writes the map atomically (temporary file + rename), mode 0600: the
    /// map lists every peer's addresses, which is nobody else's business.
    pub fn save(&self, path: &Path) -> Result<(), MapFileError> {
        let io = |source| MapFileError::Io {
            path: path.display().to_string(),
            source,
        };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(io)?;
        }
        let tmp = path.with_extension("tmp");
        let json = serde_json::to_vec_pretty(self).map_err(|source| MapFileError::Parse {
            path: path.display().to_string(),
            source,
        })?;
        let mut opts = std::fs::OpenOptions::new();
        opts.write(true).create(true).truncate(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt as _;
            opts.mode(0o600);
        }
        let mut f = opts.open(&tmp).map_err(io)?;
        f.write_all(&json).map_err(io)?;
        f.sync_all().map_err(io)?;
        std::fs::rename(&tmp, path).map_err(io)
    }
}

mod peers_as_list {
    use super::*;
    use serde::{Deserializer, Serializer};

    pub fn serialize<S: Serializer>(m: &BTreeMap<NodeKey, Peer>, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(m.values())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<BTreeMap<NodeKey, Peer>, D::Error> {
        let v = Vec::<Peer>::deserialize(d)?;
        Ok(v.into_iter().map(|p| (p.key, p)).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(id: u8) -> Peer {
        Peer::for_test(id, "fd00::1")
    }

    #[test]
    fn deltas_fold_into_the_map_and_survive_a_file_round_trip() {
        let me = peer(1);
        let a = peer(2);
        let full = MapMessage::Full {
            self_node: me.clone(),
            peers: vec![a.clone()],
            relay_map: RelayMap::default(),
            packet_filter: None,
            dns: None,
        };
        let mut map = NetMap::from_full(me.key, &full).unwrap();
        let b = peer(3);
        assert_eq!(
            map.apply(&MapMessage::PeerAdded { peer: b.clone() }),
            MapChange::PeerAdded(b.key)
        );
        let mut a2 = a.clone();
        a2.online = false;
        assert_eq!(
            map.apply(&MapMessage::PeerChanged { peer: a2.clone() }),
            MapChange::PeerChanged(a.key)
        );
        assert_eq!(
            map.apply(&MapMessage::PeerChanged { peer: a2.clone() }),
            MapChange::None
        );
        assert_eq!(
            map.apply(&MapMessage::PeerRemoved { key: b.key }),
            MapChange::PeerRemoved(b.key)
        );
        assert_eq!(
            map.apply(&MapMessage::PeerRemoved { key: b.key }),
            MapChange::None
        );
        assert_eq!(map.peers.len(), 1);
        assert!(!map.peers[&a.key].online);
        // Presence alone (`peer_online`, v=2 streams): the rest is kept;
        // the same again changes nothing; an unknown key is ignored.
        let online = MapMessage::PeerOnline {
            key: a.key,
            online: true,
            last_seen_ms: 77,
        };
        assert_eq!(map.apply(&online), MapChange::PeerChanged(a.key));
        assert_eq!(map.apply(&online), MapChange::None);
        assert!(map.peers[&a.key].online);
        assert_eq!(map.peers[&a.key].last_seen_ms, 77);
        assert_eq!(map.peers[&a.key].name, a.name);
        let stranger = MapMessage::PeerOnline {
            key: b.key,
            online: true,
            last_seen_ms: 1,
        };
        assert_eq!(map.apply(&stranger), MapChange::None);
        assert_eq!(map.peers.len(), 1);
        // The same in a `presence` line (`presence=1` streams): only the
        // entries that change something are reported; strangers are left
        // out of the map.
        let batch = MapMessage::Presence {
            peers: vec![
                PresenceEntry(a.key, false, 90),
                PresenceEntry(b.key, true, 1),
                PresenceEntry(a.key, false, 90),
            ],
        };
        assert_eq!(map.apply(&batch), MapChange::Presence(vec![a.key]));
        assert_eq!(map.apply(&batch), MapChange::None);
        assert!(!map.peers[&a.key].online);
        assert_eq!(map.peers[&a.key].last_seen_ms, 90);
        assert_eq!(map.peers.len(), 1);
        // Back to what the rest of this test expects.
        map.apply(&MapMessage::PeerChanged { peer: a2.clone() });
        // A policy arrives: deny-all is not no-policy, and it is kept.
        let deny_all = MapMessage::FilterChanged {
            packet_filter: Some(vec![]),
        };
        assert_eq!(map.apply(&deny_all), MapChange::FilterChanged);
        assert_eq!(map.apply(&deny_all), MapChange::None);
        assert_eq!(map.packet_filter, Some(vec![]));

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("map.json");
        assert!(NetMap::load(&path).unwrap().is_none());
        map.save(&path).unwrap();
        assert_eq!(NetMap::load(&path).unwrap().unwrap(), map);
        std::fs::write(&path, b"{not json").unwrap();
        assert!(matches!(
            NetMap::load(&path),
            Err(MapFileError::Parse { .. })
        ));
    }
}
