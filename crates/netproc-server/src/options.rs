//! Server settings: every knob with its unit, default and cost.
//!
//! The three abuse-control groups and their knobs are the reference's, with
//! the same names and defaults; `session_controls` and the `max_tracked_*`
//! bounds are netproc's additions.
//!
//! Over 600 lines on purpose: it is the table of every knob (unit, default,
//! cost, validation) that `docs/operations.md` and the TOML file follow, and
//! an operator or reviewer reads it top to bottom; the tests (about 115
//! lines) check the table against the file format.

use netproc_wire::{DEFAULT_MAX_POST_AUTH_FRAME_BYTES, DEFAULT_MAX_PRE_AUTH_FRAME_BYTES};
use serde::{Deserialize, Deserializer, Serialize};

/// Everything tunable about a server. Omitted fields (in code via
/// `Default`, in TOML or JSON by leaving them out) take the defaults below;
/// a partial block merges field by field with its defaults.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct ServerOptions {
    /// Admission, handshake, authentication and framing limits.
    pub connection_controls: ConnectionControls,
    /// Failed-authentication counting and blocking.
    pub auth_controls: AuthControls,
    /// Per-request limits.
    pub request_controls: RequestControls,
    /// Per-session limits beyond the reference.
    pub session_controls: SessionControls,
}

/// Admission, handshake, authentication and framing limits.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct ConnectionControls {
    /// Sockets open at once; more are closed at accept (`connection_limited`). Default 1024.
    pub max_concurrent_sockets: u32,
    /// Sockets admitted whose TLS handshake has not finished; more are
    /// closed at accept (`handshake_limited`). Default 256.
    pub max_concurrent_handshakes: u32,
    /// TLS sessions not yet authenticated; more are closed after the
    /// handshake (`handshake_limited`). Default 256.
    pub max_unauthenticated_sessions: u32,
    /// Length of both new-connection sliding windows, ms. Default 1000.
    pub global_connection_window_ms: u64,
    /// New connections admitted per window from all addresses
    /// (`connection_limited`). Default 512. Memory: one instant per admission.
    pub global_max_new_connections_per_window: u32,
    /// New connections admitted per window from one address (IPv6: one /64)
    /// (`connection_limited`). Default 64. Memory: up to this many instants
    /// per tracked address.
    pub per_ip_max_new_connections_per_window: u32,
    /// Milliseconds allowed for the TLS handshake. Default 5000.
    pub tls_handshake_timeout_ms: u64,
    /// Milliseconds from TLS established to a successful `Auth` (`timeout`). Default 5000.
    pub auth_message_timeout_ms: u64,
    /// Largest frame body before authentication, bytes (`frame_too_large`).
    /// Default 65 536. Worst case: this much buffered per unauthenticated connection.
    pub max_pre_auth_frame_bytes: u32,
    /// Largest frame body after authentication, bytes, both directions
    /// (`frame_too_large`). Default 1 048 576.
    pub max_post_auth_frame_bytes: u32,
    /// Addresses tracked by the per-address limiters; when full of active
    /// entries, new addresses are refused (fail closed). Default 16 384.
    pub max_tracked_ips: u32,
    /// IPv6 peers are keyed by this prefix length. Default 64.
    pub ipv6_prefix_len: u8,
}

impl Default for ConnectionControls {
    fn default() -> Self {
        ConnectionControls {
            max_concurrent_sockets: 1024,
            max_concurrent_handshakes: 256,
            max_unauthenticated_sessions: 256,
            global_connection_window_ms: 1000,
            global_max_new_connections_per_window: 512,
            per_ip_max_new_connections_per_window: 64,
            tls_handshake_timeout_ms: 5000,
            auth_message_timeout_ms: 5000,
            max_pre_auth_frame_bytes: DEFAULT_MAX_PRE_AUTH_FRAME_BYTES,
            max_post_auth_frame_bytes: DEFAULT_MAX_POST_AUTH_FRAME_BYTES,
            max_tracked_ips: 16_384,
            ipv6_prefix_len: 64,
        }
    }
}

