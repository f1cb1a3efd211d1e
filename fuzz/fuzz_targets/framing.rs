//! Stream framing: how TCP/TLS reads are cut must not change what comes out.
//!
//! A stream delivers bytes in whatever pieces the network and the kernel choose, so the
//! framer has to give the same frames, and fail at the same point, whether it sees the input
//! whole or a few bytes at a time. The first 8 bytes of the input seed the chunk sizes; the
//! rest is the stream.
//!
//! Invariants:
//! - frames and the final outcome (error, or bytes still buffered) are the same for the whole
//!   input and for any chunking of it;
//! - the frames, written back (a ping as CRLFCRLF, a pong as CRLF), are exactly the front of
//!   the input: framing never drops, duplicates or reorders a byte;
//! - every message frame fits the size limit and holds a complete header section.

#![no_main]

use libfuzzer_sys::fuzz_target;
use sbc_sip::framing::{Frame, FramingError, StreamFramer};

/// Small enough that the fuzzer reaches the size limit, large enough for real messages.
const MAX: usize = 2048;

#[derive(Debug, PartialEq)]
enum End {
    Failed(FramingError),
    Waiting(usize),
}

/// Pulls every frame the framer can give now; `Err` ends the stream.
fn drain(f: &mut StreamFramer, frames: &mut Vec<Frame>) -> Result<(), FramingError> {
    // Bounded: each frame consumes at least two bytes.
    loop {
        match f.next_frame()? {
            Some(frame) => frames.push(frame),
            None => return Ok(()),
        }
    }
}

fn run(stream: &[u8], chunks: &mut dyn Iterator<Item = usize>) -> (Vec<Frame>, End) {
    let mut f = StreamFramer::new(MAX);
    let mut frames = Vec::new();
    let mut rest = stream;
    while !rest.is_empty() {
        let n = chunks.next().unwrap_or(rest.len()).clamp(1, rest.len());
        let (now, later) = rest.split_at(n);
        f.push(now);
        rest = later;
        if let Err(e) = drain(&mut f, &mut frames) {
            // Errors are sticky: pushing more must not revive the stream.
            f.push(rest);
            assert_eq!(f.next_frame(), Err(e), "a failed stream produced a frame");
            return (frames, End::Failed(e));
        }
    }
    let end = End::Waiting(f.buffered());
    (frames, end)
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 8 {
        return;
    }
    let (seed, stream) = data.split_at(8);
    let mut state = u64::from_le_bytes(seed.try_into().unwrap_or([0; 8])) | 1;
    // xorshift64: chunk sizes of 1..=64 bytes, with the odd big one.
    let mut sizes = std::iter::from_fn(move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        Some(if state % 16 == 0 {
            (state >> 8) as usize % 1024 + 1
        } else {
            (state >> 8) as usize % 64 + 1
        })
    });

    let (whole, whole_end) = run(stream, &mut std::iter::empty());
    let (chunked, chunked_end) = run(stream, &mut sizes);
    assert_eq!(whole, chunked, "chunking changed the frames");
    assert_eq!(whole_end, chunked_end, "chunking changed how the stream ended");

    let mut rebuilt = Vec::with_capacity(stream.len());
    for frame in &whole {
        match frame {
            Frame::Message(m) => {
                assert!(m.len() <= MAX, "message of {} bytes passed a {MAX} limit", m.len());
                assert!(
                    m.windows(2).any(|w| w == b"\n\n") || m.windows(3).any(|w| w == b"\n\r\n"),
                    "message frame without the end of its header section"
                );
                rebuilt.extend_from_slice(m);
            }
            Frame::Ping => rebuilt.extend_from_slice(b"\r\n\r\n"),
            Frame::Pong => rebuilt.extend_from_slice(b"\r\n"),
        }
    }
    assert!(
        stream.starts_with(&rebuilt),
        "frames are not the front of the stream"
    );
    if let End::Waiting(buffered) = whole_end {
        assert_eq!(
            rebuilt.len() + buffered,
            stream.len(),
            "bytes lost between frames"
        );
    }
});
