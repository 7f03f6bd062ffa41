//! PEM input and output: identities, trust anchors, CRLs and safe files.

use std::fmt;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use rustls::RootCertStore;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer};
use x509_parser::prelude::FromDer;
use x509_parser::revocation_list::CertificateRevocationList;
use zeroize::Zeroizing;

use crate::CertIdentity;
use crate::error::PkiError;
use crate::identity::unix_to_system;
use crate::provider::crypto_provider;

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> PkiError + '_ {
    move |source| PkiError::Io {
        path: path.to_owned(),
        source,
    }
}

fn origin_of(path: &Path) -> String {
    path.display().to_string()
}

/// Reads a file holding a secret (a private key, a key store), refusing one
/// that group or others may access, with an error naming the file and its mode.
pub fn read_secret_file(path: &Path) -> Result<Zeroizing<Vec<u8>>, PkiError> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = fs::metadata(path)
            .map_err(io_err(path))?
            .permissions()
            .mode();
        if mode & 0o077 != 0 {
            return Err(PkiError::InsecureKeyPermissions {
                path: path.to_owned(),
                mode: mode & 0o777,
            });
        }
    }
    fs::read(path).map(Zeroizing::new).map_err(io_err(path))
}

/// Writes a secret file atomically (a temporary file in the same directory,
/// then a rename), created with mode 0600 from the start; fails if the file
/// exists and `overwrite` is false.
pub fn write_secret_file(path: &Path, contents: &[u8], overwrite: bool) -> Result<(), PkiError> {
    write_file(path, contents, true, overwrite)
}

/// Writes `contents` to `path` atomically (a temporary file in the same
/// directory, then a rename). A private file is created with mode 0600 from
/// the start, never chmod-ed afterwards.
pub(crate) fn write_file(
    path: &Path,
    contents: &[u8],
    private: bool,
    overwrite: bool,
) -> Result<(), PkiError> {
    if !overwrite && path.exists() {
        return Err(PkiError::AlreadyExists {
            path: path.to_owned(),
        });
    }
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_owned(),
        _ => PathBuf::from("."),
    };
    let name = path
        .file_name()
        .map_or_else(|| "netproc".into(), |n| n.to_string_lossy().into_owned());
    let mut nonce = [0u8; 8];
    crate::random_bytes(&mut nonce)?;
    let tmp = dir.join(format!(".{name}.{}.tmp", hex::encode(nonce)));
    let mut options = fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(if private { 0o600 } else { 0o644 });
    }
    #[cfg(not(unix))]
    let _ = private;
    let result = (|| {
        let mut file = options.open(&tmp)?;
        file.write_all(contents)?;
        file.sync_all()?;
        fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result.map_err(io_err(path))
}

pub(crate) fn parse_certs(
    pem: &[u8],
    origin: &str,
) -> Result<Vec<CertificateDer<'static>>, PkiError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| PkiError::BadPem {
            origin: origin.to_owned(),
            reason: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(PkiError::NoCertificate {
            origin: origin.to_owned(),
        });
    }
    Ok(certs)
}

fn parse_key(pem: &[u8], origin: &str) -> Result<PrivateKeyDer<'static>, PkiError> {
    PrivateKeyDer::from_pem_slice(pem).map_err(|e| match e {
        rustls_pki_types::pem::Error::NoItemsFound => PkiError::NoPrivateKey {
            origin: origin.to_owned(),
        },
        other => PkiError::BadPem {
            origin: origin.to_owned(),
            reason: other.to_string(),
        },
    })
}

/// A certificate chain and its private key: who this side is in a TLS
/// handshake.
///
/// The key is checked against the leaf certificate when the identity is made.
/// `Debug` never shows the key.
pub struct Identity {
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    leaf: CertIdentity,
}

impl Identity {
    /// From PEM text: one or more certificates (leaf first), and a private
    /// key in PKCS#8, SEC1 or PKCS#1 form.
    pub fn from_pem(cert_pem: &[u8], key_pem: &[u8]) -> Result<Identity, PkiError> {
        Self::from_pem_with_origin(cert_pem, key_pem, "<memory: identity>")
    }

    /// From a certificate file and a private key file. The key file must not
    /// be accessible by group or others.
    pub fn load(
        cert_path: impl AsRef<Path>,
        key_path: impl AsRef<Path>,
    ) -> Result<Identity, PkiError> {
        let (cert_path, key_path) = (cert_path.as_ref(), key_path.as_ref());
        let cert_pem = fs::read(cert_path).map_err(io_err(cert_path))?;
        let key_pem = read_secret_file(key_path)?;
        let chain = parse_certs(&cert_pem, &origin_of(cert_path))?;
        let key = parse_key(&key_pem, &origin_of(key_path))?;
        Self::from_parts(chain, key, &origin_of(key_path))
    }

