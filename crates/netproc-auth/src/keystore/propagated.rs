//! Keys received from a propagation authority.
//!
//! They live beside the locally configured keys in the same store, are
//! never written to its file (the receiving server persists them in its own
//! state), and cannot take over a local key's id.

use netproc_wire::unix_ms;
use std::collections::{BTreeMap, BTreeSet};
use std::time::SystemTime;

use super::{ApiKeyStore, CertBinding, KeyChange, Record, unix_secs, valid_key_id};
use crate::PrivilegeSet;

/// How a propagated key proves itself. Never a secret: a hash or a public key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PropagatedSecret {
    /// An API key, verified against the SHA-256 of its secret.
    ApiKey {
        /// SHA-256 of the secret part of `npk_<id>_<secret>`.
        secret_sha256: [u8; 32],
    },
    /// An Ed25519 key, verified by signature.
    Ed25519 {
        /// The public key.
        public_key: [u8; 32],
    },
}

/// A rotated API key's previous secret, accepted until `valid_until_ms`
/// (the rotation's overlap window).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PreviousSecret {
    /// SHA-256 of the previous secret.
    pub secret_sha256: [u8; 32],
    /// The previous generation (sessions on it end when it expires).
    pub generation: u64,
    /// Unix milliseconds after which the previous secret stops working.
    pub valid_until_ms: u64,
}

/// A key as an authority describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct PropagatedKey {
    /// The key id: 1 to 64 characters of `[a-z0-9-]`.
    pub id: String,
    /// Its secret's hash, or its public key.
    pub secret: PropagatedSecret,
    /// Incremented by each rotation (at least 1).
    pub generation: u64,
    /// Its privileges.
    pub privileges: PrivilegeSet,
    /// Its function allow-list.
    pub functions: Option<BTreeSet<String>>,
    /// Its certificate binding.
    pub binding: Option<CertBinding>,
    /// Its expiry, unix seconds.
    pub expires_at: Option<u64>,
    /// The previous secret during a rotation's overlap window.
    pub previous: Option<PreviousSecret>,
}

impl PropagatedKey {
    /// A key with no allow-list, binding, expiry or previous secret.
    pub fn new(
        id: impl Into<String>,
        secret: PropagatedSecret,
        generation: u64,
        privileges: PrivilegeSet,
    ) -> PropagatedKey {
        PropagatedKey {
            id: id.into(),
            secret,
            generation,
            privileges,
            functions: None,
            binding: None,
            expires_at: None,
            previous: None,
        }
    }

    fn validate(&self) -> Result<(), PropagationError> {
        let invalid = |why: &str| {
            Err(PropagationError::Invalid(format!(
                "key {:?}: {why}",
                self.id
            )))
        };
        if !valid_key_id(&self.id) {
            return invalid("the id is not 1 to 64 characters of [a-z0-9-]");
        }
        if self.generation == 0 {
            return invalid("generation 0");
        }
        if let Some(p) = &self.previous {
            if p.generation >= self.generation {
                return invalid("the previous secret's generation is not older");
            }
            if matches!(self.secret, PropagatedSecret::Ed25519 { .. }) {
                return invalid("an Ed25519 key has no previous secret");
            }
        }
        Ok(())
    }

    fn to_record(&self, created_at: u64) -> Record {
        let (hash, ed25519_public_key) = match self.secret {
            PropagatedSecret::ApiKey { secret_sha256 } => (secret_sha256, None),
            // `verify` refuses API keys for an Ed25519 record before the
            // hash matters; all zeros is no secret's SHA-256.
            PropagatedSecret::Ed25519 { public_key } => ([0; 32], Some(hex::encode(public_key))),
        };
        Record {
            id: self.id.clone(),
            secret_sha256: hex::encode(hash),
            generation: self.generation,
            privileges: self.privileges,
            functions: self.functions.clone(),
            binding: self.binding.clone(),
            expires_at: self.expires_at,
            expires_at_ms: None,
            created_at,
            label: None,
            ed25519_public_key,
            max_sessions: None,
            single_active_session: None,
            hash,
            propagated: true,
            previous: self.previous,
        }
    }

    fn from_record(r: &Record) -> PropagatedKey {
        let secret = match r.ed25519_public_key.as_deref().and_then(super::from_hex32) {
            Some(public_key) => PropagatedSecret::Ed25519 { public_key },
            None => PropagatedSecret::ApiKey {
                secret_sha256: r.hash,
            },
        };
        PropagatedKey {
            id: r.id.clone(),
            secret,
            generation: r.generation,
            privileges: r.privileges,
            functions: r.functions.clone(),
            binding: r.binding.clone(),
            expires_at: r.expires_at,
            previous: r.previous,
        }
    }
}

/// A change an authority asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum PropagatedChange {
    /// Create or replace one key.
    Upsert(PropagatedKey),
    /// Remove one key (nothing happens if it is not there).
    Delete {
        /// The key id.
        id: String,
    },
    /// Replace every propagated key with these (a snapshot).
    Replace(Vec<PropagatedKey>),
}

