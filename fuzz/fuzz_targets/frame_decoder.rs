//! The frame decoder on arbitrary bytes in arbitrary chunks: never panics,
//! never buffers past the limit plus one chunk, and yields the same frames
//! (and the same error) however the stream is split.
#![no_main]

use libfuzzer_sys::fuzz_target;
use netproc_wire::{ClientMessage, FrameDecoder, FrameError, ServerMessage};

fn run(stream: &[u8], chunk: usize, limit: u32) -> (Vec<Vec<u8>>, Option<FrameError>) {
    let mut decoder = FrameDecoder::new(limit);
    let mut frames = Vec::new();
    for piece in stream.chunks(chunk.max(1)) {
        decoder.feed(piece);
        assert!(decoder.buffered() <= limit as usize + 4 + piece.len());
        loop {
            match decoder.next_frame() {
                Ok(Some(frame)) => {
                    let _ = ClientMessage::decode(&frame);
                    let _ = ServerMessage::decode(&frame);
                    frames.push(frame.to_vec());
                }
                Ok(None) => break,
                Err(e) => return (frames, Some(e)),
            }
        }
    }
    (frames, None)
}

fuzz_target!(|data: &[u8]| {
    let Some((&control, stream)) = data.split_first() else {
        return;
    };
    let limit = u32::from(control & 0x0f) * 64 + 1;
    let chunk = usize::from(control >> 4) + 1;
    let whole = run(stream, stream.len(), limit);
    let split = run(stream, chunk, limit);
    assert_eq!(whole, split);
});
