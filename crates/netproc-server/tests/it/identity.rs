//! Identity lifecycle: expiry and revocation reaching live sessions, TLS
//! hot reload with keep-last-good, per-principal session policy.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use netproc_auth::{ApiKeyStore, KeySpec};
use netproc_client::{ClientError, ServerRef, TlsFailure};
use netproc_pki::{
    CaParams, CertificateAuthority, Ed25519Key, Fingerprint, IssuedCert, LeafParams, Validity,
};
use netproc_server::{ServerHandle, ServerOptions};
use netproc_wire::{ClientMessage, Ed25519Proof, ErrorCode, ServerMessage};
use tokio::task::JoinHandle;

use crate::support::*;

/// A long call, to observe how the session ends.
fn long_call(s: &ServerRef) -> JoinHandle<Result<u64, ClientError>> {
    let s = s.clone();
    tokio::spawn(async move { s.call::<u64>("sleep_ms", (20_000,)).await })
}

/// The remote reason `call` ended with, waiting at most `within`.
async fn ended_with(call: JoinHandle<Result<u64, ClientError>>, within: Duration) -> ErrorCode {
    let err = tokio::time::timeout(within, call)
        .await
        .expect("the session did not end in time")
        .unwrap()
        .unwrap_err();
    match err {
        ClientError::Remote { code, .. } => code,
        other => panic!("expected a remote reason, got {other:?}"),
    }
}

/// Lets a spawned call reach the server.
async fn settle() {
    tokio::time::sleep(Duration::from_millis(100)).await;
}

fn short_lived_client(ca: &CertificateAuthority, lifetime: Duration) -> IssuedCert {
    let now = SystemTime::now();
    ca.issue(&LeafParams::client("short-lived").validity(Validity::new(
        now - Duration::from_secs(3600),
        now + lifetime,
    )))
    .unwrap()
}

#[tokio::test]
async fn a_certificate_that_expires_ends_its_session_with_certificate_expired() {
    let pki = Pki::new();
    let keys = Arc::new(ApiKeyStore::in_memory());
    let key = key(&keys, "invoke_functions");
    let server = start(&pki, "s1", keys).await;
    // X.509 times have whole seconds: this one ends in 1 to 2 s.
    let cert = short_lived_client(&pki.ca, Duration::from_secs(2));
    let s = only(endpoint_as(&pki, &cert, &server, &key));
    s.session().await.unwrap();
    let call = long_call(&s);
    assert_eq!(
        ended_with(call, Duration::from_secs(5)).await,
        ErrorCode::CertificateExpired
    );
}

#[tokio::test]
async fn close_on_cert_expiry_off_lets_the_session_run_on() {
    let pki = Pki::new();
    let keys = Arc::new(ApiKeyStore::in_memory());
    let key = key(&keys, "invoke_functions");
    let mut options = ServerOptions::default();
    options.session_controls.close_on_cert_expiry = false;
    let server = start_with(&pki, keys, options).await;
    let cert = short_lived_client(&pki.ca, Duration::from_secs(1));
    let s = only(endpoint_as(&pki, &cert, &server, &key));
    let (id, _) = s.session().await.unwrap();
    assert_eq!(s.call::<u64>("sleep_ms", (2_500,)).await.unwrap(), 2_500);
    assert_eq!(s.session().await.unwrap().0, id, "the session was kept");
}

