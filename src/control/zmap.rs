//! The map stream's compression: a sequence of zstd frames.
//!
//! An agent that asks for `GET /map?…&zstd=1` ([`super::MAP_PATH`]) gets,
//! from a coordinator run with `serve --compress-maps`, a body marked
//! `Content-Encoding: zstd` that is a concatenation of independent zstd
//! frames; decoded and joined, they are the same newline-delimited JSON as
//! the plain stream. Older agents do not ask and get plain lines; an older
//! coordinator, or one without the flag, ignores the query and sends plain
//! lines without the header, which the agent reads as before.
//!
//! Why frames rather than one compressed stream per connection: a full map
//! of a 10,000-node network is 2.8 MB, and after a coordinator restart
//! every stream is owed one at once. Compressing each stream's bytes would
//! compress the same map 10,000 times. Instead the coordinator compresses
//! the shared encoding of the peers once per snapshot version, in blocks of
//! entries, each its own frame (`coordinator/src/hub/encoded.rs`), and a
//! stream's full map is those shared frames plus stored ("raw") frames for
//! what is its own: the head and tail of its line and the block that holds
//! its own entry, which it leaves out. Delta lines are small and mostly
//! random keys: they go as raw frames ([`raw_frames`]), which cost 12 bytes
//! and no CPU, and reach the agent as soon as they are written.
//!
//! The reader ([`Unframer`]) cuts complete frames out of the body and
//! decodes each at once, so a delta is never held back waiting for more
//! input. It accepts only frames that declare their content size, at most
//! [`MAX_FRAME_CONTENT`] each, with no dictionary: a hostile body cannot
//! make it allocate more than one frame's worth at a time.
//!
//! The stored frames are written here by hand (zstd's library has no call
//! that emits an uncompressed frame around bytes it did not copy); the
//! frame format is RFC 8878, section 3.1.1. Compressed frames and all
//! decoding are the `zstd` crate's.

use bytes::Bytes;

/// The most content one frame may declare.
pub const MAX_FRAME_CONTENT: usize = 4 << 20;

/// Writes up to this size are copied into one buffer with their header.
const SMALL: usize = 4096;

/// Largest raw block (RFC 8878: `Block_Maximum_Size`, 128 KiB).
const MAX_BLOCK: usize = 128 << 10;

const MAGIC: [u8; 4] = [0x28, 0xb5, 0x2f, 0xfd];

/// Why a compressed map stream could not be read.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("not a zstd frame (magic {0:02x?})")]
    Magic([u8; 4]),
    #[error("zstd frame without a content size")]
    NoContentSize,
    #[error("zstd frame of {0} bytes (at most {MAX_FRAME_CONTENT})")]
    TooLarge(u64),
    #[error("zstd frame uses a dictionary or reserved bits")]
    Unsupported,
    #[error("zstd frame does not decode: {0}")]
    Corrupt(#[source] std::io::Error),
    #[error("zstd frame decoded to {got} bytes, declared {declared}")]
    Length { got: usize, declared: usize },
    #[error("{0} bytes buffered without a whole zstd frame")]
    Unfinished(usize),
}

/// The most a reader holds of one unfinished frame: its content and a
/// block header per 1 KiB of it, far more than any encoder writes.
const MAX_BUFFERED: usize = MAX_FRAME_CONTENT + MAX_FRAME_CONTENT / 256 + 64;

