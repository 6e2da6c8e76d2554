//! What one map stream still owes its agent, coalesced.
//!
//! A map stream used to write every hub event as its own line, as soon as
//! it arrived. When two thousand nodes come online at once (a coordinator
//! restart), that is every node's online change written to every stream,
//! one line, one task wake-up and one socket write at a time: minutes of
//! work for the coordinator and a flood for every agent.
//!
//! The [`Outbox`] keeps instead at most one pending entry per peer key, the
//! latest state winning, and says when to write:
//!
//! - A stream that has been quiet for a [`TICK`] writes a change at once, so
//!   a lone change still reaches every agent as fast as before.
//! - Otherwise what arrived meanwhile waits for the end of the tick and goes
//!   out in one write: a burst costs each stream a few writes per second,
//!   whatever its size, and a peer flapping within a tick is sent once.
//! - A stream that is behind (its agent reads slowly, or the hub's broadcast
//!   overtook it) gets one full map instead of its backlog once the backlog
//!   is three quarters of the map or more (then the full map costs hardly
//!   more to write, and the agent replaces its map once instead of applying
//!   thousands of deltas); a full map is also what a stream owes after it
//!   lost events.
//!
//! Whether a pending upsert is `peer_added` or `peer_changed` (and whether a
//! removal is sent at all) is decided when it is written, against the set of
//! peers the agent has been told about: an add followed by changes is still
//! an add, a removal supersedes earlier changes, and a removal of a peer the
//! agent never heard of is not sent. Entries are keyed by node key, as the
//! agent's map is, so a key that is removed and registered again (a new node
//! id) folds into one `peer_changed` and can never be reordered into a
//! removal after its re-addition. The set of peers the agent holds is kept
//! by node id (8 bytes a peer, against 32 for a key: with two thousand
//! streams of two thousand peers that is most of the coordinator's memory);
//! each pending entry remembers the id its key had when it was last written,
//! which is the one the set may hold.
//!
//! With a policy, a stream holds only the peers its node may see
//! (`access.rs`): an upsert of a peer it may not see is written as a
//! removal if the agent holds it and not at all otherwise, and a new
//! compilation owes the difference between the peers the agent holds and
//! those it may now see, read from the snapshot (`recheck`), plus a
//! `filter_changed` line when the node's own filter changed.
//!
//! Sans-IO: the caller passes the time in and does the reading and writing,
//! so the rules are tested with a virtual clock (see `tests/outbox.rs`).

use std::collections::{BTreeMap, HashSet};

use bytes::Bytes;
use roaring::RoaringTreemap;
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

use warren::keys::NodeKey;

use super::access::Access;
use super::encoded::{bit, Since};
use super::{HubEvent, Snapshot, Upserted};

/// The shortest time between two writes of deltas on one stream, and so the
/// most a change waits in the outbox. Well under the one second within
/// which a change must reach every online peer.
pub const TICK: Duration = Duration::from_millis(250);

/// A backlog this small is always sent as deltas, however small the map:
/// a full map is for streams that are really behind.
const MIN_FULL: usize = 32;

/// The latest state of one peer key since the last write.
#[derive(Debug, Clone)]
struct Pending {
    /// The node id of the first event for this key since the last write:
    /// the id under which the agent may hold the key.
    base: i64,
    state: State,
    /// Every event folded here changed the peer's presence alone, so the
    /// agent may be sent a `peer_online` line (`Upserted::presence_only`).
    presence_only: bool,
}

#[derive(Debug, Clone)]
enum State {
    Upsert(Arc<Upserted>),
    Removed(i64),
}

