//! Identity lifecycle: certificate and key expiry and revocation reaching
//! live sessions (TLS reload is in `reload`, session policy in `policy`,
//! Ed25519 keys in `ed25519`, liveness in `liveness`), and the helpers
//! those modules share.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use netproc_auth::{ApiKeyStore, KeySpec};
use netproc_client::{ClientError, ServerRef};
use netproc_pki::{CertificateAuthority, IssuedCert, LeafParams, Validity};
use netproc_server::ServerOptions;
use netproc_wire::ErrorCode;
use tokio::task::JoinHandle;

use crate::support::*;

/// A long call, to observe how the session ends.
pub(crate) fn long_call(s: &ServerRef) -> JoinHandle<Result<u64, ClientError>> {
    let s = s.clone();
    tokio::spawn(async move { s.call::<u64>("sleep_ms", (20_000,)).await })
}

/// The remote reason `call` ended with, waiting at most `within`.
pub(crate) async fn ended_with(
    call: JoinHandle<Result<u64, ClientError>>,
    within: Duration,
) -> ErrorCode {
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
pub(crate) async fn settle() {
    tokio::time::sleep(Duration::from_millis(100)).await;
}

pub(crate) fn short_lived_client(ca: &CertificateAuthority, lifetime: Duration) -> IssuedCert {
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

/// `whoami` tells any caller, whatever its privileges, how the server sees
/// it: principal, key, privileges, allow-list, expiry, binding, and the
/// server's clock.
#[tokio::test]
async fn whoami_reports_the_callers_principal_binding_and_the_server_clock() {
    let pki = Pki::new();
    let keys = Arc::new(ApiKeyStore::in_memory());
    let expires = SystemTime::now() + Duration::from_secs(3600);
    let client_fp = pki.client.cert_identity().fingerprint;
    let (info, key) = keys
        .create(
            KeySpec::new(netproc_auth::PrivilegeSet::empty())
                .functions(["add"])
                .expires_at(expires)
                .binding(netproc_auth::CertBinding::Fingerprint(client_fp)),
        )
        .unwrap();
    let server = start(&pki, "s1", keys).await;
    let c = client(&pki, &server, &key);
    let s = c.server("s1").unwrap();
    let before = netproc_wire::unix_ms(SystemTime::now());
    let me = s.who_am_i().await.unwrap();
    let after = netproc_wire::unix_ms(SystemTime::now());
    assert_eq!(me.principal, info.id);
    assert_eq!(me.key_id.as_deref(), Some(info.id.as_str()));
    assert_eq!(me.key_generation, Some(info.generation));
    assert!(me.privileges.is_empty(), "{me:?}");
    assert_eq!(me.functions, Some(vec!["add".to_owned()]));
    let expiry = me.expires_at_ms.unwrap();
    assert!(
        expiry.abs_diff(netproc_wire::unix_ms(expires)) < 1000,
        "{me:?}"
    );
    assert_eq!(me.cert_binding, Some(format!("sha256:{client_fp}")));
    assert_eq!(me.cert_fingerprint, client_fp.to_string());
    assert_eq!(
        me.cert_not_after_ms,
        netproc_wire::unix_ms(pki.client.cert_identity().not_after)
    );
    assert_eq!(me.server_name, "s1");
    assert!((before..=after).contains(&me.server_time_ms), "{me:?}");
}
