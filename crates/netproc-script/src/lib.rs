//! Sandboxed run-time defined functions for netproc, on the Rhai scripting engine.
//!
//! It will own the script runtime: a Rhai engine with sandbox limits (operations, call depth, sizes, wall time), dependencies as importable modules, constants visible to scripts, and a bounded pool of worker threads.
//!
//! This crate is part of [netproc](https://github.com/netproc/netproc). It is
//! a placeholder in this release: its API arrives with a later version, and
//! nothing here is stable yet.
#![forbid(unsafe_code)]
#![cfg_attr(not(test), warn(clippy::unwrap_used))]
