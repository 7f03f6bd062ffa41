//! The one crypto provider (ring) and its random number generator, used by
//! every other module.

use std::sync::{Arc, OnceLock};

use rustls::crypto::CryptoProvider;

use crate::error::PkiError;

/// The one crypto provider netproc uses: ring.
pub fn crypto_provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    Arc::clone(PROVIDER.get_or_init(|| Arc::new(rustls::crypto::ring::default_provider())))
}

/// Fills `buf` from the crypto provider's CSPRNG (ring's system RNG).
pub fn random_bytes(buf: &mut [u8]) -> Result<(), PkiError> {
    crypto_provider()
        .secure_random
        .fill(buf)
        .map_err(|_| PkiError::Generate {
            what: "random bytes",
            reason: "the system random number generator failed".into(),
        })
}