/// Failed-authentication counting and blocking.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct AuthControls {
    /// Window for counting authentication attempts per address, ms. Default 10 000.
    pub pending_auth_window_ms: u64,
    /// Authentication attempts (successful or not) per address per window
    /// (`auth_throttled`, scope `pending_auth_attempts_per_ip`). Default 100.
    pub max_pending_auth_attempts_per_ip_per_window: u32,
    /// Window for counting failures, ms. Default 60 000.
    pub failed_auth_window_ms: u64,
    /// Failures (≥) per address per window that block it. Default 20.
    pub max_failed_auth_per_ip_per_window: u32,
    /// Failures (≥) per API key id per window that block the key from any
    /// address. For a key bound to a certificate, only failures over that
    /// certificate count. Default 20.
    pub max_failed_auth_per_api_key_per_window: u32,
    /// How long a block lasts, ms. Default 60 000.
    pub block_duration_ms: u64,
    /// When false, failures are counted but never block. Default true.
    pub enable_blocklist: bool,
    /// API key ids tracked by the failure counters. Default 16 384.
    pub max_tracked_api_keys: u32,
}

impl Default for AuthControls {
    fn default() -> Self {
        AuthControls {
            pending_auth_window_ms: 10_000,
            max_pending_auth_attempts_per_ip_per_window: 100,
            failed_auth_window_ms: 60_000,
            max_failed_auth_per_ip_per_window: 20,
            max_failed_auth_per_api_key_per_window: 20,
            block_duration_ms: 60_000,
            enable_blocklist: true,
            max_tracked_api_keys: 16_384,
        }
    }
}

/// A token bucket for requests: starts full, refills continuously.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct BucketControls {
    /// Whether the bucket applies.
    pub enabled: bool,
    /// Tokens added per interval.
    pub tokens_per_interval: u32,
    /// The interval, ms.
    pub interval_ms: u64,
    /// Capacity (a burst smaller than the rate is legitimate).
    pub burst_tokens: u32,
    /// Close the connection (after answering) when this bucket refuses.
    pub disconnect_on_limit: bool,
}

impl BucketControls {
    fn with(tokens_per_interval: u32, burst_tokens: u32) -> BucketControls {
        BucketControls {
            enabled: true,
            tokens_per_interval,
            interval_ms: 1000,
            burst_tokens,
            disconnect_on_limit: false,
        }
    }

    /// The reference's per-connection default: 200/s, burst 400.
    pub fn per_connection_default() -> BucketControls {
        BucketControls::with(200, 400)
    }

    /// The reference's per-API-key default: 1000/s, burst 2000.
    pub fn per_api_key_default() -> BucketControls {
        BucketControls::with(1000, 2000)
    }

    /// The reference's per-address default: 500/s, burst 1000.
    pub fn per_ip_default() -> BucketControls {
        BucketControls::with(500, 1000)
    }

    /// netproc's refusal budget per connection: 100/s, burst 200.
    pub fn refusals_default() -> BucketControls {
        BucketControls::with(100, 200)
    }

    /// A disabled bucket (for benchmarks and trusted networks).
    pub fn disabled() -> BucketControls {
        BucketControls {
            enabled: false,
            ..BucketControls::with(1, 1)
        }
    }
}

/// A bucket block as written: any field may be left out.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PartialBucket {
    enabled: Option<bool>,
    tokens_per_interval: Option<u32>,
    interval_ms: Option<u64>,
    burst_tokens: Option<u32>,
    disconnect_on_limit: Option<bool>,
}

impl PartialBucket {
    fn over(self, d: BucketControls) -> BucketControls {
        BucketControls {
            enabled: self.enabled.unwrap_or(d.enabled),
            tokens_per_interval: self.tokens_per_interval.unwrap_or(d.tokens_per_interval),
            interval_ms: self.interval_ms.unwrap_or(d.interval_ms),
            burst_tokens: self.burst_tokens.unwrap_or(d.burst_tokens),
            disconnect_on_limit: self.disconnect_on_limit.unwrap_or(d.disconnect_on_limit),
        }
    }
}

