//! Frame I/O shared by the connection and the session: reading one frame,
//! a best-effort farewell, error frames.

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use netproc_wire::{ErrorBody, ErrorCode, FrameDecoder, FrameError, ServerMessage};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Read chunk: enough for many small requests per read.
pub(crate) const READ_CHUNK: usize = 16 * 1024;

/// How long a best-effort error frame may take to send before closing.
const FAREWELL_TIMEOUT: Duration = Duration::from_millis(500);

pub(crate) enum ReadError {
    Frame(FrameError),
    Closed,
}

pub(crate) async fn read_frame<R: AsyncRead + Unpin>(
    rd: &mut R,
    dec: &mut FrameDecoder,
) -> Result<Bytes, ReadError> {
    loop {
        if let Some(frame) = dec.next_frame().map_err(ReadError::Frame)? {
            return Ok(frame);
        }
        let buf = dec.buffer_mut();
        buf.reserve(READ_CHUNK);
        match rd.read_buf(buf).await {
            Ok(0) | Err(_) => return Err(ReadError::Closed),
            Ok(_) => {}
        }
    }
}

/// Sends one message and closes, best effort: used before the session's
/// writer exists, and for errors that end the connection.
pub(crate) async fn farewell<W: AsyncWrite + Unpin>(wr: &mut W, msg: ServerMessage, limit: u32) {
    let mut buf = BytesMut::new();
    if msg.encode(&mut buf, limit).is_ok() {
        let send = async {
            wr.write_all(&buf).await?;
            wr.flush().await?;
            wr.shutdown().await
        };
        let _ = tokio::time::timeout(FAREWELL_TIMEOUT, send).await;
    }
}

pub(crate) fn error_msg(code: ErrorCode, message: impl Into<String>) -> ServerMessage {
    ServerMessage::Error(ErrorBody::new(code, message))
}
