//! A `tokio_util::codec` adapter for frames (feature `codec`).

use bytes::{Bytes, BytesMut};
use tokio_util::codec::{Decoder, Encoder};

use crate::frame::{FrameError, encode_frame, split_frame};

/// Frames as a `tokio_util` codec: decodes frame bodies, encodes byte slices
/// as frames. Same rules as [`FrameDecoder`](crate::FrameDecoder).
///
/// ```
/// use bytes::BytesMut;
/// use netproc_wire::FrameCodec;
/// use tokio_util::codec::{Decoder, Encoder};
///
/// let mut codec = FrameCodec::new(1024);
/// let mut buf = BytesMut::new();
/// codec.encode(&b"hello"[..], &mut buf).unwrap();
/// assert_eq!(codec.decode(&mut buf).unwrap().unwrap().as_ref(), b"hello");
/// ```
#[derive(Debug, Clone)]
pub struct FrameCodec {
    limit: u32,
}

impl FrameCodec {
    /// A codec refusing bodies longer than `limit` bytes, in both directions.
    pub fn new(limit: u32) -> Self {
        FrameCodec { limit }
    }

    /// Changes the body limit.
    pub fn set_limit(&mut self, limit: u32) {
        self.limit = limit;
    }
}

/// Errors of [`FrameCodec`]: framing or I/O.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CodecError {
    /// A frame broke the framing rules.
    #[error(transparent)]
    Frame(#[from] FrameError),
    /// The underlying transport failed.
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

impl Decoder for FrameCodec {
    type Item = Bytes;
    type Error = CodecError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Bytes>, CodecError> {
        Ok(split_frame(src, self.limit)?.map(BytesMut::freeze))
    }
}

impl Encoder<&[u8]> for FrameCodec {
    type Error = CodecError;

    fn encode(&mut self, body: &[u8], dst: &mut BytesMut) -> Result<(), CodecError> {
        Ok(encode_frame(body, dst, self.limit)?)
    }
}