/// Stored frames around `parts` (joined, in order): at most 128 KiB of
/// content each, their header the only new bytes; `parts` are sliced, not
/// copied, unless all of them are small. Empty input gives no frame.
pub fn raw_frames(parts: Vec<Bytes>) -> Vec<Bytes> {
    let total: usize = parts.iter().map(Bytes::len).sum();
    if total == 0 {
        return Vec::new();
    }
    // A small write (a delta, a keepalive) is copied behind its header
    // into one buffer: one body chunk, not a 12-byte one and then its
    // payload.
    if total <= SMALL {
        let mut one = Vec::with_capacity(12 + total);
        one.extend_from_slice(&raw_header(total));
        for p in &parts {
            one.extend_from_slice(p);
        }
        return vec![Bytes::from(one)];
    }
    let mut out = Vec::with_capacity(parts.len() + total / MAX_BLOCK + 1);
    let mut left = total;
    let mut parts = parts.into_iter().filter(|p| !p.is_empty());
    let mut cur: Option<Bytes> = None;
    while left > 0 {
        let size = left.min(MAX_BLOCK);
        out.push(Bytes::copy_from_slice(&raw_header(size)));
        let mut need = size;
        while need > 0 {
            let Some(mut p) = cur.take().or_else(|| parts.next()) else {
                // Sizes were summed from these parts: cannot run short.
                break;
            };
            if p.len() > need {
                cur = Some(p.split_off(need));
            }
            need -= p.len();
            out.push(p);
        }
        left -= size;
    }
    out
}

/// A stored frame's header and its one block's header, for `size` bytes
/// (at most 128 KiB).
fn raw_header(size: usize) -> [u8; 12] {
    let mut h = [0u8; 12];
    h[..4].copy_from_slice(&MAGIC);
    // Frame_Header_Descriptor: a 4-byte content size, single segment (the
    // window is the content), no checksum, no dictionary.
    h[4] = 0b1010_0000;
    h[5..9].copy_from_slice(&(size as u32).to_le_bytes());
    // Block_Header: last block, type Raw (0), Block_Size.
    let block = ((size as u32) << 3) | 1;
    h[9..12].copy_from_slice(&block.to_le_bytes()[..3]);
    h
}

/// `data` as one compressed frame (level 3), or `None` if zstd failed
/// (the caller sends it stored instead).
pub fn compress(data: &[u8]) -> Option<Bytes> {
    thread_local! {
        // One context per thread, kept: a context per call would allocate
        // and free about a megabyte for every 32 KB block.
        static CCTX: std::cell::RefCell<Option<zstd::bulk::Compressor<'static>>> =
            const { std::cell::RefCell::new(None) };
    }
    CCTX.with(|c| {
        let mut c = c.borrow_mut();
        if c.is_none() {
            *c = zstd::bulk::Compressor::new(3).ok();
        }
        c.as_mut()?.compress(data).ok().map(Bytes::from)
    })
}

