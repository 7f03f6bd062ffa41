//! Generating a CA, leaf certificates and CRLs (rcgen).

use std::fmt;
use std::net::IpAddr;
use std::path::Path;
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose,
    RevocationReason, RevokedCertParams, SanType, SerialNumber,
};
use rustls_pki_types::{CertificateDer, CertificateRevocationListDer};
use time::OffsetDateTime;
use zeroize::Zeroizing;

use crate::error::PkiError;
use crate::pem::{parse_certs, read_secret_file, write_file};
use crate::{CertIdentity, Crl, Identity, KeyPurpose, SubjectAltName, TrustAnchors};

const DAY: Duration = Duration::from_secs(24 * 60 * 60);

/// A validity period.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Validity {
    /// Start.
    pub not_before: SystemTime,
    /// End.
    pub not_after: SystemTime,
}

impl Validity {
    /// From five minutes ago (tolerating clock skew) to `days` from now.
    pub fn days_from_now(days: u32) -> Validity {
        let now = SystemTime::now();
        Validity {
            not_before: now - Duration::from_secs(300),
            not_after: now + DAY * days,
        }
    }

    /// An explicit period, which may lie in the past or the future (for tests
    /// of expired or not-yet-valid certificates).
    pub fn new(not_before: SystemTime, not_after: SystemTime) -> Validity {
        Validity {
            not_before,
            not_after,
        }
    }
}

fn to_offset(t: SystemTime, what: &'static str) -> Result<OffsetDateTime, PkiError> {
    let secs = match t.duration_since(SystemTime::UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_secs()).ok(),
        Err(e) => i64::try_from(e.duration().as_secs()).ok().map(|s| -s),
    };
    secs.and_then(|s| OffsetDateTime::from_unix_timestamp(s).ok())
        .ok_or(PkiError::Generate {
            what,
            reason: "validity date out of range".into(),
        })
}

fn gen_err(what: &'static str) -> impl FnOnce(rcgen::Error) -> PkiError {
    move |e| PkiError::Generate {
        what,
        reason: e.to_string(),
    }
}

/// A positive serial number of 16 random bytes. Set explicitly: rcgen's
/// default derives the serial from the public key, so two certificates on one
/// key would share it and a CRL entry would revoke both.
fn random_serial() -> Result<SerialNumber, PkiError> {
    let mut bytes = [0u8; 16];
    crate::random_bytes(&mut bytes)?;
    bytes[0] = (bytes[0] & 0x7f) | 0x40; // positive, and no leading zero byte
    Ok(SerialNumber::from_slice(&bytes))
}

/// What a new CA looks like.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct CaParams {
    /// The CA's common name.
    pub common_name: String,
    /// An organization name for the subject, if any.
    pub organization: Option<String>,
    /// Default: 10 years from now.
    pub validity: Validity,
}

impl CaParams {
    /// A CA named `common_name`, valid for 10 years.
    pub fn new(common_name: impl Into<String>) -> CaParams {
        CaParams {
            common_name: common_name.into(),
            organization: None,
            validity: Validity::days_from_now(3652),
        }
    }

    /// Sets the validity.
    pub fn validity(mut self, validity: Validity) -> CaParams {
        self.validity = validity;
        self
    }

    /// Sets the organization.
    pub fn organization(mut self, organization: impl Into<String>) -> CaParams {
        self.organization = Some(organization.into());
        self
    }
}

/// What a new leaf certificate looks like.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct LeafParams {
    /// The subject's common name.
    pub common_name: String,
    /// Subject alternative names.
    pub sans: Vec<SubjectAltName>,
    /// Key purposes (extended key usage).
    pub purposes: Vec<KeyPurpose>,
    /// Default: 90 days from now.
    pub validity: Validity,
}

