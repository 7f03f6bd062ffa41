//! The client against real servers: typed calls, typed errors, deadlines,
//! fan-out with a server down, reconnection after a flush. Servers and
//! certificates come from the workspace's test kit; everything is on
//! 127.0.0.1 over real TLS.

use std::sync::Arc;
use std::time::Duration;

use netproc_auth::{ApiKey, ApiKeyStore};
use netproc_client::{Client, ClientError};
use netproc_server::{CallContext, CallError, ServerHandle};
use netproc_testkit::{TestPki, key, only};
use netproc_wire::ErrorCode;

async fn server(pki: &TestPki, name: &str) -> (ServerHandle, ApiKey) {
    let keys = Arc::new(ApiKeyStore::in_memory());
    let api_key = key(&keys, "invoke_functions");
    let server = pki
        .server_builder(name, keys)
        .function("add", |_: CallContext, (a, b): (i64, i64)| async move {
            Ok::<_, CallError>(a + b)
        })
        .function("sleep_ms", |_: CallContext, (ms,): (u64,)| async move {
            tokio::time::sleep(Duration::from_millis(ms)).await;
            Ok::<_, CallError>(ms)
        })
        .start()
        .await
        .unwrap();
    (server, api_key)
}

#[tokio::test]
async fn typed_calls_and_typed_errors() {
    let pki = TestPki::new();
    let (srv, api_key) = server(&pki, "s1").await;
    let s1 = only(pki.endpoint(&pki.client, srv.local_addr(), &api_key));

    assert_eq!(s1.call::<i64>("add", (2, 3)).await.unwrap(), 5);
    let e = s1.call::<i64>("nope", ()).await.unwrap_err();
    assert_eq!(e.code(), ErrorCode::FunctionNotFound, "{e}");
    // The result does not have the asked-for type: a local, typed error.
    let e = s1.call::<String>("add", (2, 3)).await.unwrap_err();
    assert!(matches!(e, ClientError::InvalidResponse { .. }), "{e:?}");
}

#[tokio::test]
async fn a_call_past_its_deadline_ends_with_timeout_and_the_connection_lives_on() {
    let pki = TestPki::new();
    let (srv, api_key) = server(&pki, "s1").await;
    let s1 = only(pki.endpoint(&pki.client, srv.local_addr(), &api_key));

    let e = s1
        .call_with_timeout::<u64>("sleep_ms", (5_000,), Duration::from_millis(50))
        .await
        .unwrap_err();
    assert_eq!(e.code(), ErrorCode::Timeout, "{e}");
    assert_eq!(s1.call::<i64>("add", (1, 1)).await.unwrap(), 2);
}

#[tokio::test]
async fn all_servers_reports_each_server_and_a_down_one_as_unavailable() {
    let pki = TestPki::new();
    let (a, key_a) = server(&pki, "a").await;
    let (b, key_b) = server(&pki, "b").await;
    // A port nobody listens on: bind, note it, close.
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let client = Client::builder()
        .server("a", pki.endpoint(&pki.client, a.local_addr(), &key_a))
        .server("b", pki.endpoint(&pki.client, b.local_addr(), &key_b))
        .server("down", pki.endpoint(&pki.client, dead, &key_a))
        .build()
        .unwrap();

    let out = client.all_servers().call::<i64>("add", (20, 22)).await;
    assert_eq!(out.len(), 3);
    assert_eq!(*out["a"].as_ref().unwrap(), 42);
    assert_eq!(*out["b"].as_ref().unwrap(), 42);
    let e = out["down"].as_ref().unwrap_err();
    assert_eq!(e.code(), ErrorCode::Unavailable, "{e}");
}

#[tokio::test]
async fn a_flushed_server_is_reconnected_on_the_next_call() {
    let pki = TestPki::new();
    let (srv, api_key) = server(&pki, "s1").await;
    let client = Client::builder()
        .server("s1", pki.endpoint(&pki.client, srv.local_addr(), &api_key))
        .build()
        .unwrap();
    let s1 = client.server("s1").unwrap();
    let (first, _) = s1.session().await.unwrap();
    client.flush_server("s1").unwrap();
    let (second, _) = s1.session().await.unwrap();
    assert_ne!(first, second, "a new session after the flush");
    assert_eq!(s1.call::<i64>("add", (1, 2)).await.unwrap(), 3);
}

#[tokio::test]
async fn an_unknown_server_name_is_a_typed_error() {
    let pki = TestPki::new();
    let (srv, api_key) = server(&pki, "s1").await;
    let client = Client::builder()
        .server("s1", pki.endpoint(&pki.client, srv.local_addr(), &api_key))
        .build()
        .unwrap();
    assert!(client.server("s2").is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_all_moves_to_the_new_identity_without_failing_a_call() {
    let pki = TestPki::new();
    let (srv, api_key) = server(&pki, "s1").await;
    let client = Client::builder()
        .server("s1", pki.endpoint(&pki.client, srv.local_addr(), &api_key))
        .build()
        .unwrap();
    let s1 = client.server("s1").unwrap();
    let before = s1.who_am_i().await.unwrap();
    // A steady stream of calls, each in flight for a while.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut workers = Vec::new();
    for _ in 0..8 {
        let (s1, stop) = (s1.clone(), Arc::clone(&stop));
        workers.push(tokio::spawn(async move {
            let (mut ok, mut failed) = (0u32, Vec::new());
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                match s1.call::<u64>("sleep_ms", (50u64,)).await {
                    Ok(_) => ok += 1,
                    Err(e) => failed.push(e.to_string()),
                }
            }
            (ok, failed)
        }));
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    // A renewed certificate (same name, new key) replaces the old one.
    let renewed = pki
        .ca
        .issue(&netproc_pki::LeafParams::client("client"))
        .unwrap();
    client
        .set_identity(&renewed.identity().unwrap(), &pki.ca.trust_anchors())
        .unwrap();
    client.migrate_all();
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut total = 0;
    for w in workers {
        let (ok, failed) = w.await.unwrap();
        assert!(
            failed.is_empty(),
            "calls failed during the migration: {failed:?}"
        );
        total += ok;
    }
    assert!(total > 16, "{total}");
    let after = s1.who_am_i().await.unwrap();
    assert_ne!(after.session_id, before.session_id);
    assert_eq!(
        after.cert_fingerprint,
        renewed.cert_identity().fingerprint.to_string()
    );
}

#[test]
fn migrate_all_may_be_asked_from_outside_the_runtime() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let pki = TestPki::new();
    let (srv, api_key) = rt.block_on(server(&pki, "s1"));
    let client = Client::builder()
        .server("s1", pki.endpoint(&pki.client, srv.local_addr(), &api_key))
        .build()
        .unwrap();
    let s1 = client.server("s1").unwrap();
    let (first, _) = rt.block_on(s1.session()).unwrap();
    // A plain thread, no runtime: the drain runs on the connection's own.
    std::thread::spawn({
        let client = client.clone();
        move || client.migrate_all()
    })
    .join()
    .unwrap();
    let (second, _) = rt.block_on(s1.session()).unwrap();
    assert_ne!(first, second);
    assert_eq!(rt.block_on(s1.call::<i64>("add", (1, 2))).unwrap(), 3);
}
