//! Integration tests of netproc-auth: the key store against real certificates.

use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, SystemTime};

use netproc_auth::*;
use netproc_pki::{CertIdentity, LeafParams, SubjectAltName};
use netproc_testkit::TestPki;

fn certs() -> (CertIdentity, CertIdentity) {
    // The workspace's test CA; `a` needs a URI SAN of its own.
    let pki = TestPki::new();
    let a = pki
        .ca
        .issue(&LeafParams::client("a").san(SubjectAltName::Uri("spiffe://t/a".into())))
        .unwrap();
    (
        a.cert_identity().clone(),
        pki.client.cert_identity().clone(),
    )
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
fn bindings_by_fingerprint_by_san_and_by_key() {
    let (a, b) = certs();
    let store = ApiKeyStore::in_memory();
    for binding in [
        CertBinding::Fingerprint(a.fingerprint),
        CertBinding::San(SubjectAltName::Uri("spiffe://t/a".into())),
        CertBinding::Spki(a.spki_fingerprint),
    ] {
        // Each binding reads back from its text form.
        assert_eq!(binding.to_string().parse::<CertBinding>().unwrap(), binding);
        let (_, key) = store.create(KeySpec::default().binding(binding)).unwrap();
        assert!(store.verify(key.expose(), &a, SystemTime::now()).is_ok());
        let err = store
            .verify(key.expose(), &b, SystemTime::now())
            .unwrap_err();
        assert!(err.reason.contains("bound"), "{err}");
    }
    // Malformed key bindings are refused.
    assert!("spki:00".parse::<CertBinding>().is_err() && "SPKI:".parse::<CertBinding>().is_err());
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

fn changes_of(store: &ApiKeyStore) -> std::sync::Arc<std::sync::Mutex<Vec<KeyChange>>> {
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let sink = std::sync::Arc::clone(&seen);
    store.on_change(move |c| sink.lock().unwrap().push(c.clone()));
    seen
}

fn propagated(id: &str, key: &ApiKey, hash: [u8; 32], generation: u64) -> PropagatedKey {
    assert!(key.expose().starts_with(&format!("npk_{id}_")));
    PropagatedKey::new(
        id,
        PropagatedSecret::ApiKey {
            secret_sha256: hash,
        },
        generation,
        "invoke_functions".parse().unwrap(),
    )
}

#[test]
fn propagated_keys_authenticate_by_hash_and_stay_out_of_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keys.json");
    let (a, _) = certs();
    let store = ApiKeyStore::open(&path).unwrap();
    let (local, _) = store.create(KeySpec::default()).unwrap();
    let (key, hash) = ApiKey::generate("billing-service").unwrap();
    store
        .apply_propagated(PropagatedChange::Upsert(propagated(
            "billing-service",
            &key,
            hash,
            1,
        )))
        .unwrap();
    let p = store.verify(key.expose(), &a, SystemTime::now()).unwrap();
    assert_eq!(p.key_generation, Some(1));
    assert!(store.get("billing-service").unwrap().propagated);
    // Saved changes and reloads leave it alone.
    store.create(KeySpec::default()).unwrap();
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(!text.contains("billing-service"));
    store.reload().unwrap();
    assert!(store.verify(key.expose(), &a, SystemTime::now()).is_ok());
    // A local id cannot be taken over, and nothing is applied.
    let (other, other_hash) = ApiKey::generate(&local.id).unwrap();
    let conflict = store.apply_propagated(PropagatedChange::Upsert(propagated(
        &local.id, &other, other_hash, 1,
    )));
    assert_eq!(conflict, Err(PropagationError::Conflict(local.id.clone())));
    assert!(store.verify(other.expose(), &a, SystemTime::now()).is_err());
    assert!(ApiKey::generate("Not_Valid").is_err());
}

#[test]
fn propagated_changes_report_what_sessions_must_do() {
    let (a, _) = certs();
    let store = ApiKeyStore::in_memory();
    let seen = changes_of(&store);
    let (k1, h1) = ApiKey::generate("svc").unwrap();
    let up = |k: PropagatedKey| store.apply_propagated(PropagatedChange::Upsert(k)).unwrap();
    up(propagated("svc", &k1, h1, 1));
    up(propagated("svc", &k1, h1, 1)); // idempotent: no change reported
    assert!(seen.lock().unwrap().is_empty());

    // Rotation with an overlap window: both secrets work, nobody is closed.
    let (k2, h2) = ApiKey::generate("svc").unwrap();
    let mut rotated = propagated("svc", &k2, h2, 2);
    let until = SystemTime::now() + Duration::from_secs(60);
    rotated.previous = Some(PreviousSecret {
        secret_sha256: h1,
        generation: 1,
        valid_until_ms: until
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64,
    });
    up(rotated);
    assert!(seen.lock().unwrap().is_empty());
    let old = store.verify(k1.expose(), &a, SystemTime::now()).unwrap();
    assert_eq!(old.key_generation, Some(1));
    assert!(store.verify(k2.expose(), &a, SystemTime::now()).is_ok());
    // After the window the old secret fails, even before expiry is applied.
    assert!(store.verify(k1.expose(), &a, until).is_err());
    assert!(store.expire_previous("svc", 1));
    assert!(store.verify(k1.expose(), &a, SystemTime::now()).is_err());
    assert_eq!(
        seen.lock().unwrap().drain(..).collect::<Vec<_>>(),
        [KeyChange::Rotated {
            id: "svc".into(),
            old_generation: 1
        }]
    );

    // Rotation without overlap: generation 2 ends at once.
    let (k3, h3) = ApiKey::generate("svc").unwrap();
    up(propagated("svc", &k3, h3, 3));
    assert!(store.verify(k2.expose(), &a, SystemTime::now()).is_err());
    assert_eq!(
        seen.lock().unwrap().drain(..).collect::<Vec<_>>(),
        [KeyChange::Rotated {
            id: "svc".into(),
            old_generation: 2
        }]
    );

    // A privilege change closes every session of the key.
    let mut changed = propagated("svc", &k3, h3, 3);
    changed.privileges = "admin_privileges".parse().unwrap();
    up(changed);
    assert_eq!(
        seen.lock().unwrap().drain(..).collect::<Vec<_>>(),
        [KeyChange::Changed { id: "svc".into() }]
    );

    // A snapshot without it revokes it; deleting again is a no-op.
    let (k4, h4) = ApiKey::generate("other").unwrap();
    store
        .apply_propagated(PropagatedChange::Replace(vec![propagated(
            "other", &k4, h4, 1,
        )]))
        .unwrap();
    assert_eq!(
        seen.lock().unwrap().drain(..).collect::<Vec<_>>(),
        [KeyChange::Revoked { id: "svc".into() }]
    );
    assert!(store.verify(k3.expose(), &a, SystemTime::now()).is_err());
    store
        .apply_propagated(PropagatedChange::Delete { id: "svc".into() })
        .unwrap();
    assert!(seen.lock().unwrap().is_empty());
    assert_eq!(store.propagated_keys().len(), 1);
}

/// An expiry with a sub-second part is kept to the millisecond: the key is
/// valid until that instant, not until the whole second before it.
#[test]
fn a_key_expiry_keeps_its_milliseconds_through_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keys.json");
    let (a, _) = certs();
    let store = ApiKeyStore::open(&path).unwrap();
    let expiry = SystemTime::UNIX_EPOCH + Duration::from_millis(4_102_444_800_900);
    let (info, key) = store
        .create(KeySpec::new("invoke_functions".parse().unwrap()).expires_at(expiry))
        .unwrap();
    assert_eq!(info.expires_at_ms, Some(4_102_444_800_900));
    let reopened = ApiKeyStore::open(&path).unwrap();
    let just_before = expiry - Duration::from_millis(1);
    let p = reopened.verify(key.expose(), &a, just_before).unwrap();
    assert_eq!(p.expires_at, Some(expiry));
    assert!(reopened.verify(key.expose(), &a, expiry).is_err());
}
