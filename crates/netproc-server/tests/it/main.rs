//! End-to-end tests of the RPC core: real TLS on 127.0.0.1, a PKI made in
//! process, the real client.

mod abuse;
mod abuse_auth;
mod abuse_live;
#[cfg(unix)]
mod admin_socket;
mod auth;
mod calls;
mod compat;
mod ed25519;
mod fanout;
mod fleet;
mod identity;
mod lifecycle;
mod liveness;
mod negative;
mod persistence;
mod policy;
mod protocol;
mod reload;
mod scripts;
mod support;
