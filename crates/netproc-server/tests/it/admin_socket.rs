//! The local admin socket: admin operations for the server's own user
//! without a certificate or key — the way back in when failed logins from
//! the network have blocked the admin's key — and nothing else.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use bytes::BytesMut;
use netproc_auth::{KeySpec, PrivilegeSet};
use netproc_client::ClientError;
use netproc_server::{AdminSocketError, ServerError, ServerOptions};
use netproc_wire::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

use crate::abuse::{client_from, ip, setup};
use crate::support::*;

/// A netproc/1 peer on the socket: frames without TLS or Auth.
struct Local {
    stream: UnixStream,
    decoder: FrameDecoder,
}

impl Local {
    async fn connect(path: &Path) -> Local {
        Local {
            stream: UnixStream::connect(path).await.unwrap(),
            decoder: FrameDecoder::new(1 << 20),
        }
    }
    async fn send(&mut self, msg: &ClientMessage) {
        let mut out = BytesMut::new();
        msg.encode(&mut out, 1 << 20).unwrap();
        self.stream.write_all(&out).await.unwrap();
    }
    async fn recv(&mut self) -> Option<ServerMessage> {
        loop {
            if let Some(body) = self.decoder.next_frame().unwrap() {
                return Some(ServerMessage::decode(&body).unwrap());
            }
            if self.stream.read_buf(self.decoder.buffer_mut()).await.ok()? == 0 {
                return None;
            }
        }
    }
    async fn run(&mut self, id: u64, op: Operation) -> Outcome {
        self.send(&ClientMessage::Request(Request {
            id,
            op,
            deadline_ms: None,
        }))
        .await;
        match self.recv().await {
            Some(ServerMessage::Response(r)) if r.id == id => r.outcome,
            other => panic!("{other:?}"),
        }
    }
}

#[tokio::test]
async fn the_admin_socket_unblocks_a_blocked_admin_key_and_runs_admin_operations_only() {
    let capture = crate::auth::audit_capture();
    let mut o = ServerOptions::default();
    o.auth_controls.max_failed_auth_per_api_key_per_window = 2;
    let t = setup(o).await;
    let (info, admin) = t
        .keys
        .create(KeySpec::new(PrivilegeSet::from([
            Privilege::AdminPrivileges,
        ])))
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("admin.sock");
    t.server.serve_admin_socket(&path, Vec::new()).unwrap();
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);

    // Wrong secrets for the admin's key id block it, from the network.
    for from in [2, 3] {
        let wrong = SecretString::new(format!("npk_{}_{}", info.id, "Z".repeat(32)));
        let ep = netproc_client::ServerEndpoint::new(
            t.server.local_addr(),
            "localhost",
            t.pki.client.identity().unwrap(),
            t.pki.ca.trust_anchors(),
            wrong,
        )
        .bind(ip(from));
        let c = netproc_client::Client::builder()
            .server("s1", ep)
            .build()
            .unwrap();
        let _ = c.server("s1").unwrap().server_info().await.unwrap_err();
    }
    let blocked = client_from(&t.pki, &t.server, &admin, 4)
        .server("s1")
        .unwrap()
        .server_info()
        .await
        .unwrap_err();
    assert!(
        matches!(blocked, ClientError::AuthThrottled { .. }),
        "{blocked:?}"
    );

    // The local way in: list the blocks, lift the key's.
    let mut local = Local::connect(&path).await;
    let Outcome::Ok(listed) = local.run(1, Operation::ListBlocked).await else {
        panic!()
    };
    assert!(format!("{listed:?}").contains(&info.id), "{listed:?}");
    let lifted = local
        .run(
            2,
            Operation::Unblock {
                entry: info.id.clone(),
            },
        )
        .await;
    assert_eq!(lifted, Outcome::Ok(Value::Bool(true)), "{listed:?}");
    client_from(&t.pki, &t.server, &admin, 4)
        .server("s1")
        .unwrap()
        .server_info()
        .await
        .unwrap();

    // Never invoke or define.
    let refused = local
        .run(
            4,
            Operation::Invoke {
                function: "add".into(),
                args: vec![Value::Int(1), Value::Int(2)],
            },
        )
        .await;
    let Outcome::Err(e) = refused else { panic!() };
    assert_eq!(e.code, ErrorCode::InsufficientPrivileges);
    let refused = local
        .run(
            5,
            Operation::DefineConstant {
                name: "c".into(),
                value: Value::Int(1),
            },
        )
        .await;
    assert!(matches!(
        refused,
        Outcome::Err(ErrorBody {
            code: ErrorCode::InsufficientPrivileges,
            ..
        })
    ));
    // Pings work; an Auth frame is refused and closes.
    local.send(&ClientMessage::Ping { nonce: 9 }).await;
    assert_eq!(local.recv().await, Some(ServerMessage::Pong { nonce: 9 }));
    local
        .send(&ClientMessage::Auth(Auth {
            version: 1,
            method: AuthMethod::ApiKey(SecretString::new("npk_x_y")),
            client_name: None,
        }))
        .await;
    match local.recv().await {
        Some(ServerMessage::Error(e)) => assert_eq!(e.code, ErrorCode::ProtocolError),
        other => panic!("{other:?}"),
    }
    assert_eq!(local.recv().await, None);

    // Audited with the peer's uid and pid.
    let log = String::from_utf8_lossy(&capture.lock().unwrap()).into_owned();
    let line = log
        .lines()
        .find(|l| l.contains("admin_socket") && l.contains("unblock"))
        .unwrap_or_else(|| panic!("no audit line in {log}"));
    assert!(
        line.contains(&format!("pid={}", std::process::id())) && line.contains("uid="),
        "{line}"
    );

    // Shutdown removes the socket.
    t.server.shutdown(std::time::Duration::from_secs(1)).await;
    assert!(!path.exists());
}

