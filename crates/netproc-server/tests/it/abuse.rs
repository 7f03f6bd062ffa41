//! Abuse controls at admission and per request (authentication is in
//! `abuse_auth`, function and run-time limits and the flood in
//! `abuse_live`): one test per knob proving it bites with the right code,
//! and the key property — a legitimate client keeps being served during a
//! flood. Refusals before TLS are invisible to the peer, so those tests
//! await the metrics counters. Attackers and the legitimate client use
//! different loopback source addresses.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use netproc_auth::{ApiKeyStore, KeySpec, PrivilegeSet};
use netproc_client::{Client, ClientError};
use netproc_limits::ManualClock;
use netproc_server::{AbuseMetrics, BucketControls, ServerHandle, ServerOptions};
use netproc_wire::{ErrorCode, ServerMessage};
use tokio::net::{TcpSocket, TcpStream};

use crate::support::*;

pub(crate) fn ip(last: u8) -> IpAddr {
    IpAddr::from([127, 0, 0, last])
}

/// Polls the metrics until `f` holds (refusals before TLS have no other
/// observable effect); fails after 5 s.
pub(crate) async fn until(
    server: &ServerHandle,
    f: impl Fn(&AbuseMetrics) -> bool,
) -> AbuseMetrics {
    for _ in 0..500 {
        let m = server.abuse_metrics();
        if f(&m) {
            return m;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("condition not reached: {:?}", server.abuse_metrics());
}

pub(crate) async fn tcp_from(from: IpAddr, to: SocketAddr) -> TcpStream {
    let s = TcpSocket::new_v4().unwrap();
    s.bind(SocketAddr::new(from, 0)).unwrap();
    s.connect(to).await.unwrap()
}

pub(crate) fn client_from(
    pki: &Pki,
    server: &ServerHandle,
    key: &netproc_auth::ApiKey,
    from: u8,
) -> Client {
    Client::builder()
        .server("s1", endpoint(pki, server, key).bind(ip(from)))
        .build()
        .unwrap()
}

pub(crate) struct Setup {
    pub(crate) pki: Pki,
    pub(crate) keys: Arc<ApiKeyStore>,
    pub(crate) clock: Arc<ManualClock>,
    pub(crate) server: ServerHandle,
}

pub(crate) async fn setup(options: ServerOptions) -> Setup {
    let pki = Pki::new();
    let keys = Arc::new(ApiKeyStore::in_memory());
    let clock = Arc::new(ManualClock::new());
    let server = builder(&pki, "s1", Arc::clone(&keys))
        .options(options)
        .clock(clock.clone())
        .start()
        .await
        .unwrap();
    Setup {
        pki,
        keys,
        clock,
        server,
    }
}

pub(crate) fn bad_key() -> netproc_auth::ApiKey {
    ApiKeyStore::in_memory()
        .create(KeySpec::new(PrivilegeSet::empty()))
        .unwrap()
        .1
}

pub(crate) fn retry_after_ms(err: &ClientError) -> u64 {
    match err {
        ClientError::RateLimited {
            retry_after: Some(d),
            ..
        }
        | ClientError::AuthThrottled {
            retry_after: Some(d),
            ..
        } => d.as_millis() as u64,
        other => panic!("no retry_after in {other:?}"),
    }
}

#[tokio::test]
async fn the_per_ip_connection_window_refuses_with_connection_limited() {
    let mut o = unlimited();
    o.connection_controls.per_ip_max_new_connections_per_window = 3;
    let t = setup(o).await;
    let mut held = Vec::new();
    for _ in 0..4 {
        held.push(tcp_from(ip(2), t.server.local_addr()).await);
    }
    let m = until(&t.server, |m| m.connection_rejected_count == 1).await;
    assert_eq!(m.connection_accepted_count, 3);
    assert_eq!(m.connection_limited_count, 1);
    assert_eq!(m.refused_by_code["connection_limited"], 1);
    // Another address is not affected.
    let key = key(&t.keys, "invoke_functions");
    assert_eq!(
        client_from(&t.pki, &t.server, &key, 3)
            .server("s1")
            .unwrap()
            .call::<i64>("add", (1, 1))
            .await
            .unwrap(),
        2
    );
    // The window slides: later, the first address may connect again.
    t.clock.advance(Duration::from_millis(1000));
    assert!(
        client_from(&t.pki, &t.server, &key, 2)
            .server("s1")
            .unwrap()
            .call::<i64>("add", (1, 1))
            .await
            .is_ok()
    );
}

#[tokio::test]
async fn the_global_connection_window_refuses_every_address() {
    let mut o = unlimited();
    o.connection_controls.global_max_new_connections_per_window = 3;
    let t = setup(o).await;
    let mut held = Vec::new();
    for i in 0..4 {
        held.push(tcp_from(ip(10 + i), t.server.local_addr()).await);
    }
    let m = until(&t.server, |m| m.connection_rejected_count == 1).await;
    assert_eq!(
        (m.connection_accepted_count, m.connection_limited_count),
        (3, 1)
    );
}

#[tokio::test]
async fn the_socket_cap_refuses_with_connection_limited() {
    let mut o = unlimited();
    o.connection_controls.max_concurrent_sockets = 2;
    let t = setup(o).await;
    let _a = tcp_from(ip(2), t.server.local_addr()).await;
    let _b = tcp_from(ip(2), t.server.local_addr()).await;
    let _c = tcp_from(ip(2), t.server.local_addr()).await;
    let m = until(&t.server, |m| m.connection_rejected_count == 1).await;
    assert_eq!(m.connection_limited_count, 1);
    assert_eq!(m.active_socket_count, 2);
}

#[tokio::test]
async fn the_handshake_cap_bites_and_frees_when_the_silent_ones_time_out() {
    let mut o = unlimited();
    o.connection_controls.max_concurrent_handshakes = 2;
    o.connection_controls.tls_handshake_timeout_ms = 300;
    let t = setup(o).await;
    // Two peers connect and never start TLS.
    let _a = tcp_from(ip(2), t.server.local_addr()).await;
    let _b = tcp_from(ip(2), t.server.local_addr()).await;
    until(&t.server, |m| m.active_handshake_count == 2).await;
    let _c = tcp_from(ip(2), t.server.local_addr()).await;
    let m = until(&t.server, |m| m.handshake_limited_count == 1).await;
    assert_eq!(m.refused_by_code["handshake_limited"], 1);
    // The silent ones time out (real time: the handshake timeout is a socket timer).
    let m = until(&t.server, |m| m.handshake_timeout_count == 2).await;
    assert_eq!(m.active_handshake_count, 0);
    let key = key(&t.keys, "invoke_functions");
    assert!(
        client_from(&t.pki, &t.server, &key, 3)
            .server("s1")
            .unwrap()
            .call::<i64>("add", (1, 1))
            .await
            .is_ok()
    );
}

#[tokio::test]
async fn the_unauthenticated_session_cap_answers_handshake_limited() {
    let mut o = unlimited();
    o.connection_controls.max_unauthenticated_sessions = 1;
    let t = setup(o).await;
    let _idle = Raw::connect(&t.pki, &t.server).await; // TLS done, no Auth
    until(&t.server, |m| m.active_unauthenticated_session_count == 1).await;
    let mut second = Raw::connect(&t.pki, &t.server).await;
    match second.recv().await {
        Some(ServerMessage::Error(e)) => assert_eq!(e.code, ErrorCode::HandshakeLimited),
        other => panic!("{other:?}"),
    }
    assert_eq!(t.server.abuse_metrics().handshake_limited_count, 1);
}

#[tokio::test]
async fn a_slowloris_pre_auth_frame_is_dropped_at_the_auth_timeout() {
    let mut o = unlimited();
    o.connection_controls.auth_message_timeout_ms = 300;
    let t = setup(o).await;
    let mut raw = Raw::connect(&t.pki, &t.server).await;
    let started = Instant::now();
    // A header declaring 1000 bytes, then a trickle.
    raw.send_bytes(&1000u32.to_be_bytes()).await;
    for _ in 0..3 {
        raw.send_bytes(&[0]).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    match raw.recv().await {
        Some(ServerMessage::Error(e)) => assert_eq!(e.code, ErrorCode::Timeout),
        other => panic!("{other:?}"),
    }
    assert!(started.elapsed() < Duration::from_secs(2));
    assert_eq!(t.server.abuse_metrics().auth_timeout_count, 1);
}

#[tokio::test]
async fn each_request_bucket_refuses_with_its_scope_and_recovers() {
    for scope in ["per_connection", "per_api_key", "per_ip"] {
        let mut o = unlimited();
        let mut bucket = BucketControls::per_ip_default();
        bucket.tokens_per_interval = 1;
        bucket.interval_ms = 1000;
        bucket.burst_tokens = 2;
        match scope {
            "per_connection" => o.request_controls.per_connection = bucket,
            "per_api_key" => o.request_controls.per_api_key = bucket,
            _ => o.request_controls.per_ip = bucket,
        }
        let t = setup(o).await;
        let key = key(&t.keys, "invoke_functions");
        let s = client_from(&t.pki, &t.server, &key, 2)
            .server("s1")
            .unwrap();
        s.call::<i64>("add", (1, 1)).await.unwrap();
        s.call::<i64>("add", (1, 1)).await.unwrap();
        let err = s.call::<i64>("add", (1, 1)).await.unwrap_err();
        let ClientError::RateLimited {
            scope: Some(got), ..
        } = &err
        else {
            panic!("{scope}: {err:?}")
        };
        assert_eq!(got, scope);
        let wait = retry_after_ms(&err);
        assert!((1..=1000).contains(&wait), "{scope}: retry_after_ms {wait}");
        // The connection stays open, and tokens refill.
        t.clock.advance(Duration::from_millis(wait));
        s.call::<i64>("add", (1, 1)).await.unwrap();
        let m = t.server.abuse_metrics();
        let counted = match scope {
            "per_connection" => m.rate_limited_per_connection_count,
            "per_api_key" => m.rate_limited_per_api_key_count,
            _ => m.rate_limited_per_ip_count,
        };
        assert_eq!(counted, 1, "{scope}");
    }
}

#[tokio::test]
async fn the_per_key_and_per_ip_buckets_are_shared_across_connections() {
    let mut o = unlimited();
    let mut small = BucketControls::per_api_key_default();
    small.tokens_per_interval = 1;
    small.burst_tokens = 2;
    o.request_controls.per_api_key = small;
    let t = setup(o).await;
    let shared_key = key(&t.keys, "invoke_functions");
    let a = client_from(&t.pki, &t.server, &shared_key, 2)
        .server("s1")
        .unwrap();
    let b = client_from(&t.pki, &t.server, &shared_key, 3)
        .server("s1")
        .unwrap();
    a.call::<i64>("add", (1, 1)).await.unwrap();
    a.call::<i64>("add", (1, 1)).await.unwrap();
    // Another connection, another address, same key: the same bucket.
    let err = b.call::<i64>("add", (1, 1)).await.unwrap_err();
    assert!(
        matches!(&err, ClientError::RateLimited { scope: Some(s), .. } if s == "per_api_key"),
        "{err:?}"
    );
    // A different key is not affected.
    let other = key(&t.keys, "invoke_functions");
    client_from(&t.pki, &t.server, &other, 3)
        .server("s1")
        .unwrap()
        .call::<i64>("add", (1, 1))
        .await
        .unwrap();
}

#[tokio::test]
async fn disconnect_on_limit_closes_the_connection_after_answering() {
    let mut o = unlimited();
    let mut b = BucketControls::per_connection_default();
    b.tokens_per_interval = 1;
    b.burst_tokens = 1;
    b.disconnect_on_limit = true;
    o.request_controls.per_connection = b;
    let t = setup(o).await;
    let key = key(&t.keys, "invoke_functions");
    let mut raw = Raw::connect(&t.pki, &t.server).await;
    raw.auth(&key).await;
    for id in 1..=2 {
        raw.send(&netproc_wire::ClientMessage::Request(
            netproc_wire::Request {
                id,
                op: netproc_wire::Operation::Invoke {
                    function: "add".into(),
                    args: vec![1.into(), 1.into()],
                },
                deadline_ms: None,
            },
        ))
        .await;
    }
    assert!(matches!(raw.recv().await, Some(ServerMessage::Response(r)) if r.id == 1));
    match raw.recv().await {
        Some(ServerMessage::Response(r)) => {
            let netproc_wire::Outcome::Err(e) = r.outcome else {
                panic!()
            };
            assert_eq!(e.code, ErrorCode::RateLimited);
        }
        other => panic!("{other:?}"),
    }
    match raw.recv().await {
        Some(ServerMessage::GoAway(g)) => assert_eq!(g.reason, ErrorCode::RateLimited),
        other => panic!("{other:?}"),
    }
    assert!(raw.recv().await.is_none());
}
