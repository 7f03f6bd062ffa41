//! Calls: results, errors, concurrency, cancellation, deadlines.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use netproc_auth::ApiKeyStore;
use netproc_client::ClientError;
use netproc_wire::Value;

use crate::support::*;

#[tokio::test]
async fn the_minimal_call_returns_ok() {
    let pki = Pki::new();
    let keys = Arc::new(ApiKeyStore::in_memory());
    let key = key(&keys, "invoke_functions");
    let server = start(&pki, "s1", keys).await;
    let client = client(&pki, &server, &key);
    let r: String = client
        .server("s1")
        .unwrap()
        .call("ping_fn", ())
        .await
        .unwrap();
    assert_eq!(r, "ok");
    let sum: i64 = client
        .server("s1")
        .unwrap()
        .call("add", (40, 2))
        .await
        .unwrap();
    assert_eq!(sum, 42);
}

#[tokio::test]
async fn unknown_function_bad_args_and_function_errors_have_their_codes() {
    let pki = Pki::new();
    let keys = Arc::new(ApiKeyStore::in_memory());
    let key = key(&keys, "invoke_functions");
    let server = start(&pki, "s1", keys).await;
    let s = client(&pki, &server, &key).server("s1").unwrap();

    let err = s.call::<i64>("nope", ()).await.unwrap_err();
    assert!(
        matches!(err, ClientError::FunctionNotFound { .. }),
        "{err:?}"
    );

    let err = s.call::<i64>("add", ("two", 3)).await.unwrap_err();
    let ClientError::InvalidArgument { message, .. } = &err else {
        panic!("{err:?}")
    };
    assert!(message.contains("(i64, i64)"), "{message}");
    let err = s.call::<i64>("add", (1,)).await.unwrap_err();
    assert!(
        matches!(err, ClientError::InvalidArgument { .. }),
        "{err:?}"
    );

    let err = s.call::<()>("fail", ("no luck",)).await.unwrap_err();
    let ClientError::Remote { code, message, .. } = &err else {
        panic!("{err:?}")
    };
    assert_eq!(code.as_str(), "operation_failed");
    assert_eq!(message, "no luck");
}

