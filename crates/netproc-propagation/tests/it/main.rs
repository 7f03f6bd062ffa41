//! Tests of netproc-propagation: the signed envelope, the authority and
//! targets in one process, and the whole thing over real TLS.

mod amqp;
mod durability;
mod envelope;
mod fleet;
mod local;
mod local_props;
mod tls;
mod tls_refusals;
mod vectors;
