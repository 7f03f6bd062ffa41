//! A connection's outgoing bytes: messages are encoded straight into a
//! shared buffer, and one writer task sends whatever has accumulated in a
//! single write, so responses that are ready together share a flush.

use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use bytes::BytesMut;
use netproc_wire::{EncodeError, FrameError, Outcome, Response, ServerMessage};
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::sync::Notify;

use crate::refusal::Refused;
use tokio_util::sync::CancellationToken;

/// Beyond this, a buffer's spare capacity is returned to the allocator
/// after a write instead of being kept for the next batch.
const KEEP_CAPACITY: usize = 1024 * 1024;

#[derive(Default)]
struct State {
    buf: BytesMut,
    /// Bytes taken by the writer and not yet written.
    writing: usize,
    closed: bool,
}

/// State table of the writer:
///
/// | state | event | next |
/// | --- | --- | --- |
/// | idle | `push` | wakes the writer |
/// | writing | write done | `space` notified; idle or writing |
/// | any | `close` | writer drains, shuts the stream, ends |
/// | writing | stall past timeout / I/O error | `dead` cancelled, writer ends |
pub(crate) struct Outbox {
    state: Mutex<State>,
    wake_writer: Notify,
    space: Notify,
    dead: CancellationToken,
    frame_limit: u32,
}

impl Outbox {
    pub(crate) fn new(frame_limit: u32) -> Outbox {
        Outbox {
            state: Mutex::new(State::default()),
            wake_writer: Notify::new(),
            space: Notify::new(),
            dead: CancellationToken::new(),
            frame_limit,
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Queues a message without waking the writer: the session calls
    /// [`flush`](Self::flush) once per batch, so responses ready together
    /// share one write. A response too large for the client's frame limit
    /// is replaced by `frame_too_large` with `{limit, size}` for the same
    /// request; the session stays open.
    pub(crate) fn push(&self, msg: &ServerMessage) {
        let mut st = self.lock();
        if st.closed {
            return;
        }
        if let Err(EncodeError::Frame(FrameError::FrameTooLarge { declared, limit })) =
            msg.encode(&mut st.buf, self.frame_limit)
            && let ServerMessage::Response(r) = msg
        {
            let replacement = ServerMessage::Response(Response {
                id: r.id,
                outcome: Outcome::Err(
                    Refused::ResultTooLarge {
                        limit,
                        size: declared,
                    }
                    .into_body(),
                ),
            });
            // A short error always fits.
            let _ = replacement.encode(&mut st.buf, self.frame_limit);
        }
    }

    /// Wakes the writer if anything is queued.
    pub(crate) fn flush(&self) {
        if !self.lock().buf.is_empty() {
            self.wake_writer.notify_one();
        }
    }

    /// Bytes queued or being written.
    pub(crate) fn pending(&self) -> usize {
        let st = self.lock();
        st.buf.len() + st.writing
    }

    /// Resolves when the writer has finished a write (so `pending` fell).
    pub(crate) async fn space(&self) {
        self.space.notified().await;
    }

    /// Cancelled when the writer failed or stalled: the connection is gone.
    pub(crate) fn dead(&self) -> &CancellationToken {
        &self.dead
    }

    /// No more messages; the writer sends what is queued, then closes.
    pub(crate) fn close(&self) {
        self.lock().closed = true;
        self.wake_writer.notify_one();
    }

    /// The writer task: sends batches until closed or failed.
    pub(crate) async fn run_writer<W: AsyncWrite + Unpin>(&self, mut wr: W, stall: Duration) {
        let mut spare = BytesMut::new();
        loop {
            let closing = {
                let mut st = self.lock();
                std::mem::swap(&mut st.buf, &mut spare);
                st.writing = spare.len();
                st.closed
            };
            if spare.is_empty() {
                if closing {
                    let _ = tokio::time::timeout(stall, wr.shutdown()).await;
                    return;
                }
                self.wake_writer.notified().await;
                continue;
            }
            let write = async {
                wr.write_all(&spare).await?;
                wr.flush().await
            };
            match tokio::time::timeout(stall, write).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    tracing::debug!(error = %e, "write failed; closing the connection");
                    self.dead.cancel();
                    return;
                }
                Err(_) => {
                    tracing::debug!(
                        stall_ms = stall.as_millis() as u64,
                        "write stalled; closing the connection"
                    );
                    self.dead.cancel();
                    return;
                }
            }
            spare.clear();
            if spare.capacity() > KEEP_CAPACITY {
                spare = BytesMut::new();
            }
            self.lock().writing = 0;
            self.space.notify_one();
        }
    }
}
