//! Framing: a `u32` big-endian length, then that many bytes of body.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::ErrorCode;

/// Bytes in a frame header (the big-endian `u32` body length).
pub const FRAME_HEADER_LEN: usize = 4;

/// Default limit on a frame body before authentication: 64 KiB.
pub const DEFAULT_MAX_PRE_AUTH_FRAME_BYTES: u32 = 64 * 1024;

/// Default limit on a frame body after authentication: 1 MiB.
pub const DEFAULT_MAX_POST_AUTH_FRAME_BYTES: u32 = 1024 * 1024;

/// A framing error. After one, the stream cannot be resynchronised: close it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FrameError {
    /// The declared body length is above the current limit. Detected from the
    /// header alone, before any of the body is buffered.
    #[error("frame of {declared} bytes exceeds the limit of {limit} bytes")]
    FrameTooLarge {
        /// The length the header declared (or, when encoding, the body's size).
        declared: u64,
        /// The limit in force.
        limit: u32,
    },
    /// A header declared a zero-length body, which no message has.
    #[error("zero-length frame")]
    ZeroLength,
}

impl FrameError {
    /// The wire error code for this failure.
    pub fn code(&self) -> ErrorCode {
        match self {
            FrameError::FrameTooLarge { .. } => ErrorCode::FrameTooLarge,
            FrameError::ZeroLength => ErrorCode::ProtocolError,
        }
    }
}

/// Splits one frame off the front of `buf`, if a whole one is there.
///
/// `Ok(None)` means more bytes are needed. The declared length is checked
/// against `limit` as soon as the header is present, before reserving memory
/// for the body.
pub(crate) fn split_frame(buf: &mut BytesMut, limit: u32) -> Result<Option<BytesMut>, FrameError> {
    let Some(header) = buf.get(..FRAME_HEADER_LEN) else {
        return Ok(None);
    };
    let declared = u32::from_be_bytes([header[0], header[1], header[2], header[3]]);
    if declared == 0 {
        return Err(FrameError::ZeroLength);
    }
    if declared > limit {
        return Err(FrameError::FrameTooLarge {
            declared: u64::from(declared),
            limit,
        });
    }
    // `declared` ≤ `limit` ≤ u32::MAX, so this cannot overflow a usize on the
    // 32- and 64-bit targets we support.
    let total = FRAME_HEADER_LEN + declared as usize;
    if buf.len() < total {
        buf.reserve(total - buf.len());
        return Ok(None);
    }
    buf.advance(FRAME_HEADER_LEN);
    Ok(Some(buf.split_to(declared as usize)))
}

/// A sans-I/O frame decoder: feed it bytes, take complete frame bodies out.
///
/// The limit can be changed at any time (a session raises it from the
/// pre-auth to the post-auth limit once the peer has authenticated); it
/// applies to every frame whose header has not yet been read.
///
/// After an error the decoder is finished: every later call returns the same
/// error and fed bytes are dropped, since a byte stream with a bad frame
/// cannot be resynchronised.
///
/// ```
/// use netproc_wire::{FrameDecoder, FrameError};
///
/// let mut decoder = FrameDecoder::new(16);
/// decoder.feed(&[0, 0, 0, 3, b'a']);
/// assert_eq!(decoder.next_frame(), Ok(None)); // need more
/// decoder.feed(b"bc");
/// assert_eq!(decoder.next_frame().unwrap().unwrap().as_ref(), b"abc");
///
/// decoder.feed(&[0, 0, 1, 0]); // declares 256 bytes, limit is 16
/// assert_eq!(
///     decoder.next_frame(),
///     Err(FrameError::FrameTooLarge { declared: 256, limit: 16 })
/// );
/// ```
#[derive(Debug)]
pub struct FrameDecoder {
    buf: BytesMut,
    limit: u32,
    failed: Option<FrameError>,
    /// Room offered to the last read, and how many reads in a row have
    /// not filled theirs (up to [`QUIET_AFTER`]).
    room: usize,
    quiet: u8,
}

/// Room a read gets on a busy connection: enough for many small frames.
const READ_CHUNK: usize = 16 * 1024;
/// Room a read gets on a quiet one: an idle connection keeps little memory.
const SMALL_READ: usize = 2 * 1024;
/// Reads in a row that did not fill their room before a connection counts
/// as quiet (so a moderately busy one does not trade buffers back and forth).
const QUIET_AFTER: u8 = 8;