#[tokio::test]
async fn the_admin_socket_is_refused_in_a_shared_directory_or_over_another_file() {
    let pki = Pki::new();
    let server = start(
        &pki,
        "s1",
        std::sync::Arc::new(netproc_auth::ApiKeyStore::in_memory()),
    )
    .await;
    let dir = tempfile::tempdir().unwrap();

    // A directory others can write: refused, naming the path, nothing made.
    let shared = dir.path().join("shared");
    std::fs::create_dir(&shared).unwrap();
    std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o777)).unwrap();
    let err = server
        .serve_admin_socket(shared.join("admin.sock"), Vec::new())
        .unwrap_err();
    assert!(
        matches!(
            err,
            ServerError::AdminSocket(AdminSocketError::UnsafeDirectory { .. })
        ),
        "{err:?}"
    );
    assert!(err.to_string().contains("admin.sock"), "{err}");
    assert_eq!(std::fs::read_dir(&shared).unwrap().count(), 0);

    // A regular file at the path is never removed.
    let path = dir.path().join("admin.sock");
    std::fs::write(&path, "not a socket").unwrap();
    let err = server.serve_admin_socket(&path, Vec::new()).unwrap_err();
    assert!(
        matches!(
            err,
            ServerError::AdminSocket(AdminSocketError::Occupied { .. })
        ),
        "{err:?}"
    );
    assert_eq!(std::fs::read_to_string(&path).unwrap(), "not a socket");

    // A stale socket of this user (a crashed server's) is replaced.
    std::fs::remove_file(&path).unwrap();
    drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
    server.serve_admin_socket(&path, Vec::new()).unwrap();
    let mut local = Local::connect(&path).await;
    assert!(matches!(
        local.run(1, Operation::ServerInfo).await,
        Outcome::Ok(_)
    ));
    // No staging directory is left behind.
    let left: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .filter(|n| n != "shared")
        .collect();
    assert_eq!(left, vec![std::ffi::OsString::from("admin.sock")]);
}
