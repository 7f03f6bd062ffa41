//! The one error type of this crate.

use std::io;
use std::path::PathBuf;

/// Everything that can go wrong in netproc-pki.
///
/// Variants about a file or PEM input carry its `origin`: the path, or a
/// description such as `"<memory: client certificate>"`.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PkiError {
    /// Reading or writing a file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: io::Error,
    },
    /// The file exists and overwriting was not asked for.
    #[error("{path} already exists (use --force / overwrite to replace it)")]
    AlreadyExists {
        /// The file.
        path: PathBuf,
    },
    /// A private key file is readable or writable by group or others.
    #[error(
        "{path}: private key file has mode {mode:o}; it must not be accessible by group or others (chmod 600)"
    )]
    InsecureKeyPermissions {
        /// The file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// The input is not valid PEM.
    #[error("{origin}: invalid PEM: {reason}")]
    BadPem {
        /// Where it came from.
        origin: String,
        /// What was wrong.
        reason: String,
    },
    /// No certificate in the input.
    #[error("{origin}: no certificate found")]
    NoCertificate {
        /// Where it came from.
        origin: String,
    },
    /// No private key in the input.
    #[error("{origin}: no private key found")]
    NoPrivateKey {
        /// Where it came from.
        origin: String,
    },
    /// A certificate could not be parsed.
    #[error("{origin}: invalid certificate: {reason}")]
    BadCertificate {
        /// Where it came from.
        origin: String,
        /// What was wrong.
        reason: String,
    },
    /// The private key is unusable or does not belong to the certificate.
    #[error("{origin}: the private key does not match the certificate")]
    KeyMismatch {
        /// Where it came from.
        origin: String,
    },
    /// A trust store with no certificate: netproc never trusts "anything".
    #[error("{origin}: no trust anchor; refusing to build a TLS configuration that trusts nothing")]
    EmptyTrustStore {
        /// Where it came from.
        origin: String,
    },
    /// A certificate loaded as a CA or trust anchor is not a CA: no
    /// basicConstraints CA:TRUE, or a keyUsage without keyCertSign.
    #[error(
        "{origin}: certificate is not a CA (basicConstraints CA:TRUE, and keyCertSign where keyUsage is present, are required of a trust anchor)"
    )]
    NotACa {
        /// Where it came from.
        origin: String,
    },
    /// A CRL is past its nextUpdate.
    #[error("{origin}: CRL expired at {next_update} (unix seconds); issue a fresh one")]
    ExpiredCrl {
        /// Where it came from.
        origin: String,
        /// Its nextUpdate, in unix seconds.
        next_update: i64,
    },
    /// A CRL could not be parsed or used.
    #[error("{origin}: invalid CRL: {reason}")]
    BadCrl {
        /// Where it came from.
        origin: String,
        /// What was wrong.
        reason: String,
    },
    /// A fingerprint string is not 32 bytes of hex.
    #[error(
        "invalid SHA-256 fingerprint {input:?}: expected 64 hex digits, optionally colon-separated, optionally prefixed sha256:"
    )]
    InvalidFingerprint {
        /// The input (truncated).
        input: String,
    },
    /// A subject alternative name string is not `dns:`, `uri:`, `ip:` or `email:`.
    #[error("invalid subject alternative name {input:?}: expected dns:…, uri:…, ip:… or email:…")]
    InvalidSan {
        /// The input (truncated).
        input: String,
    },
    /// Certificate or CRL generation failed.
    #[error("generating {what}: {reason}")]
    Generate {
        /// What was being generated.
        what: &'static str,
        /// rcgen's reason.
        reason: String,
    },
    /// rustls refused the configuration.
    #[error("TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
    /// The certificate verifier could not be built.
    #[error("TLS verifier: {0}")]
    Verifier(String),
}

pub(crate) fn truncated(s: &str) -> String {
    s.chars().take(80).collect()
}
