//! TLS hot reload with keep-last-good: server certificates, CRLs, client CA
//! rotation, watched files, a client swapping its certificate.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use netproc_auth::ApiKeyStore;
use netproc_client::{ClientError, TlsFailure};
use netproc_pki::{CaParams, CertificateAuthority, Fingerprint, IssuedCert, LeafParams, Validity};
use netproc_server::{ServerHandle, ServerOptions};
use netproc_wire::ErrorCode;

use crate::identity::*;
use crate::support::*;

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

/// A certificate added to the server's deny list (by key, as credential
/// propagation does): its live session ends with `credential_revoked` at
/// once, its reconnect fails the handshake as revoked, another client's
/// session stays; taken off the list, it connects again.
#[tokio::test]
async fn a_denied_certificate_s_session_ends_and_its_handshake_is_refused() {
    let pki = Pki::new();
    let keys = Arc::new(ApiKeyStore::in_memory());
    let key = key(&keys, "invoke_functions");
    let server = start(&pki, "s1", keys).await;
    let denied_cert = pki.ca.issue(&LeafParams::client("stolen-laptop")).unwrap();
    let victim = only(endpoint_as(&pki, &denied_cert, &server, &key));
    let bystander = client(&pki, &server, &key).server("s1").unwrap();
    victim.session().await.unwrap();
    let (bystander_session, _) = bystander.session().await.unwrap();
    let call = long_call(&victim);
    settle().await;

    let cert = denied_cert.cert_identity();
    let entry = netproc_pki::DeniedCert::Spki(cert.spki_fingerprint);
    server.deny_list().insert(entry.clone(), cert.not_after);
    assert_eq!(
        ended_with(call, Duration::from_secs(2)).await,
        ErrorCode::CredentialRevoked
    );
    let err = victim.call::<i64>("add", (1, 1)).await.unwrap_err();
    assert!(
        matches!(&err, ClientError::Tls { reason: TlsFailure::RejectedByServer(alert), .. } if alert == "CertificateRevoked"),
        "{err:?}"
    );
    assert_eq!(bystander.session().await.unwrap().0, bystander_session);
    assert!(server.deny_list().remove(&entry));
    assert_eq!(victim.call::<i64>("add", (1, 1)).await.unwrap(), 2);
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
            Ok(netproc_server::ReloadMaterial::new(
                identity,
                roots,
                Vec::new(),
            ))
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