    pub(crate) fn from_pem_with_origin(
        cert_pem: &[u8],
        key_pem: &[u8],
        origin: &str,
    ) -> Result<Identity, PkiError> {
        let chain = parse_certs(cert_pem, origin)?;
        let key = parse_key(key_pem, origin)?;
        Self::from_parts(chain, key, origin)
    }

    /// From DER: a chain (leaf first) and its key.
    pub fn from_der(
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
    ) -> Result<Identity, PkiError> {
        Self::from_parts(chain, key, "<memory: identity>")
    }

    fn from_parts(
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
        origin: &str,
    ) -> Result<Identity, PkiError> {
        let leaf_der = chain.first().ok_or_else(|| PkiError::NoCertificate {
            origin: origin.to_owned(),
        })?;
        let leaf = CertIdentity::parse(leaf_der, origin)?;
        let mismatch = || PkiError::KeyMismatch {
            origin: origin.to_owned(),
        };
        let signing_key = crypto_provider()
            .key_provider
            .load_private_key(key.clone_key())
            .map_err(|_| mismatch())?;
        let spki = signing_key.public_key().ok_or_else(mismatch)?;
        if crate::Fingerprint::of(spki.as_ref()) != leaf.spki_fingerprint {
            return Err(mismatch());
        }
        Ok(Identity { chain, key, leaf })
    }

    /// The chain, leaf first.
    pub fn chain(&self) -> &[CertificateDer<'static>] {
        &self.chain
    }

    /// The leaf certificate's identity.
    pub fn cert_identity(&self) -> &CertIdentity {
        &self.leaf
    }

    pub(crate) fn key(&self) -> PrivateKeyDer<'static> {
        self.key.clone_key()
    }
}

impl Clone for Identity {
    fn clone(&self) -> Self {
        Identity {
            chain: self.chain.clone(),
            key: self.key.clone_key(),
            leaf: self.leaf.clone(),
        }
    }
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Identity")
            .field("subject", &self.leaf.subject)
            .field("fingerprint", &self.leaf.fingerprint)
            .field("chain_len", &self.chain.len())
            .field("key", &"<redacted>")
            .finish()
    }
}

/// The certificates this side trusts to have signed the peer's certificate.
/// Never empty.
#[derive(Clone)]
pub struct TrustAnchors {
    store: Arc<RootCertStore>,
    certs: Vec<CertificateDer<'static>>,
}

impl TrustAnchors {
    /// From PEM text holding one or more CA certificates.
    pub fn from_pem(pem: &[u8]) -> Result<TrustAnchors, PkiError> {
        Self::from_certs(
            parse_certs(pem, "<memory: trust anchors>")?,
            "<memory: trust anchors>",
        )
    }

    /// From a PEM file holding one or more CA certificates.
    pub fn load(path: impl AsRef<Path>) -> Result<TrustAnchors, PkiError> {
        let path = path.as_ref();
        let pem = fs::read(path).map_err(io_err(path))?;
        let origin = origin_of(path);
        Self::from_certs(parse_certs(&pem, &origin)?, &origin)
    }

    /// From DER certificates.
    pub fn from_der(certs: Vec<CertificateDer<'static>>) -> Result<TrustAnchors, PkiError> {
        Self::from_certs(certs, "<memory: trust anchors>")
    }

    fn from_certs(
        certs: Vec<CertificateDer<'static>>,
        origin: &str,
    ) -> Result<TrustAnchors, PkiError> {
        if certs.is_empty() {
            return Err(PkiError::EmptyTrustStore {
                origin: origin.to_owned(),
            });
        }
        let mut store = RootCertStore::empty();
        for cert in &certs {
            // A leaf as a trust anchor would let anyone holding its key mint
            // certificates this side accepts.
            if !CertIdentity::parse(cert, origin)?.is_ca {
                return Err(PkiError::NotACa {
                    origin: origin.to_owned(),
                });
            }
            store
                .add(cert.clone())
                .map_err(|e| PkiError::BadCertificate {
                    origin: origin.to_owned(),
                    reason: e.to_string(),
                })?;
        }
        Ok(TrustAnchors {
            store: Arc::new(store),
            certs,
        })
    }

