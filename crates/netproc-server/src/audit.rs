//! Audit events, on the `tracing` target `netproc::audit`.
//!
//! Who (peer, certificate fingerprint, key id), what (operation, function),
//! outcome, duration. Never arguments, never secrets; strings a peer chose
//! are length-capped and escaped.
//!
//! Refusals a peer can cause in bulk are aggregated (see `lograte`): the
//! first per (principal, code) — per (address, code) for refusals at
//! authentication other than a failed credential, per reason for
//! connections — is logged, then at most one line per 10 s whose
//! `suppressed` field counts the refusals not logged since. Every failed
//! credential (`authentication_failed`) is logged: each one cost the peer a
//! TLS handshake, and the blocklist bounds them per address and key.

use std::net::SocketAddr;
use std::time::Instant;

use netproc_pki::CertIdentity;
use netproc_wire::ErrorCode;

use crate::function::SessionFacts;

/// The `tracing` target of audit events.
pub const AUDIT_TARGET: &str = "netproc::audit";

const MAX_PEER_STRING: usize = 128;

/// Caps `s` at 128 characters and escapes control and non-ASCII characters,
/// so a peer cannot forge log lines or flood them.
pub(crate) fn sanitize(s: &str) -> String {
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i == MAX_PEER_STRING {
            out.push('…');
            break;
        }
        if c.is_ascii_graphic() || c == ' ' {
            out.push(c);
        } else {
            out.extend(c.escape_default());
        }
    }
    out
}

/// The key id part of `npk_<id>_<secret>`, if the text has that shape.
/// Used to attribute failures; the secret is never looked at beyond its `_`.
pub(crate) fn claimed_key_id(key: &str) -> Option<String> {
    let rest = key.strip_prefix("npk_")?;
    let (id, _) = rest.split_once('_')?;
    Some(sanitize(id))
}

fn micros(since: Instant) -> u64 {
    u64::try_from(since.elapsed().as_micros()).unwrap_or(u64::MAX)
}

pub(crate) fn auth_ok(facts: &SessionFacts, client_name: Option<&str>, started: Instant) {
    tracing::info!(
        target: AUDIT_TARGET,
        event = "auth",
        outcome = "ok",
        peer = %facts.peer,
        cert = %facts.cert.fingerprint,
        principal = %sanitize(&facts.principal.id),
        key_id = facts.principal.key_id.as_deref().unwrap_or(""),
        session_id = facts.session_id,
        client_name = client_name.unwrap_or(""),
        duration_us = micros(started),
    );
}

pub(crate) fn auth_refused(
    peer: SocketAddr,
    cert: &CertIdentity,
    claimed_key: Option<&str>,
    code: ErrorCode,
    reason: &str,
    started: Instant,
    suppressed: u64,
) {
    tracing::warn!(
        target: AUDIT_TARGET,
        event = "auth",
        outcome = %code,
        peer = %peer,
        cert = %cert.fingerprint,
        key_id = claimed_key.unwrap_or(""),
        reason = %sanitize(reason),
        duration_us = micros(started),
        suppressed,
    );
}

pub(crate) fn refused_connection(peer: SocketAddr, reason: &str, suppressed: u64) {
    tracing::warn!(target: AUDIT_TARGET, event = "connection", outcome = "refused", peer = %peer, reason, suppressed);
}

pub(crate) fn request_refused(
    facts: &SessionFacts,
    operation: &str,
    function: Option<&str>,
    code: ErrorCode,
    suppressed: u64,
) {
    tracing::info!(
        target: AUDIT_TARGET,
        event = "request",
        outcome = %code,
        operation,
        function = %function.map(sanitize).unwrap_or_default(),
        peer = %facts.peer,
        cert = %facts.cert.fingerprint,
        key_id = facts.principal.key_id.as_deref().unwrap_or(""),
        session_id = facts.session_id,
        suppressed,
    );
}

pub(crate) fn admin_action(facts: &SessionFacts, operation: &str, target: &str) {
    tracing::info!(
        target: AUDIT_TARGET,
        event = "admin",
        outcome = "ok",
        operation,
        target = %sanitize(target),
        peer = %facts.peer,
        cert = %facts.cert.fingerprint,
        key_id = facts.principal.key_id.as_deref().unwrap_or(""),
        session_id = facts.session_id,
    );
}

pub(crate) fn session_closed(facts: &SessionFacts, reason: ErrorCode) {
    tracing::info!(
        target: AUDIT_TARGET,
        event = "session_end",
        outcome = %reason,
        peer = %facts.peer,
        key_id = facts.principal.key_id.as_deref().unwrap_or(""),
        session_id = facts.session_id,
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peer_strings_are_capped_and_escaped() {
        assert_eq!(sanitize("ok name"), "ok name");
        assert_eq!(sanitize("a\nb\u{1b}[31m"), "a\\nb\\u{1b}[31m");
        assert_eq!(sanitize(&"x".repeat(500)).chars().count(), 129);
    }

    #[test]
    fn claimed_key_ids_never_include_the_secret() {
        assert_eq!(claimed_key_id("npk_abc_secret").as_deref(), Some("abc"));
        assert_eq!(claimed_key_id("garbage"), None);
    }
}
