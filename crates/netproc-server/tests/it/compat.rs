//! Wire compatibility (DESIGN: fleets never upgrade at once). The first
//! wire change is `AuthWithOptions` (the client's inbound frame limit):
//! each side is tested against a peer that speaks only the previous format.

use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use netproc_auth::ApiKeyStore;
use netproc_client::{Client, ClientError};
use netproc_server::ServerOptions;
use netproc_wire::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::support::*;

const TWO_MB: usize = 2_000_000;

fn big_options() -> ServerOptions {
    let mut o = unlimited();
    o.connection_controls.max_post_auth_frame_bytes = 4 << 20;
    o.session_controls.max_outbound_bytes_per_connection = 16 << 20;
    o
}

fn echo(id: u64, v: Value) -> ClientMessage {
    ClientMessage::Request(Request {
        id,
        op: Operation::Invoke {
            function: "echo".into(),
            args: vec![v],
        },
        deadline_ms: None,
    })
}

/// A client of the previous format (plain `Auth`) against this server: the
/// server assumes the 1 MiB default and never sends more; a larger result
/// is answered `frame_too_large` with `{limit, size}`, and the session stays.
#[tokio::test]
async fn a_plain_auth_client_never_gets_a_frame_over_the_default_limit() {
    let pki = Pki::new();
    let keys = Arc::new(ApiKeyStore::in_memory());
    let key = key(&keys, "invoke_functions");
    let server = start_with(&pki, keys, big_options()).await;
    let mut raw = Raw::connect(&pki, &server).await;
    raw.auth(&key).await;
    raw.send(&echo(1, Value::Bytes(vec![1; TWO_MB].into())))
        .await;
    let e = match raw.recv().await {
        Some(ServerMessage::Response(Response {
            id: 1,
            outcome: Outcome::Err(e),
        })) => e,
        other => panic!("{other:?}"),
    };
    assert_eq!(e.code, ErrorCode::FrameTooLarge);
    let Value::Map(d) = &e.details else {
        panic!("{e:?}")
    };
    assert_eq!(d["limit"], Value::Int(1_048_576));
    assert!(
        matches!(d["size"], Value::Int(n) if n > TWO_MB as i64),
        "{d:?}"
    );
    // Still open and served.
    raw.send(&echo(2, Value::Int(5))).await;
    assert_eq!(
        raw.recv().await,
        Some(ServerMessage::Response(Response {
            id: 2,
            outcome: Outcome::Ok(Value::Int(5))
        }))
    );
}

/// The new client announces its limit and gets frames up to it.
#[tokio::test]
async fn a_client_announcing_a_larger_limit_gets_larger_results() {
    let pki = Pki::new();
    let keys = Arc::new(ApiKeyStore::in_memory());
    let key = key(&keys, "invoke_functions");
    let server = start_with(&pki, keys, big_options()).await;
    let mut raw = Raw::connect(&pki, &server).await;
    raw.send(&ClientMessage::AuthWithOptions(
        AuthWithOptions::new(Auth {
            version: PROTOCOL_VERSION,
            method: AuthMethod::ApiKey(key.to_secret()),
            client_name: None,
        })
        .with_max_inbound_frame_bytes(4 << 20),
    ))
    .await;
    assert!(matches!(raw.recv().await, Some(ServerMessage::AuthOk(_))));
    raw.send(&echo(1, Value::Bytes(vec![1; TWO_MB].into())))
        .await;
    match raw.recv().await {
        Some(ServerMessage::Response(Response {
            id: 1,
            outcome: Outcome::Ok(Value::Bytes(b)),
        })) => assert_eq!(b.len(), TWO_MB),
        other => panic!("{other:?}"),
    }

    // Through the netproc client: its own limit is what it announces.
    let mut ep = endpoint(&pki, &server, &key);
    ep.max_frame_bytes = 4 << 20;
    let big = only(ep);
    let back: Value = big
        .call("echo", (Value::Bytes(vec![2; TWO_MB].into()),))
        .await
        .unwrap();
    assert!(matches!(back, Value::Bytes(b) if b.len() == TWO_MB));
    let small = only(endpoint(&pki, &server, &key));
    let err = small
        .call::<Value>("echo", (Value::Bytes(vec![3; 900_000].into()),))
        .await;
    assert!(err.is_ok(), "{err:?}");
    let err = small
        .call::<Value>("echo", (Value::Bytes(vec![3; 1_100_000].into()),))
        .await
        .unwrap_err();
    // The request itself is over the client's 1 MiB: refused before sending,
    // or answered frame_too_large; either way the connection is kept.
    assert_eq!(err.code(), ErrorCode::FrameTooLarge, "{err:?}");
    assert_eq!(small.call::<i64>("add", (1, 1)).await.unwrap(), 2);
}