    /// Adds the anchors of `other` (e.g. a new CA during a rotation).
    pub fn merged(&self, other: &TrustAnchors) -> TrustAnchors {
        let mut certs = self.certs.clone();
        certs.extend(other.certs.iter().cloned());
        let mut store = (*self.store).clone();
        store.roots.extend(other.store.roots.iter().cloned());
        TrustAnchors {
            store: Arc::new(store),
            certs,
        }
    }

    /// The anchor certificates.
    pub fn certificates(&self) -> &[CertificateDer<'static>] {
        &self.certs
    }

    /// Checks that `chain` (leaf first, then intermediates) is a client
    /// certificate these anchors accept at `now`: the chain, validity and
    /// the clientAuth key usage, as a server verifies it in the handshake
    /// (without CRLs). For diagnostics (`netproc doctor`).
    ///
    /// ```
    /// use std::time::SystemTime;
    /// use netproc_pki::{CaParams, CertificateAuthority, LeafParams};
    ///
    /// let ca = CertificateAuthority::generate(&CaParams::new("ca")).unwrap();
    /// let other = CertificateAuthority::generate(&CaParams::new("other")).unwrap();
    /// let leaf = ca.issue(&LeafParams::client("alice")).unwrap();
    /// let chain = [leaf.certificate().clone()];
    /// assert!(ca.trust_anchors().verify_client(&chain, SystemTime::now()).is_ok());
    /// assert!(other.trust_anchors().verify_client(&chain, SystemTime::now()).is_err());
    /// ```
    pub fn verify_client(
        &self,
        chain: &[CertificateDer<'static>],
        now: SystemTime,
    ) -> Result<(), PkiError> {
        let bad = |reason: String| PkiError::BadCertificate {
            origin: "<client certificate chain>".into(),
            reason,
        };
        let (leaf, intermediates) = chain
            .split_first()
            .ok_or_else(|| bad("no certificate".into()))?;
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            Arc::clone(&self.store),
            crypto_provider(),
        )
        .build()
        .map_err(|e| bad(e.to_string()))?;
        verifier
            .verify_client_cert(leaf, intermediates, unix_time(now))
            .map(|_| ())
            .map_err(|e| bad(e.to_string()))
    }

    /// Checks that `chain` is a server certificate these anchors accept at
    /// `now` for `server_name` (chain, validity, serverAuth, name). For
    /// diagnostics (`netproc doctor`).
    pub fn verify_server(
        &self,
        chain: &[CertificateDer<'static>],
        server_name: &str,
        now: SystemTime,
    ) -> Result<(), PkiError> {
        let bad = |reason: String| PkiError::BadCertificate {
            origin: "<server certificate chain>".into(),
            reason,
        };
        let (leaf, intermediates) = chain
            .split_first()
            .ok_or_else(|| bad("no certificate".into()))?;
        let name = rustls_pki_types::ServerName::try_from(server_name.to_owned())
            .map_err(|e| bad(format!("server name {server_name:?}: {e}")))?;
        let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::clone(&self.store),
            crypto_provider(),
        )
        .build()
        .map_err(|e| bad(e.to_string()))?;
        rustls::client::danger::ServerCertVerifier::verify_server_cert(
            verifier.as_ref(),
            leaf,
            intermediates,
            &name,
            &[],
            unix_time(now),
        )
        .map(|_| ())
        .map_err(|e| bad(e.to_string()))
    }

    pub(crate) fn store(&self) -> Arc<RootCertStore> {
        Arc::clone(&self.store)
    }
}

impl fmt::Debug for TrustAnchors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TrustAnchors")
            .field("count", &self.certs.len())
            .finish()
    }
}

/// A certificate revocation list, checked not to be expired when loaded.
#[derive(Clone)]
pub struct Crl {
    der: CertificateRevocationListDer<'static>,
    issuer: String,
    revoked_serials: Vec<String>,
    next_update: Option<SystemTime>,
}

impl Crl {
    /// From PEM text holding one CRL (`-----BEGIN X509 CRL-----`).
    pub fn from_pem(pem: &[u8]) -> Result<Crl, PkiError> {
        Self::parse_pem(pem, "<memory: CRL>", SystemTime::now())
    }

    /// From a PEM file holding one CRL.
    pub fn load(path: impl AsRef<Path>) -> Result<Crl, PkiError> {
        let path = path.as_ref();
        let pem = fs::read(path).map_err(io_err(path))?;
        Self::parse_pem(&pem, &origin_of(path), SystemTime::now())
    }

