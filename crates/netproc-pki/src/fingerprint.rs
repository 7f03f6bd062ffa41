//! SHA-256 fingerprints.

use std::fmt;
use std::str::FromStr;

use sha2::{Digest, Sha256};

use crate::error::{PkiError, truncated};

/// A SHA-256 fingerprint of DER bytes (a certificate, or its public key).
///
/// Displays as 64 lowercase hex digits without separators. Parses that form,
/// the colon-separated upper-case form (`AB:CD:…`, as OpenSSL and Node.js
/// print it), and either with a `sha256:` prefix.
///
/// ```
/// use netproc_pki::Fingerprint;
///
/// let fp = Fingerprint::of(b"hello");
/// let hex = fp.to_string();
/// assert_eq!(hex.len(), 64);
/// assert_eq!(hex.parse::<Fingerprint>().unwrap(), fp);
/// assert_eq!(fp.to_colon_hex().parse::<Fingerprint>().unwrap(), fp);
/// assert_eq!(format!("sha256:{hex}").parse::<Fingerprint>().unwrap(), fp);
/// ```
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Fingerprint([u8; 32]);

impl Fingerprint {
    /// The SHA-256 of `der`.
    pub fn of(der: &[u8]) -> Fingerprint {
        Fingerprint(Sha256::digest(der).into())
    }

    /// From raw digest bytes.
    pub const fn from_bytes(bytes: [u8; 32]) -> Fingerprint {
        Fingerprint(bytes)
    }

    /// The raw digest bytes.
    pub const fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Upper-case hex with colons, as OpenSSL prints it.
    pub fn to_colon_hex(&self) -> String {
        let mut out = String::with_capacity(95);
        for (i, b) in self.0.iter().enumerate() {
            if i > 0 {
                out.push(':');
            }
            out.push_str(&format!("{b:02X}"));
        }
        out
    }
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Fingerprint({self})")
    }
}

impl FromStr for Fingerprint {
    type Err = PkiError;

    fn from_str(s: &str) -> Result<Self, PkiError> {
        let invalid = || PkiError::InvalidFingerprint {
            input: truncated(s),
        };
        let body = s
            .get(..7)
            .filter(|p| p.eq_ignore_ascii_case("sha256:"))
            .map_or(s, |_| &s[7..]);
        let digits: Vec<u8> = if body.contains(':') {
            let parts: Vec<&str> = body.split(':').collect();
            if parts.len() != 32 || parts.iter().any(|p| p.len() != 2) {
                return Err(invalid());
            }
            parts.concat().into_bytes()
        } else {
            body.as_bytes().to_vec()
        };
        if digits.len() != 64 {
            return Err(invalid());
        }
        let mut out = [0u8; 32];
        hex::decode_to_slice(&digits, &mut out).map_err(|_| invalid())?;
        Ok(Fingerprint(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_digest() {
        assert_eq!(
            Fingerprint::of(b"").to_string(),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }

    #[test]
    fn bad_inputs_are_refused() {
        for bad in [
            "",
            "abc",
            "zz".repeat(32).as_str(),
            &"ab:".repeat(31),
            "sha256:",
            &"a".repeat(66),
        ] {
            assert!(bad.parse::<Fingerprint>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn parsing_is_case_insensitive() {
        let fp = Fingerprint::of(b"x");
        assert_eq!(
            fp.to_string()
                .to_uppercase()
                .parse::<Fingerprint>()
                .unwrap(),
            fp
        );
        assert_eq!(
            format!("SHA256:{}", fp.to_colon_hex().to_lowercase())
                .parse::<Fingerprint>()
                .unwrap(),
            fp
        );
    }
}