fn de_per_connection<'de, D: Deserializer<'de>>(d: D) -> Result<BucketControls, D::Error> {
    Ok(PartialBucket::deserialize(d)?.over(BucketControls::per_connection_default()))
}
fn de_per_api_key<'de, D: Deserializer<'de>>(d: D) -> Result<BucketControls, D::Error> {
    Ok(PartialBucket::deserialize(d)?.over(BucketControls::per_api_key_default()))
}
fn de_per_ip<'de, D: Deserializer<'de>>(d: D) -> Result<BucketControls, D::Error> {
    Ok(PartialBucket::deserialize(d)?.over(BucketControls::per_ip_default()))
}
fn de_refusals<'de, D: Deserializer<'de>>(d: D) -> Result<BucketControls, D::Error> {
    Ok(PartialBucket::deserialize(d)?.over(BucketControls::refusals_default()))
}

/// Per-request limits, checked in this order after the privilege check:
/// in-flight, per connection, per API key, per address.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct RequestControls {
    /// Requests one connection may have running; more are answered
    /// `rate_limited` (scope `in_flight_per_connection`). Default 128.
    pub max_in_flight_requests_per_connection: u32,
    /// Bucket per connection (scope `per_connection`). Default 200/s, burst 400.
    #[serde(deserialize_with = "de_per_connection")]
    pub per_connection: BucketControls,
    /// Bucket per API key, shared by all its connections (scope
    /// `per_api_key`). Default 1000/s, burst 2000.
    #[serde(deserialize_with = "de_per_api_key")]
    pub per_api_key: BucketControls,
    /// Bucket per address, shared by all its connections (scope `per_ip`).
    /// Default 500/s, burst 1000.
    #[serde(deserialize_with = "de_per_ip")]
    pub per_ip: BucketControls,
    /// Budget per connection for frames that are refused rather than
    /// served: privilege denials, `invalid_operation`, `invalid_request`
    /// (bad payload, an id not above the last), unknown message kinds, and
    /// cancels of an id that is not running. Each takes a token; without
    /// one the frame is answered `rate_limited` (scope `refusals`) and not
    /// audited (or, with `disconnect_on_limit`, the session is closed).
    /// Default 100/s, burst 200 (netproc's; the reference has no such
    /// bucket). Worst case: a peer that only sends refused frames costs 200
    /// answers at once, then 100 per second, plus one `rate_limited` answer
    /// per further frame.
    #[serde(deserialize_with = "de_refusals")]
    pub refusals: BucketControls,
    /// Server-side limit on one request's execution, ms (`timeout`). Default 30 000.
    pub request_timeout_ms: u64,
}

impl Default for RequestControls {
    fn default() -> Self {
        RequestControls {
            max_in_flight_requests_per_connection: 128,
            per_connection: BucketControls::per_connection_default(),
            per_api_key: BucketControls::per_api_key_default(),
            per_ip: BucketControls::per_ip_default(),
            refusals: BucketControls::refusals_default(),
            request_timeout_ms: 30_000,
        }
    }
}

/// Per-session limits beyond the reference.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct SessionControls {
    /// A session silent this long (ms) is closed with `idle_timeout`; 0 = never.
    /// Default 900 000 (15 minutes).
    pub idle_timeout_ms: u64,
    /// Pings per second a session may send; past the burst the connection
    /// closes with `rate_limited`. Default 10.
    pub max_pings_per_second: u32,
    /// Ping burst. Default 20.
    pub ping_burst: u32,
    /// Bytes of responses a connection may have queued unsent; past it the
    /// server stops reading that connection's requests. Default 8 MiB.
    pub max_outbound_bytes_per_connection: u32,
    /// A write that makes no progress for this long (ms) closes the
    /// connection. Default 30 000.
    pub write_stall_timeout_ms: u64,
    /// Sessions one principal may have at once; a new one past it is refused
    /// `too_many_sessions` and the live ones are not disturbed. 0 = no cap
    /// (the default).
    pub max_sessions_per_principal: u32,
    /// One session per principal: a new session replaces the old ones
    /// (`GoAway{session_replaced}`), but only after it has authenticated, so
    /// an unauthenticated peer can never kick a live one. Default false.
    pub single_active_session: bool,
    /// End a session (`GoAway{certificate_expired}`) when its client
    /// certificate expires. Default true. (A credential's own expiry always
    /// ends its sessions, with `credential_revoked`.)
    pub close_on_cert_expiry: bool,
    /// A principal none of whose sessions was heard from for this long (ms)
    /// becomes `unstable`. Default 420 000 (7 minutes).
    pub unstable_after_ms: u64,
    /// ... and `offline` after this long (ms); it must lie between
    /// `unstable_after_ms` and `idle_timeout_ms`. Default 660 000 (11 minutes).
    pub offline_after_ms: u64,
    /// What identifies a principal for the session policy, liveness and
    /// `disconnect_principal`: the key it authenticated with (the default)
    /// or its client certificate.
    pub principal: PrincipalSource,
}

