//! The map's peers, encoded once per version of the hub's snapshot and
//! shared by every full map written from it.
//!
//! A full map of a 10,000-node network is about 3.5 MB of JSON. Each
//! stream used to build its own copy and hand it to its connection, so
//! after a coordinator restart, with thousands of streams owed a full map
//! at once and their agents reading them in turn, the coordinator held
//! thousands of private copies of the same bytes (it was killed for want of
//! memory at 14 GB; issue 19). Now the peers are encoded once per snapshot
//! version into one [`Bytes`], and a stream's full map is that buffer
//! minus its own entry: two or three slices of it (reference-counted, not
//! copied) between a small prefix and suffix of its own. A stream also
//! keeps the ids its agent holds as a compressed bitmap (`roaring`), not a
//! hash set: about 8 KB instead of 150 KB for 10,000 peers.
//!
//! For streams that take zstd (`warren::control::zmap`), the same bytes
//! are also compressed once per version, in blocks of about 32 KB of
//! whole entries, each its own frame ([`EncodedPeers::frames_without`]):
//! made at the first such stream's full map, shared by all of them. A
//! stream's own entry is left out of its block, which it then sends
//! stored; every other block goes as the shared compressed frame.
//!
//! This serves streams that may see every node (no policy, or a policy
//! that hides nobody from them). A stream that sees only some peers still
//! builds its own line (`outbox::full_line_with`): what it lists is its
//! own, and usually much shorter.

use bytes::Bytes;
use roaring::RoaringTreemap;
use warren::keys::NodeKey;

use std::ops::Range;
use std::sync::{Arc, OnceLock};

use super::{Snapshot, Upserted};

/// Every node's map entry, joined with commas, at one snapshot version.
#[derive(Debug)]
pub struct EncodedPeers {
    /// The snapshot version these bytes were built from.
    pub version: u64,
    /// `entry,entry,…,entry` in node id order.
    bytes: Bytes,
    /// Per node, in id order: its id, key, and its entry's span in `bytes`.
    spans: Vec<(i64, NodeKey, usize, usize)>,
    ids: RoaringTreemap,
    /// `bytes` cut at entry starts into blocks of about [`BLOCK`] bytes
    /// (each block's trailing comma included), each compressed once, at
    /// the first compressed stream's full map.
    blocks: OnceLock<Blocks>,
}

/// The compressed blocks of an [`EncodedPeers`]: every frame back to back
/// in one buffer, so a full map is a few slices of it (one body chunk
/// each), not a chunk per frame.
#[derive(Debug, Default)]
struct Blocks {
    packed: Bytes,
    /// Per block: its span of the plain bytes, and of `packed` (`None`
    /// when zstd failed on it: it goes stored).
    spans: Vec<(Range<usize>, Option<Range<usize>>)>,
}

/// About how many bytes of entries one compressed frame holds: big enough
/// to compress well, small enough that the block a stream sends stored
/// (the one with its own entry) is a small part of its map.
const BLOCK: usize = 32 << 10;

/// The difference between an [`EncodedPeers`] and the snapshot at
/// `version` (see [`EncodedPeers::since`]).
#[derive(Debug)]
pub struct Since {
    pub version: u64,
    pub gone: Vec<(i64, NodeKey)>,
    /// Each with whether only its presence changed since the encoding
    /// (`Upserted::entry_version`): then the agent, which holds the
    /// encoding's entry, may be sent its presence alone.
    pub changed: Vec<(Arc<Upserted>, bool)>,
}

/// A node id as the bitmaps hold it. Ids are the store's, positive.
pub fn bit(id: i64) -> u64 {
    id as u64
}

impl EncodedPeers {
    /// Encodes `snap` (at `version`) once.
    pub fn build(snap: &Snapshot, version: u64) -> EncodedPeers {
        let len = snap.values().map(|u| u.peer_json.len() + 1).sum::<usize>();
        let mut buf = Vec::with_capacity(len);
        let mut spans = Vec::with_capacity(snap.len());
        for (id, u) in snap {
            if !buf.is_empty() {
                buf.push(b',');
            }
            let start = buf.len();
            buf.extend_from_slice(u.peer_json.as_bytes());
            spans.push((*id, u.node.key, start, buf.len()));
        }
        EncodedPeers {
            version,
            bytes: Bytes::from(buf),
            spans,
            ids: snap.keys().map(|&id| bit(id)).collect(),
            blocks: OnceLock::new(),
        }
    }

    fn blocks(&self) -> &Blocks {
        self.blocks.get_or_init(|| {
            let mut cuts = vec![0];
            for s in &self.spans {
                if s.2 >= cuts[cuts.len() - 1] + BLOCK {
                    cuts.push(s.2);
                }
            }
            cuts.push(self.bytes.len());
            let mut packed = Vec::new();
            let spans = cuts
                .windows(2)
                .filter(|w| w[0] < w[1])
                .map(|w| {
                    let frame = warren::control::zmap::compress(&self.bytes[w[0]..w[1]]).map(|f| {
                        let at = packed.len();
                        packed.extend_from_slice(&f);
                        at..packed.len()
                    });
                    (w[0]..w[1], frame)
                })
                .collect();
            Blocks {
                packed: Bytes::from(packed),
                spans,
            }
        })
    }