/// Why a propagated change was refused. Nothing was applied.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PropagationError {
    /// The id belongs to a locally configured key.
    #[error("key {0} is configured locally; a propagated key cannot replace it")]
    Conflict(String),
    /// The change is not well formed.
    #[error("{0}")]
    Invalid(String),
}

/// The generations a record accepts at `now_ms`.
fn live_generations(r: &Record, now_ms: u64) -> BTreeSet<u64> {
    let mut g = BTreeSet::from([r.generation]);
    if let Some(p) = r.previous.filter(|p| now_ms < p.valid_until_ms) {
        g.insert(p.generation);
    }
    g
}

/// What live sessions must do when `old` becomes `new`.
fn diff(old: &Record, new: Option<&Record>, now_ms: u64, out: &mut Vec<KeyChange>) {
    let id = old.id.clone();
    let Some(new) = new else {
        out.push(KeyChange::Revoked { id });
        return;
    };
    let facts = |r: &Record| {
        (
            r.privileges,
            r.functions.clone(),
            r.binding.clone(),
            r.expires_at,
            r.ed25519_public_key.clone(),
        )
    };
    if facts(old) != facts(new) {
        out.push(KeyChange::Changed { id });
        return;
    }
    let kept = live_generations(new, now_ms);
    for g in live_generations(old, now_ms).difference(&kept) {
        out.push(KeyChange::Rotated {
            id: id.clone(),
            old_generation: *g,
        });
    }
}

impl ApiKeyStore {
    /// Checks `change` against the store without applying it: a key id
    /// that exists locally is a [`PropagationError::Conflict`], a malformed
    /// key [`PropagationError::Invalid`].
    pub fn check_propagated(&self, change: &PropagatedChange) -> Result<(), PropagationError> {
        let keys = self.read();
        let check = |k: &PropagatedKey| {
            k.validate()?;
            match keys.get(&k.id) {
                Some(r) if !r.propagated => Err(PropagationError::Conflict(k.id.clone())),
                _ => Ok(()),
            }
        };
        match change {
            PropagatedChange::Upsert(k) => check(k),
            PropagatedChange::Delete { id } => match keys.get(id) {
                Some(r) if !r.propagated => Err(PropagationError::Conflict(id.clone())),
                _ => Ok(()),
            },
            PropagatedChange::Replace(all) => {
                let mut seen = BTreeSet::new();
                for k in all {
                    check(k)?;
                    if !seen.insert(k.id.as_str()) {
                        return Err(PropagationError::Invalid(format!(
                            "key {:?} appears twice in the snapshot",
                            k.id
                        )));
                    }
                }
                Ok(())
            }
        }
    }

    /// Applies a change from a propagation authority. Idempotent: applying
    /// the same change twice changes nothing the second time. Live sessions
    /// are told through [`on_change`](Self::on_change): a deleted key's, a
    /// changed key's (privileges are fixed for a session's life) and a
    /// rotated key's sessions on a generation that no longer works.
    pub fn apply_propagated(&self, change: PropagatedChange) -> Result<(), PropagationError> {
        self.check_propagated(&change)?;
        let now = SystemTime::now();
        let (now_ms, created_at) = (unix_ms(now), unix_secs(now));
        let mut changes = Vec::new();
        {
            let mut keys = self.write();
            match change {
                PropagatedChange::Upsert(k) => {
                    let created = keys.get(&k.id).map_or(created_at, |r| r.created_at);
                    let record = k.to_record(created);
                    if let Some(old) = keys.get(&k.id) {
                        diff(old, Some(&record), now_ms, &mut changes);
                    }
                    keys.insert(k.id, record);
                }
                PropagatedChange::Delete { id } => {
                    if let Some(old) = keys.remove(&id) {
                        diff(&old, None, now_ms, &mut changes);
                    }
                }
                PropagatedChange::Replace(all) => {
                    let mut new: BTreeMap<String, Record> = all
                        .iter()
                        .map(|k| {
                            let created = keys.get(&k.id).map_or(created_at, |r| r.created_at);
                            (k.id.clone(), k.to_record(created))
                        })
                        .collect();
                    for (id, old) in keys.iter().filter(|(_, r)| r.propagated) {
                        diff(old, new.get(id), now_ms, &mut changes);
                    }
                    keys.retain(|_, r| !r.propagated);
                    keys.append(&mut new);
                }
            }
        }
        for change in &changes {
            self.notify(change);
        }
        Ok(())
    }

    /// Ends a rotated key's overlap window now: its previous secret (if it
    /// is of `generation`) stops working and the sessions on it are told.
    /// Returns whether anything changed.
    pub fn expire_previous(&self, id: &str, generation: u64) -> bool {
        let expired = {
            let mut keys = self.write();
            match keys.get_mut(id) {
                Some(r) if r.previous.is_some_and(|p| p.generation == generation) => {
                    r.previous = None;
                    true
                }
                _ => false,
            }
        };
        if expired {
            self.notify(&KeyChange::Rotated {
                id: id.to_owned(),
                old_generation: generation,
            });
        }
        expired
    }

    /// Every propagated key, by id.
    pub fn propagated_keys(&self) -> Vec<PropagatedKey> {
        self.read()
            .values()
            .filter(|r| r.propagated)
            .map(PropagatedKey::from_record)
            .collect()
    }
}
