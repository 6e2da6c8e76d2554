//! Framing for the direct TCP path between two peers (see
//! docs/architecture.md, "Paths"): WireGuard packets and disco boxes on one
//! byte stream.
//!
//! A frame is `[len u16 BE][payload]`, with `1 <= len <= 65535`. The payload
//! is what a UDP datagram on the shared socket would carry, and it is
//! demultiplexed the same way, by its first bytes (disco magic or a
//! WireGuard type), so the stream needs no type byte of its own.
//!
//! The relay codec (`proto::relay`) is not reused: its frames name a peer
//! key and carry relay control types, while this stream has exactly one
//! peer at the far end and only ever carries packets. Two bytes of header
//! against five, and nothing to validate but the length.
//!
//! The decoder is incremental over a byte buffer (a read may end anywhere
//! inside a frame) and never panics; a zero length is a protocol error that
//! ends the stream, since no sender of ours ever writes one.

use bytes::{Buf, Bytes, BytesMut};

/// Header length: the u16 payload length.
pub const HEADER_LEN: usize = 2;
/// Largest payload: what fits a u16, and no UDP payload is larger.
pub const MAX_PAYLOAD: usize = u16::MAX as usize;

/// Why a stream's bytes were refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum StreamError {
    #[error("empty frame on the peer stream")]
    EmptyFrame,
    #[error("payload of {0} bytes does not fit a stream frame")]
    TooLong(usize),
}

/// Appends one frame carrying `payload` to `out`.
pub fn encode(payload: &[u8], out: &mut Vec<u8>) -> Result<(), StreamError> {
    let len = u16::try_from(payload.len()).map_err(|_| StreamError::TooLong(payload.len()))?;
    if len == 0 {
        return Err(StreamError::EmptyFrame);
    }
    out.reserve(HEADER_LEN + payload.len());
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(payload);
    Ok(())
}

/// One frame as a fresh buffer (the writer task queues these).
pub fn frame(payload: &[u8]) -> Result<Bytes, StreamError> {
    let mut out = Vec::new();
    encode(payload, &mut out)?;
    Ok(Bytes::from(out))
}

/// Incremental decoder: push what the socket gave, then take frames.
#[derive(Debug, Default)]
pub struct StreamDecoder {
    buf: BytesMut,
    failed: bool,
}

impl StreamDecoder {
    pub fn new() -> Self {
        StreamDecoder::default()
    }

    /// Appends bytes read from the stream.
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// Bytes held that do not form a whole frame yet.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// The next whole frame's payload, `None` until more bytes arrive. After
    /// an error the decoder stays failed: the stream is out of step and the
    /// caller closes it.
    pub fn next_frame(&mut self) -> Result<Option<Bytes>, StreamError> {
        if self.failed {
            return Err(StreamError::EmptyFrame);
        }
        let Some(header) = self.buf.get(..HEADER_LEN) else {
            return Ok(None);
        };
        let len = usize::from(u16::from_be_bytes([header[0], header[1]]));
        if len == 0 {
            self.failed = true;
            return Err(StreamError::EmptyFrame);
        }
        if self.buf.len() < HEADER_LEN + len {
            // Room for the rest, so the socket reads straight into place.
            self.buf.reserve(HEADER_LEN + len - self.buf.len());
            return Ok(None);
        }
        self.buf.advance(HEADER_LEN);
        Ok(Some(self.buf.split_to(len).freeze()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_all(wire: &[u8], step: usize) -> Result<Vec<Bytes>, StreamError> {
        let mut dec = StreamDecoder::new();
        let mut out = Vec::new();
        for chunk in wire.chunks(step.max(1)) {
            dec.push(chunk);
            while let Some(f) = dec.next_frame()? {
                out.push(f);
            }
        }
        assert_eq!(dec.buffered(), 0, "every byte consumed");
        Ok(out)
    }

    #[test]
    fn round_trip_at_every_split() {
        let payloads: Vec<Vec<u8>> = vec![
            vec![4, 0, 0, 0, 1, 2, 3],
            vec![0x57; 1],
            (0..=255u8).cycle().take(1500).collect(),
            vec![9; MAX_PAYLOAD],
        ];
        let mut wire = Vec::new();
        for p in &payloads {
            encode(p, &mut wire).unwrap();
        }
        assert_eq!(
            wire.len(),
            payloads.iter().map(|p| p.len() + HEADER_LEN).sum::<usize>()
        );
        for step in [1, 2, 3, 7, 1499, 1502, 70_000] {
            let got = decode_all(&wire, step).unwrap();
            assert_eq!(got.len(), payloads.len(), "step {step}");
            for (g, p) in got.iter().zip(&payloads) {
                assert_eq!(&g[..], &p[..], "step {step}");
            }
        }
    }

    #[test]
    fn header_is_big_endian_length() {
        let f = frame(&[1, 2, 3]).unwrap();
        assert_eq!(&f[..], &[0, 3, 1, 2, 3]);
        let mut wire = vec![0x01, 0x00];
        wire.extend(std::iter::repeat_n(7u8, 256));
        let got = decode_all(&wire, 5).unwrap();
        assert_eq!(got[0].len(), 256);
    }

    #[test]
    fn refuses_what_it_cannot_carry() {
        let mut out = Vec::new();
        assert_eq!(encode(&[], &mut out), Err(StreamError::EmptyFrame));
        assert_eq!(
            encode(&vec![0; MAX_PAYLOAD + 1], &mut out),
            Err(StreamError::TooLong(MAX_PAYLOAD + 1))
        );
        assert!(out.is_empty(), "a refused frame writes nothing");
    }

    #[test]
    fn zero_length_frame_fails_the_stream_for_good() {
        let mut dec = StreamDecoder::new();
        dec.push(&[0, 1, 9, 0, 0, 0, 1, 5]);
        assert_eq!(dec.next_frame().unwrap().unwrap().as_ref(), &[9]);
        assert_eq!(dec.next_frame(), Err(StreamError::EmptyFrame));
        // Even with a good frame after it: the stream is out of step.
        assert_eq!(dec.next_frame(), Err(StreamError::EmptyFrame));
    }

    #[test]
    fn partial_frame_waits() {
        let mut dec = StreamDecoder::new();
        dec.push(&[0]);
        assert_eq!(dec.next_frame(), Ok(None));
        dec.push(&[3, 1]);
        assert_eq!(dec.next_frame(), Ok(None));
        assert_eq!(dec.buffered(), 3);
        dec.push(&[2, 3, 0]);
        assert_eq!(dec.next_frame().unwrap().unwrap().as_ref(), &[1, 2, 3]);
        assert_eq!(dec.next_frame(), Ok(None));
        assert_eq!(dec.buffered(), 1);
    }
}
