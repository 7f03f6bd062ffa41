//! A private certificate authority for mutual TLS, and strict rustls
//! configurations built from it.
//!
//! netproc authenticates both ends of every connection with certificates from
//! a private CA. This crate makes and loads that PKI and turns it into rustls
//! configurations that cannot be built insecurely:
//!
//! - **Generate** ([`CertificateAuthority`]): a CA, server certificates (DNS
//!   and IP SANs, serverAuth) and client certificates (CN, URI/DNS SANs,
//!   clientAuth), with random serial numbers and explicit validity (CA 10
//!   years, leaves 90 days by default); CRLs.
//! - **Load and save** PEM ([`Identity`], [`TrustAnchors`], [`Crl`]): keys in
//!   PKCS#8, SEC1 or PKCS#1; a private key file readable by group or others is
//!   refused with an error naming the file; keys are written mode 0600 from
//!   creation. A CA loaded from PEM is checked to be a CA; an identity's key
//!   is checked to match its certificate; an expired CRL is refused.
//! - **Inspect** ([`CertIdentity`], [`Fingerprint`]): subject, SANs, serial,
//!   validity, key purposes, SHA-256 fingerprints of the certificate and of
//!   its public key.
//! - **Configure TLS** ([`server_config`], [`client_config`]): TLS 1.3 only by
//!   default, client certificates required, CRLs, ALPN `netproc/1`, session
//!   resumption and 0-RTT off, optional leaf or SPKI [`Pin`]s. There is no
//!   option that disables verification, and no configuration without a trust
//!   anchor. The crypto provider is ring, selected explicitly.
//!
//! # Example
//!
//! ```
//! use netproc_pki::*;
//!
//! # fn main() -> Result<(), PkiError> {
//! let ca = CertificateAuthority::generate(&CaParams::new("example CA"))?;
//! let server = ca.issue(&LeafParams::server("api", ["localhost", "127.0.0.1"]))?;
//! let client = ca.issue(
//!     &LeafParams::client("alice").san("uri:spiffe://example/alice".parse()?),
//! )?;
//!
//! // Both sides trust the one CA; the server requires a client certificate.
//! let server_tls = server_config(&server.identity()?, &ca.trust_anchors(), &[])?;
//! let client_tls = client_config(&client.identity()?, &ca.trust_anchors(), &[])?;
//! # let _ = (server_tls, client_tls);
//!
//! let who = client.cert_identity();
//! assert_eq!(who.common_name.as_deref(), Some("alice"));
//! assert_eq!(who.key_purposes, [KeyPurpose::ClientAuth]);
//! println!("client fingerprint {}", who.fingerprint);
//! # Ok(()) }
//! ```
#![forbid(unsafe_code)]
#![cfg_attr(not(test), warn(clippy::unwrap_used))]

mod deny;
mod ed25519;
mod enroll;
mod error;

mod fingerprint;
mod generate;
mod identity;
mod pem;
mod provider;
mod tls;

// The public interface.
pub use deny::{DeniedCert, DenyList};
pub use ed25519::{AUTH_EXPORTER_LABEL, Ed25519Key, verify_ed25519};
pub use enroll::{
    CertificateRequest, ENROLL_ALPN, MAX_REQUEST_BYTES, RootMismatch, enroll_client_config,
    enroll_server_config,
};
pub use error::PkiError;

pub use fingerprint::Fingerprint;
pub use generate::{CaParams, CertificateAuthority, IssuedCert, LeafParams, Validity};
pub use identity::{CertIdentity, KeyPurpose, SubjectAltName};
pub use pem::{Crl, Identity, TrustAnchors};
pub use provider::{crypto_provider, random_bytes};
pub use tls::{
    Pin, PinMismatch, TlsOptions, client_config, client_config_with, server_config,
    server_config_denying, server_config_with, service_client_config,
};

pub use pem::{certificate_pem, read_secret_file, write_secret_file};

/// Re-exports of the rustls types that appear in this crate's API.
pub mod rustls {
    pub use rustls::{ClientConfig, ServerConfig};
    pub use rustls_pki_types::{
        CertificateDer, CertificateRevocationListDer, PrivateKeyDer, ServerName,
    };
}
