//! What a certificate says about its holder.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::Fingerprint;
use crate::error::{PkiError, truncated};

/// A subject alternative name, written `dns:…`, `uri:…`, `ip:…` or `email:…`.
///
/// ```
/// use netproc_pki::SubjectAltName;
///
/// let san: SubjectAltName = "uri:spiffe://example/client".parse().unwrap();
/// assert_eq!(san, SubjectAltName::Uri("spiffe://example/client".into()));
/// assert_eq!(san.to_string(), "uri:spiffe://example/client");
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum SubjectAltName {
    /// A DNS name.
    Dns(String),
    /// A URI (e.g. a SPIFFE id).
    Uri(String),
    /// An IP address.
    Ip(IpAddr),
    /// An e-mail address.
    Email(String),
}

impl fmt::Display for SubjectAltName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SubjectAltName::Dns(v) => write!(f, "dns:{v}"),
            SubjectAltName::Uri(v) => write!(f, "uri:{v}"),
            SubjectAltName::Ip(v) => write!(f, "ip:{v}"),
            SubjectAltName::Email(v) => write!(f, "email:{v}"),
        }
    }
}

impl FromStr for SubjectAltName {
    type Err = PkiError;

    fn from_str(s: &str) -> Result<Self, PkiError> {
        let invalid = || PkiError::InvalidSan {
            input: truncated(s),
        };
        let (kind, value) = s.split_once(':').ok_or_else(invalid)?;
        if value.is_empty() {
            return Err(invalid());
        }
        match kind.to_ascii_lowercase().as_str() {
            "dns" => Ok(SubjectAltName::Dns(value.to_owned())),
            "uri" => Ok(SubjectAltName::Uri(value.to_owned())),
            "ip" => value.parse().map(SubjectAltName::Ip).map_err(|_| invalid()),
            "email" => Ok(SubjectAltName::Email(value.to_owned())),
            _ => Err(invalid()),
        }
    }
}

/// A key purpose (extended key usage).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum KeyPurpose {
    /// TLS server authentication.
    ServerAuth,
    /// TLS client authentication.
    ClientAuth,
    /// Another purpose, by OID.
    Other(String),
}

impl fmt::Display for KeyPurpose {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeyPurpose::ServerAuth => f.write_str("serverAuth"),
            KeyPurpose::ClientAuth => f.write_str("clientAuth"),
            KeyPurpose::Other(oid) => f.write_str(oid),
        }
    }
}

/// What a certificate says about its holder, as an authenticator sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct CertIdentity {
    /// The subject, as a distinguished name string (e.g. `CN=client`).
    pub subject: String,
    /// The subject's common name, if any.
    pub common_name: Option<String>,
    /// The issuer's distinguished name.
    pub issuer: String,
    /// Subject alternative names.
    pub sans: Vec<SubjectAltName>,
    /// The serial number, lowercase hex.
    pub serial: String,
    /// Start of validity.
    pub not_before: SystemTime,
    /// End of validity.
    pub not_after: SystemTime,
    /// SHA-256 of the certificate's DER.
    pub fingerprint: Fingerprint,
    /// SHA-256 of the certificate's SubjectPublicKeyInfo.
    pub spki_fingerprint: Fingerprint,
    /// Extended key usages (empty: the extension is absent).
    pub key_purposes: Vec<KeyPurpose>,
    /// Whether it may act as a CA: basicConstraints CA:TRUE, and keyCertSign
    /// where a keyUsage extension is present.
    pub is_ca: bool,
}

impl CertIdentity {
    /// Parses a DER certificate.
    pub fn from_der(der: &[u8]) -> Result<CertIdentity, PkiError> {
        Self::parse(der, "<memory: certificate>")
    }

    pub(crate) fn parse(der: &[u8], origin: &str) -> Result<CertIdentity, PkiError> {
        let bad = |reason: String| PkiError::BadCertificate {
            origin: origin.to_owned(),
            reason,
        };
        let (rest, cert) = X509Certificate::from_der(der).map_err(|e| bad(e.to_string()))?;
        if !rest.is_empty() {
            return Err(bad("trailing bytes after the certificate".into()));
        }
        let mut sans = Vec::new();
        if let Some(ext) = cert
            .subject_alternative_name()
            .map_err(|e| bad(e.to_string()))?
        {
            for name in &ext.value.general_names {
                match name {
                    GeneralName::DNSName(v) => sans.push(SubjectAltName::Dns((*v).to_owned())),
                    GeneralName::URI(v) => sans.push(SubjectAltName::Uri((*v).to_owned())),
                    GeneralName::RFC822Name(v) => sans.push(SubjectAltName::Email((*v).to_owned())),
                    GeneralName::IPAddress(bytes) => {
                        if let Some(ip) = ip_from_bytes(bytes) {
                            sans.push(SubjectAltName::Ip(ip));
                        }
                    }
                    _ => {}
                }
            }
        }
        let mut key_purposes = Vec::new();
        if let Some(eku) = cert.extended_key_usage().map_err(|e| bad(e.to_string()))? {
            if eku.value.server_auth {
                key_purposes.push(KeyPurpose::ServerAuth);
            }
            if eku.value.client_auth {
                key_purposes.push(KeyPurpose::ClientAuth);
            }
            for oid in &eku.value.other {
                key_purposes.push(KeyPurpose::Other(oid.to_id_string()));
            }
        }
        // keyUsage, where present, must allow keyCertSign for a CA.
        let cert_sign_allowed = cert
            .key_usage()
            .map_err(|e| bad(e.to_string()))?
            .is_none_or(|ku| ku.value.key_cert_sign());
        let common_name = cert
            .subject()
            .iter_common_name()
            .next()
            .and_then(|cn| cn.as_str().ok())
            .map(str::to_owned);
        Ok(CertIdentity {
            subject: cert.subject().to_string(),
            common_name,
            issuer: cert.issuer().to_string(),
            sans,
            serial: hex::encode(cert.raw_serial()),
            not_before: unix_to_system(cert.validity().not_before.timestamp()),
            not_after: unix_to_system(cert.validity().not_after.timestamp()),
            fingerprint: Fingerprint::of(der),
            spki_fingerprint: Fingerprint::of(cert.public_key().raw),
            key_purposes,
            is_ca: cert.is_ca() && cert_sign_allowed,
        })
    }

    /// Whether `now` is inside the validity period.
    pub fn is_valid_at(&self, now: SystemTime) -> bool {
        self.not_before <= now && now <= self.not_after
    }
}

fn ip_from_bytes(bytes: &[u8]) -> Option<IpAddr> {
    match bytes.len() {
        4 => <[u8; 4]>::try_from(bytes).ok().map(IpAddr::from),
        16 => <[u8; 16]>::try_from(bytes).ok().map(IpAddr::from),
        _ => None,
    }
}

pub(crate) fn unix_to_system(secs: i64) -> SystemTime {
    if secs >= 0 {
        UNIX_EPOCH + Duration::from_secs(secs.unsigned_abs())
    } else {
        UNIX_EPOCH - Duration::from_secs(secs.unsigned_abs())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn san_forms_parse_and_print() {
        for s in [
            "dns:localhost",
            "uri:spiffe://a/b",
            "ip:127.0.0.1",
            "ip:::1",
            "email:a@b.c",
        ] {
            assert_eq!(s.parse::<SubjectAltName>().unwrap().to_string(), s);
        }
        for bad in ["localhost", "dns:", "ip:not-an-ip", "x500:cn=a"] {
            assert!(bad.parse::<SubjectAltName>().is_err(), "{bad}");
        }
    }
}
