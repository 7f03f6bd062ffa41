//! A map keyed by request id: ids are small sequential integers, so a
//! multiplicative hash spreads them as well as SipHash does, for a
//! fraction of the cost on every call. (The server's maps hold at most a
//! session's in-flight requests, so ids chosen to collide cost little.)

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

/// A `HashMap` keyed by request id (`u64`), with [`RequestIdHasher`].
///
/// ```
/// use netproc_wire::RequestIdMap;
///
/// let mut pending: RequestIdMap<&str> = RequestIdMap::default();
/// pending.insert(7, "add");
/// assert_eq!(pending.remove(&7), Some("add"));
/// ```
pub type RequestIdMap<V> = HashMap<u64, V, BuildHasherDefault<RequestIdHasher>>;

/// Hashes a `u64` by multiplying it by 2^64 / φ (Fibonacci hashing).
#[derive(Debug, Default, Clone, Copy)]
pub struct RequestIdHasher(u64);

impl Hasher for RequestIdHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // Not a u64 key: fold the bytes in (never used by RequestIdMap).
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(b)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }

    fn write_u64(&mut self, id: u64) {
        self.0 = id.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sequential_ids_spread_over_the_low_bits() {
        let mut seen = std::collections::HashSet::new();
        for id in 0..1024u64 {
            let mut h = RequestIdHasher::default();
            h.write_u64(id);
            seen.insert(h.finish() & 1023);
        }
        assert!(seen.len() > 600, "{}", seen.len());
    }
}
