// Certificate requests and intermediates: what enrollment needs from the PKI.

use netproc_pki::*;
use rustls_pki_types::pem::PemObject;

#[test]
fn a_request_is_verified_and_only_its_key_is_used() {
    let root = CertificateAuthority::generate(&CaParams::new("root")).unwrap();
    let online = root.issue_intermediate(&CaParams::new("online")).unwrap();
    let (request, key_pem) = CertificateRequest::generate("admin-please").unwrap();
    let again = CertificateRequest::from_der(request.der()).unwrap();
    assert_eq!(again.spki_fingerprint(), request.spki_fingerprint());
    let cert = online
        .issue_for_request(&request, &LeafParams::client("alice"))
        .unwrap();
    let chain = vec![cert, online.certificate().clone()];
    let identity = Identity::from_der(
        chain,
        rustls_pki_types::PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).unwrap(),
    )
    .unwrap();
    let leaf = identity.cert_identity();
    assert_eq!(leaf.common_name.as_deref(), Some("alice"));
    assert_eq!(leaf.spki_fingerprint, request.spki_fingerprint());
    // It chains to the root through the intermediate.
    assert!(
        root.trust_anchors()
            .verify_client(identity.chain(), std::time::SystemTime::now())
            .is_ok()
    );
    // Tampered or oversized requests are refused.
    let mut bad = request.der().to_vec();
    let last = bad.len() - 1;
    bad[last] ^= 1;
    assert!(CertificateRequest::from_der(&bad).is_err());
    assert!(CertificateRequest::from_der(&vec![0u8; MAX_REQUEST_BYTES + 1]).is_err());
    let mut longer = request.der().to_vec();
    longer.push(0);
    assert!(CertificateRequest::from_der(&longer).is_err());
}

proptest::proptest! {
    #[test]
    fn request_parsing_never_panics(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..2048)) {
        let _ = CertificateRequest::from_der(&bytes);
    }
}
