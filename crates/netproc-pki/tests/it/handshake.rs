//! The handshake matrix: one success and each way a peer must be refused,
//! asserting the specific rustls error each side sees.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use ::rustls::{AlertDescription, CertificateError, Error as TlsError};
use netproc_pki::*;
use rustls_pki_types::pem::PemObject;

use crate::support::{TestPki, handshake, tls_error};

const DAY: Duration = Duration::from_secs(86_400);

fn server_error(outcome: &crate::support::Outcome) -> &TlsError {
    let err = outcome.server.as_ref().expect_err("server must refuse");
    tls_error(err).unwrap_or_else(|| panic!("not a TLS error: {err:?}"))
}

fn client_error(outcome: &crate::support::Outcome) -> &TlsError {
    let err = outcome.client.as_ref().expect_err("client must fail");
    tls_error(err).unwrap_or_else(|| panic!("not a TLS error: {err:?}"))
}

#[tokio::test]
async fn matching_ca_handshakes_with_tls13_alpn_and_no_resumption() {
    let pki = TestPki::new();
    let client = pki.client("alice");
    let client_cfg = pki.client_config(&client, &[]);
    for _ in 0..2 {
        let out = handshake(pki.server_config(&[]), client_cfg.clone(), "localhost").await;
        out.client.unwrap();
        let side = out.server.unwrap();
        assert_eq!(side.alpn.as_deref(), Some(&b"netproc/1"[..]));
        assert_eq!(side.version, Some(::rustls::ProtocolVersion::TLSv1_3));
        // The second connection of the same client config is a full handshake too.
        assert_eq!(side.handshake_kind, Some(::rustls::HandshakeKind::Full));
        assert_eq!(
            side.peer_fingerprint,
            Some(client.cert_identity().fingerprint)
        );
    }
}

#[tokio::test]
async fn ip_address_server_name_verifies() {
    let pki = TestPki::new();
    let client = pki.client("alice");
    let out = handshake(
        pki.server_config(&[]),
        pki.client_config(&client, &[]),
        "127.0.0.1",
    )
    .await;
    out.client.unwrap();
}

#[tokio::test]
async fn client_cert_from_another_ca_is_refused() {
    let pki = TestPki::new();
    let rogue_ca = CertificateAuthority::generate(&CaParams::new("rogue CA")).unwrap();
    let rogue = rogue_ca.issue(&LeafParams::client("mallory")).unwrap();
    let out = handshake(
        pki.server_config(&[]),
        pki.client_config(&rogue, &[]),
        "localhost",
    )
    .await;
    assert!(matches!(
        server_error(&out),
        TlsError::InvalidCertificate(CertificateError::UnknownIssuer)
    ));
    assert!(matches!(
        client_error(&out),
        TlsError::AlertReceived(AlertDescription::UnknownCA)
    ));
}