/// What identifies a principal.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum PrincipalSource {
    /// The API key id or Ed25519 key id (the default).
    #[default]
    Key,
    /// The client certificate's SHA-256 fingerprint (hex): every key used
    /// over one certificate is one principal.
    Certificate,
}

impl Default for SessionControls {
    fn default() -> Self {
        SessionControls {
            idle_timeout_ms: 900_000,
            max_pings_per_second: 10,
            ping_burst: 20,
            max_outbound_bytes_per_connection: 8 * 1024 * 1024,
            write_stall_timeout_ms: 30_000,
            max_sessions_per_principal: 0,
            single_active_session: false,
            close_on_cert_expiry: true,
            unstable_after_ms: 420_000,
            offline_after_ms: 660_000,
            principal: PrincipalSource::Key,
        }
    }
}

/// A setting that cannot work, naming the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid setting {field}: {reason}")]
pub struct InvalidOption {
    /// The field, dotted (`connection_controls.max_pre_auth_frame_bytes`).
    pub field: String,
    /// Why.
    pub reason: String,
}

fn positive(field: &str, v: u64) -> Result<(), InvalidOption> {
    if v == 0 {
        Err(InvalidOption {
            field: field.to_owned(),
            reason: "must be greater than zero".into(),
        })
    } else {
        Ok(())
    }
}

fn bucket(scope: &str, b: &BucketControls) -> Result<(), InvalidOption> {
    // Validated even when disabled, so enabling it later cannot break.
    positive(
        &format!("request_controls.{scope}.tokens_per_interval"),
        b.tokens_per_interval.into(),
    )?;
    positive(
        &format!("request_controls.{scope}.interval_ms"),
        b.interval_ms,
    )?;
    positive(
        &format!("request_controls.{scope}.burst_tokens"),
        b.burst_tokens.into(),
    )
}