/// What the stream should write now.
#[derive(Debug)]
pub enum Flush {
    /// Nothing yet: wait for [`Outbox::poll_timeout`] or the next event.
    Wait,
    /// A full map, read from the hub's snapshot now (it is newer than every
    /// event pushed so far); then call [`Outbox::full_sent`]. `recheck`:
    /// events may have been lost, so re-read this node's own row too.
    /// `me` is this node's latest state if an event carried it.
    Full {
        recheck: bool,
        me: Option<Arc<Upserted>>,
    },
    /// Newline-terminated lines, to write in one go. `me` as above, when a
    /// `self_changed` is among them.
    Lines {
        text: Lines,
        me: Option<Arc<Upserted>>,
    },
    /// This node was removed: end the stream.
    Removed,
}

/// One stream's pending changes. See the module documentation.
#[derive(Debug)]
pub struct Outbox {
    me: i64,
    /// Node ids of the peers the agent holds, as of what has been handed
    /// out to write (a bitmap: `encoded.rs`).
    known: RoaringTreemap,
    pending: BTreeMap<NodeKey, Pending>,
    self_node: Option<Arc<Upserted>>,
    /// A full map is owed; `Some(true)`: with a re-read of this node.
    full: Option<bool>,
    removed: bool,
    /// When the oldest change still owed arrived.
    since: Option<Instant>,
    last_write: Option<Instant>,
    access: Arc<Access>,
    /// The node ids this node may see; `None`: all.
    visible: Option<HashSet<i64>>,
    /// A new compilation arrived: compare the peers held with the visible.
    recheck: bool,
    /// `Access::visible_digest` of the set above, once one arrived.
    digest: Option<u64>,
    /// The filter the agent holds (JSON; `None`: no policy).
    filter_sent: Option<String>,
    /// The snapshot version the agent's map is at since its last full
    /// map: events up to it are already there and are skipped.
    cursor: u64,
    /// How the agent takes a change of presence alone.
    presence: PresenceLines,
}

/// How a stream's agent takes a change of a peer's presence alone, from
/// what it asked for (`warren::control::MAP_PATH`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PresenceLines {
    /// The whole entry, as `peer_changed` (plain `/map`).
    #[default]
    Whole,
    /// A `peer_online` line per peer (`v=2`).
    PerPeer,
    /// One `presence` line per write, listing them all (`presence=1`).
    Batched,
}

impl Outbox {
    /// A new stream for node `me`; it owes a full map first.
    pub fn new(me: i64, now: Instant) -> Self {
        Outbox {
            me,
            known: RoaringTreemap::new(),
            pending: BTreeMap::new(),
            self_node: None,
            full: Some(false),
            removed: false,
            since: Some(now),
            last_write: None,
            access: Arc::new(Access::open()),
            visible: None,
            recheck: false,
            digest: None,
            filter_sent: None,
            cursor: 0,
            presence: PresenceLines::Whole,
        }
    }

    /// The policy as compiled now; the stream sends what it changes.
    ///
    /// When the peers this node may see are the same as before (their
    /// digest did not change: a rule's ports edited, a node joining that
    /// this one may not see), nothing is compared peer by peer; the set
    /// is only built when its form changes (no policy → a policy), so that
    /// a node joining later is judged by the new policy.
    pub fn set_access(&mut self, access: Arc<Access>) {
        let digest = access.visible_digest(self.me);
        let same = self.digest.replace(digest) == Some(digest);
        if !same {
            self.visible = access.visible_set(self.me);
            self.recheck = true;
        } else if access.is_open() {
            self.visible = None;
        } else if self.visible.is_none() {
            self.visible = access.visible_set(self.me);
        }
        self.access = access;
    }

    /// What the agent understands of presence lines.
    pub fn set_presence_lines(&mut self, presence: PresenceLines) {
        self.presence = presence;
    }

    fn sees(&self, id: i64) -> bool {
        self.visible.as_ref().is_none_or(|v| v.contains(&id))
    }

    /// Whether [`Outbox::recheck`] should run before the next flush.
    pub fn needs_recheck(&self) -> bool {
        self.recheck && self.full.is_none()
    }