    /// The entries of every node but `me`, as slices of the shared buffer
    /// that join into one comma-separated list, and the ids they list.
    pub fn without(&self, me: i64) -> (Vec<Bytes>, RoaringTreemap) {
        let parts = self.ranges_without(me);
        let slices = parts.into_iter().map(|r| self.bytes.slice(r)).collect();
        (slices, self.ids_without(me))
    }

    /// [`Self::without`] as zstd frames: the shared compressed blocks
    /// where a part covers them whole, stored frames for the rest (the
    /// block around `me`).
    pub fn frames_without(&self, me: i64) -> (Vec<Bytes>, RoaringTreemap) {
        let blocks = self.blocks();
        let mut frames = Vec::new();
        // Compressed blocks that follow each other in the plain bytes
        // follow each other in `packed` too: they go as one slice of it.
        let mut run: Option<Range<usize>> = None;
        let flush = |frames: &mut Vec<Bytes>, run: &mut Option<Range<usize>>| {
            if let Some(r) = run.take() {
                frames.push(blocks.packed.slice(r));
            }
        };
        let stored = |frames: &mut Vec<Bytes>, r: Range<usize>| {
            if !r.is_empty() {
                frames.extend(warren::control::zmap::raw_frames(vec![self.bytes.slice(r)]));
            }
        };
        for part in self.ranges_without(me) {
            let mut stored_from = part.start;
            for (r, packed) in &blocks.spans {
                let Some(packed) = packed else { continue };
                if r.start < part.start || r.end > part.end {
                    continue;
                }
                if stored_from < r.start {
                    flush(&mut frames, &mut run);
                    stored(&mut frames, stored_from..r.start);
                }
                run = Some(run.map_or(packed.start, |cur| cur.start)..packed.end);
                stored_from = r.end;
            }
            flush(&mut frames, &mut run);
            stored(&mut frames, stored_from..part.end);
        }
        (frames, self.ids_without(me))
    }

    fn ids_without(&self, me: i64) -> RoaringTreemap {
        let mut ids = self.ids.clone();
        ids.remove(bit(me));
        ids
    }

    /// The spans of the shared buffer that list every node but `me`.
    fn ranges_without(&self, me: i64) -> Vec<Range<usize>> {
        let n = self.spans.len();
        let all = self.bytes.len();
        let parts: [Range<usize>; 2] = match self.spans.binary_search_by_key(&me, |s| s.0) {
            Err(_) => [0..all, 0..0],
            Ok(_) if n == 1 => [0..0, 0..0],
            // The comma after `me` goes with it.
            Ok(0) => [self.spans[0].3 + 1..all, 0..0],
            // The comma before `me` goes with it.
            Ok(i) if i == n - 1 => [0..self.spans[i].2 - 1, 0..0],
            // The comma before `me` stays and separates the two halves.
            Ok(i) => [0..self.spans[i].2, self.spans[i].3 + 1..all],
        };
        parts.into_iter().filter(|r| !r.is_empty()).collect()
    }

