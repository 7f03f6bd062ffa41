//! `all_servers` and the client's connection management.

use std::sync::Arc;
use std::time::Duration;

use netproc_auth::ApiKeyStore;
use netproc_client::{ALL_SERVERS, Client, ClientError, ServerOutcome};

use crate::support::*;

#[tokio::test]
async fn define_a_constant_on_all_servers_then_read_it_everywhere() {
    let pki = Pki::new();
    let keys = Arc::new(ApiKeyStore::in_memory());
    let key = key(&keys, "invoke_functions,define_constants");
    let s1 = start(&pki, "server_1", Arc::clone(&keys)).await;
    let s2 = start(&pki, "server_2", Arc::clone(&keys)).await;
    let client = Client::builder()
        .server("server_1", endpoint(&pki, &s1, &key))
        .server("server_2", endpoint(&pki, &s2, &key))
        .build()
        .unwrap();
    let all = client.all_servers();
    let defined = all.define_constant("greeting", "hello").await;
    assert_eq!(defined.len(), 2);
    assert!(defined.values().all(Result::is_ok), "{defined:?}");
    for name in ["server_1", "server_2"] {
        let constants = client.server(name).unwrap().list_constants().await.unwrap();
        assert_eq!(constants["greeting"], netproc_wire::Value::from("hello"));
    }
    let sums = all.call::<i64>("add", (20, 22)).await;
    assert_eq!(sums.len(), 2);
    assert!(
        sums.values().all(|r| r.as_ref().ok() == Some(&42)),
        "{sums:?}"
    );
}

#[tokio::test]
async fn one_server_down_gives_one_ok_and_one_unavailable_without_failing_fast() {
    let pki = Pki::new();
    let keys = Arc::new(ApiKeyStore::in_memory());
    let key = key(&keys, "invoke_functions");
    let up = start(&pki, "up", Arc::clone(&keys)).await;
    let down = start(&pki, "down", Arc::clone(&keys)).await;
    let down_endpoint = endpoint(&pki, &down, &key);
    down.shutdown(Duration::from_millis(100)).await;
    drop(down);
    let client = Client::builder()
        .server("up", endpoint(&pki, &up, &key))
        .server("down", down_endpoint)
        .build()
        .unwrap();
    let results = client.all_servers().call::<String>("ping_fn", ()).await;
    assert_eq!(results["up"].as_ref().unwrap(), "ok");
    let err = results["down"].as_ref().unwrap_err();
    assert_eq!(err.code().as_str(), "unavailable", "{err:?}");

    let json: serde_json::Value = serde_json::to_value(
        results
            .into_iter()
            .map(|(k, v)| (k, ServerOutcome::from(v)))
            .collect::<std::collections::BTreeMap<_, _>>(),
    )
    .unwrap();
    assert_eq!(
        json["up"],
        serde_json::json!({"state": "ok", "result": "ok"})
    );
    assert_eq!(json["down"]["state"], "error");
    assert_eq!(json["down"]["error"]["code"], "unavailable");
}

#[tokio::test]
async fn the_reserved_name_and_duplicates_are_refused_at_build() {
    let pki = Pki::new();
    let keys = Arc::new(ApiKeyStore::in_memory());
    let key = key(&keys, "invoke_functions");
    let s = start(&pki, "s1", keys).await;
    let err = Client::builder()
        .server(ALL_SERVERS, endpoint(&pki, &s, &key))
        .build()
        .unwrap_err();
    assert!(
        matches!(&err, ClientError::Config { message } if message.contains("reserved")),
        "{err:?}"
    );
    let err = Client::builder()
        .server("a", endpoint(&pki, &s, &key))
        .server("a", endpoint(&pki, &s, &key))
        .build()
        .unwrap_err();
    assert!(matches!(err, ClientError::Config { .. }));
    let client = Client::builder()
        .server("a", endpoint(&pki, &s, &key))
        .build()
        .unwrap();
    assert!(matches!(
        client.server("b"),
        Err(ClientError::UnknownServer { .. })
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_first_calls_share_one_connection() {
    let pki = Pki::new();
    let keys = Arc::new(ApiKeyStore::in_memory());
    let key = key(&keys, "invoke_functions");
    let server = start(&pki, "s1", keys).await;
    let client = client(&pki, &server, &key);
    let calls = (0..32).map(|i| {
        let c = client.clone();
        async move { c.server("s1").unwrap().call::<i64>("add", (i, 0)).await }
    });
    for r in futures_util::future::join_all(calls).await {
        r.unwrap();
    }
    assert_eq!(
        server.sessions().len(),
        1,
        "exactly one connection was made"
    );
}

#[tokio::test]
async fn flush_server_makes_the_next_call_dial_afresh() {
    let pki = Pki::new();
    let keys = Arc::new(ApiKeyStore::in_memory());
    let key = key(&keys, "invoke_functions");
    let server = start(&pki, "s1", keys).await;
    let client = client(&pki, &server, &key);
    let s = client.server("s1").unwrap();
    let (first, privileges) = s.session().await.unwrap();
    assert_eq!(privileges, ["invoke_functions"]);
    client.flush_server("s1").unwrap();
    let (second, _) = s.session().await.unwrap();
    assert_ne!(first, second);
    assert_eq!(s.call::<i64>("add", (1, 1)).await.unwrap(), 2);
}

#[tokio::test]
async fn a_dropped_connection_reconnects_on_next_use() {
    let pki = Pki::new();
    let keys = Arc::new(ApiKeyStore::in_memory());
    let key = key(&keys, "invoke_functions,admin_privileges");
    let server = start(&pki, "s1", keys).await;
    let s = client(&pki, &server, &key).server("s1").unwrap();
    let (first, _) = s.session().await.unwrap();
    // The server ends the session from its side.
    assert_eq!(
        server.close_sessions(
            &netproc_server::SessionSelector::Session(first),
            netproc_wire::ErrorCode::DisconnectedByAdmin
        ),
        1
    );
    // The next calls reconnect (the first may still see the close).
    let mut ok = false;
    for _ in 0..20 {
        if s.call::<i64>("add", (1, 1)).await.is_ok() {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(ok);
    assert_ne!(s.session().await.unwrap().0, first);
}
