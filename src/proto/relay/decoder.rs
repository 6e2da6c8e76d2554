//! Incremental frame decoder.
//!
//! Bytes arrive in whatever pieces TCP, TLS or WebSocket hand over: half a
//! header, several frames at once, a frame split across reads. The decoder
//! owns one buffer, the caller appends to it, and [`FrameDecoder::next_frame`]
//! returns frames as long as complete ones are buffered. The declared length
//! is checked against the limit before any payload is awaited, so a peer
//! cannot make the relay buffer a 4 GiB frame.

use bytes::{Buf, BytesMut};

use super::{Frame, FrameError, FrameType, DEFAULT_MAX_PAYLOAD, HEADER_LEN};

/// Decodes frames from a growing byte buffer.
#[derive(Debug)]
pub struct FrameDecoder {
    buf: BytesMut,
    max_payload: usize,
}

impl Default for FrameDecoder {
    fn default() -> Self {
        Self::new(DEFAULT_MAX_PAYLOAD)
    }
}

impl FrameDecoder {
    pub fn new(max_payload: usize) -> Self {
        FrameDecoder {
            buf: BytesMut::with_capacity(16 * 1024),
            max_payload,
        }
    }

    /// Changes the payload limit, e.g. from the handshake's (a hello is 65
    /// bytes, so an unauthenticated peer cannot make us buffer more) to the
    /// session's. Bytes already buffered are kept.
    pub fn set_max_payload(&mut self, max_payload: usize) {
        self.max_payload = max_payload;
    }

    /// Appends received bytes.
    pub fn extend(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
    }

    /// The buffer itself, for readers that fill it in place
    /// (`AsyncReadExt::read_buf`), which avoids one copy per read.
    pub fn buffer_mut(&mut self) -> &mut BytesMut {
        &mut self.buf
    }

    /// Bytes buffered but not yet decoded.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// Returns the next complete frame, `Ok(None)` if more bytes are needed.
    ///
    /// A frame of unknown type is consumed and reported as
    /// [`FrameError::UnknownType`]; the caller may go on decoding. Any other
    /// error is fatal ([`FrameError::is_fatal`]): the caller must close the
    /// connection, since what follows can no longer be trusted.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, FrameError> {
        if self.buf.len() < HEADER_LEN {
            return Ok(None);
        }
        let ty_byte = self.buf[0];
        let len = u32::from_be_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]]) as usize;
        if len > self.max_payload {
            return Err(FrameError::Oversized {
                len,
                max: self.max_payload,
            });
        }
        if self.buf.len() < HEADER_LEN + len {
            // Reserve now so the next reads land without reallocating per read.
            self.buf.reserve(HEADER_LEN + len - self.buf.len());
            return Ok(None);
        }
        let Some(ty) = FrameType::from_u8(ty_byte) else {
            self.buf.advance(HEADER_LEN + len);
            return Err(FrameError::UnknownType(ty_byte));
        };
        let mut whole = self.buf.split_to(HEADER_LEN + len).freeze();
        whole.advance(HEADER_LEN);
        Frame::parse(ty, whole).map(Some)
    }
}

#[cfg(test)]
mod tests {
    use super::super::*;
    use super::*;
    use bytes::Bytes;

    fn key(b: u8) -> NodeKey {
        NodeKey([b; 32])
    }

    fn all_frames() -> Vec<Frame> {
        vec![
            Frame::ServerHello {
                version: PROTOCOL_VERSION,
                relay_key: key(1),
                challenge: [7; 32],
            },
            Frame::ClientHello {
                version: PROTOCOL_VERSION,
                node_key: key(2),
                proof: [9; 32],
            },
            Frame::Accepted,
            Frame::Refused {
                reason: RefuseReason::BadProof,
            },
            Frame::Refused {
                reason: RefuseReason::Other(200),
            },
            Frame::SendPacket {
                dest: key(3),
                packet: Bytes::from_static(b"ciphertext"),
            },
            Frame::SendPacket {
                dest: key(3),
                packet: Bytes::new(),
            },
            Frame::RecvPacket {
                src: key(4),
                packet: Bytes::from(vec![0xab; MAX_PACKET_LEN]),
            },
            Frame::PeerGone {
                key: key(5),
                reason: PeerGoneReason::NotHere,
            },
            Frame::KeepAlive,
            Frame::Ping([1, 2, 3, 4, 5, 6, 7, 8]),
            Frame::Pong([8, 7, 6, 5, 4, 3, 2, 1]),
            Frame::HealthRequest,
            Frame::Health(RelayHealth {
                clients: 3,
                drop_queue_full: 17,
                ..Default::default()
            }),
        ]
    }