#[tokio::test]
async fn no_client_cert_is_refused() {
    let pki = TestPki::new();
    let mut roots = ::rustls::RootCertStore::empty();
    roots.add(pki.ca.certificate().clone()).unwrap();
    let mut client_cfg = ::rustls::ClientConfig::builder_with_provider(crypto_provider())
        .with_protocol_versions(&[&::rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    client_cfg.alpn_protocols = vec![b"netproc/1".to_vec()];
    let out = handshake(pki.server_config(&[]), client_cfg, "localhost").await;
    assert!(matches!(
        server_error(&out),
        TlsError::NoCertificatesPresented
    ));
    assert!(matches!(
        client_error(&out),
        TlsError::AlertReceived(AlertDescription::CertificateRequired)
    ));
}

#[tokio::test]
async fn expired_client_cert_is_refused() {
    let pki = TestPki::new();
    let now = SystemTime::now();
    let expired = pki
        .ca
        .issue(&LeafParams::client("old").validity(Validity::new(now - 30 * DAY, now - DAY)))
        .unwrap();
    let out = handshake(
        pki.server_config(&[]),
        pki.client_config(&expired, &[]),
        "localhost",
    )
    .await;
    assert!(
        matches!(
            server_error(&out),
            TlsError::InvalidCertificate(CertificateError::ExpiredContext { .. })
        ),
        "{:?}",
        server_error(&out)
    );
    assert!(matches!(
        client_error(&out),
        TlsError::AlertReceived(AlertDescription::CertificateExpired)
    ));
}

#[tokio::test]
async fn not_yet_valid_client_cert_is_refused() {
    let pki = TestPki::new();
    let now = SystemTime::now();
    let future = pki
        .ca
        .issue(&LeafParams::client("future").validity(Validity::new(now + DAY, now + 30 * DAY)))
        .unwrap();
    let out = handshake(
        pki.server_config(&[]),
        pki.client_config(&future, &[]),
        "localhost",
    )
    .await;
    assert!(
        matches!(
            server_error(&out),
            TlsError::InvalidCertificate(CertificateError::NotValidYetContext { .. })
        ),
        "{:?}",
        server_error(&out)
    );
    assert!(matches!(client_error(&out), TlsError::AlertReceived(_)));
}

#[tokio::test]
async fn client_cert_with_only_server_auth_is_refused() {
    let pki = TestPki::new();
    let wrong = pki
        .ca
        .issue(&LeafParams::client("wrong-eku").purposes(vec![KeyPurpose::ServerAuth]))
        .unwrap();
    let out = handshake(
        pki.server_config(&[]),
        pki.client_config(&wrong, &[]),
        "localhost",
    )
    .await;
    assert!(
        matches!(
            server_error(&out),
            TlsError::InvalidCertificate(
                CertificateError::InvalidPurpose | CertificateError::InvalidPurposeContext { .. }
            )
        ),
        "{:?}",
        server_error(&out)
    );
    assert!(matches!(client_error(&out), TlsError::AlertReceived(_)));
}

#[tokio::test]
async fn revoked_client_cert_is_refused_and_others_pass() {
    let pki = TestPki::new();
    let revoked = pki.client("revoked");
    let good = pki.client("good");
    let crl = pki
        .ca
        .crl(&[revoked.cert_identity().serial.as_str()], 7)
        .unwrap();
    let out = handshake(
        pki.server_config(std::slice::from_ref(&crl)),
        pki.client_config(&revoked, &[]),
        "localhost",
    )
    .await;
    assert!(matches!(
        server_error(&out),
        TlsError::InvalidCertificate(CertificateError::Revoked)
    ));
    assert!(matches!(
        client_error(&out),
        TlsError::AlertReceived(AlertDescription::CertificateRevoked)
    ));
    let out = handshake(
        pki.server_config(&[crl]),
        pki.client_config(&good, &[]),
        "localhost",
    )
    .await;
    out.client.unwrap();
}

#[tokio::test]
async fn a_ca_without_a_crl_passes_so_cas_can_rotate() {
    // Trust two CAs, with a CRL for the first only.
    let pki = TestPki::new();
    let new_ca = CertificateAuthority::generate(&CaParams::new("new CA")).unwrap();
    let from_new = new_ca.issue(&LeafParams::client("rotated")).unwrap();
    let crl = pki.ca.crl(&[], 7).unwrap();
    let roots = pki.ca.trust_anchors().merged(&new_ca.trust_anchors());
    let server = server_config(&pki.server.identity().unwrap(), &roots, &[crl]).unwrap();
    let client =
        client_config(&from_new.identity().unwrap(), &pki.ca.trust_anchors(), &[]).unwrap();
    handshake(server, client, "localhost").await.client.unwrap();
}

#[tokio::test]
async fn server_name_mismatch_is_refused_by_the_client() {
    let pki = TestPki::new();
    let client = pki.client("alice");
    let out = handshake(
        pki.server_config(&[]),
        pki.client_config(&client, &[]),
        "other.example",
    )
    .await;
    assert!(
        matches!(
            client_error(&out),
            TlsError::InvalidCertificate(CertificateError::NotValidForNameContext { .. })
        ),
        "{:?}",
        client_error(&out)
    );
    assert!(out.server.is_err());
}

#[tokio::test]
async fn pins_restrict_the_server_on_top_of_chain_validation() {
    let pki = TestPki::new();
    let client = pki.client("alice");
    let server_id = pki.server.cert_identity();

    // Matching leaf pin, matching SPKI pin: accepted.
    for pin in [
        Pin::Leaf(server_id.fingerprint),
        Pin::Spki(server_id.spki_fingerprint),
    ] {
        let out = handshake(
            pki.server_config(&[]),
            pki.client_config(&client, &[pin]),
            "localhost",
        )
        .await;
        out.client.unwrap();
    }

    // A pin for another certificate: refused with a typed PinMismatch.
    let other = Pin::Leaf(Fingerprint::of(b"another certificate"));
    let out = handshake(
        pki.server_config(&[]),
        pki.client_config(&client, &[other]),
        "localhost",
    )
    .await;
    let TlsError::InvalidCertificate(CertificateError::Other(other)) = client_error(&out) else {
        panic!("{:?}", client_error(&out))
    };
    let mismatch = Arc::clone(&other.0);
    let mismatch = mismatch.downcast_ref::<PinMismatch>().expect("PinMismatch");
    assert_eq!(mismatch.fingerprint, server_id.fingerprint);
}

#[tokio::test]
async fn tls12_only_client_is_refused_unless_allowed() {
    let pki = TestPki::new();
    let client = pki.client("alice");
    let id = client.identity().unwrap();
    let mut roots = ::rustls::RootCertStore::empty();
    roots.add(pki.ca.certificate().clone()).unwrap();
    let tls12_client = ::rustls::ClientConfig::builder_with_provider(crypto_provider())
        .with_protocol_versions(&[&::rustls::version::TLS12])
        .unwrap()
        .with_root_certificates(roots)
        .with_client_auth_cert(
            id.chain().to_vec(),
            rustls_pki_types::PrivateKeyDer::from_pem_slice(client.key_pem().as_bytes()).unwrap(),
        )
        .unwrap();
    let out = handshake(pki.server_config(&[]), tls12_client.clone(), "localhost").await;
    assert!(
        matches!(server_error(&out), TlsError::PeerIncompatible(_)),
        "{:?}",
        server_error(&out)
    );

    let lenient = server_config_with(
        &pki.server.identity().unwrap(),
        &pki.ca.trust_anchors(),
        &[],
        &TlsOptions::new().allow_tls12(true),
    )
    .unwrap();
    let out = handshake(lenient, tls12_client, "localhost").await;
    out.client.unwrap();
    assert_eq!(
        out.server.unwrap().version,
        Some(::rustls::ProtocolVersion::TLSv1_2)
    );
}

/// A deny list refuses a certificate at the handshake (as revoked) by
/// serial or by key, entries added after the config was built included;
/// other certificates pass; removing the entry lets it in again.
#[tokio::test]
async fn a_denied_client_cert_is_refused_by_serial_or_key_and_others_pass() {
    use netproc_pki::{DeniedCert, DenyList, TlsOptions, server_config_denying};
    let pki = TestPki::new();
    let denied = pki.client("denied");
    let good = pki.client("good");
    let deny = DenyList::new();
    let config = || {
        server_config_denying(
            &pki.server.identity().unwrap(),
            &pki.ca.trust_anchors(),
            &[],
            &deny,
            &TlsOptions::default(),
        )
        .unwrap()
    };
    // Built before the entry exists: the entry still applies.
    let built_before = config();
    let cert = denied.cert_identity().clone();
    for entry in DeniedCert::of(&cert) {
        deny.replace([(entry.clone(), cert.not_after)]);
        for server in [built_before.clone(), config()] {
            let out = handshake(server, pki.client_config(&denied, &[]), "localhost").await;
            assert!(
                matches!(
                    server_error(&out),
                    TlsError::InvalidCertificate(CertificateError::Revoked)
                ),
                "{entry:?}"
            );
            let out = handshake(config(), pki.client_config(&good, &[]), "localhost").await;
            out.client.unwrap();
        }
        assert!(deny.remove(&entry));
    }
    let out = handshake(config(), pki.client_config(&denied, &[]), "localhost").await;
    out.client.unwrap();
}

/// The list is bounded by expiry: an entry already expired is not kept,
/// one that expires is pruned; listeners hear of entries added only.
#[test]
fn deny_entries_last_until_the_certificate_expires() {
    use netproc_pki::{DeniedCert, DenyList};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::{Duration, SystemTime};
    let list = DenyList::new();
    let heard = std::sync::Arc::new(AtomicUsize::new(0));
    let h = std::sync::Arc::clone(&heard);
    list.on_added(move |added| {
        h.fetch_add(added.len(), Ordering::Relaxed);
    });
    let fp = netproc_pki::Fingerprint::of(b"key");
    let now = SystemTime::now();
    list.insert(DeniedCert::Spki(fp), now - Duration::from_secs(1));
    assert!(list.is_empty(), "an expired certificate needs no entry");
    list.insert(DeniedCert::Spki(fp), now + Duration::from_secs(60));
    list.insert(DeniedCert::Spki(fp), now + Duration::from_secs(60));
    assert_eq!(heard.load(Ordering::Relaxed), 1, "told once, when added");
    assert_eq!(list.prune(now + Duration::from_secs(61)), 1);
    assert!(list.is_empty());
}
