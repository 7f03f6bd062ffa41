//! Abuse controls on authentication: failed attempts block an address or a
//! key for a window, a bound key cannot be locked out, pending attempts are
//! throttled, and full limiter tables never refuse a correct credential.

use std::time::Duration;

use netproc_auth::{CertBinding, KeySpec, PrivilegeSet};
use netproc_client::{Client, ClientError};
use netproc_wire::{ErrorCode, Privilege, ServerMessage, Value};

use crate::abuse::{bad_key, client_from, ip, retry_after_ms, setup, until};
use crate::support::*;

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

/// A new block is logged at WARN with what is blocked, for how long and
/// how to lift it (the operator who is locked out needs that line).
#[tokio::test]
async fn a_new_block_is_logged_with_its_entry_and_duration() {
    let capture = crate::auth::audit_capture();
    let mut o = unlimited();
    o.auth_controls.max_failed_auth_per_ip_per_window = 2;
    o.auth_controls.block_duration_ms = 10_000;
    let t = setup(o).await;
    for _ in 0..2 {
        let err = client_from(&t.pki, &t.server, &bad_key(), 97)
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
    assert_eq!(t.server.abuse_metrics().blocked_ip_count, 1);
    // The blocked client is told what probably happened and how to check.
    let err = client_from(&t.pki, &t.server, &bad_key(), 97)
        .server("s1")
        .unwrap()
        .call::<i64>("add", (1, 1))
        .await
        .unwrap_err();
    match &err {
        ClientError::Connect { message, .. } => {
            assert!(message.contains("admin … blocked"), "{message}");
        }
        other => panic!("expected a refused connection, got {other:?}"),
    }
    let all = String::from_utf8(capture.lock().unwrap().clone()).unwrap();
    let line = all
        .lines()
        .find(|l| l.contains("entry=\"127.0.0.97\"") && l.contains("blocked after"))
        .unwrap_or_else(|| panic!("no block line in:\n{all}"));
    assert!(
        line.contains("WARN") && line.contains("kind=\"ip\""),
        "{line}"
    );
    assert!(
        line.contains("blocked_for_s=10") && line.contains("unblock"),
        "{line}"
    );
}
