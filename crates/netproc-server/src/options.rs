//! Server settings: every knob with its unit, default and cost.

use std::fmt;

use netproc_wire::{DEFAULT_MAX_POST_AUTH_FRAME_BYTES, DEFAULT_MAX_PRE_AUTH_FRAME_BYTES};
use serde::{Deserialize, Serialize};

/// Everything tunable about a server. Omitted fields (in code via
/// `Default`, in TOML by leaving them out) take the defaults below.
///
/// The groups follow the reference's abuse controls; the abuse-control
/// release adds its admission and rate knobs to the same groups.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct ServerOptions {
    /// Handshake, authentication and framing limits.
    pub connection_controls: ConnectionControls,
    /// Per-request limits.
    pub request_controls: RequestControls,
    /// Per-session limits beyond the reference.
    pub session_controls: SessionControls,
}

/// Handshake, authentication and framing limits.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct ConnectionControls {
    /// Milliseconds allowed for the TLS handshake. Default 5000.
    pub tls_handshake_timeout_ms: u64,
    /// Milliseconds from TLS established to a successful `Auth`. Default 5000.
    pub auth_message_timeout_ms: u64,
    /// Largest frame body before authentication, bytes. Default 65 536.
    /// Worst case: this much buffered per unauthenticated connection.
    pub max_pre_auth_frame_bytes: u32,
    /// Largest frame body after authentication, bytes (both directions).
    /// Default 1 048 576. Worst case: this much buffered per connection.
    pub max_post_auth_frame_bytes: u32,
}

impl Default for ConnectionControls {
    fn default() -> Self {
        ConnectionControls {
            tls_handshake_timeout_ms: 5000,
            auth_message_timeout_ms: 5000,
            max_pre_auth_frame_bytes: DEFAULT_MAX_PRE_AUTH_FRAME_BYTES,
            max_post_auth_frame_bytes: DEFAULT_MAX_POST_AUTH_FRAME_BYTES,
        }
    }
}

/// Per-request limits.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct RequestControls {
    /// Requests one connection may have running; more are answered
    /// `rate_limited` (scope `in_flight_per_connection`). Default 128.
    pub max_in_flight_requests_per_connection: u32,
    /// Server-side limit on one request's execution, ms; past it the request
    /// is answered `timeout`. Default 30 000.
    pub request_timeout_ms: u64,
}

impl Default for RequestControls {
    fn default() -> Self {
        RequestControls {
            max_in_flight_requests_per_connection: 128,
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
}

impl Default for SessionControls {
    fn default() -> Self {
        SessionControls {
            idle_timeout_ms: 900_000,
            max_pings_per_second: 10,
            ping_burst: 20,
            max_outbound_bytes_per_connection: 8 * 1024 * 1024,
            write_stall_timeout_ms: 30_000,
        }
    }
}

/// A setting that cannot work, naming the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid setting {field}: {reason}")]
pub struct InvalidOption {
    /// The field, dotted (`connection_controls.max_pre_auth_frame_bytes`).
    pub field: &'static str,
    /// Why.
    pub reason: String,
}

fn positive(field: &'static str, v: u64) -> Result<(), InvalidOption> {
    if v == 0 {
        Err(InvalidOption {
            field,
            reason: "must be greater than zero".into(),
        })
    } else {
        Ok(())
    }
}

impl ServerOptions {
    /// Checks that the settings can work together.
    pub fn validate(&self) -> Result<(), InvalidOption> {
        let c = &self.connection_controls;
        let r = &self.request_controls;
        let s = &self.session_controls;
        positive(
            "connection_controls.tls_handshake_timeout_ms",
            c.tls_handshake_timeout_ms,
        )?;
        positive(
            "connection_controls.auth_message_timeout_ms",
            c.auth_message_timeout_ms,
        )?;
        positive(
            "connection_controls.max_pre_auth_frame_bytes",
            c.max_pre_auth_frame_bytes.into(),
        )?;
        positive(
            "connection_controls.max_post_auth_frame_bytes",
            c.max_post_auth_frame_bytes.into(),
        )?;
        if c.max_pre_auth_frame_bytes > c.max_post_auth_frame_bytes {
            return Err(InvalidOption {
                field: "connection_controls.max_pre_auth_frame_bytes",
                reason: format!(
                    "{} is above max_post_auth_frame_bytes ({})",
                    c.max_pre_auth_frame_bytes, c.max_post_auth_frame_bytes
                ),
            });
        }
        positive(
            "request_controls.max_in_flight_requests_per_connection",
            r.max_in_flight_requests_per_connection.into(),
        )?;
        positive("request_controls.request_timeout_ms", r.request_timeout_ms)?;
        positive(
            "session_controls.max_pings_per_second",
            s.max_pings_per_second.into(),
        )?;
        positive("session_controls.ping_burst", s.ping_burst.into())?;
        positive(
            "session_controls.write_stall_timeout_ms",
            s.write_stall_timeout_ms,
        )?;
        if s.max_outbound_bytes_per_connection < c.max_post_auth_frame_bytes {
            return Err(InvalidOption {
                field: "session_controls.max_outbound_bytes_per_connection",
                reason: "must be at least max_post_auth_frame_bytes, or one response could never be queued".into(),
            });
        }
        Ok(())
    }
}

impl fmt::Display for ServerOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{self:?}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_the_documented_ones_and_valid() {
        let o = ServerOptions::default();
        o.validate().unwrap();
        assert_eq!(o.connection_controls.max_pre_auth_frame_bytes, 65_536);
        assert_eq!(
            o.request_controls.max_in_flight_requests_per_connection,
            128
        );
        assert_eq!(o.request_controls.request_timeout_ms, 30_000);
        assert_eq!(o.session_controls.idle_timeout_ms, 900_000);
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
        o.request_controls.request_timeout_ms = 0;
        assert_eq!(
            o.validate().unwrap_err().field,
            "request_controls.request_timeout_ms"
        );
    }
}
