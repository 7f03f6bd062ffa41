//! The built-in API-key store.

use netproc_wire::unix_ms;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::RwLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use netproc_pki::{CertIdentity, Fingerprint, SubjectAltName};
use netproc_wire::{Ed25519Proof, SecretString};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::authenticator::BoxFuture;
use crate::{AuthRejected, AuthRequest, Authenticator, Credential, Principal, PrivilegeSet};

/// Characters of a generated key id: `[a-z0-9]`. Ids chosen by a caller
/// (propagated credentials) are 1 to [`MAX_ID_LEN`] of `[a-z0-9-]`.
const ID_LEN: usize = 12;
/// The longest key id.
const MAX_ID_LEN: usize = 64;
/// Characters of a secret: base62, ≈ 190 bits.
const SECRET_LEN: usize = 32;
const ID_ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
const SECRET_ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";

/// Errors of the key store (not of authentication, which only ever says
/// [`AuthRejected`]).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KeyStoreError {
    /// No key with this id.
    #[error("no API key with id {0:?}")]
    UnknownKey(String),
    /// Reading or writing the store file failed.
    #[error(transparent)]
    File(#[from] netproc_pki::PkiError),
    /// The store file is not a valid key store.
    #[error("{path}: invalid key store: {reason}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What was wrong.
        reason: String,
    },
    /// The key is an Ed25519 key: it has no secret to rotate (register a
    /// new public key and revoke the old one instead).
    #[error("key {0} is an Ed25519 key; it has no secret to rotate")]
    NotAnApiKey(String),
    /// A binding string is not `sha256:<hex>` or a SAN (`dns:`, `uri:`, `ip:`, `email:`).
    #[error(
        "invalid certificate binding {0:?}: expected sha256:<fingerprint>, dns:…, uri:…, ip:… or email:…"
    )]
    InvalidBinding(String),
    /// The system random number generator failed.
    #[error("random number generator failed")]
    Random,
    /// A key id is not 1 to 64 characters of `[a-z0-9-]`.
    #[error("invalid key id {0:?}: expected 1 to 64 characters of [a-z0-9-]")]
    InvalidKeyId(String),
}

/// Ties a key to a client certificate: presented over any other certificate,
/// the key fails as `authentication_failed`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum CertBinding {
    /// The certificate's SHA-256 fingerprint (`sha256:…`).
    Fingerprint(Fingerprint),
    /// A subject alternative name the certificate must carry (`dns:…`, `uri:…`, …).
    San(SubjectAltName),
}

impl CertBinding {
    /// Whether `cert` satisfies the binding.
    pub fn matches(&self, cert: &CertIdentity) -> bool {
        match self {
            CertBinding::Fingerprint(fp) => {
                bool::from(fp.as_bytes().ct_eq(cert.fingerprint.as_bytes()))
            }
            CertBinding::San(san) => cert.sans.contains(san),
        }
    }
}

impl fmt::Display for CertBinding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CertBinding::Fingerprint(fp) => write!(f, "sha256:{fp}"),
            CertBinding::San(san) => write!(f, "{san}"),
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

type Listener = Box<dyn Fn(&KeyChange) + Send + Sync>;

/// A whole API key, `npk_<id>_<secret>`, as handed out once at creation or
/// rotation. Redacted in `Debug`; zeroized on drop.
#[derive(Clone)]
pub struct ApiKey(SecretString);

impl ApiKey {
    /// A new key `npk_<id>_<secret>` with a fresh secret from the system
    /// CSPRNG, and the SHA-256 of that secret (what a store keeps). For
    /// authorities that hand keys out and propagate only the hash.
    pub fn generate(id: &str) -> Result<(ApiKey, [u8; 32]), KeyStoreError> {
        if !valid_key_id(id) {
            return Err(KeyStoreError::InvalidKeyId(id.chars().take(64).collect()));
        }
        let secret = zeroize::Zeroizing::new(random_string(SECRET_ALPHABET, SECRET_LEN)?);
        let hash = sha256(secret.as_bytes());
        Ok((
            ApiKey(SecretString::new(format!("npk_{id}_{}", &*secret))),
            hash,
        ))
    }

    /// The key text. Show it once; never log it.
    pub fn expose(&self) -> &str {
        self.0.expose()
    }

