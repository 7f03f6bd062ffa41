//! The local admin socket: admin operations over a Unix socket, for the
//! operator whose admin key is blocked or lost.
//!
//! It is the one admin path without a certificate or key (DESIGN's
//! recorded departure), so it is narrow: off unless asked for; a
//! filesystem socket only, in a directory group and others cannot write;
//! created mode 0600 before it appears at its path; each peer's user id
//! (`SO_PEERCRED`) must be the server's own or listed; netproc/1 frames
//! without TLS under the post-auth frame limit; admin operations only
//! (never invoke or define); every operation audited with the peer's uid
//! and pid.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use netproc_wire::{
    ClientMessage, DecodeError, ErrorBody, ErrorCode, FrameDecoder, FrameError, Outcome, Response,
    ServerMessage,
};
use tokio::io::AsyncWriteExt;
use tokio::net::{UnixListener, UnixStream};

use crate::admin_ops::{self, AdminAnswer};
use crate::audit::{self, AUDIT_TARGET};
use crate::error::{AdminSocketError, ServerError};
use crate::frames::{ReadError, error_msg, farewell, read_frame};
use crate::server::ServerHandle;
use crate::shared::Shared;

/// At most this many admin-socket connections at once; more wait in the
/// listen backlog.
const MAX_CONNECTIONS: usize = 4;
/// An admin-socket connection idle this long is closed.
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// How long one admin operation (a reload) may take.
const OPERATION_TIMEOUT: Duration = Duration::from_secs(30);