impl ServerOptions {
    /// Checks that the settings can work together.
    pub fn validate(&self) -> Result<(), InvalidOption> {
        let c = &self.connection_controls;
        let a = &self.auth_controls;
        let r = &self.request_controls;
        let s = &self.session_controls;
        for (field, v) in [
            (
                "connection_controls.max_concurrent_sockets",
                u64::from(c.max_concurrent_sockets),
            ),
            (
                "connection_controls.max_concurrent_handshakes",
                c.max_concurrent_handshakes.into(),
            ),
            (
                "connection_controls.max_unauthenticated_sessions",
                c.max_unauthenticated_sessions.into(),
            ),
            (
                "connection_controls.global_connection_window_ms",
                c.global_connection_window_ms,
            ),
            (
                "connection_controls.global_max_new_connections_per_window",
                c.global_max_new_connections_per_window.into(),
            ),
            (
                "connection_controls.per_ip_max_new_connections_per_window",
                c.per_ip_max_new_connections_per_window.into(),
            ),
            (
                "connection_controls.tls_handshake_timeout_ms",
                c.tls_handshake_timeout_ms,
            ),
            (
                "connection_controls.auth_message_timeout_ms",
                c.auth_message_timeout_ms,
            ),
            (
                "connection_controls.max_pre_auth_frame_bytes",
                c.max_pre_auth_frame_bytes.into(),
            ),
            (
                "connection_controls.max_post_auth_frame_bytes",
                c.max_post_auth_frame_bytes.into(),
            ),
            (
                "connection_controls.max_tracked_ips",
                c.max_tracked_ips.into(),
            ),
            (
                "auth_controls.pending_auth_window_ms",
                a.pending_auth_window_ms,
            ),
            (
                "auth_controls.max_pending_auth_attempts_per_ip_per_window",
                a.max_pending_auth_attempts_per_ip_per_window.into(),
            ),
            (
                "auth_controls.failed_auth_window_ms",
                a.failed_auth_window_ms,
            ),
            (
                "auth_controls.max_failed_auth_per_ip_per_window",
                a.max_failed_auth_per_ip_per_window.into(),
            ),
            (
                "auth_controls.max_failed_auth_per_api_key_per_window",
                a.max_failed_auth_per_api_key_per_window.into(),
            ),
            ("auth_controls.block_duration_ms", a.block_duration_ms),
            (
                "auth_controls.max_tracked_api_keys",
                a.max_tracked_api_keys.into(),
            ),
            (
                "request_controls.max_in_flight_requests_per_connection",
                r.max_in_flight_requests_per_connection.into(),
            ),
            ("request_controls.request_timeout_ms", r.request_timeout_ms),
            (
                "session_controls.max_pings_per_second",
                s.max_pings_per_second.into(),
            ),
            ("session_controls.ping_burst", s.ping_burst.into()),
            (
                "session_controls.write_stall_timeout_ms",
                s.write_stall_timeout_ms,
            ),
        ] {
            positive(field, v)?;
        }
        if c.max_pre_auth_frame_bytes > c.max_post_auth_frame_bytes {
            return Err(InvalidOption {
                field: "connection_controls.max_pre_auth_frame_bytes".into(),
                reason: format!(
                    "{} is above max_post_auth_frame_bytes ({})",
                    c.max_pre_auth_frame_bytes, c.max_post_auth_frame_bytes
                ),
            });
        }
        // Otherwise `unstable` (or `offline`) could never be seen.
        if s.unstable_after_ms == 0 || s.unstable_after_ms >= s.offline_after_ms {
            return Err(InvalidOption {
                field: "session_controls.unstable_after_ms".into(),
                reason: format!(
                    "{} must be above 0 and below offline_after_ms ({})",
                    s.unstable_after_ms, s.offline_after_ms
                ),
            });
        }
        if s.idle_timeout_ms != 0 && s.offline_after_ms >= s.idle_timeout_ms {
            return Err(InvalidOption {
                field: "session_controls.offline_after_ms".into(),
                reason: format!(
                    "{} must be below idle_timeout_ms ({})",
                    s.offline_after_ms, s.idle_timeout_ms
                ),
            });
        }
        if c.ipv6_prefix_len == 0 || c.ipv6_prefix_len > 128 {
            return Err(InvalidOption {
                field: "connection_controls.ipv6_prefix_len".into(),
                reason: "must be between 1 and 128".into(),
            });
        }
        bucket("per_connection", &r.per_connection)?;
        bucket("per_api_key", &r.per_api_key)?;
        bucket("per_ip", &r.per_ip)?;
        bucket("refusals", &r.refusals)?;
        if s.max_outbound_bytes_per_connection < c.max_post_auth_frame_bytes {
            return Err(InvalidOption {
                field: "session_controls.max_outbound_bytes_per_connection".into(),
                reason: "must be at least max_post_auth_frame_bytes, or one response could never be queued".into(),
            });
        }
        Ok(())
    }
}

/// The settings in force, swappable at run time, with a version that
/// per-connection and per-key buckets follow (they are reconfigured on
/// their next use after a change). Owned by the server; the abuse layer
/// and the sessions read it through an `Arc`.
pub(crate) struct Settings {
    current: arc_swap::ArcSwap<ServerOptions>,
    version: std::sync::atomic::AtomicU64,
}

