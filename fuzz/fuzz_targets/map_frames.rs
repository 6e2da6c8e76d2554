//! Fuzzes the compressed map stream's reader (`control::zmap::Unframer`)
//! on arbitrary bytes, split into reads at arbitrary points.
//!
//! Properties: nothing panics; no frame decodes to more than it declared
//! (at most `MAX_FRAME_CONTENT`); once the reader fails the agent drops
//! the stream, so nothing after a failure is read.

#![no_main]

use libfuzzer_sys::fuzz_target;
use warren::control::zmap::{Decoder, Unframer, MAX_FRAME_CONTENT};

fuzz_target!(|data: &[u8]| {
    let Some((&step, rest)) = data.split_first() else {
        return;
    };
    let step = usize::from(step).max(1);
    let Ok(mut dec) = Decoder::new() else {
        return;
    };
    let mut u = Unframer::new();
    for chunk in rest.chunks(step) {
        u.push(chunk);
        loop {
            let mut out = Vec::new();
            match u.next_into(&mut dec, &mut out) {
                Ok(true) => assert!(out.len() <= MAX_FRAME_CONTENT),
                Ok(false) => break,
                Err(_) => return,
            }
        }
    }
});
