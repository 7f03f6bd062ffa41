//! Integration tests of netproc-pki: real TLS handshakes on 127.0.0.1 and
//! PEM files on disk.

mod enroll;
mod files;
mod handshake;
mod support;