    /// As a credential for a client.
    pub fn to_secret(&self) -> SecretString {
        self.0.clone()
    }
}

impl fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ApiKey(<redacted>)")
    }
}

#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Record {
    id: String,
    /// SHA-256 of the secret, hex.
    secret_sha256: String,
    generation: u64,
    privileges: PrivilegeSet,
    functions: Option<BTreeSet<String>>,
    binding: Option<CertBinding>,
    /// Expiry in unix seconds, rounded up (files written before
    /// `expires_at_ms` existed have only this).
    expires_at: Option<u64>,
    /// Expiry in unix milliseconds; wins over `expires_at` when present.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    expires_at_ms: Option<u64>,
    created_at: u64,
    label: Option<String>,
    /// For an Ed25519 key: its public key, hex. Such a record has no usable
    /// API secret (its `secret_sha256` is of a discarded random value).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    ed25519_public_key: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    max_sessions: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    single_active_session: Option<bool>,
    #[serde(skip)]
    hash: [u8; 32],
    /// Received from a propagation authority: kept in memory only (the
    /// target persists it in its own state), never written to the file.
    #[serde(skip)]
    propagated: bool,
    /// A rotated key's previous secret, still accepted until its deadline.
    #[serde(skip)]
    previous: Option<PreviousSecret>,
}

impl Record {
    /// The instant the key stops being valid, in unix milliseconds.
    fn expiry_ms(&self) -> Option<u64> {
        self.expires_at_ms
            .or_else(|| self.expires_at.map(|s| s.saturating_mul(1000)))
    }

    fn info(&self) -> KeyInfo {
        KeyInfo {
            id: self.id.clone(),
            generation: self.generation,
            privileges: self.privileges,
            functions: self.functions.clone(),
            binding: self.binding.clone(),
            expires_at: self.expires_at,
            expires_at_ms: self.expiry_ms(),
            created_at: self.created_at,
            label: self.label.clone(),
            ed25519_public_key: self.ed25519_public_key.clone(),
            max_sessions: self.max_sessions,
            single_active_session: self.single_active_session,
            propagated: self.propagated,
        }
    }
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StoreFile {
    version: u32,
    keys: Vec<Record>,
}

/// API keys, hashed at rest: the built-in [`Authenticator`].
///
/// Keys look like `npk_<id>_<secret>` (12 characters of `[a-z0-9]`, then 32
/// of base62 from a CSPRNG). The store keeps the id and the SHA-256 of the
/// secret, compares hashes in constant time, and does the same work for an
/// unknown id as for a wrong secret, so neither timing nor the answer tells
/// them apart. A key may be bound to a certificate, expire, and carry a
/// function allow-list. With a file, every change is saved (JSON, mode 0600,
/// written atomically); secrets are never stored.
///
/// ```
/// use netproc_auth::{ApiKeyStore, KeySpec};
///
/// let store = ApiKeyStore::in_memory();
/// let (info, key) = store.create(KeySpec::new("invoke_functions".parse().unwrap())).unwrap();
/// assert!(key.expose().starts_with(&format!("npk_{}_", info.id)));
/// assert_eq!(store.list().len(), 1);
/// let new_key = store.rotate(&info.id).unwrap();
/// assert_ne!(new_key.expose(), key.expose());
/// store.revoke(&info.id).unwrap();
/// assert!(store.list().is_empty());
/// ```
pub struct ApiKeyStore {
    keys: RwLock<BTreeMap<String, Record>>,
    path: Option<PathBuf>,
    listeners: RwLock<Vec<Listener>>,
}

impl fmt::Debug for ApiKeyStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ApiKeyStore")
            .field("keys", &self.read().len())
            .field("path", &self.path)
            .finish()
    }
}

fn unix_secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn random_string(alphabet: &[u8], len: usize) -> Result<String, KeyStoreError> {
    // Rejection sampling keeps every character equally likely.
    let limit = 256 - (256 % alphabet.len());
    let mut out = String::with_capacity(len);
    let mut buf = [0u8; 64];
    while out.len() < len {
        netproc_pki::random_bytes(&mut buf).map_err(|_| KeyStoreError::Random)?;
        for b in buf {
            if usize::from(b) < limit && out.len() < len {
                out.push(char::from(alphabet[usize::from(b) % alphabet.len()]));
            }
        }
    }
    Ok(out)
}

