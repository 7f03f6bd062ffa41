//! PEM files: permissions, atomic 0600 writes, and each bad input's own error.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, SystemTime};

use netproc_pki::*;

use crate::support::TestPki;

fn mode(path: &std::path::Path) -> u32 {
    fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[test]
fn saved_keys_are_0600_and_load_back() {
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::new();
    let (crt, key) = (dir.path().join("server.crt"), dir.path().join("server.key"));
    pki.server.save(&crt, &key, false).unwrap();
    assert_eq!(mode(&key), 0o600);
    assert_eq!(mode(&crt), 0o644);
    let id = Identity::load(&crt, &key).unwrap();
    assert_eq!(
        id.cert_identity().fingerprint,
        pki.server.cert_identity().fingerprint
    );
    assert!(!format!("{id:?}").contains("PRIVATE"));
}

#[test]
fn refuses_to_overwrite_unless_asked() {
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::new();
    let (crt, key) = (dir.path().join("c.crt"), dir.path().join("c.key"));
    pki.server.save(&crt, &key, false).unwrap();
    let err = pki.server.save(&crt, &key, false).unwrap_err();
    assert!(matches!(err, PkiError::AlreadyExists { .. }), "{err}");
    // Overwriting an existing key that had loose permissions leaves it 0600.
    fs::set_permissions(&key, fs::Permissions::from_mode(0o644)).unwrap();
    pki.server.save(&crt, &key, true).unwrap();
    assert_eq!(mode(&key), 0o600);
}

#[test]
fn key_readable_by_others_is_refused_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::new();
    let (crt, key) = (dir.path().join("c.crt"), dir.path().join("c.key"));
    pki.server.save(&crt, &key, false).unwrap();
    fs::set_permissions(&key, fs::Permissions::from_mode(0o640)).unwrap();
    let err = Identity::load(&crt, &key).unwrap_err();
    let PkiError::InsecureKeyPermissions { path, mode } = &err else {
        panic!("{err}")
    };
    assert_eq!(path, &key);
    assert_eq!(*mode, 0o640);
    assert!(err.to_string().contains("c.key"), "{err}");
}

#[test]
fn key_of_another_certificate_is_a_mismatch() {
    let pki = TestPki::new();
    let other = pki.client("other");
    let err = Identity::from_pem(pki.server.cert_pem().as_bytes(), other.key_pem().as_bytes())
        .unwrap_err();
    assert!(matches!(err, PkiError::KeyMismatch { .. }), "{err}");
}

#[test]
fn bad_pem_inputs_have_distinct_errors() {
    let pki = TestPki::new();
    let key = pki.server.key_pem();
    let err = Identity::from_pem(b"not pem at all", key.as_bytes()).unwrap_err();
    assert!(matches!(err, PkiError::NoCertificate { .. }), "{err}");
    let err = Identity::from_pem(pki.server.cert_pem().as_bytes(), b"").unwrap_err();
    assert!(matches!(err, PkiError::NoPrivateKey { .. }), "{err}");
    let broken = "-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n";
    let err = Identity::from_pem(broken.as_bytes(), key.as_bytes()).unwrap_err();
    assert!(matches!(err, PkiError::BadPem { .. }), "{err}");
    let err = TrustAnchors::from_pem(b"").unwrap_err();
    assert!(matches!(err, PkiError::NoCertificate { .. }), "{err}");
    let err = TrustAnchors::from_der(vec![]).unwrap_err();
    assert!(matches!(err, PkiError::EmptyTrustStore { .. }), "{err}");
}

#[test]
fn a_leaf_is_not_accepted_as_a_ca() {
    let pki = TestPki::new();
    let err =
        CertificateAuthority::from_pem(&pki.server.cert_pem(), pki.server.key_pem()).unwrap_err();
    assert!(matches!(err, PkiError::NotACa { .. }), "{err}");
}

#[test]
fn a_saved_ca_loads_back_and_keeps_issuing() {
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::new();
    let (crt, key) = (dir.path().join("ca.crt"), dir.path().join("ca.key"));
    pki.ca.save(&crt, &key, false).unwrap();
    let loaded = CertificateAuthority::load(&crt, &key).unwrap();
    assert_eq!(loaded.cert_identity(), pki.ca.cert_identity());
    let leaf = loaded.issue(&LeafParams::client("later")).unwrap();
    assert_eq!(leaf.cert_identity().issuer, pki.ca.cert_identity().subject);
    // Wrong key for the CA certificate.
    let other = CertificateAuthority::generate(&CaParams::new("other")).unwrap();
    let err = CertificateAuthority::from_pem(&pki.ca.cert_pem(), &other.key_pem()).unwrap_err();
    assert!(matches!(err, PkiError::KeyMismatch { .. }), "{err}");
}