impl LeafParams {
    /// A server certificate (serverAuth) for the given DNS names and IP
    /// addresses: each of `names` that parses as an IP becomes an IP SAN.
    pub fn server<I, S>(common_name: impl Into<String>, names: I) -> LeafParams
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let sans = names
            .into_iter()
            .map(|n| match n.as_ref().parse::<IpAddr>() {
                Ok(ip) => SubjectAltName::Ip(ip),
                Err(_) => SubjectAltName::Dns(n.as_ref().to_owned()),
            })
            .collect();
        LeafParams {
            common_name: common_name.into(),
            sans,
            purposes: vec![KeyPurpose::ServerAuth],
            validity: Validity::days_from_now(90),
        }
    }

    /// A client certificate (clientAuth) with the given common name.
    pub fn client(common_name: impl Into<String>) -> LeafParams {
        LeafParams {
            common_name: common_name.into(),
            sans: Vec::new(),
            purposes: vec![KeyPurpose::ClientAuth],
            validity: Validity::days_from_now(90),
        }
    }

    /// Adds a subject alternative name (e.g. `uri:spiffe://…`).
    pub fn san(mut self, san: SubjectAltName) -> LeafParams {
        self.sans.push(san);
        self
    }

    /// Sets the validity.
    pub fn validity(mut self, validity: Validity) -> LeafParams {
        self.validity = validity;
        self
    }

    /// Replaces the key purposes.
    pub fn purposes(mut self, purposes: Vec<KeyPurpose>) -> LeafParams {
        self.purposes = purposes;
        self
    }
}

/// A certificate authority that can issue certificates and CRLs.
///
/// ```
/// use netproc_pki::{CaParams, CertificateAuthority, LeafParams};
///
/// let ca = CertificateAuthority::generate(&CaParams::new("example CA")).unwrap();
/// let server = ca.issue(&LeafParams::server("server", ["localhost", "127.0.0.1"])).unwrap();
/// let client = ca.issue(&LeafParams::client("alice")).unwrap();
/// assert_eq!(client.cert_identity().common_name.as_deref(), Some("alice"));
/// assert_ne!(server.cert_identity().serial, client.cert_identity().serial);
/// let crl = ca.crl(&[client.cert_identity().serial.as_str()], 7).unwrap();
/// assert_eq!(crl.revoked_serials(), [client.cert_identity().serial.clone()]);
/// ```
pub struct CertificateAuthority {
    issuer: Issuer<'static, KeyPair>,
    cert: CertificateDer<'static>,
    identity: CertIdentity,
}

impl CertificateAuthority {
    /// Generates a new CA with a fresh ECDSA P-256 key.
    pub fn generate(params: &CaParams) -> Result<CertificateAuthority, PkiError> {
        let key = KeyPair::generate().map_err(gen_err("CA key"))?;
        let p = ca_certificate_params(params)?;
        let cert = p.self_signed(&key).map_err(gen_err("CA certificate"))?;
        let cert = cert.der().clone();
        let identity = CertIdentity::parse(&cert, "<memory: CA>")?;
        Ok(CertificateAuthority {
            issuer: Issuer::new(p, key),
            cert,
            identity,
        })
    }