impl ServerHandle {
    /// Serves the admin operations on a Unix socket at `path` until
    /// shutdown (the socket file is removed then). Peers whose user id is
    /// the server's own or in `allowed_uids` may run admin operations and
    /// nothing else; other peers are closed at once. See the module docs
    /// of `admin_socket` and `docs/security.md`.
    ///
    /// Refused (nothing created) when the directory is missing or group-
    /// or other-writable, or when the path holds anything but a stale
    /// socket of this user.
    pub fn serve_admin_socket(
        &self,
        path: impl Into<PathBuf>,
        allowed_uids: Vec<u32>,
    ) -> Result<(), ServerError> {
        let path = path.into();
        let (listener, own_uid) = bind(&path).map_err(ServerError::AdminSocket)?;
        let shared = Arc::clone(&self.inner.shared);
        tracing::info!(server = %shared.name, path = %path.display(), "admin socket listening");
        let limit = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
        let tracker = shared.tracker.clone();
        tracker.spawn(async move {
            loop {
                let permit = tokio::select! {
                    () = shared.shutdown.cancelled() => break,
                    p = Arc::clone(&limit).acquire_owned() => match p {
                        Ok(p) => p,
                        Err(_) => break,
                    },
                };
                let accepted = tokio::select! {
                    () = shared.shutdown.cancelled() => break,
                    a = listener.accept() => a,
                };
                let Ok((stream, _)) = accepted else {
                    // Out of descriptors and the like: do not spin.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                };
                let shared = Arc::clone(&shared);
                let allowed = allowed_uids.clone();
                tokio::spawn(async move {
                    serve_peer(&shared, stream, own_uid, &allowed).await;
                    drop(permit);
                });
            }
            let _ = std::fs::remove_file(&path);
        });
        Ok(())
    }
}

/// Creates the socket: checks the directory, removes a stale socket of
/// this user, binds in a private directory beside the target (so the
/// socket is never reachable with looser permissions), sets mode 0600 and
/// renames it into place. Returns the listener and the server's user id
/// (the socket file's owner).
fn bind(path: &Path) -> Result<(UnixListener, u32), AdminSocketError> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
    let io = |source| AdminSocketError::Io {
        path: path.to_owned(),
        source,
    };
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let meta = std::fs::metadata(dir).map_err(|_| AdminSocketError::NoDirectory {
        path: path.to_owned(),
    })?;
    let mode = meta.permissions().mode() & 0o7777;
    // Sticky, world-writable directories (/tmp) are refused as well: others
    // could squat the name before the server starts.
    if mode & 0o022 != 0 {
        return Err(AdminSocketError::UnsafeDirectory {
            path: path.to_owned(),
            dir: dir.to_owned(),
            mode,
        });
    }
    // A private staging directory beside the target: mode 0700, so nobody
    // else can connect before the socket's own mode is 0600.
    let staging = tempfile_dir(dir).map_err(io)?;
    let staged = staging.join("admin.sock");
    let result = (|| {
        let listener = std::os::unix::net::UnixListener::bind(&staged).map_err(io)?;
        std::fs::set_permissions(&staged, std::fs::Permissions::from_mode(0o600)).map_err(io)?;
        let own_uid = std::fs::metadata(&staged).map_err(io)?.uid();
        match std::fs::symlink_metadata(path) {
            Ok(existing) => {
                if existing.file_type().is_socket() && existing.uid() == own_uid {
                    std::fs::remove_file(path).map_err(io)?;
                } else {
                    return Err(AdminSocketError::Occupied {
                        path: path.to_owned(),
                    });
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io(e)),
        }
        std::fs::rename(&staged, path).map_err(io)?;
        listener.set_nonblocking(true).map_err(io)?;
        let listener = UnixListener::from_std(listener).map_err(io)?;
        Ok((listener, own_uid))
    })();
    let _ = std::fs::remove_file(&staged);
    let _ = std::fs::remove_dir(&staging);
    result
}

/// A new directory `<dir>/.netproc-admin-<random>` with mode 0700.
fn tempfile_dir(dir: &Path) -> std::io::Result<PathBuf> {
    use std::os::unix::fs::DirBuilderExt;
    let mut random = [0u8; 8];
    netproc_pki::random_bytes(&mut random).map_err(|e| std::io::Error::other(e.to_string()))?;
    let name = format!(".netproc-admin-{}", u64::from_le_bytes(random));
    let staging = dir.join(name);
    std::fs::DirBuilder::new().mode(0o700).create(&staging)?;
    Ok(staging)
}

/// One peer: its user id checked, then requests answered in turn.
async fn serve_peer(shared: &Arc<Shared>, stream: UnixStream, own_uid: u32, allowed: &[u32]) {
    let Ok(cred) = stream.peer_cred() else {
        return;
    };
    let (uid, pid) = (cred.uid(), cred.pid().unwrap_or(0));
    if !peer_allowed(uid, own_uid, allowed) {
        tracing::warn!(
            target: AUDIT_TARGET,
            event = "admin_socket",
            outcome = "refused",
            uid,
            pid,
            "a peer of another user was refused on the admin socket"
        );
        return;
    }
    let (mut rd, mut wr) = stream.into_split();
    let limit = shared
        .options()
        .connection_controls
        .max_post_auth_frame_bytes;
    let mut dec = FrameDecoder::new(limit);
    loop {
        let frame = tokio::select! {
            () = shared.shutdown.cancelled() => return,
            f = tokio::time::timeout(IDLE_TIMEOUT, read_frame(&mut rd, &mut dec)) => f,
        };
        let body = match frame {
            Err(_) | Ok(Err(ReadError::Closed)) => return,
            Ok(Err(ReadError::Frame(FrameError::FrameTooLarge { .. }))) => {
                let msg = error_msg(ErrorCode::FrameTooLarge, "frame too large");
                return farewell(&mut wr, msg, limit).await;
            }
            Ok(Err(ReadError::Frame(_))) => {
                let msg = error_msg(ErrorCode::ProtocolError, "malformed frame");
                return farewell(&mut wr, msg, limit).await;
            }
            Ok(Ok(body)) => body,
        };
        let reply = match ClientMessage::decode(&body) {
            Ok(ClientMessage::Request(req)) => {
                let outcome = answer(shared, req.op, uid, pid).await;
                ServerMessage::Response(Response {
                    id: req.id,
                    outcome,
                })
            }
            Ok(ClientMessage::Ping { nonce }) => ServerMessage::Pong { nonce },
            Ok(ClientMessage::Cancel { .. }) => continue,
            Ok(_) => {
                let msg = error_msg(
                    ErrorCode::ProtocolError,
                    "the admin socket takes requests without Auth: the peer's user id is its credential",
                );
                return farewell(&mut wr, msg, limit).await;
            }
            Err(DecodeError::InvalidOperation { id, .. }) => {
                response_err(id, ErrorCode::InvalidOperation, "unknown operation".into())
            }
            Err(DecodeError::InvalidRequest { id, .. }) => {
                response_err(id, ErrorCode::InvalidRequest, "invalid request".into())
            }
            Err(_) => {
                let msg = error_msg(ErrorCode::ProtocolError, "malformed message");
                return farewell(&mut wr, msg, limit).await;
            }
        };
        let mut out = BytesMut::new();
        if reply.encode(&mut out, limit).is_err() {
            let answer = error_msg(
                ErrorCode::FrameTooLarge,
                "the answer is over the frame limit",
            );
            out.clear();
            if answer.encode(&mut out, limit).is_err() {
                return;
            }
        }
        if wr.write_all(&out).await.is_err() {
            return;
        }
    }
}

/// The server's own user, and the users listed in `admin_socket_uids`;
/// no one else (root included, unless listed or the server's user).
fn peer_allowed(uid: u32, own_uid: u32, allowed: &[u32]) -> bool {
    uid == own_uid || allowed.contains(&uid)
}

fn response_err(id: u64, code: ErrorCode, message: String) -> ServerMessage {
    ServerMessage::Response(Response {
        id,
        outcome: Outcome::Err(ErrorBody::new(code, message)),
    })
}

/// Runs an admin operation for the peer `uid`/`pid`; anything else is
/// refused `insufficient_privileges`.
async fn answer(shared: &Arc<Shared>, op: netproc_wire::Operation, uid: u32, pid: i32) -> Outcome {
    let name = op.name();
    let audit = |operation: &'static str, target: &str| {
        tracing::info!(
            target: AUDIT_TARGET,
            event = "admin",
            outcome = "ok",
            via = "admin_socket",
            operation,
            target = %audit::sanitize(target),
            uid,
            pid,
        );
    };
    match admin_ops::run(shared, op, &audit) {
        AdminAnswer::Now(outcome) => outcome,
        AdminAnswer::Later(fut) => match tokio::time::timeout(OPERATION_TIMEOUT, fut).await {
            Ok(Ok(v)) => Outcome::Ok(v),
            Ok(Err(e)) => Outcome::Err(e.into_body()),
            Err(_) => Outcome::Err(ErrorBody::new(
                ErrorCode::Timeout,
                "the operation timed out",
            )),
        },
        AdminAnswer::NotAdmin(_) => {
            tracing::warn!(
                target: AUDIT_TARGET,
                event = "admin",
                outcome = "insufficient_privileges",
                via = "admin_socket",
                operation = name,
                uid,
                pid,
            );
            Outcome::Err(ErrorBody::new(
                ErrorCode::InsufficientPrivileges,
                format!("the admin socket serves admin operations only, not {name}"),
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_servers_user_and_listed_users_are_let_in() {
        assert!(peer_allowed(1000, 1000, &[]));
        assert!(!peer_allowed(1001, 1000, &[]));
        assert!(!peer_allowed(0, 1000, &[]), "root is not implied");
        assert!(peer_allowed(1001, 1000, &[1001]));
        assert!(!peer_allowed(1002, 1000, &[1001]));
    }
}