/// zstd's decoding context (about 96 KB): one per reader, or one per
/// thread for a load generator with thousands of streams.
pub struct Decoder(zstd::bulk::Decompressor<'static>);

impl Decoder {
    pub fn new() -> Result<Decoder, FrameError> {
        zstd::bulk::Decompressor::new()
            .map(Decoder)
            .map_err(FrameError::Corrupt)
    }
}

/// Cuts complete frames out of a compressed map stream and decodes them.
#[derive(Default)]
pub struct Unframer {
    buf: Vec<u8>,
    /// Where the next frame starts in `buf`: frames are cut out by offset
    /// and the buffer shifted once per push, not once per frame (a chunk
    /// of deltas holds hundreds).
    head: usize,
    /// Where the frame at the start of `buf` was parsed up to, so a frame
    /// that arrives in many chunks is not walked from its start each time.
    scan: Option<Scan>,
}

/// A frame parsed up to a block header.
#[derive(Debug, Clone, Copy)]
struct Scan {
    /// The offset of the next block header.
    at: usize,
    content: usize,
    checksum: bool,
}

impl Unframer {
    pub fn new() -> Unframer {
        Unframer::default()
    }

    /// Bytes of the body as they arrive.
    pub fn push(&mut self, chunk: &[u8]) {
        if self.head > 0 {
            self.buf.drain(..self.head);
            self.head = 0;
        }
        self.buf.extend_from_slice(chunk);
    }

    /// Bytes held that are not yet a whole frame.
    pub fn pending(&self) -> usize {
        self.buf.len() - self.head
    }

    /// Decodes the next complete frame onto the end of `out`: `Ok(true)`
    /// if there was one, `Ok(false)` if more input is needed.
    pub fn next_into(&mut self, dec: &mut Decoder, out: &mut Vec<u8>) -> Result<bool, FrameError> {
        let Some((len, content)) = self.extent()? else {
            if self.pending() > MAX_BUFFERED {
                return Err(FrameError::Unfinished(self.pending()));
            }
            return Ok(false);
        };
        let frame = &self.buf[self.head..self.head + len];
        // Straight into `out`: no buffer of its own per frame.
        let at = out.len();
        out.resize(at + content, 0);
        let got = dec
            .0
            .decompress_to_buffer(frame, &mut out[at..])
            .map_err(|e| {
                out.truncate(at);
                FrameError::Corrupt(e)
            })?;
        if got != content {
            out.truncate(at);
            return Err(FrameError::Length {
                got,
                declared: content,
            });
        }
        self.head += len;
        self.scan = None;
        Ok(true)
    }

    /// The length and content size of the frame at the start of the
    /// buffer, once the buffer holds all of it.
    fn extent(&mut self) -> Result<Option<(usize, usize)>, FrameError> {
        let mut scan = match self.scan {
            Some(s) => s,
            None => match frame_header(&self.buf[self.head..])? {
                Some(s) => s,
                None => return Ok(None),
            },
        };
        let b = &self.buf[self.head..];
        loop {
            let Some(h) = b.get(scan.at..scan.at + 3) else {
                self.scan = Some(scan);
                return Ok(None);
            };
            let h = u32::from_le_bytes([h[0], h[1], h[2], 0]);
            let last = h & 1 != 0;
            let size = (h >> 3) as usize;
            let stored = match (h >> 1) & 3 {
                // Raw and compressed blocks store `size` bytes; RLE one.
                0 | 2 => size,
                1 => 1,
                _ => return Err(FrameError::Unsupported),
            };
            if !last {
                scan.at += 3 + stored;
                continue;
            }
            let end = scan.at + 3 + stored + if scan.checksum { 4 } else { 0 };
            // The last block's header stays the resume point until the
            // block itself is here.
            self.scan = Some(scan);
            return Ok((b.len() >= end).then_some((end, scan.content)));
        }
    }
}

/// The header of the frame at the start of `b`: where its first block
/// starts, its content size, whether a checksum ends it; `None` until `b`
/// holds the whole header.
fn frame_header(b: &[u8]) -> Result<Option<Scan>, FrameError> {
    if b.len() < 5 {
        return Ok(None);
    }
    if b[..4] != MAGIC {
        return Err(FrameError::Magic([b[0], b[1], b[2], b[3]]));
    }
    let fhd = b[4];
    let single = fhd & 0b0010_0000 != 0;
    // A dictionary needs one we never agreed on; bit 3 is reserved.
    if fhd & 0b0000_1011 != 0 {
        return Err(FrameError::Unsupported);
    }
    let fcs_len = match fhd >> 6 {
        0 if single => 1,
        0 => return Err(FrameError::NoContentSize),
        1 => 2,
        2 => 4,
        _ => 8,
    };
    let at = 5 + usize::from(!single);
    let Some(fcs) = b.get(at..at + fcs_len) else {
        return Ok(None);
    };
    let mut le = [0u8; 8];
    le[..fcs_len].copy_from_slice(fcs);
    let mut content = u64::from_le_bytes(le);
    if fcs_len == 2 {
        content += 256;
    }
    if content > MAX_FRAME_CONTENT as u64 {
        return Err(FrameError::TooLarge(content));
    }
    Ok(Some(Scan {
        at: at + fcs_len,
        content: content as usize,
        checksum: fhd & 0b0000_0100 != 0,
    }))
}

#[cfg(test)]
#[path = "zmap_tests.rs"]
mod tests;
