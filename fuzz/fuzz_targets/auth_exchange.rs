//! The authentication exchange on arbitrary first frames: never panics, and
//! what it accepts carries a sane client frame limit and a sanitized key id.
//! Seeds: `fuzz/seeds/auth_exchange` (replayed by `cargo test -p
//! netproc-server`): `cargo fuzz run auth_exchange fuzz/seeds/auth_exchange`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    netproc_server::fuzz_auth_exchange(data);
});
