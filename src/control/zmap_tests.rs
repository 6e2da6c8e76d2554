//! The map stream's frames: stored frames and compressed ones decode to
//! what was framed, however the body is cut; what a hostile body can make
//! the reader do is bounded.

use super::*;

fn text(n: usize) -> Vec<u8> {
    (0..n).map(|i| b"{\"peer\":12345},"[i % 15]).collect()
}

/// Everything `body` decodes to, fed `step` bytes at a time.
fn unframe(body: &[u8], step: usize) -> Result<Vec<u8>, FrameError> {
    let mut u = Unframer::new();
    let mut dec = Decoder::new()?;
    let mut out = Vec::new();
    for chunk in body.chunks(step.max(1)) {
        u.push(chunk);
        while u.next_into(&mut dec, &mut out)? {}
    }
    assert_eq!(u.pending(), 0, "a whole body leaves nothing behind");
    Ok(out)
}

fn join(parts: &[Bytes]) -> Vec<u8> {
    parts.iter().flat_map(|p| p.iter().copied()).collect()
}

#[test]
fn stored_frames_carry_parts_of_any_size_and_zstd_reads_them_too() {
    let data = text(300_000);
    // Parts that straddle the 128 KiB block limit, and an empty one.
    let parts = vec![
        Bytes::copy_from_slice(&data[..5]),
        Bytes::new(),
        Bytes::copy_from_slice(&data[5..200_000]),
        Bytes::copy_from_slice(&data[200_000..]),
    ];
    let body = join(&raw_frames(parts));
    assert_eq!(
        body.len(),
        data.len() + 3 * 12,
        "three frames of 12-byte headers"
    );
    assert_eq!(zstd::decode_all(&body[..]).unwrap(), data);
    for step in [1, 7, 4096, body.len()] {
        assert_eq!(unframe(&body, step).unwrap(), data, "step {step}");
    }
    assert!(raw_frames(vec![Bytes::new()]).is_empty());
}

#[test]
fn compressed_and_stored_frames_mix_in_one_body() {
    let block = text(40_000);
    let mut body = join(&raw_frames(vec![Bytes::from_static(
        b"{\"type\":\"full\",\"peers\":[",
    )]));
    let frame = compress(&block).unwrap();
    assert!(frame.len() < block.len() / 4, "repetitive text compresses");
    body.extend_from_slice(&frame);
    body.extend(join(&raw_frames(vec![Bytes::from_static(b"]}\n")])));
    let mut want = b"{\"type\":\"full\",\"peers\":[".to_vec();
    want.extend_from_slice(&block);
    want.extend_from_slice(b"]}\n");
    for step in [1, 100, body.len()] {
        assert_eq!(unframe(&body, step).unwrap(), want);
    }
}

#[test]
fn a_frame_is_decoded_as_soon_as_it_is_whole() {
    let mut u = Unframer::new();
    let mut dec = Decoder::new().unwrap();
    let body = join(&raw_frames(vec![Bytes::from_static(
        b"{\"type\":\"keepalive\"}\n",
    )]));
    let mut out = Vec::new();
    u.push(&body[..body.len() - 1]);
    assert!(!u.next_into(&mut dec, &mut out).unwrap());
    u.push(&body[body.len() - 1..]);
    assert!(u.next_into(&mut dec, &mut out).unwrap());
    assert_eq!(out, b"{\"type\":\"keepalive\"}\n");
}

fn refused(body: &[u8]) -> FrameError {
    unframe(body, body.len()).expect_err("refused")
}

#[test]
fn hostile_frames_are_refused_with_a_reason() {
    assert!(matches!(
        refused(b"{\"type\":\"full\"}\n"),
        FrameError::Magic(_)
    ));
    // A content size over the limit (4-byte field).
    let mut big = MAGIC.to_vec();
    big.push(0b1010_0000);
    big.extend_from_slice(&(MAX_FRAME_CONTENT as u32 + 1).to_le_bytes());
    assert!(matches!(refused(&big), FrameError::TooLarge(_)));
    // No content size: not single-segment, FCS flag 0.
    assert!(matches!(
        refused(&[0x28, 0xb5, 0x2f, 0xfd, 0, 0x50]),
        FrameError::NoContentSize
    ));
    // A dictionary id.
    assert!(matches!(
        refused(&[0x28, 0xb5, 0x2f, 0xfd, 0b0010_0001, 1, 5]),
        FrameError::Unsupported
    ));
    // A stored frame that says 10 bytes and holds 4 in its block.
    let mut short = raw_header(4).to_vec();
    short[5..9].copy_from_slice(&10u32.to_le_bytes());
    short.extend_from_slice(b"abcd");
    assert!(matches!(
        refused(&short),
        FrameError::Corrupt(_) | FrameError::Length { .. }
    ));
    // Garbage inside a compressed block.
    let mut bad = compress(&text(10_000)).unwrap().to_vec();
    let mid = bad.len() / 2;
    bad[mid..].iter_mut().for_each(|b| *b ^= 0x5a);
    assert!(unframe(&bad, bad.len()).is_err());
}

#[test]
fn empty_blocks_without_end_do_not_grow_the_buffer_forever() {
    let mut u = Unframer::new();
    let mut dec = Decoder::new().unwrap();
    let mut head = MAGIC.to_vec();
    head.extend_from_slice(&[0b1010_0000, 0, 0, 0, 0]);
    u.push(&head);
    let mut out = Vec::new();
    // Empty raw blocks, never the last: 3 bytes each, no content.
    let empty = vec![0u8; 3 * 4096];
    let mut err = None;
    for _ in 0..2_000 {
        u.push(&empty);
        if let Err(e) = u.next_into(&mut dec, &mut out) {
            err = Some(e);
            break;
        }
    }
    assert!(matches!(err, Some(FrameError::Unfinished(_))), "{err:?}");
    assert!(out.is_empty());
}