impl Settings {
    pub(crate) fn new(options: ServerOptions) -> Settings {
        Settings {
            current: arc_swap::ArcSwap::from_pointee(options),
            version: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// The settings in force. A guard, not a clone: reading it on the
    /// request path touches no reference count shared between connections.
    pub(crate) fn load(&self) -> arc_swap::Guard<std::sync::Arc<ServerOptions>> {
        self.current.load()
    }

    /// The settings in force, to hold across awaits.
    pub(crate) fn load_full(&self) -> std::sync::Arc<ServerOptions> {
        self.current.load_full()
    }

    /// Replaces the settings (already validated) and bumps the version.
    pub(crate) fn replace(&self, options: ServerOptions) {
        self.current.store(std::sync::Arc::new(options));
        self.version
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
    }

    /// Incremented by each change.
    pub(crate) fn version(&self) -> u64 {
        self.version.load(std::sync::atomic::Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_the_references_and_valid() {
        let o = ServerOptions::default();
        o.validate().unwrap();
        let c = &o.connection_controls;
        assert_eq!(
            (
                c.max_concurrent_sockets,
                c.max_concurrent_handshakes,
                c.max_unauthenticated_sessions
            ),
            (1024, 256, 256)
        );
        assert_eq!(
            (
                c.global_connection_window_ms,
                c.global_max_new_connections_per_window,
                c.per_ip_max_new_connections_per_window
            ),
            (1000, 512, 64)
        );
        assert_eq!(
            (c.tls_handshake_timeout_ms, c.auth_message_timeout_ms),
            (5000, 5000)
        );
        assert_eq!(
            (c.max_pre_auth_frame_bytes, c.max_post_auth_frame_bytes),
            (65_536, 1_048_576)
        );
        let a = &o.auth_controls;
        assert_eq!(
            (
                a.pending_auth_window_ms,
                a.max_pending_auth_attempts_per_ip_per_window
            ),
            (10_000, 100)
        );
        assert_eq!(
            (
                a.failed_auth_window_ms,
                a.max_failed_auth_per_ip_per_window,
                a.max_failed_auth_per_api_key_per_window
            ),
            (60_000, 20, 20)
        );
        assert_eq!((a.block_duration_ms, a.enable_blocklist), (60_000, true));
        let r = &o.request_controls;
        assert_eq!(r.max_in_flight_requests_per_connection, 128);
        assert_eq!(r.per_connection, BucketControls::with(200, 400));
        assert_eq!(r.per_api_key, BucketControls::with(1000, 2000));
        assert_eq!(r.per_ip, BucketControls::with(500, 1000));
    }

    #[test]
    fn a_partial_block_keeps_its_scopes_defaults() {
        let o: ServerOptions = serde_json::from_str(
            r#"{"request_controls": {"per_api_key": {"enabled": false}}, "auth_controls": {"block_duration_ms": 5}}"#,
        )
        .unwrap();
        assert!(!o.request_controls.per_api_key.enabled);
        assert_eq!(o.request_controls.per_api_key.tokens_per_interval, 1000);
        assert_eq!(o.request_controls.per_api_key.burst_tokens, 2000);
        assert_eq!(o.request_controls.per_ip, BucketControls::per_ip_default());
        assert_eq!(o.auth_controls.block_duration_ms, 5);
        assert_eq!(o.auth_controls.failed_auth_window_ms, 60_000);
    }

    #[test]
    fn the_example_file_lists_every_knob_at_its_default() {
        let text = include_str!("../../../fixtures/examples/server_options.json");
        let parsed: ServerOptions = serde_json::from_str(text).unwrap();
        assert_eq!(parsed, ServerOptions::default());
        // And nothing is missing from it: it serializes back to the same document.
        let back: serde_json::Value = serde_json::to_value(&parsed).unwrap();
        let file: serde_json::Value = serde_json::from_str(text).unwrap();
        assert_eq!(back, file);
    }

    #[test]
    fn unknown_fields_are_refused() {
        let err =
            serde_json::from_str::<ServerOptions>(r#"{"connection_controls": {"max_sockets": 1}}"#)
                .unwrap_err();
        assert!(err.to_string().contains("max_sockets"), "{err}");
    }

    #[test]
    fn impossible_settings_name_their_field() {
        let mut o = ServerOptions::default();
        o.connection_controls.max_pre_auth_frame_bytes = 2_000_000;
        assert_eq!(
            o.validate().unwrap_err().field,
            "connection_controls.max_pre_auth_frame_bytes"
        );
        let mut o = ServerOptions::default();
        o.request_controls.per_ip.interval_ms = 0;
        assert_eq!(
            o.validate().unwrap_err().field,
            "request_controls.per_ip.interval_ms"
        );
        let mut o = ServerOptions::default();
        o.auth_controls.failed_auth_window_ms = 0;
        assert_eq!(
            o.validate().unwrap_err().field,
            "auth_controls.failed_auth_window_ms"
        );
        // A burst smaller than the rate is legitimate.
        let mut o = ServerOptions::default();
        o.request_controls.per_connection.burst_tokens = 1;
        o.validate().unwrap();
    }
}