    /// What `snap` (at `version`) holds that differs from this encoding:
    /// the nodes removed since, and those added or changed since. One
    /// walk of both in id order; the hub computes it once for every
    /// stream that writes a full map from this encoding at that version.
    pub fn since(&self, snap: &Snapshot, version: u64) -> Since {
        let mut out = Since {
            version,
            gone: Vec::new(),
            changed: Vec::new(),
        };
        let mut spans = self.spans.iter().peekable();
        for (id, u) in snap {
            while let Some(s) = spans.next_if(|s| s.0 < *id) {
                out.gone.push((s.0, s.1));
            }
            let listed = spans.next_if(|s| s.0 == *id).is_some();
            if !listed || u.version > self.version {
                let presence = listed && u.entry_version <= self.version;
                out.changed.push((u.clone(), presence));
            }
        }
        out.gone.extend(spans.map(|s| (s.0, s.1)));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snap(ids: &[i64]) -> Snapshot {
        ids.iter()
            .map(|&id| {
                let u = Upserted {
                    node: crate::store::NodeRecord::for_test(id),
                    peer_json: format!("{{\"n\":{id}}}"),
                    added_line: Bytes::new(),
                    changed_line: Bytes::new(),
                    presence_line: Bytes::new(),
                    presence_entry: "".into(),
                    presence_only: false,
                    entry_version: 1,
                    version: 1,
                };
                (id, Arc::new(u))
            })
            .collect()
    }

    fn joined(parts: &[Bytes]) -> String {
        parts
            .iter()
            .map(|b| String::from_utf8_lossy(b).into_owned())
            .collect()
    }

    #[test]
    fn every_position_of_me_leaves_a_valid_list_of_the_others() {
        let all = [3, 5, 8, 13];
        let e = EncodedPeers::build(&snap(&all), 1);
        for me in all.into_iter().chain([1, 99]) {
            let (parts, ids) = e.without(me);
            let others: Vec<i64> = all.into_iter().filter(|&i| i != me).collect();
            let want: Vec<String> = others.iter().map(|i| format!("{{\"n\":{i}}}")).collect();
            assert_eq!(joined(&parts), want.join(","), "me = {me}");
            let list: Vec<u64> = ids.iter().collect();
            assert_eq!(list, others.iter().map(|&i| bit(i)).collect::<Vec<_>>());
            // The list parses as JSON.
            let v: serde_json::Value =
                serde_json::from_str(&format!("[{}]", joined(&parts))).expect("valid JSON");
            assert_eq!(v.as_array().map(Vec::len), Some(others.len()));
        }
    }

    fn decoded(frames: &[Bytes]) -> String {
        let mut u = warren::control::zmap::Unframer::new();
        let mut dec = warren::control::zmap::Decoder::new().expect("decoder");
        let mut out = Vec::new();
        for f in frames {
            u.push(f);
            while u.next_into(&mut dec, &mut out).expect("a valid frame") {}
        }
        assert_eq!(u.pending(), 0);
        String::from_utf8(out).expect("utf-8")
    }

    #[test]
    fn compressed_frames_decode_to_the_same_list_for_every_me() {
        // 3,000 entries of about 100 bytes: ten blocks.
        let ids: Vec<i64> = (1..=3000).collect();
        let mut s = snap(&ids);
        for (id, u) in s.iter_mut() {
            let mut u2 = (**u).clone();
            u2.peer_json = format!("{{\"n\":{id},\"pad\":\"{}\"}}", "k".repeat(80));
            *u = Arc::new(u2);
        }
        let e = EncodedPeers::build(&s, 1);
        assert!(
            e.blocks().spans.len() >= 8,
            "{} blocks",
            e.blocks().spans.len()
        );
        // Every block's first and last entry, the ends, and a stranger.
        let mut mes: Vec<i64> = vec![1, 2, 1500, 2999, 3000, 4000];
        for (r, _) in &e.blocks().spans {
            let first = e.spans.iter().find(|s| s.2 == r.start).map(|s| s.0);
            let last = e.spans.iter().rev().find(|s| s.3 <= r.end).map(|s| s.0);
            mes.extend(first.into_iter().chain(last));
        }
        for me in mes {
            let (plain, ids) = e.without(me);
            let (frames, fids) = e.frames_without(me);
            assert_eq!(decoded(&frames), joined(&plain), "me = {me}");
            assert_eq!(ids, fids);
            let wire: usize = frames.iter().map(Bytes::len).sum();
            let raw: usize = plain.iter().map(Bytes::len).sum();
            assert!(wire < raw / 3, "me = {me}: {wire} bytes for {raw}");
            // The shared frames go as at most two slices around its own
            // block, plus that block stored: a few body chunks, not one
            // per block.
            assert!(frames.len() <= 6, "me = {me}: {} parts", frames.len());
        }
    }

    #[test]
    fn a_network_of_one_or_none_lists_nobody() {
        let (parts, ids) = EncodedPeers::build(&snap(&[4]), 1).without(4);
        assert!(parts.is_empty() && ids.is_empty());
        let (parts, ids) = EncodedPeers::build(&snap(&[]), 1).without(4);
        assert!(parts.is_empty() && ids.is_empty());
    }

    #[test]
    fn since_lists_what_was_removed_added_and_changed() {
        let old = snap(&[2, 3, 5, 8]);
        let e = EncodedPeers::build(&old, 1);
        let mut now = old.clone();
        now.remove(&2);
        now.remove(&8);
        // 5 changed in its presence alone since the encoding (its entry
        // is as of version 1), 3 in more than that; 9 is new.
        let mut five = (*now[&5]).clone();
        five.version = 2;
        now.insert(5, Arc::new(five));
        let mut three = (*now[&3]).clone();
        three.version = 2;
        three.entry_version = 2;
        now.insert(3, Arc::new(three));
        let mut nine = (*now[&3]).clone();
        nine.node.id = 9;
        nine.version = 3;
        nine.entry_version = 3;
        now.insert(9, Arc::new(nine));
        let d = e.since(&now, 3);
        let gone: Vec<i64> = d.gone.iter().map(|g| g.0).collect();
        let changed: Vec<(i64, bool)> = d.changed.iter().map(|(u, p)| (u.node.id, *p)).collect();
        assert_eq!(
            (gone, changed),
            (vec![2, 8], vec![(3, false), (5, true), (9, false)])
        );
        assert!(e.since(&old, 1).changed.is_empty() && e.since(&old, 1).gone.is_empty());
    }
}
