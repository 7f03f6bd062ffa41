//! Authentication and authorisation for netproc: privilege sets, principals, the Authenticator trait and a hashed API-key store.
//!
//! It will own `PrivilegeSet`, `Principal`, the async `Authenticator` trait with a closure adapter, the `ApiKeyStore` (keys hashed at rest, constant-time comparison, expiry, certificate binding, per-key function allow-lists) and the authorisation check applied to every operation.
//!
//! This crate is part of [netproc](https://github.com/netproc/netproc). It is
//! a placeholder in this release: its API arrives with a later version, and
//! nothing here is stable yet.
#![forbid(unsafe_code)]
#![cfg_attr(not(test), warn(clippy::unwrap_used))]
