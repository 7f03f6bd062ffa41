//! Shutdown, session closing, admin operations, constants.

use std::sync::Arc;
use std::time::Duration;

use netproc_auth::ApiKeyStore;
use netproc_client::ClientError;
use netproc_server::SessionSelector;
use netproc_wire::{ErrorCode, Value};

use crate::support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_finishes_in_flight_calls_then_refuses() {
    let pki = Pki::new();
    let keys = Arc::new(ApiKeyStore::in_memory());
    let key = key(&keys, "invoke_functions");
    let server = start(&pki, "s1", keys).await;
    let s = client(&pki, &server, &key).server("s1").unwrap();
    s.session().await.unwrap();
    let in_flight = {
        let s = s.clone();
        tokio::spawn(async move { s.call::<u64>("sleep_ms", (300,)).await })
    };
    // Let the call reach the server.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let started = std::time::Instant::now();
    server.shutdown(Duration::from_secs(5)).await;
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "waited for the grace period"
    );
    assert_eq!(
        in_flight.await.unwrap().unwrap(),
        300,
        "the in-flight call finished"
    );
    let err = s.call::<i64>("add", (1, 1)).await.unwrap_err();
    assert!(
        matches!(
            err,
            ClientError::ShuttingDown { .. } | ClientError::Connect { .. }
        ),
        "{err:?}"
    );
}

