//! Strict rustls configurations for netproc's mutual TLS.

use std::fmt;
use std::sync::Arc;

use netproc_wire::ALPN_PROTOCOL;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{Resumption, WebPkiServerVerifier};
use rustls::server::{NoServerSessionStorage, WebPkiClientVerifier};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, OtherError, ServerConfig,
    SignatureScheme, SupportedProtocolVersion,
};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};

use crate::error::PkiError;
use crate::provider::crypto_provider;
use crate::{CertIdentity, Crl, DenyList, Fingerprint, Identity, TrustAnchors};

/// Options beyond the secure defaults.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct TlsOptions {
    /// Also accept TLS 1.2 (off by default: TLS 1.3 only).
    pub allow_tls12: bool,
}

impl TlsOptions {
    /// TLS 1.3 only.
    pub fn new() -> TlsOptions {
        TlsOptions::default()
    }

    /// Also accept TLS 1.2, for peers that cannot do 1.3.
    pub fn allow_tls12(mut self, allow: bool) -> TlsOptions {
        self.allow_tls12 = allow;
        self
    }

    fn versions(&self) -> &'static [&'static SupportedProtocolVersion] {
        static TLS13_ONLY: &[&SupportedProtocolVersion] = &[&rustls::version::TLS13];
        static TLS13_AND_12: &[&SupportedProtocolVersion] =
            &[&rustls::version::TLS13, &rustls::version::TLS12];
        if self.allow_tls12 {
            TLS13_AND_12
        } else {
            TLS13_ONLY
        }
    }
}

/// A server's TLS configuration: the server's identity, client certificates
/// **required** and verified against `client_roots` and `crls`.
///
/// - TLS 1.3 only unless [`TlsOptions::allow_tls12`] (see
///   [`server_config_with`]).
/// - ALPN `netproc/1` (a client offering other protocols only is refused by
///   rustls; the server must also refuse a client that offered none).
/// - No session resumption, no tickets, no 0-RTT: a resumed TLS 1.3 session
///   would skip client-certificate verification, bypassing CRLs.
/// - Revocation: end-entity certificates are checked against the CRLs of
///   their issuer; a certificate from a CA with no CRL configured passes, so
///   CAs can be rotated with overlap.
///
/// ```
/// use netproc_pki::{CaParams, CertificateAuthority, LeafParams, server_config};
///
/// let ca = CertificateAuthority::generate(&CaParams::new("ca")).unwrap();
/// let server = ca.issue(&LeafParams::server("s", ["localhost"])).unwrap();
/// let config = server_config(&server.identity().unwrap(), &ca.trust_anchors(), &[]).unwrap();
/// assert_eq!(config.alpn_protocols, [b"netproc/1".to_vec()]);
/// ```
pub fn server_config(
    identity: &Identity,
    client_roots: &TrustAnchors,
    crls: &[Crl],
) -> Result<ServerConfig, PkiError> {
    server_config_with(identity, client_roots, crls, &TlsOptions::default())
}

/// [`server_config`] with options.
pub fn server_config_with(
    identity: &Identity,
    client_roots: &TrustAnchors,
    crls: &[Crl],
    options: &TlsOptions,
) -> Result<ServerConfig, PkiError> {
    server_config_denying(identity, client_roots, crls, &DenyList::new(), options)
}

/// [`server_config_with`], also refusing (as revoked) every client
/// certificate on `deny` — checked at each handshake after the chain and
/// the CRLs, so entries added later take effect without a new config.
pub fn server_config_denying(
    identity: &Identity,
    client_roots: &TrustAnchors,
    crls: &[Crl],
    deny: &DenyList,
    options: &TlsOptions,
) -> Result<ServerConfig, PkiError> {
    let provider = crypto_provider();
    let chain =
        WebPkiClientVerifier::builder_with_provider(client_roots.store(), Arc::clone(&provider))
            .with_crls(crls.iter().map(|c| c.der().clone()))
            .only_check_end_entity_revocation()
            .allow_unknown_revocation_status()
            .build()
            .map_err(|e| PkiError::Verifier(e.to_string()))?;
    let verifier = Arc::new(crate::deny::DenyingVerifier {
        inner: chain,
        deny: deny.clone(),
    });
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(options.versions())?
        .with_client_cert_verifier(verifier)
        .with_single_cert(identity.chain().to_vec(), identity.key())?;
    config.alpn_protocols = vec![ALPN_PROTOCOL.to_vec()];
    config.session_storage = Arc::new(NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    config.max_early_data_size = 0;
    Ok(config)
}

/// Restricts a server certificate beyond chain validation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Pin {
    /// SHA-256 of the leaf certificate's DER.
    Leaf(Fingerprint),
    /// SHA-256 of the leaf's SubjectPublicKeyInfo (survives re-issuing on the same key).
    Spki(Fingerprint),
}