#[tokio::test]
async fn a_panicking_function_answers_internal_and_the_session_survives() {
    let pki = Pki::new();
    let keys = Arc::new(ApiKeyStore::in_memory());
    let key = key(&keys, "invoke_functions");
    let server = start(&pki, "s1", keys).await;
    let s = client(&pki, &server, &key).server("s1").unwrap();
    let (session, _) = s.session().await.unwrap();
    let err = s.call::<()>("boom", ()).await.unwrap_err();
    let ClientError::Remote { code, message, .. } = &err else {
        panic!("{err:?}")
    };
    assert_eq!(code.as_str(), "internal");
    assert!(!message.contains("secret"), "panic text leaked: {message}");
    assert_eq!(s.call::<i64>("add", (1, 1)).await.unwrap(), 2);
    assert_eq!(s.session().await.unwrap().0, session, "same session");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_concurrent_calls_on_one_connection_are_all_answered_correctly() {
    let pki = Pki::new();
    let keys = Arc::new(ApiKeyStore::in_memory());
    let key = key(&keys, "invoke_functions");
    // The reference's request buckets allow bursts of 400 per connection.
    let server = start_with(&pki, keys, unlimited()).await;
    let s = client(&pki, &server, &key).server("s1").unwrap();
    let calls = (0..1000i64).map(|i| {
        let s = s.clone();
        async move { (i, s.call::<i64>("add", (i, 1000)).await) }
    });
    let results = futures_util::future::join_all(calls).await;
    for (i, r) in results {
        assert_eq!(r.unwrap(), i + 1000);
    }
    assert_eq!(server.sessions().len(), 1, "one connection");
}

#[tokio::test]
async fn dropping_a_call_cancels_it_on_the_server() {
    let pki = Pki::new();
    let keys = Arc::new(ApiKeyStore::in_memory());
    let key = key(&keys, "invoke_functions");
    let server = start(&pki, "s1", keys).await;
    let s = client(&pki, &server, &key).server("s1").unwrap();
    CANCEL_SEEN.store(false, Ordering::SeqCst);
    // The call never finishes by itself; give up on it after 200 ms.
    let r = tokio::time::timeout(Duration::from_millis(200), s.call::<()>("cancellable", ())).await;
    assert!(r.is_err());
    // The Cancel reaches the server, which drops the function's future.
    for _ in 0..100 {
        if CANCEL_SEEN.load(Ordering::SeqCst) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        CANCEL_SEEN.load(Ordering::SeqCst),
        "the function never saw the cancellation"
    );
    assert_eq!(s.call::<i64>("add", (2, 2)).await.unwrap(), 4);
}

#[tokio::test]
async fn a_deadline_gives_timeout() {
    let pki = Pki::new();
    let keys = Arc::new(ApiKeyStore::in_memory());
    let key = key(&keys, "invoke_functions");
    let server = start(&pki, "s1", keys).await;
    let s = client(&pki, &server, &key).server("s1").unwrap();
    let err = s
        .call_with_timeout::<u64>("sleep_ms", (5_000,), Duration::from_millis(150))
        .await
        .unwrap_err();
    assert!(matches!(err, ClientError::Timeout { .. }), "{err:?}");
    // The session is still usable.
    assert_eq!(s.call::<i64>("add", (1, 2)).await.unwrap(), 3);
}

#[tokio::test]
async fn the_servers_request_timeout_answers_timeout() {
    let pki = Pki::new();
    let keys = Arc::new(ApiKeyStore::in_memory());
    let key = key(&keys, "invoke_functions");
    let mut options = netproc_server::ServerOptions::default();
    options.request_controls.request_timeout_ms = 100;
    let server = start_with(&pki, keys, options).await;
    let s = client(&pki, &server, &key).server("s1").unwrap();
    let err = s.call::<u64>("sleep_ms", (5_000,)).await.unwrap_err();
    let ClientError::Timeout { message, .. } = &err else {
        panic!("{err:?}")
    };
    assert!(message.contains("100 ms"), "{message}");
}

#[tokio::test]
async fn values_round_trip_through_a_call() {
    let pki = Pki::new();
    let keys = Arc::new(ApiKeyStore::in_memory());
    let key = key(&keys, "invoke_functions");
    let server = start(&pki, "s1", keys).await;
    let s = client(&pki, &server, &key).server("s1").unwrap();
    let v = Value::Map(
        [
            ("b".to_owned(), Value::Bytes(vec![0, 255].into())),
            (
                "l".to_owned(),
                Value::List(vec![Value::Float(1.5), Value::Null]),
            ),
        ]
        .into(),
    );
    let back: Value = s.call("echo", (v.clone(),)).await.unwrap();
    assert_eq!(back, v);
}

/// Registration mistakes stop `start` with a typed error naming what and
/// which name.
#[tokio::test]
async fn registration_mistakes_are_typed_errors() {
    use netproc_server::{CallContext, CallError, RegistrationProblem, ServerError};
    let pki = Pki::new();
    let keys = || Arc::new(ApiKeyStore::in_memory());
    let cases: Vec<(netproc_server::ServerBuilder, &str, RegistrationProblem)> = vec![
        (
            builder(&pki, "s", keys()).function("2bad", |_: CallContext, (): ()| async move {
                Ok::<_, CallError>(1)
            }),
            "2bad",
            RegistrationProblem::InvalidName,
        ),
        (
            builder(&pki, "s", keys()).function("add", |_: CallContext, (): ()| async move {
                Ok::<_, CallError>(1)
            }),
            "add",
            RegistrationProblem::Duplicate,
        ),
        (
            builder(&pki, "s", keys()).constant("no way", 1),
            "no way",
            RegistrationProblem::InvalidName,
        ),
    ];
    for (b, name, problem) in cases {
        match b.start().await {
            Err(ServerError::Registration {
                name: got,
                problem: p,
                ..
            }) => {
                assert_eq!(got, name);
                assert_eq!(p, problem);
            }
            other => panic!("{name}: {:?}", other.map(|_| ())),
        }
    }
}