#[tokio::test]
async fn close_sessions_by_key_answers_in_flight_calls_with_the_reason() {
    let pki = Pki::new();
    let keys = Arc::new(ApiKeyStore::in_memory());
    let (info, key) = keys
        .create(netproc_auth::KeySpec::new(
            "invoke_functions".parse().unwrap(),
        ))
        .unwrap();
    let server = start(&pki, "s1", Arc::clone(&keys)).await;
    let s = client(&pki, &server, &key).server("s1").unwrap();
    s.session().await.unwrap();
    let in_flight = {
        let s = s.clone();
        tokio::spawn(async move { s.call::<u64>("sleep_ms", (5_000,)).await })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    // Another generation of the key selects nothing.
    let other_generation = SessionSelector::Key {
        key_id: info.id.clone(),
        generation: Some(2),
    };
    assert_eq!(
        server.close_sessions(&other_generation, ErrorCode::CredentialRevoked),
        0
    );
    let this_key = SessionSelector::Key {
        key_id: info.id.clone(),
        generation: Some(1),
    };
    assert_eq!(
        server.close_sessions(&this_key, ErrorCode::CredentialRevoked),
        1
    );
    let err = tokio::time::timeout(Duration::from_secs(2), in_flight)
        .await
        .unwrap()
        .unwrap()
        .unwrap_err();
    let ClientError::Remote { code, .. } = &err else {
        panic!("{err:?}")
    };
    assert_eq!(*code, ErrorCode::CredentialRevoked);
}

#[tokio::test]
async fn admin_operations_list_and_disconnect_sessions() {
    let pki = Pki::new();
    let keys = Arc::new(ApiKeyStore::in_memory());
    let admin_key = key(&keys, "admin_privileges");
    let user_key = key(&keys, "invoke_functions");
    let server = start(&pki, "s1", Arc::clone(&keys)).await;
    let admin = client(&pki, &server, &admin_key).server("s1").unwrap();
    let user = client(&pki, &server, &user_key).server("s1").unwrap();
    let (user_session, _) = user.session().await.unwrap();

    let info = admin.server_info().await.unwrap();
    let Value::Map(info) = info else { panic!() };
    assert_eq!(info["name"], Value::from("s1"));
    assert_eq!(info["sessions"], Value::Int(2));

    let sessions = admin.list_sessions().await.unwrap();
    let Value::List(sessions) = sessions else {
        panic!()
    };
    assert_eq!(sessions.len(), 2);

    assert_eq!(admin.disconnect_session(user_session).await.unwrap(), 1);
    assert_eq!(admin.disconnect_session(999_999).await.unwrap(), 0);
    // The user's next session is a new one.
    let mut reconnected = None;
    for _ in 0..20 {
        if let Ok((id, _)) = user.session().await
            && id != user_session
        {
            reconnected = Some(id);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        reconnected.is_some(),
        "the disconnected client did not get a new session"
    );

    // The abuse metrics reach an administrator, with the reference's names.
    let Value::Map(m) = admin
        .execute(netproc_wire::Operation::AbuseMetrics)
        .await
        .unwrap()
    else {
        panic!()
    };
    assert!(
        matches!(m["connection_accepted_count"], Value::Int(n) if n >= 2),
        "{m:?}"
    );
    assert!(m.contains_key("rate_limited_in_flight_count"));
    assert!(m.contains_key("active_unauthenticated_session_count"));
}

#[tokio::test]
async fn constants_are_defined_listed_and_undefined() {
    let pki = Pki::new();
    let keys = Arc::new(ApiKeyStore::in_memory());
    let key = key(&keys, "define_constants,undefine_constants");
    let server = crate::support::builder(&pki, "s1", keys)
        .constant("built_in", 7)
        .start()
        .await
        .unwrap();
    let s = client(&pki, &server, &key).server("s1").unwrap();
    s.define_constant("limit", vec![1, 2]).await.unwrap();
    let c = s.list_constants().await.unwrap();
    assert_eq!(c["built_in"], Value::Int(7));
    assert_eq!(c["limit"], Value::List(vec![Value::Int(1), Value::Int(2)]));
    s.undefine_constant("limit").await.unwrap();
    s.undefine_constant("never_defined").await.unwrap();
    assert!(!s.list_constants().await.unwrap().contains_key("limit"));
    let err = s.define_constant("not-an-identifier", 1).await.unwrap_err();
    assert!(
        matches!(err, ClientError::InvalidArgument { .. }),
        "{err:?}"
    );
    // Script operations are reserved, and say so.
    let err = s
        .execute(netproc_wire::Operation::UndefineFunction { name: "f".into() })
        .await
        .unwrap_err();
    assert!(
        matches!(err, ClientError::InsufficientPrivileges { .. }),
        "{err:?}"
    );
}

#[tokio::test]
async fn an_idle_session_is_closed_with_idle_timeout() {
    let pki = Pki::new();
    let keys = Arc::new(ApiKeyStore::in_memory());
    let key = key(&keys, "invoke_functions");
    let mut options = netproc_server::ServerOptions::default();
    options.session_controls.idle_timeout_ms = 200;
    options.session_controls.unstable_after_ms = 50;
    options.session_controls.offline_after_ms = 100;
    let server = start_with(&pki, keys, options).await;
    let mut raw = Raw::connect(&pki, &server).await;
    assert_eq!(raw.auth(&key).await.idle_timeout_ms, 200);
    let started = std::time::Instant::now();
    match raw.recv().await {
        Some(netproc_wire::ServerMessage::GoAway(g)) => {
            assert_eq!(g.reason, ErrorCode::IdleTimeout)
        }
        other => panic!("{other:?}"),
    }
    assert!(started.elapsed() >= Duration::from_millis(190));
    assert!(raw.recv().await.is_none());
}

#[tokio::test]
async fn extensions_are_dispatched_by_name_and_gated_by_their_privilege() {
    use netproc_auth::BoxFuture;
    use netproc_server::{CallContext, CallError, ExtensionHandler};
    use netproc_wire::{Operation, Privilege};
    struct Reverse;
    impl ExtensionHandler for Reverse {
        fn handle(
            &self,
            _ctx: CallContext,
            mut payload: Vec<u8>,
        ) -> BoxFuture<'static, Result<Vec<u8>, CallError>> {
            payload.reverse();
            Box::pin(async move { Ok(payload) })
        }
    }
    let pki = Pki::new();
    let keys = Arc::new(ApiKeyStore::in_memory());
    let receiver = key(&keys, "receive_credentials");
    let other = key(&keys, "invoke_functions");
    let server = crate::support::builder(&pki, "s1", keys)
        .extension(
            "test.reverse",
            Privilege::ReceiveCredentials,
            Arc::new(Reverse),
        )
        .start()
        .await
        .unwrap();
    let op = |name: &str| Operation::Extension {
        name: name.into(),
        payload: vec![1, 2, 3],
    };
    let s = client(&pki, &server, &receiver).server("s1").unwrap();
    assert_eq!(
        s.execute(op("test.reverse")).await.unwrap(),
        Value::Bytes(vec![3, 2, 1].into())
    );
    let err = s.execute(op("test.unknown")).await.unwrap_err();
    assert!(
        matches!(
            &err,
            ClientError::Remote {
                code: ErrorCode::InvalidOperation,
                ..
            }
        ),
        "{err:?}"
    );
    let err = client(&pki, &server, &other)
        .server("s1")
        .unwrap()
        .execute(op("test.reverse"))
        .await
        .unwrap_err();
    assert!(
        matches!(err, ClientError::InsufficientPrivileges { .. }),
        "{err:?}"
    );
}

#[tokio::test]
async fn script_operations_are_reserved_and_say_so() {
    let pki = Pki::new();
    let keys = Arc::new(ApiKeyStore::in_memory());
    let key = key(&keys, "all_privileges");
    let server = start(&pki, "s1", keys).await;
    let s = client(&pki, &server, &key).server("s1").unwrap();
    for op in [
        netproc_wire::Operation::UndefineFunction { name: "f".into() },
        netproc_wire::Operation::UndefineDependency {
            alias: "m".into(),
            force: false,
        },
    ] {
        let err = s.execute(op).await.unwrap_err();
        let ClientError::Remote { code, message, .. } = &err else {
            panic!("{err:?}")
        };
        assert_eq!(*code, ErrorCode::InvalidOperation);
        assert!(message.contains("not enabled"), "{message}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_queues_under_the_announced_limit_and_refuses_past_its_queue() {
    let pki = Pki::new();
    let keys = Arc::new(ApiKeyStore::in_memory());
    let key = key(&keys, "invoke_functions");
    let mut options = netproc_server::ServerOptions::default();
    options
        .request_controls
        .max_in_flight_requests_per_connection = 2;
    let server = start_with(&pki, keys, options).await;
    let client = netproc_client::Client::builder()
        .server("s1", endpoint(&pki, &server, &key).max_queued_calls(3))
        .build()
        .unwrap();
    let s = client.server("s1").unwrap();
    s.session().await.unwrap();
    // 2 run, 3 wait locally, the 6th is refused at once: never `rate_limited`.
    let calls: Vec<_> = (0..6)
        .map(|_| {
            let s = s.clone();
            tokio::spawn(async move { s.call::<u64>("sleep_ms", (200,)).await })
        })
        .collect();
    let mut ok = 0;
    let mut overloaded = 0;
    for c in calls {
        match c.await.unwrap() {
            Ok(_) => ok += 1,
            Err(ClientError::Overloaded { .. }) => overloaded += 1,
            Err(e) => panic!("{e:?}"),
        }
    }
    assert_eq!((ok, overloaded), (5, 1));
}

/// Session timers run on the server's clock: with a manual clock, the idle
/// timeout, the ping bucket and a key's expiry move only when the clock is
/// advanced — no real sleeps.
mod manual_clock {
    use std::sync::Arc;
    use std::time::{Duration, SystemTime};

    use netproc_auth::{ApiKeyStore, KeySpec};
    use netproc_limits::ManualClock;
    use netproc_server::{ServerHandle, ServerOptions};
    use netproc_wire::{ClientMessage, ErrorCode, ServerMessage};

    use crate::support::*;

    async fn server(
        pki: &Pki,
        keys: Arc<ApiKeyStore>,
        clock: &Arc<ManualClock>,
        f: impl FnOnce(&mut ServerOptions),
    ) -> ServerHandle {
        let mut options = ServerOptions::default();
        f(&mut options);
        builder(pki, "s1", keys)
            .options(options)
            .clock(Arc::clone(clock) as Arc<dyn netproc_limits::Clock>)
            .start()
            .await
            .unwrap()
    }

    fn go_away(msg: Option<ServerMessage>) -> ErrorCode {
        match msg {
            Some(ServerMessage::GoAway(g)) => g.reason,
            other => panic!("expected GoAway, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn the_idle_timeout_follows_the_server_clock() {
        let pki = Pki::new();
        let keys = Arc::new(ApiKeyStore::in_memory());
        let key = key(&keys, "invoke_functions");
        let clock = Arc::new(ManualClock::new());
        let server = server(&pki, keys, &clock, |o| {
            o.session_controls.idle_timeout_ms = 60_000;
            o.session_controls.unstable_after_ms = 1_000;
            o.session_controls.offline_after_ms = 2_000;
        })
        .await;
        let mut raw = Raw::connect(&pki, &server).await;
        raw.auth(&key).await;
        // Activity at +50 s pushes the deadline to +110 s.
        clock.advance(Duration::from_secs(50));
        raw.send(&ClientMessage::Ping { nonce: 1 }).await;
        assert_eq!(raw.recv().await, Some(ServerMessage::Pong { nonce: 1 }));
        clock.advance(Duration::from_secs(50));
        raw.send(&ClientMessage::Ping { nonce: 2 }).await;
        assert_eq!(raw.recv().await, Some(ServerMessage::Pong { nonce: 2 }));
        clock.advance(Duration::from_secs(61));
        assert_eq!(go_away(raw.recv().await), ErrorCode::IdleTimeout);
    }

    #[tokio::test]
    async fn the_ping_bucket_refills_on_the_server_clock() {
        let pki = Pki::new();
        let keys = Arc::new(ApiKeyStore::in_memory());
        let key = key(&keys, "invoke_functions");
        let clock = Arc::new(ManualClock::new());
        let server = server(&pki, keys, &clock, |o| {
            o.session_controls.max_pings_per_second = 1;
            o.session_controls.ping_burst = 2;
        })
        .await;
        let mut raw = Raw::connect(&pki, &server).await;
        raw.auth(&key).await;
        for round in 0..3u64 {
            for n in 0..2 {
                let nonce = round * 10 + n;
                raw.send(&ClientMessage::Ping { nonce }).await;
                assert_eq!(raw.recv().await, Some(ServerMessage::Pong { nonce }));
            }
            // However long this takes in real time, the bucket refills only
            // when the server's clock moves.
            clock.advance(Duration::from_secs(2));
        }
        raw.send(&ClientMessage::Ping { nonce: 100 }).await;
        raw.send(&ClientMessage::Ping { nonce: 101 }).await;
        raw.send(&ClientMessage::Ping { nonce: 102 }).await;
        assert_eq!(raw.recv().await, Some(ServerMessage::Pong { nonce: 100 }));
        assert_eq!(raw.recv().await, Some(ServerMessage::Pong { nonce: 101 }));
        match raw.recv().await {
            Some(ServerMessage::Error(e)) => assert_eq!(e.code, ErrorCode::RateLimited),
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn a_key_expiry_ends_the_session_when_the_server_clock_reaches_it() {
        let pki = Pki::new();
        let keys = Arc::new(ApiKeyStore::in_memory());
        let (_, key) = keys
            .create(
                KeySpec::new("invoke_functions".parse().unwrap())
                    .expires_at(SystemTime::now() + Duration::from_secs(600)),
            )
            .unwrap();
        let clock = Arc::new(ManualClock::new());
        let server = server(&pki, keys, &clock, |_| {}).await;
        let mut raw = Raw::connect(&pki, &server).await;
        raw.auth(&key).await;
        clock.advance(Duration::from_secs(300));
        raw.send(&ClientMessage::Ping { nonce: 1 }).await;
        assert_eq!(raw.recv().await, Some(ServerMessage::Pong { nonce: 1 }));
        clock.advance(Duration::from_secs(301));
        assert_eq!(go_away(raw.recv().await), ErrorCode::CredentialRevoked);
    }
}
