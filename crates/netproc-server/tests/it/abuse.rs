//! Abuse controls: one test per knob proving it bites with the right code,
//! and the key property — a legitimate client keeps being served during a
//! flood. Refusals before TLS are invisible to the peer, so those tests
//! await the metrics counters. Attackers and the legitimate client use
//! different loopback source addresses.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use netproc_auth::{ApiKeyStore, CertBinding, KeySpec, PrivilegeSet};
use netproc_client::{Client, ClientError};
use netproc_limits::ManualClock;
use netproc_server::{AbuseMetrics, BucketControls, ServerHandle, ServerOptions};
use netproc_wire::{ErrorCode, Privilege, ServerMessage, Value};
use tokio::net::{TcpSocket, TcpStream};

use crate::support::*;

fn ip(last: u8) -> IpAddr {
    IpAddr::from([127, 0, 0, last])
}

/// Polls the metrics until `f` holds (refusals before TLS have no other
/// observable effect); fails after 5 s.
async fn until(server: &ServerHandle, f: impl Fn(&AbuseMetrics) -> bool) -> AbuseMetrics {
    for _ in 0..500 {
        let m = server.abuse_metrics();
        if f(&m) {
            return m;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("condition not reached: {:?}", server.abuse_metrics());
}

async fn tcp_from(from: IpAddr, to: SocketAddr) -> TcpStream {
    let s = TcpSocket::new_v4().unwrap();
    s.bind(SocketAddr::new(from, 0)).unwrap();
    s.connect(to).await.unwrap()
}

fn client_from(pki: &Pki, server: &ServerHandle, key: &netproc_auth::ApiKey, from: u8) -> Client {
    Client::builder()
        .server("s1", endpoint(pki, server, key).bind(ip(from)))
        .build()
        .unwrap()
}

struct Setup {
    pki: Pki,
    keys: Arc<ApiKeyStore>,
    clock: Arc<ManualClock>,
    server: ServerHandle,
}

async fn setup(options: ServerOptions) -> Setup {
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

fn bad_key() -> netproc_auth::ApiKey {
    ApiKeyStore::in_memory()
        .create(KeySpec::new(PrivilegeSet::empty()))
        .unwrap()
        .1
}

fn retry_after_ms(err: &ClientError) -> u64 {
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

#[tokio::test]
async fn failed_auths_from_an_ip_block_it_at_admission_until_the_block_expires() {
    let mut o = unlimited();
    o.auth_controls.max_failed_auth_per_ip_per_window = 2;
    o.auth_controls.block_duration_ms = 10_000;
    let t = setup(o).await;
    let good = key(&t.keys, "invoke_functions");
    let legit = client_from(&t.pki, &t.server, &good, 3)
        .server("s1")
        .unwrap();
    legit.session().await.unwrap();
    let bad = bad_key();
    for _ in 0..2 {
        let err = client_from(&t.pki, &t.server, &bad, 2)
            .server("s1")
            .unwrap()
            .call::<i64>("add", (1, 1))
            .await
            .unwrap_err();
        assert!(
            matches!(err, ClientError::AuthenticationFailed { .. }),
            "{err:?}"
        );
    }
    let m = t.server.abuse_metrics();
    assert_eq!((m.auth_failure_count, m.blocked_ip_count), (2, 1));
    // Now even a good key from that address is refused before TLS.
    let err = client_from(&t.pki, &t.server, &good, 2)
        .server("s1")
        .unwrap()
        .call::<i64>("add", (1, 1))
        .await
        .unwrap_err();
    assert!(
        matches!(err, ClientError::Connect { .. } | ClientError::Tls { .. }),
        "{err:?}"
    );
    let m = until(&t.server, |m| m.connection_rejected_count == 1).await;
    assert_eq!(m.auth_throttled_count, 1);
    // The legitimate client, elsewhere, is unaffected.
    assert_eq!(legit.call::<i64>("add", (2, 2)).await.unwrap(), 4);
    // The block expires on its own.
    t.clock.advance(Duration::from_millis(10_000));
    assert!(
        client_from(&t.pki, &t.server, &good, 2)
            .server("s1")
            .unwrap()
            .call::<i64>("add", (1, 1))
            .await
            .is_ok()
    );
}

#[tokio::test]
async fn an_ip_blocked_while_its_connection_was_open_gets_auth_throttled() {
    let mut o = unlimited();
    o.auth_controls.max_failed_auth_per_ip_per_window = 2;
    let t = setup(o).await;
    let good = key(&t.keys, "invoke_functions");
    let mut open = Raw::connect(&t.pki, &t.server).await; // from 127.0.0.1, TLS done
    for _ in 0..2 {
        let _ = client(&t.pki, &t.server, &bad_key())
            .server("s1")
            .unwrap()
            .call::<i64>("add", (1, 1))
            .await;
    }
    open.send(&netproc_wire::ClientMessage::Auth(netproc_wire::Auth {
        version: netproc_wire::PROTOCOL_VERSION,
        method: netproc_wire::AuthMethod::ApiKey(good.to_secret()),
        client_name: None,
    }))
    .await;
    match open.recv().await {
        Some(ServerMessage::Error(e)) => {
            assert_eq!(e.code, ErrorCode::AuthThrottled);
            let Value::Map(d) = e.details else { panic!() };
            assert!(matches!(d["retry_after_ms"], Value::Int(ms) if ms > 0));
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn a_key_brute_forced_from_many_ips_is_throttled_but_a_bound_key_cannot_be_locked_out() {
    let mut o = unlimited();
    o.auth_controls.max_failed_auth_per_api_key_per_window = 2;
    let t = setup(o).await;
    let (info, good) = t
        .keys
        .create(KeySpec::new(PrivilegeSet::from([
            Privilege::InvokeFunctions,
        ])))
        .unwrap();
    let wrong = |k: &str| {
        let secret = format!("npk_{}_{}", k, "Z".repeat(32));
        netproc_wire::SecretString::new(secret)
    };
    for from in [2, 3] {
        let ep = endpoint(&t.pki, &t.server, &good).bind(ip(from));
        let mut ep = ep;
        ep = netproc_client::ServerEndpoint::new(
            ep.addr,
            "localhost",
            t.pki.client.identity().unwrap(),
            t.pki.ca.trust_anchors(),
            wrong(&info.id),
        )
        .bind(ip(from));
        let c = Client::builder().server("s1", ep).build().unwrap();
        let err = c
            .server("s1")
            .unwrap()
            .call::<i64>("add", (1, 1))
            .await
            .unwrap_err();
        assert!(
            matches!(err, ClientError::AuthenticationFailed { .. }),
            "{err:?}"
        );
    }
    assert_eq!(t.server.abuse_metrics().blocked_api_key_count, 1);
    // The right secret, from a third address, is throttled: the key is blocked.
    let err = client_from(&t.pki, &t.server, &good, 4)
        .server("s1")
        .unwrap()
        .call::<i64>("add", (1, 1))
        .await
        .unwrap_err();
    assert!(matches!(err, ClientError::AuthThrottled { .. }), "{err:?}");
    assert!(retry_after_ms(&err) > 0);

    // A key bound to the client certificate: failures over another
    // certificate do not count against it.
    let other_cert = t
        .pki
        .ca
        .issue(&netproc_pki::LeafParams::client("mallory"))
        .unwrap();
    let (bound_info, bound) = t
        .keys
        .create(
            KeySpec::new(PrivilegeSet::from([Privilege::InvokeFunctions])).binding(
                CertBinding::Fingerprint(t.pki.client.cert_identity().fingerprint),
            ),
        )
        .unwrap();
    for from in [5, 6, 7] {
        let ep = netproc_client::ServerEndpoint::new(
            t.server.local_addr(),
            "localhost",
            other_cert.identity().unwrap(),
            t.pki.ca.trust_anchors(),
            wrong(&bound_info.id),
        )
        .bind(ip(from));
        let _ = Client::builder()
            .server("s1", ep)
            .build()
            .unwrap()
            .server("s1")
            .unwrap()
            .call::<i64>("add", (1, 1))
            .await;
    }
    let ok = client_from(&t.pki, &t.server, &bound, 8)
        .server("s1")
        .unwrap()
        .call::<i64>("add", (1, 1))
        .await;
    assert_eq!(
        ok.unwrap(),
        2,
        "the bound key was locked out by failures over another certificate"
    );
}

#[tokio::test]
async fn with_the_blocklist_disabled_failures_are_counted_but_never_block() {
    let mut o = unlimited();
    o.auth_controls.max_failed_auth_per_ip_per_window = 1;
    o.auth_controls.enable_blocklist = false;
    let t = setup(o).await;
    for _ in 0..3 {
        let _ = client_from(&t.pki, &t.server, &bad_key(), 2)
            .server("s1")
            .unwrap()
            .call::<i64>("add", (1, 1))
            .await;
    }
    let m = t.server.abuse_metrics();
    assert_eq!(
        (
            m.auth_failure_count,
            m.blocked_ip_count,
            m.auth_throttled_count
        ),
        (3, 0, 0)
    );
    let good = key(&t.keys, "invoke_functions");
    assert!(
        client_from(&t.pki, &t.server, &good, 2)
            .server("s1")
            .unwrap()
            .call::<i64>("add", (1, 1))
            .await
            .is_ok()
    );
}

#[tokio::test]
async fn pending_auth_attempts_per_ip_are_throttled_with_their_scope() {
    let mut o = unlimited();
    o.auth_controls.max_pending_auth_attempts_per_ip_per_window = 2;
    let t = setup(o).await;
    let good = key(&t.keys, "invoke_functions");
    for _ in 0..2 {
        let c = client_from(&t.pki, &t.server, &good, 2);
        c.server("s1").unwrap().session().await.unwrap();
    }
    let err = client_from(&t.pki, &t.server, &good, 2)
        .server("s1")
        .unwrap()
        .session()
        .await
        .unwrap_err();
    assert!(matches!(err, ClientError::AuthThrottled { .. }), "{err:?}");
    let json = serde_json::to_value(&err).unwrap();
    assert_eq!(
        json["details"]["retry_after_ms"].as_u64().map(|v| v > 0),
        Some(true),
        "{json}"
    );
    assert_eq!(t.server.abuse_metrics().auth_throttled_count, 1);
    // The window passes.
    t.clock.advance(Duration::from_millis(10_000));
    client_from(&t.pki, &t.server, &good, 2)
        .server("s1")
        .unwrap()
        .session()
        .await
        .unwrap();
}

#[tokio::test]
async fn function_limits_bite_per_function() {
    let pki = Pki::new();
    let keys = Arc::new(ApiKeyStore::in_memory());
    let key = key(&keys, "invoke_functions");
    let clock = Arc::new(ManualClock::new());
    let server = builder(&pki, "s1", keys)
        .options(unlimited())
        .clock(clock.clone())
        .function_limits(
            "add",
            netproc_wire::FunctionLimits {
                rate: Some(netproc_wire::RateLimit {
                    tokens_per_interval: 1,
                    interval_ms: 1000,
                    burst_tokens: 1,
                }),
                max_concurrency: None,
            },
        )
        .function_limits(
            "sleep_ms",
            netproc_wire::FunctionLimits {
                rate: None,
                max_concurrency: Some(1),
            },
        )
        .start()
        .await
        .unwrap();
    let s = client(&pki, &server, &key).server("s1").unwrap();
    s.call::<i64>("add", (1, 1)).await.unwrap();
    let err = s.call::<i64>("add", (1, 1)).await.unwrap_err();
    assert!(
        matches!(&err, ClientError::RateLimited { scope: Some(sc), .. } if sc == "per_function"),
        "{err:?}"
    );
    // Other functions are unaffected.
    assert_eq!(s.call::<String>("ping_fn", ()).await.unwrap(), "ok");
    // Concurrency: one sleep at a time.
    let first = {
        let s = s.clone();
        tokio::spawn(async move { s.call::<u64>("sleep_ms", (300,)).await })
    };
    until(&server, |m| m.in_flight_request_count == 1).await;
    let err = s.call::<u64>("sleep_ms", (1,)).await.unwrap_err();
    assert!(
        matches!(&err, ClientError::RateLimited { scope: Some(sc), .. } if sc == "function_concurrency"),
        "{err:?}"
    );
    first.await.unwrap().unwrap();
    assert_eq!(server.abuse_metrics().rate_limited_per_function_count, 2);
}

#[tokio::test]
async fn limits_change_at_run_time_and_blocks_can_be_listed_and_lifted() {
    let mut o = unlimited();
    o.auth_controls.max_failed_auth_per_ip_per_window = 1;
    let t = setup(o).await;
    let admin_key = key(&t.keys, "admin_privileges");
    let admin = client_from(&t.pki, &t.server, &admin_key, 3)
        .server("s1")
        .unwrap();

    // GetLimits has the reference's shape; SetLimits takes it back.
    let Value::Map(mut limits) = admin
        .execute(netproc_wire::Operation::GetLimits)
        .await
        .unwrap()
    else {
        panic!()
    };
    assert!(limits.contains_key("connection_controls") && limits.contains_key("auth_controls"));
    let Value::Map(mut rc) = limits["request_controls"].clone() else {
        panic!()
    };
    let Value::Map(mut pc) = rc["per_connection"].clone() else {
        panic!()
    };
    pc.insert("enabled".into(), Value::Bool(true));
    pc.insert("burst_tokens".into(), Value::Int(1));
    pc.insert("tokens_per_interval".into(), Value::Int(1));
    rc.insert("per_connection".into(), Value::Map(pc));
    limits.insert("request_controls".into(), Value::Map(rc));
    admin
        .execute(netproc_wire::Operation::SetLimits {
            limits: Value::Map(limits.clone()),
        })
        .await
        .unwrap();
    assert_eq!(
        t.server
            .options()
            .request_controls
            .per_connection
            .burst_tokens,
        1
    );
    // It applies to a live connection at once: a burst of one.
    admin.call::<i64>("add", (1, 1)).await.unwrap();
    let err = admin.call::<i64>("add", (1, 1)).await.unwrap_err();
    assert!(
        matches!(&err, ClientError::RateLimited { scope: Some(s), .. } if s == "per_connection"),
        "{err:?}"
    );

    // An impossible setting is refused, naming the field.
    let Value::Map(mut cc) = limits["connection_controls"].clone() else {
        panic!()
    };
    cc.insert("max_pre_auth_frame_bytes".into(), Value::Int(10_000_000));
    limits.insert("connection_controls".into(), Value::Map(cc));
    t.clock.advance(Duration::from_secs(5));
    let err = admin
        .execute(netproc_wire::Operation::SetLimits {
            limits: Value::Map(limits),
        })
        .await
        .unwrap_err();
    assert!(
        matches!(&err, ClientError::InvalidArgument { message, .. } if message.contains("max_pre_auth_frame_bytes")),
        "{err:?}"
    );

    // A block shows in the listing and can be lifted.
    let _ = client_from(&t.pki, &t.server, &bad_key(), 2)
        .server("s1")
        .unwrap()
        .session()
        .await;
    t.clock.advance(Duration::from_secs(5));
    let Value::List(blocked) = admin
        .execute(netproc_wire::Operation::ListBlocked)
        .await
        .unwrap()
    else {
        panic!()
    };
    assert_eq!(blocked.len(), 1, "{blocked:?}");
    let Value::Map(entry) = &blocked[0] else {
        panic!()
    };
    assert_eq!(entry["entry"], Value::from("127.0.0.2"));
    t.clock.advance(Duration::from_secs(5));
    let lifted = admin
        .execute(netproc_wire::Operation::Unblock {
            entry: "127.0.0.2".into(),
        })
        .await
        .unwrap();
    assert_eq!(lifted, Value::Bool(true));
    assert_eq!(t.server.abuse_metrics().blocked_ip_count, 0);
}

/// The key property: while attackers flood (silent connections, failed
/// auths, over-rate requests, a client that never reads), a legitimate
/// client's calls keep succeeding within their deadlines.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_legitimate_client_is_served_during_a_flood() {
    let mut o = ServerOptions::default();
    o.connection_controls.max_concurrent_handshakes = 16;
    o.connection_controls.tls_handshake_timeout_ms = 500;
    o.auth_controls.max_failed_auth_per_ip_per_window = 5;
    o.session_controls.max_outbound_bytes_per_connection = 1024 * 1024;
    o.session_controls.write_stall_timeout_ms = 500;
    let pki = Pki::new();
    let keys = Arc::new(ApiKeyStore::in_memory());
    let server = builder(&pki, "s1", Arc::clone(&keys))
        .options(o)
        .start()
        .await
        .unwrap();
    let good = key(&keys, "invoke_functions");
    let attacker_key = key(&keys, "invoke_functions");
    let legit = Client::builder()
        .server(
            "s1",
            endpoint(&pki, &server, &good)
                .bind(ip(3))
                .request_timeout(Duration::from_secs(2)),
        )
        .build()
        .unwrap()
        .server("s1")
        .unwrap();
    legit.session().await.unwrap();

    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let addr = server.local_addr();
    let mut attackers = Vec::new();
    // Silent connections that never handshake.
    {
        let stop = stop.clone();
        attackers.push(tokio::spawn(async move {
            let mut held = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) && held.len() < 200 {
                if let Ok(s) = TcpSocket::new_v4() {
                    let _ = s.bind(SocketAddr::new(ip(2), 0));
                    if let Ok(c) = s.connect(addr).await {
                        held.push(c);
                    }
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }));
    }
    // Failed authentications.
    {
        let (stop, pki_ep) = (
            stop.clone(),
            endpoint(&pki, &server, &bad_key()).bind(ip(4)),
        );
        attackers.push(tokio::spawn(async move {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let c = Client::builder()
                    .server("s1", pki_ep.clone())
                    .build()
                    .unwrap();
                let _ = c.server("s1").unwrap().call::<i64>("add", (1, 1)).await;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }));
    }
    // Over-rate requests.
    {
        let (stop, ep) = (
            stop.clone(),
            endpoint(&pki, &server, &attacker_key).bind(ip(5)),
        );
        attackers.push(tokio::spawn(async move {
            let s = Client::builder()
                .server("s1", ep)
                .build()
                .unwrap()
                .server("s1")
                .unwrap();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let _ = s.call::<i64>("add", (1, 1)).await;
            }
        }));
    }
    // A client that never reads its responses.
    let mut never_reads = Raw::connect(&pki, &server).await;
    never_reads.auth(&attacker_key).await;
    {
        let stop = stop.clone();
        attackers.push(tokio::spawn(async move {
            let big = vec![Value::Bytes(vec![1; 128 * 1024])];
            for id in 1.. {
                if stop.load(std::sync::atomic::Ordering::Relaxed) {
                    break;
                }
                let msg = netproc_wire::ClientMessage::Request(netproc_wire::Request {
                    id,
                    op: netproc_wire::Operation::Invoke {
                        function: "echo".into(),
                        args: big.clone(),
                    },
                    deadline_ms: None,
                });
                match tokio::time::timeout(Duration::from_millis(500), never_reads.try_send(&msg))
                    .await
                {
                    Ok(Ok(())) => {}
                    _ => break,
                }
            }
        }));
    }

    let mut ok = 0u32;
    let mut latencies = Vec::new();
    let total = 300u32;
    for i in 0..total {
        let started = Instant::now();
        if legit.call::<i64>("add", (i64::from(i), 1)).await.is_ok() {
            ok += 1;
        }
        latencies.push(started.elapsed());
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for a in attackers {
        a.abort();
    }
    latencies.sort();
    let m = server.abuse_metrics();
    println!(
        "legit calls: {ok}/{total} ok; latency p50 {:?} p99 {:?} max {:?}; metrics: {m:?}",
        latencies[latencies.len() / 2],
        latencies[latencies.len() * 99 / 100],
        latencies[latencies.len() - 1]
    );
    assert!(
        f64::from(ok) / f64::from(total) >= 0.99,
        "only {ok}/{total} legitimate calls succeeded"
    );
    assert!(
        latencies.iter().all(|l| *l < Duration::from_secs(2)),
        "a call exceeded its deadline"
    );
    assert!(
        m.auth_failure_count > 0 && m.rate_limited_per_connection_count > 0,
        "the flood did not happen: {m:?}"
    );
}

/// The lockout found in black-box review: failures from many addresses fill
/// the address and key tables; a correct credential must still pass, from
/// an address seen before and from a new one, while a known key that failed
/// stays blocked on its own window.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_limiter_tables_never_refuse_a_correct_credential() {
    let mut o = unlimited();
    o.connection_controls.max_tracked_ips = 32;
    o.auth_controls.max_tracked_api_keys = 32;
    o.auth_controls.max_failed_auth_per_api_key_per_window = 1;
    let t = setup(o).await;
    let invoke = || KeySpec::new(PrivilegeSet::from([Privilege::InvokeFunctions]));
    let victims: Vec<_> = (0..48).map(|_| t.keys.create(invoke()).unwrap()).collect();
    let (_, admin) = t
        .keys
        .create(KeySpec::new(PrivilegeSet::from([
            Privilege::AdminPrivileges,
        ])))
        .unwrap();
    let wrong = |id: &str| netproc_wire::SecretString::new(format!("npk_{id}_{}", "Z".repeat(32)));
    let attempt = |secret: netproc_wire::SecretString, from: u8| {
        let ep = netproc_client::ServerEndpoint::new(
            t.server.local_addr(),
            "localhost",
            t.pki.client.identity().unwrap(),
            t.pki.ca.trust_anchors(),
            secret,
        )
        .bind(ip(from));
        async move {
            Client::builder()
                .server("s1", ep)
                .build()
                .unwrap()
                .server("s1")
                .unwrap()
                .call::<i64>("add", (1, 1))
                .await
        }
    };
    // 48 existing keys fail once each, from 48 addresses; made-up ids too.
    for (i, (info, _)) in victims.iter().enumerate() {
        let from = 10 + i as u8;
        let err = attempt(wrong(&info.id), from).await.unwrap_err();
        assert!(
            matches!(
                err,
                ClientError::AuthenticationFailed { .. } | ClientError::AuthThrottled { .. }
            ),
            "{err:?}"
        );
        let _ = attempt(wrong(&format!("madeup{i:06}")), from).await;
    }
    let m = t.server.abuse_metrics();
    assert!(m.auth_failure_overflow_count > 0, "{m:?}");
    assert_eq!(m.blocked_api_key_count, 32, "{m:?}");
    // Correct credentials: the admin key and a victim key that overflowed
    // (untracked), from an old address and from new ones.
    for (secret, from) in [
        (admin.to_secret(), 10),
        (admin.to_secret(), 200),
        (victims[47].1.to_secret(), 201),
        (admin.to_secret(), 57),
    ] {
        assert_eq!(attempt(secret, from).await.unwrap(), 2, "from {from}");
    }
    // The first 32 keys' failures were tracked (each blocked at once, so
    // never evicted); a known key that failed is still blocked on its own
    // window, whatever the credential.
    let err = attempt(victims[0].1.to_secret(), 202).await.unwrap_err();
    match err {
        ClientError::AuthThrottled { ref scope, .. } => {
            assert_eq!(scope.as_deref(), Some("api_key"), "{err:?}")
        }
        other => panic!("{other:?}"),
    }
}
