//! Tests of netproc-propagation: the signed envelope, the authority and
//! targets in one process, and the whole thing over real TLS.

mod envelope;
mod local;
mod tls;
mod vectors;
