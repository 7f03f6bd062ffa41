//! What a caller says about a key and is told about it.

use std::collections::BTreeSet;
use std::fmt;
use std::str::FromStr;
use std::time::SystemTime;

use netproc_pki::{CertIdentity, Fingerprint, SubjectAltName};
use serde::{Deserialize, Serialize};
use subtle::ConstantTimeEq;

use super::KeyStoreError;

use crate::PrivilegeSet;

/// Ties a key to a client certificate: presented over any other certificate,
/// the key fails as `authentication_failed`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum CertBinding {
    /// The certificate's SHA-256 fingerprint (`sha256:…`).
    Fingerprint(Fingerprint),
    /// A subject alternative name the certificate must carry (`dns:…`, `uri:…`, …).
    San(SubjectAltName),
    /// The SHA-256 of the certificate's SubjectPublicKeyInfo (`spki:…`):
    /// it survives renewal on the same key (enrollment), where a
    /// certificate fingerprint changes with every certificate.
    Spki(Fingerprint),
}

impl CertBinding {
    /// Whether `cert` satisfies the binding.
    pub fn matches(&self, cert: &CertIdentity) -> bool {
        match self {
            CertBinding::Fingerprint(fp) => {
                bool::from(fp.as_bytes().ct_eq(cert.fingerprint.as_bytes()))
            }
            CertBinding::San(san) => cert.sans.contains(san),
            CertBinding::Spki(fp) => {
                bool::from(fp.as_bytes().ct_eq(cert.spki_fingerprint.as_bytes()))
            }
        }
    }
}

impl fmt::Display for CertBinding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CertBinding::Fingerprint(fp) => write!(f, "sha256:{fp}"),
            CertBinding::San(san) => write!(f, "{san}"),
            CertBinding::Spki(fp) => write!(f, "spki:{fp}"),
        }
    }
}

impl FromStr for CertBinding {
    type Err = KeyStoreError;
    fn from_str(s: &str) -> Result<Self, KeyStoreError> {
        let invalid = || KeyStoreError::InvalidBinding(s.chars().take(80).collect());
        if s.get(..7)
            .is_some_and(|p| p.eq_ignore_ascii_case("sha256:"))
        {
            return s
                .parse()
                .map(CertBinding::Fingerprint)
                .map_err(|_| invalid());
        }
        if let Some(hex) = s
            .get(..5)
            .filter(|p| p.eq_ignore_ascii_case("spki:"))
            .map(|_| &s[5..])
        {
            return hex.parse().map(CertBinding::Spki).map_err(|_| invalid());
        }
        s.parse().map(CertBinding::San).map_err(|_| invalid())
    }
}

impl Serialize for CertBinding {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for CertBinding {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

/// What a new key may do.
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct KeySpec {
    /// Its privileges.
    pub privileges: PrivilegeSet,
    /// If set, the only functions it may call.
    pub functions: Option<BTreeSet<String>>,
    /// If set, the certificate it must be presented over.
    pub binding: Option<CertBinding>,
    /// If set, when it stops working.
    pub expires_at: Option<SystemTime>,
    /// A label for listings.
    pub label: Option<String>,
    /// Overrides the server's `max_sessions_per_principal` for this key.
    pub max_sessions: Option<u32>,
    /// Overrides the server's `single_active_session` for this key.
    pub single_active_session: Option<bool>,
}

impl From<PrivilegeSet> for KeySpec {
    /// A key with these privileges and nothing else.
    fn from(privileges: PrivilegeSet) -> KeySpec {
        KeySpec::new(privileges)
    }
}

impl KeySpec {
    /// A key with these privileges.
    pub fn new(privileges: PrivilegeSet) -> KeySpec {
        KeySpec {
            privileges,
            ..KeySpec::default()
        }
    }

    /// Restricts the functions it may call.
    pub fn functions<I: IntoIterator<Item = S>, S: Into<String>>(
        mut self,
        functions: I,
    ) -> KeySpec {
        self.functions = Some(functions.into_iter().map(Into::into).collect());
        self
    }

    /// Binds it to a certificate.
    pub fn binding(mut self, binding: CertBinding) -> KeySpec {
        self.binding = Some(binding);
        self
    }

    /// Makes it expire.
    pub fn expires_at(mut self, at: SystemTime) -> KeySpec {
        self.expires_at = Some(at);
        self
    }

    /// Labels it.
    pub fn label(mut self, label: impl Into<String>) -> KeySpec {
        self.label = Some(label.into());
        self
    }

    /// Its own session policy, overriding the server's: at most
    /// `max_sessions` at once (0 = no cap) and/or one active session.
    pub fn session_policy(
        mut self,
        max_sessions: Option<u32>,
        single_active_session: Option<bool>,
    ) -> KeySpec {
        self.max_sessions = max_sessions;
        self.single_active_session = single_active_session;
        self
    }
}

/// A key's public facts, as listed. Never the secret or its hash.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct KeyInfo {
    /// The key id.
    pub id: String,
    /// Incremented by each rotation.
    pub generation: u64,
    /// Its privileges.
    pub privileges: PrivilegeSet,
    /// Its function allow-list.
    pub functions: Option<BTreeSet<String>>,
    /// Its certificate binding.
    pub binding: Option<CertBinding>,
    /// Its expiry, in unix seconds (rounded up; see `expires_at_ms`).
    pub expires_at: Option<u64>,
    /// Its expiry, in unix milliseconds: the instant it stops being valid.
    pub expires_at_ms: Option<u64>,
    /// Its creation time, in unix seconds.
    pub created_at: u64,
    /// Its label.
    pub label: Option<String>,
    /// For an Ed25519 key, its public key (hex); `None` for an API key.
    pub ed25519_public_key: Option<String>,
    /// Its own `max_sessions_per_principal`, if any.
    pub max_sessions: Option<u32>,
    /// Its own `single_active_session`, if any.
    pub single_active_session: Option<bool>,
    /// Received from a propagation authority (not in the store's file).
    pub propagated: bool,
}

/// A change to a key that live sessions must follow.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum KeyChange {
    /// The key was revoked (or vanished from the file on reload).
    Revoked {
        /// The key id.
        id: String,
    },
    /// The key's secret was replaced; sessions on `old_generation` must end.
    Rotated {
        /// The key id.
        id: String,
        /// The generation that stopped working.
        old_generation: u64,
    },
    /// The key's privileges, allow-list, binding or expiry changed: its
    /// sessions, whose privileges are fixed, must end.
    Changed {
        /// The key id.
        id: String,
    },
}
