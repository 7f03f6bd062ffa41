//! Per-principal session policy: single active session, the principal cap,
//! certificate principals, a key's own policy.

use std::sync::Arc;
use std::time::Duration;

use netproc_auth::{ApiKeyStore, KeySpec};
use netproc_server::ServerOptions;
use netproc_wire::{ClientMessage, ErrorCode, ServerMessage};

use crate::identity::*;
use crate::support::*;

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
