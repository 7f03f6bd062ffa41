//! Integration tests of netproc-wire: property tests and the published test vectors.

mod props;
mod vectors;