#[tokio::test]
async fn a_key_that_expires_ends_its_session_with_credential_revoked() {
    let pki = Pki::new();
    let keys = Arc::new(ApiKeyStore::in_memory());
    let (_, key) = keys
        .create(
            KeySpec::new("invoke_functions".parse().unwrap())
                .expires_at(SystemTime::now() + Duration::from_millis(1_500)),
        )
        .unwrap();
    let server = start(&pki, "s1", keys).await;
    let s = client(&pki, &server, &key).server("s1").unwrap();
    s.session().await.unwrap();
    let call = long_call(&s);
    assert_eq!(
        ended_with(call, Duration::from_secs(5)).await,
        ErrorCode::CredentialRevoked
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoking_a_key_during_calls_ends_its_sessions_and_no_one_else_s() {
    let pki = Pki::new();
    let keys = Arc::new(ApiKeyStore::in_memory());
    let (victim_info, victim_key) = keys
        .create(KeySpec::new("invoke_functions".parse().unwrap()))
        .unwrap();
    let bystander_key = key(&keys, "invoke_functions");
    let server = start(&pki, "s1", Arc::clone(&keys)).await;
    server.follow_key_store(&keys);
    let victim = client(&pki, &server, &victim_key).server("s1").unwrap();
    let bystander = client(&pki, &server, &bystander_key).server("s1").unwrap();
    let (bystander_session, _) = bystander.session().await.unwrap();

    // A stream of calls, until one fails.
    let stream = {
        let victim = victim.clone();
        tokio::spawn(async move {
            for i in 0..100_000_i64 {
                match victim.call::<i64>("add", (i, 1)).await {
                    // A fast machine outruns the default per-connection bucket.
                    Err(e) if e.code() == ErrorCode::RateLimited => {
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                    Err(e) => return e,
                    Ok(_) => {}
                }
            }
            panic!("the stream was never cut");
        })
    };
    let in_flight = long_call(&victim);
    settle().await;
    keys.revoke(&victim_info.id).unwrap();
    let revoked_at = std::time::Instant::now();

    assert_eq!(
        ended_with(in_flight, Duration::from_secs(2)).await,
        ErrorCode::CredentialRevoked
    );
    let err = tokio::time::timeout(Duration::from_secs(2), stream)
        .await
        .unwrap()
        .unwrap();
    assert!(revoked_at.elapsed() < Duration::from_secs(2));
    assert!(
        matches!(
            err.code(),
            ErrorCode::CredentialRevoked | ErrorCode::AuthenticationFailed
        ),
        "{err:?}"
    );
    // It cannot come back.
    let again = victim.call::<i64>("add", (1, 1)).await.unwrap_err();
    assert_eq!(again.code(), ErrorCode::AuthenticationFailed, "{again:?}");
    // The other client never noticed.
    assert_eq!(bystander.call::<i64>("add", (2, 2)).await.unwrap(), 4);
    assert_eq!(bystander.session().await.unwrap().0, bystander_session);
}

#[tokio::test]
async fn rotating_a_key_ends_only_the_sessions_on_the_old_secret() {
    let pki = Pki::new();
    let keys = Arc::new(ApiKeyStore::in_memory());
    let (info, old_secret) = keys
        .create(KeySpec::new("invoke_functions".parse().unwrap()))
        .unwrap();
    let server = start(&pki, "s1", Arc::clone(&keys)).await;
    server.follow_key_store(&keys);
    let old = client(&pki, &server, &old_secret).server("s1").unwrap();
    old.session().await.unwrap();
    let old_call = long_call(&old);
    settle().await;

    let new_secret = keys.rotate(&info.id).unwrap();
    assert_eq!(
        ended_with(old_call, Duration::from_secs(2)).await,
        ErrorCode::CredentialRevoked
    );
    let new = client(&pki, &server, &new_secret).server("s1").unwrap();
    let (new_session, _) = new.session().await.unwrap();
    // A second rotation would end it; a revocation of another key does not.
    let other = keys
        .create(KeySpec::new("invoke_functions".parse().unwrap()))
        .unwrap()
        .0;
    keys.revoke(&other.id).unwrap();
    assert_eq!(new.call::<i64>("add", (1, 2)).await.unwrap(), 3);
    assert_eq!(new.session().await.unwrap().0, new_session);
}

/// The server certificate a fresh TLS handshake sees.
async fn served_fingerprint(pki: &Pki, server: &ServerHandle) -> Fingerprint {
    Raw::connect(pki, server).await.server_fingerprint()
}

#[tokio::test]
async fn reloading_the_server_certificate_serves_it_to_new_connections_only() {
    let pki = Pki::new();
    let keys = Arc::new(ApiKeyStore::in_memory());
    let key = key(&keys, "invoke_functions");
    let server = start(&pki, "s1", keys).await;
    assert_eq!(
        served_fingerprint(&pki, &server).await,
        pki.server.cert_identity().fingerprint
    );
    let s = client(&pki, &server, &key).server("s1").unwrap();
    let (session, _) = s.session().await.unwrap();

    let renewed = pki
        .ca
        .issue(&LeafParams::server("server", ["localhost", "127.0.0.1"]))
        .unwrap();
    let closed = server
        .reload_tls(&renewed.identity().unwrap(), &pki.ca.trust_anchors(), &[])
        .unwrap();
    assert_eq!(closed, 0);
    assert_eq!(
        served_fingerprint(&pki, &server).await,
        renewed.cert_identity().fingerprint
    );
    // The established session carries on.
    assert_eq!(s.call::<i64>("add", (1, 1)).await.unwrap(), 2);
    assert_eq!(s.session().await.unwrap().0, session);
    assert_eq!(server.abuse_metrics().tls_reload_count, 1);
}

#[tokio::test]
async fn a_bad_reload_is_refused_and_the_last_good_configuration_stays() {
    let pki = Pki::new();
    let keys = Arc::new(ApiKeyStore::in_memory());
    let key = key(&keys, "invoke_functions");
    let server = start(&pki, "s1", keys).await;
    let now = SystemTime::now();
    let expired = pki
        .ca
        .issue(
            &LeafParams::server("server", ["localhost"]).validity(Validity::new(
                now - Duration::from_secs(7200),
                now - Duration::from_secs(3600),
            )),
        )
        .unwrap();
    let err = server
        .reload_tls(&expired.identity().unwrap(), &pki.ca.trust_anchors(), &[])
        .unwrap_err();
    assert!(err.to_string().contains("expired"), "{err}");
    assert_eq!(server.abuse_metrics().tls_reload_failure_count, 1);
    assert_eq!(server.abuse_metrics().tls_reload_count, 0);
    // New connections still get the original certificate and work.
    assert_eq!(
        served_fingerprint(&pki, &server).await,
        pki.server.cert_identity().fingerprint
    );
    let s = client(&pki, &server, &key).server("s1").unwrap();
    assert_eq!(s.call::<i64>("add", (2, 3)).await.unwrap(), 5);
}

#[tokio::test]
async fn a_crl_reload_ends_the_revoked_client_s_session_only() {
    let pki = Pki::new();
    let keys = Arc::new(ApiKeyStore::in_memory());
    let key = key(&keys, "invoke_functions");
    let server = start(&pki, "s1", keys).await;
    let revoked_cert = pki.ca.issue(&LeafParams::client("to-revoke")).unwrap();
    let victim = only(endpoint_as(&pki, &revoked_cert, &server, &key));
    let bystander = client(&pki, &server, &key).server("s1").unwrap();
    victim.session().await.unwrap();
    let (bystander_session, _) = bystander.session().await.unwrap();
    let call = long_call(&victim);
    settle().await;

    let crl = pki
        .ca
        .crl(&[revoked_cert.cert_identity().serial.as_str()], 7)
        .unwrap();
    let closed = server
        .reload_tls(
            &pki.server.identity().unwrap(),
            &pki.ca.trust_anchors(),
            &[crl],
        )
        .unwrap();
    assert_eq!(closed, 1);
    assert_eq!(
        ended_with(call, Duration::from_secs(2)).await,
        ErrorCode::CredentialRevoked
    );
    // The handshake now refuses the certificate.
    let err = victim.call::<i64>("add", (1, 1)).await.unwrap_err();
    assert!(
        matches!(&err, ClientError::Tls { reason: TlsFailure::RejectedByServer(alert), .. } if alert == "CertificateRevoked"),
        "{err:?}"
    );
    assert_eq!(bystander.session().await.unwrap().0, bystander_session);
    assert_eq!(server.abuse_metrics().sessions_revoked_count, 1);
}

fn refused_as_unknown_ca(r: &Result<i64, ClientError>) -> bool {
    matches!(r, Err(ClientError::Tls { reason: TlsFailure::RejectedByServer(alert), .. }) if alert == "UnknownCA")
}

#[tokio::test]
async fn a_client_ca_can_be_rotated_with_an_overlap() {
    let pki = Pki::new();
    let keys = Arc::new(ApiKeyStore::in_memory());
    let key = key(&keys, "invoke_functions");
    let server = start(&pki, "s1", keys).await;
    let new_ca = CertificateAuthority::generate(&CaParams::new("new client CA")).unwrap();
    let new_cert = new_ca.issue(&LeafParams::client("new")).unwrap();
    let connect = |cert: &IssuedCert| only(endpoint_as(&pki, cert, &server, &key));
    // Not trusted yet.
    let early = connect(&new_cert).call::<i64>("add", (1, 1)).await;
    assert!(refused_as_unknown_ca(&early), "{early:?}");

    // Overlap: both CAs.
    let both = pki.ca.trust_anchors().merged(&new_ca.trust_anchors());
    server
        .reload_tls(&pki.server.identity().unwrap(), &both, &[])
        .unwrap();
    let old_client = connect(&pki.client);
    let (old_session, _) = old_client.session().await.unwrap();
    assert_eq!(
        connect(&new_cert).call::<i64>("add", (1, 1)).await.unwrap(),
        2
    );

    // The old CA removed: old certificates can no longer connect, though
    // sessions already established carry on until they end.
    server
        .reload_tls(
            &pki.server.identity().unwrap(),
            &new_ca.trust_anchors(),
            &[],
        )
        .unwrap();
    let late = connect(&pki.client).call::<i64>("add", (1, 1)).await;
    assert!(refused_as_unknown_ca(&late), "{late:?}");
    assert_eq!(
        connect(&new_cert).call::<i64>("add", (2, 2)).await.unwrap(),
        4
    );
    assert_eq!(old_client.session().await.unwrap().0, old_session);
}

#[tokio::test]
async fn single_active_session_replaces_the_old_one_only_after_the_new_one_authenticates() {
    let pki = Pki::new();
    let keys = Arc::new(ApiKeyStore::in_memory());
    let key = key(&keys, "invoke_functions");
    let mut options = ServerOptions::default();
    options.session_controls.single_active_session = true;
    let server = start_with(&pki, keys, options).await;
    let first = client(&pki, &server, &key).server("s1").unwrap();
    let (first_session, _) = first.session().await.unwrap();
    let first_call = long_call(&first);
    settle().await;

    // Someone with a valid certificate but the wrong secret for the key.
    let mut raw = Raw::connect(&pki, &server).await;
    let forged = key.expose().to_owned();
    // Change the last character (to one it is not: 1 in 62 keys end in x).
    let other = if forged.ends_with('x') { 'y' } else { 'x' };
    let forged = format!("{}{other}", &forged[..forged.len() - 1]);
    raw.send(&ClientMessage::Auth(netproc_wire::Auth {
        version: netproc_wire::PROTOCOL_VERSION,
        method: netproc_wire::AuthMethod::ApiKey(netproc_wire::SecretString::new(forged)),
        client_name: None,
    }))
    .await;
    match raw.recv().await {
        Some(ServerMessage::Error(e)) => assert_eq!(e.code, ErrorCode::AuthenticationFailed),
        other => panic!("expected authentication_failed, got {other:?}"),
    }
    assert_eq!(first.call::<i64>("add", (1, 1)).await.unwrap(), 2);
    assert_eq!(first.session().await.unwrap().0, first_session);

    // The real owner connects again: the old session is replaced.
    let second = client(&pki, &server, &key).server("s1").unwrap();
    let (second_session, _) = second.session().await.unwrap();
    assert_ne!(second_session, first_session);
    assert_eq!(
        ended_with(first_call, Duration::from_secs(2)).await,
        ErrorCode::SessionReplaced
    );
    assert_eq!(second.call::<i64>("add", (3, 4)).await.unwrap(), 7);
}

#[tokio::test]
async fn a_session_over_the_principal_cap_is_refused_and_the_others_are_kept() {
    let pki = Pki::new();
    let keys = Arc::new(ApiKeyStore::in_memory());
    let key = key(&keys, "invoke_functions");
    let other_key = crate::support::key(&keys, "invoke_functions");
    let mut options = ServerOptions::default();
    options.session_controls.max_sessions_per_principal = 1;
    let server = start_with(&pki, keys, options).await;
    let first = client(&pki, &server, &key).server("s1").unwrap();
    let (first_session, _) = first.session().await.unwrap();

    let second = client(&pki, &server, &key).server("s1").unwrap();
    let err = second.session().await.unwrap_err();
    assert_eq!(err.code(), ErrorCode::TooManySessions, "{err:?}");
    assert_eq!(first.session().await.unwrap().0, first_session);
    assert_eq!(first.call::<i64>("add", (1, 1)).await.unwrap(), 2);
    // Another principal is not counted against it.
    let other = client(&pki, &server, &other_key).server("s1").unwrap();
    assert_eq!(other.call::<i64>("add", (2, 2)).await.unwrap(), 4);
}

fn unix_ms_now() -> u64 {
    netproc_wire::unix_ms(SystemTime::now())
}

/// Sends an Ed25519 proof over `raw` and returns the server's answer.
async fn prove(
    raw: &mut Raw,
    key_id: &str,
    key: &Ed25519Key,
    binding: &[u8; 32],
    timestamp_ms: u64,
) -> ServerMessage {
    let message = Ed25519Proof::signed_message(key_id, binding, timestamp_ms);
    raw.send(&ClientMessage::Auth(netproc_wire::Auth {
        version: netproc_wire::PROTOCOL_VERSION,
        method: netproc_wire::AuthMethod::Ed25519(Ed25519Proof {
            key_id: key_id.to_owned(),
            timestamp_ms,
            signature: key.sign(&message).to_vec(),
        }),
        client_name: None,
    }))
    .await;
    raw.recv()
        .await
        .expect("the server closed without answering")
}

fn refused(answer: &ServerMessage) -> bool {
    matches!(answer, ServerMessage::Error(e)
        if e.code == ErrorCode::AuthenticationFailed && e.message == "authentication failed")
}

#[tokio::test]
async fn an_ed25519_key_authenticates_a_client_without_a_secret_on_the_wire() {
    let pki = Pki::new();
    let keys = Arc::new(ApiKeyStore::in_memory());
    let key = Arc::new(Ed25519Key::generate().unwrap());
    let info = keys
        .register_ed25519(
            KeySpec::new("invoke_functions".parse().unwrap()),
            key.public_key(),
        )
        .unwrap();
    let server = start(&pki, "s1", Arc::clone(&keys)).await;
    let endpoint = netproc_client::ServerEndpoint::with_ed25519(
        server.local_addr(),
        "localhost",
        pki.client.identity().unwrap(),
        pki.ca.trust_anchors(),
        info.id.clone(),
        Arc::clone(&key),
    );
    let s = only(endpoint);
    assert_eq!(s.call::<String>("whoami", ()).await.unwrap(), info.id);
    assert_eq!(s.call::<i64>("add", (20, 22)).await.unwrap(), 42);
    // An Ed25519 key has no secret to rotate.
    assert!(matches!(
        keys.rotate(&info.id),
        Err(netproc_auth::KeyStoreError::NotAnApiKey(_))
    ));
}

#[tokio::test]
async fn ed25519_proofs_with_the_wrong_key_another_connection_s_binding_or_a_stale_time_are_refused()
 {
    let capture = crate::auth::audit_capture();
    let pki = Pki::new();
    let keys = Arc::new(ApiKeyStore::in_memory());
    let key = Ed25519Key::generate().unwrap();
    let id = keys
        .register_ed25519(
            KeySpec::new("invoke_functions".parse().unwrap()),
            key.public_key(),
        )
        .unwrap()
        .id;
    // Three refusals stay under the default blocking threshold (20).
    let server = start(&pki, "s1", keys).await;

    // Signed by another key.
    let mut raw = Raw::connect(&pki, &server).await;
    let other = Ed25519Key::generate().unwrap();
    let binding = raw.channel_binding();
    let answer = prove(&mut raw, &id, &other, &binding, unix_ms_now()).await;
    assert!(refused(&answer), "{answer:?}");

    // A valid proof made for another connection.
    let first = Raw::connect(&pki, &server).await;
    let mut second = Raw::connect(&pki, &server).await;
    assert_ne!(first.channel_binding(), second.channel_binding());
    let answer = prove(
        &mut second,
        &id,
        &key,
        &first.channel_binding(),
        unix_ms_now(),
    )
    .await;
    assert!(refused(&answer), "{answer:?}");

    // The right connection, but a timestamp a minute old.
    let mut raw = Raw::connect(&pki, &server).await;
    let binding = raw.channel_binding();
    let answer = prove(&mut raw, &id, &key, &binding, unix_ms_now() - 60_000).await;
    assert!(refused(&answer), "{answer:?}");

    // The same proof, fresh and for its own connection, is accepted.
    let mut raw = Raw::connect(&pki, &server).await;
    let binding = raw.channel_binding();
    let answer = prove(&mut raw, &id, &key, &binding, unix_ms_now()).await;
    assert!(matches!(answer, ServerMessage::AuthOk(_)), "{answer:?}");

    // The audit log names each reason; the peer learned none of them.
    let all = String::from_utf8(capture.lock().unwrap().clone()).unwrap();
    let mine: Vec<&str> = all.lines().filter(|l| l.contains(&id)).collect();
    let bad_signature = mine.iter().filter(|l| l.contains("bad signature")).count();
    assert_eq!(bad_signature, 2, "{mine:#?}");
    assert!(
        mine.iter().any(|l| l.contains("freshness window")),
        "{mine:#?}"
    );
}

#[tokio::test]
async fn liveness_goes_online_unstable_offline_and_back_with_a_manual_clock() {
    use netproc_server::{Liveness, LivenessEvent};
    let pki = Pki::new();
    let keys = Arc::new(ApiKeyStore::in_memory());
    let (info, key) = keys
        .create(KeySpec::new("invoke_functions".parse().unwrap()))
        .unwrap();
    let clock = Arc::new(netproc_limits::ManualClock::new());
    let mut options = ServerOptions::default();
    options.session_controls.unstable_after_ms = 1_000;
    options.session_controls.offline_after_ms = 2_000;
    let server = builder(&pki, "s1", keys)
        .options(options)
        .clock(Arc::clone(&clock) as Arc<dyn netproc_limits::Clock>)
        .start()
        .await
        .unwrap();
    let mut events = server.liveness_events();
    let mut next = async || -> (String, Liveness, Liveness) {
        let e: LivenessEvent = tokio::time::timeout(Duration::from_secs(5), events.recv())
            .await
            .expect("no liveness event in 5 s")
            .unwrap();
        (e.principal, e.from, e.to)
    };
    let transition = |from, to| (info.id.clone(), from, to);

    let s = client(&pki, &server, &key).server("s1").unwrap();
    s.session().await.unwrap();
    assert_eq!(
        next().await,
        transition(Liveness::Offline, Liveness::Online)
    );
    assert_eq!(server.liveness(), [(info.id.clone(), Liveness::Online)]);

    clock.advance(Duration::from_millis(1_500));
    assert_eq!(
        next().await,
        transition(Liveness::Online, Liveness::Unstable)
    );
    let listed = &server.sessions()[0];
    assert_eq!(listed.liveness, Liveness::Unstable);
    assert_eq!(server.abuse_metrics().unstable_principal_count, 1);
    assert!(listed.idle_ms >= 1_500, "{listed:?}");

    clock.advance(Duration::from_millis(1_000));
    assert_eq!(
        next().await,
        transition(Liveness::Unstable, Liveness::Offline)
    );

    // Heard from again.
    assert_eq!(s.call::<i64>("add", (1, 1)).await.unwrap(), 2);
    assert_eq!(
        next().await,
        transition(Liveness::Offline, Liveness::Online)
    );

    // Its last session closes.
    server.close_sessions(
        &netproc_server::SessionSelector::Principal(info.id.clone()),
        ErrorCode::DisconnectedByAdmin,
    );
    assert_eq!(
        next().await,
        transition(Liveness::Online, Liveness::Offline)
    );
    assert!(server.liveness().is_empty());
}

#[test]
fn liveness_thresholds_must_be_ordered_below_the_idle_timeout() {
    let mut o = ServerOptions::default();
    o.session_controls.unstable_after_ms = 700_000;
    let err = o.validate().unwrap_err();
    assert_eq!(err.field, "session_controls.unstable_after_ms");
    let mut o = ServerOptions::default();
    o.session_controls.idle_timeout_ms = 600_000;
    let err = o.validate().unwrap_err();
    assert_eq!(err.field, "session_controls.offline_after_ms");
    ServerOptions::default().validate().unwrap();
}

#[tokio::test]
async fn heartbeats_keep_an_idle_client_s_session_and_are_clamped_below_the_idle_timeout() {
    let pki = Pki::new();
    let keys = Arc::new(ApiKeyStore::in_memory());
    let key = key(&keys, "invoke_functions");
    let mut options = ServerOptions::default();
    options.session_controls.idle_timeout_ms = 400;
    options.session_controls.unstable_after_ms = 100;
    options.session_controls.offline_after_ms = 200;
    let server = start_with(&pki, keys, options).await;
    let with = |heartbeat| only(endpoint(&pki, &server, &key).heartbeat_interval(heartbeat));
    // Configured far above the idle timeout: clamped to half of it.
    let beating = with(Some(Duration::from_secs(10)));
    let silent = with(None);
    let (beating_session, _) = beating.session().await.unwrap();
    let (silent_session, _) = silent.session().await.unwrap();
    // Nothing to await here: the point is what does not happen in 3 idle
    // timeouts.
    tokio::time::sleep(Duration::from_millis(1_200)).await;
    assert_eq!(beating.session().await.unwrap().0, beating_session);
    assert_ne!(
        silent.session().await.unwrap().0,
        silent_session,
        "a client without heartbeats was idled out and reconnected"
    );
}

#[tokio::test]
async fn with_certificate_principals_every_key_over_one_certificate_is_one_principal() {
    let pki = Pki::new();
    let keys = Arc::new(ApiKeyStore::in_memory());
    let first_key = key(&keys, "invoke_functions");
    let second_key = crate::support::key(&keys, "invoke_functions");
    let mut options = ServerOptions::default();
    options.session_controls.principal = netproc_server::PrincipalSource::Certificate;
    options.session_controls.single_active_session = true;
    let server = start_with(&pki, keys, options).await;
    let fingerprint = pki.client.cert_identity().fingerprint.to_string();

    let first = client(&pki, &server, &first_key).server("s1").unwrap();
    assert_eq!(
        first.call::<String>("whoami", ()).await.unwrap(),
        fingerprint
    );
    let first_call = long_call(&first);
    settle().await;
    // Another key, same certificate: the same principal, so it replaces.
    let second = client(&pki, &server, &second_key).server("s1").unwrap();
    assert_eq!(
        second.call::<String>("whoami", ()).await.unwrap(),
        fingerprint
    );
    assert_eq!(
        ended_with(first_call, Duration::from_secs(2)).await,
        ErrorCode::SessionReplaced
    );
}

#[tokio::test]
async fn a_client_swaps_its_certificate_for_new_connections_and_flush_applies_it() {
    let pki = Pki::new();
    let keys = Arc::new(ApiKeyStore::in_memory());
    let key = key(&keys, "invoke_functions");
    let mut options = ServerOptions::default();
    // The principal shows which certificate a session was made over.
    options.session_controls.principal = netproc_server::PrincipalSource::Certificate;
    let server = start_with(&pki, keys, options).await;
    let c = client(&pki, &server, &key);
    let s = c.server("s1").unwrap();
    let old = pki.client.cert_identity().fingerprint.to_string();
    assert_eq!(s.call::<String>("whoami", ()).await.unwrap(), old);

    let renewed = pki.ca.issue(&LeafParams::client("client")).unwrap();
    c.set_identity(&renewed.identity().unwrap(), &pki.ca.trust_anchors())
        .unwrap();
    // The established connection carries on with the old certificate...
    assert_eq!(s.call::<String>("whoami", ()).await.unwrap(), old);
    // ...until it is flushed.
    c.flush_all();
    let new = renewed.cert_identity().fingerprint.to_string();
    assert_eq!(s.call::<String>("whoami", ()).await.unwrap(), new);
}

#[tokio::test]
async fn a_watched_certificate_replaced_by_rename_is_served_without_a_reload_call() {
    let pki = Pki::new();
    let keys = Arc::new(ApiKeyStore::in_memory());
    let dir = tempfile::tempdir().unwrap();
    let (cert, key_file, ca) = (
        dir.path().join("server.crt"),
        dir.path().join("server.key"),
        dir.path().join("ca.crt"),
    );
    pki.server.save(&cert, &key_file, false).unwrap();
    std::fs::write(&ca, pki.ca.cert_pem()).unwrap();
    let source: netproc_server::ReloadSource = {
        let (cert, key_file, ca) = (cert.clone(), key_file.clone(), ca.clone());
        Arc::new(move || {
            let identity =
                netproc_pki::Identity::load(&cert, &key_file).map_err(|e| e.to_string())?;
            let roots = netproc_pki::TrustAnchors::load(&ca).map_err(|e| e.to_string())?;
            Ok((identity, roots, Vec::new()))
        })
    };
    let server = builder(&pki, "s1", keys)
        .reload_source(source)
        .start()
        .await
        .unwrap();
    server.watch_files(
        vec![cert.clone(), key_file.clone(), ca.clone()],
        Duration::from_millis(50),
    );

    // A certificate manager's swap: write aside, rename into place.
    let renewed = pki
        .ca
        .issue(&LeafParams::server("server", ["localhost", "127.0.0.1"]))
        .unwrap();
    let (new_cert, new_key) = (dir.path().join("new.crt"), dir.path().join("new.key"));
    renewed.save(&new_cert, &new_key, false).unwrap();
    std::fs::rename(&new_key, &key_file).unwrap();
    std::fs::rename(&new_cert, &cert).unwrap();

    // The watcher has no event to await from outside: poll, bounded.
    let wanted = renewed.cert_identity().fingerprint;
    let mut served = None;
    for _ in 0..100 {
        let now = served_fingerprint(&pki, &server).await;
        if now == wanted {
            served = Some(now);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        served,
        Some(wanted),
        "the renewed certificate was not served"
    );
}

#[tokio::test]
async fn a_key_s_own_session_policy_overrides_the_server_s() {
    let pki = Pki::new();
    let keys = Arc::new(ApiKeyStore::in_memory());
    let capped = keys
        .create(KeySpec::new("invoke_functions".parse().unwrap()).session_policy(Some(1), None))
        .unwrap()
        .1;
    let free = key(&keys, "invoke_functions");
    // The server has no cap.
    let server = start(&pki, "s1", keys).await;
    let first = client(&pki, &server, &capped).server("s1").unwrap();
    first.session().await.unwrap();
    let second = client(&pki, &server, &capped).server("s1").unwrap();
    let err = second.session().await.unwrap_err();
    assert_eq!(err.code(), ErrorCode::TooManySessions, "{err:?}");
    // Two sessions at once on the other key.
    let a = client(&pki, &server, &free).server("s1").unwrap();
    let b = client(&pki, &server, &free).server("s1").unwrap();
    assert_eq!(a.call::<i64>("add", (1, 1)).await.unwrap(), 2);
    assert_eq!(b.call::<i64>("add", (1, 1)).await.unwrap(), 2);
    assert_ne!(a.session().await.unwrap().0, b.session().await.unwrap().0);
}

#[tokio::test]
async fn a_failed_reload_through_the_handle_is_a_reload_error() {
    let pki = Pki::new();
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("gone.crt");
    let source: netproc_server::ReloadSource = Arc::new(move || {
        netproc_pki::TrustAnchors::load(&missing).map_err(|e| e.to_string())?;
        unreachable!("the file does not exist")
    });
    let server = builder(&pki, "s1", Arc::new(ApiKeyStore::in_memory()))
        .reload_source(source)
        .start()
        .await
        .unwrap();
    let err = server.reload().await.unwrap_err();
    assert!(
        matches!(err, netproc_server::ServerError::Reload(_)),
        "{err:?}"
    );
    assert!(err.to_string().contains("gone.crt"), "{err}");
    assert_eq!(server.abuse_metrics().tls_reload_failure_count, 1);
    // Without a source, the same variant.
    let plain = start(&pki, "s2", Arc::new(ApiKeyStore::in_memory())).await;
    assert!(matches!(
        plain.reload().await.unwrap_err(),
        netproc_server::ServerError::Reload(_)
    ));
}

/// Online at authentication (counts too), transitions at the configured
/// thresholds within a scan period, and no state skipped on the way down.
#[tokio::test]
async fn liveness_follows_short_thresholds_from_the_moment_of_auth() {
    use netproc_server::{Liveness, LivenessEvent};
    let pki = Pki::new();
    let keys = Arc::new(ApiKeyStore::in_memory());
    let (info, key) = keys
        .create(KeySpec::new("invoke_functions".parse().unwrap()))
        .unwrap();
    let mut options = ServerOptions::default();
    options.session_controls.unstable_after_ms = 300;
    options.session_controls.offline_after_ms = 600;
    let server = builder(&pki, "s1", keys)
        .options(options)
        .start()
        .await
        .unwrap();
    let mut events = server.liveness_events();
    let s = client(&pki, &server, &key).server("s1").unwrap();
    s.session().await.unwrap();
    let authed = std::time::Instant::now();
    // No wait: online, and counted, as soon as the client is told AuthOk.
    assert_eq!(server.liveness(), [(info.id.clone(), Liveness::Online)]);
    assert_eq!(server.abuse_metrics().online_principal_count, 1);
    let mut seen = Vec::new();
    while seen.len() < 3 {
        let e: LivenessEvent = tokio::time::timeout(Duration::from_secs(5), events.recv())
            .await
            .expect("no liveness event in 5 s")
            .unwrap();
        seen.push((e.from, e.to, authed.elapsed()));
    }
    assert_eq!(
        seen.iter().map(|e| (e.0, e.1)).collect::<Vec<_>>(),
        [
            (Liveness::Offline, Liveness::Online),
            (Liveness::Online, Liveness::Unstable),
            (Liveness::Unstable, Liveness::Offline),
        ]
    );
    // The scan period is 75 ms here: allow it and some scheduling.
    let (unstable_at, offline_at) = (seen[1].2, seen[2].2);
    assert!(unstable_at >= Duration::from_millis(290), "{unstable_at:?}");
    assert!(
        unstable_at < Duration::from_millis(300 + 75 + 250),
        "{unstable_at:?}"
    );
    assert!(offline_at >= Duration::from_millis(590), "{offline_at:?}");
    assert!(
        offline_at < Duration::from_millis(600 + 75 + 250),
        "{offline_at:?}"
    );
}

#[tokio::test]
async fn a_principal_found_past_offline_goes_through_unstable() {
    use netproc_server::{Liveness, LivenessEvent};
    let pki = Pki::new();
    let keys = Arc::new(ApiKeyStore::in_memory());
    let (_, key) = keys
        .create(KeySpec::new("invoke_functions".parse().unwrap()))
        .unwrap();
    let clock = Arc::new(netproc_limits::ManualClock::new());
    let mut options = ServerOptions::default();
    options.session_controls.unstable_after_ms = 1_000;
    options.session_controls.offline_after_ms = 2_000;
    let server = builder(&pki, "s1", keys)
        .options(options)
        .clock(Arc::clone(&clock) as Arc<dyn netproc_limits::Clock>)
        .start()
        .await
        .unwrap();
    let mut events = server.liveness_events();
    let s = client(&pki, &server, &key).server("s1").unwrap();
    s.session().await.unwrap();
    // Past both thresholds between two scans.
    clock.advance(Duration::from_millis(5_000));
    let mut seen = Vec::new();
    while seen.len() < 3 {
        let e: LivenessEvent = tokio::time::timeout(Duration::from_secs(5), events.recv())
            .await
            .expect("no liveness event in 5 s")
            .unwrap();
        seen.push((e.from, e.to));
    }
    assert_eq!(
        seen,
        [
            (Liveness::Offline, Liveness::Online),
            (Liveness::Online, Liveness::Unstable),
            (Liveness::Unstable, Liveness::Offline),
        ]
    );
}