    /// Owes the agent the peers it may now see and the removal of those it
    /// may no longer, from the hub's snapshot.
    pub fn recheck(&mut self, snap: &Snapshot) {
        self.recheck = false;
        let me = self.me;
        for (id, u) in snap.iter().filter(|(id, _)| **id != me) {
            let (sees, holds) = (self.sees(*id), self.known.contains(bit(*id)));
            if sees && !holds && !self.pending.contains_key(&u.node.key) {
                self.pend(u.node.key, *id, State::Upsert(u.clone()), false);
            } else if !sees && holds {
                self.pend(u.node.key, *id, State::Removed(*id), false);
            }
        }
    }

    /// What a full map must hold: the visible ids (`None`: all) and the
    /// filter.
    pub fn full_parts(&self) -> (Option<&HashSet<i64>>, Option<&str>) {
        (self.visible.as_ref(), self.access.filter_json(self.me))
    }

    /// Takes in one hub event.
    pub fn push(&mut self, ev: HubEvent, now: Instant) {
        let seen = |v: u64| v != 0 && v <= self.cursor;
        match ev {
            HubEvent::Upsert(u) if seen(u.version) => return,
            HubEvent::Removed { version, .. } if seen(version) => return,
            HubEvent::Upsert(u) if u.node.id == self.me => self.self_node = Some(u),
            HubEvent::Upsert(u) => {
                let presence = u.presence_only;
                self.pend(u.node.key, u.node.id, State::Upsert(u), presence)
            }
            HubEvent::Removed { node_id, .. } if node_id == self.me => self.removed = true,
            HubEvent::Removed { node_id, key, .. } => {
                self.pend(key, node_id, State::Removed(node_id), false)
            }
            HubEvent::Resync => self.full = Some(true),
            HubEvent::Access(a) => self.set_access(a),
        }
        self.since.get_or_insert(now);
    }

    fn pend(&mut self, key: NodeKey, id: i64, state: State, presence_only: bool) {
        self.pending
            .entry(key)
            .and_modify(|p| {
                p.state = state.clone();
                p.presence_only &= presence_only;
            })
            .or_insert(Pending {
                base: id,
                state,
                presence_only,
            });
    }

    /// Events were lost (the broadcast overtook this stream).
    pub fn lagged(&mut self, now: Instant) {
        self.full = Some(true);
        self.since.get_or_insert(now);
    }

    /// Whether a removal of this node was pushed: the stream should end
    /// without waiting for the tick.
    pub fn is_removed(&self) -> bool {
        self.removed
    }

    /// Changes waiting to be written (peers, plus one for this node).
    pub fn backlog(&self) -> usize {
        self.pending.len() + usize::from(self.self_node.is_some())
    }

