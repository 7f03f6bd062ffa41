//! A live list of client certificates refused at the handshake, whatever
//! their chain and CRLs say: by issuer and serial, or by the SHA-256 of
//! their public key. Each entry lasts until the certificate's own notAfter
//! (after it the certificate is refused anyway), so the list is bounded by
//! expiry, and by [`DenyList::MAX_ENTRIES`].

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::SystemTime;

use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, SignatureScheme};
use rustls_pki_types::{CertificateDer, UnixTime};

use crate::{CertIdentity, Fingerprint};

/// Which certificates an entry refuses.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DeniedCert {
    /// The certificate with this serial (lowercase hex, as
    /// [`CertIdentity::serial`]) from this issuer (its distinguished name,
    /// as [`CertIdentity::issuer`]).
    Serial {
        /// The issuer's distinguished name.
        issuer: String,
        /// The serial, lowercase hex.
        serial: String,
    },
    /// Every certificate over this public key (SHA-256 of its
    /// SubjectPublicKeyInfo): a stolen key stays refused across re-issue.
    Spki(Fingerprint),
}

impl DeniedCert {
    /// Whether `cert` is one this entry refuses.
    pub fn matches(&self, cert: &CertIdentity) -> bool {
        match self {
            DeniedCert::Serial { issuer, serial } => {
                *issuer == cert.issuer && *serial == cert.serial
            }
            DeniedCert::Spki(fp) => *fp == cert.spki_fingerprint,
        }
    }

    /// Both ways to deny `cert`: its serial from its issuer, and its key.
    pub fn of(cert: &CertIdentity) -> [DeniedCert; 2] {
        [
            DeniedCert::Serial {
                issuer: cert.issuer.clone(),
                serial: cert.serial.clone(),
            },
            DeniedCert::Spki(cert.spki_fingerprint),
        ]
    }
}

type Listener = Box<dyn Fn(&[DeniedCert]) + Send + Sync>;

/// The live deny list a server's handshakes consult (cheap to clone; the
/// clones share it). Changing it calls the listeners with the entries
/// added, so a server can end the sessions over them.
///
/// ```
/// use netproc_pki::{CaParams, CertificateAuthority, DeniedCert, DenyList, LeafParams};
///
/// let ca = CertificateAuthority::generate(&CaParams::new("ca")).unwrap();
/// let alice = ca.issue(&LeafParams::client("alice")).unwrap();
/// let cert = alice.cert_identity();
/// let list = DenyList::new();
/// assert!(!list.refuses(&cert));
/// list.insert(DeniedCert::Spki(cert.spki_fingerprint), cert.not_after);
/// assert!(list.refuses(&cert));
/// assert_eq!(list.len(), 1);
/// ```
#[derive(Clone, Default)]
pub struct DenyList {
    entries: Arc<RwLock<HashMap<DeniedCert, SystemTime>>>,
    listeners: Arc<Mutex<Vec<Listener>>>,
}

impl std::fmt::Debug for DenyList {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DenyList")
            .field("len", &self.len())
            .finish()
    }
}

impl DenyList {
    /// Entries held at most; past it the entries nearest their expiry are
    /// dropped first (they would go soonest anyway).
    pub const MAX_ENTRIES: usize = 100_000;

    /// An empty list.
    pub fn new() -> DenyList {
        DenyList::default()
    }

    /// Entries held.
    pub fn len(&self) -> usize {
        self.read().len()
    }

    /// Whether it holds none.
    pub fn is_empty(&self) -> bool {
        self.read().is_empty()
    }

    /// Whether `cert` is refused (an entry matches it): two lookups,
    /// whatever the list's size.
    pub fn refuses(&self, cert: &CertIdentity) -> bool {
        let map = self.read();
        DeniedCert::of(cert).iter().any(|d| map.contains_key(d))
    }

    /// Every entry with its expiry, in a stable order.
    pub fn entries(&self) -> Vec<(DeniedCert, SystemTime)> {
        let mut all: Vec<_> = self.read().iter().map(|(d, t)| (d.clone(), *t)).collect();
        all.sort();
        all
    }