mod propagated;
pub use propagated::{
    PreviousSecret, PropagatedChange, PropagatedKey, PropagatedSecret, PropagationError,
};

/// Splits `npk_<id>_<secret>`.
fn parse_key(key: &str) -> Option<(&str, &str)> {
    let rest = key.strip_prefix("npk_")?;
    let (id, secret) = rest.split_once('_')?;
    let id_ok = valid_key_id(id);
    let secret_ok = secret.len() >= SECRET_LEN && secret.bytes().all(|b| b.is_ascii_alphanumeric());
    (id_ok && secret_ok).then_some((id, secret))
}

/// Whether `id` can be a key id: 1 to 64 characters of `[a-z0-9-]`.
pub fn valid_key_id(id: &str) -> bool {
    (1..=MAX_ID_LEN).contains(&id.len())
        && id.bytes().all(|b| ID_ALPHABET.contains(&b) || b == b'-')
}

fn sha256(data: &[u8]) -> [u8; 32] {
    Sha256::digest(data).into()
}

fn from_hex32(s: &str) -> Option<[u8; 32]> {
    s.parse::<Fingerprint>().ok().map(|f| *f.as_bytes())
}

impl ApiKeyStore {
    /// A store kept in memory only.
    pub fn in_memory() -> ApiKeyStore {
        ApiKeyStore {
            keys: RwLock::new(BTreeMap::new()),
            path: None,
            listeners: RwLock::new(Vec::new()),
        }
    }

    /// A store backed by `path`: loaded if it exists (it must not be
    /// readable by group or others), created on the first change otherwise.
    pub fn open(path: impl AsRef<Path>) -> Result<ApiKeyStore, KeyStoreError> {
        let path = path.as_ref().to_owned();
        let keys = if path.exists() {
            Self::load_file(&path)?
        } else {
            BTreeMap::new()
        };
        Ok(ApiKeyStore {
            keys: RwLock::new(keys),
            path: Some(path),
            listeners: RwLock::new(Vec::new()),
        })
    }

    fn load_file(path: &Path) -> Result<BTreeMap<String, Record>, KeyStoreError> {
        let bytes = netproc_pki::read_secret_file(path)?;
        let invalid = |reason: String| KeyStoreError::Invalid {
            path: path.to_owned(),
            reason,
        };
        let file: StoreFile = serde_json::from_slice(&bytes).map_err(|e| invalid(e.to_string()))?;
        if file.version != 1 {
            return Err(invalid(format!("unsupported version {}", file.version)));
        }
        let mut keys = BTreeMap::new();
        for mut record in file.keys {
            if parse_key(&format!("npk_{}_{}", record.id, "A".repeat(SECRET_LEN))).is_none() {
                return Err(invalid(format!("invalid key id {:?}", record.id)));
            }
            record.hash = from_hex32(&record.secret_sha256)
                .ok_or_else(|| invalid(format!("key {}: invalid secret_sha256", record.id)))?;
            if keys.insert(record.id.clone(), record).is_some() {
                return Err(invalid("duplicate key id".into()));
            }
        }
        Ok(keys)
    }
    /// Re-reads the backing file (e.g. after `netproc keys revoke` changed
    /// it). Keys that vanished, were rotated or changed are reported to the
    /// listeners (see [`on_change`](Self::on_change)).
    pub fn reload(&self) -> Result<(), KeyStoreError> {
        let Some(path) = &self.path else {
            return Ok(());
        };
        let mut new = Self::load_file(path)?;
        let mut changes = Vec::new();
        {
            let mut keys = self.write();
            for (id, old) in keys.iter() {
                if old.propagated && !new.contains_key(id) {
                    // Propagated keys are not in the file: they stay.
                    new.insert(id.clone(), old.clone());
                    continue;
                }
                match new.get(id) {
                    None => changes.push(KeyChange::Revoked { id: id.clone() }),
                    Some(r) if r.generation != old.generation => changes.push(KeyChange::Rotated {
                        id: id.clone(),
                        old_generation: old.generation,
                    }),
                    Some(r) if r.info() != old.info() => {
                        changes.push(KeyChange::Changed { id: id.clone() })
                    }
                    Some(_) => {}
                }
            }
            *keys = new;
        }
        for change in &changes {
            self.notify(change);
        }
        Ok(())
    }