impl FrameDecoder {
    /// A decoder refusing bodies longer than `limit` bytes.
    pub fn new(limit: u32) -> Self {
        FrameDecoder {
            buf: BytesMut::new(),
            limit,
            failed: None,
            room: 0,
            quiet: QUIET_AFTER,
        }
    }

    /// The current body limit.
    pub fn limit(&self) -> u32 {
        self.limit
    }

    /// Changes the body limit for frames whose header has not been read yet.
    pub fn set_limit(&mut self, limit: u32) {
        self.limit = limit;
    }

    /// Appends received bytes. Dropped if the decoder has already failed.
    pub fn feed(&mut self, bytes: &[u8]) {
        if self.failed.is_none() {
            self.buf.extend_from_slice(bytes);
        }
    }

    /// The internal buffer with room for the next read from a socket (e.g.
    /// `AsyncReadExt::read_buf`); report what the read returned with
    /// [`read_done`](Self::read_done). The room is large (16 KiB) from a
    /// read that filled the room it had until 8 reads in a row have not,
    /// small (2 KiB) otherwise, and the large buffer of a connection gone
    /// quiet is let go once it is empty: a busy connection reads many
    /// frames at a time, an idle one holds little memory.
    ///
    /// ```
    /// use netproc_wire::FrameDecoder;
    ///
    /// let mut decoder = FrameDecoder::new(1 << 20);
    /// let quiet = decoder.read_buffer().capacity();
    /// decoder.read_done(quiet); // the read filled its room
    /// assert!(decoder.read_buffer().capacity() > quiet);
    /// ```
    pub fn read_buffer(&mut self) -> &mut BytesMut {
        let quiet = self.quiet >= QUIET_AFTER;
        let want = if quiet { SMALL_READ } else { READ_CHUNK };
        if quiet && self.buf.is_empty() && self.buf.capacity() > SMALL_READ {
            self.buf = BytesMut::new();
        }
        self.buf.reserve(want);
        self.room = self.buf.capacity() - self.buf.len();
        &mut self.buf
    }

    /// How many bytes the read into [`read_buffer`](Self::read_buffer) returned.
    pub fn read_done(&mut self, n: usize) {
        self.quiet = if n >= self.room.min(SMALL_READ) {
            0
        } else {
            self.quiet.saturating_add(1).min(QUIET_AFTER)
        };
    }

    /// The internal buffer, to read from a socket straight into it
    /// (e.g. `AsyncReadExt::read_buf`). Only append to it.
    pub fn buffer_mut(&mut self) -> &mut BytesMut {
        &mut self.buf
    }

    /// Bytes received but not yet returned as frames.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// The next complete frame body, `Ok(None)` if more bytes are needed.
    pub fn next_frame(&mut self) -> Result<Option<Bytes>, FrameError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        match split_frame(&mut self.buf, self.limit) {
            Ok(frame) => Ok(frame.map(BytesMut::freeze)),
            Err(e) => {
                self.failed = Some(e.clone());
                self.buf = BytesMut::new();
                Err(e)
            }
        }
    }
}

/// Appends one frame (header and `body`) to `dst`.
///
/// Fails without writing anything if `body` is empty or longer than `limit`.
pub fn encode_frame(body: &[u8], dst: &mut BytesMut, limit: u32) -> Result<(), FrameError> {
    check_body_len(body.len(), limit)?;
    dst.reserve(FRAME_HEADER_LEN + body.len());
    // check_body_len guarantees the length fits in a u32.
    dst.put_u32(body.len() as u32);
    dst.put_slice(body);
    Ok(())
}

