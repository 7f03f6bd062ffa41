//! The protocol's answers to bad and unusual input, at the wire level.

use std::sync::Arc;
use std::time::Duration;

use netproc_auth::ApiKeyStore;
use netproc_server::ServerOptions;
use netproc_wire::*;

use crate::support::*;

fn expect_error(msg: Option<ServerMessage>, code: ErrorCode) {
    match msg {
        Some(ServerMessage::Error(e)) => assert_eq!(e.code, code, "{e:?}"),
        other => panic!("expected Error({code}), got {other:?}"),
    }
}

fn expect_response_error(msg: Option<ServerMessage>, id: u64, code: ErrorCode) -> ErrorBody {
    match msg {
        Some(ServerMessage::Response(Response {
            id: got,
            outcome: Outcome::Err(e),
        })) => {
            assert_eq!(got, id);
            assert_eq!(e.code, code, "{e:?}");
            e
        }
        other => panic!("expected Response({id}, {code}), got {other:?}"),
    }
}

fn invoke(id: u64, function: &str, args: Vec<Value>) -> ClientMessage {
    ClientMessage::Request(Request {
        id,
        op: Operation::Invoke {
            function: function.into(),
            args,
        },
        deadline_ms: None,
    })
}

async fn setup(
    options: ServerOptions,
) -> (Pki, netproc_server::ServerHandle, netproc_auth::ApiKey) {
    let pki = Pki::new();
    let keys = Arc::new(ApiKeyStore::in_memory());
    let key = key(&keys, "invoke_functions");
    let server = start_with(&pki, keys, options).await;
    (pki, server, key)
}

#[tokio::test]
async fn a_first_message_that_is_not_auth_gets_not_authenticated_and_a_close() {
    let (pki, server, _) = setup(ServerOptions::default()).await;
    let mut raw = Raw::connect(&pki, &server).await;
    raw.send(&ClientMessage::Ping { nonce: 1 }).await;
    expect_error(raw.recv().await, ErrorCode::NotAuthenticated);
    assert!(raw.recv().await.is_none(), "connection should close");
}

#[tokio::test]
async fn no_auth_in_time_gets_timeout_and_a_close() {
    let mut options = ServerOptions::default();
    options.connection_controls.auth_message_timeout_ms = 200;
    let (pki, server, _) = setup(options).await;
    let mut raw = Raw::connect(&pki, &server).await;
    expect_error(raw.recv().await, ErrorCode::Timeout);
    assert!(raw.recv().await.is_none());
}