    /// Refuses `cert` until `not_after`; an entry already past it is not
    /// kept.
    pub fn insert(&self, cert: DeniedCert, not_after: SystemTime) {
        self.extend([(cert, not_after)]);
    }

    /// Refuses each of `entries` (see [`insert`](Self::insert)).
    pub fn extend(&self, entries: impl IntoIterator<Item = (DeniedCert, SystemTime)>) {
        let now = SystemTime::now();
        let added: Vec<DeniedCert> = {
            let mut map = self.write();
            let mut added = Vec::new();
            for (cert, not_after) in entries {
                if not_after > now && map.insert(cert.clone(), not_after).is_none() {
                    added.push(cert);
                }
            }
            bound(&mut map, now);
            added
        };
        self.notify(&added);
    }

    /// Stops refusing `cert`; whether it was listed.
    pub fn remove(&self, cert: &DeniedCert) -> bool {
        self.write().remove(cert).is_some()
    }

    /// Holds exactly `entries` from now on (a snapshot).
    pub fn replace(&self, entries: impl IntoIterator<Item = (DeniedCert, SystemTime)>) {
        let now = SystemTime::now();
        let added: Vec<DeniedCert> = {
            let mut map = self.write();
            let old = std::mem::take(&mut *map);
            for (cert, not_after) in entries {
                if not_after > now {
                    map.insert(cert, not_after);
                }
            }
            bound(&mut map, now);
            map.keys()
                .filter(|c| !old.contains_key(*c))
                .cloned()
                .collect()
        };
        self.notify(&added);
    }

    /// Drops the entries whose certificates have expired by `now`; how
    /// many.
    pub fn prune(&self, now: SystemTime) -> usize {
        let mut map = self.write();
        let before = map.len();
        map.retain(|_, not_after| *not_after > now);
        before - map.len()
    }

    /// Calls `f` with the entries each later change adds (not those
    /// removed), after the change is in place.
    pub fn on_added(&self, f: impl Fn(&[DeniedCert]) + Send + Sync + 'static) {
        self.listeners
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(Box::new(f));
    }

    fn notify(&self, added: &[DeniedCert]) {
        if added.is_empty() {
            return;
        }
        for f in self
            .listeners
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
        {
            f(added);
        }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, HashMap<DeniedCert, SystemTime>> {
        self.entries.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<DeniedCert, SystemTime>> {
        self.entries.write().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Drops expired entries, then the nearest expiries past the bound.
fn bound(map: &mut HashMap<DeniedCert, SystemTime>, now: SystemTime) {
    map.retain(|_, t| *t > now);
    if map.len() > DenyList::MAX_ENTRIES {
        let mut by_expiry: Vec<_> = map.iter().map(|(c, t)| (*t, c.clone())).collect();
        by_expiry.sort();
        let excess = map.len() - DenyList::MAX_ENTRIES;
        for (_, c) in by_expiry.into_iter().take(excess) {
            map.remove(&c);
        }
    }
}

/// A client-certificate verifier that, after the normal chain and CRL
/// checks, refuses a certificate on the deny list (as revoked).
#[derive(Debug)]
pub(crate) struct DenyingVerifier {
    pub(crate) inner: Arc<dyn ClientCertVerifier>,
    pub(crate) deny: DenyList,
}

impl ClientCertVerifier for DenyingVerifier {
    fn offer_client_auth(&self) -> bool {
        self.inner.offer_client_auth()
    }

    fn client_auth_mandatory(&self) -> bool {
        self.inner.client_auth_mandatory()
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let verified = self
            .inner
            .verify_client_cert(end_entity, intermediates, now)?;
        if self.deny.is_empty() {
            return Ok(verified);
        }
        let leaf = CertIdentity::from_der(end_entity)
            .map_err(|_| rustls::Error::InvalidCertificate(CertificateError::BadEncoding))?;
        if self.deny.refuses(&leaf) {
            return Err(rustls::Error::InvalidCertificate(CertificateError::Revoked));
        }
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}
