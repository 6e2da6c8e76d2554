//! Fuzzes the direct-TCP stream decoder on arbitrary bytes, split into
//! reads at arbitrary points.
//!
//! Properties: nothing panics; every frame that decodes re-encodes to
//! exactly the bytes it came from; once the decoder fails it stays failed.

#![no_main]

use libfuzzer_sys::fuzz_target;
use warren::proto::stream::{encode, StreamDecoder};

fuzz_target!(|data: &[u8]| {
    let Some((&step, rest)) = data.split_first() else {
        return;
    };
    let step = usize::from(step).max(1);
    let mut dec = StreamDecoder::new();
    let mut consumed = 0usize;
    for chunk in rest.chunks(step) {
        dec.push(chunk);
        loop {
            match dec.next_frame() {
                Ok(Some(frame)) => {
                    let mut again = Vec::new();
                    encode(&frame, &mut again).expect("a decoded frame re-encodes");
                    assert_eq!(&rest[consumed..consumed + again.len()], &again[..]);
                    consumed += again.len();
                }
                Ok(None) => break,
                Err(_) => {
                    assert!(dec.next_frame().is_err(), "a failed stream stays failed");
                    return;
                }
            }
        }
    }
});