    /// Loads a CA from its certificate and key PEM, checking that the
    /// certificate really is a CA and that the key is its key.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<CertificateAuthority, PkiError> {
        Self::from_pem_with_origin(cert_pem, key_pem, "<memory: CA>")
    }

    /// Loads a CA from files (the key file must be mode 0600 or stricter).
    pub fn load(
        cert_path: impl AsRef<Path>,
        key_path: impl AsRef<Path>,
    ) -> Result<CertificateAuthority, PkiError> {
        let (cert_path, key_path) = (cert_path.as_ref(), key_path.as_ref());
        let cert_pem = std::fs::read(cert_path).map_err(|source| PkiError::Io {
            path: cert_path.to_owned(),
            source,
        })?;
        let key_pem = read_secret_file(key_path)?;
        let origin = cert_path.display().to_string();
        let bad_utf8 = |origin: &str| PkiError::BadPem {
            origin: origin.to_owned(),
            reason: "not UTF-8".into(),
        };
        let cert_pem = std::str::from_utf8(&cert_pem).map_err(|_| bad_utf8(&origin))?;
        let key_pem =
            std::str::from_utf8(&key_pem).map_err(|_| bad_utf8(&key_path.display().to_string()))?;
        Self::from_pem_with_origin(cert_pem, key_pem, &origin)
    }

    fn from_pem_with_origin(
        cert_pem: &str,
        key_pem: &str,
        origin: &str,
    ) -> Result<CertificateAuthority, PkiError> {
        let cert = parse_certs(cert_pem.as_bytes(), origin)?
            .into_iter()
            .next()
            .ok_or_else(|| PkiError::NoCertificate {
                origin: origin.to_owned(),
            })?;
        let identity = CertIdentity::parse(&cert, origin)?;
        if !identity.is_ca {
            return Err(PkiError::NotACa {
                origin: origin.to_owned(),
            });
        }
        // Checks the key belongs to the certificate.
        Identity::from_pem_with_origin(cert_pem.as_bytes(), key_pem.as_bytes(), origin)?;
        let key = KeyPair::from_pem(key_pem).map_err(|_| PkiError::KeyMismatch {
            origin: origin.to_owned(),
        })?;
        let issuer =
            Issuer::from_ca_cert_der(&cert, key).map_err(|e| PkiError::BadCertificate {
                origin: origin.to_owned(),
                reason: e.to_string(),
            })?;
        Ok(CertificateAuthority {
            issuer,
            cert,
            identity,
        })
    }

    /// Issues a leaf certificate with a fresh ECDSA P-256 key.
    pub fn issue(&self, params: &LeafParams) -> Result<IssuedCert, PkiError> {
        let key = KeyPair::generate().map_err(gen_err("leaf key"))?;
        let p = leaf_certificate_params(params)?;
        let cert = p
            .signed_by(&key, &self.issuer)
            .map_err(gen_err("leaf certificate"))?;
        let der = cert.der().clone();
        let identity = CertIdentity::parse(&der, "<memory: issued certificate>")?;
        Ok(IssuedCert {
            cert: der,
            key_pem: Zeroizing::new(key.serialize_pem()),
            identity,
        })
    }

    /// Issues a leaf certificate for the key of a verified certificate
    /// request, exactly as `params` say: the request's subject, extensions
    /// and key purposes are ignored (only its public key is used).
    pub fn issue_for_request(
        &self,
        request: &crate::CertificateRequest,
        params: &LeafParams,
    ) -> Result<CertificateDer<'static>, PkiError> {
        let p = leaf_certificate_params(params)?;
        let cert = p
            .signed_by(request.public_key(), &self.issuer)
            .map_err(gen_err("leaf certificate"))?;
        Ok(cert.der().clone())
    }

    /// Issues an intermediate CA (pathLen 0: it may sign leaves only) with
    /// a fresh ECDSA P-256 key — the online CA of an enrollment service,
    /// while this one (the root) stays offline.
    pub fn issue_intermediate(&self, params: &CaParams) -> Result<CertificateAuthority, PkiError> {
        let key = KeyPair::generate().map_err(gen_err("intermediate key"))?;
        let mut p = ca_certificate_params(params)?;
        p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        p.use_authority_key_identifier_extension = true;
        let cert = p
            .signed_by(&key, &self.issuer)
            .map_err(gen_err("intermediate certificate"))?;
        let cert = cert.der().clone();
        let identity = CertIdentity::parse(&cert, "<memory: intermediate CA>")?;
        Ok(CertificateAuthority {
            issuer: Issuer::new(p, key),
            cert,
            identity,
        })
    }
}

/// The certificate parameters of a CA.
fn ca_certificate_params(params: &CaParams) -> Result<CertificateParams, PkiError> {
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, params.common_name.as_str());
    if let Some(org) = &params.organization {
        dn.push(DnType::OrganizationName, org.as_str());
    }
    p.distinguished_name = dn;
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    p.serial_number = Some(random_serial()?);
    p.not_before = to_offset(params.validity.not_before, "CA certificate")?;
    p.not_after = to_offset(params.validity.not_after, "CA certificate")?;
    p.key_identifier_method = KeyIdMethod::Sha256;
    Ok(p)
}