pub(crate) fn check_body_len(len: usize, limit: u32) -> Result<(), FrameError> {
    if len == 0 {
        return Err(FrameError::ZeroLength);
    }
    if len as u64 > u64::from(limit) {
        return Err(FrameError::FrameTooLarge {
            declared: len as u64,
            limit,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_quiet_connection_lets_its_large_read_buffer_go() {
        let mut decoder = FrameDecoder::new(1 << 20);
        let room = decoder.read_buffer().capacity();
        decoder.read_done(room);
        let busy = decoder.read_buffer().capacity();
        assert!(busy >= READ_CHUNK, "{busy}");
        // Small reads, their frames taken: the big buffer stays for a
        // while (a moderately busy connection), then goes.
        let mut wire = BytesMut::new();
        encode_frame(b"hi", &mut wire, 1024).unwrap();
        for read in 1..=QUIET_AFTER {
            decoder.read_buffer().extend_from_slice(&wire);
            decoder.read_done(wire.len());
            assert_eq!(decoder.next_frame().unwrap().unwrap().as_ref(), b"hi");
            let capacity = decoder.read_buffer().capacity();
            assert_eq!(
                capacity < READ_CHUNK,
                read == QUIET_AFTER,
                "read {read}: {capacity}"
            );
        }
        // A partial frame is kept, whatever the room.
        decoder.read_buffer().extend_from_slice(&wire[..3]);
        decoder.read_done(3);
        assert_eq!(decoder.buffered(), 3);
        decoder.read_buffer().extend_from_slice(&wire[3..]);
        decoder.read_done(wire.len() - 3);
        assert_eq!(decoder.next_frame().unwrap().unwrap().as_ref(), b"hi");
    }

    fn frame(body: &[u8]) -> Vec<u8> {
        let mut v = (body.len() as u32).to_be_bytes().to_vec();
        v.extend_from_slice(body);
        v
    }

    #[test]
    fn read_incomplete_head_needs_more() {
        let mut d = FrameDecoder::new(64);
        d.feed(&[0, 0]);
        assert_eq!(d.next_frame(), Ok(None));
        d.feed(&[0, 1, 7]);
        assert_eq!(d.next_frame().unwrap().unwrap().as_ref(), &[7]);
        assert_eq!(d.next_frame(), Ok(None));
    }

    #[test]
    fn read_many_frames_in_one_chunk() {
        let mut d = FrameDecoder::new(64);
        let mut bytes = frame(b"one");
        bytes.extend(frame(b"two"));
        bytes.extend(&frame(b"three")[..5]);
        d.feed(&bytes);
        assert_eq!(d.next_frame().unwrap().unwrap().as_ref(), b"one");
        assert_eq!(d.next_frame().unwrap().unwrap().as_ref(), b"two");
        assert_eq!(d.next_frame(), Ok(None));
        d.feed(b"hree");
        assert_eq!(d.next_frame().unwrap().unwrap().as_ref(), b"three");
    }

    #[test]
    fn read_max_frame_len_is_checked_from_the_header_alone() {
        let mut d = FrameDecoder::new(10);
        d.feed(&[0, 0, 0, 11]);
        assert_eq!(
            d.next_frame(),
            Err(FrameError::FrameTooLarge {
                declared: 11,
                limit: 10
            })
        );
        // Finished: more bytes are dropped, the error repeats.
        d.feed(&[1, 2, 3]);
        assert_eq!(d.buffered(), 0);
        assert!(d.next_frame().is_err());
    }

    #[test]
    fn read_max_len_declared_does_not_reserve() {
        let mut d = FrameDecoder::new(1024);
        d.feed(&[0xff, 0xff, 0xff, 0xff]);
        assert!(matches!(
            d.next_frame(),
            Err(FrameError::FrameTooLarge {
                declared: 4_294_967_295,
                ..
            })
        ));
        assert!(d.buffer_mut().capacity() < 1024);
    }

    #[test]
    fn read_exactly_at_limit_is_accepted() {
        let mut d = FrameDecoder::new(3);
        d.feed(&frame(b"abc"));
        assert_eq!(d.next_frame().unwrap().unwrap().as_ref(), b"abc");
    }

    #[test]
    fn read_zero_length_is_a_protocol_error() {
        let mut d = FrameDecoder::new(10);
        d.feed(&[0, 0, 0, 0]);
        let err = d.next_frame().unwrap_err();
        assert_eq!(err, FrameError::ZeroLength);
        assert_eq!(err.code(), ErrorCode::ProtocolError);
    }

    #[test]
    fn raising_the_limit_applies_to_the_next_header() {
        let mut d = FrameDecoder::new(4);
        d.feed(&frame(b"auth"));
        assert!(d.next_frame().unwrap().is_some());
        d.set_limit(8);
        d.feed(&frame(b"postauth"));
        assert_eq!(d.next_frame().unwrap().unwrap().as_ref(), b"postauth");
    }

    #[test]
    fn encode_refuses_empty_and_oversized_bodies() {
        let mut dst = BytesMut::new();
        assert_eq!(encode_frame(b"", &mut dst, 8), Err(FrameError::ZeroLength));
        assert!(matches!(
            encode_frame(&[0; 9], &mut dst, 8),
            Err(FrameError::FrameTooLarge { declared: 9, .. })
        ));
        assert!(dst.is_empty());
        encode_frame(b"hi", &mut dst, 8).unwrap();
        assert_eq!(dst.as_ref(), &[0, 0, 0, 2, b'h', b'i']);
    }
}