    /// When [`Outbox::poll_flush`] will have something to write; `None`
    /// when nothing is owed.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let since = self.since?;
        if self.removed {
            return Some(since);
        }
        Some(match self.last_write {
            Some(last) => since.max(last + TICK),
            None => since,
        })
    }

    /// What to write now. `map_len` is the number of nodes in the hub's
    /// snapshot, to judge whether a full map is cheaper than the backlog.
    pub fn poll_flush(&mut self, now: Instant, map_len: usize) -> Flush {
        if self.removed {
            return Flush::Removed;
        }
        match self.poll_timeout() {
            Some(due) if due <= now => {}
            _ => return Flush::Wait,
        }
        self.since = None;
        let previous_write = self.last_write.replace(now);
        let me = self.self_node.take();
        let behind = self.pending.len() >= MIN_FULL && self.pending.len() * 4 >= map_len * 3;
        if self.full.is_some() || behind {
            self.pending.clear();
            return Flush::Full {
                recheck: self.full.take().unwrap_or(false),
                me,
            };
        }
        let mut text = Lines::default();
        // A `presence` line's peers, written after the other lines: they
        // are all ones the agent holds, so no line before it matters to
        // them.
        let mut presence: Vec<Arc<Upserted>> = Vec::new();
        if let Some(u) = &me {
            text.own()
                .push_str(&line("self_changed", "node", &u.peer_json));
        }
        for (key, p) in std::mem::take(&mut self.pending) {
            let had = self.known.remove(bit(p.base));
            match p.state {
                // A peer this node may not see: held, it is removed.
                State::Upsert(u) if !self.sees(u.node.id) => {
                    if self.known.remove(bit(u.node.id)) || had {
                        let _ = writeln!(text.own(), r#"{{"type":"peer_removed","key":"{key}"}}"#);
                    }
                }
                State::Upsert(u) => {
                    let added = self.known.insert(bit(u.node.id)) && !had;
                    let line = match self.presence {
                        _ if added => &u.added_line,
                        PresenceLines::Batched if p.presence_only => {
                            presence.push(u);
                            continue;
                        }
                        PresenceLines::PerPeer if p.presence_only => &u.presence_line,
                        _ => &u.changed_line,
                    };
                    text.shared(line);
                }
                State::Removed(id) => {
                    if self.known.remove(bit(id)) || had {
                        // The shape `MapMessage::PeerRemoved` encodes to
                        // (pinned by a test of the protocol types).
                        let _ = writeln!(text.own(), r#"{{"type":"peer_removed","key":"{key}"}}"#);
                    }
                }
            }
        }
        if !presence.is_empty() {
            // The shape `MapMessage::Presence` encodes to (pinned by a
            // test of the protocol types). Sized exactly: in a storm this
            // line lists thousands of peers and waits in the stream's
            // queue, where spare capacity would wait with it.
            const HEAD: &str = r#"{"type":"presence","peers":["#;
            const TAIL: &str = "]}\n";
            let entries: usize = presence.iter().map(|u| u.presence_entry.len() + 1).sum();
            let own = text.own();
            own.reserve_exact(HEAD.len() + entries - 1 + TAIL.len());
            own.push_str(HEAD);
            for (i, u) in presence.iter().enumerate() {
                if i > 0 {
                    own.push(',');
                }
                own.push_str(&u.presence_entry);
            }
            own.push_str(TAIL);
        }
        let filter = self.access.filter_json(self.me);
        if filter != self.filter_sent.as_deref() {
            let own = text.own();
            own.push_str(r#"{"type":"filter_changed","packet_filter":"#);
            own.push_str(filter.unwrap_or("null"));
            own.push_str("}\n");
            self.filter_sent = filter.map(str::to_owned);
        }
        if text.is_empty() {
            // Only removals of peers the agent never heard of: no write,
            // so the next change is not held back by a tick.
            self.last_write = previous_write;
            return Flush::Wait;
        }
        Flush::Lines { text, me }
    }

    /// A full map listing these peers (by node id) was written, built from
    /// the snapshot at `version`.
    pub fn full_sent(&mut self, known: RoaringTreemap, version: u64) {
        self.known = known;
        self.cursor = version;
        self.recheck = false;
        self.filter_sent = self.access.filter_json(self.me).map(str::to_owned);
    }
}

impl Outbox {
    /// After a full map from a shared encoding that is older than the
    /// snapshot (`Hub::encoded_peers`): owes the agent what changed in
    /// between (`since`: nodes removed, then nodes changed or added), and
    /// moves the cursor to the snapshot version it was read at. Only for a
    /// node that may see every peer, as the shared encoding is.
    pub fn catch_up(&mut self, since: &Since) {
        let me = self.me;
        for (id, key) in since.gone.iter().filter(|g| g.0 != me) {
            self.pend(*key, *id, State::Removed(*id), false);
        }
        for (u, presence) in since.changed.iter().filter(|(u, _)| u.node.id != me) {
            self.pend(u.node.key, u.node.id, State::Upsert(u.clone()), *presence);
        }
        self.cursor = since.version;
        if !self.pending.is_empty() {
            // Written at the next tick, as changes arriving now would be.
            self.since = self.last_write.or(self.since);
        }
    }
}

/// `{"type":kind,"field":json}` and a newline.
pub fn line(kind: &str, field: &str, json: &str) -> String {
    let mut text = String::with_capacity(json.len() + kind.len() + field.len() + 20);
    text.push_str(r#"{"type":""#);
    text.push_str(kind);
    text.push_str(r#"",""#);
    text.push_str(field);
    text.push_str(r#"":"#);
    text.push_str(json);
    text.push_str("}\n");
    text
}

/// Lines to write in one go, in order: the peers' lines are the hub's
/// shared bytes ([`Upserted::added_line`]), the others (removals, this
/// node's own entry, its filter) are this stream's.
#[derive(Debug, Default)]
pub struct Lines {
    parts: Vec<Bytes>,
    own: String,
}

impl Lines {
    fn own(&mut self) -> &mut String {
        &mut self.own
    }

    fn shared(&mut self, line: &Bytes) {
        self.close_own();
        self.parts.push(line.clone());
    }

    fn close_own(&mut self) {
        if !self.own.is_empty() {
            self.parts.push(Bytes::from(std::mem::take(&mut self.own)));
        }
    }

    pub fn is_empty(&self) -> bool {
        self.parts.is_empty() && self.own.is_empty()
    }

    /// The buffers to write, in order.
    pub fn into_parts(mut self) -> Vec<Bytes> {
        self.close_own();
        self.parts
    }

    /// All of it as one string (for tests and logs).
    pub fn text(&self) -> String {
        let mut s: String = self
            .parts
            .iter()
            .map(|b| String::from_utf8_lossy(b))
            .collect();
        s.push_str(&self.own);
        s
    }
}

/// A `full` map line (without its newline) from the hub's snapshot, and the
/// node ids of the peers it lists. `me_json` and `relay_json` are this node and
/// the relay map, already encoded.
pub fn full_line(
    snap: &Snapshot,
    me: i64,
    me_json: &str,
    relay_json: &str,
) -> (String, RoaringTreemap) {
    full_line_with(snap, me, me_json, relay_json, (None, None))
}

/// Adds the network's DNS settings (JSON) to a full map's line.
pub fn add_dns(line: &mut String, dns_json: &str) {
    if line.ends_with('}') {
        line.pop();
        line.push_str(r#","dns":"#);
        line.push_str(dns_json);
        line.push('}');
    }
}

/// [`full_line`] with only the `visible` peers (`None`: all) and the
/// node's packet filter, as [`Outbox::full_parts`] gives them.
pub fn full_line_with(
    snap: &Snapshot,
    me: i64,
    me_json: &str,
    relay_json: &str,
    (visible, filter): (Option<&HashSet<i64>>, Option<&str>),
) -> (String, RoaringTreemap) {
    let (head, tail) = full_frame(me_json, relay_json, filter);
    let mut line = String::with_capacity(
        snap.values().map(|u| u.peer_json.len() + 1).sum::<usize>() + head.len() + tail.len(),
    );
    line.push_str(&head);
    let mut known = RoaringTreemap::new();
    let sees = |id: i64| visible.is_none_or(|v| v.contains(&id));
    for u in snap.values().filter(|u| u.node.id != me && sees(u.node.id)) {
        if !known.is_empty() {
            line.push(',');
        }
        line.push_str(&u.peer_json);
        known.insert(bit(u.node.id));
    }
    line.push_str(&tail);
    (line, known)
}

/// What a `full` line holds around its comma-separated peers (without a
/// newline): `{"type":"full","self_node":ME,"peers":[` and
/// `],"relay_map":RELAY[,"packet_filter":FILTER]}`. The one place that
/// shape is written, for both a stream's own line and the shared
/// encoding's slices (`api/map.rs`).
pub fn full_frame(me_json: &str, relay_json: &str, filter: Option<&str>) -> (String, String) {
    let head = format!(r#"{{"type":"full","self_node":{me_json},"peers":["#);
    let mut tail = format!(r#"],"relay_map":{relay_json}"#);
    if let Some(f) = filter {
        tail.push_str(r#","packet_filter":"#);
        tail.push_str(f);
    }
    tail.push('}');
    (head, tail)
}