#[tokio::test]
async fn an_oversized_pre_auth_frame_is_refused_from_its_header() {
    let (pki, server, key) = setup(ServerOptions::default()).await;
    let mut raw = Raw::connect(&pki, &server).await;
    // Declare 100 000 bytes (limit 65 536) and send none of them.
    raw.send_bytes(&100_000u32.to_be_bytes()).await;
    expect_error(raw.recv().await, ErrorCode::FrameTooLarge);
    assert!(raw.recv().await.is_none());

    // After auth the larger post-auth limit applies.
    let mut raw = Raw::connect(&pki, &server).await;
    raw.auth(&key).await;
    raw.send(&invoke(
        1,
        "echo",
        vec![Value::Bytes(vec![7; 100_000].into())],
    ))
    .await;
    match raw.recv().await {
        Some(ServerMessage::Response(Response {
            id: 1,
            outcome: Outcome::Ok(Value::Bytes(b)),
        })) => {
            assert_eq!(b.len(), 100_000)
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn unsupported_version_is_refused() {
    let (pki, server, _) = setup(ServerOptions::default()).await;
    let mut raw = Raw::connect(&pki, &server).await;
    raw.send_body(&[0, 7]).await; // Auth, version 7
    expect_error(raw.recv().await, ErrorCode::UnsupportedVersion);
}

#[tokio::test]
async fn bad_requests_after_auth_get_their_codes_and_the_session_stays_open() {
    let (pki, server, key) = setup(ServerOptions::default()).await;
    let mut raw = Raw::connect(&pki, &server).await;
    let ok = raw.auth(&key).await;
    assert_eq!(ok.privileges, ["invoke_functions"]);
    assert_eq!(ok.limits.max_in_flight_requests, 128);

    // Unknown operation tag 99 on request 5.
    raw.send_body(&[1, 5, 99]).await;
    expect_response_error(raw.recv().await, 5, ErrorCode::InvalidOperation);
    // Undecodable Invoke payload on request 6.
    raw.send_body(&[1, 6, 0, 200]).await;
    expect_response_error(raw.recv().await, 6, ErrorCode::InvalidRequest);
    // An id that does not increase: a top-level Error naming it, never a
    // Response (which would be taken for the live call's answer).
    raw.send(&invoke(6, "add", vec![1.into(), 2.into()])).await;
    match raw.recv().await {
        Some(ServerMessage::Error(e)) => {
            assert_eq!(e.code, ErrorCode::InvalidRequest);
            assert!(e.message.contains("not above"), "{e:?}");
            let Value::Map(d) = &e.details else {
                panic!("{e:?}")
            };
            assert_eq!(d["id"], Value::Int(6));
            assert_eq!(d["last_id"], Value::Int(6));
        }
        other => panic!("{other:?}"),
    }
    // Unknown message kind: answered, session stays.
    raw.send_body(&[42]).await;
    expect_error(raw.recv().await, ErrorCode::UnsupportedMessageType);
    // Still usable.
    raw.send(&invoke(7, "add", vec![1.into(), 2.into()])).await;
    assert_eq!(
        raw.recv().await,
        Some(ServerMessage::Response(Response {
            id: 7,
            outcome: Outcome::Ok(Value::Int(3))
        }))
    );
    raw.send(&ClientMessage::Ping { nonce: 9 }).await;
    assert_eq!(raw.recv().await, Some(ServerMessage::Pong { nonce: 9 }));
}

#[tokio::test]
async fn a_malformed_envelope_or_second_auth_ends_the_session() {
    let (pki, server, key) = setup(ServerOptions::default()).await;
    let mut raw = Raw::connect(&pki, &server).await;
    raw.auth(&key).await;
    raw.send_body(&[3]).await; // Ping without its nonce
    expect_error(raw.recv().await, ErrorCode::ProtocolError);
    assert!(raw.recv().await.is_none());

    let mut raw = Raw::connect(&pki, &server).await;
    raw.auth(&key).await;
    raw.send(&ClientMessage::Auth(Auth {
        version: PROTOCOL_VERSION,
        method: AuthMethod::ApiKey(key.to_secret()),
        client_name: None,
    }))
    .await;
    expect_error(raw.recv().await, ErrorCode::AuthenticationFailed);
    assert!(raw.recv().await.is_none());

    // A zero-length frame is a protocol error too.
    let mut raw = Raw::connect(&pki, &server).await;
    raw.auth(&key).await;
    raw.send_bytes(&[0, 0, 0, 0]).await;
    expect_error(raw.recv().await, ErrorCode::ProtocolError);
}

#[tokio::test]
async fn the_in_flight_cap_answers_rate_limited_with_its_scope() {
    let mut options = ServerOptions::default();
    options
        .request_controls
        .max_in_flight_requests_per_connection = 2;
    let (pki, server, key) = setup(options).await;
    let mut raw = Raw::connect(&pki, &server).await;
    assert_eq!(raw.auth(&key).await.limits.max_in_flight_requests, 2);
    for id in 1..=3 {
        raw.send(&invoke(id, "sleep_ms", vec![200.into()])).await;
    }
    let e = expect_response_error(raw.recv().await, 3, ErrorCode::RateLimited);
    let Value::Map(d) = e.details else { panic!() };
    assert_eq!(d["scope"], Value::from("in_flight_per_connection"));
    assert_eq!(d["retry_after_ms"], Value::Int(50));
    for _ in 0..2 {
        assert!(matches!(
            raw.recv().await,
            Some(ServerMessage::Response(Response {
                outcome: Outcome::Ok(_),
                ..
            }))
        ));
    }
}

#[tokio::test]
async fn a_ping_flood_closes_the_connection_with_rate_limited() {
    let (pki, server, key) = setup(ServerOptions::default()).await;
    let mut raw = Raw::connect(&pki, &server).await;
    raw.auth(&key).await;
    let mut burst = bytes::BytesMut::new();
    for nonce in 0..25 {
        ClientMessage::Ping { nonce }
            .encode(&mut burst, 1024)
            .unwrap();
    }
    raw.send_bytes(&burst).await;
    let mut pongs = 0;
    loop {
        match raw.recv().await {
            Some(ServerMessage::Pong { .. }) => pongs += 1,
            Some(ServerMessage::Error(e)) => {
                assert_eq!(e.code, ErrorCode::RateLimited);
                break;
            }
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(pongs, 20, "the burst is 20");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_reads_is_cut_off_and_others_keep_being_served() {
    let mut options = ServerOptions::default();
    options.session_controls.max_outbound_bytes_per_connection = 1024 * 1024;
    options.session_controls.write_stall_timeout_ms = 300;
    let (pki, server, key) = setup(options).await;
    let good = client(&pki, &server, &key).server("s1").unwrap();
    good.session().await.unwrap();

    let mut raw = Raw::connect(&pki, &server).await;
    raw.auth(&key).await;
    // Ask for ~25 MiB of responses and never read them.
    let big = vec![Value::Bytes(vec![1; 256 * 1024].into())];
    let writer = tokio::spawn(async move {
        for id in 1..=100u64 {
            let msg = invoke(id, "echo", big.clone());
            match tokio::time::timeout(Duration::from_secs(2), raw.try_send(&msg)).await {
                Ok(Ok(())) => {}
                // The server stopped reading us (backpressure), or cut us off.
                Err(_) | Ok(Err(_)) => break,
            }
        }
        raw
    });
    // Meanwhile the well-behaved client is served.
    for i in 0..50 {
        assert_eq!(good.call::<i64>("add", (i, 1)).await.unwrap(), i + 1);
    }
    let _raw = writer.await.unwrap();
    // The stalled connection is closed within the stall timeout (plus slack).
    let mut closed = false;
    for _ in 0..100 {
        if server.sessions().len() == 1 {
            closed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        closed,
        "the non-reading session was not closed: {:?}",
        server.sessions()
    );
    assert_eq!(good.call::<i64>("add", (1, 1)).await.unwrap(), 2);
}

fn define_constant(id: u64) -> ClientMessage {
    ClientMessage::Request(Request {
        id,
        op: Operation::DefineConstant {
            name: "c".into(),
            value: Value::Int(1),
        },
        deadline_ms: None,
    })
}

/// Every frame a session reads draws from a budget: refused frames from the
/// refusal budget, whatever the refusal. Past it they are answered
/// `rate_limited` (scope `refusals`), and audited once per interval.
#[tokio::test]
async fn refused_frames_draw_from_the_refusal_budget() {
    let capture = crate::auth::audit_capture();
    let mut options = ServerOptions::default();
    options.request_controls.per_connection.burst_tokens = 3;
    options.request_controls.refusals.burst_tokens = 4;
    options.request_controls.refusals.tokens_per_interval = 1;
    options.request_controls.refusals.interval_ms = 60_000;
    let (pki, server, key) = setup(options).await;
    let mut raw = Raw::connect(&pki, &server).await;
    raw.auth(&key).await;
    let refusal_scope = |e: &ErrorBody| match &e.details {
        Value::Map(m) => m.get("scope").cloned(),
        _ => None,
    };
    // Four refusals of four kinds pass with their own codes.
    raw.send(&define_constant(1)).await;
    expect_response_error(raw.recv().await, 1, ErrorCode::InsufficientPrivileges);
    raw.send_body(&[1, 2, 99]).await;
    expect_response_error(raw.recv().await, 2, ErrorCode::InvalidOperation);
    raw.send_body(&[1, 3, 0, 200]).await;
    expect_response_error(raw.recv().await, 3, ErrorCode::InvalidRequest);
    raw.send_body(&[42]).await;
    expect_error(raw.recv().await, ErrorCode::UnsupportedMessageType);
    // Then the budget is spent: 200 more privilege denials, bad operations,
    // repeated ids, unknown kinds and cancels of unknown ids all get
    // rate_limited, scope refusals.
    for i in 0..40u64 {
        let id = 10 + i * 5;
        raw.send(&define_constant(id)).await;
        let e = expect_response_error(raw.recv().await, id, ErrorCode::RateLimited);
        assert_eq!(refusal_scope(&e), Some(Value::from("refusals")), "{e:?}");
        raw.send_body(&[1, (id + 1) as u8 & 0x7f, 99]).await;
        let _ = raw.recv().await;
        // A repeated id: refused with a top-level Error, never a Response.
        raw.send(&define_constant(id)).await;
        match raw.recv().await {
            Some(ServerMessage::Error(e)) => {
                assert_eq!(e.code, ErrorCode::RateLimited);
                assert_eq!(refusal_scope(&e), Some(Value::from("refusals")));
            }
            other => panic!("{other:?}"),
        }
        raw.send_body(&[42]).await;
        match raw.recv().await {
            Some(ServerMessage::Error(e)) => {
                assert_eq!(e.code, ErrorCode::RateLimited);
                assert_eq!(refusal_scope(&e), Some(Value::from("refusals")));
            }
            other => panic!("{other:?}"),
        }
        raw.send(&ClientMessage::Cancel { id: 1_000_000 + i }).await;
        expect_error(raw.recv().await, ErrorCode::RateLimited);
    }
    let m = server.abuse_metrics();
    assert!(m.rate_limited_refusals_count >= 200, "{m:?}");
    // The session stays open (disconnect_on_limit is off) and served.
    raw.send(&invoke(1_000, "add", vec![1.into(), 2.into()]))
        .await;
    assert_eq!(
        raw.recv().await,
        Some(ServerMessage::Response(Response {
            id: 1_000,
            outcome: Outcome::Ok(Value::Int(3))
        }))
    );
    // Audit: the first refusal per (principal, code) only, not one per frame.
    let principal = ok_principal(&key);
    let logged = String::from_utf8_lossy(&capture.lock().unwrap()).into_owned();
    let lines = logged
        .lines()
        .filter(|l| l.contains("event=\"request\"") || l.contains("event=request"))
        .filter(|l| l.contains(&principal))
        .count();
    assert!(lines <= 5, "{lines} audit lines:\n{logged}");
}

fn ok_principal(key: &netproc_auth::ApiKey) -> String {
    key.expose()
        .strip_prefix("npk_")
        .and_then(|r| r.split_once('_'))
        .map(|(id, _)| id.to_owned())
        .unwrap()
}

#[tokio::test]
async fn a_spent_refusal_budget_with_disconnect_on_limit_closes_the_session() {
    let mut options = ServerOptions::default();
    options.request_controls.refusals.burst_tokens = 2;
    options.request_controls.refusals.interval_ms = 60_000;
    options.request_controls.refusals.disconnect_on_limit = true;
    let (pki, server, key) = setup(options).await;
    let mut raw = Raw::connect(&pki, &server).await;
    raw.auth(&key).await;
    for id in 1..=2 {
        raw.send(&define_constant(id)).await;
        expect_response_error(raw.recv().await, id, ErrorCode::InsufficientPrivileges);
    }
    raw.send(&define_constant(3)).await;
    expect_response_error(raw.recv().await, 3, ErrorCode::RateLimited);
    match raw.recv().await {
        Some(ServerMessage::GoAway(g)) => assert_eq!(g.reason, ErrorCode::RateLimited),
        other => panic!("{other:?}"),
    }
    assert!(raw.recv().await.is_none());
}

#[tokio::test]
async fn request_ids_start_at_1_and_a_zero_deadline_is_a_timeout() {
    let (pki, server, key) = setup(ServerOptions::default()).await;
    let mut raw = Raw::connect(&pki, &server).await;
    raw.auth(&key).await;
    raw.send(&invoke(0, "add", vec![1.into(), 2.into()])).await;
    match raw.recv().await {
        Some(ServerMessage::Error(e)) => {
            assert_eq!(e.code, ErrorCode::InvalidRequest);
            assert!(e.message.contains("start at 1"), "{e:?}");
        }
        other => panic!("{other:?}"),
    }
    raw.send(&ClientMessage::Request(Request {
        id: 1,
        op: Operation::Invoke {
            function: "add".into(),
            args: vec![1.into(), 2.into()],
        },
        deadline_ms: Some(0),
    }))
    .await;
    expect_response_error(raw.recv().await, 1, ErrorCode::Timeout);
    // A second Auth, even one naming another version: authentication_failed.
    raw.send_body(&[0, 2]).await;
    expect_error(raw.recv().await, ErrorCode::AuthenticationFailed);
    assert!(raw.recv().await.is_none());
}

#[tokio::test]
async fn non_canonical_encodings_are_refused_at_their_layer() {
    let (pki, server, key) = setup(ServerOptions::default()).await;
    let mut raw = Raw::connect(&pki, &server).await;
    raw.auth(&key).await;
    // invoke(5, "add", []) with the name's length 3 as 83 00.
    raw.send_body(&[1, 5, 0, 0x83, 0x00, b'a', b'd', b'd', 0, 0])
        .await;
    let e = expect_response_error(raw.recv().await, 5, ErrorCode::InvalidRequest);
    assert!(e.message.contains("non-canonical"), "{e:?}");
    // A ping whose nonce is 81 00: the envelope, protocol_error and close.
    raw.send_body(&[3, 0x81, 0x00]).await;
    expect_error(raw.recv().await, ErrorCode::ProtocolError);
    assert!(raw.recv().await.is_none());
}

#[tokio::test]
async fn a_ping_flood_is_refused_with_scope_and_retry() {
    let mut options = ServerOptions::default();
    options.session_controls.max_pings_per_second = 1;
    options.session_controls.ping_burst = 1;
    let (pki, server, key) = setup(options).await;
    let mut raw = Raw::connect(&pki, &server).await;
    raw.auth(&key).await;
    raw.send(&ClientMessage::Ping { nonce: 1 }).await;
    raw.send(&ClientMessage::Ping { nonce: 2 }).await;
    assert_eq!(raw.recv().await, Some(ServerMessage::Pong { nonce: 1 }));
    match raw.recv().await {
        Some(ServerMessage::Error(e)) => {
            assert_eq!(e.code, ErrorCode::RateLimited);
            let Value::Map(d) = &e.details else {
                panic!("{e:?}")
            };
            assert_eq!(d["scope"], Value::from("pings"));
            assert!(matches!(d["retry_after_ms"], Value::Int(ms) if ms > 0));
        }
        other => panic!("{other:?}"),
    }
    assert!(raw.recv().await.is_none());
}

/// One rule for every reason a session ends: `GoAway` first, then the
/// answers of the calls still in flight.
#[tokio::test]
async fn go_away_comes_before_the_in_flight_answers_for_every_reason() {
    let (pki, server, key) = setup(ServerOptions::default()).await;
    let mut raw = Raw::connect(&pki, &server).await;
    let ok = raw.auth(&key).await;
    raw.send(&invoke(1, "sleep_ms", vec![Value::Int(10_000)]))
        .await;
    // Wait until the call is running.
    for _ in 0..200 {
        if server.abuse_metrics().in_flight_request_count == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    server.close_sessions(
        &netproc_server::SessionSelector::Session(ok.session_id),
        ErrorCode::DisconnectedByAdmin,
    );
    match raw.recv().await {
        Some(ServerMessage::GoAway(g)) => {
            assert_eq!(g.reason, ErrorCode::DisconnectedByAdmin);
            assert_eq!(g.last_id, 1);
        }
        other => panic!("{other:?}"),
    }
    expect_response_error(raw.recv().await, 1, ErrorCode::DisconnectedByAdmin);
    assert!(raw.recv().await.is_none());
}