    #[test]
    fn every_frame_round_trips() {
        for f in all_frames() {
            let mut d = FrameDecoder::default();
            d.extend(&f.to_bytes());
            assert_eq!(d.next_frame().unwrap(), Some(f.clone()));
            assert_eq!(d.next_frame().unwrap(), None);
            assert_eq!(d.buffered(), 0);
        }
    }

    #[test]
    fn byte_by_byte_and_many_in_one_read() {
        let frames = all_frames();
        let mut wire = BytesMut::new();
        for f in &frames {
            f.encode(&mut wire);
        }
        // One byte at a time: frames appear exactly when complete.
        let mut d = FrameDecoder::default();
        let mut got = Vec::new();
        for b in wire.iter() {
            d.extend(&[*b]);
            while let Some(f) = d.next_frame().unwrap() {
                got.push(f);
            }
        }
        assert_eq!(got, frames);
        // All at once.
        let mut d = FrameDecoder::default();
        d.extend(&wire);
        let mut got = Vec::new();
        while let Some(f) = d.next_frame().unwrap() {
            got.push(f);
        }
        assert_eq!(got, frames);
    }

    #[test]
    fn truncated_frame_waits() {
        let wire = Frame::Ping([1; 8]).to_bytes();
        let mut d = FrameDecoder::default();
        d.extend(&wire[..wire.len() - 1]);
        assert_eq!(d.next_frame().unwrap(), None);
        d.extend(&wire[wire.len() - 1..]);
        assert_eq!(d.next_frame().unwrap(), Some(Frame::Ping([1; 8])));
    }

    #[test]
    fn oversized_length_is_refused_before_payload_arrives() {
        let mut d = FrameDecoder::new(1000);
        d.extend(&[FrameType::SendPacket as u8, 0xff, 0xff, 0xff, 0xff]);
        let e = d.next_frame().unwrap_err();
        assert!(
            matches!(
                e,
                FrameError::Oversized {
                    len,
                    max: 1000
                } if len == u32::MAX as usize
            ),
            "{e:?}"
        );
        assert!(e.is_fatal());
    }

    #[test]
    fn unknown_type_is_skipped_not_fatal() {
        let mut d = FrameDecoder::default();
        d.extend(&[0x7f, 0, 0, 0, 2, 0xaa, 0xbb]);
        d.extend(&Frame::KeepAlive.to_bytes());
        let e = d.next_frame().unwrap_err();
        assert!(matches!(e, FrameError::UnknownType(0x7f)), "{e:?}");
        assert!(!e.is_fatal());
        assert_eq!(d.next_frame().unwrap(), Some(Frame::KeepAlive));
    }

    #[test]
    fn wrong_payload_lengths_are_typed_errors() {
        let cases: &[(FrameType, usize)] = &[
            (FrameType::ServerHello, 64),
            (FrameType::ClientHello, 66),
            (FrameType::Accepted, 1),
            (FrameType::Refused, 0),
            (FrameType::SendPacket, 31),
            (FrameType::RecvPacket, 0),
            (FrameType::PeerGone, 32),
            (FrameType::KeepAlive, 3),
            (FrameType::Ping, 7),
            (FrameType::Pong, 9),
            (FrameType::HealthRequest, 1),
        ];
        for &(ty, len) in cases {
            let mut wire = vec![ty as u8];
            wire.extend_from_slice(&(len as u32).to_be_bytes());
            wire.resize(HEADER_LEN + len, 0);
            let mut d = FrameDecoder::default();
            d.extend(&wire);
            match d.next_frame() {
                Err(FrameError::BadLength { ty: t, len: l, .. }) => {
                    assert_eq!((t, l), (ty, len));
                }
                other => panic!("{ty:?}/{len}: {other:?}"),
            }
        }
    }

    #[test]
    fn bad_health_json_is_typed() {
        let mut wire = vec![FrameType::Health as u8, 0, 0, 0, 3];
        wire.extend_from_slice(b"{x}");
        let mut d = FrameDecoder::default();
        d.extend(&wire);
        assert!(matches!(d.next_frame(), Err(FrameError::BadHealth(_))));
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        // A cheap deterministic stand-in for the fuzz target, so `cargo test`
        // covers the property too.
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for _ in 0..2000 {
            let mut d = FrameDecoder::new(4096);
            for _ in 0..8 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let n = (x % 97) as usize;
                let chunk: Vec<u8> = (0..n).map(|i| (x >> (i % 56)) as u8).collect();
                d.extend(&chunk);
                loop {
                    match d.next_frame() {
                        Ok(Some(_)) => continue,
                        Ok(None) => break,
                        Err(e) if e.is_fatal() => break,
                        Err(_) => continue,
                    }
                }
            }
        }
    }
}
