//! Key text: generation from the system CSPRNG, parsing, hashing.

use std::fmt;

use netproc_wire::SecretString;
use sha2::{Digest, Sha256};

use super::KeyStoreError;

/// Characters of a generated key id: `[a-z0-9]`. Ids chosen by a caller
/// (propagated credentials) are 1 to [`MAX_ID_LEN`] of `[a-z0-9-]`.
pub(super) const ID_LEN: usize = 12;
/// The longest key id.
pub(super) const MAX_ID_LEN: usize = 64;
/// Characters of a secret: base62, ≈ 190 bits.
pub(super) const SECRET_LEN: usize = 32;
pub(super) const ID_ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
pub(super) const SECRET_ALPHABET: &[u8] =
    b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";

/// A whole API key, `npk_<id>_<secret>`, as handed out once at creation or
/// rotation. Redacted in `Debug`; zeroized on drop.
#[derive(Clone)]
pub struct ApiKey(pub(super) SecretString);

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

pub(super) fn random_string(alphabet: &[u8], len: usize) -> Result<String, KeyStoreError> {
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

/// Splits `npk_<id>_<secret>`.
pub(super) fn parse_key(key: &str) -> Option<(&str, &str)> {
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

pub(super) fn sha256(data: &[u8]) -> [u8; 32] {
    Sha256::digest(data).into()
}
