//! Frame I/O shared by the connection and the session: reading one frame,
//! a best-effort farewell, error frames.

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use netproc_wire::{CodecError, ErrorBody, ErrorCode, FrameDecoder, FrameError, ServerMessage};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

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
    match dec.read_frame(rd).await {
        Ok(Some(frame)) => Ok(frame),
        Err(CodecError::Frame(e)) => Err(ReadError::Frame(e)),
        // An end or a transport failure: either way the peer is gone.
        Ok(None) | Err(_) => Err(ReadError::Closed),
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
