//! Abuse controls of a running server: per-function limits, limits changed
//! and blocks lifted at run time, and a legitimate client served during a
//! flood.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use netproc_auth::ApiKeyStore;
use netproc_client::{Client, ClientError};
use netproc_limits::ManualClock;
use netproc_server::ServerOptions;
use netproc_wire::Value;
use tokio::net::TcpSocket;

use crate::abuse::{bad_key, client_from, ip, setup, until};
use crate::support::*;

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
            let big = vec![Value::Bytes(vec![1; 128 * 1024].into())];
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