/// The server's certificate chained to a trust anchor but matched no pin.
#[derive(Debug, Clone, thiserror::Error)]
#[error("server certificate {fingerprint} matches none of the configured pins")]
pub struct PinMismatch {
    /// The leaf certificate's fingerprint.
    pub fingerprint: Fingerprint,
}

/// A TLS client configuration for a service that authenticates the server
/// only (a database, a cache): the server's certificate verified against
/// `server_roots` and the name given at connect time; no client
/// certificate; the workspace's provider (ring); TLS 1.3 unless `options`
/// allow 1.2.
pub fn service_client_config(
    server_roots: &TrustAnchors,
    options: &TlsOptions,
) -> Result<ClientConfig, PkiError> {
    Ok(ClientConfig::builder_with_provider(crypto_provider())
        .with_protocol_versions(options.versions())?
        .with_root_certificates(server_roots.store())
        .with_no_client_auth())
}

/// A client's TLS configuration: the client's identity, the server verified
/// against `server_roots` (and the server name given at connect time), and
/// optionally restricted to `pins`.
///
/// TLS 1.3 only by default, ALPN `netproc/1`, no resumption, no 0-RTT.
pub fn client_config(
    identity: &Identity,
    server_roots: &TrustAnchors,
    pins: &[Pin],
) -> Result<ClientConfig, PkiError> {
    client_config_with(identity, server_roots, pins, &TlsOptions::default())
}

/// [`client_config`] with options.
pub fn client_config_with(
    identity: &Identity,
    server_roots: &TrustAnchors,
    pins: &[Pin],
    options: &TlsOptions,
) -> Result<ClientConfig, PkiError> {
    let provider = crypto_provider();
    let webpki =
        WebPkiServerVerifier::builder_with_provider(server_roots.store(), Arc::clone(&provider))
            .build()
            .map_err(|e| PkiError::Verifier(e.to_string()))?;
    let builder =
        ClientConfig::builder_with_provider(provider).with_protocol_versions(options.versions())?;
    let builder = if pins.is_empty() {
        builder.with_webpki_verifier(webpki)
    } else {
        // Not a weakening: the pinned verifier runs full webpki validation
        // first and only adds a check.
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(PinnedVerifier {
                inner: webpki,
                pins: pins.to_vec(),
            }))
    };
    let mut config = builder.with_client_auth_cert(identity.chain().to_vec(), identity.key())?;
    config.alpn_protocols = vec![ALPN_PROTOCOL.to_vec()];
    config.resumption = Resumption::disabled();
    config.enable_early_data = false;
    Ok(config)
}

struct PinnedVerifier {
    inner: Arc<WebPkiServerVerifier>,
    pins: Vec<Pin>,
}

impl fmt::Debug for PinnedVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PinnedVerifier")
            .field("pins", &self.pins)
            .finish()
    }
}

impl ServerCertVerifier for PinnedVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let verified = self.inner.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        )?;
        let leaf = CertIdentity::from_der(end_entity)
            .map_err(|_| rustls::Error::InvalidCertificate(CertificateError::BadEncoding))?;
        let matched = self.pins.iter().any(|pin| match pin {
            Pin::Leaf(fp) => *fp == leaf.fingerprint,
            Pin::Spki(fp) => *fp == leaf.spki_fingerprint,
        });
        if matched {
            Ok(verified)
        } else {
            Err(rustls::Error::InvalidCertificate(CertificateError::Other(
                OtherError(Arc::new(PinMismatch {
                    fingerprint: leaf.fingerprint,
                })),
            )))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}
