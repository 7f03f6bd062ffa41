//! The built-in API-key store: hashed keys in a JSON file (or in memory),
//! bindings, expiry, change listeners, and the propagated keys beside them.
//!
//! - `spec`: what a caller says and is told — `KeySpec`, `CertBinding`,
//!   `KeyInfo`, `KeyChange`.
//! - `secret`: key text — generation, parsing, hashing, `ApiKey`.
//! - `verify`: checking a presented key or Ed25519 proof, the
//!   `Authenticator` implementation.
//! - `propagated`: keys received from a propagation authority.

use netproc_wire::unix_ms;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::RwLock;
use std::time::{SystemTime, UNIX_EPOCH};

use netproc_pki::Fingerprint;
use netproc_wire::SecretString;
use serde::{Deserialize, Serialize};

use crate::PrivilegeSet;

/// Errors of the key store (not of authentication, which only ever says
/// [`AuthRejected`](crate::AuthRejected)).
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

type Listener = Box<dyn Fn(&KeyChange) + Send + Sync>;

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

/// API keys, hashed at rest: the built-in [`Authenticator`](crate::Authenticator).
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

mod propagated;
mod secret;
mod spec;
mod verify;

pub use propagated::{
    PreviousSecret, PropagatedChange, PropagatedKey, PropagatedSecret, PropagationError,
};
pub use secret::{ApiKey, valid_key_id};
use secret::{ID_ALPHABET, ID_LEN, SECRET_ALPHABET, SECRET_LEN, parse_key, random_string, sha256};
pub use spec::{CertBinding, KeyChange, KeyInfo, KeySpec};
pub use verify::ED25519_FRESHNESS;

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
    /// the private key (see [`Credential::Ed25519`](crate::Credential::Ed25519)). No secret is stored.
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