    /// Calls `listener` after every revocation, rotation or change (from
    /// this store's methods or a [`reload`](Self::reload)), so live sessions
    /// can be ended. The listener runs on the caller's thread: keep it short.
    pub fn on_change(&self, listener: impl Fn(&KeyChange) + Send + Sync + 'static) {
        self.listeners
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(Box::new(listener));
    }

    fn notify(&self, change: &KeyChange) {
        for l in self
            .listeners
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
        {
            l(change);
        }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<String, Record>> {
        self.keys
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, BTreeMap<String, Record>> {
        self.keys
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Saves `keys` if the store has a file. Called with the write lock held,
    /// so saves are ordered like the changes.
    fn persist(&self, keys: &BTreeMap<String, Record>) -> Result<(), KeyStoreError> {
        let Some(path) = &self.path else {
            return Ok(());
        };
        let file = StoreFile {
            version: 1,
            keys: keys.values().filter(|r| !r.propagated).cloned().collect(),
        };
        let json = serde_json::to_vec_pretty(&file).map_err(|e| KeyStoreError::Invalid {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        netproc_pki::write_secret_file(path, &json, true)?;
        Ok(())
    }

    /// Creates a key. The returned [`ApiKey`] is the only copy of the secret.
    pub fn create(&self, spec: KeySpec) -> Result<(KeyInfo, ApiKey), KeyStoreError> {
        let secret = zeroize::Zeroizing::new(random_string(SECRET_ALPHABET, SECRET_LEN)?);
        let info = self.insert_new(spec, &secret, None)?;
        let id = &info.id;
        Ok((
            info.clone(),
            ApiKey(SecretString::new(format!("npk_{id}_{}", &*secret))),
        ))
    }

    /// Registers an Ed25519 public key with these privileges; clients then
    /// authenticate by signing their TLS connection's exporter value with
    /// the private key (see [`Credential::Ed25519`]). No secret is stored.
    pub fn register_ed25519(
        &self,
        spec: KeySpec,
        public_key: [u8; 32],
    ) -> Result<KeyInfo, KeyStoreError> {
        // An unguessable placeholder for the API secret, then discarded.
        let placeholder = zeroize::Zeroizing::new(random_string(SECRET_ALPHABET, SECRET_LEN)?);
        self.insert_new(spec, &placeholder, Some(hex::encode(public_key)))
    }

    fn insert_new(
        &self,
        spec: KeySpec,
        secret: &str,
        ed25519_public_key: Option<String>,
    ) -> Result<KeyInfo, KeyStoreError> {
        let mut keys = self.write();
        let id = loop {
            let id = random_string(ID_ALPHABET, ID_LEN)?;
            if !keys.contains_key(&id) {
                break id;
            }
        };
        let hash = sha256(secret.as_bytes());
        let record = Record {
            id: id.clone(),
            secret_sha256: hex::encode(hash),
            generation: 1,
            privileges: spec.privileges,
            functions: spec.functions,
            binding: spec.binding,
            expires_at: spec.expires_at.map(|t| unix_ms(t).div_ceil(1000)),
            expires_at_ms: spec.expires_at.map(unix_ms),
            created_at: unix_secs(SystemTime::now()),
            label: spec.label,
            ed25519_public_key,
            max_sessions: spec.max_sessions,
            single_active_session: spec.single_active_session,
            hash,
            propagated: false,
            previous: None,
        };
        let info = record.info();
        keys.insert(id.clone(), record);
        if let Err(e) = self.persist(&keys) {
            keys.remove(&id);
            return Err(e);
        }
        Ok(info)
    }

    /// Replaces a key's secret (same id, generation + 1). The old secret
    /// stops working at once.
    pub fn rotate(&self, id: &str) -> Result<ApiKey, KeyStoreError> {
        let mut keys = self.write();
        let secret = zeroize::Zeroizing::new(random_string(SECRET_ALPHABET, SECRET_LEN)?);
        let record = keys
            .get_mut(id)
            .ok_or_else(|| KeyStoreError::UnknownKey(id.chars().take(64).collect()))?;
        if record.ed25519_public_key.is_some() {
            return Err(KeyStoreError::NotAnApiKey(id.to_owned()));
        }
        let previous = record.clone();
        record.hash = sha256(secret.as_bytes());
        record.secret_sha256 = hex::encode(record.hash);
        record.generation += 1;
        if let Err(e) = self.persist(&keys) {
            keys.insert(id.to_owned(), previous);
            return Err(e);
        }
        drop(keys);
        self.notify(&KeyChange::Rotated {
            id: id.to_owned(),
            old_generation: previous.generation,
        });
        Ok(ApiKey(SecretString::new(format!("npk_{id}_{}", &*secret))))
    }

    /// Deletes a key; it stops working at once. Returns what it was.
    pub fn revoke(&self, id: &str) -> Result<KeyInfo, KeyStoreError> {
        let mut keys = self.write();
        let record = keys
            .remove(id)
            .ok_or_else(|| KeyStoreError::UnknownKey(id.chars().take(64).collect()))?;
        if let Err(e) = self.persist(&keys) {
            keys.insert(id.to_owned(), record);
            return Err(e);
        }
        drop(keys);
        self.notify(&KeyChange::Revoked { id: id.to_owned() });
        Ok(record.info())
    }

    /// Every key's public facts.
    pub fn list(&self) -> Vec<KeyInfo> {
        self.read().values().map(Record::info).collect()
    }

    /// One key's public facts.
    pub fn get(&self, id: &str) -> Option<KeyInfo> {
        self.read().get(id).map(Record::info)
    }

    /// Checks a presented key against the store, over certificate `cert`, at `now`.
    pub fn verify(
        &self,
        key: &str,
        cert: &CertIdentity,
        now: SystemTime,
    ) -> Result<Principal, AuthRejected> {
        // Equal work on every path: parse, look up (or use a dummy record),
        // hash the secret, compare in constant time.
        const DUMMY_HASH: [u8; 32] = [0x5a; 32];
        let parsed = parse_key(key);
        let (id, secret) = parsed.unwrap_or(("", key));
        let keys = self.read();
        let record = keys.get(id);
        let presented = sha256(secret.as_bytes());
        let stored = record.map_or(&DUMMY_HASH, |r| &r.hash);
        let hash_ok = bool::from(presented.ct_eq(stored));
        // A rotated key's previous secret, within its overlap window.
        let previous = record
            .and_then(|r| r.previous.as_ref())
            .filter(|p| unix_ms(now) < p.valid_until_ms);
        let previous_ok =
            bool::from(presented.ct_eq(previous.map_or(&DUMMY_HASH, |p| &p.secret_sha256)));
        // A key bound to another certificate: failures over this one must
        // not count against it, or anyone could lock it out.
        let bound_elsewhere =
            record.is_some_and(|r| r.binding.as_ref().is_some_and(|b| !b.matches(cert)));
        let api_key = record.is_some_and(|r| r.ed25519_public_key.is_none());
        let generation = match (record, previous) {
            (Some(r), _) if hash_ok => r.generation,
            (Some(_), Some(p)) if previous_ok => p.generation,
            _ => 0,
        };
        let Some(record) = record.filter(|_| generation > 0 && api_key && parsed.is_some()) else {
            let rejected = AuthRejected::new(if parsed.is_none() {
                "malformed API key"
            } else if keys.contains_key(id) {
                "wrong secret for API key"
            } else {
                "unknown API key id"
            });
            return Err(if bound_elsewhere {
                rejected.not_against_key()
            } else {
                rejected
            });
        };
        admit(record, generation, cert, now)
    }

    /// Checks an Ed25519 proof made over the TLS connection whose exporter
    /// value is `channel_binding`, over certificate `cert`, at `now`: the
    /// key must be registered, the timestamp within
    /// [`ED25519_FRESHNESS`] of `now`, and the signature valid.
    pub fn verify_ed25519(
        &self,
        proof: &Ed25519Proof,
        channel_binding: &[u8; 32],
        cert: &CertIdentity,
        now: SystemTime,
    ) -> Result<Principal, AuthRejected> {
        let keys = self.read();
        let id = proof.key_id.as_str();
        let Some((record, public_key)) = keys.get(id).and_then(|r| {
            let pk = from_hex32(r.ed25519_public_key.as_deref()?)?;
            Some((r, pk))
        }) else {
            return Err(AuthRejected::new("unknown Ed25519 key id"));
        };
        let now_ms = unix_ms(now);
        let skew = u64::try_from(ED25519_FRESHNESS.as_millis()).unwrap_or(u64::MAX);
        if now_ms.abs_diff(proof.timestamp_ms) > skew {
            return Err(AuthRejected::new(format!(
                "Ed25519 proof for {id}: timestamp outside the freshness window"
            )));
        }
        let message = Ed25519Proof::signed_message(id, channel_binding, proof.timestamp_ms);
        if !netproc_pki::verify_ed25519(&public_key, &message, &proof.signature) {
            return Err(AuthRejected::new(format!(
                "Ed25519 proof for {id}: bad signature (wrong key, or made for another connection)"
            )));
        }
        admit(record, record.generation, cert, now)
    }
}

/// How far an Ed25519 proof's timestamp may be from the server's clock.
pub const ED25519_FRESHNESS: Duration = Duration::from_secs(30);

/// The checks after the credential itself: expiry, certificate binding.
fn admit(
    record: &Record,
    generation: u64,
    cert: &CertIdentity,
    now: SystemTime,
) -> Result<Principal, AuthRejected> {
    let id = record.id.as_str();
    if let Some(expiry) = record.expiry_ms()
        && unix_ms(now) >= expiry
    {
        return Err(AuthRejected::new(format!("key {id} expired")));
    }
    if let Some(binding) = &record.binding
        && !binding.matches(cert)
    {
        return Err(AuthRejected::new(format!(
            "key {id} is bound to {binding}, presented over certificate {}",
            cert.fingerprint
        ))
        .not_against_key());
    }
    let mut principal = Principal::new(id, record.privileges).with_key(id, generation);
    principal.functions = record.functions.clone();
    principal.max_sessions = record.max_sessions;
    principal.single_active_session = record.single_active_session;
    principal.expires_at = record.expiry_ms().map(netproc_wire::from_unix_ms);
    Ok(principal)
}

impl Authenticator for ApiKeyStore {
    fn authenticate<'a>(
        &'a self,
        request: AuthRequest,
    ) -> BoxFuture<'a, Result<Principal, AuthRejected>> {
        Box::pin(async move {
            match &request.credential {
                Credential::ApiKey(key) => {
                    self.verify(key.expose(), &request.cert, SystemTime::now())
                }
                Credential::Ed25519 {
                    proof,
                    channel_binding,
                } => self.verify_ed25519(proof, channel_binding, &request.cert, SystemTime::now()),
            }
        })
    }

    /// Whether the store holds this id (local or propagated, API key or
    /// Ed25519 key).
    fn knows_key_id(&self, key_id: &str) -> Option<bool> {
        Some(self.read().contains_key(key_id))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_keys_have_the_documented_shape() {
        let store = ApiKeyStore::in_memory();
        let (info, key) = store.create(KeySpec::default()).unwrap();
        let (id, secret) = parse_key(key.expose()).unwrap();
        assert_eq!(id, info.id);
        assert_eq!(id.len(), 12);
        assert_eq!(secret.len(), 32);
        assert!(!secret.contains('_'));
        assert!(!format!("{key:?}").contains(secret));
    }

    #[test]
    fn malformed_keys_do_not_parse() {
        for bad in [
            "",
            "npk_",
            "npk_Upper_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
            "npk_under_score_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
            "xyz_abcdefghijkl_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
            "npk_abcdefghijkl_short",
            "npk_ABCDEFGHIJKL_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
        ] {
            assert!(parse_key(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn bindings_parse_and_print() {
        let fp = Fingerprint::of(b"x");
        let b: CertBinding = format!("sha256:{}", fp.to_colon_hex()).parse().unwrap();
        assert_eq!(b, CertBinding::Fingerprint(fp));
        assert_eq!(b.to_string(), format!("sha256:{fp}"));
        let b: CertBinding = "uri:spiffe://x/y".parse().unwrap();
        assert_eq!(b.to_string(), "uri:spiffe://x/y");
        assert!("sha256:nothex".parse::<CertBinding>().is_err());
        assert!("bogus".parse::<CertBinding>().is_err());
    }
}