/// A server of the previous format: it knows plain `Auth` only, answers
/// anything else first with `not_authenticated` and closes, and then
/// answers every request with `Ok(Int 7)`.
async fn legacy_server(pki: &Pki) -> (std::net::SocketAddr, tokio::task::JoinHandle<usize>) {
    let cfg = netproc_pki::server_config(
        &pki.server.identity().unwrap(),
        &pki.ca.trust_anchors(),
        &[],
    )
    .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let mut refused = 0;
        for _ in 0..2 {
            let (tcp, _) = listener.accept().await.unwrap();
            let mut tls = acceptor.accept(tcp).await.unwrap();
            let mut decoder = FrameDecoder::new(1 << 20);
            let mut next = async |tls: &mut tokio_rustls::server::TlsStream<_>| loop {
                if let Some(body) = decoder.next_frame().unwrap() {
                    return Some(body);
                }
                if tls.read_buf(decoder.buffer_mut()).await.ok()? == 0 {
                    return None;
                }
            };
            let first = next(&mut tls).await.unwrap();
            let reply = |msg: ServerMessage| {
                let mut out = BytesMut::new();
                msg.encode(&mut out, 1 << 20).unwrap();
                out
            };
            // The previous format's kinds: 0..=3. Kind 4 is unknown to it.
            if first[0] != 0 {
                refused += 1;
                let e = ErrorBody::new(
                    ErrorCode::NotAuthenticated,
                    "the first message must be Auth",
                );
                tls.write_all(&reply(ServerMessage::Error(e)))
                    .await
                    .unwrap();
                tls.shutdown().await.unwrap();
                continue;
            }
            let ok = AuthOk {
                version: 1,
                server_name: "legacy".into(),
                session_id: 1,
                privileges: vec!["invoke_functions".into()],
                limits: AnnouncedLimits {
                    max_in_flight_requests: 8,
                    max_pre_auth_frame_bytes: 65_536,
                    max_post_auth_frame_bytes: 1 << 20,
                },
                idle_timeout_ms: 0,
            };
            tls.write_all(&reply(ServerMessage::AuthOk(ok)))
                .await
                .unwrap();
            while let Some(body) = next(&mut tls).await {
                if let Ok(ClientMessage::Request(r)) = ClientMessage::decode(&body) {
                    // Tag 21 (WhoAmI) is past its last operation: it
                    // answers as every server does an unknown tag.
                    let outcome = if matches!(r.op, Operation::WhoAmI) {
                        Outcome::Err(ErrorBody::new(
                            ErrorCode::InvalidOperation,
                            "unknown operation",
                        ))
                    } else {
                        Outcome::Ok(Value::Int(7))
                    };
                    let answer = ServerMessage::Response(Response { id: r.id, outcome });
                    tls.write_all(&reply(answer)).await.unwrap();
                }
            }
        }
        refused
    });
    (addr, task)
}

/// The new client against a server that predates `AuthWithOptions`: it
/// falls back to plain `Auth` and works.
#[tokio::test]
async fn the_new_client_falls_back_to_plain_auth_with_an_older_server() {
    let pki = Pki::new();
    let (addr, legacy) = legacy_server(&pki).await;
    let key = key(&ApiKeyStore::in_memory(), "invoke_functions");
    let ep = netproc_client::ServerEndpoint::new(
        addr,
        "localhost",
        pki.client.identity().unwrap(),
        pki.ca.trust_anchors(),
        key.to_secret(),
    )
    .connect_timeout(Duration::from_secs(5));
    let c = Client::builder().server("old", ep).build().unwrap();
    let s = c.server("old").unwrap();
    let got: Result<i64, ClientError> = s.call("anything", ()).await;
    assert_eq!(got.unwrap(), 7);
    // `whoami` (tag 21) against a server that predates it: a typed
    // `invalid_operation`, and the session carries on.
    let err = s.who_am_i().await.unwrap_err();
    assert_eq!(err.code(), ErrorCode::InvalidOperation, "{err}");
    let got: i64 = s.call("anything", ()).await.unwrap();
    assert_eq!(got, 7);
    c.flush_all();
    drop(c);
    // One refusal of the new message, then plain Auth.
    assert_eq!(legacy.await.unwrap(), 1);
}