/// The certificate parameters of a leaf: exactly what `params` say.
fn leaf_certificate_params(params: &LeafParams) -> Result<CertificateParams, PkiError> {
    {
        let mut p = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, params.common_name.as_str());
        p.distinguished_name = dn;
        p.is_ca = IsCa::ExplicitNoCa;
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = params
            .purposes
            .iter()
            .map(|purpose| match purpose {
                KeyPurpose::ServerAuth => Ok(ExtendedKeyUsagePurpose::ServerAuth),
                KeyPurpose::ClientAuth => Ok(ExtendedKeyUsagePurpose::ClientAuth),
                KeyPurpose::Other(oid) => oid
                    .split('.')
                    .map(str::parse::<u64>)
                    .collect::<Result<Vec<_>, _>>()
                    .map(ExtendedKeyUsagePurpose::Other)
                    .map_err(|_| PkiError::Generate {
                        what: "leaf certificate",
                        reason: format!("invalid key purpose OID {oid:?}"),
                    }),
            })
            .collect::<Result<_, _>>()?;
        p.subject_alt_names = params
            .sans
            .iter()
            .map(|san| {
                Ok(match san {
                    SubjectAltName::Dns(v) => {
                        SanType::DnsName(v.clone().try_into().map_err(gen_err("DNS SAN"))?)
                    }
                    SubjectAltName::Uri(v) => {
                        SanType::URI(v.clone().try_into().map_err(gen_err("URI SAN"))?)
                    }
                    SubjectAltName::Email(v) => {
                        SanType::Rfc822Name(v.clone().try_into().map_err(gen_err("email SAN"))?)
                    }
                    SubjectAltName::Ip(ip) => SanType::IpAddress(*ip),
                })
            })
            .collect::<Result<_, PkiError>>()?;
        p.serial_number = Some(random_serial()?);
        p.not_before = to_offset(params.validity.not_before, "leaf certificate")?;
        p.not_after = to_offset(params.validity.not_after, "leaf certificate")?;
        p.use_authority_key_identifier_extension = true;
        Ok(p)
    }
}

impl CertificateAuthority {
    /// Issues a CRL revoking the certificates with the given serials
    /// (lowercase or upper-case hex), valid for `valid_days` days.
    pub fn crl(&self, revoked_serials: &[&str], valid_days: u32) -> Result<Crl, PkiError> {
        self.crl_with_validity(
            revoked_serials,
            Validity::new(
                SystemTime::now() - Duration::from_secs(60),
                SystemTime::now() + DAY * valid_days,
            ),
        )
    }

    /// Issues a CRL with an explicit thisUpdate/nextUpdate (an expired CRL,
    /// for tests, is one whose `not_after` is past).
    pub fn crl_with_validity(
        &self,
        revoked_serials: &[&str],
        validity: Validity,
    ) -> Result<Crl, PkiError> {
        let revocation_time = to_offset(validity.not_before, "CRL")?;
        let revoked_certs = revoked_serials
            .iter()
            .map(|s| {
                let bytes = parse_hex(s).ok_or_else(|| PkiError::Generate {
                    what: "CRL",
                    reason: format!("serial {s:?} is not hex"),
                })?;
                Ok(RevokedCertParams {
                    serial_number: SerialNumber::from_slice(&bytes),
                    revocation_time,
                    reason_code: Some(RevocationReason::KeyCompromise),
                    invalidity_date: None,
                })
            })
            .collect::<Result<Vec<_>, PkiError>>()?;
        let params = CertificateRevocationListParams {
            this_update: revocation_time,
            next_update: to_offset(validity.not_after, "CRL")?,
            crl_number: random_serial()?,
            issuing_distribution_point: None,
            revoked_certs,
            key_identifier_method: KeyIdMethod::Sha256,
        };
        let crl = params.signed_by(&self.issuer).map_err(gen_err("CRL"))?;
        let der = CertificateRevocationListDer::from(crl.der().as_ref().to_vec());
        // Validate as a loader would, but without refusing an expired one:
        // tests need those.
        Crl::from_der_at(der, "<memory: generated CRL>", validity.not_before)
    }

