//! Integration tests of netproc-auth: the key store against real certificates.

use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, SystemTime};

use netproc_auth::*;
use netproc_pki::{CaParams, CertIdentity, CertificateAuthority, LeafParams, SubjectAltName};

fn certs() -> (CertIdentity, CertIdentity) {
    let ca = CertificateAuthority::generate(&CaParams::new("ca")).unwrap();
    let a = ca
        .issue(&LeafParams::client("a").san(SubjectAltName::Uri("spiffe://t/a".into())))
        .unwrap();
    let b = ca.issue(&LeafParams::client("b")).unwrap();
    (a.cert_identity().clone(), b.cert_identity().clone())
}

#[test]
fn the_file_holds_hashes_only_is_0600_and_reloads() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keys.json");
    let (a, _) = certs();
    let store = ApiKeyStore::open(&path).unwrap();
    let (info, key) = store
        .create(KeySpec::new("invoke_functions".parse().unwrap()).label("ci"))
        .unwrap();
    let text = std::fs::read_to_string(&path).unwrap();
    let secret = key.expose().rsplit('_').next().unwrap();
    assert!(!text.contains(secret), "secret stored in clear");
    assert!(text.contains(&info.id));
    assert_eq!(
        std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
        0o600
    );

    let reopened = ApiKeyStore::open(&path).unwrap();
    assert_eq!(reopened.list(), store.list());
    let p = reopened
        .verify(key.expose(), &a, SystemTime::now())
        .unwrap();
    assert_eq!(p.key_id.as_deref(), Some(info.id.as_str()));
    assert_eq!(p.key_generation, Some(1));

    // Rotation is persisted: the old secret fails after a reload.
    let new_key = store.rotate(&info.id).unwrap();
    reopened.reload().unwrap();
    assert!(
        reopened
            .verify(key.expose(), &a, SystemTime::now())
            .is_err()
    );
    assert_eq!(
        reopened
            .verify(new_key.expose(), &a, SystemTime::now())
            .unwrap()
            .key_generation,
        Some(2)
    );
}

#[test]
fn a_store_file_readable_by_others_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keys.json");
    ApiKeyStore::open(&path)
        .unwrap()
        .create(KeySpec::default())
        .unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    let err = ApiKeyStore::open(&path).unwrap_err();
    assert!(err.to_string().contains("keys.json"), "{err}");
}

#[test]
fn unknown_id_wrong_secret_and_malformed_all_fail_alike() {
    let (a, _) = certs();
    let store = ApiKeyStore::in_memory();
    let (info, key) = store.create(KeySpec::default()).unwrap();
    let wrong_secret = format!("npk_{}_{}", info.id, "B".repeat(32));
    let unknown_id = format!("npk_zzzzzzzzzzzz_{}", &key.expose()[17..]);
    for bad in [wrong_secret.as_str(), unknown_id.as_str(), "garbage"] {
        let err = store.verify(bad, &a, SystemTime::now()).unwrap_err();
        // The type is the same for all; only the audit reason differs.
        assert!(
            !err.reason.contains(&key.expose()[17..]),
            "reason leaks the secret"
        );
    }
}

#[test]
fn expired_and_revoked_keys_fail() {
    let (a, _) = certs();
    let store = ApiKeyStore::in_memory();
    let soon = SystemTime::now() + Duration::from_secs(60);
    let (info, key) = store.create(KeySpec::default().expires_at(soon)).unwrap();
    assert!(store.verify(key.expose(), &a, SystemTime::now()).is_ok());
    let err = store
        .verify(key.expose(), &a, soon + Duration::from_secs(1))
        .unwrap_err();
    assert!(err.reason.contains("expired"), "{err}");
    store.revoke(&info.id).unwrap();
    assert!(store.verify(key.expose(), &a, SystemTime::now()).is_err());
    assert!(matches!(
        store.revoke(&info.id),
        Err(KeyStoreError::UnknownKey(_))
    ));
}

#[test]
fn bindings_by_fingerprint_and_by_san() {
    let (a, b) = certs();
    let store = ApiKeyStore::in_memory();
    for binding in [
        CertBinding::Fingerprint(a.fingerprint),
        CertBinding::San(SubjectAltName::Uri("spiffe://t/a".into())),
    ] {
        let (_, key) = store.create(KeySpec::default().binding(binding)).unwrap();
        assert!(store.verify(key.expose(), &a, SystemTime::now()).is_ok());
        let err = store
            .verify(key.expose(), &b, SystemTime::now())
            .unwrap_err();
        assert!(err.reason.contains("bound"), "{err}");
    }
}

#[tokio::test]
async fn the_store_and_a_closure_are_both_authenticators() {
    use std::sync::Arc;
    let (a, _) = certs();
    let store = Arc::new(ApiKeyStore::in_memory());
    let (_, key) = store.create(KeySpec::new(PrivilegeSet::all())).unwrap();
    let auths: Vec<Arc<dyn Authenticator>> = vec![
        store.clone(),
        Arc::new(authenticator_fn(|req: AuthRequest| async move {
            Ok(Principal::new(
                req.cert.fingerprint.to_string(),
                PrivilegeSet::empty(),
            ))
        })),
    ];
    for auth in auths {
        let req = AuthRequest::new(
            Credential::ApiKey(key.to_secret()),
            "127.0.0.1:1".parse().unwrap(),
            Arc::new(a.clone()),
        );
        auth.authenticate(req).await.unwrap();
    }
}
