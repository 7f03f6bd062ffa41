//! Ed25519 keys for authentication bound to one TLS connection.
//!
//! A client proves possession of its key by signing a message that contains
//! the connection's TLS keying-material exporter value ([RFC 8446 §7.5]
//! with [`AUTH_EXPORTER_LABEL`]); a signature is therefore worthless on any
//! other connection, and no secret ever crosses the wire.
//!
//! [RFC 8446 §7.5]: https://www.rfc-editor.org/rfc/rfc8446#section-7.5

use std::fmt;

use ring::signature::{ED25519, Ed25519KeyPair, KeyPair, UnparsedPublicKey};
use zeroize::Zeroizing;

use crate::PkiError;

/// The TLS exporter label both ends use to derive the 32-byte value an
/// Ed25519 authentication proof signs.
pub const AUTH_EXPORTER_LABEL: &[u8] = b"EXPORTER-netproc-auth";

/// An Ed25519 signing key. Its seed is zeroized on drop and never printed.
pub struct Ed25519Key {
    seed: Zeroizing<[u8; 32]>,
    pair: Ed25519KeyPair,
}

impl Ed25519Key {
    /// A new key from the system's CSPRNG.
    pub fn generate() -> Result<Ed25519Key, PkiError> {
        let mut seed = Zeroizing::new([0u8; 32]);
        crate::random_bytes(&mut seed[..])?;
        Ed25519Key::from_seed(&seed)
    }

    /// The key with this 32-byte seed (the RFC 8032 private key).
    pub fn from_seed(seed: &[u8; 32]) -> Result<Ed25519Key, PkiError> {
        let pair = Ed25519KeyPair::from_seed_unchecked(seed).map_err(|_| PkiError::Generate {
            what: "Ed25519 key",
            reason: "invalid seed".into(),
        })?;
        Ok(Ed25519Key {
            seed: Zeroizing::new(*seed),
            pair,
        })
    }

    /// The seed, to store the key (keep it secret).
    pub fn seed(&self) -> &[u8; 32] {
        &self.seed
    }

    /// The public key, to register with servers.
    pub fn public_key(&self) -> [u8; 32] {
        let mut out = [0u8; 32];
        out.copy_from_slice(self.pair.public_key().as_ref());
        out
    }

    /// Signs `message`.
    pub fn sign(&self, message: &[u8]) -> [u8; 64] {
        let mut out = [0u8; 64];
        out.copy_from_slice(self.pair.sign(message).as_ref());
        out
    }
}

impl fmt::Debug for Ed25519Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ed25519Key")
            .field("public_key", &crate::Fingerprint::of(&self.public_key()))
            .finish_non_exhaustive()
    }
}

/// Whether `signature` is `public_key`'s signature of `message`.
pub fn verify_ed25519(public_key: &[u8; 32], message: &[u8], signature: &[u8]) -> bool {
    UnparsedPublicKey::new(&ED25519, public_key)
        .verify(message, signature)
        .is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_verify_only_with_their_key_and_message() {
        let a = Ed25519Key::generate().unwrap();
        let b = Ed25519Key::generate().unwrap();
        let sig = a.sign(b"hello");
        assert!(verify_ed25519(&a.public_key(), b"hello", &sig));
        assert!(!verify_ed25519(&b.public_key(), b"hello", &sig));
        assert!(!verify_ed25519(&a.public_key(), b"hellp", &sig));
        assert!(!verify_ed25519(&a.public_key(), b"hello", &sig[..63]));
        let again = Ed25519Key::from_seed(a.seed()).unwrap();
        assert_eq!(again.public_key(), a.public_key());
        assert!(!format!("{a:?}").contains(&format!("{:?}", a.seed())));
    }
}
