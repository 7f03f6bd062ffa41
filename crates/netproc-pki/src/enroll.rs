//! What an enrollment service and its clients need from the PKI: a
//! certificate request (made where the key lives, verified by the CA), and
//! the enrollment listener's TLS — its own ALPN, a client certificate
//! optional (presented only to renew) — kept apart from the RPC listener's,
//! which always requires one.

use std::fmt;
use std::sync::Arc;

use rcgen::{CertificateParams, DistinguishedName, DnType, KeyPair, SubjectPublicKeyInfo};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{Resumption, WebPkiServerVerifier};
use rustls::server::NoServerSessionStorage;
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, OtherError, ServerConfig,
    SignatureScheme,
};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use zeroize::Zeroizing;

use crate::error::PkiError;
use crate::provider::crypto_provider;
use crate::{Fingerprint, Identity, TrustAnchors};

/// The enrollment listener's ALPN protocol: never `netproc/1`, so neither
/// listener accepts the other's clients.
pub const ENROLL_ALPN: &[u8] = b"netproc-enroll/1";

/// The largest certificate request accepted (DER bytes).
pub const MAX_REQUEST_BYTES: usize = 8 * 1024;

/// A certificate signing request (PKCS#10) whose self-signature verified:
/// its holder has the private key. Only the public key is used when a
/// certificate is issued for it; the subject and any requested
/// extensions are ignored.
#[derive(Clone)]
pub struct CertificateRequest {
    der: Vec<u8>,
    spki_der: Vec<u8>,
    public_key: SubjectPublicKeyInfo,
}

impl fmt::Debug for CertificateRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertificateRequest")
            .field("spki_fingerprint", &self.spki_fingerprint())
            .finish()
    }
}

impl CertificateRequest {
    /// Makes a fresh ECDSA P-256 key and a request for it (the subject
    /// says `common_name`, for humans; the CA decides what is issued).
    /// Returns the request and the key (PKCS#8 PEM), which never needs to
    /// leave this host.
    pub fn generate(
        common_name: &str,
    ) -> Result<(CertificateRequest, Zeroizing<String>), PkiError> {
        let key = KeyPair::generate().map_err(|e| PkiError::Generate {
            what: "request key",
            reason: e.to_string(),
        })?;
        let request = CertificateRequest::for_key(common_name, &key)?;
        Ok((request, Zeroizing::new(key.serialize_pem())))
    }

    /// A request for an existing key (PEM): to renew without re-keying.
    pub fn for_key_pem(common_name: &str, key_pem: &str) -> Result<CertificateRequest, PkiError> {
        let key = KeyPair::from_pem(key_pem).map_err(|e| PkiError::BadPem {
            origin: "<memory: key>".into(),
            reason: e.to_string(),
        })?;
        CertificateRequest::for_key(common_name, &key)
    }

    fn for_key(common_name: &str, key: &KeyPair) -> Result<CertificateRequest, PkiError> {
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, common_name);
        params.distinguished_name = dn;
        let csr = params
            .serialize_request(key)
            .map_err(|e| PkiError::Generate {
                what: "certificate request",
                reason: e.to_string(),
            })?;
        CertificateRequest::from_der(csr.der())
    }

    /// Parses a request and verifies its self-signature. Refused: more
    /// than [`MAX_REQUEST_BYTES`], trailing bytes, a bad signature, a key
    /// type other than ECDSA P-256 / P-384 or Ed25519.
    pub fn from_der(der: &[u8]) -> Result<CertificateRequest, PkiError> {
        use x509_parser::prelude::FromDer;
        let bad = |reason: &str| PkiError::BadCertificate {
            origin: "<certificate request>".into(),
            reason: reason.to_owned(),
        };
        if der.len() > MAX_REQUEST_BYTES {
            return Err(bad("larger than 8 KiB"));
        }
        let (rest, csr) =
            x509_parser::certification_request::X509CertificationRequest::from_der(der)
                .map_err(|_| bad("not a PKCS#10 certificate request"))?;
        if !rest.is_empty() {
            return Err(bad("trailing bytes"));
        }
        csr.verify_signature()
            .map_err(|_| bad("its signature does not verify"))?;
        let spki_der = csr.certification_request_info.subject_pki.raw.to_vec();
        let public_key = SubjectPublicKeyInfo::from_der(&spki_der)
            .map_err(|_| bad("an unsupported key type (ECDSA P-256, P-384 or Ed25519 only)"))?;
        Ok(CertificateRequest {
            der: der.to_vec(),
            spki_der,
            public_key,
        })
    }

    /// The request's DER.
    pub fn der(&self) -> &[u8] {
        &self.der
    }

    /// SHA-256 of the requested key's SubjectPublicKeyInfo: what a pairing
    /// approves, and what a `spki:` key binding names.
    pub fn spki_fingerprint(&self) -> Fingerprint {
        Fingerprint::of(&self.spki_der)
    }

    pub(crate) fn public_key(&self) -> &SubjectPublicKeyInfo {
        &self.public_key
    }
}