#[test]
fn an_expired_crl_is_refused_at_load() {
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::new();
    let now = SystemTime::now();
    let day = Duration::from_secs(86_400);
    let crl = pki
        .ca
        .crl_with_validity(&[], Validity::new(now - 10 * day, now - day))
        .unwrap();
    let path = dir.path().join("old.crl");
    crl.save(&path, false).unwrap();
    let err = Crl::load(&path).unwrap_err();
    assert!(matches!(err, PkiError::ExpiredCrl { .. }), "{err}");
    assert!(err.to_string().contains("old.crl"));

    let fresh = pki.ca.crl(&["0abc"], 1).unwrap();
    let back = Crl::from_pem(fresh.to_pem().as_bytes()).unwrap();
    assert_eq!(back.revoked_serials(), ["0abc"]);
    assert_eq!(back.issuer(), pki.ca.cert_identity().subject);
}

#[test]
fn cert_identity_reports_what_the_certificate_says() {
    let pki = TestPki::new();
    let client = pki
        .ca
        .issue(
            &LeafParams::client("alice")
                .san("uri:spiffe://netproc/alice".parse().unwrap())
                .san("dns:alice.internal".parse().unwrap()),
        )
        .unwrap();
    let id = client.cert_identity();
    assert_eq!(id.common_name.as_deref(), Some("alice"));
    assert_eq!(id.subject, "CN=alice");
    assert_eq!(id.issuer, "CN=test CA");
    assert_eq!(
        id.sans,
        [
            SubjectAltName::Uri("spiffe://netproc/alice".into()),
            SubjectAltName::Dns("alice.internal".into())
        ]
    );
    assert_eq!(id.key_purposes, [KeyPurpose::ClientAuth]);
    assert!(!id.is_ca);
    assert!(id.is_valid_at(SystemTime::now()));
    let lifetime = id.not_after.duration_since(id.not_before).unwrap();
    assert!(
        lifetime > Duration::from_secs(89 * 86_400) && lifetime < Duration::from_secs(91 * 86_400)
    );
    assert_eq!(id.fingerprint, Fingerprint::of(client.certificate()));

    let server = pki.server.cert_identity();
    assert!(
        server
            .sans
            .contains(&SubjectAltName::Ip("127.0.0.1".parse().unwrap()))
    );
    assert_eq!(server.key_purposes, [KeyPurpose::ServerAuth]);
    let ca = pki.ca.cert_identity();
    assert!(ca.is_ca);
    let ca_life = ca.not_after.duration_since(ca.not_before).unwrap();
    assert!(ca_life > Duration::from_secs(3650 * 86_400));
}

/// A leaf as a trust anchor would let anyone with its private key mint
/// certificates the other side accepts.
#[test]
fn a_leaf_is_refused_as_a_trust_anchor_naming_its_file() {
    let pki = TestPki::new();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("alice.crt");
    fs::write(&path, pki.client("alice").cert_pem()).unwrap();
    let err = TrustAnchors::load(&path).unwrap_err();
    assert!(matches!(err, PkiError::NotACa { .. }), "{err}");
    assert!(err.to_string().contains("alice.crt"), "{err}");
    let err = TrustAnchors::from_pem(pki.server.cert_pem().as_bytes()).unwrap_err();
    assert!(matches!(err, PkiError::NotACa { .. }), "{err}");
    // A CA beside a leaf in one file: refused as a whole.
    let both = format!("{}{}", pki.ca.cert_pem(), pki.client("alice").cert_pem());
    let err = TrustAnchors::from_pem(both.as_bytes()).unwrap_err();
    assert!(matches!(err, PkiError::NotACa { .. }), "{err}");
    assert!(TrustAnchors::from_pem(pki.ca.cert_pem().as_bytes()).is_ok());
}

#[test]
fn a_ca_whose_key_usage_lacks_key_cert_sign_is_not_a_trust_anchor() {
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = params.self_signed(&key).unwrap();
    let err = TrustAnchors::from_pem(cert.pem().as_bytes()).unwrap_err();
    assert!(matches!(err, PkiError::NotACa { .. }), "{err}");
    params.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign];
    let cert = params.self_signed(&key).unwrap();
    assert!(TrustAnchors::from_pem(cert.pem().as_bytes()).is_ok());
}
