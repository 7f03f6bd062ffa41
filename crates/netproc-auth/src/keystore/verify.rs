//! Checking a presented API key or Ed25519 proof against the store.

use netproc_wire::unix_ms;
use std::time::{Duration, SystemTime};

use netproc_pki::CertIdentity;
use netproc_wire::Ed25519Proof;
use subtle::ConstantTimeEq;

use super::secret::{parse_key, sha256};
use super::{ApiKeyStore, Record, from_hex32};

use crate::authenticator::BoxFuture;
use crate::{AuthRejected, AuthRequest, Authenticator, Credential, Principal};

impl ApiKeyStore {
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
    principal.cert_binding = record.binding.as_ref().map(ToString::to_string);
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