/// The enrollment listener's TLS: the service's identity (its chain up to
/// the root, so clients can pin the root), ALPN [`ENROLL_ALPN`], TLS 1.3
/// only, no resumption; a client certificate is **optional** and, when
/// presented, verified against `client_roots` (renewal) — for clientAuth
/// or serverAuth, since servers renew with their own certificates. This function
/// cannot make a configuration with the RPC ALPN, and the RPC listener's
/// functions have no option to make client certificates optional.
pub fn enroll_server_config(
    identity: &Identity,
    client_roots: &TrustAnchors,
) -> Result<ServerConfig, PkiError> {
    let provider = crypto_provider();
    let verifier = Arc::new(RenewalVerifier {
        roots: client_roots.store(),
        provider: Arc::clone(&provider),
    });
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(identity.chain().to_vec(), identity.key())?;
    config.alpn_protocols = vec![ENROLL_ALPN.to_vec()];
    config.session_storage = Arc::new(NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    config.max_early_data_size = 0;
    Ok(config)
}

/// The enrollment listener's client verifier: a certificate is optional;
/// when presented it must chain to the roots and be valid now, for
/// clientAuth **or serverAuth** — a server renews with its own
/// certificate, which is serverAuth only. (The RPC listener's verifier
/// accepts clientAuth only.)
struct RenewalVerifier {
    roots: Arc<rustls::RootCertStore>,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl fmt::Debug for RenewalVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RenewalVerifier").finish_non_exhaustive()
    }
}

fn webpki_error(e: webpki::Error) -> rustls::Error {
    rustls::Error::InvalidCertificate(match e {
        webpki::Error::CertExpired { .. } => CertificateError::Expired,
        webpki::Error::CertNotValidYet { .. } => CertificateError::NotValidYet,
        webpki::Error::UnknownIssuer => CertificateError::UnknownIssuer,
        webpki::Error::InvalidSignatureForPublicKey => CertificateError::BadSignature,
        webpki::Error::RequiredEkuNotFoundContext(_) => CertificateError::InvalidPurpose,
        _ => CertificateError::BadEncoding,
    })
}

impl rustls::server::danger::ClientCertVerifier for RenewalVerifier {
    fn root_hint_subjects(&self) -> &[rustls::DistinguishedName] {
        &[]
    }

    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<rustls::server::danger::ClientCertVerified, rustls::Error> {
        let cert = webpki::EndEntityCert::try_from(end_entity).map_err(webpki_error)?;
        let algs = self.provider.signature_verification_algorithms.all;
        let verify = |usage| {
            cert.verify_for_usage(
                algs,
                &self.roots.roots,
                intermediates,
                now,
                usage,
                None,
                None,
            )
            .map(drop)
        };
        verify(webpki::KeyUsage::client_auth())
            .or_else(|e| verify(webpki::KeyUsage::server_auth()).map_err(|_| e))
            .map_err(webpki_error)?;
        Ok(rustls::server::danger::ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// An enrollment client's TLS: the service's chain must include a root
/// whose SHA-256 fingerprint is one of `roots` (given out of band with the
/// token; several during a CA rotation), and verify to it for the name
/// given at connect time; any other root is refused. With `identity`, the
/// client presents it (renewal).
pub fn enroll_client_config(
    roots: &[Fingerprint],
    identity: Option<&Identity>,
) -> Result<ClientConfig, PkiError> {
    let provider = crypto_provider();
    let builder = ClientConfig::builder_with_provider(Arc::clone(&provider))
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(RootPinVerifier {
            roots: roots.to_vec(),
            provider: Arc::clone(&provider),
        }));
    let mut config = match identity {
        Some(id) => builder.with_client_auth_cert(id.chain().to_vec(), id.key())?,
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![ENROLL_ALPN.to_vec()];
    config.resumption = Resumption::disabled();
    config.enable_early_data = false;
    Ok(config)
}

/// The service's chain carried no root with a pinned fingerprint.
#[derive(Debug, Clone, thiserror::Error)]
#[error("the enrollment service's chain has no root with a pinned fingerprint")]
pub struct RootMismatch {
    /// The pinned fingerprints.
    pub expected: Vec<Fingerprint>,
}

/// Full webpki validation against the one root of the presented chain
/// whose fingerprint is pinned — nothing weaker than a configured anchor.
struct RootPinVerifier {
    roots: Vec<Fingerprint>,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl fmt::Debug for RootPinVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RootPinVerifier")
            .field("roots", &self.roots)
            .finish()
    }
}

impl ServerCertVerifier for RootPinVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let mismatch = || {
            rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(
                RootMismatch {
                    expected: self.roots.clone(),
                },
            ))))
        };
        let root = intermediates
            .iter()
            .find(|c| self.roots.contains(&Fingerprint::of(c)))
            .ok_or_else(mismatch)?;
        let anchors =
            TrustAnchors::from_der(vec![root.clone().into_owned()]).map_err(|_| mismatch())?;
        let inner = WebPkiServerVerifier::builder_with_provider(
            anchors.store(),
            Arc::clone(&self.provider),
        )
        .build()
        .map_err(|_| mismatch())?;
        inner.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}