    fn parse_pem(pem: &[u8], origin: &str, now: SystemTime) -> Result<Crl, PkiError> {
        let der =
            CertificateRevocationListDer::from_pem_slice(pem).map_err(|e| PkiError::BadCrl {
                origin: origin.to_owned(),
                reason: e.to_string(),
            })?;
        Self::from_der_at(der, origin, now)
    }

    pub(crate) fn from_der_at(
        der: CertificateRevocationListDer<'static>,
        origin: &str,
        now: SystemTime,
    ) -> Result<Crl, PkiError> {
        let bad = |reason: String| PkiError::BadCrl {
            origin: origin.to_owned(),
            reason,
        };
        let (_, crl) =
            CertificateRevocationList::from_der(der.as_ref()).map_err(|e| bad(e.to_string()))?;
        let next_update = crl.next_update().map(|t| t.timestamp());
        if let Some(next) = next_update {
            let now_secs = now
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
            if next < now_secs {
                return Err(PkiError::ExpiredCrl {
                    origin: origin.to_owned(),
                    next_update: next,
                });
            }
        }
        let issuer = crl.issuer().to_string();
        let revoked_serials = crl
            .iter_revoked_certificates()
            .map(|r| hex::encode(r.raw_serial()))
            .collect();
        Ok(Crl {
            issuer,
            revoked_serials,
            next_update: next_update.map(unix_to_system),
            der,
        })
    }

    /// The issuing CA's distinguished name.
    pub fn issuer(&self) -> &str {
        &self.issuer
    }

    /// Serials of the revoked certificates, lowercase hex.
    pub fn revoked_serials(&self) -> &[String] {
        &self.revoked_serials
    }

    /// When the CRL expires.
    pub fn next_update(&self) -> Option<SystemTime> {
        self.next_update
    }

    /// The CRL's DER bytes.
    pub fn der(&self) -> &CertificateRevocationListDer<'static> {
        &self.der
    }

    /// The CRL as PEM text.
    pub fn to_pem(&self) -> String {
        pem_encode("X509 CRL", self.der.as_ref())
    }

    /// Writes the CRL as PEM.
    pub fn save(&self, path: impl AsRef<Path>, overwrite: bool) -> Result<(), PkiError> {
        write_file(path.as_ref(), self.to_pem().as_bytes(), false, overwrite)
    }
}

impl fmt::Debug for Crl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Crl")
            .field("issuer", &self.issuer)
            .field("revoked", &self.revoked_serials.len())
            .field("next_update", &self.next_update)
            .finish()
    }
}

/// PEM-encodes DER bytes under `label`.
/// A certificate (DER) as PEM text.
pub fn certificate_pem(der: &[u8]) -> String {
    pem_encode("CERTIFICATE", der)
}

pub(crate) fn pem_encode(label: &str, der: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut b64 = String::with_capacity(der.len().div_ceil(3) * 4);
    for chunk in der.chunks(3) {
        let n = chunk.len();
        let v = u32::from(chunk[0]) << 16
            | u32::from(*chunk.get(1).unwrap_or(&0)) << 8
            | u32::from(*chunk.get(2).unwrap_or(&0));
        for i in 0..4 {
            if i <= n {
                b64.push(char::from(ALPHABET[(v >> (18 - 6 * i) & 63) as usize]));
            } else {
                b64.push('=');
            }
        }
    }
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(line).unwrap_or_default());
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

impl CertIdentity {
    /// Parses the first certificate of PEM text (any certificate: a CA or
    /// a leaf). `origin` names where it came from in errors (a path).
    pub fn from_pem(pem: &[u8], origin: &str) -> Result<CertIdentity, PkiError> {
        let certs = parse_certs(pem, origin)?;
        // parse_certs never returns an empty list.
        let first = certs.first().ok_or_else(|| PkiError::NoCertificate {
            origin: origin.to_owned(),
        })?;
        Self::parse(first, origin)
    }
}

fn unix_time(t: SystemTime) -> rustls_pki_types::UnixTime {
    rustls_pki_types::UnixTime::since_unix_epoch(t.duration_since(UNIX_EPOCH).unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pem_encoding_round_trips() {
        for len in 0..10 {
            let der: Vec<u8> = (0..len).map(|i| (i * 37) as u8).collect();
            let pem = pem_encode("CERTIFICATE", &der);
            if len > 0 {
                let back = CertificateDer::from_pem_slice(pem.as_bytes()).unwrap();
                assert_eq!(back.as_ref(), der.as_slice());
            }
        }
    }
}
