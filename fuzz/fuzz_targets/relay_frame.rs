//! Fuzzes the relay frame decoder and the client session on arbitrary
//! bytes, split into reads at arbitrary points.
//!
//! Properties: nothing panics; a frame that decodes re-encodes to exactly
//! the bytes it came from (the codec has one encoding per frame, except for
//! the health frame, whose JSON may be spelled many ways).

#![no_main]

use libfuzzer_sys::fuzz_target;
use warren::keys::PrivateKey;
use warren::proto::relay::client::{ClientSession, SessionConfig};
use warren::proto::relay::{Frame, FrameDecoder, HEADER_LEN};

/// Header plus declared payload length of the frame starting at `at`.
fn frame_len(wire: &[u8], at: usize) -> usize {
    let len = u32::from_be_bytes([wire[at + 1], wire[at + 2], wire[at + 3], wire[at + 4]]);
    HEADER_LEN + len as usize
}

fuzz_target!(|data: &[u8]| {
    // First byte picks the read size, so frames straddle reads.
    let Some((&step, rest)) = data.split_first() else {
        return;
    };
    let step = usize::from(step).max(1);

    let mut dec = FrameDecoder::new(4096);
    let mut offset = 0usize;
    for chunk in rest.chunks(step) {
        dec.extend(chunk);
        loop {
            match dec.next_frame() {
                Ok(Some(frame)) => {
                    let enc = frame.to_bytes();
                    if !matches!(frame, Frame::Health(_)) {
                        assert_eq!(&rest[offset..offset + enc.len()], &enc[..]);
                    }
                    offset += frame_len(rest, offset);
                }
                Ok(None) => break,
                Err(e) if e.is_fatal() => return,
                // Unknown type: skipped whole.
                Err(_) => offset += frame_len(rest, offset),
            }
        }
    }

    // The client session must survive anything a hostile relay sends.
    let now = std::time::Instant::now();
    let mut s = ClientSession::new(PrivateKey::generate(), SessionConfig::default(), now);
    for chunk in rest.chunks(step) {
        if s.handle_input(now, chunk).is_err() {
            break;
        }
        while s.poll_event().is_some() {}
        let _ = s.poll_transmit();
    }
});
