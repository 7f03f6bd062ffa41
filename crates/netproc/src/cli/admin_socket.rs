//! `netproc admin --socket PATH`: one admin operation over the server's
//! local admin socket (netproc/1 frames, no TLS, no Auth: the server checks
//! this process's user id).

use std::path::Path;
use std::time::Duration;

use bytes::BytesMut;
use netproc::wire::{
    ClientMessage, DEFAULT_MAX_POST_AUTH_FRAME_BYTES, FrameDecoder, Operation, Outcome, Request,
    ServerMessage, Value,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::{Failure, failed, usage};

/// Without `--timeout`, how long the operation may take.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

pub(crate) async fn run(
    path: &Path,
    op: Operation,
    timeout: Option<Duration>,
) -> Result<Value, Failure> {
    let limit = timeout.unwrap_or(DEFAULT_TIMEOUT);
    tokio::time::timeout(limit, exchange(path, op))
        .await
        .map_err(|_| {
            failed(format!(
                "timeout: no answer on {} within {limit:?}",
                path.display()
            ))
        })?
}

async fn exchange(path: &Path, op: Operation) -> Result<Value, Failure> {
    let mut stream = tokio::net::UnixStream::connect(path).await.map_err(|e| {
        let hint = match e.kind() {
            std::io::ErrorKind::NotFound => {
                " (is `admin_socket` set in the server's file, and the server running?)"
            }
            std::io::ErrorKind::PermissionDenied => {
                " (run as the server's user, or one in its admin_socket_uids)"
            }
            _ => "",
        };
        usage(format!("--socket {}: {e}{hint}", path.display()))
    })?;
    let limit = DEFAULT_MAX_POST_AUTH_FRAME_BYTES;
    let request = ClientMessage::Request(Request {
        id: 1,
        op,
        deadline_ms: None,
    });
    let mut out = BytesMut::new();
    request.encode(&mut out, limit).map_err(failed)?;
    let io = |e: std::io::Error| failed(format!("--socket {}: {e}", path.display()));
    stream.write_all(&out).await.map_err(io)?;
    let mut decoder = FrameDecoder::new(limit);
    let body = loop {
        if let Some(body) = decoder.next_frame().map_err(failed)? {
            break body;
        }
        if stream.read_buf(decoder.buffer_mut()).await.map_err(io)? == 0 {
            // The server closes at once on a peer of another user.
            return Err(failed(format!(
                "{}: the server closed the connection (this user may not be allowed: run as the server's user, or add it to admin_socket_uids)",
                path.display()
            )));
        }
    };
    match ServerMessage::decode(&body).map_err(failed)? {
        ServerMessage::Response(r) => match r.outcome {
            Outcome::Ok(v) => Ok(v),
            Outcome::Err(e) => Err(failed(format!("{}: {}", e.code, e.message))),
        },
        ServerMessage::Error(e) => Err(failed(format!("{}: {}", e.code, e.message))),
        other => Err(failed(format!("unexpected answer: {other:?}"))),
    }
}
