//! Frames over tokio (feature `codec`): a `tokio_util::codec` adapter and
//! [`FrameDecoder::read_frame`], the one framed reader of the server and
//! the client.

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio_util::codec::{Decoder, Encoder};

use crate::frame::{FrameDecoder, FrameError, encode_frame, split_frame};

impl FrameDecoder {
    /// Reads from `rd` until a whole frame is buffered and returns its
    /// body; `Ok(None)` when `rd` ends first (a clean close, or one inside
    /// a frame). Frames already buffered are returned without reading.
    ///
    /// Cancel-safe: bytes read before a cancellation stay buffered.
    ///
    /// ```
    /// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
    /// use bytes::BytesMut;
    /// use netproc_wire::{FrameDecoder, encode_frame};
    ///
    /// let mut wire = BytesMut::new();
    /// encode_frame(b"hello", &mut wire, 1024).unwrap();
    /// let mut rd = &wire[..];
    /// let mut decoder = FrameDecoder::new(1024);
    /// assert_eq!(decoder.read_frame(&mut rd).await.unwrap().unwrap().as_ref(), b"hello");
    /// assert!(decoder.read_frame(&mut rd).await.unwrap().is_none());
    /// # });
    /// ```
    pub async fn read_frame<R: AsyncRead + Unpin>(
        &mut self,
        rd: &mut R,
    ) -> Result<Option<Bytes>, CodecError> {
        loop {
            if let Some(frame) = self.next_frame()? {
                return Ok(Some(frame));
            }
            let n = rd.read_buf(self.read_buffer()).await?;
            self.read_done(n);
            if n == 0 {
                return Ok(None);
            }
        }
    }
}

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