    /// The CA certificate.
    pub fn certificate(&self) -> &CertificateDer<'static> {
        &self.cert
    }

    /// The CA certificate's identity.
    pub fn cert_identity(&self) -> &CertIdentity {
        &self.identity
    }

    /// The CA certificate as PEM.
    pub fn cert_pem(&self) -> String {
        crate::pem::pem_encode("CERTIFICATE", &self.cert)
    }

    /// The CA's private key as PKCS#8 PEM. Keep it secret.
    pub fn key_pem(&self) -> Zeroizing<String> {
        Zeroizing::new(self.issuer.key().serialize_pem())
    }

    /// Trust anchors holding just this CA.
    pub fn trust_anchors(&self) -> TrustAnchors {
        // A generated CA certificate is always a valid anchor.
        TrustAnchors::from_der(vec![self.cert.clone()])
            .unwrap_or_else(|_| unreachable!("a generated CA is a valid trust anchor"))
    }

    /// Writes the certificate (0644) and key (0600).
    pub fn save(
        &self,
        cert_path: impl AsRef<Path>,
        key_path: impl AsRef<Path>,
        overwrite: bool,
    ) -> Result<(), PkiError> {
        save_pair(
            cert_path.as_ref(),
            &self.cert_pem(),
            key_path.as_ref(),
            &self.key_pem(),
            overwrite,
        )
    }
}

/// Writes a certificate (0644) and its key (0600, first, so a certificate
/// never stands without its key).
fn save_pair(
    cert_path: &Path,
    cert_pem: &str,
    key_path: &Path,
    key_pem: &str,
    overwrite: bool,
) -> Result<(), PkiError> {
    write_file(key_path, key_pem.as_bytes(), true, overwrite)?;
    write_file(cert_path, cert_pem.as_bytes(), false, overwrite)
}

impl fmt::Debug for CertificateAuthority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertificateAuthority")
            .field("subject", &self.identity.subject)
            .field("fingerprint", &self.identity.fingerprint)
            .field("key", &"<redacted>")
            .finish()
    }
}

fn parse_hex(s: &str) -> Option<Vec<u8>> {
    let s = s.trim();
    if s.is_empty() || !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// A certificate just issued, with its private key.
pub struct IssuedCert {
    cert: CertificateDer<'static>,
    key_pem: Zeroizing<String>,
    identity: CertIdentity,
}

impl IssuedCert {
    /// The certificate.
    pub fn certificate(&self) -> &CertificateDer<'static> {
        &self.cert
    }

    /// The certificate's identity (serial, fingerprint, …).
    pub fn cert_identity(&self) -> &CertIdentity {
        &self.identity
    }

    /// The certificate as PEM.
    pub fn cert_pem(&self) -> String {
        crate::pem::pem_encode("CERTIFICATE", &self.cert)
    }

    /// The private key as PKCS#8 PEM. Keep it secret.
    pub fn key_pem(&self) -> &Zeroizing<String> {
        &self.key_pem
    }

    /// The certificate and key as a TLS identity.
    pub fn identity(&self) -> Result<Identity, PkiError> {
        Identity::from_pem(self.cert_pem().as_bytes(), self.key_pem.as_bytes())
    }

    /// Writes the certificate (0644) and key (0600).
    pub fn save(
        &self,
        cert_path: impl AsRef<Path>,
        key_path: impl AsRef<Path>,
        overwrite: bool,
    ) -> Result<(), PkiError> {
        save_pair(
            cert_path.as_ref(),
            &self.cert_pem(),
            key_path.as_ref(),
            &self.key_pem,
            overwrite,
        )
    }
}

impl fmt::Debug for IssuedCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IssuedCert")
            .field("subject", &self.identity.subject)
            .field("serial", &self.identity.serial)
            .field("fingerprint", &self.identity.fingerprint)
            .field("key", &"<redacted>")
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serials_are_random_positive_and_distinct() {
        let a = random_serial().unwrap().to_bytes();
        let b = random_serial().unwrap().to_bytes();
        assert_ne!(a, b);
        assert_eq!(a.len(), 16);
        assert!(a[0] & 0x80 == 0 && a[0] != 0);
        assert_eq!(hex::encode(a).len(), 32);
    }

    #[test]
    fn hex_serials_parse() {
        assert_eq!(parse_hex("0aFF"), Some(vec![10, 255]));
        assert_eq!(parse_hex("abc"), None);
        assert_eq!(parse_hex("zz"), None);
    }
}
