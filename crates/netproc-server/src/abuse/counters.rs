//! The abuse-control counters: one list makes the `Counter` enum, its
//! Prometheus names and the fields of the public [`AbuseMetrics`].

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;

macro_rules! counters {
    ($( $(#[$doc:meta])* $name:ident, )*) => {
        /// A cumulative counter of [`AbuseMetrics`].
        #[derive(Debug, Clone, Copy)]
        #[allow(non_camel_case_types)]
        pub(crate) enum Counter { $( $name, )* }

        pub(super) const COUNTERS: usize = [$( stringify!($name), )*].len();

        impl Counter {
            /// Every counter, in order.
            pub(super) const ALL: [Counter; COUNTERS] = [$( Counter::$name, )*];

            /// The field name of [`AbuseMetrics`] (the reference's, for the
            /// admin JSON).
            pub(super) fn field(self) -> &'static str {
                match self { $( Counter::$name => stringify!($name), )* }
            }

            /// The counter's help text: its doc comment, one line.
            pub(super) fn help(self) -> String {
                let docs: &[&str] = match self { $( Counter::$name => &[$( stringify!($doc) ),*], )* };
                help_of(docs)
            }
        }

        /// A snapshot of the abuse-control counters and gauges.
        ///
        /// The first fourteen fields are the reference's, with the same names
        /// and meaning; the rest are netproc's. Counters are cumulative since
        /// start; `active_*` and the other gauges are current values.
        #[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
        #[non_exhaustive]
        pub struct AbuseMetrics {
            $( $(#[$doc])* pub $name: u64, )*
            /// Sockets open now.
            pub active_socket_count: u64,
            /// TLS handshakes in progress now.
            pub active_handshake_count: u64,
            /// TLS sessions not yet authenticated now.
            pub active_unauthenticated_session_count: u64,
            /// Authenticated sessions now.
            pub active_session_count: u64,
            /// Requests running now, across all sessions.
            pub in_flight_request_count: u64,
            /// Addresses blocked now.
            pub blocked_ip_count: u64,
            /// API keys blocked now.
            pub blocked_api_key_count: u64,
            /// 1 while limits are shared with the fleet through Redis, 0
            /// when the store is unreachable (the server is on its fallback
            /// share) or shared limits are not configured.
            pub shared_limits_connected: u64,
            /// Principals `online` now.
            pub online_principal_count: u64,
            /// Principals `unstable` now.
            pub unstable_principal_count: u64,
            /// Principals `offline` now that still have a session open.
            pub offline_principal_count: u64,
            /// Connections refused, by code.
            pub refused_by_code: BTreeMap<String, u64>,
        }

        impl AbuseMetrics {
            pub(super) fn from_counters(c: &[AtomicU64; COUNTERS]) -> AbuseMetrics {
                AbuseMetrics {
                    $( $name: c[Counter::$name as usize].load(Ordering::Relaxed), )*
                    ..AbuseMetrics::default()
                }
            }
        }
    };
}

counters! {
    /// Connections admitted at accept.
    connection_accepted_count,
    /// Connections refused at accept (any reason).
    connection_rejected_count,
    /// Refusals for the handshake or unauthenticated-session caps.
    handshake_limited_count,
    /// TLS handshakes that timed out.
    handshake_timeout_count,
    /// TLS handshakes that failed (bad certificate, protocol, ALPN).
    handshake_failure_count,
    /// Failed authentications.
    auth_failure_count,
    /// Refusals because an address or key was blocked or over its attempt window.
    auth_throttled_count,
    /// Requests refused by the per-connection bucket.
    rate_limited_per_connection_count,
    /// Requests refused by the per-API-key bucket.
    rate_limited_per_api_key_count,
    /// Requests refused by the per-address bucket.
    rate_limited_per_ip_count,
    /// Requests refused by the in-flight cap.
    rate_limited_in_flight_count,
    /// Refusals for the socket cap or a connection window.
    connection_limited_count,
    /// Successful authentications.
    auth_success_count,
    /// Sessions closed for not authenticating in time.
    auth_timeout_count,
    /// Requests refused by a function's own bucket or concurrency cap.
    rate_limited_per_function_count,
    /// Frames refused for their declared length.
    frame_too_large_count,
    /// New addresses or keys a limiter table could not track because it was
    /// full of active entries (admitted untracked, or refused for request
    /// buckets of authenticated callers).
    limiter_table_full_count,
    /// TLS configurations reloaded.
    tls_reload_count,
    /// TLS reloads refused (the last good configuration stayed).
    tls_reload_failure_count,
    /// Sessions ended because their credential or certificate was revoked or expired.
    sessions_revoked_count,
    /// Failed authentications counted in a shared overflow window because
    /// the blocklist's address or key table was full.
    auth_failure_overflow_count,
    /// Refused frames (privilege denials, bad operations or payloads,
    /// unknown message kinds, cancels of ids not running) answered
    /// `rate_limited` because the connection's refusal budget was spent.
    rate_limited_refusals_count,
    /// Frames refused before they ran, with their own code: privilege
    /// denials, `invalid_operation`, `invalid_request`, unknown kinds.
    request_refused_count,
    /// Request-bucket decisions made on the local fallback share because
    /// the fleet's store was unreachable or held a foreign value.
    shared_limits_fallback_count,
}

/// A counter's doc comment as one line, from its `doc = "…"` attributes.
fn help_of(docs: &[&str]) -> String {
    docs.iter()
        .map(|d| {
            d.trim_start_matches("doc")
                .trim_start()
                .trim_start_matches('=')
                .trim()
                // `"…"`, or a raw string `r"…"` / `r#"…"#`.
                .trim_start_matches('r')
                .trim_matches('#')
                .trim_matches('"')
                .trim()
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// The Prometheus name of a counter field: `netproc_<field>` with `_count`
/// replaced by `_total`, as Prometheus names counters.
pub(super) fn prometheus_name(field: &str) -> String {
    format!(
        "netproc_{}_total",
        field.strip_suffix("_count").unwrap_or(field)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_help_come_from_the_list() {
        assert_eq!(
            prometheus_name(Counter::auth_failure_count.field()),
            "netproc_auth_failure_total"
        );
        assert_eq!(
            Counter::connection_accepted_count.help(),
            "Connections admitted at accept."
        );
        assert!(Counter::ALL.iter().all(|c| !c.help().is_empty()));
    }
}
